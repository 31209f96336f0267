//! A workload's own SVID: [`X509Svid`], built only by checking the whole profile, and its
//! [`PrivateKey`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair as _,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::certificate::X509Certificate;
use zeroize::Zeroizing;

use super::X509SvidError;
use super::profile::{
    check_leaf, check_leaf_profile, check_signing_cert, leaf_spiffe_id, parse_certificate,
};
use crate::spiffe_id::SpiffeId;
use crate::x509_bundle::split_concatenated_der;

/// An X509-SVID with its private key: what a workload holds and presents.
///
/// Built only through [`X509Svid::parse`] or [`X509Svid::from_parts`], which check the whole
/// profile, so a value that exists is a well-formed SVID whose key matches its leaf.
#[derive(Clone)]
pub struct X509Svid {
    spiffe_id: SpiffeId,
    cert_chain: Vec<CertificateDer<'static>>,
    private_key: PrivateKey,
    not_after: SystemTime,
}

/// A private key in PKCS#8 DER. Its `Debug` never prints the bytes, and they are zeroed when it
/// is dropped.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<Vec<u8>>);

// === impl X509Svid ===

impl X509Svid {
    /// Parses an SVID from its Workload API form: the chain as DER certificates concatenated
    /// back to back (leaf first, XL-9) and the private key as PKCS#8 DER.
    ///
    /// # Errors
    ///
    /// [`X509SvidError::Der`] when the chain cannot be split, and any error of
    /// [`X509Svid::from_parts`].
    pub fn parse(chain_der: &[u8], key_pkcs8_der: &[u8]) -> Result<Self, X509SvidError> {
        let chain = split_concatenated_der(chain_der)?;
        Self::from_parts(chain, PrivateKey::from_pkcs8_der(key_pkcs8_der.to_vec()))
    }

    /// Builds an SVID from its chain (leaf first) and private key, checking:
    ///
    /// - the leaf has exactly one URI SAN, a valid SPIFFE ID with a path (X-1, X-2, XV-4, XL-1);
    /// - the leaf is not a CA (XL-2; absent Basic Constraints count as `cA = false`, as in
    ///   RFC 5280 and go-spiffe);
    /// - its Key Usage is present, critical, has `digitalSignature` and neither `keyCertSign`
    ///   nor `cRLSign` (XL-3, XL-4, XL-6);
    /// - its EKU, if present, has both `serverAuth` and `clientAuth` (XL-7);
    /// - an empty subject comes with a critical SAN extension (XL-8);
    /// - every later certificate is a CA with a critical Key Usage that has `keyCertSign`
    ///   (XC-1), and carries no SPIFFE ID with a path (XC-3);
    /// - the private key is the leaf's (P-256, P-384 or Ed25519).
    ///
    /// It does not check signatures or validity dates: that is [`verify_chain`]'s job.
    ///
    /// # Errors
    ///
    /// The [`X509SvidError`] variant of the first rule broken.
    ///
    /// [`verify_chain`]: super::verify_chain
    pub fn from_parts(
        cert_chain: Vec<CertificateDer<'static>>,
        private_key: PrivateKey,
    ) -> Result<Self, X509SvidError> {
        let leaf_der = cert_chain.first().ok_or(X509SvidError::EmptyChain)?;
        let leaf = parse_certificate(leaf_der, 0)?;
        let spiffe_id = leaf_spiffe_id(&leaf)?;
        check_leaf(&leaf, &spiffe_id)?;
        check_leaf_profile(&leaf)?;
        for (index, der) in cert_chain.iter().enumerate().skip(1) {
            check_signing_cert(&parse_certificate(der, index)?, index)?;
        }
        check_key_matches(&leaf, &private_key)?;
        let not_after = system_time(leaf.validity().not_after.timestamp());
        Ok(Self {
            spiffe_id,
            cert_chain,
            private_key,
            not_after,
        })
    }

    /// The SPIFFE ID in the leaf's URI SAN.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The chain, leaf first, then any intermediates (XL-9).
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // Construction refuses an empty chain, so index 0 always exists.
        &self.cert_chain[0]
    }

    /// The leaf's private key.
    pub fn private_key(&self) -> &PrivateKey {
        &self.private_key
    }

    /// When the leaf expires (its NotAfter).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("cert_chain", &self.cert_chain.len())
            .field("private_key", &self.private_key)
            .field("not_after", &self.not_after)
            .finish()
    }
}

// === impl PrivateKey ===

impl PrivateKey {
    /// Wraps PKCS#8 DER bytes. Nothing is checked here; [`X509Svid::from_parts`] checks that the
    /// key parses and matches the leaf.
    pub fn from_pkcs8_der(der: Vec<u8>) -> Self {
        Self(Zeroizing::new(der))
    }

    /// The PKCS#8 DER bytes.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.0
    }

    /// A copy in rustls' key type, for building a TLS configuration.
    pub fn to_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.0.to_vec()))
    }
}

impl From<PrivatePkcs8KeyDer<'_>> for PrivateKey {
    fn from(key: PrivatePkcs8KeyDer<'_>) -> Self {
        Self::from_pkcs8_der(key.secret_pkcs8_der().to_vec())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey([redacted])")
    }
}

// === helpers ===

/// Checks that `key` is the private half of the leaf's public key.
fn check_key_matches(leaf: &X509Certificate<'_>, key: &PrivateKey) -> Result<(), X509SvidError> {
    let der = key.pkcs8_der();
    let rng = SystemRandom::new();
    let public = if let Ok(pair) =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
    {
        pair.public_key().as_ref().to_vec()
    } else if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, der, &rng) {
        pair.public_key().as_ref().to_vec()
    } else if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
        pair.public_key().as_ref().to_vec()
    } else {
        return Err(X509SvidError::UnsupportedPrivateKey);
    };
    if public.as_slice() != leaf.public_key().subject_public_key.data.as_ref() {
        return Err(X509SvidError::KeyMismatch);
    }
    Ok(())
}

/// A certificate time (seconds since the Unix epoch) as a `SystemTime`.
fn system_time(unix_seconds: i64) -> SystemTime {
    let offset = Duration::from_secs(unix_seconds.unsigned_abs());
    let time = if unix_seconds >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    };
    // Out of SystemTime's range cannot happen for an X.509 time (years 1950 to 9999) on the
    // platforms we support; the epoch is the safe (already expired) answer if it did.
    time.unwrap_or(UNIX_EPOCH)
}
