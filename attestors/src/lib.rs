//! # sigil-attestors: node and workload attestation
//!
//! - [`unix`]: the `unix` workload attestor: selectors from the caller's kernel credentials
//!   (uid, gid, names, supplementary groups, executable path and hash).
//! - [`node`]: the node attestor trait ([`node::NodeAttestor`]) the server attests agents
//!   through, with a challenge round trip for attestors that need one.
//! - [`join_token`]: one-time join tokens (the token store is a trait implemented by the
//!   server's store, which consumes tokens atomically).
//! - [`x509pop`]: proof of possession of a host certificate's key, as SPIRE's `x509pop`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod join_token;
pub mod node;
pub mod unix;
pub mod x509pop;
