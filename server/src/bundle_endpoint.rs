//! The bundle endpoint (SPIFFE Federation): HTTPS on a listener of its own, answering `GET /`
//! with the trust domain's SPIFFE bundle (`spiffe_sequence`, `spiffe_refresh_hint`) to other
//! trust domains' servers. No client authentication (F-2); other paths are 404, other methods
//! 405 (as SPIRE's). Two profiles: `https_spiffe` serves the server's own X509-SVID (the
//! resolver the agent-facing API uses, so rotations apply here too); `https_web` serves a Web
//! PKI certificate from files, read again when they change (a certificate that does not load
//! keeps the previous one, and says why in the log).
//!
//! Within the listener limits of the other listeners: a bounded number of connections and
//! handshakes, each handshake and request header bounded in time, each connection's life too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil_core::SpiffeBundle;
use sigil_daemon::limits::{ConnectionLimit, HANDSHAKE_TIMEOUT};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::{BundleEndpointConfig, BundleEndpointProfile};
use crate::federation_client::AbortOnDrop;
use crate::service::authority::{Authority, BundleState};
use crate::tls::ServerCertificate;

/// Connections served at once; those beyond are closed when accepted.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one connection may stay open.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How often the `https_web` files are checked for changes.
pub(crate) const WEB_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Why the endpoint cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleEndpointError {
    /// The address cannot be bound.
    #[error("cannot listen on {address} (bundle_endpoint_address): {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The `https_web` certificate or key cannot be used.
    #[error("bundle endpoint certificate: {0}")]
    Certificate(String),
    /// The TLS configuration cannot be built.
    #[error("bundle endpoint tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// A bound, not yet serving, bundle endpoint.
pub(crate) struct BundleEndpoint {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    web: Option<Arc<WebCertificate>>,
    refresh_hint: Duration,
}

impl std::fmt::Debug for BundleEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleEndpoint")
            .field("address", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl BundleEndpoint {
    /// Binds the endpoint as `config` says (a taken port or an unusable `https_web`
    /// certificate fails the start); `svid` is the server's own certificate, for
    /// `https_spiffe`.
    pub(crate) async fn bind(
        config: &BundleEndpointConfig,
        svid: ServerCertificate,
    ) -> Result<Self, BundleEndpointError> {
        let (resolver, web): (Arc<dyn ResolvesServerCert>, _) = match &config.profile {
            BundleEndpointProfile::HttpsSpiffe => (Arc::new(svid), None),
            BundleEndpointProfile::HttpsWeb {
                cert_path,
                key_path,
            } => {
                let web = Arc::new(WebCertificate::load(cert_path, key_path)?);
                (web.clone(), Some(web))
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind(config.address).await.map_err(|source| {
            BundleEndpointError::Bind {
                address: config.address,
                source,
            }
        })?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            web,
            refresh_hint: config.refresh_hint,
        })
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves `authority`'s bundle until `stop` turns true.
    pub(crate) async fn serve(self, authority: Arc<Authority>, mut stop: watch::Receiver<bool>) {
        if let Some(address) = self.local_addr() {
            info!(%address, web = self.web.is_some(), "bundle endpoint listening");
        }
        let body = Arc::new(BundleBody::new(self.refresh_hint));
        let limit = ConnectionLimit::new("bundle endpoint", MAX_CONNECTIONS);
        // The files are read on the blocking pool, beside the accept loop.
        let _reload = self.web.clone().map(|web| {
            let task = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(WEB_RELOAD_INTERVAL).await;
                    let web = web.clone();
                    let _ = tokio::task::spawn_blocking(move || web.reload_if_changed()).await;
                }
            });
            AbortOnDrop(task)
        });
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    debug!(%error, "bundle endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(permit) = limit.try_admit() else {
                continue;
            };
            let acceptor = self.acceptor.clone();
            let authority = authority.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            debug!(%error, "bundle endpoint: handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let service = hyper::service::service_fn(move |request| {
                    let response = respond(&request, &body, &authority.bundle());
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service);
                if let Ok(Err(error)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await
                {
                    debug!(%error, "bundle endpoint: connection ended");
                }
                drop(permit);
            });
        }
    }
}

