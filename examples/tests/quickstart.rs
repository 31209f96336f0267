//! The quickstart runs to the end on this machine: server, agent and workload, with both SVIDs
//! verified against the bundle.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::process::Command;

#[test]
fn the_quickstart_gets_and_verifies_both_svids() {
    let out = Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("X509-SVID  spiffe://quickstart.example/me"),
        "{stdout}"
    );
    assert!(
        stdout.contains("JWT-SVID   spiffe://quickstart.example/me"),
        "{stdout}"
    );
    assert!(stdout.contains("Done:"), "{stdout}");
}
