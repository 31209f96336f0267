use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::json;

use super::*;

pub(crate) fn key_pair() -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap()
}

fn t(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::new(1_700_000_000 + seconds, 123_456_789)
}

/// A chain of `n` records, sealed as the store seals them.
fn chain(n: u64) -> Vec<AuditRecord> {
    let mut prev = GENESIS_HASH;
    (1..=n)
        .map(|sequence| {
            let record =
                NewAuditRecord::new("uid:0", action::ENTRY_CREATE, format!("entry-{sequence}"))
                    .detail("spiffe_id", format!("spiffe://example.org/w/{sequence}"))
                    .detail("revision", sequence)
                    .seal("default", sequence, t(sequence), prev)
                    .unwrap();
            prev = record.hash;
            record
        })
        .collect()
}

/// A checkpoint of `record`, signed by `key` 30 s after it, at a whole second.
pub(crate) fn checkpoint(key: &EcdsaKeyPair, record: &AuditRecord) -> AuditCheckpoint {
    signed(
        key,
        &record.chain_id,
        record.sequence,
        record.hash,
        record.time,
    )
}

/// The genesis checkpoint of chain `default`, signed by `key`.
pub(crate) fn genesis(key: &EcdsaKeyPair) -> AuditCheckpoint {
    signed(key, DEFAULT_CHAIN_ID, 0, GENESIS_HASH, t(0))
}

fn signed(
    key: &EcdsaKeyPair,
    chain_id: &str,
    sequence: u64,
    hash: [u8; 32],
    after: SystemTime,
) -> AuditCheckpoint {
    let seconds = after.duration_since(UNIX_EPOCH).unwrap().as_secs() + 30;
    let time = UNIX_EPOCH + Duration::from_secs(seconds);
    let message = AuditCheckpoint::signed_message(chain_id, sequence, &hash, time).unwrap();
    AuditCheckpoint {
        chain_id: chain_id.to_owned(),
        sequence,
        hash,
        time,
        key_id: AUDIT_KEY_ID.to_owned(),
        public_key: key.public_key().as_ref().to_vec(),
        signature: key
            .sign(&SystemRandom::new(), &message)
            .unwrap()
            .as_ref()
            .to_vec(),
    }
}

/// Re-seals `records[from..]` after an edit, as someone who can write the store would.
fn reseal_from(records: &mut [AuditRecord], from: usize) {
    for i in from..records.len() {
        if i > 0 {
            records[i].prev_hash = records[i - 1].hash;
        }
        records[i].hash = records[i].compute_hash().unwrap();
    }
}

fn violation(result: Result<VerifySummary, Violation>) -> Violation {
    result.expect_err("verification must fail")
}

#[test]
fn a_log_passes_from_its_genesis_checkpoint_and_fails_without_any() {
    let key = key_pair();
    let public = key.public_key().as_ref();
    // An empty log, before and after its genesis checkpoint.
    assert_eq!(
        verify(Vec::<AuditRecord>::new(), &[], public)
            .unwrap()
            .records,
        0
    );
    let genesis = genesis(&key);
    let summary = verify(
        Vec::<AuditRecord>::new(),
        std::slice::from_ref(&genesis),
        public,
    )
    .unwrap();
    assert_eq!((summary.checkpoints, summary.unsigned_records), (1, 0));

    // Records after the genesis checkpoint only: verified, and counted as unsigned.
    let records = chain(5);
    let summary = verify(&records, std::slice::from_ref(&genesis), public).unwrap();
    assert_eq!(summary.records, 5);
    assert_eq!(summary.unsigned_records, 5);
    assert_eq!(summary.head.unwrap().hash, records[4].hash);
    assert_eq!(summary.checkpoint.unwrap().sequence, 0);

    // Records and no checkpoint at all: the genesis one was deleted.
    let v = violation(verify(&records, &[], public));
    assert_eq!((v.sequence, v.kind), (1, ViolationKind::NoCheckpoint));

    // Every checkpoint is checked, the latest is reported.
    let cp2 = checkpoint(&key, &records[1]);
    let cp4 = checkpoint(&key, &records[3]);
    let summary = verify(&records, &[cp4, genesis.clone(), cp2.clone()], public).unwrap();
    assert_eq!(summary.records, 5);
    assert_eq!(summary.checkpoints, 3);
    assert_eq!(summary.unsigned_records, 1);
    let info = summary.checkpoint.unwrap();
    assert_eq!(info.sequence, 4);
    assert_eq!(info.key_fingerprint, key_fingerprint(public));

    // An older checkpoint that no longer matches is caught though a later one matches:
    // records 1..=2 were rewritten and everything after resealed, then the later checkpoint
    // re-signed (by a thief of the key), the earlier one left alone.
    let mut rewritten = records.clone();
    rewritten[0].subject = "entry-rewritten".into();
    reseal_from(&mut rewritten, 0);
    let resigned = checkpoint(&key, &rewritten[3]);
    let v = violation(verify(
        &rewritten,
        &[genesis.clone(), cp2, resigned],
        public,
    ));
    assert_eq!((v.sequence, v.kind), (2, ViolationKind::CheckpointMismatch));

    // A genesis checkpoint must name the hash of nothing.
    let mut bad_genesis = genesis;
    bad_genesis.hash = records[0].hash;
    let v = violation(verify(&records, &[bad_genesis], public));
    assert_eq!(v.sequence, 0);
    assert!(
        matches!(
            v.kind,
            ViolationKind::CheckpointSignatureInvalid | ViolationKind::CheckpointMismatch
        ),
        "{v}"
    );
}

