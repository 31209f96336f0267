//! An agent holds at most `MAX_ENTRIES` entries; one sent beyond the cap is left out (and the
//! server counts it as sent). Once the agent has room again, it takes a snapshot and serves
//! what it left out: the real server and agent, 10,001 entries.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use sigil_agent::manager::MAX_ENTRIES;
use sigil_proto::admin::{CreateEntriesRequest, DeleteEntryRequest, Entry, entry_result};
use sigil_tests::*;

const KEPT: &str = "spiffe://example.org/cap/kept";
const LEFT_OUT: &str = "spiffe://example.org/cap/left-out";

/// Waits (at most `within`) until the agent's log passes `done`.
async fn until_logged(
    agent: &TestAgentProcess,
    within: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) {
    let deadline = std::time::Instant::now() + within;
    while !done(&agent.log_text()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}; agent log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_left_out_for_the_cap_is_served_once_there_is_room() {
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    let parent = agent.agent_id();
    let me = format!("unix:uid:{}", my_uid());
    let nobody = format!("unix:uid:{}", my_uid().wrapping_add(1));
    create_entry(&server, entry(KEPT, &parent, &[&me]))
        .await
        .unwrap();
    let (mut stream, first) = x509_stream_with(&agent, |m| svid_ids(m) == [KEPT]).await;
    assert_eq!(svid_ids(&first), [KEPT]);

    // The cap filled with entries for another uid, in calls of 1,000.
    let mut admin = server.admin().await;
    let mut filler: Vec<Entry> = Vec::new();
    let mut last_revision = 0;
    for call in 0..MAX_ENTRIES.div_ceil(1_000) {
        let entries = (call * 1_000..((call + 1) * 1_000).min(MAX_ENTRIES - 1))
            .map(|i| {
                entry(
                    &format!("spiffe://example.org/cap/filler/{i}"),
                    &parent,
                    &[&nobody],
                )
            })
            .collect();
        let results = admin
            .create_entries(CreateEntriesRequest { entries })
            .await
            .unwrap()
            .into_inner()
            .results;
        for result in results {
            match result.result {
                Some(entry_result::Result::Entry(created)) => {
                    last_revision = last_revision.max(created.revision);
                    filler.push(created);
                }
                other => panic!("an entry was refused: {other:?}"),
            }
        }
    }
    assert_eq!(filler.len() + 1, MAX_ENTRIES);
    let applied = format!("entry changes applied revision={last_revision}");
    until_logged(
        &agent,
        Duration::from_secs(120),
        "the agent never held the cap's entries",
        |log| log.contains(&applied),
    )
    .await;

    // One more for this uid: beyond the cap, left out.
    create_entry(&server, entry(LEFT_OUT, &parent, &[&me]))
        .await
        .unwrap();
    until_logged(
        &agent,
        Duration::from_secs(30),
        "the entry beyond the cap was not left out",
        |log| log.contains("too many entries for this agent; ignoring one"),
    )
    .await;

    // Room for it: the agent takes a snapshot, and serves it.
    admin
        .delete_entry(DeleteEntryRequest {
            id: filler[0].id.clone(),
        })
        .await
        .unwrap();
    until_logged(
        &agent,
        Duration::from_secs(30),
        "the agent did not take a snapshot once it had room",
        |log| log.contains("entries left out for the cap now have room; taking a snapshot"),
    )
    .await;
    let msg = next_x509_until(&mut stream, Duration::from_secs(180), |m| {
        svid_ids(m).iter().any(|id| id == LEFT_OUT)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the entry left out never came: {e:?}; agent log:\n{}",
            agent.log_text()
        )
    });
    let mut ids = svid_ids(&msg);
    ids.sort();
    assert_eq!(ids, [KEPT, LEFT_OUT]);
}
