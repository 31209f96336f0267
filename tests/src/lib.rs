//! Shared helpers for Sigil's end-to-end tests. Each behaviour has its own file in `tests/`; this
//! crate starts the real binaries (`target/debug/sigil-server`) in temporary directories, talks
//! to them over their real sockets (the admin Unix socket, the agent-facing TCP port with mTLS),
//! and cleans up, also when a test fails.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    missing_docs,
    missing_debug_implementations,
    reason = "test support code: a failed setup step is a failed test"
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil_core::tls::{SharedBundles, SpiffeServerVerifier};
use sigil_core::x509_bundle::X509Bundle;
use sigil_core::x509_svid::Authorizer;
use sigil_core::{SpiffeId, TrustDomain};
use sigil_proto::admin::admin_client::AdminClient;
use sigil_proto::node::node_client::NodeClient;
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint, Uri};

/// The trust domain test servers run.
pub const TRUST_DOMAIN: &str = "example.org";

/// Path of a binary built by `cargo test --workspace` (`target/debug/NAME`). Each binary's
/// package has an integration test that runs it (`server/tests/binary.rs`,
/// `agent/tests/front_door*.rs`, `examples/tests/quickstart.rs`), which is what makes
/// `cargo test` build (and rebuild) the binary itself, not only its test harness.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/test-xxxx -> target/debug/NAME
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run `cargo test --workspace`",
        path.display()
    );
    path
}

/// The environment variable that puts test servers on PostgreSQL: `SIGIL_TEST_STORE=postgres`
/// runs every end-to-end test whose server does not choose its store itself on a database of
/// its own (in a cluster `sigil-testkit` starts); unset or `sled`, on sled in the data
/// directory. CI runs the end-to-end tests both ways.
pub const STORE_ENV: &str = "SIGIL_TEST_STORE";

/// Copies a directory tree, file modes included (a stopped server's data directory: a backup).
pub fn copy_dir(from: &Path, to: &Path) {
    sigil_testkit::copy_dir(from, to).unwrap();
}

/// Configuration lines that pin a test server to sled: for the tests that open or alter the
/// sled files themselves (forensics, tampering, restoring an old copy of the data directory).
pub const SLED_STORE: &str = "store = \"sled\"";

/// The `store` configuration of a new test server: the PostgreSQL lines when [`STORE_ENV`]
/// asks for it and `extra_config` does not choose a store, else nothing (sled).
fn store_config(extra_config: &str) -> String {
    let wanted = std::env::var(STORE_ENV).unwrap_or_default();
    match wanted.as_str() {
        "" | "sled" => String::new(),
        _ if extra_config.contains("store =") => String::new(),
        "postgres" => {
            let cluster = sigil_testkit::shared()
                .unwrap_or_else(|| panic!("{STORE_ENV}=postgres but PostgreSQL is not installed"));
            // Its own thread and runtime: this runs inside the tests' runtimes too.
            let url = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(cluster.create_database())
            })
            .join()
            .unwrap();
            // `default`: the chain id the single-server tests expect on either store.
            format!("store = \"postgres\"\npostgres_url = \"{url}\"\nserver_id = \"default\"\n")
        }
        other => panic!("{STORE_ENV}={other:?}: write sled or postgres"),
    }
}

