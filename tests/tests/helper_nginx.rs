//! `sigil-agent helper` feeding nginx, software that knows nothing of SPIFFE: nginx serves the
//! SVID the helper writes, verifies clients against the bundle and the CRLs it writes
//! (`ssl_verify_client on`, `ssl_crl`), and is reloaded by the helper's `--on-update` after
//! every update. A client holding a privileged session's SVID gets through; once the session is
//! revoked the same client is refused; after a rotation nginx serves the new certificate.
//!
//! Needs nginx (Debian's `nginx-light`); skipped with one line without it, unless
//! `SIGIL_REQUIRE_NGINX=1` (CI sets it), which turns the skip into a failure. curl and openssl
//! are the clients.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigil_tests::{TestAgentProcess, TestServer, create_entry, entry, my_uid, x509_stream_with};

/// nginx from PATH or Debian's place, or `None` after one line saying what to install.
fn nginx() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|path| path.is_file());
    if found.is_none() {
        assert!(
            std::env::var("SIGIL_REQUIRE_NGINX").as_deref() != Ok("1"),
            "SIGIL_REQUIRE_NGINX=1 but nginx is not installed (apt-get install nginx-light)"
        );
        eprintln!("SKIPPED: nginx is not installed (apt-get install nginx-light)");
    }
    found
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The nginx configuration: the helper's files for the server's certificate, the client CAs
/// and the CRLs.
fn nginx_conf(prefix: &Path, files: &Path, port: u16) -> String {
    let (p, f) = (prefix.display(), files.display());
    format!(
        "daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {f}/svid.pem;
        ssl_certificate_key {f}/svid_key.pem;
        ssl_client_certificate {f}/svid_bundle.pem;
        ssl_crl {f}/crl.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        location / {{ return 200 \"hello $ssl_client_verify\\n\"; }}
    }}
}}
"
    )
}

