//! The Sigil server: the trust domain's signing authority.
//!
//! **Not built yet** (server-core issue): CA and rotation, the sled store with its change feed,
//! join-token attestation, the agent-facing API, the admin API and the operator CLI.
#![forbid(unsafe_code)]
