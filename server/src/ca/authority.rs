//! The authorities (X.509 roots and JWT signing keys), their states, the journal that persists
//! them, and the rotation decisions.
//!
//! Rotation is a pure function of `now` and the authorities' lifetimes ([`next_step`]), taken
//! from `sigil_core::lifetime`: with the active authority issued at T and expiring at T + L,
//! its successor is prepared (and published) at T + L/2, activated at T + 5L/6, and the old one
//! is pruned at T + L. X.509 authorities and JWT keys follow the same steps, independently.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::Issuer;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sigil_core::jwt::EcCurve;
use sigil_core::lifetime::{AuthorityPhase, authority_phase};
use sigil_core::{JwtBundle, JwtPublicKey, SpiffeBundle, TrustDomain, X509Bundle};

use super::CaError;
use super::keys::{CaKey, RcgenSigner};

/// The journal format version written by this code.
pub(crate) const JOURNAL_VERSION: u32 = 1;

/// The state of an authority in the rotation cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub(crate) enum AuthorityState {
    /// Created and published in the bundle, so that relying parties learn it before it signs;
    /// not signing yet.
    Prepared,
    /// Signing everything issued now.
    Active,
    /// Replaced by its successor; kept in the bundle until it expires, to validate what it
    /// signed.
    Old,
}

/// What kind of authority an [`AuthorityInfo`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub(crate) enum AuthorityKind {
    /// An X.509 root that signs X509-SVIDs.
    X509,
    /// A key that signs JWT-SVIDs.
    Jwt,
}

impl AuthorityState {
    /// The state's name: `prepared`, `active` or `old`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
        }
    }
}

impl AuthorityKind {
    /// The kind's name: `x509` or `jwt`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }
}

/// A summary of one authority, for operators (`localauthority show` in SPIRE's terms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuthorityInfo {
    /// X.509 or JWT.
    pub kind: AuthorityKind,
    /// The authority's id: the root's serial number in hex for X.509, the `kid` for JWT.
    pub id: String,
    /// Its state.
    pub state: AuthorityState,
    /// When it was created (rotation times count from here; an X.509 root's NotBefore is
    /// backdated from it).
    pub issued_at: SystemTime,
    /// When it expires.
    pub not_after: SystemTime,
}

// --- in memory ----------------------------------------------------------------------------------

/// An authority of either kind in its rotation slot.
#[derive(Debug)]
pub(crate) struct Slot<T> {
    pub(crate) state: AuthorityState,
    pub(crate) authority: Arc<T>,
}

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Self {
            state: self.state,
            authority: self.authority.clone(),
        }
    }
}

/// The lifetime of an authority, which is all the rotation decisions look at.
pub(crate) trait Timed {
    fn issued_at(&self) -> SystemTime;
    fn not_after(&self) -> SystemTime;
    fn key_id(&self) -> &str;
}

/// An X.509 root with its key, ready to sign.
pub(crate) struct X509Authority {
    /// The serial number in hex: the authority's id.
    pub(crate) id: String,
    pub(crate) certificate: CertificateDer<'static>,
    /// What follows a leaf it signs in an SVID chain: nothing for a self-signed root; for an
    /// intermediate under an upstream CA, itself and the upstream's intermediates (never the
    /// root).
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// The certificate relying parties trust it through (the bundle's): itself, or the
    /// upstream root.
    pub(crate) anchor: CertificateDer<'static>,
    /// The upstream CA's certificates (the CA first, the root last); empty for a root.
    pub(crate) upstream: Vec<CertificateDer<'static>>,
    pub(crate) issuer: Issuer<'static, RcgenSigner>,
    pub(crate) key: Arc<dyn CaKey>,
    pub(crate) issued_at: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// A JWT signing key with its `kid`.
pub(crate) struct JwtAuthority {
    pub(crate) kid: String,
    pub(crate) key: Arc<dyn CaKey>,
    pub(crate) public_key: JwtPublicKey,
    pub(crate) issued_at: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// One change the rotation makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Remove the expired authority at this index (bundle change).
    Prune(usize),
    /// Make the prepared authority at this index active; the active one, if any, becomes old.
    Activate(usize),
    /// Create a successor in state prepared (bundle change).
    Prepare,
    /// There is nothing to sign with: create an authority in state active (bundle change).
    CreateActive,
}

/// Everything the CA knows at one point in time. Immutable: rotation builds a new one.
#[derive(Debug)]
pub(crate) struct Authorities {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) sequence: u64,
    pub(crate) x509: Vec<Slot<X509Authority>>,
    pub(crate) jwt: Vec<Slot<JwtAuthority>>,
    pub(crate) x509_bundle: X509Bundle,
    pub(crate) jwt_bundle: JwtBundle,
    pub(crate) bundle: SpiffeBundle,
}

