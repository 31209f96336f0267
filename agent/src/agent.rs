//! The composition root: the agent's identity, the manager, and the Workload API endpoint,
//! run under one shutdown signal.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sigil_attestors::unix::UnixAttestor;
use sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::AgentConfig;
use crate::manager::Manager;
use crate::node::{NodeConnection, NodeError};
use crate::workload::{WorkloadApi, uds_caller};

/// How long open Workload API streams get after SIGTERM.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The agent's identity could not be established or was refused.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The Workload API socket could not be set up.
    #[error("cannot set up the workload api socket {path}: {source}")]
    Socket {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("workload api server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Close the socket, give streams [`DRAIN_TIMEOUT`], stop.
    Graceful,
    /// Stop now.
    Immediate,
}

/// Runs the agent until `shutdown` yields or the server refuses it for good.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = Shutdown> + Send,
) -> Result<(), AgentError> {
    let node = Arc::new(
        NodeConnection::bootstrap(
            config.trust_domain.clone(),
            config.server_address.clone(),
            &config.data_dir,
            config.join_token.as_deref(),
            config.trust_bundle.as_deref(),
        )
        .await?,
    );
    info!(agent_id = %node.agent_id(), server = %config.server_address, "agent identity ready");
    let (manager, snapshots) = Manager::new(node.clone());
    let mut manager = tokio::spawn(manager.run().instrument(info_span!("manager")));

    let listener = bind_socket(&config.socket_path)?;
    let api = WorkloadApi::new(snapshots, node, Arc::new(UnixAttestor::new()), uds_caller);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let serve = tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(api))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        });
    info!(path = %config.socket_path.display(), "workload api listening");
    let socket = config.socket_path.clone();
    tokio::pin!(serve);

    let outcome = tokio::select! {
        result = &mut serve => result.map_err(AgentError::from),
        joined = &mut manager => match joined {
            Ok(Err(e)) => {
                error!(error = %e, "stopping");
                Err(AgentError::Node(e))
            }
            _ => Ok(()),
        },
        how = shutdown => {
            let _ = stop_tx.send(true);
            let _ = std::fs::remove_file(&socket);
            if how == Shutdown::Graceful
                && tokio::time::timeout(DRAIN_TIMEOUT, &mut serve).await.is_err()
            {
                warn!("workload streams still open after the drain timeout; closing them");
            }
            Ok(())
        }
    };
    manager.abort();
    let _ = std::fs::remove_file(&socket);
    outcome
}

/// Binds the Workload API socket: creates its directory, replaces a stale socket, and makes
/// the socket connectable by every local user (0777): identity comes from the kernel.
pub fn bind_socket(path: &Path) -> Result<UnixListener, AgentError> {
    let io = |source| AgentError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => {
            return Err(io(std::io::Error::other(
                "a file that is not a socket is in the way",
            )));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).map_err(io)?;
    Ok(listener)
}
