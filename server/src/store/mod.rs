//! The server's store: registration entries, attested nodes, join tokens, federated bundles,
//! the CA journal and the audit log, behind one narrow async [`Store`] trait, with a change feed that drives agent
//! sync.
//!
//! The embedded backend is [`SledStore`]; every backend passes the same conformance suite
//! (`conformance`, compiled for tests and under the `testing` feature).
//!
//! # Revisions and the change feed
//!
//! Every mutation of a registration entry takes the next value of one monotonic revision counter,
//! and the store records a [`Change`] under that revision in the same atomic write as the mutation
//! itself. Revisions are therefore gap-free: revision `r` exists in the feed for every `r` between
//! the oldest retained change and [`Store::current_revision`]. The store keeps the last
//! `change_retention` changes (default [`DEFAULT_CHANGE_RETENTION`]); asking for changes after an
//! older revision answers [`ChangesSince::Expired`], and the caller takes a fresh snapshot.
//!
//! Readers only ever see **durable** revisions: [`Store::current_revision`], [`Store::subscribe`],
//! [`Store::changes_since`] and [`Store::snapshot_entries`] never report a change that a crash
//! could still undo. Without that rule, a revision handed to an agent could be lost in a crash
//! and then reused for a different change, and the agent, resuming after it, would miss that
//! change.
//!
//! # Starting a sync
//!
//! An agent's sync starts with [`Store::snapshot_entries`] (every entry, exactly as of the
//! snapshot's revision `R`), then [`Store::changes_since`]`(R, ..)` repeatedly, waking on
//! [`Store::subscribe`]. The snapshot is exact: nothing changed at or before `R` is missing from
//! it, and nothing after `R` is in it, so applying the changes after `R` in order reproduces the
//! store's state at every later revision. How a backend guarantees it is documented on the backend
//! ([`SledStore`]).
//!
//! # Durability
//!
//! Every mutating call returns only after a flush to disk covers its write. Backends batch
//! concurrent writers into one flush (group commit).

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sigil_core::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tokio::sync::watch;

use crate::audit::{
    AuditCheckpoint, AuditFilter, AuditHead, AuditRecord, AuditSource, NewAuditRecord,
    SourceAppend, SourceEvent,
};

#[cfg(test)]
pub(crate) mod conformance;
mod entry_id;
pub(crate) mod federation;
pub(crate) mod migrate;
pub(crate) mod postgres;
pub(crate) mod session;
pub(crate) mod sled;

pub(crate) use self::entry_id::EntryId;
pub(crate) use self::federation::{EndpointProfile, FederationRelationship, FetchStatus, Put};
pub(crate) use self::session::{
    Revocation, RevocationReason, Session, SessionCredential, SessionEntryOp, SessionFilter,
    SessionId, SessionJwt, SessionSerial, SessionState, SessionUpdate,
};
#[cfg(test)]
pub(crate) use self::sled::{SledStore, SledStoreOptions};

/// The id of a server that was not given one (`server_id` in the configuration): the only
/// server of a deployment.
pub(crate) const DEFAULT_SERVER_ID: &str = "default";

/// Number of changes the store keeps by default before pruning the oldest.
pub(crate) const DEFAULT_CHANGE_RETENTION: u64 = 100_000;

/// Page size used when a [`PageRequest`] asks for 0 items.
pub(crate) const DEFAULT_PAGE_SIZE: usize = 1_000;

/// Largest page a listing returns; larger requests are clamped to it.
pub(crate) const MAX_PAGE_SIZE: usize = 10_000;

/// Most changes one [`Store::changes_since`] call returns; larger limits are clamped to it.
pub(crate) const MAX_CHANGES_PER_CALL: usize = 10_000;

/// Number of random bytes in an [`EntryId`].
const ENTRY_ID_BYTES: usize = 16;

/// The work of a job that one server at a time runs ([`Store::run_job`]): a future that
/// yields how much it did.
pub(crate) type JobWork<'w> =
    std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send + 'w>>;

/// The store: every piece of server state that must survive a restart.
///
/// Object safe; the server holds it as `Arc<dyn Store>`. Every mutating call returns only once
/// its write is durable. Read calls may observe writes whose callers are still waiting for their
/// flush, except the change-feed calls, which only report durable revisions (see the module
/// docs).
#[async_trait]
pub(crate) trait Store: Send + Sync + fmt::Debug {
    // --- registration entries ---

    /// Creates an entry with a fresh [`EntryId`] and the next revision.
    ///
    /// Fails with [`StoreError::AlreadyExists`] when an entry with the same SPIFFE ID, parent ID
    /// and selectors exists.
    async fn create_entry(&self, entry: NewEntry) -> Result<RegistrationEntry, StoreError>;

    /// Creates many entries with one durable flush. Returns one result per input, in order; an
    /// input that duplicates an existing entry, or an earlier input of the same batch, gets
    /// [`StoreError::AlreadyExists`] without affecting the others. The outer error means that
    /// nothing can be assumed about the batch (the backend or its flush failed).
    async fn create_entries(
        &self,
        entries: Vec<NewEntry>,
    ) -> Result<Vec<Result<RegistrationEntry, StoreError>>, StoreError>;

    /// The entry with this id, if any.
    async fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>, StoreError>;

