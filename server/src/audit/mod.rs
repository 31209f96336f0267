//! The tamper-evident audit log: every mutating admin call and every credential the server
//! issues leaves a record, hash-chained to the one before it, with the chain head signed
//! periodically by a key of the server's own.
//!
//! # Records
//!
//! An [`AuditRecord`] says who (`actor`: `uid:N` for an admin caller, an agent's SPIFFE ID, an
//! audit source's SPIFFE ID (a broker, for `broker.*` records), or `server`) did what
//! (`action`, a dotted name from [`action`]) to what (`subject`: an entry id, a SPIFFE ID, a
//! trust domain), with `details` (a JSON object: serial, not-after, SPIFFE
//! ID, agent, ...). Details never hold keys or tokens; a join token appears only as the agent
//! ID it will give. Sequences start at 1 and have no gaps; times never decrease along the
//! chain (the store clamps a clock that stepped back to the previous record's time).
//!
//! The store assigns sequence, time, `prev_hash` and `hash` in one atomic step with the chain
//! head ([`Store::append_audit`](crate::store::Store::append_audit)), so concurrent appenders
//! never fork the chain, and returns only once the records are durable. A caller that hands out
//! a credential appends first and hands it out only when the append succeeded: if the audit
//! write fails, nothing is issued.
//!
//! # Chains
//!
//! Every record and checkpoint names its chain (`chain_id`): [`DEFAULT_CHAIN_ID`] for a single
//! server; each server of a highly available deployment will write a chain of its own. A chain
//! is verified on its own, and a record or checkpoint of another chain in it is a violation.
//!
//! # Canonical encoding (version 2)
//!
//! `hash` is SHA-256 over the record's canonical encoding, and `prev_hash` is the previous
//! record's `hash` (32 zero bytes for record 1). The encoding is, in order:
//!
//! 1. the domain tag `sigil.audit.record.v2` followed by one `0x00` byte;
//! 2. `chain_id`, as a 4-byte big-endian length followed by that many bytes of UTF-8, then
//!    `sequence`, 8 bytes big-endian;
//! 3. `time` as seconds since the Unix epoch (8 bytes big-endian) and nanoseconds (4 bytes
//!    big-endian);
//! 4. `actor`, `action`, `subject` and `details`, each as a 4-byte big-endian length followed
//!    by that many bytes of UTF-8; `details` is written as canonical JSON: no whitespace, object
//!    keys sorted by their UTF-8 bytes (at every depth), strings and integers as `serde_json`
//!    writes them. Floating-point numbers are refused (they may not survive a round trip
//!    through storage bit for bit);
//! 5. `prev_hash`, 32 bytes.
//!
//! Every field is either fixed-size or length-prefixed, so no two different records encode
//! alike, and the encoding depends on nothing but the field values (not on how the store
//! serializes records, nor on map ordering).
//!
//! # Checkpoints and the trust model
//!
//! A hash chain alone proves nothing against someone who can write the store: they can alter a
//! record and recompute every hash after it. So the server signs a checkpoint, `(chain, sequence,
//! head hash, time)`, with its audit key ([`AUDIT_KEY_ID`], ECDSA P-256, kept by the
//! [`KeyManager`](crate::ca::KeyManager) as a 0600 file in the key directory, apart from the store). It does so
//! before it serves anything (the genesis checkpoint: sequence 0, the hash of nothing, 32 zero
//! bytes), periodically when the head moved, on an operator's request, and at shutdown
//! (`AuditLog::checkpoint` in the audit service). Before signing, it checks the records since the
//! previous checkpoint, so it never signs over a broken chain, it refuses to continue from a
//! checkpoint that its own key did not sign, and it checks that the chain still extends the last
//! checkpoint it signed (which it remembers outside the store).
//!
//! [`verify`] (or [`ChainVerifier`], record by record) recomputes every hash from record 1,
//! checks every link, checks that every checkpoint given (all those stored, and any kept
//! elsewhere) was signed by the trusted key and that its `(sequence, hash)` matches the
//! recomputed chain, and names the first bad record. A chain with records and no checkpoint
//! at all fails: the genesis checkpoint is always there unless checkpoints were deleted.
//!
//! What this does and does not protect against:
//!
//! - Someone who can write the store but cannot read the audit key cannot alter, remove or
//!   reorder any record up to the latest checkpoint without `audit verify` noticing.
//! - Records after the latest checkpoint (at most one checkpoint interval's worth, or those
//!   written before a crash) are protected by the chain only: altering one and recomputing the
//!   hashes after it, or truncating the tail, goes unnoticed until it is too late to sign.
//!   [`VerifySummary::unsigned_records`] says how many records that is.
//! - Someone who can write the store **and** read the key file can forge everything, as can
//!   anyone who controls the server process. Keep the key directory (0700, files 0600) out of
//!   backups that leave the host, and pin the key's fingerprint
//!   ([`AuditCheckpoint::key_fingerprint`]) outside the host if that matters to you.
//! - Deleting the latest checkpoints from the store, or restoring an older copy of the whole
//!   data directory, is caught only by a checkpoint kept elsewhere: one an operator saved
//!   (`sigil-server audit checkpoint`, then `audit verify --checkpoint`), the server's own
//!   record of the last checkpoint it signed (unless that was restored too), or one an agent
//!   received (agents are witnesses: they present the latest checkpoint they saw when they
//!   reconnect).
//!
//! # Retention
//!
//! Records are never rewritten or deleted by any API. The retention setting is "keep
//! everything", the only one implemented; pruning would have to keep the chain verifiable
//! (for example by starting from a signed checkpoint), which is future work.

