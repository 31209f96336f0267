//! Node and workload attestation for Sigil, behind traits.
//!
//! **Not built yet.** This crate will hold the `unix` workload attestor (selectors from the
//! caller's kernel credentials) and the `join_token` node attestor; see DESIGN.md and the agent
//! and server-core issues. It exists now so that the workspace layout is final.
#![forbid(unsafe_code)]
