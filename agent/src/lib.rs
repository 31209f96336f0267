//! # sigil-agent: the node agent
//!
//! The agent attests to the server with a join token, keeps the entries authorized for it in
//! sync, mints and renews an X509-SVID per entry, attests the local workloads that call it over a
//! Unix socket, and serves them the SPIFFE Workload API.
//!
//! - [`config`]: the TOML file and flags, checked all at once.
//! - [`node`]: the agent's own identity and its mTLS connection to the server.
//! - [`manager`]: the sync stream, SVID minting and renewal, and the published [`cache::Snapshot`].
//! - [`cache`]: what the agent can hand out, and which identities a workload's selectors grant.
//! - [`workload`]: the SPIFFE Workload API service.
//! - [`agent`]: the composition root; [`cli`]: the Workload API client commands.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod cache;
pub mod cli;
pub mod config;
pub mod manager;
pub mod node;
pub mod workload;
pub mod workload_api;
