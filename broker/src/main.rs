//! `sigil-broker`: the session broker daemon.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sigil_broker::BrokerConfig;

/// Sigil's session broker: an mTLS proxy in front of a privileged target that checks every
/// connection of a SPIFFE identity against Cedar policies, cuts live connections when their
/// session is revoked, closed or over, and records everything in the server's audit chain.
#[derive(Debug, Parser)]
#[command(name = "sigil-broker", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (SIGHUP reloads the policies; SIGTERM stops it).
    Run {
        /// The configuration file (see examples/config/broker.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a Cedar policy file against the broker's schema, and exit 1 if it does not
    /// validate.
    CheckPolicy {
        /// The policy file.
        #[arg(value_name = "FILE")]
        policy: PathBuf,
    },
    /// Print the Cedar schema policies are validated against.
    Schema,
    /// Time DECISIONS connect decisions of a session identity against the policy file and
    /// print `DECISIONS_PER_SECOND <n>` (for sigil-bench).
    #[command(hide = true)]
    BenchPolicy {
        /// The policy file.
        policy: PathBuf,
        /// How many decisions.
        decisions: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckPolicy { policy } => check_policy(&policy),
        Command::BenchPolicy { policy, decisions } => {
            sigil_broker::policy::decisions_per_second(&policy, decisions)
                .map(|rate| {
                    print_out(&format!("DECISIONS_PER_SECOND {rate:.0}"));
                    ExitCode::SUCCESS
                })
                .map_err(anyhow::Error::from)
        }
        Command::Schema => {
            print_out(sigil_broker::policy::SCHEMA.trim_start());
            Ok(ExitCode::SUCCESS)
        }
    };
    sigil_daemon::exit_code("sigil-broker", result)
}

#[expect(clippy::print_stdout, reason = "the command's output")]
fn print_out(text: &str) {
    println!("{text}");
}

fn check_policy(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let count = sigil_broker::policy::check_file(path)?;
    print_out(&format!("{}: {count} policies, valid", path.display()));
    Ok(ExitCode::SUCCESS)
}

fn run(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let env = std::env::var(sigil_core::endpoint::ENDPOINT_SOCKET_ENV).ok();
    let config = BrokerConfig::from_file(&text, env.as_deref())?;
    sigil_daemon::init_logging(config.log_level, config.log_format);
    let open_files = sigil_daemon::limits::raise_open_files_limit();
    tracing::debug!(open_files, "open files limit");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown =
            sigil_daemon::shutdown_signal().context("cannot watch SIGTERM and SIGINT")?;
        sigil_broker::run(config, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}
