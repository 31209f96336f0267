//! Agent configuration: a TOML file, overridden by flags, checked into [`AgentConfig`] with
//! every problem reported at once. Every key is documented on [`FileConfig`] and in
//! `examples/config/agent.toml` (parsed by a test).

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use sigil_core::TrustDomain;
pub use sigil_daemon::config::{ConfigError, ConfigProblem};
use sigil_daemon::config::{Problems, parse_file, telemetry_addresses};
pub use sigil_daemon::{LogFormat, LogLevel};

/// Default Workload API socket.
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/sigil-agent/public/api.sock";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/tmp/sigil-agent/data";
/// Default server address.
pub const DEFAULT_SERVER_ADDRESS: &str = "127.0.0.1:8081";

/// The keys [`FileConfig`] accepts, for reporting every unknown key at once.
const KNOWN_KEYS: &[&str] = &[
    "trust_domain",
    "server_address",
    "join_token",
    "node_attestor",
    "x509pop_cert_path",
    "x509pop_key_path",
    "trust_bundle",
    "socket_path",
    "data_dir",
    "metrics_address",
    "health_address",
    "log_level",
    "log_format",
];

/// The configuration file as written; every field optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The trust domain of the server. Required.
    pub trust_domain: Option<String>,
    /// The server's agent-facing API, `HOST:PORT`, or a list of them (the servers sharing one
    /// database): the agent uses the first that answers and, when its server goes away,
    /// reconnects to the next. Default `127.0.0.1:8081`.
    pub server_address: Option<OneOrMany>,
    /// A one-time join token for the first start (`sigil-server token generate`). Not needed
    /// once the agent has attested: it keeps its SVID in `data_dir`.
    pub join_token: Option<String>,
    /// How the agent attests on its first start (or when its stored SVID expired): `join_token`
    /// (a one-time token) or `x509pop` (proof of possession of a host certificate's key,
    /// issued by a CA in the server's `x509pop_ca_bundle_path`). Default `join_token`.
    pub node_attestor: Option<String>,
    /// x509pop: PEM file of the host certificate, followed by any intermediate CAs.
    pub x509pop_cert_path: Option<String>,
    /// x509pop: PEM file of the host certificate's private key (PKCS#8 ECDSA P-256/P-384,
    /// Ed25519 or RSA, or PKCS#1 RSA). Readable by the agent only.
    pub x509pop_key_path: Option<String>,
    /// PEM file of the server's X.509 authorities (`sigil-server bundle show`), trusted on the
    /// first start only; later starts trust the bundle kept in `data_dir`.
    pub trust_bundle: Option<String>,
    /// The Workload API socket. Default `/tmp/sigil-agent/public/api.sock`.
    pub socket_path: Option<String>,
    /// Where the agent keeps its key, SVID and bundle (mode 0700). Default
    /// `/tmp/sigil-agent/data`.
    pub data_dir: Option<String>,
    /// Address (IP:PORT) of an HTTP listener serving Prometheus metrics at `/metrics`
    /// (docs/operations.md). Default: none (off). Plain HTTP: keep it on loopback.
    pub metrics_address: Option<String>,
    /// Address (IP:PORT) of an HTTP listener serving `/live` and `/ready`. May be the same as
    /// `metrics_address`. Default: none (off).
    pub health_address: Option<String>,
    /// `error`, `warn`, `info`, `debug` or `trace`. Default `info`.
    pub log_level: Option<String>,
    /// `text` or `json`. Default `text`.
    pub log_format: Option<String>,
}