mod verify;

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub(crate) use self::verify::{ChainVerifier, VerifySummary, Violation, ViolationKind};
#[cfg(test)]
pub(crate) use self::verify::{verify, verify_links};
use sigil_core::hex::{decode as hex_decode, encode as hex_encode};

/// The id of the audit signing key in the [`KeyManager`](crate::ca::KeyManager).
pub(crate) const AUDIT_KEY_ID: &str = "audit-signing";

/// The actor of records the server writes on its own behalf.
pub(crate) const SERVER_ACTOR: &str = "server";

/// The chain of a single server.
pub(crate) const DEFAULT_CHAIN_ID: &str = "default";

/// The domain tag that starts a record's canonical encoding.
const RECORD_TAG: &[u8] = b"sigil.audit.record.v2\0";

/// The domain tag that starts a checkpoint's signed message.
const CHECKPOINT_TAG: &[u8] = b"sigil.audit.checkpoint.v2\0";

/// The `prev_hash` of record 1.
pub(crate) const GENESIS_HASH: [u8; 32] = [0; 32];

/// The action names records use.
pub(crate) mod action {
    /// An admin created a registration entry.
    pub(crate) const ENTRY_CREATE: &str = "entry.create";
    /// An admin updated a registration entry.
    pub(crate) const ENTRY_UPDATE: &str = "entry.update";
    /// An admin deleted a registration entry.
    pub(crate) const ENTRY_DELETE: &str = "entry.delete";
    /// An admin generated a join token (recorded as the agent ID it gives, never the token).
    pub(crate) const TOKEN_GENERATE: &str = "token.generate";
    /// An agent attested and got its first SVID.
    pub(crate) const AGENT_ATTEST: &str = "agent.attest";
    /// An agent renewed its SVID.
    pub(crate) const AGENT_RENEW: &str = "agent.renew";
    /// An admin evicted an agent.
    pub(crate) const AGENT_EVICT: &str = "agent.evict";
    /// An admin banned an agent.
    pub(crate) const AGENT_BAN: &str = "agent.ban";
    /// An admin set a federated bundle.
    pub(crate) const BUNDLE_SET: &str = "bundle.set";
    /// An admin deleted a federated bundle.
    pub(crate) const BUNDLE_DELETE: &str = "bundle.delete";
    /// An admin created a federation relationship.
    pub(crate) const FEDERATION_CREATE: &str = "federation.create";
    /// An admin updated a federation relationship.
    pub(crate) const FEDERATION_UPDATE: &str = "federation.update";
    /// An admin deleted a federation relationship (and its bundle).
    pub(crate) const FEDERATION_DELETE: &str = "federation.delete";
    /// The server fetched a changed bundle from a federated trust domain's endpoint.
    pub(crate) const FEDERATION_BUNDLE_UPDATE: &str = "federation.bundle_update";
    /// A workload X509-SVID was issued to an agent.
    pub(crate) const SVID_X509_ISSUE: &str = "svid.x509.issue";
    /// A workload JWT-SVID was issued to an agent.
    pub(crate) const SVID_JWT_ISSUE: &str = "svid.jwt.issue";
    /// An admin minted an X509-SVID directly.
    pub(crate) const X509_MINT: &str = "x509.mint";
    /// An admin minted a JWT-SVID directly.
    pub(crate) const JWT_MINT: &str = "jwt.mint";
    /// An admin opened a privileged session.
    pub(crate) const SESSION_OPEN: &str = "session.open";
    /// A second admin approved a pending session.
    pub(crate) const SESSION_APPROVE: &str = "session.approve";
    /// An admin closed a session (task done).
    pub(crate) const SESSION_CLOSE: &str = "session.close";
    /// An admin revoked a session; its unexpired serials went on the CRLs.
    pub(crate) const SESSION_REVOKE: &str = "session.revoke";
    /// A session reached its end (server clock).
    pub(crate) const SESSION_EXPIRE: &str = "session.expire";
    /// An operator acknowledged that records after a signed checkpoint were lost or
    /// rewritten; signing resumed.
    pub(crate) const AUDIT_DIVERGENCE: &str = "audit.divergence";
}

