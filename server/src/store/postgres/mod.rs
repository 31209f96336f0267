//! The PostgreSQL [`Store`] backend: the store several servers will share (today one server
//! per audit chain: a second one with the same chain is refused by an advisory lock).
//!
//! # Connections
//!
//! tokio-postgres through a deadpool pool; TLS by rustls with ring when `postgres_ca_file`
//! names the CA that signed the database's certificate (the certificate and its host name are
//! always verified; there is no "encrypt without verifying" mode). The connection string never
//! carries a password: it comes from a file or the environment ([`PostgresOptions`]) and
//! never reaches a log. Every connection runs with `synchronous_commit = on`, so a write is
//! acknowledged only once its commit record is on the database's disk.
//!
//! # The change feed
//!
//! Every transaction that changes registration entries makes its changes first and takes its
//! revisions **last**, from the one-row counter `feed_head`
//! (`UPDATE feed_head SET revision = revision + n RETURNING revision`), then writes the change
//! rows and commits. The row lock on the counter is held from that update to the commit, so a
//! transaction can only take revisions after every transaction with lower revisions has
//! committed: revision order is commit order. A transaction that rolls back releases the lock
//! without having changed the counter, so it leaves no gap. A reader therefore never sees
//! revision `r + 1` committed while `r` is not, and `SELECT ... WHERE revision > $r ORDER BY
//! revision` is an exact, gap-free continuation (SPIRE's events table, fed by a sequence, can
//! show id 2 before id 1 commits; that is the gap this design rules out).
//!
//! What a reader sees committed is durable: with `synchronous_commit = on` PostgreSQL makes a
//! transaction visible only after its commit record is flushed.
//!
//! Watchers learn of new revisions three ways: a write made through this store publishes its
//! revision as soon as it commits; a `LISTEN` connection wakes the follower on every
//! `pg_notify` a writer sends (another server's writes); and the follower polls the counter
//! every `poll_interval` whatever happens, because a notification is only a hint (it is lost
//! with its connection).
//!
//! # Snapshots
//!
//! [`Store::snapshot_entries`] reads the counter and every entry in one `REPEATABLE READ READ
//! ONLY` transaction: one MVCC snapshot, so the entries are exactly those of the revision read.
//!
//! # Locks
//!
//! Transactions lock in one order, so they never deadlock on each other: a session's row, a
//! source's row, the audit chain head, then the feed counter (always last). A transaction that
//! still fails with a serialization failure or a deadlock is retried (three times).

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Config, NoTls, Socket};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use super::{DEFAULT_CHANGE_RETENTION, StoreError, hex_decode, hex_encode};

mod import;
mod schema;
mod store;

pub(crate) use self::import::Import;
#[cfg(test)]
mod tests;

/// The channel writers notify and the follower listens on.
const FEED_CHANNEL: &str = "sigil_feed";

/// Default pool size: enough for the RPCs of a busy server; PostgreSQL's default
/// `max_connections` is 100, shared by every server of a deployment.
pub(crate) const DEFAULT_POOL_SIZE: usize = 16;

/// Default interval of the follower's poll of the feed counter.
pub(crate) const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How often a failed transaction (serialization failure, deadlock) is tried again.
const RETRIES: usize = 3;

/// Options of [`PostgresStore::open`].
#[derive(Clone)]
pub(crate) struct PostgresOptions {
    /// libpq-style connection string, URL (`postgresql://user@host/db`) or `key=value` pairs.
    /// Must not contain a password.
    pub url: String,
    /// The password, read from `postgres_password_file` or `PGPASSWORD`.
    pub password: Option<Zeroizing<String>>,
    /// PEM file of the CA certificates that may sign the database server's certificate;
    /// turns TLS on (required).
    pub ca_file: Option<PathBuf>,
    /// Most connections in the pool.
    pub pool_size: usize,
    /// How many changes the feed keeps (at least 1).
    pub change_retention: u64,
    /// The audit chain this store's appends extend.
    pub server_id: String,
    /// How often the follower polls the feed counter.
    pub poll_interval: Duration,
}

/// The PostgreSQL backend of [`Store`] (see the module docs).
///
/// Cheap to clone; clones share the pool. The follower tasks stop when the last clone is
/// dropped.
#[derive(Clone)]
pub(crate) struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// `host:port/dbname` for logs and `Debug`; never the password.
    target: String,
    server_id: String,
    /// This process's claim on `server_id` (the `servers` row holds it while the claim lasts).
    instance_id: String,
    retention: i64,
    revision: watch::Sender<u64>,
    tasks: Vec<JoinHandle<()>>,
    /// How long each commit took.
    commits: prometheus_client::metrics::histogram::Histogram,
}

