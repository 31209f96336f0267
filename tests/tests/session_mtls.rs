//! The mTLS example pair against a real server and agent: the client, holding a privileged
//! session's SVID, is served; after `session revoke`, a new connection presenting that revoked
//! SVID is refused by the example server within seconds (its serial is on the CRL the server
//! got from the Workload API), long before the SVID's NotAfter.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil_core::tls::{SharedBundles, SpiffeServerVerifier};
use sigil_core::x509_svid::Authorizer;
use sigil_tests::*;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

const DB: &str = "spiffe://example.org/db";
const ADMIN: &str = "spiffe://example.org/admin/db-migrate";

/// Connects to `addr` with `chain` and `key` as the client certificate, sends `hello` and
/// returns the reply; an error when the server refuses us.
async fn call_with(
    addr: &str,
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
    bundle: sigil_core::X509Bundle,
) -> Result<String, String> {
    let verifier = SpiffeServerVerifier::new(
        SharedBundles::from_bundle(bundle),
        Authorizer::exact(sigil_core::SpiffeId::new(DB).unwrap()),
    );
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(verifier))
    .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("db").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"hello\n").await.map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    let mut reader = tokio::io::BufReader::new(tls);
    let mut line = String::new();
    match reader.read_line(&mut line).await {
        Ok(0) => Err("connection closed".into()),
        Ok(_) => Ok(line),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn session_mtls_example_refuses_the_revoked_svid_within_seconds() {
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    create_entry(&server, entry(DB, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let session = open_session(&server, &agent, ADMIN, "30m", &[]);
    let id = session["id"].as_str().unwrap().to_owned();
    // Wait until the agent serves both identities.
    let (_stream, first) = x509_stream_with(&agent, |m| svid_ids(m).len() == 2).await;

    let (_mtls_server, addr) = mtls_server(&agent.socket(), &["--svid", DB, "--allow-id", ADMIN]);

    // The example client, with the session's SVID, is served.
    let client = Command::new(binary("mtls-client"))
        .arg("--socket-path")
        .arg(agent.socket())
        .args(["--connect", &addr, "--svid", ADMIN, "--allow-id", DB])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&client.stdout);
    assert!(
        client.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&client.stderr)
    );
    assert!(stdout.contains(&format!("hello {ADMIN}")), "{stdout}");
    // A client with another identity is not allowed by the server.
    let other = Command::new(binary("mtls-client"))
        .arg("--socket-path")
        .arg(agent.socket())
        .args(["--connect", &addr, "--svid", DB, "--allow-id", DB])
        .output()
        .unwrap();
    assert!(!other.status.success());

    // Keep a copy of the session SVID, as a leaked credential would be.
    let svid = first.svids.iter().find(|s| s.spiffe_id == ADMIN).unwrap();
    let chain = certs(&svid.x509_svid);
    let key = svid.x509_svid_key.clone();
    let bundle = sigil_core::X509Bundle::from_der(trust_domain(), &svid.bundle).unwrap();
    let leaked_not_after = not_after(&svid.x509_svid);
    call_with(&addr, chain.clone(), key.clone(), bundle.clone())
        .await
        .expect("the leaked SVID works before the revocation");

    let revoked = server_cli(
        &server,
        &[
            "session", "revoke", &id, "--reason", "leaked", "--output", "json",
        ],
    )
    .json();
    assert_eq!(revoked["state"], "revoked");
    let started = Instant::now();
    loop {
        match call_with(&addr, chain.clone(), key.clone(), bundle.clone()).await {
            Err(_) => break,
            Ok(reply) => assert!(
                started.elapsed() < Duration::from_secs(10),
                "the revoked SVID is still accepted after 10 s: {reply}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        leaked_not_after > SystemTime::now() + Duration::from_secs(60),
        "refused long before the SVID's NotAfter"
    );
    // The example client no longer gets the session identity at all.
    let after = Command::new(binary("mtls-client"))
        .arg("--socket-path")
        .arg(agent.socket())
        .args([
            "--connect",
            &addr,
            "--svid",
            ADMIN,
            "--allow-id",
            DB,
            "--timeout",
            "2s",
        ])
        .output()
        .unwrap();
    assert!(!after.status.success());
    assert!(
        String::from_utf8_lossy(&after.stderr).contains("no identity"),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
}
