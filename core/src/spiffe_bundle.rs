//! The SPIFFE bundle ([Trust Domain and Bundle §4]): a JWK Set with SPIFFE parameters, holding a
//! trust domain's X.509 authorities and JWT keys; and the bundle map (§5) that carries several.
//!
//! This is the format of federation (bundle endpoints, `F-1`) and of bundle files. The Workload
//! API uses other forms: concatenated DER for X.509 ([`X509Bundle`]) and a plain JWKS for JWT
//! ([`JwtBundle::to_jwks`]).
//!
//! Consuming ([`SpiffeBundle::parse`]) follows the spec rather than go-spiffe where they differ
//! (section 9.5):
//! - `keys` is required and may be empty (B-1); a bundle with no usable keys means the trust
//!   domain revoked its keys (B-2);
//! - a JWK with an unknown `kty` (B-6), or a missing or unknown `use` (B-7), is skipped; so is an
//!   `x509-svid` JWK with a missing or empty `x5c`, and of several `x5c` values only the first is
//!   used (BX-2; go-spiffe rejects the whole bundle instead);
//! - a `jwt-svid` JWK without `kid` is skipped, not an error (BJ-1): Sigil rejects tokens without
//!   `kid` (section 9.2), so such a key could never be selected, and skipping it matches how the
//!   spec treats every other unusable entry;
//! - unknown top-level members are ignored (B-5);
//! - JSON that repeats a member name anywhere is rejected.
//!
//! Malformed data in an entry that would otherwise be used (a certificate that does not parse,
//! `x5c` that is not standard base64, bad key parameters, a repeated `kid`) rejects the whole
//! bundle, so a broken publisher is noticed rather than silently trusted in part.
//!
//! For an `x509-svid` entry the certificate is authoritative: the key parameters beside `x5c`
//! are not read when parsing, and are derived from the certificate when emitting (BX-1).
//! Authorities with EC (P-256, P-384, P-521) and RSA keys are supported; others (Ed25519) are
//! rejected.
//!
//! [Trust Domain and Bundle §4]: https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE_Trust_Domain_and_Bundle.md#4-spiffe-bundle-format

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value};
use x509_parser::public_key::PublicKey;

use crate::jwt::{self, EcCurve, JwtBundle, JwtPublicKey, JwtSvidError};
use crate::spiffe_id::{SpiffeIdError, TrustDomain};
use crate::x509_bundle::{X509Bundle, X509BundleError};

/// The largest SPIFFE bundle [`SpiffeBundle::parse`] accepts, in bytes. A bundle holds a few
/// CA certificates and keys (a few KiB); the limit bounds what a hostile bundle endpoint can make
/// a consumer parse.
pub const MAX_BUNDLE_LEN: usize = 1024 * 1024;

/// The largest bundle map [`BundleMap::parse`] accepts, in bytes: room for hundreds of bundles.
pub const MAX_BUNDLE_MAP_LEN: usize = 16 * 1024 * 1024;

/// How often to poll for a bundle that carries no `spiffe_refresh_hint` (B-12, F-10).
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(5 * 60);

/// The `use` of an X.509 authority's JWK (BX-1).
const USE_X509_SVID: &str = "x509-svid";
/// The `use` of a JWT key's JWK (BJ-1).
const USE_JWT_SVID: &str = "jwt-svid";

/// Why a SPIFFE bundle or bundle map was rejected, or could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeBundleError {
    /// The input is longer than [`MAX_BUNDLE_LEN`] (or [`MAX_BUNDLE_MAP_LEN`]) bytes.
    #[error("bundle is {len} bytes long; the maximum is {max}")]
    TooLarge {
        /// The length found, in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input is not JSON, or repeats a member name (for a bundle map: a trust domain).
    #[error("bundle is not valid json: {reason}")]
    Json {
        /// What the JSON parser reported.
        reason: String,
    },
    /// The bundle (or bundle map) is JSON but not an object.
    #[error("bundle is not a json object")]
    NotAnObject,
    /// The `keys` member is missing (B-1).
    #[error("bundle has no keys member")]
    MissingKeys,
    /// The `keys` member is not an array (B-1).
    #[error("bundle keys member is not an array")]
    KeysNotAnArray,
    /// An entry of `keys` that would be used is malformed: not an object, `x5c` not an array of
    /// strings, `x5c` not standard base64, or a non-string `kid`.
    #[error("bundle key {index} is malformed: {reason}")]
    MalformedKey {
        /// The entry's position in `keys`, from 0.
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `jwt-svid` entry of a supported type has bad key parameters.
    #[error("bundle key {index} is invalid: {source}")]
    InvalidKey {
        /// The entry's position in `keys`, from 0.
        index: usize,
        /// What is wrong with the JWK.
        #[source]
        source: JwtSvidError,
    },
    /// An X.509 authority (the first `x5c` value of an entry, or one given to
    /// [`SpiffeBundle::add_x509_authority`]) is not a certificate.
    #[error("x509 authority {index} is not a valid certificate: {reason}")]
    InvalidCertificate {
        /// The entry's position in `keys`, or the authority's position in the bundle.
        index: usize,
        /// What the certificate parser reported.
        reason: String,
    },
    /// An X.509 authority's public key cannot be written as a JWK here (not EC P-256, P-384,
    /// P-521 or RSA).
    #[error("x509 authority {index} has an unsupported public key: {reason}")]
    UnsupportedAuthorityKey {
        /// The entry's position in `keys`, or the authority's position in the bundle.
        index: usize,
        /// What kind of key it is.
        reason: String,
    },
    /// Two `jwt-svid` entries share a `kid`.
    #[error("duplicate jwt key id {kid:?}")]
    DuplicateKeyId {
        /// The repeated `kid`.
        kid: String,
    },
    /// A JWT key was given an empty `kid` (BJ-1).
    #[error("jwt key id cannot be empty")]
    EmptyKeyId,
    /// `spiffe_sequence` is present but not an integer in `0..2^64` (B-3).
    #[error("spiffe_sequence must be a non-negative 64-bit integer")]
    InvalidSequence,
    /// `spiffe_refresh_hint` is present but not a non-negative integer number of seconds (B-4).
    #[error("spiffe_refresh_hint must be a non-negative integer number of seconds")]
    InvalidRefreshHint,
    /// A bundle map has no `trust_domains` member, or it is not an object.
    #[error("bundle map has no trust_domains object")]
    MissingTrustDomains,
    /// A bundle map key is not a valid trust domain name.
    #[error("bundle map key {name:?} is not a valid trust domain: {source}")]
    InvalidTrustDomain {
        /// The key found.
        name: String,
        /// Why it is not a trust domain name.
        #[source]
        source: SpiffeIdError,
    },
    /// A bundle map names one trust domain twice (for example as `example.org` and
    /// `spiffe://example.org`). Literal duplicate keys are reported as [`Self::Json`].
    #[error("bundle map has trust domain {trust_domain} more than once")]
    DuplicateTrustDomain {
        /// The repeated trust domain.
        trust_domain: TrustDomain,
    },
    /// One bundle of a bundle map is invalid.
    #[error("bundle of {trust_domain} in bundle map: {source}")]
    InBundleMap {
        /// Whose bundle it is.
        trust_domain: TrustDomain,
        /// What is wrong with it.
        #[source]
        source: Box<SpiffeBundleError>,
    },
    /// An X.509 bundle and a JWT bundle of different trust domains were to be combined (B-10).
    #[error("cannot combine bundles of {x509} and {jwt}")]
    TrustDomainMismatch {
        /// The X.509 bundle's trust domain.
        x509: TrustDomain,
        /// The JWT bundle's trust domain.
        jwt: TrustDomain,
    },
}

/// One trust domain's SPIFFE bundle: its X.509 authorities, its JWT keys by `kid`, and the
/// optional `spiffe_sequence` and `spiffe_refresh_hint` (B-3, B-4).
///
/// The bundle does not name its trust domain; the trust domain is kept beside it (B-9). Every
/// X.509 authority parses as a certificate with a supported public key. A bundle with neither
/// authorities nor keys is valid: the trust domain revoked its keys (B-2).
#[derive(Clone, PartialEq, Eq)]
pub struct SpiffeBundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<CertificateDer<'static>>,
    /// The public key of each authority, same order, for its JWK (BX-1).
    x509_keys: Vec<JwtPublicKey>,
    jwt_keys: BTreeMap<String, JwtPublicKey>,
    sequence: Option<u64>,
    refresh_hint: Option<Duration>,
}

