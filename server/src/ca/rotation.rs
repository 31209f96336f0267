//! Loading the authorities from the journal (or creating the first ones) and rotating them:
//! [`Ca::load_or_init`], [`Ca::rotate`], and the [`CaJournalStore`] the journal is saved
//! through. The journal's format (`authority::Journal`) is in `authority.rs`.

use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sigil_core::TrustDomain;
use sigil_core::lifetime::LifetimeError;

use super::authority::{
    self, Authorities, JwtAuthority, Slot, Step, Timed, X509Authority, apply_step, changes_bundle,
    check_jwt_entry, decode_certificate, decode_upstream, from_unix_seconds, next_step,
};
use super::keys::{self, CaKey, KeyError, KeyManager};
use super::template::{self, floor_to_second, random_serial};
use super::{Ca, CaError, CaJournalStoreError, MIN_CA_TTL, UpstreamAuthority, hex};

/// How many rotation steps one [`Ca::rotate`] takes at most, per kind of authority. Two or
/// three are needed after a long downtime; more means a bug, and the rest waits for the next
/// call.
const MAX_ROTATION_STEPS: usize = 8;

/// Where the CA keeps its journal: one opaque document, loaded at start and replaced on every
/// rotation change. Implemented by the server's store.
#[async_trait]
pub(crate) trait CaJournalStore: Send + Sync {
    /// The stored journal, or `None` when the CA has never saved one.
    async fn load_ca_journal(&self) -> Result<Option<Vec<u8>>, CaJournalStoreError>;

    /// Replaces the stored journal. Must be durable when it returns.
    async fn save_ca_journal(&self, journal: Vec<u8>) -> Result<(), CaJournalStoreError>;
}

// === impl Ca ===

impl Ca {
    /// Loads the CA from its journal and keys, or creates its first authorities when there is
    /// no journal, then rotates at `now` (so the returned CA is ready to sign).
    ///
    /// # Errors
    ///
    /// [`CaError::CaTtlTooShort`]; the journal store's error; [`CaError::CorruptJournal`] or
    /// [`CaError::TrustDomainMismatch`] for a journal that cannot be used; [`CaError::Key`]
    /// when a key named by the journal cannot be loaded or a new one generated.
    #[cfg(test)]
    pub(crate) async fn load_or_init(
        trust_domain: TrustDomain,
        ca_ttl: Duration,
        key_manager: Arc<dyn KeyManager>,
        journal_store: Arc<dyn CaJournalStore>,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        Self::load_or_init_under(trust_domain, ca_ttl, key_manager, journal_store, None, now).await
    }

    /// [`Ca::load_or_init`], creating new X.509 authorities as intermediates of `upstream`
    /// when one is given (authorities already in the journal stay as they are until they
    /// expire).
    ///
    /// # Errors
    ///
    /// As [`Ca::load_or_init`]; [`CaError::Upstream`] when the upstream CA expires too soon
    /// to sign a new intermediate.
    pub(crate) async fn load_or_init_under(
        trust_domain: TrustDomain,
        ca_ttl: Duration,
        key_manager: Arc<dyn KeyManager>,
        journal_store: Arc<dyn CaJournalStore>,
        upstream: Option<Arc<UpstreamAuthority>>,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        if ca_ttl < MIN_CA_TTL {
            return Err(CaError::CaTtlTooShort {
                ca_ttl,
                min: MIN_CA_TTL,
            });
        }
        if let Some(upstream) = &upstream {
            check_headroom(upstream, ca_ttl, now)?;
            if upstream.not_after() < now + ca_ttl {
                tracing::warn!(
                    expires = %sigil_core::time::format_rfc3339(sigil_core::time::unix_seconds(upstream.not_after())),
                    "the upstream CA expires within ca_ttl: renew it (and restart the server) before it is too old to sign intermediates"
                );
            }
        }
        let authorities = match journal_store.load_ca_journal().await? {
            Some(bytes) => {
                let journal = authority::Journal::parse(&bytes, &trust_domain)?;
                load_authorities(&trust_domain, journal, &key_manager).await?
            }
            None => Authorities::new(trust_domain.clone(), 0, Vec::new(), Vec::new())?,
        };
        let ca = Self {
            trust_domain,
            ca_ttl: Duration::from_secs(ca_ttl.as_secs()),
            key_manager,
            journal_store,
            upstream,
            upstream_warned: std::sync::atomic::AtomicI64::new(i64::MIN),
            authorities: RwLock::new(Arc::new(authorities)),
            rotation: tokio::sync::Mutex::new(()),
        };
        ca.rotate(now).await?;
        Ok(ca)
    }

