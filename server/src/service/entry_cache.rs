//! The entry cache: every registration entry in memory, indexed by parent ID and by SPIFFE ID,
//! kept current from the store's change feed by one task, together with the most recent
//! changes, which every agent's `SyncEntries` stream shares.
//!
//! Why it exists: what an agent may ask for is a walk from the agent's ID down the parent index
//! (see [`super::svids`]). Done against the store, that walk cost one read per reachable ID on
//! every sync step and every signing call (an agent with 10,000 entries: 10,001 reads for each
//! batch of 100 CSRs), and every sync stream read each change from the store itself (1,000
//! agents: 1,000 reads and decodes of the same change). Here the walk is in memory, a signing
//! call checks just the entries it asks for by walking up from each ([`EntryCache::authorize`]),
//! and each change is read once and shared (`Arc`). This is SPIRE's lesson (spiffe/spire#1351, #2147,
//! PR #1859): the whole entry table in memory is the core of the design, and it must be kept
//! current incrementally, not rebuilt on a timer.
//!
//! Consistency. The cache holds durable state only: it starts from a consistent snapshot
//! ([`Store::snapshot_entries`]) and applies the gap-free change feed in revision order, so its
//! state at revision R is the store's at R. The follower applies each change as soon as the
//! store publishes it durable; an authorization that finds the cache behind the store's durable
//! revision applies the missing changes itself first, so a write acknowledged before a call is
//! always reflected by it (read-your-writes, as when the store itself was read).
//!
//! Listings. The admin API's listings by parent or SPIFFE ID read the same two indexes
//! ([`EntryCache::list_current`], once the cache is as current as the store): the sled store
//! keeps no such index on disk (see its module docs).
//!
//! Fail closed: when the follower cannot read the store, the cache marks itself stale and
//! [`EntryCache::authorized`] and [`EntryCache::authorize`] refuse (the callers answer
//! `Unavailable`) until it has caught up again; a stale cache never authorizes from old state.
//!
//! Waking the streams. A sync stream registers the parent IDs whose children concern its
//! agent ([`EntryCache::watch`], [`EntryWatch::set_parents`]), and the cache, once it has
//! applied changes, wakes only the streams registered under the parent an entry had before the
//! change or has after it (every stream after a reload). A server with 1,000 agents used to
//! wake all 1,000 streams for every change, each to find in a set lookup that the change was
//! not for it. A stream woken reads every change since the last one it read, so a wake that
//! comes late loses nothing; see [`EntryWatch`] for why none is missed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher as _;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime};

use sigil_core::{SelectorSet, SpiffeId};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::policy;
use crate::store::{
    Change, ChangeKind, ChangesSince, EntryFilter, EntryId, Page, PageRequest, RegistrationEntry,
    Store, StoreError, entry_after, entry_page_token,
};

/// How many of the most recent changes the cache keeps for sync streams. A stream that falls
/// further behind compares what it sent with the cache's current state instead.
pub(crate) const RECENT_CHANGES: usize = 4096;

/// Changes the follower reads from the store per call.
const FOLLOW_BATCH: usize = 1000;

/// The longest wait between the follower's attempts after a store error.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// See the module docs.
pub(crate) struct EntryCache {
    store: Arc<dyn Store>,
    state: RwLock<State>,
    /// How long the cache may authorize after the store last answered (`max_store_staleness`;
    /// zero until [`EntryCache::set_max_staleness`]).
    max_staleness: RwLock<Duration>,
    /// When the store last answered a read (the follower's or a caller's).
    confirmed_at: RwLock<Instant>,
    /// Set while the cache authorizes without the store (said once in the log).
    degraded: AtomicBool,
    /// Set while it refuses because the store has not answered for too long (said once).
    refusing: AtomicBool,
    /// The sync streams to wake, by the keys of the parent IDs that concern them.
    watchers: Mutex<Watchers>,
    /// Makes the [`ParentKey`]s of parent IDs.
    parent_keys: ParentKeys,
}

/// A parent ID as watches are registered under it: its 64-bit hash. A stream holds one per
/// parent instead of a copy of the ID (an agent with 10,000 nested entries has 10,000 parents,
/// and 1,000 agents of 100 entries as many). An ID always has the same key, so no wake is
/// lost; two IDs with the same key only wake a stream for nothing (it reads the changes and
/// finds none for it, or compares its entries and finds them unchanged).
type ParentKey = u64;

/// The one hasher, seeded at random per cache, that makes every [`ParentKey`]: the keys
/// watches register under and the keys a change wakes must come from the same one.
#[derive(Default)]
struct ParentKeys(foldhash::fast::RandomState);

impl ParentKeys {
    fn key(&self, parent: &SpiffeId) -> ParentKey {
        self.0.hash_one(parent)
    }
}

/// The open [`EntryWatch`]es.
#[derive(Default)]
struct Watchers {
    /// The next watch's id.
    next: u64,
    /// Parent key -> the watches registered under it (usually one: a vector).
    by_parent: Map<ParentKey, Vec<(u64, Arc<Notify>)>>,
    /// Every watch, by id (a reload wakes them all).
    all: Map<u64, Arc<Notify>>,
}

/// One sync stream's registration with the cache: woken ([`EntryWatch::changed`]) after the
/// cache applied a change to an entry whose parent, before or after the change, is one of the
/// IDs given to [`EntryWatch::set_parents`] (or shares its [`ParentKey`]), and after a reload;
/// unregistered when dropped.
///
/// Why no change is missed: the cache applies a change under its state's write lock and wakes
/// the watches registered at that moment afterwards. A stream that registers its parents
/// before it reads the changes after its revision ([`EntryCache::changes_after`]) either reads
/// the change (applied before that read) or is woken for it (applied after the read, so woken
/// after the registration). A wake that finds the stream busy is kept until it waits again
/// ([`Notify::notify_one`]'s permit).
pub(crate) struct EntryWatch {
    cache: Arc<EntryCache>,
    id: u64,
    notify: Arc<Notify>,
    parents: HashSet<ParentKey, foldhash::fast::RandomState>,
}

/// How often the follower reads the store when nothing was published.
const FRESHNESS_CHECK: Duration = Duration::from_secs(2);

/// How long the follower waits for one catch-up (every change since its revision, in
/// batches) before it counts the store as not answering.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a caller waits for the store to say its revision before the cache answers
/// without it (within `max_store_staleness`) or refuses.
const STORE_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How current the cache is, for the health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// The store answered within [`STORE_ANSWER_TIMEOUT`] of the last read.
    Current,
    /// The store has not answered for `since`, within `max_store_staleness`: authorizing
    /// from the cache.
    Degraded {
        /// Since the store last answered.
        since: Duration,
    },
    /// The store has not answered for `since`, beyond `max_store_staleness`: authorizing
    /// nothing.
    Stale {
        /// Since the store last answered.
        since: Duration,
    },
}

/// The cache's maps: hashed with foldhash, seeded at random per map. A server's start-up
/// builds them from every entry (with SipHash, std's default, hashing was a third of that);
/// the keys are ids the store made and SPIFFE IDs only administrators register.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// What the cache holds at one revision.
#[derive(Default)]
struct State {
    revision: u64,
    entries: Map<EntryId, Arc<RegistrationEntry>>,
    /// Parent ID -> the entries under it (often many: a B-tree set).
    by_parent: Map<SpiffeId, BTreeSet<EntryId>>,
    /// SPIFFE ID -> the entries granting it (usually one: a vector).
    by_spiffe_id: Map<SpiffeId, Vec<EntryId>>,
    /// The last [`RECENT_CHANGES`] changes, oldest first, ending at `revision`.
    recent: VecDeque<Arc<AppliedChange>>,
    /// Set while the follower cannot read the store.
    stale: bool,
}

/// The entries authorized for one agent, as of one revision of the cache.
#[derive(Debug, Default)]
pub(crate) struct Authorized {
    /// The cache revision this reflects.
    pub revision: u64,
    /// Entry id -> entry, as authorized: its `expires_at` is when its authorization ends, its
    /// own expiry or that of the parents and node aliases it is authorized through when sooner
    /// (see [`EntryCache::authorize`]).
    pub entries: BTreeMap<EntryId, Arc<RegistrationEntry>>,
    /// The parents whose children concern the agent: its ID, the SPIFFE IDs of its authorized
    /// entries that may parent others (not a session's) and of the node aliases below it, and
    /// for an agent with node selectors the server's ID (node aliases hang below it).
    pub reachable: HashSet<SpiffeId>,
    /// The earliest expiry among what the walk went through (the roots the matched node
    /// aliases make, the parents below them and the entries authorized): when the answer
    /// changes with no change to the store. `None` when none of them expires.
    pub next_expiry: Option<SystemTime>,
}

// === impl Authorized ===

impl Authorized {
    /// Takes an expiry (`None`: never) into [`Authorized::next_expiry`].
    fn expires(&mut self, at: Option<SystemTime>) {
        if let Some(at) = at {
            self.next_expiry = Some(self.next_expiry.map_or(at, |next| next.min(at)));
        }
    }
}

/// Who entries are authorized for: an agent's ID and the selectors its node attestation
/// found (x509pop's `x509pop:subject:cn:...`; none for join tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeAgent {
    /// The agent's ID.
    pub id: SpiffeId,
    /// Its node selectors.
    pub selectors: SelectorSet,
}

/// Tests name agents by ID alone; the daemon always passes the node's selectors too.
#[cfg(test)]
impl From<&SpiffeId> for NodeAgent {
    fn from(id: &SpiffeId) -> Self {
        Self {
            id: id.clone(),
            selectors: SelectorSet::new(),
        }
    }
}

/// A change as the cache applied it.
#[derive(Debug)]
pub(crate) struct AppliedChange {
    /// The change.
    pub change: Change,
    /// The keys of the parent the entry has after the change and, when the change gave it
    /// another one, of the parent it had before (a stream below that one must hear of the
    /// move too): the watches the change woke ([`EntryWatch::concerns`]).
    parents: (ParentKey, Option<ParentKey>),
}