    /// Replaces every operator-set field of the entry `id`, keeping its id and `created_at`, and
    /// gives it the next revision.
    ///
    /// Fails with [`StoreError::NotFound`] when there is no such entry, and with
    /// [`StoreError::AlreadyExists`] when the new fields duplicate another entry.
    async fn update_entry(
        &self,
        id: &EntryId,
        entry: NewEntry,
    ) -> Result<RegistrationEntry, StoreError>;

    /// Deletes the entry `id` and returns its last version. The deletion takes the next revision
    /// and appears in the feed as [`ChangeKind::EntryDeleted`] with that last version.
    async fn delete_entry(&self, id: &EntryId) -> Result<RegistrationEntry, StoreError>;

    /// One page of the entries that pass `filter`, in ascending [`EntryId`] order.
    ///
    /// Following `next_page_token` until it is `None` visits every entry that exists during the
    /// whole listing exactly once; entries created or deleted meanwhile may or may not appear.
    /// Fails with [`StoreError::InvalidPageToken`] for a token this store did not issue.
    async fn list_entries(
        &self,
        filter: &EntryFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationEntry>, StoreError>;

    /// The number of entries.
    async fn count_entries(&self) -> Result<u64, StoreError>;

    /// Every entry, exactly as of the returned (durable) revision, in ascending [`EntryId`]
    /// order. A sync continues with [`Store::changes_since`] from that revision.
    async fn snapshot_entries(&self) -> Result<EntrySnapshot, StoreError>;

    // --- change feed ---

    /// The latest durable revision (0 for an empty store).
    async fn current_revision(&self) -> Result<u64, StoreError>;

    /// Up to `limit` changes with a revision greater than `revision`, oldest first, and only
    /// durable ones. [`ChangesSince::Changes`] with an empty list means the caller is up to date.
    /// [`ChangesSince::Expired`] means the changes right after `revision` are no longer
    /// retained (or `revision` is newer than anything this store has issued): take a fresh
    /// snapshot. `limit` 0 is taken as 1, and limits above [`MAX_CHANGES_PER_CALL`] are
    /// clamped.
    async fn changes_since(&self, revision: u64, limit: usize) -> Result<ChangesSince, StoreError>;

    /// A receiver of the latest durable revision; it changes (and wakes its waiters) whenever a
    /// flush makes new changes durable, so sync streams wait on it instead of polling.
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// Starts a new history of the change feed, for a server run that begins now: records `id`
    /// with the latest revision (where the new history starts) durably, and returns every
    /// history the store knows, oldest first, `id`'s last.
    ///
    /// A history shares every revision up to its start with the one before it, so a revision
    /// an agent holds from an earlier history proves something only up to the start of the
    /// history that followed it. A store restored from an older copy forgets the histories
    /// started after the copy was taken, and numbers its new changes as the lost ones were:
    /// a revision from a history it does not know proves nothing. `None`: the backend keeps no
    /// histories (PostgreSQL, whose database can go back under running servers; see
    /// `docs/ha.md`).
    async fn begin_history(&self, id: HistoryId) -> Result<Option<Vec<History>>, StoreError> {
        let _ = id;
        Ok(None)
    }

    // --- attested nodes ---

    /// Stores a newly attested node. The store sets `created_at` and `updated_at` to now.
    /// Fails with [`StoreError::AlreadyExists`] when a node with this SPIFFE ID exists.
    async fn create_node(&self, node: AttestedNode) -> Result<AttestedNode, StoreError>;

    /// The node with this SPIFFE ID, if any.
    async fn get_node(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedNode>, StoreError>;

    /// Replaces the node with the same SPIFFE ID, keeping its `created_at` and setting
    /// `updated_at` to now, only if the stored node is still exactly `expected` (as the caller
    /// read it): a compare-and-swap, so that a concurrent change (a ban) is never undone by a
    /// write made from an older read. Fails with [`StoreError::StateChanged`] (nothing
    /// written) when it changed meanwhile, [`StoreError::NotFound`] when there is none.
    async fn update_node(
        &self,
        expected: &AttestedNode,
        node: AttestedNode,
    ) -> Result<AttestedNode, StoreError>;

    /// Deletes the node and returns its last version.
    async fn delete_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode, StoreError>;

    /// One page of the attested nodes, in ascending SPIFFE ID order (same guarantees as
    /// [`Store::list_entries`]).
    async fn list_nodes(&self, page: &PageRequest) -> Result<Page<AttestedNode>, StoreError>;

    // --- join tokens ---

    /// Stores a join token. Fails with [`StoreError::AlreadyExists`] when the token exists.
    async fn create_join_token(&self, token: JoinToken) -> Result<(), StoreError>;

    /// Removes the token whose SHA-256 is `token_hash` atomically and returns it: among any
    /// number of concurrent callers, exactly one gets it. Fails with [`StoreError::TokenNotFound`] when it does not exist (or
    /// was consumed already), and with [`StoreError::TokenExpired`] when it expired at or before
    /// `now`; an expired token is removed all the same.
    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: SystemTime,
    ) -> Result<JoinToken, StoreError>;

    /// Deletes every join token that expired at or before `now`; returns how many.
    async fn prune_join_tokens(&self, now: SystemTime) -> Result<u64, StoreError>;

    // --- metrics ---

    /// How long this store's durable writes take (a sled flush, a PostgreSQL commit): the
    /// histogram the store observes, for the metrics registry.
    fn commit_latency(&self) -> prometheus_client::metrics::histogram::Histogram;

    // --- jobs that one server at a time runs ---

    /// Runs `work` as job `job` of the servers sharing the store and returns what it returned
    /// (how much it did), unless another server runs that job now: then returns `Ok(None)` at
    /// once and `work` is dropped unpolled. There is no leader: on PostgreSQL the job holds `pg_try_advisory_xact_lock` in a transaction of
    /// its own for as long as `work` runs, and the lock ends with that transaction (with its
    /// connection if the server dies). A single-server backend (sled) always runs it. `work`
    /// must be idempotent: if the lock's connection fails while `work` runs, another server
    /// may start the same job before this one ends.
    ///
    /// # Errors
    ///
    /// The store cannot be reached to take the lock (`work` is not run).
    async fn run_job<'w>(
        &self,
        job: &'static str,
        work: JobWork<'w>,
    ) -> Result<Option<usize>, StoreError>;

