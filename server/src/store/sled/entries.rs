//! Registration entries: the entry transaction ([`EntryTx`]) over the entry trees and their
//! uniqueness index, listings, the consistent snapshot and the change feed (see the `sled` module docs
//! for the layout and "Consistent snapshots").

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::SystemTime;

use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use ::sled::{IVec, Transactional, Tree};

use super::record::{StoredChange, decode_change, decode_entry, encode_change, encode_entry};
use super::{
    Inner, PageCollector, REVISION_KEY, decode_u64, lock, read_revision, transaction_error,
};
use crate::store::{
    Change, ChangeKind, EntryFilter, EntryId, EntrySnapshot, NewEntry, Page, PageRequest,
    RegistrationEntry, StoreError, entry_after,
};

/// Entries created per transaction by [`Store::create_entries`] (all of them share one flush).
///
/// [`Store::create_entries`]: crate::store::Store::create_entries
pub(super) const BATCH_CHUNK: usize = 1_000;
/// How many times [`Store::snapshot_entries`] starts over when the changes it needs are pruned.
///
/// [`Store::snapshot_entries`]: crate::store::Store::snapshot_entries
const SNAPSHOT_ATTEMPTS: usize = 3;
/// At most this many threads decode the `entries` tree for a snapshot ([`scan_entries`]).
const SCAN_THREADS: usize = 4;
/// Records per chunk handed to a decoding thread by [`scan_entries`].
const SCAN_CHUNK: usize = 256;

/// Entry ids by uniqueness key ([`NewEntry::identity_key`]) of every entry in the store: the
/// uniqueness index, held in memory (see "Layout" in the `sled` module docs).
pub(super) type Identities = HashMap<[u8; 32], EntryId>;

/// The entry trees, and the session and revocation trees, inside one transaction, with the
/// uniqueness index as it was before the transaction and what the transaction changed in it.
pub(super) struct EntryTx<'a> {
    pub(super) entries: &'a TransactionalTree,
    identities: &'a Identities,
    /// Uniqueness keys this transaction gave an entry (`Some`) or freed (`None`), applied to
    /// the index once it commits.
    edits: RefCell<HashMap<[u8; 32], Option<EntryId>>>,
    changes: &'a TransactionalTree,
    meta: &'a TransactionalTree,
    pub(super) sessions: &'a TransactionalTree,
    pub(super) revocations: &'a TransactionalTree,
    /// The audit chain and its head, for a change whose audit record is written with it.
    pub(super) audit: &'a TransactionalTree,
    pub(super) audit_head: &'a TransactionalTree,
    retention: u64,
}

pub(super) type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

// === impl Inner ===

