//! Serving one target: accept, mTLS handshake with the current credentials, the peer's identity
//! and session from its certificate, a policy decision, the event in the spool **before**
//! anything goes upstream, then the bytes both ways until one side closes or the connection is
//! cut: its serial on a CRL, its session's end, its certificate's expiry, or shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value};
use sigil_core::TrustDomain;
use sigil_core::session::SessionClaims;
use sigil_core::x509_svid::check_leaf_certificate;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use x509_parser::prelude::FromDer as _;

use crate::config::{StaleCrl, Target, TargetKind};
use crate::credentials::Credentials;
use crate::policy::{Principal, TargetPolicy};
use crate::spool::{NewEvent, Spool};
use crate::upstream;
use sigil_daemon::limits::ConnectionLimit;

/// Why a connection ended (the `reason` detail of `broker.connection.close` and `broker.deny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client closed it.
    Client,
    /// The upstream closed it, or could not be reached.
    Upstream,
    /// The peer's serial appeared on a CRL.
    Revoked,
    /// The peer's federated trust domain is no longer trusted (its bundle was withdrawn).
    Untrusted,
    /// The peer's session ended.
    SessionEnded,
    /// The peer's certificate expired.
    Expired,
    /// A policy denied it.
    Policy,
    /// The broker is stopping.
    Shutdown,
}

impl CloseReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
            Self::Revoked => "revoked",
            Self::Untrusted => "untrusted",
            Self::SessionEnded => "session_ended",
            Self::Expired => "expired",
            Self::Policy => "policy",
            Self::Shutdown => "shutdown",
        }
    }
}

/// One live connection: its peer's serial, its trust domain when federated, and where to say
/// why it must end.
type LiveConnection = (
    String,
    Option<TrustDomain>,
    watch::Sender<Option<CloseReason>>,
);

/// The live connections of every target, by the serial of the peer's certificate, so that a
/// revocation cuts them at once.
#[derive(Debug, Default)]
pub(crate) struct Live {
    next: AtomicU64,
    connections: Mutex<HashMap<u64, LiveConnection>>,
}

