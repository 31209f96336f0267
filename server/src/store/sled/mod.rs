//! The embedded [`Store`] backend: sled, with group commit.
//!
//! # Layout
//!
//! One sled database with these trees. Entries and changes, the records a server reads at
//! every start, and audit records, one per credential issued, are a version byte and a
//! protobuf message (the `record` module; JSON records of earlier builds are still read). The
//! other records are JSON: every domain type already implements serde, a record can be read
//! with any JSON tool when debugging a data directory, and new optional fields can be added
//! without a migration; the encoding is nowhere near the cost of the fsync that every write
//! pays anyway.
//!
//! | tree                   | key                               | value                          |
//! |------------------------|-----------------------------------|--------------------------------|
//! | `entries`              | entry id (32 hex chars)           | [`RegistrationEntry`]          |
//! | `changes`              | revision, 8 bytes big-endian      | [`Change`], or the entry's id  |
//! | `meta`                 | `layout`, `revision`, `ca_journal[/server]`, `crl_number/authority`, `histories` | u64 big-endian, opaque bytes, 24 bytes per history |
//! | `nodes`                | agent SPIFFE ID                   | [`AttestedNode`]               |
//! | `join_tokens`          | token                             | [`JoinToken`]                  |
//! | `federated_bundles`    | trust domain name                 | [`FederatedBundle`]            |
//! | `audit`                | sequence, 8 bytes big-endian      | a run of [`AuditRecord`]s from it |
//! | `audit_head`           | `head`                            | [`AuditHead`] (the last record)|
//! | `audit_checkpoints`    | covered sequence, 8 bytes BE      | [`AuditCheckpoint`]            |
//! | `audit_sources`        | source SPIFFE ID, `0x00`, spool id | last sequence, u64 big-endian |
//!
//! A SPIFFE ID never contains `0x00`, so `ID 0x00` is an unambiguous key prefix.
//!
//! `meta`'s `layout` is the number of the newest layout that has opened the store
//! ([`LAYOUT`]). [`SledStore::open`] refuses a store whose layout is newer than this build's,
//! before it changes anything in it: a build that does not know a layout would misread it (an
//! index it does not know of is an index it does not update). A store of an earlier build has
//! no key (layout 1); opening it brings it to this layout. Builds from before the number do not
//! read the key, so going back to one of them is safe only with the backup taken before the
//! upgrade (operations.md). Later layouts must keep the number where it is (`meta`, `layout`,
//! 8 bytes big-endian): it is what older builds look at.
//!
//! Entries have no index on disk. A filtered listing walks the `entries` tree, and the entry
//! cache keeps the indexes by parent and by SPIFFE ID in memory for what must be fast
//! (authorizing agents and workloads). The uniqueness index (SHA-256 of an entry's SPIFFE ID,
//! parent and selectors, to the entry's id; [`NewEntry::identity_key`]) is held in memory by
//! the store itself: the first snapshot of the entries builds it from its scan (a server's
//! start takes that snapshot), or else the first entry write does, and every entry write checks
//! and updates it under its lock. Earlier layouts kept these indexes as the trees
//! `entries_by_parent`, `entries_by_spiffe_id` (layout 1) and `entries_by_identity` (layout 2);
//! [`SledStore::open`] drops them. Their keys were random across each tree, and sled rewrote
//! a leaf for every few of them: for 100,000 entries the first two took a third of the store on
//! disk and the third with the random entry ids of those builds about as much again (see
//! BENCHMARKS.md), and sled reads all of it back at every start. Entry ids are time-ordered
//! ([`EntryId`]), so new entries go to the end of the `entries` tree.
//!
//! The change feed holds an upsert as the entry's id alone while the entry's record in
//! `entries` is still that upsert's version (`record::StoredChange::Current`): most changes
//! are an entry's latest, and the feed then holds no second copy of it. The transaction that
//! replaces or removes the record writes that change again with the entry in full, so a
//! reference always names a record at its own revision; a reader that finds the record moved
//! on (the two reads are not one atomic read) reads the change again, now in full. A deletion
//! is always in full. Builds before layout 3 wrote every change in full, and those records are
//! read as they are.
//!
//! An audit append is one sled transaction over `audit` and `audit_head`: it reads the head,
//! seals each record after it (sequence, time, hashes; see [`crate::audit`]), inserts them and
//! writes the new head, so concurrent appenders never fork the chain. Large batches are split
//! into transactions of `AUDIT_CHUNK` records, all covered by one flush. The records of an
//! append are stored in runs: one value of the `audit` tree holds consecutive records, about
//! 4 KiB of them (`AUDIT_RUN_BYTES`), under the first one's sequence; a reader starts from the
//! value at or before the sequence it wants. sled's cost is per key, and a key per record was a
//! fifth of a server's CPU as it issued. Builds before layout 5 stored each record alone under
//! its sequence; those values are read as they are (a tree may hold both). Record times never
//! decrease along the chain, so a `since` filter starts with a binary search over sequences.
//!
//! Every entry mutation is one sled transaction over the entry trees, made while holding the
//! uniqueness index's lock: it checks the index, reads and bumps the revision counter, updates
//! the entry, writes the [`Change`] under the new revision and removes the change that falls
//! out of the retention window; once it commits, the index takes its changes. sled 0.34 runs
//! transactions one at a time and applies each atomically with respect to every other read and
//! write, so revisions are gap-free and follow commit order.
//!
//! # Group commit
//!
//! A mutating call does its write (on one of the store's own threads, see the `pool` module),
//! then takes a ticket (`requested += 1`) and waits. One flusher thread loops: it takes the
//! highest ticket issued so far, reads the revision counter, calls `Db::flush` (which writes out
//! and fsyncs everything written before it), then publishes "flushed through ticket T" and
//! "durable revision R" on watch channels. Every writer whose ticket is at most T wakes: its
//! write finished before it took its ticket, hence before the flush began. Writers that arrive during a flush are covered by the next
//! one, so N concurrent writes cost about one fsync. The durable revision is the one read just
//! before the flush: every transaction up to it had committed, so the flush covers it.
//!
//! A failed flush is sticky: the store answers [`StoreError::FlushFailed`] to every later write
//! (after a failed fsync nobody can tell what reached the disk).
//!
//! # sled's snapshot at a clean stop
//!
//! sled 0.34 recovers a store by reading its page-table snapshot and then every log record
//! after it, and writes a new snapshot only when it opens a store. A server that wrote 100,000
//! entries since its start would have the next start read all of that back. So the last step
//! of a clean stop, once nothing of the server holds the store, opens it once more and closes
//! it ([`SledStore::write_snapshot`], from `crate::server::snapshot_store_after_stop`): the
//! stop pays the recovery and the next start reads the snapshot and a short tail. Nothing in
//! the trees changes. A crash leaves the previous snapshot, and the next start reads the log
//! after it, as sled always does.
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

