//! # sigil-attestors: node and workload attestation
//!
//! - [`unix`]: the `unix` workload attestor: selectors from the caller's kernel credentials
//!   (uid, gid, names, supplementary groups, executable path and hash).
//! - [`join_token`]: the node attestation trait for one-time join tokens, declared here and
//!   implemented by the server's store (which consumes tokens atomically).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod join_token;
pub mod unix;
