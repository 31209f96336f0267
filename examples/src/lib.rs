//! Examples for Sigil.
//!
//! - `quickstart` (`cargo run --release --bin quickstart`): starts a server and an agent in a
//!   temporary directory, registers an entry for the invoking user, fetches an X509-SVID and a
//!   JWT-SVID through the SPIFFE Workload API, verifies them against the bundle and prints a
//!   summary. Nothing outside the temporary directory is touched.
#![forbid(unsafe_code)]
