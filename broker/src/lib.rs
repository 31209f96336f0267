//! `sigil-broker`: the session broker. An identity-aware mTLS proxy an operator puts in front of
//! a privileged target (a database port, an admin API). It is a plain SPIFFE workload: its SVID,
//! bundle and CRLs come from the Workload API and are replaced on every update without dropping
//! listeners or live connections. For each target it
//!
//! - requires a client X509-SVID of its trust domain that is not on a CRL (and, with
//!   `stale_crl = "refuse"`, refuses new connections while a CRL is past its nextUpdate);
//! - decides each connection with the target's Cedar policies ([`policy`]) over the peer's
//!   SPIFFE ID and session claims;
//! - records each connection that completed its TLS handshake (open and close, with the
//!   reason) and each refusal in a durable spool **before** anything goes upstream, and
//!   forwards the spool to the server's audit chain;
//! - cuts a live connection when its serial appears on a CRL (`session revoke`, `session
//!   close`), when its session ends, or when its certificate expires.
//!
//! See `docs/broker.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
mod credentials;
mod http;
pub mod policy;
mod proxy;
mod spool;
mod upstream;

use std::future::Future;
use std::sync::Arc;

use sigil_daemon::Shutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{Instrument as _, error, info, info_span, warn};

pub use crate::config::BrokerConfig;
use crate::credentials::watch_credentials;
use crate::policy::{PolicyError, TargetPolicy};
use crate::proxy::{Live, TargetContext};
use crate::spool::Spool;
pub use crate::spool::SpoolError;

/// Why the broker could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A policy file could not be loaded.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The spool could not be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A listener could not be bound.
    #[error("cannot listen on {address} for target {target}: {source}")]
    Bind {
        /// The target.
        target: String,
        /// The address.
        address: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A signal handler could not be installed.
    #[error("cannot watch SIGHUP: {0}")]
    Signal(std::io::Error),
}

/// Runs the broker until `shutdown` yields.
///
/// # Errors
///
/// [`BrokerError`] when it cannot start.
pub async fn run(
    config: BrokerConfig,
    shutdown: impl Future<Output = Shutdown> + Send,
) -> Result<(), BrokerError> {
    let spool = Arc::new(Spool::open(&config.spool_dir, config.record)?);
    let mut policies = Vec::new();
    for target in &config.targets {
        let policy = Arc::new(TargetPolicy::load(&target.name, &target.policy)?);
        info!(target = %target.name, policy = %target.policy.display(), "policy loaded");
        policies.push(policy);
    }
    let mut listeners = Vec::new();
    for target in &config.targets {
        let listener =
            TcpListener::bind(target.listen)
                .await
                .map_err(|source| BrokerError::Bind {
                    target: target.name.clone(),
                    address: target.listen,
                    source,
                })?;
        let address = listener.local_addr().map_err(|source| BrokerError::Bind {
            target: target.name.clone(),
            address: target.listen,
            source,
        })?;
        info!(target = %target.name, %address, kind = ?target.kind, "target listening");
        listeners.push(listener);
    }
    let mut hangup = signal(SignalKind::hangup()).map_err(BrokerError::Signal)?;

    let (stop_tx, stop) = watch::channel(false);
    let (credentials_tx, credentials) = watch::channel(None);
    let (tls_tx, tls) = watch::channel(None);
    let live = Arc::new(Live::default());
    let connection_tasks = Arc::new(proxy::Tasks::default());
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(
        watch_credentials(
            config.socket_path.clone(),
            config.spiffe_id.clone(),
            config.federated_trust_domains.clone(),
            credentials_tx,
        )
        .instrument(info_span!("workload_api")),
    ));
    // Each update: a new TLS configuration for new handshakes, and the live connections whose
    // serial is now revoked are cut.
    tasks.push(tokio::spawn({
        let (mut credentials, live) = (credentials.clone(), live.clone());
        async move {
            while credentials.changed().await.is_ok() {
                let current = credentials.borrow_and_update().clone();
                let Some(current) = current else { continue };
                match upstream::server_config(&current) {
                    Ok(config) => {
                        tls_tx.send_replace(Some(config));
                        // Logged only now: a handshake from here on is made with them (tests and
                        // operators take this line as "serving").
                        info!(
                            identity = %current.svid.spiffe_id(),
                            crls = current.crls.len(),
                            revoked = current.revoked.len(),
                            federated = current.federated.len(),
                            "credentials updated"
                        );
                    }
                    Err(error) => {
                        error!(%error, "cannot use the new credentials; keeping the previous ones")
                    }
                }
                let cut = live.cut_revoked(&current.revoked);
                if cut > 0 {
                    info!(cut, "connections of revoked credentials cut");
                }
                let cut = live.cut_untrusted(&current);
                if cut > 0 {
                    info!(
                        cut,
                        "connections of a federated trust domain no longer trusted cut"
                    );
                }
            }
        }
        .instrument(info_span!("credentials"))
    }));
    tasks.push(tokio::spawn(
        spool
            .clone()
            .run_forwarder(
                config.server_addresses.clone(),
                credentials.clone(),
                stop.clone(),
            )
            .instrument(info_span!("forwarder")),
    ));
    for ((target, listener), policy) in config.targets.iter().zip(listeners).zip(&policies) {
        let context = Arc::new(TargetContext {
            target: target.clone(),
            policy: policy.clone(),
            spool: spool.clone(),
            live: live.clone(),
            credentials: credentials.clone(),
            tls: tls.clone(),
            stale_crl: config.stale_crl,
            stopping: stop.clone(),
            tasks: connection_tasks.clone(),
        });
        tasks.push(tokio::spawn(
            proxy::serve(context, listener, stop.clone())
                .instrument(info_span!("target", name = %target.name)),
        ));
    }

    tokio::pin!(shutdown);
    let how = loop {
        tokio::select! {
            how = &mut shutdown => break how,
            _ = hangup.recv() => {
                for policy in &policies {
                    match policy.reload() {
                        Ok(count) => info!(policy = %policy.path().display(), count, "SIGHUP: policy reloaded"),
                        Err(error) => warn!(%error, "SIGHUP: policy not reloaded; the previous one stays in force"),
                    }
                }
            }
        }
    };
    info!(?how, live = live.count(), "stopping");
    let _ = stop_tx.send(true);
    live.cut_all();
    // Let every connection task record its close (or refusal) before the process ends.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while connection_tasks.running() > 0 && tokio::time::Instant::now() < deadline {
        live.cut_all();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for task in tasks {
        task.abort();
    }
    // What the connections recorded last (their closes) is on disk before the process ends.
    let closing = Arc::clone(&spool);
    if tokio::task::spawn_blocking(move || closing.close())
        .await
        .is_err()
    {
        error!("the spool could not be closed");
    }
    info!(pending = spool.pending(), "broker stopped");
    Ok(())
}
