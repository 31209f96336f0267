//! Why the CA could not start, rotate or sign ([`CaError`]), which of those errors the request
//! caused ([`CaError::is_caller_error`]), and the journal store's error ([`CaJournalStoreError`]).

use std::error::Error as StdError;
use std::time::Duration;

use sigil_core::lifetime::LifetimeError;
use sigil_core::{JwtSvidError, SpiffeId, TrustDomain, X509SvidError};

use super::keys::KeyError;
use crate::policy::{AGENT_PATH_PREFIX, RESERVED_PATH_PREFIX};

/// Why the CA could not start, rotate, or sign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// `ca_ttl` is below [`MIN_CA_TTL`](super::MIN_CA_TTL).
    #[error("ca_ttl of {ca_ttl:?} is too short; the minimum is {min:?}")]
    CaTtlTooShort {
        /// The configured `ca_ttl`.
        ca_ttl: Duration,
        /// [`MIN_CA_TTL`](super::MIN_CA_TTL).
        min: Duration,
    },
    /// A key could not be generated, loaded, used or deleted.
    #[error("ca key: {0}")]
    Key(#[from] KeyError),
    /// The key manager's blocking task did not complete (the runtime is shutting down).
    #[error("ca key manager task did not complete")]
    KeyTask,
    /// The journal store failed to load or save the journal.
    #[error("ca journal store: {0}")]
    JournalStore(#[from] CaJournalStoreError),
    /// The stored journal cannot be used: not JSON of the expected shape, an unknown version,
    /// or entries that contradict each other or their keys. Restore it from a backup; deleting
    /// it creates new authorities, which agents will not trust until they get the new bundle.
    #[error("ca journal is invalid: {reason}")]
    CorruptJournal {
        /// What is wrong.
        reason: String,
    },
    /// The journal belongs to another trust domain than the configured one.
    #[error(
        "ca journal is for trust domain {journal}, but the server is configured for {configured}"
    )]
    TrustDomainMismatch {
        /// The journal's trust domain.
        journal: String,
        /// The configured trust domain.
        configured: TrustDomain,
    },
    /// There is no active authority (only before the first rotation, or after a bug).
    #[error("no active signing authority")]
    NoActiveAuthority,
    /// The upstream CA (`upstream_authority`) cannot be used.
    #[error("upstream authority: {reason}")]
    Upstream {
        /// What is wrong.
        reason: String,
    },
    /// The bundle could not be built from the authorities.
    #[error("cannot build the bundle: {reason}")]
    Bundle {
        /// What sigil-core reported.
        reason: String,
    },
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// The CSR is longer than [`MAX_CSR_LEN`](super::MAX_CSR_LEN) bytes.
    #[error("csr is {len} bytes long; the maximum is {max}")]
    CsrTooLarge {
        /// Its length.
        len: usize,
        /// [`MAX_CSR_LEN`](super::MAX_CSR_LEN).
        max: usize,
    },
    /// The CSR is not a well-formed PKCS#10 request (garbage, truncated, trailing bytes).
    #[error("csr is malformed: {reason}")]
    MalformedCsr {
        /// What the parser reported.
        reason: String,
    },
    /// The CSR's signature does not verify with its own public key: no proof of possession.
    #[error("csr signature does not verify, so it proves no possession of the key")]
    CsrSignatureInvalid,
    /// The key to certify is not an ECDSA P-256 key.
    #[error("the key is {algorithm}; only ecdsa p-256 keys are accepted")]
    UnsupportedKey {
        /// What the key is (`ecdsa p-384`, `ed25519`, `rsa`, ...).
        algorithm: String,
    },
    /// The public key to certify is not a well-formed P-256 SubjectPublicKeyInfo.
    #[error("public key is malformed: {reason}")]
    MalformedPublicKey {
        /// What is wrong.
        reason: String,
    },
    /// The SPIFFE ID belongs to another trust domain than this CA's.
    #[error("spiffe id {id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The ID.
        id: SpiffeId,
        /// This CA's trust domain.
        trust_domain: TrustDomain,
    },
    /// The SPIFFE ID has no path: a trust domain's own ID never identifies a workload.
    #[error("spiffe id {id} has no path, so it cannot identify a workload")]
    RootId {
        /// The ID.
        id: SpiffeId,
    },
    /// A workload or JWT-SVID ID uses the path prefix reserved for the server and agents.
    #[error("spiffe id {id} is under the reserved path prefix {RESERVED_PATH_PREFIX}")]
    ReservedId {
        /// The ID.
        id: SpiffeId,
    },
    /// An agent SVID was asked for an ID outside `spiffe://<td>/sigil/agent/`.
    #[error("spiffe id {id} is not an agent id (spiffe://<td>{AGENT_PATH_PREFIX}...)")]
    NotAgentId {
        /// The ID.
        id: SpiffeId,
    },
    /// A DNS name for the SAN is not a valid host name.
    #[error("dns name {name:?} is invalid: {reason}")]
    InvalidDnsName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A JWT-SVID was asked with no audience, or an empty one.
    #[error("a jwt-svid needs at least one non-empty audience")]
    EmptyAudience,
    /// The TTL is shorter than one second (X.509 and JWT times count whole seconds).
    #[error("ttl of {ttl:?} is too short; svids need at least one second")]
    TtlTooShort {
        /// The TTL asked for.
        ttl: Duration,
    },
    /// No validity period can be computed: a cap (the authority's NotAfter, a session's end)
    /// has passed, or the times are out of range.
    #[error("cannot compute the svid lifetime: {0}")]
    Lifetime(#[from] LifetimeError),
    /// The certificate could not be built or signed.
    #[error("cannot build the certificate: {reason}")]
    Certificate {
        /// What rcgen reported.
        reason: String,
    },
    /// The JWT-SVID could not be signed.
    #[error("cannot sign the jwt-svid: {0}")]
    JwtSigning(#[source] KeyError),
    /// A certificate this CA just signed fails sigil-core's X509-SVID checks. A bug: nothing is
    /// returned.
    #[error("issued x509-svid fails the x509-svid checks: {0}")]
    IssuedX509SvidInvalid(#[source] X509SvidError),
    /// An SVID this CA just signed does not carry what was asked. A bug: nothing is returned.
    #[error("issued svid does not carry the requested {what}")]
    IssuedSvidMismatch {
        /// What differs.
        what: &'static str,
    },
    /// A JWT-SVID this CA just signed fails sigil-core's JWT-SVID validation. A bug: nothing is
    /// returned.
    #[error("issued jwt-svid fails jwt-svid validation: {0}")]
    IssuedJwtSvidInvalid(#[source] JwtSvidError),
}

/// Why the journal store failed; wraps the store's own error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CaJournalStoreError(#[source] Box<dyn StdError + Send + Sync>);

// === impl CaError ===

impl CaError {
    /// Whether the request caused this error, rather than the CA, its keys or its journal: a CSR
    /// that is too large, malformed or not signed by its key; a key that is not P-256 or is
    /// malformed; a SPIFFE ID in another trust domain, without a path, under the reserved
    /// prefix, or not an agent ID where one is needed; an invalid DNS name; an empty audience;
    /// a TTL under a second; or no possible lifetime ([`CaError::Lifetime`]). Callers answer
    /// these as an invalid request, and every other error as an internal failure.
    pub fn is_caller_error(&self) -> bool {
        matches!(
            self,
            CaError::CsrTooLarge { .. }
                | CaError::MalformedCsr { .. }
                | CaError::CsrSignatureInvalid
                | CaError::UnsupportedKey { .. }
                | CaError::MalformedPublicKey { .. }
                | CaError::ForeignTrustDomain { .. }
                | CaError::RootId { .. }
                | CaError::ReservedId { .. }
                | CaError::NotAgentId { .. }
                | CaError::InvalidDnsName { .. }
                | CaError::EmptyAudience
                | CaError::TtlTooShort { .. }
                | CaError::Lifetime(_)
        )
    }
}

// === impl CaJournalStoreError ===

impl CaJournalStoreError {
    /// Wraps a store error.
    pub fn new(error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self(error.into())
    }
}
