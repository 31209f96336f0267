//! The certificate revocation lists the server publishes: one per X.509 authority, re-signed
//! whenever the revoked serials or the authorities change, and every [`CRL_REFRESH`] so that
//! `nextUpdate` ([`CRL_VALIDITY`] after `thisUpdate`) never passes while the server runs.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

use crate::ca::{Ca, CaError, RevokedSerial, SignedCrl};
use crate::service::authority::BundleState;
use crate::store::{Store, StoreError};

/// How long a CRL is valid (`nextUpdate - thisUpdate`).
pub(crate) const CRL_VALIDITY: Duration = Duration::from_secs(3600);

/// How often the CRLs are re-signed when nothing changed.
pub(crate) const CRL_REFRESH: Duration = Duration::from_secs(20 * 60);

/// The CRLs at one moment; `generation` increases with every publication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CrlSet {
    /// Increases by one with every publication (0: nothing published yet).
    pub generation: u64,
    /// One per X.509 authority.
    pub crls: Vec<SignedCrl>,
}

/// Why the CRLs could not be published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CrlError {
    /// Reading or pruning the revoked serials failed.
    #[error("cannot read the revoked serials: {0}")]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error("cannot sign the crls: {0}")]
    Sign(#[from] CaError),
}

/// Signs and publishes the CRLs; cheap to share behind an `Arc`.
#[derive(Debug)]
pub(crate) struct CrlPublisher {
    ca: Arc<Ca>,
    store: Arc<dyn Store>,
    tx: watch::Sender<Arc<CrlSet>>,
    publishing: Mutex<()>,
}

// === impl CrlSet ===

impl CrlSet {
    /// The CRLs, DER.
    pub(crate) fn ders(&self) -> Vec<Vec<u8>> {
        self.crls.iter().map(|c| c.der.clone()).collect()
    }

    #[cfg(test)]
    /// True when some CRL lists a serial.
    pub(crate) fn lists_anything(&self) -> bool {
        self.crls.iter().any(|c| !c.revoked_serials.is_empty())
    }
}

// === impl CrlPublisher ===

impl CrlPublisher {
    /// A publisher with nothing published yet.
    pub(crate) fn new(ca: Arc<Ca>, store: Arc<dyn Store>) -> Self {
        let (tx, _) = watch::channel(Arc::new(CrlSet::default()));
        Self {
            ca,
            store,
            tx,
            publishing: Mutex::new(()),
        }
    }

    /// A receiver of every publication.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<CrlSet>> {
        self.tx.subscribe()
    }

    /// The CRLs published last.
    pub(crate) fn current(&self) -> Arc<CrlSet> {
        self.tx.borrow().clone()
    }

    /// Drops revocations of expired certificates, signs fresh CRLs and publishes them.
    ///
    /// The CRL number is the time in milliseconds since the Unix epoch, or one more than the
    /// last number the store handed out if the clock has not moved past it: it increases
    /// across restarts and clock steps ([`Store::next_crl_number`]).
    ///
    /// # Errors
    ///
    /// [`CrlError`]: the previous CRLs stay published.
    pub(crate) async fn publish(&self, now: SystemTime) -> Result<Arc<CrlSet>, CrlError> {
        let _guard = self.publishing.lock().await;
        self.store.prune_revocations(now).await?;
        let revoked: Vec<RevokedSerial> = self
            .store
            .list_revocations()
            .await?
            .into_iter()
            .map(|r| RevokedSerial {
                serial: r.serial,
                revoked_at: r.revoked_at,
                authority_id: r.authority_id,
                reason: r.reason,
            })
            .collect();
        let millis = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut numbers = std::collections::BTreeMap::new();
        for id in self.ca.x509_authority_ids() {
            let number = self.store.next_crl_number(&id, millis).await?;
            numbers.insert(id, number);
        }
        let crls = self
            .ca
            .sign_crls(&revoked, &numbers, millis, now, now + CRL_VALIDITY)?;
        let number = numbers.values().copied().max().unwrap_or(millis);
        let generation = self.tx.borrow().generation + 1;
        let set = Arc::new(CrlSet { generation, crls });
        self.tx.send_replace(set.clone());
        info!(
            crl_number = number,
            revoked = revoked.len(),
            "certificate revocation lists published"
        );
        Ok(set)
    }

    /// Re-publishes every [`CRL_REFRESH`] and whenever the bundle (the authorities) changes,
    /// until `shutdown` turns true.
    pub(crate) async fn run(
        self: Arc<Self>,
        mut bundle: watch::Receiver<Arc<BundleState>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut bundle_open = true;
        loop {
            tokio::select! {
                () = tokio::time::sleep(CRL_REFRESH) => {}
                changed = bundle.changed(), if bundle_open => {
                    if changed.is_err() {
                        bundle_open = false;
                        continue;
                    }
                }
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            if let Err(error) = self.publish(SystemTime::now()).await {
                warn!(%error, "cannot refresh the crls; the previous ones stay published");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use x509_parser::prelude::{FromDer, X509Certificate};
    use x509_parser::revocation_list::CertificateRevocationList;

    use super::*;
    use crate::service::testing::Fixture;
    use crate::store::Revocation;

    fn revocation(serial: &str, not_after: SystemTime) -> Revocation {
        Revocation {
            serial: serial.to_owned(),
            not_after,
            authority_id: None,
            revoked_at: SystemTime::now(),
            cause: "test".to_owned(),
            reason: crate::store::RevocationReason::Unspecified,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_crl_number_rises_across_a_restart_with_the_clock_stepped_back() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let before = fx.crls.publish(now).await.unwrap().crls[0].crl_number;
        // A new publisher on the same store (a restart) whose clock stepped back an hour.
        let restarted = CrlPublisher::new(fx.authority.ca().clone(), fx.store.clone());
        let after = restarted
            .publish(now - Duration::from_secs(3600))
            .await
            .unwrap()
            .crls[0]
            .crl_number;
        assert!(after > before, "{after} <= {before}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_publication_signs_every_revoked_serial_with_a_rising_number() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let updates = fx.crls.subscribe();
        let first = fx.crls.current();
        assert!(!first.lists_anything());
        fx.store
            .add_revocations(vec![
                revocation("0a0b", now + Duration::from_secs(600)),
                revocation("0c0d", now - Duration::from_secs(1)),
            ])
            .await
            .unwrap();
        let second = fx.crls.publish(now).await.unwrap();
        assert_eq!(second.generation, first.generation + 1);
        assert!(updates.has_changed().unwrap());
        assert_eq!(second.crls.len(), 1, "one CRL per X.509 authority");
        let crl = &second.crls[0];
        // The expired certificate's revocation is pruned; the live one is listed.
        assert_eq!(crl.revoked_serials, ["0a0b"]);
        assert!(crl.crl_number > first.crls[0].crl_number);
        assert_eq!(crl.next_update, crl.this_update + CRL_VALIDITY);
        // The DER is a CRL issued by the authority in the bundle.
        let (_, parsed) = CertificateRevocationList::from_der(&crl.der).unwrap();
        let bundle = fx.authority.bundle();
        let (_, issuer) = X509Certificate::from_der(bundle.x509.authorities()[0].as_ref()).unwrap();
        assert_eq!(parsed.issuer(), issuer.subject());
        let listed: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| sigil_core::hex::encode(r.raw_serial()))
            .collect();
        assert_eq!(listed, ["0a0b"]);
        // Published again at the same instant: the number still rises.
        let third = fx.crls.publish(now).await.unwrap();
        assert!(third.crls[0].crl_number > crl.crl_number);
    }
}