/// Flags that override the file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Overrides {
    /// `--trust-domain`.
    pub trust_domain: Option<String>,
    /// `--server-address`, each time it was given (empty: not given).
    pub server_address: Vec<String>,
    /// `--join-token`.
    pub join_token: Option<String>,
    /// `--node-attestor`.
    pub node_attestor: Option<String>,
    /// `--x509pop-cert-path`.
    pub x509pop_cert_path: Option<String>,
    /// `--x509pop-key-path`.
    pub x509pop_key_path: Option<String>,
    /// `--trust-bundle`.
    pub trust_bundle: Option<String>,
    /// `--socket-path`.
    pub socket_path: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<String>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--log-format`.
    pub log_format: Option<String>,
}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// The servers' agent-facing APIs, in the order they are tried (at least one).
    pub server_addresses: Vec<ServerAddress>,
    /// How the agent attests.
    pub attestation: NodeAttestation,
    /// Bootstrap bundle file.
    pub trust_bundle: Option<PathBuf>,
    /// Workload API socket.
    pub socket_path: PathBuf,
    /// Data directory.
    pub data_dir: PathBuf,
    /// The metrics listener, if any.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The health listener, if any.
    pub health_address: Option<std::net::SocketAddr>,
    /// Log level.
    pub log_level: LogLevel,
    /// Log format.
    pub log_format: LogFormat,
}

/// How the agent attests (`node_attestor`).
#[derive(Clone, PartialEq, Eq)]
pub enum NodeAttestation {
    /// A one-time join token (needed on the first start only).
    JoinToken(Option<String>),
    /// x509pop with the host certificate and key at these paths.
    X509Pop {
        /// The certificate chain (PEM).
        cert_path: PathBuf,
        /// The private key (PEM).
        key_path: PathBuf,
    },
}

impl std::fmt::Debug for NodeAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The token is a secret until spent: never in a log line.
            Self::JoinToken(token) => f
                .debug_tuple("JoinToken")
                .field(&token.as_ref().map(|_| "<redacted>"))
                .finish(),
            Self::X509Pop {
                cert_path,
                key_path,
            } => f
                .debug_struct("X509Pop")
                .field("cert_path", cert_path)
                .field("key_path", key_path)
                .finish(),
        }
    }
}

/// A string or a list of strings (a TOML key that takes either).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One value.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

/// A server address: a host name or IP and a port (`server.example.org:8081`,
/// `[::1]:8081`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    host: String,
    port: u16,
}

// === impl ServerAddress ===

impl ServerAddress {
    /// Parses `HOST:PORT`.
    ///
    /// # Errors
    ///
    /// A message naming what is missing.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not HOST:PORT");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// The host (an IPv6 address keeps its brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

// === impl AgentConfig ===

impl AgentConfig {
    /// Builds the configuration from the file's text (if any) and the flags, reporting every
    /// problem at once, unknown keys included.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] with every problem, each naming its key.
    pub fn from_sources(file: Option<&str>, flags: Overrides) -> Result<Self, ConfigError> {
        let mut problems = Problems::default();
        let file: FileConfig = match file {
            Some(text) => parse_file(text, KNOWN_KEYS, &mut problems),
            None => FileConfig::default(),
        };
        let pick =
            |flag: Option<String>, file: Option<String>| flag.or(file).filter(|v| !v.is_empty());

        let trust_domain = match pick(flags.trust_domain, file.trust_domain) {
            None => {
                problems.push(
                    "trust_domain",
                    "is required (in the file or with --trust-domain)",
                );
                None
            }
            Some(td) => problems.check("trust_domain", TrustDomain::new(&td)),
        };
        let addresses = if flags.server_address.is_empty() {
            file.server_address
                .map(OneOrMany::into_vec)
                .unwrap_or_default()
        } else {
            flags.server_address
        };
        let addresses = if addresses.is_empty() {
            vec![DEFAULT_SERVER_ADDRESS.to_owned()]
        } else {
            addresses
        };
        let server_addresses = problems.check(
            "server_address",
            addresses
                .iter()
                .map(|a| ServerAddress::parse(a))
                .collect::<Result<Vec<_>, String>>()
                .and_then(|list| {
                    let mut seen = std::collections::HashSet::new();
                    match list.iter().find(|a| !seen.insert(a.to_string())) {
                        Some(twice) => Err(format!("{twice} is listed twice")),
                        None => Ok(list),
                    }
                }),
        );
        let log_level = problems.check(
            "log_level",
            pick(flags.log_level, file.log_level)
                .as_deref()
                .unwrap_or("info")
                .parse::<LogLevel>(),
        );
        let log_format = problems.check(
            "log_format",
            pick(flags.log_format, file.log_format)
                .as_deref()
                .unwrap_or("text")
                .parse::<LogFormat>(),
        );
        let socket_path = PathBuf::from(
            pick(flags.socket_path, file.socket_path)
                .unwrap_or_else(|| DEFAULT_SOCKET_PATH.to_owned()),
        );
        if !socket_path.is_absolute() {
            problems.push(
                "socket_path",
                format!("{} must be an absolute path", socket_path.display()),
            );
        }
        let data_dir = PathBuf::from(
            pick(flags.data_dir, file.data_dir).unwrap_or_else(|| DEFAULT_DATA_DIR.to_owned()),
        );
        let (metrics_address, health_address) = telemetry_addresses(
            &mut problems,
            file.metrics_address.as_deref(),
            file.health_address.as_deref(),
        );
        let attestation = node_attestation(
            &mut problems,
            pick(flags.node_attestor, file.node_attestor),
            pick(flags.join_token, file.join_token),
            pick(flags.x509pop_cert_path, file.x509pop_cert_path),
            pick(flags.x509pop_key_path, file.x509pop_key_path),
        );
        problems.into_result()?;
        // Every value that failed pushed a problem above, so all are present here.
        let (
            Some(trust_domain),
            Some(server_addresses),
            Some(log_level),
            Some(log_format),
            Some(attestation),
        ) = (
            trust_domain,
            server_addresses,
            log_level,
            log_format,
            attestation,
        )
        else {
            return Err(ConfigError::incomplete());
        };
        Ok(Self {
            trust_domain,
            server_addresses,
            attestation,
            trust_bundle: pick(flags.trust_bundle, file.trust_bundle).map(PathBuf::from),
            socket_path,
            data_dir,
            metrics_address,
            health_address,
            log_level,
            log_format,
        })
    }
}

/// The `node_attestor` choice and what it needs, every conflict reported.
fn node_attestation(
    problems: &mut Problems,
    attestor: Option<String>,
    join_token: Option<String>,
    cert_path: Option<String>,
    key_path: Option<String>,
) -> Option<NodeAttestation> {
    match attestor.as_deref().unwrap_or("join_token") {
        "join_token" => {
            for (key, value) in [
                ("x509pop_cert_path", &cert_path),
                ("x509pop_key_path", &key_path),
            ] {
                if value.is_some() {
                    problems.push(key, "is for node_attestor = \"x509pop\"");
                }
            }
            Some(NodeAttestation::JoinToken(join_token))
        }
        "x509pop" => {
            if join_token.is_some() {
                problems.push(
                    "join_token",
                    "is for node_attestor = \"join_token\" (an x509pop agent proves its host certificate instead)",
                );
            }
            let mut path = |key: &str, value: Option<String>| match value {
                Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
                _ => {
                    problems.push(key, "is required with node_attestor = \"x509pop\"");
                    None
                }
            };
            let cert_path = path("x509pop_cert_path", cert_path);
            let key_path = path("x509pop_key_path", key_path);
            Some(NodeAttestation::X509Pop {
                cert_path: cert_path?,
                key_path: key_path?,
            })
        }
        other => {
            problems.push(
                "node_attestor",
                format!("{other:?} is not a node attestor (join_token or x509pop)"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c =
            AgentConfig::from_sources(Some("trust_domain = \"example.org\""), Overrides::default())
                .unwrap();
        assert_eq!(c.server_addresses.len(), 1);
        assert_eq!(c.server_addresses[0].to_string(), "127.0.0.1:8081");
        assert_eq!(c.server_addresses[0].port(), 8081);
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.attestation, NodeAttestation::JoinToken(None));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_level, LogLevel::Info);
        let c = AgentConfig::from_sources(
            Some("trust_domain = \"example.org\"\nserver_address = \"10.0.0.1:1\""),
            Overrides {
                server_address: vec!["server.example.org:8081".into()],
                join_token: Some("abc".into()),
                log_format: Some("json".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.server_addresses.len(), 1);
        assert_eq!(c.server_addresses[0].host(), "server.example.org");
        assert_eq!(
            c.attestation,
            NodeAttestation::JoinToken(Some("abc".into()))
        );
        assert!(!format!("{:?}", c.attestation).contains("abc"));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn x509pop_needs_its_two_paths_and_no_join_token() {
        let td = "trust_domain = \"example.org\"\n";
        let c = AgentConfig::from_sources(
            Some(&format!(
                "{td}node_attestor = \"x509pop\"\nx509pop_cert_path = \"/c.pem\""
            )),
            Overrides {
                x509pop_key_path: Some("/k.pem".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(
            c.attestation,
            NodeAttestation::X509Pop {
                cert_path: "/c.pem".into(),
                key_path: "/k.pem".into()
            }
        );
        let err = AgentConfig::from_sources(
            Some(&format!(
                "{td}node_attestor = \"x509pop\"\njoin_token = \"t\""
            )),
            Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.problems
                .iter()
                .map(|p| p.key.as_str())
                .collect::<Vec<_>>(),
            ["join_token", "x509pop_cert_path", "x509pop_key_path"]
        );
        let err = AgentConfig::from_sources(
            Some(&format!(
                "{td}x509pop_key_path = \"/k\"\nnode_attestor = \"tpm\""
            )),
            Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.problems
                .iter()
                .map(|p| p.key.as_str())
                .collect::<Vec<_>>(),
            ["node_attestor"]
        );
        let err = AgentConfig::from_sources(
            Some(&format!("{td}x509pop_key_path = \"/k\"")),
            Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("is for node_attestor = \"x509pop\""),
            "{err}"
        );
    }

    #[test]
    fn server_address_takes_a_list_in_the_file_or_repeated_flags() {
        let c = AgentConfig::from_sources(
            Some(
                "trust_domain = \"example.org\"\nserver_address = [\"a:1\", \"[::1]:2\", \"c:3\"]",
            ),
            Overrides::default(),
        )
        .unwrap();
        let shown: Vec<String> = c.server_addresses.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["a:1", "[::1]:2", "c:3"]);
        // The flags replace the file's list.
        let c = AgentConfig::from_sources(
            Some("trust_domain = \"example.org\"\nserver_address = [\"a:1\"]"),
            Overrides {
                server_address: vec!["x:1".into(), "y:2".into()],
                ..Overrides::default()
            },
        )
        .unwrap();
        let shown: Vec<String> = c.server_addresses.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["x:1", "y:2"]);
        for bad in ["[\"a:1\", \"a:1\"]", "[\"a:1\", \"b\"]", "[]", "3"] {
            let text = format!("trust_domain = \"example.org\"\nserver_address = {bad}");
            let result = AgentConfig::from_sources(Some(&text), Overrides::default());
            if bad == "[]" {
                // An empty list is the default.
                assert_eq!(result.unwrap().server_addresses.len(), 1);
                continue;
            }
            let err = result.unwrap_err();
            assert!(
                err.problems.iter().any(|p| p.key == "server_address"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let err = AgentConfig::from_sources(
            Some("trust_domain = \"Bad\"\nserver_address = \"nope\"\nsocket_path = \"rel.sock\"\nlog_level = \"loud\""),
            Overrides::default(),
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["trust_domain", "server_address", "log_level", "socket_path"]
        );
        // Every unknown key, not just the first, with the known keys still checked.
        let err = AgentConfig::from_sources(
            Some("colour = 1\nsize = 2\nlog_format = \"xml\"\ntrust_domain = \"example.org\""),
            Overrides::default(),
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["colour", "size", "log_format"], "{err}");
        assert_eq!(err.problems[0].message, "unknown key");
    }

    #[test]
    fn the_sample_config_documents_every_key_and_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/config/agent.toml");
        let text = std::fs::read_to_string(path).unwrap();
        AgentConfig::from_sources(Some(&text), Overrides::default()).unwrap();
        for key in KNOWN_KEYS {
            assert!(
                text.lines().any(|l| l
                    .trim_start_matches(['#', ' '])
                    .starts_with(&format!("{key} ="))),
                "examples/config/agent.toml does not document {key}"
            );
        }
    }
}
