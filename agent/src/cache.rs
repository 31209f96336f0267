//! What the agent can hand out: the trust domain's bundle and CRLs, one X509-SVID per authorized
//! entry, and the privileged sessions this agent may mint for on demand, as one immutable
//! [`Inventory`] published through `tokio::sync::watch`. Workload API streams hold a receiver and
//! send a new message whenever the snapshot changes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_core::{SelectorSet, SpiffeBundle, SpiffeId, TrustDomain};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use zeroize::Zeroizing;

/// The most entries one agent holds and mints SVIDs for (the manager leaves the others out).
pub const MAX_ENTRIES: usize = 10_000;

/// What an entry grants: its identity and what a workload must present to get it. Parsed once
/// when the entry arrives and shared (`Arc`) by the manager's copy of the entry and the SVIDs
/// minted for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The registration entry (also the key of the maps that hold it, shared).
    pub entry_id: Arc<str>,
    /// The identity.
    pub spiffe_id: SpiffeId,
    /// The selectors a workload must have.
    pub selectors: SelectorSet,
    /// The entry's hint.
    pub hint: Box<str>,
    /// X509-SVID TTL (seconds, effective).
    pub x509_ttl: u64,
    /// The entry's own end, if it has one: no SVID is renewed to outlive it.
    pub expires_at: Option<SystemTime>,
    /// The federated trust domains whose bundles the holder also gets.
    pub federates_with: Box<[TrustDomain]>,
}

/// One workload identity the agent holds.
#[derive(Clone)]
pub struct WorkloadSvid {
    /// What its entry grants. Replaced in place when the entry changes it (selectors, hint,
    /// TTL, end, federation) but not the identity.
    pub grant: Arc<Grant>,
    /// The entry revision the SVID was minted for.
    pub revision: u64,
    /// When it was minted (renewal counts from here), in milliseconds since the epoch
    /// ([`WorkloadSvid::issued_at`]): 8 bytes where a `SystemTime` takes 16.
    pub(crate) issued_at_ms: u64,
    /// The chain, leaf first: DER certificates one after the other, as the server sent them and
    /// as the Workload API sends them on (`x509_svid`). Checked when the SVID arrived. Never
    /// replaced: the key points into it ([`WorkloadSvid::chain`] reads it).
    pub(crate) chain: Box<[u8]>,
    /// The private key, held compactly: [`WorkloadSvid::private_key`] gives its PKCS#8 DER.
    pub(crate) key: SvidKey,
    /// NotAfter of the leaf, in milliseconds since the epoch ([`WorkloadSvid::not_after`]).
    pub(crate) not_after_ms: u64,
}

/// The private key of an X509-SVID, a P-256 key the agent made, held as its 32-byte private
/// scalar and where the leaf certificate holds its public key. Its PKCS#8 document, the form
/// ring generates and the Workload API sends (RFC 5208 around RFC 5915's `ECPrivateKey`), is
/// fixed bytes, the scalar and the public key: 138 bytes in an allocation of their own
/// become 36 inline, and the leaf is checked to certify this very key. The scalar is zeroed
/// when the last holder drops it; being inline, the moves that build an SVID (before it is
/// behind its `Arc`) may leave copies on the stack, where the boxed document left none.
#[derive(Clone)]
pub struct SvidKey {
    scalar: Zeroizing<[u8; SCALAR_LEN]>,
    /// Where the leaf's `subjectPublicKey` (the uncompressed point) starts in the chain.
    public_at: u32,
}

/// The PKCS#8 document of a P-256 key up to its private scalar: `PrivateKeyInfo` version 0,
/// algorithm id-ecPublicKey with the named curve prime256v1, `ECPrivateKey` version 1.
const PKCS8_P256_HEAD: [u8; 36] = [
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30, 0x6b, 0x02,
    0x01, 0x01, 0x04, 0x20,
];
/// Between the scalar and the public key: `[1]` holding the 66-byte BIT STRING.
const PKCS8_P256_MIDDLE: [u8; 5] = [0xa1, 0x44, 0x03, 0x42, 0x00];
const SCALAR_LEN: usize = 32;
/// An uncompressed P-256 point: `04`, X, Y.
const PUBLIC_LEN: usize = 65;
const PKCS8_P256_LEN: usize =
    PKCS8_P256_HEAD.len() + SCALAR_LEN + PKCS8_P256_MIDDLE.len() + PUBLIC_LEN;

