//! Protocol buffers for Sigil, generated at build time with [protox](https://docs.rs/protox)
//! (pure Rust), so neither building nor testing needs `protoc`.
//!
//! - [`workload`]: the SPIFFE Workload API, field for field as the SPIFFE standard defines it.
//!   The proto has no `package` line, so the service is `SpiffeWorkloadAPI` and its methods are
//!   served at `/SpiffeWorkloadAPI/<Method>`, as every SPIFFE client expects.
//!
//! - [`node`]: `sigil.node.v1`, the agent-facing API of the server (TCP with mTLS).
//! - [`admin`]: `sigil.admin.v1`, the operator API of the server (local Unix socket).
#![forbid(unsafe_code)]

/// The SPIFFE Workload API (`workload.proto`): messages, the `SpiffeWorkloadAPI` server trait and
/// its client.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// `sigil.node.v1`: the agent-facing API of the Sigil server.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod node {
    include!(concat!(env!("OUT_DIR"), "/sigil.node.v1.rs"));
}

/// `sigil.admin.v1`: the operator API of the Sigil server.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/sigil.admin.v1.rs"));
}
