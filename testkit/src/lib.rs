//! Test support for Sigil: throwaway PostgreSQL clusters, started from the machine's own
//! PostgreSQL binaries in a temporary directory.
//!
//! Tests that need PostgreSQL call [`shared`] (one cluster per test binary, one database per
//! test through [`Postgres::create_database`]) or [`Postgres::start`] (a cluster of their own,
//! for tests that stop and restart it). Without PostgreSQL on the machine both answer `None`
//! after printing one line that says what to install, and the test returns early; with
//! `SIGIL_REQUIRE_POSTGRES=1` in the environment (CI sets it) a missing PostgreSQL fails the
//! test instead, so CI can never pass by skipping.
//!
//! The binaries are looked up on `PATH`, then in `/usr/lib/postgresql/*/bin` (Debian's
//! layout, newest version first). `initdb` refuses to run as root, so as root the cluster
//! lives under a 0755 directory owned by `postgres` and every PostgreSQL command runs through
//! `runuser -u postgres`.
//!
//! A cluster is stopped (`pg_ctl stop -m immediate`) and its directory removed when its
//! [`Postgres`] is dropped; the shared one, a static that is never dropped, by a watchdog
//! process that waits for the test process to exit.
//!
//! Also: throwaway SoftHSM2 tokens ([`softhsm`]) and what sled wrote in a store directory
//! ([`sled_files`]).
#![allow(
    clippy::print_stderr,
    reason = "the one line a skipped test prints is for the person running the tests"
)]

pub mod sled_files;
pub mod softhsm;

use std::fmt;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that turns a missing PostgreSQL into a test failure.
pub const REQUIRE_ENV: &str = "SIGIL_REQUIRE_POSTGRES";

/// The role every cluster is created with (trust authentication on loopback).
pub const USER: &str = "sigil";

/// A connection kept open by [`Postgres::hold`]; dropping it closes the connection, which
/// ends whatever it held.
pub struct Held {
    _client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl Held {
    /// Closes the connection and waits until it is closed.
    pub async fn release(self) {
        let Held { _client, task } = self;
        drop(_client);
        let _ = task.await;
    }
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held").finish_non_exhaustive()
    }
}

/// A running PostgreSQL cluster of a test.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
    /// Extra `-c` settings of every start (TLS).
    settings: String,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .finish()
    }
}

/// The cluster shared by every test of this test binary, started on first use; `None` (after
/// one line on stderr) when PostgreSQL is not installed and [`REQUIRE_ENV`] is not set.
///
/// # Panics
/// When PostgreSQL is missing and [`REQUIRE_ENV`] is `1`, or when the cluster fails to start.
#[allow(clippy::panic, reason = "test support: a test that cannot start fails")]
pub fn shared() -> Option<&'static Postgres> {
    static SHARED: OnceLock<Option<Postgres>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let cluster = Postgres::start()?;
            cluster.watch_over_this_process();
            Some(cluster)
        })
        .as_ref()
}