/// A bundle map (§5): `{"trust_domains": {"<td>": <bundle>, ...}}`, one bundle per trust
/// domain.
///
/// Load it whole, as the complete state of the world. Refresh hints are dropped when parsing and
/// left out when emitting: consumers must not poll by them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleMap {
    bundles: BTreeMap<TrustDomain, SpiffeBundle>,
}

// === impl SpiffeBundle ===

impl SpiffeBundle {
    /// An empty bundle for `trust_domain`, with no sequence or refresh hint.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            x509_keys: Vec::new(),
            jwt_keys: BTreeMap::new(),
            sequence: None,
            refresh_hint: None,
        }
    }

    /// A bundle with the authorities of `x509` and the keys of `jwt`, which must belong to the
    /// same trust domain (B-10).
    pub fn from_bundles(x509: &X509Bundle, jwt: &JwtBundle) -> Result<Self, SpiffeBundleError> {
        if x509.trust_domain() != jwt.trust_domain() {
            return Err(SpiffeBundleError::TrustDomainMismatch {
                x509: x509.trust_domain().clone(),
                jwt: jwt.trust_domain().clone(),
            });
        }
        let mut bundle = Self::new(x509.trust_domain().clone());
        for authority in x509.authorities() {
            bundle.add_x509_authority(authority.clone())?;
        }
        bundle.jwt_keys = jwt.keys().clone();
        Ok(bundle)
    }

    /// Parses a SPIFFE bundle as the bundle of `trust_domain` (B-9); see the module docs for
    /// which entries are skipped and which are errors. The input may be at most
    /// [`MAX_BUNDLE_LEN`] bytes.
    pub fn parse(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, SpiffeBundleError> {
        check_len(json, MAX_BUNDLE_LEN)?;
        Self::from_value(trust_domain, parse_json(json)?)
    }

    /// Adds an X.509 authority, which must parse as a certificate with an EC or RSA key.
    pub fn add_x509_authority(
        &mut self,
        authority: CertificateDer<'static>,
    ) -> Result<(), SpiffeBundleError> {
        let key = authority_key(&authority, self.x509_authorities.len())?;
        self.x509_authorities.push(authority);
        self.x509_keys.push(key);
        Ok(())
    }

    /// Adds or replaces the JWT key `kid` (which must be non-empty, BJ-1), returning the key it
    /// replaced.
    pub fn insert_jwt_key(
        &mut self,
        kid: impl Into<String>,
        key: JwtPublicKey,
    ) -> Result<Option<JwtPublicKey>, SpiffeBundleError> {
        let kid = kid.into();
        if kid.is_empty() {
            return Err(SpiffeBundleError::EmptyKeyId);
        }
        Ok(self.jwt_keys.insert(kid, key))
    }

    /// Sets `spiffe_sequence` (B-3). Publishers should set it, and change it whenever the
    /// contents change.
    pub fn set_sequence(&mut self, sequence: Option<u64>) {
        self.sequence = sequence;
    }

    /// Sets `spiffe_refresh_hint` (B-4). It is emitted in whole seconds, rounded up.
    pub fn set_refresh_hint(&mut self, refresh_hint: Option<Duration>) {
        self.refresh_hint = refresh_hint;
    }

    /// The trust domain this bundle belongs to (B-9).
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The X.509 authorities (the first `x5c` value of each `x509-svid` entry, BX-2).
    pub fn x509_authorities(&self) -> &[CertificateDer<'static>] {
        &self.x509_authorities
    }

    /// The JWT keys, by `kid` (BJ-1, BJ-2).
    pub fn jwt_keys(&self) -> &BTreeMap<String, JwtPublicKey> {
        &self.jwt_keys
    }

    /// `spiffe_sequence`, if present (B-3).
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    /// `spiffe_refresh_hint`, if present (B-4). It is only a hint; without one, poll every
    /// [`DEFAULT_REFRESH_HINT`] (B-12).
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// True when the bundle has no usable key at all: every SVID from this trust domain is
    /// invalid (B-2).
    pub fn is_empty(&self) -> bool {
        self.x509_authorities.is_empty() && self.jwt_keys.is_empty()
    }

    /// The X.509 part, for verifying X509-SVIDs. Empty when the trust domain does not support
    /// X509-SVIDs (BX-2).
    pub fn x509_bundle(&self) -> Result<X509Bundle, X509BundleError> {
        X509Bundle::new(self.trust_domain.clone(), self.x509_authorities.clone())
    }

    /// The X.509 authorities in the Workload API's wire form: DER certificates back to back
    /// (what `x509_bundle()?.to_der()` gives, without parsing each authority again: every
    /// authority was parsed, with nothing trailing, when it was added).
    pub fn x509_der(&self) -> Vec<u8> {
        crate::x509_bundle::concatenate_der(&self.x509_authorities)
    }

    /// The JWT part, for verifying JWT-SVIDs (BJ-2). Empty when the trust domain does not
    /// support JWT-SVIDs.
    pub fn jwt_bundle(&self) -> JwtBundle {
        JwtBundle::from_checked_keys(self.trust_domain.clone(), self.jwt_keys.clone())
    }

    /// The SPIFFE bundle JSON: one `x509-svid` JWK per authority, with `x5c` holding exactly
    /// that certificate in standard base64, key parameters from the certificate, and no `kid`
    /// (BX-1); one `jwt-svid` JWK per key, with its `kid` (BJ-1); then `spiffe_sequence` and
    /// `spiffe_refresh_hint` when set (B-3, B-4). No other JWK parameters are added (B-8).
    pub fn to_json(&self) -> Vec<u8> {
        self.to_value(true).to_string().into_bytes()
    }

    fn to_value(&self, with_refresh_hint: bool) -> Value {
        let x509 = self
            .x509_authorities
            .iter()
            .zip(&self.x509_keys)
            .map(|(authority, key)| {
                let mut jwk = key.to_jwk();
                jwk.insert("use".to_owned(), USE_X509_SVID.into());
                jwk.insert(
                    "x5c".to_owned(),
                    Value::Array(vec![STANDARD.encode(authority).into()]),
                );
                Value::Object(jwk)
            });
        let jwt = self.jwt_keys.iter().map(|(kid, key)| {
            let mut jwk = key.to_jwk();
            jwk.insert("use".to_owned(), USE_JWT_SVID.into());
            jwk.insert("kid".to_owned(), kid.as_str().into());
            Value::Object(jwk)
        });
        let mut bundle = Map::new();
        bundle.insert("keys".to_owned(), Value::Array(x509.chain(jwt).collect()));
        if let Some(sequence) = self.sequence {
            bundle.insert("spiffe_sequence".to_owned(), sequence.into());
        }
        if let Some(hint) = self.refresh_hint.filter(|_| with_refresh_hint) {
            let seconds = hint.as_secs() + u64::from(hint.subsec_nanos() > 0);
            bundle.insert("spiffe_refresh_hint".to_owned(), seconds.into());
        }
        Value::Object(bundle)
    }

    fn from_value(trust_domain: TrustDomain, value: Value) -> Result<Self, SpiffeBundleError> {
        let Value::Object(members) = value else {
            return Err(SpiffeBundleError::NotAnObject);
        };
        let keys = match members.get("keys") {
            Some(Value::Array(keys)) => keys,
            Some(_) => return Err(SpiffeBundleError::KeysNotAnArray),
            None => return Err(SpiffeBundleError::MissingKeys),
        };
        let mut bundle = Self::new(trust_domain);
        for (index, jwk) in keys.iter().enumerate() {
            let Value::Object(jwk) = jwk else {
                return Err(SpiffeBundleError::MalformedKey {
                    index,
                    reason: "not a json object",
                });
            };
            match jwk.get("use").and_then(Value::as_str) {
                Some(USE_X509_SVID) => bundle.add_x509_entry(index, jwk)?,
                Some(USE_JWT_SVID) => bundle.add_jwt_entry(index, jwk)?,
                // B-7: missing or unknown use (wit-svid included: Sigil has no WIT support).
                _ => {}
            }
        }
        bundle.sequence = match members.get("spiffe_sequence") {
            None => None,
            Some(value) => Some(value.as_u64().ok_or(SpiffeBundleError::InvalidSequence)?),
        };
        bundle.refresh_hint = match members.get("spiffe_refresh_hint") {
            None => None,
            Some(value) => Some(Duration::from_secs(
                value
                    .as_u64()
                    .ok_or(SpiffeBundleError::InvalidRefreshHint)?,
            )),
        };
        Ok(bundle)
    }

    /// Adds the authority of an `x509-svid` entry, or skips the entry (B-6, BX-2).
    fn add_x509_entry(
        &mut self,
        index: usize,
        jwk: &Map<String, Value>,
    ) -> Result<(), SpiffeBundleError> {
        let malformed = |reason| SpiffeBundleError::MalformedKey { index, reason };
        // B-6: only key types that can carry a certificate's key here.
        if !matches!(jwk.get("kty").and_then(Value::as_str), Some("EC" | "RSA")) {
            return Ok(());
        }
        let first = match jwk.get("x5c") {
            None => return Ok(()),
            Some(Value::Array(chain)) => match chain.first() {
                None => return Ok(()),
                Some(Value::String(first)) => first,
                Some(_) => return Err(malformed("x5c holds a non-string value")),
            },
            Some(_) => return Err(malformed("x5c is not an array")),
        };
        let der = STANDARD
            .decode(first)
            .map_err(|_| malformed("x5c value is not standard base64"))?;
        let authority = CertificateDer::from(der);
        let key = authority_key(&authority, index)?;
        self.x509_authorities.push(authority);
        self.x509_keys.push(key);
        Ok(())
    }

    /// Adds the key of a `jwt-svid` entry, or skips the entry (B-6, BJ-1).
    fn add_jwt_entry(
        &mut self,
        index: usize,
        jwk: &Map<String, Value>,
    ) -> Result<(), SpiffeBundleError> {
        let Some(key) = JwtPublicKey::from_jwk_if_supported(jwk)
            .map_err(|source| SpiffeBundleError::InvalidKey { index, source })?
        else {
            return Ok(());
        };
        let kid = match jwk.get("kid") {
            Some(Value::String(kid)) if !kid.is_empty() => kid,
            None | Some(Value::String(_)) => return Ok(()),
            Some(_) => {
                return Err(SpiffeBundleError::MalformedKey {
                    index,
                    reason: "kid is not a string",
                });
            }
        };
        if self.jwt_keys.contains_key(kid) {
            return Err(SpiffeBundleError::DuplicateKeyId { kid: kid.clone() });
        }
        self.jwt_keys.insert(kid.clone(), key);
        Ok(())
    }
}

