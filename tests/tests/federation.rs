//! Federation end to end (spec section 7) with the real binaries: two trust domains, each a
//! server and an agent; bundle endpoints in both profiles; relationships through the CLI;
//! workloads that get each other's bundles, call each other with the mTLS examples, and
//! validate each other's JWT-SVIDs; a CA rotation that crosses the trust domains before it
//! activates; a relationship deleted and its bundle gone from the workloads.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sigil_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest,
    X509BundlesResponse,
};
use sigil_tests::*;

const PAY_TD: &str = "example.org";
const LEDGER_TD: &str = "ledger.example";
const PAY: &str = "spiffe://example.org/pay";
const LEDGER: &str = "spiffe://ledger.example/ledger";

/// Every server here serves its bundle endpoint and polls often.
const FEDERATING: &str = "bundle_endpoint_address = \"127.0.0.1:0\"\nfederation_min_poll = \"1s\"\nbundle_endpoint_refresh_hint = \"1s\"\n";

fn show(server: &TestServer, td: &str) -> serde_json::Value {
    let run = server_cli(
        server,
        &["federation", "show", "--id", td, "--output", "json"],
    );
    assert!(run.status.success(), "{}{}", run.stdout, run.stderr);
    run.json()
}

/// `federation show` until `done` holds (20 s at most).
fn show_until(
    server: &TestServer,
    td: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let shown = show(server, td);
        if done(&shown) {
            return shown;
        }
        assert!(
            Instant::now() < deadline,
            "federation show never got there: {shown}\nlog:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fetched(shown: &serde_json::Value) -> bool {
    shown["last_success"].is_string() && shown["last_error"].is_null()
}

/// The next X.509 bundles message on `stream` for which `wanted` holds (30 s at most).
async fn bundles_until(
    stream: &mut tonic::Streaming<X509BundlesResponse>,
    wanted: impl Fn(&X509BundlesResponse) -> bool,
) -> X509BundlesResponse {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let message = stream.message().await.unwrap().unwrap();
            if wanted(&message) {
                return message;
            }
        }
    })
    .await
    .expect("no such bundles message within 30 s")
}

fn authorities(message: &X509BundlesResponse, td: &str) -> usize {
    message
        .bundles
        .get(&format!("spiffe://{td}"))
        .map_or(0, |der| {
            sigil_core::X509Bundle::from_der(sigil_core::TrustDomain::new(td).unwrap(), der)
                .unwrap()
                .authorities()
                .len()
        })
}

