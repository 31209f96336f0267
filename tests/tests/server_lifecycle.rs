//! The `sigil-server` process over its life: durability under kill -9, restarts that keep the
//! trust domain, CA rotation as time passes, and shutdown on SIGTERM with streams open.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use sigil_proto::admin::{CountEntriesRequest, CreateEntriesRequest, GetBundleRequest};
use sigil_proto::node::{
    GetBundleRequest as NodeGetBundle, SyncEntriesRequest, SyncEntriesResponse,
    sync_entries_response,
};
use sigil_tests::*;

/// The server's entry count, through the admin API.
async fn entry_count(server: &TestServer) -> u64 {
    server
        .admin()
        .await
        .count_entries(CountEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .count
}

#[tokio::test]
async fn every_acknowledged_write_survives_kill_9() {
    let mut server = TestServer::start("");
    let agent = "spiffe://example.org/sigil/agent/join_token/crash";
    let mut acknowledged = Vec::new();
    let writer = {
        let socket = server.admin_socket();
        tokio::spawn(async move {
            let mut admin =
                sigil_proto::admin::admin_client::AdminClient::new(unix_channel(socket).await);
            let mut acked = Vec::new();
            for i in 0.. {
                let e = entry(
                    &format!("spiffe://example.org/w{i}"),
                    agent,
                    &["unix:uid:1"],
                );
                match admin
                    .create_entries(CreateEntriesRequest { entries: vec![e] })
                    .await
                {
                    Ok(resp) => match resp.into_inner().results[0].result.clone() {
                        Some(sigil_proto::admin::entry_result::Result::Entry(e)) => {
                            acked.push(e.id)
                        }
                        other => panic!("create failed: {other:?}"),
                    },
                    // The server died mid-call: this write was never acknowledged.
                    Err(_) => break,
                }
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill9();
    acknowledged.extend(writer.await.unwrap());
    assert!(
        acknowledged.len() > 10,
        "only {} writes before the kill",
        acknowledged.len()
    );

    server.restart();
    let found: std::collections::HashSet<String> = all_entries(&server)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|id| !found.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged entries lost: {lost:?}",
        lost.len(),
        acknowledged.len()
    );
    let count = entry_count(&server).await;
    assert!(count >= acknowledged.len() as u64);
}

#[tokio::test]
async fn a_restart_keeps_the_ca_bundle_entries_and_agents() {
    let mut server = TestServer::start("");
    let agent = TestAgent::attest(&server).await;
    create_entry(
        &server,
        entry(
            "spiffe://example.org/web",
            agent.id.as_str(),
            &["unix:uid:1"],
        ),
    )
    .await
    .unwrap();
    let before = server
        .admin()
        .await
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();

    server.restart();
    let after = server
        .admin()
        .await
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.spiffe_bundle, before.spiffe_bundle,
        "same keys, same bundle"
    );
    assert_eq!(after.sequence, before.sequence);
    // The agent's SVID still authenticates it: its node record and the CA survived.
    agent
        .client(&server)
        .await
        .get_bundle(NodeGetBundle {})
        .await
        .unwrap();
    let count = entry_count(&server).await;
    assert_eq!(count, 1);
}

/// The X.509 authorities in the bundle: their serial numbers (hex).
async fn authorities(server: &TestServer) -> Vec<String> {
    server
        .bundle()
        .await
        .authorities()
        .iter()
        .map(|c| {
            let (_, cert) = x509_parser::parse_x509_certificate(c).unwrap();
            cert.raw_serial_as_string()
        })
        .collect()
}

/// The serial of the authority that signs now: the issuer of a freshly attested agent SVID.
async fn signer(server: &TestServer) -> String {
    let agent = TestAgent::attest(server).await;
    let (_, leaf) = x509_parser::parse_x509_certificate(&agent.chain[0]).unwrap();
    let aki = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.clone()
            }
            _ => None,
        })
        .unwrap();
    for c in server.bundle().await.authorities() {
        let (_, ca) = x509_parser::parse_x509_certificate(c).unwrap();
        let ski = ca
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(k.clone())
                }
                _ => None,
            });
        if ski.as_ref().map(|k| k.0) == Some(aki.0) {
            return ca.raw_serial_as_string();
        }
    }
    panic!("no authority in the bundle signed the agent SVID");
}

#[tokio::test]
async fn with_a_one_minute_ca_the_bundle_moves_through_prepared_active_and_old() {
    let server = TestServer::start(
        "ca_ttl = \"1m\"\ndefault_x509_svid_ttl = \"10s\"\ndefault_jwt_svid_ttl = \"10s\"",
    );
    let start = std::time::Instant::now();
    let at = |secs: u64| async move {
        let target = start + Duration::from_secs(secs);
        tokio::time::sleep_until(target.into()).await;
    };

    // 0-30 s: one authority, which signs.
    let first = authorities(&server).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(signer(&server).await, first[0]);

    // 30-50 s: the next authority is prepared and published, the first still signs.
    at(36).await;
    let prepared = authorities(&server).await;
    assert_eq!(prepared.len(), 2, "{prepared:?}");
    assert!(prepared.contains(&first[0]));
    assert_eq!(
        signer(&server).await,
        first[0],
        "prepared authorities do not sign yet"
    );
    let second = prepared.iter().find(|s| **s != first[0]).unwrap().clone();

    // 50-60 s: the second signs; the first stays in the bundle (old) until it expires.
    at(54).await;
    let handed_over = authorities(&server).await;
    assert!(
        handed_over.contains(&first[0]) && handed_over.contains(&second),
        "{handed_over:?}"
    );
    assert_eq!(signer(&server).await, second);

    // After 60 s: the first has expired and is pruned.
    at(64).await;
    let pruned = authorities(&server).await;
    assert!(!pruned.contains(&first[0]), "{pruned:?}");
    assert!(pruned.contains(&second));
    assert_eq!(signer(&server).await, second);
}

