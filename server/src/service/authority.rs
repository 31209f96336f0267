//! The CA as the services see it: one signing call per credential kind with the TTL policy
//! applied, and the trust domain's bundle as **one** published state.
//!
//! The bundle state ([`BundleState`]: sequence, SPIFFE bundle JSON, X.509 authorities) is built
//! from the CA and published on one watch channel by [`Authority::rotate`] when the authorities
//! change. Everything that serves or verifies the bundle reads it from here: sync streams and
//! the admin API take [`Authority::bundle`] or [`Authority::subscribe`], and the TLS verifier and
//! agent authentication verify against [`Authority::verifier_bundles`], which the same
//! publication replaces. Nothing else keeps a copy in step by hand.

use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_core::tls::SharedBundles;
use sigil_core::{SpiffeBundle, SpiffeId, TrustDomain, X509Bundle};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::ca::{
    Ca, CaError, CaJournalStore, CaJournalStoreError, IssuedX509Svid, WorkloadX509SvidParams,
};
use crate::policy::{SessionOnly, TtlPolicy};
use crate::service::metrics::IssueMetrics;
use crate::store::{RegistrationEntry, ServerBundles, Store, StoreError};
use sigil_core::session::SessionClaims;

/// The trust domain's bundle at one moment.
#[derive(Debug, Clone)]
pub(crate) struct BundleState {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Its `spiffe_sequence`: raised with every change.
    pub sequence: u64,
    /// The SPIFFE bundle, JSON.
    pub spiffe_json: Vec<u8>,
    /// The X.509 authorities.
    pub x509: X509Bundle,
}

/// An issued X509-SVID.
#[derive(Debug, Clone)]
pub(crate) struct IssuedSvid {
    /// The SPIFFE ID in it.
    pub spiffe_id: SpiffeId,
    /// The chain, DER, leaf first.
    pub chain_der: Vec<u8>,
    /// The leaf's serial number, lowercase hex.
    pub serial: String,
    /// NotAfter.
    pub not_after: SystemTime,
    /// The id of the authority that signed it.
    pub authority_id: String,
}

/// An issued JWT-SVID.
#[derive(Debug, Clone)]
pub(crate) struct IssuedJwt {
    /// The token.
    pub token: String,
    /// Its `jti`.
    pub jti: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

/// The server's own SVID and key.
#[derive(Debug)]
pub(crate) struct ServerSvid {
    /// The certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
    /// NotAfter.
    pub not_after: SystemTime,
}

/// Why signing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The request was bad: malformed CSR, wrong key type, invalid audience, an ID that may
    /// not be granted.
    #[error("{0}")]
    InvalidRequest(String),
    /// The authority could not sign.
    #[error("signing failed: {0}")]
    Internal(String),
}

/// The CA with the TTL policy and the published bundle.
#[derive(Debug)]
pub(crate) struct Authority {
    ca: Arc<Ca>,
    ttls: TtlPolicy,
    jwt_issuer: Option<String>,
    session_only: SessionOnly,
    bundle: watch::Sender<Arc<BundleState>>,
    verifier_bundles: SharedBundles,
    shared: Option<Shared>,
    metrics: IssueMetrics,
}

/// The bundle the servers of one store share: each publishes its own authorities, every one
/// serves the union.
#[derive(Debug)]
struct Shared {
    store: Arc<dyn Store>,
    server_id: String,
    /// What this server last published (its own bundle JSON) and the shared sequence it last
    /// merged; one sync at a time.
    state: tokio::sync::Mutex<SharedState>,
}

#[derive(Debug, Default)]
struct SharedState {
    published: Option<Vec<u8>>,
    merged: Option<u64>,
}

// === impl Authority ===

impl Authority {
    /// Publishes `ca`'s current bundle; `ttls` decides every lifetime, `jwt_issuer` is the
    /// `iss` of JWT-SVIDs.
    pub(crate) fn new(ca: Arc<Ca>, ttls: TtlPolicy, jwt_issuer: Option<String>) -> Self {
        let state = bundle_state(&ca);
        let verifier_bundles = SharedBundles::from_bundle(state.x509.clone());
        let (bundle, _) = watch::channel(Arc::new(state));
        Self {
            ca,
            ttls,
            jwt_issuer,
            session_only: SessionOnly::default(),
            bundle,
            verifier_bundles,
            shared: None,
            metrics: IssueMetrics::default(),
        }
    }

