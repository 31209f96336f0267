//! `sigil-server audit show | verify | checkpoint | acknowledge`.
//!
//! A checkpoint leaves the server as one JSON document ([`CheckpointJson`], what `audit
//! checkpoint --output json` prints) and comes back in exactly that form (`audit verify
//! --checkpoint FILE`, `audit acknowledge --checkpoint FILE`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use sigil_core::hex::{decode as hex_decode, encode as hex, sha256};
use sigil_proto::admin::{
    AcknowledgeAuditDivergenceRequest, AuditDivergence, AuditRecord, ListAuditRequest,
    ListAuditResponse, ListSessionAuditRequest, SignAuditCheckpointRequest, VerifyAuditRequest,
};
use sigil_proto::node::AuditCheckpoint;

use super::client::Admin;
use super::output::{Printer, block, table};
use super::time::{format_rfc3339, format_rfc3339_nanos};
use super::{ConnectArgs, report_failure, spiffe_id, time};

/// `sigil-server audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Show audit records, oldest first, filtered by time, SPIFFE ID, action, actor or
    /// privileged session.
    Show(AuditShowArgs),
    /// Recompute the hash chain, check every signed checkpoint (and one kept elsewhere, with
    /// --checkpoint), and name the first bad record; exit 1 if the log is broken or has
    /// diverged from a checkpoint the server signed.
    Verify(AuditVerifyArgs),
    /// Sign a checkpoint of the chain head if it moved, and print the latest checkpoint: keep
    /// it outside the server (`--output json` is what `audit verify --checkpoint` reads).
    Checkpoint(AuditCheckpointArgs),
    /// Accept that the audit log lost or rewrote records after a checkpoint the server signed
    /// (a restore from an older backup, say): records an `audit.divergence` entry naming the
    /// lost range and your reason, and lets the server sign checkpoints again.
    Acknowledge(AuditAcknowledgeArgs),
}

/// Flags of `audit show`.
#[derive(Debug, Args)]
pub struct AuditShowArgs {
    /// Only records at or after this time (RFC 3339, e.g. 2026-11-27T19:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = time::parse_rfc3339)]
    since: Option<i64>,
    /// Only records about this SPIFFE ID (subject or detail).
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    spiffe_id: Option<String>,
    /// Only this action, or actions under it (`svid` matches `svid.x509.issue`).
    #[arg(long, value_name = "ACTION")]
    action: Option<String>,
    /// Only records by this actor (`uid:0`, an agent's or an audit source's SPIFFE ID,
    /// `server`).
    #[arg(long, value_name = "ACTOR")]
    actor: Option<String>,
    /// The whole story of one privileged session: its open, approval, end, every SVID issued
    /// under it and every event a broker recorded about it, in the order things happened
    /// (broker events by their observed_at; other filters do not apply).
    #[arg(long, value_name = "ID", conflicts_with_all = ["since", "spiffe_id", "action", "actor"])]
    session: Option<String>,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `audit verify`.
#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// A checkpoint kept outside the server (the JSON `audit checkpoint --output json`
    /// printed): the log must hold its record with its hash, and extend it. This is what
    /// catches a restore of an older copy of the data directory.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `audit checkpoint`.
#[derive(Debug, Args)]
pub struct AuditCheckpointArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `audit acknowledge`.
#[derive(Debug, Args)]
pub struct AuditAcknowledgeArgs {
    /// The checkpoint the divergence is about, as JSON: the `divergence.checkpoint` of
    /// `audit verify --output json`. Omit it only when the divergence names no checkpoint.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Why the loss is acceptable; recorded in the audit log.
    #[arg(long, value_name = "TEXT")]
    reason: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// A signed checkpoint as JSON: what `audit checkpoint --output json` prints and `--checkpoint
/// FILE` reads.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckpointJson {
    /// `CHAIN:SEQUENCE`.
    #[serde(default)]
    id: String,
    chain_id: String,
    sequence: u64,
    /// SHA-256 of the record, lowercase hex.
    hash: String,
    /// When it was signed, RFC 3339 (whole seconds, as signed).
    time: String,
    key_id: String,
    /// SHA-256 of the public key, lowercase hex (checked against it when read).
    key_fingerprint: String,
    /// Uncompressed SEC 1 P-256 point, lowercase hex.
    public_key: String,
    /// ECDSA P-256 SHA-256, ASN.1 DER, lowercase hex.
    signature: String,
    /// Whether `audit checkpoint` signed it just now (printed, ignored when read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signed: Option<bool>,
}

#[derive(Debug, Serialize)]
struct DivergenceJson {
    checkpoint: Option<CheckpointJson>,
    source: String,
    problem: String,
    detected_at: String,
}

#[derive(Debug, Serialize)]
struct RecordJson<'a> {
    id: String,
    /// The server's chain the record is on (its `server_id`; `default` for one server).
    chain_id: &'a str,
    sequence: u64,
    time: String,
    /// When an audit source observed the event (RFC 3339, nanoseconds); only on its records.
    #[serde(skip_serializing_if = "Option::is_none")]
    observed_at: Option<String>,
    actor: &'a str,
    action: &'a str,
    subject: &'a str,
    details: serde_json::Value,
    prev_hash: &'a str,
    hash: &'a str,
}

