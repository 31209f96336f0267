//! X509-SVIDs: parsing an SVID a workload holds, and verifying one a peer presents
//! ([X509-SVID]).
//!
//! Two entry points, for two roles:
//!
//! - [`X509Svid::parse`] / [`X509Svid::from_parts`] take a workload's own SVID (a chain, leaf
//!   first, plus its private key) and check the whole leaf profile (X-1, X-2, XL-1 to XL-8), the
//!   signing certificates in the chain (XC-1, XC-3) and that the key belongs to the leaf.
//! - [`verify_chain`] is the relying party's check of a peer's chain (XV-1 to XV-7): the SPIFFE ID
//!   and the leaf rules first, then RFC 5280 path validation by rustls-webpki against the bundle
//!   of **the leaf's own trust domain only** (B-9). After it, an [`Authorizer`] decides whether
//!   the authenticated ID may proceed (XV-8).
//!
//! [`verify_chain`] checks what go-spiffe's `x509svid.Verify` checks (XV-2, XV-3, XV-6, any EKU),
//! plus the root-ID and digitalSignature rules that go-spiffe checks only when parsing (spec
//! section 9, item 7). It does not check Key Usage criticality, the EKU contents (XL-7) or the
//! empty-subject rule (XL-8): those are issuer obligations, checked by [`X509Svid::parse`].
//!
//! [X509-SVID]: https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair as _,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, SignatureVerificationAlgorithm, TrustAnchor,
    UnixTime,
};
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, KeyUsage, ParsedExtension};
use x509_parser::oid_registry::{
    OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
};
use zeroize::Zeroizing;

use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
use crate::x509_bundle::{ConcatenatedDerError, X509BundleSource, split_concatenated_der};

/// Why a chain is not a valid X509-SVID, does not verify, or is not authorized.
///
/// Certificate positions (`index`) count from 0, the leaf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509SvidError {
    /// The chain holds no certificate.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// The concatenated DER chain could not be split into certificates (truncated input or
    /// trailing garbage).
    #[error("certificate chain: {0}")]
    Der(#[from] ConcatenatedDerError),
    /// A certificate in the chain is not well-formed X.509.
    #[error("certificate {index} of the chain is not a valid x509 certificate: {reason}")]
    BadCertificate {
        /// The certificate's position in the chain.
        index: usize,
        /// What the certificate parser reported.
        reason: String,
    },
    /// An extension that Sigil checks is malformed or appears more than once.
    #[error(
        "certificate {index} of the chain has a malformed or repeated {extension} extension: {reason}"
    )]
    BadExtension {
        /// The certificate's position in the chain.
        index: usize,
        /// Which extension.
        extension: &'static str,
        /// What the certificate parser reported.
        reason: String,
    },
    /// The leaf has no URI SAN, so it carries no SPIFFE ID and is not an SVID.
    #[error("leaf certificate has no uri san, so it is not an x509-svid")]
    MissingUriSan,
    /// The leaf has more than one URI SAN; an SVID has exactly one, even when the extra one is
    /// not a `spiffe://` URI (X-2, XV-6).
    #[error("leaf certificate has {count} uri sans; an x509-svid has exactly one")]
    MultipleUriSans {
        /// How many URI SANs the leaf has.
        count: usize,
    },
    /// The leaf's URI SAN is not a valid SPIFFE ID: another scheme, or a rule of SPIFFE-ID §2
    /// broken (XV-4).
    #[error("leaf certificate uri san {uri:?} is not a valid spiffe id: {source}")]
    BadSpiffeId {
        /// The URI found.
        uri: String,
        /// Which SPIFFE ID rule it breaks.
        source: SpiffeIdError,
    },
    /// The leaf carries a trust domain's own ID (no path), which never identifies a workload
    /// (XL-1, XV-5).
    #[error("leaf spiffe id {id} has no path; a trust domain's own id cannot identify a workload")]
    LeafHasRootId {
        /// The root ID found.
        id: SpiffeId,
    },
    /// The leaf's Basic Constraints say `cA = true`: a signing certificate presented as a
    /// credential (XL-2, XV-2, XC-4).
    #[error(
        "leaf certificate is a ca (basic constraints ca=true); signing certificates cannot authenticate"
    )]
    LeafIsCa,
    /// The leaf has no Key Usage extension (XL-3).
    #[error("leaf certificate has no key usage extension")]
    MissingKeyUsage,
    /// The leaf's Key Usage extension is not marked critical (XL-3).
    #[error("leaf certificate key usage extension is not marked critical")]
    KeyUsageNotCritical,
    /// The leaf's Key Usage lacks `digitalSignature` (XL-4, spec section 9 item 7).
    #[error("leaf certificate key usage lacks digitalSignature")]
    MissingDigitalSignature,
    /// The leaf's Key Usage has `keyCertSign` or `cRLSign`, which only signing certificates may
    /// have (XL-6, XV-3).
    #[error("leaf certificate key usage has {usage}, which only signing certificates may have")]
    LeafCanSign {
        /// `keyCertSign` or `cRLSign`.
        usage: &'static str,
    },
    /// The leaf has an Extended Key Usage extension without both `serverAuth` and `clientAuth`
    /// (XL-7).
    #[error("leaf certificate extended key usage must include both serverAuth and clientAuth")]
    MissingServerOrClientAuth,
    /// The leaf's subject is empty but its Subject Alternative Name extension is not critical
    /// (XL-8, RFC 5280 §4.2.1.6).
    #[error(
        "leaf certificate has an empty subject, so its subject alternative name extension must be critical"
    )]
    SanNotCritical,
    /// A certificate after the leaf is not a CA: Basic Constraints is missing or has
    /// `cA = false` (XC-1). Often a chain in the wrong order (the leaf must come first).
    #[error("chain certificate {index} is not a ca (basic constraints ca must be true)")]
    SigningCertNotCa {
        /// The certificate's position in the chain.
        index: usize,
    },
    /// A signing certificate's Key Usage is missing, not critical, or lacks `keyCertSign` (XC-1).
    #[error("chain certificate {index} has a bad key usage: {problem}")]
    SigningCertKeyUsage {
        /// The certificate's position in the chain.
        index: usize,
        /// What is wrong.
        problem: &'static str,
    },
    /// A signing certificate carries a SPIFFE ID with a path (XC-3).
    #[error(
        "chain certificate {index} has spiffe id {id}; a signing certificate's id must have no path"
    )]
    SigningCertHasPath {
        /// The certificate's position in the chain.
        index: usize,
        /// The ID found.
        id: SpiffeId,
    },
    /// The private key is not a PKCS#8 P-256, P-384 or Ed25519 key (with its public key), or is
    /// malformed.
    #[error("private key is not a supported pkcs#8 key (p-256, p-384 or ed25519)")]
    UnsupportedPrivateKey,
    /// The private key does not belong to the leaf certificate's public key.
    #[error("private key does not match the leaf certificate's public key")]
    KeyMismatch,
    /// There is no bundle for the leaf's trust domain, so the peer is untrusted (XV-7).
    #[error("no bundle for trust domain {trust_domain}")]
    NoBundle {
        /// The leaf's trust domain.
        trust_domain: TrustDomain,
    },
    /// The bundle for the leaf's trust domain has no usable authority: the trust domain revoked
    /// its keys, and nothing from it verifies (B-2).
    #[error(
        "the bundle for trust domain {trust_domain} has no usable authority, so no svid from it is valid"
    )]
    EmptyBundle {
        /// The leaf's trust domain.
        trust_domain: TrustDomain,
    },
    /// Every authority in the bundle of the leaf's trust domain is expired or not yet valid at
    /// the verification time (XV-1).
    #[error(
        "every authority in the bundle for trust domain {trust_domain} is expired or not yet valid"
    )]
    AuthoritiesNotValid {
        /// The leaf's trust domain.
        trust_domain: TrustDomain,
    },
    /// RFC 5280 path validation failed against the bundle of the leaf's trust domain: unknown
    /// issuer, bad signature, expired or not yet valid, and so on (XV-1).
    #[error(
        "certificate chain does not verify against the bundle for trust domain {trust_domain}: {source}"
    )]
    Untrusted {
        /// The leaf's trust domain, whose bundle was used.
        trust_domain: TrustDomain,
        /// What rustls-webpki reported.
        source: webpki::Error,
    },
    /// The peer authenticated, but the authorization policy does not allow its ID (XV-8).
    #[error("spiffe id {id} is not authorized")]
    Unauthorized {
        /// The peer's ID.
        id: SpiffeId,
    },
}

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

