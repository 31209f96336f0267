//! The audit ingest (`sigil.audit.v1`): what relying parties saw a session identity do (a
//! broker's connections and requests), appended to the server's audit chain, once per event.
//!
//! The rules, all here:
//!
//! - **Who.** The caller's X509-SVID, verified against the trust domain's bundle on every call,
//!   must name a SPIFFE ID listed in `audit_sources`. That ID is the records' `actor`: a source
//!   cannot write as anyone else.
//! - **What.** Only `broker.*` actions, with bounded subject, details and peer certificate
//!   ([`MAX_EVENTS`] and the other limits below). Details are a JSON object without
//!   floating-point numbers and without the keys the server sets ([`RESERVED_DETAILS`]). One
//!   invalid event refuses the whole request: a spool is forwarded in order.
//! - **Which session.** The server reads the peer's SPIFFE ID, serial and session claims from
//!   the peer certificate the event carries ([`SessionClaims::from_certificate`]), so a record
//!   names its session as the credential did, and `audit show --session` finds it.
//! - **Once.** Each event carries its spool sequence; the store appends those above the
//!   source's last sequence in the same atomic write as that sequence
//!   ([`Store::append_source_events`]), so a resent event is appended once.
//! - **When.** `observed_at` (the source's clock, nanoseconds) is kept as an RFC 3339 detail
//!   with nine fractional digits; the record's own `time` is when the server appended it.
//!
//! The source is trusted for what it reports (that is what listing it means); the server checks
//! that what it reports is well formed and bounded, and who reports it.

use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value};
use sigil_core::SpiffeId;
use sigil_core::session::SessionClaims;
use sigil_core::time::{format_rfc3339_nanos, from_unix_seconds, unix_seconds};
use sigil_core::x509_svid::check_leaf_certificate;
use tokio::sync::Semaphore;
use tracing::{debug, error};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::authority::Authority;
use crate::audit::{AuditSource, NewAuditRecord, SourceAppend, SourceEvent, holds_float};
use crate::store::{Store, StoreError};

/// The most events one request may carry.
pub(crate) const MAX_EVENTS: usize = 1000;

/// The longest action, in bytes.
pub(crate) const MAX_ACTION_LEN: usize = 64;

/// The longest subject, in bytes.
pub(crate) const MAX_SUBJECT_LEN: usize = 2048;

/// The longest details JSON, in bytes.
pub(crate) const MAX_DETAILS_LEN: usize = 16 * 1024;

/// The largest peer certificate, in bytes.
pub(crate) const MAX_PEER_CERTIFICATE_LEN: usize = 16 * 1024;

/// Appends validated and written at once (the rest wait): what one request costs is bounded
/// by the message size, and this bounds how many cost it together.
pub(crate) const MAX_APPENDS_IN_FLIGHT: usize = 4;

/// What every action must start with.
pub(crate) const ACTION_PREFIX: &str = "broker.";

/// The detail keys the server sets itself; an event that sets one is refused.
pub(crate) const RESERVED_DETAILS: &[&str] = &[
    "source_spool",
    "source_sequence",
    "source_gap",
    "observed_at",
    "peer_spiffe_id",
    "peer_serial",
    "session_id",
    "ticket",
    "session_end",
    "peer_unverified",
];

/// The first second of the year 10000: `observed_at` must be before it (and after 1970).
const YEAR_10000: i64 = 253_402_300_800;

/// The audit ingest service. Cheap to share.
#[derive(Debug)]
pub(crate) struct AuditIngest {
    store: Arc<dyn Store>,
    authority: Arc<Authority>,
    sources: Vec<SpiffeId>,
    in_flight: Semaphore,
}

/// One event as a source sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct IngestEvent {
    /// Its spool sequence (1, 2, 3, ...).
    pub sequence: u64,
    /// When it was observed: seconds since the Unix epoch.
    pub observed_at_seconds: i64,
    /// And the nanoseconds within that second.
    pub observed_at_nanos: u32,
    /// `broker.*`.
    pub action: String,
    /// To what.
    pub subject: String,
    /// A JSON object (empty: no details).
    pub details_json: String,
    /// The DER of the peer's leaf certificate (empty: none).
    pub peer_certificate: Vec<u8>,
}

