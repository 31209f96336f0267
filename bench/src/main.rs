//! `sigil-bench`: Sigil's benchmark harness (issue 8).
//!
//! ```text
//! cargo build --release --workspace
//! target/release/sigil-bench            # the full run: fits in 10 minutes on 2 cores
//! target/release/sigil-bench --quick    # everything at small sizes, in under a minute
//!                                       # (CI runs target/debug/sigil-bench --quick)
//! ```
//!
//! It starts the real server and agent on loopback in a temporary directory (each in a process
//! of its own: this executable re-executed in a server, agent or baseline role, see
//! [`children`]), drives them through their real APIs, and prints one Markdown table:
//! measurement, our figure, a baseline measured in the same run, the ratio, the target, and
//! whether it is met. Progress goes to stderr; the table to stdout.
//!
//! 1. Issuance ([`small::issuance`]): X509-SVIDs per server CPU-second through
//!    `BatchNewX509SVID`, against ring P-256 verify+sign pairs per CPU-second of one thread;
//!    `cfssl serve` under the same load as a real peer ([`cfssl`], full runs only); the same
//!    load with the keys in SoftHSM2.
//! 2. Workload API latency ([`small::latency`]): first `FetchX509SVID` message over a fresh
//!    connection against a bare unary call to a trivial tonic service over a fresh connection
//!    through the same listener type; JWT-SVID fetches; `unix:sha256` attestation cold and
//!    cached ([`small::attestation`]).
//! 3. Concurrency ([`small::concurrency`]): agent memory per open stream and the time to push one
//!    rotation to all of them, with the CPU time the agent, the server and this process's
//!    workload clients spend per rotation.
//! 4. Propagation ([`small::propagation`]): entry created (or deleted) through the admin API
//!    until an open workload stream shows it.
//! 5. Scale ([`scale::run`]): a server with many entries and many simulated agents, and one
//!    agent with many entries (its full sync, its memory, one rotation pushed to as many
//!    streams on it as measurement 3 opens); the store on disk and its records tree by tree.
//! 6. Broker ([`broker::run`]): the `sigil-broker` binary (built beside this one) against
//!    direct mTLS: new-connection latency in both record modes, stream throughput, Cedar
//!    decisions per second, revocation to cut.
//! 7. Several servers ([`ha::run`]): issuance with two servers on one PostgreSQL database
//!    against one sled server in the same run, and an entry created through one server until
//!    a workload of the other server's agent shows it (skipped when PostgreSQL is absent).
//!
//! `--quick` makes no timing assertion: it exits 0 unless something breaks. Every loop is
//! bounded in count and time; only loopback addresses are used.
//!
//! `sigil-bench instructions` ([`instructions`]) counts instructions per SVID on the server's
//! in-process signing path against a ring verify+sign pair under callgrind: on demand, not in
//! CI.
#![forbid(unsafe_code)]

mod broker;
mod cfssl;
mod children;
mod clients;
mod crypto;
mod ha;
mod instructions;
mod procs;
mod report;
mod scale;
mod small;
mod topology;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::report::Row;

const USAGE: &str = "\
usage: sigil-bench [--quick] [--only SECTION[,SECTION...]]
       sigil-bench instructions [--out DIR]

  --quick   every measurement at a small size, in under a minute; no timing assertions
  --only    run only these sections: issuance, latency, concurrency, propagation, scale,
            broker (needs sigil-broker beside this executable: cargo build --release --workspace),
            ha (two servers on PostgreSQL; skipped with a notice when PostgreSQL is not
            installed: apt-get install postgresql)

Prints one Markdown table on stdout (progress on stderr). Exit status 0 unless something
breaks; a missed target is reported in the table, not in the exit status.

`instructions` counts instructions per X509-SVID on the server's in-process signing path
against a ring P-256 verify+sign pair under valgrind's callgrind (apt-get install valgrind),
and keeps the profile in DIR; on demand, about a minute.";

/// The sections of a run, in order.
const SECTIONS: [&str; 7] = [
    "issuance",
    "latency",
    "concurrency",
    "propagation",
    "scale",
    "broker",
    "ha",
];

/// Sizes and time bounds of one run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// `--quick`.
    pub(crate) quick: bool,
    /// How long each issuance load runs (one agent, then several).
    pub(crate) issuance_time: Duration,
    /// How long each crypto baseline runs (once before, once after what it is compared with).
    pub(crate) crypto_time: Duration,
    /// Fresh connections for the Workload API latency (each: ours, plain, front door).
    pub(crate) latency_connections: usize,
    /// JWT-SVID fetches served from the agent's cache.
    pub(crate) jwt_cached: usize,
    /// JWT-SVID fetches the server must sign (a new audience each).
    pub(crate) jwt_signed: usize,
    /// Cold `unix:sha256` attestations (each hashes the executable).
    pub(crate) sha256_cold: usize,
    /// Cached attestations.
    pub(crate) attest_cached: usize,
    /// Streams held open on one agent.
    pub(crate) streams: usize,
    /// Rotations pushed to them.
    pub(crate) pushes: usize,
    /// Create-then-delete propagation trials.
    pub(crate) propagation_trials: usize,
    /// Entries on the scale server.
    pub(crate) scale_entries: usize,
    /// Simulated agents on the scale server (as many as fit the budget, up to this).
    pub(crate) scale_agents: usize,
    /// Entries authorized for the one real agent of the scale test.
    pub(crate) agent_entries: usize,
    /// Entry changes timed on the scale server (and on the empty one, for the baseline).
    pub(crate) change_trials: usize,
    /// The time the whole run may take.
    pub(crate) budget: Duration,
}

