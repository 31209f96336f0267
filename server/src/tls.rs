//! The server side of the agent-facing API's mTLS: the rustls configuration, a certificate
//! resolver whose SVID can be swapped while the server runs, and the accept loop that hands
//! tonic one verified TLS stream per connection with the peer's certificate chain attached.
//!
//! Client certificates are optional at the handshake (an agent attesting with a join token has
//! none yet) but, when presented, verified in full against the current bundle. Every call that
//! needs an identity checks it again from the [`PeerInfo`] in the request (see `api::node`).
//! TLS session resumption is off: every connection does a full handshake with a fresh
//! certificate check (SPIRE 1.14.3 advisory).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil_core::tls::{SharedBundles, SpiffeClientVerifier};
use sigil_core::x509_svid::{Authorizer, check_leaf_certificate};
use sigil_core::{SpiffeId, TrustDomain};
use sigil_daemon::limits::ConnectionLimit;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

pub(crate) use sigil_daemon::limits::HANDSHAKE_TIMEOUT;

/// How long a connection without a client certificate lives before the server sends it
/// `GOAWAY`. Such a connection can only attest (an agent with a join token, which then
/// reconnects with its SVID), so a minute is ample; holding one open costs the peer a new
/// handshake every minute.
pub(crate) const UNAUTHENTICATED_LIFETIME: Duration = Duration::from_secs(60);

/// How long calls in flight on such a connection may still take after its `GOAWAY`, before it
/// is closed.
pub(crate) const UNAUTHENTICATED_GRACE: Duration = Duration::from_secs(10);

/// Connections with an agent's SVID served at once; those beyond are closed after their
/// handshake.
pub(crate) const MAX_AUTHENTICATED_CONNECTIONS: usize = 4096;

/// Connections with an audit source's SVID (brokers) served at once: a handful of brokers
/// need a few each, and they never take a slot an agent needs.
pub(crate) const MAX_SOURCE_CONNECTIONS: usize = 32;

/// Streams an audit source's connection may have open at once (each an `Append` of up to
/// 4 MiB).
pub(crate) const MAX_SOURCE_STREAMS: u32 = 4;

/// Connections without one (agents attesting with a join token) served at once.
pub(crate) const MAX_UNAUTHENTICATED_CONNECTIONS: usize = 256;

/// Streams a connection without a client certificate may have open at once: it can only
/// attest, which takes one.
pub(crate) const MAX_UNAUTHENTICATED_STREAMS: u32 = 4;

/// The largest message a connection without a client certificate may send (an attestation: a
/// join token and a CSR).
pub(crate) const MAX_UNAUTHENTICATED_MESSAGE: usize = 64 * 1024;

/// The HTTP/2 flow-control window (per stream and per connection) of such a connection: what it
/// may send before the server has read it.
pub(crate) const UNAUTHENTICATED_WINDOW: u32 = 64 * 1024;

/// TLS handshakes in progress at once; connections beyond are closed when accepted.
pub(crate) const MAX_HANDSHAKES: usize = 1024;

/// The connections [`incoming`] yields, by who the client is: each kind is served by its own
/// gRPC server with only the service it may call, so that a client without a certificate gets
/// only the few streams and small messages an attestation needs, and an audit source only the
/// audit ingest, within limits of its own.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// Connections with a verified agent SVID.
    pub(crate) authenticated: mpsc::Receiver<io::Result<TlsConnection>>,
    /// Connections with a verified SVID of a listed audit source.
    pub(crate) sources: mpsc::Receiver<io::Result<TlsConnection>>,
    /// Connections without a client certificate.
    pub(crate) unauthenticated: mpsc::Receiver<io::Result<TlsConnection>>,
}

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate or key was refused by rustls.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server's current certificate and key, replaceable at any time (SVID renewal, CA
/// rotation); new handshakes use the newest.
#[derive(Debug, Clone)]
pub(crate) struct ServerCertificate {
    current: Arc<RwLock<Arc<CertifiedKey>>>,
}

/// What tonic knows about each connection: the client's verified certificate chain (leaf
/// first), if it presented one.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    /// The client's certificate chain, verified at the handshake against the bundle of that
    /// moment. Calls re-check it against the current bundle and store.
    pub(crate) cert_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// One accepted, handshaken connection, holding its slot of the connection limit.
#[derive(Debug)]
pub(crate) struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

// === impl ServerCertificate ===

