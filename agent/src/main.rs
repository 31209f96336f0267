//! `sigil-agent`: the Sigil node agent and its Workload API client commands.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use sigil_agent::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
        .and_then(|runtime| runtime.block_on(cli::execute(cli)));
    sigil_daemon::exit_code("sigil-agent", result)
}