/// Why a call was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum IngestError {
    /// The caller is not a listed audit source (or presented no valid SVID).
    #[error("{0}")]
    NotASource(String),
    /// The request is malformed or over a limit; nothing was appended.
    #[error("{0}")]
    Invalid(String),
    /// The events do not continue the spool: the source must resend from `expected`.
    #[error("the spool's next event is {expected}; resend from there (nothing was appended)")]
    OutOfOrder {
        /// The sequence the server expects next.
        expected: u64,
    },
    /// The store failed; nothing was acknowledged.
    #[error("audit store: {0}")]
    Store(#[from] StoreError),
}

// === impl AuditIngest ===

impl AuditIngest {
    /// The service for the callers in `sources`.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        authority: Arc<Authority>,
        sources: Vec<SpiffeId>,
    ) -> Self {
        Self {
            store,
            authority,
            sources,
            in_flight: Semaphore::new(MAX_APPENDS_IN_FLIGHT),
        }
    }

    /// The caller's SPIFFE ID, from its certificate chain (leaf first) verified against the
    /// current bundle at `now`, if it is a listed audit source.
    ///
    /// # Errors
    ///
    /// [`IngestError::NotASource`].
    pub(crate) fn authenticate(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
        now: SystemTime,
    ) -> Result<SpiffeId, IngestError> {
        let chain = chain.ok_or_else(|| {
            IngestError::NotASource("present the X509-SVID of a listed audit source".to_owned())
        })?;
        let id = self
            .authority
            .verifier_bundles()
            .verify(chain, now)
            .map_err(|e| IngestError::NotASource(format!("client SVID rejected: {e}")))?;
        if !self.sources.contains(&id) {
            debug!(caller = %id, "audit ingest refused: not a listed audit source");
            return Err(IngestError::NotASource(format!(
                "{id} is not in the server's audit_sources"
            )));
        }
        Ok(id)
    }

    /// Appends the events not appended before (sequence above the source's last), as records
    /// by `caller`, and answers once they are durable. Events already appended are not checked
    /// again, so a rule tightened since never wedges a spool on what is already in the chain.
    ///
    /// # Errors
    ///
    /// [`IngestError::Invalid`] and [`IngestError::OutOfOrder`] (nothing appended),
    /// [`IngestError::Store`].
    pub(crate) async fn append(
        &self,
        caller: &SpiffeId,
        spool_id: &str,
        events: Vec<IngestEvent>,
    ) -> Result<SourceAppend, IngestError> {
        check_spool_id(spool_id)?;
        if events.len() > MAX_EVENTS {
            return Err(IngestError::Invalid(format!(
                "{} events in one request; at most {MAX_EVENTS}",
                events.len()
            )));
        }
        if let Some(pair) = events
            .windows(2)
            .find(|w| Some(w[1].sequence) != w[0].sequence.checked_add(1))
        {
            return Err(IngestError::Invalid(format!(
                "event {}: the events of a request must be consecutive (after {})",
                pair[1].sequence, pair[0].sequence
            )));
        }
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| IngestError::Invalid("the server is stopping".to_owned()))?;
        let source = AuditSource {
            spiffe_id: caller.to_string(),
            spool_id: spool_id.to_owned(),
        };
        let last = self.store.audit_source_sequence(&source).await?;
        let peers = self.verify_peers(events.iter().filter(|e| e.sequence > last));
        let mut checked = Vec::with_capacity(events.len());
        for event in events.into_iter().filter(|e| e.sequence > last) {
            let sequence = event.sequence;
            if sequence != last.saturating_add(1) && checked.is_empty() {
                return Err(IngestError::OutOfOrder {
                    expected: last.saturating_add(1),
                });
            }
            let record = self
                .build_record(caller, spool_id, event, &peers)
                .map_err(|e| IngestError::Invalid(format!("event {sequence}: {e}")))?;
            checked.push(SourceEvent { sequence, record });
        }
        let sent = checked.last().map(|e| e.sequence);
        let result = self
            .store
            .append_source_events(&source, checked)
            .await
            .map_err(|error| {
                error!(%error, source = %caller, "audit ingest append failed; nothing acknowledged");
                error
            })?;
        // Another call of the same spool moved it between the read and the write.
        if sent.is_some_and(|sent| sent > result.acknowledged) {
            return Err(IngestError::OutOfOrder {
                expected: result.acknowledged.saturating_add(1),
            });
        }
        debug!(
            source = %caller,
            spool = spool_id,
            appended = result.appended.len(),
            acknowledged = result.acknowledged,
            "audit events ingested"
        );
        Ok(result)
    }

    /// The record an event becomes, or what is wrong with it.
    fn build_record(
        &self,
        caller: &SpiffeId,
        spool_id: &str,
        event: IngestEvent,
        peers: &VerifiedPeers,
    ) -> Result<NewAuditRecord, String> {
        let observed_at = check_event(&event)?;
        let mut record = NewAuditRecord::new(caller.to_string(), event.action, event.subject);
        record.details = parse_details(&event.details_json)?;
        record = record
            .detail("source_spool", spool_id)
            .detail("source_sequence", event.sequence)
            .detail(
                "observed_at",
                format_rfc3339_nanos(event.observed_at_seconds, event.observed_at_nanos),
            );
        if !event.peer_certificate.is_empty() {
            record = match peers.get(&event.peer_certificate, observed_at) {
                Some(peer) => peer.add_to(record),
                None => self.peer_details(record, &event.peer_certificate, observed_at)?,
            };
        }
        Ok(record)
    }

    /// Adds what the peer's certificate says, once it verifies against the trust domain's
    /// bundle at the time the event was observed: its SPIFFE ID and serial, and its session's
    /// id, ticket and end when it is a session SVID. A certificate that does not verify (forged,
    /// or of an authority no longer in the bundle) names nothing: the record says why instead
    /// (`peer_unverified`), so that no source can place a record in a session's story without
    /// that session's credential.
    fn peer_details(
        &self,
        record: NewAuditRecord,
        der: &[u8],
        observed_at: SystemTime,
    ) -> Result<NewAuditRecord, String> {
        match self.verify_peer(der, observed_at)? {
            Ok(peer) => Ok(peer.add_to(record)),
            Err(why) => Ok(record.detail("peer_unverified", why)),
        }
    }

    /// What a peer certificate says if it verifies at `at` (`Err`: why it does not), or what
    /// is wrong with it.
    fn verify_peer(
        &self,
        der: &[u8],
        at: SystemTime,
    ) -> Result<Result<VerifiedPeer, String>, String> {
        if der.len() > MAX_PEER_CERTIFICATE_LEN {
            return Err(format!(
                "peer_certificate of {} bytes; at most {MAX_PEER_CERTIFICATE_LEN}",
                der.len()
            ));
        }
        let leaf = CertificateDer::from(der);
        check_leaf_certificate(&leaf)
            .map_err(|e| format!("peer_certificate is not an X509-SVID: {e}"))?;
        let spiffe_id = match self
            .authority
            .verifier_bundles()
            .verify(std::slice::from_ref(&leaf), at)
        {
            Ok(id) => id,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("peer_certificate cannot be parsed: {e}"))?;
        let claims = SessionClaims::from_certificate(der)
            .map_err(|e| format!("peer_certificate has a malformed session extension: {e}"))?;
        Ok(Ok(VerifiedPeer {
            spiffe_id,
            serial: sigil_core::hex::encode(cert.raw_serial()),
            claims,
        }))
    }

    /// Verifies each distinct peer certificate of `events` once or twice rather than once per
    /// event (a connection's events all carry its peer's certificate): at the earliest and the
    /// latest time an event with it was observed. A certificate valid at both is valid at every
    /// time between them (its validity and its authority's are intervals, and only the authority
    /// whose key signed it can verify it: every authority the CA makes has a key of its own), so
    /// those events take the result; any other event is verified on its own.
    fn verify_peers<'a>(&self, events: impl Iterator<Item = &'a IngestEvent>) -> VerifiedPeers {
        let mut spans: std::collections::HashMap<&[u8], (SystemTime, SystemTime)> =
            std::collections::HashMap::new();
        for event in events {
            if event.peer_certificate.is_empty() {
                continue;
            }
            let Ok(at) = check_event(event) else { continue };
            spans
                .entry(&event.peer_certificate)
                .and_modify(|(first, last)| {
                    *first = (*first).min(at);
                    *last = (*last).max(at);
                })
                .or_insert((at, at));
        }
        let mut verified = std::collections::HashMap::new();
        for (der, (first, last)) in spans {
            // Both ends, the second only if the first verified.
            if let Ok(Ok(peer)) = self.verify_peer(der, first)
                && (first == last || matches!(self.verify_peer(der, last), Ok(Ok(_))))
            {
                verified.insert(der.to_vec(), (first, last, peer));
            }
        }
        VerifiedPeers(verified)
    }
}

