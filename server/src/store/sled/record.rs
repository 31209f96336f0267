//! The binary form of the records a server reads at every start, entries and the change feed,
//! and of the one that grows with every credential issued, the audit record.
//!
//! A record is one version byte, [`PROTOBUF_V1`], and a protobuf message ([`EntryRecord`],
//! [`ChangeRecord`], [`AuditRecordBin`]). Against the JSON these records were before, an entry
//! takes about a third of the bytes in sled's log (a server's start re-reads that log and
//! decodes every entry) and decodes without scanning field names and escapes; an audit record
//! keeps its hashes as bytes, not hex. Every id, SPIFFE ID, selector and trust domain is
//! checked on the way back with the constructors the JSON form's decoder uses, and an entry
//! record ends with a marker field, so a record cut short or damaged is [`StoreError::Corrupt`],
//! never a panic or an entry with fewer fields. (Neither form checks what only the admin API
//! limits, such as a hint's length.)
//!
//! Records written by builds before this form are JSON objects: their first byte is `{`, which
//! is not a version byte, so they are still read as they are (no migration; a record becomes
//! binary when it is next written). A build before this form cannot read a binary record.
//!
//! Audit records are written in runs since store layout 5: one value holds consecutive records
//! ([`AuditRunBin`], version byte [`AUDIT_RUN_V1`]) under the first one's sequence. A value with
//! one record alone, binary or JSON, is an earlier build's, and still read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sigil_core::{Selector, SelectorSet, SpiffeId, TrustDomain};

use crate::audit::AuditRecord;
use crate::store::{Change, ChangeKind, EntryId, RegistrationEntry, SessionId, StoreError};

/// The version byte of a protobuf record.
const PROTOBUF_V1: u8 = 0x01;
/// The first byte of a JSON record (an object), the form before [`PROTOBUF_V1`].
const JSON_OBJECT: u8 = b'{';
/// The version byte of a run of audit records ([`AuditRunBin`]), the form of the `audit`
/// tree's values since store layout 5 (earlier builds stored each record alone).
const AUDIT_RUN_V1: u8 = 0x02;
/// What an audit record's errors name.
const AUDIT: &str = "audit";

/// A [`RegistrationEntry`] as stored.
#[derive(Clone, PartialEq, Message)]
struct EntryRecord {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    spiffe_id: String,
    #[prost(string, tag = "3")]
    parent_id: String,
    /// `type:value`, in the set's order.
    #[prost(string, repeated, tag = "4")]
    selectors: Vec<String>,
    #[prost(message, optional, tag = "5")]
    x509_svid_ttl: Option<Span>,
    #[prost(message, optional, tag = "6")]
    jwt_svid_ttl: Option<Span>,
    #[prost(string, repeated, tag = "7")]
    dns_names: Vec<String>,
    #[prost(string, tag = "8")]
    hint: String,
    /// Since the Unix epoch.
    #[prost(message, optional, tag = "9")]
    expires_at: Option<Span>,
    /// Since the Unix epoch; always present.
    #[prost(message, optional, tag = "10")]
    created_at: Option<Span>,
    #[prost(uint64, tag = "11")]
    revision: u64,
    #[prost(string, optional, tag = "12")]
    session_id: Option<String>,
    #[prost(string, repeated, tag = "13")]
    federates_with: Vec<String>,
    /// Always true, and the last field written: a record cut between two of its fields (which
    /// protobuf alone would read as a record with fewer fields) lacks it.
    #[prost(bool, tag = "15")]
    end: bool,
}

/// A [`Change`] as stored: the entry's version after an upsert, its last one for a deletion;
/// or, for an upsert whose version is still the entry's record in `entries`, only the entry's
/// id ([`StoredChange::Current`]).
#[derive(Clone, PartialEq, Message)]
struct ChangeRecord {
    #[prost(uint64, tag = "1")]
    revision: u64,
    #[prost(bool, tag = "2")]
    deleted: bool,
    /// Absent in a record of [`StoredChange::Current`].
    #[prost(message, optional, tag = "3")]
    entry: Option<EntryRecord>,
    /// Set only in a record of [`StoredChange::Current`]: the 16 bytes of the entry's id.
    #[prost(bytes = "vec", tag = "4")]
    current_entry_id: Vec<u8>,
}

/// A record of the change feed as stored.
// Decoded and consumed at once, never kept in numbers: not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum StoredChange {
    /// The change with its entry.
    Change(Change),
    /// The upsert of entry `id` at `revision`, whose version is the entry's record in
    /// `entries` (whose own revision is `revision`). When that record is replaced or removed,
    /// the same transaction writes the change again as [`StoredChange::Change`], so a record
    /// of this kind always names a record at its revision. (Changes are most often the
    /// entry's latest version: the feed holds them without a second copy of the entry.)
    Current { revision: u64, id: EntryId },
}

/// An [`AuditRecord`] as stored (its `hash` covers its canonical encoding, not this one).
#[derive(Clone, PartialEq, Message)]
struct AuditRecordBin {
    #[prost(string, tag = "1")]
    chain_id: String,
    #[prost(uint64, tag = "2")]
    sequence: u64,
    /// Since the Unix epoch; always present.
    #[prost(message, optional, tag = "3")]
    time: Option<Span>,
    #[prost(string, tag = "4")]
    actor: String,
    #[prost(string, tag = "5")]
    action: String,
    #[prost(string, tag = "6")]
    subject: String,
    /// A JSON object, as `serde_json` writes it.
    #[prost(bytes = "vec", tag = "7")]
    details: Vec<u8>,
    /// 32 bytes.
    #[prost(bytes = "vec", tag = "8")]
    prev_hash: Vec<u8>,
    /// 32 bytes.
    #[prost(bytes = "vec", tag = "9")]
    hash: Vec<u8>,
}

