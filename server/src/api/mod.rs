//! The server's gRPC services.
//!
//! - [`admin`]: the operator API (`sigil.admin.v1`), a local Unix socket authorized by uid.
//! - [`node`]: the agent-facing API (`sigil.node.v1`), TCP with mTLS.
//! - [`entry_cache`]: every entry in memory, kept current from the change feed; what the node
//!   API authorizes agents from and feeds their sync streams with.

pub mod admin;
pub mod entry_cache;
pub mod node;