/// The TLS connector of a connection: rustls with the configured roots, or none.
#[derive(Clone)]
enum Tls {
    None,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

// === impl PostgresOptions ===

impl PostgresOptions {
    /// Options for `url` with every other setting at its default.
    pub(crate) fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: None,
            ca_file: None,
            pool_size: DEFAULT_POOL_SIZE,
            change_retention: DEFAULT_CHANGE_RETENTION,
            server_id: crate::audit::DEFAULT_CHAIN_ID.to_owned(),
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// Parses the connection string and applies the password and the settings every
    /// connection needs. Refuses a password in the string.
    fn connection_config(&self) -> Result<(Config, Tls), StoreError> {
        let mut config = parse_url(&self.url)?;
        if let Some(password) = &self.password {
            config.password(password.as_bytes());
        }
        if config.get_application_name().is_none() {
            config.application_name("sigil-server");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        // Durable commits; a transaction stalled with the feed counter's lock (a paused or
        // partitioned writer) is ended by the database after a minute instead of blocking every
        // writer until TCP gives up; a writer waits at most 30 s for a lock.
        const SESSION: &str = "-c synchronous_commit=on \
                               -c idle_in_transaction_session_timeout=60000 \
                               -c lock_timeout=30000";
        let options = match config.get_options() {
            Some(options) => format!("{options} {SESSION}"),
            None => SESSION.to_owned(),
        };
        config.options(&options);
        let tls = match &self.ca_file {
            Some(path) => {
                if config.get_ssl_mode() != SslMode::Require {
                    config.ssl_mode(SslMode::Require);
                }
                Tls::Rustls(rustls_connector(path)?)
            }
            None if config.get_ssl_mode() == SslMode::Require => {
                return Err(StoreError::Config(
                    "postgres_url asks for sslmode=require: name the CA that signed the \
                     database's certificate in postgres_ca_file"
                        .to_owned(),
                ));
            }
            None => {
                check_plain_is_chosen(&self.url, &config)?;
                config.ssl_mode(SslMode::Disable);
                Tls::None
            }
        };
        Ok((config, tls))
    }
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("ca_file", &self.ca_file)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("change_retention", &self.change_retention)
            .field("server_id", &self.server_id)
            .finish_non_exhaustive()
    }
}

/// Checks a connection string as the configuration is read: it parses, and holds no
/// password. The message never repeats the string (it might hold a secret after all).
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    parse_url(url).map(drop).map_err(|e| e.to_string())
}

/// Without `postgres_ca_file` connections are plain: fine over a Unix socket or loopback, but
/// to any other host only when the URL says so (`sslmode=disable`), so that a database across
/// a network is never reached in the clear by omission.
fn check_plain_is_chosen(url: &str, config: &Config) -> Result<(), StoreError> {
    let remote = config.get_hosts().iter().find_map(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => {
            let loopback = name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            (!loopback).then(|| name.clone())
        }
        tokio_postgres::config::Host::Unix(_) => None,
    });
    match remote {
        Some(host) if !url.contains("sslmode=disable") => Err(StoreError::Config(format!(
            "postgres_url names {host}, which is not this machine, and postgres_ca_file is not \
             set: name the CA that signed the database's certificate in postgres_ca_file (TLS), \
             or say sslmode=disable in postgres_url to connect in the clear on purpose"
        ))),
        _ => Ok(()),
    }
}

fn parse_url(url: &str) -> Result<Config, StoreError> {
    let config: Config = url.parse().map_err(|e: tokio_postgres::Error| {
        StoreError::Config(format!("postgres_url cannot be parsed: {e}"))
    })?;
    if config.get_password().is_some() {
        return Err(StoreError::Config(
            "postgres_url must not contain a password (it would sit in the configuration \
             file and in process listings): put it in the file named by \
             postgres_password_file, or in the PGPASSWORD environment variable"
                .to_owned(),
        ));
    }
    Ok(config)
}

// === impl PostgresStore ===

