//! Federation relationships as the store keeps them: where a federated trust domain's bundle
//! endpoint is, how it is authenticated, and how its last fetch went.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sigil_core::{SpiffeId, TrustDomain};

/// How a bundle endpoint is authenticated (SPIFFE Federation, "Endpoint profiles").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "profile", rename_all = "snake_case")]
pub(crate) enum EndpointProfile {
    /// A Web PKI certificate for the URL's host, checked against the system roots.
    HttpsWeb,
    /// An X509-SVID with exactly this SPIFFE ID, checked against the latest bundle of its
    /// trust domain.
    HttpsSpiffe {
        /// The ID the endpoint's SVID must have.
        endpoint_spiffe_id: SpiffeId,
    },
}

/// How fetching a relationship's bundle last went. Written by the server that polled (one at a
/// time), read by `federation show`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FetchStatus {
    /// When the last fetch was tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<SystemTime>,
    /// When a fetch last gave a valid bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<SystemTime>,
    /// Why the last fetch failed (cleared by a success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Failures since the last success.
    #[serde(default)]
    pub failures: u32,
    /// When the next fetch is due (`None`: at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_poll: Option<SystemTime>,
    /// The server that fetched last.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub server_id: String,
}

/// A one-way federation relationship: this trust domain trusts `trust_domain`'s bundle, fetched
/// from `endpoint_url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FederationRelationship {
    /// The federated trust domain.
    pub trust_domain: TrustDomain,
    /// The bundle endpoint's URL (`https`, no userinfo).
    pub endpoint_url: String,
    /// How the endpoint is authenticated.
    #[serde(flatten)]
    pub profile: EndpointProfile,
    /// Set by the store at creation.
    pub created_at: SystemTime,
    /// Set by the store at each update.
    pub updated_at: SystemTime,
    /// Set by the store: random at creation (a relationship deleted and created again never
    /// gets a generation it had), raised by one at each update. A fetch that started at
    /// another generation is not recorded.
    pub generation: u64,
    /// How fetching went.
    #[serde(default)]
    pub status: FetchStatus,
}

/// Whether [`crate::store::Store::put_federation`] creates or updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Put {
    /// Fails with `AlreadyExists` when there is one.
    Create,
    /// Fails with `NotFound` when there is none.
    Update,
}

/// Applies `put` to `current` (the stored relationship, if any): the record to store, or the
/// refusal. Shared by both backends.
pub(crate) fn put_relationship(
    current: Option<FederationRelationship>,
    mut new: FederationRelationship,
    put: Put,
    now: SystemTime,
) -> Result<FederationRelationship, super::StoreError> {
    match (current, put) {
        (Some(_), Put::Create) => Err(super::StoreError::AlreadyExists {
            resource: "federation relationship",
            key: new.trust_domain.to_string(),
        }),
        (None, Put::Update) => Err(super::StoreError::NotFound {
            resource: "federation relationship",
            key: new.trust_domain.to_string(),
        }),
        (None, Put::Create) => {
            new.created_at = now;
            new.updated_at = now;
            new.generation = first_generation()?;
            new.status = FetchStatus::default();
            Ok(new)
        }
        (Some(old), Put::Update) => {
            new.created_at = old.created_at;
            new.updated_at = now;
            new.generation = old.generation.wrapping_add(1);
            // A changed endpoint is fetched at once; how the old one went is kept until then.
            new.status = FetchStatus {
                next_poll: None,
                ..old.status
            };
            Ok(new)
        }
    }
}

/// A random first generation, below 2^62 so that updates never wrap in practice.
fn first_generation() -> Result<u64, super::StoreError> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| super::StoreError::Random)?;
    Ok(u64::from_be_bytes(bytes) >> 2)
}