#[tokio::test]
async fn sigterm_exits_within_six_seconds_with_streams_open() {
    let mut server = TestServer::start("");
    let agent = TestAgent::attest(&server).await;
    create_entry(
        &server,
        entry(
            "spiffe://example.org/web",
            agent.id.as_str(),
            &["unix:uid:1"],
        ),
    )
    .await
    .unwrap();
    let mut client = agent.client(&server).await;
    let mut stream = client
        .sync_entries(SyncEntriesRequest {
            since_revision: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(sync_entries_response::Message::Snapshot(page)) = first.message else {
        panic!("first message must be the snapshot: {first:?}");
    };
    assert_eq!(page.entries.len(), 1);
    assert!(page.last);

    let (status, took) = server.signal("TERM", Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert!(took <= Duration::from_secs(6), "took {took:?}");
    // The stream ended rather than hanging (after the audit checkpoint that follows the
    // snapshot, if it was not read yet).
    let end = loop {
        let next = tokio::time::timeout(Duration::from_secs(2), stream.message())
            .await
            .expect("stream still open");
        match next {
            Ok(Some(SyncEntriesResponse {
                message: Some(sync_entries_response::Message::AuditCheckpoint(_)),
            })) => {}
            other => break other,
        }
    };
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}

/// A clean stop ends with sled's snapshot over everything written since the start, so that the
/// next start reads it instead of the whole log; the next start finds every entry.
#[tokio::test]
async fn a_clean_stop_leaves_a_snapshot_of_the_store_for_the_next_start() {
    let mut server = TestServer::start(SLED_STORE);
    let store = server.data_dir().join("store");
    // A store sled creates gets no snapshot; each later open writes one.
    let at_start = sigil_testkit::sled_files::snapshot_offset(&store)
        .unwrap()
        .unwrap_or(0);
    let agent = "spiffe://example.org/sigil/agent/join_token/stop";
    for i in 0..20 {
        create_entry(
            &server,
            entry(
                &format!("spiffe://example.org/w{i}"),
                agent,
                &["unix:uid:1"],
            ),
        )
        .await
        .unwrap();
    }

    let (status, _) = server.signal("TERM", Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    // The last line may still be on its way from the pipe.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !server
        .log_text()
        .contains("store: snapshot written; the next start reads it instead of the whole log")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot in the log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at_stop = sigil_testkit::sled_files::snapshot_offset(&store)
        .unwrap()
        .expect("no snapshot after the stop");
    assert!(
        at_stop > at_start,
        "the snapshot ({at_stop:#x}) does not cover what was written after the start \
         ({at_start:#x})"
    );

    server.restart();
    let count = entry_count(&server).await;
    assert_eq!(count, 20);
}

#[tokio::test]
async fn sigint_exits_at_once() {
    let mut server = TestServer::start("");
    let (_, took) = server.signal("INT", Duration::from_secs(5));
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[tokio::test]
async fn a_stale_admin_socket_is_replaced_and_a_live_one_is_not() {
    let mut server = TestServer::start("");
    server.kill9();
    assert!(
        server.admin_socket().exists(),
        "kill -9 leaves the socket behind"
    );
    server.restart();
    server
        .admin()
        .await
        .count_entries(CountEntriesRequest {})
        .await
        .unwrap();

    // A second server on the same socket refuses to start.
    let out = std::process::Command::new(binary("sigil-server"))
        .args([
            "run",
            "--trust-domain",
            "example.org",
            "--bind-address",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(tempfile::tempdir().unwrap().path())
        .arg("--admin-socket")
        .arg(server.admin_socket())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by a running server"), "{stderr}");
}

#[tokio::test]
async fn a_bad_config_is_refused_with_every_problem_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        "trust_domain = \"Bad.org\"\nca_ttl = \"1h\"\ndefault_x509_svid_ttl = \"1h\"\ncolour = 1\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary("sigil-server"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["trust_domain", "default_x509_svid_ttl", "colour"] {
        assert!(stderr.contains(key), "{key} not named in: {stderr}");
    }
    assert!(
        stderr.contains("10m"),
        "the limit is given in numbers: {stderr}"
    );
}

/// The end-to-end tests run on the store `SIGIL_TEST_STORE` asks for (CI runs them on both):
/// a server on PostgreSQL says so and keeps no sled files; one on sled keeps them in its data
/// directory.
#[tokio::test]
async fn the_server_runs_on_the_store_the_test_run_asks_for() {
    let server = TestServer::start("");
    let sled_dir = server.data_dir().join("store");
    if std::env::var(STORE_ENV).as_deref() == Ok("postgres") {
        assert!(server.on_postgres());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !server.log_text().contains("store: postgres") {
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                server.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!sled_dir.exists());
    } else {
        assert!(!server.on_postgres());
        assert!(sled_dir.is_dir());
    }
}
