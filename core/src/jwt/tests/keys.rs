//! JWK conversions, JWKS parsing and the bundle rules (B-*, BJ-*).

use std::collections::BTreeMap;

use super::*;
use crate::spiffe_id::SpiffeId;

#[test]
fn jwk_conversions() {
    // RFC 7638 §3.1 example key and thumbprint.
    let rfc = obj(json!({
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }));
    let key = JwtPublicKey::from_jwk(&rfc).unwrap();
    assert_eq!(
        key.thumbprint(),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
    assert_eq!(key.key_type(), "RSA");
    assert_eq!(key.curve(), None);
    let mut expected = rfc.clone();
    expected.remove("alg");
    expected.remove("kid");
    assert_eq!(key.to_jwk(), expected, "only kty and key parameters");

    let ec = fixture().key.public_key().clone();
    let jwk = ec.to_jwk();
    // (Member order is not significant: serde_json keeps insertion order when a crate in the
    // build enables its `preserve_order`, as cedar-policy does.)
    let mut members: Vec<&str> = jwk.keys().map(String::as_str).collect();
    members.sort_unstable();
    assert_eq!(members, ["crv", "kty", "x", "y"]);
    assert_eq!(JwtPublicKey::from_jwk(&jwk).unwrap(), ec);

    // RSA parameters with a DER-style leading zero are normalised.
    let padded = JwtPublicKey::rsa(&[0, 0xc1, 0x01], &[0, 1, 0, 1]).unwrap();
    assert_eq!(
        padded,
        JwtPublicKey::rsa(&[0xc1, 0x01], &[1, 0, 1]).unwrap()
    );
    assert_eq!(padded.to_jwk()["e"], "AQAB");

    let x = jwk["x"].as_str().unwrap();
    type Check = fn(&JwtSvidError) -> bool;
    let bad: &[(&str, Value, Check)] = &[
        (
            "B-6 kty OKP",
            json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
            |e| matches!(e, E::UnsupportedKeyType { .. }),
        ),
        (
            "B-6 kty missing",
            json!({"crv": "P-256", "x": x, "y": x}),
            |e| matches!(e, E::UnsupportedKeyType { .. }),
        ),
        ("B-6 kty oct", json!({"kty": "oct", "k": "AAAA"}), |e| {
            matches!(e, E::UnsupportedKeyType { .. })
        }),
        (
            "crv secp256k1",
            json!({"kty": "EC", "crv": "secp256k1", "x": x, "y": x}),
            |e| matches!(e, E::UnsupportedCurve { .. }),
        ),
        ("crv missing", json!({"kty": "EC", "x": x, "y": x}), |e| {
            matches!(e, E::UnsupportedCurve { .. })
        }),
        (
            "y missing",
            json!({"kty": "EC", "crv": "P-256", "x": x}),
            |e| matches!(e, E::InvalidJwk { .. }),
        ),
        (
            "x too short",
            json!({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": x}),
            |e| matches!(e, E::InvalidJwk { .. }),
        ),
        (
            "P-384 with P-256 coordinates",
            json!({"kty": "EC", "crv": "P-384", "x": x, "y": x}),
            |e| matches!(e, E::InvalidJwk { .. }),
        ),
        (
            "padded base64url",
            json!({"kty": "RSA", "n": "AQAB=", "e": "AQAB"}),
            |e| matches!(e, E::InvalidJwk { .. }),
        ),
        (
            "standard base64",
            json!({"kty": "RSA", "n": "ab+/", "e": "AQAB"}),
            |e| matches!(e, E::InvalidJwk { .. }),
        ),
        (
            "e zero",
            json!({"kty": "RSA", "n": "AQAB", "e": "AA"}),
            |e| matches!(e, E::InvalidJwk { .. }),
        ),
    ];
    for (item, jwk, check) in bad {
        let err = JwtPublicKey::from_jwk(&obj(jwk.clone())).unwrap_err();
        assert!(check(&err), "{item}: {err}");
    }
    // P-521 keys are kept (and published), though ES512 cannot be verified.
    let p521 = JwtPublicKey::ec(EcCurve::P521, &[1; 66], &[2; 66]).unwrap();
    assert_eq!(JwtPublicKey::from_jwk(&p521.to_jwk()).unwrap(), p521);
}

#[test]
fn jwks_is_plain_and_round_trips() {
    let f = fixture();
    let (_, rsa_public) = rsa_key_pair();
    let mut bundle = f.bundle.clone();
    bundle.insert_key("rsa-1", rsa_public).unwrap();

    let jwks: Value = serde_json::from_slice(&bundle.to_jwks()).unwrap();
    let set = jwks.as_object().unwrap();
    assert_eq!(
        set.keys().collect::<Vec<_>>(),
        ["keys"],
        "no spiffe_* members"
    );
    for jwk in jwks["keys"].as_array().unwrap() {
        let mut names = jwk.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        names.sort();
        let want: &[&str] = if jwk["kty"] == "EC" {
            &["crv", "kid", "kty", "x", "y"]
        } else {
            &["e", "kid", "kty", "n"]
        };
        assert_eq!(names, want, "section 6.3: only kty, kid and key parameters");
    }

    let parsed = JwtBundle::from_jwks(td("example.org"), &bundle.to_jwks()).unwrap();
    assert_eq!(parsed, bundle);
    // A token validates with the parsed bundle.
    let token = forge(&header(f.key.kid()), &claims(), es256(&f.key));
    assert!(validate(&token, &parsed).is_ok());
}

#[test]
fn jwks_parsing_rules() {
    let f = fixture();
    let mut ec = f.key.public_key().to_jwk();
    ec.insert("kid".into(), "k1".into());
    let ec = Value::Object(ec);
    let with = |extra: Value| {
        let mut jwk = ec.as_object().unwrap().clone();
        jwk.extend(obj(extra));
        Value::Object(jwk)
    };
    let parse = |jwks: Value| JwtBundle::from_jwks(td("example.org"), jwks.to_string().as_bytes());

    let kids =
        |jwks: Value| -> Vec<String> { parse(jwks).unwrap().keys().keys().cloned().collect() };
    let cases: &[(&str, Value, &[&str])] = &[
        (
            "B-1 keys empty is valid (B-2: no keys)",
            json!({"keys": []}),
            &[],
        ),
        ("plain jwks", json!({"keys": [ec]}), &["k1"]),
        (
            "B-5 unknown top-level members ignored",
            json!({"keys": [ec], "spiffe_sequence": 3, "x": {}}),
            &["k1"],
        ),
        (
            "BJ-2 use jwt-svid kept",
            json!({"keys": [with(json!({"use": "jwt-svid"}))]}),
            &["k1"],
        ),
        (
            "BJ-2 use x509-svid skipped",
            json!({"keys": [with(json!({"use": "x509-svid", "kid": "k2"})), ec]}),
            &["k1"],
        ),
        (
            "B-7 unknown use skipped",
            json!({"keys": [with(json!({"use": "sig", "kid": "k2"}))]}),
            &[],
        ),
        (
            "B-6 unknown kty skipped",
            json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA", "kid": "k2"}, ec]}),
            &["k1"],
        ),
        (
            "B-6 unsupported curve skipped",
            json!({"keys": [{"kty": "EC", "crv": "P-192", "x": "AA", "y": "AA", "kid": "k2"}]}),
            &[],
        ),
        (
            "BJ-1 key without kid skipped",
            json!({"keys": [{"kty": "EC", "crv": "P-256", "x": ec["x"], "y": ec["y"]}]}),
            &[],
        ),
        (
            "BJ-1 key with empty kid skipped",
            json!({"keys": [with(json!({"kid": ""}))]}),
            &[],
        ),
    ];
    for (item, jwks, want) in cases {
        assert_eq!(kids(jwks.clone()), *want, "{item}");
    }

    let errors: &[(&str, Vec<u8>)] = &[
        ("B-1 keys missing", br#"{"spiffe_sequence": 1}"#.to_vec()),
        ("B-1 keys not an array", br#"{"keys": {}}"#.to_vec()),
        ("not an object", br#"[]"#.to_vec()),
        ("not json", b"keys".to_vec()),
        ("key not an object", br#"{"keys": [1]}"#.to_vec()),
        (
            "kid not a string",
            json!({"keys": [with(json!({"kid": 1}))]})
                .to_string()
                .into_bytes(),
        ),
        (
            "malformed supported key",
            json!({"keys": [with(json!({"x": "AA"}))]})
                .to_string()
                .into_bytes(),
        ),
        (
            "duplicate member",
            format!(r#"{{"keys": [], "keys": [{ec}]}}"#).into_bytes(),
        ),
        (
            "oversize",
            [b" ".repeat(MAX_JWKS_LEN), b"{\"keys\":[]}".to_vec()].concat(),
        ),
    ];
    for (item, jwks) in errors {
        assert!(
            matches!(
                JwtBundle::from_jwks(td("example.org"), jwks),
                Err(E::InvalidJwks { .. })
            ),
            "{item}"
        );
    }
    assert_eq!(
        parse(json!({"keys": [ec, with(json!({"crv": "P-256"}))]})),
        Err(E::DuplicateKeyId { kid: "k1".into() })
    );
}

#[test]
fn b9_b10_bundle_set_keeps_trust_domains_apart() {
    let k1 = JwtSigningKey::generate().unwrap();
    let k2 = JwtSigningKey::generate().unwrap();
    let bundle = |name: &str, key: &JwtSigningKey| {
        let mut b = JwtBundle::new(td(name));
        b.insert_key(key.kid(), key.public_key().clone()).unwrap();
        b
    };
    let mut set = JwtBundleSet::new();
    assert!(set.insert(bundle("a.org", &k1)).is_none());
    assert!(set.insert(bundle("b.org", &k2)).is_none());
    // A new bundle for a.org replaces the old one; nothing is merged (B-10).
    let old = set.insert(bundle("a.org", &k2)).unwrap();
    assert!(old.key(k1.kid()).is_some());
    let a = set.jwt_bundle_for(&td("a.org")).unwrap();
    assert_eq!(a.keys().len(), 1);
    assert!(a.key(k1.kid()).is_none());
    assert_eq!(set.len(), 2);
    assert!(set.jwt_bundle_for(&td("c.org")).is_none());
    assert_eq!(
        set.remove(&td("b.org")).unwrap().trust_domain(),
        &td("b.org")
    );
    assert_eq!(set.iter().count(), 1);

    // A bundle is only its own trust domain's source (B-9).
    let b = bundle("b.org", &k2);
    assert!(b.jwt_bundle_for(&td("b.org")).is_some());
    assert!(b.jwt_bundle_for(&td("a.org")).is_none());

    // A source that answers with the wrong trust domain's bundle is not believed.
    struct Liar(JwtBundle);
    impl JwtBundleSource for Liar {
        fn jwt_bundle_for(&self, _: &TrustDomain) -> Option<&JwtBundle> {
            Some(&self.0)
        }
    }
    let token = k2
        .sign(&JwtSvidParams {
            subject: SpiffeId::new("spiffe://a.org/web").unwrap(),
            audience: vec![AUD.into()],
            issued_at: now(),
            expires_at: now() + Duration::from_secs(60),
            issuer: None,
        })
        .unwrap();
    assert_eq!(
        validate(token.token(), &Liar(bundle("b.org", &k2))),
        Err(E::UntrustedTrustDomain {
            trust_domain: td("a.org")
        })
    );
    // Through a trait object, too.
    let dyn_source: &dyn JwtBundleSource = &set;
    assert!(JwtSvid::parse_and_validate(token.token(), dyn_source, AUD, now()).is_ok());
}

#[test]
fn bj1_bundle_keys_need_a_kid() {
    let key = JwtSigningKey::generate().unwrap();
    let mut bundle = JwtBundle::new(td("example.org"));
    assert_eq!(
        bundle.insert_key("", key.public_key().clone()),
        Err(E::EmptyKeyId)
    );
    let keys = BTreeMap::from([(String::new(), key.public_key().clone())]);
    assert_eq!(
        JwtBundle::from_keys(td("example.org"), keys),
        Err(E::EmptyKeyId)
    );
    assert!(
        bundle
            .insert_key("k", key.public_key().clone())
            .unwrap()
            .is_none()
    );
    assert!(
        bundle
            .insert_key("k", key.public_key().clone())
            .unwrap()
            .is_some()
    );
    assert!(bundle.remove_key("k").is_some());
    assert!(bundle.is_empty());
}
