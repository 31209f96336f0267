//! The embedded [`Store`] backend: sled, with group commit.
//!
//! # Layout
//!
//! One sled database with these trees (records are JSON: every domain type already implements
//! serde, a record can be read with any JSON tool when debugging a data directory, and new
//! optional fields can be added without a migration; the encoding is nowhere near the cost of
//! the fsync that every write pays anyway):
//!
//! | tree                   | key                               | value                          |
//! |------------------------|-----------------------------------|--------------------------------|
//! | `entries`              | entry id (32 hex chars)           | [`RegistrationEntry`]          |
//! | `entries_by_parent`    | parent ID, `0x00`, entry id       | empty                          |
//! | `entries_by_spiffe_id` | SPIFFE ID, `0x00`, entry id       | empty                          |
//! | `entries_by_identity`  | SHA-256(SPIFFE ID, parent, sels)  | entry id (uniqueness index)    |
//! | `changes`              | revision, 8 bytes big-endian      | [`Change`]                     |
//! | `meta`                 | `revision`, `ca_journal`          | u64 big-endian, opaque bytes   |
//! | `nodes`                | agent SPIFFE ID                   | [`AttestedNode`]               |
//! | `join_tokens`          | token                             | [`JoinToken`]                  |
//! | `federated_bundles`    | trust domain name                 | [`FederatedBundle`]            |
//! | `audit`                | sequence, 8 bytes big-endian      | [`AuditRecord`]                |
//! | `audit_head`           | `head`                            | [`AuditHead`] (the last record)|
//! | `audit_checkpoints`    | covered sequence, 8 bytes BE      | [`AuditCheckpoint`]            |
//!
//! A SPIFFE ID never contains `0x00`, so `ID 0x00` is an unambiguous index prefix.
//!
//! An audit append is one sled transaction over `audit` and `audit_head`: it reads the head,
//! seals each record after it (sequence, time, hashes; see [`crate::audit`]), inserts them and
//! writes the new head, so concurrent appenders never fork the chain. Large batches are split
//! into transactions of `AUDIT_CHUNK` records, all covered by one flush. Record times never
//! decrease along the chain, so a `since` filter starts with a binary search over sequences.
//!
//! Every entry mutation is one sled transaction over the six entry trees: it reads and bumps the
//! revision counter, updates the entry and its indexes, writes the [`Change`] under the new
//! revision and removes the change that falls out of the retention window. sled 0.34 runs
//! transactions one at a time and applies each atomically with respect to every other read and
//! write, so revisions are gap-free and follow commit order.
//!
//! # Group commit
//!
//! A mutating call does its write (in a blocking task), then takes a ticket (`requested += 1`)
//! and waits. One flusher thread loops: it takes the highest ticket issued so far, reads the
//! revision counter, calls `Db::flush` (which writes out and fsyncs everything written before
//! it), then publishes "flushed through ticket T" and "durable revision R" on watch channels.
//! Every writer whose ticket is at most T wakes: its write finished before it took its ticket,
//! hence before the flush began. Writers that arrive during a flush are covered by the next
//! one, so N concurrent writes cost about one fsync. The durable revision is the one read just
//! before the flush: every transaction up to it had committed, so the flush covers it.
//!
//! A failed flush is sticky: the store answers [`StoreError::FlushFailed`] to every later write
//! (after a failed fsync nobody can tell what reached the disk).
//!
//! # Consistent snapshots
//!
//! sled has no multi-key read snapshots, so [`Store::snapshot_entries`] builds an exact one from
//! a fuzzy scan and the change feed:
//!
//! 1. read the revision counter: `R0` (a single read, atomic with respect to transactions);
//! 2. scan the `entries` tree into a map;
//! 3. read the revision counter again: `R1`;
//! 4. replay the changes `R0+1 ..= R1`, in order, onto the map.
//!
//! An entry untouched between `R0` and `R1` had the same value during the whole scan, so the
//! scan returned it exactly (a sled scan sees every key present for its whole duration, and no
//! key absent for its whole duration). An entry touched between `R0` and `R1` gets its state at
//! `R1` from its last change in that range. Nothing the scan saw can come from after `R1`,
//! since the scan ended before `R1` was read. The map is therefore exactly the state at `R1`.
//! The call then waits until `R1` is durable. If the changes it needs were pruned meanwhile it
//! starts over (three times, then [`StoreError::SnapshotUnavailable`]); with the default
//! retention that takes 100,000 writes during one scan.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::SystemTime;

/// The sled crate this backend is built on, re-exported so that forensic tools and tests can
/// open a data directory (of a stopped server) with the same version and read its trees as
/// the module docs lay them out.
pub use ::sled as engine;
use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use ::sled::{Db, IVec, Transactional, Tree};
use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sigil_core::{SpiffeId, TrustDomain};
use tokio::sync::watch;

use super::{
    AttestedNode, Change, ChangeKind, ChangesSince, DEFAULT_CHANGE_RETENTION, EntryFilter, EntryId,
    EntrySnapshot, FederatedBundle, JoinToken, MAX_CHANGES_PER_CALL, NewEntry, Page, PageRequest,
    RegistrationEntry, Revocation, Session, SessionEntryOp, SessionFilter, SessionId,
    SessionSerial, SessionUpdate, Store, StoreError, hex_decode, hex_encode,
};
use crate::audit::{
    AuditCheckpoint, AuditFilter, AuditHead, AuditRecord, GENESIS_HASH, NewAuditRecord,
};

/// Key of the revision counter in the `meta` tree.
const REVISION_KEY: &[u8] = b"revision";
/// Key of the CA journal in the `meta` tree.
const CA_JOURNAL_KEY: &[u8] = b"ca_journal";
/// Entries created per transaction by [`Store::create_entries`] (all of them share one flush).
const BATCH_CHUNK: usize = 1_000;
/// Key of the chain head in the `audit_head` tree.
const AUDIT_HEAD_KEY: &[u8] = b"head";
/// Audit records sealed per transaction by [`Store::append_audit`] (all share one flush).
const AUDIT_CHUNK: usize = 1_000;
/// How many times [`Store::snapshot_entries`] starts over when the changes it needs are pruned.
const SNAPSHOT_ATTEMPTS: usize = 3;

/// Options of [`SledStore::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledStoreOptions {
    /// How many changes the feed keeps (at least 1). Default [`DEFAULT_CHANGE_RETENTION`].
    pub change_retention: u64,
    /// sled's page cache size in bytes. Default: sled's default (1 GiB).
    pub cache_capacity_bytes: Option<u64>,
}

/// The sled backend of [`Store`] (see the module docs for layout, group commit and snapshots).
///
/// Cheap to clone; clones share the database. The database closes, after a last flush, when the
/// last clone is dropped.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

/// The shared state behind [`SledStore`]'s clones.
struct Inner {
    path: PathBuf,
    trees: Trees,
    retention: u64,
    group: Arc<GroupCommit>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

/// The database's trees.
#[derive(Clone)]
struct Trees {
    entries: Tree,
    by_parent: Tree,
    by_spiffe_id: Tree,
    by_identity: Tree,
    changes: Tree,
    meta: Tree,
    nodes: Tree,
    join_tokens: Tree,
    bundles: Tree,
    audit: Tree,
    audit_head: Tree,
    audit_checkpoints: Tree,
    sessions: Tree,
    revocations: Tree,
}

/// What writers and the flusher thread share (see "Group commit" in the module docs).
struct GroupCommit {
    queue: Mutex<Queue>,
    wake: Condvar,
    progress: watch::Sender<Progress>,
    durable_revision: watch::Sender<u64>,
    flushes: AtomicU64,
}

/// Flush requests, guarded by [`GroupCommit::queue`].
#[derive(Debug, Default)]
struct Queue {
    /// The last ticket handed to a writer.
    requested: u64,
    /// Set when the store is dropped: the flusher covers what is pending and exits.
    shutdown: bool,
    /// Tests hold the flusher to make group commit observable without timing.
    paused: bool,
}

/// What the flusher has done, published to waiting writers.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every ticket up to this one is durable.
    flushed: u64,
    /// Set once a flush fails; sticky.
    failure: Option<String>,
}

