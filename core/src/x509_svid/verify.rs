//! Verification by a relying party: [`verify_chain`] (XV-1 to XV-7, path validation by
//! rustls-webpki) and its result, [`VerifiedSvid`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter};

use super::X509SvidError;
use super::profile::{check_leaf, leaf_spiffe_id, parse_certificate};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::x509_bundle::X509BundleSource;

/// The result of [`verify_chain`]: a peer whose chain verified, and its SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    spiffe_id: SpiffeId,
}

// === impl VerifiedSvid ===

impl VerifiedSvid {
    /// The peer's SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The peer's SPIFFE ID, by value.
    pub fn into_spiffe_id(self) -> SpiffeId {
        self.spiffe_id
    }
}

// === verification ===

/// Verifies a peer's chain (leaf first) as a relying party, and returns its SPIFFE ID.
///
/// In order:
///
/// 1. the leaf has exactly one URI SAN holding a valid SPIFFE ID (XV-6, XV-4);
/// 2. the leaf is not a CA (XV-2, XC-4) and its Key Usage has neither `keyCertSign` nor
///    `cRLSign` (XV-3) but has `digitalSignature` (spec section 9 item 7);
/// 3. the ID has a path (XV-5);
/// 4. the bundle is the one of the leaf's own trust domain, and none is an error (XV-7, B-9);
///    a bundle with no usable authority rejects everything (B-2), and authorities that are
///    expired or not yet valid at `now` are not used;
/// 5. rustls-webpki runs RFC 5280 path validation from the leaf through the other presented
///    certificates to that bundle's authorities, at time `now`, accepting any EKU as go-spiffe's
///    `ExtKeyUsageAny` does (XV-1).
///
/// Authorize the returned ID afterwards with an [`Authorizer`](super::Authorizer) (XV-8).
///
/// # Errors
///
/// The [`X509SvidError`] of the first check that fails; path validation failures are
/// [`X509SvidError::Untrusted`], carrying rustls-webpki's reason.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    bundles: &impl X509BundleSource,
    now: SystemTime,
) -> Result<VerifiedSvid, X509SvidError> {
    let (leaf_der, intermediates) = chain.split_first().ok_or(X509SvidError::EmptyChain)?;
    let leaf = parse_certificate(leaf_der, 0)?;
    let spiffe_id = leaf_spiffe_id(&leaf)?;
    check_leaf(&leaf, &spiffe_id)?;

    let trust_domain = spiffe_id.trust_domain();
    let bundle = bundles
        .x509_bundle_for(&trust_domain)
        // Guard against a source that answers with another trust domain's bundle (B-9).
        .filter(|bundle| *bundle.trust_domain() == trust_domain)
        .ok_or_else(|| X509SvidError::NoBundle {
            trust_domain: trust_domain.clone(),
        })?;
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let anchors = trust_anchors(bundle.authorities(), &trust_domain, since_epoch)?;

    let untrusted = |source| X509SvidError::Untrusted {
        trust_domain: trust_domain.clone(),
        source,
    };
    let end_entity = EndEntityCert::try_from(leaf_der).map_err(untrusted)?;
    let time = UnixTime::since_unix_epoch(since_epoch);
    end_entity
        .verify_for_usage(
            SUPPORTED_SIG_ALGS,
            &anchors,
            intermediates,
            time,
            AnyExtendedKeyUsage,
            None,
            None,
        )
        .map_err(untrusted)?;
    Ok(VerifiedSvid { spiffe_id })
}

/// The bundle's authorities as webpki trust anchors, keeping only those valid at `now`.
///
/// RFC 5280 path validation does not look at a trust anchor's own validity dates, and neither
/// does rustls-webpki; Go's crypto/x509 (so go-spiffe) and OpenSSL do, and so does Sigil: an
/// expired authority authenticates nothing. An authority webpki cannot use is skipped.
fn trust_anchors<'a>(
    authorities: &'a [CertificateDer<'static>],
    trust_domain: &TrustDomain,
    now: Duration,
) -> Result<Vec<TrustAnchor<'a>>, X509SvidError> {
    let usable: Vec<_> = authorities
        .iter()
        .filter_map(|authority| {
            Some((authority, webpki::anchor_from_trusted_cert(authority).ok()?))
        })
        .collect();
    if usable.is_empty() {
        return Err(X509SvidError::EmptyBundle {
            trust_domain: trust_domain.clone(),
        });
    }
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let anchors: Vec<_> = usable
        .into_iter()
        .filter(|(authority, _)| {
            x509_parser::parse_x509_certificate(authority.as_ref()).is_ok_and(|(_, cert)| {
                let validity = cert.validity();
                validity.not_before.timestamp() <= now && now <= validity.not_after.timestamp()
            })
        })
        .map(|(_, anchor)| anchor)
        .collect();
    if anchors.is_empty() {
        return Err(X509SvidError::AuthoritiesNotValid {
            trust_domain: trust_domain.clone(),
        });
    }
    Ok(anchors)
}

/// The signature algorithms path validation accepts (rustls' set for the ring provider).
pub static SUPPORTED_SIG_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PKCS1_3072_8192_SHA384,
];

/// Accepts any Extended Key Usage, or none, on every certificate of the path, as go-spiffe's
/// `ExtKeyUsageAny`; a malformed EKU is still an error. SVIDs are used both as TLS clients and
/// servers, and XL-7 is an issuer rule checked by [`X509Svid::parse`](super::X509Svid::parse).
struct AnyExtendedKeyUsage;

impl ExtendedKeyUsageValidator for AnyExtendedKeyUsage {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for purpose in iter {
            purpose?;
        }
        Ok(())
    }
}
