//! x509pop node attestation end to end: host certificates made with `openssl` (as docs/pki.md
//! shows), the real server and agent binaries.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sigil_tests::*;

/// A host certificate `HOST.pem` / `HOST.key` for `host`, signed by CA `ca`, with `usage` as
/// its extended key usage.
fn make_host(dir: &Path, ca: &str, host: &str, usage: &str) {
    openssl_in(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{host}.key"),
            "-out",
            &format!("{host}.csr"),
            "-subj",
            &format!("/CN={host}"),
        ],
    );
    std::fs::write(
        dir.join(format!("{host}.ext")),
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage={usage}\nsubjectAltName=DNS:{host}.example.org\n"
        ),
    )
    .unwrap();
    openssl_in(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{host}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            "0x1234",
            "-days",
            "1",
            "-out",
            &format!("{host}.pem"),
            "-extfile",
            &format!("{host}.ext"),
        ],
    );
}

fn agent_config(dir: &Path, host: &str) -> String {
    format!(
        "node_attestor = \"x509pop\"\nx509pop_cert_path = \"{}\"\nx509pop_key_path = \"{}\"\n",
        dir.join(format!("{host}.pem")).display(),
        dir.join(format!("{host}.key")).display()
    )
}

/// The agent ID the default template gives `host`'s certificate.
fn expected_id(dir: &Path, host: &str) -> String {
    let der = CertificateDer::from_pem_file(dir.join(format!("{host}.pem"))).unwrap();
    format!(
        "spiffe://example.org/sigil/agent/x509pop/{}",
        sigil_core::hex::sha256(&der)
    )
}

/// Runs an agent that must be refused; returns its stderr once it exited (non-zero).
fn refused_agent(server: &TestServer, dir: &Path, host: &str) -> String {
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        data.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let bundle = data.path().join("bootstrap.pem");
    std::fs::write(&bundle, server_bundle_pem(server)).unwrap();
    let config = data.path().join("agent.toml");
    std::fs::write(&config, agent_config(dir, host)).unwrap();
    let stderr = refused(
        Command::new(binary("sigil-agent"))
            .args(["run", "--trust-domain", TRUST_DOMAIN, "--config"])
            .arg(&config)
            .arg("--server-address")
            .arg(server.node_addr.to_string())
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .arg("--socket-path")
            .arg(data.path().join("api.sock")),
    );
    assert!(
        !data.path().join("api.sock").exists(),
        "a refused agent serves no socket"
    );
    stderr
}

fn server_bundle_pem(server: &TestServer) -> String {
    let out = server_cli(server, &["bundle", "show"]);
    assert!(out.status.success(), "{}", out.stderr);
    out.stdout
}

fn x509pop_server(dir: &Path) -> TestServer {
    TestServer::start(&format!(
        "x509pop_ca_bundle_path = \"{}\"",
        dir.join("hostca.pem").display()
    ))
}

