//! The running audit log: the store's chain plus the server's signing key, the periodic
//! checkpoint task, verification of what the store holds, and the guard against signing a
//! chain that lost or rewrote records. The chain itself (records, their canonical encoding,
//! hashing, checkpoints, verification) is [`crate::audit`], which knows no store.
//!
//! # Never signing over lost history
//!
//! A server signs a checkpoint only of a head that extends every checkpoint it knows it signed:
//!
//! - the last one it signed, remembered in a 0600 file beside the audit key ([`STATE_FILE`]),
//!   outside the store, so that rewriting or truncating the store is caught even when its
//!   checkpoints were rewritten too;
//! - the latest one in the store;
//! - those its agents present when they reconnect (agents are witnesses: each keeps the latest
//!   checkpoint it received and presents it on its next `SyncEntries` call), which catches a
//!   restore of the whole data directory, file included.
//!
//! When one of them is not extended the log has **diverged**: the server stops signing
//! checkpoints (it keeps serving, and appending records), its healthcheck fails and says why,
//! and signing resumes only when an operator acknowledges the divergence
//! ([`AuditLog::acknowledge`]), which appends an `audit.divergence` record naming the lost
//! range and the reason. The divergence is kept in the state file, so a restart does not
//! forget it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sigil_core::hex::encode as hex;
use sigil_core::time::{format_rfc3339, unix_seconds};
use tokio::sync::{Mutex, watch};
use tracing::{debug, error, info, warn};

use crate::audit::{
    AUDIT_KEY_ID, AuditCheckpoint, AuditFilter, AuditHead, AuditRecord, ChainVerifier, EncodeError,
    GENESIS_HASH, NewAuditRecord, VerifySummary, Violation, ViolationKind, action, key_fingerprint,
};
use crate::ca::{CaKey, KeyError, KeyManager};
use crate::service::metrics::AuditMetrics;
use crate::store::{MAX_PAGE_SIZE, PageRequest, Store, StoreError};

/// How often the server checkpoints the chain head, when it moved, by default.
pub(crate) const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// The name of the file, in the key directory beside the audit key, where the server keeps the
/// last checkpoint it signed and any divergence not yet acknowledged.
pub(crate) const STATE_FILE: &str = "audit-state.json";

/// The longest reason an operator may give when acknowledging a divergence.
pub(crate) const MAX_REASON_LEN: usize = 1024;

/// Checkpoints read from the store per page while verifying.
const CHECKPOINT_PAGE: usize = 1000;

/// The audit log of a running server: appends go to the store; checkpoints are signed with the
/// server's audit key.
#[derive(Debug)]
pub(crate) struct AuditLog {
    store: Arc<dyn Store>,
    key: Arc<dyn CaKey>,
    chain_id: String,
    state_path: PathBuf,
    /// What the state file holds; the lock also serializes signing, witnessing and
    /// acknowledging.
    state: Mutex<SavedState>,
    /// The divergence, if any, readable without the lock (the healthcheck).
    divergence: watch::Sender<Option<Arc<Divergence>>>,
    /// Why the last checkpoint attempt failed on a broken chain, if it did.
    blocked: watch::Sender<Option<String>>,
    /// The latest checkpoint signed (or found at start), for the agents' sync streams.
    latest: watch::Sender<Option<Arc<AuditCheckpoint>>>,
    metrics: AuditMetrics,
}

/// The state file: what must survive a restart and not live in the store.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedState {
    /// The last checkpoint this server signed.
    last_signed: Option<AuditCheckpoint>,
    /// Set while the log does not extend a checkpoint this server signed.
    divergence: Option<Divergence>,
    /// Checkpoints an operator acknowledged as lost: a witness presenting one of them, or one
    /// signed no later, is not a divergence again.
    #[serde(default)]
    acknowledged: Vec<AuditCheckpoint>,
}

/// The log does not extend a checkpoint this server signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Divergence {
    /// The checkpoint not extended; `None` when the log has records and no checkpoint at all.
    pub checkpoint: Option<AuditCheckpoint>,
    /// Who presented it: an agent's SPIFFE ID, `checkpoint file` or `store`.
    pub source: String,
    /// What is wrong, in words.
    pub problem: String,
    /// When the server noticed.
    pub detected_at: SystemTime,
}

/// Why an audit operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The store failed (or holds a record it cannot decode).
    #[error("audit store: {0}")]
    Store(#[from] StoreError),
    /// The audit key could not be loaded, created or used.
    #[error("audit key: {0}")]
    Key(#[from] KeyError),
    /// A checkpoint could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The records since the last checkpoint do not verify, so no checkpoint is signed over
    /// them.
    #[error("refusing to sign an audit checkpoint over a broken chain: {0}")]
    ChainBroken(Violation),
    /// The log does not extend a checkpoint this server signed: nothing is signed until an
    /// operator acknowledges it.
    #[error(
        "refusing to sign an audit checkpoint: the audit log diverged ({witness}: {problem}); \
         see `sigil-server audit verify`, then `sigil-server audit acknowledge`"
    )]
    Diverged {
        /// Who presented the checkpoint not extended.
        witness: String,
        /// What is wrong.
        problem: String,
    },
    /// An acknowledgement that does not fit the divergence.
    #[error("{0}")]
    Acknowledge(String),
    /// No checkpoint has been signed yet.
    #[error("no audit checkpoint has been signed yet")]
    NoCheckpoint,
    /// There is no divergence to acknowledge.
    #[error("the audit log has not diverged: there is nothing to acknowledge")]
    NotDiverged,
    /// The state file could not be read or written.
    #[error("audit state file {path}: {reason}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A blocking key operation could not run.
    #[error("audit key task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What an acknowledgement appended and signed.
#[derive(Debug, Clone)]
pub(crate) struct Acknowledged {
    /// The `audit.divergence` record.
    pub record: AuditRecord,
    /// The checkpoint signed over it.
    pub checkpoint: AuditCheckpoint,
}

// === impl AuditLog ===

impl AuditLog {
    /// Loads the audit key [`AUDIT_KEY_ID`] from `keys`, creating it on first start, and the
    /// state file at `state_path` (see [`STATE_FILE`]); records go to chain `chain_id`.
    ///
    /// # Errors
    ///
    /// Any key manager failure other than a missing key; a state file that cannot be read.
    pub(crate) async fn open(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyManager>,
        chain_id: &str,
        state_path: PathBuf,
    ) -> Result<Self, AuditError> {
        // A chain that has records was signed by a key: a missing key is never replaced
        // silently (the chain would no longer verify); only a first start creates one.
        let chain_started = store.audit_head().await?.is_some()
            || store
                .latest_audit_checkpoint()
                .await?
                .is_some_and(|cp| cp.chain_id == chain_id);
        let key = tokio::task::spawn_blocking(move || match keys.load_key(AUDIT_KEY_ID) {
            Err(KeyError::NotFound { id }) if chain_started => Err(KeyError::Token {
                reason: format!(
                    "the audit signing key {id} is missing but the audit chain has records signed by it: restore the key (it is not replaced)"
                ),
            }),
            Err(KeyError::NotFound { .. }) => {
                info!(key_id = AUDIT_KEY_ID, "creating the audit signing key");
                keys.generate_key(AUDIT_KEY_ID)
            }
            other => other,
        })
        .await??;
        let state = read_state(&state_path)?;
        let divergence = state.divergence.clone().map(Arc::new);
        // Only a checkpoint this server signed goes to the agents' witness files.
        let latest = store
            .latest_audit_checkpoint()
            .await?
            .filter(|cp| signed_by(cp, chain_id, key.public_key()))
            .map(Arc::new);
        Ok(Self {
            store,
            key,
            chain_id: chain_id.to_owned(),
            state_path,
            state: Mutex::new(state),
            divergence: watch::Sender::new(divergence),
            blocked: watch::Sender::new(None),
            latest: watch::Sender::new(latest),
            metrics: AuditMetrics::default(),
        })
    }