/// The answer of [`EntryCache::changes_after`].
#[derive(Debug)]
pub(crate) enum Recent {
    /// The changes after the asked revision, oldest first (empty: up to date).
    Changes(Vec<Arc<AppliedChange>>),
    /// The cache no longer holds the changes right after the asked revision (or was reloaded
    /// since): compare with the current state instead.
    Gone,
    /// The cache is at an earlier revision than the asked one: it was reloaded from a store
    /// restored to an earlier point, where an id may be back at a revision the asker holds
    /// with other contents. Start over.
    WentBack,
}

/// Why the cache could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum EntryCacheError {
    /// The follower cannot read the store; nothing is authorized until it catches up.
    #[error("the entry cache is behind the store")]
    Stale,
}

// === impl EntryCache ===

impl std::fmt::Debug for EntryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.read();
        f.debug_struct("EntryCache")
            .field("revision", &state.revision)
            .field("entries", &state.entries.len())
            .field("stale", &state.stale)
            .finish_non_exhaustive()
    }
}

impl EntryCache {
    /// Loads every entry from a consistent snapshot of `store`. Call [`EntryCache::run`] to
    /// keep it current.
    ///
    /// # Errors
    ///
    /// The store's, when the snapshot cannot be read.
    pub(crate) async fn load(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let snapshot = store.snapshot_entries().await?;
        let state = State::from_snapshot(snapshot.revision, snapshot.entries);
        info!(
            entries = state.entries.len(),
            revision = state.revision,
            "entry cache loaded"
        );
        Ok(Arc::new(Self {
            store,
            state: RwLock::new(state),
            max_staleness: RwLock::new(Duration::ZERO),
            confirmed_at: RwLock::new(Instant::now()),
            degraded: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            watchers: Mutex::new(Watchers::default()),
            parent_keys: ParentKeys::default(),
        }))
    }

    /// A registration for one sync stream, under no parent yet (woken by reloads only until
    /// [`EntryWatch::set_parents`]).
    pub(crate) fn watch(self: &Arc<Self>) -> EntryWatch {
        let notify = Arc::new(Notify::new());
        let mut watchers = self.watchers();
        let id = watchers.next;
        watchers.next += 1;
        watchers.all.insert(id, Arc::clone(&notify));
        drop(watchers);
        EntryWatch {
            cache: Arc::clone(self),
            id,
            notify,
            parents: HashSet::default(),
        }
    }

    /// How many entries the cache holds.
    pub(crate) fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// The number of entries in the store, counted in the cache once it has applied every
    /// change the store has made durable (read-your-writes, as for an authorization): a count
    /// that does not walk the store. `None` when the store does not answer or the cache cannot
    /// catch up with it (each within [`STORE_ANSWER_TIMEOUT`]): the caller asks the store.
    pub(crate) async fn current_len(&self) -> Option<u64> {
        Some(self.current().await?.entries.len() as u64)
    }

    /// One page of the entries that pass `filter`, read through the cache's indexes when
    /// `filter` names a parent or a SPIFFE ID and the cache has applied every change the store
    /// has made durable (read-your-writes, as [`EntryCache::current_len`]). The page is the one
    /// [`Store::list_entries`] gives: entries in id order, its token the hex of the last id,
    /// so that a listing may go on from either. `None`: the caller asks the store (the filter
    /// names neither, or the cache cannot be brought up to date with the store).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidPageToken`] for a token that names no entry id.
    pub(crate) async fn list_current(
        &self,
        filter: &EntryFilter,
        page: &PageRequest,
    ) -> Option<Result<Page<RegistrationEntry>, StoreError>> {
        if filter.parent_id.is_none() && filter.spiffe_id.is_none() {
            return None;
        }
        let after = match entry_after(page.token.as_deref()) {
            Ok(after) => after,
            Err(e) => return Some(Err(e)),
        };
        let size = page.effective_size();
        // Shared entries under the lock; the copies the page hands out after it.
        let (listed, more) = self.current().await?.list(filter, after.as_ref(), size);
        let items: Vec<RegistrationEntry> = listed
            .iter()
            .map(|entry| RegistrationEntry::clone(entry))
            .collect();
        let next_page_token = match items.last() {
            Some(last) if more => Some(entry_page_token(&last.id)),
            _ => None,
        };
        Some(Ok(Page {
            items,
            next_page_token,
        }))
    }