use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// The sled crate this backend is built on, re-exported so that forensic tools and tests can
/// open a data directory (of a stopped server) with the same version and read its trees as
/// the module docs lay them out (entries, changes and audit records in the `record` module's
/// binary form; `sigil_server::store_records` reads and writes an audit record's).
pub use ::sled as engine;
use ::sled::transaction::TransactionError;
use ::sled::{Db, Tree};
use async_trait::async_trait;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sigil_core::{SpiffeId, TrustDomain};
use sigil_daemon::telemetry::latency_histogram;
use tokio::sync::watch;

use self::commit::GroupCommit;
use self::entries::prune_changes;
use self::pool::CallPool;
use super::{
    AttestedNode, ChangesSince, CrlCounters, DEFAULT_CHANGE_RETENTION, EntryFilter, EntryId,
    EntrySnapshot, FederatedBundle, FederationRelationship, FetchStatus, History, HistoryId,
    JobWork, JoinToken, MAX_CHANGES_PER_CALL, NewEntry, Page, PageRequest, Put, RegistrationEntry,
    Revocation, ServerBundles, Session, SessionCredential, SessionEntryOp, SessionFilter,
    SessionId, SessionUpdate, Store, StoreError, hex_decode, hex_encode,
};
use crate::audit::{
    AuditCheckpoint, AuditFilter, AuditHead, AuditRecord, AuditSource, NewAuditRecord,
    SourceAppend, SourceEvent,
};

pub(crate) mod audit;
mod bundles;
mod commit;
mod entries;
mod nodes;
mod pool;
pub(crate) mod record;
mod sessions;
#[cfg(test)]
mod tests;

/// Trees that builds before the current layout wrote and this one drops when it opens the
/// database (see "Layout" in the module docs).
const DROPPED_TREES: [&str; 3] = [
    "entries_by_parent",
    "entries_by_spiffe_id",
    "entries_by_identity",
];

/// Key of the store's layout number in the `meta` tree (see "Layout" in the module docs).
const LAYOUT_KEY: &[u8] = b"layout";
/// The layout this build writes and the newest it reads: 5, audit records stored in runs (a
/// value of the `audit` tree holds consecutive records; a build of layout 4 reads such a value
/// as damage, and would list records from a sequence inside a run without it). Layout 4 began a
/// history of the change feed in `meta` at each server start (`histories`; a build of layout 3
/// would write changes outside any history, which agents resuming from a history would take
/// for shared). Layout 3
/// has no uniqueness index of entries on disk, and changes that name the entry's record
/// instead of holding a copy (which builds of layout 2 cannot read). Layout 2 had the index
/// (`entries_by_identity`), and no entry index trees by parent or by SPIFFE ID; layout 1,
/// unnumbered, is that of every build before the number.
pub(crate) const LAYOUT: u64 = 5;
/// Key of the revision counter in the `meta` tree.
const REVISION_KEY: &[u8] = b"revision";
/// Key of the change feed's histories ([`Store::begin_history`]) in the `meta` tree: each 16
/// bytes of id then its start revision, 8 bytes big-endian, oldest first.
const HISTORIES_KEY: &[u8] = b"histories";
/// The most histories kept: an agent whose history is older than all of them takes a snapshot.
const MAX_HISTORIES: usize = 64;
/// Key of the last CRL number handed out, in the `meta` tree.
const CRL_NUMBER_KEY: &[u8] = b"crl_number";

