//! Server configuration: a TOML file, overridden by command-line flags, turned into a typed
//! [`ServerConfig`] that reports every problem at once.
//!
//! Every key, its meaning and its default is documented on [`FileConfig`] and in
//! `examples/config/server.toml` (which a test parses, so the sample cannot drift).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::store::DEFAULT_SERVER_ID;
use sigil_core::lifetime::max_svid_ttl;
use sigil_core::{HumanDuration, SpiffeId, TrustDomain, parse_duration};

/// Default address of the agent-facing API.
pub(crate) const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0:8081";
/// Default data directory.
pub(crate) const DEFAULT_DATA_DIR: &str = "/tmp/sigil-server/data";
/// Default path of the admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/tmp/sigil-server/private/admin.sock";
/// Default lifetime of the signing authorities.
pub(crate) const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default X509-SVID lifetime.
pub(crate) const DEFAULT_X509_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default JWT-SVID lifetime.
pub(crate) const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(300);
/// Default size of the store's page cache, in MiB. Small because the entries are held in
/// the entry cache apart from it: with 100,000 entries, 16 MiB leaves the server at about
/// 260-300 MiB after creating them all at once, 128 MiB at about 390 MiB, for about 30 % faster
/// bulk creation (BENCHMARKS.md, "The store's page cache").
pub(crate) const DEFAULT_STORE_CACHE_MIB: u64 = 16;
/// The largest store page cache accepted, in MiB (1 TiB).
pub(crate) const MAX_STORE_CACHE_MIB: u64 = 1024 * 1024;

/// The configuration file, as written. Every field is optional; the defaults are those below.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The trust domain this server is the authority for, e.g. `example.org`. Required (here or
    /// with `--trust-domain`).
    pub trust_domain: Option<String>,
    /// Address (IP:PORT) of the agent-facing API (TCP, mTLS). Default `0.0.0.0:8081`.
    pub bind_address: Option<String>,
    /// Directory for the store and the CA keys (mode 0700). Default `/tmp/sigil-server/data`;
    /// set a persistent path in production.
    pub data_dir: Option<String>,
    /// Path of the admin Unix socket used by the CLI. Default
    /// `/tmp/sigil-server/private/admin.sock`.
    pub admin_socket: Option<String>,
    /// Uids allowed to call the admin socket, besides uid 0 (always allowed). Default `[]`.
    pub admin_uids: Option<Vec<u32>>,
    /// Lifetime of each signing authority (X.509 CA and JWT key). Default `24h`. Every SVID TTL
    /// must be at most a sixth of it.
    pub ca_ttl: Option<String>,
    /// Default X509-SVID lifetime for workload entries without their own. Default `1h`.
    pub default_x509_svid_ttl: Option<String>,
    /// Default JWT-SVID lifetime. Default `5m`.
    pub default_jwt_svid_ttl: Option<String>,
    /// Lifetime of agent X509-SVIDs. Default: `default_x509_svid_ttl`.
    pub agent_svid_ttl: Option<String>,
    /// Value of the `iss` claim in JWT-SVIDs. Default: no `iss` claim.
    pub jwt_issuer: Option<String>,
    /// The longest privileged session (`session open --ttl`). Default `8h`.
    pub max_session_ttl: Option<String>,
    /// Default lifetime of each SVID issued under a privileged session. Default `5m`; at most
    /// `ca_ttl / 6`.
    pub session_svid_ttl: Option<String>,
    /// Whether every privileged session needs a second admin's approval. Default `false`.
    pub require_session_approval: Option<bool>,
    /// SPIFFE ID prefixes, matched on whole path segments, whose IDs are granted only through
    /// approved privileged sessions: entries, `x509 mint`, `jwt mint` and join token aliases
    /// naming them are refused, every session for them needs a second admin's approval, and a
    /// server that finds an entry under one refuses to start. Default `[]`.
    pub session_only_ids: Option<Vec<String>>,
    /// Uids that may approve sessions. Default `[]`: any admin other than the requester.
    pub session_approver_uids: Option<Vec<u32>>,
    /// SPIFFE IDs (workload IDs of this trust domain) that may record events in the audit
    /// chain through the audit ingest API (`sigil.audit.v1` on `bind_address`): the brokers.
    /// Only `broker.*` actions are accepted. Default `[]`: the API refuses everyone.
    pub audit_sources: Option<Vec<String>>,
    /// The store's page cache, in MiB (at least 1). Default `16`. The entries themselves are
    /// held in memory apart from it (the entry cache), so this bounds the rest: audit records,
    /// nodes, the change feed. sled only (refused with `store = "postgres"`).
    pub store_cache_mib: Option<u64>,
    /// The store backend: `sled` (embedded, in `data_dir`; one server) or `postgres` (a
    /// PostgreSQL 14+ database, which several servers can share). Default `sled`.
    pub store: Option<String>,
    /// With `store = "postgres"` (required then): the database, as a libpq connection URL
    /// (`postgresql://sigil@db.example.org:5432/sigil`) or `key=value` string
    /// (`host=db.example.org user=sigil dbname=sigil`). A password in it is refused: it goes
    /// in `postgres_password_file`, or in the `PGPASSWORD` environment variable.
    pub postgres_url: Option<String>,
    /// File holding the database password (one line; mode 0600 or stricter, else refused).
    /// Default: `PGPASSWORD` from the environment, else no password.
    pub postgres_password_file: Option<String>,
    /// PEM file of the CA certificates that may sign the database's certificate. Set, every
    /// connection uses TLS (rustls) and verifies the certificate and the host name; unset,
    /// connections are plain TCP or a Unix socket (and `sslmode=require` is refused).
    pub postgres_ca_file: Option<String>,
    /// Most connections this server opens to the database. Default `16`; 2 to 1000.
    pub postgres_pool_size: Option<u64>,
    /// This server's name among the servers sharing one database: 1 to 63 characters of
    /// `a-z`, `0-9`, `-`, `_` and `.`, starting with a letter or digit (a host name fits).
    /// Required with `store = "postgres"`; with sled it is `default` (one server). It names
    /// the server's CA journal and audit chain in the store, so keep it across restarts; a
    /// second live server with the same name is refused at start.
    pub server_id: Option<String>,
    /// How long the server keeps authorizing agents from its entry cache after the store last
    /// answered (a database that is down or cut off); after that it authorizes nothing, and
    /// its health check fails, until the store answers again. `0s` refuses at once. Writes
    /// (entries, sessions, audit records) need the store whatever this says. Default `30s`;
    /// at most `1h`.
    pub max_store_staleness: Option<String>,
    /// The audit keys of the other servers sharing the store, as SHA-256 fingerprints (64
    /// lowercase hex digits, as `audit verify` prints them on each server). A chain of another
    /// server is verified against the key pinned here or, when none matches, against the key
    /// this server saw first for that chain (recorded in `data_dir/keys/audit_peers.json`).
    /// Default `[]`.
    pub audit_peer_keys: Option<Vec<String>>,
    /// Address (IP:PORT) of an HTTP listener serving Prometheus metrics at `/metrics`
    /// (OpenMetrics text; see docs/operations.md). Default: none (off). Keep it on loopback or
    /// a management network: it is plain HTTP without authentication.
    pub metrics_address: Option<String>,
    /// Address (IP:PORT) of an HTTP listener serving `/live` and `/ready` (200 or 503 with the
    /// reason). May be the same as `metrics_address`. Default: none (off).
    pub health_address: Option<String>,
    /// PEM file of the CA certificates whose host certificates agents may attest with
    /// (`node_attestor = "x509pop"` on the agent). Default: none (x509pop off; agents attest
    /// with join tokens only). Every host certificate these CAs sign can attest an agent.
    pub x509pop_ca_bundle_path: Option<String>,
    /// How x509pop agents are named, after `spiffe://TD/sigil/agent/`: literal path text and
    /// the placeholders `{fingerprint}` (SHA-256 of the host certificate, hex), `{serial}`,
    /// `{subject_cn}` and `{san_dns}` (its first DNS name). Default `x509pop/{fingerprint}`.
    pub x509pop_agent_path_template: Option<String>,
    /// Puts Sigil's X.509 authorities under an enterprise CA: `disk` (the CA's certificate and
    /// key are files). Each authority Sigil rotates is then an intermediate of that CA, SVID
    /// chains carry the intermediates, and the trust bundle is the upstream root. Default:
    /// none (self-signed roots). See docs/pki.md.
    pub upstream_authority: Option<String>,
    /// With `upstream_authority = "disk"`: PEM file of the upstream CA's certificate, then any
    /// CAs between it and its root, the root last.
    pub upstream_cert_path: Option<String>,
    /// With `upstream_authority = "disk"`: PEM file of the upstream CA's private key (PKCS#8),
    /// mode 0600 or stricter.
    pub upstream_key_path: Option<String>,
    /// Where the trust domain's keys (X.509 authorities, JWT keys, the audit key) live:
    /// `disk` (PKCS#8 files in `data_dir/keys`, mode 0600) or `pkcs11` (generated in a PKCS#11
    /// token, an HSM, and never leaving it). Default `disk`. See docs/pki.md.
    pub key_manager: Option<String>,
    /// With `key_manager = "pkcs11"`: the PKCS#11 module (shared library) of the token, e.g.
    /// `/usr/lib/softhsm/libsofthsm2.so`.
    pub pkcs11_module: Option<String>,
    /// With `key_manager = "pkcs11"`: the label of the token to use.
    pub pkcs11_token_label: Option<String>,
    /// With `key_manager = "pkcs11"`: a file holding the token's user PIN (one line; mode
    /// 0600 or stricter).
    pub pkcs11_pin_file: Option<String>,
    /// Address (IP:PORT) of the bundle endpoint: HTTPS serving this trust domain's SPIFFE
    /// bundle at `/` to other trust domains' servers (SPIFFE Federation). Default: none (off).
    /// See docs/federation.md.
    pub bundle_endpoint_address: Option<String>,
    /// How the bundle endpoint authenticates itself: `https_spiffe` (the server's own
    /// X509-SVID, `spiffe://TD/sigil/server`) or `https_web` (a Web PKI certificate from
    /// `bundle_endpoint_web_cert_path`). Default `https_spiffe`.
    pub bundle_endpoint_profile: Option<String>,
    /// The `spiffe_refresh_hint` the endpoint publishes: how often other trust domains should
    /// fetch the bundle. Default `5m`; at least `1s`, at most `1h`.
    pub bundle_endpoint_refresh_hint: Option<String>,
    /// With `bundle_endpoint_profile = "https_web"`: PEM file of the certificate chain
    /// (leaf first). Read again when it changes.
    pub bundle_endpoint_web_cert_path: Option<String>,
    /// With `bundle_endpoint_profile = "https_web"`: PEM file of its private key (PKCS#8,
    /// mode 0600 or stricter). Read again when it changes.
    pub bundle_endpoint_web_key_path: Option<String>,
    /// The shortest interval between two fetches of a federated trust domain's bundle,
    /// whatever its refresh hint says (the longest is 5 minutes). Default `30s`; `1s` to `5m`.
    pub federation_min_poll: Option<String>,
    /// Log level: `error`, `warn`, `info`, `debug` or `trace`. Default `info`.
    pub log_level: Option<String>,
    /// Log format: `text` or `json`. Default `text`.
    pub log_format: Option<String>,
}

