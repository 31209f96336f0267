//! Authorities under an upstream CA: intermediates with pathLen 0 inside the upstream's
//! lifetime, a bundle of the upstream root alone, SVID chains that `openssl verify -x509_strict`
//! accepts with only the root as trust anchor, across a rotation and a restart.

use rcgen::{BasicConstraints, DnType, IsCa, Issuer, KeyUsagePurpose};
use sigil_core::x509_svid::verify_chain;
use x509_parser::extensions::BasicConstraints as ParsedBasicConstraints;

use super::*;

/// An upstream root (and optionally an upstream intermediate below it): PEM of the CA to sign
/// with and its chain up to the root, and the CA's key.
struct Upstream {
    chain_pem: String,
    key_pem: String,
    root: CertificateDer<'static>,
}

fn ca_params(name: &str, path_len: Option<u8>, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (t(0) - secs(3600)).into();
    params.not_after = not_after.into();
    params
}

/// A root valid until `not_after`; with `intermediate`, the upstream CA is an intermediate of
/// it (so SVID chains carry two intermediates).
fn upstream(not_after: SystemTime, intermediate: bool) -> Upstream {
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("Enterprise Root", None, not_after);
    let root = root_params.self_signed(&root_key).unwrap();
    if !intermediate {
        return Upstream {
            chain_pem: root.pem(),
            key_pem: root_key.serialize_pem(),
            root: root.der().clone(),
        };
    }
    let issuer = Issuer::new(root_params, root_key);
    let key = KeyPair::generate().unwrap();
    let mut mid_params = ca_params("Enterprise Issuing CA", Some(1), not_after);
    mid_params.use_authority_key_identifier_extension = true;
    let mid = mid_params.signed_by(&key, &issuer).unwrap();
    Upstream {
        chain_pem: format!("{}{}", mid.pem(), root.pem()),
        key_pem: key.serialize_pem(),
        root: root.der().clone(),
    }
}

impl Fixture {
    async fn ca_under(&self, up: &Upstream, ca_ttl: Duration, now: SystemTime) -> Ca {
        self.try_ca_under(up, ca_ttl, now).await.unwrap()
    }

    /// The CA under `up` (checked at `now`) on this fixture's keys and journal.
    async fn try_ca_under(
        &self,
        up: &Upstream,
        ca_ttl: Duration,
        now: SystemTime,
    ) -> Result<Ca, CaError> {
        let keys = Arc::new(DiskKeyManager::new(&self.keys_dir).unwrap());
        let upstream =
            UpstreamAuthority::from_pem(&td(), up.chain_pem.as_bytes(), up.key_pem.as_bytes(), now)
                .unwrap();
        Ca::load_or_init_under(
            td(),
            ca_ttl,
            keys,
            self.journal.clone(),
            Some(Arc::new(upstream)),
            now,
        )
        .await
    }
}

