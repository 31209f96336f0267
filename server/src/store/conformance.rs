//! The conformance suite that every [`Store`] backend passes.
//!
//! [`run_all`] runs every behaviour below, each on a fresh store. A backend's tests call it from
//! a multi-thread tokio runtime (the concurrency behaviours need real parallelism):
//!
//! ```ignore
//! #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
//! async fn passes_the_conformance_suite() {
//!     conformance::run_all(|config| async move {
//!         let dir = tempfile::tempdir().unwrap();
//!         (MyStore::open(dir.path(), config.change_retention), dir)
//!     })
//!     .await;
//! }
//! ```
//!
//! Besides [`Store`], a backend implements [`TestableStore`]: the calls only the suite makes.
//!
//! Each behaviour is also public, so a backend can run one alone while debugging it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test suite"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sigil_core::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tokio::sync::Barrier;

use crate::audit::{
    self, AuditCheckpoint, AuditFilter, AuditRecord, AuditSource, GENESIS_HASH, NewAuditRecord,
    SourceEvent,
};

use super::{
    AttestedNode, Change, ChangeKind, ChangesSince, DEFAULT_PAGE_SIZE, EntryFilter, EntryId,
    JoinToken, NewEntry, PageRequest, RegistrationEntry, Revocation, RevocationReason,
    ServerBundles, Session, SessionCredential, SessionEntryOp, SessionFilter, SessionId,
    SessionJwt, SessionSerial, SessionState, SessionUpdate, Store, StoreError,
};

/// What the suite needs of a backend beyond [`Store`]: calls that only tests make, kept out of
/// the trait that a backend must implement for the server.
#[async_trait]
pub(crate) trait TestableStore: Store {
    /// The entries whose parent is `parent_id`, in ascending [`EntryId`] order, read through an
    /// index.
    async fn entries_by_parent(
        &self,
        parent_id: &SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, StoreError>;
}

/// What the suite asks of a fresh store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TestConfig {
    /// How many changes the store must retain before pruning.
    pub change_retention: u64,
}

/// The retention [`changes_expire_after_retention`] runs with.
const SMALL_RETENTION: u64 = 10;

/// Runs every behaviour on a fresh store made by `new_store`. The guard the factory returns with
/// each store (a temporary directory, a test database) is dropped after that store.
pub(crate) async fn run_all<S, G, F, Fut>(new_store: F)
where
    S: TestableStore + 'static,
    F: Fn(TestConfig) -> Fut,
    Fut: std::future::Future<Output = (S, G)>,
{
    let default = TestConfig {
        change_retention: super::DEFAULT_CHANGE_RETENTION,
    };
    macro_rules! run {
        ($behaviour:ident) => {
            run!($behaviour, default, )
        };
        ($behaviour:ident, $config:expr, $($arg:expr),*) => {{
            eprintln!("store conformance: {}", stringify!($behaviour));
            let (store, guard) = new_store($config).await;
            // Coerced to what the behaviour takes: `Arc<dyn Store>` or `Arc<dyn TestableStore>`.
            let store = Arc::new(store);
            $behaviour(store, $($arg),*).await;
            drop(guard);
        }};
    }
    run!(entry_crud);
    run!(duplicate_entry_rejected);
    run!(batch_create_returns_one_result_per_input);
    run!(pagination_covers_every_entry_once);
    run!(list_filters);
    run!(entries_by_parent_follows_updates_and_deletes);
    run!(revisions_strictly_increasing);
    run!(changes_since_resumes_exactly_after_a_revision);
    run!(
        changes_expire_after_retention,
        TestConfig {
            change_retention: SMALL_RETENTION
        },
        SMALL_RETENTION
    );
    run!(subscribe_wakes_on_a_write);
    run!(delete_appears_in_the_feed_with_the_last_version);
    run!(snapshot_then_changes_is_exact);
    run!(node_crud);
    run!(node_pagination);
    run!(join_token_create_and_consume);
    run!(join_token_consumed_exactly_once_under_concurrency);
    run!(expired_join_token_consumed_and_refused);
    run!(prune_join_tokens_removes_only_expired_ones);
    run!(a_job_nobody_else_runs_runs_once_and_in_turn);
    run!(federated_bundles_round_trip);
    run!(federation_relationships_keep_their_bundles_and_fetches_in_step);
    run!(ca_journal_round_trip);
    run!(published_bundles_raise_one_shared_sequence);
    run!(audit_chain_links_and_head);
    run!(audit_concurrent_appends_never_fork);
    run!(audit_pagination_and_filters);
    run!(audit_checkpoints_round_trip);
    run!(audit_source_events_are_appended_once);
    run!(audit_source_events_race_to_one_copy);
    run!(session_lifecycle_moves_its_entry_atomically);
    run!(revocations_round_trip_and_prune);
    run!(crl_counters_tell_other_servers_to_re_sign_and_reload);
    run!(crl_numbers_only_rise);
}

// --- privileged sessions ---

fn session(state: SessionState, ticket: &str) -> Session {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    Session {
        id: SessionId::generate().unwrap(),
        spiffe_id: spiffe("spiffe://example.org/admin/db"),
        parent_id: agent("a"),
        selectors: selectors(&["unix:uid:0"]),
        ticket: ticket.to_owned(),
        reason: "fix".to_owned(),
        state,
        requester: "uid:0".to_owned(),
        approver: None,
        approval_required: state == SessionState::Pending,
        opened_at: now,
        approved_at: None,
        expires_at: now + Duration::from_secs(900),
        ended_at: None,
        ended_by: None,
        end_reason: None,
        svid_ttl: Duration::from_secs(300),
        serials: vec![],
        jwts: vec![],
        entry_id: None,
    }
}

fn session_entry(s: &Session) -> NewEntry {
    let mut e = NewEntry::new(
        s.spiffe_id.clone(),
        s.parent_id.clone(),
        s.selectors.clone(),
    );
    e.session_id = Some(s.id.clone());
    e.expires_at = Some(s.expires_at);
    e
}