/// The keys [`FileConfig`] accepts, for reporting every unknown key at once.
const KNOWN_KEYS: &[&str] = &[
    "trust_domain",
    "bind_address",
    "data_dir",
    "admin_socket",
    "admin_uids",
    "ca_ttl",
    "default_x509_svid_ttl",
    "default_jwt_svid_ttl",
    "agent_svid_ttl",
    "jwt_issuer",
    "max_session_ttl",
    "session_svid_ttl",
    "require_session_approval",
    "session_only_ids",
    "session_approver_uids",
    "audit_sources",
    "store_cache_mib",
    "store",
    "postgres_url",
    "postgres_password_file",
    "postgres_ca_file",
    "postgres_pool_size",
    "server_id",
    "max_store_staleness",
    "audit_peer_keys",
    "metrics_address",
    "health_address",
    "x509pop_ca_bundle_path",
    "x509pop_agent_path_template",
    "upstream_authority",
    "upstream_cert_path",
    "upstream_key_path",
    "key_manager",
    "pkcs11_module",
    "pkcs11_token_label",
    "pkcs11_pin_file",
    "bundle_endpoint_address",
    "bundle_endpoint_profile",
    "bundle_endpoint_refresh_hint",
    "bundle_endpoint_web_cert_path",
    "bundle_endpoint_web_key_path",
    "federation_min_poll",
    "log_level",
    "log_format",
];

