//! # sigil-daemon: what every Sigil daemon does the same way
//!
//! The server and the agent are separate binaries that never depend on each other; what a
//! daemon of either kind does at its edges is written here once:
//!
//! - logging: [`LogLevel`] and [`LogFormat`] as the configuration files spell them, and
//!   [`init_logging`] (stderr, `SIGIL_LOG` overrides the level with a `tracing` filter);
//! - signals: [`shutdown_signal`] turns SIGTERM into [`Shutdown::Graceful`] and SIGINT into
//!   [`Shutdown::Immediate`];
//! - draining: [`drain`] gives open streams [`DRAIN_TIMEOUT`] after a graceful shutdown began;
//! - configuration files: [`config`] reads a TOML file reporting every problem at once, unknown
//!   keys included;
//! - private state files: [`write_private`] replaces a 0600 file atomically;
//! - metrics and health: [`telemetry`] serves `/metrics`, `/live` and `/ready` and counts gRPC
//!   calls;
//! - fatal errors: [`exit_code`] prints one line with every cause, each once ([`report`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
mod fs;
pub mod limits;
pub mod telemetry;

pub use self::fs::{
    PRIVATE_FILE_MODE, PrivatePathError, check_key_file, check_private_dir, read_secret,
    write_private,
};

use std::fmt;
use std::future::Future;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// How long open streams get to finish after a graceful shutdown begins.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The environment variable whose `tracing` filter (`info,sigil_agent=debug`) overrides the
/// configured log level.
pub const LOG_FILTER_ENV: &str = "SIGIL_LOG";

/// How to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Stop accepting, let streams drain for at most [`DRAIN_TIMEOUT`], then stop.
    Graceful,
    /// Stop now.
    Immediate,
}

/// How much to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default.
    Info,
    /// Verbose.
    Debug,
    /// Very verbose.
    Trace,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

// === impl LogLevel ===

impl LogLevel {
    /// The `tracing` filter directive for this level.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

impl FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "error" => Self::Error,
            "warn" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            other => {
                return Err(format!(
                    "{other:?} is not a log level (error, warn, info, debug, trace)"
                ));
            }
        })
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl LogFormat ===

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "text" => Self::Text,
            "json" => Self::Json,
            other => return Err(format!("{other:?} is not a log format (text, json)")),
        })
    }
}

// === functions ===

/// Logs to stderr at `level` (or as `SIGIL_LOG` says), as text (colours on a terminal only)
/// or JSON lines. Call once, before the runtime starts.
pub fn init_logging(level: LogLevel, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(LOG_FILTER_ENV)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.as_str()));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// The exit code of a command that ended with `result`; a failure is printed on stderr as
/// `PROGRAM: error: cause: cause` ([`report`]).
#[expect(
    clippy::print_stderr,
    reason = "the fatal error of a command goes to stderr"
)]
pub fn exit_code<E>(program: &str, result: Result<ExitCode, E>) -> ExitCode
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{program}: {}", report(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// `error` and its causes, `error: cause: cause`, as `anyhow` prints them with `{:#}`, but
/// without what a message already quotes: a cause whose text ends the one before it (`cannot
/// read FILE: {source}`, as many errors write it), and the rest of the chain from a cause on
/// when the report so far already ends with all of it (a message that renders its whole
/// chain, as the store's database errors do). Either would otherwise be shown twice.
#[must_use]
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = vec![error.to_string()];
    let mut cause = error.source();
    while let Some(error) = cause {
        chain.push(error.to_string());
        cause = error.source();
    }
    let (first, causes) = chain.split_at(1);
    let mut out = first.concat();
    for (i, (before, text)) in chain.iter().zip(causes).enumerate() {
        if causes
            .get(i..)
            .is_some_and(|rest| out.ends_with(&rest.join(": ")))
        {
            break;
        }
        if !before.ends_with(text.as_str()) {
            out.push_str(": ");
            out.push_str(text);
        }
    }
    out
}

/// Watches SIGTERM and SIGINT; the future yields how to stop when one arrives. Call it inside
/// the runtime, before serving, so that a signal that arrives early is not lost.
///
/// # Errors
///
/// When a signal handler cannot be installed.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = Shutdown> + Send> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => {
                info!("SIGTERM: shutting down gracefully");
                Shutdown::Graceful
            }
            _ = sigint.recv() => {
                info!("SIGINT: shutting down now");
                Shutdown::Immediate
            }
        }
    })
}

/// Waits at most [`DRAIN_TIMEOUT`] for `serving` (a server told to stop) to finish; `None`, with
/// a warning, when streams were still open then.
pub async fn drain<T>(serving: impl Future<Output = T>) -> Option<T> {
    match tokio::time::timeout(DRAIN_TIMEOUT, serving).await {
        Ok(done) => Some(done),
        Err(_) => {
            warn!(timeout = ?DRAIN_TIMEOUT, "streams still open after the drain timeout; closing them");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_report_prints_each_cause_once() {
        let missing = || std::io::Error::from(std::io::ErrorKind::NotFound);
        // anyhow prints the quoted source twice; the report once.
        let quoting = anyhow::Error::new(Wrapping::new(
            "cannot read /etc/sigil/bundle.pem: entity not found",
            missing(),
        ))
        .context("trust bundle");
        assert_eq!(
            format!("{quoting:#}"),
            "trust bundle: cannot read /etc/sigil/bundle.pem: entity not found: entity not found"
        );
        assert_eq!(
            super::report(quoting.as_ref()),
            "trust bundle: cannot read /etc/sigil/bundle.pem: entity not found"
        );
        // Causes that the message before does not hold are all there, in order.
        let chain = anyhow::Error::new(missing())
            .context("cannot read the config")
            .context("sigil-agent run");
        assert_eq!(
            super::report(chain.as_ref()),
            "sigil-agent run: cannot read the config: entity not found"
        );
        // A message that renders its source's whole chain, whose first link does not end it.
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let database = anyhow::Error::new(Wrapping::new(
            "database: error connecting to server: connection refused",
            Wrapping::new("error connecting to server", refused),
        ))
        .context("store");
        assert_eq!(
            super::report(database.as_ref()),
            "store: database: error connecting to server: connection refused"
        );
    }

    /// An error with its own message and a source, which the message may quote.
    #[derive(Debug)]
    struct Wrapping {
        message: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    }

    impl Wrapping {
        fn new(
            message: &'static str,
            source: impl std::error::Error + Send + Sync + 'static,
        ) -> Self {
            Self {
                message,
                source: Box::new(source),
            }
        }
    }

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.message)
        }
    }

    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.source)
        }
    }

    use super::*;

    #[test]
    fn levels_and_formats_parse_as_the_config_files_spell_them() {
        for level in [
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
            LogLevel::Trace,
        ] {
            assert_eq!(level.as_str().parse::<LogLevel>(), Ok(level));
            assert_eq!(level.to_string(), level.as_str());
        }
        assert!(
            "loud"
                .parse::<LogLevel>()
                .unwrap_err()
                .contains("not a log level")
        );
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_the_server_at_most_the_timeout() {
        assert_eq!(drain(async { 7 }).await, Some(7));
        let never = std::future::pending::<()>();
        assert_eq!(drain(never).await, None);
    }
}
