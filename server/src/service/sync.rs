//! Entry sync: what one agent's `SyncEntries` stream tells it, from the entry cache.
//!
//! A stream starts with a snapshot of the agent's authorized entries (in pages), or, when the
//! agent resumes from a revision this server issued, with resume pages that resend only what
//! may have changed. Then it sends each change the cache applies that concerns the agent, and
//! the bundle (with the CRLs) whenever either changes. It ends when the agent goes away, its
//! SVID expires, or the server shuts down. The messages are domain values
//! ([`SyncMessage`]); the node API turns them into protobuf.
//!
//! A stream wakes for a change only when the change concerns its agent: it registers with the
//! entry cache the parent IDs its agent's entries hang below ([`EntryWatch`]), and then reads
//! every change since the last one it read. A stream that stayed asleep for longer than the
//! cache's window of recent changes compares what it sent with what its agent is authorized
//! for now instead, and sends the difference (no snapshot: the agent keeps what did not
//! change; counted in `sigil_server_sync_resyncs_total`).
//!
//! An entry that expires changes what its agent is authorized for with no change to the store:
//! the entry and, when it is a parent or a node alias, everything below it. Each stream keeps
//! the earliest expiry among the entries its agent's authorization went through and, when it
//! comes, sends the difference as above.
//!
//! Agents are witnesses of the audit log: before anything else, the checkpoints the agent
//! presents are checked against the log ([`AuditLog::witness`]); then the stream sends the
//! latest signed checkpoint, and each new one as it is signed, unless the log has diverged
//! (an agent must keep the evidence it holds until an operator acknowledged it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info};

use crate::audit::AuditCheckpoint;
use crate::policy;
use crate::service::agents::{Agent, Agents, DenyReason};
use crate::service::audit::AuditLog;
use crate::service::authority::{Authority, BundleState};
use crate::service::crl::{CrlPublisher, CrlSet};
use crate::service::entry_cache::{
    AppliedChange, Authorized, EntryCache, EntryCacheError, EntryWatch, Recent,
};
use crate::service::federation::{FederatedBundles, FederatedSet};
use crate::service::metrics::SyncMetrics;
use crate::store::{Change, ChangeKind, EntryId, History, RegistrationEntry};

/// Entries per snapshot or resume page at most.
pub(crate) const SNAPSHOT_PAGE_SIZE: usize = 1000;

/// Bytes of entries per page at most ([`policy::entry_wire_size`]): pages are cut by size as
/// well as by count, so that entries with many or long selectors never make a page exceed
/// gRPC's 4 MiB limit (an entry takes at most [`policy::MAX_ENTRY_WIRE_BYTES`]).
pub(crate) const PAGE_BYTES: usize = 1024 * 1024;

/// Entry ids per resume page (34 bytes each on the wire: 340 KB a page).
pub(crate) const RESUME_IDS_PER_PAGE: usize = 10_000;

/// Changes taken from the entry cache per step.
const CHANGES_PER_READ: usize = 1000;

/// The bundle with the CRLs, as a stream sends it.
#[derive(Debug, Clone)]
pub(crate) struct BundleUpdate {
    /// The bundle.
    pub bundle: Arc<BundleState>,
    /// The CRLs.
    pub crls: Arc<CrlSet>,
}

/// One message of a sync stream.
#[derive(Debug, Clone)]
pub(crate) enum SyncMessage {
    /// A page of a snapshot: the last one carries the CRLs and the bundle (an agent that
    /// restarted may hold an older one, and only changes after the snapshot are sent).
    Snapshot {
        /// Entries.
        entries: Vec<Arc<RegistrationEntry>>,
        /// The revision the snapshot is at.
        revision: u64,
        /// The CRLs, on the last page only.
        crls: Option<Arc<CrlSet>>,
        /// The bundle, on the last page only.
        bundle: Option<BundleUpdate>,
        /// The federated bundles, on the last page only.
        federated: Option<Arc<FederatedSet>>,
    },
    /// A page of a resume: the last one carries the bundle.
    Resume {
        /// Entries that may have changed, in full.
        entries: Vec<Arc<RegistrationEntry>>,
        /// Entries the agent keeps as it has them, if it has them at these revisions.
        unchanged: Vec<(EntryId, u64)>,
        /// The revision the resume is at.
        revision: u64,
        /// The bundle, on the last page only.
        bundle: Option<BundleUpdate>,
        /// The federated bundles, on the last page only.
        federated: Option<Arc<FederatedSet>>,
    },
    /// Changes since the last message.
    Changes(Vec<SyncChange>),
    /// A signed checkpoint of the audit log, for the agent to keep as a witness.
    Checkpoint(Arc<AuditCheckpoint>),
}

/// One change of a [`SyncMessage::Changes`].
#[derive(Debug, Clone)]
pub(crate) enum SyncChange {
    /// The agent holds this entry now (new or changed).
    Upsert(Arc<RegistrationEntry>),
    /// The agent no longer holds this entry.
    Delete {
        /// The entry.
        id: EntryId,
        /// The revision of the deletion.
        revision: u64,
    },
    /// The bundle or the CRLs changed.
    Bundle {
        /// The entry revision the stream is at.
        revision: u64,
        /// The bundle and CRLs.
        update: BundleUpdate,
    },
    /// A federated bundle changed, came or went: the whole set.
    Federated {
        /// The entry revision the stream is at.
        revision: u64,
        /// Every federated bundle.
        set: Arc<FederatedSet>,
    },
}

/// How often an open stream checks that the entry cache still authorizes.
const STALE_CHECK: Duration = Duration::from_secs(5);

/// Why a stream ended with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum SyncError {
    /// The agent's SVID expired: it reconnects with the renewed one.
    #[error("agent SVID expired: reconnect with the renewed SVID")]
    Expired,
    /// The server is shutting down.
    #[error("server shutting down")]
    ShuttingDown,
    /// The agent was banned or evicted while its stream was open.
    #[error("this agent was banned or evicted")]
    Removed(DenyReason),
    /// The entries cannot be read now.
    #[error(transparent)]
    Entries(#[from] EntryCacheError),
}

/// The receiving end of a stream.
pub(crate) type SyncSender = mpsc::Sender<Result<SyncMessage, SyncError>>;

/// Where an agent asks its stream to resume from: a revision, and the history of the store's
/// change feed it is a revision of ([`Store::begin_history`]; empty from an agent that names
/// none).
///
/// [`Store::begin_history`]: crate::store::Store::begin_history
#[derive(Debug, Clone)]
pub(crate) struct Since {
    /// 0: no resume.
    pub revision: u64,
    /// The history's id, as the agent was sent it.
    pub history: Vec<u8>,
}

/// The histories of the store's change feed that a stream may resume from.
#[derive(Debug, Clone, Default)]
pub(crate) struct Histories {
    /// Oldest first, this server run's last. Empty: the store keeps none, and a resume is
    /// checked by its revision alone.
    known: Vec<History>,
}

// === impl Histories ===

