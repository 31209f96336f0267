//! A server on PostgreSQL when the database itself fails: PostgreSQL killed as by a power cut
//! (`pg_ctl stop -m immediate`, crash recovery at the next start) while the server takes
//! writes. Skipped with one line when PostgreSQL is not installed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sigil_proto::admin::{CreateEntriesRequest, ListEntriesRequest};
use sigil_tests::*;

/// Creates entries one by one until `stop` says so, recording each acknowledged one (id and
/// revision) and counting refusals (the database was down).
async fn write_until(
    server: &TestServer,
    prefix: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<(String, u64)>, usize) {
    let mut admin = server.admin().await;
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0.. {
        if *stop.borrow() {
            break;
        }
        let e = entry(
            &format!("spiffe://example.org/{prefix}/{i}"),
            "spiffe://example.org/sigil/agent/join_token/pg",
            &["unix:uid:1"],
        );
        match admin
            .create_entries(CreateEntriesRequest { entries: vec![e] })
            .await
            .map(|r| r.into_inner().results[0].result.clone())
        {
            Ok(Some(sigil_proto::admin::entry_result::Result::Entry(e))) => {
                acked.push((e.id, e.revision));
            }
            Ok(_) | Err(_) => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    (acked, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_under_load_loses_no_acknowledged_write_and_the_server_recovers_by_itself()
{
    let Some(postgres) = sigil_testkit::Postgres::start() else {
        return;
    };
    let url = postgres.create_database().await;
    let server = TestServer::start(&format!("store = \"postgres\"\npostgres_url = \"{url}\"\n"));

    // Writes before and through the crash.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let stop_rx = stop_rx.clone();
        let server = &server;
        async move { write_until(server, "before", stop_rx).await }
    };
    let crash = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        postgres.stop_immediately().unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let _ = stop_tx.send(true);
    };
    let ((before, refused), ()) = tokio::join!(writer, crash);
    assert!(
        before.len() > 10,
        "only {} writes before the crash",
        before.len()
    );
    assert!(refused > 0, "writes went on while PostgreSQL was down");

    // PostgreSQL comes back; the same server process takes writes again by itself.
    postgres.start_again().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let writer = write_until(&server, "after", rx);
        let timer = async {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let _ = tx.send(true);
        };
        let ((after, _), ()) = tokio::join!(writer, timer);
        if after.len() >= 5 {
            break after;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not recover; log:\n{}",
            server.log_text()
        );
    };

    // Every acknowledged write is there, with the revision it was acknowledged with.
    let mut admin = server.admin().await;
    let mut stored = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_entries(ListEntriesRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        stored.extend(page.entries.into_iter().map(|e| (e.id, e.revision)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    for (id, revision) in before.iter().chain(&after) {
        assert_eq!(
            stored.get(id),
            Some(revision),
            "acknowledged entry {id} (revision {revision}) lost or changed"
        );
    }
    // Revisions are never reused: all distinct, and those after the crash above all before.
    let revisions: BTreeSet<u64> = before.iter().chain(&after).map(|(_, r)| *r).collect();
    assert_eq!(revisions.len(), before.len() + after.len());
    let last_before = before.iter().map(|(_, r)| *r).max().unwrap();
    assert!(after.iter().all(|(_, r)| *r > last_before));

    // The audit chain went through the crash intact.
    let verify = server_cli(&server, &["audit", "verify"]);
    assert!(verify.status.success(), "{}", verify.stderr);
}
