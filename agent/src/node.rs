//! The agent's identity and its connection to the server.
//!
//! First start: the agent attests with a join token over TLS, trusting the server through the
//! bootstrap bundle file (the server must present `spiffe://TD/sigil/server`), and keeps its key,
//! SVID and the server's bundle in its data directory (directory 0700, files 0600, written
//! atomically). Later starts trust the stored bundle (which follows CA rotations) and need no
//! token. The SVID is renewed at half its life; every call after that presents the new one.
//!
//! When the server refuses the agent for good (token unknown, used or expired; agent banned,
//! unknown or required to re-attest), [`NodeError::Refused`] says exactly that, and the agent
//! exits rather than looping.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::{Deserialize, Serialize};
use sigil_attestors::x509pop::{self, HostCredentials};
use sigil_core::lifetime::Validity;
use sigil_core::time::{from_unix_seconds, unix_seconds};
use sigil_core::tls::{SharedBundles, SpiffeServerVerifier};
use sigil_core::x509_svid::Authorizer;
use sigil_core::{SpiffeBundle, SpiffeId, TrustDomain, X509Bundle};
use sigil_proto::node::node_client::NodeClient;
use sigil_proto::node::{
    AttestAgentRequest, AttestAgentResponse, AttestParams, AttestRequest, RenewAgentRequest,
    attest_request, attest_response,
};
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::config::NodeAttestation;

/// Why the agent could not get or keep its identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The server refused the agent for good; the message says why.
    #[error("the server refused this agent: {0}")]
    Refused(String),
    /// First start without what attestation needs.
    #[error("{0}")]
    Bootstrap(String),
    /// The data directory or the stored key is not this agent's alone.
    #[error(transparent)]
    Untrusted(#[from] sigil_daemon::PrivatePathError),
    /// The stored state is unusable.
    #[error("stored agent state in {path} is unusable: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The server could not be reached or answered with a transient error.
    #[error("cannot reach the server: {0}")]
    Unavailable(String),
    /// Local I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Key or CSR generation failed.
    #[error("cannot create a key: {0}")]
    Key(String),
}

/// The agent's SVID and key.
#[derive(Clone)]
struct Identity {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<Zeroizing<Vec<u8>>>,
    validity: Validity,
}

/// The agent's identity and the server's bundle, as one 0600 file in the data directory
/// ([`STATE_FILE`]), key included: written in one atomic step, so that a crash never leaves a
/// key that does not match the stored certificate (which would cost a new join token).
#[derive(Serialize, Deserialize)]
struct StoredState {
    spiffe_id: String,
    /// The private key, PKCS#8 DER, base64. Absent in state written by an earlier build,
    /// which kept it in [`KEY_FILE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<Zeroizing<String>>,
    /// The SVID chain, DER, base64.
    chain: String,
    /// Unix seconds.
    issued_at: u64,
    not_after: u64,
    /// The server's SPIFFE bundle JSON.
    bundle: serde_json::Value,
}

/// The agent's connection to the server: its identity, the server's bundle, and a channel
/// that presents the current SVID.
pub struct NodeConnection {
    trust_domain: TrustDomain,
    servers: Arc<Servers>,
    data_dir: PathBuf,
    bundles: SharedBundles,
    state: RwLock<(Identity, SpiffeBundle, Channel)>,
}

const STATE_FILE: &str = "agent.json";
/// Where an earlier build kept the key apart from the state (read once, removed on the next
/// write).
const KEY_FILE: &str = "agent.key";

// === impl NodeConnection ===

impl std::fmt::Debug for NodeConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConnection")
            .field("servers", &self.servers.addresses)
            .field("agent_id", &self.agent_id())
            .finish_non_exhaustive()
    }
}

