//! An agent holds at most `MAX_ENTRIES` entries; one sent beyond the cap is left out (and the
//! server counts it as sent). Once the agent has room again, live or in the resume that
//! reconnects it, it takes a snapshot and serves what it left out; a change that takes entries
//! away and brings others leaves nothing out (the server sends what goes first). The real
//! server and agent, with 10,000 entries and more.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use sigil_agent::manager::MAX_ENTRIES;
use sigil_proto::admin::{
    CreateEntriesRequest, DeleteEntryRequest, Entry, UpdateEntryRequest, entry_result,
};
use sigil_proto::workload::{X509svidRequest, X509svidResponse};
use sigil_tests::*;

const KEPT: &str = "spiffe://example.org/cap/kept";
const LEFT_OUT: &str = "spiffe://example.org/cap/left-out";

/// Creates `count` entries for `selector` under `agent`, in calls of 1,000, and waits until
/// the agent has applied them all; returns them.
async fn fill(
    server: &TestServer,
    agent: &TestAgentProcess,
    selector: &str,
    count: usize,
) -> Vec<Entry> {
    let mut admin = server.admin().await;
    let mut filler: Vec<Entry> = Vec::new();
    let mut last_revision = 0;
    for call in 0..count.div_ceil(1_000) {
        let entries = (call * 1_000..((call + 1) * 1_000).min(count))
            .map(|i| {
                entry(
                    &format!("spiffe://example.org/cap/filler/{i}"),
                    &agent.agent_id(),
                    &[selector],
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
    assert_eq!(filler.len(), count);
    let applied = format!("entry changes applied revision={last_revision}");
    agent
        .until_logged(
            Duration::from_secs(120),
            "the agent never held the cap's entries",
            |log| log.contains(&applied),
        )
        .await;
    filler
}

/// This uid's entry `KEPT` and a stream that has it, the cap filled with entries for another
/// uid, and `LEFT_OUT` for this uid beyond the cap, which the agent ignores: the stream and the
/// fillers.
async fn left_out_at_the_cap(
    server: &TestServer,
    agent: &TestAgentProcess,
) -> (tonic::Streaming<X509svidResponse>, Vec<Entry>) {
    let parent = agent.agent_id();
    let me = format!("unix:uid:{}", my_uid());
    let nobody = format!("unix:uid:{}", my_uid().wrapping_add(1));
    create_entry(server, entry(KEPT, &parent, &[&me]))
        .await
        .unwrap();
    let (stream, first) = x509_stream_with(agent, |m| svid_ids(m) == [KEPT]).await;
    assert_eq!(svid_ids(&first), [KEPT]);
    let filler = fill(server, agent, &nobody, MAX_ENTRIES - 1).await;
    create_entry(server, entry(LEFT_OUT, &parent, &[&me]))
        .await
        .unwrap();
    agent
        .until_logged(
            Duration::from_secs(30),
            "the entry beyond the cap was not left out",
            |log| log.contains("too many entries for this agent; ignoring one"),
        )
        .await;
    (stream, filler)
}

/// Deletes `filler`: room for one entry.
async fn delete(server: &TestServer, filler: &Entry) {
    server
        .admin()
        .await
        .delete_entry(DeleteEntryRequest {
            id: filler.id.clone(),
        })
        .await
        .unwrap();
}

/// What the agent logs when it takes a snapshot for the entries it left out, followed by
/// `max=` when a live change made the room (or the spacing ended), by `left_out=` when the
/// resume that began the stream did.
const SNAPSHOT: &str = "entries left out for the cap now have room; taking a snapshot";

/// Waits until the agent logs `SNAPSHOT` followed by `path` (else fails with `failure`), then
/// until `stream` has `LEFT_OUT` beside `KEPT`.
async fn left_out_served(
    agent: &TestAgentProcess,
    stream: &mut tonic::Streaming<X509svidResponse>,
    path: &str,
    failure: &str,
) {
    let line = format!("{SNAPSHOT} {path}");
    agent
        .until_logged(Duration::from_secs(60), failure, |log| log.contains(&line))
        .await;
    let msg = next_x509_until(stream, Duration::from_secs(180), |m| {
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

/// Deletes `filler` while the agent is connected: the live change makes room, and the agent
/// takes a snapshot at once and serves the entry left out.
async fn room_made_live(
    server: &TestServer,
    agent: &TestAgentProcess,
    stream: &mut tonic::Streaming<X509svidResponse>,
    filler: &Entry,
) {
    delete(server, filler).await;
    left_out_served(
        agent,
        stream,
        "max=",
        "the agent did not take a snapshot once it had room",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_left_out_for_the_cap_is_served_once_there_is_room() {
    let server = TestServer::start("");
    let agent =
        TestAgentProcess::start_with_config(&server, "metrics_address = \"127.0.0.1:0\"\n").await;
    let metrics = logged_endpoint(|| agent.log_text(), "metrics");
    let (mut stream, filler) = left_out_at_the_cap(&server, &agent).await;
    // Operators see it: the alert rule of docs/operations.md reads this gauge.
    cap_gauges_become(metrics, 1.0).await;
    // Room for it: the agent takes a snapshot, and serves it.
    room_made_live(&server, &agent, &mut stream, &filler[0]).await;
    cap_gauges_become(metrics, 0.0).await;
}

/// The agent's metrics at `metrics` come to say it holds `MAX_ENTRIES` entries and is
/// (`over` 1) or is not (0) over its cap.
async fn cap_gauges_become(metrics: std::net::SocketAddr, over: f64) {
    let wait = Duration::from_secs(30);
    metric_becomes(metrics, "sigil_agent_over_entry_cap", over, wait).await;
    metric_becomes(metrics, "sigil_agent_entries", MAX_ENTRIES as f64, wait).await;
}

// The same room made while the agent is cut from its server: the resume that reconnects it
// takes a filler away and names the entry left out as unchanged (the server counts it as sent);
// the agent, below its cap at the resume's end, takes a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_left_out_for_the_cap_is_served_after_a_resume_that_makes_room() {
    let server = TestServer::start("");
    let proxy = CuttableProxy::start(server.node_addr).await;
    let agent = TestAgentProcess::start_listing(&server, &[proxy.address]).await;
    let (mut stream, filler) = left_out_at_the_cap(&server, &agent).await;
    // Room made while the agent cannot hear of it: no live change reaches it.
    const FAILED: &str = "sync with the server failed";
    let failed_before = agent.log_text().matches(FAILED).count();
    proxy.cut();
    agent
        .until_logged(
            Duration::from_secs(30),
            "the agent did not notice it was cut from its server",
            |log| log.matches(FAILED).count() > failed_before,
        )
        .await;
    delete(&server, &filler[0]).await;
    // Reconnected, it resumes, and the resume's end finds the room (`left_out=`: a snapshot
    // instead of the resume would bring the entry without the check, and log no such line).
    proxy.restore();
    left_out_served(
        &agent,
        &mut stream,
        "left_out=",
        "the agent did not take a snapshot after the resume made room",
    )
    .await;
}

// Room made again soon after such a snapshot waits for the spacing between them
// (`CAP_SNAPSHOT_SPACING`): an agent over its cap whose entries are deleted one after another
// takes one snapshot per spacing, not one per deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_for_entries_left_out_are_spaced() {
    const WAITS: &str = "the snapshot that brings them waits for the spacing";
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    let (mut stream, filler) = left_out_at_the_cap(&server, &agent).await;
    room_made_live(&server, &agent, &mut stream, &filler[0]).await;

    // Each round: one more entry left out at the cap, then two deletions. The first deletion
    // of a round that comes within the spacing of the last snapshot must wait, and the second
    // make no snapshot of its own. (A machine slow enough to let the spacing pass first gets
    // its snapshot at once: the next round, right after it, tries again.)
    let mut gone = filler[1..].iter();
    for round in 1..=3 {
        let id = format!("spiffe://example.org/cap/left-out-{round}");
        create_entry(&server, entry(&id, &agent.agent_id(), &[&me]))
            .await
            .unwrap();
        agent
            .until_logged(
                Duration::from_secs(30),
                "the next entry beyond the cap was not left out",
                |log| {
                    log.matches("too many entries for this agent; ignoring one")
                        .count()
                        > round
                },
            )
            .await;
        let snapshots = agent.log_text().matches(SNAPSHOT).count();
        delete(&server, gone.next().unwrap()).await;
        agent
            .until_logged(
                Duration::from_secs(30),
                "the deletion neither waited nor took a snapshot",
                |log| log.contains(WAITS) || log.matches(SNAPSHOT).count() > snapshots,
            )
            .await;
        let waited = agent.log_text().contains(WAITS);
        if waited {
            delete(&server, gone.next().unwrap()).await;
        }
        next_x509_until(&mut stream, Duration::from_secs(60), |m| {
            svid_ids(m).contains(&id)
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "round {round}'s entry left out never came: {e:?}; agent log:\n{}",
                agent.log_text()
            )
        });
        if waited {
            let log = agent.log_text();
            assert_eq!(
                log.matches(SNAPSHOT).count(),
                snapshots + 1,
                "one snapshot for both deletions, after the spacing; agent log:\n{log}"
            );
            assert_eq!(log.matches(WAITS).count(), 1, "{log}");
            return;
        }
    }
    panic!(
        "no snapshot waited for the spacing in three rounds, each right after the last; agent \
         log:\n{}",
        agent.log_text()
    );
}

// One change can take an entry away and bring another: an entry renamed takes its children
// away and brings those of its new ID. The server sends what goes before what comes, so an agent
// at its cap has room for what comes, and leaves nothing out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_a_change_that_replaces_entries_leaves_nothing_out() {
    const GROUP_1: &str = "spiffe://example.org/cap/group-1";
    const GROUP_2: &str = "spiffe://example.org/cap/group-2";
    const MEMBER_1: &str = "spiffe://example.org/cap/member-1";
    const MEMBER_2: &str = "spiffe://example.org/cap/member-2";
    let server = TestServer::start("");
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    let nobody = format!("unix:uid:{}", my_uid().wrapping_add(1));
    // The group, an entry for another uid, is the parent of this uid's member 1; member 2's
    // parent is an ID nothing authorized has yet.
    let group = create_entry(&server, entry(GROUP_1, &agent.agent_id(), &[&nobody]))
        .await
        .unwrap();
    create_entry(&server, entry(MEMBER_1, GROUP_1, &[&me]))
        .await
        .unwrap();
    create_entry(&server, entry(MEMBER_2, GROUP_2, &[&me]))
        .await
        .unwrap();
    let (mut stream, _) = x509_stream_with(&agent, |m| svid_ids(m) == [MEMBER_1]).await;
    // The group, member 1 and the fillers: the cap.
    fill(&server, &agent, &nobody, MAX_ENTRIES - 2).await;

    let mut renamed = group;
    renamed.spiffe_id = GROUP_2.to_owned();
    server
        .admin()
        .await
        .update_entry(UpdateEntryRequest {
            entry: Some(renamed),
        })
        .await
        .unwrap();
    // Member 1 leaves the stream at once (before member 2 is minted), and with it this
    // workload's only identity: the stream ends, and a new one gets member 2.
    let ended = next_x509_until(&mut stream, Duration::from_secs(60), |_| false).await;
    assert!(
        matches!(&ended, Err(status) if status.code() == tonic::Code::PermissionDenied),
        "{ended:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let fetched = agent
            .client()
            .await
            .fetch_x509svid(X509svidRequest {})
            .await;
        if let Ok(fetched) = fetched
            && let Ok(Some(msg)) = fetched.into_inner().message().await
            && svid_ids(&msg) == [MEMBER_2]
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "member 2 never replaced member 1; agent log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = agent.log_text();
    assert!(
        !log.contains("too many entries for this agent") && !log.contains("taking a snapshot"),
        "the agent left an entry out, or took a snapshot; agent log:\n{log}"
    );
}
