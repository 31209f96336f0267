//! Certificate templates, built field by field, and the CSR and public key readers.
//!
//! rcgen's defaults are wrong for SPIFFE (a CN of "rcgen self signed cert", 1975 to 4096
//! validity, a serial derived from the public key, no basicConstraints with `IsCa::NoCa`), so
//! every field is set here. A CSR only proves possession of a key: its subject, SANs and
//! extensions are never read, so rcgen's `CertificateSigningRequestParams::from_der` (which
//! copies them, and refuses extensions it does not know) is not used.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
    SerialNumber, SignatureAlgorithm,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use sigil_core::lifetime::NOT_BEFORE_BACKDATE;
use sigil_core::{SpiffeId, TrustDomain};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::CaError;

/// The largest CSR the CA parses, in bytes. A P-256 CSR is about 250 bytes; the limit bounds
/// the work a hostile one can cause.
pub(crate) const MAX_CSR_LEN: usize = 8 * 1024;

/// The organization in every authority's subject.
const ORGANIZATION: &str = "Sigil";

/// X.520's upper bound for a common name (RFC 5280 appendix A, `ub-common-name`).
const MAX_COMMON_NAME_LEN: usize = 64;

/// The `serialNumber` attribute type of a distinguished name (X.520, 2.5.4.5).
const OID_DN_SERIAL_NUMBER: [u64; 4] = [2, 5, 4, 5];

/// A P-256 public key, as an uncompressed SEC 1 point: the subject of a certificate to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct P256PublicKey(Vec<u8>);

// === impl P256PublicKey ===

impl P256PublicKey {
    /// The key of a PKCS#10 CSR, after checking that the CSR's signature verifies with it
    /// (proof of possession) and that it is a P-256 key. Nothing else in the CSR is read.
    pub(crate) fn from_csr(csr_der: &[u8]) -> Result<Self, CaError> {
        if csr_der.len() > MAX_CSR_LEN {
            return Err(CaError::CsrTooLarge {
                len: csr_der.len(),
                max: MAX_CSR_LEN,
            });
        }
        let csr = match X509CertificationRequest::from_der(csr_der) {
            Ok(([], csr)) => csr,
            Ok((rest, _)) => {
                return Err(CaError::MalformedCsr {
                    reason: format!("{} bytes follow the csr", rest.len()),
                });
            }
            Err(e) => {
                return Err(CaError::MalformedCsr {
                    reason: e.to_string(),
                });
            }
        };
        // The key type first: a clear refusal, and no signature check with a key we refuse.
        let key = Self::from_parsed_spki(&csr.certification_request_info.subject_pki)?;
        csr.verify_signature()
            .map_err(|_| CaError::CsrSignatureInvalid)?;
        Ok(key)
    }

    /// A P-256 key from a DER SubjectPublicKeyInfo.
    pub(crate) fn from_spki_der(spki_der: &[u8]) -> Result<Self, CaError> {
        match SubjectPublicKeyInfo::from_der(spki_der) {
            Ok(([], spki)) => Self::from_parsed_spki(&spki),
            Ok((rest, _)) => Err(CaError::MalformedPublicKey {
                reason: format!("{} bytes follow the public key", rest.len()),
            }),
            Err(e) => Err(CaError::MalformedPublicKey {
                reason: e.to_string(),
            }),
        }
    }

    fn from_parsed_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, CaError> {
        let algorithm = &spki.algorithm.algorithm;
        let unsupported = |algorithm: String| Err(CaError::UnsupportedKey { algorithm });
        if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(curve) if curve == OID_EC_P256 => {}
                Some(curve) if curve == OID_NIST_EC_P384 => {
                    return unsupported("ecdsa p-384".into());
                }
                Some(curve) if curve == OID_NIST_EC_P521 => {
                    return unsupported("ecdsa p-521".into());
                }
                Some(curve) => return unsupported(format!("ecdsa on curve {curve}")),
                None => return unsupported("ecdsa without a named curve".into()),
            }
        } else if *algorithm == OID_SIG_ED25519 {
            return unsupported("ed25519".into());
        } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
            return unsupported("rsa".into());
        } else {
            return unsupported(format!("key algorithm {algorithm}"));
        }
        let point = spki.subject_public_key.data.as_ref();
        if point.len() != 65 || point.first() != Some(&0x04) {
            return Err(CaError::MalformedPublicKey {
                reason: "not an uncompressed p-256 point".into(),
            });
        }
        Ok(Self(point.to_vec()))
    }
}

