//! Join-token node attestation.
//!
//! A join token is a one-time secret an operator hands to a new agent. The agent presents it
//! once; the server consumes it atomically (two concurrent attestations with one token: exactly
//! one succeeds), refuses expired tokens (and consumes them too), and names the agent
//! `spiffe://TD/sigil/agent/join_token/TOKEN`.

use std::time::SystemTime;

use sigil_core::{SpiffeId, SpiffeIdError, TrustDomain};

/// The path segments before the token in an agent ID.
pub const AGENT_PATH: [&str; 3] = ["sigil", "agent", "join_token"];

/// Why a join token was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinTokenError {
    /// Unknown, or already used.
    #[error("join token unknown or already used")]
    NotFound,
    /// Expired (and now consumed).
    #[error("join token expired")]
    Expired,
    /// The token cannot be part of a SPIFFE ID.
    #[error("join token is not a valid path segment: {0}")]
    Malformed(#[from] SpiffeIdError),
    /// The backing store failed.
    #[error("join token store failed: {0}")]
    Store(String),
}

/// Where join tokens live. Implemented by the server's store.
#[async_trait::async_trait]
pub trait JoinTokens: Send + Sync {
    /// Removes `token` atomically and returns the SPIFFE ID alias it carries, if any. Fails
    /// with [`JoinTokenError::NotFound`] when no such token exists (or another caller took
    /// it first) and [`JoinTokenError::Expired`] when it expired before `now`.
    async fn consume(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<Option<SpiffeId>, JoinTokenError>;
}

/// The SPIFFE ID of the agent that attests with `token`.
pub fn agent_id(trust_domain: &TrustDomain, token: &str) -> Result<SpiffeId, JoinTokenError> {
    let mut segments: Vec<&str> = AGENT_PATH.to_vec();
    segments.push(token);
    Ok(trust_domain.id(segments)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_are_built_from_valid_tokens_only() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            agent_id(&td, "abc123").unwrap().as_str(),
            "spiffe://example.org/sigil/agent/join_token/abc123"
        );
        for bad in ["", "a/b", "..", "a b", "a%2F"] {
            assert!(
                matches!(agent_id(&td, bad), Err(JoinTokenError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
