use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use sigil_core::{Selector, SelectorSet};

use super::*;
use crate::store::conformance::{self, TestConfig};
use crate::store::sled::record::StoredChange;
use crate::store::{Change, ChangeKind};

/// Set (to a store directory) in the child process of the crash test.
const CRASH_CHILD_ENV: &str = "SIGIL_STORE_CRASH_CHILD_DIR";
/// The test the crash test runs as its child.
const CRASH_CHILD_TEST: &str = "store::sled::tests::crash_child_writes_until_killed";
/// Acknowledged writes the crash test waits for before it kills the child.
const ACKS_BEFORE_KILL: usize = 300;

fn open(dir: &Path) -> SledStore {
    open_with(dir, SledStoreOptions::default())
}

/// How long the tests wait for a store this process just dropped to let go of sled's lock.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// What [`SledStore::open`] gives for `dir` once no store of this process holds it.
fn try_open(dir: &Path, options: SledStoreOptions) -> Result<SledStore, StoreError> {
    retry_while_locked(
        LOCK_WAIT,
        || SledStore::open(dir, options.clone()),
        |e| matches!(e, StoreError::Locked { .. }),
    )
}

fn open_with(dir: &Path, options: SledStoreOptions) -> SledStore {
    try_open(dir, options).unwrap_or_else(|e| panic!("cannot open the store: {e}"))
}

fn entry(name: &str) -> NewEntry {
    let id = |s: &str| SpiffeId::new(s).unwrap();
    NewEntry::new(
        id(&format!("spiffe://example.org/{name}")),
        id("spiffe://example.org/sigil/agent/join_token/a"),
        [Selector::parse(&format!("test:name:{name}")).unwrap()]
            .into_iter()
            .collect::<SelectorSet>(),
    )
}

/// A snapshot's scan reads every record of `entries` once, in key order, in either form and
/// with ids random (earlier builds) or time-ordered, however many threads decode and in
/// whatever chunks.
#[test]
fn a_scan_reads_every_record_once_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = ::sled::open(dir.path()).unwrap();
    let tree = db.open_tree("entries").unwrap();
    let random = ["00", "3f", "7a", "80", "a0", "ff"].map(|first| {
        EntryId::parse(&format!(
            "{first}{}",
            &EntryId::generate().unwrap().as_str()[2..]
        ))
        .unwrap()
    });
    let ordered = (0..4).map(|_| EntryId::generate().unwrap());
    let mut expected = Vec::new();
    for (n, id) in random.into_iter().chain(ordered).enumerate() {
        let record = RegistrationEntry::from_new(
            id,
            entry(&format!("e{n}")),
            SystemTime::UNIX_EPOCH,
            n as u64 + 1,
        );
        let value = match n % 2 {
            0 => serde_json::to_vec(&record).unwrap(),
            _ => record::encode_entry(&record).unwrap(),
        };
        tree.insert(record.id.as_str(), value).unwrap();
        expected.push(record);
    }
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    for threads in 0..=6 {
        for chunk in [0, 1, 2, 3, 256] {
            assert_eq!(
                entries::scan_entries_in(&tree, threads, chunk, |entry| entry).unwrap(),
                expected,
                "{threads} threads, chunks of {chunk}"
            );
        }
    }
    // A record that does not decode fails the scan, whichever thread decodes it.
    tree.insert(expected[4].id.as_str(), b"{".to_vec()).unwrap();
    for threads in 1..=4 {
        for chunk in 1..=4 {
            assert!(matches!(
                entries::scan_entries_in(&tree, threads, chunk, |entry| entry),
                Err(StoreError::Corrupt { what: "entry", .. })
            ));
        }
    }
}

