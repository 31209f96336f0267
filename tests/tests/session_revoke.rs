//! Revoking a privileged session with the real binaries: the SVID leaves open streams at once,
//! its serial goes on the CRL the server signs and the agent hands to workloads, banning an
//! agent lists its serial too, and the audit log tells the session's story in order and still
//! verifies (until someone tampers with it).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::{Duration, Instant};

use sigil_proto::admin::{AgentRequest, VerifyAuditRequest};
use sigil_proto::workload::{JwtsvidRequest, X509BundlesRequest};
use sigil_server::sled as engine;
use sigil_server::store_records;
use sigil_tests::*;

const ID: &str = "spiffe://example.org/admin/db-migrate";

#[tokio::test]
async fn session_revoke_puts_the_serial_on_the_crl_delivered_to_workloads_and_the_audit_story_is_in_order()
 {
    // Opens the sled files of the stopped server itself.
    let mut server = TestServer::start(sigil_tests::SLED_STORE);
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    create_entry(
        &server,
        entry("spiffe://example.org/standing", &agent.agent_id(), &[&me]),
    )
    .await
    .unwrap();
    let session = open_session(&server, &agent, ID, "10m", &[]);
    let id = session["id"].as_str().unwrap().to_owned();
    let (mut stream, first) =
        x509_stream_with(&agent, |m| svid_ids(m).contains(&ID.to_owned())).await;
    let svid = first.svids.iter().find(|s| s.spiffe_id == ID).unwrap();
    let serial = leaf_serial(&svid.x509_svid);
    // Before revocation the CRLs list nothing.
    assert!(
        !first.crl.is_empty(),
        "the CRLs are delivered from the start"
    );
    assert!(first.crl.iter().all(|c| crl_serials(c).is_empty()));

    // A JWT-SVID under the session, for the same workload.
    let mut client = agent.client().await;
    let jwts = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: ID.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwts.svids.len(), 1);
    // It carries a jti, recorded on the session like a serial.
    let jti = {
        use base64::Engine as _;
        let payload = jwts.svids[0].svid.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        claims["jti"].as_str().unwrap().to_owned()
    };
    assert_eq!(jti.len(), 32, "{jti}");
    let shown = server_cli(&server, &["session", "show", &id, "--output", "json"]).json();
    assert_eq!(shown["jwts"][0]["jti"], jti.as_str(), "{shown}");
    assert_eq!(shown["jwts"][0]["audience"][0], "db");

    let revoked = server_cli(
        &server,
        &[
            "session",
            "revoke",
            &id,
            "--reason",
            "credentials leaked",
            "--output",
            "json",
        ],
    )
    .json();
    assert_eq!(revoked["state"], "revoked");
    assert_eq!(revoked["end_reason"], "credentials leaked");
    let started = Instant::now();
    let update = next_x509_until(&mut stream, Duration::from_secs(5), |m| {
        !svid_ids(m).contains(&ID.to_owned())
            && m.crl.iter().any(|c| crl_serials(c).contains(&serial))
    })
    .await
    .unwrap_or_else(|s| panic!("{s:?}\nagent log:\n{}", agent.log_text()));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(svid_ids(&update), ["spiffe://example.org/standing"]);

    // The bundle stream carries the CRL too, and `bundle show --crl` prints it.
    let bundles = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert!(bundles.crl.iter().any(|c| crl_serials(c).contains(&serial)));
    let crls = server_cli(&server, &["bundle", "show", "--crl", "--output", "json"]).json_lines();
    assert_eq!(crls.len(), 1, "one CRL per authority");
    assert!(
        crls[0]["revoked_serials"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| *s == serial.as_str())
    );
    let number = crls[0]["crl_number"].as_u64().unwrap();
    let pem = server_cli(&server, &["bundle", "show", "--crl"]);
    assert!(
        pem.stdout.starts_with("-----BEGIN X509 CRL-----"),
        "{}",
        pem.stdout
    );

    // Banning an agent lists its SVID's serial as well, with a higher CRL number.
    let agent_serial = server
        .admin()
        .await
        .get_agent(AgentRequest {
            spiffe_id: agent.agent_id(),
        })
        .await
        .unwrap()
        .into_inner()
        .serial;
    server
        .admin()
        .await
        .ban_agent(AgentRequest {
            spiffe_id: agent.agent_id(),
        })
        .await
        .unwrap();
    let crls = server_cli(&server, &["bundle", "show", "--crl", "--output", "json"]).json_lines();
    let listed: Vec<_> = crls[0]["revoked_serials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    assert!(
        listed.contains(&serial) && listed.contains(&agent_serial),
        "{listed:?}"
    );
    assert!(crls[0]["crl_number"].as_u64().unwrap() > number);

    // The story of the session, in order.
    let story = server_cli(
        &server,
        &["audit", "show", "--session", &id, "--output", "json"],
    )
    .json_lines();
    let mut actions: Vec<_> = story
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    // A workload stream that the test's retry loop opened and dropped as the session arrived
    // may have had an SVID minted too: one issuance or more, in order.
    actions.dedup();
    assert_eq!(
        actions,
        [
            "session.open",
            "svid.x509.issue",
            "svid.jwt.issue",
            "session.revoke"
        ],
        "{story:?}"
    );
    let by_action = |action: &str| {
        story
            .iter()
            .filter(|r| r["action"] == action)
            .collect::<Vec<_>>()
    };
    assert!(
        story
            .iter()
            .all(|r| r["details"]["session_id"] == id.as_str())
    );
    assert!(
        by_action("svid.x509.issue")
            .iter()
            .any(|r| r["details"]["serial"] == serial.as_str())
    );
    let jwt = by_action("svid.jwt.issue");
    assert_eq!(jwt[0]["details"]["ticket"], "CHG-123");
    assert_eq!(jwt[0]["details"]["jti"], jti.as_str());
    let revoke = by_action("session.revoke");
    assert_eq!(revoke[0]["details"]["reason"], "credentials leaked");
    assert_eq!(revoke[0]["details"]["unexpired_jwts"][0], jti.as_str());
    let seqs: Vec<_> = story
        .iter()
        .map(|r| r["sequence"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let text = server_cli(&server, &["audit", "show", "--session", &id]);
    assert!(text.stdout.contains("session.revoke"), "{}", text.stdout);

    // The log verifies; after tampering with the session's issuance record it does not.
    let verified = server
        .admin()
        .await
        .verify_audit(VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    let ok = server_cli(&server, &["audit", "verify"]);
    assert!(ok.status.success(), "{}", ok.stderr);
    let sequence = seqs[1];
    drop(agent);
    server.kill9();
    {
        let db = engine::Config::new()
            .path(server.data_dir().join("store"))
            .flush_every_ms(None)
            .open()
            .unwrap();
        let tree = db.open_tree("audit").unwrap();
        store_records::edit_audit_record(&tree, sequence, |record| {
            record["details"]["workload_uid"] = serde_json::Value::from(12345);
        })
        .unwrap();
        db.flush().unwrap();
    }
    server.restart();
    let broken = server_cli(&server, &["audit", "verify", "--output", "json"]);
    assert!(!broken.status.success());
    let report: serde_json::Value = serde_json::from_str(broken.stdout.trim()).unwrap();
    assert_eq!(report["bad_sequence"], sequence);
}
