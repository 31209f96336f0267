//! Throwaway SoftHSM2 tokens: a configuration and a token directory in a temporary directory,
//! a token initialised with `softhsm2-util`. Processes that use the token need
//! [`SoftHsm::conf`] as `SOFTHSM2_CONF` in their environment.
//!
//! Without SoftHSM2 on the machine [`SoftHsm::start`] prints one line saying what to install
//! and answers `None`; with `SIGIL_REQUIRE_SOFTHSM=1` (CI sets it) it fails instead.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable that turns a missing SoftHSM2 into a test failure.
pub const REQUIRE_ENV: &str = "SIGIL_REQUIRE_SOFTHSM";

/// The user PIN of every token made here.
pub const PIN: &str = "654321";

/// Where Debian puts the module.
const MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
];

/// A SoftHSM2 installation of its own, with one initialised token.
#[derive(Debug)]
pub struct SoftHsm {
    dir: tempfile::TempDir,
    module: PathBuf,
    label: String,
}

impl SoftHsm {
    /// A configuration in a temporary directory and a token labelled `label` (user PIN
    /// [`PIN`]); `None` (after one line) without SoftHSM2.
    ///
    /// # Panics
    /// When SoftHSM2 is missing and [`REQUIRE_ENV`] is `1`, or when the token cannot be made.
    #[allow(clippy::panic, reason = "test support: a test that cannot start fails")]
    pub fn start(label: &str) -> Option<Self> {
        let module = MODULES.iter().map(PathBuf::from).find(|p| p.exists());
        let util = Command::new("softhsm2-util")
            .arg("--version")
            .output()
            .is_ok();
        let (Some(module), true) = (module, util) else {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!("{REQUIRE_ENV}=1 but SoftHSM2 is not installed: apt-get install softhsm2");
            }
            eprintln!(
                "skipped: SoftHSM2 is not installed; install it with `apt-get install softhsm2`"
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("sigil-softhsm-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap_or_else(|e| panic!("{}: {e}", tokens.display()));
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap_or_else(|e| panic!("softhsm2.conf: {e}"));
        let hsm = Self {
            dir,
            module,
            label: label.to_owned(),
        };
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", hsm.conf())
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                "123456",
                "--pin",
                PIN,
            ])
            .output()
            .unwrap_or_else(|e| panic!("softhsm2-util: {e}"));
        if !out.status.success() {
            panic!(
                "softhsm2-util --init-token: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Some(hsm)
    }

    /// The PKCS#11 module.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The configuration file, for `SOFTHSM2_CONF`.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Writes the user PIN to a file (mode 0600) in the temporary directory; returns its path.
    ///
    /// # Panics
    /// When the file cannot be written.
    #[allow(clippy::panic, reason = "test support")]
    pub fn pin_file(&self, pin: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.path().join(format!("pin-{pin}"));
        std::fs::write(&path, format!("{pin}\n")).unwrap_or_else(|e| panic!("pin file: {e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("pin file: {e}"));
        path
    }

    /// How many objects (keys, public and private) the token's directory holds.
    pub fn object_count(&self) -> usize {
        fn count(dir: &Path) -> usize {
            std::fs::read_dir(dir).map_or(0, |entries| {
                entries
                    .flatten()
                    .map(|e| {
                        let path = e.path();
                        if path.is_dir() {
                            count(&path)
                        } else {
                            // `token.object` is the token itself, not a key.
                            usize::from(
                                path.extension().is_some_and(|x| x == "object")
                                    && path.file_name().is_some_and(|n| n != "token.object"),
                            )
                        }
                    })
                    .sum()
            })
        }
        count(&self.dir.path().join("tokens"))
    }
}
