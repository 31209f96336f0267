//! The composition root: the agent's identity, the manager, and the Workload API endpoint,
//! run under one shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sigil_attestors::unix::UnixAttestor;
use sigil_daemon::limits::ConnectionLimit;
use sigil_daemon::telemetry::{GrpcMetrics, HttpEndpoints};
use tracing::{Instrument, error, info, info_span};

use crate::config::AgentConfig;
use crate::manager::Manager;
use crate::node::{NodeConnection, NodeError};
use crate::telemetry;
use crate::workload_api::{
    ListenerError, WorkloadApi, WorkloadApiServer, WorkloadListener, front_door_caller,
};

/// The largest Workload API request (the largest is a `ValidateJWTSVID` with a token of at most
/// 16 KiB).
pub const MAX_WORKLOAD_REQUEST: usize = 64 * 1024;

/// Workload API connections served at once (one per workload holding a stream, typically);
/// those beyond are closed when accepted.
pub const MAX_WORKLOAD_CONNECTIONS: usize = 4096;

/// Workload API connections of one uid other than root served at once, so that one local user
/// cannot take every slot.
pub const MAX_WORKLOAD_CONNECTIONS_PER_UID: usize = 1024;

pub use sigil_daemon::{DRAIN_TIMEOUT, Shutdown};

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The agent's identity could not be established or was refused.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The Workload API socket could not be set up.
    #[error("workload api socket: {0}")]
    Socket(#[from] ListenerError),
    /// The gRPC server failed.
    #[error("workload api server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The Workload API's task ended abnormally.
    #[error("workload api task: {0}")]
    Task(tokio::task::JoinError),
    /// The metrics or health listener could not be bound.
    #[error(transparent)]
    Http(#[from] sigil_daemon::telemetry::BindError),
    /// Callers cannot be attested here (the proc filesystem is missing or another PID
    /// namespace's).
    #[error("workload attestation: {0}")]
    Attestation(#[from] sigil_attestors::unix::UnixAttestorError),
}

/// Runs the agent until `shutdown` yields or the server refuses it for good.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = Shutdown> + Send,
) -> Result<(), AgentError> {
    // Callers are attested through /proc: refuse to start where it would name other processes
    // (checked here, before the agent binds or calls anything; `WorkloadApi::new` checks again).
    let attestor = Arc::new(UnixAttestor::new());
    attestor.check_proc()?;
    // Bound first, so that a taken port fails the start before anything else happens; served
    // once the agent has its identity.
    let http = HttpEndpoints::bind(config.metrics_address, config.health_address).await?;
    let node = Arc::new(
        NodeConnection::bootstrap(
            config.trust_domain.clone(),
            config
                .server_addresses
                .iter()
                .map(ToString::to_string)
                .collect(),
            &config.data_dir,
            &config.attestation,
            config.trust_bundle.as_deref(),
        )
        .await?,
    );
    info!(agent_id = %node.agent_id(), servers = ?node.server_addresses(), "agent identity ready");
    let (manager, snapshots) = Manager::new(node);
    let minter = manager.minter();
    let mut manager = tokio::spawn(manager.run().instrument(info_span!("manager")));

    // The front door: accepts every gRPC client stack (it normalises the `:authority` of
    // C-core, Java and Swift clients) and holds each caller's process.
    let listener = WorkloadListener::bind(&config.socket_path)?;
    let connections = ConnectionLimit::new("workload api", MAX_WORKLOAD_CONNECTIONS)
        .per_key(MAX_WORKLOAD_CONNECTIONS_PER_UID);
    let mut registry =
        telemetry::registry(minter.metrics(), snapshots.clone(), connections.clone());
    let grpc_metrics = GrpcMetrics::new(&mut registry, sigil_proto::RPC_METHODS);
    let draining = Arc::new(AtomicBool::new(false));
    let http = http.serve(
        registry,
        telemetry::readiness(draining.clone(), snapshots.clone()),
    );
    let api = WorkloadApi::new(snapshots, minter, attestor, front_door_caller)?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let serve = sigil_daemon::limits::grpc_server()
        .layer(grpc_metrics)
        .add_service(WorkloadApiServer::new(api, MAX_WORKLOAD_REQUEST))
        .serve_with_incoming_shutdown(
            connections.apply_keyed(listener, |conn| {
                // Root is not limited apart: it is trusted (and often every container).
                let uid = conn.caller().uid();
                (uid != 0).then_some(u64::from(uid))
            }),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        );
    info!(path = %config.socket_path.display(), "workload api listening");
    let socket = config.socket_path.clone();
    // Served from a task of the runtime, not from the thread that blocks on it: a connection's
    // task then starts on the worker that accepted it, where it would otherwise wake one.
    let mut serve = tokio::spawn(serve);

    let outcome = tokio::select! {
        result = &mut serve => match result {
            Ok(served) => served.map_err(AgentError::from),
            Err(ended) => Err(AgentError::Task(ended)),
        },
        joined = &mut manager => match joined {
            Ok(Err(e)) => {
                error!(error = %e, "stopping");
                Err(AgentError::Node(e))
            }
            _ => Ok(()),
        },
        how = shutdown => {
            // `/ready` says so from now on, through the drain.
            draining.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
            let _ = std::fs::remove_file(&socket);
            if how == Shutdown::Graceful {
                sigil_daemon::drain(&mut serve).await;
            }
            Ok(())
        }
    };
    serve.abort();
    manager.abort();
    http.abort();
    let _ = std::fs::remove_file(&socket);
    outcome
}
