//! `sigil-server federation`: relationships with other trust domains, whose bundles the server
//! fetches from their bundle endpoints (docs/federation.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use sigil_proto::admin::{
    self as pb, FederationRequest, GetFederationRequest, ListFederationsRequest,
};

use super::ConnectArgs;
use super::bundle::BundleFormat;
use super::client::Admin;
use super::output::{Printer, block, count};
use super::time::format_rfc3339;

/// `sigil-server federation ...`.
#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Create a relationship: this trust domain trusts another's bundle, fetched from its
    /// bundle endpoint (one way; the other trust domain creates its own for the return way).
    Create(FederationCreateArgs),
    /// List the relationships, with how their last fetch went.
    List(FederationListArgs),
    /// Show one relationship: its endpoint, last fetch (or why it failed) and bundle.
    Show(FederationIdArgs),
    /// Change a relationship's endpoint, profile or bundle; it is fetched again at once.
    Update(FederationUpdateArgs),
    /// Delete a relationship and its trust domain's bundle: workloads stop trusting it.
    Delete(FederationIdArgs),
}

/// How a bundle endpoint authenticates itself (SPIFFE Federation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[non_exhaustive]
pub enum EndpointProfile {
    /// With an X509-SVID whose SPIFFE ID is `--endpoint-spiffe-id`, checked against the latest
    /// bundle of that ID's trust domain.
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
    /// With a Web PKI certificate for the URL's host, checked against the system's roots
    /// (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
    #[value(name = "https_web")]
    HttpsWeb,
}

impl EndpointProfile {
    fn as_str(self) -> &'static str {
        match self {
            Self::HttpsSpiffe => "https_spiffe",
            Self::HttpsWeb => "https_web",
        }
    }
}

