//! `session_only_ids` and `session_approver_uids` with the real binaries: IDs under a
//! session-only prefix are refused to entries, mints and join token aliases, every session for
//! them waits for approval by a listed approver, and a server that finds an entry under such a
//! prefix refuses to start and names it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::process::{Command, Stdio};

use sigil_tests::*;

const PREFIX: &str = "spiffe://example.org/admin";
const ID: &str = "spiffe://example.org/admin/break-glass";

/// An admin who may approve sessions.
const APPROVER: u32 = 65534;
/// An admin who may not.
const OTHER_ADMIN: u32 = 65533;

fn refused_with_session_advice(run: &CliRun, what: &str) {
    assert!(!run.status.success(), "{what} was accepted: {}", run.stdout);
    assert!(
        run.stderr.contains("session_only_ids") && run.stderr.contains("session open"),
        "{what}: {}",
        run.stderr
    );
}

#[tokio::test]
async fn session_only_ids_are_refused_everywhere_but_an_approved_session() {
    let server = TestServer::start(&format!(
        "admin_uids = [{APPROVER}, {OTHER_ADMIN}]\nsession_only_ids = [\"{PREFIX}\"]\nsession_approver_uids = [{APPROVER}]\n"
    ));
    let agent = TestAgentProcess::start(&server).await;
    let parent = agent.agent_id();
    let me = format!("unix:uid:{}", my_uid());

    // Entries: the prefix itself and IDs below it are refused; a sibling sharing the letters
    // (no whole-segment match) is not.
    for id in [PREFIX, ID] {
        let run = server_cli(
            &server,
            &[
                "entry",
                "create",
                "--spiffe-id",
                id,
                "--parent-id",
                &parent,
                "--selector",
                &me,
            ],
        );
        refused_with_session_advice(&run, &format!("entry create {id}"));
    }
    let sibling = server_cli(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/administrator",
            "--parent-id",
            &parent,
            "--selector",
            &me,
            "--output",
            "json",
        ],
    )
    .json();
    let entry_id = sibling["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no entry id in {sibling}"))
        .to_owned();
    let moved = server_cli(
        &server,
        &["entry", "update", "--id", &entry_id, "--spiffe-id", ID],
    );
    refused_with_session_advice(&moved, "entry update");

    // Mints and aliases.
    let x509 = server_cli(&server, &["x509", "mint", "--spiffe-id", ID]);
    refused_with_session_advice(&x509, "x509 mint");
    let jwt = server_cli(
        &server,
        &["jwt", "mint", "--spiffe-id", ID, "--audience", "db"],
    );
    refused_with_session_advice(&jwt, "jwt mint");
    let alias = server_cli(&server, &["token", "generate", "--spiffe-id", ID]);
    refused_with_session_advice(&alias, "token generate --spiffe-id");
    let free = server_cli(
        &server,
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--audience",
            "db",
        ],
    );
    assert!(free.status.success(), "{}", free.stderr);

    // A session: pending although require_session_approval is off.
    let session = open_session(&server, &agent, ID, "10m", &[]);
    assert_eq!(session["state"], "pending", "{session}");
    assert_eq!(session["approval_required"], true);
    let id = session["id"].as_str().unwrap().to_owned();

    if !is_root() {
        eprintln!("note: skipping the approver part: switching to another admin uid needs root");
        return;
    }
    // An admin outside session_approver_uids cannot approve it; a listed one can.
    let outsider = server_cli_as(&server, Some(OTHER_ADMIN), &["session", "approve", &id]);
    assert!(!outsider.status.success());
    assert!(
        outsider.stderr.contains("session_approver_uids"),
        "{}",
        outsider.stderr
    );
    let approved = server_cli_as(
        &server,
        Some(APPROVER),
        &["session", "approve", &id, "--output", "json"],
    )
    .json();
    assert_eq!(approved["state"], "active");
    assert_eq!(approved["approver"], format!("uid:{APPROVER}"));
    let (_, msg) = x509_stream_with(&agent, |m| svid_ids(m).contains(&ID.to_owned())).await;
    assert!(svid_ids(&msg).contains(&ID.to_owned()));
}

#[tokio::test]
async fn a_join_token_alias_made_before_the_rule_is_not_created_at_attestation() {
    let mut server = TestServer::start("");
    let generated = server_cli(
        &server,
        &["token", "generate", "--spiffe-id", ID, "--output", "json"],
    )
    .json();
    let token = generated["token"].as_str().unwrap().to_owned();
    server.restart_with(&format!("session_only_ids = [\"{PREFIX}\"]\n"));

    // The agent attests; its alias is not created, and the audit record says why.
    TestAgent::attest_with(&server, &token).await.unwrap();
    let listed = server
        .admin()
        .await
        .list_entries(sigil_proto::admin::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.iter().all(|e| e.spiffe_id != ID), "{listed:?}");
    let attests = server_cli(
        &server,
        &[
            "audit",
            "show",
            "--action",
            "agent.attest",
            "--output",
            "json",
        ],
    )
    .json_lines();
    assert!(
        attests[0]["details"]["alias_refused"]
            .as_str()
            .is_some_and(|r| r.contains("session_only_ids")),
        "{attests:?}"
    );
    // And the server still starts.
    server.restart();
}

#[tokio::test]
async fn a_server_with_entries_under_a_session_only_prefix_refuses_to_start_and_names_them() {
    let mut server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    let parent = agent.agent_id();
    let created = server_cli(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            ID,
            "--parent-id",
            &parent,
            "--selector",
            "unix:uid:1000",
            "--output",
            "json",
        ],
    );
    assert!(created.status.success(), "{}", created.stderr);
    let entry_id = created.json()["id"].as_str().unwrap().to_owned();
    server.kill9();

    let out = Command::new(binary("sigil-server"))
        .arg("run")
        .arg("--config")
        .arg(server.config_path())
        .args(["--session-only-id", PREFIX])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the server started: {stderr}");
    assert!(
        stderr.contains("session_only_ids") && stderr.contains(&entry_id) && stderr.contains(ID),
        "{stderr}"
    );
}
