//! The agent's HTTP/2 `:authority` layer (the HPACK pre-scanner and re-encoder in front of h2 on
//! the Workload API socket), which any local process reaches before it is attested: never
//! panics, whatever the bytes and however they are split into reads.
//!
//! The input's first byte picks the chunk size; the rest follows the client preface, so the
//! fuzzer spends its time on frames and header blocks, not on the preface.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sigil_agent::workload_api::http_authority::AuthorityNormalizer;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&split, frames)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(frames);
    let mut normalizer = AuthorityNormalizer::new();
    // A server that announces a larger table, as h2 may.
    normalizer.observe_server(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0x40, 0]);
    let mut out = BytesMut::new();
    for piece in input.chunks(chunk) {
        if normalizer.feed(piece, &mut out).is_err() {
            return;
        }
        out.clear();
    }
});
