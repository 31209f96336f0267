//! The broker's configuration: a TOML file (`sigil-broker run --config FILE`), every key
//! documented in `examples/config/broker.toml`, unknown keys refused, every problem reported at
//! once.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use sigil_core::{EndpointAddress, SpiffeId, TrustDomain};
use sigil_daemon::config::{ConfigError, Problems, parse_file};
pub use sigil_daemon::{LogFormat, LogLevel};

/// The file as written: every key optional here, checked in [`BrokerConfig::from_file`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket_path: Option<String>,
    spiffe_id: Option<String>,
    server_address: Option<Vec<String>>,
    spool_dir: Option<String>,
    record: Option<String>,
    stale_crl: Option<String>,
    federated_trust_domains: Option<Vec<String>>,
    log_level: Option<String>,
    log_format: Option<String>,
    target: Option<Vec<TargetFile>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    name: String,
    listen: String,
    kind: String,
    upstream: String,
    policy: String,
    upstream_tls: Option<bool>,
    upstream_spiffe_id: Option<String>,
}

const KNOWN_KEYS: &[&str] = &[
    "socket_path",
    "spiffe_id",
    "server_address",
    "spool_dir",
    "record",
    "stale_crl",
    "federated_trust_domains",
    "log_level",
    "log_format",
    "target",
];

/// When an event is durable before the connection or request it describes goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordMode {
    /// `fsync` of the spool before forwarding (the default).
    Sync,
    /// Group-committed within 10 ms: a crash can lose the last 10 ms of events.
    Async,
}

/// What to do with new connections once an authority's CRL is past its nextUpdate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleCrl {
    /// Refuse them until a fresh CRL arrives (the default).
    Refuse,
    /// Accept them (and say so in the log).
    Allow,
}

/// How a target is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A TCP stream: one decision (`connect`) per connection.
    Tcp,
    /// HTTP/1.1: one decision (the method) per request.
    Http,
}

/// Where the upstream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A TCP address (`host:port`).
    Tcp(String),
    /// A Unix socket (`unix:/path`).
    Unix(PathBuf),
}

/// One privileged target behind the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its name: the Cedar resource `Sigil::Target::"<name>"` and the audit subject.
    pub name: String,
    /// Where clients connect (mTLS).
    pub listen: SocketAddr,
    /// TCP or HTTP.
    pub kind: TargetKind,
    /// Where allowed traffic goes.
    pub upstream: Upstream,
    /// The Cedar policy file.
    pub policy: PathBuf,
    /// The SPIFFE ID the upstream must present when the broker speaks TLS to it with its own
    /// SVID (`upstream_tls = true`); `None` for plain TCP to the upstream.
    pub upstream_spiffe_id: Option<SpiffeId>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// The Workload API socket the broker's own SVID, bundle and CRLs come from.
    pub socket_path: PathBuf,
    /// Which of the Workload API's SVIDs is the broker's (default: the first).
    pub spiffe_id: Option<SpiffeId>,
    /// The server(s) audit events are forwarded to (`host:port`), tried in turn.
    pub server_addresses: Vec<String>,
    /// Where events wait until the server acknowledged them.
    pub spool_dir: PathBuf,
    /// When an event is durable.
    pub record: RecordMode,
    /// What a stale CRL means for new connections.
    pub stale_crl: StaleCrl,
    /// Federated trust domains whose workloads may connect (each needs the broker's own entry
    /// to federate with it, so that the Workload API hands the broker its bundle); the
    /// policies decide what they may do. Empty: the broker's own trust domain only.
    pub federated_trust_domains: Vec<TrustDomain>,
    /// The targets.
    pub targets: Vec<Target>,
    /// Log level.
    pub log_level: LogLevel,
    /// Log format.
    pub log_format: LogFormat,
}