/// `openssl verify -x509_strict` of `chain` (leaf first) with only `root` trusted.
fn openssl_verify_chain(
    root: &CertificateDer<'_>,
    chain: &[CertificateDer<'static>],
    at: SystemTime,
) {
    let dir = tempfile::tempdir().unwrap();
    let untrusted = dir.path().join("untrusted.pem");
    let intermediates: String = chain[1..].iter().map(|c| pem(c)).collect();
    std::fs::write(&untrusted, intermediates).unwrap();
    let bundle = X509Bundle::new(td(), vec![root.clone().into_owned()]).unwrap();
    openssl_verify(
        &bundle,
        &chain[0],
        at,
        &["-untrusted", untrusted.to_str().unwrap()],
    )
    .unwrap_or_else(|e| panic!("openssl: {e}"));
}

fn path_len(cert: &X509Certificate<'_>) -> Option<ParsedBasicConstraints> {
    cert.basic_constraints().unwrap().map(|bc| bc.value.clone())
}

#[tokio::test]
async fn authorities_are_intermediates_the_bundle_is_the_root_and_chains_verify_across_a_rotation()
{
    for two_levels in [false, true] {
        let fx = Fixture::new();
        let up = upstream(t(1_000_000), two_levels);
        let ca = fx.ca_under(&up, secs(600), t(0)).await;
        assert_eq!(
            ca.x509_bundle().authorities(),
            std::slice::from_ref(&up.root)
        );

        let first = ca
            .sign_workload_x509_svid(&workload(60), &csr(), t(1))
            .unwrap();
        let chain = first.clone().into_chain();
        assert_eq!(chain.len(), if two_levels { 3 } else { 2 });
        assert!(!chain.contains(&up.root), "the root is never in the chain");
        let intermediate = parse(&chain[1]);
        let bc = path_len(&intermediate).unwrap();
        assert!(bc.ca && bc.path_len_constraint == Some(0), "{bc:?}");
        assert!(intermediate.validity().not_after.timestamp() <= unix(t(1_000_000)));
        openssl_verify_chain(&up.root, &chain, t(2));
        verify_chain(&chain, &ca.x509_bundle(), t(2)).unwrap();

        // Rotation: the next intermediate is prepared at 300 s and signs from 500 s; the
        // bundle stays the root; chains from both verify.
        for at in [300, 500] {
            ca.rotate(t(at)).await.unwrap();
        }
        assert_eq!(
            ca.x509_bundle().authorities(),
            std::slice::from_ref(&up.root)
        );
        let later = ca
            .sign_workload_x509_svid(&workload(60), &csr(), t(501))
            .unwrap();
        assert_ne!(later.authority_id(), first.authority_id());
        let later_chain = later.into_chain();
        assert_ne!(later_chain[1], chain[1]);
        openssl_verify_chain(&up.root, &later_chain, t(502));
        verify_chain(&later_chain, &ca.x509_bundle(), t(502)).unwrap();

        // A restart finds the same authorities, bundle and chains in the journal.
        drop(ca);
        let keys = Arc::new(DiskKeyManager::new(&fx.keys_dir).unwrap());
        let again = Ca::load_or_init(td(), secs(600), keys, fx.journal.clone(), t(503))
            .await
            .unwrap();
        assert_eq!(
            again.x509_bundle().authorities(),
            std::slice::from_ref(&up.root)
        );
        let after = again
            .sign_workload_x509_svid(&workload(60), &csr(), t(504))
            .unwrap()
            .into_chain();
        assert_eq!(after[1..], later_chain[1..]);
        openssl_verify_chain(&up.root, &after, t(505));
    }
}

#[tokio::test]
async fn an_intermediate_never_outlives_the_upstream_ca() {
    let fx = Fixture::new();
    let up = upstream(t(400), false);
    let ca = fx.ca_under(&up, secs(600), t(0)).await;
    let chain = ca
        .sign_workload_x509_svid(&workload(60), &csr(), t(1))
        .unwrap()
        .into_chain();
    assert_eq!(
        parse(&chain[1]).validity().not_after.timestamp(),
        unix(t(400))
    );
    // Too close to the upstream's end for a new intermediate: refused, with the reason.
    let fx = Fixture::new();
    let err = fx.try_ca_under(&up, secs(600), t(390)).await.err().unwrap();
    assert!(err.to_string().contains("too soon"), "{err}");
}

#[test]
fn unusable_upstream_cas_are_refused_with_the_reason() {
    let good = upstream(t(1_000_000), false);
    let other = upstream(t(1_000_000), false);
    let cases: Vec<(&str, String, String)> = vec![
        ("not the key", good.chain_pem.clone(), other.key_pem.clone()),
        ("no CERTIFICATE", String::new(), good.key_pem.clone()),
        (
            "not valid now",
            upstream(t(0) - secs(10), false).chain_pem,
            {
                // Any key: the validity check comes first.
                good.key_pem.clone()
            },
        ),
    ];
    for (why, cert, key) in cases {
        let err =
            UpstreamAuthority::from_pem(&td(), cert.as_bytes(), key.as_bytes(), t(0)).unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    // Not a CA; a CA whose pathLen 0 allows no intermediate below it.
    for (why, edit) in [
        ("not a CA", IsCa::ExplicitNoCa),
        ("pathLen 0", IsCa::Ca(BasicConstraints::Constrained(0))),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params("Leafy", None, t(1_000_000));
        params.is_ca = edit;
        let cert = params.self_signed(&key).unwrap();
        let err = UpstreamAuthority::from_pem(
            &td(),
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            t(0),
        )
        .unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    // A chain that does not end with a root.
    let two = upstream(t(1_000_000), true);
    let first_only: String = two
        .chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap()
        .to_owned();
    let err =
        UpstreamAuthority::from_pem(&td(), first_only.as_bytes(), two.key_pem.as_bytes(), t(0))
            .unwrap_err();
    assert!(err.to_string().contains("must end with the root"), "{err}");
    // A root re-keyed under the same name: the names link, the signatures do not, and the
    // probe chain says so at start.
    let rekeyed = upstream(t(1_000_000), true);
    let mut pems: Vec<String> = two
        .chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .map(str::to_owned)
        .collect();
    let other_root = rekeyed
        .chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .nth(1)
        .unwrap()
        .to_owned();
    pems[1] = other_root;
    let err = UpstreamAuthority::from_pem(
        &td(),
        pems.concat().as_bytes(),
        two.key_pem.as_bytes(),
        t(0),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("does not verify against its root"),
        "{err}"
    );
}

#[tokio::test]
async fn an_upstream_too_old_for_a_successor_leaves_the_active_intermediate_and_jwt_rotation_alone()
{
    // The upstream ends at 560 s; ca_ttl 600 s: the first intermediate (clamped to 560 s) wants
    // a successor from 280 s, which the upstream can no longer sign from 460 s (560 - 100).
    let fx = Fixture::new();
    let up = upstream(t(560), false);
    let ca = fx.ca_under(&up, secs(600), t(0)).await;
    let first = active_id(&ca, AuthorityKind::X509);
    let jwt_before = active_id(&ca, AuthorityKind::Jwt);
    // At 470 s: no new intermediate; the call still succeeds, and the JWT key rotates on
    // schedule (prepared at 300 s, active from 500 s).
    ca.rotate(t(470)).await.unwrap();
    ca.rotate(t(501)).await.unwrap();
    assert_eq!(active_id(&ca, AuthorityKind::X509), first);
    assert_ne!(active_id(&ca, AuthorityKind::Jwt), jwt_before);
    // No key was made for the successor that could not be signed.
    let x509_keys = fx
        .key_files()
        .iter()
        .filter(|k| k.starts_with("x509-"))
        .count();
    assert_eq!(x509_keys, 1, "{:?}", fx.key_files());
    // A restart with so old an upstream is refused, with the reason.
    let err = fx.try_ca_under(&up, secs(600), t(501)).await.err().unwrap();
    assert!(err.to_string().contains("renew it"), "{err}");
}
