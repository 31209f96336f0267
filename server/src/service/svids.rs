//! Workload SVIDs: what an agent may have signed for its workloads, and what an operator mints.
//!
//! What an agent may ask for is decided here, never by the agent: an entry is authorized for an
//! agent when its parent is the agent's ID or the SPIFFE ID of another entry authorized for it
//! (recursively, which is how alias entries work), read from the entry cache. Certificates are
//! built from the entry; the CSR only proves possession of the key (SPIRE CVE-2021-27098).
//! Entries of privileged sessions are refused here: their SVIDs come from
//! [`Sessions`](crate::service::sessions::Sessions), per caller.
//!
//! Every issuance is written to the audit log (the agent, or `uid:N` for a mint, as actor) and
//! the credential is returned only once its record is durable. A batch of X509-SVIDs is
//! recorded with one append.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_core::SpiffeId;
use tracing::{info, warn};

use crate::audit::{NewAuditRecord, action, uid_actor};
use crate::service::agents::Agent;
use crate::service::audit::AuditLog;
use crate::service::authority::{Authority, IssuedJwt, IssuedSvid, SignError};
use crate::service::entry_cache::{EntryCache, EntryCacheError};
use crate::store::{EntryId, RegistrationEntry, StoreError};

/// The most CSRs one batch may carry.
pub(crate) const MAX_BATCH_SIZE: usize = 500;

