//! [`X509SvidError`]: why a chain is not a valid X509-SVID, does not verify, or is not authorized.

use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
use crate::x509_bundle::ConcatenatedDerError;

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
