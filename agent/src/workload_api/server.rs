//! The Workload API as a gRPC service: the generated `SpiffeWorkloadAPI` server, with
//! `FetchX509SVID` routed apart so that its messages go out as the agent encoded them once for
//! every stream that gets them (`WorkloadApi::x509_stream`), instead of each stream building
//! and encoding its own copy.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut as _, Bytes};
use sigil_proto::workload::X509svidRequest;
use sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

use super::service::{ResponseStream, WorkloadApi};

/// The path of `FetchX509SVID`.
const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";

/// The `SpiffeWorkloadAPI` service: every method as generated, but `FetchX509SVID`, whose
/// encoded messages are written as they are. Its settings are those of the generated server
/// with their defaults (no compression) but the request size limit, given to both: a setting
/// added to one must be added to the other.
#[derive(Clone)]
pub struct WorkloadApiServer {
    api: WorkloadApi,
    generated: SpiffeWorkloadApiServer<WorkloadApi>,
    max_request: usize,
}

impl WorkloadApiServer {
    /// Serves `api`, refusing requests larger than `max_request` bytes (every method).
    pub fn new(api: WorkloadApi, max_request: usize) -> Self {
        Self {
            generated: SpiffeWorkloadApiServer::new(api.clone())
                .max_decoding_message_size(max_request),
            api,
            max_request,
        }
    }
}

impl std::fmt::Debug for WorkloadApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApiServer")
            .field("max_request", &self.max_request)
            .finish_non_exhaustive()
    }
}

impl NamedService for WorkloadApiServer {
    const NAME: &'static str = <SpiffeWorkloadApiServer<WorkloadApi> as NamedService>::NAME;
}

impl tower::Service<http::Request<Body>> for WorkloadApiServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != FETCH_X509_SVID {
            return self.generated.call(request);
        }
        let method = FetchX509Svid(Arc::new(self.api.clone()));
        let max_request = self.max_request;
        Box::pin(async move {
            let mut grpc =
                Grpc::new(EncodedCodec).apply_max_message_size_config(Some(max_request), None);
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}

/// `FetchX509SVID` as a tonic server-streaming method of already encoded messages.
struct FetchX509Svid(Arc<WorkloadApi>);

impl ServerStreamingService<X509svidRequest> for FetchX509Svid {
    type Response = Bytes;
    type ResponseStream = ResponseStream<Bytes>;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Response<Self::ResponseStream>, Status>> + Send,
        >,
    >;

    fn call(&mut self, request: Request<X509svidRequest>) -> Self::Future {
        let api = Arc::clone(&self.0);
        Box::pin(async move { api.x509_stream(request).await })
    }
}

/// Decodes `X509SVIDRequest`s as the generated code does; encodes a message by writing its
/// bytes, which are already protobuf.
#[derive(Clone, Copy, Default)]
struct EncodedCodec;

impl Codec for EncodedCodec {
    type Encode = Bytes;
    type Decode = X509svidRequest;
    type Encoder = WriteEncoded;
    type Decoder = <ProstCodec<(), X509svidRequest> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        WriteEncoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<(), X509svidRequest>::default().decoder()
    }
}

/// Writes a message that is already protobuf.
#[derive(Clone, Copy, Default)]
struct WriteEncoded;

impl Encoder for WriteEncoded {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}
