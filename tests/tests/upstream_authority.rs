//! An upstream authority (`upstream_authority = "disk"`) end to end: a root made with openssl,
//! the real server and agent; every SVID chain a workload gets verifies with `openssl verify
//! -x509_strict` trusting only that root, before and after a CA rotation, and rust-spiffe and
//! py-spiffe accept them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::process::Command;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sigil_tests::*;

const WORKLOAD: &str = "spiffe://example.org/upstream-workload";

/// `openssl verify -x509_strict` of `chain` (leaf first) with `root` the only trust anchor.
fn verify_with_root_only(root: &CertificateDer<'static>, chain: &[CertificateDer<'static>]) {
    let bundle = sigil_core::X509Bundle::new(trust_domain(), vec![root.clone()]).unwrap();
    openssl_verify_chain(&bundle, chain).unwrap_or_else(|e| panic!("openssl verify: {e}"));
}

/// The workload's SVID chain and bundle in `msg`.
fn chain_and_bundle(
    msg: &sigil_proto::workload::X509svidResponse,
) -> (Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>) {
    let svid = msg.svids.iter().find(|s| s.spiffe_id == WORKLOAD).unwrap();
    (certs(&svid.x509_svid), certs(&svid.bundle))
}

#[tokio::test]
async fn svid_chains_verify_against_the_upstream_root_alone_across_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    openssl_ca(dir.path(), "root");
    let root = CertificateDer::from_pem_file(dir.path().join("root.pem")).unwrap();
    // ca_ttl 36 s: the next intermediate is prepared at 18 s and signs from 30 s.
    let server = TestServer::start(&format!(
        "ca_ttl = \"36s\"\ndefault_x509_svid_ttl = \"6s\"\ndefault_jwt_svid_ttl = \"6s\"\n\
         agent_svid_ttl = \"6s\"\nupstream_authority = \"disk\"\n\
         upstream_cert_path = \"{}\"\nupstream_key_path = \"{}\"",
        dir.path().join("root.pem").display(),
        dir.path().join("root.key").display()
    ));
    // The trust bundle is the upstream root.
    let shown = server_cli(&server, &["bundle", "show"]);
    assert!(shown.status.success(), "{}", shown.stderr);
    let bundle: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(shown.stdout.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    assert_eq!(bundle, std::slice::from_ref(&root));

    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    create_entry(&server, entry(WORKLOAD, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let (mut stream, msg) =
        x509_stream_with(&agent, |m| svid_ids(m).contains(&WORKLOAD.to_owned())).await;
    let (chain, bundle) = chain_and_bundle(&msg);
    assert_eq!(
        bundle,
        std::slice::from_ref(&root),
        "the workload's bundle is the root"
    );
    assert_eq!(
        chain.len(),
        2,
        "leaf and Sigil's intermediate, never the root"
    );
    let (_, intermediate) = x509_parser::parse_x509_certificate(&chain[1]).unwrap();
    let constraints = intermediate.basic_constraints().unwrap().unwrap().value;
    assert!(constraints.ca && constraints.path_len_constraint == Some(0));
    verify_with_root_only(&root, &chain);
    // The agent's own SVID too (as it stored it: its chain, DER back to back, base64).
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.data_dir().join("agent.json")).unwrap())
            .unwrap();
    let agent_chain = {
        use base64::Engine as _;
        certs(
            &base64::engine::general_purpose::STANDARD
                .decode(state["chain"].as_str().unwrap())
                .unwrap(),
        )
    };
    assert_eq!(agent_chain.len(), 2);
    verify_with_root_only(&root, &agent_chain);

    // rust-spiffe and py-spiffe take the chains and the bundle as they are.
    let address = format!("unix:{}", agent.socket().display());
    let client = spiffe::WorkloadApiClient::connect_to(&address)
        .await
        .unwrap();
    let context = client.fetch_x509_context().await.unwrap();
    let svid = context
        .svids()
        .iter()
        .find(|s| s.spiffe_id().to_string() == WORKLOAD)
        .unwrap();
    assert_eq!(svid.cert_chain().len(), 2);
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let td_bundle = context.bundle_set().get(&td).unwrap();
    let authorities = td_bundle.authorities();
    assert_eq!(authorities.len(), 1);
    assert_eq!(authorities[0].as_ref(), root.as_ref());
    if let Some(python) = python_with("spiffe", "SIGIL_REQUIRE_GRPCIO", "spiffe") {
        let script = format!(
            r#"
from spiffe import WorkloadApiClient
context = WorkloadApiClient("{address}").fetch_x509_context()
svid = [s for s in context.x509_svids if str(s.spiffe_id) == "{WORKLOAD}"][0]
bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
print(len(svid.cert_chain), len(bundle.x509_authorities))
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
        assert_eq!(stdout.trim(), "2 1");
    }

    // After the rotation a new intermediate signs; the bundle is still the root alone, and the
    // chain verifies against it.
    let rotated = next_x509_until(&mut stream, Duration::from_secs(60), |m| {
        m.svids
            .iter()
            .find(|s| s.spiffe_id == WORKLOAD)
            .is_some_and(|s| certs(&s.x509_svid).get(1) != chain.get(1))
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "no SVID from a new intermediate: {e}\n{}",
            server.log_text()
        )
    });
    let (after, bundle) = chain_and_bundle(&rotated);
    assert_eq!(bundle, std::slice::from_ref(&root));
    verify_with_root_only(&root, &after);
}

#[test]
fn a_server_refuses_to_start_with_an_upstream_key_that_is_not_the_cas() {
    let dir = tempfile::tempdir().unwrap();
    openssl_ca(dir.path(), "root");
    openssl_ca(dir.path(), "other");
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nadmin_socket = \"{}\"\n\
             bind_address = \"127.0.0.1:0\"\nupstream_authority = \"disk\"\n\
             upstream_cert_path = \"{}\"\nupstream_key_path = \"{}\"\n",
            dir.path().join("data").display(),
            dir.path().join("admin.sock").display(),
            dir.path().join("root.pem").display(),
            dir.path().join("other.key").display()
        ),
    )
    .unwrap();
    let out = Command::new(binary("sigil-server"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("upstream_key_path is not the key of the first certificate"),
        "{stderr}"
    );
}