    /// Rotates the authorities at `now`: prunes expired ones, prepares successors from half
    /// the active one's life, activates them from five sixths (see the module docs). Changes
    /// are saved to the journal before they are used. Call it periodically (every few
    /// seconds); calls are serialized, and signing goes on meanwhile.
    ///
    /// Returns whether the bundle changed (and so its `spiffe_sequence`): publish the new
    /// [`Ca::bundle`] when it did.
    ///
    /// # Errors
    ///
    /// [`CaError::Key`] when a key cannot be generated, and the journal store's error; the CA
    /// then keeps its previous authorities.
    pub(crate) async fn rotate(&self, now: SystemTime) -> Result<bool, CaError> {
        let _rotating = self.rotation.lock().await;
        let current = self.snapshot();
        let now = floor_to_second(now);

        let mut x509 = current.x509.clone();
        let mut jwt = current.jwt.clone();
        let mut created = Vec::new();
        let mut pruned = Vec::new();

        let mut upstream_problem = None;
        let result = async {
            let x509_change = match rotate_slots(&mut x509, now, &mut created, &mut pruned, || {
                self.create_x509_authority(now)
            })
            .await
            {
                Ok(change) => change,
                // The upstream CA cannot sign a successor: the steps taken before (prunes, an
                // activation) stand, and the JWT keys rotate as usual.
                Err(e @ CaError::Upstream { .. }) => {
                    let states =
                        |slots: &[Slot<X509Authority>]| -> Vec<(String, super::AuthorityState)> {
                            slots
                                .iter()
                                .map(|s| (s.authority.id.clone(), s.state))
                                .collect()
                        };
                    let changed = states(&x509) != states(&current.x509);
                    upstream_problem = Some(e);
                    changed.then_some(true)
                }
                Err(e) => return Err(e),
            };
            let jwt_change = rotate_slots(&mut jwt, now, &mut created, &mut pruned, || {
                self.create_jwt_authority(now)
            })
            .await?;
            Ok::<_, CaError>(merge_changes(x509_change, jwt_change))
        }
        .await;
        let change = match result {
            Ok(change) => change,
            Err(e) => {
                self.delete_keys(created).await;
                return Err(e);
            }
        };
        if let Some(problem) = &upstream_problem {
            self.warn_upstream(problem, now);
        }
        let Some(bundle_changed) = change else {
            return Ok(false);
        };

        let sequence = current.sequence + u64::from(bundle_changed);
        let next = match self.commit(sequence, x509, jwt).await {
            Ok(next) => next,
            Err(e) => {
                self.delete_keys(created).await;
                return Err(e);
            }
        };
        tracing::info!(
            trust_domain = %self.trust_domain,
            bundle_sequence = sequence,
            bundle_changed,
            authorities = ?next.infos().iter().map(|a| (a.kind, a.id.as_str(), a.state)).collect::<Vec<_>>(),
            "ca authorities rotated"
        );
        *self
            .authorities
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        self.delete_keys(pruned).await;
        Ok(bundle_changed)
    }