impl fmt::Debug for SpiffeBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeBundle")
            .field("trust_domain", &self.trust_domain)
            .field("x509_authorities", &self.x509_authorities.len())
            .field("jwt_keys", &self.jwt_keys.keys().collect::<Vec<_>>())
            .field("sequence", &self.sequence)
            .field("refresh_hint", &self.refresh_hint)
            .finish()
    }
}

// === impl BundleMap ===

impl BundleMap {
    /// An empty map (valid: `{"trust_domains": {}}`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a bundle map. `trust_domains` is required and may be empty. Duplicate keys are
    /// rejected, whether literal (`"a.org"` twice) or after parsing (`a.org` and
    /// `spiffe://a.org`). Each bundle follows [`SpiffeBundle::parse`], and its refresh hint is
    /// dropped. Unknown top-level members are ignored. The input may be at most
    /// [`MAX_BUNDLE_MAP_LEN`] bytes.
    pub fn parse(json: &[u8]) -> Result<Self, SpiffeBundleError> {
        check_len(json, MAX_BUNDLE_MAP_LEN)?;
        let Value::Object(mut members) = parse_json(json)? else {
            return Err(SpiffeBundleError::NotAnObject);
        };
        let Some(Value::Object(trust_domains)) = members.remove("trust_domains") else {
            return Err(SpiffeBundleError::MissingTrustDomains);
        };
        let mut map = Self::new();
        for (name, value) in trust_domains {
            let trust_domain = TrustDomain::new(&name)
                .map_err(|source| SpiffeBundleError::InvalidTrustDomain { name, source })?;
            let mut bundle =
                SpiffeBundle::from_value(trust_domain.clone(), value).map_err(|source| {
                    SpiffeBundleError::InBundleMap {
                        trust_domain: trust_domain.clone(),
                        source: Box::new(source),
                    }
                })?;
            bundle.refresh_hint = None;
            if map.bundles.contains_key(&trust_domain) {
                return Err(SpiffeBundleError::DuplicateTrustDomain { trust_domain });
            }
            map.bundles.insert(trust_domain, bundle);
        }
        Ok(map)
    }

