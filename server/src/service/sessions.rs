//! Privileged sessions: a just-in-time, ticket-bound identity that ends on its own.
//!
//! A session is a registration entry with a purpose and an end (see `docs/sessions.md`). Its
//! record ([`crate::store::Session`]) goes through these states:
//!
//! ```text
//! open ──(approval needed)──> pending ──approve──> active ──close──> closed
//!   └──────────────────────────────────────────────┘   ├──revoke──> revoked
//!                                                      └──end time─> expired
//! pending ──end time──> expired;  pending/active/closed ──revoke──> revoked
//! ```
//!
//! While it is active, an entry carrying the session id grants its identity (the store creates
//! and deletes that entry atomically with the state change, so the change feed carries the
//! session to agents and takes it away again). Expiry is decided by the server's clock
//! ([`Sessions::run_expiry`]), never by an agent's.
//!
//! SVIDs under a session are issued here too, on demand and per caller
//! ([`Sessions::issue_x509`], [`Sessions::issue_jwt`]): the entry must be authorized for the
//! calling agent and carry a session active at that moment, and the workload must present every
//! selector of the session. Each serial is recorded on the session before the certificate is
//! handed out, under the same lock as a revocation reads the serials, so a revocation either
//! sees the serial (and puts it on the CRLs) or the issuance sees the revoked session (and
//! hands nothing out).
//!
//! Audit order, failing closed: the records of steps that grant something are never behind
//! the grant. `session.open` and `session.approve` are written in the same store transaction as
//! the session (and its entry): both are durable or neither is. Steps that take something away (`session.close`, `session.revoke`,
//! `session.expire`) take effect first and are audited right after: a broken audit log never
//! keeps a session alive; the caller is told if its record could not be written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_core::session::{MAX_TICKET_LEN, SessionClaims};
use sigil_core::{SelectorSet, SpiffeId};
use tokio::sync::{Mutex, Notify, watch};
use tracing::{info, warn};

use crate::audit::{NewAuditRecord, SERVER_ACTOR, action, uid_actor};
use crate::policy;
use crate::service::agents::Agent;
use crate::service::audit::AuditLog;
use crate::service::authority::{Authority, IssuedJwt, IssuedSvid, SignError};
use crate::service::crl::{CrlError, CrlPublisher};
use crate::service::entry_cache::{EntryCache, EntryCacheError};
use crate::service::metrics::{SessionMetrics, StateLabels};
use crate::service::svids;
use crate::store::{
    EntryId, NewEntry, PageRequest, RegistrationEntry, Revocation, RevocationReason, Session,
    SessionCredential, SessionEntryOp, SessionFilter, SessionId, SessionJwt, SessionSerial,
    SessionState, SessionUpdate, Store, StoreError,
};

/// The longest ticket and reason accepted, in bytes.
pub(crate) const MAX_TEXT_LEN: usize = 1024;

/// The workload a session SVID is for, as its agent attested it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionWorkload {
    /// Its process id.
    pub pid: i32,
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Its selectors.
    pub selectors: SelectorSet,
}