/// Why a key cannot be held for a chain.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SvidKeyError {
    /// The key is not a P-256 PKCS#8 document in the form the agent makes.
    #[error("the key is not a p-256 pkcs#8 document as the agent makes them")]
    NotP256,
    /// The chain's first certificate does not parse.
    #[error("the leaf certificate does not parse: {0}")]
    Leaf(String),
    /// The leaf certifies another key than this one.
    #[error("the leaf certificate is for another key than the one the agent sent")]
    OtherKey,
}

/// A privileged session's entry: its SVIDs are minted on demand, per workload, never ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEntry {
    /// The registration entry carrying the session.
    pub entry_id: String,
    /// The session's id.
    pub session_id: String,
    /// The SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The selectors a workload must have.
    pub selectors: SelectorSet,
    /// The entry's hint.
    pub hint: String,
    /// Lifetime of each SVID (seconds).
    pub svid_ttl: u64,
    /// The session's end: no SVID outlives it, and none is served after it.
    pub ends_at: SystemTime,
    /// The entry revision.
    pub revision: u64,
    /// The federated trust domains whose bundles the holder also gets.
    pub federates_with: Vec<TrustDomain>,
}

/// Everything the agent serves at one moment.
#[derive(Clone)]
pub struct Inventory {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle.
    pub bundle: SpiffeBundle,
    /// The federated trust domains' bundles, as the server last sent them (shared between
    /// snapshots).
    pub federated: Arc<BTreeMap<TrustDomain, SpiffeBundle>>,
    /// Identities, by entry id. The map and each SVID are shared (`Arc`) between the manager's
    /// working copy and every published snapshot: publishing copies neither the map nor any
    /// certificate or key, and the manager copies the map only to change it.
    pub svids: Arc<BTreeMap<Arc<str>, Arc<WorkloadSvid>>>,
    /// Whether any entry uses a `unix:sha256` selector (so attestation must hash).
    pub needs_sha256: bool,
    /// Whether the agent has finished its first sync (until then, "no identity" may only mean
    /// "not yet").
    pub synced: bool,
    /// Privileged sessions of this agent, by entry id.
    pub sessions: BTreeMap<String, SessionEntry>,
    /// The trust domain's CRLs, DER.
    pub crls: Vec<Vec<u8>>,
    /// Whether the sync stream to the server is up: session SVIDs are served only then.
    pub connected: bool,
    /// Since when the agent has not reached a server (`None` while connected, and before the
    /// first attempt failed).
    pub disconnected_at: Option<SystemTime>,
    /// The entries the agent holds (at most [`MAX_ENTRIES`]).
    pub entries: usize,
    /// Whether entries authorized for this agent were left out for that cap since the sync
    /// that began the stream: set when one is, cleared by a sync that leaves none out (the
    /// agent cannot tell how many, nor whether they were deleted since: the server counts them
    /// as sent).
    pub over_entry_cap: bool,
}

// === impl SvidKey ===

impl SvidKey {
    /// Holds `pkcs8`, the agent's P-256 key, for `chain`, whose leaf must certify it.
    ///
    /// # Errors
    ///
    /// [`SvidKeyError`]: a key in another form, a leaf that does not parse or certifies another
    /// key.
    pub fn for_chain(pkcs8: &[u8], chain: &[u8]) -> Result<Self, SvidKeyError> {
        let (head, rest) = pkcs8
            .split_at_checked(PKCS8_P256_HEAD.len())
            .ok_or(SvidKeyError::NotP256)?;
        let (scalar, rest) = rest
            .split_at_checked(SCALAR_LEN)
            .ok_or(SvidKeyError::NotP256)?;
        let (middle, public) = rest
            .split_at_checked(PKCS8_P256_MIDDLE.len())
            .ok_or(SvidKeyError::NotP256)?;
        if head != PKCS8_P256_HEAD
            || middle != PKCS8_P256_MIDDLE
            || public.len() != PUBLIC_LEN
            || public.first() != Some(&0x04)
        {
            return Err(SvidKeyError::NotP256);
        }
        let (_, leaf) = x509_parser::parse_x509_certificate(chain)
            .map_err(|e| SvidKeyError::Leaf(e.to_string()))?;
        let spki = leaf.public_key();
        let p256 = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
            && spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .is_some_and(|curve| curve == OID_EC_P256);
        if !p256 || *spki.subject_public_key.data != *public {
            return Err(SvidKeyError::OtherKey);
        }
        // The same bytes as the leaf's key: found where they are, so that what `pkcs8` rebuilds
        // is by construction the document it was given.
        let public_at = chain
            .windows(PUBLIC_LEN)
            .position(|w| w == public)
            .and_then(|at| u32::try_from(at).ok())
            .ok_or(SvidKeyError::OtherKey)?;
        let mut held = Zeroizing::new([0; SCALAR_LEN]);
        held.copy_from_slice(scalar);
        Ok(Self {
            scalar: held,
            public_at,
        })
    }

