//! SPIFFE IDs and trust domain names ([SPIFFE-ID §2]).
//!
//! Parse, don't validate: a [`TrustDomain`] or [`SpiffeId`] can only be made through a
//! constructor that checks every rule, so a value that exists is valid and nothing downstream
//! checks it again. Nothing is normalised: an ID that breaks a rule (an uppercase trust domain, a
//! trailing `/`, percent-encoding) is rejected, never repaired.
//!
//! IDs are built from validated parts ([`TrustDomain::id`], [`SpiffeId::join`]), never by string
//! concatenation.
//!
//! [SPIFFE-ID §2]: https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest SPIFFE ID, in bytes, including `spiffe://` ([SPIFFE-ID §2.3], ID-18).
///
/// Longer IDs are refused both when parsing and when building (the spec lets a parser choose;
/// Sigil rejects, so that nothing it accepts is something it could not have issued).
///
/// [SPIFFE-ID §2.3]: https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md#23-maximum-spiffe-id-length
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// The longest trust domain name, in bytes (the URI host limit, [SPIFFE-ID §2.1], ID-19).
///
/// [SPIFFE-ID §2.1]: https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md#21-trust-domain
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The scheme and authority separator every SPIFFE ID starts with.
pub const SPIFFE_PREFIX: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID, trust domain or path segment.
///
/// The messages follow go-spiffe's where it has one, so operators see familiar words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("cannot be empty")]
    Empty,
    /// The input does not start with `spiffe://` (ID-1; the scheme is matched case-sensitively).
    #[error("scheme is missing or invalid")]
    WrongScheme,
    /// There is no trust domain between `spiffe://` and the path (ID-2).
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// The trust domain has a character outside `a-z 0-9 . - _` (ID-7, ID-8).
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
    )]
    BadTrustDomainChar,
    /// The trust domain is percent-encoded (ID-9).
    #[error("trust domain cannot be percent-encoded")]
    TrustDomainPercentEncoded,
    /// The authority has userinfo (`user@`) (ID-5).
    #[error("trust domain cannot contain userinfo")]
    UserInfo,
    /// The authority has a port (ID-6).
    #[error("trust domain cannot contain a port")]
    Port,
    /// The trust domain is an IPv6 literal (ID-10).
    #[error("trust domain cannot be an IPv6 address")]
    Ipv6,
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`] bytes (ID-19).
    #[error("trust domain is {len} bytes long; the maximum is 255")]
    TrustDomainTooLong {
        /// The length found, in bytes.
        len: usize,
    },
    /// The ID has a query component (ID-3).
    #[error("query is not allowed")]
    Query,
    /// The ID has a fragment component (ID-4).
    #[error("fragment is not allowed")]
    Fragment,
    /// A path segment has a character outside `a-z A-Z 0-9 . - _` (ID-17).
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
    )]
    BadPathChar,
    /// The path is percent-encoded (ID-13).
    #[error("path cannot be percent-encoded")]
    PathPercentEncoded,
    /// The path has an empty segment, as in `//` (ID-14).
    #[error("path cannot contain empty segments")]
    EmptySegment,
    /// The path has a `.` or `..` segment (ID-16).
    #[error("path cannot contain dot segments")]
    DotSegment,
    /// The path ends with `/` (ID-15).
    #[error("path cannot have a trailing slash")]
    TrailingSlash,
    /// A non-empty path given to a path builder does not start with `/` (ID-12).
    #[error("path must have a leading slash")]
    NoLeadingSlash,
    /// The whole ID is longer than [`MAX_SPIFFE_ID_LEN`] bytes (ID-18).
    #[error("spiffe id is {len} bytes long; the maximum is 2048")]
    TooLong {
        /// The length found, in bytes.
        len: usize,
    },
}

/// A trust domain name, such as `example.org` (ID-7 to ID-10, ID-19, ID-22).
///
/// Displays as the bare name; [`TrustDomain::id_string`] gives the `spiffe://` form used as a key
/// in the Workload API's bundle maps.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain {
    name: String,
}

