//! What the agent can hand out: the trust domain's bundle and CRLs, one X509-SVID per authorized
//! entry, and the privileged sessions this agent may mint for on demand, as one immutable
//! [`Inventory`] published through `tokio::sync::watch`. Workload API streams hold a receiver and
//! send a new message whenever the snapshot changes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use sigil_core::{SelectorSet, SpiffeBundle, SpiffeId, TrustDomain};
use zeroize::Zeroizing;

/// What an entry grants: its identity and what a workload must present to get it. Parsed once
/// when the entry arrives and shared (`Arc`) by the manager's copy of the entry and the SVIDs
/// minted for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The registration entry (also the key of the maps that hold it, shared).
    pub entry_id: Arc<str>,
    /// The identity.
    pub spiffe_id: SpiffeId,
    /// The selectors a workload must have.
    pub selectors: SelectorSet,
    /// The entry's hint.
    pub hint: String,
    /// X509-SVID TTL (seconds, effective).
    pub x509_ttl: u64,
    /// The entry's own end, if it has one: no SVID is renewed to outlive it.
    pub expires_at: Option<SystemTime>,
    /// The federated trust domains whose bundles the holder also gets.
    pub federates_with: Vec<TrustDomain>,
}

/// One workload identity the agent holds.
#[derive(Clone)]
pub struct WorkloadSvid {
    /// What its entry grants. Replaced in place when the entry changes it (selectors, hint,
    /// TTL, end, federation) but not the identity.
    pub grant: Arc<Grant>,
    /// The entry revision the SVID was minted for.
    pub revision: u64,
    /// When it was minted (renewal counts from here).
    pub issued_at: SystemTime,
    /// The chain, leaf first: DER certificates one after the other, as the server sent them and
    /// as the Workload API sends them on (`x509_svid`). Checked when the SVID arrived.
    pub chain: Box<[u8]>,
    /// The private key, PKCS#8 DER.
    pub key: Zeroizing<Box<[u8]>>,
    /// NotAfter of the leaf.
    pub not_after: SystemTime,
}

/// A privileged session's entry: its SVIDs are minted on demand, per workload, never ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEntry {
    /// The registration entry carrying the session.
    pub entry_id: String,
    /// The session's id.
    pub session_id: String,
    /// The SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The selectors a workload must have.
    pub selectors: SelectorSet,
    /// The entry's hint.
    pub hint: String,
    /// Lifetime of each SVID (seconds).
    pub svid_ttl: u64,
    /// The session's end: no SVID outlives it, and none is served after it.
    pub ends_at: SystemTime,
    /// The entry revision.
    pub revision: u64,
    /// The federated trust domains whose bundles the holder also gets.
    pub federates_with: Vec<TrustDomain>,
}

/// Everything the agent serves at one moment.
#[derive(Clone)]
pub struct Inventory {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle.
    pub bundle: SpiffeBundle,
    /// The federated trust domains' bundles, as the server last sent them (shared between
    /// snapshots).
    pub federated: Arc<BTreeMap<TrustDomain, SpiffeBundle>>,
    /// Identities, by entry id. The map and each SVID are shared (`Arc`) between the manager's
    /// working copy and every published snapshot: publishing copies neither the map nor any
    /// certificate or key, and the manager copies the map only to change it.
    pub svids: Arc<BTreeMap<Arc<str>, Arc<WorkloadSvid>>>,
    /// Whether any entry uses a `unix:sha256` selector (so attestation must hash).
    pub needs_sha256: bool,
    /// Whether the agent has finished its first sync (until then, "no identity" may only mean
    /// "not yet").
    pub synced: bool,
    /// Privileged sessions of this agent, by entry id.
    pub sessions: BTreeMap<String, SessionEntry>,
    /// The trust domain's CRLs, DER.
    pub crls: Vec<Vec<u8>>,
    /// Whether the sync stream to the server is up: session SVIDs are served only then.
    pub connected: bool,
    /// Since when the agent has not reached a server (`None` while connected, and before the
    /// first attempt failed).
    pub disconnected_at: Option<SystemTime>,
}

// === impl WorkloadSvid ===

impl fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadSvid")
            .field("entry_id", &self.grant.entry_id)
            .field("spiffe_id", &self.grant.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

// === impl Inventory ===

impl fmt::Debug for Inventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inventory")
            .field("trust_domain", &self.trust_domain)
            .field("svids", &self.svids.len())
            .field("synced", &self.synced)
            .finish_non_exhaustive()
    }
}