/// Options of [`SledStore::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SledStoreOptions {
    /// How many changes the feed keeps (at least 1). Default [`DEFAULT_CHANGE_RETENTION`].
    pub change_retention: u64,
    /// sled's page cache size in bytes. Default: sled's default (1 GiB).
    pub cache_capacity_bytes: Option<u64>,
    /// The audit chain this store's records are sealed into. Default
    /// [`DEFAULT_CHAIN_ID`](crate::audit::DEFAULT_CHAIN_ID).
    pub server_id: String,
}

/// The sled backend of [`Store`] (see the module docs for layout, group commit and snapshots).
///
/// Cheap to clone; clones share the database. The database closes, after a last flush, when the
/// last clone is dropped.
#[derive(Clone)]
pub(crate) struct SledStore {
    inner: Arc<Inner>,
}

/// The shared state behind [`SledStore`]'s clones.
struct Inner {
    path: PathBuf,
    server_id: String,
    /// [`CrlCounters::revocations`]: raised after each write that revoked serials.
    crl_revocations: AtomicU64,
    /// [`CrlCounters::crls`]: raised after each `save_server_crls`.
    crl_saves: AtomicU64,
    trees: Trees,
    retention: u64,
    /// The threads every sled call runs on.
    calls: CallPool,
    group: Arc<GroupCommit>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// How long each wait for a durable flush took.
    commits: Histogram,
    /// The uniqueness index of entries; `None` until the first snapshot or entry write builds
    /// it (see "Layout" in the module docs). Its lock is held by every entry write.
    identities: Mutex<Option<entries::Identities>>,
}

/// The database's trees.
#[derive(Clone)]
struct Trees {
    entries: Tree,
    changes: Tree,
    meta: Tree,
    nodes: Tree,
    join_tokens: Tree,
    bundles: Tree,
    audit: Tree,
    audit_head: Tree,
    audit_checkpoints: Tree,
    audit_sources: Tree,
    sessions: Tree,
    revocations: Tree,
}

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
            server_id: crate::audit::DEFAULT_CHAIN_ID.to_owned(),
        }
    }
}

// === impl SledStore ===

impl SledStore {
    /// Opens (or creates) the database in the directory `path`, refuses it if a newer build
    /// wrote a layout this one does not know, drops the trees of an earlier layout, prunes the
    /// change feed down to the retention, flushes, and starts the flusher thread.
    pub(crate) fn open(
        path: impl AsRef<Path>,
        options: SledStoreOptions,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        // First, so that a failure to start threads leaves nothing behind (no flusher holding
        // the database open).
        let calls = CallPool::start()?;
        let db = open_db(&path, options.cache_capacity_bytes)?;
        // Before anything is changed in it.
        let layout = read_layout(&db)?;
        if layout > LAYOUT {
            return Err(StoreError::Unsupported(format!(
                "the sled store in {} has layout {layout}, newer than this build knows \
                 ({LAYOUT}): a newer sigil-server opened it; run that version, or restore the \
                 backup taken before the upgrade",
                path.display()
            )));
        }
        for name in DROPPED_TREES {
            if db.drop_tree(name)? {
                tracing::info!(
                    tree = name,
                    "dropped an entry index of an earlier build: this build keeps none on disk"
                );
            }
        }
        let trees = Trees::open(&db)?;
        let retention = options.change_retention.max(1);
        let revision = read_revision(&trees.meta)?;
        prune_changes(&trees.changes, revision, retention)?;
        let rehashed = nodes::hash_legacy_join_tokens(&trees.join_tokens)?;
        if rehashed > 0 {
            tracing::info!(
                rehashed,
                "join tokens stored in the clear by an earlier build are now stored hashed"
            );
        }
        if layout < LAYOUT {
            trees.meta.insert(LAYOUT_KEY, &LAYOUT.to_be_bytes())?;
            if layout > 0 {
                tracing::info!(
                    from = layout,
                    to = LAYOUT,
                    "the store's layout was brought to this build's"
                );
            }
        }
        // What sled recovered may sit in the page cache only (the last process died before
        // flushing it): make it durable before reporting any of it (and the layout's number).
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
                server_id: options.server_id,
                crl_revocations: AtomicU64::new(0),
                crl_saves: AtomicU64::new(0),
                trees,
                retention,
                calls,
                group,
                flusher: Mutex::new(Some(handle)),
                commits: latency_histogram(),
                identities: Mutex::new(None),
            }),
        })
    }

    /// Opens the sled store in `path` once more after a clean stop, and closes it: sled 0.34
    /// writes its page-table snapshot only when it opens a store, so without this the next
    /// start re-reads the whole log written since the last one (for 100,000 entries, about
    /// 200 ms of a start on a slow host; see BENCHMARKS.md). With it, the stop pays that
    /// instead, and the next start reads the snapshot and the log's short tail. A crash leaves
    /// only the snapshot of the last start; the next start then reads the log after it, as it
    /// always did (a snapshot half-written by a process killed during this stop is removed at
    /// the next open: see `open_db`).
    ///
    /// Waits up to `wait` for this process's last handle on the store to be gone (sled's
    /// threads let go of its lock shortly after the last `SledStore` is dropped); then a held
    /// store is [`StoreError::Locked`]. Creates nothing: `Ok(false)` if `path` holds no store.
    /// Nothing in the store changes (sled writes the snapshot file beside its log).
    pub(crate) fn write_snapshot(
        path: &Path,
        cache_capacity_bytes: Option<u64>,
        wait: Duration,
    ) -> Result<bool, StoreError> {
        // sled creates a store where there is none; a stop must not.
        if !path.join("conf").is_file() || !path.join("db").is_file() {
            return Ok(false);
        }
        let db = retry_while_locked(
            wait,
            || open_db(path, cache_capacity_bytes),
            |e| matches!(e, StoreError::Locked { .. }),
        )?;
        drop(db);
        Ok(true)
    }

    #[cfg(test)]
    /// How many flushes the flusher thread has run (group commit makes it much smaller than the
    /// number of writes under concurrency).
    pub(crate) fn flush_count(&self) -> u64 {
        self.inner
            .group
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

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

    /// Runs `f` on the store's own threads ([`CallPool`]: sled calls block, and scans can be
    /// long).
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        self.inner.calls.run(move || f(&inner)).await?
    }

    /// Waits until a flush covers every write made so far.
    async fn commit(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let done = self.inner.group.commit().await;
        self.inner.commits.observe(started.elapsed().as_secs_f64());
        done
    }

    fn durable_revision(&self) -> u64 {
        *self.inner.group.durable_revision.borrow()
    }
}

