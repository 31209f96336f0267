//! The server's rules about identities and lifetimes, each written once.
//!
//! - Which SPIFFE IDs the server keeps for itself and its agents (everything under
//!   [`RESERVED_PATH_PREFIX`]), and which an entry, a session, a join token's alias or a minted
//!   SVID may grant ([`check_workload_id`]).
//! - Which DNS names a certificate may carry ([`check_dns_name`]).
//! - How long each kind of credential lives ([`TtlPolicy`]): defaults, and the cap every SVID
//!   obeys (`ca_ttl / 6`, so that an SVID never outlives the authority that signed it by more
//!   than the rotation overlap allows).
//!
//! Pure functions over `sigil-core` types: the CA, the services and the configuration all ask
//! here, so a rule changes in one place.

use std::time::{Duration, SystemTime};

use sigil_core::{SelectorSet, SpiffeId, SpiffeIdError, TrustDomain};

/// The first path segments of every ID the server reserves for itself and its agents.
pub(crate) const RESERVED_PATH_PREFIX: &str = "/sigil/";

/// The path prefix of agent IDs (`spiffe://TD/sigil/agent/...`).
pub(crate) const AGENT_PATH_PREFIX: &str = "/sigil/agent/";

/// The path of the server's own ID.
pub(crate) const SERVER_PATH: &str = "/sigil/server";

/// Default `max_session_ttl`.
pub(crate) const DEFAULT_MAX_SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Default `session_svid_ttl`.
pub(crate) const DEFAULT_SESSION_SVID_TTL: Duration = Duration::from_secs(300);

/// Lifetime of a join token when the request gives none (SPIRE's default).
pub(crate) const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(600);

/// The longest join token lifetime.
pub(crate) const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most bytes an entry may take on the wire ([`entry_wire_size`]): far below the 4 MiB
/// message limit, so that any page of a sync stream holds at least one entry.
pub(crate) const MAX_ENTRY_WIRE_BYTES: usize = 256 * 1024;

/// An upper bound of the bytes an entry takes in a protobuf message: its strings plus a fixed
/// allowance per field for tags, lengths and the numbers (TTLs, times, revision, ids).
pub(crate) fn entry_wire_size(
    spiffe_id: &SpiffeId,
    parent_id: &SpiffeId,
    selectors: &SelectorSet,
    dns_names: &[String],
    hint: &str,
) -> usize {
    const FIELD: usize = 16;
    const FIXED: usize = 160;
    FIXED
        + spiffe_id.as_str().len()
        + parent_id.as_str().len()
        + hint.len()
        + selectors
            .iter()
            .map(|s| s.kind().len() + 1 + s.value().len() + FIELD)
            .sum::<usize>()
        + dns_names.iter().map(|d| d.len() + FIELD).sum::<usize>()
}

/// Why an ID may not be granted to a workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum IdPolicyError {
    /// The ID belongs to another trust domain.
    #[error("{id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The ID.
        id: SpiffeId,
        /// The server's trust domain.
        trust_domain: TrustDomain,
    },
    /// The ID is the trust domain itself, with no path.
    #[error("{id} has no path; a workload ID needs one")]
    Root {
        /// The ID.
        id: SpiffeId,
    },
    /// The ID is under the reserved `/sigil/` path.
    #[error("{id} is under /sigil/, which is reserved for the server and agents")]
    Reserved {
        /// The ID.
        id: SpiffeId,
    },
}

/// Why a DNS name may not go into a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dns name {name:?} is not valid: {reason}")]
pub(crate) struct DnsNameError {
    /// The name.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Why a requested lifetime was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TtlError {
    /// A join token lifetime over [`MAX_JOIN_TOKEN_TTL`].
    #[error("ttl is longer than the maximum of 7d")]
    JoinTokenTooLong,
}

/// The lifetimes of every credential kind: defaults and caps, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// X509-SVID lifetime of entries and mints that name none (`default_x509_svid_ttl`).
    pub x509_default: Duration,
    /// JWT-SVID lifetime of entries and mints that name none (`default_jwt_svid_ttl`).
    pub jwt_default: Duration,
    /// Agent X509-SVID lifetime (`agent_svid_ttl`), before the cap.
    pub agent: Duration,
    /// Lifetime of each SVID issued under a session that names none (`session_svid_ttl`).
    pub session_svid_default: Duration,
    /// The longest privileged session (`max_session_ttl`).
    pub max_session: Duration,
    /// The cap of every SVID lifetime: `ca_ttl / 6`.
    pub max_svid: Duration,
}

// === impl TtlPolicy ===

impl TtlPolicy {
    /// The lifetime of a workload X509-SVID whose entry or request names `requested`.
    pub fn x509(&self, requested: Option<Duration>) -> Duration {
        requested.unwrap_or(self.x509_default).min(self.max_svid)
    }

