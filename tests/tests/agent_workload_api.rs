//! The real `sigil-agent` against the real `sigil-server`: a workload gets its identity through
//! the Workload API, as the spec says, and keeps a valid one through rotations, entry changes,
//! agent restarts and server outages.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use sigil_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use sigil_tests::*;
use tonic::Code;

/// A server and an attested agent, with an entry for uid 0 (the tests' uid) on that agent.
async fn setup(server_config: &str) -> (TestServer, TestAgentProcess) {
    let server = TestServer::start(server_config);
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", nix_uid());
    create_entry(
        &server,
        entry("spiffe://example.org/workload", &agent.agent_id(), &[&me]),
    )
    .await
    .unwrap();
    (server, agent)
}

fn nix_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// Waits (at most 10 s) until the workload gets an X509-SVID response, and returns it.
async fn first_x509(agent: &TestAgentProcess) -> sigil_proto::workload::X509svidResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = agent.client().await;
        match client.fetch_x509svid(X509svidRequest {}).await {
            Ok(stream) => {
                if let Ok(Some(msg)) = stream.into_inner().message().await {
                    return msg;
                }
            }
            Err(status) if status.code() == Code::PermissionDenied && Instant::now() < deadline => {
            }
            Err(status) => panic!("{status:?}\nagent log:\n{}", agent.log_text()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_workload_gets_its_x509_svid_and_openssl_accepts_what_the_cli_writes() {
    let (server, agent) = setup("").await;
    let msg = first_x509(&agent).await;
    assert_eq!(msg.svids.len(), 1);
    let svid = &msg.svids[0];
    assert_eq!(svid.spiffe_id, "spiffe://example.org/workload");
    // The key is unencrypted PKCS#8 and matches the leaf; the chain verifies against the bundle.
    let parsed = sigil_core::X509Svid::parse(&svid.x509_svid, &svid.x509_svid_key).unwrap();
    let bundle = sigil_core::X509Bundle::from_der(trust_domain(), &svid.bundle).unwrap();
    sigil_core::x509_svid::verify_chain(parsed.cert_chain(), &bundle, SystemTime::now()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary("sigil-agent"))
        .args(["api", "fetch", "x509", "--socket-path"])
        .arg(agent.socket())
        .arg("--write")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("spiffe://example.org/workload"), "{text}");
    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(dir.path().join("bundle.0.pem"))
        .arg(dir.path().join("svid.0.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("svid.0.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Bundles: the own trust domain under its SPIFFE ID, DER; JWT keys only, each with a kid.
    let mut client = agent.client().await;
    let x509 = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let der = &x509.bundles["spiffe://example.org"];
    assert_eq!(
        sigil_core::X509Bundle::from_der(trust_domain(), der).unwrap(),
        server.bundle().await
    );
    let jwt = client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let jwks: serde_json::Value =
        serde_json::from_slice(&jwt.bundles["spiffe://example.org"]).unwrap();
    for key in jwks["keys"].as_array().unwrap() {
        assert!(key["kid"].is_string(), "{key}");
        assert!(
            key.get("use").is_none() && key.get("x5c").is_none(),
            "{key}"
        );
    }
}

#[tokio::test]
async fn jwt_svids_are_fetched_and_validated() {
    let (_server, agent) = setup("").await;
    first_x509(&agent).await;
    let mut client = agent.client().await;
    let resp = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into(), "cache".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.svids.len(), 1);
    let token = resp.svids[0].svid.clone();
    let validated = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(validated.spiffe_id, "spiffe://example.org/workload");
    let aud = &validated.claims.unwrap().fields["aud"];
    let Some(prost_types::value::Kind::ListValue(list)) = &aud.kind else {
        panic!("aud is a list: {aud:?}")
    };
    assert_eq!(list.values.len(), 2);
    // Another audience, a tampered token, and the empty-field rules.
    let err = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "other".into(),
            svid: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut tampered = token.clone();
    tampered.push('x');
    let err = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: tampered,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "WA-13: empty audience");
    let err = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: "spiffe://example.org/other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "WA-13: not entitled to that ID"
    );
}

