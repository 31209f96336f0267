//! The mTLS example binaries start and explain themselves (the end-to-end run against a real
//! server and agent, with a revocation, is `tests/tests/session_mtls.rs`; this test also makes
//! `cargo test` build the binaries).
#![allow(clippy::unwrap_used, reason = "test code")]

use std::process::Command;

#[test]
fn the_mtls_example_binaries_print_their_usage() {
    for bin in [
        env!("CARGO_BIN_EXE_mtls-server"),
        env!("CARGO_BIN_EXE_mtls-client"),
    ] {
        let out = Command::new(bin).arg("--help").output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("--allow-id"));
    }
}