/// A record as a caller writes it: the store adds sequence, time and hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewAuditRecord {
    /// Who: `uid:N`, an agent SPIFFE ID, or [`SERVER_ACTOR`].
    pub actor: String,
    /// What: a dotted name from [`action`].
    pub action: String,
    /// To what: an entry id, a SPIFFE ID, a trust domain.
    pub subject: String,
    /// Facts about it (serial, not-after, SPIFFE ID, agent); never keys or tokens, and no
    /// floating-point numbers.
    pub details: Map<String, Value>,
}

/// A record of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuditRecord {
    /// The chain it belongs to ([`DEFAULT_CHAIN_ID`] for a single server).
    pub chain_id: String,
    /// Position in the chain: 1, 2, 3, ... without gaps.
    pub sequence: u64,
    /// When the store appended it; never before the previous record's time.
    pub time: SystemTime,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// To what.
    pub subject: String,
    /// Facts about it, a JSON object.
    pub details: Map<String, Value>,
    /// The previous record's `hash`; [`GENESIS_HASH`] for record 1.
    #[serde(with = "hex32")]
    pub prev_hash: [u8; 32],
    /// SHA-256 of this record's canonical encoding (see the module docs).
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
}

/// The last record of the chain, as the store keeps it to append the next one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuditHead {
    /// The chain.
    pub chain_id: String,
    /// The last record's sequence.
    pub sequence: u64,
    /// The last record's hash.
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
    /// The last record's time.
    pub time: SystemTime,
}

/// A signed statement that the chain's record `sequence` has hash `hash`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuditCheckpoint {
    /// The chain.
    pub chain_id: String,
    /// The sequence of the record it covers (and, through the chain, of every earlier one); 0
    /// for the genesis checkpoint of the empty chain.
    pub sequence: u64,
    /// That record's hash ([`GENESIS_HASH`] for sequence 0).
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
    /// When it was signed (whole seconds).
    pub time: SystemTime,
    /// The id of the signing key in the key manager.
    pub key_id: String,
    /// The signing key's public half: an uncompressed SEC 1 P-256 point (65 bytes).
    #[serde(with = "hex_bytes")]
    pub public_key: Vec<u8>,
    /// ECDSA P-256 SHA-256 signature (ASN.1 DER) over [`AuditCheckpoint::signed_message`].
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
}

/// A relying party's spool of events (`sigil.audit.v1`): the caller's SPIFFE ID and the id of
/// its spool. The store counts sequences per source, so that each event is appended once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AuditSource {
    /// The caller's SPIFFE ID (the records' actor).
    pub spiffe_id: String,
    /// The spool's id (32 lowercase hex characters).
    pub spool_id: String,
}

/// One event of an [`AuditSource`]: its spool sequence and the record it becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceEvent {
    /// Its position in the source's spool: 1, 2, 3, ...
    pub sequence: u64,
    /// The record, its `source_sequence` detail included.
    pub record: NewAuditRecord,
}

/// What [`Store::append_source_events`](crate::store::Store::append_source_events) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceAppend {
    /// The records appended now, sealed (events already in the chain are not among them).
    pub appended: Vec<AuditRecord>,
    /// The source's last sequence in the chain, after this call.
    pub acknowledged: u64,
}

/// Which records [`Store::list_audit`](crate::store::Store::list_audit) returns: every condition
/// that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AuditFilter {
    /// Only records with this sequence or a later one.
    pub from_sequence: Option<u64>,
    /// Only records at or after this time.
    pub since: Option<SystemTime>,
    /// Only records whose subject, or a top-level string detail (`spiffe_id`, `agent`,
    /// `parent_id`, ...), is exactly this SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Only records with this action, or an action under it (`svid` matches `svid.x509.issue`).
    pub action: Option<String>,
    /// Only records by exactly this actor.
    pub actor: Option<String>,
    /// Only records of this privileged session (their `session_id` detail).
    pub session_id: Option<String>,
}

