//! X.509 bundles: a trust domain's X.509 authorities, kept beside the trust domain's name.
//!
//! A bundle does not name its trust domain, so Sigil always stores it as a `<td, bundle>` pair
//! (B-9) and never merges the bundles of different trust domains (B-10): an [`X509BundleSet`]
//! holds at most one [`X509Bundle`] per trust domain, and a relying party picks the bundle of the
//! peer's own trust domain through [`X509BundleSource`].
//!
//! An empty bundle is valid and means the trust domain revoked its keys: nothing verifies against
//! it (B-2).
//!
//! Wire forms: the Workload API sends a bundle as DER certificates concatenated back to back with
//! no separators ([`X509Bundle::from_der`], [`X509Bundle::to_der`]); files use PEM
//! ([`X509Bundle::from_pem`], [`X509Bundle::to_pem`]).

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::spiffe_id::TrustDomain;

/// Why bytes could not be split into DER certificates concatenated back to back.
///
/// Offsets count bytes from the start of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConcatenatedDerError {
    /// A certificate must start with a DER SEQUENCE tag (0x30); something else was found, which
    /// usually means PEM was given where DER was expected, or garbage follows the last
    /// certificate.
    #[error(
        "expected a der certificate (sequence tag 0x30) at byte offset {offset}, found 0x{found:02x}"
    )]
    UnexpectedTag {
        /// Where the unexpected byte is.
        offset: usize,
        /// The byte found there.
        found: u8,
    },
    /// The input ends inside a certificate's tag and length header.
    #[error("der certificate at byte offset {offset} is truncated inside its header")]
    TruncatedHeader {
        /// Where the certificate starts.
        offset: usize,
    },
    /// The certificate's header declares more bytes than the input has left.
    #[error(
        "der certificate at byte offset {offset} is truncated: it declares {declared} bytes but only {available} remain"
    )]
    Truncated {
        /// Where the certificate starts.
        offset: usize,
        /// The whole certificate's length (header included) according to its header.
        declared: usize,
        /// The bytes left in the input from `offset`.
        available: usize,
    },
    /// The length field is indefinite (not allowed in DER) or longer than four bytes.
    #[error("der certificate at byte offset {offset} has an invalid length encoding")]
    BadLength {
        /// Where the certificate starts.
        offset: usize,
    },
}

/// Why an [`X509Bundle`] could not be built or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509BundleError {
    /// The DER input could not be split into certificates (truncated input or trailing garbage).
    #[error("x509 bundle: {0}")]
    Der(#[from] ConcatenatedDerError),
    /// An authority is not a well-formed X.509 certificate.
    #[error("x509 bundle authority {index} is not a valid x509 certificate: {reason}")]
    BadAuthority {
        /// The authority's position in the bundle, from 0.
        index: usize,
        /// What the certificate parser reported.
        reason: String,
    },
    /// The PEM input is malformed (bad base64, a section with no end marker, ...).
    #[error("x509 bundle pem is malformed: {reason}")]
    Pem {
        /// What the PEM parser reported.
        reason: String,
    },
    /// The PEM input holds no `CERTIFICATE` section, which usually means the wrong file was
    /// given. (The DER form may be empty; a PEM file may not.)
    #[error("x509 bundle pem holds no certificate")]
    NoPemCertificates,
}

/// The X.509 authorities (trust anchors) of one trust domain.
///
/// Every authority parses as an X.509 certificate. The list may be empty: the trust domain then
/// revoked its keys and no X509-SVID from it verifies (B-2).
#[derive(Clone, PartialEq, Eq)]
pub struct X509Bundle {
    trust_domain: TrustDomain,
    authorities: Vec<CertificateDer<'static>>,
}

/// Something that can give the X.509 bundle of a trust domain.
///
/// Relying parties ask only for the bundle of the peer's own trust domain (B-9, XV-1); `None`
/// means the peer is untrusted (XV-7).
pub trait X509BundleSource {
    /// The bundle for `trust_domain`, or `None` when there is none.
    fn x509_bundle_for(&self, trust_domain: &TrustDomain) -> Option<&X509Bundle>;
}

/// X.509 bundles keyed by trust domain: at most one bundle per trust domain, never merged
/// (B-9, B-10).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct X509BundleSet {
    bundles: BTreeMap<TrustDomain, X509Bundle>,
}

// === impl X509Bundle ===

