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
//! SVIDs are minted ahead for the entries of this agent (bounded by [`MAX_ENTRIES`]; those
//! beyond are left out until the agent has room again, then come with a snapshot, at most one
//! per [`CAP_SNAPSHOT_SPACING`]): a
//! workload that connects gets its identity at once, and one already streaming gets new or
//! changed identities without asking. Minting, and the renewal of the agent's own SVID, run
//! beside the sync stream, which the manager goes on reading: what an entry no longer grants is
//! withdrawn and published at once, never after a call to the server in flight.
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
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_core::lifetime::Validity;
use sigil_core::{Selector, SelectorSet, SpiffeBundle, SpiffeId, TrustDomain};
use sigil_proto::node::node_client::NodeClient;
use sigil_proto::node::{
    BatchNewX509svidRequest, Entry, FederatedBundles, NewX509svidParams, SyncEntriesRequest,
    change, sync_entries_response, x509svid_result,
};
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use self::mint::issued_svid;
pub use self::mint::{Caller, Grant, MintError, Minter};
pub use self::witness::WITNESS_FILE;
use self::witness::Witness;
pub use crate::cache::MAX_ENTRIES;
use crate::cache::{Inventory, SessionEntry, WorkloadSvid};
use crate::node::{NodeConnection, NodeError, csr, new_key, status_error};

/// The longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// CSRs per `BatchNewX509SVID` call.
const BATCH: usize = 100;

/// The longest wait for the server's answer to one batch of CSRs.
const MINT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest wait for the renewal of the agent's own SVID.
const RENEW_TIMEOUT: Duration = Duration::from_secs(30);

/// How soon what a failed round left unminted is tried again (a batch sent just before the
/// agent's SVID was renewed is refused once the new one is in use, say).
const MINT_RETRY: Duration = Duration::from_secs(1);

/// The shortest time between two snapshots taken for entries left out for the cap: an agent
/// over its cap that sees its entries deleted one batch after another takes one snapshot of
/// them all per spacing, not one per batch.
pub const CAP_SNAPSHOT_SPACING: Duration = Duration::from_secs(10);

