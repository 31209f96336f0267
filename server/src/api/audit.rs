//! The audit log's domain values on the wire: records and checkpoints, as both APIs carry them.

use std::time::UNIX_EPOCH;

use sigil_core::hex::encode as hex;
use sigil_core::time::{from_unix_seconds, unix_seconds};
use sigil_proto::{admin as admin_pb, node as node_pb};

use crate::audit::{AuditCheckpoint, AuditRecord};
use crate::service::audit::Divergence;
use crate::service::audit_peers::PeerChainReport;

/// A checkpoint as both APIs carry it.
pub(crate) fn checkpoint_message(cp: &AuditCheckpoint) -> node_pb::AuditCheckpoint {
    node_pb::AuditCheckpoint {
        chain_id: cp.chain_id.clone(),
        sequence: cp.sequence,
        hash: cp.hash.to_vec(),
        time: unix_seconds(cp.time),
        key_id: cp.key_id.clone(),
        public_key: cp.public_key.clone(),
        signature: cp.signature.clone(),
    }
}

/// A checkpoint from the wire; whether it is signed, and by whom, is for the audit service to
/// check.
///
/// # Errors
///
/// What is malformed, in words.
pub(crate) fn parse_checkpoint(
    message: node_pb::AuditCheckpoint,
) -> Result<AuditCheckpoint, String> {
    let hash = <[u8; 32]>::try_from(message.hash.as_slice()).map_err(|_| {
        format!(
            "an audit checkpoint's hash is 32 bytes, not {}",
            message.hash.len()
        )
    })?;
    let time = (message.time >= 0)
        .then(|| from_unix_seconds(message.time))
        .flatten()
        .ok_or_else(|| {
            format!(
                "an audit checkpoint's time {} is out of range",
                message.time
            )
        })?;
    if message.chain_id.is_empty() {
        return Err("an audit checkpoint names no chain".to_owned());
    }
    Ok(AuditCheckpoint {
        chain_id: message.chain_id,
        sequence: message.sequence,
        hash,
        time,
        key_id: message.key_id,
        public_key: message.public_key,
        signature: message.signature,
    })
}

/// A record on the admin API.
pub(crate) fn record_message(record: &AuditRecord) -> admin_pb::AuditRecord {
    let since = record.time.duration_since(UNIX_EPOCH).unwrap_or_default();
    admin_pb::AuditRecord {
        chain_id: record.chain_id.clone(),
        sequence: record.sequence,
        time: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        time_nanos: since.subsec_nanos(),
        actor: record.actor.clone(),
        action: record.action.clone(),
        subject: record.subject.clone(),
        details_json: serde_json::Value::Object(record.details.clone()).to_string(),
        prev_hash: hex(&record.prev_hash),
        hash: hex(&record.hash),
    }
}

/// A divergence on the admin API.
pub(crate) fn divergence_message(divergence: &Divergence) -> admin_pb::AuditDivergence {
    admin_pb::AuditDivergence {
        checkpoint: divergence.checkpoint.as_ref().map(checkpoint_message),
        source: divergence.source.clone(),
        problem: divergence.problem.clone(),
        detected_at: unix_seconds(divergence.detected_at),
    }
}

/// Another server's chain, as verified, on the admin API.
pub(crate) fn peer_chain_message(report: PeerChainReport) -> admin_pb::PeerChainVerification {
    let base = admin_pb::PeerChainVerification {
        chain_id: report.chain_id,
        key_fingerprint: report.pinned_fingerprint,
        pinned_by: report.pinned_by,
        ..admin_pb::PeerChainVerification::default()
    };
    match report.outcome {
        Ok(summary) => admin_pb::PeerChainVerification {
            ok: true,
            checked: summary.records,
            head_sequence: summary.head.as_ref().map_or(0, |h| h.sequence),
            checkpoints_checked: summary.checkpoints,
            ..base
        },
        Err(violation) => admin_pb::PeerChainVerification {
            ok: false,
            checked: violation.sequence.saturating_sub(1),
            bad_sequence: violation.sequence,
            problem: violation.kind.to_string(),
            ..base
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tests::{checkpoint, key_pair};
    use crate::audit::{NewAuditRecord, action};

    #[test]
    fn a_checkpoint_survives_the_wire_and_bad_ones_are_named() {
        let record = NewAuditRecord::new("uid:0", action::ENTRY_CREATE, "e1")
            .seal(
                "default",
                1,
                UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
                [0; 32],
            )
            .unwrap();
        let cp = checkpoint(&key_pair(), &record);
        let wire = checkpoint_message(&cp);
        let back = parse_checkpoint(wire.clone()).unwrap();
        assert_eq!(back, cp);
        assert!(back.signature_is_valid());

        let short = node_pb::AuditCheckpoint {
            hash: vec![0; 31],
            ..wire.clone()
        };
        assert!(parse_checkpoint(short).unwrap_err().contains("32 bytes"));
        let negative = node_pb::AuditCheckpoint {
            time: -1,
            ..wire.clone()
        };
        assert!(
            parse_checkpoint(negative)
                .unwrap_err()
                .contains("out of range")
        );
        let unnamed = node_pb::AuditCheckpoint {
            chain_id: String::new(),
            ..wire
        };
        assert!(parse_checkpoint(unnamed).unwrap_err().contains("no chain"));
    }
}
