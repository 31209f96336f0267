//! Examples for Sigil. The quickstart arrives with the agent issue.
#![forbid(unsafe_code)]