/// Answers one request: F-1 (GET, the bundle, `application/json`), F-2 (no authentication).
fn respond<B>(
    request: &hyper::Request<B>,
    body: &BundleBody,
    bundle: &BundleState,
) -> hyper::Response<Full<Bytes>> {
    let method = request.method();
    if method != hyper::Method::GET && method != hyper::Method::HEAD {
        let mut response = plain(405, "only GET\n");
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    if request.uri().path() != "/" {
        return plain(404, "not found: the bundle is at /\n");
    }
    let json = body.for_state(bundle);
    let mut response = hyper::Response::new(Full::new(json));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn plain(status: u16, text: &'static str) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The served JSON, built once per bundle sequence: the published bundle with the refresh
/// hint set.
struct BundleBody {
    refresh_hint: Duration,
    cached: Mutex<Option<(u64, Bytes)>>,
}

impl BundleBody {
    fn new(refresh_hint: Duration) -> Self {
        Self {
            refresh_hint,
            cached: Mutex::new(None),
        }
    }

    fn for_state(&self, state: &BundleState) -> Bytes {
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((sequence, json)) = cached.as_ref()
            && *sequence == state.sequence
        {
            return json.clone();
        }
        let json = match SpiffeBundle::parse(state.trust_domain.clone(), &state.spiffe_json) {
            Ok(mut bundle) => {
                bundle.set_refresh_hint(Some(self.refresh_hint));
                Bytes::from(bundle.to_json())
            }
            // Never expected (the server wrote it); served as published rather than not at all.
            Err(error) => {
                warn!(%error, "cannot set the refresh hint on the bundle; serving it without");
                Bytes::from(state.spiffe_json.clone())
            }
        };
        *cached = Some((state.sequence, json.clone()));
        json
    }
}

/// The `https_web` certificate: files read at start and again whenever they change.
pub(crate) struct WebCertificate {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(FileStamp, Arc<CertifiedKey>)>,
}

impl std::fmt::Debug for WebCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebCertificate")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// What tells a changed pair of files: the SHA-256 of their contents (`None`: unreadable).
type FileStamp = Option<[u8; 32]>;

impl WebCertificate {
    /// Reads both files.
    ///
    /// # Errors
    ///
    /// [`BundleEndpointError::Certificate`] naming the file and the reason.
    pub(crate) fn load(cert_path: &Path, key_path: &Path) -> Result<Self, BundleEndpointError> {
        let stamp = stamp(cert_path, key_path);
        let key =
            read_certified_key(cert_path, key_path).map_err(BundleEndpointError::Certificate)?;
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new((stamp, Arc::new(key))),
        })
    }

    /// Reads the files again if they changed; keeps the current certificate (and logs why)
    /// when the new one cannot be used. Returns whether a new one was loaded.
    pub(crate) fn reload_if_changed(&self) -> bool {
        let stamp = stamp(&self.cert_path, &self.key_path);
        if stamp
            == self
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .0
        {
            return false;
        }
        match read_certified_key(&self.cert_path, &self.key_path) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    (stamp, Arc::new(key));
                info!(cert = %self.cert_path.display(), "bundle endpoint certificate reloaded");
                true
            }
            Err(error) => {
                // Remembered, so that the same broken files are not read (and logged) again
                // every interval; the next change is tried.
                self.current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .0 = stamp;
                warn!(%error, "the changed bundle endpoint certificate cannot be used; serving the previous one");
                false
            }
        }
    }
}

impl ResolvesServerCert for WebCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .1
                .clone(),
        )
    }
}

/// The most of each file read (a certificate chain or a key is a few KiB).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

fn read_bounded(path: &Path) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    use std::io::Read as _;
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    std::fs::File::open(path)
        .ok()?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    (bytes.len() as u64 <= MAX_FILE_BYTES).then_some(bytes)
}

fn stamp(cert_path: &Path, key_path: &Path) -> FileStamp {
    let cert = read_bounded(cert_path)?;
    let key = read_bounded(key_path)?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [cert.as_slice(), key.as_slice()] {
        digest.update(&(part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    digest.finish().as_ref().try_into().ok()
}

fn read_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, String> {
    let pem = std::fs::read(cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert_path.display()));
    }
    let key_pem =
        sigil_daemon::read_secret(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("{}: not a PEM private key: {e}", key_path.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unusable key: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(chain, key);
    certified
        .keys_match()
        .map_err(|e| format!("{} and {}: {e}", cert_path.display(), key_path.display()))?;
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    /// A self-signed certificate for localhost: (certificate PEM, key PEM, certificate DER).
    fn certificate() -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    fn served(web: &WebCertificate) -> CertificateDer<'static> {
        web.current.read().unwrap().1.cert[0].clone()
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn the_web_certificate_is_read_again_when_it_changes_and_kept_when_the_new_one_is_bad() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("web.pem"), dir.path().join("web.key"));
        let (cert, key, first) = certificate();
        write(&cert_path, &cert);
        write(&key_path, &key);
        let web = WebCertificate::load(&cert_path, &key_path).unwrap();
        assert_eq!(served(&web), first);
        assert!(!web.reload_if_changed(), "nothing changed");

        // A renewal: the new pair is served.
        let (cert, key, second) = certificate();
        write(&cert_path, &cert);
        write(&key_path, &key);
        assert!(web.reload_if_changed());
        assert_eq!(served(&web), second);

        // A certificate whose key is not the one beside it, then garbage: the previous pair
        // stays in service.
        let (other_cert, _, _) = certificate();
        write(&cert_path, &other_cert);
        assert!(!web.reload_if_changed());
        assert_eq!(served(&web), second);
        write(&cert_path, "not a certificate");
        assert!(!web.reload_if_changed());
        assert_eq!(served(&web), second);
        // A key anyone may read is refused at start, naming the file.
        let (cert, key, _) = certificate();
        write(&cert_path, &cert);
        write(&key_path, &key);
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = WebCertificate::load(&cert_path, &key_path).unwrap_err();
        assert!(refused.to_string().contains("web.key"), "{refused}");
    }
}
