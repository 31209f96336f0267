//! The directories and key files the daemons keep must be theirs alone: with the real binaries, a
//! data dir or socket dir that group or others may write, or that another uid owns, and a key
//! file of another uid, stop the daemon with an error that names the path and the fix.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use sigil_tests::*;

fn server(data_dir: &Path, admin_socket: &Path) -> Command {
    let mut command = Command::new(binary("sigil-server"));
    command
        .args(["run", "--trust-domain", "example.org"])
        .args(["--bind-address", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--admin-socket")
        .arg(admin_socket);
    command
}

fn agent(server: &TestServer, data_dir: &Path, socket: &Path) -> Command {
    let mut command = Command::new(binary("sigil-agent"));
    command
        .args(["run", "--trust-domain", "example.org"])
        .arg("--server-address")
        .arg(server.node_addr.to_string())
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--socket-path")
        .arg(socket);
    command
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_server_data_dir_or_admin_socket_dir_others_may_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let private = dir.path().join("private");
    std::fs::create_dir(&data).unwrap();
    std::fs::create_dir(&private).unwrap();
    chmod(&data, 0o777);
    let stderr = refused(&mut server(&data, &private.join("admin.sock")));
    assert!(
        stderr.contains("writable by group or others")
            && stderr.contains(&data.display().to_string())
            && stderr.contains("chmod go-w"),
        "{stderr}"
    );
    // Nothing was created in it.
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);

    // A directory above it that others may write (they could rename ours away).
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o777);
    let stderr = refused(&mut server(
        &shared.join("data"),
        &private.join("admin.sock"),
    ));
    assert!(
        stderr.contains("writable by group or others")
            && stderr.contains(&format!("{} ", shared.display())),
        "{stderr}"
    );

    chmod(&data, 0o700);
    chmod(&private, 0o773);
    let stderr = refused(&mut server(&data, &private.join("admin.sock")));
    assert!(
        stderr.contains("admin socket directory")
            && stderr.contains(&private.display().to_string()),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_agent_dir_or_key_file_of_another_uid_is_refused() {
    let server = TestServer::start("");
    let mut running = TestAgentProcess::start(&server).await;
    let data = running.data_dir();
    let socket = running.socket();
    running.kill();

    // A socket directory others may write.
    let public = socket.parent().unwrap();
    chmod(public, 0o777);
    let stderr = refused(&mut agent(&server, &data, &socket));
    assert!(
        stderr.contains("writable by group or others")
            && stderr.contains(&public.display().to_string()),
        "{stderr}"
    );
    chmod(public, 0o755);

    if !is_root() {
        eprintln!("note: skipping the owner checks: giving files to another uid needs root");
        return;
    }
    // The stored key and SVID, owned by another uid.
    let state = data.join("agent.json");
    assert!(state.exists());
    std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
    let stderr = refused(&mut agent(&server, &data, &socket));
    assert!(
        stderr.contains("owned by uid 65534") && stderr.contains("agent.json"),
        "{stderr}"
    );
    std::os::unix::fs::chown(&state, Some(0), None).unwrap();

    // The data directory, owned by another uid.
    std::os::unix::fs::chown(&data, Some(65534), None).unwrap();
    let stderr = refused(&mut agent(&server, &data, &socket));
    assert!(
        stderr.contains("owned by uid 65534") && stderr.contains(&data.display().to_string()),
        "{stderr}"
    );
}
