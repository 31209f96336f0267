//! The `unix` workload attestor: selectors from the caller's kernel credentials.
//!
//! Given the uid, gid and pid the kernel reported for a Workload API connection (SO_PEERCRED),
//! it produces:
//!
//! | selector | source |
//! |---|---|
//! | `unix:uid:N`, `unix:gid:N` | the credentials |
//! | `unix:user:NAME`, `unix:group:NAME` | `/etc/passwd`, `/etc/group` (when the ids have names) |
//! | `unix:supplementary_gid:N` | `Groups:` of `/proc/PID/status` |
//! | `unix:path:/abs/exe` | `/proc/PID/exe` |
//! | `unix:sha256:HEX` | SHA-256 of the executable actually running, read through `/proc/PID/exe` |
//!
//! Hashing costs milliseconds, so it runs only when asked ([`UnixAttestor::attest`]'s
//! `with_sha256`, which the agent sets when some entry on the node uses a `unix:sha256`
//! selector), is bounded by a size limit, and is cached by file identity (device, inode, size,
//! and the inode's change time: not the modification time, which the file's owner may set back
//! after rewriting it, while any write or `utime` moves the change time). Selector values are
//! never logged at info level.
//!
//! The pid may be reused by another process between connect and attestation: the caller must
//! check afterwards that the process is still the one that connected (the agent's front door
//! does), and give no identity otherwise.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use sigil_core::{Selector, SelectorSet};

/// The selector type this attestor produces.
pub const SELECTOR_TYPE: &str = "unix";

/// Executables larger than this are not hashed (no `unix:sha256` selector).
pub const DEFAULT_HASH_SIZE_LIMIT: u64 = 256 * 1024 * 1024;

/// Cached hashes kept at most.
const HASH_CACHE_CAPACITY: usize = 1024;

/// Why attestation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnixAttestorError {
    /// The process is gone, or `/proc` cannot be read for it.
    #[error("cannot inspect process {pid}: {source}")]
    Process {
        /// The pid.
        pid: i32,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A selector could not be built (a value the selector rules refuse).
    #[error("invalid selector: {0}")]
    Selector(#[from] sigil_core::SelectorError),
    /// `/proc/self` cannot be read: there is no proc filesystem, or this process is not in
    /// the one there (it belongs to a namespace nested below the agent's).
    #[error(
        "cannot read {path}: {source}; the unix attestor needs the proc filesystem of the \
         agent's own PID namespace (a proc filesystem that does not show this process belongs \
         to another namespace)"
    )]
    NoProc {
        /// What was read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The proc filesystem read belongs to another PID namespace than this process's: the
    /// pids the kernel reports for callers would name other processes there.
    #[error(
        "{path} shows {found} where this process is {own}: the proc filesystem there belongs \
         to another PID namespace, where callers' pids name other processes; mount the proc \
         filesystem of the agent's own PID namespace (a container that attests the host's \
         processes must share the host's PID namespace)"
    )]
    ForeignProc {
        /// What was read.
        path: PathBuf,
        /// What it shows (`process N`, or the `NSpid` list).
        found: String,
        /// This process's pid.
        own: u32,
    },
}

/// The kernel's view of a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id, when the kernel reported one.
    pub pid: Option<i32>,
}

/// The attestor. Holds the hash cache; share one per agent.
#[derive(Debug)]
pub struct UnixAttestor {
    proc_root: PathBuf,
    etc_root: PathBuf,
    hash_size_limit: u64,
    hashes: Mutex<HashMap<FileIdentity, String>>,
    /// `/etc/passwd` parsed, while the file stays the same.
    users: Mutex<Option<NameTable>>,
    /// `/etc/group` parsed, while the file stays the same.
    groups: Mutex<Option<NameTable>>,
}

/// The names of a passwd- or group-format file by id (the first line of each id), and the
/// identity of the file they were read from: one `stat` tells whether they still hold, instead
/// of reading and parsing the whole file for every caller.
#[derive(Debug)]
struct NameTable {
    identity: FileIdentity,
    /// Modification time (seconds, nanoseconds), with `ctime` in the identity.
    mtime: (i64, i64),
    names: HashMap<u32, String>,
}