/// What [`SledStore::export_extras`] reads: the records the [`Store`] trait has no listing
/// for.
#[derive(Debug, Default)]
pub(crate) struct SledExtras {
    /// Every retained change of the feed, oldest first.
    pub changes: Vec<super::Change>,
    /// Every unused join token (hashed).
    pub join_tokens: Vec<JoinToken>,
    /// Every audit source and its last sequence.
    pub audit_sources: Vec<(AuditSource, u64)>,
    /// Every server's CA journal.
    pub ca_journals: Vec<(String, Vec<u8>)>,
    /// Every authority's last CRL number (authority `""`: the one counter of builds before
    /// CRL numbers were kept per authority, a floor for all).
    pub crl_numbers: Vec<(String, u64)>,
}

impl SledStore {
    /// Reads what a migration copies besides what [`Store`] lists (`store migrate`).
    pub(crate) async fn export_extras(&self) -> Result<SledExtras, StoreError> {
        self.blocking(|inner| {
            let trees = &inner.trees;
            let mut extras = SledExtras::default();
            for item in trees.changes.iter() {
                let (key, value) = item?;
                // Nothing else writes the store during a migration, so nothing is pruned
                // meanwhile; if a change were, the copy would have a gap: refused.
                let change = inner
                    .resolve(&key, record::decode_change(&value)?)?
                    .ok_or_else(|| StoreError::Corrupt {
                        what: "change",
                        reason: "a change was removed while the feed was read".to_owned(),
                    })?;
                extras.changes.push(change);
            }
            for item in trees.join_tokens.iter() {
                extras.join_tokens.push(decode("join token", &item?.1)?);
            }
            for item in trees.audit_sources.iter() {
                let (key, value) = item?;
                let (spiffe_id, spool_id) = key
                    .iter()
                    .position(|b| *b == 0)
                    .map(|at| (&key[..at], &key[at + 1..]))
                    .ok_or_else(|| StoreError::Corrupt {
                        what: "audit source",
                        reason: "key without a separator".to_owned(),
                    })?;
                let source = AuditSource {
                    spiffe_id: String::from_utf8_lossy(spiffe_id).into_owned(),
                    spool_id: String::from_utf8_lossy(spool_id).into_owned(),
                };
                extras.audit_sources.push((source, decode_u64(&value)?));
            }
            for item in trees.meta.iter() {
                let (key, value) = item?;
                if key.as_ref() == b"ca_journal" {
                    extras
                        .ca_journals
                        .push((super::DEFAULT_SERVER_ID.to_owned(), value.to_vec()));
                } else if let Some(server) = key.strip_prefix(b"ca_journal/") {
                    extras
                        .ca_journals
                        .push((String::from_utf8_lossy(server).into_owned(), value.to_vec()));
                } else if key.as_ref() == CRL_NUMBER_KEY {
                    // The one counter of earlier builds: the floor of every authority's
                    // (PostgreSQL keeps it as authority "").
                    extras
                        .crl_numbers
                        .push((String::new(), decode_u64(&value)?));
                } else if let Some(authority) = key.strip_prefix(b"crl_number/") {
                    extras.crl_numbers.push((
                        String::from_utf8_lossy(authority).into_owned(),
                        decode_u64(&value)?,
                    ));
                }
            }
            Ok(extras)
        })
        .await
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
        // One store call per transaction, so that other calls (the entry cache's follower among
        // them) get the store's threads in between the parts of a large batch.
        let mut results = Vec::with_capacity(items.len());
        let mut items = items.into_iter();
        loop {
            let chunk: Vec<_> = items.by_ref().take(entries::BATCH_CHUNK).collect();
            if chunk.is_empty() {
                break;
            }
            results.extend(
                self.blocking(move |inner| inner.create_entries(&chunk, now))
                    .await?,
            );
        }
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
        self.blocking(|inner| inner.count_entries()).await
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

    async fn begin_history(&self, id: HistoryId) -> Result<Option<Vec<History>>, StoreError> {
        let histories = self.blocking(move |inner| inner.begin_history(id)).await?;
        // Durable before any agent is told of it.
        self.commit().await?;
        Ok(Some(histories))
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
        let spiffe_id = spiffe_id.clone();
        self.blocking(move |inner| inner.get_node(&spiffe_id)).await
    }

    async fn update_node(
        &self,
        expected: &AttestedNode,
        node: AttestedNode,
    ) -> Result<AttestedNode, StoreError> {
        let now = SystemTime::now();
        let expected = expected.clone();
        let node = self
            .blocking(move |inner| inner.update_node(&expected, &node, now))
            .await?;
        self.commit().await?;
        Ok(node)
    }

    async fn delete_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode, StoreError> {
        let spiffe_id = spiffe_id.clone();
        let node = self
            .blocking(move |inner| inner.delete_node(&spiffe_id))
            .await?;
        self.commit().await?;
        Ok(node)
    }

    async fn list_nodes(&self, page: &PageRequest) -> Result<Page<AttestedNode>, StoreError> {
        let page = page.clone();
        self.blocking(move |inner| inner.list_nodes(&page)).await
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.create_join_token(&token))
            .await?;
        self.commit().await
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: SystemTime,
    ) -> Result<JoinToken, StoreError> {
        let token_hash = token_hash.to_owned();
        // sled's `remove` is atomic and returns the old value: exactly one caller gets it.
        let removed = self
            .blocking(move |inner| inner.remove_join_token(&token_hash))
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

    fn commit_latency(&self) -> Histogram {
        self.inner.commits.clone()
    }

    /// One server per sled store: nobody else runs the job.
    async fn run_job<'w>(
        &self,
        _job: &'static str,
        work: JobWork<'w>,
    ) -> Result<Option<usize>, StoreError> {
        Ok(Some(work.await))
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
            .blocking(move |inner| inner.put_federated_bundle(record))
            .await?;
        self.commit().await?;
        Ok(record)
    }

