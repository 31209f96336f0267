//! Verification of the chain and its latest checkpoint: pure functions of the records, the
//! checkpoint and the trusted key.

use std::fmt;
use std::time::SystemTime;

use super::{AuditCheckpoint, AuditHead, AuditRecord, EncodeError, GENESIS_HASH, key_fingerprint};

/// What verification found wrong, and where: the first bad record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Violation {
    /// The sequence of the first bad record (for a checkpoint problem: the record the
    /// checkpoint covers).
    pub sequence: u64,
    /// What is wrong with it.
    pub kind: ViolationKind,
}

/// What is wrong with a record or the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ViolationKind {
    /// The record is not where it belongs: another record is in its place (records were
    /// removed or reordered).
    #[error("missing: record {found} is in its place (records were removed or reordered)")]
    Missing {
        /// The sequence of the record found instead.
        found: u64,
    },
    /// A record with an earlier sequence appears again (records were duplicated or reordered).
    #[error(
        "record {found} appears where this record belongs (records were duplicated or reordered)"
    )]
    OutOfOrder {
        /// The sequence of the record found instead.
        found: u64,
    },
    /// The record's hash is not the hash of its contents: the record was altered.
    #[error("its hash does not match its contents: the record was altered")]
    HashMismatch,
    /// The record's `prev_hash` is not the previous record's hash.
    #[error(
        "its prev_hash does not match the previous record's hash: this record or the one \
         before it was altered, or records were removed"
    )]
    BrokenLink,
    /// The record's time is before the previous record's.
    #[error("its time is before the previous record's: the record was altered")]
    TimeWentBack,
    /// The record has no canonical encoding.
    #[error("it cannot be encoded: {0}")]
    Unencodable(EncodeError),
    /// The log ends before the record the latest checkpoint covers.
    #[error(
        "missing: the signed checkpoint covers records up to {checkpoint}, the log ends at {last}"
    )]
    Truncated {
        /// The sequence the checkpoint covers.
        checkpoint: u64,
        /// The last record present.
        last: u64,
    },
    /// The record the checkpoint covers has another hash than the checkpoint says.
    #[error(
        "its hash differs from the one the signed checkpoint records: this record or an \
         earlier one was altered, and the hashes after it recomputed"
    )]
    CheckpointMismatch,
    /// The checkpoint was signed by a key other than the trusted one.
    #[error(
        "the checkpoint covering it is signed by key {fingerprint}, not by the server's audit key \
         (the checkpoint was forged, or the audit key was replaced)"
    )]
    CheckpointUntrustedKey {
        /// SHA-256 of the checkpoint's public key, hex.
        fingerprint: String,
    },
    /// The checkpoint's signature does not verify.
    #[error(
        "the checkpoint covering it has an invalid signature (the checkpoint was forged or altered)"
    )]
    CheckpointSignatureInvalid,
}

/// What a successful verification checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VerifySummary {
    /// How many records were checked.
    pub records: u64,
    /// The last record, if any.
    pub head: Option<AuditHead>,
    /// The latest checkpoint, if there is one (none yet on a log younger than one checkpoint
    /// interval).
    pub checkpoint: Option<CheckpointSummary>,
    /// Records after the checkpoint: protected by the chain only (see the module docs).
    pub unsigned_records: u64,
}

/// The checkpoint a verification checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckpointSummary {
    /// The record it covers.
    pub sequence: u64,
    /// That record's hash.
    pub hash: [u8; 32],
    /// When it was signed.
    pub time: SystemTime,
    /// The signing key's id.
    pub key_id: String,
    /// SHA-256 of the signing key's public key, hex.
    pub key_fingerprint: String,
}

/// Verifies a chain record by record, so that a long log need not sit in memory at once:
/// [`ChainVerifier::push`] every record in sequence order, then [`ChainVerifier::finish`].
#[derive(Debug)]
pub(crate) struct ChainVerifier {
    next: u64,
    prev_hash: [u8; 32],
    prev_time: Option<SystemTime>,
    checked: u64,
    checkpoint: Option<AuditCheckpoint>,
    /// `Some` when the checkpoint itself is bad (checked once, reported at its record).
    checkpoint_problem: Option<ViolationKind>,
}

// === impl Violation ===

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {}: {}", self.sequence, self.kind)
    }
}

// === impl ChainVerifier ===