/// How long a passwd or group file must have been unchanged (counted in whole seconds of its
/// times, so between one and two seconds of real time) for its parsed names to be kept. File
/// times move in clock ticks: a file written again within the tick of its last write can keep
/// its times (and its size), so the names of a file that changed just before are not kept and
/// it is read for every caller until it has settled (git's "racy clean" rule).
const NAME_TABLE_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    /// The inode change time (seconds, nanoseconds): moved by every write, `chmod` or `utime`,
    /// and not settable by the file's owner.
    ctime: (i64, i64),
}

// === impl UnixAttestor ===

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::new()
    }
}

impl UnixAttestor {
    /// An attestor reading the real `/proc` and `/etc`.
    pub fn new() -> Self {
        Self::with_roots(PROC_ROOT, "/etc")
    }

    /// An attestor reading `proc_root` and `etc_root` instead (for tests).
    pub fn with_roots(proc_root: impl Into<PathBuf>, etc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            etc_root: etc_root.into(),
            hash_size_limit: DEFAULT_HASH_SIZE_LIMIT,
            hashes: Mutex::new(HashMap::new()),
            users: Mutex::new(None),
            groups: Mutex::new(None),
        }
    }

    /// Checks that the proc filesystem this attestor reads is the one of this process's PID
    /// namespace: `self` there names this process, and its `NSpid` this pid alone. The kernel
    /// reports each caller's pid in the namespace of the process that reads it; under a proc
    /// filesystem of another namespace (a container's own `/proc` replaced by the host's, or
    /// the reverse) that pid would name another process, and the caller would be attested as
    /// that process.
    ///
    /// # Errors
    ///
    /// [`UnixAttestorError::NoProc`] when `self` or its status cannot be read,
    /// [`UnixAttestorError::ForeignProc`] when it is another process or this one seen from
    /// another namespace.
    pub fn check_proc(&self) -> Result<(), UnixAttestorError> {
        let own = std::process::id();
        let link = self.proc_root.join("self");
        let target = std::fs::read_link(&link).map_err(|source| UnixAttestorError::NoProc {
            path: link.clone(),
            source,
        })?;
        if target.to_str().and_then(|t| t.parse::<u32>().ok()) != Some(own) {
            return Err(UnixAttestorError::ForeignProc {
                path: link,
                found: format!("process {}", target.display()),
                own,
            });
        }
        // The pid can be the same in two namespaces by chance. `NSpid` lists this process's
        // pid in the proc filesystem's namespace, then in each namespace nested below it down
        // to its own: one value when they are the same. (Linux 4.1 and later; without it, the
        // link above is the check.)
        let status_path = link.join("status");
        let status =
            std::fs::read_to_string(&status_path).map_err(|source| UnixAttestorError::NoProc {
                path: status_path.clone(),
                source,
            })?;
        if let Some(pids) = status.lines().find_map(|l| l.strip_prefix("NSpid:")) {
            let pids: Vec<&str> = pids.split_whitespace().collect();
            if pids != [own.to_string().as_str()] {
                return Err(UnixAttestorError::ForeignProc {
                    path: status_path,
                    found: format!("pids {} (NSpid)", pids.join(" ")),
                    own,
                });
            }
        }
        Ok(())
    }

    /// Sets the largest executable that is hashed.
    pub fn hash_size_limit(mut self, bytes: u64) -> Self {
        self.hash_size_limit = bytes;
        self
    }

    /// The selectors of the caller. With a pid, the process must be inspectable (else an
    /// error: no identity for a caller that cannot be attested). `with_sha256` adds
    /// `unix:sha256` (when the executable is within the size limit).
    ///
    /// It trusts that its proc root is the one of this process's PID namespace: call
    /// [`UnixAttestor::check_proc`] once before attesting anyone (the agent does at its start,
    /// and the Workload API service when it is built); it is not repeated here, per call.
    pub fn attest(
        &self,
        creds: Credentials,
        with_sha256: bool,
    ) -> Result<SelectorSet, UnixAttestorError> {
        self.attest_in(creds, None, with_sha256)
    }

    /// [`UnixAttestor::attest`], reading the process's `status` and `exe` link through
    /// `proc_dir`, its `/proc/PID` directory opened while it ran (by path under the proc root
    /// without one). Through the directory, reads fail once the process is gone, even if its
    /// pid was reused, and no path is looked up again.
    pub fn attest_in(
        &self,
        creds: Credentials,
        proc_dir: Option<BorrowedFd<'_>>,
        with_sha256: bool,
    ) -> Result<SelectorSet, UnixAttestorError> {
        let mut set = SelectorSet::new();
        set.insert(selector(&format!("uid:{}", creds.uid))?);
        set.insert(selector(&format!("gid:{}", creds.gid))?);
        if let Some(name) = lookup_name(&self.users, &self.etc_root.join("passwd"), creds.uid) {
            set.insert(selector(&format!("user:{name}"))?);
        }
        if let Some(name) = lookup_name(&self.groups, &self.etc_root.join("group"), creds.gid) {
            set.insert(selector(&format!("group:{name}"))?);
        }
        let Some(pid) = creds.pid else {
            return Ok(set);
        };
        let proc_path = self.proc_root.join(pid.to_string());
        let io = |source| UnixAttestorError::Process { pid, source };
        // A directory of the real proc filesystem is of no use to an attestor given another
        // root (tests).
        let proc_dir = proc_dir.filter(|_| self.proc_root == Path::new(PROC_ROOT));
        let (status, exe) = match proc_dir {
            Some(dir) => {
                let status = nix::fcntl::openat(
                    dir,
                    "status",
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(std::io::Error::from)
                .and_then(|fd| read_whole(File::from(fd), &proc_path.join("status")))
                .map_err(io)?;
                let exe = nix::fcntl::readlinkat(dir, "exe").map_err(|e| io(e.into()))?;
                (status, PathBuf::from(exe))
            }
            None => (
                read_proc_file(&proc_path.join("status")).map_err(io)?,
                std::fs::read_link(proc_path.join("exe")).map_err(io)?,
            ),
        };
        for gid in supplementary_gids(&status) {
            set.insert(selector(&format!("supplementary_gid:{gid}"))?);
        }
        set.insert(selector(&format!("path:{}", exe.display()))?);
        let exe_link = proc_path.join("exe");
        if with_sha256 && let Some(hash) = self.sha256(&exe_link).map_err(io)? {
            set.insert(selector(&format!("sha256:{hash}"))?);
        }
        Ok(set)
    }

    /// SHA-256 (hex) of the file behind `/proc/PID/exe`, through the link itself so that the
    /// running executable is hashed even if its path now names another file. `None` above the
    /// size limit.
    fn sha256(&self, exe_link: &Path) -> std::io::Result<Option<String>> {
        let mut file = File::open(exe_link)?;
        let meta = file.metadata()?;
        if meta.len() > self.hash_size_limit {
            return Ok(None);
        }
        let identity = FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        };
        if let Some(hash) = self
            .hashes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&identity)
        {
            return Ok(Some(hash.clone()));
        }
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > self.hash_size_limit {
                return Ok(None);
            }
            context.update(&buf[..n]);
        }
        let hash: String = context
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut cache = self.hashes.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= HASH_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(identity, hash.clone());
        Ok(Some(hash))
    }
}

