//! The limits every gRPC listener of Sigil enforces before a caller is authenticated, so that
//! an unauthenticated peer costs a bounded amount of memory: connections per listener, streams
//! per connection, header list sizes and reset floods (HTTP/2 "rapid reset").
//!
//! tonic passes no stream limit to hyper unless told, so without these a single connection
//! could open streams (each a task and its buffers) until memory runs out.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::Connected;

/// Streams one HTTP/2 connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// The largest header list a request may carry (`SETTINGS_MAX_HEADER_LIST_SIZE`).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Streams a peer may reset before the server has answered them, before it is sent `GOAWAY`.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// Streams the server may reset for a peer's protocol errors before it is sent `GOAWAY`.
pub const MAX_LOCAL_ERROR_RESETS: usize = 256;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the peer of a connection may stay silent through keepalive pings before the
/// connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The interval of the server's keepalive pings.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Raises the soft limit of open files to the hard limit, so that the connection limits of this
/// module, not `EMFILE`, decide when a listener stops accepting (each Workload API connection also
/// holds a pidfd and its process's `/proc/PID` directory: three descriptors). Returns the limit
/// in force; a failure leaves the limit as it was (and is logged).
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(error) => {
                tracing::warn!(%error, soft, hard, "cannot raise the open files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open files limit");
            0
        }
    }
}

/// A gRPC server with every limit of this module set. Listeners add their own connection cap
/// ([`ConnectionLimit`]) and message sizes (per service).
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// At most so many connections of one listener served at once; those beyond are closed as soon
/// as they are accepted (and counted, and logged every so often).
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
    refused: Arc<AtomicU64>,
    listener: &'static str,
    per_key: Option<PerKey>,
}

/// At most `max` connections per key (a caller's uid, say).
#[derive(Debug, Clone)]
struct PerKey {
    max: usize,
    open: Arc<Mutex<HashMap<u64, usize>>>,
}

/// What an admitted connection holds while it lives: its slot, and its key's.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    _key: Option<KeyGuard>,
}

/// One connection counted against its key; uncounted on drop.
#[derive(Debug)]
struct KeyGuard {
    key: u64,
    open: Arc<Mutex<HashMap<u64, usize>>>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl ConnectionLimit {
    /// A limit of `max` connections for the listener named `listener` (in logs).
    pub fn new(listener: &'static str, max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused: Arc::default(),
            listener,
            per_key: None,
        }
    }

    /// The same limit, and at most `max` connections per key as well (see
    /// [`apply_keyed`](Self::apply_keyed)), so that one caller cannot take every slot.
    #[must_use]
    pub fn per_key(mut self, max: usize) -> Self {
        self.per_key = Some(PerKey {
            max,
            open: Arc::default(),
        });
        self
    }

    /// A slot for one more connection of `key` (`None`: counted against the total only), or
    /// `None` (then close it) when the total or the key's share is taken.
    pub fn try_admit_keyed(&self, key: Option<u64>) -> Option<Admission> {
        let guard = match (&self.per_key, key) {
            (Some(per_key), Some(key)) => {
                let mut open = per_key.open.lock().unwrap_or_else(PoisonError::into_inner);
                let count = open.entry(key).or_insert(0);
                if *count >= per_key.max {
                    drop(open);
                    self.note_refusal(
                        "per-caller connection limit reached; closing its new connections",
                    );
                    return None;
                }
                *count += 1;
                Some(KeyGuard {
                    key,
                    open: per_key.open.clone(),
                })
            }
            _ => None,
        };
        // On failure the guard, if any, is dropped here and uncounts the connection.
        let permit = self.try_admit()?;
        Some(Admission {
            _permit: permit,
            _key: guard,
        })
    }

    /// `incoming` with each connection holding a slot of the total and of its key
    /// (`key(&connection)`) while it lives; a connection for which there is none is dropped
    /// (closed) at once.
    pub fn apply_keyed<S, IO, E>(
        self,
        incoming: S,
        key: impl Fn(&IO) -> Option<u64>,
    ) -> impl Stream<Item = Result<Limited<IO>, E>>
    where
        S: Stream<Item = Result<IO, E>>,
    {
        incoming.filter_map(move |item| match item {
            Ok(io) => self.try_admit_keyed(key(&io)).map(|admission| {
                Ok(Limited {
                    io,
                    _admission: admission,
                })
            }),
            Err(e) => Some(Err(e)),
        })
    }

    fn note_refusal(&self, what: &'static str) {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if refused.is_power_of_two() {
            tracing::warn!(listener = self.listener, max = self.max, refused, "{what}");
        }
    }

    /// A slot for one more connection, or `None` (then close it) when all are taken.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                self.note_refusal("connection limit reached; closing new connections");
                None
            }
        }
    }

    /// How many connections hold a slot now.
    pub fn open(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }

    /// How many connections were closed for the limit so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// `incoming` with each connection holding a slot while it lives; a connection for which
    /// there is none is dropped (closed) at once.
    pub fn apply<S, IO, E>(self, incoming: S) -> impl Stream<Item = Result<Limited<IO>, E>>
    where
        S: Stream<Item = Result<IO, E>>,
    {
        self.apply_keyed(incoming, |_| None)
    }
}

/// A connection that holds a slot of its listener's [`ConnectionLimit`] while it lives.
#[derive(Debug)]
pub struct Limited<IO> {
    io: IO,
    _admission: Admission,
}

impl<IO: Connected> Connected for Limited<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_a_freed_slot_is_reused() {
        let limit = ConnectionLimit::new("test", 2);
        let incoming = tokio_stream::iter((0..5).map(Ok::<_, io::Error>));
        let admitted: Vec<_> = limit
            .clone()
            .apply(incoming)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(admitted.iter().map(|l| l.io).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(limit.refused(), 3);
        drop(admitted);
        assert!(limit.try_admit().is_some());
    }

    #[tokio::test]
    async fn one_key_cannot_take_every_slot_and_a_closed_connection_frees_its_keys_share() {
        let limit = ConnectionLimit::new("test", 4).per_key(2);
        // Keys 7, 7, 7, 8, none: the third of key 7 is refused, the others fit.
        let incoming = tokio_stream::iter([7, 7, 7, 8, 0].map(Ok::<u64, io::Error>));
        let admitted: Vec<_> = limit
            .clone()
            .apply_keyed(incoming, |&k| (k != 0).then_some(k))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            admitted.iter().map(|l| l.io).collect::<Vec<_>>(),
            [7, 7, 8, 0]
        );
        assert_eq!(limit.refused(), 1);
        // The total is taken: even a new key is refused, and its share is not kept.
        assert!(limit.try_admit_keyed(Some(9)).is_none());
        drop(admitted);
        assert!(limit.try_admit_keyed(Some(9)).is_some());
        let again: Vec<_> = (0..2).map(|_| limit.try_admit_keyed(Some(7))).collect();
        assert!(again.iter().all(Option::is_some));
        assert!(limit.try_admit_keyed(Some(7)).is_none());
    }
}