impl Postgres {
    /// Starts a cluster of its own (stopped when dropped); `None` as for [`shared`].
    ///
    /// # Panics
    /// When PostgreSQL is missing and [`REQUIRE_ENV`] is `1`, or when the cluster fails to start.
    #[allow(clippy::panic, reason = "test support: a test that cannot start fails")]
    pub fn start() -> Option<Self> {
        let Some(bin) = find_bin_dir() else {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!(
                    "{REQUIRE_ENV}=1 but PostgreSQL (initdb, pg_ctl) is not installed: \
                     apt-get install postgresql"
                );
            }
            eprintln!(
                "skipped: PostgreSQL is not installed (initdb and pg_ctl, on PATH or in \
                 /usr/lib/postgresql/*/bin); install it with `apt-get install postgresql`"
            );
            return None;
        };
        match Self::init(bin) {
            Ok(cluster) => Some(cluster),
            Err(e) => panic!("cannot start a PostgreSQL cluster for the tests: {e}"),
        }
    }

    fn init(bin: PathBuf) -> Result<Self, String> {
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("sigil-pg-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod: {e}"))?;
        if as_postgres {
            let owner = std::fs::metadata("/var/lib/postgresql")
                .map(|m| (m.uid(), m.gid()))
                .map_err(|e| {
                    format!("running as root needs the `postgres` user of Debian's package: {e}")
                })?;
            std::os::unix::fs::chown(dir.path(), Some(owner.0), Some(owner.1))
                .map_err(|e| format!("chown to postgres: {e}"))?;
        }
        let port = free_port()?;
        let cluster = Self {
            dir,
            bin,
            as_postgres,
            port,
            settings: String::new(),
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data_dir(),
                "-U",
                USER,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        cluster.start_again()?;
        Ok(cluster)
    }

    /// Starts a cluster of its own that accepts **only** TLS connections on 127.0.0.1 (plain
    /// ones have no `pg_hba.conf` line), with this certificate chain and key (PEM); `None` as
    /// for [`shared`].
    ///
    /// # Panics
    /// As [`Postgres::start`], and when the files cannot be written.
    #[allow(clippy::panic, reason = "test support: a test that cannot start fails")]
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Option<Self> {
        let mut cluster = Self::start()?;
        let result = (|| -> Result<(), String> {
            cluster.stop_immediately()?;
            let data = PathBuf::from(cluster.data_dir());
            let owner = std::fs::metadata(&data)
                .map(|m| (m.uid(), m.gid()))
                .map_err(|e| e.to_string())?;
            for (name, text) in [
                ("server.crt", cert_pem),
                ("server.key", key_pem),
                (
                    "pg_hba.conf",
                    "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
                ),
            ] {
                let path = data.join(name);
                std::fs::write(&path, text).map_err(|e| format!("{name}: {e}"))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| format!("{name}: {e}"))?;
                std::os::unix::fs::chown(&path, Some(owner.0), Some(owner.1))
                    .map_err(|e| format!("{name}: {e}"))?;
            }
            cluster.settings =
                "-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key".to_owned();
            cluster.start_again()
        })();
        if let Err(e) = result {
            panic!("cannot start a TLS PostgreSQL cluster for the tests: {e}");
        }
        Some(cluster)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id (from `postmaster.pid`), while the cluster runs: the
    /// parent of every backend, for measuring the cluster's CPU.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// A key=value connection string for database `dbname`.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} dbname={dbname}",
            self.port
        )
    }

    /// Creates a fresh database and returns its connection string.
    ///
    /// # Panics
    /// When the cluster refuses (a test cannot go on without its database).
    #[allow(clippy::panic, reason = "test support: a test that cannot start fails")]
    pub async fn create_database(&self) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let (client, connection) =
            match tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await {
                Ok(pair) => pair,
                Err(e) => panic!("connecting to the test cluster: {e}"),
            };
        let task = tokio::spawn(connection);
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
        {
            panic!("CREATE DATABASE {name}: {e}");
        }
        drop(client);
        let _ = task.await;
        self.url(&name)
    }

    /// Runs `statements` (one or more, `;`-separated) on the database at `url`, as an
    /// operator with `psql` would (or whoever can write the database).
    ///
    /// # Errors
    /// The connection's or a statement's error, as text.
    pub async fn sql(url: &str, statements: &str) -> Result<(), String> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let task = tokio::spawn(connection);
        let result = client
            .batch_execute(statements)
            .await
            .map_err(|e| format!("{e}: {e:?}"));
        drop(client);
        let _ = task.await;
        result
    }

    /// Runs `statements` on a connection of its own to the database at `url` and keeps that
    /// connection open until the returned [`Held`] is dropped: what the statements took
    /// (`BEGIN` and an advisory lock, say: another server in the middle of a job) is held
    /// until then.
    ///
    /// # Errors
    /// The connection's or a statement's error, as text.
    pub async fn hold(url: &str, statements: &str) -> Result<Held, String> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let task = tokio::spawn(connection);
        client
            .batch_execute(statements)
            .await
            .map_err(|e| format!("{e}: {e:?}"))?;
        Ok(Held {
            _client: client,
            task,
        })
    }

    /// The first column of the first row `query` returns, as text (`None`: no row, or NULL).
    ///
    /// # Errors
    /// The connection's or the query's error, as text.
    pub async fn sql_text(url: &str, query: &str) -> Result<Option<String>, String> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let task = tokio::spawn(connection);
        let result = match client.simple_query(query).await {
            Ok(messages) => Ok(messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })),
            Err(e) => Err(format!("{e}: {e:?}")),
        };
        drop(client);
        let _ = task.await;
        result
    }

    /// Kills the cluster as a power cut would (`pg_ctl stop -m immediate`: no checkpoint,
    /// crash recovery at the next start).
    pub fn stop_immediately(&self) -> Result<(), String> {
        self.run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"],
        )
    }

    /// Stops the cluster as an operator's restart would (`pg_ctl stop -m fast`: sessions are
    /// ended, a checkpoint is written).
    pub fn stop_fast(&self) -> Result<(), String> {
        self.run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "fast", "-w", "stop"],
        )
    }

    /// Starts the (stopped) cluster again on the same port and waits until it accepts
    /// connections.
    pub fn start_again(&self) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=400 \
             -c shared_buffers=32MB {}",
            self.port,
            self.dir.path().display(),
            self.settings
        );
        let log = self.dir.path().join("postgres.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-l",
                &log.display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs one PostgreSQL program (as `postgres` when this process is root).
    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let output = self
            .command(program, args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            let log =
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
            Err(format!(
                "{program} {}: {}\n{}\n{}\n{log}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            ))
        }
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        command.args(args);
        command
    }

    /// Starts a watchdog that stops the cluster and removes its directory once this process
    /// has exited (the shared cluster is a static, never dropped).
    fn watch_over_this_process(&self) {
        let stop = self.command(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "immediate", "stop"],
        );
        let mut stop_line: Vec<String> = vec![stop.get_program().to_string_lossy().into_owned()];
        stop_line.extend(stop.get_args().map(|a| a.to_string_lossy().into_owned()));
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; \
             rm -rf {dir}",
            pid = std::process::id(),
            stop = stop_line
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" "),
            dir = shell_quote(&self.dir.path().display().to_string()),
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"],
        );
    }
}

/// Copies a directory tree, file modes included (a stopped server's data directory: a backup,
/// or the backup restored).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            std::fs::set_permissions(&target, entry.metadata()?.permissions())?;
        }
    }
    Ok(())
}

/// The directory holding `initdb` and `pg_ctl`: on `PATH`, else the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                // Debian puts only wrappers on PATH (if anything); resolve a symlink to the
                // real directory, where `postgres` sits next to `initdb`.
                let real = std::fs::canonicalize(dir.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|d| has_both(d));
                return Some(real.unwrap_or(dir));
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_both(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
