//! Attested nodes and join tokens.

use std::ops::Bound;
use std::time::SystemTime;

use ::sled::IVec;
use ::sled::transaction::ConflictableTransactionError;
use sigil_core::SpiffeId;

use super::{Inner, PageCollector, decode, encode, page_start, transaction_error};
use crate::store::{AttestedNode, JoinToken, Page, PageRequest, StoreError};

// --- attested nodes ---

impl Inner {
    pub(super) fn create_node(
        &self,
        mut node: AttestedNode,
        now: SystemTime,
    ) -> Result<AttestedNode, StoreError> {
        node.created_at = now;
        node.updated_at = now;
        let value = encode("node", &node)?;
        let key = node.spiffe_id.as_str().as_bytes();
        match self
            .trees
            .nodes
            .compare_and_swap(key, None::<&[u8]>, Some(value))?
        {
            Ok(()) => Ok(node),
            Err(_) => Err(StoreError::AlreadyExists {
                resource: "node",
                key: node.spiffe_id.to_string(),
            }),
        }
    }

    pub(super) fn get_node(
        &self,
        spiffe_id: &SpiffeId,
    ) -> Result<Option<AttestedNode>, StoreError> {
        self.trees
            .nodes
            .get(spiffe_id.as_str().as_bytes())?
            .map(|bytes| decode("node", &bytes))
            .transpose()
    }

    pub(super) fn update_node(
        &self,
        node: &AttestedNode,
        now: SystemTime,
    ) -> Result<AttestedNode, StoreError> {
        let key = node.spiffe_id.as_str().as_bytes();
        self.trees
            .nodes
            .transaction(|tx| {
                let Some(old) = tx.get(key)? else {
                    return Err(ConflictableTransactionError::Abort(StoreError::NotFound {
                        resource: "node",
                        key: node.spiffe_id.to_string(),
                    }));
                };
                let old: AttestedNode =
                    decode("node", &old).map_err(ConflictableTransactionError::Abort)?;
                let mut node = node.clone();
                node.created_at = old.created_at;
                node.updated_at = now;
                let value = encode("node", &node).map_err(ConflictableTransactionError::Abort)?;
                tx.insert(key, value)?;
                Ok(node)
            })
            .map_err(transaction_error)
    }

    pub(super) fn delete_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode, StoreError> {
        let key = spiffe_id.as_str().to_owned();
        match self.trees.nodes.remove(key.as_bytes())? {
            Some(bytes) => decode("node", &bytes),
            None => Err(StoreError::NotFound {
                resource: "node",
                key,
            }),
        }
    }

    pub(super) fn list_nodes(&self, page: &PageRequest) -> Result<Page<AttestedNode>, StoreError> {
        let start = page_start(page.token.as_deref(), |s| SpiffeId::new(s).is_ok())?;
        let mut page = PageCollector::new(page.effective_size());
        for item in self
            .trees
            .nodes
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
        {
            if !page.offer(decode("node", &item?.1)?) {
                break;
            }
        }
        Ok(page.finish(|node: &AttestedNode| node.spiffe_id.as_str().as_bytes().to_vec()))
    }
}

// --- join tokens ---

impl Inner {
    pub(super) fn create_join_token(&self, token: &JoinToken) -> Result<(), StoreError> {
        let value = encode("join token", token)?;
        let key = token.token.as_bytes();
        match self
            .trees
            .join_tokens
            .compare_and_swap(key, None::<&[u8]>, Some(value))?
        {
            Ok(()) => Ok(()),
            Err(_) => Err(StoreError::AlreadyExists {
                resource: "join token",
                key: "<redacted>".to_owned(),
            }),
        }
    }

    /// Removes the token and returns its record, if it was there.
    pub(super) fn remove_join_token(&self, token: &str) -> Result<Option<IVec>, StoreError> {
        Ok(self.trees.join_tokens.remove(token.as_bytes())?)
    }

    pub(super) fn prune_join_tokens(&self, now: SystemTime) -> Result<u64, StoreError> {
        let mut pruned = 0;
        for item in self.trees.join_tokens.iter() {
            let (key, value) = item?;
            let token: JoinToken = decode("join token", &value)?;
            // Remove only this exact value: a concurrent consumer may have taken it already.
            if token.expires_at <= now
                && self
                    .trees
                    .join_tokens
                    .compare_and_swap(&key, Some(&value), None::<IVec>)?
                    .is_ok()
            {
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}