/// A pending session has no entry; approval creates it and close deletes it, each in the
/// change feed; a stale expected state changes nothing; serials accumulate; filters work.
pub(crate) async fn session_lifecycle_moves_its_entry_atomically(store: Arc<dyn Store>) {
    let pending = session(SessionState::Pending, "CHG-1");
    let created = store
        .create_session(pending.clone(), None, vec![])
        .await
        .unwrap();
    assert_eq!(created, pending);
    assert!(matches!(
        store.create_session(pending.clone(), None, vec![]).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    let before = store.current_revision().await.unwrap();

    let mut active = created.clone();
    active.state = SessionState::Active;
    active.approver = Some("uid:1000".to_owned());
    let audit_before = store.audit_head().await.unwrap().map_or(0, |h| h.sequence);
    let approval_record = || {
        vec![NewAuditRecord::new(
            "uid:1000",
            audit::action::SESSION_APPROVE,
            active.spiffe_id.to_string(),
        )]
    };
    let approved = store
        .update_session(SessionUpdate {
            session: active.clone(),
            expected: SessionState::Pending,
            entry: SessionEntryOp::Create(Box::new(session_entry(&active))),
            revocations: vec![],
            audit: approval_record(),
        })
        .await
        .unwrap();
    // The approval's record was written with it.
    let head = store.audit_head().await.unwrap().unwrap();
    assert_eq!(head.sequence, audit_before + 1);
    let written = all_audit(&store, &AuditFilter::default(), 100).await;
    assert_eq!(
        written.last().unwrap().action,
        audit::action::SESSION_APPROVE
    );
    let entry_id = approved.entry_id.clone().unwrap();
    let entry = store.get_entry(&entry_id).await.unwrap().unwrap();
    assert_eq!(entry.session_id, Some(active.id.clone()));
    let ChangesSince::Changes(changes) = store.changes_since(before, 10).await.unwrap() else {
        panic!("changes expected");
    };
    assert!(
        matches!(&changes[..], [Change { kind: ChangeKind::EntryUpserted(e), .. }] if e.id == entry_id)
    );

    // A second approval, made from the stale state, is refused and changes nothing.
    let err = store
        .update_session(SessionUpdate {
            session: active.clone(),
            expected: SessionState::Pending,
            entry: SessionEntryOp::Create(Box::new(session_entry(&active))),
            revocations: vec![],
            audit: approval_record(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::StateChanged { .. }), "{err}");
    // ...its record included.
    assert_eq!(store.audit_head().await.unwrap(), Some(head));

    let serial = SessionSerial {
        serial: "0a0b".to_owned(),
        not_after: active.expires_at,
        authority_id: "01".to_owned(),
    };
    let with_serial = store
        .add_session_credential(&active.id, SessionCredential::X509(serial.clone()))
        .await
        .unwrap();
    assert_eq!(with_serial.serials, std::slice::from_ref(&serial));
    let jwt = SessionJwt {
        jti: "0c0d".to_owned(),
        audience: vec!["db".to_owned()],
        expires_at: active.expires_at,
    };
    let with_jwt = store
        .add_session_credential(&active.id, SessionCredential::Jwt(jwt.clone()))
        .await
        .unwrap();
    assert_eq!(with_jwt.serials, std::slice::from_ref(&serial));
    assert_eq!(with_jwt.jwts, std::slice::from_ref(&jwt));
    assert_eq!(
        store.get_session(&active.id).await.unwrap().unwrap().jwts,
        [jwt]
    );

    let mut revoked = approved.clone();
    revoked.state = SessionState::Revoked;
    revoked.serials.clear();
    revoked.jwts.clear();
    let revision = store.current_revision().await.unwrap();
    let ended = store
        .update_session(SessionUpdate {
            session: revoked,
            expected: SessionState::Active,
            entry: SessionEntryOp::Delete,
            revocations: vec![Revocation {
                serial: serial.serial.clone(),
                not_after: serial.not_after,
                authority_id: Some(serial.authority_id.clone()),
                revoked_at: active.opened_at,
                cause: format!("session:{}", active.id),
                reason: RevocationReason::PrivilegeWithdrawn,
            }],
            audit: vec![],
        })
        .await
        .unwrap();
    assert_eq!(
        ended.serials,
        std::slice::from_ref(&serial),
        "serials survive the update"
    );
    assert_eq!(ended.jwts.len(), 1, "jwt ids survive the update");
    assert_eq!(ended.entry_id, Some(entry_id.clone()));
    assert!(store.get_entry(&entry_id).await.unwrap().is_none());
    let ChangesSince::Changes(changes) = store.changes_since(revision, 10).await.unwrap() else {
        panic!("changes expected");
    };
    assert!(
        matches!(&changes[..], [Change { kind: ChangeKind::EntryDeleted(e), .. }] if e.id == entry_id)
    );
    assert_eq!(store.list_revocations().await.unwrap().len(), 1);
    assert_eq!(
        store.get_session(&active.id).await.unwrap().unwrap().state,
        SessionState::Revoked
    );

    let other = store
        .create_session(session(SessionState::Pending, "CHG-2"), None, vec![])
        .await
        .unwrap();
    let all = store
        .list_sessions(&SessionFilter::default(), &PageRequest::first(1))
        .await
        .unwrap();
    assert_eq!(all.items.len(), 1);
    let token = all.next_page_token.unwrap();
    let rest = store
        .list_sessions(&SessionFilter::default(), &PageRequest::after(1, token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert!(rest.next_page_token.is_none());
    let by_ticket = store
        .list_sessions(
            &SessionFilter {
                state: None,
                ticket: Some("CHG-2".to_owned()),
            },
            &PageRequest::first(0),
        )
        .await
        .unwrap();
    assert_eq!(by_ticket.items, [other]);
    let revoked_only = store
        .list_sessions(
            &SessionFilter {
                state: Some(SessionState::Revoked),
                ticket: None,
            },
            &PageRequest::first(0),
        )
        .await
        .unwrap();
    assert_eq!(revoked_only.items.len(), 1);
}

/// Revocations are listed in serial order and pruned once their certificate expired.
/// CRL numbers: at least what is asked, always above the last one handed out, and counted
/// apart for each authority.
pub(crate) async fn crl_numbers_only_rise(store: Arc<dyn Store>) {
    assert_eq!(store.next_crl_number("a", 1_000).await.unwrap(), 1_000);
    assert_eq!(store.next_crl_number("a", 5_000).await.unwrap(), 5_000);
    // A clock that stepped back asks for less: it gets the next number all the same.
    assert_eq!(store.next_crl_number("a", 2_000).await.unwrap(), 5_001);
    assert_eq!(store.next_crl_number("a", 0).await.unwrap(), 5_002);
    // Another authority (another server's CA) has numbers of its own.
    assert_eq!(store.next_crl_number("b", 2_000).await.unwrap(), 2_000);
    assert_eq!(store.next_crl_number("a", 0).await.unwrap(), 5_003);
    // Concurrent callers never get the same number.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(
            async move { store.next_crl_number("c", 7).await },
        ));
    }
    let mut numbers = BTreeSet::new();
    for task in tasks {
        assert!(numbers.insert(task.await.unwrap().unwrap()));
    }
    assert_eq!(numbers, (7..23).collect::<BTreeSet<u64>>());
}

/// Adding revocations raises the revocation counter; saving a server's CRLs raises the CRL
/// counter and keeps each server's CRLs apart; neither counter moves otherwise.
pub(crate) async fn crl_counters_tell_other_servers_to_re_sign_and_reload(store: Arc<dyn Store>) {
    let start = store.crl_counters().await.unwrap();
    store
        .add_revocations(vec![Revocation {
            serial: "aa".to_owned(),
            not_after: SystemTime::now() + Duration::from_secs(60),
            authority_id: Some("x".to_owned()),
            revoked_at: SystemTime::now(),
            cause: "uid:0".to_owned(),
            reason: RevocationReason::PrivilegeWithdrawn,
        }])
        .await
        .unwrap();
    let after_revoke = store.crl_counters().await.unwrap();
    assert!(after_revoke.revocations > start.revocations);
    assert_eq!(after_revoke.crls, start.crls);
    // An empty batch revokes nothing and tells nobody.
    store.add_revocations(vec![]).await.unwrap();
    assert_eq!(store.crl_counters().await.unwrap(), after_revoke);

    store.save_server_crls("b", b"[1]".to_vec()).await.unwrap();
    store.save_server_crls("a", b"[2]".to_vec()).await.unwrap();
    store.save_server_crls("b", b"[3]".to_vec()).await.unwrap();
    let after_saves = store.crl_counters().await.unwrap();
    assert_eq!(after_saves.revocations, after_revoke.revocations);
    assert!(after_saves.crls >= after_revoke.crls + 3);
    assert_eq!(
        store.server_crls().await.unwrap(),
        [
            ("a".to_owned(), b"[2]".to_vec()),
            ("b".to_owned(), b"[3]".to_vec())
        ]
    );
}

pub(crate) async fn revocations_round_trip_and_prune(store: Arc<dyn Store>) {
    let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
    let revocation = |serial: &str, not_after: u64| Revocation {
        serial: serial.to_owned(),
        not_after: t(not_after),
        authority_id: None,
        revoked_at: t(1),
        cause: "agent:spiffe://example.org/sigil/agent/x".to_owned(),
        reason: RevocationReason::Unspecified,
    };
    store
        .add_revocations(vec![revocation("bb", 100), revocation("aa", 200)])
        .await
        .unwrap();
    // Listing a serial again replaces it, reason included.
    store
        .add_revocations(vec![Revocation {
            reason: RevocationReason::CessationOfOperation,
            ..revocation("aa", 200)
        }])
        .await
        .unwrap();
    let reasons: Vec<_> = store
        .list_revocations()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.reason)
        .collect();
    assert_eq!(
        reasons,
        [
            RevocationReason::CessationOfOperation,
            RevocationReason::Unspecified
        ]
    );
    let listed: Vec<_> = store
        .list_revocations()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.serial)
        .collect();
    assert_eq!(listed, ["aa", "bb"]);
    assert_eq!(store.prune_revocations(t(100)).await.unwrap(), 1);
    let listed: Vec<_> = store
        .list_revocations()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.serial)
        .collect();
    assert_eq!(listed, ["aa"]);
}

// --- registration entries ---