/// Time-ordered ids of one burst all begin with the same digits: the scan still decodes off the
/// thread that reads, whatever the keys (the first chunk always goes to a worker).
#[test]
fn a_scan_of_time_ordered_ids_decodes_off_the_reading_thread() {
    let dir = tempfile::tempdir().unwrap();
    let db = ::sled::open(dir.path()).unwrap();
    let tree = db.open_tree("entries").unwrap();
    let at = SystemTime::now();
    let mut expected = Vec::new();
    for n in 0..1_000u64 {
        let id = EntryId::generate_at(at + Duration::from_millis(n)).unwrap();
        let record = RegistrationEntry::from_new(id, entry(&format!("e{n}")), at, n + 1);
        tree.insert(record.id.as_str(), record::encode_entry(&record).unwrap())
            .unwrap();
        expected.push(record);
    }
    for threads in [2, 4] {
        let seen = Mutex::new(std::collections::HashSet::new());
        let scanned = entries::scan_entries_in(&tree, threads, 64, |entry| {
            seen.lock().unwrap().insert(std::thread::current().id());
            entry
        })
        .unwrap();
        assert_eq!(scanned, expected);
        let reader = std::thread::current().id();
        assert!(seen.into_inner().unwrap().iter().any(|id| *id != reader));
    }
    // The reading thread decodes a chunk itself when the worker has one waiting: the worker
    // holds its first chunk until the reading thread has decoded one (the second chunk waits
    // in the queue, so the third is the reading thread's).
    let reader = std::thread::current().id();
    let reader_decoded = std::sync::atomic::AtomicBool::new(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let scanned = entries::scan_entries_in(&tree, 2, 64, |entry| {
        if std::thread::current().id() == reader {
            reader_decoded.store(true, Ordering::SeqCst);
        } else {
            while !reader_decoded.load(Ordering::SeqCst) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the reading thread never decoded a chunk"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        entry
    })
    .unwrap();
    assert_eq!(scanned, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passes_the_conformance_suite() {
    conformance::run_all(|config: TestConfig| async move {
        let dir = tempfile::tempdir().unwrap();
        let options = SledStoreOptions {
            change_retention: config.change_retention,
            ..SledStoreOptions::default()
        };
        (SledStore::open(dir.path(), options).unwrap(), dir)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_everything_including_the_revision_counter() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let td = TrustDomain::new("other.org").unwrap();
    let (kept, revision, node) = {
        let store = open(dir.path());
        let kept = store.create_entry(entry("kept")).await.unwrap();
        let gone = store.create_entry(entry("gone")).await.unwrap();
        store.delete_entry(&gone.id).await.unwrap();
        let node = store
            .create_node(AttestedNode {
                spiffe_id: SpiffeId::new("spiffe://example.org/sigil/agent/join_token/a").unwrap(),
                attestation_type: "join_token".to_owned(),
                serial: "01".to_owned(),
                new_serial: None,
                not_after: now,
                banned: false,
                selectors: SelectorSet::new(),
                created_at: now,
                updated_at: now,
            })
            .await
            .unwrap();
        store
            .create_join_token(JoinToken {
                token_hash: "tok".to_owned(),
                expires_at: now + Duration::from_secs(600),
                created_at: now,
                alias_spiffe_id: None,
            })
            .await
            .unwrap();
        store
            .set_federated_bundle(&td, b"{}".to_vec())
            .await
            .unwrap();
        store
            .save_ca_journal("default", b"journal".to_vec())
            .await
            .unwrap();
        let revision = store.current_revision().await.unwrap();
        (kept, revision, node)
    };

    let store = open(dir.path());
    assert_eq!(store.current_revision().await.unwrap(), revision);
    assert_eq!(store.get_entry(&kept.id).await.unwrap(), Some(kept.clone()));
    assert_eq!(store.count_entries().await.unwrap(), 1);
    assert_eq!(store.get_node(&node.spiffe_id).await.unwrap(), Some(node));
    assert_eq!(
        store
            .consume_join_token("tok", now)
            .await
            .unwrap()
            .token_hash,
        "tok"
    );
    assert_eq!(
        store
            .get_federated_bundle(&td)
            .await
            .unwrap()
            .unwrap()
            .bundle,
        b"{}"
    );
    assert_eq!(
        store.load_ca_journal("default").await.unwrap(),
        Some(b"journal".to_vec())
    );
    let ChangesSince::Changes(feed) = store.changes_since(0, 100).await.unwrap() else {
        panic!("the feed must survive a restart");
    };
    assert_eq!(feed.len() as u64, revision);
    // The duplicate index survived too.
    assert!(matches!(
        store.create_entry(entry("kept")).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    let after = store.create_entry(entry("after")).await.unwrap();
    assert_eq!(after.revision, revision + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_with_a_smaller_retention_prunes_the_feed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let batch = (0..30).map(|n| entry(&format!("e{n}"))).collect();
        store.create_entries(batch).await.unwrap();
    }
    let options = SledStoreOptions {
        change_retention: 5,
        ..SledStoreOptions::default()
    };
    let store = open_with(dir.path(), options);
    assert_eq!(store.inner.trees.changes.len(), 5);
    assert_eq!(
        store.changes_since(24, 100).await.unwrap(),
        ChangesSince::Expired
    );
    let ChangesSince::Changes(window) = store.changes_since(25, 100).await.unwrap() else {
        panic!("the retained window must be served");
    };
    assert_eq!(window.len(), 5);
    store.create_entry(entry("next")).await.unwrap();
    assert_eq!(store.inner.trees.changes.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let id = EntryId::generate().unwrap();
    store
        .inner
        .trees
        .entries
        .insert(id.as_str(), &b"not json"[..])
        .unwrap();
    assert!(matches!(
        store.get_entry(&id).await,
        Err(StoreError::Corrupt { what: "entry", .. })
    ));
    assert!(matches!(
        store.snapshot_entries().await,
        Err(StoreError::Corrupt { .. })
    ));
}

/// Entries and changes as a build before the binary records wrote them (JSON) are served after
/// an upgrade as they were, and an entry's next write stores it in the binary form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_and_changes_written_as_json_by_an_earlier_build_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let (created, changes) = {
        let store = open(dir.path());
        let a = store.create_entry(entry("a")).await.unwrap();
        let b = store.create_entry(entry("b")).await.unwrap();
        let c = store.create_entry(entry("c")).await.unwrap();
        let gone = store.delete_entry(&c.id).await.unwrap();
        let upserted = |e: &RegistrationEntry| Change {
            revision: e.revision,
            kind: ChangeKind::EntryUpserted(e.clone()),
        };
        let changes = vec![
            upserted(&a),
            upserted(&b),
            upserted(&c),
            Change {
                revision: c.revision + 1,
                kind: ChangeKind::EntryDeleted(gone),
            },
        ];
        let trees = &store.inner.trees;
        // Rewrite both trees' records as JSON, the form of the earlier build.
        for (tree, is_entries) in [(&trees.entries, true), (&trees.changes, false)] {
            for item in tree.iter() {
                let (key, value) = item.unwrap();
                assert_eq!(value[0], 0x01, "written in the binary form");
                let json = if is_entries {
                    serde_json::to_vec(&record::decode_entry(&key, &value).unwrap()).unwrap()
                } else {
                    // Earlier builds wrote every change in full.
                    let revision = decode_u64(&key).unwrap();
                    let change = changes.iter().find(|c| c.revision == revision).unwrap();
                    serde_json::to_vec(change).unwrap()
                };
                tree.insert(key, json).unwrap();
            }
        }
        trees.entries.flush().unwrap();
        (vec![a, b], changes)
    };
    let store = open(dir.path());
    assert_eq!(
        store.inner.trees.entries.iter().next().unwrap().unwrap().1[0],
        b'{'
    );
    let mut expected = created.clone();
    expected.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(store.snapshot_entries().await.unwrap().entries, expected);
    for entry in &created {
        assert_eq!(
            store.get_entry(&entry.id).await.unwrap().as_ref(),
            Some(entry)
        );
    }
    let listed = store
        .list_entries(&EntryFilter::default(), &PageRequest::default())
        .await
        .unwrap();
    assert_eq!(listed.items, expected);
    assert_eq!(
        store.changes_since(0, 10).await.unwrap(),
        ChangesSince::Changes(changes)
    );
    // The next write of an entry stores it in the binary form; the other stays as it was.
    let mut renamed = entry("a");
    renamed.hint = "renamed".to_owned();
    let updated = store.update_entry(&created[0].id, renamed).await.unwrap();
    let record = |id: &EntryId| store.inner.trees.entries.get(id.as_str()).unwrap().unwrap();
    assert_eq!(record(&created[0].id)[0], 0x01);
    assert_eq!(record(&created[1].id)[0], b'{');
    assert_eq!(
        store.get_entry(&created[0].id).await.unwrap(),
        Some(updated)
    );
    assert_eq!(
        store.get_entry(&created[1].id).await.unwrap().as_ref(),
        Some(&created[1])
    );
}

/// Opens the database with sled alone, once no store of this process holds it.
fn open_raw(dir: &Path) -> ::sled::Db {
    retry_while_locked(LOCK_WAIT, || ::sled::open(dir), is_held_elsewhere)
        .unwrap_or_else(|e| panic!("cannot open the database: {e}"))
}

/// A data directory of a build that kept the entries' by-parent and by-SPIFFE-ID indexes on
/// disk loses both trees when it is opened, and listings filtered either way still find the
/// entries (they walk the entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entry_indexes_of_an_earlier_layout_are_dropped_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = {
        let store = open(dir.path());
        let a = store.create_entry(entry("a")).await.unwrap();
        let b = store.create_entry(entry("b")).await.unwrap();
        (a, b)
    };
    {
        // What an earlier build wrote besides: `ID 0x00 ENTRY_ID` per entry in each index.
        let db = open_raw(dir.path());
        for (name, id_of) in [
            (
                "entries_by_parent",
                (|e: &RegistrationEntry| e.parent_id.clone()) as fn(&RegistrationEntry) -> SpiffeId,
            ),
            ("entries_by_spiffe_id", |e: &RegistrationEntry| {
                e.spiffe_id.clone()
            }),
        ] {
            let tree = db.open_tree(name).unwrap();
            for e in [&a, &b] {
                let key = format!("{}\0{}", id_of(e), e.id);
                tree.insert(key.as_bytes(), Vec::new()).unwrap();
            }
        }
        // And layout 2's uniqueness index: identity key to entry id.
        let tree = db.open_tree("entries_by_identity").unwrap();
        for e in [&a, &b] {
            tree.insert(&e.identity_key()[..], e.id.as_str()).unwrap();
        }
        db.flush().unwrap();
        assert!(db.tree_names().iter().any(|n| n == b"entries_by_parent"));
    }
    let store = open(dir.path());
    let list = |filter: EntryFilter| {
        let store = store.clone();
        async move {
            store
                .list_entries(&filter, &PageRequest::default())
                .await
                .unwrap()
                .items
        }
    };
    let mut both = vec![a.clone(), b.clone()];
    both.sort_by(|x, y| x.id.cmp(&y.id));
    let by_parent = EntryFilter {
        parent_id: Some(a.parent_id.clone()),
        ..EntryFilter::default()
    };
    assert_eq!(list(by_parent).await, both);
    let by_spiffe_id = EntryFilter {
        spiffe_id: Some(b.spiffe_id.clone()),
        ..EntryFilter::default()
    };
    assert_eq!(list(by_spiffe_id).await, vec![b.clone()]);
    drop(store);
    let names = open_raw(dir.path()).tree_names();
    for name in DROPPED_TREES {
        assert!(
            !names.iter().any(|n| n == name.as_bytes()),
            "{name} is still in the database"
        );
    }
    assert!(names.iter().any(|n| n == b"entries"));
    // Without its tree, uniqueness still holds: the index is rebuilt from the entries.
    let store = open(dir.path());
    assert!(matches!(
        store.create_entry(entry("a")).await,
        Err(StoreError::AlreadyExists { key, .. }) if key == a.id.as_str()
    ));
}

/// An upsert still the entry's record is held in the change feed as a reference to that record,
/// and written again in full in the transaction that replaces or removes the record: every
/// change reads back as the version it wrote, also while writes race the reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_names_the_entrys_record_until_the_record_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let raw = |revision: u64| {
        let bytes = store
            .inner
            .trees
            .changes
            .get(revision.to_be_bytes())
            .unwrap();
        record::decode_change(&bytes.unwrap()).unwrap()
    };
    let full = |revision: u64, kind: ChangeKind| StoredChange::Change(Change { revision, kind });
    let a = store.create_entry(entry("a")).await.unwrap();
    assert_eq!(
        raw(a.revision),
        StoredChange::Current {
            revision: a.revision,
            id: a.id.clone()
        }
    );
    let mut renamed = entry("a");
    renamed.hint = "renamed".to_owned();
    let a2 = store.update_entry(&a.id, renamed).await.unwrap();
    assert_eq!(
        raw(a.revision),
        full(a.revision, ChangeKind::EntryUpserted(a.clone()))
    );
    assert!(matches!(raw(a2.revision), StoredChange::Current { .. }));
    let gone = store.delete_entry(&a.id).await.unwrap();
    assert_eq!(gone, a2);
    assert_eq!(
        raw(a2.revision),
        full(a2.revision, ChangeKind::EntryUpserted(a2.clone()))
    );
    let deleted = full(a2.revision + 1, ChangeKind::EntryDeleted(a2.clone()));
    assert_eq!(raw(a2.revision + 1), deleted);
    let StoredChange::Change(deleted) = deleted else {
        unreachable!()
    };
    assert_eq!(
        store.changes_since(0, 10).await.unwrap(),
        ChangesSince::Changes(vec![
            Change {
                revision: a.revision,
                kind: ChangeKind::EntryUpserted(a.clone()),
            },
            Change {
                revision: a2.revision,
                kind: ChangeKind::EntryUpserted(a2.clone()),
            },
            deleted,
        ])
    );

    // One writer renames an entry over and over; readers read the whole feed meanwhile.
    let b = store.create_entry(entry("b")).await.unwrap();
    let written = Arc::new(Mutex::new(vec![b.clone()]));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (store, written, done) = (store.clone(), written.clone(), done.clone());
        tokio::spawn(async move {
            for n in 0..300 {
                let mut next = entry("b");
                next.hint = format!("v{n}");
                let entry = store.update_entry(&b.id, next).await.unwrap();
                written.lock().unwrap().push(entry);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (inner, done) = (store.inner.clone(), done.clone());
            tokio::task::spawn_blocking(move || {
                let mut reads = 0;
                while !done.load(Ordering::SeqCst) || reads == 0 {
                    for change in inner.read_changes(0, u64::MAX, usize::MAX).unwrap() {
                        if let ChangeKind::EntryUpserted(entry) = &change.kind {
                            assert_eq!(entry.revision, change.revision);
                        }
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    writer.await.unwrap();
    for reader in readers {
        assert!(reader.await.unwrap() > 0);
    }
    let ChangesSince::Changes(feed) = store.changes_since(a2.revision + 1, 1_000).await.unwrap()
    else {
        panic!("the feed expired")
    };
    let written = written.lock().unwrap().clone();
    assert_eq!(
        feed,
        written
            .into_iter()
            .map(|entry| Change {
                revision: entry.revision,
                kind: ChangeKind::EntryUpserted(entry),
            })
            .collect::<Vec<_>>()
    );
}

/// The uniqueness index lives in memory: after a restart it is rebuilt from the entries
/// whichever comes first, a snapshot or a write, with what was freed before the restart free
/// and what was taken still taken; concurrent creations of one identity leave one entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uniqueness_holds_across_a_restart_whoever_builds_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = {
        let store = open(dir.path());
        let a = store.create_entry(entry("a")).await.unwrap();
        let b = store.create_entry(entry("b")).await.unwrap();
        let c = store.create_entry(entry("c")).await.unwrap();
        store.delete_entry(&c.id).await.unwrap();
        // b moves to the identity of "b2": "b" is free, "b2" taken.
        let b = store.update_entry(&b.id, entry("b2")).await.unwrap();
        (a, b)
    };
    let taken = |result: Result<RegistrationEntry, StoreError>, holder: &RegistrationEntry| matches!(result, Err(StoreError::AlreadyExists { key, .. }) if key == holder.id.as_str());
    {
        // A snapshot first (as a server's start does).
        let store = open(dir.path());
        let snapshot = store.snapshot_entries().await.unwrap();
        assert_eq!(snapshot.entries.len(), 2);
        assert_eq!(snapshot.revision, store.current_revision().await.unwrap());
        assert!(taken(store.create_entry(entry("a")).await, &a));
        assert!(taken(store.create_entry(entry("b2")).await, &b));
        let c = store.create_entry(entry("c")).await.unwrap();
        // Later snapshots see the write (they no longer build the index).
        assert_eq!(store.snapshot_entries().await.unwrap().entries.len(), 3);
        store.delete_entry(&c.id).await.unwrap();
    }
    let store = open(dir.path());
    // A write first.
    assert!(taken(store.create_entry(entry("b2")).await, &b));
    let b_again = store.create_entry(entry("b")).await.unwrap();
    assert!(taken(store.create_entry(entry("a")).await, &a));
    // A failed write changes nothing in the index: "a" still holds its identity, "b" too.
    assert!(taken(store.update_entry(&b_again.id, entry("a")).await, &a));
    assert!(taken(store.create_entry(entry("b")).await, &b_again));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.create_entry(entry("x")).await })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => created += 1,
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(store.snapshot_entries().await.unwrap().entries.len(), 4);
    // An id already taken is never written over, and nothing of the batch is written.
    let revision = store.current_revision().await.unwrap();
    let reused = store
        .inner
        .create_entries(&[(a.id.clone(), entry("y"))], SystemTime::now());
    assert!(matches!(
        reused,
        Err(StoreError::AlreadyExists { key, .. }) if key == a.id.as_str()
    ));
    assert_eq!(store.get_entry(&a.id).await.unwrap(), Some(a));
    assert_eq!(
        store
            .inner
            .trees
            .meta
            .get(REVISION_KEY)
            .unwrap()
            .map(|v| decode_u64(&v).unwrap()),
        Some(revision)
    );
}

/// The error [`SledStore::open`] gives for `dir` once no store of this process holds it.
fn open_refused(dir: &Path) -> StoreError {
    match try_open(dir, SledStoreOptions::default()) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layout_is_recorded_and_a_newer_one_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let layout_of = |dir: &Path| {
        open_raw(dir)
            .open_tree("meta")
            .unwrap()
            .get(LAYOUT_KEY)
            .unwrap()
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
    };
    let created = {
        let store = open(dir.path());
        store.create_entry(entry("a")).await.unwrap()
    };
    assert_eq!(layout_of(dir.path()), Some(LAYOUT));

    // A store of a build from before the number (layout 1): brought to this layout.
    {
        let db = open_raw(dir.path());
        db.open_tree("meta").unwrap().remove(LAYOUT_KEY).unwrap();
        db.flush().unwrap();
    }
    assert_eq!(layout_of(dir.path()), None);
    drop(open(dir.path()));
    assert_eq!(layout_of(dir.path()), Some(LAYOUT));

    // A store a newer build opened: refused, and left as it was (this build would have
    // dropped the tree below).
    {
        let db = open_raw(dir.path());
        let meta = db.open_tree("meta").unwrap();
        meta.insert(LAYOUT_KEY, &(LAYOUT + 1).to_be_bytes())
            .unwrap();
        db.open_tree(DROPPED_TREES[0])
            .unwrap()
            .insert(b"kept", Vec::new())
            .unwrap();
        db.flush().unwrap();
    }
    let refused = open_refused(dir.path());
    assert!(matches!(refused, StoreError::Unsupported(_)), "{refused:?}");
    assert_eq!(
        refused.to_string(),
        format!(
            "the sled store in {} has layout {}, newer than this build knows ({LAYOUT}): a newer \
             sigil-server opened it; run that version, or restore the backup taken before the \
             upgrade",
            dir.path().display(),
            LAYOUT + 1
        )
    );
    assert_eq!(layout_of(dir.path()), Some(LAYOUT + 1));
    let db = open_raw(dir.path());
    assert!(
        db.tree_names()
            .iter()
            .any(|n| n == DROPPED_TREES[0].as_bytes())
    );
    assert!(
        db.open_tree("entries")
            .unwrap()
            .contains_key(created.id.as_str())
            .unwrap()
    );

    // A layout that is not a number: corrupt, not a guess.
    db.open_tree("meta")
        .unwrap()
        .insert(LAYOUT_KEY, &b"two"[..])
        .unwrap();
    db.flush().unwrap();
    drop(db);
    let corrupt = open_refused(dir.path());
    assert!(
        matches!(
            corrupt,
            StoreError::Corrupt {
                what: "store layout",
                ..
            }
        ),
        "{corrupt:?}"
    );
}

/// A store that is open already (another server on the same data_dir) is refused with what
/// to do, not sled's lock error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_open_elsewhere_is_refused_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let held = open(dir.path());
    let refused = SledStore::open(dir.path(), SledStoreOptions::default())
        .map(drop)
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!(
            "the sled store in {} is in use by another process (a sigil-server on the same \
             data_dir, or `sigil-server store migrate`): stop it first",
            dir.path().display()
        )
    );
    drop(held);

    // sled words every failure of its `flock` the same way: only a holder (`WouldBlock`) is
    // "in use"; a filesystem without locks keeps its own error.
    let lock_error = |errno: &str| {
        ::sled::Error::Io(std::io::Error::other(format!(
            "could not acquire lock on \"/data/store/db\": {errno}"
        )))
    };
    assert!(is_held_elsewhere(&lock_error(
        "Os { code: 11, kind: WouldBlock, message: \"Resource temporarily unavailable\" }"
    )));
    assert!(!is_held_elsewhere(&lock_error(
        "Os { code: 37, kind: Uncategorized, message: \"No locks available\" }"
    )));
}

/// A clean stop opens the store once more so that sled writes its snapshot over everything
/// written since the store's open (the next start reads the log after it only); it changes
/// nothing in the store, creates no store where there is none, and reports a store still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_after_stop_covers_the_log_written_since_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    // A store sled creates gets no snapshot; the next open writes one.
    drop(open(&path));
    {
        let store = open(&path);
        let batch = (0..200).map(|n| entry(&format!("e{n}"))).collect();
        store.create_entries(batch).await.unwrap();

        // Held by a store of this process: refused once the wait is over.
        let held = SledStore::write_snapshot(&path, None, Duration::from_millis(50));
        assert!(matches!(held, Err(StoreError::Locked { .. })), "{held:?}");
    }
    // What the second open wrote, before the 200 entries.
    let at_open = sigil_testkit::sled_files::snapshot_offset(&path)
        .unwrap()
        .expect("sled writes a snapshot when it opens a store");

    let written = tokio::task::spawn_blocking({
        let path = path.clone();
        move || SledStore::write_snapshot(&path, None, LOCK_WAIT)
    })
    .await
    .unwrap()
    .unwrap();
    assert!(written);
    let at_stop = sigil_testkit::sled_files::snapshot_offset(&path)
        .unwrap()
        .unwrap();
    assert!(
        at_stop > at_open,
        "the snapshot at stop ({at_stop:#x}) does not cover the log written after the open \
         ({at_open:#x})"
    );
    let store = open(&path);
    assert_eq!(store.count_entries().await.unwrap(), 200);
    drop(store);

    let missing = dir.path().join("missing");
    assert!(!SledStore::write_snapshot(&missing, None, Duration::ZERO).unwrap());
    assert!(!missing.exists(), "a stop created a store");
}

/// A snapshot half-written by a process killed while writing it (at a start, or at a stop)
/// does not leave the store unopenable, although sled alone refuses it as corrupt (it reads
/// `snap.*.generating` files too): the file is removed at open and every entry is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_left_unfinished_by_a_kill_is_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let batch = (0..10).map(|n| entry(&format!("e{n}"))).collect();
        store.create_entries(batch).await.unwrap();
    }
    // What a kill during sled's snapshot leaves: the newest name, a few bytes.
    let unfinished = dir.path().join("snap.7FFFFFFFFFFFFFFF.generating");
    std::fs::write(&unfinished, b"partial").unwrap();
    let raw = retry_while_locked(LOCK_WAIT, || ::sled::open(dir.path()), is_held_elsewhere);
    assert!(
        matches!(raw, Err(::sled::Error::Corruption { .. })),
        "sled itself should refuse it: {:?}",
        raw.map(drop)
    );

    let store = open(dir.path());
    assert_eq!(store.count_entries().await.unwrap(), 10);
    assert!(!unfinished.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_stored_in_the_clear_are_hashed_at_open_and_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let token = "3f9c0c8e1d2b4a5f6e7d8c9b0a1f2e3d";
    let expires = SystemTime::now() + Duration::from_secs(600);
    {
        // What an earlier build wrote: the token as the key and in the value.
        let store = open(dir.path());
        let legacy = serde_json::json!({
            "token": token,
            "expires_at": expires,
            "created_at": SystemTime::UNIX_EPOCH,
            "alias_spiffe_id": "spiffe://example.org/db",
        });
        store
            .inner
            .trees
            .join_tokens
            .insert(token, serde_json::to_vec(&legacy).unwrap())
            .unwrap();
        store.inner.trees.join_tokens.flush().unwrap();
    }
    let store = open(dir.path());
    // Nothing holds the token any more, in keys or values.
    for item in store.inner.trees.join_tokens.iter() {
        let (key, value) = item.unwrap();
        assert!(!String::from_utf8_lossy(&key).contains(token));
        assert!(!String::from_utf8_lossy(&value).contains(token));
    }
    // The agent holding it still attests (once), with its alias.
    let consumed = sigil_attestors::join_token::JoinTokens::consume(
        &*(Arc::new(store.clone()) as Arc<dyn Store>),
        token,
        SystemTime::now(),
    )
    .await
    .unwrap();
    assert_eq!(consumed.unwrap().as_str(), "spiffe://example.org/db");
    assert!(
        sigil_attestors::join_token::JoinTokens::consume(
            &*(Arc::new(store) as Arc<dyn Store>),
            token,
            SystemTime::now(),
        )
        .await
        .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_audit_record_is_reported_with_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // One append each: each record the first of a run of its own.
    for n in 0..3 {
        let record = NewAuditRecord::new("uid:0", "entry.delete", format!("e{n}"));
        store.append_audit(vec![record]).await.unwrap();
    }
    store
        .inner
        .trees
        .audit
        .insert(2u64.to_be_bytes(), &b"not json"[..])
        .unwrap();
    let error = store
        .list_audit(&AuditFilter::default(), &PageRequest::first(10))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("corrupt audit record: record 2 (or the run of records it begins): "),
        "{error}"
    );
}

/// Records appended together are stored in runs of about `AUDIT_RUN_BYTES`, and read back
/// from any sequence (inside a run too), page by page across runs, and from a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_stored_in_runs_list_from_any_sequence_and_page_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let record = |n: u64| {
        NewAuditRecord::new("uid:0", "svid.x509.issue", format!("spiffe://td/w/{n}"))
            .detail("serial", format!("{n:040x}"))
    };
    let first = store
        .append_audit((1..=200).map(record).collect())
        .await
        .unwrap();
    let later = SystemTime::now() + Duration::from_millis(5);
    std::thread::sleep(Duration::from_millis(10));
    let second = store
        .append_audit((201..=230).map(record).collect())
        .await
        .unwrap();
    let all = [first, second].concat();

    // Several values, each a run of consecutive records under its first's sequence.
    let mut stored = Vec::new();
    for item in store.inner.trees.audit.iter() {
        let (key, value) = item.unwrap();
        assert!(value.len() < 2 * 4_096, "a run of {} bytes", value.len());
        let records = record::decode_audit_value(&value).unwrap();
        assert_eq!(
            u64::from_be_bytes(key.as_ref().try_into().unwrap()),
            records[0].sequence
        );
        stored.extend(records);
    }
    assert!(
        store.inner.trees.audit.len() > 3,
        "200 records in one run or few"
    );
    assert!(
        store.inner.trees.audit.len() < 60,
        "about a dozen records a run"
    );
    assert_eq!(stored, all);

    let list = |filter: AuditFilter, page: PageRequest| {
        let store = &store;
        async move { store.list_audit(&filter, &page).await.unwrap() }
    };
    for from in [1, 2, 17, 100, 199, 200, 201, 230] {
        let filter = AuditFilter {
            from_sequence: Some(from),
            ..AuditFilter::default()
        };
        let items = list(filter, PageRequest::first(1_000)).await.items;
        let sequences: Vec<u64> = items.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, (from..=230).collect::<Vec<_>>(), "from {from}");
        assert_eq!(items, all[from as usize - 1..]);
    }
    let beyond = AuditFilter {
        from_sequence: Some(231),
        ..AuditFilter::default()
    };
    assert!(list(beyond, PageRequest::first(10)).await.items.is_empty());

    // Pages of 7 cut runs anywhere; every record comes once, in order.
    let mut paged = Vec::new();
    let mut page = PageRequest::first(7);
    loop {
        let got = list(AuditFilter::default(), page.clone()).await;
        paged.extend(got.items);
        match got.next_page_token {
            Some(token) => page = PageRequest::after(7, token),
            None => break,
        }
    }
    assert_eq!(paged, all);

    let since = AuditFilter {
        since: Some(later),
        ..AuditFilter::default()
    };
    assert_eq!(
        list(since, PageRequest::first(1_000)).await.items,
        all[200..]
    );
}

