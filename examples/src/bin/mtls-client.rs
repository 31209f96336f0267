//! An mTLS client that takes its X509-SVID, the trust bundle and the CRLs from the SPIFFE
//! Workload API (reloaded on every update), connects to the example server, accepts it only if
//! its SPIFFE ID is allowed (an exact ID or a trust domain) and its serial is on no CRL, sends
//! `hello` and prints the answer.
//!
//! ```text
//! mtls-client --socket-path /run/sigil/api.sock --connect 127.0.0.1:8443 \
//!     --svid spiffe://example.org/admin/db-migrate --allow-id spiffe://example.org/db
//! ```
//!
//! With `--count N` it makes N calls, `--interval` apart (default 1s), each on a new
//! connection with the credentials of that moment. It waits `--timeout` (default 30s) for a
//! first identity. Exits 1 on the first failure.

#[path = "../mtls/mod.rs"]
#[allow(
    dead_code,
    reason = "shared by both example binaries; each uses part of it"
)]
mod mtls;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use rustls_pki_types::ServerName;
use sigil_core::SpiffeId;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use self::mtls::{Allow, Credentials};

/// How long to wait for a first identity from the Workload API, by default.
const FIRST_IDENTITY_TIMEOUT: Duration = Duration::from_secs(30);

struct Args {
    socket: Option<PathBuf>,
    connect: SocketAddr,
    svid: Option<SpiffeId>,
    allow: Allow,
    count: u32,
    interval: Duration,
    timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = parse_args()?;
    let (tx, mut rx) = watch::channel::<Option<Arc<Credentials>>>(None);
    tokio::spawn(mtls::watch_credentials(
        mtls::socket_path(args.socket)?,
        args.svid,
        tx,
    ));
    tokio::time::timeout(args.timeout, rx.wait_for(Option::is_some))
        .await
        .map_err(|_| anyhow!("no identity from the workload api"))?
        .map_err(|_| anyhow!("the workload api watcher stopped"))?;
    for i in 0..args.count {
        if i > 0 {
            tokio::time::sleep(args.interval).await;
        }
        let credentials = rx
            .borrow()
            .clone()
            .ok_or_else(|| anyhow!("no identity from the workload api now"))?;
        let reply = call(&credentials, args.connect, &args.allow).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

async fn call(
    credentials: &Credentials,
    addr: SocketAddr,
    allow: &Allow,
) -> anyhow::Result<String> {
    let connector = TlsConnector::from(mtls::client_config(credentials)?);
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    // SVIDs carry no DNS name; the name is not checked, the SPIFFE ID is.
    let tls = connector
        .connect(ServerName::try_from("spiffe")?, tcp)
        .await
        .context("tls handshake")?;
    let server = mtls::peer_id(tls.get_ref().1.peer_certificates())?;
    if !allow.permits(&server) {
        return Err(anyhow!("server {server} is not allowed"));
    }
    let mut lines = BufReader::new(tls);
    lines.get_mut().write_all(b"hello\n").await?;
    lines.get_mut().flush().await?;
    let mut reply = String::new();
    if lines
        .read_line(&mut reply)
        .await
        .context("reading the reply")?
        == 0
    {
        return Err(anyhow!("the server closed the connection (refused us?)"));
    }
    Ok(format!("{} (server {server})", reply.trim_end()))
}

fn parse_args() -> anyhow::Result<Args> {
    let mut socket = None;
    let mut connect = None;
    let mut svid = None;
    let mut allow_id = None;
    let mut allow_td = None;
    let mut count = 1;
    let mut interval = Duration::from_secs(1);
    let mut timeout = FIRST_IDENTITY_TIMEOUT;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--socket-path" => socket = Some(PathBuf::from(value()?)),
            "--connect" => connect = Some(value()?.parse().context("--connect")?),
            "--svid" => svid = Some(SpiffeId::new(&value()?)?),
            "--allow-id" => allow_id = Some(value()?),
            "--allow-trust-domain" => allow_td = Some(value()?),
            "--count" => count = value()?.parse().context("--count")?,
            "--interval" => interval = sigil_core::parse_duration(&value()?)?,
            "--timeout" => timeout = sigil_core::parse_duration(&value()?)?,
            "--help" | "-h" => {
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "mtls-client [--socket-path PATH] --connect ADDR [--svid ID] \
                     (--allow-id ID | --allow-trust-domain TD) [--count N] [--interval D] [--timeout D]"
                )?;
                std::process::exit(0);
            }
            other => return Err(anyhow!("unknown flag {other}")),
        }
    }
    Ok(Args {
        socket,
        connect: connect.ok_or_else(|| anyhow!("--connect ADDR is required"))?,
        svid,
        allow: Allow::from_args(allow_id.as_deref(), allow_td.as_deref())?,
        count,
        interval,
        timeout,
    })
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIGIL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
}
