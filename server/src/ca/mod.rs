//! The trust domain's signing authorities: self-signed ECDSA P-256 X.509 roots and JWT signing
//! keys, their rotation as a pure function of time, and one signing method per credential kind.
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

mod authority;
mod crl;
pub mod keys;
mod template;

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value};
use sigil_core::lifetime::LifetimeError;
use sigil_core::x509_svid::check_leaf_certificate;
use sigil_core::{
    JwtBundle, JwtSvid, JwtSvidError, SpiffeBundle, SpiffeId, TrustDomain, Validity, X509Bundle,
    X509SvidError,
};

use self::authority::{
    Authorities, JwtAuthority, Slot, Step, Timed, X509Authority, apply_step, changes_bundle,
    check_jwt_entry, decode_certificate, from_unix_seconds, next_step,
};
use self::template::{P256PublicKey, floor_to_second, random_serial};

pub use self::authority::{AuthorityInfo, AuthorityKind, AuthorityState};
pub use self::crl::{RevokedSerial, SignedCrl};
pub use self::keys::{CaKey, DiskKeyManager, KeyError, KeyManager};
pub use self::template::MAX_CSR_LEN;

/// The shortest `ca_ttl` accepted: one sixth of it (the longest SVID TTL it can honour) is then
/// at least one second.
pub const MIN_CA_TTL: Duration = Duration::from_secs(6);

/// The path prefix reserved for the server's and agents' own IDs: no workload SVID may use it.
pub const RESERVED_PATH_PREFIX: &str = "/sigil/";

/// The path prefix of agent IDs (`spiffe://<td>/sigil/agent/...`).
pub const AGENT_PATH_PREFIX: &str = "/sigil/agent/";

/// The path of the server's own ID (`spiffe://<td>/sigil/server`).
pub const SERVER_PATH: &str = "/sigil/server";

/// How many rotation steps one [`Ca::rotate`] takes at most, per kind of authority. Two or
/// three are needed after a long downtime; more means a bug, and the rest waits for the next
/// call.
const MAX_ROTATION_STEPS: usize = 8;