/// A value added under a key inside a run (a forged copy of records the run holds) makes every
/// reading that passes through the run fail, `audit verify`'s among them: no reader can be shown
/// a record other than the one every other reader gets. A value under a key that is not its
/// first record's sequence is corrupt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_value_that_overlaps_a_run_or_sits_under_another_key_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let records = (0..10)
        .map(|n| NewAuditRecord::new("uid:0", "entry.delete", format!("e{n}")))
        .collect();
    let sealed = store.append_audit(records).await.unwrap();
    assert_eq!(
        store.inner.trees.audit.len(),
        1,
        "ten small records make one run"
    );
    let tree = &store.inner.trees.audit;
    let list_from = |from: u64| {
        let filter = AuditFilter {
            from_sequence: Some(from),
            ..AuditFilter::default()
        };
        let store = &store;
        async move { store.list_audit(&filter, &PageRequest::first(100)).await }
    };

    // Forged copies of records 5 to 7 under key 5, inside the run stored under 1.
    let mut forged = sealed[4..7].to_vec();
    forged[0].subject = "forged".to_owned();
    super::audit::store_audit_value(tree, 5, &forged).unwrap();
    for from in [1, 3] {
        let error = list_from(from).await.unwrap_err();
        assert!(
            error
                .to_string()
                .contains("reach into the value stored under 5"),
            "from {from}: {error}"
        );
    }
    let verify_reads = store
        .list_chain_records(crate::audit::DEFAULT_CHAIN_ID, 1, 10_000)
        .await;
    assert!(matches!(verify_reads, Err(StoreError::Corrupt { .. })));
    tree.remove(5u64.to_be_bytes()).unwrap();
    assert_eq!(list_from(1).await.unwrap().items, sealed);

    // Copies of records 5 to 7 under key 11, after the run.
    super::audit::store_audit_value(tree, 11, &sealed[4..7]).unwrap();
    let error = list_from(1).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("record 11 (or the run of records it begins): stored under this sequence, it begins with record 5"),
        "{error}"
    );
}

