//! Who is calling: the caller's kernel credentials and a handle on its process.
//!
//! At accept, the kernel tells us the caller's uid, gid and pid as they were at `connect()`
//! (`SO_PEERCRED`). A pid can be reused once its process exits, so a pid alone cannot prove that
//! the process we attest is the one that connected. We therefore hold the process itself:
//!
//! - a pidfd from `SO_PEERPIDFD` (Linux 6.5 and later): it refers to the process that connected,
//!   even if it exited before we accepted, and becomes readable when that process exits; with
//!   it, the `/proc/PID` directory opened while the pidfd's process still ran (so the same
//!   process: a pid is not reused while its process exists), through which the executable is
//!   read with one `fstatat` per check;
//! - otherwise, an open `/proc/PID` directory plus the process start time (field 22 of
//!   `/proc/PID/stat`), read at accept. Files opened through that directory fail with `ESRCH`
//!   once the process is gone, and a reused pid has a different start time. (This fallback cannot
//!   see a pid reused between `connect()` and accept; the pidfd path has no such gap.)
//!
//! After attestation, [`CallerProcess::still_alive_and_same`] says whether the process is still
//! running and still the one that connected; a caller for which it is false gets no identity.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::sockopt::PeerPidfd;
use nix::sys::stat::Mode;
use tokio::net::UnixStream;

/// Why the caller's credentials could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// `SO_PEERCRED` failed.
    #[error("reading the caller's credentials (SO_PEERCRED) failed")]
    Credentials(#[source] io::Error),
}

/// How the caller's process is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProcessTracking {
    /// A pidfd from `SO_PEERPIDFD` where the kernel offers it, else `/proc/PID` and the start
    /// time.
    #[default]
    Auto,
    /// Always `/proc/PID` and the start time (for kernels without `SO_PEERPIDFD`, and to test
    /// that path).
    ProcFs,
}

/// Which kind of handle holds a caller's process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProcessHandleKind {
    /// A pidfd (`SO_PEERPIDFD`).
    Pidfd,
    /// An open `/proc/PID` directory and the start time.
    ProcFs,
    /// No handle: the process had already exited at accept, or its pid is not visible in our pid
    /// namespace. Such a caller is never "still alive and same".
    None,
}

/// The process at the other end of a Workload API connection: its credentials at connect time
/// and a handle on the process itself.
///
/// This is the connection's [`tonic::transport::server::Connected::ConnectInfo`], so a handler
/// reads it with `request.extensions().get::<CallerProcess>()`. Cloning is cheap and shares the
/// handle.
#[derive(Clone)]
pub struct CallerProcess {
    uid: u32,
    gid: u32,
    pid: Option<u32>,
    handle: Arc<ProcessHandle>,
    /// The executable the process ran at accept: (device, inode) of `/proc/PID/exe`.
    exe: Option<ExeIdentity>,
}

/// (device, inode) of an executable.
type ExeIdentity = (nix::libc::dev_t, nix::libc::ino_t);

enum ProcessHandle {
    /// `dir`: `/proc/PID`, opened after the pidfd and while its process still ran, so the same
    /// process (a pid is not reused while its process exists); `None` if that failed.
    Pidfd {
        pidfd: OwnedFd,
        dir: Option<OwnedFd>,
    },
    Proc {
        dir: OwnedFd,
        start_time: u64,
    },
    None,
}

// === impl CallerProcess ===

