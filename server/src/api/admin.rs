//! The operator API (`sigil.admin.v1.Admin`), served on a local Unix socket.
//!
//! Every call is authorized by the caller's kernel credentials, read by the kernel at connect
//! time (SO_PEERCRED): uid 0 or a uid in `admin_uids` may call; anyone else gets
//! `PermissionDenied`, whatever the socket's file permissions allow. The caller's uid is the
//! actor of every change.
//!
//! Each handler authorizes the caller, parses the request into domain types (every parse
//! problem reported at once as `InvalidArgument`), calls one service and maps its error with
//! that service's one function in [`super::status`]. The services validate, write the store and
//! audit (actor `uid:N`); a credential minted here is handed out only after its record is
//! durable.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_core::hex::encode as hex;
use sigil_core::time::{from_unix_seconds, unix_seconds};
use sigil_core::{Selector, SelectorSet, SpiffeBundle, SpiffeId, TrustDomain};
use sigil_proto::admin::admin_server::Admin;
use sigil_proto::admin::{
    self as pb, AgentRequest, CountEntriesRequest, CountEntriesResponse, CreateEntriesRequest,
    CreateEntriesResponse, DeleteEntryRequest, DeleteFederatedBundleRequest,
    GenerateJoinTokenRequest, GenerateJoinTokenResponse, GetBundleRequest, GetEntryRequest,
    HealthcheckRequest, HealthcheckResponse, ListAgentsRequest, ListAgentsResponse,
    ListEntriesRequest, ListEntriesResponse, ListFederatedBundlesRequest,
    ListFederatedBundlesResponse, MintJwtsvidRequest, MintJwtsvidResponse, MintX509svidRequest,
    MintX509svidResponse, SetFederatedBundleRequest, UpdateEntryRequest,
};
use sigil_proto::admin::{
    AcknowledgeAuditDivergenceRequest, AcknowledgeAuditDivergenceResponse,
    SignAuditCheckpointRequest, SignAuditCheckpointResponse,
};
use sigil_proto::admin::{
    AuditCheckpointInfo, ListAuditRequest, ListAuditResponse, ListSessionAuditRequest,
    ListSessionsRequest, ListSessionsResponse, OpenSessionRequest, RevokeSessionRequest,
    SessionRequest, VerifyAuditRequest, VerifyAuditResponse,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};

use super::audit::{
    checkpoint_message, divergence_message, parse_checkpoint, peer_chain_message, record_message,
};
use super::status::{
    agent_status, audit_status, bundle_status, entry_status, federation_status, session_status,
    store_status, svid_status,
};
use crate::audit::{AuditFilter, uid_actor};
use crate::ca::{AuthorityKind, AuthorityState};
use crate::policy::TtlPolicy;
use crate::service::agents::Agents;
use crate::service::audit::AuditLog;
use crate::service::authority::Authority;
use crate::service::bundles::{BundleFormat, Bundles};
use crate::service::entries::Entries;
use crate::service::federation::{Federation, RelationshipSpec, RelationshipView};
use crate::service::sessions::{OpenRequest, Sessions};
use crate::service::svids::Svids;
use crate::store::{
    AttestedNode, EndpointProfile, EntryFilter, EntryId, NewEntry, PageRequest, RegistrationEntry,
    Session, SessionFilter, SessionId, SessionState,
};

/// The services the admin API calls.
#[derive(Debug, Clone)]
pub(crate) struct AdminServices {
    /// Entries.
    pub entries: Arc<Entries>,
    /// Agents and join tokens.
    pub agents: Arc<Agents>,
    /// Operator mints.
    pub svids: Arc<Svids>,
    /// Bundles.
    pub bundles: Arc<Bundles>,
    /// Federation relationships.
    pub federation: Arc<Federation>,
    /// Sessions.
    pub sessions: Arc<Sessions>,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// The authority (health, TTLs).
    pub authority: Arc<Authority>,
    /// The entry cache (health: how current it is).
    pub entry_cache: Arc<crate::service::entry_cache::EntryCache>,
    /// The other servers' audit chains.
    pub audit_peers: Arc<crate::service::audit_peers::PeerChains>,
}

/// The admin service.
#[derive(Clone)]
pub(crate) struct AdminService {
    services: AdminServices,
    admin_uids: Arc<Vec<u32>>,
}

/// Why the admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminSocketError {
    /// Another server answers on the socket.
    #[error("admin socket {0} is in use by a running server")]
    InUse(String),
    /// A file that is not a socket is in the way.
    #[error("{0} exists and is not a socket; remove it or choose another admin_socket")]
    NotASocket(String),
    /// The socket's directory is not this server's alone (or could not be created).
    #[error("admin socket directory: {0}")]
    Dir(#[from] sigil_daemon::PrivatePathError),
    /// Creating the directory, removing a stale socket, binding or setting the mode failed.
    #[error("cannot set up admin socket {path}: {source}")]
    Io {
        /// The socket path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The admin socket's connections, by whether the caller's uid (SO_PEERCRED at accept) may use
/// the admin API. Each kind is served by its own gRPC server: a uid that may not gets one stream
/// and small messages, enough to be told so, and cannot hold memory or slots admins need.
#[derive(Debug)]
pub(crate) struct AdminIncoming {
    /// Connections of uid 0 and `admin_uids`.
    pub(crate) admins: mpsc::Receiver<std::io::Result<UnixStream>>,
    /// Everyone else's.
    pub(crate) others: mpsc::Receiver<std::io::Result<UnixStream>>,
}

/// Accepts on `listener` and sorts each connection by its caller's uid (see [`AdminIncoming`]).
/// A connection whose credentials cannot be read goes with the others. The loop ends when the
/// admins' receiver is dropped.
pub(crate) fn split_by_uid(listener: UnixListener, admin_uids: Vec<u32>) -> AdminIncoming {
    let (admins_tx, admins) = mpsc::channel(16);
    let (others_tx, others) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        warn!(%error, "admin socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = admins_tx.closed() => return,
            };
            let admin = stream
                .peer_cred()
                .is_ok_and(|cred| cred.uid() == 0 || admin_uids.contains(&cred.uid()));
            let tx = if admin { &admins_tx } else { &others_tx };
            // Never wait on a full queue: the accept loop serves admins too.
            let _ = tx.try_send(Ok(stream));
        }
    });
    AdminIncoming { admins, others }
}