pub(super) async fn execute(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Show(args) => show(args).await,
        AuditCommand::Verify(args) => verify(args).await,
        AuditCommand::Checkpoint(args) => checkpoint(args).await,
        AuditCommand::Acknowledge(args) => acknowledge(args).await,
    }
}

// === impl CheckpointJson ===

impl CheckpointJson {
    fn from_message(cp: &AuditCheckpoint, signed: Option<bool>) -> Self {
        Self {
            id: format!("{}:{}", cp.chain_id, cp.sequence),
            chain_id: cp.chain_id.clone(),
            sequence: cp.sequence,
            hash: hex(&cp.hash),
            time: format_rfc3339(cp.time),
            key_id: cp.key_id.clone(),
            key_fingerprint: sha256(&cp.public_key),
            public_key: hex(&cp.public_key),
            signature: hex(&cp.signature),
            signed,
        }
    }

    fn into_message(self) -> anyhow::Result<AuditCheckpoint> {
        let bytes = |field: &str, value: &str| {
            hex_decode(value).with_context(|| format!("{field} is not lowercase hex"))
        };
        let public_key = bytes("public_key", &self.public_key)?;
        if sha256(&public_key) != self.key_fingerprint {
            bail!("key_fingerprint is not the SHA-256 of public_key: the file was altered");
        }
        Ok(AuditCheckpoint {
            chain_id: self.chain_id,
            sequence: self.sequence,
            hash: bytes("hash", &self.hash)?,
            time: time::parse_rfc3339(&self.time).map_err(|e| anyhow::anyhow!("time: {e}"))?,
            key_id: self.key_id,
            public_key,
            signature: bytes("signature", &self.signature)?,
        })
    }

    /// Reads the file `audit checkpoint --output json` wrote.
    fn read(path: &Path) -> anyhow::Result<AuditCheckpoint> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: Self = serde_json::from_str(text.trim()).with_context(|| {
            format!(
                "{} is not an audit checkpoint as `sigil-server audit checkpoint --output json` \
                 prints it",
                path.display()
            )
        })?;
        json.into_message()
            .with_context(|| format!("{} holds a malformed audit checkpoint", path.display()))
    }
}

fn checkpoint_rows(cp: &AuditCheckpoint) -> Vec<(&'static str, String)> {
    vec![
        ("Chain", cp.chain_id.clone()),
        ("Sequence", cp.sequence.to_string()),
        ("Hash", hex(&cp.hash)),
        ("Signed at", format_rfc3339(cp.time)),
        ("Key id", cp.key_id.clone()),
        ("Key fingerprint", sha256(&cp.public_key)),
        ("Signature", hex(&cp.signature)),
    ]
}

