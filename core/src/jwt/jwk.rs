//! JWKs and the public keys they carry: [`JwtPublicKey`] and [`EcCurve`], and the check of a
//! signature with a key for a token's `alg`.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest;
use ring::signature;
use serde_json::{Map, Value};

use super::JwtSvidError;

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

/// A JWS algorithm from [`ALLOWED_ALGORITHMS`](super::ALLOWED_ALGORITHMS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Algorithm {
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
    /// [`JwtSigningKey`](super::JwtSigningKey) uses it as the default `kid`.
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
    pub(super) fn verify(
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

// === impl Algorithm ===

impl Algorithm {
    pub(super) fn from_name(name: &str) -> Option<Self> {
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

    pub(super) fn name(self) -> &'static str {
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

// === helpers ===

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
