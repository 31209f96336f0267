//! Federation (SPIFFE Federation, spec section 7): relationships with other trust domains, the
//! poller that keeps their bundles current, and the set of federated bundles every sync stream
//! hands its agent.
//!
//! - **Relationships** are one-way (F-13): this trust domain trusts the other's bundle, fetched
//!   from its endpoint URL with the profile and (for `https_spiffe`) the endpoint's SPIFFE ID
//!   the operator gave (F-5: nothing is inferred from the URL). Creating, updating and
//!   deleting one is audited; deleting one deletes its bundle in the same transaction, so the
//!   removal reaches every agent.
//! - **The poller** fetches each endpoint when due: at the bundle's `spiffe_refresh_hint`,
//!   bounded by `federation_min_poll` and 5 minutes (F-10), and after a failure at a backoff
//!   that doubles from `federation_min_poll` to 5 minutes. A fetch that fails, or gives
//!   something that is not a valid bundle of the trust domain, or an older `spiffe_sequence`
//!   than the stored one (F-11), leaves the last good bundle in place; why is in the log and in
//!   the relationship's status (`federation show`). Every fetch is logged (F-14); every change
//!   of a bundle is audited. With several servers on one database one server polls at a time
//!   (a singleton job), and the schedule is in the store, so the endpoints are not polled once
//!   per server. An `https_spiffe` endpoint is authenticated with the latest stored bundle of
//!   its SPIFFE ID's trust domain (F-8): the federated trust domain's own (self-serving: the
//!   bootstrap bundle first, then each fetched one, so rotations are followed), this trust
//!   domain's, or a third trust domain's stored bundle.
//! - **The federated set** ([`FederatedBundles`]) is what the store holds, read again every
//!   [`REFRESH_INTERVAL`] and after every change this server makes, and published on a
//!   `watch` channel: sync streams send it whole when it changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_core::{SpiffeBundle, SpiffeId, TrustDomain, X509Bundle};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::audit::{NewAuditRecord, SERVER_ACTOR, action, uid_actor};
use crate::config::MAX_FEDERATION_POLL;
use crate::federation_client::{self, Authentication, EndpointUrl};
use crate::service::audit::AuditLog;
use crate::service::authority::Authority;
use crate::service::bundles::{BundleFormat, parse_bundle};
use crate::store::{
    EndpointProfile, FederatedBundle, FederationRelationship, FetchStatus, Put, Store, StoreError,
};

/// How often each server reads the federated bundles from the store again (another server may
/// have fetched or changed one).
pub(crate) const REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// How often the poller looks for relationships that are due.
const POLL_TICK: Duration = Duration::from_secs(1);

/// The name of the polling job among servers sharing a database.
const POLL_JOB: &str = "federation_poll";

/// Without a refresh hint, a bundle is fetched again after this long (F-10: about 5 minutes).
const DEFAULT_POLL: Duration = Duration::from_secs(300);

// === federated set ===

/// One federated trust domain's bundle, as agents get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FederatedEntry {
    /// The bundle.
    pub bundle: SpiffeBundle,
    /// Its SPIFFE bundle JSON, as stored.
    pub json: Vec<u8>,
}

/// Every federated trust domain's bundle, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FederatedSet {
    /// Raised with every change.
    pub generation: u64,
    /// By trust domain.
    pub bundles: BTreeMap<TrustDomain, Arc<FederatedEntry>>,
}

/// The most the federated bundles handed to agents may take together (their JSON): with a
/// snapshot page of entries and the CRLs, one sync message stays well within gRPC's 4 MiB.
/// Bundles beyond it (in trust domain order) are left out, with a warning.
pub(crate) const MAX_FEDERATED_BYTES: usize = 1024 * 1024;

/// The federated bundles the store holds, published to sync streams.
#[derive(Debug)]
pub(crate) struct FederatedBundles {
    store: Arc<dyn Store>,
    tx: watch::Sender<Arc<FederatedSet>>,
    /// One refresh at a time: one that read the store before a delete never publishes after
    /// one that read it after.
    refreshing: tokio::sync::Mutex<()>,
}

