//! The trust domain's signing authorities: ECDSA P-256 X.509 authorities (self-signed roots,
//! or intermediates of an upstream CA: [`UpstreamAuthority`]) and JWT signing keys, their
//! rotation as a pure function of time, and one signing method per credential kind.
//!
//! # Authorities and rotation
//!
//! Each authority (an X.509 root, or a JWT key with its `kid`) is in one of three states
//! ([`AuthorityState`]): *prepared* (published in the bundle, not signing yet), *active*
//! (signing) or *old* (replaced, kept in the bundle until it expires). [`Ca::rotate`] moves
//! them along as a pure function of `now` (`sigil_core::lifetime`): an authority issued at T
//! with lifetime L (`ca_ttl`) gets its successor prepared at T + L/2, hands over at T + 5L/6,
//! and is pruned at T + L. Every change to what the bundle publishes (an authority prepared,
//! created or pruned; not an activation) increments the bundle's `spiffe_sequence`.
//!
//! # Persistence
//!
//! Keys live in a [`KeyManager`] ([`DiskKeyManager`] by default: PKCS#8 files, mode 0600). The
//! authorities' states, certificates and key ids live in a journal, JSON stored through the
//! narrow [`CaJournalStore`] trait that the store implements. A change is saved to the journal
//! before it is used; restarting with the same keys and journal gives the same authorities and
//! the same bundle. The journal never holds key material:
//!
//! ```json
//! {
//!   "version": 1,
//!   "trust_domain": "example.org",
//!   "bundle_sequence": 2,
//!   "x509_authorities": [
//!     { "id": "<serial hex>", "key_id": "x509-<serial hex>", "state": "active",
//!       "issued_at": 1800000000, "not_after": 1800086400, "certificate": "<DER, base64>" }
//!   ],
//!   "jwt_keys": [
//!     { "kid": "<RFC 7638 thumbprint>", "key_id": "jwt-<random hex>", "state": "prepared",
//!       "issued_at": 1800043200, "not_after": 1800129600, "public_key": "<SEC 1, base64url>" }
//!   ]
//! }
//! ```
//!
//! # Signing
//!
//! One method per credential kind: [`Ca::sign_agent_x509_svid`],
//! [`Ca::sign_workload_x509_svid`], [`Ca::sign_server_x509_svid`] and [`Ca::sign_jwt_svid`].
//! Each builds the template from the identity it is given (a CSR only proves possession of a
//! P-256 key; its subject, SANs and extensions are ignored), signs with the active authority,
//! and checks the result against sigil-core's SVID rules before returning it. Lifetimes come
//! from [`Validity::issue`]: NotBefore backdated 10 s, NotAfter never past the signing
//! authority's NotAfter (nor any extra cap, such as a privileged session's end).
//!
//! [`Validity::issue`]: sigil_core::Validity::issue

mod authority;
mod crl;
mod error;
pub(crate) mod keys;
mod pkcs11;
mod rotation;
mod signing;
mod template;
#[cfg(test)]
mod tests;
mod upstream;

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sigil_core::{SpiffeBundle, SpiffeId, TrustDomain, X509Bundle};

use self::authority::Authorities;

pub(crate) use self::authority::{AuthorityInfo, AuthorityKind, AuthorityState};
pub(crate) use self::crl::{RevocationReason, RevokedSerial, SignedCrl};
pub(crate) use self::error::{CaError, CaJournalStoreError};
pub(crate) use self::keys::{CaKey, DiskKeyManager, KeyError, KeyManager};
pub(crate) use self::pkcs11::{Pkcs11KeyManager, Pkcs11OpenError};
pub(crate) use self::rotation::CaJournalStore;
pub(crate) use self::signing::{IssuedX509Svid, WorkloadX509SvidParams};
#[cfg(test)]
pub(crate) use self::template::MAX_CSR_LEN;
pub(crate) use self::upstream::UpstreamAuthority;

/// [`template::P256PublicKey::from_csr`], for the fuzz target (feature `fuzzing`).
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_csr_public_key(der: &[u8]) -> Result<Vec<u8>, String> {
    template::P256PublicKey::from_csr(der)
        .map(|key| rcgen::PublicKeyData::der_bytes(&key).to_vec())
        .map_err(|e| e.to_string())
}

/// The shortest `ca_ttl` accepted: one sixth of it (the longest SVID TTL it can honour) is then
/// at least one second.
pub(crate) const MIN_CA_TTL: Duration = Duration::from_secs(6);

/// The trust domain's certificate authority. Share it behind an `Arc`: signing takes `&self`
/// and never waits for a rotation in progress.
pub(crate) struct Ca {
    trust_domain: TrustDomain,
    ca_ttl: Duration,
    key_manager: Arc<dyn KeyManager>,
    journal_store: Arc<dyn CaJournalStore>,
    /// The upstream CA new X.509 authorities are intermediates of, if any.
    upstream: Option<Arc<UpstreamAuthority>>,
    /// When the upstream CA's trouble was last logged (unix seconds).
    upstream_warned: std::sync::atomic::AtomicI64,
    authorities: RwLock<Arc<Authorities>>,
    rotation: tokio::sync::Mutex<()>,
}

// === impl Ca ===

impl Ca {
    /// The trust domain.
    pub(crate) fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The SPIFFE bundle: every authority not yet pruned (prepared, active and old) and every
    /// JWT key, with `spiffe_sequence` set.
    pub(crate) fn bundle(&self) -> SpiffeBundle {
        self.snapshot().bundle.clone()
    }

    /// The X.509 part of [`Ca::bundle`].
    pub(crate) fn x509_bundle(&self) -> X509Bundle {
        self.snapshot().x509_bundle.clone()
    }

    #[cfg(test)]
    /// The JWT part of [`Ca::bundle`].
    pub(crate) fn jwt_bundle(&self) -> sigil_core::JwtBundle {
        self.snapshot().jwt_bundle.clone()
    }

    /// The bundle's `spiffe_sequence`.
    pub(crate) fn bundle_sequence(&self) -> u64 {
        self.snapshot().sequence
    }

    /// Every authority, X.509 first, each kind oldest first.
    pub(crate) fn authorities(&self) -> Vec<AuthorityInfo> {
        self.snapshot().infos()
    }

    /// The server's own SPIFFE ID, `spiffe://<td>/sigil/server`.
    pub(crate) fn server_id(&self) -> SpiffeId {
        // The trust domain and the constant path are both valid, so this cannot fail; the
        // fallback keeps the signature infallible without a panic.
        crate::policy::server_id(&self.trust_domain).unwrap_or_else(|_| self.trust_domain.root_id())
    }

    /// The current authorities.
    fn snapshot(&self) -> Arc<Authorities> {
        self.authorities
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("ca_ttl", &self.ca_ttl)
            .field("key_manager", &self.key_manager)
            .field("authorities", &self.snapshot().infos())
            .finish_non_exhaustive()
    }
}

pub(crate) use sigil_core::hex::encode as hex;