/// Consecutive audit records, stored as one value under the first one's sequence (the form
/// [`AUDIT_RUN_V1`]).
#[derive(Clone, PartialEq, Message)]
struct AuditRunBin {
    #[prost(message, repeated, tag = "1")]
    records: Vec<AuditRecordBin>,
    /// How many records; written after them, so that a run cut short (which protobuf alone
    /// would read as a shorter run) lacks it or disagrees.
    #[prost(uint64, tag = "2")]
    count: u64,
}

/// A duration, or a time as the duration since the Unix epoch (`nanos` below 10^9).
#[derive(Clone, Copy, PartialEq, Message)]
struct Span {
    #[prost(uint64, tag = "1")]
    secs: u64,
    #[prost(uint32, tag = "2")]
    nanos: u32,
}

/// The record of an entry in the `entries` tree, whose key is the entry's id: the record
/// leaves its id out (a third of what the change feed's copy of an entry used to add).
pub(super) fn encode_entry(entry: &RegistrationEntry) -> Result<Vec<u8>, StoreError> {
    let mut record = EntryRecord::of(entry, "entry")?;
    record.id = String::new();
    Ok(versioned(&record))
}

/// An entry record of the `entries` tree under `key`, binary or JSON. A record without an id
/// (as this build writes them) takes its key's; a record with one (as earlier builds wrote
/// them) must be under it.
pub(super) fn decode_entry(key: &[u8], bytes: &[u8]) -> Result<RegistrationEntry, StoreError> {
    const WHAT: &str = "entry";
    let entry = by_form(WHAT, bytes, |message| {
        let mut record = EntryRecord::decode(message).map_err(|error| corrupt(WHAT, error))?;
        if record.id.is_empty() {
            record.id = String::from_utf8(key.to_vec())
                .map_err(|_| corrupt(WHAT, "a key that is not an entry id"))?;
        }
        record.into_entry(WHAT)
    })?;
    if entry.id.as_str().as_bytes() != key {
        return Err(corrupt(WHAT, "a record under another entry's id"));
    }
    Ok(entry)
}

impl StoredChange {
    /// The revision the change is stored under.
    pub(crate) fn revision(&self) -> u64 {
        match self {
            Self::Change(change) => change.revision,
            Self::Current { revision, .. } => *revision,
        }
    }
}

/// The record of a change of the feed.
pub(crate) fn encode_change(change: &StoredChange) -> Result<Vec<u8>, StoreError> {
    const WHAT: &str = "change";
    Ok(versioned(&match change {
        StoredChange::Change(change) => {
            let (deleted, entry) = match &change.kind {
                ChangeKind::EntryUpserted(entry) => (false, entry),
                ChangeKind::EntryDeleted(entry) => (true, entry),
            };
            ChangeRecord {
                revision: change.revision,
                deleted,
                entry: Some(EntryRecord::of(entry, WHAT)?),
                current_entry_id: Vec::new(),
            }
        }
        StoredChange::Current { revision, id } => ChangeRecord {
            revision: *revision,
            deleted: false,
            entry: None,
            current_entry_id: id.to_bytes().to_vec(),
        },
    }))
}

/// A change record, binary or JSON (which is always a [`StoredChange::Change`]).
pub(crate) fn decode_change(bytes: &[u8]) -> Result<StoredChange, StoreError> {
    const WHAT: &str = "change";
    let binary = |message: &[u8]| {
        let record = ChangeRecord::decode(message).map_err(|error| corrupt(WHAT, error))?;
        match (record.entry, record.current_entry_id.as_slice()) {
            (Some(entry), []) => {
                let entry = entry.into_entry(WHAT)?;
                Ok(StoredChange::Change(Change {
                    revision: record.revision,
                    kind: if record.deleted {
                        ChangeKind::EntryDeleted(entry)
                    } else {
                        ChangeKind::EntryUpserted(entry)
                    },
                }))
            }
            (None, id) if !id.is_empty() && !record.deleted => Ok(StoredChange::Current {
                revision: record.revision,
                id: EntryId::from_bytes(
                    id.try_into()
                        .map_err(|_| corrupt(WHAT, "an entry id that is not 16 bytes"))?,
                ),
            }),
            (None, []) => Err(corrupt(WHAT, "no entry")),
            _ => Err(corrupt(WHAT, "both an entry and a current entry's id")),
        }
    };
    // `by_form`, with the binary form's two kinds.
    match bytes.split_first() {
        Some((&PROTOBUF_V1, message)) => binary(message),
        Some((&JSON_OBJECT, _)) => super::decode(WHAT, bytes).map(StoredChange::Change),
        _ => Err(unknown_form(WHAT, bytes)),
    }
}

/// The record of a sealed audit record, stored alone (as builds before [`AUDIT_RUN_V1`] stored
/// every record; this build writes runs, [`encode_audit_runs`]).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn encode_audit(record: &AuditRecord) -> Result<Vec<u8>, StoreError> {
    Ok(versioned(&AuditRecordBin::of(record)?))
}