impl FederatedBundles {
    /// Reads the set from the store.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn load(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let this = Arc::new(Self {
            store,
            tx: watch::Sender::new(Arc::new(FederatedSet::default())),
            refreshing: tokio::sync::Mutex::new(()),
        });
        this.refresh().await?;
        Ok(this)
    }

    /// The set as last read.
    pub(crate) fn current(&self) -> Arc<FederatedSet> {
        self.tx.borrow().clone()
    }

    /// A receiver of every change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<FederatedSet>> {
        self.tx.subscribe()
    }

    /// Reads the store again; publishes (with the next generation) if anything changed.
    /// Returns whether it did.
    ///
    /// # Errors
    ///
    /// The store's (the set stays as it was).
    pub(crate) async fn refresh(&self) -> Result<bool, StoreError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let mut bundles = BTreeMap::new();
        let mut total = 0usize;
        let mut left_out = Vec::new();
        for stored in self.store.list_federated_bundles().await? {
            if total.saturating_add(stored.bundle.len()) > MAX_FEDERATED_BYTES {
                left_out.push(stored.trust_domain);
                continue;
            }
            total = total.saturating_add(stored.bundle.len());
            match SpiffeBundle::parse(stored.trust_domain.clone(), &stored.bundle) {
                Ok(bundle) => {
                    bundles.insert(
                        stored.trust_domain,
                        Arc::new(FederatedEntry {
                            bundle,
                            json: stored.bundle,
                        }),
                    );
                }
                Err(error) => {
                    warn!(trust_domain = %stored.trust_domain, %error, "a stored federated bundle does not parse; not handed out");
                }
            }
        }
        let mut changed = false;
        // Said when the set handed out changes (not at every refresh).
        let warn_left_out = |left_out: &[TrustDomain]| {
            if !left_out.is_empty() {
                let names: Vec<String> = left_out.iter().map(ToString::to_string).collect();
                warn!(left_out = %names.join(", "), max = MAX_FEDERATED_BYTES, "the federated bundles are too large together; these are not handed out");
            }
        };
        self.tx.send_if_modified(|current| {
            if current.bundles == bundles {
                return false;
            }
            *current = Arc::new(FederatedSet {
                generation: current.generation + 1,
                bundles,
            });
            warn_left_out(&left_out);
            changed = true;
            true
        });
        Ok(changed)
    }

    /// Reads the store every [`REFRESH_INTERVAL`] until `stop` turns true.
    pub(crate) async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(REFRESH_INTERVAL) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            if let Err(error) = self.refresh().await {
                debug!(%error, "cannot read the federated bundles now");
            }
        }
    }
}

// === relationships ===

/// A relationship as an operator writes it.
#[derive(Debug, Clone)]
pub(crate) struct RelationshipSpec {
    /// The federated trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint.
    pub endpoint_url: String,
    /// How the endpoint is authenticated.
    pub profile: EndpointProfile,
    /// A bundle to start from, if given.
    pub trust_bundle: Option<(BundleFormat, Vec<u8>)>,
}

/// A relationship with its trust domain's bundle as stored.
#[derive(Debug, Clone)]
pub(crate) struct RelationshipView {
    /// The relationship.
    pub relationship: FederationRelationship,
    /// The bundle, if any.
    pub bundle: Option<SpiffeBundle>,
}

/// Why a federation call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum FederationError {
    /// The relationship is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The change was made but its audit record could not be written.
    #[error("the change was made, but its audit record could not be written: {0}")]
    AuditAfterChange(StoreError),
    /// The store failed (or the relationship exists, or does not).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The federation service.
#[derive(Debug)]
pub(crate) struct Federation {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    authority: Arc<Authority>,
    federated: Arc<FederatedBundles>,
    server_id: String,
    min_poll: Duration,
    fetch_timeout: Duration,
    /// When this server may next fetch each trust domain whatever the store says: a fetch
    /// whose outcome could not be recorded (the store failing) is not tried again at every
    /// tick.
    not_before: std::sync::Mutex<BTreeMap<TrustDomain, SystemTime>>,
}

