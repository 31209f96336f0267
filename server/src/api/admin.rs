//! The operator API (`sigil.admin.v1.Admin`), served on a local Unix socket.
//!
//! Every call is authorized by the caller's kernel credentials, read by the kernel at connect
//! time (SO_PEERCRED): uid 0 or a uid in `admin_uids` may call; anyone else gets
//! `PermissionDenied`, whatever the socket's file permissions allow. The caller's uid is the
//! actor of every change.
//!
//! Every mutating call appends an audit record (actor `uid:N`) once its change is made, and
//! every credential minted here (join tokens, X509-SVIDs, JWT-SVIDs) is handed out only after
//! its record is durable: if the audit write fails, the call fails and nothing is returned.
//! `ListAudit` and `VerifyAudit` read the log.
//!
//! Input from the CLI is parsed into domain types here, and every problem is reported as
//! `InvalidArgument` with a message that says what to fix.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sigil_core::x509_bundle::X509Bundle;
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
    AuditCheckpointInfo, ListAuditRequest, ListAuditResponse, ListSessionAuditRequest,
    ListSessionsRequest, ListSessionsResponse, OpenSessionRequest, RevokeSessionRequest,
    SessionRequest, VerifyAuditRequest, VerifyAuditResponse,
};
use tokio::net::UnixListener;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::{error, info, instrument, warn};

use crate::api::node::{NodeService, hex, is_reserved};
use crate::audit::{AuditFilter, AuditLog, AuditRecord, NewAuditRecord, action, uid_actor};
use crate::ca::{AuthorityKind, AuthorityState, Ca, WorkloadX509SvidParams};
use crate::session::{OpenRequest, SessionError, Sessions};
use crate::store::{
    AttestedNode, EntryFilter, EntryId, JoinToken, NewEntry, PageRequest, RegistrationEntry,
    Revocation, Session, SessionFilter, SessionId, SessionState, Store, StoreError,
};

/// Lifetime of a join token when the request gives none (SPIRE's default).
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(600);

/// The longest join token lifetime.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest entry hint (WA-9).
pub const MAX_HINT_LEN: usize = 1024;

/// Most entries one `CreateEntries` call may carry.
pub const MAX_ENTRIES_PER_CALL: usize = 10_000;

/// What the admin API needs to know about the server's settings.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Uids allowed besides 0.
    pub admin_uids: Vec<u32>,
    /// Default X509-SVID TTL.
    pub default_x509_svid_ttl: Duration,
    /// Default JWT-SVID TTL.
    pub default_jwt_svid_ttl: Duration,
    /// The TTL cap (`ca_ttl / 6`).
    pub max_svid_ttl: Duration,
    /// `iss` for JWT-SVIDs.
    pub jwt_issuer: Option<String>,
}