    /// The state, once it has applied every change the store has made durable; `None` when
    /// the store does not answer or the cache cannot catch up with it (each within
    /// [`STORE_ANSWER_TIMEOUT`]).
    async fn current(&self) -> Option<RwLockReadGuard<'_, State>> {
        let durable = tokio::time::timeout(STORE_ANSWER_TIMEOUT, self.store.current_revision())
            .await
            .ok()?
            .ok()?;
        if self.revision() < durable {
            tokio::time::timeout(STORE_ANSWER_TIMEOUT, self.catch_up())
                .await
                .ok()?
                .ok()?;
        }
        let state = self.read();
        (state.revision >= durable).then_some(state)
    }

    /// True while the cache refuses to authorize: the follower cannot read the store and the
    /// store last answered longer than `max_store_staleness` ago. Cheap: open sync streams
    /// ask it to end themselves, so that their agents move to another server.
    pub(crate) fn is_refusing(&self) -> bool {
        self.read().stale && !self.within_grace()
    }

    /// Lets the cache authorize for up to `max` after the store last answered
    /// (`max_store_staleness`); zero (the default) refuses as soon as a read fails.
    pub(crate) fn set_max_staleness(&self, max: Duration) {
        *self
            .max_staleness
            .write()
            .unwrap_or_else(PoisonError::into_inner) = max;
    }

    /// How current the cache is: whether the store answered its last read, and if not, for
    /// how long it has not.
    pub(crate) async fn freshness(&self) -> Freshness {
        // The same path an authorization takes: catch up if behind, else judge the grace.
        let result = self.catch_up_if_behind().await;
        let since = self.unconfirmed_for();
        match result {
            Ok(()) if !self.degraded.load(Ordering::Relaxed) => Freshness::Current,
            Ok(()) => Freshness::Degraded { since },
            Err(EntryCacheError::Stale) => Freshness::Stale { since },
        }
    }

    /// Follows the store's change feed until `shutdown` turns true: every durable change is
    /// applied, in order, as soon as the store publishes it.
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Subscribed before the first catch-up, so no publication between the two is missed.
        let mut durable = self.store.subscribe();
        let mut retry = Duration::from_millis(100);
        loop {
            // A store that hangs (a database cut off without a reset) is a store that does not
            // answer: the follower must not wait on it for ever, or the cache would never be
            // marked stale.
            let caught_up = match tokio::time::timeout(FOLLOW_TIMEOUT, self.catch_up()).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Unavailable(format!(
                    "the store did not answer within {FOLLOW_TIMEOUT:?}"
                ))),
            };
            match caught_up {
                Ok(()) => retry = Duration::from_millis(100),
                Err(error) => {
                    if !std::mem::replace(&mut self.write().stale, true) {
                        warn!(
                            %error,
                            max_store_staleness = ?self.max_staleness(),
                            "entry cache cannot read the store; authorizing from what it holds \
                             for at most max_store_staleness after the store last answered, \
                             then nothing until it catches up"
                        );
                    }
                    // Says so when the grace runs out, whether or not anybody asks.
                    let _ = self.without_the_store();
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
            }
            tokio::select! {
                changed = durable.changed() => if changed.is_err() { return },
                // Reads the store now and then even when nothing is published, so that a
                // store that went away is noticed (and the grace judged) without a caller.
                () = tokio::time::sleep(FRESHNESS_CHECK) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Applies every durable change the cache has not applied yet. On error the cache keeps
    /// what it had applied (the follower marks it stale).
    async fn catch_up(&self) -> Result<(), StoreError> {
        loop {
            let revision = self.read().revision;
            match self.store.changes_since(revision, FOLLOW_BATCH).await? {
                ChangesSince::Changes(changes) if changes.is_empty() => {
                    self.confirm();
                    // Checked under the read lock first: the write lock only to clear it.
                    let stale = self.read().stale;
                    if stale && std::mem::replace(&mut self.write().stale, false) {
                        info!(revision, "entry cache caught up with the store");
                    }
                    return Ok(());
                }
                ChangesSince::Changes(changes) => {
                    let mut touched = HashSet::new();
                    let applied = self.write().apply(changes, &self.parent_keys, &mut touched);
                    // Woken for what was applied even when a gap stopped the batch (and the
                    // reload below, which wakes every stream, fails).
                    self.wake(&touched);
                    if applied.is_none() {
                        self.reload().await?;
                    }
                }
                // Fell behind the feed's retention (or the feed is not gap-free): start over.
                ChangesSince::Expired => self.reload().await?,
            }
        }
    }

    /// The revision the cache reflects.
    pub(crate) fn revision(&self) -> u64 {
        self.read().revision
    }

    /// The entries authorized for `agent` at `now`: parented to it or, recursively, to the
    /// SPIFFE ID of an authorized entry. Entries that expired at or before `now`, and entries
    /// for IDs the server reserves ([`policy::is_reserved`]), authorize nothing (nor anything
    /// below them). A privileged session's ID is never a parent (nothing below it is
    /// authorized), and a node alias (an entry with no selectors, made by a join token's
    /// `--spiffe-id`) is a parent only, never an identity issued to the agent's workloads.
    /// What sync streams send.
    ///
    /// Read-your-writes: when the store has durable changes the cache has not applied yet, it
    /// applies them first, so every write acknowledged before the call is reflected.
    ///
    /// # Errors
    ///
    /// [`EntryCacheError::Stale`] while the store cannot be read.
    pub(crate) async fn authorized(
        &self,
        agent: impl Into<NodeAgent>,
        now: SystemTime,
    ) -> Result<Authorized, EntryCacheError> {
        self.catch_up_if_behind().await?;
        self.authorized_now(agent, now)
    }

    /// The entries among `ids` that are authorized for `agent` at `now` (the rule of
    /// [`EntryCache::authorized`]), decided by walking up from the entry's parent to the agent
    /// rather than down from the agent through all its entries: what a signing call needs, at
    /// a cost that does not grow with the agent's other entries. Catches up first, as
    /// [`EntryCache::authorized`] does.
    ///
    /// Each entry comes with `expires_at` set to when its authorization ends, which is what
    /// caps the NotAfter of what is signed for it: its own expiry or, when sooner, that of the
    /// parents and node aliases it is authorized through (of the path that lasts longest when
    /// there are several). An SVID never outlives the chain that let it be issued.
    ///
    /// # Errors
    ///
    /// [`EntryCacheError::Stale`] while the store cannot be read.
    pub(crate) async fn authorize(
        &self,
        agent: impl Into<NodeAgent>,
        ids: &[EntryId],
        now: SystemTime,
    ) -> Result<HashMap<EntryId, Arc<RegistrationEntry>>, EntryCacheError> {
        let agent = agent.into();
        self.catch_up_if_behind().await?;
        Ok(self
            .read_fresh()?
            .authorize(&agent, ids, &|e| usable(e, now)))
    }

    /// Entry `id` if [`EntryCache::authorize`] authorizes it for `agent`.
    ///
    /// # Errors
    ///
    /// [`EntryCacheError::Stale`] while the store cannot be read.
    pub(crate) async fn authorize_one(
        &self,
        agent: impl Into<NodeAgent>,
        id: &EntryId,
        now: SystemTime,
    ) -> Result<Option<Arc<RegistrationEntry>>, EntryCacheError> {
        Ok(self
            .authorize(agent, std::slice::from_ref(id), now)
            .await?
            .remove(id))
    }

    /// Up to `limit` changes after `revision`, oldest first, from the recent changes held in
    /// memory.
    pub(crate) fn changes_after(&self, revision: u64, limit: usize) -> Recent {
        let state = self.read();
        if revision == state.revision {
            return Recent::Changes(Vec::new());
        }
        if revision > state.revision {
            return Recent::WentBack;
        }
        let Some(first) = state.recent.front().map(|c| c.change.revision) else {
            return Recent::Gone;
        };
        if revision + 1 < first {
            return Recent::Gone;
        }
        let skip = usize::try_from(revision + 1 - first).unwrap_or(usize::MAX);
        Recent::Changes(
            state
                .recent
                .iter()
                .skip(skip)
                .take(limit.max(1))
                .cloned()
                .collect(),
        )
    }

    // --- private ---

    /// [`EntryCache::authorized`] from what the cache holds now, without catching up.
    fn authorized_now(
        &self,
        agent: impl Into<NodeAgent>,
        now: SystemTime,
    ) -> Result<Authorized, EntryCacheError> {
        let agent = agent.into();
        Ok(self.read_fresh()?.authorized(&agent, &|e| usable(e, now)))
    }

    /// The state, unless the follower cannot read the store and the store last answered
    /// longer than `max_store_staleness` ago.
    fn read_fresh(&self) -> Result<RwLockReadGuard<'_, State>, EntryCacheError> {
        let state = self.read();
        if state.stale && !self.within_grace() {
            return Err(EntryCacheError::Stale);
        }
        Ok(state)
    }

    /// Applies what the store has made durable and the cache has not applied yet. When the
    /// store does not answer (within [`STORE_ANSWER_TIMEOUT`]), the cache answers from what it
    /// holds while within `max_store_staleness` of the store's last answer, else refuses.
    async fn catch_up_if_behind(&self) -> Result<(), EntryCacheError> {
        let answered =
            tokio::time::timeout(STORE_ANSWER_TIMEOUT, self.store.current_revision()).await;
        let durable = match answered {
            Ok(Ok(durable)) => durable,
            Ok(Err(_)) | Err(_) => return self.without_the_store(),
        };
        if self.revision() < durable
            && let Err(error) = self.catch_up().await
        {
            // The store answered, but the cache could not apply what it holds: the cache is
            // no more current than before, so the grace keeps counting from the last time it
            // was.
            warn!(%error, "entry cache cannot catch up with the store");
            return self.without_the_store();
        }
        // Only now is the cache as current as the store said.
        self.confirm();
        Ok(())
    }

    /// The store did not answer: go on from the cache within the grace, else refuse.
    fn without_the_store(&self) -> Result<(), EntryCacheError> {
        if self.within_grace() {
            if !self.degraded.swap(true, Ordering::Relaxed) {
                warn!(
                    unanswered_for = ?self.unconfirmed_for(),
                    max_store_staleness = ?self.max_staleness(),
                    "the store does not answer: authorizing from the entry cache"
                );
            }
            Ok(())
        } else {
            self.degraded.store(false, Ordering::Relaxed);
            if !self.refusing.swap(true, Ordering::Relaxed) {
                warn!(
                    unanswered_for = ?self.unconfirmed_for(),
                    "the store has not answered for longer than max_store_staleness: \
                     authorizing nothing until it does"
                );
            }
            Err(EntryCacheError::Stale)
        }
    }

    /// The store answered now.
    fn confirm(&self) {
        *self
            .confirmed_at
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        let was_degraded = self.degraded.swap(false, Ordering::Relaxed);
        if self.refusing.swap(false, Ordering::Relaxed) || was_degraded {
            info!("the store answers again");
        }
    }

    fn unconfirmed_for(&self) -> Duration {
        self.confirmed_at
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }

    fn max_staleness(&self) -> Duration {
        *self
            .max_staleness
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the store last answered within `max_store_staleness`.
    fn within_grace(&self) -> bool {
        let max = self.max_staleness();
        !max.is_zero() && self.unconfirmed_for() <= max
    }

    /// Replaces the whole state with a fresh snapshot of the store.
    async fn reload(&self) -> Result<(), StoreError> {
        let snapshot = self.store.snapshot_entries().await?;
        let fresh = State::from_snapshot(snapshot.revision, snapshot.entries);
        let revision = fresh.revision;
        {
            let mut state = self.write();
            let stale = state.stale;
            *state = fresh;
            state.stale = stale;
        }
        warn!(revision, "entry cache reloaded from a store snapshot");
        self.wake_all();
        Ok(())
    }

    /// Wakes the watches registered under any of `parents`.
    fn wake(&self, parents: &HashSet<ParentKey>) {
        let watchers = self.watchers();
        for parent in parents {
            for (_, notify) in watchers.by_parent.get(parent).into_iter().flatten() {
                notify.notify_one();
            }
        }
    }

    /// Wakes every watch (the whole state was replaced).
    fn wake_all(&self) {
        for notify in self.watchers().all.values() {
            notify.notify_one();
        }
    }

    fn watchers(&self) -> MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Watchers ===

impl Watchers {
    /// Takes watch `id` off the list of `parent`.
    fn unregister(&mut self, parent: ParentKey, id: u64) {
        if let Some(watches) = self.by_parent.get_mut(&parent) {
            watches.retain(|(watch, _)| *watch != id);
            if watches.is_empty() {
                self.by_parent.remove(&parent);
            }
        }
    }
}

// === impl EntryWatch ===

impl EntryWatch {
    /// Registers the watch under `parents` (replacing what it was registered under): changes
    /// to entries below them wake it from now on, and no others do. Register before reading
    /// the changes the new parents may concern (see [`EntryWatch`]).
    pub(crate) fn set_parents(&mut self, parents: HashSet<SpiffeId>) {
        let parents: HashSet<ParentKey, _> = parents
            .iter()
            .map(|parent| self.cache.parent_keys.key(parent))
            .collect();
        let mut watchers = self.cache.watchers();
        for gone in self.parents.difference(&parents) {
            watchers.unregister(*gone, self.id);
        }
        for new in parents.difference(&self.parents) {
            watchers
                .by_parent
                .entry(*new)
                .or_default()
                .push((self.id, Arc::clone(&self.notify)));
        }
        drop(watchers);
        self.parents = parents;
    }

    /// Whether `change` woke this watch (or would have, had it been registered as it is now):
    /// the entry's parent after the change, or before it, is one the watch is registered under
    /// (or shares its key: see [`ParentKey`]).
    pub(crate) fn concerns(&self, change: &AppliedChange) -> bool {
        let (now, before) = change.parents;
        self.parents.contains(&now) || before.is_some_and(|key| self.parents.contains(&key))
    }

    /// Whether changes to entries below `parent` wake this watch.
    #[cfg(test)]
    fn covers(&self, parent: &SpiffeId) -> bool {
        self.parents.contains(&self.cache.parent_keys.key(parent))
    }

    /// Resolves once a change that concerns the watch was applied (at once when one was
    /// applied since the last call resolved).
    pub(crate) async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for EntryWatch {
    fn drop(&mut self) {
        let mut watchers = self.cache.watchers();
        watchers.all.remove(&self.id);
        for parent in &self.parents {
            watchers.unregister(*parent, self.id);
        }
    }
}

impl std::fmt::Debug for EntryWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryWatch")
            .field("id", &self.id)
            .field("parents", &self.parents.len())
            .finish_non_exhaustive()
    }
}

/// The two index maps of a [`State`], built apart from its id map.
struct Indexes {
    by_parent: Map<SpiffeId, BTreeSet<EntryId>>,
    by_spiffe_id: Map<SpiffeId, Vec<EntryId>>,
}

// === impl Indexes ===

impl Indexes {
    /// The indexes of `entries`, each id given once.
    fn of(entries: &[Arc<RegistrationEntry>]) -> Self {
        let mut indexes = Self {
            by_parent: Map::default(),
            by_spiffe_id: Map::with_capacity_and_hasher(entries.len(), Default::default()),
        };
        for entry in entries {
            index(&mut indexes.by_parent, &mut indexes.by_spiffe_id, entry);
        }
        indexes
    }
}

/// Adds `entry` to the two indexes (its id must not be in them yet).
fn index(
    by_parent: &mut Map<SpiffeId, BTreeSet<EntryId>>,
    by_spiffe_id: &mut Map<SpiffeId, Vec<EntryId>>,
    entry: &RegistrationEntry,
) {
    // The keys are copied only when new (most entries share their parent).
    match by_parent.get_mut(&entry.parent_id) {
        Some(ids) => {
            ids.insert(entry.id.clone());
        }
        None => {
            by_parent.insert(entry.parent_id.clone(), BTreeSet::from([entry.id.clone()]));
        }
    }
    match by_spiffe_id.get_mut(&entry.spiffe_id) {
        Some(ids) => ids.push(entry.id.clone()),
        None => {
            by_spiffe_id.insert(entry.spiffe_id.clone(), vec![entry.id.clone()]);
        }
    }
}

// === impl State ===

impl State {
    /// The state holding `entries` at `revision`. A server's start-up waits for this with
    /// every entry, so the id map is built on this thread and the two indexes on another
    /// (a snapshot holds each id once: the three maps do not depend on one another).
    fn from_snapshot(revision: u64, entries: Vec<RegistrationEntry>) -> Self {
        let entries: Vec<Arc<RegistrationEntry>> = entries.into_iter().map(Arc::new).collect();
        let (by_id, indexes) = std::thread::scope(|scope| {
            let indexes = std::thread::Builder::new()
                .name("sigil-entry-index".to_owned())
                .spawn_scoped(scope, || Indexes::of(&entries));
            let mut by_id = Map::with_capacity_and_hasher(entries.len(), Default::default());
            by_id.extend(
                entries
                    .iter()
                    .map(|entry| (entry.id.clone(), Arc::clone(entry))),
            );
            // No thread (or one that failed): the indexes are built here below.
            (by_id, indexes.ok().and_then(|thread| thread.join().ok()))
        });
        if by_id.len() != entries.len() {
            // An id given twice (no store's snapshot does that): the later one wins, as the
            // changes are applied.
            let mut state = Self {
                revision,
                ..Self::default()
            };
            for entry in entries {
                state.put(entry);
            }
            return state;
        }
        let Indexes {
            by_parent,
            by_spiffe_id,
        } = indexes.unwrap_or_else(|| Indexes::of(&entries));
        Self {
            revision,
            entries: by_id,
            by_parent,
            by_spiffe_id,
            ..Self::default()
        }
    }

    /// Applies `changes` in order; returns the new revision, or `None` (nothing applied past
    /// the break) when they do not follow on from the cache's revision without a gap. Adds to
    /// `touched` the keys of the parent each changed entry had before the change and has
    /// after it.
    fn apply(
        &mut self,
        changes: Vec<Change>,
        parent_keys: &ParentKeys,
        touched: &mut HashSet<ParentKey>,
    ) -> Option<u64> {
        for change in changes {
            if change.revision <= self.revision {
                // Applied already (a concurrent catch-up read the same changes).
                continue;
            }
            if change.revision != self.revision + 1 {
                debug!(
                    have = self.revision,
                    got = change.revision,
                    "change feed gap: reloading"
                );
                return None;
            }
            let (entry, old) = match &change.kind {
                ChangeKind::EntryUpserted(entry) => (entry, self.put(Arc::new(entry.clone()))),
                ChangeKind::EntryDeleted(entry) => (entry, self.remove(&entry.id)),
            };
            let parents = (
                parent_keys.key(&entry.parent_id),
                old.filter(|old| old.parent_id != entry.parent_id)
                    .map(|old| parent_keys.key(&old.parent_id)),
            );
            touched.insert(parents.0);
            touched.extend(parents.1);
            self.revision = change.revision;
            self.recent
                .push_back(Arc::new(AppliedChange { change, parents }));
            if self.recent.len() > RECENT_CHANGES {
                self.recent.pop_front();
            }
        }
        Some(self.revision)
    }

    /// Up to `size` entries that pass `filter`, after the id `after`, in id order, through the
    /// index of the filter's parent or else of its SPIFFE ID (the caller checked it names one),
    /// and whether more pass after them.
    fn list(
        &self,
        filter: &EntryFilter,
        after: Option<&EntryId>,
        size: usize,
    ) -> (Vec<Arc<RegistrationEntry>>, bool) {
        let ids: Box<dyn Iterator<Item = &EntryId> + '_> =
            match (&filter.parent_id, &filter.spiffe_id) {
                // A B-tree set: walked from the token on, no further than the page needs.
                (Some(parent), _) => match self.by_parent.get(parent) {
                    Some(ids) => Box::new(ids.range((
                        after.map_or(Bound::Unbounded, Bound::Excluded),
                        Bound::Unbounded,
                    ))),
                    None => Box::new(std::iter::empty()),
                },
                // Usually one id: sorted here.
                (None, Some(spiffe_id)) => {
                    let mut ids: Vec<&EntryId> = self
                        .by_spiffe_id
                        .get(spiffe_id)
                        .map(|ids| {
                            ids.iter()
                                .filter(|id| after.is_none_or(|a| *id > a))
                                .collect()
                        })
                        .unwrap_or_default();
                    ids.sort_unstable();
                    Box::new(ids.into_iter())
                }
                (None, None) => Box::new(std::iter::empty()),
            };
        let mut items = Vec::new();
        for entry in ids.filter_map(|id| self.entries.get(id)) {
            if !filter.matches(entry) {
                continue;
            }
            if items.len() == size {
                return (items, true);
            }
            items.push(Arc::clone(entry));
        }
        (items, false)
    }

    /// Holds `entry`; returns the entry it replaced.
    fn put(&mut self, entry: Arc<RegistrationEntry>) -> Option<Arc<RegistrationEntry>> {
        let old = self.remove(&entry.id);
        index(&mut self.by_parent, &mut self.by_spiffe_id, &entry);
        self.entries.insert(entry.id.clone(), entry);
        old
    }

    /// Drops entry `id`; returns it.
    fn remove(&mut self, id: &EntryId) -> Option<Arc<RegistrationEntry>> {
        let old = self.entries.remove(id)?;
        if let Some(ids) = self.by_parent.get_mut(&old.parent_id) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_parent.remove(&old.parent_id);
            }
        }
        if let Some(ids) = self.by_spiffe_id.get_mut(&old.spiffe_id) {
            ids.retain(|other| other != id);
            if ids.is_empty() {
                self.by_spiffe_id.remove(&old.spiffe_id);
            }
        }
        Some(old)
    }

    /// The walk down from `agent` (see [`EntryCache::authorized`]); `usable` says which entries
    /// count at all.
    fn authorized(
        &self,
        agent: &NodeAgent,
        usable: &dyn Fn(&RegistrationEntry) -> bool,
    ) -> Authorized {
        let mut out = Authorized {
            revision: self.revision,
            ..Authorized::default()
        };
        if !agent.selectors.is_empty()
            && let Ok(server) = policy::server_id(&agent.id.trust_domain())
        {
            // Node aliases hang below the server's ID: a change there concerns this agent.
            out.reachable.insert(server);
        }
        // Down from the roots, the IDs whose chains last longest first (as `reach` goes up):
        // each ID is walked from once, with the latest end any chain to it has.
        let roots = self.root_ends(agent, usable);
        let mut best: Map<&SpiffeId, Until> = Map::default();
        let mut frontier = Frontier::default();
        for (root, end) in &roots {
            // When a root's last alias expires, the root goes.
            out.expires(end.0);
            best.insert(root, *end);
            frontier.push(*end, root);
        }
        while let Some((end, parent)) = frontier.pop() {
            if best.get(parent).is_some_and(|better| *better > end) {
                continue; // reached again since with a later end
            }
            for entry in self.children(parent) {
                if !usable(entry) {
                    continue;
                }
                if is_parent(entry) || is_issued(entry) {
                    out.expires(entry.expires_at);
                }
                let entry_end = end.min(Until(entry.expires_at));
                let id = &entry.spiffe_id;
                if is_parent(entry) && best.get(id).is_none_or(|known| entry_end > *known) {
                    best.insert(id, entry_end);
                    frontier.push(entry_end, id);
                }
                if is_issued(entry) {
                    out.entries
                        .insert(entry.id.clone(), capped(entry, entry_end));
                }
            }
        }
        // Every ID reached was walked from: the parents whose children concern the agent.
        out.reachable.extend(best.into_keys().cloned());
        out
    }

    /// The walk up from each entry (see [`EntryCache::authorize`]); each parent is walked
    /// from once.
    fn authorize(
        &self,
        agent: &NodeAgent,
        ids: &[EntryId],
        usable: &dyn Fn(&RegistrationEntry) -> bool,
    ) -> HashMap<EntryId, Arc<RegistrationEntry>> {
        let roots = self.root_ends(agent, usable);
        let mut ends: HashMap<&SpiffeId, Option<Until>> = HashMap::new();
        ids.iter()
            .filter_map(|id| self.entries.get(id).filter(|e| usable(e) && is_issued(e)))
            .filter_map(|entry| {
                let chain = *ends
                    .entry(&entry.parent_id)
                    .or_insert_with(|| self.reach(&entry.parent_id, &roots, usable));
                let entry = capped(entry, chain?);
                Some((entry.id.clone(), entry))
            })
            .collect()
    }

    /// The IDs an agent's entries may hang below, each with when it stops being one: the
    /// agent's own (never), and those of the node aliases its node selectors match (the expiry
    /// of the matched alias of that ID that lasts longest).
    fn root_ends(
        &self,
        agent: &NodeAgent,
        usable: &dyn Fn(&RegistrationEntry) -> bool,
    ) -> HashMap<SpiffeId, Until> {
        let mut roots = HashMap::from([(agent.id.clone(), Until::NEVER)]);
        for alias in self.matched_aliases(agent, usable) {
            let end = Until(alias.expires_at);
            roots
                .entry(alias.spiffe_id.clone())
                .and_modify(|until| *until = (*until).max(end))
                .or_insert(end);
        }
        roots
    }

    /// The node aliases `agent`'s node selectors match: usable entries parented to the
    /// server's ID, every selector of which the node has (none for an agent without node
    /// selectors).
    fn matched_aliases<'a>(
        &'a self,
        agent: &'a NodeAgent,
        usable: &'a dyn Fn(&RegistrationEntry) -> bool,
    ) -> impl Iterator<Item = &'a Arc<RegistrationEntry>> {
        let server = (!agent.selectors.is_empty())
            .then(|| policy::server_id(&agent.id.trust_domain()).ok())
            .flatten();
        server
            .into_iter()
            .flat_map(|server| self.children(&server))
            .filter(move |alias| usable(alias) && alias.selectors.matches(&agent.selectors))
    }

    /// When the authorization of what hangs below `from` ends, if one of `roots` is `from` or
    /// an ancestor of it: there is a chain of usable entries, each granting the ID that is the
    /// next one's parent, from one parented to a root down to one granting `from`. The chain
    /// ends with the soonest expiry along it (its root's included); of several chains, the one
    /// that ends last counts. Up the entries granting each ID, the longest-lasting chains
    /// first: an end only gets shorter along a chain, so an ID is walked from at most once,
    /// with the latest end any chain reaches it with (cycles end). `None`: not authorized.
    fn reach(
        &self,
        from: &SpiffeId,
        roots: &HashMap<SpiffeId, Until>,
        usable: &dyn Fn(&RegistrationEntry) -> bool,
    ) -> Option<Until> {
        if roots.get(from) == Some(&Until::NEVER) {
            return Some(Until::NEVER); // nothing lasts longer (the usual case: the agent's ID)
        }
        let mut best: Map<&SpiffeId, Until> = Map::default();
        best.insert(from, Until::NEVER);
        let mut frontier = Frontier::default();
        frontier.push(Until::NEVER, from);
        let mut found: Option<Until> = None;
        while let Some((end, id)) = frontier.pop() {
            if best.get(id).is_some_and(|better| *better > end) {
                continue; // reached again since with a later end
            }
            if found.is_some_and(|found| found >= end) {
                break; // every chain left ends sooner than one found
            }
            if let Some(root) = roots.get(id) {
                let chain = end.min(*root);
                found = Some(found.map_or(chain, |found| found.max(chain)));
            }
            let granting = self.by_spiffe_id.get(id).into_iter().flatten();
            for entry in granting.filter_map(|e| self.entries.get(e)) {
                if !usable(entry) || !is_parent(entry) {
                    continue;
                }
                let next = end.min(Until(entry.expires_at));
                let parent = &entry.parent_id;
                if best.get(parent).is_none_or(|known| next > *known) {
                    best.insert(parent, next);
                    frontier.push(next, parent);
                }
            }
        }
        found
    }

    fn children<'a>(
        &'a self,
        parent: &SpiffeId,
    ) -> impl Iterator<Item = &'a Arc<RegistrationEntry>> + use<'a> {
        self.by_parent
            .get(parent)
            .into_iter()
            .flatten()
            .filter_map(|id| self.entries.get(id))
    }
}