/// An audit chain whose first records an earlier build wrote as JSON, each alone, reads back
/// whole and verifies, the records appended after the upgrade (a run) linked to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_chain_begun_in_json_continues_in_runs_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let record = |n: usize| NewAuditRecord::new("uid:0", "entry.delete", format!("e{n}"));
    let old = {
        let store = open(dir.path());
        let old = store
            .append_audit((0..3).map(record).collect())
            .await
            .unwrap();
        for record in &old {
            store
                .inner
                .trees
                .audit
                .insert(
                    record.sequence.to_be_bytes(),
                    serde_json::to_vec(record).unwrap(),
                )
                .unwrap();
        }
        store.inner.trees.audit.flush().unwrap();
        old
    };
    let store = open(dir.path());
    let new = store
        .append_audit((3..5).map(record).collect())
        .await
        .unwrap();
    let kept = |sequence: u64| {
        store
            .inner
            .trees
            .audit
            .get(sequence.to_be_bytes())
            .unwrap()
            .map(|value| value[0])
    };
    // Record 3 alone, as JSON; records 4 and 5 one run under 4.
    assert_eq!((kept(3), kept(4), kept(5)), (Some(b'{'), Some(0x02), None));
    let listed = store
        .list_audit(&AuditFilter::default(), &PageRequest::first(10))
        .await
        .unwrap()
        .items;
    assert_eq!(listed, [old, new].concat());
    let summary = crate::audit::verify_links(&listed).unwrap();
    assert_eq!(summary.records, 5);
}

