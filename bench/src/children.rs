//! The roles the harness re-executes itself in, so that the server, the agent and the baseline
//! service each run in a process of their own (their memory and CPU are then theirs alone) while
//! running exactly the library code this build compiled:
//!
//! - `__server CONFIG.toml`: [`sigil_server::Server`], as `sigil-server run` starts it;
//!   prints `READY <node API address>`.
//! - `__agent TRUST_DOMAIN SERVER_ADDR JOIN_TOKEN BUNDLE.pem SOCKET DATA_DIR`:
//!   [`sigil_agent::agent::run`], as `sigil-agent run` starts it.
//! - `__baseline PLAIN_SOCKET FRONT_DOOR_SOCKET FRONT_DOOR_TASK_SOCKET`: a trivial Workload API
//!   service (fixed answers) on a plain tokio `UnixListener`, on the front-door
//!   [`WorkloadListener`] (the listener `agent::run` serves on), and on the front door again
//!   with its server run as a task of the runtime (as `agent::run` runs it); prints `READY ok`.
//!   Its `FetchX509SVID` streams all watch one message, which a `ValidateJWTSVID` call changes
//!   (the svid given becomes its hint): the push the rotation's floor is measured with.
//!
//! Each stops at once when its stdin closes. Logs (warnings and errors) go to stderr.

use std::io::Write as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sigil_agent::workload_api::WorkloadListener;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid,
    X509svidRequest, X509svidResponse,
};
use tokio::io::AsyncReadExt as _;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

/// The log target of the front-door listener, which logs `workload api listening` when bound.
const FRONT_DOOR_TARGET: &str = "sigil_agent::workload_api::listener";

/// What the front-door listener logs when it binds (at info, under [`FRONT_DOOR_TARGET`]).
pub(crate) const FRONT_DOOR_BOUND: &str = "workload api listening";

/// Runs the role named by `args[0]`, if it is one; `None` when `args` name no role.
pub(crate) fn dispatch(args: &[String]) -> Option<anyhow::Result<()>> {
    let (role, rest) = args.split_first()?;
    let run = match role.as_str() {
        "__server" => server,
        "__agent" => agent,
        "__baseline" => baseline,
        _ => return None,
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return Some(Err(e).context("cannot start the async runtime")),
    };
    let result = runtime.block_on(run(rest.to_vec()));
    // Nothing may keep a stopped child alive (tokio's stdin reader is a blocking thread).
    runtime.shutdown_timeout(Duration::from_secs(1));
    // As `sigil-server run` does once its runtime is gone.
    Some(result.map(|stopped| {
        if let Some(config) = stopped {
            sigil_server::snapshot_store_after_stop(&config);
        }
    }))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIGIL_LOG")
        // The front door's bind line tells the harness which listener `agent::run` serves on.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("warn,{FRONT_DOOR_TARGET}=info"))
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves when stdin reaches its end (the harness closed it or died).
async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

fn ready(value: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    // Under a `SIGIL_BENCH_WRAP_<ROLE>` wrapper the harness's child may be the wrapper
    // (perf, a shell): this line tells it which process to measure.
    writeln!(out, "PID {}", std::process::id())?;
    writeln!(out, "READY {value}")?;
    out.flush()?;
    Ok(())
}

/// What a role's future gives when it ends: the configuration of a server that stopped cleanly
/// (its store gets sled's snapshot once the runtime is gone), or nothing.
type BoxFuture =
    Pin<Box<dyn Future<Output = anyhow::Result<Option<sigil_server::ServerConfig>>> + Send>>;

fn server(args: Vec<String>) -> BoxFuture {
    Box::pin(async move {
        let [config_path] = args.as_slice() else {
            bail!("usage: __server CONFIG.toml");
        };
        let text = std::fs::read_to_string(config_path)
            .with_context(|| format!("cannot read {config_path}"))?;
        let config = sigil_server::ServerConfig::from_sources(Some(&text), Default::default())?;
        let server = sigil_server::Server::start(config.clone()).await?;
        ready(&server.local_addr.to_string())?;
        server
            .run(async {
                stdin_closed().await;
                sigil_server::Shutdown::Immediate
            })
            .await?;
        Ok(Some(config))
    })
}

fn agent(args: Vec<String>) -> BoxFuture {
    Box::pin(async move {
        let [trust_domain, server, token, bundle, socket, data] = args.as_slice() else {
            bail!("usage: __agent TRUST_DOMAIN SERVER_ADDR JOIN_TOKEN BUNDLE.pem SOCKET DATA_DIR");
        };
        let config = sigil_agent::config::AgentConfig::from_sources(
            None,
            sigil_agent::config::Overrides {
                trust_domain: Some(trust_domain.clone()),
                server_address: vec![server.clone()],
                join_token: Some(token.clone()),
                trust_bundle: Some(bundle.clone()),
                socket_path: Some(socket.clone()),
                data_dir: Some(data.clone()),
                ..Default::default()
            },
        )?;
        sigil_agent::agent::run(config, async {
            stdin_closed().await;
            sigil_agent::agent::Shutdown::Immediate
        })
        .await?;
        Ok(None)
    })
}

fn baseline(args: Vec<String>) -> BoxFuture {
    Box::pin(async move {
        let [plain, front, front_task] = args.as_slice() else {
            bail!("usage: __baseline PLAIN_SOCKET FRONT_DOOR_SOCKET FRONT_DOOR_TASK_SOCKET");
        };
        let plain_listener = tokio::net::UnixListener::bind(PathBuf::from(plain))
            .with_context(|| format!("cannot bind {plain}"))?;
        let front_listener = WorkloadListener::bind(front)?;
        let trivial = Trivial::new();
        let plain = tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(trivial.clone()))
            .serve_with_incoming_shutdown(UnixListenerStream::new(plain_listener), stdin_closed());
        let front = tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(trivial.clone()))
            .serve_with_incoming(front_listener);
        // The same, accepting on a runtime worker: a connection's task then starts on the
        // worker that accepted it instead of waking one.
        let front_task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(trivial))
                .serve_with_incoming(WorkloadListener::bind(front_task)?),
        );
        ready("ok")?;
        tokio::select! {
            result = plain => result?,
            result = front => result?,
            result = front_task => result??,
        }
        Ok(None)
    })
}