/// An entry for the test process's uid under `agent` granting `id`, federating with `td`;
/// returns its id.
fn workload_entry(server: &TestServer, agent: &TestAgentProcess, id: &str, td: &str) -> String {
    let run = server_cli(
        server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--parent-id",
            &agent.agent_id(),
            "--selector",
            &format!("unix:uid:{}", my_uid()),
            "--federates-with",
            td,
            "--output",
            "json",
        ],
    );
    assert!(run.status.success(), "{}{}", run.stdout, run.stderr);
    assert_eq!(run.json()["federates_with"], serde_json::json!([td]));
    run.json()["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn two_trust_domains_federate_both_ways_over_https_spiffe() {
    let dir = tempfile::tempdir().unwrap();
    let pay = TestServer::start_in(PAY_TD, FEDERATING, &[]);
    let ledger = TestServer::start_in(LEDGER_TD, FEDERATING, &[]);

    // F-1, F-2: the endpoint answers GET / with the bundle, no client certificate asked.
    let served = fetch_endpoint(&pay).await;
    assert_eq!(served["spiffe_refresh_hint"], 1);
    assert!(served["spiffe_sequence"].as_u64().unwrap() >= 1);
    assert_eq!(served["keys"].as_array().unwrap().len(), 2, "{served}");

    // F-8: a wrong endpoint ID is a failed fetch that says why, in `federation show` and the
    // log; nothing is stored beyond the bootstrap bundle.
    let wrong = federate(
        &pay,
        &ledger,
        "spiffe://ledger.example/not-the-server",
        dir.path(),
    )
    .await;
    assert!(wrong.status.success(), "{}{}", wrong.stdout, wrong.stderr);
    let shown = show_until(&pay, LEDGER_TD, |s| s["last_error"].is_string());
    let error = shown["last_error"].as_str().unwrap();
    assert!(error.contains("TLS handshake failed"), "{error}");
    assert!(
        pay.log_text().contains("cannot fetch the federated bundle"),
        "{}",
        pay.log_text()
    );
    // Updated to the server's ID, it is fetched at once and succeeds.
    let updated = server_cli(
        &pay,
        &[
            "federation",
            "update",
            "--id",
            LEDGER_TD,
            "--endpoint-spiffe-id",
            "spiffe://ledger.example/sigil/server",
        ],
    );
    assert!(
        updated.status.success(),
        "{}{}",
        updated.stdout,
        updated.stderr
    );
    let shown = show_until(&pay, LEDGER_TD, fetched);
    assert_eq!(shown["profile"], "https_spiffe");
    assert_eq!(shown["x509_authorities"], 1);
    // F-14: every fetch is logged, the good ones too.
    assert!(
        pay.log_text().contains("federated bundle fetched"),
        "{}",
        pay.log_text()
    );
    // The text forms, for people.
    let listed = server_cli(&pay, &["federation", "list"]);
    assert!(
        listed
            .stdout
            .contains("Endpoint ID  : spiffe://ledger.example/sigil/server")
            && listed.stdout.ends_with("Found 1 federation relationship\n"),
        "{}",
        listed.stdout
    );
    let shown = server_cli(
        &pay,
        &["federation", "show", "--id", "spiffe://ledger.example"],
    );
    assert!(
        shown.stdout.contains("Bundle       : sequence"),
        "{}",
        shown.stdout
    );
    let back = federate(
        &ledger,
        &pay,
        "spiffe://example.org/sigil/server",
        dir.path(),
    )
    .await;
    assert!(back.status.success(), "{}{}", back.stdout, back.stderr);
    show_until(&ledger, PAY_TD, fetched);
    // F-13: `bundle delete` is refused while a relationship keeps the bundle.
    let refused = server_cli(&pay, &["bundle", "delete", "--id", LEDGER_TD]);
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("federation delete"),
        "{}",
        refused.stderr
    );
    // Every change of a federated bundle is audited.
    let audit = server_cli(&pay, &["audit", "show", "--output", "json"]);
    let actions: Vec<String> = audit
        .json_lines()
        .iter()
        .map(|r| r["action"].as_str().unwrap_or_default().to_owned())
        .collect();
    for action in ["federation.create", "federation.update"] {
        assert!(actions.iter().any(|a| a == action), "{actions:?}");
    }

    // Workloads: each entry federates with the other trust domain.
    let pay_agent = TestAgentProcess::start(&pay).await;
    let ledger_agent = TestAgentProcess::start(&ledger).await;
    workload_entry(&pay, &pay_agent, PAY, LEDGER_TD);
    let ledger_entry = workload_entry(&ledger, &ledger_agent, LEDGER, PAY_TD);
    let (_stream, svids) = x509_stream_with(&pay_agent, |m| {
        svid_ids(m) == [PAY] && m.federated_bundles.contains_key("spiffe://ledger.example")
    })
    .await;
    assert_eq!(svids.federated_bundles.len(), 1);
    let (_stream, _) = x509_stream_with(&ledger_agent, |m| {
        svid_ids(m) == [LEDGER] && m.federated_bundles.contains_key("spiffe://example.org")
    })
    .await;

    // Both bundles, X.509 and JWT, through the Workload API.
    let mut pay_client = pay_agent.client().await;
    let mut bundles = pay_client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = bundles_until(&mut bundles, |m| m.bundles.len() == 2).await;
    assert_eq!(authorities(&first, PAY_TD), 1);
    assert_eq!(authorities(&first, LEDGER_TD), 1);
    let jwt_bundles = pay_client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let mut keys: Vec<_> = jwt_bundles.bundles.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["spiffe://example.org", "spiffe://ledger.example"]);

    // py-spiffe sees both trust domains' bundles.
    if let Some(python) = python_with("spiffe", "SIGIL_REQUIRE_GRPCIO", "spiffe") {
        let address = format!("unix:{}", pay_agent.socket().display());
        let script = format!(
            r#"
from spiffe import WorkloadApiClient
client = WorkloadApiClient("{address}")
bundles = client.fetch_x509_bundles()
print(" ".join(sorted(str(b.trust_domain) for b in bundles.bundles)))
"#
        );
        let out = Command::new(&python)
            .args(["-c", &script])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "py-spiffe: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), "example.org ledger.example");
    }

    // A JWT-SVID of one trust domain validates in the other.
    let token = pay_client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["ledger".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    let validated = ledger_agent
        .client()
        .await
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "ledger".into(),
            svid: token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(validated.spiffe_id, PAY);

    // The mTLS examples: the ledger serves the payments workload, across trust domains.
    let (_server, addr) = mtls_server(
        &ledger_agent.socket(),
        &["--svid", LEDGER, "--allow-id", PAY],
    );
    let client = Command::new(binary("mtls-client"))
        .arg("--socket-path")
        .arg(pay_agent.socket())
        .args(["--connect", &addr, "--svid", PAY, "--allow-id", LEDGER])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&client.stdout);
    assert!(
        client.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&client.stderr)
    );
    assert!(stdout.contains(&format!("hello {PAY}")), "{stdout}");
    // Only when told to: a client allowing its own trust domain only refuses the ledger.
    let refused = Command::new(binary("mtls-client"))
        .arg("--socket-path")
        .arg(pay_agent.socket())
        .args([
            "--connect",
            &addr,
            "--svid",
            PAY,
            "--allow-trust-domain",
            PAY_TD,
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());

    // An entry that stops federating takes the bundle from its workloads with it.
    let mut ledger_bundles = ledger_agent
        .client()
        .await
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    bundles_until(&mut ledger_bundles, |m| m.bundles.len() == 2).await;
    let updated = server_cli(
        &ledger,
        &[
            "entry",
            "update",
            "--id",
            &ledger_entry,
            "--federates-with",
            "none",
        ],
    );
    assert!(
        updated.status.success(),
        "{}{}",
        updated.stdout,
        updated.stderr
    );
    let after = bundles_until(&mut ledger_bundles, |m| m.bundles.len() == 1).await;
    assert_eq!(authorities(&after, LEDGER_TD), 1);

    // F-13: deleting the relationship removes the bundle from the workloads.
    let deleted = server_cli(&pay, &["federation", "delete", "--id", LEDGER_TD]);
    assert!(
        deleted.status.success(),
        "{}{}",
        deleted.stdout,
        deleted.stderr
    );
    let after = bundles_until(&mut bundles, |m| m.bundles.len() == 1).await;
    assert_eq!(authorities(&after, PAY_TD), 1);
    let gone = server_cli(&pay, &["federation", "show", "--id", LEDGER_TD]);
    assert!(!gone.status.success());
    assert!(
        gone.stderr.contains("federation relationship not found"),
        "{}",
        gone.stderr
    );
    let none = server_cli(&pay, &["federation", "list"]);
    assert_eq!(none.stdout, "No federation relationships\n");
    let listed = server_cli(&pay, &["bundle", "list", "--output", "json"]);
    assert!(listed.stdout.trim().is_empty(), "{}", listed.stdout);
}

