//! Federated bundles and the CA journal.

use sigil_core::TrustDomain;

use super::{Inner, decode, encode};
use crate::store::{FederatedBundle, StoreError};

/// Key of the CA journal in the `meta` tree.
const CA_JOURNAL_KEY: &[u8] = b"ca_journal";

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

    #[allow(dead_code, reason = "behind Store::get_federated_bundle")]
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
        match self.trees.bundles.remove(key.as_bytes())? {
            Some(bytes) => decode("federated bundle", &bytes),
            None => Err(StoreError::NotFound {
                resource: "federated bundle",
                key,
            }),
        }
    }

    pub(super) fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>, StoreError> {
        self.trees
            .bundles
            .iter()
            .map(|item| decode("federated bundle", &item?.1))
            .collect()
    }
}

// --- CA journal ---

impl Inner {
    pub(super) fn load_ca_journal(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.trees.meta.get(CA_JOURNAL_KEY)?.map(|v| v.to_vec()))
    }

    pub(super) fn save_ca_journal(&self, journal: Vec<u8>) -> Result<(), StoreError> {
        self.trees.meta.insert(CA_JOURNAL_KEY, journal)?;
        Ok(())
    }
}
