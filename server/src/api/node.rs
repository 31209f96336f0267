//! The agent-facing API (`sigil.node.v1.Node`), served over TCP with mTLS.
//!
//! `AttestAgent` is the only call accepted without a client certificate. Every other call
//! authenticates the agent from its X509-SVID on **every call** (`NodeService::authenticate`):
//! the chain must verify against the current bundle at the current time, the agent's node record
//! must exist and not be banned, and the certificate's serial must be the node's current one (or
//! the one its last renewal issued, which then becomes current). A refusal is `PermissionDenied`
//! with a machine-readable reason in the `sigil-reason` response metadata ([`DenyReason`]).
//!
//! What an agent may ask for is decided here, never by the agent: an entry is authorized for an
//! agent when its parent is the agent's ID or the SPIFFE ID of another entry authorized for it
//! (recursively, which is how alias entries work). Certificates are built from the entry; the
//! CSR only proves possession of the key (SPIRE CVE-2021-27098).
//!
//! Every issuance (agent attestation and renewal, workload X509-SVIDs, JWT-SVIDs) is written to
//! the audit log, with the agent as actor, and the credential is returned only once its record
//! is durable: if the audit write fails, the call fails and nothing is handed out. A batch of
//! X509-SVIDs is recorded with one append.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sigil_attestors::join_token::{self, JoinTokenError, JoinTokens};
use sigil_core::tls::SharedBundles;
use sigil_core::{SpiffeId, TrustDomain};
use sigil_proto::node::node_server::Node;
use sigil_proto::node::{
    self as pb, AttestAgentRequest, AttestAgentResponse, BatchNewX509svidRequest,
    BatchNewX509svidResponse, GetBundleRequest, GetBundleResponse, NewJwtsvidRequest,
    NewJwtsvidResponse, NewSessionJwtsvidRequest, NewSessionX509svidRequest, NewX509svidParams,
    RenewAgentRequest, RenewAgentResponse, SyncEntriesRequest, SyncEntriesResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::{debug, info, instrument, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::entry_cache::{Authorized, EntryCache, EntryCacheError, Recent};
use crate::audit::{NewAuditRecord, action};
use crate::session::crl::CrlSet;
use crate::store::{
    AttestedNode, Change, ChangeKind, EntryId, RegistrationEntry, Session, SessionSerial,
    SessionState, Store, StoreError,
};
use crate::tls::PeerInfo;

/// The first path segments of every ID the server reserves for itself and its agents.
pub const RESERVED_PATH_PREFIX: &str = "/sigil/";

/// The most CSRs one `BatchNewX509SVID` call may carry.
pub const MAX_BATCH_SIZE: usize = 500;

/// Entries per snapshot page of `SyncEntries` (a page stays far below gRPC's 4 MB limit).
pub const SNAPSHOT_PAGE_SIZE: usize = 1000;

/// Changes taken from the entry cache per step of a `SyncEntries` stream.
const CHANGES_PER_READ: usize = 1000;

/// Entry ids per resume page of `SyncEntries` (34 bytes each on the wire: 340 KB a page).
pub const RESUME_IDS_PER_PAGE: usize = 10_000;

/// The metadata key carrying the reason of a `PermissionDenied`.
pub const REASON_METADATA_KEY: &str = "sigil-reason";

/// What the node API needs from the signing authority. Declared here, beside its caller;
/// implemented by the server's CA.
pub trait NodeAuthority: Send + Sync + 'static {
    /// Signs an agent X509-SVID for `agent_id` over the CSR's key.
    fn sign_agent_svid(
        &self,
        agent_id: &SpiffeId,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, SignError>;

    /// Signs a workload X509-SVID for `entry` over the CSR's key (identity from the entry).
    fn sign_workload_svid(
        &self,
        entry: &RegistrationEntry,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, SignError>;

    /// Signs a JWT-SVID for `entry`.
    fn sign_jwt_svid(
        &self,
        entry: &RegistrationEntry,
        audience: &[String],
        now: SystemTime,
    ) -> Result<IssuedJwt, SignError>;

    /// The current bundle.
    fn bundle(&self) -> BundleSnapshot;

    /// A receiver that changes whenever the bundle does (its value is the bundle sequence).
    fn subscribe_bundle(&self) -> watch::Receiver<u64>;

    /// The TTLs entries get: (X.509 default, JWT default, largest allowed).
    fn ttls(&self) -> EntryTtls;
}

/// An issued X509-SVID.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
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
pub struct IssuedJwt {
    /// The token.
    pub token: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

/// The trust domain's bundle at one moment.
#[derive(Debug, Clone)]
pub struct BundleSnapshot {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// SPIFFE bundle JSON.
    pub spiffe_json: Vec<u8>,
    /// Its `spiffe_sequence`.
    pub sequence: u64,
}

/// Default and maximum TTLs for entries.
#[derive(Debug, Clone, Copy)]
pub struct EntryTtls {
    /// X509-SVID TTL of entries without their own.
    pub x509_default: Duration,
    /// JWT-SVID TTL of entries without their own.
    pub jwt_default: Duration,
    /// The cap for every TTL (`ca_ttl / 6`).
    pub max: Duration,
}

/// Why signing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The request was bad: malformed CSR, wrong key type, invalid audience.
    #[error("{0}")]
    InvalidRequest(String),
    /// The authority could not sign.
    #[error("signing failed: {0}")]
    Internal(String),
}

/// Why an agent was refused. Sent as `sigil-reason` metadata with `PermissionDenied`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// The agent SVID is expired (or not yet valid).
    Expired,
    /// No valid agent SVID was presented, or the server has no record of this agent.
    NotAttested,
    /// The agent is banned.
    Banned,
    /// The SVID is not the agent's current one: attest again.
    MustReattest,
}

/// The service. Cheap to clone: its parts are shared.
#[derive(Clone)]
pub struct NodeService {
    inner: Arc<Inner>,
}

struct Inner {
    trust_domain: TrustDomain,
    store: Arc<dyn Store>,
    entries: Arc<EntryCache>,
    authority: Arc<dyn NodeAuthority>,
    bundles: SharedBundles,
    clock: Arc<dyn Fn() -> SystemTime + Send + Sync>,
    shutdown: watch::Receiver<bool>,
    crls: watch::Receiver<Arc<CrlSet>>,
}

/// An authenticated agent.
#[derive(Debug, Clone)]
struct Agent {
    id: SpiffeId,
    not_after: SystemTime,
}

/// What one `SyncEntries` stream has told its agent.
#[derive(Debug, Default)]
struct SyncState {
    /// Entry id -> revision, for every entry the agent holds.
    sent: BTreeMap<EntryId, u64>,
    /// The parents whose children concern the agent (see [`Authorized::reachable`]).
    reachable: HashSet<SpiffeId>,
}

/// The workload a session SVID is for, as the agent reported it.
#[derive(Debug, Clone)]
struct SessionWorkload {
    pid: i32,
    uid: u32,
    gid: u32,
    selectors: sigil_core::SelectorSet,
}

// === impl SessionWorkload ===

impl SessionWorkload {
    fn parse(workload: Option<&pb::Workload>) -> Result<Self, Status> {
        let w = workload
            .ok_or_else(|| Status::invalid_argument("workload is required for a session svid"))?;
        if w.pid <= 0 {
            return Err(Status::invalid_argument("workload pid is required"));
        }
        let selectors = w
            .selectors
            .iter()
            .map(|s| sigil_core::Selector::parse(s))
            .collect::<Result<sigil_core::SelectorSet, _>>()
            .map_err(|e| Status::invalid_argument(format!("workload selector: {e}")))?;
        Ok(Self {
            pid: w.pid,
            uid: w.uid,
            gid: w.gid,
            selectors,
        })
    }

    /// `record` with the workload's pid, uid, gid and selectors.
    fn record(&self, record: NewAuditRecord) -> NewAuditRecord {
        record
            .detail("workload_pid", i64::from(self.pid))
            .detail("workload_uid", u64::from(self.uid))
            .detail("workload_gid", u64::from(self.gid))
            .detail(
                "workload_selectors",
                self.selectors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            )
    }
}

// === impl DenyReason ===

impl DenyReason {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::NotAttested => "not_attested",
            Self::Banned => "banned",
            Self::MustReattest => "must_reattest",
        }
    }

    /// Reads the reason of a `PermissionDenied` status, if it carries one.
    pub fn from_status(status: &Status) -> Option<Self> {
        match status.metadata().get(REASON_METADATA_KEY)?.to_str().ok()? {
            "expired" => Some(Self::Expired),
            "not_attested" => Some(Self::NotAttested),
            "banned" => Some(Self::Banned),
            "must_reattest" => Some(Self::MustReattest),
            _ => None,
        }
    }

    fn status(self, message: impl Into<String>) -> Status {
        let mut status = Status::permission_denied(message);
        status.metadata_mut().insert(
            REASON_METADATA_KEY,
            MetadataValue::from_static(self.as_str()),
        );
        status
    }
}