    async fn get_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederatedBundle>, StoreError> {
        let trust_domain = trust_domain.clone();
        self.blocking(move |inner| inner.get_federated_bundle(&trust_domain))
            .await
    }

    async fn delete_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederatedBundle, StoreError> {
        let trust_domain = trust_domain.clone();
        let record = self
            .blocking(move |inner| inner.delete_federated_bundle(&trust_domain))
            .await?;
        self.commit().await?;
        Ok(record)
    }

    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>, StoreError> {
        self.blocking(|inner| inner.list_federated_bundles()).await
    }

    async fn put_federation(
        &self,
        relationship: FederationRelationship,
        bundle: Option<Vec<u8>>,
        put: Put,
    ) -> Result<FederationRelationship, StoreError> {
        let record = self
            .blocking(move |inner| inner.put_federation(relationship, bundle, put))
            .await?;
        self.commit().await?;
        Ok(record)
    }

    async fn get_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>, StoreError> {
        let trust_domain = trust_domain.clone();
        self.blocking(move |inner| inner.get_federation(&trust_domain))
            .await
    }

    async fn list_federations(&self) -> Result<Vec<FederationRelationship>, StoreError> {
        self.blocking(|inner| inner.list_federations()).await
    }

    async fn delete_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<(FederationRelationship, Option<FederatedBundle>), StoreError> {
        let trust_domain = trust_domain.clone();
        let deleted = self
            .blocking(move |inner| inner.delete_federation(&trust_domain))
            .await?;
        self.commit().await?;
        Ok(deleted)
    }

    async fn record_federation_fetch(
        &self,
        trust_domain: &TrustDomain,
        generation: u64,
        status: FetchStatus,
        bundle: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let trust_domain = trust_domain.clone();
        let recorded = self
            .blocking(move |inner| {
                inner.record_federation_fetch(&trust_domain, generation, status, bundle)
            })
            .await?;
        self.commit().await?;
        Ok(recorded)
    }

    async fn load_ca_journal(&self, server_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let server_id = server_id.to_owned();
        self.blocking(move |inner| inner.load_ca_journal(&server_id))
            .await
    }

    async fn save_ca_journal(&self, server_id: &str, journal: Vec<u8>) -> Result<(), StoreError> {
        let server_id = server_id.to_owned();
        self.blocking(move |inner| inner.save_ca_journal(&server_id, journal))
            .await?;
        self.commit().await
    }

    async fn heartbeat(&self) -> Result<(), StoreError> {
        // The sled files are locked by this process: no other instance can claim them.
        Ok(())
    }

