//! The SPIFFE Workload API endpoint of the agent: one module, one file per part.
//!
//! - [`service`]: [`WorkloadApi`], the five RPCs (spec sections 5 and 6): header check,
//!   attestation of the caller, entitlement, streams.
//! - [`server`]: [`WorkloadApiServer`], the gRPC service: the generated one, with
//!   `FetchX509SVID`'s messages written as encoded once for every stream that gets them.
//! - [`sessions`]: a caller's privileged-session SVIDs, minted for it alone and renewed.
//! - [`caller`]: [`CallerIdentity`], who is calling (kernel credentials, same process?).
//! - [`listener`]: [`WorkloadListener`] binds the Unix socket and yields [`FrontDoorStream`]s for
//!   `tonic::transport::Server::serve_with_incoming_shutdown` (the front door).
//! - [`http_authority`]: the layer below h2 that normalises the `:authority` gRPC C-core, Java
//!   and Swift clients send over Unix sockets, which h2 would refuse.
//! - [`peer`]: [`CallerProcess`], the caller's kernel credentials and a handle on its process,
//!   which tonic hands to every request as the connection's connect info:
//!
//! ```no_run
//! # use sigil_agent::workload_api::CallerProcess;
//! # fn handler(request: tonic::Request<()>) -> Result<(), tonic::Status> {
//! let caller = request
//!     .extensions()
//!     .get::<CallerProcess>()
//!     .ok_or_else(|| tonic::Status::internal("no caller"))?;
//! // ... attest caller.pid() ...
//! if !caller.still_alive_and_same() {
//!     return Err(tonic::Status::unavailable("caller exited"));
//! }
//! # Ok(())
//! # }
//! ```

pub mod caller;
pub mod http_authority;
pub mod listener;
pub mod peer;
pub mod server;
pub mod service;
pub mod sessions;

pub use caller::{CallerIdentity, CallerLookup, front_door_caller};
pub use http_authority::{AuthorityError, NormalizeAuthority};
pub use listener::{FrontDoorStream, ListenerError, WorkloadListener};
pub use peer::{CallerProcess, PeerError, ProcessHandleKind, ProcessTracking};
pub use server::WorkloadApiServer;
pub use service::{SECURITY_HEADER, WorkloadApi, WorkloadError};
