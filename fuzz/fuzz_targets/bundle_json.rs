//! SPIFFE bundle JSON and bundle maps: never panic; whatever parses re-emits and re-parses to
//! the same bundle.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sigil_core::TrustDomain;
use sigil_core::spiffe_bundle::{BundleMap, SpiffeBundle};

fuzz_target!(|data: &[u8]| {
    let Ok(td) = TrustDomain::new("example.org") else {
        return;
    };
    if let Ok(bundle) = SpiffeBundle::parse(td.clone(), data) {
        let again = SpiffeBundle::parse(td, &bundle.to_json());
        assert_eq!(again.as_ref(), Ok(&bundle));
    }
    if let Ok(map) = BundleMap::parse(data) {
        let again = BundleMap::parse(&map.to_json());
        assert!(again.is_ok());
    }
});
