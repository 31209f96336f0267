//! The Workload API front door end to end: a small Workload API service (it echoes the caller's
//! uid, gid and pid) served through [`WorkloadListener`], called from tonic, from the `spiffe`
//! crate, from a raw HTTP/2 client that sends the `:authority` gRPC C-core sends, and from Python
//! grpcio; the caller's credentials as the kernel reports them; a caller that exits before its
//! attestation completes; and the listener's socket handling.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "test code"
)]

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use httlib_hpack::{Decoder, Encoder};
use prost::Message;
use sigil_agent::workload_api::{
    CallerProcess, ListenerError, ProcessHandleKind, ProcessTracking, WorkloadListener,
};
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const CHILD_ENV: &str = "SIGIL_FRONT_DOOR_CHILD";
const NOBODY: u32 = 65534;

// ------------------------------------------------------------------------------------------------
// The test service

/// Holds a request after it arrived until the test lets it go (to let the caller exit first).
struct Gate {
    arrived: mpsc::UnboundedSender<CallerProcess>,
    proceed: Semaphore,
    outcome: mpsc::UnboundedSender<bool>,
}

/// A Workload API that checks the security header, takes the caller from the connection, and
/// echoes its credentials: in the JWT-SVID token (`uid=U;gid=G;pid=P`) and in the X509-SVID's
/// hint. A caller that is no longer the process that connected gets `Unavailable`.
#[derive(Clone, Default)]
struct Echo {
    seen: Arc<Mutex<Vec<CallerProcess>>>,
    gate: Option<Arc<Gate>>,
}

fn echo(caller: &CallerProcess) -> String {
    format!(
        "uid={};gid={};pid={}",
        caller.uid(),
        caller.gid(),
        caller.pid().unwrap_or(0)
    )
}

impl Echo {
    async fn attest<T>(&self, request: &Request<T>) -> Result<CallerProcess, Status> {
        let header = request.metadata().get("workload.spiffe.io");
        if header.map(|v| v.as_bytes()) != Some(b"true") {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        let caller = request
            .extensions()
            .get::<CallerProcess>()
            .cloned()
            .ok_or_else(|| Status::internal("no caller on the connection"))?;
        self.seen.lock().unwrap().push(caller.clone());
        let alive = match self.gate.clone() {
            None => caller.still_alive_and_same(),
            // In a task of its own: hyper drops this handler when the caller's connection
            // closes, and the test wants to see the check anyway.
            Some(gate) => {
                let caller = caller.clone();
                tokio::spawn(async move {
                    gate.arrived.send(caller.clone()).unwrap();
                    gate.proceed.acquire().await.unwrap().forget();
                    // ... here the real service attests the caller through /proc/PID ...
                    let alive = caller.still_alive_and_same();
                    gate.outcome.send(alive).unwrap();
                    alive
                })
                .await
                .unwrap()
            }
        };
        if !alive {
            return Err(Status::unavailable(
                "caller exited before its attestation completed",
            ));
        }
        Ok(caller)
    }
}

type Stream<T> = tokio_stream::Iter<std::vec::IntoIter<Result<T, Status>>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Echo {
    type FetchX509SVIDStream = Stream<X509svidResponse>;
    type FetchX509BundlesStream = Stream<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;
    type FetchWITSVIDStream = Stream<WitsvidResponse>;
    type FetchWITBundlesStream = Stream<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = self.attest(&request).await?;
        let msg = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: format!("spiffe://example.org/uid/{}", caller.uid()),
                x509_svid: vec![1],
                x509_svid_key: vec![2],
                bundle: vec![3],
                hint: echo(&caller),
            }],
            ..Default::default()
        };
        Ok(Response::new(tokio_stream::iter(vec![Ok(msg)])))
    }
    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let caller = self.attest(&request).await?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: "spiffe://example.org/echo".into(),
                svid: echo(&caller),
                hint: String::new(),
            }],
        }))
    }
    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn fetch_witsvid(
        &self,
        _: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn fetch_wit_bundles(
        &self,
        _: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("test"))
    }
}

/// A running server and its socket (in a temporary directory every user can enter).
struct Running {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

fn socket_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("agent").join("public").join("api.sock");
    (dir, sock)
}

/// Serves `echo` through the front door.
async fn serve(echo: Echo, tracking: ProcessTracking) -> Running {
    let (dir, sock) = socket_dir();
    let listener = WorkloadListener::bind(&sock)
        .unwrap()
        .with_process_tracking(tracking);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(echo))
            .serve_with_incoming_shutdown(listener, async {
                let _ = stopped.await;
            }),
    );
    Running {
        _dir: dir,
        sock,
        stop: Some(stop),
        task,
    }
}

