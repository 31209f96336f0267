//! The audit log: the hash chain, its head and its checkpoints (see the `sled` module docs for
//! how an append keeps the chain from forking).

use std::time::SystemTime;

use ::sled::Transactional;
use ::sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::entries::TxResult;
use super::{Inner, PageCollector, decode, decode_page_token, encode, transaction_error};
use crate::audit::{
    AuditCheckpoint, AuditFilter, AuditHead, AuditRecord, GENESIS_HASH, NewAuditRecord,
};
use crate::store::{Page, PageRequest, StoreError};

/// Key of the chain head in the `audit_head` tree.
const AUDIT_HEAD_KEY: &[u8] = b"head";
/// Audit records sealed per transaction by [`Store::append_audit`] (all share one flush).
///
/// [`Store::append_audit`]: crate::store::Store::append_audit
const AUDIT_CHUNK: usize = 1_000;

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
        if let Some(head) = head.as_ref().filter(|h| h.chain_id != self.audit_chain_id) {
            return Err(abort(StoreError::Corrupt {
                what: "audit head",
                reason: format!(
                    "the store holds audit chain {:?}, not {:?}",
                    head.chain_id, self.audit_chain_id
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
                .seal(&self.audit_chain_id, sequence, time, prev_hash)
                .map_err(|e| {
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
    }

    pub(super) fn list_audit(
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

// === helpers ===

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
