//! Every SVID the agent obtains from the server goes through the [`Minter`]: the batches the
//! manager mints ahead for its entries, the JWT-SVIDs workloads ask for (cached per entry and
//! audience), and the SVIDs of privileged sessions, which are **minted per caller and never
//! served from a cache to another process** (the server audits each with that caller's pid).
//! A server's answer becomes a [`WorkloadSvid`] in one place ([`issued_svid`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use sigil_attestors::unix::Credentials;
use sigil_core::{SelectorSet, SpiffeId, X509Bundle};
use sigil_proto::node::{
    NewJwtsvidRequest, NewSessionJwtsvidRequest, NewSessionX509svidRequest, Workload, X509svid,
};
use tracing::debug;

pub use crate::cache::Grant;
use crate::cache::{SessionEntry, SvidKey, WorkloadSvid, millis};
use crate::node::{NodeConnection, NodeError, csr, new_key};
use crate::telemetry::MintMetrics;

/// The most JWT-SVIDs the cache holds before it starts over.
const MAX_CACHED_JWTS: usize = 10_000;

/// Why an SVID could not be minted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    /// The key or the CSR could not be made.
    #[error("cannot make a key or csr: {0}")]
    Key(#[from] NodeError),
    /// The server refused or could not be reached.
    #[error("the server answered {code:?}: {message}")]
    Server {
        /// The gRPC code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The server signed another identity than the one asked for.
    #[error("the server signed {got} for {expected}")]
    WrongIdentity {
        /// What was asked for.
        expected: String,
        /// What came back.
        got: String,
    },
    /// The answer cannot be used (an ID or a chain that does not parse).
    #[error("the server sent an unusable svid: {0}")]
    Unusable(String),
}

/// The workload a session SVID is for, as the server records it.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// Its kernel credentials.
    pub credentials: Credentials,
    /// Its selectors.
    pub selectors: &'a SelectorSet,
}

/// Mints through the node connection. Cheap to clone.
#[derive(Clone)]
pub struct Minter {
    node: Arc<NodeConnection>,
    jwts: Arc<Mutex<HashMap<JwtKey, CachedJwt>>>,
    metrics: MintMetrics,
}

/// (entry id, entry revision, sorted audience): an updated entry (another SPIFFE ID, another
/// TTL) never serves a token minted for its previous version.
type JwtKey = (Arc<str>, u64, Vec<String>);

/// A JWT-SVID with the time it was fetched and its expiry.
#[derive(Debug, Clone)]
struct CachedJwt {
    token: String,
    fetched: SystemTime,
    expires: SystemTime,
}

// === impl Minter ===

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter").finish_non_exhaustive()
    }
}

impl Minter {
    /// A minter over `node`.
    pub fn new(node: Arc<NodeConnection>) -> Self {
        Self {
            node,
            jwts: Arc::default(),
            metrics: MintMetrics::default(),
        }
    }

    /// What this minter (and its clones) obtained, by kind.
    pub fn metrics(&self) -> &MintMetrics {
        &self.metrics
    }

    /// A session SVID for `session`, minted for `caller` alone: a fresh key, a CSR, and the
    /// server's signature after it audited the caller. Never cached.
    ///
    /// # Errors
    ///
    /// [`MintError`].
    pub async fn session_x509(
        &self,
        session: &SessionEntry,
        caller: Caller<'_>,
    ) -> Result<WorkloadSvid, MintError> {
        let key = new_key()?;
        let csr = csr(&key)?;
        let svid = self
            .node
            .client()
            .new_session_x509svid(NewSessionX509svidRequest {
                entry_id: session.entry_id.clone(),
                csr,
                workload: Some(workload_message(caller)),
            })
            .await
            .map_err(server_error)?
            .into_inner();
        debug!(session_id = %session.session_id, "session svid minted");
        self.metrics.minted("x509_session");
        issued_svid(
            Arc::new(Grant {
                entry_id: session.entry_id.as_str().into(),
                spiffe_id: session.spiffe_id.clone(),
                selectors: session.selectors.clone(),
                hint: session.hint.as_str().into(),
                x509_ttl: session.svid_ttl,
                expires_at: Some(session.ends_at),
                federates_with: session.federates_with.as_slice().into(),
            }),
            session.revision,
            svid,
            &key,
        )
    }

