//! The agent as a witness of the server's audit log.
//!
//! The server sends each checkpoint it signs of its audit chain on the sync stream. The agent
//! keeps the latest one per chain, in a 0600 file of its data directory
//! ([`WITNESS_FILE`]), and presents them all whenever it opens a new stream. A server whose log
//! no longer extends one of them (an older copy of its data directory was restored, records were
//! rewritten or cut) notices, stops signing and fails its healthcheck until an operator
//! acknowledges the divergence. The agent checks nothing itself: it only remembers, which is
//! what a restored server cannot make it forget.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sigil_core::hex::{decode as hex_decode, encode as hex};
use sigil_proto::node::AuditCheckpoint;
use tracing::{debug, warn};

use crate::node::{NodeError, write_private};

/// The file, in the agent's data directory, holding the checkpoints it witnessed.
pub const WITNESS_FILE: &str = "audit-checkpoints.json";

/// How far ahead of the agent's clock a checkpoint's time may be.
const MAX_CLOCK_AHEAD_SECONDS: i64 = 3600;

/// The most chains an agent keeps a checkpoint of (one per server of the trust domain; the
/// server checks at most this many per call).
const MAX_CHAINS: usize = 16;

/// The latest checkpoint received of each chain, kept on disk.
#[derive(Debug)]
pub(crate) struct Witness {
    path: PathBuf,
    latest: BTreeMap<String, AuditCheckpoint>,
}

/// One checkpoint as the witness file stores it (bytes as lowercase hex).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredCheckpoint {
    chain_id: String,
    sequence: u64,
    hash: String,
    time: i64,
    key_id: String,
    public_key: String,
    signature: String,
}

// === impl Witness ===

impl Witness {
    /// Loads what the agent witnessed before, from `data_dir`. A file that cannot be read is
    /// reported and treated as empty: witnessing must never keep the agent from serving.
    pub(crate) fn load(data_dir: &Path) -> Self {
        let path = data_dir.join(WITNESS_FILE);
        let latest = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<StoredCheckpoint>>(&bytes) {
                Ok(stored) => stored
                    .into_iter()
                    .filter_map(StoredCheckpoint::into_message)
                    .map(|cp| (cp.chain_id.clone(), cp))
                    .collect(),
                Err(error) => {
                    warn!(path = %path.display(), %error, "cannot read the audit checkpoints this agent witnessed; starting without them");
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(error) => {
                warn!(path = %path.display(), %error, "cannot read the audit checkpoints this agent witnessed; starting without them");
                BTreeMap::new()
            }
        };
        Self { path, latest }
    }

    /// The checkpoints to present to the server, one per chain.
    pub(crate) fn presented(&self) -> Vec<AuditCheckpoint> {
        self.latest.values().cloned().collect()
    }

    /// Keeps `cp` as its chain's latest, unless the one held was signed later, and writes the
    /// file.
    ///
    /// # Errors
    ///
    /// The file could not be written (the checkpoint is kept in memory all the same).
    pub(crate) fn receive(&mut self, cp: AuditCheckpoint) -> Result<(), NodeError> {
        // One dated far ahead would never be replaced: refuse it.
        let now = sigil_core::time::unix_seconds(std::time::SystemTime::now());
        if cp.time > now.saturating_add(MAX_CLOCK_AHEAD_SECONDS) {
            warn!(chain_id = %cp.chain_id, time = cp.time, "an audit checkpoint dated in the future; not kept");
            return Ok(());
        }
        if let Some(held) = self.latest.get(&cp.chain_id) {
            if held.time > cp.time || *held == cp {
                return Ok(());
            }
        } else if self.latest.len() >= MAX_CHAINS {
            warn!(chain_id = %cp.chain_id, "too many audit chains; not witnessing another");
            return Ok(());
        }
        debug!(chain_id = %cp.chain_id, sequence = cp.sequence, "audit checkpoint witnessed");
        self.latest.insert(cp.chain_id.clone(), cp);
        let stored: Vec<StoredCheckpoint> = self
            .latest
            .values()
            .map(StoredCheckpoint::from_message)
            .collect();
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| NodeError::Key(e.to_string()))?;
        write_private(&self.path, &json)
    }
}

// === impl StoredCheckpoint ===

impl StoredCheckpoint {
    fn from_message(cp: &AuditCheckpoint) -> Self {
        Self {
            chain_id: cp.chain_id.clone(),
            sequence: cp.sequence,
            hash: hex(&cp.hash),
            time: cp.time,
            key_id: cp.key_id.clone(),
            public_key: hex(&cp.public_key),
            signature: hex(&cp.signature),
        }
    }

    fn into_message(self) -> Option<AuditCheckpoint> {
        Some(AuditCheckpoint {
            hash: hex_decode(&self.hash)?,
            public_key: hex_decode(&self.public_key)?,
            signature: hex_decode(&self.signature)?,
            chain_id: self.chain_id,
            sequence: self.sequence,
            time: self.time,
            key_id: self.key_id,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[test]
    fn a_checkpoint_dated_in_the_future_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut witness = Witness::load(dir.path());
        witness.receive(cp("default", 3, 100)).unwrap();
        let far = sigil_core::time::unix_seconds(std::time::SystemTime::now()) + 10 * 3600;
        witness.receive(cp("default", 9, far)).unwrap();
        assert_eq!(witness.presented(), vec![cp("default", 3, 100)]);
    }

    fn cp(chain: &str, sequence: u64, time: i64) -> AuditCheckpoint {
        AuditCheckpoint {
            chain_id: chain.into(),
            sequence,
            hash: vec![sequence as u8; 32],
            time,
            key_id: "audit-signing".into(),
            public_key: vec![4; 65],
            signature: vec![48, 1, 2],
        }
    }

    #[test]
    fn the_latest_checkpoint_of_each_chain_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut witness = Witness::load(dir.path());
        assert!(witness.presented().is_empty());
        witness.receive(cp("default", 3, 100)).unwrap();
        witness.receive(cp("default", 7, 160)).unwrap();
        // An older one does not replace a newer one.
        witness.receive(cp("default", 5, 120)).unwrap();
        witness.receive(cp("server-b", 1, 50)).unwrap();
        // A newer one with a lower sequence (signed after an acknowledged divergence) does.
        witness.receive(cp("server-b", 0, 60)).unwrap();

        let reloaded = Witness::load(dir.path());
        assert_eq!(
            reloaded.presented(),
            vec![cp("default", 7, 160), cp("server-b", 0, 60)]
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(WITNESS_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn an_unreadable_file_is_an_empty_witness() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(WITNESS_FILE), b"{not json").unwrap();
        assert!(Witness::load(dir.path()).presented().is_empty());
    }
}
