//! Signing: what a signed token holds, refused parameters, and keys that never print secrets.

use base64::Engine as _;

use super::*;
use crate::spiffe_id::SpiffeId;

#[test]
fn sign_emits_what_spire_emits() {
    let f = fixture();
    let svid = f
        .key
        .sign(&JwtSvidParams {
            subject: SpiffeId::new(SUB).unwrap(),
            audience: vec![AUD.into()],
            issued_at: now() + Duration::from_millis(700),
            expires_at: now() + Duration::from_secs(300),
            issuer: Some("https://oidc.example.org".into()),
        })
        .unwrap();
    let token = svid.token();
    assert!(!token.contains('='), "base64url without padding");
    let parts = token.split('.').collect::<Vec<_>>();
    assert_eq!(parts.len(), 3);
    let decode =
        |p: &str| -> Value { serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap() };
    // Section 9.2: kid always emitted; typ JWT.
    assert_eq!(
        decode(parts[0]),
        json!({"alg": "ES256", "kid": f.key.kid(), "typ": "JWT"})
    );
    // Section 9.8: aud is an array even with one audience.
    assert_eq!(
        decode(parts[1]),
        json!({"sub": SUB, "aud": [AUD], "exp": NOW + 300, "iat": NOW,
               "iss": "https://oidc.example.org"})
    );
    assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 64);

    let parsed = validate(token, &f.bundle).unwrap();
    assert_eq!(parsed.spiffe_id().as_str(), SUB);
    assert_eq!(parsed.audience(), [AUD]);
    assert_eq!(parsed.expiry(), now() + Duration::from_secs(300));
    assert_eq!(parsed.claims(), svid.claims());
    assert_eq!(parsed, svid);

    // Multiple audiences (WA-13: every aud value goes into the token).
    let multi = f
        .key
        .sign(&JwtSvidParams {
            subject: SpiffeId::new(SUB).unwrap(),
            audience: vec!["a".into(), AUD.into()],
            issued_at: now(),
            expires_at: now() + Duration::from_secs(60),
            issuer: None,
        })
        .unwrap();
    let parsed = validate(multi.token(), &f.bundle).unwrap();
    assert_eq!(parsed.audience(), ["a", AUD]);
    assert!(!parsed.claims().contains_key("iss"));
}

#[test]
fn sign_refuses_bad_params() {
    let f = fixture();
    let base = JwtSvidParams {
        subject: SpiffeId::new(SUB).unwrap(),
        audience: vec![AUD.into()],
        issued_at: now(),
        expires_at: now() + Duration::from_secs(60),
        issuer: None,
    };
    let cases: Vec<(&str, JwtSvidParams, JwtSvidError)> = vec![
        (
            "J-7 no audience",
            JwtSvidParams {
                audience: vec![],
                ..base.clone()
            },
            E::EmptyAudience,
        ),
        (
            "J-7 empty audience",
            JwtSvidParams {
                audience: vec![AUD.into(), String::new()],
                ..base.clone()
            },
            E::EmptyAudience,
        ),
        (
            "J-8 exp not after iat",
            JwtSvidParams {
                expires_at: now(),
                ..base.clone()
            },
            E::Signing {
                reason: "exp must be after iat",
            },
        ),
        (
            "time before 1970",
            JwtSvidParams {
                issued_at: UNIX_EPOCH - Duration::from_secs(1),
                ..base.clone()
            },
            E::Signing {
                reason: "time is before 1970",
            },
        ),
    ];
    for (item, params, want) in cases {
        assert_eq!(f.key.sign(&params), Err(want), "{item}");
    }
    // The validator refuses an empty audience argument outright.
    let token = f.key.sign(&base).unwrap();
    assert_eq!(
        JwtSvid::parse_and_validate(token.token(), &f.bundle, "", now()),
        Err(E::EmptyAudience)
    );
}

#[test]
fn signing_key_from_pkcs8_and_debug_hides_secrets() {
    let pkcs8 = JwtSigningKey::generate_pkcs8().unwrap();
    let a = JwtSigningKey::from_pkcs8(pkcs8.secret_pkcs8_der()).unwrap();
    let b = JwtSigningKey::from_pkcs8(pkcs8.secret_pkcs8_der()).unwrap();
    // The default kid is the RFC 7638 thumbprint: stable across reloads.
    assert_eq!(a.kid(), b.kid());
    assert_eq!(a.kid(), a.public_key().thumbprint());
    assert_eq!(a.public_key(), b.public_key());
    assert_eq!(a.public_key().curve(), Some(EcCurve::P256));

    let renamed = b.with_kid("authority-1").unwrap();
    assert_eq!(renamed.kid(), "authority-1");
    assert!(matches!(
        JwtSigningKey::generate().unwrap().with_kid(""),
        Err(E::EmptyKeyId)
    ));

    // A P-256 key made by rcgen loads too.
    let rcgen_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    assert!(JwtSigningKey::from_pkcs8(&rcgen_key.serialize_der()).is_ok());
    // A P-384 key is not an ES256 key.
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    assert!(matches!(
        JwtSigningKey::from_pkcs8(&p384.serialize_der()),
        Err(E::InvalidSigningKey { .. })
    ));
    assert!(matches!(
        JwtSigningKey::from_pkcs8(b"junk"),
        Err(E::InvalidSigningKey { .. })
    ));

    let debug = format!("{a:?}");
    assert_eq!(
        debug,
        format!("JwtSigningKey {{ alg: \"ES256\", kid: {:?}, .. }}", a.kid())
    );
    let secret_b64 = STANDARD.encode(pkcs8.secret_pkcs8_der());
    assert!(!debug.contains(&secret_b64[40..60]));

    // The token is a bearer credential: Debug redacts it.
    let svid = a
        .sign(&JwtSvidParams {
            subject: SpiffeId::new(SUB).unwrap(),
            audience: vec![AUD.into()],
            issued_at: now(),
            expires_at: now() + Duration::from_secs(60),
            issuer: None,
        })
        .unwrap();
    let debug = format!("{svid:?}");
    assert!(debug.contains("<redacted>"), "{debug}");
    let signature = svid.token().rsplit('.').next().unwrap();
    assert!(!debug.contains(signature), "{debug}");
}
