//! JWT-SVIDs ([JWT-SVID]): ES256 signing, validation by the JWT-SVID rules, and the JWT bundle
//! whose keys validation uses.
//!
//! No JWT crate: the JWS is built and checked by hand on `ring` (`rust-stack.md` §9), so every rule
//! of spec section 4 is visible here and nothing is accepted by a library default.
//!
//! - [`JwtSigningKey`] signs ES256 tokens with the header `{"alg":"ES256","kid":..,"typ":"JWT"}`
//!   (a `kid` is always emitted) and an `aud` that is always an array (section 9.8).
//! - [`JwtSvid::parse_and_validate`] checks a token in the order of J-1 to J-10, starting with a
//!   size limit so hostile input is bounded, and checking `alg` before anything else (J-2).
//! - [`JwtBundle`] is one trust domain's keys by `kid` (B-9); [`JwtBundleSet`] holds one bundle per
//!   trust domain and never merges them (B-10). [`JwtBundle::to_jwks`] is the plain JWKS the
//!   Workload API's `FetchJWTBundles` sends.
//!
//! Stricter than the spec, on purpose:
//! - a token without `kid` is rejected (section 9.2; go-spiffe and SPIRE do the same);
//! - JSON with a duplicate member name (in the header, the claims or a JWKS) is rejected, so two
//!   parsers can never disagree on which `alg` or `sub` a token carries.
//!
//! [JWT-SVID]: https://github.com/spiffe/spiffe/blob/main/standards/JWT-SVID.md

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// The longest token [`JwtSvid::parse_and_validate`] looks at, in bytes. Longer input is rejected
/// before it is decoded, so hostile input costs at most this much work. SPIRE's tokens are well
/// under 1 KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The longest JWKS [`JwtBundle::from_jwks`] accepts, in bytes.
pub const MAX_JWKS_LEN: usize = 1024 * 1024;

/// The clock skew allowed when checking `exp`, `nbf` and `iat` (J-8): a token is still accepted
/// this long after `exp`, and `nbf`/`iat` may lie this far in the future. One minute, as in
/// go-spiffe (go-jose's `DefaultLeeway`).
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(60);

/// The `alg` values a JWT-SVID may carry (J-2). Everything else, `none` and `HS*` included, is
/// rejected before any other processing. `ES512` is allowed by the spec but cannot be verified
/// with `ring`; such tokens fail with [`JwtSvidError::UnsupportedAlgorithm`].
pub const ALLOWED_ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];

/// The header parameters a JWT-SVID may carry (J-5).
const ALLOWED_HEADER_PARAMETERS: [&str; 3] = ["alg", "kid", "typ"];

/// Why a token, key or JWKS was rejected, or why signing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSvidError {
    /// The token is longer than [`MAX_TOKEN_LEN`] bytes.
    #[error("token is {len} bytes long; the maximum is {max}")]
    TokenTooLarge {
        /// The length found, in bytes.
        len: usize,
        /// The limit, [`MAX_TOKEN_LEN`].
        max: usize,
    },
    /// The token uses the JWS JSON serialization; only the compact form is allowed (J-1).
    #[error("jws json serialization is not allowed; use the compact serialization")]
    JsonSerialization,
    /// The token has five parts: it is a JWE, which JWT-SVIDs must never be (J-1).
    #[error("token is encrypted (jwe); jwt-svids are signed jws only")]
    Encrypted,
    /// The token does not have the three dot-separated parts of a JWS compact serialization
    /// (J-1).
    #[error("token has {parts} parts; a jws compact serialization has 3")]
    Malformed {
        /// How many dot-separated parts were found.
        parts: usize,
    },
    /// A part of the token is not unpadded base64url.
    #[error("token {part} is not valid base64url")]
    InvalidBase64 {
        /// `header`, `claims` or `signature`.
        part: &'static str,
    },
    /// The header or claims are not a JSON object (or repeat a member name).
    #[error("token {part} is not a json object: {reason}")]
    InvalidJson {
        /// `header` or `claims`.
        part: &'static str,
        /// What the JSON parser reported.
        reason: String,
    },
    /// The header has no `alg` (J-2).
    #[error("token header has no alg")]
    MissingAlgorithm,
    /// The `alg` is not one of [`ALLOWED_ALGORITHMS`]; `none` and `HS*` end here (J-2).
    #[error("algorithm {alg:?} is not allowed for jwt-svids")]
    DisallowedAlgorithm {
        /// The `alg` found (JSON text when it is not a string).
        alg: String,
    },
    /// The `typ` header is present and is not exactly `JWT` or `JOSE` (J-4).
    #[error("token type {typ} is not allowed; it must be JWT or JOSE")]
    InvalidType {
        /// The `typ` found, as JSON text.
        typ: String,
    },
    /// The header has a parameter other than `alg`, `kid` and `typ` (J-5).
    #[error("header parameter {name:?} is not allowed in a jwt-svid")]
    UnexpectedHeaderParameter {
        /// The first unexpected parameter name.
        name: String,
    },
    /// The header has no `kid`, or an empty or non-string one. The spec makes `kid` optional;
    /// Sigil, like go-spiffe and SPIRE, requires it (section 9.2, J-3).
    #[error("token header has no kid")]
    MissingKeyId,
    /// The claims have no `sub` (J-6).
    #[error("token has no sub claim")]
    MissingSubject,
    /// The `sub` claim is not a valid SPIFFE ID (J-6).
    #[error("sub claim is not a valid spiffe id: {source}")]
    InvalidSubject {
        /// Why the SPIFFE ID was rejected.
        #[source]
        source: SpiffeIdError,
    },
    /// There is no JWT bundle for the trust domain of `sub`, so the token is untrusted (J-10).
    #[error("no jwt bundle for trust domain {trust_domain}")]
    UntrustedTrustDomain {
        /// The trust domain of the token's `sub`.
        trust_domain: TrustDomain,
    },
    /// The bundle of the token's trust domain has no key with the token's `kid`: the key was
    /// rotated out, or the token was signed by another trust domain (J-10).
    #[error("no key with kid {kid:?} in the jwt bundle of {trust_domain}")]
    UnknownKeyId {
        /// The `kid` of the token.
        kid: String,
        /// The trust domain whose bundle was searched.
        trust_domain: TrustDomain,
    },
    /// The `alg` is allowed by the spec but this implementation cannot verify it (`ES512`:
    /// `ring` has no P-521).
    #[error("unsupported algorithm {alg}")]
    UnsupportedAlgorithm {
        /// The algorithm.
        alg: &'static str,
    },
    /// The key found by `kid` is of a type or curve that does not match the token's `alg`.
    #[error("key {kid:?} cannot verify {alg} signatures")]
    KeyAlgorithmMismatch {
        /// The token's algorithm.
        alg: &'static str,
        /// The key's `kid`.
        kid: String,
    },
    /// The signature does not verify with the key named by `kid` (a tampered or forged token).
    #[error("token signature is invalid")]
    InvalidSignature,
    /// The claims have no `aud`, or an empty array (J-7).
    #[error("token has no audience")]
    MissingAudience,
    /// The `aud` claim does not contain the validator's audience (J-7).
    #[error("token audience does not include {audience:?}")]
    AudienceMismatch {
        /// The audience the validator expected.
        audience: String,
    },
    /// The validator was called with an empty audience, or a token was to be signed with no
    /// audience or an empty one (J-7, WA-13).
    #[error("audience cannot be empty")]
    EmptyAudience,
    /// The claims have no `exp` (J-8).
    #[error("token has no exp claim")]
    MissingExpiry,
    /// `exp` is further in the past than [`CLOCK_LEEWAY`] (J-8).
    #[error("token has expired")]
    Expired,
    /// `nbf` is further in the future than [`CLOCK_LEEWAY`].
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iat` is further in the future than [`CLOCK_LEEWAY`].
    #[error("token was issued in the future")]
    IssuedInTheFuture,
    /// A header parameter or claim has the wrong JSON type (for example a numeric `sub`, an
    /// `aud` array holding a number, or a negative `exp`).
    #[error("{name} has an invalid value")]
    InvalidClaim {
        /// The name of the parameter or claim.
        name: &'static str,
    },
    /// The PKCS#8 document is not a P-256 private key, or could not be generated.
    #[error("invalid es256 signing key: {reason}")]
    InvalidSigningKey {
        /// What `ring` reported.
        reason: String,
    },
    /// The token could not be signed: bad times (before 1970, or `exp` not after `iat`) or a
    /// `ring` failure.
    #[error("cannot sign jwt-svid: {reason}")]
    Signing {
        /// What went wrong.
        reason: &'static str,
    },
    /// A JWK's `kty` is missing or not `EC`/`RSA`.
    #[error("unsupported key type {kty}")]
    UnsupportedKeyType {
        /// The `kty` found, as JSON text (`null` when missing).
        kty: String,
    },
    /// An `EC` JWK's `crv` is missing or not `P-256`, `P-384` or `P-521`.
    #[error("unsupported curve {crv}")]
    UnsupportedCurve {
        /// The `crv` found, as JSON text (`null` when missing).
        crv: String,
    },
    /// A JWK of a supported type has missing or malformed key parameters.
    #[error("invalid jwk: {reason}")]
    InvalidJwk {
        /// What is wrong with it.
        reason: String,
    },
    /// A JWKS is too large, not a JSON object, or has no `keys` array.
    #[error("invalid jwks: {reason}")]
    InvalidJwks {
        /// What is wrong with it.
        reason: String,
    },
    /// A key ID is empty; every JWT key needs one (BJ-1).
    #[error("kid cannot be empty")]
    EmptyKeyId,
    /// Two keys of one bundle share a `kid`, so a token naming it would be ambiguous.
    #[error("duplicate kid {kid:?}")]
    DuplicateKeyId {
        /// The repeated `kid`.
        kid: String,
    },
}

/// An elliptic curve a JWT key can be on (RFC 7518 §6.2.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EcCurve {
    /// NIST P-256, for `ES256`.
    P256,
    /// NIST P-384, for `ES384`.
    P384,
    /// NIST P-521, for `ES512` (kept in bundles; tokens cannot be verified with `ring`).
    P521,
}

/// A public key that verifies JWT-SVIDs: EC (P-256, P-384, P-521) or RSA.
///
/// Converts to and from a JWK ([`JwtPublicKey::to_jwk`], [`JwtPublicKey::from_jwk`]). Only the
/// key parameters are kept: `kid` and `use` belong to the bundle that holds the key.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtPublicKey {
    params: KeyParams,
}

#[derive(Clone, PartialEq, Eq)]
enum KeyParams {
    Ec {
        curve: EcCurve,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    /// Big-endian, without leading zero bytes.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// One trust domain's JWT-SVID keys, by `kid` (B-9, BJ-1, BJ-2).
///
/// An empty bundle is valid: the trust domain has no JWT keys (revoked, B-2), and every token
/// from it fails with [`JwtSvidError::UnknownKeyId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtBundle {
    trust_domain: TrustDomain,
    keys: BTreeMap<String, JwtPublicKey>,
}

/// Where a validator finds the JWT bundle of a token's trust domain (J-10, B-9).
pub trait JwtBundleSource {
    /// The bundle of `trust_domain`, or `None` when that trust domain is not trusted. An
    /// implementation must never answer with another trust domain's bundle.
    fn jwt_bundle_for(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle>;
}

/// JWT bundles of several trust domains: at most one per trust domain, never merged (B-10).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtBundleSet {
    bundles: BTreeMap<TrustDomain, JwtBundle>,
}

