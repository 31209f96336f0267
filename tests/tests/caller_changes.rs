//! A caller that changes after it connects gets nothing it did not have when it connected, with
//! the real agent and a real workload process (`exec_workload`):
//!
//! - a process that connects and then `exec`s another program is refused at attestation (the
//!   agent recorded the executable when it accepted the connection);
//! - a session SVID stream attests its caller again before every session mint, and ends when
//!   the caller's selectors changed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sigil_tests::*;

const WORKLOAD: &str = "spiffe://example.org/workload";

/// A copy of the helper at `dir/name`, so that each copy is another executable (inode).
fn helper_copy(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(binary("exec_workload"), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

async fn setup() -> (TestServer, TestAgentProcess) {
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    create_entry(&server, entry(WORKLOAD, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    // The agent has the entry once a workload of ours gets it.
    let (_, msg) = x509_stream_with(&agent, |m| svid_ids(m).contains(&WORKLOAD.to_owned())).await;
    assert_eq!(svid_ids(&msg), [WORKLOAD]);
    (server, agent)
}

fn connect_then_exec(agent: &TestAgentProcess, first: &Path, then: &Path) -> String {
    let out = retry_busy(|| {
        Command::new(first)
            .arg("connect-then-exec")
            .arg(agent.socket())
            .arg(then)
            .stdin(Stdio::null())
            .output()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn a_process_that_execs_another_program_after_connecting_gets_nothing() {
    let (_server, agent) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let a = helper_copy(dir.path(), "a");
    let b = helper_copy(dir.path(), "b");
    // The same executable after the exec: served.
    assert_eq!(connect_then_exec(&agent, &b, &b), format!("ok {WORKLOAD}"));
    // Another one: refused, although its uid matches the entry.
    assert_eq!(connect_then_exec(&agent, &a, &b), "err Unavailable");
    assert!(
        agent
            .log_text()
            .contains("runs another executable than when it connected")
            || agent.log_text().contains("changed its executable"),
        "{}",
        agent.log_text()
    );
}

#[tokio::test]
async fn a_session_stream_attests_its_caller_again_before_each_mint() {
    if !is_root() {
        eprintln!("note: skipping: changing a process's groups needs root");
        return;
    }
    let (server, agent) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let helper = helper_copy(dir.path(), "workload");
    let mut child = retry_busy(|| {
        Command::new(&helper)
            .arg("stream")
            .arg(agent.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
    });
    let mut stdin = child.stdin.take().unwrap();
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        lines
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("no line while waiting for {what}"))
    };
    assert_eq!(next("the first message"), format!("msg {WORKLOAD}"));

    // A session for workloads in group 4242: the helper's stream gets it.
    let first = "spiffe://example.org/admin/first";
    open_session(
        &server,
        &agent,
        first,
        "10m",
        &["--selector", "unix:supplementary_gid:4242"],
    );
    assert_eq!(next("the session"), format!("msg {WORKLOAD},{first}"));

    // The helper leaves the group; the next session it would match by uid alone is not minted
    // for it, and the stream ends.
    writeln!(stdin, "drop").unwrap();
    assert_eq!(next("the drop"), "dropped");
    open_session(
        &server,
        &agent,
        "spiffe://example.org/admin/second",
        "10m",
        &[],
    );
    assert_eq!(next("the end of the stream"), "err Unavailable");
    let _ = child.kill();
    let _ = child.wait();
}
