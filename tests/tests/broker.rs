//! The session broker with the real binaries: server, agent and `sigil-broker` in front of a
//! TCP echo upstream. A session SVID gets through; an identity the policy refuses is cut after
//! the handshake and recorded as `broker.deny`; `session revoke` cuts the open connection; a new
//! connection with the revoked SVID is refused; a SIGHUP with a bad policy keeps the old one, one with a good policy applies it at once (live connections too);
//! the broker's events reach the audit chain once, name the session, and `audit verify` passes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil_core::tls::{SharedBundles, SpiffeServerVerifier};
use sigil_core::x509_svid::Authorizer;
use sigil_core::{SpiffeId, X509Bundle};
use sigil_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const BROKER: &str = "spiffe://example.org/broker/db";
const SESSION_ID: &str = "spiffe://example.org/admin/db";
const STANDING: &str = "spiffe://example.org/web";

const POLICY: &str = r#"
@id("sessions-only")
permit(principal is Sigil::Workload, action == Sigil::Action::"connect", resource == Sigil::Target::"db")
when { principal has session };
"#;

/// A `sigil-broker run` child with its config, policy and spool in a temp dir.
struct BrokerProcess {
    dir: tempfile::TempDir,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    address: SocketAddr,
}

impl BrokerProcess {
    fn start(server: &TestServer, agent: &TestAgentProcess) -> Self {
        Self::start_with(server, agent, "tcp", echo_server(), POLICY)
    }

    fn start_with(
        server: &TestServer,
        agent: &TestAgentProcess,
        kind: &str,
        upstream: SocketAddr,
        policy_text: &str,
    ) -> Self {
        Self::start_target(server, agent, kind, upstream, policy_text, "")
    }

    /// A broker with one target; `target_extra` is appended to its table.
    fn start_target(
        server: &TestServer,
        agent: &TestAgentProcess,
        kind: &str,
        upstream: SocketAddr,
        policy_text: &str,
        target_extra: &str,
    ) -> Self {
        Self::start_full(server, agent, kind, upstream, policy_text, "", target_extra)
    }

    /// As [`BrokerProcess::start_target`], with `top_extra` among the top-level keys.
    fn start_full(
        server: &TestServer,
        agent: &TestAgentProcess,
        kind: &str,
        upstream: SocketAddr,
        policy_text: &str,
        top_extra: &str,
        target_extra: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("db.cedar");
        std::fs::write(&policy, policy_text).unwrap();
        let config = dir.path().join("broker.toml");
        std::fs::write(
            &config,
            format!(
                r#"socket_path = "unix://{socket}"
spiffe_id = "{BROKER}"
server_address = ["{server}"]
spool_dir = "{spool}"
log_level = "debug"
log_format = "json"
{top_extra}

[[target]]
name = "db"
listen = "127.0.0.1:0"
kind = "{kind}"
upstream = "{upstream}"
policy = "{policy}"
{target_extra}
"#,
                socket = agent.socket().display(),
                server = server.node_addr,
                spool = dir.path().join("spool").display(),
                policy = policy.display(),
            ),
        )
        .unwrap();
        let (child, log, address) = spawn(&config);
        Self {
            dir,
            child,
            log,
            address,
        }
    }

    /// Kills the broker with SIGKILL (as a crash) and starts it again on the same spool.
    fn kill9_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, log, address) = spawn(&self.dir.path().join("broker.toml"));
        self.child = child;
        self.log = log;
        self.address = address;
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("db.cedar")
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits until the log has a line containing `needle`.
    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the broker log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `sigil-broker run --config CONFIG`; returns it, its log and its target's address.
fn spawn(config: &Path) -> (Child, Arc<Mutex<Vec<String>>>, SocketAddr) {
    let mut child = retry_busy(|| {
        Command::new(binary("sigil-broker"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    });
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("target listening") {
                    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let _ = tx.send(json["fields"]["address"].as_str().unwrap().to_owned());
                }
                log.lock().unwrap().push(line);
            }
        });
    }
    let address = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("broker did not listen: {}", log.lock().unwrap().join("\n")))
        .parse()
        .unwrap();
    (child, log, address)
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP echo server on a thread of its own; returns its address.
fn echo_server() -> SocketAddr {
    counting_echo_server().0
}

