//! The poller against a real HTTPS endpoint in this process (rustls and hyper on a loopback
//! socket), whose answer each case sets: good bundles, and the bad endpoints of the issue
//! (wrong SPIFFE ID, unknown CA, malformed JSON, oversized body, slow answer), each of which
//! must leave the last good bundle in place and say why in the relationship's status.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_core::{SpiffeBundle, SpiffeId, TrustDomain};

use super::*;
use crate::audit::AuditFilter;
use crate::service::bundles::{BundleError, BundleFormat};
use crate::service::testing::Fixture;

const OTHER: &str = "other.org";
const ENDPOINT_ID: &str = "spiffe://other.org/sigil/server";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

/// An X509-SVID for `id` signed by `ca`: the endpoint's certificate and key.
fn svid(ca: &Ca, id: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .subject_alt_names
        .push(SanType::URI(id.try_into().unwrap()));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn other() -> TrustDomain {
    TrustDomain::new(OTHER).unwrap()
}

/// The bundle of other.org with `cas` at `sequence`, as JSON.
fn bundle_json(cas: &[&Ca], sequence: u64) -> Vec<u8> {
    let mut bundle = SpiffeBundle::new(other());
    for ca in cas {
        bundle.add_x509_authority(ca.der.clone()).unwrap();
    }
    bundle.set_sequence(Some(sequence));
    bundle.to_json()
}

/// What the endpoint answers.
#[derive(Clone)]
enum Answer {
    Body(Vec<u8>),
    Slow(Duration),
    Redirect,
}

/// A bundle endpoint on a loopback port, answering what `answer` says.
struct Endpoint {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Endpoint {
    async fn start(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(Answer::Body(Vec::new())));
        let shared = answer.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let answer = shared.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |_request| {
                        let answer = answer.lock().unwrap().clone();
                        async move {
                            let mut response = hyper::Response::new(Full::new(Bytes::new()));
                            match answer {
                                Answer::Body(body) => {
                                    *response.body_mut() = Full::new(Bytes::from(body));
                                }
                                Answer::Slow(delay) => tokio::time::sleep(delay).await,
                                Answer::Redirect => {
                                    *response.status_mut() = hyper::StatusCode::FOUND;
                                    response.headers_mut().insert(
                                        hyper::header::LOCATION,
                                        "https://elsewhere.example/".parse().unwrap(),
                                    );
                                }
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, answer, task }
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn url(&self) -> String {
        format!("https://{}/", self.addr)
    }
}

fn spiffe_spec(url: &str, endpoint_id: &str, bootstrap: Option<&Ca>) -> RelationshipSpec {
    RelationshipSpec {
        trust_domain: other(),
        endpoint_url: url.to_owned(),
        profile: EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: SpiffeId::new(endpoint_id).unwrap(),
        },
        trust_bundle: bootstrap.map(|ca| (BundleFormat::Pem, pem_of(&ca.der))),
    }
}

/// A bundle of other.org without `spiffe_sequence`.
fn unnumbered(ca: &Ca) -> Vec<u8> {
    let mut bundle = SpiffeBundle::new(other());
    bundle.add_x509_authority(ca.der.clone()).unwrap();
    bundle.to_json()
}

fn pem_of(der: &CertificateDer<'_>) -> Vec<u8> {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem.into_bytes()
}

/// Polls everything (as if every relationship were due, an hour later than the last time)
/// and returns the relationship.
async fn poll(federation: &Arc<Federation>) -> RelationshipView {
    static HOURS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let hours = HOURS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    federation
        .poll_due_at(SystemTime::now() + Duration::from_secs(3600 * hours))
        .await;
    federation.get(&other()).await.unwrap()
}

fn sequence(view: &RelationshipView) -> Option<u64> {
    view.bundle.as_ref().and_then(SpiffeBundle::sequence)
}

fn last_error(view: &RelationshipView) -> String {
    view.relationship
        .status
        .last_error
        .clone()
        .unwrap_or_else(|| panic!("no error recorded: {:?}", view.relationship.status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoints_leave_the_last_good_bundle_and_say_why() {
    let fx = Fixture::new().await;
    let federation = Arc::new(
        Federation::new(
            fx.store.clone(),
            fx.audit.clone(),
            fx.authority.clone(),
            fx.federated.clone(),
            "default".to_owned(),
            Duration::from_secs(1),
        )
        .with_fetch_timeout(Duration::from_millis(500)),
    );
    let ca = new_ca("other CA");
    let (chain, key) = svid(&ca, ENDPOINT_ID);
    let endpoint = Endpoint::start(chain, key).await;
    federation
        .create(0, spiffe_spec(&endpoint.url(), ENDPOINT_ID, Some(&ca)))
        .await
        .unwrap();
    // The bootstrap bundle is handed out at once (it has no sequence).
    assert!(fx.federated.current().bundles.contains_key(&other()));

    // A good answer: stored, published, audited; F-10: the next fetch at the refresh hint,
    // no sooner than federation_min_poll and no later than 5 minutes.
    let mut good = SpiffeBundle::parse(other(), &bundle_json(&[&ca], 2)).unwrap();
    good.set_refresh_hint(Some(Duration::from_secs(7)));
    endpoint.answer(Answer::Body(good.to_json()));
    let view = poll(&federation).await;
    assert_eq!(sequence(&view), Some(2));
    let status = &view.relationship.status;
    assert_eq!(status.last_error, None);
    let (success, next) = (status.last_success.unwrap(), status.next_poll.unwrap());
    assert_eq!(
        next.duration_since(success).unwrap(),
        Duration::from_secs(7)
    );
    assert_eq!(
        fx.federated.current().bundles[&other()].bundle.sequence(),
        Some(2)
    );
    let updates = fx
        .audit_records(AuditFilter::default())
        .await
        .into_iter()
        .filter(|r| r.action == action::FEDERATION_BUNDLE_UPDATE)
        .count();
    assert_eq!(updates, 1);

    // F-11 and the bad endpoints: each is a failed fetch that keeps sequence 2.
    let cases: Vec<(Answer, &str)> = vec![
        (Answer::Body(b"{not json".to_vec()), "not a SPIFFE bundle"),
        (
            Answer::Body(vec![b' '; federation_client::MAX_BUNDLE_BYTES + 1]),
            "larger than",
        ),
        (
            Answer::Slow(Duration::from_secs(3)),
            "no complete answer within",
        ),
        (
            Answer::Body(bundle_json(&[&ca], 1)),
            "older than the stored",
        ),
        (Answer::Body(br#"{"keys":[]}"#.to_vec()), "without any key"),
        (Answer::Body(unnumbered(&ca)), "no spiffe_sequence"),
        // F-9: a redirect is not followed; the error names where it points.
        (Answer::Redirect, "https://elsewhere.example/"),
    ];
    for (n, (answer, why)) in cases.into_iter().enumerate() {
        endpoint.answer(answer);
        let view = poll(&federation).await;
        let error = last_error(&view);
        assert!(error.contains(why), "case {n}: {error}");
        assert_eq!(sequence(&view), Some(2), "case {n}");
        assert_eq!(view.relationship.status.failures, n as u32 + 1);
        assert_eq!(
            fx.federated.current().bundles[&other()].bundle.sequence(),
            Some(2)
        );
    }
    // Backoff after failures: doubling from federation_min_poll.
    let status = federation.get(&other()).await.unwrap().relationship.status;
    let wait = status
        .next_poll
        .unwrap()
        .duration_since(status.last_attempt.unwrap())
        .unwrap();
    assert_eq!(wait, Duration::from_secs(64));
    assert_eq!(
        federation.poll_due_at(SystemTime::now()).await,
        0,
        "not due yet"
    );

    // F-8: an endpoint whose SVID has another ID than the configured one.
    endpoint.answer(Answer::Body(bundle_json(&[&ca], 3)));
    federation
        .update(
            0,
            spiffe_spec(&endpoint.url(), "spiffe://other.org/elsewhere", None),
        )
        .await
        .unwrap();
    let view = poll(&federation).await;
    assert!(
        last_error(&view).contains("TLS handshake failed"),
        "{}",
        last_error(&view)
    );
    assert_eq!(sequence(&view), Some(2));
    // An endpoint whose certificate chains to a CA not in the trust domain's bundle.
    let stranger = new_ca("unknown CA");
    let (chain, key) = svid(&stranger, ENDPOINT_ID);
    let impostor = Endpoint::start(chain, key).await;
    impostor.answer(Answer::Body(bundle_json(&[&stranger], 9)));
    federation
        .update(0, spiffe_spec(&impostor.url(), ENDPOINT_ID, None))
        .await
        .unwrap();
    let view = poll(&federation).await;
    assert!(
        last_error(&view).contains("TLS handshake failed"),
        "{}",
        last_error(&view)
    );
    assert_eq!(sequence(&view), Some(2));

    // Rotation: a bundle with the next CA is fetched; an endpoint whose SVID the next CA
    // signed is then authenticated with it (the latest bundle, not the bootstrap one).
    let next = new_ca("other CA 2");
    endpoint.answer(Answer::Body(bundle_json(&[&ca, &next], 4)));
    federation
        .update(0, spiffe_spec(&endpoint.url(), ENDPOINT_ID, None))
        .await
        .unwrap();
    assert_eq!(sequence(&poll(&federation).await), Some(4));
    let (chain, key) = svid(&next, ENDPOINT_ID);
    let rotated = Endpoint::start(chain, key).await;
    rotated.answer(Answer::Body(bundle_json(&[&next], 5)));
    federation
        .update(0, spiffe_spec(&rotated.url(), ENDPOINT_ID, None))
        .await
        .unwrap();
    let view = poll(&federation).await;
    assert_eq!(view.relationship.status.last_error, None);
    assert_eq!(sequence(&view), Some(5));

    // While the relationship keeps the bundle, `bundle set` cannot replace it behind the
    // poller's back (the relationship's --trust-bundle can).
    match fx
        .bundles
        .set_federated(0, &other(), BundleFormat::Pem, &pem_of(&stranger.der))
        .await
    {
        Err(BundleError::Invalid(message)) => {
            assert!(message.contains("federation update"), "{message}");
        }
        other => panic!("bundle set was not refused: {other:?}"),
    }
    // F-13: the bundle cannot be deleted on its own; deleting the relationship deletes it,
    // and it leaves the published set at once.
    assert!(matches!(
        fx.bundles.delete_federated(0, &other()).await,
        Err(BundleError::Store(StoreError::InUse { .. }))
    ));
    federation.delete(0, &other()).await.unwrap();
    assert!(fx.federated.current().bundles.is_empty());
    assert_eq!(fx.store.get_federated_bundle(&other()).await.unwrap(), None);
    let actions = fx.audit_actions(AuditFilter::default()).await;
    for wanted in [
        action::FEDERATION_CREATE,
        action::FEDERATION_UPDATE,
        action::FEDERATION_DELETE,
    ] {
        assert!(actions.iter().any(|a| a == wanted), "{actions:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f5_f6_f8_relationships_are_checked_before_they_are_stored() {
    let fx = Fixture::new().await;
    let ca = new_ca("other CA");
    let refuse = |spec: RelationshipSpec, why: &'static str| {
        let federation = &fx.federation;
        async move {
            match federation.create(0, spec).await {
                Err(FederationError::Invalid(message)) => {
                    assert!(message.contains(why), "{message}");
                }
                other => panic!("expected a refusal ({why}): {other:?}"),
            }
        }
    };
    // The own trust domain, a non-https URL, userinfo.
    let mut own = spiffe_spec("https://h/", "spiffe://example.org/sigil/server", None);
    own.trust_domain = TrustDomain::new("example.org").unwrap();
    refuse(own, "own trust domain").await;
    refuse(
        spiffe_spec("http://h/", ENDPOINT_ID, Some(&ca)),
        "must be https",
    )
    .await;
    refuse(
        spiffe_spec("https://u:p@h/", ENDPOINT_ID, Some(&ca)),
        "userinfo",
    )
    .await;
    // F-8: a self-serving https_spiffe endpoint needs a bootstrap bundle; so does one in a
    // third trust domain nobody has a bundle of.
    refuse(
        spiffe_spec("https://h/", ENDPOINT_ID, None),
        "--trust-bundle",
    )
    .await;
    refuse(
        spiffe_spec("https://h/", "spiffe://third.example/server", Some(&ca)),
        "bundle of third.example",
    )
    .await;
    let mut garbage = spiffe_spec("https://h/", ENDPOINT_ID, None);
    garbage.trust_bundle = Some((BundleFormat::Spiffe, b"{".to_vec()));
    refuse(garbage, "trust bundle").await;
    assert!(fx.federation.list().await.unwrap().is_empty());
    // An endpoint served in this trust domain needs no bootstrap bundle; https_web neither.
    fx.federation
        .create(
            0,
            spiffe_spec("https://h/", "spiffe://example.org/sigil/server", None),
        )
        .await
        .unwrap();
    let mut web = spiffe_spec("https://bundle.third.example/", ENDPOINT_ID, None);
    web.trust_domain = TrustDomain::new("third.example").unwrap();
    web.profile = EndpointProfile::HttpsWeb;
    fx.federation.create(0, web.clone()).await.unwrap();
    assert!(matches!(
        fx.federation.create(0, web).await,
        Err(FederationError::Store(StoreError::AlreadyExists { .. }))
    ));
    let listed = fx.federation.list().await.unwrap();
    assert_eq!(listed.len(), 2);
}