impl BrokerConfig {
    /// Reads the configuration from the file's text; `env_socket` is `SPIFFE_ENDPOINT_SOCKET`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] listing every problem.
    pub fn from_file(text: &str, env_socket: Option<&str>) -> Result<Self, ConfigError> {
        let mut problems = Problems::default();
        let file: FileConfig = parse_file(text, KNOWN_KEYS, &mut problems);
        let socket_path = match EndpointAddress::resolve(file.socket_path.as_deref(), env_socket) {
            None => {
                problems.push(
                    "socket_path",
                    "set socket_path or SPIFFE_ENDPOINT_SOCKET to the Workload API socket",
                );
                None
            }
            Some(Err(e)) => {
                problems.push("socket_path", e.to_string());
                None
            }
            Some(Ok(address)) => match address.unix_path() {
                Some(path) => Some(path.to_owned()),
                None => {
                    problems.push("socket_path", "the Workload API must be a unix: socket");
                    None
                }
            },
        };
        let spiffe_id = file
            .spiffe_id
            .and_then(|id| problems.check("spiffe_id", SpiffeId::new(&id)));
        let server_addresses = file.server_address.unwrap_or_default();
        if server_addresses.is_empty() {
            problems.push(
                "server_address",
                "list at least one server (host:port) to forward audit events to",
            );
        }
        let spool_dir = file.spool_dir.map(PathBuf::from);
        if spool_dir.is_none() {
            problems.push("spool_dir", "required: where events wait for the server");
        }
        let record = match file.record.as_deref() {
            None | Some("sync") => RecordMode::Sync,
            Some("async") => RecordMode::Async,
            Some(other) => {
                problems.push("record", format!("{other:?}: write \"sync\" or \"async\""));
                RecordMode::Sync
            }
        };
        let stale_crl = match file.stale_crl.as_deref() {
            None | Some("refuse") => StaleCrl::Refuse,
            Some("allow") => StaleCrl::Allow,
            Some(other) => {
                problems.push(
                    "stale_crl",
                    format!("{other:?}: write \"refuse\" or \"allow\""),
                );
                StaleCrl::Refuse
            }
        };
        let mut federated_trust_domains = Vec::new();
        for td in file.federated_trust_domains.unwrap_or_default() {
            match TrustDomain::new(&td) {
                Ok(td) if federated_trust_domains.contains(&td) => {
                    problems.push("federated_trust_domains", format!("{td} is listed twice"))
                }
                Ok(td) if spiffe_id.as_ref().is_some_and(|id| id.trust_domain() == td) => {
                    problems.push(
                        "federated_trust_domains",
                        format!("{td} is the broker's own trust domain, always accepted"),
                    );
                }
                Ok(td) => federated_trust_domains.push(td),
                Err(e) => problems.push("federated_trust_domains", format!("{td:?}: {e}")),
            }
        }
        let mut targets = Vec::new();
        for t in file.target.unwrap_or_default() {
            if let Some(target) = check_target(t, &targets, &mut problems) {
                targets.push(target);
            }
        }
        if targets.is_empty() {
            problems.push("target", "configure at least one [[target]]");
        }
        let log_level = problems
            .check(
                "log_level",
                file.log_level.as_deref().unwrap_or("info").parse(),
            )
            .unwrap_or(LogLevel::Info);
        let log_format = problems
            .check(
                "log_format",
                file.log_format.as_deref().unwrap_or("text").parse(),
            )
            .unwrap_or(LogFormat::Text);
        problems.into_result()?;
        match (socket_path, spool_dir) {
            (Some(socket_path), Some(spool_dir)) => Ok(Self {
                socket_path,
                spiffe_id,
                server_addresses,
                spool_dir,
                record,
                stale_crl,
                federated_trust_domains,
                targets,
                log_level,
                log_format,
            }),
            _ => Err(ConfigError::incomplete()),
        }
    }
}

