//! A real peer for issuance, side by side: CloudFlare's `cfssl serve` (Debian's
//! `golang-cfssl`) signing the same kind of CSRs over HTTP, under the same client concurrency
//! as Sigil's several-agent load, in the same run.
//!
//! The figure compared is certificates per CPU-second of the signer's process (`/proc/PID/stat`,
//! as for Sigil's server). What each side does per certificate differs, and the row says so:
//! cfssl parses the CSR, checks its signature, and signs a certificate from its default profile,
//! one CSR per HTTP request, logging at warning level only; Sigil also authorizes the entry
//! against the calling agent, builds the certificate from the entry (not the CSR), and makes
//! an audit record durable before it answers, for 100 CSRs per gRPC call over mTLS.
//!
//! Skipped with a notice when `cfssl` is not on the `PATH`, and in `--quick` runs (CI does not
//! install it).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use tokio::task::JoinSet;

use crate::Harness;
use crate::report::{Row, rate, thousands};

/// The row's name.
const NAME: &str = "1. Issuance peer: cfssl (`cfssl serve`, POST /api/v1/cfssl/sign, one CSR per request, no audit record), certificates per CPU-second of its process";

/// Distinct CSRs the clients cycle through.
const CSRS: usize = 100;

/// Measures `cfssl serve` under `callers` clients for the plan's issuance time and adds a row
/// comparing Sigil's `sigil_rate` (SVIDs per server CPU-second under the same number of callers)
/// with it.
pub(crate) async fn issuance(
    h: &mut Harness,
    callers: usize,
    sigil_rate: f64,
) -> anyhow::Result<()> {
    if h.plan.quick {
        h.rows.push(Row::info(
            NAME,
            "skipped in --quick runs (full runs only)",
            "",
            None,
        ));
        return Ok(());
    }
    let Some(cfssl) = which("cfssl") else {
        h.note(
            "issuance: cfssl is not installed (apt-get install golang-cfssl); its row is skipped",
        );
        h.rows.push(Row::info(
            NAME,
            "skipped: cfssl is not installed (apt-get install golang-cfssl)",
            "",
            None,
        ));
        return Ok(());
    };
    h.note(&format!(
        "issuance: the same load on cfssl serve, {callers} clients, for {:?}",
        h.plan.issuance_time
    ));
    let dir = h.dir.path().join("cfssl");
    std::fs::create_dir_all(&dir).context("cannot create the cfssl directory")?;
    write_ca(&dir)?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("cfssl.log")).context("cannot create cfssl.log")?;
    let mut child = tokio::process::Command::new(&cfssl)
        .arg("serve")
        .arg("-ca")
        .arg(dir.join("ca.pem"))
        .arg("-ca-key")
        .arg(dir.join("ca-key.pem"))
        .args(["-address", "127.0.0.1", "-port", &port.to_string()])
        // Warnings and errors only: its INFO lines (three per request) would be most of its CPU.
        .args(["-loglevel", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("cannot start cfssl serve")?;
    let pid = child.id().context("cfssl serve exited at once")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let outcome = measure(h, addr, pid, callers).await;
    let _ = child.kill().await;
    let (signed, wall, cpu) = outcome.with_context(|| {
        format!(
            "cfssl serve failed; its log: {}",
            std::fs::read_to_string(dir.join("cfssl.log")).unwrap_or_default()
        )
    })?;
    let cfssl_rate = signed as f64 / cpu.as_secs_f64().max(1e-3);
    let ratio = sigil_rate / cfssl_rate;
    h.rows.push(
        Row::info(
            NAME,
            format!(
                "Sigil, {callers} agents (above): {} per server CPU-second",
                rate(sigil_rate)
            ),
            format!(
                "cfssl 1.2.0, {callers} clients: {} ({} in {}; CPU {})",
                rate(cfssl_rate),
                thousands(signed),
                crate::report::duration(wall),
                crate::report::duration(cpu)
            ),
            Some(ratio),
        )
        .target("Sigil ≥ 3x cfssl", ratio >= 3.0),
    );
    Ok(())
}

/// Drives `cfssl serve` at `addr` (process `pid`): waits for it, warms it up, then `callers`
/// clients for the plan's issuance time. Certificates signed, wall time, and its CPU time.
async fn measure(
    h: &Harness,
    addr: SocketAddr,
    pid: u32,
    callers: usize,
) -> anyhow::Result<(u64, Duration, Duration)> {
    let bodies = Arc::new(csr_bodies()?);
    let ready_by = Instant::now() + Duration::from_secs(10);
    let mut warm = loop {
        match Client::connect(addr).await {
            Ok(client) => break client,
            Err(error) if Instant::now() > ready_by => {
                return Err(error.context("cfssl serve did not listen within 10 s"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    for body in bodies.iter() {
        warm.sign(body).await?;
    }
    let cpu_before = crate::procs::cpu_of(pid)?;
    let started = Instant::now();
    let deadline = started + h.plan.issuance_time;
    let mut tasks = JoinSet::new();
    // One request at a time on each client, as each simulated agent sends its calls.
    for caller in 0..callers {
        let bodies = Arc::clone(&bodies);
        tasks.spawn(async move {
            let mut client = Client::connect(addr).await?;
            let mut signed = 0u64;
            // Bounded in time, and in calls.
            for i in 0..10_000_000usize {
                if Instant::now() >= deadline {
                    break;
                }
                client.sign(&bodies[(caller + i) % bodies.len()]).await?;
                signed += 1;
            }
            anyhow::Ok(signed)
        });
    }
    let mut signed = 0u64;
    while let Some(joined) = tasks.join_next().await {
        signed += joined??;
    }
    let wall = started.elapsed();
    let cpu = crate::procs::cpu_of(pid)?.saturating_sub(cpu_before);
    Ok((signed, wall, cpu))
}

/// One kept-alive HTTP/1.1 connection to `cfssl serve`.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Client {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with cfssl")?;
        tokio::spawn(connection);
        Ok(Self { sender, addr })
    }

    /// Asks for one certificate; fails unless cfssl answers one.
    async fn sign(&mut self, body: &Bytes) -> anyhow::Result<()> {
        let request = hyper::Request::post("/api/v1/cfssl/sign")
            .header(hyper::header::HOST, self.addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let answer = response.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&answer);
        if !status.is_success()
            || !text.contains("\"success\":true")
            || !text.contains("BEGIN CERTIFICATE")
        {
            bail!(
                "cfssl did not sign: {status} {}",
                text.chars().take(300).collect::<String>()
            );
        }
        Ok(())
    }
}

/// A P-256 CA for cfssl (`ca.pem`, `ca-key.pem`), as Sigil's server uses.
fn write_ca(dir: &Path) -> anyhow::Result<()> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "sigil-bench cfssl CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    std::fs::write(dir.join("ca.pem"), cert.pem()).context("cannot write ca.pem")?;
    std::fs::write(dir.join("ca-key.pem"), key.serialize_pem())
        .context("cannot write ca-key.pem")?;
    Ok(())
}

/// [`CSRS`] request bodies, each a P-256 CSR with a SPIFFE ID as its URI SAN (as the agent's).
fn csr_bodies() -> anyhow::Result<Vec<Bytes>> {
    (0..CSRS)
        .map(|i| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(
                format!("spiffe://{}/cfssl/{i}", crate::clients::TRUST_DOMAIN).try_into()?,
            )];
            let pem = params.serialize_request(&key)?.pem()?;
            let body = format!(
                "{{\"certificate_request\":\"{}\"}}",
                pem.replace('\n', "\\n")
            );
            Ok(Bytes::from(body))
        })
        .collect()
}

/// A TCP port free on loopback now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind loopback")?;
    Ok(listener.local_addr()?.port())
}

/// `name` on the `PATH`, if there.
fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