/// `entry`, or a copy of it that ends at `end` when its authorization (`end`, the chain it is
/// authorized through) ends sooner than the entry does.
fn capped(entry: &Arc<RegistrationEntry>, end: Until) -> Arc<RegistrationEntry> {
    if end < Until(entry.expires_at) {
        let mut capped = RegistrationEntry::clone(entry);
        capped.expires_at = end.0;
        Arc::new(capped)
    } else {
        Arc::clone(entry)
    }
}

/// What a walk along chains of entries goes on from, the latest-ending first. An end only
/// gets shorter along a chain, so the first time an item comes out it comes with the latest
/// end any chain reaches it with. Those that never end go first, in the order they came (nothing
/// outlasts them: the usual case, walked breadth first without the heap).
struct Frontier<T> {
    lasting: VecDeque<T>,
    ending: std::collections::BinaryHeap<(Until, T)>,
}

impl<T: Ord> Default for Frontier<T> {
    fn default() -> Self {
        Self {
            lasting: VecDeque::new(),
            ending: std::collections::BinaryHeap::new(),
        }
    }
}

impl<T: Ord> Frontier<T> {
    fn push(&mut self, end: Until, item: T) {
        if end == Until::NEVER {
            self.lasting.push_back(item);
        } else {
            self.ending.push((end, item));
        }
    }