fn selector(value: &str) -> Result<Selector, sigil_core::SelectorError> {
    Selector::new(SELECTOR_TYPE, value)
}

/// The name of `id` in a passwd- or group-format file (`name:x:id:...`), from `table` while
/// the file is the one it was read from (same device, inode, size, modification and change
/// times), else read again. No name when the file cannot be read.
fn lookup_name(table: &Mutex<Option<NameTable>>, file: &Path, id: u32) -> Option<String> {
    let meta = std::fs::metadata(file).ok()?;
    let identity = FileIdentity {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.len(),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    };
    let mtime = (meta.mtime(), meta.mtime_nsec());
    if let Some(cached) = table
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .filter(|t| t.identity == identity && t.mtime == mtime)
    {
        return cached.names.get(&id).cloned();
    }
    // Read and parsed without the lock: a large or slow file holds up no other caller. The
    // file was stat'ed first, so what is read is at least as new as the identity kept with it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let settled = now.saturating_sub(meta.mtime().max(meta.ctime()))
        >= i64::try_from(NAME_TABLE_SETTLE.as_secs()).unwrap_or(i64::MAX);
    let text = std::fs::read_to_string(file).ok()?;
    let mut names = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split(':');
        let (Some(name), Some(_password), Some(found)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if let Ok(found) = found.parse::<u32>()
            && !name.is_empty()
        {
            names.entry(found).or_insert_with(|| name.to_owned());
        }
    }
    let name = names.get(&id).cloned();
    // Only a settled file's names are kept (see `NAME_TABLE_SETTLE`).
    if settled {
        *table.lock().unwrap_or_else(PoisonError::into_inner) = Some(NameTable {
            identity,
            mtime,
            names,
        });
    }
    name
}