    async fn publish_server_bundle(
        &self,
        server_id: &str,
        bundle: Vec<u8>,
        at_least: u64,
    ) -> Result<u64, StoreError> {
        let server_id = server_id.to_owned();
        let sequence = self
            .blocking(move |inner| inner.publish_server_bundle(&server_id, &bundle, at_least))
            .await?;
        self.commit().await?;
        Ok(sequence)
    }

    async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        self.blocking(|inner| inner.bundle_sequence()).await
    }

    async fn server_bundles(&self) -> Result<ServerBundles, StoreError> {
        self.blocking(|inner| inner.server_bundles()).await
    }

    async fn save_server_crls(&self, server_id: &str, crls: Vec<u8>) -> Result<(), StoreError> {
        let server_id = server_id.to_owned();
        self.blocking(move |inner| inner.save_server_crls(&server_id, &crls))
            .await?;
        self.commit().await?;
        self.inner.crl_saves.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn server_crls(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.blocking(|inner| inner.server_crls()).await
    }

    async fn crl_counters(&self) -> Result<CrlCounters, StoreError> {
        // One process writes a sled store: the counters live in it (they only rise while it
        // runs; a restart re-signs the CRLs anyway).
        Ok(CrlCounters {
            revocations: self.inner.crl_revocations.load(Ordering::SeqCst),
            crls: self.inner.crl_saves.load(Ordering::SeqCst),
        })
    }

    async fn append_audit(
        &self,
        records: Vec<NewAuditRecord>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let sealed = self
            .blocking(move |inner| inner.append_audit(&records))
            .await?;
        self.commit().await?;
        Ok(sealed)
    }

    async fn append_source_events(
        &self,
        source: &AuditSource,
        events: Vec<SourceEvent>,
    ) -> Result<SourceAppend, StoreError> {
        let source = source.clone();
        let appended = self
            .blocking(move |inner| inner.append_source_events(&source, &events))
            .await?;
        // Also when nothing was appended: the earlier call that appended these events may
        // still be waiting for its flush, and the caller forgets what is acknowledged.
        self.commit().await?;
        Ok(appended)
    }

    async fn audit_source_sequence(&self, source: &AuditSource) -> Result<u64, StoreError> {
        let source = source.clone();
        self.blocking(move |inner| inner.audit_source_sequence(&source))
            .await
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
        self.blocking(|inner| inner.audit_head()).await
    }

    async fn audit_chains(&self) -> Result<Vec<AuditHead>, StoreError> {
        // One database holds the one chain it was opened for.
        Ok(self.audit_head().await?.into_iter().collect())
    }

    async fn save_audit_checkpoint(&self, checkpoint: AuditCheckpoint) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.save_audit_checkpoint(&checkpoint))
            .await?;
        self.commit().await
    }

    async fn latest_audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>, StoreError> {
        self.blocking(|inner| inner.latest_audit_checkpoint()).await
    }

    async fn remove_audit_checkpoint(&self, sequence: u64) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.remove_audit_checkpoint(sequence))
            .await
    }

    async fn list_audit_checkpoints(
        &self,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<AuditCheckpoint>, StoreError> {
        self.blocking(move |inner| inner.list_audit_checkpoints(from_sequence, limit))
            .await
    }

    async fn list_audit_merged(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditRecord>, StoreError> {
        // A sled store holds one chain: its order by time is its order by sequence.
        self.list_audit(filter, page).await
    }

    async fn list_chain_records(
        &self,
        chain_id: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        // A sled store holds one chain, its server's.
        if chain_id != self.inner.server_id {
            return Ok(Vec::new());
        }
        let filter = AuditFilter {
            from_sequence: Some(from_sequence),
            ..AuditFilter::default()
        };
        let page = PageRequest::first(limit);
        Ok(self
            .blocking(move |inner| inner.list_audit(&filter, &page))
            .await?
            .items)
    }

    async fn list_chain_checkpoints(
        &self,
        chain_id: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<AuditCheckpoint>, StoreError> {
        if chain_id != self.inner.server_id {
            return Ok(Vec::new());
        }
        self.list_audit_checkpoints(from_sequence, limit).await
    }

    async fn create_session(
        &self,
        session: Session,
        entry: Option<NewEntry>,
        audit: Vec<NewAuditRecord>,
    ) -> Result<Session, StoreError> {
        let entry = match entry {
            Some(entry) => Some((EntryId::generate()?, entry)),
            None => None,
        };
        let now = SystemTime::now();
        let created = self
            .blocking(move |inner| inner.create_session(&session, entry.as_ref(), &audit, now))
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
        let revokes = !update.revocations.is_empty();
        let updated = self
            .blocking(move |inner| inner.update_session(&update, entry_id.as_ref(), now))
            .await?;
        self.commit().await?;
        if revokes {
            self.inner.crl_revocations.fetch_add(1, Ordering::SeqCst);
        }
        Ok(updated)
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let id = id.clone();
        self.blocking(move |inner| inner.get_session(&id)).await
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

    async fn add_session_credential(
        &self,
        id: &SessionId,
        credential: SessionCredential,
    ) -> Result<Session, StoreError> {
        let id = id.clone();
        let updated = self
            .blocking(move |inner| inner.add_session_credential(&id, &credential))
            .await?;
        self.commit().await?;
        Ok(updated)
    }

    async fn add_revocations(&self, revocations: Vec<Revocation>) -> Result<(), StoreError> {
        if revocations.is_empty() {
            return Ok(());
        }
        self.blocking(move |inner| inner.add_revocations(&revocations))
            .await?;
        self.commit().await?;
        self.inner.crl_revocations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn list_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.blocking(|inner| inner.list_revocations()).await
    }

    async fn next_crl_number(&self, authority_id: &str, at_least: u64) -> Result<u64, StoreError> {
        let authority_id = authority_id.to_owned();
        let number = self
            .blocking(move |inner| inner.next_crl_number(&authority_id, at_least))
            .await?;
        self.commit().await?;
        Ok(number)
    }

    async fn prune_revocations(&self, now: SystemTime) -> Result<u64, StoreError> {
        let pruned = self
            .blocking(move |inner| inner.prune_revocations(now))
            .await?;
        if pruned > 0 {
            self.commit().await?;
        }
        Ok(pruned)
    }
}

#[cfg(test)]
#[async_trait]
impl super::conformance::TestableStore for SledStore {
    async fn entries_by_parent(
        &self,
        parent_id: &SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        let parent_id = parent_id.clone();
        self.blocking(move |inner| inner.entries_by_parent(&parent_id))
            .await
    }
}

// === impl Inner ===

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
            changes: db.open_tree("changes")?,
            meta: db.open_tree("meta")?,
            nodes: db.open_tree("nodes")?,
            join_tokens: db.open_tree("join_tokens")?,
            bundles: db.open_tree("federated_bundles")?,
            audit: db.open_tree("audit")?,
            audit_head: db.open_tree("audit_head")?,
            audit_checkpoints: db.open_tree("audit_checkpoints")?,
            audit_sources: db.open_tree("audit_sources")?,
            sessions: db.open_tree("sessions")?,
            revocations: db.open_tree("revocations")?,
        })
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

/// A failed sled transaction as a store error: the abort the transaction chose, or the
/// backend's failure.
fn transaction_error(error: TransactionError<StoreError>) -> StoreError {
    match error {
        TransactionError::Abort(error) => error,
        TransactionError::Storage(error) => StoreError::Backend(error),
    }
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

fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        what: "revision",
        reason: format!("expected 8 bytes, found {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(array))
}

impl Inner {
    /// See [`Store::begin_history`].
    fn begin_history(&self, id: HistoryId) -> Result<Vec<History>, StoreError> {
        let meta = &self.trees.meta;
        let start = read_revision(meta)?;
        let mut histories = match meta.get(HISTORIES_KEY)? {
            Some(bytes) => decode_histories(&bytes).unwrap_or_else(|error| {
                // Forgetting them is safe: every agent's history becomes unknown, so each
                // takes a snapshot once.
                tracing::warn!(%error, "the change feed's histories are unreadable; starting them afresh (agents take a snapshot once)");
                Vec::new()
            }),
            None => Vec::new(),
        };
        histories.push(History { id, start });
        let excess = histories.len().saturating_sub(MAX_HISTORIES);
        histories.drain(..excess);
        let encoded: Vec<u8> = histories
            .iter()
            .flat_map(|h| h.id.into_iter().chain(h.start.to_be_bytes()))
            .collect();
        meta.insert(HISTORIES_KEY, encoded)?;
        Ok(histories)
    }

    /// See [`Store::next_crl_number`]: one atomic update of the authority's counter in `meta`
    /// (`crl_number/` and the authority id). An authority without a counter yet starts above
    /// the one counter of earlier builds (`crl_number`), so numbers never go backwards across
    /// the upgrade.
    fn next_crl_number(&self, authority_id: &str, at_least: u64) -> Result<u64, StoreError> {
        let legacy = match self.trees.meta.get(CRL_NUMBER_KEY)? {
            Some(bytes) => decode_u64(&bytes)?,
            None => 0,
        };
        let key = [CRL_NUMBER_KEY, b"/", authority_id.as_bytes()].concat();
        let mut corrupt = None;
        let updated = self.trees.meta.update_and_fetch(key, |old| {
            let last = match old.map(decode_u64) {
                Some(Ok(last)) => last,
                Some(Err(e)) => {
                    corrupt = Some(e);
                    return old.map(<[u8]>::to_vec);
                }
                None => legacy,
            };
            Some(at_least.max(last.saturating_add(1)).to_be_bytes().to_vec())
        })?;
        if let Some(e) = corrupt {
            return Err(e);
        }
        match updated {
            Some(bytes) => decode_u64(&bytes),
            None => Err(StoreError::Corrupt {
                what: "crl number",
                reason: "missing after update".to_owned(),
            }),
        }
    }
}

/// Whether sled could not open a database because another opener holds its lock: sled 0.34
/// reports every failure of its `flock` as "could not acquire lock" with the `io::Error`'s
/// debug text; only `WouldBlock` means a holder (a filesystem without `flock` gives another
/// error, which stays a [`StoreError::Backend`] with its text).
fn is_held_elsewhere(error: &::sled::Error) -> bool {
    match error {
        ::sled::Error::Io(io) => {
            let text = io.to_string();
            text.contains("could not acquire lock") && text.contains("WouldBlock")
        }
        _ => false,
    }
}

/// `open()`, again every 10 ms while it fails with an error that `locked` says is sled's lock
/// held elsewhere, for up to `wait`: a store that this process just dropped lets go of sled's
/// lock a moment after its last handle is gone (sled's own I/O threads hold the database until
/// then).
fn retry_while_locked<T, E>(
    wait: Duration,
    mut open: impl FnMut() -> Result<T, E>,
    locked: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = Instant::now() + wait;
    loop {
        match open() {
            Err(e) if locked(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            done => return done,
        }
    }
}

/// Opens (or creates) the sled database in `path`; a database another process holds is
/// [`StoreError::Locked`].
///
/// sled writes each snapshot as `snap.N.generating`, then renames it `snap.N`; but it reads the
/// newest file by name, `.generating` ones included, so one left half-written by a process
/// killed while writing it (at a start, or at a stop: `SledStore::write_snapshot`) makes every
/// later open fail as corrupt. When an open fails as corrupt and the newest snapshot file is
/// such a `.generating` file, it is removed and the open tried once more: sled then recovers
/// from the snapshot before it, or from the log's start, as after any kill.
fn open_db(path: &Path, cache_capacity_bytes: Option<u64>) -> Result<Db, StoreError> {
    match open_db_once(path, cache_capacity_bytes) {
        Err(StoreError::Backend(::sled::Error::Corruption { at, bt })) => {
            let corrupt = || StoreError::Backend(::sled::Error::Corruption { at, bt });
            let Some(unfinished) = newest_unfinished_snapshot(path) else {
                return Err(corrupt());
            };
            match std::fs::remove_file(&unfinished) {
                Ok(()) => {}
                // Another process removed it (it failed the same way).
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(StoreError::Corrupt {
                        what: "sled snapshot",
                        reason: format!(
                            "the store was refused as corrupt, and the unfinished snapshot {} \
                             cannot be removed: {error}",
                            unfinished.display()
                        ),
                    });
                }
            }
            let db = open_db_once(path, cache_capacity_bytes)?;
            tracing::warn!(
                file = %unfinished.display(),
                "removed the unfinished snapshot of a process killed while writing it; sled \
                 recovered from its log"
            );
            Ok(db)
        }
        other => other,
    }
}

/// The snapshot file sled would read in `path` (the newest `snap.*` by name), if it is one that
/// sled never finished (`.generating`).
fn newest_unfinished_snapshot(path: &Path) -> Option<PathBuf> {
    let newest = std::fs::read_dir(path)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("snap.") && !name.ends_with(".in___motion"))
        .max()?;
    newest.ends_with(".generating").then(|| path.join(newest))
}

fn open_db_once(path: &Path, cache_capacity_bytes: Option<u64>) -> Result<Db, StoreError> {
    // No sled background flusher: the group-commit flusher makes writes durable, and sled's own
    // thread would keep the database (and its lock file) open for up to its interval after the
    // store is dropped.
    let mut config = ::sled::Config::new().path(path).flush_every_ms(None);
    if let Some(bytes) = cache_capacity_bytes {
        config = config.cache_capacity(bytes);
    }
    config.open().map_err(|error| {
        if is_held_elsewhere(&error) {
            StoreError::Locked {
                path: path.to_path_buf(),
            }
        } else {
            StoreError::Backend(error)
        }
    })
}

/// The layout number in `meta`: 0 for a store sled just created, 1 for an existing store
/// without one (a store of a build from before the number).
fn read_layout(db: &::sled::Db) -> Result<u64, StoreError> {
    match db.open_tree("meta")?.get(LAYOUT_KEY)? {
        Some(bytes) => decode_u64(&bytes).map_err(|_| StoreError::Corrupt {
            what: "store layout",
            reason: format!("{} bytes, not an 8-byte number", bytes.len()),
        }),
        None if !db.was_recovered() => Ok(0),
        None => Ok(1),
    }
}

/// The `histories` value in `meta`: 24 bytes per history.
fn decode_histories(bytes: &[u8]) -> Result<Vec<History>, StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: "change feed histories",
        reason: format!("{} bytes, not a multiple of 24", bytes.len()),
    };
    if !bytes.len().is_multiple_of(24) {
        return Err(corrupt());
    }
    bytes
        .chunks_exact(24)
        .map(|record| {
            let (id, start) = record.split_at(16);
            Ok(History {
                id: id.try_into().map_err(|_| corrupt())?,
                start: decode_u64(start)?,
            })
        })
        .collect()
}

fn read_revision(meta: &Tree) -> Result<u64, StoreError> {
    match meta.get(REVISION_KEY)? {
        Some(bytes) => decode_u64(&bytes),
        None => Ok(0),
    }
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
