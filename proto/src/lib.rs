//! Protocol buffers for Sigil, generated at build time with [protox](https://docs.rs/protox)
//! (pure Rust), so neither building nor testing needs `protoc`.
//!
//! - [`workload`]: the SPIFFE Workload API, field for field as the SPIFFE standard defines it.
//!   The proto has no `package` line, so the service is `SpiffeWorkloadAPI` and its methods are
//!   served at `/SpiffeWorkloadAPI/<Method>`, as every SPIFFE client expects.
//!
//! - [`node`]: `sigil.node.v1`, the agent-facing API of the server (TCP with mTLS).
//! - [`admin`]: `sigil.admin.v1`, the operator API of the server (local Unix socket).
//! - [`audit`]: `sigil.audit.v1`, the audit ingest API of the server (TCP with mTLS), where
//!   brokers record what session identities did.
//! - [`client`]: connecting to the Workload API and the admin API over their Unix sockets.
#![forbid(unsafe_code)]

pub mod client;

/// Every gRPC method the protos define, as (`package.Service`, `Method`): the paths the servers
/// answer, and so the only values their call metrics use as labels.
pub const RPC_METHODS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/rpc_methods.rs"));

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

/// The `sigil.*` packages, nested as their names are so that one may use another's messages
/// (`sigil.admin.v1` uses `sigil.node.v1.AuditCheckpoint`); [`node`] and [`admin`] name them.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod sigil {
    /// `sigil.node.v1`.
    pub mod node {
        /// `sigil.node.v1`.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/sigil.node.v1.rs"));
        }
    }
    /// `sigil.admin.v1`.
    pub mod admin {
        /// `sigil.admin.v1`.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/sigil.admin.v1.rs"));
        }
    }
    /// `sigil.audit.v1`.
    pub mod audit {
        /// `sigil.audit.v1`.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/sigil.audit.v1.rs"));
        }
    }
}

/// `sigil.node.v1`: the agent-facing API of the Sigil server.
pub use self::sigil::node::v1 as node;

/// `sigil.admin.v1`: the operator API of the Sigil server.
pub use self::sigil::admin::v1 as admin;

/// `sigil.audit.v1`: the audit ingest API of the Sigil server.
pub use self::sigil::audit::v1 as audit;