impl CallerProcess {
    /// Reads the credentials of the peer of an accepted connection and takes a handle on its
    /// process.
    pub fn from_stream(stream: &UnixStream, tracking: ProcessTracking) -> Result<Self, PeerError> {
        let cred = stream.peer_cred().map_err(PeerError::Credentials)?;
        let pid = cred
            .pid()
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|&pid| pid != 0);
        let handle = match (tracking, pid) {
            (_, None) => ProcessHandle::None,
            (ProcessTracking::Auto, Some(pid)) => {
                match nix::sys::socket::getsockopt(stream, PeerPidfd) {
                    Ok(pidfd) => ProcessHandle::with_pidfd(pidfd, pid),
                    // No SO_PEERPIDFD on this kernel: the weaker /proc/PID path.
                    Err(Errno::ENOPROTOOPT) => ProcessHandle::open_proc(pid),
                    // Any other error (the process is gone already: ESRCH, or EINVAL before
                    // Linux 6.14; no file descriptor left: EMFILE) leaves the caller without a
                    // handle, so it gets nothing; never the weaker path, which cannot see a pid
                    // reused since connect().
                    Err(_) => ProcessHandle::None,
                }
            }
            (ProcessTracking::ProcFs, Some(pid)) => ProcessHandle::open_proc(pid),
        };
        let exe = handle.exe_identity(pid);
        Ok(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            pid,
            handle: Arc::new(handle),
            exe,
        })
    }

    /// A caller for the process `pid` with the given credentials, held through `/proc/PID` (for
    /// tests and tools; connections use [`from_stream`](Self::from_stream)).
    pub fn from_pid(uid: u32, gid: u32, pid: u32) -> Self {
        let handle = ProcessHandle::open_proc(pid);
        Self {
            uid,
            gid,
            pid: Some(pid),
            exe: handle.exe_identity(Some(pid)),
            handle: Arc::new(handle),
        }
    }

    /// The caller's effective user id at `connect()`.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The caller's effective group id at `connect()`.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The caller's process id at `connect()`, as seen in the agent's pid namespace; `None` if the
    /// kernel reported none (a process outside our pid namespace).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The process's `/proc/PID` directory, opened while it ran, if it is held: reads through
    /// it fail once that process is gone, even if its pid was reused.
    pub fn proc_dir(&self) -> Option<BorrowedFd<'_>> {
        match &*self.handle {
            ProcessHandle::Pidfd { dir: Some(dir), .. } | ProcessHandle::Proc { dir, .. } => {
                Some(dir.as_fd())
            }
            ProcessHandle::Pidfd { dir: None, .. } | ProcessHandle::None => None,
        }
    }

    /// How the process is held.
    pub fn handle_kind(&self) -> ProcessHandleKind {
        match *self.handle {
            ProcessHandle::Pidfd { .. } => ProcessHandleKind::Pidfd,
            ProcessHandle::Proc { .. } => ProcessHandleKind::ProcFs,
            ProcessHandle::None => ProcessHandleKind::None,
        }
    }

    /// Whether the process that connected is still running and is still the one the pid names.
    /// Check this after attestation and before handing out an identity: if it is false, whatever
    /// was learnt from `/proc/PID` may describe another process.
    pub fn still_alive_and_same(&self) -> bool {
        match &*self.handle {
            ProcessHandle::Pidfd { pidfd, .. } => pidfd_running(pidfd),
            ProcessHandle::Proc { dir, start_time } => {
                matches!(read_stat(dir), Ok(stat) if stat.running && stat.start_time == *start_time)
            }
            ProcessHandle::None => false,
        }
    }

    /// Whether the process still runs the executable it ran when the connection was accepted
    /// (same device and inode behind `/proc/PID/exe`). A process can connect and then `exec`
    /// another program, or hand its socket to a child that does; what is attested then is not
    /// what connected, so such a caller gets nothing.
    pub fn same_executable(&self) -> bool {
        self.exe == self.handle.exe_identity(self.pid)
    }
}

/// Whether the process a pidfd holds still runs (a pidfd becomes readable when it exits).
fn pidfd_running(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(0))
}

impl fmt::Debug for CallerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerProcess")
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("pid", &self.pid)
            .field("handle", &self.handle_kind())
            .finish()
    }
}

// === impl ProcessHandle ===

impl ProcessHandle {
    /// A handle on the process `pidfd` holds, with its `/proc/PID` directory when the process
    /// still runs once that is open.
    fn with_pidfd(pidfd: OwnedFd, pid: u32) -> Self {
        let dir = open_proc_dir(pid).ok().filter(|_| pidfd_running(&pidfd));
        Self::Pidfd { pidfd, dir }
    }

