//! The PostgreSQL backend against a real PostgreSQL server (started by `sigil-testkit`, one
//! database per test; skipped with one line when PostgreSQL is not installed).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sigil_core::{SelectorSet, SpiffeId};

use super::{PostgresOptions, PostgresStore};
use crate::store::conformance::{self, TestConfig};
use crate::store::{Change, ChangeKind, ChangesSince, NewEntry, Store, StoreError};

/// A store on a fresh database of the shared cluster; `None` when PostgreSQL is missing.
async fn fresh_store(retention: u64) -> Option<PostgresStore> {
    let cluster = sigil_testkit::shared()?;
    let url = cluster.create_database().await;
    let mut options = PostgresOptions::new(url);
    options.change_retention = retention;
    options.poll_interval = Duration::from_millis(100);
    Some(PostgresStore::open(options).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passes_the_conformance_suite() {
    if sigil_testkit::shared().is_none() {
        return;
    }
    conformance::run_all(|config: TestConfig| async move {
        let store = fresh_store(config.change_retention).await.unwrap();
        (store, ())
    })
    .await;
}

fn entry(writer: usize, n: usize) -> NewEntry {
    let id = |s: String| SpiffeId::new(&s).unwrap();
    NewEntry::new(
        id(format!("spiffe://example.org/w{writer}/e{n}")),
        id("spiffe://example.org/agent".to_owned()),
        SelectorSet::from_iter([sigil_core::Selector::parse(&format!("unix:uid:{n}")).unwrap()]),
    )
}

/// Concurrent writers on several connections, a third of their writes deliberately failing
/// (duplicates, so the transaction rolls back after writing rows), and readers that follow the
/// feed all the while: each reader sees every committed change exactly once, in order, with no
/// gap, and the feed ends exactly at the store's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feed_never_misses_or_reorders_a_change_under_concurrent_writers() {
    let Some(store) = fresh_store(1_000_000).await else {
        return;
    };
    let store = Arc::new(store);
    const WRITERS: usize = 8;
    const WRITES: usize = 60;
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut readers = Vec::new();
    for _ in 0..2 {
        let store = store.clone();
        let finished = finished.clone();
        readers.push(tokio::spawn(async move {
            let mut seen: Vec<Change> = Vec::new();
            let mut revision = 0;
            let mut updates = store.subscribe();
            loop {
                let last_round = finished.load(std::sync::atomic::Ordering::SeqCst);
                loop {
                    match store.changes_since(revision, 7).await.unwrap() {
                        ChangesSince::Changes(changes) if changes.is_empty() => break,
                        ChangesSince::Changes(changes) => {
                            for change in changes {
                                assert_eq!(change.revision, revision + 1, "gap or reorder");
                                revision = change.revision;
                                seen.push(change);
                            }
                        }
                        ChangesSince::Expired => panic!("feed expired at {revision}"),
                    }
                }
                if last_round {
                    return seen;
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), updates.changed()).await;
            }
        }));
    }

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut rejected = 0;
            for n in 0..WRITES {
                let result = if n % 3 == 2 {
                    // A duplicate of this writer's previous entry plus a fresh one, in one
                    // batch: the duplicate is refused inside the transaction.
                    store
                        .create_entries(vec![entry(w, n - 1), entry(w, n)])
                        .await
                        .unwrap()
                } else if n % 5 == 4 {
                    // An update to an identity that exists: the transaction rolls back.
                    let victim = store.create_entry(entry(w, n)).await.unwrap();
                    committed.push(victim.revision);
                    let update = store.update_entry(&victim.id, entry(w, n - 1)).await;
                    assert!(matches!(update, Err(StoreError::AlreadyExists { .. })));
                    rejected += 1;
                    continue;
                } else {
                    vec![store.create_entry(entry(w, n)).await]
                };
                for r in result {
                    match r {
                        Ok(e) => committed.push(e.revision),
                        Err(StoreError::AlreadyExists { .. }) => rejected += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            (committed, rejected)
        }));
    }
    let mut committed = BTreeSet::new();
    let mut rejected = 0;
    for writer in writers {
        let (revisions, r) = writer.await.unwrap();
        rejected += r;
        for revision in revisions {
            assert!(
                committed.insert(revision),
                "revision {revision} handed out twice"
            );
        }
    }
    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        rejected >= WRITERS * WRITES / 5,
        "the rollbacks happened: {rejected}"
    );

    let head = store.current_revision().await.unwrap();
    assert_eq!(
        committed.len() as u64,
        head,
        "no gap: every revision was acknowledged"
    );
    assert_eq!(
        committed,
        (1..=head).collect::<BTreeSet<u64>>(),
        "acknowledged revisions are exactly 1..=head"
    );
    let snapshot = store.snapshot_entries().await.unwrap();
    assert_eq!(snapshot.revision, head);
    for reader in readers {
        let seen = reader.await.unwrap();
        assert_eq!(seen.len() as u64, head, "every change seen exactly once");
        // Replaying what the reader saw gives exactly the store's state.
        let mut state = std::collections::BTreeMap::new();
        for change in seen {
            match change.kind {
                ChangeKind::EntryUpserted(e) => {
                    state.insert(e.id.clone(), e);
                }
                ChangeKind::EntryDeleted(e) => {
                    state.remove(&e.id);
                }
            }
        }
        assert_eq!(
            state.into_values().collect::<Vec<_>>(),
            snapshot.entries,
            "the feed replays to the snapshot"
        );
    }
}