fn check_target(t: TargetFile, earlier: &[Target], problems: &mut Problems) -> Option<Target> {
    let key = format!("target {:?}", t.name);
    let mut ok = true;
    let valid_name = !t.name.is_empty()
        && t.name.len() <= 64
        && t.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid_name {
        problems.push(
            &key,
            "name must be 1 to 64 letters, digits, '-', '_' or '.'",
        );
        ok = false;
    }
    if earlier.iter().any(|e| e.name == t.name) {
        problems.push(&key, "two targets have this name");
        ok = false;
    }
    let listen = problems.check(&format!("{key}.listen"), t.listen.parse::<SocketAddr>());
    // Port 0 (any free port) is a distinct port for each target.
    if listen.is_some_and(|l| l.port() != 0 && earlier.iter().any(|e| e.listen == l)) {
        problems.push(&key, "two targets listen on this address");
        ok = false;
    }
    let kind = match t.kind.as_str() {
        "tcp" => Some(TargetKind::Tcp),
        "http" => Some(TargetKind::Http),
        other => {
            problems.push(
                &format!("{key}.kind"),
                format!("{other:?}: write \"tcp\" or \"http\""),
            );
            None
        }
    };
    let upstream = match t.upstream.strip_prefix("unix:") {
        Some(path) if path.starts_with('/') => Some(Upstream::Unix(PathBuf::from(path))),
        Some(_) => {
            problems.push(&format!("{key}.upstream"), "unix: needs an absolute path");
            None
        }
        None if t
            .upstream
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)) =>
        {
            Some(Upstream::Tcp(t.upstream.clone()))
        }
        None => {
            problems.push(
                &format!("{key}.upstream"),
                "write host:port or unix:/absolute/path",
            );
            None
        }
    };
    let upstream_spiffe_id = match (t.upstream_tls.unwrap_or(false), t.upstream_spiffe_id) {
        (true, Some(id)) => {
            problems.check(&format!("{key}.upstream_spiffe_id"), SpiffeId::new(&id))
        }
        (true, None) => {
            problems.push(
                &format!("{key}.upstream_spiffe_id"),
                "required with upstream_tls: the upstream's expected SPIFFE ID (otherwise any \
                 SVID of the trust domain could sit in the middle)",
            );
            ok = false;
            None
        }
        (false, Some(_)) => {
            problems.push(
                &format!("{key}.upstream_spiffe_id"),
                "only meaningful with upstream_tls = true",
            );
            ok = false;
            None
        }
        (false, None) => None,
    };
    Some(Target {
        name: t.name,
        listen: listen?,
        kind: kind?,
        upstream: upstream?,
        policy: PathBuf::from(t.policy),
        upstream_spiffe_id,
    })
    .filter(|_| ok)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    const GOOD: &str = r#"
socket_path = "unix:///run/sigil/api.sock"
server_address = ["10.0.0.1:8081", "10.0.0.2:8081"]
spool_dir = "/var/lib/sigil-broker"
record = "async"

[[target]]
name = "db"
listen = "127.0.0.1:15432"
kind = "tcp"
upstream = "127.0.0.1:5432"
policy = "/etc/sigil-broker/db.cedar"

