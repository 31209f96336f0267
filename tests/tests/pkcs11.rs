//! Keys in a PKCS#11 token (`key_manager = "pkcs11"`) against SoftHSM2: issuance, a rotation
//! that destroys expired keys in the token, a restart that finds the same keys, no private key
//! file on disk, and each refusal at start (wrong PIN, unknown label, missing module, a key the
//! journal names that the token does not hold).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sigil_testkit::softhsm::{PIN, SoftHsm};
use sigil_tests::*;

fn pkcs11_config(hsm: &SoftHsm, label: &str, pin_file: &Path) -> String {
    format!(
        "key_manager = \"pkcs11\"\npkcs11_module = \"{}\"\npkcs11_token_label = \"{label}\"\n\
         pkcs11_pin_file = \"{}\"\n",
        hsm.module().display(),
        pin_file.display()
    )
}

/// Every file under `dir` whose name ends in `.key`.
fn key_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(key_files(&path));
            } else if path.extension().is_some_and(|x| x == "key") {
                out.push(path.display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn keys_live_in_the_token_through_issuance_rotation_and_restart() {
    let Some(hsm) = SoftHsm::start("sigil") else {
        return;
    };
    let conf = hsm.conf().display().to_string();
    // ca_ttl 36 s: the next authority is prepared at 18 s, signs from 30 s; the first is
    // pruned (and its key destroyed) at 36 s.
    let config = format!(
        "ca_ttl = \"36s\"\ndefault_x509_svid_ttl = \"6s\"\ndefault_jwt_svid_ttl = \"6s\"\n\
         agent_svid_ttl = \"6s\"\n{}",
        pkcs11_config(&hsm, "sigil", &hsm.pin_file(PIN))
    );
    let start = Instant::now();
    let mut server = TestServer::start_with_env(&config, &[("SOFTHSM2_CONF", &conf)]);
    // The X.509 authority, the JWT key and the audit key: two objects each.
    assert_eq!(hsm.object_count(), 6, "{}", server.log_text());
    assert!(
        key_files(&server.data_dir()).is_empty(),
        "{:?}",
        key_files(&server.data_dir())
    );

    // Issuance: an agent and a workload, an SVID that openssl accepts, a JWT-SVID that
    // validates.
    let agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    let workload = "spiffe://example.org/hsm-workload";
    create_entry(&server, entry(workload, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let (mut stream, msg) =
        x509_stream_with(&agent, |m| svid_ids(m).contains(&workload.to_owned())).await;
    let svid = msg.svids.iter().find(|s| s.spiffe_id == workload).unwrap();
    let bundle = sigil_core::X509Bundle::from_der(trust_domain(), &svid.bundle).unwrap();
    openssl_verify(&bundle, &certs(&svid.x509_svid)[0]).unwrap();
    // A JWT-SVID signed by the token's JWT key (raw r || s turned into JOSE's form) validates.
    let mut client = agent.client().await;
    let jwt = client
        .fetch_jwtsvid(sigil_proto::workload::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: workload.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    let validated = client
        .validate_jwtsvid(sigil_proto::workload::ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: jwt,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(validated.spiffe_id, workload);
    let before_restart = server.bundle().await;

    // A restart finds the same keys: the same authorities, and signing goes on.
    drop(stream);
    server.restart();
    assert_eq!(
        server.bundle().await.authorities(),
        before_restart.authorities(),
        "{}",
        server.log_text()
    );
    assert_eq!(hsm.object_count(), 6);
    let (s, _) = x509_stream_with(&agent, |m| svid_ids(m).contains(&workload.to_owned())).await;
    stream = s;

    // Rotation: a new authority's key is made in the token; once the first authority has
    // expired, its key is destroyed there.
    let prepared = next_x509_until(&mut stream, Duration::from_secs(40), |m| {
        m.svids
            .iter()
            .any(|s| s.spiffe_id == workload && certs(&s.bundle).len() == 2)
    })
    .await;
    assert!(
        prepared.is_ok(),
        "no second authority; {}",
        server.log_text()
    );
    assert!(hsm.object_count() >= 8, "{}", hsm.object_count());
    let first = before_restart.authorities()[0].clone();
    let deadline = start + Duration::from_secs(80);
    while server.bundle().await.authorities().contains(&first) {
        assert!(
            Instant::now() < deadline,
            "the first authority was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Its key is destroyed in the token: the token holds a key pair (two objects) for each
    // X.509 authority and each JWT key in the bundle (they rotate together) and the audit key,
    // nothing more.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let authorities = server.bundle().await.authorities().len();
        let objects = hsm.object_count();
        if objects == 2 * (2 * authorities + 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{objects} objects in the token for {authorities} X.509 authorities: expired keys were not destroyed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(key_files(&server.data_dir()).is_empty());
}

/// Runs `sigil-server run` with `extra` config and the token's environment; returns its
/// stderr once it exited (it must fail).
fn refused_start(hsm: &SoftHsm, data_dir: &Path, extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nadmin_socket = \"{}\"\n\
             bind_address = \"127.0.0.1:0\"\n{extra}",
            data_dir.display(),
            dir.path().join("admin.sock").display(),
        ),
    )
    .unwrap();
    let out = Command::new(binary("sigil-server"))
        .args(["run", "--config"])
        .arg(&config)
        .env("SOFTHSM2_CONF", hsm.conf())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the server started: {stderr}");
    stderr
}

#[test]
fn the_server_refuses_to_start_naming_the_cause() {
    let Some(hsm) = SoftHsm::start("sigil") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let good_pin = hsm.pin_file(PIN);
    let cases = [
        (
            pkcs11_config(&hsm, "sigil", &hsm.pin_file("111111")),
            "the PIN in pkcs11_pin_file is not the token's user PIN",
        ),
        (
            pkcs11_config(&hsm, "nope", &good_pin),
            "no PKCS#11 token is labelled \"nope\" (tokens: \"sigil\")",
        ),
        (
            pkcs11_config(&hsm, "sigil", &good_pin).replace(
                &hsm.module().display().to_string(),
                "/nonexistent/libpkcs11.so",
            ),
            "pkcs11_module /nonexistent/libpkcs11.so: cannot load it",
        ),
    ];
    for (config, wanted) in cases {
        let stderr = refused_start(&hsm, &data, &config);
        assert!(stderr.contains(wanted), "wanted {wanted:?} in:\n{stderr}");
    }
    assert_eq!(hsm.object_count(), 0, "a refused start made no key");

    // Started once on this token, then pointed at a fresh token with the same label: the
    // journal names keys the token does not hold, and the server refuses rather than make new
    // ones.
    let mut server = TestServer::start_with_env(
        &pkcs11_config(&hsm, "sigil", &good_pin),
        &[("SOFTHSM2_CONF", &hsm.conf().display().to_string())],
    );
    let data_dir = server.data_dir();
    let config = std::fs::read_to_string(server.config_path()).unwrap();
    let store_lines: String = config
        .lines()
        .filter(|l| {
            l.starts_with("store") || l.starts_with("postgres_url") || l.starts_with("server_id")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    server.kill9();
    let fresh = SoftHsm::start("sigil").unwrap();
    let stderr = refused_start(
        &fresh,
        &data_dir,
        &format!(
            "{store_lines}{}",
            pkcs11_config(&fresh, "sigil", &fresh.pin_file(PIN))
        ),
    );
    assert!(stderr.contains("no key with id x509-"), "{stderr}");
    assert_eq!(fresh.object_count(), 0, "no replacement key was made");
}
