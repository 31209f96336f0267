//! Metrics and health over HTTP, for a Prometheus scraper and for liveness and readiness
//! probes (systemd, Kubernetes, a load balancer).
//!
//! A daemon binds its listeners at start ([`HttpEndpoints::bind`]: `metrics_address` serves
//! [`METRICS_PATH`], `health_address` serves [`LIVE_PATH`] and [`READY_PATH`], one address may
//! be both), builds one [`Registry`], and serves them ([`HttpEndpoints::serve`]) until the
//! process ends: the health paths keep answering through a graceful shutdown, so that `/ready`
//! can say "draining" while open streams finish.
//!
//! - `/metrics`: every metric of the registry in the OpenMetrics text format (which Prometheus
//!   reads), encoded at each scrape; scrape-time values come from collectors.
//! - `/live`: 200 while the process serves HTTP at all.
//! - `/ready`: 200 when the daemon's readiness check passes, else 503 with the reason.
//!
//! Each listener serves at most [`MAX_HTTP_CONNECTIONS`] connections at once, reads a request's
//! headers within [`HEADER_TIMEOUT`] and keeps a connection at most [`CONNECTION_LIFETIME`]:
//! these listeners are for a scraper and a prober, not for the public.
//!
//! [`GrpcMetrics`] is the tower layer that counts a gRPC server's calls by service, method and
//! status code, with their latency.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::limits::ConnectionLimit;

/// Where Prometheus scrapes.
pub const METRICS_PATH: &str = "/metrics";
/// The liveness probe's path (as SPIRE's).
pub const LIVE_PATH: &str = "/live";
/// The readiness probe's path (as SPIRE's).
pub const READY_PATH: &str = "/ready";

/// Connections one listener serves at once; those beyond are closed when accepted.
pub const MAX_HTTP_CONNECTIONS: usize = 64;
/// How long a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection is kept, however busy.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The content type of [`METRICS_PATH`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether the daemon is ready to serve; the error says why not (shown by `/ready`).
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What a listener serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Paths {
    metrics: bool,
    health: bool,
}

/// The metrics and health listeners, bound; nothing is served until [`HttpEndpoints::serve`].
#[derive(Debug)]
pub struct HttpEndpoints {
    listeners: Vec<(TcpListener, Paths)>,
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} ({what})")]
pub struct BindError {
    /// The address.
    pub address: SocketAddr,
    /// `metrics_address` or `health_address`.
    pub what: &'static str,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

impl HttpEndpoints {
    /// Binds `metrics` (serving `/metrics`) and `health` (serving `/live` and `/ready`); the
    /// same address serves both (but port 0, any free port, is a listener of its own each
    /// time). Neither: nothing is bound.
    ///
    /// # Errors
    ///
    /// An address that cannot be bound.
    pub async fn bind(
        metrics: Option<SocketAddr>,
        health: Option<SocketAddr>,
    ) -> Result<Self, BindError> {
        // One listener per address, except that port 0 (any free port) always gets its own.
        let mut wanted: Vec<(SocketAddr, Paths, &'static str)> = Vec::new();
        if let Some(address) = metrics {
            let paths = Paths {
                metrics: true,
                health: false,
            };
            wanted.push((address, paths, "metrics_address"));
        }
        if let Some(address) = health {
            match wanted.first_mut() {
                Some((shared, paths, _)) if *shared == address && address.port() != 0 => {
                    paths.health = true;
                }
                _ => {
                    let paths = Paths {
                        metrics: false,
                        health: true,
                    };
                    wanted.push((address, paths, "health_address"));
                }
            }
        }
        let mut listeners = Vec::new();
        for (address, paths, what) in wanted {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| BindError {
                    address,
                    what,
                    source,
                })?;
            listeners.push((listener, paths));
        }
        Ok(Self { listeners })
    }

    /// The bound address of the listener serving `/metrics`, if any (the port the system chose
    /// for port 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.addr_where(|p| p.metrics)
    }

    /// The bound address of the listener serving `/live` and `/ready`, if any.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.addr_where(|p| p.health)
    }

    fn addr_where(&self, f: impl Fn(&Paths) -> bool) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(_, paths)| f(paths))
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// Serves every listener until the returned task is aborted (at the very end of the
    /// process, after the drain).
    pub fn serve(self, registry: Registry, ready: ReadyCheck) -> tokio::task::JoinHandle<()> {
        let registry = Arc::new(registry);
        let mut tasks = tokio::task::JoinSet::new();
        for (listener, paths) in self.listeners {
            if let Ok(address) = listener.local_addr() {
                info!(%address, metrics = paths.metrics, health = paths.health, "http endpoints listening");
            }
            let handler = Handler {
                registry: registry.clone(),
                ready: ready.clone(),
                paths,
            };
            tasks.spawn(accept_loop(listener, handler));
        }
        tokio::spawn(async move { while tasks.join_next().await.is_some() {} })
    }
}

