//! SPIFFE ID and trust domain parsing: never panics; whatever parses prints back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sigil_core::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::new(input) {
        assert_eq!(id.as_str(), input);
        assert_eq!(SpiffeId::new(id.as_str()).as_ref(), Ok(&id));
        let _ = id.trust_domain().root_id();
    }
    if let Ok(td) = TrustDomain::new(input) {
        assert!(td.name().len() <= sigil_core::spiffe_id::MAX_TRUST_DOMAIN_LEN);
    }
});