/// curl with the client's certificate: the HTTP status (0 when TLS failed).
fn curl(port: u16, client: &Path) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5"])
        .arg("--cacert")
        .arg(client.join("bundle.pem"))
        .arg("--cert")
        .arg(client.join("svid.pem"))
        .arg("--key")
        .arg(client.join("svid.key"))
        .arg(format!("https://localhost:{port}/"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The serial (hex) of the certificate nginx serves, by openssl.
fn served_serial(port: u16) -> Option<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("serial=")
        .map(|s| s.to_ascii_lowercase())
}

/// The serial (hex) of the first certificate in a PEM file.
fn file_serial(path: &Path) -> Option<String> {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("serial=")
        .map(|s| s.to_ascii_lowercase())
}

/// The serials the CRLs of a PEM file list (lowercase hex).
fn crl_file_serials(path: &Path) -> Vec<String> {
    use rustls_pki_types::pem::PemObject as _;
    let Ok(pem) = std::fs::read(path) else {
        return Vec::new();
    };
    rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .flat_map(|crl| sigil_tests::crl_serials(crl.as_ref()))
        .collect()
}

fn until<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A helper process: SIGTERM and a wait when dropped (it passes the signal on to its `--cmd`).
struct Reap(Child);

impl Reap {
    /// SIGTERM, then its exit status (within 15 s).
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.0.try_wait() {
            return Some(status);
        }
        sigil_tests::send_signal(self.0.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        if self.terminate().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_serves_and_verifies_with_the_helpers_files_and_reloads_on_revocation_and_rotation() {
    let Some(nginx) = nginx() else { return };
    // Workload SVIDs live 20 s, so the agent renews nginx's within the test.
    let server =
        TestServer::start("default_x509_svid_ttl = \"20s\"\ndefault_jwt_svid_ttl = \"20s\"\n");
    let mut agent = TestAgentProcess::start(&server).await;
    let me = format!("unix:uid:{}", my_uid());
    const NGINX_ID: &str = "spiffe://example.org/nginx";
    const CLIENT_ID: &str = "spiffe://example.org/admin/operator";
    let mut nginx_entry = entry(NGINX_ID, &agent.agent_id(), &[&me]);
    nginx_entry.dns_names = vec!["localhost".to_owned()];
    create_entry(&server, nginx_entry).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("nginx");
    let files = dir.path().join("files");
    let client = dir.path().join("client");
    for d in [&prefix, &client] {
        std::fs::create_dir_all(d).unwrap();
    }
    // nginx's workers (nobody, when run as root) read nothing of ours: the master loads the
    // certificates; the prefix only needs to be reachable for its temp paths.
    for d in [dir.path(), prefix.as_path()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let port = free_port();
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&prefix, &files, port)).unwrap();
    let nginx_cmd = format!(
        "{} -p {} -c {}",
        nginx.display(),
        prefix.display(),
        conf.display()
    );
    let mut helper = Reap(
        Command::new(sigil_tests::binary("sigil-agent"))
            .arg("helper")
            .arg("--socket-path")
            .arg(agent.socket())
            .arg("--dir")
            .arg(&files)
            .args(["--spiffe-id", NGINX_ID])
            .arg("--cmd")
            .arg(&nginx_cmd)
            .arg("--on-update")
            .arg(format!("{nginx_cmd} -s reload"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // A second helper whose --cmd records the --renew-signal it is sent.
    let hups = dir.path().join("hups");
    let files2 = dir.path().join("files2");
    let _signalled = Reap(
        Command::new(sigil_tests::binary("sigil-agent"))
            .arg("helper")
            .arg("--socket-path")
            .arg(agent.socket())
            .arg("--dir")
            .arg(&files2)
            .args([
                "--spiffe-id",
                NGINX_ID,
                "--renew-signal",
                "HUP",
                "--jwt-audience",
                "db",
            ])
            .arg("--cmd")
            .arg(format!(
                "/bin/sh -c 'trap \"echo hup >> {}\" HUP; while :; do sleep 0.1; done'",
                hups.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // A privileged session for the operator's client, on the same agent.
    let session = sigil_tests::open_session(&server, &agent, CLIENT_ID, "10m", &[]);
    let session_id = session["id"].as_str().unwrap().to_owned();
    let (mut stream, msg) = x509_stream_with(&agent, |m| {
        sigil_tests::svid_ids(m).contains(&CLIENT_ID.into())
    })
    .await;
    let svid = msg.svids.iter().find(|s| s.spiffe_id == CLIENT_ID).unwrap();
    let pem = |label: &str, der: &[u8]| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    };
    let chain: String = sigil_tests::certs(&svid.x509_svid)
        .iter()
        .map(|c| pem("CERTIFICATE", c.as_ref()))
        .collect();
    let bundle: String = sigil_tests::certs(&svid.bundle)
        .iter()
        .map(|c| pem("CERTIFICATE", c.as_ref()))
        .collect();
    std::fs::write(client.join("svid.pem"), chain).unwrap();
    std::fs::write(
        client.join("svid.key"),
        pem("PRIVATE KEY", &svid.x509_svid_key),
    )
    .unwrap();
    std::fs::write(client.join("bundle.pem"), bundle).unwrap();
    let client_serial = sigil_tests::leaf_serial(&svid.x509_svid);

    // The helper wrote its files and started nginx: the session's client gets through.
    let (status, body) = until(
        "nginx to answer the session's client",
        Duration::from_secs(20),
        || {
            let got = curl(port, &client);
            (got.0 == 200).then_some(got)
        },
    );
    assert_eq!(status, 200);
    assert_eq!(body, "hello SUCCESS\n");
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(files.join("svid_key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    let first_served = served_serial(port).unwrap();
    assert_eq!(
        Some(first_served.clone()),
        file_serial(&files.join("svid.pem"))
    );

    // Revoked: the helper rewrites the CRL, nginx reloads, the same client is refused.
    let revoked = sigil_tests::server_cli(
        &server,
        &[
            "session",
            "revoke",
            &session_id,
            "--reason",
            "nginx test",
            "--output",
            "json",
        ],
    )
    .json();
    assert_eq!(revoked["state"], "revoked");
    until(
        "the helper's crl.pem to list the serial",
        Duration::from_secs(15),
        || {
            crl_file_serials(&files.join("crl.pem"))
                .contains(&client_serial)
                .then_some(())
        },
    );
    let refused = until(
        "nginx to refuse the revoked client",
        Duration::from_secs(15),
        || {
            let got = curl(port, &client);
            (got.0 != 200).then_some(got)
        },
    );
    assert_eq!(
        refused.0, 400,
        "nginx's answer to a revoked certificate: {refused:?}"
    );
    let log = std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default();
    assert!(
        log.contains("revoked"),
        "nginx's log does not say why:\n{log}"
    );
    drop(stream.message().await);

    // The agent restarts under the helper (its stream ends; it reconnects and the files stay
    // meanwhile), then renews nginx's SVID (20 s TTL) and nginx, reloaded, serves it.
    agent.restart();
    assert_eq!(
        Some(first_served.clone()),
        file_serial(&files.join("svid.pem"))
    );
    let rotated = until(
        "nginx to serve a renewed certificate",
        Duration::from_secs(40),
        || served_serial(port).filter(|s| *s != first_served),
    );
    assert_eq!(Some(rotated.clone()), file_serial(&files.join("svid.pem")));
    // And the next renewal, by time alone.
    let renewed = until(
        "nginx to serve the next renewal",
        Duration::from_secs(40),
        || served_serial(port).filter(|s| *s != rotated && *s != first_served),
    );
    assert_eq!(Some(renewed), file_serial(&files.join("svid.pem")));

    // The second helper signalled its process after the updates (the first set starts it).
    let signalled = std::fs::read_to_string(&hups).unwrap_or_default();
    assert!(signalled.lines().count() >= 1, "no HUP recorded");
    assert_eq!(
        file_serial(&files2.join("svid.pem")),
        file_serial(&files.join("svid.pem"))
    );
    // And wrote a JWT-SVID for its audience, readable by its owner only.
    let token = std::fs::read_to_string(files2.join("jwt_svid.token")).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            token.split('.').nth(1).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], NGINX_ID);
    assert!(
        claims["aud"] == "db" || claims["aud"] == serde_json::json!(["db"]),
        "{claims}"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(files2.join("jwt_svid.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // SIGTERM to the helper reaches nginx, its --cmd: both exit.
    let nginx_pid: u32 = std::fs::read_to_string(prefix.join("nginx.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(nginx_pid));
    let status = helper
        .terminate()
        .expect("the helper did not exit after SIGTERM");
    assert!(status.success(), "nginx's exit status, passed on: {status}");
    until(
        "nginx to exit with its helper",
        Duration::from_secs(10),
        || (!alive(nginx_pid)).then_some(()),
    );
}
