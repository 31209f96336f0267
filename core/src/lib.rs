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
//! - [`duration`]: durations as operators write them (`90s`, `5m`, `1h30m`), both ways.
//! - [`time`]: RFC 3339 times in UTC, formatted and parsed, for the command lines, and the
//!   Unix-seconds conversions the protos use.
//! - [`hex`]: lowercase hex, the one spelling of serials, hashes and fingerprints.
//! - [`lifetime`]: NotBefore/NotAfter, renewal and authority rotation as pure functions of `now`.
//! - [`x509_bundle`] and [`x509_svid`]: [`X509Bundle`] (one trust domain's X.509 authorities,
//!   never merged: B-2, B-9, B-10) and [`X509Svid`] (the leaf profile, XL-1 to XL-8 and
//!   chain rules XC-1, XC-3), with [`x509_svid::verify_chain`] for relying parties (XV-1 to XV-7,
//!   path validation by rustls-webpki) and [`x509_svid::Authorizer`] (XV-8).
//! - [`jwt`] and [`spiffe_bundle`]: [`JwtSvid`] signing (ES256 on ring) and validation (J-1 to
//!   J-10; `kid` required, section 9.2), [`JwtBundle`] with the plain JWKS of `FetchJWTBundles`,
//!   [`JwtBundleSet`] (one bundle per trust domain, never merged: B-9, B-10); [`SpiffeBundle`],
//!   the federation format (B-1 to B-8, BX-1, BX-2, BJ-1, BJ-2), and [`BundleMap`] (§5).
//!
//! What is not here: signing authorities, the store, networking and attestation live in the
//! server, agent and attestors crates.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod duration;
pub mod endpoint;
pub mod hex;
pub mod jwt;
pub mod lifetime;
pub mod selector;
pub mod session;
pub mod spiffe_bundle;
pub mod spiffe_id;
pub mod time;
#[cfg(feature = "rustls")]
pub mod tls;
pub mod x509_bundle;
pub mod x509_svid;

pub use duration::{DurationError, HumanDuration, format_duration, parse_duration};
pub use endpoint::{EndpointAddress, EndpointError};
pub use jwt::{
    JwtBundle, JwtBundleSet, JwtBundleSource, JwtPublicKey, JwtSigningKey, JwtSvid, JwtSvidError,
    JwtSvidParams,
};
pub use lifetime::{LifetimeError, Validity};
pub use selector::{Selector, SelectorError, SelectorSet};
pub use spiffe_bundle::{BundleMap, SpiffeBundle, SpiffeBundleError};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use x509_bundle::{X509Bundle, X509BundleError, X509BundleSet, X509BundleSource};
pub use x509_svid::{X509Svid, X509SvidError};