/// Serves `echo` on a plain tonic Unix listener, without the front door (the control).
async fn serve_plain(echo: Echo) -> Running {
    let (dir, sock) = socket_dir();
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(echo))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    Running {
        _dir: dir,
        sock,
        stop: Some(stop),
        task,
    }
}

async fn channel(sock: &Path) -> Channel {
    let sock = sock.to_path_buf();
    tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(
                    UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

fn with_header<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    request
}

fn me() -> String {
    let meta = std::fs::metadata("/proc/self").unwrap();
    format!(
        "uid={};gid={};pid={}",
        meta.uid(),
        meta.gid(),
        std::process::id()
    )
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

// ------------------------------------------------------------------------------------------------
// Clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_serves_tonic_many_calls_and_concurrent_streams_on_one_connection() {
    let echo = Echo::default();
    let server = serve(echo.clone(), ProcessTracking::Auto).await;
    let mut client = SpiffeWorkloadApiClient::new(channel(&server.sock).await);

    for i in 0..300 {
        let response = client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec![format!("aud-{i}")],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.svids[0].svid, me());
    }

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let mut client = client.clone();
        tasks.spawn(async move {
            if i % 2 == 0 {
                let response = client
                    .fetch_jwtsvid(with_header(JwtsvidRequest::default()))
                    .await
                    .unwrap();
                response.into_inner().svids[0].svid.clone()
            } else {
                let mut stream = client
                    .fetch_x509svid(with_header(X509svidRequest {}))
                    .await
                    .unwrap()
                    .into_inner();
                stream.message().await.unwrap().unwrap().svids[0]
                    .hint
                    .clone()
            }
        });
    }
    while let Some(answer) = tasks.join_next().await {
        assert_eq!(answer.unwrap(), me());
    }

    let missing = client
        .fetch_jwtsvid(Request::new(JwtsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);

    let seen = echo.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 364);
    assert!(seen.iter().all(|c| c.pid() == Some(std::process::id())));
    assert_ne!(seen[0].handle_kind(), ProcessHandleKind::None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_serves_the_spiffe_crate_client() {
    let server = serve(Echo::default(), ProcessTracking::Auto).await;
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", server.sock.display()))
        .await
        .unwrap();
    for i in 0..200 {
        let token = client
            .fetch_jwt_token([format!("aud-{i}")], None)
            .await
            .unwrap();
        assert_eq!(token, me());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let client = client.clone();
        tasks.spawn(async move { client.fetch_jwt_token([format!("c-{i}")], None).await });
    }
    while let Some(token) = tasks.join_next().await {
        assert_eq!(token.unwrap().unwrap(), me());
    }
    server.stop().await;
}

/// A minimal HTTP/2 client that sends gRPC requests the way gRPC C-core does over a Unix socket:
/// with the percent-encoded socket path as `:authority`, indexed in the HPACK dynamic table so
/// that later requests refer to it by index.
struct RawClient {
    io: UnixStream,
    encoder: Encoder<'static>,
    decoder: Decoder<'static>,
    next_stream: u32,
    buf: Vec<u8>,
}

#[derive(Debug, Default)]
struct RawResponse {
    headers: Vec<(String, String)>,
    data: Vec<u8>,
    reset: Option<u32>,
    done: bool,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn raw_frame(frame_type: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], frame_type, flags];
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

impl RawClient {
    async fn connect(sock: &Path) -> Self {
        let mut io = UnixStream::connect(sock).await.unwrap();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(raw_frame(0x4, 0, 0, &[]));
        io.write_all(&hello).await.unwrap();
        Self {
            io,
            encoder: Encoder::with_dynamic_size(4096),
            decoder: Decoder::with_dynamic_size(4096),
            next_stream: 1,
            buf: Vec::new(),
        }
    }

    /// Sends a FetchJWTSVID request; returns its stream id.
    async fn send(&mut self, authority: &str) -> u32 {
        let stream_id = self.next_stream;
        self.next_stream += 2;
        let mut block = Vec::new();
        let indexed = Encoder::WITH_INDEXING | Encoder::BEST_FORMAT;
        for (name, value, flags) in [
            (":method", "POST", Encoder::BEST_FORMAT),
            (":scheme", "http", Encoder::BEST_FORMAT),
            (":path", "/SpiffeWorkloadAPI/FetchJWTSVID", indexed),
            (":authority", authority, indexed | Encoder::HUFFMAN_VALUE),
            ("te", "trailers", indexed),
            ("content-type", "application/grpc", indexed),
            ("user-agent", "grpc-c/raw-test", indexed),
            ("workload.spiffe.io", "true", indexed),
        ] {
            self.encoder
                .encode(
                    (name.as_bytes().to_vec(), value.as_bytes().to_vec(), flags),
                    &mut block,
                )
                .unwrap();
        }
        let message = JwtsvidRequest {
            audience: vec!["raw".into()],
            spiffe_id: String::new(),
        }
        .encode_to_vec();
        let mut grpc = vec![0];
        grpc.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
        grpc.extend(message);
        let mut out = raw_frame(0x1, 0x4, stream_id, &block);
        out.extend(raw_frame(0x0, 0x1, stream_id, &grpc));
        self.io.write_all(&out).await.unwrap();
        stream_id
    }

    /// Reads frames until every stream in `responses` is done (trailers or reset).
    async fn wait(&mut self, responses: &mut HashMap<u32, RawResponse>) {
        while responses.values().any(|r| !r.done) {
            while self.buf.len() < 9
                || self.buf.len()
                    < 9 + ((usize::from(self.buf[0]) << 16)
                        | (usize::from(self.buf[1]) << 8)
                        | usize::from(self.buf[2]))
            {
                let mut chunk = [0u8; 16384];
                let n = tokio::time::timeout(Duration::from_secs(20), self.io.read(&mut chunk))
                    .await
                    .expect("server answered in time")
                    .unwrap();
                assert!(n > 0, "server closed the connection");
                self.buf.extend_from_slice(&chunk[..n]);
            }
            let len = (usize::from(self.buf[0]) << 16)
                | (usize::from(self.buf[1]) << 8)
                | usize::from(self.buf[2]);
            let frame: Vec<u8> = self.buf.drain(..9 + len).collect();
            let (frame_type, flags) = (frame[3], frame[4]);
            let stream_id =
                u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            let payload = &frame[9..];
            match frame_type {
                0x4 if flags & 0x1 == 0 => {
                    // Acknowledge the server's SETTINGS.
                    self.io
                        .write_all(&raw_frame(0x4, 0x1, 0, &[]))
                        .await
                        .unwrap();
                }
                0x1 => {
                    assert!(flags & 0x4 != 0, "responses fit in one frame");
                    let mut block = payload.to_vec();
                    let mut fields = Vec::new();
                    self.decoder.decode(&mut block, &mut fields).unwrap();
                    let response = responses.get_mut(&stream_id).unwrap();
                    for (name, value, _) in fields {
                        response.headers.push((
                            String::from_utf8(name).unwrap(),
                            String::from_utf8(value).unwrap(),
                        ));
                    }
                    response.done |= flags & 0x1 != 0;
                }
                0x0 => {
                    let response = responses.get_mut(&stream_id).unwrap();
                    response.data.extend_from_slice(payload);
                    response.done |= flags & 0x1 != 0;
                }
                0x3 => {
                    let response = responses.get_mut(&stream_id).unwrap();
                    response.reset = Some(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                    response.done = true;
                }
                0x7 => panic!("server sent GOAWAY: {payload:?}"),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_accepts_the_percent_encoded_authority_of_grpc_c_core() {
    let authority = "tmp%2Fsigil-agent%2Fpublic%2Fapi.sock";

    // Control: h2 behind a plain tonic listener resets such a stream with PROTOCOL_ERROR.
    let plain = serve_plain(Echo::default()).await;
    let mut client = RawClient::connect(&plain.sock).await;
    let id = client.send(authority).await;
    let mut responses = HashMap::from([(id, RawResponse::default())]);
    client.wait(&mut responses).await;
    assert_eq!(responses[&id].reset, Some(0x1), "PROTOCOL_ERROR");
    plain.stop().await;

    // Through the front door: 200 requests on one connection, in batches of 20 concurrent
    // streams; after the first, the authority is a one-byte reference to the dynamic table.
    let server = serve(Echo::default(), ProcessTracking::Auto).await;
    let mut client = RawClient::connect(&server.sock).await;
    for _ in 0..10 {
        let mut responses = HashMap::new();
        for _ in 0..20 {
            responses.insert(client.send(authority).await, RawResponse::default());
        }
        client.wait(&mut responses).await;
        for response in responses.values() {
            assert_eq!(response.reset, None);
            assert_eq!(response.header(":status"), Some("200"));
            assert_eq!(response.header("grpc-status"), Some("0"), "{response:?}");
            let message = JwtsvidResponse::decode(&response.data[5..]).unwrap();
            assert_eq!(message.svids[0].svid, me());
        }
    }
    server.stop().await;
}

fn python() -> Option<String> {
    let python = std::env::var("SIGIL_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_tools, google.protobuf"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    let required = std::env::var("SIGIL_REQUIRE_GRPCIO").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "SIGIL_REQUIRE_GRPCIO=1 but `{python} -c 'import grpc, grpc_tools'` fails: \
         install grpcio, grpcio-tools and protobuf (or set SIGIL_PYTHON)"
    );
    eprintln!(
        "SKIPPED front_door python grpcio test: `{python}` has no grpcio/grpcio-tools/protobuf \
         (pip install grpcio grpcio-tools protobuf, or set SIGIL_PYTHON; \
         SIGIL_REQUIRE_GRPCIO=1 makes this a failure)"
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_serves_python_grpcio() {
    let Some(python) = python() else { return };
    let generated = tempfile::tempdir().unwrap();
    let protos = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/proto");
    let out = std::process::Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I", protos])
        .arg(format!("--python_out={}", generated.path().display()))
        .arg(format!("--grpc_python_out={}", generated.path().display()))
        .arg("workload.proto")
        .output()
        .unwrap();
    assert!(out.status.success(), "protoc: {out:?}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/front_door_client.py");
    let run = |mode: &'static str, sock: PathBuf| {
        let python = python.clone();
        let generated = generated.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(python)
                .arg(script)
                .args([mode, &format!("unix:{}", sock.display()), "300", "32"])
                .env("PYTHONPATH", generated)
                .output()
                .unwrap()
        })
    };

    // Control: grpcio against a plain tonic server fails.
    let plain = serve_plain(Echo::default()).await;
    let out = run("expect-failure", plain.sock.clone()).await.unwrap();
    assert!(
        out.status.success(),
        "grpcio should fail against plain tonic: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    plain.stop().await;

    let echo = Echo::default();
    let server = serve(echo.clone(), ProcessTracking::Auto).await;
    let out = run("calls", server.sock.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let pid = u32::try_from(summary["pid"].as_u64().unwrap()).unwrap();
    let seen = echo.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 300 + 2 * 32);
    assert!(seen.iter().all(|c| c.pid() == Some(pid)));
    server.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Caller identity

/// Run by the tests below in a child process (this test binary, run again with `CHILD_ENV` set
/// to `MODE:SOCKET`); does nothing in a normal run.
#[test]
fn front_door_child_client() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mode, sock) = spec.split_once(':').unwrap();
    let sock = PathBuf::from(sock);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let mut client = SpiffeWorkloadApiClient::new(channel(&sock).await);
        match mode {
            "call" => {
                let response = client
                    .fetch_jwtsvid(with_header(JwtsvidRequest::default()))
                    .await
                    .unwrap();
                println!("TOKEN {}", response.into_inner().svids[0].svid);
            }
            "call-then-exit" => {
                // Send the request, then exit as soon as the parent closes our stdin, without
                // waiting for the answer.
                tokio::spawn(async move {
                    let _ = client
                        .fetch_jwtsvid(with_header(JwtsvidRequest::default()))
                        .await;
                });
                tokio::task::spawn_blocking(|| {
                    let mut line = String::new();
                    let _ = std::io::stdin().read_line(&mut line);
                })
                .await
                .unwrap();
                std::process::exit(0);
            }
            other => panic!("unknown child mode {other}"),
        }
    });
}

fn child(mode: &str, sock: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "front_door_child_client",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{mode}:{}", sock.display()))
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_reports_the_credentials_of_an_unprivileged_caller() {
    if !is_root() {
        eprintln!("SKIPPED: running a child as uid {NOBODY} needs root");
        return;
    }
    let echo = Echo::default();
    let server = serve(echo.clone(), ProcessTracking::Auto).await;
    let mode = std::fs::metadata(&server.sock)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o777, "every local user can connect");

    let child = child("call", &server.sock)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = format!("uid={NOBODY};gid={NOBODY};pid={pid}");
    assert!(stdout.contains(&format!("TOKEN {expected}")), "{stdout}");
    let seen = echo.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].uid(), seen[0].gid(), seen[0].pid()),
        (NOBODY, NOBODY, Some(pid))
    );
    server.stop().await;
}