/// The stored values of sealed `records` (consecutive, in order): runs of records of about
/// `run_bytes` each (a run ends with the record that takes it to `run_bytes` or over), each
/// under its first record's sequence.
pub(crate) fn encode_audit_runs(
    records: &[AuditRecord],
    run_bytes: usize,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut values = Vec::new();
    let mut run = AuditRunBin::default();
    let (mut first, mut bytes) = (0, 0);
    for record in records {
        if run.records.is_empty() {
            first = record.sequence;
        }
        let record = AuditRecordBin::of(record)?;
        bytes += prost::encoding::message::encoded_len(1, &record);
        run.records.push(record);
        if bytes >= run_bytes {
            values.push((first, run_value(&mut run)));
            bytes = 0;
        }
    }
    if !run.records.is_empty() {
        values.push((first, run_value(&mut run)));
    }
    Ok(values)
}

/// The stored value of sealed `records` (consecutive, in order) as one run, however large; no
/// records make no run.
pub(crate) fn encode_audit_run(records: &[AuditRecord]) -> Result<Vec<u8>, StoreError> {
    encode_audit_runs(records, usize::MAX)?
        .pop()
        .map(|(_, value)| value)
        .ok_or_else(|| corrupt(AUDIT, "an empty run of records"))
}

/// An audit record stored alone, binary or JSON.
pub(crate) fn decode_audit(bytes: &[u8]) -> Result<AuditRecord, StoreError> {
    no_floats(by_form(AUDIT, bytes, |message| {
        AuditRecordBin::decode(message)
            .map_err(|e| corrupt(AUDIT, e))?
            .into_record()
    })?)
}

/// The records of a stored value of the `audit` tree: a run (this build's form), or one record
/// stored alone (earlier builds'). A run that is empty, cut short (its count disagrees) or not
/// of consecutive sequences is corrupt.
pub(crate) fn decode_audit_value(bytes: &[u8]) -> Result<Vec<AuditRecord>, StoreError> {
    let Some((&AUDIT_RUN_V1, message)) = bytes.split_first() else {
        return decode_audit(bytes).map(|record| vec![record]);
    };
    let run = AuditRunBin::decode(message).map_err(|e| corrupt(AUDIT, e))?;
    if run.records.is_empty() || run.count != run.records.len() as u64 {
        return Err(corrupt(
            AUDIT,
            format_args!(
                "a run of {} records that says it holds {}",
                run.records.len(),
                run.count
            ),
        ));
    }
    let records = run
        .records
        .into_iter()
        .map(|record| no_floats(record.into_record()?))
        .collect::<Result<Vec<_>, _>>()?;
    if records
        .windows(2)
        .any(|w| w[0].sequence.checked_add(1) != Some(w[1].sequence))
    {
        return Err(corrupt(
            AUDIT,
            "a run of records whose sequences do not follow",
        ));
    }
    Ok(records)
}

/// `record`, unless its details hold a floating-point number. No audit record is written with
/// one (nor could its hash cover one), and serde_json does not read every float back as
/// written: a float is damage, not a record.
fn no_floats(record: AuditRecord) -> Result<AuditRecord, StoreError> {
    if record.details.values().any(crate::audit::holds_float) {
        return Err(corrupt(AUDIT, "its details hold a floating-point number"));
    }
    Ok(record)
}

/// The stored value of `run` (its count set); leaves `run` empty.
fn run_value(run: &mut AuditRunBin) -> Vec<u8> {
    run.count = run.records.len() as u64;
    let mut bytes = Vec::with_capacity(1 + run.encoded_len());
    bytes.push(AUDIT_RUN_V1);
    // Encoding into a `Vec` cannot run out of room.
    let _ = run.encode(&mut bytes);
    run.records.clear();
    bytes
}

// === impl AuditRecordBin ===

impl AuditRecordBin {
    fn of(record: &AuditRecord) -> Result<Self, StoreError> {
        const WHAT: &str = "audit record";
        Ok(Self {
            chain_id: record.chain_id.clone(),
            sequence: record.sequence,
            time: Some(Span::since_epoch(record.time, WHAT)?),
            actor: record.actor.clone(),
            action: record.action.clone(),
            subject: record.subject.clone(),
            details: serde_json::to_vec(&record.details).map_err(|e| StoreError::Encode {
                what: WHAT,
                reason: e.to_string(),
            })?,
            prev_hash: record.prev_hash.to_vec(),
            hash: record.hash.to_vec(),
        })
    }

    fn into_record(self) -> Result<AuditRecord, StoreError> {
        let bad = |reason: &dyn std::fmt::Display| corrupt(AUDIT, reason);
        let hash = |bytes: Vec<u8>| {
            <[u8; 32]>::try_from(bytes)
                .map_err(|b| bad(&format_args!("a hash of {} bytes", b.len())))
        };
        Ok(AuditRecord {
            chain_id: self.chain_id,
            sequence: self.sequence,
            time: self.time.ok_or_else(|| bad(&"no time"))?.time(AUDIT)?,
            actor: self.actor,
            action: self.action,
            subject: self.subject,
            details: serde_json::from_slice(&self.details).map_err(|e| bad(&e))?,
            prev_hash: hash(self.prev_hash)?,
            hash: hash(self.hash)?,
        })
    }
}

// === impl EntryRecord ===

impl EntryRecord {
    fn of(entry: &RegistrationEntry, what: &'static str) -> Result<Self, StoreError> {
        let time = |at: SystemTime| Span::since_epoch(at, what);
        Ok(Self {
            id: entry.id.as_str().to_owned(),
            spiffe_id: entry.spiffe_id.as_str().to_owned(),
            parent_id: entry.parent_id.as_str().to_owned(),
            selectors: entry.selectors.iter().map(Selector::to_string).collect(),
            x509_svid_ttl: entry.x509_svid_ttl.map(Span::from),
            jwt_svid_ttl: entry.jwt_svid_ttl.map(Span::from),
            dns_names: entry.dns_names.clone(),
            hint: entry.hint.clone(),
            expires_at: entry.expires_at.map(time).transpose()?,
            created_at: Some(time(entry.created_at)?),
            revision: entry.revision,
            session_id: entry.session_id.as_ref().map(|id| id.as_str().to_owned()),
            federates_with: entry
                .federates_with
                .iter()
                .map(TrustDomain::to_string)
                .collect(),
            end: true,
        })
    }