#[tokio::test]
async fn an_updated_entry_never_serves_the_jwt_svid_of_its_previous_version() {
    let (server, agent) = setup("").await;
    first_x509(&agent).await;
    assert_eq!(jwt_subject(&agent).await, "spiffe://example.org/workload");

    // The entry now grants another ID; once the workload holds it, a JWT-SVID names it too,
    // although the first token (5 minutes) has most of its life left.
    let entries = server
        .admin()
        .await
        .list_entries(sigil_proto::admin::ListEntriesRequest {
            spiffe_id: "spiffe://example.org/workload".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let updated = server_cli(
        &server,
        &[
            "entry",
            "update",
            "--id",
            &entries[0].id,
            "--spiffe-id",
            "spiffe://example.org/renamed",
        ],
    );
    assert!(updated.status.success(), "{}", updated.stderr);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ids = svid_ids(&first_x509(&agent).await);
        if ids == ["spiffe://example.org/renamed"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the update never arrived: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(jwt_subject(&agent).await, "spiffe://example.org/renamed");
}

/// The subject of a JWT-SVID for audience `db` fetched from `agent`, as the agent validates it.
async fn jwt_subject(agent: &TestAgentProcess) -> String {
    let mut client = agent.client().await;
    let token = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();
    client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: token,
        })
        .await
        .unwrap()
        .into_inner()
        .spiffe_id
}

#[tokio::test]
async fn without_the_security_header_every_call_is_invalid_argument() {
    let (_server, agent) = setup("").await;
    let mut raw = sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        unix_channel(agent.socket()).await,
    );
    let err = raw.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");
    let err = raw
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = raw
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn another_uid_gets_permission_denied() {
    let (_server, agent) = setup("").await;
    first_x509(&agent).await;
    if nix_uid() != 0 {
        eprintln!("skipping: running as another uid needs root");
        return;
    }
    // The agent binary is the workload here, run as uid 65534 (nobody).
    let bin_dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.path().join("sigil-agent");
    std::fs::copy(binary("sigil-agent"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    use std::os::unix::process::CommandExt;
    let out = Command::new(&bin)
        .args(["api", "fetch", "x509", "--socket-path"])
        .arg(agent.socket())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("permission denied") && stderr.contains("no identity issued"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_deleted_entry_updates_the_open_stream_and_the_last_one_ends_it() {
    let (server, agent) = setup("").await;
    first_x509(&agent).await;
    let second = create_entry(
        &server,
        entry(
            "spiffe://example.org/second",
            &agent.agent_id(),
            &[&format!("unix:uid:{}", nix_uid())],
        ),
    )
    .await
    .unwrap();
    let mut client = agent.client().await;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ids = Vec::new();
    while ids.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the new entry did not reach the stream in 5 s: {ids:?}"
        );
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        ids = msg.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    }
    let mut admin = server.admin().await;
    let start = Instant::now();
    admin
        .delete_entry(sigil_proto::admin::DeleteEntryRequest { id: second.id })
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg.svids.len(), 1, "the deleted identity is withdrawn");
    assert_eq!(msg.svids[0].spiffe_id, "spiffe://example.org/workload");
    eprintln!(
        "entry deletion reached the workload in {:?}",
        start.elapsed()
    );

    // Withdraw the last one: the stream ends with PermissionDenied (WA-8).
    let entries = admin
        .list_entries(sigil_proto::admin::ListEntriesRequest {
            spiffe_id: "spiffe://example.org/workload".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    admin
        .delete_entry(sigil_proto::admin::DeleteEntryRequest {
            id: entries[0].id.clone(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap();
    assert_eq!(end.unwrap_err().code(), Code::PermissionDenied);
}

#[tokio::test]
async fn the_agent_restarts_without_a_token_and_a_refused_token_stops_it() {
    let (server, mut agent) = setup("").await;
    first_x509(&agent).await;
    agent.restart();
    let msg = first_x509(&agent).await;
    assert_eq!(msg.svids[0].spiffe_id, "spiffe://example.org/workload");

    // A used token: the agent says so and exits non-zero instead of looping.
    let token = server.join_token(Duration::from_secs(600)).await;
    TestAgent::attest_with(&server, &token).await.unwrap();
    let (status, stderr) = TestAgentProcess::expect_refusal(&server, &token).await;
    assert!(!status.success());
    assert!(stderr.contains("unknown or already used"), "{stderr}");
}

#[tokio::test]
async fn the_workload_holds_a_valid_svid_through_a_minute_of_rotations() {
    let (_server, agent) = setup("ca_ttl = \"1m\"\ndefault_x509_svid_ttl = \"10s\"\ndefault_jwt_svid_ttl = \"10s\"\nagent_svid_ttl = \"10s\"").await;
    let first = first_x509(&agent).await;
    let mut client = agent.client().await;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut current = first.svids[0].x509_svid.clone();
    let mut serials = std::collections::HashSet::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(62) {
        match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
            Ok(Ok(Some(msg))) => current = msg.svids[0].x509_svid.clone(),
            Ok(other) => panic!(
                "the stream ended: {other:?}\nagent log:\n{}",
                agent.log_text()
            ),
            Err(_) => {} // no update in this second
        }
        let (_, cert) = x509_parser::parse_x509_certificate(&current).unwrap();
        serials.insert(cert.raw_serial_as_string());
        assert!(
            not_after(&current) > SystemTime::now(),
            "the workload holds an expired SVID after {:?}\nagent log:\n{}",
            start.elapsed(),
            agent.log_text()
        );
    }
    assert!(
        serials.len() >= 6,
        "10 s SVIDs renewed at half-life over a minute: {} serials",
        serials.len()
    );
}

#[tokio::test]
async fn the_workload_keeps_a_valid_svid_while_the_server_restarts() {
    let (mut server, agent) =
        setup("ca_ttl = \"2m\"\ndefault_x509_svid_ttl = \"20s\"\ndefault_jwt_svid_ttl = \"20s\"")
            .await;
    let first = first_x509(&agent).await;
    let mut client = agent.client().await;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut current = first.svids[0].x509_svid.clone();
    server.kill9();
    let down = Instant::now();
    let check = |current: &[u8], what: &str| {
        assert!(
            not_after(current) > SystemTime::now(),
            "expired SVID {what}"
        );
    };
    // Down for 5 s: the agent keeps serving what it holds.
    while down.elapsed() < Duration::from_secs(5) {
        if let Ok(Ok(Some(msg))) =
            tokio::time::timeout(Duration::from_millis(500), stream.message()).await
        {
            current = msg.svids[0].x509_svid.clone();
        }
        check(&current, "while the server is down");
    }
    server.restart();
    // Back up: the agent catches up and keeps renewing (20 s SVIDs over 25 s).
    let up = Instant::now();
    while up.elapsed() < Duration::from_secs(25) {
        if let Ok(Ok(Some(msg))) =
            tokio::time::timeout(Duration::from_millis(500), stream.message()).await
        {
            current = msg.svids[0].x509_svid.clone();
        }
        check(&current, "after the server came back");
    }
    // A new identity created after the restart reaches the open stream.
    create_entry(
        &server,
        entry(
            "spiffe://example.org/after",
            &agent.agent_id(),
            &[&format!("unix:uid:{}", nix_uid())],
        ),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if msg
            .svids
            .iter()
            .any(|s| s.spiffe_id == "spiffe://example.org/after")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not catch up\n{}",
            agent.log_text()
        );
    }
}

#[tokio::test]
async fn the_spiffe_crate_fetches_from_the_agent_unmodified() {
    let (_server, agent) = setup("").await;
    first_x509(&agent).await;
    let address = format!("unix:{}", agent.socket().display());
    let client = spiffe::WorkloadApiClient::connect_to(&address)
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/workload"
    );
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(
        bundles
            .get(&spiffe::TrustDomain::new("example.org").unwrap())
            .is_some()
    );
    let jwt = client.fetch_jwt_svid(&["db"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/workload");
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(
        jwt_bundles
            .get(&spiffe::TrustDomain::new("example.org").unwrap())
            .is_some()
    );
}

#[tokio::test]
async fn sigterm_closes_the_socket_and_exits_within_five_seconds_with_streams_open() {
    let (_server, mut agent) = setup("").await;
    first_x509(&agent).await;
    let mut client = agent.client().await;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let (status, took) = agent.signal("TERM", Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", agent.log_text());
    assert!(took <= Duration::from_secs(6), "took {took:?}");
    assert!(!agent.socket().exists(), "the socket is removed");
}

// === an agent down while the next CA is prepared ===
//
// With `ca_ttl = 2m` the first authority (born at the server's start, T) has its successor
// prepared at T + 60 s and activated at T + 100 s; SVIDs live at most 20 s and are renewed every
// 10 s. The agent is down from T + 56 s to T + 63 s: its stored SVID (at least 10 s left when it
// stopped) is still valid when it comes back with a bundle that lacks the prepared CA. Its
// workloads' chains must verify after the activation (`openssl verify`, against the bundle the
// workload was given), and it must keep syncing.

const ROTATED: &str = "spiffe://example.org/workload";

async fn sleep_until_after(start: Instant, at: Duration) {
    tokio::time::sleep_until((start + at).into()).await;
}

/// The issuer of the workload's leaf, and whether `openssl verify` accepts the leaf against the
/// bundle in the same response.
fn issuer_and_verify(
    msg: &sigil_proto::workload::X509svidResponse,
) -> (String, Result<(), String>) {
    let svid = msg.svids.iter().find(|s| s.spiffe_id == ROTATED).unwrap();
    let chain = certs(&svid.x509_svid);
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let issuer = leaf.issuer().to_string();
    let bundle = sigil_core::X509Bundle::from_der(trust_domain(), &svid.bundle).unwrap();
    (issuer, openssl_verify(&bundle, &chain[0]))
}

/// The workload's current X509-SVID response (the agent may still be syncing after a restart:
/// `PermissionDenied` is retried).
async fn rotation_workload_svid(
    agent: &TestAgentProcess,
) -> sigil_proto::workload::X509svidResponse {
    x509_stream_with(agent, |m| svid_ids(m).contains(&ROTATED.to_owned()))
        .await
        .1
}

#[tokio::test]
async fn an_agent_down_while_the_next_ca_is_prepared_serves_chains_that_verify_after_activation() {
    let start = Instant::now();
    let server = TestServer::start(
        "ca_ttl = \"2m\"\ndefault_x509_svid_ttl = \"20s\"\ndefault_jwt_svid_ttl = \"20s\"\nagent_svid_ttl = \"20s\"",
    );
    let mut agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    create_entry(&server, entry(ROTATED, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let (_, first) = x509_stream_with(&agent, |m| svid_ids(m).contains(&ROTATED.to_owned())).await;
    let (first_issuer, verified) = issuer_and_verify(&first);
    verified.unwrap();
    assert_eq!(server.bundle().await.authorities().len(), 1);

    sleep_until_after(start, Duration::from_secs(56)).await;
    assert_eq!(
        server.bundle().await.authorities().len(),
        1,
        "the next CA was prepared before the agent went down"
    );
    agent.kill();
    sleep_until_after(start, Duration::from_secs(63)).await;
    assert_eq!(
        server.bundle().await.authorities().len(),
        2,
        "the next CA was prepared while the agent was down"
    );
    agent.restart();

    // Still before activation: the workload is served by the old CA, and verifies; the
    // restarted agent got the bundle with the prepared CA from its first sync (not only at the
    // next bundle change, which would leave it unable to verify a server signed by the new CA).
    let (_, msg) = x509_stream_with(&agent, |m| {
        m.svids
            .iter()
            .any(|s| s.spiffe_id == ROTATED && certs(&s.bundle).len() == 2)
    })
    .await;
    let (issuer, verified) = issuer_and_verify(&msg);
    assert_eq!(issuer, first_issuer);
    verified.unwrap_or_else(|e| panic!("before activation: {e}"));

    // After activation (T + 100 s) and a renewal or two (every 10 s): the new CA signs, the workload's bundle
    // holds it, and the chain verifies.
    sleep_until_after(start, Duration::from_secs(118)).await;
    let msg = rotation_workload_svid(&agent).await;
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
    assert!(svid_ids(&msg).contains(&ROTATED.to_owned()));
}
