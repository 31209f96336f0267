//! X509-SVIDs: parsing an SVID a workload holds, and verifying one a peer presents
//! ([X509-SVID]).
//!
//! Two entry points, for two roles:
//!
//! - [`X509Svid::parse`] / [`X509Svid::from_parts`] take a workload's own SVID (a chain, leaf
//!   first, plus its private key) and check the whole leaf profile (X-1, X-2, XL-1 to XL-8), the
//!   signing certificates in the chain (XC-1, XC-3) and that the key belongs to the leaf.
//! - [`verify_chain`] is the relying party's check of a peer's chain (XV-1 to XV-7): the SPIFFE ID
//!   and the leaf rules first, then RFC 5280 path validation by rustls-webpki against the bundle
//!   of **the leaf's own trust domain only** (B-9). After it, an [`Authorizer`] decides whether
//!   the authenticated ID may proceed (XV-8).
//!
//! [`verify_chain`] checks what go-spiffe's `x509svid.Verify` checks (XV-2, XV-3, XV-6, any EKU),
//! plus the root-ID and digitalSignature rules that go-spiffe checks only when parsing (spec
//! section 9, item 7). It does not check Key Usage criticality, the EKU contents (XL-7) or the
//! empty-subject rule (XL-8): those are issuer obligations, checked by [`X509Svid::parse`].
//!
//! [X509-SVID]: https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md

// Layout: `error.rs` (X509SvidError), `svid.rs` (X509Svid and PrivateKey: a workload's own
// SVID), `profile.rs` (the certificate rules parsing and verification share, and
// check_leaf_certificate), `verify.rs` (verify_chain and VerifiedSvid), `authorizer.rs`
// (Authorizer), and the tests in `tests.rs`.

mod authorizer;
mod error;
mod profile;
mod svid;
#[cfg(test)]
mod tests;
mod verify;

pub use authorizer::Authorizer;
pub use error::X509SvidError;
pub use profile::check_leaf_certificate;
pub use svid::{PrivateKey, X509Svid};
pub use verify::{SUPPORTED_SIG_ALGS, VerifiedSvid, verify_chain};