// --- persisted ----------------------------------------------------------------------------------

/// The CA journal, as stored (JSON). It names keys by id and never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Journal {
    pub(crate) version: u32,
    pub(crate) trust_domain: String,
    pub(crate) bundle_sequence: u64,
    pub(crate) x509_authorities: Vec<X509Entry>,
    pub(crate) jwt_keys: Vec<JwtEntry>,
}

/// An X.509 authority in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct X509Entry {
    /// The root's serial number, hex.
    pub(crate) id: String,
    pub(crate) key_id: String,
    pub(crate) state: AuthorityState,
    /// Unix seconds.
    pub(crate) issued_at: u64,
    /// Unix seconds; equal to the certificate's NotAfter.
    pub(crate) not_after: u64,
    /// The certificate, DER in standard base64.
    pub(crate) certificate: String,
    /// For an intermediate: the upstream CA's certificates that signed it (the CA first, the
    /// root last), DER in standard base64. Absent for a self-signed root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) upstream: Vec<String>,
}

/// A JWT signing key in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtEntry {
    pub(crate) kid: String,
    pub(crate) key_id: String,
    pub(crate) state: AuthorityState,
    /// Unix seconds.
    pub(crate) issued_at: u64,
    /// Unix seconds.
    pub(crate) not_after: u64,
    /// The public key as an uncompressed SEC 1 point, base64url without padding; checked
    /// against the loaded key.
    pub(crate) public_key: String,
}

// === impl Timed ===

impl Timed for X509Authority {
    fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn key_id(&self) -> &str {
        self.key.id()
    }
}

impl Timed for JwtAuthority {
    fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn key_id(&self) -> &str {
        self.key.id()
    }
}

// === impl X509Authority ===