    fn pop(&mut self) -> Option<(Until, T)> {
        match self.lasting.pop_front() {
            Some(item) => Some((Until::NEVER, item)),
            None => self.ending.pop(),
        }
    }
}

/// When something ends: `Until(None)` never, and later than any time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Until(Option<SystemTime>);

impl Until {
    const NEVER: Self = Self(None);
}

impl Ord for Until {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self.0, other.0) {
            (None, None) => std::cmp::Ordering::Equal,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(_), None) => std::cmp::Ordering::Less,
            (Some(a), Some(b)) => a.cmp(&b),
        }
    }
}

impl PartialOrd for Until {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// An entry counts for authorization at `now` unless it expired or grants a reserved ID.
fn usable(entry: &RegistrationEntry, now: SystemTime) -> bool {
    entry.expires_at.is_none_or(|at| at > now) && !policy::is_reserved(&entry.spiffe_id)
}

/// Whether the ID an entry grants can parent other entries: not a privileged session's (a
/// session is bound to one task, approved for itself; nothing may hang below it).
fn is_parent(entry: &RegistrationEntry) -> bool {
    entry.session_id.is_none()
}

/// Whether an entry's ID is issued to workloads: not a node alias (no selectors: it would match
/// every workload of the node), which only names the agent as a parent.
fn is_issued(entry: &RegistrationEntry) -> bool {
    !entry.selectors.is_empty()
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use sigil_core::Selector;

    use super::*;
    use crate::store::NewEntry;
    use crate::store::sled::{SledStore, SledStoreOptions};

    const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/a";
    const OTHER_AGENT: &str = "spiffe://example.org/sigil/agent/join_token/b";

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn new_entry(spiffe_id: &str, parent: &str) -> NewEntry {
        NewEntry::new(
            id(spiffe_id),
            id(parent),
            [Selector::parse("unix:uid:1").unwrap()]
                .into_iter()
                .collect::<SelectorSet>(),
        )
    }

    fn open(dir: &std::path::Path, retention: u64) -> Arc<SledStore> {
        Arc::new(
            SledStore::open(
                dir,
                SledStoreOptions {
                    change_retention: retention,
                    ..SledStoreOptions::default()
                },
            )
            .unwrap(),
        )
    }

    fn granted(cache: &EntryCache, agent: &str) -> Vec<String> {
        let mut ids: Vec<String> = cache
            .authorized_now(&id(agent), SystemTime::now())
            .unwrap()
            .entries
            .values()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        ids.sort_unstable();
        ids
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_aliases_are_parents_only_and_sessions_parent_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        // The alias a join token's --spiffe-id makes: no selectors.
        let alias = store
            .create_entry(NewEntry::new(
                id("spiffe://example.org/node/web-1"),
                id(AGENT),
                SelectorSet::default(),
            ))
            .await
            .unwrap();
        let below_alias = store
            .create_entry(new_entry(
                "spiffe://example.org/web",
                "spiffe://example.org/node/web-1",
            ))
            .await
            .unwrap();
        // A session's entry, and one an admin parented to the session's ID.
        let mut session = new_entry("spiffe://example.org/admin/db-migrate", AGENT);
        session.session_id = Some(crate::store::SessionId::generate().unwrap());
        let session = store.create_entry(session).await.unwrap();
        let below_session = store
            .create_entry(new_entry(
                "spiffe://example.org/escalated",
                "spiffe://example.org/admin/db-migrate",
            ))
            .await
            .unwrap();
        let cache = EntryCache::load(store.clone()).await.unwrap();
        let now = SystemTime::now();

        // Walking down: the alias's child and the session entry, not the alias itself nor
        // anything below the session.
        assert_eq!(
            granted(&cache, AGENT),
            [
                "spiffe://example.org/admin/db-migrate",
                "spiffe://example.org/web"
            ]
        );
        // Walking up (what signing asks): the same answer.
        let ids = [
            alias.id.clone(),
            below_alias.id.clone(),
            session.id.clone(),
            below_session.id.clone(),
        ];
        let mut signed: Vec<String> = cache
            .authorize(&id(AGENT), &ids, now)
            .await
            .unwrap()
            .values()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        signed.sort_unstable();
        assert_eq!(
            signed,
            [
                "spiffe://example.org/admin/db-migrate",
                "spiffe://example.org/web"
            ]
        );
        assert!(
            cache
                .authorize_one(&id(AGENT), &alias.id, now)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            cache
                .authorize_one(&id(AGENT), &below_session.id, now)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_selector_aliases_authorize_what_hangs_below_them_for_matching_nodes_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        let sel = |s: &str| Selector::parse(s).unwrap();
        // A node alias: parented to the server, picking nodes by their x509pop selectors.
        let alias = store
            .create_entry(NewEntry::new(
                id("spiffe://example.org/nodes/web"),
                id("spiffe://example.org/sigil/server"),
                [sel("x509pop:san:dns:web.example.org")]
                    .into_iter()
                    .collect(),
            ))
            .await
            .unwrap();
        let below = store
            .create_entry(new_entry(
                "spiffe://example.org/web-frontend",
                "spiffe://example.org/nodes/web",
            ))
            .await
            .unwrap();
        let cache = EntryCache::load(store.clone()).await.unwrap();
        let now = SystemTime::now();
        let node = |selectors: &[&str]| NodeAgent {
            id: id(AGENT),
            selectors: selectors.iter().map(|s| sel(s)).collect(),
        };
        let web = node(&["x509pop:san:dns:web.example.org", "x509pop:subject:cn:web"]);
        let db = node(&["x509pop:san:dns:db.example.org"]);

        // Walking down: the entry below the alias, never the alias itself.
        let granted: Vec<String> = cache
            .authorized(web.clone(), now)
            .await
            .unwrap()
            .entries
            .values()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        assert_eq!(granted, ["spiffe://example.org/web-frontend"]);
        // A changed alias concerns this agent's sync stream.
        let reachable = cache.authorized(web.clone(), now).await.unwrap().reachable;
        assert!(reachable.contains(&id("spiffe://example.org/sigil/server")));
        // Another node, and an agent without node selectors (a join token): nothing.
        for other in [db.clone(), node(&[])] {
            assert!(
                cache
                    .authorized(other, now)
                    .await
                    .unwrap()
                    .entries
                    .is_empty()
            );
        }
        // Walking up (what signing asks) agrees.
        let ids = [alias.id.clone(), below.id.clone()];
        let signed: Vec<EntryId> = cache
            .authorize(web.clone(), &ids, now)
            .await
            .unwrap()
            .into_keys()
            .collect();
        assert_eq!(signed, std::slice::from_ref(&below.id));
        assert!(cache.authorize(db, &ids, now).await.unwrap().is_empty());
        assert!(
            cache
                .authorize_one(&id(AGENT), &below.id, now)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_expiry_is_the_earliest_among_what_the_walk_went_through_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        let now = SystemTime::now();
        let at = |secs: u64| now + Duration::from_secs(secs);
        let sel = |s: &str| Selector::parse(s).unwrap();
        let create = |mut entry: NewEntry, expires_at: SystemTime| {
            entry.expires_at = Some(expires_at);
            let store = store.clone();
            async move { store.create_entry(entry).await.unwrap() }
        };
        // For this agent: an entry (in 300 s), a parent (in 200 s) with an entry below it.
        create(new_entry("spiffe://example.org/mine", AGENT), at(300)).await;
        let team = NewEntry::new(
            id("spiffe://example.org/team"),
            id(AGENT),
            SelectorSet::new(),
        );
        create(team, at(200)).await;
        create(
            new_entry("spiffe://example.org/below", "spiffe://example.org/team"),
            at(400),
        )
        .await;
        // Not walked for it: another agent's entry, a node alias for other nodes, an entry
        // below a parent nobody grants (all sooner).
        create(
            new_entry("spiffe://example.org/theirs", OTHER_AGENT),
            at(10),
        )
        .await;
        let db = NewEntry::new(
            id("spiffe://example.org/nodes/db"),
            id("spiffe://example.org/sigil/server"),
            [sel("x509pop:subject:cn:db")].into_iter().collect(),
        );
        create(db, at(20)).await;
        create(
            new_entry("spiffe://example.org/orphan", "spiffe://example.org/nobody"),
            at(30),
        )
        .await;
        let cache = EntryCache::load(store.clone()).await.unwrap();
        let agent = |selectors: &[&str]| NodeAgent {
            id: id(AGENT),
            selectors: selectors.iter().map(|s| sel(s)).collect(),
        };
        let next = |agent: NodeAgent| {
            let cache = &cache;
            async move { cache.authorized(agent, now).await.unwrap().next_expiry }
        };
        assert_eq!(next(agent(&[])).await, Some(at(200)));
        assert_eq!(
            next(agent(&["x509pop:subject:cn:web"])).await,
            Some(at(200))
        );
        // A node alias the agent matches counts, though nothing hangs below it.
        let web = NewEntry::new(
            id("spiffe://example.org/nodes/web"),
            id("spiffe://example.org/sigil/server"),
            [sel("x509pop:subject:cn:web")].into_iter().collect(),
        );
        create(web, at(100)).await;
        assert_eq!(
            next(agent(&["x509pop:subject:cn:web"])).await,
            Some(at(100))
        );
        assert_eq!(next(agent(&[])).await, Some(at(200)));
        // Nothing that expires: none.
        assert_eq!(
            cache
                .authorized(&id("spiffe://example.org/sigil/agent/join_token/c"), now)
                .await
                .unwrap()
                .next_expiry,
            None
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_is_signed_for_an_entry_ends_with_the_chain_that_authorizes_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        let now = SystemTime::now();
        let at = |secs: u64| Some(now + Duration::from_secs(secs));
        let sel = |s: &str| Selector::parse(s).unwrap();
        let create = |spiffe_id: &str, parent: &str, selectors: &[&str], expires_at| {
            let mut entry = NewEntry::new(
                id(spiffe_id),
                id(parent),
                selectors.iter().map(|s| sel(s)).collect(),
            );
            entry.expires_at = expires_at;
            let store = store.clone();
            async move { store.create_entry(entry).await.unwrap().id }
        };
        let uid = ["unix:uid:1"];
        // Below a parent that ends in 200 s: capped there, whether the entry ends later or never.
        create("spiffe://example.org/team", AGENT, &[], at(200)).await;
        let later = create(
            "spiffe://example.org/a",
            "spiffe://example.org/team",
            &uid,
            at(400),
        );
        let later = later.await;
        let never = create(
            "spiffe://example.org/b",
            "spiffe://example.org/team",
            &uid,
            None,
        );
        let never = never.await;
        // Its own expiry when that is sooner.
        let sooner = create(
            "spiffe://example.org/c",
            "spiffe://example.org/team",
            &uid,
            at(50),
        );
        let sooner = sooner.await;
        // Directly below the agent: its own.
        let direct = create("spiffe://example.org/d", AGENT, &uid, at(300)).await;
        // Two node aliases of one ID that the node matches, ending in 100 and 150 s: the later.
        let server = "spiffe://example.org/sigil/server";
        create(
            "spiffe://example.org/nodes/web",
            server,
            &["x509pop:subject:cn:web"],
            at(100),
        )
        .await;
        let web_selectors = ["x509pop:subject:cn:web", "x509pop:san:dns:web"];
        create(
            "spiffe://example.org/nodes/web",
            server,
            &web_selectors,
            at(150),
        )
        .await;
        let on_web = create(
            "spiffe://example.org/e",
            "spiffe://example.org/nodes/web",
            &uid,
            None,
        );
        let on_web = on_web.await;
        // A cycle of parents nobody roots, with an entry below it: never authorized.
        create(
            "spiffe://example.org/x",
            "spiffe://example.org/y",
            &[],
            None,
        )
        .await;
        create(
            "spiffe://example.org/y",
            "spiffe://example.org/x",
            &[],
            None,
        )
        .await;
        let cycle = create(
            "spiffe://example.org/f",
            "spiffe://example.org/x",
            &uid,
            None,
        )
        .await;
        let cache = EntryCache::load(store.clone()).await.unwrap();
        let agent = NodeAgent {
            id: id(AGENT),
            selectors: web_selectors.iter().map(|s| sel(s)).collect(),
        };
        let ids = [&later, &never, &sooner, &direct, &on_web, &cycle].map(|id| id.clone());
        let ends = |granted: HashMap<EntryId, Arc<RegistrationEntry>>| {
            ids.iter()
                .map(|id| granted.get(id).map(|e| e.expires_at))
                .collect::<Vec<_>>()
        };
        // The walk down (what sync streams send) agrees with the walk up (what is signed).
        let down = |cache: &EntryCache, agent: &NodeAgent| {
            let granted = cache.authorized_now(agent.clone(), now).unwrap().entries;
            ends(granted.into_iter().collect())
        };
        let granted = cache.authorize(agent.clone(), &ids, now).await.unwrap();
        let expected = [
            Some(at(200)),
            Some(at(200)),
            Some(at(50)),
            Some(at(300)),
            Some(at(150)),
            None,
        ];
        assert_eq!(ends(granted), expected);
        assert_eq!(down(&cache, &agent), expected);

        // A second, lasting path to the parent: the entries below it end with their own. So
        // does a lasting path to the node alias's ID (a root reached from below is walked on
        // up).
        create("spiffe://example.org/team", AGENT, &["unix:uid:2"], None).await;
        create(
            "spiffe://example.org/nodes/web",
            AGENT,
            &["unix:uid:3"],
            None,
        )
        .await;
        let granted = cache.authorize(agent.clone(), &ids, now).await.unwrap();
        let expected = [
            Some(at(400)),
            Some(None),
            Some(at(50)),
            Some(at(300)),
            Some(None),
            None,
        ];
        assert_eq!(ends(granted), expected);
        assert_eq!(down(&cache, &agent), expected);
        // The store's own entries are untouched.
        assert_eq!(
            store.get_entry(&never).await.unwrap().unwrap().expires_at,
            None
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_creates_nesting_moves_expiry_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        store
            .create_entry(new_entry("spiffe://example.org/before", AGENT))
            .await
            .unwrap();
        let cache = EntryCache::load(store.clone()).await.unwrap();
        assert_eq!(granted(&cache, AGENT), ["spiffe://example.org/before"]);
        assert_eq!(cache.revision(), 1);

        // A nested entry, through an alias; another agent's entry; an expired one.
        store
            .create_entry(new_entry("spiffe://example.org/alias", AGENT))
            .await
            .unwrap();
        let nested = store
            .create_entry(new_entry(
                "spiffe://example.org/nested",
                "spiffe://example.org/alias",
            ))
            .await
            .unwrap();
        store
            .create_entry(new_entry("spiffe://example.org/theirs", OTHER_AGENT))
            .await
            .unwrap();
        let mut expired = new_entry("spiffe://example.org/expired", AGENT);
        expired.expires_at = Some(UNIX_EPOCH + Duration::from_secs(1));
        store.create_entry(expired).await.unwrap();
        // Not applied until the cache catches up (no follower runs here)...
        assert_eq!(granted(&cache, AGENT), ["spiffe://example.org/before"]);
        // ...but an authorization catches up first: every acknowledged write counts.
        let authorized = cache
            .authorized(&id(AGENT), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(authorized.revision, 5);
        assert_eq!(authorized.entries.len(), 3);
        assert_eq!(cache.revision(), 5);
        assert_eq!(
            granted(&cache, AGENT),
            [
                "spiffe://example.org/alias",
                "spiffe://example.org/before",
                "spiffe://example.org/nested"
            ]
        );
        assert_eq!(
            granted(&cache, OTHER_AGENT),
            ["spiffe://example.org/theirs"]
        );
        // An excluded entry authorizes nothing, nor anything below it.
        let now = SystemTime::now();
        let without_alias = cache
            .read_fresh()
            .unwrap()
            .authorized(&(&id(AGENT)).into(), &|e| {
                usable(e, now) && e.spiffe_id.path() != "/alias"
            });
        assert_eq!(without_alias.entries.len(), 1);

        // The nested entry moves to the other agent: the old parent's index forgets it.
        store
            .update_entry(
                &nested.id,
                new_entry("spiffe://example.org/nested", OTHER_AGENT),
            )
            .await
            .unwrap();
        cache.catch_up().await.unwrap();
        assert_eq!(
            granted(&cache, AGENT),
            ["spiffe://example.org/alias", "spiffe://example.org/before"]
        );
        assert_eq!(
            granted(&cache, OTHER_AGENT),
            ["spiffe://example.org/nested", "spiffe://example.org/theirs"]
        );
        store.delete_entry(&nested.id).await.unwrap();
        cache.catch_up().await.unwrap();
        assert_eq!(
            granted(&cache, OTHER_AGENT),
            ["spiffe://example.org/theirs"]
        );
        assert_eq!(cache.read().entries.len(), 4);

        // The cache equals a fresh load of the store.
        let fresh = EntryCache::load(store.clone()).await.unwrap();
        assert_eq!(fresh.revision(), cache.revision());
        for agent in [AGENT, OTHER_AGENT] {
            assert_eq!(granted(&fresh, agent), granted(&cache, agent));
        }
    }

    /// Entries over a handful of IDs, each parented to the agent or to one of those IDs
    /// (chains, aliases, duplicates, cycles), some expired, one ID excluded: the walk up from
    /// each entry authorizes exactly what the walk down from the agent does.
    mod walks {
        use proptest::prelude::*;

        use super::*;

        fn node(i: u8) -> SpiffeId {
            if i == 6 {
                id(AGENT)
            } else {
                id(&format!("spiffe://example.org/n{i}"))
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            #[test]
            fn walking_up_and_walking_down_agree(
                specs in proptest::collection::vec((0..6u8, 0..7u8, 0..4u8), 0..16)
            ) {
                let now = SystemTime::now();
                let entries: Vec<RegistrationEntry> = specs
                    .iter()
                    .enumerate()
                    .map(|(n, (spiffe, parent, ends))| RegistrationEntry {
                        id: EntryId::generate().unwrap(),
                        spiffe_id: node(*spiffe),
                        parent_id: node(*parent),
                        selectors: [Selector::parse(&format!("unix:uid:{n}")).unwrap()]
                            .into_iter()
                            .collect(),
                        x509_svid_ttl: None,
                        jwt_svid_ttl: None,
                        dns_names: vec![],
                        hint: String::new(),
                        // Expired, never, or in 100 or 200 s.
                        expires_at: match ends {
                            0 => Some(UNIX_EPOCH + Duration::from_secs(1)),
                            1 => None,
                            n => Some(now + Duration::from_secs(100 * u64::from(*n - 1))),
                        },
                        created_at: now,
                        revision: n as u64 + 1,
                        session_id: None,
                        federates_with: vec![],
                    })
                    .collect();
                let ids: Vec<EntryId> = entries.iter().map(|e| e.id.clone()).collect();
                let state = State::from_snapshot(entries.len() as u64, entries);
                let usable = |e: &RegistrationEntry| usable(e, now) && e.spiffe_id != node(5);
                // The same entries, each ending at the same time (its chain's end).
                let ends = |entries: Vec<(EntryId, Arc<RegistrationEntry>)>| {
                    entries
                        .into_iter()
                        .map(|(id, e)| (id, e.expires_at))
                        .collect::<BTreeMap<_, _>>()
                };
                let down = ends(
                    state
                        .authorized(&(&id(AGENT)).into(), &usable)
                        .entries
                        .into_iter()
                        .collect(),
                );
                let up = ends(
                    state
                        .authorize(&(&id(AGENT)).into(), &ids, &usable)
                        .into_iter()
                        .collect(),
                );
                prop_assert_eq!(up, down);
            }
        }
    }

    /// A store that answers but whose changes the cache cannot apply does not keep the grace
    /// of `max_store_staleness` alive: the cache answers from what it holds for the grace,
    /// then refuses (it would otherwise authorize from an old state for ever).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cache_that_cannot_apply_the_stores_changes_refuses_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        let cache = EntryCache::load(store.clone()).await.unwrap();
        cache.set_max_staleness(Duration::from_millis(300));
        store
            .create_entry(new_entry("spiffe://example.org/two", AGENT))
            .await
            .unwrap();
        store.swap_raw_change(1, b"not json").unwrap();
        // Within the grace: answered from the cache (which does not hold the entry yet).
        let within = cache
            .authorized(&id(AGENT), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(within.revision, 0);
        assert!(matches!(
            cache.freshness().await,
            Freshness::Degraded { .. }
        ));
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Every call found the store answering; none may have renewed the grace.
        assert!(matches!(
            cache.authorized(&id(AGENT), SystemTime::now()).await,
            Err(EntryCacheError::Stale)
        ));
        assert!(matches!(cache.freshness().await, Freshness::Stale { .. }));
    }

    /// A caller that knows a later revision than the cache has applied (an agent that synced
    /// from another server sharing the store, whose follower has not woken yet) gets the
    /// cache caught up with the store first, not an answer from behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_authorization_catches_the_cache_up_with_writes_it_has_not_followed_yet() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        // No follower runs: the cache only learns of writes when asked.
        let cache = EntryCache::load(store.clone()).await.unwrap();
        store
            .create_entry(new_entry("spiffe://example.org/elsewhere", AGENT))
            .await
            .unwrap();
        let head = store.current_revision().await.unwrap();
        assert!(cache.revision() < head);
        let authorized = cache
            .authorized(&id(AGENT), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(authorized.revision, head);
        assert_eq!(authorized.entries.len(), 1);
    }

    /// A state built from a snapshot (its id map and its indexes on two threads) is the
    /// state the changes would build entry by entry; an id given twice is held as given last.
    #[test]
    fn a_state_from_a_snapshot_is_the_state_built_entry_by_entry() {
        let record = |spiffe_id: &str, parent: &str| {
            RegistrationEntry::from_new(
                EntryId::generate().unwrap(),
                new_entry(spiffe_id, parent),
                UNIX_EPOCH,
                1,
            )
        };
        let mut entries: Vec<RegistrationEntry> = (0..300)
            .map(|n| {
                let parent = [AGENT, OTHER_AGENT, "spiffe://example.org/nested"][n % 3];
                // Some SPIFFE IDs granted by two entries.
                record(&format!("spiffe://example.org/w{}", n % 250), parent)
            })
            .collect();
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        let same = |a: &State, b: &State| {
            assert_eq!(a.revision, b.revision);
            assert_eq!(a.entries, b.entries);
            assert_eq!(a.by_parent, b.by_parent);
            assert_eq!(a.by_spiffe_id, b.by_spiffe_id);
        };
        let one_by_one = |entries: &[RegistrationEntry]| {
            let mut state = State {
                revision: 7,
                ..State::default()
            };
            for entry in entries {
                state.put(Arc::new(entry.clone()));
            }
            state
        };
        let built = State::from_snapshot(7, entries.clone());
        same(&built, &one_by_one(&entries));
        assert_eq!(built.entries.len(), 300);
        assert_eq!(built.by_parent.len(), 3);
        assert_eq!(built.by_spiffe_id.len(), 250);

        // The first entry again, moved under another parent: the later one wins everywhere.
        let mut moved = entries[0].clone();
        moved.parent_id = id("spiffe://example.org/elsewhere");
        entries.push(moved.clone());
        let built = State::from_snapshot(7, entries.clone());
        same(&built, &one_by_one(&entries));
        assert_eq!(built.entries.len(), 300);
        assert_eq!(*built.entries[&moved.id], moved);
        assert_eq!(built.by_parent.len(), 4);
    }

    /// The count from the cache includes every write acknowledged before it was asked, and a
    /// cache that cannot apply the store's changes gives no count (the caller asks the store).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_count_from_the_cache_sees_every_acknowledged_write_or_none_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        // No follower runs: the cache only learns of writes when asked.
        let cache = EntryCache::load(store.clone()).await.unwrap();
        assert_eq!(cache.current_len().await, Some(0));
        let mut ids = Vec::new();
        for n in 0..3 {
            let entry = store
                .create_entry(new_entry(&format!("spiffe://example.org/{n}"), AGENT))
                .await
                .unwrap();
            ids.push(entry.id);
        }
        assert_eq!(cache.current_len().await, Some(3));
        store.delete_entry(&ids[0]).await.unwrap();
        assert_eq!(cache.current_len().await, Some(2));
        assert_eq!(
            cache.current_len().await,
            Some(store.count_entries().await.unwrap())
        );

        let next = store.current_revision().await.unwrap() + 1;
        store
            .create_entry(new_entry("spiffe://example.org/unreadable", AGENT))
            .await
            .unwrap();
        store.swap_raw_change(next, b"not json").unwrap();
        assert_eq!(cache.current_len().await, None);
    }

    /// A listing by parent or by SPIFFE ID from the cache is the store's, page for page and
    /// token for token (so a listing may go on from either), sees every acknowledged write, and
    /// is not given for other filters or by a cache that cannot catch up with the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_from_the_cache_is_the_stores_page_for_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        // No follower runs: the cache only learns of writes when asked.
        let cache = EntryCache::load(store.clone()).await.unwrap();
        let numbered = |n: usize, parent: &str| {
            NewEntry::new(
                id(&format!("spiffe://example.org/w{}", n % 2)),
                id(parent),
                [Selector::parse(&format!("unix:uid:{n}")).unwrap()]
                    .into_iter()
                    .collect::<SelectorSet>(),
            )
        };
        let mut created = Vec::new();
        for n in 0..20 {
            let parent = if n % 3 == 0 { OTHER_AGENT } else { AGENT };
            created.push(store.create_entry(numbered(n, parent)).await.unwrap());
        }
        let filters = [
            EntryFilter {
                parent_id: Some(id(AGENT)),
                ..EntryFilter::default()
            },
            EntryFilter {
                parent_id: Some(id(OTHER_AGENT)),
                ..EntryFilter::default()
            },
            EntryFilter {
                spiffe_id: Some(id("spiffe://example.org/w1")),
                ..EntryFilter::default()
            },
            EntryFilter {
                spiffe_id: Some(id("spiffe://example.org/w1")),
                parent_id: Some(id(AGENT)),
                ..EntryFilter::default()
            },
            EntryFilter {
                parent_id: Some(id(AGENT)),
                selector: Some(Selector::parse("unix:uid:4").unwrap()),
                ..EntryFilter::default()
            },
            EntryFilter {
                parent_id: Some(id("spiffe://example.org/nobody")),
                ..EntryFilter::default()
            },
        ];
        let same_pages = |filters: &[EntryFilter]| {
            let (cache, store, filters) = (&cache, &store, filters.to_vec());
            async move {
                for filter in &filters {
                    for size in [1, 3, 100] {
                        let mut request = PageRequest::first(size);
                        let mut seen = 0;
                        loop {
                            let cached =
                                cache.list_current(filter, &request).await.unwrap().unwrap();
                            let stored = store.list_entries(filter, &request).await.unwrap();
                            assert_eq!(cached, stored, "{filter:?}, pages of {size}");
                            assert!(cached.items.iter().all(|e| filter.matches(e)));
                            seen += cached.items.len();
                            match cached.next_page_token {
                                Some(token) => request = PageRequest::after(size, token),
                                None => break,
                            }
                        }
                        let expected = store
                            .list_entries(filter, &PageRequest::first(100))
                            .await
                            .unwrap()
                            .items
                            .len();
                        assert_eq!(seen, expected, "{filter:?}, pages of {size}");
                    }
                }
            }
        };
        same_pages(&filters).await;
        // 13 entries under AGENT (n not a multiple of 3), 7 of them w1 (odd n); one under AGENT
        // with uid 4; none elsewhere.
        let count = |filter: &EntryFilter| {
            let cache = &cache;
            let filter = filter.clone();
            async move {
                cache
                    .list_current(&filter, &PageRequest::first(100))
                    .await
                    .unwrap()
                    .unwrap()
                    .items
                    .len()
            }
        };
        assert_eq!(count(&filters[0]).await, 13);
        assert_eq!(count(&filters[1]).await, 7);
        assert_eq!(count(&filters[2]).await, 10);
        assert_eq!(count(&filters[3]).await, 7);
        assert_eq!(count(&filters[4]).await, 1);
        assert_eq!(count(&filters[5]).await, 0);

        // Acknowledged writes are in the next listing: a creation, a move to another parent
        // and SPIFFE ID, a deletion.
        store.create_entry(numbered(21, AGENT)).await.unwrap();
        assert_eq!(count(&filters[0]).await, 14);
        assert_eq!(count(&filters[2]).await, 11);
        store
            .update_entry(&created[1].id, numbered(2 * 20, OTHER_AGENT))
            .await
            .unwrap();
        store.delete_entry(&created[5].id).await.unwrap();
        assert_eq!(count(&filters[0]).await, 12);
        assert_eq!(count(&filters[1]).await, 8);
        assert_eq!(count(&filters[2]).await, 9);
        same_pages(&filters).await;

        // Other filters, and tokens that name no entry.
        for unindexed in [
            EntryFilter::default(),
            EntryFilter {
                selector: Some(Selector::parse("unix:uid:1").unwrap()),
                ..EntryFilter::default()
            },
        ] {
            assert!(
                cache
                    .list_current(&unindexed, &PageRequest::first(10))
                    .await
                    .is_none()
            );
        }
        for token in ["zz", "", &crate::store::hex_encode(b"not an entry id")] {
            assert!(matches!(
                cache
                    .list_current(&filters[0], &PageRequest::after(10, token.to_owned()))
                    .await,
                Some(Err(StoreError::InvalidPageToken))
            ));
        }

        // A cache that cannot apply the store's changes gives nothing.
        let next = store.current_revision().await.unwrap() + 1;
        store.create_entry(numbered(30, AGENT)).await.unwrap();
        store.swap_raw_change(next, b"not json").unwrap();
        assert!(
            cache
                .list_current(&filters[0], &PageRequest::first(10))
                .await
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recent_changes_are_shared_and_a_stream_too_far_behind_is_told_they_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 100_000);
        let cache = EntryCache::load(store.clone()).await.unwrap();
        assert!(matches!(cache.changes_after(0, 10), Recent::Changes(c) if c.is_empty()));
        let created = RECENT_CHANGES + 10;
        let entries = (0..created)
            .map(|i| new_entry(&format!("spiffe://example.org/w/{i}"), AGENT))
            .collect();
        store.create_entries(entries).await.unwrap();
        cache.catch_up().await.unwrap();
        let last = cache.revision();
        assert_eq!(last, created as u64);
        // The oldest 10 fell out of the window.
        assert!(matches!(cache.changes_after(0, 10), Recent::Gone));
        assert!(matches!(cache.changes_after(9, 10), Recent::Gone));
        let Recent::Changes(changes) = cache.changes_after(10, 3) else {
            panic!("revision 10 is the window's start");
        };
        let revisions: Vec<u64> = changes.iter().map(|c| c.change.revision).collect();
        assert_eq!(revisions, [11, 12, 13]);
        let Recent::Changes(tail) = cache.changes_after(last - 2, 100) else {
            panic!("in the window");
        };
        assert_eq!(tail.len(), 2);
        assert!(matches!(cache.changes_after(last, 100), Recent::Changes(c) if c.is_empty()));
        assert!(matches!(
            cache.changes_after(last + 1, 100),
            Recent::WentBack
        ));
        // Shared, not copied: two readers get the same allocation.
        let Recent::Changes(again) = cache.changes_after(last - 2, 100) else {
            panic!("in the window");
        };
        assert!(Arc::ptr_eq(&tail[0], &again[0]));
    }

    #[test]
    fn a_batch_cut_short_by_a_gap_names_the_parents_of_what_it_applied() {
        let change = |revision, parent: &str| Change {
            revision,
            kind: ChangeKind::EntryUpserted(RegistrationEntry::from_new(
                EntryId::generate().unwrap(),
                new_entry(&format!("spiffe://example.org/w/{revision}"), parent),
                UNIX_EPOCH,
                revision,
            )),
        };
        let keys = ParentKeys::default();
        let mut state = State::default();
        let mut touched = HashSet::new();
        let applied = state.apply(
            vec![change(1, AGENT), change(3, OTHER_AGENT)],
            &keys,
            &mut touched,
        );
        assert_eq!(applied, None, "revision 2 is missing");
        assert_eq!(state.revision, 1);
        assert_eq!(touched, HashSet::from([keys.key(&id(AGENT))]));
    }

    /// Whether `watch` was woken since it last was (without waiting).
    async fn woken(watch: &EntryWatch) -> bool {
        tokio::select! {
            biased;
            () = watch.changed() => true,
            () = std::future::ready(()) => false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_wakes_the_watches_under_its_old_or_new_parent_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        let cache = EntryCache::load(store.clone()).await.unwrap();
        let mut mine = cache.watch();
        mine.set_parents(HashSet::from([id(AGENT)]));
        let mut other = cache.watch();
        other.set_parents(HashSet::from([id(OTHER_AGENT)]));
        let idle = cache.watch();
        for watch in [&mine, &other, &idle] {
            assert!(!woken(watch).await);
        }

        // Created below one agent: its watch only, once.
        let moved = store
            .create_entry(new_entry("spiffe://example.org/w/moved", AGENT))
            .await
            .unwrap();
        cache.catch_up().await.unwrap();
        assert!(woken(&mine).await);
        assert!(!woken(&mine).await, "the wake was used up");
        assert!(!woken(&other).await);
        assert!(!woken(&idle).await);

        // Moved to the other agent: both (the old parent's watch must learn it is gone).
        store
            .update_entry(
                &moved.id,
                new_entry("spiffe://example.org/w/moved", OTHER_AGENT),
            )
            .await
            .unwrap();
        cache.catch_up().await.unwrap();
        assert!(woken(&mine).await);
        assert!(woken(&other).await);

        // Deleted: the parent it had.
        store.delete_entry(&moved.id).await.unwrap();
        cache.catch_up().await.unwrap();
        assert!(!woken(&mine).await);
        assert!(woken(&other).await);

        // Registered elsewhere: the old parent no longer wakes it, the new one does.
        mine.set_parents(HashSet::from([id("spiffe://example.org/w/parent")]));
        assert!(!mine.covers(&id(AGENT)));
        store
            .create_entry(new_entry("spiffe://example.org/w/a", AGENT))
            .await
            .unwrap();
        cache.catch_up().await.unwrap();
        assert!(!woken(&mine).await);
        store
            .create_entry(new_entry(
                "spiffe://example.org/w/b",
                "spiffe://example.org/w/parent",
            ))
            .await
            .unwrap();
        cache.catch_up().await.unwrap();
        assert!(woken(&mine).await);
        for watch in [&other, &idle] {
            assert!(!woken(watch).await);
        }

        // A dropped watch leaves nothing registered.
        drop(other);
        let other_key = cache.parent_keys.key(&id(OTHER_AGENT));
        assert!(!cache.watchers().by_parent.contains_key(&other_key));
        assert_eq!(cache.watchers().all.len(), 2);

        // A reload replaces every entry: every watch wakes, one under no parent too.
        cache.reload().await.unwrap();
        assert!(woken(&mine).await);
        assert!(woken(&idle).await);
        drop((mine, idle));
        let watchers = cache.watchers();
        assert!(watchers.by_parent.is_empty() && watchers.all.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cache_behind_the_feed_retention_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 5);
        let cache = EntryCache::load(store.clone()).await.unwrap();
        for i in 0..20 {
            store
                .create_entry(new_entry(&format!("spiffe://example.org/w/{i}"), AGENT))
                .await
                .unwrap();
        }
        // Changes 1..=15 are gone from the feed: the cache takes a snapshot instead.
        cache.catch_up().await.unwrap();
        assert_eq!(cache.revision(), 20);
        assert_eq!(granted(&cache, AGENT).len(), 20);
        assert!(matches!(cache.changes_after(19, 10), Recent::Gone));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_it_cannot_read_makes_it_refuse_until_it_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        store
            .create_entry(new_entry("spiffe://example.org/one", AGENT))
            .await
            .unwrap();
        let cache = EntryCache::load(store.clone()).await.unwrap();

        // The next change cannot be decoded (it is corrupted before the follower starts, so
        // that it cannot have been applied already): the follower cannot apply it.
        let deleted = store
            .create_entry(new_entry("spiffe://example.org/two", AGENT))
            .await
            .unwrap();
        store.delete_entry(&deleted.id).await.unwrap();
        let good = store.swap_raw_change(2, b"not json").unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let follower = tokio::spawn(cache.clone().run(stop_rx));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while cache.authorized_now(&id(AGENT), SystemTime::now()).is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "never went stale");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(matches!(
            cache.authorized_now(&id(AGENT), SystemTime::now()),
            Err(EntryCacheError::Stale)
        ));
        assert!(matches!(
            cache.authorized(&id(AGENT), SystemTime::now()).await,
            Err(EntryCacheError::Stale)
        ));
        assert_eq!(cache.revision(), 1, "nothing past the bad change applied");

        // Repaired: the follower's retry catches up, and the cache authorizes again.
        store.swap_raw_change(2, &good);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while cache.revision() != 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never applied the change"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while cache.authorized_now(&id(AGENT), SystemTime::now()).is_err() {
            assert!(tokio::time::Instant::now() < deadline, "never caught up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(granted(&cache, AGENT), ["spiffe://example.org/one"]);
        stop_tx.send(true).unwrap();
        follower.await.unwrap();
    }
}
