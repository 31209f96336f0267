//! The service units in `examples/systemd` pass `systemd-analyze verify` with `ExecStart`
//! pointed at the binaries this build made (systemd checks they exist and are executable), and
//! with no warning at all (an option it cannot parse is only a warning, so warnings fail too).
//!
//! Skipped with one line where `systemd-analyze` is absent, unless
//! `SIGIL_REQUIRE_SYSTEMD_ANALYZE=1` (CI sets it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::path::Path;
use std::process::Command;

#[test]
fn the_service_units_verify_against_the_built_binaries() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    if !analyze.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("SIGIL_REQUIRE_SYSTEMD_ANALYZE").as_deref() != Ok("1"),
            "SIGIL_REQUIRE_SYSTEMD_ANALYZE=1 but systemd-analyze is missing (apt-get install systemd)"
        );
        eprintln!("SKIPPED: systemd-analyze is missing (apt-get install systemd)");
        return;
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/systemd");
    let bin = sigil_tests::binary("sigil-server")
        .parent()
        .unwrap()
        .to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let mut verified = Vec::new();
    for entry in std::fs::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("ExecStart=/usr/local/bin/sigil-"),
            "{} runs no sigil binary from /usr/local/bin",
            path.display()
        );
        let here = dir.path().join(path.file_name().unwrap());
        std::fs::write(
            &here,
            text.replace("/usr/local/bin/", &format!("{}/", bin.display())),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&here)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Lines about other units on this machine (its own unit files) are not ours.
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| {
                l.contains(here.to_str().unwrap())
                    || l.contains(&*here.file_name().unwrap().to_string_lossy())
            })
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "{}: {}\n{stderr}",
            path.display(),
            out.status
        );
        verified.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    verified.sort();
    assert_eq!(
        verified,
        [
            "sigil-agent.service",
            "sigil-helper-nginx.service",
            "sigil-server.service"
        ]
    );
}