/// Keeps the inventory current. See the module docs.
#[derive(Debug)]
pub struct Manager {
    node: Arc<NodeConnection>,
    minter: Minter,
    /// The entries of this agent, parsed when they arrive (the server's messages are not
    /// kept). Keys and grants are shared (`Arc`) with the SVIDs minted for them.
    entries: BTreeMap<Arc<str>, Held>,
    inventory: Inventory,
    revision: u64,
    /// The history of the server's change feed `revision` belongs to (what the snapshot or
    /// resume that began the stream named): presented with it when resuming.
    history: Vec<u8>,
    witness: Witness,
    tx: watch::Sender<Arc<Inventory>>,
    /// The round of minting under way, if any ([`Manager::start_minting`]).
    minting: Option<Minting>,
    /// The entries changed while a round was under way: what they left due is minted when it
    /// ends.
    changed_while_minting: bool,
    /// The first sync has ended (the inventory says so once its SVIDs are minted too).
    synced: bool,
    /// The bundle or the CRLs changed since the last reconcile.
    trust_changed: bool,
    /// When to try again what the last round, which failed, left unminted.
    retry_at: Option<tokio::time::Instant>,
    /// Entries of this agent were left out for the cap ([`MAX_ENTRIES`]) since the last sync
    /// that began the stream: once the agent holds fewer than the cap, it takes a snapshot to
    /// get them (the server counts them as sent). It stays set if what was left out is deleted
    /// meanwhile (the agent cannot tell): the next room then costs one snapshot that brings
    /// nothing new.
    left_out: bool,
    /// When the snapshots that bring entries left out are taken.
    cap_snapshots: CapSnapshots,
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
                history: Vec::new(),
                tx,
                minting: None,
                changed_while_minting: false,
                synced: false,
                trust_changed: false,
                retry_at: None,
                left_out: false,
                cap_snapshots: CapSnapshots::default(),
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
                    self.mint_while_waiting(wait).await;
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
            renew(Arc::clone(&self.node)).0.await?;
        }
        let mut stream = self
            .node
            .client()
            .sync_entries(SyncEntriesRequest {
                since_revision: self.revision,
                audit_checkpoints: self.witness.presented(),
                since_history: self.history.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        debug!(since = self.revision, "sync stream open");
        if self.revision == 0 {
            // A snapshot brings whatever fits: one due for entries left out is not needed (and
            // must not cut this one short).
            self.cap_snapshots.due = None;
        }
        if !self.inventory.connected {
            self.inventory.connected = true;
            self.inventory.disconnected_at = None;
            self.publish();
        }
        let mut pages = Pages::default();
        // The agent's own renewal runs beside the stream too: a server slow to answer it does
        // not hold back what the stream brings.
        let mut renewal: Option<Renewal> = None;
        loop {
            let wake = self.next_wakeup(renewal.is_some());
            let message = tokio::select! {
                message = stream.message() => match message {
                    Ok(message) => message,
                    Err(status) => return stream_ends(&mut renewal, Err(status_error(status))).await,
                },
                minted = settled(&mut self.minting) => {
                    self.finish_minting(minted);
                    continue;
                }
                renewed = settled(&mut renewal) => {
                    renewed?;
                    // Reconnect with the renewed SVID (a round under way goes on after).
                    return Ok(());
                }
                () = tokio::time::sleep_until(wake) => {
                    if renewal.is_none() && self.node.should_renew(SystemTime::now()) {
                        renewal = Some(renew(Arc::clone(&self.node)));
                        continue;
                    }
                    // One due for entries left out, at the end of the spacing.
                    if self.cap_snapshot_starts() {
                        return stream_ends(&mut renewal, Ok(())).await;
                    }
                    self.mint_due();
                    continue;
                }
            };
            let Some(message) = message.and_then(|m| m.message) else {
                let closed = NodeError::Unavailable("the server closed the sync stream".into());
                return stream_ends(&mut renewal, Err(closed)).await;
            };
            match message {
                sync_entries_response::Message::Snapshot(page) => {
                    pages.add(page.entries);
                    if page.last {
                        if let Some(bundle) = page.bundle {
                            self.set_bundle(&bundle.spiffe_bundle);
                        }
                        if let Some(federated) = page.federated_bundles {
                            self.set_federated(federated);
                        }
                        self.set_crls(page.crls);
                        self.synced(std::mem::take(&mut pages), page.revision, page.history);
                    }
                }
                sync_entries_response::Message::Resume(page) => {
                    if page.unchanged_revisions.len() != page.unchanged_ids.len() {
                        // A server older than the revisions: nothing proves what is held.
                        warn!(
                            "the resumed sync names unchanged entries without their revisions (a server older than this agent); taking a snapshot"
                        );
                        self.revision = 0;
                        return stream_ends(&mut renewal, Ok(())).await;
                    }
                    pages.add(page.entries);
                    pages
                        .unchanged
                        .extend(page.unchanged_ids.into_iter().zip(page.unchanged_revisions));
                    if page.last {
                        if let Some(bundle) = page.bundle {
                            self.set_bundle(&bundle.spiffe_bundle);
                            self.set_crls(bundle.crls);
                        }
                        if let Some(federated) = page.federated_bundles {
                            self.set_federated(federated);
                        }
                        if !self.synced(std::mem::take(&mut pages), page.revision, page.history) {
                            // Reconnect at once, from a snapshot.
                            return stream_ends(&mut renewal, Ok(())).await;
                        }
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
                                    || self.entries.contains_key(entry.id.as_str()) =>
                            {
                                // Removed first: `insert` would keep the old key, a
                                // second copy of the id beside the new grant's.
                                let (id, held) = Held::of(&entry);
                                self.entries.remove(&id);
                                self.entries.insert(id, held);
                            }
                            Some(change::Change::Upsert(entry)) => {
                                warn!(entry_id = %entry.id, max = MAX_ENTRIES, "too many entries for this agent; ignoring one");
                                self.left_out = true;
                            }
                            Some(change::Change::Delete(id)) => {
                                self.entries.remove(id.as_str());
                            }
                            Some(change::Change::Bundle(bundle)) => {
                                self.set_bundle(&bundle.spiffe_bundle);
                                self.set_crls(bundle.crls);
                            }
                            Some(change::Change::FederatedBundles(federated)) => {
                                self.set_federated(federated);
                            }
                            None => {}
                        }
                    }
                    debug!(revision = self.revision, "entry changes applied");
                    self.reconcile();
                    // What these changes withdrew is published; the entries left out come
                    // with the snapshot.
                    if self.cap_snapshot_starts() {
                        return stream_ends(&mut renewal, Ok(())).await;
                    }
                }
            }
        }
    }

    /// The last page of a snapshot or a resume has come: the entry set becomes what the pages
    /// say, at `revision` of `history`. `false` when the stream must end for a snapshot:
    ///
    /// A resume that names unchanged entries this agent does not hold, or holds at another
    /// revision, leaves it with what the pages do vouch for; the stream then ends, and the next
    /// one starts at once from a snapshot. An entry held at another revision than the server
    /// names is one whose contents the server no longer has (its store went back to an older
    /// copy): it is dropped now, with its SVIDs, rather than served until the snapshot.
    fn synced(&mut self, pages: Pages, revision: u64, history: Vec<u8>) -> bool {
        let resumed = !pages.unchanged.is_empty();
        let (entries, gaps) = pages.apply(&self.entries);
        self.entries = entries;
        self.left_out = gaps.left_out > 0;
        // A resume at the cap skips what it cannot hold; if the resume also took some away,
        // there is room for them, which only a snapshot can fill.
        if !gaps.is_empty() || self.cap_snapshot_now() {
            self.revision = 0;
            if gaps.is_empty() {
                info!(
                    left_out = gaps.left_out,
                    "entries left out for the cap now have room; taking a snapshot"
                );
            } else if gaps.stale > 0 {
                warn!(
                    stale = gaps.stale,
                    missing = gaps.missing,
                    "the resumed sync names entries this agent holds at other revisions (the server's store went back to an older copy?); dropping them and taking a snapshot"
                );
            } else {
                info!(
                    missing = gaps.missing,
                    "the resumed sync names entries this agent does not hold; taking a snapshot"
                );
            }
            // Withdrawn now; what is new is minted after the snapshot.
            self.follow_entries();
            self.publish();
            return false;
        }
        self.revision = revision;
        self.history = history;
        self.synced = true;
        info!(
            entries = self.entries.len(),
            revision, resumed, "synced entries"
        );
        self.reconcile();
        true
    }

    /// Whether to take the snapshot for entries left out now ([`CapSnapshots::take`]): they
    /// were left out for the cap and the agent now holds fewer, so only a snapshot brings them
    /// (the server counts them as sent).
    fn cap_snapshot_now(&mut self) -> bool {
        let room = self.left_out && self.entries.len() < MAX_ENTRIES;
        self.cap_snapshots.take(room, tokio::time::Instant::now())
    }

    /// During a stream: when [`Manager::cap_snapshot_now`], logs it and sets the revision for a
    /// snapshot (the caller ends the stream).
    fn cap_snapshot_starts(&mut self) -> bool {
        if !self.cap_snapshot_now() {
            return false;
        }
        info!(
            max = MAX_ENTRIES,
            "entries left out for the cap now have room; taking a snapshot"
        );
        self.revision = 0;
        true
    }

    /// Replaces the CRLs; a change is published with the next reconcile, at once.
    fn set_crls(&mut self, crls: Vec<Vec<u8>>) {
        if crls != self.inventory.crls {
            self.inventory.crls = crls;
            self.trust_changed = true;
        }
    }

    /// Replaces the bundle with the one the server sent (if it parses); a change is published
    /// with the next reconcile, at once.
    fn set_bundle(&mut self, json: &[u8]) {
        match SpiffeBundle::parse(self.inventory.trust_domain.clone(), json) {
            Ok(bundle) => {
                if bundle != self.inventory.bundle {
                    self.trust_changed = true;
                }
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
    /// parse, or claims the agent's own trust domain, is left out, with a warning); a change is
    /// published with the next reconcile, at once.
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
            self.trust_changed = true;
        }
    }

    /// The entries changed: what they no longer grant is withdrawn, what they grant anew or
    /// otherwise is minted ([`Manager::start_minting`]), and the inventory is published.
    ///
    /// A withdrawal is published at once, never after a mint: an SVID whose entry is gone or
    /// names another ID, one whose selectors, federated trust domains or end changed, a
    /// session closed or revoked, and a new bundle or CRL. Any other change (a new entry, a new
    /// hint or TTL) is published with the SVIDs it needs, so that each stream gets one message
    /// for it.
    fn reconcile(&mut self) {
        let withdrawn = self.follow_entries() | std::mem::take(&mut self.trust_changed);
        if self.minting.is_some() {
            self.changed_while_minting = true;
        } else {
            self.start_minting();
        }
        if withdrawn || self.minting.is_none() {
            self.publish();
        }
    }

    /// What [`Manager::reconcile`] does before it mints: the SVIDs and sessions follow the
    /// entries held (nothing is published). `true` when that withdrew something: an SVID, who
    /// may have one or what comes with it, or a session.
    fn follow_entries(&mut self) -> bool {
        let entries = &self.entries;
        let mut withdrawn = false;
        // An SVID whose entry is gone, or now grants another ID, is withdrawn at once; one whose
        // selectors, hint, TTL, end or federated trust domains changed follows the entry now
        // (copied, from the published inventories' shared one, only then) and is re-minted
        // after: a workload must not keep a trust domain its entry no longer names until the
        // new SVID is minted.
        Arc::make_mut(&mut self.inventory.svids).retain(|id, svid| {
            let Some(Held::Workload { grant, .. }) = entries.get(id) else {
                withdrawn = true;
                return false;
            };
            if grant.spiffe_id != svid.grant.spiffe_id {
                withdrawn = true;
                return false;
            }
            if !Arc::ptr_eq(grant, &svid.grant) && **grant != *svid.grant {
                withdrawn |= grant.selectors != svid.grant.selectors
                    || grant.federates_with != svid.grant.federates_with
                    || grant.expires_at != svid.grant.expires_at;
                Arc::make_mut(svid).grant = Arc::clone(grant);
            }
            true
        });
        let sessions: BTreeMap<String, SessionEntry> = self
            .entries
            .values()
            .filter_map(|held| match held {
                Held::Session(session) => Some((session.entry_id.clone(), (**session).clone())),
                Held::Workload { .. } | Held::Unusable { .. } => None,
            })
            .collect();
        withdrawn |= sessions != self.inventory.sessions;
        self.inventory.sessions = sessions;
        let hashes = |selectors: &SelectorSet| {
            selectors
                .iter()
                .any(|s| s.kind() == "unix" && s.value().starts_with("sha256:"))
        };
        self.inventory.needs_sha256 = self.entries.values().any(|held| match held {
            Held::Workload { grant, .. } => hashes(&grant.selectors),
            Held::Session(session) => hashes(&session.selectors),
            Held::Unusable { .. } => false,
        });
        withdrawn
    }

    /// Starts a round of minting for the entries without a current SVID (new, changed, or due
    /// for renewal), unless one is under way. The round runs beside the manager's loop, which
    /// goes on reading the sync stream: a withdrawal or a revocation that arrives meanwhile is
    /// published at once, not after the server signed ([`Manager::finish_minting`] takes what
    /// the round gave).
    fn start_minting(&mut self) {
        if self.minting.is_some() {
            return;
        }
        let now = SystemTime::now();
        let due: Vec<(Arc<Grant>, u64)> = self
            .entries
            .values()
            .filter_map(|held| match held {
                Held::Workload { grant, revision } => Some((grant, *revision)),
                Held::Session(_) | Held::Unusable { .. } => None,
            })
            .filter(
                |(grant, revision)| match self.inventory.svids.get(&grant.entry_id) {
                    None => true,
                    Some(svid) => svid_outdated(grant, *revision, svid, now),
                },
            )
            .map(|(grant, revision)| (Arc::clone(grant), revision))
            .collect();
        self.retry_at = None;
        if !due.is_empty() {
            self.minting = Some(InFlight(Box::pin(mint_round(Arc::clone(&self.node), due))));
        }
    }

    /// Takes in what a round minted and publishes: an SVID whose entry changed or went while
    /// it was minted is dropped (the entry's current grant is minted next), one the server
    /// refused is withdrawn. If the entries changed meanwhile, the next round starts (not after
    /// a round that failed: the next renewal or change tries again).
    fn finish_minting(&mut self, minted: Minted) {
        let entries = &self.entries;
        let returned = minted.svids.len();
        let current: Vec<_> = minted
            .svids
            .into_iter()
            .filter(|(id, svid)| match entries.get(id) {
                Some(Held::Workload { grant, revision }) => {
                    *revision == svid.revision
                        && (Arc::ptr_eq(grant, &svid.grant) || **grant == *svid.grant)
                }
                _ => false,
            })
            .collect();
        if current.len() < returned {
            debug!(
                dropped = returned - current.len(),
                "svids minted for an entry that changed or went meanwhile; dropped"
            );
        }
        for id in &minted.refused {
            if self.inventory.svids.contains_key(id) {
                Arc::make_mut(&mut self.inventory.svids).remove(id);
            }
        }
        self.add_minted(current);
        self.retry_at = minted
            .failed
            .then(|| tokio::time::Instant::now() + MINT_RETRY);
        self.publish();
        if std::mem::take(&mut self.changed_while_minting) && !minted.failed {
            self.start_minting();
        }
    }

    /// Waits `wait` before the next connection attempt (the sync stream is down), minting
    /// meanwhile what is due; a round still under way at the end goes on beside the next
    /// stream.
    async fn mint_while_waiting(&mut self, wait: Duration) {
        self.mint_due();
        let until = tokio::time::sleep(wait);
        tokio::pin!(until);
        loop {
            tokio::select! {
                minted = settled(&mut self.minting) => self.finish_minting(minted),
                () = &mut until => return,
            }
        }
    }

    /// Starts a round for what is due, unless one is under way; with nothing to mint,
    /// publishes (what expired leaves the inventory).
    fn mint_due(&mut self) {
        if self.minting.is_none() {
            self.start_minting();
            if self.minting.is_none() {
                self.publish();
            }
        }
    }

    /// Puts the SVIDs a round minted in the map ([`with_minted`]).
    fn add_minted(&mut self, minted: Vec<(Arc<str>, Arc<WorkloadSvid>)>) {
        if !minted.is_empty() {
            self.inventory.svids = Arc::new(with_minted(&self.inventory.svids, minted));
        }
    }

    fn publish(&mut self) {
        let now = SystemTime::now();
        // The map is shared with the snapshots already published: copied only to change it.
        if self
            .inventory
            .svids
            .values()
            .any(|svid| svid.not_after() <= now)
        {
            Arc::make_mut(&mut self.inventory.svids).retain(|_, svid| svid.not_after() > now);
        }
        // Ready once the first sync's SVIDs are minted (or their round failed).
        if self.synced && self.minting.is_none() {
            self.inventory.synced = true;
        }
        self.inventory.entries = self.entries.len();
        self.inventory.over_entry_cap = self.left_out;
        self.tx.send_replace(Arc::new(self.inventory.clone()));
    }

    /// The earliest renewal or expiry among the SVIDs and the agent's own; while a round is
    /// under way, the agent's own renewal only (the SVIDs are looked at when it ends), and not
    /// that while it is `renewing`; sooner, the retry of a round that failed.
    fn next_wakeup(&self, renewing: bool) -> tokio::time::Instant {
        let now = SystemTime::now();
        let mut next = if renewing {
            now + Duration::from_secs(60)
        } else {
            self.node.renew_at()
        };
        if self.minting.is_none() {
            for svid in self.inventory.svids.values() {
                next = next.min(svid.next_look(svid.grant.expires_at));
            }
        }
        let wait = next
            .duration_since(now)
            .unwrap_or(Duration::from_millis(50));
        let at = tokio::time::Instant::now()
            + wait.clamp(Duration::from_millis(50), Duration::from_secs(60));
        let at = match self.retry_at.filter(|_| self.minting.is_none()) {
            Some(retry) => at.min(retry),
            None => at,
        };
        match self.cap_snapshots.due {
            Some(due) => at.min(due),
            None => at,
        }
    }
}

