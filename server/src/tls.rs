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
use sigil_core::x509_svid::Authorizer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

/// How long a client may take to complete the TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// One accepted, handshaken connection.
#[derive(Debug)]
pub(crate) struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
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
/// SVIDs optional but verified against `bundles` when presented, no session resumption, ALPN h2.
pub(crate) fn server_config(
    certificate: ServerCertificate,
    bundles: SharedBundles,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = SpiffeClientVerifier::new(bundles, Authorizer::any()).optional();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(certificate));
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts TCP connections on `listener`, runs each TLS handshake in its own task (bounded by
/// [`HANDSHAKE_TIMEOUT`]), and yields the connections that complete it. A failed handshake
/// affects only its own connection. The loop ends when the receiver is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> mpsc::Receiver<io::Result<TlsConnection>> {
    let (tx, rx) = mpsc::channel(64);
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
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let cert_chain = stream.get_ref().1.peer_certificates().map(|certs| {
                            Arc::new(certs.iter().map(|c| c.clone().into_owned()).collect())
                        });
                        let peer = PeerInfo { cert_chain };
                        let _ = tx.send(Ok(TlsConnection { stream, peer })).await;
                    }
                    Ok(Err(error)) => debug!(%error, %remote, "tls handshake failed"),
                    Err(_) => debug!(%remote, "tls handshake timed out"),
                }
            });
        }
    });
    rx
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