/// Accepts connections and serves each on a task of its own, within the listener's limit.
async fn accept_loop(listener: TcpListener, handler: Handler) {
    let limit = ConnectionLimit::new("metrics/health", MAX_HTTP_CONNECTIONS);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "http endpoints: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = limit.try_admit() else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = handler.respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(error)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                debug!(%error, "http endpoints: connection ended");
            }
            drop(permit);
        });
    }
}

/// Answers the requests of one listener.
#[derive(Clone)]
struct Handler {
    registry: Arc<Registry>,
    ready: ReadyCheck,
    paths: Paths,
}

impl Handler {
    fn respond(&self, request: &hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
        let method = request.method();
        if method != hyper::Method::GET && method != hyper::Method::HEAD {
            let mut response = text(405, "only GET and HEAD\n".to_owned());
            response.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD"),
            );
            return response;
        }
        match request.uri().path() {
            METRICS_PATH if self.paths.metrics => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => {
                        let mut response = text(200, body);
                        response.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
                        );
                        response
                    }
                    Err(error) => {
                        warn!(%error, "cannot encode the metrics");
                        text(500, "cannot encode the metrics\n".to_owned())
                    }
                }
            }
            LIVE_PATH if self.paths.health => text(200, "live\n".to_owned()),
            READY_PATH if self.paths.health => match (self.ready)() {
                Ok(()) => text(200, "ready\n".to_owned()),
                Err(reason) => text(503, format!("not ready: {reason}\n")),
            },
            _ => text(404, "not found\n".to_owned()),
        }
    }
}

/// A plain-text response.
fn text(status: u16, body: String) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

// === scrape-time values ===

/// Encodes one unlabelled gauge whose value is read at the scrape (in a collector).
///
/// # Errors
///
/// The encoder's.
pub fn encode_gauge(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&prometheus_client::registry::Unit>,
    value: f64,
) -> Result<(), fmt::Error> {
    use prometheus_client::encoding::EncodeMetric as _;
    let metric = encoder.encode_descriptor(
        name,
        help,
        unit,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    prometheus_client::metrics::gauge::ConstGauge::new(value).encode(metric)
}

/// Encodes one unlabelled gauge of a count read at the scrape.
///
/// # Errors
///
/// The encoder's.
pub fn encode_count(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: usize,
) -> Result<(), fmt::Error> {
    use prometheus_client::encoding::EncodeMetric as _;
    let metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    prometheus_client::metrics::gauge::ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
        .encode(metric)
}

// === gRPC calls ===

/// The labels of a gRPC call: its service and method (`unknown` for a path the protos do not
/// define, so that callers cannot mint label values) and its status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `SpiffeWorkloadAPI`, `sigil.node.v1.Node`, ...
    pub service: &'static str,
    /// `FetchX509SVID`, ...
    pub method: &'static str,
    /// The gRPC status code, as gRPC names it in lower case (`ok`, `permission_denied`, ...).
    pub code: &'static str,
}

/// The labels of a gRPC call's latency: its service and method.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// As [`CallLabels::service`].
    pub service: &'static str,
    /// As [`CallLabels::method`].
    pub method: &'static str,
}

/// A constructor of latency histograms: 0.5 ms to about 16 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// A family of latency histograms.
pub type LatencyFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A tower layer over a tonic server: every call counted by service, method and status code
/// (`<prefix>_grpc_calls_total`) and timed to its last frame
/// (`<prefix>_grpc_call_duration_seconds`; a stream counts its whole life).
#[derive(Clone)]
pub struct GrpcMetrics {
    calls: Family<CallLabels, Counter>,
    latency: LatencyFamily<MethodLabels>,
    /// `/service/method` -> its labels, for every method the protos define.
    known: Arc<std::collections::HashMap<String, (&'static str, &'static str)>>,
}

impl fmt::Debug for GrpcMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcMetrics").finish_non_exhaustive()
    }
}

