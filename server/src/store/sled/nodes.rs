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
        expected: &AttestedNode,
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
                if old != *expected {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::StateChanged {
                            resource: "node",
                            key: node.spiffe_id.to_string(),
                        },
                    ));
                }
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
        let key = token.token_hash.as_bytes();
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

    /// Removes the token whose SHA-256 is `token_hash` and returns its record, if it was there.
    pub(super) fn remove_join_token(&self, token_hash: &str) -> Result<Option<IVec>, StoreError> {
        Ok(self.trees.join_tokens.remove(token_hash.as_bytes())?)
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

/// A join token as an earlier build stored it: in the clear, under itself.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyJoinToken {
    token: String,
    expires_at: SystemTime,
    created_at: SystemTime,
    alias_spiffe_id: Option<SpiffeId>,
}

/// Re-keys the join tokens an earlier build stored in the clear under their SHA-256 (each in
/// one transaction: a crash leaves every token in one form or the other); returns how many.
pub(super) fn hash_legacy_join_tokens(tree: &::sled::Tree) -> Result<u64, StoreError> {
    let mut rehashed = 0;
    for item in tree.iter() {
        let (key, value) = item?;
        let Ok(legacy) = serde_json::from_slice::<LegacyJoinToken>(&value) else {
            continue;
        };
        let token = JoinToken {
            token_hash: sigil_attestors::join_token::token_hash(&legacy.token),
            expires_at: legacy.expires_at,
            created_at: legacy.created_at,
            alias_spiffe_id: legacy.alias_spiffe_id,
        };
        let new_value = encode("join token", &token)?;
        tree.transaction(|tx| {
            if tx.get(&key)?.as_deref() == Some(&value[..]) {
                tx.remove(&key)?;
                tx.insert(token.token_hash.as_bytes(), new_value.clone())?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })
        .map_err(transaction_error)?;
        rehashed += 1;
    }
    Ok(rehashed)
}
