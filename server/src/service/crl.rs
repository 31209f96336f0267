//! The certificate revocation lists the server publishes: one per X.509 authority, re-signed
//! whenever the revoked serials or the authorities change, and every [`CRL_REFRESH`] so that
//! `nextUpdate` ([`CRL_VALIDITY`] after `thisUpdate`) never passes while the server runs.
//!
//! Servers sharing a store each sign the CRLs of their own authorities and save them in the
//! store; each serves its own and every other server's ([`CrlSet`]). Every
//! [`CRL_POLL_INTERVAL`] a server reads the store's [`CrlCounters`](crate::store::CrlCounters): when revocations were
//! added (through any server) it re-signs its own CRLs; when another server saved new ones it
//! takes them in. A revocation through one server therefore reaches the CRLs of every
//! server's authorities within about two poll intervals, as long as those servers run.

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

/// How often the store's CRL counters are read (other servers' revocations and CRLs).
pub(crate) const CRL_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The CRLs at one moment; `generation` increases with every publication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CrlSet {
    /// Increases by one with every publication (0: nothing published yet).
    pub generation: u64,
    /// One per X.509 authority of this server, then those of the other servers sharing the
    /// store.
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
    server_id: String,
    tx: watch::Sender<Arc<CrlSet>>,
    /// One publication at a time, and what it last saw of the store.
    publishing: Mutex<Seen>,
}

/// A CRL as servers save it in the store for each other (JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredCrl {
    authority_id: String,
    #[serde(with = "crate::store::base64_bytes")]
    der: Vec<u8>,
    crl_number: u64,
    this_update: SystemTime,
    next_update: SystemTime,
    revoked_serials: Vec<String>,
}

impl From<&SignedCrl> for StoredCrl {
    fn from(crl: &SignedCrl) -> Self {
        Self {
            authority_id: crl.authority_id.clone(),
            der: crl.der.clone(),
            crl_number: crl.crl_number,
            this_update: crl.this_update,
            next_update: crl.next_update,
            revoked_serials: crl.revoked_serials.clone(),
        }
    }
}

impl From<StoredCrl> for SignedCrl {
    fn from(crl: StoredCrl) -> Self {
        Self {
            authority_id: crl.authority_id,
            der: crl.der,
            crl_number: crl.crl_number,
            this_update: crl.this_update,
            next_update: crl.next_update,
            revoked_serials: crl.revoked_serials,
        }
    }
}

/// Decodes the CRLs another server saved.
fn decode_crls(encoded: &[u8]) -> Result<Vec<SignedCrl>, serde_json::Error> {
    serde_json::from_slice::<Vec<StoredCrl>>(encoded)
        .map(|crls| crls.into_iter().map(SignedCrl::from).collect())
}