/// An ES256 signing key for JWT-SVIDs, with its `kid`.
///
/// The private key lives inside `ring` and is never printed: `Debug` shows only the algorithm
/// and the `kid`.
pub struct JwtSigningKey {
    key_pair: EcdsaKeyPair,
    kid: String,
    public_key: JwtPublicKey,
}

/// What to put in a JWT-SVID: see [`JwtSigningKey::sign`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidParams {
    /// The workload's SPIFFE ID, the `sub` claim (J-6).
    pub subject: SpiffeId,
    /// The audiences, the `aud` claim: at least one, none empty (J-7). Always emitted as an
    /// array (section 9.8).
    pub audience: Vec<String>,
    /// The `iat` claim. Sub-second parts are dropped.
    pub issued_at: SystemTime,
    /// The `exp` claim (J-8); must be after `issued_at`. Sub-second parts are dropped.
    pub expires_at: SystemTime,
    /// The optional `iss` claim (SPIRE's `jwt_issuer`).
    pub issuer: Option<String>,
}

/// A JWT-SVID: either one that passed [`JwtSvid::parse_and_validate`], or one just signed by
/// [`JwtSigningKey::sign`].
///
/// The token is a bearer credential (J-12), so `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSvid {
    spiffe_id: SpiffeId,
    audience: Vec<String>,
    expiry: SystemTime,
    claims: Map<String, Value>,
    token: String,
}

/// A JWS algorithm from [`ALLOWED_ALGORITHMS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
    Es512,
    Ps256,
    Ps384,
    Ps512,
}

// === impl EcCurve ===

impl EcCurve {
    /// The JWK `crv` name: `P-256`, `P-384` or `P-521`.
    pub fn name(self) -> &'static str {
        match self {
            Self::P256 => "P-256",
            Self::P384 => "P-384",
            Self::P521 => "P-521",
        }
    }

    /// The curve with this JWK `crv` name (case-sensitive), if supported.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "P-256" => Self::P256,
            "P-384" => Self::P384,
            "P-521" => Self::P521,
            _ => return None,
        })
    }

    /// The length of one coordinate, in bytes.
    fn coordinate_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
            Self::P521 => 66,
        }
    }
}

impl fmt::Display for EcCurve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// === impl JwtPublicKey ===

impl JwtPublicKey {
    /// An EC key from its affine coordinates, each exactly as long as the curve needs.
    pub fn ec(curve: EcCurve, x: &[u8], y: &[u8]) -> Result<Self, JwtSvidError> {
        let len = curve.coordinate_len();
        if x.len() != len || y.len() != len {
            return Err(JwtSvidError::InvalidJwk {
                reason: format!("{curve} coordinates must be {len} bytes long"),
            });
        }
        Ok(Self {
            params: KeyParams::Ec {
                curve,
                x: x.to_vec(),
                y: y.to_vec(),
            },
        })
    }

    /// An EC key from an uncompressed SEC 1 point (`0x04 || x || y`), the form found in
    /// certificates and in `ring`.
    pub fn ec_uncompressed(curve: EcCurve, point: &[u8]) -> Result<Self, JwtSvidError> {
        let len = curve.coordinate_len();
        match point.split_first() {
            Some((0x04, xy)) if xy.len() == 2 * len => {
                let (x, y) = xy.split_at(len);
                Self::ec(curve, x, y)
            }
            _ => Err(JwtSvidError::InvalidJwk {
                reason: format!("not an uncompressed {curve} point"),
            }),
        }
    }

    /// An RSA key from its big-endian modulus and exponent. Leading zero bytes (as in DER
    /// integers) are dropped.
    pub fn rsa(n: &[u8], e: &[u8]) -> Result<Self, JwtSvidError> {
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        if n.is_empty() || e.is_empty() {
            return Err(JwtSvidError::InvalidJwk {
                reason: "rsa modulus and exponent cannot be zero".to_owned(),
            });
        }
        Ok(Self {
            params: KeyParams::Rsa {
                n: n.to_vec(),
                e: e.to_vec(),
            },
        })
    }

    /// Reads the key parameters of a JWK (`kty` plus `crv`/`x`/`y` or `n`/`e`). Other members
    /// (`kid`, `use`, `x5c`, ...) are ignored here; the bundle parsers look at them.
    ///
    /// # Errors
    ///
    /// [`JwtSvidError::UnsupportedKeyType`] or [`JwtSvidError::UnsupportedCurve`] for keys this
    /// type cannot hold (bundle parsers skip those, B-6), and [`JwtSvidError::InvalidJwk`] when a
    /// parameter is missing or not unpadded base64url.
    pub fn from_jwk(jwk: &Map<String, Value>) -> Result<Self, JwtSvidError> {
        match jwk.get("kty") {
            Some(Value::String(kty)) if kty == "EC" => {
                let curve = match jwk.get("crv") {
                    Some(Value::String(crv)) => EcCurve::from_name(crv),
                    _ => None,
                };
                let Some(curve) = curve else {
                    return Err(JwtSvidError::UnsupportedCurve {
                        crv: json_text(jwk.get("crv")),
                    });
                };
                Self::ec(curve, &jwk_param(jwk, "x")?, &jwk_param(jwk, "y")?)
            }
            Some(Value::String(kty)) if kty == "RSA" => {
                Self::rsa(&jwk_param(jwk, "n")?, &jwk_param(jwk, "e")?)
            }
            other => Err(JwtSvidError::UnsupportedKeyType {
                kty: json_text(other),
            }),
        }
    }

    /// The JWK members of this key: `kty` and `crv`/`x`/`y` or `n`/`e`, nothing else.
    pub fn to_jwk(&self) -> Map<String, Value> {
        let mut jwk = Map::new();
        match &self.params {
            KeyParams::Ec { curve, x, y } => {
                jwk.insert("kty".to_owned(), "EC".into());
                jwk.insert("crv".to_owned(), curve.name().into());
                jwk.insert("x".to_owned(), URL_SAFE_NO_PAD.encode(x).into());
                jwk.insert("y".to_owned(), URL_SAFE_NO_PAD.encode(y).into());
            }
            KeyParams::Rsa { n, e } => {
                jwk.insert("kty".to_owned(), "RSA".into());
                jwk.insert("n".to_owned(), URL_SAFE_NO_PAD.encode(n).into());
                jwk.insert("e".to_owned(), URL_SAFE_NO_PAD.encode(e).into());
            }
        }
        jwk
    }

    /// The JWK `kty`: `EC` or `RSA`.
    pub fn key_type(&self) -> &'static str {
        match self.params {
            KeyParams::Ec { .. } => "EC",
            KeyParams::Rsa { .. } => "RSA",
        }
    }

    /// The curve of an EC key; `None` for RSA.
    pub fn curve(&self) -> Option<EcCurve> {
        match self.params {
            KeyParams::Ec { curve, .. } => Some(curve),
            KeyParams::Rsa { .. } => None,
        }
    }

    /// The RFC 7638 JWK thumbprint: base64url (no padding) of the SHA-256 of the canonical JWK.
    /// [`JwtSigningKey`] uses it as the default `kid`.
    pub fn thumbprint(&self) -> String {
        // RFC 7638 §3.2: the required members only, in lexicographic order, no whitespace. The
        // values are base64url or fixed names, so no JSON escaping is needed.
        let canonical = match &self.params {
            KeyParams::Ec { curve, x, y } => format!(
                r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
                curve.name(),
                URL_SAFE_NO_PAD.encode(x),
                URL_SAFE_NO_PAD.encode(y)
            ),
            KeyParams::Rsa { n, e } => format!(
                r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                URL_SAFE_NO_PAD.encode(e),
                URL_SAFE_NO_PAD.encode(n)
            ),
        };
        URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, canonical.as_bytes()))
    }

    /// Like [`JwtPublicKey::from_jwk`], but `Ok(None)` for a key type or curve this type cannot
    /// hold, which bundle parsers skip (B-6).
    pub(crate) fn from_jwk_if_supported(
        jwk: &Map<String, Value>,
    ) -> Result<Option<Self>, JwtSvidError> {
        match Self::from_jwk(jwk) {
            Ok(key) => Ok(Some(key)),
            Err(
                JwtSvidError::UnsupportedKeyType { .. } | JwtSvidError::UnsupportedCurve { .. },
            ) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Verifies `signature` over `message` for `alg`, checking that this key fits `alg`.
    fn verify(
        &self,
        alg: Algorithm,
        kid: &str,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), JwtSvidError> {
        use Algorithm as A;
        let verified = match (alg, &self.params) {
            (A::Es512, _) => {
                return Err(JwtSvidError::UnsupportedAlgorithm { alg: alg.name() });
            }
            (A::Es256, KeyParams::Ec { curve, x, y }) if *curve == EcCurve::P256 => verify_ec(
                &signature::ECDSA_P256_SHA256_FIXED,
                x,
                y,
                message,
                signature,
            ),
            (A::Es384, KeyParams::Ec { curve, x, y }) if *curve == EcCurve::P384 => verify_ec(
                &signature::ECDSA_P384_SHA384_FIXED,
                x,
                y,
                message,
                signature,
            ),
            (
                A::Rs256 | A::Rs384 | A::Rs512 | A::Ps256 | A::Ps384 | A::Ps512,
                KeyParams::Rsa { n, e },
            ) => {
                let params = match alg {
                    A::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    A::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    A::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    A::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    A::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    _ => &signature::RSA_PSS_2048_8192_SHA512,
                };
                signature::RsaPublicKeyComponents { n, e }
                    .verify(params, message, signature)
                    .is_ok()
            }
            _ => {
                return Err(JwtSvidError::KeyAlgorithmMismatch {
                    alg: alg.name(),
                    kid: kid.to_owned(),
                });
            }
        };
        if verified {
            Ok(())
        } else {
            Err(JwtSvidError::InvalidSignature)
        }
    }
}

impl fmt::Debug for JwtPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.params {
            KeyParams::Ec { curve, .. } => write!(f, "JwtPublicKey(EC {curve}")?,
            KeyParams::Rsa { n, .. } => write!(f, "JwtPublicKey(RSA {} bits", n.len() * 8)?,
        }
        write!(f, ", thumbprint {})", self.thumbprint())
    }
}

// === impl JwtBundle ===