    /// The PKCS#8 document, given the chain this key was held for (empty for another chain too
    /// short to hold the public key).
    #[must_use]
    pub(crate) fn pkcs8(&self, chain: &[u8]) -> Zeroizing<Vec<u8>> {
        let mut doc = Zeroizing::new(Vec::with_capacity(PKCS8_P256_LEN));
        let at = usize::try_from(self.public_at).unwrap_or(usize::MAX);
        let Some(public) = chain.get(at..at.saturating_add(PUBLIC_LEN)) else {
            return doc;
        };
        doc.extend_from_slice(&PKCS8_P256_HEAD);
        doc.extend_from_slice(&*self.scalar);
        doc.extend_from_slice(&PKCS8_P256_MIDDLE);
        doc.extend_from_slice(public);
        doc
    }
}

impl fmt::Debug for SvidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SvidKey(..)")
    }
}

// === impl WorkloadSvid ===

impl WorkloadSvid {
    /// The chain, leaf first: DER certificates one after the other.
    #[must_use]
    pub fn chain(&self) -> &[u8] {
        &self.chain
    }

    /// When it was minted: renewal counts from here.
    #[must_use]
    pub fn issued_at(&self) -> SystemTime {
        from_millis(self.issued_at_ms)
    }

    /// The leaf's NotAfter.
    #[must_use]
    pub fn not_after(&self) -> SystemTime {
        from_millis(self.not_after_ms)
    }

    /// When renewal is due: halfway through its life.
    #[must_use]
    pub fn renew_at(&self) -> SystemTime {
        sigil_core::lifetime::Validity::from_parts(self.issued_at(), self.not_after()).renew_at()
    }

    /// When its holder must look at it again, given `end`, the end of what it was issued under
    /// (its entry's or session's): at its renewal time, unless it already ends with `end` (a
    /// fresh one could not end later, so renewing gains nothing), and at its expiry. Without
    /// that exception an SVID capped by its end would wake its holder at the shortest wait,
    /// over and over, from half its life to its end.
    #[must_use]
    pub fn next_look(&self, end: Option<SystemTime>) -> SystemTime {
        let expiry = self.not_after();
        if end.is_some_and(|end| end <= expiry) {
            expiry
        } else {
            self.renew_at().min(expiry)
        }
    }

    /// The private key, PKCS#8 DER.
    #[must_use]
    pub fn private_key(&self) -> Zeroizing<Vec<u8>> {
        self.key.pkcs8(&self.chain)
    }
}

impl fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadSvid")
            .field("entry_id", &self.grant.entry_id)
            .field("spiffe_id", &self.grant.spiffe_id)
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
impl WorkloadSvid {
    /// For tests of what holds SVIDs: no chain, a zero key, minted a minute before `not_after`.
    pub(crate) fn unsigned(grant: Arc<Grant>, revision: u64, not_after: SystemTime) -> Self {
        Self {
            grant,
            revision,
            issued_at_ms: millis(not_after - Duration::from_secs(60)),
            chain: Box::default(),
            key: SvidKey {
                scalar: Zeroizing::new([0; SCALAR_LEN]),
                public_at: 0,
            },
            not_after_ms: millis(not_after),
        }
    }
}

/// `time` in milliseconds since the epoch (0 before it, saturating far after it).
pub(crate) fn millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_millis(millis: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_millis(millis))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

// === impl Inventory ===

impl fmt::Debug for Inventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inventory")
            .field("trust_domain", &self.trust_domain)
            .field("svids", &self.svids.len())
            .field("synced", &self.synced)
            .finish_non_exhaustive()
    }
}