impl NodeConnection {
    /// Loads the stored identity, or attests as `attestation` says, trusting `trust_bundle`
    /// (PEM; the stored bundle when there is one). An x509pop agent whose stored SVID expired
    /// attests again with its host certificate; a join-token agent cannot (its token is spent).
    pub async fn bootstrap(
        trust_domain: TrustDomain,
        server_addresses: Vec<String>,
        data_dir: &Path,
        attestation: &NodeAttestation,
        trust_bundle: Option<&Path>,
    ) -> Result<Self, NodeError> {
        sigil_daemon::check_private_dir(data_dir, 0o700)?;
        if server_addresses.is_empty() {
            return Err(NodeError::Bootstrap("no server address".to_owned()));
        }
        let servers = Arc::new(Servers {
            addresses: server_addresses,
            current: AtomicUsize::new(0),
        });
        let mut stored_bundle = None;
        if let Some((identity, bundle)) = load_state(data_dir, &trust_domain)? {
            if identity.validity.not_after() > SystemTime::now() {
                info!(agent_id = %identity.id, "using the stored agent identity");
                return Self::new(trust_domain, servers, data_dir, identity, bundle);
            }
            if matches!(attestation, NodeAttestation::JoinToken(_)) {
                return Err(NodeError::Refused(format!(
                    "the stored agent SVID ({}) expired while the agent was down; attest again with a new join token after removing {}",
                    identity.id,
                    data_dir.join(STATE_FILE).display()
                )));
            }
            info!(agent_id = %identity.id, "the stored agent SVID expired while the agent was down: attesting again with the host certificate");
            stored_bundle = Some(bundle);
        }
        // What the agent trusts the server through: the bundle it kept, else the bootstrap
        // bundle file.
        let bootstrap = match &stored_bundle {
            Some(bundle) => SharedBundles::from_bundle(x509_of(bundle)?),
            None => SharedBundles::from_bundle(bootstrap_bundle(
                &trust_domain,
                attestation,
                trust_bundle,
            )?),
        };
        let key = new_key()?;
        let csr = csr(&key)?;
        let channel = channel(&servers, &trust_domain, &bootstrap, None)?;
        let response = match attestation {
            NodeAttestation::JoinToken(token) => {
                let token = token.as_deref().ok_or_else(|| {
                    NodeError::Bootstrap(
                        "first start: a join token is needed (--join-token or join_token)"
                            .to_owned(),
                    )
                })?;
                NodeClient::new(channel)
                    .attest_agent(AttestAgentRequest {
                        join_token: token.to_owned(),
                        csr,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner()
            }
            NodeAttestation::X509Pop {
                cert_path,
                key_path,
            } => {
                let host = host_credentials(cert_path, key_path)?;
                attest_x509pop(channel, &host, csr).await?
            }
        };
        let svid = response
            .svid
            .ok_or_else(|| NodeError::Unavailable("attestation answer without an SVID".into()))?;
        let bundle = response
            .bundle
            .ok_or_else(|| NodeError::Unavailable("attestation answer without a bundle".into()))?;
        let bundle =
            SpiffeBundle::parse(trust_domain.clone(), &bundle.spiffe_bundle).map_err(|e| {
                NodeError::Unavailable(format!("the server sent an invalid bundle: {e}"))
            })?;
        let identity = identity_from(&svid, key)?;
        info!(agent_id = %identity.id, "attested");
        store_state(data_dir, &identity, &bundle)?;
        Self::new(trust_domain, servers, data_dir, identity, bundle)
    }

    fn new(
        trust_domain: TrustDomain,
        servers: Arc<Servers>,
        data_dir: &Path,
        identity: Identity,
        bundle: SpiffeBundle,
    ) -> Result<Self, NodeError> {
        let bundles = SharedBundles::from_bundle(x509_of(&bundle)?);
        let channel = channel(&servers, &trust_domain, &bundles, Some(&identity))?;
        Ok(Self {
            trust_domain,
            servers,
            data_dir: data_dir.to_owned(),
            bundles,
            state: RwLock::new((identity, bundle, channel)),
        })
    }

    /// The agent's SPIFFE ID.
    pub fn agent_id(&self) -> SpiffeId {
        self.read().0.id.clone()
    }

    /// The servers' addresses, in the order they are tried.
    pub fn server_addresses(&self) -> &[String] {
        &self.servers.addresses
    }

    /// The address of the server the agent last connected to.
    pub fn current_server(&self) -> &str {
        self.servers.current()
    }

    /// Makes the next connection start with the next listed server (the current one
    /// failed the agent: it refused to sync, or its stream broke). A no-op with one server.
    ///
    /// # Errors
    ///
    /// When the new channel cannot be built.
    pub fn next_server(&self) -> Result<(), NodeError> {
        let count = self.servers.addresses.len();
        if count < 2 {
            return Ok(());
        }
        let current = self.servers.current.load(Ordering::Relaxed);
        self.servers
            .current
            .store((current + 1) % count, Ordering::Relaxed);
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.2 = channel(
            &self.servers,
            &self.trust_domain,
            &self.bundles,
            Some(&state.0),
        )?;
        info!(server = %self.servers.current(), "trying the next server");
        Ok(())
    }

    /// The agent's data directory (its identity, and what it witnessed of the audit log).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A client of the node API presenting the current agent SVID.
    pub fn client(&self) -> NodeClient<Channel> {
        NodeClient::new(self.read().2.clone())
    }

    /// The server's bundle as last received.
    pub fn bundle(&self) -> SpiffeBundle {
        self.read().1.clone()
    }

    /// Replaces the server's bundle (it changed on the server) and persists it.
    pub fn set_bundle(&self, bundle: SpiffeBundle) -> Result<(), NodeError> {
        self.bundles.replace(x509_of(&bundle)?);
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.1 = bundle;
        store_state(&self.data_dir, &state.0, &state.1)
    }

    /// True when the agent SVID is due for renewal at `now`.
    pub fn should_renew(&self, now: SystemTime) -> bool {
        now >= self.read().0.validity.renew_at()
    }

    /// When the agent SVID is due for renewal.
    pub fn renew_at(&self) -> SystemTime {
        self.read().0.validity.renew_at()
    }

    /// Renews the agent SVID with a fresh key; later calls present the new SVID.
    pub async fn renew(&self) -> Result<(), NodeError> {
        let key = new_key()?;
        let svid = self
            .client()
            .renew_agent(RenewAgentRequest { csr: csr(&key)? })
            .await
            .map_err(status_error)?
            .into_inner()
            .svid
            .ok_or_else(|| NodeError::Unavailable("renewal answer without an SVID".into()))?;
        let identity = identity_from(&svid, key)?;
        let channel = channel(
            &self.servers,
            &self.trust_domain,
            &self.bundles,
            Some(&identity),
        )?;
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        store_state(&self.data_dir, &identity, &state.1)?;
        info!(not_after = ?identity.validity.not_after(), "agent svid renewed");
        state.0 = identity;
        state.2 = channel;
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (Identity, SpiffeBundle, Channel)> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The bootstrap bundle file (first start).
fn bootstrap_bundle(
    trust_domain: &TrustDomain,
    attestation: &NodeAttestation,
    trust_bundle: Option<&Path>,
) -> Result<X509Bundle, NodeError> {
    // A join-token agent without its token fails on that first: it is what the operator forgot.
    if matches!(attestation, NodeAttestation::JoinToken(None)) {
        return Err(NodeError::Bootstrap(
            "first start: a join token is needed (--join-token or join_token)".to_owned(),
        ));
    }
    let bundle_path = trust_bundle.ok_or_else(|| {
        NodeError::Bootstrap(
            "first start: the server's bundle is needed to trust it (--trust-bundle FILE, from `sigil-server bundle show`)"
                .to_owned(),
        )
    })?;
    let pem = std::fs::read(bundle_path).map_err(|source| NodeError::Io {
        what: format!("cannot read {}", bundle_path.display()),
        source,
    })?;
    X509Bundle::from_pem(trust_domain.clone(), &pem).map_err(|e| NodeError::State {
        path: bundle_path.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads the x509pop host certificate and key (and checks that they belong together).
fn host_credentials(cert_path: &Path, key_path: &Path) -> Result<HostCredentials, NodeError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| NodeError::Io {
            what: format!("cannot read {}", path.display()),
            source,
        })
    };
    let cert = read(cert_path)?;
    let key = Zeroizing::new(read(key_path)?);
    HostCredentials::from_pem(&cert, &key).map_err(|e| {
        NodeError::Bootstrap(format!(
            "x509pop host credentials ({}, {}): {e}",
            cert_path.display(),
            key_path.display()
        ))
    })
}

/// Attests over the `Attest` stream with x509pop: sends the host chain and the CSR, signs the
/// server's nonce (bound to the CSR), and returns the result.
async fn attest_x509pop(
    channel: Channel,
    host: &HostCredentials,
    csr: Vec<u8>,
) -> Result<AttestAgentResponse, NodeError> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let closed = || NodeError::Unavailable("the server closed the attestation stream".into());
    tx.send(AttestRequest {
        step: Some(attest_request::Step::Params(AttestParams {
            attestor: x509pop::NAME.to_owned(),
            payload: host.payload(),
            csr: csr.clone(),
        })),
    })
    .await
    .map_err(|_| closed())?;
    let mut inbound = NodeClient::new(channel)
        .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    loop {
        let message = inbound
            .message()
            .await
            .map_err(status_error)?
            .ok_or_else(closed)?;
        match message.step {
            Some(attest_response::Step::Challenge(nonce)) => {
                let answer = host
                    .answer(&nonce, &csr)
                    .map_err(|e| NodeError::Bootstrap(format!("x509pop: {e}")))?;
                tx.send(AttestRequest {
                    step: Some(attest_request::Step::ChallengeResponse(answer)),
                })
                .await
                .map_err(|_| closed())?;
            }
            Some(attest_response::Step::Result(result)) => return Ok(result),
            None => return Err(NodeError::Unavailable("an empty attestation answer".into())),
        }
    }
}

/// Maps a status from the server: refusals with a reason (and unknown/used/expired tokens) are
/// final; the rest are transient.
pub fn status_error(status: tonic::Status) -> NodeError {
    let reason = status
        .metadata()
        .get("sigil-reason")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match (status.code(), reason) {
        (tonic::Code::PermissionDenied, Some(reason)) => {
            NodeError::Refused(format!("{} ({reason})", status.message()))
        }
        (tonic::Code::InvalidArgument, _) => NodeError::Refused(status.message().to_owned()),
        _ => NodeError::Unavailable(format!("{}: {}", status.code(), status.message())),
    }
}

// === helpers ===

fn x509_of(bundle: &SpiffeBundle) -> Result<X509Bundle, NodeError> {
    bundle
        .x509_bundle()
        .map_err(|e| NodeError::Unavailable(format!("unusable bundle: {e}")))
}

/// A fresh P-256 key, PKCS#8.
pub(crate) fn new_key() -> Result<Zeroizing<Vec<u8>>, NodeError> {
    let rng = ring::rand::SystemRandom::new();
    let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &rng,
    )
    .map_err(|_| NodeError::Key("random number generator failed".into()))?;
    Ok(Zeroizing::new(doc.as_ref().to_vec()))
}

/// A CSR (DER) for `key`; its subject is empty: the server takes the identity from elsewhere.
pub(crate) fn csr(key: &[u8]) -> Result<Vec<u8>, NodeError> {
    let pair = rcgen::KeyPair::try_from(key).map_err(|e| NodeError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let request = params
        .serialize_request(&pair)
        .map_err(|e| NodeError::Key(e.to_string()))?;
    Ok(request.der().to_vec())
}

fn identity_from(
    svid: &sigil_proto::node::X509svid,
    key: Zeroizing<Vec<u8>>,
) -> Result<Identity, NodeError> {
    let bad = |reason: String| {
        NodeError::Unavailable(format!("the server sent an unusable SVID: {reason}"))
    };
    let id = SpiffeId::new(&svid.spiffe_id).map_err(|e| bad(e.to_string()))?;
    let chain = X509Bundle::from_der(id.trust_domain(), &svid.cert_chain)
        .map_err(|e| bad(e.to_string()))?
        .authorities()
        .to_vec();
    let not_after = from_unix_seconds(svid.expires_at).unwrap_or(UNIX_EPOCH);
    Ok(Identity {
        id,
        chain,
        key: Arc::new(key),
        validity: Validity::from_parts(SystemTime::now(), not_after),
    })
}

/// The servers an agent may talk to (several sharing one database) and the one it last
/// reached: each new connection tries that one first, then the others in order.
struct Servers {
    addresses: Vec<String>,
    current: AtomicUsize,
}

/// How long one server gets to accept a connection before the next is tried.
const SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl Servers {
    fn current(&self) -> &str {
        let index = self.current.load(Ordering::Relaxed) % self.addresses.len().max(1);
        self.addresses.get(index).map_or("", String::as_str)
    }

    /// A TLS connection to the first server that completes a handshake, starting with the
    /// one last reached; remembers it.
    async fn connect(
        &self,
        connector: &tokio_rustls::TlsConnector,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let count = self.addresses.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last_error = std::io::Error::other("no server address");
        for step in 0..count {
            let index = (start + step) % count;
            let Some(address) = self.addresses.get(index) else {
                continue;
            };
            let attempt = async {
                let tcp = tokio::net::TcpStream::connect(address.as_str()).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("sigil-server").map_err(std::io::Error::other)?;
                connector.connect(name, tcp).await
            };
            match tokio::time::timeout(SERVER_CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(tls)) => {
                    if index != start % count {
                        warn!(server = %address, "connected to another server");
                        self.current.store(index, Ordering::Relaxed);
                    }
                    return Ok(tls);
                }
                Ok(Err(e)) => {
                    debug!(server = %address, error = %e, "server unreachable; trying the next");
                    last_error = std::io::Error::new(e.kind(), format!("{address}: {e}"));
                }
                Err(_) => {
                    debug!(server = %address, "server connection timed out; trying the next");
                    last_error = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{address}: connection timed out"),
                    );
                }
            }
        }
        Err(last_error)
    }
}

fn channel(
    servers: &Arc<Servers>,
    trust_domain: &TrustDomain,
    bundles: &SharedBundles,
    identity: Option<&Identity>,
) -> Result<Channel, NodeError> {
    let server_id = trust_domain
        .id(["sigil", "server"])
        .map_err(|e| NodeError::Bootstrap(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NodeError::Key(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            bundles.clone(),
            Authorizer::exact(server_id),
        )));
    let mut config = match identity {
        Some(identity) => {
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key.to_vec()));
            builder
                .with_client_auth_cert(identity.chain.clone(), key)
                .map_err(|e| NodeError::Key(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: every connection is a full handshake with the current SVID.
    config.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let servers = Arc::clone(servers);
    let endpoint = Endpoint::try_from("http://sigil-server")
        .map_err(|e| NodeError::Bootstrap(e.to_string()))?
        // Each server gets SERVER_CONNECT_TIMEOUT; the connection waits for them all.
        .connect_timeout(
            SERVER_CONNECT_TIMEOUT
                .saturating_mul(u32::try_from(servers.addresses.len()).unwrap_or(u32::MAX))
                .max(Duration::from_secs(10)),
        )
        .http2_keep_alive_interval(Duration::from_secs(30));
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let servers = Arc::clone(&servers);
            async move {
                let tls = servers.connect(&connector).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}

/// Why a file holding the agent's key could not be read.
enum KeyFileError {
    Io(std::io::Error),
    Untrusted(sigil_daemon::PrivatePathError),
}

/// Reads a file that holds the agent's private key, once it is known to be the agent's own
/// (owner) and nobody else's to read (mode 0600).
fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).map_err(KeyFileError::Io)?;
    sigil_daemon::check_key_file(path, &file).map_err(KeyFileError::Untrusted)?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes).map_err(KeyFileError::Io)?;
    Ok(bytes)
}

fn load_state(
    dir: &Path,
    trust_domain: &TrustDomain,
) -> Result<Option<(Identity, SpiffeBundle)>, NodeError> {
    let path = dir.join(STATE_FILE);
    let text = match read_key_file(&path) {
        Ok(text) => text,
        Err(KeyFileError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(KeyFileError::Io(source)) => {
            return Err(NodeError::Io {
                what: format!("cannot read {}", path.display()),
                source,
            });
        }
        Err(KeyFileError::Untrusted(e)) => return Err(NodeError::Untrusted(e)),
    };
    let bad = |reason: String| NodeError::State {
        path: path.clone(),
        reason,
    };
    let state: StoredState = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let key = match &state.key {
        Some(key) => Zeroizing::new(
            STANDARD
                .decode(key.as_bytes())
                .map_err(|e| bad(e.to_string()))?,
        ),
        None => {
            let key_path = dir.join(KEY_FILE);
            read_key_file(&key_path).map_err(|e| match e {
                KeyFileError::Io(source) => NodeError::Io {
                    what: format!("cannot read {}", key_path.display()),
                    source,
                },
                KeyFileError::Untrusted(e) => NodeError::Untrusted(e),
            })?
        }
    };
    let id = SpiffeId::new(&state.spiffe_id).map_err(|e| bad(e.to_string()))?;
    if !id.is_member_of(trust_domain) {
        return Err(bad(format!("{id} is not in trust domain {trust_domain}")));
    }
    let der = STANDARD
        .decode(state.chain)
        .map_err(|e| bad(e.to_string()))?;
    let chain = X509Bundle::from_der(trust_domain.clone(), &der)
        .map_err(|e| bad(e.to_string()))?
        .authorities()
        .to_vec();
    let bundle_json = serde_json::to_vec(&state.bundle).map_err(|e| bad(e.to_string()))?;
    let bundle =
        SpiffeBundle::parse(trust_domain.clone(), &bundle_json).map_err(|e| bad(e.to_string()))?;
    let identity = Identity {
        id,
        chain,
        key: Arc::new(key),
        validity: Validity::from_parts(
            unsigned_seconds(state.issued_at),
            unsigned_seconds(state.not_after),
        ),
    };
    Ok(Some((identity, bundle)))
}

/// The time `secs` seconds after the epoch, as the state file stores it.
fn unsigned_seconds(secs: u64) -> SystemTime {
    i64::try_from(secs)
        .ok()
        .and_then(from_unix_seconds)
        .unwrap_or(UNIX_EPOCH)
}

fn store_state(dir: &Path, identity: &Identity, bundle: &SpiffeBundle) -> Result<(), NodeError> {
    let secs = |t: SystemTime| unix_seconds(t).unsigned_abs();
    let der: Vec<u8> = identity
        .chain
        .iter()
        .flat_map(|c| c.iter().copied())
        .collect();
    let state = StoredState {
        spiffe_id: identity.id.to_string(),
        key: Some(Zeroizing::new(STANDARD.encode(identity.key.as_slice()))),
        chain: STANDARD.encode(der),
        issued_at: secs(identity.validity.issued_at()),
        not_after: secs(identity.validity.not_after()),
        bundle: serde_json::from_slice(&bundle.to_json()).unwrap_or(serde_json::Value::Null),
    };
    let json = Zeroizing::new(
        serde_json::to_vec_pretty(&state).map_err(|e| NodeError::Key(e.to_string()))?,
    );
    // Key and certificate in one atomic write.
    write_private(&dir.join(STATE_FILE), &json)?;
    // The key file of an earlier build is stale now.
    match std::fs::remove_file(dir.join(KEY_FILE)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NodeError::Io {
            what: format!("cannot remove {}", dir.join(KEY_FILE).display()),
            source,
        }),
    }
}

/// Writes `bytes` to `path` atomically with mode 0600 (see [`sigil_daemon::write_private`]).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    sigil_daemon::write_private(path, bytes).map_err(|source| NodeError::Io {
        what: format!("cannot write {}", path.display()),
        source,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    /// A connection with a stored identity of `example.org`, kept in `data_dir`; nothing is
    /// dialed (the channel connects at its first call).
    pub(crate) fn offline_connection(data_dir: &Path) -> NodeConnection {
        let td = TrustDomain::new("example.org").unwrap();
        let (identity, bundle) = identity(&td);
        let servers = Arc::new(Servers {
            addresses: vec!["127.0.0.1:9".to_owned()],
            current: AtomicUsize::new(0),
        });
        NodeConnection::new(td, servers, data_dir, identity, bundle).unwrap()
    }