impl JwtBundle {
    /// An empty bundle for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            keys: BTreeMap::new(),
        }
    }

    /// A bundle with the given keys. Every `kid` must be non-empty (BJ-1).
    pub fn from_keys(
        trust_domain: TrustDomain,
        keys: BTreeMap<String, JwtPublicKey>,
    ) -> Result<Self, JwtSvidError> {
        if keys.contains_key("") {
            return Err(JwtSvidError::EmptyKeyId);
        }
        Ok(Self { trust_domain, keys })
    }

    /// Parses a JWKS (`{"keys": [...]}`) as the keys of `trust_domain`: the plain JWKS of the
    /// Workload API's `FetchJWTBundles`, or a SPIFFE bundle, whose `x509-svid` keys are skipped.
    ///
    /// `keys` is required and may be empty (B-1, B-2). A JWK is skipped when its `use` is present
    /// and not `jwt-svid` (BJ-2), when its `kty` or `crv` is unsupported (B-6), or when it has no
    /// `kid` (it could never be selected, since tokens without `kid` are rejected; BJ-1). Unknown
    /// top-level members are ignored (B-5).
    ///
    /// # Errors
    ///
    /// Input over [`MAX_JWKS_LEN`] bytes, invalid JSON (duplicate member names included), a
    /// missing `keys` array, a malformed key of a supported type, or a repeated `kid`.
    pub fn from_jwks(trust_domain: TrustDomain, jwks: &[u8]) -> Result<Self, JwtSvidError> {
        let invalid = |reason: String| JwtSvidError::InvalidJwks { reason };
        if jwks.len() > MAX_JWKS_LEN {
            return Err(invalid(format!(
                "jwks is {} bytes long; the maximum is {MAX_JWKS_LEN}",
                jwks.len()
            )));
        }
        let value = parse_json_strict(jwks).map_err(|e| invalid(e.to_string()))?;
        let Value::Object(set) = value else {
            return Err(invalid("not a json object".to_owned()));
        };
        let keys = match set.get("keys") {
            Some(Value::Array(keys)) => keys,
            Some(_) => return Err(invalid("keys is not an array".to_owned())),
            None => return Err(invalid("keys is missing".to_owned())),
        };
        let mut bundle = Self::new(trust_domain);
        for (index, jwk) in keys.iter().enumerate() {
            let Value::Object(jwk) = jwk else {
                return Err(invalid(format!("key {index} is not a json object")));
            };
            if jwk.get("use").is_some_and(|u| u != "jwt-svid") {
                continue;
            }
            let Some(key) = JwtPublicKey::from_jwk_if_supported(jwk)
                .map_err(|e| invalid(format!("key {index}: {e}")))?
            else {
                continue;
            };
            let kid = match jwk.get("kid") {
                Some(Value::String(kid)) if !kid.is_empty() => kid,
                None | Some(Value::String(_)) => continue,
                Some(_) => return Err(invalid(format!("key {index}: kid is not a string"))),
            };
            bundle.insert_new_key(kid, key)?;
        }
        Ok(bundle)
    }

    /// Adds or replaces the key `kid`, returning the key it replaced. `kid` must be non-empty
    /// (BJ-1).
    pub fn insert_key(
        &mut self,
        kid: impl Into<String>,
        key: JwtPublicKey,
    ) -> Result<Option<JwtPublicKey>, JwtSvidError> {
        let kid = kid.into();
        if kid.is_empty() {
            return Err(JwtSvidError::EmptyKeyId);
        }
        Ok(self.keys.insert(kid, key))
    }

    /// Removes the key `kid`, returning it.
    pub fn remove_key(&mut self, kid: &str) -> Option<JwtPublicKey> {
        self.keys.remove(kid)
    }

    /// The trust domain these keys belong to (B-9).
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The keys, by `kid`.
    pub fn keys(&self) -> &BTreeMap<String, JwtPublicKey> {
        &self.keys
    }

    /// The key with this `kid`.
    pub fn key(&self, kid: &str) -> Option<&JwtPublicKey> {
        self.keys.get(kid)
    }

    /// True when the bundle has no keys: every token from this trust domain fails (B-2).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The plain JWKS the Workload API's `FetchJWTBundles` sends (section 6.3):
    /// `{"keys":[{"kty":..,"kid":..,"crv":..,"x":..,"y":..}]}`, or `n`/`e` for RSA. No `use`
    /// and no `spiffe_*` members, as SPIRE sends it. Keys are in `kid` order.
    pub fn to_jwks(&self) -> Vec<u8> {
        let keys = self
            .keys
            .iter()
            .map(|(kid, key)| {
                let mut jwk = key.to_jwk();
                jwk.insert("kid".to_owned(), kid.as_str().into());
                Value::Object(jwk)
            })
            .collect::<Vec<_>>();
        let mut set = Map::new();
        set.insert("keys".to_owned(), Value::Array(keys));
        Value::Object(set).to_string().into_bytes()
    }

    /// A bundle from keys whose `kid`s the caller has already checked to be non-empty.
    pub(crate) fn from_checked_keys(
        trust_domain: TrustDomain,
        keys: BTreeMap<String, JwtPublicKey>,
    ) -> Self {
        Self { trust_domain, keys }
    }

    /// Adds a key whose `kid` must not be taken yet.
    pub(crate) fn insert_new_key(
        &mut self,
        kid: &str,
        key: JwtPublicKey,
    ) -> Result<(), JwtSvidError> {
        if kid.is_empty() {
            return Err(JwtSvidError::EmptyKeyId);
        }
        if self.keys.contains_key(kid) {
            return Err(JwtSvidError::DuplicateKeyId {
                kid: kid.to_owned(),
            });
        }
        self.keys.insert(kid.to_owned(), key);
        Ok(())
    }
}

impl JwtBundleSource for JwtBundle {
    /// This bundle, only when asked for its own trust domain.
    fn jwt_bundle_for(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle> {
        (self.trust_domain == *trust_domain).then_some(self)
    }
}

// === impl JwtBundleSet ===

impl JwtBundleSet {
    /// An empty set: every token is untrusted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bundle`, replacing (never merging with, B-10) any bundle of the same trust domain,
    /// which is returned.
    pub fn insert(&mut self, bundle: JwtBundle) -> Option<JwtBundle> {
        self.bundles.insert(bundle.trust_domain.clone(), bundle)
    }

    /// Removes the bundle of `trust_domain`, returning it.
    pub fn remove(&mut self, trust_domain: &TrustDomain) -> Option<JwtBundle> {
        self.bundles.remove(trust_domain)
    }

    /// The bundle of `trust_domain`.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle> {
        self.bundles.get(trust_domain)
    }

    /// The bundles, in trust domain order.
    pub fn iter(&self) -> impl Iterator<Item = &JwtBundle> {
        self.bundles.values()
    }

    /// How many trust domains have a bundle.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// True when the set holds no bundle.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

impl JwtBundleSource for JwtBundleSet {
    fn jwt_bundle_for(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle> {
        self.bundles.get(trust_domain)
    }
}

impl FromIterator<JwtBundle> for JwtBundleSet {
    /// Collects bundles; a later bundle of the same trust domain replaces an earlier one.
    fn from_iter<I: IntoIterator<Item = JwtBundle>>(iter: I) -> Self {
        let mut set = Self::new();
        for bundle in iter {
            set.insert(bundle);
        }
        set
    }
}

// === impl JwtSigningKey ===

impl JwtSigningKey {
    /// Loads an ES256 (P-256) key from an unencrypted PKCS#8 document. The `kid` is the key's
    /// RFC 7638 thumbprint, so reloading the same key gives the same `kid`; see
    /// [`JwtSigningKey::with_kid`] to choose another.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, JwtSvidError> {
        let key_pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|e| JwtSvidError::InvalidSigningKey {
            reason: e.to_string(),
        })?;
        let public_key =
            JwtPublicKey::ec_uncompressed(EcCurve::P256, key_pair.public_key().as_ref())?;
        Ok(Self {
            kid: public_key.thumbprint(),
            key_pair,
            public_key,
        })
    }

    /// A new random key that exists only in memory (for tests and ephemeral use; to persist a
    /// key, use [`JwtSigningKey::generate_pkcs8`] and [`JwtSigningKey::from_pkcs8`]).
    pub fn generate() -> Result<Self, JwtSvidError> {
        let pkcs8 = Self::generate_pkcs8()?;
        Self::from_pkcs8(pkcs8.secret_pkcs8_der())
    }

    /// A new random P-256 key as a PKCS#8 document, to store and later load with
    /// [`JwtSigningKey::from_pkcs8`]. The caller should zeroize it when done
    /// (`PrivatePkcs8KeyDer` implements `zeroize::Zeroize`).
    pub fn generate_pkcs8() -> Result<PrivatePkcs8KeyDer<'static>, JwtSvidError> {
        let document = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .map_err(|_| JwtSvidError::InvalidSigningKey {
            reason: "key generation failed".to_owned(),
        })?;
        Ok(PrivatePkcs8KeyDer::from(document.as_ref().to_vec()))
    }

    /// Replaces the `kid` (for example with one chosen by the authority manager).
    pub fn with_kid(mut self, kid: impl Into<String>) -> Result<Self, JwtSvidError> {
        let kid = kid.into();
        if kid.is_empty() {
            return Err(JwtSvidError::EmptyKeyId);
        }
        self.kid = kid;
        Ok(self)
    }

    /// The `kid` put in every token's header, and under which the public key is published.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key, to publish in the trust domain's bundle under [`JwtSigningKey::kid`].
    pub fn public_key(&self) -> &JwtPublicKey {
        &self.public_key
    }

    /// Signs a JWT-SVID. Header: `{"alg":"ES256","kid":..,"typ":"JWT"}`. Claims: `sub`, `aud`
    /// (always an array, section 9.8), `exp`, `iat` and, when given, `iss`. Encoded as JWS
    /// compact serialization, base64url without padding.
    ///
    /// # Errors
    ///
    /// [`JwtSvidError::EmptyAudience`] without an audience or with an empty one;
    /// [`JwtSvidError::Signing`] when `expires_at` is not after `issued_at` or either is before
    /// 1970.
    pub fn sign(&self, params: &JwtSvidParams) -> Result<JwtSvid, JwtSvidError> {
        if params.audience.is_empty() || params.audience.iter().any(String::is_empty) {
            return Err(JwtSvidError::EmptyAudience);
        }
        let iat = unix_seconds(params.issued_at)?;
        let exp = unix_seconds(params.expires_at)?;
        if exp <= iat {
            return Err(JwtSvidError::Signing {
                reason: "exp must be after iat",
            });
        }

        let mut header = Map::new();
        header.insert("alg".to_owned(), "ES256".into());
        header.insert("kid".to_owned(), self.kid.as_str().into());
        header.insert("typ".to_owned(), "JWT".into());

        let mut claims = Map::new();
        claims.insert("sub".to_owned(), params.subject.as_str().into());
        claims.insert("aud".to_owned(), params.audience.clone().into());
        claims.insert("exp".to_owned(), exp.into());
        claims.insert("iat".to_owned(), iat.into());
        if let Some(issuer) = &params.issuer {
            claims.insert("iss".to_owned(), issuer.as_str().into());
        }

        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(Value::Object(header).to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(claims.clone()).to_string())
        );
        let signature = self.sign_raw(token.as_bytes())?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));

        Ok(JwtSvid {
            spiffe_id: params.subject.clone(),
            audience: params.audience.clone(),
            expiry: UNIX_EPOCH + Duration::from_secs(exp),
            claims,
            token,
        })
    }

    /// The raw 64-byte `r || s` ES256 signature JOSE uses.
    fn sign_raw(&self, message: &[u8]) -> Result<Vec<u8>, JwtSvidError> {
        let signature = self
            .key_pair
            .sign(&SystemRandom::new(), message)
            .map_err(|_| JwtSvidError::Signing {
                reason: "ecdsa signing failed",
            })?;
        Ok(signature.as_ref().to_vec())
    }
}

impl fmt::Debug for JwtSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigningKey")
            .field("alg", &"ES256")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

// === impl JwtSvid ===

