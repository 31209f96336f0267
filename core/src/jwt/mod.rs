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

// Layout: `error.rs` (JwtSvidError), `jwk.rs` (JWK public keys, curves, and signature
// verification by `alg`), `bundle.rs` (JwtBundle, JwtBundleSet, JwtBundleSource), `signing.rs`
// (JwtSigningKey, JwtSvidParams), `svid.rs` (JwtSvid: parsing and validation), `json.rs` (the
// strict JSON parser), and the tests in `tests.rs` and `tests/`.

use std::time::Duration;

mod bundle;
mod error;
mod json;
mod jwk;
mod signing;
mod svid;
#[cfg(test)]
pub(crate) mod tests;

pub use bundle::{JwtBundle, JwtBundleSet, JwtBundleSource};
pub use error::JwtSvidError;
pub use jwk::{EcCurve, JwtPublicKey};
pub use signing::{JwtSigningKey, JwtSvidParams};
pub use svid::JwtSvid;

pub(crate) use json::parse_json_strict;

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
