//! The sled store's record decoders (entries, changes, audit records; the binary form and the
//! JSON of earlier builds), which read whatever is in the data directory at start-up and on
//! every read: never panic, and a value they accept is one the store writes and reads back
//! unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(problem) = sigil_server::fuzzing::store_records(data) {
        panic!("{problem}");
    }
});
