//! The composition root: builds every component of a running server in order, hands each the
//! narrow interface it needs, and runs the long-lived tasks under one shutdown signal.
//!
//! Order: data directory -> store -> CA (keys + journal) -> audit log (its signing key sits in
//! the key directory beside the CA's) -> the server's own SVID -> bundle publication -> the
//! agent-facing API (TCP, mTLS). A rotation task rotates the authorities, republishes the
//! bundle when it changes and renews the server SVID before it expires. A session task expires
//! privileged sessions at their end (server clock), and a CRL task re-signs the revocation
//! lists when the authorities change and before they go stale. A checkpoint task signs
//! the audit chain head every [`Server::audit_checkpoint_interval`] when it moved, and once
//! more when the server stops (gracefully or not, but not when it is killed).
//!
//! Shutdown ([`Shutdown`]): `Graceful` stops accepting connections, tells open streams to end,
//! and gives them [`DRAIN_TIMEOUT`] before closing whatever is left; `Immediate` returns at once.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_core::SpiffeId;
use sigil_core::lifetime::Validity;
use sigil_core::tls::SharedBundles;
use sigil_proto::admin::admin_server::AdminServer;
use sigil_proto::node::node_server::NodeServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tracing::{Instrument, error, info, info_span, warn};

use crate::api::admin::{AdminService, AdminSettings, AdminSocketError, bind_admin_socket};
use crate::api::entry_cache::EntryCache;
use crate::api::node::{
    BundleSnapshot, EntryTtls, IssuedJwt, IssuedSvid, NodeAuthority, NodeService, SignError, hex,
};
use crate::audit::{self, AuditError, AuditLog};
use crate::ca::{
    Ca, CaError, CaJournalStore, CaJournalStoreError, DiskKeyManager, KeyManager,
    WorkloadX509SvidParams,
};
use crate::config::ServerConfig;
use crate::session::crl::CrlPublisher;
use crate::session::{SessionSettings, Sessions};
use crate::store::sled::{SledStore, SledStoreOptions};
use crate::store::{RegistrationEntry, Store};
use crate::tls::{self, ServerCertificate};

/// How long open streams get to finish after a graceful shutdown begins.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the rotation task runs.
const ROTATION_INTERVAL: Duration = Duration::from_secs(1);