/// Why the CA could not start, rotate, or sign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// `ca_ttl` is below [`MIN_CA_TTL`].
    #[error("ca_ttl of {ca_ttl:?} is too short; the minimum is {min:?}")]
    CaTtlTooShort {
        /// The configured `ca_ttl`.
        ca_ttl: Duration,
        /// [`MIN_CA_TTL`].
        min: Duration,
    },
    /// A key could not be generated, loaded, used or deleted.
    #[error("ca key: {0}")]
    Key(#[from] KeyError),
    /// The key manager's blocking task did not complete (the runtime is shutting down).
    #[error("ca key manager task did not complete")]
    KeyTask,
    /// The journal store failed to load or save the journal.
    #[error("ca journal store: {0}")]
    JournalStore(#[from] CaJournalStoreError),
    /// The stored journal cannot be used: not JSON of the expected shape, an unknown version,
    /// or entries that contradict each other or their keys. Restore it from a backup; deleting
    /// it creates new authorities, which agents will not trust until they get the new bundle.
    #[error("ca journal is invalid: {reason}")]
    CorruptJournal {
        /// What is wrong.
        reason: String,
    },
    /// The journal belongs to another trust domain than the configured one.
    #[error(
        "ca journal is for trust domain {journal}, but the server is configured for {configured}"
    )]
    TrustDomainMismatch {
        /// The journal's trust domain.
        journal: String,
        /// The configured trust domain.
        configured: TrustDomain,
    },
    /// There is no active authority (only before the first rotation, or after a bug).
    #[error("no active signing authority")]
    NoActiveAuthority,
    /// The bundle could not be built from the authorities.
    #[error("cannot build the bundle: {reason}")]
    Bundle {
        /// What sigil-core reported.
        reason: String,
    },
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// The CSR is longer than [`MAX_CSR_LEN`] bytes.
    #[error("csr is {len} bytes long; the maximum is {max}")]
    CsrTooLarge {
        /// Its length.
        len: usize,
        /// [`MAX_CSR_LEN`].
        max: usize,
    },
    /// The CSR is not a well-formed PKCS#10 request (garbage, truncated, trailing bytes).
    #[error("csr is malformed: {reason}")]
    MalformedCsr {
        /// What the parser reported.
        reason: String,
    },
    /// The CSR's signature does not verify with its own public key: no proof of possession.
    #[error("csr signature does not verify, so it proves no possession of the key")]
    CsrSignatureInvalid,
    /// The key to certify is not an ECDSA P-256 key.
    #[error("the key is {algorithm}; only ecdsa p-256 keys are accepted")]
    UnsupportedKey {
        /// What the key is (`ecdsa p-384`, `ed25519`, `rsa`, ...).
        algorithm: String,
    },
    /// The public key to certify is not a well-formed P-256 SubjectPublicKeyInfo.
    #[error("public key is malformed: {reason}")]
    MalformedPublicKey {
        /// What is wrong.
        reason: String,
    },
    /// The SPIFFE ID belongs to another trust domain than this CA's.
    #[error("spiffe id {id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The ID.
        id: SpiffeId,
        /// This CA's trust domain.
        trust_domain: TrustDomain,
    },
    /// The SPIFFE ID has no path: a trust domain's own ID never identifies a workload.
    #[error("spiffe id {id} has no path, so it cannot identify a workload")]
    RootId {
        /// The ID.
        id: SpiffeId,
    },
    /// A workload or JWT-SVID ID uses the path prefix reserved for the server and agents.
    #[error("spiffe id {id} is under the reserved path prefix {RESERVED_PATH_PREFIX}")]
    ReservedId {
        /// The ID.
        id: SpiffeId,
    },
    /// An agent SVID was asked for an ID outside `spiffe://<td>/sigil/agent/`.
    #[error("spiffe id {id} is not an agent id (spiffe://<td>{AGENT_PATH_PREFIX}...)")]
    NotAgentId {
        /// The ID.
        id: SpiffeId,
    },
    /// A DNS name for the SAN is not a valid host name.
    #[error("dns name {name:?} is invalid: {reason}")]
    InvalidDnsName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A JWT-SVID was asked with no audience, or an empty one.
    #[error("a jwt-svid needs at least one non-empty audience")]
    EmptyAudience,
    /// The TTL is shorter than one second (X.509 and JWT times count whole seconds).
    #[error("ttl of {ttl:?} is too short; svids need at least one second")]
    TtlTooShort {
        /// The TTL asked for.
        ttl: Duration,
    },
    /// No validity period can be computed: a cap (the authority's NotAfter, a session's end)
    /// has passed, or the times are out of range.
    #[error("cannot compute the svid lifetime: {0}")]
    Lifetime(#[from] LifetimeError),
    /// The certificate could not be built or signed.
    #[error("cannot build the certificate: {reason}")]
    Certificate {
        /// What rcgen reported.
        reason: String,
    },
    /// The JWT-SVID could not be signed.
    #[error("cannot sign the jwt-svid: {0}")]
    JwtSigning(#[source] KeyError),
    /// A certificate this CA just signed fails sigil-core's X509-SVID checks. A bug: nothing is
    /// returned.
    #[error("issued x509-svid fails the x509-svid checks: {0}")]
    IssuedX509SvidInvalid(#[source] X509SvidError),
    /// An SVID this CA just signed does not carry what was asked. A bug: nothing is returned.
    #[error("issued svid does not carry the requested {what}")]
    IssuedSvidMismatch {
        /// What differs.
        what: &'static str,
    },
    /// A JWT-SVID this CA just signed fails sigil-core's JWT-SVID validation. A bug: nothing is
    /// returned.
    #[error("issued jwt-svid fails jwt-svid validation: {0}")]
    IssuedJwtSvidInvalid(#[source] JwtSvidError),
}

/// Why the journal store failed; wraps the store's own error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CaJournalStoreError(#[source] Box<dyn StdError + Send + Sync>);

/// Where the CA keeps its journal: one opaque document, loaded at start and replaced on every
/// rotation change. Implemented by the server's store.
#[async_trait]
pub trait CaJournalStore: Send + Sync {
    /// The stored journal, or `None` when the CA has never saved one.
    async fn load_ca_journal(&self) -> Result<Option<Vec<u8>>, CaJournalStoreError>;

    /// Replaces the stored journal. Must be durable when it returns.
    async fn save_ca_journal(&self, journal: Vec<u8>) -> Result<(), CaJournalStoreError>;
}

/// What to put in a workload X509-SVID ([`Ca::sign_workload_x509_svid`]), from its
/// registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadX509SvidParams {
    /// The entry's SPIFFE ID: the one URI SAN.
    pub spiffe_id: SpiffeId,
    /// The entry's DNS names, as DNS SANs after the URI SAN.
    pub dns_names: Vec<String>,
    /// The TTL asked for; NotAfter is capped by the authority and by `caps`.
    pub ttl: Duration,
    /// Further NotAfter caps, such as a privileged session's end.
    pub caps: Vec<SystemTime>,
}

/// An X509-SVID certificate just signed, with what audit records need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedX509Svid {
    spiffe_id: SpiffeId,
    certificate: CertificateDer<'static>,
    serial: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
    authority_id: String,
}

/// The trust domain's certificate authority. Share it behind an `Arc`: signing takes `&self`
/// and never waits for a rotation in progress.
pub struct Ca {
    trust_domain: TrustDomain,
    ca_ttl: Duration,
    key_manager: Arc<dyn KeyManager>,
    journal_store: Arc<dyn CaJournalStore>,
    authorities: RwLock<Arc<Authorities>>,
    rotation: tokio::sync::Mutex<()>,
}

// === impl CaJournalStoreError ===

impl CaJournalStoreError {
    /// Wraps a store error.
    pub fn new(error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self(error.into())
    }
}

// === impl IssuedX509Svid ===

impl IssuedX509Svid {
    /// The SPIFFE ID in the certificate.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The certificate (DER). The chain is just this certificate: it is signed by a root in
    /// the bundle.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// The certificate, by value.
    pub fn into_certificate(self) -> CertificateDer<'static> {
        self.certificate
    }

    /// The serial number, big-endian (16 bytes).
    pub fn serial(&self) -> &[u8] {
        &self.serial
    }

    /// The serial number in lowercase hex.
    pub fn serial_hex(&self) -> String {
        hex(&self.serial)
    }

    /// NotBefore (the issuing time, backdated).
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// NotAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The id of the X.509 authority that signed it (its serial number in hex).
    pub fn authority_id(&self) -> &str {
        &self.authority_id
    }
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
    pub async fn load_or_init(
        trust_domain: TrustDomain,
        ca_ttl: Duration,
        key_manager: Arc<dyn KeyManager>,
        journal_store: Arc<dyn CaJournalStore>,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        if ca_ttl < MIN_CA_TTL {
            return Err(CaError::CaTtlTooShort {
                ca_ttl,
                min: MIN_CA_TTL,
            });
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
    pub async fn rotate(&self, now: SystemTime) -> Result<bool, CaError> {
        let _rotating = self.rotation.lock().await;
        let current = self.snapshot();
        let now = floor_to_second(now);

        let mut x509 = current.x509.clone();
        let mut jwt = current.jwt.clone();
        let mut created = Vec::new();
        let mut pruned = Vec::new();

        let result = async {
            let x509_change = rotate_slots(&mut x509, now, &mut created, &mut pruned, || {
                self.create_x509_authority(now)
            })
            .await?;
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

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The lifetime of new authorities (whole seconds).
    pub fn ca_ttl(&self) -> Duration {
        self.ca_ttl
    }

    /// The SPIFFE bundle: every authority not yet pruned (prepared, active and old) and every
    /// JWT key, with `spiffe_sequence` set.
    pub fn bundle(&self) -> SpiffeBundle {
        self.snapshot().bundle.clone()
    }

    /// The X.509 part of [`Ca::bundle`].
    pub fn x509_bundle(&self) -> X509Bundle {
        self.snapshot().x509_bundle.clone()
    }

    /// The JWT part of [`Ca::bundle`].
    pub fn jwt_bundle(&self) -> JwtBundle {
        self.snapshot().jwt_bundle.clone()
    }

    /// The bundle's `spiffe_sequence`.
    pub fn bundle_sequence(&self) -> u64 {
        self.snapshot().sequence
    }

    /// Every authority, X.509 first, each kind oldest first.
    pub fn authorities(&self) -> Vec<AuthorityInfo> {
        self.snapshot().infos()
    }

    /// The server's own SPIFFE ID, `spiffe://<td>/sigil/server`.
    pub fn server_id(&self) -> SpiffeId {
        // The trust domain and the constant path are both valid, so this cannot fail; the
        // fallback keeps the signature infallible without a panic.
        self.trust_domain
            .id_from_path(SERVER_PATH)
            .unwrap_or_else(|_| self.trust_domain.root_id())
    }

    /// Signs an agent's X509-SVID for `agent_id` (under `spiffe://<td>/sigil/agent/`) and the
    /// P-256 key of `csr_der`, valid for `ttl` from `now`, capped at the authority's NotAfter.
    ///
    /// # Errors
    ///
    /// [`CaError::NotAgentId`] or [`CaError::ForeignTrustDomain`] for the ID; the CSR errors
    /// ([`CaError::MalformedCsr`], [`CaError::CsrTooLarge`], [`CaError::CsrSignatureInvalid`],
    /// [`CaError::UnsupportedKey`]); [`CaError::TtlTooShort`] and [`CaError::Lifetime`].
    pub fn sign_agent_x509_svid(
        &self,
        agent_id: &SpiffeId,
        csr_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        self.check_member(agent_id)?;
        if !agent_id.path().starts_with(AGENT_PATH_PREFIX)
            || agent_id.path().len() == AGENT_PATH_PREFIX.len()
        {
            return Err(CaError::NotAgentId {
                id: agent_id.clone(),
            });
        }
        let public_key = P256PublicKey::from_csr(csr_der)?;
        self.sign_x509(agent_id, &[], &public_key, ttl, &[], now)
    }

    /// Signs a workload's X509-SVID from its registration entry (`params`) and the P-256 key of
    /// `csr_der`. The identity comes from `params` only; the CSR proves possession of the key.
    ///
    /// # Errors
    ///
    /// [`CaError::ForeignTrustDomain`], [`CaError::RootId`] or [`CaError::ReservedId`] for the
    /// ID; [`CaError::InvalidDnsName`]; the CSR errors; [`CaError::TtlTooShort`] and
    /// [`CaError::Lifetime`] (a cap in `params.caps` that has passed).
    pub fn sign_workload_x509_svid(
        &self,
        params: &WorkloadX509SvidParams,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        self.check_workload_id(&params.spiffe_id)?;
        let public_key = P256PublicKey::from_csr(csr_der)?;
        self.sign_x509(
            &params.spiffe_id,
            &params.dns_names,
            &public_key,
            params.ttl,
            &params.caps,
            now,
        )
    }

    /// Signs the server's own X509-SVID, `spiffe://<td>/sigil/server`, for the P-256 key given
    /// as a DER SubjectPublicKeyInfo (the server generates the key itself).
    ///
    /// # Errors
    ///
    /// [`CaError::MalformedPublicKey`] or [`CaError::UnsupportedKey`] for the key;
    /// [`CaError::TtlTooShort`] and [`CaError::Lifetime`].
    pub fn sign_server_x509_svid(
        &self,
        public_key_spki_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        let public_key = P256PublicKey::from_spki_der(public_key_spki_der)?;
        self.sign_x509(&self.server_id(), &[], &public_key, ttl, &[], now)
    }

    /// Signs a JWT-SVID for `spiffe_id` and `audience` with the active JWT key: ES256, `kid`
    /// in the header, `sub`, `aud` (always an array), `iat` = `now`, `exp` = `now + ttl` capped
    /// at the key's NotAfter, and `iss` when `issuer` is given and not empty. The token is
    /// validated with sigil-core against the CA's JWT bundle before it is returned.
    ///
    /// # Errors
    ///
    /// [`CaError::ForeignTrustDomain`], [`CaError::RootId`] or [`CaError::ReservedId`] for the
    /// ID; [`CaError::EmptyAudience`]; [`CaError::TtlTooShort`] and [`CaError::Lifetime`];
    /// [`CaError::JwtSigning`] when the key fails to sign.
    pub fn sign_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
        issuer: Option<&str>,
    ) -> Result<JwtSvid, CaError> {
        self.check_workload_id(spiffe_id)?;
        let Some(first_audience) = audience.first() else {
            return Err(CaError::EmptyAudience);
        };
        if audience.iter().any(String::is_empty) {
            return Err(CaError::EmptyAudience);
        }
        check_ttl(ttl)?;
        let authorities = self.snapshot();
        let key = authorities.active_jwt()?;
        let now = floor_to_second(now);
        let validity = Validity::issue(now, ttl, &[key.not_after])?;
        let iat = authority::unix_seconds(now);
        let exp = authority::unix_seconds(floor_to_second(validity.not_after()));

        let mut header = Map::new();
        header.insert("alg".to_owned(), "ES256".into());
        header.insert("kid".to_owned(), key.kid.as_str().into());
        header.insert("typ".to_owned(), "JWT".into());
        let mut claims = Map::new();
        claims.insert("sub".to_owned(), spiffe_id.as_str().into());
        claims.insert("aud".to_owned(), audience.to_vec().into());
        claims.insert("exp".to_owned(), exp.into());
        claims.insert("iat".to_owned(), iat.into());
        if let Some(issuer) = issuer.filter(|issuer| !issuer.is_empty()) {
            claims.insert("iss".to_owned(), issuer.into());
        }
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(Value::Object(header).to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string())
        );
        let signature =
            keys::jws_signature(key.key.as_ref(), token.as_bytes()).map_err(CaError::JwtSigning)?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));

        // Check what was signed, as a relying party would.
        let svid =
            JwtSvid::parse_and_validate(&token, &authorities.jwt_bundle, first_audience, now)
                .map_err(CaError::IssuedJwtSvidInvalid)?;
        if svid.spiffe_id() != spiffe_id || svid.audience() != audience {
            return Err(CaError::IssuedSvidMismatch {
                what: "jwt-svid subject or audience",
            });
        }
        tracing::debug!(spiffe_id = %spiffe_id, kid = %key.kid, exp, "jwt-svid signed");
        Ok(svid)
    }

    // --- private ---

    /// The current authorities.
    fn snapshot(&self) -> Arc<Authorities> {
        self.authorities
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Builds, signs and checks an X509-SVID leaf.
    fn sign_x509(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        public_key: &P256PublicKey,
        ttl: Duration,
        caps: &[SystemTime],
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        check_ttl(ttl)?;
        let authorities = self.snapshot();
        let authority = authorities.active_x509()?;
        let now = floor_to_second(now);
        let mut all_caps = Vec::with_capacity(1 + caps.len());
        all_caps.push(authority.not_after);
        all_caps.extend_from_slice(caps);
        let validity = Validity::issue(now, ttl, &all_caps)?;
        let not_before = validity.not_before();
        let not_after = floor_to_second(validity.not_after());
        if not_after <= now {
            // A cap less than a second away.
            return Err(CaError::Lifetime(LifetimeError::CapPassed));
        }
        let serial = random_serial()?;
        let params = template::leaf_params(spiffe_id, dns_names, &serial, not_before, not_after)?;
        let certificate = params
            .signed_by(public_key, &authority.issuer)
            .map_err(|e| CaError::Certificate {
                reason: e.to_string(),
            })?
            .der()
            .clone();

        // Check what was signed: the leaf profile and the identity. The signature itself is not
        // verified again here (that second ECDSA verify was a third of the issuance cost): the
        // active authority's key is checked against its certificate when the journal is loaded,
        // and the tests verify every credential kind with openssl and `verify_chain`.
        let issued_id =
            check_leaf_certificate(&certificate).map_err(CaError::IssuedX509SvidInvalid)?;
        if issued_id != *spiffe_id {
            return Err(CaError::IssuedSvidMismatch {
                what: "x509-svid spiffe id",
            });
        }

        tracing::debug!(
            spiffe_id = %spiffe_id,
            serial = %hex(&serial),
            authority_id = %authority.id,
            "x509-svid signed"
        );
        Ok(IssuedX509Svid {
            spiffe_id: spiffe_id.clone(),
            certificate,
            serial: serial.to_vec(),
            not_before,
            not_after,
            authority_id: authority.id.clone(),
        })
    }

    fn check_member(&self, id: &SpiffeId) -> Result<(), CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        Ok(())
    }

    fn check_workload_id(&self, id: &SpiffeId) -> Result<(), CaError> {
        self.check_member(id)?;
        if id.is_root() {
            return Err(CaError::RootId { id: id.clone() });
        }
        if is_reserved(id) {
            return Err(CaError::ReservedId { id: id.clone() });
        }
        Ok(())
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
        let serial = random_serial()?;
        let id = hex(&serial);
        let key = self.generate_key(format!("x509-{id}")).await?;
        let not_after = now
            .checked_add(self.ca_ttl)
            .ok_or(CaError::Lifetime(LifetimeError::OutOfRange))?;
        let params = template::authority_params(&self.trust_domain, &serial, now, not_after)?;
        let certificate = params
            .self_signed(&keys::RcgenSigner::new(key.clone()))
            .map_err(|e| CaError::Certificate {
                reason: e.to_string(),
            })?
            .der()
            .clone();
        let authority = X509Authority::new(id, certificate, key, now, not_after)?;
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
fn merge_changes(a: Option<bool>, b: Option<bool>) -> Option<bool> {
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

fn check_ttl(ttl: Duration) -> Result<(), CaError> {
    if ttl < Duration::from_secs(1) {
        return Err(CaError::TtlTooShort { ttl });
    }
    Ok(())
}

/// Whether `id` is the reserved `/sigil` path or under it.
fn is_reserved(id: &SpiffeId) -> bool {
    let path = id.path();
    path.starts_with(RESERVED_PATH_PREFIX) || path == RESERVED_PATH_PREFIX.trim_end_matches('/')
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use base64::engine::general_purpose::STANDARD;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
        PKCS_ED25519, PublicKeyData as _, SanType, SignatureAlgorithm,
    };
    use sigil_core::x509_svid::X509Svid;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::X509Certificate;

    use super::*;
    use sigil_core::x509_svid::verify_chain;

    // --- fixtures ---

    const TD: &str = "example.org";
    const WORKLOAD: &str = "spiffe://example.org/ns/prod/web";
    const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/abc";

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn td() -> TrustDomain {
        TrustDomain::new(TD).unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    /// An in-memory journal store, shared between "restarts".
    #[derive(Default)]
    struct MemoryJournal {
        journal: Mutex<Option<Vec<u8>>>,
        saves: AtomicUsize,
        fail_saves: AtomicBool,
    }

    #[async_trait]
    impl CaJournalStore for MemoryJournal {
        async fn load_ca_journal(&self) -> Result<Option<Vec<u8>>, CaJournalStoreError> {
            Ok(self.journal.lock().unwrap().clone())
        }

        async fn save_ca_journal(&self, journal: Vec<u8>) -> Result<(), CaJournalStoreError> {
            if self.fail_saves.load(Ordering::SeqCst) {
                return Err(CaJournalStoreError::new("disk full"));
            }
            self.saves.fetch_add(1, Ordering::SeqCst);
            *self.journal.lock().unwrap() = Some(journal);
            Ok(())
        }
    }

    impl MemoryJournal {
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(self.journal.lock().unwrap().as_ref().unwrap()).unwrap()
        }
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        keys_dir: std::path::PathBuf,
        journal: Arc<MemoryJournal>,
    }

    impl Fixture {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let keys_dir = tmp.path().join("keys");
            Self {
                _tmp: tmp,
                keys_dir,
                journal: Arc::new(MemoryJournal::default()),
            }
        }

        async fn ca(&self, ca_ttl: Duration, now: SystemTime) -> Result<Ca, CaError> {
            let keys = Arc::new(DiskKeyManager::new(&self.keys_dir).unwrap());
            Ca::load_or_init(td(), ca_ttl, keys, self.journal.clone(), now).await
        }

        fn key_files(&self) -> Vec<String> {
            let mut names: Vec<_> = std::fs::read_dir(&self.keys_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    fn csr_with(alg: &'static SignatureAlgorithm, params: &CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn csr() -> Vec<u8> {
        csr_with(&PKCS_ECDSA_P256_SHA256, &CertificateParams::default())
    }

    fn workload(ttl: u64) -> WorkloadX509SvidParams {
        WorkloadX509SvidParams {
            spiffe_id: id(WORKLOAD),
            dns_names: vec!["web.example.org".into(), "*.web.example.org".into()],
            ttl: secs(ttl),
            caps: vec![],
        }
    }

    fn pem(der: &[u8]) -> String {
        let b64 = STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    }

    /// `openssl verify -x509_strict -CAfile bundle.pem -attime <at> [extra] leaf.pem`.
    fn openssl_verify(
        bundle: &X509Bundle,
        leaf: &CertificateDer<'_>,
        at: SystemTime,
        extra: &[&str],
    ) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let (bundle_pem, leaf_pem) = (dir.path().join("bundle.pem"), dir.path().join("leaf.pem"));
        std::fs::write(&bundle_pem, bundle.to_pem()).unwrap();
        std::fs::write(&leaf_pem, pem(leaf)).unwrap();
        let at = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let out = Command::new("openssl")
            .args(["verify", "-x509_strict", "-attime", &at.to_string()])
            .args(extra)
            .arg("-CAfile")
            .arg(&bundle_pem)
            .arg(&leaf_pem)
            .output()
            .expect("openssl is on PATH");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
        let (rest, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        assert!(rest.is_empty());
        cert
    }

    fn unix(t: SystemTime) -> i64 {
        i64::try_from(authority::unix_seconds(t)).unwrap()
    }

    /// The X.509 authority ids in the bundle, in order.
    fn bundle_ids(ca: &Ca) -> Vec<String> {
        ca.x509_bundle()
            .authorities()
            .iter()
            .map(|der| hex(parse(der).raw_serial()))
            .collect()
    }

    fn states(ca: &Ca, kind: AuthorityKind) -> Vec<(String, AuthorityState)> {
        ca.authorities()
            .into_iter()
            .filter(|a| a.kind == kind)
            .map(|a| (a.id, a.state))
            .collect()
    }

    fn active_id(ca: &Ca, kind: AuthorityKind) -> String {
        ca.authorities()
            .into_iter()
            .find(|a| a.kind == kind && a.state == AuthorityState::Active)
            .unwrap()
            .id
    }

    /// Checks the leaf profile field by field, beyond what sigil-core checks.
    fn assert_leaf_profile(der: &CertificateDer<'_>, want_id: &str, dns: &[&str], root: &[u8]) {
        let cert = parse(der);
        assert!(cert.subject().iter().next().is_none(), "empty subject");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "san is critical with an empty subject");
        let uris: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(uris, vec![want_id.to_owned()]);
        let dns_sans: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            dns_sans,
            dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()
        );
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(
            bc.critical && !bc.value.ca,
            "basic constraints present, CA=false"
        );
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert_eq!(cert.raw_serial().len(), 16, "128-bit serial");
        assert!(cert.raw_serial()[0] & 0x80 == 0, "positive serial");
        // The AKI names the root's SKI.
        let root_der = CertificateDer::from(root.to_vec());
        let root = parse(&root_der);
        let ski = root
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
            .unwrap();
        let aki = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(aki, ski);
        assert_eq!(cert.issuer(), root.subject());
    }

    // --- authorities ---

    #[tokio::test]
    async fn the_first_start_creates_a_self_signed_p256_root_and_a_jwt_key() {
        let fx = Fixture::new();
        let ca = fx.ca(secs(86_400), t(0)).await.unwrap();
        assert_eq!(ca.bundle_sequence(), 1);
        let bundle = ca.x509_bundle();
        let [root] = bundle.authorities() else {
            panic!("one root");
        };
        let cert = parse(root);
        // Subject O=Sigil, CN=<td>, serialNumber=<serial>; issuer = subject.
        let attr = |oid: &[u64]| {
            cert.subject()
                .iter_attributes()
                .find(|a| a.attr_type().iter().unwrap().collect::<Vec<_>>() == oid)
                .map(|a| a.as_str().unwrap().to_owned())
        };
        assert_eq!(attr(&[2, 5, 4, 10]).as_deref(), Some("Sigil"));
        assert_eq!(attr(&[2, 5, 4, 3]).as_deref(), Some(TD));
        assert_eq!(attr(&[2, 5, 4, 5]), Some(hex(cert.raw_serial())));
        assert_eq!(cert.subject(), cert.issuer());
        assert_eq!(cert.raw_serial().len(), 16);
        // URI SAN spiffe://td, CA=true, keyCertSign + cRLSign, critical.
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://example.org")]
        );
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        // P-256, self-signed, NotBefore backdated 10 s, NotAfter = now + ca_ttl.
        assert_eq!(
            cert.public_key()
                .algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
        cert.verify_signature(None).unwrap();
        assert_eq!(cert.validity().not_before.timestamp(), unix(t(0)) - 10);
        assert_eq!(cert.validity().not_after.timestamp(), unix(t(86_400)));

        assert_eq!(ca.jwt_bundle().keys().len(), 1);
        let infos = ca.authorities();
        assert_eq!(infos.len(), 2);
        assert!(infos.iter().all(|a| a.state == AuthorityState::Active));
        assert!(
            infos
                .iter()
                .all(|a| a.issued_at == t(0) && a.not_after == t(86_400))
        );
        // The bundle JSON carries the sequence and both kinds of keys.
        let json: serde_json::Value = serde_json::from_slice(&ca.bundle().to_json()).unwrap();
        assert_eq!(json["spiffe_sequence"], 1);
        assert_eq!(json["keys"].as_array().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn key_files_are_0600_and_nothing_shows_key_bytes() {
        use std::os::unix::fs::PermissionsExt as _;
        let fx = Fixture::new();
        let ca = fx.ca(secs(600), t(0)).await.unwrap();
        let files = fx.key_files();
        assert_eq!(files.len(), 2, "{files:?}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fx.keys_dir), 0o700);
        let shown = format!("{ca:?} {:?}", ca.authorities());
        for file in &files {
            let path = fx.keys_dir.join(file);
            assert_eq!(mode(&path), 0o600, "{file}");
            let pkcs8 = std::fs::read(&path).unwrap();
            assert!(!shown.contains(&hex(&pkcs8)));
            assert!(!shown.contains(&hex(&pkcs8[36..68])), "private scalar");
            assert!(!shown.contains(&format!("{:?}", &pkcs8[36..68])));
        }
        // The journal names the keys but holds no key material.
        let journal = fx.journal.journal.lock().unwrap().clone().unwrap();
        for file in &files {
            let pkcs8 = std::fs::read(fx.keys_dir.join(file)).unwrap();
            let scalar = &pkcs8[36..68];
            assert!(!journal.windows(scalar.len()).any(|w| w == scalar));
            for encoded in [STANDARD.encode(scalar), URL_SAFE_NO_PAD.encode(scalar)] {
                assert!(!String::from_utf8_lossy(&journal).contains(&encoded[..20]));
            }
        }
    }

    #[tokio::test]
    async fn the_rotation_timeline_with_a_60s_ca_ttl() {
        use AuthorityKind::{Jwt, X509};
        use AuthorityState::{Active, Old, Prepared};
        let fx = Fixture::new();
        let ca = fx.ca(secs(60), t(0)).await.unwrap();
        let a = active_id(&ca, X509);
        let ja = active_id(&ca, Jwt);
        assert_eq!(ca.bundle_sequence(), 1);
        assert_eq!(fx.journal.saves.load(Ordering::SeqCst), 1);

        // Nothing to do before half-life.
        assert!(!ca.rotate(t(29)).await.unwrap());
        assert_eq!(ca.bundle_sequence(), 1);
        assert_eq!(fx.journal.saves.load(Ordering::SeqCst), 1);

        // 30 s: the successors are prepared and published; A still signs.
        assert!(ca.rotate(t(30)).await.unwrap());
        assert_eq!(ca.bundle_sequence(), 2);
        let [_, b] = &states(&ca, X509)[..] else {
            panic!("two x509 authorities")
        };
        let b = b.0.clone();
        let jb = states(&ca, Jwt)[1].0.clone();
        assert_eq!(
            states(&ca, X509),
            vec![(a.clone(), Active), (b.clone(), Prepared)]
        );
        assert_eq!(
            states(&ca, Jwt),
            vec![(ja.clone(), Active), (jb.clone(), Prepared)]
        );
        assert_eq!(bundle_ids(&ca), vec![a.clone(), b.clone()]);
        assert_eq!(ca.jwt_bundle().keys().len(), 2);
        let svid = ca
            .sign_workload_x509_svid(&workload(10), &csr(), t(31))
            .unwrap();
        assert_eq!(svid.authority_id(), a);
        let jwt = ca
            .sign_jwt_svid(&id(WORKLOAD), &["aud".into()], secs(10), t(31), None)
            .unwrap();
        assert_eq!(jwt_kid(&jwt), ja);

        // 49 s: no change. 50 s: B signs, A is old; the bundle is unchanged.
        assert!(!ca.rotate(t(49)).await.unwrap());
        assert!(!ca.rotate(t(50)).await.unwrap());
        assert_eq!(ca.bundle_sequence(), 2);
        assert_eq!(
            states(&ca, X509),
            vec![(a.clone(), Old), (b.clone(), Active)]
        );
        assert_eq!(
            states(&ca, Jwt),
            vec![(ja.clone(), Old), (jb.clone(), Active)]
        );
        assert_eq!(bundle_ids(&ca), vec![a.clone(), b.clone()]);
        let by_b = ca
            .sign_workload_x509_svid(&workload(10), &csr(), t(51))
            .unwrap();
        assert_eq!(by_b.authority_id(), b);
        let jwt = ca
            .sign_jwt_svid(&id(WORKLOAD), &["aud".into()], secs(10), t(51), None)
            .unwrap();
        assert_eq!(jwt_kid(&jwt), jb);
        // What A signed still verifies: A is still in the bundle.
        openssl_verify(&ca.x509_bundle(), svid.certificate(), t(35), &[]).unwrap();
        openssl_verify(&ca.x509_bundle(), by_b.certificate(), t(55), &[]).unwrap();
        verify_chain(
            std::slice::from_ref(by_b.certificate()),
            &ca.x509_bundle(),
            t(55),
        )
        .unwrap();
        // The activation was saved, even though the bundle did not change.
        assert_eq!(fx.journal.json()["x509_authorities"][1]["state"], "active");

        // 59 s: no change. 60 s: A expires and is pruned (its key deleted); B is half-way,
        // so C is prepared. One bundle change, one sequence increment.
        assert!(!ca.rotate(t(59)).await.unwrap());
        let files_before = fx.key_files();
        assert!(files_before.contains(&format!("x509-{a}.key")));
        assert!(ca.rotate(t(60)).await.unwrap());
        assert_eq!(ca.bundle_sequence(), 3);
        let x509 = states(&ca, X509);
        assert_eq!(x509.len(), 2);
        assert_eq!(x509[0], (b.clone(), Active));
        assert_eq!(x509[1].1, Prepared);
        assert!(!bundle_ids(&ca).contains(&a));
        let jwt_states = states(&ca, Jwt);
        assert_eq!(jwt_states[0], (jb.clone(), Active));
        assert_eq!(jwt_states[1].1, Prepared);
        assert!(!ca.jwt_bundle().keys().contains_key(&ja));
        let files = fx.key_files();
        assert_eq!(files.len(), 4, "{files:?}");
        assert!(!files.contains(&format!("x509-{a}.key")));
        assert_eq!(fx.journal.json()["bundle_sequence"], 3);

        // 80 s: C takes over from B. 90 s: B is pruned, D prepared.
        assert!(!ca.rotate(t(80)).await.unwrap());
        assert_eq!(states(&ca, X509)[0], (b.clone(), Old));
        assert!(ca.rotate(t(90)).await.unwrap());
        assert_eq!(ca.bundle_sequence(), 4);
        assert!(!bundle_ids(&ca).contains(&b));
    }

    fn jwt_kid(svid: &JwtSvid) -> String {
        let header = svid.token().split('.').next().unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        header["kid"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn a_restart_with_the_same_keys_and_journal_gives_the_same_bundle() {
        let fx = Fixture::new();
        let first = fx.ca(secs(60), t(0)).await.unwrap();
        first.rotate(t(30)).await.unwrap();
        first.rotate(t(50)).await.unwrap();
        let bundle = first.bundle();
        let authorities = first.authorities();
        let saves = fx.journal.saves.load(Ordering::SeqCst);
        let signed = first
            .sign_workload_x509_svid(&workload(5), &csr(), t(51))
            .unwrap();
        drop(first);

        // Restart at a time with nothing to rotate: nothing changes, nothing is written.
        let second = fx.ca(secs(60), t(55)).await.unwrap();
        assert_eq!(second.bundle().to_json(), bundle.to_json());
        assert_eq!(second.bundle(), bundle);
        assert_eq!(second.bundle_sequence(), 2);
        assert_eq!(second.authorities(), authorities);
        assert_eq!(fx.journal.saves.load(Ordering::SeqCst), saves);
        // It signs with the same active authority, and what the first one signed verifies.
        let again = second
            .sign_workload_x509_svid(&workload(5), &csr(), t(52))
            .unwrap();
        assert_eq!(again.authority_id(), signed.authority_id());
        verify_chain(
            std::slice::from_ref(signed.certificate()),
            &second.x509_bundle(),
            t(53),
        )
        .unwrap();
        let jwt = second
            .sign_jwt_svid(&id(WORKLOAD), &["aud".into()], secs(5), t(52), None)
            .unwrap();
        JwtSvid::parse_and_validate(jwt.token(), &bundle.jwt_bundle(), "aud", t(53)).unwrap();
        drop(second);

        // Restart after a rotation point: the restarted CA catches up at once.
        let third = fx.ca(secs(60), t(61)).await.unwrap();
        assert_eq!(third.bundle_sequence(), 3);
        assert_eq!(third.x509_bundle().authorities().len(), 2);
    }

    #[tokio::test]
    async fn a_journal_that_cannot_be_used_is_refused() {
        let fx = Fixture::new();
        fx.ca(secs(60), t(0)).await.unwrap();
        let journal = fx.journal.journal.lock().unwrap().clone().unwrap();

        // Another trust domain.
        let keys = Arc::new(DiskKeyManager::new(&fx.keys_dir).unwrap());
        let err = Ca::load_or_init(
            TrustDomain::new("other.org").unwrap(),
            secs(60),
            keys.clone(),
            fx.journal.clone(),
            t(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");

        // A missing key.
        let empty_dir = tempfile::tempdir().unwrap();
        let other_keys = Arc::new(DiskKeyManager::new(empty_dir.path()).unwrap());
        let err = Ca::load_or_init(td(), secs(60), other_keys, fx.journal.clone(), t(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CaError::Key(KeyError::NotFound { .. })),
            "{err}"
        );

        // A key that does not match the certificate: swap the two key ids.
        let mut value: serde_json::Value = serde_json::from_slice(&journal).unwrap();
        let x509_key = value["x509_authorities"][0]["key_id"].clone();
        let jwt_key = value["jwt_keys"][0]["key_id"].clone();
        value["x509_authorities"][0]["key_id"] = jwt_key;
        value["jwt_keys"][0]["key_id"] = x509_key;
        *fx.journal.journal.lock().unwrap() = Some(serde_json::to_vec(&value).unwrap());
        let err = fx.ca(secs(60), t(1)).await.unwrap_err();
        assert!(matches!(err, CaError::CorruptJournal { .. }), "{err}");

        // Not JSON.
        *fx.journal.journal.lock().unwrap() = Some(b"not json".to_vec());
        let err = fx.ca(secs(60), t(1)).await.unwrap_err();
        assert!(matches!(err, CaError::CorruptJournal { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_failed_journal_save_changes_nothing_and_leaves_no_key_behind() {
        let fx = Fixture::new();
        let ca = fx.ca(secs(60), t(0)).await.unwrap();
        let before = ca.authorities();
        let files = fx.key_files();
        fx.journal.fail_saves.store(true, Ordering::SeqCst);
        let err = ca.rotate(t(30)).await.unwrap_err();
        assert!(matches!(err, CaError::JournalStore(_)), "{err}");
        assert_eq!(err.to_string(), "ca journal store: disk full");
        assert_eq!(ca.authorities(), before);
        assert_eq!(ca.bundle_sequence(), 1);
        assert_eq!(fx.key_files(), files, "the keys made for it are deleted");
        // Once the store works again, the rotation happens.
        fx.journal.fail_saves.store(false, Ordering::SeqCst);
        assert!(ca.rotate(t(31)).await.unwrap());
        assert_eq!(ca.bundle_sequence(), 2);
    }

    #[tokio::test]
    async fn ca_ttl_must_leave_room_for_one_second_svids() {
        let fx = Fixture::new();
        let err = fx.ca(secs(5), t(0)).await.unwrap_err();
        assert!(matches!(err, CaError::CaTtlTooShort { .. }), "{err}");
    }

    // --- signing ---

    #[tokio::test]
    async fn every_credential_kind_passes_openssl_and_verify_chain() {
        let fx = Fixture::new();
        let ca = fx.ca(secs(3600), t(0)).await.unwrap();
        let bundle = ca.x509_bundle();
        let root = bundle.authorities()[0].as_ref().to_vec();
        let now = t(100);

        let agent = ca
            .sign_agent_x509_svid(&id(AGENT), &csr(), secs(600), now)
            .unwrap();
        let workload_svid = ca
            .sign_workload_x509_svid(&workload(300), &csr(), now)
            .unwrap();
        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let server = ca
            .sign_server_x509_svid(&server_key.subject_public_key_info(), secs(600), now)
            .unwrap();
        assert_eq!(server.spiffe_id(), &id("spiffe://example.org/sigil/server"));
        assert_eq!(ca.server_id(), id("spiffe://example.org/sigil/server"));

        for (svid, want, dns) in [
            (&agent, AGENT, &[][..]),
            (
                &workload_svid,
                WORKLOAD,
                &["web.example.org", "*.web.example.org"][..],
            ),
            (&server, "spiffe://example.org/sigil/server", &[][..]),
        ] {
            let leaf = svid.certificate();
            for extra in [
                &[][..],
                &["-purpose", "sslclient"],
                &["-purpose", "sslserver"],
            ] {
                openssl_verify(&bundle, leaf, now, extra)
                    .unwrap_or_else(|e| panic!("{want} {extra:?}: {e}"));
            }
            let verified = verify_chain(std::slice::from_ref(leaf), &bundle, now).unwrap();
            assert_eq!(verified.spiffe_id(), &id(want));
            assert_eq!(check_leaf_certificate(leaf).unwrap(), id(want));
            assert_leaf_profile(leaf, want, dns, &root);
            // NotBefore backdated 10 s; the returned times are the certificate's.
            let cert = parse(leaf);
            assert_eq!(cert.validity().not_before.timestamp(), unix(now) - 10);
            assert_eq!(
                cert.validity().not_before.timestamp(),
                unix(svid.not_before())
            );
            assert_eq!(
                cert.validity().not_after.timestamp(),
                unix(svid.not_after())
            );
            assert_eq!(cert.raw_serial(), svid.serial());
            assert_eq!(svid.serial_hex(), hex(svid.serial()));
            // Not yet valid before the backdate, expired after NotAfter.
            assert!(openssl_verify(&bundle, leaf, now - secs(11), &[]).is_err());
            assert!(openssl_verify(&bundle, leaf, svid.not_after() + secs(1), &[]).is_err());
        }
        assert_eq!(agent.not_after(), now + secs(600));
        assert_eq!(workload_svid.not_after(), now + secs(300));

        // A full workload SVID (certificate + its key) parses with sigil-core.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let issued = ca
            .sign_workload_x509_svid(&workload(60), csr.der(), now)
            .unwrap();
        let svid = X509Svid::parse(issued.certificate(), &key.serialize_der()).unwrap();
        assert_eq!(svid.spiffe_id(), &id(WORKLOAD));
        // The CA's own root is not a leaf: the post-signing check would catch it.
        assert!(check_leaf_certificate(&CertificateDer::from(root)).is_err());
    }

    #[tokio::test]
    async fn the_identity_and_extensions_of_a_csr_are_ignored() {
        let fx = Fixture::new();
        let ca = fx.ca(secs(3600), t(0)).await.unwrap();
        let mut evil = CertificateParams::default();
        evil.distinguished_name.push(DnType::CommonName, "evil");
        evil.subject_alt_names = vec![
            SanType::URI("spiffe://evil/x".try_into().unwrap()),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ];
        evil.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        evil.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        evil.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        // An extension rcgen's own CSR parser would refuse: ignored here too.
        evil.custom_extensions = vec![CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 99999, 1],
            vec![0x05, 0x00],
        )];
        let csr = csr_with(&PKCS_ECDSA_P256_SHA256, &evil);
        let now = t(10);

        let issued = ca
            .sign_workload_x509_svid(&workload(60), &csr, now)
            .unwrap();
        let bundle = ca.x509_bundle();
        let root = bundle.authorities()[0].as_ref().to_vec();
        assert_eq!(issued.spiffe_id(), &id(WORKLOAD));
        assert_leaf_profile(
            issued.certificate(),
            WORKLOAD,
            &["web.example.org", "*.web.example.org"],
            &root,
        );
        let cert = parse(issued.certificate());
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(!eku.value.code_signing);
        assert!(
            cert.extensions()
                .iter()
                .all(|e| e.oid.to_id_string() != "1.3.6.1.4.1.99999.1")
        );
        openssl_verify(&bundle, issued.certificate(), now, &[]).unwrap();

        let agent = ca
            .sign_agent_x509_svid(&id(AGENT), &csr, secs(60), now)
            .unwrap();
        assert_leaf_profile(agent.certificate(), AGENT, &[], &root);
    }

    #[tokio::test]
    async fn only_p256_keys_are_accepted() {
        let fx = Fixture::new();
        let ca = fx.ca(secs(3600), t(0)).await.unwrap();
        let mut csrs = vec![
            (
                "ecdsa p-384",
                csr_with(&PKCS_ECDSA_P384_SHA384, &CertificateParams::default()),
            ),
            (
                "ed25519",
                csr_with(&PKCS_ED25519, &CertificateParams::default()),
            ),
        ];
        // ring cannot generate RSA keys; openssl can.
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("openssl")
            .args([
                "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rsa",
            ])
            .args(["-outform", "DER", "-keyout"])
            .arg(dir.path().join("rsa.key"))
            .arg("-out")
            .arg(dir.path().join("rsa.csr"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        csrs.push(("rsa", std::fs::read(dir.path().join("rsa.csr")).unwrap()));

        for (name, csr) in csrs {
            for result in [
                ca.sign_workload_x509_svid(&workload(60), &csr, t(1)),
                ca.sign_agent_x509_svid(&id(AGENT), &csr, secs(60), t(1)),
            ] {
                let err = result.unwrap_err();
                assert!(
                    matches!(&err, CaError::UnsupportedKey { algorithm } if algorithm == name),
                    "{name}: {err}"
                );
            }
        }
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let err = ca
            .sign_server_x509_svid(&p384.subject_public_key_info(), secs(60), t(1))
            .unwrap_err();
        assert!(matches!(err, CaError::UnsupportedKey { .. }), "{err}");
        let err = ca
            .sign_server_x509_svid(b"junk", secs(60), t(1))
            .unwrap_err();
        assert!(matches!(err, CaError::MalformedPublicKey { .. }), "{err}");
    }

    #[tokio::test]
    async fn garbage_and_truncated_csrs_are_errors_not_panics() {
        let fx = Fixture::new();
        let ca = fx.ca(secs(3600), t(0)).await.unwrap();
        let good = csr();
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            b"-----BEGIN CERTIFICATE REQUEST-----".to_vec(),
            vec![0xff; 100],
            vec![0x30, 0x82, 0xff, 0xff],
        ];
        cases.extend((0..good.len()).map(|n| good[..n].to_vec()));
        for csr in &cases {
            let err = ca
                .sign_workload_x509_svid(&workload(60), csr, t(1))
                .unwrap_err();
            assert!(matches!(err, CaError::MalformedCsr { .. }), "{err}");
        }
        // Every single-byte corruption is refused, never a panic, and never yields a
        // certificate for a key nobody proved to hold. (The parser tolerates a damaged tag in
        // the outer signature algorithm identifier, which is not signed: the proof of
        // possession still holds there, and the certificate is for the original key.)
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let good = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec();
        // Outer SEQUENCE and request info, both with one-byte long-form lengths (0x81 LL).
        assert_eq!((good[1], good[4]), (0x81, 0x81));
        let info_len = 6 + usize::from(good[5]);
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x55;
            if let Ok(issued) = ca.sign_workload_x509_svid(&workload(60), &bad, t(1)) {
                let cert = parse(issued.certificate());
                assert_eq!(
                    cert.public_key().subject_public_key.data.as_ref(),
                    key.public_key_raw(),
                    "byte {i}"
                );
                assert!(i >= info_len, "byte {i} is in the signed request info");
            }
        }
        let err = ca
            .sign_workload_x509_svid(&workload(60), &vec![0x30; MAX_CSR_LEN + 1], t(1))
            .unwrap_err();
        assert!(matches!(err, CaError::CsrTooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn serials_differ_for_the_same_key() {
        let fx = Fixture::new();
        let ca = fx.ca(secs(3600), t(0)).await.unwrap();
        let csr = csr();
        let serials: std::collections::HashSet<Vec<u8>> = (0..20)
            .map(|_| {
                ca.sign_workload_x509_svid(&workload(60), &csr, t(1))
                    .unwrap()
                    .serial()
                    .to_vec()
            })
            .collect();
        assert_eq!(serials.len(), 20);
    }

    #[tokio::test]
    async fn lifetimes_are_capped_by_the_authority_and_extra_caps() {
        let fx = Fixture::new();
        let ca = fx.ca(secs(60), t(0)).await.unwrap();
        // At 45 s (before hand-over), a 60 s TTL is capped at the authority's NotAfter (60 s).
        let issued = ca
            .sign_workload_x509_svid(&workload(60), &csr(), t(45))
            .unwrap();
        assert_eq!(issued.not_after(), t(60));
        assert_eq!(
            parse(issued.certificate()).validity().not_after.timestamp(),
            unix(t(60))
        );
        openssl_verify(&ca.x509_bundle(), issued.certificate(), t(59), &[]).unwrap();
        let agent = ca
            .sign_agent_x509_svid(&id(AGENT), &csr(), secs(3600), t(45))
            .unwrap();
        assert_eq!(agent.not_after(), t(60));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let server = ca
            .sign_server_x509_svid(&key.subject_public_key_info(), secs(3600), t(45))
            .unwrap();
        assert_eq!(server.not_after(), t(60));
        let jwt = ca
            .sign_jwt_svid(&id(WORKLOAD), &["a".into()], secs(3600), t(45), None)
            .unwrap();
        assert_eq!(jwt.expiry(), t(60));

        // A session ending at 50 s caps it earlier; a fractional cap rounds down.
        let mut params = workload(60);
        params.caps = vec![t(50) + Duration::from_millis(700)];
        let issued = ca.sign_workload_x509_svid(&params, &csr(), t(45)).unwrap();
        assert_eq!(issued.not_after(), t(50));
        // A cap that has passed: nothing is issued.
        params.caps = vec![t(44)];
        let err = ca
            .sign_workload_x509_svid(&params, &csr(), t(45))
            .unwrap_err();
        assert!(
            matches!(err, CaError::Lifetime(LifetimeError::CapPassed)),
            "{err}"
        );
        // After the authority expired (no rotation ran), nothing is issued either.
        let err = ca
            .sign_workload_x509_svid(&workload(10), &csr(), t(61))
            .unwrap_err();
        assert!(
            matches!(err, CaError::Lifetime(LifetimeError::CapPassed)),
            "{err}"
        );
        // TTLs under a second are refused.
        for ttl in [Duration::ZERO, Duration::from_millis(999)] {
            let mut params = workload(1);
            params.ttl = ttl;
            let err = ca
                .sign_workload_x509_svid(&params, &csr(), t(1))
                .unwrap_err();
            assert!(matches!(err, CaError::TtlTooShort { .. }), "{err}");
        }
        // Sub-second `now` is rounded down: whole-second certificate times.
        let issued = ca
            .sign_workload_x509_svid(&workload(10), &csr(), t(1) + Duration::from_millis(900))
            .unwrap();
        assert_eq!(issued.not_before(), t(1) - secs(10));
        assert_eq!(issued.not_after(), t(11));
    }

    #[tokio::test]
    async fn ids_are_checked_before_anything_is_signed() {
        let fx = Fixture::new();
        let ca = fx.ca(secs(3600), t(0)).await.unwrap();
        let sign_workload = |spiffe_id: &str| {
            let mut params = workload(60);
            params.spiffe_id = id(spiffe_id);
            params.dns_names.clear();
            ca.sign_workload_x509_svid(&params, &csr(), t(1))
        };
        assert!(matches!(
            sign_workload("spiffe://other.org/web").unwrap_err(),
            CaError::ForeignTrustDomain { .. }
        ));
        assert!(matches!(
            sign_workload("spiffe://example.org").unwrap_err(),
            CaError::RootId { .. }
        ));
        for reserved in [
            "spiffe://example.org/sigil",
            "spiffe://example.org/sigil/server",
            "spiffe://example.org/sigil/agent/join_token/x",
        ] {
            let err = sign_workload(reserved).unwrap_err();
            assert!(
                matches!(err, CaError::ReservedId { .. }),
                "{reserved}: {err}"
            );
            let err = ca
                .sign_jwt_svid(&id(reserved), &["a".into()], secs(60), t(1), None)
                .unwrap_err();
            assert!(
                matches!(err, CaError::ReservedId { .. }),
                "{reserved}: {err}"
            );
        }
        // Not reserved: a path that merely starts with the same letters.
        sign_workload("spiffe://example.org/sigilfoo").unwrap();

        for not_agent in [
            "spiffe://example.org/ns/web",
            "spiffe://example.org/sigil/agent",
            "spiffe://example.org/sigil/agent/",
            "spiffe://example.org/sigil/server",
        ] {
            let Ok(agent_id) = SpiffeId::new(not_agent) else {
                continue;
            };
            let err = ca
                .sign_agent_x509_svid(&agent_id, &csr(), secs(60), t(1))
                .unwrap_err();
            assert!(
                matches!(err, CaError::NotAgentId { .. }),
                "{not_agent}: {err}"
            );
        }
        let err = ca
            .sign_agent_x509_svid(
                &id("spiffe://other.org/sigil/agent/x"),
                &csr(),
                secs(60),
                t(1),
            )
            .unwrap_err();
        assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");

        let mut params = workload(60);
        params.dns_names = vec!["bad name".into()];
        let err = ca
            .sign_workload_x509_svid(&params, &csr(), t(1))
            .unwrap_err();
        assert!(matches!(err, CaError::InvalidDnsName { .. }), "{err}");
    }

    #[tokio::test]
    async fn jwt_svids_validate_against_the_bundles_jwt_keys() {
        let fx = Fixture::new();
        let ca = fx.ca(secs(3600), t(0)).await.unwrap();
        let audience = vec!["db".to_owned(), "cache".to_owned()];
        let svid = ca
            .sign_jwt_svid(
                &id(WORKLOAD),
                &audience,
                secs(300),
                t(100),
                Some("https://issuer"),
            )
            .unwrap();
        assert_eq!(svid.spiffe_id(), &id(WORKLOAD));
        assert_eq!(svid.audience(), &audience[..]);
        assert_eq!(svid.expiry(), t(400));
        assert_eq!(svid.claims()["iat"], unix(t(100)));
        assert_eq!(svid.claims()["iss"], "https://issuer");
        assert_eq!(jwt_kid(&svid), active_id(&ca, AuthorityKind::Jwt));

        // Through the published SPIFFE bundle JSON, as a relying party gets it.
        let published = SpiffeBundle::parse(td(), &ca.bundle().to_json()).unwrap();
        for aud in ["db", "cache"] {
            let validated =
                JwtSvid::parse_and_validate(svid.token(), &published.jwt_bundle(), aud, t(200))
                    .unwrap();
            assert_eq!(validated.spiffe_id(), &id(WORKLOAD));
        }
        assert!(matches!(
            JwtSvid::parse_and_validate(svid.token(), &published.jwt_bundle(), "other", t(200))
                .unwrap_err(),
            JwtSvidError::AudienceMismatch { .. }
        ));
        // Another trust domain's CA signs tokens this bundle does not accept.
        let other_fx = Fixture::new();
        let other = other_fx.ca(secs(3600), t(0)).await.unwrap();
        let foreign = other
            .sign_jwt_svid(&id(WORKLOAD), &audience, secs(300), t(100), None)
            .unwrap();
        assert!(foreign.claims().get("iss").is_none());
        assert!(
            JwtSvid::parse_and_validate(foreign.token(), &published.jwt_bundle(), "db", t(200))
                .is_err()
        );

        for bad in [vec![], vec![String::new()], vec!["a".into(), String::new()]] {
            let err = ca
                .sign_jwt_svid(&id(WORKLOAD), &bad, secs(60), t(1), None)
                .unwrap_err();
            assert!(matches!(err, CaError::EmptyAudience), "{err}");
        }
    }

    #[test]
    fn changes_of_both_kinds_merge() {
        assert_eq!(merge_changes(None, None), None);
        assert_eq!(merge_changes(Some(false), None), Some(false));
        assert_eq!(merge_changes(None, Some(true)), Some(true));
        assert_eq!(merge_changes(Some(false), Some(true)), Some(true));
        assert_eq!(merge_changes(Some(true), Some(false)), Some(true));
        assert_eq!(merge_changes(Some(false), Some(false)), Some(false));
    }

    #[tokio::test]
    async fn the_ca_can_be_shared_across_tasks() {
        fn assert_send_sync<T: Send + Sync>(_: &T) {}
        fn assert_send<T: Send>(_: T) {}
        let fx = Fixture::new();
        let ca = Arc::new(fx.ca(secs(60), t(0)).await.unwrap());
        assert_send_sync(&*ca);
        assert_send(ca.rotate(t(1)));
        let task = {
            let ca = ca.clone();
            tokio::spawn(async move { ca.rotate(t(30)).await })
        };
        let signed = ca
            .sign_workload_x509_svid(&workload(5), &csr(), t(29))
            .unwrap();
        assert!(task.await.unwrap().unwrap());
        verify_chain(
            std::slice::from_ref(signed.certificate()),
            &ca.x509_bundle(),
            t(30),
        )
        .unwrap();
    }
}