/// The admin service.
#[derive(Clone)]
pub struct AdminService {
    store: Arc<dyn Store>,
    ca: Arc<Ca>,
    audit: Arc<AuditLog>,
    sessions: Arc<Sessions>,
    settings: Arc<AdminSettings>,
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
    /// Creating the directory, removing a stale socket, binding or setting the mode failed.
    #[error("cannot set up admin socket {path}: {source}")]
    Io {
        /// The socket path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Binds the admin socket: creates its directory (mode 0711: reachable, not listable), replaces
/// a stale socket left by a crash (refusing if a live server answers on it), and makes the
/// socket connectable by every local user (0666); authorization is by uid, per call.
pub async fn bind_admin_socket(path: &Path) -> Result<UnixListener, AdminSocketError> {
    let shown = path.display().to_string();
    let io = |source| AdminSocketError::Io {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(io)?;
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
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AdminService {
    /// Builds the service. `audit` is the log every mutating call appends to; `sessions`
    /// runs the privileged session calls.
    pub fn new(
        store: Arc<dyn Store>,
        ca: Arc<Ca>,
        audit: Arc<AuditLog>,
        sessions: Arc<Sessions>,
        settings: AdminSettings,
    ) -> Self {
        Self {
            store,
            ca,
            audit,
            sessions,
            settings: Arc::new(settings),
        }
    }

    /// Appends the records of a change that is already made. On failure the caller learns that
    /// the change stands but is not audited.
    async fn audit_change(&self, records: Vec<NewAuditRecord>) -> Result<(), Status> {
        self.audit.append(records).await.map(drop).map_err(|e| {
            error!(error = %e, "audit append failed after a change was made");
            Status::unavailable(format!(
                "the change was made, but its audit record could not be written: {e}"
            ))
        })
    }

    /// Appends the record of a credential about to be handed out; on failure it must not be.
    async fn audit_issuance(&self, record: NewAuditRecord) -> Result<(), Status> {
        self.audit
            .append(vec![record])
            .await
            .map(drop)
            .map_err(|e| {
                error!(error = %e, "audit append failed; credential withheld");
                Status::unavailable(format!(
                    "the audit record could not be written, so nothing was issued: {e}"
                ))
            })
    }

    /// The caller's uid, if it may use the admin API.
    fn authorize<T>(&self, request: &Request<T>) -> Result<u32, Status> {
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid())
            .ok_or_else(|| Status::permission_denied("caller credentials unavailable"))?;
        if uid == 0 || self.settings.admin_uids.contains(&uid) {
            Ok(uid)
        } else {
            warn!(uid, "admin call refused: uid not allowed");
            Err(Status::permission_denied(format!(
                "uid {uid} may not use the admin API: run as root or add the uid to admin_uids"
            )))
        }
    }

    fn entry_message(&self, entry: &RegistrationEntry) -> pb::Entry {
        let s = &self.settings;
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
            effective_x509_svid_ttl: entry
                .x509_svid_ttl
                .unwrap_or(s.default_x509_svid_ttl)
                .min(s.max_svid_ttl)
                .as_secs(),
            effective_jwt_svid_ttl: entry
                .jwt_svid_ttl
                .unwrap_or(s.default_jwt_svid_ttl)
                .min(s.max_svid_ttl)
                .as_secs(),
        }
    }

    /// Parses an entry from the wire, reporting every problem at once.
    fn parse_entry(&self, e: &pb::Entry) -> Result<NewEntry, Status> {
        let mut problems = Vec::new();
        let td = &self.settings.trust_domain;
        let spiffe_id = parse_id("spiffe_id", &e.spiffe_id, &mut problems);
        if let Some(id) = &spiffe_id {
            if !id.is_member_of(td) {
                problems.push(format!("spiffe_id {id} is not in trust domain {td}"));
            } else if id.is_root() {
                problems.push(format!(
                    "spiffe_id {id} has no path; a workload ID needs one"
                ));
            } else if is_reserved(id) {
                problems.push(format!(
                    "spiffe_id {id} is under /sigil/, which is reserved for the server and agents"
                ));
            }
        }
        let parent_id = parse_id("parent_id", &e.parent_id, &mut problems);
        if let Some(id) = &parent_id
            && !id.is_member_of(td)
        {
            problems.push(format!("parent_id {id} is not in trust domain {td}"));
        }
        let mut selectors = SelectorSet::new();
        for s in &e.selectors {
            match Selector::parse(s) {
                Ok(selector) => {
                    selectors.insert(selector);
                }
                Err(err) => problems.push(format!("selector {s:?}: {err}")),
            }
        }
        if e.selectors.is_empty() {
            problems.push("at least one selector is required".to_owned());
        }
        for name in &e.dns_names {
            if !is_dns_name(name) {
                problems.push(format!("dns name {name:?} is not a valid DNS name"));
            }
        }
        if e.hint.len() > MAX_HINT_LEN {
            problems.push(format!(
                "hint is {} bytes; the maximum is {MAX_HINT_LEN}",
                e.hint.len()
            ));
        }
        let expires_at = match e.expires_at {
            0 => None,
            t if t < 0 => {
                problems.push("expires_at is before 1970".to_owned());
                None
            }
            t => Some(UNIX_EPOCH + Duration::from_secs(t.unsigned_abs())),
        };
        if expires_at.is_some_and(|at| at <= SystemTime::now()) {
            problems.push("expires_at is in the past".to_owned());
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
            }),
            _ => Err(Status::invalid_argument(problems.join("; "))),
        }
    }