/// Binds the admin socket: creates its directory (mode 0711: reachable, not listable), replaces
/// a stale socket left by a crash (refusing if a live server answers on it), and makes the
/// socket connectable by every local user (0666); authorization is by uid, per call.
pub(crate) async fn bind_admin_socket(path: &Path) -> Result<UnixListener, AdminSocketError> {
    let shown = path.display().to_string();
    let io = |source| AdminSocketError::Io {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        let existed = dir.exists();
        sigil_daemon::check_private_dir(dir, 0o711)?;
        if !existed {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(io)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(AdminSocketError::NotASocket(shown));
            }
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(AdminSocketError::InUse(shown));
            }
            std::fs::remove_file(path).map_err(io)?;
            info!(path = %shown, "replaced a stale admin socket");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
    Ok(listener)
}

// === impl AdminService ===

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService")
            .field("admin_uids", &self.admin_uids)
            .finish_non_exhaustive()
    }
}

impl AdminService {
    /// Builds the service over `services`; uid 0 and `admin_uids` may call it.
    pub(crate) fn new(services: AdminServices, admin_uids: Vec<u32>) -> Self {
        Self {
            services,
            admin_uids: Arc::new(admin_uids),
        }
    }

    /// The caller's uid, if it may use the admin API.
    fn authorize<T>(&self, request: &Request<T>) -> Result<u32, Status> {
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid())
            .ok_or_else(|| Status::permission_denied("caller credentials unavailable"))?;
        if uid == 0 || self.admin_uids.contains(&uid) {
            Ok(uid)
        } else {
            warn!(uid, "admin call refused: uid not allowed");
            Err(Status::permission_denied(format!(
                "uid {uid} may not use the admin API: run as root or add the uid to admin_uids"
            )))
        }
    }

    fn ttls(&self) -> &TtlPolicy {
        self.services.authority.ttls()
    }

    fn trust_domain(&self) -> &TrustDomain {
        self.services.authority.trust_domain()
    }

    fn entry_message(&self, entry: &RegistrationEntry) -> pb::Entry {
        pb::Entry {
            id: entry.id.as_str().to_owned(),
            spiffe_id: entry.spiffe_id.to_string(),
            parent_id: entry.parent_id.to_string(),
            selectors: entry.selectors.iter().map(ToString::to_string).collect(),
            x509_svid_ttl: entry.x509_svid_ttl.map_or(0, |d| d.as_secs()),
            jwt_svid_ttl: entry.jwt_svid_ttl.map_or(0, |d| d.as_secs()),
            dns_names: entry.dns_names.clone(),
            hint: entry.hint.clone(),
            expires_at: entry.expires_at.map_or(0, unix_seconds),
            created_at: unix_seconds(entry.created_at),
            revision: entry.revision,
            effective_x509_svid_ttl: self.ttls().x509(entry.x509_svid_ttl).as_secs(),
            effective_jwt_svid_ttl: self.ttls().jwt(entry.jwt_svid_ttl).as_secs(),
            federates_with: entry
                .federates_with
                .iter()
                .map(|td| td.name().to_owned())
                .collect(),
        }
    }

    fn bundle_message(&self) -> pb::Bundle {
        let (bundle, crls) = self.services.bundles.own();
        pb::Bundle {
            trust_domain: bundle.trust_domain.name().to_owned(),
            spiffe_bundle: bundle.spiffe_json.clone(),
            pem: bundle.x509.to_pem(),
            sequence: bundle.sequence,
            crls: crls
                .crls
                .iter()
                .map(|c| pb::Crl {
                    authority_id: c.authority_id.clone(),
                    der: c.der.clone(),
                    crl_number: c.crl_number,
                    this_update: unix_seconds(c.this_update),
                    next_update: unix_seconds(c.next_update),
                    revoked_serials: c.revoked_serials.clone(),
                })
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn healthcheck(
        &self,
        request: Request<HealthcheckRequest>,
    ) -> Result<Response<HealthcheckResponse>, Status> {
        self.authorize(&request)?;
        let authority = &self.services.authority;
        let active = authority
            .ca()
            .authorities()
            .into_iter()
            .find(|a| a.kind == AuthorityKind::X509 && a.state == AuthorityState::Active)
            .ok_or_else(|| Status::unavailable("no active X.509 authority"))?;
        if active.not_after <= SystemTime::now() {
            return Err(Status::unavailable(
                "the active X.509 authority has expired",
            ));
        }
        if let Some(reason) = self.services.audit.signing_blocked() {
            return Err(Status::unavailable(reason));
        }
        use crate::service::entry_cache::Freshness;
        let warning = match self.services.entry_cache.freshness().await {
            Freshness::Current => String::new(),
            Freshness::Degraded { since } => format!(
                "the store has not answered for {} s: agents are authorized from the entry \
                 cache until max_store_staleness",
                since.as_secs()
            ),
            Freshness::Stale { since } => {
                return Err(Status::unavailable(format!(
                    "the store has not answered for {} s, longer than max_store_staleness: \
                     nothing is authorized until it does",
                    since.as_secs()
                )));
            }
        };
        Ok(Response::new(HealthcheckResponse {
            trust_domain: self.trust_domain().name().to_owned(),
            bundle_sequence: authority.bundle().sequence,
            active_authority_expires_at: unix_seconds(active.not_after),
            warning,
        }))
    }

    #[instrument(skip_all)]
    async fn generate_join_token(
        &self,
        request: Request<GenerateJoinTokenRequest>,
    ) -> Result<Response<GenerateJoinTokenResponse>, Status> {
        let uid = self.authorize(&request)?;
        let req = request.into_inner();
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
        let alias = match req.spiffe_id.as_str() {
            "" => None,
            s => Some(parse_one_id("spiffe_id", s)?),
        };
        let token = self
            .services
            .agents
            .generate_join_token(uid, ttl, alias, SystemTime::now())
            .await
            .map_err(agent_status)?;
        Ok(Response::new(GenerateJoinTokenResponse {
            token: token.token,
            expires_at: unix_seconds(token.expires_at),
            agent_spiffe_id: token.agent_id.to_string(),
            alias_spiffe_id: token.alias.map(|a| a.to_string()).unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn create_entries(
        &self,
        request: Request<CreateEntriesRequest>,
    ) -> Result<Response<CreateEntriesResponse>, Status> {
        let uid = self.authorize(&request)?;
        let wire = request.into_inner().entries;
        // Parse all; the valid ones go to the service in one call; answer per input.
        let parsed: Vec<Result<NewEntry, Status>> = wire.iter().map(parse_entry).collect();
        let valid: Vec<NewEntry> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().cloned())
            .collect();
        let mut created = self
            .services
            .entries
            .create(uid, valid, SystemTime::now())
            .await
            .map_err(entry_status)?
            .into_iter();
        let results = parsed
            .into_iter()
            .map(|p| {
                let outcome = p.and_then(|_| match created.next() {
                    Some(result) => result.map_err(entry_status),
                    None => Err(Status::internal("fewer results than entries")),
                });
                pb::EntryResult {
                    result: Some(match outcome {
                        Ok(entry) => pb::entry_result::Result::Entry(self.entry_message(&entry)),
                        Err(status) => pb::entry_result::Result::Error(error_message(&status)),
                    }),
                }
            })
            .collect();
        Ok(Response::new(CreateEntriesResponse { results }))
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let mut problems = Vec::new();
        let filter = EntryFilter {
            spiffe_id: (!req.spiffe_id.is_empty())
                .then(|| parse_id("spiffe_id", &req.spiffe_id, &mut problems))
                .flatten(),
            parent_id: (!req.parent_id.is_empty())
                .then(|| parse_id("parent_id", &req.parent_id, &mut problems))
                .flatten(),
            selector: match req.selector.as_str() {
                "" => None,
                s => Selector::parse(s)
                    .map_err(|e| problems.push(format!("selector {s:?}: {e}")))
                    .ok(),
            },
        };
        if !problems.is_empty() {
            return Err(Status::invalid_argument(problems.join("; ")));
        }
        let page_request = page_request(req.page_size, req.page_token);
        // A listing by parent or SPIFFE ID goes through the entry cache's indexes, kept in
        // memory only, once the cache is as current as the store; else the store answers (the
        // sled store walks its entries). Either gives the same page and the same tokens.
        let page = match self
            .services
            .entry_cache
            .list_current(&filter, &page_request)
            .await
        {
            Some(listed) => listed.map_err(|e| entry_status(e.into()))?,
            None => self
                .services
                .entries
                .list(&filter, &page_request)
                .await
                .map_err(entry_status)?,
        };
        Ok(Response::new(ListEntriesResponse {
            entries: page.items.iter().map(|e| self.entry_message(e)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn get_entry(
        &self,
        request: Request<GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        self.authorize(&request)?;
        let id = parse_entry_id(&request.into_inner().id)?;
        let entry = self.services.entries.get(&id).await.map_err(entry_status)?;
        Ok(Response::new(self.entry_message(&entry)))
    }

    #[instrument(skip_all)]
    async fn update_entry(
        &self,
        request: Request<UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let uid = self.authorize(&request)?;
        let wire = request
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let id = parse_entry_id(&wire.id)?;
        let new = parse_entry(&wire)?;
        let entry = self
            .services
            .entries
            .update(uid, &id, new, SystemTime::now())
            .await
            .map_err(entry_status)?;
        Ok(Response::new(self.entry_message(&entry)))
    }

    #[instrument(skip_all)]
    async fn delete_entry(
        &self,
        request: Request<DeleteEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let uid = self.authorize(&request)?;
        let id = parse_entry_id(&request.into_inner().id)?;
        let entry = self
            .services
            .entries
            .delete(uid, &id)
            .await
            .map_err(entry_status)?;
        Ok(Response::new(self.entry_message(&entry)))
    }

    async fn count_entries(
        &self,
        request: Request<CountEntriesRequest>,
    ) -> Result<Response<CountEntriesResponse>, Status> {
        self.authorize(&request)?;
        // The cache counts without walking the store; the store counts when the cache cannot
        // be brought up to date with it.
        let count = match self.services.entry_cache.current_len().await {
            Some(count) => count,
            None => self.services.entries.count().await.map_err(entry_status)?,
        };
        Ok(Response::new(CountEntriesResponse { count }))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let page = self
            .services
            .agents
            .list(&page_request(req.page_size, req.page_token))
            .await
            .map_err(agent_status)?;
        Ok(Response::new(ListAgentsResponse {
            agents: page.items.iter().map(agent_message).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn get_agent(
        &self,
        request: Request<AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        self.authorize(&request)?;
        let id = parse_one_id("spiffe_id", &request.into_inner().spiffe_id)?;
        let node = self.services.agents.get(&id).await.map_err(agent_status)?;
        Ok(Response::new(agent_message(&node)))
    }

    #[instrument(skip_all)]
    async fn evict_agent(
        &self,
        request: Request<AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let uid = self.authorize(&request)?;
        let id = parse_one_id("spiffe_id", &request.into_inner().spiffe_id)?;
        let node = self
            .services
            .agents
            .evict(uid, &id)
            .await
            .map_err(agent_status)?;
        Ok(Response::new(agent_message(&node)))
    }

    #[instrument(skip_all)]
    async fn ban_agent(
        &self,
        request: Request<AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let uid = self.authorize(&request)?;
        let id = parse_one_id("spiffe_id", &request.into_inner().spiffe_id)?;
        let node = self
            .services
            .agents
            .ban(uid, &id, SystemTime::now())
            .await
            .map_err(agent_status)?;
        Ok(Response::new(agent_message(&node)))
    }

    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(self.bundle_message()))
    }

    async fn list_federated_bundles(
        &self,
        request: Request<ListFederatedBundlesRequest>,
    ) -> Result<Response<ListFederatedBundlesResponse>, Status> {
        self.authorize(&request)?;
        let bundles = self
            .services
            .bundles
            .list_federated()
            .await
            .map_err(bundle_status)?
            .into_iter()
            .map(|b| pb::Bundle {
                trust_domain: b.stored.trust_domain.name().to_owned(),
                pem: b
                    .parsed
                    .as_ref()
                    .and_then(|p| p.x509_bundle().ok())
                    .map(|x| x.to_pem())
                    .unwrap_or_default(),
                sequence: b.parsed.and_then(|p| p.sequence()).unwrap_or_default(),
                spiffe_bundle: b.stored.bundle,
                crls: vec![],
            })
            .collect();
        Ok(Response::new(ListFederatedBundlesResponse { bundles }))
    }

    #[instrument(skip_all)]
    async fn set_federated_bundle(
        &self,
        request: Request<SetFederatedBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let uid = self.authorize(&request)?;
        let req = request.into_inner();
        let td = parse_trust_domain(&req.trust_domain)?;
        let format = parse_bundle_format(&req.format)?;
        let bundle = self
            .services
            .bundles
            .set_federated(uid, &td, format, &req.bundle)
            .await
            .map_err(bundle_status)?;
        Ok(Response::new(federated_message(&td, &bundle)))
    }

    #[instrument(skip_all)]
    async fn create_federation(
        &self,
        request: Request<pb::FederationRequest>,
    ) -> Result<Response<pb::Federation>, Status> {
        let uid = self.authorize(&request)?;
        let spec = parse_relationship(request.into_inner())?;
        let view = self
            .services
            .federation
            .create(uid, spec)
            .await
            .map_err(federation_status)?;
        Ok(Response::new(federation_message(view)))
    }

    #[instrument(skip_all)]
    async fn update_federation(
        &self,
        request: Request<pb::FederationRequest>,
    ) -> Result<Response<pb::Federation>, Status> {
        let uid = self.authorize(&request)?;
        let spec = parse_relationship(request.into_inner())?;
        let view = self
            .services
            .federation
            .update(uid, spec)
            .await
            .map_err(federation_status)?;
        Ok(Response::new(federation_message(view)))
    }

    async fn get_federation(
        &self,
        request: Request<pb::GetFederationRequest>,
    ) -> Result<Response<pb::Federation>, Status> {
        self.authorize(&request)?;
        let td = parse_trust_domain(&request.into_inner().trust_domain)?;
        let view = self
            .services
            .federation
            .get(&td)
            .await
            .map_err(federation_status)?;
        Ok(Response::new(federation_message(view)))
    }

    async fn list_federations(
        &self,
        request: Request<pb::ListFederationsRequest>,
    ) -> Result<Response<pb::ListFederationsResponse>, Status> {
        self.authorize(&request)?;
        let federations = self
            .services
            .federation
            .list()
            .await
            .map_err(federation_status)?
            .into_iter()
            .map(federation_message)
            .collect();
        Ok(Response::new(pb::ListFederationsResponse { federations }))
    }

    #[instrument(skip_all)]
    async fn delete_federation(
        &self,
        request: Request<pb::GetFederationRequest>,
    ) -> Result<Response<pb::Federation>, Status> {
        let uid = self.authorize(&request)?;
        let td = parse_trust_domain(&request.into_inner().trust_domain)?;
        let view = self
            .services
            .federation
            .delete(uid, &td)
            .await
            .map_err(federation_status)?;
        Ok(Response::new(federation_message(view)))
    }

    #[instrument(skip_all)]
    async fn delete_federated_bundle(
        &self,
        request: Request<DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let uid = self.authorize(&request)?;
        let td = parse_trust_domain(&request.into_inner().trust_domain)?;
        let deleted = self
            .services
            .bundles
            .delete_federated(uid, &td)
            .await
            .map_err(bundle_status)?;
        Ok(Response::new(pb::Bundle {
            trust_domain: td.name().to_owned(),
            spiffe_bundle: deleted.bundle,
            pem: String::new(),
            sequence: 0,
            crls: vec![],
        }))
    }

    #[instrument(skip_all)]
    async fn mint_x509svid(
        &self,
        request: Request<MintX509svidRequest>,
    ) -> Result<Response<MintX509svidResponse>, Status> {
        let uid = self.authorize(&request)?;
        let req = request.into_inner();
        let id = parse_one_id("spiffe_id", &req.spiffe_id)?;
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
        let svid = self
            .services
            .svids
            .mint_x509(uid, &id, req.dns_names, ttl, &req.csr, SystemTime::now())
            .await
            .map_err(svid_status)?;
        Ok(Response::new(MintX509svidResponse {
            expires_at: unix_seconds(svid.not_after),
            cert_chain: svid.chain_der,
            bundle: Some(self.bundle_message()),
        }))
    }

    #[instrument(skip_all)]
    async fn mint_jwtsvid(
        &self,
        request: Request<MintJwtsvidRequest>,
    ) -> Result<Response<MintJwtsvidResponse>, Status> {
        let uid = self.authorize(&request)?;
        let req = request.into_inner();
        let id = parse_one_id("spiffe_id", &req.spiffe_id)?;
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
        let jwt = self
            .services
            .svids
            .mint_jwt(uid, &id, &req.audience, ttl, SystemTime::now())
            .await
            .map_err(svid_status)?;
        Ok(Response::new(MintJwtsvidResponse {
            token: jwt.token,
            expires_at: unix_seconds(jwt.expires_at),
        }))
    }

    #[instrument(skip_all)]
    async fn open_session(
        &self,
        request: Request<OpenSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let uid = self.authorize(&request)?;
        let req = request.into_inner();
        let mut problems = Vec::new();
        let spiffe_id = parse_id("spiffe_id", &req.spiffe_id, &mut problems);
        let parent_id = parse_id("parent_id", &req.parent_id, &mut problems);
        let selectors = parse_selectors(&req.selectors, &mut problems);
        let (Some(spiffe_id), Some(parent_id), true) = (spiffe_id, parent_id, problems.is_empty())
        else {
            return Err(Status::invalid_argument(problems.join("; ")));
        };
        let open = OpenRequest {
            spiffe_id,
            parent_id,
            selectors,
            ticket: req.ticket,
            reason: req.reason,
            ttl: Duration::from_secs(req.ttl_seconds),
            svid_ttl: (req.svid_ttl_seconds > 0).then(|| Duration::from_secs(req.svid_ttl_seconds)),
            require_approval: req.require_approval,
        };
        let session = self
            .services
            .sessions
            .open(uid, open, SystemTime::now())
            .await
            .map_err(session_status)?;
        Ok(Response::new(session_message(&session)))
    }

    #[instrument(skip_all)]
    async fn approve_session(
        &self,
        request: Request<SessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let uid = self.authorize(&request)?;
        let id = parse_session_id(&request.into_inner().id)?;
        let session = self
            .services
            .sessions
            .approve(uid, &id, SystemTime::now())
            .await
            .map_err(session_status)?;
        Ok(Response::new(session_message(&session)))
    }

    #[instrument(skip_all)]
    async fn close_session(
        &self,
        request: Request<SessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let uid = self.authorize(&request)?;
        let id = parse_session_id(&request.into_inner().id)?;
        let session = self
            .services
            .sessions
            .close(uid, &id, SystemTime::now())
            .await
            .map_err(session_status)?;
        Ok(Response::new(session_message(&session)))
    }

    #[instrument(skip_all)]
    async fn revoke_session(
        &self,
        request: Request<RevokeSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let uid = self.authorize(&request)?;
        let req = request.into_inner();
        let id = parse_session_id(&req.id)?;
        let session = self
            .services
            .sessions
            .revoke(uid, &id, req.reason, SystemTime::now())
            .await
            .map_err(session_status)?;
        // The revocation is done; whether the other servers' CRLs list it yet is a report.
        let pending = match self
            .services
            .sessions
            .pending_crl_servers(&session, SystemTime::now())
            .await
        {
            Ok(pending) => pending,
            Err(error) => vec![format!("unknown (the store cannot be read: {error})")],
        };
        if !pending.is_empty() {
            warn!(session_id = %id, servers = ?pending, "the revoked serials are not on these servers' CRLs yet");
        }
        Ok(Response::new(pb::Session {
            pending_crl_servers: pending,
            ..session_message(&session)
        }))
    }

    async fn get_session(
        &self,
        request: Request<SessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        self.authorize(&request)?;
        let id = parse_session_id(&request.into_inner().id)?;
        let session = self
            .services
            .sessions
            .get(&id)
            .await
            .map_err(session_status)?;
        Ok(Response::new(session_message(&session)))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let state = match req.state.as_str() {
            "" => None,
            s => Some(
                s.parse::<SessionState>()
                    .map_err(Status::invalid_argument)?,
            ),
        };
        let filter = SessionFilter {
            state,
            ticket: (!req.ticket.is_empty()).then_some(req.ticket),
        };
        let page = self
            .services
            .sessions
            .list(&filter, &page_request(req.page_size, req.page_token))
            .await
            .map_err(session_status)?;
        Ok(Response::new(ListSessionsResponse {
            sessions: page.items.iter().map(session_message).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn list_session_audit(
        &self,
        request: Request<ListSessionAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let id = parse_session_id(&req.session_id)?;
        let filter = AuditFilter {
            session_id: Some(id.as_str().to_owned()),
            ..AuditFilter::default()
        };
        self.audit_page(&filter, req.page_size, req.page_token)
            .await
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let mut problems = Vec::new();
        let since = match req.since_time {
            0 => None,
            t if t < 0 => {
                problems.push("since_time is before 1970".to_owned());
                None
            }
            t => from_unix_seconds(t),
        };
        let spiffe_id = (!req.spiffe_id.is_empty())
            .then(|| parse_id("spiffe_id", &req.spiffe_id, &mut problems))
            .flatten()
            .map(|id| id.to_string());
        if !problems.is_empty() {
            return Err(Status::invalid_argument(problems.join("; ")));
        }
        let filter = AuditFilter {
            from_sequence: None,
            since,
            spiffe_id,
            action: (!req.action.is_empty()).then_some(req.action),
            actor: (!req.actor.is_empty()).then_some(req.actor),
            session_id: None,
        };
        self.audit_page(&filter, req.page_size, req.page_token)
            .await
    }

    #[instrument(skip_all)]
    async fn verify_audit(
        &self,
        request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        let uid = self.authorize(&request)?;
        let extra = request
            .into_inner()
            .checkpoint
            .map(parse_checkpoint)
            .transpose()
            .map_err(Status::invalid_argument)?;
        let audit = &self.services.audit;
        let outcome = audit.verify(extra).await.map_err(|e| {
            warn!(error = %e, "audit log cannot be read");
            Status::unavailable(format!("the audit log cannot be read: {e}"))
        })?;
        let divergence = audit.divergence().map(|d| divergence_message(&d));
        let peer_chains = self
            .services
            .audit_peers
            .verify(SystemTime::now())
            .await
            .map_err(|e| {
                warn!(error = %e, "other servers' audit chains cannot be read");
                Status::unavailable(format!("other servers' audit chains cannot be read: {e}"))
            })?
            .into_iter()
            .map(peer_chain_message)
            .collect();
        let base = VerifyAuditResponse {
            key_fingerprint: audit.key_fingerprint(),
            chain_id: audit.chain_id().to_owned(),
            divergence,
            peer_chains,
            ..VerifyAuditResponse::default()
        };
        let response = match outcome {
            Ok(summary) => {
                info!(
                    uid,
                    records = summary.records,
                    checkpoints = summary.checkpoints,
                    "audit log verified"
                );
                VerifyAuditResponse {
                    ok: true,
                    checked: summary.records,
                    head_sequence: summary.head.as_ref().map_or(0, |h| h.sequence),
                    head_hash: summary.head.map(|h| hex(&h.hash)).unwrap_or_default(),
                    checkpoint: summary.checkpoint.map(|cp| AuditCheckpointInfo {
                        chain_id: audit.chain_id().to_owned(),
                        sequence: cp.sequence,
                        hash: hex(&cp.hash),
                        time: unix_seconds(cp.time),
                        key_id: cp.key_id,
                        key_fingerprint: cp.key_fingerprint,
                    }),
                    checkpoints_checked: summary.checkpoints,
                    unsigned_records: summary.unsigned_records,
                    ..base
                }
            }
            Err(violation) => {
                warn!(uid, sequence = violation.sequence, problem = %violation.kind, "audit log verification failed");
                VerifyAuditResponse {
                    ok: false,
                    checked: violation.sequence.saturating_sub(1),
                    bad_sequence: violation.sequence,
                    problem: violation.kind.to_string(),
                    ..base
                }
            }
        };
        Ok(Response::new(response))
    }

    #[instrument(skip_all)]
    async fn sign_audit_checkpoint(
        &self,
        request: Request<SignAuditCheckpointRequest>,
    ) -> Result<Response<SignAuditCheckpointResponse>, Status> {
        let uid = self.authorize(&request)?;
        let audit = &self.services.audit;
        let (checkpoint, signed) = match audit
            .checkpoint(SystemTime::now())
            .await
            .map_err(audit_status)?
        {
            Some(cp) => (cp, true),
            None => (audit.latest().await.map_err(audit_status)?, false),
        };
        info!(
            uid,
            sequence = checkpoint.sequence,
            signed,
            "audit checkpoint requested"
        );
        Ok(Response::new(SignAuditCheckpointResponse {
            checkpoint: Some(checkpoint_message(&checkpoint)),
            signed,
        }))
    }

    #[instrument(skip_all)]
    async fn acknowledge_audit_divergence(
        &self,
        request: Request<AcknowledgeAuditDivergenceRequest>,
    ) -> Result<Response<AcknowledgeAuditDivergenceResponse>, Status> {
        let uid = self.authorize(&request)?;
        let req = request.into_inner();
        let checkpoint = req
            .checkpoint
            .map(parse_checkpoint)
            .transpose()
            .map_err(Status::invalid_argument)?;
        let done = self
            .services
            .audit
            .acknowledge(&uid_actor(uid), checkpoint, &req.reason, SystemTime::now())
            .await
            .map_err(audit_status)?;
        Ok(Response::new(AcknowledgeAuditDivergenceResponse {
            record: Some(record_message(&done.record)),
            checkpoint: Some(checkpoint_message(&done.checkpoint)),
        }))
    }
}

impl AdminService {
    async fn audit_page(
        &self,
        filter: &AuditFilter,
        page_size: u32,
        page_token: String,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let page = self
            .services
            .audit
            .list(filter, &page_request(page_size, page_token))
            .await
            .map_err(store_status)?;
        Ok(Response::new(ListAuditResponse {
            records: page.items.iter().map(record_message).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}

// === conversions ===

fn page_request(size: u32, token: String) -> PageRequest {
    PageRequest {
        size: size as usize,
        token: (!token.is_empty()).then_some(token),
    }
}

/// Parses an entry from the wire, reporting every problem at once; the entry service checks
/// the rules.
fn parse_entry(e: &pb::Entry) -> Result<NewEntry, Status> {
    let mut problems = Vec::new();
    let spiffe_id = parse_id("spiffe_id", &e.spiffe_id, &mut problems);
    let parent_id = parse_id("parent_id", &e.parent_id, &mut problems);
    let selectors = parse_selectors(&e.selectors, &mut problems);
    let expires_at = match e.expires_at {
        0 => None,
        t if t < 0 => {
            problems.push("expires_at is before 1970".to_owned());
            None
        }
        t => {
            let at = from_unix_seconds(t);
            if at.is_none() {
                problems.push(format!("expires_at {t} is out of range"));
            }
            at
        }
    };
    let mut federates_with = Vec::new();
    for td in &e.federates_with {
        match TrustDomain::new(td) {
            Ok(td) => federates_with.push(td),
            Err(err) => problems.push(format!("federates_with {td:?}: {err}")),
        }
    }
    match (problems.is_empty(), spiffe_id, parent_id) {
        (true, Some(spiffe_id), Some(parent_id)) => Ok(NewEntry {
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: (e.x509_svid_ttl > 0).then(|| Duration::from_secs(e.x509_svid_ttl)),
            jwt_svid_ttl: (e.jwt_svid_ttl > 0).then(|| Duration::from_secs(e.jwt_svid_ttl)),
            dns_names: e.dns_names.clone(),
            hint: e.hint.clone(),
            expires_at,
            session_id: None,
            federates_with,
        }),
        _ => Err(Status::invalid_argument(problems.join("; "))),
    }
}

fn parse_selectors(values: &[String], problems: &mut Vec<String>) -> SelectorSet {
    let mut selectors = SelectorSet::new();
    for s in values {
        match Selector::parse(s) {
            Ok(selector) => {
                selectors.insert(selector);
            }
            Err(err) => problems.push(format!("selector {s:?}: {err}")),
        }
    }
    selectors
}

fn parse_id(field: &str, value: &str, problems: &mut Vec<String>) -> Option<SpiffeId> {
    if value.is_empty() {
        problems.push(format!("{field} is required"));
        return None;
    }
    SpiffeId::new(value)
        .map_err(|e| problems.push(format!("{field} {value:?} is not a valid SPIFFE ID: {e}")))
        .ok()
}

fn parse_one_id(field: &str, value: &str) -> Result<SpiffeId, Status> {
    let mut problems = Vec::new();
    parse_id(field, value, &mut problems)
        .ok_or_else(|| Status::invalid_argument(problems.join("; ")))
}

fn parse_entry_id(value: &str) -> Result<EntryId, Status> {
    EntryId::parse(value).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn parse_session_id(value: &str) -> Result<SessionId, Status> {
    SessionId::parse(value).map_err(|_| {
        Status::invalid_argument(format!(
            "invalid session id {value:?}: expected 32 lowercase hex characters"
        ))
    })
}

fn parse_trust_domain(value: &str) -> Result<TrustDomain, Status> {
    TrustDomain::new(value)
        .map_err(|e| Status::invalid_argument(format!("trust domain {value:?}: {e}")))
}

fn parse_bundle_format(format: &str) -> Result<BundleFormat, Status> {
    match format {
        "" | "spiffe" => Ok(BundleFormat::Spiffe),
        "pem" => Ok(BundleFormat::Pem),
        other => Err(Status::invalid_argument(format!(
            "unknown format {other:?}: use pem or spiffe"
        ))),
    }
}

/// A relationship from the wire; every problem at once.
fn parse_relationship(req: pb::FederationRequest) -> Result<RelationshipSpec, Status> {
    let mut problems = Vec::new();
    let trust_domain = TrustDomain::new(&req.trust_domain)
        .map_err(|e| problems.push(format!("trust domain {:?}: {e}", req.trust_domain)))
        .ok();
    let profile = match (req.profile.as_str(), req.endpoint_spiffe_id.as_str()) {
        ("https_spiffe", "") => {
            problems.push(
                "https_spiffe needs the endpoint's SPIFFE ID (--endpoint-spiffe-id)".to_owned(),
            );
            None
        }
        ("https_spiffe", id) => parse_id("endpoint_spiffe_id", id, &mut problems)
            .map(|endpoint_spiffe_id| EndpointProfile::HttpsSpiffe { endpoint_spiffe_id }),
        ("https_web", "") => Some(EndpointProfile::HttpsWeb),
        ("https_web", _) => {
            problems.push(
                "https_web endpoints are authenticated by their Web PKI certificate: no \
                 endpoint SPIFFE ID"
                    .to_owned(),
            );
            None
        }
        (other, _) => {
            problems.push(format!("profile {other:?}: use https_spiffe or https_web"));
            None
        }
    };
    let trust_bundle = if req.trust_bundle.is_empty() {
        None
    } else {
        match parse_bundle_format(&req.trust_bundle_format) {
            Ok(format) => Some((format, req.trust_bundle)),
            Err(status) => {
                problems.push(format!("trust bundle: {}", status.message()));
                None
            }
        }
    };
    if req.bundle_endpoint_url.is_empty() {
        problems.push("the bundle endpoint URL is required".to_owned());
    }
    match (trust_domain, profile) {
        (Some(trust_domain), Some(profile)) if problems.is_empty() => Ok(RelationshipSpec {
            trust_domain,
            endpoint_url: req.bundle_endpoint_url,
            profile,
            trust_bundle,
        }),
        _ => Err(Status::invalid_argument(problems.join("; "))),
    }
}

fn federation_message(view: RelationshipView) -> pb::Federation {
    let r = view.relationship;
    let at = |t: Option<SystemTime>| t.map_or(0, unix_seconds);
    let (profile, endpoint_spiffe_id) = match &r.profile {
        EndpointProfile::HttpsWeb => ("https_web", String::new()),
        EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
            ("https_spiffe", endpoint_spiffe_id.to_string())
        }
    };
    pb::Federation {
        trust_domain: r.trust_domain.name().to_owned(),
        bundle_endpoint_url: r.endpoint_url.clone(),
        profile: profile.to_owned(),
        endpoint_spiffe_id,
        created_at: unix_seconds(r.created_at),
        updated_at: unix_seconds(r.updated_at),
        status: Some(pb::FederationStatus {
            last_attempt: at(r.status.last_attempt),
            last_success: at(r.status.last_success),
            last_error: r.status.last_error.clone().unwrap_or_default(),
            failures: r.status.failures,
            next_poll: at(r.status.next_poll),
            server_id: r.status.server_id.clone(),
        }),
        bundle: view
            .bundle
            .map(|bundle| federated_message(&r.trust_domain, &bundle)),
    }
}

fn federated_message(td: &TrustDomain, bundle: &SpiffeBundle) -> pb::Bundle {
    pb::Bundle {
        trust_domain: td.name().to_owned(),
        pem: bundle.x509_bundle().map(|x| x.to_pem()).unwrap_or_default(),
        sequence: bundle.sequence().unwrap_or_default(),
        spiffe_bundle: bundle.to_json(),
        crls: vec![],
    }
}

fn session_message(s: &Session) -> pb::Session {
    let at = |t: Option<SystemTime>| t.map_or(0, unix_seconds);
    pb::Session {
        id: s.id.as_str().to_owned(),
        spiffe_id: s.spiffe_id.to_string(),
        parent_id: s.parent_id.to_string(),
        selectors: s.selectors.iter().map(ToString::to_string).collect(),
        ticket: s.ticket.clone(),
        reason: s.reason.clone(),
        state: s.state.as_str().to_owned(),
        requester: s.requester.clone(),
        approver: s.approver.clone().unwrap_or_default(),
        approval_required: s.approval_required,
        opened_at: unix_seconds(s.opened_at),
        approved_at: at(s.approved_at),
        expires_at: unix_seconds(s.expires_at),
        ended_at: at(s.ended_at),
        svid_ttl: s.svid_ttl.as_secs(),
        end_reason: s.end_reason.clone().unwrap_or_default(),
        serials: s
            .serials
            .iter()
            .map(|x| pb::SessionSerial {
                serial: x.serial.clone(),
                not_after: unix_seconds(x.not_after),
            })
            .collect(),
        jwts: s
            .jwts
            .iter()
            .map(|j| pb::SessionJwt {
                jti: j.jti.clone(),
                audience: j.audience.clone(),
                expires_at: unix_seconds(j.expires_at),
            })
            .collect(),
        entry_id: s
            .entry_id
            .as_ref()
            .map(|e| e.as_str().to_owned())
            .unwrap_or_default(),
        pending_crl_servers: Vec::new(),
    }
}

fn agent_message(node: &AttestedNode) -> pb::Agent {
    pb::Agent {
        spiffe_id: node.spiffe_id.to_string(),
        attestation_type: node.attestation_type.clone(),
        serial: node.serial.clone(),
        expires_at: unix_seconds(node.not_after),
        banned: node.banned,
        created_at: unix_seconds(node.created_at),
        updated_at: unix_seconds(node.updated_at),
        selectors: node.selectors.iter().map(ToString::to_string).collect(),
    }
}

fn error_message(status: &Status) -> pb::Error {
    pb::Error {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}