impl Histories {
    /// The histories [`Store::begin_history`] returned (`None`: the store keeps none).
    ///
    /// [`Store::begin_history`]: crate::store::Store::begin_history
    pub(crate) fn new(known: Option<Vec<History>>) -> Self {
        Self {
            known: known.unwrap_or_default(),
        }
    }

    /// This run's history id, what streams tell their agents (empty when none are kept).
    pub(crate) fn current(&self) -> &[u8] {
        self.known.last().map_or(&[], |h| &h.id[..])
    }

    /// Why a resume from `since` cannot be trusted, if it cannot: its revision is shared with
    /// this store's history only if it comes from this run's history, or from an earlier one
    /// this store knows and no later than where that one ended (where the next began).
    fn refuses(&self, since: &Since) -> Option<&'static str> {
        if self.known.is_empty() {
            // A store that keeps none (PostgreSQL) cannot place a history of another's (a sled
            // store's, before a migration).
            return (!since.history.is_empty())
                .then_some("it names a history of a store that kept them (before a migration?)");
        }
        let Some(at) = self
            .known
            .iter()
            .position(|h| h.id[..] == since.history[..])
        else {
            return Some(
                "its history is not one this store knows (none named, lost with a restore to an older copy, or older than those kept)",
            );
        };
        // This run's history has no end yet; an earlier one ended where the next began.
        let end = self.known.get(at + 1).map_or(u64::MAX, |next| next.start);
        (since.revision > end).then_some(
            "its revision is past the end of its history (the store went back to an older copy?)",
        )
    }
}

/// The sync service.
#[derive(Debug, Clone)]
pub(crate) struct EntrySync {
    entries: Arc<EntryCache>,
    authority: Arc<Authority>,
    crls: Arc<CrlPublisher>,
    audit: Arc<AuditLog>,
    agents: Arc<Agents>,
    federated: Arc<FederatedBundles>,
    shutdown: watch::Receiver<bool>,
    metrics: SyncMetrics,
    /// How often an open stream checks that the cache still authorizes ([`STALE_CHECK`]).
    stale_check: Duration,
    /// The change feed's histories a stream may resume from.
    histories: Arc<Histories>,
}

/// What one stream has told its agent.
#[derive(Debug)]
struct SyncState {
    /// Entry id -> what was sent of it, for every entry the agent holds.
    sent: BTreeMap<EntryId, Sent>,
    /// Registered under the parents whose children concern the agent: the agent's ID, the
    /// SPIFFE IDs of its authorized entries and of the node aliases below it, and for an agent
    /// with node selectors the server's ID (which node aliases hang below).
    watch: EntryWatch,
    /// When the earliest expiry among the entries the agent's authorization went through
    /// comes: an entry, or a parent or node alias above some, that expires changes what the
    /// agent is authorized for without any change to the store.
    next_expiry: Option<SystemTime>,
}

/// What an agent was sent of an entry: its revision and when its authorization ends (which
/// moves without a new revision when a parent or node alias it is authorized through changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    revision: u64,
    ends: Option<SystemTime>,
}

impl Sent {
    fn of(entry: &RegistrationEntry) -> Self {
        Self {
            revision: entry.revision,
            ends: entry.expires_at,
        }
    }
}

// === impl SyncState ===

impl SyncState {
    /// Takes `authorized`'s parents (for the watch) and its next expiry.
    fn follow(&mut self, authorized: Authorized) {
        self.watch.set_parents(authorized.reachable);
        self.next_expiry = authorized.next_expiry;
    }

    /// How long until [`SyncState::next_expiry`], if any.
    fn until_expiry(&self) -> Option<Duration> {
        self.next_expiry.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }
}

// === impl EntrySync ===

