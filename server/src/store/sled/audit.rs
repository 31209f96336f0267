//! The audit log: the hash chain, its head and its checkpoints (see the `sled` module docs for
//! how an append keeps the chain from forking).

use std::time::SystemTime;

use ::sled::Transactional;
use ::sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::entries::TxResult;
use super::{Inner, PageCollector, decode, encode, record, transaction_error};
use crate::audit::{
    AuditCheckpoint, AuditFilter, AuditHead, AuditRecord, AuditSource, GENESIS_HASH,
    NewAuditRecord, SourceAppend, SourceEvent,
};
use crate::store::{Page, PageRequest, StoreError};

/// Key of the chain head in the `audit_head` tree.
const AUDIT_HEAD_KEY: &[u8] = b"head";
/// Audit records sealed per transaction by [`Store::append_audit`] (all share one flush).
///
/// [`Store::append_audit`]: crate::store::Store::append_audit
const AUDIT_CHUNK: usize = 1_000;
/// The size at which a run of audit records stored as one value ends (the record that takes it
/// there is its last). sled's cost is per key: a record stored alone cost an insert, a
/// traversal and a page update each, a fifth of the server's CPU when it issues (BENCHMARKS.md,
/// "Audit records in runs"). About a dozen records a run takes most of that away, and a leaf
/// of sled's (at most 17 keys) stays well under the size at which sled writes it out as a blob
/// file of its own (a quarter of its 512 KiB segments).
const AUDIT_RUN_BYTES: usize = 4_096;

impl Inner {
    /// Appends `records` in transactions of [`AUDIT_CHUNK`] records (the caller's one flush
    /// covers them all).
    pub(super) fn append_audit(
        &self,
        records: &[NewAuditRecord],
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut sealed = Vec::with_capacity(records.len());
        for chunk in records.chunks(AUDIT_CHUNK) {
            sealed.extend(self.append_audit_chunk(chunk)?);
        }
        Ok(sealed)
    }

    /// Seals and inserts `chunk` after the chain head, in one transaction (see the `sled`
    /// module docs).
    fn append_audit_chunk(&self, chunk: &[NewAuditRecord]) -> Result<Vec<AuditRecord>, StoreError> {
        let now = SystemTime::now();
        (&self.trees.audit, &self.trees.audit_head)
            .transaction(|(audit, head_tree)| self.seal_into(audit, head_tree, chunk, now))
            .map_err(transaction_error)
    }

    /// Appends the events of `source` above its last stored sequence, and that sequence, in one
    /// transaction over `audit`, `audit_head` and `audit_sources`.
    pub(super) fn append_source_events(
        &self,
        source: &AuditSource,
        events: &[SourceEvent],
    ) -> Result<SourceAppend, StoreError> {
        if events.windows(2).any(|w| w[1].sequence <= w[0].sequence) {
            return Err(StoreError::Encode {
                what: "audit source events",
                reason: "sequences must increase strictly".to_owned(),
            });
        }
        let key = source_key(source);
        let now = SystemTime::now();
        (
            &self.trees.audit,
            &self.trees.audit_head,
            &self.trees.audit_sources,
        )
            .transaction(|(audit, head_tree, sources)| {
                let abort = ConflictableTransactionError::Abort;
                let last = match sources.get(&key)? {
                    Some(bytes) => source_sequence(&bytes).map_err(abort)?,
                    None => 0,
                };
                let fresh: Vec<&SourceEvent> =
                    events.iter().filter(|e| e.sequence > last).collect();
                let continues = fresh
                    .iter()
                    .zip(1u64..)
                    .all(|(event, n)| Some(event.sequence) == last.checked_add(n));
                if !continues {
                    return Ok(SourceAppend {
                        appended: Vec::new(),
                        acknowledged: last,
                    });
                }
                let records: Vec<NewAuditRecord> = fresh.iter().map(|e| e.record.clone()).collect();
                let previous = fresh.last().map_or(last, |e| e.sequence);
                let appended = self.seal_into(audit, head_tree, &records, now)?;
                if previous > last {
                    sources.insert(key.as_slice(), &previous.to_be_bytes()[..])?;
                }
                Ok(SourceAppend {
                    appended,
                    acknowledged: previous,
                })
            })
            .map_err(transaction_error)
    }

    pub(super) fn audit_source_sequence(&self, source: &AuditSource) -> Result<u64, StoreError> {
        match self.trees.audit_sources.get(source_key(source))? {
            Some(bytes) => source_sequence(&bytes),
            None => Ok(0),
        }
    }