/// Largest gRPC message the agent-facing API accepts.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The key directory could not be used.
    #[error("cannot use the key directory: {0}")]
    Keys(#[from] crate::ca::KeyError),
    /// The CA could not start.
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    /// The audit log's signing key could not be loaded or created.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// The server's own key could not be made.
    #[error("cannot create the server key")]
    ServerKey,
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The agent-facing API could not listen.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The admin socket could not be set up.
    #[error(transparent)]
    AdminSocket(#[from] AdminSocketError),
    /// The certificate revocation lists could not be published.
    #[error("crls: {0}")]
    Crl(#[from] crate::session::crl::CrlError),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Stop accepting, let streams drain for at most [`DRAIN_TIMEOUT`], then stop.
    Graceful,
    /// Stop now.
    Immediate,
}

/// A started server: its components, for the caller (and tests) to use.
pub struct Server {
    /// The address the agent-facing API listens on (the bound one, if port 0 was asked for).
    pub local_addr: SocketAddr,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The CA.
    pub ca: Arc<Ca>,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// How often the audit chain head is signed when it moved (default
    /// [`audit::DEFAULT_CHECKPOINT_INTERVAL`]); set it before [`Server::run`].
    pub audit_checkpoint_interval: Duration,
    config: ServerConfig,
    entries: Arc<EntryCache>,
    listener: TcpListener,
    admin_listener: tokio::net::UnixListener,
    bundles: SharedBundles,
    certificate: ServerCertificate,
    bundle_tx: watch::Sender<u64>,
}

// === impl Server ===

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("trust_domain", &self.config.trust_domain)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store and the CA and binds the agent-facing API; nothing is served until
    /// [`Server::run`].
    pub async fn start(config: ServerConfig) -> Result<Self, ServerError> {
        create_private_dir(&config.data_dir)?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(
            config.data_dir.join("store"),
            SledStoreOptions {
                cache_capacity_bytes: Some(config.store_cache_bytes),
                ..SledStoreOptions::default()
            },
        )?);
        let keys: Arc<dyn KeyManager> =
            Arc::new(DiskKeyManager::new(config.data_dir.join("keys"))?);
        let journal: Arc<dyn CaJournalStore> = Arc::new(JournalStore(store.clone()));
        let now = SystemTime::now();
        let ca = Arc::new(
            Ca::load_or_init(
                config.trust_domain.clone(),
                config.ca_ttl,
                keys.clone(),
                journal,
                now,
            )
            .await?,
        );
        let audit = Arc::new(AuditLog::open(store.clone(), keys).await?);
        let entries = EntryCache::load(store.clone()).await?;
        info!(key_fingerprint = %audit.key_fingerprint(), "audit log ready");
        info!(trust_domain = %config.trust_domain, sequence = ca.bundle_sequence(), "certificate authority ready");

        let bundles = SharedBundles::from_bundle(ca.x509_bundle());
        let (chain, key, _) = server_svid(&ca, &config, now)?;
        let certificate = ServerCertificate::new(chain, key)?;
        let listener = TcpListener::bind(config.bind_address)
            .await
            .map_err(|source| ServerError::Bind {
                address: config.bind_address,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            address: config.bind_address,
            source,
        })?;
        let admin_listener = bind_admin_socket(&config.admin_socket).await?;
        let (bundle_tx, _) = watch::channel(ca.bundle_sequence());
        Ok(Self {
            local_addr,
            store,
            ca,
            audit,
            audit_checkpoint_interval: audit::DEFAULT_CHECKPOINT_INTERVAL,
            config,
            entries,
            listener,
            admin_listener,
            bundles,
            certificate,
            bundle_tx,
        })
    }

    /// Serves until `shutdown` yields, then stops as it says.
    pub async fn run(
        self,
        shutdown: impl Future<Output = Shutdown> + Send,
    ) -> Result<(), ServerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let authority: Arc<dyn NodeAuthority> = Arc::new(CaAuthority {
            ca: self.ca.clone(),
            bundle_tx: self.bundle_tx.clone(),
            ttls: EntryTtls {
                x509_default: self.config.default_x509_svid_ttl,
                jwt_default: self.config.default_jwt_svid_ttl,
                max: self.config.max_svid_ttl(),
            },
            agent_ttl: self.config.agent_svid_ttl,
            jwt_issuer: self.config.jwt_issuer.clone(),
        });
        let crls = Arc::new(CrlPublisher::new(self.ca.clone(), self.store.clone()));
        crls.publish(SystemTime::now()).await?;
        let sessions = Arc::new(Sessions::new(
            self.store.clone(),
            self.audit.clone(),
            crls.clone(),
            SessionSettings {
                trust_domain: self.config.trust_domain.clone(),
                max_session_ttl: self.config.max_session_ttl,
                session_svid_ttl: self.config.session_svid_ttl,
                require_session_approval: self.config.require_session_approval,
                max_svid_ttl: self.config.max_svid_ttl(),
            },
        ));
        sessions.load().await?;
        let entry_cache = tokio::spawn(
            self.entries
                .clone()
                .run(stop_rx.clone())
                .instrument(info_span!("entry_cache")),
        );
        let node = NodeService::new(
            self.config.trust_domain.clone(),
            self.store.clone(),
            self.entries.clone(),
            authority,
            self.bundles.clone(),
            stop_rx.clone(),
            crls.subscribe(),
        );
        let expiry = tokio::spawn(
            sessions
                .clone()
                .run_expiry(stop_rx.clone())
                .instrument(info_span!("sessions")),
        );
        let crl_refresh = tokio::spawn(
            crls.clone()
                .run(self.bundle_tx.subscribe(), stop_rx.clone())
                .instrument(info_span!("crls")),
        );

        let rotation = tokio::spawn(
            rotation_task(
                self.ca.clone(),
                self.config.clone(),
                self.bundles.clone(),
                self.certificate.clone(),
                self.bundle_tx.clone(),
                stop_rx.clone(),
            )
            .instrument(info_span!("rotation")),
        );

        let checkpoints = tokio::spawn(
            audit::run_checkpoints(
                self.audit.clone(),
                self.audit_checkpoint_interval,
                stop_rx.clone(),
            )
            .instrument(info_span!("audit")),
        );

        let tls_config = Arc::new(tls::server_config(
            self.certificate.clone(),
            self.bundles.clone(),
        )?);
        let incoming = ReceiverStream::new(tls::incoming(self.listener, tls_config));
        let mut stop_serving = stop_rx.clone();
        let serve = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(
                NodeServer::new(node)
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(MAX_MESSAGE_SIZE),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop_serving.wait_for(|stop| *stop).await;
            });
        info!(address = %self.local_addr, "agent-facing api listening");

        let admin = AdminService::new(
            self.store.clone(),
            self.ca.clone(),
            self.audit.clone(),
            sessions.clone(),
            AdminSettings {
                trust_domain: self.config.trust_domain.clone(),
                admin_uids: self.config.admin_uids.clone(),
                default_x509_svid_ttl: self.config.default_x509_svid_ttl,
                default_jwt_svid_ttl: self.config.default_jwt_svid_ttl,
                max_svid_ttl: self.config.max_svid_ttl(),
                jwt_issuer: self.config.jwt_issuer.clone(),
            },
        );
        let mut stop_admin = stop_rx.clone();
        let admin_socket = self.config.admin_socket.clone();
        let admin_serve = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    AdminServer::new(admin)
                        .max_decoding_message_size(MAX_MESSAGE_SIZE)
                        .max_encoding_message_size(MAX_MESSAGE_SIZE),
                )
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(self.admin_listener),
                    async move {
                        let _ = stop_admin.wait_for(|stop| *stop).await;
                    },
                ),
        );
        info!(path = %admin_socket.display(), "admin api listening");
        let _remove_socket = RemoveOnDrop(admin_socket);

        tokio::pin!(serve);
        let how = tokio::select! {
            result = &mut serve => {
                let _ = stop_tx.send(true);
                rotation.abort();
                expiry.abort();
                entry_cache.abort();
                crl_refresh.abort();
                final_checkpoint(checkpoints).await;
                return result.map_err(ServerError::from);
            }
            how = shutdown => how,
        };
        let _ = stop_tx.send(true);
        rotation.abort();
        expiry.abort();
        crl_refresh.abort();
        admin_serve.abort();
        match how {
            Shutdown::Immediate => info!("stopping now"),
            Shutdown::Graceful => {
                info!(timeout = ?DRAIN_TIMEOUT, "stopping: draining open streams");
                match tokio::time::timeout(DRAIN_TIMEOUT, &mut serve).await {
                    Ok(result) => result?,
                    Err(_) => warn!("streams still open after the drain timeout; closing them"),
                }
            }
        }
        // After the APIs stopped, so that nothing is appended after the last checkpoint.
        final_checkpoint(checkpoints).await;
        info!("server stopped");
        Ok(())
    }
}