/// A peer certificate that verified, and what it says.
struct VerifiedPeer {
    spiffe_id: SpiffeId,
    serial: String,
    claims: Option<SessionClaims>,
}

impl VerifiedPeer {
    fn add_to(&self, record: NewAuditRecord) -> NewAuditRecord {
        let mut record = record
            .detail("peer_spiffe_id", self.spiffe_id.to_string())
            .detail("peer_serial", self.serial.clone());
        if let Some(claims) = &self.claims {
            record = record
                .detail("session_id", claims.session_id())
                .detail("ticket", claims.ticket())
                .detail("session_end", unix_seconds(claims.ends_at()));
        }
        record
    }
}

/// The peer certificates of one request that verified at both ends of a span of time.
#[derive(Default)]
struct VerifiedPeers(std::collections::HashMap<Vec<u8>, (SystemTime, SystemTime, VerifiedPeer)>);

impl VerifiedPeers {
    /// What `der` says if it verified over a span that holds `at`.
    fn get(&self, der: &[u8], at: SystemTime) -> Option<&VerifiedPeer> {
        self.0
            .get(der)
            .filter(|(first, last, _)| *first <= at && at <= *last)
            .map(|(_, _, peer)| peer)
    }
}

// === helpers ===

fn check_spool_id(spool_id: &str) -> Result<(), IngestError> {
    let valid = spool_id.len() == 32
        && spool_id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if valid {
        Ok(())
    } else {
        Err(IngestError::Invalid(
            "spool_id must be 32 lowercase hex characters".to_owned(),
        ))
    }
}