    // --- federated bundles ---

    /// Stores (or replaces) the SPIFFE bundle JSON of a federated trust domain, stamped now.
    async fn set_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
        bundle: Vec<u8>,
    ) -> Result<FederatedBundle, StoreError>;

    /// The bundle of this trust domain, if any.
    async fn get_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederatedBundle>, StoreError>;

    /// Deletes the bundle of this trust domain and returns it. Refused with
    /// [`StoreError::InUse`] while a federation relationship names the trust domain (deleting
    /// the relationship deletes its bundle).
    async fn delete_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederatedBundle, StoreError>;

    /// Every federated bundle, in ascending trust domain order.
    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>, StoreError>;

    // --- federation relationships ---

    /// Creates or updates (as `put` says) the relationship with `relationship.trust_domain`,
    /// with `bundle` (SPIFFE bundle JSON) as its trust domain's bundle when given, in one
    /// transaction. The store sets `created_at`, `updated_at` and `generation`
    /// ([`federation::put_relationship`]).
    async fn put_federation(
        &self,
        relationship: FederationRelationship,
        bundle: Option<Vec<u8>>,
        put: Put,
    ) -> Result<FederationRelationship, StoreError>;

    /// The relationship with this trust domain, if any.
    async fn get_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>, StoreError>;

    /// Every relationship, in ascending trust domain order.
    async fn list_federations(&self) -> Result<Vec<FederationRelationship>, StoreError>;

    /// Deletes the relationship and its trust domain's bundle, in one transaction; returns
    /// the relationship and the bundle it had.
    async fn delete_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<(FederationRelationship, Option<FederatedBundle>), StoreError>;

    /// Records a fetch of the relationship's endpoint: its `status` and, when the fetch gave a
    /// new bundle, the bundle, in one transaction, only while the relationship is still at
    /// `generation` (else nothing is written and `false` comes back: it was updated or
    /// deleted meanwhile, and a bundle fetched under the old settings must not be kept).
    async fn record_federation_fetch(
        &self,
        trust_domain: &TrustDomain,
        generation: u64,
        status: FetchStatus,
        bundle: Option<Vec<u8>>,
    ) -> Result<bool, StoreError>;

    // --- CA state ---

    /// The CA journal the server `server_id` last saved, if any: opaque bytes that the CA
    /// module serializes. Each server of a deployment keeps its own CA (its keys on its own
    /// disk) and so its own journal.
    async fn load_ca_journal(&self, server_id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Replaces the CA journal of the server `server_id`.
    async fn save_ca_journal(&self, server_id: &str, journal: Vec<u8>) -> Result<(), StoreError>;

    // --- the servers sharing the store, and their shared bundle ---

    /// Says that this store's server (claimed when the store was opened) is alive. Fails
    /// with [`StoreError::Superseded`] once another instance has claimed the same server id:
    /// the caller must then stop serving.
    async fn heartbeat(&self) -> Result<(), StoreError>;

    /// Replaces the SPIFFE bundle JSON (its authorities) that server `server_id` publishes,
    /// and raises the shared bundle sequence in the same transaction, to at least
    /// `at_least`. Returns the new sequence.
    async fn publish_server_bundle(
        &self,
        server_id: &str,
        bundle: Vec<u8>,
        at_least: u64,
    ) -> Result<u64, StoreError>;

    /// The shared bundle sequence: raised by every [`Store::publish_server_bundle`].
    async fn bundle_sequence(&self) -> Result<u64, StoreError>;

    /// Every server's published bundle, read with the sequence in one snapshot.
    async fn server_bundles(&self) -> Result<ServerBundles, StoreError>;

    /// Replaces the CRLs server `server_id` signed for its own authorities (opaque bytes the
    /// CRL service encodes) and raises [`CrlCounters::crls`] in the same transaction.
    async fn save_server_crls(&self, server_id: &str, crls: Vec<u8>) -> Result<(), StoreError>;

    /// Every server's CRLs, in ascending server id order.
    async fn server_crls(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// The counters every server polls to learn that it must re-sign its CRLs (revocations
    /// were added, by any server) or take in other servers' new CRLs.
    async fn crl_counters(&self) -> Result<CrlCounters, StoreError>;

    // --- audit log (see the `audit` module) ---

    /// Appends `records`, in order, to the store's audit chain (named when the store was
    /// opened; the chain of its head and records must be that one): each gets the next sequence, the
    /// store's current time (never earlier than the previous record's), the previous record's
    /// hash and its own hash, assigned atomically with the chain head so that concurrent
    /// appenders never fork the chain. Returns the sealed records once they are **durable**:
    /// a caller hands out what they describe only after this returns `Ok`.
    ///
    /// An empty batch appends nothing. Records are never rewritten or deleted by any call.
    async fn append_audit(
        &self,
        records: Vec<NewAuditRecord>,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// Appends the events of `source` that are not in the chain yet, those whose sequence is
    /// above the last one stored for the source, in order, in **one atomic write** with the
    /// source's new last sequence: an event sent again (an answer lost, either side restarted)
    /// is appended once. `events` must be in strictly increasing sequence order (else
    /// [`StoreError::Encode`], nothing written), and those above the last stored must continue
    /// it without a gap (`last + 1`, `last + 2`, ...): otherwise nothing is appended, and the
    /// returned `acknowledged` (below the events' sequences) says where the source must resume.
    /// Returns once the records (and, for a call that appends nothing, every earlier write) are
    /// durable.
    async fn append_source_events(
        &self,
        source: &AuditSource,
        events: Vec<SourceEvent>,
    ) -> Result<SourceAppend, StoreError>;

    /// The last sequence of `source` in the chain (0 when it has appended nothing).
    async fn audit_source_sequence(&self, source: &AuditSource) -> Result<u64, StoreError>;

    /// One page of the audit records that pass `filter`, in ascending sequence order (same
    /// paging guarantees as [`Store::list_entries`]). A listing may include records whose
    /// append is still waiting for its flush.
    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditRecord>, StoreError>;

    /// The last record of the chain, or `None` while the log is empty.
    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError>;

    /// The head of every audit chain the store holds (one per server that ever appended), in
    /// ascending chain id order. A store opened for one chain appends only to that chain; the
    /// others are kept apart by their chain id (a record's position is `(chain_id, sequence)`).
    #[allow(
        dead_code,
        reason = "part of the backend contract (the conformance suite checks it); verifying \
                  every server's chain of a highly available deployment reads it"
    )]
    async fn audit_chains(&self) -> Result<Vec<AuditHead>, StoreError>;

    /// Stores a signed checkpoint (replacing one for the same sequence).
    async fn save_audit_checkpoint(&self, checkpoint: AuditCheckpoint) -> Result<(), StoreError>;

    /// The checkpoint with the highest sequence, if any.
    async fn latest_audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>, StoreError>;

    /// Removes the checkpoint of `sequence`, if any: only when an operator acknowledged that
    /// the log no longer extends it (the `audit.divergence` record names it).
    async fn remove_audit_checkpoint(&self, sequence: u64) -> Result<(), StoreError>;

    /// Up to `limit` checkpoints with sequences from `from_sequence` on, in ascending
    /// sequence order.
    async fn list_audit_checkpoints(
        &self,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<AuditCheckpoint>, StoreError>;

    /// Records of **every** chain in the store (each server's), matching `filter`, ordered by
    /// time, then chain id, then sequence: what `audit show` lists. With
    /// `filter.from_sequence`, the store's own chain only, as [`Store::list_audit`].
    async fn list_audit_merged(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditRecord>, StoreError>;

    /// Up to `limit` records of chain `chain_id` (any server's) with sequences from
    /// `from_sequence` on, in ascending sequence order.
    async fn list_chain_records(
        &self,
        chain_id: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// Up to `limit` checkpoints of chain `chain_id` (any server's) with sequences from
    /// `from_sequence` on, in ascending sequence order.
    async fn list_chain_checkpoints(
        &self,
        chain_id: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<AuditCheckpoint>, StoreError>;

    // --- privileged sessions (see the `session` module) ---

    /// Stores a new session. With `entry` (a session active from the start) the entry is
    /// created in the same atomic write, with the next revision, and its id is recorded in
    /// the returned session's `entry_id`; `audit` records are appended to the chain in the
    /// same write. Fails with [`StoreError::AlreadyExists`] when the id exists or the entry
    /// duplicates another (and then writes nothing, records included).
    async fn create_session(
        &self,
        session: Session,
        entry: Option<NewEntry>,
        audit: Vec<NewAuditRecord>,
    ) -> Result<Session, StoreError>;

    /// Applies a state change atomically: the record, its entry ([`SessionEntryOp`]) and its
    /// revocations, only if the stored record is still in `update.expected` (else
    /// [`StoreError::StateChanged`]). Fails with [`StoreError::NotFound`] for an unknown id.
    async fn update_session(&self, update: SessionUpdate) -> Result<Session, StoreError>;

    /// The session with this id, if any.
    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>, StoreError>;

    /// One page of the sessions that pass `filter`, in ascending id order (same paging
    /// guarantees as [`Store::list_entries`]).
    async fn list_sessions(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> Result<Page<Session>, StoreError>;

    /// Appends an issued credential (an X509-SVID's serial, a JWT-SVID's `jti`) to the
    /// session's record, whatever its state; durable on return. Fails with
    /// [`StoreError::NotFound`] for an unknown id.
    async fn add_session_credential(
        &self,
        id: &SessionId,
        credential: SessionCredential,
    ) -> Result<Session, StoreError>;

    // --- revoked serials ---

    /// Adds serials to the revocation list (replacing any with the same serial).
    async fn add_revocations(&self, revocations: Vec<Revocation>) -> Result<(), StoreError>;

    /// Every revoked serial, in ascending serial order.
    async fn list_revocations(&self) -> Result<Vec<Revocation>, StoreError>;

    /// Removes the revocations whose certificate expired at or before `now`; returns how many.
    async fn prune_revocations(&self, now: SystemTime) -> Result<u64, StoreError>;

    /// The next CRL number of the authority `authority_id`: `at_least`, or one more than the
    /// last number this store handed out for it if that is higher. Durable before it returns,
    /// so an authority's CRL numbers never go backwards, across restarts, clock steps and the
    /// servers of a deployment.
    async fn next_crl_number(&self, authority_id: &str, at_least: u64) -> Result<u64, StoreError>;
}

/// Why a string is not an [`EntryId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid entry id {input:?}: expected 32 lowercase hex characters")]
pub(crate) struct EntryIdError {
    /// The rejected input.
    pub input: String,
}

/// A registration entry: which workloads (selectors, under which parent) get which SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RegistrationEntry {
    /// Assigned by the store at creation; never changes.
    pub id: EntryId,
    /// The identity granted.
    pub spiffe_id: SpiffeId,
    /// The agent (or another entry's SPIFFE ID) under which the workload runs.
    pub parent_id: SpiffeId,
    /// What a workload must present (all of them) to get the identity.
    pub selectors: SelectorSet,
    /// X509-SVID lifetime; `None` means the server default.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime; `None` means the server default.
    pub jwt_svid_ttl: Option<Duration>,
    /// DNS SANs for the X509-SVID.
    pub dns_names: Vec<String>,
    /// Operator hint that lets workloads tell their identities apart; may be empty.
    pub hint: String,
    /// When the entry stops granting anything; `None` means never.
    pub expires_at: Option<SystemTime>,
    /// Set by the store at creation.
    pub created_at: SystemTime,
    /// The revision of the entry's last change (creation or update).
    pub revision: u64,
    /// The privileged session this entry carries, if any (only the session calls make these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
    /// Federated trust domains whose bundles the entry's workloads also get (and whose
    /// JWT-SVIDs they may validate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federates_with: Vec<TrustDomain>,
}

/// A registration entry as an operator writes it: [`RegistrationEntry`] without the fields the
/// store assigns (`id`, `created_at`, `revision`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NewEntry {
    /// The identity granted.
    pub spiffe_id: SpiffeId,
    /// The agent (or another entry's SPIFFE ID) under which the workload runs.
    pub parent_id: SpiffeId,
    /// What a workload must present (all of them) to get the identity.
    pub selectors: SelectorSet,
    /// X509-SVID lifetime; `None` means the server default.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime; `None` means the server default.
    pub jwt_svid_ttl: Option<Duration>,
    /// DNS SANs for the X509-SVID.
    pub dns_names: Vec<String>,
    /// Operator hint; may be empty.
    pub hint: String,
    /// When the entry stops granting anything; `None` means never.
    pub expires_at: Option<SystemTime>,
    /// The privileged session this entry carries, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
    /// Federated trust domains whose bundles the entry's workloads also get.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federates_with: Vec<TrustDomain>,
}

/// Which entries [`Store::list_entries`] returns: every condition that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EntryFilter {
    /// Only entries granting exactly this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Only entries with exactly this parent ID.
    pub parent_id: Option<SpiffeId>,
    /// Only entries whose selectors include this one.
    pub selector: Option<Selector>,
}

/// Which page of a listing to return.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PageRequest {
    /// Most items to return; 0 means [`DEFAULT_PAGE_SIZE`], and sizes above [`MAX_PAGE_SIZE`]
    /// are clamped.
    pub size: usize,
    /// `next_page_token` of the previous page; `None` for the first page.
    pub token: Option<String>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Page<T> {
    /// The items, in the listing's stable order.
    pub items: Vec<T>,
    /// Pass it in the next [`PageRequest`] to continue; `None` when this is the last page.
    pub next_page_token: Option<String>,
}

/// Every registration entry as of one revision (see [`Store::snapshot_entries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntrySnapshot {
    /// The durable revision the snapshot reflects: continue with the changes after it.
    pub revision: u64,
    /// Every entry at that revision, in ascending [`EntryId`] order.
    pub entries: Vec<RegistrationEntry>,
}

/// One change of the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Change {
    /// The revision the change took; strictly increasing and gap-free.
    pub revision: u64,
    /// What changed.
    pub kind: ChangeKind,
}

