//! Tests of the `x509_svid` module: a small certificate factory, the leaf profile one case per
//! spec item, parsing, chain verification and authorization.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use super::*;
use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
use crate::x509_bundle::{ConcatenatedDerError, X509Bundle, X509BundleSet};
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
    0x30, 0x14, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01, 0x06, 0x08, 0x2b, 0x06,
    0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
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
                p.custom_extensions = vec![extension(&[2, 5, 29, 15], KU_DIGITAL_SIGNATURE, false)];
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
                p.custom_extensions = vec![extension(&[2, 5, 29, 17], &san_der(WORKLOAD), false)];
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
        let verified =
            verify_chain(&[leaf], &bundle, now()).unwrap_or_else(|e| panic!("{item}: verify: {e}"));
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