    /// What this authority signed, by kind, and how long signing took.
    pub(crate) fn metrics(&self) -> &IssueMetrics {
        &self.metrics
    }

    /// The same authority, publishing its authorities into the bundle that the servers of
    /// `store` share (as server `server_id`) and serving their union: see
    /// [`Authority::sync_shared_bundle`].
    #[must_use]
    pub(crate) fn with_shared_bundle(mut self, store: Arc<dyn Store>, server_id: String) -> Self {
        self.shared = Some(Shared {
            store,
            server_id,
            state: tokio::sync::Mutex::new(SharedState::default()),
        });
        self
    }

    /// Publishes this server's authorities into the shared bundle when they changed since it
    /// last did (raising the shared sequence in the same transaction), then, when the shared
    /// sequence moved, merges every server's authorities into the bundle this server serves
    /// and verifies against. The union keeps this server's own authorities even while the
    /// store is unreachable, and drops other servers' certificates past their NotAfter. The
    /// served `spiffe_sequence` is the shared one. Returns whether the served bundle changed.
    ///
    /// # Errors
    ///
    /// The store's: nothing changes, and the next call tries again.
    pub(crate) async fn sync_shared_bundle(&self, now: SystemTime) -> Result<bool, StoreError> {
        let Some(shared) = &self.shared else {
            return Ok(false);
        };
        let mut state = shared.state.lock().await;
        let own = self.ca.bundle();
        let own_json = own.to_json();
        if state.published.as_ref() != Some(&own_json) {
            let stored = shared.store.server_bundles().await?;
            let unchanged = stored
                .bundles
                .iter()
                .any(|(id, json)| *id == shared.server_id && *json == own_json);
            if !unchanged {
                let sequence = shared
                    .store
                    .publish_server_bundle(
                        &shared.server_id,
                        own_json.clone(),
                        own.sequence().unwrap_or_default(),
                    )
                    .await?;
                info!(sequence, "own authorities published into the shared bundle");
            }
            state.published = Some(own_json.clone());
            state.merged = None;
        }
        let sequence = shared.store.bundle_sequence().await?;
        if state.merged == Some(sequence) {
            return Ok(false);
        }
        let bundles = shared.store.server_bundles().await?;
        // This server's row must be what it published: if it was overwritten (by a stale
        // instance, or by hand), publish again at the next sync.
        let own_row_intact = bundles
            .bundles
            .iter()
            .any(|(id, json)| *id == shared.server_id && *json == own_json);
        if !own_row_intact {
            warn!(server_id = %shared.server_id, "this server's published bundle in the store is not what it published; publishing it again");
            state.published = None;
        }
        let union = union_bundle(&own, &shared.server_id, &bundles, now);
        let merged = bundles.sequence;
        let state_now = BundleState {
            trust_domain: self.ca.trust_domain().clone(),
            sequence: union.sequence().unwrap_or_default(),
            spiffe_json: union.to_json(),
            x509: union.x509_bundle().map_err(|e| StoreError::Corrupt {
                what: "shared bundle",
                reason: e.to_string(),
            })?,
        };
        state.merged = Some(merged);
        let current = self.bundle();
        if current.sequence == state_now.sequence && current.spiffe_json == state_now.spiffe_json {
            return Ok(false);
        }
        self.verifier_bundles.replace(state_now.x509.clone());
        info!(
            sequence = state_now.sequence,
            authorities = state_now.x509.authorities().len(),
            servers = bundles.bundles.len(),
            "shared bundle changed"
        );
        self.bundle.send_replace(Arc::new(state_now));
        Ok(true)
    }

    /// The same authority, refusing to mint IDs under `session_only`'s prefixes.
    #[must_use]
    pub(crate) fn with_session_only(mut self, session_only: SessionOnly) -> Self {
        self.session_only = session_only;
        self
    }

    /// The IDs granted only through approved sessions.
    pub(crate) fn session_only(&self) -> &SessionOnly {
        &self.session_only
    }

    /// The CA.
    pub(crate) fn ca(&self) -> &Arc<Ca> {
        &self.ca
    }

    /// The trust domain.
    pub(crate) fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    /// The lifetimes of every credential kind.
    pub(crate) fn ttls(&self) -> &TtlPolicy {
        &self.ttls
    }