    /// Seals `records` after the chain head and inserts them and the new head, inside the
    /// caller's transaction over the `audit` and `audit_head` trees.
    pub(super) fn seal_into(
        &self,
        audit: &TransactionalTree,
        head_tree: &TransactionalTree,
        records: &[NewAuditRecord],
        now: SystemTime,
    ) -> TxResult<Vec<AuditRecord>> {
        let abort = ConflictableTransactionError::Abort;
        let head: Option<AuditHead> = match head_tree.get(AUDIT_HEAD_KEY)? {
            Some(bytes) => Some(decode("audit head", &bytes).map_err(abort)?),
            None => None,
        };
        if let Some(head) = head.as_ref().filter(|h| h.chain_id != self.server_id) {
            return Err(abort(StoreError::Corrupt {
                what: "audit head",
                reason: format!(
                    "the store holds audit chain {:?}, not {:?}",
                    head.chain_id, self.server_id
                ),
            }));
        }
        let (mut sequence, mut prev_hash, prev_time) = head
            .map_or((0, GENESIS_HASH, SystemTime::UNIX_EPOCH), |h| {
                (h.sequence, h.hash, h.time)
            });
        // Times never decrease along the chain, even if the clock steps back.
        let time = now.max(prev_time);
        let mut sealed = Vec::with_capacity(records.len());
        for new in records {
            sequence = sequence.checked_add(1).ok_or_else(|| {
                abort(StoreError::Corrupt {
                    what: "audit head",
                    reason: "sequence exhausted".to_owned(),
                })
            })?;
            let record = new
                .clone()
                .seal(&self.server_id, sequence, time, prev_hash)
                .map_err(|e| {
                    abort(StoreError::Encode {
                        what: "audit record",
                        reason: e.to_string(),
                    })
                })?;
            prev_hash = record.hash;
            sealed.push(record);
        }
        for (first, value) in record::encode_audit_runs(&sealed, AUDIT_RUN_BYTES).map_err(abort)? {
            audit.insert(&first.to_be_bytes()[..], value)?;
        }
        if let Some(last) = sealed.last() {
            let value = encode("audit head", &last.head()).map_err(abort)?;
            head_tree.insert(AUDIT_HEAD_KEY, value)?;
        }
        Ok(sealed)
    }

