//! Agents: join tokens, attestation, authentication on every call, renewal, eviction and bans.
//!
//! An agent is authenticated from its X509-SVID on **every call** ([`Agents::authenticate`]):
//! the chain must verify against the current bundle at the current time, the agent's node
//! record must exist and not be banned, and the certificate's serial must be the node's current
//! one (or the one its last renewal issued, which then becomes current). A refusal carries a
//! [`DenyReason`] the agent acts on.
//!
//! Credentials are handed out only once their audit record is durable (attestation, renewal,
//! join tokens); changes that take something away (evict, ban) are made first and audited
//! right after.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use sigil_attestors::join_token::{self, JoinTokenAttestor};
use sigil_attestors::node::{AttestError, Challenge, NodeAttestor};
use sigil_attestors::x509pop::X509Pop;
use sigil_core::{SelectorSet, SpiffeId};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::audit::{NewAuditRecord, action, uid_actor};
use crate::policy;
use crate::service::audit::AuditLog;
use crate::service::authority::{Authority, IssuedSvid, SignError};
use crate::service::crl::CrlPublisher;
use crate::service::entry_cache::NodeAgent;
use crate::store::{
    AttestedNode, JoinToken, NewEntry, Page, PageRequest, Revocation, RevocationReason, Store,
    StoreError,
};

/// How often expired join tokens are deleted.
pub(crate) const TOKEN_PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// Why an agent was refused. The node API sends it as `sigil-reason` metadata with
/// `PermissionDenied`.
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

/// An authenticated agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Agent {
    /// Its ID.
    pub id: SpiffeId,
    /// When the SVID it authenticated with expires.
    pub not_after: SystemTime,
    /// What attestation found on its node (node aliases match on them).
    pub selectors: SelectorSet,
}

impl From<&Agent> for NodeAgent {
    fn from(agent: &Agent) -> Self {
        Self {
            id: agent.id.clone(),
            selectors: agent.selectors.clone(),
        }
    }
}

/// A join token just generated.
#[derive(Debug, Clone)]
pub(crate) struct GeneratedToken {
    /// The secret.
    pub token: String,
    /// When it stops working.
    pub expires_at: SystemTime,
    /// The ID the agent that spends it gets.
    pub agent_id: SpiffeId,
    /// The alias entry's ID, if the token carries one.
    pub alias: Option<SpiffeId>,
}

/// Why an agent call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AgentError {
    /// The caller is not (or no longer) an agent in good standing.
    #[error("{message}")]
    Denied {
        /// What the agent should do.
        reason: DenyReason,
        /// For the log and the caller.
        message: String,
    },
    /// The request breaks a rule.
    #[error("{0}")]
    Invalid(String),
    /// No agent with this ID.
    #[error("no agent {0}")]
    NotFound(SpiffeId),
    /// A banned agent cannot be evicted: it stays recorded so that it cannot attest again.
    #[error("agent {0} is banned; a banned agent stays recorded so it cannot attest again")]
    EvictBanned(SpiffeId),
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// The audit record of a credential could not be written, so it was not handed out.
    #[error("the audit record could not be written, so nothing was issued: {0}")]
    AuditFailed(StoreError),
    /// The change was made but its audit record could not be written.
    #[error("the change was made, but its audit record could not be written: {0}")]
    AuditAfterChange(StoreError),
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// Something the attestor relies on (the join tokens, the stream) failed; the detail is
    /// logged.
    #[error("attestation could not complete")]
    AttestorUnavailable,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The agent service.
#[derive(Debug)]
pub(crate) struct Agents {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    authority: Arc<Authority>,
    crls: Arc<CrlPublisher>,
    removed: broadcast::Sender<Removed>,
    /// The node attestors agents may use, by name: join_token always, x509pop when
    /// configured.
    attestors: Vec<Arc<dyn NodeAttestor>>,
}

/// The node of an agent that may be served: present and not banned.
fn attested(node: Option<&AttestedNode>) -> Result<&AttestedNode, AgentError> {
    let node = node.ok_or_else(|| DenyReason::NotAttested.error("no such agent: attest again"))?;
    if node.banned {
        return Err(DenyReason::Banned.error("agent is banned"));
    }
    Ok(node)
}

/// How often a node update is tried again when the node changed between read and write.
///
/// Each round some writer wins, so a writer among N at once succeeds within N + 1 rounds; 32
/// covers the bursts a node sees (renewals racing a ban, an eviction, a re-attestation) with a
/// margin (a test renews one agent 16 times at once while banning it; with 8, one local run
/// of the whole suite saw a renewal fail with an error other than the ban).
const NODE_CAS_ATTEMPTS: usize = 32;