    /// Session entries change only through the session calls.
    async fn refuse_session_entry(&self, id: &EntryId) -> Result<(), Status> {
        if let Some(entry) = self.store.get_entry(id).await.map_err(store_status)?
            && let Some(session) = entry.session_id
        {
            return Err(Status::failed_precondition(format!(
                "entry {} belongs to privileged session {session}: use `session close` or `session revoke`",
                id.as_str()
            )));
        }
        Ok(())
    }

    fn bundle_message(&self) -> pb::Bundle {
        let bundle = self.ca.bundle();
        pb::Bundle {
            trust_domain: self.settings.trust_domain.name().to_owned(),
            spiffe_bundle: bundle.to_json(),
            pem: self.ca.x509_bundle().to_pem(),
            sequence: bundle.sequence().unwrap_or_default(),
            crls: self
                .sessions
                .crls()
                .current()
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
        let active = self
            .ca
            .authorities()
            .into_iter()
            .find(|a| a.kind == AuthorityKind::X509 && a.state == AuthorityState::Active)
            .ok_or_else(|| Status::unavailable("no active X.509 authority"))?;
        if active.not_after <= SystemTime::now() {
            return Err(Status::unavailable(
                "the active X.509 authority has expired",
            ));
        }
        self.store.current_revision().await.map_err(store_status)?;
        Ok(Response::new(HealthcheckResponse {
            trust_domain: self.settings.trust_domain.name().to_owned(),
            bundle_sequence: self.ca.bundle_sequence(),
            active_authority_expires_at: unix_seconds(active.not_after),
        }))
    }

    #[instrument(skip_all)]
    async fn generate_join_token(
        &self,
        request: Request<GenerateJoinTokenRequest>,
    ) -> Result<Response<GenerateJoinTokenResponse>, Status> {
        let uid = self.authorize(&request)?;
        let req = request.into_inner();
        let ttl = match req.ttl_seconds {
            0 => DEFAULT_JOIN_TOKEN_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_JOIN_TOKEN_TTL {
            return Err(Status::invalid_argument(
                "ttl is longer than the maximum of 7d",
            ));
        }
        let alias = match req.spiffe_id.as_str() {
            "" => None,
            s => {
                let mut problems = Vec::new();
                let id = parse_id("spiffe_id", s, &mut problems)
                    .ok_or_else(|| Status::invalid_argument(problems.join("; ")))?;
                if !id.is_member_of(&self.settings.trust_domain) || id.is_root() || is_reserved(&id)
                {
                    return Err(Status::invalid_argument(format!(
                        "spiffe_id {id} must be a non-reserved ID with a path in trust domain {}",
                        self.settings.trust_domain
                    )));
                }
                Some(id)
            }
        };
        let token =
            random_token().map_err(|_| Status::internal("random number generator failed"))?;
        let now = SystemTime::now();
        let agent_id = NodeService::join_token_agent_id(&self.settings.trust_domain, &token)?;
        self.store
            .create_join_token(JoinToken {
                token: token.clone(),
                expires_at: now + ttl,
                created_at: now,
                alias_spiffe_id: alias.clone(),
            })
            .await
            .map_err(store_status)?;
        // The token itself is never recorded: only the agent ID it gives.
        let mut record =
            NewAuditRecord::new(uid_actor(uid), action::TOKEN_GENERATE, agent_id.to_string())
                .time_detail("expires_at", now + ttl);
        if let Some(alias) = &alias {
            record = record.detail("alias_spiffe_id", alias.to_string());
        }
        self.audit_issuance(record).await?;
        info!(uid, agent_id = %agent_id, "join token generated");
        Ok(Response::new(GenerateJoinTokenResponse {
            token,
            expires_at: unix_seconds(now + ttl),
            agent_spiffe_id: agent_id.to_string(),
            alias_spiffe_id: alias.map(|a| a.to_string()).unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn create_entries(
        &self,
        request: Request<CreateEntriesRequest>,
    ) -> Result<Response<CreateEntriesResponse>, Status> {
        let uid = self.authorize(&request)?;
        let entries = request.into_inner().entries;
        if entries.len() > MAX_ENTRIES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} entries in one call; the maximum is {MAX_ENTRIES_PER_CALL}",
                entries.len()
            )));
        }
        // Parse all; store the valid ones in one batch (one flush); answer per input.
        let parsed: Vec<Result<NewEntry, Status>> =
            entries.iter().map(|e| self.parse_entry(e)).collect();
        let valid: Vec<NewEntry> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().cloned())
            .collect();
        let mut stored = self
            .store
            .create_entries(valid)
            .await
            .map_err(store_status)?
            .into_iter();
        let mut results = Vec::with_capacity(parsed.len());
        let mut created = 0usize;
        let mut records = Vec::new();
        for p in parsed {
            let outcome = match p {
                Err(status) => Err(status),
                Ok(_) => match stored.next() {
                    Some(Ok(entry)) => {
                        created += 1;
                        records.push(entry_record(uid, action::ENTRY_CREATE, &entry));
                        Ok(entry)
                    }
                    Some(Err(e)) => Err(store_status(e)),
                    None => Err(Status::internal(
                        "store returned fewer results than entries",
                    )),
                },
            };
            results.push(pb::EntryResult {
                result: Some(match outcome {
                    Ok(entry) => pb::entry_result::Result::Entry(self.entry_message(&entry)),
                    Err(status) => pb::entry_result::Result::Error(error_message(&status)),
                }),
            });
        }
        if !records.is_empty() {
            self.audit_change(records).await?;
        }
        info!(uid, requested = results.len(), created, "entries created");
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
        let page = PageRequest {
            size: req.page_size as usize,
            token: (!req.page_token.is_empty()).then_some(req.page_token),
        };
        let page = self
            .store
            .list_entries(&filter, &page)
            .await
            .map_err(store_status)?;
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
        match self.store.get_entry(&id).await.map_err(store_status)? {
            Some(entry) => Ok(Response::new(self.entry_message(&entry))),
            None => Err(Status::not_found(format!(
                "no entry with id {}",
                id.as_str()
            ))),
        }
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
        let new = self.parse_entry(&wire)?;
        self.refuse_session_entry(&id).await?;
        let entry = self
            .store
            .update_entry(&id, new)
            .await
            .map_err(store_status)?;
        self.audit_change(vec![entry_record(uid, action::ENTRY_UPDATE, &entry)])
            .await?;
        info!(uid, entry_id = %id.as_str(), "entry updated");
        Ok(Response::new(self.entry_message(&entry)))
    }

