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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sigil_attestors::x509pop::X509Pop;
use sigil_core::lifetime::Validity;
use sigil_proto::admin::admin_server::AdminServer;
use sigil_proto::audit::audit_ingest_server::AuditIngestServer;
use sigil_proto::node::node_server::NodeServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument, error, info, info_span, warn};

use crate::api::admin::{
    AdminService, AdminServices, AdminSocketError, bind_admin_socket, split_by_uid,
};
use crate::api::ingest::AuditIngestService;
use crate::api::node::NodeService;
use crate::bundle_endpoint::BundleEndpoint;
use crate::ca::{
    Ca, CaError, DiskKeyManager, KeyManager, Pkcs11KeyManager, Pkcs11OpenError, UpstreamAuthority,
};
use crate::config::ServerConfig;
use crate::policy::SessionOnly;
use crate::service::agents::Agents;
use crate::service::audit::{self, AuditError, AuditLog};
use crate::service::audit_peers::{self, PeerChains};
use crate::service::authority::{Authority, SignError, StoreJournal};
use crate::service::bundles::Bundles;
use crate::service::crl::{CrlError, CrlPublisher};
use crate::service::entries::Entries;
use crate::service::entry_cache::EntryCache;
use crate::service::federation::{FederatedBundles, Federation};
use crate::service::ingest::AuditIngest;
use crate::service::metrics;
use crate::service::sessions::{SessionRules, Sessions};
use crate::service::svids::Svids;
use crate::service::sync::{EntrySync, Histories};
use crate::store::StoreError;
use crate::store::postgres::{PostgresOptions, PostgresStore};
use crate::store::sled::{SledStore, SledStoreOptions};
use crate::store::{HistoryId, Store};
use crate::tls::{self, ServerCertificate};
use sigil_daemon::limits::ConnectionLimit;
use sigil_daemon::telemetry::{GrpcMetrics, HttpEndpoints, ReadyCheck};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use zeroize::Zeroizing;

pub use sigil_daemon::{DRAIN_TIMEOUT, Shutdown};

/// How often the rotation task runs (and so how soon another server's new authorities reach
/// this server's bundle).
const ROTATION_INTERVAL: Duration = Duration::from_secs(1);

/// How often the server looks for other servers' audit chains to pin their keys.
const PIN_INTERVAL: Duration = Duration::from_secs(5);

/// How often the server records that it is alive in the store (`servers.heartbeat_at`).
pub(crate) const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Largest gRPC message the agent-facing API accepts.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// Admin socket connections of uid 0 and `admin_uids` served at once; those beyond are closed
/// when accepted.
const MAX_ADMIN_CONNECTIONS: usize = 256;

/// Admin socket connections of other uids served at once (each gets one stream, to be told it
/// may not call).
const MAX_NON_ADMIN_CONNECTIONS: usize = 16;