/// Command-line values that override the file (each `None` when the flag was not given).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Overrides {
    /// `--trust-domain`.
    pub trust_domain: Option<String>,
    /// `--bind-address`.
    pub bind_address: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<String>,
    /// `--admin-socket`.
    pub admin_socket: Option<String>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--log-format`.
    pub log_format: Option<String>,
    /// `--session-only-id`, each added to the file's `session_only_ids`.
    pub session_only_ids: Vec<String>,
}

/// The validated server configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Address of the agent-facing API.
    pub bind_address: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Uids allowed on the admin socket besides 0.
    pub admin_uids: Vec<u32>,
    /// Signing authority lifetime.
    pub ca_ttl: Duration,
    /// Default workload X509-SVID TTL.
    pub default_x509_svid_ttl: Duration,
    /// Default JWT-SVID TTL.
    pub default_jwt_svid_ttl: Duration,
    /// Agent X509-SVID TTL.
    pub agent_svid_ttl: Duration,
    /// `iss` claim for JWT-SVIDs.
    pub jwt_issuer: Option<String>,
    /// The longest privileged session.
    pub max_session_ttl: Duration,
    /// Default lifetime of SVIDs issued under a session.
    pub session_svid_ttl: Duration,
    /// Whether every session needs a second admin's approval.
    pub require_session_approval: bool,
    /// The ID prefixes granted only through approved sessions.
    pub session_only_ids: Vec<SpiffeId>,
    /// The uids that may approve sessions (empty: any admin but the requester).
    pub session_approver_uids: Vec<u32>,
    /// The SPIFFE IDs that may record events through the audit ingest API.
    pub audit_sources: Vec<SpiffeId>,
    /// The store's page cache, in bytes (sled).
    pub store_cache_bytes: u64,
    /// The PostgreSQL store, when `store = "postgres"`; `None`: sled in `data_dir`.
    pub postgres: Option<PostgresConfig>,
    /// This server's name among those sharing the store (`default` with sled).
    pub server_id: String,
    /// How long the entry cache authorizes after the store last answered.
    pub max_store_staleness: Duration,
    /// Fingerprints of the other servers' audit keys.
    pub audit_peer_keys: std::collections::BTreeSet<String>,
    /// The metrics listener, if any.
    pub metrics_address: Option<SocketAddr>,
    /// The health listener, if any.
    pub health_address: Option<SocketAddr>,
    /// x509pop node attestation, when configured.
    pub x509pop: Option<X509PopConfig>,
    /// The upstream CA's files, when `upstream_authority = "disk"`.
    pub upstream: Option<UpstreamConfig>,
    /// The PKCS#11 token, when `key_manager = "pkcs11"` (else keys are files).
    pub pkcs11: Option<Pkcs11Config>,
    /// The bundle endpoint, when `bundle_endpoint_address` is set.
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// The shortest interval between two fetches of a federated bundle.
    pub federation_min_poll: Duration,
    /// Log level.
    pub log_level: LogLevel,
    /// Log format.
    pub log_format: LogFormat,
}

/// Where the PostgreSQL store is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// The connection string (never holding a password).
    pub url: String,
    /// The file holding the password, if any.
    pub password_file: Option<PathBuf>,
    /// The CA certificates for TLS, if any.
    pub ca_file: Option<PathBuf>,
    /// Most connections in the pool.
    pub pool_size: usize,
}

/// x509pop node attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509PopConfig {
    /// The CA certificates host certificates must chain to (PEM).
    pub ca_bundle_path: PathBuf,
    /// The agent path template (checked).
    pub agent_path_template: Option<String>,
}

/// `key_manager = "pkcs11"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The module.
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// The file holding the user PIN.
    pub pin_file: PathBuf,
}

/// The bundle endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpointConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// How it authenticates itself.
    pub profile: BundleEndpointProfile,
    /// The `spiffe_refresh_hint` it publishes.
    pub refresh_hint: Duration,
}

/// `bundle_endpoint_profile`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleEndpointProfile {
    /// The server's own X509-SVID.
    HttpsSpiffe,
    /// A Web PKI certificate and key from files, read again when they change.
    HttpsWeb {
        /// The certificate chain (PEM).
        cert_path: PathBuf,
        /// The key (PEM, PKCS#8).
        key_path: PathBuf,
    },
}

/// Default `bundle_endpoint_refresh_hint` (SPIRE's too).
pub(crate) const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);

/// Default `federation_min_poll`.
pub(crate) const DEFAULT_FEDERATION_MIN_POLL: Duration = Duration::from_secs(30);

/// The longest interval between two fetches of a federated bundle.
pub(crate) const MAX_FEDERATION_POLL: Duration = Duration::from_secs(300);

/// `upstream_authority = "disk"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The upstream CA's certificate and chain (PEM).
    pub cert_path: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key_path: PathBuf,
}

/// Default `max_store_staleness`.
pub(crate) const DEFAULT_MAX_STORE_STALENESS: Duration = Duration::from_secs(30);

/// The largest `max_store_staleness`.
const MAX_MAX_STORE_STALENESS: Duration = Duration::from_secs(3600);

/// Default `postgres_pool_size`.
pub(crate) const DEFAULT_POSTGRES_POOL_SIZE: u64 = 16;

pub use sigil_daemon::{LogFormat, LogLevel};

pub use sigil_daemon::config::{ConfigError, ConfigProblem};
use sigil_daemon::config::{Problems, parse_file, telemetry_addresses};

// === impl ServerConfig ===