    /// Adds `bundle`, replacing any bundle of the same trust domain, which is returned.
    pub fn insert(&mut self, bundle: SpiffeBundle) -> Option<SpiffeBundle> {
        self.bundles.insert(bundle.trust_domain.clone(), bundle)
    }

    /// Removes the bundle of `trust_domain`, returning it.
    pub fn remove(&mut self, trust_domain: &TrustDomain) -> Option<SpiffeBundle> {
        self.bundles.remove(trust_domain)
    }

    /// The bundle of `trust_domain`.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&SpiffeBundle> {
        self.bundles.get(trust_domain)
    }

    /// The bundles, in trust domain order.
    pub fn iter(&self) -> impl Iterator<Item = &SpiffeBundle> {
        self.bundles.values()
    }

    /// How many trust domains the map has.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// True when the map has no trust domain.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// The bundle map JSON, keyed by bare trust domain names, each bundle without its refresh
    /// hint (§5).
    pub fn to_json(&self) -> Vec<u8> {
        let trust_domains = self
            .bundles
            .iter()
            .map(|(td, bundle)| (td.name().to_owned(), bundle.to_value(false)))
            .collect::<Map<_, _>>();
        let mut map = Map::new();
        map.insert("trust_domains".to_owned(), Value::Object(trust_domains));
        Value::Object(map).to_string().into_bytes()
    }
}

impl FromIterator<SpiffeBundle> for BundleMap {
    /// Collects bundles; a later bundle of the same trust domain replaces an earlier one.
    fn from_iter<I: IntoIterator<Item = SpiffeBundle>>(iter: I) -> Self {
        let mut map = Self::new();
        for bundle in iter {
            map.insert(bundle);
        }
        map
    }
}

// === helpers ===

fn check_len(input: &[u8], max: usize) -> Result<(), SpiffeBundleError> {
    if input.len() > max {
        return Err(SpiffeBundleError::TooLarge {
            len: input.len(),
            max,
        });
    }
    Ok(())
}

fn parse_json(input: &[u8]) -> Result<Value, SpiffeBundleError> {
    jwt::parse_json_strict(input).map_err(|e| SpiffeBundleError::Json {
        reason: e.to_string(),
    })
}

