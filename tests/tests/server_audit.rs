//! The audit log of the real `sigil-server` binary: admin calls and issuances leave records
//! (with the right actors), `ListAudit` filters and pages them, `VerifyAudit` passes on an
//! intact log (with a checkpoint signed at graceful shutdown), and names the record that was
//! altered directly in the store while the server was down.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sigil_proto::admin::{
    AgentRequest, AuditRecord, DeleteEntryRequest, ListAuditRequest, MintJwtsvidRequest,
    VerifyAuditRequest, VerifyAuditResponse,
};
use sigil_proto::node::{BatchNewX509svidRequest, NewJwtsvidRequest, NewX509svidParams};
use sigil_server::sled as engine;
use sigil_server::store_records;
use sigil_tests::*;

/// The actor the admin API records for this test process.
fn my_actor() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();
    format!("uid:{uid}")
}

/// Every record passing the filter in `request`, following the pages.
async fn list_audit(server: &TestServer, mut request: ListAuditRequest) -> Vec<AuditRecord> {
    let mut admin = server.admin().await;
    let mut out = Vec::new();
    loop {
        let page = admin
            .list_audit(request.clone())
            .await
            .unwrap()
            .into_inner();
        out.extend(page.records);
        if page.next_page_token.is_empty() {
            return out;
        }
        request.page_token = page.next_page_token;
    }
}