impl PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// The template of a self-signed authority for `trust_domain`: subject O=Sigil, CN=<trust
/// domain> (when it fits) and serialNumber=<serial in hex>; URI SAN `spiffe://<trust domain>`;
/// CA=true; Key Usage keyCertSign and cRLSign (critical); a Subject Key Identifier; valid from
/// `issued_at - NOT_BEFORE_BACKDATE` to `not_after`.
pub(crate) fn authority_params(
    trust_domain: &TrustDomain,
    serial: &[u8],
    issued_at: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, ORGANIZATION);
    if trust_domain.name().len() <= MAX_COMMON_NAME_LEN {
        subject.push(DnType::CommonName, trust_domain.name());
    }
    let serial_hex = super::hex(serial);
    subject.push(
        DnType::CustomDnType(OID_DN_SERIAL_NUMBER.to_vec()),
        DnValue::PrintableString(serial_hex.try_into().map_err(certificate_error)?),
    );

    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    params.subject_alt_names = vec![SanType::URI(
        trust_domain
            .id_string()
            .try_into()
            .map_err(certificate_error)?,
    )];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.extended_key_usages = Vec::new();
    params.use_authority_key_identifier_extension = false;
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.not_before = backdated(issued_at)?.into();
    params.not_after = not_after.into();
    Ok(params)
}

/// The template of an intermediate X.509 authority under an upstream CA: the root's template
/// ([`authority_params`]) with pathLen 0 (it signs leaves only) and an Authority Key
/// Identifier naming the upstream CA's key.
pub(crate) fn intermediate_params(
    trust_domain: &TrustDomain,
    serial: &[u8],
    issued_at: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = authority_params(trust_domain, serial, issued_at, not_after)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// The template of an X509-SVID leaf: empty subject (so the SAN extension is critical),
/// exactly one URI SAN (the SPIFFE ID) then the DNS SANs, CA=false, Key Usage
/// digitalSignature (critical), EKU serverAuth and clientAuth, an Authority Key Identifier,
/// the given serial and validity. Times must be whole seconds.
pub(crate) fn leaf_params(
    spiffe_id: &SpiffeId,
    dns_names: &[String],
    serial: &[u8],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut sans = Vec::with_capacity(1 + dns_names.len());
    sans.push(SanType::URI(
        spiffe_id.as_str().try_into().map_err(certificate_error)?,
    ));
    for name in dns_names {
        check_dns_name(name)?;
        sans.push(SanType::DnsName(name.as_str().try_into().map_err(
            |_| CaError::InvalidDnsName {
                name: name.clone(),
                reason: "not ascii",
            },
        )?));
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}

/// A random 128-bit serial number, positive (top bit clear) and never zero.
pub(crate) fn random_serial() -> Result<[u8; 16], CaError> {
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| CaError::Random)?;
    serial[0] &= 0x7f;
    if serial[0] == 0 {
        // Keep 16 significant bytes, so the DER encoding has a fixed length.
        serial[0] = 0x01;
    }
    Ok(serial)
}

/// `t` rounded down to a whole second: X.509 times have no fractions, and the journal and
/// JWTs count in seconds.
pub(crate) fn floor_to_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(since) => UNIX_EPOCH + Duration::from_secs(since.as_secs()),
        Err(_) => t,
    }
}

/// `issued_at - NOT_BEFORE_BACKDATE`.
fn backdated(issued_at: SystemTime) -> Result<SystemTime, CaError> {
    issued_at
        .checked_sub(NOT_BEFORE_BACKDATE)
        .ok_or(CaError::Lifetime(
            sigil_core::lifetime::LifetimeError::OutOfRange,
        ))
}

