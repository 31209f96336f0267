//! Tests of the `jwt` module: the shared fixtures here, with the strict JSON and error-text
//! tests; the spec rules of validation in `tests/validation.rs`, signing in `tests/signing.rs`,
//! JWKs, JWKS and bundles in `tests/keys.rs`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature;
use serde_json::{Map, Value, json};

use super::*;
use crate::spiffe_id::TrustDomain;
use JwtSvidError as E;

mod keys;
mod signing;
mod validation;

/// A fixed "now": 2023-11-14T22:13:20Z.
const NOW: u64 = 1_700_000_000;
const SUB: &str = "spiffe://example.org/web";
const AUD: &str = "spiffe://example.org/db";

/// A 2048-bit RSA key for the RS*/PS* cases (ring cannot generate RSA keys). Made with
/// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 | openssl pkcs8 -topk8
/// -nocrypt -outform DER | base64 -w0`; test use only.
pub(crate) const RSA_2048_PKCS8_B64: &str = concat!(
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDLJPLUUi0OV/I2RBwH47UKUVfdixT0Tjjd2mbzuKTh",
    "jkMAzkWxNVFHTuBcGUAYpgIdhjDapOn8c/pdyYtXa4w/21m0AtZ4BOKxqDNu+R3GocpOAHPDiRazm1MvIxtqRl5qUdYO",
    "4GPydF2Odp8jqm1YmxZu0CfWBCy8jfY9PcLkRYtUsW6PU5/fUZhqCum50jqUbgzvJDcs3Ud6ZbeyIq0+ccb1DmWVMHek",
    "GT4+Z/01NBbUAUb9qNHoc20xJarHYwuK6Q18FZXSBxXzpG9dtcAkEpmyMujnAZDp1nkm+d42vFXx3qaabBQh3cV6rzwX",
    "kOpqeqKd0JA4NHeY91hlfncjAgMBAAECggEAN8teJpKrbVUaYW0zhbc08jCFQYQBrVgOpmBmBmqgXpMENCRzX8iVGlC/",
    "rowA3sQ5sII6yNKisYPpL/k7HDedvawxZw+geDZfTQw1lDU3yGaHegUFxp7QbWQr5LZvwTCyneD8OfnHecAcMhTCgLk+",
    "byepcaYaSt26q88R4qAj9y3lYaotLrx9oT9Bx9Ax/z9Kia7LpCRXd1h1fLKgpIu3CvOcCg7wbr450CLb0GX+VBjyBFaW",
    "azxuRAN5xZYi8eN8HDAnO1E0e/DsO/Vzb14OXRhW8N7Gl3pn7Z6F3OJUTfw1vVfqL3nQeeYXKlWguQUapjZOizRDTUIj",
    "ZRf4kgFmAQKBgQDkzwC5GcIBlw/YWgjMPwqQRMuIeZpE5Kmrsg7LF+gLUTjtwrSPEr6EU6wbwlDWme40r1cwNzE1sm65",
    "n701zA9TjOBe8T7nj3xVEkTA9S3PE4SWYf7aKQUD3F0T20s9wRIh/zphxgOHc2AzeWzKz4QtvffxANsh+jo79WihNS1C",
    "UwKBgQDjSSqx604WAjbI1i5ZVauJalqIvayY6f6iFK7MakRAqmWT003bF/fb5jSH7Z1tO5igaxWR21yfnjbLj1yAs1P5",
    "iHDahmUiIFTvHlWtbfidKmaWo2hKC5GbusegEf57XRTfncv76CYan5sjLefyGNzl7ZPrnki8uiU7TvkEam398QKBgQCm",
    "qQDl0pU1g0rPVAVEgEa5fuKhrbForQXJQhD0bZ1fYPIOfNv3urd6u1eJgKhRKB4R0gW34Pu/GRD9tBSlstUXDm3/uckP",
    "8bumW4Ao7G1Jf/X7c7WmQmqcvU4uwHS1roP+r2FfBlRbvPY9iBxuPWkRyGVo7i6vOQxh0Ac+JPWqcQKBgHDI2PfrBRek",
    "x5zHs74+5d1NullKjgBfdSzmyIrFXNMd+0PswiCrdyJWzNB61/jhbu6D1PNJAGBwuU4v+L4gvtX/n8jAkiTqGFuEGQ3z",
    "mUAcT0YHFnRP41R8zhyfcUG0QexpOFTrsSTa+LfvSr73GX67cwCjzgJg+KLCoI1RZv1xAoGAJuHOJpLKYfHNgShFBYgH",
    "jRpJaJHZPnnfU/foN3o5RBEfCRzYAz3w+pP/xsM8LYUfckPI9UOgf3qdf3b1Mad3CdU8b7M6dUWGfiWY5OkcFJG1CyRn",
    "yKFYz+a4ohisOPeAnX6vLZVTzyWZFghLml8u+M0VHtNOE7OjVccJOmxB9+I=",
);
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// A signing key and the example.org bundle that holds its public key.
struct Fixture {
    key: JwtSigningKey,
    bundle: JwtBundle,
}