impl Live {
    fn register(
        &self,
        serial: &str,
        federated: Option<TrustDomain>,
    ) -> (u64, watch::Receiver<Option<CloseReason>>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (serial.to_owned(), federated, tx));
        (id, rx)
    }

    fn remove(&self, id: u64) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Cuts every connection whose peer serial is in `revoked`; returns how many.
    pub(crate) fn cut_revoked(&self, revoked: &std::collections::HashSet<String>) -> usize {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut cut = 0;
        for (serial, federated, tx) in connections.values() {
            if federated.is_none() && revoked.contains(serial) && tx.borrow().is_none() {
                tx.send_replace(Some(CloseReason::Revoked));
                cut += 1;
            }
        }
        cut
    }

    /// Cuts every connection of a federated trust domain that `trusted` no longer holds (its
    /// relationship was deleted, or the broker's entry stopped federating with it); returns
    /// how many.
    pub(crate) fn cut_untrusted(&self, trusted: &Credentials) -> usize {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut cut = 0;
        for (_, federated, tx) in connections.values() {
            if let Some(td) = federated
                && trusted.federated_bundle(td).is_none()
                && tx.borrow().is_none()
            {
                tx.send_replace(Some(CloseReason::Untrusted));
                cut += 1;
            }
        }
        cut
    }

    /// Cuts every connection (shutdown).
    pub(crate) fn cut_all(&self) {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (_, _, tx) in connections.values() {
            tx.send_replace(Some(CloseReason::Shutdown));
        }
    }

    /// How many connections are live.
    pub(crate) fn count(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// What every connection of a target shares.
#[derive(Debug)]
pub(crate) struct TargetContext {
    pub(crate) target: Target,
    pub(crate) policy: Arc<TargetPolicy>,
    pub(crate) spool: Arc<Spool>,
    pub(crate) live: Arc<Live>,
    pub(crate) credentials: watch::Receiver<Option<Arc<Credentials>>>,
    pub(crate) tls: watch::Receiver<Option<Arc<ServerConfig>>>,
    pub(crate) stale_crl: StaleCrl,
    /// Turns true when the broker stops: no new connection goes upstream.
    pub(crate) stopping: watch::Receiver<bool>,
    /// The connection tasks, so that stopping waits for their close records.
    pub(crate) tasks: Arc<Tasks>,
}

/// Counts the connection tasks still running.
#[derive(Debug, Default)]
pub(crate) struct Tasks(AtomicU64);

/// One running task; dropping it ends it.
#[derive(Debug)]
pub(crate) struct Task(Arc<Tasks>);

impl Tasks {
    fn start(self: &Arc<Self>) -> Task {
        self.0.fetch_add(1, Ordering::AcqRel);
        Task(Arc::clone(self))
    }

    /// How many are running.
    pub(crate) fn running(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The peer, as its verified certificate says.
#[derive(Debug)]
pub(crate) struct Peer {
    /// Who, for the policies.
    pub(crate) principal: Principal,
    leaf: CertificateDer<'static>,
    serial: String,
    /// The issuer's name (DER), to find its CRL.
    issuer: Vec<u8>,
    session_end: Option<SystemTime>,
    not_after: SystemTime,
    /// Whether the peer is of a federated trust domain (no session, not on our CRLs).
    federated: bool,
}

/// TLS handshakes in progress at once, per target; connections beyond are closed at accept.
pub(crate) const MAX_HANDSHAKES: usize = 256;

/// Connections served at once, per target; connections beyond are closed at accept.
pub(crate) const MAX_CONNECTIONS: usize = 4096;

/// How long the upstream has to accept a connection (and finish its TLS handshake).
const UPSTREAM_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a tcp connection stays open after the upstream closed its side, for the client to
/// read what is left and close its own.
const HALF_CLOSED_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Accepts connections on `listener` until `stop`, each served in its own task (within
/// [`MAX_CONNECTIONS`], at most [`MAX_HANDSHAKES`] of them still in their handshake).
pub(crate) async fn serve(
    context: Arc<TargetContext>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let connections = ConnectionLimit::new("broker target", MAX_CONNECTIONS);
    let handshakes = ConnectionLimit::new("broker target handshakes", MAX_HANDSHAKES);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let (Some(slot), Some(handshake)) = (connections.try_admit(), handshakes.try_admit())
        else {
            drop(tcp);
            continue;
        };
        let context = Arc::clone(&context);
        let task = context.tasks.start();
        tokio::spawn(async move {
            if let Err(error) = connection(Arc::clone(&context), tcp, remote, handshake).await {
                debug!(%error, %remote, target = %context.target.name, "connection refused");
            }
            drop((slot, task));
        });
    }
}

async fn connection(
    context: Arc<TargetContext>,
    tcp: TcpStream,
    remote: SocketAddr,
    handshake: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let (Some(tls), Some(credentials)) = (
        context.tls.borrow().clone(),
        context.credentials.borrow().clone(),
    ) else {
        anyhow::bail!("no credentials from the workload api yet");
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let client = tokio::time::timeout(
        sigil_daemon::limits::HANDSHAKE_TIMEOUT,
        acceptor.accept(tcp),
    )
    .await
    .map_err(|_| anyhow::anyhow!("tls handshake timed out"))??;
    drop(handshake);
    // The credentials of now, not of the handshake's start: a revocation may have arrived.
    let credentials = context.credentials.borrow().clone().unwrap_or(credentials);
    let peer = Arc::new(peer(&client, &credentials)?);
    let target = &context.target;
    let http = target.kind == TargetKind::Http;
    let mut facts = peer_facts(&peer, remote);

    if !peer.federated && credentials.revoked.contains(&peer.serial) {
        facts.insert(
            "reason".to_owned(),
            Value::from(CloseReason::Revoked.as_str()),
        );
        info!(target = %target.name, peer = %peer.principal.spiffe_id, "connection refused: its certificate is revoked");
        note(&context, "broker.deny", facts, &peer)?;
        return Ok(());
    }
    // Our CRLs say nothing of a federated trust domain's certificates (federation carries no
    // CRLs): such a peer's revocation is its short lifetime.
    if !peer.federated
        && let Some(problem) = credentials.crl_problem(&peer.issuer, SystemTime::now())
    {
        if context.stale_crl == StaleCrl::Refuse {
            warn!(target = %target.name, %problem, "refusing the connection until a fresh CRL arrives (stale_crl = \"refuse\")");
            facts.insert("reason".to_owned(), Value::from("stale_crl"));
            facts.insert("crl_problem".to_owned(), Value::from(problem));
            note(&context, "broker.deny", facts, &peer)?;
            return Ok(());
        }
        warn!(target = %target.name, %problem, "accepting the connection anyway (stale_crl = \"allow\")");
    }
    if *context.stopping.borrow() {
        facts.insert(
            "reason".to_owned(),
            Value::from(CloseReason::Shutdown.as_str()),
        );
        note(&context, "broker.deny", facts, &peer)?;
        return Ok(());
    }

    // A tcp connection is decided once; an http one request by request.
    if !http {
        let verdict = context.policy.decide(&peer.principal, "connect", None);
        facts.insert(
            "decision".to_owned(),
            Value::from(if verdict.allowed { "allow" } else { "deny" }),
        );
        facts.insert("policies".to_owned(), Value::from(verdict.policies.clone()));
        if !verdict.allowed {
            facts.insert(
                "reason".to_owned(),
                Value::from(CloseReason::Policy.as_str()),
            );
            info!(target = %target.name, peer = %peer.principal.spiffe_id, "connection denied by policy");
            note(&context, "broker.deny", facts, &peer)?;
            return Ok(());
        }
    }
    // In the log before anything else happens, durable before the first byte goes upstream
    // (a spool failure refuses the connection); the upstream connection is made meanwhile.
    let written = logged(
        context
            .spool
            .write(event(&context, "broker.connection.open", facts, &peer)),
        REFUSING,
    )?;
    let started = Instant::now();
    let (id, cut) = context.live.register(
        &peer.serial,
        peer.federated
            .then(|| peer.principal.spiffe_id.trust_domain()),
    );
    // A revocation, or a federated bundle withdrawn, between the handshake and the
    // registration.
    let current = context.credentials.borrow().clone();
    if let Some(current) = current {
        if current.revoked.contains(&peer.serial) {
            context
                .live
                .cut_revoked(&std::iter::once(peer.serial.clone()).collect());
        }
        if peer.federated {
            context.live.cut_untrusted(&current);
        }
    }
    let counters = Arc::new(Counters::default());
    let mut cut_early = cut.clone();
    let opening = async {
        tokio::join!(
            context.spool.durable(written),
            tokio::time::timeout(
                UPSTREAM_CONNECT_TIMEOUT,
                upstream::connect(
                    &target.upstream,
                    target.upstream_spiffe_id.as_ref(),
                    &credentials
                ),
            )
        )
    };
    let connected = tokio::select! {
        biased;
        _ = cut_early.wait_for(Option::is_some) => None,
        (durable, connected) = opening => {
            if let Err(error) = logged(durable, REFUSING) {
                context.live.remove(id);
                return Err(error);
            }
            Some(connected)
        }
    };
    let reason = match connected {
        None => cut.borrow().unwrap_or(CloseReason::Shutdown),
        Some(Ok(Ok(server))) if http => {
            crate::http::serve(
                Arc::clone(&context),
                client,
                server,
                Arc::clone(&counters),
                cut,
                Arc::clone(&peer),
            )
            .await
        }
        Some(Ok(Ok(server))) => relay(client, server, &counters, cut, &peer).await,
        Some(Ok(Err(error))) => {
            warn!(%error, target = %target.name, "upstream unreachable");
            CloseReason::Upstream
        }
        Some(Err(_)) => {
            warn!(target = %target.name, "upstream unreachable: no connection within 10 s");
            CloseReason::Upstream
        }
    };
    let mut close = Map::new();
    close.insert("reason".to_owned(), Value::from(reason.as_str()));
    close.insert(
        "duration_ms".to_owned(),
        Value::from(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
    );
    close.insert(
        "bytes_up".to_owned(),
        Value::from(counters.up.load(Ordering::Relaxed)),
    );
    close.insert(
        "bytes_down".to_owned(),
        Value::from(counters.down.load(Ordering::Relaxed)),
    );
    close.insert("source".to_owned(), Value::from(remote.to_string()));
    debug!(target = %target.name, peer = %peer.principal.spiffe_id, reason = reason.as_str(), "connection closed");
    let recorded = note(&context, "broker.connection.close", close, &peer);
    context.live.remove(id);
    recorded
}

/// The bytes a connection carried each way.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// From the client to the upstream.
    pub(crate) up: AtomicU64,
    /// From the upstream to the client.
    pub(crate) down: AtomicU64,
}

/// When `peer`'s connection must end at the latest, and why: its session's end or its
/// certificate's NotAfter, whichever comes first.
pub(crate) fn deadline(peer: &Peer) -> (std::time::Duration, CloseReason) {
    let (at, reason) = match peer.session_end {
        Some(end) if end <= peer.not_after => (end, CloseReason::SessionEnded),
        _ => (peer.not_after, CloseReason::Expired),
    };
    (
        at.duration_since(SystemTime::now()).unwrap_or_default(),
        reason,
    )
}

/// Copies both ways until one side closes both directions' work is done, or the connection is
/// cut; returns why it ended.
async fn relay(
    client: impl AsyncRead + AsyncWrite + Unpin + Send,
    server: Box<dyn upstream::Stream>,
    counters: &Counters,
    mut cut: watch::Receiver<Option<CloseReason>>,
    peer: &Peer,
) -> CloseReason {
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    let up = pump(client_read, server_write, &counters.up);
    let down = pump(server_read, client_write, &counters.down);
    tokio::pin!(up, down);
    let (until, at_deadline) = deadline(peer);
    let sleep = tokio::time::sleep(until);
    tokio::pin!(sleep);
    let (mut up_done, mut down_done) = (false, false);
    let mut first = None;
    let grace = tokio::time::sleep(HALF_CLOSED_GRACE);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            biased;
            changed = cut.changed() => {
                return match changed {
                    Ok(()) => cut.borrow().unwrap_or(CloseReason::Shutdown),
                    Err(_) => CloseReason::Shutdown,
                };
            }
            () = &mut sleep => return at_deadline,
            () = &mut grace, if down_done => return CloseReason::Upstream,
            () = &mut up, if !up_done => {
                up_done = true;
                first.get_or_insert(CloseReason::Client);
            }
            () = &mut down, if !down_done => {
                down_done = true;
                first.get_or_insert(CloseReason::Upstream);
                grace.as_mut().reset(tokio::time::Instant::now() + HALF_CLOSED_GRACE);
            }
        }
        if up_done && down_done {
            return first.unwrap_or(CloseReason::Client);
        }
    }
}

/// Copies `from` to `to`, counting bytes, until `from` ends (then shuts `to` down) or an error.
///
/// Each write is flushed: a TLS stream whose socket was full accepts the bytes but may hold
/// the last records until flushed, and the other side would wait for them forever.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    count: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
                    return;
                }
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// The peer's identity from the verified handshake: an X509-SVID of the broker's own trust
/// domain, with its session claims if it carries them.
fn peer(
    client: &tokio_rustls::server::TlsStream<TcpStream>,
    credentials: &Credentials,
) -> anyhow::Result<Peer> {
    let leaf = client
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or_else(|| anyhow::anyhow!("the client presented no certificate"))?
        .clone()
        .into_owned();
    let spiffe_id = check_leaf_certificate(&leaf)?;
    // The handshake verified the chain against the bundle of this trust domain; only ours and
    // the accepted federated ones have a verifier.
    let federated = spiffe_id.trust_domain() != *credentials.bundle.trust_domain();
    if federated
        && credentials
            .federated_bundle(&spiffe_id.trust_domain())
            .is_none()
    {
        anyhow::bail!(
            "{spiffe_id} is neither of the broker's trust domain nor of an accepted federated one"
        );
    }
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&leaf)?;
    let serial = sigil_core::hex::encode(parsed.raw_serial());
    let not_after = sigil_core::time::from_unix_seconds(parsed.validity().not_after.timestamp())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // Sessions are this trust domain's: session claims in a federated peer's certificate are
    // another CA's say-so and are ignored (the peer is a standing identity).
    let claims = if federated {
        None
    } else {
        SessionClaims::from_certificate(&leaf)?
    };
    Ok(Peer {
        principal: Principal {
            spiffe_id,
            session: claims
                .as_ref()
                .map(|c| (c.session_id().to_owned(), c.ticket().to_owned())),
        },
        session_end: claims.as_ref().map(SessionClaims::ends_at),
        issuer: parsed.issuer().as_raw().to_vec(),
        serial,
        not_after,
        leaf,
        federated,
    })
}