async fn exited_caller_gets_no_identity(tracking: ProcessTracking) {
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (outcome_tx, mut outcome) = mpsc::unbounded_channel();
    let gate = Arc::new(Gate {
        arrived: arrived_tx,
        proceed: Semaphore::new(0),
        outcome: outcome_tx,
    });
    let echo = Echo {
        seen: Arc::default(),
        gate: Some(gate.clone()),
    };
    let server = serve(echo, tracking).await;

    let mut child = child("call-then-exit", &server.sock)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let caller = tokio::time::timeout(Duration::from_secs(30), arrived.recv())
        .await
        .expect("the child's request arrived")
        .unwrap();
    assert_eq!(caller.pid(), Some(pid));
    let expected_kind = match tracking {
        ProcessTracking::ProcFs => ProcessHandleKind::ProcFs,
        _ => ProcessHandleKind::Pidfd,
    };
    assert_eq!(caller.handle_kind(), expected_kind);
    // While the child runs, it is alive and the same process.
    assert!(caller.still_alive_and_same());

    // The child exits (and is reaped, freeing its pid) before "attestation" completes.
    drop(child.stdin.take());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    gate.proceed.add_permits(1);
    let alive = tokio::time::timeout(Duration::from_secs(30), outcome.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(!alive, "an exited caller is not given an identity");
    assert!(!caller.still_alive_and_same());

    // A live caller, through the same gate, is.
    let mut client = SpiffeWorkloadApiClient::new(channel(&server.sock).await);
    let call = tokio::spawn(async move {
        client
            .fetch_jwtsvid(with_header(JwtsvidRequest::default()))
            .await
    });
    arrived.recv().await.unwrap();
    gate.proceed.add_permits(1);
    assert!(outcome.recv().await.unwrap());
    assert_eq!(
        call.await.unwrap().unwrap().into_inner().svids[0].svid,
        me()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_gives_no_identity_to_a_caller_that_exited_pidfd() {
    exited_caller_gets_no_identity(ProcessTracking::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_gives_no_identity_to_a_caller_that_exited_procfs() {
    exited_caller_gets_no_identity(ProcessTracking::ProcFs).await;
}

// ------------------------------------------------------------------------------------------------
// The socket

#[tokio::test]
async fn front_door_listener_owns_its_socket_path() {
    let (_dir, sock) = socket_dir();

    // Creates the directory (0755) and a socket every local user can connect to.
    let listener = WorkloadListener::bind(&sock).unwrap();
    let dir_mode = std::fs::metadata(sock.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o755);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777);

    // A live socket is not taken over.
    assert!(matches!(
        WorkloadListener::bind(&sock),
        Err(ListenerError::InUse(_))
    ));

    // Dropping the listener removes its socket.
    drop(listener);
    assert!(!sock.exists());

    // A stale socket (nobody accepts on it) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let listener = WorkloadListener::bind(&sock).unwrap();
    let _client = UnixStream::connect(&sock).await.unwrap();
    drop(listener);

    // Anything else at the path is left alone.
    std::fs::write(&sock, b"not a socket").unwrap();
    assert!(matches!(
        WorkloadListener::bind(&sock),
        Err(ListenerError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");

    // TCP addresses are not for this listener.
    let tcp = sigil_core::EndpointAddress::parse("tcp://127.0.0.1:8081").unwrap();
    assert!(matches!(
        WorkloadListener::bind_endpoint(&tcp),
        Err(ListenerError::NotUnix(_))
    ));
}

#[test]
fn front_door_listener_needs_a_runtime() {
    let (_dir, sock) = socket_dir();
    assert!(matches!(
        WorkloadListener::bind(&sock),
        Err(ListenerError::NoRuntime)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_malformed_connection_does_not_affect_others() {
    let server = serve(Echo::default(), ProcessTracking::Auto).await;
    let mut good = SpiffeWorkloadApiClient::new(channel(&server.sock).await);
    good.fetch_jwtsvid(with_header(JwtsvidRequest::default()))
        .await
        .unwrap();

    // A client that sends an oversized header block is disconnected.
    let mut bad = UnixStream::connect(&server.sock).await.unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(raw_frame(0x4, 0, 0, &[]));
    bytes.extend(raw_frame(0x1, 0, 1, &[0; 16_000]));
    for _ in 0..5 {
        bytes.extend(raw_frame(0x9, 0, 1, &[0; 16_000]));
    }
    let _ = bad.write_all(&bytes).await;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), bad.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the bad connection is closed");

    // The good connection still works.
    let response = good
        .fetch_jwtsvid(with_header(JwtsvidRequest::default()))
        .await
        .unwrap();
    assert_eq!(response.into_inner().svids[0].svid, me());
    server.stop().await;
}