/// A password in the connection string is refused before anything connects; options never
/// print one.
#[test]
fn a_password_in_the_url_is_refused_and_never_printed() {
    for url in [
        "postgresql://sigil:hunter2@db.example.org/sigil",
        "host=db.example.org user=sigil password=hunter2 dbname=sigil",
    ] {
        let err = PostgresOptions::new(url).connection_config().err().unwrap();
        let text = err.to_string();
        assert!(text.contains("must not contain a password"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    let mut options = PostgresOptions::new("host=127.0.0.1 user=sigil");
    options.password = Some(zeroize::Zeroizing::new("hunter2".to_owned()));
    assert!(options.connection_config().is_ok());
    assert!(!format!("{options:?}").contains("hunter2"));
    let err = PostgresOptions::new("host=db sslmode=require")
        .connection_config()
        .err()
        .unwrap();
    assert!(err.to_string().contains("postgres_ca_file"), "{err}");
    let err = PostgresOptions::new("postgresql://[bad")
        .connection_config()
        .err()
        .unwrap();
    assert!(err.to_string().contains("cannot be parsed"), "{err}");
}

/// Runs SQL on the database at `url` (what an operator or another server would do).
async fn sql(url: &str, statements: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(connection);
    client.batch_execute(statements).await.unwrap();
    drop(client);
    let _ = task.await;
}

fn options(url: &str, chain: &str) -> PostgresOptions {
    let mut options = PostgresOptions::new(url);
    options.server_id = chain.to_owned();
    options
}

/// The schema is created once; a second server (another id) starting on it migrates
/// nothing; a second instance of the same server id is refused while the first runs (naming
/// it), and may start as soon as it is gone; an instance whose id was taken over writes no
/// audit record and its heartbeat says so; a schema newer than this build is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_live_instance_per_server_id_and_no_schema_newer_than_the_build() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let first = PostgresStore::open(options(&url, "a")).await.unwrap();
    first.heartbeat().await.unwrap();
    let other_chain = PostgresStore::open(options(&url, "b")).await.unwrap();
    let err = PostgresStore::open(options(&url, "a")).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("another sigil-server with server_id \"a\"")
            && text.contains(&format!("instance {}", first.inner.instance_id))
            && text.contains("last heartbeat"),
        "{err}"
    );
    drop(first);
    // The lock goes with the connection: at once, not after a heartbeat timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        match PostgresStore::open(options(&url, "a")).await {
            Ok(store) => break store,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(e.to_string().contains("another sigil-server"), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the lock outlived its server: {e}"),
        }
    };
    again.heartbeat().await.unwrap();
    let record = || {
        vec![crate::audit::NewAuditRecord::new(
            "uid:0",
            "entry.create",
            "spiffe://example.org/x",
        )]
    };
    again.append_audit(record()).await.unwrap();
    // Another instance claims the id (as one would after this one lost its connection).
    sql(
        &url,
        "UPDATE servers SET instance_id = 'intruder', host = 'elsewhere' WHERE server_id = 'a'",
    )
    .await;
    for err in [
        again.heartbeat().await.unwrap_err(),
        again.append_audit(record()).await.unwrap_err(),
    ] {
        assert!(
            matches!(&err, StoreError::Superseded { server_id, instance }
                if server_id == "a" && instance == "instance intruder on host elsewhere"),
            "{err:?}"
        );
    }
    assert_eq!(again.audit_head().await.unwrap().unwrap().sequence, 1);
    // The other server's chain is its own: untouched.
    other_chain.append_audit(record()).await.unwrap();
    drop((again, other_chain));
    sql(
        &url,
        "INSERT INTO schema_migrations (version, description) VALUES (999, 'from the future')",
    )
    .await;
    let err = PostgresStore::open(options(&url, "c")).await.unwrap_err();
    assert!(
        err.to_string().contains("newer than this build knows"),
        "{err}"
    );
}

