//! Signing: every credential kind, what a CSR may and may not carry, lifetimes, ID checks and
//! JWT-SVIDs.

use rcgen::{
    BasicConstraints, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PublicKeyData as _, SanType,
};
use sigil_core::JwtSvidError;
use sigil_core::lifetime::LifetimeError;
use sigil_core::x509_svid::{X509Svid, check_leaf_certificate, verify_chain};

use super::*;

#[tokio::test]
async fn every_credential_kind_passes_openssl_and_verify_chain() {
    let fx = Fixture::new();
    let ca = fx.ca(secs(3600), t(0)).await.unwrap();
    let bundle = ca.x509_bundle();
    let root = bundle.authorities()[0].as_ref().to_vec();
    let now = t(100);

    let agent = ca
        .sign_agent_x509_svid(&id(AGENT), &csr(), secs(600), now)
        .unwrap();
    let workload_svid = ca
        .sign_workload_x509_svid(&workload(300), &csr(), now)
        .unwrap();
    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let server = ca
        .sign_server_x509_svid(&server_key.subject_public_key_info(), secs(600), now)
        .unwrap();
    assert_eq!(server.spiffe_id(), &id("spiffe://example.org/sigil/server"));
    assert_eq!(ca.server_id(), id("spiffe://example.org/sigil/server"));

    for (svid, want, dns) in [
        (&agent, AGENT, &[][..]),
        (
            &workload_svid,
            WORKLOAD,
            &["web.example.org", "*.web.example.org"][..],
        ),
        (&server, "spiffe://example.org/sigil/server", &[][..]),
    ] {
        let leaf = svid.certificate();
        for extra in [
            &[][..],
            &["-purpose", "sslclient"],
            &["-purpose", "sslserver"],
        ] {
            openssl_verify(&bundle, leaf, now, extra)
                .unwrap_or_else(|e| panic!("{want} {extra:?}: {e}"));
        }
        let verified = verify_chain(std::slice::from_ref(leaf), &bundle, now).unwrap();
        assert_eq!(verified.spiffe_id(), &id(want));
        assert_eq!(check_leaf_certificate(leaf).unwrap(), id(want));
        assert_leaf_profile(leaf, want, dns, &root);
        // NotBefore backdated 10 s; the returned times are the certificate's.
        let cert = parse(leaf);
        assert_eq!(cert.validity().not_before.timestamp(), unix(now) - 10);
        assert_eq!(
            cert.validity().not_before.timestamp(),
            unix(svid.not_before())
        );
        assert_eq!(
            cert.validity().not_after.timestamp(),
            unix(svid.not_after())
        );
        assert_eq!(cert.raw_serial(), svid.serial());
        assert_eq!(svid.serial_hex(), hex(svid.serial()));
        // Not yet valid before the backdate, expired after NotAfter.
        assert!(openssl_verify(&bundle, leaf, now - secs(11), &[]).is_err());
        assert!(openssl_verify(&bundle, leaf, svid.not_after() + secs(1), &[]).is_err());
    }
    assert_eq!(agent.not_after(), now + secs(600));
    assert_eq!(workload_svid.not_after(), now + secs(300));

    // A full workload SVID (certificate + its key) parses with sigil-core.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let issued = ca
        .sign_workload_x509_svid(&workload(60), csr.der(), now)
        .unwrap();
    let svid = X509Svid::parse(issued.certificate(), &key.serialize_der()).unwrap();
    assert_eq!(svid.spiffe_id(), &id(WORKLOAD));
    // The CA's own root is not a leaf: the post-signing check would catch it.
    assert!(check_leaf_certificate(&CertificateDer::from(root)).is_err());
}