/// Create, get, update (revision bumped, id and `created_at` kept), delete (returns the last
/// version), and `NotFound` for a missing entry.
pub(crate) async fn entry_crud(store: Arc<dyn Store>) {
    let parent = agent("a");
    let mut new = workload(1, &parent);
    new.x509_svid_ttl = Some(Duration::from_secs(600));
    new.jwt_svid_ttl = Some(Duration::from_secs(300));
    new.dns_names = vec!["web.example.org".to_owned()];
    new.hint = "web".to_owned();
    new.expires_at = Some(SystemTime::UNIX_EPOCH + Duration::new(2_000_000_000, 123_456_789));

    let created = store.create_entry(new.clone()).await.unwrap();
    assert_eq!(created.to_new(), new);
    assert_eq!(created.id.as_str().len(), 32);
    assert!(created.revision > 0);
    assert_eq!(
        store.get_entry(&created.id).await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(store.count_entries().await.unwrap(), 1);

    let mut changed = new.clone();
    changed.hint = "api".to_owned();
    changed.selectors = selectors(&["unix:uid:1", "unix:gid:2"]);
    let updated = store
        .update_entry(&created.id, changed.clone())
        .await
        .unwrap();
    assert_eq!(updated.id, created.id);
    assert_eq!(updated.created_at, created.created_at);
    assert!(updated.revision > created.revision);
    assert_eq!(updated.to_new(), changed);
    assert_eq!(
        store.get_entry(&created.id).await.unwrap(),
        Some(updated.clone())
    );
    assert_eq!(store.count_entries().await.unwrap(), 1);

    // Moved under another parent: still one entry.
    let mut moved = changed.clone();
    moved.parent_id = agent("moved");
    let updated = store.update_entry(&created.id, moved).await.unwrap();
    assert_eq!(store.count_entries().await.unwrap(), 1);

    let deleted = store.delete_entry(&created.id).await.unwrap();
    assert_eq!(deleted, updated);
    assert_eq!(store.get_entry(&created.id).await.unwrap(), None);
    assert_eq!(store.count_entries().await.unwrap(), 0);

    let missing = EntryId::generate().unwrap();
    assert!(store.get_entry(&missing).await.unwrap().is_none());
    assert!(matches!(
        store.update_entry(&missing, new.clone()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_entry(&created.id).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// An entry with the same SPIFFE ID, parent ID and selectors as another is refused, on create
/// and on update; other fields do not make it different; deleting frees the triple.
pub(crate) async fn duplicate_entry_rejected(store: Arc<dyn Store>) {
    let parent = agent("a");
    let a = store.create_entry(workload(1, &parent)).await.unwrap();

    let mut same = workload(1, &parent);
    same.hint = "different hint".to_owned();
    same.dns_names = vec!["x.example.org".to_owned()];
    match store.create_entry(same.clone()).await {
        Err(StoreError::AlreadyExists { key, .. }) => assert_eq!(key, a.id.as_str()),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }

    let mut other_selectors = workload(1, &parent);
    other_selectors.selectors = selectors(&["unix:uid:1", "unix:gid:7"]);
    let b = store.create_entry(other_selectors).await.unwrap();
    let mut other_parent = workload(1, &agent("b"));
    other_parent.hint = "other parent".to_owned();
    store.create_entry(other_parent).await.unwrap();

    assert!(matches!(
        store.update_entry(&b.id, workload(1, &parent)).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    // Updating an entry to its own triple is not a duplicate.
    let a2 = store.update_entry(&a.id, same.clone()).await.unwrap();
    assert_eq!(a2.hint, "different hint");

    store.delete_entry(&a.id).await.unwrap();
    let again = store.create_entry(workload(1, &parent)).await.unwrap();
    assert_ne!(again.id, a.id);
    assert_eq!(store.count_entries().await.unwrap(), 3);
}

/// `create_entries` returns one result per input, in order; duplicates (of stored entries or of
/// earlier inputs) fail alone.
pub(crate) async fn batch_create_returns_one_result_per_input(store: Arc<dyn Store>) {
    let parent = agent("a");
    let existing = store.create_entry(workload(0, &parent)).await.unwrap();
    let inputs = vec![
        workload(1, &parent),
        workload(2, &parent),
        workload(1, &parent),
        workload(3, &parent),
        workload(0, &parent),
    ];
    let results = store.create_entries(inputs.clone()).await.unwrap();
    assert_eq!(results.len(), inputs.len());
    let mut last_revision = existing.revision;
    for (index, (result, input)) in results.iter().zip(&inputs).enumerate() {
        match (index, result) {
            (2 | 4, Err(StoreError::AlreadyExists { .. })) => {}
            (0 | 1 | 3, Ok(entry)) => {
                assert_eq!(entry.to_new(), *input);
                assert!(entry.revision > last_revision);
                last_revision = entry.revision;
                assert_eq!(
                    store.get_entry(&entry.id).await.unwrap().as_ref(),
                    Some(entry)
                );
            }
            (index, other) => panic!("input {index}: unexpected {other:?}"),
        }
    }
    assert_eq!(store.count_entries().await.unwrap(), 4);
    assert!(store.create_entries(Vec::new()).await.unwrap().is_empty());
}

/// Paging through 2,500 entries (page size 1,000) visits each exactly once, in ascending id
/// order, with or without a filter; a foreign page token is refused.
pub(crate) async fn pagination_covers_every_entry_once(store: Arc<dyn Store>) {
    let (a, b) = (agent("a"), agent("b"));
    let inputs = (0..2_500)
        .map(|n| workload(n, if n % 2 == 0 { &a } else { &b }))
        .collect();
    let created: Vec<RegistrationEntry> = store
        .create_entries(inputs)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(store.count_entries().await.unwrap(), 2_500);

    let (ids, sizes) = page_through(&store, &EntryFilter::default(), 1_000).await;
    assert_eq!(sizes, vec![1_000, 1_000, 500]);
    let expected: BTreeSet<EntryId> = created.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, expected.iter().cloned().collect::<Vec<_>>());

    let first = store
        .list_entries(&EntryFilter::default(), &PageRequest::first(0))
        .await
        .unwrap();
    assert_eq!(first.items.len(), DEFAULT_PAGE_SIZE);

    let filter = EntryFilter {
        parent_id: Some(a.clone()),
        ..EntryFilter::default()
    };
    let (ids, sizes) = page_through(&store, &filter, 300).await;
    assert_eq!(sizes.iter().sum::<usize>(), 1_250);
    let expected: Vec<EntryId> = created
        .iter()
        .filter(|e| e.parent_id == a)
        .map(|e| e.id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(ids, expected);

    for token in ["zz", "", "not hex at all"] {
        let page = PageRequest::after(10, token.to_owned());
        assert!(matches!(
            store.list_entries(&EntryFilter::default(), &page).await,
            Err(StoreError::InvalidPageToken)
        ));
    }
}

/// The filters of `list_entries`: by SPIFFE ID, by parent ID, by selector, and together.
pub(crate) async fn list_filters(store: Arc<dyn Store>) {
    let (a, b) = (agent("a"), agent("b"));
    let web = spiffe("spiffe://example.org/web");
    let mut entries = Vec::new();
    for (spiffe_id, parent, sels) in [
        (&web, &a, &["unix:uid:1"][..]),
        (&web, &b, &["unix:uid:1", "unix:gid:5"][..]),
        (&spiffe("spiffe://example.org/db"), &a, &["unix:gid:5"][..]),
        (&spiffe("spiffe://example.org/db"), &b, &["unix:uid:2"][..]),
    ] {
        let new = NewEntry::new(spiffe_id.clone(), parent.clone(), selectors(sels));
        entries.push(store.create_entry(new).await.unwrap());
    }
    let list = |filter: EntryFilter| {
        let store = Arc::clone(&store);
        async move {
            store
                .list_entries(&filter, &PageRequest::first(100))
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|e| e.id)
                .collect::<BTreeSet<_>>()
        }
    };
    let ids = |indexes: &[usize]| indexes.iter().map(|&i| entries[i].id.clone()).collect();

    assert_eq!(list(EntryFilter::default()).await, ids(&[0, 1, 2, 3]));
    let by_spiffe = EntryFilter {
        spiffe_id: Some(web.clone()),
        ..EntryFilter::default()
    };
    assert_eq!(list(by_spiffe).await, ids(&[0, 1]));
    let by_parent = EntryFilter {
        parent_id: Some(b.clone()),
        ..EntryFilter::default()
    };
    assert_eq!(list(by_parent).await, ids(&[1, 3]));
    let by_selector = EntryFilter {
        selector: Some(Selector::parse("unix:gid:5").unwrap()),
        ..EntryFilter::default()
    };
    assert_eq!(list(by_selector).await, ids(&[1, 2]));
    let all_three = EntryFilter {
        spiffe_id: Some(web.clone()),
        parent_id: Some(b.clone()),
        selector: Some(Selector::parse("unix:uid:1").unwrap()),
    };
    assert_eq!(list(all_three).await, ids(&[1]));
    let none = EntryFilter {
        spiffe_id: Some(web),
        selector: Some(Selector::parse("unix:uid:2").unwrap()),
        ..EntryFilter::default()
    };
    assert_eq!(list(none).await, BTreeSet::new());
}

/// `entries_by_parent` follows creates, re-parenting updates and deletes.
pub(crate) async fn entries_by_parent_follows_updates_and_deletes(store: Arc<dyn TestableStore>) {
    let (a, b) = (agent("a"), agent("b"));
    let e1 = store.create_entry(workload(1, &a)).await.unwrap();
    let e2 = store.create_entry(workload(2, &a)).await.unwrap();
    let e3 = store.create_entry(workload(3, &b)).await.unwrap();
    // A workload's own ID as a parent (nested entries).
    let nested = store
        .create_entry(workload(4, &e1.spiffe_id))
        .await
        .unwrap();

    let ids = |entries: Vec<RegistrationEntry>| {
        entries.into_iter().map(|e| e.id).collect::<BTreeSet<_>>()
    };
    let set = |list: &[&RegistrationEntry]| list.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        ids(store.entries_by_parent(&a).await.unwrap()),
        set(&[&e1, &e2])
    );
    assert_eq!(ids(store.entries_by_parent(&b).await.unwrap()), set(&[&e3]));
    assert_eq!(
        ids(store.entries_by_parent(&e1.spiffe_id).await.unwrap()),
        set(&[&nested])
    );
    let listed = store.entries_by_parent(&a).await.unwrap();
    assert!(listed.windows(2).all(|w| w[0].id < w[1].id));

    let mut moved = e2.to_new();
    moved.parent_id = b.clone();
    let e2 = store.update_entry(&e2.id, moved).await.unwrap();
    assert_eq!(ids(store.entries_by_parent(&a).await.unwrap()), set(&[&e1]));
    assert_eq!(
        ids(store.entries_by_parent(&b).await.unwrap()),
        set(&[&e2, &e3])
    );

    store.delete_entry(&e3.id).await.unwrap();
    assert_eq!(ids(store.entries_by_parent(&b).await.unwrap()), set(&[&e2]));
    assert!(
        store
            .entries_by_parent(&agent("nobody"))
            .await
            .unwrap()
            .is_empty()
    );
}

// --- change feed ---

/// Every mutation, sequential or concurrent, takes a new revision; the feed has exactly one
/// change per revision, gap-free, and `current_revision` reaches the last one.
pub(crate) async fn revisions_strictly_increasing(store: Arc<dyn Store>) {
    let start = store.current_revision().await.unwrap();
    let parent = agent("a");
    let mut revisions = Vec::new();
    let e = store.create_entry(workload(1, &parent)).await.unwrap();
    revisions.push(e.revision);
    let mut new = e.to_new();
    new.hint = "updated".to_owned();
    revisions.push(store.update_entry(&e.id, new).await.unwrap().revision);
    let batch = store
        .create_entries(vec![workload(2, &parent), workload(3, &parent)])
        .await
        .unwrap();
    revisions.extend(batch.into_iter().map(|r| r.unwrap().revision));
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    let deleted_at = store.current_revision().await.unwrap();
    store.delete_entry(&e.id).await.unwrap();
    assert!(store.current_revision().await.unwrap() > deleted_at);

    let tasks: Vec<_> = (100..132)
        .map(|n| {
            let store = Arc::clone(&store);
            let parent = parent.clone();
            tokio::spawn(async move { store.create_entry(workload(n, &parent)).await.unwrap() })
        })
        .collect();
    let mut concurrent = BTreeSet::new();
    for task in tasks {
        let entry = task.await.unwrap();
        assert!(store.current_revision().await.unwrap() >= entry.revision);
        assert!(concurrent.insert(entry.revision), "revision reused");
    }
    assert_eq!(concurrent.len(), 32);

    let changes = all_changes_since(&store, start).await;
    let feed: Vec<u64> = changes.iter().map(|c| c.revision).collect();
    let expected: Vec<u64> = (start + 1..=start + feed.len() as u64).collect();
    assert_eq!(feed, expected, "feed revisions must be gap-free");
    assert_eq!(feed.len(), 5 + 32);
    assert_eq!(store.current_revision().await.unwrap(), start + 37);
    for change in &changes {
        if let ChangeKind::EntryUpserted(entry) = &change.kind {
            assert_eq!(entry.revision, change.revision);
        }
    }
}

/// `changes_since(r)` starts exactly at `r + 1`, honours its limit, is empty at the current
/// revision, and answers `Expired` for a revision the store never issued.
pub(crate) async fn changes_since_resumes_exactly_after_a_revision(store: Arc<dyn Store>) {
    let start = store.current_revision().await.unwrap();
    let parent = agent("a");
    let mut created = Vec::new();
    for n in 0..10 {
        created.push(store.create_entry(workload(n, &parent)).await.unwrap());
    }
    let ChangesSince::Changes(all) = store.changes_since(start, 100).await.unwrap() else {
        panic!("expected changes");
    };
    assert_eq!(all.len(), 10);
    for (change, entry) in all.iter().zip(&created) {
        assert_eq!(change.revision, entry.revision);
        assert_eq!(change.kind, ChangeKind::EntryUpserted(entry.clone()));
    }

    let resume = created[4].revision;
    let ChangesSince::Changes(rest) = store.changes_since(resume, 100).await.unwrap() else {
        panic!("expected changes");
    };
    assert_eq!(rest.first().unwrap().revision, resume + 1);
    assert_eq!(rest, all[5..].to_vec());

    let ChangesSince::Changes(limited) = store.changes_since(resume, 3).await.unwrap() else {
        panic!("expected changes");
    };
    assert_eq!(limited, all[5..8].to_vec());

    let current = store.current_revision().await.unwrap();
    assert_eq!(current, created[9].revision);
    assert_eq!(
        store.changes_since(current, 100).await.unwrap(),
        ChangesSince::Changes(Vec::new())
    );
    assert_eq!(
        store.changes_since(current + 1_000, 100).await.unwrap(),
        ChangesSince::Expired
    );
}

/// Once more than `retention` changes were made, asking for changes older than the window
/// answers `Expired`; the window itself is still served.
pub(crate) async fn changes_expire_after_retention(store: Arc<dyn Store>, retention: u64) {
    let start = store.current_revision().await.unwrap();
    let parent = agent("a");
    for n in 0..(retention * 2 + 5) {
        store
            .create_entry(workload(n as usize, &parent))
            .await
            .unwrap();
    }
    let current = store.current_revision().await.unwrap();
    assert_eq!(current, start + retention * 2 + 5);
    match store
        .changes_since(current - retention, 1_000)
        .await
        .unwrap()
    {
        ChangesSince::Changes(changes) => {
            assert_eq!(changes.len() as u64, retention);
            assert_eq!(changes.first().unwrap().revision, current - retention + 1);
        }
        ChangesSince::Expired => panic!("the retained window must be served"),
    }
    assert_eq!(
        store
            .changes_since(current - retention - 1, 1_000)
            .await
            .unwrap(),
        ChangesSince::Expired
    );
    assert_eq!(
        store.changes_since(start, 1_000).await.unwrap(),
        ChangesSince::Expired
    );
    // A snapshot still works, and the feed resumes after it.
    let snapshot = store.snapshot_entries().await.unwrap();
    assert_eq!(snapshot.revision, current);
    assert_eq!(snapshot.entries.len() as u64, retention * 2 + 5);
    assert_eq!(
        store.changes_since(snapshot.revision, 10).await.unwrap(),
        ChangesSince::Changes(Vec::new())
    );
}

/// A receiver from `subscribe` wakes when a write becomes durable, and then shows a revision at
/// least as high as the write's.
pub(crate) async fn subscribe_wakes_on_a_write(store: Arc<dyn Store>) {
    let mut receiver = store.subscribe();
    let before = *receiver.borrow_and_update();
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.create_entry(workload(1, &agent("a"))).await.unwrap() })
    };
    tokio::time::timeout(Duration::from_secs(10), receiver.changed())
        .await
        .expect("subscribe did not wake on a write")
        .unwrap();
    let entry = writer.await.unwrap();
    assert!(*receiver.borrow() > before);
    let seen = tokio::time::timeout(
        Duration::from_secs(10),
        receiver.wait_for(|revision| *revision >= entry.revision),
    )
    .await
    .expect("the durable revision never reached the write's")
    .map(|revision| *revision)
    .unwrap();
    assert!(seen >= entry.revision);
    assert!(store.current_revision().await.unwrap() >= entry.revision);
}

/// A deletion appears in the feed, under its own revision, with the entry's last version.
pub(crate) async fn delete_appears_in_the_feed_with_the_last_version(store: Arc<dyn Store>) {
    let created = store.create_entry(workload(1, &agent("a"))).await.unwrap();
    let mut new = created.to_new();
    new.hint = "last version".to_owned();
    let updated = store.update_entry(&created.id, new).await.unwrap();
    let deleted = store.delete_entry(&created.id).await.unwrap();
    assert_eq!(deleted, updated);
    let ChangesSince::Changes(changes) = store.changes_since(updated.revision, 10).await.unwrap()
    else {
        panic!("expected changes");
    };
    assert_eq!(
        changes,
        vec![Change {
            revision: updated.revision + 1,
            kind: ChangeKind::EntryDeleted(updated),
        }]
    );
}

/// Snapshots taken while writers run are exact: each equals a replay of the feed up to its
/// revision, and a snapshot plus the changes after it equals the final state.
pub(crate) async fn snapshot_then_changes_is_exact(store: Arc<dyn Store>) {
    let parent = agent("a");
    let initial: Vec<RegistrationEntry> = store
        .create_entries((0..200).map(|n| workload(n, &parent)).collect())
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let base = store.snapshot_entries().await.unwrap();
    assert_eq!(base.entries.len(), 200);

    let writer = {
        let store = Arc::clone(&store);
        let parent = parent.clone();
        tokio::spawn(async move {
            for (step, entry) in initial.iter().enumerate().take(150) {
                match step % 3 {
                    0 => {
                        store.delete_entry(&entry.id).await.unwrap();
                    }
                    1 => {
                        let mut new = entry.to_new();
                        new.hint = format!("step {step}");
                        store.update_entry(&entry.id, new).await.unwrap();
                    }
                    _ => {
                        store
                            .create_entry(workload(1_000 + step, &parent))
                            .await
                            .unwrap();
                    }
                }
            }
        })
    };
    let mut snapshots = Vec::new();
    while !writer.is_finished() {
        snapshots.push(store.snapshot_entries().await.unwrap());
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    snapshots.push(store.snapshot_entries().await.unwrap());

    // The feed from the empty store rebuilds each snapshot exactly.
    let feed = all_changes_since(&store, 0).await;
    for snapshot in &snapshots {
        let replayed = apply(
            BTreeMap::new(),
            feed.iter().filter(|c| c.revision <= snapshot.revision),
        );
        assert_eq!(
            snapshot.entries,
            replayed.into_values().collect::<Vec<_>>(),
            "snapshot at revision {} is not exact",
            snapshot.revision
        );
        assert!(snapshot.entries.windows(2).all(|w| w[0].id < w[1].id));
    }

    // A sync that starts from the first snapshot and follows the feed ends where the store is.
    let first = &snapshots[0];
    let start = first
        .entries
        .iter()
        .map(|e| (e.id.clone(), e.clone()))
        .collect();
    let synced = apply(
        start,
        all_changes_since(&store, first.revision).await.iter(),
    );
    let (ids, _) = page_through(&store, &EntryFilter::default(), 1_000).await;
    let mut now = Vec::new();
    for id in ids {
        now.push(store.get_entry(&id).await.unwrap().unwrap());
    }
    assert_eq!(synced.into_values().collect::<Vec<_>>(), now);
    assert_eq!(now.len(), 200 - 50 + 50);
}

// --- attested nodes ---

/// Create (timestamps set by the store), duplicate refused, get, update (keeps `created_at`),
/// delete, and `NotFound` for a missing node.
pub(crate) async fn node_crud(store: Arc<dyn Store>) {
    let before = SystemTime::now();
    let created = store.create_node(node("a")).await.unwrap();
    assert!(created.created_at >= before - Duration::from_secs(1));
    assert_eq!(created.created_at, created.updated_at);
    assert_eq!(created.serial, node("a").serial);
    assert!(matches!(
        store.create_node(node("a")).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(
        store.get_node(&created.spiffe_id).await.unwrap(),
        Some(created.clone())
    );

    let mut changed = created.clone();
    changed.banned = true;
    changed.new_serial = Some("0badc0de".to_owned());
    changed.selectors = selectors(&["join_token:alias:x"]);
    changed.created_at = SystemTime::UNIX_EPOCH;
    let updated = store.update_node(&created, changed.clone()).await.unwrap();
    assert_eq!(updated.created_at, created.created_at);
    assert!(updated.updated_at >= created.updated_at);
    assert!(updated.banned);
    assert_eq!(updated.new_serial, changed.new_serial);
    assert_eq!(updated.selectors, changed.selectors);
    assert_eq!(
        store.get_node(&created.spiffe_id).await.unwrap(),
        Some(updated.clone())
    );
    // A write made from the older read (a renew racing the ban above) changes nothing.
    let mut stale = created.clone();
    stale.new_serial = Some("0ddba11".to_owned());
    assert!(matches!(
        store.update_node(&created, stale).await,
        Err(StoreError::StateChanged { .. })
    ));
    assert_eq!(
        store.get_node(&created.spiffe_id).await.unwrap(),
        Some(updated.clone())
    );

    assert_eq!(
        store.delete_node(&created.spiffe_id).await.unwrap(),
        updated
    );
    assert_eq!(store.get_node(&created.spiffe_id).await.unwrap(), None);
    assert!(matches!(
        store.delete_node(&created.spiffe_id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.update_node(&node("b"), node("b")).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// Paging through 25 nodes, 10 at a time, visits each once in SPIFFE ID order.
pub(crate) async fn node_pagination(store: Arc<dyn Store>) {
    let mut expected = BTreeSet::new();
    for n in 0..25 {
        let created = store.create_node(node(&format!("n{n}"))).await.unwrap();
        expected.insert(created.spiffe_id.to_string());
    }
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut page = PageRequest::first(10);
    loop {
        let result = store.list_nodes(&page).await.unwrap();
        sizes.push(result.items.len());
        seen.extend(result.items.into_iter().map(|n| n.spiffe_id.to_string()));
        match result.next_page_token {
            Some(token) => page = PageRequest::after(10, token),
            None => break,
        }
    }
    assert_eq!(sizes, vec![10, 10, 5]);
    assert_eq!(seen, expected.into_iter().collect::<Vec<_>>());
    assert!(matches!(
        store
            .list_nodes(&PageRequest::after(10, "zz".to_owned()))
            .await,
        Err(StoreError::InvalidPageToken)
    ));
}

// --- join tokens ---

/// A token is created once, consumed once, and unknown afterwards.
pub(crate) async fn join_token_create_and_consume(store: Arc<dyn Store>) {
    let now = SystemTime::now();
    let mut token = join_token("t-1", now + Duration::from_secs(600));
    token.alias_spiffe_id = Some(spiffe("spiffe://example.org/cluster/web"));
    store.create_join_token(token.clone()).await.unwrap();
    assert!(matches!(
        store.create_join_token(token.clone()).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(store.consume_join_token("t-1", now).await.unwrap(), token);
    assert!(matches!(
        store.consume_join_token("t-1", now).await,
        Err(StoreError::TokenNotFound)
    ));
    assert!(matches!(
        store.consume_join_token("never-issued", now).await,
        Err(StoreError::TokenNotFound)
    ));
}

/// 64 tasks race for one token: exactly one gets it, the others get `TokenNotFound`.
pub(crate) async fn join_token_consumed_exactly_once_under_concurrency(store: Arc<dyn Store>) {
    const RACERS: usize = 64;
    let now = SystemTime::now();
    store
        .create_join_token(join_token("contended", now + Duration::from_secs(600)))
        .await
        .unwrap();
    let barrier = Arc::new(Barrier::new(RACERS));
    let tasks: Vec<_> = (0..RACERS)
        .map(|_| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                store.consume_join_token("contended", now).await
            })
        })
        .collect();
    let (mut won, mut lost) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(token) => {
                assert_eq!(token.token_hash, "contended");
                won += 1;
            }
            Err(StoreError::TokenNotFound) => lost += 1,
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!((won, lost), (1, RACERS - 1));
}

/// An expired token is consumed (deleted) and refused; afterwards it is unknown.
pub(crate) async fn expired_join_token_consumed_and_refused(store: Arc<dyn Store>) {
    let now = SystemTime::now();
    store
        .create_join_token(join_token("old", now - Duration::from_secs(1)))
        .await
        .unwrap();
    store
        .create_join_token(join_token("edge", now))
        .await
        .unwrap();
    assert!(matches!(
        store.consume_join_token("old", now).await,
        Err(StoreError::TokenExpired)
    ));
    assert!(matches!(
        store.consume_join_token("old", now).await,
        Err(StoreError::TokenNotFound)
    ));
    // Expiry is inclusive: a token is refused at its expiry instant.
    assert!(matches!(
        store.consume_join_token("edge", now).await,
        Err(StoreError::TokenExpired)
    ));
    assert!(matches!(
        store
            .consume_join_token("edge", now - Duration::from_secs(60))
            .await,
        Err(StoreError::TokenNotFound)
    ));
}

/// `run_job` runs the work of a job no other server runs and returns its result; the same job
/// can run again once it ended (the lock does not outlive the job), and a job run inside
/// another job's work is not held up by it.
pub(crate) async fn a_job_nobody_else_runs_runs_once_and_in_turn(store: Arc<dyn Store>) {
    assert_eq!(
        store
            .run_job("conformance", Box::pin(async { 3 }))
            .await
            .unwrap(),
        Some(3)
    );
    assert_eq!(
        store
            .run_job("conformance", Box::pin(async { 4 }))
            .await
            .unwrap(),
        Some(4)
    );
    let inner = store.clone();
    let nested = store
        .run_job(
            "conformance",
            Box::pin(async move {
                inner
                    .run_job("conformance/other", Box::pin(async { 5 }))
                    .await
                    .unwrap()
                    .unwrap_or(0)
            }),
        )
        .await
        .unwrap();
    assert_eq!(nested, Some(5));
}

/// `prune_join_tokens` deletes the expired tokens and keeps the others.
pub(crate) async fn prune_join_tokens_removes_only_expired_ones(store: Arc<dyn Store>) {
    let now = SystemTime::now();
    for (name, expires_at) in [
        ("gone-1", now - Duration::from_secs(10)),
        ("gone-2", now),
        ("kept", now + Duration::from_secs(10)),
    ] {
        store
            .create_join_token(join_token(name, expires_at))
            .await
            .unwrap();
    }
    assert_eq!(store.prune_join_tokens(now).await.unwrap(), 2);
    assert_eq!(store.prune_join_tokens(now).await.unwrap(), 0);
    assert!(matches!(
        store
            .consume_join_token("gone-1", now - Duration::from_secs(60))
            .await,
        Err(StoreError::TokenNotFound)
    ));
    assert!(store.consume_join_token("kept", now).await.is_ok());
}

// --- federated bundles and CA state ---

/// Bundles are set, replaced, read, listed in trust domain order and deleted, byte for byte.
pub(crate) async fn federated_bundles_round_trip(store: Arc<dyn Store>) {
    let td = |name: &str| TrustDomain::new(name).unwrap();
    let (b, a) = (td("b.example.org"), td("a.example.org"));
    assert_eq!(store.get_federated_bundle(&a).await.unwrap(), None);
    let raw = br#"{"keys":[],"spiffe_sequence":1}"#.to_vec();
    let set = store.set_federated_bundle(&b, raw.clone()).await.unwrap();
    assert_eq!(
        (set.trust_domain.clone(), set.bundle.clone()),
        (b.clone(), raw)
    );
    let binary: Vec<u8> = (0..=255).collect();
    store
        .set_federated_bundle(&a, binary.clone())
        .await
        .unwrap();
    let replaced = br#"{"keys":[],"spiffe_sequence":2}"#.to_vec();
    let set = store
        .set_federated_bundle(&b, replaced.clone())
        .await
        .unwrap();
    assert!(set.updated_at >= SystemTime::UNIX_EPOCH);

    assert_eq!(
        store.get_federated_bundle(&b).await.unwrap(),
        Some(set.clone())
    );
    assert_eq!(
        store
            .get_federated_bundle(&a)
            .await
            .unwrap()
            .unwrap()
            .bundle,
        binary
    );
    let listed = store.list_federated_bundles().await.unwrap();
    let names: Vec<_> = listed.iter().map(|b| b.trust_domain.clone()).collect();
    assert_eq!(names, vec![a.clone(), b.clone()]);

    assert_eq!(store.delete_federated_bundle(&b).await.unwrap(), set);
    assert_eq!(store.get_federated_bundle(&b).await.unwrap(), None);
    assert!(matches!(
        store.delete_federated_bundle(&b).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.list_federated_bundles().await.unwrap().len(), 1);
}

/// Relationships: created once, updated with a new generation, listed in order; a fetch is
/// recorded only at the generation it started from; the bundle goes with the relationship and
/// cannot be deleted while one keeps it.
pub(crate) async fn federation_relationships_keep_their_bundles_and_fetches_in_step(
    store: Arc<dyn Store>,
) {
    use crate::store::{EndpointProfile, FederationRelationship, FetchStatus, Put};
    let td = |name: &str| TrustDomain::new(name).unwrap();
    let (a, b) = (td("a.example.org"), td("b.example.org"));
    let relationship = |trust_domain: &TrustDomain, url: &str| FederationRelationship {
        trust_domain: trust_domain.clone(),
        endpoint_url: url.to_owned(),
        profile: EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: SpiffeId::new("spiffe://b.example.org/sigil/server").unwrap(),
        },
        created_at: SystemTime::UNIX_EPOCH,
        updated_at: SystemTime::UNIX_EPOCH,
        generation: 0,
        status: FetchStatus::default(),
    };
    let bootstrap = br#"{"keys":[],"spiffe_sequence":1}"#.to_vec();
    let created = store
        .put_federation(
            relationship(&b, "https://b/"),
            Some(bootstrap.clone()),
            Put::Create,
        )
        .await
        .unwrap();
    assert!(created.created_at > SystemTime::UNIX_EPOCH);
    let first = created.generation;
    assert_eq!(
        store
            .get_federated_bundle(&b)
            .await
            .unwrap()
            .unwrap()
            .bundle,
        bootstrap
    );
    assert!(matches!(
        store
            .put_federation(relationship(&b, "https://b/"), None, Put::Create)
            .await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store
            .put_federation(relationship(&a, "https://a/"), None, Put::Update)
            .await,
        Err(StoreError::NotFound { .. })
    ));
    let mut web = relationship(&a, "https://a/");
    web.profile = EndpointProfile::HttpsWeb;
    store.put_federation(web, None, Put::Create).await.unwrap();
    assert_eq!(store.get_federated_bundle(&a).await.unwrap(), None);

    // A fetch at generation 1 is recorded, with its bundle.
    let fetched = br#"{"keys":[],"spiffe_sequence":2}"#.to_vec();
    let status = FetchStatus {
        last_error: None,
        last_success: Some(SystemTime::now()),
        failures: 0,
        server_id: "s1".to_owned(),
        ..FetchStatus::default()
    };
    assert!(
        store
            .record_federation_fetch(&b, first, status.clone(), Some(fetched.clone()))
            .await
            .unwrap()
    );
    let stored = store.get_federation(&b).await.unwrap().unwrap();
    assert_eq!(stored.status, status);
    assert_eq!(
        store
            .get_federated_bundle(&b)
            .await
            .unwrap()
            .unwrap()
            .bundle,
        fetched
    );
    // An update raises the generation and keeps created_at and the status; a fetch that
    // started before it is dropped, bundle and all.
    let updated = store
        .put_federation(relationship(&b, "https://b2/"), None, Put::Update)
        .await
        .unwrap();
    assert_eq!(
        (
            updated.generation,
            updated.created_at,
            updated.endpoint_url.as_str()
        ),
        (first + 1, created.created_at, "https://b2/")
    );
    assert_eq!(updated.status.server_id, "s1");
    assert!(
        !store
            .record_federation_fetch(&b, first, FetchStatus::default(), Some(b"stale".to_vec()))
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .get_federated_bundle(&b)
            .await
            .unwrap()
            .unwrap()
            .bundle,
        fetched
    );
    let names: Vec<_> = store
        .list_federations()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.trust_domain)
        .collect();
    assert_eq!(names, [a.clone(), b.clone()]);

    // The bundle stays while the relationship does; deleting the relationship deletes both,
    // and a fetch finishing afterwards writes nothing back.
    assert!(matches!(
        store.delete_federated_bundle(&b).await,
        Err(StoreError::InUse { .. })
    ));
    let (deleted, bundle) = store.delete_federation(&b).await.unwrap();
    assert_eq!(deleted.trust_domain, b);
    assert_eq!(bundle.unwrap().bundle, fetched);
    assert_eq!(store.get_federated_bundle(&b).await.unwrap(), None);
    assert!(
        !store
            .record_federation_fetch(&b, first + 1, FetchStatus::default(), Some(fetched.clone()))
            .await
            .unwrap()
    );
    assert_eq!(store.get_federated_bundle(&b).await.unwrap(), None);
    // Created again, it has a generation it never had: a fetch of the deleted one that
    // started before the delete is not recorded into the new one.
    let again = store
        .put_federation(relationship(&b, "https://b3/"), None, Put::Create)
        .await
        .unwrap();
    assert!(again.generation != first && again.generation != first + 1);
    assert!(
        !store
            .record_federation_fetch(&b, first + 1, FetchStatus::default(), Some(fetched))
            .await
            .unwrap()
    );
    assert_eq!(store.get_federated_bundle(&b).await.unwrap(), None);
    store.delete_federation(&b).await.unwrap();
    assert!(matches!(
        store.delete_federation(&b).await,
        Err(StoreError::NotFound { .. })
    ));
    // Without a relationship, a bundle set by hand is deleted as before.
    store
        .set_federated_bundle(&b, bootstrap.clone())
        .await
        .unwrap();
    store.delete_federated_bundle(&b).await.unwrap();
}

/// The CA journal is absent at first, then returned byte for byte, then replaced; each server
/// has its own.
/// Each server's published bundle is kept apart; every publication raises the one shared
/// sequence, by one or to the floor it names, and the listing reads the bundles with it.
pub(crate) async fn published_bundles_raise_one_shared_sequence(store: Arc<dyn Store>) {
    assert_eq!(store.bundle_sequence().await.unwrap(), 0);
    assert_eq!(
        store.server_bundles().await.unwrap(),
        ServerBundles::default()
    );
    assert_eq!(
        store
            .publish_server_bundle("b", br#"{"keys":[]}"#.to_vec(), 0)
            .await
            .unwrap(),
        1
    );
    // A server whose own sequence is ahead lifts the shared one to it.
    assert_eq!(
        store
            .publish_server_bundle("a", b"{\"a\":1}".to_vec(), 7)
            .await
            .unwrap(),
        7
    );
    assert_eq!(
        store
            .publish_server_bundle("a", b"{\"a\":2}".to_vec(), 3)
            .await
            .unwrap(),
        8
    );
    assert_eq!(store.bundle_sequence().await.unwrap(), 8);
    assert_eq!(
        store.server_bundles().await.unwrap(),
        ServerBundles {
            sequence: 8,
            bundles: vec![
                ("a".to_owned(), b"{\"a\":2}".to_vec()),
                ("b".to_owned(), br#"{"keys":[]}"#.to_vec()),
            ],
        }
    );
    // Concurrent publishers each get their own sequence.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .publish_server_bundle(&format!("s{i}"), b"{}".to_vec(), 0)
                .await
                .unwrap()
        }));
    }
    let mut got = Vec::new();
    for task in tasks {
        got.push(task.await.unwrap());
    }
    got.sort_unstable();
    assert_eq!(got, (9..=16).collect::<Vec<u64>>());
    assert_eq!(store.server_bundles().await.unwrap().bundles.len(), 10);
}

pub(crate) async fn ca_journal_round_trip(store: Arc<dyn Store>) {
    assert_eq!(store.load_ca_journal("default").await.unwrap(), None);
    let first: Vec<u8> = (0..=255).cycle().take(10_000).collect();
    store
        .save_ca_journal("default", first.clone())
        .await
        .unwrap();
    assert_eq!(
        store.load_ca_journal("default").await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.load_ca_journal("server-b").await.unwrap(), None);
    store
        .save_ca_journal("server-b", b"b".to_vec())
        .await
        .unwrap();
    store
        .save_ca_journal("default", b"second".to_vec())
        .await
        .unwrap();
    assert_eq!(
        store.load_ca_journal("default").await.unwrap(),
        Some(b"second".to_vec())
    );
    assert_eq!(
        store.load_ca_journal("server-b").await.unwrap(),
        Some(b"b".to_vec())
    );
}

// --- helpers ---

// --- audit log ---

/// Appends seal records 1, 2, 3, ... each linked to the one before, with non-decreasing times;
/// the head follows; an empty append does nothing.
pub(crate) async fn audit_chain_links_and_head(store: Arc<dyn Store>) {
    assert_eq!(store.audit_head().await.unwrap(), None);
    assert_eq!(store.audit_chains().await.unwrap(), vec![]);
    assert!(store.append_audit(vec![]).await.unwrap().is_empty());
    let first = store.append_audit(audit_records("a", 3)).await.unwrap();
    let second = store.append_audit(audit_records("b", 2)).await.unwrap();
    let sealed: Vec<AuditRecord> = first.into_iter().chain(second).collect();
    assert_eq!(
        sealed.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(sealed[0].prev_hash, GENESIS_HASH);
    for pair in sealed.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
        assert!(pair[1].time >= pair[0].time);
    }
    for record in &sealed {
        assert_eq!(record.compute_hash().unwrap(), record.hash);
    }
    assert_eq!(sealed[3].actor, "uid:0");
    assert_eq!(sealed[3].subject, "b-0");
    assert_eq!(sealed[3].details["n"], 0);
    assert_eq!(store.audit_head().await.unwrap(), Some(sealed[4].head()));
    assert_eq!(store.audit_chains().await.unwrap(), vec![sealed[4].head()]);
    let listed = all_audit(&store, &AuditFilter::default(), 100).await;
    assert_eq!(listed, sealed, "records are stored exactly as sealed");
    audit::verify_links(&listed).unwrap();
}

fn source(spiffe_id: &str, spool_id: &str) -> AuditSource {
    AuditSource {
        spiffe_id: spiffe_id.to_owned(),
        spool_id: spool_id.to_owned(),
    }
}

pub(crate) fn source_events(sequences: &[u64]) -> Vec<SourceEvent> {
    sequences
        .iter()
        .map(|&sequence| SourceEvent {
            sequence,
            record: NewAuditRecord::new("spiffe://example.org/broker", "broker.request", "db")
                .detail("source_sequence", sequence),
        })
        .collect()
}

fn source_sequences(records: &[AuditRecord]) -> Vec<u64> {
    records
        .iter()
        .map(|r| r.details["source_sequence"].as_u64().unwrap())
        .collect()
}

/// A source's events above its last stored sequence are appended, in order, and the rest are
/// skipped; spools and sources count apart; events that leave a gap, or are out of order, append
/// nothing; all of it is in the chain as one line.
pub(crate) async fn audit_source_events_are_appended_once(store: Arc<dyn Store>) {
    let broker = source("spiffe://example.org/broker", "aa");
    let first = store
        .append_source_events(&broker, source_events(&[1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(first.acknowledged, 3);
    assert_eq!(source_sequences(&first.appended), [1, 2, 3]);
    assert_eq!(
        first
            .appended
            .iter()
            .map(|r| r.sequence)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );

    // Sent again, with one new event: only the new one lands.
    let again = store
        .append_source_events(&broker, source_events(&[2, 3, 4]))
        .await
        .unwrap();
    assert_eq!(again.acknowledged, 4);
    assert_eq!(source_sequences(&again.appended), [4]);
    let nothing = store
        .append_source_events(&broker, source_events(&[1, 4]))
        .await
        .unwrap();
    assert!(nothing.appended.is_empty());
    assert_eq!(nothing.acknowledged, 4);
    let empty = store.append_source_events(&broker, vec![]).await.unwrap();
    assert_eq!((empty.appended.len(), empty.acknowledged), (0, 4));

    // Another spool of the same caller, and another caller, count from 1.
    for other in [
        source("spiffe://example.org/broker", "bb"),
        source("spiffe://example.org/broker-2", "aa"),
    ] {
        let appended = store
            .append_source_events(&other, source_events(&[1]))
            .await
            .unwrap();
        assert_eq!(
            (source_sequences(&appended.appended), appended.acknowledged),
            (vec![1], 1)
        );
    }

    // Events that do not continue the spool (a later batch sent before an earlier one was
    // acknowledged) append nothing, and the answer says where to resume.
    let head = store.audit_head().await.unwrap();
    let gap = store
        .append_source_events(&broker, source_events(&[3, 4, 6, 7]))
        .await
        .unwrap();
    assert_eq!((gap.appended.len(), gap.acknowledged), (0, 4));
    let ahead = store
        .append_source_events(&broker, source_events(&[7, 8]))
        .await
        .unwrap();
    assert_eq!((ahead.appended.len(), ahead.acknowledged), (0, 4));
    assert_eq!(store.audit_head().await.unwrap(), head);
    let resumed = store
        .append_source_events(&broker, source_events(&[5, 6, 7, 8]))
        .await
        .unwrap();
    assert_eq!(source_sequences(&resumed.appended), [5, 6, 7, 8]);
    assert_eq!(store.audit_source_sequence(&broker).await.unwrap(), 8);
    assert_eq!(
        store
            .audit_source_sequence(&source("spiffe://example.org/nobody", "aa"))
            .await
            .unwrap(),
        0
    );

    // Out of order: refused, nothing written.
    let head = store.audit_head().await.unwrap();
    for bad in [&[9u64, 9][..], &[10, 9]] {
        let err = store
            .append_source_events(&broker, source_events(bad))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Encode { .. }), "{err}");
    }
    assert_eq!(store.audit_head().await.unwrap(), head);
    let next = store
        .append_source_events(&broker, source_events(&[9]))
        .await
        .unwrap();
    assert_eq!(source_sequences(&next.appended), [9]);

    let listed = all_audit(&store, &AuditFilter::default(), 100).await;
    assert_eq!(
        listed.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        (1..=11).collect::<Vec<_>>()
    );
    audit::verify_links(&listed).unwrap();
}

/// Concurrent senders of the same events (a broker that resent while its first call was in
/// flight, or two servers of one database) leave exactly one copy of each in the chain.
pub(crate) async fn audit_source_events_race_to_one_copy(store: Arc<dyn Store>) {
    const TASKS: usize = 8;
    const ROUNDS: u64 = 5;
    let broker = source("spiffe://example.org/broker", "cc");
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (store, broker, barrier) = (store.clone(), broker.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut acknowledged = 0;
                for round in 1..=ROUNDS {
                    // Each resends everything from 1: what others appended meanwhile is
                    // skipped, the rest continues the spool.
                    let upto = round * 4 + task as u64 % 3;
                    let sequences: Vec<u64> = (1..=upto).collect();
                    let done = store
                        .append_source_events(&broker, source_events(&sequences))
                        .await
                        .unwrap();
                    assert!(done.acknowledged >= acknowledged.max(upto));
                    acknowledged = done.acknowledged;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let listed = all_audit(&store, &AuditFilter::default(), 1000).await;
    let top = ROUNDS * 4 + 2;
    assert_eq!(
        source_sequences(&listed),
        (1..=top).collect::<Vec<_>>(),
        "every event once, in order"
    );
    assert_eq!(store.audit_source_sequence(&broker).await.unwrap(), top);
    audit::verify_links(&listed).unwrap();
}

/// Many concurrent appenders (single records and batches) get disjoint, gap-free sequences,
/// and the chain stays one line.
pub(crate) async fn audit_concurrent_appends_never_fork(store: Arc<dyn Store>) {
    const TASKS: usize = 16;
    const APPENDS: usize = 10;
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let mut sealed = Vec::new();
                for n in 0..APPENDS {
                    let batch = audit_records(&format!("t{task}-{n}"), 1 + (task + n) % 3);
                    sealed.extend(store.append_audit(batch).await.unwrap());
                }
                sealed
            })
        })
        .collect();
    let mut returned = BTreeMap::new();
    for task in tasks {
        for record in task.await.unwrap() {
            assert!(
                returned.insert(record.sequence, record).is_none(),
                "a sequence was handed out twice"
            );
        }
    }
    let total = returned.len() as u64;
    assert_eq!(
        returned.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    let listed = all_audit(&store, &AuditFilter::default(), 37).await;
    assert_eq!(listed, returned.into_values().collect::<Vec<_>>());
    let summary = audit::verify_links(&listed).unwrap();
    assert_eq!(summary.records, total);
    assert_eq!(store.audit_head().await.unwrap(), summary.head);
}

/// Paging visits every record once, in order; filters by actor, action (prefix), SPIFFE ID
/// (subject or details), time and sequence; a foreign page token is refused.
pub(crate) async fn audit_pagination_and_filters(store: Arc<dyn Store>) {
    let agent = "spiffe://example.org/sigil/agent/join_token/a";
    let mut batch = Vec::new();
    for n in 0..25u64 {
        let record = if n % 5 == 0 {
            NewAuditRecord::new(
                agent,
                audit::action::SVID_X509_ISSUE,
                format!("spiffe://example.org/w{n}"),
            )
            .detail("agent", agent)
        } else {
            NewAuditRecord::new(
                format!("uid:{}", n % 2),
                audit::action::ENTRY_CREATE,
                format!("entry-{n}"),
            )
            .detail("spiffe_id", format!("spiffe://example.org/w{n}"))
        };
        batch.push(record);
    }
    let sealed = store.append_audit(batch).await.unwrap();
    // The second half gets a later time, for the `since` filter.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = store.append_audit(audit_records("late", 5)).await.unwrap();

    for size in [1, 7, 30, 0] {
        let listed = all_audit(&store, &AuditFilter::default(), size).await;
        assert_eq!(listed.len(), 30, "page size {size}");
        assert!(
            listed
                .windows(2)
                .all(|p| p[0].sequence + 1 == p[1].sequence)
        );
    }
    let count = |filter: AuditFilter| {
        let store = store.clone();
        async move { all_audit(&store, &filter, 4).await }
    };
    let by_agent = count(AuditFilter {
        actor: Some(agent.to_owned()),
        ..AuditFilter::default()
    })
    .await;
    assert_eq!(by_agent.len(), 5);
    assert!(by_agent.iter().all(|r| r.action == "svid.x509.issue"));
    assert_eq!(
        count(AuditFilter {
            action: Some("svid".to_owned()),
            ..AuditFilter::default()
        })
        .await
        .len(),
        5
    );
    assert_eq!(
        count(AuditFilter {
            action: Some("entry.create".to_owned()),
            actor: Some("uid:1".to_owned()),
            ..AuditFilter::default()
        })
        .await
        .len(),
        10
    );
    // A SPIFFE ID matches the subject of one record and a detail of another.
    let w5 = count(AuditFilter {
        spiffe_id: Some("spiffe://example.org/w5".to_owned()),
        ..AuditFilter::default()
    })
    .await;
    assert_eq!(w5.iter().map(|r| r.sequence).collect::<Vec<_>>(), vec![6]);
    let w6 = count(AuditFilter {
        spiffe_id: Some("spiffe://example.org/w6".to_owned()),
        ..AuditFilter::default()
    })
    .await;
    assert_eq!(w6.iter().map(|r| r.sequence).collect::<Vec<_>>(), vec![7]);
    assert_eq!(
        count(AuditFilter {
            spiffe_id: Some(agent.to_owned()),
            ..AuditFilter::default()
        })
        .await
        .len(),
        5
    );
    // Time and sequence.
    let since = count(AuditFilter {
        since: Some(later[0].time),
        ..AuditFilter::default()
    })
    .await;
    assert_eq!(since, later);
    assert!(sealed.iter().all(|r| r.time < later[0].time));
    assert_eq!(
        count(AuditFilter {
            since: Some(SystemTime::now() + Duration::from_secs(3600)),
            ..AuditFilter::default()
        })
        .await,
        vec![]
    );
    assert_eq!(
        count(AuditFilter {
            from_sequence: Some(28),
            ..AuditFilter::default()
        })
        .await
        .len(),
        3
    );
    // Page tokens.
    let first = store
        .list_audit(&AuditFilter::default(), &PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!(first.items.len(), 10);
    assert!(first.next_page_token.is_some());
    assert!(matches!(
        store
            .list_audit(
                &AuditFilter::default(),
                &PageRequest::after(10, "zz".to_owned())
            )
            .await,
        Err(StoreError::InvalidPageToken)
    ));
    assert!(matches!(
        store
            .list_audit(
                &AuditFilter::default(),
                &PageRequest::after(10, "0102".to_owned())
            )
            .await,
        Err(StoreError::InvalidPageToken)
    ));
}

/// Checkpoints round-trip; the latest is the one covering the highest sequence.
pub(crate) async fn audit_checkpoints_round_trip(store: Arc<dyn Store>) {
    assert_eq!(store.latest_audit_checkpoint().await.unwrap(), None);
    let sealed = store.append_audit(audit_records("c", 4)).await.unwrap();
    let checkpoint = |record: &AuditRecord| AuditCheckpoint {
        chain_id: record.chain_id.clone(),
        sequence: record.sequence,
        hash: record.hash,
        time: record.time,
        key_id: "audit-signing".to_owned(),
        public_key: vec![4; 65],
        signature: vec![0x30, 0x01, 0x00],
    };
    store
        .save_audit_checkpoint(checkpoint(&sealed[3]))
        .await
        .unwrap();
    store
        .save_audit_checkpoint(checkpoint(&sealed[1]))
        .await
        .unwrap();
    assert_eq!(
        store.latest_audit_checkpoint().await.unwrap(),
        Some(checkpoint(&sealed[3]))
    );
    // Listed in sequence order from a starting point, limited; removed one by one.
    let listed = store.list_audit_checkpoints(0, 10).await.unwrap();
    assert_eq!(listed, vec![checkpoint(&sealed[1]), checkpoint(&sealed[3])]);
    let from_3 = store.list_audit_checkpoints(3, 10).await.unwrap();
    assert_eq!(from_3, vec![checkpoint(&sealed[3])]);
    assert_eq!(store.list_audit_checkpoints(0, 1).await.unwrap().len(), 1);
    store.remove_audit_checkpoint(4).await.unwrap();
    store.remove_audit_checkpoint(99).await.unwrap();
    assert_eq!(
        store.latest_audit_checkpoint().await.unwrap(),
        Some(checkpoint(&sealed[1]))
    );
    // Every record is sealed into the store's chain.
    assert!(sealed.iter().all(|r| r.chain_id == audit::DEFAULT_CHAIN_ID));
}

fn audit_records(prefix: &str, n: usize) -> Vec<NewAuditRecord> {
    (0..n)
        .map(|i| {
            NewAuditRecord::new(
                "uid:0",
                audit::action::ENTRY_CREATE,
                format!("{prefix}-{i}"),
            )
            .detail("n", i)
        })
        .collect()
}

/// Every record passing `filter`, following the pages.
async fn all_audit(store: &Arc<dyn Store>, filter: &AuditFilter, size: usize) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    let mut page = PageRequest::first(size);
    loop {
        let listed = store.list_audit(filter, &page).await.unwrap();
        out.extend(listed.items);
        match listed.next_page_token {
            Some(token) => page = PageRequest::after(size, token),
            None => return out,
        }
    }
}

fn spiffe(id: &str) -> SpiffeId {
    SpiffeId::new(id).unwrap()
}

fn selectors(list: &[&str]) -> SelectorSet {
    list.iter().map(|s| Selector::parse(s).unwrap()).collect()
}

fn agent(name: &str) -> SpiffeId {
    spiffe(&format!(
        "spiffe://example.org/sigil/agent/join_token/{name}"
    ))
}

/// Entry number `n`: a distinct SPIFFE ID and selector for every `n`.
fn workload(n: usize, parent: &SpiffeId) -> NewEntry {
    NewEntry::new(
        spiffe(&format!("spiffe://example.org/workload/{n}")),
        parent.clone(),
        selectors(&[&format!("unix:uid:{n}")]),
    )
}

fn node(name: &str) -> AttestedNode {
    AttestedNode {
        spiffe_id: agent(name),
        attestation_type: "join_token".to_owned(),
        serial: "01ab".to_owned(),
        new_serial: None,
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000),
        banned: false,
        selectors: SelectorSet::new(),
        created_at: SystemTime::UNIX_EPOCH,
        updated_at: SystemTime::UNIX_EPOCH,
    }
}

fn join_token(value: &str, expires_at: SystemTime) -> JoinToken {
    JoinToken {
        token_hash: value.to_owned(),
        expires_at,
        created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        alias_spiffe_id: None,
    }
}

/// Follows `next_page_token` to the end; returns the ids in order and each page's size.
async fn page_through(
    store: &Arc<dyn Store>,
    filter: &EntryFilter,
    size: usize,
) -> (Vec<EntryId>, Vec<usize>) {
    let mut ids = Vec::new();
    let mut sizes = Vec::new();
    let mut page = PageRequest::first(size);
    loop {
        let result = store.list_entries(filter, &page).await.unwrap();
        sizes.push(result.items.len());
        ids.extend(result.items.into_iter().map(|e| e.id));
        match result.next_page_token {
            Some(token) => page = PageRequest::after(size, token),
            None => break,
        }
    }
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "not in ascending id order"
    );
    (ids, sizes)
}

/// Every change after `revision`, following the feed until it is up to date.
async fn all_changes_since(store: &Arc<dyn Store>, mut revision: u64) -> Vec<Change> {
    let mut all = Vec::new();
    loop {
        match store.changes_since(revision, 1_000).await.unwrap() {
            ChangesSince::Changes(changes) if changes.is_empty() => return all,
            ChangesSince::Changes(changes) => {
                for change in changes {
                    assert_eq!(change.revision, revision + 1, "gap in the feed");
                    revision = change.revision;
                    all.push(change);
                }
            }
            ChangesSince::Expired => panic!("changes after {revision} expired"),
        }
    }
}

/// Applies changes, in order, to a map of entries by id.
fn apply<'a>(
    mut entries: BTreeMap<EntryId, RegistrationEntry>,
    changes: impl Iterator<Item = &'a Change>,
) -> BTreeMap<EntryId, RegistrationEntry> {
    for change in changes {
        match &change.kind {
            ChangeKind::EntryUpserted(entry) => {
                entries.insert(entry.id.clone(), entry.clone());
            }
            ChangeKind::EntryDeleted(entry) => {
                entries.remove(&entry.id);
            }
        }
    }
    entries
}