/// A `sigil-server run` child process with its own data directory and sockets.
pub struct TestServer {
    dir: TempDir,
    /// Its trust domain ([`TRUST_DOMAIN`] unless started with [`TestServer::start_in`]).
    pub trust_domain: String,
    /// The store lines of its configuration (empty: sled), kept across restarts.
    store_config: String,
    extra_config: String,
    /// Extra environment of the server process (`SOFTHSM2_CONF`).
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// The agent-facing API address.
    pub node_addr: SocketAddr,
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl TestServer {
    /// Starts a server for [`TRUST_DOMAIN`]; `extra_config` is appended to its TOML config.
    pub fn start(extra_config: &str) -> Self {
        Self::start_with_env(extra_config, &[])
    }

    /// As [`TestServer::start`], with `env` added to the server's environment (on restarts
    /// too).
    pub fn start_with_env(extra_config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_in(TRUST_DOMAIN, extra_config, env)
    }

    /// As [`TestServer::start_with_env`], for `trust_domain`.
    pub fn start_in(trust_domain: &str, extra_config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Self {
            dir,
            trust_domain: trust_domain.to_owned(),
            store_config: store_config(extra_config),
            extra_config: extra_config.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
            node_addr: "127.0.0.1:0".parse().unwrap(),
            log: Arc::default(),
        };
        server.spawn();
        server
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// Whether this server runs on PostgreSQL ([`STORE_ENV`]).
    pub fn on_postgres(&self) -> bool {
        !self.store_config.is_empty()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("server.toml")
    }

    fn spawn(&mut self) {
        let config = format!(
            "trust_domain = \"{td}\"\nbind_address = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\nadmin_socket = \"{sock}\"\nlog_format = \"json\"\n{store}{extra}\n",
            td = self.trust_domain,
            port = self.node_addr.port(),
            data = self.data_dir().display(),
            sock = self.admin_socket().display(),
            store = self.store_config,
            extra = self.extra_config,
        );
        std::fs::write(self.config_path(), config).unwrap();
        let mut child = Command::new(binary("sigil-server"))
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("SIGIL_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (addr_tx, addr_rx) = mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("agent-facing api listening")
                    && let Some(addr) = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| v["fields"]["address"].as_str().map(str::to_owned))
                {
                    let _ = addr_tx.send(addr);
                }
                log.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("server did not start; log:\n{}", self.log_text()));
        self.node_addr = addr.parse().unwrap();
        // The admin socket is bound before the node API logs that it listens; wait for it anyway.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.admin_socket().exists() {
            assert!(Instant::now() < deadline, "admin socket missing");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server not running").id()
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Stops the server with SIGKILL (no cleanup, as in a crash) and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Sends a signal and waits (at most `timeout`) for the exit; returns the status and how
    /// long it took.
    /// Sends `signal` (`TERM`, ...) and returns at once; the process is reaped later.
    pub fn signal_nowait(&self, signal: &str) {
        send_signal(self.child.as_ref().expect("not running").id(), signal);
    }

    pub fn signal(&mut self, signal: &str, timeout: Duration) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("server not running");
        let start = Instant::now();
        send_signal(child.id(), signal);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            if start.elapsed() > timeout {
                child.kill().unwrap();
                panic!("server did not exit within {timeout:?} of SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data directory and port with `extra_config` in
    /// place of the one it had.
    pub fn restart_with(&mut self, extra_config: &str) {
        extra_config.clone_into(&mut self.extra_config);
        self.restart();
    }

    /// Starts the server again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// A client of the admin API, as the current (root) user.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(unix_channel(self.admin_socket()).await)
    }

    /// The trust domain's X.509 bundle, fetched through the admin API.
    pub async fn bundle(&self) -> X509Bundle {
        let pem = self
            .admin()
            .await
            .get_bundle(sigil_proto::admin::GetBundleRequest {})
            .await
            .unwrap()
            .into_inner()
            .pem;
        X509Bundle::from_pem(
            TrustDomain::new(&self.trust_domain).unwrap(),
            pem.as_bytes(),
        )
        .unwrap()
    }

    /// The bundle endpoint's address, from the log (`bundle_endpoint_address` must be set);
    /// waits up to 10 s for the line.
    pub fn bundle_endpoint(&self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self.log.lock().unwrap().iter().find_map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                (v["fields"]["message"] == "bundle endpoint listening")
                    .then(|| v["fields"]["address"].as_str()?.parse().ok())?
            });
            if let Some(address) = found {
                return address;
            }
            assert!(
                Instant::now() < deadline,
                "no bundle endpoint in the log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Generates a join token.
    pub async fn join_token(&self, ttl: Duration) -> String {
        self.admin()
            .await
            .generate_join_token(sigil_proto::admin::GenerateJoinTokenRequest {
                ttl_seconds: ttl.as_secs(),
                spiffe_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A tonic channel over a Unix socket.
pub async fn unix_channel(path: PathBuf) -> Channel {
    sigil_proto::client::unix_channel(path).await.unwrap()
}

pub fn trust_domain() -> TrustDomain {
    TrustDomain::new(TRUST_DOMAIN).unwrap()
}

pub fn server_id() -> SpiffeId {
    trust_domain().id(["sigil", "server"]).unwrap()
}

/// A P-256 key for an agent or workload, and a CSR for it.
pub struct TestKey {
    pub key: KeyPair,
}

impl TestKey {
    pub fn new() -> Self {
        Self {
            key: KeyPair::generate().unwrap(),
        }
    }

    /// A CSR for this key (empty subject: the server ignores it anyway).
    pub fn csr(&self) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.serialize_request(&self.key).unwrap().der().to_vec()
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

impl Default for TestKey {
    fn default() -> Self {
        Self::new()
    }
}

/// Splits concatenated DER certificates.
pub fn certs(der: &[u8]) -> Vec<CertificateDer<'static>> {
    X509Bundle::from_der(trust_domain(), der)
        .map(|b| b.authorities().to_vec())
        .unwrap_or_default()
}

/// A client of the agent-facing API over TCP with TLS: the server must present the SVID
/// `spiffe://example.org/sigil/server` chaining to `bundle`; `identity` is the client SVID to
/// present (none for `AttestAgent`).
pub async fn node_client(
    addr: SocketAddr,
    bundle: &X509Bundle,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<NodeClient<Channel>, tonic::transport::Error> {
    Ok(NodeClient::new(
        server_channel(addr, bundle, identity).await?,
    ))
}

/// A gRPC channel to the server's agent-facing port (the node and audit ingest APIs) over TCP
/// with TLS, as [`node_client`] makes it.
pub async fn server_channel(
    addr: SocketAddr,
    bundle: &X509Bundle,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Channel, tonic::transport::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            SharedBundles::from_bundle(bundle.clone()),
            Authorizer::exact(server_id()),
        )));
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Endpoint::try_from("http://sigil-server")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("sigil-server").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}

/// An X509-SVID for `spiffe_id` minted by the server (`MintX509SVID`), with its key: the
/// identity of a test client that is not an agent (a broker, an outsider).
pub async fn minted_identity(
    server: &TestServer,
    spiffe_id: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = TestKey::new();
    let minted = server
        .admin()
        .await
        .mint_x509svid(sigil_proto::admin::MintX509svidRequest {
            spiffe_id: spiffe_id.to_owned(),
            csr: key.csr(),
            ttl_seconds: 600,
            dns_names: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    (certs(&minted.cert_chain), key.private_key())
}

/// Runs `openssl verify -x509_strict` on `leaf` against `bundle`; returns its output on failure.
pub fn openssl_verify(bundle: &X509Bundle, leaf: &CertificateDer<'_>) -> Result<(), String> {
    openssl_verify_chain(bundle, &[leaf.clone().into_owned()])
}

/// `openssl verify -x509_strict` of `chain` (leaf first, then its intermediates, given as
/// `-untrusted`) against `bundle` alone.
pub fn openssl_verify_chain(
    bundle: &X509Bundle,
    chain: &[CertificateDer<'static>],
) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let pem = |certs: &[CertificateDer<'static>]| {
        X509Bundle::new(trust_domain(), certs.to_vec())
            .unwrap()
            .to_pem()
    };
    let ca = dir.path().join("bundle.pem");
    let cert = dir.path().join("leaf.pem");
    std::fs::write(&ca, bundle.to_pem()).unwrap();
    std::fs::write(&cert, pem(&chain[..1])).unwrap();
    let mut command = Command::new("openssl");
    command.args(["verify", "-x509_strict", "-CAfile"]).arg(&ca);
    if chain.len() > 1 {
        let untrusted = dir.path().join("untrusted.pem");
        std::fs::write(&untrusted, pem(&chain[1..])).unwrap();
        command.arg("-untrusted").arg(untrusted);
    }
    let out = command
        .arg(&cert)
        .output()
        .expect("openssl must be installed");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// An attested test agent: its SVID chain and key.
pub struct TestAgent {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: TestKey,
}

impl TestAgent {
    /// Attests with a fresh join token.
    pub async fn attest(server: &TestServer) -> Self {
        let token = server.join_token(Duration::from_secs(600)).await;
        Self::attest_with(server, &token).await.unwrap()
    }

    /// Attests with `token`.
    pub async fn attest_with(server: &TestServer, token: &str) -> Result<Self, tonic::Status> {
        let bundle = server.bundle().await;
        let mut client = node_client(server.node_addr, &bundle, None).await.unwrap();
        let key = TestKey::new();
        let resp = client
            .attest_agent(sigil_proto::node::AttestAgentRequest {
                join_token: token.to_owned(),
                csr: key.csr(),
            })
            .await?
            .into_inner();
        let svid = resp.svid.unwrap();
        Ok(Self {
            id: SpiffeId::new(&svid.spiffe_id).unwrap(),
            chain: certs(&svid.cert_chain),
            key,
        })
    }

    /// A node API client presenting this agent's SVID.
    pub async fn client(&self, server: &TestServer) -> NodeClient<Channel> {
        let bundle = server.bundle().await;
        node_client(
            server.node_addr,
            &bundle,
            Some((self.chain.clone(), self.key.private_key())),
        )
        .await
        .unwrap()
    }
}

/// A registration entry for the admin API.
pub fn entry(spiffe_id: &str, parent_id: &str, selectors: &[&str]) -> sigil_proto::admin::Entry {
    sigil_proto::admin::Entry {
        spiffe_id: spiffe_id.to_owned(),
        parent_id: parent_id.to_owned(),
        selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

/// Creates one entry through the admin API and returns it.
pub async fn create_entry(
    server: &TestServer,
    entry: sigil_proto::admin::Entry,
) -> Result<sigil_proto::admin::Entry, String> {
    let resp = server
        .admin()
        .await
        .create_entries(sigil_proto::admin::CreateEntriesRequest {
            entries: vec![entry],
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    match resp.results.into_iter().next().and_then(|r| r.result) {
        Some(sigil_proto::admin::entry_result::Result::Entry(e)) => Ok(e),
        Some(sigil_proto::admin::entry_result::Result::Error(e)) => Err(e.message),
        None => Err("no result".into()),
    }
}

/// Runs a daemon that must refuse to start: it has to exit, with failure, within 30 s (else it
/// is killed and the test fails). Returns its stderr.
pub fn refused(command: &mut Command) -> String {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the daemon started instead of refusing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "it exited 0: {stderr}");
    stderr
}

/// Every entry of the server, through the admin API's pages.
pub async fn all_entries(server: &TestServer) -> Vec<sigil_proto::admin::Entry> {
    let mut admin = server.admin().await;
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_entries(sigil_proto::admin::ListEntriesRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            return entries;
        }
        token = page.next_page_token;
    }
}

/// A `sigil-agent run` child attested to `server`, with its Workload API socket in a temp dir.
pub struct TestAgentProcess {
    dir: TempDir,
    trust_domain: String,
    child: Option<Child>,
    /// The servers it lists (`--server-address` each), in order.
    server_addrs: Vec<SocketAddr>,
    log: Arc<std::sync::Mutex<Vec<String>>>,
    /// Written to `agent.toml` and passed with `--config`, if any.
    config: Option<String>,
}

impl TestAgentProcess {
    /// Generates a join token, writes the bootstrap bundle, and starts the agent.
    pub async fn start(server: &TestServer) -> Self {
        Self::start_listing(server, &[server.node_addr]).await
    }

    /// As [`TestAgentProcess::start`] (token and bundle from `server`), listing `servers` in
    /// that order (several servers sharing one database).
    pub async fn start_listing(server: &TestServer, servers: &[SocketAddr]) -> Self {
        Self::start_configured(server, servers, None).await
    }

    /// As [`TestAgentProcess::start`], with `config` (TOML) as its configuration file; flags
    /// give the rest.
    pub async fn start_with_config(server: &TestServer, config: &str) -> Self {
        Self::start_configured(server, &[server.node_addr], Some(config.to_owned())).await
    }

    /// Starts an agent that attests without a join token (x509pop: `config` names the
    /// attestor and the host credentials), trusting `server`'s bundle on its first start.
    pub async fn start_without_token(server: &TestServer, config: &str) -> Self {
        let mut agent = Self::prepare(server, &[server.node_addr], Some(config.to_owned())).await;
        agent.spawn(None);
        agent
    }

    async fn start_configured(
        server: &TestServer,
        servers: &[SocketAddr],
        config: Option<String>,
    ) -> Self {
        let token = server.join_token(Duration::from_secs(600)).await;
        let mut agent = Self::prepare(server, servers, config).await;
        agent.spawn(Some(&token));
        agent
    }

    /// The agent's directory with the bootstrap bundle; not started.
    async fn prepare(server: &TestServer, servers: &[SocketAddr], config: Option<String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Readable by every uid, so unprivileged workloads can reach the socket.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("bootstrap.pem"),
            server.bundle().await.to_pem(),
        )
        .unwrap();
        Self {
            dir,
            trust_domain: server.trust_domain.clone(),
            child: None,
            server_addrs: servers.to_vec(),
            log: Arc::default(),
            config,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("public").join("api.sock")
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (at most `within`) until the agent's log passes `done`; else fails with `failure`
    /// and the log.
    pub async fn until_logged(&self, within: Duration, failure: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + within;
        while !done(&self.log_text()) {
            assert!(
                Instant::now() < deadline,
                "{failure}; agent log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A Workload API client on this agent's socket; a failure to connect panics with the
    /// agent's exit status (if it exited) and its log.
    pub async fn client(&self) -> sigil_proto::client::WorkloadApiClient {
        match sigil_proto::client::workload_api(self.socket()).await {
            Ok(client) => client,
            Err(e) => {
                // A zombie ("Z" in /proc/PID/stat) has exited and is not reaped yet.
                let state = self.child.as_ref().map(|c| {
                    std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default()
                });
                panic!(
                    "cannot reach the agent's socket: {e:?}; agent /proc stat: {state:?}; log:\n{}",
                    self.log_text()
                )
            }
        }
    }

    fn spawn(&mut self, token: Option<&str>) {
        let _ = std::fs::remove_file(self.socket());
        let mut cmd = Command::new(binary("sigil-agent"));
        cmd.arg("run")
            .args(["--trust-domain", self.trust_domain.as_str()]);
        if let Some(config) = &self.config {
            let path = self.dir.path().join("agent.toml");
            std::fs::write(&path, config).unwrap();
            cmd.arg("--config").arg(path);
        }
        for address in &self.server_addrs {
            cmd.arg("--server-address").arg(address.to_string());
        }
        cmd.arg("--trust-bundle")
            .arg(self.dir.path().join("bootstrap.pem"))
            .arg("--socket-path")
            .arg(self.socket())
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .env("SIGIL_LOG", "info,sigil_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(token) = token {
            cmd.arg("--join-token").arg(token);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket().exists() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}; log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent socket missing; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's SPIFFE ID, from its stored state.
    /// The agent's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn agent_id(&self) -> String {
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.dir.path().join("data/agent.json")).unwrap(),
        )
        .unwrap();
        state["spiffe_id"].as_str().unwrap().to_owned()
    }

    /// Restarts the agent without a join token (it must use its stored identity).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(None);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal to the agent and waits (at most `timeout`) for it to exit; returns the
    /// status and how long it took.
    /// Sends `signal` (`TERM`, ...) and returns at once; the process is reaped later.
    pub fn signal_nowait(&self, signal: &str) {
        send_signal(self.child.as_ref().expect("not running").id(), signal);
    }

    pub fn signal(&mut self, signal: &str, timeout: Duration) -> (ExitStatus, Duration) {
        let pid = self.child.as_ref().expect("agent not running").id();
        let start = Instant::now();
        send_signal(pid, signal);
        let status = self
            .wait_exit(timeout)
            .unwrap_or_else(|| panic!("agent did not exit within {timeout:?} of SIG{signal}"));
        (status, start.elapsed())
    }

    /// Waits for the agent to exit on its own (at most `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Starts an agent with `token` and expects it to exit on its own; returns its stderr.
    pub async fn expect_refusal(server: &TestServer, token: &str) -> (ExitStatus, String) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bootstrap.pem"),
            server.bundle().await.to_pem(),
        )
        .unwrap();
        let out = Command::new(binary("sigil-agent"))
            .arg("run")
            .args(["--trust-domain", TRUST_DOMAIN])
            .arg("--server-address")
            .arg(server.node_addr.to_string())
            .arg("--trust-bundle")
            .arg(dir.path().join("bootstrap.pem"))
            .arg("--socket-path")
            .arg(dir.path().join("api.sock"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--join-token")
            .arg(token)
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for TestAgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The NotAfter of a DER certificate.
pub fn not_after(der: &[u8]) -> std::time::SystemTime {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    std::time::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap())
}

/// What a finished CLI run printed.
#[derive(Debug)]
pub struct CliRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// The stdout as one JSON document (for `--output json` commands that print one).
    pub fn json(&self) -> serde_json::Value {
        assert!(
            self.status.success(),
            "command failed ({}): {}",
            self.status,
            self.stderr
        );
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document: {e}\n{}", self.stdout))
    }

    /// The stdout as JSON lines.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        assert!(self.status.success(), "command failed: {}", self.stderr);
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Runs `sigil-server ARGS --admin-socket SOCKET` as the test's own uid.
pub fn server_cli(server: &TestServer, args: &[&str]) -> CliRun {
    server_cli_as(server, None, args)
}

/// Runs `sigil-server ARGS --admin-socket SOCKET` as `uid` (and gid) when given, from a copy
/// of the binary every uid can run. Switching uid needs root.
pub fn server_cli_as(server: &TestServer, uid: Option<u32>, args: &[&str]) -> CliRun {
    use std::os::unix::process::CommandExt as _;
    let mut command = match uid {
        None => Command::new(binary("sigil-server")),
        Some(uid) => {
            let dir = server.dir.path().join(format!("cli-{uid}"));
            let bin = dir.join("sigil-server");
            if !bin.exists() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::copy(binary("sigil-server"), &bin).unwrap();
                for path in [&bin, &dir] {
                    std::fs::set_permissions(
                        path,
                        std::os::unix::fs::PermissionsExt::from_mode(0o755),
                    )
                    .unwrap();
                }
                std::fs::set_permissions(
                    server.dir.path(),
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )
                .unwrap();
            }
            let mut c = Command::new(bin);
            c.uid(uid).gid(uid).current_dir("/");
            c
        }
    };
    command
        .args(args)
        .arg("--admin-socket")
        .arg(server.admin_socket())
        .env_remove("SIGIL_ADMIN_SOCKET")
        .stdin(Stdio::null());
    let out = retry_busy(|| command.output());
    CliRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `make()` until it does not fail with ETXTBSY: an executable this test process just
/// copied may still be open for writing in a child another test thread forked meanwhile (until
/// that child execs).
pub fn retry_busy<T>(mut make: impl FnMut() -> std::io::Result<T>) -> T {
    for _ in 0..100 {
        match make() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
    panic!("the executable stayed busy");
}

/// True when the tests run as root (needed to run the CLI as another admin uid).
pub fn is_root() -> bool {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0
}

/// The uid the tests run as.
pub fn my_uid() -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap())
}

/// Opens a session for the test's own uid on `agent` with `sigil-server session open ...
/// --output json` plus `extra` flags, and returns the printed session.
pub fn open_session(
    server: &TestServer,
    agent: &TestAgentProcess,
    spiffe_id: &str,
    ttl: &str,
    extra: &[&str],
) -> serde_json::Value {
    let me = format!("unix:uid:{}", my_uid());
    let agent_id = agent.agent_id();
    let mut args = vec![
        "session",
        "open",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        &agent_id,
        "--selector",
        &me,
        "--ticket",
        "CHG-123",
        "--reason",
        "end-to-end test",
        "--ttl",
        ttl,
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    server_cli(server, &args).json()
}

/// The SPIFFE IDs in an X509-SVID response.
pub fn svid_ids(msg: &sigil_proto::workload::X509svidResponse) -> Vec<String> {
    msg.svids.iter().map(|s| s.spiffe_id.clone()).collect()
}

/// Waits (at most `timeout`) for a message of an X509-SVID stream that passes `wanted`, and
/// returns it; fails on a stream error or end.
pub async fn next_x509_until(
    stream: &mut tonic::Streaming<sigil_proto::workload::X509svidResponse>,
    timeout: Duration,
    wanted: impl Fn(&sigil_proto::workload::X509svidResponse) -> bool,
) -> Result<sigil_proto::workload::X509svidResponse, tonic::Status> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no matching message in time"))??
            .ok_or_else(|| tonic::Status::aborted("stream ended"))?;
        if wanted(&msg) {
            return Ok(msg);
        }
    }
}

/// Opens a `FetchX509SVID` stream on `agent`, retrying (at most 10 s) while the workload has
/// no identity yet or the first message does not pass `wanted`.
pub async fn x509_stream_with(
    agent: &TestAgentProcess,
    wanted: impl Fn(&sigil_proto::workload::X509svidResponse) -> bool,
) -> (
    tonic::Streaming<sigil_proto::workload::X509svidResponse>,
    sigil_proto::workload::X509svidResponse,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = agent.client().await;
        match client
            .fetch_x509svid(sigil_proto::workload::X509svidRequest {})
            .await
        {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                if let Ok(Some(msg)) = stream.message().await
                    && wanted(&msg)
                {
                    return (stream, msg);
                }
            }
            Err(status) if status.code() == tonic::Code::PermissionDenied => {}
            Err(status) => panic!("{status:?}\nagent log:\n{}", agent.log_text()),
        }
        assert!(
            Instant::now() < deadline,
            "no matching X509-SVID response within 10 s; agent log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The serial (lowercase hex) and NotAfter of the leaf at the start of a DER chain.
pub fn leaf_serial(chain_der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(chain_der).unwrap();
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The (serial, reasonCode) of each entry of a DER CRL; the code is RFC 5280's number
/// (5: cessationOfOperation, 9: privilegeWithdrawn), `None` without the extension.
pub fn crl_reasons(der: &[u8]) -> Vec<(String, Option<u8>)> {
    use x509_parser::prelude::FromDer as _;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der).unwrap();
    crl.iter_revoked_certificates()
        .map(|r| {
            let serial = r.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
            (serial, r.reason_code().map(|(_, code)| code.0))
        })
        .collect()
}

/// The serials listed in a DER CRL.
pub fn crl_serials(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::FromDer as _;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der).unwrap();
    crl.iter_revoked_certificates()
        .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
        .collect()
}

/// Creates entries one by one until `stop` says so, recording each acknowledged one (id and
/// revision) and counting refusals (the database was down).
pub async fn write_entries_until(
    server: &TestServer,
    prefix: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<(String, u64)>, usize) {
    let mut admin = server.admin().await;
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0.. {
        if *stop.borrow() {
            break;
        }
        let e = entry(
            &format!("spiffe://example.org/{prefix}/{i}"),
            "spiffe://example.org/sigil/agent/join_token/pg",
            &["unix:uid:1"],
        );
        match admin
            .create_entries(sigil_proto::admin::CreateEntriesRequest { entries: vec![e] })
            .await
            .map(|r| r.into_inner().results[0].result.clone())
        {
            Ok(Some(sigil_proto::admin::entry_result::Result::Entry(e))) => {
                acked.push((e.id, e.revision));
            }
            Ok(_) | Err(_) => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    (acked, refused)
}

/// The address a daemon's log says its HTTP listener serving `what` (`metrics` or `health`)
/// is bound to (the `http endpoints listening` line, in the JSON or the text log format).
pub fn http_endpoint(log: &str, what: &str) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            // The text format: `... http endpoints listening address=A metrics=true ...`
            // (tracing writes the fields in order, the address first: a line cut short while
            // being written cannot give a cut-off address with `{what}=true` after it).
            let fields = line.split_once("http endpoints listening ")?.1;
            let mut words = fields.split(' ');
            return words
                .clone()
                .any(|word| word == format!("{what}=true"))
                .then(|| words.find_map(|word| word.strip_prefix("address=")?.parse().ok()))?;
        };
        let fields = &v["fields"];
        (fields["message"] == "http endpoints listening" && fields[what] == true)
            .then(|| fields["address"].as_str()?.parse().ok())?
    })
}

/// `GET path` over HTTP/1.1 to `address`: the status code and the body, or the I/O error
/// (connection refused once the daemon is gone).
pub fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `kill -SIGNAL PID`, which must succeed.
pub fn send_signal(pid: u32, signal: &str) {
    assert!(
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success(),
        "kill -{signal} {pid} failed"
    );
}

/// `SIGIL_PYTHON` (default `python3`) when it can `import` every module of `imports`
/// (`"grpc, grpc_tools"`), else `None` after one line saying what `install` would add; with
/// `require_env` set to `1` (CI sets it), a missing module fails the test instead.
pub fn python_with(imports: &str, require_env: &str, install: &str) -> Option<String> {
    let python = std::env::var("SIGIL_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {imports}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var(require_env).as_deref() != Ok("1"),
        "{require_env}=1 but {python} cannot import {imports} (pip install {install})"
    );
    #[allow(clippy::print_stderr, reason = "the skip line")]
    {
        eprintln!("SKIPPED: {python} cannot import {imports} (pip install {install})");
    }
    None
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr on failure.
pub fn openssl_in(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed P-256 CA made with openssl, as docs/pki.md shows: `NAME.pem` and `NAME.key`
/// (PKCS#8, mode 0600) in `dir`, valid for two days.
pub fn openssl_ca(dir: &std::path::Path, name: &str) {
    openssl_in(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    std::fs::set_permissions(
        dir.join(format!("{name}.key")),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the `mtls-server` example on `socket` (a Workload API) listening on a free loopback
/// port, with `args` after `--listen`; returns it and the address it printed.
pub fn mtls_server(socket: &Path, args: &[&str]) -> (KillOnDrop, String) {
    let mut server = KillOnDrop(
        Command::new(binary("mtls-server"))
            .arg("--socket-path")
            .arg(socket)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line of mtls-server: {line:?}"))
        .to_owned();
    (server, address)
}

/// The server's SPIFFE bundle (JSON), written to `dir/TRUST_DOMAIN.json`.
pub async fn bundle_file(server: &TestServer, dir: &Path) -> std::path::PathBuf {
    let bundle = server
        .admin()
        .await
        .get_bundle(sigil_proto::admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let path = dir.join(format!("{}.json", server.trust_domain));
    std::fs::write(&path, bundle.spiffe_bundle).unwrap();
    path
}

/// The URL of `server`'s bundle endpoint (`bundle_endpoint_address` must be set).
pub fn endpoint_url(server: &TestServer) -> String {
    format!("https://{}/", server.bundle_endpoint())
}

/// `federation create` on `from` for `to`'s trust domain over https_spiffe, bootstrapped with
/// `to`'s bundle; `endpoint_id` is what the endpoint's SVID must be.
pub async fn federate(from: &TestServer, to: &TestServer, endpoint_id: &str, dir: &Path) -> CliRun {
    let bootstrap = bundle_file(to, dir).await;
    server_cli(
        from,
        &[
            "federation",
            "create",
            "--id",
            &to.trust_domain,
            "--bundle-endpoint-url",
            &endpoint_url(to),
            "--profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            endpoint_id,
            "--trust-bundle",
            bootstrap.to_str().unwrap(),
            "--trust-bundle-format",
            "spiffe",
            "--output",
            "json",
        ],
    )
}

/// A TCP proxy on loopback that can cut every connection and refuse new ones (a server cut
/// from its database, an agent cut from its server), then let them through again.
pub struct CuttableProxy {
    /// Where it listens.
    pub address: std::net::SocketAddr,
    /// Under one lock, so that no connection accepted during a cut outlives it.
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    cut: bool,
    connections: Vec<tokio::task::JoinHandle<()>>,
}

impl CuttableProxy {
    /// Starts the proxy to `upstream`.
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(std::sync::Mutex::new(ProxyState::default()));
        let accept = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let mut state = state.lock().unwrap();
                    if state.cut {
                        continue; // dropped: the connection is refused
                    }
                    state.connections.retain(|task| !task.is_finished());
                    state.connections.push(tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    }));
                }
            }
        });
        Self {
            address,
            state,
            accept,
        }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.cut = true;
        for task in state.connections.drain(..) {
            task.abort();
        }
    }

    /// Lets new connections through again.
    pub fn restore(&self) {
        self.state.lock().unwrap().cut = false;
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Waits (10 s at most) for the log of a daemon to name its `what` listener.
pub fn logged_endpoint(log: impl Fn() -> String, what: &str) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(address) = http_endpoint(&log(), what) {
            return address;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} listener logged:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (`within` at most) until the unlabelled sample `name` at `address` reads `value`.
pub async fn metric_becomes(address: SocketAddr, name: &str, value: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = metric_sample(address, name);
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {now}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the unlabelled sample `name` in the metrics text at `address`.
pub fn metric_sample(address: SocketAddr, name: &str) -> f64 {
    let (status, body) = http_get(address, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} sample in:\n{body}"))
}