#[tokio::test]
async fn the_identity_and_extensions_of_a_csr_are_ignored() {
    let fx = Fixture::new();
    let ca = fx.ca(secs(3600), t(0)).await.unwrap();
    let mut evil = CertificateParams::default();
    evil.distinguished_name.push(DnType::CommonName, "evil");
    evil.subject_alt_names = vec![
        SanType::URI("spiffe://evil/x".try_into().unwrap()),
        SanType::DnsName("evil.example".try_into().unwrap()),
    ];
    evil.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    evil.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    evil.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    // An extension rcgen's own CSR parser would refuse: ignored here too.
    evil.custom_extensions = vec![CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 99999, 1],
        vec![0x05, 0x00],
    )];
    let csr = csr_with(&PKCS_ECDSA_P256_SHA256, &evil);
    let now = t(10);

    let issued = ca
        .sign_workload_x509_svid(&workload(60), &csr, now)
        .unwrap();
    let bundle = ca.x509_bundle();
    let root = bundle.authorities()[0].as_ref().to_vec();
    assert_eq!(issued.spiffe_id(), &id(WORKLOAD));
    assert_leaf_profile(
        issued.certificate(),
        WORKLOAD,
        &["web.example.org", "*.web.example.org"],
        &root,
    );
    let cert = parse(issued.certificate());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(!eku.value.code_signing);
    assert!(
        cert.extensions()
            .iter()
            .all(|e| e.oid.to_id_string() != "1.3.6.1.4.1.99999.1")
    );
    openssl_verify(&bundle, issued.certificate(), now, &[]).unwrap();

    let agent = ca
        .sign_agent_x509_svid(&id(AGENT), &csr, secs(60), now)
        .unwrap();
    assert_leaf_profile(agent.certificate(), AGENT, &[], &root);
}

#[tokio::test]
async fn only_p256_keys_are_accepted() {
    let fx = Fixture::new();
    let ca = fx.ca(secs(3600), t(0)).await.unwrap();
    let mut csrs = vec![
        (
            "ecdsa p-384",
            csr_with(&PKCS_ECDSA_P384_SHA384, &CertificateParams::default()),
        ),
        (
            "ed25519",
            csr_with(&PKCS_ED25519, &CertificateParams::default()),
        ),
    ];
    // ring cannot generate RSA keys; openssl can.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("openssl")
        .args([
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rsa",
        ])
        .args(["-outform", "DER", "-keyout"])
        .arg(dir.path().join("rsa.key"))
        .arg("-out")
        .arg(dir.path().join("rsa.csr"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    csrs.push(("rsa", std::fs::read(dir.path().join("rsa.csr")).unwrap()));

    for (name, csr) in csrs {
        for result in [
            ca.sign_workload_x509_svid(&workload(60), &csr, t(1)),
            ca.sign_agent_x509_svid(&id(AGENT), &csr, secs(60), t(1)),
        ] {
            let err = result.unwrap_err();
            assert!(
                matches!(&err, CaError::UnsupportedKey { algorithm } if algorithm == name),
                "{name}: {err}"
            );
        }
    }
    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let err = ca
        .sign_server_x509_svid(&p384.subject_public_key_info(), secs(60), t(1))
        .unwrap_err();
    assert!(matches!(err, CaError::UnsupportedKey { .. }), "{err}");
    let err = ca
        .sign_server_x509_svid(b"junk", secs(60), t(1))
        .unwrap_err();
    assert!(matches!(err, CaError::MalformedPublicKey { .. }), "{err}");
}

#[tokio::test]
async fn garbage_and_truncated_csrs_are_errors_not_panics() {
    let fx = Fixture::new();
    let ca = fx.ca(secs(3600), t(0)).await.unwrap();
    let good = csr();
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        b"-----BEGIN CERTIFICATE REQUEST-----".to_vec(),
        vec![0xff; 100],
        vec![0x30, 0x82, 0xff, 0xff],
    ];
    cases.extend((0..good.len()).map(|n| good[..n].to_vec()));
    for csr in &cases {
        let err = ca
            .sign_workload_x509_svid(&workload(60), csr, t(1))
            .unwrap_err();
        assert!(matches!(err, CaError::MalformedCsr { .. }), "{err}");
    }
    // Every single-byte corruption is refused, never a panic, and never yields a
    // certificate for a key nobody proved to hold. (The parser tolerates a damaged tag in
    // the outer signature algorithm identifier, which is not signed: the proof of
    // possession still holds there, and the certificate is for the original key.)
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let good = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    // Outer SEQUENCE and request info, both with one-byte long-form lengths (0x81 LL).
    assert_eq!((good[1], good[4]), (0x81, 0x81));
    let info_len = 6 + usize::from(good[5]);
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x55;
        if let Ok(issued) = ca.sign_workload_x509_svid(&workload(60), &bad, t(1)) {
            let cert = parse(issued.certificate());
            assert_eq!(
                cert.public_key().subject_public_key.data.as_ref(),
                key.public_key_raw(),
                "byte {i}"
            );
            assert!(i >= info_len, "byte {i} is in the signed request info");
        }
    }
    let err = ca
        .sign_workload_x509_svid(&workload(60), &vec![0x30; MAX_CSR_LEN + 1], t(1))
        .unwrap_err();
    assert!(matches!(err, CaError::CsrTooLarge { .. }), "{err}");
}