/// GETs the server's bundle endpoint with a client that trusts the server's bundle (F-2: no
/// client certificate) and returns the JSON.
async fn fetch_endpoint(server: &TestServer) -> serde_json::Value {
    use std::sync::Arc;

    use http_body_util::BodyExt as _;
    let verifier = sigil_core::tls::SpiffeServerVerifier::new(
        sigil_core::tls::SharedBundles::from_bundle(server.bundle().await),
        sigil_core::x509_svid::Authorizer::any(),
    );
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(verifier))
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.bundle_endpoint())
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let get = |path: &str, method: hyper::Method| {
        hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    // Other methods and paths are refused, as SPIRE's endpoint does.
    let post = sender
        .send_request(get("/", hyper::Method::POST))
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    let other = sender
        .send_request(get("/other", hyper::Method::GET))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let response = sender
        .send_request(get("/", hyper::Method::GET))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn a_ca_rotation_reaches_the_other_trust_domains_workloads_before_it_activates() {
    let dir = tempfile::tempdir().unwrap();
    // ca_ttl 36s: the next authority is prepared at 18 s and signs from 30 s.
    let pay = TestServer::start_in(
        PAY_TD,
        &format!(
            "{FEDERATING}ca_ttl = \"36s\"\ndefault_x509_svid_ttl = \"6s\"\n\
             default_jwt_svid_ttl = \"6s\"\nagent_svid_ttl = \"6s\"\n"
        ),
        &[],
    );
    let ledger = TestServer::start_in(LEDGER_TD, FEDERATING, &[]);
    let first = pay.bundle().await;
    let created = federate(
        &ledger,
        &pay,
        "spiffe://example.org/sigil/server",
        dir.path(),
    )
    .await;
    assert!(
        created.status.success(),
        "{}{}",
        created.stdout,
        created.stderr
    );
    let ledger_agent = TestAgentProcess::start(&ledger).await;
    // The ledger workload needs a relationship to federate with: there is one.
    workload_entry(&ledger, &ledger_agent, LEDGER, PAY_TD);
    let (_stream, _) = x509_stream_with(&ledger_agent, |m| {
        m.federated_bundles.contains_key("spiffe://example.org")
    })
    .await;
    let mut bundles = ledger_agent
        .client()
        .await
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let two = bundles_until(&mut bundles, |m| authorities(m, PAY_TD) == 2).await;
    // The payments server still signs with its first authority: the successor reached the
    // ledger's workloads before it was used (F-12).
    let minted = mint_x509(&pay, dir.path());
    openssl_verify(&first, &minted).expect("still signed by the first authority");
    let seen = sigil_core::X509Bundle::from_der(
        sigil_core::TrustDomain::new(PAY_TD).unwrap(),
        &two.bundles["spiffe://example.org"],
    )
    .unwrap();
    // Once the successor signs, what it signs verifies against the bundle the ledger's
    // workload already had.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let minted = mint_x509(&pay, dir.path());
        if openssl_verify(&first, &minted).is_err() {
            openssl_verify(&seen, &minted).expect("the federated bundle had the new authority");
            break;
        }
        assert!(Instant::now() < deadline, "the successor never activated");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Mints an X509-SVID on `server` through the CLI and returns its leaf.
fn mint_x509(server: &TestServer, dir: &Path) -> rustls_pki_types::CertificateDer<'static> {
    let out = dir.join("minted");
    let run = server_cli(
        server,
        &[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/minted",
            "--write",
            out.to_str().unwrap(),
        ],
    );
    assert!(run.status.success(), "{}{}", run.stdout, run.stderr);
    let pem = std::fs::read(out.join("svid.pem")).unwrap();
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn an_https_web_endpoint_is_trusted_through_the_system_roots() {
    let dir = tempfile::tempdir().unwrap();
    // A test CA, and a certificate for localhost signed by it.
    openssl_ca(dir.path(), "ca");
    openssl_in(
        dir.path(),
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "web.key",
            "-out",
            "web.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.path().join("web.ext"),
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl_in(
        dir.path(),
        &[
            "x509",
            "-req",
            "-in",
            "web.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "web.ext",
            "-out",
            "web.pem",
        ],
    );
    let key = dir.path().join("web.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let pay = TestServer::start_in(
        PAY_TD,
        &format!(
            "{FEDERATING}bundle_endpoint_profile = \"https_web\"\nbundle_endpoint_web_cert_path = \"{}\"\nbundle_endpoint_web_key_path = \"{}\"\n",
            dir.path().join("web.pem").display(),
            key.display()
        ),
        &[],
    );
    let ca = dir.path().join("ca.pem");
    let ledger = TestServer::start_in(
        LEDGER_TD,
        FEDERATING,
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    let url = format!("https://localhost:{}/", pay.bundle_endpoint().port());
    // F-7: no bootstrap bundle and no endpoint ID: the Web PKI authenticates the endpoint.
    // F-3: with the https_spiffe test above, the client side speaks both profiles, and the
    // endpoint serves both.
    let created = server_cli(
        &ledger,
        &[
            "federation",
            "create",
            "--id",
            PAY_TD,
            "--bundle-endpoint-url",
            &url,
            "--profile",
            "https_web",
        ],
    );
    assert!(
        created.status.success(),
        "{}{}",
        created.stdout,
        created.stderr
    );
    let shown = show_until(&ledger, PAY_TD, fetched);
    assert_eq!(shown["profile"], "https_web");
    assert_eq!(shown["x509_authorities"], 1);
    // The same endpoint by IP: the certificate names localhost only, so it fails, saying why,
    // and the bundle fetched by name stays.
    let by_ip = format!("https://127.0.0.1:{}/", pay.bundle_endpoint().port());
    let updated = server_cli(
        &ledger,
        &[
            "federation",
            "update",
            "--id",
            PAY_TD,
            "--bundle-endpoint-url",
            &by_ip,
        ],
    );
    assert!(
        updated.status.success(),
        "{}{}",
        updated.stdout,
        updated.stderr
    );
    let shown = show_until(&ledger, PAY_TD, |s| s["last_error"].is_string());
    assert!(
        shown["last_error"]
            .as_str()
            .unwrap()
            .contains("TLS handshake failed"),
        "{shown}"
    );
    assert_eq!(shown["x509_authorities"], 1);
    // https_web takes no endpoint ID, and https_spiffe needs one (F-5, F-8).
    let bad = server_cli(
        &ledger,
        &[
            "federation",
            "create",
            "--id",
            "third.example",
            "--bundle-endpoint-url",
            &url,
            "--profile",
            "https_spiffe",
        ],
    );
    assert!(!bad.status.success());
    assert!(
        bad.stderr.contains("--endpoint-spiffe-id"),
        "{}",
        bad.stderr
    );
}
