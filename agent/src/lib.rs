//! # sigil-agent: the node agent
//!
//! The agent attests to the server with a join token, keeps the entries authorized for it in
//! sync, mints and renews an X509-SVID per entry, attests the local workloads that call it over a
//! Unix socket, and serves them the SPIFFE Workload API.
//!
//! ## Layout: who owns what, who may call whom
//!
//! ```text
//!  main.rs ── cli (Workload API client commands)
//!     │
//!  agent (composition root: identity, manager, Workload API, one shutdown)
//!     │
//!  workload_api ── service, sessions, caller, listener, http_authority, peer
//!     │
//!  manager ── the sync loop, and mint::Minter: every SVID the agent obtains
//!     │
//!     ├── cache   the published Inventory: what the agent can hand out, to whom
//!     ├── node    the agent's own identity and its mTLS connection to the server
//!     └── config
//! ```
//!
//! - [`config`]: the TOML file and flags, checked all at once.
//! - [`node`]: the agent's own identity and its mTLS connection to the server.
//! - [`manager`]: the sync stream, SVID minting ahead and renewal, the published
//!   [`cache::Inventory`], and the [`manager::Minter`] the Workload API mints through (JWT-SVIDs
//!   cached per entry and audience; session SVIDs per caller, never cached).
//! - [`cache`]: what the agent can hand out, and which identities a workload's selectors grant.
//! - [`workload_api`]: the SPIFFE Workload API: the service and its front door.
//! - [`telemetry`]: the agent's metrics and readiness (served by `sigil_daemon::telemetry`).
//! - [`agent`]: the composition root; [`cli`]: the Workload API client commands.
//!
//! No module imports one that imports it back (`tests/tests/module_graph.rs`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod cache;
pub mod cli;
pub mod config;
pub mod manager;
pub mod node;
pub mod telemetry;
pub mod workload_api;