    /// The bundle as last published.
    pub(crate) fn bundle(&self) -> Arc<BundleState> {
        self.bundle.borrow().clone()
    }

    /// A receiver of every bundle publication.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<BundleState>> {
        self.bundle.subscribe()
    }

    /// The X.509 bundles that agent SVIDs are verified against (the TLS handshake and every
    /// node API call); replaced by each publication.
    pub(crate) fn verifier_bundles(&self) -> &SharedBundles {
        &self.verifier_bundles
    }

    /// Rotates the authorities at `now` and, when they changed, publishes the new bundle.
    /// Returns whether it changed.
    ///
    /// # Errors
    ///
    /// The CA's: the previous bundle stays published.
    pub(crate) async fn rotate(&self, now: SystemTime) -> Result<bool, CaError> {
        let changed = self.ca.rotate(now).await?;
        if changed && self.shared.is_some() {
            // The union (with this server's new authorities) is published by the sync, now
            // and at every later call until the store takes it.
            if let Err(e) = self.sync_shared_bundle(now).await {
                tracing::warn!(error = %e, "cannot publish the rotated authorities yet; retrying");
            }
        } else if changed {
            let state = bundle_state(&self.ca);
            self.verifier_bundles.replace(state.x509.clone());
            info!(sequence = state.sequence, "bundle changed");
            self.bundle.send_replace(Arc::new(state));
        }
        Ok(changed)
    }

    /// Signs an agent X509-SVID for `agent_id` over the CSR's key.
    ///
    /// # Errors
    ///
    /// [`SignError::InvalidRequest`] for a bad CSR or an ID that is not an agent's.
    pub(crate) fn sign_agent_svid(
        &self,
        agent_id: &SpiffeId,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, SignError> {
        self.metrics
            .time("x509_agent", || {
                self.ca
                    .sign_agent_x509_svid(agent_id, csr_der, self.ttls.agent_svid(), now)
            })
            .map(issued)
            .map_err(sign_error)
    }

    /// Signs a workload X509-SVID for `entry` over the CSR's key: identity, DNS names and
    /// lifetime from the entry, never ending after the entry does (an entry as
    /// `EntryCache::authorize` returns it ends when the parents it is authorized through do,
    /// if sooner); under a privileged `session`, it carries the session extension.
    ///
    /// # Errors
    ///
    /// [`SignError::InvalidRequest`] for a bad CSR.
    pub(crate) fn sign_workload_svid(
        &self,
        entry: &RegistrationEntry,
        session: Option<&SessionClaims>,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, SignError> {
        let params = WorkloadX509SvidParams {
            spiffe_id: entry.spiffe_id.clone(),
            dns_names: entry.dns_names.clone(),
            ttl: self.ttls.x509(entry.x509_svid_ttl),
            caps: entry.expires_at.into_iter().collect(),
            session: session.cloned(),
        };
        let kind = if session.is_some() {
            "x509_session"
        } else {
            "x509"
        };
        self.metrics
            .time(kind, || self.workload_x509(&params, csr_der, now))
    }

    /// Signs a JWT-SVID for `entry`, never outliving the entry.
    ///
    /// # Errors
    ///
    /// [`SignError::InvalidRequest`] for an empty audience.
    pub(crate) fn sign_jwt_svid(
        &self,
        entry: &RegistrationEntry,
        session: Option<&SessionClaims>,
        audience: &[String],
        now: SystemTime,
    ) -> Result<IssuedJwt, SignError> {
        let ttl = self
            .ttls
            .jwt_until(entry.jwt_svid_ttl, entry.expires_at, now);
        let kind = if session.is_some() {
            "jwt_session"
        } else {
            "jwt"
        };
        self.metrics.time(kind, || {
            self.jwt(&entry.spiffe_id, audience, ttl, now, session)
        })
    }

    /// Mints an X509-SVID that no entry backs (an operator's `x509 mint`): `ttl` `None` means
    /// the default; the cap applies.
    ///
    /// # Errors
    ///
    /// [`SignError::InvalidRequest`] for a bad CSR, DNS name or an ID that may not be granted.
    pub(crate) fn mint_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: Vec<String>,
        ttl: Option<std::time::Duration>,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, SignError> {
        self.session_only
            .refuse(spiffe_id, "x509 mint")
            .map_err(SignError::InvalidRequest)?;
        let params = WorkloadX509SvidParams {
            spiffe_id: spiffe_id.clone(),
            dns_names,
            ttl: self.ttls.x509(ttl),
            caps: vec![],
            session: None,
        };
        self.metrics
            .time("x509_minted", || self.workload_x509(&params, csr_der, now))
    }

    /// Mints a JWT-SVID that no entry backs (an operator's `jwt mint`).
    ///
    /// # Errors
    ///
    /// [`SignError::InvalidRequest`] for an empty audience or an ID that may not be granted.
    pub(crate) fn mint_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Option<std::time::Duration>,
        now: SystemTime,
    ) -> Result<IssuedJwt, SignError> {
        self.session_only
            .refuse(spiffe_id, "jwt mint")
            .map_err(SignError::InvalidRequest)?;
        self.metrics.time("jwt_minted", || {
            self.jwt(spiffe_id, audience, self.ttls.jwt(ttl), now, None)
        })
    }

    /// A fresh P-256 key and its SVID `spiffe://TD/sigil/server`, for the node API's TLS.
    ///
    /// # Errors
    ///
    /// [`SignError::Internal`] when the key cannot be made or signed.
    pub(crate) fn server_svid(&self, now: SystemTime) -> Result<ServerSvid, SignError> {
        let internal = |what: &str| SignError::Internal(format!("cannot create the server {what}"));
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .map_err(|_| internal("key"))?;
        let key_pair = rcgen::KeyPair::try_from(pkcs8.as_ref()).map_err(|_| internal("key"))?;
        let svid = self
            .metrics
            .time("x509_server", || {
                self.ca.sign_server_x509_svid(
                    &rcgen::PublicKeyData::subject_public_key_info(&key_pair),
                    self.ttls.agent_svid(),
                    now,
                )
            })
            .map_err(sign_error)?;
        let not_after = svid.not_after();
        Ok(ServerSvid {
            chain: svid.into_chain(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec())),
            not_after,
        })
    }

    fn workload_x509(
        &self,
        params: &WorkloadX509SvidParams,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, SignError> {
        self.ca
            .sign_workload_x509_svid(params, csr_der, now)
            .map(issued)
            .map_err(sign_error)
    }

    fn jwt(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: std::time::Duration,
        now: SystemTime,
        session: Option<&SessionClaims>,
    ) -> Result<IssuedJwt, SignError> {
        let jwt = self
            .ca
            .sign_jwt_svid_in(
                spiffe_id,
                audience,
                ttl,
                now,
                self.jwt_issuer.as_deref(),
                session,
            )
            .map_err(sign_error)?;
        Ok(IssuedJwt {
            token: jwt.token().to_owned(),
            jti: jwt
                .claims()
                .get("jti")
                .and_then(|jti| jti.as_str())
                .unwrap_or_default()
                .to_owned(),
            expires_at: jwt.expiry(),
        })
    }
}