    /// The entry, every value checked.
    fn into_entry(self, what: &'static str) -> Result<RegistrationEntry, StoreError> {
        if !self.end {
            return Err(corrupt(what, "the record ends early"));
        }
        let bad = |error: &dyn std::fmt::Display| corrupt(what, error);
        let time = |span: Span| span.time(what);
        Ok(RegistrationEntry {
            id: EntryId::parse(&self.id).map_err(|e| bad(&e))?,
            spiffe_id: SpiffeId::new(&self.spiffe_id).map_err(|e| bad(&e))?,
            parent_id: SpiffeId::new(&self.parent_id).map_err(|e| bad(&e))?,
            selectors: self
                .selectors
                .iter()
                .map(|s| Selector::parse(s))
                .collect::<Result<SelectorSet, _>>()
                .map_err(|e| bad(&e))?,
            x509_svid_ttl: self.x509_svid_ttl.map(|s| s.duration(what)).transpose()?,
            jwt_svid_ttl: self.jwt_svid_ttl.map(|s| s.duration(what)).transpose()?,
            dns_names: self.dns_names,
            hint: self.hint,
            expires_at: self.expires_at.map(time).transpose()?,
            created_at: time(
                self.created_at
                    .ok_or_else(|| corrupt(what, "no creation time"))?,
            )?,
            revision: self.revision,
            session_id: self
                .session_id
                .map(|id| SessionId::parse(&id))
                .transpose()
                .map_err(|e| bad(&e))?,
            federates_with: self
                .federates_with
                .iter()
                .map(|td| TrustDomain::new(td))
                .collect::<Result<_, _>>()
                .map_err(|e| bad(&e))?,
        })
    }
}

// === impl Span ===

impl Span {
    /// `at` as the time since the Unix epoch; a time before it cannot be stored.
    fn since_epoch(at: SystemTime, what: &'static str) -> Result<Self, StoreError> {
        at.duration_since(UNIX_EPOCH)
            .map(Self::from)
            .map_err(|_| StoreError::Encode {
                what,
                reason: "a time before the Unix epoch".to_owned(),
            })
    }

    /// The time this span after the Unix epoch is.
    fn time(self, what: &'static str) -> Result<SystemTime, StoreError> {
        UNIX_EPOCH
            .checked_add(self.duration(what)?)
            .ok_or_else(|| corrupt(what, "a time out of range"))
    }

    fn duration(self, what: &'static str) -> Result<Duration, StoreError> {
        if self.nanos >= 1_000_000_000 {
            return Err(corrupt(what, "a duration's nanoseconds out of range"));
        }
        Ok(Duration::new(self.secs, self.nanos))
    }
}

impl From<Duration> for Span {
    fn from(duration: Duration) -> Self {
        Self {
            secs: duration.as_secs(),
            nanos: duration.subsec_nanos(),
        }
    }
}

// === helpers ===

/// A record of either form: `binary` reads the message after [`PROTOBUF_V1`], serde reads a
/// JSON object of an earlier build.
fn by_form<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    binary: impl FnOnce(&[u8]) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&PROTOBUF_V1, message)) => binary(message),
        Some((&JSON_OBJECT, _)) => super::decode(what, bytes),
        _ => Err(unknown_form(what, bytes)),
    }
}

/// Reads `bytes` as each kind of record; each kind that decodes must be written and read back
/// as the same value (what the store reads it can rewrite unchanged). Returns how many kinds
/// decoded; `Err` says which value did not come back. For the fuzz target
/// (`fuzz/fuzz_targets/store_records.rs`) and the byte-mutation test.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn round_trips(bytes: &[u8]) -> Result<usize, String> {
    fn check<T: PartialEq + std::fmt::Debug>(
        bytes: &[u8],
        encode: impl Fn(&T) -> Result<Vec<u8>, StoreError>,
        decode: impl Fn(&[u8]) -> Result<T, StoreError>,
    ) -> Result<usize, String> {
        let Ok(value) = decode(bytes) else {
            return Ok(0);
        };
        let written =
            encode(&value).map_err(|e| format!("{value:?} was read but not written: {e}"))?;
        match decode(&written) {
            Ok(back) if back == value => Ok(1),
            Ok(back) => Err(format!("{value:?} was written and read back as {back:?}")),
            Err(e) => Err(format!("{value:?} was written and could not be read: {e}")),
        }
    }
    /// The key the fuzzed bytes are read under as an entry record.
    const KEY: &[u8] = b"00112233445566778899aabbccddeeff";
    Ok(
        check(bytes, encode_entry, |bytes| decode_entry(KEY, bytes))?
            + check(bytes, encode_change, decode_change)?
            + check(bytes, encode_audit, decode_audit)?
            + check(
                bytes,
                |records: &Vec<AuditRecord>| encode_audit_run(records),
                decode_audit_value,
            )?,
    )
}

fn versioned(message: &impl Message) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + message.encoded_len());
    bytes.push(PROTOBUF_V1);
    // Encoding into a `Vec` cannot run out of room.
    let _ = message.encode(&mut bytes);
    bytes
}

