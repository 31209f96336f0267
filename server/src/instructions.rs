//! The server's X509-SVID signing path in process, without gRPC or TLS, for `sigil-bench
//! instructions`: the instruction count per SVID under valgrind's callgrind, against ring's
//! verify+sign pair, a figure that does not move with the machine's load (not part of the API).
//!
//! What runs is what `BatchNewX509SVID` runs once its request is decoded: entry ids parsed, the
//! entries authorized for the calling agent from the entry cache, each CSR checked, each
//! certificate built from its entry and signed, and one audit record per SVID appended, durable,
//! to a real sled store, by the services the server wires, configured as the server configures
//! them (disk keys, default TTLs).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_core::{Selector, SelectorSet, SpiffeId, TrustDomain};

use crate::ca::{Ca, DiskKeyManager, KeyManager};
use crate::service::agents::Agent;
use crate::service::audit::{AuditLog, STATE_FILE};
use crate::service::authority::{Authority, StoreJournal};
use crate::service::entry_cache::EntryCache;
use crate::service::svids::{SvidRequest, Svids};
use crate::store::sled::{SledStore, SledStoreOptions};
use crate::store::{NewEntry, Store};

/// The services of the signing path over a store in a directory, with entries authorized for
/// one agent.
#[derive(Debug)]
pub struct SigningPath {
    svids: Svids,
    agent: Agent,
    entry_ids: Vec<String>,
}

// === impl SigningPath ===

impl SigningPath {
    /// A store, keys and CA in `dir` (trust domain `example.org`), and one entry per CSR of a
    /// batch (`batch` entries) under agent `spiffe://example.org/spire/agent/bench`.
    ///
    /// # Errors
    ///
    /// What failed to open or initialize, as text.
    pub async fn new(dir: &Path, batch: usize) -> Result<Self, String> {
        let store: Arc<dyn Store> = Arc::new(
            SledStore::open(dir.join("store"), SledStoreOptions::default())
                .map_err(|e| format!("store: {e}"))?,
        );
        let keys: Arc<dyn KeyManager> =
            Arc::new(DiskKeyManager::new(dir.join("keys")).map_err(|e| format!("keys: {e}"))?);
        let trust_domain = TrustDomain::new("example.org").map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        let ca_ttl = Duration::from_secs(24 * 3600);
        let ca = Arc::new(
            Ca::load_or_init_under(
                trust_domain.clone(),
                ca_ttl,
                keys.clone(),
                Arc::new(StoreJournal {
                    store: store.clone(),
                    server_id: crate::store::DEFAULT_SERVER_ID.to_owned(),
                }),
                None,
                now,
            )
            .await
            .map_err(|e| format!("CA: {e}"))?,
        );
        let ttls = crate::config::default_ttl_policy(ca_ttl);
        let authority = Arc::new(Authority::new(ca, ttls, None));
        let audit = Arc::new(
            AuditLog::open(
                store.clone(),
                keys,
                crate::audit::DEFAULT_CHAIN_ID,
                dir.join("keys").join(STATE_FILE),
            )
            .await
            .map_err(|e| format!("audit log: {e}"))?,
        );
        audit
            .prepare(now)
            .await
            .map_err(|e| format!("audit log: {e}"))?;
        let agent_id = trust_domain
            .id(["spire", "agent", "bench"])
            .map_err(|e| e.to_string())?;
        let mut entries = Vec::with_capacity(batch);
        for i in 0..batch {
            let id = SpiffeId::new(&format!("spiffe://example.org/bench/{i}"))
                .map_err(|e| e.to_string())?;
            let selector = Selector::parse(&format!("unix:uid:{}", 2_000_000 + i))
                .map_err(|e| e.to_string())?;
            entries.push(NewEntry::new(
                id,
                agent_id.clone(),
                [selector].into_iter().collect::<SelectorSet>(),
            ));
        }
        let mut entry_ids = Vec::with_capacity(batch);
        for created in store
            .create_entries(entries)
            .await
            .map_err(|e| format!("entries: {e}"))?
        {
            entry_ids.push(created.map_err(|e| format!("entry: {e}"))?.id.to_string());
        }
        // Loaded after the entries exist: it holds them all without following the store.
        let cache = EntryCache::load(store.clone())
            .await
            .map_err(|e| format!("entry cache: {e}"))?;
        Ok(Self {
            svids: Svids::new(audit, authority, cache),
            agent: Agent {
                id: agent_id,
                not_after: now + Duration::from_secs(3600),
                selectors: SelectorSet::default(),
            },
            entry_ids,
        })
    }

    /// Signs one batch: `csrs[i]` for entry `i` (at most as many CSRs as entries), through
    /// the whole path; how many SVIDs were issued.
    ///
    /// # Errors
    ///
    /// A CSR that was not signed, or a failure of the whole batch, as text.
    pub async fn batch(&self, csrs: &[Vec<u8>]) -> Result<usize, String> {
        let requests = self
            .entry_ids
            .iter()
            .zip(csrs)
            .map(|(entry_id, csr)| SvidRequest {
                entry_id: entry_id.clone(),
                csr: csr.clone(),
            })
            .collect();
        let signed = self
            .svids
            .batch_x509(&self.agent, requests, SystemTime::now())
            .await
            .map_err(|e| e.to_string())?;
        let mut issued = 0;
        for (entry_id, outcome) in signed {
            outcome.map_err(|e| format!("entry {entry_id}: {e}"))?;
            issued += 1;
        }
        Ok(issued)
    }
}