#[test]
fn records_and_checkpoints_of_another_chain_are_named() {
    let key = key_pair();
    let public = key.public_key().as_ref();
    let mut records = chain(3);
    let genesis = genesis(&key);
    // A record moved in from another chain (its hash recomputed: the chain id is hashed).
    records[1].chain_id = "server-b".into();
    reseal_from(&mut records, 1);
    let v = violation(verify(&records, std::slice::from_ref(&genesis), public));
    assert_eq!(
        (v.sequence, v.kind),
        (
            2,
            ViolationKind::WrongChain {
                found: "server-b".into()
            }
        )
    );
    // Moving it without recomputing: the hash gives it away.
    let mut records = chain(3);
    records[1].chain_id = "server-b".into();
    assert_ne!(records[1].compute_hash().unwrap(), records[1].hash);

    // A checkpoint of another chain.
    let records = chain(3);
    let mut other = records.clone();
    other[2].chain_id = "server-b".into();
    let foreign_chain = checkpoint(&key, &other[2]);
    let v = violation(verify(&records, &[genesis, foreign_chain], public));
    assert_eq!(
        (v.sequence, v.kind),
        (
            3,
            ViolationKind::CheckpointWrongChain {
                found: "server-b".into()
            }
        )
    );
}

#[test]
fn links_are_the_previous_records_hash() {
    let records = chain(3);
    assert_eq!(records[0].prev_hash, GENESIS_HASH);
    assert_eq!(records[1].prev_hash, records[0].hash);
    assert_eq!(records[2].prev_hash, records[1].hash);
    assert_ne!(records[1].hash, records[2].hash);
}

#[test]
fn a_modified_detail_is_named() {
    let key = key_pair();
    let mut records = chain(6);
    let cp = checkpoint(&key, &records[5]);
    records[2]
        .details
        .insert("spiffe_id".into(), json!("spiffe://example.org/evil"));
    let v = violation(verify(
        &records,
        std::slice::from_ref(&cp),
        key.public_key().as_ref(),
    ));
    assert_eq!(v.sequence, 3);
    assert_eq!(v.kind, ViolationKind::HashMismatch);
    assert!(v.to_string().starts_with("record 3: "), "{v}");
}

#[test]
fn a_modified_record_with_its_hash_recomputed_breaks_the_next_link() {
    let mut records = chain(6);
    records[2].actor = "uid:1000".into();
    records[2].hash = records[2].compute_hash().unwrap();
    let v = violation(verify(&records, &[], &[]));
    assert_eq!((v.sequence, v.kind), (4, ViolationKind::BrokenLink));
}

#[test]
fn a_rewritten_chain_is_caught_by_the_checkpoint() {
    let key = key_pair();
    let mut records = chain(6);
    let cp = checkpoint(&key, &records[4]);
    records[1].subject = "entry-rewritten".into();
    reseal_from(&mut records, 1);
    // The chain alone is consistent again...
    let genesis = genesis(&key);
    verify(
        &records,
        std::slice::from_ref(&genesis),
        key.public_key().as_ref(),
    )
    .unwrap();
    // ...but not with the signed checkpoint.
    let v = violation(verify(
        &records,
        std::slice::from_ref(&cp),
        key.public_key().as_ref(),
    ));
    assert_eq!((v.sequence, v.kind), (5, ViolationKind::CheckpointMismatch));
}

