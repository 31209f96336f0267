//! `sigil-server bundle`: the server's own trust bundle and federated bundles.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use sigil_proto::admin::{
    self as pb, DeleteFederatedBundleRequest, GetBundleRequest, ListFederatedBundlesRequest,
    SetFederatedBundleRequest,
};

use super::ConnectArgs;
use super::client::Admin;
use super::output::{Printer, count};
use super::time::format_rfc3339;

/// `sigil-server bundle ...`.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Show the server's own trust bundle (every current X.509 authority).
    Show(BundleShowArgs),
    /// List the bundles of federated trust domains.
    List(BundleListArgs),
    /// Set (create or replace) the bundle of a federated trust domain.
    Set(BundleSetArgs),
    /// Delete the bundle of a federated trust domain.
    Delete(BundleDeleteArgs),
}

/// A bundle's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[non_exhaustive]
pub enum BundleFormat {
    /// The X.509 authorities as PEM certificates.
    Pem,
    /// A SPIFFE bundle (JWKS JSON with X.509 and JWT authorities).
    Spiffe,
}

/// Flags of `bundle show`.
#[derive(Debug, Args)]
pub struct BundleShowArgs {
    /// Format of the bundle in text output.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = BundleFormat::Pem)]
    format: BundleFormat,
    /// Print the certificate revocation lists instead (one per X.509 authority, PEM in text
    /// output, with their numbers, validity and revoked serials in JSON).
    #[arg(long)]
    crl: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `bundle list`.
#[derive(Debug, Args)]
pub struct BundleListArgs {
    /// Format of the bundles in text output.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = BundleFormat::Pem)]
    format: BundleFormat,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `bundle set`.
#[derive(Debug, Args)]
pub struct BundleSetArgs {
    /// The federated trust domain, as spiffe://other.org or other.org.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: String,
    /// File holding the bundle (`-` reads stdin).
    #[arg(long, value_name = "FILE")]
    path: PathBuf,
    /// Format of the file.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = BundleFormat::Pem)]
    format: BundleFormat,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `bundle delete`.
#[derive(Debug, Args)]
pub struct BundleDeleteArgs {
    /// The federated trust domain, as spiffe://other.org or other.org.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// A bundle as JSON: `spiffe_bundle` is the SPIFFE bundle document itself.
#[derive(Debug, Serialize)]
struct BundleJson<'a> {
    id: &'a str,
    trust_domain: &'a str,
    sequence: u64,
    x509_authorities: usize,
    pem: &'a str,
    spiffe_bundle: serde_json::Value,
}

// === impl BundleJson ===

impl<'a> BundleJson<'a> {
    fn new(b: &'a pb::Bundle) -> Self {
        Self {
            id: &b.trust_domain,
            trust_domain: &b.trust_domain,
            sequence: b.sequence,
            x509_authorities: authority_count(&b.pem),
            pem: &b.pem,
            spiffe_bundle: serde_json::from_slice(&b.spiffe_bundle)
                .unwrap_or(serde_json::Value::Null),
        }
    }
}

pub(super) async fn execute(command: BundleCommand) -> anyhow::Result<ExitCode> {
    match command {
        BundleCommand::Show(args) => show(args).await,
        BundleCommand::List(args) => list(args).await,
        BundleCommand::Set(args) => set(args).await,
        BundleCommand::Delete(args) => delete(args).await,
    }
}

async fn show(args: BundleShowArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let bundle = admin
        .call(|mut c| async move { c.get_bundle(GetBundleRequest {}).await })
        .await?;
    if args.crl {
        for crl in &bundle.crls {
            if printer.is_json() {
                printer.json(&serde_json::json!({
                    "id": crl.authority_id,
                    "authority_id": crl.authority_id,
                    "crl_number": crl.crl_number,
                    "this_update": format_rfc3339(crl.this_update),
                    "next_update": format_rfc3339(crl.next_update),
                    "revoked_serials": crl.revoked_serials,
                    "pem": crl_pem(&crl.der),
                }))?;
            } else {
                printer.text(&crl_pem(&crl.der))?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if printer.is_json() {
        printer.json(&BundleJson::new(&bundle))?;
    } else {
        printer.text(&bundle_text(&bundle, args.format)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(args: BundleListArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let response = admin
        .call(|mut c| async move {
            c.list_federated_bundles(ListFederatedBundlesRequest {})
                .await
        })
        .await?;
    if printer.is_json() {
        for bundle in &response.bundles {
            printer.json(&BundleJson::new(bundle))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if response.bundles.is_empty() {
        printer.text("No federated bundles\n")?;
        return Ok(ExitCode::SUCCESS);
    }
    for bundle in &response.bundles {
        printer.text(&format!(
            "Trust domain : {}\nSequence     : {}\n{}\n",
            bundle.trust_domain,
            bundle.sequence,
            bundle_text(bundle, args.format)?
        ))?;
    }
    printer.text(&format!(
        "Found {}\n",
        count(
            response.bundles.len(),
            "federated bundle",
            "federated bundles"
        )
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn set(args: BundleSetArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let bundle = if args.path.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
            .context("cannot read the bundle from stdin")?;
        bytes
    } else {
        std::fs::read(&args.path).with_context(|| format!("cannot read {}", args.path.display()))?
    };
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = SetFederatedBundleRequest {
        trust_domain: args.id,
        bundle,
        format: match args.format {
            BundleFormat::Pem => "pem",
            BundleFormat::Spiffe => "spiffe",
        }
        .to_owned(),
    };
    let bundle = admin
        .call(|mut c| async move { c.set_federated_bundle(request).await })
        .await?;
    if printer.is_json() {
        printer.json(&BundleJson::new(&bundle))?;
    } else {
        printer.text(&format!(
            "Set the bundle of {} ({})\n",
            bundle.trust_domain,
            count(
                authority_count(&bundle.pem),
                "X.509 authority",
                "X.509 authorities"
            )
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct DeletedJson<'a> {
    id: &'a str,
    trust_domain: &'a str,
    deleted: bool,
}

async fn delete(args: BundleDeleteArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = DeleteFederatedBundleRequest {
        trust_domain: args.id,
    };
    let bundle = admin
        .call(|mut c| async move { c.delete_federated_bundle(request).await })
        .await?;
    if printer.is_json() {
        printer.json(&DeletedJson {
            id: &bundle.trust_domain,
            trust_domain: &bundle.trust_domain,
            deleted: true,
        })?;
    } else {
        printer.text(&format!("Deleted the bundle of {}\n", bundle.trust_domain))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The bundle in `format`, ending with a newline.
fn bundle_text(bundle: &pb::Bundle, format: BundleFormat) -> anyhow::Result<String> {
    Ok(match format {
        BundleFormat::Pem => bundle.pem.clone(),
        BundleFormat::Spiffe => {
            let value: serde_json::Value = serde_json::from_slice(&bundle.spiffe_bundle)
                .context("the server sent a SPIFFE bundle that is not JSON")?;
            let mut text =
                serde_json::to_string_pretty(&value).context("cannot format the bundle")?;
            text.push('\n');
            text
        }
    })
}

/// A CRL as PEM (`X509 CRL`), ending with a newline.
fn crl_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN X509 CRL-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END X509 CRL-----\n");
    out
}

pub(super) fn authority_count(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}
