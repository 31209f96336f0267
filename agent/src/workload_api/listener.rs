//! The Workload API's Unix-socket listener: binds the socket, accepts connections, wraps each in
//! the `:authority` layer and attaches the caller's credentials and process handle.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use sigil_core::EndpointAddress;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use super::http_authority::NormalizeAuthority;
use super::peer::{CallerProcess, ProcessTracking};

/// How long the accept loop pauses after an error such as running out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why the listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenerError {
    /// The endpoint address is not a Unix socket.
    #[error("the workload api listens on a unix socket, not {0}")]
    NotUnix(EndpointAddress),
    /// The socket's directory could not be created, or another user controls it.
    #[error("socket directory: {0}")]
    Dir(#[from] sigil_daemon::PrivatePathError),
    /// Something other than a socket is at the socket path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process is serving on the socket.
    #[error("another process is listening on {0}")]
    InUse(PathBuf),
    /// A stale socket could not be removed.
    #[error("removing the stale socket {path} failed")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Binding or setting up the socket failed.
    #[error("binding {path} failed")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket's mode could not be set.
    #[error("setting the mode of {path} failed")]
    Permissions {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `bind` was called outside a Tokio runtime.
    #[error("the listener must be bound inside a tokio runtime")]
    NoRuntime,
}

/// The Workload API's front door: a Unix-socket listener that is a stream of accepted
/// [`FrontDoorStream`]s, ready for `tonic::transport::Server::serve_with_incoming_shutdown`.
///
/// The stream never ends and never yields an error: a connection whose credentials cannot be read
/// is dropped, and accept errors are logged and retried after a short pause. Dropping the
/// listener removes the socket file, if it is still the one this listener bound.
#[derive(Debug)]
pub struct WorkloadListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file this listener created.
    identity: Option<(u64, u64)>,
    tracking: ProcessTracking,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

// === impl WorkloadListener ===

impl WorkloadListener {
    /// Binds the socket at `path`: creates its directory (mode 0755) if needed, or checks that
    /// the daemon's uid (or root) owns it and nobody else may write it, replaces a stale
    /// socket (one nobody accepts on), refuses to replace a live socket or anything that is not a
    /// socket, and sets the socket's mode to 0777 so that every local user can connect.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ListenerError> {
        let path = path.as_ref().to_path_buf();
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ListenerError::NoRuntime);
        }
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            sigil_daemon::check_private_dir(dir, 0o755)?;
        }
        remove_stale_socket(&path)?;
        let bind_error = |source| ListenerError::Bind {
            path: path.clone(),
            source,
        };
        let std_listener = std::os::unix::net::UnixListener::bind(&path).map_err(bind_error)?;
        std_listener.set_nonblocking(true).map_err(bind_error)?;
        let listener = tokio::net::UnixListener::from_std(std_listener).map_err(bind_error)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).map_err(|source| {
            ListenerError::Permissions {
                path: path.clone(),
                source,
            }
        })?;
        let identity = fs::symlink_metadata(&path)
            .ok()
            .map(|meta| (meta.dev(), meta.ino()));
        tracing::info!(path = %path.display(), "workload api listening");
        Ok(Self {
            listener,
            path,
            identity,
            tracking: ProcessTracking::Auto,
            backoff: None,
        })
    }

    /// Binds the socket of a `unix:` endpoint address (see [`bind`](Self::bind)).
    pub fn bind_endpoint(address: &EndpointAddress) -> Result<Self, ListenerError> {
        match address.unix_path() {
            Some(path) => Self::bind(path),
            None => Err(ListenerError::NotUnix(address.clone())),
        }
    }

    /// Chooses how callers' processes are held (default: [`ProcessTracking::Auto`]).
    pub fn with_process_tracking(mut self, tracking: ProcessTracking) -> Self {
        self.tracking = tracking;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection and wraps it (for callers that run their own accept loop).
    pub async fn accept(&self) -> io::Result<FrontDoorStream> {
        let (stream, _) = self.listener.accept().await?;
        FrontDoorStream::new(stream, self.tracking).map_err(io::Error::other)
    }
}

impl Stream for WorkloadListener {
    type Item = io::Result<FrontDoorStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(backoff) = &mut this.backoff {
                if backoff.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.backoff = None;
            }
            let stream = match this.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((stream, _))) => stream,
                Poll::Ready(Err(error)) if is_connection_error(&error) => continue,
                Poll::Ready(Err(error)) => {
                    tracing::warn!(%error, "workload api accept failed; pausing");
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                    continue;
                }
            };
            match FrontDoorStream::new(stream, this.tracking) {
                Ok(stream) => return Poll::Ready(Some(Ok(stream))),
                Err(error) => tracing::warn!(%error, "dropping workload api connection"),
            }
        }
    }
}

impl Drop for WorkloadListener {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .ok()
            .map(|meta| (meta.dev(), meta.ino()));
        if ours.is_some() && ours == self.identity {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// An accepted Workload API connection: the Unix socket behind the `:authority` layer, with the
/// caller's [`CallerProcess`] as its tonic connect info.
#[derive(Debug)]
pub struct FrontDoorStream {
    io: NormalizeAuthority<UnixStream>,
    caller: CallerProcess,
}

// === impl FrontDoorStream ===

impl FrontDoorStream {
    /// Wraps an accepted connection: reads the caller's credentials, takes a handle on its
    /// process, and puts the `:authority` layer in front.
    pub fn new(
        stream: UnixStream,
        tracking: ProcessTracking,
    ) -> Result<Self, super::peer::PeerError> {
        let caller = CallerProcess::from_stream(&stream, tracking)?;
        tracing::debug!(
            uid = caller.uid(),
            gid = caller.gid(),
            pid = caller.pid(),
            handle = ?caller.handle_kind(),
            "workload api connection accepted"
        );
        Ok(Self {
            io: NormalizeAuthority::new(stream),
            caller,
        })
    }

    /// The process at the other end.
    pub fn caller(&self) -> &CallerProcess {
        &self.caller
    }

    /// How many header blocks this connection has re-encoded (non-zero once the client sent an
    /// `:authority` h2 would refuse).
    pub fn rewritten_blocks(&self) -> u64 {
        self.io.rewritten_blocks()
    }
}

impl Connected for FrontDoorStream {
    type ConnectInfo = CallerProcess;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.caller.clone()
    }
}

impl AsyncRead for FrontDoorStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for FrontDoorStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Removes a socket nobody accepts on; refuses a live socket or a non-socket.
fn remove_stale_socket(path: &Path) -> Result<(), ListenerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ListenerError::Bind {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ListenerError::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ListenerError::InUse(path.to_path_buf())),
        Err(_) => {
            tracing::info!(path = %path.display(), "removing stale workload api socket");
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ListenerError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                }),
            }
        }
    }
}

/// Errors that concern one connection only (the peer went away during accept).
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}