/// A SPIFFE ID: `spiffe://<trust domain>[/<segment>...]` (ID-1 to ID-20).
///
/// Compares byte for byte; the path is case-sensitive (ID-20).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID, `spiffe://td/path` (exact size: IDs are kept by the thousand).
    id: Box<str>,
    /// Byte offset of the path (the first `/` after the trust domain, or `id.len()`).
    path_start: usize,
}

// === impl TrustDomain ===

impl TrustDomain {
    /// Parses a trust domain name, given bare (`example.org`) or as a SPIFFE ID with no path
    /// (`spiffe://example.org`), as go-spiffe does (ID-22).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if name.contains(":/") {
            // The `spiffe://` form: it must be a root ID.
            let id = SpiffeId::new(name)?;
            if !id.is_root() {
                return Err(SpiffeIdError::BadTrustDomainChar);
            }
            return Ok(id.trust_domain());
        }
        check_authority(name)?;
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// The bare name, `example.org`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The trust domain's own SPIFFE ID string, `spiffe://example.org`: the key the Workload API
    /// uses in its bundle maps.
    pub fn id_string(&self) -> String {
        format!("{SPIFFE_PREFIX}{}", self.name)
    }

    /// The trust domain's own SPIFFE ID (no path), which its signing authorities carry (SV-1).
    pub fn root_id(&self) -> SpiffeId {
        SpiffeId {
            id: self.id_string().into(),
            path_start: SPIFFE_PREFIX.len() + self.name.len(),
        }
    }

    /// Builds the ID of this trust domain with the given path segments, checking each one
    /// (ID-14 to ID-18). `td.id(["ns", "prod"])` is `spiffe://td/ns/prod`.
    pub fn id<I, S>(&self, segments: I) -> Result<SpiffeId, SpiffeIdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut id = self.root_id();
        for segment in segments {
            id = id.join(segment.as_ref())?;
        }
        Ok(id)
    }

    /// Builds the ID of this trust domain with the given path, which must be empty or start with
    /// `/` (ID-12) and satisfy every path rule.
    pub fn id_from_path(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        if !path.is_empty() && !path.starts_with('/') {
            return Err(SpiffeIdError::NoLeadingSlash);
        }
        check_path(path)?;
        let id = format!("{SPIFFE_PREFIX}{}{path}", self.name);
        check_len(&id)?;
        Ok(SpiffeId {
            path_start: SPIFFE_PREFIX.len() + self.name.len(),
            id: id.into(),
        })
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({:?})", self.name)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Parses a SPIFFE ID, checking every rule of SPIFFE-ID §2 (ID-1 to ID-20). IDs longer than
    /// [`MAX_SPIFFE_ID_LEN`] bytes are rejected.
    pub fn new(id: &str) -> Result<Self, SpiffeIdError> {
        if id.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        let rest = id
            .strip_prefix(SPIFFE_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        check_len(id)?;
        // The authority ends at the first '/', '?' or '#'.
        let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, after) = rest.split_at(authority_len);
        check_authority(authority)?;
        if let Some(at) = after.find(['?', '#']) {
            return Err(if after[at..].starts_with('?') {
                SpiffeIdError::Query
            } else {
                SpiffeIdError::Fragment
            });
        }
        check_path(after)?;
        Ok(Self {
            id: id.into(),
            path_start: SPIFFE_PREFIX.len() + authority_len,
        })
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain {
            name: self.trust_domain_name().to_owned(),
        }
    }

    /// The trust domain name, without allocating.
    pub fn trust_domain_name(&self) -> &str {
        &self.id[SPIFFE_PREFIX.len()..self.path_start]
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// The path's segments, in order (none for a root ID).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }

    /// True when the ID has no path: the ID of the trust domain itself, which signing authorities
    /// carry and which must never identify a workload (XL-1).
    pub fn is_root(&self) -> bool {
        self.path_start == self.id.len()
    }

    /// True when this ID belongs to `trust_domain`.
    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        self.trust_domain_name() == trust_domain.name
    }

    /// Returns this ID with one more path segment, checking the segment (ID-14 to ID-17) and the
    /// resulting length (ID-18).
    pub fn join(&self, segment: &str) -> Result<Self, SpiffeIdError> {
        check_segment(segment)?;
        let id = format!("{}/{segment}", self.id);
        check_len(&id)?;
        Ok(Self {
            id: id.into(),
            path_start: self.path_start,
        })
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({:?})", self.id)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.id)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

// === checks ===

fn check_len(id: &str) -> Result<(), SpiffeIdError> {
    if id.len() > MAX_SPIFFE_ID_LEN {
        return Err(SpiffeIdError::TooLong { len: id.len() });
    }
    Ok(())
}

/// Checks a bare trust domain name (the URI authority of a SPIFFE ID).
fn check_authority(authority: &str) -> Result<(), SpiffeIdError> {
    if authority.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if authority.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if authority.starts_with('[') {
        return Err(SpiffeIdError::Ipv6);
    }
    if authority.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if authority.contains('%') {
        return Err(SpiffeIdError::TrustDomainPercentEncoded);
    }
    if !authority.bytes().all(is_trust_domain_byte) {
        return Err(SpiffeIdError::BadTrustDomainChar);
    }
    if authority.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong {
            len: authority.len(),
        });
    }
    Ok(())
}

