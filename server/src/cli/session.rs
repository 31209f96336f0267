//! `sigil-server session open | approve | close | revoke | show | list`: privileged sessions.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;
use sigil_proto::admin::{
    self as pb, ListSessionsRequest, OpenSessionRequest, RevokeSessionRequest, SessionRequest,
};

use super::client::Admin;
use super::output::{Printer, block, table};
use super::time::format_rfc3339;
use super::{ConnectArgs, seconds, selector, spiffe_id};

/// Sessions asked for per `ListSessions` page.
const PAGE_SIZE: u32 = 1000;

/// `sigil-server session ...`.
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Open a privileged session: a ticket-bound identity for one task, minutes long.
    ///
    /// Prints the session; it is `active` at once, or `pending` until a different admin
    /// approves it when approval is required (by the server's `require_session_approval` or by
    /// `--require-approval`).
    Open(SessionOpenArgs),
    /// Approve a pending session (two-person rule: not by the admin who opened it).
    Approve(SessionIdArgs),
    /// Close a session: the task is done; agents drop its SVIDs at once and its unexpired
    /// serials go on the certificate revocation lists (reason cessationOfOperation).
    Close(SessionIdArgs),
    /// Revoke a session: something is wrong; agents drop its SVIDs at once and its unexpired
    /// serials go on the certificate revocation lists (reason privilegeWithdrawn), a closed
    /// session's again.
    Revoke(SessionRevokeArgs),
    /// Show one session, with the X509-SVID serials and JWT-SVID ids (jti) issued under it.
    Show(SessionIdArgs),
    /// List sessions, oldest id first, optionally by state or ticket.
    List(SessionListArgs),
}

