//! `sigil-server token generate`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;
use sigil_proto::admin::GenerateJoinTokenRequest;

use super::client::Admin;
use super::output::{Printer, block};
use super::time::{format_rfc3339, format_with_distance, now_unix};
use super::{ConnectArgs, seconds, spiffe_id};

/// `sigil-server token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Generate a one-time join token for an agent to attest with.
    Generate(TokenGenerateArgs),
}

/// Flags of `token generate`.
#[derive(Debug, Args)]
pub struct TokenGenerateArgs {
    /// Also create an alias entry with this SPIFFE ID, parented to the agent that uses the
    /// token, so workload entries can be parented to a stable name.
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    spiffe_id: Option<String>,
    /// How long the token stays usable (default 10m, at most 7d).
    #[arg(long, value_name = "DURATION", value_parser = seconds)]
    ttl: Option<u64>,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Serialize)]
struct TokenJson<'a> {
    id: &'a str,
    token: &'a str,
    agent_spiffe_id: &'a str,
    alias_spiffe_id: Option<&'a str>,
    expires_at: String,
}

pub(super) async fn execute(command: TokenCommand) -> anyhow::Result<ExitCode> {
    let TokenCommand::Generate(args) = command;
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = GenerateJoinTokenRequest {
        ttl_seconds: args.ttl.unwrap_or(0),
        spiffe_id: args.spiffe_id.unwrap_or_default(),
    };
    let token = admin
        .call(|mut c| async move { c.generate_join_token(request).await })
        .await?;
    let alias = (!token.alias_spiffe_id.is_empty()).then_some(token.alias_spiffe_id.as_str());
    if printer.is_json() {
        printer.json(&TokenJson {
            id: &token.token,
            token: &token.token,
            agent_spiffe_id: &token.agent_spiffe_id,
            alias_spiffe_id: alias,
            expires_at: format_rfc3339(token.expires_at),
        })?;
    } else {
        let mut rows = vec![
            ("Token", token.token.clone()),
            ("Agent SPIFFE ID", token.agent_spiffe_id.clone()),
        ];
        if let Some(alias) = alias {
            rows.push(("Alias SPIFFE ID", alias.to_owned()));
        }
        rows.push((
            "Expires at",
            format_with_distance(token.expires_at, now_unix()),
        ));
        printer.text(&block(&rows))?;
    }
    Ok(ExitCode::SUCCESS)
}