impl GrpcMetrics {
    /// The layer's metrics, registered in `registry` (under its prefix, if it has one). Only
    /// the (`package.Service`, `Method`) pairs of `known` become label values; any other path
    /// a caller sends counts as `unknown`.
    pub fn new(registry: &mut Registry, known: &'static [(&'static str, &'static str)]) -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        let latency = LatencyFamily::<MethodLabels>::new_with_constructor(latency_histogram);
        registry.register(
            "grpc_calls",
            "gRPC calls ended, by service, method and status code",
            calls.clone(),
        );
        registry.register_with_unit(
            "grpc_call_duration",
            "How long gRPC calls took, to their last frame (a stream: its whole life)",
            prometheus_client::registry::Unit::Seconds,
            latency.clone(),
        );
        let known = known
            .iter()
            .map(|&(service, method)| (format!("/{service}/{method}"), (service, method)))
            .collect();
        Self {
            calls,
            latency,
            known: Arc::new(known),
        }
    }

    /// How many calls of `service`/`method` ended with `code` (for tests and benches).
    pub fn count(&self, service: &'static str, method: &'static str, code: &'static str) -> u64 {
        self.calls
            .get(&CallLabels {
                service,
                method,
                code,
            })
            .map_or(0, |c| c.get())
    }
}

impl<S> tower::Layer<S> for GrpcMetrics {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            metrics: self.clone(),
        }
    }
}

/// A service whose calls [`GrpcMetrics`] counts.
#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S> fmt::Debug for Metered<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metered").finish_non_exhaustive()
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<MeteredBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = self
            .metrics
            .known
            .get(request.uri().path())
            .copied()
            .unwrap_or(("unknown", "unknown"));
        let call = Call {
            metrics: self.metrics.clone(),
            service,
            method,
            start: Instant::now(),
            ended: false,
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            let mut call = call;
            // A trailers-only response (an error) carries its status in the headers.
            if let Some(code) = status_of(response.headers()) {
                call.end(code);
            }
            Ok(response.map(|body| MeteredBody { inner: body, call }))
        })
    }
}

/// The `grpc-status` of a header map, as a code name.
fn status_of(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(code_name(value.parse::<i32>().ok()?))
}

/// The name gRPC gives status code `code`, in lower case.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "ok",
        1 => "cancelled",
        2 => "unknown",
        3 => "invalid_argument",
        4 => "deadline_exceeded",
        5 => "not_found",
        6 => "already_exists",
        7 => "permission_denied",
        8 => "resource_exhausted",
        9 => "failed_precondition",
        10 => "aborted",
        11 => "out_of_range",
        12 => "unimplemented",
        13 => "internal",
        14 => "unavailable",
        15 => "data_loss",
        16 => "unauthenticated",
        _ => "unknown",
    }
}

/// One call, counted when it ends.
struct Call {
    metrics: GrpcMetrics,
    service: &'static str,
    method: &'static str,
    start: Instant,
    ended: bool,
}

impl Call {
    fn end(&mut self, code: &'static str) {
        if self.ended {
            return;
        }
        self.ended = true;
        let (service, method) = (self.service, self.method);
        self.metrics
            .latency
            .get_or_create(&MethodLabels { service, method })
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics
            .calls
            .get_or_create(&CallLabels {
                service,
                method,
                code,
            })
            .inc();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The body was dropped before its trailers: the client went away.
        self.end("cancelled");
    }
}

/// A response body that ends its call's count at its trailers.
pub struct MeteredBody<R> {
    inner: R,
    call: Call,
}

impl<R> fmt::Debug for MeteredBody<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteredBody").finish_non_exhaustive()
    }
}