impl PostgresStore {
    /// Connects, checks the server's version, migrates the schema, and starts the follower
    /// that publishes other servers' revisions.
    pub(crate) async fn open(options: PostgresOptions) -> Result<Self, StoreError> {
        let (config, tls) = options.connection_config()?;
        let target = describe(&config);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Tls::None => Manager::from_config(config.clone(), NoTls, manager_config),
            Tls::Rustls(tls) => Manager::from_config(config.clone(), tls.clone(), manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .wait_timeout(Some(Duration::from_secs(30)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Config(format!("postgres pool: {e}")))?;
        let mut client = pool.get().await.map_err(pool_error)?;
        let applied = schema::migrate(&mut client).await?;
        if !applied.is_empty() {
            info!(database = %target, versions = ?applied, "database schema migrated");
        }
        let row = client
            .query_one("SELECT current_setting('synchronous_commit')", &[])
            .await
            .map_err(db_error)?;
        let synchronous: String = row.try_get(0).map_err(db_error)?;
        if synchronous == "off" {
            return Err(StoreError::Unsupported(format!(
                "synchronous_commit is off on the connections to {target} although the server \
                 asks for on (a connection pooler that drops startup options?): an acknowledged \
                 write could be lost in a crash; connect to PostgreSQL directly"
            )));
        }
        let row = client
            .query_one("SELECT revision FROM feed_head WHERE id = 1", &[])
            .await
            .map_err(db_error)?;
        let revision = to_u64("revision", row.try_get(0).map_err(db_error)?)?;
        drop(client);

        let (tx, _) = watch::channel(revision);
        let wake = Arc::new(Notify::new());
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen(
            config,
            tls,
            Arc::clone(&wake),
            target.clone(),
            lock_key(&options.server_id),
            Some(first_tx),
        ));
        let locked = match first_rx.await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Closed),
        };
        match locked {
            Ok(true) => {}
            Ok(false) => {
                listener.abort();
                let holder = holder_of(&pool, &options.server_id)
                    .await
                    .unwrap_or_else(|e| format!("unknown: {e}"));
                return Err(StoreError::Unsupported(format!(
                    "another sigil-server with server_id {:?} is running on {target} ({holder}): \
                     each server sharing a database needs its own server_id",
                    options.server_id
                )));
            }
            Err(e) => {
                listener.abort();
                return Err(e);
            }
        }
        let instance_id = match claim(&pool, &options.server_id).await {
            Ok(id) => id,
            Err(e) => {
                listener.abort();
                return Err(e);
            }
        };
        let follower = tokio::spawn(follow(
            pool.clone(),
            tx.clone(),
            wake,
            options.poll_interval,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                target,
                server_id: options.server_id,
                instance_id,
                retention: i64::try_from(options.change_retention.max(1)).unwrap_or(i64::MAX),
                revision: tx,
                tasks: vec![listener, follower],
                commits: sigil_daemon::telemetry::latency_histogram(),
            }),
        })
    }

    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner.pool.get().await.map_err(pool_error)
    }

    /// Publishes a revision this store committed (watchers wake at once, not at the next
    /// poll).
    fn published(&self, revision: u64) {
        publish(&self.inner.revision, revision);
    }

    /// Runs `attempt` until it succeeds or fails with something other than a serialization
    /// failure or a deadlock (then at most [`RETRIES`] times).
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            match attempt().await {
                Err(StoreError::Database(e)) if tries < RETRIES && is_retryable(&e) => {
                    debug!(error = %e, "transaction retried");
                }
                other => return other,
            }
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.inner.target)
            .field("server_id", &self.inner.server_id)
            .field("revision", &*self.inner.revision.borrow())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.pool.close();
    }
}

// === the claim on the server id ===

/// Records this process as the instance of `server_id` (the caller holds the server's
/// advisory lock, so no other live process can); says so when it takes the id over from an
/// earlier instance. Returns the new instance id.
async fn claim(pool: &Pool, server_id: &str) -> Result<String, StoreError> {
    let instance_id = crate::store::new_instance_id()?;
    let client = pool.get().await.map_err(pool_error)?;
    let previous = holder_row(&client, server_id).await?;
    client
        .execute(
            "INSERT INTO servers (server_id, instance_id, host, started_at, heartbeat_at) \
             VALUES ($1, $2, $3, now(), now()) \
             ON CONFLICT (server_id) DO UPDATE SET instance_id = EXCLUDED.instance_id, \
                 host = EXCLUDED.host, started_at = now(), heartbeat_at = now()",
            &[&server_id, &instance_id, &crate::store::host_name()],
        )
        .await
        .map_err(db_error)?;
    if let Some((old, host, age)) = previous {
        info!(
            server_id,
            previous_instance = %old,
            previous_host = %host,
            last_heartbeat_secs_ago = age.round(),
            "server id taken over from the instance that held it before"
        );
    }
    Ok(instance_id)
}