/// What a [`Change`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ChangeKind {
    /// The entry was created or updated; this is its new version (its `revision` is the
    /// change's).
    EntryUpserted(RegistrationEntry),
    /// The entry was deleted; this is its last version, so that the server can tell which
    /// agents held it.
    EntryDeleted(RegistrationEntry),
}

/// The id of one history of a store's change feed ([`Store::begin_history`]): random, one per
/// server run.
pub(crate) type HistoryId = [u8; 16];

/// One history of a store's change feed: its id and the revision it started at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct History {
    /// Its id.
    pub id: HistoryId,
    /// The latest revision when it began: every revision up to it is shared with the history
    /// before.
    pub start: u64,
}

/// The answer of [`Store::changes_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChangesSince {
    /// The changes after the requested revision, oldest first (empty: up to date).
    Changes(Vec<Change>),
    /// The changes after the requested revision are no longer retained: take a fresh snapshot.
    Expired,
}

/// An agent that attested to this server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AttestedNode {
    /// The agent's SPIFFE ID; the key of the record.
    pub spiffe_id: SpiffeId,
    /// How it attested, e.g. `join_token`.
    pub attestation_type: String,
    /// Serial number of its current SVID.
    pub serial: String,
    /// Serial number of the SVID issued by a renewal the agent has not used yet.
    pub new_serial: Option<String>,
    /// NotAfter of its current SVID.
    pub not_after: SystemTime,
    /// A banned agent must not be served and must not re-attest.
    pub banned: bool,
    /// Selectors of the node, from attestation.
    pub selectors: SelectorSet,
    /// Set by the store at creation.
    pub created_at: SystemTime,
    /// Set by the store at every write.
    pub updated_at: SystemTime,
}

