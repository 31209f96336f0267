//! The audit ingest API (`sigil.audit.v1`) with the real server, agent and CLI: a listed audit
//! source's events land in the chain once even when sent twice (and after a restart), name the
//! session of the peer certificate they carry, and read in the order they happened in `audit
//! show --session` even when they arrived after later records; callers not listed, agents and
//! anonymous callers are refused, as are non-`broker.*` actions and oversized events, and a
//! refused request appends nothing; `audit verify` passes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::time::{SystemTime, UNIX_EPOCH};

use sigil_proto::audit::audit_ingest_client::AuditIngestClient;
use sigil_proto::audit::{AppendRequest, AppendResponse, Event};
use sigil_tests::*;
use tonic::Code;
use tonic::transport::Channel;

const BROKER: &str = "spiffe://example.org/broker/db";
const SESSION_ID: &str = "spiffe://example.org/admin/ingest";
const SPOOL: &str = "0123456789abcdef0123456789abcdef";

fn event(sequence: u64, observed_at: (i64, u32), action: &str, details: &str) -> Event {
    Event {
        sequence,
        observed_at_seconds: observed_at.0,
        observed_at_nanos: observed_at.1,
        action: action.to_owned(),
        subject: "db".to_owned(),
        details_json: details.to_owned(),
        peer_certificate: Vec::new(),
    }
}