/// The public key of a certificate, as a JWK key (BX-1).
fn authority_key(authority: &[u8], index: usize) -> Result<JwtPublicKey, SpiffeBundleError> {
    let invalid = |reason: String| SpiffeBundleError::InvalidCertificate { index, reason };
    let unsupported = |reason: String| SpiffeBundleError::UnsupportedAuthorityKey { index, reason };
    let (rest, certificate) =
        x509_parser::parse_x509_certificate(authority).map_err(|e| invalid(e.to_string()))?;
    if !rest.is_empty() {
        return Err(invalid("trailing data after the certificate".to_owned()));
    }
    let spki = certificate.public_key();
    let parsed = spki.parsed().map_err(|e| invalid(e.to_string()))?;
    let key = match parsed {
        PublicKey::EC(point) => {
            let curve_oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|parameters| parameters.as_oid().ok())
                .map(|oid| oid.to_id_string());
            let curve = match curve_oid.as_deref() {
                Some("1.2.840.10045.3.1.7") => EcCurve::P256,
                Some("1.3.132.0.34") => EcCurve::P384,
                Some("1.3.132.0.35") => EcCurve::P521,
                other => {
                    return Err(unsupported(format!(
                        "elliptic curve {}",
                        other.unwrap_or("(none)")
                    )));
                }
            };
            JwtPublicKey::ec_uncompressed(curve, point.data())
        }
        PublicKey::RSA(rsa) => JwtPublicKey::rsa(rsa.modulus, rsa.exponent),
        _ => {
            return Err(unsupported(format!(
                "key algorithm {}",
                spki.algorithm.algorithm.to_id_string()
            )));
        }
    };
    key.map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType,
        SignatureAlgorithm,
    };
    use serde_json::json;

    use super::*;
    use crate::jwt::{JwtSigningKey, JwtSvid, JwtSvidParams};
    use crate::spiffe_id::SpiffeId;

    use SpiffeBundleError as E;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    /// A self-signed CA certificate for `example.org` and its key.
    fn ca_with(key: KeyPair) -> (CertificateDer<'static>, KeyPair) {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        let cert = params.self_signed(&key).unwrap();
        (cert.der().clone(), key)
    }

    fn ca(alg: &'static SignatureAlgorithm) -> (CertificateDer<'static>, KeyPair) {
        ca_with(KeyPair::generate_for(alg).unwrap())
    }

    fn rsa_ca() -> (CertificateDer<'static>, KeyPair) {
        let der = STANDARD
            .decode(crate::jwt::tests::RSA_2048_PKCS8_B64)
            .unwrap();
        ca_with(KeyPair::try_from(der.as_slice()).unwrap())
    }

    fn b64(cert: &CertificateDer<'_>) -> String {
        STANDARD.encode(cert)
    }

    fn parse(bundle: &Value) -> Result<SpiffeBundle, SpiffeBundleError> {
        SpiffeBundle::parse(td("example.org"), bundle.to_string().as_bytes())
    }

    /// An `x509-svid` entry as SPIRE writes it, with key parameters beside `x5c`.
    fn x509_entry(cert: &CertificateDer<'_>) -> Value {
        let mut jwk = authority_key(cert, 0).unwrap().to_jwk();
        jwk.insert("use".into(), "x509-svid".into());
        jwk.insert("x5c".into(), json!([b64(cert)]));
        Value::Object(jwk)
    }

    fn jwt_entry(kid: &str, key: &JwtPublicKey) -> Value {
        let mut jwk = key.to_jwk();
        jwk.insert("use".into(), "jwt-svid".into());
        jwk.insert("kid".into(), kid.into());
        Value::Object(jwk)
    }

    fn with(entry: &Value, extra: Value) -> Value {
        let mut entry = entry.as_object().unwrap().clone();
        for (name, value) in extra.as_object().unwrap() {
            if value.is_null() {
                entry.remove(name);
            } else {
                entry.insert(name.clone(), value.clone());
            }
        }
        Value::Object(entry)
    }

    /// A full bundle: P-256, P-384 and RSA authorities, two JWT keys, sequence and hint.
    fn full_bundle() -> (SpiffeBundle, JwtSigningKey) {
        let mut bundle = SpiffeBundle::new(td("example.org"));
        bundle
            .add_x509_authority(ca(&rcgen::PKCS_ECDSA_P256_SHA256).0)
            .unwrap();
        bundle
            .add_x509_authority(ca(&rcgen::PKCS_ECDSA_P384_SHA384).0)
            .unwrap();
        bundle.add_x509_authority(rsa_ca().0).unwrap();
        let signer = JwtSigningKey::generate().unwrap();
        bundle
            .insert_jwt_key(signer.kid(), signer.public_key().clone())
            .unwrap();
        let other = JwtSigningKey::generate().unwrap();
        bundle
            .insert_jwt_key("other", other.public_key().clone())
            .unwrap();
        bundle.set_sequence(Some(7));
        bundle.set_refresh_hint(Some(Duration::from_secs(300)));
        (bundle, signer)
    }

    #[test]
    fn b1_keys_required_and_may_be_empty() {
        assert_eq!(parse(&json!({})), Err(E::MissingKeys), "B-1 keys missing");
        assert_eq!(
            parse(&json!({"spiffe_sequence": 1, "spiffe_refresh_hint": 60})),
            Err(E::MissingKeys),
            "B-1 keys missing with spiffe parameters"
        );
        assert_eq!(parse(&json!({"keys": {}})), Err(E::KeysNotAnArray), "B-1");
        assert_eq!(parse(&json!({"keys": null})), Err(E::KeysNotAnArray), "B-1");
        assert_eq!(parse(&json!([])), Err(E::NotAnObject));
        assert_eq!(
            parse(&json!({"keys": [1]})),
            Err(E::MalformedKey {
                index: 0,
                reason: "not a json object"
            })
        );

        let empty = parse(&json!({"keys": []})).unwrap();
        assert!(empty.is_empty(), "B-1 B-2 empty keys: valid, and revoked");
        assert!(empty.x509_bundle().unwrap().is_empty());
        assert!(empty.jwt_bundle().is_empty());
    }

    #[test]
    fn b2_no_usable_keys_after_filtering_means_revoked() {
        let (cert, _) = ca(&rcgen::PKCS_ECDSA_P256_SHA256);
        let bundle = parse(&json!({"keys": [
            with(&x509_entry(&cert), json!({"use": null})),
            with(&x509_entry(&cert), json!({"x5c": []})),
            {"kty": "oct", "use": "jwt-svid", "kid": "k", "k": "AAAA"},
        ]}))
        .unwrap();
        assert!(bundle.is_empty());
    }

    #[test]
    fn b3_sequence_and_b4_refresh_hint() {
        type Parsed = Result<(Option<u64>, Option<Duration>), E>;
        let cases: &[(&str, Value, Parsed)] = &[
            ("B-3 B-4 absent", json!({"keys": []}), Ok((None, None))),
            (
                "B-3 B-4 appendix a values",
                json!({"keys": [], "spiffe_sequence": 2, "spiffe_refresh_hint": 2_419_200}),
                Ok((Some(2), Some(Duration::from_secs(28 * 24 * 3600)))),
            ),
            (
                "B-3 parsed into 64 bits",
                json!({"keys": [], "spiffe_sequence": u64::MAX}),
                Ok((Some(u64::MAX), None)),
            ),
            (
                "B-3 beyond 32 bits",
                json!({"keys": [], "spiffe_sequence": 1_u64 << 40}),
                Ok((Some(1 << 40), None)),
            ),
            (
                "B-3 negative",
                json!({"keys": [], "spiffe_sequence": -1}),
                Err(E::InvalidSequence),
            ),
            (
                "B-3 fraction",
                json!({"keys": [], "spiffe_sequence": 1.5}),
                Err(E::InvalidSequence),
            ),
            (
                "B-3 string",
                json!({"keys": [], "spiffe_sequence": "2"}),
                Err(E::InvalidSequence),
            ),
            (
                "B-3 null",
                json!({"keys": [], "spiffe_sequence": null}),
                Err(E::InvalidSequence),
            ),
            (
                "B-4 negative",
                json!({"keys": [], "spiffe_refresh_hint": -60}),
                Err(E::InvalidRefreshHint),
            ),
            (
                "B-4 string",
                json!({"keys": [], "spiffe_refresh_hint": "5m"}),
                Err(E::InvalidRefreshHint),
            ),
            (
                "B-4 zero is only a hint",
                json!({"keys": [], "spiffe_refresh_hint": 0}),
                Ok((None, Some(Duration::ZERO))),
            ),
        ];
        for (item, bundle, want) in cases {
            let got = parse(bundle).map(|b| (b.sequence(), b.refresh_hint()));
            assert_eq!(&got, want, "{item}");
        }
        // 18446744073709551616 = 2^64 does not fit.
        let over = br#"{"keys": [], "spiffe_sequence": 18446744073709551616}"#;
        assert_eq!(
            SpiffeBundle::parse(td("example.org"), over),
            Err(E::InvalidSequence)
        );
        assert_eq!(DEFAULT_REFRESH_HINT, Duration::from_secs(300), "B-12");
    }

    #[test]
    fn b5_unknown_top_level_members_ignored() {
        let (cert, _) = ca(&rcgen::PKCS_ECDSA_P256_SHA256);
        let bundle = parse(&json!({
            "keys": [x509_entry(&cert)],
            "spiffe_future_thing": {"a": [1, 2]},
            "comment": "hello",
        }))
        .unwrap();
        assert_eq!(bundle.x509_authorities(), std::slice::from_ref(&cert));
    }

    #[test]
    fn b6_b7_entries_skipped() {
        let (cert, _) = ca(&rcgen::PKCS_ECDSA_P256_SHA256);
        let signer = JwtSigningKey::generate().unwrap();
        let x509 = x509_entry(&cert);
        let jwt = jwt_entry("k1", signer.public_key());
        let cases: &[(&str, Value)] = &[
            (
                "B-6 x509-svid unknown kty",
                with(&x509, json!({"kty": "OKP"})),
            ),
            (
                "B-6 x509-svid kty missing",
                with(&x509, json!({"kty": null})),
            ),
            (
                "B-6 jwt-svid unknown kty",
                with(&jwt, json!({"kty": "oct"})),
            ),
            ("B-6 jwt-svid kty missing", with(&jwt, json!({"kty": null}))),
            (
                "B-6 jwt-svid unsupported curve",
                with(&jwt, json!({"crv": "P-192"})),
            ),
            ("B-7 use missing (x509)", with(&x509, json!({"use": null}))),
            ("B-7 use missing (jwt)", with(&jwt, json!({"use": null}))),
            ("B-7 unknown use", with(&jwt, json!({"use": "sig"}))),
            (
                "B-7 use is case-sensitive",
                with(&x509, json!({"use": "X509-SVID"})),
            ),
            (
                "B-7 use not a string",
                with(&jwt, json!({"use": ["jwt-svid"]})),
            ),
            (
                "B-7 wit-svid (incubating) skipped",
                with(&jwt, json!({"use": "wit-svid"})),
            ),
        ];
        for (item, entry) in cases {
            let bundle = parse(&json!({"keys": [entry]})).unwrap_or_else(|e| panic!("{item}: {e}"));
            assert!(bundle.is_empty(), "{item}: {bundle:?}");
            // A usable entry next to the skipped one is kept.
            let bundle = parse(&json!({"keys": [entry, x509, jwt]})).unwrap();
            assert_eq!(bundle.x509_authorities().len(), 1, "{item}");
            assert_eq!(bundle.jwt_keys().len(), 1, "{item}");
        }
    }

    #[test]
    fn bx2_x5c_rules() {
        let (first, _) = ca(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (second, _) = ca(&rcgen::PKCS_ECDSA_P384_SHA384);
        let entry = x509_entry(&first);

        let skipped: &[(&str, Value)] = &[
            ("BX-2 x5c missing", with(&entry, json!({"x5c": null}))),
            ("BX-2 x5c empty", with(&entry, json!({"x5c": []}))),
        ];
        for (item, entry) in skipped {
            assert!(
                parse(&json!({"keys": [entry]})).unwrap().is_empty(),
                "{item}"
            );
        }

        // Section 9.5: the first of several values is used, the rest ignored (go-spiffe would
        // reject the bundle).
        let two = with(&entry, json!({"x5c": [b64(&first), b64(&second)]}));
        let bundle = parse(&json!({"keys": [two]})).unwrap();
        assert_eq!(
            bundle.x509_authorities(),
            std::slice::from_ref(&first),
            "BX-2 first of two"
        );
        let junk_after = with(&entry, json!({"x5c": [b64(&first), "not base64!", 3]}));
        let bundle = parse(&json!({"keys": [junk_after]})).unwrap();
        assert_eq!(
            bundle.x509_authorities(),
            std::slice::from_ref(&first),
            "BX-2 rest ignored"
        );

        // The anchors are the union of all first certificates.
        let bundle = parse(&json!({"keys": [x509_entry(&first), x509_entry(&second)]})).unwrap();
        assert_eq!(
            bundle.x509_authorities(),
            [first.clone(), second.clone()],
            "BX-2 union"
        );

        // x5c is standard base64, not base64url.
        let standard = b64(&first);
        let url = URL_SAFE_NO_PAD.encode(&first);
        assert_ne!(
            standard.trim_end_matches('='),
            url,
            "the DER must use + or /"
        );
        let errors: &[(&str, Value, E)] = &[
            (
                "BX-1 x5c base64url rejected",
                with(&entry, json!({"x5c": [url]})),
                E::MalformedKey {
                    index: 0,
                    reason: "x5c value is not standard base64",
                },
            ),
            (
                "x5c not an array",
                with(&entry, json!({"x5c": standard})),
                E::MalformedKey {
                    index: 0,
                    reason: "x5c is not an array",
                },
            ),
            (
                "x5c first value not a string",
                with(&entry, json!({"x5c": [1]})),
                E::MalformedKey {
                    index: 0,
                    reason: "x5c holds a non-string value",
                },
            ),
        ];
        for (item, entry, want) in errors {
            assert_eq!(
                parse(&json!({"keys": [entry]})).as_ref(),
                Err(want),
                "{item}"
            );
        }
        let not_a_cert = with(
            &entry,
            json!({"x5c": [STANDARD.encode(b"not a certificate")]}),
        );
        assert!(matches!(
            parse(&json!({"keys": [x509_entry(&first), not_a_cert]})),
            Err(E::InvalidCertificate { index: 1, .. })
        ));
        let trailing = with(
            &entry,
            json!({"x5c": [STANDARD.encode([first.as_ref(), &[0]].concat())]}),
        );
        assert!(matches!(
            parse(&json!({"keys": [trailing]})),
            Err(E::InvalidCertificate { index: 0, .. })
        ));
    }

    #[test]
    fn bj1_jwt_entries() {
        let key = JwtSigningKey::generate().unwrap();
        let entry = jwt_entry("k1", key.public_key());
        // BJ-1 (decision): a jwt-svid key without kid is skipped, not an error.
        for (item, entry) in [
            (
                "BJ-1 kid missing skipped",
                with(&entry, json!({"kid": null})),
            ),
            ("BJ-1 kid empty skipped", with(&entry, json!({"kid": ""}))),
        ] {
            assert!(
                parse(&json!({"keys": [entry]})).unwrap().is_empty(),
                "{item}"
            );
        }
        assert_eq!(
            parse(&json!({"keys": [with(&entry, json!({"kid": 5}))]})),
            Err(E::MalformedKey {
                index: 0,
                reason: "kid is not a string"
            })
        );
        assert_eq!(
            parse(&json!({"keys": [entry, with(&entry, json!({"x": entry["y"]}))]})),
            Err(E::DuplicateKeyId { kid: "k1".into() }),
            "BJ-1 duplicate kid"
        );
        assert!(matches!(
            parse(&json!({"keys": [with(&entry, json!({"x": "AAAA"}))]})),
            Err(E::InvalidKey {
                index: 0,
                source: JwtSvidError::InvalidJwk { .. }
            })
        ));
        let bundle = parse(&json!({"keys": [entry]})).unwrap();
        assert_eq!(bundle.jwt_keys().get("k1"), Some(key.public_key()));

        let mut bundle = SpiffeBundle::new(td("example.org"));
        assert_eq!(
            bundle.insert_jwt_key("", key.public_key().clone()),
            Err(E::EmptyKeyId)
        );
    }

    #[test]
    fn bj2_conversions_split_by_use() {
        let (bundle, signer) = full_bundle();

        // BJ-2: the JWT bundle has only the jwt-svid keys, and validates tokens.
        let jwt = bundle.jwt_bundle();
        assert_eq!(jwt.trust_domain(), &td("example.org"));
        assert_eq!(jwt.keys(), bundle.jwt_keys());
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let token = signer
            .sign(&JwtSvidParams {
                subject: SpiffeId::new("spiffe://example.org/web").unwrap(),
                audience: vec!["db".into()],
                issued_at: now,
                expires_at: now + Duration::from_secs(60),
                issuer: None,
            })
            .unwrap();
        assert!(JwtSvid::parse_and_validate(token.token(), &jwt, "db", now).is_ok());

        // The X.509 bundle has only the authorities.
        let x509 = bundle.x509_bundle().unwrap();
        assert_eq!(x509.trust_domain(), &td("example.org"));
        assert_eq!(x509.authorities(), bundle.x509_authorities());
        assert_eq!(bundle.x509_der(), x509.to_der());

        // And back.
        let mut rebuilt = SpiffeBundle::from_bundles(&x509, &jwt).unwrap();
        rebuilt.set_sequence(bundle.sequence());
        rebuilt.set_refresh_hint(bundle.refresh_hint());
        assert_eq!(rebuilt, bundle);

        // B-10: never combine trust domains.
        let foreign = JwtBundle::new(td("other.org"));
        assert_eq!(
            SpiffeBundle::from_bundles(&x509, &foreign),
            Err(E::TrustDomainMismatch {
                x509: td("example.org"),
                jwt: td("other.org"),
            })
        );
    }

    #[test]
    fn bx1_bj1_emitted_entries() {
        let (p256, p256_key) = ca(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (rsa, _) = rsa_ca();
        let signer = JwtSigningKey::generate().unwrap();
        let mut bundle = SpiffeBundle::new(td("example.org"));
        bundle.add_x509_authority(p256.clone()).unwrap();
        bundle.add_x509_authority(rsa.clone()).unwrap();
        bundle
            .insert_jwt_key(signer.kid(), signer.public_key().clone())
            .unwrap();
        bundle.set_sequence(Some(42));
        bundle.set_refresh_hint(Some(Duration::from_millis(299_500)));

        let json: Value = serde_json::from_slice(&bundle.to_json()).unwrap();
        assert_eq!(json["spiffe_sequence"], 42, "B-3");
        assert_eq!(
            json["spiffe_refresh_hint"], 300,
            "B-4 whole seconds, rounded up"
        );
        let keys = json["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 3);
        let names = |jwk: &Value| -> Vec<String> {
            let mut names = jwk.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
            names.sort();
            names
        };

        // BX-1: one JWK per authority, no kid, x5c with exactly that certificate.
        let ec = &keys[0];
        assert_eq!(
            names(ec),
            ["crv", "kty", "use", "x", "x5c", "y"],
            "BX-1 B-8"
        );
        assert_eq!(ec["use"], "x509-svid");
        assert_eq!(ec["kty"], "EC");
        assert_eq!(ec["crv"], "P-256");
        assert_eq!(ec["x5c"], json!([b64(&p256)]));
        // The key parameters are the certificate's public key.
        let point = p256_key.public_key_raw();
        assert_eq!(point.len(), 65);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(ec["x"].as_str().unwrap()).unwrap(),
            point[1..33]
        );
        assert_eq!(
            URL_SAFE_NO_PAD.decode(ec["y"].as_str().unwrap()).unwrap(),
            point[33..]
        );

        let rsa_jwk = &keys[1];
        assert_eq!(names(rsa_jwk), ["e", "kty", "n", "use", "x5c"], "BX-1 B-8");
        assert_eq!(rsa_jwk["kty"], "RSA");
        assert_eq!(rsa_jwk["e"], "AQAB");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(rsa_jwk["n"].as_str().unwrap())
                .unwrap()
                .len(),
            256
        );
        assert_eq!(rsa_jwk["x5c"], json!([b64(&rsa)]));

        // BJ-1: jwt-svid JWKs carry their kid.
        let jwt = &keys[2];
        assert_eq!(
            names(jwt),
            ["crv", "kid", "kty", "use", "x", "y"],
            "BJ-1 B-8"
        );
        assert_eq!(jwt["use"], "jwt-svid");
        assert_eq!(jwt["kid"], signer.kid());

        // Without sequence or hint, neither member appears.
        let bare: Value =
            serde_json::from_slice(&SpiffeBundle::new(td("a.org")).to_json()).unwrap();
        assert_eq!(bare, json!({"keys": []}));
    }

    #[test]
    fn emit_parse_round_trip() {
        let (bundle, _) = full_bundle();
        let parsed = SpiffeBundle::parse(td("example.org"), &bundle.to_json()).unwrap();
        assert_eq!(parsed, bundle);
        assert_eq!(parsed.to_json(), bundle.to_json());
        assert_eq!(parsed.x509_authorities().len(), 3);
        assert_eq!(parsed.jwt_keys().len(), 2);
        assert_eq!(parsed.sequence(), Some(7));
        assert_eq!(parsed.refresh_hint(), Some(Duration::from_secs(300)));
        // The same bytes parsed for another trust domain belong to that trust domain (B-9).
        let other = SpiffeBundle::parse(td("other.org"), &bundle.to_json()).unwrap();
        assert_eq!(other.trust_domain(), &td("other.org"));
    }

    #[test]
    fn spec_appendix_a_shape() {
        let (rsa, _) = rsa_ca();
        let signer = JwtSigningKey::generate().unwrap();
        let jwk = signer.public_key().to_jwk();
        let rsa_jwk = authority_key(&rsa, 0).unwrap().to_jwk();
        let text = format!(
            r#"{{"spiffe_sequence": 2, "spiffe_refresh_hint": 2419200,
 "keys": [{{"kty":"RSA","use":"x509-svid","x5c":["{}"],"n":{},"e":"AQAB"}},
          {{"kty":"EC","use":"jwt-svid","kid":"{}","crv":"P-256","x":{},"y":{}}}]}}"#,
            b64(&rsa),
            rsa_jwk["n"],
            signer.kid(),
            jwk["x"],
            jwk["y"]
        );
        let bundle = SpiffeBundle::parse(td("example.org"), text.as_bytes()).unwrap();
        assert_eq!(bundle.x509_authorities(), [rsa]);
        assert_eq!(
            bundle.jwt_keys().get(signer.kid()),
            Some(signer.public_key())
        );
        assert_eq!(bundle.sequence(), Some(2));
        assert_eq!(bundle.refresh_hint(), Some(Duration::from_secs(2_419_200)));
    }

    #[test]
    fn input_limits_and_strict_json() {
        let mut big = b"{\"keys\": []".to_vec();
        big.resize(MAX_BUNDLE_LEN + 1, b' ');
        assert_eq!(
            SpiffeBundle::parse(td("example.org"), &big),
            Err(E::TooLarge {
                len: MAX_BUNDLE_LEN + 1,
                max: MAX_BUNDLE_LEN
            })
        );
        let mut fits = b"{\"keys\": []".to_vec();
        fits.resize(MAX_BUNDLE_LEN - 1, b' ');
        fits.push(b'}');
        assert!(SpiffeBundle::parse(td("example.org"), &fits).is_ok());

        for (item, text) in [
            ("duplicate keys member", r#"{"keys": [], "keys": []}"#),
            (
                "duplicate member in a jwk",
                r#"{"keys": [{"use": "jwt-svid", "use": "x509-svid"}]}"#,
            ),
            ("not json", "keys"),
            ("trailing garbage", r#"{"keys": []} {}"#),
        ] {
            assert!(
                matches!(
                    SpiffeBundle::parse(td("example.org"), text.as_bytes()),
                    Err(E::Json { .. })
                ),
                "{item}"
            );
        }
    }

    #[test]
    fn authorities_must_be_certificates_with_supported_keys() {
        let mut bundle = SpiffeBundle::new(td("example.org"));
        assert!(matches!(
            bundle.add_x509_authority(CertificateDer::from(b"junk".to_vec())),
            Err(E::InvalidCertificate { index: 0, .. })
        ));
        let (ed25519, _) = ca(&rcgen::PKCS_ED25519);
        assert!(matches!(
            bundle.add_x509_authority(ed25519.clone()),
            Err(E::UnsupportedAuthorityKey { index: 0, .. })
        ));
        assert!(bundle.is_empty());
        // In a parsed bundle: kty OKP is an unknown kty here (B-6), so the entry is skipped;
        // labelled EC, the certificate's key is found unsupported.
        let okp = json!({"kty": "OKP", "use": "x509-svid", "x5c": [b64(&ed25519)]});
        assert!(parse(&json!({"keys": [okp]})).unwrap().is_empty());
        let mislabelled = json!({"kty": "EC", "use": "x509-svid", "x5c": [b64(&ed25519)]});
        assert!(matches!(
            parse(&json!({"keys": [mislabelled]})),
            Err(E::UnsupportedAuthorityKey { index: 0, .. })
        ));
        // The certificate is authoritative: parameters beside x5c are not read.
        let (p256, _) = ca(&rcgen::PKCS_ECDSA_P256_SHA256);
        let bare = json!({"kty": "EC", "use": "x509-svid", "x5c": [b64(&p256)]});
        let parsed = parse(&json!({"keys": [bare]})).unwrap();
        assert_eq!(parsed.x509_authorities(), [p256]);
        // Debug does not dump certificates.
        let debug = format!("{parsed:?}");
        assert!(debug.contains("x509_authorities: 1"), "{debug}");
    }

    #[test]
    fn bundle_map_round_trip_without_refresh_hints() {
        let (a, _) = full_bundle();
        let mut b = SpiffeBundle::new(td("b.org"));
        b.add_x509_authority(ca(&rcgen::PKCS_ECDSA_P256_SHA256).0)
            .unwrap();
        b.set_sequence(Some(1));
        let map = BundleMap::from_iter([a.clone(), b.clone()]);

        let json: Value = serde_json::from_slice(&map.to_json()).unwrap();
        let tds = json["trust_domains"].as_object().unwrap();
        assert_eq!(tds.keys().collect::<Vec<_>>(), ["b.org", "example.org"]);
        for bundle in tds.values() {
            assert!(
                bundle.get("spiffe_refresh_hint").is_none(),
                "§5 no refresh hint"
            );
            assert!(bundle.get("spiffe_sequence").is_some());
        }

        let parsed = BundleMap::parse(&map.to_json()).unwrap();
        assert_eq!(parsed.len(), 2);
        let mut a_without_hint = a.clone();
        a_without_hint.set_refresh_hint(None);
        assert_eq!(parsed.get(&td("example.org")), Some(&a_without_hint));
        assert_eq!(parsed.get(&td("b.org")), Some(&b));
        assert_eq!(parsed.to_json(), map.to_json());

        // Refresh hints in input are dropped: consumers must not poll by them.
        let mut with_hint: Value = json.clone();
        with_hint["trust_domains"]["b.org"]["spiffe_refresh_hint"] = json!(5);
        let parsed = BundleMap::parse(with_hint.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.get(&td("b.org")).unwrap().refresh_hint(), None);
    }

    #[test]
    fn bundle_map_rules() {
        let ok = |text: &str| BundleMap::parse(text.as_bytes());
        assert!(
            ok(r#"{"trust_domains": {}}"#).unwrap().is_empty(),
            "§5 may be empty"
        );
        assert!(
            ok(r#"{"trust_domains": {}, "other": 1}"#).is_ok(),
            "unknown members ignored"
        );
        assert_eq!(
            ok(r#"{}"#),
            Err(E::MissingTrustDomains),
            "§5 trust_domains required"
        );
        assert_eq!(ok(r#"{"trust_domains": []}"#), Err(E::MissingTrustDomains));
        assert_eq!(ok(r#"[]"#), Err(E::NotAnObject));

        // bundle map duplicate key: serde_json's Map would keep the last one silently.
        let dup = r#"{"trust_domains": {"a.org": {"keys": []}, "a.org": {"keys": []}}}"#;
        match ok(dup) {
            Err(E::Json { reason }) => assert!(reason.contains("duplicate"), "{reason}"),
            other => panic!("bundle map duplicate key: {other:?}"),
        }
        let dup_escaped =
            r#"{"trust_domains": {"a.org": {"keys": []}, "\u0061.org": {"keys": []}}}"#;
        assert!(
            matches!(ok(dup_escaped), Err(E::Json { .. })),
            "bundle map duplicate key escaped"
        );
        let dup_forms =
            r#"{"trust_domains": {"a.org": {"keys": []}, "spiffe://a.org": {"keys": []}}}"#;
        assert_eq!(
            ok(dup_forms),
            Err(E::DuplicateTrustDomain {
                trust_domain: td("a.org")
            }),
            "bundle map duplicate key in two forms"
        );

        assert!(matches!(
            ok(r#"{"trust_domains": {"A.org": {"keys": []}}}"#),
            Err(E::InvalidTrustDomain {
                source: SpiffeIdError::BadTrustDomainChar,
                ..
            })
        ));
        assert_eq!(
            ok(r#"{"trust_domains": {"a.org": {}}}"#),
            Err(E::InBundleMap {
                trust_domain: td("a.org"),
                source: Box::new(E::MissingKeys),
            })
        );

        let mut big = br#"{"trust_domains": {}"#.to_vec();
        big.resize(MAX_BUNDLE_MAP_LEN + 1, b' ');
        assert!(matches!(BundleMap::parse(&big), Err(E::TooLarge { .. })));

        // insert replaces, never merges (B-10).
        let mut map = BundleMap::new();
        let mut first = SpiffeBundle::new(td("a.org"));
        first.set_sequence(Some(1));
        assert!(map.insert(first).is_none());
        let replaced = map.insert(SpiffeBundle::new(td("a.org"))).unwrap();
        assert_eq!(replaced.sequence(), Some(1));
        assert_eq!(map.get(&td("a.org")).unwrap().sequence(), None);
        assert_eq!(map.iter().count(), 1);
        assert!(map.remove(&td("a.org")).is_some());
        assert!(map.is_empty());
    }

    #[test]
    fn errors_are_lowercase() {
        for e in [
            E::MissingKeys,
            E::InvalidSequence,
            E::DuplicateTrustDomain {
                trust_domain: td("a.org"),
            },
            E::MalformedKey {
                index: 1,
                reason: "x5c is not an array",
            },
        ] {
            let text = e.to_string();
            assert!(text.starts_with(|c: char| c.is_lowercase()), "{text}");
            assert!(!text.ends_with('.'), "{text}");
        }
    }
}
