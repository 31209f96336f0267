//! What the Workload API front door costs.
//!
//! - `layer/*`: bytes per second through the `:authority` layer ([`NormalizeAuthority`] reading
//!   from memory, 64 KiB reads), against plain reads of the same bytes: DATA frames only (the
//!   pass-through path), gRPC request header blocks with a valid `:authority` (decoded, forwarded
//!   as received) and with a C-core style `:authority` (decoded and re-encoded), and a unary
//!   call's frames (HEADERS + small DATA).
//! - `unary/*`: the latency of one unary Workload API call from a tonic client over a Unix socket,
//!   to a plain tonic listener and to the front door, in the same run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    missing_docs,
    reason = "bench code"
)]

use std::hint::black_box;
use std::io;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group};
use sigil_agent::workload_api::{CallerProcess, NormalizeAuthority, WorkloadListener};
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::*;
use tokio::io::AsyncReadExt;
use tonic::codegen::http;
use tonic::{Request, Response, Status};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(frame_type: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], frame_type, flags];
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A connection of `count` gRPC requests, encoded as a client HPACK encoder would (indexing, so
/// later requests are a few bytes each); each followed by `data` bytes of DATA.
fn requests(authority: &str, count: u32, data: usize) -> Vec<u8> {
    let mut encoder = httlib_hpack::Encoder::with_dynamic_size(4096);
    // Huffman-coded, as h2 and gRPC C-core encode.
    let indexed = httlib_hpack::Encoder::WITH_INDEXING
        | httlib_hpack::Encoder::BEST_FORMAT
        | httlib_hpack::Encoder::HUFFMAN_NAME
        | httlib_hpack::Encoder::HUFFMAN_VALUE;
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    for i in 0..count {
        let mut block = Vec::new();
        // h2 and C-core send :path as a literal on every request.
        let literal = httlib_hpack::Encoder::BEST_FORMAT | httlib_hpack::Encoder::HUFFMAN_VALUE;
        for (name, value, flags) in [
            (":method", "POST", indexed),
            (":scheme", "http", indexed),
            (":path", "/SpiffeWorkloadAPI/FetchJWTSVID", literal),
            (":authority", authority, indexed),
            ("te", "trailers", indexed),
            ("content-type", "application/grpc", indexed),
            (
                "user-agent",
                "grpc-python/1.85.3 grpc-c/51.0.0 (linux; chttp2)",
                indexed,
            ),
            ("grpc-accept-encoding", "identity,deflate,gzip", indexed),
            ("workload.spiffe.io", "true", indexed),
        ] {
            encoder
                .encode(
                    (name.as_bytes().to_vec(), value.as_bytes().to_vec(), flags),
                    &mut block,
                )
                .unwrap();
        }
        out.extend(frame(0x1, 0x4, 2 * i + 1, &block));
        if data > 0 {
            out.extend(frame(0x0, 0x1, 2 * i + 1, &vec![0; data]));
        }
    }
    out
}

fn data_frames(count: usize) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    for _ in 0..count {
        out.extend(frame(0x0, 0, 1, &[7; 16_384]));
    }
    out
}

async fn read_all(mut reader: impl tokio::io::AsyncRead + Unpin, buf: &mut [u8]) -> usize {
    let mut total = 0;
    loop {
        let n = reader.read(buf).await.unwrap();
        if n == 0 {
            return total;
        }
        total += n;
    }
}

fn layer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut buf = vec![0; 65_536];
    let inputs = [
        ("data_16k_frames", data_frames(256)),
        ("headers_valid_authority", requests("localhost", 2000, 0)),
        (
            "headers_c_core_authority",
            requests("tmp%2Fsigil-agent%2Fpublic%2Fapi.sock", 2000, 0),
        ),
        (
            "unary_calls_c_core_authority",
            requests("tmp%2Fsigil-agent%2Fpublic%2Fapi.sock", 2000, 64),
        ),
    ];
    let mut group = c.benchmark_group("layer");
    for (name, input) in &inputs {
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_function(format!("{name}/plain"), |b| {
            b.iter(|| runtime.block_on(read_all(black_box(&input[..]), &mut buf)));
        });
        group.bench_function(format!("{name}/through_layer"), |b| {
            b.iter(|| {
                runtime.block_on(read_all(
                    NormalizeAuthority::new(black_box(&input[..])),
                    &mut buf,
                ))
            });
        });
    }
    group.finish();
}