/// A single-use join token. Its `Debug` never prints the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JoinToken {
    /// SHA-256 of the secret value an agent presents, lowercase hex
    /// ([`token_hash`](sigil_attestors::join_token::token_hash)): the token itself is never
    /// stored.
    pub token_hash: String,
    /// After this instant the token is refused.
    pub expires_at: SystemTime,
    /// When it was minted.
    pub created_at: SystemTime,
    /// A SPIFFE ID the attested agent also holds, as a parent for entries.
    pub alias_spiffe_id: Option<SpiffeId>,
}

/// The SPIFFE bundle of a federated trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FederatedBundle {
    /// The trust domain the bundle is for.
    pub trust_domain: TrustDomain,
    /// The SPIFFE bundle JSON, as received.
    #[serde(with = "base64_bytes")]
    pub bundle: Vec<u8>,
    /// When it was last set.
    pub updated_at: SystemTime,
}

impl FederatedBundle {
    /// The bundle, if it parses as one of its trust domain.
    pub(crate) fn parsed(&self) -> Option<sigil_core::SpiffeBundle> {
        sigil_core::SpiffeBundle::parse(self.trust_domain.clone(), &self.bundle).ok()
    }
}

/// A new random instance id (16 hex digits): one per process that claims a server id.
pub(crate) fn new_instance_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| StoreError::Random)?;
    Ok(sigil_core::hex::encode(&bytes))
}