fn fixture() -> Fixture {
    let key = JwtSigningKey::generate().unwrap();
    let mut bundle = JwtBundle::new(td("example.org"));
    bundle
        .insert_key(key.kid(), key.public_key().clone())
        .unwrap();
    Fixture { key, bundle }
}

fn header(kid: &str) -> Map<String, Value> {
    obj(json!({"alg": "ES256", "kid": kid, "typ": "JWT"}))
}

fn claims() -> Map<String, Value> {
    obj(json!({"sub": SUB, "aud": [AUD], "exp": NOW + 300, "iat": NOW}))
}

fn obj(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// Builds a compact JWS from any header and claims, signed by `sign`.
fn forge(
    header: &Map<String, Value>,
    claims: &Map<String, Value>,
    sign: impl Fn(&[u8]) -> Vec<u8>,
) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(Value::Object(header.clone()).to_string()),
        URL_SAFE_NO_PAD.encode(Value::Object(claims.clone()).to_string())
    );
    let signature = sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn es256(key: &JwtSigningKey) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
    |message| key.sign_raw(message).unwrap()
}

fn validate(token: &str, bundles: &impl JwtBundleSource) -> Result<JwtSvid, JwtSvidError> {
    JwtSvid::parse_and_validate(token, bundles, AUD, now())
}

fn rsa_key_pair() -> (signature::RsaKeyPair, JwtPublicKey) {
    let der = STANDARD.decode(RSA_2048_PKCS8_B64).unwrap();
    let key_pair = signature::RsaKeyPair::from_pkcs8(&der).unwrap();
    let components = signature::RsaPublicKeyComponents::<Vec<u8>>::from(key_pair.public());
    let public = JwtPublicKey::rsa(&components.n, &components.e).unwrap();
    (key_pair, public)
}

fn rsa_sign(
    key_pair: &signature::RsaKeyPair,
    padding: &'static dyn signature::RsaEncoding,
    message: &[u8],
) -> Vec<u8> {
    let mut sig = vec![0; key_pair.public().modulus_len()];
    key_pair
        .sign(padding, &SystemRandom::new(), message, &mut sig)
        .unwrap();
    sig
}

#[test]
fn strict_json_rejects_duplicates_at_any_depth() {
    assert!(parse_json_strict(br#"{"a": {"b": 1, "b": 2}}"#).is_err());
    assert!(parse_json_strict(br#"[{"a": 1, "\u0061": 2}]"#).is_err());
    assert_eq!(
        parse_json_strict(br#"{"a": [1, -2, 2.5, "s", null, true, {}], "b": {"a": 1}}"#).unwrap(),
        json!({"a": [1, -2, 2.5, "s", null, true, {}], "b": {"a": 1}})
    );
    assert!(parse_json_strict(b"{} trailing").is_err());
}

#[test]
fn errors_are_lowercase() {
    let samples = [
        E::MissingKeyId,
        E::DisallowedAlgorithm { alg: "none".into() },
        E::InvalidSignature,
        E::Expired,
        E::UntrustedTrustDomain {
            trust_domain: td("example.org"),
        },
    ];
    for e in samples {
        let text = e.to_string();
        assert!(text.starts_with(|c: char| c.is_lowercase()), "{text}");
        assert!(!text.ends_with('.'), "{text}");
    }
}
