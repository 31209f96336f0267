//! Verification of a chain and its checkpoints: pure functions of the records, the
//! checkpoints and the trusted key.

use std::collections::VecDeque;
use std::fmt;
use std::time::SystemTime;

use super::{AuditCheckpoint, AuditHead, AuditRecord, EncodeError, GENESIS_HASH, key_fingerprint};

/// What verification found wrong, and where: the first bad record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Violation {
    /// The sequence of the first bad record (for a checkpoint problem: the record the
    /// checkpoint covers; 0 for the genesis checkpoint).
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
    /// The record belongs to another chain.
    #[error("it belongs to chain {found:?}, not to this one (records of two chains were mixed)")]
    WrongChain {
        /// The record's chain id.
        found: String,
    },
    /// The log has records but no signed checkpoint at all, not even the genesis one that a
    /// server signs before it serves.
    #[error(
        "the log has records but no signed checkpoint, not even the genesis one: checkpoints \
         were deleted, or the records were not written by this server"
    )]
    NoCheckpoint,
    /// A checkpoint names another chain.
    #[error("the checkpoint covering it is of chain {found:?}, not of this one")]
    CheckpointWrongChain {
        /// The checkpoint's chain id.
        found: String,
    },
    /// The log ends before the record a signed checkpoint covers.
    #[error(
        "missing: the signed checkpoint covers records up to {checkpoint}, the log ends at {last}"
    )]
    Truncated {
        /// The sequence the checkpoint covers.
        checkpoint: u64,
        /// The last record present.
        last: u64,
    },
    /// Another server's chain cannot be checked against the key it is pinned to.
    #[error("{problem}")]
    Unpinned {
        /// What is wrong.
        problem: String,
    },
    /// The store's chain head names records the log does not hold.
    #[error("missing: the chain head says the log goes up to record {head}, it ends at {last}")]
    HeadBeyondLog {
        /// The head's sequence.
        head: u64,
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
        "the checkpoint covering it is signed by key {fingerprint}, not by the key the chain must \
         be signed by (this server's audit key, or the key another server's chain is pinned to): \
         the checkpoint was forged, or the audit key was replaced"
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
    /// The latest checkpoint checked, if any.
    pub checkpoint: Option<CheckpointSummary>,
    /// How many checkpoints were checked.
    pub checkpoints: u64,
    /// Records after the latest checkpoint: protected by the chain only (see the module docs).
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
    chain_id: String,
    /// The keys a checkpoint may be signed by (one for this server's own chain).
    trusted_keys: Vec<Vec<u8>>,
    next: u64,
    prev_hash: [u8; 32],
    prev_time: Option<SystemTime>,
    checked: u64,
    /// Checkpoints not reached yet, by ascending sequence, each with what is wrong with the
    /// checkpoint itself (checked once, reported at its record).
    pending: VecDeque<(AuditCheckpoint, Option<ViolationKind>)>,
    /// The latest checkpoint that matched the chain, and how many did.
    latest: Option<AuditCheckpoint>,
    matched: u64,
    /// Whether a chain with records must have a checkpoint (not when resuming from one).
    require_checkpoint: bool,
}

// === impl Violation ===

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {}: {}", self.sequence, self.kind)
    }
}

// === impl ChainVerifier ===

impl ChainVerifier {
    /// Verifies chain `chain_id` from record 1 against `checkpoints` (in any order; every one
    /// must be of this chain, signed by `trusted_key`, an uncompressed SEC 1 P-256 public key,
    /// and match the chain).
    pub(crate) fn new(
        chain_id: &str,
        checkpoints: Vec<AuditCheckpoint>,
        trusted_key: &[u8],
    ) -> Self {
        Self::with_keys(chain_id, checkpoints, vec![trusted_key.to_vec()])
    }

    /// As [`ChainVerifier::new`], each checkpoint signed by any of `trusted_keys` (another
    /// server's chain whose key was pinned again after a replacement).
    pub(crate) fn with_keys(
        chain_id: &str,
        mut checkpoints: Vec<AuditCheckpoint>,
        trusted_keys: Vec<Vec<u8>>,
    ) -> Self {
        checkpoints.sort_by_key(|cp| cp.sequence);
        let mut verifier = Self {
            chain_id: chain_id.to_owned(),
            trusted_keys,
            next: 1,
            prev_hash: GENESIS_HASH,
            prev_time: None,
            checked: 0,
            pending: VecDeque::with_capacity(checkpoints.len()),
            latest: None,
            matched: 0,
            require_checkpoint: true,
        };
        for cp in checkpoints {
            verifier.add_checkpoint(cp);
        }
        verifier
    }

    /// Adds a checkpoint to check, before the walk reaches the record it covers (one for a
    /// record already pushed is reported as a mismatch).
    pub(crate) fn add_checkpoint(&mut self, cp: AuditCheckpoint) {
        let problem = if cp.chain_id != self.chain_id {
            Some(ViolationKind::CheckpointWrongChain {
                found: cp.chain_id.clone(),
            })
        } else if !self.trusted_keys.contains(&cp.public_key) {
            Some(ViolationKind::CheckpointUntrustedKey {
                fingerprint: cp.key_fingerprint(),
            })
        } else if !cp.signature_is_valid() {
            Some(ViolationKind::CheckpointSignatureInvalid)
        } else {
            None
        };
        let at = self
            .pending
            .partition_point(|(pending, _)| pending.sequence <= cp.sequence);
        self.pending.insert(at, (cp, problem));
    }

