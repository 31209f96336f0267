//! Federated bundles, the CA journal and the server's published bundle.

use sigil_core::TrustDomain;

use std::time::SystemTime;

use ::sled::Transactional;
use ::sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{Inner, decode, encode};
use crate::store::federation::put_relationship;
use crate::store::{
    FederatedBundle, FederationRelationship, FetchStatus, Put, ServerBundles, StoreError,
};

/// Key of the CA journal in the `meta` tree.
const CA_JOURNAL_KEY: &[u8] = b"ca_journal";

/// Prefix of a server's published bundle in the `meta` tree (then the server id).
const SERVER_BUNDLE_PREFIX: &[u8] = b"server_bundle/";

/// Prefix of a server's CRLs in the `meta` tree (then the server id).
const SERVER_CRLS_PREFIX: &[u8] = b"server_crls/";

/// Key of the shared bundle sequence in the `meta` tree (8 bytes, big-endian).
const BUNDLE_SEQUENCE_KEY: &[u8] = b"bundle_sequence";

// --- federated bundles ---

impl Inner {
    /// Stores (or replaces) `record` under its trust domain and returns it.
    pub(super) fn put_federated_bundle(
        &self,
        record: FederatedBundle,
    ) -> Result<FederatedBundle, StoreError> {
        let value = encode("federated bundle", &record)?;
        self.trees
            .bundles
            .insert(record.trust_domain.name().as_bytes(), value)?;
        Ok(record)
    }

    pub(super) fn get_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederatedBundle>, StoreError> {
        self.trees
            .bundles
            .get(trust_domain.name().as_bytes())?
            .map(|bytes| decode("federated bundle", &bytes))
            .transpose()
    }

    pub(super) fn delete_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederatedBundle, StoreError> {
        let key = trust_domain.name().to_owned();
        let relationship = federation_key(trust_domain);
        (&self.trees.meta, &self.trees.bundles)
            .transaction(|(meta, bundles)| {
                if meta.get(&relationship)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(StoreError::InUse {
                        resource: "federated bundle",
                        key: key.clone(),
                        reason: "a federation relationship keeps it; delete the relationship \
                                 (sigil-server federation delete), which deletes its bundle",
                    }));
                }
                match bundles.remove(key.as_bytes())? {
                    Some(bytes) => decode("federated bundle", &bytes)
                        .map_err(ConflictableTransactionError::Abort),
                    None => Err(ConflictableTransactionError::Abort(StoreError::NotFound {
                        resource: "federated bundle",
                        key: key.clone(),
                    })),
                }
            })
            .map_err(transaction_error)
    }

    pub(super) fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>, StoreError> {
        self.trees
            .bundles
            .iter()
            .map(|item| decode("federated bundle", &item?.1))
            .collect()
    }
}

// --- federation relationships ---

/// Prefix of a relationship in the `meta` tree (then the trust domain name).
const FEDERATION_PREFIX: &[u8] = b"federation/";

fn federation_key(trust_domain: &TrustDomain) -> Vec<u8> {
    [FEDERATION_PREFIX, trust_domain.name().as_bytes()].concat()
}

/// The stored record of `bundle` (when given) for `trust_domain`, encoded.
fn bundle_value(
    trust_domain: &TrustDomain,
    bundle: Option<Vec<u8>>,
    updated_at: SystemTime,
) -> Result<Option<Vec<u8>>, StoreError> {
    bundle
        .map(|bundle| {
            encode(
                "federated bundle",
                &FederatedBundle {
                    trust_domain: trust_domain.clone(),
                    bundle,
                    updated_at,
                },
            )
        })
        .transpose()
}

fn transaction_error(error: TransactionError<StoreError>) -> StoreError {
    match error {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Backend(e),
    }
}

impl Inner {
    pub(super) fn put_federation(
        &self,
        relationship: FederationRelationship,
        bundle: Option<Vec<u8>>,
        put: Put,
    ) -> Result<FederationRelationship, StoreError> {
        let key = federation_key(&relationship.trust_domain);
        let now = SystemTime::now();
        let bundle = bundle_value(&relationship.trust_domain, bundle, now)?;
        (&self.trees.meta, &self.trees.bundles)
            .transaction(|(meta, bundles)| {
                let abort = ConflictableTransactionError::Abort;
                let current = meta
                    .get(&key)?
                    .map(|v| decode::<FederationRelationship>("federation relationship", &v))
                    .transpose()
                    .map_err(abort)?;
                let record =
                    put_relationship(current, relationship.clone(), put, now).map_err(abort)?;
                meta.insert(
                    key.as_slice(),
                    encode("federation relationship", &record).map_err(abort)?,
                )?;
                if let Some(bundle) = &bundle {
                    bundles.insert(record.trust_domain.name().as_bytes(), bundle.as_slice())?;
                }
                Ok(record)
            })
            .map_err(transaction_error)
    }

    pub(super) fn get_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>, StoreError> {
        self.trees
            .meta
            .get(federation_key(trust_domain))?
            .map(|v| decode("federation relationship", &v))
            .transpose()
    }

    pub(super) fn list_federations(&self) -> Result<Vec<FederationRelationship>, StoreError> {
        self.trees
            .meta
            .scan_prefix(FEDERATION_PREFIX)
            .map(|item| decode("federation relationship", &item?.1))
            .collect()
    }