impl Inner {
    /// Runs `f` in one transaction over the entry trees, and applies what it changed in the
    /// uniqueness index once it commits.
    ///
    /// Every write of the `entries` tree is made here, one at a time: the index's lock is held
    /// from the uniqueness check to the index's update, so two transactions never both find a
    /// key free. (sled 0.34 runs transactions one at a time anyway.) The first call builds the
    /// index, unless a snapshot did (see [`Inner::snapshot_entries`]).
    pub(super) fn entry_tx<T>(
        &self,
        f: impl Fn(&EntryTx<'_>) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        let mut held = lock(&self.identities);
        // Out of the lock's slot while the transaction runs: if anything below panics, the
        // slot stays empty and the next call builds the index again from the entries.
        let mut identities = match held.take() {
            Some(identities) => identities,
            None => self.scan_under_lock()?.1,
        };
        let t = &self.trees;
        let committed = (
            &t.entries,
            &t.changes,
            &t.meta,
            &t.sessions,
            &t.revocations,
            &t.audit,
            &t.audit_head,
        )
            .transaction(
                |(entries, changes, meta, sessions, revocations, audit, audit_head)| {
                    let tx = EntryTx {
                        entries,
                        identities: &identities,
                        edits: RefCell::default(),
                        changes,
                        meta,
                        sessions,
                        revocations,
                        audit,
                        audit_head,
                        retention: self.retention,
                    };
                    let value = f(&tx)?;
                    Ok((value, tx.edits.into_inner()))
                },
            );
        match &committed {
            Ok((_, edits)) => {
                for (key, id) in edits {
                    match id {
                        Some(id) => identities.insert(*key, id.clone()),
                        None => identities.remove(key),
                    };
                }
                *held = Some(identities);
            }
            // Refused before anything was written: the index is as it was.
            Err(TransactionError::Abort(_)) => *held = Some(identities),
            // sled applies a transaction's trees one after the other: a storage error may
            // leave part of it written. The slot stays empty, and the next call builds the
            // index again from what is on disk.
            Err(TransactionError::Storage(_)) => {}
        }
        committed.map(|(value, _)| value).map_err(transaction_error)
    }

    /// Every entry, read while the caller holds the index's lock (so no entry changes
    /// meanwhile), and the uniqueness index built from them.
    fn scan_under_lock(&self) -> Result<(Vec<RegistrationEntry>, Identities), StoreError> {
        // Each key hashed on the thread that decoded its entry: a start-up waits for this.
        let keyed = scan_entries_in(&self.trees.entries, scan_parts(), SCAN_CHUNK, |entry| {
            (entry.identity_key(), entry)
        })?;
        let mut identities = Identities::with_capacity(keyed.len());
        let entries = keyed
            .into_iter()
            .map(|(key, entry)| {
                identities.insert(key, entry.id.clone());
                entry
            })
            .collect();
        Ok((entries, identities))
    }

    /// Creates `items` in one transaction (the caller passes at most [`BATCH_CHUNK`] of them,
    /// and its one flush covers every transaction of a batch).
    pub(super) fn create_entries(
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
                tx.id_is_free(id)?;
                let revision = tx.next_revision()?;
                let entry = RegistrationEntry::from_new(id.clone(), new.clone(), now, revision);
                tx.put(&entry, &identity)?;
                results.push(Ok(entry));
            }
            Ok(results)
        })
    }

    pub(super) fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>, StoreError> {
        self.trees
            .entries
            .get(id.as_str())?
            .map(|bytes| decode_entry(id.as_str().as_bytes(), &bytes))
            .transpose()
    }

    pub(super) fn update_entry(
        &self,
        id: &EntryId,
        new: &NewEntry,
    ) -> Result<RegistrationEntry, StoreError> {
        self.entry_tx(|tx| {
            let old = tx.get(id)?.ok_or_else(|| entry_not_found(id))?;
            let identity = new.identity_key();
            if let Some(existing) = tx.duplicate_of(&identity, id)? {
                return Err(ConflictableTransactionError::Abort(existing));
            }
            let revision = tx.next_revision()?;
            let entry =
                RegistrationEntry::from_new(id.clone(), new.clone(), old.created_at, revision);
            tx.replace(&old)?;
            tx.put(&entry, &identity)?;
            Ok(entry)
        })
    }

    pub(super) fn delete_entry(&self, id: &EntryId) -> Result<RegistrationEntry, StoreError> {
        self.entry_tx(|tx| {
            let old = tx.get(id)?.ok_or_else(|| entry_not_found(id))?;
            let revision = tx.next_revision()?;
            tx.replace(&old)?;
            tx.entries.remove(id.as_str())?;
            tx.record(&StoredChange::Change(Change {
                revision,
                kind: ChangeKind::EntryDeleted(old.clone()),
            }))?;
            Ok(old)
        })
    }

    pub(super) fn list_entries(
        &self,
        filter: &EntryFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationEntry>, StoreError> {
        let after = entry_after(page.token.as_deref())?;
        // No index on disk: a filtered listing walks the entries in id order, as an unfiltered
        // one does (see "Layout" in the `sled` module docs for why).
        let mut page = PageCollector::new(page.effective_size());
        let start = match &after {
            Some(after) => Bound::Excluded(after.as_str().as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        for item in self
            .trees
            .entries
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
        {
            let (key, value) = item?;
            let entry = decode_entry(&key, &value)?;
            if filter.matches(&entry) && !page.offer(entry) {
                break;
            }
        }
        Ok(page.finish(|entry| entry.id.as_str().as_bytes().to_vec()))
    }

    /// sled counts by walking the tree. The `entries` tree, not a smaller index: an update
    /// never moves an entry's key there, so a walk during updates counts each entry once (the
    /// admin API counts in the entry cache when it can, so this walk is rare).
    pub(super) fn count_entries(&self) -> Result<u64, StoreError> {
        Ok(self.trees.entries.len() as u64)
    }

    /// The entries whose parent is `parent_id` (for the conformance suite's `TestableStore`;
    /// there is no index to read, so this walks the entries).
    #[cfg(test)]
    pub(super) fn entries_by_parent(
        &self,
        parent_id: &sigil_core::SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        let mut entries = Vec::new();
        for item in self.trees.entries.iter() {
            let (key, value) = item?;
            let entry = decode_entry(&key, &value)?;
            if entry.parent_id == *parent_id {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    /// See "Consistent snapshots" in the `sled` module docs.
    pub(super) fn snapshot_entries(&self) -> Result<EntrySnapshot, StoreError> {
        {
            let mut held = lock(&self.identities);
            if held.is_none() {
                // The first snapshot (a server's start takes one) builds the uniqueness index
                // from its scan. No entry changes while the lock is held, so the scan is
                // exactly the state at the revision read before it.
                let revision = read_revision(&self.trees.meta)?;
                let (entries, identities) = self.scan_under_lock()?;
                *held = Some(identities);
                return Ok(EntrySnapshot { revision, entries });
            }
        }
        for _ in 0..SNAPSHOT_ATTEMPTS {
            let start = read_revision(&self.trees.meta)?;
            let scanned = scan_entries(&self.trees.entries)?;
            let end = read_revision(&self.trees.meta)?;
            let span = end - start;
            let changes = self.read_changes(start, end, usize::MAX)?;
            let complete = changes.len() as u64 == span
                && changes.first().is_none_or(|c| c.revision == start + 1);
            if !complete {
                continue;
            }
            if changes.is_empty() {
                // The scan is the state at `end` as it is, in id order.
                return Ok(EntrySnapshot {
                    revision: end,
                    entries: scanned,
                });
            }
            let mut entries: BTreeMap<EntryId, RegistrationEntry> = scanned
                .into_iter()
                .map(|entry| (entry.id.clone(), entry))
                .collect();
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

    /// Up to `limit` retained changes in `after+1 ..= through`, oldest first (fewer if one is
    /// pruned while they are read: those read are still the first ones, without a gap).
    pub(super) fn read_changes(
        &self,
        after: u64,
        through: u64,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        if through <= after {
            return Ok(Vec::new());
        }
        let range = (after + 1).to_be_bytes()..=through.to_be_bytes();
        let mut changes = Vec::new();
        for item in self.trees.changes.range(range).take(limit) {
            let (key, value) = item?;
            match self.resolve(&key, decode_change(&value)?)? {
                Some(change) => changes.push(change),
                None => break,
            }
        }
        Ok(changes)
    }

    /// The change `stored`, the record under `key` in `changes`, stands for; `None` if it was
    /// pruned meanwhile.
    ///
    /// A [`StoredChange::Current`] is read with the entry's record. Reading both is not one
    /// atomic read: if the entry's record is no longer at the change's revision, a transaction
    /// replaced or removed it since the change was read, and that same transaction wrote the
    /// change again in full, so the change is read again.
    pub(super) fn resolve(
        &self,
        key: &[u8],
        stored: StoredChange,
    ) -> Result<Option<Change>, StoreError> {
        let mut stored = stored;
        // The second pass reads a change written again in full; a reference still there then
        // is not what any transaction writes.
        for _ in 0..2 {
            let (revision, id) = match stored {
                StoredChange::Change(change) => return Ok(Some(change)),
                StoredChange::Current { revision, id } => (revision, id),
            };
            if let Some(bytes) = self.trees.entries.get(id.as_str())? {
                let entry = decode_entry(id.as_str().as_bytes(), &bytes)?;
                if entry.revision == revision {
                    return Ok(Some(Change {
                        revision,
                        kind: ChangeKind::EntryUpserted(entry),
                    }));
                }
            }
            stored = match self.trees.changes.get(key)? {
                Some(bytes) => decode_change(&bytes)?,
                None => return Ok(None),
            };
        }
        Err(StoreError::Corrupt {
            what: "change",
            reason: format!(
                "the change at revision {} names an entry whose record is not at that revision",
                decode_u64(key).unwrap_or_default()
            ),
        })
    }
}

// === impl EntryTx ===

impl EntryTx<'_> {
    /// Creates one entry with the next revision; a duplicate aborts the transaction.
    pub(super) fn create_entry(
        &self,
        id: &EntryId,
        new: &NewEntry,
        now: SystemTime,
    ) -> TxResult<RegistrationEntry> {
        let identity = new.identity_key();
        if let Some(existing) = self.duplicate_of(&identity, id)? {
            return Err(ConflictableTransactionError::Abort(existing));
        }
        self.id_is_free(id)?;
        let revision = self.next_revision()?;
        let entry = RegistrationEntry::from_new(id.clone(), new.clone(), now, revision);
        self.put(&entry, &identity)?;
        Ok(entry)
    }

    pub(super) fn next_revision(&self) -> TxResult<u64> {
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
    pub(super) fn record(&self, change: &StoredChange) -> TxResult<()> {
        let value = encode_change(change).map_err(ConflictableTransactionError::Abort)?;
        let revision = change.revision();
        self.changes.insert(&revision.to_be_bytes()[..], value)?;
        if let Some(expired) = revision.checked_sub(self.retention) {
            self.changes.remove(&expired.to_be_bytes()[..])?;
        }
        Ok(())
    }

    pub(super) fn get(&self, id: &EntryId) -> TxResult<Option<RegistrationEntry>> {
        match self.entries.get(id.as_str())? {
            Some(bytes) => decode_entry(id.as_str().as_bytes(), &bytes)
                .map(Some)
                .map_err(ConflictableTransactionError::Abort),
            None => Ok(None),
        }
    }

    /// The [`StoreError::AlreadyExists`] to return when another entry than `id` has this
    /// identity.
    /// (This transaction's own edits first, then the index as it was before it.)
    fn duplicate_of(&self, identity: &[u8; 32], id: &EntryId) -> TxResult<Option<StoreError>> {
        let edits = self.edits.borrow();
        let holder = match edits.get(identity) {
            Some(edited) => edited.as_ref(),
            None => self.identities.get(identity),
        };
        Ok(match holder {
            Some(existing) if existing != id => Some(StoreError::AlreadyExists {
                resource: "entry",
                key: existing.to_string(),
            }),
            _ => None,
        })
    }

    /// Refuses to create an entry under an id already taken (ids have 80 random bits and a
    /// time: never seen, but a record written over without [`EntryTx::replace`] would leave
    /// its change naming a record at another revision).
    fn id_is_free(&self, id: &EntryId) -> TxResult<()> {
        match self.entries.get(id.as_str())? {
            None => Ok(()),
            Some(_) => Err(ConflictableTransactionError::Abort(
                StoreError::AlreadyExists {
                    resource: "entry",
                    key: id.to_string(),
                },
            )),
        }
    }

    /// Writes `entry`, its uniqueness key and its change (the upsert at its revision, which
    /// names the record just written: [`StoredChange::Current`]).
    fn put(&self, entry: &RegistrationEntry, identity: &[u8; 32]) -> TxResult<()> {
        let value = encode_entry(entry).map_err(ConflictableTransactionError::Abort)?;
        self.entries.insert(entry.id.as_str(), value)?;
        self.edits
            .borrow_mut()
            .insert(*identity, Some(entry.id.clone()));
        self.record(&StoredChange::Current {
            revision: entry.revision,
            id: entry.id.clone(),
        })
    }

    /// `old`, the entry's record, is about to be replaced or removed: frees its uniqueness key
    /// and, if the change feed still holds the change that wrote it (at its revision) other
    /// than in full, writes that change again with the entry in full. (A record there that
    /// does not decode is that change too, damaged: it is written again as well.)
    pub(super) fn replace(&self, old: &RegistrationEntry) -> TxResult<()> {
        self.edits.borrow_mut().insert(old.identity_key(), None);
        let key = old.revision.to_be_bytes();
        let Some(bytes) = self.changes.get(key)? else {
            return Ok(());
        };
        match decode_change(&bytes) {
            Ok(StoredChange::Change(_)) => return Ok(()),
            Ok(StoredChange::Current { .. }) => {}
            Err(error) => tracing::warn!(
                revision = old.revision,
                %error,
                "a change that did not decode is written again from its entry's record"
            ),
        }
        let full = StoredChange::Change(Change {
            revision: old.revision,
            kind: ChangeKind::EntryUpserted(old.clone()),
        });
        let value = encode_change(&full).map_err(ConflictableTransactionError::Abort)?;
        self.changes.insert(&key[..], value)?;
        Ok(())
    }
}

// === helpers ===

/// Every record of the `entries` tree, decoded, in key (id) order.
///
/// One thread reads the tree in order and hands its records out in chunks of
/// [`SCAN_CHUNK`] to threads that decode them, one per core in all with it (at most
/// [`SCAN_THREADS`]; a server's start-up waits for this scan of every entry); it decodes a
/// chunk itself when each of them has one waiting.
/// However the keys are spread (time-ordered ids of one burst, random ids of earlier builds),
/// each thread decodes its share. It is one scan of the tree, as "Consistent snapshots"
/// describes.
fn scan_entries(tree: &Tree) -> Result<Vec<RegistrationEntry>, StoreError> {
    scan_entries_in(tree, scan_parts(), SCAN_CHUNK, |entry| entry)
}

/// How many threads [`scan_entries`] decodes on: one per core.
fn scan_parts() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// [`scan_entries`] on `threads` threads (clamped to 1 ..= [`SCAN_THREADS`]) in chunks of
/// `chunk` records, each entry passed through `each` on the thread that decoded it.
pub(super) fn scan_entries_in<T: Send>(
    tree: &Tree,
    threads: usize,
    chunk: usize,
    each: impl Fn(RegistrationEntry) -> T + Sync,
) -> Result<Vec<T>, StoreError> {
    type Decoded<T> = Vec<(usize, Vec<T>)>;
    let chunk = chunk.max(1);
    let decode = |records: Vec<(IVec, IVec)>| -> Result<Vec<T>, StoreError> {
        records
            .iter()
            .map(|(key, value)| decode_entry(key, value).map(&each))
            .collect()
    };
    // One queue the workers take chunks from, whichever is free; `waiting` counts the chunks in
    // it. The reading thread decodes a chunk itself instead when every worker already has one
    // waiting, so no thread idles while another has work.
    let (send, receive) = mpsc::channel::<(usize, Vec<(IVec, IVec)>)>();
    let receive = std::sync::Mutex::new(receive);
    let waiting = AtomicUsize::new(0);
    // Set by a worker whose chunk did not decode: the scan fails, so reading on is useless.
    let failed_early = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Fewer decoding threads if one cannot be started: this thread decodes the rest.
        let mut workers = Vec::new();
        for _ in 1..threads.clamp(1, SCAN_THREADS) {
            let (decode, receive, waiting) = (&decode, &receive, &waiting);
            let failed_early = &failed_early;
            let spawned = std::thread::Builder::new()
                .name("sigil-store-scan".to_owned())
                .spawn_scoped(scope, move || -> Result<Decoded<T>, StoreError> {
                    let mut decoded = Vec::new();
                    loop {
                        let next = lock(receive).recv();
                        let Ok((n, records)) = next else {
                            return Ok(decoded);
                        };
                        waiting.fetch_sub(1, Ordering::AcqRel);
                        match decode(records) {
                            Ok(part) => decoded.push((n, part)),
                            Err(error) => {
                                failed_early.store(true, Ordering::Release);
                                return Err(error);
                            }
                        }
                    }
                });
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(_) => break,
            }
        }
        let mut decoded: Decoded<T> = Vec::new();
        let read = (|| {
            let mut hand_out = |n: usize, records: Vec<(IVec, IVec)>| -> Result<(), StoreError> {
                if waiting.load(Ordering::Acquire) < workers.len() {
                    waiting.fetch_add(1, Ordering::AcqRel);
                    // The receiver lives until the scope ends: a send cannot fail (checked
                    // all the same).
                    if send.send((n, records)).is_ok() {
                        return Ok(());
                    }
                    return Err(StoreError::Io(std::io::Error::other(
                        "the entry scan's queue closed",
                    )));
                }
                decoded.push((n, decode(records)?));
                Ok(())
            };
            let mut records = Vec::with_capacity(chunk);
            let mut chunks = 0;
            for item in tree.iter() {
                if failed_early.load(Ordering::Acquire) {
                    // The worker's error is reported when it is joined, below.
                    return Ok(());
                }
                records.push(item?);
                if records.len() == chunk {
                    let full = std::mem::replace(&mut records, Vec::with_capacity(chunk));
                    hand_out(chunks, full)?;
                    chunks += 1;
                }
            }
            if !records.is_empty() {
                hand_out(chunks, records)?;
            }
            Ok(())
        })();
        drop(send);
        // Every worker is joined whatever happened above (the scope would panic on one that
        // panicked and was left to it), and the first error is the scan's.
        let mut failed = read.err();
        for handle in workers {
            match handle.join() {
                Ok(Ok(part)) => decoded.extend(part),
                Ok(Err(error)) => {
                    failed.get_or_insert(error);
                }
                Err(panic) => {
                    failed.get_or_insert(StoreError::Io(std::io::Error::other(format!(
                        "an entry scan thread panicked: {}",
                        super::pool::panic_message(&*panic)
                    ))));
                }
            }
        }
        if let Some(error) = failed {
            return Err(error);
        }
        decoded.sort_unstable_by_key(|(n, _)| *n);
        Ok(decoded.into_iter().flat_map(|(_, part)| part).collect())
    })
}

/// Removes every change older than the retention window (after a restart with a smaller one).
pub(super) fn prune_changes(
    changes: &Tree,
    revision: u64,
    retention: u64,
) -> Result<(), StoreError> {
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
