//! The server's gRPC services.
//!
//! - [`admin`]: the operator API (`sigil.admin.v1`), a local Unix socket authorized by uid.
//! - [`node`]: the agent-facing API (`sigil.node.v1`), TCP with mTLS.

pub mod admin;
pub mod node;