/// Who holds `server_id` now, for an error message: host, instance and heartbeat age.
async fn holder_of(pool: &Pool, server_id: &str) -> Result<String, StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    Ok(match holder_row(&client, server_id).await? {
        Some((instance, host, age)) => format!(
            "instance {instance} on host {host}, last heartbeat {:.0} s ago",
            age.max(0.0)
        ),
        None => "an instance still starting".to_owned(),
    })
}

/// The `servers` row of `server_id`: instance id, host, seconds since its heartbeat.
async fn holder_row(
    client: &tokio_postgres::Client,
    server_id: &str,
) -> Result<Option<(String, String, f64)>, StoreError> {
    let row = client
        .query_opt(
            "SELECT instance_id, host, extract(epoch FROM now() - heartbeat_at)::float8 \
             FROM servers WHERE server_id = $1",
            &[&server_id],
        )
        .await
        .map_err(db_error)?;
    row.map(|row| {
        Ok((
            col::<&str>(&row, 0)?.to_owned(),
            col::<&str>(&row, 1)?.to_owned(),
            col::<f64>(&row, 2)?,
        ))
    })
    .transpose()
}

// === the follower ===

/// Publishes the counter whenever the listener wakes it, and every `interval` regardless.
async fn follow(pool: Pool, tx: watch::Sender<u64>, wake: Arc<Notify>, interval: Duration) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(interval) => {}
        }
        let read = async {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client
                .query_one("SELECT revision FROM feed_head WHERE id = 1", &[])
                .await
                .map_err(db_error)?;
            to_u64("revision", col(&row, 0)?)
        };
        match read.await {
            Ok(revision) => {
                if failing {
                    info!("database reachable again");
                    failing = false;
                }
                publish(&tx, revision);
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot read the change feed's revision; retrying");
                    failing = true;
                }
            }
        }
    }
}

/// Keeps a `LISTEN` connection open (reconnecting after a failure) and wakes the follower on
/// every notification. The same connection holds the server's advisory lock (`lock_key`), so
/// that a second server with the same audit chain cannot run on the database: the first
/// connection's answer goes to `first` (true: the lock is this server's).
async fn listen(
    config: Config,
    tls: Tls,
    wake: Arc<Notify>,
    target: String,
    lock_key: i64,
    mut first: Option<tokio::sync::oneshot::Sender<Result<bool, StoreError>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = match &tls {
            Tls::None => listen_once(&config, NoTls, &wake, lock_key, &mut first).await,
            Tls::Rustls(tls) => {
                listen_once(&config, tls.clone(), &wake, lock_key, &mut first).await
            }
        };
        match result {
            Err(e) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Err(e));
                    return;
                }
                debug!(database = %target, error = %e, "change feed listener reconnecting");
            }
            Ok(Listened::Locked) => backoff = Duration::from_millis(100),
            Ok(Listened::LockHeldElsewhere) => {
                warn!(
                    database = %target,
                    "another server now holds this server's lock on the database (its audit \
                     chain); this one keeps serving but should be stopped"
                );
            }
        }
        // A notification may have been missed while disconnected: poll now.
        wake.notify_one();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// How a listening connection ended.
enum Listened {
    /// It held the lock, listened, then closed.
    Locked,
    /// Another session holds the lock.
    LockHeldElsewhere,
}

