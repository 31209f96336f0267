//! An agent in a PID namespace of its own, under the proc filesystem of the namespace it was
//! started from, refuses to start: the pids the kernel reports for its callers would name
//! other processes there. Needs `unshare` (util-linux) and the right to create a PID namespace
//! (root); skipped with a notice otherwise.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::process::Command;

use sigil_tests::*;

#[test]
fn an_agent_under_the_proc_of_another_pid_namespace_refuses_to_start() {
    let probe = Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!(
                "skipped: `unshare --pid --fork` cannot create a PID namespace here ({other:?}); \
                 run the tests as root with util-linux installed"
            );
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    // Without --mount-proc: the agent is pid 1 of the new namespace, and /proc is still the
    // one of the namespace it came from, where it has another pid.
    // --kill-child: the agent dies with unshare if the test has to kill it.
    let stderr = refused(
        Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child"])
            .arg(binary("sigil-agent"))
            .args(["run", "--trust-domain", "example.org"])
            .args(["--server-address", "127.0.0.1:9"])
            .args(["--join-token", "unused"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket-path")
            .arg(dir.path().join("api.sock")),
    );
    assert!(
        stderr.contains("workload attestation: /proc/self shows process")
            && stderr.contains("where this process is 1")
            && stderr.contains("another PID namespace"),
        "{stderr}"
    );
    assert!(!dir.path().join("api.sock").exists());
}