impl JwtSvid {
    /// Parses and validates a JWT-SVID for `audience` at time `now`, by the rules of spec
    /// section 4, in this order:
    ///
    /// 1. size: at most [`MAX_TOKEN_LEN`] bytes;
    /// 2. exactly three compact parts: no JWS JSON serialization, no JWE (J-1);
    /// 3. the header's `alg` is in [`ALLOWED_ALGORITHMS`], before anything else is looked at
    ///    (J-2);
    /// 4. `typ`, if present, is exactly `JWT` or `JOSE` (J-4);
    /// 5. no header parameters besides `alg`, `kid` and `typ` (J-5);
    /// 6. `kid` is present (section 9.2: stricter than the spec);
    /// 7. `sub` is a SPIFFE ID (J-6);
    /// 8. the key comes from the bundle of `sub`'s trust domain only, found by `kid` (J-10);
    /// 9. the signature verifies, with a key whose type matches `alg`;
    /// 10. `aud` (a string or an array) contains `audience` (J-7);
    /// 11. `exp` is present and not past, and `nbf`/`iat`, if present, are not in the future,
    ///     each within [`CLOCK_LEEWAY`] (J-8).
    ///
    /// Other claims are allowed and kept (J-9); `jti` is not tracked.
    pub fn parse_and_validate<S>(
        token: &str,
        bundles: &S,
        audience: &str,
        now: SystemTime,
    ) -> Result<Self, JwtSvidError>
    where
        S: JwtBundleSource + ?Sized,
    {
        if audience.is_empty() {
            return Err(JwtSvidError::EmptyAudience);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtSvidError::TokenTooLarge {
                len: token.len(),
                max: MAX_TOKEN_LEN,
            });
        }

        // J-1: compact serialization only.
        if token.trim_start().starts_with('{') {
            return Err(JwtSvidError::JsonSerialization);
        }
        let parts = token.split('.').collect::<Vec<_>>();
        let &[header_b64, claims_b64, signature_b64] = parts.as_slice() else {
            return Err(match parts.len() {
                5 => JwtSvidError::Encrypted,
                parts => JwtSvidError::Malformed { parts },
            });
        };

        // J-2: alg first.
        let header = decode_object(header_b64, "header")?;
        let alg = match header.get("alg") {
            None => return Err(JwtSvidError::MissingAlgorithm),
            Some(Value::String(alg)) => {
                Algorithm::from_name(alg).ok_or_else(|| JwtSvidError::DisallowedAlgorithm {
                    alg: alg.to_owned(),
                })?
            }
            Some(other) => {
                return Err(JwtSvidError::DisallowedAlgorithm {
                    alg: other.to_string(),
                });
            }
        };
        // J-4.
        if let Some(typ) = header.get("typ")
            && typ != "JWT"
            && typ != "JOSE"
        {
            return Err(JwtSvidError::InvalidType {
                typ: typ.to_string(),
            });
        }
        // J-5.
        if let Some(name) = header
            .keys()
            .find(|name| !ALLOWED_HEADER_PARAMETERS.contains(&name.as_str()))
        {
            return Err(JwtSvidError::UnexpectedHeaderParameter { name: name.clone() });
        }
        // Section 9.2 (J-3).
        let kid = match header.get("kid") {
            Some(Value::String(kid)) if !kid.is_empty() => kid,
            _ => return Err(JwtSvidError::MissingKeyId),
        };

        // J-6.
        let mut claims = decode_object(claims_b64, "claims")?;
        let spiffe_id = match claims.get("sub") {
            None => return Err(JwtSvidError::MissingSubject),
            Some(Value::String(sub)) => {
                SpiffeId::new(sub).map_err(|source| JwtSvidError::InvalidSubject { source })?
            }
            Some(_) => return Err(JwtSvidError::InvalidClaim { name: "sub" }),
        };

        // J-10: that trust domain's bundle only (B-9), then the key by kid.
        let trust_domain = spiffe_id.trust_domain();
        let bundle = bundles
            .jwt_bundle_for(&trust_domain)
            .filter(|bundle| *bundle.trust_domain() == trust_domain)
            .ok_or_else(|| JwtSvidError::UntrustedTrustDomain {
                trust_domain: trust_domain.clone(),
            })?;
        let key = bundle.key(kid).ok_or_else(|| JwtSvidError::UnknownKeyId {
            kid: kid.clone(),
            trust_domain: trust_domain.clone(),
        })?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| JwtSvidError::InvalidBase64 { part: "signature" })?;
        let signing_input = &token[..header_b64.len() + 1 + claims_b64.len()];
        key.verify(alg, kid, signing_input.as_bytes(), &signature)?;

        // J-7.
        let audiences = match claims.get("aud") {
            None => return Err(JwtSvidError::MissingAudience),
            Some(Value::String(aud)) => vec![aud.clone()],
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(JwtSvidError::InvalidClaim { name: "aud" })?,
            Some(_) => return Err(JwtSvidError::InvalidClaim { name: "aud" }),
        };
        if audiences.is_empty() {
            return Err(JwtSvidError::MissingAudience);
        }
        if !audiences.iter().any(|aud| aud == audience) {
            return Err(JwtSvidError::AudienceMismatch {
                audience: audience.to_owned(),
            });
        }

        // J-8, with leeway; nbf and iat likewise.
        let expiry = numeric_date(&claims, "exp")?.ok_or(JwtSvidError::MissingExpiry)?;
        if expiry
            .checked_add(CLOCK_LEEWAY)
            .is_some_and(|late| now > late)
        {
            return Err(JwtSvidError::Expired);
        }
        let now_with_leeway = now.checked_add(CLOCK_LEEWAY);
        let in_future = |t: SystemTime| now_with_leeway.is_some_and(|n| t > n);
        if numeric_date(&claims, "nbf")?.is_some_and(in_future) {
            return Err(JwtSvidError::NotYetValid);
        }
        if numeric_date(&claims, "iat")?.is_some_and(in_future) {
            return Err(JwtSvidError::IssuedInTheFuture);
        }

        // Keep `aud` as a list, as SPIRE returns it from ValidateJWTSVID.
        claims.insert("aud".to_owned(), audiences.clone().into());
        Ok(Self {
            spiffe_id,
            audience: audiences,
            expiry,
            claims,
            token: token.to_owned(),
        })
    }

    /// The workload's SPIFFE ID, from `sub`.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The audiences, from `aud` (a string `aud` gives one entry).
    pub fn audience(&self) -> &[String] {
        &self.audience
    }

    /// When the token expires, from `exp`.
    pub fn expiry(&self) -> SystemTime {
        self.expiry
    }

    /// Every claim, as in the token except that `aud` is always an array. This is what the
    /// Workload API's `ValidateJWTSVID` returns as its `claims` Struct.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// The compact JWS, a bearer credential: send it only over confidential channels (J-11,
    /// J-12).
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("audience", &self.audience)
            .field("expiry", &self.expiry)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

// === impl Algorithm ===

impl Algorithm {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "ES512" => Self::Es512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Es512 => "ES512",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
            Self::Ps512 => "PS512",
        }
    }
}

// === strict JSON ===

/// Parses JSON into a [`Value`], rejecting an object that repeats a member name at any depth.
///
/// `serde_json`'s own `Value` silently keeps the last of two equal names; for tokens and bundles
/// that would let two parsers see different keys or claims. Names are compared after unescaping,
/// so `"a"` and `"\u0061"` are the same name.
pub(crate) fn parse_json_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let StrictValue(value) = serde_json::from_slice(bytes)?;
    Ok(value)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a json value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<StrictValue, E> {
        Number::from_f64(v)
            .map(|n| StrictValue(Value::Number(n)))
            .ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_none<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<StrictValue, D::Error> {
        StrictValue::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut values = Vec::new();
        while let Some(StrictValue(value)) = seq.next_element()? {
            values.push(value);
        }
        Ok(StrictValue(Value::Array(values)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut object = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if object.contains_key(&name) {
                return Err(de::Error::custom(format_args!(
                    "duplicate member name {name:?}"
                )));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(name, value);
        }
        Ok(StrictValue(Value::Object(object)))
    }
}

// === helpers ===

/// Decodes one base64url part of a token into a JSON object.
fn decode_object(part_b64: &str, part: &'static str) -> Result<Map<String, Value>, JwtSvidError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part_b64)
        .map_err(|_| JwtSvidError::InvalidBase64 { part })?;
    match parse_json_strict(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(JwtSvidError::InvalidJson {
            part,
            reason: "not an object".to_owned(),
        }),
        Err(e) => Err(JwtSvidError::InvalidJson {
            part,
            reason: e.to_string(),
        }),
    }
}

/// Reads an optional NumericDate claim (RFC 7519 §2: seconds since the epoch, possibly
/// fractional).
fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<SystemTime>, JwtSvidError> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let invalid = JwtSvidError::InvalidClaim { name };
    let since_epoch = match value.as_u64() {
        Some(seconds) => Duration::from_secs(seconds),
        None => value
            .as_f64()
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
            .ok_or(invalid.clone())?,
    };
    UNIX_EPOCH.checked_add(since_epoch).map(Some).ok_or(invalid)
}

/// A time as whole seconds since the Unix epoch.
fn unix_seconds(time: SystemTime) -> Result<u64, JwtSvidError> {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| JwtSvidError::Signing {
            reason: "time is before 1970",
        })
}

/// Decodes a required base64url JWK member.
fn jwk_param(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, JwtSvidError> {
    let Some(Value::String(encoded)) = jwk.get(name) else {
        return Err(JwtSvidError::InvalidJwk {
            reason: format!("{name} is missing or not a string"),
        });
    };
    URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| JwtSvidError::InvalidJwk {
            reason: format!("{name} is not unpadded base64url"),
        })
}