impl Inventory {
    /// An empty snapshot for `trust_domain` with `bundle`.
    pub fn new(trust_domain: TrustDomain, bundle: SpiffeBundle) -> Self {
        Self {
            trust_domain,
            bundle,
            federated: Arc::default(),
            svids: Arc::new(BTreeMap::new()),
            needs_sha256: false,
            synced: false,
            sessions: BTreeMap::new(),
            crls: Vec::new(),
            connected: false,
            disconnected_at: None,
            entries: 0,
            over_entry_cap: false,
        }
    }

    /// The sessions a workload with `selectors` may get SVIDs for at `now`: none while the
    /// agent cannot reach the server, none past a session's end.
    pub fn sessions_for(&self, selectors: &SelectorSet, now: SystemTime) -> Vec<&SessionEntry> {
        if !self.connected {
            return Vec::new();
        }
        self.sessions
            .values()
            .filter(|s| s.selectors.matches(selectors) && s.ends_at > now)
            .collect()
    }

    /// The federated bundles a workload holding `identities` (and `sessions`) gets: those of
    /// the trust domains their entries federate with, in trust domain order. A trust domain
    /// without a bundle (yet, or any more) is left out.
    pub fn federated_for<'a>(
        &'a self,
        federates_with: impl IntoIterator<Item = &'a TrustDomain>,
    ) -> Vec<&'a SpiffeBundle> {
        let wanted: std::collections::BTreeSet<&TrustDomain> = federates_with.into_iter().collect();
        wanted
            .into_iter()
            .filter_map(|td| self.federated.get(td))
            .collect()
    }

    /// The federated bundles a workload with `selectors` gets at `now`: those its identities'
    /// and sessions' entries federate with.
    pub fn federated_for_selectors(
        &self,
        selectors: &SelectorSet,
        now: SystemTime,
    ) -> Vec<&SpiffeBundle> {
        let identities = self.identities_for(selectors, now);
        let sessions = self.sessions_for(selectors, now);
        self.federated_for(
            identities
                .iter()
                .flat_map(|w| w.grant.federates_with.iter())
                .chain(sessions.iter().flat_map(|s| s.federates_with.iter())),
        )
    }

    /// The identities a workload with `selectors` is entitled to, in a stable order (by entry
    /// id; the first is the default identity), unexpired at `now`, with duplicate non-empty
    /// hints dropped (the first keeps it).
    pub fn identities_for(&self, selectors: &SelectorSet, now: SystemTime) -> Vec<&WorkloadSvid> {
        let mut hints = std::collections::HashSet::new();
        self.svids
            .values()
            .filter(|svid| svid.grant.selectors.matches(selectors) && svid.not_after() > now)
            .filter(|svid| svid.grant.hint.is_empty() || hints.insert(&*svid.grant.hint))
            .map(|svid| &**svid)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sigil_core::Selector;

    use super::*;

    fn svid(entry: &str, hint: &str, selectors: &[&str], not_after: SystemTime) -> WorkloadSvid {
        WorkloadSvid::unsigned(
            Arc::new(Grant {
                entry_id: entry.into(),
                spiffe_id: SpiffeId::new(&format!("spiffe://example.org/{entry}")).unwrap(),
                selectors: selectors
                    .iter()
                    .map(|s| Selector::parse(s).unwrap())
                    .collect(),
                hint: hint.into(),
                x509_ttl: 3600,
                expires_at: None,
                federates_with: Box::default(),
            }),
            1,
            not_after,
        )
    }

    #[test]
    fn identities_are_matched_ordered_unexpired_and_hints_unique() {
        let td = TrustDomain::new("example.org").unwrap();
        let now = SystemTime::now();
        let later = now + Duration::from_secs(60);
        let mut s = Inventory::new(td.clone(), SpiffeBundle::new(td));
        for w in [
            svid("a", "internal", &["unix:uid:1"], later),
            svid("b", "internal", &["unix:uid:1"], later),
            svid("c", "", &["unix:uid:1", "unix:gid:1"], later),
            svid("d", "", &["unix:uid:2"], later),
            svid("e", "", &["unix:uid:1"], now),
        ] {
            Arc::make_mut(&mut s.svids).insert(w.grant.entry_id.clone(), Arc::new(w));
        }
        let workload: SelectorSet = ["unix:uid:1", "unix:gid:1"]
            .iter()
            .map(|x| Selector::parse(x).unwrap())
            .collect();
        let got: Vec<_> = s
            .identities_for(&workload, now)
            .iter()
            .map(|w| &*w.grant.entry_id)
            .collect();
        // b shares a's hint (a is first), d does not match, e has expired.
        assert_eq!(got, ["a", "c"]);
    }

    /// 10,000 SVIDs and their grants are held at once: malloc's size classes step by 16 bytes,
    /// and these sizes keep an `Arc<Grant>` in a 144-byte chunk and an `Arc<WorkloadSvid>` in
    /// a 112-byte one (`sigil-bench`'s "agent memory per cached SVID" row measures the whole).
    #[test]
    fn what_is_held_per_svid_stays_small() {
        assert_eq!(std::mem::size_of::<SpiffeId>(), 24);
        // One selector inline, more in a slice.
        assert_eq!(std::mem::size_of::<SelectorSet>(), 24);
        assert!(
            std::mem::size_of::<Grant>() <= 120,
            "{}",
            std::mem::size_of::<Grant>()
        );
        assert!(
            std::mem::size_of::<WorkloadSvid>() <= 88,
            "{}",
            std::mem::size_of::<WorkloadSvid>()
        );
    }

    /// A P-256 PKCS#8 document from ring and a chain whose leaf certifies `leaf_key` (the
    /// document's own key unless another is given), followed by a CA certificate.
    fn key_and_chain(leaf_key: Option<&rcgen::KeyPair>) -> (Vec<u8>, Vec<u8>) {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .unwrap();
        let own = rcgen::KeyPair::try_from(doc.as_ref()).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut leaf_params = rcgen::CertificateParams::new(vec![]).unwrap();
        leaf_params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org/w".try_into().unwrap(),
        )];
        let leaf = leaf_params
            .signed_by(leaf_key.unwrap_or(&own), &issuer)
            .unwrap();
        let chain = [leaf.der().as_ref(), ca.der().as_ref()].concat();
        (doc.as_ref().to_vec(), chain)
    }

    #[test]
    fn a_held_key_gives_back_the_document_ring_made() {
        for _ in 0..32 {
            let (doc, chain) = key_and_chain(None);
            let key = SvidKey::for_chain(&doc, &chain).unwrap();
            let rebuilt = key.pkcs8(&chain);
            assert_eq!(*rebuilt, doc);
            ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &rebuilt,
                &ring::rand::SystemRandom::new(),
            )
            .unwrap();
            // Not the first bytes of the chain: the public key sits in the leaf's SPKI.
            assert!(key.public_at > 100, "{}", key.public_at);
        }
    }

    #[test]
    fn a_key_is_held_only_for_a_leaf_that_certifies_it() {
        let other = rcgen::KeyPair::generate().unwrap();
        let (doc, chain) = key_and_chain(Some(&other));
        assert_eq!(
            SvidKey::for_chain(&doc, &chain).unwrap_err(),
            SvidKeyError::OtherKey
        );
        let (doc, chain) = key_and_chain(None);
        assert!(matches!(
            SvidKey::for_chain(&doc, b"not a certificate"),
            Err(SvidKeyError::Leaf(_))
        ));
        assert!(matches!(
            SvidKey::for_chain(&doc, &[]),
            Err(SvidKeyError::Leaf(_))
        ));
        // Another key type, a P-256 key in another form, a truncated one, one byte more.
        let rng = ring::rand::SystemRandom::new();
        let ed25519 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let p384 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            &rng,
        )
        .unwrap();
        let mut compressed = doc.clone();
        compressed[PKCS8_P256_LEN - PUBLIC_LEN] = 0x02;
        for bad in [
            ed25519.as_ref(),
            p384.as_ref(),
            &doc[..doc.len() - 1],
            &[doc.as_slice(), &[0]].concat(),
            &compressed,
            &[],
        ] {
            assert_eq!(
                SvidKey::for_chain(bad, &chain).unwrap_err(),
                SvidKeyError::NotP256
            );
        }
        // Given a chain too short to hold the public key, no document rather than a wrong one.
        let key = SvidKey::for_chain(&doc, &chain).unwrap();
        assert!(key.pkcs8(&chain[..100]).is_empty());
        assert_eq!(*key.pkcs8(&chain), doc);
    }
}
