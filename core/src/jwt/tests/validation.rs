//! Validation by the JWT-SVID rules (J-1 to J-10), one case per rule.

use base64::Engine as _;
use ring::signature::{EcdsaKeyPair, KeyPair as _};

use super::*;
use crate::spiffe_id::{SpiffeId, SpiffeIdError};

type Edit = fn(&mut Map<String, Value>, &mut Map<String, Value>);

/// Tokens that are correctly signed by the bundle's key but break one rule.
fn rejections() -> Vec<(&'static str, Edit, JwtSvidError)> {
    let disallowed = |alg: &str| E::DisallowedAlgorithm {
        alg: alg.to_owned(),
    };
    vec![
        (
            "J-2 alg none",
            |h, _| {
                h.insert("alg".into(), "none".into());
            },
            disallowed("none"),
        ),
        (
            "J-2 HS256",
            |h, _| {
                h.insert("alg".into(), "HS256".into());
            },
            disallowed("HS256"),
        ),
        (
            "J-2 HS512",
            |h, _| {
                h.insert("alg".into(), "HS512".into());
            },
            disallowed("HS512"),
        ),
        (
            "J-2 EdDSA",
            |h, _| {
                h.insert("alg".into(), "EdDSA".into());
            },
            disallowed("EdDSA"),
        ),
        (
            "J-2 alg is case-sensitive",
            |h, _| {
                h.insert("alg".into(), "es256".into());
            },
            disallowed("es256"),
        ),
        (
            "J-2 alg not a string",
            |h, _| {
                h.insert("alg".into(), json!(256));
            },
            disallowed("256"),
        ),
        (
            "J-2 alg missing",
            |h, _| {
                h.remove("alg");
            },
            E::MissingAlgorithm,
        ),
        (
            "J-2 alg checked before everything else",
            |h, c| {
                h.insert("alg".into(), "none".into());
                h.insert("typ".into(), "at+jwt".into());
                h.insert("jku".into(), "https://evil".into());
                h.remove("kid");
                c.clear();
            },
            disallowed("none"),
        ),
        (
            "J-4 typ at+jwt",
            |h, _| {
                h.insert("typ".into(), "at+jwt".into());
            },
            E::InvalidType {
                typ: "\"at+jwt\"".into(),
            },
        ),
        (
            "J-4 typ is case-sensitive",
            |h, _| {
                h.insert("typ".into(), "jwt".into());
            },
            E::InvalidType {
                typ: "\"jwt\"".into(),
            },
        ),
        (
            "J-4 typ not a string",
            |h, _| {
                h.insert("typ".into(), json!(null));
            },
            E::InvalidType { typ: "null".into() },
        ),
        (
            "J-5 extra header parameter jku",
            |h, _| {
                h.insert("jku".into(), "https://example.org/keys".into());
            },
            E::UnexpectedHeaderParameter { name: "jku".into() },
        ),
        (
            "J-5 crit",
            |h, _| {
                h.insert("crit".into(), json!(["exp"]));
            },
            E::UnexpectedHeaderParameter {
                name: "crit".into(),
            },
        ),
        (
            "J-5 private header parameter",
            |h, _| {
                h.insert("x-sigil".into(), json!(1));
            },
            E::UnexpectedHeaderParameter {
                name: "x-sigil".into(),
            },
        ),
        (
            "J-3 kid missing (section 9.2)",
            |h, _| {
                h.remove("kid");
            },
            E::MissingKeyId,
        ),
        (
            "J-3 kid empty (section 9.2)",
            |h, _| {
                h.insert("kid".into(), "".into());
            },
            E::MissingKeyId,
        ),
        (
            "J-6 sub missing",
            |_, c| {
                c.remove("sub");
            },
            E::MissingSubject,
        ),
        (
            "J-6 sub not a spiffe id",
            |_, c| {
                c.insert("sub".into(), "https://example.org/web".into());
            },
            E::InvalidSubject {
                source: SpiffeIdError::WrongScheme,
            },
        ),
        (
            "J-6 sub with trailing slash",
            |_, c| {
                c.insert("sub".into(), "spiffe://example.org/web/".into());
            },
            E::InvalidSubject {
                source: SpiffeIdError::TrailingSlash,
            },
        ),
        (
            "J-6 sub not a string",
            |_, c| {
                c.insert("sub".into(), json!(7));
            },
            E::InvalidClaim { name: "sub" },
        ),
        (
            "J-7 aud missing",
            |_, c| {
                c.remove("aud");
            },
            E::MissingAudience,
        ),
        (
            "J-7 aud empty array",
            |_, c| {
                c.insert("aud".into(), json!([]));
            },
            E::MissingAudience,
        ),
        (
            "J-7 aud without our audience",
            |_, c| {
                c.insert("aud".into(), json!(["spiffe://example.org/other"]));
            },
            E::AudienceMismatch {
                audience: AUD.into(),
            },
        ),
        (
            "J-7 aud string without our audience",
            |_, c| {
                c.insert("aud".into(), "spiffe://example.org/other".into());
            },
            E::AudienceMismatch {
                audience: AUD.into(),
            },
        ),
        (
            "J-7 aud holding a number",
            |_, c| {
                c.insert("aud".into(), json!([AUD, 1]));
            },
            E::InvalidClaim { name: "aud" },
        ),
        (
            "J-8 exp missing",
            |_, c| {
                c.remove("exp");
            },
            E::MissingExpiry,
        ),
        (
            "J-8 exp past beyond leeway",
            |_, c| {
                c.insert("exp".into(), json!(NOW - 61));
            },
            E::Expired,
        ),
        (
            "J-8 exp long past",
            |_, c| {
                c.insert("exp".into(), json!(1));
            },
            E::Expired,
        ),
        (
            "J-8 exp as a string",
            |_, c| {
                c.insert("exp".into(), json!("1700000300"));
            },
            E::InvalidClaim { name: "exp" },
        ),
        (
            "J-8 exp negative",
            |_, c| {
                c.insert("exp".into(), json!(-5));
            },
            E::InvalidClaim { name: "exp" },
        ),
        (
            "J-8 nbf in the future beyond leeway",
            |_, c| {
                c.insert("nbf".into(), json!(NOW + 61));
            },
            E::NotYetValid,
        ),
        (
            "J-8 iat in the future beyond leeway",
            |_, c| {
                c.insert("iat".into(), json!(NOW + 61));
            },
            E::IssuedInTheFuture,
        ),
    ]
}