    /// The lifetime of a JWT-SVID whose entry or request names `requested`.
    pub fn jwt(&self, requested: Option<Duration>) -> Duration {
        requested.unwrap_or(self.jwt_default).min(self.max_svid)
    }

    /// The lifetime of a JWT-SVID signed at `now` for an entry that names `requested` and ends
    /// at `end` (a privileged session's entry): a JWT-SVID never outlives its entry.
    pub fn jwt_until(
        &self,
        requested: Option<Duration>,
        end: Option<SystemTime>,
        now: SystemTime,
    ) -> Duration {
        let ttl = self.jwt(requested);
        match end {
            Some(end) => ttl.min(end.duration_since(now).unwrap_or(Duration::ZERO)),
            None => ttl,
        }
    }

    /// The lifetime of agent SVIDs and of the server's own SVID.
    pub fn agent_svid(&self) -> Duration {
        self.agent.min(self.max_svid)
    }

    /// The lifetime of a join token; `requested` `None` means the default.
    ///
    /// # Errors
    ///
    /// [`TtlError::JoinTokenTooLong`] past [`MAX_JOIN_TOKEN_TTL`].
    pub fn join_token(&self, requested: Option<Duration>) -> Result<Duration, TtlError> {
        let ttl = requested.unwrap_or(DEFAULT_JOIN_TOKEN_TTL);
        if ttl > MAX_JOIN_TOKEN_TTL {
            return Err(TtlError::JoinTokenTooLong);
        }
        Ok(ttl)
    }

    /// The SVID lifetime of a session of `session_ttl` that asks for `requested`, or every
    /// problem with the two (each as a sentence for the operator).
    pub fn session(
        &self,
        session_ttl: Duration,
        requested: Option<Duration>,
    ) -> Result<Duration, Vec<String>> {
        let mut problems = Vec::new();
        if session_ttl.is_zero() {
            problems.push("ttl is required".to_owned());
        } else if session_ttl > self.max_session {
            problems.push(format!(
                "ttl {}s is longer than the server's max_session_ttl {}s",
                session_ttl.as_secs(),
                self.max_session.as_secs()
            ));
        }
        let svid_ttl = requested.unwrap_or(self.session_svid_default);
        if svid_ttl >= session_ttl && !session_ttl.is_zero() {
            problems.push(format!(
                "svid ttl {}s must be shorter than the session ttl {}s",
                svid_ttl.as_secs(),
                session_ttl.as_secs()
            ));
        }
        if svid_ttl > self.max_svid {
            problems.push(format!(
                "svid ttl {}s is longer than ca_ttl / 6 = {}s",
                svid_ttl.as_secs(),
                self.max_svid.as_secs()
            ));
        }
        if problems.is_empty() {
            Ok(svid_ttl)
        } else {
            Err(problems)
        }
    }
}

// === identities ===

/// True for the reserved `/sigil` path and everything under it, which no entry may grant.
pub(crate) fn is_reserved(id: &SpiffeId) -> bool {
    let path = id.path();
    path.starts_with(RESERVED_PATH_PREFIX) || path == RESERVED_PATH_PREFIX.trim_end_matches('/')
}

/// The selector types node attestation produces (entries parented to the server's ID, the
/// node aliases, may use only these).
pub(crate) const NODE_SELECTOR_TYPES: &[&str] = &[sigil_attestors::x509pop::NAME];

/// True for `spiffe://TD/sigil/agent/<something>` in `trust_domain`.
pub(crate) fn is_agent_id(trust_domain: &TrustDomain, id: &SpiffeId) -> bool {
    id.is_member_of(trust_domain)
        && id.path().starts_with(AGENT_PATH_PREFIX)
        && id.path().len() > AGENT_PATH_PREFIX.len()
}

/// The server's own ID, `spiffe://TD/sigil/server`.
///
/// # Errors
///
/// None in practice: the path is a valid constant.
pub(crate) fn server_id(trust_domain: &TrustDomain) -> Result<SpiffeId, SpiffeIdError> {
    trust_domain.id_from_path(SERVER_PATH)
}

/// Checks that `id` may be granted to a workload: in `trust_domain`, with a path, and not
/// reserved. Entries, sessions, join token aliases and minted SVIDs all obey it.
///
/// # Errors
///
/// The first rule `id` breaks.
pub(crate) fn check_workload_id(
    trust_domain: &TrustDomain,
    id: &SpiffeId,
) -> Result<(), IdPolicyError> {
    if !id.is_member_of(trust_domain) {
        return Err(IdPolicyError::ForeignTrustDomain {
            id: id.clone(),
            trust_domain: trust_domain.clone(),
        });
    }
    if id.is_root() {
        return Err(IdPolicyError::Root { id: id.clone() });
    }
    if is_reserved(id) {
        return Err(IdPolicyError::Reserved { id: id.clone() });
    }
    Ok(())
}