/// Why a record cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The time is before 1970.
    #[error("audit record time is before the unix epoch")]
    TimeBeforeEpoch,
    /// The details hold a floating-point number.
    #[error("audit record details hold a floating-point number ({0}); use an integer or a string")]
    Float(String),
    /// A field is longer than 4 GiB.
    #[error("audit record field {0} is too long")]
    TooLong(&'static str),
}

// === impl NewAuditRecord ===

impl NewAuditRecord {
    /// A record with no details.
    pub(crate) fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        subject: impl Into<String>,
    ) -> Self {
        Self {
            actor: actor.into(),
            action: action.into(),
            subject: subject.into(),
            details: Map::new(),
        }
    }

    /// Adds (or replaces) one detail.
    #[must_use]
    pub(crate) fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// Adds a time detail, as whole seconds since the Unix epoch (an integer).
    #[must_use]
    pub(crate) fn time_detail(self, key: &str, time: SystemTime) -> Self {
        let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.detail(key, seconds)
    }

    /// Seals the record at position `sequence` of chain `chain_id`, after the record whose
    /// hash is `prev_hash`.
    ///
    /// # Errors
    ///
    /// [`EncodeError`] when the record has no canonical encoding.
    pub(crate) fn seal(
        self,
        chain_id: &str,
        sequence: u64,
        time: SystemTime,
        prev_hash: [u8; 32],
    ) -> Result<AuditRecord, EncodeError> {
        let mut record = AuditRecord {
            chain_id: chain_id.to_owned(),
            sequence,
            time,
            actor: self.actor,
            action: self.action,
            subject: self.subject,
            details: self.details,
            prev_hash,
            hash: [0; 32],
        };
        record.hash = record.compute_hash()?;
        Ok(record)
    }
}

// === impl AuditRecord ===

impl AuditRecord {
    /// The canonical encoding (see the module docs).
    ///
    /// # Errors
    ///
    /// [`EncodeError`] when a field cannot be encoded.
    pub(crate) fn canonical_encoding(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(RECORD_TAG);
        length_prefixed(&mut out, "chain_id", self.chain_id.as_bytes())?;
        out.extend_from_slice(&self.sequence.to_be_bytes());
        encode_time(&mut out, self.time)?;
        length_prefixed(&mut out, "actor", self.actor.as_bytes())?;
        length_prefixed(&mut out, "action", self.action.as_bytes())?;
        length_prefixed(&mut out, "subject", self.subject.as_bytes())?;
        // Written in place, behind a length filled in once it is known.
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        canonical_object(&self.details, &mut out)?;
        let len = u32::try_from(out.len() - at - 4).map_err(|_| EncodeError::TooLong("details"))?;
        if let Some(slot) = out.get_mut(at..at + 4) {
            slot.copy_from_slice(&len.to_be_bytes());
        }
        out.extend_from_slice(&self.prev_hash);
        Ok(out)
    }

    /// SHA-256 of the canonical encoding: what `hash` must be.
    ///
    /// # Errors
    ///
    /// [`EncodeError`] when a field cannot be encoded.
    pub(crate) fn compute_hash(&self) -> Result<[u8; 32], EncodeError> {
        Ok(sha256(&self.canonical_encoding()?))
    }

    /// The head of a chain ending with this record.
    pub(crate) fn head(&self) -> AuditHead {
        AuditHead {
            chain_id: self.chain_id.clone(),
            sequence: self.sequence,
            hash: self.hash,
            time: self.time,
        }
    }
}

// === impl AuditCheckpoint ===

impl AuditCheckpoint {
    /// The bytes the signature covers: the tag `sigil.audit.checkpoint.v2` and a `0x00` byte,
    /// `chain_id` (4-byte big-endian length, then UTF-8), `sequence` (8 bytes big-endian),
    /// `hash` (32 bytes), and `time` as seconds (8 bytes big-endian) and nanoseconds (4 bytes
    /// big-endian) since the Unix epoch.
    ///
    /// # Errors
    ///
    /// [`EncodeError::TimeBeforeEpoch`], [`EncodeError::TooLong`].
    pub(crate) fn signed_message(
        chain_id: &str,
        sequence: u64,
        hash: &[u8; 32],
        time: SystemTime,
    ) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(CHECKPOINT_TAG.len() + 56 + chain_id.len());
        out.extend_from_slice(CHECKPOINT_TAG);
        length_prefixed(&mut out, "chain_id", chain_id.as_bytes())?;
        out.extend_from_slice(&sequence.to_be_bytes());
        out.extend_from_slice(hash);
        encode_time(&mut out, time)?;
        Ok(out)
    }

    /// Lowercase hex SHA-256 of the public key: the value to pin outside the host.
    pub(crate) fn key_fingerprint(&self) -> String {
        key_fingerprint(&self.public_key)
    }

    /// True when `signature` is a valid signature over this checkpoint by `public_key`
    /// (which says nothing about whether that key is trusted).
    pub(crate) fn signature_is_valid(&self) -> bool {
        let Ok(message) =
            Self::signed_message(&self.chain_id, self.sequence, &self.hash, self.time)
        else {
            return false;
        };
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &self.public_key,
        )
        .verify(&message, &self.signature)
        .is_ok()
    }
}