impl ChainVerifier {
    /// Verifies a chain from record 1, against `checkpoint` (the latest one, if any), which
    /// must be signed by `trusted_key` (an uncompressed SEC 1 P-256 public key).
    pub(crate) fn new(checkpoint: Option<AuditCheckpoint>, trusted_key: &[u8]) -> Self {
        let checkpoint_problem = checkpoint.as_ref().and_then(|cp| {
            if cp.public_key != trusted_key {
                Some(ViolationKind::CheckpointUntrustedKey {
                    fingerprint: cp.key_fingerprint(),
                })
            } else if !cp.signature_is_valid() {
                Some(ViolationKind::CheckpointSignatureInvalid)
            } else {
                None
            }
        });
        Self {
            next: 1,
            prev_hash: GENESIS_HASH,
            prev_time: None,
            checked: 0,
            checkpoint,
            checkpoint_problem,
        }
    }

    /// Verifies the records after `head` (a point already known good), without a checkpoint.
    pub(crate) fn resume(head: AuditHead) -> Self {
        Self {
            next: head.sequence.saturating_add(1),
            prev_hash: head.hash,
            prev_time: Some(head.time),
            checked: 0,
            checkpoint: None,
            checkpoint_problem: None,
        }
    }

    /// Checks the next record.
    ///
    /// # Errors
    ///
    /// The [`Violation`] this record is (or reveals); stop at the first.
    pub(crate) fn push(&mut self, record: &AuditRecord) -> Result<(), Violation> {
        let at = |kind| Violation {
            sequence: record.sequence,
            kind,
        };
        if record.sequence != self.next {
            let kind = if record.sequence > self.next {
                ViolationKind::Missing {
                    found: record.sequence,
                }
            } else {
                ViolationKind::OutOfOrder {
                    found: record.sequence,
                }
            };
            return Err(Violation {
                sequence: self.next,
                kind,
            });
        }
        let hash = record
            .compute_hash()
            .map_err(|e| at(ViolationKind::Unencodable(e)))?;
        if hash != record.hash {
            return Err(at(ViolationKind::HashMismatch));
        }
        if record.prev_hash != self.prev_hash {
            return Err(at(ViolationKind::BrokenLink));
        }
        if self.prev_time.is_some_and(|prev| record.time < prev) {
            return Err(at(ViolationKind::TimeWentBack));
        }
        if let Some(cp) = &self.checkpoint
            && cp.sequence == record.sequence
        {
            if let Some(problem) = self.checkpoint_problem.clone() {
                return Err(at(problem));
            }
            if cp.hash != hash {
                return Err(at(ViolationKind::CheckpointMismatch));
            }
        }
        self.next += 1;
        self.prev_hash = hash;
        self.prev_time = Some(record.time);
        self.checked += 1;
        Ok(())
    }

    /// Ends the walk: checks that the checkpoint was reached (the log was not truncated) and
    /// is sound.
    ///
    /// # Errors
    ///
    /// A checkpoint beyond the last record, or a bad checkpoint.
    pub(crate) fn finish(self) -> Result<VerifySummary, Violation> {
        let last = self.next - 1;
        let head = (last > 0).then(|| AuditHead {
            sequence: last,
            hash: self.prev_hash,
            time: self.prev_time.unwrap_or(SystemTime::UNIX_EPOCH),
        });
        let Some(cp) = self.checkpoint else {
            return Ok(VerifySummary {
                records: self.checked,
                head,
                checkpoint: None,
                unsigned_records: self.checked,
            });
        };
        if let Some(problem) = self.checkpoint_problem {
            return Err(Violation {
                sequence: cp.sequence,
                kind: problem,
            });
        }
        if cp.sequence > last {
            return Err(Violation {
                sequence: last + 1,
                kind: ViolationKind::Truncated {
                    checkpoint: cp.sequence,
                    last,
                },
            });
        }
        Ok(VerifySummary {
            records: self.checked,
            head,
            unsigned_records: last - cp.sequence,
            checkpoint: Some(CheckpointSummary {
                sequence: cp.sequence,
                hash: cp.hash,
                time: cp.time,
                key_id: cp.key_id.clone(),
                key_fingerprint: key_fingerprint(&cp.public_key),
            }),
        })
    }
}

#[cfg(test)]
/// Verifies a whole chain, from record 1, against the latest checkpoint (if any), which must
/// be signed by `trusted_key`.
///
/// # Errors
///
/// The first bad record (see [`ChainVerifier`]).
pub(crate) fn verify<I>(
    records: I,
    checkpoint: Option<&AuditCheckpoint>,
    trusted_key: &[u8],
) -> Result<VerifySummary, Violation>
where
    I: IntoIterator,
    I::Item: std::borrow::Borrow<AuditRecord>,
{
    let mut verifier = ChainVerifier::new(checkpoint.cloned(), trusted_key);
    for record in records {
        verifier.push(std::borrow::Borrow::borrow(&record))?;
    }
    verifier.finish()
}