// === impl Plan ===

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                issuance_time: Duration::from_millis(1500),
                crypto_time: Duration::from_millis(500),
                latency_connections: 100,
                jwt_cached: 100,
                jwt_signed: 20,
                sha256_cold: 3,
                attest_cached: 200,
                streams: 50,
                pushes: 2,
                propagation_trials: 10,
                scale_entries: 1_000,
                scale_agents: 10,
                agent_entries: 200,
                change_trials: 5,
                // A dev build (CI runs one) is several times slower: its phases get the room.
                budget: Duration::from_secs(if cfg!(debug_assertions) { 240 } else { 55 }),
            }
        } else {
            Self {
                quick,
                issuance_time: Duration::from_secs(8),
                crypto_time: Duration::from_secs(3),
                latency_connections: 1_000,
                jwt_cached: 1_000,
                jwt_signed: 200,
                sha256_cold: 10,
                attest_cached: 2_000,
                streams: 1_000,
                pushes: 5,
                propagation_trials: 100,
                scale_entries: 100_000,
                scale_agents: 1_000,
                agent_entries: 10_000,
                change_trials: 50,
                budget: Duration::from_secs(570),
            }
        }
    }
}

/// What a run shares: its plan, its temporary directory, its rows, and who it runs as.
#[derive(Debug)]
pub(crate) struct Harness {
    /// Sizes and bounds.
    pub(crate) plan: Plan,
    /// Everything the run writes lives here (removed at the end).
    pub(crate) dir: tempfile::TempDir,
    /// The table so far.
    pub(crate) rows: Vec<Row>,
    /// This process's uid and gid (the workload identity the agents grant).
    pub(crate) uid: u32,
    /// This process's gid.
    pub(crate) gid: u32,
    started: Instant,
}

// === impl Harness ===

impl Harness {
    /// Writes a progress line to stderr.
    pub(crate) fn note(&self, message: &str) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let _ = writeln!(std::io::stderr().lock(), "[{elapsed:6.1}s] {message}");
    }

    /// The end of the run's budget.
    pub(crate) fn deadline(&self) -> Instant {
        self.started + self.plan.budget
    }

    /// `now + want`, but never past the run's budget.
    pub(crate) fn phase_deadline(&self, want: Duration) -> Instant {
        (Instant::now() + want).min(self.deadline())
    }

    /// The `unix:uid` selector of this process.
    pub(crate) fn uid_selector(&self) -> String {
        format!("unix:uid:{}", self.uid)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(result) = children::dispatch(&args) {
        return exit(result);
    }
    if let Some(result) = instructions::dispatch(&args) {
        return exit(result);
    }
    if args.first().map(String::as_str) == Some("instructions") {
        return exit(instructions::run(&args[1..]));
    }
    exit(run_harness(&args))
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(std::io::stderr().lock(), "sigil-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_harness(args: &[String]) -> anyhow::Result<()> {
    let mut quick = false;
    let mut only: BTreeSet<String> = SECTIONS.iter().map(|s| (*s).to_owned()).collect();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--only" => {
                let list = args.next().context("--only needs a list of sections")?;
                only = list.split(',').map(str::to_owned).collect();
                if let Some(unknown) = only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    bail!("unknown section {unknown:?}\n{USAGE}");
                }
            }
            "-h" | "--help" => {
                writeln!(std::io::stdout().lock(), "{USAGE}")?;
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let meta = std::fs::metadata("/proc/self").context("cannot read /proc/self")?;
    let dir = tempfile::Builder::new()
        .prefix("sigil-bench.")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let mut harness = Harness {
        plan: Plan::new(quick),
        dir,
        rows: Vec::new(),
        uid: std::os::unix::fs::MetadataExt::uid(&meta),
        gid: std::os::unix::fs::MetadataExt::gid(&meta),
        started: Instant::now(),
    };
    harness.note(&format!(
        "sigil-bench {} run in {}",
        if quick { "quick" } else { "full" },
        harness.dir.path().display()
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let facts = small::run(&mut harness, &only).await?;
        if only.contains("scale") {
            scale::run(&mut harness, &facts).await?;
        }
        if only.contains("broker") {
            broker::run(&mut harness).await?;
        }
        if only.contains("ha") {
            ha::run(&mut harness).await?;
        }
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    // The table is printed even when a later section broke, with what was measured.
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", report::table(&harness.rows))?;
    writeln!(
        out,
        "sigil-bench {}: {} rows in {:.0} s",
        if quick { "--quick" } else { "full run" },
        harness.rows.len(),
        harness.started.elapsed().as_secs_f64()
    )?;
    result
}