async fn listen_once<T>(
    config: &Config,
    tls: T,
    wake: &Notify,
    lock_key: i64,
    first: &mut Option<tokio::sync::oneshot::Sender<Result<bool, StoreError>>>,
) -> Result<Listened, StoreError>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await.map_err(db_error)?;
    let (notified, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    // Drives the connection (requests and notifications alike); ends when the client is
    // dropped or the connection fails.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    let _ = notified.send(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(db_error(e)),
                None => return Ok(()),
            }
        }
    });
    // The database must notice soon when this server is cut off, so that the lock (the claim
    // on the server id) is released and a replacement can start: after about 10 + 3 x 5 s of
    // silence instead of the operating system's default two hours. (No effect over a Unix
    // socket, where a dead peer is seen at once.)
    client
        .batch_execute(
            "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
             SET tcp_keepalives_count = 3",
        )
        .await
        .map_err(db_error)?;
    let row = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key])
        .await
        .map_err(db_error)?;
    let locked: bool = row.try_get(0).map_err(db_error)?;
    if let Some(first) = first.take() {
        let _ = first.send(Ok(locked));
    }
    if !locked {
        return Ok(Listened::LockHeldElsewhere);
    }
    client
        .batch_execute(&format!("LISTEN {FEED_CHANNEL}"))
        .await
        .map_err(db_error)?;
    // Listening from now on: whatever was written before is read by the poll this triggers.
    wake.notify_one();
    while notifications.recv().await.is_some() {
        wake.notify_one();
    }
    drop(client);
    driver.await??;
    Ok(Listened::Locked)
}

/// The advisory lock key of a server's audit chain: the first 8 bytes of SHA-256 over
/// `sigil-server/` and the chain id.
fn lock_key(chain_id: &str) -> i64 {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("sigil-server/{chain_id}").as_bytes(),
    );
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_ref()[..8]);
    i64::from_be_bytes(bytes)
}

/// The advisory lock key of a job that one server at a time runs (see
/// [`PostgresStore::singleton`]): as [`lock_key`], over `job/` and the job's name (a server id
/// has no `/`, so the two never meet).
pub(super) fn job_lock_key(job: &str) -> i64 {
    lock_key(&format!("job/{job}"))
}

fn publish(tx: &watch::Sender<u64>, revision: u64) {
    tx.send_if_modified(|current| {
        if revision > *current {
            *current = revision;
            true
        } else {
            false
        }
    });
}

// === helpers ===

fn rustls_connector(
    path: &PathBuf,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let pem = std::fs::read(path)
        .map_err(|e| StoreError::Config(format!("postgres_ca_file {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
        let cert: rustls_pki_types::CertificateDer<'static> = cert
            .map_err(|e| StoreError::Config(format!("postgres_ca_file {}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| StoreError::Config(format!("postgres_ca_file {}: {e}", path.display())))?;
        found += 1;
    }
    if found == 0 {
        return Err(StoreError::Config(format!(
            "postgres_ca_file {} holds no PEM certificate",
            path.display()
        )));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Config(format!("TLS to PostgreSQL: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `host:port/dbname` of a connection config, for logs.
fn describe(config: &Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config.get_dbname().unwrap_or("");
    format!("{host}:{port}/{dbname}")
}

fn is_retryable(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(code) if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
    )
}

fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

pub(super) fn db_error(error: tokio_postgres::Error) -> StoreError {
    StoreError::Database(error)
}

fn pool_error(error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(e) => StoreError::Database(e),
        other => StoreError::Unavailable(format!("no database connection: {other}")),
    }
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|error| StoreError::Encode {
        what,
        reason: error.to_string(),
    })
}

fn decode<T: DeserializeOwned>(what: &'static str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt {
        what,
        reason: error.to_string(),
    })
}

fn to_i64(what: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Encode {
        what,
        reason: format!("{value} does not fit a bigint"),
    })
}

fn to_u64(what: &'static str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        what,
        reason: format!("negative value {value}"),
    })
}

/// Column `index` of `row`: an error, not a panic, when it does not have the expected type.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index).map_err(db_error)
}

/// Nanoseconds since the Unix epoch (negative before it; saturating in 2262), for expiry
/// columns: pruning compares them exactly, as the sled backend compares times.
fn nanos(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |ns| -ns),
    }
}

/// Milliseconds since the Unix epoch (negative before it), for indexed time columns.
fn millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// The page token of a key (hex, as the sled backend's).
fn page_token(key: &[u8]) -> String {
    hex_encode(key)
}

/// The key a page token resumes after, if `is_key` accepts it.
fn token_key(
    token: Option<&str>,
    is_key: impl Fn(&str) -> bool,
) -> Result<Option<String>, StoreError> {
    let Some(token) = token else {
        return Ok(None);
    };
    let key = hex_decode(token)
        .filter(|k| !k.is_empty())
        .and_then(|k| String::from_utf8(k).ok())
        .ok_or(StoreError::InvalidPageToken)?;
    if is_key(&key) {
        Ok(Some(key))
    } else {
        Err(StoreError::InvalidPageToken)
    }
}
