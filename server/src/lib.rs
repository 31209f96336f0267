//! # sigil-server: the trust domain's authority
//!
//! The server holds the trust domain's signing keys, keeps the registration entries and attested
//! agents in its store, and serves agents over TCP with mTLS and operators on a Unix socket.
//!
//! ## Layout: who owns what, who may call whom
//!
//! ```text
//!  main.rs ── cli ────────────────────────────── (admin socket) ──┐
//!     │                                                           │
//!  server (composition root: builds everything, runs the tasks)   │
//!     │                                                           ▼
//!  api ── admin, node: thin gRPC handlers; status: errors -> gRPC codes
//!     │
//!  service ── entries, agents, svids, bundles, sessions, sync, authority,
//!     │        crl, audit (the running log), entry_cache
//!     │
//!     ├── ca       the signing authorities, rotation, one signing method per kind
//!     ├── store    the Store trait, the sled backend, the conformance suite
//!     ├── audit    the pure audit chain: records, canonical encoding, hashing, verification
//!     ├── policy   the rules written once: reserved IDs, grantable IDs, DNS names, TTLs
//!     └── config, tls, bundle_endpoint (the federation listener),
//!         federation_client (fetching another trust domain's bundle)
//! ```
//!
//! - `policy` and `audit` are pure: they depend on `sigil-core` only.
//! - `store` depends on `audit` (it seals records in the same transaction as the chain head);
//!   `ca` depends on `policy`; neither knows the services.
//! - `service` is where the rules live: each service validates, writes the store and audits,
//!   in one place, and has unit tests against a real sled store and a real CA. Services know
//!   nothing of gRPC.
//! - `api` handlers authorize the caller, convert the request, call one service method and map
//!   its error with that service's one function in `api::status`. They write no store and
//!   append no audit record of their own.
//! - `server` wires the parts together and is the only module that knows them all.
//!
//! No module imports one that imports it back; `tests/tests/module_graph.rs` reads the
//! `crate::` paths of every file and fails on a cycle.
//!
//! ## The public surface
//!
//! Everything above is private. What the binary, the benchmarks and the end-to-end tests use
//! is re-exported here: [`Server`], [`ServerConfig`] and its parts, the [`cli`] the binary
//! runs, [`DenyReason`] (how agents read a refusal), and the sled engine (`sled`, for tests
//! that inspect a data directory).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api;
mod audit;
mod bundle_endpoint;
mod ca;
pub mod cli;
mod config;
mod federation_client;
#[doc(hidden)]
pub mod instructions;
mod policy;
mod server;
mod service;
mod store;
mod tls;

pub use crate::api::node::REASON_METADATA_KEY;
pub use crate::bundle_endpoint::BundleEndpointError;
pub use crate::config::{
    BundleEndpointConfig, BundleEndpointProfile, ConfigError, ConfigProblem, DEFAULT_ADMIN_SOCKET,
    FileConfig, LogFormat, LogLevel, Overrides, ServerConfig,
};
pub use crate::server::{
    DRAIN_TIMEOUT, MAX_MESSAGE_SIZE, Server, ServerError, Shutdown, snapshot_store_after_stop,
};
pub use crate::service::agents::DenyReason;
pub use crate::store::sled::engine as sled;

/// The `audit` tree of a stopped server's sled store, for the tests that alter it as someone
/// with write access to its directory could, and for forensic tools. Records are stored in runs
/// (one value holds consecutive records, under the first one's sequence; earlier builds stored
/// each alone): these find a record wherever it is. Not a stable interface.
#[doc(hidden)]
pub mod store_records {
    use crate::store::sled::audit;

    /// Record `sequence` of `tree` (an `audit` tree), as its JSON fields.
    ///
    /// # Errors
    ///
    /// No such record, or why the stored value is not audit records.
    pub fn audit_record(
        tree: &crate::sled::Tree,
        sequence: u64,
    ) -> Result<serde_json::Value, String> {
        let (_, records) = audit::audit_value_holding(tree, sequence)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no audit record {sequence}"))?;
        let record = records.into_iter().find(|r| r.sequence == sequence);
        serde_json::to_value(record).map_err(|e| e.to_string())
    }

    /// Rewrites record `sequence` of `tree` (an `audit` tree) through `edit`, which gets its
    /// JSON fields; its hashes stay as `edit` leaves them (nothing is computed).
    ///
    /// # Errors
    ///
    /// No such record, why the stored value is not audit records, or why the edited JSON is not
    /// an audit record.
    pub fn edit_audit_record(
        tree: &crate::sled::Tree,
        sequence: u64,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Result<(), String> {
        let (key, mut records) = audit::audit_value_holding(tree, sequence)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no audit record {sequence}"))?;
        if let Some(record) = records.iter_mut().find(|r| r.sequence == sequence) {
            let mut json = serde_json::to_value(&*record).map_err(|e| e.to_string())?;
            edit(&mut json);
            *record = serde_json::from_value(json).map_err(|e| e.to_string())?;
        }
        audit::store_audit_value(tree, key, &records).map_err(|e| e.to_string())
    }

    /// Removes the records of `tree` (an `audit` tree) from `sequence` on.
    ///
    /// # Errors
    ///
    /// Why the stored values are not audit records, or sled's.
    pub fn truncate_audit(tree: &crate::sled::Tree, sequence: u64) -> Result<(), String> {
        audit::truncate_audit(tree, sequence).map_err(|e| e.to_string())
    }
}

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not part of the API).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// The CA's CSR reader: the P-256 key of a PKCS#10 CSR whose signature verifies, as an
    /// uncompressed point, or why the CSR is refused.
    ///
    /// # Errors
    ///
    /// The refusal, as the CA words it.
    pub fn csr_public_key(der: &[u8]) -> Result<Vec<u8>, String> {
        crate::ca::fuzz_csr_public_key(der)
    }

    /// The sled store's record decoders (entry, change, audit record; binary and the JSON of
    /// earlier builds): how many kinds `bytes` decodes as, each written and read back
    /// unchanged.
    ///
    /// # Errors
    ///
    /// A decoded value that did not come back the same.
    pub fn store_records(bytes: &[u8]) -> Result<usize, String> {
        crate::store::sled::record::round_trips(bytes)
    }
}
