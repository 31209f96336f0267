//! Python grpcio (gRPC C-core, which sends the percent-encoded socket path as `:authority`)
//! gets X509-SVIDs, bundles and JWT-SVIDs from the real agent, unmodified.
//!
//! Needs grpcio, grpcio-tools and protobuf for `SIGIL_PYTHON` (default `python3`); `.ci/run`
//! installs them in a venv and sets `SIGIL_REQUIRE_GRPCIO=1`, which turns a missing grpcio into
//! a failure. Elsewhere the test skips with a message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::process::Command;
use std::time::{Duration, SystemTime};

use sigil_tests::*;

fn python() -> Option<String> {
    python_with(
        "grpc, grpc_tools, google.protobuf",
        "SIGIL_REQUIRE_GRPCIO",
        "grpcio grpcio-tools protobuf",
    )
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn python_grpcio_gets_svids_and_bundles_from_the_agent() {
    let Some(python) = python() else { return };
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    create_entry(
        &server,
        entry(
            "spiffe://example.org/python",
            &agent.agent_id(),
            &[&format!("unix:uid:{uid}")],
        ),
    )
    .await
    .unwrap();

    let generated = tempfile::tempdir().unwrap();
    let protos = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/proto");
    let out = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I", protos])
        .arg(format!("--python_out={}", generated.path().display()))
        .arg(format!("--grpc_python_out={}", generated.path().display()))
        .arg("workload.proto")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The agent mints the SVID just after the entry reaches it: retry for a few seconds.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/agent_client.py");
    let target = format!("unix://{}", agent.socket().display());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let summary: serde_json::Value = loop {
        let out = Command::new(&python)
            .arg(script)
            .arg(&target)
            .arg("db")
            .env("PYTHONPATH", generated.path())
            .output()
            .unwrap();
        if out.status.success() {
            break serde_json::from_slice(&out.stdout).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "python client failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(summary["spiffe_id"], "spiffe://example.org/python");
    assert_eq!(summary["jwt_spiffe_id"], "spiffe://example.org/python");
    assert_eq!(
        summary["validated_spiffe_id"],
        "spiffe://example.org/python"
    );
    assert_eq!(
        summary["bundle_keys"],
        serde_json::json!(["spiffe://example.org"])
    );
    assert_eq!(
        summary["jwt_bundle_keys"],
        serde_json::json!(["spiffe://example.org"])
    );
    assert_eq!(summary["missing_header"], "INVALID_ARGUMENT");
    // What Python received is a valid SVID that verifies against the bundle it received.
    let svid = sigil_core::X509Svid::parse(
        &hex(summary["x509_svid"].as_str().unwrap()),
        &hex(summary["x509_svid_key"].as_str().unwrap()),
    )
    .unwrap();
    let bundle =
        sigil_core::X509Bundle::from_der(trust_domain(), &hex(summary["bundle"].as_str().unwrap()))
            .unwrap();
    sigil_core::x509_svid::verify_chain(svid.cert_chain(), &bundle, SystemTime::now()).unwrap();
}
