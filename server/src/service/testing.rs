//! A whole service layer over a real sled store and a real CA in a temp dir, for the services'
//! unit tests.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use sigil_core::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tokio::sync::watch;

use crate::audit::{AuditFilter, AuditRecord};
use crate::ca::{Ca, DiskKeyManager, KeyManager};
use crate::policy::SessionOnly;
use crate::service::agents::{Agent, Agents};
use crate::service::audit::AuditLog;
use crate::service::authority::{Authority, StoreJournal};
use crate::service::bundles::Bundles;
use crate::service::crl::CrlPublisher;
use crate::service::entries::Entries;
use crate::service::entry_cache::EntryCache;
use crate::service::federation::{FederatedBundles, Federation};
use crate::service::sessions::{SessionRules, Sessions};
use crate::service::svids::Svids;
use crate::service::sync::EntrySync;
use crate::store::{NewEntry, PageRequest, SledStore, SledStoreOptions, Store};

/// Every service, wired as the server wires them.
pub(crate) struct Fixture {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) authority: Arc<Authority>,
    pub(crate) crls: Arc<CrlPublisher>,
    pub(crate) entries: Entries,
    pub(crate) agents: Arc<Agents>,
    pub(crate) svids: Svids,
    pub(crate) bundles: Bundles,
    pub(crate) federation: Federation,
    pub(crate) federated: Arc<FederatedBundles>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) sync: EntrySync,
    pub(crate) audit: Arc<AuditLog>,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Trust domain `example.org`, `ca_ttl` 24h.
    pub(crate) async fn new() -> Self {
        Self::build("example.org", Duration::from_secs(24 * 3600), false).await
    }

    /// Trust domain `trust_domain`.
    pub(crate) async fn new_in(trust_domain: &str) -> Self {
        Self::build(trust_domain, Duration::from_secs(24 * 3600), false).await
    }

    /// Authorities that live `ca_ttl`.
    pub(crate) async fn with_ca_ttl(ca_ttl: Duration) -> Self {
        Self::build("example.org", ca_ttl, false).await
    }

    /// Every session needs a second admin's approval.
    pub(crate) async fn requiring_approval() -> Self {
        Self::build("example.org", Duration::from_secs(24 * 3600), true).await
    }

    async fn build(trust_domain: &str, ca_ttl: Duration, require_approval: bool) -> Self {
        let rules = SessionRules {
            require_approval,
            approver_uids: Vec::new(),
        };
        Self::build_with(trust_domain, ca_ttl, rules, SessionOnly::default()).await
    }

    /// Sessions approved under `rules`; IDs under `session_only` granted only by sessions.
    pub(crate) async fn with_rules(rules: SessionRules, session_only: SessionOnly) -> Self {
        Self::build_with(
            "example.org",
            Duration::from_secs(24 * 3600),
            rules,
            session_only,
        )
        .await
    }

    async fn build_with(
        trust_domain: &str,
        ca_ttl: Duration,
        rules: SessionRules,
        session_only: SessionOnly,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SledStore::open(dir.path().join("store"), SledStoreOptions::default()).unwrap(),
        );
        let keys: Arc<dyn KeyManager> =
            Arc::new(DiskKeyManager::new(dir.path().join("keys")).unwrap());
        let trust_domain = TrustDomain::new(trust_domain).unwrap();
        let now = SystemTime::now();
        let ca = Arc::new(
            Ca::load_or_init(
                trust_domain.clone(),
                ca_ttl,
                keys.clone(),
                Arc::new(StoreJournal {
                    store: store.clone(),
                    server_id: crate::store::DEFAULT_SERVER_ID.to_owned(),
                }),
                now,
            )
            .await
            .unwrap(),
        );
        let ttls = crate::config::default_ttl_policy(ca_ttl);
        let authority = Arc::new(
            Authority::new(ca.clone(), ttls, None).with_session_only(session_only.clone()),
        );
        let audit = Arc::new(
            AuditLog::open(
                store.clone(),
                keys,
                crate::audit::DEFAULT_CHAIN_ID,
                dir.path()
                    .join("keys")
                    .join(crate::service::audit::STATE_FILE),
            )
            .await
            .unwrap(),
        );
        audit.prepare(SystemTime::now()).await.unwrap();
        let crls = Arc::new(CrlPublisher::new(
            ca,
            store.clone(),
            crate::store::DEFAULT_SERVER_ID.to_owned(),
        ));
        crls.publish(now).await.unwrap();
        let cache = EntryCache::load(store.clone()).await.unwrap();
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(cache.clone().run(stop_rx.clone()));
        let sessions = Arc::new(Sessions::new(
            store.clone(),
            audit.clone(),
            crls.clone(),
            authority.clone(),
            cache.clone(),
            rules,
        ));
        sessions.load().await.unwrap();
        let agents = Arc::new(Agents::new(
            store.clone(),
            audit.clone(),
            authority.clone(),
            crls.clone(),
            None,
        ));
        let federated = FederatedBundles::load(store.clone()).await.unwrap();
        Self {
            entries: Entries::new(store.clone(), audit.clone(), trust_domain, session_only),
            agents: agents.clone(),
            svids: Svids::new(audit.clone(), authority.clone(), cache.clone()),
            bundles: Bundles::new(
                store.clone(),
                audit.clone(),
                authority.clone(),
                crls.clone(),
                federated.clone(),
            ),
            federation: Federation::new(
                store.clone(),
                audit.clone(),
                authority.clone(),
                federated.clone(),
                crate::store::DEFAULT_SERVER_ID.to_owned(),
                Duration::from_secs(1),
            ),
            sync: EntrySync::new(
                cache,
                authority.clone(),
                crls.clone(),
                audit.clone(),
                agents,
                federated.clone(),
                stop_rx,
            ),
            federated,
            audit,
            sessions,
            store,
            authority,
            crls,
            _stop: stop,
            _dir: dir,
        }
    }

    /// The actions of the audit records that pass `filter`, in order.
    pub(crate) async fn audit_actions(&self, filter: AuditFilter) -> Vec<String> {
        self.store
            .list_audit(&filter, &PageRequest::first(100))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|r| r.action)
            .collect()
    }

    /// The audit records that pass `filter`, in order.
    pub(crate) async fn audit_records(&self, filter: AuditFilter) -> Vec<AuditRecord> {
        self.store
            .list_audit(&filter, &PageRequest::first(100))
            .await
            .unwrap()
            .items
    }

    /// An agent attested with a fresh join token and authenticated.
    pub(crate) async fn attested_agent(&self) -> Agent {
        let now = SystemTime::now();
        let token = self
            .agents
            .generate_join_token(0, None, None, now)
            .await
            .unwrap();
        let (csr_der, _) = csr();
        let svid = self
            .agents
            .attest_token(&token.token, &csr_der, now)
            .await
            .unwrap();
        let chain = [CertificateDer::from(svid.chain_der)];
        self.agents.authenticate(Some(&chain), now).await.unwrap()
    }
}

/// An entry for `spiffe_id` under `parent`, selecting `unix:uid:1000`.
pub(crate) fn entry(spiffe_id: &str, parent: &SpiffeId) -> NewEntry {
    NewEntry::new(
        SpiffeId::new(spiffe_id).unwrap(),
        parent.clone(),
        [Selector::parse("unix:uid:1000").unwrap()]
            .into_iter()
            .collect::<SelectorSet>(),
    )
}

/// An entry for `spiffe_id` under `parent` with `count` selectors of 4000 bytes each (about
/// 4 KB on the wire apiece).
pub(crate) fn bulky_entry(spiffe_id: &str, parent: &SpiffeId, count: usize) -> NewEntry {
    let selectors = (0..count)
        .map(|i| Selector::parse(&format!("k8s:label:{i:04}{}", "x".repeat(3990))).unwrap())
        .collect::<SelectorSet>();
    NewEntry::new(SpiffeId::new(spiffe_id).unwrap(), parent.clone(), selectors)
}

/// A P-256 key and a CSR over it, DER.
pub(crate) fn csr() -> (Vec<u8>, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    (der, key)
}