/// The largest message on a connection of a uid that may not use the admin API.
const NON_ADMIN_MESSAGE_SIZE: usize = 16 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The data directory could not be created, or is not this server's alone.
    #[error("data directory")]
    DataDir(#[from] sigil_daemon::PrivatePathError),
    /// The store could not be opened.
    #[error("store")]
    Store(#[from] crate::store::StoreError),
    /// The key directory could not be used.
    #[error("cannot use the key directory")]
    Keys(#[from] crate::ca::KeyError),
    /// The CA could not start.
    #[error("certificate authority")]
    Ca(#[from] CaError),
    /// The audit log's signing key could not be loaded or created.
    #[error("audit log")]
    Audit(#[from] AuditError),
    /// The server's own SVID could not be made.
    #[error("cannot create the server svid")]
    ServerSvid(#[from] SignError),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The PKCS#11 token cannot be used.
    #[error(transparent)]
    Pkcs11(#[from] Pkcs11OpenError),
    /// The PKCS#11 PIN file cannot be used.
    #[error("pkcs11_pin_file {path}: {reason}")]
    Pkcs11Pin {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The upstream CA's files could not be read.
    #[error("{path}: {reason}")]
    UpstreamFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The x509pop CA bundle could not be read or used.
    #[error("x509pop_ca_bundle_path {path}: {reason}")]
    X509Pop {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The agent-facing API could not listen.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The metrics or health listener could not be bound.
    #[error(transparent)]
    Http(#[from] sigil_daemon::telemetry::BindError),
    /// The admin socket could not be set up.
    #[error(transparent)]
    AdminSocket(#[from] AdminSocketError),
    /// Entries name IDs under `session_only_ids`: the rule would not hold, so nothing starts.
    #[error(
        "{} registration entries name IDs under session_only_ids, which only approved sessions \
         may grant; delete them (sigil-server entry delete --id ID) or remove their prefix from \
         session_only_ids, then start again:\n{}",
        .0.len(),
        .0.join("\n")
    )]
    SessionOnlyEntries(Vec<String>),
    /// The certificate revocation lists could not be published.
    #[error("crls")]
    Crl(#[from] CrlError),
    /// The gRPC server failed.
    #[error("grpc server")]
    Transport(#[from] tonic::transport::Error),
    /// The bundle endpoint cannot start.
    #[error(transparent)]
    BundleEndpoint(#[from] crate::bundle_endpoint::BundleEndpointError),
    /// The system's random number generator failed.
    #[error("the system's random number generator failed")]
    Random,
}

/// A started server: its components, for the caller (and tests) to use.
pub struct Server {
    /// The address the agent-facing API listens on (the bound one, if port 0 was asked for).
    pub local_addr: SocketAddr,
    store: Arc<dyn Store>,
    authority: Arc<Authority>,
    audit: Arc<AuditLog>,
    audit_peers: Arc<PeerChains>,
    /// How often the audit chain head is signed when it moved (default
    /// 60 s); set it before [`Server::run`].
    pub audit_checkpoint_interval: Duration,
    config: ServerConfig,
    entries: Arc<EntryCache>,
    /// The change feed's histories agents may resume from.
    histories: Histories,
    listener: TcpListener,
    admin_listener: tokio::net::UnixListener,
    certificate: ServerCertificate,
    http: HttpEndpoints,
    bundle_endpoint: Option<BundleEndpoint>,
}

/// Opens the store the configuration names: sled in `data_dir`, or PostgreSQL.
pub(crate) async fn open_store(config: &ServerConfig) -> Result<Arc<dyn Store>, ServerError> {
    Ok(match &config.postgres {
        None => Arc::new(SledStore::open(
            config.data_dir.join("store"),
            SledStoreOptions {
                cache_capacity_bytes: Some(config.store_cache_bytes),
                server_id: config.server_id.clone(),
                ..SledStoreOptions::default()
            },
        )?),
        Some(_) => {
            let store = open_store_postgres(config).await?;
            info!(database = ?store, "store: postgres");
            Arc::new(store)
        }
    })
}

/// How long [`snapshot_store_after_stop`] waits for the stopped server's last handle on its
/// sled store to be gone.
const STORE_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// The last step of a clean stop, once the server's runtime is shut down (nothing of the server
/// holds its store any more): with the sled store, has sled write its page-table snapshot, so
/// that the next start reads that instead of the whole log written since this start. The stop
/// takes about the time the next start saves. A failure costs the next start its speed only: it
/// is logged as a warning, not returned. Does nothing with PostgreSQL.
pub fn snapshot_store_after_stop(config: &ServerConfig) {
    if config.postgres.is_some() {
        return;
    }
    let path = config.data_dir.join("store");
    let started = Instant::now();
    match SledStore::write_snapshot(&path, Some(config.store_cache_bytes), STORE_RELEASE_WAIT) {
        Ok(true) => info!(
            took = ?started.elapsed(),
            "store: snapshot written; the next start reads it instead of the whole log"
        ),
        Ok(false) => {}
        Err(error) => warn!(
            %error,
            "store: no snapshot written at stop; the next start re-reads the whole log"
        ),
    }
}

/// Opens the PostgreSQL store the configuration names.
async fn open_store_postgres(config: &ServerConfig) -> Result<PostgresStore, StoreError> {
    let Some(postgres) = &config.postgres else {
        return Err(StoreError::Config("the store is not postgres".to_owned()));
    };
    let mut options = PostgresOptions::new(postgres.url.clone());
    options.password = postgres_password(postgres.password_file.as_deref())?;
    options.ca_file = postgres.ca_file.clone();
    options.pool_size = postgres.pool_size;
    options.server_id = config.server_id.clone();
    PostgresStore::open(options).await
}

/// The database password: the file's first line (the file must be 0600 or stricter), else
/// `PGPASSWORD`, else none.
fn postgres_password(file: Option<&Path>) -> Result<Option<Zeroizing<String>>, StoreError> {
    let Some(path) = file else {
        return Ok(std::env::var("PGPASSWORD").ok().map(Zeroizing::new));
    };
    use std::io::Read as _;
    let shown = path.display();
    let problem =
        |e: std::io::Error| StoreError::Config(format!("postgres_password_file {shown}: {e}"));
    // One handle for the check and the read, so the file checked is the file read.
    let mut file = std::fs::File::open(path).map_err(problem)?;
    let metadata = file.metadata().map_err(problem)?;
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(StoreError::Config(format!(
            "postgres_password_file {shown} is readable by group or others (mode {:o}): \
             chmod 600 it",
            metadata.permissions().mode() & 0o777
        )));
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text).map_err(problem)?;
    let password = text.lines().next().unwrap_or("");
    if password.is_empty() {
        return Err(StoreError::Config(format!(
            "postgres_password_file {shown} is empty"
        )));
    }
    Ok(Some(Zeroizing::new(password.to_owned())))
}

/// `sigil-server store migrate --from FROM --to TO` (see
/// [`StoreCommand::Migrate`](crate::cli::StoreCommand::Migrate)).
pub(crate) async fn migrate_store(
    from: &Path,
    to: &Path,
) -> anyhow::Result<std::process::ExitCode> {
    use anyhow::{Context as _, bail};
    let read = |path: &Path| -> anyhow::Result<ServerConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        ServerConfig::from_sources(Some(&text), crate::config::Overrides::default())
            .with_context(|| format!("config file {}", path.display()))
    };
    let (from_config, to_config) = (read(from)?, read(to)?);
    if from_config.postgres.is_some() {
        bail!("--from must name a sled store (its store is postgres already)");
    }
    if to_config.postgres.is_none() {
        bail!("--to must name a PostgreSQL store (store = \"postgres\")");
    }
    if from_config.trust_domain != to_config.trust_domain {
        bail!(
            "the trust domains differ ({} and {}): a migration moves one server's store",
            from_config.trust_domain,
            to_config.trust_domain
        );
    }
    if to_config.server_id != crate::store::DEFAULT_SERVER_ID {
        bail!(
            "--to has server_id = {:?}, but the sled store's CA journal and audit chain are \
             those of server \"default\" (the chain's id is sealed into every record): set \
             server_id = \"default\" in --to's configuration; servers added later take names \
             of their own",
            to_config.server_id
        );
    }
    if from_config.data_dir != to_config.data_dir {
        bail!(
            "data_dir differs ({} and {}): the CA and audit keys stay in data_dir, so both \
             configurations must name the same one",
            from_config.data_dir.display(),
            to_config.data_dir.display()
        );
    }
    let sled_dir = from_config.data_dir.join("store");
    if !sled_dir.is_dir() {
        bail!("no sled store at {}", sled_dir.display());
    }
    let source = SledStore::open(
        &sled_dir,
        SledStoreOptions {
            cache_capacity_bytes: Some(from_config.store_cache_bytes),
            ..SledStoreOptions::default()
        },
    )
    .map_err(|e| match e {
        // Says which store, and what to do.
        StoreError::Locked { .. } => anyhow::Error::new(e),
        e => anyhow::Error::new(e).context(format!(
            "cannot open the sled store at {}",
            sled_dir.display()
        )),
    })?;
    let target = open_store_postgres(&to_config)
        .await
        .context("cannot open the PostgreSQL store")?;
    let report = crate::store::migrate::sled_to_postgres(&source, &target)
        .await
        .context("migration failed")?;
    #[allow(clippy::print_stdout, reason = "the command's report")]
    {
        println!("migrated {report}");
        println!(
            "start the server with {} (the sled files in {} are no longer read)",
            to.display(),
            sled_dir.display()
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
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
        sigil_daemon::check_private_dir(&config.data_dir, 0o700)?;
        let store = open_store(&config).await?;
        let keys = key_manager(&config)?;
        let now = SystemTime::now();
        let ca = Arc::new(
            Ca::load_or_init_under(
                config.trust_domain.clone(),
                config.ca_ttl,
                keys.clone(),
                Arc::new(StoreJournal {
                    store: store.clone(),
                    server_id: config.server_id.clone(),
                }),
                upstream(&config, now)?,
                now,
            )
            .await?,
        );
        let audit = Arc::new(
            AuditLog::open(
                store.clone(),
                keys,
                &config.server_id,
                config.data_dir.join("keys").join(audit::STATE_FILE),
            )
            .await?,
        );
        // The genesis checkpoint (or one of a head that moved while the server was down),
        // before anything is served.
        audit.prepare(now).await?;
        let audit_peers = Arc::new(PeerChains::open(
            store.clone(),
            &config.server_id,
            config.audit_peer_keys.clone(),
            config.data_dir.join("keys").join(audit_peers::PINS_FILE),
        )?);
        // Not fatal: a peer's chain that cannot be read now is pinned by the task later, and
        // `audit verify` reports it.
        if let Err(error) = audit_peers.pin_new(now).await {
            warn!(%error, "cannot pin the other servers' audit keys yet");
        }
        let session_only = SessionOnly::new(config.session_only_ids.clone());
        refuse_session_only_entries(store.as_ref(), &session_only).await?;
        let entries = EntryCache::load(store.clone()).await?;
        entries.set_max_staleness(config.max_store_staleness);
        info!(key_fingerprint = %audit.key_fingerprint(), "audit log ready");
        info!(trust_domain = %config.trust_domain, sequence = ca.bundle_sequence(), "certificate authority ready");

        let authority = Arc::new(
            Authority::new(ca, config.ttl_policy(), config.jwt_issuer.clone())
                .with_session_only(session_only)
                .with_shared_bundle(store.clone(), config.server_id.clone()),
        );
        // Every server's authorities, before anything is served or verified.
        authority.sync_shared_bundle(now).await?;
        let svid = authority.server_svid(now)?;
        let certificate = ServerCertificate::new(svid.chain, svid.key)?;
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
        let http = HttpEndpoints::bind(config.metrics_address, config.health_address).await?;
        let bundle_endpoint = match &config.bundle_endpoint {
            Some(endpoint) => Some(BundleEndpoint::bind(endpoint, certificate.clone()).await?),
            None => None,
        };
        // This run's history of the change feed, once nothing can stop the start any more (a
        // start that failed would use up one of the histories kept): agents resume only from
        // revisions the store is known to share with it (a store restored from an older copy
        // reuses the numbers).
        let histories = Histories::new(store.begin_history(random_history_id()?).await?);
        Ok(Self {
            local_addr,
            store,
            authority,
            audit,
            audit_peers,
            audit_checkpoint_interval: audit::DEFAULT_CHECKPOINT_INTERVAL,
            config,
            entries,
            histories,
            listener,
            admin_listener,
            certificate,
            http,
            bundle_endpoint,
        })
    }

    /// Serves until `shutdown` yields, then stops as it says.
    pub async fn run(
        self,
        shutdown: impl Future<Output = Shutdown> + Send,
    ) -> Result<(), ServerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let store = &self.store;
        let authority = &self.authority;
        let audit = &self.audit;
        let crls = Arc::new(CrlPublisher::new(
            authority.ca().clone(),
            store.clone(),
            self.config.server_id.clone(),
        ));
        crls.publish(SystemTime::now()).await?;
        let sessions = Arc::new(Sessions::new(
            store.clone(),
            audit.clone(),
            crls.clone(),
            authority.clone(),
            self.entries.clone(),
            SessionRules {
                require_approval: self.config.require_session_approval,
                approver_uids: self.config.session_approver_uids.clone(),
            },
        ));
        sessions.load().await?;
        let agents = Arc::new(Agents::new(
            store.clone(),
            audit.clone(),
            authority.clone(),
            crls.clone(),
            x509pop(&self.config)?,
        ));
        let svids = Arc::new(Svids::new(
            audit.clone(),
            authority.clone(),
            self.entries.clone(),
        ));
        let token_pruning = tokio::spawn(
            agents
                .clone()
                .run_token_pruning(stop_rx.clone())
                .instrument(info_span!("join_tokens")),
        );
        let entry_cache = tokio::spawn(
            self.entries
                .clone()
                .run(stop_rx.clone())
                .instrument(info_span!("entry_cache")),
        );
        let federated = FederatedBundles::load(store.clone()).await?;
        let federation = Arc::new(Federation::new(
            store.clone(),
            audit.clone(),
            authority.clone(),
            federated.clone(),
            self.config.server_id.clone(),
            self.config.federation_min_poll,
        ));
        let federated_refresh = tokio::spawn(
            federated
                .clone()
                .run(stop_rx.clone())
                .instrument(info_span!("federation")),
        );
        let federation_polling = tokio::spawn(
            federation
                .clone()
                .run_polling(stop_rx.clone())
                .instrument(info_span!("federation")),
        );
        let bundle_endpoint = self.bundle_endpoint.map(|endpoint| {
            tokio::spawn(
                endpoint
                    .serve(authority.clone(), stop_rx.clone())
                    .instrument(info_span!("bundle_endpoint")),
            )
        });
        let entry_sync = EntrySync::new(
            self.entries.clone(),
            authority.clone(),
            crls.clone(),
            audit.clone(),
            agents.clone(),
            federated.clone(),
            stop_rx.clone(),
        )
        .with_histories(self.histories.clone());
        let node_sync_metrics = entry_sync.metrics().clone();
        let node = NodeService::new(
            agents.clone(),
            svids.clone(),
            sessions.clone(),
            entry_sync,
            *authority.ttls(),
        );
        let expiry = tokio::spawn(
            sessions
                .clone()
                .run_expiry(stop_rx.clone())
                .instrument(info_span!("sessions")),
        );
        let crl_refresh = tokio::spawn(
            crls.clone()
                .run(authority.subscribe(), stop_rx.clone())
                .instrument(info_span!("crls")),
        );

        let rotation = tokio::spawn(
            rotation_task(authority.clone(), self.certificate.clone(), stop_rx.clone())
                .instrument(info_span!("rotation")),
        );

        let checkpoints = tokio::spawn(
            audit::run_checkpoints(
                audit.clone(),
                self.audit_checkpoint_interval,
                stop_rx.clone(),
            )
            .instrument(info_span!("audit")),
        );

        let mut registry = metrics::registry(metrics::Sources {
            authority: authority.clone(),
            entries: self.entries.clone(),
            crls: crls.clone(),
            audit: audit.clone(),
            sessions: sessions.metrics().clone(),
            sync: node_sync_metrics.clone(),
            store_commits: store.commit_latency(),
        });
        let grpc_metrics = GrpcMetrics::new(&mut registry, sigil_proto::RPC_METHODS);
        let draining = Arc::new(AtomicBool::new(false));

        let tls_config = Arc::new(tls::server_config(
            self.certificate.clone(),
            authority.verifier_bundles().clone(),
            authority.trust_domain().clone(),
            self.config.audit_sources.clone(),
        )?);
        // Served from here to the very end (after the drain); nothing below returns early
        // without aborting it.
        let http = self.http.serve(
            registry,
            readiness(draining.clone(), authority.clone(), self.entries.clone()),
        );
        let trust_domain = authority.trust_domain().clone();
        let incoming = tls::incoming(self.listener, tls_config, move |id| {
            crate::policy::is_agent_id(&trust_domain, id)
        });
        let node = Arc::new(node);
        let serve = sigil_daemon::limits::grpc_server()
            .layer(grpc_metrics.clone())
            .add_service(
                NodeServer::from_arc(node.clone())
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(MAX_MESSAGE_SIZE),
            )
            .serve_with_incoming_shutdown(
                ReceiverStream::new(incoming.authenticated),
                stopped(stop_rx.clone()),
            );
        // Audit sources (brokers) get the audit ingest API only, on a server of their own.
        let ingest_serve = tokio::spawn(
            sigil_daemon::limits::grpc_server()
                .max_concurrent_streams(tls::MAX_SOURCE_STREAMS)
                .layer(grpc_metrics.clone())
                .add_service(
                    AuditIngestServer::new(AuditIngestService::new(Arc::new(AuditIngest::new(
                        store.clone(),
                        authority.clone(),
                        self.config.audit_sources.clone(),
                    ))))
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(MAX_MESSAGE_SIZE),
                )
                .serve_with_incoming_shutdown(
                    ReceiverStream::new(incoming.sources),
                    stopped(stop_rx.clone()),
                ),
        );
        // Connections without a client certificate can only attest: their own server gives
        // them a few streams, small messages and a minute.
        let attest_serve = tokio::spawn(
            sigil_daemon::limits::grpc_server()
                .max_concurrent_streams(tls::MAX_UNAUTHENTICATED_STREAMS)
                .initial_stream_window_size(tls::UNAUTHENTICATED_WINDOW)
                .initial_connection_window_size(tls::UNAUTHENTICATED_WINDOW)
                .max_connection_age(tls::UNAUTHENTICATED_LIFETIME)
                .max_connection_age_grace(tls::UNAUTHENTICATED_GRACE)
                .layer(grpc_metrics.clone())
                .add_service(
                    NodeServer::from_arc(node)
                        .max_decoding_message_size(tls::MAX_UNAUTHENTICATED_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE_SIZE),
                )
                .serve_with_incoming_shutdown(
                    ReceiverStream::new(incoming.unauthenticated),
                    stopped(stop_rx.clone()),
                ),
        );
        info!(address = %self.local_addr, "agent-facing api listening");

        let admin = AdminService::new(
            AdminServices {
                entries: Arc::new(Entries::new(
                    store.clone(),
                    audit.clone(),
                    self.config.trust_domain.clone(),
                    authority.session_only().clone(),
                )),
                agents,
                svids,
                bundles: Arc::new(Bundles::new(
                    store.clone(),
                    audit.clone(),
                    authority.clone(),
                    crls.clone(),
                    federated.clone(),
                )),
                federation,
                sessions: sessions.clone(),
                audit: audit.clone(),
                authority: authority.clone(),
                entry_cache: self.entries.clone(),
                audit_peers: self.audit_peers.clone(),
            },
            self.config.admin_uids.clone(),
        );
        let admin = Arc::new(admin);
        let admin_incoming = split_by_uid(self.admin_listener, self.config.admin_uids.clone());
        let admin_socket = self.config.admin_socket.clone();
        let admin_serve = tokio::spawn(
            sigil_daemon::limits::grpc_server()
                .layer(grpc_metrics.clone())
                .add_service(
                    AdminServer::from_arc(admin.clone())
                        .max_decoding_message_size(MAX_MESSAGE_SIZE)
                        .max_encoding_message_size(MAX_MESSAGE_SIZE),
                )
                .serve_with_incoming_shutdown(
                    ConnectionLimit::new("admin socket", MAX_ADMIN_CONNECTIONS)
                        .apply(ReceiverStream::new(admin_incoming.admins)),
                    stopped(stop_rx.clone()),
                ),
        );
        // Uids that may not use the admin API are told so, on a server of their own.
        let others_serve = tokio::spawn(
            sigil_daemon::limits::grpc_server()
                .max_concurrent_streams(1)
                .layer(grpc_metrics.clone())
                .add_service(
                    AdminServer::from_arc(admin)
                        .max_decoding_message_size(NON_ADMIN_MESSAGE_SIZE)
                        .max_encoding_message_size(NON_ADMIN_MESSAGE_SIZE),
                )
                .serve_with_incoming_shutdown(
                    ConnectionLimit::new("admin socket, other uids", MAX_NON_ADMIN_CONNECTIONS)
                        .apply(ReceiverStream::new(admin_incoming.others)),
                    stopped(stop_rx.clone()),
                ),
        );
        info!(path = %admin_socket.display(), "admin api listening");
        let _remove_socket = RemoveOnDrop(admin_socket);

        let pinning = tokio::spawn(
            pin_task(self.audit_peers.clone(), stop_rx.clone()).instrument(info_span!("audit")),
        );
        let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<StoreError>(1);
        let heartbeat = tokio::spawn(
            heartbeat_task(store.clone(), fatal_tx, stop_rx.clone())
                .instrument(info_span!("heartbeat")),
        );

        tokio::pin!(serve);
        let how = tokio::select! {
            Some(error) = fatal_rx.recv() => {
                // Another instance holds this server's id: serve nothing more, sign nothing.
                error!(%error, "stopping");
                let _ = stop_tx.send(true);
                for task in [
                    rotation, expiry, token_pruning, entry_cache, crl_refresh, checkpoints,
                    heartbeat, pinning, federated_refresh, federation_polling,
                ] {
                    task.abort();
                }
                if let Some(task) = bundle_endpoint {
                    task.abort();
                }
                http.abort();
                for task in [attest_serve, ingest_serve, others_serve, admin_serve] {
                    task.abort();
                }
                return Err(ServerError::Store(error));
            }
            result = &mut serve => {
                let _ = stop_tx.send(true);
                rotation.abort();
                expiry.abort();
                token_pruning.abort();
                entry_cache.abort();
                crl_refresh.abort();
                attest_serve.abort();
                ingest_serve.abort();
                others_serve.abort();
                admin_serve.abort();
                heartbeat.abort();
                pinning.abort();
                federated_refresh.abort();
                federation_polling.abort();
                if let Some(task) = bundle_endpoint {
                    task.abort();
                }
                http.abort();
                final_checkpoint(checkpoints).await;
                return result.map_err(ServerError::from);
            }
            how = shutdown => how,
        };
        // `/ready` says so from now on, through the drain.
        draining.store(true, Ordering::SeqCst);
        let _ = stop_tx.send(true);
        rotation.abort();
        expiry.abort();
        token_pruning.abort();
        crl_refresh.abort();
        heartbeat.abort();
        pinning.abort();
        federated_refresh.abort();
        federation_polling.abort();
        if let Some(task) = bundle_endpoint {
            task.abort();
        }
        admin_serve.abort();
        others_serve.abort();
        attest_serve.abort();
        match how {
            Shutdown::Immediate => {
                info!("stopping now");
                ingest_serve.abort();
            }
            Shutdown::Graceful => {
                info!(timeout = ?DRAIN_TIMEOUT, "stopping: draining open streams");
                if let Some(result) = sigil_daemon::drain(&mut serve).await {
                    result?;
                }
                // Appends in flight finish, and their sources get their answer, before the
                // last checkpoint (the ingest server stopped taking calls with the others).
                let mut ingest_serve = ingest_serve;
                if tokio::time::timeout(DRAIN_TIMEOUT, &mut ingest_serve)
                    .await
                    .is_err()
                {
                    ingest_serve.abort();
                }
            }
        }
        // After the APIs stopped, so that nothing is appended after the last checkpoint.
        final_checkpoint(checkpoints).await;
        http.abort();
        info!("server stopped");
        Ok(())
    }
}

/// Refuses to start while an entry that is not a session's names an ID under `session_only`,
/// listing each (id, SPIFFE ID, the prefix).
async fn refuse_session_only_entries(
    store: &dyn Store,
    session_only: &SessionOnly,
) -> Result<(), ServerError> {
    if session_only.prefixes().is_empty() {
        return Ok(());
    }
    let offending: Vec<String> = store
        .snapshot_entries()
        .await?
        .entries
        .iter()
        .filter(|entry| entry.session_id.is_none())
        .filter_map(|entry| {
            session_only.covering(&entry.spiffe_id).map(|prefix| {
                format!(
                    "  entry {} grants {} (under {prefix})",
                    entry.id.as_str(),
                    entry.spiffe_id
                )
            })
        })
        .collect();
    if offending.is_empty() {
        Ok(())
    } else {
        Err(ServerError::SessionOnlyEntries(offending))
    }
}

/// The server's readiness (`/ready`): not while draining, not while the entry cache refuses
/// to authorize (the store has not answered within `max_store_staleness`), and not without
/// an active X.509 authority. The store is loaded before anything is served.
fn readiness(
    draining: Arc<AtomicBool>,
    authority: Arc<Authority>,
    entries: Arc<EntryCache>,
) -> ReadyCheck {
    Arc::new(move || {
        if draining.load(Ordering::SeqCst) {
            return Err("draining: the server is stopping".to_owned());
        }
        if entries.is_refusing() {
            return Err(
                "the store has not answered within max_store_staleness: nothing is authorized"
                    .to_owned(),
            );
        }
        let now = SystemTime::now();
        let active = authority.ca().authorities().iter().any(|a| {
            a.kind == crate::ca::AuthorityKind::X509
                && a.state == crate::ca::AuthorityState::Active
                && a.not_after > now
        });
        if !active {
            return Err("no active X.509 authority".to_owned());
        }
        Ok(())
    })
}

/// Resolves once `stop` says the server is stopping: the shutdown signal of each gRPC server.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
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

// === tasks ===

/// Rotates the authorities every [`ROTATION_INTERVAL`] (the authority publishes the bundle
/// when it changed), and renews the server's own SVID at half its life.
async fn rotation_task(
    authority: Arc<Authority>,
    certificate: ServerCertificate,
    mut stop: watch::Receiver<bool>,
) {
    let mut server_validity = None::<Validity>;
    let mut failures = 0u32;
    loop {
        let now = SystemTime::now();
        let rotated = authority.rotate(now).await.map_err(|e| e.to_string());
        // Other servers' rotations (and this one's, if the store missed it) reach the bundle.
        let synced = match rotated {
            Ok(_) => authority
                .sync_shared_bundle(now)
                .await
                .map_err(|e| format!("shared bundle: {e}")),
            Err(e) => Err(e),
        };
        match synced {
            Ok(_) => failures = 0,
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
            server_validity.is_none_or(|v| v.should_renew(now, authority.ttls().agent_svid(), &[]));
        if renew {
            match authority.server_svid(now) {
                Ok(svid) => match certificate.replace(svid.chain, svid.key) {
                    Ok(()) => server_validity = Some(Validity::from_parts(now, svid.not_after)),
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

/// Says every [`HEARTBEAT_INTERVAL`] that this server is alive; when another instance has
/// claimed the server id, hands the error to `fatal` (the server stops) and ends.
async fn heartbeat_task(
    store: Arc<dyn Store>,
    fatal: tokio::sync::mpsc::Sender<StoreError>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match store.heartbeat().await {
            Ok(()) => {
                if failing {
                    info!("heartbeat recorded again");
                    failing = false;
                }
            }
            Err(error @ StoreError::Superseded { .. }) => {
                let _ = fatal.send(error).await;
                return;
            }
            Err(error) => {
                if !failing {
                    warn!(%error, "cannot record the heartbeat; retrying");
                    failing = true;
                }
            }
        }
    }
}

/// Pins, every [`PIN_INTERVAL`], the audit key of each other server's chain seen for the
/// first time.
async fn pin_task(peers: Arc<PeerChains>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(PIN_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(error) = peers.pin_new(SystemTime::now()).await {
            tracing::debug!(%error, "cannot pin other servers' audit keys now; retrying");
        }
    }
}

/// Removes the admin socket file when the server stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh id for this run's history of the change feed.
fn random_history_id() -> Result<HistoryId, ServerError> {
    let mut id = [0; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| ServerError::Random)?;
    Ok(id)
}

/// The x509pop attestor the configuration asks for, its CA bundle read now.
fn x509pop(config: &ServerConfig) -> Result<Option<X509Pop>, ServerError> {
    let Some(pop) = &config.x509pop else {
        return Ok(None);
    };
    let failed = |reason: String| ServerError::X509Pop {
        path: pop.ca_bundle_path.clone(),
        reason,
    };
    let pem = std::fs::read(&pop.ca_bundle_path).map_err(|e| failed(e.to_string()))?;
    let attestor = X509Pop::new(
        config.trust_domain.clone(),
        &pem,
        pop.agent_path_template.as_deref(),
    )
    .map_err(|e| failed(e.to_string()))?;
    info!(path = %pop.ca_bundle_path.display(), "x509pop node attestation enabled");
    Ok(Some(attestor))
}

/// The upstream CA the configuration names, its files read and checked now.
fn upstream(
    config: &ServerConfig,
    now: SystemTime,
) -> Result<Option<Arc<UpstreamAuthority>>, ServerError> {
    let Some(files) = &config.upstream else {
        return Ok(None);
    };
    let failed = |path: &Path, reason: String| ServerError::UpstreamFile {
        path: path.to_owned(),
        reason,
    };
    let cert =
        std::fs::read(&files.cert_path).map_err(|e| failed(&files.cert_path, e.to_string()))?;
    let key = sigil_daemon::read_secret(&files.key_path).map_err(|e| failed(&files.key_path, e))?;
    let upstream = UpstreamAuthority::from_pem(&config.trust_domain, &cert, key.as_bytes(), now)?;
    info!(
        path = %files.cert_path.display(),
        not_after = %sigil_core::time::format_rfc3339(sigil_core::time::unix_seconds(upstream.not_after())),
        "x509 authorities are intermediates of the upstream CA"
    );
    Ok(Some(Arc::new(upstream)))
}

/// The key manager the configuration names: key files in `data_dir/keys`, or a PKCS#11 token
/// (its PIN read from its file through one handle, which must be 0600 or stricter).
fn key_manager(config: &ServerConfig) -> Result<Arc<dyn KeyManager>, ServerError> {
    let Some(token) = &config.pkcs11 else {
        return Ok(Arc::new(DiskKeyManager::new(config.data_dir.join("keys"))?));
    };
    // The audit state and the pinned peer keys live there, whatever holds the keys.
    sigil_daemon::check_private_dir(&config.data_dir.join("keys"), 0o700)?;
    let failed = |reason: String| ServerError::Pkcs11Pin {
        path: token.pin_file.clone(),
        reason,
    };
    let text = sigil_daemon::read_secret(&token.pin_file).map_err(failed)?;
    let pin = text.lines().next().unwrap_or("");
    if pin.is_empty() {
        return Err(failed("is empty".to_owned()));
    }
    let manager = Pkcs11KeyManager::open(
        &token.module,
        &token.token_label,
        pin.to_owned().into(),
        &config.server_id,
    )?;
    info!(module = %token.module.display(), token = %token.token_label, "keys are in a PKCS#11 token");
    Ok(Arc::new(manager))
}
