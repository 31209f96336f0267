//! Starting and stopping the server, agents and the baseline service of a run.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use sigil_core::X509Bundle;
use sigil_proto::admin::CountEntriesRequest;
use sigil_proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::clients::{self, TRUST_DOMAIN};
use crate::procs::Process;

/// How long a server or agent may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A server process with its sockets and data directory.
#[derive(Debug)]
pub(crate) struct ServerHandle {
    /// The process.
    pub(crate) process: Process,
    /// The node API address (loopback).
    pub(crate) addr: SocketAddr,
    /// The admin socket.
    pub(crate) admin_socket: PathBuf,
    /// The data directory (the sled store is `store/` in it).
    pub(crate) data_dir: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    starts: u32,
    /// Extra environment of the server process (`SOFTHSM2_CONF`).
    env: Vec<(String, String)>,
}

// === impl ServerHandle ===

impl ServerHandle {
    /// Starts a server in `dir`; returns it and its start-up time (from spawn until the admin
    /// API has answered `CountEntries`).
    pub(crate) async fn start(dir: &Path) -> anyhow::Result<(Self, Duration)> {
        Self::start_with(dir, "").await
    }

    /// [`ServerHandle::start`] with `extra` appended to the configuration file.
    pub(crate) async fn start_with(dir: &Path, extra: &str) -> anyhow::Result<(Self, Duration)> {
        Self::start_with_env(dir, extra, Vec::new()).await
    }

    /// [`ServerHandle::start_with`], the server process getting `env` too.
    pub(crate) async fn start_with_env(
        dir: &Path,
        extra: &str,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<(Self, Duration)> {
        std::fs::create_dir_all(dir)?;
        let data_dir = dir.join("data");
        let admin_socket = dir.join("admin.sock");
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"{TRUST_DOMAIN}\"\nbind_address = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_socket = \"{}\"\nlog_level = \"warn\"\n{extra}\n",
                data_dir.display(),
                admin_socket.display()
            ),
        )?;
        let (process, addr, took) = spawn_server(dir, &config, &admin_socket, 1, &env).await?;
        Ok((
            Self {
                process,
                addr,
                admin_socket,
                data_dir,
                config,
                dir: dir.to_owned(),
                starts: 1,
                env,
            },
            took,
        ))
    }

    /// Stops the server (a clean stop: it ends with sled's snapshot) and starts it again on the
    /// same data directory; returns it, how long the stop took (stdin closed until the process
    /// exited) and the start-up time.
    pub(crate) async fn restart(self) -> anyhow::Result<(Self, Duration, Duration)> {
        let Self {
            process,
            admin_socket,
            data_dir,
            config,
            dir,
            starts,
            env,
            ..
        } = self;
        let stopping = Instant::now();
        let stopping_at = SystemTime::now();
        process.stop().await?;
        let stop = stopping.elapsed();
        // A restart without the snapshot would be measured as one with it.
        if !snapshot_since(&data_dir.join("store"), stopping_at)? {
            let log = std::fs::read_to_string(dir.join(format!("server.{starts}.log")))?;
            bail!("the server stopped without writing sled's snapshot; its log:\n{log}");
        }
        let (process, addr, took) =
            spawn_server(&dir, &config, &admin_socket, starts + 1, &env).await?;
        Ok((
            Self {
                process,
                addr,
                admin_socket,
                data_dir,
                config,
                dir,
                starts: starts + 1,
                env,
            },
            stop,
            took,
        ))
    }

    /// An admin client over a fresh connection.
    pub(crate) async fn admin(&self) -> anyhow::Result<AdminClient<Channel>> {
        clients::admin(self.admin_socket.clone()).await
    }

    /// Stops the server.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.process.stop().await
    }
}