impl ServerConfig {
    /// Builds the configuration from the text of the TOML file (if any) and the command-line
    /// overrides, reporting every problem at once.
    pub fn from_sources(file: Option<&str>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut problems = Problems::default();
        let file = match file {
            Some(text) => parse_file(text, KNOWN_KEYS, &mut problems),
            None => FileConfig::default(),
        };
        let pick = |flag: Option<String>, file: Option<String>| flag.or(file);

        let postgres = postgres_config(&file, &mut problems);
        let server_id = server_id(&file, &mut problems);
        let x509pop = x509pop_config(&file, &mut problems);
        let upstream = upstream_config(&file, &mut problems);
        let pkcs11 = pkcs11_config(&file, &mut problems);
        let bundle_endpoint = bundle_endpoint_config(&file, &mut problems);
        let federation_min_poll = bounded_duration(
            &mut problems,
            "federation_min_poll",
            file.federation_min_poll.as_deref(),
            DEFAULT_FEDERATION_MIN_POLL,
            (Duration::from_secs(1), MAX_FEDERATION_POLL),
        );
        let trust_domain = match pick(overrides.trust_domain, file.trust_domain) {
            Some(td) => problems.check("trust_domain", TrustDomain::new(&td)),
            None => {
                problems.push(
                    "trust_domain",
                    "is required (set it in the file or with --trust-domain)",
                );
                None
            }
        };
        let bind_address = problems.check(
            "bind_address",
            pick(overrides.bind_address, file.bind_address)
                .as_deref()
                .unwrap_or(DEFAULT_BIND_ADDRESS)
                .parse::<SocketAddr>()
                .map_err(|e| format!("{e} (write it as IP:PORT, e.g. 0.0.0.0:8081)")),
        );
        let data_dir = path_value(
            &mut problems,
            "data_dir",
            pick(overrides.data_dir, file.data_dir),
            DEFAULT_DATA_DIR,
        );
        let admin_socket = path_value(
            &mut problems,
            "admin_socket",
            pick(overrides.admin_socket, file.admin_socket),
            DEFAULT_ADMIN_SOCKET,
        );
        let ca_ttl = duration_value(&mut problems, "ca_ttl", file.ca_ttl, DEFAULT_CA_TTL);
        let x509_ttl = duration_value(
            &mut problems,
            "default_x509_svid_ttl",
            file.default_x509_svid_ttl,
            DEFAULT_X509_SVID_TTL,
        );
        let jwt_ttl = duration_value(
            &mut problems,
            "default_jwt_svid_ttl",
            file.default_jwt_svid_ttl,
            DEFAULT_JWT_SVID_TTL,
        );
        let agent_ttl = match file.agent_svid_ttl {
            Some(text) => duration_value(
                &mut problems,
                "agent_svid_ttl",
                Some(text),
                DEFAULT_X509_SVID_TTL,
            ),
            None => x509_ttl,
        };
        let max_session_ttl = duration_value(
            &mut problems,
            "max_session_ttl",
            file.max_session_ttl,
            crate::policy::DEFAULT_MAX_SESSION_TTL,
        );
        // Left unset, the session SVID TTL follows a short ca_ttl down (test configurations
        // with ca_ttl = "1m" stay valid); set explicitly, it is checked like the others.
        let session_svid_default = ca_ttl.map_or(crate::policy::DEFAULT_SESSION_SVID_TTL, |ca| {
            crate::policy::DEFAULT_SESSION_SVID_TTL.min(max_svid_ttl(ca))
        });
        let session_svid_ttl = duration_value(
            &mut problems,
            "session_svid_ttl",
            file.session_svid_ttl,
            session_svid_default,
        );
        if let (Some(max), Some(svid)) = (max_session_ttl, session_svid_ttl)
            && svid >= max
        {
            problems.push(
                "session_svid_ttl",
                format!(
                    "{} must be shorter than max_session_ttl ({})",
                    HumanDuration(svid),
                    HumanDuration(max)
                ),
            );
        }
        if let Some(ca_ttl) = ca_ttl {
            let limit = max_svid_ttl(ca_ttl);
            for (key, ttl) in [
                ("default_x509_svid_ttl", x509_ttl),
                ("default_jwt_svid_ttl", jwt_ttl),
                ("agent_svid_ttl", agent_ttl),
                ("session_svid_ttl", session_svid_ttl),
            ] {
                if let Some(ttl) = ttl
                    && ttl > limit
                {
                    problems.push(
                            key,
                            format!(
                                "{} is longer than ca_ttl / 6 = {} (ca_ttl is {}): an authority signs for 5/6 of its \
                                 life and nothing it signs may outlive it; lower the TTL or raise ca_ttl to at least {}",
                                HumanDuration(ttl),
                                HumanDuration(limit),
                                HumanDuration(ca_ttl),
                                HumanDuration(ttl * 6),
                            ),
                        );
                }
            }
        }
        let jwt_issuer = match file.jwt_issuer {
            Some(issuer) if issuer.trim().is_empty() => {
                problems.push(
                    "jwt_issuer",
                    "cannot be empty (leave the key out for no iss claim)",
                );
                None
            }
            other => other,
        };
        let session_only_ids = workload_ids(
            "session_only_ids",
            file.session_only_ids
                .unwrap_or_default()
                .into_iter()
                .chain(overrides.session_only_ids),
            trust_domain.as_ref(),
            &mut problems,
        );
        let audit_sources = workload_ids(
            "audit_sources",
            file.audit_sources.unwrap_or_default(),
            trust_domain.as_ref(),
            &mut problems,
        );
        let store_cache_mib = file.store_cache_mib.unwrap_or(DEFAULT_STORE_CACHE_MIB);
        if !(1..=MAX_STORE_CACHE_MIB).contains(&store_cache_mib) {
            problems.push(
                "store_cache_mib",
                format!("{store_cache_mib} is out of range: 1 to {MAX_STORE_CACHE_MIB} (MiB)"),
            );
        }
        let log_level = problems.check(
            "log_level",
            pick(overrides.log_level, file.log_level)
                .as_deref()
                .unwrap_or("info")
                .parse::<LogLevel>(),
        );
        let log_format = problems.check(
            "log_format",
            pick(overrides.log_format, file.log_format)
                .as_deref()
                .unwrap_or("text")
                .parse::<LogFormat>(),
        );

        let max_store_staleness = match file.max_store_staleness.as_deref() {
            None => DEFAULT_MAX_STORE_STALENESS,
            Some(text) => match parse_duration(text) {
                Ok(d) if d <= MAX_MAX_STORE_STALENESS => d,
                Ok(d) => {
                    problems.push(
                        "max_store_staleness",
                        format!("{} is out of range: 0s to 1h", HumanDuration(d)),
                    );
                    DEFAULT_MAX_STORE_STALENESS
                }
                Err(e) => {
                    problems.push("max_store_staleness", e.to_string());
                    DEFAULT_MAX_STORE_STALENESS
                }
            },
        };

        let (metrics_address, health_address) = telemetry_addresses(
            &mut problems,
            file.metrics_address.as_deref(),
            file.health_address.as_deref(),
        );

        let mut audit_peer_keys = std::collections::BTreeSet::new();
        for key in file.audit_peer_keys.unwrap_or_default() {
            if key.len() == 64
                && key
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                audit_peer_keys.insert(key);
            } else {
                problems.push(
                    "audit_peer_keys",
                    format!(
                        "{key:?} is not a key fingerprint: 64 lowercase hex digits, as \
                         `sigil-server audit verify` prints them"
                    ),
                );
            }
        }

        problems.into_result()?;
        // Every value that failed pushed a problem above, so all are present here.
        let (
            Some(trust_domain),
            Some(bind_address),
            Some(data_dir),
            Some(admin_socket),
            Some(ca_ttl),
            Some(default_x509_svid_ttl),
            Some(default_jwt_svid_ttl),
            Some(agent_svid_ttl),
            Some(max_session_ttl),
            Some(session_svid_ttl),
            Some(log_level),
            Some(log_format),
        ) = (
            trust_domain,
            bind_address,
            data_dir,
            admin_socket,
            ca_ttl,
            x509_ttl,
            jwt_ttl,
            agent_ttl,
            max_session_ttl,
            session_svid_ttl,
            log_level,
            log_format,
        )
        else {
            return Err(ConfigError::incomplete());
        };
        Ok(Self {
            trust_domain,
            bind_address,
            data_dir,
            admin_socket,
            admin_uids: file.admin_uids.unwrap_or_default(),
            ca_ttl,
            default_x509_svid_ttl,
            default_jwt_svid_ttl,
            agent_svid_ttl,
            jwt_issuer,
            max_session_ttl,
            session_svid_ttl,
            require_session_approval: file.require_session_approval.unwrap_or(false),
            session_only_ids,
            session_approver_uids: file.session_approver_uids.unwrap_or_default(),
            audit_sources,
            store_cache_bytes: store_cache_mib.saturating_mul(1024 * 1024),
            postgres,
            server_id,
            max_store_staleness,
            metrics_address,
            health_address,
            x509pop,
            upstream,
            pkcs11,
            bundle_endpoint,
            federation_min_poll,
            audit_peer_keys,
            log_level,
            log_format,
        })
    }

    /// The largest SVID TTL the authorities can honour (`ca_ttl / 6`); longer per-entry TTLs are
    /// capped to it.
    pub fn max_svid_ttl(&self) -> Duration {
        max_svid_ttl(self.ca_ttl)
    }

    /// The lifetimes of every credential kind, as this configuration sets them.
    pub fn ttl_policy(&self) -> crate::policy::TtlPolicy {
        crate::policy::TtlPolicy {
            x509_default: self.default_x509_svid_ttl,
            jwt_default: self.default_jwt_svid_ttl,
            agent: self.agent_svid_ttl,
            session_svid_default: self.session_svid_ttl,
            max_session: self.max_session_ttl,
            max_svid: self.max_svid_ttl(),
        }
    }
}

/// The lifetimes a configuration that names none of them gives under `ca_ttl`, each default
/// capped at `ca_ttl / 6` (for the services' tests and `sigil-bench instructions`).
pub(crate) fn default_ttl_policy(ca_ttl: Duration) -> crate::policy::TtlPolicy {
    let max_svid = max_svid_ttl(ca_ttl);
    crate::policy::TtlPolicy {
        x509_default: DEFAULT_X509_SVID_TTL.min(max_svid),
        jwt_default: DEFAULT_JWT_SVID_TTL.min(max_svid),
        agent: DEFAULT_X509_SVID_TTL.min(max_svid),
        session_svid_default: crate::policy::DEFAULT_SESSION_SVID_TTL.min(max_svid),
        max_session: crate::policy::DEFAULT_MAX_SESSION_TTL,
        max_svid,
    }
}