/// The SPIFFE ID prefixes (`session_only_ids`) whose IDs are granted only through approved
/// privileged sessions: no entry, mint or join token alias may name them, and every session
/// for them waits for a second admin's approval, whatever `require_session_approval` says.
///
/// A prefix matches on whole path segments: `spiffe://td/admin` covers `spiffe://td/admin` and
/// `spiffe://td/admin/db`, not `spiffe://td/administrator`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SessionOnly {
    prefixes: Vec<SpiffeId>,
}

// === impl SessionOnly ===

impl SessionOnly {
    /// The rule for `prefixes` (none: every ID may be granted outside sessions).
    pub(crate) fn new(prefixes: Vec<SpiffeId>) -> Self {
        Self { prefixes }
    }

    /// The prefixes.
    pub(crate) fn prefixes(&self) -> &[SpiffeId] {
        &self.prefixes
    }

    /// The first prefix that covers `id`, if any.
    pub(crate) fn covering(&self, id: &SpiffeId) -> Option<&SpiffeId> {
        self.prefixes.iter().find(|prefix| {
            if prefix.trust_domain_name() != id.trust_domain_name() {
                return false;
            }
            let (prefix, path) = (prefix.path(), id.path());
            path == prefix
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Refuses `id` when a prefix covers it, with what to do instead: `what` names the refused
    /// way (`"an entry"`, `"x509 mint"`).
    ///
    /// # Errors
    ///
    /// A message for the operator.
    pub(crate) fn refuse(&self, id: &SpiffeId, what: &str) -> Result<(), String> {
        match self.covering(id) {
            None => Ok(()),
            Some(prefix) => Err(format!(
                "{id} is under session_only_ids prefix {prefix}: it is granted only through an \
                 approved privileged session, not by {what}; open one with `sigil-server session \
                 open --spiffe-id {id} --ticket ... --reason ...`"
            )),
        }
    }
}

/// Checks a DNS SAN: 1 to 253 characters, dot-separated labels of 1 to 63 ASCII letters,
/// digits and hyphens (not at either end of a label), the first label optionally `*`.
///
/// # Errors
///
/// [`DnsNameError`] naming the rule broken.
pub(crate) fn check_dns_name(name: &str) -> Result<(), DnsNameError> {
    let invalid = |reason| {
        Err(DnsNameError {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 253 {
        return invalid("must be 1 to 253 characters long");
    }
    for (index, label) in name.split('.').enumerate() {
        if index == 0 && label == "*" {
            continue;
        }
        if label.is_empty() || label.len() > 63 {
            return invalid("each label must be 1 to 63 characters long");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return invalid("labels may hold only letters, digits and hyphens");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return invalid("labels may not start or end with a hyphen");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn policy() -> TtlPolicy {
        TtlPolicy {
            x509_default: Duration::from_secs(3600),
            jwt_default: Duration::from_secs(300),
            agent: Duration::from_secs(7200),
            session_svid_default: Duration::from_secs(300),
            max_session: Duration::from_secs(8 * 3600),
            max_svid: Duration::from_secs(4 * 3600),
        }
    }

    #[test]
    fn session_only_prefixes_match_whole_segments() {
        let rule = SessionOnly::new(vec![id("spiffe://example.org/admin")]);
        for covered in [
            "spiffe://example.org/admin",
            "spiffe://example.org/admin/db",
            "spiffe://example.org/admin/db/root",
        ] {
            assert_eq!(
                rule.covering(&id(covered)).map(SpiffeId::as_str),
                Some("spiffe://example.org/admin"),
                "{covered}"
            );
            let refused = rule.refuse(&id(covered), "an entry").unwrap_err();
            assert!(refused.contains("session open"), "{refused}");
        }
        for free in [
            "spiffe://example.org/administrator",
            "spiffe://example.org/adm",
            "spiffe://example.org/web/admin",
            "spiffe://other.org/admin",
        ] {
            assert_eq!(rule.covering(&id(free)), None, "{free}");
            assert_eq!(rule.refuse(&id(free), "an entry"), Ok(()));
        }
        assert_eq!(
            SessionOnly::default().covering(&id("spiffe://example.org/admin")),
            None
        );
    }

    #[test]
    fn reserved_paths() {
        assert!(is_reserved(&id("spiffe://example.org/sigil")));
        assert!(is_reserved(&id("spiffe://example.org/sigil/agent/x")));
        assert!(is_reserved(&id("spiffe://example.org/sigil/server")));
        assert!(!is_reserved(&id("spiffe://example.org/sigilx")));
        assert!(!is_reserved(&id("spiffe://example.org/app/sigil")));
    }

    #[test]
    fn agent_ids() {
        assert!(is_agent_id(
            &td(),
            &id("spiffe://example.org/sigil/agent/x")
        ));
        assert!(!is_agent_id(&td(), &id("spiffe://other.org/sigil/agent/x")));
        assert!(!is_agent_id(
            &td(),
            &id("spiffe://example.org/sigil/server")
        ));
        assert!(!is_agent_id(&td(), &id("spiffe://example.org/app")));
        assert_eq!(
            server_id(&td()).unwrap().to_string(),
            "spiffe://example.org/sigil/server"
        );
    }

    #[test]
    fn workload_ids() {
        assert_eq!(
            check_workload_id(&td(), &id("spiffe://example.org/web")),
            Ok(())
        );
        assert!(matches!(
            check_workload_id(&td(), &id("spiffe://other.org/web")),
            Err(IdPolicyError::ForeignTrustDomain { .. })
        ));
        assert!(matches!(
            check_workload_id(&td(), &id("spiffe://example.org")),
            Err(IdPolicyError::Root { .. })
        ));
        let err = check_workload_id(&td(), &id("spiffe://example.org/sigil/agent/x")).unwrap_err();
        assert!(matches!(err, IdPolicyError::Reserved { .. }));
        assert!(err.to_string().contains("reserved"), "{err}");
    }

    #[test]
    fn dns_names() {
        for good in ["example.org", "*.example.org", "a-b.c", "x", "1.2.3.4"] {
            check_dns_name(good).unwrap();
        }
        let long_label = "a".repeat(64);
        let long_name = format!("{}.org", ["a"; 126].join("."));
        for bad in [
            "",
            "a..b",
            ".a",
            "-a.b",
            "a-.b",
            "a.*.b",
            "a*b.c",
            "a b",
            "a_b.c",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(check_dns_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ttls_default_and_cap() {
        let p = policy();
        assert_eq!(p.x509(None), Duration::from_secs(3600));
        assert_eq!(
            p.x509(Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(p.x509(Some(Duration::from_secs(86_400))), p.max_svid);
        assert_eq!(p.jwt(None), Duration::from_secs(300));
        assert_eq!(p.jwt(Some(Duration::from_secs(86_400))), p.max_svid);
        assert_eq!(p.agent_svid(), Duration::from_secs(7200));
        let capped = TtlPolicy {
            agent: Duration::from_secs(86_400),
            ..p
        };
        assert_eq!(capped.agent_svid(), p.max_svid);
    }

    #[test]
    fn jwt_never_outlives_its_entry() {
        let p = policy();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = now + Duration::from_secs(42);
        assert_eq!(p.jwt_until(None, Some(end), now), Duration::from_secs(42));
        assert_eq!(p.jwt_until(None, None, now), Duration::from_secs(300));
        assert_eq!(p.jwt_until(None, Some(now), now), Duration::ZERO);
    }

    #[test]
    fn join_token_ttls() {
        let p = policy();
        assert_eq!(p.join_token(None), Ok(DEFAULT_JOIN_TOKEN_TTL));
        assert_eq!(
            p.join_token(Some(MAX_JOIN_TOKEN_TTL)),
            Ok(MAX_JOIN_TOKEN_TTL)
        );
        assert_eq!(
            p.join_token(Some(MAX_JOIN_TOKEN_TTL + Duration::from_secs(1))),
            Err(TtlError::JoinTokenTooLong)
        );
    }

    #[test]
    fn session_ttls() {
        let p = policy();
        let hour = Duration::from_secs(3600);
        assert_eq!(p.session(hour, None), Ok(Duration::from_secs(300)));
        assert_eq!(
            p.session(hour, Some(Duration::from_secs(60))),
            Ok(Duration::from_secs(60))
        );
        let problems = p.session(Duration::ZERO, None).unwrap_err();
        assert_eq!(problems, vec!["ttl is required".to_owned()]);
        let problems = p.session(Duration::from_secs(9 * 3600), None).unwrap_err();
        assert!(problems[0].contains("max_session_ttl"), "{problems:?}");
        let problems = p.session(Duration::from_secs(200), None).unwrap_err();
        assert!(problems[0].contains("must be shorter"), "{problems:?}");
        let problems = p
            .session(
                Duration::from_secs(8 * 3600),
                Some(Duration::from_secs(5 * 3600)),
            )
            .unwrap_err();
        assert!(
            problems.iter().any(|m| m.contains("ca_ttl / 6")),
            "{problems:?}"
        );
    }
}