/// Checks an event's action, subject and time; returns the time.
fn check_event(event: &IngestEvent) -> Result<SystemTime, String> {
    check_action(&event.action)?;
    if event.subject.len() > MAX_SUBJECT_LEN {
        return Err(format!(
            "subject of {} bytes; at most {MAX_SUBJECT_LEN}",
            event.subject.len()
        ));
    }
    if event.subject.chars().any(char::is_control) {
        return Err("subject holds a control character".to_owned());
    }
    let observed_at = (0..YEAR_10000)
        .contains(&event.observed_at_seconds)
        .then(|| from_unix_seconds(event.observed_at_seconds))
        .flatten()
        .filter(|_| event.observed_at_nanos < 1_000_000_000)
        .ok_or("observed_at must be a time from 1970 to 9999 (nanos below 10^9)")?;
    Ok(observed_at + std::time::Duration::from_nanos(u64::from(event.observed_at_nanos)))
}

fn check_action(action: &str) -> Result<(), String> {
    let shown: String = action.chars().take(MAX_ACTION_LEN).collect();
    let Some(rest) = action.strip_prefix(ACTION_PREFIX) else {
        return Err(format!(
            "action {shown:?} is not accepted: audit sources record `{ACTION_PREFIX}*` actions only"
        ));
    };
    let valid = !rest.is_empty()
        && action.len() <= MAX_ACTION_LEN
        && !rest.starts_with('.')
        && !rest.ends_with('.')
        && !rest.contains("..")
        && rest
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "action {shown:?} must be `{ACTION_PREFIX}` then dotted words of lowercase letters, \
             digits and `_`, at most {MAX_ACTION_LEN} bytes"
        ))
    }
}

