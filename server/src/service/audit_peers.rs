//! The audit chains of the other servers sharing the store, and the keys they are pinned to.
//!
//! Each server extends its own chain (chain id = `server_id`) and signs its checkpoints with
//! its own audit key, which sits on its own disk. A server verifies another server's chain
//! against the key that chain is **pinned** to, never against whatever key its checkpoints
//! carry: otherwise whoever can write the database could replace a chain and sign the forgery
//! with a key of their own. A chain is pinned by `audit_peer_keys` (the SHA-256 fingerprints
//! of the other servers' audit keys, as `audit verify` prints them) or, failing that, on first
//! sight: the first time this server sees a chain it records the key of the chain's earliest
//! checkpoint in `data_dir/keys/audit_peers.json` (mode 0600), and from then on a checkpoint of
//! that chain signed by any other key fails verification.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::audit::{AuditCheckpoint, ChainVerifier, VerifySummary, Violation, ViolationKind};
use crate::service::audit::AuditError;
use crate::store::Store;

/// The name of the pins file, beside the audit state file.
pub(crate) const PINS_FILE: &str = "audit_peers.json";

/// Records and checkpoints read per store call.
const PAGE: usize = 1000;

/// What verifying another server's chain found.
#[derive(Debug, Clone)]
pub(crate) struct PeerChainReport {
    /// The chain (the other server's `server_id`).
    pub chain_id: String,
    /// The fingerprint of the key the chain is pinned to.
    pub pinned_fingerprint: String,
    /// How it was pinned: `audit_peer_keys`, or on first sight (and when).
    pub pinned_by: String,
    /// The chain's summary, or its first violation.
    pub outcome: Result<VerifySummary, Violation>,
}

/// The pins file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pins {
    /// Chain id -> the pin recorded on first sight.
    chains: BTreeMap<String, Pin>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pin {
    fingerprint: String,
    /// When it was recorded, seconds since the Unix epoch.
    pinned_at: u64,
}

/// The other servers' chains as this server sees them.
#[derive(Debug)]
pub(crate) struct PeerChains {
    store: Arc<dyn Store>,
    own_chain: String,
    configured: BTreeSet<String>,
    path: PathBuf,
    /// The pins file's content; the lock serializes recording.
    pins: Mutex<Pins>,
}

