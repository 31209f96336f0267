//! What an entry no longer grants leaves the agent at once, whatever the agent is minting: the
//! real server and agent, with a TCP relay between them that can hold what the agent sends. A
//! mint then stays in flight (its CSRs held) while the server's pushes on the sync stream still
//! arrive; a workload's stream must lose what was withdrawn before the mint ends: a renamed or
//! deleted entry's SVID, one minted for selectors its entry no longer has, and a revoked
//! session's SVID (with its serial on the CRL).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::net::SocketAddr;
use std::time::Duration;

use sigil_proto::admin::{DeleteEntryRequest, UpdateEntryRequest};
use sigil_proto::workload::X509svidResponse;
use sigil_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const FIRST: &str = "spiffe://example.org/withdrawals/first";
const RENAMED: &str = "spiffe://example.org/withdrawals/renamed";
const SECOND: &str = "spiffe://example.org/withdrawals/second";
const KEPT: &str = "spiffe://example.org/withdrawals/kept";
const LAST: &str = "spiffe://example.org/withdrawals/last";

/// A TCP relay to the server whose agent-to-server direction can be held: bytes read from the
/// agent wait, unsent, while held; the server's bytes always pass.
struct Relay {
    address: SocketAddr,
    held: watch::Sender<bool>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (held, watching) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((agent, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(to).await else {
                    continue;
                };
                let (mut from_agent, mut to_agent) = agent.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_server, &mut to_agent).await;
                });
                let mut held = watching.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_agent.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if held.wait_for(|held| !held).await.is_err()
                            || to_server.write_all(&buf[..n]).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Self { address, held }
    }

    fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }
}

fn sorted_ids(msg: &X509svidResponse) -> Vec<String> {
    let mut ids = svid_ids(msg);
    ids.sort();
    ids
}

// The relay's tasks run while the test waits on the agent's start (which blocks its thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawals_do_not_wait_for_a_mint_in_flight() {
    let server = TestServer::start("");
    let relay = Relay::start(server.node_addr).await;
    let agent = TestAgentProcess::start_listing(&server, &[relay.address]).await;
    let me = format!("unix:uid:{}", my_uid());
    let parent = agent.agent_id();
    let mut made = Vec::new();
    for id in [FIRST, SECOND, KEPT] {
        made.push(
            create_entry(&server, entry(id, &parent, &[&me]))
                .await
                .unwrap(),
        );
    }
    let (mut stream, _) =
        x509_stream_with(&agent, |m| sorted_ids(m) == [FIRST, KEPT, SECOND]).await;
    let mut admin = server.admin().await;
    let within = Duration::from_secs(10);
    let log = |what: &str| format!("{what}; agent log:\n{}", agent.log_text());

    // One change that both withdraws and needs a mint: the first entry now names another ID.
    // The CSR for it is held in the relay, so the mint cannot end.
    relay.hold(true);
    let mut renamed = made[0].clone();
    renamed.spiffe_id = RENAMED.to_owned();
    let renamed = admin
        .update_entry(UpdateEntryRequest {
            entry: Some(renamed),
        })
        .await
        .unwrap()
        .into_inner();
    let msg = next_x509_until(&mut stream, within, |m| {
        !svid_ids(m).contains(&FIRST.to_owned())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{}",
            log(&format!(
                "the old ID stayed while its entry's new one was minted: {e:?}"
            ))
        )
    });
    assert_eq!(sorted_ids(&msg), [KEPT, SECOND], "{}", log("withdrawn"));

    // A deletion that arrives while that mint is still in flight.
    admin
        .delete_entry(DeleteEntryRequest {
            id: made[1].id.clone(),
        })
        .await
        .unwrap();
    let msg = next_x509_until(&mut stream, within, |m| {
        !svid_ids(m).contains(&SECOND.to_owned())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{}",
            log(&format!(
                "the deleted entry's SVID stayed while a mint was in flight: {e:?}"
            ))
        )
    });
    assert_eq!(sorted_ids(&msg), [KEPT], "{}", log("deleted"));

    // The renamed entry, whose SVID is still being minted, no longer names this workload's uid:
    // what the held mint brings back was asked for the old selectors, and must not be served.
    let mut narrowed = renamed.clone();
    narrowed.selectors = vec![format!("unix:uid:{}", my_uid().wrapping_add(1))];
    let narrowed = admin
        .update_entry(UpdateEntryRequest {
            entry: Some(narrowed),
        })
        .await
        .unwrap()
        .into_inner();
    applied(&agent, narrowed.revision).await;
    relay.hold(false);
    create_entry(&server, entry(LAST, &parent, &[&me]))
        .await
        .unwrap();
    loop {
        let msg = next_x509_until(&mut stream, Duration::from_secs(40), |_| true)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{}",
                    log(&format!("the last entry's SVID never came: {e:?}"))
                )
            });
        assert!(
            !svid_ids(&msg).contains(&RENAMED.to_owned()),
            "{}",
            log("an SVID minted for selectors its entry no longer has was served")
        );
        if svid_ids(&msg).contains(&LAST.to_owned()) {
            assert_eq!(sorted_ids(&msg), [KEPT, LAST], "{}", log("last"));
            break;
        }
    }
    // The held mint did come back (and was dropped): the agent's log names its result.
    assert!(
        agent
            .log_text()
            .contains("minted for an entry that changed or went meanwhile; dropped dropped=1"),
        "{}",
        log("no stale result")
    );
}

