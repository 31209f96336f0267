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