async fn checkpoint(args: AuditCheckpointArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let response = admin
        .call(|mut c| async move { c.sign_audit_checkpoint(SignAuditCheckpointRequest {}).await })
        .await?;
    let Some(cp) = response.checkpoint else {
        bail!("the server answered without a checkpoint");
    };
    if printer.is_json() {
        printer.json(&CheckpointJson::from_message(&cp, Some(response.signed)))?;
    } else {
        let mut rows = checkpoint_rows(&cp);
        rows.push((
            "Signed now",
            if response.signed {
                "yes"
            } else {
                "no (the head had not moved)"
            }
            .to_owned(),
        ));
        printer.text(&block(&rows))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn acknowledge(args: AuditAcknowledgeArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let checkpoint = args
        .checkpoint
        .as_deref()
        .map(CheckpointJson::read)
        .transpose()?;
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = AcknowledgeAuditDivergenceRequest {
        checkpoint,
        reason: args.reason,
    };
    let response = admin
        .call(|mut c| async move { c.acknowledge_audit_divergence(request).await })
        .await?;
    let (Some(record), Some(cp)) = (response.record, response.checkpoint) else {
        bail!("the server answered without the record or the checkpoint");
    };
    let details: serde_json::Value =
        serde_json::from_str(&record.details_json).unwrap_or(serde_json::Value::Null);
    if printer.is_json() {
        printer.json(&serde_json::json!({
            "id": record.sequence.to_string(),
            "sequence": record.sequence,
            "action": record.action,
            "details": details,
            "checkpoint": CheckpointJson::from_message(&cp, None),
        }))?;
    } else {
        let range = format!("{}..={}", details["lost_from"], details["lost_to"]);
        printer.text(&block(&[
            (
                "Recorded",
                format!("record {} ({})", record.sequence, record.action),
            ),
            ("Lost records", range),
            (
                "Signing",
                format!("resumed: checkpoint of record {} signed", cp.sequence),
            ),
        ]))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn divergence_json(d: &AuditDivergence) -> DivergenceJson {
    DivergenceJson {
        checkpoint: d
            .checkpoint
            .as_ref()
            .map(|cp| CheckpointJson::from_message(cp, None)),
        source: d.source.clone(),
        problem: d.problem.clone(),
        detected_at: format_rfc3339(d.detected_at),
    }
}

async fn show(args: AuditShowArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let mut token = String::new();
    let mut rows = Vec::new();
    // A session's story is told in the order things happened: a broker's events may reach the
    // chain late (after an outage), so its records are gathered and ordered by `observed_at`.
    let mut story = Vec::new();
    loop {
        let page: ListAuditResponse = match &args.session {
            Some(session) => {
                let request = ListSessionAuditRequest {
                    session_id: session.clone(),
                    page_size: 1000,
                    page_token: token,
                };
                admin
                    .call(|mut c| async move { c.list_session_audit(request).await })
                    .await?
            }
            None => {
                let request = ListAuditRequest {
                    since_time: args.since.unwrap_or(0),
                    spiffe_id: args.spiffe_id.clone().unwrap_or_default(),
                    action: args.action.clone().unwrap_or_default(),
                    actor: args.actor.clone().unwrap_or_default(),
                    page_size: 1000,
                    page_token: token,
                };
                admin
                    .call(|mut c| async move { c.list_audit(request).await })
                    .await?
            }
        };
        if args.session.is_some() {
            story.extend(page.records);
        } else {
            for r in &page.records {
                show_record(&printer, r, &mut rows)?;
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    story.sort_by_cached_key(|r| (happened_at(r), r.sequence));
    for r in &story {
        show_record(&printer, r, &mut rows)?;
    }
    if !printer.is_json() {
        if rows.is_empty() {
            printer.text("no audit records match\n")?;
        } else {
            // The chain column only when records of several servers' chains are listed.
            let chains: std::collections::BTreeSet<&String> =
                rows.iter().filter_map(|row| row.first()).collect();
            if chains.len() > 1 {
                printer.text(&table(
                    &[
                        "CHAIN", "SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "DETAILS",
                    ],
                    &rows,
                ))?;
            } else {
                let rows: Vec<Vec<String>> = rows
                    .into_iter()
                    .map(|row| row.into_iter().skip(1).collect())
                    .collect();
                printer.text(&table(
                    &["SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "DETAILS"],
                    &rows,
                ))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints one record as a JSON line, or adds its table row. The TIME column is when it
/// happened: `observed_at` for an event an audit source recorded, else the record's time.
fn show_record(
    printer: &Printer,
    r: &AuditRecord,
    rows: &mut Vec<Vec<String>>,
) -> anyhow::Result<()> {
    let details: serde_json::Value =
        serde_json::from_str(&r.details_json).unwrap_or(serde_json::Value::Null);
    let observed_at = details["observed_at"].as_str().map(str::to_owned);
    if printer.is_json() {
        printer.json(&RecordJson {
            id: r.sequence.to_string(),
            chain_id: &r.chain_id,
            sequence: r.sequence,
            time: format_rfc3339(r.time),
            observed_at,
            actor: &r.actor,
            action: &r.action,
            subject: &r.subject,
            details,
            prev_hash: &r.prev_hash,
            hash: &r.hash,
        })?;
    } else {
        let time = observed_at
            .as_deref()
            .and_then(|t| time::parse_rfc3339(t).ok())
            .unwrap_or(r.time);
        rows.push(vec![
            r.chain_id.clone(),
            r.sequence.to_string(),
            format_rfc3339(time),
            r.actor.clone(),
            r.action.clone(),
            r.subject.clone(),
            r.details_json.clone(),
        ]);
    }
    Ok(())
}

/// When a record's event happened, as a string that sorts as times do: its `observed_at`
/// detail (an audit source's clock, nanoseconds) or else its own time.
fn happened_at(r: &AuditRecord) -> String {
    serde_json::from_str::<serde_json::Value>(&r.details_json)
        .ok()
        .and_then(|d| d["observed_at"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format_rfc3339_nanos(r.time, r.time_nanos))
}

async fn verify(args: AuditVerifyArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let extra = args
        .checkpoint
        .as_deref()
        .map(CheckpointJson::read)
        .transpose()?;
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = VerifyAuditRequest { checkpoint: extra };
    let result = admin
        .call(|mut c| async move { c.verify_audit(request).await })
        .await?;
    let checkpoint = result.checkpoint.as_ref();
    let divergence = result.divergence.as_ref();
    let broken_peers: Vec<_> = result.peer_chains.iter().filter(|p| !p.ok).collect();
    if printer.is_json() {
        let peers: Vec<_> = result
            .peer_chains
            .iter()
            .map(|p| {
                serde_json::json!({
                    "chain_id": p.chain_id,
                    "ok": p.ok,
                    "checked": p.checked,
                    "head_sequence": p.head_sequence,
                    "checkpoints_checked": p.checkpoints_checked,
                    "bad_sequence": (!p.ok).then_some(p.bad_sequence),
                    "problem": (!p.ok).then_some(p.problem.as_str()),
                    "key_fingerprint": p.key_fingerprint,
                    "pinned_by": p.pinned_by,
                })
            })
            .collect();
        printer.json(&serde_json::json!({
            "id": result.chain_id,
            "chain_id": result.chain_id,
            "peer_chains": peers,
            "ok": result.ok && divergence.is_none() && broken_peers.is_empty(),
            "chain_ok": result.ok,
            "checked": result.checked,
            "checkpoints_checked": result.checkpoints_checked,
            "divergence": divergence.map(divergence_json),
            "head_sequence": result.head_sequence,
            "head_hash": result.head_hash,
            "checkpoint_sequence": checkpoint.map(|c| c.sequence),
            "checkpoint_time": checkpoint.map(|c| format_rfc3339(c.time)),
            "unsigned_records": result.unsigned_records,
            "bad_sequence": (!result.ok).then_some(result.bad_sequence),
            "problem": (!result.ok).then_some(result.problem.as_str()),
            "key_fingerprint": result.key_fingerprint,
        }))?;
    } else {
        let mut rows = vec![
            (
                "Result",
                if result.ok {
                    "OK".to_owned()
                } else {
                    "BROKEN".to_owned()
                },
            ),
            ("Chain", result.chain_id.clone()),
            ("Records checked", result.checked.to_string()),
            (
                "Checkpoints checked",
                result.checkpoints_checked.to_string(),
            ),
            (
                "Head",
                format!("{} {}", result.head_sequence, result.head_hash),
            ),
        ];
        match checkpoint {
            Some(c) => rows.push((
                "Checkpoint",
                format!("record {} signed {}", c.sequence, format_rfc3339(c.time)),
            )),
            None => rows.push(("Checkpoint", "none yet".to_owned())),
        }
        rows.push(("Unsigned records", result.unsigned_records.to_string()));
        rows.push(("Key fingerprint", result.key_fingerprint.clone()));
        if !result.ok {
            rows.push(("First bad record", result.bad_sequence.to_string()));
            rows.push(("Problem", result.problem.clone()));
        }
        if let Some(d) = divergence {
            rows.push(("Diverged", format!("{}: {}", d.source, d.problem)));
            if let Some(cp) = &d.checkpoint {
                rows.push((
                    "Divergent checkpoint",
                    serde_json::to_string(&CheckpointJson::from_message(cp, None))?,
                ));
            }
        }
        for peer in &result.peer_chains {
            let state = if peer.ok {
                format!(
                    "OK: {} records, {} checkpoints, key {} ({})",
                    peer.checked, peer.checkpoints_checked, peer.key_fingerprint, peer.pinned_by
                )
            } else {
                format!(
                    "BROKEN at record {}: {} (key {}, {})",
                    peer.bad_sequence, peer.problem, peer.key_fingerprint, peer.pinned_by
                )
            };
            rows.push((
                "Other server's chain",
                format!("{}: {state}", peer.chain_id),
            ));
        }
        printer.text(&block(&rows))?;
    }
    if !result.ok {
        report_failure(&format!(
            "the audit log is broken at record {}: {}",
            result.bad_sequence, result.problem
        ));
        return Ok(ExitCode::FAILURE);
    }
    if let Some(peer) = broken_peers.first() {
        report_failure(&format!(
            "the audit chain of server {:?} is broken at record {}: {}",
            peer.chain_id, peer.bad_sequence, peer.problem
        ));
        return Ok(ExitCode::FAILURE);
    }
    if let Some(d) = divergence {
        report_failure(&format!(
            "the audit log diverged from a checkpoint the server signed ({}: {}); the server \
             signs no checkpoint until `sigil-server audit acknowledge --checkpoint FILE \
             --reason TEXT` (FILE: the divergent checkpoint above, as JSON)",
            d.source, d.problem
        ));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