impl X509Authority {
    /// Rebuilds an authority from its certificate and key, checking that they belong together
    /// and agree with the journal's times.
    pub(crate) fn new(
        id: String,
        certificate: CertificateDer<'static>,
        upstream: Vec<CertificateDer<'static>>,
        key: Arc<dyn CaKey>,
        issued_at: SystemTime,
        not_after: SystemTime,
    ) -> Result<Self, CaError> {
        let corrupt = |reason: String| CaError::CorruptJournal { reason };
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
            .map_err(|e| corrupt(format!("x509 authority {id}: {e}")))?;
        let (chain, anchor) = match upstream.split_last() {
            None => (Vec::new(), certificate.clone()),
            Some((root, between)) => {
                let signer = upstream.first().unwrap_or(root);
                let (_, signer) = x509_parser::parse_x509_certificate(signer.as_ref())
                    .map_err(|e| corrupt(format!("x509 authority {id}: upstream: {e}")))?;
                if parsed.issuer().as_raw() != signer.subject().as_raw() {
                    return Err(corrupt(format!(
                        "x509 authority {id}: not issued by the upstream CA recorded with it"
                    )));
                }
                let mut chain = vec![certificate.clone()];
                chain.extend(between.iter().cloned());
                (chain, root.clone())
            }
        };
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key() {
            return Err(corrupt(format!(
                "x509 authority {id}: key {} does not match the certificate",
                key.id()
            )));
        }
        if super::hex(parsed.raw_serial()) != id {
            return Err(corrupt(format!(
                "x509 authority {id}: the certificate's serial number differs"
            )));
        }
        if Some(not_after)
            != sigil_core::time::from_unix_seconds(parsed.validity().not_after.timestamp())
        {
            return Err(corrupt(format!(
                "x509 authority {id}: the certificate's not after differs from the journal's"
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&certificate, RcgenSigner::new(key.clone()))
            .map_err(|e| corrupt(format!("x509 authority {id}: {e}")))?;
        Ok(Self {
            id,
            certificate,
            chain,
            anchor,
            upstream,
            issuer,
            key,
            issued_at,
            not_after,
        })
    }
}

impl fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Authority")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("issued_at", &self.issued_at)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

// === impl JwtAuthority ===

impl JwtAuthority {
    /// A JWT authority for `key`; its `kid` is the RFC 7638 thumbprint of the public key.
    pub(crate) fn new(
        key: Arc<dyn CaKey>,
        issued_at: SystemTime,
        not_after: SystemTime,
    ) -> Result<Self, CaError> {
        let public_key =
            JwtPublicKey::ec_uncompressed(EcCurve::P256, key.public_key()).map_err(|e| {
                CaError::CorruptJournal {
                    reason: format!("jwt key {}: {e}", key.id()),
                }
            })?;
        Ok(Self {
            kid: public_key.thumbprint(),
            key,
            public_key,
            issued_at,
            not_after,
        })
    }
}

impl fmt::Debug for JwtAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthority")
            .field("kid", &self.kid)
            .field("key", &self.key)
            .field("issued_at", &self.issued_at)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

// === impl Authorities ===

impl Authorities {
    /// Builds the snapshot, with its bundles.
    pub(crate) fn new(
        trust_domain: TrustDomain,
        sequence: u64,
        x509: Vec<Slot<X509Authority>>,
        jwt: Vec<Slot<JwtAuthority>>,
    ) -> Result<Self, CaError> {
        let bundle_error = |reason: String| CaError::Bundle { reason };
        // Each authority's anchor once: under an upstream CA, every intermediate has the
        // same root.
        let mut anchors: Vec<CertificateDer<'static>> = Vec::new();
        for slot in &x509 {
            if !anchors.contains(&slot.authority.anchor) {
                anchors.push(slot.authority.anchor.clone());
            }
        }
        let x509_bundle = X509Bundle::new(trust_domain.clone(), anchors)
            .map_err(|e| bundle_error(e.to_string()))?;
        let keys: BTreeMap<String, JwtPublicKey> = jwt
            .iter()
            .map(|slot| {
                (
                    slot.authority.kid.clone(),
                    slot.authority.public_key.clone(),
                )
            })
            .collect();
        let jwt_bundle = JwtBundle::from_keys(trust_domain.clone(), keys)
            .map_err(|e| bundle_error(e.to_string()))?;
        let mut bundle = SpiffeBundle::from_bundles(&x509_bundle, &jwt_bundle)
            .map_err(|e| bundle_error(e.to_string()))?;
        bundle.set_sequence(Some(sequence));
        Ok(Self {
            trust_domain,
            sequence,
            x509,
            jwt,
            x509_bundle,
            jwt_bundle,
            bundle,
        })
    }

    /// The active X.509 authority.
    pub(crate) fn active_x509(&self) -> Result<&X509Authority, CaError> {
        active(&self.x509).ok_or(CaError::NoActiveAuthority)
    }

    /// The active JWT key.
    pub(crate) fn active_jwt(&self) -> Result<&JwtAuthority, CaError> {
        active(&self.jwt).ok_or(CaError::NoActiveAuthority)
    }

    /// A summary of every authority, X.509 first, each kind oldest first.
    pub(crate) fn infos(&self) -> Vec<AuthorityInfo> {
        let x509 = self.x509.iter().map(|slot| AuthorityInfo {
            kind: AuthorityKind::X509,
            id: slot.authority.id.clone(),
            state: slot.state,
            issued_at: slot.authority.issued_at,
            not_after: slot.authority.not_after,
        });
        let jwt = self.jwt.iter().map(|slot| AuthorityInfo {
            kind: AuthorityKind::Jwt,
            id: slot.authority.kid.clone(),
            state: slot.state,
            issued_at: slot.authority.issued_at,
            not_after: slot.authority.not_after,
        });
        x509.chain(jwt).collect()
    }

    /// The journal that records this snapshot.
    pub(crate) fn journal(&self) -> Journal {
        Journal {
            version: JOURNAL_VERSION,
            trust_domain: self.trust_domain.name().to_owned(),
            bundle_sequence: self.sequence,
            x509_authorities: self
                .x509
                .iter()
                .map(|slot| X509Entry {
                    id: slot.authority.id.clone(),
                    key_id: slot.authority.key.id().to_owned(),
                    state: slot.state,
                    issued_at: unix_seconds(slot.authority.issued_at),
                    not_after: unix_seconds(slot.authority.not_after),
                    certificate: STANDARD.encode(slot.authority.certificate.as_ref()),
                    upstream: slot
                        .authority
                        .upstream
                        .iter()
                        .map(|c| STANDARD.encode(c.as_ref()))
                        .collect(),
                })
                .collect(),
            jwt_keys: self
                .jwt
                .iter()
                .map(|slot| JwtEntry {
                    kid: slot.authority.kid.clone(),
                    key_id: slot.authority.key.id().to_owned(),
                    state: slot.state,
                    issued_at: unix_seconds(slot.authority.issued_at),
                    not_after: unix_seconds(slot.authority.not_after),
                    public_key: URL_SAFE_NO_PAD.encode(slot.authority.key.public_key()),
                })
                .collect(),
        }
    }
}

// === impl Journal ===

impl Journal {
    /// The journal of a CA that has no authority yet.
    #[cfg(test)]
    pub(crate) fn empty(trust_domain: &TrustDomain) -> Self {
        Self {
            version: JOURNAL_VERSION,
            trust_domain: trust_domain.name().to_owned(),
            bundle_sequence: 0,
            x509_authorities: Vec::new(),
            jwt_keys: Vec::new(),
        }
    }

    /// Parses a stored journal and checks what can be checked without the keys: the version,
    /// the trust domain, and at most one active and one prepared authority of each kind.
    pub(crate) fn parse(bytes: &[u8], trust_domain: &TrustDomain) -> Result<Self, CaError> {
        let journal: Self = serde_json::from_slice(bytes).map_err(|e| CaError::CorruptJournal {
            reason: e.to_string(),
        })?;
        if journal.version != JOURNAL_VERSION {
            return Err(CaError::CorruptJournal {
                reason: format!(
                    "unsupported version {} (this server writes {JOURNAL_VERSION})",
                    journal.version
                ),
            });
        }
        if journal.trust_domain != trust_domain.name() {
            return Err(CaError::TrustDomainMismatch {
                journal: journal.trust_domain,
                configured: trust_domain.clone(),
            });
        }
        let x509_states: Vec<_> = journal.x509_authorities.iter().map(|e| e.state).collect();
        let jwt_states: Vec<_> = journal.jwt_keys.iter().map(|e| e.state).collect();
        for (kind, states) in [("x509 authorities", x509_states), ("jwt keys", jwt_states)] {
            for state in [AuthorityState::Active, AuthorityState::Prepared] {
                if states.iter().filter(|s| **s == state).count() > 1 {
                    return Err(CaError::CorruptJournal {
                        reason: format!("more than one {state:?} entry among the {kind}"),
                    });
                }
            }
        }
        Ok(journal)
    }

    /// The JSON bytes to store.
    pub(crate) fn to_bytes(&self) -> Result<Vec<u8>, CaError> {
        serde_json::to_vec_pretty(self).map_err(|e| CaError::CorruptJournal {
            reason: e.to_string(),
        })
    }
}

/// Decodes a journal certificate.
pub(crate) fn decode_certificate(entry: &X509Entry) -> Result<CertificateDer<'static>, CaError> {
    STANDARD
        .decode(&entry.certificate)
        .map(CertificateDer::from)
        .map_err(|e| CaError::CorruptJournal {
            reason: format!("x509 authority {}: certificate: {e}", entry.id),
        })
}

/// Decodes the upstream certificates of a journal entry.
pub(crate) fn decode_upstream(entry: &X509Entry) -> Result<Vec<CertificateDer<'static>>, CaError> {
    entry
        .upstream
        .iter()
        .map(|b64| {
            STANDARD
                .decode(b64)
                .map(CertificateDer::from)
                .map_err(|e| CaError::CorruptJournal {
                    reason: format!("x509 authority {}: upstream certificate: {e}", entry.id),
                })
        })
        .collect()
}

/// Checks a journal JWT entry against the loaded authority.
pub(crate) fn check_jwt_entry(entry: &JwtEntry, authority: &JwtAuthority) -> Result<(), CaError> {
    if entry.public_key != URL_SAFE_NO_PAD.encode(authority.key.public_key())
        || entry.kid != authority.kid
    {
        return Err(CaError::CorruptJournal {
            reason: format!(
                "jwt key {}: key {} does not match the journal",
                entry.kid, entry.key_id
            ),
        });
    }
    Ok(())
}

// --- rotation -----------------------------------------------------------------------------------

/// The next change rotation makes to `slots` at `now`, if any:
///
/// 1. an expired authority (NotAfter at or before `now`) is pruned, whatever its state;
/// 2. with no active authority, the prepared one is activated, or else a new active one is
///    created;
/// 3. from half the active authority's life, a successor is prepared if there is none;
/// 4. from five sixths, the prepared successor is activated (the active one becomes old).
///
/// Apply the step and ask again until `None`: each step brings the slots closer to the
/// steady state, so a few rounds suffice even after a long downtime.
pub(crate) fn next_step<T: Timed>(slots: &[Slot<T>], now: SystemTime) -> Option<Step> {
    if let Some(index) = slots
        .iter()
        .position(|slot| slot.authority.not_after() <= now)
    {
        return Some(Step::Prune(index));
    }
    let prepared = slots
        .iter()
        .position(|slot| slot.state == AuthorityState::Prepared);
    let Some(active) = active(slots) else {
        return Some(match prepared {
            Some(index) => Step::Activate(index),
            None => Step::CreateActive,
        });
    };
    match (
        authority_phase(now, active.issued_at(), active.not_after()),
        prepared,
    ) {
        (AuthorityPhase::PrepareNext | AuthorityPhase::HandOver, None) => Some(Step::Prepare),
        (AuthorityPhase::HandOver, Some(index)) => Some(Step::Activate(index)),
        _ => None,
    }
}

/// Applies a step that needs no new authority (`Prune`, `Activate`), returning the key id of a
/// pruned authority; `Prepare` and `CreateActive` push `created` in the matching state.
pub(crate) fn apply_step<T: Timed>(
    slots: &mut Vec<Slot<T>>,
    step: Step,
    created: Option<Arc<T>>,
) -> Option<String> {
    match step {
        Step::Prune(index) => {
            let slot = slots.remove(index);
            Some(slot.authority.key_id().to_owned())
        }
        Step::Activate(index) => {
            for slot in slots.iter_mut() {
                if slot.state == AuthorityState::Active {
                    slot.state = AuthorityState::Old;
                }
            }
            if let Some(slot) = slots.get_mut(index) {
                slot.state = AuthorityState::Active;
            }
            None
        }
        Step::Prepare | Step::CreateActive => {
            if let Some(authority) = created {
                let state = if step == Step::Prepare {
                    AuthorityState::Prepared
                } else {
                    AuthorityState::Active
                };
                slots.push(Slot { state, authority });
            }
            None
        }
    }
}

/// Whether a step changes what the bundle publishes.
pub(crate) fn changes_bundle(step: Step) -> bool {
    !matches!(step, Step::Activate(_))
}

fn active<T>(slots: &[Slot<T>]) -> Option<&T> {
    slots
        .iter()
        .find(|slot| slot.state == AuthorityState::Active)
        .map(|slot| slot.authority.as_ref())
}

/// Whole seconds since the epoch (0 before it), unsigned as the journal and JWT claims hold
/// them; the conversion is [`sigil_core::time::unix_seconds`].
pub(crate) fn unix_seconds(t: SystemTime) -> u64 {
    sigil_core::time::unix_seconds(t).unsigned_abs()
}

/// The time `secs` seconds after the epoch.
pub(crate) fn from_unix_seconds(secs: u64) -> Option<SystemTime> {
    sigil_core::time::from_unix_seconds(i64::try_from(secs).ok()?)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// A bare authority for the planner.
    #[derive(Debug)]
    struct Fake {
        issued_at: SystemTime,
        not_after: SystemTime,
        id: String,
    }

    impl Timed for Fake {
        fn issued_at(&self) -> SystemTime {
            self.issued_at
        }
        fn not_after(&self) -> SystemTime {
            self.not_after
        }
        fn key_id(&self) -> &str {
            &self.id
        }
    }

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn fake(issued: u64, id: &str) -> Arc<Fake> {
        Arc::new(Fake {
            issued_at: t(issued),
            not_after: t(issued + 60),
            id: id.to_owned(),
        })
    }

    /// Runs the planner to a fixed point at `now`, creating authorities named by their issue
    /// time, and returns the steps taken.
    fn settle(slots: &mut Vec<Slot<Fake>>, now: u64) -> Vec<Step> {
        let mut steps = Vec::new();
        while let Some(step) = next_step(slots, t(now)) {
            let created = matches!(step, Step::Prepare | Step::CreateActive)
                .then(|| fake(now, &format!("k{now}")));
            apply_step(slots, step, created);
            steps.push(step);
            assert!(steps.len() < 10, "rotation does not settle: {steps:?}");
        }
        steps
    }

    fn states(slots: &[Slot<Fake>]) -> Vec<(String, AuthorityState)> {
        slots
            .iter()
            .map(|s| (s.authority.id.clone(), s.state))
            .collect()
    }

    #[test]
    fn the_rotation_timeline_of_a_60s_authority() {
        use AuthorityState::{Active, Old, Prepared};
        let mut slots = Vec::new();
        assert_eq!(settle(&mut slots, 0), vec![Step::CreateActive]);
        assert_eq!(states(&slots), vec![("k0".into(), Active)]);
        assert_eq!(settle(&mut slots, 29), vec![]);
        assert_eq!(settle(&mut slots, 30), vec![Step::Prepare]);
        assert_eq!(
            states(&slots),
            vec![("k0".into(), Active), ("k30".into(), Prepared)]
        );
        assert_eq!(settle(&mut slots, 49), vec![]);
        assert_eq!(settle(&mut slots, 50), vec![Step::Activate(1)]);
        assert_eq!(
            states(&slots),
            vec![("k0".into(), Old), ("k30".into(), Active)]
        );
        assert_eq!(settle(&mut slots, 59), vec![]);
        // k0 expires at 60, and k30 is half-way through its life.
        assert_eq!(settle(&mut slots, 60), vec![Step::Prune(0), Step::Prepare]);
        assert_eq!(
            states(&slots),
            vec![("k30".into(), Active), ("k60".into(), Prepared)]
        );
    }

    #[test]
    fn a_long_downtime_settles_in_a_few_steps() {
        use AuthorityState::{Active, Prepared};
        let mut slots = Vec::new();
        settle(&mut slots, 0);
        settle(&mut slots, 30);
        // Back after both authorities expired.
        let steps = settle(&mut slots, 1000);
        assert_eq!(
            steps,
            vec![Step::Prune(0), Step::Prune(0), Step::CreateActive]
        );
        assert_eq!(states(&slots), vec![("k1000".into(), Active)]);
        // Back while only the prepared one is still valid, past its own half-life.
        let mut slots = Vec::new();
        settle(&mut slots, 0);
        settle(&mut slots, 30);
        let steps = settle(&mut slots, 75);
        assert_eq!(
            steps,
            vec![Step::Prune(0), Step::Activate(0), Step::Prepare]
        );
        assert_eq!(
            states(&slots),
            vec![("k30".into(), Active), ("k75".into(), Prepared)]
        );
    }

    #[test]
    fn only_activation_leaves_the_bundle_unchanged() {
        assert!(changes_bundle(Step::Prune(0)));
        assert!(changes_bundle(Step::Prepare));
        assert!(changes_bundle(Step::CreateActive));
        assert!(!changes_bundle(Step::Activate(0)));
    }

    #[test]
    fn journal_parse_checks_version_trust_domain_and_states() {
        let td = TrustDomain::new("example.org").unwrap();
        let journal = Journal::empty(&td);
        let bytes = journal.to_bytes().unwrap();
        assert_eq!(Journal::parse(&bytes, &td).unwrap(), journal);

        let other = TrustDomain::new("other.org").unwrap();
        assert!(matches!(
            Journal::parse(&bytes, &other).unwrap_err(),
            CaError::TrustDomainMismatch { .. }
        ));
        let mut v2 = journal.clone();
        v2.version = 2;
        assert!(matches!(
            Journal::parse(&v2.to_bytes().unwrap(), &td).unwrap_err(),
            CaError::CorruptJournal { .. }
        ));
        for bad in [&b""[..], b"{}", b"[]", b"{\"version\":1}", b"\xff"] {
            assert!(matches!(
                Journal::parse(bad, &td).unwrap_err(),
                CaError::CorruptJournal { .. }
            ));
        }
        let entry = JwtEntry {
            kid: "k".into(),
            key_id: "jwt-1".into(),
            state: AuthorityState::Active,
            issued_at: 0,
            not_after: 60,
            public_key: String::new(),
        };
        let mut two_active = journal;
        two_active.jwt_keys = vec![entry.clone(), entry];
        let err = Journal::parse(&two_active.to_bytes().unwrap(), &td).unwrap_err();
        assert!(err.to_string().contains("more than one"), "{err}");
    }
}
