//! The running audit log: the store's chain plus the server's signing key, the periodic
//! checkpoint task, and verification of what the store holds. The chain itself (records, their
//! canonical encoding, hashing, checkpoints, verification) is [`crate::audit`], which knows no
//! store.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::audit::{
    AUDIT_KEY_ID, AuditCheckpoint, AuditFilter, AuditRecord, ChainVerifier, EncodeError,
    NewAuditRecord, VerifySummary, Violation, ViolationKind, key_fingerprint,
};
use crate::ca::{CaKey, KeyError, KeyManager};
use crate::store::{MAX_PAGE_SIZE, PageRequest, Store, StoreError};

/// How often the server checkpoints the chain head, when it moved, by default.
pub(crate) const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// The audit log of a running server: appends go to the store; checkpoints are signed with the
/// server's audit key.
#[derive(Debug)]
pub(crate) struct AuditLog {
    store: Arc<dyn Store>,
    key: Arc<dyn CaKey>,
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
    /// The latest checkpoint was not signed by this server's audit key, so the chain cannot be
    /// continued from it.
    #[error(
        "refusing to sign an audit checkpoint: the latest checkpoint (record {sequence}) is not \
         signed by this server's audit key; run `sigil-server audit verify`"
    )]
    ForeignCheckpoint {
        /// The record the foreign checkpoint covers.
        sequence: u64,
    },
    /// A blocking key operation could not run.
    #[error("audit key task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

// === impl AuditLog ===

impl AuditLog {
    /// Uses `key` to sign checkpoints of the chain in `store`.
    pub(crate) fn new(store: Arc<dyn Store>, key: Arc<dyn CaKey>) -> Self {
        Self { store, key }
    }

    /// Loads the audit key [`AUDIT_KEY_ID`] from `keys`, creating it on first start.
    ///
    /// # Errors
    ///
    /// Any key manager failure other than a missing key.
    pub(crate) async fn open(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyManager>,
    ) -> Result<Self, AuditError> {
        let key = tokio::task::spawn_blocking(move || match keys.load_key(AUDIT_KEY_ID) {
            Err(KeyError::NotFound { .. }) => {
                info!(key_id = AUDIT_KEY_ID, "creating the audit signing key");
                keys.generate_key(AUDIT_KEY_ID)
            }
            other => other,
        })
        .await??;
        Ok(Self::new(store, key))
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
        self.store
            .append_audit(records)
            .await
            .map(drop)
            .map_err(|error| {
                error!(%error, "{failure}");
                error
            })
    }

    /// One page of the records that pass `filter`.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn list(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<crate::store::Page<AuditRecord>, StoreError> {
        self.store.list_audit(filter, page).await
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

    /// Signs and stores a checkpoint of the current chain head, unless the latest checkpoint
    /// already covers it (then `None`). The records since the latest checkpoint are verified
    /// first: a broken chain is never signed.
    ///
    /// # Errors
    ///
    /// [`AuditError::ChainBroken`] and [`AuditError::ForeignCheckpoint`] when the chain cannot
    /// be vouched for; store and key failures.
    pub(crate) async fn checkpoint(
        &self,
        now: SystemTime,
    ) -> Result<Option<AuditCheckpoint>, AuditError> {
        let Some(head) = self.store.audit_head().await? else {
            return Ok(None);
        };
        let latest = self.store.latest_audit_checkpoint().await?;
        let (mut verifier, start) = match &latest {
            None => (ChainVerifier::new(None, self.key.public_key()), 1),
            Some(cp) if cp.sequence == head.sequence && cp.hash == head.hash => return Ok(None),
            Some(cp) => {
                if cp.public_key != self.key.public_key() || !cp.signature_is_valid() {
                    return Err(AuditError::ForeignCheckpoint {
                        sequence: cp.sequence,
                    });
                }
                let anchor = self.anchor(cp).await?;
                (ChainVerifier::resume(anchor.head()), cp.sequence + 1)
            }
        };
        self.walk(&mut verifier, start, head.sequence)
            .await?
            .map_err(AuditError::ChainBroken)?;
        let summary = verifier.finish().map_err(AuditError::ChainBroken)?;
        let Some(verified) = summary.head else {
            return Ok(None);
        };
        let time = now.max(verified.time);
        let message = AuditCheckpoint::signed_message(verified.sequence, &verified.hash, time)?;
        let key = Arc::clone(&self.key);
        let signature = tokio::task::spawn_blocking(move || key.sign(&message)).await??;
        let checkpoint = AuditCheckpoint {
            sequence: verified.sequence,
            hash: verified.hash,
            time,
            key_id: self.key.id().to_owned(),
            public_key: self.key.public_key().to_vec(),
            signature,
        };
        self.store.save_audit_checkpoint(checkpoint.clone()).await?;
        Ok(Some(checkpoint))
    }