// === impl NodeService ===

impl std::fmt::Debug for NodeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeService")
            .field("trust_domain", &self.inner.trust_domain)
            .finish_non_exhaustive()
    }
}

impl NodeService {
    /// Builds the service. `entries` is the entry cache over `store` (kept current by its own
    /// task, [`EntryCache::run`]); `bundles` is the X.509 bundle set agents' SVIDs are verified
    /// against (kept current by the CA manager); `shutdown` ends open streams when it turns
    /// true; `crls` are the revocation lists sync streams deliver.
    pub fn new(
        trust_domain: TrustDomain,
        store: Arc<dyn Store>,
        entries: Arc<EntryCache>,
        authority: Arc<dyn NodeAuthority>,
        bundles: SharedBundles,
        shutdown: watch::Receiver<bool>,
        crls: watch::Receiver<Arc<CrlSet>>,
    ) -> Self {
        Self::with_clock(
            trust_domain,
            store,
            entries,
            authority,
            bundles,
            shutdown,
            crls,
            Arc::new(SystemTime::now),
        )
    }

    /// [`NodeService::new`] with an explicit clock (for tests).
    #[allow(
        clippy::too_many_arguments,
        reason = "each part is distinct; a builder would add nothing"
    )]
    pub fn with_clock(
        trust_domain: TrustDomain,
        store: Arc<dyn Store>,
        entries: Arc<EntryCache>,
        authority: Arc<dyn NodeAuthority>,
        bundles: SharedBundles,
        shutdown: watch::Receiver<bool>,
        crls: watch::Receiver<Arc<CrlSet>>,
        clock: Arc<dyn Fn() -> SystemTime + Send + Sync>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                trust_domain,
                store,
                entries,
                authority,
                bundles,
                clock,
                shutdown,
                crls,
            }),
        }
    }

    /// The SPIFFE ID an agent attested with `token` gets.
    pub fn join_token_agent_id(
        trust_domain: &TrustDomain,
        token: &str,
    ) -> Result<SpiffeId, Status> {
        join_token::agent_id(trust_domain, token)
            .map_err(|_| Status::permission_denied("join token unknown, expired or already used"))
    }

    fn now(&self) -> SystemTime {
        (self.inner.clock)()
    }

    /// Authenticates the calling agent from its client certificate (see the module docs).
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Agent, Status> {
        let chain = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.cert_chain.clone())
            .ok_or_else(|| {
                DenyReason::NotAttested.status("no agent SVID presented: attest first")
            })?;
        let now = self.now();
        let (serial, not_after) = chain
            .first()
            .and_then(|leaf| leaf_serial_and_expiry(leaf))
            .ok_or_else(|| DenyReason::NotAttested.status("agent SVID cannot be parsed"))?;
        if not_after <= now {
            return Err(DenyReason::Expired.status("agent SVID expired"));
        }
        let id = self.inner.bundles.verify(&chain, now).map_err(|e| {
            debug!(error = %e, "agent svid rejected");
            DenyReason::NotAttested.status(format!("agent SVID rejected: {e}"))
        })?;
        if !is_agent_id(&self.inner.trust_domain, &id) {
            return Err(
                DenyReason::NotAttested.status("the client certificate is not an agent SVID")
            );
        }
        let Some(mut node) = self.inner.store.get_node(&id).await.map_err(store_status)? else {
            return Err(DenyReason::NotAttested.status("no such agent: attest again"));
        };
        if node.banned {
            return Err(DenyReason::Banned.status("agent is banned"));
        }
        if node.serial != serial {
            if node.new_serial.as_deref() == Some(serial.as_str()) {
                // First use of the renewed SVID: it becomes current, the old one stops working.
                node.serial = serial;
                node.new_serial = None;
                node.not_after = not_after;
                self.inner
                    .store
                    .update_node(node)
                    .await
                    .map_err(store_status)?;
            } else {
                return Err(
                    DenyReason::MustReattest.status("agent SVID is not current: attest again")
                );
            }
        }
        Ok(Agent { id, not_after })
    }

    /// The entries authorized for `agent`, from the entry cache: parented to it or,
    /// recursively, to an authorized entry's SPIFFE ID. Expired entries and entries for
    /// reserved IDs authorize nothing.
    async fn authorized(&self, agent: &SpiffeId) -> Result<Authorized, Status> {
        self.inner
            .entries
            .authorized(agent, self.now(), |entry| is_reserved(&entry.spiffe_id))
            .await
            .map_err(cache_status)
    }

    /// `id` if it is authorized for `agent` (the same rule, decided for this one entry).
    async fn authorize_one(
        &self,
        agent: &SpiffeId,
        id: &EntryId,
    ) -> Result<Option<Arc<RegistrationEntry>>, Status> {
        Ok(self
            .authorize(agent, std::slice::from_ref(id))
            .await?
            .remove(id))
    }

    /// The entries among `ids` that are authorized for `agent`.
    async fn authorize(
        &self,
        agent: &SpiffeId,
        ids: &[EntryId],
    ) -> Result<HashMap<EntryId, Arc<RegistrationEntry>>, Status> {
        self.inner
            .entries
            .authorize(agent, ids, self.now(), |entry| {
                is_reserved(&entry.spiffe_id)
            })
            .await
            .map_err(cache_status)
    }

    /// Appends `records` and waits until they are durable; the caller hands out nothing if
    /// this fails.
    async fn audit(&self, records: Vec<NewAuditRecord>) -> Result<(), Status> {
        if records.is_empty() {
            return Ok(());
        }
        self.inner
            .store
            .append_audit(records)
            .await
            .map(drop)
            .map_err(|error| {
                warn!(%error, "audit append failed; credential withheld");
                Status::unavailable("the server could not record the issuance; retry")
            })
    }

    /// Checks a session SVID request: the entry is authorized for `agent` and carries a
    /// session that is active at `now`, and the workload (required) has every selector of
    /// the entry. Returns the entry, the session and the workload.
    async fn session_grant(
        &self,
        agent: &Agent,
        entry_id: &str,
        workload: Option<&pb::Workload>,
        now: SystemTime,
    ) -> Result<(RegistrationEntry, Session, SessionWorkload), Status> {
        let id = EntryId::parse(entry_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let workload = SessionWorkload::parse(workload)?;
        let Some(entry) = self.authorize_one(&agent.id, &id).await? else {
            warn!(agent_id = %agent.id, entry_id, "session svid refused: entry not authorized for agent");
            return Err(Status::permission_denied(
                "entry is not authorized for this agent",
            ));
        };
        let Some(session_id) = &entry.session_id else {
            return Err(Status::failed_precondition(
                "entry is not a privileged session's: use BatchNewX509SVID",
            ));
        };
        let Some(session) = self
            .inner
            .store
            .get_session(session_id)
            .await
            .map_err(store_status)?
        else {
            return Err(Status::permission_denied("no such session"));
        };
        if session.state != SessionState::Active || session.expires_at <= now {
            return Err(Status::permission_denied(format!(
                "session is {}",
                if session.state == SessionState::Active {
                    "at its end"
                } else {
                    session.state.as_str()
                }
            )));
        }
        if !entry.selectors.matches(&workload.selectors) {
            warn!(agent_id = %agent.id, session_id = %session.id, "session svid refused: workload selectors do not match");
            return Err(Status::permission_denied(
                "the workload's selectors do not match the session's",
            ));
        }
        Ok((RegistrationEntry::clone(&entry), session, workload))
    }

    fn bundle_message(&self) -> pb::Bundle {
        let b = self.inner.authority.bundle();
        pb::Bundle {
            trust_domain: b.trust_domain.name().to_owned(),
            spiffe_bundle: b.spiffe_json,
            sequence: b.sequence,
            crls: self.inner.crls.borrow().ders(),
        }
    }

    fn entry_message(&self, entry: &RegistrationEntry) -> pb::Entry {
        let ttls = self.inner.authority.ttls();
        pb::Entry {
            id: entry.id.as_str().to_owned(),
            spiffe_id: entry.spiffe_id.to_string(),
            parent_id: entry.parent_id.to_string(),
            selectors: entry.selectors.iter().map(ToString::to_string).collect(),
            x509_svid_ttl: entry
                .x509_svid_ttl
                .unwrap_or(ttls.x509_default)
                .min(ttls.max)
                .as_secs(),
            jwt_svid_ttl: entry
                .jwt_svid_ttl
                .unwrap_or(ttls.jwt_default)
                .min(ttls.max)
                .as_secs(),
            dns_names: entry.dns_names.clone(),
            hint: entry.hint.clone(),
            expires_at: entry.expires_at.map_or(0, unix_seconds),
            revision: entry.revision,
            session: entry.session_id.as_ref().map(|id| pb::Session {
                id: id.as_str().to_owned(),
            }),
        }
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    type SyncEntriesStream =
        Pin<Box<dyn Stream<Item = Result<SyncEntriesResponse, Status>> + Send>>;

    #[instrument(skip_all, fields(peer = ?request.remote_addr()))]
    async fn attest_agent(
        &self,
        request: Request<AttestAgentRequest>,
    ) -> Result<Response<AttestAgentResponse>, Status> {
        let req = request.into_inner();
        if req.join_token.is_empty() {
            return Err(Status::invalid_argument("join_token is required"));
        }
        if req.csr.is_empty() {
            return Err(Status::invalid_argument("csr is required"));
        }
        let now = self.now();
        let agent_id = Self::join_token_agent_id(&self.inner.trust_domain, &req.join_token)?;
        // Check the CSR before spending the token, so a malformed request does not burn it.
        if let Err(e) = check_csr(&req.csr) {
            return Err(Status::invalid_argument(e));
        }
        let alias = match JoinTokens::consume(&*self.inner.store, &req.join_token, now).await {
            Ok(alias) => alias,
            Err(e @ (JoinTokenError::NotFound | JoinTokenError::Expired)) => {
                warn!(error = %e, "attestation refused");
                return Err(DenyReason::NotAttested.status(e.to_string()));
            }
            Err(e) => {
                warn!(error = %e, "attestation failed");
                return Err(Status::unavailable(
                    "the server's store is unavailable; retry",
                ));
            }
        };
        let svid = self
            .inner
            .authority
            .sign_agent_svid(&agent_id, &req.csr, now)
            .map_err(sign_status)?;
        let mut record = agent_svid_record(&agent_id, action::AGENT_ATTEST, &svid)
            .detail("attestation_type", "join_token");
        if let Some(alias) = &alias {
            record = record.detail("alias_spiffe_id", alias.to_string());
        }
        self.audit(vec![record]).await?;
        let node = AttestedNode {
            spiffe_id: agent_id.clone(),
            attestation_type: "join_token".into(),
            serial: svid.serial.clone(),
            new_serial: None,
            not_after: svid.not_after,
            banned: false,
            selectors: Default::default(),
            created_at: now,
            updated_at: now,
        };
        self.inner
            .store
            .create_node(node)
            .await
            .map_err(store_status)?;
        if let Some(alias) = alias {
            let entry = crate::store::NewEntry::new(alias, agent_id.clone(), Default::default());
            match self.inner.store.create_entry(entry).await {
                Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(store_status(e)),
            }
        }
        info!(agent_id = %agent_id, "agent attested");
        Ok(Response::new(AttestAgentResponse {
            svid: Some(svid_message(&svid)),
            bundle: Some(self.bundle_message()),
        }))
    }

    #[instrument(skip_all)]
    async fn renew_agent(
        &self,
        request: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let agent = self.authenticate(&request).await?;
        let csr = request.into_inner().csr;
        let svid = self
            .inner
            .authority
            .sign_agent_svid(&agent.id, &csr, self.now())
            .map_err(sign_status)?;
        self.audit(vec![agent_svid_record(
            &agent.id,
            action::AGENT_RENEW,
            &svid,
        )])
        .await?;
        let Some(mut node) = self
            .inner
            .store
            .get_node(&agent.id)
            .await
            .map_err(store_status)?
        else {
            return Err(DenyReason::NotAttested.status("no such agent: attest again"));
        };
        node.new_serial = Some(svid.serial.clone());
        self.inner
            .store
            .update_node(node)
            .await
            .map_err(store_status)?;
        info!(agent_id = %agent.id, "agent svid renewed");
        Ok(Response::new(RenewAgentResponse {
            svid: Some(svid_message(&svid)),
        }))
    }

    #[instrument(skip_all)]
    async fn sync_entries(
        &self,
        request: Request<SyncEntriesRequest>,
    ) -> Result<Response<Self::SyncEntriesStream>, Status> {
        let agent = self.authenticate(&request).await?;
        let since = request.into_inner().since_revision;
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        tokio::spawn(async move {
            if let Err(status) = service.run_sync(agent, since, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[instrument(skip_all)]
    async fn batch_new_x509svid(
        &self,
        request: Request<BatchNewX509svidRequest>,
    ) -> Result<Response<BatchNewX509svidResponse>, Status> {
        let agent = self.authenticate(&request).await?;
        let params = request.into_inner().params;
        if params.len() > MAX_BATCH_SIZE {
            return Err(Status::invalid_argument(format!(
                "{} CSRs in one batch; the maximum is {MAX_BATCH_SIZE}",
                params.len()
            )));
        }
        let now = self.now();
        let parsed: Vec<Result<EntryId, Status>> = params
            .iter()
            .map(|p| {
                EntryId::parse(&p.entry_id).map_err(|e| Status::invalid_argument(e.to_string()))
            })
            .collect();
        let valid: Vec<EntryId> = parsed.iter().flatten().cloned().collect();
        let granted = self.authorize(&agent.id, &valid).await?;
        let jobs: Vec<(NewX509svidParams, Result<Arc<RegistrationEntry>, Status>)> = params
            .into_iter()
            .zip(parsed)
            .map(|(param, id)| {
                let job = id.and_then(|id| match granted.get(&id).cloned() {
                    None => {
                        warn!(agent_id = %agent.id, entry_id = %param.entry_id, "svid refused: entry not authorized for agent");
                        Err(Status::permission_denied(
                            "entry is not authorized for this agent",
                        ))
                    }
                    Some(entry) if entry.session_id.is_some() => Err(Status::failed_precondition(
                        "entry belongs to a privileged session: use NewSessionX509SVID",
                    )),
                    Some(entry) => Ok(entry),
                });
                (param, job)
            })
            .collect();
        // The signing itself (a CSR verify and a signature each) runs off the async workers,
        // so that a large batch does not hold up other agents' calls.
        let authority = self.inner.authority.clone();
        let signed = tokio::task::spawn_blocking(move || {
            jobs.into_iter()
                .map(|(param, job)| {
                    let outcome = job.and_then(|entry| {
                        authority
                            .sign_workload_svid(&entry, &param.csr, now)
                            .map_err(sign_status)
                    });
                    (param.entry_id, outcome)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|error| {
            warn!(%error, "signing task failed");
            Status::internal("signing failed")
        })?;
        let mut outcomes = Vec::with_capacity(signed.len());
        let mut records = Vec::new();
        for (entry_id, outcome) in signed {
            if let Ok(svid) = &outcome {
                records.push(
                    NewAuditRecord::new(
                        agent.id.to_string(),
                        action::SVID_X509_ISSUE,
                        svid.spiffe_id.to_string(),
                    )
                    .detail("spiffe_id", svid.spiffe_id.to_string())
                    .detail("entry_id", entry_id.clone())
                    .detail("serial", svid.serial.clone())
                    .time_detail("not_after", svid.not_after)
                    .detail("agent", agent.id.to_string()),
                );
            }
            outcomes.push((entry_id, outcome));
        }
        // One append for the batch; nothing is returned unless it is durable.
        self.audit(records).await?;
        let mut results = Vec::with_capacity(outcomes.len());
        for (entry_id, outcome) in outcomes {
            results.push(pb::X509svidResult {
                entry_id,
                result: Some(match outcome {
                    Ok(svid) => pb::x509svid_result::Result::Svid(svid_message(&svid)),
                    Err(status) => pb::x509svid_result::Result::Error(pb::Error {
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                    }),
                }),
            });
        }
        Ok(Response::new(BatchNewX509svidResponse { results }))
    }

    #[instrument(skip_all)]
    async fn new_jwtsvid(
        &self,
        request: Request<NewJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        let agent = self.authenticate(&request).await?;
        let req = request.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience is required"));
        }
        let id =
            EntryId::parse(&req.entry_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let Some(entry) = self.authorize_one(&agent.id, &id).await? else {
            warn!(agent_id = %agent.id, entry_id = %req.entry_id, "jwt refused: entry not authorized for agent");
            return Err(Status::permission_denied(
                "entry is not authorized for this agent",
            ));
        };
        if entry.session_id.is_some() {
            return Err(Status::failed_precondition(
                "entry belongs to a privileged session: use NewSessionJWTSVID",
            ));
        }
        let jwt = self
            .inner
            .authority
            .sign_jwt_svid(&entry, &req.audience, self.now())
            .map_err(sign_status)?;
        let record = NewAuditRecord::new(
            agent.id.to_string(),
            action::SVID_JWT_ISSUE,
            entry.spiffe_id.to_string(),
        )
        .detail("spiffe_id", entry.spiffe_id.to_string())
        .detail("entry_id", entry.id.as_str())
        .detail("audience", req.audience.clone())
        .time_detail("expires_at", jwt.expires_at)
        .detail("agent", agent.id.to_string());
        self.audit(vec![record]).await?;
        Ok(Response::new(NewJwtsvidResponse {
            spiffe_id: entry.spiffe_id.to_string(),
            token: jwt.token,
            expires_at: unix_seconds(jwt.expires_at),
        }))
    }

    #[instrument(skip_all)]
    async fn new_session_x509svid(
        &self,
        request: Request<NewSessionX509svidRequest>,
    ) -> Result<Response<pb::X509svid>, Status> {
        let agent = self.authenticate(&request).await?;
        let req = request.into_inner();
        let now = self.now();
        let (entry, session, workload) = self
            .session_grant(&agent, &req.entry_id, req.workload.as_ref(), now)
            .await?;
        let svid = self
            .inner
            .authority
            .sign_workload_svid(&entry, &req.csr, now)
            .map_err(sign_status)?;
        // Record the serial on the session first (so a revocation finds it), then audit; the
        // certificate is returned only when both are durable and the session is still active.
        let recorded = self
            .inner
            .store
            .add_session_serial(
                &session.id,
                SessionSerial {
                    serial: svid.serial.clone(),
                    not_after: svid.not_after,
                    authority_id: svid.authority_id.clone(),
                },
            )
            .await
            .map_err(store_status)?;
        let record = workload
            .record(
                NewAuditRecord::new(
                    agent.id.to_string(),
                    action::SVID_X509_ISSUE,
                    svid.spiffe_id.to_string(),
                )
                .detail("spiffe_id", svid.spiffe_id.to_string())
                .detail("entry_id", entry.id.as_str())
                .detail("serial", svid.serial.clone())
                .time_detail("not_after", svid.not_after)
                .detail("agent", agent.id.to_string()),
            )
            .detail("session_id", session.id.as_str())
            .detail("ticket", session.ticket.clone());
        self.audit(vec![record]).await?;
        if recorded.state != SessionState::Active {
            return Err(Status::permission_denied("the session ended"));
        }
        info!(agent_id = %agent.id, session_id = %session.id, serial = %svid.serial, "session svid issued");
        Ok(Response::new(svid_message(&svid)))
    }

    #[instrument(skip_all)]
    async fn new_session_jwtsvid(
        &self,
        request: Request<NewSessionJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        let agent = self.authenticate(&request).await?;
        let req = request.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience is required"));
        }
        let now = self.now();
        let (entry, session, workload) = self
            .session_grant(&agent, &req.entry_id, req.workload.as_ref(), now)
            .await?;
        let jwt = self
            .inner
            .authority
            .sign_jwt_svid(&entry, &req.audience, now)
            .map_err(sign_status)?;
        let record = workload
            .record(
                NewAuditRecord::new(
                    agent.id.to_string(),
                    action::SVID_JWT_ISSUE,
                    entry.spiffe_id.to_string(),
                )
                .detail("spiffe_id", entry.spiffe_id.to_string())
                .detail("entry_id", entry.id.as_str())
                .detail("audience", req.audience.clone())
                .time_detail("expires_at", jwt.expires_at)
                .detail("agent", agent.id.to_string()),
            )
            .detail("session_id", session.id.as_str())
            .detail("ticket", session.ticket.clone());
        self.audit(vec![record]).await?;
        Ok(Response::new(NewJwtsvidResponse {
            spiffe_id: entry.spiffe_id.to_string(),
            token: jwt.token,
            expires_at: unix_seconds(jwt.expires_at),
        }))
    }

    #[instrument(skip_all)]
    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<GetBundleResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(GetBundleResponse {
            bundle: Some(self.bundle_message()),
        }))
    }
}

// === SyncEntries ===

type SyncSender = mpsc::Sender<Result<SyncEntriesResponse, Status>>;

impl NodeService {
    /// Runs one `SyncEntries` stream until the client goes away, its SVID expires, or the
    /// server shuts down. Everything it sends comes from the entry cache: the snapshot (or the
    /// resume pages), then each change the cache applies, filtered for this agent.
    async fn run_sync(&self, agent: Agent, since: u64, tx: &SyncSender) -> Result<(), Status> {
        let cache = &self.inner.entries;
        let mut revisions = cache.subscribe();
        let mut bundle_updates = self.inner.authority.subscribe_bundle();
        let mut crl_updates = self.inner.crls.clone();
        let mut crls_open = true;
        let mut shutdown = self.inner.shutdown.clone();
        let mut state = SyncState::default();

        // Resume from `since` when it is a revision of this store; else snapshot. Either way
        // the last page carries the CRLs; a resumed agent also gets the bundle, which may have
        // changed while it was away.
        let mut crl_generation = crl_updates.borrow_and_update().generation;
        let mut bundle_sequence = *bundle_updates.borrow_and_update();
        let mut revision = match self.resume(&agent, since, &mut state, tx).await? {
            Some(revision) => revision,
            None => self.snapshot(&agent, &mut state, tx).await?,
        };
        let expiry = tokio::time::sleep(
            agent
                .not_after
                .duration_since(self.now())
                .unwrap_or(Duration::ZERO),
        );
        tokio::pin!(expiry);

        loop {
            // Every change the cache has applied after `revision`.
            loop {
                let changes = match cache.changes_after(revision, CHANGES_PER_READ) {
                    Recent::Changes(changes) => changes,
                    Recent::Gone => {
                        // Fell too far behind: start over with a snapshot.
                        revision = self.snapshot(&agent, &mut state, tx).await?;
                        continue;
                    }
                };
                if changes.is_empty() {
                    break;
                }
                let (out, seen) = self.apply_changes(&agent, &changes, &mut state).await?;
                if !out.is_empty() && !send_changes(tx, out).await {
                    return Ok(());
                }
                revision = seen;
            }
            let current_bundle = *bundle_updates.borrow_and_update();
            let current_crls = crl_updates.borrow_and_update().generation;
            if current_bundle != bundle_sequence || current_crls != crl_generation {
                bundle_sequence = current_bundle;
                crl_generation = current_crls;
                let change = pb::Change {
                    revision,
                    change: Some(pb::change::Change::Bundle(self.bundle_message())),
                };
                if !send_changes(tx, vec![change]).await {
                    return Ok(());
                }
            }
            tokio::select! {
                changed = revisions.changed() => if changed.is_err() { return Ok(()) },
                changed = bundle_updates.changed() => if changed.is_err() { return Ok(()) },
                changed = crl_updates.changed(), if crls_open => if changed.is_err() { crls_open = false },
                () = &mut expiry => {
                    return Err(DenyReason::Expired.status("agent SVID expired: reconnect with the renewed SVID"));
                }
                _ = shutdown.wait_for(|stop| *stop) => return Err(Status::unavailable("server shutting down")),
                () = tx.closed() => return Ok(()),
            }
        }
    }

    /// Sends the agent's authorized entries in pages; returns the snapshot's revision.
    async fn snapshot(
        &self,
        agent: &Agent,
        state: &mut SyncState,
        tx: &SyncSender,
    ) -> Result<u64, Status> {
        let authorized = self.authorized(&agent.id).await?;
        let revision = authorized.revision;
        state.sent = authorized
            .entries
            .iter()
            .map(|(id, e)| (id.clone(), e.revision))
            .collect();
        let entries: Vec<_> = authorized.entries.values().collect();
        let mut pages = entries.chunks(SNAPSHOT_PAGE_SIZE).peekable();
        loop {
            let chunk = pages.next().unwrap_or_default();
            let last = pages.peek().is_none();
            let page = pb::SnapshotPage {
                entries: chunk.iter().map(|e| self.entry_message(e)).collect(),
                revision,
                last,
                crls: if last {
                    self.inner.crls.borrow().ders()
                } else {
                    vec![]
                },
            };
            if !send(tx, pb::sync_entries_response::Message::Snapshot(page)).await || last {
                break;
            }
        }
        debug!(agent_id = %agent.id, entries = state.sent.len(), revision, "sync snapshot sent");
        state.reachable = authorized.reachable;
        Ok(revision)
    }

    /// Resumes after `since` without sending what the agent already holds: resume pages carry
    /// in full the authorized entries that changed after `since` and those below another entry
    /// (their authorization depends on their ancestors, which may have changed), and by id the
    /// entries parented to the agent itself that did not change (authorized now and unchanged
    /// since `since`, so authorized then too). The agent keeps exactly these. Only ids of
    /// entries authorized for this agent are ever sent. `None` when a snapshot is needed
    /// instead (`since` is 0 or newer than anything this server has).
    async fn resume(
        &self,
        agent: &Agent,
        since: u64,
        state: &mut SyncState,
        tx: &SyncSender,
    ) -> Result<Option<u64>, Status> {
        if since == 0 {
            return Ok(None);
        }
        let authorized = self.authorized(&agent.id).await?;
        let revision = authorized.revision;
        if since > revision {
            return Ok(None);
        }
        let (unchanged, resent): (Vec<_>, Vec<_>) = authorized
            .entries
            .values()
            .partition(|e| e.revision <= since && e.parent_id == agent.id);
        state.sent = authorized
            .entries
            .iter()
            .map(|(id, e)| (id.clone(), e.revision))
            .collect();
        let mut entries = resent.chunks(SNAPSHOT_PAGE_SIZE);
        let mut ids = unchanged.chunks(RESUME_IDS_PER_PAGE);
        loop {
            let (chunk, id_chunk) = (entries.next(), ids.next());
            let last = entries.len() == 0 && ids.len() == 0;
            let page = pb::ResumePage {
                entries: chunk
                    .unwrap_or_default()
                    .iter()
                    .map(|e| self.entry_message(e))
                    .collect(),
                unchanged_ids: id_chunk
                    .unwrap_or_default()
                    .iter()
                    .map(|e| e.id.as_str().to_owned())
                    .collect(),
                revision,
                last,
                bundle: last.then(|| self.bundle_message()),
            };
            if !send(tx, pb::sync_entries_response::Message::Resume(page)).await {
                return Ok(Some(revision));
            }
            if last {
                break;
            }
        }
        debug!(agent_id = %agent.id, since, revision, resent = resent.len(), unchanged = unchanged.len(), "sync resumed");
        state.reachable = authorized.reachable;
        Ok(Some(revision))
    }

    /// Turns changes into this agent's changes: upserts for entries it is (still) authorized
    /// for, deletes for entries it no longer is. Changes that cannot concern the agent cost a
    /// set lookup each; the others trigger a walk of the agent's entries in the cache. Returns
    /// the changes and the cache revision they bring the agent to (at least the last change's).
    async fn apply_changes(
        &self,
        agent: &Agent,
        changes: &[Arc<Change>],
        state: &mut SyncState,
    ) -> Result<(Vec<pb::Change>, u64), Status> {
        let relevant = changes.iter().any(|c| {
            let e = entry_of(c);
            state.sent.contains_key(&e.id) || state.reachable.contains(&e.parent_id)
        });
        if !relevant {
            return Ok((vec![], changes.last().map_or(0, |c| c.revision)));
        }
        let authorized = self.authorized(&agent.id).await?;
        let revision = authorized.revision;
        let mut out = Vec::new();
        for (id, entry) in &authorized.entries {
            if state.sent.get(id) != Some(&entry.revision) {
                state.sent.insert(id.clone(), entry.revision);
                out.push(pb::Change {
                    revision: entry.revision,
                    change: Some(pb::change::Change::Upsert(self.entry_message(entry))),
                });
            }
        }
        let gone: Vec<EntryId> = state
            .sent
            .keys()
            .filter(|id| !authorized.entries.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            state.sent.remove(&id);
            out.push(pb::Change {
                revision,
                change: Some(pb::change::Change::Delete(id.as_str().to_owned())),
            });
        }
        state.reachable = authorized.reachable;
        Ok((out, revision))
    }
}

async fn send(tx: &SyncSender, message: pb::sync_entries_response::Message) -> bool {
    tx.send(Ok(SyncEntriesResponse {
        message: Some(message),
    }))
    .await
    .is_ok()
}

async fn send_changes(tx: &SyncSender, changes: Vec<pb::Change>) -> bool {
    send(
        tx,
        pb::sync_entries_response::Message::Changes(pb::Changes { changes }),
    )
    .await
}

fn entry_of(change: &Change) -> &RegistrationEntry {
    match &change.kind {
        ChangeKind::EntryUpserted(e) | ChangeKind::EntryDeleted(e) => e,
    }
}

// === helpers ===

/// The audit record of an agent SVID (attestation or renewal).
fn agent_svid_record(agent_id: &SpiffeId, action: &str, svid: &IssuedSvid) -> NewAuditRecord {
    NewAuditRecord::new(agent_id.to_string(), action, agent_id.to_string())
        .detail("agent", agent_id.to_string())
        .detail("serial", svid.serial.clone())
        .time_detail("not_after", svid.not_after)
}

/// True for `spiffe://TD/sigil/agent/...`.
fn is_agent_id(trust_domain: &TrustDomain, id: &SpiffeId) -> bool {
    id.is_member_of(trust_domain) && id.path().starts_with("/sigil/agent/")
}

/// True for IDs under the reserved `/sigil/` prefix, which no entry may grant.
pub fn is_reserved(id: &SpiffeId) -> bool {
    id.path().starts_with(RESERVED_PATH_PREFIX) || id.path() == "/sigil"
}

fn leaf_serial_and_expiry(leaf: &[u8]) -> Option<(String, SystemTime)> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let serial = hex(cert.raw_serial());
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some((serial, UNIX_EPOCH + Duration::from_secs(not_after)))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_csr(csr: &[u8]) -> Result<(), String> {
    x509_parser::certification_request::X509CertificationRequest::from_der(csr)
        .map(|_| ())
        .map_err(|e| format!("malformed CSR: {e}"))
}

fn svid_message(svid: &IssuedSvid) -> pb::X509svid {
    pb::X509svid {
        spiffe_id: svid.spiffe_id.to_string(),
        cert_chain: svid.chain_der.clone(),
        expires_at: unix_seconds(svid.not_after),
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Maps store errors to gRPC statuses without leaking internal detail.
fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::NotFound { resource, .. } => Status::not_found(format!("{resource} not found")),
        StoreError::AlreadyExists { resource, .. } => {
            Status::already_exists(format!("{resource} already exists"))
        }
        other => {
            warn!(error = %other, "store call failed");
            Status::unavailable("the server's store is unavailable; retry")
        }
    }
}

fn cache_status(error: EntryCacheError) -> Status {
    match error {
        EntryCacheError::Stale => {
            warn!(%error, "authorization refused");
            Status::unavailable("the server cannot read its entries now; retry")
        }
    }
}

fn sign_status(error: SignError) -> Status {
    match error {
        SignError::InvalidRequest(message) => Status::invalid_argument(message),
        SignError::Internal(message) => {
            warn!(error = %message, "signing failed");
            Status::internal("signing failed")
        }
    }
}