    /// An identity with a real certificate (self-signed, SPIFFE URI SAN) and key.
    fn identity(td: &TrustDomain) -> (Identity, SpiffeBundle) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let id = td
            .id(["sigil", "agent", "join_token", "0123456789abcdef"])
            .unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(id.as_str()).unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        let chain = vec![cert.der().clone()];
        let mut bundle = SpiffeBundle::new(td.clone());
        bundle.add_x509_authority(cert.der().clone()).unwrap();
        let now = SystemTime::now();
        let identity = Identity {
            id,
            chain,
            key: Arc::new(Zeroizing::new(key.serialize_der())),
            validity: Validity::from_parts(now, now + Duration::from_secs(3600)),
        };
        (identity, bundle)
    }

    #[test]
    fn key_and_certificate_are_one_atomic_write_and_an_earlier_layout_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let (first, bundle) = identity(&td);

        // An earlier build's layout: the key apart from the state.
        store_state(dir.path(), &first, &bundle).unwrap();
        let mut legacy: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        legacy.as_object_mut().unwrap().remove("key");
        sigil_daemon::write_private(&dir.path().join(STATE_FILE), legacy.to_string().as_bytes())
            .unwrap();
        sigil_daemon::write_private(&dir.path().join(KEY_FILE), first.key.as_slice()).unwrap();
        let (loaded, _) = load_state(dir.path(), &td).unwrap().unwrap();
        assert_eq!(loaded.key.as_slice(), first.key.as_slice());

        // A renewal: one file holds key and certificate; the old key file is gone.
        let (second, _) = identity(&td);
        store_state(dir.path(), &second, &bundle).unwrap();
        assert!(!dir.path().join(KEY_FILE).exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(STATE_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let (loaded, _) = load_state(dir.path(), &td).unwrap().unwrap();
        assert_eq!(loaded.key.as_slice(), second.key.as_slice());
        assert_eq!(loaded.chain, second.chain);

        // A crash in the middle of the next write leaves its temporary file behind, and the
        // state as it was: the agent starts with a key that matches its certificate.
        std::fs::write(
            dir.path().join(format!(".{STATE_FILE}.tmp-1")),
            b"{\"spiffe_id\": \"half-writ",
        )
        .unwrap();
        let (loaded, _) = load_state(dir.path(), &td).unwrap().unwrap();
        assert_eq!(loaded.key.as_slice(), second.key.as_slice());
        assert_eq!(loaded.chain, second.chain);
    }
}
