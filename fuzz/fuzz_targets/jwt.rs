//! JWT-SVID parsing and validation: never panics, never accepts a token that its key did not
//! sign (the fuzzer cannot forge an ES256 signature, so any Ok is a bug).
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use sigil_core::jwt::{JwtBundle, JwtSigningKey, JwtSvid};
use sigil_core::TrustDomain;

fn bundle() -> Option<&'static JwtBundle> {
    static BUNDLE: OnceLock<Option<JwtBundle>> = OnceLock::new();
    BUNDLE
        .get_or_init(|| {
            let td = TrustDomain::new("example.org").ok()?;
            let key = JwtSigningKey::generate().ok()?.with_kid("k1").ok()?;
            let mut bundle = JwtBundle::new(td);
            bundle.insert_key("k1", key.public_key().clone()).ok()?;
            Some(bundle)
        })
        .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let Some(bundle) = bundle() else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(token) = std::str::from_utf8(data) {
        assert!(JwtSvid::parse_and_validate(token, bundle, "aud", now).is_err());
    }
    if let Ok(td) = TrustDomain::new("example.org") {
        let _ = JwtBundle::from_jwks(td, data);
    }
});