fn parse_details(json: &str) -> Result<Map<String, Value>, String> {
    if json.is_empty() {
        return Ok(Map::new());
    }
    if json.len() > MAX_DETAILS_LEN {
        return Err(format!(
            "details_json of {} bytes; at most {MAX_DETAILS_LEN}",
            json.len()
        ));
    }
    let Value::Object(details) =
        serde_json::from_str(json).map_err(|e| format!("details_json is not JSON: {e}"))?
    else {
        return Err("details_json must be a JSON object".to_owned());
    };
    if let Some(key) = RESERVED_DETAILS.iter().find(|k| details.contains_key(**k)) {
        return Err(format!(
            "details_json sets {key:?}, which the server sets itself"
        ));
    }
    if details.values().any(holds_float) {
        return Err(
            "details_json holds a floating-point number; use an integer or a string".to_owned(),
        );
    }
    Ok(details)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;
    use crate::service::testing::{Fixture, csr, entry};

    fn caller() -> SpiffeId {
        SpiffeId::new("spiffe://example.org/broker").unwrap()
    }

    async fn ingest() -> (Fixture, AuditIngest) {
        let fx = Fixture::new().await;
        let ingest = AuditIngest::new(fx.store.clone(), fx.authority.clone(), vec![caller()]);
        (fx, ingest)
    }

    fn event(action: &str, details: &str) -> IngestEvent {
        IngestEvent {
            sequence: 1,
            observed_at_seconds: 1_800_000_000,
            observed_at_nanos: 7,
            action: action.to_owned(),
            subject: "db".to_owned(),
            details_json: details.to_owned(),
            peer_certificate: Vec::new(),
        }
    }

    /// An X509-SVID (leaf DER) for `id`, under `claims`' session if any, signed by `fx`'s CA.
    async fn session_svid(fx: &Fixture, id: &str, claims: Option<&SessionClaims>) -> Vec<u8> {
        let parent = SpiffeId::new("spiffe://example.org/sigil/agent/x").unwrap();
        let entry = fx.store.create_entry(entry(id, &parent)).await.unwrap();
        let (der, _key) = csr();
        let issued = fx
            .authority
            .sign_workload_svid(&entry, claims, &der, SystemTime::now())
            .unwrap();
        // The leaf: the chain's first certificate.
        let (rest, _) = X509Certificate::from_der(&issued.chain_der).unwrap();
        issued.chain_der[..issued.chain_der.len() - rest.len()].to_vec()
    }

    fn now_event(action: &str, peer: Vec<u8>) -> IngestEvent {
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        IngestEvent {
            observed_at_seconds: i64::try_from(now.as_secs()).unwrap(),
            peer_certificate: peer,
            ..event(action, "")
        }
    }

    #[tokio::test]
    async fn an_event_becomes_a_record_of_its_source() {
        let (_fx, ingest) = ingest().await;
        let record = ingest
            .build_record(
                &caller(),
                "ab",
                event("broker.request", r#"{"path":"/x"}"#),
                &VerifiedPeers::default(),
            )
            .unwrap();
        assert_eq!(record.actor, "spiffe://example.org/broker");
        assert_eq!(record.action, "broker.request");
        assert_eq!(record.subject, "db");
        assert_eq!(record.details["path"], "/x");
        assert_eq!(record.details["source_spool"], "ab");
        assert_eq!(record.details["source_sequence"], 1);
        assert_eq!(
            record.details["observed_at"],
            "2027-01-15T08:00:00.000000007Z"
        );
        assert!(!record.details.contains_key("session_id"));
    }

    #[tokio::test]
    async fn the_session_comes_from_a_peer_certificate_of_this_trust_domain_only() {
        let (fx, ingest) = ingest().await;
        let ends = SystemTime::now() + std::time::Duration::from_secs(600);
        let claims = SessionClaims::new(&"ab".repeat(16), "CHG-9", ends).unwrap();

        let ours = session_svid(&fx, "spiffe://example.org/admin/db", Some(&claims)).await;
        let record = ingest
            .build_record(
                &caller(),
                "ab",
                now_event("broker.request", ours),
                &VerifiedPeers::default(),
            )
            .unwrap();
        assert_eq!(record.details["session_id"], "ab".repeat(16));
        assert_eq!(record.details["ticket"], "CHG-9");
        assert_eq!(record.details["session_end"], unix_seconds(ends));
        assert_eq!(
            record.details["peer_spiffe_id"],
            "spiffe://example.org/admin/db"
        );
        assert!(!record.details.contains_key("peer_unverified"));

        let standing = session_svid(&fx, "spiffe://example.org/db", None).await;
        let record = ingest
            .build_record(
                &caller(),
                "ab",
                now_event("broker.request", standing),
                &VerifiedPeers::default(),
            )
            .unwrap();
        assert_eq!(record.details["peer_spiffe_id"], "spiffe://example.org/db");
        assert!(
            record.details["peer_serial"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        );
        assert!(!record.details.contains_key("session_id"));

        // The same session extension in a certificate of another CA names nothing.
        let other = Fixture::new().await;
        let forged = session_svid(&other, "spiffe://example.org/admin/db", Some(&claims)).await;
        let record = ingest
            .build_record(
                &caller(),
                "ab",
                now_event("broker.request", forged),
                &VerifiedPeers::default(),
            )
            .unwrap();
        assert!(
            record.details["peer_unverified"].as_str().is_some(),
            "{record:?}"
        );
        for key in [
            "session_id",
            "ticket",
            "session_end",
            "peer_spiffe_id",
            "peer_serial",
        ] {
            assert!(!record.details.contains_key(key), "{key}: {record:?}");
        }
    }

    #[tokio::test]
    async fn only_bounded_broker_events_are_accepted() {
        let (_fx, ingest) = ingest().await;
        let refused = |e: IngestEvent| {
            ingest
                .build_record(&caller(), "ab", e, &VerifiedPeers::default())
                .unwrap_err()
        };
        for action in [
            "entry.create",
            "session.revoke",
            "broker",
            "broker.",
            "broker..x",
            "broker.x.",
            "broker.Request",
            "broker.a b",
            "brokers.request",
        ] {
            refused(event(action, ""));
        }
        assert!(refused(event("entry.create", "")).contains("broker.*"));
        // A long action is refused, and not echoed whole.
        let long_action = format!("broker.{}", "a".repeat(100_000));
        assert!(refused(event(&long_action, "")).len() < 300);
        refused(event(&format!("broker.{}", "a".repeat(MAX_ACTION_LEN)), ""));
        let mut long = event("broker.request", "");
        long.subject = "s".repeat(MAX_SUBJECT_LEN + 1);
        refused(long);
        let mut control = event("broker.request", "");
        control.subject = "db\nforged line".to_owned();
        refused(control);
        for details in [
            "[]",
            "\"x\"",
            "{",
            r#"{"latency":1.5}"#,
            r#"{"a":[{"b":2.0}]}"#,
        ] {
            refused(event("broker.request", details));
        }
        for key in RESERVED_DETAILS {
            let message = refused(event("broker.request", &format!(r#"{{"{key}":"x"}}"#)));
            assert!(message.contains("sets itself"), "{key}: {message}");
        }
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_DETAILS_LEN));
        assert!(refused(event("broker.request", &big)).contains("at most"));
        for (seconds, nanos) in [(-1, 0), (YEAR_10000, 0), (1, 1_000_000_000)] {
            let mut e = event("broker.request", "");
            e.observed_at_seconds = seconds;
            e.observed_at_nanos = nanos;
            refused(e);
        }
        let mut not_a_cert = event("broker.request", "");
        not_a_cert.peer_certificate = b"not der".to_vec();
        assert!(refused(not_a_cert).contains("not an X509-SVID"));
        let mut huge = event("broker.request", "");
        huge.peer_certificate = vec![0x30; MAX_PEER_CERTIFICATE_LEN + 1];
        assert!(refused(huge).contains("at most"));
        ingest
            .build_record(
                &caller(),
                "ab",
                event("broker.connection.close", r#"{"n":[1,{"b":true}]}"#),
                &VerifiedPeers::default(),
            )
            .unwrap();
    }

    #[tokio::test]
    async fn a_request_must_continue_the_spool() {
        let (_fx, ingest) = ingest().await;
        let spool = "cd".repeat(16);
        let at = |sequence| IngestEvent {
            sequence,
            ..event("broker.request", "")
        };
        let err = ingest
            .append(&caller(), &spool, vec![at(2)])
            .await
            .unwrap_err();
        assert!(
            matches!(err, IngestError::OutOfOrder { expected: 1 }),
            "{err}"
        );
        let err = ingest
            .append(&caller(), &spool, vec![at(1), at(3)])
            .await
            .unwrap_err();
        assert!(matches!(err, IngestError::Invalid(_)), "{err}");
        let done = ingest
            .append(&caller(), &spool, vec![at(1), at(2)])
            .await
            .unwrap();
        assert_eq!((done.appended.len(), done.acknowledged), (2, 2));
        // Already appended events are not checked again: a resend of one that would now be
        // refused does not wedge the spool.
        let mut stale = at(2);
        stale.action = "no.longer.valid".to_owned();
        let done = ingest
            .append(&caller(), &spool, vec![stale, at(3)])
            .await
            .unwrap();
        assert_eq!((done.appended.len(), done.acknowledged), (1, 3));
        let empty = ingest.append(&caller(), &spool, vec![]).await.unwrap();
        assert_eq!((empty.appended.len(), empty.acknowledged), (0, 3));
    }

    #[tokio::test]
    async fn a_certificate_is_verified_for_a_span_and_each_event_outside_it_on_its_own() {
        let (fx, ingest) = ingest().await;
        let ends = SystemTime::now() + std::time::Duration::from_secs(600);
        let claims = SessionClaims::new(&"ab".repeat(16), "CHG-9", ends).unwrap();
        let ours = session_svid(&fx, "spiffe://example.org/admin/db", Some(&claims)).await;
        let not_after = X509Certificate::from_der(&ours)
            .unwrap()
            .1
            .validity()
            .not_after
            .timestamp();
        let other = Fixture::new().await;
        let forged = session_svid(&other, "spiffe://example.org/admin/db", Some(&claims)).await;
        let mut events = Vec::new();
        for (sequence, peer, seconds_after_now) in
            [(1, &ours, 0), (2, &ours, 1), (3, &forged, 1), (4, &ours, 2)]
        {
            let mut e = now_event("broker.request", peer.clone());
            e.sequence = sequence;
            e.observed_at_seconds += seconds_after_now;
            events.push(e);
        }
        // Observed after the certificate expired: in the batch, but not in a verified span.
        let mut late = now_event("broker.request", ours.clone());
        late.sequence = 5;
        late.observed_at_seconds = not_after + 60;
        events.push(late);
        let done = ingest
            .append(&caller(), &"cd".repeat(16), events)
            .await
            .unwrap();
        let records = done.appended;
        assert_eq!(records.len(), 5);
        for i in [0, 1, 3] {
            assert_eq!(records[i].details["session_id"], "ab".repeat(16), "{i}");
            assert_eq!(
                records[i].details["peer_spiffe_id"],
                "spiffe://example.org/admin/db"
            );
        }
        for i in [2, 4] {
            assert!(
                records[i].details["peer_unverified"].as_str().is_some(),
                "{i}: {:?}",
                records[i]
            );
            assert!(!records[i].details.contains_key("session_id"), "{i}");
        }
    }

    #[test]
    fn spool_ids_are_32_lowercase_hex() {
        check_spool_id(&"a1".repeat(16)).unwrap();
        for bad in [
            "",
            "A1".repeat(16).as_str(),
            &"a".repeat(31),
            &"g".repeat(32),
        ] {
            assert!(check_spool_id(bad).is_err(), "{bad}");
        }
    }
}