impl X509Bundle {
    /// Builds a bundle, checking that every authority parses as an X.509 certificate.
    ///
    /// An empty `authorities` is allowed and means the trust domain revoked its keys (B-2).
    ///
    /// # Errors
    ///
    /// [`X509BundleError::BadAuthority`] names the first authority that does not parse.
    pub fn new(
        trust_domain: TrustDomain,
        authorities: Vec<CertificateDer<'static>>,
    ) -> Result<Self, X509BundleError> {
        for (index, authority) in authorities.iter().enumerate() {
            check_certificate(authority)
                .map_err(|reason| X509BundleError::BadAuthority { index, reason })?;
        }
        Ok(Self {
            trust_domain,
            authorities,
        })
    }

    /// Decodes the Workload API wire form: DER certificates concatenated back to back with no
    /// separators. Empty input gives an empty bundle.
    ///
    /// # Errors
    ///
    /// [`X509BundleError::Der`] for truncated input or trailing garbage (naming the byte offset),
    /// [`X509BundleError::BadAuthority`] for a certificate that does not parse.
    pub fn from_der(trust_domain: TrustDomain, der: &[u8]) -> Result<Self, X509BundleError> {
        Self::new(trust_domain, split_concatenated_der(der)?)
    }

    /// Decodes every `CERTIFICATE` section of PEM input; other sections (keys, CRLs) are skipped.
    ///
    /// # Errors
    ///
    /// [`X509BundleError::Pem`] for malformed PEM, [`X509BundleError::NoPemCertificates`] when
    /// there is no certificate, [`X509BundleError::BadAuthority`] for a certificate that does not
    /// parse.
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, X509BundleError> {
        let authorities = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| X509BundleError::Pem {
                reason: e.to_string(),
            })?;
        if authorities.is_empty() {
            return Err(X509BundleError::NoPemCertificates);
        }
        Self::new(trust_domain, authorities)
    }

    /// The trust domain whose authorities these are.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The authorities, in the order given. Empty when the trust domain revoked its keys.
    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    /// True when there is no authority, so nothing verifies against this bundle (B-2).
    pub fn is_empty(&self) -> bool {
        self.authorities.is_empty()
    }

    /// Encodes the Workload API wire form: the authorities' DER, concatenated back to back.
    pub fn to_der(&self) -> Vec<u8> {
        concatenate_der(&self.authorities)
    }

    /// Encodes the authorities as PEM `CERTIFICATE` sections, 64 base64 characters a line.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        for authority in &self.authorities {
            let b64 = base64::engine::general_purpose::STANDARD.encode(authority.as_ref());
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            // Base64 output is ASCII, so splitting its bytes into chunks keeps valid UTF-8.
            for line in b64.as_bytes().chunks(64) {
                out.push_str(&String::from_utf8_lossy(line));
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out
    }
}

impl X509BundleSource for X509Bundle {
    /// This bundle when `trust_domain` is its own, otherwise `None` (B-9).
    fn x509_bundle_for(&self, trust_domain: &TrustDomain) -> Option<&X509Bundle> {
        (self.trust_domain == *trust_domain).then_some(self)
    }
}

impl fmt::Debug for X509Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Bundle")
            .field("trust_domain", &self.trust_domain)
            .field("authorities", &self.authorities.len())
            .finish()
    }
}

// === impl X509BundleSet ===