/// An audit source resending events whose first append is still waiting for its flush gets its
/// acknowledgement only after that flush too: what a source forgets is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resend_is_acknowledged_only_once_the_first_append_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let group = Arc::clone(&store.inner.group);
    let source = crate::audit::AuditSource {
        spiffe_id: "spiffe://example.org/broker".to_owned(),
        spool_id: "ab".repeat(16),
    };
    let events = vec![crate::audit::SourceEvent {
        sequence: 1,
        record: crate::audit::NewAuditRecord::new("spiffe://example.org/broker", "broker.x", "t"),
    }];
    group.set_paused(true);
    let requested_before = group.requested();
    let first = tokio::spawn({
        let (store, source, events) = (store.clone(), source.clone(), events.clone());
        async move { store.append_source_events(&source, events).await }
    });
    let resend = tokio::spawn({
        let (store, source) = (store.clone(), source.clone());
        async move { store.append_source_events(&source, events).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while group.requested() < requested_before + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "appends never queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Both wrote (one appended, one found it there), and neither is acknowledged yet.
    assert_eq!(store.audit_source_sequence(&source).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!first.is_finished() && !resend.is_finished());
    group.set_paused(false);
    let (first, resend) = (
        first.await.unwrap().unwrap(),
        resend.await.unwrap().unwrap(),
    );
    assert_eq!(first.appended.len() + resend.appended.len(), 1);
    assert_eq!((first.acknowledged, resend.acknowledged), (1, 1));
}

/// Group commit, observed without timing: the flusher is held while 200 writers do their
/// writes and take their tickets, then released: far fewer flushes than writes, and every
/// writer is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_covers_many_writes_with_few_flushes() {
    const WRITERS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let group = Arc::clone(&store.inner.group);
    group.set_paused(true);
    let requested_before = group.requested();
    let flushes_before = store.flush_count();

    let tasks: Vec<_> = (0..WRITERS)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.create_entry(entry(&format!("w{n}"))).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while group.requested() < requested_before + WRITERS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "writers never queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Nothing is acknowledged while the flusher is held.
    assert!(tasks.iter().all(|task| !task.is_finished()));
    assert_eq!(store.flush_count(), flushes_before);
    group.set_paused(false);
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let flushes = store.flush_count() - flushes_before;
    assert!(flushes >= 1);
    assert!(
        flushes < WRITERS,
        "{flushes} flushes for {WRITERS} writes: no group commit"
    );
    assert_eq!(store.current_revision().await.unwrap(), WRITERS);
}

/// kill -9 durability: a child process (this test binary, running
/// [`crash_child_writes_until_killed`]) writes entries and prints each acknowledged id; it
/// is SIGKILLed mid-loop; every acknowledged entry must be in the reopened store.
#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            CRASH_CHILD_TEST,
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    while acked.len() < ACKS_BEFORE_KILL {
        let Some(line) = lines.next() else { break };
        if let Some(id) = line.unwrap().strip_prefix("ACK ") {
            acked.push(id.to_owned());
        }
    }
    // `Child::kill` sends SIGKILL: no destructor, no final flush.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        acked.len() >= ACKS_BEFORE_KILL,
        "the child stopped after {} acknowledgements",
        acked.len()
    );
    // Lines already in the pipe were acknowledged too.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(id) = line.strip_prefix("ACK ") {
            acked.push(id.to_owned());
        }
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = open(dir.path());
        for id in &acked {
            let id = EntryId::parse(id).unwrap();
            assert!(
                store.get_entry(&id).await.unwrap().is_some(),
                "acknowledged entry {id} lost in the crash"
            );
        }
        assert!(store.count_entries().await.unwrap() >= acked.len() as u64);
        // The feed is gap-free after recovery, and new writes continue it.
        let current = store.current_revision().await.unwrap();
        let mut seen = 0;
        while let ChangesSince::Changes(changes) = store.changes_since(seen, 1_000).await.unwrap() {
            let Some(last) = changes.last() else { break };
            assert_eq!(changes[0].revision, seen + 1);
            assert_eq!(last.revision, seen + changes.len() as u64);
            seen = last.revision;
        }
        assert_eq!(seen, current, "the feed must reach the current revision");
        let next = store.create_entry(entry("after-crash")).await.unwrap();
        assert_eq!(next.revision, current + 1);
    });
}

