//! `sigil-server x509 mint` and `sigil-server jwt mint`: SVIDs minted directly for an operator.
//!
//! For an X509-SVID the CLI generates the P-256 key itself and sends only a CSR, so the private
//! key never leaves this process (or the file it is written to, mode 0600).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::Serialize;
use sigil_core::{SpiffeId, X509Bundle};
use sigil_proto::admin::{MintJwtsvidRequest, MintX509svidRequest};
use zeroize::Zeroizing;

use super::client::Admin;
use super::output::{Printer, block};
use super::time::{format_rfc3339, format_with_distance, now_unix};
use super::{ConnectArgs, seconds, spiffe_id};

/// `sigil-server x509 ...`.
#[derive(Debug, Subcommand)]
pub enum X509Command {
    /// Mint an X509-SVID and its private key (generated here; only a CSR is sent).
    Mint(X509MintArgs),
}

/// Flags of `x509 mint`.
#[derive(Debug, Args)]
pub struct X509MintArgs {
    /// SPIFFE ID of the SVID (in the server's trust domain).
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    spiffe_id: String,
    /// Lifetime (default: the server's default X509-SVID TTL; capped by the server).
    #[arg(long, value_name = "DURATION", value_parser = seconds)]
    ttl: Option<u64>,
    /// DNS name to include; repeat for several.
    #[arg(long, value_name = "NAME")]
    dns: Vec<String>,
    /// Write svid.pem, svid.key (mode 0600) and bundle.pem into this directory instead of
    /// printing them.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// `sigil-server jwt ...`.
#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Mint a JWT-SVID and print the token.
    Mint(JwtMintArgs),
}

/// Flags of `jwt mint`.
#[derive(Debug, Args)]
pub struct JwtMintArgs {
    /// SPIFFE ID of the SVID (in the server's trust domain).
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    spiffe_id: String,
    /// Audience (`aud`) of the token; repeat for several.
    #[arg(long, value_name = "AUDIENCE", required = true)]
    audience: Vec<String>,
    /// Lifetime (default: the server's default JWT-SVID TTL; capped by the server).
    #[arg(long, value_name = "DURATION", value_parser = seconds)]
    ttl: Option<u64>,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Serialize)]
struct X509Json<'a> {
    id: &'a str,
    spiffe_id: &'a str,
    expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    svid_pem: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_pem: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle_pem: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    svid_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle_path: Option<String>,
}

#[derive(Debug, Serialize)]
struct JwtJson<'a> {
    id: &'a str,
    spiffe_id: &'a str,
    audience: &'a [String],
    token: &'a str,
    expires_at: String,
}

pub(super) async fn execute_x509(command: X509Command) -> anyhow::Result<ExitCode> {
    let X509Command::Mint(args) = command;
    let printer = Printer::new(args.connect.output);
    let id = SpiffeId::new(&args.spiffe_id).context("invalid --spiffe-id")?;
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("cannot generate a P-256 key")?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .context("cannot build the certificate signing request")?;
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = MintX509svidRequest {
        spiffe_id: args.spiffe_id.clone(),
        csr: csr.der().to_vec(),
        ttl_seconds: args.ttl.unwrap_or(0),
        dns_names: args.dns.clone(),
    };
    let response = admin
        .call(|mut c| async move { c.mint_x509svid(request).await })
        .await?;
    let svid_pem = X509Bundle::from_der(id.trust_domain(), &response.cert_chain)
        .context("the server sent a certificate chain that does not parse")?
        .to_pem();
    let bundle_pem = response.bundle.map(|b| b.pem).unwrap_or_default();
    let key_pem = Zeroizing::new(key.serialize_pem());
    let expires_at = format_rfc3339(response.expires_at);

    let Some(dir) = &args.write else {
        if printer.is_json() {
            printer.json(&X509Json {
                id: &args.spiffe_id,
                spiffe_id: &args.spiffe_id,
                expires_at,
                svid_pem: Some(&svid_pem),
                key_pem: Some(&key_pem),
                bundle_pem: Some(&bundle_pem),
                svid_path: None,
                key_path: None,
                bundle_path: None,
            })?;
        } else {
            let header = block(&[
                ("SPIFFE ID", args.spiffe_id.clone()),
                (
                    "Expires at",
                    format_with_distance(response.expires_at, now_unix()),
                ),
            ]);
            // PEM readers skip the label lines between the sections.
            let text = Zeroizing::new(format!(
                "{header}\nX509-SVID:\n{svid_pem}\nPrivate key:\n{}\nBundle:\n{bundle_pem}",
                key_pem.as_str(),
            ));
            printer.text(&text)?;
        }
        return Ok(ExitCode::SUCCESS);
    };

    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let svid_path = dir.join("svid.pem");
    let key_path = dir.join("svid.key");
    let bundle_path = dir.join("bundle.pem");
    write_file(&key_path, key_pem.as_bytes(), 0o600)?;
    write_file(&svid_path, svid_pem.as_bytes(), 0o644)?;
    write_file(&bundle_path, bundle_pem.as_bytes(), 0o644)?;
    if printer.is_json() {
        printer.json(&X509Json {
            id: &args.spiffe_id,
            spiffe_id: &args.spiffe_id,
            expires_at,
            svid_pem: None,
            key_pem: None,
            bundle_pem: None,
            svid_path: Some(svid_path.display().to_string()),
            key_path: Some(key_path.display().to_string()),
            bundle_path: Some(bundle_path.display().to_string()),
        })?;
    } else {
        printer.text(&format!(
            "Minted an X509-SVID for {}, expiring at {}\nX509-SVID   : {}\nPrivate key : {}\nBundle      : {}\n",
            args.spiffe_id,
            format_with_distance(response.expires_at, now_unix()),
            svid_path.display(),
            key_path.display(),
            bundle_path.display(),
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn execute_jwt(command: JwtCommand) -> anyhow::Result<ExitCode> {
    let JwtCommand::Mint(args) = command;
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let request = MintJwtsvidRequest {
        spiffe_id: args.spiffe_id.clone(),
        audience: args.audience.clone(),
        ttl_seconds: args.ttl.unwrap_or(0),
    };
    let response = admin
        .call(|mut c| async move { c.mint_jwtsvid(request).await })
        .await?;
    if printer.is_json() {
        printer.json(&JwtJson {
            id: &args.spiffe_id,
            spiffe_id: &args.spiffe_id,
            audience: &args.audience,
            token: &response.token,
            expires_at: format_rfc3339(response.expires_at),
        })?;
    } else {
        printer.text(&format!("{}\n", response.token))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `contents` to `path` atomically: into a new file created with `mode` (so a key is
/// never readable by others, even briefly), then renamed over `path`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(error) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(error).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}