impl<R> http_body::Body for MeteredBody<R>
where
    R: http_body::Body + Unpin,
{
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    this.call.end(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.end("unknown"),
            // gRPC always ends with trailers: a body without them says nothing of the call.
            Poll::Ready(None) => this.call.end("unknown"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::convert::Infallible;

    use http_body_util::BodyExt as _;
    use tower::{Layer as _, ServiceExt as _};

    use super::*;

    mod futures_stream {
        use super::*;

        /// A fixed list of frames, as a stream.
        pub(super) struct Frames(std::collections::VecDeque<http_body::Frame<Bytes>>);

        impl Frames {
            pub(super) fn new(frames: Vec<http_body::Frame<Bytes>>) -> Self {
                Self(frames.into())
            }
        }

        impl tokio_stream::Stream for Frames {
            type Item = Result<http_body::Frame<Bytes>, Infallible>;

            fn poll_next(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                Poll::Ready(self.0.pop_front().map(Ok))
            }
        }
    }

    #[tokio::test]
    async fn calls_are_counted_at_their_trailers_and_unknown_paths_mint_no_labels() {
        let mut registry = Registry::default();
        let metrics = GrpcMetrics::new(&mut registry, &[("pkg.S", "Stream")]);
        // A gRPC-shaped service: `/pkg.S/Stream` answers with a body whose trailers say `ok`;
        // anything else is a trailers-only `unimplemented`, as tonic's router answers.
        let inner = tower::service_fn(|request: http::Request<()>| {
            let response = if request.uri().path() == "/pkg.S/Stream" {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                http::Response::new(http_body_util::StreamBody::new(
                    futures_stream::Frames::new(vec![
                        http_body::Frame::data(Bytes::from_static(b"x")),
                        http_body::Frame::trailers(trailers),
                    ]),
                ))
            } else {
                let mut response = http::Response::new(http_body_util::StreamBody::new(
                    futures_stream::Frames::new(vec![]),
                ));
                response
                    .headers_mut()
                    .insert("grpc-status", "12".parse().unwrap());
                response
            };
            std::future::ready(Ok::<_, Infallible>(response))
        });
        let service = metrics.layer(inner);

        let response = service
            .clone()
            .oneshot(http::Request::get("/pkg.S/Stream").body(()).unwrap())
            .await
            .unwrap();
        // Not counted until the body reached its trailers.
        assert_eq!(metrics.count("pkg.S", "Stream", "ok"), 0);
        let collected = response.into_body().collect().await.unwrap();
        assert!(collected.trailers().is_some());
        assert_eq!(metrics.count("pkg.S", "Stream", "ok"), 1);

        // A caller's made-up paths all count as one label set.
        for path in ["/pkg.S/Nope", "/made.up/Path1", "/made.up/Path2"] {
            let response = service
                .clone()
                .oneshot(http::Request::get(path).body(()).unwrap())
                .await
                .unwrap();
            drop(response.into_body().collect().await.unwrap());
        }
        assert_eq!(metrics.count("unknown", "unknown", "unimplemented"), 3);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            !text.contains("made.up") && !text.contains("Nope"),
            "{text}"
        );

        // A stream the client drops before its end is counted as cancelled.
        let response = service
            .clone()
            .oneshot(http::Request::get("/pkg.S/Stream").body(()).unwrap())
            .await
            .unwrap();
        drop(response);
        assert_eq!(metrics.count("pkg.S", "Stream", "cancelled"), 1);
        // And so is a made-up path dropped before its answer: still no label of its own.
        let response = service
            .clone()
            .oneshot(http::Request::get("/made.up/Path3").body(()).unwrap())
            .await
            .unwrap();
        drop(response);
        assert_eq!(metrics.count("unknown", "unknown", "unimplemented"), 4);
    }

    #[tokio::test]
    async fn each_listener_serves_its_paths_and_ready_gives_the_reason() {
        let endpoints = HttpEndpoints::bind(
            Some("127.0.0.1:0".parse().unwrap()),
            Some("127.0.0.1:0".parse().unwrap()),
        )
        .await
        .unwrap();
        let (metrics, health) = (
            endpoints.metrics_addr().unwrap(),
            endpoints.health_addr().unwrap(),
        );
        assert_ne!(metrics, health, "port 0 twice is two listeners");
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("probe", "a counter", counter.clone());
        counter.inc();
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let check: ReadyCheck = {
            let ready = ready.clone();
            Arc::new(move || {
                if ready.load(std::sync::atomic::Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("warming up".to_owned())
                }
            })
        };
        let task = endpoints.serve(registry, check);
        let get = |address: SocketAddr, method: &'static str, path: &'static str| async move {
            let stream = tokio::net::TcpStream::connect(address).await.unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let response = sender
                .send_request(
                    hyper::Request::builder()
                        .method(method)
                        .uri(path)
                        .header("host", "x")
                        .body(http_body_util::Empty::<Bytes>::new())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        };
        let (status, body) = get(metrics, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("probe_total 1") && body.ends_with("# EOF\n"),
            "{body}"
        );
        assert_eq!(get(metrics, "GET", "/ready").await.0, 404);
        assert_eq!(get(health, "GET", "/metrics").await.0, 404);
        assert_eq!(
            get(health, "GET", "/live").await,
            (200, "live\n".to_owned())
        );
        assert_eq!(
            get(health, "GET", "/ready").await,
            (503, "not ready: warming up\n".to_owned())
        );
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            get(health, "GET", "/ready").await,
            (200, "ready\n".to_owned())
        );
        assert_eq!(get(health, "POST", "/ready").await.0, 405);

        // The listener's cap: idle connections beyond it are closed as soon as accepted.
        let mut idle = Vec::new();
        for _ in 0..MAX_HTTP_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(health).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut extra = tokio::net::TcpStream::connect(health).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut extra, &mut buf),
        )
        .await
        .expect("the connection over the cap was left open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(idle);
        task.abort();
    }
}