/// The store as the CA's journal store: the journal of one server (`server_id`).
#[derive(Debug)]
pub(crate) struct StoreJournal {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Whose journal.
    pub server_id: String,
}

#[async_trait::async_trait]
impl CaJournalStore for StoreJournal {
    async fn load_ca_journal(&self) -> Result<Option<Vec<u8>>, CaJournalStoreError> {
        self.store
            .load_ca_journal(&self.server_id)
            .await
            .map_err(CaJournalStoreError::new)
    }

    async fn save_ca_journal(&self, journal: Vec<u8>) -> Result<(), CaJournalStoreError> {
        self.store
            .save_ca_journal(&self.server_id, journal)
            .await
            .map_err(CaJournalStoreError::new)
    }
}

// === helpers ===

/// `own` with the authorities of every other server's published bundle added (X.509
/// certificates not yet past NotAfter at `now`, JWT keys by `kid`), carrying the larger of
/// the shared and own sequences. A bundle that does not parse is skipped, and said.
fn union_bundle(
    own: &SpiffeBundle,
    server_id: &str,
    bundles: &ServerBundles,
    now: SystemTime,
) -> SpiffeBundle {
    let mut union = own.clone();
    let mut seen: std::collections::HashSet<Vec<u8>> = own
        .x509_authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    for (id, json) in &bundles.bundles {
        if id == server_id {
            continue;
        }
        let bundle = match SpiffeBundle::parse(own.trust_domain().clone(), json) {
            Ok(bundle) => bundle,
            Err(e) => {
                tracing::warn!(server_id = %id, error = %e, "skipping a server's published bundle that does not parse");
                continue;
            }
        };
        for certificate in bundle.x509_authorities() {
            let expired = x509_parser::parse_x509_certificate(certificate.as_ref())
                .map(|(_, c)| c.validity().not_after.timestamp() < unix_seconds(now))
                .unwrap_or(true);
            if expired || !seen.insert(certificate.as_ref().to_vec()) {
                continue;
            }
            if let Err(e) = union.add_x509_authority(certificate.clone()) {
                tracing::warn!(server_id = %id, error = %e, "skipping an authority of a server's published bundle");
            }
        }
        for (kid, key) in bundle.jwt_keys() {
            if !union.jwt_keys().contains_key(kid) {
                let _ = union.insert_jwt_key(kid.clone(), key.clone());
            }
        }
    }
    union.set_sequence(Some(
        bundles.sequence.max(own.sequence().unwrap_or_default()),
    ));
    union
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn bundle_state(ca: &Ca) -> BundleState {
    let bundle: SpiffeBundle = ca.bundle();
    BundleState {
        trust_domain: ca.trust_domain().clone(),
        sequence: bundle.sequence().unwrap_or_default(),
        spiffe_json: bundle.to_json(),
        x509: ca.x509_bundle(),
    }
}

fn issued(svid: IssuedX509Svid) -> IssuedSvid {
    IssuedSvid {
        spiffe_id: svid.spiffe_id().clone(),
        serial: svid.serial_hex(),
        not_after: svid.not_after(),
        chain_der: svid.chain_der(),
        authority_id: svid.authority_id().to_owned(),
    }
}

/// Errors caused by the request (the CSR, the ID, the audience) are the caller's to fix; the
/// rest are the server's.
fn sign_error(error: CaError) -> SignError {
    if error.is_caller_error() {
        SignError::InvalidRequest(error.to_string())
    } else {
        SignError::Internal(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::service::testing::Fixture;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotation_publishes_one_bundle_state_to_every_reader() {
        let fx = Fixture::with_ca_ttl(Duration::from_secs(60)).await;
        let authority = &fx.authority;
        let mut updates = authority.subscribe();
        let before = authority.bundle();
        assert_eq!(before.sequence, authority.ca().bundle_sequence());
        // Half-way through the authority's life the next one is prepared and published.
        let later = SystemTime::now() + Duration::from_secs(31);
        assert!(authority.rotate(later).await.unwrap());
        assert!(updates.has_changed().unwrap());
        let after = updates.borrow_and_update().clone();
        assert!(after.sequence > before.sequence);
        assert_eq!(after.x509.authorities().len(), 2);
        // The verifier's bundle is the same publication.
        let verifier = authority
            .verifier_bundles()
            .get(authority.trust_domain())
            .unwrap();
        assert_eq!(verifier.authorities(), after.x509.authorities());
        // Nothing changed: nothing published.
        assert!(!authority.rotate(later).await.unwrap());
        assert!(!updates.has_changed().unwrap());
    }

    /// A server `id` of the trust domain on `store`, its keys under `dir`.
    async fn sharing(
        store: &Arc<dyn Store>,
        dir: &std::path::Path,
        id: &str,
        ca_ttl: Duration,
        now: SystemTime,
    ) -> Authority {
        let keys = Arc::new(crate::ca::DiskKeyManager::new(dir.join(id)).unwrap());
        let journal = Arc::new(StoreJournal {
            store: store.clone(),
            server_id: id.to_owned(),
        });
        let td = TrustDomain::new("example.org").unwrap();
        let ca = Arc::new(
            Ca::load_or_init(td, ca_ttl, keys, journal, now)
                .await
                .unwrap(),
        );
        let max_svid = sigil_core::lifetime::max_svid_ttl(ca_ttl);
        let ttls = TtlPolicy {
            x509_default: max_svid,
            jwt_default: max_svid,
            agent: max_svid,
            session_svid_default: max_svid,
            max_session: max_svid,
            max_svid,
        };
        Authority::new(ca, ttls, None).with_shared_bundle(store.clone(), id.to_owned())
    }

    fn x509_set(authority: &Authority) -> std::collections::BTreeSet<Vec<u8>> {
        let state = authority.bundle();
        let verifier = authority
            .verifier_bundles()
            .get(authority.trust_domain())
            .unwrap();
        assert_eq!(verifier.authorities(), state.x509.authorities());
        state
            .x509
            .authorities()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect()
    }

    /// Two servers on one store each serve (and verify against) both servers' authorities
    /// under one sequence; one server's prepared authority reaches the other before it signs
    /// anything; a server's restart publishes nothing new.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn servers_sharing_a_store_serve_the_union_of_their_authorities() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sled::SledStore::open(
                dir.path().join("store"),
                crate::store::sled::SledStoreOptions::default(),
            )
            .unwrap(),
        );
        let ttl = Duration::from_secs(600);
        let now = SystemTime::now();
        let a = sharing(&store, dir.path(), "a", ttl, now).await;
        assert!(
            !a.sync_shared_bundle(now).await.unwrap(),
            "alone: its own bundle"
        );
        let b = sharing(&store, dir.path(), "b", ttl, now).await;
        assert!(b.sync_shared_bundle(now).await.unwrap());
        assert!(a.sync_shared_bundle(now).await.unwrap());
        assert_eq!(x509_set(&a).len(), 2);
        assert_eq!(x509_set(&a), x509_set(&b));
        assert_eq!(a.bundle().sequence, b.bundle().sequence);
        assert_eq!(a.bundle().sequence, store.bundle_sequence().await.unwrap());
        let jwt_keys = |x: &Authority| {
            SpiffeBundle::parse(x.trust_domain().clone(), &x.bundle().spiffe_json)
                .unwrap()
                .jwt_keys()
                .len()
        };
        assert_eq!((jwt_keys(&a), jwt_keys(&b)), (2, 2));
        // Nothing moved: nothing to do.
        assert!(!a.sync_shared_bundle(now).await.unwrap());

        // b prepares its next authority half-way through the first's life; a serves it at
        // its next sync, while b still signs with the old one.
        let before = a.bundle().sequence;
        let later = now + ttl / 2 + Duration::from_secs(1);
        assert!(b.rotate(later).await.unwrap());
        assert!(a.sync_shared_bundle(later).await.unwrap());
        assert_eq!(x509_set(&a).len(), 3);
        assert_eq!(x509_set(&a), x509_set(&b));
        assert!(a.bundle().sequence > before);
        let prepared = b
            .ca()
            .authorities()
            .into_iter()
            .filter(|i| {
                i.kind == crate::ca::AuthorityKind::X509
                    && i.state == crate::ca::AuthorityState::Prepared
            })
            .count();
        assert_eq!(prepared, 1);

        // A restarted server (same keys and journal, before its own rotation is due)
        // publishes nothing new.
        let sequence = store.bundle_sequence().await.unwrap();
        drop(a);
        let a = sharing(&store, dir.path(), "a", ttl, now).await;
        a.sync_shared_bundle(later).await.unwrap();
        assert_eq!(store.bundle_sequence().await.unwrap(), sequence);
        assert_eq!(x509_set(&a), x509_set(&b));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ttls_come_from_the_policy_and_caller_errors_are_invalid_requests() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let jwt = fx
            .authority
            .mint_jwt_svid(
                &id,
                &["db".to_owned()],
                Some(Duration::from_secs(86_400 * 30)),
                now,
            )
            .unwrap();
        let lifetime = jwt.expires_at.duration_since(now).unwrap();
        assert!(lifetime <= fx.authority.ttls().max_svid, "{lifetime:?}");
        let err = fx
            .authority
            .mint_x509_svid(&id, vec![], None, b"not a csr", now)
            .unwrap_err();
        assert!(matches!(err, SignError::InvalidRequest(_)), "{err}");
        let reserved = SpiffeId::new("spiffe://example.org/sigil/agent/x").unwrap();
        let err = fx
            .authority
            .mint_jwt_svid(&reserved, &["db".to_owned()], None, now)
            .unwrap_err();
        assert!(matches!(err, SignError::InvalidRequest(_)), "{err}");
        let server = fx.authority.server_svid(now).unwrap();
        assert!(server.not_after > now);
    }
}