fn peer_facts(peer: &Peer, remote: SocketAddr) -> Map<String, Value> {
    let mut facts = Map::new();
    facts.insert("source".to_owned(), Value::from(remote.to_string()));
    facts.insert(
        "peer".to_owned(),
        Value::from(peer.principal.spiffe_id.to_string()),
    );
    facts
}

/// Records an event about `peer` that describes what is about to go upstream: durable as the
/// record mode says when it returns `Ok`; an error means it must not happen.
pub(crate) async fn record(
    context: &TargetContext,
    action: &'static str,
    details: Map<String, Value>,
    peer: &Peer,
) -> anyhow::Result<()> {
    let recorded = context
        .spool
        .record(event(context, action, details, peer))
        .await;
    logged(recorded, REFUSING).map(drop)
}

/// Records an event about `peer` that describes what already happened (a refusal, a close, a
/// response), without waiting for the disk.
///
/// # Errors
///
/// The spool is broken or full (logged).
pub(crate) fn note(
    context: &TargetContext,
    action: &'static str,
    details: Map<String, Value>,
    peer: &Peer,
) -> anyhow::Result<()> {
    let noted = context.spool.note(event(context, action, details, peer));
    logged(noted, "cannot record in the spool").map(drop)
}

/// What the log says when the spool refuses an event that must precede traffic.
const REFUSING: &str = "cannot record in the spool; refusing";

