//! The generated Workload API matches the SPIFFE standard on the wire: the exact gRPC paths
//! (no `package` line), every message field by name, number and type, and a real round trip over
//! a Unix socket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prost_types::field_descriptor_proto::{Label, Type};
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::*;
use tonic::codegen::http;
use tonic::{Request, Response, Status};

/// Records the path of every request the generated client sends, and fails it.
#[tokio::test]
async fn the_client_calls_the_spec_paths_with_no_package_prefix() {
    let paths = Arc::new(Mutex::new(Vec::new()));
    let recorder = {
        let paths = paths.clone();
        tower::service_fn(move |req: http::Request<tonic::body::Body>| {
            paths.lock().unwrap().push(req.uri().path().to_owned());
            async { Err::<http::Response<tonic::body::Body>, _>(std::io::Error::other("recorded")) }
        })
    };
    let mut client = SpiffeWorkloadApiClient::new(recorder);
    assert!(client.fetch_x509svid(X509svidRequest {}).await.is_err());
    assert!(
        client
            .fetch_x509_bundles(X509BundlesRequest {})
            .await
            .is_err()
    );
    assert!(
        client
            .fetch_jwtsvid(JwtsvidRequest::default())
            .await
            .is_err()
    );
    assert!(
        client
            .fetch_jwt_bundles(JwtBundlesRequest {})
            .await
            .is_err()
    );
    assert!(
        client
            .validate_jwtsvid(ValidateJwtsvidRequest::default())
            .await
            .is_err()
    );
    assert!(
        client
            .fetch_witsvid(WitsvidRequest::default())
            .await
            .is_err()
    );
    assert!(
        client
            .fetch_wit_bundles(WitBundlesRequest {})
            .await
            .is_err()
    );
    assert_eq!(
        *paths.lock().unwrap(),
        [
            "/SpiffeWorkloadAPI/FetchX509SVID",
            "/SpiffeWorkloadAPI/FetchX509Bundles",
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            "/SpiffeWorkloadAPI/FetchJWTBundles",
            "/SpiffeWorkloadAPI/ValidateJWTSVID",
            "/SpiffeWorkloadAPI/FetchWITSVID",
            "/SpiffeWorkloadAPI/FetchWITBundles",
        ]
    );
}

/// A server that answers FetchX509SVID with one fixed message and nothing else.
struct OneSvid;

type Stream<T> = tokio_stream::Iter<std::vec::IntoIter<Result<T, Status>>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for OneSvid {
    type FetchX509SVIDStream = Stream<X509svidResponse>;
    type FetchX509BundlesStream = Stream<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;
    type FetchWITSVIDStream = Stream<WitsvidResponse>;
    type FetchWITBundlesStream = Stream<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let msg = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://example.org/web".into(),
                x509_svid: vec![1, 2, 3],
                x509_svid_key: vec![4, 5],
                bundle: vec![6],
                hint: "internal".into(),
            }],
            crl: vec![],
            federated_bundles: [("spiffe://other.org".to_owned(), vec![7u8])].into(),
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
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("test"))
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
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }
    async fn fetch_wit_bundles(
        &self,
        _: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }
}

#[tokio::test]
async fn round_trip_over_a_unix_socket_at_the_spec_path() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(OneSvid))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );

    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await
        .unwrap();

    // Call the method by its literal path, not through the generated client, so the test pins
    // the path the server routes.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(
            Request::new(X509svidRequest {}),
            http::uri::PathAndQuery::from_static("/SpiffeWorkloadAPI/FetchX509SVID"),
            tonic_prost::ProstCodec::<X509svidRequest, X509svidResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    assert_eq!(msg.svids.len(), 1);
    assert_eq!(msg.svids[0].spiffe_id, "spiffe://example.org/web");
    assert_eq!(msg.svids[0].hint, "internal");
    assert_eq!(msg.federated_bundles["spiffe://other.org"], vec![7u8]);
    assert!(stream.message().await.unwrap().is_none());

    // The WIT profile is optional; unsupported means Unimplemented (WA-17).
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let err = client
        .fetch_witsvid(WitsvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A message's expected fields: (name, number, type, repeated).
type Fields = &'static [(&'static str, i32, Type, bool)];