/// Flags of `federation create`.
#[derive(Debug, Args)]
pub struct FederationCreateArgs {
    /// The federated trust domain, as spiffe://other.org or other.org.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: String,
    /// The other trust domain's bundle endpoint, https://HOST[:PORT][/PATH].
    #[arg(long, value_name = "URL")]
    bundle_endpoint_url: String,
    /// How the endpoint authenticates itself.
    #[arg(long, value_name = "PROFILE", value_enum)]
    profile: EndpointProfile,
    /// With https_spiffe: the SPIFFE ID the endpoint's X509-SVID must have (a Sigil server's
    /// is spiffe://TD/sigil/server).
    #[arg(long, value_name = "SPIFFE_ID")]
    endpoint_spiffe_id: Option<String>,
    #[command(flatten)]
    bundle: TrustBundleArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The bootstrap bundle flags.
#[derive(Debug, Args)]
pub struct TrustBundleArgs {
    /// A bundle of the federated trust domain to start from (`-` reads stdin). With
    /// https_spiffe and an endpoint in that trust domain it authenticates the first fetch, so
    /// it is required unless `bundle set` gave one; afterwards each fetched bundle is used.
    #[arg(long, value_name = "FILE")]
    trust_bundle: Option<PathBuf>,
    /// Format of --trust-bundle.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = BundleFormat::Spiffe)]
    trust_bundle_format: BundleFormat,
}

/// Flags of `federation update`: what is not given stays as it is.
#[derive(Debug, Args)]
pub struct FederationUpdateArgs {
    /// The federated trust domain, as spiffe://other.org or other.org.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: String,
    /// A new bundle endpoint URL.
    #[arg(long, value_name = "URL")]
    bundle_endpoint_url: Option<String>,
    /// A new profile.
    #[arg(long, value_name = "PROFILE", value_enum)]
    profile: Option<EndpointProfile>,
    /// A new endpoint SPIFFE ID (https_spiffe).
    #[arg(long, value_name = "SPIFFE_ID")]
    endpoint_spiffe_id: Option<String>,
    #[command(flatten)]
    bundle: TrustBundleArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `federation show` and `federation delete`.
#[derive(Debug, Args)]
pub struct FederationIdArgs {
    /// The federated trust domain, as spiffe://other.org or other.org.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `federation list`.
#[derive(Debug, Args)]
pub struct FederationListArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// A relationship as JSON.
#[derive(Debug, Serialize)]
struct FederationJson<'a> {
    id: &'a str,
    trust_domain: &'a str,
    bundle_endpoint_url: &'a str,
    profile: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    endpoint_spiffe_id: &'a str,
    created_at: String,
    updated_at: String,
    last_attempt: Option<String>,
    last_success: Option<String>,
    last_error: Option<&'a str>,
    failures: u32,
    next_poll: Option<String>,
    fetched_by: Option<&'a str>,
    bundle_sequence: Option<u64>,
    x509_authorities: usize,
    spiffe_bundle: serde_json::Value,
}

fn time(seconds: i64) -> Option<String> {
    (seconds > 0).then(|| format_rfc3339(seconds))
}

impl<'a> FederationJson<'a> {
    fn new(f: &'a pb::Federation) -> Self {
        // A missing status reads as "never fetched".
        static NEVER: pb::FederationStatus = pb::FederationStatus {
            last_attempt: 0,
            last_success: 0,
            last_error: String::new(),
            failures: 0,
            next_poll: 0,
            server_id: String::new(),
        };
        let status = f.status.as_ref().unwrap_or(&NEVER);
        let bundle = f.bundle.as_ref();
        let nonempty = |s: &'a str| (!s.is_empty()).then_some(s);
        Self {
            id: &f.trust_domain,
            trust_domain: &f.trust_domain,
            bundle_endpoint_url: &f.bundle_endpoint_url,
            profile: &f.profile,
            endpoint_spiffe_id: &f.endpoint_spiffe_id,
            created_at: format_rfc3339(f.created_at),
            updated_at: format_rfc3339(f.updated_at),
            last_attempt: time(status.last_attempt),
            last_success: time(status.last_success),
            last_error: nonempty(&status.last_error),
            failures: status.failures,
            next_poll: time(status.next_poll),
            fetched_by: nonempty(&status.server_id),
            bundle_sequence: bundle.map(|b| b.sequence),
            x509_authorities: bundle.map_or(0, |b| super::bundle::authority_count(&b.pem)),
            spiffe_bundle: bundle
                .and_then(|b| serde_json::from_slice(&b.spiffe_bundle).ok())
                .unwrap_or(serde_json::Value::Null),
        }
    }
}

pub(super) async fn execute(command: FederationCommand) -> anyhow::Result<ExitCode> {
    match command {
        FederationCommand::Create(args) => create(args).await,
        FederationCommand::List(args) => list(args).await,
        FederationCommand::Show(args) => show(args).await,
        FederationCommand::Update(args) => update(args).await,
        FederationCommand::Delete(args) => delete(args).await,
    }
}

fn read_bundle(args: &TrustBundleArgs) -> anyhow::Result<(Vec<u8>, String)> {
    let format = match args.trust_bundle_format {
        BundleFormat::Pem => "pem",
        BundleFormat::Spiffe => "spiffe",
    }
    .to_owned();
    let bytes = match &args.trust_bundle {
        None => Vec::new(),
        Some(path) if path.as_os_str() == "-" => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                .context("cannot read the trust bundle from stdin")?;
            bytes
        }
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
    };
    Ok((bytes, format))
}

async fn create(args: FederationCreateArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let (trust_bundle, trust_bundle_format) = read_bundle(&args.bundle)?;
    let request = FederationRequest {
        trust_domain: args.id,
        bundle_endpoint_url: args.bundle_endpoint_url,
        profile: args.profile.as_str().to_owned(),
        endpoint_spiffe_id: args.endpoint_spiffe_id.unwrap_or_default(),
        trust_bundle,
        trust_bundle_format,
    };
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let federation = admin
        .call(|mut c| async move { c.create_federation(request).await })
        .await?;
    print_one(printer, &federation, "Created the relationship with")?;
    Ok(ExitCode::SUCCESS)
}

async fn update(args: FederationUpdateArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let (trust_bundle, trust_bundle_format) = read_bundle(&args.bundle)?;
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let id = args.id.clone();
    let current = admin
        .call(|mut c| async move {
            c.get_federation(GetFederationRequest { trust_domain: id })
                .await
        })
        .await?;
    let profile = args
        .profile
        .map_or(current.profile.clone(), |p| p.as_str().to_owned());
    // Moving to https_web drops the endpoint ID; otherwise what is not given is kept.
    let endpoint_spiffe_id = match (&args.endpoint_spiffe_id, profile.as_str()) {
        (Some(id), _) => id.clone(),
        (None, "https_web") => String::new(),
        (None, _) => current.endpoint_spiffe_id.clone(),
    };
    let request = FederationRequest {
        trust_domain: args.id,
        bundle_endpoint_url: args
            .bundle_endpoint_url
            .unwrap_or(current.bundle_endpoint_url),
        profile,
        endpoint_spiffe_id,
        trust_bundle,
        trust_bundle_format,
    };
    let federation = admin
        .call(|mut c| async move { c.update_federation(request).await })
        .await?;
    print_one(printer, &federation, "Updated the relationship with")?;
    Ok(ExitCode::SUCCESS)
}

async fn show(args: FederationIdArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = GetFederationRequest {
        trust_domain: args.id,
    };
    let federation = admin
        .call(|mut c| async move { c.get_federation(request).await })
        .await?;
    if printer.is_json() {
        printer.json(&FederationJson::new(&federation))?;
    } else {
        printer.text(&details(&federation))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(args: FederationListArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let response = admin
        .call(|mut c| async move { c.list_federations(ListFederationsRequest {}).await })
        .await?;
    if printer.is_json() {
        for federation in &response.federations {
            printer.json(&FederationJson::new(federation))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if response.federations.is_empty() {
        printer.text("No federation relationships\n")?;
        return Ok(ExitCode::SUCCESS);
    }
    for federation in &response.federations {
        printer.text(&format!("{}\n", details(federation)))?;
    }
    printer.text(&format!(
        "Found {}\n",
        count(
            response.federations.len(),
            "federation relationship",
            "federation relationships"
        )
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn delete(args: FederationIdArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = GetFederationRequest {
        trust_domain: args.id,
    };
    let federation = admin
        .call(|mut c| async move { c.delete_federation(request).await })
        .await?;
    if printer.is_json() {
        printer.json(&serde_json::json!({
            "id": federation.trust_domain,
            "trust_domain": federation.trust_domain,
            "deleted": true,
        }))?;
    } else {
        printer.text(&format!(
            "Deleted the relationship with {} and its bundle\n",
            federation.trust_domain
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_one(printer: Printer, federation: &pb::Federation, what: &str) -> anyhow::Result<()> {
    if printer.is_json() {
        printer.json(&FederationJson::new(federation))
    } else {
        printer.text(&format!("{what} {}\n", federation.trust_domain))
    }
}

/// The text of `federation show`.
fn details(f: &pb::Federation) -> String {
    let j = FederationJson::new(f);
    let never = || "never".to_owned();
    let mut rows = vec![
        ("Trust domain", f.trust_domain.clone()),
        ("Endpoint URL", f.bundle_endpoint_url.clone()),
        ("Profile", f.profile.clone()),
    ];
    if !f.endpoint_spiffe_id.is_empty() {
        rows.push(("Endpoint ID", f.endpoint_spiffe_id.clone()));
    }
    rows.push(("Last fetch", j.last_attempt.clone().unwrap_or_else(never)));
    rows.push(("Last success", j.last_success.clone().unwrap_or_else(never)));
    if let Some(error) = j.last_error {
        rows.push(("Last error", error.to_owned()));
        rows.push(("Failures", j.failures.to_string()));
    }
    rows.push((
        "Next fetch",
        j.next_poll.clone().unwrap_or_else(|| "now".to_owned()),
    ));
    rows.push((
        "Bundle",
        match j.bundle_sequence {
            Some(sequence) => format!(
                "sequence {sequence}, {}",
                count(j.x509_authorities, "X.509 authority", "X.509 authorities")
            ),
            None => "none yet".to_owned(),
        },
    ));
    block(&rows)
}
