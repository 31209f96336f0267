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
//! Audit order, failing closed: the records of steps that grant something (`session.open`,
//! `session.approve`) are appended **before** the change is made, so a failed audit write
//! grants nothing. Steps that take something away (`session.close`, `session.revoke`,
//! `session.expire`) take effect first and are audited right after: a broken audit log never
//! keeps a session alive; the caller is told if its record could not be written.

pub mod crl;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_core::{SelectorSet, SpiffeId, TrustDomain};
use tokio::sync::{Mutex, Notify, watch};
use tracing::{info, warn};

use self::crl::CrlPublisher;
use crate::api::node::is_reserved;
use crate::audit::{AuditLog, NewAuditRecord, SERVER_ACTOR, action, uid_actor};
use crate::store::{
    NewEntry, PageRequest, Revocation, Session, SessionEntryOp, SessionFilter, SessionId,
    SessionState, SessionUpdate, Store, StoreError,
};

/// Default `max_session_ttl`.
pub const DEFAULT_MAX_SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Default `session_svid_ttl`.
pub const DEFAULT_SESSION_SVID_TTL: Duration = Duration::from_secs(300);

/// The longest ticket and reason accepted, in bytes.
pub const MAX_TEXT_LEN: usize = 1024;

/// The server settings sessions follow.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The longest session.
    pub max_session_ttl: Duration,
    /// The default lifetime of each SVID issued under a session.
    pub session_svid_ttl: Duration,
    /// Whether every session needs a second admin's approval.
    pub require_session_approval: bool,
    /// The longest SVID lifetime the authorities honour (`ca_ttl / 6`).
    pub max_svid_ttl: Duration,
}

/// What an admin asks for when opening a session.
#[derive(Debug, Clone)]
pub struct OpenRequest {
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
pub enum SessionError {
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
    #[error("the audit record could not be written, so nothing was changed: {0}")]
    AuditFailed(StoreError),
    /// The change was made but its audit record could not be written.
    #[error("the change was made, but its audit record could not be written: {0}")]
    AuditAfterChange(StoreError),
    /// The store failed.
    #[error("the server's store failed: {0}")]
    Store(#[from] StoreError),
}

/// The session service: state changes, their audit, expiry and revocation.
#[derive(Debug)]
pub struct Sessions {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    crls: Arc<CrlPublisher>,
    settings: SessionSettings,
    /// Sessions that can still expire (pending or active), by id, with their end.
    live: Mutex<BTreeMap<SessionId, SystemTime>>,
    wake: Notify,
}

// === impl Sessions ===

impl Sessions {
    /// The service; call [`Sessions::load`] before serving.
    pub fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        crls: Arc<CrlPublisher>,
        settings: SessionSettings,
    ) -> Self {
        Self {
            store,
            audit,
            crls,
            settings,
            live: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
        }
    }