/// Every message of spec section 6.3: field name -> (number, type, repeated).
#[test]
fn messages_match_the_spec_field_for_field() {
    use Type::*;
    const MAP: Type = Message; // a map field is a repeated message (its entry type)
    let spec: &[(&str, Fields)] = &[
        ("X509SVIDRequest", &[]),
        (
            "X509SVIDResponse",
            &[
                ("svids", 1, Message, true),
                ("crl", 2, Bytes, true),
                ("federated_bundles", 3, MAP, true),
            ],
        ),
        (
            "X509SVID",
            &[
                ("spiffe_id", 1, String, false),
                ("x509_svid", 2, Bytes, false),
                ("x509_svid_key", 3, Bytes, false),
                ("bundle", 4, Bytes, false),
                ("hint", 5, String, false),
            ],
        ),
        ("X509BundlesRequest", &[]),
        (
            "X509BundlesResponse",
            &[("crl", 1, Bytes, true), ("bundles", 2, MAP, true)],
        ),
        (
            "JWTSVIDRequest",
            &[
                ("audience", 1, String, true),
                ("spiffe_id", 2, String, false),
            ],
        ),
        ("JWTSVIDResponse", &[("svids", 1, Message, true)]),
        (
            "JWTSVID",
            &[
                ("spiffe_id", 1, String, false),
                ("svid", 2, String, false),
                ("hint", 3, String, false),
            ],
        ),
        ("JWTBundlesRequest", &[]),
        ("JWTBundlesResponse", &[("bundles", 1, MAP, true)]),
        (
            "ValidateJWTSVIDRequest",
            &[("audience", 1, String, false), ("svid", 2, String, false)],
        ),
        (
            "ValidateJWTSVIDResponse",
            &[
                ("spiffe_id", 1, String, false),
                ("claims", 2, Message, false),
            ],
        ),
        ("WITSVIDRequest", &[("spiffe_id", 1, String, false)]),
        ("WITSVIDResponse", &[("svids", 1, Message, true)]),
        (
            "WITSVID",
            &[
                ("spiffe_id", 1, String, false),
                ("wit_svid", 2, String, false),
                ("wit_svid_key", 3, String, false),
                ("hint", 4, String, false),
            ],
        ),
        ("WITBundlesRequest", &[]),
        ("WITBundlesResponse", &[("bundles", 1, MAP, true)]),
    ];

    let fds = protox::compile(
        ["workload.proto"],
        [concat!(env!("CARGO_MANIFEST_DIR"), "/proto")],
    )
    .unwrap();
    let file = fds
        .file
        .iter()
        .find(|f| f.name() == "workload.proto")
        .unwrap();
    assert_eq!(
        file.package, None,
        "workload.proto must have no package line"
    );
    assert_eq!(file.syntax(), "proto3");
    assert_eq!(file.dependency, ["google/protobuf/struct.proto"]);

    let found: BTreeMap<&str, _> = file.message_type.iter().map(|m| (m.name(), m)).collect();
    assert_eq!(
        found.len(),
        spec.len(),
        "no message more or fewer than the spec's"
    );
    for (name, fields) in spec {
        let msg = found
            .get(name)
            .unwrap_or_else(|| panic!("message {name} missing"));
        assert_eq!(msg.field.len(), fields.len(), "{name}: field count");
        for (field, number, ty, repeated) in *fields {
            let f = msg
                .field
                .iter()
                .find(|f| f.name() == *field)
                .unwrap_or_else(|| panic!("{name}.{field} missing"));
            assert_eq!(f.number(), *number, "{name}.{field} number");
            assert_eq!(f.r#type(), *ty, "{name}.{field} type");
            assert_eq!(
                f.label() == Label::Repeated,
                *repeated,
                "{name}.{field} repeated"
            );
        }
    }
    // The maps' key and value types.
    let map_types = |msg: &str, field: &str| {
        let entry = found[msg]
            .nested_type
            .iter()
            .find(|n| {
                n.name()
                    .eq_ignore_ascii_case(&format!("{}Entry", field.replace('_', "")))
            })
            .unwrap_or_else(|| panic!("{msg}.{field} is not a map"));
        (entry.field[0].r#type(), entry.field[1].r#type())
    };
    assert_eq!(
        map_types("X509SVIDResponse", "federated_bundles"),
        (String, Bytes)
    );
    assert_eq!(map_types("X509BundlesResponse", "bundles"), (String, Bytes));
    assert_eq!(map_types("JWTBundlesResponse", "bundles"), (String, Bytes));
    assert_eq!(map_types("WITBundlesResponse", "bundles"), (String, String));
    let claims = found["ValidateJWTSVIDResponse"]
        .field
        .iter()
        .find(|f| f.name() == "claims")
        .unwrap();
    assert_eq!(claims.type_name(), ".google.protobuf.Struct");

    let service = &file.service[0];
    assert_eq!(service.name(), "SpiffeWorkloadAPI");
    let methods: Vec<_> = service
        .method
        .iter()
        .map(|m| (m.name(), m.server_streaming(), m.client_streaming()))
        .collect();
    assert_eq!(
        methods,
        [
            ("FetchX509SVID", true, false),
            ("FetchX509Bundles", true, false),
            ("FetchJWTSVID", false, false),
            ("FetchJWTBundles", true, false),
            ("ValidateJWTSVID", false, false),
            ("FetchWITSVID", true, false),
            ("FetchWITBundles", true, false),
        ]
    );
}
