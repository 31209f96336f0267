//! Registration entries: the entry transaction ([`EntryTx`]) over the entry trees and their
//! uniqueness index, listings, the consistent snapshot and the change feed (see the `sled` module docs
//! for the layout and "Consistent snapshots").

use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::SystemTime;

use ::sled::transaction::{ConflictableTransactionError, TransactionalTree};
use ::sled::{Transactional, Tree};

use super::record::{decode_change, decode_entry, encode_change, encode_entry};
use super::{Inner, PageCollector, REVISION_KEY, decode_u64, read_revision, transaction_error};
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

/// The four entry trees, and the session and revocation trees, inside one transaction.
pub(super) struct EntryTx<'a> {
    pub(super) entries: &'a TransactionalTree,
    by_identity: &'a TransactionalTree,
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
    /// Runs `f` in one transaction over the entry trees.
    pub(super) fn entry_tx<T>(
        &self,
        f: impl Fn(&EntryTx<'_>) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        let t = &self.trees;
        (
            &t.entries,
            &t.by_identity,
            &t.changes,
            &t.meta,
            &t.sessions,
            &t.revocations,
            &t.audit,
            &t.audit_head,
        )
            .transaction(
                |(
                    entries,
                    by_identity,
                    changes,
                    meta,
                    sessions,
                    revocations,
                    audit,
                    audit_head,
                )| {
                    f(&EntryTx {
                        entries,
                        by_identity,
                        changes,
                        meta,
                        sessions,
                        revocations,
                        audit,
                        audit_head,
                        retention: self.retention,
                    })
                },
            )
            .map_err(transaction_error)
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
            tx.unindex(&old)?;
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
            tx.unindex(&old)?;
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
        let value = encode_entry(entry).map_err(ConflictableTransactionError::Abort)?;
        let id = entry.id.as_str();
        self.entries.insert(id, value)?;
        self.by_identity.insert(&identity[..], id)?;
        Ok(())
    }

    pub(super) fn unindex(&self, entry: &RegistrationEntry) -> TxResult<()> {
        self.by_identity
            .remove(&entry.to_new().identity_key()[..])?;
        Ok(())
    }
}

// === helpers ===

/// Every record of the `entries` tree, decoded, in key (id) order.
///
/// Entry ids are random hex, so the first digit splits the tree into parts of about equal
/// size: each part is read and decoded on a thread of its own, one per core (at most
/// [`SCAN_THREADS`]; a server's start-up waits for this scan of every entry). Each key is read
/// by exactly one part, so the parts together are a scan as "Consistent snapshots" describes.
fn scan_entries(tree: &Tree) -> Result<Vec<RegistrationEntry>, StoreError> {
    let parts = std::thread::available_parallelism().map_or(1, usize::from);
    scan_entries_in(tree, parts)
}

/// [`scan_entries`] in `parts` parts (clamped to 1 ..= [`SCAN_THREADS`]).
pub(super) fn scan_entries_in(
    tree: &Tree,
    parts: usize,
) -> Result<Vec<RegistrationEntry>, StoreError> {
    let parts = parts.clamp(1, SCAN_THREADS);
    // Part `k` starts at the hex digit `16 * k / parts` (ids are lowercase hex) and ends where
    // part `k + 1` starts; the first part starts before every key and the last one ends after
    // every key, whatever its form.
    let digit = |k: usize| vec![sigil_core::hex::DIGITS[16 * k / parts]];
    let range = |k: usize| {
        let start = match k {
            0 => Bound::Unbounded,
            _ => Bound::Included(digit(k)),
        };
        let end = match k + 1 {
            last if last == parts => Bound::Unbounded,
            next => Bound::Excluded(digit(next)),
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