    pub(super) fn delete_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<(FederationRelationship, Option<FederatedBundle>), StoreError> {
        let key = federation_key(trust_domain);
        (&self.trees.meta, &self.trees.bundles)
            .transaction(|(meta, bundles)| {
                let abort = ConflictableTransactionError::Abort;
                let Some(relationship) = meta.remove(key.as_slice())? else {
                    return Err(abort(StoreError::NotFound {
                        resource: "federation relationship",
                        key: trust_domain.to_string(),
                    }));
                };
                let relationship =
                    decode("federation relationship", &relationship).map_err(abort)?;
                let bundle = bundles
                    .remove(trust_domain.name().as_bytes())?
                    .map(|v| decode("federated bundle", &v))
                    .transpose()
                    .map_err(abort)?;
                Ok((relationship, bundle))
            })
            .map_err(transaction_error)
    }

    pub(super) fn record_federation_fetch(
        &self,
        trust_domain: &TrustDomain,
        generation: u64,
        status: FetchStatus,
        bundle: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let key = federation_key(trust_domain);
        let bundle = bundle_value(trust_domain, bundle, SystemTime::now())?;
        (&self.trees.meta, &self.trees.bundles)
            .transaction(|(meta, bundles)| {
                let abort = ConflictableTransactionError::Abort;
                let Some(current) = meta.get(&key)? else {
                    return Ok(false);
                };
                let mut current: FederationRelationship =
                    decode("federation relationship", &current).map_err(abort)?;
                if current.generation != generation {
                    return Ok(false);
                }
                current.status = status.clone();
                meta.insert(
                    key.as_slice(),
                    encode("federation relationship", &current).map_err(abort)?,
                )?;
                if let Some(bundle) = &bundle {
                    bundles.insert(trust_domain.name().as_bytes(), bundle.as_slice())?;
                }
                Ok(true)
            })
            .map_err(transaction_error)
    }
}

// --- CA journal ---

impl Inner {
    pub(super) fn load_ca_journal(&self, server_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .trees
            .meta
            .get(ca_journal_key(server_id))?
            .map(|v| v.to_vec()))
    }

    pub(super) fn save_ca_journal(
        &self,
        server_id: &str,
        journal: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.trees.meta.insert(ca_journal_key(server_id), journal)?;
        Ok(())
    }
}

/// The `meta` key of a server's CA journal: `ca_journal` for the default server (the key of
/// every build before servers had ids, so an upgraded data directory keeps its CA), else
/// `ca_journal/` and the id.
fn ca_journal_key(server_id: &str) -> Vec<u8> {
    if server_id == crate::store::DEFAULT_SERVER_ID {
        CA_JOURNAL_KEY.to_vec()
    } else {
        [CA_JOURNAL_KEY, b"/", server_id.as_bytes()].concat()
    }
}

// --- published bundles ---

impl Inner {
    /// Stores `server_id`'s bundle and raises the sequence (to at least `at_least`), in one
    /// transaction of the `meta` tree.
    pub(super) fn publish_server_bundle(
        &self,
        server_id: &str,
        bundle: &[u8],
        at_least: u64,
    ) -> Result<u64, StoreError> {
        let key = [SERVER_BUNDLE_PREFIX, server_id.as_bytes()].concat();
        self.trees
            .meta
            .transaction(|meta| {
                let current = meta
                    .get(BUNDLE_SEQUENCE_KEY)?
                    .map_or(Ok(0), |v| sequence_value(&v))
                    .map_err(ConflictableTransactionError::Abort)?;
                let next = current.saturating_add(1).max(at_least);
                meta.insert(key.as_slice(), bundle)?;
                meta.insert(BUNDLE_SEQUENCE_KEY, &next.to_be_bytes())?;
                Ok(next)
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Backend(e),
            })
    }

    /// The shared bundle sequence (0 before anything was published).
    pub(super) fn bundle_sequence(&self) -> Result<u64, StoreError> {
        self.trees
            .meta
            .get(BUNDLE_SEQUENCE_KEY)?
            .map_or(Ok(0), |v| sequence_value(&v))
    }

    /// Every published bundle with the sequence. (One process writes a sled store, and it
    /// publishes from one task, so the two reads see one state.)
    pub(super) fn server_bundles(&self) -> Result<ServerBundles, StoreError> {
        let sequence = self.bundle_sequence()?;
        let mut bundles = Vec::new();
        for item in self.trees.meta.scan_prefix(SERVER_BUNDLE_PREFIX) {
            let (key, value) = item?;
            let id = String::from_utf8_lossy(&key[SERVER_BUNDLE_PREFIX.len()..]).into_owned();
            bundles.push((id, value.to_vec()));
        }
        Ok(ServerBundles { sequence, bundles })
    }
}

fn sequence_value(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: "bundle sequence",
            reason: format!("{} bytes, expected 8", bytes.len()),
        })
}

// --- published CRLs ---

impl Inner {
    pub(super) fn save_server_crls(&self, server_id: &str, crls: &[u8]) -> Result<(), StoreError> {
        let key = [SERVER_CRLS_PREFIX, server_id.as_bytes()].concat();
        self.trees.meta.insert(key, crls)?;
        Ok(())
    }

    pub(super) fn server_crls(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.trees.meta.scan_prefix(SERVER_CRLS_PREFIX) {
            let (key, value) = item?;
            let id = String::from_utf8_lossy(&key[SERVER_CRLS_PREFIX.len()..]).into_owned();
            out.push((id, value.to_vec()));
        }
        Ok(out)
    }
}