#[tokio::test]
async fn serials_differ_for_the_same_key() {
    let fx = Fixture::new();
    let ca = fx.ca(secs(3600), t(0)).await.unwrap();
    let csr = csr();
    let serials: std::collections::HashSet<Vec<u8>> = (0..20)
        .map(|_| {
            ca.sign_workload_x509_svid(&workload(60), &csr, t(1))
                .unwrap()
                .serial()
                .to_vec()
        })
        .collect();
    assert_eq!(serials.len(), 20);
}

#[tokio::test]
async fn lifetimes_are_capped_by_the_authority_and_extra_caps() {
    let fx = Fixture::new();
    let ca = fx.ca(secs(60), t(0)).await.unwrap();
    // At 45 s (before hand-over), a 60 s TTL is capped at the authority's NotAfter (60 s).
    let issued = ca
        .sign_workload_x509_svid(&workload(60), &csr(), t(45))
        .unwrap();
    assert_eq!(issued.not_after(), t(60));
    assert_eq!(
        parse(issued.certificate()).validity().not_after.timestamp(),
        unix(t(60))
    );
    openssl_verify(&ca.x509_bundle(), issued.certificate(), t(59), &[]).unwrap();
    let agent = ca
        .sign_agent_x509_svid(&id(AGENT), &csr(), secs(3600), t(45))
        .unwrap();
    assert_eq!(agent.not_after(), t(60));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let server = ca
        .sign_server_x509_svid(&key.subject_public_key_info(), secs(3600), t(45))
        .unwrap();
    assert_eq!(server.not_after(), t(60));
    let jwt = ca
        .sign_jwt_svid(&id(WORKLOAD), &["a".into()], secs(3600), t(45), None)
        .unwrap();
    assert_eq!(jwt.expiry(), t(60));

    // A session ending at 50 s caps it earlier; a fractional cap rounds down.
    let mut params = workload(60);
    params.caps = vec![t(50) + Duration::from_millis(700)];
    let issued = ca.sign_workload_x509_svid(&params, &csr(), t(45)).unwrap();
    assert_eq!(issued.not_after(), t(50));
    // A cap that has passed: nothing is issued.
    params.caps = vec![t(44)];
    let err = ca
        .sign_workload_x509_svid(&params, &csr(), t(45))
        .unwrap_err();
    assert!(
        matches!(err, CaError::Lifetime(LifetimeError::CapPassed)),
        "{err}"
    );
    // After the authority expired (no rotation ran), nothing is issued either.
    let err = ca
        .sign_workload_x509_svid(&workload(10), &csr(), t(61))
        .unwrap_err();
    assert!(
        matches!(err, CaError::Lifetime(LifetimeError::CapPassed)),
        "{err}"
    );
    // TTLs under a second are refused.
    for ttl in [Duration::ZERO, Duration::from_millis(999)] {
        let mut params = workload(1);
        params.ttl = ttl;
        let err = ca
            .sign_workload_x509_svid(&params, &csr(), t(1))
            .unwrap_err();
        assert!(matches!(err, CaError::TtlTooShort { .. }), "{err}");
    }
    // Sub-second `now` is rounded down: whole-second certificate times.
    let issued = ca
        .sign_workload_x509_svid(&workload(10), &csr(), t(1) + Duration::from_millis(900))
        .unwrap();
    assert_eq!(issued.not_before(), t(1) - secs(10));
    assert_eq!(issued.not_after(), t(11));
}

