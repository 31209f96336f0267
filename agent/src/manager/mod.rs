//! The manager keeps the agent's [`Inventory`] current: it holds the `SyncEntries` stream open
//! (resumed from the last revision it saw), mints an X509-SVID for every entry authorized for
//! this agent (the agent makes the P-256 key; the server signs a CSR), renews each at half its
//! life (never in a loop when a cap keeps NotAfter where it is), renews the agent's own SVID,
//! and publishes every change through a `watch` channel.
//!
//! Every SVID the agent obtains goes through the manager's [`Minter`]: the batches minted ahead
//! here, and the JWT-SVIDs and session SVIDs the Workload API asks for (session SVIDs per caller,
//! never from a cache).
//!
//! SVIDs are minted ahead for the entries of this agent (bounded by [`MAX_ENTRIES`]): a
//! workload that connects gets its identity at once, and one already streaming gets new or
//! changed identities without asking.
//!
//! While the server is unreachable it keeps serving what it holds until each SVID expires,
//! reconnects with backoff and jitter capped at 10 s, and catches up from its last revision.
//!
//! Privileged sessions are the exception: their entries are kept apart
//! ([`Inventory::sessions`]) and never minted ahead; the Workload API mints their SVIDs on
//! demand, for the workload that asks. While the sync stream is down the inventory says so
//! ([`Inventory::connected`]) and no session SVID is served, since a close or revocation could
//! not reach the agent. The CRLs the server sends with the snapshot and with bundle changes go
//! into [`Inventory::crls`].
//!
//! The agent is also a witness of the server's audit log: it keeps the latest signed checkpoint
//! the server sends and presents it when it reconnects (see [`WITNESS_FILE`]).

