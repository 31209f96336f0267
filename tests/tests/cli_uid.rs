//! The admin socket is open to every local user (its directory 0711, the socket 0666), so what
//! refuses an unprivileged caller is the server's uid check (SO_PEERCRED), not file permissions;
//! a uid listed in `admin_uids` is served.
#![allow(clippy::unwrap_used, clippy::print_stderr, reason = "test code")]

mod cli_harness;

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cli_harness::{Run, Server, binary};

/// The unprivileged uid and gid the CLI runs as (`nobody`).
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // The owner of /proc/self is the process's effective uid.
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0
}

/// A copy of the binary that uid 65534 can run (target/ may not be reachable for it).
fn binary_for_nobody(dir: &Path) -> PathBuf {
    let path = dir.join("sigil-server");
    std::fs::copy(binary(), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs the CLI as uid/gid 65534 with no supplementary groups.
fn as_nobody(bin: &Path, socket: &Path, args: &[&str]) -> Run {
    let mut command = if Path::new("/usr/bin/setpriv").exists() {
        let mut c = Command::new("/usr/bin/setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin);
        c
    } else {
        let mut c = Command::new(bin);
        c.uid(NOBODY).gid(NOBODY);
        c
    };
    let output = command
        .args(args)
        .arg("--admin-socket")
        .arg(socket)
        .env_remove("SIGIL_ADMIN_SOCKET")
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::new(args, output)
}

#[test]
fn cli_an_unprivileged_uid_is_refused_by_the_uid_check_unless_listed_in_admin_uids() {
    if !is_root() {
        eprintln!("note: skipping the admin uid test: it must run as root to switch to uid 65534");
        return;
    }
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = binary_for_nobody(bin_dir.path());

    let server = Server::start();
    let socket = server.socket();
    // Reachable by anyone: the refusal below cannot come from file permissions.
    let socket_mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(socket_mode, 0o666);
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o711);

    for args in [
        &["entry", "count"][..],
        &["healthcheck"],
        &["token", "generate", "--output", "json"],
    ] {
        let run = as_nobody(&bin, &socket, args);
        assert_eq!(run.code, Some(1), "{args:?}: {}{}", run.stdout, run.stderr);
        assert_eq!(
            run.stderr,
            "sigil-server: permission denied: uid 65534 may not use the admin API: run as root or \
             add the uid to admin_uids\n",
            "{args:?}"
        );
        assert_eq!(run.stdout, "");
    }
    // Root is served by the same server.
    assert_eq!(server.cli(&["entry", "count"]).ok(), "0 entries\n");

    let listed = Server::start_with_config(Some("admin_uids = [65534]\n"));
    let run = as_nobody(&bin, &listed.socket(), &["entry", "count"]);
    assert_eq!(run.ok(), "0 entries\n");
    let run = as_nobody(
        &bin,
        &listed.socket(),
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/by-nobody",
            "--parent-id",
            "spiffe://example.org/node",
            "--selector",
            "unix:uid:65534",
            "--output",
            "json",
        ],
    );
    let created: serde_json::Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(created["spiffe_id"], "spiffe://example.org/by-nobody");
    assert_eq!(listed.cli(&["entry", "count"]).ok(), "1 entry\n");
}
