//! The CA's CSR reader, which every agent and `x509 mint` caller reaches: never panics, and
//! accepts only a CSR whose signature verifies with its own P-256 key (the fuzzer cannot forge
//! an ECDSA signature, so an accepted input must be a real CSR: its key is a 65-byte point).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = sigil_server::fuzzing::csr_public_key(data) {
        assert_eq!(key.len(), 65);
        assert_eq!(key[0], 0x04);
    }
});
