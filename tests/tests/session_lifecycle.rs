//! Privileged sessions with the real binaries: opened with the CLI, served on demand by the real
//! agent to the attested workload that asks, capped at the session's end, ended by close and by
//! the server's clock, with the streams updated each time.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sigil_proto::admin::ListAuditRequest;
use sigil_tests::*;
use tonic::Code;

const ADMIN_ID: &str = "spiffe://example.org/admin/db-migrate";

fn unix(value: &serde_json::Value) -> SystemTime {
    let text = value.as_str().unwrap();
    let secs = sigil_core::time::parse_rfc3339(text).unwrap();
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap())
}

/// The X509-SVID of `id` in a response, if any: (serial, NotAfter).
fn svid_of(
    msg: &sigil_proto::workload::X509svidResponse,
    id: &str,
) -> Option<(String, SystemTime)> {
    msg.svids
        .iter()
        .find(|s| s.spiffe_id == id)
        .map(|s| (leaf_serial(&s.x509_svid), not_after(&s.x509_svid)))
}

#[tokio::test]
async fn session_svid_is_minted_on_demand_capped_at_the_end_and_expires_by_the_server_clock() {
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    let session = open_session(&server, &agent, ADMIN_ID, "20s", &["--svid-ttl", "12s"]);
    assert_eq!(session["state"], "active");
    assert_eq!(session["ticket"], "CHG-123");
    assert_eq!(session["requester"], format!("uid:{}", my_uid()));
    let id = session["id"].as_str().unwrap().to_owned();
    let ends = unix(&session["expires_at"]);

    // Nothing is minted ahead: no issuance is audited before the workload asks.
    let issued_before = issuances(&server, &id).await;
    assert!(issued_before.is_empty(), "{issued_before:?}");

    let (mut stream, first) = x509_stream_with(&agent, |m| svid_of(m, ADMIN_ID).is_some()).await;
    let (serial, first_not_after) = svid_of(&first, ADMIN_ID).unwrap();
    let now = SystemTime::now();
    assert!(
        first_not_after <= now + Duration::from_secs(12 + 1),
        "lifetime from issue is at most the svid ttl"
    );
    assert!(first_not_after <= ends, "never past the session's end");

    // The server audited the workload that asked, with the session and ticket, before issuing.
    let records = issuances(&server, &id).await;
    let record = records
        .iter()
        .find(|r| r["serial"] == serial.as_str())
        .unwrap_or_else(|| panic!("no audit record of serial {serial}: {records:?}"));
    assert_eq!(record["session_id"], id.as_str());
    assert_eq!(record["ticket"], "CHG-123");
    assert_eq!(record["workload_uid"], u64::from(my_uid()));
    assert!(record["workload_pid"].as_i64().unwrap() > 0);
    assert!(
        record["workload_selectors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| *s == format!("unix:uid:{}", my_uid()).as_str())
    );
    let shown = server_cli(&server, &["session", "show", &id, "--output", "json"]).json();
    assert!(
        shown["serials"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["serial"] == serial.as_str()),
        "{shown}"
    );

    // Renewed at half its life, and the renewal is capped at the session's end.
    let renewed = next_x509_until(&mut stream, Duration::from_secs(15), |m| {
        svid_of(m, ADMIN_ID).is_some_and(|(s, _)| s != serial)
    })
    .await
    .unwrap();
    let (_, renewed_not_after) = svid_of(&renewed, ADMIN_ID).unwrap();
    assert!(
        renewed_not_after <= ends,
        "the renewal is capped at the end"
    );

    // At the end, the server expires the session; the stream loses the identity.
    let ended = next_x509_until(&mut stream, Duration::from_secs(20), |_| false).await;
    let status = ended.unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{status:?}\nagent log:\n{}",
        agent.log_text()
    );
    // (NotAfter is whole seconds, so the SVID may lapse up to a second before the end.)
    assert!(SystemTime::now() >= ends - Duration::from_secs(1));
    let shown = loop {
        let shown = server_cli(&server, &["session", "show", &id, "--output", "json"]).json();
        if shown["state"] != "active" || SystemTime::now() > ends + Duration::from_secs(3) {
            break shown;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(shown["state"], "expired");
    assert!(shown["ended_at"].is_string());
    let mut client = agent.client().await;
    let err = client
        .fetch_x509svid(sigil_proto::workload::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn session_close_drops_the_svid_from_open_streams_at_once() {
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    // A standing identity too, so the stream stays open and shows the session going away.
    create_entry(
        &server,
        entry(
            "spiffe://example.org/standing",
            &agent.agent_id(),
            &[&format!("unix:uid:{}", my_uid())],
        ),
    )
    .await
    .unwrap();
    let session = open_session(&server, &agent, ADMIN_ID, "10m", &[]);
    let id = session["id"].as_str().unwrap().to_owned();
    let (mut stream, first) = x509_stream_with(&agent, |m| svid_of(m, ADMIN_ID).is_some()).await;
    let (serial, not_after) = svid_of(&first, ADMIN_ID).unwrap();
    assert!(
        not_after <= SystemTime::now() + Duration::from_secs(300 + 1),
        "the default session_svid_ttl is 5m"
    );

    // Close is close everywhere: the SVID leaves the stream and its serial goes on the CRL the
    // workloads receive, as cessationOfOperation (5).
    let closed = server_cli(&server, &["session", "close", &id, "--output", "json"]).json();
    assert_eq!(closed["state"], "closed");
    let started = std::time::Instant::now();
    let reason_of = |m: &sigil_proto::workload::X509svidResponse| {
        m.crl
            .iter()
            .flat_map(|c| crl_reasons(c))
            .find(|(s, _)| *s == serial)
            .map(|(_, reason)| reason)
    };
    let update = next_x509_until(&mut stream, Duration::from_secs(5), |m| {
        svid_of(m, ADMIN_ID).is_none() && reason_of(m).is_some()
    })
    .await
    .unwrap();
    assert_eq!(svid_ids(&update), ["spiffe://example.org/standing"]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(reason_of(&update), Some(Some(5)), "cessationOfOperation");

    // Revoking the closed session lists its serial again, as privilegeWithdrawn (9).
    let revoked = server_cli(
        &server,
        &[
            "session",
            "revoke",
            &id,
            "--reason",
            "found later",
            "--output",
            "json",
        ],
    )
    .json();
    assert_eq!(revoked["state"], "revoked");
    let update = next_x509_until(&mut stream, Duration::from_secs(5), |m| {
        reason_of(m) == Some(Some(9))
    })
    .await
    .unwrap();
    assert_eq!(svid_ids(&update), ["spiffe://example.org/standing"]);

    // Ended is final.
    let again = server_cli(&server, &["session", "close", &id]);
    assert!(!again.status.success());
    assert!(again.stderr.contains("already revoked"), "{}", again.stderr);
    let listed = server_cli(
        &server,
        &["session", "list", "--state", "revoked", "--output", "json"],
    )
    .json_lines();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
}

#[tokio::test]
async fn session_open_enforces_the_ttl_rules() {
    let server = TestServer::start("max_session_ttl = \"1h\"\nsession_svid_ttl = \"2m\"\n");
    let agent = TestAgentProcess::start(&server).await;
    let agent_id = agent.agent_id();
    let base = |ttl: &'static str, svid_ttl: Option<&'static str>| {
        let mut args = vec![
            "session",
            "open",
            "--spiffe-id",
            ADMIN_ID,
            "--parent-id",
            agent_id.as_str(),
            "--selector",
            "unix:uid:0",
            "--ticket",
            "CHG-1",
            "--reason",
            "r",
            "--ttl",
            ttl,
        ];
        if let Some(s) = svid_ttl {
            args.extend(["--svid-ttl", s]);
        }
        server_cli(&server, &args)
    };
    let too_long = base("2h", None);
    assert!(!too_long.status.success());
    assert!(
        too_long.stderr.contains("max_session_ttl"),
        "{}",
        too_long.stderr
    );
    let svid_not_shorter = base("5m", Some("5m"));
    assert!(!svid_not_shorter.status.success());
    assert!(
        svid_not_shorter.stderr.contains("must be shorter"),
        "{}",
        svid_not_shorter.stderr
    );
    // The default svid ttl (2m) must be shorter than the session too.
    assert!(!base("1m", None).status.success());
    let ok = base("1h", None);
    assert!(ok.status.success(), "{}", ok.stderr);
    assert!(
        ok.stdout.contains("SVID TTL") && ok.stdout.contains("120s"),
        "{}",
        ok.stdout
    );
}

/// The details of every `svid.x509.issue` record of session `id`.
async fn issuances(server: &TestServer, id: &str) -> Vec<serde_json::Value> {
    let records = server
        .admin()
        .await
        .list_audit(ListAuditRequest {
            action: "svid.x509.issue".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    records
        .iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(&r.details_json).unwrap())
        .filter(|d| d["session_id"] == id)
        .collect()
}
