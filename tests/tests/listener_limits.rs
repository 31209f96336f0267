//! The agent-facing API's limits hold before authentication, with the real server and agent:
//! clients without a certificate hold 64 TLS connections open at once, each flooded with
//! thousands of HTTP/2 streams (each an `AttestAgent` call whose body never ends), and open new
//! ones as the server closes them; the server's memory grows by less than 64 MiB and a real
//! agent renews its SVID during the flood.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use sigil_core::tls::{SharedBundles, SpiffeServerVerifier};
use sigil_core::x509_svid::Authorizer;
use sigil_proto::admin::AgentRequest;
use sigil_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Streams opened per connection.
const STREAMS_PER_CONNECTION: u32 = 5_000;

/// How long the flood lasts: two renewals of a 10 s agent SVID.
const FLOOD: Duration = Duration::from_secs(12);

/// Connections flooding at once.
const CONCURRENT: usize = 64;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK block of literal fields without indexing (RFC 7541 section 6.2.2).
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        out.push(u8::try_from(name.len()).unwrap());
        out.extend_from_slice(name.as_bytes());
        out.push(u8::try_from(value.len()).unwrap());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// One connection without a client certificate: the preface, then `STREAMS_PER_CONNECTION`
/// `AttestAgent` streams, each with a gRPC message prefix announcing 1 MiB and 1 KiB of it,
/// then held open until `until`. Returns how many streams were written before the server
/// closed the connection (0 if it closed it at once).
async fn flood_one_connection(
    addr: std::net::SocketAddr,
    bundle: sigil_core::X509Bundle,
    until: Instant,
) -> u32 {
    let verifier = SpiffeServerVerifier::new(
        SharedBundles::from_bundle(bundle),
        Authorizer::exact(server_id()),
    );
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(verifier))
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let Ok(tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("sigil-server").unwrap(), tcp)
        .await
    else {
        return 0;
    };
    let (mut read, mut write) = tokio::io::split(tls);
    // Whatever the server says (settings, resets, GOAWAY) is read and dropped, until it
    // closes the connection.
    let mut reader = tokio::spawn(async move {
        let mut buf = vec![0; 64 * 1024];
        while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    let block = header_block(&[
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/sigil.node.v1.Node/AttestAgent"),
        (":authority", "sigil-server"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    let mut data = vec![0u8, 0, 0x10, 0, 0];
    data.resize(5 + 1024, 7);
    let mut written = 0;
    for i in 0..STREAMS_PER_CONNECTION {
        let stream = 2 * i + 1;
        out.extend(frame(0x1, 0x4, stream, &block));
        out.extend(frame(0x0, 0, stream, &data));
        if out.len() > 256 * 1024 || i + 1 == STREAMS_PER_CONNECTION {
            if write.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
            written = i + 1;
        }
    }
    // Held open (as long as the server keeps it) to the end of the flood.
    let _ = tokio::time::timeout_at(until.into(), &mut reader).await;
    reader.abort();
    drop(write);
    written
}

/// `CONCURRENT` connections at once, each replaced when it ends, until `until`; returns
/// (connections, streams written).
async fn flood(
    addr: std::net::SocketAddr,
    bundle: &sigil_core::X509Bundle,
    until: Instant,
) -> (u32, u32) {
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let bundle = bundle.clone();
            tokio::spawn(async move {
                let (mut connections, mut streams) = (0, 0);
                while Instant::now() < until {
                    streams += flood_one_connection(addr, bundle.clone(), until).await;
                    connections += 1;
                }
                (connections, streams)
            })
        })
        .collect();
    let mut total = (0, 0);
    for task in tasks {
        let (c, s) = task.await.unwrap();
        total.0 += c;
        total.1 += s;
    }
    total
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn agent_serial(server: &TestServer, agent: &TestAgentProcess) -> String {
    server
        .admin()
        .await
        .get_agent(AgentRequest {
            spiffe_id: agent.agent_id(),
        })
        .await
        .unwrap()
        .into_inner()
        .serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_without_a_certificate_costs_little_and_agents_keep_renewing() {
    let server = TestServer::start(
        "ca_ttl = \"1m\"\ndefault_x509_svid_ttl = \"10s\"\ndefault_jwt_svid_ttl = \"10s\"\nagent_svid_ttl = \"10s\"",
    );
    let agent = TestAgentProcess::start(&server).await;
    let bundle = server.bundle().await;
    // Warm up: a second's worth, so that the allocator's arenas exist before measuring.
    flood(
        server.node_addr,
        &bundle,
        Instant::now() + Duration::from_secs(1),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(server.pid());
    let serial_before = agent_serial(&server, &agent).await;

    let pid = server.pid();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        let start = Instant::now();
        while start.elapsed() < FLOOD + Duration::from_secs(2) {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    });
    let (connections, streams) = flood(server.node_addr, &bundle, Instant::now() + FLOOD).await;
    let peak = sampler.await.unwrap();
    let serial_after = agent_serial(&server, &agent).await;
    eprintln!(
        "flood: {connections} connections, {streams} streams written; server rss {before} KiB before, {peak} KiB at peak (+{} KiB)",
        peak.saturating_sub(before)
    );
    assert!(connections > 0 && streams >= STREAMS_PER_CONNECTION);
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "server rss grew from {before} KiB to {peak} KiB"
    );
    assert_ne!(
        serial_before,
        serial_after,
        "the agent renewed during the flood; agent log:\n{}",
        agent.log_text()
    );
}
