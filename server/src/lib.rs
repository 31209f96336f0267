//! # sigil-server: the trust domain's authority
//!
//! The server holds the trust domain's signing keys, keeps the registration entries and attested
//! agents in its store, and serves agents over TCP with mTLS.
//!
//! - [`api`]: the gRPC services; [`api::node`] is the agent-facing API.
//! - [`config`]: the TOML file and flags, checked all at once into a typed [`config::ServerConfig`].
//! - [`ca`]: the signing authorities (self-signed P-256 roots), their rotation as a pure function
//!   of time, and one signing method per credential kind.
//! - [`audit`]: the hash-chained audit log, its signed checkpoints and its verification.
//! - [`session`]: privileged sessions (open, approve, close, revoke, expiry by the server's
//!   clock) and the certificate revocation lists.
//! - [`store`]: the [`store::Store`] trait, its sled backend with group commit, and the change
//!   feed that drives agent sync.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod config;
pub mod policy;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