/// Waits (at most [`DRAIN_TIMEOUT`]) for the checkpoint task, told to stop, to sign its last
/// checkpoint.
async fn final_checkpoint(task: tokio::task::JoinHandle<()>) {
    match tokio::time::timeout(DRAIN_TIMEOUT, task).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, "audit checkpoint task failed"),
        Err(_) => warn!("audit checkpoint at shutdown timed out"),
    }
}

// === the CA as the node API's authority ===

struct CaAuthority {
    ca: Arc<Ca>,
    bundle_tx: watch::Sender<u64>,
    ttls: EntryTtls,
    agent_ttl: Duration,
    jwt_issuer: Option<String>,
}

impl NodeAuthority for CaAuthority {
    fn sign_agent_svid(
        &self,
        agent_id: &SpiffeId,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, SignError> {
        let svid = self
            .ca
            .sign_agent_x509_svid(agent_id, csr_der, self.agent_ttl, now)
            .map_err(sign_error)?;
        Ok(issued(svid))
    }

    fn sign_workload_svid(
        &self,
        entry: &RegistrationEntry,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, SignError> {
        let params = WorkloadX509SvidParams {
            spiffe_id: entry.spiffe_id.clone(),
            dns_names: entry.dns_names.clone(),
            ttl: entry
                .x509_svid_ttl
                .unwrap_or(self.ttls.x509_default)
                .min(self.ttls.max),
            caps: entry.expires_at.into_iter().collect(),
        };
        let svid = self
            .ca
            .sign_workload_x509_svid(&params, csr_der, now)
            .map_err(sign_error)?;
        Ok(issued(svid))
    }

    fn sign_jwt_svid(
        &self,
        entry: &RegistrationEntry,
        audience: &[String],
        now: SystemTime,
    ) -> Result<IssuedJwt, SignError> {
        let mut ttl = entry
            .jwt_svid_ttl
            .unwrap_or(self.ttls.jwt_default)
            .min(self.ttls.max);
        if let Some(end) = entry.expires_at {
            // A JWT-SVID never outlives its entry (a privileged session's end).
            ttl = ttl.min(end.duration_since(now).unwrap_or(Duration::ZERO));
        }
        let jwt = self
            .ca
            .sign_jwt_svid(
                &entry.spiffe_id,
                audience,
                ttl,
                now,
                self.jwt_issuer.as_deref(),
            )
            .map_err(sign_error)?;
        Ok(IssuedJwt {
            token: jwt.token().to_owned(),
            expires_at: jwt.expiry(),
        })
    }

    fn bundle(&self) -> BundleSnapshot {
        let bundle = self.ca.bundle();
        BundleSnapshot {
            trust_domain: self.ca.trust_domain().clone(),
            sequence: bundle.sequence().unwrap_or_default(),
            spiffe_json: bundle.to_json(),
        }
    }

    fn subscribe_bundle(&self) -> watch::Receiver<u64> {
        self.bundle_tx.subscribe()
    }

    fn ttls(&self) -> EntryTtls {
        self.ttls
    }
}

fn issued(svid: crate::ca::IssuedX509Svid) -> IssuedSvid {
    IssuedSvid {
        spiffe_id: svid.spiffe_id().clone(),
        serial: hex(svid.serial()),
        not_after: svid.not_after(),
        chain_der: svid.certificate().to_vec(),
        authority_id: svid.authority_id().to_owned(),
    }
}

/// Errors caused by the request (the CSR, the ID, the audience) are the caller's to fix; the
/// rest are the server's.
fn sign_error(error: CaError) -> SignError {
    match error {
        CaError::CsrTooLarge { .. }
        | CaError::MalformedCsr { .. }
        | CaError::CsrSignatureInvalid
        | CaError::UnsupportedKey { .. }
        | CaError::MalformedPublicKey { .. }
        | CaError::ForeignTrustDomain { .. }
        | CaError::RootId { .. }
        | CaError::ReservedId { .. }
        | CaError::NotAgentId { .. }
        | CaError::InvalidDnsName { .. }
        | CaError::EmptyAudience
        | CaError::TtlTooShort { .. }
        | CaError::Lifetime(_) => SignError::InvalidRequest(error.to_string()),
        other => SignError::Internal(other.to_string()),
    }
}

// === tasks ===

/// Rotates the authorities every [`ROTATION_INTERVAL`], republishes the bundle when it changed,
/// and renews the server's own SVID at half its life.
async fn rotation_task(
    ca: Arc<Ca>,
    config: ServerConfig,
    bundles: SharedBundles,
    certificate: ServerCertificate,
    bundle_tx: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut server_validity = None::<Validity>;
    let mut failures = 0u32;
    loop {
        let now = SystemTime::now();
        match ca.rotate(now).await {
            Ok(changed) => {
                failures = 0;
                if changed {
                    bundles.replace(ca.x509_bundle());
                    bundle_tx.send_replace(ca.bundle_sequence());
                    info!(sequence = ca.bundle_sequence(), "bundle changed");
                }
            }
            Err(e) => {
                failures += 1;
                if failures <= 3 {
                    error!(error = %e, "authority rotation failed");
                } else {
                    tracing::debug!(error = %e, "authority rotation failed again");
                }
            }
        }
        let renew =
            server_validity.is_none_or(|v| v.should_renew(now, server_svid_ttl(&config), &[]));
        if renew {
            match server_svid(&ca, &config, now) {
                Ok((chain, key, not_after)) => match certificate.replace(chain, key) {
                    Ok(()) => server_validity = Some(Validity::from_parts(now, not_after)),
                    Err(e) => warn!(error = %e, "cannot install the renewed server svid"),
                },
                Err(e) => warn!(error = %e, "cannot renew the server svid"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(ROTATION_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn server_svid_ttl(config: &ServerConfig) -> Duration {
    config.agent_svid_ttl.min(config.max_svid_ttl())
}

/// A fresh P-256 key and its SVID `spiffe://TD/sigil/server`, with the SVID's NotAfter.
fn server_svid(
    ca: &Ca,
    config: &ServerConfig,
    now: SystemTime,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        SystemTime,
    ),
    ServerError,
> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &rng,
    )
    .map_err(|_| ServerError::ServerKey)?;
    let key_pair = rcgen::KeyPair::try_from(pkcs8.as_ref()).map_err(|_| ServerError::ServerKey)?;
    let svid = ca.sign_server_x509_svid(
        &rcgen::PublicKeyData::subject_public_key_info(&key_pair),
        server_svid_ttl(config),
        now,
    )?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec()));
    let not_after = svid.not_after();
    Ok((vec![svid.into_certificate()], key, not_after))
}

/// Creates `path` (and its parents) with mode 0700 if it does not exist.
fn create_private_dir(path: &Path) -> Result<(), ServerError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| ServerError::DataDir {
            path: path.to_owned(),
            source,
        })
}

/// Removes the admin socket file when the server stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The store as the CA's journal store.
struct JournalStore(Arc<dyn Store>);

#[async_trait]
impl CaJournalStore for JournalStore {
    async fn load_ca_journal(&self) -> Result<Option<Vec<u8>>, CaJournalStoreError> {
        self.0
            .load_ca_journal()
            .await
            .map_err(CaJournalStoreError::new)
    }

    async fn save_ca_journal(&self, journal: Vec<u8>) -> Result<(), CaJournalStoreError> {
        self.0
            .save_ca_journal(journal)
            .await
            .map_err(CaJournalStoreError::new)
    }
}