/// The one CRL counter of earlier builds, migrated as authority "", is a floor for every
/// authority that has no counter yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_crl_counter_is_a_floor_for_new_authorities() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let store = PostgresStore::open(PostgresOptions::new(&url))
        .await
        .unwrap();
    sql(
        &url,
        "INSERT INTO crl_numbers (authority_id, last_number) VALUES ('', 9000)",
    )
    .await;
    assert_eq!(store.next_crl_number("new", 5).await.unwrap(), 9001);
    assert_eq!(store.next_crl_number("new", 5).await.unwrap(), 9002);
    assert_eq!(
        store.next_crl_number("later", 10_000).await.unwrap(),
        10_000
    );
}

/// Without postgres_ca_file, only a Unix socket or loopback is reached in the clear unless
/// the URL says sslmode=disable.
#[test]
fn plain_connections_to_other_hosts_must_be_chosen() {
    for url in [
        "host=/var/run/postgresql user=sigil",
        "host=127.0.0.1 user=sigil",
        "host=localhost user=sigil",
        "postgresql://sigil@[::1]/sigil",
        "host=db.example.org user=sigil sslmode=disable",
    ] {
        assert!(
            PostgresOptions::new(url).connection_config().is_ok(),
            "{url}"
        );
    }
    for url in [
        "host=db.example.org user=sigil",
        "postgresql://sigil@10.0.0.5/sigil",
    ] {
        let err = PostgresOptions::new(url).connection_config().err().unwrap();
        assert!(err.to_string().contains("postgres_ca_file"), "{url}: {err}");
    }
}

