//! [`JwtSvidError`]: why a token, key or JWKS was rejected, or why signing failed.

use crate::spiffe_id::{SpiffeIdError, TrustDomain};

/// Why a token, key or JWKS was rejected, or why signing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSvidError {
    /// The token is longer than [`MAX_TOKEN_LEN`](super::MAX_TOKEN_LEN) bytes.
    #[error("token is {len} bytes long; the maximum is {max}")]
    TokenTooLarge {
        /// The length found, in bytes.
        len: usize,
        /// The limit, [`MAX_TOKEN_LEN`](super::MAX_TOKEN_LEN).
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
    ///
    /// [`ALLOWED_ALGORITHMS`]: super::ALLOWED_ALGORITHMS
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
    /// `exp` is further in the past than [`CLOCK_LEEWAY`](super::CLOCK_LEEWAY) (J-8).
    #[error("token has expired")]
    Expired,
    /// `nbf` is further in the future than [`CLOCK_LEEWAY`](super::CLOCK_LEEWAY).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iat` is further in the future than [`CLOCK_LEEWAY`](super::CLOCK_LEEWAY).
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