    /// A JWT-SVID for the identity `grant` gives (through the SVID minted for the entry at
    /// `revision`) and `audience` (sorted, deduplicated): from the cache while it has more than
    /// half its life left, else from the server.
    ///
    /// # Errors
    ///
    /// [`MintError::Server`]; [`MintError::WrongIdentity`] when the entry grants another ID
    /// than `grant` now (its new SVID is on its way: retry).
    pub async fn jwt(
        &self,
        grant: &Grant,
        revision: u64,
        audience: &[String],
    ) -> Result<String, MintError> {
        let key = (grant.entry_id.clone(), revision, audience.to_vec());
        let now = SystemTime::now();
        if let Some(cached) = self.jwts().get(&key) {
            let life = cached
                .expires
                .duration_since(cached.fetched)
                .unwrap_or(Duration::ZERO);
            if now < cached.fetched + life / 2 {
                return Ok(cached.token.clone());
            }
        }
        let response = self
            .node
            .client()
            .new_jwtsvid(NewJwtsvidRequest {
                entry_id: grant.entry_id.to_string(),
                audience: audience.to_vec(),
            })
            .await
            .map_err(server_error)?
            .into_inner();
        // The entry changed since this identity was minted (the server signs for the entry as
        // it is now): the workload gets this identity's token once its new SVID arrives.
        if response.spiffe_id != grant.spiffe_id.as_str() {
            return Err(MintError::WrongIdentity {
                expected: grant.spiffe_id.to_string(),
                got: response.spiffe_id,
            });
        }
        self.metrics.minted("jwt");
        let expires = expiry(response.expires_at);
        let mut cache = self.jwts();
        if cache.len() > MAX_CACHED_JWTS {
            cache.clear();
        }
        cache.insert(
            key,
            CachedJwt {
                token: response.token.clone(),
                fetched: now,
                expires,
            },
        );
        Ok(response.token)
    }

    /// A JWT-SVID under `session` for `caller` alone; never cached. Returns the SPIFFE ID and
    /// the token.
    ///
    /// # Errors
    ///
    /// [`MintError::Server`].
    pub async fn session_jwt(
        &self,
        session: &SessionEntry,
        audience: &[String],
        caller: Caller<'_>,
    ) -> Result<(String, String), MintError> {
        let response = self
            .node
            .client()
            .new_session_jwtsvid(NewSessionJwtsvidRequest {
                entry_id: session.entry_id.clone(),
                audience: audience.to_vec(),
                workload: Some(workload_message(caller)),
            })
            .await
            .map_err(server_error)?
            .into_inner();
        self.metrics.minted("jwt_session");
        Ok((response.spiffe_id, response.token))
    }

    fn jwts(&self) -> std::sync::MutexGuard<'_, HashMap<JwtKey, CachedJwt>> {
        self.jwts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === helpers ===

/// The server's X509-SVID for `grant` at the entry's `revision`, with its key, as the agent
/// holds it: the identity must be the one granted and the chain must parse.
///
/// # Errors
///
/// [`MintError::WrongIdentity`], [`MintError::Unusable`].
pub(crate) fn issued_svid(
    grant: Arc<Grant>,
    revision: u64,
    svid: X509svid,
    key: &[u8],
) -> Result<WorkloadSvid, MintError> {
    let spiffe_id =
        SpiffeId::new(&svid.spiffe_id).map_err(|e| MintError::Unusable(e.to_string()))?;
    if spiffe_id != grant.spiffe_id {
        return Err(MintError::WrongIdentity {
            expected: grant.spiffe_id.to_string(),
            got: spiffe_id.to_string(),
        });
    }
    X509Bundle::from_der(spiffe_id.trust_domain(), &svid.cert_chain)
        .map_err(|e| MintError::Unusable(e.to_string()))?;
    let key = SvidKey::for_chain(key, &svid.cert_chain)
        .map_err(|e| MintError::Unusable(e.to_string()))?;
    Ok(WorkloadSvid {
        grant,
        revision,
        issued_at_ms: millis(SystemTime::now()),
        // Kept as the server sent it (no copy); the key's scalar is copied out of the caller's
        // buffer, which is zeroed when it is dropped.
        chain: svid.cert_chain.into_boxed_slice(),
        key,
        not_after_ms: millis(expiry(svid.expires_at)),
    })
}

/// A protobuf expiry (seconds since the epoch) as a time; the epoch for nonsense.
fn expiry(expires_at: i64) -> SystemTime {
    sigil_core::time::from_unix_seconds(expires_at).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn server_error(status: tonic::Status) -> MintError {
    MintError::Server {
        code: status.code(),
        message: status.message().to_owned(),
    }
}

/// The workload a session SVID is for, as the server's request carries it.
fn workload_message(caller: Caller<'_>) -> Workload {
    Workload {
        pid: caller.credentials.pid.unwrap_or(0),
        uid: caller.credentials.uid,
        gid: caller.credentials.gid,
        selectors: caller.selectors.iter().map(ToString::to_string).collect(),
    }
}
