//! Credentials issued under a privileged session name it, with the real binaries: the X509-SVID
//! carries the session extension and the JWT-SVID the `sigil_*` claims, both parsed back by
//! `sigil-core`; credentials of ordinary entries carry neither; `openssl verify -x509_strict`, the
//! `spiffe` crate (rust-spiffe) and py-spiffe accept the session SVID; a ticket over 128 bytes is
//! refused.
//!
//! py-spiffe runs under `SIGIL_PYTHON` (default `python3`); `.ci/run` installs it in its venv and
//! sets `SIGIL_REQUIRE_GRPCIO=1`, which turns a missing py-spiffe into a failure. Elsewhere that
//! part skips with a message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use base64::Engine as _;
use sigil_core::X509Bundle;
use sigil_core::session::{SESSION_EXTENSION_OID, SessionClaims};
use sigil_proto::workload::JwtsvidRequest;
use sigil_tests::*;

const ID: &str = "spiffe://example.org/admin/claims";
const STANDING: &str = "spiffe://example.org/standing";

async fn jwt_claims(
    agent: &TestAgentProcess,
    spiffe_id: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let mut client = agent.client().await;
    let token = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: spiffe_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn session_credentials_name_their_session_and_others_do_not() {
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    create_entry(&server, entry(STANDING, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let session = open_session(&server, &agent, ID, "10m", &[]);
    let id = session["id"].as_str().unwrap().to_owned();
    let ends_at = sigil_core::time::from_unix_seconds(
        sigil_core::time::parse_rfc3339(session["expires_at"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let (_, msg) = x509_stream_with(&agent, |m| {
        svid_ids(m).contains(&ID.to_owned()) && svid_ids(m).contains(&STANDING.to_owned())
    })
    .await;

    // X.509: the session SVID names its session, ticket and end, in a non-critical extension.
    let svid_of = |id: &str| msg.svids.iter().find(|s| s.spiffe_id == id).unwrap();
    let leaf = certs(&svid_of(ID).x509_svid).remove(0);
    let claims = SessionClaims::from_certificate(&leaf).unwrap().unwrap();
    assert_eq!(claims.session_id(), id);
    assert_eq!(claims.ticket(), "CHG-123");
    assert_eq!(claims.ends_at(), ends_at);
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let oid = x509_parser::oid_registry::Oid::from(&SESSION_EXTENSION_OID).unwrap();
    let extension = parsed.extensions().iter().find(|e| e.oid == oid).unwrap();
    assert!(!extension.critical);
    let standing = certs(&svid_of(STANDING).x509_svid).remove(0);
    assert_eq!(SessionClaims::from_certificate(&standing).unwrap(), None);

    // Relying parties that do not know the extension accept the SVID.
    let bundle = X509Bundle::from_der(trust_domain(), &svid_of(ID).bundle).unwrap();
    openssl_verify(&bundle, &leaf).unwrap_or_else(|e| panic!("openssl: {e}"));
    let address = format!("unix:{}", agent.socket().display());
    let client = spiffe::WorkloadApiClient::connect_to(&address)
        .await
        .unwrap();
    let context = client.fetch_x509_context().await.unwrap();
    assert!(
        context
            .svids()
            .iter()
            .any(|s| s.spiffe_id().to_string() == ID)
    );
    let spiffe_id = spiffe::SpiffeId::new(ID).unwrap();
    let jwt = client
        .fetch_jwt_svid(["db"], Some(&spiffe_id))
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), ID);

    // py-spiffe too.
    py_spiffe_fetches(&address);

    // JWT: the session JWT-SVID carries the claims; the standing one does not.
    let session_jwt = jwt_claims(&agent, ID).await;
    assert_eq!(
        SessionClaims::from_jwt_claims(&session_jwt).unwrap(),
        Some(claims)
    );
    let standing_jwt = jwt_claims(&agent, STANDING).await;
    assert_eq!(SessionClaims::from_jwt_claims(&standing_jwt).unwrap(), None);
}

/// py-spiffe's client fetches every X509-SVID (the session one among them) and the session's
/// JWT-SVID from the agent at `address`.
fn py_spiffe_fetches(address: &str) {
    let Some(python) = sigil_tests::python_with("spiffe", "SIGIL_REQUIRE_GRPCIO", "spiffe") else {
        return;
    };
    let script = format!(
        r#"
from spiffe import WorkloadApiClient, SpiffeId
client = WorkloadApiClient("{address}")
ids = sorted(str(s.spiffe_id) for s in client.fetch_x509_context().x509_svids)
print(",".join(ids))
jwt = client.fetch_jwt_svid({{"db"}}, SpiffeId("{ID}"))
print(jwt.spiffe_id)
"#
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "py-spiffe failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, [format!("{ID},{STANDING}").as_str(), ID], "{stdout}");
}

#[tokio::test]
async fn a_ticket_over_128_bytes_is_refused() {
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    let ticket = "T".repeat(129);
    let run = server_cli(
        &server,
        &[
            "session",
            "open",
            "--spiffe-id",
            ID,
            "--parent-id",
            &agent.agent_id(),
            "--selector",
            "unix:uid:0",
            "--ticket",
            &ticket,
            "--reason",
            "test",
            "--ttl",
            "10m",
        ],
    );
    assert!(!run.status.success());
    assert!(run.stderr.contains("128 bytes"), "{}", run.stderr);
}