impl Inventory {
    /// An empty snapshot for `trust_domain` with `bundle`.
    pub fn new(trust_domain: TrustDomain, bundle: SpiffeBundle) -> Self {
        Self {
            trust_domain,
            bundle,
            federated: Arc::default(),
            svids: Arc::new(BTreeMap::new()),
            needs_sha256: false,
            synced: false,
            sessions: BTreeMap::new(),
            crls: Vec::new(),
            connected: false,
            disconnected_at: None,
        }
    }

    /// The sessions a workload with `selectors` may get SVIDs for at `now`: none while the
    /// agent cannot reach the server, none past a session's end.
    pub fn sessions_for(&self, selectors: &SelectorSet, now: SystemTime) -> Vec<&SessionEntry> {
        if !self.connected {
            return Vec::new();
        }
        self.sessions
            .values()
            .filter(|s| s.selectors.matches(selectors) && s.ends_at > now)
            .collect()
    }

    /// The federated bundles a workload holding `identities` (and `sessions`) gets: those of
    /// the trust domains their entries federate with, in trust domain order. A trust domain
    /// without a bundle (yet, or any more) is left out.
    pub fn federated_for<'a>(
        &'a self,
        federates_with: impl IntoIterator<Item = &'a TrustDomain>,
    ) -> Vec<&'a SpiffeBundle> {
        let wanted: std::collections::BTreeSet<&TrustDomain> = federates_with.into_iter().collect();
        wanted
            .into_iter()
            .filter_map(|td| self.federated.get(td))
            .collect()
    }

    /// The federated bundles a workload with `selectors` gets at `now`: those its identities'
    /// and sessions' entries federate with.
    pub fn federated_for_selectors(
        &self,
        selectors: &SelectorSet,
        now: SystemTime,
    ) -> Vec<&SpiffeBundle> {
        let identities = self.identities_for(selectors, now);
        let sessions = self.sessions_for(selectors, now);
        self.federated_for(
            identities
                .iter()
                .flat_map(|w| w.grant.federates_with.iter())
                .chain(sessions.iter().flat_map(|s| s.federates_with.iter())),
        )
    }

    /// The identities a workload with `selectors` is entitled to, in a stable order (by entry
    /// id; the first is the default identity), unexpired at `now`, with duplicate non-empty
    /// hints dropped (the first keeps it).
    pub fn identities_for(&self, selectors: &SelectorSet, now: SystemTime) -> Vec<&WorkloadSvid> {
        let mut hints = std::collections::HashSet::new();
        self.svids
            .values()
            .filter(|svid| svid.grant.selectors.matches(selectors) && svid.not_after > now)
            .filter(|svid| svid.grant.hint.is_empty() || hints.insert(svid.grant.hint.as_str()))
            .map(|svid| &**svid)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sigil_core::Selector;

    use super::*;

    fn svid(entry: &str, hint: &str, selectors: &[&str], not_after: SystemTime) -> WorkloadSvid {
        WorkloadSvid {
            grant: Arc::new(Grant {
                entry_id: entry.into(),
                spiffe_id: SpiffeId::new(&format!("spiffe://example.org/{entry}")).unwrap(),
                selectors: selectors
                    .iter()
                    .map(|s| Selector::parse(s).unwrap())
                    .collect(),
                hint: hint.into(),
                x509_ttl: 3600,
                expires_at: None,
                federates_with: vec![],
            }),
            revision: 1,
            issued_at: not_after - Duration::from_secs(60),
            chain: Box::default(),
            key: Zeroizing::new(Box::default()),
            not_after,
        }
    }

    #[test]
    fn identities_are_matched_ordered_unexpired_and_hints_unique() {
        let td = TrustDomain::new("example.org").unwrap();
        let now = SystemTime::now();
        let later = now + Duration::from_secs(60);
        let mut s = Inventory::new(td.clone(), SpiffeBundle::new(td));
        for w in [
            svid("a", "internal", &["unix:uid:1"], later),
            svid("b", "internal", &["unix:uid:1"], later),
            svid("c", "", &["unix:uid:1", "unix:gid:1"], later),
            svid("d", "", &["unix:uid:2"], later),
            svid("e", "", &["unix:uid:1"], now),
        ] {
            Arc::make_mut(&mut s.svids).insert(w.grant.entry_id.clone(), Arc::new(w));
        }
        let workload: SelectorSet = ["unix:uid:1", "unix:gid:1"]
            .iter()
            .map(|x| Selector::parse(x).unwrap())
            .collect();
        let got: Vec<_> = s
            .identities_for(&workload, now)
            .iter()
            .map(|w| &*w.grant.entry_id)
            .collect();
        // b shares a's hint (a is first), d does not match, e has expired.
        assert_eq!(got, ["a", "c"]);
    }
}