/// A TCP echo server that counts the connections it accepted.
fn counting_echo_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    (address, accepted)
}

type Client = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// An mTLS connection to the broker with the X509-SVID `spiffe_id` of `msg`.
async fn connect(
    broker: SocketAddr,
    msg: &sigil_proto::workload::X509svidResponse,
    spiffe_id: &str,
) -> std::io::Result<Client> {
    let svid = msg.svids.iter().find(|s| s.spiffe_id == spiffe_id).unwrap();
    let bundle = X509Bundle::from_der(trust_domain(), &svid.bundle).unwrap();
    connect_trusting(broker, msg, spiffe_id, bundle).await
}

/// As [`connect`], checking the broker's SVID against `bundle` (the broker's trust domain's).
async fn connect_trusting(
    broker: SocketAddr,
    msg: &sigil_proto::workload::X509svidResponse,
    spiffe_id: &str,
    bundle: X509Bundle,
) -> std::io::Result<Client> {
    let svid = msg.svids.iter().find(|s| s.spiffe_id == spiffe_id).unwrap();
    let chain: Vec<CertificateDer<'static>> = certs(&svid.x509_svid);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.clone()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            SharedBundles::from_bundle(bundle),
            Authorizer::exact(SpiffeId::new(BROKER).unwrap()),
        )))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(broker).await?;
    connector
        .connect(ServerName::try_from("broker").unwrap(), tcp)
        .await
}

/// Writes `text` and reads it back: the connection goes through to the echo upstream.
async fn echoes(client: &mut Client, text: &[u8]) -> bool {
    // A TLS stream may hold what it was given until flushed.
    if client.write_all(text).await.is_err() || client.flush().await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; text.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && buf == text
}

/// Waits (at most 10 s) until the connection ends: a read returns EOF or an error.
async fn ends(client: &mut Client) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection was not cut within 10 s"),
        }
    }
}

