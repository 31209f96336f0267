//! A server whose data directory is restored from an older copy, with the real binaries: an
//! agent that saw changes the restored store lost must not keep them when it resumes its sync.
//! The restored store numbers its new changes as the lost ones were numbered, so "unchanged
//! since the revision you are at" no longer proves that the agent holds what the server has.
//!
//! Here the lost history is shorter than a checkpoint interval and ends with kill -9, so it
//! signs no checkpoint: the agent witnessed only the one signed at the stop before the backup,
//! and the log does not look diverged. What stands in the way is the history each server run
//! begins in the store (`sync::tests`): the agent presents the one its revision belongs to,
//! which the restored store never knew, so it gets a snapshot. That holds even when the entry
//! the agent holds was changed again after the restore at the very revision the agent holds it
//! at, where the agent's own check (it keeps an unchanged entry only at the revision the server
//! names, `manager::tests`) cannot tell the two apart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use sigil_proto::admin::UpdateEntryRequest;
use sigil_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_does_not_keep_what_a_restored_store_lost() {
    restore_under_a_resuming_agent(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_does_not_keep_what_a_restored_store_lost_at_the_same_revision() {
    restore_under_a_resuming_agent(true).await;
}

/// The agent serves an entry widened in a history that a restore then loses; `same_revision`:
/// the restored server changes that entry again, so that it is at the revision the agent holds
/// it at, with other contents.
async fn restore_under_a_resuming_agent(same_revision: bool) {
    let mut server = TestServer::start(SLED_STORE);
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    let always = "spiffe://example.org/always";
    let lost = "spiffe://example.org/granted-in-the-lost-history";
    // The agent's entries: one this test's workload always gets, one it gets only in the
    // history the restore loses.
    let agent_id = agent.agent_id();
    create_entry(&server, entry(always, &agent_id, &[&me]))
        .await
        .unwrap();
    let mut narrow = create_entry(&server, entry(lost, &agent_id, &["unix:uid:4242424"]))
        .await
        .unwrap();
    let (mut stream, _) = x509_stream_with(&agent, |m| svid_ids(m) == [always]).await;

    // The backup, taken from the stopped server.
    let (status, _) = server.signal("TERM", Duration::from_secs(20));
    assert!(status.success());
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&server.data_dir(), &backup.path().join("data"));
    server.restart();

    // The history the restore loses: the entry is widened to this workload, and the agent
    // serves it.
    narrow.selectors = vec![me.clone()];
    let widened = server
        .admin()
        .await
        .update_entry(UpdateEntryRequest {
            entry: Some(narrow),
        })
        .await
        .unwrap()
        .into_inner();
    next_x509_until(&mut stream, Duration::from_secs(30), |m| {
        svid_ids(m).len() == 2
    })
    .await
    .unwrap();
    let snapshots = |log: &str| {
        log.lines()
            .filter(|l| l.contains("synced entries") && l.contains("resumed=false"))
            .count()
    };
    let log = agent.log_text();
    assert!(
        log.contains("resumed=true") && !log.contains("taking a snapshot"),
        "a restart that loses nothing is a plain resume:\n{log}"
    );
    let snapshots_before = snapshots(&log);

    // The agent is held still while the disk dies, the backup is restored, and the restored
    // server writes past the revision the agent is at.
    agent.signal_nowait("STOP");
    server.kill9();
    std::fs::remove_dir_all(server.data_dir()).unwrap();
    copy_dir(&backup.path().join("data"), &server.data_dir());
    server.restart();
    let mut revision = all_entries(&server)
        .await
        .iter()
        .map(|e| e.revision)
        .max()
        .unwrap();
    let mut n = 0;
    if same_revision {
        while revision + 1 < widened.revision {
            n += 1;
            revision = write_elsewhere(&server, n).await;
        }
        // The entry the agent holds widened, changed again: at the revision the agent holds it
        // at, to other contents (narrow still, to another uid).
        let mut changed = all_entries(&server)
            .await
            .into_iter()
            .find(|e| e.spiffe_id == lost)
            .unwrap();
        changed.selectors = vec!["unix:uid:4242425".to_owned()];
        revision = server
            .admin()
            .await
            .update_entry(UpdateEntryRequest {
                entry: Some(changed),
            })
            .await
            .unwrap()
            .into_inner()
            .revision;
        assert_eq!(
            revision, widened.revision,
            "the restored server numbers the change as the lost one was"
        );
    }
    while revision <= widened.revision + 10 {
        n += 1;
        revision = write_elsewhere(&server, n).await;
    }
    let restored = all_entries(&server).await;
    let narrow_again = restored.iter().find(|e| e.spiffe_id == lost).unwrap();
    if same_revision {
        assert_eq!(narrow_again.selectors, ["unix:uid:4242425"]);
        assert_eq!(narrow_again.revision, widened.revision);
    } else {
        assert_eq!(narrow_again.selectors, ["unix:uid:4242424"]);
        assert!(
            narrow_again.revision < widened.revision,
            "unchanged since before the agent's revision, as far as the restored server knows"
        );
    }

    // The agent resumes from a revision of a history the restored store never knew, so it
    // gets a snapshot, and the workload loses what only the lost history granted.
    agent.signal_nowait("CONT");
    let narrowed = next_x509_until(&mut stream, Duration::from_secs(30), |m| {
        svid_ids(m) == [always]
    })
    .await;
    assert!(
        narrowed.is_ok(),
        "the workload still holds {lost}: {narrowed:?}\nagent log:\n{}",
        agent.log_text()
    );
    let log = server.log_text();
    assert!(
        log.contains("a snapshot, not a resume") && log.contains("not one this store knows"),
        "the server refused to resume from a history the restore lost:\n{log}"
    );
    // And syncs from a snapshot: the entry is back, as the restored store has it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while snapshots(&agent.log_text()) == snapshots_before {
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot after the restore:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = agent.log_text();
    let last_snapshot = log
        .lines()
        .rfind(|l| l.contains("synced entries") && l.contains("resumed=false"))
        .unwrap();
    assert!(
        last_snapshot.contains("entries=2"),
        "both entries, the second narrowed again: {last_snapshot}"
    );
    // A workload that connects now gets what the restored entries grant it.
    let mut client = agent.client().await;
    let mut fresh = client
        .fetch_x509svid(sigil_proto::workload::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = fresh.message().await.unwrap().unwrap();
    assert_eq!(svid_ids(&first), [always], "nothing grants {lost} again");
}

/// Creates an entry of another agent's (nothing this test's agent is sent); its revision.
async fn write_elsewhere(server: &TestServer, n: usize) -> u64 {
    create_entry(
        server,
        entry(
            &format!("spiffe://example.org/elsewhere/{n}"),
            "spiffe://example.org/some/other/agent",
            &["unix:uid:1"],
        ),
    )
    .await
    .unwrap()
    .revision
}

/// A server killed with kill -9 loses nothing an agent saw (only durable changes are sent), so
/// its next start begins its history no earlier than the agent's revision: the agent resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_resumes_after_the_server_is_killed() {
    let mut server = TestServer::start(SLED_STORE);
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    let first = "spiffe://example.org/first";
    let agent_id = agent.agent_id();
    create_entry(&server, entry(first, &agent_id, &[&me]))
        .await
        .unwrap();
    let (mut stream, _) = x509_stream_with(&agent, |m| svid_ids(m) == [first]).await;
    let resumes = |log: &str| log.matches("resumed=true").count();
    let before = resumes(&agent.log_text());

    server.kill9();
    server.restart();
    let second = "spiffe://example.org/second";
    create_entry(&server, entry(second, &agent_id, &[&me]))
        .await
        .unwrap();
    next_x509_until(&mut stream, Duration::from_secs(30), |m| {
        svid_ids(m).len() == 2
    })
    .await
    .unwrap();
    let log = agent.log_text();
    assert_eq!(
        resumes(&log),
        before + 1,
        "one resume after the kill:\n{log}"
    );
    assert!(
        !server.log_text().contains("a snapshot, not a resume"),
        "{}",
        server.log_text()
    );
}