impl ServerCertificate {
    /// A resolver serving `chain` (leaf first) with `key` (PKCS#8 P-256).
    pub(crate) fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(certified_key(chain, key)?))),
        })
    }

    /// Replaces the certificate for all later handshakes.
    pub(crate) fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let new = Arc::new(certified_key(chain, key)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = new;
        Ok(())
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, TlsError> {
    let key = rustls::crypto::ring::sign::any_ecdsa_type(&key)?;
    Ok(CertifiedKey::new(chain, key))
}

/// The rustls configuration of the agent-facing API: TLS 1.2/1.3 with the ring provider, client
/// SVIDs optional but, when presented, verified against `bundles` and only an agent's of
/// `trust_domain` or a listed audit source's (any other workload SVID is refused at the
/// handshake, so it never reaches the server), no session resumption, ALPN h2. Each call checks
/// the caller again for what it asks: the node API takes agents only, the audit ingest API audit
/// sources only.
pub(crate) fn server_config(
    certificate: ServerCertificate,
    bundles: SharedBundles,
    trust_domain: TrustDomain,
    audit_sources: Vec<SpiffeId>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let callers = Authorizer::predicate(move |id| {
        crate::policy::is_agent_id(&trust_domain, id) || audit_sources.contains(id)
    });
    let verifier = SpiffeClientVerifier::new(bundles, callers).optional();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(certificate));
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts TCP connections on `listener`, runs each TLS handshake in its own task (at most
/// [`MAX_HANDSHAKES`] at once, each bounded by [`HANDSHAKE_TIMEOUT`]), and yields the
/// connections that complete it, by kind (`is_agent` tells an agent's verified SVID from an
/// audit source's), each kind within its connection limit (a connection beyond it is closed). A
/// failed handshake affects only its own connection. The loop ends when the authenticated
/// receiver is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    is_agent: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static,
) -> Incoming {
    let (tx, authenticated) = mpsc::channel(64);
    let (tx_sources, sources) = mpsc::channel(16);
    let (tx_unauthenticated, unauthenticated) = mpsc::channel(64);
    let handshakes = ConnectionLimit::new("agent-facing api handshakes", MAX_HANDSHAKES);
    let with_cert = ConnectionLimit::new("agent-facing api", MAX_AUTHENTICATED_CONNECTIONS);
    let of_sources = ConnectionLimit::new("audit ingest api", MAX_SOURCE_CONNECTIONS);
    let without_cert = ConnectionLimit::new(
        "agent-facing api without a client certificate",
        MAX_UNAUTHENTICATED_CONNECTIONS,
    );
    let is_agent = Arc::new(is_agent);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let Some(handshake) = handshakes.try_admit() else {
                drop(tcp);
                continue;
            };
            let acceptor = acceptor.clone();
            let senders = (tx.clone(), tx_sources.clone(), tx_unauthenticated.clone());
            let limits = (with_cert.clone(), of_sources.clone(), without_cert.clone());
            let is_agent = is_agent.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let handshaken =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(handshake);
                match handshaken {
                    Ok(Ok(stream)) => {
                        let cert_chain: Option<Arc<Vec<CertificateDer<'static>>>> =
                            stream.get_ref().1.peer_certificates().map(|certs| {
                                Arc::new(certs.iter().map(|c| c.clone().into_owned()).collect())
                            });
                        // The handshake verified the chain and that its ID is an agent's or a
                        // listed source's: only which of the two is left to tell.
                        let agent = cert_chain.as_ref().map(|chain| {
                            chain
                                .first()
                                .and_then(|leaf| check_leaf_certificate(leaf).ok())
                                .is_some_and(|id| is_agent(&id))
                        });
                        let (limit, tx) = match agent {
                            Some(true) => (limits.0, senders.0),
                            Some(false) => (limits.1, senders.1),
                            None => (limits.2, senders.2),
                        };
                        let Some(permit) = limit.try_admit() else {
                            return;
                        };
                        let peer = PeerInfo { cert_chain };
                        let connection = TlsConnection {
                            stream,
                            peer,
                            _permit: permit,
                        };
                        let _ = tx.send(Ok(connection)).await;
                    }
                    Ok(Err(error)) => debug!(%error, %remote, "tls handshake failed"),
                    Err(_) => debug!(%remote, "tls handshake timed out"),
                }
            });
        }
    });
    Incoming {
        authenticated,
        sources,
        unauthenticated,
    }
}

// === impl TlsConnection ===

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