impl X509BundleSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bundle`, replacing (not merging with) any bundle of the same trust domain (B-10).
    /// Returns the bundle it replaced.
    pub fn insert(&mut self, bundle: X509Bundle) -> Option<X509Bundle> {
        self.bundles.insert(bundle.trust_domain.clone(), bundle)
    }

    /// Removes and returns the bundle of `trust_domain`.
    pub fn remove(&mut self, trust_domain: &TrustDomain) -> Option<X509Bundle> {
        self.bundles.remove(trust_domain)
    }

    /// The bundle of `trust_domain`.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&X509Bundle> {
        self.bundles.get(trust_domain)
    }

    /// The bundles, ordered by trust domain name.
    pub fn iter(&self) -> impl Iterator<Item = &X509Bundle> {
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

impl X509BundleSource for X509BundleSet {
    fn x509_bundle_for(&self, trust_domain: &TrustDomain) -> Option<&X509Bundle> {
        self.get(trust_domain)
    }
}

impl FromIterator<X509Bundle> for X509BundleSet {
    /// Collects bundles; a later bundle of the same trust domain replaces an earlier one.
    fn from_iter<I: IntoIterator<Item = X509Bundle>>(iter: I) -> Self {
        let mut set = Self::new();
        for bundle in iter {
            set.insert(bundle);
        }
        set
    }
}

// === DER helpers ===

/// Splits DER certificates concatenated back to back, checking only the outer SEQUENCE framing
/// (each certificate is parsed later by its user).
pub(crate) fn split_concatenated_der(
    der: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ConcatenatedDerError> {
    let mut certs = Vec::new();
    let mut offset = 0;
    while offset < der.len() {
        let len = der_element_len(der, offset)?;
        let end = offset + len; // der_element_len checked that this is within `der`
        certs.push(CertificateDer::from(der[offset..end].to_vec()));
        offset = end;
    }
    Ok(certs)
}

/// Concatenates certificates' DER back to back.
pub(crate) fn concatenate_der(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(certs.iter().map(|c| c.len()).sum());
    for cert in certs {
        out.extend_from_slice(cert.as_ref());
    }
    out
}

/// Checks that `der` is exactly one well-formed X.509 certificate, with nothing after it.
pub(crate) fn check_certificate(der: &[u8]) -> Result<(), String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], _)) => Ok(()),
        Ok((rest, _)) => Err(format!("{} bytes follow the certificate", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// The total length (header plus contents) of the DER SEQUENCE starting at `offset`, checked to
/// fit in `der`.
fn der_element_len(der: &[u8], offset: usize) -> Result<usize, ConcatenatedDerError> {
    let rest = &der[offset..];
    let (&tag, rest) = rest
        .split_first()
        .ok_or(ConcatenatedDerError::TruncatedHeader { offset })?;
    if tag != 0x30 {
        return Err(ConcatenatedDerError::UnexpectedTag { offset, found: tag });
    }
    let (&first, rest) = rest
        .split_first()
        .ok_or(ConcatenatedDerError::TruncatedHeader { offset })?;
    let (header_len, content_len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        // 0x80 is the indefinite form, which DER forbids; no certificate needs more than 4 bytes.
        if n == 0 || n > 4 {
            return Err(ConcatenatedDerError::BadLength { offset });
        }
        let bytes = rest
            .get(..n)
            .ok_or(ConcatenatedDerError::TruncatedHeader { offset })?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (2 + n, len)
    };
    let available = der.len() - offset;
    let declared = header_len
        .checked_add(content_len)
        .ok_or(ConcatenatedDerError::BadLength { offset })?;
    if declared > available {
        return Err(ConcatenatedDerError::Truncated {
            offset,
            declared,
            available,
        });
    }
    Ok(declared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
        KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
    };

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn ca_cert(name: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{name}").as_str().try_into().unwrap(),
        )];
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn new_checks_every_authority() {
        let good = ca_cert("example.org");
        let bundle = X509Bundle::new(td("example.org"), vec![good.clone()]).unwrap();
        assert_eq!(bundle.authorities(), std::slice::from_ref(&good));
        assert_eq!(bundle.trust_domain(), &td("example.org"));

        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let err = X509Bundle::new(td("example.org"), vec![good, junk]).unwrap_err();
        assert!(
            matches!(err, X509BundleError::BadAuthority { index: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn b_2_empty_bundle_is_allowed() {
        let bundle = X509Bundle::new(td("example.org"), vec![]).unwrap();
        assert!(bundle.is_empty());
        assert_eq!(bundle.to_der(), Vec::<u8>::new());
        let decoded = X509Bundle::from_der(td("example.org"), &[]).unwrap();
        assert_eq!(decoded, bundle);
    }

    #[test]
    fn der_round_trip() {
        let a = ca_cert("example.org");
        let b = ca_cert("example.org");
        let bundle = X509Bundle::new(td("example.org"), vec![a.clone(), b.clone()]).unwrap();
        let der = bundle.to_der();
        assert_eq!(der.len(), a.len() + b.len());
        let decoded = X509Bundle::from_der(td("example.org"), &der).unwrap();
        assert_eq!(decoded, bundle);
        assert_eq!(decoded.authorities(), [a, b]);
    }

    #[test]
    fn der_truncated_and_trailing_garbage_name_the_offset() {
        let a = ca_cert("example.org");
        let b = ca_cert("example.org");
        let der = concatenate_der(&[a.clone(), b.clone()]);
        let second = a.len();

        let cases: Vec<(&str, Vec<u8>, ConcatenatedDerError)> = vec![
            (
                "truncated second certificate",
                der[..der.len() - 1].to_vec(),
                ConcatenatedDerError::Truncated {
                    offset: second,
                    declared: b.len(),
                    available: b.len() - 1,
                },
            ),
            (
                "truncated inside the header",
                der[..second + 1].to_vec(),
                ConcatenatedDerError::TruncatedHeader { offset: second },
            ),
            (
                "trailing garbage",
                [der.as_slice(), b"junk"].concat(),
                ConcatenatedDerError::UnexpectedTag {
                    offset: der.len(),
                    found: b'j',
                },
            ),
            (
                "trailing zero byte",
                [a.as_ref(), &[0u8]].concat(),
                ConcatenatedDerError::UnexpectedTag {
                    offset: second,
                    found: 0,
                },
            ),
            (
                "indefinite length",
                vec![0x30, 0x80, 0x00, 0x00],
                ConcatenatedDerError::BadLength { offset: 0 },
            ),
            (
                "pem given as der",
                b"-----BEGIN CERTIFICATE-----".to_vec(),
                ConcatenatedDerError::UnexpectedTag {
                    offset: 0,
                    found: b'-',
                },
            ),
        ];
        for (name, input, want) in cases {
            let err = X509Bundle::from_der(td("example.org"), &input).unwrap_err();
            assert_eq!(err, X509BundleError::Der(want.clone()), "{name}");
            assert!(
                err.to_string().contains("byte offset"),
                "{name}: message names the offset: {err}"
            );
        }
    }

    #[test]
    fn der_well_framed_but_not_a_certificate() {
        let err =
            X509Bundle::from_der(td("example.org"), &[0x30, 0x03, 0x02, 0x01, 0x00]).unwrap_err();
        assert!(
            matches!(err, X509BundleError::BadAuthority { index: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn pem_round_trip_and_errors() {
        let a = ca_cert("example.org");
        let b = ca_cert("example.org");
        let bundle = X509Bundle::new(td("example.org"), vec![a, b]).unwrap();
        let pem = bundle.to_pem();
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(pem.lines().all(|l| l.len() <= 64), "lines wrap at 64");
        let decoded = X509Bundle::from_pem(td("example.org"), pem.as_bytes()).unwrap();
        assert_eq!(decoded, bundle);

        assert_eq!(
            X509Bundle::from_pem(td("example.org"), b"").unwrap_err(),
            X509BundleError::NoPemCertificates
        );
        let unterminated = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(matches!(
            X509Bundle::from_pem(td("example.org"), unterminated.as_bytes()).unwrap_err(),
            X509BundleError::Pem { .. }
        ));
    }

    #[test]
    fn b_9_bundle_answers_only_for_its_own_trust_domain() {
        let bundle = X509Bundle::new(td("example.org"), vec![ca_cert("example.org")]).unwrap();
        assert!(bundle.x509_bundle_for(&td("example.org")).is_some());
        assert!(bundle.x509_bundle_for(&td("other.org")).is_none());
    }

    #[test]
    fn b_10_set_keeps_one_bundle_per_trust_domain_never_merged() {
        let first = X509Bundle::new(td("example.org"), vec![ca_cert("example.org")]).unwrap();
        let second = X509Bundle::new(td("example.org"), vec![ca_cert("example.org")]).unwrap();
        let other = X509Bundle::new(td("other.org"), vec![ca_cert("other.org")]).unwrap();

        let mut set = X509BundleSet::new();
        assert!(set.insert(first.clone()).is_none());
        assert!(set.insert(other.clone()).is_none());
        assert_eq!(set.insert(second.clone()), Some(first));
        assert_eq!(set.len(), 2);
        // Replaced, not merged: only the second bundle's single authority remains.
        assert_eq!(set.x509_bundle_for(&td("example.org")), Some(&second));
        assert_eq!(set.x509_bundle_for(&td("other.org")), Some(&other));
        assert!(set.x509_bundle_for(&td("third.org")).is_none());
        assert_eq!(
            set.iter()
                .map(|b| b.trust_domain().name())
                .collect::<Vec<_>>(),
            ["example.org", "other.org"]
        );
        assert_eq!(set.remove(&td("other.org")), Some(other));
        assert!(!set.is_empty());
    }

    #[test]
    fn debug_is_short() {
        let bundle = X509Bundle::new(td("example.org"), vec![ca_cert("example.org")]).unwrap();
        assert_eq!(
            format!("{bundle:?}"),
            "X509Bundle { trust_domain: TrustDomain(\"example.org\"), authorities: 1 }"
        );
    }
}