/// TLS through rustls against a real PostgreSQL that accepts only TLS: with the CA that signed
/// its certificate the store opens and works; without a CA file (plain TCP) the server refuses
/// the connection; with another CA, the certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_real_postgres_verifies_its_certificate() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    let Some(cluster) =
        sigil_testkit::Postgres::start_tls(&server_cert.pem(), &server_key.serialize_pem())
    else {
        return;
    };
    let url = format!(
        "host=127.0.0.1 port={} user=sigil dbname=postgres",
        cluster.port()
    );
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let mut options = PostgresOptions::new(url.clone());
    options.ca_file = Some(ca_file);
    let store = PostgresStore::open(options).await.unwrap();
    let entry = store.create_entry(entry(0, 0)).await.unwrap();
    assert_eq!(store.get_entry(&entry.id).await.unwrap(), Some(entry));
    drop(store);

    // Plain TCP: the database has no line for it.
    let err = PostgresStore::open(PostgresOptions::new(url.clone()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pg_hba.conf"), "{err}");

    // Another CA: the certificate does not verify.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = other_params.self_signed(&other_key).unwrap();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.pem()).unwrap();
    let mut options = PostgresOptions::new(url);
    options.ca_file = Some(other_file);
    let err = PostgresStore::open(options).await.unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

/// An update that races a create of the same identity (committed while the update waits on
/// its unique index) is refused naming the entry that won, as the sled store names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_losing_a_race_for_an_identity_names_the_winner() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let store = PostgresStore::open(PostgresOptions::new(&url))
        .await
        .unwrap();
    let moved = store.create_entry(entry(1, 1)).await.unwrap();
    let target = entry(1, 2);

    // Another writer inserts the target identity and holds its transaction open.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(connection);
    client.batch_execute("BEGIN").await.unwrap();
    let winner = "0123456789abcdef0123456789abcdef";
    client
        .execute(
            "INSERT INTO entries (id, identity_key, spiffe_id, parent_id, selectors, revision, body) \
             VALUES ($1, $2, 'spiffe://example.org/x', 'spiffe://example.org/agent', '{}', 0, '')",
            &[&winner, &target.identity_key().as_slice()],
        )
        .await
        .unwrap();
    let update = {
        let store = store.clone();
        let id = moved.id.clone();
        tokio::spawn(async move { store.update_entry(&id, target).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !update.is_finished(),
        "the update waits for the other writer"
    );
    client.batch_execute("COMMIT").await.unwrap();
    match update.await.unwrap() {
        Err(StoreError::AlreadyExists { key, .. }) => assert_eq!(key, winner),
        other => panic!("{other:?}"),
    }
    // The loser's entry is unchanged.
    assert_eq!(store.get_entry(&moved.id).await.unwrap(), Some(moved));
    drop(client);
    let _ = task.await;
}

/// A singleton job (pruning, session expiry) is skipped while another server holds its
/// advisory lock, and runs once the lock's transaction ended: no leader, no double work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_singleton_job_is_skipped_while_another_server_runs_it() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let store = PostgresStore::open(options(&url, "a")).await.unwrap();
    let now = std::time::SystemTime::now();
    store
        .create_join_token(crate::store::JoinToken {
            token_hash: "old".to_owned(),
            expires_at: now - Duration::from_secs(1),
            created_at: now - Duration::from_secs(60),
            alias_spiffe_id: None,
        })
        .await
        .unwrap();
    // "Another server" in the middle of the job: its transaction holds the job's lock.
    let (other, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    other.batch_execute("BEGIN").await.unwrap();
    other
        .query_one(
            "SELECT pg_advisory_xact_lock($1)",
            &[&super::job_lock_key("prune_join_tokens")],
        )
        .await
        .unwrap();
    assert_eq!(store.prune_join_tokens(now).await.unwrap(), 0, "skipped");
    other.batch_execute("COMMIT").await.unwrap();
    assert_eq!(store.prune_join_tokens(now).await.unwrap(), 1, "ran");

    // A job of several steps (session expiry) holds its lock while its work runs: the other
    // server's work is dropped unpolled while this one's runs, and runs once it is done.
    let polled = std::sync::atomic::AtomicUsize::new(0);
    let work = |n: usize| {
        let polled = &polled;
        Box::pin(async move {
            polled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            n
        })
    };
    let b = PostgresStore::open(options(&url, "b")).await.unwrap();
    let (entered, enter) = tokio::sync::oneshot::channel::<()>();
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .run_job(
                    "expire_sessions",
                    Box::pin(async move {
                        let _ = entered.send(());
                        let _ = finished.await;
                        7
                    }),
                )
                .await
        })
    };
    enter.await.unwrap();
    assert_eq!(b.run_job("expire_sessions", work(1)).await.unwrap(), None);
    assert_eq!(
        b.run_job("prune_join_tokens", work(2)).await.unwrap(),
        Some(2),
        "another job is not held up"
    );
    finish.send(()).unwrap();
    assert_eq!(running.await.unwrap().unwrap(), Some(7));
    assert_eq!(
        b.run_job("expire_sessions", work(3)).await.unwrap(),
        Some(3)
    );
    assert_eq!(
        polled.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the skipped work never ran"
    );
    drop(other);
    let _ = driver.await;
}

/// A broker's events that reach two servers (its forwarder retried through the other after a
/// lost answer) are in the chains once: the source's last sequence is shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_events_sent_to_two_servers_are_recorded_once() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let a = PostgresStore::open(options(&url, "a")).await.unwrap();
    let b = PostgresStore::open(options(&url, "b")).await.unwrap();
    let source = crate::audit::AuditSource {
        spiffe_id: "spiffe://example.org/broker".to_owned(),
        spool_id: "0123456789abcdef0123456789abcdef".to_owned(),
    };
    let first = a
        .append_source_events(&source, conformance::source_events(&[1, 2, 3]))
        .await
        .unwrap();
    assert_eq!((first.appended.len(), first.acknowledged), (3, 3));
    // The same batch again, and one more event, through the other server.
    let again = b
        .append_source_events(&source, conformance::source_events(&[1, 2, 3, 4]))
        .await
        .unwrap();
    assert_eq!(again.acknowledged, 4);
    assert_eq!(again.appended.len(), 1, "{:?}", again.appended);
    assert_eq!(again.appended[0].chain_id, "b");
    assert_eq!(b.audit_source_sequence(&source).await.unwrap(), 4);
    let heads: Vec<u64> = a
        .audit_chains()
        .await
        .unwrap()
        .iter()
        .map(|h| h.sequence)
        .collect();
    assert_eq!(heads, [3, 1], "chains a and b hold 4 records in all");
}
