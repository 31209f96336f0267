//! `sigil-server`: the Sigil server daemon and its operator commands.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use sigil_server::cli::{Cli, Command, RunArgs};
use sigil_server::{Overrides, Server, ServerConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Store(command) => sigil_server::cli::execute_store(command),
        Command::Admin(command) => sigil_server::cli::execute(command),
    };
    sigil_daemon::exit_code("sigil-server", result)
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
        session_only_ids: args.session_only_ids,
    };
    let config = ServerConfig::from_sources(file.as_deref(), overrides)?;
    sigil_daemon::init_logging(config.log_level, config.log_format);
    let open_files = sigil_daemon::limits::raise_open_files_limit();
    tracing::debug!(open_files, "open files limit");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let stopped = config.clone();
    let result = runtime.block_on(async move {
        let shutdown =
            sigil_daemon::shutdown_signal().context("cannot watch SIGTERM and SIGINT")?;
        let server = Server::start(config).await?;
        server.run(shutdown).await?;
        Ok(ExitCode::SUCCESS)
    });
    // Every task, and with them every handle on the store, is gone with the runtime.
    drop(runtime);
    if result.is_ok() {
        sigil_server::snapshot_store_after_stop(&stopped);
    }
    result
}
