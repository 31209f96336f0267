//! Two-person approval of privileged sessions with the real binaries: nothing is issued while
//! a session is pending, its requester cannot approve it, another admin uid can, and a pending
//! session that reaches its end unapproved expires.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::time::Duration;

use sigil_tests::*;
use tonic::Code;

const ID: &str = "spiffe://example.org/admin/break-glass";

/// The second admin: uid 65534, listed in `admin_uids`.
const OTHER_ADMIN: u32 = 65534;

#[tokio::test]
async fn session_approval_is_required_self_approval_refused_and_another_admin_approves() {
    if !is_root() {
        eprintln!("note: skipping: switching to another admin uid needs root");
        return;
    }
    let server = TestServer::start(&format!(
        "admin_uids = [{OTHER_ADMIN}]\nrequire_session_approval = true\n"
    ));
    let agent = TestAgentProcess::start(&server).await;
    let session = open_session(&server, &agent, ID, "10m", &[]);
    assert_eq!(session["state"], "pending");
    assert_eq!(session["approval_required"], true);
    let id = session["id"].as_str().unwrap().to_owned();

    // Pending: the workload gets nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut client = agent.client().await;
    let err = client
        .fetch_x509svid(sigil_proto::workload::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The requester cannot approve its own session.
    let own = server_cli(&server, &["session", "approve", &id]);
    assert!(!own.status.success());
    assert!(own.stderr.contains("two-person rule"), "{}", own.stderr);

    // A different admin uid can; the session becomes active and the workload is served.
    let approved = server_cli_as(
        &server,
        Some(OTHER_ADMIN),
        &["session", "approve", &id, "--output", "json"],
    )
    .json();
    assert_eq!(approved["state"], "active");
    assert_eq!(approved["approver"], format!("uid:{OTHER_ADMIN}"));
    let (_, msg) = x509_stream_with(&agent, |m| svid_ids(m).contains(&ID.to_owned())).await;
    assert_eq!(svid_ids(&msg), [ID]);

    // Approving twice is refused.
    let twice = server_cli_as(&server, Some(OTHER_ADMIN), &["session", "approve", &id]);
    assert!(!twice.status.success());

    // A uid that is not an admin cannot approve (or do anything).
    let outsider = server_cli_as(&server, Some(65533), &["session", "show", &id]);
    assert!(!outsider.status.success());
}

#[tokio::test]
async fn session_pending_until_its_end_expires_unapproved() {
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    let session = open_session(
        &server,
        &agent,
        ID,
        "3s",
        &["--svid-ttl", "2s", "--require-approval"],
    );
    assert_eq!(session["state"], "pending");
    let id = session["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let shown = server_cli(&server, &["session", "show", &id, "--output", "json"]).json();
    assert_eq!(shown["state"], "expired");
    assert!(shown["approver"].is_null());
    let story = server_cli(
        &server,
        &["audit", "show", "--session", &id, "--output", "json"],
    )
    .json_lines();
    let actions: Vec<_> = story
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["session.open", "session.expire"]);
    assert_eq!(story[1]["actor"], "server");
}
