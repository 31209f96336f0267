//! A join token is a secret until an agent spends it (issue 15): with the real server binary,
//! the token appears in no log line, no audit record, no agent ID and no file of the data
//! directory; the agent ID names the token's fingerprint, usable as a parent before the token
//! is spent; and a spent token works exactly once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;
use std::time::Duration;

use sigil_tests::*;

/// Every file below `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(path.display().to_string());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_is_never_logged_audited_stored_or_part_of_an_id() {
    let mut server = TestServer::start("");
    let generated = server_cli(
        &server,
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/node/web-1",
            "--output",
            "json",
        ],
    )
    .json();
    let token = generated["token"].as_str().unwrap().to_owned();
    let fingerprint = &sigil_core::hex::sha256(token.as_bytes())[..16];
    let agent_id = format!("spiffe://example.org/sigil/agent/join_token/{fingerprint}");
    assert_eq!(generated["agent_spiffe_id"], agent_id);

    // The agent ID is a parent at once, before the token is spent, and reveals nothing.
    let entry = server_cli(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            &agent_id,
            "--selector",
            "unix:uid:1000",
            "--output",
            "json",
        ],
    );
    assert!(entry.status.success(), "{}", entry.stderr);

    // The agent attests with it and gets exactly that ID; the token then works no more.
    let agent = TestAgent::attest_with(&server, &token).await.unwrap();
    assert_eq!(agent.id.as_str(), agent_id);
    let again = TestAgent::attest_with(&server, &token).await;
    assert!(again.is_err(), "a spent token must be refused");

    // Nowhere: not in the audit log, not in the log, not on disk (store, keys, state file).
    let audit = server_cli(&server, &["audit", "show", "--output", "json"]);
    assert!(audit.status.success(), "{}", audit.stderr);
    assert!(audit.stdout.contains("token.generate") && audit.stdout.contains(fingerprint));
    assert!(
        !audit.stdout.contains(&token),
        "the audit log holds the token"
    );
    // Stopped gracefully so that everything the server would write is on disk.
    let (status, _) = server.signal("TERM", Duration::from_secs(20));
    assert!(status.success());
    assert!(
        !server.log_text().contains(&token),
        "the log holds the token"
    );
    let holding = files_containing(&server.data_dir(), token.as_bytes());
    assert!(holding.is_empty(), "files holding the token: {holding:?}");
}