impl fmt::Debug for AuditCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditCheckpoint")
            .field("chain_id", &self.chain_id)
            .field("sequence", &self.sequence)
            .field("hash", &hex_encode(&self.hash))
            .field("time", &self.time)
            .field("key_id", &self.key_id)
            .field("key_fingerprint", &self.key_fingerprint())
            .finish_non_exhaustive()
    }
}

// === impl AuditFilter ===

impl AuditFilter {
    /// True when `record` passes every condition that is set.
    pub(crate) fn matches(&self, record: &AuditRecord) -> bool {
        self.from_sequence
            .is_none_or(|from| record.sequence >= from)
            && self.since.is_none_or(|since| record.time >= since)
            && self.actor.as_ref().is_none_or(|a| *a == record.actor)
            && self.action.as_ref().is_none_or(|a| {
                record.action == *a
                    || record
                        .action
                        .strip_prefix(a.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
            && self.session_id.as_ref().is_none_or(|id| {
                record.details.get("session_id").and_then(Value::as_str) == Some(id.as_str())
            })
            && self.spiffe_id.as_ref().is_none_or(|id| {
                record.subject == *id
                    || record
                        .details
                        .values()
                        .any(|v| v.as_str() == Some(id.as_str()))
            })
    }
}

// === helpers ===

/// The `actor` of an admin caller.
pub(crate) fn uid_actor(uid: u32) -> String {
    format!("uid:{uid}")
}

/// Lowercase hex SHA-256 of a public key.
pub(crate) fn key_fingerprint(public_key: &[u8]) -> String {
    hex_encode(&sha256(public_key))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn encode_time(out: &mut Vec<u8>, time: SystemTime) -> Result<(), EncodeError> {
    let since = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| EncodeError::TimeBeforeEpoch)?;
    out.extend_from_slice(&since.as_secs().to_be_bytes());
    out.extend_from_slice(&since.subsec_nanos().to_be_bytes());
    Ok(())
}

fn length_prefixed(
    out: &mut Vec<u8>,
    field: &'static str,
    bytes: &[u8],
) -> Result<(), EncodeError> {
    let len = u32::try_from(bytes.len()).map_err(|_| EncodeError::TooLong(field))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// Whether `value` holds a floating-point number anywhere: no audit record's details can (the
/// chain hash's canonical JSON has no floats).
pub(crate) fn holds_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(holds_float),
        Value::Object(map) => map.values().any(holds_float),
        Value::Null | Value::Bool(_) | Value::String(_) => false,
    }
}

/// Canonical JSON: no whitespace, object keys sorted by their bytes, no floats.
fn canonical_json(value: &Value, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if n.is_f64() {
                return Err(EncodeError::Float(n.to_string()));
            }
            // An integer's decimal digits, as serde_json writes them (writing to a Vec cannot
            // fail).
            let _ = serde_json::to_writer(&mut *out, n);
        }
        Value::String(s) => json_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => canonical_object(map, out)?,
    }
    Ok(())
}

/// A JSON object in the canonical form: keys sorted by their bytes.
fn canonical_object(map: &Map<String, Value>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.push(b'{');
    for (i, (key, item)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_string(key, out);
        out.push(b':');
        canonical_json(item, out)?;
    }
    out.push(b'}');
    Ok(())
}

fn json_string(s: &str, out: &mut Vec<u8>) {
    // serde_json escapes strings deterministically; serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Serde helper: `[u8; 32]` as lowercase hex.
mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{hex_decode, hex_encode};

    pub(super) fn serialize<S: Serializer>(
        bytes: &[u8; 32],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex_encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(deserializer)?;
        hex_decode(&s)
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| serde::de::Error::custom("expected 64 lowercase hex characters"))
    }
}

/// Serde helper: bytes as lowercase hex.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{hex_decode, hex_encode};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex_encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(deserializer)?;
        hex_decode(&s).ok_or_else(|| serde::de::Error::custom("expected lowercase hex"))
    }
}

#[cfg(test)]
pub(crate) mod tests;