    /// Saves the journal of the new authorities, then returns them.
    async fn commit(
        &self,
        sequence: u64,
        x509: Vec<Slot<X509Authority>>,
        jwt: Vec<Slot<JwtAuthority>>,
    ) -> Result<Authorities, CaError> {
        let next = Authorities::new(self.trust_domain.clone(), sequence, x509, jwt)?;
        let bytes = next.journal().to_bytes()?;
        self.journal_store.save_ca_journal(bytes).await?;
        Ok(next)
    }

    async fn create_x509_authority(&self, now: SystemTime) -> Result<Arc<X509Authority>, CaError> {
        if let Some(upstream) = &self.upstream {
            // Checked before a key is made: no key churn while the upstream CA is too old.
            check_headroom(upstream, self.ca_ttl, now)?;
        }
        let serial = random_serial()?;
        let id = hex(&serial);
        let key = self.generate_key(format!("x509-{id}")).await?;
        let not_after = now
            .checked_add(self.ca_ttl)
            .ok_or(CaError::Lifetime(LifetimeError::OutOfRange))?;
        let certificate_error = |e: rcgen::Error| CaError::Certificate {
            reason: e.to_string(),
        };
        let subject_key = keys::RcgenSigner::new(key.clone());
        let (certificate, not_after, upstream) = match &self.upstream {
            None => {
                let params =
                    template::authority_params(&self.trust_domain, &serial, now, not_after)?;
                let certificate = params
                    .self_signed(&subject_key)
                    .map_err(certificate_error)?;
                (certificate, not_after, Vec::new())
            }
            Some(upstream) => {
                // Never past the upstream CA (checked above to leave the longest SVID room).
                let not_after = floor_to_second(not_after.min(upstream.not_after()));
                let params =
                    template::intermediate_params(&self.trust_domain, &serial, now, not_after)?;
                let certificate = params
                    .signed_by(&subject_key, upstream.issuer())
                    .map_err(certificate_error)?;
                (certificate, not_after, upstream.certificates().to_vec())
            }
        };
        let authority =
            X509Authority::new(id, certificate.der().clone(), upstream, key, now, not_after)?;
        Ok(Arc::new(authority))
    }

    async fn create_jwt_authority(&self, now: SystemTime) -> Result<Arc<JwtAuthority>, CaError> {
        let mut suffix = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix)
            .map_err(|_| CaError::Random)?;
        let key = self.generate_key(format!("jwt-{}", hex(&suffix))).await?;
        let not_after = now
            .checked_add(self.ca_ttl)
            .ok_or(CaError::Lifetime(LifetimeError::OutOfRange))?;
        Ok(Arc::new(JwtAuthority::new(key, now, not_after)?))
    }

    async fn generate_key(&self, id: String) -> Result<Arc<dyn CaKey>, CaError> {
        let key_manager = self.key_manager.clone();
        blocking(move || key_manager.generate_key(&id)).await
    }

    /// Deletes keys no authority uses any more; failures are logged, not returned (an orphan
    /// key file is harmless, and the rotation that made it is already saved).
    async fn delete_keys(&self, key_ids: Vec<String>) {
        for key_id in key_ids {
            let key_manager = self.key_manager.clone();
            let id = key_id.clone();
            if let Err(error) = blocking(move || key_manager.delete_key(&id)).await {
                tracing::warn!(%error, key_id, "cannot delete an unused ca key");
            }
        }
    }
}

/// Runs rotation steps on one kind of authority until it settles. Returns `None` when nothing
/// changed, else whether the bundle changed. New key ids go to `created`, pruned ones to
/// `pruned`.
async fn rotate_slots<T, F, Fut>(
    slots: &mut Vec<Slot<T>>,
    now: SystemTime,
    created: &mut Vec<String>,
    pruned: &mut Vec<String>,
    create: F,
) -> Result<Option<bool>, CaError>
where
    T: Timed,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Arc<T>, CaError>>,
{
    let mut change: Option<bool> = None;
    for _ in 0..MAX_ROTATION_STEPS {
        let Some(step) = next_step(slots, now) else {
            break;
        };
        let new = match step {
            Step::Prepare | Step::CreateActive => {
                let authority = create().await?;
                created.push(authority.key_id().to_owned());
                Some(authority)
            }
            Step::Prune(_) | Step::Activate(_) => None,
        };
        pruned.extend(apply_step(slots, step, new));
        change = Some(change.unwrap_or(false) || changes_bundle(step));
    }
    Ok(change)
}