impl EntrySync {
    /// The service; streams end when `shutdown` turns true.
    pub(crate) fn new(
        entries: Arc<EntryCache>,
        authority: Arc<Authority>,
        crls: Arc<CrlPublisher>,
        audit: Arc<AuditLog>,
        agents: Arc<Agents>,
        federated: Arc<FederatedBundles>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            entries,
            authority,
            crls,
            audit,
            agents,
            federated,
            shutdown,
            metrics: SyncMetrics::default(),
            stale_check: STALE_CHECK,
            histories: Arc::new(Histories::default()),
        }
    }

    /// The same service, resuming only from revisions of `histories` (without, a resume is
    /// checked by its revision alone).
    pub(crate) fn with_histories(mut self, histories: Histories) -> Self {
        self.histories = Arc::new(histories);
        self
    }

    /// This run's history of the change feed, sent with every snapshot and resume (empty when
    /// the store keeps none).
    pub(crate) fn history(&self) -> &[u8] {
        self.histories.current()
    }

    /// The same service, its streams checking the cache every `every` (tests that must see
    /// that only a wake, not the periodic check, delivered a change).
    #[cfg(test)]
    pub(crate) fn checking_every(mut self, every: Duration) -> Self {
        self.stale_check = every;
        self
    }

    /// The streams open now.
    pub(crate) fn metrics(&self) -> &SyncMetrics {
        &self.metrics
    }

    /// The bundle and CRLs as last published.
    pub(crate) fn bundle(&self) -> BundleUpdate {
        BundleUpdate {
            bundle: self.authority.bundle(),
            crls: self.crls.current(),
        }
    }

    /// Runs one stream for `agent`, resuming after `since` when it can, until the agent goes
    /// away (`Ok`), its SVID expires or the server shuts down. `witnessed` are the audit
    /// checkpoints the agent presents.
    ///
    /// # Errors
    ///
    /// [`SyncError`]: the stream's last message.
    pub(crate) async fn run(
        &self,
        agent: Agent,
        since: Since,
        witnessed: Vec<AuditCheckpoint>,
        tx: &SyncSender,
    ) -> Result<(), SyncError> {
        let _open = self.metrics.open(&agent.id);
        // The checkpoints the agent presents are checked beside the stream (the audit log's
        // lock must never hold up its entries); until that check is done, and for good if it
        // failed, the stream sends no checkpoint that could replace the evidence the agent
        // holds.
        let (witnessed_tx, mut witnessed_rx) = oneshot::channel();
        // Nothing presented: nothing to check (and no wake-up for it).
        let mut witness_pending = !witnessed.is_empty();
        let mut may_send_checkpoints = witnessed.is_empty();
        if witness_pending {
            let audit = Arc::clone(&self.audit);
            let source = agent.id.to_string();
            tokio::spawn(async move {
                let checked = match audit.witness(&source, witnessed, SystemTime::now()).await {
                    Ok(_) => true,
                    Err(error) => {
                        tracing::warn!(%error, agent = %source, "cannot check the audit checkpoints the agent presented");
                        false
                    }
                };
                let _ = witnessed_tx.send(checked);
            });
        }
        let mut checkpoints = self.audit.subscribe();
        // Subscribed before the resume reads the divergence: one found later is seen.
        let mut divergence = self.audit.subscribe_divergence();
        divergence.mark_unchanged();
        let mut sent_checkpoint: Option<Arc<AuditCheckpoint>> = None;
        let cache = &self.entries;
        // Subscribed before anything is sent: a ban after this point ends the stream.
        let mut removals = self.agents.subscribe_removed();
        let mut removals_open = true;
        let mut bundle_updates = self.authority.subscribe();
        let mut crl_updates = self.crls.subscribe();
        let mut crls_open = true;
        let mut federated_updates = self.federated.subscribe();
        let mut federated_generation = federated_updates.borrow_and_update().generation;
        let mut shutdown = self.shutdown.clone();
        let mut state = SyncState {
            sent: BTreeMap::new(),
            watch: cache.watch(),
            next_expiry: None,
        };

        // Resume from `since` when it is a revision of this store; else snapshot. Either way
        // the last page carries the CRLs and the bundle, which may have changed while the
        // agent was away.
        let mut crl_generation = crl_updates.borrow_and_update().generation;
        let mut bundle_sequence = bundle_updates.borrow_and_update().sequence;
        let (mut revision, mut resumed) = match self.resume(&agent, &since, &mut state, tx).await? {
            Some(revision) => (revision, true),
            None => (self.snapshot(&agent, &mut state, tx).await?, false),
        };
        let expiry = tokio::time::sleep(
            agent
                .not_after
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        );
        tokio::pin!(expiry);

        let mut expired = false;
        // What the agent holds can no longer be built on: it gets a snapshot.
        let mut snapshot_again = false;
        loop {
            // Every change the cache has applied after `revision`.
            loop {
                let (out, seen) = if std::mem::take(&mut snapshot_again) {
                    resumed = false;
                    revision = self.snapshot(&agent, &mut state, tx).await?;
                    continue;
                } else if std::mem::take(&mut expired) {
                    // An entry expired: what the agent is authorized for now against what it
                    // was sent.
                    self.resync(&agent, &mut state).await?
                } else {
                    match cache.changes_after(revision, CHANGES_PER_READ) {
                        Recent::Changes(changes) if changes.is_empty() => break,
                        Recent::Changes(changes) => {
                            self.apply_changes(&agent, &changes, &mut state).await?
                        }
                        // The cache went back (reloaded from a store restored to an earlier
                        // point): an id may be back at a revision the agent holds with other
                        // contents. Checked under the lock that read the window, so a cache
                        // that went back and moved past the stream's revision again is not
                        // taken for one ahead.
                        Recent::WentBack => {
                            snapshot_again = true;
                            continue;
                        }
                        // Asleep for longer than the cache's window (or the cache was
                        // reloaded): what the agent is authorized for now against what it was
                        // sent.
                        Recent::Gone => {
                            self.metrics.resyncs.inc();
                            self.resync(&agent, &mut state).await?
                        }
                    }
                };
                if !out.is_empty() && !send(tx, SyncMessage::Changes(out)).await {
                    return Ok(());
                }
                // Never back: a cache that went back must be seen to have (`WentBack`).
                revision = revision.max(seen);
            }
            let checkpoint = checkpoints.borrow_and_update().clone();
            if may_send_checkpoints
                && checkpoint != sent_checkpoint
                && self.audit.divergence().is_none()
            {
                if let Some(cp) = checkpoint.clone()
                    && !send(tx, SyncMessage::Checkpoint(cp)).await
                {
                    return Ok(());
                }
                sent_checkpoint = checkpoint;
            }
            let current_bundle = bundle_updates.borrow_and_update().sequence;
            let current_crls = crl_updates.borrow_and_update().generation;
            if current_bundle != bundle_sequence || current_crls != crl_generation {
                bundle_sequence = current_bundle;
                crl_generation = current_crls;
                let change = SyncChange::Bundle {
                    revision,
                    update: self.bundle(),
                };
                if !send(tx, SyncMessage::Changes(vec![change])).await {
                    return Ok(());
                }
            }
            let federated = federated_updates.borrow_and_update().clone();
            if federated.generation != federated_generation {
                federated_generation = federated.generation;
                let change = SyncChange::Federated {
                    revision,
                    set: federated,
                };
                if !send(tx, SyncMessage::Changes(vec![change])).await {
                    return Ok(());
                }
            }
            let until_expiry = state.until_expiry();
            tokio::select! {
                () = state.watch.changed() => {}
                () = tokio::time::sleep(until_expiry.unwrap_or_default()), if until_expiry.is_some() => {
                    expired = true;
                }
                changed = bundle_updates.changed() => if changed.is_err() { return Ok(()) },
                changed = federated_updates.changed() => if changed.is_err() { return Ok(()) },
                changed = crl_updates.changed(), if crls_open => if changed.is_err() { crls_open = false },
                changed = checkpoints.changed() => if changed.is_err() { return Ok(()) },
                checked = &mut witnessed_rx, if witness_pending => {
                    witness_pending = false;
                    may_send_checkpoints = checked.unwrap_or(false);
                    // A divergence the check finds comes through `divergence`; a check that
                    // failed leaves the stream's resume unproven the same way.
                    snapshot_again = resumed && !may_send_checkpoints;
                }
                // The stream resumed before the log was found to have diverged (by this agent's
                // checkpoints or anyone's): the revision the agent resumed from may be one of a
                // history this store lost.
                changed = divergence.changed(), if resumed => match changed {
                    Ok(()) => snapshot_again = divergence.borrow_and_update().is_some(),
                    Err(_) => resumed = false,
                },
                removed = removals.recv(), if removals_open => match removed {
                    Ok(removed) if removed.id == agent.id => {
                        return Err(SyncError::Removed(removed.reason));
                    }
                    Ok(_) => {}
                    // Missed some: the agent reconnects and is authenticated afresh.
                    Err(broadcast::error::RecvError::Lagged(_)) => return Err(SyncError::ShuttingDown),
                    Err(broadcast::error::RecvError::Closed) => removals_open = false,
                },
                () = &mut expiry => return Err(SyncError::Expired),
                // A server that can no longer vouch for its entries ends its streams (their
                // agents reconnect, to another server if they list one).
                () = tokio::time::sleep(self.stale_check) => if cache.is_refusing() {
                    return Err(SyncError::Entries(EntryCacheError::Stale));
                },
                _ = shutdown.wait_for(|stop| *stop) => return Err(SyncError::ShuttingDown),
                () = tx.closed() => return Ok(()),
            }
        }
    }

    /// Sends the agent's authorized entries in pages; returns the snapshot's revision.
    async fn snapshot(
        &self,
        agent: &Agent,
        state: &mut SyncState,
        tx: &SyncSender,
    ) -> Result<u64, SyncError> {
        let authorized = self.entries.authorized(agent, SystemTime::now()).await?;
        let revision = authorized.revision;
        state.sent = authorized
            .entries
            .iter()
            .map(|(id, e)| (id.clone(), Sent::of(e)))
            .collect();
        let entries: Vec<_> = authorized.entries.values().cloned().collect();
        let mut pages = pages(&entries).into_iter().peekable();
        loop {
            let chunk = pages.next().unwrap_or_default();
            let last = pages.peek().is_none();
            let page = SyncMessage::Snapshot {
                entries: chunk.to_vec(),
                revision,
                crls: last.then(|| self.crls.current()),
                bundle: last.then(|| self.bundle()),
                federated: last.then(|| self.federated.current()),
            };
            if !send(tx, page).await || last {
                break;
            }
        }
        debug!(agent_id = %agent.id, entries = state.sent.len(), revision, "sync snapshot sent");
        state.follow(authorized);
        Ok(revision)
    }

    /// Resumes after `since` without sending what the agent already holds: resume pages carry
    /// in full the authorized entries that changed after `since` and those below another entry
    /// (their authorization depends on their ancestors, which may have changed), and by id and
    /// revision the entries parented to the agent itself that did not change (authorized now
    /// and unchanged since `since`, so authorized then too). The agent keeps exactly these, and
    /// an unchanged one only if it holds it at that revision: a store restored from an older
    /// copy numbers its new changes as the lost ones were, so `revision <= since` alone does
    /// not prove the agent saw this entry's contents. Only ids of
    /// entries authorized for this agent are ever sent. `None` when a snapshot is needed
    /// instead: `since` is 0 or newer than anything this server has, or the audit log has
    /// diverged (the store went back to an older copy, so `since` may be a revision of a
    /// history it lost), or `since` is not a revision of a history shared with this store's
    /// ([`Histories`]).
    async fn resume(
        &self,
        agent: &Agent,
        since: &Since,
        state: &mut SyncState,
        tx: &SyncSender,
    ) -> Result<Option<u64>, SyncError> {
        if since.revision == 0 {
            return Ok(None);
        }
        if let Some(reason) = self.histories.refuses(since) {
            info!(agent_id = %agent.id, since = since.revision, reason, "a snapshot, not a resume");
            return Ok(None);
        }
        let since = since.revision;
        if self.audit.divergence().is_some() {
            debug!(agent_id = %agent.id, since, "the audit log has diverged: a snapshot, not a resume");
            return Ok(None);
        }
        let authorized = self.entries.authorized(agent, SystemTime::now()).await?;
        let revision = authorized.revision;
        if since > revision {
            return Ok(None);
        }
        let (unchanged, resent): (Vec<_>, Vec<_>) = authorized
            .entries
            .values()
            .cloned()
            .partition(|e| e.revision <= since && e.parent_id == agent.id);
        state.sent = authorized
            .entries
            .iter()
            .map(|(id, e)| (id.clone(), Sent::of(e)))
            .collect();
        let mut entries = pages(&resent).into_iter();
        let mut ids = unchanged.chunks(RESUME_IDS_PER_PAGE);
        loop {
            let (chunk, id_chunk) = (entries.next(), ids.next());
            let last = entries.len() == 0 && ids.len() == 0;
            let page = SyncMessage::Resume {
                entries: chunk.unwrap_or_default().to_vec(),
                unchanged: id_chunk
                    .unwrap_or_default()
                    .iter()
                    .map(|e| (e.id.clone(), e.revision))
                    .collect(),
                revision,
                bundle: last.then(|| self.bundle()),
                federated: last.then(|| self.federated.current()),
            };
            if !send(tx, page).await {
                return Ok(Some(revision));
            }
            if last {
                break;
            }
        }
        debug!(agent_id = %agent.id, since, revision, resent = resent.len(), unchanged = unchanged.len(), "sync resumed");
        state.follow(authorized);
        Ok(Some(revision))
    }

    /// Turns changes into this agent's changes: upserts for entries it is (still) authorized
    /// for, deletes for entries it no longer is. Changes that cannot concern the agent cost a
    /// set lookup each; the others trigger a walk of the agent's entries in the cache. Returns
    /// the changes and the cache revision they bring the agent to (at least the last change's).
    async fn apply_changes(
        &self,
        agent: &Agent,
        changes: &[Arc<AppliedChange>],
        state: &mut SyncState,
    ) -> Result<(Vec<SyncChange>, u64), SyncError> {
        // The rule the cache wakes streams by (an entry the agent holds hangs below a parent
        // the watch is registered under).
        let relevant = changes
            .iter()
            .any(|c| state.sent.contains_key(&entry_of(&c.change).id) || state.watch.concerns(c));
        if !relevant {
            return Ok((vec![], changes.last().map_or(0, |c| c.change.revision)));
        }
        self.resync(agent, state).await
    }

    /// The agent's changes from what it was sent to what it is authorized for now: deletes
    /// for the entries it no longer holds, then upserts for those new or changed since they
    /// were sent (each id once, so the order only matters to an agent at its cap: what goes
    /// first makes room for what comes). Registers the stream's watch under the new parents.
    /// Returns the changes and the cache revision they bring the agent to.
    async fn resync(
        &self,
        agent: &Agent,
        state: &mut SyncState,
    ) -> Result<(Vec<SyncChange>, u64), SyncError> {
        let authorized = self.entries.authorized(agent, SystemTime::now()).await?;
        let revision = authorized.revision;
        let gone: Vec<EntryId> = state
            .sent
            .keys()
            .filter(|id| !authorized.entries.contains_key(*id))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for id in gone {
            state.sent.remove(&id);
            out.push(SyncChange::Delete { id, revision });
        }
        for (id, entry) in &authorized.entries {
            let sent = Sent::of(entry);
            if state.sent.get(id) != Some(&sent) {
                state.sent.insert(id.clone(), sent);
                out.push(SyncChange::Upsert(entry.clone()));
            }
        }
        state.follow(authorized);
        Ok((out, revision))
    }
}

