//! # sigil-core: the SPIFFE domain types
//!
//! Everything Sigil knows about SPIFFE, as plain data and pure functions: no tokio, no tonic, no
//! store. The server, the agent and the attestors build on these types; so can any program that
//! needs to parse or check what Sigil issues.
//!
//! What is here, each module with the spec rules it enforces (numbers refer to the checklist in
//! `spec/spiffe.md`):
//!
//! - [`spiffe_id`]: [`SpiffeId`] and [`TrustDomain`] (ID-1 to ID-22). Trust domain names carry no
//!   registration authority (ID-21): pick a name you own, such as a suffix of a DNS name you
//!   control, or a UUID for generated ones.
//!
//! What is not here: signing authorities, the store, networking and attestation live in the
//! server, agent and attestors crates.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod spiffe_id;

pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
