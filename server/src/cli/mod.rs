//! The `sigil-server` command line: `run` starts the daemon; every other command is an operator
//! command that talks to a running server over its admin socket (`sigil.admin.v1`).
//!
//! Every operator command takes `--admin-socket PATH` (default
//! [`crate::config::DEFAULT_ADMIN_SOCKET`], or `SIGIL_ADMIN_SOCKET`) and
//! `--output text|json`. Text is for people: aligned blocks and tables, times in RFC 3339 UTC,
//! durations like `5m`. JSON is for scripts: one document per result, one per line for listings
//! and batches, each object carrying its identifier as the string field `id`. Errors go to
//! stderr with a non-zero exit, and say what was wrong and what to do.
//!
//! The commands are documented, with examples, in `docs/cli.md`; a test keeps that page in step
//! with this command tree.

mod agent;
mod audit;
mod bundle;
mod client;
mod entry;
mod federation;
mod health;
mod output;
mod session;
mod svid;
mod time;
mod token;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

pub use self::agent::{AgentCommand, AgentIdArgs, AgentListArgs};
pub use self::audit::{
    AuditAcknowledgeArgs, AuditCheckpointArgs, AuditCommand, AuditShowArgs, AuditVerifyArgs,
};
pub use self::bundle::{
    BundleCommand, BundleDeleteArgs, BundleFormat, BundleListArgs, BundleSetArgs, BundleShowArgs,
};
pub use self::entry::{
    EntryCommand, EntryCountArgs, EntryCreateArgs, EntryDeleteArgs, EntryOptions, EntryShowArgs,
    EntryUpdateArgs,
};
pub use self::federation::{
    EndpointProfile, FederationCommand, FederationCreateArgs, FederationIdArgs, FederationListArgs,
    FederationUpdateArgs, TrustBundleArgs,
};
pub use self::health::HealthcheckArgs;
pub use self::session::{
    SessionCommand, SessionIdArgs, SessionListArgs, SessionOpenArgs, SessionRevokeArgs,
};
pub use self::svid::{JwtCommand, JwtMintArgs, X509Command, X509MintArgs};
pub use self::token::{TokenCommand, TokenGenerateArgs};
use crate::config::DEFAULT_ADMIN_SOCKET;

/// The Sigil server: the trust domain's signing authority.
///
/// It signs X509-SVIDs and JWT-SVIDs for the agents that attest to it, and keeps registration
/// entries and attested agents in its store.
///
/// `run` starts the server. The other commands manage a running server through its admin
/// socket; they need uid 0 or a uid listed in the server's `admin_uids`.
#[derive(Debug, Parser)]
#[command(name = "sigil-server", version, propagate_version = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// A `sigil-server` command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server daemon.
    ///
    /// SIGTERM stops it gracefully (open streams get 5 s to drain, then exit 0); SIGINT stops
    /// it without the drain. Either stop ends with sled's snapshot of the store, so that the next
    /// start need not read back the whole log (docs/operations.md, "Stop and start").
    Run(RunArgs),
    /// The store itself, with the server stopped: move a sled store to PostgreSQL.
    #[command(subcommand)]
    Store(StoreCommand),
    /// An operator command, sent to a running server over its admin socket.
    #[command(flatten)]
    Admin(AdminCommand),
}

/// `sigil-server store`: commands that open the store directly (the server must be stopped).
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy a sled store into an empty PostgreSQL database.
    ///
    /// Stop the server first (sled refuses a second opener). Reads the store `--from`'s
    /// configuration names (sled, in its data_dir) and writes everything into the database
    /// `--to`'s configuration names (store = "postgres"), in one database transaction:
    /// entries with their ids and revisions (agents resume their sync where they were), the
    /// retained change feed, agents, join tokens, federated bundles, sessions, revocations,
    /// CRL numbers, CA journals, and the audit chain with its hashes, checkpoints and broker
    /// sequences intact (`audit verify` stays clean). A target that holds anything is refused.
    /// Both configurations must name the same trust domain and data_dir: the CA and audit keys
    /// stay in data_dir. Then start the server with the `--to` configuration.
    Migrate(StoreMigrateArgs),
}

/// Flags of `sigil-server store migrate`.
#[derive(Debug, Args)]
pub struct StoreMigrateArgs {
    /// The configuration the server ran with (its sled store is read).
    #[arg(long, value_name = "CONFIG")]
    pub from: PathBuf,
    /// The configuration it will run with (store = "postgres"; the database must be empty).
    #[arg(long, value_name = "CONFIG")]
    pub to: PathBuf,
}

/// Runs a `sigil-server store` command.
pub fn execute_store(command: StoreCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match command {
            StoreCommand::Migrate(args) => crate::server::migrate_store(&args.from, &args.to).await,
        }
    })
}