/// Flags of `session open`.
#[derive(Debug, Args)]
pub struct SessionOpenArgs {
    /// The SPIFFE ID the session grants.
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    spiffe_id: String,
    /// The agent (or an alias entry's SPIFFE ID) the workload runs under.
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    parent_id: String,
    /// A selector the workload must have, `type:value`; repeat for several (all must match).
    #[arg(long = "selector", value_name = "TYPE:VALUE", value_parser = selector, required = true)]
    selectors: Vec<String>,
    /// The change or incident ticket the session is for (at most 128 bytes: every SVID of the
    /// session carries it).
    #[arg(long, value_name = "REF")]
    ticket: String,
    /// Why the session is needed.
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// How long the session lasts at most (`15m`, `1h`); at most the server's
    /// `max_session_ttl`.
    #[arg(long, value_name = "DURATION", value_parser = seconds)]
    ttl: u64,
    /// Lifetime of each SVID issued under it (default: the server's `session_svid_ttl`);
    /// shorter than `--ttl`.
    #[arg(long, value_name = "DURATION", value_parser = seconds)]
    svid_ttl: Option<u64>,
    /// Require a second admin's approval even if the server does not.
    #[arg(long)]
    require_approval: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of the `session` commands that name one session.
#[derive(Debug, Args)]
pub struct SessionIdArgs {
    /// The session id (as printed by `session open` or `session list`).
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `session revoke`.
#[derive(Debug, Args)]
pub struct SessionRevokeArgs {
    /// The session id.
    #[arg(value_name = "ID")]
    id: String,
    /// Why it is revoked (recorded in the audit log).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `session list`.
#[derive(Debug, Args)]
pub struct SessionListArgs {
    /// Only sessions in this state: pending, active, closed, revoked or expired.
    #[arg(long, value_name = "STATE")]
    state: Option<String>,
    /// Only sessions for this ticket.
    #[arg(long, value_name = "REF")]
    ticket: Option<String>,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// A session as JSON.
#[derive(Debug, Serialize)]
struct SessionJson<'a> {
    id: &'a str,
    state: &'a str,
    spiffe_id: &'a str,
    parent_id: &'a str,
    selectors: &'a [String],
    ticket: &'a str,
    reason: &'a str,
    requester: &'a str,
    approver: Option<&'a str>,
    approval_required: bool,
    opened_at: String,
    approved_at: Option<String>,
    expires_at: String,
    ended_at: Option<String>,
    end_reason: Option<&'a str>,
    svid_ttl_seconds: u64,
    entry_id: Option<&'a str>,
    serials: Vec<SerialJson<'a>>,
    jwts: Vec<JwtJson<'a>>,
    /// `session revoke` only: servers whose CRLs do not list the serials yet.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pending_crl_servers: &'a [String],
}

#[derive(Debug, Serialize)]
struct SerialJson<'a> {
    serial: &'a str,
    not_after: String,
}

#[derive(Debug, Serialize)]
struct JwtJson<'a> {
    jti: &'a str,
    audience: &'a [String],
    expires_at: String,
}

// === impl SessionJson ===

impl<'a> SessionJson<'a> {
    fn new(s: &'a pb::Session) -> Self {
        let time = |t: i64| (t > 0).then(|| format_rfc3339(t));
        let text = |t: &'a str| (!t.is_empty()).then_some(t);
        Self {
            id: &s.id,
            state: &s.state,
            spiffe_id: &s.spiffe_id,
            parent_id: &s.parent_id,
            selectors: &s.selectors,
            ticket: &s.ticket,
            reason: &s.reason,
            requester: &s.requester,
            approver: text(&s.approver),
            approval_required: s.approval_required,
            opened_at: format_rfc3339(s.opened_at),
            approved_at: time(s.approved_at),
            expires_at: format_rfc3339(s.expires_at),
            ended_at: time(s.ended_at),
            end_reason: text(&s.end_reason),
            svid_ttl_seconds: s.svid_ttl,
            entry_id: text(&s.entry_id),
            serials: s
                .serials
                .iter()
                .map(|x| SerialJson {
                    serial: &x.serial,
                    not_after: format_rfc3339(x.not_after),
                })
                .collect(),
            jwts: s
                .jwts
                .iter()
                .map(|j| JwtJson {
                    jti: &j.jti,
                    audience: &j.audience,
                    expires_at: format_rfc3339(j.expires_at),
                })
                .collect(),
            pending_crl_servers: &s.pending_crl_servers,
        }
    }
}

pub(super) async fn execute(command: SessionCommand) -> anyhow::Result<ExitCode> {
    match command {
        SessionCommand::Open(args) => open(args).await,
        SessionCommand::Approve(args) => {
            let admin = Admin::connect(&args.connect.admin_socket).await?;
            let request = SessionRequest { id: args.id };
            let s = admin
                .call(|mut c| async move { c.approve_session(request).await })
                .await?;
            print(&s, Printer::new(args.connect.output))
        }
        SessionCommand::Close(args) => {
            let admin = Admin::connect(&args.connect.admin_socket).await?;
            let request = SessionRequest { id: args.id };
            let s = admin
                .call(|mut c| async move { c.close_session(request).await })
                .await?;
            print(&s, Printer::new(args.connect.output))
        }
        SessionCommand::Revoke(args) => {
            let admin = Admin::connect(&args.connect.admin_socket).await?;
            let request = RevokeSessionRequest {
                id: args.id,
                reason: args.reason,
            };
            let s = admin
                .call(|mut c| async move { c.revoke_session(request).await })
                .await?;
            print(&s, Printer::new(args.connect.output))
        }
        SessionCommand::Show(args) => {
            let admin = Admin::connect(&args.connect.admin_socket).await?;
            let request = SessionRequest { id: args.id };
            let s = admin
                .call(|mut c| async move { c.get_session(request).await })
                .await?;
            print(&s, Printer::new(args.connect.output))
        }
        SessionCommand::List(args) => list(args).await,
    }
}

async fn open(args: SessionOpenArgs) -> anyhow::Result<ExitCode> {
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = OpenSessionRequest {
        spiffe_id: args.spiffe_id,
        parent_id: args.parent_id,
        selectors: args.selectors,
        ticket: args.ticket,
        reason: args.reason,
        ttl_seconds: args.ttl,
        svid_ttl_seconds: args.svid_ttl.unwrap_or(0),
        require_approval: args.require_approval,
    };
    let s = admin
        .call(|mut c| async move { c.open_session(request).await })
        .await?;
    print(&s, Printer::new(args.connect.output))
}

async fn list(args: SessionListArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let mut sessions = Vec::new();
    let mut token = String::new();
    loop {
        let request = ListSessionsRequest {
            state: args.state.clone().unwrap_or_default(),
            ticket: args.ticket.clone().unwrap_or_default(),
            page_size: PAGE_SIZE,
            page_token: token.clone(),
        };
        let page = admin
            .call(|mut c| async move { c.list_sessions(request).await })
            .await?;
        if printer.is_json() {
            for s in &page.sessions {
                printer.json(&SessionJson::new(s))?;
            }
        } else {
            sessions.extend(page.sessions);
        }
        if page.next_page_token.is_empty() || page.next_page_token == token {
            break;
        }
        token = page.next_page_token;
    }
    if !printer.is_json() {
        if sessions.is_empty() {
            printer.text("No sessions\n")?;
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = sessions
            .iter()
            .map(|s| {
                vec![
                    s.id.clone(),
                    s.state.clone(),
                    s.ticket.clone(),
                    s.spiffe_id.clone(),
                    s.requester.clone(),
                    format_rfc3339(s.expires_at),
                ]
            })
            .collect();
        printer.text(&table(
            &[
                "ID",
                "STATE",
                "TICKET",
                "SPIFFE ID",
                "REQUESTER",
                "EXPIRES AT",
            ],
            &rows,
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print(s: &pb::Session, printer: Printer) -> anyhow::Result<ExitCode> {
    if printer.is_json() {
        printer.json(&SessionJson::new(s))?;
        return Ok(ExitCode::SUCCESS);
    }
    let time = |t: i64| {
        if t > 0 {
            format_rfc3339(t)
        } else {
            "-".to_owned()
        }
    };
    let or_dash = |t: &str| {
        if t.is_empty() {
            "-".to_owned()
        } else {
            t.to_owned()
        }
    };
    let mut rows = vec![
        ("ID", s.id.clone()),
        ("State", s.state.clone()),
        ("SPIFFE ID", s.spiffe_id.clone()),
        ("Parent ID", s.parent_id.clone()),
        ("Selectors", s.selectors.join(" ")),
        ("Ticket", s.ticket.clone()),
        ("Reason", s.reason.clone()),
        ("Requester", s.requester.clone()),
        (
            "Approval",
            if s.approval_required {
                or_dash(&s.approver)
            } else {
                "not required".to_owned()
            },
        ),
        ("Opened at", time(s.opened_at)),
        ("Approved at", time(s.approved_at)),
        ("Expires at", time(s.expires_at)),
        ("Ended at", time(s.ended_at)),
        ("SVID TTL", format!("{}s", s.svid_ttl)),
    ];
    if !s.end_reason.is_empty() {
        rows.push(("End reason", s.end_reason.clone()));
    }
    if !s.pending_crl_servers.is_empty() {
        rows.push((
            "CRLs pending on",
            format!(
                "{} (down or cut from the store: their CRLs list the serials when they return; \
                 the SVIDs expire within the SVID TTL anyway)",
                s.pending_crl_servers.join(", ")
            ),
        ));
    }
    rows.push((
        "Serials",
        if s.serials.is_empty() {
            "-".to_owned()
        } else {
            s.serials
                .iter()
                .map(|x| format!("{} (until {})", x.serial, format_rfc3339(x.not_after)))
                .collect::<Vec<_>>()
                .join(", ")
        },
    ));
    rows.push((
        "JWT ids",
        if s.jwts.is_empty() {
            "-".to_owned()
        } else {
            s.jwts
                .iter()
                .map(|j| {
                    format!(
                        "{} (aud {}, until {})",
                        j.jti,
                        j.audience.join(" "),
                        format_rfc3339(j.expires_at)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
    ));
    printer.text(&block(&rows))?;
    Ok(ExitCode::SUCCESS)
}
