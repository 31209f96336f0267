//! `sigil-server agent`: list, show, evict and ban attested agents.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;
use sigil_proto::admin::{self as pb, AgentRequest, ListAgentsRequest};

use super::client::Admin;
use super::output::{Printer, block, count, table};
use super::time::{format_rfc3339, format_with_distance, now_unix};
use super::{ConnectArgs, spiffe_id};

/// Agents asked for per `ListAgents` page.
const PAGE_SIZE: u32 = 1000;

/// `sigil-server agent ...`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List every attested agent.
    List(AgentListArgs),
    /// Show one attested agent.
    Show(AgentIdArgs),
    /// Evict an agent: delete its record so it must attest again (a join-token agent needs a
    /// new token).
    Evict(AgentIdArgs),
    /// Ban an agent: it can no longer renew its SVID or sync, and its record stays so it cannot
    /// attest again.
    Ban(AgentIdArgs),
}

/// Flags of `agent list`.
#[derive(Debug, Args)]
pub struct AgentListArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of the `agent` commands that name one agent.
#[derive(Debug, Args)]
pub struct AgentIdArgs {
    /// SPIFFE ID of the agent (as shown by `agent list`).
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    spiffe_id: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// An agent as JSON.
#[derive(Debug, Serialize)]
struct AgentJson<'a> {
    id: &'a str,
    spiffe_id: &'a str,
    attestation_type: &'a str,
    serial: &'a str,
    expires_at: String,
    banned: bool,
    created_at: String,
    updated_at: String,
    selectors: &'a [String],
}

// === impl AgentJson ===

impl<'a> AgentJson<'a> {
    fn new(a: &'a pb::Agent) -> Self {
        Self {
            id: &a.spiffe_id,
            spiffe_id: &a.spiffe_id,
            attestation_type: &a.attestation_type,
            serial: &a.serial,
            expires_at: format_rfc3339(a.expires_at),
            banned: a.banned,
            created_at: format_rfc3339(a.created_at),
            updated_at: format_rfc3339(a.updated_at),
            selectors: &a.selectors,
        }
    }
}

pub(super) async fn execute(command: AgentCommand) -> anyhow::Result<ExitCode> {
    match command {
        AgentCommand::List(args) => list(args).await,
        AgentCommand::Show(args) => one(args, Action::Show).await,
        AgentCommand::Evict(args) => one(args, Action::Evict).await,
        AgentCommand::Ban(args) => one(args, Action::Ban).await,
    }
}

async fn list(args: AgentListArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let mut agents = Vec::new();
    let mut token = String::new();
    loop {
        let request = ListAgentsRequest {
            page_size: PAGE_SIZE,
            page_token: token.clone(),
        };
        let page = admin
            .call(|mut c| async move { c.list_agents(request).await })
            .await?;
        if printer.is_json() {
            for agent in &page.agents {
                printer.json(&AgentJson::new(agent))?;
            }
        } else {
            agents.extend(page.agents);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        if page.next_page_token == token {
            return Err(anyhow::anyhow!(
                "the server sent the same page token twice; stopping"
            ));
        }
        token = page.next_page_token;
    }
    if !printer.is_json() {
        if agents.is_empty() {
            printer.text("No attested agents\n")?;
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = agents
            .iter()
            .map(|a| {
                vec![
                    a.spiffe_id.clone(),
                    a.attestation_type.clone(),
                    a.serial.clone(),
                    format_rfc3339(a.expires_at),
                    if a.banned { "yes" } else { "no" }.to_owned(),
                ]
            })
            .collect();
        let header = [
            "SPIFFE ID",
            "ATTESTATION",
            "SERIAL",
            "SVID EXPIRES AT",
            "BANNED",
        ];
        printer.text(&table(&header, &rows))?;
        printer.text(&format!(
            "\nFound {}\n",
            count(agents.len(), "attested agent", "attested agents")
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Show,
    Evict,
    Ban,
}

async fn one(args: AgentIdArgs, action: Action) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = AgentRequest {
        spiffe_id: args.spiffe_id,
    };
    let agent = admin
        .call(|mut c| async move {
            match action {
                Action::Show => c.get_agent(request).await,
                Action::Evict => c.evict_agent(request).await,
                Action::Ban => c.ban_agent(request).await,
            }
        })
        .await?;
    if printer.is_json() {
        printer.json(&AgentJson::new(&agent))?;
        return Ok(ExitCode::SUCCESS);
    }
    let text = match action {
        Action::Show => agent_text(&agent),
        Action::Evict => format!(
            "Evicted agent {}: it must attest again to get an SVID\n",
            agent.spiffe_id
        ),
        Action::Ban => format!(
            "Banned agent {}: it can no longer renew its SVID or attest again\n",
            agent.spiffe_id
        ),
    };
    printer.text(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn agent_text(a: &pb::Agent) -> String {
    block(&[
        ("SPIFFE ID", a.spiffe_id.clone()),
        ("Attestation type", a.attestation_type.clone()),
        ("Node selectors", a.selectors.join(" ")),
        ("SVID serial", a.serial.clone()),
        (
            "SVID expires at",
            format_with_distance(a.expires_at, now_unix()),
        ),
        ("Banned", if a.banned { "yes" } else { "no" }.to_owned()),
        ("Attested at", format_rfc3339(a.created_at)),
        ("Updated at", format_rfc3339(a.updated_at)),
    ])
}