/// The six entry trees, and the session and revocation trees, inside one transaction.
struct EntryTx<'a> {
    entries: &'a TransactionalTree,
    by_parent: &'a TransactionalTree,
    by_spiffe_id: &'a TransactionalTree,
    by_identity: &'a TransactionalTree,
    changes: &'a TransactionalTree,
    meta: &'a TransactionalTree,
    sessions: &'a TransactionalTree,
    revocations: &'a TransactionalTree,
    retention: u64,
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// Collects one page of a listing, noting whether anything is left after it.
struct PageCollector<T> {
    size: usize,
    items: Vec<T>,
    more: bool,
}

// === impl SledStoreOptions ===

impl Default for SledStoreOptions {
    fn default() -> Self {
        Self {
            change_retention: DEFAULT_CHANGE_RETENTION,
            cache_capacity_bytes: None,
        }
    }
}

// === impl SledStore ===

impl SledStore {
    /// Opens (or creates) the database in the directory `path`, prunes the change feed down to
    /// the retention, flushes, and starts the flusher thread.
    pub fn open(path: impl AsRef<Path>, options: SledStoreOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        // No sled background flusher: the group-commit flusher below makes writes durable, and
        // sled's own thread would keep the database (and its lock file) open for up to its
        // interval after the store is dropped.
        let mut config = ::sled::Config::new().path(&path).flush_every_ms(None);
        if let Some(bytes) = options.cache_capacity_bytes {
            config = config.cache_capacity(bytes);
        }
        let db = config.open()?;
        let trees = Trees::open(&db)?;
        let retention = options.change_retention.max(1);
        let revision = read_revision(&trees.meta)?;
        prune_changes(&trees.changes, revision, retention)?;
        // What sled recovered may sit in the page cache only (the last process died before
        // flushing it): make it durable before reporting any of it.
        db.flush()?;

        let group = Arc::new(GroupCommit::new(revision));
        let handle = std::thread::Builder::new()
            .name("sigil-store-flush".to_owned())
            .spawn({
                let group = Arc::clone(&group);
                let meta = trees.meta.clone();
                move || group.run_flusher(&db, &meta)
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                trees,
                retention,
                group,
                flusher: Mutex::new(Some(handle)),
            }),
        })
    }

    /// How many flushes the flusher thread has run (group commit makes it much smaller than the
    /// number of writes under concurrency).
    pub fn flush_count(&self) -> u64 {
        self.inner.group.flushes.load(Ordering::Relaxed)
    }

    /// Runs `f` on the blocking thread pool (sled calls block, and scans can be long).
    /// Replaces the raw bytes of the change at `revision` and returns what was there (tests of
    /// readers that must survive a corrupt record).
    #[cfg(test)]
    pub(crate) fn swap_raw_change(&self, revision: u64, bytes: &[u8]) -> Option<Vec<u8>> {
        self.inner
            .trees
            .changes
            .insert(revision.to_be_bytes(), bytes)
            .ok()
            .flatten()
            .map(|old| old.to_vec())
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner)).await?
    }

    /// Waits until a flush covers every write made so far.
    async fn commit(&self) -> Result<(), StoreError> {
        self.inner.group.commit().await
    }

    fn durable_revision(&self) -> u64 {
        *self.inner.group.durable_revision.borrow()
    }
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.inner.path)
            .field("change_retention", &self.inner.retention)
            .field("durable_revision", &self.durable_revision())
            .finish()
    }
}

#[async_trait]
impl Store for SledStore {
    async fn create_entry(&self, entry: NewEntry) -> Result<RegistrationEntry, StoreError> {
        let mut results = self.create_entries(vec![entry]).await?;
        results.pop().unwrap_or(Err(StoreError::Closed))
    }