    /// Reads the sessions that can still expire from the store.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn load(&self) -> Result<(), StoreError> {
        let mut live = self.live.lock().await;
        for state in [SessionState::Pending, SessionState::Active] {
            let filter = SessionFilter {
                state: Some(state),
                ticket: None,
            };
            let mut page = PageRequest::first(0);
            loop {
                let got = self.store.list_sessions(&filter, &page).await?;
                for s in got.items {
                    live.insert(s.id, s.expires_at);
                }
                match got.next_page_token {
                    Some(token) => page = PageRequest::after(0, token),
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// The settings.
    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    /// The CRL publisher.
    pub fn crls(&self) -> &Arc<CrlPublisher> {
        &self.crls
    }

    /// Opens a session for admin `uid`: active at once, or pending when approval is required.
    ///
    /// # Errors
    ///
    /// [`SessionError::Invalid`] for a request that breaks a rule; audit and store failures.
    pub async fn open(
        &self,
        uid: u32,
        request: OpenRequest,
        now: SystemTime,
    ) -> Result<Session, SessionError> {
        let s = &self.settings;
        let mut problems = Vec::new();
        if !request.spiffe_id.is_member_of(&s.trust_domain) {
            problems.push(format!(
                "spiffe_id {} is not in trust domain {}",
                request.spiffe_id, s.trust_domain
            ));
        } else if request.spiffe_id.is_root() || is_reserved(&request.spiffe_id) {
            problems.push(format!(
                "spiffe_id {} cannot be granted (no path, or under the reserved /sigil/)",
                request.spiffe_id
            ));
        }
        if !request.parent_id.is_member_of(&s.trust_domain) {
            problems.push(format!(
                "parent_id {} is not in trust domain {}",
                request.parent_id, s.trust_domain
            ));
        }
        if request.selectors.is_empty() {
            problems.push("at least one selector is required".to_owned());
        }
        for (name, text) in [("ticket", &request.ticket), ("reason", &request.reason)] {
            if text.trim().is_empty() {
                problems.push(format!("{name} is required"));
            } else if text.len() > MAX_TEXT_LEN {
                problems.push(format!("{name} is longer than {MAX_TEXT_LEN} bytes"));
            }
        }
        if request.ttl.is_zero() {
            problems.push("ttl is required".to_owned());
        } else if request.ttl > s.max_session_ttl {
            problems.push(format!(
                "ttl {}s is longer than the server's max_session_ttl {}s",
                request.ttl.as_secs(),
                s.max_session_ttl.as_secs()
            ));
        }
        let svid_ttl = request.svid_ttl.unwrap_or(s.session_svid_ttl);
        if svid_ttl >= request.ttl && !request.ttl.is_zero() {
            problems.push(format!(
                "svid ttl {}s must be shorter than the session ttl {}s",
                svid_ttl.as_secs(),
                request.ttl.as_secs()
            ));
        }
        if svid_ttl > s.max_svid_ttl {
            problems.push(format!(
                "svid ttl {}s is longer than ca_ttl / 6 = {}s",
                svid_ttl.as_secs(),
                s.max_svid_ttl.as_secs()
            ));
        }
        if !problems.is_empty() {
            return Err(SessionError::Invalid(problems.join("; ")));
        }
        let approval_required = s.require_session_approval || request.require_approval;
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
        self.audit
            .append(vec![record])
            .await
            .map_err(SessionError::AuditFailed)?;
        let entry = (!approval_required).then(|| session_entry(&session));
        let session = self.store.create_session(session, entry).await?;
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
    pub async fn approve(
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
        let record = session_record(&approver, action::SESSION_APPROVE, &session)
            .detail("requester", session.requester.clone());
        self.audit
            .append(vec![record])
            .await
            .map_err(SessionError::AuditFailed)?;
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
    pub async fn close(
        &self,
        uid: u32,
        id: &SessionId,
        now: SystemTime,
    ) -> Result<Session, SessionError> {
        let session = self.get(id).await?;
        if session.state.is_final() {
            return Err(SessionError::Refused(format!(
                "session {id} is already {}",
                session.state
            )));
        }
        let actor = uid_actor(uid);
        let ended = self
            .end(&session, SessionState::Closed, &actor, None, vec![], now)
            .await?;
        let record = session_record(&actor, action::SESSION_CLOSE, &ended)
            .detail("previous_state", session.state.as_str());
        self.audit
            .append(vec![record])
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
    pub async fn revoke(
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
        let session = self.get(id).await?;
        if matches!(session.state, SessionState::Revoked | SessionState::Expired) {
            return Err(SessionError::Refused(format!(
                "session {id} is already {}",
                session.state
            )));
        }
        let actor = uid_actor(uid);
        let cause = format!("session:{id}");
        let revocations: Vec<Revocation> = session
            .serials
            .iter()
            .filter(|s| s.not_after > now)
            .map(|s| Revocation {
                serial: s.serial.clone(),
                not_after: s.not_after,
                authority_id: Some(s.authority_id.clone()),
                revoked_at: now,
                cause: cause.clone(),
            })
            .collect();
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
        // Serials issued while the state was changing are caught here.
        let late: Vec<Revocation> = ended
            .serials
            .iter()
            .filter(|s| s.not_after > now && !session.serials.contains(s))
            .map(|s| Revocation {
                serial: s.serial.clone(),
                not_after: s.not_after,
                authority_id: Some(s.authority_id.clone()),
                revoked_at: now,
                cause: cause.clone(),
            })
            .collect();
        self.store.add_revocations(late).await?;
        if let Err(error) = self.crls.publish(now).await {
            warn!(%error, session_id = %id, "crls not re-published after a revocation");
        }
        let revoked_serials: Vec<String> = ended
            .serials
            .iter()
            .filter(|s| s.not_after > now)
            .map(|s| s.serial.clone())
            .collect();
        let record = session_record(&actor, action::SESSION_REVOKE, &ended)
            .detail("reason", reason)
            .detail("previous_state", session.state.as_str())
            .detail("revoked_serials", revoked_serials);
        self.audit
            .append(vec![record])
            .await
            .map_err(SessionError::AuditAfterChange)?;
        info!(uid, session_id = %id, "session revoked");
        Ok(ended)
    }

    /// The session with this id.
    ///
    /// # Errors
    ///
    /// [`SessionError::NotFound`]; store failures.
    pub async fn get(&self, id: &SessionId) -> Result<Session, SessionError> {
        self.store
            .get_session(id)
            .await?
            .ok_or_else(|| SessionError::NotFound(id.to_string()))
    }

    /// Expires every pending or active session whose end is at or before `now`; returns how
    /// many it expired. Failures are logged and retried on the next call.
    pub async fn expire_due(&self, now: SystemTime) -> usize {
        let due: Vec<SessionId> = self
            .live
            .lock()
            .await
            .iter()
            .filter(|(_, end)| **end <= now)
            .map(|(id, _)| id.clone())
            .collect();
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
    pub async fn run_expiry(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            self.expire_due(SystemTime::now()).await;
            let next = self.live.lock().await.values().min().copied();
            let wait = next.map_or(Duration::from_secs(60), |end| {
                end.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .clamp(Duration::from_millis(20), Duration::from_secs(60))
            });
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    // --- private ---

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
            })
            .await
            .map_err(state_changed)?;
        self.track(&ended).await;
        Ok(ended)
    }

    /// Expires one session if it is still pending or active; false if it had ended.
    async fn expire_one(&self, id: &SessionId, now: SystemTime) -> Result<bool, SessionError> {
        let session = self.get(id).await?;
        if session.state.is_final() {
            self.live.lock().await.remove(id);
            return Ok(false);
        }
        let ended = self
            .end(
                &session,
                SessionState::Expired,
                SERVER_ACTOR,
                None,
                vec![],
                now,
            )
            .await?;
        let record = session_record(SERVER_ACTOR, action::SESSION_EXPIRE, &ended)
            .detail("previous_state", session.state.as_str())
            .time_detail("expires_at", session.expires_at);
        self.audit
            .append(vec![record])
            .await
            .map_err(SessionError::AuditAfterChange)?;
        info!(session_id = %id, "session expired");
        Ok(true)
    }
}

// === helpers ===

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
pub fn session_record(actor: &str, action: &str, session: &Session) -> NewAuditRecord {
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
