//! The Sigil node agent: attests workloads and serves the SPIFFE Workload API.
//!
//! **Not built yet** (front-door and agent issues).
#![forbid(unsafe_code)]
