//! Node attestation: how an agent proves which node it runs on.
//!
//! A [`NodeAttestor`] reads what the agent sent first (its payload: a join token, a host
//! certificate chain), may put challenges to it through a [`Challenge`] (a round trip on the
//! attestation stream), and answers with an [`Attestation`]: the agent's SPIFFE ID and the node
//! selectors that entries and node aliases can name. The server signs the agent SVID only after
//! that, over the CSR the agent sent with its payload; attestors that challenge bind their proof
//! to that CSR (`binding`), so a proof cannot be replayed for another key.

use std::time::SystemTime;

use sigil_core::{Selector, SpiffeId};

/// What an attestor established about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// The agent's SPIFFE ID.
    pub agent_id: SpiffeId,
    /// What is known of the node, for entries and node aliases.
    pub selectors: Vec<Selector>,
    /// Whether the same node may attest again (and keep its ID): true when the proof can be
    /// presented again (a host certificate), false when it is spent (a join token).
    pub reattestable: bool,
    /// An alias entry to create for the agent (a join token's `--spiffe-id`).
    pub alias: Option<SpiffeId>,
}

/// Why an attestation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The agent's proof is not good: a final refusal, with what is wrong.
    #[error("{0}")]
    Refused(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Something the attestor relies on failed (a store, the stream); the agent may retry.
    #[error("{0}")]
    Unavailable(String),
}

/// The agent's side of a challenge: sends `challenge` and returns its answer.
#[async_trait::async_trait]
pub trait Challenge: Send {
    /// One round trip.
    async fn exchange(&mut self, challenge: Vec<u8>) -> Result<Vec<u8>, AttestError>;
}

/// One way to attest nodes (`join_token`, `x509pop`).
#[async_trait::async_trait]
pub trait NodeAttestor: Send + Sync + std::fmt::Debug {
    /// The attestor's name, as agents choose it (`node_attestor`) and as audit records and
    /// node records name it.
    fn name(&self) -> &'static str;

    /// Attests the agent that sent `payload` with a CSR whose DER is `binding`.
    async fn attest(
        &self,
        payload: &[u8],
        binding: &[u8],
        challenge: &mut dyn Challenge,
        now: SystemTime,
    ) -> Result<Attestation, AttestError>;
}

/// A [`Challenge`] for attestors that never challenge (a unary call): any challenge fails.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoChallenge;

#[async_trait::async_trait]
impl Challenge for NoChallenge {
    async fn exchange(&mut self, _challenge: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        Err(AttestError::Invalid(
            "this attestor needs a challenge round trip: use the Attest stream".to_owned(),
        ))
    }
}