fn verify_ec(
    alg: &'static signature::EcdsaVerificationAlgorithm,
    x: &[u8],
    y: &[u8],
    message: &[u8],
    sig: &[u8],
) -> bool {
    let mut point = Vec::with_capacity(1 + x.len() + y.len());
    point.push(0x04);
    point.extend_from_slice(x);
    point.extend_from_slice(y);
    signature::UnparsedPublicKey::new(alg, point)
        .verify(message, sig)
        .is_ok()
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// A JSON value as text for an error message; `null` when absent.
fn json_text(value: Option<&Value>) -> String {
    value.map_or_else(|| "null".to_owned(), Value::to_string)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use JwtSvidError as E;
    use base64::engine::general_purpose::STANDARD;
    use serde_json::json;

    /// A fixed "now": 2023-11-14T22:13:20Z.
    const NOW: u64 = 1_700_000_000;
    const SUB: &str = "spiffe://example.org/web";
    const AUD: &str = "spiffe://example.org/db";

    /// A 2048-bit RSA key for the RS*/PS* cases (ring cannot generate RSA keys). Made with
    /// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 | openssl pkcs8 -topk8
    /// -nocrypt -outform DER | base64 -w0`; test use only.
    pub(crate) const RSA_2048_PKCS8_B64: &str = concat!(
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDLJPLUUi0OV/I2RBwH47UKUVfdixT0Tjjd2mbzuKTh",
        "jkMAzkWxNVFHTuBcGUAYpgIdhjDapOn8c/pdyYtXa4w/21m0AtZ4BOKxqDNu+R3GocpOAHPDiRazm1MvIxtqRl5qUdYO",
        "4GPydF2Odp8jqm1YmxZu0CfWBCy8jfY9PcLkRYtUsW6PU5/fUZhqCum50jqUbgzvJDcs3Ud6ZbeyIq0+ccb1DmWVMHek",
        "GT4+Z/01NBbUAUb9qNHoc20xJarHYwuK6Q18FZXSBxXzpG9dtcAkEpmyMujnAZDp1nkm+d42vFXx3qaabBQh3cV6rzwX",
        "kOpqeqKd0JA4NHeY91hlfncjAgMBAAECggEAN8teJpKrbVUaYW0zhbc08jCFQYQBrVgOpmBmBmqgXpMENCRzX8iVGlC/",
        "rowA3sQ5sII6yNKisYPpL/k7HDedvawxZw+geDZfTQw1lDU3yGaHegUFxp7QbWQr5LZvwTCyneD8OfnHecAcMhTCgLk+",
        "byepcaYaSt26q88R4qAj9y3lYaotLrx9oT9Bx9Ax/z9Kia7LpCRXd1h1fLKgpIu3CvOcCg7wbr450CLb0GX+VBjyBFaW",
        "azxuRAN5xZYi8eN8HDAnO1E0e/DsO/Vzb14OXRhW8N7Gl3pn7Z6F3OJUTfw1vVfqL3nQeeYXKlWguQUapjZOizRDTUIj",
        "ZRf4kgFmAQKBgQDkzwC5GcIBlw/YWgjMPwqQRMuIeZpE5Kmrsg7LF+gLUTjtwrSPEr6EU6wbwlDWme40r1cwNzE1sm65",
        "n701zA9TjOBe8T7nj3xVEkTA9S3PE4SWYf7aKQUD3F0T20s9wRIh/zphxgOHc2AzeWzKz4QtvffxANsh+jo79WihNS1C",
        "UwKBgQDjSSqx604WAjbI1i5ZVauJalqIvayY6f6iFK7MakRAqmWT003bF/fb5jSH7Z1tO5igaxWR21yfnjbLj1yAs1P5",
        "iHDahmUiIFTvHlWtbfidKmaWo2hKC5GbusegEf57XRTfncv76CYan5sjLefyGNzl7ZPrnki8uiU7TvkEam398QKBgQCm",
        "qQDl0pU1g0rPVAVEgEa5fuKhrbForQXJQhD0bZ1fYPIOfNv3urd6u1eJgKhRKB4R0gW34Pu/GRD9tBSlstUXDm3/uckP",
        "8bumW4Ao7G1Jf/X7c7WmQmqcvU4uwHS1roP+r2FfBlRbvPY9iBxuPWkRyGVo7i6vOQxh0Ac+JPWqcQKBgHDI2PfrBRek",
        "x5zHs74+5d1NullKjgBfdSzmyIrFXNMd+0PswiCrdyJWzNB61/jhbu6D1PNJAGBwuU4v+L4gvtX/n8jAkiTqGFuEGQ3z",
        "mUAcT0YHFnRP41R8zhyfcUG0QexpOFTrsSTa+LfvSr73GX67cwCjzgJg+KLCoI1RZv1xAoGAJuHOJpLKYfHNgShFBYgH",
        "jRpJaJHZPnnfU/foN3o5RBEfCRzYAz3w+pP/xsM8LYUfckPI9UOgf3qdf3b1Mad3CdU8b7M6dUWGfiWY5OkcFJG1CyRn",
        "yKFYz+a4ohisOPeAnX6vLZVTzyWZFghLml8u+M0VHtNOE7OjVccJOmxB9+I=",
    );
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    /// A signing key and the example.org bundle that holds its public key.
    struct Fixture {
        key: JwtSigningKey,
        bundle: JwtBundle,
    }

    fn fixture() -> Fixture {
        let key = JwtSigningKey::generate().unwrap();
        let mut bundle = JwtBundle::new(td("example.org"));
        bundle
            .insert_key(key.kid(), key.public_key().clone())
            .unwrap();
        Fixture { key, bundle }
    }

    fn header(kid: &str) -> Map<String, Value> {
        obj(json!({"alg": "ES256", "kid": kid, "typ": "JWT"}))
    }

    fn claims() -> Map<String, Value> {
        obj(json!({"sub": SUB, "aud": [AUD], "exp": NOW + 300, "iat": NOW}))
    }

    fn obj(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    /// Builds a compact JWS from any header and claims, signed by `sign`.
    fn forge(
        header: &Map<String, Value>,
        claims: &Map<String, Value>,
        sign: impl Fn(&[u8]) -> Vec<u8>,
    ) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(Value::Object(header.clone()).to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(claims.clone()).to_string())
        );
        let signature = sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn es256(key: &JwtSigningKey) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
        |message| key.sign_raw(message).unwrap()
    }

    fn validate(token: &str, bundles: &impl JwtBundleSource) -> Result<JwtSvid, JwtSvidError> {
        JwtSvid::parse_and_validate(token, bundles, AUD, now())
    }

    fn rsa_key_pair() -> (signature::RsaKeyPair, JwtPublicKey) {
        let der = STANDARD.decode(RSA_2048_PKCS8_B64).unwrap();
        let key_pair = signature::RsaKeyPair::from_pkcs8(&der).unwrap();
        let components = signature::RsaPublicKeyComponents::<Vec<u8>>::from(key_pair.public());
        let public = JwtPublicKey::rsa(&components.n, &components.e).unwrap();
        (key_pair, public)
    }

    fn rsa_sign(
        key_pair: &signature::RsaKeyPair,
        padding: &'static dyn signature::RsaEncoding,
        message: &[u8],
    ) -> Vec<u8> {
        let mut sig = vec![0; key_pair.public().modulus_len()];
        key_pair
            .sign(padding, &SystemRandom::new(), message, &mut sig)
            .unwrap();
        sig
    }

    type Edit = fn(&mut Map<String, Value>, &mut Map<String, Value>);

    /// Tokens that are correctly signed by the bundle's key but break one rule.
    fn rejections() -> Vec<(&'static str, Edit, JwtSvidError)> {
        let disallowed = |alg: &str| E::DisallowedAlgorithm {
            alg: alg.to_owned(),
        };
        vec![
            (
                "J-2 alg none",
                |h, _| {
                    h.insert("alg".into(), "none".into());
                },
                disallowed("none"),
            ),
            (
                "J-2 HS256",
                |h, _| {
                    h.insert("alg".into(), "HS256".into());
                },
                disallowed("HS256"),
            ),
            (
                "J-2 HS512",
                |h, _| {
                    h.insert("alg".into(), "HS512".into());
                },
                disallowed("HS512"),
            ),
            (
                "J-2 EdDSA",
                |h, _| {
                    h.insert("alg".into(), "EdDSA".into());
                },
                disallowed("EdDSA"),
            ),
            (
                "J-2 alg is case-sensitive",
                |h, _| {
                    h.insert("alg".into(), "es256".into());
                },
                disallowed("es256"),
            ),
            (
                "J-2 alg not a string",
                |h, _| {
                    h.insert("alg".into(), json!(256));
                },
                disallowed("256"),
            ),
            (
                "J-2 alg missing",
                |h, _| {
                    h.remove("alg");
                },
                E::MissingAlgorithm,
            ),
            (
                "J-2 alg checked before everything else",
                |h, c| {
                    h.insert("alg".into(), "none".into());
                    h.insert("typ".into(), "at+jwt".into());
                    h.insert("jku".into(), "https://evil".into());
                    h.remove("kid");
                    c.clear();
                },
                disallowed("none"),
            ),
            (
                "J-4 typ at+jwt",
                |h, _| {
                    h.insert("typ".into(), "at+jwt".into());
                },
                E::InvalidType {
                    typ: "\"at+jwt\"".into(),
                },
            ),
            (
                "J-4 typ is case-sensitive",
                |h, _| {
                    h.insert("typ".into(), "jwt".into());
                },
                E::InvalidType {
                    typ: "\"jwt\"".into(),
                },
            ),
            (
                "J-4 typ not a string",
                |h, _| {
                    h.insert("typ".into(), json!(null));
                },
                E::InvalidType { typ: "null".into() },
            ),
            (
                "J-5 extra header parameter jku",
                |h, _| {
                    h.insert("jku".into(), "https://example.org/keys".into());
                },
                E::UnexpectedHeaderParameter { name: "jku".into() },
            ),
            (
                "J-5 crit",
                |h, _| {
                    h.insert("crit".into(), json!(["exp"]));
                },
                E::UnexpectedHeaderParameter {
                    name: "crit".into(),
                },
            ),
            (
                "J-5 private header parameter",
                |h, _| {
                    h.insert("x-sigil".into(), json!(1));
                },
                E::UnexpectedHeaderParameter {
                    name: "x-sigil".into(),
                },
            ),
            (
                "J-3 kid missing (section 9.2)",
                |h, _| {
                    h.remove("kid");
                },
                E::MissingKeyId,
            ),
            (
                "J-3 kid empty (section 9.2)",
                |h, _| {
                    h.insert("kid".into(), "".into());
                },
                E::MissingKeyId,
            ),
            (
                "J-6 sub missing",
                |_, c| {
                    c.remove("sub");
                },
                E::MissingSubject,
            ),
            (
                "J-6 sub not a spiffe id",
                |_, c| {
                    c.insert("sub".into(), "https://example.org/web".into());
                },
                E::InvalidSubject {
                    source: SpiffeIdError::WrongScheme,
                },
            ),
            (
                "J-6 sub with trailing slash",
                |_, c| {
                    c.insert("sub".into(), "spiffe://example.org/web/".into());
                },
                E::InvalidSubject {
                    source: SpiffeIdError::TrailingSlash,
                },
            ),
            (
                "J-6 sub not a string",
                |_, c| {
                    c.insert("sub".into(), json!(7));
                },
                E::InvalidClaim { name: "sub" },
            ),
            (
                "J-7 aud missing",
                |_, c| {
                    c.remove("aud");
                },
                E::MissingAudience,
            ),
            (
                "J-7 aud empty array",
                |_, c| {
                    c.insert("aud".into(), json!([]));
                },
                E::MissingAudience,
            ),
            (
                "J-7 aud without our audience",
                |_, c| {
                    c.insert("aud".into(), json!(["spiffe://example.org/other"]));
                },
                E::AudienceMismatch {
                    audience: AUD.into(),
                },
            ),
            (
                "J-7 aud string without our audience",
                |_, c| {
                    c.insert("aud".into(), "spiffe://example.org/other".into());
                },
                E::AudienceMismatch {
                    audience: AUD.into(),
                },
            ),
            (
                "J-7 aud holding a number",
                |_, c| {
                    c.insert("aud".into(), json!([AUD, 1]));
                },
                E::InvalidClaim { name: "aud" },
            ),
            (
                "J-8 exp missing",
                |_, c| {
                    c.remove("exp");
                },
                E::MissingExpiry,
            ),
            (
                "J-8 exp past beyond leeway",
                |_, c| {
                    c.insert("exp".into(), json!(NOW - 61));
                },
                E::Expired,
            ),
            (
                "J-8 exp long past",
                |_, c| {
                    c.insert("exp".into(), json!(1));
                },
                E::Expired,
            ),
            (
                "J-8 exp as a string",
                |_, c| {
                    c.insert("exp".into(), json!("1700000300"));
                },
                E::InvalidClaim { name: "exp" },
            ),
            (
                "J-8 exp negative",
                |_, c| {
                    c.insert("exp".into(), json!(-5));
                },
                E::InvalidClaim { name: "exp" },
            ),
            (
                "J-8 nbf in the future beyond leeway",
                |_, c| {
                    c.insert("nbf".into(), json!(NOW + 61));
                },
                E::NotYetValid,
            ),
            (
                "J-8 iat in the future beyond leeway",
                |_, c| {
                    c.insert("iat".into(), json!(NOW + 61));
                },
                E::IssuedInTheFuture,
            ),
        ]
    }

    /// Tokens that are correctly signed and must be accepted.
    const ACCEPT: &[(&str, Edit)] = &[
        ("J-1 J-10 plain es256 token", |_, _| {}),
        ("J-4 typ JOSE", |h, _| {
            h.insert("typ".into(), "JOSE".into());
        }),
        ("J-4 typ absent", |h, _| {
            h.remove("typ");
        }),
        ("J-7 aud as a string (section 9.8)", |_, c| {
            c.insert("aud".into(), AUD.into());
        }),
        ("J-7 multi-aud", |_, c| {
            c.insert("aud".into(), json!(["spiffe://example.org/a", AUD, "b"]));
        }),
        ("J-8 exp within leeway", |_, c| {
            c.insert("exp".into(), json!(NOW - 60));
        }),
        ("J-8 fractional exp", |_, c| {
            c.insert("exp".into(), json!(NOW as f64 + 0.5));
        }),
        ("J-8 nbf and iat within leeway", |_, c| {
            c.insert("nbf".into(), json!(NOW + 60));
            c.insert("iat".into(), json!(NOW + 60));
        }),
        ("J-9 other claims", |_, c| {
            c.insert("iss".into(), "https://oidc.example.org".into());
            c.insert("jti".into(), "abc".into());
            c.insert("custom".into(), json!({"nested": [1, 2]}));
        }),
        ("J-6 root id subject", |_, c| {
            c.insert("sub".into(), "spiffe://example.org".into());
        }),
    ];

    #[test]
    fn spec_rejections() {
        let f = fixture();
        for (item, edit, want) in rejections() {
            let (mut h, mut c) = (header(f.key.kid()), claims());
            edit(&mut h, &mut c);
            let token = forge(&h, &c, es256(&f.key));
            assert_eq!(validate(&token, &f.bundle), Err(want), "{item}");
        }
    }

    #[test]
    fn spec_acceptances() {
        let f = fixture();
        for (item, edit) in ACCEPT {
            let (mut h, mut c) = (header(f.key.kid()), claims());
            edit(&mut h, &mut c);
            let token = forge(&h, &c, es256(&f.key));
            let svid = validate(&token, &f.bundle).unwrap_or_else(|e| panic!("{item}: {e}"));
            assert!(svid.audience().iter().any(|a| a == AUD), "{item}");
            assert_eq!(svid.claims()["aud"], json!(svid.audience()), "{item}");
            assert_eq!(svid.token(), token, "{item}");
        }
    }

    #[test]
    fn j1_compact_serialization_only() {
        let f = fixture();
        let good = f
            .key
            .sign(&JwtSvidParams {
                subject: SpiffeId::new(SUB).unwrap(),
                audience: vec![AUD.into()],
                issued_at: now(),
                expires_at: now() + Duration::from_secs(300),
                issuer: None,
            })
            .unwrap();
        let parts = good.token().split('.').collect::<Vec<_>>();
        let json_serialization = json!({
            "payload": parts[1],
            "signatures": [{"protected": parts[0], "signature": parts[2]}],
        })
        .to_string();
        let flattened = json!({
            "payload": parts[1], "protected": parts[0], "signature": parts[2],
            "header": {"kid": f.key.kid()},
        })
        .to_string();
        let jwe = format!("{}.a.b.c.d", parts[0]);
        let cases: &[(&str, &str, JwtSvidError)] = &[
            (
                "J-1 json serialization",
                &json_serialization,
                E::JsonSerialization,
            ),
            (
                "J-1 flattened json with unprotected header",
                &flattened,
                E::JsonSerialization,
            ),
            ("J-1 five-part jwe", &jwe, E::Encrypted),
            ("J-1 two parts", "a.b", E::Malformed { parts: 2 }),
            ("J-1 four parts", "a.b.c.d", E::Malformed { parts: 4 }),
            ("J-1 empty", "", E::Malformed { parts: 1 }),
            (
                "J-1 bearer prefix",
                &format!("Bearer {}", good.token()),
                E::InvalidBase64 { part: "header" },
            ),
            (
                "J-1 padded base64",
                &format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
                E::InvalidBase64 { part: "header" },
            ),
            (
                "J-1 standard base64 signature",
                &format!("{}.{}.{}+/", parts[0], parts[1], parts[2]),
                E::InvalidBase64 { part: "signature" },
            ),
        ];
        for (item, token, want) in cases {
            assert_eq!(validate(token, &f.bundle).as_ref(), Err(want), "{item}");
        }
        assert!(validate(good.token(), &f.bundle).is_ok());
    }

    #[test]
    fn oversize_token_rejected_before_decoding() {
        let f = fixture();
        let mut c = claims();
        c.insert("pad".into(), "x".repeat(MAX_TOKEN_LEN).into());
        let token = forge(&header(f.key.kid()), &c, es256(&f.key));
        assert_eq!(
            validate(&token, &f.bundle),
            Err(E::TokenTooLarge {
                len: token.len(),
                max: MAX_TOKEN_LEN
            })
        );
        // Garbage of the same size fails the same way, without being parsed.
        let junk = "{".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            validate(&junk, &f.bundle),
            Err(E::TokenTooLarge { .. })
        ));
    }

    #[test]
    fn header_and_claims_must_be_unambiguous_json_objects() {
        let f = fixture();
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let kid = f.key.kid();
        let claims_b64 = b64(&Value::Object(claims()).to_string());
        let dup_alg = format!(r#"{{"alg":"ES256","alg":"none","kid":"{kid}"}}"#);
        let escaped_dup = format!(r#"{{"alg":"ES256","\u0061lg":"ES256","kid":"{kid}"}}"#);
        let cases: &[(&str, String)] = &[
            ("duplicate alg", dup_alg),
            ("duplicate alg, escaped", escaped_dup),
            ("array header", "[]".into()),
            ("not json", "alg=ES256".into()),
        ];
        for (item, header_json) in cases {
            let input = format!("{}.{claims_b64}", b64(header_json));
            let token = format!("{input}.{}", b64("sig"));
            assert!(
                matches!(
                    validate(&token, &f.bundle),
                    Err(E::InvalidJson { part: "header", .. })
                ),
                "{item}"
            );
        }
        let dup_sub = format!(r#"{{"sub":"{SUB}","sub":"spiffe://evil.org/x"}}"#);
        let token = format!(
            "{}.{}.{}",
            b64(&Value::Object(header(kid)).to_string()),
            b64(&dup_sub),
            b64("sig")
        );
        assert!(matches!(
            validate(&token, &f.bundle),
            Err(E::InvalidJson { part: "claims", .. })
        ));
    }

    #[test]
    fn j10_tampered_signature_rejected() {
        let f = fixture();
        let token = forge(&header(f.key.kid()), &claims(), es256(&f.key));
        let (input, sig) = token.rsplit_once('.').unwrap();

        // Flip one bit of the signature.
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        raw[10] ^= 1;
        let flipped = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&raw));
        assert_eq!(validate(&flipped, &f.bundle), Err(E::InvalidSignature));

        // Swap in other claims under the same signature.
        let mut c = claims();
        c.insert("sub".into(), "spiffe://example.org/admin".into());
        let (h, _) = input.split_once('.').unwrap();
        let swapped = format!(
            "{h}.{}.{sig}",
            URL_SAFE_NO_PAD.encode(Value::Object(c).to_string())
        );
        assert_eq!(validate(&swapped, &f.bundle), Err(E::InvalidSignature));

        // Truncated and empty signatures.
        assert_eq!(
            validate(&format!("{input}.{}", &sig[..20]), &f.bundle),
            Err(E::InvalidSignature)
        );
        assert_eq!(
            validate(&format!("{input}."), &f.bundle),
            Err(E::InvalidSignature)
        );
    }

    #[test]
    fn j10_wrong_kid_rejected() {
        let f = fixture();
        let token = forge(&header("not-a-kid"), &claims(), es256(&f.key));
        assert_eq!(
            validate(&token, &f.bundle),
            Err(E::UnknownKeyId {
                kid: "not-a-kid".into(),
                trust_domain: td("example.org"),
            })
        );
        // A key from the bundle, named by the kid of another key, does not verify.
        let other = JwtSigningKey::generate().unwrap();
        let mut bundle = f.bundle.clone();
        bundle
            .insert_key(other.kid(), other.public_key().clone())
            .unwrap();
        let token = forge(&header(other.kid()), &claims(), es256(&f.key));
        assert_eq!(validate(&token, &bundle), Err(E::InvalidSignature));
    }

    #[test]
    fn j10_b2_empty_bundle_trusts_nothing() {
        let f = fixture();
        let token = forge(&header(f.key.kid()), &claims(), es256(&f.key));
        let empty = JwtBundle::new(td("example.org"));
        assert!(empty.is_empty());
        assert!(matches!(
            validate(&token, &empty),
            Err(E::UnknownKeyId { .. })
        ));
    }

    #[test]
    fn j10_no_bundle_for_the_trust_domain_is_untrusted() {
        let f = fixture();
        let mut c = claims();
        c.insert("sub".into(), "spiffe://other.org/web".into());
        let token = forge(&header(f.key.kid()), &c, es256(&f.key));
        let want = Err(E::UntrustedTrustDomain {
            trust_domain: td("other.org"),
        });
        // A bundle answers only for its own trust domain (B-9)...
        assert_eq!(validate(&token, &f.bundle), want);
        // ...and so does a set without other.org.
        let set = JwtBundleSet::from_iter([f.bundle.clone()]);
        assert_eq!(validate(&token, &set), want);
        assert_eq!(validate(&token, &JwtBundleSet::new()), want);
    }

    #[test]
    fn j10_key_from_another_trust_domain_is_not_used() {
        // Trust domain a signs a token claiming a subject in trust domain b. Both bundles are
        // trusted; only b's keys may verify b's subjects (B-9, B-10).
        let a = fixture();
        let b = JwtSigningKey::generate().unwrap();
        let mut b_bundle = JwtBundle::new(td("b.org"));
        b_bundle
            .insert_key(b.kid(), b.public_key().clone())
            .unwrap();
        let set = JwtBundleSet::from_iter([a.bundle.clone(), b_bundle.clone()]);

        let mut c = claims();
        c.insert("sub".into(), "spiffe://b.org/web".into());
        let token = forge(&header(a.key.kid()), &c, es256(&a.key));
        assert_eq!(
            validate(&token, &set),
            Err(E::UnknownKeyId {
                kid: a.key.kid().into(),
                trust_domain: td("b.org"),
            })
        );

        // Even when b's bundle has a key under the same kid, a's signature does not verify.
        let mut b_same_kid = JwtBundle::new(td("b.org"));
        b_same_kid
            .insert_key(a.key.kid(), b.public_key().clone())
            .unwrap();
        let set = JwtBundleSet::from_iter([a.bundle.clone(), b_same_kid]);
        assert_eq!(validate(&token, &set), Err(E::InvalidSignature));

        // And a's own subjects still validate with a's key from the same set.
        let token = forge(&header(a.key.kid()), &claims(), es256(&a.key));
        assert!(validate(&token, &set).is_ok());
    }

    #[test]
    fn j2_algorithms_verified_with_ring() {
        let (rsa, rsa_public) = rsa_key_pair();
        let p384 = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            EcdsaKeyPair::generate_pkcs8(
                &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .unwrap()
            .as_ref(),
            &SystemRandom::new(),
        )
        .unwrap();
        let p384_public =
            JwtPublicKey::ec_uncompressed(EcCurve::P384, p384.public_key().as_ref()).unwrap();
        let es = fixture();

        let mut bundle = es.bundle.clone();
        bundle.insert_key("rsa", rsa_public).unwrap();
        bundle.insert_key("p384", p384_public).unwrap();

        let with = |alg: &str, kid: &str| {
            let mut h = header(kid);
            h.insert("alg".into(), alg.into());
            h
        };
        let rsa_signer = |padding: &'static dyn signature::RsaEncoding| {
            let rsa = &rsa;
            move |m: &[u8]| rsa_sign(rsa, padding, m)
        };
        let p384_signer = |m: &[u8]| {
            p384.sign(&SystemRandom::new(), m)
                .unwrap()
                .as_ref()
                .to_vec()
        };

        let accepted = [
            (
                "J-2 RS256",
                forge(
                    &with("RS256", "rsa"),
                    &claims(),
                    rsa_signer(&signature::RSA_PKCS1_SHA256),
                ),
            ),
            (
                "J-2 RS384",
                forge(
                    &with("RS384", "rsa"),
                    &claims(),
                    rsa_signer(&signature::RSA_PKCS1_SHA384),
                ),
            ),
            (
                "J-2 RS512",
                forge(
                    &with("RS512", "rsa"),
                    &claims(),
                    rsa_signer(&signature::RSA_PKCS1_SHA512),
                ),
            ),
            (
                "J-2 PS256",
                forge(
                    &with("PS256", "rsa"),
                    &claims(),
                    rsa_signer(&signature::RSA_PSS_SHA256),
                ),
            ),
            (
                "J-2 PS384",
                forge(
                    &with("PS384", "rsa"),
                    &claims(),
                    rsa_signer(&signature::RSA_PSS_SHA384),
                ),
            ),
            (
                "J-2 PS512",
                forge(
                    &with("PS512", "rsa"),
                    &claims(),
                    rsa_signer(&signature::RSA_PSS_SHA512),
                ),
            ),
            (
                "J-2 ES384",
                forge(&with("ES384", "p384"), &claims(), p384_signer),
            ),
            (
                "J-2 ES256",
                forge(&header(es.key.kid()), &claims(), es256(&es.key)),
            ),
        ];
        for (item, token) in &accepted {
            validate(token, &bundle).unwrap_or_else(|e| panic!("{item}: {e}"));
        }

        let rejected = [
            (
                "J-2 RS256 signature labelled PS256",
                forge(
                    &with("PS256", "rsa"),
                    &claims(),
                    rsa_signer(&signature::RSA_PKCS1_SHA256),
                ),
                E::InvalidSignature,
            ),
            (
                "J-2 ES512 allowed but unsupported",
                forge(&with("ES512", es.key.kid()), &claims(), es256(&es.key)),
                E::UnsupportedAlgorithm { alg: "ES512" },
            ),
            (
                "J-2 RS256 with an EC key",
                forge(&with("RS256", es.key.kid()), &claims(), es256(&es.key)),
                E::KeyAlgorithmMismatch {
                    alg: "RS256",
                    kid: es.key.kid().into(),
                },
            ),
            (
                "J-2 ES256 with an RSA key",
                forge(&with("ES256", "rsa"), &claims(), es256(&es.key)),
                E::KeyAlgorithmMismatch {
                    alg: "ES256",
                    kid: "rsa".into(),
                },
            ),
            (
                "J-2 ES384 with a P-256 key",
                forge(&with("ES384", es.key.kid()), &claims(), es256(&es.key)),
                E::KeyAlgorithmMismatch {
                    alg: "ES384",
                    kid: es.key.kid().into(),
                },
            ),
            (
                "J-2 ES256 with a P-384 key",
                forge(&with("ES256", "p384"), &claims(), p384_signer),
                E::KeyAlgorithmMismatch {
                    alg: "ES256",
                    kid: "p384".into(),
                },
            ),
        ];
        for (item, token, want) in rejected {
            assert_eq!(validate(&token, &bundle), Err(want), "{item}");
        }
    }

    #[test]
    fn sign_emits_what_spire_emits() {
        let f = fixture();
        let svid = f
            .key
            .sign(&JwtSvidParams {
                subject: SpiffeId::new(SUB).unwrap(),
                audience: vec![AUD.into()],
                issued_at: now() + Duration::from_millis(700),
                expires_at: now() + Duration::from_secs(300),
                issuer: Some("https://oidc.example.org".into()),
            })
            .unwrap();
        let token = svid.token();
        assert!(!token.contains('='), "base64url without padding");
        let parts = token.split('.').collect::<Vec<_>>();
        assert_eq!(parts.len(), 3);
        let decode = |p: &str| -> Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
        };
        // Section 9.2: kid always emitted; typ JWT.
        assert_eq!(
            decode(parts[0]),
            json!({"alg": "ES256", "kid": f.key.kid(), "typ": "JWT"})
        );
        // Section 9.8: aud is an array even with one audience.
        assert_eq!(
            decode(parts[1]),
            json!({"sub": SUB, "aud": [AUD], "exp": NOW + 300, "iat": NOW,
                   "iss": "https://oidc.example.org"})
        );
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 64);

        let parsed = validate(token, &f.bundle).unwrap();
        assert_eq!(parsed.spiffe_id().as_str(), SUB);
        assert_eq!(parsed.audience(), [AUD]);
        assert_eq!(parsed.expiry(), now() + Duration::from_secs(300));
        assert_eq!(parsed.claims(), svid.claims());
        assert_eq!(parsed, svid);

        // Multiple audiences (WA-13: every aud value goes into the token).
        let multi = f
            .key
            .sign(&JwtSvidParams {
                subject: SpiffeId::new(SUB).unwrap(),
                audience: vec!["a".into(), AUD.into()],
                issued_at: now(),
                expires_at: now() + Duration::from_secs(60),
                issuer: None,
            })
            .unwrap();
        let parsed = validate(multi.token(), &f.bundle).unwrap();
        assert_eq!(parsed.audience(), ["a", AUD]);
        assert!(!parsed.claims().contains_key("iss"));
    }

    #[test]
    fn sign_refuses_bad_params() {
        let f = fixture();
        let base = JwtSvidParams {
            subject: SpiffeId::new(SUB).unwrap(),
            audience: vec![AUD.into()],
            issued_at: now(),
            expires_at: now() + Duration::from_secs(60),
            issuer: None,
        };
        let cases: Vec<(&str, JwtSvidParams, JwtSvidError)> = vec![
            (
                "J-7 no audience",
                JwtSvidParams {
                    audience: vec![],
                    ..base.clone()
                },
                E::EmptyAudience,
            ),
            (
                "J-7 empty audience",
                JwtSvidParams {
                    audience: vec![AUD.into(), String::new()],
                    ..base.clone()
                },
                E::EmptyAudience,
            ),
            (
                "J-8 exp not after iat",
                JwtSvidParams {
                    expires_at: now(),
                    ..base.clone()
                },
                E::Signing {
                    reason: "exp must be after iat",
                },
            ),
            (
                "time before 1970",
                JwtSvidParams {
                    issued_at: UNIX_EPOCH - Duration::from_secs(1),
                    ..base.clone()
                },
                E::Signing {
                    reason: "time is before 1970",
                },
            ),
        ];
        for (item, params, want) in cases {
            assert_eq!(f.key.sign(&params), Err(want), "{item}");
        }
        // The validator refuses an empty audience argument outright.
        let token = f.key.sign(&base).unwrap();
        assert_eq!(
            JwtSvid::parse_and_validate(token.token(), &f.bundle, "", now()),
            Err(E::EmptyAudience)
        );
    }

    #[test]
    fn signing_key_from_pkcs8_and_debug_hides_secrets() {
        let pkcs8 = JwtSigningKey::generate_pkcs8().unwrap();
        let a = JwtSigningKey::from_pkcs8(pkcs8.secret_pkcs8_der()).unwrap();
        let b = JwtSigningKey::from_pkcs8(pkcs8.secret_pkcs8_der()).unwrap();
        // The default kid is the RFC 7638 thumbprint: stable across reloads.
        assert_eq!(a.kid(), b.kid());
        assert_eq!(a.kid(), a.public_key().thumbprint());
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.public_key().curve(), Some(EcCurve::P256));

        let renamed = b.with_kid("authority-1").unwrap();
        assert_eq!(renamed.kid(), "authority-1");
        assert!(matches!(
            JwtSigningKey::generate().unwrap().with_kid(""),
            Err(E::EmptyKeyId)
        ));

        // A P-256 key made by rcgen loads too.
        let rcgen_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(JwtSigningKey::from_pkcs8(&rcgen_key.serialize_der()).is_ok());
        // A P-384 key is not an ES256 key.
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            JwtSigningKey::from_pkcs8(&p384.serialize_der()),
            Err(E::InvalidSigningKey { .. })
        ));
        assert!(matches!(
            JwtSigningKey::from_pkcs8(b"junk"),
            Err(E::InvalidSigningKey { .. })
        ));

        let debug = format!("{a:?}");
        assert_eq!(
            debug,
            format!("JwtSigningKey {{ alg: \"ES256\", kid: {:?}, .. }}", a.kid())
        );
        let secret_b64 = STANDARD.encode(pkcs8.secret_pkcs8_der());
        assert!(!debug.contains(&secret_b64[40..60]));

        // The token is a bearer credential: Debug redacts it.
        let svid = a
            .sign(&JwtSvidParams {
                subject: SpiffeId::new(SUB).unwrap(),
                audience: vec![AUD.into()],
                issued_at: now(),
                expires_at: now() + Duration::from_secs(60),
                issuer: None,
            })
            .unwrap();
        let debug = format!("{svid:?}");
        assert!(debug.contains("<redacted>"), "{debug}");
        let signature = svid.token().rsplit('.').next().unwrap();
        assert!(!debug.contains(signature), "{debug}");
    }

    #[test]
    fn jwk_conversions() {
        // RFC 7638 §3.1 example key and thumbprint.
        let rfc = obj(json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29",
        }));
        let key = JwtPublicKey::from_jwk(&rfc).unwrap();
        assert_eq!(
            key.thumbprint(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        assert_eq!(key.key_type(), "RSA");
        assert_eq!(key.curve(), None);
        let mut expected = rfc.clone();
        expected.remove("alg");
        expected.remove("kid");
        assert_eq!(key.to_jwk(), expected, "only kty and key parameters");

        let ec = fixture().key.public_key().clone();
        let jwk = ec.to_jwk();
        assert_eq!(
            jwk.keys().map(String::as_str).collect::<Vec<_>>(),
            ["crv", "kty", "x", "y"]
        );
        assert_eq!(JwtPublicKey::from_jwk(&jwk).unwrap(), ec);

        // RSA parameters with a DER-style leading zero are normalised.
        let padded = JwtPublicKey::rsa(&[0, 0xc1, 0x01], &[0, 1, 0, 1]).unwrap();
        assert_eq!(
            padded,
            JwtPublicKey::rsa(&[0xc1, 0x01], &[1, 0, 1]).unwrap()
        );
        assert_eq!(padded.to_jwk()["e"], "AQAB");

        let x = jwk["x"].as_str().unwrap();
        type Check = fn(&JwtSvidError) -> bool;
        let bad: &[(&str, Value, Check)] = &[
            (
                "B-6 kty OKP",
                json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
                |e| matches!(e, E::UnsupportedKeyType { .. }),
            ),
            (
                "B-6 kty missing",
                json!({"crv": "P-256", "x": x, "y": x}),
                |e| matches!(e, E::UnsupportedKeyType { .. }),
            ),
            ("B-6 kty oct", json!({"kty": "oct", "k": "AAAA"}), |e| {
                matches!(e, E::UnsupportedKeyType { .. })
            }),
            (
                "crv secp256k1",
                json!({"kty": "EC", "crv": "secp256k1", "x": x, "y": x}),
                |e| matches!(e, E::UnsupportedCurve { .. }),
            ),
            ("crv missing", json!({"kty": "EC", "x": x, "y": x}), |e| {
                matches!(e, E::UnsupportedCurve { .. })
            }),
            (
                "y missing",
                json!({"kty": "EC", "crv": "P-256", "x": x}),
                |e| matches!(e, E::InvalidJwk { .. }),
            ),
            (
                "x too short",
                json!({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": x}),
                |e| matches!(e, E::InvalidJwk { .. }),
            ),
            (
                "P-384 with P-256 coordinates",
                json!({"kty": "EC", "crv": "P-384", "x": x, "y": x}),
                |e| matches!(e, E::InvalidJwk { .. }),
            ),
            (
                "padded base64url",
                json!({"kty": "RSA", "n": "AQAB=", "e": "AQAB"}),
                |e| matches!(e, E::InvalidJwk { .. }),
            ),
            (
                "standard base64",
                json!({"kty": "RSA", "n": "ab+/", "e": "AQAB"}),
                |e| matches!(e, E::InvalidJwk { .. }),
            ),
            (
                "e zero",
                json!({"kty": "RSA", "n": "AQAB", "e": "AA"}),
                |e| matches!(e, E::InvalidJwk { .. }),
            ),
        ];
        for (item, jwk, check) in bad {
            let err = JwtPublicKey::from_jwk(&obj(jwk.clone())).unwrap_err();
            assert!(check(&err), "{item}: {err}");
        }
        // P-521 keys are kept (and published), though ES512 cannot be verified.
        let p521 = JwtPublicKey::ec(EcCurve::P521, &[1; 66], &[2; 66]).unwrap();
        assert_eq!(JwtPublicKey::from_jwk(&p521.to_jwk()).unwrap(), p521);
    }

    #[test]
    fn jwks_is_plain_and_round_trips() {
        let f = fixture();
        let (_, rsa_public) = rsa_key_pair();
        let mut bundle = f.bundle.clone();
        bundle.insert_key("rsa-1", rsa_public).unwrap();

        let jwks: Value = serde_json::from_slice(&bundle.to_jwks()).unwrap();
        let set = jwks.as_object().unwrap();
        assert_eq!(
            set.keys().collect::<Vec<_>>(),
            ["keys"],
            "no spiffe_* members"
        );
        for jwk in jwks["keys"].as_array().unwrap() {
            let mut names = jwk.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
            names.sort();
            let want: &[&str] = if jwk["kty"] == "EC" {
                &["crv", "kid", "kty", "x", "y"]
            } else {
                &["e", "kid", "kty", "n"]
            };
            assert_eq!(names, want, "section 6.3: only kty, kid and key parameters");
        }

        let parsed = JwtBundle::from_jwks(td("example.org"), &bundle.to_jwks()).unwrap();
        assert_eq!(parsed, bundle);
        // A token validates with the parsed bundle.
        let token = forge(&header(f.key.kid()), &claims(), es256(&f.key));
        assert!(validate(&token, &parsed).is_ok());
    }

    #[test]
    fn jwks_parsing_rules() {
        let f = fixture();
        let mut ec = f.key.public_key().to_jwk();
        ec.insert("kid".into(), "k1".into());
        let ec = Value::Object(ec);
        let with = |extra: Value| {
            let mut jwk = ec.as_object().unwrap().clone();
            jwk.extend(obj(extra));
            Value::Object(jwk)
        };
        let parse =
            |jwks: Value| JwtBundle::from_jwks(td("example.org"), jwks.to_string().as_bytes());

        let kids =
            |jwks: Value| -> Vec<String> { parse(jwks).unwrap().keys().keys().cloned().collect() };
        let cases: &[(&str, Value, &[&str])] = &[
            (
                "B-1 keys empty is valid (B-2: no keys)",
                json!({"keys": []}),
                &[],
            ),
            ("plain jwks", json!({"keys": [ec]}), &["k1"]),
            (
                "B-5 unknown top-level members ignored",
                json!({"keys": [ec], "spiffe_sequence": 3, "x": {}}),
                &["k1"],
            ),
            (
                "BJ-2 use jwt-svid kept",
                json!({"keys": [with(json!({"use": "jwt-svid"}))]}),
                &["k1"],
            ),
            (
                "BJ-2 use x509-svid skipped",
                json!({"keys": [with(json!({"use": "x509-svid", "kid": "k2"})), ec]}),
                &["k1"],
            ),
            (
                "B-7 unknown use skipped",
                json!({"keys": [with(json!({"use": "sig", "kid": "k2"}))]}),
                &[],
            ),
            (
                "B-6 unknown kty skipped",
                json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA", "kid": "k2"}, ec]}),
                &["k1"],
            ),
            (
                "B-6 unsupported curve skipped",
                json!({"keys": [{"kty": "EC", "crv": "P-192", "x": "AA", "y": "AA", "kid": "k2"}]}),
                &[],
            ),
            (
                "BJ-1 key without kid skipped",
                json!({"keys": [{"kty": "EC", "crv": "P-256", "x": ec["x"], "y": ec["y"]}]}),
                &[],
            ),
            (
                "BJ-1 key with empty kid skipped",
                json!({"keys": [with(json!({"kid": ""}))]}),
                &[],
            ),
        ];
        for (item, jwks, want) in cases {
            assert_eq!(kids(jwks.clone()), *want, "{item}");
        }

        let errors: &[(&str, Vec<u8>)] = &[
            ("B-1 keys missing", br#"{"spiffe_sequence": 1}"#.to_vec()),
            ("B-1 keys not an array", br#"{"keys": {}}"#.to_vec()),
            ("not an object", br#"[]"#.to_vec()),
            ("not json", b"keys".to_vec()),
            ("key not an object", br#"{"keys": [1]}"#.to_vec()),
            (
                "kid not a string",
                json!({"keys": [with(json!({"kid": 1}))]})
                    .to_string()
                    .into_bytes(),
            ),
            (
                "malformed supported key",
                json!({"keys": [with(json!({"x": "AA"}))]})
                    .to_string()
                    .into_bytes(),
            ),
            (
                "duplicate member",
                format!(r#"{{"keys": [], "keys": [{ec}]}}"#).into_bytes(),
            ),
            (
                "oversize",
                [b" ".repeat(MAX_JWKS_LEN), b"{\"keys\":[]}".to_vec()].concat(),
            ),
        ];
        for (item, jwks) in errors {
            assert!(
                matches!(
                    JwtBundle::from_jwks(td("example.org"), jwks),
                    Err(E::InvalidJwks { .. })
                ),
                "{item}"
            );
        }
        assert_eq!(
            parse(json!({"keys": [ec, with(json!({"crv": "P-256"}))]})),
            Err(E::DuplicateKeyId { kid: "k1".into() })
        );
    }

    #[test]
    fn b9_b10_bundle_set_keeps_trust_domains_apart() {
        let k1 = JwtSigningKey::generate().unwrap();
        let k2 = JwtSigningKey::generate().unwrap();
        let bundle = |name: &str, key: &JwtSigningKey| {
            let mut b = JwtBundle::new(td(name));
            b.insert_key(key.kid(), key.public_key().clone()).unwrap();
            b
        };
        let mut set = JwtBundleSet::new();
        assert!(set.insert(bundle("a.org", &k1)).is_none());
        assert!(set.insert(bundle("b.org", &k2)).is_none());
        // A new bundle for a.org replaces the old one; nothing is merged (B-10).
        let old = set.insert(bundle("a.org", &k2)).unwrap();
        assert!(old.key(k1.kid()).is_some());
        let a = set.jwt_bundle_for(&td("a.org")).unwrap();
        assert_eq!(a.keys().len(), 1);
        assert!(a.key(k1.kid()).is_none());
        assert_eq!(set.len(), 2);
        assert!(set.jwt_bundle_for(&td("c.org")).is_none());
        assert_eq!(
            set.remove(&td("b.org")).unwrap().trust_domain(),
            &td("b.org")
        );
        assert_eq!(set.iter().count(), 1);

        // A bundle is only its own trust domain's source (B-9).
        let b = bundle("b.org", &k2);
        assert!(b.jwt_bundle_for(&td("b.org")).is_some());
        assert!(b.jwt_bundle_for(&td("a.org")).is_none());

        // A source that answers with the wrong trust domain's bundle is not believed.
        struct Liar(JwtBundle);
        impl JwtBundleSource for Liar {
            fn jwt_bundle_for(&self, _: &TrustDomain) -> Option<&JwtBundle> {
                Some(&self.0)
            }
        }
        let token = k2
            .sign(&JwtSvidParams {
                subject: SpiffeId::new("spiffe://a.org/web").unwrap(),
                audience: vec![AUD.into()],
                issued_at: now(),
                expires_at: now() + Duration::from_secs(60),
                issuer: None,
            })
            .unwrap();
        assert_eq!(
            validate(token.token(), &Liar(bundle("b.org", &k2))),
            Err(E::UntrustedTrustDomain {
                trust_domain: td("a.org")
            })
        );
        // Through a trait object, too.
        let dyn_source: &dyn JwtBundleSource = &set;
        assert!(JwtSvid::parse_and_validate(token.token(), dyn_source, AUD, now()).is_ok());
    }

    #[test]
    fn bj1_bundle_keys_need_a_kid() {
        let key = JwtSigningKey::generate().unwrap();
        let mut bundle = JwtBundle::new(td("example.org"));
        assert_eq!(
            bundle.insert_key("", key.public_key().clone()),
            Err(E::EmptyKeyId)
        );
        let keys = BTreeMap::from([(String::new(), key.public_key().clone())]);
        assert_eq!(
            JwtBundle::from_keys(td("example.org"), keys),
            Err(E::EmptyKeyId)
        );
        assert!(
            bundle
                .insert_key("k", key.public_key().clone())
                .unwrap()
                .is_none()
        );
        assert!(
            bundle
                .insert_key("k", key.public_key().clone())
                .unwrap()
                .is_some()
        );
        assert!(bundle.remove_key("k").is_some());
        assert!(bundle.is_empty());
    }

    #[test]
    fn strict_json_rejects_duplicates_at_any_depth() {
        assert!(parse_json_strict(br#"{"a": {"b": 1, "b": 2}}"#).is_err());
        assert!(parse_json_strict(br#"[{"a": 1, "\u0061": 2}]"#).is_err());
        assert_eq!(
            parse_json_strict(br#"{"a": [1, -2, 2.5, "s", null, true, {}], "b": {"a": 1}}"#)
                .unwrap(),
            json!({"a": [1, -2, 2.5, "s", null, true, {}], "b": {"a": 1}})
        );
        assert!(parse_json_strict(b"{} trailing").is_err());
    }

    #[test]
    fn errors_are_lowercase() {
        let samples = [
            E::MissingKeyId,
            E::DisallowedAlgorithm { alg: "none".into() },
            E::InvalidSignature,
            E::Expired,
            E::UntrustedTrustDomain {
                trust_domain: td("example.org"),
            },
        ];
        for e in samples {
            let text = e.to_string();
            assert!(text.starts_with(|c: char| c.is_lowercase()), "{text}");
            assert!(!text.ends_with('.'), "{text}");
        }
    }
}