/// Why an SVID was not issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum SvidError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The entry is not authorized for the calling agent.
    #[error("entry is not authorized for this agent")]
    NotAuthorized,
    /// The entry belongs to a privileged session: its SVIDs come from the session calls.
    #[error("entry belongs to a privileged session: use {0}")]
    SessionEntry(&'static str),
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// The entries cannot be read now, so nothing is authorized.
    #[error(transparent)]
    Entries(#[from] EntryCacheError),
    /// The audit record could not be written, so nothing was handed out.
    #[error("the audit record could not be written, so nothing was issued: {0}")]
    AuditFailed(StoreError),
    /// The signing task failed.
    #[error("signing failed: {0}")]
    Task(String),
}

/// One CSR of a batch: the entry it is for and the CSR, DER.
#[derive(Debug, Clone)]
pub(crate) struct SvidRequest {
    /// The entry id, as the agent sent it.
    pub entry_id: String,
    /// The CSR.
    pub csr: Vec<u8>,
}

/// The workload SVID service.
#[derive(Debug)]
pub(crate) struct Svids {
    audit: Arc<AuditLog>,
    authority: Arc<Authority>,
    entries: Arc<EntryCache>,
}

// === impl Svids ===

impl Svids {
    /// The service; `entries` decides what each agent is authorized for.
    pub(crate) fn new(
        audit: Arc<AuditLog>,
        authority: Arc<Authority>,
        entries: Arc<EntryCache>,
    ) -> Self {
        Self {
            audit,
            authority,
            entries,
        }
    }

    /// Signs each CSR of the batch whose entry is authorized for `agent`; one result per
    /// request, in order, each with the entry id it was for.
    ///
    /// # Errors
    ///
    /// For the whole batch: [`SvidError::Invalid`] over [`MAX_BATCH_SIZE`], the entry cache's,
    /// a failed audit append (nothing is returned), a failed signing task.
    pub(crate) async fn batch_x509(
        &self,
        agent: &Agent,
        requests: Vec<SvidRequest>,
        now: SystemTime,
    ) -> Result<Vec<(String, Result<IssuedSvid, SvidError>)>, SvidError> {
        if requests.len() > MAX_BATCH_SIZE {
            return Err(SvidError::Invalid(format!(
                "{} CSRs in one batch; the maximum is {MAX_BATCH_SIZE}",
                requests.len()
            )));
        }
        let parsed: Vec<Result<EntryId, SvidError>> = requests
            .iter()
            .map(|r| EntryId::parse(&r.entry_id).map_err(|e| SvidError::Invalid(e.to_string())))
            .collect();
        let valid: Vec<EntryId> = parsed.iter().flatten().cloned().collect();
        let granted = self.entries.authorize(agent, &valid, now).await?;
        let jobs: Vec<(SvidRequest, Result<Arc<RegistrationEntry>, SvidError>)> = requests
            .into_iter()
            .zip(parsed)
            .map(|(request, id)| {
                let job = id.and_then(|id| match granted.get(&id).cloned() {
                    None => {
                        warn!(agent_id = %agent.id, entry_id = %request.entry_id, "svid refused: entry not authorized for agent");
                        Err(SvidError::NotAuthorized)
                    }
                    Some(entry) if entry.session_id.is_some() => {
                        Err(SvidError::SessionEntry("NewSessionX509SVID"))
                    }
                    Some(entry) => Ok(entry),
                });
                (request, job)
            })
            .collect();
        // The signing itself (a CSR verify and a signature each) runs off the async workers,
        // so that a large batch does not hold up other agents' calls.
        let authority = self.authority.clone();
        let signed = tokio::task::spawn_blocking(move || {
            jobs.into_iter()
                .map(|(request, job)| {
                    let outcome = job.and_then(|entry| {
                        authority
                            .sign_workload_svid(&entry, None, &request.csr, now)
                            .map_err(SvidError::from)
                    });
                    (request.entry_id, outcome)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|error| SvidError::Task(error.to_string()))?;
        let records = signed
            .iter()
            .filter_map(|(entry_id, outcome)| {
                let svid = outcome.as_ref().ok()?;
                Some(x509_record(&agent.id, entry_id, svid))
            })
            .collect();
        // One append for the batch; nothing is returned unless it is durable.
        self.audit
            .before_grant(records)
            .await
            .map_err(SvidError::AuditFailed)?;
        Ok(signed)
    }

    /// Signs a JWT-SVID for `audience` from entry `entry_id`, if it is authorized for `agent`.
    ///
    /// # Errors
    ///
    /// [`SvidError::Invalid`]; [`SvidError::NotAuthorized`]; [`SvidError::SessionEntry`];
    /// signing, entry cache and audit failures.
    pub(crate) async fn jwt(
        &self,
        agent: &Agent,
        entry_id: &str,
        audience: &[String],
        now: SystemTime,
    ) -> Result<(SpiffeId, IssuedJwt), SvidError> {
        check_audience(audience)?;
        let id = EntryId::parse(entry_id).map_err(|e| SvidError::Invalid(e.to_string()))?;
        let Some(entry) = self.entries.authorize_one(agent, &id, now).await? else {
            warn!(agent_id = %agent.id, entry_id, "jwt refused: entry not authorized for agent");
            return Err(SvidError::NotAuthorized);
        };
        if entry.session_id.is_some() {
            return Err(SvidError::SessionEntry("NewSessionJWTSVID"));
        }
        let jwt = self.authority.sign_jwt_svid(&entry, None, audience, now)?;
        self.audit
            .before_grant(vec![jwt_record(&agent.id, &entry, audience, &jwt)])
            .await
            .map_err(SvidError::AuditFailed)?;
        Ok((entry.spiffe_id.clone(), jwt))
    }

    /// Mints an X509-SVID for admin `uid` (no entry backs it): `ttl` `None` for the default.
    ///
    /// # Errors
    ///
    /// Signing failures (an ID that may not be granted, a bad CSR or DNS name); a failed audit
    /// append.
    pub(crate) async fn mint_x509(
        &self,
        uid: u32,
        spiffe_id: &SpiffeId,
        dns_names: Vec<String>,
        ttl: Option<Duration>,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, SvidError> {
        let svid = self
            .authority
            .mint_x509_svid(spiffe_id, dns_names.clone(), ttl, csr, now)?;
        let record = NewAuditRecord::new(uid_actor(uid), action::X509_MINT, spiffe_id.to_string())
            .detail("spiffe_id", spiffe_id.to_string())
            .detail("serial", svid.serial.clone())
            .time_detail("not_after", svid.not_after)
            .detail("dns_names", dns_names);
        self.audit
            .before_grant(vec![record])
            .await
            .map_err(SvidError::AuditFailed)?;
        info!(uid, spiffe_id = %spiffe_id, serial = %svid.serial, "x509-svid minted");
        Ok(svid)
    }

    /// Mints a JWT-SVID for admin `uid`.
    ///
    /// # Errors
    ///
    /// Signing failures; a failed audit append.
    pub(crate) async fn mint_jwt(
        &self,
        uid: u32,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedJwt, SvidError> {
        let jwt = self
            .authority
            .mint_jwt_svid(spiffe_id, audience, ttl, now)?;
        let record = NewAuditRecord::new(uid_actor(uid), action::JWT_MINT, spiffe_id.to_string())
            .detail("spiffe_id", spiffe_id.to_string())
            .detail("audience", audience.to_vec())
            .detail("jti", jwt.jti.clone())
            .time_detail("expires_at", jwt.expires_at);
        self.audit
            .before_grant(vec![record])
            .await
            .map_err(SvidError::AuditFailed)?;
        info!(uid, spiffe_id = %spiffe_id, "jwt-svid minted");
        Ok(jwt)
    }
}

// === helpers ===

/// An audience is required, and none of its members may be empty.
///
/// # Errors
///
/// [`SvidError::Invalid`].
pub(crate) fn check_audience(audience: &[String]) -> Result<(), SvidError> {
    if audience.is_empty() || audience.iter().any(String::is_empty) {
        return Err(SvidError::Invalid("audience is required".to_owned()));
    }
    Ok(())
}

/// The audit record of a workload X509-SVID issued to `agent` from entry `entry_id`.
pub(crate) fn x509_record(agent: &SpiffeId, entry_id: &str, svid: &IssuedSvid) -> NewAuditRecord {
    NewAuditRecord::new(
        agent.to_string(),
        action::SVID_X509_ISSUE,
        svid.spiffe_id.to_string(),
    )
    .detail("spiffe_id", svid.spiffe_id.to_string())
    .detail("entry_id", entry_id)
    .detail("serial", svid.serial.clone())
    .time_detail("not_after", svid.not_after)
    .detail("agent", agent.to_string())
}

/// The audit record of a JWT-SVID issued to `agent` from `entry`.
pub(crate) fn jwt_record(
    agent: &SpiffeId,
    entry: &RegistrationEntry,
    audience: &[String],
    jwt: &IssuedJwt,
) -> NewAuditRecord {
    NewAuditRecord::new(
        agent.to_string(),
        action::SVID_JWT_ISSUE,
        entry.spiffe_id.to_string(),
    )
    .detail("spiffe_id", entry.spiffe_id.to_string())
    .detail("entry_id", entry.id.as_str())
    .detail("audience", audience.to_vec())
    .detail("jti", jwt.jti.clone())
    .time_detail("expires_at", jwt.expires_at)
    .detail("agent", agent.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditFilter;
    use std::time::UNIX_EPOCH;

    use crate::service::testing::{Fixture, csr, entry};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agents_get_svids_for_their_entries_only_and_each_is_audited() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        let other = SpiffeId::new("spiffe://example.org/sigil/agent/join_token/other").unwrap();
        let results = fx
            .entries
            .create(
                0,
                vec![
                    entry("spiffe://example.org/web", &agent.id),
                    entry("spiffe://example.org/db", &other),
                ],
                now,
            )
            .await
            .unwrap();
        let mine = results[0].as_ref().unwrap().id.as_str().to_owned();
        let theirs = results[1].as_ref().unwrap().id.as_str().to_owned();
        let (csr_der, _) = csr();
        let request = |entry_id: &str| SvidRequest {
            entry_id: entry_id.to_owned(),
            csr: csr_der.clone(),
        };
        let signed = fx
            .svids
            .batch_x509(
                &agent,
                vec![request(&mine), request(&theirs), request("not-an-id")],
                now,
            )
            .await
            .unwrap();
        assert_eq!(signed.len(), 3);
        assert_eq!(signed[0].0, mine);
        let svid = signed[0].1.as_ref().unwrap();
        assert_eq!(svid.spiffe_id.to_string(), "spiffe://example.org/web");
        assert!(matches!(signed[1].1, Err(SvidError::NotAuthorized)));
        assert!(matches!(signed[2].1, Err(SvidError::Invalid(_))));

        let (id, jwt) = fx
            .svids
            .jwt(&agent, &mine, &["db".to_owned()], now)
            .await
            .unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/web");
        assert!(jwt.expires_at > now);
        assert!(matches!(
            fx.svids.jwt(&agent, &theirs, &["db".to_owned()], now).await,
            Err(SvidError::NotAuthorized)
        ));
        assert!(matches!(
            fx.svids.jwt(&agent, &mine, &[], now).await,
            Err(SvidError::Invalid(_))
        ));

        let issued = fx
            .audit_actions(AuditFilter {
                actor: Some(agent.id.to_string()),
                action: Some("svid".to_owned()),
                ..AuditFilter::default()
            })
            .await;
        assert_eq!(issued, [action::SVID_X509_ISSUE, action::SVID_JWT_ISSUE]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn svids_below_a_parent_that_expires_end_when_it_does() {
        use x509_parser::prelude::{FromDer as _, X509Certificate};

        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        // A parent (no selectors: never issued itself) ending in 2 minutes, sooner than the
        // SVIDs' TTLs (an hour, 5 minutes), and an entry below it that never expires.
        let team = SpiffeId::new("spiffe://example.org/team").unwrap();
        let ends = UNIX_EPOCH + Duration::from_secs(unix_seconds(now) + 120);
        let mut parent = crate::store::NewEntry::new(
            team.clone(),
            agent.id.clone(),
            sigil_core::SelectorSet::new(),
        );
        parent.expires_at = Some(ends);
        fx.store.create_entry(parent).await.unwrap();
        let below = fx
            .entries
            .create(0, vec![entry("spiffe://example.org/web", &team)], now)
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        assert_eq!(below.expires_at, None);
        let (csr_der, _) = csr();
        let request = SvidRequest {
            entry_id: below.id.as_str().to_owned(),
            csr: csr_der,
        };
        let signed = fx
            .svids
            .batch_x509(&agent, vec![request], now)
            .await
            .unwrap();
        let svid = signed[0].1.as_ref().unwrap();
        assert_eq!(svid.not_after, ends);
        let (_, leaf) = X509Certificate::from_der(&svid.chain_der).unwrap();
        assert_eq!(
            u64::try_from(leaf.validity().not_after.timestamp()).unwrap(),
            unix_seconds(ends)
        );
        let (_, jwt) = fx
            .svids
            .jwt(&agent, below.id.as_str(), &["db".to_owned()], now)
            .await
            .unwrap();
        // Whole seconds, from a time that is not: at most a second sooner.
        assert!(
            jwt.expires_at <= ends,
            "{:?} after {ends:?}",
            jwt.expires_at
        );
        assert!(jwt.expires_at + Duration::from_secs(1) >= ends);
        // The entry itself is as it was.
        let stored = fx.store.get_entry(&below.id).await.unwrap().unwrap();
        assert_eq!(stored.expires_at, None);
    }

    fn unix_seconds(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_batches_and_mints_of_reserved_ids_are_refused() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        let requests = vec![
            SvidRequest {
                entry_id: String::new(),
                csr: vec![],
            };
            MAX_BATCH_SIZE + 1
        ];
        assert!(matches!(
            fx.svids.batch_x509(&agent, requests, now).await,
            Err(SvidError::Invalid(_))
        ));
        let reserved = SpiffeId::new("spiffe://example.org/sigil/server").unwrap();
        let (csr_der, _) = csr();
        assert!(matches!(
            fx.svids
                .mint_x509(0, &reserved, vec![], None, &csr_der, now)
                .await,
            Err(SvidError::Sign(SignError::InvalidRequest(_)))
        ));
        let web = SpiffeId::new("spiffe://example.org/web").unwrap();
        let minted = fx
            .svids
            .mint_x509(
                0,
                &web,
                vec!["web.example.org".to_owned()],
                None,
                &csr_der,
                now,
            )
            .await
            .unwrap();
        assert_eq!(minted.spiffe_id, web);
        let records = fx
            .audit_records(AuditFilter {
                action: Some(action::X509_MINT.to_owned()),
                ..AuditFilter::default()
            })
            .await;
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].details["serial"], minted.serial.as_str());
    }
}