impl Federation {
    /// The service; `min_poll` is `federation_min_poll`.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        authority: Arc<Authority>,
        federated: Arc<FederatedBundles>,
        server_id: String,
        min_poll: Duration,
    ) -> Self {
        Self {
            store,
            audit,
            authority,
            federated,
            server_id,
            min_poll,
            fetch_timeout: federation_client::FETCH_TIMEOUT,
            not_before: std::sync::Mutex::default(),
        }
    }

    /// Sets how long one fetch may take (default [`federation_client::FETCH_TIMEOUT`]).
    #[cfg(test)]
    pub(crate) fn with_fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// Creates a relationship for admin `uid`.
    ///
    /// # Errors
    ///
    /// [`FederationError::Invalid`] naming every problem; the store's (`AlreadyExists`);
    /// [`FederationError::AuditAfterChange`].
    pub(crate) async fn create(
        &self,
        uid: u32,
        spec: RelationshipSpec,
    ) -> Result<RelationshipView, FederationError> {
        self.put(uid, spec, Put::Create).await
    }

    /// Replaces a relationship's endpoint, profile (and, when given, its bundle) for admin
    /// `uid`; it is fetched at once.
    ///
    /// # Errors
    ///
    /// As [`Federation::create`]; `NotFound`.
    pub(crate) async fn update(
        &self,
        uid: u32,
        spec: RelationshipSpec,
    ) -> Result<RelationshipView, FederationError> {
        self.put(uid, spec, Put::Update).await
    }

    async fn put(
        &self,
        uid: u32,
        spec: RelationshipSpec,
        put: Put,
    ) -> Result<RelationshipView, FederationError> {
        let (relationship, bundle) = self.check(spec).await?;
        let json = bundle.as_ref().map(SpiffeBundle::to_json);
        let stored = self
            .store
            .put_federation(relationship, json.clone(), put)
            .await?;
        let action = match put {
            Put::Create => action::FEDERATION_CREATE,
            Put::Update => action::FEDERATION_UPDATE,
        };
        let mut record = relationship_record(uid_actor(uid), action, &stored);
        if let Some(json) = &json {
            record = record.detail("bundle_sha256", sigil_core::hex::sha256(json));
        }
        if json.is_some()
            && let Err(error) = self.federated.refresh().await
        {
            warn!(%error, "cannot read the federated bundles again now; the next refresh will");
        }
        self.audit
            .after_change(vec![record])
            .await
            .map_err(FederationError::AuditAfterChange)?;
        info!(uid, trust_domain = %stored.trust_domain, url = %stored.endpoint_url, ?put, "federation relationship written");
        let bundle = self.stored_bundle(&stored.trust_domain).await?;
        Ok(RelationshipView {
            relationship: stored,
            bundle,
        })
    }

    /// Every rule a relationship must obey, all problems at once; the record to store and the
    /// bundle to store with it.
    async fn check(
        &self,
        spec: RelationshipSpec,
    ) -> Result<(FederationRelationship, Option<SpiffeBundle>), FederationError> {
        let own = self.authority.trust_domain();
        let td = &spec.trust_domain;
        let mut problems = Vec::new();
        if td == own {
            problems.push(format!(
                "{td} is this server's own trust domain; a relationship is with another one"
            ));
        }
        if let Err(e) = EndpointUrl::parse(&spec.endpoint_url) {
            problems.push(format!("bundle endpoint URL: {e}"));
        }
        let bundle = match &spec.trust_bundle {
            None => None,
            Some((format, text)) => match parse_bundle(td, *format, text) {
                Ok(bundle) if bundle.is_empty() => {
                    problems.push("trust bundle: it holds no key".to_owned());
                    None
                }
                Ok(bundle) => Some(bundle),
                Err(e) => {
                    problems.push(format!("trust bundle: {e}"));
                    None
                }
            },
        };
        if let EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } = &spec.profile {
            let endpoint_td = endpoint_spiffe_id.trust_domain();
            // F-8: the endpoint is authenticated with a bundle of its ID's trust domain, which
            // must be at hand before the first fetch: this trust domain's own, the one given
            // here, or one stored already.
            let at_hand = endpoint_td == *own
                || (endpoint_td == *td && bundle.is_some())
                || self
                    .store
                    .get_federated_bundle(&endpoint_td)
                    .await?
                    .is_some();
            if !at_hand {
                problems.push(format!(
                    "https_spiffe: the endpoint {endpoint_spiffe_id} is authenticated with the \
                     bundle of {endpoint_td}, and there is none yet: give it with \
                     --trust-bundle (or `bundle set` it first)"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(FederationError::Invalid(problems.join("; ")));
        }
        let now = SystemTime::now();
        Ok((
            FederationRelationship {
                trust_domain: spec.trust_domain,
                endpoint_url: spec.endpoint_url,
                profile: spec.profile,
                created_at: now,
                updated_at: now,
                generation: 0,
                status: FetchStatus::default(),
            },
            bundle,
        ))
    }

    /// The relationship with `trust_domain`.
    ///
    /// # Errors
    ///
    /// The store's; `NotFound`.
    pub(crate) async fn get(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<RelationshipView, FederationError> {
        let relationship = self
            .store
            .get_federation(trust_domain)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                resource: "federation relationship",
                key: trust_domain.to_string(),
            })?;
        let bundle = self.stored_bundle(trust_domain).await?;
        Ok(RelationshipView {
            relationship,
            bundle,
        })
    }

    /// Every relationship.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn list(&self) -> Result<Vec<RelationshipView>, FederationError> {
        let mut bundles: BTreeMap<TrustDomain, FederatedBundle> = self
            .store
            .list_federated_bundles()
            .await?
            .into_iter()
            .map(|b| (b.trust_domain.clone(), b))
            .collect();
        Ok(self
            .store
            .list_federations()
            .await?
            .into_iter()
            .map(|relationship| {
                let bundle = bundles
                    .remove(&relationship.trust_domain)
                    .and_then(|b| b.parsed());
                RelationshipView {
                    relationship,
                    bundle,
                }
            })
            .collect())
    }

    /// Deletes the relationship and its bundle for admin `uid` (F-13: the removal reaches every
    /// agent with the next refresh, at once on this server).
    ///
    /// # Errors
    ///
    /// The store's (`NotFound`); [`FederationError::AuditAfterChange`].
    pub(crate) async fn delete(
        &self,
        uid: u32,
        trust_domain: &TrustDomain,
    ) -> Result<RelationshipView, FederationError> {
        let (relationship, bundle) = self.store.delete_federation(trust_domain).await?;
        if let Err(error) = self.federated.refresh().await {
            warn!(%error, "cannot read the federated bundles again now; the next refresh will");
        }
        let mut record =
            relationship_record(uid_actor(uid), action::FEDERATION_DELETE, &relationship);
        if let Some(bundle) = &bundle {
            record = record.detail("bundle_sha256", sigil_core::hex::sha256(&bundle.bundle));
        }
        self.audit
            .after_change(vec![record])
            .await
            .map_err(FederationError::AuditAfterChange)?;
        info!(uid, %trust_domain, "federation relationship deleted, with its bundle");
        Ok(RelationshipView {
            relationship,
            bundle: bundle.and_then(|b| b.parsed()),
        })
    }

    async fn stored_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<SpiffeBundle>, StoreError> {
        Ok(self
            .store
            .get_federated_bundle(trust_domain)
            .await?
            .and_then(|b| b.parsed()))
    }

    // --- polling ---

    /// Polls the relationships that are due, every [`POLL_TICK`], until `stop` turns true.
    pub(crate) async fn run_polling(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let this = self.clone();
            let ran = self
                .store
                .run_job(POLL_JOB, Box::pin(async move { this.poll_due().await }))
                .await;
            if let Err(error) = ran {
                debug!(%error, "cannot take the federation polling job now");
            }
            tokio::select! {
                () = tokio::time::sleep(POLL_TICK) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Fetches every relationship that is due, at once; returns how many were fetched.
    pub(crate) async fn poll_due(self: &Arc<Self>) -> usize {
        self.poll_due_at(SystemTime::now()).await
    }

    /// Fetches every relationship due at `now`.
    pub(crate) async fn poll_due_at(self: &Arc<Self>, now: SystemTime) -> usize {
        let relationships = match self.store.list_federations().await {
            Ok(relationships) => relationships,
            Err(error) => {
                debug!(%error, "cannot list the federation relationships now");
                return 0;
            }
        };
        let due: Vec<_> = {
            let mut not_before = self
                .not_before
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            not_before.retain(|_, at| *at > now);
            relationships
                .into_iter()
                .filter(|r| r.status.next_poll.is_none_or(|at| at <= now))
                .filter(|r| !not_before.contains_key(&r.trust_domain))
                .collect()
        };
        let count = due.len();
        let mut fetches = tokio::task::JoinSet::new();
        for relationship in due {
            let this = Arc::clone(self);
            fetches.spawn(async move { this.poll(relationship).await });
        }
        while fetches.join_next().await.is_some() {}
        count
    }

    /// The store could not be read or written for `td`: this server does not try it again
    /// before `federation_min_poll`, whatever the schedule in the store says.
    fn hold_off(&self, td: &TrustDomain) {
        self.not_before
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(td.clone(), SystemTime::now() + self.min_poll);
    }

    async fn poll(&self, relationship: FederationRelationship) {
        let td = relationship.trust_domain.clone();
        let started = SystemTime::now();
        let stored = match self.store.get_federated_bundle(&td).await {
            Ok(stored) => stored.and_then(|b| b.parsed()),
            Err(error) => {
                debug!(trust_domain = %td, %error, "cannot read the stored bundle now; fetching later");
                self.hold_off(&td);
                return;
            }
        };
        let outcome = self.fetch(&relationship, stored.as_ref()).await;
        let mut status = FetchStatus {
            last_attempt: Some(started),
            server_id: self.server_id.clone(),
            ..relationship.status.clone()
        };
        let mut new_json = None;
        match outcome {
            Ok(bundle) => {
                let json = bundle.to_json();
                let changed = stored.as_ref().is_none_or(|s| s.to_json() != json);
                status.last_success = Some(started);
                status.last_error = None;
                status.failures = 0;
                status.next_poll = Some(started + self.interval(&bundle));
                info!(
                    trust_domain = %td,
                    url = %relationship.endpoint_url,
                    sequence = bundle.sequence(),
                    x509_authorities = bundle.x509_authorities().len(),
                    jwt_keys = bundle.jwt_keys().len(),
                    changed,
                    "federated bundle fetched"
                );
                if changed {
                    new_json = Some((json, bundle));
                }
            }
            Err(reason) => {
                status.last_error = Some(reason.clone());
                status.failures = relationship.status.failures.saturating_add(1);
                status.next_poll = Some(started + self.backoff(status.failures));
                warn!(
                    trust_domain = %td,
                    url = %relationship.endpoint_url,
                    reason = %reason,
                    failures = status.failures,
                    "cannot fetch the federated bundle; keeping the last good one"
                );
            }
        }
        let recorded = self
            .store
            .record_federation_fetch(
                &td,
                relationship.generation,
                status,
                new_json.as_ref().map(|(json, _)| json.clone()),
            )
            .await;
        match recorded {
            Ok(true) => {
                if let Some((json, bundle)) = new_json {
                    if let Err(error) = self.federated.refresh().await {
                        debug!(%error, "cannot read the federated bundles again now");
                    }
                    let record = NewAuditRecord::new(
                        SERVER_ACTOR.to_owned(),
                        action::FEDERATION_BUNDLE_UPDATE,
                        td.name(),
                    )
                    .detail("url", relationship.endpoint_url.clone())
                    .detail("sha256", sigil_core::hex::sha256(&json))
                    .detail("sequence", bundle.sequence().unwrap_or_default())
                    .detail("x509_authorities", bundle.x509_authorities().len())
                    .detail("jwt_keys", bundle.jwt_keys().len())
                    .detail("server_id", self.server_id.clone());
                    if let Err(error) = self.audit.after_change(vec![record]).await {
                        warn!(%error, trust_domain = %td, "the federated bundle changed, but its audit record could not be written");
                    }
                }
            }
            Ok(false) => {
                debug!(trust_domain = %td, "the relationship changed during the fetch; its result is dropped");
            }
            Err(error) => {
                warn!(trust_domain = %td, %error, "cannot record the fetch");
                self.hold_off(&td);
            }
        }
    }

    /// One fetch: the endpoint's bundle if it is a valid one of the trust domain and not older
    /// than `stored`.
    async fn fetch(
        &self,
        relationship: &FederationRelationship,
        stored: Option<&SpiffeBundle>,
    ) -> Result<SpiffeBundle, String> {
        let td = &relationship.trust_domain;
        let url = EndpointUrl::parse(&relationship.endpoint_url)?;
        let auth = match &relationship.profile {
            EndpointProfile::HttpsWeb => Authentication::Web,
            EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => Authentication::Spiffe {
                id: endpoint_spiffe_id.clone(),
                bundle: self.endpoint_bundle(endpoint_spiffe_id, td, stored).await?,
            },
        };
        let body = federation_client::fetch(&url, auth, self.fetch_timeout).await?;
        let bundle = SpiffeBundle::parse(td.clone(), &body)
            .map_err(|e| format!("the answer is not a SPIFFE bundle: {e}"))?;
        if bundle.is_empty() {
            return Err("the answer is a bundle without any key".to_owned());
        }
        match (bundle.sequence(), stored.and_then(SpiffeBundle::sequence)) {
            (Some(new), Some(old)) if new < old => {
                return Err(format!(
                    "the answer has spiffe_sequence {new}, older than the stored bundle's {old}"
                ));
            }
            // Once the trust domain numbered its bundles, an answer without a number cannot
            // be ordered against them (F-11): it could be an old copy.
            (None, Some(old)) => {
                return Err(format!(
                    "the answer has no spiffe_sequence; the stored bundle has {old}"
                ));
            }
            _ => {}
        }
        Ok(bundle)
    }

    /// The X.509 authorities an `https_spiffe` endpoint `id` is checked against: the latest
    /// bundle of its trust domain.
    async fn endpoint_bundle(
        &self,
        id: &SpiffeId,
        federated: &TrustDomain,
        stored: Option<&SpiffeBundle>,
    ) -> Result<X509Bundle, String> {
        let endpoint_td = id.trust_domain();
        let bundle = if &endpoint_td == self.authority.trust_domain() {
            return Ok(self.authority.bundle().x509.clone());
        } else if &endpoint_td == federated {
            stored.cloned()
        } else {
            self.store
                .get_federated_bundle(&endpoint_td)
                .await
                .map_err(|e| format!("cannot read the bundle of {endpoint_td}: {e}"))?
                .and_then(|b| b.parsed())
        };
        bundle
            .ok_or_else(|| format!("no bundle of {endpoint_td} to authenticate {id} with"))?
            .x509_bundle()
            .map_err(|e| format!("the bundle of {endpoint_td} has no usable X.509 authority: {e}"))
    }

    /// F-10: the refresh hint, within `federation_min_poll` and 5 minutes.
    fn interval(&self, bundle: &SpiffeBundle) -> Duration {
        bundle
            .refresh_hint()
            .unwrap_or(DEFAULT_POLL)
            .clamp(self.min_poll, MAX_FEDERATION_POLL.max(self.min_poll))
    }

    /// After `failures` failures in a row: `federation_min_poll` doubled each time, at most
    /// 5 minutes.
    fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        self.min_poll
            .saturating_mul(factor)
            .min(MAX_FEDERATION_POLL.max(self.min_poll))
    }
}

fn relationship_record(
    actor: String,
    action: &str,
    relationship: &FederationRelationship,
) -> NewAuditRecord {
    let record = NewAuditRecord::new(actor, action, relationship.trust_domain.name())
        .detail("url", relationship.endpoint_url.clone());
    match &relationship.profile {
        EndpointProfile::HttpsWeb => record.detail("profile", "https_web"),
        EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => record
            .detail("profile", "https_spiffe")
            .detail("endpoint_spiffe_id", endpoint_spiffe_id.to_string()),
    }
}

#[cfg(test)]
#[path = "federation_tests.rs"]
mod tests;