/// What an admin asks for when opening a session.
#[derive(Debug, Clone)]
pub(crate) struct OpenRequest {
    /// The identity.
    pub spiffe_id: SpiffeId,
    /// The agent (or alias) it is for.
    pub parent_id: SpiffeId,
    /// What the workload must present.
    pub selectors: SelectorSet,
    /// The ticket.
    pub ticket: String,
    /// The reason.
    pub reason: String,
    /// The session's lifetime.
    pub ttl: Duration,
    /// Each SVID's lifetime (`None`: the default).
    pub svid_ttl: Option<Duration>,
    /// Ask for approval even if the server does not require it.
    pub require_approval: bool,
}

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum SessionError {
    /// The request is malformed or breaks a rule; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    /// No session with this id.
    #[error("no session with id {0}")]
    NotFound(String),
    /// The session is not in a state that allows this (approving an active one, closing a
    /// closed one, approving one's own).
    #[error("{0}")]
    Refused(String),
    /// The audit record of a step that grants something could not be written: nothing changed.
    #[error("the audit record could not be written, so nothing was granted or issued: {0}")]
    AuditFailed(StoreError),
    /// The change was made but its audit record could not be written.
    #[error("the change was made, but its audit record could not be written: {0}")]
    AuditAfterChange(StoreError),
    /// The calling agent or workload may not have this session's SVIDs now (not authorized,
    /// selectors that do not match, a session that is not active).
    #[error("{0}")]
    Denied(String),
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// The entries cannot be read now, so nothing is authorized.
    #[error(transparent)]
    Entries(#[from] EntryCacheError),
    /// The store failed.
    #[error("the server's store failed: {0}")]
    Store(#[from] StoreError),
}

/// Who must approve which sessions, from the configuration.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionRules {
    /// Every session needs a second admin's approval (`require_session_approval`).
    pub require_approval: bool,
    /// When not empty, only these uids approve (`session_approver_uids`).
    pub approver_uids: Vec<u32>,
}

/// How long `session revoke` waits for the other servers to list the revoked serials on
/// their CRLs before naming those that did not.
const REVOKE_CRL_WAIT: Duration = Duration::from_secs(3);

/// How often the expiry task reads the live sessions from the store again (those opened
/// through other servers, whose opener may be gone, expire within this of their end).
const SESSION_RESCAN: Duration = Duration::from_secs(5);

/// The job name under which one server at a time expires sessions ([`Store::run_job`]).
const EXPIRY_JOB: &str = "expire_sessions";

/// How soon an expiry pass is tried again after it was another server's turn or failed.
const EXPIRY_RETRY: Duration = Duration::from_millis(250);

/// The session service: state changes, their audit, expiry and revocation.
#[derive(Debug)]
pub(crate) struct Sessions {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    crls: Arc<CrlPublisher>,
    authority: Arc<Authority>,
    entries: Arc<EntryCache>,
    /// Who approves which sessions.
    rules: SessionRules,
    /// Sessions that can still expire (pending or active), by id, with their end.
    live: Mutex<BTreeMap<SessionId, SystemTime>>,
    wake: Notify,
    /// Held while a revocation reads and ends a session, and while an issuance records its
    /// serial: each sees the other's outcome whole.
    serials: Mutex<()>,
    metrics: SessionMetrics,
}

// === impl Sessions ===

impl Sessions {
    /// The service; call [`Sessions::load`] before serving. `rules` say who approves; a
    /// session for an ID under the authority's `session_only_ids` always waits for approval.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        crls: Arc<CrlPublisher>,
        authority: Arc<Authority>,
        entries: Arc<EntryCache>,
        rules: SessionRules,
    ) -> Self {
        Self {
            store,
            audit,
            crls,
            authority,
            entries,
            rules,
            live: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            serials: Mutex::new(()),
            metrics: SessionMetrics::default(),
        }
    }

    /// Sessions opened, live by state, ended by how.
    pub(crate) fn metrics(&self) -> &SessionMetrics {
        &self.metrics
    }

    /// Reads the sessions that can still expire from the store.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn load(&self) -> Result<(), StoreError> {
        // Read without holding the live set: session calls go on meanwhile.
        let mut found = Vec::new();
        for state in [SessionState::Pending, SessionState::Active] {
            let filter = SessionFilter {
                state: Some(state),
                ticket: None,
            };
            let mut page = PageRequest::first(0);
            let before = found.len();
            loop {
                let got = self.store.list_sessions(&filter, &page).await?;
                found.extend(got.items.into_iter().map(|s| (s.id, s.expires_at)));
                match got.next_page_token {
                    Some(token) => page = PageRequest::after(0, token),
                    None => break,
                }
            }
            self.metrics
                .live
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(i64::try_from(found.len() - before).unwrap_or(i64::MAX));
        }
        self.live.lock().await.extend(found);
        Ok(())
    }

    /// Opens a session for admin `uid`: active at once, or pending when approval is required.
    ///
    /// # Errors
    ///
    /// [`SessionError::Invalid`] for a request that breaks a rule; audit and store failures.
    pub(crate) async fn open(
        &self,
        uid: u32,
        request: OpenRequest,
        now: SystemTime,
    ) -> Result<Session, SessionError> {
        let td = self.authority.trust_domain();
        let mut problems = Vec::new();
        if let Err(e) = policy::check_workload_id(td, &request.spiffe_id) {
            problems.push(format!("spiffe_id {e}"));
        }
        if !request.parent_id.is_member_of(td) {
            problems.push(format!(
                "parent_id {} is not in trust domain {td}",
                request.parent_id
            ));
        }
        if request.selectors.is_empty() {
            problems.push("at least one selector is required".to_owned());
        }
        if request.ticket.len() > MAX_TICKET_LEN {
            problems.push(format!(
                "ticket is longer than {MAX_TICKET_LEN} bytes (it is carried in every SVID of the \
                 session, and TLS 1.2 sends client certificates in the clear)"
            ));
        }
        for (name, text) in [("ticket", &request.ticket), ("reason", &request.reason)] {
            if text.trim().is_empty() {
                problems.push(format!("{name} is required"));
            } else if text.len() > MAX_TEXT_LEN {
                problems.push(format!("{name} is longer than {MAX_TEXT_LEN} bytes"));
            }
        }
        let svid_ttl = self
            .authority
            .ttls()
            .session(request.ttl, request.svid_ttl)
            .map_err(|mut ttl_problems| problems.append(&mut ttl_problems))
            .unwrap_or_default();
        if !problems.is_empty() {
            return Err(SessionError::Invalid(problems.join("; ")));
        }
        let approval_required = self.rules.require_approval
            || request.require_approval
            || self
                .authority
                .session_only()
                .covering(&request.spiffe_id)
                .is_some();
        let session = Session {
            id: SessionId::generate()?,
            spiffe_id: request.spiffe_id,
            parent_id: request.parent_id,
            selectors: request.selectors,
            ticket: request.ticket,
            reason: request.reason,
            state: if approval_required {
                SessionState::Pending
            } else {
                SessionState::Active
            },
            requester: uid_actor(uid),
            approver: None,
            approval_required,
            opened_at: now,
            approved_at: None,
            expires_at: now + request.ttl,
            ended_at: None,
            ended_by: None,
            end_reason: None,
            svid_ttl,
            serials: Vec::new(),
            jwts: Vec::new(),
            entry_id: None,
        };
        let record = session_record(&uid_actor(uid), action::SESSION_OPEN, &session)
            .detail("parent_id", session.parent_id.to_string())
            .detail(
                "selectors",
                session
                    .selectors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            )
            .detail("reason", session.reason.clone())
            .detail("state", session.state.as_str())
            .detail("approval_required", approval_required)
            .detail("svid_ttl", svid_ttl.as_secs())
            .time_detail("expires_at", session.expires_at);
        let entry = (!approval_required).then(|| session_entry(&session));
        // The session (its entry, if active at once) and its record are one write.
        let session = self
            .store
            .create_session(session, entry, vec![record])
            .await?;
        self.metrics.opened.inc();
        self.track(&session).await;
        info!(uid, session_id = %session.id, state = %session.state, "session opened");
        Ok(session)
    }

    /// Approves a pending session as admin `uid`, who must not be its requester.
    ///
    /// # Errors
    ///
    /// [`SessionError::Refused`] when it is not pending, has reached its end, or `uid` opened
    /// it; audit and store failures.
    pub(crate) async fn approve(
        &self,
        uid: u32,
        id: &SessionId,
        now: SystemTime,
    ) -> Result<Session, SessionError> {
        let session = self.get(id).await?;
        if session.state != SessionState::Pending {
            return Err(SessionError::Refused(format!(
                "session {id} is {}; only a pending session can be approved",
                session.state
            )));
        }
        if session.expires_at <= now {
            self.expire_due(now).await;
            return Err(SessionError::Refused(format!(
                "session {id} reached its end unapproved and has expired"
            )));
        }
        let approver = uid_actor(uid);
        if approver == session.requester {
            warn!(uid, session_id = %id, "self-approval refused");
            return Err(SessionError::Refused(format!(
                "uid {uid} opened session {id} and cannot approve it: a different admin must (two-person rule)"
            )));
        }
        if !self.rules.approver_uids.is_empty() && !self.rules.approver_uids.contains(&uid) {
            warn!(uid, session_id = %id, "approval by a uid outside session_approver_uids refused");
            return Err(SessionError::Refused(format!(
                "uid {uid} is not in session_approver_uids ({}): only those uids approve sessions",
                self.rules
                    .approver_uids
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let record = session_record(&approver, action::SESSION_APPROVE, &session)
            .detail("requester", session.requester.clone());
        let mut next = session.clone();
        next.state = SessionState::Active;
        next.approver = Some(approver);
        next.approved_at = Some(now);
        let entry = session_entry(&next);
        let session = self
            .store
            .update_session(SessionUpdate {
                session: next,
                expected: SessionState::Pending,
                entry: SessionEntryOp::Create(Box::new(entry)),
                revocations: vec![],
                // The grant and its record are one write: neither is durable alone.
                audit: vec![record],
            })
            .await
            .map_err(state_changed)?;
        info!(uid, session_id = %id, "session approved");
        Ok(session)
    }

    /// Closes a pending or active session (the task is done): its entry goes at once.
    ///
    /// # Errors
    ///
    /// [`SessionError::Refused`] when it has ended; store failures; and
    /// [`SessionError::AuditAfterChange`] when it was closed but not recorded.
    pub(crate) async fn close(
        &self,
        uid: u32,
        id: &SessionId,
        now: SystemTime,
    ) -> Result<Session, SessionError> {
        // As in a revocation: every serial issued so far is listed, or the issuance sees the
        // session closed and hands nothing out.
        let serials = self.serials.lock().await;
        let session = self.get(id).await?;
        if session.state.is_final() {
            return Err(SessionError::Refused(format!(
                "session {id} is already {}",
                session.state
            )));
        }
        let actor = uid_actor(uid);
        let revocations =
            unexpired_revocations(&session, now, now, RevocationReason::CessationOfOperation);
        let ended = self
            .end(
                &session,
                SessionState::Closed,
                &actor,
                None,
                revocations,
                now,
            )
            .await?;
        drop(serials);
        if let Err(error) = self.crls.publish(now).await {
            warn!(%error, session_id = %id, "crls not re-published after a close");
        }
        let record = session_record(&actor, action::SESSION_CLOSE, &ended)
            .detail("previous_state", session.state.as_str())
            .detail("revoked_serials", unexpired_serials(&ended, now));
        self.audit
            .after_change(vec![record])
            .await
            .map_err(SessionError::AuditAfterChange)?;
        info!(uid, session_id = %id, "session closed");
        Ok(ended)
    }

    /// Revokes a session (pending, active, or closed with SVIDs still unexpired): its entry goes
    /// at once and every unexpired serial issued under it is put on the CRLs, which are
    /// re-published before this returns.
    ///
    /// # Errors
    ///
    /// [`SessionError::Invalid`] without a reason; [`SessionError::Refused`] when it is
    /// revoked or expired already; store and audit failures.
    pub(crate) async fn revoke(
        &self,
        uid: u32,
        id: &SessionId,
        reason: String,
        now: SystemTime,
    ) -> Result<Session, SessionError> {
        if reason.trim().is_empty() {
            return Err(SessionError::Invalid("a reason is required".to_owned()));
        }
        if reason.len() > MAX_TEXT_LEN {
            return Err(SessionError::Invalid(format!(
                "reason is longer than {MAX_TEXT_LEN} bytes"
            )));
        }
        let serials = self.serials.lock().await;
        let session = self.get(id).await?;
        if matches!(session.state, SessionState::Revoked | SessionState::Expired) {
            return Err(SessionError::Refused(format!(
                "session {id} is already {}",
                session.state
            )));
        }
        let actor = uid_actor(uid);
        // A closed session's serials are listed again, with this reason; they were revoked
        // when it closed.
        let revoked_at = match session.state {
            SessionState::Closed => session.ended_at.unwrap_or(now),
            _ => now,
        };
        let revocations = unexpired_revocations(
            &session,
            now,
            revoked_at,
            RevocationReason::PrivilegeWithdrawn,
        );
        let ended = self
            .end(
                &session,
                SessionState::Revoked,
                &actor,
                Some(reason.clone()),
                revocations,
                now,
            )
            .await?;
        drop(serials);
        if let Err(error) = self.crls.publish(now).await {
            warn!(%error, session_id = %id, "crls not re-published after a revocation");
        }
        let revoked_serials = unexpired_serials(&ended, now);
        // JWT-SVIDs cannot be put on a CRL: their ids are recorded, for relying parties that
        // keep a deny list until they expire.
        let unexpired_jwts: Vec<String> = ended
            .jwts
            .iter()
            .filter(|j| j.expires_at > now)
            .map(|j| j.jti.clone())
            .collect();
        let record = session_record(&actor, action::SESSION_REVOKE, &ended)
            .detail("reason", reason)
            .detail("previous_state", session.state.as_str())
            .detail("revoked_serials", revoked_serials)
            .detail("unexpired_jwts", unexpired_jwts);
        self.audit
            .after_change(vec![record])
            .await
            .map_err(SessionError::AuditAfterChange)?;
        info!(uid, session_id = %id, "session revoked");
        Ok(ended)
    }

    /// Signs an X509-SVID under the session of entry `entry_id` for `workload`, over the CSR's
    /// key. The serial is recorded on the session, then audited; the certificate is returned
    /// only if both are durable and the session is still active.
    ///
    /// # Errors
    ///
    /// [`SessionError::Invalid`]; [`SessionError::Refused`] for an entry without a session;
    /// [`SessionError::Denied`]; signing, entry cache, store and audit failures.
    pub(crate) async fn issue_x509(
        &self,
        agent: &Agent,
        entry_id: &str,
        workload: &SessionWorkload,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, SessionError> {
        let (entry, session) = self.grant(agent, entry_id, workload, now).await?;
        let claims = session_claims(&session)?;
        let svid = self
            .authority
            .sign_workload_svid(&entry, Some(&claims), csr, now)?;
        let recorded = {
            let _serials = self.serials.lock().await;
            self.store
                .add_session_credential(
                    &session.id,
                    SessionCredential::X509(SessionSerial {
                        serial: svid.serial.clone(),
                        not_after: svid.not_after,
                        authority_id: svid.authority_id.clone(),
                    }),
                )
                .await?
        };
        let record = workload.record(svids::x509_record(&agent.id, entry.id.as_str(), &svid));
        self.audit_issuance(record, &session).await?;
        if recorded.state != SessionState::Active {
            return Err(SessionError::Denied("the session ended".to_owned()));
        }
        info!(agent_id = %agent.id, session_id = %session.id, serial = %svid.serial, "session svid issued");
        Ok(svid)
    }

    /// Signs a JWT-SVID under the session of entry `entry_id` for `workload`; it never
    /// outlives the session.
    ///
    /// # Errors
    ///
    /// As [`Sessions::issue_x509`], and [`SessionError::Invalid`] for an empty audience.
    pub(crate) async fn issue_jwt(
        &self,
        agent: &Agent,
        entry_id: &str,
        workload: &SessionWorkload,
        audience: &[String],
        now: SystemTime,
    ) -> Result<(SpiffeId, IssuedJwt), SessionError> {
        svids::check_audience(audience).map_err(|e| SessionError::Invalid(e.to_string()))?;
        let (entry, session) = self.grant(agent, entry_id, workload, now).await?;
        let claims = session_claims(&session)?;
        let jwt = self
            .authority
            .sign_jwt_svid(&entry, Some(&claims), audience, now)?;
        let recorded = self
            .store
            .add_session_credential(
                &session.id,
                SessionCredential::Jwt(SessionJwt {
                    jti: jwt.jti.clone(),
                    audience: audience.to_vec(),
                    expires_at: jwt.expires_at,
                }),
            )
            .await?;
        let record = workload.record(svids::jwt_record(&agent.id, &entry, audience, &jwt));
        self.audit_issuance(record, &session).await?;
        if recorded.state != SessionState::Active {
            return Err(SessionError::Denied("the session ended".to_owned()));
        }
        info!(agent_id = %agent.id, session_id = %session.id, jti = %jwt.jti, "session jwt-svid issued");
        Ok((entry.spiffe_id.clone(), jwt))
    }

    /// One page of the sessions that pass `filter`.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn list(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> Result<crate::store::Page<Session>, SessionError> {
        Ok(self.store.list_sessions(filter, page).await?)
    }

    /// The session with this id.
    ///
    /// # Errors
    ///
    /// [`SessionError::NotFound`]; store failures.
    pub(crate) async fn get(&self, id: &SessionId) -> Result<Session, SessionError> {
        self.store
            .get_session(id)
            .await?
            .ok_or_else(|| SessionError::NotFound(id.to_string()))
    }

    /// Expires every pending or active session whose end is at or before `now`; returns how
    /// many it expired. The pass is a job that one server sharing the store runs at a time
    /// ([`Store::run_job`]): while another server runs it, this one expires nothing and
    /// [`Sessions::run_expiry`] tries again shortly. Failures are logged and retried the same
    /// way.
    pub(crate) async fn expire_due(&self, now: SystemTime) -> usize {
        let due: Vec<SessionId> = self
            .live
            .lock()
            .await
            .iter()
            .filter(|(_, end)| **end <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if due.is_empty() {
            return 0;
        }
        match self
            .store
            .run_job(EXPIRY_JOB, Box::pin(self.expire_each(due, now)))
            .await
        {
            Ok(Some(expired)) => expired,
            Ok(None) => 0,
            Err(error) => {
                warn!(%error, "cannot start expiring sessions; retrying");
                0
            }
        }
    }

    /// Expires each of `due` that is still pending or active; returns how many it expired.
    async fn expire_each(&self, due: Vec<SessionId>, now: SystemTime) -> usize {
        let mut expired = 0;
        for id in due {
            match self.expire_one(&id, now).await {
                Ok(true) => expired += 1,
                Ok(false) => {}
                Err(error) => warn!(%error, session_id = %id, "cannot expire a session; retrying"),
            }
        }
        expired
    }

    /// Expires sessions at their end, by the server's clock, until `shutdown` turns true.
    pub(crate) async fn run_expiry(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut rescan = tokio::time::Instant::now() + SESSION_RESCAN;
        loop {
            // Sessions opened through the other servers sharing the store are expired here
            // too (the server that opened one may be gone): the live set is read again.
            if tokio::time::Instant::now() >= rescan {
                rescan = tokio::time::Instant::now() + SESSION_RESCAN;
                if let Err(error) = self.load().await {
                    warn!(%error, "cannot read the live sessions; retrying");
                }
            }
            self.expire_due(SystemTime::now()).await;
            let next = self.live.lock().await.values().min().copied();
            // A session whose end has passed is still here when the pass was another
            // server's turn or failed: try again shortly, not at once.
            let wait = next
                .map_or(SESSION_RESCAN, |end| {
                    end.duration_since(SystemTime::now())
                        .map_or(EXPIRY_RETRY, |left| left.max(Duration::from_millis(20)))
                })
                .min(SESSION_RESCAN);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    // --- private ---

    /// Checks a session SVID request: the entry is authorized for `agent` and carries a
    /// session that is active at `now`, and the workload has every selector of the entry.
    async fn grant(
        &self,
        agent: &Agent,
        entry_id: &str,
        workload: &SessionWorkload,
        now: SystemTime,
    ) -> Result<(RegistrationEntry, Session), SessionError> {
        let id = EntryId::parse(entry_id).map_err(|e| SessionError::Invalid(e.to_string()))?;
        let Some(entry) = self.entries.authorize_one(agent, &id, now).await? else {
            warn!(agent_id = %agent.id, entry_id, "session svid refused: entry not authorized for agent");
            return Err(SessionError::Denied(
                "entry is not authorized for this agent".to_owned(),
            ));
        };
        let Some(session_id) = &entry.session_id else {
            return Err(SessionError::Refused(
                "entry is not a privileged session's: use BatchNewX509SVID".to_owned(),
            ));
        };
        let Some(session) = self.store.get_session(session_id).await? else {
            return Err(SessionError::Denied("no such session".to_owned()));
        };
        if session.state != SessionState::Active || session.expires_at <= now {
            return Err(SessionError::Denied(format!(
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
            return Err(SessionError::Denied(
                "the workload's selectors do not match the session's".to_owned(),
            ));
        }
        Ok((RegistrationEntry::clone(&entry), session))
    }

    /// Appends the record of a session credential; on failure it is not handed out.
    async fn audit_issuance(
        &self,
        record: NewAuditRecord,
        session: &Session,
    ) -> Result<(), SessionError> {
        let record = record
            .detail("session_id", session.id.as_str())
            .detail("ticket", session.ticket.clone());
        self.audit
            .before_grant(vec![record])
            .await
            .map_err(SessionError::AuditFailed)
    }

    async fn track(&self, session: &Session) {
        if session.state.is_final() {
            self.live.lock().await.remove(&session.id);
        } else {
            self.live
                .lock()
                .await
                .insert(session.id.clone(), session.expires_at);
            self.wake.notify_one();
        }
    }

    /// Moves `session` to a final state, deleting its entry, with `revocations`.
    async fn end(
        &self,
        session: &Session,
        state: SessionState,
        actor: &str,
        reason: Option<String>,
        revocations: Vec<Revocation>,
        now: SystemTime,
    ) -> Result<Session, SessionError> {
        let mut next = session.clone();
        next.state = state;
        next.ended_at = Some(now);
        next.ended_by = Some(actor.to_owned());
        next.end_reason = reason;
        let ended = self
            .store
            .update_session(SessionUpdate {
                session: next,
                expected: session.state,
                entry: SessionEntryOp::Delete,
                revocations,
                // Recorded after the change: a failing audit log never keeps a session alive.
                audit: vec![],
            })
            .await
            .map_err(state_changed)?;
        self.metrics
            .ended
            .get_or_create(&StateLabels {
                state: state.as_str(),
            })
            .inc();
        self.track(&ended).await;
        Ok(ended)
    }

    /// The servers whose CRLs do not list `session`'s revoked, unexpired serials after
    /// waiting [`REVOKE_CRL_WAIT`] for them (down or cut from the store: the serials go on
    /// their CRLs when they return, and expire within the session's SVID TTL anyway).
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn pending_crl_servers(
        &self,
        session: &Session,
        now: SystemTime,
    ) -> Result<Vec<String>, SessionError> {
        let mut revoked: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for serial in session.serials.iter().filter(|s| s.not_after > now) {
            revoked
                .entry(serial.authority_id.clone())
                .or_default()
                .push(serial.serial.clone());
        }
        if revoked.is_empty() {
            return Ok(Vec::new());
        }
        self.crls
            .pending_servers(&revoked, REVOKE_CRL_WAIT)
            .await
            .map_err(|e| match e {
                CrlError::Store(e) => SessionError::Store(e),
                other => SessionError::Store(StoreError::Unavailable(other.to_string())),
            })
    }

    /// Expires one session if it is still pending or active; false if it had ended.
    async fn expire_one(&self, id: &SessionId, now: SystemTime) -> Result<bool, SessionError> {
        let session = self.get(id).await?;
        if session.state.is_final() {
            self.live.lock().await.remove(id);
            return Ok(false);
        }
        let ended = match self
            .end(
                &session,
                SessionState::Expired,
                SERVER_ACTOR,
                None,
                vec![],
                now,
            )
            .await
        {
            Ok(ended) => ended,
            // Another server sharing the store ended it first (expired it too, or an operator
            // closed it): nothing left to do here.
            Err(SessionError::Refused(_)) if self.get(id).await?.state.is_final() => {
                self.live.lock().await.remove(id);
                return Ok(false);
            }
            Err(error) => return Err(error),
        };
        let record = session_record(SERVER_ACTOR, action::SESSION_EXPIRE, &ended)
            .detail("previous_state", session.state.as_str())
            .time_detail("expires_at", session.expires_at);
        self.audit
            .after_change(vec![record])
            .await
            .map_err(SessionError::AuditAfterChange)?;
        info!(session_id = %id, "session expired");
        Ok(true)
    }
}

// === impl SessionWorkload ===

impl SessionWorkload {
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

// === helpers ===

/// The revocations of `session`'s serials that have not expired at `now`, revoked at
/// `revoked_at` for `reason`.
fn unexpired_revocations(
    session: &Session,
    now: SystemTime,
    revoked_at: SystemTime,
    reason: RevocationReason,
) -> Vec<Revocation> {
    let cause = format!("session:{}", session.id);
    session
        .serials
        .iter()
        .filter(|s| s.not_after > now)
        .map(|s| Revocation {
            serial: s.serial.clone(),
            not_after: s.not_after,
            authority_id: Some(s.authority_id.clone()),
            revoked_at,
            cause: cause.clone(),
            reason,
        })
        .collect()
}

/// What a credential issued under `session` says of it.
fn session_claims(session: &Session) -> Result<SessionClaims, SessionError> {
    SessionClaims::new(session.id.as_str(), &session.ticket, session.expires_at).map_err(|e| {
        SessionError::Denied(format!(
            "session {} cannot be named in a credential ({e}); open a new one",
            session.id
        ))
    })
}

/// The serials of `session` that have not expired at `now`.
fn unexpired_serials(session: &Session, now: SystemTime) -> Vec<String> {
    session
        .serials
        .iter()
        .filter(|s| s.not_after > now)
        .map(|s| s.serial.clone())
        .collect()
}

/// The entry that carries an active session.
fn session_entry(session: &Session) -> NewEntry {
    let mut entry = NewEntry::new(
        session.spiffe_id.clone(),
        session.parent_id.clone(),
        session.selectors.clone(),
    );
    entry.x509_svid_ttl = Some(session.svid_ttl);
    entry.jwt_svid_ttl = Some(session.svid_ttl);
    entry.expires_at = Some(session.expires_at);
    entry.session_id = Some(session.id.clone());
    entry
}

/// A session step's audit record: subject the session id, with its id, ticket and identity.
pub(crate) fn session_record(actor: &str, action: &str, session: &Session) -> NewAuditRecord {
    NewAuditRecord::new(actor, action, session.id.as_str())
        .detail("session_id", session.id.as_str())
        .detail("ticket", session.ticket.clone())
        .detail("spiffe_id", session.spiffe_id.to_string())
}

fn state_changed(error: StoreError) -> SessionError {
    match error {
        StoreError::StateChanged { key, .. } => SessionError::Refused(format!(
            "session {key} changed state meanwhile; look at it again"
        )),
        other => SessionError::Store(other),
    }
}

#[cfg(test)]
mod tests {
    use sigil_core::Selector;

    use super::*;
    use crate::audit::AuditFilter;
    use crate::service::testing::{Fixture, csr};

    fn selectors() -> SelectorSet {
        [Selector::parse("unix:uid:1000").unwrap()]
            .into_iter()
            .collect()
    }

    fn open_request(parent: &SpiffeId) -> OpenRequest {
        OpenRequest {
            spiffe_id: SpiffeId::new("spiffe://example.org/admin/db").unwrap(),
            parent_id: parent.clone(),
            selectors: selectors(),
            ticket: "CHG-1".to_owned(),
            reason: "migrate".to_owned(),
            ttl: Duration::from_secs(600),
            svid_ttl: None,
            require_approval: false,
        }
    }

    fn workload() -> SessionWorkload {
        SessionWorkload {
            pid: 42,
            uid: 1000,
            gid: 1000,
            selectors: selectors(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_checks_every_rule_at_once() {
        let fx = Fixture::new().await;
        let agent = fx.attested_agent().await;
        let mut bad = open_request(&agent.id);
        bad.spiffe_id = SpiffeId::new("spiffe://example.org/sigil/x").unwrap();
        bad.ticket = " ".to_owned();
        bad.ttl = Duration::from_secs(9 * 3600);
        let Err(SessionError::Invalid(message)) = fx.sessions.open(0, bad, SystemTime::now()).await
        else {
            panic!("expected invalid");
        };
        for problem in ["reserved", "ticket is required", "max_session_ttl"] {
            assert!(message.contains(problem), "{problem}: {message}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_svid_is_issued_per_workload_recorded_and_revoked_onto_the_crls() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        let session = fx
            .sessions
            .open(0, open_request(&agent.id), now)
            .await
            .unwrap();
        assert_eq!(session.state, SessionState::Active);
        let entry_id = session.entry_id.clone().unwrap();
        let (csr_der, _) = csr();

        // A workload without the session's selectors gets nothing.
        let stranger = SessionWorkload {
            selectors: SelectorSet::new(),
            ..workload()
        };
        assert!(matches!(
            fx.sessions
                .issue_x509(&agent, entry_id.as_str(), &stranger, &csr_der, now)
                .await,
            Err(SessionError::Denied(_))
        ));
        // Ordinary issuance refuses the session's entry.
        let svid = fx
            .sessions
            .issue_x509(&agent, entry_id.as_str(), &workload(), &csr_der, now)
            .await
            .unwrap();
        assert_eq!(svid.spiffe_id, session.spiffe_id);
        let (_, jwt) = fx
            .sessions
            .issue_jwt(
                &agent,
                entry_id.as_str(),
                &workload(),
                &["db".to_owned()],
                now,
            )
            .await
            .unwrap();
        assert!(jwt.expires_at <= session.expires_at);
        let recorded = fx.sessions.get(&session.id).await.unwrap();
        assert_eq!(recorded.serials.len(), 1);
        assert_eq!(recorded.serials[0].serial, svid.serial);

        let records = fx
            .audit_records(AuditFilter {
                session_id: Some(session.id.as_str().to_owned()),
                ..AuditFilter::default()
            })
            .await;
        let actions: Vec<&str> = records.iter().map(|r| r.action.as_str()).collect();
        assert_eq!(
            actions,
            [
                action::SESSION_OPEN,
                action::SVID_X509_ISSUE,
                action::SVID_JWT_ISSUE
            ]
        );
        assert_eq!(records[1].details["workload_pid"], 42);
        assert_eq!(records[1].details["ticket"], "CHG-1");

        let revoked = fx
            .sessions
            .revoke(0, &session.id, "done badly".to_owned(), now)
            .await
            .unwrap();
        assert_eq!(revoked.state, SessionState::Revoked);
        let crls = fx.crls.current();
        assert!(
            crls.crls
                .iter()
                .any(|c| c.revoked_serials.contains(&svid.serial)),
            "{crls:?}"
        );
        // After the revocation nothing more is issued.
        assert!(matches!(
            fx.sessions
                .issue_x509(&agent, entry_id.as_str(), &workload(), &csr_der, now)
                .await,
            Err(SessionError::Denied(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_serial_issued_while_a_revocation_runs_is_revoked_or_withheld() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        let session = fx
            .sessions
            .open(0, open_request(&agent.id), now)
            .await
            .unwrap();
        let entry_id = session.entry_id.clone().unwrap();
        let (csr_der, _) = csr();
        let issuers: Vec<_> = (0..8)
            .map(|_| {
                let sessions = fx.sessions.clone();
                let agent = agent.clone();
                let entry_id = entry_id.clone();
                let csr_der = csr_der.clone();
                tokio::spawn(async move {
                    let mut handed_out = Vec::new();
                    for _ in 0..5 {
                        if let Ok(svid) = sessions
                            .issue_x509(&agent, entry_id.as_str(), &workload(), &csr_der, now)
                            .await
                        {
                            handed_out.push(svid.serial);
                        }
                    }
                    handed_out
                })
            })
            .collect();
        tokio::task::yield_now().await;
        fx.sessions
            .revoke(0, &session.id, "stop".to_owned(), now)
            .await
            .unwrap();
        let mut handed_out = Vec::new();
        for issuer in issuers {
            handed_out.extend(issuer.await.unwrap());
        }
        let revoked: Vec<String> = fx
            .store
            .list_revocations()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.serial)
            .collect();
        for serial in &handed_out {
            assert!(
                revoked.contains(serial),
                "{serial} handed out but not revoked"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn approval_takes_a_second_admin() {
        let fx = Fixture::requiring_approval().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        let pending = fx
            .sessions
            .open(10, open_request(&agent.id), now)
            .await
            .unwrap();
        assert_eq!(pending.state, SessionState::Pending);
        assert!(pending.entry_id.is_none());
        assert!(matches!(
            fx.sessions.approve(10, &pending.id, now).await,
            Err(SessionError::Refused(m)) if m.contains("two-person")
        ));
        let active = fx.sessions.approve(11, &pending.id, now).await.unwrap();
        assert_eq!(active.state, SessionState::Active);
        assert_eq!(active.approver.as_deref(), Some("uid:11"));
        let closed = fx.sessions.close(10, &pending.id, now).await.unwrap();
        assert_eq!(closed.state, SessionState::Closed);
        assert!(matches!(
            fx.sessions.close(10, &pending.id, now).await,
            Err(SessionError::Refused(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_whose_crls_cannot_be_published_is_still_recorded() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        let session = fx
            .sessions
            .open(10, open_request(&agent.id), now)
            .await
            .unwrap();
        // A revoked serial the CA cannot sign into a CRL: every publication fails from now on.
        fx.store
            .add_revocations(vec![Revocation {
                serial: "not hex".to_owned(),
                not_after: now + Duration::from_secs(3600),
                authority_id: None,
                revoked_at: now,
                cause: "fault injected by the test".to_owned(),
                reason: RevocationReason::Unspecified,
            }])
            .await
            .unwrap();
        assert!(fx.crls.publish(now).await.is_err());

        let revoked = fx
            .sessions
            .revoke(11, &session.id, "leaked".to_owned(), now)
            .await
            .unwrap();
        assert_eq!(revoked.state, SessionState::Revoked);
        let records = fx
            .audit_records(AuditFilter {
                session_id: Some(session.id.as_str().to_owned()),
                ..AuditFilter::default()
            })
            .await;
        let revoke: Vec<_> = records
            .iter()
            .filter(|r| r.action == action::SESSION_REVOKE)
            .collect();
        assert_eq!(revoke.len(), 1, "{records:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_only_ids_always_wait_for_a_listed_approver() {
        let rules = SessionRules {
            require_approval: false,
            approver_uids: vec![12],
        };
        let prefix = SpiffeId::new("spiffe://example.org/admin").unwrap();
        let fx = Fixture::with_rules(rules, policy::SessionOnly::new(vec![prefix])).await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        // Outside the prefix, no approval is needed.
        let mut free = open_request(&agent.id);
        free.spiffe_id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let free = fx.sessions.open(10, free, now).await.unwrap();
        assert_eq!(free.state, SessionState::Active);
        // Under it, the session waits, and only uid 12 approves it.
        let pending = fx
            .sessions
            .open(10, open_request(&agent.id), now)
            .await
            .unwrap();
        assert_eq!(pending.state, SessionState::Pending);
        assert!(pending.approval_required);
        assert!(matches!(
            fx.sessions.approve(11, &pending.id, now).await,
            Err(SessionError::Refused(m)) if m.contains("session_approver_uids")
        ));
        let active = fx.sessions.approve(12, &pending.id, now).await.unwrap();
        assert_eq!(active.approver.as_deref(), Some("uid:12"));
    }
}