    pub(super) fn list_audit(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditRecord>, StoreError> {
        let mut start = crate::store::audit_listing_start(filter, page)?;
        if let Some(since) = filter.since {
            start = start.max(self.first_audit_at(since)?);
        }
        let mut page = PageCollector::new(page.effective_size());
        for record in self.audit_records_from(start)? {
            let record = record?;
            if filter.matches(&record) && !page.offer(record) {
                break;
            }
        }
        Ok(page.finish(|record| record.sequence.to_be_bytes().to_vec()))
    }

    /// The stored records from sequence `start` on, in order ([`StoredRecords`]).
    fn audit_records_from(&self, start: u64) -> Result<StoredRecords, StoreError> {
        let begin = match self.trees.audit.range(..=start.to_be_bytes()).next_back() {
            Some(item) => item?.0,
            None => start.to_be_bytes().as_slice().into(),
        };
        Ok(StoredRecords {
            values: self.trees.audit.range(begin..).peekable(),
            pending: Vec::new().into_iter(),
            start,
            failed: false,
        })
    }

    /// The first sequence whose record's time is at or after `since` (binary search: times
    /// never decrease along the chain).
    fn first_audit_at(&self, since: SystemTime) -> Result<u64, StoreError> {
        let Some((key, value)) = self.trees.audit.last()? else {
            return Ok(1);
        };
        let last = decode_audit(&key, &value)?
            .last()
            .map_or(0, |record| record.sequence);
        let (mut low, mut high) = (1u64, last.saturating_add(1));
        while low < high {
            let mid = low + (high - low) / 2;
            match self.audit_records_from(mid)?.next() {
                None => high = mid,
                Some(record) => {
                    let record = record?;
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

    pub(super) fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        self.trees
            .audit_head
            .get(AUDIT_HEAD_KEY)?
            .map(|bytes| decode("audit head", &bytes))
            .transpose()
    }

    pub(super) fn save_audit_checkpoint(
        &self,
        checkpoint: &AuditCheckpoint,
    ) -> Result<(), StoreError> {
        let value = encode("audit checkpoint", checkpoint)?;
        self.trees
            .audit_checkpoints
            .insert(checkpoint.sequence.to_be_bytes(), value)?;
        Ok(())
    }

    pub(super) fn latest_audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>, StoreError> {
        self.trees
            .audit_checkpoints
            .last()?
            .map(|(_, bytes)| decode("audit checkpoint", &bytes))
            .transpose()
    }

    pub(super) fn remove_audit_checkpoint(&self, sequence: u64) -> Result<(), StoreError> {
        self.trees
            .audit_checkpoints
            .remove(sequence.to_be_bytes())?;
        Ok(())
    }

    pub(super) fn list_audit_checkpoints(
        &self,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<AuditCheckpoint>, StoreError> {
        self.trees
            .audit_checkpoints
            .range(from_sequence.to_be_bytes()..)
            .take(limit)
            .map(|item| {
                let (_, bytes) = item?;
                decode("audit checkpoint", &bytes)
            })
            .collect()
    }
}

/// The records of the `audit` tree from sequence `start` on, in order: from the value at or
/// before `start` (a run may begin before it; its records before `start` are skipped), then
/// each value after it.
///
/// Record `N` is always read from the value with the greatest key at or below `N`, whatever the
/// sequence a reading starts from: a value that holds a record at or beyond the next value's
/// key (someone who can write the store added or moved one) is [`StoreError::Corrupt`], as is
/// a value whose first record is not its key's (`decode_audit`). So every reader, `audit verify`
/// with its pages among them, reads the same record for each sequence, or fails.
pub(super) struct StoredRecords {
    values: std::iter::Peekable<::sled::Iter>,
    pending: std::vec::IntoIter<AuditRecord>,
    start: u64,
    failed: bool,
}

impl Iterator for StoredRecords {
    type Item = Result<AuditRecord, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed {
                return None;
            }
            if let Some(record) = self.pending.next() {
                if record.sequence >= self.start {
                    return Some(Ok(record));
                }
                continue;
            }
            let records = self
                .values
                .next()?
                .map_err(StoreError::from)
                .and_then(|(key, value)| {
                    let records = decode_audit(&key, &value)?;
                    // An error of the next value's is its own, reported when it is read.
                    if let Some(Ok((next, _))) = self.values.peek() {
                        let next = audit_sequence(next)?;
                        if let Some(last) = records.last().filter(|r| r.sequence >= next) {
                            return Err(StoreError::Corrupt {
                                what: "audit",
                                reason: format!(
                                    "records {} to {} (stored as one run) reach into the value \
                                     stored under {next}: one of the two was added or moved",
                                    audit_sequence(&key)?,
                                    last.sequence
                                ),
                            });
                        }
                    }
                    Ok(records)
                });
            match records {
                Ok(records) => self.pending = records.into_iter(),
                Err(error) => {
                    self.failed = true;
                    return Some(Err(error));
                }
            }
        }
    }
}

// === the `audit` tree of a stopped server (forensics and tests: `sigil_server::store_records`) ===

/// The key of the value of `tree` (an `audit` tree) that holds record `sequence`, and that
/// value's records; `None` if no value holds it.
pub(crate) fn audit_value_holding(
    tree: &::sled::Tree,
    sequence: u64,
) -> Result<Option<(u64, Vec<AuditRecord>)>, StoreError> {
    Ok(audit_value_at_or_before(tree, sequence)?
        .filter(|(_, records)| records.iter().any(|record| record.sequence == sequence)))
}

/// Stores `records` (consecutive, as sealed) as one run under `key`, or removes the value
/// under `key` if there are none.
pub(crate) fn store_audit_value(
    tree: &::sled::Tree,
    key: u64,
    records: &[AuditRecord],
) -> Result<(), StoreError> {
    if records.is_empty() {
        tree.remove(key.to_be_bytes())?;
    } else {
        tree.insert(key.to_be_bytes(), record::encode_audit_run(records)?)?;
    }
    Ok(())
}

/// Removes the records from `sequence` on from `tree` (an `audit` tree).
pub(crate) fn truncate_audit(tree: &::sled::Tree, sequence: u64) -> Result<(), StoreError> {
    if let Some((key, mut records)) = audit_value_at_or_before(tree, sequence)?
        && records.iter().any(|record| record.sequence >= sequence)
    {
        records.retain(|record| record.sequence < sequence);
        store_audit_value(tree, key, &records)?;
    }
    for item in tree.range(sequence.to_be_bytes()..) {
        let (key, _) = item?;
        tree.remove(key)?;
    }
    Ok(())
}

// === helpers ===

/// The key of the value of `tree` (an `audit` tree) with the greatest key at or below
/// `sequence`, the one that holds record `sequence` if any does, and its records.
fn audit_value_at_or_before(
    tree: &::sled::Tree,
    sequence: u64,
) -> Result<Option<(u64, Vec<AuditRecord>)>, StoreError> {
    let Some(item) = tree.range(..=sequence.to_be_bytes()).next_back() else {
        return Ok(None);
    };
    let (key, value) = item?;
    Ok(Some((audit_sequence(&key)?, decode_audit(&key, &value)?)))
}

/// The `audit_sources` key of a source: its SPIFFE ID, `0x00`, its spool id.
fn source_key(source: &AuditSource) -> Vec<u8> {
    let mut key = Vec::with_capacity(source.spiffe_id.len() + 1 + source.spool_id.len());
    key.extend_from_slice(source.spiffe_id.as_bytes());
    key.push(0);
    key.extend_from_slice(source.spool_id.as_bytes());
    key
}

fn source_sequence(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: "audit source",
            reason: format!("last sequence of {} bytes", bytes.len()),
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

/// Decodes the records of a value of the `audit` tree, naming its key's sequence when they
/// cannot be decoded; a value whose first record is not its key's is corrupt.
fn decode_audit(key: &[u8], value: &[u8]) -> Result<Vec<AuditRecord>, StoreError> {
    let sequence = audit_sequence(key)?;
    let named = |reason: &dyn std::fmt::Display| StoreError::Corrupt {
        what: "audit",
        reason: format!("record {sequence} (or the run of records it begins): {reason}"),
    };
    let records = record::decode_audit_value(value).map_err(|error| match error {
        StoreError::Corrupt { reason, .. } => named(&reason),
        error => error,
    })?;
    match records.first() {
        Some(first) if first.sequence != sequence => Err(named(&format_args!(
            "stored under this sequence, it begins with record {}",
            first.sequence
        ))),
        _ => Ok(records),
    }
}