/// Whether sled wrote a snapshot file (`snap.*`) in the store directory `store` at `since` or
/// later.
fn snapshot_since(store: &Path, since: SystemTime) -> anyhow::Result<bool> {
    for entry in std::fs::read_dir(store)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("snap.")
            && entry.metadata()?.modified()? >= since
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Starts a server process with `config`; returns it, its node API address and its start-up
/// time (spawn until the admin API answered `CountEntries`).
async fn spawn_server(
    dir: &Path,
    config: &Path,
    admin_socket: &Path,
    start: u32,
    env: &[(String, String)],
) -> anyhow::Result<(Process, SocketAddr, Duration)> {
    let log = dir.join(format!("server.{start}.log"));
    let started = Instant::now();
    let mut process = Process::spawn_with_env(
        "server",
        &[OsString::from("__server"), config.as_os_str().to_owned()],
        &log,
        env,
    )?;
    let addr: SocketAddr = process
        .ready(START_TIMEOUT)
        .await?
        .parse()
        .context("the server sent an unusable address")?;
    if !addr.ip().is_loopback() {
        bail!("the server listens on {addr}, not on loopback");
    }
    let mut admin = clients::admin(admin_socket.to_owned()).await?;
    admin.count_entries(CountEntriesRequest {}).await?;
    Ok((process, addr, started.elapsed()))
}

/// An agent process.
#[derive(Debug)]
pub(crate) struct AgentHandle {
    /// The process.
    pub(crate) process: Process,
    /// Its Workload API socket.
    pub(crate) socket: PathBuf,
}

// === impl AgentHandle ===

impl AgentHandle {
    /// Starts an agent in `dir` that attests to `server` with `token`, trusting `bundle`; does
    /// not wait for it.
    pub(crate) fn spawn(
        dir: &Path,
        server: &ServerHandle,
        bundle: &X509Bundle,
        token: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let bootstrap = dir.join("bootstrap.pem");
        std::fs::write(&bootstrap, bundle.to_pem())?;
        let socket = dir.join("api.sock");
        let process = Process::spawn(
            "agent",
            &[
                "__agent".into(),
                TRUST_DOMAIN.into(),
                server.addr.to_string().into(),
                token.into(),
                bootstrap.into(),
                socket.clone().into(),
                dir.join("data").into(),
            ],
            &dir.join("agent.log"),
        )?;
        Ok(Self { process, socket })
    }

    /// Waits (at most `timeout`) for the Workload API socket to appear.
    pub(crate) async fn wait_socket(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.socket.exists() {
            self.process.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the agent opened no socket within {timeout:?}; its log:\n{}",
                    self.process.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Stops the agent.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.process.stop().await
    }
}

/// The baseline service process: a trivial Workload API on a plain listener and on the front
/// door, the latter twice: served from the thread that blocks on the runtime (as a tonic
/// server usually is) and from a task of the runtime's.
#[derive(Debug)]
pub(crate) struct BaselineHandle {
    /// The process.
    pub(crate) process: Process,
    /// Its socket with the plain tokio `UnixListener`.
    pub(crate) plain: PathBuf,
    /// Its socket with the front-door `WorkloadListener`.
    pub(crate) front_door: PathBuf,
    /// Its socket with the front-door `WorkloadListener`, served from a task of the runtime's
    /// (as `agent::run` serves), not from the thread that blocks on the runtime.
    pub(crate) front_door_task: PathBuf,
}

// === impl BaselineHandle ===

impl BaselineHandle {
    /// Starts it in `dir` and waits until it listens.
    pub(crate) async fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let plain = dir.join("plain.sock");
        let front_door = dir.join("front.sock");
        let front_door_task = dir.join("front-task.sock");
        let mut process = Process::spawn(
            "baseline service",
            &[
                "__baseline".into(),
                plain.clone().into(),
                front_door.clone().into(),
                front_door_task.clone().into(),
            ],
            &dir.join("baseline.log"),
        )?;
        process.ready(START_TIMEOUT).await?;
        Ok(Self {
            process,
            plain,
            front_door,
            front_door_task,
        })
    }

    /// Stops it.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.process.stop().await
    }
}