// === helpers ===

/// The `server_id` key: required with postgres, `default` with sled.
fn server_id(file: &FileConfig, problems: &mut Problems) -> String {
    let postgres = file.store.as_deref() == Some("postgres");
    match &file.server_id {
        Some(id) => match check_server_id(id) {
            Ok(()) if !postgres && id != DEFAULT_SERVER_ID => {
                problems.push(
                    "server_id",
                    format!(
                        "is only for store = \"postgres\": a sled store has one server, \
                         {DEFAULT_SERVER_ID:?}"
                    ),
                );
                DEFAULT_SERVER_ID.to_owned()
            }
            Ok(()) => id.clone(),
            Err(e) => {
                problems.push("server_id", e);
                DEFAULT_SERVER_ID.to_owned()
            }
        },
        None if postgres => {
            problems.push(
                "server_id",
                "is required with store = \"postgres\": a name unique among the servers \
                 sharing the database, kept across restarts (the host name fits)",
            );
            DEFAULT_SERVER_ID.to_owned()
        }
        None => DEFAULT_SERVER_ID.to_owned(),
    }
}

/// Checks a server id: 1 to 63 of `a-z 0-9 - _ .`, the first a letter or digit.
fn check_server_id(id: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    let first_ok = id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if id.is_empty() || id.len() > 63 || !first_ok || !id.chars().all(allowed) {
        return Err(format!(
            "{id:?} is not a server id: 1 to 63 characters of a-z, 0-9, '-', '_' and '.', \
             starting with a letter or digit"
        ));
    }
    Ok(())
}

/// The `store` and `postgres_*` keys: `Some` for `store = "postgres"`.
fn postgres_config(file: &FileConfig, problems: &mut Problems) -> Option<PostgresConfig> {
    let postgres_keys = [
        ("postgres_url", file.postgres_url.is_some()),
        (
            "postgres_password_file",
            file.postgres_password_file.is_some(),
        ),
        ("postgres_ca_file", file.postgres_ca_file.is_some()),
        ("postgres_pool_size", file.postgres_pool_size.is_some()),
    ];
    match file.store.as_deref().unwrap_or("sled") {
        "sled" => {
            for (key, set) in postgres_keys {
                if set {
                    problems.push(key, "is only for store = \"postgres\" (the store is sled)");
                }
            }
            None
        }
        "postgres" => {
            if file.store_cache_mib.is_some() {
                problems.push(
                    "store_cache_mib",
                    "is only for the sled store: PostgreSQL caches in its own shared_buffers",
                );
            }
            let url = match &file.postgres_url {
                Some(url) => match crate::store::postgres::check_url(url) {
                    Ok(()) => Some(url.clone()),
                    Err(e) => {
                        problems.push("postgres_url", e);
                        None
                    }
                },
                None => {
                    problems.push("postgres_url", "is required with store = \"postgres\"");
                    None
                }
            };
            let pool_size = file
                .postgres_pool_size
                .unwrap_or(DEFAULT_POSTGRES_POOL_SIZE);
            if !(2..=1000).contains(&pool_size) {
                problems.push(
                    "postgres_pool_size",
                    format!("{pool_size} is out of range: 2 to 1000"),
                );
            }
            let nonempty = |key: &str, value: &Option<String>, problems: &mut Problems| match value
                .as_deref()
            {
                Some("") => {
                    problems.push(key, "cannot be empty (leave the key out)");
                    None
                }
                other => other.map(PathBuf::from),
            };
            let password_file = nonempty(
                "postgres_password_file",
                &file.postgres_password_file,
                problems,
            );
            let ca_file = nonempty("postgres_ca_file", &file.postgres_ca_file, problems);
            url.map(|url| PostgresConfig {
                url,
                password_file,
                ca_file,
                pool_size: usize::try_from(pool_size).unwrap_or(usize::MAX),
            })
        }
        other => {
            problems.push(
                "store",
                format!("{other:?} is not a store: write \"sled\" or \"postgres\""),
            );
            None
        }
    }
}

fn duration_value(
    problems: &mut Problems,
    key: &str,
    value: Option<String>,
    default: Duration,
) -> Option<Duration> {
    let Some(text) = value else {
        return Some(default);
    };
    match parse_duration(&text) {
        Ok(d) if d.is_zero() => {
            problems.push(key, "must be greater than zero");
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(key, e.to_string());
            None
        }
    }
}

/// The key manager keys: the three pkcs11 keys with `pkcs11`, none with `disk`.
fn pkcs11_config(file: &FileConfig, problems: &mut Problems) -> Option<Pkcs11Config> {
    let keys = [
        ("pkcs11_module", &file.pkcs11_module),
        ("pkcs11_token_label", &file.pkcs11_token_label),
        ("pkcs11_pin_file", &file.pkcs11_pin_file),
    ];
    match file.key_manager.as_deref().unwrap_or("disk") {
        "disk" => {
            for (key, value) in keys {
                if value.is_some() {
                    problems.push(key, "needs key_manager = \"pkcs11\"");
                }
            }
            None
        }
        "pkcs11" => {
            let mut found = Vec::new();
            for (key, value) in keys {
                match value.as_deref() {
                    Some(v) if !v.is_empty() => found.push(v.to_owned()),
                    _ => problems.push(key, "is required with key_manager = \"pkcs11\""),
                }
            }
            let [module, token_label, pin_file] = <[String; 3]>::try_from(found).ok()?;
            Some(Pkcs11Config {
                module: PathBuf::from(module),
                token_label,
                pin_file: PathBuf::from(pin_file),
            })
        }
        other => {
            problems.push(
                "key_manager",
                format!("{other:?} is not a key manager (disk or pkcs11)"),
            );
            None
        }
    }
}

/// A duration key with a default and inclusive bounds; a problem when it does not parse or is
/// out of range.
fn bounded_duration(
    problems: &mut Problems,
    key: &'static str,
    text: Option<&str>,
    default: Duration,
    (min, max): (Duration, Duration),
) -> Duration {
    let Some(text) = text else {
        return default;
    };
    match parse_duration(text) {
        Ok(d) if d >= min && d <= max => d,
        Ok(d) => {
            problems.push(
                key,
                format!(
                    "{} is out of range: {} to {}",
                    HumanDuration(d),
                    HumanDuration(min),
                    HumanDuration(max)
                ),
            );
            default
        }
        Err(e) => {
            problems.push(key, e.to_string());
            default
        }
    }
}