#[test]
fn a_deleted_record_is_named() {
    let mut records = chain(6);
    records.remove(2);
    let v = violation(verify(&records, &[], &[]));
    assert_eq!(v.sequence, 3);
    assert_eq!(v.kind, ViolationKind::Missing { found: 4 });
    assert!(v.to_string().contains("record 3: missing"), "{v}");
}

#[test]
fn a_reordered_record_is_named() {
    let mut records = chain(6);
    records.swap(2, 3);
    let v = violation(verify(&records, &[], &[]));
    assert_eq!(
        (v.sequence, v.kind),
        (3, ViolationKind::Missing { found: 4 })
    );

    // Renumbered to hide the swap: the hashes give it away.
    let mut records = chain(6);
    records.swap(2, 3);
    records[2].sequence = 3;
    records[3].sequence = 4;
    let v = violation(verify(&records, &[], &[]));
    assert_eq!((v.sequence, v.kind), (3, ViolationKind::HashMismatch));

    // A duplicate.
    let mut records = chain(4);
    records.insert(2, records[1].clone());
    let v = violation(verify(&records, &[], &[]));
    assert_eq!(
        (v.sequence, v.kind),
        (3, ViolationKind::OutOfOrder { found: 2 })
    );
}

#[test]
fn a_truncated_log_is_named() {
    let key = key_pair();
    let mut records = chain(6);
    let cp = checkpoint(&key, &records[5]);
    records.truncate(4);
    let v = violation(verify(
        &records,
        std::slice::from_ref(&cp),
        key.public_key().as_ref(),
    ));
    assert_eq!(v.sequence, 5);
    assert_eq!(
        v.kind,
        ViolationKind::Truncated {
            checkpoint: 6,
            last: 4
        }
    );
}

#[test]
fn a_forged_checkpoint_is_named() {
    let key = key_pair();
    let public = key.public_key().as_ref();
    let mut records = chain(6);
    records[1].details.insert("serial".into(), json!("beef"));
    reseal_from(&mut records, 1);

    // Signed by the forger's own key (which it also put in the checkpoint).
    let forger = key_pair();
    let forged = checkpoint(&forger, &records[5]);
    assert!(forged.signature_is_valid());
    let v = violation(verify(&records, std::slice::from_ref(&forged), public));
    assert_eq!(v.sequence, 6);
    assert!(
        matches!(v.kind, ViolationKind::CheckpointUntrustedKey { .. }),
        "{v}"
    );

    // The server's checkpoint with its covered hash replaced.
    let records_before = chain(6);
    let mut altered = checkpoint(&key, &records_before[5]);
    altered.hash = records[5].hash;
    let v = violation(verify(&records, std::slice::from_ref(&altered), public));
    assert_eq!(
        (v.sequence, v.kind),
        (6, ViolationKind::CheckpointSignatureInvalid)
    );

    // A checkpoint beyond the end with a bad signature: the signature is what is reported.
    let mut beyond = checkpoint(&key, &records_before[5]);
    beyond.sequence = 9;
    let v = violation(verify(&records, std::slice::from_ref(&beyond), public));
    assert_eq!(
        (v.sequence, v.kind),
        (9, ViolationKind::CheckpointSignatureInvalid)
    );
}

#[test]
fn a_record_whose_time_goes_back_is_named() {
    let mut records = chain(4);
    records[2].time = t(1);
    reseal_from(&mut records, 2);
    let v = violation(verify(&records, &[], &[]));
    assert_eq!((v.sequence, v.kind), (3, ViolationKind::TimeWentBack));
}