    async fn create_entries(
        &self,
        entries: Vec<NewEntry>,
    ) -> Result<Vec<Result<RegistrationEntry, StoreError>>, StoreError> {
        let mut items = Vec::with_capacity(entries.len());
        for entry in entries {
            items.push((EntryId::generate()?, entry));
        }
        let now = SystemTime::now();
        let results = self
            .blocking(move |inner| {
                let mut results = Vec::with_capacity(items.len());
                for chunk in items.chunks(BATCH_CHUNK) {
                    results.extend(inner.create_entries(chunk, now)?);
                }
                Ok(results)
            })
            .await?;
        if results.iter().any(Result::is_ok) {
            self.commit().await?;
        }
        Ok(results)
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>, StoreError> {
        let id = id.clone();
        self.blocking(move |inner| inner.get_entry(&id)).await
    }

    async fn update_entry(
        &self,
        id: &EntryId,
        entry: NewEntry,
    ) -> Result<RegistrationEntry, StoreError> {
        let id = id.clone();
        let updated = self
            .blocking(move |inner| inner.update_entry(&id, &entry))
            .await?;
        self.commit().await?;
        Ok(updated)
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<RegistrationEntry, StoreError> {
        let id = id.clone();
        let deleted = self.blocking(move |inner| inner.delete_entry(&id)).await?;
        self.commit().await?;
        Ok(deleted)
    }

    async fn list_entries(
        &self,
        filter: &EntryFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationEntry>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.blocking(move |inner| inner.list_entries(&filter, &page))
            .await
    }

    async fn count_entries(&self) -> Result<u64, StoreError> {
        self.blocking(|inner| Ok(inner.trees.entries.len() as u64))
            .await
    }

    async fn entries_by_parent(
        &self,
        parent_id: &SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        let parent_id = parent_id.clone();
        self.blocking(move |inner| inner.entries_by_parent(&parent_id))
            .await
    }

    async fn snapshot_entries(&self) -> Result<EntrySnapshot, StoreError> {
        let snapshot = self.blocking(|inner| inner.snapshot_entries()).await?;
        if self.durable_revision() < snapshot.revision {
            // Its changes committed before this ticket, so the flush that serves the ticket
            // covers them and publishes a durable revision at least as high.
            self.commit().await?;
        }
        Ok(snapshot)
    }

    async fn current_revision(&self) -> Result<u64, StoreError> {
        Ok(self.durable_revision())
    }

    async fn changes_since(&self, revision: u64, limit: usize) -> Result<ChangesSince, StoreError> {
        let durable = self.durable_revision();
        if revision > durable {
            return Ok(ChangesSince::Expired);
        }
        if revision == durable {
            return Ok(ChangesSince::Changes(Vec::new()));
        }
        let limit = limit.clamp(1, MAX_CHANGES_PER_CALL);
        let changes = self
            .blocking(move |inner| inner.read_changes(revision, durable, limit))
            .await?;
        match changes.first() {
            Some(first) if first.revision == revision + 1 => Ok(ChangesSince::Changes(changes)),
            _ => Ok(ChangesSince::Expired),
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.group.durable_revision.subscribe()
    }

    async fn create_node(&self, node: AttestedNode) -> Result<AttestedNode, StoreError> {
        let now = SystemTime::now();
        let node = self
            .blocking(move |inner| inner.create_node(node, now))
            .await?;
        self.commit().await?;
        Ok(node)
    }

    async fn get_node(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedNode>, StoreError> {
        let key = spiffe_id.as_str().as_bytes().to_vec();
        self.blocking(move |inner| {
            inner
                .trees
                .nodes
                .get(key)?
                .map(|bytes| decode("node", &bytes))
                .transpose()
        })
        .await
    }

    async fn update_node(&self, node: AttestedNode) -> Result<AttestedNode, StoreError> {
        let now = SystemTime::now();
        let node = self
            .blocking(move |inner| inner.update_node(&node, now))
            .await?;
        self.commit().await?;
        Ok(node)
    }

    async fn delete_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode, StoreError> {
        let key = spiffe_id.as_str().to_owned();
        let node = self
            .blocking(
                move |inner| match inner.trees.nodes.remove(key.as_bytes())? {
                    Some(bytes) => decode("node", &bytes),
                    None => Err(StoreError::NotFound {
                        resource: "node",
                        key,
                    }),
                },
            )
            .await?;
        self.commit().await?;
        Ok(node)
    }

    async fn list_nodes(&self, page: &PageRequest) -> Result<Page<AttestedNode>, StoreError> {
        let page = page.clone();
        self.blocking(move |inner| inner.list_nodes(&page)).await
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<(), StoreError> {
        self.blocking(move |inner| {
            let value = encode("join token", &token)?;
            let key = token.token.as_bytes();
            match inner
                .trees
                .join_tokens
                .compare_and_swap(key, None::<&[u8]>, Some(value))?
            {
                Ok(()) => Ok(()),
                Err(_) => Err(StoreError::AlreadyExists {
                    resource: "join token",
                    key: "<redacted>".to_owned(),
                }),
            }
        })
        .await?;
        self.commit().await
    }

    async fn consume_join_token(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<JoinToken, StoreError> {
        let key = token.as_bytes().to_vec();
        // sled's `remove` is atomic and returns the old value: exactly one caller gets it.
        let removed = self
            .blocking(move |inner| Ok(inner.trees.join_tokens.remove(key)?))
            .await?;
        let Some(bytes) = removed else {
            return Err(StoreError::TokenNotFound);
        };
        self.commit().await?;
        let token: JoinToken = decode("join token", &bytes)?;
        if token.expires_at <= now {
            return Err(StoreError::TokenExpired);
        }
        Ok(token)
    }

    async fn prune_join_tokens(&self, now: SystemTime) -> Result<u64, StoreError> {
        let pruned = self
            .blocking(move |inner| inner.prune_join_tokens(now))
            .await?;
        if pruned > 0 {
            self.commit().await?;
        }
        Ok(pruned)
    }

    async fn set_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
        bundle: Vec<u8>,
    ) -> Result<FederatedBundle, StoreError> {
        let record = FederatedBundle {
            trust_domain: trust_domain.clone(),
            bundle,
            updated_at: SystemTime::now(),
        };
        let record = self
            .blocking(move |inner| {
                let value = encode("federated bundle", &record)?;
                inner
                    .trees
                    .bundles
                    .insert(record.trust_domain.name().as_bytes(), value)?;
                Ok(record)
            })
            .await?;
        self.commit().await?;
        Ok(record)
    }

    async fn get_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederatedBundle>, StoreError> {
        let key = trust_domain.name().as_bytes().to_vec();
        self.blocking(move |inner| {
            inner
                .trees
                .bundles
                .get(key)?
                .map(|bytes| decode("federated bundle", &bytes))
                .transpose()
        })
        .await
    }

    async fn delete_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederatedBundle, StoreError> {
        let key = trust_domain.name().to_owned();
        let record = self
            .blocking(
                move |inner| match inner.trees.bundles.remove(key.as_bytes())? {
                    Some(bytes) => decode("federated bundle", &bytes),
                    None => Err(StoreError::NotFound {
                        resource: "federated bundle",
                        key,
                    }),
                },
            )
            .await?;
        self.commit().await?;
        Ok(record)
    }

    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>, StoreError> {
        self.blocking(|inner| {
            inner
                .trees
                .bundles
                .iter()
                .map(|item| decode("federated bundle", &item?.1))
                .collect()
        })
        .await
    }

    async fn load_ca_journal(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.blocking(|inner| Ok(inner.trees.meta.get(CA_JOURNAL_KEY)?.map(|v| v.to_vec())))
            .await
    }

    async fn save_ca_journal(&self, journal: Vec<u8>) -> Result<(), StoreError> {
        self.blocking(move |inner| {
            inner.trees.meta.insert(CA_JOURNAL_KEY, journal)?;
            Ok(())
        })
        .await?;
        self.commit().await
    }

    async fn append_audit(
        &self,
        records: Vec<NewAuditRecord>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let sealed = self
            .blocking(move |inner| {
                let mut sealed = Vec::with_capacity(records.len());
                for chunk in records.chunks(AUDIT_CHUNK) {
                    sealed.extend(inner.append_audit(chunk)?);
                }
                Ok(sealed)
            })
            .await?;
        self.commit().await?;
        Ok(sealed)
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditRecord>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.blocking(move |inner| inner.list_audit(&filter, &page))
            .await
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        self.blocking(|inner| {
            inner
                .trees
                .audit_head
                .get(AUDIT_HEAD_KEY)?
                .map(|bytes| decode("audit head", &bytes))
                .transpose()
        })
        .await
    }

    async fn save_audit_checkpoint(&self, checkpoint: AuditCheckpoint) -> Result<(), StoreError> {
        self.blocking(move |inner| {
            let value = encode("audit checkpoint", &checkpoint)?;
            inner
                .trees
                .audit_checkpoints
                .insert(checkpoint.sequence.to_be_bytes(), value)?;
            Ok(())
        })
        .await?;
        self.commit().await
    }

    async fn latest_audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>, StoreError> {
        self.blocking(|inner| {
            inner
                .trees
                .audit_checkpoints
                .last()?
                .map(|(_, bytes)| decode("audit checkpoint", &bytes))
                .transpose()
        })
        .await
    }

    async fn create_session(
        &self,
        session: Session,
        entry: Option<NewEntry>,
    ) -> Result<Session, StoreError> {
        let entry = match entry {
            Some(entry) => Some((EntryId::generate()?, entry)),
            None => None,
        };
        let now = SystemTime::now();
        let created = self
            .blocking(move |inner| inner.create_session(&session, entry.as_ref(), now))
            .await?;
        self.commit().await?;
        Ok(created)
    }

    async fn update_session(&self, update: SessionUpdate) -> Result<Session, StoreError> {
        let entry_id = match &update.entry {
            SessionEntryOp::Create(_) => Some(EntryId::generate()?),
            _ => None,
        };
        let now = SystemTime::now();
        let updated = self
            .blocking(move |inner| inner.update_session(&update, entry_id.as_ref(), now))
            .await?;
        self.commit().await?;
        Ok(updated)
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let id = id.clone();
        self.blocking(move |inner| {
            inner
                .trees
                .sessions
                .get(id.as_str())?
                .map(|bytes| decode("session", &bytes))
                .transpose()
        })
        .await
    }

    async fn list_sessions(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> Result<Page<Session>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.blocking(move |inner| inner.list_sessions(&filter, &page))
            .await
    }

    async fn add_session_serial(
        &self,
        id: &SessionId,
        serial: SessionSerial,
    ) -> Result<Session, StoreError> {
        let id = id.clone();
        let updated = self
            .blocking(move |inner| inner.add_session_serial(&id, &serial))
            .await?;
        self.commit().await?;
        Ok(updated)
    }

    async fn add_revocations(&self, revocations: Vec<Revocation>) -> Result<(), StoreError> {
        if revocations.is_empty() {
            return Ok(());
        }
        self.blocking(move |inner| {
            let mut batch = ::sled::Batch::default();
            for revocation in &revocations {
                batch.insert(
                    revocation.serial.as_bytes(),
                    encode("revocation", revocation)?,
                );
            }
            inner.trees.revocations.apply_batch(batch)?;
            Ok(())
        })
        .await?;
        self.commit().await
    }

    async fn list_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.blocking(move |inner| {
            inner
                .trees
                .revocations
                .iter()
                .map(|item| decode("revocation", &item?.1))
                .collect()
        })
        .await
    }

    async fn prune_revocations(&self, now: SystemTime) -> Result<u64, StoreError> {
        let pruned = self
            .blocking(move |inner| {
                let mut pruned = 0;
                for item in inner.trees.revocations.iter() {
                    let (key, value) = item?;
                    let revocation: Revocation = decode("revocation", &value)?;
                    if revocation.not_after <= now
                        && inner
                            .trees
                            .revocations
                            .compare_and_swap(&key, Some(&value), None::<IVec>)?
                            .is_ok()
                    {
                        pruned += 1;
                    }
                }
                Ok(pruned)
            })
            .await?;
        if pruned > 0 {
            self.commit().await?;
        }
        Ok(pruned)
    }
}

// --- privileged sessions ---

impl Inner {
    fn create_session(
        &self,
        session: &Session,
        entry: Option<&(EntryId, NewEntry)>,
        now: SystemTime,
    ) -> Result<Session, StoreError> {
        self.entry_tx(|tx| {
            if tx.sessions.get(session.id.as_str())?.is_some() {
                return Err(ConflictableTransactionError::Abort(
                    StoreError::AlreadyExists {
                        resource: "session",
                        key: session.id.to_string(),
                    },
                ));
            }
            let mut session = session.clone();
            if let Some((id, new)) = entry {
                let created = tx.create_entry(id, new, now)?;
                session.entry_id = Some(created.id);
            }
            tx.put_session(&session)?;
            Ok(session)
        })
    }

    fn update_session(
        &self,
        update: &SessionUpdate,
        entry_id: Option<&EntryId>,
        now: SystemTime,
    ) -> Result<Session, StoreError> {
        self.entry_tx(|tx| {
            let id = &update.session.id;
            let Some(bytes) = tx.sessions.get(id.as_str())? else {
                return Err(ConflictableTransactionError::Abort(StoreError::NotFound {
                    resource: "session",
                    key: id.to_string(),
                }));
            };
            let old: Session =
                decode("session", &bytes).map_err(ConflictableTransactionError::Abort)?;
            if old.state != update.expected {
                return Err(ConflictableTransactionError::Abort(
                    StoreError::StateChanged {
                        resource: "session",
                        key: id.to_string(),
                    },
                ));
            }
            let mut session = update.session.clone();
            // Serials recorded meanwhile are kept.
            session.serials = old.serials.clone();
            match &update.entry {
                SessionEntryOp::Keep => {}
                SessionEntryOp::Create(new) => {
                    if let Some(entry_id) = entry_id {
                        let created = tx.create_entry(entry_id, new, now)?;
                        session.entry_id = Some(created.id);
                    }
                }
                SessionEntryOp::Delete => {
                    if let Some(entry_id) = &old.entry_id
                        && let Some(entry) = tx.get(entry_id)?
                    {
                        let revision = tx.next_revision()?;
                        tx.entries.remove(entry_id.as_str())?;
                        tx.unindex(&entry)?;
                        tx.record(Change {
                            revision,
                            kind: ChangeKind::EntryDeleted(entry),
                        })?;
                    }
                }
            }
            for revocation in &update.revocations {
                let value = encode("revocation", revocation)
                    .map_err(ConflictableTransactionError::Abort)?;
                tx.revocations.insert(revocation.serial.as_bytes(), value)?;
            }
            tx.put_session(&session)?;
            Ok(session)
        })
    }

    fn add_session_serial(
        &self,
        id: &SessionId,
        serial: &SessionSerial,
    ) -> Result<Session, StoreError> {
        self.trees
            .sessions
            .transaction(|tx| {
                let Some(bytes) = tx.get(id.as_str())? else {
                    return Err(ConflictableTransactionError::Abort(StoreError::NotFound {
                        resource: "session",
                        key: id.to_string(),
                    }));
                };
                let mut session: Session =
                    decode("session", &bytes).map_err(ConflictableTransactionError::Abort)?;
                session.serials.push(serial.clone());
                let value =
                    encode("session", &session).map_err(ConflictableTransactionError::Abort)?;
                tx.insert(id.as_str(), value)?;
                Ok(session)
            })
            .map_err(|error| match error {
                TransactionError::Abort(error) => error,
                TransactionError::Storage(error) => StoreError::Backend(error),
            })
    }

    fn list_sessions(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> Result<Page<Session>, StoreError> {
        let start = page_start(page.token.as_deref(), |s| SessionId::parse(s).is_ok())?;
        let mut page = PageCollector::new(page.effective_size());
        for item in self
            .trees
            .sessions
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
        {
            let session: Session = decode("session", &item?.1)?;
            if filter.matches(&session) && !page.offer(session) {
                break;
            }
        }
        Ok(page.finish(|session: &Session| session.id.as_str().as_bytes().to_vec()))
    }
}

// === impl Inner ===

impl Inner {
    /// Runs `f` in one transaction over the entry trees.
    fn entry_tx<T>(&self, f: impl Fn(&EntryTx<'_>) -> TxResult<T>) -> Result<T, StoreError> {
        let t = &self.trees;
        (
            &t.entries,
            &t.by_parent,
            &t.by_spiffe_id,
            &t.by_identity,
            &t.changes,
            &t.meta,
            &t.sessions,
            &t.revocations,
        )
            .transaction(
                |(
                    entries,
                    by_parent,
                    by_spiffe_id,
                    by_identity,
                    changes,
                    meta,
                    sessions,
                    revocations,
                )| {
                    f(&EntryTx {
                        entries,
                        by_parent,
                        by_spiffe_id,
                        by_identity,
                        changes,
                        meta,
                        sessions,
                        revocations,
                        retention: self.retention,
                    })
                },
            )
            .map_err(|error| match error {
                TransactionError::Abort(error) => error,
                TransactionError::Storage(error) => StoreError::Backend(error),
            })
    }

    fn create_entries(
        &self,
        items: &[(EntryId, NewEntry)],
        now: SystemTime,
    ) -> Result<Vec<Result<RegistrationEntry, StoreError>>, StoreError> {
        self.entry_tx(|tx| {
            let mut results = Vec::with_capacity(items.len());
            for (id, new) in items {
                let identity = new.identity_key();
                if let Some(existing) = tx.duplicate_of(&identity, id)? {
                    results.push(Err(existing));
                    continue;
                }
                let revision = tx.next_revision()?;
                let entry = RegistrationEntry::from_new(id.clone(), new.clone(), now, revision);
                tx.put(&entry, &identity)?;
                tx.record(Change {
                    revision,
                    kind: ChangeKind::EntryUpserted(entry.clone()),
                })?;
                results.push(Ok(entry));
            }
            Ok(results)
        })
    }

    fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>, StoreError> {
        self.trees
            .entries
            .get(id.as_str())?
            .map(|bytes| decode("entry", &bytes))
            .transpose()
    }

    fn update_entry(&self, id: &EntryId, new: &NewEntry) -> Result<RegistrationEntry, StoreError> {
        self.entry_tx(|tx| {
            let old = tx.get(id)?.ok_or_else(|| entry_not_found(id))?;
            let identity = new.identity_key();
            if let Some(existing) = tx.duplicate_of(&identity, id)? {
                return Err(ConflictableTransactionError::Abort(existing));
            }
            let revision = tx.next_revision()?;
            let entry =
                RegistrationEntry::from_new(id.clone(), new.clone(), old.created_at, revision);
            tx.unindex(&old)?;
            tx.put(&entry, &identity)?;
            tx.record(Change {
                revision,
                kind: ChangeKind::EntryUpserted(entry.clone()),
            })?;
            Ok(entry)
        })
    }

    fn delete_entry(&self, id: &EntryId) -> Result<RegistrationEntry, StoreError> {
        self.entry_tx(|tx| {
            let old = tx.get(id)?.ok_or_else(|| entry_not_found(id))?;
            let revision = tx.next_revision()?;
            tx.entries.remove(id.as_str())?;
            tx.unindex(&old)?;
            tx.record(Change {
                revision,
                kind: ChangeKind::EntryDeleted(old.clone()),
            })?;
            Ok(old)
        })
    }

    fn list_entries(
        &self,
        filter: &EntryFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationEntry>, StoreError> {
        let after = page
            .token
            .as_deref()
            .map(|token| {
                let key = decode_page_token(token)?;
                std::str::from_utf8(&key)
                    .ok()
                    .and_then(|s| EntryId::parse(s).ok())
                    .ok_or(StoreError::InvalidPageToken)
            })
            .transpose()?;
        let mut page = PageCollector::new(page.effective_size());
        let index = match (&filter.parent_id, &filter.spiffe_id) {
            (Some(parent_id), _) => Some((&self.trees.by_parent, parent_id)),
            (None, Some(spiffe_id)) => Some((&self.trees.by_spiffe_id, spiffe_id)),
            (None, None) => None,
        };
        if let Some((tree, indexed)) = index {
            let prefix = index_prefix(indexed);
            let start = match &after {
                Some(after) => Bound::Excluded(index_key(indexed, after)),
                None => Bound::Included(prefix.clone()),
            };
            for item in tree.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
                let (key, _) = item?;
                let Some(id) = key.strip_prefix(prefix.as_slice()) else {
                    break;
                };
                // An index key whose entry is gone was deleted during the listing.
                let Some(bytes) = self.trees.entries.get(id)? else {
                    continue;
                };
                let entry: RegistrationEntry = decode("entry", &bytes)?;
                if filter.matches(&entry) && !page.offer(entry) {
                    break;
                }
            }
        } else {
            let start = match &after {
                Some(after) => Bound::Excluded(after.as_str().as_bytes().to_vec()),
                None => Bound::Unbounded,
            };
            for item in self
                .trees
                .entries
                .range::<Vec<u8>, _>((start, Bound::Unbounded))
            {
                let entry: RegistrationEntry = decode("entry", &item?.1)?;
                if filter.matches(&entry) && !page.offer(entry) {
                    break;
                }
            }
        }
        Ok(page.finish(|entry| entry.id.as_str().as_bytes().to_vec()))
    }

    fn entries_by_parent(
        &self,
        parent_id: &SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        let prefix = index_prefix(parent_id);
        let mut entries = Vec::new();
        for item in self.trees.by_parent.scan_prefix(&prefix) {
            let (key, _) = item?;
            let id = key.get(prefix.len()..).unwrap_or_default();
            if let Some(bytes) = self.trees.entries.get(id)? {
                let entry: RegistrationEntry = decode("entry", &bytes)?;
                // The index and the entry are read separately: skip an entry re-parented since.
                if entry.parent_id == *parent_id {
                    entries.push(entry);
                }
            }
        }
        Ok(entries)
    }

    /// See "Consistent snapshots" in the module docs.
    fn snapshot_entries(&self) -> Result<EntrySnapshot, StoreError> {
        for _ in 0..SNAPSHOT_ATTEMPTS {
            let start = read_revision(&self.trees.meta)?;
            let mut entries = BTreeMap::new();
            for item in self.trees.entries.iter() {
                let entry: RegistrationEntry = decode("entry", &item?.1)?;
                entries.insert(entry.id.clone(), entry);
            }
            let end = read_revision(&self.trees.meta)?;
            let span = end - start;
            let changes = self.read_changes(start, end, usize::MAX)?;
            let complete = changes.len() as u64 == span
                && changes.first().is_none_or(|c| c.revision == start + 1);
            if !complete {
                continue;
            }
            for change in changes {
                match change.kind {
                    ChangeKind::EntryUpserted(entry) => {
                        entries.insert(entry.id.clone(), entry);
                    }
                    ChangeKind::EntryDeleted(entry) => {
                        entries.remove(&entry.id);
                    }
                }
            }
            return Ok(EntrySnapshot {
                revision: end,
                entries: entries.into_values().collect(),
            });
        }
        Err(StoreError::SnapshotUnavailable)
    }

    /// Up to `limit` retained changes in `after+1 ..= through`, oldest first.
    fn read_changes(
        &self,
        after: u64,
        through: u64,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        if through <= after {
            return Ok(Vec::new());
        }
        let range = (after + 1).to_be_bytes()..=through.to_be_bytes();
        self.trees
            .changes
            .range(range)
            .take(limit)
            .map(|item| decode("change", &item?.1))
            .collect()
    }

    fn create_node(
        &self,
        mut node: AttestedNode,
        now: SystemTime,
    ) -> Result<AttestedNode, StoreError> {
        node.created_at = now;
        node.updated_at = now;
        let value = encode("node", &node)?;
        let key = node.spiffe_id.as_str().as_bytes();
        match self
            .trees
            .nodes
            .compare_and_swap(key, None::<&[u8]>, Some(value))?
        {
            Ok(()) => Ok(node),
            Err(_) => Err(StoreError::AlreadyExists {
                resource: "node",
                key: node.spiffe_id.to_string(),
            }),
        }
    }

    fn update_node(
        &self,
        node: &AttestedNode,
        now: SystemTime,
    ) -> Result<AttestedNode, StoreError> {
        let key = node.spiffe_id.as_str().as_bytes();
        self.trees
            .nodes
            .transaction(|tx| {
                let Some(old) = tx.get(key)? else {
                    return Err(ConflictableTransactionError::Abort(StoreError::NotFound {
                        resource: "node",
                        key: node.spiffe_id.to_string(),
                    }));
                };
                let old: AttestedNode =
                    decode("node", &old).map_err(ConflictableTransactionError::Abort)?;
                let mut node = node.clone();
                node.created_at = old.created_at;
                node.updated_at = now;
                let value = encode("node", &node).map_err(ConflictableTransactionError::Abort)?;
                tx.insert(key, value)?;
                Ok(node)
            })
            .map_err(|error| match error {
                TransactionError::Abort(error) => error,
                TransactionError::Storage(error) => StoreError::Backend(error),
            })
    }

    fn list_nodes(&self, page: &PageRequest) -> Result<Page<AttestedNode>, StoreError> {
        let start = page_start(page.token.as_deref(), |s| SpiffeId::new(s).is_ok())?;
        let mut page = PageCollector::new(page.effective_size());
        for item in self
            .trees
            .nodes
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
        {
            if !page.offer(decode("node", &item?.1)?) {
                break;
            }
        }
        Ok(page.finish(|node: &AttestedNode| node.spiffe_id.as_str().as_bytes().to_vec()))
    }

    fn prune_join_tokens(&self, now: SystemTime) -> Result<u64, StoreError> {
        let mut pruned = 0;
        for item in self.trees.join_tokens.iter() {
            let (key, value) = item?;
            let token: JoinToken = decode("join token", &value)?;
            // Remove only this exact value: a concurrent consumer may have taken it already.
            if token.expires_at <= now
                && self
                    .trees
                    .join_tokens
                    .compare_and_swap(&key, Some(&value), None::<IVec>)?
                    .is_ok()
            {
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}

// --- audit log ---

impl Inner {
    /// Seals and inserts `chunk` after the chain head, in one transaction (see the module docs).
    fn append_audit(&self, chunk: &[NewAuditRecord]) -> Result<Vec<AuditRecord>, StoreError> {
        let now = SystemTime::now();
        (&self.trees.audit, &self.trees.audit_head)
            .transaction(|(audit, head_tree)| {
                let abort = ConflictableTransactionError::Abort;
                let head: Option<AuditHead> = match head_tree.get(AUDIT_HEAD_KEY)? {
                    Some(bytes) => Some(decode("audit head", &bytes).map_err(abort)?),
                    None => None,
                };
                let (mut sequence, mut prev_hash, prev_time) = head
                    .map_or((0, GENESIS_HASH, SystemTime::UNIX_EPOCH), |h| {
                        (h.sequence, h.hash, h.time)
                    });
                // Times never decrease along the chain, even if the clock steps back.
                let time = now.max(prev_time);
                let mut sealed = Vec::with_capacity(chunk.len());
                for new in chunk {
                    sequence = sequence.checked_add(1).ok_or_else(|| {
                        abort(StoreError::Corrupt {
                            what: "audit head",
                            reason: "sequence exhausted".to_owned(),
                        })
                    })?;
                    let record = new.clone().seal(sequence, time, prev_hash).map_err(|e| {
                        abort(StoreError::Encode {
                            what: "audit record",
                            reason: e.to_string(),
                        })
                    })?;
                    let value = encode("audit record", &record).map_err(abort)?;
                    audit.insert(&sequence.to_be_bytes()[..], value)?;
                    prev_hash = record.hash;
                    sealed.push(record);
                }
                if let Some(last) = sealed.last() {
                    let value = encode("audit head", &last.head()).map_err(abort)?;
                    head_tree.insert(AUDIT_HEAD_KEY, value)?;
                }
                Ok(sealed)
            })
            .map_err(|error| match error {
                TransactionError::Abort(error) => error,
                TransactionError::Storage(error) => StoreError::Backend(error),
            })
    }

    fn list_audit(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditRecord>, StoreError> {
        let mut start = filter.from_sequence.unwrap_or(1).max(1);
        if let Some(token) = page.token.as_deref() {
            let key = decode_page_token(token)?;
            let after = <[u8; 8]>::try_from(key.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::InvalidPageToken)?;
            start = start.max(after.saturating_add(1));
        }
        if let Some(since) = filter.since {
            start = start.max(self.first_audit_at(since)?);
        }
        let mut page = PageCollector::new(page.effective_size());
        for item in self.trees.audit.range(start.to_be_bytes()..) {
            let (key, value) = item?;
            let record = decode_audit(&key, &value)?;
            if filter.matches(&record) && !page.offer(record) {
                break;
            }
        }
        Ok(page.finish(|record| record.sequence.to_be_bytes().to_vec()))
    }

    /// The first sequence whose record's time is at or after `since` (binary search: times
    /// never decrease along the chain).
    fn first_audit_at(&self, since: SystemTime) -> Result<u64, StoreError> {
        let Some((last, _)) = self.trees.audit.last()? else {
            return Ok(1);
        };
        let (mut low, mut high) = (1u64, audit_sequence(&last)?.saturating_add(1));
        while low < high {
            let mid = low + (high - low) / 2;
            match self.trees.audit.range(mid.to_be_bytes()..).next() {
                None => high = mid,
                Some(item) => {
                    let (key, value) = item?;
                    let record = decode_audit(&key, &value)?;
                    if record.time < since {
                        low = record.sequence.saturating_add(1).max(mid + 1);
                    } else {
                        high = mid;
                    }
                }
            }
        }
        Ok(low)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.group.shut_down();
        let handle = lock(&self.flusher).take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("store flusher thread panicked");
        }
    }
}

// === impl Trees ===

impl Trees {
    fn open(db: &Db) -> Result<Self, StoreError> {
        Ok(Self {
            entries: db.open_tree("entries")?,
            by_parent: db.open_tree("entries_by_parent")?,
            by_spiffe_id: db.open_tree("entries_by_spiffe_id")?,
            by_identity: db.open_tree("entries_by_identity")?,
            changes: db.open_tree("changes")?,
            meta: db.open_tree("meta")?,
            nodes: db.open_tree("nodes")?,
            join_tokens: db.open_tree("join_tokens")?,
            bundles: db.open_tree("federated_bundles")?,
            audit: db.open_tree("audit")?,
            audit_head: db.open_tree("audit_head")?,
            audit_checkpoints: db.open_tree("audit_checkpoints")?,
            sessions: db.open_tree("sessions")?,
            revocations: db.open_tree("revocations")?,
        })
    }
}

// === impl GroupCommit ===

impl GroupCommit {
    fn new(revision: u64) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            progress: watch::Sender::new(Progress::default()),
            durable_revision: watch::Sender::new(revision),
            flushes: AtomicU64::new(0),
        }
    }

    /// Takes a ticket and waits until a flush covers it. Call it after the write is done.
    async fn commit(&self) -> Result<(), StoreError> {
        let ticket = {
            let mut queue = lock(&self.queue);
            queue.requested += 1;
            queue.requested
        };
        self.wake.notify_one();
        let mut progress = self.progress.subscribe();
        let (flushed, failure) = {
            let seen = progress
                .wait_for(|p| p.flushed >= ticket || p.failure.is_some())
                .await
                .map_err(|_| StoreError::Closed)?;
            (seen.flushed, seen.failure.clone())
        };
        if flushed >= ticket {
            Ok(())
        } else {
            Err(StoreError::FlushFailed(failure.unwrap_or_default()))
        }
    }

    /// The flusher thread's loop (see "Group commit" in the module docs).
    fn run_flusher(&self, db: &Db, meta: &Tree) {
        let mut flushed = 0;
        loop {
            let target = {
                let mut queue = lock(&self.queue);
                loop {
                    if queue.requested > flushed && (!queue.paused || queue.shutdown) {
                        break queue.requested;
                    }
                    if queue.shutdown {
                        return;
                    }
                    queue = self
                        .wake
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            // Read before flushing: every transaction up to this revision has committed, so
            // the flush covers it.
            let result = read_revision(meta).and_then(|revision| {
                db.flush()?;
                Ok(revision)
            });
            self.flushes.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(revision) => {
                    // The revision first: a writer that wakes must see its own revision.
                    self.durable_revision.send_if_modified(|durable| {
                        let newer = revision > *durable;
                        if newer {
                            *durable = revision;
                        }
                        newer
                    });
                    self.progress.send_modify(|p| p.flushed = target);
                    flushed = target;
                }
                Err(error) => {
                    tracing::error!(%error, "store flush failed; refusing every later write");
                    self.progress
                        .send_modify(|p| p.failure = Some(error.to_string()));
                    return;
                }
            }
        }
    }

    fn shut_down(&self) {
        lock(&self.queue).shutdown = true;
        self.wake.notify_all();
    }

    #[cfg(test)]
    fn set_paused(&self, paused: bool) {
        lock(&self.queue).paused = paused;
        self.wake.notify_all();
    }

    #[cfg(test)]
    fn requested(&self) -> u64 {
        lock(&self.queue).requested
    }
}

// === impl EntryTx ===

impl EntryTx<'_> {
    /// Creates one entry with the next revision; a duplicate aborts the transaction.
    fn create_entry(
        &self,
        id: &EntryId,
        new: &NewEntry,
        now: SystemTime,
    ) -> TxResult<RegistrationEntry> {
        let identity = new.identity_key();
        if let Some(existing) = self.duplicate_of(&identity, id)? {
            return Err(ConflictableTransactionError::Abort(existing));
        }
        let revision = self.next_revision()?;
        let entry = RegistrationEntry::from_new(id.clone(), new.clone(), now, revision);
        self.put(&entry, &identity)?;
        self.record(Change {
            revision,
            kind: ChangeKind::EntryUpserted(entry.clone()),
        })?;
        Ok(entry)
    }

    fn put_session(&self, session: &Session) -> TxResult<()> {
        let value = encode("session", session).map_err(ConflictableTransactionError::Abort)?;
        self.sessions.insert(session.id.as_str(), value)?;
        Ok(())
    }

    fn next_revision(&self) -> TxResult<u64> {
        let current = match self.meta.get(REVISION_KEY)? {
            Some(bytes) => decode_u64(&bytes).map_err(ConflictableTransactionError::Abort)?,
            None => 0,
        };
        let next = current.checked_add(1).ok_or_else(|| {
            ConflictableTransactionError::Abort(StoreError::Corrupt {
                what: "revision",
                reason: "counter exhausted".to_owned(),
            })
        })?;
        self.meta.insert(REVISION_KEY, &next.to_be_bytes()[..])?;
        Ok(next)
    }

    /// Writes the change and drops the one that leaves the retention window.
    fn record(&self, change: Change) -> TxResult<()> {
        let value = encode("change", &change).map_err(ConflictableTransactionError::Abort)?;
        self.changes
            .insert(&change.revision.to_be_bytes()[..], value)?;
        if let Some(expired) = change.revision.checked_sub(self.retention) {
            self.changes.remove(&expired.to_be_bytes()[..])?;
        }
        Ok(())
    }

    fn get(&self, id: &EntryId) -> TxResult<Option<RegistrationEntry>> {
        match self.entries.get(id.as_str())? {
            Some(bytes) => decode("entry", &bytes)
                .map(Some)
                .map_err(ConflictableTransactionError::Abort),
            None => Ok(None),
        }
    }

    /// The [`StoreError::AlreadyExists`] to return when another entry than `id` has this
    /// identity.
    fn duplicate_of(&self, identity: &[u8; 32], id: &EntryId) -> TxResult<Option<StoreError>> {
        Ok(match self.by_identity.get(identity)? {
            Some(existing) if existing.as_ref() != id.as_str().as_bytes() => {
                Some(StoreError::AlreadyExists {
                    resource: "entry",
                    key: String::from_utf8_lossy(&existing).into_owned(),
                })
            }
            _ => None,
        })
    }

    fn put(&self, entry: &RegistrationEntry, identity: &[u8; 32]) -> TxResult<()> {
        let value = encode("entry", entry).map_err(ConflictableTransactionError::Abort)?;
        let id = entry.id.as_str();
        self.entries.insert(id, value)?;
        self.by_parent
            .insert(index_key(&entry.parent_id, &entry.id), Vec::new())?;
        self.by_spiffe_id
            .insert(index_key(&entry.spiffe_id, &entry.id), Vec::new())?;
        self.by_identity.insert(&identity[..], id)?;
        Ok(())
    }

    fn unindex(&self, entry: &RegistrationEntry) -> TxResult<()> {
        self.by_parent
            .remove(index_key(&entry.parent_id, &entry.id))?;
        self.by_spiffe_id
            .remove(index_key(&entry.spiffe_id, &entry.id))?;
        self.by_identity
            .remove(&entry.to_new().identity_key()[..])?;
        Ok(())
    }
}

// === impl PageCollector ===

impl<T> PageCollector<T> {
    fn new(size: usize) -> Self {
        Self {
            size,
            items: Vec::new(),
            more: false,
        }
    }

    /// Adds `item` if the page has room; false (stop) once an item is found past a full page.
    fn offer(&mut self, item: T) -> bool {
        if self.items.len() == self.size {
            self.more = true;
            return false;
        }
        self.items.push(item);
        true
    }

    fn finish(self, key: impl Fn(&T) -> Vec<u8>) -> Page<T> {
        let next_page_token = if self.more {
            self.items.last().map(|item| hex_encode(&key(item)))
        } else {
            None
        };
        Page {
            items: self.items,
            next_page_token,
        }
    }
}

// === helpers ===

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state stays consistent even if a holder panicked (plain counters and flags).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|error| StoreError::Encode {
        what,
        reason: error.to_string(),
    })
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt {
        what,
        reason: error.to_string(),
    })
}

fn audit_sequence(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: "audit",
            reason: format!("key of {} bytes", key.len()),
        })
}

/// Decodes an audit record, naming its sequence when it cannot be decoded.
fn decode_audit(key: &[u8], value: &[u8]) -> Result<AuditRecord, StoreError> {
    serde_json::from_slice(value).map_err(|error| StoreError::Corrupt {
        what: "audit",
        reason: match audit_sequence(key) {
            Ok(sequence) => format!("record {sequence}: {error}"),
            Err(_) => error.to_string(),
        },
    })
}

fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        what: "revision",
        reason: format!("expected 8 bytes, found {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(array))
}

fn read_revision(meta: &Tree) -> Result<u64, StoreError> {
    match meta.get(REVISION_KEY)? {
        Some(bytes) => decode_u64(&bytes),
        None => Ok(0),
    }
}

/// Removes every change older than the retention window (after a restart with a smaller one).
fn prune_changes(changes: &Tree, revision: u64, retention: u64) -> Result<(), StoreError> {
    let Some(oldest_kept) = revision.checked_sub(retention).map(|r| r + 1) else {
        return Ok(());
    };
    let mut pruned = 0u64;
    for item in changes.range(..oldest_kept.to_be_bytes()) {
        let (key, _) = item?;
        changes.remove(key)?;
        pruned += 1;
    }
    if pruned > 0 {
        tracing::info!(
            pruned,
            oldest_kept,
            "pruned the change feed to its retention"
        );
    }
    Ok(())
}

fn entry_not_found(id: &EntryId) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(StoreError::NotFound {
        resource: "entry",
        key: id.to_string(),
    })
}

/// `ID 0x00`: the prefix of every index key under `id`.
fn index_prefix(id: &SpiffeId) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.as_str().len() + 1);
    key.extend_from_slice(id.as_str().as_bytes());
    key.push(0);
    key
}

