//! The agent's metrics, every name prefixed `sigil_agent_` (listed, with alert rules, in
//! docs/operations.md), and its readiness.
//!
//! What the agent holds is read from the published [`Inventory`] at each scrape; the session
//! mints are counted by the [`Minter`](crate::manager::Minter) ([`MintMetrics`]); Workload API
//! calls by the gRPC layer ([`sigil_daemon::telemetry::GrpcMetrics`]). No label carries a
//! SPIFFE ID or a selector.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};
use sigil_daemon::limits::ConnectionLimit;
use sigil_daemon::telemetry::{ReadyCheck, encode_count, encode_gauge};
use tokio::sync::watch;

use crate::cache::{Inventory, MAX_ENTRIES};

/// The prefix of every agent metric.
pub const PREFIX: &str = "sigil_agent";

/// How long the agent stays ready without reaching any server: it keeps serving the SVIDs it
/// holds meanwhile, but past this its workloads' SVIDs may soon expire and session SVIDs are
/// not served, so it says so.
pub const UNREACHABLE_BOUND: Duration = Duration::from_secs(60);

/// A minted credential's kind: `x509_session`, `jwt_session` or `jwt`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The kind.
    pub kind: &'static str,
}

/// What the minter obtained from the server on a workload's behalf.
#[derive(Clone, Default)]
pub struct MintMetrics {
    minted: Family<KindLabels, Counter>,
}

impl fmt::Debug for MintMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintMetrics").finish_non_exhaustive()
    }
}

impl MintMetrics {
    /// Counts one credential of `kind`.
    pub fn minted(&self, kind: &'static str) {
        self.minted.get_or_create(&KindLabels { kind }).inc();
    }
}

/// The agent's registry: the minter's counters, what the inventory holds, and the Workload
/// API's open connections. The gRPC layer registers its own into it.
pub fn registry(
    mints: &MintMetrics,
    inventory: watch::Receiver<Arc<Inventory>>,
    connections: ConnectionLimit,
) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register(
        "svids_minted",
        "Credentials minted on a workload's behalf (session SVIDs, JWT-SVIDs), by kind",
        mints.minted.clone(),
    );
    registry.register_collector(Box::new(Held {
        inventory,
        connections,
    }));
    registry
}

/// What the agent holds, read at each scrape.
struct Held {
    inventory: watch::Receiver<Arc<Inventory>>,
    connections: ConnectionLimit,
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held").finish_non_exhaustive()
    }
}

/// Seconds from `from` to `to`, negative when `to` is earlier.
fn seconds_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

impl Collector for Held {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let now = SystemTime::now();
        let inventory = self.inventory.borrow().clone();
        encode_count(
            &mut encoder,
            "svids",
            "X509-SVIDs the agent holds for its workloads",
            inventory.svids.len(),
        )?;
        encode_count(
            &mut encoder,
            "sessions",
            "Privileged sessions of this agent's workloads",
            inventory.sessions.len(),
        )?;
        encode_count(
            &mut encoder,
            "entries",
            &format!("Registration entries the agent holds (at most {MAX_ENTRIES})"),
            inventory.entries,
        )?;
        encode_gauge(
            &mut encoder,
            "over_entry_cap",
            &format!(
                "1 from when an entry authorized for this agent is left out for its cap of \
                 {MAX_ENTRIES} entries until a sync leaves none out"
            ),
            None,
            if inventory.over_entry_cap { 1.0 } else { 0.0 },
        )?;
        if let Some(soonest) = inventory.svids.values().map(|s| s.not_after()).min() {
            encode_gauge(
                &mut encoder,
                "svid_soonest_expiry",
                "Seconds until the first of the held X509-SVIDs expires",
                Some(&Unit::Seconds),
                seconds_between(now, soonest),
            )?;
        }
        encode_gauge(
            &mut encoder,
            "server_connected",
            "1 while the sync stream to a server is up",
            None,
            if inventory.connected { 1.0 } else { 0.0 },
        )?;
        let unreachable = inventory
            .disconnected_at
            .map_or(0.0, |since| seconds_between(since, now).max(0.0));
        encode_gauge(
            &mut encoder,
            "server_unreachable",
            "Seconds since the agent last had a sync stream up (0 while it has one)",
            Some(&Unit::Seconds),
            unreachable,
        )?;
        encode_count(
            &mut encoder,
            "workload_connections",
            "Workload API connections open",
            self.connections.open(),
        )?;
        Ok(())
    }
}

/// The agent's readiness (`/ready`): not while draining, not before its first sync, and not
/// once no server has been reachable for [`UNREACHABLE_BOUND`].
pub fn readiness(
    draining: Arc<AtomicBool>,
    inventory: watch::Receiver<Arc<Inventory>>,
) -> ReadyCheck {
    Arc::new(move || {
        if draining.load(Ordering::SeqCst) {
            return Err("draining: the agent is stopping".to_owned());
        }
        let inventory = inventory.borrow().clone();
        if !inventory.synced {
            return Err("the first sync with the server has not finished".to_owned());
        }
        if let Some(since) = inventory.disconnected_at {
            let down = SystemTime::now()
                .duration_since(since)
                .unwrap_or(Duration::ZERO);
            if down > UNREACHABLE_BOUND {
                return Err(format!(
                    "no server reachable for {}s (the bound is {}s)",
                    down.as_secs(),
                    UNREACHABLE_BOUND.as_secs()
                ));
            }
        }
        Ok(())
    })
}
