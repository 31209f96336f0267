//! HTTP/1.1 targets: one decision per request (action = the method, context = method and path).
//! A denied request gets `403` and a `broker.deny` record; an allowed one is recorded
//! (`broker.request`) before it goes upstream, and its outcome (`broker.response`: status and
//! latency) when the upstream answers. The whole connection, in-flight requests and idle
//! keep-alive alike, is dropped when it is cut.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Mutex, watch};
use tracing::{debug, info};

use crate::proxy::{CloseReason, Counters, Peer, TargetContext, deadline, note, record};
use crate::upstream;

type Body = BoxBody<Bytes, hyper::Error>;
type Sender = Arc<Mutex<hyper::client::conn::http1::SendRequest<Incoming>>>;

/// Serves one client connection until it ends or is cut; returns why it ended.
pub(crate) async fn serve(
    context: Arc<TargetContext>,
    client: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    server: Box<dyn upstream::Stream>,
    counters: Arc<Counters>,
    mut cut: watch::Receiver<Option<CloseReason>>,
    peer: Arc<Peer>,
) -> CloseReason {
    let Ok((sender, upstream)) =
        hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(server)).await
    else {
        return CloseReason::Upstream;
    };
    let upstream = tokio::spawn(async move {
        if let Err(error) = upstream.await {
            debug!(%error, "upstream http connection ended");
        }
    });
    let sender: Sender = Arc::new(Mutex::new(sender));
    let service = {
        let peer = Arc::clone(&peer);
        hyper::service::service_fn(move |request| {
            handle(
                Arc::clone(&context),
                Arc::clone(&sender),
                Arc::clone(&peer),
                request,
            )
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(
            TokioIo::new(Counted {
                inner: client,
                counters,
            }),
            service,
        );
    let (at, at_deadline) = deadline(&peer);
    let sleep = tokio::time::sleep(at);
    tokio::pin!(connection, sleep);
    let reason = tokio::select! {
        biased;
        changed = cut.changed() => match changed {
            Ok(()) => cut.borrow().unwrap_or(CloseReason::Shutdown),
            Err(_) => CloseReason::Shutdown,
        },
        () = &mut sleep => at_deadline,
        result = &mut connection => match result {
            Ok(()) => CloseReason::Client,
            Err(error) => {
                debug!(%error, "client http connection ended");
                CloseReason::Client
            }
        },
    };
    upstream.abort();
    reason
}

async fn handle(
    context: Arc<TargetContext>,
    sender: Sender,
    peer: Arc<Peer>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let verdict = context
        .policy
        .decide(&peer.principal, &method, Some((&method, &path)));
    let mut facts = Map::new();
    facts.insert("method".to_owned(), Value::from(method.clone()));
    facts.insert("path".to_owned(), Value::from(path.clone()));
    facts.insert(
        "decision".to_owned(),
        Value::from(if verdict.allowed { "allow" } else { "deny" }),
    );
    facts.insert("policies".to_owned(), Value::from(verdict.policies));
    if !verdict.allowed {
        facts.insert(
            "reason".to_owned(),
            Value::from(CloseReason::Policy.as_str()),
        );
        facts.insert("status".to_owned(), Value::from(403));
        info!(peer = %peer.principal.spiffe_id, %method, %path, "request denied by policy");
        if note(&context, "broker.deny", facts, &peer).is_err() {
            return Ok(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot record the request\n",
            ));
        }
        return Ok(plain(StatusCode::FORBIDDEN, "denied by policy\n"));
    }
    // Durable before the request goes upstream: a spool failure refuses it.
    if record(&context, "broker.request", facts, &peer)
        .await
        .is_err()
    {
        return Ok(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "cannot record the request\n",
        ));
    }
    let started = Instant::now();
    let answered = {
        let mut sender = sender.lock().await;
        match sender.ready().await {
            Ok(()) => sender.send_request(request).await,
            Err(error) => Err(error),
        }
    };
    let mut outcome = Map::new();
    outcome.insert("method".to_owned(), Value::from(method));
    outcome.insert("path".to_owned(), Value::from(path));
    outcome.insert(
        "latency_us".to_owned(),
        Value::from(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)),
    );
    let response = match answered {
        Ok(response) => {
            outcome.insert("status".to_owned(), Value::from(response.status().as_u16()));
            if let Some(length) = response
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
            {
                outcome.insert("bytes".to_owned(), Value::from(length));
            }
            response.map(http_body_util::BodyExt::boxed)
        }
        Err(error) => {
            debug!(%error, "upstream request failed");
            outcome.insert("status".to_owned(), Value::from(502));
            plain(StatusCode::BAD_GATEWAY, "the upstream did not answer\n")
        }
    };
    // The request already went upstream: its outcome is recorded without waiting for the disk
    // (a failure is logged by `note`), and the answer goes back.
    let _ = note(&context, "broker.response", outcome, &peer);
    Ok(response)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// A stream that counts the bytes read from it (up) and written to it (down).
struct Counted<S> {
    inner: S,
    counters: Arc<Counters>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        self.counters.up.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.counters.down.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