/// The bundle endpoint keys: the profile's files with `https_web` only.
fn bundle_endpoint_config(
    file: &FileConfig,
    problems: &mut Problems,
) -> Option<BundleEndpointConfig> {
    let refresh_hint = bounded_duration(
        problems,
        "bundle_endpoint_refresh_hint",
        file.bundle_endpoint_refresh_hint.as_deref(),
        DEFAULT_REFRESH_HINT,
        (Duration::from_secs(1), Duration::from_secs(3600)),
    );
    let address = sigil_daemon::config::listener_address(
        problems,
        "bundle_endpoint_address",
        file.bundle_endpoint_address.as_deref(),
    );
    let web_paths = [
        (
            "bundle_endpoint_web_cert_path",
            &file.bundle_endpoint_web_cert_path,
        ),
        (
            "bundle_endpoint_web_key_path",
            &file.bundle_endpoint_web_key_path,
        ),
    ];
    let profile = match file.bundle_endpoint_profile.as_deref() {
        None | Some("https_spiffe") => {
            for (key, value) in web_paths {
                if value.is_some() {
                    problems.push(key, "needs bundle_endpoint_profile = \"https_web\"");
                }
            }
            Some(BundleEndpointProfile::HttpsSpiffe)
        }
        Some("https_web") => {
            let mut found = Vec::new();
            for (key, value) in web_paths {
                match value.as_deref() {
                    Some(path) if !path.is_empty() => found.push(PathBuf::from(path)),
                    _ => problems.push(
                        key,
                        "is required with bundle_endpoint_profile = \"https_web\"",
                    ),
                }
            }
            <[PathBuf; 2]>::try_from(found)
                .ok()
                .map(|[cert_path, key_path]| BundleEndpointProfile::HttpsWeb {
                    cert_path,
                    key_path,
                })
        }
        Some(other) => {
            problems.push(
                "bundle_endpoint_profile",
                format!("{other:?} is not a bundle endpoint profile (https_spiffe or https_web)"),
            );
            None
        }
    };
    let set_without_address = [
        (
            "bundle_endpoint_profile",
            file.bundle_endpoint_profile.is_some(),
        ),
        (
            "bundle_endpoint_refresh_hint",
            file.bundle_endpoint_refresh_hint.is_some(),
        ),
    ];
    if file.bundle_endpoint_address.is_none() {
        for (key, set) in set_without_address {
            if set {
                problems.push(key, "needs bundle_endpoint_address");
            }
        }
        return None;
    }
    Some(BundleEndpointConfig {
        address: address?,
        profile: profile?,
        refresh_hint,
    })
}

/// The upstream authority keys: both paths with `disk`, none without.
fn upstream_config(file: &FileConfig, problems: &mut Problems) -> Option<UpstreamConfig> {
    let paths = [
        ("upstream_cert_path", &file.upstream_cert_path),
        ("upstream_key_path", &file.upstream_key_path),
    ];
    match file.upstream_authority.as_deref() {
        None => {
            for (key, value) in paths {
                if value.is_some() {
                    problems.push(key, "needs upstream_authority = \"disk\"");
                }
            }
            None
        }
        Some("disk") => {
            let mut found = Vec::new();
            for (key, value) in paths {
                match value.as_deref() {
                    Some(path) if !path.is_empty() => found.push(PathBuf::from(path)),
                    _ => problems.push(key, "is required with upstream_authority = \"disk\""),
                }
            }
            let [cert_path, key_path] = <[PathBuf; 2]>::try_from(found).ok()?;
            Some(UpstreamConfig {
                cert_path,
                key_path,
            })
        }
        Some(other) => {
            problems.push(
                "upstream_authority",
                format!("{other:?} is not an upstream authority (the one there is: disk)"),
            );
            None
        }
    }
}

/// The x509pop keys: the template is checked here; the CA bundle is read at start.
fn x509pop_config(file: &FileConfig, problems: &mut Problems) -> Option<X509PopConfig> {
    let template = file.x509pop_agent_path_template.clone();
    if let Some(template) = &template
        && let Err(e) = sigil_attestors::x509pop::Template::parse(template)
    {
        problems.push("x509pop_agent_path_template", e.to_string());
    }
    match &file.x509pop_ca_bundle_path {
        Some(path) if path.is_empty() => {
            problems.push("x509pop_ca_bundle_path", "cannot be empty");
            None
        }
        Some(path) => Some(X509PopConfig {
            ca_bundle_path: PathBuf::from(path),
            agent_path_template: template,
        }),
        None => {
            if template.is_some() {
                problems.push(
                    "x509pop_agent_path_template",
                    "needs x509pop_ca_bundle_path (the CAs x509pop agents' host certificates chain to)",
                );
            }
            None
        }
    }
}

fn path_value(
    problems: &mut Problems,
    key: &str,
    value: Option<String>,
    default: &str,
) -> Option<PathBuf> {
    let text = value.unwrap_or_else(|| default.to_owned());
    if text.is_empty() {
        problems.push(key, "cannot be empty");
        return None;
    }
    Some(PathBuf::from(text))
}