    /// Verifies the whole chain in the store against its latest checkpoint and this server's
    /// audit key. The outer error is a failure to read; the inner one names the first bad
    /// record.
    ///
    /// # Errors
    ///
    /// A store failure.
    pub(crate) async fn verify(&self) -> Result<Result<VerifySummary, Violation>, AuditError> {
        let checkpoint = self.store.latest_audit_checkpoint().await?;
        let mut verifier = ChainVerifier::new(checkpoint, self.key.public_key());
        if let Err(violation) = self.walk(&mut verifier, 1, u64::MAX).await? {
            return Ok(Err(violation));
        }
        Ok(verifier.finish())
    }

    /// The record a checkpoint covers, checked against it.
    async fn anchor(&self, cp: &AuditCheckpoint) -> Result<AuditRecord, AuditError> {
        let filter = AuditFilter {
            from_sequence: Some(cp.sequence),
            ..AuditFilter::default()
        };
        let page = self
            .store
            .list_audit(&filter, &PageRequest::first(1))
            .await?;
        let broken = |kind| {
            AuditError::ChainBroken(Violation {
                sequence: cp.sequence,
                kind,
            })
        };
        let Some(record) = page.items.into_iter().next() else {
            return Err(broken(ViolationKind::Truncated {
                checkpoint: cp.sequence,
                last: cp.sequence.saturating_sub(1),
            }));
        };
        if record.sequence != cp.sequence {
            return Err(broken(ViolationKind::Missing {
                found: record.sequence,
            }));
        }
        if record.compute_hash()? != record.hash {
            return Err(broken(ViolationKind::HashMismatch));
        }
        if record.hash != cp.hash {
            return Err(broken(ViolationKind::CheckpointMismatch));
        }
        Ok(record)
    }

    /// Pushes the records `start..=end` (those present) through `verifier`.
    async fn walk(
        &self,
        verifier: &mut ChainVerifier,
        start: u64,
        end: u64,
    ) -> Result<Result<(), Violation>, AuditError> {
        let filter = AuditFilter {
            from_sequence: Some(start),
            ..AuditFilter::default()
        };
        let mut page = PageRequest::first(MAX_PAGE_SIZE);
        loop {
            let listed = self.store.list_audit(&filter, &page).await?;
            for record in &listed.items {
                if record.sequence > end {
                    return Ok(Ok(()));
                }
                if let Err(violation) = verifier.push(record) {
                    return Ok(Err(violation));
                }
            }
            match listed.next_page_token {
                Some(token) => page = PageRequest::after(MAX_PAGE_SIZE, token),
                None => return Ok(Ok(())),
            }
        }
    }
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

    async fn audit_log(dir: &std::path::Path) -> (Arc<dyn Store>, Arc<dyn KeyManager>, AuditLog) {
        let store: Arc<dyn Store> =
            Arc::new(SledStore::open(dir.join("store"), SledStoreOptions::default()).unwrap());
        let keys: Arc<dyn KeyManager> = Arc::new(DiskKeyManager::new(dir.join("keys")).unwrap());
        let log = AuditLog::open(store.clone(), keys.clone()).await.unwrap();
        (store, keys, log)
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_server_checkpoints_only_a_moved_head_and_verifies_against_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let (store, keys, log) = audit_log(dir.path()).await;
        // The key is a 0600 file in the key directory, and survives a reopen.
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("keys").join("audit-signing.key"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let reopened = AuditLog::open(store.clone(), keys).await.unwrap();
        assert_eq!(reopened.public_key(), log.public_key());

        assert!(log.checkpoint(SystemTime::now()).await.unwrap().is_none());
        log.append(records(3)).await.unwrap();
        let first = log.checkpoint(SystemTime::now()).await.unwrap().unwrap();
        assert_eq!(first.sequence, 3);
        assert!(log.checkpoint(SystemTime::now()).await.unwrap().is_none());
        log.append(records(2)).await.unwrap();
        let second = log.checkpoint(SystemTime::now()).await.unwrap().unwrap();
        assert_eq!(second.sequence, 5);
        assert_eq!(store.latest_audit_checkpoint().await.unwrap(), Some(second));

        let summary = log.verify().await.unwrap().unwrap();
        assert_eq!(summary.records, 5);
        assert_eq!(summary.unsigned_records, 0);
        assert_eq!(
            summary.checkpoint.unwrap().key_fingerprint,
            log.key_fingerprint()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_server_refuses_to_continue_from_a_foreign_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, log) = audit_log(dir.path()).await;
        let sealed = log.append(records(2)).await.unwrap();
        store
            .save_audit_checkpoint(foreign_checkpoint(&sealed[1]))
            .await
            .unwrap();
        log.append(records(1)).await.unwrap();
        assert!(matches!(
            log.checkpoint(SystemTime::now()).await,
            Err(AuditError::ForeignCheckpoint { sequence: 2 })
        ));
        let v = log.verify().await.unwrap().unwrap_err();
        assert_eq!(v.sequence, 2);
        assert!(matches!(
            v.kind,
            ViolationKind::CheckpointUntrustedKey { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpoint_task_signs_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, log) = audit_log(dir.path()).await;
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
        verify(&listed.items, Some(&cp), log.public_key()).unwrap();
    }
}
