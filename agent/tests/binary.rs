//! The `sigil-agent` binary starts and explains itself. (Being an integration test of this
//! package also makes `cargo test --workspace` build the binary the end-to-end tests run.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;
use std::process::Command;

/// `sigil-agent run` for `example.org`, with its data directory and socket in `dir`.
fn run_in(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sigil-agent"));
    command
        .args(["run", "--trust-domain", "example.org", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--socket-path")
        .arg(dir.join("api.sock"));
    command
}

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
    let out = run_in(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("a join token is needed"), "{stderr}");
}

/// A fatal error, printed on stderr as `sigil-agent: error: cause: cause`, names each cause
/// once, even when an error's message already quotes the error that caused it.
#[test]
fn a_fatal_error_names_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("missing-bundle.pem");
    let out = run_in(dir.path())
        .args(["--server-address", "127.0.0.1:1", "--join-token", "unused"])
        .arg("--trust-bundle")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let line = stderr
        .lines()
        .find(|line| line.starts_with("sigil-agent: "))
        .unwrap_or_else(|| panic!("no fatal error line in: {stderr}"));
    assert_eq!(
        line,
        format!(
            "sigil-agent: cannot read {}: No such file or directory (os error 2)",
            bundle.display()
        )
    );
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