/// The result of [`verify_chain`]: a peer whose chain verified, and its SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    spiffe_id: SpiffeId,
}

/// Which authenticated SPIFFE IDs may proceed (XV-8), as go-spiffe's `tlsconfig.Authorize*`.
///
/// Authorization comes after [`verify_chain`]: it only looks at the ID.
#[derive(Clone)]
pub struct Authorizer {
    rule: Rule,
}

#[derive(Clone)]
enum Rule {
    Any,
    OneOf(Vec<SpiffeId>),
    MemberOf(TrustDomain),
    Predicate(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

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

// === impl Authorizer ===

impl Authorizer {
    /// Allows any authenticated ID.
    pub fn any() -> Self {
        Self { rule: Rule::Any }
    }

    /// Allows exactly `id`.
    pub fn exact(id: SpiffeId) -> Self {
        Self::one_of([id])
    }

    /// Allows any of `ids`.
    pub fn one_of(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        Self {
            rule: Rule::OneOf(ids.into_iter().collect()),
        }
    }

    /// Allows any ID in `trust_domain`.
    pub fn member_of(trust_domain: TrustDomain) -> Self {
        Self {
            rule: Rule::MemberOf(trust_domain),
        }
    }

    /// Allows the IDs for which `predicate` returns true.
    pub fn predicate(predicate: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static) -> Self {
        Self {
            rule: Rule::Predicate(Arc::new(predicate)),
        }
    }

    /// Checks `id` against the policy.
    ///
    /// # Errors
    ///
    /// [`X509SvidError::Unauthorized`] when the policy does not allow `id`.
    pub fn authorize(&self, id: &SpiffeId) -> Result<(), X509SvidError> {
        let allowed = match &self.rule {
            Rule::Any => true,
            Rule::OneOf(ids) => ids.contains(id),
            Rule::MemberOf(trust_domain) => id.is_member_of(trust_domain),
            Rule::Predicate(predicate) => predicate(id),
        };
        if !allowed {
            return Err(X509SvidError::Unauthorized { id: id.clone() });
        }
        Ok(())
    }
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Rule::Any => f.write_str("Authorizer::Any"),
            Rule::OneOf(ids) => f.debug_tuple("Authorizer::OneOf").field(ids).finish(),
            Rule::MemberOf(td) => f.debug_tuple("Authorizer::MemberOf").field(td).finish(),
            Rule::Predicate(_) => f.write_str("Authorizer::Predicate(..)"),
        }
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
/// Authorize the returned ID afterwards with an [`Authorizer`] (XV-8).
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

/// Checks one leaf certificate against the whole X509-SVID leaf profile, without a private key
/// or a bundle, and returns its SPIFFE ID: what an issuer checks on a certificate it just signed.
///
/// The rules are those of [`X509Svid::from_parts`] for the leaf: exactly one URI SAN holding a
/// SPIFFE ID with a path (X-1, X-2, XV-4, XL-1), not a CA (XL-2), a critical Key Usage with
/// `digitalSignature` and neither `keyCertSign` nor `cRLSign` (XL-3, XL-4, XL-6), an EKU, if
/// present, with both `serverAuth` and `clientAuth` (XL-7), and a critical SAN extension when
/// the subject is empty (XL-8). Signatures and validity dates are not checked: that is
/// [`verify_chain`]'s job.
///
/// # Errors
///
/// The [`X509SvidError`] variant of the first rule broken.
pub fn check_leaf_certificate(leaf: &CertificateDer<'_>) -> Result<SpiffeId, X509SvidError> {
    let leaf = parse_certificate(leaf, 0)?;
    let spiffe_id = leaf_spiffe_id(&leaf)?;
    check_leaf(&leaf, &spiffe_id)?;
    check_leaf_profile(&leaf)?;
    Ok(spiffe_id)
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
static SUPPORTED_SIG_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
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
/// servers, and XL-7 is an issuer rule checked by [`X509Svid::parse`].
struct AnyExtendedKeyUsage;

impl ExtendedKeyUsageValidator for AnyExtendedKeyUsage {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for purpose in iter {
            purpose?;
        }
        Ok(())
    }
}

// === checks ===

/// Parses one certificate of the chain, refusing trailing bytes.
fn parse_certificate<'a>(
    der: &'a CertificateDer<'_>,
    index: usize,
) -> Result<X509Certificate<'a>, X509SvidError> {
    match x509_parser::parse_x509_certificate(der.as_ref()) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(X509SvidError::BadCertificate {
            index,
            reason: format!("{} bytes follow the certificate", rest.len()),
        }),
        Err(e) => Err(X509SvidError::BadCertificate {
            index,
            reason: e.to_string(),
        }),
    }
}

