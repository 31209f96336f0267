//! `SyncEntries` of the real server: a snapshot of the entries authorized for the calling agent,
//! then each change as it happens, filtered per agent, and resumable from a revision without a
//! reload.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use sigil_proto::admin::DeleteEntryRequest;
use sigil_proto::node::node_client::NodeClient;
use sigil_proto::node::{
    ResumePage, SyncEntriesRequest, SyncEntriesResponse, change, sync_entries_response,
};
use sigil_tests::*;
use tonic::Streaming;
use tonic::transport::Channel;

/// Creates an entry with one selector (through the admin API).
async fn add(
    server: &TestServer,
    spiffe_id: &str,
    parent_id: &str,
    selector: &str,
) -> sigil_proto::admin::Entry {
    create_entry(server, entry(spiffe_id, parent_id, &[selector]))
        .await
        .unwrap()
}

/// Agent `agent`'s sync stream from revision `since` of `history` (what the snapshot that
/// began the earlier stream named), on a connection of its own (kept alive by the returned
/// client).
async fn open_sync(
    server: &TestServer,
    agent: &TestAgent,
    since: u64,
    history: &[u8],
) -> (NodeClient<Channel>, Streaming<SyncEntriesResponse>) {
    let mut client = agent.client(server).await;
    let stream = client
        .sync_entries(SyncEntriesRequest {
            since_revision: since,
            since_history: history.to_vec(),
            ..SyncEntriesRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    (client, stream)
}

/// Reads the next message other than an audit checkpoint (the witnessing the stream also
/// carries is tested in `audit_integrity.rs`), failing the test if none comes within 10 s.
async fn next(stream: &mut Streaming<SyncEntriesResponse>) -> sync_entries_response::Message {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("no sync message within 10 s")
            .unwrap()
            .unwrap()
            .message
            .unwrap();
        if !matches!(message, sync_entries_response::Message::AuditCheckpoint(_)) {
            return message;
        }
    }
}

/// The next message, which must be changes: (upserted SPIFFE IDs, deleted entry ids, last revision).
async fn next_changes(
    stream: &mut Streaming<SyncEntriesResponse>,
) -> (Vec<String>, Vec<String>, u64) {
    let sync_entries_response::Message::Changes(changes) = next(stream).await else {
        panic!("expected changes");
    };
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    let mut revision = 0;
    for c in changes.changes {
        revision = revision.max(c.revision);
        match c.change.unwrap() {
            change::Change::Upsert(e) => upserts.push(e.spiffe_id),
            change::Change::Delete(id) => deletes.push(id),
            change::Change::Bundle(_) | change::Change::FederatedBundles(_) => {}
        }
    }
    (upserts, deletes, revision)
}

#[tokio::test]
async fn snapshot_then_changes_filtered_per_agent_and_resumable() {
    let server = TestServer::start("");
    let a = TestAgent::attest(&server).await;
    let b = TestAgent::attest(&server).await;
    let a1 = add(
        &server,
        "spiffe://example.org/a1",
        a.id.as_str(),
        "unix:uid:1",
    )
    .await;
    add(
        &server,
        "spiffe://example.org/b1",
        b.id.as_str(),
        "unix:uid:1",
    )
    .await;

    let (client, mut stream) = open_sync(&server, &a, 0, &[]).await;
    let sync_entries_response::Message::Snapshot(page) = next(&mut stream).await else {
        panic!("the first message must be the snapshot");
    };
    assert!(page.last);
    let history = page.history.clone();
    if server.on_postgres() {
        // PostgreSQL keeps no histories: the revision alone decides (docs/operations.md).
        assert!(history.is_empty());
    } else {
        assert_eq!(history.len(), 16, "a sled server names this run's history");
    }
    let ids: Vec<_> = page.entries.iter().map(|e| e.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/a1"], "only agent A's entries");
    assert_eq!(
        page.entries[0].x509_svid_ttl, 3600,
        "effective TTL from the server default"
    );

    // B's new entry is not A's business; A's next message is about its own entry.
    add(
        &server,
        "spiffe://example.org/b2",
        b.id.as_str(),
        "unix:uid:1",
    )
    .await;
    let a2 = add(
        &server,
        "spiffe://example.org/a2",
        a.id.as_str(),
        "unix:uid:1",
    )
    .await;
    let (upserts, deletes, _) = next_changes(&mut stream).await;
    assert_eq!(upserts, ["spiffe://example.org/a2"]);
    assert!(deletes.is_empty());

    // A child of A's entry is A's too (nested parents).
    add(
        &server,
        "spiffe://example.org/a2/child",
        "spiffe://example.org/a2",
        "unix:uid:2",
    )
    .await;
    let (upserts, _, _) = next_changes(&mut stream).await;
    assert_eq!(upserts, ["spiffe://example.org/a2/child"]);

    let mut admin = server.admin().await;
    admin
        .delete_entry(DeleteEntryRequest { id: a1.id.clone() })
        .await
        .unwrap();
    let (upserts, deletes, revision) = next_changes(&mut stream).await;
    assert!(upserts.is_empty());
    assert_eq!(deletes, std::slice::from_ref(&a1.id));

    // Disconnect; changes happen meanwhile; resume from the last revision seen.
    drop(stream);
    drop(client);
    let a3 = add(
        &server,
        "spiffe://example.org/a3",
        a.id.as_str(),
        "unix:uid:3",
    )
    .await;
    let b3 = add(
        &server,
        "spiffe://example.org/b3",
        b.id.as_str(),
        "unix:uid:3",
    )
    .await;
    let (_client, mut stream) = open_sync(&server, &a, revision, &history).await;
    let page = next_resume(&mut stream).await;
    assert!(page.revision > revision);
    let mut full: Vec<_> = page.entries.iter().map(|e| e.spiffe_id.as_str()).collect();
    full.sort_unstable();
    assert_eq!(
        full,
        ["spiffe://example.org/a2/child", "spiffe://example.org/a3"],
        "what A missed, and the nested entry (its authorization depends on a2), no snapshot"
    );
    assert_eq!(
        page.unchanged_ids,
        std::slice::from_ref(&a2.id),
        "a2 did not change: by id only"
    );
    assert_eq!(
        page.unchanged_revisions,
        [a2.revision],
        "with the revision it must be held at"
    );
    assert!(
        !format!("{page:?}").contains(&b3.id),
        "nothing of B's appears"
    );
    assert!(page.bundle.is_some(), "the last page carries the bundle");

    // And the resumed stream goes on live.
    admin
        .delete_entry(DeleteEntryRequest { id: a3.id.clone() })
        .await
        .unwrap();
    let (_, deletes, _) = next_changes(&mut stream).await;
    assert_eq!(deletes, [a3.id]);
    assert_eq!(page.history, history, "the same run, the same history");

    // On sled, a revision without its history proves nothing (it may be one of a history a
    // restore lost): a snapshot, not a resume. PostgreSQL keeps no histories.
    let (_client, mut stream) = open_sync(&server, &a, revision, &[]).await;
    match next(&mut stream).await {
        sync_entries_response::Message::Snapshot(page) if !server.on_postgres() => {
            assert_eq!(page.history, history);
        }
        sync_entries_response::Message::Resume(_) if server.on_postgres() => {}
        other => panic!("a snapshot on sled, a resume on PostgreSQL: {other:?}"),
    }
}

/// The next message, which must be a complete (one-page) resume.
async fn next_resume(stream: &mut Streaming<SyncEntriesResponse>) -> ResumePage {
    let sync_entries_response::Message::Resume(page) = next(stream).await else {
        panic!("expected resume pages");
    };
    assert!(page.last, "one page is enough here");
    page
}

#[tokio::test]
async fn a_resume_drops_what_an_alias_deleted_meanwhile_authorized_and_leaks_nothing() {
    let server = TestServer::start("");
    let a = TestAgent::attest(&server).await;
    let b = TestAgent::attest(&server).await;
    // A's alias entry, a workload entry below it, and one of A's own.
    let alias = add(
        &server,
        "spiffe://example.org/node/a",
        a.id.as_str(),
        "unix:uid:0",
    )
    .await;
    add(
        &server,
        "spiffe://example.org/below-alias",
        "spiffe://example.org/node/a",
        "unix:uid:1",
    )
    .await;
    let own = add(
        &server,
        "spiffe://example.org/own",
        a.id.as_str(),
        "unix:uid:1",
    )
    .await;
    let b1 = add(
        &server,
        "spiffe://example.org/b1",
        b.id.as_str(),
        "unix:uid:1",
    )
    .await;

    let (client, mut stream) = open_sync(&server, &a, 0, &[]).await;
    let sync_entries_response::Message::Snapshot(page) = next(&mut stream).await else {
        panic!("expected the snapshot");
    };
    assert_eq!(page.entries.len(), 3);
    let revision = page.revision;
    let history = page.history;
    drop(stream);
    drop(client);

    // While A is away: its alias goes (the entry below it is unchanged but no longer A's),
    // and B's entry changes.
    let mut admin = server.admin().await;
    admin
        .delete_entry(DeleteEntryRequest {
            id: alias.id.clone(),
        })
        .await
        .unwrap();
    admin
        .delete_entry(DeleteEntryRequest { id: b1.id.clone() })
        .await
        .unwrap();

    let (_client, mut stream) = open_sync(&server, &a, revision, &history).await;
    let page = next_resume(&mut stream).await;
    assert!(
        page.entries.is_empty(),
        "nothing A holds changed: {:?}",
        page.entries
    );
    assert_eq!(
        page.unchanged_ids,
        std::slice::from_ref(&own.id),
        "A keeps only its own entry: the alias and the entry below it are gone"
    );
    assert_eq!(page.unchanged_revisions, [own.revision]);
    assert!(
        !format!("{page:?}").contains(&b1.id),
        "B's deleted entry id is not shown to A"
    );
}

#[tokio::test]
async fn a_revision_the_server_does_not_have_means_a_fresh_snapshot() {
    let server = TestServer::start("");
    let a = TestAgent::attest(&server).await;
    add(
        &server,
        "spiffe://example.org/a1",
        a.id.as_str(),
        "unix:uid:1",
    )
    .await;
    let (client, mut stream) = open_sync(&server, &a, 0, &[]).await;
    let sync_entries_response::Message::Snapshot(page) = next(&mut stream).await else {
        panic!("expected the snapshot");
    };
    let history = page.history;
    drop((client, stream));
    let (_client, mut stream) = open_sync(&server, &a, 1_000_000, &history).await;
    let sync_entries_response::Message::Snapshot(page) = next(&mut stream).await else {
        panic!("expected a snapshot");
    };
    assert_eq!(page.entries.len(), 1);
}

#[tokio::test]
async fn large_snapshots_are_paged_under_the_message_limit() {
    let server = TestServer::start("");
    let a = TestAgent::attest(&server).await;
    let entries: Vec<_> = (0..2500)
        .map(|i| {
            entry(
                &format!("spiffe://example.org/w/{i}"),
                a.id.as_str(),
                &["unix:uid:1"],
            )
        })
        .collect();
    let resp = server
        .admin()
        .await
        .create_entries(sigil_proto::admin::CreateEntriesRequest { entries })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results.len(), 2500);
    let (_client, mut stream) = open_sync(&server, &a, 0, &[]).await;
    let mut total = 0;
    let mut pages = 0;
    loop {
        let sync_entries_response::Message::Snapshot(page) = next(&mut stream).await else {
            panic!("expected snapshot pages");
        };
        pages += 1;
        total += page.entries.len();
        if page.last {
            break;
        }
    }
    assert_eq!(total, 2500);
    assert_eq!(pages, 3);
}
