//! Join-token node attestation.
//!
//! A join token is a one-time secret an operator hands to a new agent. The agent presents it
//! once; the server consumes it atomically (two concurrent attestations with one token: exactly
//! one succeeds), refuses expired tokens (and consumes them too), and names the agent
//! `spiffe://TD/sigil/agent/join_token/FINGERPRINT`: the first 16 hex characters of the token's
//! SHA-256 ([`fingerprint`]). The token itself is a secret until it is spent, so it appears in
//! no SPIFFE ID, log line or audit record, and the server stores only its full SHA-256
//! ([`token_hash`]).

use std::sync::Arc;
use std::time::SystemTime;

use sigil_core::{SpiffeId, SpiffeIdError, TrustDomain};

use crate::node::{AttestError, Attestation, Challenge, NodeAttestor};

/// The attestor's name.
pub const NAME: &str = "join_token";

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

/// How many hex characters of the token's SHA-256 name its agent (64 bits: a collision among
/// the tokens of one trust domain is not a practical concern, and the ID stays short).
pub const FINGERPRINT_LEN: usize = 16;

/// What the server stores in place of `token`: its SHA-256, lowercase hex.
pub fn token_hash(token: &str) -> String {
    sigil_core::hex::sha256(token.as_bytes())
}

/// The first [`FINGERPRINT_LEN`] hex characters of the token's SHA-256: what names its agent.
pub fn fingerprint(token: &str) -> String {
    let mut hash = token_hash(token);
    hash.truncate(FINGERPRINT_LEN);
    hash
}

/// The SPIFFE ID of the agent that attests with `token`: its [`fingerprint`], never the token.
pub fn agent_id(trust_domain: &TrustDomain, token: &str) -> Result<SpiffeId, JoinTokenError> {
    let fingerprint = fingerprint(token);
    let mut segments: Vec<&str> = AGENT_PATH.to_vec();
    segments.push(&fingerprint);
    Ok(trust_domain.id(segments)?)
}

/// The join-token attestor: the payload is the token (UTF-8); it is consumed, so the agent
/// cannot attest with it again.
pub struct JoinTokenAttestor<T: ?Sized> {
    trust_domain: TrustDomain,
    tokens: Arc<T>,
}

impl<T: ?Sized> std::fmt::Debug for JoinTokenAttestor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokenAttestor")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl<T: JoinTokens + ?Sized> JoinTokenAttestor<T> {
    /// Attests agents of `trust_domain` with the tokens in `tokens`.
    pub fn new(trust_domain: TrustDomain, tokens: Arc<T>) -> Self {
        Self {
            trust_domain,
            tokens,
        }
    }
}

#[async_trait::async_trait]
impl<T: JoinTokens + ?Sized> NodeAttestor for JoinTokenAttestor<T> {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn attest(
        &self,
        payload: &[u8],
        _binding: &[u8],
        _challenge: &mut dyn Challenge,
        now: SystemTime,
    ) -> Result<Attestation, AttestError> {
        let token = std::str::from_utf8(payload)
            .map_err(|_| AttestError::Invalid("the join token is not UTF-8".to_owned()))?;
        if token.is_empty() {
            return Err(AttestError::Invalid("join_token is required".to_owned()));
        }
        let agent_id = agent_id(&self.trust_domain, token).map_err(|_| {
            AttestError::Refused("join token unknown, expired or already used".to_owned())
        })?;
        let alias = match self.tokens.consume(token, now).await {
            Ok(alias) => alias,
            Err(e @ (JoinTokenError::NotFound | JoinTokenError::Expired)) => {
                return Err(AttestError::Refused(e.to_string()));
            }
            Err(e) => return Err(AttestError::Unavailable(e.to_string())),
        };
        Ok(Attestation {
            agent_id,
            selectors: Vec::new(),
            reattestable: false,
            alias,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_name_the_tokens_fingerprint_never_the_token() {
        let td = TrustDomain::new("example.org").unwrap();
        // SHA-256("abc123") = 6ca13d52ca70c883e0f0bb101e425a89e8624de51db2d2392593af6a84118090
        assert_eq!(
            token_hash("abc123"),
            "6ca13d52ca70c883e0f0bb101e425a89e8624de51db2d2392593af6a84118090"
        );
        assert_eq!(fingerprint("abc123"), "6ca13d52ca70c883");
        let id = agent_id(&td, "abc123").unwrap();
        assert_eq!(
            id.as_str(),
            "spiffe://example.org/sigil/agent/join_token/6ca13d52ca70c883"
        );
        assert!(!id.as_str().contains("abc123"));
        // Any string is a token as far as its ID goes: none can inject a path.
        for odd in ["", "a/b", "..", "a b", "a%2F"] {
            let id = agent_id(&td, odd).unwrap();
            assert_eq!(
                id.path().len(),
                "/sigil/agent/join_token/".len() + FINGERPRINT_LEN
            );
        }
    }
}
