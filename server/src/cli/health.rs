//! `sigil-server healthcheck`.

use std::error::Error as _;
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;
use sigil_proto::admin::HealthcheckRequest;
use tonic::Code;

use super::ConnectArgs;
use super::client::Admin;
use super::output::{Printer, block};
use super::time::{format_rfc3339, format_with_distance, now_unix};

/// Flags of `healthcheck`.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Serialize)]
struct HealthJson<'a> {
    id: &'a str,
    status: &'static str,
    trust_domain: &'a str,
    bundle_sequence: u64,
    active_authority_expires_at: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    warning: &'a str,
}

pub(super) async fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let health = admin
        .call_raw(|mut c| async move { c.healthcheck(HealthcheckRequest {}).await })
        .await
        .map_err(|status| {
            if status.code() == Code::Unavailable && status.source().is_none() {
                anyhow::anyhow!(
                    "the server at {} answers but is not healthy: {} (see the server's log)",
                    admin.socket().display(),
                    status.message()
                )
            } else {
                admin.status_error(&status)
            }
        })?;
    if printer.is_json() {
        printer.json(&HealthJson {
            id: &health.trust_domain,
            status: if health.warning.is_empty() {
                "healthy"
            } else {
                "degraded"
            },
            trust_domain: &health.trust_domain,
            bundle_sequence: health.bundle_sequence,
            active_authority_expires_at: format_rfc3339(health.active_authority_expires_at),
            warning: &health.warning,
        })?;
    } else {
        let text = block(&[
            ("Trust domain", health.trust_domain.clone()),
            ("Bundle sequence", health.bundle_sequence.to_string()),
            (
                "Active CA expires at",
                format_with_distance(health.active_authority_expires_at, now_unix()),
            ),
        ]);
        if health.warning.is_empty() {
            printer.text(&format!("Server is healthy.\n{text}"))?;
        } else {
            printer.text(&format!(
                "Server is serving, degraded: {}.\n{text}",
                health.warning
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
