//! The authorities: the first start, the rotation timeline, the journal and restarts.

use std::path::Path;

use super::*;
use crate::ca::rotation::merge_changes;
use sigil_core::x509_svid::verify_chain;

#[tokio::test]
async fn the_first_start_creates_a_self_signed_p256_root_and_a_jwt_key() {
    let fx = Fixture::new();
    let ca = fx.ca(secs(86_400), t(0)).await.unwrap();
    assert_eq!(ca.bundle_sequence(), 1);
    let bundle = ca.x509_bundle();
    let [root] = bundle.authorities() else {
        panic!("one root");
    };
    let cert = parse(root);
    // Subject O=Sigil, CN=<td>, serialNumber=<serial>; issuer = subject.
    let attr = |oid: &[u64]| {
        cert.subject()
            .iter_attributes()
            .find(|a| a.attr_type().iter().unwrap().collect::<Vec<_>>() == oid)
            .map(|a| a.as_str().unwrap().to_owned())
    };
    assert_eq!(attr(&[2, 5, 4, 10]).as_deref(), Some("Sigil"));
    assert_eq!(attr(&[2, 5, 4, 3]).as_deref(), Some(TD));
    assert_eq!(attr(&[2, 5, 4, 5]), Some(hex(cert.raw_serial())));
    assert_eq!(cert.subject(), cert.issuer());
    assert_eq!(cert.raw_serial().len(), 16);
    // URI SAN spiffe://td, CA=true, keyCertSign + cRLSign, critical.
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI("spiffe://example.org")]
    );
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    // P-256, self-signed, NotBefore backdated 10 s, NotAfter = now + ca_ttl.
    assert_eq!(
        cert.public_key()
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .as_oid()
            .unwrap(),
        x509_parser::oid_registry::OID_EC_P256
    );
    cert.verify_signature(None).unwrap();
    assert_eq!(cert.validity().not_before.timestamp(), unix(t(0)) - 10);
    assert_eq!(cert.validity().not_after.timestamp(), unix(t(86_400)));

    assert_eq!(ca.jwt_bundle().keys().len(), 1);
    let infos = ca.authorities();
    assert_eq!(infos.len(), 2);
    assert!(infos.iter().all(|a| a.state == AuthorityState::Active));
    assert!(
        infos
            .iter()
            .all(|a| a.issued_at == t(0) && a.not_after == t(86_400))
    );
    // The bundle JSON carries the sequence and both kinds of keys.
    let json: serde_json::Value = serde_json::from_slice(&ca.bundle().to_json()).unwrap();
    assert_eq!(json["spiffe_sequence"], 1);
    assert_eq!(json["keys"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn key_files_are_0600_and_nothing_shows_key_bytes() {
    use std::os::unix::fs::PermissionsExt as _;
    let fx = Fixture::new();
    let ca = fx.ca(secs(600), t(0)).await.unwrap();
    let files = fx.key_files();
    assert_eq!(files.len(), 2, "{files:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&fx.keys_dir), 0o700);
    let shown = format!("{ca:?} {:?}", ca.authorities());
    for file in &files {
        let path = fx.keys_dir.join(file);
        assert_eq!(mode(&path), 0o600, "{file}");
        let pkcs8 = std::fs::read(&path).unwrap();
        assert!(!shown.contains(&hex(&pkcs8)));
        assert!(!shown.contains(&hex(&pkcs8[36..68])), "private scalar");
        assert!(!shown.contains(&format!("{:?}", &pkcs8[36..68])));
    }
    // The journal names the keys but holds no key material.
    let journal = fx.journal.journal.lock().unwrap().clone().unwrap();
    for file in &files {
        let pkcs8 = std::fs::read(fx.keys_dir.join(file)).unwrap();
        let scalar = &pkcs8[36..68];
        assert!(!journal.windows(scalar.len()).any(|w| w == scalar));
        for encoded in [STANDARD.encode(scalar), URL_SAFE_NO_PAD.encode(scalar)] {
            assert!(!String::from_utf8_lossy(&journal).contains(&encoded[..20]));
        }
    }
}

#[tokio::test]
async fn the_rotation_timeline_with_a_60s_ca_ttl() {
    use AuthorityKind::{Jwt, X509};
    use AuthorityState::{Active, Old, Prepared};
    let fx = Fixture::new();
    let ca = fx.ca(secs(60), t(0)).await.unwrap();
    let a = active_id(&ca, X509);
    let ja = active_id(&ca, Jwt);
    assert_eq!(ca.bundle_sequence(), 1);
    assert_eq!(fx.journal.saves.load(Ordering::SeqCst), 1);

    // Nothing to do before half-life.
    assert!(!ca.rotate(t(29)).await.unwrap());
    assert_eq!(ca.bundle_sequence(), 1);
    assert_eq!(fx.journal.saves.load(Ordering::SeqCst), 1);

    // 30 s: the successors are prepared and published; A still signs.
    assert!(ca.rotate(t(30)).await.unwrap());
    assert_eq!(ca.bundle_sequence(), 2);
    let [_, b] = &states(&ca, X509)[..] else {
        panic!("two x509 authorities")
    };
    let b = b.0.clone();
    let jb = states(&ca, Jwt)[1].0.clone();
    assert_eq!(
        states(&ca, X509),
        vec![(a.clone(), Active), (b.clone(), Prepared)]
    );
    assert_eq!(
        states(&ca, Jwt),
        vec![(ja.clone(), Active), (jb.clone(), Prepared)]
    );
    assert_eq!(bundle_ids(&ca), vec![a.clone(), b.clone()]);
    assert_eq!(ca.jwt_bundle().keys().len(), 2);
    let svid = ca
        .sign_workload_x509_svid(&workload(10), &csr(), t(31))
        .unwrap();
    assert_eq!(svid.authority_id(), a);
    let jwt = ca
        .sign_jwt_svid(&id(WORKLOAD), &["aud".into()], secs(10), t(31), None)
        .unwrap();
    assert_eq!(jwt_kid(&jwt), ja);

    // 49 s: no change. 50 s: B signs, A is old; the bundle is unchanged.
    assert!(!ca.rotate(t(49)).await.unwrap());
    assert!(!ca.rotate(t(50)).await.unwrap());
    assert_eq!(ca.bundle_sequence(), 2);
    assert_eq!(
        states(&ca, X509),
        vec![(a.clone(), Old), (b.clone(), Active)]
    );
    assert_eq!(
        states(&ca, Jwt),
        vec![(ja.clone(), Old), (jb.clone(), Active)]
    );
    assert_eq!(bundle_ids(&ca), vec![a.clone(), b.clone()]);
    let by_b = ca
        .sign_workload_x509_svid(&workload(10), &csr(), t(51))
        .unwrap();
    assert_eq!(by_b.authority_id(), b);
    let jwt = ca
        .sign_jwt_svid(&id(WORKLOAD), &["aud".into()], secs(10), t(51), None)
        .unwrap();
    assert_eq!(jwt_kid(&jwt), jb);
    // What A signed still verifies: A is still in the bundle.
    openssl_verify(&ca.x509_bundle(), svid.certificate(), t(35), &[]).unwrap();
    openssl_verify(&ca.x509_bundle(), by_b.certificate(), t(55), &[]).unwrap();
    verify_chain(
        std::slice::from_ref(by_b.certificate()),
        &ca.x509_bundle(),
        t(55),
    )
    .unwrap();
    // The activation was saved, even though the bundle did not change.
    assert_eq!(fx.journal.json()["x509_authorities"][1]["state"], "active");

    // 59 s: no change. 60 s: A expires and is pruned (its key deleted); B is half-way,
    // so C is prepared. One bundle change, one sequence increment.
    assert!(!ca.rotate(t(59)).await.unwrap());
    let files_before = fx.key_files();
    assert!(files_before.contains(&format!("x509-{a}.key")));
    assert!(ca.rotate(t(60)).await.unwrap());
    assert_eq!(ca.bundle_sequence(), 3);
    let x509 = states(&ca, X509);
    assert_eq!(x509.len(), 2);
    assert_eq!(x509[0], (b.clone(), Active));
    assert_eq!(x509[1].1, Prepared);
    assert!(!bundle_ids(&ca).contains(&a));
    let jwt_states = states(&ca, Jwt);
    assert_eq!(jwt_states[0], (jb.clone(), Active));
    assert_eq!(jwt_states[1].1, Prepared);
    assert!(!ca.jwt_bundle().keys().contains_key(&ja));
    let files = fx.key_files();
    assert_eq!(files.len(), 4, "{files:?}");
    assert!(!files.contains(&format!("x509-{a}.key")));
    assert_eq!(fx.journal.json()["bundle_sequence"], 3);

    // 80 s: C takes over from B. 90 s: B is pruned, D prepared.
    assert!(!ca.rotate(t(80)).await.unwrap());
    assert_eq!(states(&ca, X509)[0], (b.clone(), Old));
    assert!(ca.rotate(t(90)).await.unwrap());
    assert_eq!(ca.bundle_sequence(), 4);
    assert!(!bundle_ids(&ca).contains(&b));
}

#[tokio::test]
async fn a_restart_with_the_same_keys_and_journal_gives_the_same_bundle() {
    let fx = Fixture::new();
    let first = fx.ca(secs(60), t(0)).await.unwrap();
    first.rotate(t(30)).await.unwrap();
    first.rotate(t(50)).await.unwrap();
    let bundle = first.bundle();
    let authorities = first.authorities();
    let saves = fx.journal.saves.load(Ordering::SeqCst);
    let signed = first
        .sign_workload_x509_svid(&workload(5), &csr(), t(51))
        .unwrap();
    drop(first);

    // Restart at a time with nothing to rotate: nothing changes, nothing is written.
    let second = fx.ca(secs(60), t(55)).await.unwrap();
    assert_eq!(second.bundle().to_json(), bundle.to_json());
    assert_eq!(second.bundle(), bundle);
    assert_eq!(second.bundle_sequence(), 2);
    assert_eq!(second.authorities(), authorities);
    assert_eq!(fx.journal.saves.load(Ordering::SeqCst), saves);
    // It signs with the same active authority, and what the first one signed verifies.
    let again = second
        .sign_workload_x509_svid(&workload(5), &csr(), t(52))
        .unwrap();
    assert_eq!(again.authority_id(), signed.authority_id());
    verify_chain(
        std::slice::from_ref(signed.certificate()),
        &second.x509_bundle(),
        t(53),
    )
    .unwrap();
    let jwt = second
        .sign_jwt_svid(&id(WORKLOAD), &["aud".into()], secs(5), t(52), None)
        .unwrap();
    JwtSvid::parse_and_validate(jwt.token(), &bundle.jwt_bundle(), "aud", t(53)).unwrap();
    drop(second);

    // Restart after a rotation point: the restarted CA catches up at once.
    let third = fx.ca(secs(60), t(61)).await.unwrap();
    assert_eq!(third.bundle_sequence(), 3);
    assert_eq!(third.x509_bundle().authorities().len(), 2);
}

#[tokio::test]
async fn a_journal_that_cannot_be_used_is_refused() {
    let fx = Fixture::new();
    fx.ca(secs(60), t(0)).await.unwrap();
    let journal = fx.journal.journal.lock().unwrap().clone().unwrap();

    // Another trust domain.
    let keys = Arc::new(DiskKeyManager::new(&fx.keys_dir).unwrap());
    let err = Ca::load_or_init(
        TrustDomain::new("other.org").unwrap(),
        secs(60),
        keys.clone(),
        fx.journal.clone(),
        t(1),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");

    // A missing key.
    let empty_dir = tempfile::tempdir().unwrap();
    let other_keys = Arc::new(DiskKeyManager::new(empty_dir.path()).unwrap());
    let err = Ca::load_or_init(td(), secs(60), other_keys, fx.journal.clone(), t(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CaError::Key(KeyError::NotFound { .. })),
        "{err}"
    );

    // A key that does not match the certificate: swap the two key ids.
    let mut value: serde_json::Value = serde_json::from_slice(&journal).unwrap();
    let x509_key = value["x509_authorities"][0]["key_id"].clone();
    let jwt_key = value["jwt_keys"][0]["key_id"].clone();
    value["x509_authorities"][0]["key_id"] = jwt_key;
    value["jwt_keys"][0]["key_id"] = x509_key;
    *fx.journal.journal.lock().unwrap() = Some(serde_json::to_vec(&value).unwrap());
    let err = fx.ca(secs(60), t(1)).await.unwrap_err();
    assert!(matches!(err, CaError::CorruptJournal { .. }), "{err}");

    // Not JSON.
    *fx.journal.journal.lock().unwrap() = Some(b"not json".to_vec());
    let err = fx.ca(secs(60), t(1)).await.unwrap_err();
    assert!(matches!(err, CaError::CorruptJournal { .. }), "{err}");
}

#[tokio::test]
async fn a_failed_journal_save_changes_nothing_and_leaves_no_key_behind() {
    let fx = Fixture::new();
    let ca = fx.ca(secs(60), t(0)).await.unwrap();
    let before = ca.authorities();
    let files = fx.key_files();
    fx.journal.fail_saves.store(true, Ordering::SeqCst);
    let err = ca.rotate(t(30)).await.unwrap_err();
    assert!(matches!(err, CaError::JournalStore(_)), "{err}");
    assert_eq!(err.to_string(), "ca journal store: disk full");
    assert_eq!(ca.authorities(), before);
    assert_eq!(ca.bundle_sequence(), 1);
    assert_eq!(fx.key_files(), files, "the keys made for it are deleted");
    // Once the store works again, the rotation happens.
    fx.journal.fail_saves.store(false, Ordering::SeqCst);
    assert!(ca.rotate(t(31)).await.unwrap());
    assert_eq!(ca.bundle_sequence(), 2);
}

#[tokio::test]
async fn ca_ttl_must_leave_room_for_one_second_svids() {
    let fx = Fixture::new();
    let err = fx.ca(secs(5), t(0)).await.unwrap_err();
    assert!(matches!(err, CaError::CaTtlTooShort { .. }), "{err}");
}

#[test]
fn changes_of_both_kinds_merge() {
    assert_eq!(merge_changes(None, None), None);
    assert_eq!(merge_changes(Some(false), None), Some(false));
    assert_eq!(merge_changes(None, Some(true)), Some(true));
    assert_eq!(merge_changes(Some(false), Some(true)), Some(true));
    assert_eq!(merge_changes(Some(true), Some(false)), Some(true));
    assert_eq!(merge_changes(Some(false), Some(false)), Some(false));
}

#[tokio::test]
async fn the_ca_can_be_shared_across_tasks() {
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    fn assert_send<T: Send>(_: T) {}
    let fx = Fixture::new();
    let ca = Arc::new(fx.ca(secs(60), t(0)).await.unwrap());
    assert_send_sync(&*ca);
    assert_send(ca.rotate(t(1)));
    let task = {
        let ca = ca.clone();
        tokio::spawn(async move { ca.rotate(t(30)).await })
    };
    let signed = ca
        .sign_workload_x509_svid(&workload(5), &csr(), t(29))
        .unwrap();
    assert!(task.await.unwrap().unwrap());
    verify_chain(
        std::slice::from_ref(signed.certificate()),
        &ca.x509_bundle(),
        t(30),
    )
    .unwrap();
}