    /// (device, inode) of the executable the process runs, if it can be read: through the
    /// held `/proc/PID` directory (one `fstatat`; it fails once that process is gone, even if
    /// the pid was reused), else through the path `/proc/PID/exe`.
    fn exe_identity(&self, pid: Option<u32>) -> Option<ExeIdentity> {
        use nix::fcntl::AtFlags;
        let stat = match self {
            Self::Pidfd { dir: Some(dir), .. } | Self::Proc { dir, .. } => {
                nix::sys::stat::fstatat(dir, "exe", AtFlags::empty())
            }
            Self::Pidfd { dir: None, .. } | Self::None => {
                nix::sys::stat::stat(format!("/proc/{}/exe", pid?).as_str())
            }
        };
        stat.ok().map(|stat| (stat.st_dev, stat.st_ino))
    }

    /// Opens `/proc/PID` and records the start time; `None` if the process is gone or not running.
    fn open_proc(pid: u32) -> Self {
        let Ok(dir) = open_proc_dir(pid) else {
            return Self::None;
        };
        match read_stat(&dir) {
            Ok(stat) if stat.running => Self::Proc {
                dir,
                start_time: stat.start_time,
            },
            _ => Self::None,
        }
    }
}

/// Opens the directory `/proc/PID`.
fn open_proc_dir(pid: u32) -> nix::Result<OwnedFd> {
    nix::fcntl::open(
        format!("/proc/{pid}").as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// What we need from `/proc/PID/stat`.
struct Stat {
    /// Not a zombie (`Z`) or dead (`X`, `x`).
    running: bool,
    /// Field 22, `starttime`, in clock ticks since boot.
    start_time: u64,
}

/// Reads `stat` through an open `/proc/PID` directory (fails with `ESRCH` once the process is
/// gone, even if the pid was reused).
fn read_stat(dir: &OwnedFd) -> io::Result<Stat> {
    let fd = nix::fcntl::openat(
        dir,
        "stat",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut text = String::new();
    File::from(fd).take(4096).read_to_string(&mut text)?;
    parse_stat(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/PID/stat"))
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?; // field 3
    let start_time = fields.nth(22 - 4)?.parse().ok()?; // field 22
    Some(Stat {
        running: !matches!(state, "Z" | "X" | "x"),
        start_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_hostile_command_name() {
        let text = "42 (a) b (c) R 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let stat = parse_stat(text).unwrap();
        assert!(stat.running);
        assert_eq!(stat.start_time, 987_654);
        let zombie = text.replace(") R ", ") Z ");
        assert!(!parse_stat(&zombie).unwrap().running);
        assert!(parse_stat("42 (x) R 1").is_none());
    }

    #[test]
    fn proc_handle_sees_a_child_exit_as_zombie_and_after_reaping() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let caller = CallerProcess::from_pid(0, 0, child.id());
        assert_eq!(caller.handle_kind(), ProcessHandleKind::ProcFs);
        assert!(caller.still_alive_and_same());
        child.kill().unwrap();
        // Until reaped, the child is a zombie: exited, not alive.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while caller.still_alive_and_same() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!caller.still_alive_and_same());
        child.wait().unwrap();
        assert!(!caller.still_alive_and_same());
    }

    #[tokio::test]
    async fn a_connected_caller_is_checked_through_its_proc_directory() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let caller = CallerProcess::from_stream(&ours, ProcessTracking::Auto).unwrap();
        // A pidfd where the kernel offers SO_PEERPIDFD, else /proc/PID: a directory either way.
        assert!(matches!(
            &*caller.handle,
            ProcessHandle::Pidfd { dir: Some(_), .. } | ProcessHandle::Proc { .. }
        ));
        let own = nix::sys::stat::stat("/proc/self/exe").unwrap();
        assert_eq!(caller.exe, Some((own.st_dev, own.st_ino)));
        assert!(caller.still_alive_and_same());
        assert!(caller.same_executable());
    }

    #[test]
    fn our_own_process_is_alive() {
        let caller = CallerProcess::from_pid(0, 0, std::process::id());
        assert!(caller.still_alive_and_same());
        assert!(!CallerProcess::from_pid(0, 0, u32::MAX / 2).still_alive_and_same());
    }
}