/// Flags of `sigil-server run`; each overrides the matching key of the config file.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML). Every key is documented in examples/config/server.toml.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Trust domain this server is the authority for (overrides `trust_domain`).
    #[arg(long, value_name = "TD")]
    pub trust_domain: Option<String>,
    /// Address of the agent-facing API, IP:PORT (overrides `bind_address`; default 0.0.0.0:8081).
    #[arg(long, value_name = "ADDR")]
    pub bind_address: Option<String>,
    /// Data directory for the store and CA keys (overrides `data_dir`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<String>,
    /// Admin socket path (overrides `admin_socket`).
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<String>,
    /// Log level: error, warn, info, debug, trace (overrides `log_level`; default info).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log format: text or json (overrides `log_format`; default text).
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// A SPIFFE ID prefix granted only through approved privileged sessions (repeat for more;
    /// added to `session_only_ids`). Entries, mints and join token aliases under it are
    /// refused, and the server will not start while an entry names one.
    #[arg(long = "session-only-id", value_name = "SPIFFE_ID")]
    pub session_only_ids: Vec<String>,
}

/// The operator commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Check that the server answers on its admin socket and its CA is usable.
    ///
    /// Exits 0 when healthy; otherwise prints why on stderr and exits 1 (the CA expired, the
    /// store cannot be read, or the audit log diverged from a checkpoint the server signed).
    Healthcheck(HealthcheckArgs),
    /// Join tokens, with which agents attest to the server.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Registration entries: which workloads, under which parent, get which SPIFFE ID.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Attested agents: list, inspect, evict or ban them.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Trust bundles: the server's own, and those of federated trust domains.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Federation relationships: other trust domains whose bundles the server fetches from
    /// their bundle endpoints and hands to the workloads whose entries federate with them.
    #[command(subcommand)]
    Federation(FederationCommand),
    /// X509-SVIDs minted directly for an operator, without an entry or an agent.
    #[command(subcommand)]
    X509(X509Command),
    /// JWT-SVIDs minted directly for an operator, without an entry or an agent.
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// Privileged sessions: just-in-time, ticket-bound, approved, revocable identities.
    #[command(subcommand)]
    Session(SessionCommand),
    /// The tamper-evident audit log: show records, verify the chain and its signed checkpoints,
    /// take a checkpoint to keep elsewhere, acknowledge a divergence.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// How to reach the server, and how to print results: taken by every operator command.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection and output")]
pub struct ConnectArgs {
    /// Path of the server's admin socket.
    #[arg(
        long,
        value_name = "PATH",
        env = "SIGIL_ADMIN_SOCKET",
        default_value = DEFAULT_ADMIN_SOCKET
    )]
    admin_socket: PathBuf,
    /// Output format: `text` for people, `json` for scripts (one JSON document per line).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

/// The output format of an operator command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[non_exhaustive]
pub enum OutputFormat {
    /// Aligned text for people.
    Text,
    /// One JSON document per result, one per line.
    Json,
}

/// Runs an operator command against the server and returns the process exit code.
///
/// # Errors
///
/// Any failure, with a message meant for the operator: the server is not running, the caller
/// is not allowed, the server refused the request, a file could not be read or written.
pub fn execute(command: AdminCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        match command {
            AdminCommand::Healthcheck(args) => health::healthcheck(args).await,
            AdminCommand::Token(command) => token::execute(command).await,
            AdminCommand::Entry(command) => entry::execute(command).await,
            AdminCommand::Agent(command) => agent::execute(command).await,
            AdminCommand::Bundle(command) => bundle::execute(command).await,
            AdminCommand::Federation(command) => federation::execute(command).await,
            AdminCommand::X509(command) => svid::execute_x509(command).await,
            AdminCommand::Jwt(command) => svid::execute_jwt(command).await,
            AdminCommand::Session(command) => session::execute(command).await,
            AdminCommand::Audit(command) => audit::execute(command).await,
        }
    });
    match result {
        // A reader that went away (`sigil-server entry show | head`) is not a failure.
        Err(error) if is_broken_pipe(&error) => Ok(ExitCode::SUCCESS),
        other => other,
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|e| e.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

// === clap value parsers ===

/// A SPIFFE ID, checked here so a typo is caught before anything is sent.
fn spiffe_id(input: &str) -> Result<String, String> {
    sigil_core::SpiffeId::new(input)
        .map(|id| id.to_string())
        .map_err(|e| format!("{e} (a SPIFFE ID looks like spiffe://example.org/path)"))
}

/// A selector, `type:value`.
fn selector(input: &str) -> Result<String, String> {
    sigil_core::Selector::parse(input)
        .map(|s| s.to_string())
        .map_err(|e| format!("{e} (a selector looks like unix:uid:1000)"))
}

/// A duration in whole seconds (`90s`, `5m`, `1h30m`), as seconds.
fn seconds(input: &str) -> Result<u64, String> {
    let duration = sigil_core::parse_duration(input).map_err(|e| e.to_string())?;
    if duration.subsec_nanos() != 0 {
        return Err(format!("{input:?} is not a whole number of seconds"));
    }
    Ok(duration.as_secs())
}

/// An RFC 3339 time, as seconds since the Unix epoch; `never` is 0.
fn expiry_time(input: &str) -> Result<i64, String> {
    if input == "never" {
        return Ok(0);
    }
    time::parse_rfc3339(input).map_err(|e| e.to_string())
}

/// Reports a failure that is not an error of the command itself (some results of a batch
/// failed) on stderr.
#[expect(clippy::print_stderr, reason = "the CLI reports failures on stderr")]
fn report_failure(message: &str) {
    eprintln!("sigil-server: {message}");
}