/// Waits (at most 15 s) until `audit show --session ID` holds `action` with `reason`.
fn wait_story(server: &TestServer, id: &str, action: &str, reason: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let story = server_cli(
            server,
            &["audit", "show", "--session", id, "--output", "json"],
        )
        .json_lines();
        if story
            .iter()
            .any(|r| r["action"] == action && r["details"]["reason"] == reason)
        {
            return story;
        }
        assert!(
            Instant::now() < deadline,
            "no {action} in the session's story: {story:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spool_pending(dir: &Path) -> usize {
    let acked: u64 = std::fs::read_to_string(dir.join("spool/acked"))
        .map(|t| t.trim().parse().unwrap())
        .unwrap_or(0);
    std::fs::read_to_string(dir.join("spool/events.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
                > acked
        })
        .count()
}

/// A server that lists the broker in `audit_sources` (then `extra`), its agent, and entries
/// granting `ids` to this process's uid.
async fn deployment(extra: &str, ids: &[&str]) -> (TestServer, TestAgentProcess) {
    let server = TestServer::start(&format!("audit_sources = [\"{BROKER}\"]\n{extra}"));
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    for id in ids {
        create_entry(&server, entry(id, &agent.agent_id(), &[&me]))
            .await
            .unwrap();
    }
    (server, agent)
}

/// Waits until the agent serves every ID of `ids` to this process and `broker` has its
/// credentials; returns the open stream and its message.
async fn serving(
    agent: &TestAgentProcess,
    broker: &BrokerProcess,
    ids: &[&str],
) -> (
    tonic::Streaming<sigil_proto::workload::X509svidResponse>,
    sigil_proto::workload::X509svidResponse,
) {
    let served = x509_stream_with(agent, |m| {
        ids.iter().all(|id| svid_ids(m).contains(&(*id).to_owned()))
    })
    .await;
    broker.wait_log("credentials updated");
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_get_through_are_cut_on_revoke_and_every_step_is_in_the_chain() {
    let (server, agent) = deployment("", &[BROKER, STANDING]).await;
    let session = open_session(&server, &agent, SESSION_ID, "10m", &[]);
    let session_id = session["id"].as_str().unwrap().to_owned();
    let (upstream, upstream_connections) = counting_echo_server();
    let upstream_count = || upstream_connections.load(std::sync::atomic::Ordering::SeqCst);
    let broker = BrokerProcess::start_with(&server, &agent, "tcp", upstream, POLICY);
    let (_stream, msg) = serving(&agent, &broker, &[BROKER, SESSION_ID, STANDING]).await;

    // The session's SVID gets through, both ways.
    let mut client = connect(broker.address, &msg, SESSION_ID).await.unwrap();
    assert!(
        echoes(&mut client, b"select 1;").await,
        "{}",
        broker.log_text()
    );

    // A standing identity: the policy wants a session, so the broker cuts it after the
    // handshake, before anything reaches the upstream.
    assert_eq!(upstream_count(), 1);
    if let Ok(mut standing) = connect(broker.address, &msg, STANDING).await {
        assert!(!echoes(&mut standing, b"drop table").await);
    }
    broker.wait_log("connection denied by policy");
    assert_eq!(
        upstream_count(),
        1,
        "a denied peer never reaches the upstream"
    );

    // A SIGHUP with a policy that does not validate keeps the one in force.
    std::fs::write(broker.policy_path(), "permit(principal, action, resource").unwrap();
    broker.signal("HUP");
    broker.wait_log("policy not reloaded");
    let mut second = connect(broker.address, &msg, SESSION_ID).await.unwrap();
    assert!(echoes(&mut second, b"still allowed").await);
    drop(second);

    // Revoking the session cuts the open connection.
    server_cli(
        &server,
        &["session", "revoke", &session_id, "--reason", "task over"],
    );
    let cut_after = ends(&mut client).await;
    eprintln!("revoke to cut: {cut_after:?}");
    broker.wait_log("\"reason\":\"revoked\"");

    // The revoked SVID no longer gets a connection through, nor reaches the upstream.
    let before = upstream_count();
    match connect(broker.address, &msg, SESSION_ID).await {
        Err(_) => {}
        Ok(mut again) => assert!(!echoes(&mut again, b"after revoke").await),
    }
    assert_eq!(upstream_count(), before);

    // The story: open, issuance, the connections, the revocation and the cut, each once.
    let story = wait_story(&server, &session_id, "broker.connection.close", "revoked");
    let actions: Vec<&str> = story
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions
            .iter()
            .filter(|a| **a == "broker.connection.open")
            .count(),
        2,
        "{actions:?}"
    );
    let cut = story
        .iter()
        .find(|r| r["action"] == "broker.connection.close" && r["details"]["reason"] == "revoked")
        .unwrap_or_else(|| panic!("no cut in {story:#?}"));
    assert_eq!(cut["actor"], BROKER);
    assert_eq!(cut["subject"], "db");
    assert_eq!(cut["details"]["ticket"], "CHG-123");
    assert!(cut["details"]["bytes_up"].as_u64().unwrap() >= 9);
    let position = |pred: &dyn Fn(&serde_json::Value) -> bool| story.iter().position(pred).unwrap();
    assert!(
        position(&|r| r["action"] == "session.revoke")
            < position(&|r| r["action"] == "broker.connection.close"
                && r["details"]["reason"] == "revoked"),
        "{actions:?}"
    );
    let denies = server_cli(
        &server,
        &[
            "audit",
            "show",
            "--actor",
            BROKER,
            "--action",
            "broker.deny",
            "--output",
            "json",
        ],
    )
    .json_lines();
    assert!(
        denies
            .iter()
            .any(|r| r["details"]["peer_spiffe_id"] == STANDING
                && r["details"]["reason"] == "policy"),
        "{denies:#?}"
    );
    let verified = server_cli(&server, &["audit", "verify", "--output", "json"]).json();
    assert_eq!(verified["ok"], true, "{verified}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while spool_pending(broker.dir.path()) > 0 {
        assert!(Instant::now() < deadline, "the spool never emptied");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Once everything arrived: nothing was let through after the revocation.
    let story = server_cli(
        &server,
        &[
            "audit",
            "show",
            "--session",
            &session_id,
            "--output",
            "json",
        ],
    )
    .json_lines();
    let revoked_at = story
        .iter()
        .position(|r| r["action"] == "session.revoke")
        .unwrap();
    assert!(
        story[revoked_at..]
            .iter()
            .all(|r| r["action"] != "broker.connection.open"),
        "{story:#?}"
    );
}

/// The spool's last sequence (its events log is never compacted in a test this small).
fn spool_last(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("spool/events.log"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_server_down_and_a_broker_crash_every_event_reaches_the_chain_once() {
    let (mut server, agent) = deployment("", &[BROKER]).await;
    open_session(&server, &agent, SESSION_ID, "10m", &[]);
    let mut broker = BrokerProcess::start(&server, &agent);
    let (_stream, msg) = serving(&agent, &broker, &[BROKER, SESSION_ID]).await;
    let through = |broker: SocketAddr, text: &'static [u8]| {
        let msg = msg.clone();
        async move {
            let mut client = connect(broker, &msg, SESSION_ID).await.unwrap();
            assert!(echoes(&mut client, text).await);
            client.shutdown().await.unwrap();
            ends(&mut client).await;
        }
    };
    // Each connection leaves an open and a close in the spool; the close is written just after
    // the client sees the end, so wait for it before counting on it.
    let spooled = |broker: &BrokerProcess, count: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while spool_last(broker.dir.path()) < count {
            assert!(Instant::now() < deadline, "{}", broker.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    through(broker.address, b"before the outage").await;
    spooled(&broker, 2);

    // The server goes away: requests still go through, their events wait in the spool.
    server.kill9();
    for _ in 0..3 {
        through(broker.address, b"during the outage").await;
    }
    spooled(&broker, 8);
    // The broker crashes and comes back on the same spool; more traffic.
    broker.kill9_and_restart();
    broker.wait_log("credentials updated");
    through(broker.address, b"after the crash").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !broker.log_text().contains("cannot forward audit events") {
        assert!(Instant::now() < deadline, "{}", broker.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(spool_pending(broker.dir.path()) > 0);

    // The server comes back: the spool drains, every event lands once, in order.
    server.restart();
    // 5 connections: an open and a close each (the last close may still be on its way).
    let deadline = Instant::now() + Duration::from_secs(20);
    while spool_last(broker.dir.path()) < 10 || spool_pending(broker.dir.path()) > 0 {
        assert!(
            Instant::now() < deadline,
            "the spool never drained: {}",
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = spool_last(broker.dir.path());
    assert_eq!(last, 10);
    let records = server_cli(
        &server,
        &["audit", "show", "--actor", BROKER, "--output", "json"],
    )
    .json_lines();
    let sequences: Vec<u64> = records
        .iter()
        .map(|r| r["details"]["source_sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(
        sequences,
        (1..=last).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let spools: std::collections::HashSet<&str> = records
        .iter()
        .map(|r| r["details"]["source_spool"].as_str().unwrap())
        .collect();
    assert_eq!(spools.len(), 1, "the spool kept its id across the crash");
    let verified = server_cli(&server, &["audit", "verify", "--output", "json"]).json();
    assert_eq!(verified["ok"], true, "{verified}");
}

/// A minimal HTTP/1.1 upstream on a thread of its own: every request (headers only) gets
/// `200` with the body `you asked for <PATH>`, on a kept-alive connection.
fn http_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = request_line.split(' ').nth(1).unwrap_or("").to_owned();
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 {
                            return;
                        }
                        if header == "\r\n" {
                            break;
                        }
                    }
                    let body = format!("you asked for {path}");
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if std::io::Write::write_all(&mut writer, response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

/// Sends one request on `client` and reads the response: status and body.
async fn request(client: &mut Client, method: &str, path: &str) -> (u16, String) {
    let text = format!("{method} {path} HTTP/1.1\r\nhost: db\r\n\r\n");
    client.write_all(text.as_bytes()).await.unwrap();
    client.flush().await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("no response within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&received).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .map_or(0, |v| v.trim().parse().unwrap());
            if body.len() >= length {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                return (status, body[..length].to_owned());
            }
        }
    }
}

const HTTP_POLICY: &str = r#"
@id("session-reads")
permit(principal is Sigil::Workload, action == Sigil::Action::"GET", resource == Sigil::Target::"db")
when { principal has session && context.path like "/tables*" };
"#;

/// Added by a SIGHUP in the middle of the HTTP test.
const HTTP_DELETES: &str = r#"
@id("session-deletes")
permit(principal is Sigil::Workload, action == Sigil::Action::"DELETE", resource == Sigil::Target::"db")
when { principal has session && context.path like "/tables/*" };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_decided_one_by_one_and_an_idle_keep_alive_is_cut_on_revoke() {
    let (server, agent) = deployment("", &[BROKER, STANDING]).await;
    let session = open_session(&server, &agent, SESSION_ID, "10m", &[]);
    let session_id = session["id"].as_str().unwrap().to_owned();
    let broker = BrokerProcess::start_with(&server, &agent, "http", http_server(), HTTP_POLICY);
    let (_stream, msg) = serving(&agent, &broker, &[BROKER, SESSION_ID, STANDING]).await;

    let mut client = connect(broker.address, &msg, SESSION_ID).await.unwrap();
    assert_eq!(
        request(&mut client, "GET", "/tables/7").await,
        (200, "you asked for /tables/7".to_owned())
    );
    // On the same connection: what the policy does not allow gets 403, and the connection
    // carries on.
    assert_eq!(request(&mut client, "DELETE", "/tables/7").await.0, 403);
    assert_eq!(request(&mut client, "GET", "/users").await.0, 403);
    assert_eq!(request(&mut client, "BREW", "/tables").await.0, 403);
    assert_eq!(request(&mut client, "GET", "/tables").await.0, 200);

    let mut standing = connect(broker.address, &msg, STANDING).await.unwrap();
    assert_eq!(request(&mut standing, "GET", "/tables").await.0, 403);

    // A SIGHUP with a valid policy takes effect at once, on the live connection too.
    std::fs::write(
        broker.policy_path(),
        format!("{HTTP_POLICY}\n{HTTP_DELETES}"),
    )
    .unwrap();
    broker.signal("HUP");
    broker.wait_log("SIGHUP: policy reloaded");
    assert_eq!(request(&mut client, "DELETE", "/tables/7").await.0, 200);
    assert_eq!(request(&mut client, "DELETE", "/users/7").await.0, 403);

    // The session's connection is now idle (keep-alive); the revocation cuts it.
    server_cli(
        &server,
        &["session", "revoke", &session_id, "--reason", "task over"],
    );
    ends(&mut client).await;

    let story = wait_story(&server, &session_id, "broker.connection.close", "revoked");
    let of = |action: &str| -> Vec<&serde_json::Value> {
        story.iter().filter(|r| r["action"] == action).collect()
    };
    let requests = of("broker.request");
    assert_eq!(requests.len(), 3, "{story:#?}");
    assert_eq!(requests[0]["details"]["method"], "GET");
    assert_eq!(requests[0]["details"]["path"], "/tables/7");
    assert_eq!(requests[0]["details"]["policies"][0], "session-reads");
    assert_eq!(requests[2]["details"]["method"], "DELETE");
    assert_eq!(requests[2]["details"]["policies"][0], "session-deletes");
    let responses = of("broker.response");
    assert_eq!(responses.len(), 3, "{story:#?}");
    assert_eq!(responses[0]["details"]["status"], 200);
    assert!(responses[0]["details"]["latency_us"].as_u64().is_some());
    let denies = of("broker.deny");
    assert_eq!(denies.len(), 4, "{story:#?}");
    assert!(denies.iter().all(|d| d["details"]["status"] == 403));
    assert!(denies.iter().any(|d| d["details"]["method"] == "DELETE"));
    let verified = server_cli(&server, &["audit", "verify", "--output", "json"]).json();
    assert_eq!(verified["ok"], true, "{verified}");
}

const ANYONE: &str = r#"permit(principal, action == Sigil::Action::"connect", resource);"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_own_svid_rotates_without_dropping_a_connection() {
    // The broker's SVID lives 20 s (renewed about every 10 s); the client's 60 s.
    let (server, agent) = deployment(
        "ca_ttl = \"6m\"\ndefault_x509_svid_ttl = \"20s\"\ndefault_jwt_svid_ttl = \"1m\"\nsession_svid_ttl = \"1m\"",
        &[BROKER],
    )
    .await;
    let me = format!("unix:uid:{}", my_uid());
    let mut standing = entry(STANDING, &agent.agent_id(), &[&me]);
    standing.x509_svid_ttl = 60;
    create_entry(&server, standing).await.unwrap();
    let broker = BrokerProcess::start_with(&server, &agent, "tcp", echo_server(), ANYONE);
    let (_stream, msg) = serving(&agent, &broker, &[BROKER, STANDING]).await;
    let mut client = connect(broker.address, &msg, STANDING).await.unwrap();
    assert!(echoes(&mut client, b"before the rotation").await);
    let served = |c: &Client| serial_of(c.get_ref().1.peer_certificates().unwrap()[0].as_ref());
    let first = served(&client);

    // New handshakes get the broker's next SVID...
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_stream, fresh) =
            x509_stream_with(&agent, |m| svid_ids(m).contains(&STANDING.to_owned())).await;
        let probe = connect(broker.address, &fresh, STANDING).await.unwrap();
        if served(&probe) != first {
            break;
        }
        assert!(Instant::now() < deadline, "the broker's SVID never rotated");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // ...and the connection made with the old one carries on.
    assert!(echoes(&mut client, b"after the rotation").await);
    assert!(!broker.log_text().contains("\"reason\":\"shutdown\""));
}

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    sigil_core::hex::encode(cert.raw_serial())
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_upstream_presents_the_brokers_svid_to_exactly_the_expected_id() {
    const DB: &str = "spiffe://example.org/db";
    let (server, agent) = deployment("", &[BROKER, DB, STANDING]).await;
    let (_stream, msg) = x509_stream_with(&agent, |m| svid_ids(m).len() == 3).await;
    // The upstream: the mTLS example server as DB, allowing only the broker (so an answer
    // proves the broker presented its own SVID).
    let mut upstream = Kill(
        Command::new(binary("mtls-server"))
            .arg("--socket-path")
            .arg(agent.socket())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--svid",
                DB,
                "--allow-id",
                BROKER,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(upstream.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let upstream_addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();

    let tls_to = |id: &str| format!("upstream_tls = true\nupstream_spiffe_id = \"{id}\"");
    let broker =
        BrokerProcess::start_target(&server, &agent, "tcp", upstream_addr, ANYONE, &tls_to(DB));
    broker.wait_log("credentials updated");
    let mut client = connect(broker.address, &msg, STANDING).await.unwrap();
    client.write_all(b"hello\n").await.unwrap();
    client.flush().await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        answer.contains(&format!("hello {BROKER}")),
        "{answer}\n{}",
        broker.log_text()
    );

    // A broker that expects another ID at the upstream refuses to talk to this one.
    let wrong = BrokerProcess::start_target(
        &server,
        &agent,
        "tcp",
        upstream_addr,
        ANYONE,
        &tls_to("spiffe://example.org/elsewhere"),
    );
    wrong.wait_log("credentials updated");
    let mut client = connect(wrong.address, &msg, STANDING).await.unwrap();
    let _ = client.write_all(b"hello\n").await;
    let _ = client.flush().await;
    ends(&mut client).await;
    wrong.wait_log("upstream unreachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_s_end_cuts_its_connection_and_a_shutdown_records_every_close() {
    let (server, agent) = deployment("", &[BROKER, STANDING]).await;
    // The session's SVID is minted on demand (the broker's own Workload API stream asks first,
    // for the same uid): minted 2 s after the open with a 19 s TTL, it is capped at the
    // session's end, which is then what ends the connection.
    let session = open_session(&server, &agent, SESSION_ID, "20s", &["--svid-ttl", "19s"]);
    let session_id = session["id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_secs(2));
    let mut broker = BrokerProcess::start_with(&server, &agent, "tcp", echo_server(), ANYONE);
    let (_stream, msg) = serving(&agent, &broker, &[BROKER, SESSION_ID, STANDING]).await;

    // The session's connection ends with the session, and says so.
    let mut client = connect(broker.address, &msg, SESSION_ID).await.unwrap();
    assert!(echoes(&mut client, b"while the session lasts").await);
    let mut standing = connect(broker.address, &msg, STANDING).await.unwrap();
    assert!(echoes(&mut standing, b"standing").await);
    let started = Instant::now();
    let mut buf = [0u8; 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), client.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the session's end did not cut its connection"),
        }
    }
    eprintln!("cut {:?} after the first echo", started.elapsed());
    broker.wait_log("\"reason\":\"session_ended\"");
    wait_story(
        &server,
        &session_id,
        "broker.connection.close",
        "session_ended",
    );

    // SIGTERM with a connection open: it is cut, and its close is in the spool first.
    broker.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the broker did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(broker.dir.path().join("spool/events.log")).unwrap();
    let closes: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["action"] == "broker.connection.close")
        .collect();
    assert!(
        closes.iter().any(|e| e["details"]["reason"] == "shutdown"),
        "{closes:#?}"
    );
    drop(standing);
}

const PARTNER: &str = "spiffe://ledger.example/client";

/// Federated peers, when the broker is told to accept them: a workload of another trust domain
/// gets through (its chain checked against its own trust domain's bundle, the policy deciding
/// on its trust domain); a broker not told to refuses it; deleting the relationship cuts its
/// live connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_peers_get_through_when_told_to_and_are_cut_when_the_relationship_ends() {
    let federating = "bundle_endpoint_address = \"127.0.0.1:0\"\nfederation_min_poll = \"1s\"\nbundle_endpoint_refresh_hint = \"1s\"\n";
    let (server, agent) = deployment(federating, &[]).await;
    let ledger = TestServer::start_in("ledger.example", federating, &[]);
    let ledger_agent = TestAgentProcess::start(&ledger).await;
    let me = format!("unix:uid:{}", my_uid());
    create_entry(&ledger, entry(PARTNER, &ledger_agent.agent_id(), &[&me]))
        .await
        .unwrap();
    // This trust domain federates with the ledger's; the broker's entry says so.
    let dir = tempfile::tempdir().unwrap();
    let created = federate(
        &server,
        &ledger,
        "spiffe://ledger.example/sigil/server",
        dir.path(),
    )
    .await;
    assert!(
        created.status.success(),
        "{}{}",
        created.stdout,
        created.stderr
    );
    let broker_entry = server_cli(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            BROKER,
            "--parent-id",
            &agent.agent_id(),
            "--selector",
            &me,
            "--federates-with",
            "ledger.example",
        ],
    );
    assert!(broker_entry.status.success(), "{}", broker_entry.stderr);
    let policy = r#"permit(principal, action == Sigil::Action::"connect", resource)
when { principal.trust_domain == "ledger.example" };"#;
    let broker = BrokerProcess::start_full(
        &server,
        &agent,
        "tcp",
        echo_server(),
        policy,
        "federated_trust_domains = [\"ledger.example\"]",
        "",
    );
    // The broker has the ledger's bundle once its credentials say so.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !broker.log_text().contains("\"federated\":1") {
        assert!(Instant::now() < deadline, "{}", broker.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_stream, partner) = x509_stream_with(&ledger_agent, |m| svid_ids(m) == [PARTNER]).await;
    let ours = server.bundle().await;
    let mut client = connect_trusting(broker.address, &partner, PARTNER, ours.clone())
        .await
        .unwrap();
    assert!(
        echoes(&mut client, b"across trust domains").await,
        "{}",
        broker.log_text()
    );

    // A broker not told to accept the ledger's trust domain refuses the same peer.
    let strict = BrokerProcess::start_with(&server, &agent, "tcp", echo_server(), policy);
    strict.wait_log("credentials updated");
    let refused = match connect_trusting(strict.address, &partner, PARTNER, ours.clone()).await {
        Err(_) => true,
        Ok(mut c) => !echoes(&mut c, b"x").await,
    };
    assert!(refused, "{}", strict.log_text());

    // The relationship ends: the bundle leaves the broker and the live connection is cut.
    let deleted = server_cli(&server, &["federation", "delete", "--id", "ledger.example"]);
    assert!(deleted.status.success(), "{}", deleted.stderr);
    ends(&mut client).await;
    broker.wait_log("no longer trusted cut");
    // And a new connection of the ledger's workload is refused.
    let refused = match connect_trusting(broker.address, &partner, PARTNER, ours).await {
        Err(_) => true,
        Ok(mut c) => !echoes(&mut c, b"x").await,
    };
    assert!(refused, "{}", broker.log_text());
}