/// The leaf's single URI SAN as a SPIFFE ID (X-1, X-2, XV-4, XV-6).
fn leaf_spiffe_id(leaf: &X509Certificate<'_>) -> Result<SpiffeId, X509SvidError> {
    let uris = uri_sans(leaf, 0)?;
    match uris.as_slice() {
        [] => Err(X509SvidError::MissingUriSan),
        [uri] => SpiffeId::new(uri).map_err(|source| X509SvidError::BadSpiffeId {
            uri: (*uri).to_owned(),
            source,
        }),
        _ => Err(X509SvidError::MultipleUriSans { count: uris.len() }),
    }
}

/// The leaf rules checked both when parsing and when verifying: XL-2/XV-2, XL-6/XV-3, XL-4
/// (section 9 item 7) and XL-1/XV-5, in that order.
fn check_leaf(leaf: &X509Certificate<'_>, id: &SpiffeId) -> Result<(), X509SvidError> {
    if is_ca(leaf, 0)? {
        return Err(X509SvidError::LeafIsCa);
    }
    let (_, key_usage) = key_usage(leaf, 0)?.ok_or(X509SvidError::MissingKeyUsage)?;
    if key_usage.key_cert_sign() {
        return Err(X509SvidError::LeafCanSign {
            usage: "keyCertSign",
        });
    }
    if key_usage.crl_sign() {
        return Err(X509SvidError::LeafCanSign { usage: "cRLSign" });
    }
    if !key_usage.digital_signature() {
        return Err(X509SvidError::MissingDigitalSignature);
    }
    if id.is_root() {
        return Err(X509SvidError::LeafHasRootId { id: id.clone() });
    }
    Ok(())
}

/// The leaf rules checked only when parsing an SVID: XL-3 criticality, XL-7 and XL-8.
fn check_leaf_profile(leaf: &X509Certificate<'_>) -> Result<(), X509SvidError> {
    if let Some((critical, _)) = key_usage(leaf, 0)?
        && !critical
    {
        return Err(X509SvidError::KeyUsageNotCritical);
    }
    let eku = leaf
        .extended_key_usage()
        .map_err(|e| bad_extension(0, "extended key usage", e))?;
    if let Some(eku) = eku
        && !(eku.value.server_auth && eku.value.client_auth)
    {
        return Err(X509SvidError::MissingServerOrClientAuth);
    }
    if leaf.subject().iter().next().is_none() {
        let san = leaf
            .get_extension_unique(&OID_X509_EXT_SUBJECT_ALT_NAME)
            .map_err(|e| bad_extension(0, "subject alternative name", e))?;
        if san.is_some_and(|san| !san.critical) {
            return Err(X509SvidError::SanNotCritical);
        }
    }
    Ok(())
}

/// The rules for a signing certificate in a chain: XC-1 and XC-3.
fn check_signing_cert(cert: &X509Certificate<'_>, index: usize) -> Result<(), X509SvidError> {
    if !is_ca(cert, index)? {
        return Err(X509SvidError::SigningCertNotCa { index });
    }
    let problem = match key_usage(cert, index)? {
        None => Some("key usage is missing"),
        Some((false, _)) => Some("key usage is not critical"),
        Some((true, usage)) if !usage.key_cert_sign() => Some("key usage lacks keyCertSign"),
        Some(_) => None,
    };
    if let Some(problem) = problem {
        return Err(X509SvidError::SigningCertKeyUsage { index, problem });
    }
    for uri in uri_sans(cert, index)? {
        if let Ok(id) = SpiffeId::new(uri)
            && !id.is_root()
        {
            return Err(X509SvidError::SigningCertHasPath { index, id });
        }
    }
    Ok(())
}

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

/// Whether Basic Constraints say `cA = true`; an absent extension means `false` (RFC 5280).
fn is_ca(cert: &X509Certificate<'_>, index: usize) -> Result<bool, X509SvidError> {
    let ext = cert
        .get_extension_unique(&OID_X509_EXT_BASIC_CONSTRAINTS)
        .map_err(|e| bad_extension(index, "basic constraints", e))?;
    match ext.map(|ext| ext.parsed_extension()) {
        None => Ok(false),
        Some(ParsedExtension::BasicConstraints(bc)) => Ok(bc.ca),
        Some(other) => Err(X509SvidError::BadExtension {
            index,
            extension: "basic constraints",
            reason: format!("{other:?}"),
        }),
    }
}

/// The Key Usage extension, as (critical, usage), if present.
fn key_usage<'a>(
    cert: &'a X509Certificate<'_>,
    index: usize,
) -> Result<Option<(bool, &'a KeyUsage)>, X509SvidError> {
    let ext = cert
        .get_extension_unique(&OID_X509_EXT_KEY_USAGE)
        .map_err(|e| bad_extension(index, "key usage", e))?;
    match ext {
        None => Ok(None),
        Some(ext) => match ext.parsed_extension() {
            ParsedExtension::KeyUsage(usage) => Ok(Some((ext.critical, usage))),
            other => Err(X509SvidError::BadExtension {
                index,
                extension: "key usage",
                reason: format!("{other:?}"),
            }),
        },
    }
}