/// Checks a path that is empty or starts with `/`.
fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(()); // empty: a root ID
    };
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() && segments.peek().is_none() {
            return Err(SpiffeIdError::TrailingSlash);
        }
        check_segment(segment)?;
    }
    Ok(())
}

fn check_segment(segment: &str) -> Result<(), SpiffeIdError> {
    match segment {
        "" => Err(SpiffeIdError::EmptySegment),
        "." | ".." => Err(SpiffeIdError::DotSegment),
        s if s.contains('%') => Err(SpiffeIdError::PathPercentEncoded),
        s if !s.bytes().all(is_path_byte) => Err(SpiffeIdError::BadPathChar),
        _ => Ok(()),
    }
}

fn is_trust_domain_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn is_path_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use SpiffeIdError as E;

    /// (spec item, input, expected error)
    const REJECT: &[(&str, &str, SpiffeIdError)] = &[
        ("ID-1 http scheme", "http://example.org/a", E::WrongScheme),
        ("ID-1 single slash", "spiffe:/example.org", E::WrongScheme),
        ("ID-1 no scheme", "s", E::WrongScheme),
        ("ID-1 bare name", "example.org/a", E::WrongScheme),
        (
            "ID-1 uppercase scheme",
            "Spiffe://example.org/a",
            E::WrongScheme,
        ),
        (
            "ID-1 SPIFFE scheme",
            "SPIFFE://example.org/a",
            E::WrongScheme,
        ),
        ("ID-2 empty", "", E::Empty),
        ("ID-2 no td", "spiffe://", E::MissingTrustDomain),
        ("ID-2 no td slash", "spiffe:///", E::MissingTrustDomain),
        ("ID-2 no td path", "spiffe:///path", E::MissingTrustDomain),
        ("ID-3 query", "spiffe://td/a?x=1", E::Query),
        ("ID-3 query on td", "spiffe://td?x=1", E::Query),
        ("ID-4 fragment", "spiffe://td/a#f", E::Fragment),
        ("ID-4 fragment on td", "spiffe://td#f", E::Fragment),
        ("ID-5 userinfo", "spiffe://user@td/a", E::UserInfo),
        ("ID-5 userinfo password", "spiffe://u:p@td", E::UserInfo),
        ("ID-6 port", "spiffe://td:8443/a", E::Port),
        ("ID-6 empty port", "spiffe://td:/a", E::Port),
        (
            "ID-7 uppercase td",
            "spiffe://Example.org/a",
            E::BadTrustDomainChar,
        ),
        ("ID-8 dollar", "spiffe://td$/a", E::BadTrustDomainChar),
        ("ID-8 tilde", "spiffe://tr~d/a", E::BadTrustDomainChar),
        (
            "ID-8 non-ascii",
            "spiffe://tr\u{00e9}d/a",
            E::BadTrustDomainChar,
        ),
        ("ID-8 space", "spiffe://t d/a", E::BadTrustDomainChar),
        (
            "ID-9 percent td",
            "spiffe://%62%61%64/a",
            E::TrustDomainPercentEncoded,
        ),
        ("ID-10 ipv6", "spiffe://[::1]/a", E::Ipv6),
        ("ID-10 ipv6 bare", "spiffe://::1/a", E::Port),
        (
            "ID-13 percent path",
            "spiffe://td/%62ad",
            E::PathPercentEncoded,
        ),
        ("ID-14 empty segment", "spiffe://td//a", E::EmptySegment),
        ("ID-14 double slash", "spiffe://td//", E::EmptySegment),
        ("ID-14 inner empty", "spiffe://td/a//b", E::EmptySegment),
        ("ID-15 trailing slash", "spiffe://td/", E::TrailingSlash),
        (
            "ID-15 trailing slash path",
            "spiffe://td/a/",
            E::TrailingSlash,
        ),
        ("ID-16 dot", "spiffe://td/.", E::DotSegment),
        ("ID-16 dot first", "spiffe://td/./a", E::DotSegment),
        ("ID-16 dotdot last", "spiffe://td/a/..", E::DotSegment),
        ("ID-16 dotdot first", "spiffe://td/../a", E::DotSegment),
        ("ID-17 dollar", "spiffe://td/a$", E::BadPathChar),
        ("ID-17 space", "spiffe://td/a b", E::BadPathChar),
        ("ID-17 colon", "spiffe://td/a:b", E::BadPathChar),
        ("ID-17 at", "spiffe://td/a@b", E::BadPathChar),
        ("ID-17 non-ascii", "spiffe://td/\u{00f1}", E::BadPathChar),
        ("ID-17 tilde", "spiffe://td/~a", E::BadPathChar),
        ("ID-17 backslash", "spiffe://td/a\\b", E::BadPathChar),
        ("ID-17 nul", "spiffe://td/a\0", E::BadPathChar),
    ];

    const ACCEPT: &[(&str, &str)] = &[
        ("ID-10 ipv4", "spiffe://10.0.0.1/a"),
        ("ID-11 root id", "spiffe://td"),
        ("ID-11 root id dns", "spiffe://example.org"),
        ("ID-16 dot prefix", "spiffe://td/.a"),
        ("ID-16 dotdot prefix", "spiffe://td/..a"),
        ("ID-16 three dots", "spiffe://td/..."),
        ("ID-17 mixed case", "spiffe://td/Foo/BAR_1-x.y"),
        ("ID-8 all td chars", "spiffe://a-b_c.0-9/p"),
        ("ID-17 all path chars", "spiffe://td/azAZ09.-_"),
        ("long path", "spiffe://example.org/ns/prod/sa/web/x"),
    ];

    #[test]
    fn spec_rejections() {
        for (item, input, want) in REJECT {
            assert_eq!(
                SpiffeId::new(input).as_ref(),
                Err(want),
                "{item}: {input:?} must be rejected"
            );
        }
    }

    #[test]
    fn spec_acceptances_round_trip() {
        for (item, input) in ACCEPT {
            let id = SpiffeId::new(input).unwrap_or_else(|e| panic!("{item}: {input:?}: {e}"));
            assert_eq!(id.to_string(), *input, "{item}: Display round-trip");
            assert_eq!(id.as_str(), *input, "{item}");
            let again: SpiffeId = id.to_string().parse().unwrap();
            assert_eq!(again, id, "{item}: parse(display) == original");
        }
    }

    #[test]
    fn id_11_root_id_has_no_path() {
        let id = SpiffeId::new("spiffe://example.org").unwrap();
        assert!(id.is_root());
        assert_eq!(id.path(), "");
        assert_eq!(id.segments().count(), 0);
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.trust_domain().root_id(), id);
    }

    #[test]
    fn parts() {
        let id = SpiffeId::new("spiffe://example.org/ns/prod/web").unwrap();
        assert!(!id.is_root());
        assert_eq!(id.trust_domain().name(), "example.org");
        assert_eq!(id.path(), "/ns/prod/web");
        assert_eq!(id.segments().collect::<Vec<_>>(), ["ns", "prod", "web"]);
        assert!(id.is_member_of(&TrustDomain::new("example.org").unwrap()));
        assert!(!id.is_member_of(&TrustDomain::new("example.com").unwrap()));
    }

    #[test]
    fn id_18_2048_bytes_accepted_2049_rejected() {
        let prefix = "spiffe://example.org/";
        let exact = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
        assert_eq!(exact.len(), 2048);
        let id = SpiffeId::new(&exact).unwrap();
        assert_eq!(id.as_str(), exact);

        let over = format!("{exact}b");
        assert_eq!(SpiffeId::new(&over), Err(E::TooLong { len: 2049 }));
    }

    #[test]
    fn id_18_builders_refuse_more_than_2048_bytes() {
        let td = TrustDomain::new("example.org").unwrap();
        let base = "spiffe://example.org".len();
        // One segment filling the ID to exactly 2048 bytes: '/' plus the segment.
        let fill = "a".repeat(MAX_SPIFFE_ID_LEN - base - 1);
        let id = td.id([fill.as_str()]).unwrap();
        assert_eq!(id.as_str().len(), 2048);
        assert_eq!(id.join("b"), Err(E::TooLong { len: 2050 }));
        let longer = format!("{fill}a");
        assert_eq!(td.id([longer.as_str()]), Err(E::TooLong { len: 2049 }));
        assert_eq!(
            td.id_from_path(&format!("/{longer}")),
            Err(E::TooLong { len: 2049 })
        );
    }

    #[test]
    fn id_19_trust_domain_at_most_255_bytes() {
        let exact = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        let td = TrustDomain::new(&exact).unwrap();
        assert_eq!(td.name(), exact);
        assert!(SpiffeId::new(&format!("spiffe://{exact}/a")).is_ok());

        let over = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            TrustDomain::new(&over),
            Err(E::TrustDomainTooLong { len: 256 })
        );
        assert_eq!(
            SpiffeId::new(&format!("spiffe://{over}/a")),
            Err(E::TrustDomainTooLong { len: 256 })
        );
    }

    #[test]
    fn id_20_path_is_case_sensitive_and_nothing_is_normalised() {
        let upper = SpiffeId::new("spiffe://td/A").unwrap();
        let lower = SpiffeId::new("spiffe://td/a").unwrap();
        assert_ne!(upper, lower);
        // No normalisation: the uppercase trust domain is an error, not a lowercase ID.
        assert!(SpiffeId::new("spiffe://TD/a").is_err());
        assert!(TrustDomain::new("Example.org").is_err());
    }

    #[test]
    fn id_22_trust_domain_parse_forms() {
        let bare = TrustDomain::new("example.org").unwrap();
        let as_id = TrustDomain::new("spiffe://example.org").unwrap();
        assert_eq!(bare, as_id);
        assert_eq!(bare.to_string(), "example.org");
        assert_eq!(bare.id_string(), "spiffe://example.org");
        assert_eq!(TrustDomain::new("10.0.0.1").unwrap().name(), "10.0.0.1");

        let cases: &[(&str, &str, SpiffeIdError)] = &[
            ("ID-22 empty", "", E::Empty),
            ("ID-22 ID-7 uppercase", "Example.org", E::BadTrustDomainChar),
            ("ID-22 ID-8 char", "ex$mple.org", E::BadTrustDomainChar),
            (
                "ID-22 ID-9 percent",
                "%65xample.org",
                E::TrustDomainPercentEncoded,
            ),
            ("ID-22 ID-10 ipv6", "[::1]", E::Ipv6),
            ("ID-22 ID-6 port", "example.org:80", E::Port),
            ("ID-22 ID-5 userinfo", "u@example.org", E::UserInfo),
            ("ID-22 path in td", "example.org/a", E::BadTrustDomainChar),
            (
                "ID-22 id with path",
                "spiffe://example.org/a",
                E::BadTrustDomainChar,
            ),
            ("ID-22 wrong scheme", "https://example.org", E::WrongScheme),
        ];
        for (item, input, want) in cases {
            assert_eq!(
                TrustDomain::new(input).as_ref(),
                Err(want),
                "{item}: {input:?}"
            );
        }
    }

    #[test]
    fn id_12_path_builder_requires_leading_slash() {
        let td = TrustDomain::new("td").unwrap();
        assert_eq!(td.id_from_path("foo"), Err(E::NoLeadingSlash));
        assert_eq!(td.id_from_path("/foo").unwrap().as_str(), "spiffe://td/foo");
        assert_eq!(td.id_from_path("").unwrap(), td.root_id());
        assert_eq!(td.id_from_path("/"), Err(E::TrailingSlash));
        assert_eq!(td.id_from_path("/a//b"), Err(E::EmptySegment));
        assert_eq!(td.id_from_path("/a?b"), Err(E::BadPathChar));
    }

    #[test]
    fn segment_builder_checks_each_segment() {
        let td = TrustDomain::new("example.org").unwrap();
        let id = td.id(["ns", "prod", "sa", "web"]).unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/ns/prod/sa/web");
        assert_eq!(id.trust_domain(), td);

        let cases: &[(&str, &str, SpiffeIdError)] = &[
            ("ID-14 empty segment", "", E::EmptySegment),
            ("ID-16 dot", ".", E::DotSegment),
            ("ID-16 dotdot", "..", E::DotSegment),
            ("ID-17 slash smuggled", "a/b", E::BadPathChar),
            ("ID-17 query smuggled", "a?b", E::BadPathChar),
            ("ID-13 percent", "%2F", E::PathPercentEncoded),
        ];
        for (item, segment, want) in cases {
            assert_eq!(td.id([*segment]).as_ref(), Err(want), "{item}: {segment:?}");
            assert_eq!(id.join(segment).as_ref(), Err(want), "{item}: {segment:?}");
        }
        assert_eq!(td.id(["...", ".x"]).unwrap().path(), "/.../.x");
    }

    #[test]
    fn serde_round_trip_and_rejects_invalid() {
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://example.org/web\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://td/\"").unwrap_err();
        assert!(err.to_string().contains("trailing slash"), "{err}");

        let td: TrustDomain = serde_json::from_str("\"example.org\"").unwrap();
        assert_eq!(td.name(), "example.org");
        assert!(serde_json::from_str::<TrustDomain>("\"Example.org\"").is_err());
    }

    #[test]
    fn errors_read_like_go_spiffe() {
        assert_eq!(E::WrongScheme.to_string(), "scheme is missing or invalid");
        assert_eq!(E::MissingTrustDomain.to_string(), "trust domain is missing");
        assert_eq!(
            E::EmptySegment.to_string(),
            "path cannot contain empty segments"
        );
        assert_eq!(
            E::DotSegment.to_string(),
            "path cannot contain dot segments"
        );
        assert_eq!(
            E::TrailingSlash.to_string(),
            "path cannot have a trailing slash"
        );
        assert_eq!(
            E::NoLeadingSlash.to_string(),
            "path must have a leading slash"
        );
    }
}
