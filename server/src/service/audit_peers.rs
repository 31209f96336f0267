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
    /// Whether `audit_peer_keys` named the key (else: first sight).
    #[serde(default)]
    configured: bool,
    /// The latest checkpoint of the chain this server verified: the chain must still hold
    /// it (a chain cut back past it fails).
    #[serde(default)]
    verified: Option<AuditCheckpoint>,
}

impl Pin {
    fn described(&self) -> String {
        if self.configured {
            format!("audit_peer_keys, recorded at {} (unix)", self.pinned_at)
        } else {
            format!("pinned on first sight at {} (unix)", self.pinned_at)
        }
    }
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
        let pinned: Vec<(String, Pin)> = self
            .pins
            .lock()
            .await
            .chains
            .iter()
            .map(|(chain, pin)| (chain.clone(), pin.clone()))
            .collect();
        for (chain, pin) in pinned {
            if chain != self.own_chain && !heads.iter().any(|h| h.chain_id == chain) {
                reports.push(PeerChainReport {
                    chain_id: chain,
                    pinned_fingerprint: pin.fingerprint.clone(),
                    pinned_by: pin.described(),
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
                // The latest checkpoint verified before must still be held by the chain.
                let remembered = self
                    .pins
                    .lock()
                    .await
                    .chains
                    .get(&chain)
                    .and_then(|p| p.verified.clone());
                let latest = checkpoints.iter().max_by_key(|cp| cp.sequence).cloned();
                let mut all = checkpoints;
                if let Some(cp) = remembered
                    && !all.contains(&cp)
                {
                    all.push(cp);
                }
                let outcome = self.walk(&chain, all, keys, head.sequence).await?;
                if outcome.is_ok()
                    && let Some(latest) = latest
                {
                    self.remember_verified(&chain, latest).await?;
                }
                outcome
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
            return Ok(Some((pin.fingerprint.clone(), pin.described())));
        }
        let checkpoints = self.checkpoints(chain).await?;
        // A key `audit_peer_keys` names wins over first sight; either way the pin is recorded,
        // so that it holds from then on whatever the chain later shows.
        let (fingerprint, configured) = match checkpoints
            .iter()
            .find(|cp| self.configured.contains(&cp.key_fingerprint()))
        {
            Some(cp) => (cp.key_fingerprint(), true),
            None => match checkpoints.first() {
                Some(first) => (first.key_fingerprint(), false),
                None => return Ok(None),
            },
        };
        let pinned_at = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let pin = Pin {
            fingerprint: fingerprint.clone(),
            pinned_at,
            configured,
            verified: None,
        };
        let described = pin.described();
        pins.chains.insert(chain.to_owned(), pin);
        if let Err(e) = self.save(&pins) {
            pins.chains.remove(chain);
            return Err(e);
        }
        info!(chain_id = chain, key_fingerprint = %fingerprint, configured, "another server's audit key pinned");
        Ok(Some((fingerprint, described)))
    }

    /// Records `checkpoint` as the latest one of `chain` verified.
    async fn remember_verified(
        &self,
        chain: &str,
        checkpoint: AuditCheckpoint,
    ) -> Result<(), AuditError> {
        let mut pins = self.pins.lock().await;
        let Some(pin) = pins.chains.get_mut(chain) else {
            return Ok(());
        };
        if pin
            .verified
            .as_ref()
            .is_some_and(|known| known.sequence >= checkpoint.sequence)
        {
            return Ok(());
        }
        pin.verified = Some(checkpoint);
        self.save(&pins)
    }

    /// Writes the pins file (0600).
    fn save(&self, pins: &Pins) -> Result<(), AuditError> {
        let json = serde_json::to_vec_pretty(pins).map_err(|e| AuditError::StateFile {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        sigil_daemon::write_private(&self.path, &json).map_err(|e| AuditError::StateFile {
            path: self.path.clone(),
            reason: e.to_string(),
        })
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
        Ok(verifier.finish_at(head))
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