/// The child of [`acknowledged_writes_survive_sigkill`]; does nothing in a normal run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_writes_until_killed() {
    let Some(dir) = std::env::var_os(CRASH_CHILD_ENV) else {
        return;
    };
    let store = open(Path::new(&dir));
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                // Bounded, in case the parent dies without killing us.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                let mut n = 0;
                while tokio::time::Instant::now() < deadline {
                    let created = store
                        .create_entry(entry(&format!("crash/{writer}/{n}")))
                        .await
                        .unwrap();
                    let mut stdout = std::io::stdout().lock();
                    writeln!(stdout, "ACK {}", created.id).unwrap();
                    stdout.flush().unwrap();
                    n += 1;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
}

/// Each server run begins a history where the revision stands, kept across reopening; a copy
/// of the data directory knows only the histories begun before it was taken, and a value that
/// is not whole histories is started afresh, not read around.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_begin_where_the_revision_stands_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let (first, second) = {
        let store = open(dir.path());
        let first = store.begin_history([1; 16]).await.unwrap().unwrap();
        assert_eq!(
            first,
            [History {
                id: [1; 16],
                start: 0
            }]
        );
        store.create_entry(entry("a")).await.unwrap();
        let revision = store.create_entry(entry("b")).await.unwrap().revision;
        let second = store.begin_history([2; 16]).await.unwrap().unwrap();
        assert_eq!(
            second,
            [
                History {
                    id: [1; 16],
                    start: 0
                },
                History {
                    id: [2; 16],
                    start: revision
                },
            ]
        );
        (first, second)
    };
    let copied = copy.path().join("data");
    sigil_testkit::copy_dir(dir.path(), &copied).unwrap();
    {
        let store = open(dir.path());
        let revision = store.create_entry(entry("c")).await.unwrap().revision;
        drop(store);
        let store = open(dir.path());
        let third = store.begin_history([3; 16]).await.unwrap().unwrap();
        assert_eq!(third[..2], second[..]);
        assert_eq!(
            third[2],
            History {
                id: [3; 16],
                start: revision
            },
            "after a reopen, where the revision stands"
        );
    }
    // The copy was taken after the second run began: it knows the first two, not the third.
    {
        let store = open(&copied);
        let restored = store.begin_history([4; 16]).await.unwrap().unwrap();
        assert_eq!(restored[..2], second[..]);
        assert_eq!(
            restored[2],
            History {
                id: [4; 16],
                start: second[1].start
            },
            "where the copy's revision stands"
        );
        assert!(!restored.iter().any(|h| h.id == [3; 16]));
    }
    // Only the latest are kept.
    {
        let store = open(dir.path());
        for n in 0..MAX_HISTORIES as u8 {
            store.begin_history([100 + n; 16]).await.unwrap();
        }
        let kept = store.begin_history([255; 16]).await.unwrap().unwrap();
        assert_eq!(kept.len(), MAX_HISTORIES);
        assert_eq!(kept.last().unwrap().id, [255; 16]);
        assert!(!kept.contains(&first[0]));
    }
    open_raw(dir.path())
        .open_tree("meta")
        .unwrap()
        .insert(HISTORIES_KEY, &[0u8; 25][..])
        .unwrap();
    // Unreadable: forgotten (every agent takes a snapshot once), not a store that cannot start.
    let store = open(dir.path());
    let afresh = store.begin_history([5; 16]).await.unwrap().unwrap();
    assert_eq!(afresh.len(), 1);
    assert_eq!(afresh[0].id, [5; 16]);
}