/// Tokens that are correctly signed and must be accepted.
const ACCEPT: &[(&str, Edit)] = &[
    ("J-1 J-10 plain es256 token", |_, _| {}),
    ("J-4 typ JOSE", |h, _| {
        h.insert("typ".into(), "JOSE".into());
    }),
    ("J-4 typ absent", |h, _| {
        h.remove("typ");
    }),
    ("J-7 aud as a string (section 9.8)", |_, c| {
        c.insert("aud".into(), AUD.into());
    }),
    ("J-7 multi-aud", |_, c| {
        c.insert("aud".into(), json!(["spiffe://example.org/a", AUD, "b"]));
    }),
    ("J-8 exp within leeway", |_, c| {
        c.insert("exp".into(), json!(NOW - 60));
    }),
    ("J-8 fractional exp", |_, c| {
        c.insert("exp".into(), json!(NOW as f64 + 0.5));
    }),
    ("J-8 nbf and iat within leeway", |_, c| {
        c.insert("nbf".into(), json!(NOW + 60));
        c.insert("iat".into(), json!(NOW + 60));
    }),
    ("J-9 other claims", |_, c| {
        c.insert("iss".into(), "https://oidc.example.org".into());
        c.insert("jti".into(), "abc".into());
        c.insert("custom".into(), json!({"nested": [1, 2]}));
    }),
    ("J-6 root id subject", |_, c| {
        c.insert("sub".into(), "spiffe://example.org".into());
    }),
];

#[test]
fn spec_rejections() {
    let f = fixture();
    for (item, edit, want) in rejections() {
        let (mut h, mut c) = (header(f.key.kid()), claims());
        edit(&mut h, &mut c);
        let token = forge(&h, &c, es256(&f.key));
        assert_eq!(validate(&token, &f.bundle), Err(want), "{item}");
    }
}

#[test]
fn spec_acceptances() {
    let f = fixture();
    for (item, edit) in ACCEPT {
        let (mut h, mut c) = (header(f.key.kid()), claims());
        edit(&mut h, &mut c);
        let token = forge(&h, &c, es256(&f.key));
        let svid = validate(&token, &f.bundle).unwrap_or_else(|e| panic!("{item}: {e}"));
        assert!(svid.audience().iter().any(|a| a == AUD), "{item}");
        assert_eq!(svid.claims()["aud"], json!(svid.audience()), "{item}");
        assert_eq!(svid.token(), token, "{item}");
    }
}