#[tokio::test]
async fn ids_are_checked_before_anything_is_signed() {
    let fx = Fixture::new();
    let ca = fx.ca(secs(3600), t(0)).await.unwrap();
    let sign_workload = |spiffe_id: &str| {
        let mut params = workload(60);
        params.spiffe_id = id(spiffe_id);
        params.dns_names.clear();
        ca.sign_workload_x509_svid(&params, &csr(), t(1))
    };
    assert!(matches!(
        sign_workload("spiffe://other.org/web").unwrap_err(),
        CaError::ForeignTrustDomain { .. }
    ));
    assert!(matches!(
        sign_workload("spiffe://example.org").unwrap_err(),
        CaError::RootId { .. }
    ));
    for reserved in [
        "spiffe://example.org/sigil",
        "spiffe://example.org/sigil/server",
        "spiffe://example.org/sigil/agent/join_token/x",
    ] {
        let err = sign_workload(reserved).unwrap_err();
        assert!(
            matches!(err, CaError::ReservedId { .. }),
            "{reserved}: {err}"
        );
        let err = ca
            .sign_jwt_svid(&id(reserved), &["a".into()], secs(60), t(1), None)
            .unwrap_err();
        assert!(
            matches!(err, CaError::ReservedId { .. }),
            "{reserved}: {err}"
        );
    }
    // Not reserved: a path that merely starts with the same letters.
    sign_workload("spiffe://example.org/sigilfoo").unwrap();

    for not_agent in [
        "spiffe://example.org/ns/web",
        "spiffe://example.org/sigil/agent",
        "spiffe://example.org/sigil/agent/",
        "spiffe://example.org/sigil/server",
    ] {
        let Ok(agent_id) = SpiffeId::new(not_agent) else {
            continue;
        };
        let err = ca
            .sign_agent_x509_svid(&agent_id, &csr(), secs(60), t(1))
            .unwrap_err();
        assert!(
            matches!(err, CaError::NotAgentId { .. }),
            "{not_agent}: {err}"
        );
    }
    let err = ca
        .sign_agent_x509_svid(
            &id("spiffe://other.org/sigil/agent/x"),
            &csr(),
            secs(60),
            t(1),
        )
        .unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");

    let mut params = workload(60);
    params.dns_names = vec!["bad name".into()];
    let err = ca
        .sign_workload_x509_svid(&params, &csr(), t(1))
        .unwrap_err();
    assert!(matches!(err, CaError::InvalidDnsName { .. }), "{err}");
}