/// `entries` cut into pages of at most [`SNAPSHOT_PAGE_SIZE`] entries and [`PAGE_BYTES`]
/// bytes (a page holds one entry at least).
fn pages(entries: &[Arc<RegistrationEntry>]) -> Vec<&[Arc<RegistrationEntry>]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, entry) in entries.iter().enumerate() {
        let size = policy::entry_wire_size(
            &entry.spiffe_id,
            &entry.parent_id,
            &entry.selectors,
            &entry.dns_names,
            &entry.hint,
        );
        if i > start && (i - start == SNAPSHOT_PAGE_SIZE || bytes + size > PAGE_BYTES) {
            out.push(&entries[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

async fn send(tx: &SyncSender, message: SyncMessage) -> bool {
    tx.send(Ok(message)).await.is_ok()
}

fn entry_of(change: &Change) -> &RegistrationEntry {
    match &change.kind {
        ChangeKind::EntryUpserted(e) | ChangeKind::EntryDeleted(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use sigil_core::{SelectorSet, SpiffeId};

    use super::*;
    use crate::service::testing::{Fixture, bulky_entry, entry};
    use crate::store::NewEntry;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ban_or_an_eviction_ends_the_agents_open_stream_at_once() {
        let fx = Fixture::new().await;
        let banned = fx.attested_agent().await;
        let evicted = fx.attested_agent().await;
        let bystander = fx.attested_agent().await;
        let mut streams = Vec::new();
        for agent in [&banned, &evicted, &bystander] {
            let (tx, mut rx) = mpsc::channel(16);
            let sync = fx.sync.clone();
            let agent = agent.clone();
            let task = tokio::spawn(async move { sync.run(agent, since(0), vec![], &tx).await });
            assert!(matches!(next(&mut rx).await, SyncMessage::Snapshot { .. }));
            streams.push((rx, task));
        }
        let (bystander_rx, bystander_task) = streams.pop().unwrap();
        let (_evicted_rx, evicted_task) = streams.pop().unwrap();
        let (_banned_rx, banned_task) = streams.pop().unwrap();

        fx.agents
            .ban(0, &banned.id, SystemTime::now())
            .await
            .unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), banned_task)
            .await
            .expect("the banned agent's stream ended at once")
            .unwrap();
        assert!(
            matches!(ended, Err(SyncError::Removed(DenyReason::Banned))),
            "{ended:?}"
        );

        fx.agents.evict(0, &evicted.id).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), evicted_task)
            .await
            .expect("the evicted agent's stream ended at once")
            .unwrap();
        assert!(
            matches!(ended, Err(SyncError::Removed(DenyReason::NotAttested))),
            "{ended:?}"
        );

        // Another agent's stream is not touched.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!bystander_task.is_finished());
        drop(bystander_rx);
        bystander_task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_are_cut_by_size_so_bulky_entries_never_exceed_the_message_limit() {
        let fx = Fixture::new().await;
        let agent = fx.attested_agent().await;
        let now = SystemTime::now();
        // 12 entries of about 240 KB: 2.9 MB, far fewer than a page's 1000 entries.
        let bulky: Vec<_> = (0..12)
            .map(|i| bulky_entry(&format!("spiffe://example.org/bulky/{i}"), &agent.id, 60))
            .collect();
        for result in fx.entries.create(0, bulky, now).await.unwrap() {
            result.unwrap();
        }
        let (tx, mut rx) = mpsc::channel(16);
        let sync = fx.sync.clone();
        let stream_agent = agent.clone();
        let task = tokio::spawn(async move { sync.run(stream_agent, since(0), vec![], &tx).await });
        let mut received = 0;
        let mut pages = 0;
        loop {
            let SyncMessage::Snapshot { entries, crls, .. } = next(&mut rx).await else {
                panic!("expected snapshot pages");
            };
            let bytes: usize = entries
                .iter()
                .map(|e| {
                    policy::entry_wire_size(
                        &e.spiffe_id,
                        &e.parent_id,
                        &e.selectors,
                        &e.dns_names,
                        &e.hint,
                    )
                })
                .sum();
            assert!(bytes <= PAGE_BYTES, "a page of {bytes} bytes");
            received += entries.len();
            pages += 1;
            if crls.is_some() {
                break;
            }
        }
        assert_eq!(received, 12);
        assert!(pages >= 3, "{pages} pages");
        drop(rx);
        task.await.unwrap().unwrap();
    }

    /// The next message other than an audit checkpoint.
    async fn next(rx: &mut mpsc::Receiver<Result<SyncMessage, SyncError>>) -> SyncMessage {
        loop {
            match next_any(rx).await {
                SyncMessage::Checkpoint(_) => {}
                other => return other,
            }
        }
    }

    /// The next message other than an audit checkpoint, which must be changes.
    async fn next_changes(
        rx: &mut mpsc::Receiver<Result<SyncMessage, SyncError>>,
    ) -> Vec<SyncChange> {
        match next(rx).await {
            SyncMessage::Changes(changes) => changes,
            other => panic!("expected changes, got {other:?}"),
        }
    }

    async fn next_any(rx: &mut mpsc::Receiver<Result<SyncMessage, SyncError>>) -> SyncMessage {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a sync message within 10 s")
            .expect("the stream is open")
            .expect("not an error")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_carries_checkpoints_unless_the_agents_own_reveal_a_divergence() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        let cp = fx.audit.checkpoint(now).await.unwrap().unwrap();

        // A stream: the snapshot, then the latest checkpoint for the agent to keep.
        let (tx, mut rx) = mpsc::channel(4);
        let sync = fx.sync.clone();
        let stream_agent = agent.clone();
        let task = tokio::spawn(async move { sync.run(stream_agent, since(0), vec![], &tx).await });
        assert!(matches!(
            next_any(&mut rx).await,
            SyncMessage::Snapshot { .. }
        ));
        let SyncMessage::Checkpoint(sent) = next_any(&mut rx).await else {
            panic!("expected the checkpoint");
        };
        assert_eq!(*sent, cp);
        drop(rx);
        task.await.unwrap().unwrap();

        // An agent that saw a later checkpoint of a history this log does not hold: the
        // divergence is found, and the stream sends it no checkpoint that could replace it.
        let mut lost = cp.clone();
        lost.sequence += 100;
        let lost = fx.audit.resign(lost);
        let (tx, mut rx) = mpsc::channel(4);
        let sync = fx.sync.clone();
        let stream_agent = agent.clone();
        let task =
            tokio::spawn(async move { sync.run(stream_agent, since(0), vec![lost], &tx).await });
        assert!(matches!(
            next_any(&mut rx).await,
            SyncMessage::Snapshot { .. }
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fx.audit.divergence().is_none() {
            assert!(std::time::Instant::now() < deadline, "no divergence found");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fx.entries
            .create(0, vec![entry("spiffe://example.org/after", &agent.id)], now)
            .await
            .unwrap();
        assert!(matches!(next_any(&mut rx).await, SyncMessage::Changes(_)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "nothing else, no checkpoint");
        drop(rx);
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_that_saw_a_lost_history_gets_a_snapshot_not_a_resume() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        let held = create(&fx, "spiffe://example.org/held", &agent.id).await;
        let cp = fx.audit.checkpoint(now).await.unwrap().unwrap();
        let mut lost = cp.clone();
        lost.sequence += 100;
        let lost = fx.audit.resign(lost);

        // The agent resumes from a revision this store has, presenting a checkpoint of a
        // history it does not: the check runs beside the stream, so the resume may go first,
        // but a snapshot follows it.
        let (tx, mut rx) = mpsc::channel(4);
        let sync = fx.sync.clone().checking_every(Duration::from_secs(3600));
        let stream_agent = agent.clone();
        let task = tokio::spawn(async move {
            sync.run(stream_agent, since(held.revision), vec![lost], &tx)
                .await
        });
        let mut resumed_first = false;
        let entries = loop {
            match next_any(&mut rx).await {
                SyncMessage::Resume { .. } => resumed_first = true,
                SyncMessage::Snapshot { entries, .. } => break entries,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, held.id);
        assert!(fx.audit.divergence().is_some());
        drop(rx);
        task.await.unwrap().unwrap();

        // Once the log is known to have diverged, no stream resumes, witness or not.
        let (tx, mut rx) = mpsc::channel(4);
        let sync = fx.sync.clone();
        let stream_agent = agent.clone();
        let task = tokio::spawn(async move {
            sync.run(stream_agent, since(held.revision), vec![], &tx)
                .await
        });
        assert!(
            matches!(next_any(&mut rx).await, SyncMessage::Snapshot { .. }),
            "a snapshot (the first stream resumed first: {resumed_first})"
        );
        drop(rx);
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resumed_stream_turns_to_a_snapshot_when_the_log_is_found_diverged_later() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        let held = create(&fx, "spiffe://example.org/held", &agent.id).await;
        let cp = fx.audit.checkpoint(now).await.unwrap().unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let sync = fx.sync.clone().checking_every(Duration::from_secs(3600));
        let stream_agent = agent.clone();
        let task = tokio::spawn(async move {
            sync.run(stream_agent, since(held.revision), vec![], &tx)
                .await
        });
        let SyncMessage::Resume { unchanged, .. } = next_any(&mut rx).await else {
            panic!("expected a resume");
        };
        assert_eq!(unchanged, [(held.id.clone(), held.revision)]);
        assert!(matches!(
            next_any(&mut rx).await,
            SyncMessage::Checkpoint(_)
        ));

        // Another agent reveals that the log lost a history: this stream's resume may have
        // been from it.
        let mut lost = cp.clone();
        lost.sequence += 100;
        let found = fx
            .audit
            .witness("another agent", vec![fx.audit.resign(lost)], now)
            .await
            .unwrap();
        assert!(found.is_some());
        let SyncMessage::Snapshot { entries, .. } = next_any(&mut rx).await else {
            panic!("expected a snapshot");
        };
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, held.id);
        // And the stream goes on from it.
        let after = create(&fx, "spiffe://example.org/after", &agent.id).await;
        let SyncMessage::Changes(changes) = next_any(&mut rx).await else {
            panic!("expected changes");
        };
        assert!(matches!(&changes[..], [SyncChange::Upsert(e)] if e.id == after.id));
        drop(rx);
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_sends_a_snapshot_then_the_agents_changes_only_then_resumes() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let agent = fx.attested_agent().await;
        let other = SpiffeId::new("spiffe://example.org/sigil/agent/join_token/other").unwrap();
        let first = fx
            .entries
            .create(0, vec![entry("spiffe://example.org/a", &agent.id)], now)
            .await
            .unwrap()
            .remove(0)
            .unwrap();

        let (tx, mut rx) = mpsc::channel(4);
        let sync = fx.sync.clone();
        let stream_agent = agent.clone();
        let task = tokio::spawn(async move { sync.run(stream_agent, since(0), vec![], &tx).await });
        let SyncMessage::Snapshot {
            entries,
            revision,
            crls,
            bundle,
            ..
        } = next(&mut rx).await
        else {
            panic!("expected a snapshot");
        };
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, first.id);
        assert!(crls.is_some());
        // An agent that restarted gets the current bundle with the snapshot.
        assert_eq!(
            bundle.map(|b| b.bundle.sequence),
            Some(fx.sync.bundle().bundle.sequence)
        );

        // Another agent's entry is not sent; this agent's is.
        fx.entries
            .create(0, vec![entry("spiffe://example.org/b", &other)], now)
            .await
            .unwrap();
        let mine = fx
            .entries
            .create(0, vec![entry("spiffe://example.org/c", &agent.id)], now)
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        let changes = next_changes(&mut rx).await;
        assert_eq!(changes.len(), 1);
        assert!(matches!(&changes[0], SyncChange::Upsert(e) if e.id == mine.id));
        fx.entries.delete(0, &first.id).await.unwrap();
        let changes = next_changes(&mut rx).await;
        assert!(matches!(&changes[0], SyncChange::Delete { id, .. } if *id == first.id));
        drop(rx);
        task.await.unwrap().unwrap();

        // Resuming from the snapshot's revision resends the new entry, not the unchanged.
        let (tx, mut rx) = mpsc::channel(4);
        let sync = fx.sync.clone();
        let task = tokio::spawn(async move { sync.run(agent, since(revision), vec![], &tx).await });
        let SyncMessage::Resume {
            entries,
            unchanged,
            bundle,
            ..
        } = next(&mut rx).await
        else {
            panic!("expected a resume page");
        };
        assert_eq!(
            entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
            std::slice::from_ref(&mine.id)
        );
        assert!(unchanged.is_empty());
        assert!(bundle.is_some());
        drop(rx);
        task.await.unwrap().unwrap();
    }

    /// A stream's messages and its task.
    type Stream = (
        mpsc::Receiver<Result<SyncMessage, SyncError>>,
        tokio::task::JoinHandle<Result<(), SyncError>>,
    );

    /// A stream for `agent` from scratch, past its snapshot (whose entries it returns). It
    /// checks the cache only every hour: a change reaches it only if the change woke it.
    async fn open_stream(fx: &Fixture, agent: &Agent) -> (Stream, Vec<EntryId>) {
        let (tx, mut rx) = mpsc::channel(16);
        let sync = fx.sync.clone().checking_every(Duration::from_secs(3600));
        let agent = agent.clone();
        let task = tokio::spawn(async move { sync.run(agent, since(0), vec![], &tx).await });
        let SyncMessage::Snapshot { entries, .. } = next(&mut rx).await else {
            panic!("expected a snapshot");
        };
        ((rx, task), entries.iter().map(|e| e.id.clone()).collect())
    }

    /// A resume from `revision`, naming no history (what the fixture, which keeps none, takes).
    fn since(revision: u64) -> Since {
        Since {
            revision,
            history: Vec::new(),
        }
    }

    #[test]
    fn a_resume_is_trusted_only_from_a_history_the_store_shares() {
        let (a, b, c) = ([1; 16], [2; 16], [3; 16]);
        let known = Histories::new(Some(vec![
            History { id: a, start: 0 },
            History { id: b, start: 100 },
            History { id: c, start: 150 },
        ]));
        let at = |id: &[u8], revision| Since {
            revision,
            history: id.to_vec(),
        };
        assert_eq!(known.current(), c);
        // This run's history: any revision (one ahead of the store is refused later).
        assert_eq!(known.refuses(&at(&c, 150)), None);
        assert_eq!(known.refuses(&at(&c, 10_000)), None);
        // An earlier one, up to where the next began, and not past it: `b` ended at 150, and
        // `a` at 100 (a store restored to a copy taken at 100, or a clean restart there).
        assert_eq!(known.refuses(&at(&b, 150)), None);
        assert_eq!(known.refuses(&at(&a, 100)), None);
        assert!(known.refuses(&at(&a, 101)).is_some());
        assert!(known.refuses(&at(&b, 151)).is_some());
        // A history the store does not know (lost with a restore), and none at all.
        assert!(known.refuses(&at(&[4; 16], 1)).is_some());
        assert!(known.refuses(&at(&[], 1)).is_some());
        assert!(known.refuses(&at(&c[..8], 1)).is_some());
        // A store that keeps no histories checks the revision alone.
        let none = Histories::new(None);
        assert_eq!(none.current(), b"");
        assert_eq!(none.refuses(&at(&[], 1)), None);
        assert!(none.refuses(&at(&a, 1)).is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_resumes_only_from_a_revision_of_a_shared_history() {
        let fx = Fixture::new().await;
        let agent = fx.attested_agent().await;
        create(&fx, "spiffe://example.org/before", &agent.id).await;
        let held = create(&fx, "spiffe://example.org/held", &agent.id).await;
        let (old, restored) = ([7; 16], [8; 16]);
        // The store was restored to a copy taken before `held` was created, and this run's
        // history began there.
        let histories = Histories::new(Some(vec![
            History { id: old, start: 0 },
            History {
                id: restored,
                start: held.revision - 1,
            },
        ]));
        let first = |since: Since| {
            let sync = fx.sync.clone().with_histories(histories.clone());
            let stream_agent = agent.clone();
            async move {
                let (tx, mut rx) = mpsc::channel(4);
                let task =
                    tokio::spawn(async move { sync.run(stream_agent, since, vec![], &tx).await });
                let message = next_any(&mut rx).await;
                drop(rx);
                task.await.unwrap().unwrap();
                message
            }
        };
        let resumed = |m: &SyncMessage| matches!(m, SyncMessage::Resume { .. });
        let snapshot = |m: &SyncMessage| matches!(m, SyncMessage::Snapshot { .. });
        let at = |id: &[u8; 16], revision| Since {
            revision,
            history: id.to_vec(),
        };
        // This run's history resumes; so does the old one up to where it ended.
        assert!(resumed(&first(at(&restored, held.revision)).await));
        assert!(resumed(&first(at(&old, held.revision - 1)).await));
        // The old history past its end: the agent may hold what the restore lost.
        assert!(snapshot(&first(at(&old, held.revision)).await));
        // An unknown history, or none named.
        assert!(snapshot(&first(at(&[9; 16], held.revision)).await));
        assert!(snapshot(&first(since(held.revision)).await));
        assert_eq!(
            fx.sync.clone().with_histories(histories).history(),
            restored
        );
    }

    /// Entry `spiffe_id` under `parent`, created through the entry service.
    async fn create(fx: &Fixture, spiffe_id: &str, parent: &SpiffeId) -> RegistrationEntry {
        let created = fx
            .entries
            .create(0, vec![entry(spiffe_id, parent)], SystemTime::now());
        created.await.unwrap().remove(0).unwrap()
    }

    /// Streams for `from`, which holds just entry `held`, and for `to`, which holds nothing.
    async fn two_streams(
        fx: &Fixture,
        (from, held): (&Agent, &EntryId),
        to: &Agent,
    ) -> (Stream, Stream) {
        let (from_stream, from_held) = open_stream(fx, from).await;
        assert_eq!(from_held, std::slice::from_ref(held));
        let (to_stream, to_held) = open_stream(fx, to).await;
        assert!(to_held.is_empty());
        (from_stream, to_stream)
    }

    /// Checks that the stream `from` is told entry `id` is gone and the stream `to` gets it,
    /// under `parent` (each as its next message), then closes both.
    async fn moved_between(from: Stream, to: Stream, id: &EntryId, parent: &SpiffeId) {
        let ((mut from_rx, from_task), (mut to_rx, to_task)) = (from, to);
        let changes = next_changes(&mut from_rx).await;
        assert!(
            matches!(&changes[..], [SyncChange::Delete { id: gone, .. }] if gone == id),
            "{changes:?}"
        );
        let changes = next_changes(&mut to_rx).await;
        assert!(
            matches!(&changes[..], [SyncChange::Upsert(e)] if e.id == *id && e.parent_id == *parent),
            "{changes:?}"
        );
        drop((from_rx, to_rx));
        from_task.await.unwrap().unwrap();
        to_task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_moved_between_agents_leaves_one_stream_and_reaches_the_other() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let (from, to) = (fx.attested_agent().await, fx.attested_agent().await);
        let moved = create(&fx, "spiffe://example.org/moved", &from.id).await;
        let (from_stream, to_stream) = two_streams(&fx, (&from, &moved.id), &to).await;

        fx.entries
            .update(
                0,
                &moved.id,
                entry("spiffe://example.org/moved", &to.id),
                now,
            )
            .await
            .unwrap();
        moved_between(from_stream, to_stream, &moved.id, &to.id).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_alias_moved_away_takes_what_hangs_below_it_along() {
        let fx = Fixture::new().await;
        let (from, to) = (fx.attested_agent().await, fx.attested_agent().await);
        // A join token's node alias: no selectors, a parent only (never sent to the agent).
        let alias_id = SpiffeId::new("spiffe://example.org/node/x").unwrap();
        let alias = fx
            .store
            .create_entry(NewEntry::new(
                alias_id.clone(),
                from.id.clone(),
                SelectorSet::new(),
            ))
            .await
            .unwrap();
        let below = create(&fx, "spiffe://example.org/below", &alias_id).await;
        let (from_stream, to_stream) = two_streams(&fx, (&from, &below.id), &to).await;

        // The alias (which neither stream was sent) moves: what hangs below it moves along.
        fx.store
            .update_entry(
                &alias.id,
                NewEntry::new(alias_id.clone(), to.id.clone(), SelectorSet::new()),
            )
            .await
            .unwrap();
        moved_between(from_stream, to_stream, &below.id, &alias_id).await;
    }

    /// Creates `parent` with `selectors` under `above`, expiring in 5 s (a parent only, never
    /// sent to an agent: an alias under the agent without selectors, or a node alias under the
    /// server), and an entry below it held by `agent`'s stream. Checks that the stream, which
    /// wakes only for changes to the store or for an expiry, drops the entry below once the
    /// parent has expired, and nothing else.
    async fn check_withdrawn_at_expiry(
        fx: &Fixture,
        agent: &Agent,
        (parent, above, selectors): (&SpiffeId, &SpiffeId, SelectorSet),
    ) {
        let expires_at = SystemTime::now() + Duration::from_secs(5);
        let mut alias = NewEntry::new(parent.clone(), above.clone(), selectors);
        alias.expires_at = Some(expires_at);
        fx.store.create_entry(alias).await.unwrap();
        let below = create(fx, "spiffe://example.org/below", parent).await;
        let kept = create(fx, "spiffe://example.org/kept", &agent.id).await;
        let ((mut rx, task), mut held) = open_stream(fx, agent).await;
        held.sort_unstable();
        let mut expected = vec![below.id.clone(), kept.id.clone()];
        expected.sort_unstable();
        assert_eq!(held, expected);

        let changes = next_changes(&mut rx).await;
        assert!(SystemTime::now() >= expires_at, "not before the expiry");
        assert!(
            matches!(&changes[..], [SyncChange::Delete { id, .. }] if *id == below.id),
            "{changes:?}"
        );
        // Nothing else expires: no further message.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err(), "one message only");
        drop(rx);
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parent_that_expires_takes_what_hangs_below_it_off_the_agent() {
        let fx = Fixture::new().await;
        let agent = fx.attested_agent().await;
        let parent = SpiffeId::new("spiffe://example.org/team").unwrap();
        check_withdrawn_at_expiry(&fx, &agent, (&parent, &agent.id, SelectorSet::new())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_that_expire_one_after_the_other_each_leave_at_their_own_expiry() {
        let fx = Fixture::new().await;
        let agent = fx.attested_agent().await;
        let now = SystemTime::now();
        let (first_at, then_at) = (now + Duration::from_secs(5), now + Duration::from_secs(7));
        // An entry the agent holds itself, then a parent above another one.
        let mut direct = entry("spiffe://example.org/direct", &agent.id);
        direct.expires_at = Some(first_at);
        let direct = fx
            .entries
            .create(0, vec![direct], now)
            .await
            .unwrap()
            .remove(0);
        let direct = direct.unwrap();
        let parent = SpiffeId::new("spiffe://example.org/team").unwrap();
        let mut alias = NewEntry::new(parent.clone(), agent.id.clone(), SelectorSet::new());
        alias.expires_at = Some(then_at);
        fx.store.create_entry(alias).await.unwrap();
        let below = create(&fx, "spiffe://example.org/below", &parent).await;
        let ((mut rx, task), mut held) = open_stream(&fx, &agent).await;
        held.sort_unstable();
        let mut expected = vec![direct.id.clone(), below.id.clone()];
        expected.sort_unstable();
        assert_eq!(held, expected);

        // Each at its own expiry: the stream's timer is set again after the first.
        for (gone, at) in [(&direct.id, first_at), (&below.id, then_at)] {
            let changes = next_changes(&mut rx).await;
            assert!(SystemTime::now() >= at, "not before the expiry");
            assert!(
                matches!(&changes[..], [SyncChange::Delete { id, .. }] if id == gone),
                "{changes:?}"
            );
        }
        drop(rx);
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_are_sent_ending_with_their_parents_and_again_when_that_moves() {
        let fx = Fixture::new().await;
        let agent = fx.attested_agent().await;
        let now = SystemTime::now();
        let at = |secs| Some(now + Duration::from_secs(secs));
        let team = SpiffeId::new("spiffe://example.org/team").unwrap();
        let mut parent = NewEntry::new(team.clone(), agent.id.clone(), SelectorSet::new());
        parent.expires_at = at(100);
        let parent_id = fx.store.create_entry(parent.clone()).await.unwrap().id;
        let below = create(&fx, "spiffe://example.org/below", &team).await;
        assert_eq!(below.expires_at, None);
        let (tx, mut rx) = mpsc::channel(16);
        let sync = fx.sync.clone().checking_every(Duration::from_secs(3600));
        let stream_agent = agent.clone();
        let task = tokio::spawn(async move { sync.run(stream_agent, since(0), vec![], &tx).await });
        let SyncMessage::Snapshot { entries, .. } = next(&mut rx).await else {
            panic!("expected a snapshot");
        };
        // Sent ending with its parent, so that the agent neither serves it longer nor renews
        // its SVIDs in a loop against a cap it would not know.
        assert!(matches!(&entries[..], [e] if e.id == below.id && e.expires_at == at(100)));

        // The parent's end moves: the entry (same revision) is sent again with it.
        parent.expires_at = at(200);
        fx.store.update_entry(&parent_id, parent).await.unwrap();
        let changes = next_changes(&mut rx).await;
        assert!(
            matches!(&changes[..], [SyncChange::Upsert(e)]
                if e.id == below.id && e.revision == below.revision && e.expires_at == at(200)),
            "{changes:?}"
        );
        drop(rx);
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_alias_that_expires_takes_what_hangs_below_it_off_the_agent() {
        let fx = Fixture::new().await;
        let selectors: SelectorSet =
            [sigil_core::Selector::parse("x509pop:subject:cn:web").unwrap()]
                .into_iter()
                .collect();
        let mut agent = fx.attested_agent().await;
        agent.selectors = selectors.clone();
        let alias = SpiffeId::new("spiffe://example.org/nodes/web").unwrap();
        let server = policy::server_id(&agent.id.trust_domain()).unwrap();
        check_withdrawn_at_expiry(&fx, &agent, (&alias, &server, selectors)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_asleep_past_the_cache_window_gets_the_difference_not_a_snapshot() {
        use crate::service::entry_cache::RECENT_CHANGES;

        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let (agent, busy) = (fx.attested_agent().await, fx.attested_agent().await);
        let created = fx
            .entries
            .create(
                0,
                vec![
                    entry("spiffe://example.org/kept", &agent.id),
                    entry("spiffe://example.org/dropped", &agent.id),
                ],
                now,
            )
            .await
            .unwrap();
        let dropped = created[1].as_ref().unwrap().id.clone();
        let ((mut rx, task), held) = open_stream(&fx, &agent).await;
        assert_eq!(held.len(), 2);

        // More changes than the cache keeps, none for this agent: its stream sleeps through
        // them, and the changes right after its revision leave the cache's window.
        let mut others = 0;
        // Two batches more than the window, in case the stream was still reading the first.
        while others <= RECENT_CHANGES + 2000 {
            let batch = (0..1000)
                .map(|i| entry(&format!("spiffe://example.org/busy/{others}-{i}"), &busy.id))
                .collect();
            for result in fx.entries.create(0, batch, now).await.unwrap() {
                result.unwrap();
            }
            others += 1000;
        }
        assert_eq!(fx.sync.metrics().resyncs.get(), 0);
        // Then one for it: it learns exactly what changed for its agent (not the kept entry).
        fx.entries.delete(0, &dropped).await.unwrap();
        let SyncMessage::Changes(changes) = next(&mut rx).await else {
            panic!("expected the difference, not a snapshot");
        };
        assert!(
            matches!(&changes[..], [SyncChange::Delete { id, .. }] if *id == dropped),
            "{changes:?}"
        );
        assert_eq!(fx.sync.metrics().resyncs.get(), 1, "by comparison, once");
        let added = create(&fx, "spiffe://example.org/added", &agent.id).await;
        let changes = next_changes(&mut rx).await;
        assert!(
            matches!(&changes[..], [SyncChange::Upsert(e)] if e.id == added.id),
            "{changes:?}"
        );
        assert_eq!(fx.sync.metrics().resyncs.get(), 1, "in the window again");
        drop(rx);
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_ends_when_the_agent_svid_expires() {
        let fx = Fixture::new().await;
        let mut agent = fx.attested_agent().await;
        agent.not_after = SystemTime::now() + Duration::from_millis(200);
        let (tx, mut rx) = mpsc::channel(4);
        let sync = fx.sync.clone();
        let task = tokio::spawn(async move { sync.run(agent, since(0), vec![], &tx).await });
        assert!(matches!(next(&mut rx).await, SyncMessage::Snapshot { .. }));
        let ended = task.await.unwrap().unwrap_err();
        assert!(matches!(ended, SyncError::Expired));
    }
}