/// `ID 0x00 ENTRY_ID`.
fn index_key(id: &SpiffeId, entry: &EntryId) -> Vec<u8> {
    let mut key = index_prefix(id);
    key.extend_from_slice(entry.as_str().as_bytes());
    key
}

/// Where a listing keyed by strings resumes: after the key in `token`, which must be one that
/// `is_key` accepts (a token this store issued); from the start without a token.
fn page_start(
    token: Option<&str>,
    is_key: impl Fn(&str) -> bool,
) -> Result<Bound<Vec<u8>>, StoreError> {
    let Some(token) = token else {
        return Ok(Bound::Unbounded);
    };
    let key = decode_page_token(token)?;
    if std::str::from_utf8(&key).is_ok_and(is_key) {
        Ok(Bound::Excluded(key))
    } else {
        Err(StoreError::InvalidPageToken)
    }
}

fn decode_page_token(token: &str) -> Result<Vec<u8>, StoreError> {
    hex_decode(token)
        .filter(|key| !key.is_empty())
        .ok_or(StoreError::InvalidPageToken)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use sigil_core::{Selector, SelectorSet};

    use super::*;
    use crate::store::conformance::{self, TestConfig};

    /// Set (to a store directory) in the child process of the crash test.
    const CRASH_CHILD_ENV: &str = "SIGIL_STORE_CRASH_CHILD_DIR";
    /// The test the crash test runs as its child.
    const CRASH_CHILD_TEST: &str = "store::sled::tests::crash_child_writes_until_killed";
    /// Acknowledged writes the crash test waits for before it kills the child.
    const ACKS_BEFORE_KILL: usize = 300;

    fn open(dir: &Path) -> SledStore {
        open_with(dir, SledStoreOptions::default())
    }

    /// Opens the store, waiting (up to 5 s) for a store of the same directory that this
    /// process just dropped to let go of sled's lock file: sled's own I/O threads may hold the
    /// database for a moment after the last handle is gone.
    fn open_with(dir: &Path, options: SledStoreOptions) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match SledStore::open(dir, options.clone()) {
                Ok(store) => return store,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("cannot open the store: {e}"),
            }
        }
    }

    fn entry(name: &str) -> NewEntry {
        let id = |s: &str| SpiffeId::new(s).unwrap();
        NewEntry::new(
            id(&format!("spiffe://example.org/{name}")),
            id("spiffe://example.org/sigil/agent/join_token/a"),
            [Selector::parse(&format!("test:name:{name}")).unwrap()]
                .into_iter()
                .collect::<SelectorSet>(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn passes_the_conformance_suite() {
        conformance::run_all(|config: TestConfig| {
            let dir = tempfile::tempdir().unwrap();
            let options = SledStoreOptions {
                change_retention: config.change_retention,
                ..SledStoreOptions::default()
            };
            (SledStore::open(dir.path(), options).unwrap(), dir)
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_keeps_everything_including_the_revision_counter() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let td = TrustDomain::new("other.org").unwrap();
        let (kept, revision, node) = {
            let store = open(dir.path());
            let kept = store.create_entry(entry("kept")).await.unwrap();
            let gone = store.create_entry(entry("gone")).await.unwrap();
            store.delete_entry(&gone.id).await.unwrap();
            let node = store
                .create_node(AttestedNode {
                    spiffe_id: SpiffeId::new("spiffe://example.org/sigil/agent/join_token/a")
                        .unwrap(),
                    attestation_type: "join_token".to_owned(),
                    serial: "01".to_owned(),
                    new_serial: None,
                    not_after: now,
                    banned: false,
                    selectors: SelectorSet::new(),
                    created_at: now,
                    updated_at: now,
                })
                .await
                .unwrap();
            store
                .create_join_token(JoinToken {
                    token: "tok".to_owned(),
                    expires_at: now + Duration::from_secs(600),
                    created_at: now,
                    alias_spiffe_id: None,
                })
                .await
                .unwrap();
            store
                .set_federated_bundle(&td, b"{}".to_vec())
                .await
                .unwrap();
            store.save_ca_journal(b"journal".to_vec()).await.unwrap();
            let revision = store.current_revision().await.unwrap();
            (kept, revision, node)
        };

        let store = open(dir.path());
        assert_eq!(store.current_revision().await.unwrap(), revision);
        assert_eq!(store.get_entry(&kept.id).await.unwrap(), Some(kept.clone()));
        assert_eq!(store.count_entries().await.unwrap(), 1);
        assert_eq!(store.get_node(&node.spiffe_id).await.unwrap(), Some(node));
        assert_eq!(
            store.consume_join_token("tok", now).await.unwrap().token,
            "tok"
        );
        assert_eq!(
            store
                .get_federated_bundle(&td)
                .await
                .unwrap()
                .unwrap()
                .bundle,
            b"{}"
        );
        assert_eq!(
            store.load_ca_journal().await.unwrap(),
            Some(b"journal".to_vec())
        );
        let ChangesSince::Changes(feed) = store.changes_since(0, 100).await.unwrap() else {
            panic!("the feed must survive a restart");
        };
        assert_eq!(feed.len() as u64, revision);
        // The duplicate index survived too.
        assert!(matches!(
            store.create_entry(entry("kept")).await,
            Err(StoreError::AlreadyExists { .. })
        ));
        let after = store.create_entry(entry("after")).await.unwrap();
        assert_eq!(after.revision, revision + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopening_with_a_smaller_retention_prunes_the_feed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let batch = (0..30).map(|n| entry(&format!("e{n}"))).collect();
            store.create_entries(batch).await.unwrap();
        }
        let options = SledStoreOptions {
            change_retention: 5,
            ..SledStoreOptions::default()
        };
        let store = open_with(dir.path(), options);
        assert_eq!(store.inner.trees.changes.len(), 5);
        assert_eq!(
            store.changes_since(24, 100).await.unwrap(),
            ChangesSince::Expired
        );
        let ChangesSince::Changes(window) = store.changes_since(25, 100).await.unwrap() else {
            panic!("the retained window must be served");
        };
        assert_eq!(window.len(), 5);
        store.create_entry(entry("next")).await.unwrap();
        assert_eq!(store.inner.trees.changes.len(), 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_undecodable_record_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = EntryId::generate().unwrap();
        store
            .inner
            .trees
            .entries
            .insert(id.as_str(), &b"not json"[..])
            .unwrap();
        assert!(matches!(
            store.get_entry(&id).await,
            Err(StoreError::Corrupt { what: "entry", .. })
        ));
        assert!(matches!(
            store.snapshot_entries().await,
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_undecodable_audit_record_is_reported_with_its_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let records = (0..3)
            .map(|n| NewAuditRecord::new("uid:0", "entry.delete", format!("e{n}")))
            .collect();
        store.append_audit(records).await.unwrap();
        store
            .inner
            .trees
            .audit
            .insert(2u64.to_be_bytes(), &b"not json"[..])
            .unwrap();
        let error = store
            .list_audit(&AuditFilter::default(), &PageRequest::first(10))
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("corrupt audit record: record 2: "),
            "{error}"
        );
    }

    /// Group commit, observed without timing: the flusher is held while 200 writers do their
    /// writes and take their tickets, then released: far fewer flushes than writes, and every
    /// writer is acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn group_commit_covers_many_writes_with_few_flushes() {
        const WRITERS: u64 = 200;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let group = Arc::clone(&store.inner.group);
        group.set_paused(true);
        let requested_before = group.requested();
        let flushes_before = store.flush_count();

        let tasks: Vec<_> = (0..WRITERS)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move { store.create_entry(entry(&format!("w{n}"))).await })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while group.requested() < requested_before + WRITERS {
            assert!(
                tokio::time::Instant::now() < deadline,
                "writers never queued"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Nothing is acknowledged while the flusher is held.
        assert!(tasks.iter().all(|task| !task.is_finished()));
        assert_eq!(store.flush_count(), flushes_before);
        group.set_paused(false);
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let flushes = store.flush_count() - flushes_before;
        assert!(flushes >= 1);
        assert!(
            flushes < WRITERS,
            "{flushes} flushes for {WRITERS} writes: no group commit"
        );
        assert_eq!(store.current_revision().await.unwrap(), WRITERS);
    }

    /// kill -9 durability: a child process (this test binary, running
    /// [`crash_child_writes_until_killed`]) writes entries and prints each acknowledged id; it
    /// is SIGKILLed mid-loop; every acknowledged entry must be in the reopened store.
    #[test]
    fn acknowledged_writes_survive_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                CRASH_CHILD_TEST,
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = Vec::new();
        while acked.len() < ACKS_BEFORE_KILL {
            let Some(line) = lines.next() else { break };
            if let Some(id) = line.unwrap().strip_prefix("ACK ") {
                acked.push(id.to_owned());
            }
        }
        // `Child::kill` sends SIGKILL: no destructor, no final flush.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            acked.len() >= ACKS_BEFORE_KILL,
            "the child stopped after {} acknowledgements",
            acked.len()
        );
        // Lines already in the pipe were acknowledged too.
        for line in lines {
            let Ok(line) = line else { break };
            if let Some(id) = line.strip_prefix("ACK ") {
                acked.push(id.to_owned());
            }
        }

        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let store = open(dir.path());
            for id in &acked {
                let id = EntryId::parse(id).unwrap();
                assert!(
                    store.get_entry(&id).await.unwrap().is_some(),
                    "acknowledged entry {id} lost in the crash"
                );
            }
            assert!(store.count_entries().await.unwrap() >= acked.len() as u64);
            // The feed is gap-free after recovery, and new writes continue it.
            let current = store.current_revision().await.unwrap();
            let mut seen = 0;
            while let ChangesSince::Changes(changes) =
                store.changes_since(seen, 1_000).await.unwrap()
            {
                let Some(last) = changes.last() else { break };
                assert_eq!(changes[0].revision, seen + 1);
                assert_eq!(last.revision, seen + changes.len() as u64);
                seen = last.revision;
            }
            assert_eq!(seen, current, "the feed must reach the current revision");
            let next = store.create_entry(entry("after-crash")).await.unwrap();
            assert_eq!(next.revision, current + 1);
        });
    }

    /// The child of [`acknowledged_writes_survive_sigkill`]; does nothing in a normal run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_child_writes_until_killed() {
        let Some(dir) = std::env::var_os(CRASH_CHILD_ENV) else {
            return;
        };
        let store = open(Path::new(&dir));
        let writers: Vec<_> = (0..4)
            .map(|writer| {
                let store = store.clone();
                tokio::spawn(async move {
                    // Bounded, in case the parent dies without killing us.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    let mut n = 0;
                    while tokio::time::Instant::now() < deadline {
                        let created = store
                            .create_entry(entry(&format!("crash/{writer}/{n}")))
                            .await
                            .unwrap();
                        let mut stdout = std::io::stdout().lock();
                        writeln!(stdout, "ACK {}", created.id).unwrap();
                        stdout.flush().unwrap();
                        n += 1;
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
    }
}