#[test]
fn j1_compact_serialization_only() {
    let f = fixture();
    let good = f
        .key
        .sign(&JwtSvidParams {
            subject: SpiffeId::new(SUB).unwrap(),
            audience: vec![AUD.into()],
            issued_at: now(),
            expires_at: now() + Duration::from_secs(300),
            issuer: None,
        })
        .unwrap();
    let parts = good.token().split('.').collect::<Vec<_>>();
    let json_serialization = json!({
        "payload": parts[1],
        "signatures": [{"protected": parts[0], "signature": parts[2]}],
    })
    .to_string();
    let flattened = json!({
        "payload": parts[1], "protected": parts[0], "signature": parts[2],
        "header": {"kid": f.key.kid()},
    })
    .to_string();
    let jwe = format!("{}.a.b.c.d", parts[0]);
    let cases: &[(&str, &str, JwtSvidError)] = &[
        (
            "J-1 json serialization",
            &json_serialization,
            E::JsonSerialization,
        ),
        (
            "J-1 flattened json with unprotected header",
            &flattened,
            E::JsonSerialization,
        ),
        ("J-1 five-part jwe", &jwe, E::Encrypted),
        ("J-1 two parts", "a.b", E::Malformed { parts: 2 }),
        ("J-1 four parts", "a.b.c.d", E::Malformed { parts: 4 }),
        ("J-1 empty", "", E::Malformed { parts: 1 }),
        (
            "J-1 bearer prefix",
            &format!("Bearer {}", good.token()),
            E::InvalidBase64 { part: "header" },
        ),
        (
            "J-1 padded base64",
            &format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
            E::InvalidBase64 { part: "header" },
        ),
        (
            "J-1 standard base64 signature",
            &format!("{}.{}.{}+/", parts[0], parts[1], parts[2]),
            E::InvalidBase64 { part: "signature" },
        ),
    ];
    for (item, token, want) in cases {
        assert_eq!(validate(token, &f.bundle).as_ref(), Err(want), "{item}");
    }
    assert!(validate(good.token(), &f.bundle).is_ok());
}

#[test]
fn oversize_token_rejected_before_decoding() {
    let f = fixture();
    let mut c = claims();
    c.insert("pad".into(), "x".repeat(MAX_TOKEN_LEN).into());
    let token = forge(&header(f.key.kid()), &c, es256(&f.key));
    assert_eq!(
        validate(&token, &f.bundle),
        Err(E::TokenTooLarge {
            len: token.len(),
            max: MAX_TOKEN_LEN
        })
    );
    // Garbage of the same size fails the same way, without being parsed.
    let junk = "{".repeat(MAX_TOKEN_LEN + 1);
    assert!(matches!(
        validate(&junk, &f.bundle),
        Err(E::TokenTooLarge { .. })
    ));
}