/// Combines the changes of two kinds of authority: `None` when neither changed, else whether
/// either changed the bundle.
pub(super) fn merge_changes(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(false) || b.unwrap_or(false)),
    }
}

/// Loads every authority of the journal with its key.
async fn load_authorities(
    trust_domain: &TrustDomain,
    journal: authority::Journal,
    key_manager: &Arc<dyn KeyManager>,
) -> Result<Authorities, CaError> {
    let time = |secs: u64, what: &str| {
        from_unix_seconds(secs).ok_or_else(|| CaError::CorruptJournal {
            reason: format!("{what} out of range"),
        })
    };
    let mut x509 = Vec::with_capacity(journal.x509_authorities.len());
    for entry in &journal.x509_authorities {
        let key = load_key(key_manager, &entry.key_id).await?;
        let authority = X509Authority::new(
            entry.id.clone(),
            decode_certificate(entry)?,
            decode_upstream(entry)?,
            key,
            time(entry.issued_at, "issued_at")?,
            time(entry.not_after, "not_after")?,
        )?;
        x509.push(Slot {
            state: entry.state,
            authority: Arc::new(authority),
        });
    }
    let mut jwt = Vec::with_capacity(journal.jwt_keys.len());
    for entry in &journal.jwt_keys {
        let key = load_key(key_manager, &entry.key_id).await?;
        let authority = JwtAuthority::new(
            key,
            time(entry.issued_at, "issued_at")?,
            time(entry.not_after, "not_after")?,
        )?;
        check_jwt_entry(entry, &authority)?;
        jwt.push(Slot {
            state: entry.state,
            authority: Arc::new(authority),
        });
    }
    Authorities::new(trust_domain.clone(), journal.bundle_sequence, x509, jwt)
}

async fn load_key(key_manager: &Arc<dyn KeyManager>, id: &str) -> Result<Arc<dyn CaKey>, CaError> {
    let key_manager = key_manager.clone();
    let id = id.to_owned();
    blocking(move || key_manager.load_key(&id)).await
}

/// Runs a key manager call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, KeyError> + Send + 'static,
) -> Result<T, CaError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|_| CaError::KeyTask)?
        .map_err(CaError::from)
}

/// The upstream CA must outlive `now` by the longest SVID (`ca_ttl / 6`) to sign an
/// intermediate.
fn check_headroom(
    upstream: &UpstreamAuthority,
    ca_ttl: Duration,
    now: SystemTime,
) -> Result<(), CaError> {
    if upstream.not_after() < now + ca_ttl / 6 {
        return Err(CaError::Upstream {
            reason: format!(
                "the upstream CA (or a CA above it) expires at {}: too soon for a new intermediate (ca_ttl / 6 = {:?} at least); renew it and restart the server",
                sigil_core::time::format_rfc3339(sigil_core::time::unix_seconds(
                    upstream.not_after()
                )),
                ca_ttl / 6
            ),
        });
    }
    Ok(())
}

impl Ca {
    /// Logs that the upstream CA cannot sign a successor, at most once a minute.
    fn warn_upstream(&self, problem: &CaError, now: SystemTime) {
        let now = sigil_core::time::unix_seconds(now);
        let last = self
            .upstream_warned
            .load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) >= 60 {
            self.upstream_warned
                .store(now, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(error = %problem, "no new X.509 authority can be made");
        }
    }
}
