//! The `sigil-agent` command line: the daemon (`run`) and the Workload API client commands
//! (`api fetch x509|jwt`, `api validate jwt`, `api watch`, `healthcheck`), which talk to the
//! agent's socket as a workload would.

mod api;
mod helper;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

pub use self::api::{Output, fetch_jwt, fetch_x509, healthcheck, socket_path, validate_jwt, watch};
pub use self::helper::{HelperArgs, HelperSettings};
use crate::agent;
use crate::config::{AgentConfig, Overrides};

/// The Sigil node agent.
///
/// It attests to the Sigil server, keeps the registration entries authorized for it in sync,
/// and serves the SPIFFE Workload API on a Unix socket to the workloads of this host.
#[derive(Debug, Parser)]
#[command(name = "sigil-agent", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent daemon. SIGTERM: close the socket, end streams within 5 s, exit 0.
    Run(RunArgs),
    /// Call the Workload API, as a workload would.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Exit 0 when the agent's Workload API answers.
    Healthcheck(ClientArgs),
    /// Keep an SVID, its key, the bundle and the CRLs as files in a directory for software
    /// that reads files (nginx, HAProxy, PostgreSQL), replaced as one set on every update;
    /// then signal or reload that software. Like spiffe-helper.
    Helper(HelperArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Configuration file (TOML); every key is documented in examples/config/agent.toml.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The server's agent-facing API, HOST:PORT (default 127.0.0.1:8081). Repeat it to list
    /// several servers sharing one database: the agent moves to the next when one goes away.
    #[arg(long, value_name = "HOST:PORT")]
    server_address: Vec<String>,
    /// The trust domain.
    #[arg(long, value_name = "TD")]
    trust_domain: Option<String>,
    /// One-time join token for the first start (`sigil-server token generate`).
    #[arg(long, value_name = "TOKEN")]
    join_token: Option<String>,
    /// How the agent attests: join_token (default) or x509pop (a host certificate from a CA
    /// the server trusts; the agent can attest again with it, e.g. after losing its data dir).
    #[arg(long, value_name = "ATTESTOR")]
    node_attestor: Option<String>,
    /// x509pop: PEM file of the host certificate (then any intermediate CAs).
    #[arg(long, value_name = "PATH")]
    x509pop_cert_path: Option<String>,
    /// x509pop: PEM file of the host certificate's private key (PKCS#8 or PKCS#1 RSA).
    #[arg(long, value_name = "PATH")]
    x509pop_key_path: Option<String>,
    /// PEM file of the server's authorities (`sigil-server bundle show`), trusted on the first start.
    #[arg(long, value_name = "PATH")]
    trust_bundle: Option<String>,
    /// The Workload API socket (default /tmp/sigil-agent/public/api.sock).
    #[arg(long, value_name = "PATH")]
    socket_path: Option<String>,
    /// Where the agent keeps its key, SVID and bundle (default /tmp/sigil-agent/data).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,
    /// error, warn, info, debug or trace (default info).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// text or json (default text).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// The Workload API socket (else SPIFFE_ENDPOINT_SOCKET, else /tmp/sigil-agent/public/api.sock).
    #[arg(long, value_name = "PATH")]
    socket_path: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum ApiCommand {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate a token.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Print every X509-SVID update as it arrives.
    Watch(ClientArgs),
}

#[derive(Debug, Subcommand)]
enum FetchCommand {
    /// Fetch the caller's X509-SVIDs; print SPIFFE ID, serial, validity, trust domain.
    X509 {
        #[command(flatten)]
        client: ClientArgs,
        /// Save svid.N.pem, svid.N.key (0600) and bundle.N.pem in DIR.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// Fetch JWT-SVIDs for an audience.
    Jwt {
        #[command(flatten)]
        client: ClientArgs,
        /// The audience(s), comma-separated or repeated.
        #[arg(long, value_delimiter = ',', required = true)]
        audience: Vec<String>,
        /// Only this identity (default: every identity the caller has).
        #[arg(long, value_name = "ID")]
        spiffe_id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ValidateCommand {
    /// Validate a JWT-SVID against an audience.
    Jwt {
        #[command(flatten)]
        client: ClientArgs,
        /// The audience the token must carry.
        #[arg(long)]
        audience: String,
        /// The token.
        #[arg(long)]
        svid: String,
    },
}

/// Runs the command `cli` names to completion; the process's exit status.
///
/// # Errors
///
/// The command's failure, for `main` to print.
pub async fn execute(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let done = match cli.command {
        Command::Run(args) => run(args).await,
        Command::Helper(args) => {
            let settings = HelperSettings::from_args(args)?;
            sigil_daemon::init_logging(sigil_daemon::LogLevel::Info, sigil_daemon::LogFormat::Text);
            // The exit status of --cmd's process, when it ran one.
            return helper::run(settings).await;
        }
        Command::Healthcheck(c) => {
            healthcheck(&socket_path(c.socket_path.as_deref())?, c.output).await
        }
        Command::Api(ApiCommand::Watch(c)) => {
            watch(&socket_path(c.socket_path.as_deref())?, c.output).await
        }
        Command::Api(ApiCommand::Fetch(FetchCommand::X509 { client, write })) => {
            fetch_x509(
                &socket_path(client.socket_path.as_deref())?,
                write.as_deref(),
                client.output,
            )
            .await
        }
        Command::Api(ApiCommand::Fetch(FetchCommand::Jwt {
            client,
            audience,
            spiffe_id,
        })) => {
            fetch_jwt(
                &socket_path(client.socket_path.as_deref())?,
                audience,
                spiffe_id,
                client.output,
            )
            .await
        }
        Command::Api(ApiCommand::Validate(ValidateCommand::Jwt {
            client,
            audience,
            svid,
        })) => {
            validate_jwt(
                &socket_path(client.socket_path.as_deref())?,
                audience,
                svid,
                client.output,
            )
            .await
        }
    };
    done.map(|()| std::process::ExitCode::SUCCESS)
}

/// `sigil-agent run`: the configuration, logging and signals, then the agent until a signal.
async fn run(args: RunArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?,
        ),
        None => None,
    };
    let config = AgentConfig::from_sources(
        file.as_deref(),
        Overrides {
            trust_domain: args.trust_domain,
            server_address: args.server_address,
            join_token: args.join_token,
            node_attestor: args.node_attestor,
            x509pop_cert_path: args.x509pop_cert_path,
            x509pop_key_path: args.x509pop_key_path,
            trust_bundle: args.trust_bundle,
            socket_path: args.socket_path,
            data_dir: args.data_dir,
            log_level: args.log_level,
            log_format: args.log_format,
        },
    )?;
    sigil_daemon::init_logging(config.log_level, config.log_format);
    let open_files = sigil_daemon::limits::raise_open_files_limit();
    tracing::debug!(open_files, "open files limit");
    let shutdown = sigil_daemon::shutdown_signal().context("cannot watch SIGTERM and SIGINT")?;
    agent::run(config, shutdown).await?;
    Ok(())
}