#[tokio::test]
async fn jwt_svids_validate_against_the_bundles_jwt_keys() {
    let fx = Fixture::new();
    let ca = fx.ca(secs(3600), t(0)).await.unwrap();
    let audience = vec!["db".to_owned(), "cache".to_owned()];
    let svid = ca
        .sign_jwt_svid(
            &id(WORKLOAD),
            &audience,
            secs(300),
            t(100),
            Some("https://issuer"),
        )
        .unwrap();
    assert_eq!(svid.spiffe_id(), &id(WORKLOAD));
    assert_eq!(svid.audience(), &audience[..]);
    assert_eq!(svid.expiry(), t(400));
    assert_eq!(svid.claims()["iat"], unix(t(100)));
    assert_eq!(svid.claims()["iss"], "https://issuer");
    assert_eq!(jwt_kid(&svid), active_id(&ca, AuthorityKind::Jwt));

    // Through the published SPIFFE bundle JSON, as a relying party gets it.
    let published = SpiffeBundle::parse(td(), &ca.bundle().to_json()).unwrap();
    for aud in ["db", "cache"] {
        let validated =
            JwtSvid::parse_and_validate(svid.token(), &published.jwt_bundle(), aud, t(200))
                .unwrap();
        assert_eq!(validated.spiffe_id(), &id(WORKLOAD));
    }
    assert!(matches!(
        JwtSvid::parse_and_validate(svid.token(), &published.jwt_bundle(), "other", t(200))
            .unwrap_err(),
        JwtSvidError::AudienceMismatch { .. }
    ));
    // Another trust domain's CA signs tokens this bundle does not accept.
    let other_fx = Fixture::new();
    let other = other_fx.ca(secs(3600), t(0)).await.unwrap();
    let foreign = other
        .sign_jwt_svid(&id(WORKLOAD), &audience, secs(300), t(100), None)
        .unwrap();
    assert!(foreign.claims().get("iss").is_none());
    assert!(
        JwtSvid::parse_and_validate(foreign.token(), &published.jwt_bundle(), "db", t(200))
            .is_err()
    );

    for bad in [vec![], vec![String::new()], vec!["a".into(), String::new()]] {
        let err = ca
            .sign_jwt_svid(&id(WORKLOAD), &bad, secs(60), t(1), None)
            .unwrap_err();
        assert!(matches!(err, CaError::EmptyAudience), "{err}");
    }
}

#[test]
fn caller_errors_are_the_ones_the_request_caused() {
    let caller = [
        CaError::CsrTooLarge {
            len: MAX_CSR_LEN + 1,
            max: MAX_CSR_LEN,
        },
        CaError::MalformedCsr {
            reason: "truncated".into(),
        },
        CaError::CsrSignatureInvalid,
        CaError::UnsupportedKey {
            algorithm: "rsa".into(),
        },
        CaError::MalformedPublicKey {
            reason: "junk".into(),
        },
        CaError::ForeignTrustDomain {
            id: id("spiffe://other.org/web"),
            trust_domain: td(),
        },
        CaError::RootId {
            id: id("spiffe://example.org"),
        },
        CaError::ReservedId {
            id: id("spiffe://example.org/sigil/server"),
        },
        CaError::NotAgentId { id: id(WORKLOAD) },
        CaError::InvalidDnsName {
            name: "bad name".into(),
            reason: "space",
        },
        CaError::EmptyAudience,
        CaError::TtlTooShort {
            ttl: Duration::ZERO,
        },
        CaError::Lifetime(LifetimeError::CapPassed),
    ];
    for error in &caller {
        assert!(error.is_caller_error(), "{error}");
    }
    let internal = [
        CaError::CaTtlTooShort {
            ca_ttl: secs(5),
            min: MIN_CA_TTL,
        },
        CaError::Key(KeyError::NotFound {
            id: "x509-1".into(),
        }),
        CaError::KeyTask,
        CaError::JournalStore(CaJournalStoreError::new("disk full")),
        CaError::CorruptJournal {
            reason: "not json".into(),
        },
        CaError::TrustDomainMismatch {
            journal: "other.org".into(),
            configured: td(),
        },
        CaError::NoActiveAuthority,
        CaError::Bundle {
            reason: "no authority".into(),
        },
        CaError::Random,
        CaError::Certificate {
            reason: "rcgen".into(),
        },
        CaError::JwtSigning(KeyError::Crypto {
            operation: "signing",
        }),
        CaError::IssuedSvidMismatch {
            what: "x509-svid spiffe id",
        },
    ];
    for error in &internal {
        assert!(!error.is_caller_error(), "{error}");
    }
}
