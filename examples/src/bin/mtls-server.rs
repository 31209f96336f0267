//! An mTLS server that takes its X509-SVID, the trust bundle and the CRLs from the SPIFFE
//! Workload API, reloads them on every update without dropping its listener, accepts only
//! clients whose SPIFFE ID is allowed (an exact ID or a trust domain) and whose serial is on no
//! CRL, and answers each line `hello` with `hello <client SPIFFE ID>`.
//!
//! ```text
//! mtls-server --socket-path /run/sigil/api.sock --listen 127.0.0.1:8443 \
//!     --svid spiffe://example.org/db --allow-id spiffe://example.org/admin/db-migrate
//! ```
//!
//! It prints `listening on ADDR` once it has an identity and is bound.

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

use anyhow::{Context as _, anyhow};
use sigil_core::SpiffeId;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use self::mtls::{Allow, Credentials};

struct Args {
    socket: Option<PathBuf>,
    listen: SocketAddr,
    svid: Option<SpiffeId>,
    allow: Allow,
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
    // The TLS configuration follows the credentials: each new connection uses the latest.
    let (config_tx, config_rx) = watch::channel::<Option<Arc<rustls::ServerConfig>>>(None);
    let mut listener = Some(
        TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?,
    );
    loop {
        let credentials = rx.borrow_and_update().clone();
        let config = match credentials.as_deref().map(mtls::server_config) {
            Some(Ok(config)) => Some(config),
            Some(Err(error)) => {
                tracing::warn!(%error, "unusable credentials; refusing connections");
                None
            }
            None => None,
        };
        let ready = config.is_some();
        config_tx.send_replace(config);
        // Start accepting once there is an identity; the listener stays bound from then on.
        if ready && let Some(listener) = listener.take() {
            let local = listener.local_addr()?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {local}")?;
            out.flush()?;
            drop(out);
            tokio::spawn(serve(listener, config_rx.clone(), args.allow.clone()));
        }
        if rx.changed().await.is_err() {
            return Err(anyhow!("the workload api watcher stopped"));
        }
    }
}

async fn serve(
    listener: TcpListener,
    configs: watch::Receiver<Option<Arc<rustls::ServerConfig>>>,
    allow: Allow,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let Some(config) = configs.borrow().clone() else {
            tracing::warn!(%peer, "no identity now; connection refused");
            continue;
        };
        let allow = allow.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(TlsAcceptor::from(config), tcp, &allow).await {
                tracing::warn!(%peer, %error, "connection refused");
            }
        });
    }
}

async fn handle(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    allow: &Allow,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await.context("tls handshake")?;
    let (_, session) = tls.get_ref();
    let client = mtls::peer_id(session.peer_certificates())?;
    if !allow.permits(&client) {
        return Err(anyhow!("client {client} is not allowed"));
    }
    tracing::info!(%client, "client accepted");
    let mut lines = BufReader::new(tls);
    let mut line = String::new();
    while lines.read_line(&mut line).await? > 0 {
        let reply = format!("hello {client}\n");
        lines.get_mut().write_all(reply.as_bytes()).await?;
        lines.get_mut().flush().await?;
        line.clear();
    }
    Ok(())
}

fn parse_args() -> anyhow::Result<Args> {
    let mut socket = None;
    let mut listen = None;
    let mut svid = None;
    let mut allow_id = None;
    let mut allow_td = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--socket-path" => socket = Some(PathBuf::from(value()?)),
            "--listen" => listen = Some(value()?.parse().context("--listen")?),
            "--svid" => svid = Some(SpiffeId::new(&value()?)?),
            "--allow-id" => allow_id = Some(value()?),
            "--allow-trust-domain" => allow_td = Some(value()?),
            "--help" | "-h" => {
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "mtls-server [--socket-path PATH] --listen ADDR [--svid ID] \
                     (--allow-id ID | --allow-trust-domain TD)"
                )?;
                std::process::exit(0);
            }
            other => return Err(anyhow!("unknown flag {other}")),
        }
    }
    Ok(Args {
        socket,
        listen: listen.ok_or_else(|| anyhow!("--listen ADDR is required"))?,
        svid,
        allow: Allow::from_args(allow_id.as_deref(), allow_td.as_deref())?,
    })
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIGIL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}