    /// The records this server appended.
    pub(crate) fn metrics(&self) -> &AuditMetrics {
        &self.metrics
    }

    /// Readies the log before the server serves: signs the genesis checkpoint of an empty
    /// chain, or a checkpoint of the head if it moved (checking, as always, that the head
    /// extends what this server signed). A divergence found here does not stop the server; it
    /// is logged and reported by the healthcheck.
    ///
    /// # Errors
    ///
    /// Store and key failures.
    pub(crate) async fn prepare(&self, now: SystemTime) -> Result<(), AuditError> {
        match self.checkpoint(now).await {
            Ok(Some(cp)) if cp.sequence == 0 => {
                info!(chain_id = %self.chain_id, "audit genesis checkpoint signed");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(
                error @ (AuditError::Diverged { .. }
                | AuditError::ChainBroken(_)
                | AuditError::Store(StoreError::Corrupt { .. })),
            ) => {
                error!(%error, "the audit log cannot be vouched for; the server serves but signs no audit checkpoint");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// The chain this server writes.
    pub(crate) fn chain_id(&self) -> &str {
        &self.chain_id
    }

    #[cfg(test)]
    /// `cp` re-signed by this server's key as it stands (for tests that need a genuine
    /// checkpoint of a history the log does not hold).
    pub(crate) fn resign(&self, mut cp: AuditCheckpoint) -> AuditCheckpoint {
        let message = AuditCheckpoint::signed_message(&cp.chain_id, cp.sequence, &cp.hash, cp.time)
            .expect("encodable");
        cp.signature = self.key.sign(&message).expect("signed");
        cp
    }

    #[cfg(test)]
    /// The public key checkpoints are signed with (uncompressed SEC 1 P-256).
    pub(crate) fn public_key(&self) -> &[u8] {
        self.key.public_key()
    }

    /// SHA-256 of the public key, hex: what operators pin.
    pub(crate) fn key_fingerprint(&self) -> String {
        key_fingerprint(self.key.public_key())
    }

    /// The latest stored checkpoint (the genesis one at least, once [`AuditLog::prepare`]
    /// ran).
    ///
    /// # Errors
    ///
    /// A store failure; [`AuditError::NoCheckpoint`] when there is none.
    pub(crate) async fn latest(&self) -> Result<AuditCheckpoint, AuditError> {
        self.store
            .latest_audit_checkpoint()
            .await?
            .ok_or(AuditError::NoCheckpoint)
    }

    /// The divergence not yet acknowledged, if any.
    pub(crate) fn divergence(&self) -> Option<Arc<Divergence>> {
        self.divergence.borrow().clone()
    }

    /// The divergence, and its changes (a sync stream that resumed turns to a snapshot when
    /// the log is found to have diverged).
    pub(crate) fn subscribe_divergence(&self) -> watch::Receiver<Option<Arc<Divergence>>> {
        self.divergence.subscribe()
    }

    /// The latest checkpoint, and its changes (for the agents' sync streams).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Arc<AuditCheckpoint>>> {
        self.latest.subscribe()
    }

    /// Appends the records of something about to be handed out or granted, and waits until
    /// they are durable. On failure, nothing they describe may be handed out: the caller
    /// fails closed. An empty batch appends nothing.
    ///
    /// # Errors
    ///
    /// The store's (logged here).
    pub(crate) async fn before_grant(
        &self,
        records: Vec<NewAuditRecord>,
    ) -> Result<(), StoreError> {
        self.append_logged(records, "audit append failed; nothing handed out")
            .await
    }

    /// Appends the records of a change already made (something taken away: a broken audit log
    /// never keeps a credential alive). On failure the caller tells its own caller that the
    /// change stands unaudited. An empty batch appends nothing.
    ///
    /// # Errors
    ///
    /// The store's (logged here).
    pub(crate) async fn after_change(
        &self,
        records: Vec<NewAuditRecord>,
    ) -> Result<(), StoreError> {
        self.append_logged(records, "audit append failed after a change was made")
            .await
    }

    async fn append_logged(
        &self,
        records: Vec<NewAuditRecord>,
        failure: &'static str,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let count = records.len() as u64;
        self.store
            .append_audit(records)
            .await
            .map(|_| {
                self.metrics.appended.inc_by(count);
            })
            .map_err(|error| {
                error!(%error, "{failure}");
                error
            })
    }

    /// One page of the records that pass `filter`, from every server's chain, by time.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn list(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<crate::store::Page<AuditRecord>, StoreError> {
        self.store.list_audit_merged(filter, page).await
    }

    #[cfg(test)]
    /// Appends `records` as one batch and returns them sealed, once they are durable.
    ///
    /// # Errors
    ///
    /// The store's error: the records may not be durable, so whatever they describe must not
    /// be handed out.
    pub(crate) async fn append(
        &self,
        records: Vec<NewAuditRecord>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.store.append_audit(records).await
    }

    /// Signs and stores a checkpoint of the current chain head (the genesis checkpoint of an
    /// empty chain), unless the latest checkpoint already covers it (then `None`). First it
    /// checks that the head extends the last checkpoint this server signed and the latest one
    /// stored, and verifies the records since the latest one: a broken or diverged chain is
    /// never signed.
    ///
    /// # Errors
    ///
    /// [`AuditError::Diverged`] (a latest stored checkpoint not signed by this server's key
    /// included) and [`AuditError::ChainBroken`] when the chain cannot be vouched for; store,
    /// key and state file failures.
    pub(crate) async fn checkpoint(
        &self,
        now: SystemTime,
    ) -> Result<Option<AuditCheckpoint>, AuditError> {
        let mut state = self.state.lock().await;
        let result = self.checkpoint_locked(&mut state, now).await;
        match &result {
            Ok(_) | Err(AuditError::Diverged { .. }) => self.set_blocked(None),
            // A stored record that cannot be read as one (a value damaged or added by someone
            // who can write the store) is as broken as a record whose hash does not hold.
            Err(
                error
                @ (AuditError::ChainBroken(_) | AuditError::Store(StoreError::Corrupt { .. })),
            ) => {
                self.set_blocked(Some(format!(
                    "{error}; run `sigil-server audit verify` (a broken record cannot be \
                     acknowledged away: restore it)"
                )));
            }
            Err(_) => {}
        }
        result
    }

    async fn checkpoint_locked(
        &self,
        state: &mut SavedState,
        now: SystemTime,
    ) -> Result<Option<AuditCheckpoint>, AuditError> {
        if let Some(divergence) = &state.divergence {
            return Err(AuditError::Diverged {
                witness: divergence.source.clone(),
                problem: divergence.problem.clone(),
            });
        }
        let head = self.store.audit_head().await?;
        let latest = self.store.latest_audit_checkpoint().await?;
        // The head must extend what this server signed and what the store says was signed.
        let known = [
            (state.last_signed.clone(), "checkpoint file"),
            (latest.clone(), "store"),
        ];
        for (cp, source) in known {
            let Some(cp) = cp.filter(|cp| self.is_own(cp)) else {
                continue;
            };
            if let Some(problem) = self.not_extended(&cp).await? {
                return Err(self.diverge(state, Some(cp), source, problem, now).await);
            }
        }
        let from = match &latest {
            Some(cp) if !self.is_own(cp) => {
                let problem = format!(
                    "the latest stored checkpoint (record {}) is not signed by this server's \
                     audit key (fingerprint {}): it was planted, or the audit key was replaced",
                    cp.sequence,
                    self.key_fingerprint()
                );
                return Err(self.diverge(state, None, "store", problem, now).await);
            }
            Some(cp) if head.as_ref().map_or(0, |h| h.sequence) == cp.sequence => {
                return Ok(None);
            }
            Some(cp) => self.anchor_head(cp.sequence).await?,
            None => match (&head, &state.last_signed) {
                (None, _) => return self.sign(state, 0, GENESIS_HASH, now).await.map(Some),
                // The store lost its checkpoints; the file's, checked above, still vouches for
                // a prefix: the whole chain is verified.
                (Some(_), Some(cp)) if self.is_own(cp) => self.genesis_head(),
                (Some(head), _) => {
                    let problem = format!(
                        "the log holds records 1..={} but no signed checkpoint at all, and this \
                         server has no record of one: checkpoints were deleted, or the records \
                         were not written by this server",
                        head.sequence
                    );
                    return Err(self.diverge(state, None, "store", problem, now).await);
                }
            },
        };
        let end = head.as_ref().map_or(0, |h| h.sequence);
        let verified = self.verify_after(from, end).await?;
        self.sign(state, verified.sequence, verified.hash, now)
            .await
            .map(Some)
    }

    /// Verifies the records after `from` (a point known good) up to `end`, which the walk must
    /// reach; returns the head it reached.
    ///
    /// # Errors
    ///
    /// [`AuditError::ChainBroken`] at the first bad record, or when the store's head names
    /// records that are not there; store failures.
    async fn verify_after(&self, from: AuditHead, end: u64) -> Result<AuditHead, AuditError> {
        let mut verifier = ChainVerifier::resume(from.clone());
        self.walk(&mut verifier, from.sequence + 1, end, false)
            .await?
            .map_err(AuditError::ChainBroken)?;
        let reached = verifier
            .finish()
            .map_err(AuditError::ChainBroken)?
            .head
            .unwrap_or(from);
        if reached.sequence != end {
            return Err(AuditError::ChainBroken(Violation {
                sequence: reached.sequence + 1,
                kind: ViolationKind::HeadBeyondLog {
                    head: end,
                    last: reached.sequence,
                },
            }));
        }
        Ok(reached)
    }

    /// The head of the chain ending at record `sequence` (the empty chain's for 0), where a
    /// checkpoint anchors verification.
    ///
    /// # Errors
    ///
    /// [`AuditError::ChainBroken`] when the record is gone; store failures.
    async fn anchor_head(&self, sequence: u64) -> Result<AuditHead, AuditError> {
        if sequence == 0 {
            return Ok(self.genesis_head());
        }
        match self.record_at(sequence).await? {
            Some(record) => Ok(record.head()),
            None => Err(AuditError::ChainBroken(Violation {
                sequence,
                kind: ViolationKind::Truncated {
                    checkpoint: sequence,
                    last: sequence - 1,
                },
            })),
        }
    }

    /// Signs `(sequence, hash)` of this chain, stores the checkpoint, remembers it in the state
    /// file and publishes it.
    async fn sign(
        &self,
        state: &mut SavedState,
        sequence: u64,
        hash: [u8; 32],
        now: SystemTime,
    ) -> Result<AuditCheckpoint, AuditError> {
        let time = whole_seconds(now);
        let message = AuditCheckpoint::signed_message(&self.chain_id, sequence, &hash, time)?;
        let key = Arc::clone(&self.key);
        let signature = tokio::task::spawn_blocking(move || key.sign(&message)).await??;
        let checkpoint = AuditCheckpoint {
            chain_id: self.chain_id.clone(),
            sequence,
            hash,
            time,
            key_id: self.key.id().to_owned(),
            public_key: self.key.public_key().to_vec(),
            signature,
        };
        self.store.save_audit_checkpoint(checkpoint.clone()).await?;
        state.last_signed = Some(checkpoint.clone());
        self.save_state(state)?;
        self.latest.send_replace(Some(Arc::new(checkpoint.clone())));
        Ok(checkpoint)
    }

    /// Checks the checkpoints an agent presents (`source`: its SPIFFE ID): those of this chain,
    /// signed by this server's key and not acknowledged as lost, must be extended by the log.
    /// Others are ignored (an agent cannot forge a divergence). Returns the divergence found,
    /// if any.
    ///
    /// # Errors
    ///
    /// Store and state file failures.
    pub(crate) async fn witness(
        &self,
        source: &str,
        checkpoints: Vec<AuditCheckpoint>,
        now: SystemTime,
    ) -> Result<Option<Arc<Divergence>>, AuditError> {
        let mut state = self.state.lock().await;
        for cp in checkpoints {
            if cp.chain_id != self.chain_id {
                continue;
            }
            if !self.is_own(&cp) {
                warn!(%source, sequence = cp.sequence, "an agent presented an audit checkpoint not signed by this server's audit key; ignored");
                continue;
            }
            // A checkpoint signed no later than one acknowledged as lost is history the
            // operator accepted.
            if state.acknowledged.iter().any(|a| cp.time <= a.time) {
                continue;
            }
            // While diverged, only a later checkpoint matters: it widens the lost range, and
            // the operator must see it before acknowledging (the agent would drop it once it
            // receives the checkpoint signed after the acknowledgement).
            let later = state.divergence.as_ref().map(|d| {
                d.checkpoint
                    .as_ref()
                    .is_none_or(|held| (cp.time, cp.sequence) > (held.time, held.sequence))
            });
            if later == Some(false) {
                continue;
            }
            let Some(problem) = self.not_extended(&cp).await? else {
                continue;
            };
            if later == Some(true) {
                warn!(%source, sequence = cp.sequence, "a later checkpoint the audit log does not extend widens the divergence");
                state.divergence = None;
            }
            self.diverge(&mut state, Some(cp), source, problem, now)
                .await;
        }
        Ok(self.divergence())
    }

    /// Accepts the divergence about `checkpoint` (`None` when it names none): appends an
    /// `audit.divergence` record by `actor` naming the lost range and `reason`, forgets
    /// stored checkpoints the log no longer extends, and signs a checkpoint over the record.
    ///
    /// # Errors
    ///
    /// [`AuditError::Acknowledge`] when the log has not diverged, the checkpoint is not the
    /// one the divergence is about, or the reason is empty or too long; store, key and state
    /// file failures.
    pub(crate) async fn acknowledge(
        &self,
        actor: &str,
        checkpoint: Option<AuditCheckpoint>,
        reason: &str,
        now: SystemTime,
    ) -> Result<Acknowledged, AuditError> {
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > MAX_REASON_LEN {
            return Err(AuditError::Acknowledge(format!(
                "give a reason of 1 to {MAX_REASON_LEN} bytes: it is recorded in the audit log"
            )));
        }
        let mut state = self.state.lock().await;
        let Some(divergence) = state.divergence.clone() else {
            return Err(AuditError::NotDiverged);
        };
        if checkpoint != divergence.checkpoint {
            return Err(AuditError::Acknowledge(match &divergence.checkpoint {
                Some(cp) => format!(
                    "that is not the checkpoint the divergence is about (record {}, hash {}, \
                     signed {}); take it from `sigil-server audit verify --output json`",
                    cp.sequence,
                    hex(&cp.hash),
                    format_rfc3339(unix_seconds(cp.time))
                ),
                None => "the divergence names no checkpoint (the log has records and no \
                         checkpoint at all): acknowledge it without --checkpoint"
                    .to_owned(),
            }));
        }
        let head = self.store.audit_head().await?;
        let head_sequence = head.as_ref().map_or(0, |h| h.sequence);
        // The stored checkpoints the log no longer vouches for: not this server's, or not
        // extended. The latest of the others is where signing continues from.
        let mut forgotten = Vec::new();
        let mut anchor_sequence = 0;
        let mut from = 0;
        loop {
            let page = self
                .store
                .list_audit_checkpoints(from, CHECKPOINT_PAGE)
                .await?;
            let done = page.len() < CHECKPOINT_PAGE;
            for cp in page {
                from = cp.sequence.saturating_add(1);
                if self.is_own(&cp) && self.not_extended(&cp).await?.is_none() {
                    anchor_sequence = cp.sequence;
                } else {
                    forgotten.push(cp.sequence);
                }
            }
            if done {
                break;
            }
        }
        let (lost_from, lost_to) = match &divergence.checkpoint {
            Some(cp) => (
                anchor_sequence.min(cp.sequence.saturating_sub(1)) + 1,
                cp.sequence,
            ),
            None => (anchor_sequence + 1, head_sequence),
        };
        // The records after the anchor must verify: a broken record cannot be acknowledged
        // away.
        let verified_head = self
            .verify_after(self.anchor_head(anchor_sequence).await?, head_sequence)
            .await?;
        let mut record = NewAuditRecord::new(actor, action::AUDIT_DIVERGENCE, &self.chain_id)
            .detail("source", divergence.source.as_str())
            .detail("problem", divergence.problem.as_str())
            .time_detail("detected_at", divergence.detected_at)
            .detail("lost_from", lost_from)
            .detail("lost_to", lost_to)
            .detail("head_sequence", head_sequence)
            .detail("resumed_from_checkpoint", anchor_sequence)
            .detail("forgotten_checkpoints", forgotten.len())
            .detail("reason", reason);
        if let (Some(first), Some(last)) = (forgotten.first(), forgotten.last()) {
            record = record
                .detail("forgotten_from", *first)
                .detail("forgotten_to", *last);
        }
        if let Some(cp) = &divergence.checkpoint {
            record = record
                .detail("checkpoint_sequence", cp.sequence)
                .detail("checkpoint_hash", hex(&cp.hash))
                .time_detail("checkpoint_time", cp.time);
        }
        let sealed = self.store.append_audit(vec![record]).await?;
        let Some(record) = sealed.into_iter().next() else {
            return Err(AuditError::Acknowledge(
                "the store appended no record".to_owned(),
            ));
        };
        // The record names them: now they may go.
        for sequence in &forgotten {
            self.store.remove_audit_checkpoint(*sequence).await?;
        }
        // Records appended meanwhile (issuance does not wait for this lock) are verified too,
        // up to the divergence record.
        self.verify_after(verified_head, record.sequence).await?;
        // Signed directly (the state file's checkpoint may be the lost one), before the
        // divergence is cleared: a failure here leaves it for another try.
        let checkpoint = self
            .sign(&mut state, record.sequence, record.hash, now)
            .await?;
        if let Some(cp) = divergence.checkpoint.clone() {
            state.acknowledged.push(cp);
        }
        state.divergence = None;
        self.save_state(&state)?;
        self.divergence.send_replace(None);
        self.set_blocked(None);
        warn!(%actor, lost_from, lost_to, reason, "audit divergence acknowledged; signing resumes");
        Ok(Acknowledged { record, checkpoint })
    }

    /// Verifies the whole chain in the store against every stored checkpoint, `extra` (one
    /// kept elsewhere) if given, and this server's audit key. The outer error is a failure to
    /// read; the inner one names the first bad record.
    ///
    /// # Errors
    ///
    /// A store failure.
    pub(crate) async fn verify(
        &self,
        extra: Option<AuditCheckpoint>,
    ) -> Result<Result<VerifySummary, Violation>, AuditError> {
        // The server's own record of the last checkpoint it signed is checked too.
        let last_signed = self.state.lock().await.last_signed.clone();
        let checkpoints = extra
            .into_iter()
            .chain(last_signed.filter(|cp| self.is_own(cp)))
            .collect();
        let mut verifier = ChainVerifier::new(&self.chain_id, checkpoints, self.key.public_key());
        let head = self.store.audit_head().await?.map_or(0, |h| h.sequence);
        if let Err(violation) = self.walk(&mut verifier, 1, u64::MAX, true).await? {
            return Ok(Err(violation));
        }
        Ok(verifier.finish_at(head))
    }

    /// True when `cp` is of this chain and validly signed by this server's audit key.
    fn is_own(&self, cp: &AuditCheckpoint) -> bool {
        signed_by(cp, &self.chain_id, self.key.public_key())
    }

    /// What is wrong when the log does not hold `cp`'s record with `cp`'s hash; `None` when it
    /// does (the genesis checkpoint is held by every log).
    async fn not_extended(&self, cp: &AuditCheckpoint) -> Result<Option<String>, AuditError> {
        if cp.sequence == 0 {
            return Ok((cp.hash != GENESIS_HASH)
                .then(|| "a genesis checkpoint with a hash other than zeros".to_owned()));
        }
        let signed = format_rfc3339(unix_seconds(cp.time));
        let last = self.store.audit_head().await?.map_or(0, |h| h.sequence);
        if cp.sequence > last {
            return Ok(Some(format!(
                "the log ends at record {last}, but the checkpoint signed {signed} covers records \
                 up to {}: records were lost (an older copy of the data directory was restored, \
                 or the tail was truncated)",
                cp.sequence
            )));
        }
        Ok(match self.record_at(cp.sequence).await? {
            None => Some(format!("record {} is missing", cp.sequence)),
            Some(record) if record.hash != cp.hash => Some(format!(
                "record {} has hash {}, but the checkpoint signed {signed} says {}: records up to \
                 it were rewritten, or an older copy of the data directory was restored and \
                 written on",
                cp.sequence,
                hex(&record.hash),
                hex(&cp.hash)
            )),
            Some(_) => None,
        })
    }

    /// Records the divergence (unless one is recorded already), persists and publishes it,
    /// and returns the error to report.
    async fn diverge(
        &self,
        state: &mut SavedState,
        checkpoint: Option<AuditCheckpoint>,
        source: &str,
        problem: String,
        now: SystemTime,
    ) -> AuditError {
        if state.divergence.is_none() {
            error!(%source, %problem, "the audit log diverged from a checkpoint this server signed; no checkpoint is signed until an operator runs `sigil-server audit acknowledge`");
            let divergence = Divergence {
                checkpoint,
                source: source.to_owned(),
                problem,
                detected_at: now,
            };
            state.divergence = Some(divergence.clone());
            if let Err(error) = self.save_state(state) {
                error!(%error, "cannot record the audit divergence in the state file");
            }
            self.divergence.send_replace(Some(Arc::new(divergence)));
        }
        match &state.divergence {
            Some(d) => AuditError::Diverged {
                witness: d.source.clone(),
                problem: d.problem.clone(),
            },
            None => AuditError::Acknowledge("divergence lost".to_owned()),
        }
    }

    fn save_state(&self, state: &SavedState) -> Result<(), AuditError> {
        let bad = |reason: String| AuditError::StateFile {
            path: self.state_path.clone(),
            reason,
        };
        let json = serde_json::to_vec_pretty(state).map_err(|e| bad(e.to_string()))?;
        sigil_daemon::write_private(&self.state_path, &json).map_err(|e| bad(e.to_string()))
    }

    /// The head of the empty chain.
    fn genesis_head(&self) -> AuditHead {
        AuditHead {
            chain_id: self.chain_id.clone(),
            sequence: 0,
            hash: GENESIS_HASH,
            time: UNIX_EPOCH,
        }
    }

    /// Notes why signing is blocked (a broken chain), for the healthcheck; `None` clears it.
    fn set_blocked(&self, reason: Option<String>) {
        self.blocked.send_if_modified(|current| {
            let changed = *current != reason;
            *current = reason;
            changed
        });
    }

    /// Why the server cannot sign a checkpoint now, if it cannot: a divergence, or a chain
    /// that does not verify (for the healthcheck).
    pub(crate) fn signing_blocked(&self) -> Option<String> {
        if let Some(d) = self.divergence() {
            return Some(format!(
                "the audit log diverged from a checkpoint this server signed ({}: {}); no audit \
                 checkpoint is signed until an operator runs `sigil-server audit acknowledge`",
                d.source, d.problem
            ));
        }
        self.blocked.borrow().clone()
    }

    /// Record `sequence`, if present.
    async fn record_at(&self, sequence: u64) -> Result<Option<AuditRecord>, AuditError> {
        if sequence == 0 {
            return Ok(None);
        }
        let filter = AuditFilter {
            from_sequence: Some(sequence),
            ..AuditFilter::default()
        };
        let page = self
            .store
            .list_audit(&filter, &PageRequest::first(1))
            .await?;
        Ok(page.items.into_iter().find(|r| r.sequence == sequence))
    }

    /// Pushes the records `start..=end` (those present) through `verifier`, and with
    /// `checkpoints` every stored checkpoint as the walk reaches it (and the rest at the end).
    async fn walk(
        &self,
        verifier: &mut ChainVerifier,
        start: u64,
        end: u64,
        checkpoints: bool,
    ) -> Result<Result<(), Violation>, AuditError> {
        let mut stored = StoredCheckpoints {
            next: 0,
            done: !checkpoints,
        };
        let filter = AuditFilter {
            from_sequence: Some(start),
            ..AuditFilter::default()
        };
        let mut page = PageRequest::first(MAX_PAGE_SIZE);
        loop {
            let listed = self.store.list_audit(&filter, &page).await?;
            for record in &listed.items {
                if record.sequence > end {
                    stored
                        .load_through(&*self.store, verifier, u64::MAX)
                        .await?;
                    return Ok(Ok(()));
                }
                stored
                    .load_through(&*self.store, verifier, record.sequence)
                    .await?;
                if let Err(violation) = verifier.push(record) {
                    return Ok(Err(violation));
                }
            }
            match listed.next_page_token {
                Some(token) => page = PageRequest::after(MAX_PAGE_SIZE, token),
                None => {
                    stored
                        .load_through(&*self.store, verifier, u64::MAX)
                        .await?;
                    return Ok(Ok(()));
                }
            }
        }
    }
}

/// The stored checkpoints a verification has handed to its verifier so far.
struct StoredCheckpoints {
    /// The lowest sequence not read yet.
    next: u64,
    done: bool,
}

impl StoredCheckpoints {
    /// Hands `verifier` every stored checkpoint up to `sequence` not handed yet.
    async fn load_through(
        &mut self,
        store: &dyn Store,
        verifier: &mut ChainVerifier,
        sequence: u64,
    ) -> Result<(), AuditError> {
        while !self.done && self.next <= sequence {
            let page = store
                .list_audit_checkpoints(self.next, CHECKPOINT_PAGE)
                .await?;
            self.done = page.len() < CHECKPOINT_PAGE;
            for cp in page {
                self.next = cp.sequence.saturating_add(1);
                verifier.add_checkpoint(cp);
            }
        }
        Ok(())
    }
}

/// True when `cp` is of chain `chain_id` and validly signed by `public_key`.
fn signed_by(cp: &AuditCheckpoint, chain_id: &str, public_key: &[u8]) -> bool {
    cp.chain_id == chain_id && cp.public_key == public_key && cp.signature_is_valid()
}

/// Reads the state file; a missing one is an empty state.
fn read_state(path: &std::path::Path) -> Result<SavedState, AuditError> {
    let bad = |reason: String| AuditError::StateFile {
        path: path.to_owned(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            bad(format!(
                "{e}; the file is the server's own record of the last audit checkpoint it \
                 signed: restore it, or move it away to start without that record"
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SavedState::default()),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// `time` without its fraction of a second: checkpoints are signed at whole seconds, so that
/// their JSON form (RFC 3339) carries the signed time exactly.
fn whole_seconds(time: SystemTime) -> SystemTime {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(seconds)
}

/// Checkpoints `log` every `interval` when its head moved, until `stop` turns true, then
/// signs a last checkpoint (the shutdown checkpoint) and returns.
pub(crate) async fn run_checkpoints(
    log: Arc<AuditLog>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
        match log.checkpoint(SystemTime::now()).await {
            Ok(Some(cp)) => {
                failures = 0;
                debug!(sequence = cp.sequence, "audit checkpoint signed");
            }
            Ok(None) => failures = 0,
            Err(error) => {
                failures += 1;
                if failures <= 3 {
                    error!(%error, "audit checkpoint failed");
                } else {
                    debug!(%error, "audit checkpoint failed again");
                }
            }
        }
    }
    match log.checkpoint(SystemTime::now()).await {
        Ok(Some(cp)) => info!(
            sequence = cp.sequence,
            "audit checkpoint signed at shutdown"
        ),
        Ok(None) => debug!("audit log unchanged since its last checkpoint"),
        Err(error) => warn!(%error, "audit checkpoint at shutdown failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{action, verify};
    use crate::ca::DiskKeyManager;
    use crate::store::{SledStore, SledStoreOptions};

    struct Opened {
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyManager>,
        log: AuditLog,
    }

    /// The store in `path`, waiting (up to 10 s) for a store of the same directory this
    /// process just dropped to let go of sled's lock file.
    fn open_store(path: &std::path::Path) -> SledStore {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match SledStore::open(path, SledStoreOptions::default()) {
                Ok(store) => return store,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "cannot open the store: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    async fn open_in(dir: &std::path::Path) -> Opened {
        let store: Arc<dyn Store> = Arc::new(open_store(&dir.join("store")));
        let keys: Arc<dyn KeyManager> = Arc::new(DiskKeyManager::new(dir.join("keys")).unwrap());
        let log = AuditLog::open(
            store.clone(),
            keys.clone(),
            crate::audit::DEFAULT_CHAIN_ID,
            dir.join("keys").join(STATE_FILE),
        )
        .await
        .unwrap();
        log.prepare(SystemTime::now()).await.unwrap();
        Opened { store, keys, log }
    }

    fn records(n: usize) -> Vec<NewAuditRecord> {
        (0..n)
            .map(|i| NewAuditRecord::new("uid:0", action::ENTRY_DELETE, format!("e{i}")))
            .collect()
    }

    /// A checkpoint of `record` signed by a key that is not the server's.
    fn foreign_checkpoint(record: &AuditRecord) -> AuditCheckpoint {
        crate::audit::tests::checkpoint(&crate::audit::tests::key_pair(), record)
    }

    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        sigil_testkit::copy_dir(from, to).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_audit_key_is_never_replaced_once_the_chain_has_begun() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { store, log, .. } = open_in(dir.path()).await;
        log.before_grant(records(1)).await.unwrap();
        drop((store, log));
        std::fs::remove_file(dir.path().join("keys").join("audit-signing.key")).unwrap();
        let store: Arc<dyn Store> = Arc::new(open_store(&dir.path().join("store")));
        let keys: Arc<dyn KeyManager> =
            Arc::new(DiskKeyManager::new(dir.path().join("keys")).unwrap());
        let err = AuditLog::open(
            store,
            keys.clone(),
            crate::audit::DEFAULT_CHAIN_ID,
            dir.path().join("keys").join(STATE_FILE),
        )
        .await
        .err()
        .unwrap();
        assert!(err.to_string().contains("is not replaced"), "{err}");
        assert!(matches!(
            keys.load_key(AUDIT_KEY_ID),
            Err(KeyError::NotFound { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_log_is_signed_at_genesis_then_only_when_its_head_moved() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { store, keys, log } = open_in(dir.path()).await;
        // The key is a 0600 file in the key directory, and survives a reopen.
        let mode = |name: &str| {
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(dir.path().join("keys").join(name))
                    .unwrap()
                    .permissions(),
            ) & 0o777
        };
        assert_eq!(mode("audit-signing.key"), 0o600);
        // The genesis checkpoint, in the store and in the state file (0600 too).
        let genesis = store.latest_audit_checkpoint().await.unwrap().unwrap();
        assert_eq!((genesis.sequence, genesis.hash), (0, GENESIS_HASH));
        assert_eq!(mode(STATE_FILE), 0o600);
        assert_eq!(log.latest().await.unwrap(), genesis);
        let reopened = AuditLog::open(
            store.clone(),
            keys,
            crate::audit::DEFAULT_CHAIN_ID,
            dir.path().join("keys").join(STATE_FILE),
        )
        .await
        .unwrap();
        assert_eq!(reopened.public_key(), log.public_key());

        assert!(log.checkpoint(SystemTime::now()).await.unwrap().is_none());
        let mut published = log.subscribe();
        log.append(records(3)).await.unwrap();
        let first = log.checkpoint(SystemTime::now()).await.unwrap().unwrap();
        assert_eq!(first.sequence, 3);
        assert_eq!(first.time, whole_seconds(first.time));
        assert_eq!(published.borrow_and_update().as_deref(), Some(&first));
        assert!(log.checkpoint(SystemTime::now()).await.unwrap().is_none());
        log.append(records(2)).await.unwrap();
        let second = log.checkpoint(SystemTime::now()).await.unwrap().unwrap();
        assert_eq!(second.sequence, 5);
        assert_eq!(
            store.latest_audit_checkpoint().await.unwrap(),
            Some(second.clone())
        );

        let summary = log.verify(None).await.unwrap().unwrap();
        assert_eq!(summary.records, 5);
        assert_eq!(
            summary.checkpoints, 4,
            "genesis, 3 and 5 in the store, and 5 in the state file"
        );
        assert_eq!(summary.unsigned_records, 0);
        assert_eq!(
            summary.checkpoint.unwrap().key_fingerprint,
            log.key_fingerprint()
        );
        // A checkpoint kept elsewhere is checked too.
        let summary = log.verify(Some(first)).await.unwrap().unwrap();
        assert_eq!(summary.checkpoints, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_server_refuses_to_continue_from_a_foreign_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { store, log, .. } = open_in(dir.path()).await;
        let sealed = log.append(records(2)).await.unwrap();
        store
            .save_audit_checkpoint(foreign_checkpoint(&sealed[1]))
            .await
            .unwrap();
        log.append(records(1)).await.unwrap();
        assert!(matches!(
            log.checkpoint(SystemTime::now()).await,
            Err(AuditError::Diverged { .. })
        ));
        let divergence = log.divergence().unwrap();
        assert_eq!(
            (divergence.source.as_str(), divergence.checkpoint.as_ref()),
            ("store", None)
        );
        assert!(
            divergence.problem.contains("record 2"),
            "{}",
            divergence.problem
        );
        assert!(
            log.signing_blocked()
                .unwrap()
                .contains("not signed by this server")
        );
        let v = log.verify(None).await.unwrap().unwrap_err();
        assert_eq!(v.sequence, 2);
        assert!(matches!(
            v.kind,
            ViolationKind::CheckpointUntrustedKey { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restored_older_store_is_a_divergence_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let backup = tempfile::tempdir().unwrap();
        let later;
        {
            let Opened { log, .. } = open_in(dir.path()).await;
            log.append(records(3)).await.unwrap();
            log.checkpoint(SystemTime::now()).await.unwrap().unwrap();
            // The backup: the store only (the state file stays where it is).
            copy_dir(&dir.path().join("store"), backup.path());
            log.append(records(4)).await.unwrap();
            later = log.checkpoint(SystemTime::now()).await.unwrap().unwrap();
            assert_eq!(later.sequence, 7);
        }
        std::fs::remove_dir_all(dir.path().join("store")).unwrap();
        copy_dir(backup.path(), &dir.path().join("store"));

        // Opening the restored store: the state file remembers record 7; the store ends at 3.
        let Opened { store, log, .. } = open_in(dir.path()).await;
        let divergence = log.divergence().unwrap();
        assert_eq!(divergence.source, "checkpoint file");
        assert_eq!(divergence.checkpoint.as_ref(), Some(&later));
        assert!(
            divergence.problem.contains("ends at record 3"),
            "{}",
            divergence.problem
        );
        // New records are appended, but never signed.
        log.append(records(1)).await.unwrap();
        assert!(matches!(
            log.checkpoint(SystemTime::now()).await,
            Err(AuditError::Diverged { .. })
        ));
        // The chain is consistent in itself, but neither the state file's checkpoint nor the
        // one kept elsewhere is in it.
        for kept in [None, Some(later.clone())] {
            let v = log.verify(kept).await.unwrap().unwrap_err();
            assert_eq!(
                v.kind,
                ViolationKind::Truncated {
                    checkpoint: 7,
                    last: 4
                }
            );
        }
        let v = log.verify(Some(later.clone())).await.unwrap().unwrap_err();
        assert_eq!(
            v.kind,
            ViolationKind::Truncated {
                checkpoint: 7,
                last: 4
            }
        );
        // The divergence survives a restart.
        drop((store, log));
        let Opened { store, log, .. } = open_in(dir.path()).await;
        assert!(log.divergence().is_some());

        // Acknowledging: the wrong checkpoint, an empty reason, are refused.
        let sealed = store
            .list_audit(&AuditFilter::default(), &PageRequest::first(10))
            .await
            .unwrap()
            .items;
        let wrong = foreign_checkpoint(&sealed[0]);
        assert!(matches!(
            log.acknowledge("uid:0", Some(wrong), "restored", SystemTime::now())
                .await,
            Err(AuditError::Acknowledge(_))
        ));
        assert!(matches!(
            log.acknowledge("uid:0", Some(later.clone()), "  ", SystemTime::now())
                .await,
            Err(AuditError::Acknowledge(_))
        ));
        let done = log
            .acknowledge(
                "uid:0",
                Some(later.clone()),
                "disk failure, restored from backup",
                SystemTime::now(),
            )
            .await
            .unwrap();
        assert_eq!(done.record.action, action::AUDIT_DIVERGENCE);
        assert_eq!(done.record.sequence, 5);
        assert_eq!(
            done.record.details["lost_from"], 4,
            "after the checkpoint of record 3"
        );
        assert_eq!(done.record.details["lost_to"], 7);
        assert_eq!(done.record.details["checkpoint_sequence"], 7);
        assert_eq!(
            done.record.details["reason"],
            "disk failure, restored from backup"
        );
        assert_eq!(done.checkpoint.sequence, 5);
        assert!(log.divergence().is_none());
        // Signing resumed; a second acknowledgement has nothing to acknowledge.
        log.append(records(1)).await.unwrap();
        assert_eq!(
            log.checkpoint(SystemTime::now())
                .await
                .unwrap()
                .unwrap()
                .sequence,
            6
        );
        assert!(matches!(
            log.acknowledge("uid:0", Some(later.clone()), "again", SystemTime::now())
                .await,
            Err(AuditError::NotDiverged)
        ));
        // A witness presenting the acknowledged checkpoint is no divergence again.
        assert!(
            log.witness("spiffe://example.org/agent", vec![later], SystemTime::now())
                .await
                .unwrap()
                .is_none()
        );
        assert!(log.verify(None).await.unwrap().is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn witnesses_catch_what_the_server_forgot_and_cannot_forge_a_divergence() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { log, .. } = open_in(dir.path()).await;
        let sealed = log.append(records(3)).await.unwrap();
        let held = log.checkpoint(SystemTime::now()).await.unwrap().unwrap();
        let agent = "spiffe://example.org/sigil/agent/join_token/a";
        // What the log extends is fine; what another key signed, or another chain, is ignored.
        assert!(
            log.witness(agent, vec![held.clone()], SystemTime::now())
                .await
                .unwrap()
                .is_none()
        );
        let mut beyond = foreign_checkpoint(&sealed[2]);
        beyond.sequence = 99;
        let mut other_chain = held.clone();
        other_chain.chain_id = "server-b".into();
        other_chain.sequence = 99;
        let mut tampered = held.clone();
        tampered.sequence = 99;
        assert!(
            log.witness(
                agent,
                vec![beyond, other_chain, tampered],
                SystemTime::now()
            )
            .await
            .unwrap()
            .is_none()
        );
        assert!(log.checkpoint(SystemTime::now()).await.is_ok());

        // A whole data directory restored to before `held` (state file included): only the
        // witness knows.
        let fresh = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), fresh.path());
        drop(log);
        let restored_dir = tempfile::tempdir().unwrap();
        {
            // Build the "older copy": same key, a chain of 2 records.
            copy_dir(
                &fresh.path().join("keys"),
                &restored_dir.path().join("keys"),
            );
            std::fs::remove_file(restored_dir.path().join("keys").join(STATE_FILE)).unwrap();
            let Opened { log, .. } = open_in(restored_dir.path()).await;
            log.append(records(2)).await.unwrap();
            log.checkpoint(SystemTime::now()).await.unwrap();
        }
        let Opened { log, .. } = open_in(restored_dir.path()).await;
        assert!(log.divergence().is_none());
        let found = log
            .witness(agent, vec![held.clone()], SystemTime::now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.source, agent);
        assert!(
            found.problem.contains("ends at record 2"),
            "{}",
            found.problem
        );
        assert!(matches!(
            log.checkpoint(SystemTime::now()).await,
            Err(AuditError::Diverged { .. })
        ));
        // Another agent saw an even later checkpoint of the lost history: the divergence now
        // names that one (an older one changes nothing).
        let mut later = held.clone();
        later.sequence = 9;
        later.time += Duration::from_secs(60);
        later.signature = {
            let message = AuditCheckpoint::signed_message(
                &later.chain_id,
                later.sequence,
                &later.hash,
                later.time,
            )
            .unwrap();
            log.key.sign(&message).unwrap()
        };
        let other = "spiffe://example.org/sigil/agent/join_token/b";
        let widened = log
            .witness(other, vec![later.clone()], SystemTime::now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (widened.source.as_str(), widened.checkpoint.as_ref()),
            (other, Some(&later))
        );
        let kept = log
            .witness(agent, vec![held], SystemTime::now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kept.checkpoint.as_ref(), Some(&later));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rewritten_record_under_a_signed_checkpoint_is_never_signed_over() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { store, log, .. } = open_in(dir.path()).await;
        log.append(records(3)).await.unwrap();
        let cp = log.checkpoint(SystemTime::now()).await.unwrap().unwrap();
        drop((store, log));
        // Someone with write access rewrites the whole store's chain (records resealed, the
        // stored checkpoints deleted); only the state file remembers.
        std::fs::remove_dir_all(dir.path().join("store")).unwrap();
        let store: Arc<dyn Store> = Arc::new(open_store(&dir.path().join("store")));
        store
            .append_audit(vec![
                NewAuditRecord::new(
                    "uid:0",
                    action::ENTRY_DELETE,
                    "forged"
                );
                3
            ])
            .await
            .unwrap();
        drop(store);
        let Opened { log, .. } = open_in(dir.path()).await;
        let divergence = log.divergence().unwrap();
        assert_eq!(divergence.checkpoint, Some(cp));
        assert!(
            divergence.problem.contains("rewritten"),
            "{}",
            divergence.problem
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_planted_checkpoint_is_acknowledged_away_and_signing_resumes_from_the_last_good_one()
    {
        let dir = tempfile::tempdir().unwrap();
        let Opened { store, log, .. } = open_in(dir.path()).await;
        let sealed = log.append(records(2)).await.unwrap();
        let good = log.checkpoint(SystemTime::now()).await.unwrap().unwrap();
        log.append(records(2)).await.unwrap();
        store
            .save_audit_checkpoint(foreign_checkpoint(&sealed[1]))
            .await
            .unwrap();
        let mut planted = foreign_checkpoint(&sealed[1]);
        planted.sequence = 4;
        store.save_audit_checkpoint(planted).await.unwrap();
        assert!(matches!(
            log.checkpoint(SystemTime::now()).await,
            Err(AuditError::Diverged { .. })
        ));
        // The divergence names no checkpoint: acknowledged without one.
        assert!(matches!(
            log.acknowledge("uid:0", Some(good.clone()), "x", SystemTime::now())
                .await,
            Err(AuditError::Acknowledge(_))
        ));
        let done = log
            .acknowledge("uid:0", None, "planted by a test", SystemTime::now())
            .await
            .unwrap();
        // Both checkpoints at 2 and 4 were foreign (the one at 2 replaced the good one).
        assert_eq!(done.record.details["forgotten_checkpoints"], 2);
        assert_eq!(done.record.details["resumed_from_checkpoint"], 0);
        assert_eq!(done.record.details["lost_from"], 1);
        assert_eq!(done.checkpoint.sequence, 5);
        assert!(log.signing_blocked().is_none());
        assert!(log.verify(None).await.unwrap().is_ok());
        log.append(records(1)).await.unwrap();
        assert_eq!(
            log.checkpoint(SystemTime::now())
                .await
                .unwrap()
                .unwrap()
                .sequence,
            6
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_with_no_checkpoint_at_all_are_acknowledged_and_then_signed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let Opened { log, .. } = open_in(dir.path()).await;
            log.append(records(3)).await.unwrap();
        }
        // The stored checkpoints and the state file are gone.
        let store: Arc<dyn Store> = Arc::new(open_store(&dir.path().join("store")));
        store.remove_audit_checkpoint(0).await.unwrap();
        drop(store);
        std::fs::remove_file(dir.path().join("keys").join(STATE_FILE)).unwrap();
        let Opened { log, .. } = open_in(dir.path()).await;
        let divergence = log.divergence().unwrap();
        assert!(
            divergence.problem.contains("no signed checkpoint"),
            "{}",
            divergence.problem
        );
        assert!(log.verify(None).await.unwrap().is_err());
        let done = log
            .acknowledge("uid:0", None, "checkpoints lost", SystemTime::now())
            .await
            .unwrap();
        assert_eq!((done.record.sequence, done.checkpoint.sequence), (4, 4));
        assert!(log.divergence().is_none());
        assert!(log.verify(None).await.unwrap().is_ok());
    }

    /// The stopped store's sled database, as someone with write access to it would open it
    /// (sled may hold the lock file a moment after the store closed).
    fn open_raw(path: &std::path::Path) -> ::sled::Db {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match ::sled::Config::new().path(path).flush_every_ms(None).open() {
                Ok(db) => return db,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "cannot open the store: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_head_beyond_the_records_is_never_signed_nor_verified() {
        let dir = tempfile::tempdir().unwrap();
        {
            let Opened { log, .. } = open_in(dir.path()).await;
            log.append(records(3)).await.unwrap();
        }
        // Records 1..=3 removed; the head still says 3.
        {
            let db = open_raw(&dir.path().join("store"));
            let tree = db.open_tree("audit").unwrap();
            crate::store_records::truncate_audit(&tree, 1).unwrap();
            db.flush().unwrap();
        }
        let Opened { log, .. } = open_in(dir.path()).await;
        let Err(AuditError::ChainBroken(v)) = log.checkpoint(SystemTime::now()).await else {
            panic!("a head beyond the records must not be signed");
        };
        assert_eq!(v.kind, ViolationKind::HeadBeyondLog { head: 3, last: 0 });
        assert!(log.signing_blocked().is_some());
        let v = log.verify(None).await.unwrap().unwrap_err();
        assert_eq!(v.kind, ViolationKind::HeadBeyondLog { head: 3, last: 0 });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_chain_blocks_signing_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        {
            let Opened { log, .. } = open_in(dir.path()).await;
            log.append(records(3)).await.unwrap();
        }
        // Record 2 altered in the store, after the genesis checkpoint.
        {
            let db = open_raw(&dir.path().join("store"));
            let tree = db.open_tree("audit").unwrap();
            crate::store_records::edit_audit_record(&tree, 2, |record| {
                record["subject"] = serde_json::Value::from("altered");
            })
            .unwrap();
            db.flush().unwrap();
        }
        let Opened { log, .. } = open_in(dir.path()).await;
        assert!(log.divergence().is_none());
        let blocked = log.signing_blocked().unwrap();
        assert!(blocked.contains("record 2"), "{blocked}");
        assert!(matches!(
            log.checkpoint(SystemTime::now()).await,
            Err(AuditError::ChainBroken(_))
        ));
        // Nothing to acknowledge: a broken record is not a divergence.
        assert!(matches!(
            log.acknowledge("uid:0", None, "x", SystemTime::now()).await,
            Err(AuditError::NotDiverged)
        ));
    }

    /// A stored value that cannot be read as records (here a forged copy of records added
    /// under a key inside a run) blocks signing and shows in the health as a broken chain
    /// does; the server still starts (`prepare` succeeds) and serves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_audit_record_blocks_signing_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let sealed = {
            let Opened { log, .. } = open_in(dir.path()).await;
            log.append(records(4)).await.unwrap()
        };
        {
            let db = open_raw(&dir.path().join("store"));
            let tree = db.open_tree("audit").unwrap();
            let mut forged = sealed[2..].to_vec();
            forged[0].subject = "forged".to_owned();
            crate::store::sled::audit::store_audit_value(&tree, 3, &forged).unwrap();
            db.flush().unwrap();
        }
        let Opened { log, .. } = open_in(dir.path()).await;
        let blocked = log.signing_blocked().unwrap();
        assert!(
            blocked
                .contains("records 1 to 4 (stored as one run) reach into the value stored under 3"),
            "{blocked}"
        );
        assert!(matches!(
            log.checkpoint(SystemTime::now()).await,
            Err(AuditError::Store(StoreError::Corrupt { .. }))
        ));
        assert!(log.signing_blocked().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpoint_task_signs_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { store, log, .. } = open_in(dir.path()).await;
        let log = Arc::new(log);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run_checkpoints(
            log.clone(),
            Duration::from_secs(3600),
            stop_rx,
        ));
        log.append(records(4)).await.unwrap();
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let cp = store.latest_audit_checkpoint().await.unwrap().unwrap();
        assert_eq!(cp.sequence, 4);
        let listed = store
            .list_audit(&AuditFilter::default(), &PageRequest::first(10))
            .await
            .unwrap();
        verify(&listed.items, &[cp], log.public_key()).unwrap();
    }
}