/// This machine's host name (`/proc/sys/kernel/hostname`), or `unknown`.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Counters of the shared revocation state: each rises and never falls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CrlCounters {
    /// Raised by every write that adds revoked serials ([`Store::add_revocations`], a
    /// session update that carries revocations).
    pub revocations: u64,
    /// Raised by every [`Store::save_server_crls`].
    pub crls: u64,
}

/// Every server's published bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerBundles {
    /// The shared sequence when they were read.
    pub sequence: u64,
    /// `(server_id, SPIFFE bundle JSON)`, in ascending id order.
    pub bundles: Vec<(String, Vec<u8>)>,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record to update or delete does not exist.
    #[error("{resource} not found: {key}")]
    NotFound {
        /// The kind of record (`entry`, `node`, `federated bundle`).
        resource: &'static str,
        /// Its key.
        key: String,
    },
    /// A record with the same key (or, for entries, the same SPIFFE ID, parent ID and selectors)
    /// exists.
    #[error("{resource} already exists: {key}")]
    AlreadyExists {
        /// The kind of record.
        resource: &'static str,
        /// The key of the existing record (the existing entry's id; redacted for join tokens).
        key: String,
    },
    /// The join token does not exist or was consumed already.
    #[error("join token not found")]
    TokenNotFound,
    /// The join token had expired; it has been removed.
    #[error("join token expired")]
    TokenExpired,
    /// A page token that this store did not issue.
    #[error("invalid page token")]
    InvalidPageToken,
    /// A stored record cannot be decoded.
    #[error("corrupt {what} record: {reason}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// Why it could not be decoded.
        reason: String,
    },
    /// A record cannot be encoded (for example a time before 1970).
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// What was being written.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The storage backend failed.
    #[error("storage backend failed: {0}")]
    Backend(#[from] ::sled::Error),
    /// Another process has the sled store open (sled takes a lock on it).
    #[error(
        "the sled store in {} is in use by another process (a sigil-server on the same \
         data_dir, or `sigil-server store migrate`): stop it first",
        .path.display()
    )]
    Locked {
        /// The store's directory.
        path: std::path::PathBuf,
    },
    /// The database failed or refused a statement.
    #[error("database: {}", database_error_text(.0))]
    Database(#[source] tokio_postgres::Error),
    /// No database connection could be had (the pool timed out or is closed).
    #[error("{0}")]
    Unavailable(String),
    /// The store's configuration is wrong (a connection string, a TLS file).
    #[error("{0}")]
    Config(String),
    /// The database cannot be used by this build (too old a server, a newer schema).
    #[error("{0}")]
    Unsupported(String),
    /// An operating system call failed (opening the store, starting its flusher thread).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A flush to disk failed; the store refuses every later write, since it can no longer
    /// tell what is on disk.
    #[error("flush to disk failed: {0}")]
    FlushFailed(String),
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
    /// A consistent snapshot could not be taken because the changes it needed were pruned
    /// while it was being read (a write rate far above the change retention).
    #[error("snapshot could not be taken: the store changed too fast")]
    SnapshotUnavailable,
    /// A blocking store task failed.
    #[error("store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The store is shut down.
    #[error("store is closed")]
    Closed,
    /// Another instance claimed this server's id: this one must stop serving.
    #[error(
        "another instance ({instance}) claimed server_id {server_id:?}: this one stops (two \
         servers must not share an id)"
    )]
    Superseded {
        /// The server id.
        server_id: String,
        /// The instance that holds it now (host and instance id), as far as known.
        instance: String,
    },
    /// The record changed state since it was read (a concurrent update won).
    #[error("{resource} {key} changed meanwhile; read it again")]
    StateChanged {
        /// The kind of record.
        resource: &'static str,
        /// Its key.
        key: String,
    },
    /// The record is used by another and cannot be removed on its own.
    #[error("{resource} {key} is in use: {reason}")]
    InUse {
        /// The kind of record.
        resource: &'static str,
        /// Its key.
        key: String,
        /// What uses it, and what to do.
        reason: &'static str,
    },
}