/// What the publisher last signed and read.
#[derive(Debug, Default)]
struct Seen {
    /// [`CrlCounters::revocations`](crate::store::CrlCounters::revocations) when the own CRLs were last signed.
    revocations: Option<u64>,
    /// [`CrlCounters::crls`](crate::store::CrlCounters::crls) when the other servers' CRLs were last read.
    crls: Option<u64>,
    /// This server's CRLs as last signed.
    own: Vec<SignedCrl>,
    /// Each other server's CRLs as last decoded.
    others: std::collections::BTreeMap<String, Vec<SignedCrl>>,
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
    /// A publisher for server `server_id` with nothing published yet.
    pub(crate) fn new(ca: Arc<Ca>, store: Arc<dyn Store>, server_id: String) -> Self {
        let (tx, _) = watch::channel(Arc::new(CrlSet::default()));
        Self {
            ca,
            store,
            server_id,
            tx,
            publishing: Mutex::new(Seen::default()),
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
        let mut seen = self.publishing.lock().await;
        // Read before the serials: a revocation after this read raises the counter past it,
        // and the next poll signs again.
        let counters = self.store.crl_counters().await?;
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
        let own = self
            .ca
            .sign_crls(&revoked, &numbers, millis, now, now + CRL_VALIDITY)?;
        let stored: Vec<StoredCrl> = own.iter().map(StoredCrl::from).collect();
        let encoded = serde_json::to_vec(&stored).map_err(|e| {
            CrlError::Store(StoreError::Encode {
                what: "crls",
                reason: e.to_string(),
            })
        })?;
        self.store
            .save_server_crls(&self.server_id, encoded)
            .await?;
        let number = numbers.values().copied().max().unwrap_or(millis);
        seen.revocations = Some(counters.revocations);
        seen.own = own;
        let set = self.merge(&mut seen, true).await?;
        info!(
            crl_number = number,
            revoked = revoked.len(),
            "certificate revocation lists published"
        );
        Ok(set)
    }

    /// Reads the store's counters: signs again when revocations were added since this server
    /// last signed, takes in other servers' CRLs when they saved new ones; else nothing.
    ///
    /// # Errors
    ///
    /// [`CrlError`]: the previous CRLs stay published.
    pub(crate) async fn poll(&self, now: SystemTime) -> Result<(), CrlError> {
        let counters = self.store.crl_counters().await?;
        let mut seen = self.publishing.lock().await;
        if seen.revocations != Some(counters.revocations) {
            drop(seen);
            self.publish(now).await?;
        } else if seen.crls != Some(counters.crls) {
            self.merge(&mut seen, false).await?;
        }
        Ok(())
    }

    /// Waits (at most `within`) until the CRLs saved in the store list every serial of
    /// `revoked` (authority id -> serials) under its authority, and returns the servers whose
    /// CRLs still do not (the owner of each authority, from the CRLs it saved before; an
    /// authority nobody saved a CRL for is named by its id). This server's own authorities are
    /// listed as soon as it published; another server's when it re-signs (within about two
    /// [`CRL_POLL_INTERVAL`]s while it runs).
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn pending_servers(
        &self,
        revoked: &std::collections::BTreeMap<String, Vec<String>>,
        within: Duration,
    ) -> Result<Vec<String>, CrlError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut owners = std::collections::BTreeMap::new();
            let mut listed = std::collections::BTreeSet::new();
            for (server_id, encoded) in self.store.server_crls().await? {
                let Ok(crls) = decode_crls(&encoded) else {
                    continue;
                };
                for crl in crls {
                    let all = revoked.get(&crl.authority_id).is_some_and(|serials| {
                        serials.iter().all(|s| crl.revoked_serials.contains(s))
                    });
                    if all {
                        listed.insert(crl.authority_id.clone());
                    }
                    owners.insert(crl.authority_id, server_id.clone());
                }
            }
            let pending: std::collections::BTreeSet<String> = revoked
                .keys()
                .filter(|authority| !listed.contains(*authority))
                .map(|authority| {
                    owners
                        .get(authority)
                        .cloned()
                        .unwrap_or_else(|| format!("the server of authority {authority}"))
                })
                .collect();
            if pending.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(pending.into_iter().collect());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes this server's CRLs with every other server's (as the store has them now);
    /// a new generation when `always` or when the set changed.
    async fn merge(&self, seen: &mut Seen, always: bool) -> Result<Arc<CrlSet>, CrlError> {
        let counters = self.store.crl_counters().await?;
        let mut crls = seen.own.clone();
        for (server_id, encoded) in self.store.server_crls().await? {
            if server_id == self.server_id {
                continue;
            }
            let theirs = match decode_crls(&encoded) {
                Ok(theirs) => {
                    seen.others.insert(server_id, theirs.clone());
                    theirs
                }
                // Keep serving what the server published last that decoded: dropping its
                // CRLs would make brokers refuse every SVID it signed.
                Err(error) => {
                    warn!(%server_id, %error, "another server's crls do not decode; keeping the last good ones");
                    seen.others.get(&server_id).cloned().unwrap_or_default()
                }
            };
            for crl in theirs {
                let own = seen.own.iter().any(|o| o.authority_id == crl.authority_id);
                match crls.iter_mut().find(|o| o.authority_id == crl.authority_id) {
                    // One authority, two CRLs (a row copied by hand, say): the later number;
                    // this server's own always win.
                    Some(known) if !own && known.crl_number < crl.crl_number => *known = crl,
                    Some(_) => {}
                    None => crls.push(crl),
                }
            }
        }
        seen.crls = Some(counters.crls);
        let current = self.tx.borrow().clone();
        if !always && current.crls == crls {
            return Ok(current);
        }
        let set = Arc::new(CrlSet {
            generation: current.generation + 1,
            crls,
        });
        self.tx.send_replace(set.clone());
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
        let mut refresh = tokio::time::Instant::now() + CRL_REFRESH;
        let mut failing = false;
        loop {
            let full = tokio::select! {
                () = tokio::time::sleep_until(refresh) => true,
                changed = bundle.changed(), if bundle_open => {
                    if changed.is_err() {
                        bundle_open = false;
                        continue;
                    }
                    true
                }
                () = tokio::time::sleep(CRL_POLL_INTERVAL) => false,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let now = SystemTime::now();
            let result = if full {
                refresh = tokio::time::Instant::now() + CRL_REFRESH;
                self.publish(now).await.map(|_| ())
            } else {
                self.poll(now).await
            };
            match result {
                Ok(()) => failing = false,
                Err(error) if !failing => {
                    failing = true;
                    warn!(%error, "cannot refresh the crls; the previous ones stay published");
                }
                Err(_) => {}
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
        let restarted = CrlPublisher::new(
            fx.authority.ca().clone(),
            fx.store.clone(),
            crate::store::DEFAULT_SERVER_ID.to_owned(),
        );
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