    #[instrument(skip_all)]
    async fn delete_entry(
        &self,
        request: Request<DeleteEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let uid = self.authorize(&request)?;
        let id = parse_entry_id(&request.into_inner().id)?;
        self.refuse_session_entry(&id).await?;
        let entry = self.store.delete_entry(&id).await.map_err(store_status)?;
        self.audit_change(vec![entry_record(uid, action::ENTRY_DELETE, &entry)])
            .await?;
        info!(uid, entry_id = %id.as_str(), "entry deleted");
        Ok(Response::new(self.entry_message(&entry)))
    }

    async fn count_entries(
        &self,
        request: Request<CountEntriesRequest>,
    ) -> Result<Response<CountEntriesResponse>, Status> {
        self.authorize(&request)?;
        let count = self.store.count_entries().await.map_err(store_status)?;
        Ok(Response::new(CountEntriesResponse { count }))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let page = PageRequest {
            size: req.page_size as usize,
            token: (!req.page_token.is_empty()).then_some(req.page_token),
        };
        let page = self.store.list_nodes(&page).await.map_err(store_status)?;
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
        let id = parse_agent_id(&request.into_inner().spiffe_id)?;
        match self.store.get_node(&id).await.map_err(store_status)? {
            Some(node) => Ok(Response::new(agent_message(&node))),
            None => Err(Status::not_found(format!("no agent {id}"))),
        }
    }

