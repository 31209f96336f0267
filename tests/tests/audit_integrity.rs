//! Audit integrity with the real binaries: a fresh server signs its genesis checkpoint and
//! verifies clean; `audit checkpoint --output json` is what `audit verify --checkpoint` reads;
//! a restored older data directory is caught by a checkpoint kept outside the server and by an
//! agent that saw a later one; the server then signs nothing and fails its healthcheck until
//! `audit acknowledge`, which records the lost range; a truncated tail is caught by the state
//! file the server keeps beside its audit key. (A rewritten record: `server_audit.rs`.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use sigil_server::sled as engine;
use sigil_server::store_records;
use sigil_tests::*;

/// `audit checkpoint --output json`, saved to `path`; returns the document.
fn save_checkpoint(server: &TestServer, path: &Path) -> Value {
    let run = server_cli(server, &["audit", "checkpoint", "--output", "json"]);
    let json = run.json();
    std::fs::write(path, &run.stdout).unwrap();
    json
}

/// Waits until `check` holds, or panics naming `what`.
fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sequence of the checkpoint of chain `default` the agent keeps as a witness.
fn witnessed_sequence(agent: &TestAgentProcess) -> Option<u64> {
    let bytes = std::fs::read(agent.data_dir().join("audit-checkpoints.json")).ok()?;
    let list: Vec<Value> = serde_json::from_slice(&bytes).ok()?;
    list.iter()
        .find(|cp| cp["chain_id"] == "default")
        .and_then(|cp| cp["sequence"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_server_signs_its_genesis_and_verifies_clean() {
    let server = TestServer::start("");
    // Before any record: the genesis checkpoint, signed before the server served.
    let verified = server_cli(&server, &["audit", "verify", "--output", "json"]).json();
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["chain_id"], "default");
    // In the store, and in the state file beside the audit key.
    assert_eq!(verified["checkpoints_checked"], 2);
    assert_eq!(verified["checkpoint_sequence"], 0);
    assert_eq!(verified["divergence"], Value::Null);

    server.join_token(Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cp.json");
    let cp = save_checkpoint(&server, &file);
    assert_eq!(cp["signed"], true);
    assert_eq!(cp["chain_id"], "default");
    assert_eq!(cp["sequence"], 1);
    assert_eq!(cp["id"], "default:1");
    assert_eq!(cp["key_fingerprint"], verified["key_fingerprint"]);
    // The head did not move: the same checkpoint, not signed again.
    let again = server_cli(&server, &["audit", "checkpoint", "--output", "json"]).json();
    assert_eq!(
        (again["signed"].clone(), again["signature"].clone()),
        (Value::Bool(false), cp["signature"].clone())
    );
    // Text output names what to keep.
    let text = server_cli(&server, &["audit", "checkpoint"]);
    assert!(
        text.status.success() && text.stdout.contains("Key fingerprint"),
        "{text:?}"
    );

    // The saved file verifies, and an altered copy is refused with a clear message.
    let run = server_cli(
        &server,
        &["audit", "verify", "--checkpoint", file.to_str().unwrap()],
    );
    assert!(run.status.success(), "{run:?}");
    assert!(
        run.stdout.contains("Checkpoints checked : 4"),
        "{}",
        run.stdout
    );
    let mut forged = cp.clone();
    forged["hash"] = Value::from("00".repeat(32));
    let forged_file = dir.path().join("forged.json");
    std::fs::write(&forged_file, forged.to_string()).unwrap();
    let run = server_cli(
        &server,
        &[
            "audit",
            "verify",
            "--checkpoint",
            forged_file.to_str().unwrap(),
        ],
    );
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains("invalid signature"), "{}", run.stderr);
    std::fs::write(&forged_file, "{\"sequence\": 1}").unwrap();
    let run = server_cli(
        &server,
        &[
            "audit",
            "verify",
            "--checkpoint",
            forged_file.to_str().unwrap(),
        ],
    );
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(
        run.stderr.contains("is not an audit checkpoint"),
        "{}",
        run.stderr
    );
    // Nothing to acknowledge on a healthy log.
    let run = server_cli(
        &server,
        &[
            "audit",
            "acknowledge",
            "--checkpoint",
            file.to_str().unwrap(),
            "--reason",
            "test",
        ],
    );
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains("has not diverged"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_older_data_directory_is_caught_and_must_be_acknowledged() {
    // Opens the sled files of the stopped server itself.
    let mut server = TestServer::start(sigil_tests::SLED_STORE);
    let agent = TestAgentProcess::start(&server).await;
    server.join_token(Duration::from_secs(60)).await;

    // The backup: the whole data directory of the stopped server (state file included).
    let (status, _) = server.signal("TERM", Duration::from_secs(20));
    assert!(status.success());
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&server.data_dir(), &backup.path().join("data"));
    server.restart();

    // Life goes on: more records, a checkpoint kept outside, and witnessed by the agent.
    for _ in 0..3 {
        server.join_token(Duration::from_secs(60)).await;
    }
    let kept = tempfile::tempdir().unwrap();
    let later_file = kept.path().join("later.json");
    let later = save_checkpoint(&server, &later_file);
    let later_sequence = later["sequence"].as_u64().unwrap();
    wait_for(
        "the agent to witness the later checkpoint",
        Duration::from_secs(30),
        || witnessed_sequence(&agent) == Some(later_sequence),
    );

    // The disk dies; the backup is restored.
    server.kill9();
    std::fs::remove_dir_all(server.data_dir()).unwrap();
    copy_dir(&backup.path().join("data"), &server.data_dir());
    server.restart();

    // The checkpoint kept outside catches it.
    let run = server_cli(
        &server,
        &[
            "audit",
            "verify",
            "--checkpoint",
            later_file.to_str().unwrap(),
        ],
    );
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("covers records up to {later_sequence}")),
        "{}",
        run.stderr
    );

    // So does the agent, once it reconnects: the server stops signing and is unhealthy.
    wait_for(
        "the agent's checkpoint to reveal the divergence",
        Duration::from_secs(30),
        || !server_cli(&server, &["healthcheck"]).status.success(),
    );
    let health = server_cli(&server, &["healthcheck"]);
    assert!(
        health.stderr.contains("diverged") && health.stderr.contains(&agent.agent_id()),
        "{}",
        health.stderr
    );
    let refused = server_cli(&server, &["audit", "checkpoint"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(refused.stderr.contains("diverged"), "{}", refused.stderr);
    // The agent keeps its evidence: the server sends it nothing older.
    assert_eq!(witnessed_sequence(&agent), Some(later_sequence));

    // verify reports the divergence with the checkpoint to acknowledge.
    let run = server_cli(&server, &["audit", "verify", "--output", "json"]);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let verified: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        verified["chain_ok"], true,
        "the restored chain is consistent in itself"
    );
    let divergent = &verified["divergence"]["checkpoint"];
    assert_eq!(divergent["sequence"], later_sequence);
    let divergent_file = kept.path().join("divergent.json");
    std::fs::write(&divergent_file, divergent.to_string()).unwrap();

    // Acknowledging needs a reason; then signing resumes and the loss is on record.
    let run = server_cli(
        &server,
        &[
            "audit",
            "acknowledge",
            "--checkpoint",
            divergent_file.to_str().unwrap(),
        ],
    );
    assert_eq!(
        run.status.code(),
        Some(2),
        "clap requires --reason: {run:?}"
    );
    let ack = server_cli(
        &server,
        &[
            "audit",
            "acknowledge",
            "--checkpoint",
            divergent_file.to_str().unwrap(),
            "--reason",
            "disk replaced, restored from the 02:00 backup",
            "--output",
            "json",
        ],
    )
    .json();
    assert_eq!(ack["action"], "audit.divergence");
    assert_eq!(ack["details"]["lost_to"], later_sequence);
    assert_eq!(ack["details"]["source"], agent.agent_id());
    assert!(
        ack["details"]["lost_from"].as_u64().unwrap()
            <= ack["details"]["head_sequence"].as_u64().unwrap() + 1
    );
    assert!(server_cli(&server, &["healthcheck"]).status.success());
    let shown = server_cli(
        &server,
        &[
            "audit",
            "show",
            "--action",
            "audit.divergence",
            "--output",
            "json",
        ],
    )
    .json_lines();
    assert_eq!(shown.len(), 1);
    assert_eq!(
        shown[0]["details"]["reason"],
        "disk replaced, restored from the 02:00 backup"
    );
    let run = server_cli(&server, &["audit", "verify"]);
    assert!(run.status.success(), "{run:?}");
    // The agent takes the new checkpoint, and presenting the old one again is no divergence.
    let new = server_cli(&server, &["audit", "checkpoint", "--output", "json"]).json();
    let new_sequence = new["sequence"].as_u64().unwrap();
    wait_for(
        "the agent to witness the new checkpoint",
        Duration::from_secs(30),
        || witnessed_sequence(&agent) == Some(new_sequence),
    );
    assert!(server_cli(&server, &["healthcheck"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_tail_is_caught_by_the_state_file_and_a_kept_checkpoint() {
    // Opens the sled files of the stopped server itself.
    let mut server = TestServer::start(sigil_tests::SLED_STORE);
    for _ in 0..4 {
        server.join_token(Duration::from_secs(60)).await;
    }
    let kept = tempfile::tempdir().unwrap();
    let file = kept.path().join("cp.json");
    let cp = save_checkpoint(&server, &file);
    assert_eq!(cp["sequence"], 4);
    server.kill9();

    // Cut the last record, as someone with write access to the store could.
    {
        let db = engine::Config::new()
            .path(server.data_dir().join("store"))
            .flush_every_ms(None)
            .open()
            .unwrap();
        let audit = db.open_tree("audit").unwrap();
        let third = store_records::audit_record(&audit, 3).unwrap();
        store_records::truncate_audit(&audit, 4).unwrap();
        let head = serde_json::json!({
            "chain_id": third["chain_id"],
            "sequence": 3,
            "hash": third["hash"],
            "time": third["time"],
        });
        db.open_tree("audit_head")
            .unwrap()
            .insert("head", serde_json::to_vec(&head).unwrap())
            .unwrap();
        db.open_tree("audit_checkpoints")
            .unwrap()
            .remove(4u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    server.restart();
    // The server's own record of its last checkpoint (beside the audit key) catches it.
    let health = server_cli(&server, &["healthcheck"]);
    assert_eq!(health.status.code(), Some(1), "{health:?}");
    assert!(
        health.stderr.contains("checkpoint file") && health.stderr.contains("ends at record 3"),
        "{}",
        health.stderr
    );
    // So does the checkpoint kept outside.
    let run = server_cli(
        &server,
        &["audit", "verify", "--checkpoint", file.to_str().unwrap()],
    );
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("covers records up to 4, the log ends at 3"),
        "{}",
        run.stderr
    );
}