/// A database error with its causes (tokio-postgres keeps the server's message, SQLSTATE,
/// detail and hint in its source, not in its own text).
fn database_error_text(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            text.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

// === impl RegistrationEntry ===

impl RegistrationEntry {
    /// Builds the stored record from what the operator wrote and what the store assigns.
    pub(crate) fn from_new(
        id: EntryId,
        entry: NewEntry,
        created_at: SystemTime,
        revision: u64,
    ) -> Self {
        let NewEntry {
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl,
            jwt_svid_ttl,
            dns_names,
            hint,
            expires_at,
            session_id,
            federates_with,
        } = entry;
        Self {
            id,
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl,
            jwt_svid_ttl,
            dns_names,
            hint,
            expires_at,
            created_at,
            revision,
            session_id,
            federates_with,
        }
    }

    /// [`NewEntry::identity_key`] of this entry (without copying it into a [`NewEntry`]).
    pub(crate) fn identity_key(&self) -> [u8; 32] {
        identity_key(
            &self.spiffe_id,
            &self.parent_id,
            &self.selectors,
            self.session_id.as_ref(),
        )
    }

    /// The operator-set fields, as a [`NewEntry`].
    pub(crate) fn to_new(&self) -> NewEntry {
        NewEntry {
            spiffe_id: self.spiffe_id.clone(),
            parent_id: self.parent_id.clone(),
            selectors: self.selectors.clone(),
            x509_svid_ttl: self.x509_svid_ttl,
            jwt_svid_ttl: self.jwt_svid_ttl,
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone(),
            expires_at: self.expires_at,
            session_id: self.session_id.clone(),
            federates_with: self.federates_with.clone(),
        }
    }
}

// === impl NewEntry ===

impl NewEntry {
    /// An entry granting `spiffe_id` under `parent_id` to workloads with `selectors`, with every
    /// optional field unset.
    pub(crate) fn new(spiffe_id: SpiffeId, parent_id: SpiffeId, selectors: SelectorSet) -> Self {
        Self {
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            dns_names: Vec::new(),
            hint: String::new(),
            expires_at: None,
            session_id: None,
            federates_with: Vec::new(),
        }
    }

    /// The uniqueness key of an entry: SHA-256 over its SPIFFE ID, parent ID and selectors,
    /// each length-prefixed so that no two different triples encode alike.
    pub(crate) fn identity_key(&self) -> [u8; 32] {
        identity_key(
            &self.spiffe_id,
            &self.parent_id,
            &self.selectors,
            self.session_id.as_ref(),
        )
    }
}

/// [`NewEntry::identity_key`] of the parts of an entry.
fn identity_key(
    spiffe_id: &SpiffeId,
    parent_id: &SpiffeId,
    selectors: &SelectorSet,
    session_id: Option<&SessionId>,
) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    field(spiffe_id.as_str().as_bytes());
    field(parent_id.as_str().as_bytes());
    for selector in selectors {
        field(selector.kind().as_bytes());
        field(selector.value().as_bytes());
    }
    if let Some(session) = session_id {
        // Set apart from the selector fields by its tag, so two sessions for the same
        // identity never clash with each other or with an ordinary entry.
        field(b"\0session");
        field(session.as_str().as_bytes());
    }
    let digest = ctx.finish();
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

// === impl EntryFilter ===

impl EntryFilter {
    /// True when `entry` passes every condition that is set.
    pub(crate) fn matches(&self, entry: &RegistrationEntry) -> bool {
        self.spiffe_id
            .as_ref()
            .is_none_or(|id| *id == entry.spiffe_id)
            && self
                .parent_id
                .as_ref()
                .is_none_or(|id| *id == entry.parent_id)
            && self
                .selector
                .as_ref()
                .is_none_or(|s| entry.selectors.contains(s))
    }
}

// === impl PageRequest ===

/// The first audit sequence a listing returns: `from_sequence` (at least 1), or the one after
/// the record that ended the previous page (a token is the record's sequence, 8 bytes
/// big-endian, in hex), whichever is later.
pub(crate) fn audit_listing_start(
    filter: &AuditFilter,
    page: &PageRequest,
) -> Result<u64, StoreError> {
    let mut start = filter.from_sequence.unwrap_or(1).max(1);
    if let Some(token) = page.token.as_deref() {
        let after = hex_decode(token)
            .and_then(|key| <[u8; 8]>::try_from(key.as_slice()).ok())
            .map(u64::from_be_bytes)
            .ok_or(StoreError::InvalidPageToken)?;
        start = start.max(after.saturating_add(1));
    }
    Ok(start)
}

impl PageRequest {
    /// The first page, with `size` items at most.
    pub(crate) fn first(size: usize) -> Self {
        Self { size, token: None }
    }

    /// The page after the one that returned `token` as its `next_page_token`.
    pub(crate) fn after(size: usize, token: String) -> Self {
        Self {
            size,
            token: Some(token),
        }
    }

    /// The page size actually used: 0 means the default, and the maximum is enforced.
    pub(crate) fn effective_size(&self) -> usize {
        match self.size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        }
    }
}