mod mint;
mod witness;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_core::lifetime::Validity;
use sigil_core::{Selector, SelectorSet, SpiffeBundle, SpiffeId, TrustDomain};
use sigil_proto::node::{
    BatchNewX509svidRequest, Entry, FederatedBundles, NewX509svidParams, SyncEntriesRequest,
    change, sync_entries_response, x509svid_result,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use self::mint::issued_svid;
pub use self::mint::{Caller, Grant, MintError, Minter};
pub use self::witness::WITNESS_FILE;
use self::witness::Witness;
use crate::cache::{Inventory, SessionEntry, WorkloadSvid};
use crate::node::{NodeConnection, NodeError, csr, new_key, status_error};

/// The most entries one agent mints SVIDs for.
pub const MAX_ENTRIES: usize = 10_000;

/// The longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// CSRs per `BatchNewX509SVID` call.
const BATCH: usize = 100;

/// Keeps the inventory current. See the module docs.
#[derive(Debug)]
pub struct Manager {
    node: Arc<NodeConnection>,
    minter: Minter,
    /// The entries of this agent, each shared (`Arc`) with the batches that mint for it.
    entries: BTreeMap<String, Arc<Entry>>,
    inventory: Inventory,
    revision: u64,
    witness: Witness,
    tx: watch::Sender<Arc<Inventory>>,
}

// === impl Manager ===

impl Manager {
    /// A manager for `node`, and the receiver workload streams subscribe to.
    pub fn new(node: Arc<NodeConnection>) -> (Self, watch::Receiver<Arc<Inventory>>) {
        let bundle = node.bundle();
        let inventory = Inventory::new(bundle.trust_domain().clone(), bundle);
        let (tx, rx) = watch::channel(Arc::new(inventory.clone()));
        (
            Self {
                minter: Minter::new(node.clone()),
                witness: Witness::load(node.data_dir()),
                node,
                entries: BTreeMap::new(),
                inventory,
                revision: 0,
                tx,
            },
            rx,
        )
    }

    /// The minter every other SVID of this agent goes through (the Workload API's JWT-SVIDs
    /// and session SVIDs).
    pub fn minter(&self) -> Minter {
        self.minter.clone()
    }

    /// Runs until a final refusal from the server (returned as the error) or until the
    /// receivers are all gone.
    pub async fn run(mut self) -> Result<(), NodeError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.sync_once().await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(NodeError::Refused(reason)) => return Err(NodeError::Refused(reason)),
                Err(e) => {
                    let wait = jitter(backoff);
                    warn!(error = %e, retry_in = ?wait, "sync with the server failed; serving what the agent holds");
                    // Another listed server may serve: the next attempt starts there.
                    if let Err(error) = self.node.next_server() {
                        warn!(%error, "cannot switch to the next server");
                    }
                    // Session SVIDs are not served while the server cannot be reached.
                    self.inventory.connected = false;
                    if self.inventory.disconnected_at.is_none() {
                        self.inventory.disconnected_at = Some(SystemTime::now());
                        self.publish();
                    }
                    self.renew_svids().await;
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            if self.tx.is_closed() {
                return Ok(());
            }
        }
    }

    /// One `SyncEntries` stream, from connect to error.
    async fn sync_once(&mut self) -> Result<(), NodeError> {
        if self.node.should_renew(SystemTime::now()) {
            self.node.renew().await?;
        }
        let mut stream = self
            .node
            .client()
            .sync_entries(SyncEntriesRequest {
                since_revision: self.revision,
                audit_checkpoints: self.witness.presented(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        debug!(since = self.revision, "sync stream open");
        if !self.inventory.connected {
            self.inventory.connected = true;
            self.inventory.disconnected_at = None;
            self.publish();
        }
        let mut pages = Pages::default();
        loop {
            let wake = self.next_wakeup();
            let message = tokio::select! {
                message = stream.message() => message.map_err(status_error)?,
                () = tokio::time::sleep_until(wake) => {
                    if self.node.should_renew(SystemTime::now()) {
                        // Reconnect with the renewed SVID.
                        self.node.renew().await?;
                        return Ok(());
                    }
                    self.renew_svids().await;
                    continue;
                }
            };
            let Some(message) = message.and_then(|m| m.message) else {
                return Err(NodeError::Unavailable(
                    "the server closed the sync stream".into(),
                ));
            };
            match message {
                sync_entries_response::Message::Snapshot(page) => {
                    pages.entries.extend(page.entries);
                    if page.last {
                        if let Some(bundle) = page.bundle {
                            self.set_bundle(&bundle.spiffe_bundle);
                        }
                        if let Some(federated) = page.federated_bundles {
                            self.set_federated(federated);
                        }
                        self.inventory.crls = page.crls;
                        self.synced(std::mem::take(&mut pages), page.revision)
                            .await?;
                    }
                }
                sync_entries_response::Message::Resume(page) => {
                    pages.entries.extend(page.entries);
                    pages.unchanged.extend(page.unchanged_ids);
                    if page.last {
                        if let Some(bundle) = page.bundle {
                            self.set_bundle(&bundle.spiffe_bundle);
                            self.inventory.crls = bundle.crls;
                        }
                        if let Some(federated) = page.federated_bundles {
                            self.set_federated(federated);
                        }
                        self.synced(std::mem::take(&mut pages), page.revision)
                            .await?;
                    }
                }
                sync_entries_response::Message::AuditCheckpoint(cp) => {
                    if let Err(error) = self.witness.receive(cp) {
                        warn!(%error, "cannot keep the audit checkpoint the server sent");
                    }
                }
                sync_entries_response::Message::Changes(changes) => {
                    for c in changes.changes {
                        self.revision = self.revision.max(c.revision);
                        match c.change {
                            Some(change::Change::Upsert(entry))
                                if self.entries.len() < MAX_ENTRIES
                                    || self.entries.contains_key(&entry.id) =>
                            {
                                self.entries.insert(entry.id.clone(), Arc::new(entry));
                            }
                            Some(change::Change::Upsert(entry)) => {
                                warn!(entry_id = %entry.id, max = MAX_ENTRIES, "too many entries for this agent; ignoring one");
                            }
                            Some(change::Change::Delete(id)) => {
                                self.entries.remove(&id);
                            }
                            Some(change::Change::Bundle(bundle)) => {
                                self.set_bundle(&bundle.spiffe_bundle);
                                self.inventory.crls = bundle.crls;
                            }
                            Some(change::Change::FederatedBundles(federated)) => {
                                self.set_federated(federated);
                            }
                            None => {}
                        }
                    }
                    self.reconcile().await;
                }
            }
        }
    }

    /// The last page of a snapshot or a resume has come: the entry set becomes what the pages
    /// say, at `revision`.
    async fn synced(&mut self, pages: Pages, revision: u64) -> Result<(), NodeError> {
        let resumed = !pages.unchanged.is_empty();
        let Some(entries) = pages.apply(&self.entries) else {
            // The server counts on an entry this agent does not hold.
            self.revision = 0;
            return Err(NodeError::Unavailable(
                "the resumed sync names an entry this agent does not hold; taking a snapshot"
                    .into(),
            ));
        };
        self.entries = entries;
        self.revision = revision;
        self.inventory.synced = true;
        info!(
            entries = self.entries.len(),
            revision, resumed, "synced entries"
        );
        self.reconcile().await;
        Ok(())
    }

    fn set_bundle(&mut self, json: &[u8]) {
        match SpiffeBundle::parse(self.inventory.trust_domain.clone(), json) {
            Ok(bundle) => {
                if let Err(e) = self.node.set_bundle(bundle.clone()) {
                    warn!(error = %e, "cannot store the new bundle");
                }
                self.inventory.bundle = bundle;
            }
            Err(e) => {
                warn!(error = %e, "the server sent an invalid bundle; keeping the previous one")
            }
        }
    }

    /// Replaces the federated bundles with the set the server sent (a bundle that does not
    /// parse, or claims the agent's own trust domain, is left out, with a warning).
    fn set_federated(&mut self, federated: FederatedBundles) {
        let mut bundles = BTreeMap::new();
        for bundle in federated.bundles {
            let parsed = TrustDomain::new(&bundle.trust_domain)
                .map_err(|e| e.to_string())
                .and_then(|td| {
                    if td == self.inventory.trust_domain {
                        return Err("it names the agent's own trust domain".to_owned());
                    }
                    SpiffeBundle::parse(td, &bundle.spiffe_bundle).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(parsed) => {
                    bundles.insert(parsed.trust_domain().clone(), parsed);
                }
                Err(error) => {
                    warn!(trust_domain = %bundle.trust_domain, %error, "the server sent an unusable federated bundle; leaving it out");
                }
            }
        }
        if *self.inventory.federated != bundles {
            info!(trust_domains = bundles.len(), "federated bundles changed");
            self.inventory.federated = Arc::new(bundles);
            self.publish();
        }
    }

    /// Drops SVIDs of entries that are gone, mints SVIDs for new or changed entries, renews
    /// those due, and publishes.
    async fn reconcile(&mut self) {
        let entries = &self.entries;
        // An SVID whose entry is gone, or now grants another ID, is withdrawn at once; one whose
        // selectors or hint changed follows the entry now and is re-minted below.
        Arc::make_mut(&mut self.inventory.svids).retain(|id, svid| {
            let Some(entry) = entries.get(id).filter(|e| e.session.is_none()) else {
                return false;
            };
            if entry.spiffe_id != svid.spiffe_id.as_str() {
                return false;
            }
            match (parse_selectors(entry), federates_with(entry)) {
                (Ok(selectors), Ok(federates_with)) => {
                    // Copied (from the published inventories' shared one) only when it changes.
                    // The federated trust domains follow the entry at once too: a workload
                    // must not keep a trust domain its entry no longer names until the new
                    // SVID is minted.
                    if svid.selectors != selectors
                        || svid.hint != entry.hint
                        || svid.jwt_ttl != entry.jwt_svid_ttl
                        || svid.federates_with != federates_with
                    {
                        let svid = Arc::make_mut(svid);
                        svid.selectors = selectors;
                        svid.hint = entry.hint.clone();
                        svid.jwt_ttl = entry.jwt_svid_ttl;
                        svid.federates_with = federates_with;
                    }
                    true
                }
                _ => false,
            }
        });
        self.inventory.sessions = self
            .entries
            .values()
            .filter_map(|e| match session_entry(e) {
                Ok(s) => s,
                Err(error) => {
                    warn!(entry_id = %e.id, %error, "unusable session entry");
                    None
                }
            })
            .map(|s| (s.entry_id.clone(), s))
            .collect();
        self.inventory.needs_sha256 = self
            .entries
            .values()
            .any(|e| e.selectors.iter().any(|s| s.starts_with("unix:sha256:")));
        self.renew_svids().await;
    }

    /// Mints SVIDs for entries without a current one (new, changed, or due for renewal).
    async fn renew_svids(&mut self) {
        let now = SystemTime::now();
        let due: Vec<Arc<Entry>> = self
            .entries
            .values()
            .filter(|entry| entry.session.is_none())
            .filter(|entry| match self.inventory.svids.get(&entry.id) {
                None => true,
                Some(svid) => svid_outdated(entry, svid, now),
            })
            .cloned()
            .collect();
        let mut chunks = due.chunks(BATCH).map(<[Arc<Entry>]>::to_vec);
        let mut next = chunks.next().map(Prepared::spawn);
        while let Some(prepared) = next.take() {
            let batch = match prepared.await {
                Ok(Ok(batch)) => batch,
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot mint svids now; will retry");
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "key generation task failed; will retry");
                    break;
                }
            };
            // The next batch's keys and CSRs are made while the server signs this one.
            next = chunks.next().map(Prepared::spawn);
            if let Err(e) = self.mint(batch).await {
                warn!(error = %e, "cannot mint svids now; will retry");
                break;
            }
        }
        self.publish();
    }

    async fn mint(&mut self, batch: Prepared) -> Result<(), NodeError> {
        let Prepared {
            entries,
            keys,
            params,
        } = batch;
        let results = self
            .node
            .client()
            .batch_new_x509svid(BatchNewX509svidRequest { params })
            .await
            .map_err(status_error)?
            .into_inner()
            .results;
        for ((entry, key), result) in entries.iter().zip(keys).zip(results) {
            if result.entry_id != entry.id {
                warn!(entry_id = %entry.id, answered = %result.entry_id, "the server answered out of order; ignoring the result");
                continue;
            }
            match result.result {
                Some(x509svid_result::Result::Svid(svid)) => {
                    match grant_of(entry).and_then(|grant| issued_svid(grant, &svid, key)) {
                        Ok(w) => {
                            debug!(entry_id = %entry.id, "svid minted");
                            Arc::make_mut(&mut self.inventory.svids)
                                .insert(entry.id.clone(), Arc::new(w));
                        }
                        Err(e) => {
                            warn!(entry_id = %entry.id, error = %e, "the server sent an unusable svid")
                        }
                    }
                }
                Some(x509svid_result::Result::Error(e)) => {
                    warn!(entry_id = %entry.id, code = e.code, error = %e.message, "svid refused");
                    if self.inventory.svids.contains_key(&entry.id) {
                        Arc::make_mut(&mut self.inventory.svids).remove(&entry.id);
                    }
                }
                None => {}
            }
        }
        Ok(())
    }

    fn publish(&mut self) {
        let now = SystemTime::now();
        // The map is shared with the snapshots already published: copied only to change it.
        if self
            .inventory
            .svids
            .values()
            .any(|svid| svid.not_after <= now)
        {
            Arc::make_mut(&mut self.inventory.svids).retain(|_, svid| svid.not_after > now);
        }
        self.tx.send_replace(Arc::new(self.inventory.clone()));
    }

    /// The earliest renewal or expiry among the SVIDs and the agent's own.
    fn next_wakeup(&self) -> tokio::time::Instant {
        let now = SystemTime::now();
        let mut next = self.node.renew_at();
        for svid in self.inventory.svids.values() {
            next = next.min(renew_time(svid)).min(svid.not_after);
        }
        let wait = next
            .duration_since(now)
            .unwrap_or(Duration::from_millis(50));
        tokio::time::Instant::now() + wait.clamp(Duration::from_millis(50), Duration::from_secs(60))
    }
}

/// A batch ready to send: the entries, a fresh key for each, and the CSRs.
struct Prepared {
    entries: Vec<Arc<Entry>>,
    keys: Vec<zeroize::Zeroizing<Vec<u8>>>,
    params: Vec<NewX509svidParams>,
}

// === impl Prepared ===

impl Prepared {
    /// Makes the keys and CSRs for `entries` on a blocking thread.
    fn spawn(entries: Vec<Arc<Entry>>) -> tokio::task::JoinHandle<Result<Self, NodeError>> {
        tokio::task::spawn_blocking(move || {
            let mut keys = Vec::with_capacity(entries.len());
            let mut params = Vec::with_capacity(entries.len());
            for entry in &entries {
                let key = new_key()?;
                params.push(NewX509svidParams {
                    entry_id: entry.id.clone(),
                    csr: csr(&key)?,
                });
                keys.push(key);
            }
            Ok(Self {
                entries,
                keys,
                params,
            })
        })
    }
}

/// The pages of a snapshot or of a resume, gathered until the last (a snapshot's name no
/// entry by id).
#[derive(Debug, Default)]
struct Pages {
    entries: Vec<Entry>,
    unchanged: Vec<String>,
}

// === impl Pages ===

impl Pages {
    /// The entry set the pages give: the entries sent in full and, of those `held`, the
    /// unchanged ones named (every other held entry is gone), at most [`MAX_ENTRIES`]. `None`
    /// when an unchanged entry named is not held: only a snapshot can tell what it is. An agent
    /// at its cap skips those instead: it left them out of its snapshot too.
    fn apply(self, held: &BTreeMap<String, Arc<Entry>>) -> Option<BTreeMap<String, Arc<Entry>>> {
        let at_cap = held.len() >= MAX_ENTRIES;
        let mut next = BTreeMap::new();
        for id in self.unchanged {
            match held.get(&id) {
                Some(entry) => {
                    next.insert(id, entry.clone());
                }
                None if at_cap => {}
                None => return None,
            }
        }
        let mut ignored = 0usize;
        for entry in self.entries {
            if next.len() >= MAX_ENTRIES && !next.contains_key(&entry.id) {
                ignored += 1;
                continue;
            }
            next.insert(entry.id.clone(), Arc::new(entry));
        }
        if ignored > 0 {
            warn!(
                ignored,
                max = MAX_ENTRIES,
                "too many entries for this agent; ignoring the rest"
            );
        }
        // Built again from its sorted contents: a map filled in key order leaves its nodes
        // about half full, one built from a sorted sequence fills them (less memory per entry).
        Some(next.into_iter().collect())
    }
}

/// Renewal is due at half the lifetime the SVID got.
fn renew_time(svid: &WorkloadSvid) -> SystemTime {
    Validity::from_parts(svid.issued_at, svid.not_after).renew_at()
}

fn parse_selectors(entry: &Entry) -> Result<SelectorSet, sigil_core::SelectorError> {
    entry.selectors.iter().map(|s| Selector::parse(s)).collect()
}

/// An SVID must be re-minted when its entry changed or renewal is due (unless a fresh one could
/// not end later: a capped SVID is not re-issued in a loop).
fn svid_outdated(entry: &Entry, svid: &WorkloadSvid, now: SystemTime) -> bool {
    if entry.spiffe_id != svid.spiffe_id.as_str() || entry.revision != svid.revision {
        return true;
    }
    let validity = Validity::from_parts(svid.issued_at, svid.not_after);
    let cap = (entry.expires_at > 0)
        .then(|| sigil_core::time::from_unix_seconds(entry.expires_at))
        .flatten();
    validity.should_renew(
        now,
        Duration::from_secs(entry.x509_svid_ttl.max(1)),
        &cap.into_iter().collect::<Vec<_>>(),
    )
}

/// What `entry` grants, for [`issued_svid`].
fn grant_of(entry: &Entry) -> Result<Grant, MintError> {
    let unusable = |e: EntryError| MintError::Unusable(e.to_string());
    Ok(Grant {
        entry_id: entry.id.clone(),
        spiffe_id: SpiffeId::new(&entry.spiffe_id).map_err(|e| unusable(e.into()))?,
        selectors: parse_selectors(entry).map_err(|e| unusable(e.into()))?,
        hint: entry.hint.clone(),
        jwt_ttl: entry.jwt_svid_ttl,
        revision: entry.revision,
        federates_with: federates_with(entry).map_err(|e| unusable(e.into()))?,
    })
}

/// The trust domains `entry` federates with.
fn federates_with(entry: &Entry) -> Result<Vec<TrustDomain>, sigil_core::SpiffeIdError> {
    entry
        .federates_with
        .iter()
        .map(|td| TrustDomain::new(td))
        .collect()
}

/// Why an entry from the server cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// A session entry must end.
    #[error("a session entry without an end")]
    SessionWithoutEnd,
    /// The SPIFFE ID does not parse.
    #[error("invalid spiffe id: {0}")]
    SpiffeId(#[from] sigil_core::SpiffeIdError),
    /// A selector does not parse.
    #[error("invalid selector: {0}")]
    Selector(#[from] sigil_core::SelectorError),
}

/// The session entry of `entry`, if it carries a privileged session.
fn session_entry(entry: &Entry) -> Result<Option<SessionEntry>, EntryError> {
    let Some(session) = &entry.session else {
        return Ok(None);
    };
    let ends_at = (entry.expires_at > 0)
        .then(|| sigil_core::time::from_unix_seconds(entry.expires_at))
        .flatten()
        .ok_or(EntryError::SessionWithoutEnd)?;
    Ok(Some(SessionEntry {
        entry_id: entry.id.clone(),
        session_id: session.id.clone(),
        spiffe_id: SpiffeId::new(&entry.spiffe_id)?,
        selectors: parse_selectors(entry)?,
        hint: entry.hint.clone(),
        svid_ttl: entry.x509_svid_ttl,
        ends_at,
        revision: entry.revision,
        federates_with: federates_with(entry)?,
    }))
}

/// `base` +/- 20%, so a fleet does not reconnect in step.
fn jitter(base: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    let factor = 0.8 + f64::from(byte[0]) / 255.0 * 0.4;
    base.mul_f64(factor).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, revision: u64) -> Entry {
        Entry {
            id: id.to_owned(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            revision,
            ..Entry::default()
        }
    }

    fn held(entries: &[Entry]) -> BTreeMap<String, Arc<Entry>> {
        entries
            .iter()
            .map(|e| (e.id.clone(), Arc::new(e.clone())))
            .collect()
    }

    #[test]
    fn a_resume_keeps_exactly_what_it_names() {
        let before = held(&[entry("kept", 1), entry("changed", 1), entry("gone", 1)]);
        let resume = Pages {
            entries: vec![entry("changed", 7), entry("new", 8)],
            unchanged: vec!["kept".into()],
        };
        let after = resume.apply(&before).unwrap();
        let summary: Vec<(&str, u64)> = after
            .values()
            .map(|e| (e.id.as_str(), e.revision))
            .collect();
        assert_eq!(summary, [("changed", 7), ("kept", 1), ("new", 8)]);
    }

    #[test]
    fn a_resume_naming_an_entry_the_agent_lacks_asks_for_a_snapshot() {
        let before = held(&[entry("kept", 1)]);
        let resume = Pages {
            entries: vec![],
            unchanged: vec!["kept".into(), "never-seen".into()],
        };
        assert!(resume.apply(&before).is_none());
    }

    #[test]
    fn a_snapshot_beyond_the_cap_keeps_the_first_entries() {
        let pages = Pages {
            entries: (0..MAX_ENTRIES + 3)
                .map(|i| entry(&format!("e{i:05}"), 1))
                .collect(),
            unchanged: vec![],
        };
        let after = pages.apply(&held(&[entry("gone", 1)])).unwrap();
        assert_eq!(after.len(), MAX_ENTRIES);
        assert!(after.contains_key("e00000"));
        assert!(
            !after.contains_key("gone"),
            "a snapshot replaces what was held"
        );
    }

    #[test]
    fn an_agent_at_its_cap_keeps_what_it_holds_instead_of_asking_again() {
        let before = held(
            &(0..MAX_ENTRIES)
                .map(|i| entry(&format!("e{i}"), 1))
                .collect::<Vec<_>>(),
        );
        let resume = Pages {
            entries: vec![entry("new", 9)],
            unchanged: (0..MAX_ENTRIES + 5).map(|i| format!("e{i}")).collect(),
        };
        let after = resume.apply(&before).unwrap();
        assert_eq!(after.len(), MAX_ENTRIES, "still capped");
        assert!(!after.contains_key("new"), "no room for a new entry");
        assert!(after.contains_key("e0"));
    }
}