[[target]]
name = "admin-api"
listen = "127.0.0.1:18443"
kind = "http"
upstream = "unix:/run/admin.sock"
policy = "/etc/sigil-broker/admin.cedar"
upstream_tls = true
upstream_spiffe_id = "spiffe://example.org/admin-api"
"#;

    #[test]
    fn the_example_documents_every_key_and_parses() {
        let example = include_str!("../../examples/config/broker.toml");
        for key in KNOWN_KEYS {
            assert!(
                example.contains(&format!("{key} =")) || example.contains(&format!("[[{key}]]")),
                "{key}"
            );
        }
        for key in [
            "name",
            "listen",
            "kind",
            "upstream",
            "policy",
            "upstream_tls",
            "upstream_spiffe_id",
        ] {
            assert!(example.contains(&format!("{key} =")), "target.{key}");
        }
        let c = BrokerConfig::from_file(example, None).unwrap();
        assert_eq!(c.targets[0].name, "db");
        // With every commented key set as shown, it still reads.
        let all: String = example
            .lines()
            .map(|l| {
                // Only the commented-out settings (`# key = value`), not prose.
                l.strip_prefix("# ")
                    .filter(|r| {
                        r.split_once(" = ").is_some_and(|(key, _)| {
                            !key.is_empty()
                                && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                        })
                    })
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        BrokerConfig::from_file(&all, None).unwrap();
    }

    fn keys(err: &ConfigError) -> Vec<String> {
        err.problems.iter().map(|p| p.key.clone()).collect()
    }

    #[test]
    fn a_full_file_reads_back() {
        let c = BrokerConfig::from_file(GOOD, None).unwrap();
        assert_eq!(c.socket_path, PathBuf::from("/run/sigil/api.sock"));
        assert_eq!(c.server_addresses.len(), 2);
        assert_eq!(c.record, RecordMode::Async);
        assert_eq!(c.stale_crl, StaleCrl::Refuse);
        assert_eq!(c.targets.len(), 2);
        assert_eq!(c.targets[0].kind, TargetKind::Tcp);
        assert_eq!(
            c.targets[0].upstream,
            Upstream::Tcp("127.0.0.1:5432".into())
        );
        assert_eq!(
            c.targets[1].upstream,
            Upstream::Unix("/run/admin.sock".into())
        );
        assert_eq!(
            c.targets[1]
                .upstream_spiffe_id
                .as_ref()
                .map(SpiffeId::as_str),
            Some("spiffe://example.org/admin-api")
        );
    }

    #[test]
    fn two_targets_may_not_share_an_address_but_may_both_take_any_free_port() {
        let shared = GOOD.replace("127.0.0.1:18443", "127.0.0.1:15432");
        let err = BrokerConfig::from_file(&shared, None).unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.message.contains("two targets listen on this address")),
            "{err}"
        );
        let any = GOOD
            .replace("127.0.0.1:18443", "127.0.0.1:0")
            .replace("127.0.0.1:15432", "127.0.0.1:0");
        let c = BrokerConfig::from_file(&any, None).unwrap();
        assert_eq!(c.targets.len(), 2);
    }

    #[test]
    fn the_socket_comes_from_the_environment_when_the_file_has_none() {
        let text = GOOD.replace("socket_path = \"unix:///run/sigil/api.sock\"\n", "");
        let c = BrokerConfig::from_file(&text, Some("unix:///tmp/x.sock")).unwrap();
        assert_eq!(c.socket_path, PathBuf::from("/tmp/x.sock"));
        let err = BrokerConfig::from_file(&text, None).unwrap_err();
        assert_eq!(keys(&err), ["socket_path"]);
    }

    #[test]
    fn federated_trust_domains_are_checked() {
        let c = BrokerConfig::from_file(GOOD, None).unwrap();
        assert!(c.federated_trust_domains.is_empty());
        let text = format!(
            "federated_trust_domains = [\"spiffe://ledger.example\", \"b.example\"]\n{GOOD}"
        );
        let c = BrokerConfig::from_file(&text, None).unwrap();
        let names: Vec<_> = c
            .federated_trust_domains
            .iter()
            .map(|t| t.name().to_owned())
            .collect();
        assert_eq!(names, ["ledger.example", "b.example"]);
        for (list, why) in [
            ("[\"a.example\", \"a.example\"]", "twice"),
            ("[\"Not A Domain\"]", "Not A Domain"),
        ] {
            let text = format!("federated_trust_domains = {list}\n{GOOD}");
            let err = BrokerConfig::from_file(&text, None).unwrap_err();
            assert_eq!(keys(&err), ["federated_trust_domains"], "{err}");
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let bad = r#"
colour = "blue"
record = "later"
stale_crl = "maybe"
[[target]]
name = "bad name"
listen = "nowhere"
kind = "udp"
upstream = "nohost"
policy = "p.cedar"
upstream_tls = true
"#;
        let err = BrokerConfig::from_file(bad, None).unwrap_err();
        let keys = keys(&err);
        for key in [
            "colour",
            "socket_path",
            "server_address",
            "spool_dir",
            "record",
            "stale_crl",
            "target \"bad name\"",
            "target \"bad name\".listen",
            "target \"bad name\".kind",
            "target \"bad name\".upstream",
            "target \"bad name\".upstream_spiffe_id",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
        let unknown_in_target = GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\ncolour = 1");
        let err = BrokerConfig::from_file(&unknown_in_target, None).unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.key == "target" && p.message.contains("colour")),
            "an unknown key inside a target is refused: {err}"
        );
    }
}
