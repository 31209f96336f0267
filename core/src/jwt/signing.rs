//! Signing: [`JwtSigningKey`], an ES256 key with its `kid`, and [`JwtSvidParams`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde_json::{Map, Value};

use super::{EcCurve, JwtPublicKey, JwtSvid, JwtSvidError};
use crate::spiffe_id::SpiffeId;

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
    pub(super) fn sign_raw(&self, message: &[u8]) -> Result<Vec<u8>, JwtSvidError> {
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

// === helpers ===

/// A time as whole seconds since the Unix epoch.
fn unix_seconds(time: SystemTime) -> Result<u64, JwtSvidError> {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| JwtSvidError::Signing {
            reason: "time is before 1970",
        })
}
