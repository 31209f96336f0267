//! [`JwtSvid`]: a token parsed and validated by the JWT-SVID rules, in the order of J-1 to J-10.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::jwk::Algorithm;
use super::{
    ALLOWED_HEADER_PARAMETERS, CLOCK_LEEWAY, JwtBundleSource, JwtSvidError, MAX_TOKEN_LEN,
    parse_json_strict,
};
use crate::spiffe_id::SpiffeId;

/// A JWT-SVID: either one that passed [`JwtSvid::parse_and_validate`], or one just signed by
/// [`JwtSigningKey::sign`](super::JwtSigningKey::sign).
///
/// The token is a bearer credential (J-12), so `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSvid {
    pub(super) spiffe_id: SpiffeId,
    pub(super) audience: Vec<String>,
    pub(super) expiry: SystemTime,
    pub(super) claims: Map<String, Value>,
    pub(super) token: String,
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
    ///
    /// [`ALLOWED_ALGORITHMS`]: super::ALLOWED_ALGORITHMS
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
