//! What an entry no longer grants leaves the agent at once, whatever the agent is minting: the
//! real server and agent, with a TCP relay between them that can hold what the agent sends. A
//! mint then stays in flight (its CSRs held) while the server's pushes on the sync stream still
//! arrive; a workload's stream must lose what was withdrawn before the mint ends: a renamed or
//! deleted entry's SVID, one minted for selectors its entry no longer has, and a revoked
//! session's SVID (with its serial on the CRL). A federated trust domain's new bundle does not
//! wait for the mint either.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::net::SocketAddr;
use std::time::Duration;

use sigil_core::TrustDomain;
use sigil_core::x509_bundle::X509Bundle;
use sigil_proto::admin::{DeleteEntryRequest, Entry, UpdateEntryRequest};
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
/// The hint that makes the agent mint an entry's SVID again.
const ROTATED: &str = "rotated";

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

/// A message without `id`.
fn lacks(id: &str) -> impl Fn(&X509svidResponse) -> bool + '_ {
    move |m| !svid_ids(m).iter().any(|s| s == id)
}

/// A server (with `config`), a relay to it, an agent that reaches the server only through the
/// relay, and entries for `ids` that this test's uid matches, once a workload stream of it
/// holds them all.
struct Setup {
    server: TestServer,
    relay: Relay,
    agent: TestAgentProcess,
    entries: Vec<Entry>,
    stream: tonic::Streaming<X509svidResponse>,
}

impl Setup {
    async fn start(config: &str, ids: &[&str]) -> Self {
        let server = TestServer::start(config);
        let relay = Relay::start(server.node_addr).await;
        let agent = TestAgentProcess::start_listing(&server, &[relay.address]).await;
        let mut entries = Vec::new();
        for id in ids {
            entries.push(self_entry(&server, &agent, id).await);
        }
        let mut wanted: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
        wanted.sort();
        let (stream, _) = x509_stream_with(&agent, |m| sorted_ids(m) == wanted).await;
        Self {
            server,
            relay,
            agent,
            entries,
            stream,
        }
    }

    /// The agent's log, after `what` went wrong.
    fn log(&self, what: &str) -> String {
        format!("{what}; agent log:\n{}", self.agent.log_text())
    }

    /// The next message of the stream that passes `wanted` within `within`; `failure` says what
    /// it means if none comes.
    async fn next(
        &mut self,
        within: Duration,
        failure: &str,
        wanted: impl Fn(&X509svidResponse) -> bool,
    ) -> X509svidResponse {
        match next_x509_until(&mut self.stream, within, wanted).await {
            Ok(msg) => msg,
            Err(e) => panic!("{}", self.log(&format!("{failure}: {e:?}"))),
        }
    }

    /// Replaces an entry through the admin API; returns it as stored.
    async fn update(&self, entry: Entry) -> Entry {
        self.server
            .admin()
            .await
            .update_entry(UpdateEntryRequest { entry: Some(entry) })
            .await
            .unwrap()
            .into_inner()
    }

    async fn delete(&self, entry: &Entry) {
        self.server
            .admin()
            .await
            .delete_entry(DeleteEntryRequest {
                id: entry.id.clone(),
            })
            .await
            .unwrap();
    }

    /// Holds the relay and gives `entry` a new hint: the agent mints it again, and that mint
    /// stays held. Returns once the agent has applied the change.
    async fn hold_a_mint(&self, entry: Entry) -> Entry {
        self.relay.hold(true);
        let mut hinted = entry;
        hinted.hint = ROTATED.to_owned();
        let hinted = self.update(hinted).await;
        self.applied(hinted.revision).await;
        hinted
    }

    /// Releases the relay: the held mint ends, and the stream gets `id`'s SVID with the new
    /// hint.
    async fn released(&mut self, id: &str) -> X509svidResponse {
        self.relay.hold(false);
        self.next(RELEASED_WITHIN, "the re-minted SVID never came", |m| {
            m.svids
                .iter()
                .any(|s| s.spiffe_id == id && s.hint == ROTATED)
        })
        .await
    }

    /// Waits until the agent's log says it applied the change at `revision` (its debug line).
    async fn applied(&self, revision: u64) {
        let line = format!("entry changes applied revision={revision}");
        self.agent
            .until_logged(
                Duration::from_secs(10),
                &format!("the change at revision {revision} never reached the agent"),
                |log| log.contains(&line),
            )
            .await;
    }
}