async fn append(
    client: &mut AuditIngestClient<Channel>,
    events: &[Event],
) -> Result<AppendResponse, tonic::Status> {
    client
        .append(AppendRequest {
            spool_id: SPOOL.to_owned(),
            events: events.to_vec(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn ingest_client(
    server: &TestServer,
    identity: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> AuditIngestClient<Channel> {
    let bundle = server.bundle().await;
    AuditIngestClient::new(
        server_channel(server.node_addr, &bundle, identity)
            .await
            .unwrap(),
    )
}

fn now() -> (i64, u32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (i64::try_from(d.as_secs()).unwrap(), d.subsec_nanos())
}

fn later(t: (i64, u32), millis: u32) -> (i64, u32) {
    let nanos = u64::from(t.1) + u64::from(millis) * 1_000_000;
    (
        t.0 + i64::try_from(nanos / 1_000_000_000).unwrap(),
        u32::try_from(nanos % 1_000_000_000).unwrap(),
    )
}

/// How many records the chain holds (the head's sequence).
fn chain_length(server: &TestServer) -> u64 {
    let verified = server_cli(server, &["audit", "verify", "--output", "json"]).json();
    assert_eq!(verified["ok"], true, "{verified}");
    verified["head_sequence"].as_u64().unwrap()
}

#[tokio::test]
async fn a_sources_events_land_once_and_tell_the_session_story_in_order() {
    let server_config = format!("audit_sources = [\"{BROKER}\"]\n");
    let mut server = TestServer::start(&server_config);
    let agent = TestAgentProcess::start(&server).await;
    let session = open_session(&server, &agent, SESSION_ID, "10m", &[]);
    let id = session["id"].as_str().unwrap().to_owned();
    let (_, msg) = x509_stream_with(&agent, |m| svid_ids(m).contains(&SESSION_ID.to_owned())).await;
    let svid = msg
        .svids
        .iter()
        .find(|s| s.spiffe_id == SESSION_ID)
        .unwrap();
    let peer = certs(&svid.x509_svid).remove(0);
    let peer_serial = leaf_serial(&svid.x509_svid);

    // The broker saw a connection and a request before the revocation, and reports them only
    // after it (it could not reach the server meanwhile).
    let opened = now();
    let requested = later(opened, 1);
    while now() <= requested {
        std::thread::yield_now();
    }
    server_cli(
        &server,
        &["session", "revoke", &id, "--reason", "done with it"],
    );
    let mut open = event(
        1,
        opened,
        "broker.connection.open",
        r#"{"source":"10.0.0.7:5123"}"#,
    );
    open.peer_certificate = peer.to_vec();
    let mut request = event(
        2,
        requested,
        "broker.request",
        r#"{"method":"GET","path":"/tables","status":200,"decision":"allow"}"#,
    );
    request.peer_certificate = peer.to_vec();
    let mut close = event(
        3,
        now(),
        "broker.connection.close",
        r#"{"reason":"revoked"}"#,
    );
    close.peer_certificate = peer.to_vec();
    let batch = [open, request, close];

    let mut broker = ingest_client(&server, Some(minted_identity(&server, BROKER).await)).await;
    let first = append(&mut broker, &batch).await.unwrap();
    assert_eq!((first.appended, first.acknowledged_sequence), (3, 3));
    // The answer was lost, say: the same events again append nothing.
    let again = append(&mut broker, &batch).await.unwrap();
    assert_eq!((again.appended, again.acknowledged_sequence), (0, 3));
    // A resend overlapping a new event appends only the new one.
    let deny = event(4, now(), "broker.deny", r#"{"policy":"policy0"}"#);
    let overlap = [batch[1].clone(), batch[2].clone(), deny.clone()];
    let third = append(&mut broker, &overlap).await.unwrap();
    assert_eq!((third.appended, third.acknowledged_sequence), (1, 4));
    // Events that skip ahead (a later batch before an earlier one was acknowledged) are refused
    // with where to resume.
    let ahead = append(&mut broker, &[event(6, now(), "broker.request", "{}")])
        .await
        .unwrap_err();
    assert_eq!(ahead.code(), Code::FailedPrecondition, "{ahead:?}");
    assert_eq!(
        ahead
            .metadata()
            .get("sigil-next-sequence")
            .unwrap()
            .to_str()
            .unwrap(),
        "5"
    );

    // The session's story: broker records once each, named by the peer's session, ordered by
    // when they happened (the open and the request before the revocation, the cut after it).
    let story = server_cli(
        &server,
        &["audit", "show", "--session", &id, "--output", "json"],
    )
    .json_lines();
    let actions: Vec<&str> = story
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    let position = |action: &str| actions.iter().position(|a| *a == action).unwrap();
    for action in [
        "broker.connection.open",
        "broker.request",
        "broker.connection.close",
    ] {
        assert_eq!(
            actions.iter().filter(|a| **a == action).count(),
            1,
            "{action} once: {actions:?}"
        );
    }
    assert!(
        position("session.open") < position("broker.connection.open"),
        "{actions:?}"
    );
    assert!(
        position("broker.connection.open") < position("broker.request"),
        "{actions:?}"
    );
    assert!(
        position("broker.request") < position("session.revoke"),
        "{actions:?}"
    );
    assert!(
        position("session.revoke") < position("broker.connection.close"),
        "{actions:?}"
    );
    let revoke_seq = story[position("session.revoke")]["sequence"]
        .as_u64()
        .unwrap();
    let open_record = &story[position("broker.connection.open")];
    assert!(
        open_record["sequence"].as_u64().unwrap() > revoke_seq,
        "the open reached the chain after the revocation: {open_record}"
    );
    assert_eq!(open_record["actor"], BROKER);
    assert_eq!(open_record["subject"], "db");
    let details = &open_record["details"];
    assert_eq!(details["session_id"], id.as_str());
    assert_eq!(details["ticket"], "CHG-123");
    assert_eq!(details["peer_spiffe_id"], SESSION_ID);
    assert_eq!(details["peer_serial"], peer_serial.as_str());
    assert_eq!(details["source"], "10.0.0.7:5123");
    assert_eq!(details["source_sequence"], 1);
    assert_eq!(details["source_spool"], SPOOL);
    let observed = sigil_core::time::format_rfc3339_nanos(opened.0, opened.1);
    assert_eq!(open_record["observed_at"], observed.as_str());
    assert_eq!(details["observed_at"], observed.as_str());
    // The deny carried no peer certificate: it is in the chain, not in the session's story.
    assert!(!actions.contains(&"broker.deny"), "{actions:?}");
    let denies = server_cli(
        &server,
        &[
            "audit",
            "show",
            "--actor",
            BROKER,
            "--action",
            "broker.deny",
            "--output",
            "json",
        ],
    )
    .json_lines();
    assert_eq!(denies.len(), 1, "{denies:?}");
    assert_eq!(denies[0]["details"]["policy"], "policy0");

    // The text view of the story is in the same order.
    let text = server_cli(&server, &["audit", "show", "--session", &id]).stdout;
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle} in {text}"))
    };
    assert!(at("broker.request") < at("session.revoke"), "{text}");
    assert!(
        at("session.revoke") < at("broker.connection.close"),
        "{text}"
    );

    // What the server acknowledged survives a restart: sent again, nothing is appended.
    server.restart_with(&server_config);
    let mut broker = ingest_client(&server, Some(minted_identity(&server, BROKER).await)).await;
    let after_restart = append(&mut broker, &[batch[2].clone(), deny])
        .await
        .unwrap();
    assert_eq!(
        (after_restart.appended, after_restart.acknowledged_sequence),
        (0, 4)
    );
    // No broker record is in the chain twice.
    let all = server_cli(
        &server,
        &["audit", "show", "--actor", BROKER, "--output", "json"],
    )
    .json_lines();
    let mut sequences: Vec<u64> = all
        .iter()
        .map(|r| r["details"]["source_sequence"].as_u64().unwrap())
        .collect();
    sequences.sort_unstable();
    assert_eq!(sequences, [1, 2, 3, 4]);
    chain_length(&server);
}

#[tokio::test]
async fn only_listed_sources_and_bounded_broker_events_are_accepted() {
    let server = TestServer::start(&format!("audit_sources = [\"{BROKER}\"]\n"));
    let good = [event(1, now(), "broker.request", r#"{"status":200}"#)];

    // Callers that are not listed: another workload (refused at the TLS handshake already),
    // an agent (which passes the handshake for the node API), and no certificate at all (served
    // only the attestation call).
    let outsider = minted_identity(&server, "spiffe://example.org/broker/other").await;
    let bundle = server.bundle().await;
    if let Ok(channel) = server_channel(server.node_addr, &bundle, Some(outsider)).await {
        // (When the client reads the TLS 1.3 alert decides how the call fails; it never gets
        // an answer.)
        let status = append(&mut AuditIngestClient::new(channel), &good)
            .await
            .unwrap_err();
        assert!(
            matches!(
                status.code(),
                Code::Unknown | Code::Cancelled | Code::Unavailable
            ),
            "{status:?}"
        );
    }

    let agent = TestAgent::attest(&server).await;
    let mut client = ingest_client(
        &server,
        Some((agent.chain.clone(), agent.key.private_key())),
    )
    .await;
    let status = append(&mut client, &good).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    let mut anonymous = ingest_client(&server, None).await;
    let status = append(&mut anonymous, &good).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let appended = server_cli(
        &server,
        &["audit", "show", "--action", "broker", "--output", "json"],
    )
    .json_lines();
    assert!(appended.is_empty(), "refused callers appended {appended:?}");

    // A source's SVID opens the audit ingest only: none of the node API is served to it.
    let source = minted_identity(&server, BROKER).await;
    let mut as_node = node_client(server.node_addr, &bundle, Some(source))
        .await
        .unwrap();
    let status = as_node
        .get_bundle(sigil_proto::node::GetBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // The listed source: anything but bounded broker.* events is refused, and a refused
    // request appends nothing, its valid events included.
    let mut broker = ingest_client(&server, Some(minted_identity(&server, BROKER).await)).await;
    let length = chain_length(&server);
    let refused = |events: Vec<Event>| {
        let mut broker = broker.clone();
        async move {
            let status = append(&mut broker, &events).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            status.message().to_owned()
        }
    };
    let message = refused(vec![
        good[0].clone(),
        event(2, now(), "session.revoke", "{}"),
    ])
    .await;
    assert!(
        message.contains("event 2") && message.contains("broker.*"),
        "{message}"
    );
    refused(vec![event(1, now(), "entry.create", "{}")]).await;
    let big = format!(r#"{{"body":"{}"}}"#, "x".repeat(17 * 1024));
    refused(vec![event(1, now(), "broker.request", &big)]).await;
    refused(vec![event(
        1,
        now(),
        "broker.request",
        r#"{"session_id":"forged"}"#,
    )])
    .await;
    refused(vec![event(
        1,
        now(),
        "broker.request",
        r#"{"latency":0.5}"#,
    )])
    .await;
    let mut not_svid = event(1, now(), "broker.request", "{}");
    not_svid.peer_certificate = b"garbage".to_vec();
    refused(vec![not_svid]).await;
    refused(vec![
        event(2, now(), "broker.request", "{}"),
        event(2, now(), "broker.request", "{}"),
    ])
    .await;
    refused(
        (1..=1001)
            .map(|n| event(n, now(), "broker.request", "{}"))
            .collect(),
    )
    .await;
    let status = broker
        .append(AppendRequest {
            spool_id: "not-hex".to_owned(),
            events: good.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        chain_length(&server),
        length,
        "a refused request appended a record"
    );

    let done = append(&mut broker, &good).await.unwrap();
    assert_eq!((done.appended, done.acknowledged_sequence), (1, 1));
    assert_eq!(chain_length(&server), length + 1);
}