// === impl JoinToken ===

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("token_hash", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("created_at", &self.created_at)
            .field("alias_spiffe_id", &self.alias_spiffe_id)
            .finish()
    }
}

// === helpers ===

pub(crate) use sigil_core::hex::{decode as hex_decode, encode as hex_encode};

/// The entry after which a listing of entries goes on, from the page token of the page before
/// (`None`: the first page). Every store's token, and the entry cache's, is the hex of the last
/// entry id listed ([`entry_page_token`]), so a listing can go on from any of them.
///
/// # Errors
///
/// [`StoreError::InvalidPageToken`] for a token that names no entry id.
pub(crate) fn entry_after(token: Option<&str>) -> Result<Option<EntryId>, StoreError> {
    token
        .map(|token| {
            hex_decode(token)
                .and_then(|key| String::from_utf8(key).ok())
                .and_then(|key| EntryId::parse(&key).ok())
                .ok_or(StoreError::InvalidPageToken)
        })
        .transpose()
}

/// The page token that goes on with the entries after `id` ([`entry_after`]).
pub(crate) fn entry_page_token(id: &EntryId) -> String {
    hex_encode(id.as_str().as_bytes())
}

/// Serde helper: bytes as a base64 string (JSON arrays of numbers would quadruple their size).
pub(crate) mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(deserializer)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

// === the store as the join-token attestor's token source ===

#[async_trait]
impl sigil_attestors::join_token::JoinTokens for dyn Store {
    async fn consume(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<Option<SpiffeId>, sigil_attestors::join_token::JoinTokenError> {
        use sigil_attestors::join_token::JoinTokenError;
        let hash = sigil_attestors::join_token::token_hash(token);
        match self.consume_join_token(&hash, now).await {
            Ok(token) => Ok(token.alias_spiffe_id),
            Err(StoreError::TokenNotFound) => Err(JoinTokenError::NotFound),
            Err(StoreError::TokenExpired) => Err(JoinTokenError::Expired),
            Err(e) => Err(JoinTokenError::Store(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_are_32_lowercase_hex_and_parse_back() {
        let id = EntryId::generate().unwrap();
        assert_eq!(id.as_str().len(), 32);
        assert_eq!(EntryId::parse(id.as_str()).unwrap(), id);
        assert_ne!(EntryId::generate().unwrap(), id);
        assert!(EntryId::parse("ABCDEF0123456789abcdef0123456789").is_err());
        assert!(EntryId::parse("abc").is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<EntryId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<EntryId>("\"xyz\"").is_err());
        // An escaped spelling decodes to the same id (the decoder unescapes into a buffer).
        let escaped = format!(
            "\"\\u00{:x}{}\"",
            id.as_str().as_bytes()[0],
            &id.as_str()[1..]
        );
        assert_eq!(serde_json::from_str::<EntryId>(&escaped).unwrap(), id);
    }

    /// Ids order as their strings do (the store's keys and listings are in that order).
    #[test]
    fn entry_ids_order_as_their_strings() {
        let mut ids: Vec<EntryId> = (0..64).map(|_| EntryId::generate().unwrap()).collect();
        let mut strings: Vec<String> = ids.iter().map(|id| id.as_str().to_owned()).collect();
        ids.sort();
        strings.sort();
        assert_eq!(ids.iter().map(EntryId::as_str).collect::<Vec<_>>(), strings);
    }

    #[test]
    fn identity_key_depends_on_every_part_and_not_on_selector_order() {
        let id = |s: &str| SpiffeId::new(s).unwrap();
        let sel = |s: &str| Selector::parse(s).unwrap();
        let a = NewEntry::new(
            id("spiffe://td/a"),
            id("spiffe://td/p"),
            [sel("unix:uid:1"), sel("unix:gid:2")].into_iter().collect(),
        );
        let mut b = a.clone();
        b.selectors = [sel("unix:gid:2"), sel("unix:uid:1")].into_iter().collect();
        b.hint = "other".into();
        assert_eq!(a.identity_key(), b.identity_key());
        let mut c = a.clone();
        c.parent_id = id("spiffe://td/q");
        assert_ne!(a.identity_key(), c.identity_key());
        let mut d = a.clone();
        d.selectors = [sel("unix:uid:1")].into_iter().collect();
        assert_ne!(a.identity_key(), d.identity_key());
    }

    #[test]
    fn join_token_debug_is_redacted() {
        let token = JoinToken {
            token_hash: "s3cret".into(),
            expires_at: SystemTime::UNIX_EPOCH,
            created_at: SystemTime::UNIX_EPOCH,
            alias_spiffe_id: None,
        };
        assert!(!format!("{token:?}").contains("s3cret"));
    }

    /// An error that a variant wraps and quotes is printed once in the report of the whole
    /// chain that a daemon's fatal error gets (`sigil_daemon::report`).
    #[test]
    fn a_wrapped_error_is_printed_once_in_a_chain() {
        let wrapped = [
            StoreError::Io(std::io::Error::other("disk gone")),
            StoreError::Backend(::sled::Error::Io(std::io::Error::other("disk gone"))),
        ];
        for error in wrapped {
            let report = sigil_daemon::report(anyhow::Error::new(error).as_ref());
            assert_eq!(report.matches("disk gone").count(), 1, "{report}");
        }
    }
}