/// When the snapshots that bring entries left out for the cap are taken: at least
/// [`CAP_SNAPSHOT_SPACING`] apart.
#[derive(Debug, Default)]
struct CapSnapshots {
    /// When the last one was asked for.
    last: Option<tokio::time::Instant>,
    /// When the next is due, if there was room too soon after the last.
    due: Option<tokio::time::Instant>,
}

// === impl CapSnapshots ===

impl CapSnapshots {
    /// Whether to take one now: there is `room` for the entries left out, and the last was
    /// asked for at least [`CAP_SNAPSHOT_SPACING`] ago. With room but too soon, one is due at
    /// the end of the spacing (the sync stream wakes then); without room, none is.
    fn take(&mut self, room: bool, now: tokio::time::Instant) -> bool {
        if !room {
            self.due = None;
            return false;
        }
        match self.last.map(|last| last + CAP_SNAPSHOT_SPACING) {
            Some(due) if now < due => {
                if self.due.is_none() {
                    info!(
                        wait = ?due.saturating_duration_since(now),
                        "entries left out for the cap now have room; the snapshot that brings them waits for the spacing between such snapshots"
                    );
                }
                self.due = Some(due);
                false
            }
            _ => {
                self.last = Some(now);
                self.due = None;
                true
            }
        }
    }
}

