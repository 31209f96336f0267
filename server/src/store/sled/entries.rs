//! Registration entries: the entry transaction ([`EntryTx`]) over the entry trees and their
//! uniqueness index, listings, the consistent snapshot and the change feed (see the `sled` module docs
//! for the layout and "Consistent snapshots").

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::time::SystemTime;

use ::sled::transaction::{ConflictableTransactionError, TransactionalTree};
use ::sled::{Transactional, Tree};

use super::record::{decode_change, decode_entry, encode_change, encode_entry};
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
/// At most this many threads read the `entries` tree for a snapshot ([`scan_entries`]).
const SCAN_THREADS: usize = 4;

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
            )
            .map_err(transaction_error);
        if let Ok((_, edits)) = &committed {
            for (key, id) in edits {
                match id {
                    Some(id) => identities.insert(*key, id.clone()),
                    None => identities.remove(key),
                };
            }
        }
        *held = Some(identities);
        committed.map(|(value, _)| value)
    }

    /// Every entry, read while the caller holds the index's lock (so no entry changes
    /// meanwhile), and the uniqueness index built from them.
    fn scan_under_lock(&self) -> Result<(Vec<RegistrationEntry>, Identities), StoreError> {
        let entries = scan_entries(&self.trees.entries)?;
        let identities = entries
            .iter()
            .map(|entry| (entry.identity_key(), entry.id.clone()))
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

    pub(super) fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>, StoreError> {
        self.trees
            .entries
            .get(id.as_str())?
            .map(|bytes| decode_entry(&bytes))
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
            tx.unindex(&old);
            tx.put(&entry, &identity)?;
            tx.record(Change {
                revision,
                kind: ChangeKind::EntryUpserted(entry.clone()),
            })?;
            Ok(entry)
        })
    }

    pub(super) fn delete_entry(&self, id: &EntryId) -> Result<RegistrationEntry, StoreError> {
        self.entry_tx(|tx| {
            let old = tx.get(id)?.ok_or_else(|| entry_not_found(id))?;
            let revision = tx.next_revision()?;
            tx.entries.remove(id.as_str())?;
            tx.unindex(&old);
            tx.record(Change {
                revision,
                kind: ChangeKind::EntryDeleted(old.clone()),
            })?;
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
            let entry: RegistrationEntry = decode_entry(&item?.1)?;
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
            let entry: RegistrationEntry = decode_entry(&item?.1)?;
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

    /// Up to `limit` retained changes in `after+1 ..= through`, oldest first.
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
        self.trees
            .changes
            .range(range)
            .take(limit)
            .map(|item| decode_change(&item?.1))
            .collect()
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
        let revision = self.next_revision()?;
        let entry = RegistrationEntry::from_new(id.clone(), new.clone(), now, revision);
        self.put(&entry, &identity)?;
        self.record(Change {
            revision,
            kind: ChangeKind::EntryUpserted(entry.clone()),
        })?;
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
    pub(super) fn record(&self, change: Change) -> TxResult<()> {
        let value = encode_change(&change).map_err(ConflictableTransactionError::Abort)?;
        self.changes
            .insert(&change.revision.to_be_bytes()[..], value)?;
        if let Some(expired) = change.revision.checked_sub(self.retention) {
            self.changes.remove(&expired.to_be_bytes()[..])?;
        }
        Ok(())
    }

    pub(super) fn get(&self, id: &EntryId) -> TxResult<Option<RegistrationEntry>> {
        match self.entries.get(id.as_str())? {
            Some(bytes) => decode_entry(&bytes)
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

    fn put(&self, entry: &RegistrationEntry, identity: &[u8; 32]) -> TxResult<()> {
        let value = encode_entry(entry).map_err(ConflictableTransactionError::Abort)?;
        self.entries.insert(entry.id.as_str(), value)?;
        self.edits
            .borrow_mut()
            .insert(*identity, Some(entry.id.clone()));
        Ok(())
    }

    /// Frees `entry`'s uniqueness key (it is deleted, or about to be put again).
    pub(super) fn unindex(&self, entry: &RegistrationEntry) {
        self.edits.borrow_mut().insert(entry.identity_key(), None);
    }
}

// === helpers ===

/// Every record of the `entries` tree, decoded, in key (id) order.
///
/// The tree is read in parts of about equal size, each decoded on a thread of its own, one per
/// core (at most [`SCAN_THREADS`]; a server's start-up waits for this scan of every entry).
/// Each key is read by exactly one part, so the parts together are a scan as "Consistent
/// snapshots" describes.
fn scan_entries(tree: &Tree) -> Result<Vec<RegistrationEntry>, StoreError> {
    let parts = std::thread::available_parallelism().map_or(1, usize::from);
    scan_entries_in(tree, parts)
}

/// [`scan_entries`] in `parts` parts (clamped to 1 ..= [`SCAN_THREADS`]).
pub(super) fn scan_entries_in(
    tree: &Tree,
    parts: usize,
) -> Result<Vec<RegistrationEntry>, StoreError> {
    let starts = part_starts(tree, parts.clamp(1, SCAN_THREADS))?;
    let parts = starts.len() + 1;
    // Part `k` starts at `starts[k - 1]` and ends where part `k + 1` starts; the first part
    // starts before every key and the last one ends after every key, whatever its form.
    let range = |k: usize| {
        let start = match k.checked_sub(1).and_then(|previous| starts.get(previous)) {
            None => Bound::Unbounded,
            Some(start) => Bound::Included(start.clone()),
        };
        let end = match starts.get(k) {
            None => Bound::Unbounded,
            Some(next) => Bound::Excluded(next.clone()),
        };
        (start, end)
    };
    let decode_part = |k: usize| -> Result<Vec<RegistrationEntry>, StoreError> {
        tree.range::<Vec<u8>, _>(range(k))
            .map(|item| decode_entry(&item?.1))
            .collect()
    };
    std::thread::scope(|scope| {
        // A part whose thread cannot be started is read on this thread, after part 0.
        let others: Vec<_> = (1..parts)
            .map(|k| {
                std::thread::Builder::new()
                    .name("sigil-store-scan".to_owned())
                    .spawn_scoped(scope, move || decode_part(k))
                    .map_err(|_| k)
            })
            .collect();
        let mut entries = decode_part(0)?;
        for other in others {
            let part = match other {
                Ok(thread) => thread.join().map_err(|panic| {
                    StoreError::Io(std::io::Error::other(format!(
                        "an entry scan thread panicked: {}",
                        super::pool::panic_message(&*panic)
                    )))
                })?,
                Err(k) => decode_part(k),
            };
            entries.extend(part?);
        }
        Ok(entries)
    })
}

/// Where each part of a scan in `parts` parts after the first starts, in increasing order.
///
/// Ids are hex, so the points are spread evenly between the numbers the tree's first and last
/// keys spell (their first 32 hex digits): time-ordered ids are spread by when they were made,
/// ids of earlier builds (random) over the whole range. A key of another form (none is written)
/// splits the tree by its first hex digit instead. Either way every key falls in exactly one
/// part; only how even the parts are depends on the keys.
pub(super) fn part_starts(tree: &Tree, parts: usize) -> Result<Vec<Vec<u8>>, StoreError> {
    if parts < 2 {
        return Ok(Vec::new());
    }
    let (Some((first, _)), Some((last, _))) = (tree.first()?, tree.last()?) else {
        return Ok(Vec::new());
    };
    let number = |key: &[u8]| {
        let digits = std::str::from_utf8(key.get(..32)?).ok()?;
        u128::from_str_radix(digits, 16).ok()
    };
    let Some((low, high)) = number(&first).zip(number(&last)) else {
        let digit = |k: usize| vec![sigil_core::hex::DIGITS[16 * k / parts]];
        return Ok((1..parts).map(digit).collect());
    };
    let step = high.saturating_sub(low) / parts as u128;
    if step == 0 {
        return Ok(Vec::new());
    }
    Ok((1..parts)
        .map(|k| format!("{:032x}", low + step * k as u128).into_bytes())
        .collect())
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
