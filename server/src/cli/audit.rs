//! `sigil-server audit show | verify`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;
use sigil_proto::admin::{
    ListAuditRequest, ListAuditResponse, ListSessionAuditRequest, VerifyAuditRequest,
};

use super::client::Admin;
use super::output::{Printer, block, table};
use super::time::format_rfc3339;
use super::{ConnectArgs, report_failure, spiffe_id, time};

/// `sigil-server audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Show audit records, oldest first, filtered by time, SPIFFE ID, action, actor or
    /// privileged session.
    Show(AuditShowArgs),
    /// Recompute the hash chain, check the latest signed checkpoint, and name the first bad
    /// record (exit 1) if any.
    Verify(AuditVerifyArgs),
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
    /// Only records by this actor (`uid:0`, an agent SPIFFE ID, `server`).
    #[arg(long, value_name = "ACTOR")]
    actor: Option<String>,
    /// The whole story of one privileged session: its open, approval, end and every SVID
    /// issued under it, in order (other filters do not apply).
    #[arg(long, value_name = "ID", conflicts_with_all = ["since", "spiffe_id", "action", "actor"])]
    session: Option<String>,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `audit verify`.
#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Serialize)]
struct RecordJson<'a> {
    id: String,
    sequence: u64,
    time: String,
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
    }
}

async fn show(args: AuditShowArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let mut token = String::new();
    let mut rows = Vec::new();
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
        for r in &page.records {
            if printer.is_json() {
                printer.json(&RecordJson {
                    id: r.sequence.to_string(),
                    sequence: r.sequence,
                    time: format_rfc3339(r.time),
                    actor: &r.actor,
                    action: &r.action,
                    subject: &r.subject,
                    details: serde_json::from_str(&r.details_json)
                        .unwrap_or(serde_json::Value::Null),
                    prev_hash: &r.prev_hash,
                    hash: &r.hash,
                })?;
            } else {
                rows.push(vec![
                    r.sequence.to_string(),
                    format_rfc3339(r.time),
                    r.actor.clone(),
                    r.action.clone(),
                    r.subject.clone(),
                    r.details_json.clone(),
                ]);
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if !printer.is_json() {
        if rows.is_empty() {
            printer.text("no audit records match\n")?;
        } else {
            printer.text(&table(
                &["SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "DETAILS"],
                &rows,
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(args: AuditVerifyArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let result = admin
        .call(|mut c| async move { c.verify_audit(VerifyAuditRequest {}).await })
        .await?;
    let checkpoint = result.checkpoint.as_ref();
    if printer.is_json() {
        printer.json(&serde_json::json!({
            "id": "audit",
            "ok": result.ok,
            "checked": result.checked,
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
            ("Records checked", result.checked.to_string()),
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
        printer.text(&block(&rows))?;
    }
    if result.ok {
        Ok(ExitCode::SUCCESS)
    } else {
        report_failure(&format!(
            "the audit log is broken at record {}: {}",
            result.bad_sequence, result.problem
        ));
        Ok(ExitCode::FAILURE)
    }
}
