//! A daemon's fatal error, printed on stderr as `PROGRAM: error: cause: cause`, names each cause
//! once, even when an error's message already quotes the error that caused it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::process::Command;

use sigil_tests::*;

#[test]
fn a_fatal_error_names_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("missing-bundle.pem");
    let stderr = refused(
        Command::new(binary("sigil-agent"))
            .args(["run", "--trust-domain", "example.org"])
            .args(["--server-address", "127.0.0.1:1", "--join-token", "unused"])
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket-path")
            .arg(dir.path().join("api.sock")),
    );
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