#[tokio::test]
async fn an_agent_attests_with_its_host_certificate_again_after_losing_its_data_but_not_once_banned()
 {
    let dir = tempfile::tempdir().unwrap();
    openssl_ca(dir.path(), "hostca");
    make_host(dir.path(), "hostca", "node-1", "clientAuth");
    let server = x509pop_server(dir.path());

    let agent =
        TestAgentProcess::start_without_token(&server, &agent_config(dir.path(), "node-1")).await;
    let agent_id = agent.agent_id();
    assert_eq!(agent_id, expected_id(dir.path(), "node-1"));

    // Its workloads get SVIDs that verify against the bundle.
    let me = format!("unix:uid:{}", my_uid());
    let workload = "spiffe://example.org/x509pop-workload";
    create_entry(&server, entry(workload, &agent_id, &[&me]))
        .await
        .unwrap();
    let (_, msg) = x509_stream_with(&agent, |m| svid_ids(m).contains(&workload.to_owned())).await;
    let svid = msg.svids.iter().find(|s| s.spiffe_id == workload).unwrap();
    let bundle = sigil_core::X509Bundle::from_der(trust_domain(), &svid.bundle).unwrap();
    openssl_verify(&bundle, &certs(&svid.x509_svid)[0]).unwrap();

    // The node record carries the attestor and the certificate's selectors.
    let shown = server_cli(
        &server,
        &[
            "agent",
            "show",
            "--spiffe-id",
            &agent_id,
            "--output",
            "json",
        ],
    );
    assert!(shown.status.success(), "{}", shown.stderr);
    let shown = shown.json();
    assert_eq!(shown["attestation_type"], "x509pop", "{shown}");
    let selectors = shown["selectors"].to_string();
    for wanted in [
        "x509pop:subject:cn:node-1",
        "x509pop:san:dns:node-1.example.org",
        "x509pop:serialnumber:1234",
        "x509pop:ca:fingerprint:",
    ] {
        assert!(selectors.contains(wanted), "{wanted} not in {selectors}");
    }

    // A node alias picks the agent by its certificate's common name: what hangs below the
    // alias reaches its workloads (and the alias itself is not issued to them).
    let alias = "spiffe://example.org/nodes/node-1";
    create_entry(
        &server,
        entry(
            alias,
            "spiffe://example.org/sigil/server",
            &["x509pop:subject:cn:node-1"],
        ),
    )
    .await
    .unwrap();
    let via_alias = "spiffe://example.org/via-alias";
    create_entry(&server, entry(via_alias, alias, &[&me]))
        .await
        .unwrap();
    let (_, msg) = x509_stream_with(&agent, |m| svid_ids(m).contains(&via_alias.to_owned())).await;
    assert!(!svid_ids(&msg).contains(&alias.to_owned()));
    // An alias for another host's name gives this agent nothing.
    create_entry(
        &server,
        entry(
            "spiffe://example.org/nodes/node-2",
            "spiffe://example.org/sigil/server",
            &["x509pop:subject:cn:node-2"],
        ),
    )
    .await
    .unwrap();
    let not_mine = "spiffe://example.org/node-2-only";
    create_entry(
        &server,
        entry(not_mine, "spiffe://example.org/nodes/node-2", &[&me]),
    )
    .await
    .unwrap();

    // Lost its data directory: it attests again under the same ID (here from a fresh
    // directory while the old agent still runs), and the old SVID is cut off at once: the old
    // agent's stream ends and it exits, refused.
    let mut old = agent;
    let agent =
        TestAgentProcess::start_without_token(&server, &agent_config(dir.path(), "node-1")).await;
    assert_eq!(agent.agent_id(), agent_id);
    let exited = old.wait_exit(Duration::from_secs(20));
    assert!(
        exited.is_some_and(|status| !status.success()),
        "the replaced agent still runs ({exited:?}); its log:\n{}",
        old.log_text()
    );
    assert!(
        old.log_text().contains("must_reattest"),
        "{}",
        old.log_text()
    );
    let (_, msg) = x509_stream_with(&agent, |m| {
        svid_ids(m).contains(&workload.to_owned()) && svid_ids(m).contains(&via_alias.to_owned())
    })
    .await;
    assert!(
        !svid_ids(&msg).contains(&not_mine.to_owned()),
        "{:?}",
        svid_ids(&msg)
    );
    let log = server.log_text();
    assert!(log.contains("\"reattested\":true"), "server log:\n{log}");

    // Banned, it cannot come back with the same certificate.
    let banned = server_cli(&server, &["agent", "ban", "--spiffe-id", &agent_id]);
    assert!(banned.status.success(), "{}", banned.stderr);
    drop(agent);
    let stderr = refused_agent(&server, dir.path(), "node-1");
    assert!(stderr.contains("banned"), "agent stderr:\n{stderr}");
}

#[tokio::test]
async fn host_certificates_from_another_ca_or_without_client_auth_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    openssl_ca(dir.path(), "hostca");
    openssl_ca(dir.path(), "otherca");
    make_host(dir.path(), "otherca", "stranger", "clientAuth");
    make_host(dir.path(), "hostca", "webserver", "serverAuth");
    let server = x509pop_server(dir.path());

    let stderr = refused_agent(&server, dir.path(), "stranger");
    assert!(
        stderr.contains("not issued by a CA in the server's x509pop_ca_bundle_path"),
        "agent stderr:\n{stderr}"
    );
    let stderr = refused_agent(&server, dir.path(), "webserver");
    assert!(stderr.contains("clientAuth"), "agent stderr:\n{stderr}");
    // The server says why too, and no node was recorded.
    let log = server.log_text();
    assert!(log.contains("attestation refused"), "server log:\n{log}");
    let agents = server_cli(&server, &["agent", "list", "--output", "json"]);
    assert!(agents.status.success(), "{}", agents.stderr);
    assert!(
        !agents.stdout.contains("x509pop"),
        "a refused host was recorded: {}",
        agents.stdout
    );
}

#[tokio::test]
async fn a_server_without_x509pop_refuses_it_by_name() {
    let dir = tempfile::tempdir().unwrap();
    openssl_ca(dir.path(), "hostca");
    make_host(dir.path(), "hostca", "node-1", "clientAuth");
    let server = TestServer::start("");
    let stderr = refused_agent(&server, dir.path(), "node-1");
    assert!(
        stderr.contains("node attestor \"x509pop\" is not enabled on this server"),
        "agent stderr:\n{stderr}"
    );
}