    #[instrument(skip_all)]
    async fn evict_agent(
        &self,
        request: Request<AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let uid = self.authorize(&request)?;
        let id = parse_agent_id(&request.into_inner().spiffe_id)?;
        let node = self.store.get_node(&id).await.map_err(store_status)?;
        if node.as_ref().is_some_and(|n| n.banned) {
            return Err(Status::failed_precondition(format!(
                "agent {id} is banned; a banned agent stays recorded so it cannot attest again"
            )));
        }
        let node = self.store.delete_node(&id).await.map_err(store_status)?;
        self.audit_change(vec![agent_record(uid, action::AGENT_EVICT, &node)])
            .await?;
        info!(uid, agent_id = %id, "agent evicted");
        Ok(Response::new(agent_message(&node)))
    }

    #[instrument(skip_all)]
    async fn ban_agent(
        &self,
        request: Request<AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let uid = self.authorize(&request)?;
        let id = parse_agent_id(&request.into_inner().spiffe_id)?;
        let Some(mut node) = self.store.get_node(&id).await.map_err(store_status)? else {
            return Err(Status::not_found(format!("no agent {id}")));
        };
        node.banned = true;
        let node = self.store.update_node(node).await.map_err(store_status)?;
        // Its SVIDs go on the CRLs until they expire (the authority is not recorded for agent
        // SVIDs, so every authority's CRL lists them).
        let now = SystemTime::now();
        let revocations: Vec<Revocation> = std::iter::once(node.serial.clone())
            .chain(node.new_serial.clone())
            .filter(|_| node.not_after > now)
            .map(|serial| Revocation {
                serial,
                // A renewed SVID may end later than the current one; its lifetime is bounded
                // by the agent SVID TTL, which never exceeds ca_ttl / 6.
                not_after: now.max(node.not_after) + self.settings.max_svid_ttl,
                authority_id: None,
                revoked_at: now,
                cause: format!("agent:{}", node.spiffe_id),
            })
            .collect();
        self.store
            .add_revocations(revocations)
            .await
            .map_err(store_status)?;
        if let Err(error) = self.sessions.crls().publish(now).await {
            warn!(%error, "crls not re-published after a ban");
        }
        self.audit_change(vec![agent_record(uid, action::AGENT_BAN, &node)])
            .await?;
        info!(uid, agent_id = %id, "agent banned");
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
            .store
            .list_federated_bundles()
            .await
            .map_err(store_status)?;
        let bundles = bundles
            .into_iter()
            .map(|b| {
                let parsed = SpiffeBundle::parse(b.trust_domain.clone(), &b.bundle).ok();
                pb::Bundle {
                    trust_domain: b.trust_domain.name().to_owned(),
                    pem: parsed
                        .as_ref()
                        .and_then(|p| p.x509_bundle().ok())
                        .map(|x| x.to_pem())
                        .unwrap_or_default(),
                    sequence: parsed.and_then(|p| p.sequence()).unwrap_or_default(),
                    spiffe_bundle: b.bundle,
                    crls: vec![],
                }
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
        let td = TrustDomain::new(&req.trust_domain).map_err(|e| {
            Status::invalid_argument(format!("trust domain {:?}: {e}", req.trust_domain))
        })?;
        if td == self.settings.trust_domain {
            return Err(Status::invalid_argument(
                "the server's own bundle cannot be set; it is managed by the CA",
            ));
        }
        let bundle = match req.format.as_str() {
            "" | "spiffe" => SpiffeBundle::parse(td.clone(), &req.bundle)
                .map_err(|e| Status::invalid_argument(format!("not a valid SPIFFE bundle: {e}")))?,
            "pem" => {
                let x509 = X509Bundle::from_pem(td.clone(), &req.bundle).map_err(|e| {
                    Status::invalid_argument(format!("not a valid PEM bundle: {e}"))
                })?;
                let mut bundle = SpiffeBundle::new(td.clone());
                for cert in x509.authorities() {
                    bundle
                        .add_x509_authority(cert.clone())
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                }
                bundle
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown format {other:?}: use pem or spiffe"
                )));
            }
        };
        let json = bundle.to_json();
        self.store
            .set_federated_bundle(&td, json.clone())
            .await
            .map_err(store_status)?;
        let record = NewAuditRecord::new(uid_actor(uid), action::BUNDLE_SET, td.name())
            .detail("sha256", sha256_hex(&json))
            .detail(
                "x509_authorities",
                bundle.x509_bundle().map_or(0, |x| x.authorities().len()),
            )
            .detail("sequence", bundle.sequence().unwrap_or_default());
        self.audit_change(vec![record]).await?;
        info!(uid, trust_domain = %td, "federated bundle set");
        Ok(Response::new(pb::Bundle {
            trust_domain: td.name().to_owned(),
            pem: bundle.x509_bundle().map(|x| x.to_pem()).unwrap_or_default(),
            sequence: bundle.sequence().unwrap_or_default(),
            spiffe_bundle: json,
            crls: vec![],
        }))
    }

    #[instrument(skip_all)]
    async fn delete_federated_bundle(
        &self,
        request: Request<DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let uid = self.authorize(&request)?;
        let req = request.into_inner();
        let td = TrustDomain::new(&req.trust_domain).map_err(|e| {
            Status::invalid_argument(format!("trust domain {:?}: {e}", req.trust_domain))
        })?;
        let deleted = self
            .store
            .delete_federated_bundle(&td)
            .await
            .map_err(store_status)?;
        let record = NewAuditRecord::new(uid_actor(uid), action::BUNDLE_DELETE, td.name())
            .detail("sha256", sha256_hex(&deleted.bundle));
        self.audit_change(vec![record]).await?;
        info!(uid, trust_domain = %td, "federated bundle deleted");
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
        let mut problems = Vec::new();
        let id = parse_id("spiffe_id", &req.spiffe_id, &mut problems)
            .ok_or_else(|| Status::invalid_argument(problems.join("; ")))?;
        let ttl = match req.ttl_seconds {
            0 => self.settings.default_x509_svid_ttl,
            s => Duration::from_secs(s),
        }
        .min(self.settings.max_svid_ttl);
        let params = WorkloadX509SvidParams {
            spiffe_id: id.clone(),
            dns_names: req.dns_names,
            ttl,
            caps: vec![],
        };
        let svid = self
            .ca
            .sign_workload_x509_svid(&params, &req.csr, SystemTime::now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let record = NewAuditRecord::new(uid_actor(uid), action::X509_MINT, id.to_string())
            .detail("spiffe_id", id.to_string())
            .detail("serial", hex(svid.serial()))
            .time_detail("not_after", svid.not_after())
            .detail("dns_names", params.dns_names.clone());
        self.audit_issuance(record).await?;
        info!(uid, spiffe_id = %id, serial = %hex(svid.serial()), "x509-svid minted");
        Ok(Response::new(MintX509svidResponse {
            expires_at: unix_seconds(svid.not_after()),
            cert_chain: svid.certificate().to_vec(),
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
        let mut problems = Vec::new();
        let id = parse_id("spiffe_id", &req.spiffe_id, &mut problems)
            .ok_or_else(|| Status::invalid_argument(problems.join("; ")))?;
        let ttl = match req.ttl_seconds {
            0 => self.settings.default_jwt_svid_ttl,
            s => Duration::from_secs(s),
        }
        .min(self.settings.max_svid_ttl);
        let jwt = self
            .ca
            .sign_jwt_svid(
                &id,
                &req.audience,
                ttl,
                SystemTime::now(),
                self.settings.jwt_issuer.as_deref(),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let record = NewAuditRecord::new(uid_actor(uid), action::JWT_MINT, id.to_string())
            .detail("spiffe_id", id.to_string())
            .detail("audience", req.audience.clone())
            .time_detail("expires_at", jwt.expiry());
        self.audit_issuance(record).await?;
        info!(uid, spiffe_id = %id, "jwt-svid minted");
        Ok(Response::new(MintJwtsvidResponse {
            token: jwt.token().to_owned(),
            expires_at: unix_seconds(jwt.expiry()),
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
        let mut selectors = SelectorSet::new();
        for s in &req.selectors {
            match Selector::parse(s) {
                Ok(selector) => {
                    selectors.insert(selector);
                }
                Err(err) => problems.push(format!("selector {s:?}: {err}")),
            }
        }
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
            .sessions
            .revoke(uid, &id, req.reason, SystemTime::now())
            .await
            .map_err(session_status)?;
        Ok(Response::new(session_message(&session)))
    }

    async fn get_session(
        &self,
        request: Request<SessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        self.authorize(&request)?;
        let id = parse_session_id(&request.into_inner().id)?;
        let session = self.sessions.get(&id).await.map_err(session_status)?;
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
        let page = PageRequest {
            size: req.page_size as usize,
            token: (!req.page_token.is_empty()).then_some(req.page_token),
        };
        let page = self
            .store
            .list_sessions(&filter, &page)
            .await
            .map_err(store_status)?;
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
        let page = PageRequest {
            size: req.page_size as usize,
            token: (!req.page_token.is_empty()).then_some(req.page_token),
        };
        let page = self
            .store
            .list_audit(&filter, &page)
            .await
            .map_err(store_status)?;
        Ok(Response::new(ListAuditResponse {
            records: page.items.iter().map(audit_message).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
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
            t => Some(UNIX_EPOCH + Duration::from_secs(t.unsigned_abs())),
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
        let page = PageRequest {
            size: req.page_size as usize,
            token: (!req.page_token.is_empty()).then_some(req.page_token),
        };
        let page = self
            .store
            .list_audit(&filter, &page)
            .await
            .map_err(store_status)?;
        Ok(Response::new(ListAuditResponse {
            records: page.items.iter().map(audit_message).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn verify_audit(
        &self,
        request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        let uid = self.authorize(&request)?;
        let outcome = self.audit.verify().await.map_err(|e| {
            warn!(error = %e, "audit log cannot be read");
            Status::unavailable(format!("the audit log cannot be read: {e}"))
        })?;
        let key_fingerprint = self.audit.key_fingerprint();
        let response = match outcome {
            Ok(summary) => {
                info!(uid, records = summary.records, "audit log verified");
                VerifyAuditResponse {
                    ok: true,
                    checked: summary.records,
                    head_sequence: summary.head.map_or(0, |h| h.sequence),
                    head_hash: summary.head.map(|h| hex(&h.hash)).unwrap_or_default(),
                    checkpoint: summary.checkpoint.map(|cp| AuditCheckpointInfo {
                        sequence: cp.sequence,
                        hash: hex(&cp.hash),
                        time: unix_seconds(cp.time),
                        key_id: cp.key_id,
                        key_fingerprint: cp.key_fingerprint,
                    }),
                    unsigned_records: summary.unsigned_records,
                    bad_sequence: 0,
                    problem: String::new(),
                    key_fingerprint,
                }
            }
            Err(violation) => {
                warn!(uid, sequence = violation.sequence, problem = %violation.kind, "audit log verification failed");
                VerifyAuditResponse {
                    ok: false,
                    checked: violation.sequence.saturating_sub(1),
                    bad_sequence: violation.sequence,
                    problem: violation.kind.to_string(),
                    key_fingerprint,
                    ..VerifyAuditResponse::default()
                }
            }
        };
        Ok(Response::new(response))
    }
}

// === helpers ===

/// The audit record of an entry change.
fn entry_record(uid: u32, action: &str, entry: &RegistrationEntry) -> NewAuditRecord {
    NewAuditRecord::new(uid_actor(uid), action, entry.id.as_str())
        .detail("spiffe_id", entry.spiffe_id.to_string())
        .detail("parent_id", entry.parent_id.to_string())
        .detail(
            "selectors",
            entry
                .selectors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        )
        .detail("revision", entry.revision)
}

/// The audit record of an agent change.
fn agent_record(uid: u32, action: &str, node: &AttestedNode) -> NewAuditRecord {
    NewAuditRecord::new(uid_actor(uid), action, node.spiffe_id.to_string())
        .detail("agent", node.spiffe_id.to_string())
        .detail("serial", node.serial.clone())
}

fn audit_message(record: &AuditRecord) -> pb::AuditRecord {
    let since = record.time.duration_since(UNIX_EPOCH).unwrap_or_default();
    pb::AuditRecord {
        sequence: record.sequence,
        time: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        time_nanos: since.subsec_nanos(),
        actor: record.actor.clone(),
        action: record.action.clone(),
        subject: record.subject.clone(),
        details_json: serde_json::Value::Object(record.details.clone()).to_string(),
        prev_hash: hex(&record.prev_hash),
        hash: hex(&record.hash),
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
        entry_id: s
            .entry_id
            .as_ref()
            .map(|e| e.as_str().to_owned())
            .unwrap_or_default(),
    }
}

fn parse_session_id(value: &str) -> Result<SessionId, Status> {
    SessionId::parse(value).map_err(|_| {
        Status::invalid_argument(format!(
            "invalid session id {value:?}: expected 32 lowercase hex characters"
        ))
    })
}

/// Maps session errors to statuses: the messages are written for the operator.
fn session_status(error: SessionError) -> Status {
    match error {
        SessionError::Invalid(m) => Status::invalid_argument(m),
        SessionError::NotFound(id) => Status::not_found(format!("no session with id {id}")),
        SessionError::Refused(m) => Status::failed_precondition(m),
        e @ (SessionError::AuditFailed(_) | SessionError::AuditAfterChange(_)) => {
            error!(error = %e, "session audit failed");
            Status::unavailable(e.to_string())
        }
        SessionError::Store(e) => store_status(e),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
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

fn parse_entry_id(value: &str) -> Result<EntryId, Status> {
    EntryId::parse(value).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn parse_agent_id(value: &str) -> Result<SpiffeId, Status> {
    let mut problems = Vec::new();
    parse_id("spiffe_id", value, &mut problems)
        .ok_or_else(|| Status::invalid_argument(problems.join("; ")))
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        })
}

/// A join token: 16 random bytes, hex (a valid SPIFFE ID path segment).
fn random_token() -> Result<String, ring::error::Unspecified> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)?;
    Ok(hex(&bytes))
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
    }
}

fn error_message(status: &Status) -> pb::Error {
    pb::Error {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::NotFound { resource, key } => {
            Status::not_found(format!("{resource} not found: {key}"))
        }
        StoreError::AlreadyExists { resource, key } => {
            Status::already_exists(format!("{resource} already exists: {key}"))
        }
        StoreError::InvalidPageToken => Status::invalid_argument("invalid page token"),
        other => {
            warn!(error = %other, "store call failed");
            Status::unavailable(format!("the server's store failed: {other}"))
        }
    }
}
