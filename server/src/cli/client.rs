//! The connection to the server's admin socket, and turning transport and status errors into
//! messages that say what went wrong and what to do.

use std::error::Error as _;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use sigil_proto::admin::admin_client::AdminClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Response, Status};

/// A connected admin API client that knows its socket path for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    client: AdminClient<Channel>,
    socket: PathBuf,
}

// === impl Admin ===

impl Admin {
    /// Connects to the admin socket at `socket`.
    pub(crate) async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let path = socket.to_path_buf();
        // The URI is required by the API but unused: the connector always dials the socket.
        let channel = Endpoint::from_static("http://sigil-server.admin")
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
            .await
            .map_err(|error| connect_error(socket, &error))?;
        Ok(Self {
            client: AdminClient::new(channel),
            socket: socket.to_path_buf(),
        })
    }

    /// Runs one call on a clone of the client, mapping a failed status to a readable error.
    pub(crate) async fn call<T, F, Fut>(&self, call: F) -> anyhow::Result<T>
    where
        F: FnOnce(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        call(self.client.clone())
            .await
            .map(Response::into_inner)
            .map_err(|status| self.status_error(&status))
    }

    /// Runs one call on a clone of the client and returns the status as is on failure.
    pub(crate) async fn call_raw<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: FnOnce(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        call(self.client.clone()).await.map(Response::into_inner)
    }

    /// The socket path, for messages.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// A readable error for a failed call.
    pub(crate) fn status_error(&self, status: &Status) -> anyhow::Error {
        let socket = self.socket.display();
        let message = status.message();
        if let Some(io) = io_cause(status) {
            return match io.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    not_running(&self.socket)
                }
                _ => anyhow::anyhow!(
                    "lost the connection to the Sigil server at {socket} ({io}): is it still \
                     running? (check its log)"
                ),
            };
        }
        match status.code() {
            Code::PermissionDenied => anyhow::anyhow!("permission denied: {message}"),
            Code::InvalidArgument => anyhow::anyhow!("the server refused the request: {message}"),
            Code::NotFound | Code::AlreadyExists | Code::FailedPrecondition => {
                anyhow::anyhow!("{message}")
            }
            Code::Unimplemented => anyhow::anyhow!(
                "the server at {socket} does not support this command ({message}): is it an \
                 older sigil-server?"
            ),
            Code::Unavailable if status.source().is_some() => anyhow::anyhow!(
                "lost the connection to the Sigil server at {socket}: is it still running? \
                 ({message})"
            ),
            Code::Unavailable => anyhow::anyhow!("the server is unavailable: {message}"),
            code => anyhow::anyhow!("the server answered {code:?}: {message}"),
        }
    }
}

/// The message for a server that is not running.
fn not_running(socket: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot reach the Sigil server at {}: is it running? (start it with `sigil-server run`, \
         or point --admin-socket / SIGIL_ADMIN_SOCKET at its admin socket)",
        socket.display()
    )
}

fn connect_error(socket: &Path, error: &tonic::transport::Error) -> anyhow::Error {
    let shown = socket.display();
    match io_cause(error) {
        Some(io) => match io.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => not_running(socket),
            io::ErrorKind::PermissionDenied => anyhow::anyhow!(
                "cannot open the admin socket {shown}: permission denied by the file system (the \
                 socket is 0666 in a 0711 directory when the server creates it; check the path)"
            ),
            _ => anyhow::anyhow!("cannot connect to the Sigil server at {shown}: {io}"),
        },
        None => anyhow::anyhow!("cannot connect to the Sigil server at {shown}: {error}"),
    }
}

/// The first I/O error in an error's source chain.
fn io_cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}