/// The proc filesystem of a real agent.
const PROC_ROOT: &str = "/proc";

/// The largest `/proc` file read whole (`status` is about 1.5 KiB).
const MAX_PROC_FILE: usize = 64 * 1024;

/// [`read_whole`] of the file at `path`.
fn read_proc_file(path: &Path) -> std::io::Result<String> {
    read_whole(File::open(path)?, path)
}

/// A small `/proc` file, open, read whole in as few calls as it takes (two for `status`: its
/// text, then the end; `path` names it in errors). `std::fs::read_to_string` sizes its buffer
/// from the file's reported size, which is 0 in `/proc`, so it stats the file and then reads it
/// in pieces of 32, 32, 64, ... bytes: ten calls more per workload attested.
fn read_whole(mut file: File, path: &Path) -> std::io::Result<String> {
    let mut buf = vec![0; 4096];
    let mut len = 0;
    loop {
        if len > MAX_PROC_FILE {
            return Err(std::io::Error::other(format!(
                "{} is larger than {MAX_PROC_FILE} bytes",
                path.display()
            )));
        }
        if len == buf.len() {
            // One byte past the limit at most: enough to tell a file at the limit from one over.
            buf.resize((len * 2).min(MAX_PROC_FILE + 1), 0);
        }
        let Some(spare) = buf.get_mut(len..) else {
            break;
        };
        match file.read(spare) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The `Groups:` line of `/proc/PID/status`.
fn supplementary_gids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(set: &SelectorSet, s: &str) -> bool {
        set.contains(&Selector::parse(s).unwrap())
    }

    /// Through the `/proc/PID` directory held open, attestation gives what it gives by path, and
    /// nothing once that process is gone (whatever now holds its pid).
    #[test]
    fn attestation_through_the_held_proc_directory() {
        use std::os::fd::AsFd;
        let open_dir = |pid: u32| {
            nix::fcntl::open(
                format!("/proc/{pid}").as_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .unwrap()
        };
        let attestor = UnixAttestor::new();
        let creds = |pid: u32| Credentials {
            uid: 0,
            gid: 0,
            pid: Some(i32::try_from(pid).unwrap()),
        };
        let own = std::process::id();
        let dir = open_dir(own);
        let through_dir = attestor
            .attest_in(creds(own), Some(dir.as_fd()), false)
            .unwrap();
        assert_eq!(through_dir, attestor.attest(creds(own), false).unwrap());
        assert!(
            through_dir
                .iter()
                .any(|s| s.to_string().starts_with("unix:path:")),
            "{through_dir:?}"
        );

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dir = open_dir(child.id());
        child.wait().unwrap();
        let gone = attestor.attest_in(creds(child.id()), Some(dir.as_fd()), false);
        assert!(
            matches!(gone, Err(UnixAttestorError::Process { .. })),
            "{gone:?}"
        );
    }

    /// `/proc` files are read whole, whatever their size up to the limit: the real status of
    /// this process, a file that needs the buffer to grow, and one too large, refused.
    #[test]
    fn proc_files_are_read_whole_and_bounded() {
        let status = read_proc_file(Path::new("/proc/self/status")).unwrap();
        assert!(
            status.lines().any(|l| l
                .split_whitespace()
                .eq(["Pid:", &std::process::id().to_string()])),
            "{status}"
        );
        assert!(status.ends_with('\n'), "to the end: {status}");
        let dir = tempfile::tempdir().unwrap();
        let grown = dir.path().join("grown");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert!(text.len() > 4096);
        std::fs::write(&grown, &text).unwrap();
        assert_eq!(read_proc_file(&grown).unwrap(), text);
        let large = dir.path().join("large");
        std::fs::write(&large, vec![b'x'; MAX_PROC_FILE + 1]).unwrap();
        assert!(read_proc_file(&large).is_err());
        let at_limit = dir.path().join("at_limit");
        std::fs::write(&at_limit, vec![b'x'; MAX_PROC_FILE]).unwrap();
        assert_eq!(read_proc_file(&at_limit).unwrap().len(), MAX_PROC_FILE);
    }

    /// The agent starts only where `/proc/self` is it alone: the real `/proc` here passes; a
    /// proc filesystem with no `self`, whose `self` names another process, or whose `NSpid`
    /// shows this process in a second namespace (the same pid in both by chance) is refused;
    /// one whose `self` is this process, with `NSpid` its pid alone or no `NSpid` (before Linux
    /// 4.1), passes.
    #[test]
    fn only_the_proc_filesystem_of_this_pid_namespace_passes_the_check() {
        UnixAttestor::new().check_proc().unwrap();

        let own = std::process::id();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("proc");
        std::fs::create_dir_all(root.join(own.to_string())).unwrap();
        let attestor = UnixAttestor::with_roots(&root, "/etc");
        let refusal = || attestor.check_proc().unwrap_err();
        assert!(matches!(refusal(), UnixAttestorError::NoProc { .. }));

        let link = |target: String| {
            let _ = std::fs::remove_file(root.join("self"));
            std::os::unix::fs::symlink(target, root.join("self")).unwrap();
        };
        link((own + 1).to_string());
        let err = refusal();
        assert!(
            matches!(&err, UnixAttestorError::ForeignProc { found, own: o, .. }
                if *found == format!("process {}", own + 1) && *o == own),
            "{err:?}"
        );
        assert!(err.to_string().contains("another PID namespace"), "{err}");

        link(own.to_string());
        // No status to read.
        assert!(matches!(refusal(), UnixAttestorError::NoProc { .. }));
        let status = |nspid: &str| {
            std::fs::write(
                root.join(own.to_string()).join("status"),
                format!("Name:\tsigil-agent\n{nspid}Uid:\t0\t0\t0\t0\n"),
            )
            .unwrap();
        };
        status(&format!("NSpid:\t{own}\n"));
        attestor.check_proc().unwrap();
        status("");
        attestor.check_proc().unwrap();
        status(&format!("NSpid:\t{own}\t{own}\n"));
        let err = refusal();
        assert!(
            matches!(&err, UnixAttestorError::ForeignProc { found, .. }
                if *found == format!("pids {own} {own} (NSpid)")),
            "{err:?}"
        );
        status(&format!("NSpid:\t{}\t{own}\n", own + 7));
        assert!(matches!(refusal(), UnixAttestorError::ForeignProc { .. }));
    }

    #[test]
    fn the_current_process_is_attested_with_every_selector() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let gid = std::fs::metadata("/proc/self").unwrap().gid();
        let attestor = UnixAttestor::new();
        let set = attestor
            .attest(
                Credentials {
                    uid,
                    gid,
                    pid: Some(pid),
                },
                true,
            )
            .unwrap();
        assert!(has(&set, &format!("unix:uid:{uid}")));
        assert!(has(&set, &format!("unix:gid:{gid}")));
        let exe = std::env::current_exe().unwrap();
        assert!(
            has(&set, &format!("unix:path:{}", exe.display())),
            "{set:?}"
        );
        let bytes = std::fs::read(&exe).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert!(has(&set, &format!("unix:sha256:{hex}")));
        if uid == 0 {
            assert!(has(&set, "unix:user:root"), "{set:?}");
        }
        // Cached the second time (same answer).
        let again = attestor
            .attest(
                Credentials {
                    uid,
                    gid,
                    pid: Some(pid),
                },
                true,
            )
            .unwrap();
        assert_eq!(again, set);
        // No hashing unless asked.
        let cheap = attestor
            .attest(
                Credentials {
                    uid,
                    gid,
                    pid: Some(pid),
                },
                false,
            )
            .unwrap();
        assert!(!cheap.iter().any(|s| s.value().starts_with("sha256:")));
    }

    #[test]
    fn names_come_from_passwd_and_group_files_and_groups_from_proc() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        let proc_ = dir.path().join("proc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(proc_.join("42")).unwrap();
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/a:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(etc.join("group"), "root:x:0:\nstaff:x:1000:alice\n").unwrap();
        std::fs::write(proc_.join("42/status"), "Name:\tx\nGroups:\t4 27 1000 \n").unwrap();
        std::os::unix::fs::symlink("/usr/bin/env", proc_.join("42/exe")).unwrap();
        let attestor = UnixAttestor::with_roots(&proc_, &etc);
        let set = attestor
            .attest(
                Credentials {
                    uid: 1000,
                    gid: 1000,
                    pid: Some(42),
                },
                false,
            )
            .unwrap();
        for s in [
            "unix:uid:1000",
            "unix:gid:1000",
            "unix:user:alice",
            "unix:group:staff",
            "unix:supplementary_gid:4",
            "unix:supplementary_gid:27",
            "unix:supplementary_gid:1000",
            "unix:path:/usr/bin/env",
        ] {
            assert!(has(&set, s), "{s} missing from {set:?}");
        }
        let by_uid_1000 = || {
            attestor
                .attest(
                    Credentials {
                        uid: 1000,
                        gid: 1000,
                        pid: None,
                    },
                    false,
                )
                .unwrap()
        };
        // A changed passwd file is read again (here: a new inode, as editors write it).
        std::fs::write(
            etc.join("passwd.new"),
            "root:x:0:0::/root:/bin/sh\nbob:x:1000:1000::/home/b:/bin/sh\n",
        )
        .unwrap();
        std::fs::rename(etc.join("passwd.new"), etc.join("passwd")).unwrap();
        let renamed = by_uid_1000();
        assert!(has(&renamed, "unix:user:bob"), "{renamed:?}");
        assert!(!has(&renamed, "unix:user:alice"), "{renamed:?}");
        // Rewritten in place with the same size within the same clock tick (the file times may
        // not move): a file that changed within the last seconds is read for every caller.
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0::/root:/bin/sh\ncal:x:1000:1000::/home/b:/bin/sh\n",
        )
        .unwrap();
        let rewritten = by_uid_1000();
        assert!(has(&rewritten, "unix:user:cal"), "{rewritten:?}");
        // A uid without a name gets no user selector.
        let set = attestor
            .attest(
                Credentials {
                    uid: 4242,
                    gid: 4242,
                    pid: None,
                },
                false,
            )
            .unwrap();
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn a_vanished_process_is_an_error_not_an_identity() {
        let dir = tempfile::tempdir().unwrap();
        let attestor = UnixAttestor::with_roots(dir.path(), dir.path());
        let err = attestor
            .attest(
                Credentials {
                    uid: 0,
                    gid: 0,
                    pid: Some(7),
                },
                false,
            )
            .unwrap_err();
        assert!(
            matches!(err, UnixAttestorError::Process { pid: 7, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_rewritten_file_is_hashed_again_even_with_its_mtime_set_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"the approved build").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let attestor = UnixAttestor::new();
        let first = attestor.sha256(&path).unwrap().unwrap();
        // Same size, new content, the modification time put back as it was: what an owner
        // hiding a swap would do. The change time still moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, b"the evil build!!!!").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        let second = attestor.sha256(&path).unwrap().unwrap();
        assert_ne!(first, second, "the cache served the old file's hash");
        assert_eq!(second, sigil_core::hex::sha256(b"the evil build!!!!"));
    }

    #[test]
    fn executables_over_the_size_limit_are_not_hashed() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let attestor = UnixAttestor::new().hash_size_limit(10);
        let set = attestor
            .attest(
                Credentials {
                    uid: 0,
                    gid: 0,
                    pid: Some(pid),
                },
                true,
            )
            .unwrap();
        assert!(!set.iter().any(|s| s.value().starts_with("sha256:")));
    }
}
