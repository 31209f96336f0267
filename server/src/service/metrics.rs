//! The server's metrics, every name prefixed `sigil_server_` (listed, with alert rules, in
//! docs/operations.md).
//!
//! The services own the counters and histograms they move as they work ([`IssueMetrics`] in
//! the authority, [`SessionMetrics`], [`SyncMetrics`], [`AuditMetrics`]); [`registry`] registers
//! clones of them, and a collector that reads, at each scrape, what the services already hold
//! (entries, authorities, CRLs, the last checkpoint). Label values come from short fixed sets
//! (a credential kind, a session state, an authority's kind and state, a server id): never a
//! SPIFFE ID or a selector.

use std::fmt;
use std::sync::{Arc, PoisonError};
use std::time::{Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sigil_core::SpiffeId;
use sigil_core::lifetime::{hand_over_at, prepare_next_at};
use sigil_daemon::telemetry::{LatencyFamily, encode_count, encode_gauge, latency_histogram};

use crate::ca::AuthorityState;
use crate::service::audit::AuditLog;
use crate::service::authority::Authority;
use crate::service::crl::CrlPublisher;
use crate::service::entry_cache::EntryCache;

/// The prefix of every server metric.
pub(crate) const PREFIX: &str = "sigil_server";

/// A credential kind: `x509` (a workload's, by its entry), `x509_session` and `jwt_session`
/// (under a privileged session), `jwt`, `x509_agent`, `x509_minted` and `jwt_minted` (an
/// operator's `x509 mint`, `jwt mint`), `x509_server` (the server's own).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub(crate) kind: &'static str,
}

/// A session state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabels {
    pub(crate) state: &'static str,
}

/// What the authority signs: how many of each kind, and how long signing took.
#[derive(Clone)]
pub(crate) struct IssueMetrics {
    issued: Family<KindLabels, Counter>,
    signing: LatencyFamily<KindLabels>,
}

impl Default for IssueMetrics {
    fn default() -> Self {
        Self {
            issued: Family::default(),
            signing: LatencyFamily::new_with_constructor(latency_histogram),
        }
    }
}

impl fmt::Debug for IssueMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueMetrics").finish_non_exhaustive()
    }
}

impl IssueMetrics {
    /// Runs `sign`, and when it signed a credential of `kind`, counts it with how long it took.
    pub(crate) fn time<T, E>(
        &self,
        kind: &'static str,
        sign: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let signed = sign()?;
        let labels = KindLabels { kind };
        self.signing
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.issued.get_or_create(&labels).inc();
        Ok(signed)
    }
}

/// Privileged sessions: live ones by state (as of the last read of the store, every 5 s) and
/// ended ones by how they ended.
#[derive(Clone, Default)]
pub(crate) struct SessionMetrics {
    pub(crate) opened: Counter,
    pub(crate) live: Family<StateLabels, Gauge>,
    pub(crate) ended: Family<StateLabels, Counter>,
}

impl fmt::Debug for SessionMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionMetrics").finish_non_exhaustive()
    }
}

/// Agents' sync streams open now, how many distinct agents hold them, and how often a stream
/// slept past the entry cache's window of recent changes.
#[derive(Clone, Default)]
pub(crate) struct SyncMetrics {
    pub(crate) streams: Gauge,
    pub(crate) agents: Gauge,
    pub(crate) resyncs: Counter,
    open: Arc<std::sync::Mutex<std::collections::HashMap<SpiffeId, usize>>>,
}

impl fmt::Debug for SyncMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncMetrics").finish_non_exhaustive()
    }
}

/// One open sync stream, counted while it lives.
#[derive(Debug)]
pub(crate) struct OpenStream {
    metrics: SyncMetrics,
    agent: SpiffeId,
}

impl SyncMetrics {
    /// Counts a stream of `agent` until the guard drops.
    pub(crate) fn open(&self, agent: &SpiffeId) -> OpenStream {
        self.streams.inc();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        *open.entry(agent.clone()).or_default() += 1;
        self.agents
            .set(i64::try_from(open.len()).unwrap_or(i64::MAX));
        OpenStream {
            metrics: self.clone(),
            agent: agent.clone(),
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.metrics.streams.dec();
        let mut open = self
            .metrics
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.agent) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.agent);
            }
        }
        self.metrics
            .agents
            .set(i64::try_from(open.len()).unwrap_or(i64::MAX));
    }
}

/// Records this server appended to its audit chain.
#[derive(Clone, Default)]
pub(crate) struct AuditMetrics {
    pub(crate) appended: Counter,
}

impl fmt::Debug for AuditMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditMetrics").finish_non_exhaustive()
    }
}

/// The services whose metrics the registry holds.
pub(crate) struct Sources {
    pub(crate) authority: Arc<Authority>,
    pub(crate) entries: Arc<EntryCache>,
    pub(crate) crls: Arc<CrlPublisher>,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) sessions: SessionMetrics,
    pub(crate) sync: SyncMetrics,
    pub(crate) store_commits: Histogram,
}

