//! Shared helpers for Sigil's end-to-end tests (each behaviour has its own file in `tests/`).
#![forbid(unsafe_code)]
