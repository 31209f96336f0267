//! The `sigil-agent` binary starts and explains itself. (Being an integration test of this
//! package also makes `cargo test --workspace` build the binary the end-to-end tests run.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::process::Command;

#[test]
fn help_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_sigil-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for command in ["run", "api", "healthcheck"] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "{command} missing from:\n{help}"
        );
    }
}

#[test]
fn a_first_start_without_a_token_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sigil-agent"))
        .args(["run", "--trust-domain", "example.org", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--socket-path")
        .arg(dir.path().join("api.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("a join token is needed"), "{stderr}");
}

#[test]
fn a_malformed_spiffe_endpoint_socket_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_sigil-agent"))
        .args(["api", "fetch", "x509"])
        .env("SPIFFE_ENDPOINT_SOCKET", "unix://host/path")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("SPIFFE_ENDPOINT_SOCKET") && stderr.contains("authority"),
        "{stderr}"
    );
}