/// The server's registry: every metric of the services, prefixed [`PREFIX`]. The gRPC layer
/// registers its own into it ([`sigil_daemon::telemetry::GrpcMetrics::new`]).
pub(crate) fn registry(sources: Sources) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    let issue = sources.authority.metrics().clone();
    registry.register("svids_issued", "Credentials signed, by kind", issue.issued);
    registry.register_with_unit(
        "signing_duration",
        "How long signing a credential took, by kind",
        Unit::Seconds,
        issue.signing,
    );
    registry.register(
        "sessions_opened",
        "Privileged sessions opened through this server",
        sources.sessions.opened,
    );
    registry.register(
        "sessions",
        "Privileged sessions pending or active, as of the last read of the store (every 5 s)",
        sources.sessions.live,
    );
    registry.register(
        "sessions_ended",
        "Privileged sessions this server ended, by how (closed, revoked, expired)",
        sources.sessions.ended,
    );
    registry.register(
        "sync_streams",
        "Agents' sync streams open on this server",
        sources.sync.streams,
    );
    registry.register(
        "agents_connected",
        "Agents holding a sync stream open on this server",
        sources.sync.agents,
    );
    registry.register(
        "sync_resyncs",
        "Sync streams that slept past the entry cache's window of recent changes and compared \
         their agent's entries afresh",
        sources.sync.resyncs,
    );
    registry.register(
        "audit_appended",
        "Records this server appended to its audit chain",
        sources.audit.metrics().appended.clone(),
    );
    registry.register_with_unit(
        "store_commit_duration",
        "How long a durable write to the store took (a sled flush, a PostgreSQL commit)",
        Unit::Seconds,
        sources.store_commits,
    );
    registry.register_collector(Box::new(State {
        authority: sources.authority,
        entries: sources.entries,
        crls: sources.crls,
        audit: sources.audit,
    }));
    registry
}

/// What the services hold, read at each scrape.
struct State {
    authority: Arc<Authority>,
    entries: Arc<EntryCache>,
    crls: Arc<CrlPublisher>,
    audit: Arc<AuditLog>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthorityLabels {
    kind: &'static str,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CrlLabels {
    /// `own` for the CRLs of this server's authorities, `peer` for those of the other servers
    /// sharing the store.
    authority: &'static str,
}

/// Encodes a gauge family read at the scrape: (name, help, unit), one value per label set.
fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    (name, help, unit): (&str, &str, Option<&Unit>),
    values: impl IntoIterator<Item = (L, f64)>,
) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Seconds from `now` to `at`, negative when `at` has passed.
fn seconds_until(now: SystemTime, at: SystemTime) -> f64 {
    match at.duration_since(now) {
        Ok(left) => left.as_secs_f64(),
        Err(past) => -past.duration().as_secs_f64(),
    }
}

impl Collector for State {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let now = SystemTime::now();
        encode_count(
            &mut encoder,
            "entries",
            "Registration entries in this server's cache",
            self.entries.len(),
        )?;

        let authorities = self.authority.ca().authorities();
        let seconds = Some(&Unit::Seconds);
        family(
            &mut encoder,
            (
                "authority_expiry",
                "Seconds until each authority of this server expires, by kind and state",
                seconds,
            ),
            authorities.iter().map(|info| {
                let labels = AuthorityLabels {
                    kind: info.kind.as_str(),
                    state: info.state.as_str(),
                };
                (labels, seconds_until(now, info.not_after))
            }),
        )?;
        let active: Vec<_> = authorities
            .iter()
            .filter(|a| a.state == AuthorityState::Active)
            .collect();
        let by_kind = |at: fn(SystemTime, SystemTime) -> SystemTime| {
            active.iter().map(move |info| {
                let labels = KindLabels {
                    kind: info.kind.as_str(),
                };
                (
                    labels,
                    seconds_until(now, at(info.issued_at, info.not_after)),
                )
            })
        };
        family(
            &mut encoder,
            (
                "authority_next_prepare",
                "Seconds until the active authority's successor is prepared (negative: due or done), by kind",
                seconds,
            ),
            by_kind(prepare_next_at),
        )?;
        family(
            &mut encoder,
            (
                "authority_next_activation",
                "Seconds until the active authority hands over to its successor, by kind",
                seconds,
            ),
            by_kind(hand_over_at),
        )?;

        let own: std::collections::HashSet<String> =
            authorities.iter().map(|a| a.id.clone()).collect();
        let mut by_owner: std::collections::BTreeMap<&'static str, (u64, usize)> =
            std::collections::BTreeMap::new();
        for crl in &self.crls.current().crls {
            let owner = if own.contains(&crl.authority_id) {
                "own"
            } else {
                "peer"
            };
            let slot = by_owner.entry(owner).or_default();
            slot.0 = slot.0.max(crl.crl_number);
            slot.1 += crl.revoked_serials.len();
        }
        family(
            &mut encoder,
            (
                "crl_number",
                "The highest CRL number served, by whose authorities signed it",
                None,
            ),
            by_owner
                .iter()
                .map(|(&authority, &(number, _))| (CrlLabels { authority }, number as f64)),
        )?;
        family(
            &mut encoder,
            (
                "crl_revoked_serials",
                "Serials listed on the CRLs served, by whose authorities signed them",
                None,
            ),
            by_owner
                .iter()
                .map(|(&authority, &(_, count))| (CrlLabels { authority }, count as f64)),
        )?;

        if let Some(checkpoint) = self.audit.subscribe().borrow().clone() {
            encode_gauge(
                &mut encoder,
                "audit_checkpoint_age",
                "Seconds since this server's latest audit checkpoint was signed",
                Some(&Unit::Seconds),
                -seconds_until(now, checkpoint.time),
            )?;
        }
        Ok(())
    }
}
