//! `sigil-agent`: the Sigil node agent and its Workload API client commands.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use sigil_agent::cli::{self, Cli};

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
    match runtime.block_on(cli::execute(cli)) {
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
