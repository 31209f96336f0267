//! `sigil-agent`: the Sigil node agent and its Workload API client commands.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sigil_agent::agent::{self, Shutdown};
use sigil_agent::cli::{self, Output};
use sigil_agent::config::{AgentConfig, Overrides};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// The Sigil node agent.
///
/// It attests to the Sigil server, keeps the registration entries authorized for it in sync,
/// and serves the SPIFFE Workload API on a Unix socket to the workloads of this host.
#[derive(Debug, Parser)]
#[command(name = "sigil-agent", version, propagate_version = true)]
struct Cli {
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
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Configuration file (TOML); every key is documented in examples/config/agent.toml.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The server's agent-facing API, HOST:PORT (default 127.0.0.1:8081).
    #[arg(long, value_name = "HOST:PORT")]
    server_address: Option<String>,
    /// The trust domain.
    #[arg(long, value_name = "TD")]
    trust_domain: Option<String>,
    /// One-time join token for the first start (`sigil-server token generate`).
    #[arg(long, value_name = "TOKEN")]
    join_token: Option<String>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            report(&anyhow::anyhow!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Healthcheck(c) => {
                cli::healthcheck(&cli::socket_path(c.socket_path.as_deref())?, c.output).await
            }
            Command::Api(ApiCommand::Watch(c)) => {
                cli::watch(&cli::socket_path(c.socket_path.as_deref())?, c.output).await
            }
            Command::Api(ApiCommand::Fetch(FetchCommand::X509 { client, write })) => {
                cli::fetch_x509(
                    &cli::socket_path(client.socket_path.as_deref())?,
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
                cli::fetch_jwt(
                    &cli::socket_path(client.socket_path.as_deref())?,
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
                cli::validate_jwt(
                    &cli::socket_path(client.socket_path.as_deref())?,
                    audience,
                    svid,
                    client.output,
                )
                .await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

#[expect(
    clippy::print_stderr,
    reason = "the fatal error of a command goes to stderr"
)]
fn report(error: &anyhow::Error) {
    eprintln!("sigil-agent: {error:#}");
}

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
            trust_bundle: args.trust_bundle,
            socket_path: args.socket_path,
            data_dir: args.data_dir,
            log_level: args.log_level,
            log_format: args.log_format,
        },
    )?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIGIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if config.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); Shutdown::Graceful }
            _ = sigint.recv() => { info!("SIGINT: shutting down now"); Shutdown::Immediate }
        }
    };
    agent::run(config, shutdown).await?;
    Ok(())
}