/// `result`, with a spool error logged with `what`.
fn logged<T>(result: Result<T, crate::spool::SpoolError>, what: &str) -> anyhow::Result<T> {
    result.map_err(|error| {
        tracing::error!(%error, "{what}");
        anyhow::Error::from(error)
    })
}

fn event(
    context: &TargetContext,
    action: &'static str,
    details: Map<String, Value>,
    peer: &Peer,
) -> NewEvent {
    NewEvent {
        action,
        subject: context.target.name.clone(),
        details,
        peer: Some(peer.leaf.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use std::collections::BTreeMap;
    use std::path::Path;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;
    use crate::credentials::Credentials;

    /// A writer like a TLS stream over a full socket: it takes the bytes but delivers them
    /// only when flushed.
    #[derive(Default, Clone)]
    struct Holding {
        held: Arc<Mutex<Vec<u8>>>,
        delivered: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for Holding {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.held.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let held = std::mem::take(&mut *self.held.lock().unwrap());
            self.delivered.lock().unwrap().extend_from_slice(&held);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[tokio::test]
    async fn the_relay_delivers_what_it_read_while_the_other_side_is_quiet() {
        let (mut client, from) = tokio::io::duplex(1024);
        let to = Holding::default();
        let count = Arc::new(AtomicU64::new(0));
        let relay = tokio::spawn({
            let (to, count) = (to.clone(), Arc::clone(&count));
            async move { pump(from, to, &count).await }
        });
        // The client sends a request and waits for the answer, the stream staying open.
        client.write_all(b"SELECT 1;").await.unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while to.delivered.lock().unwrap().as_slice() != b"SELECT 1;" {
            assert!(
                Instant::now() < deadline,
                "the request stayed in the writer's buffer"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(count.load(Ordering::Relaxed), 9);
        drop(client);
        relay.await.unwrap();
    }

    /// A test PKI: a CA, SVIDs signed by it, and CRLs of it.
    struct Pki {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        ca_der: Vec<u8>,
    }

    impl Pki {
        fn new() -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, "test CA");
            let ca = params.self_signed(&key).unwrap();
            Self {
                ca_der: ca.der().to_vec(),
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        /// An X509-SVID of `id`, as the Workload API carries it.
        fn svid(&self, id: &str) -> sigil_proto::workload::X509svid {
            self.svid_until(id, None)
        }

        /// An X509-SVID of `id` whose NotAfter is `not_after` (default: far away).
        fn svid_until(
            &self,
            id: &str,
            not_after: Option<SystemTime>,
        ) -> sigil_proto::workload::X509svid {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            if let Some(not_after) = not_after {
                params.not_after = not_after.into();
            }
            params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
            params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let leaf = params.signed_by(&key, &self.issuer).unwrap();
            sigil_proto::workload::X509svid {
                spiffe_id: id.to_owned(),
                x509_svid: leaf.der().to_vec(),
                x509_svid_key: key.serialize_der(),
                bundle: self.ca_der.clone(),
                hint: String::new(),
            }
        }

        /// An empty CRL whose nextUpdate is `next_update` from now (negative: past).
        fn crl(&self, next_update: i64) -> Vec<u8> {
            self.crl_revoking(next_update, &[])
        }

        /// As [`Pki::crl`], listing `serials`.
        fn crl_revoking(&self, next_update: i64, serials: &[&[u8]]) -> Vec<u8> {
            let now = SystemTime::now();
            let at = |seconds: i64| {
                if seconds < 0 {
                    now - std::time::Duration::from_secs(seconds.unsigned_abs())
                } else {
                    now + std::time::Duration::from_secs(seconds.unsigned_abs())
                }
            };
            rcgen::CertificateRevocationListParams {
                this_update: at(next_update - 3600).into(),
                next_update: at(next_update).into(),
                crl_number: rcgen::SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: serials
                    .iter()
                    .map(|serial| rcgen::RevokedCertParams {
                        serial_number: rcgen::SerialNumber::from_slice(serial),
                        revocation_time: now.into(),
                        reason_code: None,
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: rcgen::KeyIdMethod::Sha256,
            }
            .signed_by(&self.issuer)
            .unwrap()
            .der()
            .to_vec()
        }
    }

    /// Serves a tcp target with `credentials` in front of an echo upstream; returns its
    /// address and the spool.
    async fn broker(
        dir: &Path,
        credentials: Credentials,
        stale_crl: StaleCrl,
    ) -> (SocketAddr, Arc<Spool>, watch::Sender<bool>) {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_address = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let policy = dir.join("db.cedar");
        std::fs::write(
            &policy,
            r#"permit(principal, action == Sigil::Action::"connect", resource);"#,
        )
        .unwrap();
        let spool_dir = dir.join("spool");
        std::fs::create_dir(&spool_dir).unwrap();
        std::fs::set_permissions(
            &spool_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let spool = Arc::new(Spool::open(&spool_dir, crate::config::RecordMode::Sync).unwrap());
        let credentials = Arc::new(credentials);
        let tls = upstream::server_config(&credentials).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let context = Arc::new(TargetContext {
            target: Target {
                name: "db".to_owned(),
                listen: address,
                kind: TargetKind::Tcp,
                upstream: crate::config::Upstream::Tcp(upstream_address.to_string()),
                policy: policy.clone(),
                upstream_spiffe_id: None,
            },
            policy: Arc::new(TargetPolicy::load("db", &policy).unwrap()),
            spool: Arc::clone(&spool),
            live: Arc::new(Live::default()),
            credentials: watch::channel(Some(credentials)).1,
            tls: watch::channel(Some(tls)).1,
            stale_crl,
            stopping: stop.clone(),
            tasks: Arc::new(Tasks::default()),
        });
        tokio::spawn(serve(context, listener, stop));
        (address, spool, stop_tx)
    }

    type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

    /// Connects as `client`, sends a line and says whether it came back.
    async fn echoes(
        address: SocketAddr,
        pki: &Pki,
        client: &sigil_proto::workload::X509svid,
    ) -> bool {
        let Some(mut tls) = connect_as(address, pki, client).await else {
            return false;
        };
        echoed(&mut tls).await
    }

    /// Sends a line on `tls` and says whether it came back.
    async fn echoed(tls: &mut ClientStream) -> bool {
        if tls.write_all(b"ping\n").await.is_err() || tls.flush().await.is_err() {
            return false;
        }
        let mut back = [0u8; 5];
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_exact(&mut back)).await,
            Ok(Ok(_)) if &back == b"ping\n"
        )
    }

    /// An mTLS connection to the broker as `client` (`None`: the handshake failed).
    async fn connect_as(
        address: SocketAddr,
        pki: &Pki,
        client: &sigil_proto::workload::X509svid,
    ) -> Option<ClientStream> {
        let bundle = sigil_core::X509Bundle::from_der(
            sigil_core::TrustDomain::new("test.example").unwrap(),
            &pki.ca_der,
        )
        .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(sigil_core::tls::SpiffeServerVerifier::new(
            sigil_core::tls::SharedBundles::from_bundle(bundle),
            sigil_core::x509_svid::Authorizer::exact(
                sigil_core::SpiffeId::new("spiffe://test.example/broker").unwrap(),
            ),
        )))
        .with_client_auth_cert(
            vec![CertificateDer::from(client.x509_svid.clone())],
            rustls_pki_types::PrivateKeyDer::Pkcs8(client.x509_svid_key.clone().into()),
        )
        .unwrap();
        let tcp = TcpStream::connect(address).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(rustls_pki_types::ServerName::try_from("db").unwrap(), tcp)
            .await
            .ok()
    }

    #[test]
    fn an_unreadable_crl_is_left_out_and_the_readable_ones_still_serve() {
        let pki = Pki::new();
        let broker_svid = pki.svid("spiffe://test.example/broker");
        let crls = [b"not a crl".to_vec(), pki.crl(3600)];
        let credentials =
            Credentials::from_workload_api(&broker_svid, &crls, &BTreeMap::new(), &[]).unwrap();
        assert_eq!(credentials.crls.len(), 1);
        assert_eq!(credentials.crls[0].as_ref(), crls[1].as_slice());
        // rustls builds the verifier: handshakes go on with the readable CRL.
        upstream::server_config(&credentials).unwrap();
    }

    #[test]
    fn a_crl_the_tls_verifier_cannot_use_still_revokes_but_does_not_count_as_fresh() {
        let pki = Pki::new();
        let broker_svid = pki.svid("spiffe://test.example/broker");
        let good = pki.crl(3600);
        let mut unusable = pki.crl_revoking(3600, &[&[0x0a, 0x0b, 0x0c]]);
        // The version field (v2, `02 01 01`) set to a version that does not exist: x509-parser
        // reads the CRL, webpki (rustls's parser) refuses it.
        let at = unusable.windows(3).position(|w| w == [2, 1, 1]).unwrap();
        unusable[at + 2] = 2;
        let issuer = crl_issuer(&good);
        let now = SystemTime::now();

        let credentials = Credentials::from_workload_api(
            &broker_svid,
            &[unusable.clone()],
            &BTreeMap::new(),
            &[],
        )
        .unwrap();
        // Kept from the verifier, which still builds...
        assert!(credentials.crls.is_empty());
        upstream::server_config(&credentials).unwrap();
        // ...its serial is refused after the handshake...
        assert!(
            credentials.revoked.contains("0a0b0c"),
            "{:?}",
            credentials.revoked
        );
        // ...and its authority has no CRL that vouches for freshness: `stale_crl` decides.
        let problem = credentials.crl_problem(&issuer, now).unwrap_or_default();
        assert!(problem.contains("no readable CRL"), "{problem}");

        // Beside a usable CRL of the same authority, that one counts.
        let credentials =
            Credentials::from_workload_api(&broker_svid, &[unusable, good], &BTreeMap::new(), &[])
                .unwrap();
        assert_eq!(credentials.crls.len(), 1);
        assert!(credentials.revoked.contains("0a0b0c"));
        assert_eq!(credentials.crl_problem(&issuer, now), None);
    }

    #[test]
    fn of_two_crls_of_one_authority_the_first_to_go_stale_decides() {
        let pki = Pki::new();
        let broker_svid = pki.svid("spiffe://test.example/broker");
        let (fresh, stale) = (pki.crl(3600), pki.crl(-60));
        let issuer = crl_issuer(&fresh);
        for crls in [[fresh.clone(), stale.clone()], [stale, fresh]] {
            let credentials =
                Credentials::from_workload_api(&broker_svid, &crls, &BTreeMap::new(), &[]).unwrap();
            let problem = credentials
                .crl_problem(&issuer, SystemTime::now())
                .unwrap_or_default();
            assert!(problem.contains("past its nextUpdate"), "{problem}");
        }
    }

    /// The issuer's name (DER) of the CRL `der`.
    fn crl_issuer(der: &[u8]) -> Vec<u8> {
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der).unwrap();
        crl.issuer().as_raw().to_vec()
    }

    #[test]
    fn federated_bundles_count_only_when_accepted_and_holding_authorities() {
        let pki = Pki::new();
        let partner = Pki::new();
        let broker_svid = pki.svid("spiffe://test.example/broker");
        let td = |name: &str| TrustDomain::new(name).unwrap();
        let federated = BTreeMap::from([
            (
                "spiffe://partner.example".to_owned(),
                partner.ca_der.clone(),
            ),
            ("spiffe://jwt-only.example".to_owned(), Vec::new()),
            (
                "spiffe://not-accepted.example".to_owned(),
                partner.ca_der.clone(),
            ),
        ]);
        let accepted = [
            td("partner.example"),
            td("jwt-only.example"),
            td("absent.example"),
        ];
        let credentials =
            Credentials::from_workload_api(&broker_svid, &[], &federated, &accepted).unwrap();
        assert!(
            credentials
                .federated_bundle(&td("partner.example"))
                .is_some()
        );
        for name in ["jwt-only.example", "not-accepted.example", "absent.example"] {
            assert!(credentials.federated_bundle(&td(name)).is_none(), "{name}");
        }
        upstream::server_config(&credentials).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_is_cut_when_the_peers_certificate_expires() {
        let pki = Pki::new();
        let broker_svid = pki.svid("spiffe://test.example/broker");
        let expires = SystemTime::now() + std::time::Duration::from_secs(3);
        let client = pki.svid_until("spiffe://test.example/client", Some(expires));
        let credentials =
            Credentials::from_workload_api(&broker_svid, &[pki.crl(3600)], &BTreeMap::new(), &[])
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (address, spool, _stop) = broker(dir.path(), credentials, StaleCrl::Refuse).await;
        let mut tls = connect_as(address, &pki, &client).await.unwrap();
        assert!(echoed(&mut tls).await);
        // The connection stays open until the certificate's NotAfter, then the broker cuts it.
        let mut buf = [0u8; 16];
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "not cut at the certificate's expiry");
        assert!(
            SystemTime::now() + std::time::Duration::from_secs(1) >= expires,
            "cut before the certificate expired"
        );
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let events = spool.events_for_test();
            if let Some(close) = events
                .iter()
                .find(|e| e.action == "broker.connection.close")
            {
                assert_eq!(close.details["reason"], "expired", "{events:?}");
                break;
            }
            assert!(Instant::now() < deadline, "no close recorded: {events:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crl_past_its_next_update_refuses_new_connections_unless_allowed() {
        let pki = Pki::new();
        let broker_svid = pki.svid("spiffe://test.example/broker");
        let client = pki.svid("spiffe://test.example/client");
        let cases = [
            ("fresh", pki.crl(3600), StaleCrl::Refuse, true),
            ("stale, refuse", pki.crl(-60), StaleCrl::Refuse, false),
            ("none, refuse", Vec::new(), StaleCrl::Refuse, false),
            ("stale, allow", pki.crl(-60), StaleCrl::Allow, true),
        ];
        for (case, crl, stale_crl, admitted) in cases {
            let dir = tempfile::tempdir().unwrap();
            let crls: Vec<Vec<u8>> = if crl.is_empty() {
                Vec::new()
            } else {
                vec![crl]
            };
            let credentials =
                Credentials::from_workload_api(&broker_svid, &crls, &BTreeMap::new(), &[]).unwrap();
            let (address, spool, _stop) = broker(dir.path(), credentials, stale_crl).await;
            assert_eq!(echoes(address, &pki, &client).await, admitted, "{case}");
            // The refusal is recorded, with why.
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let events = spool.events_for_test();
                let deny = events.iter().find(|e| e.action == "broker.deny");
                if admitted {
                    assert!(deny.is_none(), "{case}: {events:?}");
                    if events.iter().any(|e| e.action == "broker.connection.open") {
                        break;
                    }
                } else if let Some(deny) = deny {
                    assert_eq!(deny.details["reason"], "stale_crl", "{case}");
                    let problem = deny.details["crl_problem"].as_str().unwrap();
                    let expected = if case.starts_with("none") {
                        "no readable CRL"
                    } else {
                        "past its nextUpdate"
                    };
                    assert!(problem.contains(expected), "{case}: {problem}");
                    assert!(
                        !events.iter().any(|e| e.action == "broker.connection.open"),
                        "{case}: nothing went upstream"
                    );
                    break;
                }
                assert!(Instant::now() < deadline, "{case}: no event: {events:?}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}