/// Checks a DNS SAN by the server's one rule ([`crate::policy::check_dns_name`]).
fn check_dns_name(name: &str) -> Result<(), CaError> {
    crate::policy::check_dns_name(name).map_err(|e| CaError::InvalidDnsName {
        name: e.name,
        reason: e.reason,
    })
}

fn certificate_error(e: impl std::fmt::Display) -> CaError {
    CaError::Certificate {
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        CertificateSigningRequestParams, KeyPair, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
        SignatureAlgorithm,
    };

    use super::*;

    fn csr_for(alg: &'static SignatureAlgorithm) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn p256_csrs_give_their_key() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let parsed = P256PublicKey::from_csr(csr.der()).unwrap();
        assert_eq!(parsed.der_bytes(), key.public_key_raw());
        // Same answer as rcgen's own (signature-checking) parser.
        let rcgen_view = CertificateSigningRequestParams::from_der(csr.der()).unwrap();
        assert_eq!(rcgen_view.public_key.der_bytes(), parsed.der_bytes());
        // And from the SPKI.
        let spki = P256PublicKey::from_spki_der(&key.subject_public_key_info()).unwrap();
        assert_eq!(spki, parsed);
    }

    #[test]
    fn other_key_types_are_refused_by_name() {
        for (alg, name) in [
            (&PKCS_ECDSA_P384_SHA384, "ecdsa p-384"),
            (&PKCS_ED25519, "ed25519"),
        ] {
            let err = P256PublicKey::from_csr(&csr_for(alg)).unwrap_err();
            assert!(
                matches!(&err, CaError::UnsupportedKey { algorithm } if algorithm == name),
                "{err}"
            );
            assert_eq!(
                err.to_string(),
                format!("the key is {name}; only ecdsa p-256 keys are accepted")
            );
        }
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            P256PublicKey::from_spki_der(&p384.subject_public_key_info()).unwrap_err(),
            CaError::UnsupportedKey { .. }
        ));
    }

    #[test]
    fn malformed_csrs_are_errors_not_panics() {
        let good = csr_for(&PKCS_ECDSA_P256_SHA256);
        let mut cases: Vec<Vec<u8>> = vec![vec![], b"garbage".to_vec(), vec![0x30], vec![0; 40]];
        cases.extend((1..good.len()).step_by(7).map(|n| good[..n].to_vec()));
        for csr in cases {
            let err = P256PublicKey::from_csr(&csr).unwrap_err();
            assert!(matches!(err, CaError::MalformedCsr { .. }), "{err}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(
            P256PublicKey::from_csr(&trailing).unwrap_err(),
            CaError::MalformedCsr { .. }
        ));
        let huge = vec![0x30; MAX_CSR_LEN + 1];
        assert!(matches!(
            P256PublicKey::from_csr(&huge).unwrap_err(),
            CaError::CsrTooLarge { .. }
        ));
    }

    #[test]
    fn a_csr_with_a_bad_signature_is_refused() {
        let mut csr = csr_for(&PKCS_ECDSA_P256_SHA256);
        // Flip a bit in the last byte of the signature (the end of the CSR).
        let last = csr.len() - 1;
        csr[last] ^= 0x01;
        let err = P256PublicKey::from_csr(&csr).unwrap_err();
        assert!(matches!(err, CaError::CsrSignatureInvalid), "{err}");
    }

    #[test]
    fn dns_names() {
        for good in ["example.org", "*.example.org", "a-b.c", "localhost", "x1"] {
            check_dns_name(good).unwrap();
        }
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "-a.b",
            "a-.b",
            "a b",
            "a.*.b",
            "é.org",
            "a_b",
            &"a".repeat(64),
        ] {
            assert!(check_dns_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serials_are_positive_16_byte_and_distinct() {
        let a = random_serial().unwrap();
        let b = random_serial().unwrap();
        assert_ne!(a, b);
        for s in [a, b] {
            assert!(s[0] & 0x80 == 0 && s[0] != 0);
        }
    }

    #[test]
    fn floor_to_second_drops_fractions() {
        let t = UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(floor_to_second(t), UNIX_EPOCH + Duration::from_secs(1));
    }
}