/// An agent banned or evicted: its open streams end at once, with the reason it acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Removed {
    /// The agent.
    pub id: SpiffeId,
    /// Why it is refused from now on.
    pub reason: DenyReason,
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

    /// The reason whose wire value is `value`.
    pub fn parse(value: &str) -> Option<Self> {
        [
            Self::Expired,
            Self::NotAttested,
            Self::Banned,
            Self::MustReattest,
        ]
        .into_iter()
        .find(|r| r.as_str() == value)
    }

    fn error(self, message: impl Into<String>) -> AgentError {
        AgentError::Denied {
            reason: self,
            message: message.into(),
        }
    }
}

// === impl Agents ===

impl Agents {
    /// The service; `crls` are re-published when a ban revokes an agent's SVIDs. Agents
    /// attest with join tokens, and with x509pop when `x509pop` is configured.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        authority: Arc<Authority>,
        crls: Arc<CrlPublisher>,
        x509pop: Option<X509Pop>,
    ) -> Self {
        let mut attestors: Vec<Arc<dyn NodeAttestor>> = vec![Arc::new(JoinTokenAttestor::new(
            authority.trust_domain().clone(),
            store.clone(),
        ))];
        if let Some(x509pop) = x509pop {
            attestors.push(Arc::new(x509pop));
        }
        Self {
            store,
            audit,
            authority,
            crls,
            removed: broadcast::Sender::new(64),
            attestors,
        }
    }

    /// The attestor named `name`, if this server offers it.
    pub(crate) fn attestor(&self, name: &str) -> Result<Arc<dyn NodeAttestor>, AgentError> {
        self.attestors
            .iter()
            .find(|a| a.name() == name)
            .cloned()
            .ok_or_else(|| {
                let offered: Vec<&str> = self.attestors.iter().map(|a| a.name()).collect();
                AgentError::Invalid(format!(
                    "node attestor {name:?} is not enabled on this server (enabled: {})",
                    offered.join(", ")
                ))
            })
    }

    /// Every agent banned or evicted from now on (open sync streams end on it).
    pub(crate) fn subscribe_removed(&self) -> broadcast::Receiver<Removed> {
        self.removed.subscribe()
    }

    /// Generates a join token for admin `uid`, valid for `ttl` (`None`: the default), whose
    /// agent also gets the alias entry `alias`. The token itself is never stored, logged or
    /// recorded: the store keeps its SHA-256, and the agent ID it gives names its fingerprint.
    ///
    /// # Errors
    ///
    /// [`AgentError::Invalid`] for a lifetime or alias that breaks the policy; store and audit
    /// failures (then the token is not returned).
    pub(crate) async fn generate_join_token(
        &self,
        uid: u32,
        ttl: Option<Duration>,
        alias: Option<SpiffeId>,
        now: SystemTime,
    ) -> Result<GeneratedToken, AgentError> {
        let td = self.authority.trust_domain();
        let ttl = self
            .authority
            .ttls()
            .join_token(ttl)
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        if let Some(alias) = &alias {
            policy::check_workload_id(td, alias)
                .map_err(|e| AgentError::Invalid(format!("spiffe_id {e}")))?;
            self.authority
                .session_only()
                .refuse(alias, "a join token alias")
                .map_err(AgentError::Invalid)?;
        }
        let token = random_token()?;
        let agent_id = join_token::agent_id(td, &token)
            .map_err(|e| AgentError::Invalid(format!("join token: {e}")))?;
        self.store
            .create_join_token(JoinToken {
                token_hash: join_token::token_hash(&token),
                expires_at: now + ttl,
                created_at: now,
                alias_spiffe_id: alias.clone(),
            })
            .await?;
        let mut record =
            NewAuditRecord::new(uid_actor(uid), action::TOKEN_GENERATE, agent_id.to_string())
                .time_detail("expires_at", now + ttl);
        if let Some(alias) = &alias {
            record = record.detail("alias_spiffe_id", alias.to_string());
        }
        self.audit
            .before_grant(vec![record])
            .await
            .map_err(AgentError::AuditFailed)?;
        info!(uid, agent_id = %agent_id, "join token generated");
        Ok(GeneratedToken {
            token,
            expires_at: now + ttl,
            agent_id,
            alias,
        })
    }

    /// Attests an agent with `attestor` (its `payload`, challenges through `challenge`) and
    /// signs its SVID over `csr`. The CSR is checked before the attestor runs, so a malformed
    /// request does not spend a join token. An attestor whose proof can be presented again
    /// (x509pop) re-attests a known agent under the same ID, unless it is banned; its old SVID
    /// stops working.
    ///
    /// # Errors
    ///
    /// [`AgentError::Denied`] (`not_attested`) when the proof is refused, `banned` for a banned
    /// agent; invalid requests; signing, audit and store failures.
    pub(crate) async fn attest(
        &self,
        attestor: &dyn NodeAttestor,
        payload: &[u8],
        csr: &[u8],
        challenge: &mut dyn Challenge,
        now: SystemTime,
    ) -> Result<IssuedSvid, AgentError> {
        if csr.is_empty() {
            return Err(AgentError::Invalid("csr is required".to_owned()));
        }
        x509_parser::certification_request::X509CertificationRequest::from_der(csr)
            .map_err(|e| AgentError::Invalid(format!("malformed CSR: {e}")))?;
        let attestation = match attestor.attest(payload, csr, challenge, now).await {
            Ok(attestation) => attestation,
            Err(AttestError::Refused(reason)) => {
                warn!(attestor = attestor.name(), %reason, "attestation refused");
                return Err(DenyReason::NotAttested.error(reason));
            }
            Err(AttestError::Invalid(m)) => return Err(AgentError::Invalid(m)),
            Err(e) => {
                // The detail (a store's error) stays in the log: the caller is not
                // authenticated yet.
                warn!(attestor = attestor.name(), error = %e, "attestation failed");
                return Err(AgentError::AttestorUnavailable);
            }
        };
        let agent_id = attestation.agent_id;
        if !policy::is_agent_id(self.authority.trust_domain(), &agent_id) {
            return Err(DenyReason::NotAttested.error(format!(
                "the attestor named {agent_id}, which is not an agent ID of this trust domain"
            )));
        }
        // Checked again when the record is written (a ban in between wins). A spent proof (a
        // join token) names a new agent: nothing to look up.
        let known = if attestation.reattestable {
            match self.store.get_node(&agent_id).await? {
                Some(node) if node.banned => {
                    warn!(agent_id = %agent_id, "attestation refused: the agent is banned");
                    return Err(DenyReason::Banned.error("agent is banned"));
                }
                Some(node) if node.attestation_type != attestor.name() => {
                    warn!(agent_id = %agent_id, attested_with = %node.attestation_type, attestor = attestor.name(), "attestation refused: the agent ID belongs to an agent of another attestor");
                    return Err(DenyReason::NotAttested.error(format!(
                        "{agent_id} is an agent attested with {}, not {}",
                        node.attestation_type,
                        attestor.name()
                    )));
                }
                Some(_) => true,
                None => false,
            }
        } else {
            false
        };
        let svid = self.authority.sign_agent_svid(&agent_id, csr, now)?;
        let selectors: SelectorSet = attestation.selectors.into_iter().collect();
        let mut record = agent_svid_record(&agent_id, action::AGENT_ATTEST, &svid)
            .detail("attestation_type", attestor.name());
        if !selectors.is_empty() {
            let list: Vec<String> = selectors.iter().map(ToString::to_string).collect();
            record = record.detail("selectors", list.join(" "));
        }
        if known {
            record = record.detail("reattested", "true");
        }
        let alias = attestation.alias;
        if let Some(alias) = &alias {
            record = record.detail("alias_spiffe_id", alias.to_string());
        }
        // A token made before its alias's prefix became session-only: the agent attests, but
        // the alias is not created (no entry may name such an ID).
        let alias = match alias {
            Some(alias) => match self.authority.session_only().refuse(&alias, "an alias") {
                Ok(()) => Some(alias),
                Err(reason) => {
                    warn!(agent_id = %agent_id, alias = %alias, "join token alias not created: it is under session_only_ids");
                    record = record.detail("alias_refused", reason);
                    None
                }
            },
            None => None,
        };
        self.audit
            .before_grant(vec![record])
            .await
            .map_err(AgentError::AuditFailed)?;
        let fresh = AttestedNode {
            spiffe_id: agent_id.clone(),
            attestation_type: attestor.name().into(),
            serial: svid.serial.clone(),
            new_serial: None,
            not_after: svid.not_after,
            banned: false,
            selectors: selectors.clone(),
            created_at: now,
            updated_at: now,
        };
        self.record_attested(fresh, attestation.reattestable)
            .await?;
        if let Some(alias) = alias {
            let entry = NewEntry::new(alias, agent_id.clone(), Default::default());
            match self.store.create_entry(entry).await {
                Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        info!(agent_id = %agent_id, attestor = attestor.name(), reattested = known, "agent attested");
        Ok(svid)
    }

    /// Attests with join token `token` (what `AttestAgent` does).
    #[cfg(test)]
    pub(crate) async fn attest_token(
        &self,
        token: &str,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, AgentError> {
        let attestor = self.attestor(join_token::NAME)?;
        self.attest(
            &*attestor,
            token.as_bytes(),
            csr,
            &mut sigil_attestors::node::NoChallenge,
            now,
        )
        .await
    }

    /// Records a freshly attested node: created, or (for an attestor whose proof can be
    /// presented again) the known node's SVID, selectors and attestor replaced, refused if it
    /// is banned by then.
    async fn record_attested(
        &self,
        fresh: AttestedNode,
        reattestable: bool,
    ) -> Result<(), AgentError> {
        for _ in 0..NODE_CAS_ATTEMPTS {
            match self.store.create_node(fresh.clone()).await {
                Ok(_) => return Ok(()),
                Err(StoreError::AlreadyExists { .. }) if reattestable => {}
                Err(e) => return Err(e.into()),
            }
            let written = self
                .change_node(&fresh.spiffe_id, |node| {
                    let Some(node) = node else { return Ok(None) };
                    if node.banned {
                        return Err(DenyReason::Banned.error("agent is banned"));
                    }
                    if node.attestation_type != fresh.attestation_type {
                        return Err(DenyReason::NotAttested.error(format!(
                            "{} is an agent attested with {}",
                            node.spiffe_id, node.attestation_type
                        )));
                    }
                    let mut next = node.clone();
                    next.serial = fresh.serial.clone();
                    next.new_serial = None;
                    next.not_after = fresh.not_after;
                    next.selectors = fresh.selectors.clone();
                    next.attestation_type = fresh.attestation_type.clone();
                    Ok(Some(next))
                })
                .await?;
            if written.is_some() {
                // Whoever holds the replaced SVID is cut off at once, not when it expires.
                let _ = self.removed.send(Removed {
                    id: fresh.spiffe_id.clone(),
                    reason: DenyReason::MustReattest,
                });
                return Ok(());
            }
            // Evicted in between: create it again.
        }
        Err(AgentError::Store(StoreError::StateChanged {
            resource: "node",
            key: fresh.spiffe_id.to_string(),
        }))
    }

    /// Authenticates the caller from its client certificate chain (see the module docs).
    ///
    /// # Errors
    ///
    /// [`AgentError::Denied`] with the reason; store failures.
    pub(crate) async fn authenticate(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
        now: SystemTime,
    ) -> Result<Agent, AgentError> {
        let chain = chain.ok_or_else(|| {
            DenyReason::NotAttested.error("no agent SVID presented: attest first")
        })?;
        let (serial, not_after) = chain
            .first()
            .and_then(|leaf| leaf_serial_and_expiry(leaf))
            .ok_or_else(|| DenyReason::NotAttested.error("agent SVID cannot be parsed"))?;
        if not_after <= now {
            return Err(DenyReason::Expired.error("agent SVID expired"));
        }
        let id = self
            .authority
            .verifier_bundles()
            .verify(chain, now)
            .map_err(|e| {
                debug!(error = %e, "agent svid rejected");
                DenyReason::NotAttested.error(format!("agent SVID rejected: {e}"))
            })?;
        if !policy::is_agent_id(self.authority.trust_domain(), &id) {
            return Err(
                DenyReason::NotAttested.error("the client certificate is not an agent SVID")
            );
        }
        // A concurrent change (a ban, another first use) makes the check run again on what is
        // stored.
        let selectors = std::sync::Mutex::new(SelectorSet::new());
        self.change_node(&id, |node| {
            let node = attested(node)?;
            *selectors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = node.selectors.clone();
            if node.serial == serial {
                return Ok(None);
            }
            if node.new_serial.as_deref() != Some(serial.as_str()) {
                return Err(
                    DenyReason::MustReattest.error("agent SVID is not current: attest again")
                );
            }
            // First use of the renewed SVID: it becomes current, the old one stops working.
            let mut next = node.clone();
            next.serial = serial.clone();
            next.new_serial = None;
            next.not_after = not_after;
            Ok(Some(next))
        })
        .await?;
        Ok(Agent {
            id,
            not_after,
            selectors: selectors
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        })
    }

    /// Changes node `id` by compare-and-swap: `change` sees the stored node (`None`: there is
    /// none) and returns the node to write (`None`: nothing to write). When the node changed
    /// between the read and the write, it is read again and `change` asked again, so a
    /// concurrent change (a ban) is never undone. Returns what was written.
    ///
    /// # Errors
    ///
    /// `change`'s; the store's, [`StoreError::StateChanged`] after
    /// [`NODE_CAS_ATTEMPTS`] changes in a row.
    async fn change_node(
        &self,
        id: &SpiffeId,
        change: impl Fn(Option<&AttestedNode>) -> Result<Option<AttestedNode>, AgentError>,
    ) -> Result<Option<AttestedNode>, AgentError> {
        for _ in 0..NODE_CAS_ATTEMPTS {
            let node = self.store.get_node(id).await?;
            let Some(next) = change(node.as_ref())? else {
                return Ok(None);
            };
            let Some(node) = node else {
                // `change` wrote a node that is not there: nothing to swap with.
                return Err(AgentError::NotFound(id.clone()));
            };
            match self.store.update_node(&node, next).await {
                Ok(written) => return Ok(Some(written)),
                Err(StoreError::StateChanged { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(AgentError::Store(StoreError::StateChanged {
            resource: "node",
            key: id.to_string(),
        }))
    }

    /// Signs a renewed SVID for `agent` over the CSR's key; it becomes current at its first
    /// use.
    ///
    /// # Errors
    ///
    /// Signing, store and audit failures; [`DenyReason::NotAttested`] if the node is gone.
    pub(crate) async fn renew(
        &self,
        agent: &Agent,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, AgentError> {
        let svid = self.authority.sign_agent_svid(&agent.id, csr, now)?;
        self.audit
            .before_grant(vec![agent_svid_record(
                &agent.id,
                action::AGENT_RENEW,
                &svid,
            )])
            .await
            .map_err(AgentError::AuditFailed)?;
        // A ban since the read wins (the check runs again on what is stored), so a renewed
        // SVID of a banned agent is never recorded, never works.
        self.change_node(&agent.id, |node| {
            let mut next = attested(node)?.clone();
            next.new_serial = Some(svid.serial.clone());
            Ok(Some(next))
        })
        .await?;
        info!(agent_id = %agent.id, "agent svid renewed");
        Ok(svid)
    }

    /// One page of the attested agents.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn list(&self, page: &PageRequest) -> Result<Page<AttestedNode>, AgentError> {
        Ok(self.store.list_nodes(page).await?)
    }

    /// The agent `id`.
    ///
    /// # Errors
    ///
    /// [`AgentError::NotFound`]; the store's.
    pub(crate) async fn get(&self, id: &SpiffeId) -> Result<AttestedNode, AgentError> {
        self.store
            .get_node(id)
            .await?
            .ok_or_else(|| AgentError::NotFound(id.clone()))
    }

    /// Forgets agent `id` for admin `uid`: it must attest again.
    ///
    /// # Errors
    ///
    /// [`AgentError::EvictBanned`]; the store's; [`AgentError::AuditAfterChange`].
    pub(crate) async fn evict(&self, uid: u32, id: &SpiffeId) -> Result<AttestedNode, AgentError> {
        if self.store.get_node(id).await?.is_some_and(|n| n.banned) {
            return Err(AgentError::EvictBanned(id.clone()));
        }
        let node = self.store.delete_node(id).await?;
        if node.banned {
            // Banned between the check and the delete: the ban must stay recorded (a host
            // certificate could otherwise attest the agent again).
            self.store.create_node(node).await?;
            return Err(AgentError::EvictBanned(id.clone()));
        }
        let _ = self.removed.send(Removed {
            id: id.clone(),
            reason: DenyReason::NotAttested,
        });
        self.audit
            .after_change(vec![agent_record(uid, action::AGENT_EVICT, &node)])
            .await
            .map_err(AgentError::AuditAfterChange)?;
        info!(uid, agent_id = %id, "agent evicted");
        Ok(node)
    }

    /// Bans agent `id` for admin `uid`: it is refused from now on, and its SVIDs go on the
    /// CRLs until they expire.
    ///
    /// # Errors
    ///
    /// [`AgentError::NotFound`]; the store's; [`AgentError::AuditAfterChange`].
    pub(crate) async fn ban(
        &self,
        uid: u32,
        id: &SpiffeId,
        now: SystemTime,
    ) -> Result<AttestedNode, AgentError> {
        let not_found = || AgentError::NotFound(id.clone());
        let node = self
            .change_node(id, |node| {
                let mut next = node.ok_or_else(not_found)?.clone();
                next.banned = true;
                Ok(Some(next))
            })
            .await?
            .ok_or_else(not_found)?;
        let _ = self.removed.send(Removed {
            id: id.clone(),
            reason: DenyReason::Banned,
        });
        // The authority is not recorded for agent SVIDs, so every authority's CRL lists them.
        // A renewed SVID may end later than the current one; its lifetime is bounded by the
        // agent SVID TTL, which never exceeds the SVID cap.
        let max_svid = self.authority.ttls().max_svid;
        let revocations: Vec<Revocation> = std::iter::once(node.serial.clone())
            .chain(node.new_serial.clone())
            .filter(|_| node.not_after > now)
            .map(|serial| Revocation {
                serial,
                not_after: now.max(node.not_after) + max_svid,
                authority_id: None,
                revoked_at: now,
                cause: format!("agent:{}", node.spiffe_id),
                reason: RevocationReason::Unspecified,
            })
            .collect();
        self.store.add_revocations(revocations).await?;
        if let Err(error) = self.crls.publish(now).await {
            warn!(%error, "crls not re-published after a ban");
        }
        self.audit
            .after_change(vec![agent_record(uid, action::AGENT_BAN, &node)])
            .await
            .map_err(AgentError::AuditAfterChange)?;
        info!(uid, agent_id = %id, "agent banned");
        Ok(node)
    }

    /// Deletes the join tokens that expired at or before `now`; returns how many.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn prune_tokens(&self, now: SystemTime) -> Result<u64, AgentError> {
        Ok(self.store.prune_join_tokens(now).await?)
    }

    /// Prunes expired join tokens every [`TOKEN_PRUNE_INTERVAL`] until `shutdown` turns true.
    pub(crate) async fn run_token_pruning(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(TOKEN_PRUNE_INTERVAL) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            match self.prune_tokens(SystemTime::now()).await {
                Ok(0) => {}
                Ok(pruned) => debug!(pruned, "expired join tokens pruned"),
                Err(error) => warn!(%error, "cannot prune expired join tokens"),
            }
        }
    }
}

// === helpers ===

/// A join token: 16 random bytes, hex (a valid SPIFFE ID path segment).
fn random_token() -> Result<String, AgentError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| AgentError::Random)?;
    Ok(sigil_core::hex::encode(&bytes))
}

/// The audit record of an agent SVID (attestation or renewal).
fn agent_svid_record(agent_id: &SpiffeId, action: &str, svid: &IssuedSvid) -> NewAuditRecord {
    NewAuditRecord::new(agent_id.to_string(), action, agent_id.to_string())
        .detail("agent", agent_id.to_string())
        .detail("serial", svid.serial.clone())
        .time_detail("not_after", svid.not_after)
}

/// The audit record of an admin's change to an agent.
fn agent_record(uid: u32, action: &str, node: &AttestedNode) -> NewAuditRecord {
    NewAuditRecord::new(uid_actor(uid), action, node.spiffe_id.to_string())
        .detail("agent", node.spiffe_id.to_string())
        .detail("serial", node.serial.clone())
}

fn leaf_serial_and_expiry(leaf: &[u8]) -> Option<(String, SystemTime)> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let serial = sigil_core::hex::encode(cert.raw_serial());
    let not_after = sigil_core::time::from_unix_seconds(cert.validity().not_after.timestamp())?;
    Some((serial, not_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing::{Fixture, csr};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ban_racing_renewals_always_stands() {
        let fx = Fixture::new().await;
        let agent = fx.attested_agent().await;
        let now = SystemTime::now();
        let agents = fx.agents.clone();
        let renewals: Vec<_> = (0..16)
            .map(|_| {
                let agents = agents.clone();
                let agent = agent.clone();
                tokio::spawn(async move {
                    let (der, _) = csr();
                    agents.renew(&agent, &der, now).await
                })
            })
            .collect();
        fx.agents.ban(0, &agent.id, now).await.unwrap();
        for renewal in renewals {
            // Before the ban: renewed; after it: refused as banned. Never an error else.
            match renewal.await.unwrap() {
                Ok(_)
                | Err(AgentError::Denied {
                    reason: DenyReason::Banned,
                    ..
                }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let node = fx.store.get_node(&agent.id).await.unwrap().unwrap();
        assert!(node.banned, "a renewal undid the ban");
        // Any renewed SVID it holds does not authenticate.
        assert!(matches!(
            fx.agents.renew(&agent, &csr().0, now).await,
            Err(AgentError::Denied {
                reason: DenyReason::Banned,
                ..
            })
        ));
    }

    /// An attestor that names a fixed agent with fixed selectors (as x509pop does for one host
    /// certificate), under `name`.
    #[derive(Debug)]
    struct Fixed {
        name: &'static str,
        id: SpiffeId,
    }

    #[async_trait::async_trait]
    impl NodeAttestor for Fixed {
        fn name(&self) -> &'static str {
            self.name
        }

        async fn attest(
            &self,
            _payload: &[u8],
            _binding: &[u8],
            _challenge: &mut dyn Challenge,
            _now: SystemTime,
        ) -> Result<sigil_attestors::node::Attestation, AttestError> {
            Ok(sigil_attestors::node::Attestation {
                agent_id: self.id.clone(),
                selectors: vec![sigil_core::Selector::parse("x509pop:subject:cn:node-1").unwrap()],
                reattestable: true,
                alias: None,
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reattestation_replaces_the_svid_of_the_same_attestors_agent_only_and_never_a_ban() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let mut removed = fx.agents.subscribe_removed();
        let pop = Fixed {
            name: "x509pop",
            id: SpiffeId::new("spiffe://example.org/sigil/agent/x509pop/abc").unwrap(),
        };
        let attest = |attestor: &'static Fixed| {
            let agents = fx.agents.clone();
            async move {
                agents
                    .attest(
                        attestor,
                        b"p",
                        &csr().0,
                        &mut sigil_attestors::node::NoChallenge,
                        now,
                    )
                    .await
            }
        };
        let pop: &'static Fixed = Box::leak(Box::new(pop));
        let first = attest(pop).await.unwrap();
        let node = fx.store.get_node(&pop.id).await.unwrap().unwrap();
        assert_eq!(node.attestation_type, "x509pop");
        assert_eq!(node.selectors.len(), 1);
        // Again: the node's SVID is the new one; the old one must re-attest, and its streams
        // are told at once.
        let second = attest(pop).await.unwrap();
        assert_ne!(first.serial, second.serial);
        let old = [CertificateDer::from(first.chain_der.clone())];
        assert!(matches!(
            fx.agents.authenticate(Some(&old), now).await,
            Err(AgentError::Denied {
                reason: DenyReason::MustReattest,
                ..
            })
        ));
        let cut = removed.try_recv().unwrap();
        assert_eq!(
            (cut.id, cut.reason),
            (pop.id.clone(), DenyReason::MustReattest)
        );
        let new = [CertificateDer::from(second.chain_der.clone())];
        let agent = fx.agents.authenticate(Some(&new), now).await.unwrap();
        assert_eq!(
            agent.selectors.len(),
            1,
            "node selectors reach the entry cache"
        );

        // An attestor may not take over another attestor's agent.
        let token_agent = fx.attested_agent().await;
        let thief: &'static Fixed = Box::leak(Box::new(Fixed {
            name: "x509pop",
            id: token_agent.id.clone(),
        }));
        let err = attest(thief).await.unwrap_err();
        assert!(
            matches!(&err, AgentError::Denied { reason: DenyReason::NotAttested, message } if message.contains("attested with join_token")),
            "{err}"
        );

        // Banned: never again.
        fx.agents.ban(0, &pop.id, now).await.unwrap();
        assert!(matches!(
            attest(pop).await,
            Err(AgentError::Denied {
                reason: DenyReason::Banned,
                ..
            })
        ));
        assert!(matches!(
            fx.agents.evict(0, &pop.id).await,
            Err(AgentError::EvictBanned(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_attests_once_and_the_agent_authenticates_until_banned() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let alias = SpiffeId::new("spiffe://example.org/cluster/a").unwrap();
        let token = fx
            .agents
            .generate_join_token(0, None, Some(alias.clone()), now)
            .await
            .unwrap();
        assert!(policy::is_agent_id(
            fx.authority.trust_domain(),
            &token.agent_id
        ));
        // A malformed CSR does not burn the token.
        assert!(matches!(
            fx.agents.attest_token(&token.token, b"junk", now).await,
            Err(AgentError::Invalid(_))
        ));
        let (csr_der, _) = csr();
        let svid = fx
            .agents
            .attest_token(&token.token, &csr_der, now)
            .await
            .unwrap();
        assert_eq!(svid.spiffe_id, token.agent_id);
        let again = fx
            .agents
            .attest_token(&token.token, &csr_der, now)
            .await
            .unwrap_err();
        assert!(matches!(
            again,
            AgentError::Denied {
                reason: DenyReason::NotAttested,
                ..
            }
        ));
        // The alias entry exists, parented to the agent.
        let listed = fx
            .store
            .list_entries(&Default::default(), &PageRequest::first(10))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 1);
        assert_eq!(listed.items[0].spiffe_id, alias);
        assert_eq!(listed.items[0].parent_id, token.agent_id);

        let chain = [CertificateDer::from(svid.chain_der.clone())];
        let agent = fx.agents.authenticate(Some(&chain), now).await.unwrap();
        assert_eq!(agent.id, token.agent_id);
        assert!(matches!(
            fx.agents.authenticate(None, now).await,
            Err(AgentError::Denied {
                reason: DenyReason::NotAttested,
                ..
            })
        ));
        assert!(matches!(
            fx.agents.authenticate(Some(&chain), svid.not_after).await,
            Err(AgentError::Denied {
                reason: DenyReason::Expired,
                ..
            })
        ));

        // A renewed SVID becomes current at first use; the old one then must re-attest.
        let renewed = fx.agents.renew(&agent, &csr_der, now).await.unwrap();
        let renewed_chain = [CertificateDer::from(renewed.chain_der.clone())];
        fx.agents
            .authenticate(Some(&renewed_chain), now)
            .await
            .unwrap();
        assert!(matches!(
            fx.agents.authenticate(Some(&chain), now).await,
            Err(AgentError::Denied {
                reason: DenyReason::MustReattest,
                ..
            })
        ));

        let banned = fx.agents.ban(0, &agent.id, now).await.unwrap();
        assert!(banned.banned);
        assert!(matches!(
            fx.agents.authenticate(Some(&renewed_chain), now).await,
            Err(AgentError::Denied {
                reason: DenyReason::Banned,
                ..
            })
        ));
        let revoked = fx.store.list_revocations().await.unwrap();
        assert!(
            revoked.iter().any(|r| r.serial == renewed.serial),
            "{revoked:?}"
        );
        assert!(fx.crls.current().lists_anything());
        assert!(matches!(
            fx.agents.evict(0, &agent.id).await,
            Err(AgentError::EvictBanned(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_rules_and_eviction() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let too_long = fx
            .agents
            .generate_join_token(0, Some(policy::MAX_JOIN_TOKEN_TTL * 2), None, now)
            .await
            .unwrap_err();
        assert!(matches!(too_long, AgentError::Invalid(m) if m.contains("7d")));
        let reserved = SpiffeId::new("spiffe://example.org/sigil/x").unwrap();
        assert!(matches!(
            fx.agents.generate_join_token(0, None, Some(reserved), now).await,
            Err(AgentError::Invalid(m)) if m.contains("reserved")
        ));
        // The record names the agent ID the token gives (today that ID still carries the
        // token itself: the hardening issue replaces it with the token's fingerprint).
        let token = fx
            .agents
            .generate_join_token(0, None, None, now)
            .await
            .unwrap();
        let records = fx.audit_records(Default::default()).await;
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].action, action::TOKEN_GENERATE);
        assert_eq!(records[0].subject, token.agent_id.to_string());

        let (csr_der, _) = csr();
        fx.agents
            .attest_token(&token.token, &csr_der, now)
            .await
            .unwrap();
        assert_eq!(
            fx.agents
                .list(&PageRequest::first(10))
                .await
                .unwrap()
                .items
                .len(),
            1
        );
        let evicted = fx.agents.evict(0, &token.agent_id).await.unwrap();
        assert_eq!(evicted.spiffe_id, token.agent_id);
        assert!(matches!(
            fx.agents.get(&token.agent_id).await,
            Err(AgentError::NotFound(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expired_tokens_are_pruned_and_then_unknown() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let short = fx
            .agents
            .generate_join_token(0, Some(Duration::from_secs(60)), None, now)
            .await
            .unwrap();
        let long = fx
            .agents
            .generate_join_token(0, None, None, now)
            .await
            .unwrap();
        let later = now + Duration::from_secs(61);
        assert_eq!(fx.agents.prune_tokens(later).await.unwrap(), 1);
        let (csr_der, _) = csr();
        assert!(matches!(
            fx.agents.attest_token(&short.token, &csr_der, now).await,
            Err(AgentError::Denied {
                reason: DenyReason::NotAttested,
                ..
            })
        ));
        fx.agents
            .attest_token(&long.token, &csr_der, now)
            .await
            .unwrap();
    }

    #[test]
    fn deny_reasons_round_trip() {
        for reason in [
            DenyReason::Expired,
            DenyReason::NotAttested,
            DenyReason::Banned,
            DenyReason::MustReattest,
        ] {
            assert_eq!(DenyReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(DenyReason::parse("other"), None);
    }
}