#[test]
fn header_and_claims_must_be_unambiguous_json_objects() {
    let f = fixture();
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    let kid = f.key.kid();
    let claims_b64 = b64(&Value::Object(claims()).to_string());
    let dup_alg = format!(r#"{{"alg":"ES256","alg":"none","kid":"{kid}"}}"#);
    let escaped_dup = format!(r#"{{"alg":"ES256","\u0061lg":"ES256","kid":"{kid}"}}"#);
    let cases: &[(&str, String)] = &[
        ("duplicate alg", dup_alg),
        ("duplicate alg, escaped", escaped_dup),
        ("array header", "[]".into()),
        ("not json", "alg=ES256".into()),
    ];
    for (item, header_json) in cases {
        let input = format!("{}.{claims_b64}", b64(header_json));
        let token = format!("{input}.{}", b64("sig"));
        assert!(
            matches!(
                validate(&token, &f.bundle),
                Err(E::InvalidJson { part: "header", .. })
            ),
            "{item}"
        );
    }
    let dup_sub = format!(r#"{{"sub":"{SUB}","sub":"spiffe://evil.org/x"}}"#);
    let token = format!(
        "{}.{}.{}",
        b64(&Value::Object(header(kid)).to_string()),
        b64(&dup_sub),
        b64("sig")
    );
    assert!(matches!(
        validate(&token, &f.bundle),
        Err(E::InvalidJson { part: "claims", .. })
    ));
}

#[test]
fn j10_tampered_signature_rejected() {
    let f = fixture();
    let token = forge(&header(f.key.kid()), &claims(), es256(&f.key));
    let (input, sig) = token.rsplit_once('.').unwrap();

    // Flip one bit of the signature.
    let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    raw[10] ^= 1;
    let flipped = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&raw));
    assert_eq!(validate(&flipped, &f.bundle), Err(E::InvalidSignature));

    // Swap in other claims under the same signature.
    let mut c = claims();
    c.insert("sub".into(), "spiffe://example.org/admin".into());
    let (h, _) = input.split_once('.').unwrap();
    let swapped = format!(
        "{h}.{}.{sig}",
        URL_SAFE_NO_PAD.encode(Value::Object(c).to_string())
    );
    assert_eq!(validate(&swapped, &f.bundle), Err(E::InvalidSignature));

    // Truncated and empty signatures.
    assert_eq!(
        validate(&format!("{input}.{}", &sig[..20]), &f.bundle),
        Err(E::InvalidSignature)
    );
    assert_eq!(
        validate(&format!("{input}."), &f.bundle),
        Err(E::InvalidSignature)
    );
}

#[test]
fn j10_wrong_kid_rejected() {
    let f = fixture();
    let token = forge(&header("not-a-kid"), &claims(), es256(&f.key));
    assert_eq!(
        validate(&token, &f.bundle),
        Err(E::UnknownKeyId {
            kid: "not-a-kid".into(),
            trust_domain: td("example.org"),
        })
    );
    // A key from the bundle, named by the kid of another key, does not verify.
    let other = JwtSigningKey::generate().unwrap();
    let mut bundle = f.bundle.clone();
    bundle
        .insert_key(other.kid(), other.public_key().clone())
        .unwrap();
    let token = forge(&header(other.kid()), &claims(), es256(&f.key));
    assert_eq!(validate(&token, &bundle), Err(E::InvalidSignature));
}

#[test]
fn j10_b2_empty_bundle_trusts_nothing() {
    let f = fixture();
    let token = forge(&header(f.key.kid()), &claims(), es256(&f.key));
    let empty = JwtBundle::new(td("example.org"));
    assert!(empty.is_empty());
    assert!(matches!(
        validate(&token, &empty),
        Err(E::UnknownKeyId { .. })
    ));
}

#[test]
fn j10_no_bundle_for_the_trust_domain_is_untrusted() {
    let f = fixture();
    let mut c = claims();
    c.insert("sub".into(), "spiffe://other.org/web".into());
    let token = forge(&header(f.key.kid()), &c, es256(&f.key));
    let want = Err(E::UntrustedTrustDomain {
        trust_domain: td("other.org"),
    });
    // A bundle answers only for its own trust domain (B-9)...
    assert_eq!(validate(&token, &f.bundle), want);
    // ...and so does a set without other.org.
    let set = JwtBundleSet::from_iter([f.bundle.clone()]);
    assert_eq!(validate(&token, &set), want);
    assert_eq!(validate(&token, &JwtBundleSet::new()), want);
}

#[test]
fn j10_key_from_another_trust_domain_is_not_used() {
    // Trust domain a signs a token claiming a subject in trust domain b. Both bundles are
    // trusted; only b's keys may verify b's subjects (B-9, B-10).
    let a = fixture();
    let b = JwtSigningKey::generate().unwrap();
    let mut b_bundle = JwtBundle::new(td("b.org"));
    b_bundle
        .insert_key(b.kid(), b.public_key().clone())
        .unwrap();
    let set = JwtBundleSet::from_iter([a.bundle.clone(), b_bundle.clone()]);

    let mut c = claims();
    c.insert("sub".into(), "spiffe://b.org/web".into());
    let token = forge(&header(a.key.kid()), &c, es256(&a.key));
    assert_eq!(
        validate(&token, &set),
        Err(E::UnknownKeyId {
            kid: a.key.kid().into(),
            trust_domain: td("b.org"),
        })
    );

    // Even when b's bundle has a key under the same kid, a's signature does not verify.
    let mut b_same_kid = JwtBundle::new(td("b.org"));
    b_same_kid
        .insert_key(a.key.kid(), b.public_key().clone())
        .unwrap();
    let set = JwtBundleSet::from_iter([a.bundle.clone(), b_same_kid]);
    assert_eq!(validate(&token, &set), Err(E::InvalidSignature));

    // And a's own subjects still validate with a's key from the same set.
    let token = forge(&header(a.key.kid()), &claims(), es256(&a.key));
    assert!(validate(&token, &set).is_ok());
}

#[test]
fn j2_algorithms_verified_with_ring() {
    let (rsa, rsa_public) = rsa_key_pair();
    let p384 = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap()
        .as_ref(),
        &SystemRandom::new(),
    )
    .unwrap();
    let p384_public =
        JwtPublicKey::ec_uncompressed(EcCurve::P384, p384.public_key().as_ref()).unwrap();
    let es = fixture();

    let mut bundle = es.bundle.clone();
    bundle.insert_key("rsa", rsa_public).unwrap();
    bundle.insert_key("p384", p384_public).unwrap();

    let with = |alg: &str, kid: &str| {
        let mut h = header(kid);
        h.insert("alg".into(), alg.into());
        h
    };
    let rsa_signer = |padding: &'static dyn signature::RsaEncoding| {
        let rsa = &rsa;
        move |m: &[u8]| rsa_sign(rsa, padding, m)
    };
    let p384_signer = |m: &[u8]| {
        p384.sign(&SystemRandom::new(), m)
            .unwrap()
            .as_ref()
            .to_vec()
    };

    let accepted = [
        (
            "J-2 RS256",
            forge(
                &with("RS256", "rsa"),
                &claims(),
                rsa_signer(&signature::RSA_PKCS1_SHA256),
            ),
        ),
        (
            "J-2 RS384",
            forge(
                &with("RS384", "rsa"),
                &claims(),
                rsa_signer(&signature::RSA_PKCS1_SHA384),
            ),
        ),
        (
            "J-2 RS512",
            forge(
                &with("RS512", "rsa"),
                &claims(),
                rsa_signer(&signature::RSA_PKCS1_SHA512),
            ),
        ),
        (
            "J-2 PS256",
            forge(
                &with("PS256", "rsa"),
                &claims(),
                rsa_signer(&signature::RSA_PSS_SHA256),
            ),
        ),
        (
            "J-2 PS384",
            forge(
                &with("PS384", "rsa"),
                &claims(),
                rsa_signer(&signature::RSA_PSS_SHA384),
            ),
        ),
        (
            "J-2 PS512",
            forge(
                &with("PS512", "rsa"),
                &claims(),
                rsa_signer(&signature::RSA_PSS_SHA512),
            ),
        ),
        (
            "J-2 ES384",
            forge(&with("ES384", "p384"), &claims(), p384_signer),
        ),
        (
            "J-2 ES256",
            forge(&header(es.key.kid()), &claims(), es256(&es.key)),
        ),
    ];
    for (item, token) in &accepted {
        validate(token, &bundle).unwrap_or_else(|e| panic!("{item}: {e}"));
    }

    let rejected = [
        (
            "J-2 RS256 signature labelled PS256",
            forge(
                &with("PS256", "rsa"),
                &claims(),
                rsa_signer(&signature::RSA_PKCS1_SHA256),
            ),
            E::InvalidSignature,
        ),
        (
            "J-2 ES512 allowed but unsupported",
            forge(&with("ES512", es.key.kid()), &claims(), es256(&es.key)),
            E::UnsupportedAlgorithm { alg: "ES512" },
        ),
        (
            "J-2 RS256 with an EC key",
            forge(&with("RS256", es.key.kid()), &claims(), es256(&es.key)),
            E::KeyAlgorithmMismatch {
                alg: "RS256",
                kid: es.key.kid().into(),
            },
        ),
        (
            "J-2 ES256 with an RSA key",
            forge(&with("ES256", "rsa"), &claims(), es256(&es.key)),
            E::KeyAlgorithmMismatch {
                alg: "ES256",
                kid: "rsa".into(),
            },
        ),
        (
            "J-2 ES384 with a P-256 key",
            forge(&with("ES384", es.key.kid()), &claims(), es256(&es.key)),
            E::KeyAlgorithmMismatch {
                alg: "ES384",
                kid: es.key.kid().into(),
            },
        ),
        (
            "J-2 ES256 with a P-384 key",
            forge(&with("ES256", "p384"), &claims(), p384_signer),
            E::KeyAlgorithmMismatch {
                alg: "ES256",
                kid: "p384".into(),
            },
        ),
    ];
    for (item, token, want) in rejected {
        assert_eq!(validate(&token, &bundle), Err(want), "{item}");
    }
}
