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
//! - [`selector`]: [`Selector`] (`type:value`) and [`SelectorSet`], with the matching rule: an
//!   entry applies to a workload when every selector of the entry is among the workload's.
//! - [`endpoint`]: [`EndpointAddress`], the `SPIFFE_ENDPOINT_SOCKET` format (WE-8 to WE-11).
//! - [`lifetime`]: NotBefore/NotAfter, renewal and authority rotation as pure functions of `now`.
//!
//! What is not here: signing authorities, the store, networking and attestation live in the
//! server, agent and attestors crates.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod endpoint;
pub mod lifetime;
pub mod selector;
pub mod spiffe_id;

pub use endpoint::{EndpointAddress, EndpointError};
pub use lifetime::{LifetimeError, Validity};
pub use selector::{Selector, SelectorError, SelectorSet};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
