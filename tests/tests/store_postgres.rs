//! A server on PostgreSQL when the database itself fails: PostgreSQL killed as by a power cut
//! (`pg_ctl stop -m immediate`, crash recovery at the next start) while the server takes
//! writes. Skipped with one line when PostgreSQL is not installed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sigil_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_under_load_loses_no_acknowledged_write_and_the_server_recovers_by_itself()
{
    let Some(postgres) = sigil_testkit::Postgres::start() else {
        return;
    };
    let url = postgres.create_database().await;
    let server = TestServer::start(&format!(
        "store = \"postgres\"\npostgres_url = \"{url}\"\nserver_id = \"a\"\n"
    ));

    // Writes before and through the crash.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let stop_rx = stop_rx.clone();
        let server = &server;
        async move { write_entries_until(server, "before", stop_rx).await }
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
        let writer = write_entries_until(&server, "after", rx);
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
    let stored: BTreeMap<String, u64> = all_entries(&server)
        .await
        .into_iter()
        .map(|e| (e.id, e.revision))
        .collect();
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

/// A server that ran on sled (entries, an agent, a privileged session, audit history with a
/// signed checkpoint), stopped, migrated with `sigil-server store migrate`, and started on
/// PostgreSQL: everything is there, `audit verify` is clean against the checkpoints signed
/// before the move, the agent resumes (a new entry reaches its workload), and a second
/// migration into the same database is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_server_migrated_to_postgres_keeps_its_entries_sessions_and_audit_chain() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let mut server = TestServer::start(SLED_STORE);
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    let parent = agent.agent_id();
    let kept = create_entry(&server, entry("spiffe://example.org/kept", &parent, &[&me]))
        .await
        .unwrap();
    let (_stream, first) =
        x509_stream_with(&agent, |m| svid_ids(m).contains(&kept.spiffe_id)).await;
    assert!(svid_ids(&first).contains(&kept.spiffe_id));
    let session = open_session(&server, &agent, "spiffe://example.org/admin/db", "10m", &[]);
    let session_id = session["id"].as_str().unwrap().to_owned();
    let checkpoint = server_cli(&server, &["audit", "checkpoint"]);
    assert!(checkpoint.status.success(), "{}", checkpoint.stderr);
    let before = server_cli(&server, &["audit", "show", "--output", "json"]).json_lines();
    assert!(before.len() > 5, "audit history: {before:?}");
    let (status, _) = server.signal("TERM", Duration::from_secs(10));
    assert!(status.success());

    let from = server.config_path();
    let to = from.with_file_name("server-postgres.toml");
    let pg_lines =
        format!("store = \"postgres\"\npostgres_url = \"{url}\"\nserver_id = \"default\"\n");
    std::fs::write(
        &to,
        std::fs::read_to_string(&from)
            .unwrap()
            .replace(SLED_STORE, &pg_lines),
    )
    .unwrap();
    let migrate = |from: &std::path::Path| {
        std::process::Command::new(binary("sigil-server"))
            .args(["store", "migrate", "--from"])
            .arg(from)
            .arg("--to")
            .arg(&to)
            .output()
            .unwrap()
    };
    let saved_from = from.with_file_name("server-sled.toml");
    std::fs::copy(&from, &saved_from).unwrap();
    let out = migrate(&saved_from);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("migrated revision"), "{stdout}");
    assert!(stdout.contains("1 sessions"), "{stdout}");
    // Into the same database again: refused, nothing changed.
    let again = migrate(&saved_from);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    server.restart_with(&pg_lines);
    assert!(
        server.log_text().contains("store: postgres"),
        "{}",
        server.log_text()
    );
    let verify = server_cli(&server, &["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}{}",
        verify.stdout,
        verify.stderr
    );
    let after = server_cli(&server, &["audit", "show", "--output", "json"]).json_lines();
    assert_eq!(
        after[..before.len()],
        before[..],
        "the audit records before the move are unchanged"
    );
    let shown = server_cli(
        &server,
        &["session", "show", &session_id, "--output", "json"],
    );
    assert!(shown.status.success(), "{}", shown.stderr);
    assert_eq!(shown.json()["ticket"], "CHG-123");
    let got = server
        .admin()
        .await
        .get_entry(sigil_proto::admin::GetEntryRequest {
            id: kept.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, kept, "the entry, its id and revision unchanged");

    // The agent, still running, resumes its sync with the server now on PostgreSQL.
    let added = create_entry(
        &server,
        entry("spiffe://example.org/added", &parent, &[&me]),
    )
    .await
    .unwrap();
    x509_stream_with(&agent, |m| {
        let ids = svid_ids(m);
        ids.contains(&added.spiffe_id) && ids.contains(&kept.spiffe_id)
    })
    .await;
}