    /// Verifies the records of chain `head.chain_id` after `head` (a point already known
    /// good), without checkpoints.
    pub(crate) fn resume(head: AuditHead) -> Self {
        Self {
            chain_id: head.chain_id,
            trusted_keys: Vec::new(),
            next: head.sequence.saturating_add(1),
            prev_hash: head.hash,
            prev_time: Some(head.time),
            checked: 0,
            pending: VecDeque::new(),
            latest: None,
            matched: 0,
            require_checkpoint: false,
        }
    }

    /// Checks the checkpoints that cover the last record pushed (the genesis ones before the
    /// first record).
    fn settle(&mut self) -> Result<(), Violation> {
        let last = self.next - 1;
        while self
            .pending
            .front()
            .is_some_and(|(cp, _)| cp.sequence <= last)
        {
            let Some((cp, problem)) = self.pending.pop_front() else {
                break;
            };
            let at = |kind| Violation {
                sequence: cp.sequence,
                kind,
            };
            if let Some(problem) = problem {
                return Err(at(problem));
            }
            if cp.sequence != last || cp.hash != self.prev_hash {
                return Err(at(ViolationKind::CheckpointMismatch));
            }
            self.matched += 1;
            self.latest = Some(cp);
        }
        Ok(())
    }

    /// Checks the next record.
    ///
    /// # Errors
    ///
    /// The [`Violation`] this record is (or reveals); stop at the first.
    pub(crate) fn push(&mut self, record: &AuditRecord) -> Result<(), Violation> {
        self.settle()?;
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
        if record.chain_id != self.chain_id {
            return Err(at(ViolationKind::WrongChain {
                found: record.chain_id.clone(),
            }));
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
        self.next += 1;
        self.prev_hash = hash;
        self.prev_time = Some(record.time);
        self.checked += 1;
        self.settle()
    }

    /// Ends the walk: checks that every checkpoint was reached (the log was not truncated),
    /// from record 1 that a chain with records has one, and that the walk reached `head`, the
    /// last sequence the store's chain head names.
    ///
    /// # Errors
    ///
    /// A checkpoint beyond the last record, a bad checkpoint, no checkpoint at all, or a head
    /// beyond the last record.
    pub(crate) fn finish_at(self, head: u64) -> Result<VerifySummary, Violation> {
        self.finish().and_then(|summary| {
            let last = summary.head.as_ref().map_or(0, |h| h.sequence);
            // The store's head names records the walk did not find.
            if last < head {
                return Err(Violation {
                    sequence: last + 1,
                    kind: ViolationKind::HeadBeyondLog { head, last },
                });
            }
            Ok(summary)
        })
    }

    /// Ends the walk as [`ChainVerifier::finish_at`] does, without a head to reach.
    ///
    /// # Errors
    ///
    /// A checkpoint beyond the last record, a bad checkpoint, or no checkpoint at all.
    pub(crate) fn finish(mut self) -> Result<VerifySummary, Violation> {
        self.settle()?;
        let last = self.next - 1;
        if let Some((cp, Some(problem))) = self.pending.iter().find(|(_, p)| p.is_some()) {
            return Err(Violation {
                sequence: cp.sequence,
                kind: problem.clone(),
            });
        }
        if let Some((cp, _)) = self.pending.back() {
            return Err(Violation {
                sequence: last + 1,
                kind: ViolationKind::Truncated {
                    checkpoint: cp.sequence,
                    last,
                },
            });
        }
        if self.require_checkpoint && last > 0 && self.latest.is_none() {
            return Err(Violation {
                sequence: 1,
                kind: ViolationKind::NoCheckpoint,
            });
        }
        let head = (last > 0).then(|| AuditHead {
            chain_id: self.chain_id.clone(),
            sequence: last,
            hash: self.prev_hash,
            time: self.prev_time.unwrap_or(SystemTime::UNIX_EPOCH),
        });
        let signed_up_to = self.latest.as_ref().map_or(0, |cp| cp.sequence);
        Ok(VerifySummary {
            records: self.checked,
            head,
            checkpoints: self.matched,
            unsigned_records: last.saturating_sub(signed_up_to),
            checkpoint: self.latest.map(|cp| CheckpointSummary {
                sequence: cp.sequence,
                hash: cp.hash,
                time: cp.time,
                key_fingerprint: key_fingerprint(&cp.public_key),
                key_id: cp.key_id,
            }),
        })
    }
}

#[cfg(test)]
/// Verifies a whole chain of [`DEFAULT_CHAIN_ID`](super::DEFAULT_CHAIN_ID), from record 1,
/// against `checkpoints`, which must be signed by `trusted_key`.
///
/// # Errors
///
/// The first bad record (see [`ChainVerifier`]).
pub(crate) fn verify<I>(
    records: I,
    checkpoints: &[AuditCheckpoint],
    trusted_key: &[u8],
) -> Result<VerifySummary, Violation>
where
    I: IntoIterator,
    I::Item: std::borrow::Borrow<AuditRecord>,
{
    let mut verifier =
        ChainVerifier::new(super::DEFAULT_CHAIN_ID, checkpoints.to_vec(), trusted_key);
    for record in records {
        verifier.push(std::borrow::Borrow::borrow(&record))?;
    }
    verifier.finish()
}

#[cfg(test)]
/// Verifies the links and hashes of a chain of [`DEFAULT_CHAIN_ID`](super::DEFAULT_CHAIN_ID)
/// from record 1, without checkpoints (what a store's own tests check).
///
/// # Errors
///
/// The first bad record.
pub(crate) fn verify_links(records: &[AuditRecord]) -> Result<VerifySummary, Violation> {
    let mut verifier = ChainVerifier::resume(AuditHead {
        chain_id: super::DEFAULT_CHAIN_ID.to_owned(),
        sequence: 0,
        hash: GENESIS_HASH,
        time: SystemTime::UNIX_EPOCH,
    });
    for record in records {
        verifier.push(record)?;
    }
    verifier.finish()
}