fn corrupt(what: &'static str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        reason: reason.to_string(),
    }
}

fn unknown_form(what: &'static str, bytes: &[u8]) -> StoreError {
    corrupt(
        what,
        match bytes.first() {
            None => "an empty record".to_owned(),
            Some(byte) => {
                format!("unknown record form 0x{byte:02x} (written by a newer version of Sigil?)")
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewEntry;

    fn entry_with_every_field() -> RegistrationEntry {
        let id = |s: &str| SpiffeId::new(s).unwrap();
        let mut new = NewEntry::new(
            id("spiffe://example.org/db/primary"),
            id("spiffe://example.org/sigil/agent/join_token/a"),
            ["unix:uid:1000", "k8s:ns:prod", "docker:label:a:b:c"]
                .iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect(),
        );
        new.x509_svid_ttl = Some(Duration::new(600, 7));
        new.jwt_svid_ttl = Some(Duration::from_secs(300));
        new.dns_names = vec!["db.example.org".to_owned(), "db".to_owned()];
        new.hint = "primary \"db\"\n".to_owned();
        new.expires_at = Some(UNIX_EPOCH + Duration::new(1_900_000_000, 123_456_789));
        new.session_id = Some(SessionId::parse("0123456789abcdef0123456789abcdef").unwrap());
        new.federates_with = vec![
            TrustDomain::new("partner.example").unwrap(),
            TrustDomain::new("other.example").unwrap(),
        ];
        RegistrationEntry::from_new(
            EntryId::generate().unwrap(),
            new,
            UNIX_EPOCH + Duration::new(1_800_000_000, 5),
            42,
        )
    }

    fn entry_with_no_optional_field() -> RegistrationEntry {
        let id = |s: &str| SpiffeId::new(s).unwrap();
        RegistrationEntry::from_new(
            EntryId::generate().unwrap(),
            NewEntry::new(
                id("spiffe://example.org/web"),
                id("spiffe://example.org/sigil/agent/join_token/a"),
                [Selector::parse("unix:uid:1000").unwrap()]
                    .into_iter()
                    .collect(),
            ),
            UNIX_EPOCH,
            1,
        )
    }

    #[test]
    fn an_entry_reads_back_as_written_in_either_form() {
        for entry in [entry_with_every_field(), entry_with_no_optional_field()] {
            let key = entry.id.as_str().as_bytes();
            let binary = encode_entry(&entry).unwrap();
            assert_eq!(binary[0], PROTOBUF_V1);
            assert_eq!(decode_entry(key, &binary).unwrap(), entry);
            // The id is the key's: not in the record.
            assert!(!binary.windows(key.len()).any(|w| w == key));
            // A record of a build before the binary form.
            let json = serde_json::to_vec(&entry).unwrap();
            assert_eq!(decode_entry(key, &json).unwrap(), entry);
            // Under another key, either form is corrupt; a record with no id takes its key's.
            let other = EntryId::generate().unwrap();
            let other = other.as_str().as_bytes();
            for bytes in [
                versioned(&EntryRecord::of(&entry, "entry").unwrap()),
                json.clone(),
            ] {
                assert!(matches!(
                    decode_entry(other, &bytes),
                    Err(StoreError::Corrupt { what: "entry", .. })
                ));
            }
            assert_eq!(
                decode_entry(other, &binary).unwrap().id.as_str().as_bytes(),
                other
            );
            assert!(matches!(
                decode_entry(b"not an id", &binary),
                Err(StoreError::Corrupt { what: "entry", .. })
            ));
            assert!(
                binary.len() * 2 < json.len(),
                "binary {} B, JSON {} B",
                binary.len(),
                json.len()
            );
        }
    }

    #[test]
    fn a_change_reads_back_as_written_in_either_form() {
        let entry = entry_with_every_field();
        for change in [
            Change {
                revision: 42,
                kind: ChangeKind::EntryUpserted(entry.clone()),
            },
            Change {
                revision: 43,
                kind: ChangeKind::EntryDeleted(entry.clone()),
            },
        ] {
            let json = serde_json::to_vec(&change).unwrap();
            let change = StoredChange::Change(change);
            let binary = encode_change(&change).unwrap();
            assert_eq!(binary[0], PROTOBUF_V1);
            assert_eq!(decode_change(&binary).unwrap(), change);
            assert_eq!(decode_change(&json).unwrap(), change);
        }
        // The upsert that names the entry's record: the id and revision alone, a fraction of
        // the full change.
        let current = StoredChange::Current {
            revision: 44,
            id: entry.id.clone(),
        };
        let binary = encode_change(&current).unwrap();
        assert_eq!(decode_change(&binary).unwrap(), current);
        assert!(binary.len() <= 24, "{} B", binary.len());
        // An entry record is not a change record, nor is a record with neither or both forms,
        // or a deletion by reference.
        let neither = versioned(&ChangeRecord {
            revision: 45,
            ..ChangeRecord::default()
        });
        let both = versioned(&ChangeRecord {
            revision: 46,
            entry: Some(EntryRecord::of(&entry, "change").unwrap()),
            current_entry_id: entry.id.to_bytes().to_vec(),
            ..ChangeRecord::default()
        });
        let deleted = versioned(&ChangeRecord {
            revision: 47,
            deleted: true,
            current_entry_id: entry.id.to_bytes().to_vec(),
            ..ChangeRecord::default()
        });
        let bad_id = versioned(&ChangeRecord {
            revision: 48,
            current_entry_id: vec![0; 15],
            ..ChangeRecord::default()
        });
        for bytes in [
            encode_entry(&entry).unwrap(),
            neither,
            both,
            deleted,
            bad_id,
        ] {
            assert!(matches!(
                decode_change(&bytes),
                Err(StoreError::Corrupt { what: "change", .. })
            ));
        }
    }

    /// Damaged or foreign bytes are a clear error, never a panic or an entry that could not
    /// have been written.
    #[test]
    fn a_damaged_record_is_corrupt() {
        let entry = entry_with_every_field();
        let good = EntryRecord::of(&entry, "entry").unwrap();
        let with = |f: &dyn Fn(&mut EntryRecord)| {
            let mut record = good.clone();
            f(&mut record);
            versioned(&record)
        };
        let binary = encode_entry(&entry).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("unknown version", [&[0x02][..], &binary[1..]].concat()),
            ("truncated", binary[..binary.len() - 3].to_vec()),
            ("bad id", with(&|r| r.id = "not-hex".to_owned())),
            (
                "bad SPIFFE ID",
                with(&|r| r.spiffe_id = "https://example.org/x".to_owned()),
            ),
            ("bad parent", with(&|r| r.parent_id = String::new())),
            (
                "bad selector",
                with(&|r| r.selectors.push("nocolon".to_owned())),
            ),
            (
                "bad nanos",
                with(&|r| {
                    r.x509_svid_ttl = Some(Span {
                        secs: u64::MAX,
                        nanos: 1_000_000_000,
                    });
                }),
            ),
            (
                "time out of range",
                with(&|r| {
                    r.expires_at = Some(Span {
                        secs: u64::MAX,
                        nanos: 0,
                    });
                }),
            ),
            ("no creation time", with(&|r| r.created_at = None)),
            (
                "bad session",
                with(&|r| r.session_id = Some("x".to_owned())),
            ),
            (
                "bad trust domain",
                with(&|r| r.federates_with.push("Bad Domain".to_owned())),
            ),
            ("bad JSON", b"{\"id\":".to_vec()),
        ];
        let key = entry.id.as_str().as_bytes();
        for (case, bytes) in cases {
            assert!(
                matches!(
                    decode_entry(key, &bytes),
                    Err(StoreError::Corrupt { what: "entry", .. })
                ),
                "{case}: {:?}",
                decode_entry(key, &bytes)
            );
        }
        let unknown = decode_entry(key, &[0x7f, 1, 2]).unwrap_err().to_string();
        assert!(unknown.contains("unknown record form 0x7f"), "{unknown}");
    }

    /// Every byte of a valid record of each kind, changed in several ways: the decoders never
    /// panic, and whatever still decodes is a value the store can write and read back as is.
    #[test]
    fn a_changed_byte_anywhere_never_panics_and_what_decodes_round_trips() {
        let entry = entry_with_every_field();
        let records = [
            encode_entry(&entry).unwrap(),
            encode_change(&StoredChange::Change(Change {
                revision: 9,
                kind: ChangeKind::EntryUpserted(entry.clone()),
            }))
            .unwrap(),
            encode_change(&StoredChange::Current {
                revision: 10,
                id: entry.id.clone(),
            })
            .unwrap(),
            encode_audit(&sealed_audit_record()).unwrap(),
            encode_audit_run(&sealed_audit_run()).unwrap(),
        ];
        let mut decoded = 0;
        for record in &records {
            for at in 0..record.len() {
                for change in [0x00, 0xff, 0x01, 0x80, 0x7f] {
                    let mut bytes = record.clone();
                    bytes[at] = match change {
                        0x00 | 0xff => change,
                        flip => bytes[at] ^ flip,
                    };
                    decoded += round_trips(&bytes).unwrap();
                }
            }
        }
        // Some changes land in free text (a hint, a detail) and still decode: the round trip
        // above was exercised.
        assert!(decoded > 0);
    }

    /// A record cut anywhere, even between two fields, is corrupt (the end marker).
    #[test]
    fn a_record_cut_short_anywhere_is_corrupt() {
        let entry = entry_with_every_field();
        let binary = encode_entry(&entry).unwrap();
        for len in 0..binary.len() {
            assert!(
                matches!(
                    decode_entry(entry.id.as_str().as_bytes(), &binary[..len]),
                    Err(StoreError::Corrupt { what: "entry", .. })
                ),
                "cut at {len} of {}",
                binary.len()
            );
        }
        let change = encode_change(&StoredChange::Change(Change {
            revision: 42,
            kind: ChangeKind::EntryDeleted(entry.clone()),
        }))
        .unwrap();
        for len in 0..change.len() {
            assert!(
                decode_change(&change[..len]).is_err(),
                "change cut at {len}"
            );
        }
        // A reference cut inside its id no longer names an id. (Cut before its id, it is a
        // record with neither form; cut after the version byte only, one with no entry.)
        let current = encode_change(&StoredChange::Current {
            revision: 43,
            id: entry.id.clone(),
        })
        .unwrap();
        for len in 0..current.len() {
            assert!(
                decode_change(&current[..len]).is_err(),
                "reference cut at {len}"
            );
        }
        let audit = encode_audit(&sealed_audit_record()).unwrap();
        for len in 0..audit.len() {
            assert!(decode_audit(&audit[..len]).is_err(), "audit cut at {len}");
        }
        let run = encode_audit_run(&sealed_audit_run()).unwrap();
        assert_eq!(decode_audit_value(&run).unwrap(), sealed_audit_run());
        for len in 0..run.len() {
            assert!(decode_audit_value(&run[..len]).is_err(), "run cut at {len}");
        }
    }

    /// A run whose sequences do not follow one another is corrupt.
    #[test]
    fn a_run_of_records_out_of_sequence_is_corrupt() {
        let mut run = sealed_audit_run();
        run.swap(1, 2);
        let value = encode_audit_run(&run).unwrap();
        assert!(matches!(
            decode_audit_value(&value),
            Err(StoreError::Corrupt { reason, .. }) if reason.contains("do not follow")
        ));
        let mut gap = sealed_audit_run();
        gap.remove(1);
        assert!(decode_audit_value(&encode_audit_run(&gap).unwrap()).is_err());
    }

    fn fixture_entry() -> RegistrationEntry {
        let id = |s: &str| SpiffeId::new(s).unwrap();
        RegistrationEntry {
            id: EntryId::parse("00112233445566778899aabbccddeeff").unwrap(),
            spiffe_id: id("spiffe://example.org/db"),
            parent_id: id("spiffe://example.org/agent"),
            selectors: ["unix:uid:1000", "k8s:ns:prod"]
                .iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect(),
            x509_svid_ttl: Some(Duration::from_secs(600)),
            jwt_svid_ttl: None,
            dns_names: vec!["db.example.org".to_owned()],
            hint: "primary".to_owned(),
            expires_at: Some(UNIX_EPOCH + Duration::new(1_900_000_000, 5)),
            created_at: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            revision: 7,
            session_id: Some(SessionId::parse("ffeeddccbbaa99887766554433221100").unwrap()),
            federates_with: vec![TrustDomain::new("partner.example").unwrap()],
        }
    }

    /// Records as stores already hold them decode to what they held: a change of the encodings
    /// (a tag, a type, a serde field name) that would misread a store on disk fails here.
    #[test]
    fn records_on_disk_keep_their_meaning() {
        let expected = fixture_entry();
        let key = expected.id.as_str().as_bytes();
        // The binary form (version 1) with the id, as builds before layout 3 wrote it.
        let binary = sigil_core::hex::decode(ENTRY_V1).unwrap();
        assert_eq!(decode_entry(key, &binary).unwrap(), expected);
        // As this build writes it: the same without the id (field 1, first: `0a 20`, then
        // the 32 characters).
        let without_id = format!("01{}", &ENTRY_V1[2 + 4 + 64..]);
        assert_eq!(&ENTRY_V1[2..6], "0a20");
        assert_eq!(
            sigil_core::hex::encode(&encode_entry(&expected).unwrap()),
            without_id
        );
        let binary = sigil_core::hex::decode(&without_id).unwrap();
        assert_eq!(decode_entry(key, &binary).unwrap(), expected);
        let change = sigil_core::hex::decode(CHANGE_V1).unwrap();
        assert_eq!(
            decode_change(&change).unwrap(),
            StoredChange::Change(Change {
                revision: 8,
                kind: ChangeKind::EntryDeleted(expected.clone()),
            })
        );
        // An upsert naming the entry's record: revision 9 (field 1), the id's 16 bytes
        // (field 4).
        let current = StoredChange::Current {
            revision: 9,
            id: expected.id.clone(),
        };
        let bytes = concat!("01", "0809", "2210", "00112233445566778899aabbccddeeff");
        assert_eq!(
            decode_change(&sigil_core::hex::decode(bytes).unwrap()).unwrap(),
            current
        );
        assert_eq!(
            sigil_core::hex::encode(&encode_change(&current).unwrap()),
            bytes
        );
        // JSON as builds before the binary form wrote it (no session or federation fields:
        // they were left out when unset).
        let mut plain = expected.clone();
        plain.session_id = None;
        plain.federates_with = Vec::new();
        plain.jwt_svid_ttl = Some(Duration::from_secs(300));
        assert_eq!(decode_entry(key, ENTRY_JSON.as_bytes()).unwrap(), plain);
        // An audit record in each form.
        let audit = decode_audit(&sigil_core::hex::decode(AUDIT_V1).unwrap()).unwrap();
        assert_eq!(audit, decode_audit(AUDIT_JSON.as_bytes()).unwrap());
        assert_eq!(audit.compute_hash().unwrap(), audit.hash);
        assert_eq!(
            (
                audit.sequence,
                audit.subject.as_str(),
                audit.details["ttl"].as_u64()
            ),
            (7, "0123", Some(600))
        );
    }

    const ENTRY_V1: &str = concat!(
        "010a2030303131323233333434353536363737383839396161626263636464656566661217737069",
        "6666653a2f2f6578616d706c652e6f72672f64621a1a7370696666653a2f2f6578616d706c652e6f",
        "72672f6167656e74220b6b38733a6e733a70726f64220d756e69783a7569643a313030302a0308d8",
        "043a0e64622e6578616d706c652e6f726742077072696d6172794a080880e6fe8907100552060880",
        "a4a7da06580762206666656564646363626261613939383837373636353534343333323231313030",
        "6a0f706172746e65722e6578616d706c657801",
    );
    const CHANGE_V1: &str = concat!(
        "01080810011ada010a20303031313232333334343535363637373838393961616262636364646565",
        "666612177370696666653a2f2f6578616d706c652e6f72672f64621a1a7370696666653a2f2f6578",
        "616d706c652e6f72672f6167656e74220b6b38733a6e733a70726f64220d756e69783a7569643a31",
        "3030302a0308d8043a0e64622e6578616d706c652e6f726742077072696d6172794a080880e6fe89",
        "07100552060880a4a7da065807622066666565646463636262616139393838373736363535343433",
        "333232313130306a0f706172746e65722e6578616d706c657801",
    );
    const ENTRY_JSON: &str = r#"{"id":"00112233445566778899aabbccddeeff","spiffe_id":"spiffe://example.org/db","parent_id":"spiffe://example.org/agent","selectors":["k8s:ns:prod","unix:uid:1000"],"x509_svid_ttl":{"secs":600,"nanos":0},"jwt_svid_ttl":{"secs":300,"nanos":0},"dns_names":["db.example.org"],"hint":"primary","expires_at":{"secs_since_epoch":1900000000,"nanos_since_epoch":5},"created_at":{"secs_since_epoch":1800000000,"nanos_since_epoch":0},"revision":7}"#;
    const AUDIT_V1: &str = concat!(
        "010a087365727665722d6110071a0c0880a4a7da0610ff93ebdc0322057569643a302a0c656e7472",
        "792e6372656174653204303132333a5e7b227370696666655f6964223a227370696666653a2f2f65",
        "78616d706c652e6f72672f6462222c2273656c6563746f7273223a5b22756e69783a7569643a3130",
        "3030222c226b38733a6e733a5c22715c22225d2c2274746c223a3630307d42200303030303030303",
        "0303030303030303030303030303030303030303030303034a2047f152b2c8efe08821141fb459c5",
        "8ad2b6e3d630a6c18bd8dc3ac067732f88df",
    );
    const AUDIT_JSON: &str = r#"{"chain_id":"server-a","sequence":7,"time":{"secs_since_epoch":1800000000,"nanos_since_epoch":999999999},"actor":"uid:0","action":"entry.create","subject":"0123","details":{"spiffe_id":"spiffe://example.org/db","selectors":["unix:uid:1000","k8s:ns:\"q\""],"ttl":600},"prev_hash":"0303030303030303030303030303030303030303030303030303030303030303","hash":"47f152b2c8efe08821141fb459c58ad2b6e3d630a6c18bd8dc3ac067732f88df"}"#;

    /// Three records sealed one after the other, from sequence 7.
    fn sealed_audit_run() -> Vec<AuditRecord> {
        let mut prev_hash = [3; 32];
        (7..10)
            .map(|sequence| {
                let record = crate::audit::NewAuditRecord::new("uid:0", "entry.delete", "0123")
                    .detail("n", sequence)
                    .seal(
                        "server-a",
                        sequence,
                        UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                        prev_hash,
                    )
                    .unwrap();
                prev_hash = record.hash;
                record
            })
            .collect()
    }

    fn sealed_audit_record() -> AuditRecord {
        crate::audit::NewAuditRecord::new("uid:0", "entry.create", "0123")
            .detail("spiffe_id", "spiffe://example.org/db")
            .detail(
                "selectors",
                serde_json::json!(["unix:uid:1000", "k8s:ns:\"q\""]),
            )
            .detail("ttl", 600)
            .seal(
                "server-a",
                7,
                UNIX_EPOCH + Duration::new(1_800_000_000, 999_999_999),
                [3; 32],
            )
            .unwrap()
    }

    #[test]
    fn an_audit_record_reads_back_as_written_in_either_form_and_its_hash_holds() {
        let record = sealed_audit_record();
        let binary = encode_audit(&record).unwrap();
        assert_eq!(binary[0], PROTOBUF_V1);
        let read = decode_audit(&binary).unwrap();
        assert_eq!(read, record);
        assert_eq!(read.compute_hash().unwrap(), record.hash);
        let json = serde_json::to_vec(&record).unwrap();
        assert_eq!(decode_audit(&json).unwrap(), record);
        assert!(
            binary.len() * 10 < json.len() * 7,
            "binary {} B, JSON {} B",
            binary.len(),
            json.len()
        );
    }

    #[test]
    fn a_damaged_audit_record_is_corrupt() {
        let record = sealed_audit_record();
        let binary = encode_audit(&record).unwrap();
        let good = AuditRecordBin::decode(&binary[1..]).unwrap();
        let with = |f: &dyn Fn(&mut AuditRecordBin)| {
            let mut record = good.clone();
            f(&mut record);
            versioned(&record)
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", binary[..binary.len() - 1].to_vec()),
            ("short hash", with(&|r| r.hash.truncate(31))),
            ("long prev hash", with(&|r| r.prev_hash.push(0))),
            ("no time", with(&|r| r.time = None)),
            ("details not JSON", with(&|r| r.details = b"{".to_vec())),
            (
                "details not an object",
                with(&|r| r.details = b"[1]".to_vec()),
            ),
            (
                "nanoseconds out of range",
                with(&|r| {
                    r.time = Some(Span {
                        secs: u64::MAX,
                        nanos: 1_000_000_000,
                    });
                }),
            ),
            (
                "time out of range",
                with(&|r| {
                    r.time = Some(Span {
                        secs: u64::MAX,
                        nanos: 0,
                    });
                }),
            ),
            (
                "a float in the details",
                with(&|r| r.details = br#"{"x":{"y":[1e-307]}}"#.to_vec()),
            ),
            (
                "a float in the details of a JSON record",
                AUDIT_JSON
                    .replace(r#""ttl":600"#, r#""ttl":0.5"#)
                    .into_bytes(),
            ),
            ("unknown form", vec![0x09]),
            ("empty", Vec::new()),
        ];
        for (case, bytes) in cases {
            assert!(
                matches!(
                    decode_audit(&bytes),
                    Err(StoreError::Corrupt { what: "audit", .. })
                ),
                "{case}: {:?}",
                decode_audit(&bytes)
            );
        }
    }
}