/// Waits until the agent's log says it applied the change at `revision` (its debug line).
async fn applied(agent: &TestAgentProcess, revision: u64) {
    let line = format!("entry changes applied revision={revision}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !agent.log_text().contains(&line) {
        assert!(
            std::time::Instant::now() < deadline,
            "the change at revision {revision} never reached the agent; its log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_revoked_while_a_mint_is_held_leaves_the_stream() {
    const SESSION: &str = "spiffe://example.org/withdrawals/session";
    let server = TestServer::start("");
    let relay = Relay::start(server.node_addr).await;
    let agent = TestAgentProcess::start_listing(&server, &[relay.address]).await;
    let me = format!("unix:uid:{}", my_uid());
    let kept = create_entry(&server, entry(KEPT, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let session = open_session(&server, &agent, SESSION, "10m", &[]);
    let session_id = session["id"].as_str().unwrap().to_owned();
    let (mut stream, first) = x509_stream_with(&agent, |m| sorted_ids(m) == [KEPT, SESSION]).await;
    let serial = leaf_serial(
        &first
            .svids
            .iter()
            .find(|s| s.spiffe_id == SESSION)
            .unwrap()
            .x509_svid,
    );
    let log = |what: &str| format!("{what}; agent log:\n{}", agent.log_text());

    // A new hint: the agent mints KEPT again, and that mint is held.
    relay.hold(true);
    let mut hinted = kept.clone();
    hinted.hint = "rotated".to_owned();
    let hinted = server
        .admin()
        .await
        .update_entry(UpdateEntryRequest {
            entry: Some(hinted),
        })
        .await
        .unwrap()
        .into_inner();
    applied(&agent, hinted.revision).await;

    // The revocation reaches the stream while that mint is still held: the session's SVID
    // leaves, and its serial comes on the CRL.
    let revoked = server_cli(
        &server,
        &[
            "session",
            "revoke",
            &session_id,
            "--reason",
            "held mint",
            "--output",
            "json",
        ],
    )
    .json();
    assert_eq!(revoked["state"], "revoked", "{revoked}");
    let within = Duration::from_secs(10);
    let msg = next_x509_until(&mut stream, within, |m| {
        !svid_ids(m).contains(&SESSION.to_owned())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{}",
            log(&format!(
                "the revoked session stayed while a mint was held: {e:?}"
            ))
        )
    });
    assert_eq!(sorted_ids(&msg), [KEPT], "{}", log("revoked"));
    // The CRL comes with that message or in one of its own (the server pushes it after).
    let listed = |m: &X509svidResponse| m.crl.iter().any(|c| crl_serials(c).contains(&serial));
    if !listed(&msg) {
        next_x509_until(&mut stream, within, listed)
            .await
            .unwrap_or_else(|e| {
                panic!("{}", log(&format!("the CRL waited for a held mint: {e:?}")))
            });
    }

    // Released, the mint ends and the new hint arrives.
    relay.hold(false);
    let msg = next_x509_until(&mut stream, Duration::from_secs(40), |m| {
        m.svids
            .iter()
            .any(|s| s.spiffe_id == KEPT && s.hint == "rotated")
    })
    .await
    .unwrap_or_else(|e| panic!("{}", log(&format!("the rotated SVID never came: {e:?}"))));
    assert_eq!(sorted_ids(&msg), [KEPT], "{}", log("rotated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_does_not_wait_for_the_agents_own_renewal() {
    // The agent renews its own SVID at half its life: 10 s after it attests, well after the
    // setup below.
    let server = TestServer::start("agent_svid_ttl = \"20s\"");
    let relay = Relay::start(server.node_addr).await;
    let agent = TestAgentProcess::start_listing(&server, &[relay.address]).await;
    let me = format!("unix:uid:{}", my_uid());
    let parent = agent.agent_id();
    let first = create_entry(&server, entry(FIRST, &parent, &[&me]))
        .await
        .unwrap();
    create_entry(&server, entry(KEPT, &parent, &[&me]))
        .await
        .unwrap();
    let (mut stream, _) = x509_stream_with(&agent, |m| sorted_ids(m) == [FIRST, KEPT]).await;
    let log = |what: &str| format!("{what}; agent log:\n{}", agent.log_text());

    // The next renewal's request is held in the relay.
    let renewals = || agent.log_text().matches("renewing the agent svid").count();
    let before = renewals();
    relay.hold(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while renewals() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            log("the agent never renewed its svid")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server
        .admin()
        .await
        .delete_entry(DeleteEntryRequest { id: first.id })
        .await
        .unwrap();
    let msg = next_x509_until(&mut stream, Duration::from_secs(10), |m| {
        !svid_ids(m).contains(&FIRST.to_owned())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{}",
            log(&format!(
                "the deleted entry's SVID stayed while the agent renewed its own: {e:?}"
            ))
        )
    });
    assert_eq!(sorted_ids(&msg), [KEPT], "{}", log("deleted"));

    // Released, the renewal ends, the agent syncs again with its new SVID, and what comes next
    // reaches the stream.
    relay.hold(false);
    create_entry(&server, entry(LAST, &parent, &[&me]))
        .await
        .unwrap();
    let msg = next_x509_until(&mut stream, Duration::from_secs(40), |m| {
        svid_ids(m).contains(&LAST.to_owned())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{}",
            log(&format!("the last entry's SVID never came: {e:?}"))
        )
    });
    assert_eq!(sorted_ids(&msg), [KEPT, LAST], "{}", log("last"));
    assert!(
        agent.log_text().contains("agent svid renewed"),
        "{}",
        log("renewed")
    );
}