#[test]
fn the_encoding_is_canonical() {
    let a = NewAuditRecord::new("uid:0", "x509.mint", "spiffe://example.org/a")
        .detail("serial", "01")
        .detail("nested", json!({"b": 1, "a": [true, null, "x"]}))
        .detail("not_after", 1_700_000_000u64)
        .seal("default", 1, t(0), GENESIS_HASH)
        .unwrap();
    let b = NewAuditRecord::new("uid:0", "x509.mint", "spiffe://example.org/a")
        .detail("not_after", 1_700_000_000u64)
        .detail("nested", json!({"a": [true, null, "x"], "b": 1}))
        .detail("serial", "01")
        .seal("default", 1, t(0), GENESIS_HASH)
        .unwrap();
    assert_eq!(a.hash, b.hash);
    assert_eq!(
        a.canonical_encoding().unwrap(),
        b.canonical_encoding().unwrap()
    );
    // The details are the sorted, whitespace-free JSON object, length-prefixed.
    let details: &[u8] =
        br#"{"nested":{"a":[true,null,"x"],"b":1},"not_after":1700000000,"serial":"01"}"#;
    let encoding = a.canonical_encoding().unwrap();
    let at = encoding
        .windows(details.len())
        .position(|w| w == details)
        .expect("the details in canonical form");
    assert_eq!(
        encoding[at - 4..at],
        u32::try_from(details.len()).unwrap().to_be_bytes()
    );
    // Then the previous record's hash ends it.
    assert_eq!(encoding.len(), at + details.len() + 32);

    // The stored form (JSON) decodes to a record with the same hash.
    let stored = serde_json::to_vec(&a).unwrap();
    let decoded: AuditRecord = serde_json::from_slice(&stored).unwrap();
    assert_eq!(decoded, a);
    assert_eq!(decoded.compute_hash().unwrap(), a.hash);

    // Field boundaries matter: moving a character between fields changes the hash.
    let c = NewAuditRecord::new("uid:0x", "509.mint", "spiffe://example.org/a")
        .seal("default", 1, t(0), GENESIS_HASH)
        .unwrap();
    let d = NewAuditRecord::new("uid:0", "x509.mint", "spiffe://example.org/a")
        .seal("default", 1, t(0), GENESIS_HASH)
        .unwrap();
    assert_ne!(c.hash, d.hash);

    // A known answer, so that a change in how the encoding is written cannot change what it
    // is (every stored chain's hashes depend on it): escapes, non-ASCII, negative numbers.
    let known = NewAuditRecord::new("uid:0", "x509.issue", "say \"hi\"\n")
        .detail("name", "caf\u{e9} \u{1}\\/")
        .detail("delta", -42i64)
        .detail("list", json!(["a", 7, {"z": false, "y": null}]))
        .seal("default", 7, t(5), [9; 32])
        .unwrap();
    assert_eq!(
        hex_encode(&known.hash),
        "042695c06a4fc61dbcad99036322340f8e1417100cfbe4c0995fd5ab5d857f9f"
    );

    // Floats have no canonical form here.
    let float = NewAuditRecord::new("uid:0", "x", "y")
        .detail("ratio", 0.5)
        .seal("default", 1, t(0), GENESIS_HASH);
    assert!(matches!(float, Err(EncodeError::Float(_))));
    // Neither do times before 1970.
    let early = NewAuditRecord::new("uid:0", "x", "y").seal(
        "default",
        1,
        UNIX_EPOCH - Duration::from_secs(1),
        GENESIS_HASH,
    );
    assert_eq!(early.unwrap_err(), EncodeError::TimeBeforeEpoch);
}

#[test]
fn filters_match_actions_by_prefix_and_ids_in_details() {
    let record = NewAuditRecord::new(
        "spiffe://example.org/sigil/agent/join_token/a",
        action::SVID_X509_ISSUE,
        "spiffe://example.org/web",
    )
    .detail("agent", "spiffe://example.org/sigil/agent/join_token/a")
    .seal("default", 7, t(10), GENESIS_HASH)
    .unwrap();
    let matches = |filter: AuditFilter| filter.matches(&record);
    assert!(matches(AuditFilter::default()));
    for action in ["svid", "svid.x509", "svid.x509.issue"] {
        assert!(matches(AuditFilter {
            action: Some(action.into()),
            ..AuditFilter::default()
        }));
    }
    for action in ["sv", "svid.x", "svid.x509.issue.more", "entry"] {
        assert!(!matches(AuditFilter {
            action: Some(action.into()),
            ..AuditFilter::default()
        }));
    }
    for id in [
        "spiffe://example.org/web",
        "spiffe://example.org/sigil/agent/join_token/a",
    ] {
        assert!(matches(AuditFilter {
            spiffe_id: Some(id.into()),
            ..AuditFilter::default()
        }));
    }
    assert!(!matches(AuditFilter {
        spiffe_id: Some("spiffe://example.org/other".into()),
        ..AuditFilter::default()
    }));
    assert!(matches(AuditFilter {
        since: Some(t(10)),
        from_sequence: Some(7),
        ..AuditFilter::default()
    }));
    assert!(!matches(AuditFilter {
        since: Some(t(11)),
        ..AuditFilter::default()
    }));
    assert!(!matches(AuditFilter {
        from_sequence: Some(8),
        ..AuditFilter::default()
    }));
    assert!(!matches(AuditFilter {
        actor: Some("uid:0".into()),
        ..AuditFilter::default()
    }));
}