/// An entry for `id` under `agent` that this test's uid matches.
async fn self_entry(server: &TestServer, agent: &TestAgentProcess, id: &str) -> Entry {
    let me = format!("unix:uid:{}", my_uid());
    create_entry(server, entry(id, &agent.agent_id(), &[&me]))
        .await
        .unwrap()
}

const WITHIN: Duration = Duration::from_secs(10);

/// Long enough for a released call to end, and a failed round to be tried again.
const RELEASED_WITHIN: Duration = Duration::from_secs(40);

// The relay's tasks run while the test waits on the agent's start (which blocks its thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawals_do_not_wait_for_a_mint_in_flight() {
    let mut t = Setup::start("", &[FIRST, SECOND, KEPT]).await;

    // One change that both withdraws and needs a mint: the first entry now names another ID.
    // The CSR for it is held in the relay, so the mint cannot end.
    t.relay.hold(true);
    let mut renamed = t.entries[0].clone();
    renamed.spiffe_id = RENAMED.to_owned();
    let renamed = t.update(renamed).await;
    let msg = t
        .next(
            WITHIN,
            "the old ID stayed while its entry's new one was minted",
            lacks(FIRST),
        )
        .await;
    assert_eq!(sorted_ids(&msg), [KEPT, SECOND], "{}", t.log("withdrawn"));

    // A deletion that arrives while that mint is still in flight.
    t.delete(&t.entries[1]).await;
    let msg = t
        .next(
            WITHIN,
            "the deleted entry's SVID stayed while a mint was in flight",
            lacks(SECOND),
        )
        .await;
    assert_eq!(sorted_ids(&msg), [KEPT], "{}", t.log("deleted"));

    // The renamed entry, whose SVID is still being minted, no longer names this workload's uid:
    // what the held mint brings back was asked for the old selectors, and must not be served.
    let mut narrowed = renamed;
    narrowed.selectors = vec![format!("unix:uid:{}", my_uid().wrapping_add(1))];
    let narrowed = t.update(narrowed).await;
    t.applied(narrowed.revision).await;
    t.relay.hold(false);
    self_entry(&t.server, &t.agent, LAST).await;
    loop {
        let msg = t
            .next(RELEASED_WITHIN, "the last entry's SVID never came", |_| {
                true
            })
            .await;
        assert!(
            !svid_ids(&msg).contains(&RENAMED.to_owned()),
            "{}",
            t.log("an SVID minted for selectors its entry no longer has was served")
        );
        if svid_ids(&msg).contains(&LAST.to_owned()) {
            assert_eq!(sorted_ids(&msg), [KEPT, LAST], "{}", t.log("last"));
            break;
        }
    }
    // The held mint did come back (and was dropped): the agent's log names its result.
    assert!(
        t.agent
            .log_text()
            .contains("minted for an entry that changed or went meanwhile; dropped dropped=1"),
        "{}",
        t.log("no stale result")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_revoked_while_a_mint_is_held_leaves_the_stream() {
    const SESSION: &str = "spiffe://example.org/withdrawals/session";
    let mut t = Setup::start("", &[KEPT]).await;
    let session = open_session(&t.server, &t.agent, SESSION, "10m", &[]);
    let session_id = session["id"].as_str().unwrap().to_owned();
    let first = t
        .next(WITHIN, "the session's SVID never came", |m| {
            sorted_ids(m) == [KEPT, SESSION]
        })
        .await;
    let serial = leaf_serial(
        &first
            .svids
            .iter()
            .find(|s| s.spiffe_id == SESSION)
            .unwrap()
            .x509_svid,
    );

    // A new hint: the agent mints KEPT again, and that mint is held.
    t.hold_a_mint(t.entries[0].clone()).await;

    // The revocation reaches the stream while that mint is still held: the session's SVID
    // leaves, and its serial comes on the CRL.
    let revoked = server_cli(
        &t.server,
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
    let msg = t
        .next(
            WITHIN,
            "the revoked session stayed while a mint was held",
            lacks(SESSION),
        )
        .await;
    assert_eq!(sorted_ids(&msg), [KEPT], "{}", t.log("revoked"));
    // The CRL comes with that message or in one of its own (the server pushes it after).
    let listed = |m: &X509svidResponse| m.crl.iter().any(|c| crl_serials(c).contains(&serial));
    if !listed(&msg) {
        t.next(WITHIN, "the CRL waited for a held mint", listed)
            .await;
    }

    // Released, the mint ends and the new hint arrives.
    let msg = t.released(KEPT).await;
    assert_eq!(sorted_ids(&msg), [KEPT], "{}", t.log("rotated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_does_not_wait_for_the_agents_own_renewal() {
    // The agent renews its own SVID at half its life: 10 s after it attests, well after the
    // setup below.
    let mut t = Setup::start("agent_svid_ttl = \"20s\"", &[FIRST, KEPT]).await;

    // The next renewal's request is held in the relay.
    let renewals = |log: &str| log.matches("renewing the agent svid").count();
    let before = renewals(&t.agent.log_text());
    t.relay.hold(true);
    t.agent
        .until_logged(
            Duration::from_secs(30),
            "the agent never renewed its svid",
            |log| renewals(log) > before,
        )
        .await;
    t.delete(&t.entries[0]).await;
    let msg = t
        .next(
            WITHIN,
            "the deleted entry's SVID stayed while the agent renewed its own",
            lacks(FIRST),
        )
        .await;
    assert_eq!(sorted_ids(&msg), [KEPT], "{}", t.log("deleted"));

    // Released, what comes next reaches the stream (read all along, so it may come before the
    // renewal's answer), and the renewal ends.
    t.relay.hold(false);
    self_entry(&t.server, &t.agent, LAST).await;
    // Its mint may go out on the old connection and be refused once the new SVID is in use:
    // tried again within a second, not at the next renewal (10 s on).
    let msg = t
        .next(
            Duration::from_secs(5),
            "the last entry's SVID did not come soon",
            |m| svid_ids(m).contains(&LAST.to_owned()),
        )
        .await;
    assert_eq!(sorted_ids(&msg), [KEPT, LAST], "{}", t.log("last"));
    t.agent
        .until_logged(RELEASED_WITHIN, "the renewal never ended", |log| {
            log.contains("agent svid renewed")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_bundle_set_while_a_mint_is_held_reaches_the_stream() {
    const PARTNER: &str = "spiffe://partner.example";
    let mut t = Setup::start("", &[KEPT]).await;
    let dir = tempfile::tempdir().unwrap();
    openssl_ca(dir.path(), "partner-1");
    openssl_ca(dir.path(), "partner-2");
    let partner = |name: &str| {
        let path = dir.path().join(format!("{name}.pem"));
        let pem = std::fs::read(&path).unwrap();
        let der = X509Bundle::from_pem(TrustDomain::new(PARTNER).unwrap(), &pem)
            .unwrap()
            .to_der();
        (path.to_str().unwrap().to_owned(), der)
    };
    let (first_path, first_der) = partner("partner-1");
    let (second_path, second_der) = partner("partner-2");
    let set = |server: &TestServer, path: &str| {
        let set = server_cli(
            server,
            &[
                "bundle", "set", "--id", PARTNER, "--path", path, "--output", "json",
            ],
        )
        .json();
        assert_eq!(set["id"], "partner.example", "{set}");
    };
    set(&t.server, &first_path);
    let mut federating = t.entries[0].clone();
    federating.federates_with = vec![PARTNER.to_owned()];
    let federating = t.update(federating).await;
    let carries = |der: &[u8]| {
        let der = der.to_vec();
        move |m: &X509svidResponse| m.federated_bundles.get(PARTNER) == Some(&der)
    };
    t.next(
        WITHIN,
        "the partner's bundle never reached the stream",
        carries(&first_der),
    )
    .await;

    // A new hint: the agent mints KEPT again, and that mint is held.
    t.hold_a_mint(federating).await;

    // The partner's new bundle (its CA replaced, say after a compromise) reaches the stream
    // while that mint is still held.
    set(&t.server, &second_path);
    let msg = t
        .next(
            WITHIN,
            "the partner's new bundle waited for a held mint",
            carries(&second_der),
        )
        .await;
    assert_eq!(sorted_ids(&msg), [KEPT], "{}", t.log("new bundle"));

    // Released, the mint ends and the new hint arrives, with the new bundle.
    let msg = t.released(KEPT).await;
    assert!(carries(&second_der)(&msg), "{}", t.log("rotated"));
}