/// The baseline service: fixed answers, no attestation, no cache. Its three servers share one
/// watched X.509 message, which only the push changes.
#[derive(Debug, Clone)]
struct Trivial {
    x509: Arc<watch::Sender<X509svidResponse>>,
}

impl Trivial {
    fn new() -> Self {
        // About the size of a real answer: a 450-byte leaf, a 138-byte key, a 500-byte bundle.
        let (x509, _) = watch::channel(X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://bench.example/baseline".into(),
                x509_svid: vec![0x30; 450],
                x509_svid_key: vec![0x30; 138],
                bundle: vec![0x30; 500],
                hint: String::new(),
            }],
            crl: vec![],
            federated_bundles: Default::default(),
        });
        Self {
            x509: Arc::new(x509),
        }
    }
}

/// The later messages of a `FetchX509SVID` stream of the baseline: each change of the watched
/// message, cloned (tonic then encodes it), with no task or channel of the stream's own.
struct Pushes {
    /// The wait for the next change, which owns the receiver; `None` once the sender is gone.
    next: Option<Pin<Box<dyn Future<Output = Option<Pushed>> + Send>>>,
}

/// A changed message and the receiver to wait on for the next.
type Pushed = (X509svidResponse, watch::Receiver<X509svidResponse>);

impl Pushes {
    fn after(mut rx: watch::Receiver<X509svidResponse>) -> Self {
        Self {
            next: Some(Box::pin(async move {
                rx.changed().await.ok()?;
                let message = rx.borrow_and_update().clone();
                Some((message, rx))
            })),
        }
    }
}

impl Stream for Pushes {
    type Item = Result<X509svidResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(next) = self.next.as_mut() else {
            return Poll::Ready(None);
        };
        match next.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.next = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some((message, rx))) => {
                *self = Self::after(rx);
                Poll::Ready(Some(Ok(message)))
            }
        }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Trivial {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;
    type FetchWITSVIDStream = ResponseStream<WitsvidResponse>;
    type FetchWITBundlesStream = ResponseStream<WitBundlesResponse>;

    /// The watched message, then each change of it, until the client goes.
    async fn fetch_x509svid(
        &self,
        _: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let mut rx = self.x509.subscribe();
        let first = rx.borrow_and_update().clone();
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(first)).chain(Pushes::after(rx)),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    /// The bare unary call: a static answer.
    async fn fetch_jwtsvid(
        &self,
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: "spiffe://bench.example/baseline".into(),
                svid: "baseline".into(),
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    /// The push: the svid given becomes the watched message's hint, and every open
    /// `FetchX509SVID` stream gets the message.
    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let hint = request.into_inner().svid;
        self.x509.send_modify(|message| {
            if let Some(svid) = message.svids.first_mut() {
                svid.hint = hint;
            }
        });
        Ok(Response::new(ValidateJwtsvidResponse::default()))
    }

    async fn fetch_witsvid(
        &self,
        _: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn fetch_wit_bundles(
        &self,
        _: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}