#[derive(Debug)]
struct Echo;

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
        _: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        // The front door's caller, or the plain listener's peer credentials.
        let pid = match request.extensions().get::<CallerProcess>() {
            Some(caller) => caller.pid().unwrap_or(0),
            None => request
                .extensions()
                .get::<tonic::transport::server::UdsConnectInfo>()
                .and_then(|info| info.peer_cred)
                .and_then(|cred| cred.pid())
                .and_then(|pid| u32::try_from(pid).ok())
                .unwrap_or(0),
        };
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: "spiffe://example.org/bench".into(),
                svid: format!("pid={pid}"),
                hint: String::new(),
            }],
        }))
    }
    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn fetch_witsvid(
        &self,
        _: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn fetch_wit_bundles(
        &self,
        _: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("bench"))
    }
}

async fn client(sock: std::path::PathBuf) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await
        .unwrap();
    SpiffeWorkloadApiClient::new(channel)
}

fn unary(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plain_sock = dir.path().join("plain.sock");
    let front_sock = dir.path().join("front-door.sock");
    let (mut plain, mut front) = runtime.block_on(async {
        let plain_listener = tokio::net::UnixListener::bind(&plain_sock).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(Echo))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(
                    plain_listener,
                )),
        );
        let front_listener = WorkloadListener::bind(&front_sock).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(Echo))
                .serve_with_incoming(front_listener),
        );
        (
            client(plain_sock.clone()).await,
            client(front_sock.clone()).await,
        )
    });
    let mut group = c.benchmark_group("unary");
    group.measurement_time(Duration::from_secs(8));
    for (name, client) in [
        ("plain_unix_stream", &mut plain),
        ("front_door", &mut front),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let mut request = Request::new(JwtsvidRequest::default());
                    request
                        .metadata_mut()
                        .insert("workload.spiffe.io", "true".parse().unwrap());
                    client.fetch_jwtsvid(request).await.unwrap()
                })
            });
        });
    }
    group.finish();
}

/// Paired measurement, less sensitive to a busy machine than two separate criterion runs:
/// alternates one call to the plain listener and one to the front door, and prints the medians.
fn paired_unary() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plain_sock = dir.path().join("plain.sock");
    let front_sock = dir.path().join("front-door.sock");
    runtime.block_on(async {
        let plain_listener = tokio::net::UnixListener::bind(&plain_sock).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(Echo))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(
                    plain_listener,
                )),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(Echo))
                .serve_with_incoming(WorkloadListener::bind(&front_sock).unwrap()),
        );
        let layer_sock = plain_sock.with_file_name("layer-only.sock");
        let layer_listener = tokio::net::UnixListener::bind(&layer_sock).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(Echo))
                .serve_with_incoming(tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::UnixListenerStream::new(layer_listener),
                    |s| s.map(NormalizeAuthority::new),
                )),
        );
        let mut clients = [
            client(plain_sock).await,
            client(front_sock).await,
            client(layer_sock).await,
        ];
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        for i in 0..60_000 {
            let which = i % 3;
            let mut request = Request::new(JwtsvidRequest::default());
            request
                .metadata_mut()
                .insert("workload.spiffe.io", "true".parse().unwrap());
            let start = std::time::Instant::now();
            black_box(clients[which].fetch_jwtsvid(request).await.unwrap());
            if i >= 2000 {
                times[which].push(start.elapsed());
            }
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let plain = median(&mut times[0]);
        let front = median(&mut times[1]);
        let layer_only = median(&mut times[2]);
        eprintln!(
            "paired unary latency (current-thread runtime, {} alternating calls each, medians): \
             plain {plain:?}, front door {front:?}, :authority layer only {layer_only:?}",
            times[0].len(),
        );
    });
}

criterion_group!(benches, layer, unary);

fn main() {
    benches();
    paired_unary();
    Criterion::default().configure_from_args().final_summary();
}
