//! Test support for the `cli_*` tests: the real `sigil-server` binary, a server started with
//! flags in a temporary directory (killed when dropped, also when a test panics), and a runner
//! for CLI commands that returns their exit status and output.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    dead_code,
    unreachable_pub,
    reason = "test support code: a failed setup step is a failed test; not every test file uses \
              every helper"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// `target/debug/sigil-server`. `cargo test --workspace` builds it, because the sigil-server
/// package has an integration test (`server/tests/binary.rs`) that runs it.
pub fn binary() -> PathBuf {
    sigil_tests::binary("sigil-server")
}

/// A `sigil-server run` child process with its own data directory and admin socket.
pub struct Server {
    dir: TempDir,
    child: Option<Child>,
}

impl Server {
    /// Starts a server for example.org with flags only.
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    /// Starts a server for example.org, with `config` as its config file when given.
    pub fn start_with_config(config: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Traversable by every user, as the socket's directory must be for the uid test; the
        // server creates `private/` (0711) and the socket (0666) itself.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let mut command = Command::new(binary());
        command.arg("run");
        if let Some(config) = config {
            let path = dir.path().join("server.toml");
            std::fs::write(&path, config).unwrap();
            command.arg("--config").arg(path);
        }
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = command
            .args([
                "--trust-domain",
                "example.org",
                "--bind-address",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--admin-socket")
            .arg(dir.path().join("private").join("admin.sock"))
            .env("SIGIL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut server = Self {
            dir,
            child: Some(child),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "server exited with {status} before serving; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "server did not start; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("private").join("admin.sock")
    }

    /// A scratch directory that is removed with the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Kills the server (SIGKILL, as in a crash: the socket file stays behind).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs `sigil-server ARGS --admin-socket SOCKET`.
    pub fn cli(&self, args: &[&str]) -> Run {
        cli_at(&self.socket(), args)
    }

    /// Runs `sigil-server ARGS --admin-socket SOCKET --output json`.
    pub fn json(&self, args: &[&str]) -> Run {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        self.cli(&all)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `sigil-server ARGS --admin-socket SOCKET`.
pub fn cli_at(socket: &Path, args: &[&str]) -> Run {
    let output = Command::new(binary())
        .args(args)
        .arg("--admin-socket")
        .arg(socket)
        .env_remove("SIGIL_ADMIN_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::new(args, output)
}

/// A finished CLI command.
#[derive(Debug)]
pub struct Run {
    pub command: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn new(args: &[&str], output: Output) -> Self {
        Self {
            command: format!("sigil-server {}", args.join(" ")),
            code: output.status.code(),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    }

    /// Asserts exit 0 and empty stderr; returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "{} failed:\n{}{}",
            self.command,
            self.stdout,
            self.stderr
        );
        assert_eq!(self.stderr, "", "{}", self.command);
        &self.stdout
    }

    /// Asserts a non-zero exit; returns stderr.
    #[track_caller]
    pub fn fails(&self) -> &str {
        assert_ne!(
            self.code,
            Some(0),
            "{} succeeded:\n{}",
            self.command,
            self.stdout
        );
        assert!(
            self.code.is_some(),
            "{} was killed by a signal",
            self.command
        );
        &self.stderr
    }

    /// Asserts success and parses stdout as exactly one JSON document on one line.
    #[track_caller]
    pub fn one(&self) -> serde_json::Value {
        let lines = self.lines();
        assert_eq!(
            lines.len(),
            1,
            "{}: expected one JSON line:\n{}",
            self.command,
            self.stdout
        );
        lines.into_iter().next().unwrap()
    }

    /// Asserts success and parses every line of stdout as a JSON document.
    #[track_caller]
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.ok()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", self.command))
            })
            .collect()
    }

    /// Parses every line of stdout as a JSON document, whatever the exit status.
    pub fn lines_any(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The value of `key` in a `Key : value` text block.
#[track_caller]
pub fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|line| {
            let (k, v) = line.split_once(" : ")?;
            (k.trim_end() == key).then_some(v)
        })
        .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"))
}