async fn verify_audit(server: &TestServer) -> VerifyAuditResponse {
    server
        .admin()
        .await
        .verify_audit(VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn details(record: &AuditRecord) -> Value {
    serde_json::from_str(&record.details_json).unwrap()
}

/// Rewrites the `serial` detail of record `sequence` in the stopped server's store, without
/// touching its hashes: what someone with write access to the data directory could do.
fn alter_record(store_dir: &Path, sequence: u64) {
    let db = engine::Config::new()
        .path(store_dir)
        .flush_every_ms(None)
        .open()
        .unwrap();
    let tree = db.open_tree("audit").unwrap();
    store_records::edit_audit_record(&tree, sequence, |record| {
        record["details"]["serial"] = Value::from("00deadbeef");
    })
    .unwrap();
    db.flush().unwrap();
}

#[tokio::test]
async fn admin_calls_and_issuances_are_audited_verified_and_tampering_is_named() {
    // Opens the sled files of the stopped server itself.
    let mut server = TestServer::start(sigil_tests::SLED_STORE);
    let me = my_actor();

    // Admin calls and an attestation.
    let agent = TestAgent::attest(&server).await;
    let web = create_entry(
        &server,
        entry(
            "spiffe://example.org/web",
            agent.id.as_str(),
            &["unix:uid:1000"],
        ),
    )
    .await
    .unwrap();
    let gone = create_entry(
        &server,
        entry(
            "spiffe://example.org/gone",
            agent.id.as_str(),
            &["unix:uid:1001"],
        ),
    )
    .await
    .unwrap();
    let mut admin = server.admin().await;
    admin
        .delete_entry(DeleteEntryRequest {
            id: gone.id.clone(),
        })
        .await
        .unwrap();
    admin
        .mint_jwtsvid(MintJwtsvidRequest {
            spiffe_id: "spiffe://example.org/ops".into(),
            audience: vec!["db".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap();

    // Issuances through the node API.
    let mut node = agent.client(&server).await;
    let batch = node
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: web.id.clone(),
                csr: TestKey::new().csr(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results.len(), 1);
    node.new_jwtsvid(NewJwtsvidRequest {
        entry_id: web.id.clone(),
        audience: vec!["api".into()],
    })
    .await
    .unwrap();

    // The records, in order, with their actors.
    let records = list_audit(&server, ListAuditRequest::default()).await;
    let summary: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r.action.as_str(), r.actor.as_str()))
        .collect();
    let agent_id = agent.id.to_string();
    assert_eq!(
        summary,
        vec![
            ("token.generate", me.as_str()),
            ("agent.attest", agent_id.as_str()),
            ("entry.create", me.as_str()),
            ("entry.create", me.as_str()),
            ("entry.delete", me.as_str()),
            ("jwt.mint", me.as_str()),
            ("svid.x509.issue", agent_id.as_str()),
            ("svid.jwt.issue", agent_id.as_str()),
        ],
        "{records:#?}"
    );
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.sequence, i as u64 + 1);
        assert_eq!(record.hash.len(), 64);
        if i > 0 {
            assert_eq!(record.prev_hash, records[i - 1].hash);
        }
    }
    // The join token is recorded only as the agent ID it gives.
    assert_eq!(records[0].subject, agent_id);
    assert!(!records[0].details_json.contains("token\""));
    assert_eq!(records[1].subject, agent_id);
    assert!(details(&records[1])["serial"].as_str().is_some());
    assert_eq!(records[2].subject, web.id);
    assert_eq!(
        details(&records[2])["spiffe_id"],
        "spiffe://example.org/web"
    );
    let x509 = &records[6];
    assert_eq!(x509.subject, "spiffe://example.org/web");
    let x509_details = details(x509);
    assert_eq!(x509_details["agent"], agent_id.as_str());
    assert_eq!(x509_details["entry_id"], web.id.as_str());
    assert!(x509_details["not_after"].as_u64().unwrap() > 0);
    let serial = x509_details["serial"].as_str().unwrap().to_owned();
    assert!(!serial.is_empty());
    assert_eq!(details(&records[7])["audience"], serde_json::json!(["api"]));

    // Filters and pages.
    let svids = list_audit(
        &server,
        ListAuditRequest {
            action: "svid".into(),
            page_size: 1,
            ..ListAuditRequest::default()
        },
    )
    .await;
    assert_eq!(svids.len(), 2);
    let web_records = list_audit(
        &server,
        ListAuditRequest {
            spiffe_id: "spiffe://example.org/web".into(),
            ..ListAuditRequest::default()
        },
    )
    .await;
    assert_eq!(
        web_records.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        vec![3, 7, 8]
    );
    let by_agent = list_audit(
        &server,
        ListAuditRequest {
            actor: agent_id.clone(),
            ..ListAuditRequest::default()
        },
    )
    .await;
    assert_eq!(by_agent.len(), 3);
    let future = list_audit(
        &server,
        ListAuditRequest {
            since_time: records[7].time + 3600,
            ..ListAuditRequest::default()
        },
    )
    .await;
    assert!(future.is_empty());

    // An intact log verifies; only the genesis checkpoint, signed before the server served, is
    // there yet (the periodic checkpoint is a minute away).
    let verified = verify_audit(&server).await;
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.checked, 8);
    assert_eq!(verified.checkpoint.as_ref().map(|c| c.sequence), Some(0));
    // (The genesis checkpoint in the store, and in the server's state file.)
    assert_eq!(
        (verified.checkpoints_checked, verified.unsigned_records),
        (2, 8)
    );
    assert_eq!(verified.chain_id, "default");
    assert!(records.iter().all(|r| r.chain_id == "default"));
    assert_eq!(verified.head_sequence, 8);
    assert_eq!(verified.head_hash, records[7].hash);
    assert_eq!(verified.key_fingerprint.len(), 64);

    // A graceful stop signs a checkpoint of the head.
    let (status, _) = server.signal("TERM", Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    server.restart();
    let verified = verify_audit(&server).await;
    assert!(verified.ok, "{verified:?}");
    let checkpoint = verified.checkpoint.clone().unwrap();
    assert_eq!(checkpoint.sequence, 8);
    assert_eq!(checkpoint.hash, records[7].hash);
    assert_eq!(checkpoint.key_fingerprint, verified.key_fingerprint);
    assert_eq!(verified.unsigned_records, 0);

    // A new admin call after the restart continues the chain.
    admin = server.admin().await;
    admin
        .ban_agent(AgentRequest {
            spiffe_id: agent_id.clone(),
        })
        .await
        .unwrap();
    let verified = verify_audit(&server).await;
    assert!(verified.ok, "{verified:?}");
    assert_eq!((verified.checked, verified.unsigned_records), (9, 1));

    // Crash, alter the X509-SVID record's serial in the store, restart: verify names it.
    server.kill9();
    alter_record(&server.data_dir().join("store"), x509.sequence);
    server.restart();
    let verified = verify_audit(&server).await;
    assert!(!verified.ok, "{verified:?}");
    assert_eq!(verified.bad_sequence, x509.sequence, "{verified:?}");
    assert!(verified.problem.contains("altered"), "{verified:?}");
    assert_eq!(verified.checked, x509.sequence - 1);
    // The altered record is what the log now shows.
    let shown = list_audit(
        &server,
        ListAuditRequest {
            action: "svid.x509.issue".into(),
            ..ListAuditRequest::default()
        },
    )
    .await;
    assert_eq!(details(&shown[0])["serial"], "00deadbeef");
    assert_ne!(serial, "00deadbeef");
}

/// The CLI's `audit show` and `audit verify` against the real server.
#[tokio::test]
async fn the_cli_shows_and_verifies_the_audit_log() {
    let server = TestServer::start("");
    server.join_token(std::time::Duration::from_secs(60)).await;
    let cli = |args: &[&str]| {
        std::process::Command::new(binary("sigil-server"))
            .args(args)
            .arg("--admin-socket")
            .arg(server.admin_socket())
            .output()
            .unwrap()
    };
    let out = cli(&["audit", "show", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "token.generate" && r["actor"] == "uid:0"),
        "{records:?}"
    );
    assert_eq!(records[0]["id"], "1");
    let out = cli(&["audit", "show", "--action", "token"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("SEQ") && text.contains("token.generate"),
        "{text}"
    );
    let out = cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("Result ") && l.ends_with(": OK")),
        "{text}"
    );
    assert!(text.contains("Checkpoints checked"), "{text}");
}