/// Every URI in the Subject Alternative Name extension.
fn uri_sans<'a>(
    cert: &'a X509Certificate<'_>,
    index: usize,
) -> Result<Vec<&'a str>, X509SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad_extension(index, "subject alternative name", e))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn bad_extension(index: usize, extension: &'static str, e: impl fmt::Display) -> X509SvidError {
    X509SvidError::BadExtension {
        index,
        extension,
        reason: e.to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509_bundle::{X509Bundle, X509BundleSet};
    use X509SvidError as E;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, CustomExtension, DistinguishedName,
        DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SanType, SignatureAlgorithm,
        date_time_ymd,
    };

    // --- a small certificate factory -----------------------------------------------------

    const WORKLOAD: &str = "spiffe://example.org/ns/prod/web";

    /// Every certificate is valid for January 2030; tests pass `now` explicitly.
    fn now() -> SystemTime {
        at(2030, 1, 15)
    }

    fn at(year: i32, month: u8, day: u8) -> SystemTime {
        let secs = date_time_ymd(year, month, day).unix_timestamp();
        UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap())
    }

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn validity(p: &mut CertificateParams) {
        p.not_before = date_time_ymd(2030, 1, 1);
        p.not_after = date_time_ymd(2030, 2, 1);
    }

    fn ca_params(td: &str, cn: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Sigil test");
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![uri(&format!("spiffe://{td}"))];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p);
        p
    }

    type Ca = CertifiedIssuer<'static, KeyPair>;

    /// A self-signed root CA for `td`, with the subject `O=Sigil test, CN=<td> root`, valid from
    /// June 2029 to June 2030 (wider than the certificates it signs).
    fn root_ca(td: &str) -> Ca {
        root_ca_with(td, |p| {
            p.not_before = date_time_ymd(2029, 6, 1);
            p.not_after = date_time_ymd(2030, 6, 1);
        })
    }

    fn root_ca_with(td: &str, edit: impl FnOnce(&mut CertificateParams)) -> Ca {
        let mut p = ca_params(td, &format!("{td} root"));
        p.use_authority_key_identifier_extension = false;
        edit(&mut p);
        Ca::self_signed(p, KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()).unwrap()
    }

    /// An intermediate CA signed by `parent`, after `edit` changes its parameters.
    fn intermediate_ca(parent: &Ca, edit: impl FnOnce(&mut CertificateParams)) -> Ca {
        let mut p = ca_params("example.org", "example.org intermediate");
        edit(&mut p);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        Ca::signed_by(p, key, parent).unwrap()
    }

    /// A good SVID leaf profile: empty subject, one critical URI SAN, cA=false, critical KU
    /// digitalSignature, EKU serverAuth + clientAuth.
    fn leaf_params(id: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![uri(id)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p);
        p
    }

    /// Signs a leaf with a fresh key; returns the certificate and the key's PKCS#8 DER.
    fn sign_leaf_with(
        p: &CertificateParams,
        issuer: &Issuer<'_, KeyPair>,
        alg: &'static SignatureAlgorithm,
    ) -> (CertificateDer<'static>, Vec<u8>) {
        let key = KeyPair::generate_for(alg).unwrap();
        let cert = p.signed_by(&key, issuer).unwrap();
        (cert.der().clone(), key.serialize_der())
    }

    fn sign_leaf(p: &CertificateParams, issuer: &Issuer<'_, KeyPair>) -> CertificateDer<'static> {
        sign_leaf_with(p, issuer, &PKCS_ECDSA_P256_SHA256).0
    }

    fn bundle_of(ca: &Ca) -> X509Bundle {
        X509Bundle::new(td("example.org"), vec![ca.der().clone()]).unwrap()
    }

    fn parse(chain: &[CertificateDer<'static>], key: &[u8]) -> Result<X509Svid, X509SvidError> {
        X509Svid::from_parts(chain.to_vec(), PrivateKey::from_pkcs8_der(key.to_vec()))
    }

    /// DER of a Key Usage BIT STRING with only digitalSignature.
    const KU_DIGITAL_SIGNATURE: &[u8] = &[0x03, 0x02, 0x07, 0x80];
    /// DER of an EKU with serverAuth and clientAuth.
    const EKU_SERVER_CLIENT: &[u8] = &[
        0x30, 0x14, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01, 0x06, 0x08, 0x2b,
        0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
    ];

    fn extension(oid: &[u64], content: &[u8], critical: bool) -> CustomExtension {
        let mut ext = CustomExtension::from_oid_content(oid, content.to_vec());
        ext.set_criticality(critical);
        ext
    }

    /// DER of a SubjectAltName holding one URI.
    fn san_der(uri: &str) -> Vec<u8> {
        let name = [
            &[0x86, u8::try_from(uri.len()).unwrap()][..],
            uri.as_bytes(),
        ]
        .concat();
        [&[0x30, u8::try_from(name.len()).unwrap()][..], &name].concat()
    }

    // --- leaf profile: one case per spec item ---------------------------------------------

    type Edit = fn(&mut CertificateParams);

    /// (spec item, change to a good leaf, error from `X509Svid` parsing, error from
    /// `verify_chain` or `None` when the relying party accepts it)
    fn leaf_cases() -> Vec<(&'static str, Edit, E, Option<E>)> {
        let https = "https://example.org/web";
        let bad_id = "spiffe://example.org/a//b";
        vec![
            (
                "X-1 no uri san (dns only)",
                |p| p.subject_alt_names = vec![SanType::DnsName("web".try_into().unwrap())],
                E::MissingUriSan,
                Some(E::MissingUriSan),
            ),
            (
                "X-1 no san extension",
                |p| {
                    p.distinguished_name.push(DnType::CommonName, "web");
                    p.subject_alt_names = vec![];
                },
                E::MissingUriSan,
                Some(E::MissingUriSan),
            ),
            (
                "X-2 XV-6 two spiffe uri sans",
                |p| p.subject_alt_names.push(uri("spiffe://example.org/other")),
                E::MultipleUriSans { count: 2 },
                Some(E::MultipleUriSans { count: 2 }),
            ),
            (
                "X-2 XV-6 extra non-spiffe uri san",
                |p| p.subject_alt_names.push(uri("https://example.org/x")),
                E::MultipleUriSans { count: 2 },
                Some(E::MultipleUriSans { count: 2 }),
            ),
            (
                "XV-4 https uri san",
                |p| p.subject_alt_names = vec![uri("https://example.org/web")],
                E::BadSpiffeId {
                    uri: https.into(),
                    source: SpiffeIdError::WrongScheme,
                },
                Some(E::BadSpiffeId {
                    uri: https.into(),
                    source: SpiffeIdError::WrongScheme,
                }),
            ),
            (
                "XV-4 invalid spiffe id",
                |p| p.subject_alt_names = vec![uri("spiffe://example.org/a//b")],
                E::BadSpiffeId {
                    uri: bad_id.into(),
                    source: SpiffeIdError::EmptySegment,
                },
                Some(E::BadSpiffeId {
                    uri: bad_id.into(),
                    source: SpiffeIdError::EmptySegment,
                }),
            ),
            (
                "XL-1 XV-5 root id leaf",
                |p| p.subject_alt_names = vec![uri("spiffe://example.org")],
                E::LeafHasRootId {
                    id: td("example.org").root_id(),
                },
                Some(E::LeafHasRootId {
                    id: td("example.org").root_id(),
                }),
            ),
            (
                "XL-2 XV-2 leaf with cA=true",
                |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
                E::LeafIsCa,
                Some(E::LeafIsCa),
            ),
            (
                "XL-3 no key usage",
                |p| p.key_usages = vec![],
                E::MissingKeyUsage,
                Some(E::MissingKeyUsage),
            ),
            (
                "XL-3 key usage not critical",
                |p| {
                    p.key_usages = vec![];
                    p.custom_extensions =
                        vec![extension(&[2, 5, 29, 15], KU_DIGITAL_SIGNATURE, false)];
                },
                E::KeyUsageNotCritical,
                None,
            ),
            (
                "XL-4 section 9.7 no digitalSignature",
                |p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment],
                E::MissingDigitalSignature,
                Some(E::MissingDigitalSignature),
            ),
            (
                "XL-6 XV-3 keyCertSign",
                |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign),
                E::LeafCanSign {
                    usage: "keyCertSign",
                },
                Some(E::LeafCanSign {
                    usage: "keyCertSign",
                }),
            ),
            (
                "XL-6 XV-3 cRLSign",
                |p| p.key_usages.push(KeyUsagePurpose::CrlSign),
                E::LeafCanSign { usage: "cRLSign" },
                Some(E::LeafCanSign { usage: "cRLSign" }),
            ),
            (
                "XL-7 eku serverAuth only",
                |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth],
                E::MissingServerOrClientAuth,
                None,
            ),
            (
                "XL-7 eku clientAuth only",
                |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
                E::MissingServerOrClientAuth,
                None,
            ),
            (
                "XL-8 empty subject with non-critical san",
                |p| {
                    p.subject_alt_names = vec![];
                    p.custom_extensions =
                        vec![extension(&[2, 5, 29, 17], &san_der(WORKLOAD), false)];
                },
                E::SanNotCritical,
                None,
            ),
        ]
    }

    #[test]
    fn leaf_rejections_when_parsing_and_verifying() {
        let ca = root_ca("example.org");
        let bundle = bundle_of(&ca);
        for (item, edit, parse_err, verify_err) in leaf_cases() {
            let mut p = leaf_params(WORKLOAD);
            edit(&mut p);
            let (leaf, key) = sign_leaf_with(&p, &ca, &PKCS_ECDSA_P256_SHA256);
            let chain = [leaf];
            assert_eq!(parse(&chain, &key).unwrap_err(), parse_err, "{item}: parse");
            match verify_err {
                Some(want) => assert_eq!(
                    verify_chain(&chain, &bundle, now()).unwrap_err(),
                    want,
                    "{item}: verify"
                ),
                // Issuer-side rules the relying party does not re-check (as go-spiffe).
                None => assert!(
                    verify_chain(&chain, &bundle, now()).is_ok(),
                    "{item}: verify accepts"
                ),
            }
        }
    }

    #[test]
    fn leaf_acceptances() {
        let ca = root_ca("example.org");
        let bundle = bundle_of(&ca);
        let cases: &[(&str, Edit)] = &[
            ("good leaf", |_| {}),
            ("X-3 dns and ip sans besides the uri", |p| {
                p.subject_alt_names
                    .push(SanType::DnsName("web".try_into().unwrap()));
                p.subject_alt_names
                    .push(SanType::IpAddress([10, 0, 0, 1].into()));
            }),
            ("XL-2 basic constraints absent means cA=false", |p| {
                p.is_ca = IsCa::NoCa
            }),
            ("XL-5 keyEncipherment and keyAgreement", |p| {
                p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
                p.key_usages.push(KeyUsagePurpose::KeyAgreement);
            }),
            ("XL-7 eku absent", |p| p.extended_key_usages = vec![]),
            ("XL-7 eku critical", |p| {
                p.extended_key_usages = vec![];
                p.custom_extensions = vec![extension(&[2, 5, 29, 37], EKU_SERVER_CLIENT, true)];
            }),
            ("XL-8 subject present and non-critical san", |p| {
                p.distinguished_name.push(DnType::CommonName, "web");
            }),
        ];
        for (item, edit) in cases {
            let mut p = leaf_params(WORKLOAD);
            edit(&mut p);
            let (leaf, key) = sign_leaf_with(&p, &ca, &PKCS_ECDSA_P256_SHA256);
            let svid =
                parse(std::slice::from_ref(&leaf), &key).unwrap_or_else(|e| panic!("{item}: {e}"));
            assert_eq!(svid.spiffe_id().as_str(), WORKLOAD, "{item}");
            let verified = verify_chain(&[leaf], &bundle, now())
                .unwrap_or_else(|e| panic!("{item}: verify: {e}"));
            assert_eq!(verified.spiffe_id().as_str(), WORKLOAD, "{item}");
        }
    }

    // --- a valid SVID ------------------------------------------------------------------------

    #[test]
    fn valid_svid_parses_and_verifies() {
        let ca = root_ca("example.org");
        let (leaf, key) = sign_leaf_with(&leaf_params(WORKLOAD), &ca, &PKCS_ECDSA_P256_SHA256);

        let svid = X509Svid::parse(leaf.as_ref(), &key).unwrap();
        assert_eq!(svid.spiffe_id(), &SpiffeId::new(WORKLOAD).unwrap());
        assert_eq!(svid.leaf(), &leaf);
        assert_eq!(svid.cert_chain(), std::slice::from_ref(&leaf));
        assert_eq!(svid.private_key().pkcs8_der(), key.as_slice());
        assert_eq!(svid.not_after(), at(2030, 2, 1));

        let verified = verify_chain(svid.cert_chain(), &bundle_of(&ca), now()).unwrap();
        assert_eq!(verified.spiffe_id(), svid.spiffe_id());
        assert_eq!(verified.into_spiffe_id(), SpiffeId::new(WORKLOAD).unwrap());
    }

    #[test]
    fn p384_and_ed25519_keys_are_supported() {
        let ca = root_ca("example.org");
        for alg in [&PKCS_ECDSA_P384_SHA384, &PKCS_ED25519] {
            let (leaf, key) = sign_leaf_with(&leaf_params(WORKLOAD), &ca, alg);
            let svid = parse(&[leaf], &key).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            verify_chain(svid.cert_chain(), &bundle_of(&ca), now()).unwrap();
        }
    }

    #[test]
    fn private_key_must_match_the_leaf() {
        let ca = root_ca("example.org");
        let (leaf, _) = sign_leaf_with(&leaf_params(WORKLOAD), &ca, &PKCS_ECDSA_P256_SHA256);
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(
            parse(std::slice::from_ref(&leaf), &other.serialize_der()).unwrap_err(),
            E::KeyMismatch
        );
        let other_type = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        assert_eq!(
            parse(std::slice::from_ref(&leaf), &other_type.serialize_der()).unwrap_err(),
            E::KeyMismatch
        );
        assert_eq!(
            parse(&[leaf], b"not a key").unwrap_err(),
            E::UnsupportedPrivateKey
        );
    }

    #[test]
    fn private_key_debug_is_redacted() {
        let ca = root_ca("example.org");
        let (leaf, key) = sign_leaf_with(&leaf_params(WORKLOAD), &ca, &PKCS_ECDSA_P256_SHA256);
        let svid = parse(&[leaf], &key).unwrap();
        let debug = format!("{svid:?}");
        assert!(debug.contains("PrivateKey([redacted])"), "{debug}");
        assert!(debug.contains(WORKLOAD), "{debug}");
        let hex: String = key.iter().take(8).map(|b| format!("{b:02x}")).collect();
        assert!(!debug.contains(&hex), "{debug}");
        assert!(!debug.contains(&format!("{:?}", &key[..8])), "{debug}");
        assert_eq!(
            PrivateKey::from(PrivatePkcs8KeyDer::from(key.clone())).pkcs8_der(),
            key.as_slice()
        );
    }

    #[test]
    fn parse_rejects_an_empty_or_malformed_chain() {
        let ca = root_ca("example.org");
        let (leaf, key) = sign_leaf_with(&leaf_params(WORKLOAD), &ca, &PKCS_ECDSA_P256_SHA256);
        assert_eq!(X509Svid::parse(&[], &key).unwrap_err(), E::EmptyChain);
        let with_garbage = [leaf.as_ref(), b"xx"].concat();
        assert_eq!(
            X509Svid::parse(&with_garbage, &key).unwrap_err(),
            E::Der(ConcatenatedDerError::UnexpectedTag {
                offset: leaf.len(),
                found: b'x',
            })
        );
        assert!(matches!(
            X509Svid::parse(&leaf[..leaf.len() - 3], &key).unwrap_err(),
            E::Der(ConcatenatedDerError::Truncated { offset: 0, .. })
        ));
        let not_a_cert = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(
            parse(std::slice::from_ref(&not_a_cert), &key).unwrap_err(),
            E::BadCertificate { index: 0, .. }
        ));
        assert!(matches!(
            parse(&[leaf, not_a_cert], &key).unwrap_err(),
            E::BadCertificate { index: 1, .. }
        ));
        assert_eq!(
            verify_chain(&[], &bundle_of(&ca), now()).unwrap_err(),
            E::EmptyChain
        );
    }

    // --- intermediates (XL-9, XC-*) ---------------------------------------------------------

    #[test]
    fn xl_9_intermediate_chain_parses_and_verifies() {
        let root = root_ca("example.org");
        let intermediate = intermediate_ca(&root, |_| {});
        let (leaf, key) = sign_leaf_with(
            &leaf_params(WORKLOAD),
            &intermediate,
            &PKCS_ECDSA_P256_SHA256,
        );
        let chain = [leaf, intermediate.der().clone()];
        let svid = parse(&chain, &key).unwrap();
        assert_eq!(svid.cert_chain().len(), 2);
        let verified = verify_chain(svid.cert_chain(), &bundle_of(&root), now()).unwrap();
        assert_eq!(verified.spiffe_id().as_str(), WORKLOAD);

        // XV-1: without the intermediate there is no path to the anchor.
        let err = verify_chain(&chain[..1], &bundle_of(&root), now()).unwrap_err();
        assert!(
            matches!(
                &err,
                E::Untrusted {
                    source: webpki::Error::UnknownIssuer,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn xc_7_ca_of_another_trust_domain_may_sign_the_intermediate() {
        let root = root_ca("upstream.org");
        let intermediate = intermediate_ca(&root, |_| {});
        let leaf = sign_leaf(&leaf_params(WORKLOAD), &intermediate);
        let bundle = X509Bundle::new(td("example.org"), vec![root.der().clone()]).unwrap();
        verify_chain(&[leaf, intermediate.der().clone()], &bundle, now()).unwrap();
    }

    #[test]
    fn signing_cert_rules_when_parsing() {
        let root = root_ca("example.org");
        let cases: Vec<(&str, Edit, E)> = vec![
            (
                "XC-1 intermediate with cA=false",
                |p| p.is_ca = IsCa::ExplicitNoCa,
                E::SigningCertNotCa { index: 1 },
            ),
            (
                "XC-1 intermediate without basic constraints",
                |p| p.is_ca = IsCa::NoCa,
                E::SigningCertNotCa { index: 1 },
            ),
            (
                "XC-1 intermediate without key usage",
                |p| p.key_usages = vec![],
                E::SigningCertKeyUsage {
                    index: 1,
                    problem: "key usage is missing",
                },
            ),
            (
                "XC-1 intermediate without keyCertSign",
                |p| p.key_usages = vec![KeyUsagePurpose::CrlSign],
                E::SigningCertKeyUsage {
                    index: 1,
                    problem: "key usage lacks keyCertSign",
                },
            ),
            (
                "XC-1 intermediate key usage not critical",
                |p| {
                    // keyCertSign alone: BIT STRING, 2 unused bits, 0x04.
                    p.key_usages = vec![];
                    p.custom_extensions =
                        vec![extension(&[2, 5, 29, 15], &[0x03, 0x02, 0x02, 0x04], false)];
                },
                E::SigningCertKeyUsage {
                    index: 1,
                    problem: "key usage is not critical",
                },
            ),
            (
                "XC-3 intermediate id with a path",
                |p| p.subject_alt_names = vec![uri("spiffe://example.org/ca")],
                E::SigningCertHasPath {
                    index: 1,
                    id: SpiffeId::new("spiffe://example.org/ca").unwrap(),
                },
            ),
        ];
        for (item, edit, want) in cases {
            let intermediate = intermediate_ca(&root, edit);
            let (leaf, key) = sign_leaf_with(
                &leaf_params(WORKLOAD),
                &intermediate,
                &PKCS_ECDSA_P256_SHA256,
            );
            let chain = [leaf, intermediate.der().clone()];
            assert_eq!(parse(&chain, &key).unwrap_err(), want, "{item}");
        }

        // XC-3: a signing certificate with no SPIFFE ID at all is fine.
        let intermediate = intermediate_ca(&root, |p| p.subject_alt_names = vec![]);
        let (leaf, key) = sign_leaf_with(
            &leaf_params(WORKLOAD),
            &intermediate,
            &PKCS_ECDSA_P256_SHA256,
        );
        parse(&[leaf, intermediate.der().clone()], &key).unwrap();
    }

    #[test]
    fn xc_1_non_ca_intermediate_fails_path_validation() {
        let root = root_ca("example.org");
        let intermediate = intermediate_ca(&root, |p| p.is_ca = IsCa::ExplicitNoCa);
        let leaf = sign_leaf(&leaf_params(WORKLOAD), &intermediate);
        let err = verify_chain(
            &[leaf, intermediate.der().clone()],
            &bundle_of(&root),
            now(),
        )
        .unwrap_err();
        assert!(
            matches!(
                &err,
                E::Untrusted {
                    source: webpki::Error::EndEntityUsedAsCa,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn xc_4_ca_certificate_presented_as_leaf_is_rejected() {
        let root = root_ca("example.org");
        let intermediate = intermediate_ca(&root, |_| {});
        let bundle = bundle_of(&root);
        // The root itself, and an intermediate with the root behind it.
        for chain in [
            vec![root.der().clone()],
            vec![intermediate.der().clone(), root.der().clone()],
            vec![intermediate.der().clone()],
        ] {
            assert_eq!(
                verify_chain(&chain, &bundle, now()).unwrap_err(),
                E::LeafIsCa
            );
        }
        // The SVID parser refuses a CA leaf too, before it looks at the key.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(
            parse(&[root.der().clone()], &key.serialize_der()).unwrap_err(),
            E::LeafIsCa
        );
    }

    // --- relying-party validation (XV-*) ------------------------------------------------------

    #[test]
    fn xv_1_rogue_ca_with_the_same_name_fails_the_signature_check() {
        let real = root_ca("example.org");
        let rogue = root_ca("example.org"); // same subject, different key
        let leaf = sign_leaf(&leaf_params(WORKLOAD), &rogue);
        let err = verify_chain(&[leaf], &bundle_of(&real), now()).unwrap_err();
        assert!(
            matches!(
                &err,
                E::Untrusted {
                    source: webpki::Error::InvalidSignatureForPublicKey,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn xv_1_expired_and_not_yet_valid() {
        let ca = root_ca("example.org");
        let leaf = sign_leaf(&leaf_params(WORKLOAD), &ca);
        let bundle = bundle_of(&ca);
        let chain = [leaf];
        verify_chain(&chain, &bundle, at(2030, 1, 1)).unwrap();
        verify_chain(&chain, &bundle, at(2030, 2, 1)).unwrap();

        let err = verify_chain(&chain, &bundle, at(2030, 2, 2)).unwrap_err();
        assert!(
            matches!(
                &err,
                E::Untrusted {
                    source: webpki::Error::CertExpired { .. },
                    ..
                }
            ),
            "{err}"
        );
        let err = verify_chain(&chain, &bundle, at(2029, 12, 31)).unwrap_err();
        assert!(
            matches!(
                &err,
                E::Untrusted {
                    source: webpki::Error::CertNotValidYet { .. },
                    ..
                }
            ),
            "{err}"
        );
        // The leaf is good but its intermediate has expired.
        let intermediate = intermediate_ca(&ca, |_| {});
        let mut p = leaf_params(WORKLOAD);
        p.not_after = date_time_ymd(2030, 3, 1);
        let long_leaf = sign_leaf(&p, &intermediate);
        let chain = [long_leaf, intermediate.der().clone()];
        let err = verify_chain(&chain, &bundle, at(2030, 2, 15)).unwrap_err();
        assert!(
            matches!(
                &err,
                E::Untrusted {
                    source: webpki::Error::CertExpired { .. },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn xv_1_expired_authority_authenticates_nothing() {
        // This root expires on 1 February 2030, before the leaf it signs.
        let ca = root_ca_with("example.org", |_| {});
        let mut p = leaf_params(WORKLOAD);
        p.not_after = date_time_ymd(2030, 3, 1);
        let leaf = sign_leaf(&p, &ca);
        let bundle = bundle_of(&ca);
        verify_chain(std::slice::from_ref(&leaf), &bundle, at(2030, 1, 31)).unwrap();
        // webpki alone would accept this (RFC 5280 ignores anchor dates); Sigil does not.
        assert_eq!(
            verify_chain(std::slice::from_ref(&leaf), &bundle, at(2030, 2, 15)).unwrap_err(),
            E::AuthoritiesNotValid {
                trust_domain: td("example.org")
            }
        );
        // Next to a valid authority (same name, other key), the expired one is not used: the
        // path is tried against the valid one only, and its signature check fails.
        let fresh = root_ca("example.org");
        let two = X509Bundle::new(
            td("example.org"),
            vec![ca.der().clone(), fresh.der().clone()],
        )
        .unwrap();
        let err = verify_chain(&[leaf], &two, at(2030, 2, 15)).unwrap_err();
        assert!(
            matches!(
                &err,
                E::Untrusted {
                    source: webpki::Error::InvalidSignatureForPublicKey,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn xv_1_b_9_only_the_bundle_of_the_leafs_trust_domain_is_used() {
        let ours = root_ca("example.org");
        let theirs = root_ca("other.org");
        let leaf = sign_leaf(&leaf_params(WORKLOAD), &ours);
        // Our CA is in the set, but filed under another trust domain: it must not be used.
        let set: X509BundleSet = [
            X509Bundle::new(td("example.org"), vec![theirs.der().clone()]).unwrap(),
            X509Bundle::new(td("other.org"), vec![ours.der().clone()]).unwrap(),
        ]
        .into_iter()
        .collect();
        let err = verify_chain(std::slice::from_ref(&leaf), &set, now()).unwrap_err();
        assert!(
            matches!(&err, E::Untrusted { trust_domain, .. } if trust_domain.name() == "example.org"),
            "{err}"
        );

        // A single bundle of another trust domain answers for nothing else.
        let wrong_td = X509Bundle::new(td("other.org"), vec![ours.der().clone()]).unwrap();
        assert_eq!(
            verify_chain(&[leaf], &wrong_td, now()).unwrap_err(),
            E::NoBundle {
                trust_domain: td("example.org")
            }
        );
    }

    #[test]
    fn xv_7_no_bundle_for_the_trust_domain() {
        let ca = root_ca("other.org");
        let leaf = sign_leaf(&leaf_params("spiffe://other.org/web"), &ca);
        let mut set = X509BundleSet::new();
        set.insert(bundle_of(&root_ca("example.org")));
        let err = verify_chain(&[leaf], &set, now()).unwrap_err();
        assert_eq!(
            err,
            E::NoBundle {
                trust_domain: td("other.org")
            }
        );
        assert_eq!(err.to_string(), "no bundle for trust domain other.org");
    }

    #[test]
    fn b_2_empty_bundle_rejects_everything() {
        let ca = root_ca("example.org");
        let leaf = sign_leaf(&leaf_params(WORKLOAD), &ca);
        let empty = X509Bundle::new(td("example.org"), vec![]).unwrap();
        assert_eq!(
            verify_chain(&[leaf], &empty, now()).unwrap_err(),
            E::EmptyBundle {
                trust_domain: td("example.org")
            }
        );
    }

    #[test]
    fn xv_8_authorizer() {
        let web = SpiffeId::new(WORKLOAD).unwrap();
        let db = SpiffeId::new("spiffe://example.org/ns/prod/db").unwrap();
        let foreign = SpiffeId::new("spiffe://other.org/ns/prod/web").unwrap();

        let cases: Vec<(&str, Authorizer, [bool; 3])> = vec![
            ("XV-8 any", Authorizer::any(), [true, true, true]),
            (
                "XV-8 exact id",
                Authorizer::exact(web.clone()),
                [true, false, false],
            ),
            (
                "XV-8 one of",
                Authorizer::one_of([web.clone(), foreign.clone()]),
                [true, false, true],
            ),
            (
                "XV-8 member of trust domain",
                Authorizer::member_of(td("example.org")),
                [true, true, false],
            ),
            (
                "XV-8 predicate",
                Authorizer::predicate(|id| id.path().ends_with("/db")),
                [false, true, false],
            ),
        ];
        for (item, authorizer, want) in cases {
            for (id, allowed) in [&web, &db, &foreign].into_iter().zip(want) {
                let got = authorizer.authorize(id);
                if allowed {
                    assert_eq!(got, Ok(()), "{item}: {id}");
                } else {
                    assert_eq!(got, Err(E::Unauthorized { id: id.clone() }), "{item}: {id}");
                }
            }
        }
        assert_eq!(
            format!("{:?}", Authorizer::predicate(|_| true)),
            "Authorizer::Predicate(..)"
        );

        // After authentication, as a relying party would do it.
        let ca = root_ca("example.org");
        let leaf = sign_leaf(&leaf_params(WORKLOAD), &ca);
        let verified = verify_chain(&[leaf], &bundle_of(&ca), now()).unwrap();
        Authorizer::exact(web)
            .authorize(verified.spiffe_id())
            .unwrap();
        assert!(
            Authorizer::exact(db)
                .authorize(verified.spiffe_id())
                .is_err()
        );
    }

    #[test]
    fn error_messages_tell_the_operator_what_is_wrong() {
        assert_eq!(
            E::MultipleUriSans { count: 2 }.to_string(),
            "leaf certificate has 2 uri sans; an x509-svid has exactly one"
        );
        assert_eq!(
            E::LeafCanSign {
                usage: "keyCertSign"
            }
            .to_string(),
            "leaf certificate key usage has keyCertSign, which only signing certificates may have"
        );
        let err = E::BadSpiffeId {
            uri: "https://x/y".into(),
            source: SpiffeIdError::WrongScheme,
        };
        assert_eq!(
            err.to_string(),
            "leaf certificate uri san \"https://x/y\" is not a valid spiffe id: scheme is missing or invalid"
        );
    }

    /// Cross-checks a good chain with `openssl verify -x509_strict`, when openssl is installed.
    #[test]
    fn openssl_accepts_a_good_chain() {
        use std::process::Command;

        if Command::new("openssl").arg("version").output().is_err() {
            println!("openssl not found on PATH; skipping the openssl cross-check");
            return;
        }
        let root = root_ca("example.org");
        let intermediate = intermediate_ca(&root, |_| {});
        let leaf = sign_leaf(&leaf_params(WORKLOAD), &intermediate);
        let pem = |cert: &CertificateDer<'static>| {
            X509Bundle::new(td("example.org"), vec![cert.clone()])
                .unwrap()
                .to_pem()
        };
        let dir = std::env::temp_dir().join(format!("sigil-x509-svid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca_pem, int_pem, leaf_pem) = (
            dir.join("ca.pem"),
            dir.join("int.pem"),
            dir.join("leaf.pem"),
        );
        std::fs::write(&ca_pem, pem(root.der())).unwrap();
        std::fs::write(&int_pem, pem(intermediate.der())).unwrap();
        std::fs::write(&leaf_pem, pem(&leaf)).unwrap();
        let secs = now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let out = Command::new("openssl")
            .args(["verify", "-x509_strict", "-attime", &secs.to_string()])
            .arg("-CAfile")
            .arg(&ca_pem)
            .arg("-untrusted")
            .arg(&int_pem)
            .arg(&leaf_pem)
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            out.status.success(),
            "openssl verify failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
