//! The processes the harness starts (itself, re-executed as a server, an agent or the baseline
//! service; see [`crate::children`]) and what `/proc` says about them.
//!
//! Every child gets a pipe on its stdin and stops when that pipe closes, so a harness that dies
//! takes its children with it. Their logs (warnings and errors only) go to a file in the run's
//! temporary directory and are shown when something breaks.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Clock ticks per second in `/proc/PID/stat` (`USER_HZ`, 100 on every Linux we run on).
const USER_HZ: f64 = 100.0;

/// A running child process of the harness.
#[derive(Debug)]
pub(crate) struct Process {
    name: String,
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    log: PathBuf,
}

// === impl Process ===

impl Process {
    /// Starts this executable with `args` (the first names the role); its stderr goes to `log`.
    pub(crate) fn spawn(name: &str, args: &[OsString], log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with_env(name, args, log, &[])
    }

    /// [`Process::spawn`] with `env` added to the child's environment.
    pub(crate) fn spawn_with_env(
        name: &str,
        args: &[OsString],
        log: &Path,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the harness executable")?;
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        // `SIGIL_BENCH_WRAP_<ROLE>` (e.g. `SIGIL_BENCH_WRAP_AGENT="valgrind --tool=massif"`)
        // runs that role under a profiler: the words of the variable, then this executable.
        let role = args
            .first()
            .and_then(|a| a.to_str())
            .map(|a| a.trim_start_matches('_').to_ascii_uppercase());
        let wrapper: Vec<String> = role
            .and_then(|role| std::env::var(format!("SIGIL_BENCH_WRAP_{role}")).ok())
            .map(|words| words.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        let mut child = command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        let pid = child
            .id()
            .with_context(|| format!("the {name} exited at once"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
            stdin,
            stdout,
            log: log.to_owned(),
        })
    }

    /// Waits (at most `timeout`) for the child's `READY <value>` line; returns the value. A
    /// `PID <pid>` line before it names the process that [`Process::cpu`] and the memory
    /// figures measure from then on: the role itself, when a `SIGIL_BENCH_WRAP_<ROLE>` wrapper
    /// such as `perf record` runs it as a child of its own.
    pub(crate) async fn ready(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let Some(lines) = self.stdout.as_mut() else {
            bail!("the {} has no stdout", self.name);
        };
        let pid = &mut self.pid;
        let line = tokio::time::timeout(timeout, async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        if let Some(value) = line.strip_prefix("READY ") {
                            return Some(value.to_owned());
                        }
                        if let Some(role) = line.strip_prefix("PID ").and_then(|p| p.parse().ok()) {
                            *pid = role;
                        }
                    }
                    Ok(None) | Err(_) => return None,
                }
            }
        })
        .await;
        match line {
            Ok(Some(value)) => Ok(value),
            Ok(None) => bail!(
                "the {} exited before it was ready; its log:\n{}",
                self.name,
                self.log_tail()
            ),
            Err(_) => bail!(
                "the {} was not ready within {timeout:?}; its log:\n{}",
                self.name,
                self.log_tail()
            ),
        }
    }

    /// Fails with the child's log if it has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "the {} exited ({status}); its log:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Resident memory now (`VmRSS`), in bytes.
    pub(crate) fn rss(&self) -> anyhow::Result<u64> {
        rss_of(&format!("/proc/{}/status", self.pid))
    }

    /// Resident anonymous memory now (`RssAnon`: heap, stacks, anonymous maps), in bytes:
    /// `VmRSS` without the pages of files mapped in, such as the executable's code.
    pub(crate) fn rss_anon(&self) -> anyhow::Result<u64> {
        status_bytes(&format!("/proc/{}/status", self.pid), "RssAnon:")
    }

    /// CPU time used so far, user and system, all threads.
    pub(crate) fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_of(self.pid)
    }

    /// Time on a CPU of the threads it has now, in nanoseconds ([`cpu_ns_of`]).
    pub(crate) fn cpu_ns(&self) -> anyhow::Result<Duration> {
        cpu_ns_of(self.pid)
    }

    /// Each of its threads now, by thread id: name and time on a CPU ([`thread_cpu_ns_of`]).
    pub(crate) fn thread_cpu_ns(
        &self,
    ) -> anyhow::Result<std::collections::HashMap<u32, (String, Duration)>> {
        thread_cpu_ns_of(self.pid)
    }

    /// The last lines of the child's log.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// How many lines of the child's log contain `needle`.
    pub(crate) fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Closes the child's stdin (it stops at once) and waits for it (at most 10 s, then kills
    /// it).
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e).with_context(|| format!("waiting for the {}", self.name)),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the {} did not stop within 10 s; killed it", self.name)
            }
        }
    }
}

/// `VmRSS` of a `/proc/.../status` file, in bytes.
pub(crate) fn rss_of(status_path: &str) -> anyhow::Result<u64> {
    status_bytes(status_path, "VmRSS:")
}