/// A batch ready to send: the entries (what each grants, at which revision), a fresh key for
/// each, and the CSRs.
struct Prepared {
    entries: Vec<(Arc<Grant>, u64)>,
    keys: Vec<zeroize::Zeroizing<Vec<u8>>>,
    params: Vec<NewX509svidParams>,
}

// === impl Prepared ===

impl Prepared {
    /// Makes the keys and CSRs for `entries` on a blocking thread.
    fn spawn(entries: Vec<(Arc<Grant>, u64)>) -> tokio::task::JoinHandle<Result<Self, NodeError>> {
        tokio::task::spawn_blocking(move || {
            let mut keys = Vec::with_capacity(entries.len());
            let mut params = Vec::with_capacity(entries.len());
            for (grant, _) in &entries {
                let key = new_key()?;
                params.push(NewX509svidParams {
                    entry_id: grant.entry_id.to_string(),
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

/// A call to the server under way beside the sync stream: a round of minting ([`Minting`]) or
/// the renewal of the agent's own SVID ([`Renewal`]).
struct InFlight<T>(Pin<Box<dyn Future<Output = T> + Send>>);

impl<T> std::fmt::Debug for InFlight<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

/// The call in `slot` once it ends (the slot is then empty); never, when there is none.
async fn settled<T>(slot: &mut Option<InFlight<T>>) -> T {
    match slot {
        Some(call) => {
            let output = call.0.as_mut().await;
            *slot = None;
            output
        }
        None => std::future::pending().await,
    }
}

/// `call`, given up after `limit` (the error says the server did not `what` in time).
async fn within<T>(
    limit: Duration,
    what: &str,
    call: impl Future<Output = Result<T, NodeError>>,
) -> Result<T, NodeError> {
    tokio::time::timeout(limit, call).await.map_err(|_| {
        NodeError::Unavailable(format!(
            "the server did not {what} within {}s",
            limit.as_secs()
        ))
    })?
}

/// A round of minting under way ([`Manager::start_minting`]).
type Minting = InFlight<Minted>;

/// What a round of minting gave.
#[derive(Default)]
struct Minted {
    /// The SVIDs, each with the grant and revision it was minted for.
    svids: Vec<(Arc<str>, Arc<WorkloadSvid>)>,
    /// The entries the server refused an SVID.
    refused: Vec<Arc<str>>,
    /// The round stopped early (the server or key generation failed); the rest waits for the
    /// next renewal or change.
    failed: bool,
}

/// The agent's own SVID being renewed.
type Renewal = InFlight<Result<(), NodeError>>;

/// Starts renewing the agent's own SVID ([`NodeConnection::renew`]), for at most
/// [`RENEW_TIMEOUT`].
fn renew(node: Arc<NodeConnection>) -> Renewal {
    debug!("renewing the agent svid");
    InFlight(Box::pin(async move {
        within(RENEW_TIMEOUT, "renew the agent svid", node.renew()).await
    }))
}

/// The sync stream ends with `outcome`: `Ok` to reconnect at once (for a snapshot), or the
/// error that ended it. With a renewal under way, its end decides instead (within its bound):
/// renewed, the agent reconnects with the new SVID. The server ends a stream when the SVID it
/// was opened with expires, and a stream ended for a snapshot need not renew again before the
/// next one.
async fn stream_ends(
    renewal: &mut Option<Renewal>,
    outcome: Result<(), NodeError>,
) -> Result<(), NodeError> {
    match renewal.take() {
        Some(renewal) => {
            if let Err(error) = &outcome {
                debug!(%error, "the sync stream ended while the agent svid was renewed; waiting for the renewal");
            }
            renewal.0.await
        }
        None => outcome,
    }
}

/// Mints `due` in batches of [`BATCH`], each batch's keys and CSRs made while the server signs
/// the one before. Each batch goes through the node's current connection (the agent's SVID may
/// be renewed during a round: the server accepts the old one no more once the new one is used).
async fn mint_round(node: Arc<NodeConnection>, due: Vec<(Arc<Grant>, u64)>) -> Minted {
    let mut chunks = due.chunks(BATCH).map(<[(Arc<Grant>, u64)]>::to_vec);
    // Sized once: a vector grown by doubling leaves the sizes it outgrew in malloc's free
    // lists, resident.
    let mut minted = Minted {
        svids: Vec::with_capacity(due.len()),
        ..Minted::default()
    };
    let mut next = chunks.next().map(Prepared::spawn);
    while let Some(prepared) = next.take() {
        let batch = match prepared.await {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot mint svids now; will retry");
                minted.failed = true;
                break;
            }
            Err(e) => {
                warn!(error = %e, "key generation task failed; will retry");
                minted.failed = true;
                break;
            }
        };
        next = chunks.next().map(Prepared::spawn);
        if let Err(e) = mint_batch(&mut node.client(), batch, &mut minted).await {
            warn!(error = %e, "cannot mint svids now; will retry");
            minted.failed = true;
            break;
        }
    }
    minted
}

/// Sends one batch of CSRs and keeps what the server answers in `minted`.
async fn mint_batch(
    client: &mut NodeClient<Channel>,
    batch: Prepared,
    minted: &mut Minted,
) -> Result<(), NodeError> {
    let Prepared {
        entries,
        keys,
        params,
    } = batch;
    let call = client.batch_new_x509svid(BatchNewX509svidRequest { params });
    let results = within(MINT_TIMEOUT, "answer a batch of CSRs", async {
        call.await.map_err(status_error)
    })
    .await?
    .into_inner()
    .results;
    for (((grant, revision), key), result) in entries.iter().zip(keys).zip(results) {
        let entry_id = &grant.entry_id;
        if result.entry_id != **entry_id {
            warn!(%entry_id, answered = %result.entry_id, "the server answered out of order; ignoring the result");
            continue;
        }
        match result.result {
            Some(x509svid_result::Result::Svid(svid)) => {
                match issued_svid(Arc::clone(grant), *revision, svid, &key) {
                    Ok(w) => {
                        debug!(%entry_id, "svid minted");
                        minted.svids.push((Arc::clone(entry_id), Arc::new(w)));
                    }
                    Err(e) => {
                        warn!(%entry_id, error = %e, "the server sent an unusable svid")
                    }
                }
            }
            Some(x509svid_result::Result::Error(e)) => {
                warn!(%entry_id, code = e.code, error = %e.message, "svid refused");
                minted.refused.push(Arc::clone(entry_id));
            }
            None => {}
        }
    }
    Ok(())
}

/// The pages of a snapshot or of a resume, gathered until the last (a snapshot's name no
/// entry by id).
#[derive(Debug, Default)]
struct Pages {
    /// The entries sent in full, parsed page by page (the server's messages are not kept until
    /// the last page: less memory at the peak of a large sync).
    entries: Vec<(Arc<str>, Held)>,
    /// The entries a resume names as unchanged, with the revision each must be held at.
    unchanged: Vec<(String, u64)>,
}

// === impl Pages ===

impl Pages {
    /// Adds the entries of one page.
    fn add(&mut self, entries: Vec<Entry>) {
        self.entries.extend(entries.iter().map(Held::of));
    }

    /// The entry set the pages give: the entries sent in full and, of those `held`, the
    /// unchanged ones named at the revision named (every other held entry is gone), at most
    /// [`MAX_ENTRIES`]; and the [`Gaps`], the unchanged entries named that are not held at
    /// that revision.
    fn apply(self, held: &BTreeMap<Arc<str>, Held>) -> (BTreeMap<Arc<str>, Held>, Gaps) {
        if self.unchanged.len() + self.entries.len() > MAX_ENTRIES {
            return self.apply_capped(held);
        }
        // Under the cap whatever repeats: one vector, sorted, built into the map in place (a
        // map filled in key order leaves its nodes about half full, and its nodes freed after
        // a rebuild would stay resident).
        let mut next = Vec::with_capacity(self.unchanged.len() + self.entries.len());
        let gaps = unchanged_held(self.unchanged, held, |id, entry| next.push((id, entry)));
        next.extend(
            self.entries
                .into_iter()
                .map(|(id, parsed)| keep_held(held, id, parsed)),
        );
        sort_keeping_last(&mut next);
        (next.into_iter().collect(), gaps)
    }

    /// [`Pages::apply`] when the pages may hold more than the cap: the entries already held
    /// are kept first (an agent over its cap goes on serving what it serves), then the others
    /// in the server's order while there is room.
    fn apply_capped(self, held: &BTreeMap<Arc<str>, Held>) -> (BTreeMap<Arc<str>, Held>, Gaps) {
        let mut next = BTreeMap::new();
        let mut gaps = unchanged_held(self.unchanged, held, |id, entry| {
            next.insert(id, entry);
        });
        let (known, new): (Vec<_>, Vec<_>) = self
            .entries
            .into_iter()
            .partition(|(id, _)| held.contains_key(id));
        let mut ignored = 0usize;
        for (id, parsed) in known.into_iter().chain(new) {
            if next.len() >= MAX_ENTRIES && !next.contains_key(&id) {
                ignored += 1;
                continue;
            }
            let (id, entry) = keep_held(held, id, parsed);
            // Removed first, so that the key is the value's own (the grant's id).
            next.remove(&id);
            next.insert(id, entry);
        }
        if ignored > 0 {
            warn!(
                ignored,
                max = MAX_ENTRIES,
                "too many entries for this agent; ignoring the rest"
            );
        }
        gaps.left_out += ignored;
        // Built again from its sorted contents: a map filled in key order leaves its nodes
        // about half full, one built from a sorted sequence fills them (less memory per entry).
        (next.into_iter().collect(), gaps)
    }
}

/// The unchanged entries a resume names that the agent cannot keep (only a snapshot can tell
/// what they are), and the entries of a snapshot or resume the cap left out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Gaps {
    /// Not held, by an agent below its cap (one at its cap left them out of its snapshot too,
    /// and skips them).
    missing: usize,
    /// Held at another revision than named: contents the server no longer has.
    stale: usize,
    /// Left out for the cap: named but skipped by an agent at its cap, or sent beyond it.
    /// Not a gap (a snapshot would leave them out too), unless the agent has room for them.
    left_out: usize,
}

impl Gaps {
    fn is_empty(self) -> bool {
        self.missing == 0 && self.stale == 0
    }
}

/// Passes to `keep` each of the `unchanged` entries named that `held` has at the revision
/// named; returns the others.
fn unchanged_held(
    unchanged: Vec<(String, u64)>,
    held: &BTreeMap<Arc<str>, Held>,
    mut keep: impl FnMut(Arc<str>, Held),
) -> Gaps {
    let at_cap = held.len() >= MAX_ENTRIES;
    let mut gaps = Gaps::default();
    for (id, revision) in unchanged {
        match held.get_key_value(id.as_str()) {
            Some((id, entry)) if entry.revision() == revision => {
                keep(Arc::clone(id), entry.clone())
            }
            Some(_) => gaps.stale += 1,
            None if at_cap => gaps.left_out += 1,
            None => gaps.missing += 1,
        }
    }
    gaps
}

/// An entry sent again as it is held (a snapshot after a reconnect) keeps the held value, which
/// the SVIDs minted for it share: no second copy of its grant.
fn keep_held(held: &BTreeMap<Arc<str>, Held>, id: Arc<str>, parsed: Held) -> (Arc<str>, Held) {
    match held.get_key_value(&id) {
        Some((id, entry)) if *entry == parsed => (Arc::clone(id), entry.clone()),
        _ => (id, parsed),
    }
}

/// The selectors of `entry`, parsed.
fn parse_selectors(entry: &Entry) -> Result<SelectorSet, sigil_core::SelectorError> {
    entry.selectors.iter().map(|s| Selector::parse(s)).collect()
}

/// `svids` with `minted` added or replacing what they renew, rebuilt from sorted contents: the
/// B-tree's nodes come out full, where inserting in key order leaves them half empty, and the
/// rebuild costs what the copy it replaces cost (a published snapshot shares the map, so
/// changing it in place would copy it first). The keys of new SVIDs are their grants' ids.
fn with_minted(
    svids: &BTreeMap<Arc<str>, Arc<WorkloadSvid>>,
    mut minted: Vec<(Arc<str>, Arc<WorkloadSvid>)>,
) -> BTreeMap<Arc<str>, Arc<WorkloadSvid>> {
    sort_keeping_last(&mut minted);
    let kept: Vec<_> = svids
        .iter()
        .filter(|(id, _)| minted.binary_search_by(|(m, _)| m.cmp(id)).is_err())
        .map(|(id, svid)| (Arc::clone(id), Arc::clone(svid)))
        .collect();
    // Keys now unique; the map sorts them again and is built in the vector's own buffer.
    minted.extend(kept);
    minted.into_iter().collect()
}

/// Sorts `pairs` by id, keeping of each id the last pair (stable sort, then the first of each
/// run of the reversed order).
fn sort_keeping_last<V>(pairs: &mut Vec<(Arc<str>, V)>) {
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    pairs.reverse();
    pairs.dedup_by(|a, b| a.0 == b.0);
    pairs.reverse();
}

/// An SVID must be re-minted when its entry (what it grants, at `revision`) changed or renewal
/// is due (unless a fresh one could not end later: a capped SVID is not re-issued in a loop).
fn svid_outdated(grant: &Grant, revision: u64, svid: &WorkloadSvid, now: SystemTime) -> bool {
    if grant.spiffe_id != svid.grant.spiffe_id || revision != svid.revision {
        return true;
    }
    let validity = Validity::from_parts(svid.issued_at(), svid.not_after());
    validity.should_renew(
        now,
        Duration::from_secs(grant.x509_ttl.max(1)),
        &grant.expires_at.into_iter().collect::<Vec<_>>(),
    )
}

/// The entry's own end, if it has one.
fn entry_end(entry: &Entry) -> Option<SystemTime> {
    (entry.expires_at > 0)
        .then(|| sigil_core::time::from_unix_seconds(entry.expires_at))
        .flatten()
}

/// What `entry` grants.
fn grant_of(entry: &Entry) -> Result<Grant, EntryError> {
    Ok(Grant {
        entry_id: entry.id.as_str().into(),
        spiffe_id: SpiffeId::new(&entry.spiffe_id)?,
        selectors: parse_selectors(entry)?,
        hint: entry.hint.as_str().into(),
        x509_ttl: entry.x509_svid_ttl,
        expires_at: entry_end(entry),
        federates_with: federates_with(entry)?,
    })
}

/// The trust domains `entry` federates with.
fn federates_with<C: FromIterator<TrustDomain>>(
    entry: &Entry,
) -> Result<C, sigil_core::SpiffeIdError> {
    entry
        .federates_with
        .iter()
        .map(|td| TrustDomain::new(td))
        .collect()
}

/// What the manager keeps of an entry the server sent: parsed once, when it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    /// An entry whose SVID is minted ahead: what it grants, at which revision.
    Workload {
        /// What it grants (shared with the SVIDs minted for it).
        grant: Arc<Grant>,
        /// The entry's revision.
        revision: u64,
    },
    /// A privileged session's entry: its SVIDs are minted on demand, per caller.
    Session(Arc<SessionEntry>),
    /// An entry that does not parse (warned about when it came): nothing is minted for it.
    Unusable {
        /// The entry's revision.
        revision: u64,
    },
}

// === impl Held ===

impl Held {
    /// `entry` as the manager keeps it, and its id (the same `Arc` as its grant's).
    fn of(entry: &Entry) -> (Arc<str>, Self) {
        let parsed = match session_entry(entry) {
            Ok(Some(session)) => Ok(Self::Session(Arc::new(session))),
            Ok(None) => grant_of(entry).map(|grant| Self::Workload {
                grant: Arc::new(grant),
                revision: entry.revision,
            }),
            Err(error) => Err(error),
        };
        match parsed {
            Ok(Self::Workload { grant, revision }) => (
                Arc::clone(&grant.entry_id),
                Self::Workload { grant, revision },
            ),
            Ok(held) => (entry.id.as_str().into(), held),
            Err(error) => {
                warn!(entry_id = %entry.id, %error, "unusable entry from the server; nothing is minted for it");
                (
                    entry.id.as_str().into(),
                    Self::Unusable {
                        revision: entry.revision,
                    },
                )
            }
        }
    }

    /// The revision of the entry as the server sent it.
    fn revision(&self) -> u64 {
        match self {
            Self::Workload { revision, .. } | Self::Unusable { revision } => *revision,
            Self::Session(session) => session.revision,
        }
    }
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
    let ends_at = entry_end(entry).ok_or(EntryError::SessionWithoutEnd)?;
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

    fn pages(entries: Vec<Entry>, unchanged: Vec<(String, u64)>) -> Pages {
        let mut pages = Pages {
            entries: vec![],
            unchanged,
        };
        pages.add(entries);
        pages
    }

    fn held(entries: &[Entry]) -> BTreeMap<Arc<str>, Held> {
        entries.iter().map(Held::of).collect()
    }

    /// The entries of pages that left no gap.
    fn complete((entries, gaps): (BTreeMap<Arc<str>, Held>, Gaps)) -> BTreeMap<Arc<str>, Held> {
        assert!(gaps.is_empty(), "{gaps:?}");
        entries
    }

    fn ids(entries: &BTreeMap<Arc<str>, Held>) -> Vec<&str> {
        entries.keys().map(|id| &**id).collect()
    }

    #[test]
    fn a_resume_keeps_exactly_what_it_names() {
        let before = held(&[entry("kept", 1), entry("changed", 1), entry("gone", 1)]);
        let resume = pages(
            vec![entry("changed", 7), entry("new", 8)],
            vec![("kept".into(), 1)],
        );
        let after = complete(resume.apply(&before));
        let summary: Vec<(&str, u64)> = after.iter().map(|(id, e)| (&**id, e.revision())).collect();
        assert_eq!(summary, [("changed", 7), ("kept", 1), ("new", 8)]);
    }

    #[test]
    fn an_entry_sent_twice_is_held_as_last_sent() {
        let before = held(&[entry("kept", 1), entry("both", 1)]);
        // "both" named unchanged and sent in full; "twice" on two pages.
        let mut resume = pages(
            vec![entry("twice", 3), entry("both", 2)],
            vec![("kept".into(), 1), ("both".into(), 1)],
        );
        resume.add(vec![entry("twice", 4)]);
        let after = complete(resume.apply(&before));
        let summary: Vec<(&str, u64)> = after.iter().map(|(id, e)| (&**id, e.revision())).collect();
        assert_eq!(summary, [("both", 2), ("kept", 1), ("twice", 4)]);
        let (key, _) = after.get_key_value("twice").unwrap();
        assert!(Arc::ptr_eq(key, &grant(&after, "twice").entry_id));
    }

    fn grant(entries: &BTreeMap<Arc<str>, Held>, id: &str) -> Arc<Grant> {
        match entries.get(id) {
            Some(Held::Workload { grant, .. }) => Arc::clone(grant),
            other => panic!("{id} is not a workload entry: {other:?}"),
        }
    }

    #[test]
    fn an_entry_sent_again_unchanged_keeps_the_grant_its_svids_share() {
        let before = held(&[entry("same", 1), entry("changed", 1)]);
        let snapshot = pages(vec![entry("same", 1), entry("changed", 2)], vec![]);
        let after = complete(snapshot.apply(&before));
        assert!(Arc::ptr_eq(&grant(&before, "same"), &grant(&after, "same")));
        assert!(!Arc::ptr_eq(
            &grant(&before, "changed"),
            &grant(&after, "changed")
        ));
        // The map's key is the grant's own id, not a second copy.
        let (key, _) = after.get_key_value("same").unwrap();
        assert!(Arc::ptr_eq(key, &grant(&after, "same").entry_id));
    }

    #[test]
    fn an_svid_that_ends_with_its_entry_wakes_the_manager_at_its_end_only() {
        let now = SystemTime::now();
        let not_after = now + Duration::from_secs(30);
        let at = |expires_at: Option<SystemTime>| {
            let mut e = entry("capped", 1);
            e.x509_svid_ttl = 3600;
            e.expires_at = expires_at.map_or(0, |t| {
                let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
                i64::try_from(secs).unwrap()
            });
            let grant = grant(&held(std::slice::from_ref(&e)), &e.id);
            // Minted a minute before `not_after`: past half its life.
            let svid = WorkloadSvid::unsigned(grant.clone(), 1, not_after);
            assert!(svid.renew_at() < now);
            (
                svid.next_look(grant.expires_at),
                svid_outdated(&grant, 1, &svid, now),
            )
        };
        // Its entry ends when it does (or sooner): nothing to renew until then.
        let whole_seconds = |t: SystemTime| {
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs())
        };
        let (wake, outdated) = at(Some(whole_seconds(not_after)));
        assert!(wake > now, "not at once");
        assert!(!outdated);
        // An entry that ends later or never: renewal is due (now).
        for later in [Some(not_after + Duration::from_secs(3600)), None] {
            let (wake, outdated) = at(later);
            assert!(wake < now, "renewal due");
            assert!(outdated);
        }
    }

    #[test]
    fn minted_svids_join_or_replace_what_the_map_holds() {
        let svid = |entry: Entry| {
            let grant = grant(&held(std::slice::from_ref(&entry)), &entry.id);
            (
                Arc::clone(&grant.entry_id),
                Arc::new(WorkloadSvid::unsigned(
                    grant,
                    entry.revision,
                    SystemTime::now(),
                )),
            )
        };
        let before: BTreeMap<_, _> = [svid(entry("a", 1)), svid(entry("b", 1))]
            .into_iter()
            .collect();
        // Out of order, as nothing promises they come sorted.
        let (c, b) = (svid(entry("c", 1)), svid(entry("b", 2)));
        let after = with_minted(&before, vec![c.clone(), b.clone()]);
        let summary: Vec<(&str, u64)> = after.iter().map(|(id, w)| (&**id, w.revision)).collect();
        assert_eq!(summary, [("a", 1), ("b", 2), ("c", 1)]);
        assert!(Arc::ptr_eq(&after["a"], &before["a"]));
        assert!(Arc::ptr_eq(&after["b"], &b.1));
        // The replaced SVID's key went with it: the key is the new grant's id.
        assert!(Arc::ptr_eq(after.get_key_value("b").unwrap().0, &b.0));
        assert!(!Arc::ptr_eq(&b.0, before.get_key_value("b").unwrap().0));
        assert!(with_minted(&before, vec![]).keys().eq(before.keys()));
    }

    #[test]
    fn an_entry_that_does_not_parse_is_held_as_unusable() {
        let mut bad_id = entry("bad-id", 3);
        bad_id.spiffe_id = "not a spiffe id".into();
        let mut bad_selector = entry("bad-selector", 4);
        bad_selector.selectors = vec!["no-colon".into()];
        let mut endless_session = entry("endless-session", 5);
        endless_session.session = Some(Default::default());
        for e in [bad_id, bad_selector, endless_session] {
            let (id, held) = Held::of(&e);
            assert_eq!(&*id, e.id.as_str());
            assert_eq!(
                held,
                Held::Unusable {
                    revision: e.revision
                },
                "{}",
                e.id
            );
        }
        let mut session = entry("session", 6);
        session.session = Some(Default::default());
        session.expires_at = 4_000_000_000;
        assert!(matches!(Held::of(&session).1, Held::Session(s) if s.revision == 6));
    }

    #[test]
    fn a_resume_naming_an_entry_the_agent_lacks_asks_for_a_snapshot() {
        let before = held(&[entry("kept", 1)]);
        let resume = pages(vec![], vec![("kept".into(), 1), ("never-seen".into(), 1)]);
        let (after, gaps) = resume.apply(&before);
        assert_eq!(
            gaps,
            Gaps {
                missing: 1,
                stale: 0,
                left_out: 0,
            }
        );
        assert_eq!(ids(&after), ["kept"]);
    }

    #[test]
    fn a_resume_naming_an_entry_at_another_revision_drops_it_and_asks_for_a_snapshot() {
        // Held at 5 from a history the server lost (its store went back to an older copy);
        // the server has it at 3, or has reused 5's successor for it: either way, not what is
        // held, so it is not kept. Both under the cap and past it.
        let before = held(&[entry("kept", 1), entry("changed-in-lost-history", 5)]);
        let stale = Gaps {
            missing: 0,
            stale: 1,
            left_out: 0,
        };
        for other in [3, 6] {
            let resume = pages(
                vec![entry("new", 7)],
                vec![
                    ("kept".into(), 1),
                    ("changed-in-lost-history".into(), other),
                ],
            );
            let (after, gaps) = resume.apply(&before);
            assert_eq!(gaps, stale, "revision {other}");
            assert_eq!(ids(&after), ["kept", "new"], "revision {other}");
        }
        let at_cap = held(
            &(0..MAX_ENTRIES)
                .map(|i| entry(&format!("e{i}"), 1))
                .collect::<Vec<_>>(),
        );
        let mut named: Vec<(String, u64)> =
            (0..MAX_ENTRIES + 1).map(|i| (format!("e{i}"), 1)).collect();
        complete(pages(vec![], named.clone()).apply(&at_cap));
        named[7].1 = 2;
        let (after, gaps) = pages(vec![], named).apply(&at_cap);
        // The one named beyond the cap is left out, not missing.
        assert_eq!(
            gaps,
            Gaps {
                left_out: 1,
                ..stale
            }
        );
        assert_eq!(after.len(), MAX_ENTRIES - 1);
        assert!(!after.contains_key("e7"));
    }

    #[test]
    fn a_snapshot_beyond_the_cap_keeps_the_first_entries() {
        let pages = pages(
            (0..MAX_ENTRIES + 3)
                .map(|i| entry(&format!("e{i:05}"), 1))
                .collect(),
            vec![],
        );
        let (after, gaps) = pages.apply(&held(&[entry("gone", 1)]));
        assert_eq!(
            gaps,
            Gaps {
                left_out: 3,
                ..Gaps::default()
            },
            "three left out, no gap"
        );
        assert_eq!(after.len(), MAX_ENTRIES);
        assert!(after.contains_key("e00000"));
        assert!(
            !after.contains_key("gone"),
            "a snapshot replaces what was held"
        );
    }

    #[test]
    fn a_snapshot_beyond_the_cap_keeps_what_the_agent_holds_first() {
        // The held entry sorts last: a snapshot in the server's order would leave it out.
        let mut sent: Vec<Entry> = (0..MAX_ENTRIES)
            .map(|i| entry(&format!("e{i:05}"), 1))
            .collect();
        sent.push(entry("zzz", 1));
        let (after, gaps) = pages(sent, vec![]).apply(&held(&[entry("zzz", 1)]));
        assert_eq!(
            gaps,
            Gaps {
                left_out: 1,
                ..Gaps::default()
            }
        );
        assert_eq!(after.len(), MAX_ENTRIES);
        assert!(after.contains_key("zzz"), "what it serves is kept");
        assert!(after.contains_key("e00000"));
        assert!(
            !after.contains_key("e09999"),
            "the last new one has no room"
        );
    }

    #[test]
    fn a_resume_at_the_cap_that_took_entries_away_leaves_room_for_what_it_skipped() {
        // Held at the cap; meanwhile e0 went and e10000 came: named, and skipped at the cap.
        let before = held(
            &(0..MAX_ENTRIES)
                .map(|i| entry(&format!("e{i}"), 1))
                .collect::<Vec<_>>(),
        );
        let resume = pages(
            vec![],
            (1..=MAX_ENTRIES).map(|i| (format!("e{i}"), 1)).collect(),
        );
        let (after, gaps) = resume.apply(&before);
        // Not a gap, but left out with room for it: `Manager::synced` takes a snapshot.
        assert_eq!(
            gaps,
            Gaps {
                left_out: 1,
                ..Gaps::default()
            }
        );
        assert_eq!(after.len(), MAX_ENTRIES - 1);
        assert!(!after.contains_key("e0") && !after.contains_key("e10000"));
    }

    #[test]
    fn an_agent_at_its_cap_keeps_what_it_holds_instead_of_asking_again() {
        let before = held(
            &(0..MAX_ENTRIES)
                .map(|i| entry(&format!("e{i}"), 1))
                .collect::<Vec<_>>(),
        );
        let resume = pages(
            vec![entry("new", 9)],
            (0..MAX_ENTRIES + 5).map(|i| (format!("e{i}"), 1)).collect(),
        );
        let (after, gaps) = resume.apply(&before);
        // Five named beyond the cap and the new one: left out, not a gap.
        assert_eq!(
            gaps,
            Gaps {
                left_out: 6,
                ..Gaps::default()
            }
        );
        assert_eq!(after.len(), MAX_ENTRIES, "still capped");
        assert!(!after.contains_key("new"), "no room for a new entry");
        assert!(after.contains_key("e0"));
    }

    #[test]
    fn snapshots_for_entries_left_out_are_spaced() {
        let t0 = tokio::time::Instant::now();
        let mut snapshots = CapSnapshots::default();
        assert!(!snapshots.take(false, t0), "no room, no snapshot");
        assert!(snapshots.take(true, t0), "the first comes at once");
        assert_eq!(snapshots.due, None);
        // Room again soon after: the next is due at the end of the spacing, not now.
        let soon = t0 + Duration::from_secs(1);
        assert!(!snapshots.take(true, soon));
        assert_eq!(snapshots.due, Some(t0 + CAP_SNAPSHOT_SPACING));
        assert!(!snapshots.take(true, soon + Duration::from_secs(1)));
        assert_eq!(
            snapshots.due,
            Some(t0 + CAP_SNAPSHOT_SPACING),
            "still one, same time"
        );
        // Due: taken, and the spacing starts again.
        let due = t0 + CAP_SNAPSHOT_SPACING;
        assert!(snapshots.take(true, due));
        assert_eq!(snapshots.due, None);
        assert!(!snapshots.take(true, due + Duration::from_secs(1)));
        // The room gone meanwhile (an entry took it): nothing is due.
        assert!(!snapshots.take(false, due + Duration::from_secs(2)));
        assert_eq!(snapshots.due, None);
        assert!(snapshots.take(true, due + CAP_SNAPSHOT_SPACING));
    }
}
