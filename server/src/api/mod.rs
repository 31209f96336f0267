//! The server's gRPC services: thin handlers over [`crate::service`].
//!
//! - [`admin`]: the operator API (`sigil.admin.v1`), a local Unix socket authorized by uid.
//! - [`node`]: the agent-facing API (`sigil.node.v1`), TCP with mTLS.
//! - [`ingest`]: the audit ingest API (`sigil.audit.v1`), on the same port, for listed audit
//!   sources (brokers).
//! - [`audit`]: audit records and checkpoints on the wire.
//! - [`status`]: each service's errors as gRPC statuses, one function per service.
//!
//! A handler authorizes the caller, converts the request to domain types, calls one service
//! method and maps the error; it writes no store and appends no audit record of its own.

pub(crate) mod admin;
pub(crate) mod audit;
pub(crate) mod ingest;
pub(crate) mod node;
pub(crate) mod status;