/// The `field` (with its colon) of a `/proc/.../status` file, given in kB there, in bytes.
fn status_bytes(status_path: &str, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(status_path)
        .with_context(|| format!("cannot read {status_path}"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .with_context(|| format!("no {field} in {status_path}"))?;
    Ok(kib * 1024)
}

/// User plus system CPU time of process `pid` (all its threads).
pub(crate) fn cpu_of(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis are
    // state (3), ..., utime (14), stime (15).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("unexpected {path}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("unexpected {path}"))
    };
    // After the parenthesis, field 3 is index 0, so utime (14) is 11 and stime (15) is 12.
    Ok(Duration::from_secs_f64((tick(11)? + tick(12)?) / USER_HZ))
}

/// User plus system CPU time of process `root` and its children (those alive now, and those
/// that ended and were waited for): a PostgreSQL cluster, whose postmaster forks one backend
/// per connection.
pub(crate) fn tree_cpu_of(root: u32) -> anyhow::Result<Duration> {
    let mut ticks = 0.0;
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, after)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<f64> = after
            .split_whitespace()
            .map(|f| f.parse::<f64>().unwrap_or(0.0))
            .collect();
        // After the parenthesis: ppid (field 4) is index 1; utime, stime, cutime, cstime
        // (14 to 17) are 11 to 14.
        let field = |i: usize| fields.get(i).copied().unwrap_or(0.0);
        if pid == root {
            ticks += field(11) + field(12) + field(13) + field(14);
        } else if field(1) as u32 == root {
            ticks += field(11) + field(12);
        }
    }
    Ok(Duration::from_secs_f64(ticks / USER_HZ))
}

/// Time on a CPU of every thread process `pid` has now, in nanoseconds (`schedstat`: finer
/// than [`cpu_of`]'s clock ticks; threads that already ended are not counted).
pub(crate) fn cpu_ns_of(pid: u32) -> anyhow::Result<Duration> {
    Ok(thread_cpu_ns_of(pid)?.values().map(|(_, ns)| *ns).sum())
}

/// Each thread process `pid` has now, by thread id: its name (`comm`, at most 15 bytes) and
/// its time on a CPU (`schedstat`), as in [`cpu_ns_of`].
pub(crate) fn thread_cpu_ns_of(
    pid: u32,
) -> anyhow::Result<std::collections::HashMap<u32, (String, Duration)>> {
    let tasks = format!("/proc/{pid}/task");
    let mut threads = std::collections::HashMap::new();
    for task in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
        let task = task?;
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = task.path().join("schedstat");
        // A thread may end between the listing and the reads.
        let (Ok(text), Ok(comm)) = (
            std::fs::read_to_string(&path),
            std::fs::read_to_string(task.path().join("comm")),
        ) else {
            continue;
        };
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("unexpected {}", path.display()))?;
        threads.insert(tid, (comm.trim_end().to_owned(), Duration::from_nanos(ns)));
    }
    Ok(threads)
}

/// Bytes a directory tree occupies on disk (allocated blocks) and its files' apparent size.
pub(crate) fn disk_usage(dir: &Path) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut allocated = 0;
    let mut apparent = 0;
    let mut pending = vec![dir.to_owned()];
    // Bounded: a data directory holds a few dozen files.
    let mut visited = 0usize;
    while let Some(path) = pending.pop() {
        visited += 1;
        if visited > 100_000 {
            bail!("more than 100,000 files under {}", dir.display());
        }
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)
                .with_context(|| format!("cannot list {}", path.display()))?
            {
                pending.push(entry?.path());
            }
        } else {
            allocated += meta.blocks() * 512;
            apparent += meta.len();
        }
    }
    Ok((allocated, apparent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures_are_readable() {
        let rss = rss_of("/proc/self/status").unwrap();
        let anon = status_bytes("/proc/self/status", "RssAnon:").unwrap();
        assert!(
            anon > 0 && anon < rss,
            "RssAnon {anon} is part of VmRSS {rss}"
        );
        cpu_of(std::process::id()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![1u8; 10_000]).unwrap();
        let (_, apparent) = disk_usage(dir.path()).unwrap();
        assert_eq!(apparent, 10_000);
    }

    #[test]
    fn a_thread_is_found_by_name_with_its_cpu_time() {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let (busy, spun) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-spinner".to_owned())
            .spawn(move || {
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < Duration::from_millis(30) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                busy.send(()).unwrap();
                wait.recv().unwrap();
            })
            .unwrap();
        spun.recv().unwrap();
        let threads = thread_cpu_ns_of(std::process::id()).unwrap();
        done.send(()).unwrap();
        thread.join().unwrap();
        let (_, spent) = threads
            .values()
            .find(|(name, _)| name == "bench-spinner")
            .expect("the named thread is listed");
        assert!(*spent >= Duration::from_millis(10), "it spun {spent:?}");
        let total: Duration = threads.values().map(|(_, t)| *t).sum();
        assert!(total >= *spent);
    }
}