impl PeerChains {
    /// The peers of chain `own_chain`, pinned by `configured` fingerprints and the pins file at
    /// `path` (created when the first chain is pinned).
    ///
    /// # Errors
    ///
    /// [`AuditError::StateFile`] when the pins file cannot be read or parsed.
    pub(crate) fn open(
        store: Arc<dyn Store>,
        own_chain: &str,
        configured: BTreeSet<String>,
        path: PathBuf,
    ) -> Result<Self, AuditError> {
        let pins = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AuditError::StateFile {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Pins::default(),
            Err(e) => {
                return Err(AuditError::StateFile {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        Ok(Self {
            store,
            own_chain: own_chain.to_owned(),
            configured,
            path,
            pins: Mutex::new(pins),
        })
    }

    /// Pins every chain of another server seen for the first time (the key of its earliest
    /// checkpoint), unless `audit_peer_keys` covers it. Run at start and with each checkpoint.
    ///
    /// # Errors
    ///
    /// The store's, or the pins file's.
    pub(crate) async fn pin_new(&self, now: SystemTime) -> Result<(), AuditError> {
        for head in self.store.audit_chains().await? {
            if head.chain_id != self.own_chain {
                self.pin_of(&head.chain_id, now).await?;
            }
        }
        Ok(())
    }

    /// Verifies every other server's chain: records linked from 1 to the head the store
    /// names, every checkpoint signed by the chain's pinned key and matching the chain.
    ///
    /// # Errors
    ///
    /// The store's, or the pins file's; a chain that does not verify is a report, not an
    /// error.
    pub(crate) async fn verify(&self, now: SystemTime) -> Result<Vec<PeerChainReport>, AuditError> {
        let mut reports = Vec::new();
        let heads = self.store.audit_chains().await?;
        // A chain pinned earlier must still be there: emptying it is no way to hide it.
        let pinned: Vec<String> = self.pins.lock().await.chains.keys().cloned().collect();
        for chain in pinned {
            if chain != self.own_chain && !heads.iter().any(|h| h.chain_id == chain) {
                reports.push(PeerChainReport {
                    chain_id: chain.clone(),
                    pinned_fingerprint: self
                        .pins
                        .lock()
                        .await
                        .chains
                        .get(&chain)
                        .map(|p| p.fingerprint.clone())
                        .unwrap_or_default(),
                    pinned_by: "pinned on first sight".to_owned(),
                    outcome: Err(Violation {
                        sequence: 1,
                        kind: ViolationKind::Unpinned {
                            problem: "the store holds no record of this chain any more, though \
                                      it had records when its key was pinned: the chain was \
                                      deleted"
                                .to_owned(),
                        },
                    }),
                });
            }
        }
        for head in heads {
            if head.chain_id == self.own_chain {
                continue;
            }
            let chain = head.chain_id.clone();
            let checkpoints = self.checkpoints(&chain).await?;
            let Some((fingerprint, pinned_by)) = self.pin_of(&chain, now).await? else {
                reports.push(PeerChainReport {
                    chain_id: chain,
                    pinned_fingerprint: String::new(),
                    pinned_by: String::new(),
                    outcome: Err(Violation {
                        sequence: 0,
                        kind: ViolationKind::Unpinned {
                            problem: "the chain has no signed checkpoint to pin its key from"
                                .to_owned(),
                        },
                    }),
                });
                continue;
            };
            // The pinned key, and any key `audit_peer_keys` names (a key pinned again after
            // a replacement: the chain then holds checkpoints of both).
            let mut keys: Vec<Vec<u8>> = Vec::new();
            for cp in &checkpoints {
                let fp = cp.key_fingerprint();
                if (fp == fingerprint || self.configured.contains(&fp))
                    && !keys.contains(&cp.public_key)
                {
                    keys.push(cp.public_key.clone());
                }
            }
            let pinned_present = checkpoints
                .iter()
                .any(|cp| cp.key_fingerprint() == fingerprint);
            let outcome = if !pinned_present {
                Err(Violation {
                    sequence: checkpoints.first().map_or(0, |cp| cp.sequence),
                    kind: ViolationKind::Unpinned {
                        problem: format!(
                            "no checkpoint is signed by the key the chain is pinned to \
                             ({fingerprint}, {pinned_by}); its checkpoints are signed by {}: \
                             the chain or its key was replaced",
                            signers(&checkpoints)
                        ),
                    },
                })
            } else {
                self.walk(&chain, checkpoints, keys, head.sequence).await?
            };
            if let Err(violation) = &outcome {
                warn!(chain_id = %chain, %violation, "another server's audit chain does not verify");
            }
            reports.push(PeerChainReport {
                chain_id: chain,
                pinned_fingerprint: fingerprint,
                pinned_by,
                outcome,
            });
        }
        Ok(reports)
    }

    // --- private ---

    /// The fingerprint chain `chain` is pinned to and how; pins it on first sight when
    /// `audit_peer_keys` does not cover it. `None` when the chain has no checkpoint yet.
    async fn pin_of(
        &self,
        chain: &str,
        now: SystemTime,
    ) -> Result<Option<(String, String)>, AuditError> {
        let mut pins = self.pins.lock().await;
        if let Some(pin) = pins.chains.get(chain) {
            return Ok(Some((
                pin.fingerprint.clone(),
                format!("pinned on first sight at {} (unix)", pin.pinned_at),
            )));
        }
        let checkpoints = self.checkpoints(chain).await?;
        if let Some(cp) = checkpoints
            .iter()
            .find(|cp| self.configured.contains(&cp.key_fingerprint()))
        {
            return Ok(Some((cp.key_fingerprint(), "audit_peer_keys".to_owned())));
        }
        let Some(first) = checkpoints.first() else {
            return Ok(None);
        };
        let fingerprint = first.key_fingerprint();
        let pinned_at = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        pins.chains.insert(
            chain.to_owned(),
            Pin {
                fingerprint: fingerprint.clone(),
                pinned_at,
            },
        );
        let json = serde_json::to_vec_pretty(&*pins).map_err(|e| AuditError::StateFile {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        if let Err(e) = sigil_daemon::write_private(&self.path, &json) {
            pins.chains.remove(chain);
            return Err(AuditError::StateFile {
                path: self.path.clone(),
                reason: e.to_string(),
            });
        }
        info!(chain_id = chain, key_fingerprint = %fingerprint, "another server's audit key pinned on first sight");
        Ok(Some((
            fingerprint,
            format!("pinned on first sight at {pinned_at} (unix)"),
        )))
    }

    /// Every checkpoint of `chain`, by ascending sequence.
    async fn checkpoints(&self, chain: &str) -> Result<Vec<AuditCheckpoint>, AuditError> {
        let mut out: Vec<AuditCheckpoint> = Vec::new();
        loop {
            let from = out.last().map_or(0, |cp| cp.sequence.saturating_add(1));
            let page = self.store.list_chain_checkpoints(chain, from, PAGE).await?;
            let done = page.len() < PAGE;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    /// Walks `chain`'s records against `checkpoints` and `key`; the walk must reach `head`.
    async fn walk(
        &self,
        chain: &str,
        checkpoints: Vec<AuditCheckpoint>,
        keys: Vec<Vec<u8>>,
        head: u64,
    ) -> Result<Result<VerifySummary, Violation>, AuditError> {
        let mut verifier = ChainVerifier::with_keys(chain, checkpoints, keys);
        let mut from = 1;
        loop {
            let records = self.store.list_chain_records(chain, from, PAGE).await?;
            for record in &records {
                if let Err(violation) = verifier.push(record) {
                    return Ok(Err(violation));
                }
                from = record.sequence.saturating_add(1);
            }
            if records.len() < PAGE {
                break;
            }
        }
        Ok(verifier.finish().and_then(|summary| {
            let last = summary.head.as_ref().map_or(0, |h| h.sequence);
            if last < head {
                return Err(Violation {
                    sequence: last + 1,
                    kind: ViolationKind::HeadBeyondLog { head, last },
                });
            }
            Ok(summary)
        }))
    }
}

/// The distinct fingerprints that signed `checkpoints`, for a message.
fn signers(checkpoints: &[AuditCheckpoint]) -> String {
    let set: BTreeSet<String> = checkpoints
        .iter()
        .map(AuditCheckpoint::key_fingerprint)
        .collect();
    if set.is_empty() {
        "no key (there are none)".to_owned()
    } else {
        set.into_iter().collect::<Vec<_>>().join(", ")
    }
}
