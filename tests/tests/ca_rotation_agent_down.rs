//! An agent that is down when the server prepares its next CA, and back before that CA becomes
//! active, with the real binaries: its workloads' chains verify after the activation (with
//! `openssl verify`, against the bundle the workload was given), and it keeps syncing.
//!
//! With `ca_ttl = 3m` the first authority (born at the server's start, T) has its successor
//! prepared at T + 90 s and activated at T + 150 s; SVIDs live at most 30 s. The agent is down
//! from T + 80 s to T + 97 s: its stored SVID (renewed at half life, so at least 15 s left when
//! it stopped) is still valid when it comes back with a bundle that lacks the prepared CA.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::time::{Duration, Instant};

use sigil_core::X509Bundle;
use sigil_proto::workload::X509svidResponse;
use sigil_tests::*;

const WORKLOAD: &str = "spiffe://example.org/workload";

async fn sleep_until(start: Instant, at: Duration) {
    tokio::time::sleep_until((start + at).into()).await;
}

/// The issuer of the workload's leaf, and whether `openssl verify` accepts the leaf against the
/// bundle in the same response.
fn issuer_and_verify(msg: &X509svidResponse) -> (String, Result<(), String>) {
    let svid = msg.svids.iter().find(|s| s.spiffe_id == WORKLOAD).unwrap();
    let chain = certs(&svid.x509_svid);
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let issuer = leaf.issuer().to_string();
    let bundle = X509Bundle::from_der(trust_domain(), &svid.bundle).unwrap();
    (issuer, openssl_verify(&bundle, &chain[0]))
}

/// The workload's current X509-SVID response (the agent may still be syncing after a restart:
/// `PermissionDenied` is retried).
async fn workload_svid(agent: &TestAgentProcess) -> X509svidResponse {
    x509_stream_with(agent, |m| svid_ids(m).contains(&WORKLOAD.to_owned()))
        .await
        .1
}

#[tokio::test]
async fn an_agent_down_while_the_next_ca_is_prepared_serves_chains_that_verify_after_activation() {
    let start = Instant::now();
    let server = TestServer::start(
        "ca_ttl = \"3m\"\ndefault_x509_svid_ttl = \"30s\"\ndefault_jwt_svid_ttl = \"30s\"\nagent_svid_ttl = \"30s\"",
    );
    let mut agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    create_entry(&server, entry(WORKLOAD, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let (_, first) = x509_stream_with(&agent, |m| svid_ids(m).contains(&WORKLOAD.to_owned())).await;
    let (first_issuer, verified) = issuer_and_verify(&first);
    verified.unwrap();
    assert_eq!(server.bundle().await.authorities().len(), 1);

    sleep_until(start, Duration::from_secs(80)).await;
    assert_eq!(
        server.bundle().await.authorities().len(),
        1,
        "the next CA was prepared before the agent went down"
    );
    agent.kill();
    sleep_until(start, Duration::from_secs(97)).await;
    assert_eq!(
        server.bundle().await.authorities().len(),
        2,
        "the next CA was prepared while the agent was down"
    );
    agent.restart();

    // Still before activation: the workload is served by the old CA, and verifies.
    let (issuer, verified) = issuer_and_verify(&workload_svid(&agent).await);
    assert_eq!(issuer, first_issuer);
    verified.unwrap_or_else(|e| panic!("before activation: {e}"));

    // After activation (T + 150 s) and a renewal or two (every 15 s): the new CA signs, the workload's bundle
    // holds it, and the chain verifies.
    sleep_until(start, Duration::from_secs(176)).await;
    let msg = workload_svid(&agent).await;
    let (issuer, verified) = issuer_and_verify(&msg);
    assert_ne!(
        issuer,
        first_issuer,
        "the new CA signs after activation; agent log:\n{}",
        agent.log_text()
    );
    verified.unwrap_or_else(|e| panic!("after activation: {e}\nagent log:\n{}", agent.log_text()));

    // And the agent keeps syncing: a new entry reaches the workload.
    let second = "spiffe://example.org/second";
    create_entry(&server, entry(second, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let (_, msg) = x509_stream_with(&agent, |m| svid_ids(m).contains(&second.to_owned())).await;
    assert!(svid_ids(&msg).contains(&WORKLOAD.to_owned()));
}