/// The distinct workload IDs of `trust_domain` among `texts` (the values of `key`), each
/// problem reported.
fn workload_ids(
    key: &'static str,
    texts: impl IntoIterator<Item = String>,
    trust_domain: Option<&TrustDomain>,
    problems: &mut Problems,
) -> Vec<SpiffeId> {
    let mut ids = Vec::new();
    for text in texts {
        let id = match SpiffeId::new(&text) {
            Ok(id) => id,
            Err(e) => {
                problems.push(key, format!("{text:?}: {e}"));
                continue;
            }
        };
        if let Some(td) = trust_domain
            && let Err(e) = crate::policy::check_workload_id(td, &id)
        {
            problems.push(key, e.to_string());
            continue;
        }
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(err: &ConfigError) -> Vec<&str> {
        err.problems.iter().map(|p| p.key.as_str()).collect()
    }

    fn config(file: Option<&str>) -> Result<ServerConfig, ConfigError> {
        ServerConfig::from_sources(file, Overrides::default())
    }

    #[test]
    fn minimal_file_gets_the_documented_defaults() {
        let c = ServerConfig::from_sources(
            Some("trust_domain = \"example.org\""),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.trust_domain.name(), "example.org");
        assert_eq!(c.bind_address, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert!(c.admin_uids.is_empty());
        assert_eq!(c.ca_ttl, Duration::from_secs(86_400));
        assert_eq!(c.default_x509_svid_ttl, Duration::from_secs(3600));
        assert_eq!(c.default_jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(c.agent_svid_ttl, c.default_x509_svid_ttl);
        assert_eq!(c.jwt_issuer, None);
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.max_svid_ttl(), Duration::from_secs(4 * 3600));
        assert_eq!(c.store_cache_bytes, 16 * 1024 * 1024);
    }

    #[test]
    fn session_only_ids_come_from_the_file_and_the_flags_and_are_checked() {
        let file = "trust_domain = \"example.org\"\nsession_only_ids = [\"spiffe://example.org/admin\"]\nsession_approver_uids = [7, 8]";
        let c = ServerConfig::from_sources(
            Some(file),
            Overrides {
                session_only_ids: vec![
                    "spiffe://example.org/db/root".into(),
                    "spiffe://example.org/admin".into(),
                ],
                ..Overrides::default()
            },
        )
        .unwrap();
        let ids: Vec<&str> = c.session_only_ids.iter().map(SpiffeId::as_str).collect();
        assert_eq!(
            ids,
            ["spiffe://example.org/admin", "spiffe://example.org/db/root"]
        );
        assert_eq!(c.session_approver_uids, [7, 8]);
        for key in ["session_only_ids", "audit_sources"] {
            for bad in [
                "\"spiffe://other.org/admin\"",
                "\"spiffe://example.org/sigil/agent\"",
                "\"spiffe://example.org\"",
                "\"not an id\"",
            ] {
                let text = format!("trust_domain = \"example.org\"\n{key} = [{bad}]");
                let err =
                    ServerConfig::from_sources(Some(&text), Overrides::default()).unwrap_err();
                assert_eq!(keys(&err), [key], "{bad}: {err}");
            }
        }
    }

    #[test]
    fn audit_sources_are_distinct_workload_ids() {
        let file = "trust_domain = \"example.org\"\naudit_sources = [\"spiffe://example.org/broker/db\", \"spiffe://example.org/broker/db\", \"spiffe://example.org/broker/web\"]";
        let c = ServerConfig::from_sources(Some(file), Overrides::default()).unwrap();
        let ids: Vec<&str> = c.audit_sources.iter().map(SpiffeId::as_str).collect();
        assert_eq!(
            ids,
            [
                "spiffe://example.org/broker/db",
                "spiffe://example.org/broker/web"
            ]
        );
        let none = ServerConfig::from_sources(
            Some("trust_domain = \"example.org\""),
            Overrides::default(),
        )
        .unwrap();
        assert!(none.audit_sources.is_empty());
    }

    #[test]
    fn the_store_cache_size_is_checked() {
        let c = ServerConfig::from_sources(
            Some("trust_domain = \"example.org\"\nstore_cache_mib = 64"),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.store_cache_bytes, 64 * 1024 * 1024);
        for bad in ["0", "2000000", "\"16MiB\"", "-1"] {
            let text = format!("trust_domain = \"example.org\"\nstore_cache_mib = {bad}");
            let err = ServerConfig::from_sources(Some(&text), Overrides::default()).unwrap_err();
            assert_eq!(keys(&err), ["store_cache_mib"], "{bad}: {err}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let file = "trust_domain = \"a.org\"\nbind_address = \"127.0.0.1:1\"\nlog_level = \"warn\"";
        let c = ServerConfig::from_sources(
            Some(file),
            Overrides {
                trust_domain: Some("b.org".into()),
                bind_address: Some("127.0.0.1:2".into()),
                data_dir: Some("/d".into()),
                admin_socket: Some("/s.sock".into()),
                log_level: Some("debug".into()),
                log_format: Some("json".into()),
                session_only_ids: vec![],
            },
        )
        .unwrap();
        assert_eq!(c.trust_domain.name(), "b.org");
        assert_eq!(c.bind_address.port(), 2);
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert_eq!(c.admin_socket, PathBuf::from("/s.sock"));
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn every_problem_is_reported_at_once_naming_each_key() {
        let file = r#"
            trust_domain = "Example.org"
            bind_address = "localhost"
            ca_ttl = "forever"
            default_jwt_svid_ttl = 5
            log_level = "loud"
            metrics_address = "localhost:9988"
            health_address = "127.0.0.1"
            colour = "blue"
            shade = 3
        "#;
        let err = ServerConfig::from_sources(Some(file), Overrides::default()).unwrap_err();
        let mut got = keys(&err);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "bind_address",
                "ca_ttl",
                "colour",
                "default_jwt_svid_ttl",
                "health_address",
                "log_level",
                "metrics_address",
                "shade",
                "trust_domain"
            ]
        );
        let text = err.to_string();
        assert!(
            text.starts_with("invalid configuration (9 problems):"),
            "{text}"
        );
        assert!(text.contains("colour: unknown key"), "{text}");
    }

    #[test]
    fn trust_domain_is_required() {
        let err = ServerConfig::from_sources(None, Overrides::default()).unwrap_err();
        assert_eq!(keys(&err), ["trust_domain"]);
        let err = ServerConfig::from_sources(Some("not toml ="), Overrides::default()).unwrap_err();
        assert_eq!(keys(&err), ["config", "trust_domain"]);
    }

    #[test]
    fn ttls_must_fit_a_sixth_of_the_ca_ttl_with_the_numbers_in_the_message() {
        let file = r#"
            trust_domain = "example.org"
            ca_ttl = "1h"
            default_x509_svid_ttl = "20m"
            agent_svid_ttl = "11m"
        "#;
        let err = ServerConfig::from_sources(Some(file), Overrides::default()).unwrap_err();
        assert_eq!(keys(&err), ["default_x509_svid_ttl", "agent_svid_ttl"]);
        let msg = &err.problems[0].message;
        assert!(
            msg.contains("20m") && msg.contains("10m") && msg.contains("1h") && msg.contains("2h"),
            "{msg}"
        );
    }

    #[test]
    fn a_ttl_equal_to_a_sixth_of_the_ca_ttl_is_allowed() {
        let file = r#"
            trust_domain = "example.org"
            ca_ttl = "1m"
            default_x509_svid_ttl = "10s"
            default_jwt_svid_ttl = "10s"
        "#;
        let c = ServerConfig::from_sources(Some(file), Overrides::default()).unwrap();
        assert_eq!(c.agent_svid_ttl, Duration::from_secs(10));
        // The agent TTL defaults to the X.509 TTL, so it is checked too.
        let file =
            "trust_domain = \"example.org\"\nca_ttl = \"1m\"\ndefault_jwt_svid_ttl = \"10s\"";
        let err = ServerConfig::from_sources(Some(file), Overrides::default()).unwrap_err();
        assert_eq!(keys(&err), ["default_x509_svid_ttl", "agent_svid_ttl"]);
    }

    #[test]
    fn zero_and_empty_values_are_refused() {
        let file = r#"
            trust_domain = "example.org"
            default_jwt_svid_ttl = "0s"
            data_dir = ""
            jwt_issuer = " "
            log_format = "xml"
        "#;
        let err = ServerConfig::from_sources(Some(file), Overrides::default()).unwrap_err();
        let mut got = keys(&err);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "data_dir",
                "default_jwt_svid_ttl",
                "jwt_issuer",
                "log_format"
            ]
        );
    }

    #[test]
    fn upstream_x509pop_and_pkcs11_keys_come_in_their_sets() {
        let td = "trust_domain = \"example.org\"\n";
        let c = config(Some(&format!(
            "{td}upstream_authority = \"disk\"\nupstream_cert_path = \"/u.pem\"\n\
             upstream_key_path = \"/u.key\"\nx509pop_ca_bundle_path = \"/ca.pem\"\n\
             x509pop_agent_path_template = \"hosts/{{subject_cn}}\""
        )))
        .unwrap();
        assert_eq!(
            c.upstream,
            Some(UpstreamConfig {
                cert_path: "/u.pem".into(),
                key_path: "/u.key".into()
            })
        );
        assert_eq!(
            c.x509pop.map(|p| p.agent_path_template),
            Some(Some("hosts/{subject_cn}".to_owned()))
        );
        for (text, wanted) in [
            (
                "upstream_authority = \"disk\"",
                vec!["upstream_cert_path", "upstream_key_path"],
            ),
            ("upstream_key_path = \"/k\"", vec!["upstream_key_path"]),
            ("upstream_authority = \"vault\"", vec!["upstream_authority"]),
            (
                "x509pop_agent_path_template = \"x/{fingerprint}\"",
                vec!["x509pop_agent_path_template"],
            ),
            (
                "x509pop_ca_bundle_path = \"/c\"\nx509pop_agent_path_template = \"{serial}\"",
                vec!["x509pop_agent_path_template"],
            ),
            (
                "key_manager = \"pkcs11\"\npkcs11_module = \"/m.so\"",
                vec!["pkcs11_token_label", "pkcs11_pin_file"],
            ),
            ("pkcs11_token_label = \"t\"", vec!["pkcs11_token_label"]),
            ("key_manager = \"kms\"", vec!["key_manager"]),
        ] {
            let err = config(Some(&format!("{td}{text}"))).unwrap_err();
            assert_eq!(keys(&err), wanted, "{text}: {err}");
        }
    }

    #[test]
    fn bundle_endpoint_and_federation_keys_are_checked() {
        let td = "trust_domain = \"example.org\"\n";
        let c = config(Some(td)).unwrap();
        assert_eq!(c.bundle_endpoint, None);
        assert_eq!(c.federation_min_poll, DEFAULT_FEDERATION_MIN_POLL);
        let c = config(Some(&format!(
            "{td}bundle_endpoint_address = \"127.0.0.1:8443\"\nfederation_min_poll = \"5s\""
        )))
        .unwrap();
        assert_eq!(
            c.bundle_endpoint,
            Some(BundleEndpointConfig {
                address: "127.0.0.1:8443".parse().unwrap(),
                profile: BundleEndpointProfile::HttpsSpiffe,
                refresh_hint: DEFAULT_REFRESH_HINT,
            })
        );
        assert_eq!(c.federation_min_poll, Duration::from_secs(5));
        let c = config(Some(&format!(
            "{td}bundle_endpoint_address = \"[::1]:443\"\nbundle_endpoint_profile = \"https_web\"\n\
             bundle_endpoint_web_cert_path = \"/c.pem\"\nbundle_endpoint_web_key_path = \"/c.key\"\n\
             bundle_endpoint_refresh_hint = \"1m\""
        )))
        .unwrap();
        assert_eq!(
            c.bundle_endpoint.map(|e| (e.profile, e.refresh_hint)),
            Some((
                BundleEndpointProfile::HttpsWeb {
                    cert_path: "/c.pem".into(),
                    key_path: "/c.key".into()
                },
                Duration::from_secs(60)
            ))
        );
        let at = "bundle_endpoint_address = \"127.0.0.1:8443\"\n";
        for (text, wanted) in [
            (
                "bundle_endpoint_address = \"localhost:8443\"".to_owned(),
                vec!["bundle_endpoint_address"],
            ),
            (
                format!("{at}bundle_endpoint_profile = \"https_web\""),
                vec![
                    "bundle_endpoint_web_cert_path",
                    "bundle_endpoint_web_key_path",
                ],
            ),
            (
                format!("{at}bundle_endpoint_web_cert_path = \"/c\""),
                vec!["bundle_endpoint_web_cert_path"],
            ),
            (
                format!("{at}bundle_endpoint_profile = \"acme\""),
                vec!["bundle_endpoint_profile"],
            ),
            (
                format!("{at}bundle_endpoint_refresh_hint = \"2h\""),
                vec!["bundle_endpoint_refresh_hint"],
            ),
            (
                "bundle_endpoint_profile = \"https_spiffe\"".to_owned(),
                vec!["bundle_endpoint_profile"],
            ),
            (
                "federation_min_poll = \"0s\"".to_owned(),
                vec!["federation_min_poll"],
            ),
            (
                "federation_min_poll = \"10m\"".to_owned(),
                vec!["federation_min_poll"],
            ),
        ] {
            let err = config(Some(&format!("{td}{text}"))).unwrap_err();
            assert_eq!(keys(&err), wanted, "{text}: {err}");
        }
    }

    #[test]
    fn the_store_is_sled_unless_postgres_is_chosen_and_postgres_keys_are_checked() {
        let c = config(Some("trust_domain = \"example.org\"")).unwrap();
        assert_eq!(c.postgres, None);
        assert_eq!(c.server_id, "default");
        assert_eq!(c.max_store_staleness, DEFAULT_MAX_STORE_STALENESS);
        assert!(c.audit_peer_keys.is_empty());
        let fingerprint = "ab".repeat(32);
        let c = config(Some(&format!(
            "trust_domain = \"example.org\"\naudit_peer_keys = [\"{fingerprint}\"]"
        )))
        .unwrap();
        assert!(c.audit_peer_keys.contains(&fingerprint));
        let err = config(Some(
            "trust_domain = \"example.org\"\naudit_peer_keys = [\"AB\"]",
        ))
        .unwrap_err();
        assert_eq!(keys(&err), ["audit_peer_keys"], "{err}");
        let c = config(Some(
            "trust_domain = \"example.org\"\nmax_store_staleness = \"0s\"",
        ))
        .unwrap();
        assert_eq!(c.max_store_staleness, Duration::ZERO);
        for bad in ["2h", "soon"] {
            let err = config(Some(&format!(
                "trust_domain = \"example.org\"\nmax_store_staleness = \"{bad}\""
            )))
            .unwrap_err();
            assert_eq!(keys(&err), ["max_store_staleness"], "{bad}: {err}");
        }
        let c = config(Some(
            "trust_domain = \"example.org\"\nstore = \"postgres\"\n\
             postgres_url = \"host=db user=sigil dbname=sigil\"\n\
             postgres_password_file = \"/etc/sigil/pw\"\npostgres_pool_size = 4\n\
             server_id = \"sigil-1.eu\"",
        ))
        .unwrap();
        assert_eq!(c.server_id, "sigil-1.eu");
        assert_eq!(
            c.postgres,
            Some(PostgresConfig {
                url: "host=db user=sigil dbname=sigil".into(),
                password_file: Some("/etc/sigil/pw".into()),
                ca_file: None,
                pool_size: 4,
            })
        );
        for (text, bad_keys) in [
            ("store = \"postgres\"", vec!["postgres_url", "server_id"]),
            ("store = \"mysql\"", vec!["store"]),
            ("server_id = \"a\"", vec!["server_id"]),
            (
                "store = \"postgres\"\npostgres_url = \"host=db\"\nserver_id = \"-a\"",
                vec!["server_id"],
            ),
            (
                "store = \"postgres\"\npostgres_url = \"host=db\"\nserver_id = \"A b\"",
                vec!["server_id"],
            ),
            ("postgres_url = \"host=db\"", vec!["postgres_url"]),
            (
                "store = \"postgres\"\npostgres_url = \"postgresql://u:hunter2@db/x\"\n\
                 store_cache_mib = 8\npostgres_pool_size = 1\nserver_id = \"a\"",
                vec!["postgres_pool_size", "postgres_url", "store_cache_mib"],
            ),
        ] {
            let err = config(Some(&format!("trust_domain = \"example.org\"\n{text}"))).unwrap_err();
            let mut got = keys(&err);
            got.sort_unstable();
            assert_eq!(got, bad_keys, "{text}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn the_sample_config_documents_every_key_and_parses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/config/server.toml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let c = ServerConfig::from_sources(Some(&text), Overrides::default()).unwrap();
        assert_eq!(c.trust_domain.name(), "example.org");
        for key in KNOWN_KEYS {
            assert!(
                text.lines().any(|l| l
                    .trim_start_matches(['#', ' '])
                    .starts_with(&format!("{key} ="))),
                "examples/config/server.toml does not document {key}"
            );
        }
    }
}
