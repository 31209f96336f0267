//! `sigil-server`: the Sigil server daemon and its operator commands.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sigil_server::config::{LogFormat, Overrides, ServerConfig};
use sigil_server::server::{Server, Shutdown};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// The Sigil server: the trust domain's signing authority.
///
/// It signs X509-SVIDs and JWT-SVIDs for the agents that attest to it, and keeps registration
/// entries and attested agents in its store.
#[derive(Debug, Parser)]
#[command(name = "sigil-server", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server daemon.
    ///
    /// SIGTERM stops it gracefully (open streams get 5 s to drain, then exit 0); SIGINT stops
    /// it at once.
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Configuration file (TOML). Every key is documented in examples/config/server.toml.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Trust domain this server is the authority for (overrides `trust_domain`).
    #[arg(long, value_name = "TD")]
    trust_domain: Option<String>,
    /// Address of the agent-facing API, IP:PORT (overrides `bind_address`; default 0.0.0.0:8081).
    #[arg(long, value_name = "ADDR")]
    bind_address: Option<String>,
    /// Data directory for the store and CA keys (overrides `data_dir`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,
    /// Admin socket path (overrides `admin_socket`).
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<String>,
    /// Log level: error, warn, info, debug, trace (overrides `log_level`; default info).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log format: text or json (overrides `log_format`; default text).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            report(&error);
            ExitCode::FAILURE
        }
    }
}

#[expect(
    clippy::print_stderr,
    reason = "the fatal error of a command goes to stderr"
)]
fn report(error: &anyhow::Error) {
    eprintln!("sigil-server: {error:#}");
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?,
        ),
        None => None,
    };
    let overrides = Overrides {
        trust_domain: args.trust_domain,
        bind_address: args.bind_address,
        data_dir: args.data_dir,
        admin_socket: args.admin_socket,
        log_level: args.log_level,
        log_format: args.log_format,
    };
    let config = ServerConfig::from_sources(file.as_deref(), overrides)?;
    init_logging(&config);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let server = Server::start(config).await?;
        let shutdown = async move {
            tokio::select! {
                _ = sigterm.recv() => { info!("SIGTERM: shutting down gracefully"); Shutdown::Graceful }
                _ = sigint.recv() => { info!("SIGINT: shutting down now"); Shutdown::Immediate }
            }
        };
        server.run(shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn init_logging(config: &ServerConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIGIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(config.log_level.as_str()));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
