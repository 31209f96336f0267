//! Files a daemon keeps beside its store: written whole or not at all, readable by the owner only;
//! and the directories they live in, which must belong to the daemon.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

/// Why a directory or a key file a daemon keeps cannot be trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivatePathError {
    /// It could not be created or inspected.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// It exists but is not a directory.
    #[error("{path} exists but is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// It is a symbolic link: where it points could be changed under the daemon.
    #[error("{path} is a symbolic link; give the directory itself")]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// Another uid owns it: that user could read or replace what the daemon keeps there.
    #[error(
        "{path} is owned by uid {owner}, not by uid {uid} that this daemon runs as (nor root): \
         its owner could read or replace what is kept there; remove it, or `chown {uid} {path}` \
         if it is yours"
    )]
    Owner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The daemon's effective uid.
        uid: u32,
    },
    /// Group or others may write it (a directory: create, rename or replace entries in it).
    #[error(
        "{path} is writable by group or others (mode {mode:04o}): another user could replace \
         what is kept there; `chmod go-w {path}`"
    )]
    Writable {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file group or others may read or write.
    #[error("{path} has mode {mode:04o}; a key file must be 0600 (`chmod 600 {path}`)")]
    KeyMode {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Who may own what a daemon keeps: itself, or root (who can read everything anyway).
fn check_owner(path: &Path, meta: &Metadata) -> Result<(), PrivatePathError> {
    let uid = nix::unistd::geteuid().as_raw();
    let owner = meta.uid();
    if owner == uid || owner == 0 {
        Ok(())
    } else {
        Err(PrivatePathError::Owner {
            path: path.to_owned(),
            owner,
            uid,
        })
    }
}

/// Makes sure `path` is a directory only this daemon (or root) controls: when missing, creates
/// it and its parents with `mode`; then every directory from `/` down to it must be owned by
/// the daemon's uid or root and not writable by group or others, except that a directory above
/// it may be a root-owned shared one with the sticky bit (like `/tmp`, where nobody can rename
/// or remove another's entries). `path` itself may not be a symbolic link, and a link above it
/// must belong to the daemon's uid or root. Otherwise another user could rename the directory
/// away and put their own in its place (a socket of theirs where workloads or admins connect, a
/// store of theirs the daemon trusts).
///
/// # Errors
///
/// [`PrivatePathError`], naming the directory at fault and what to change.
pub fn check_private_dir(path: &Path, mode: u32) -> Result<(), PrivatePathError> {
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| PrivatePathError::Io { what, path, source }
    };
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(path)
                .map_err(io("create directory", path))?;
        }
        Err(source) => return Err(io("inspect", path)(source)),
    }
    // Created now, or by someone else in the meantime: check it either way, from the root down.
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map_err(io("resolve", path))?
            .join(path)
    };
    let mut chain: Vec<&Path> = absolute.ancestors().collect();
    chain.reverse();
    let last = chain.len().saturating_sub(1);
    for (i, dir) in chain.into_iter().enumerate() {
        let link = fs::symlink_metadata(dir).map_err(io("inspect", dir))?;
        if link.file_type().is_symlink() {
            if i == last {
                return Err(PrivatePathError::Symlink {
                    path: dir.to_owned(),
                });
            }
            check_owner(dir, &link)?;
        }
        let meta = fs::metadata(dir).map_err(io("inspect", dir))?;
        if !meta.is_dir() {
            return Err(PrivatePathError::NotADirectory {
                path: dir.to_owned(),
            });
        }
        check_owner(dir, &meta)?;
        let bits = meta.permissions().mode() & 0o7777;
        let shared_sticky = i != last && meta.uid() == 0 && bits & 0o1000 != 0;
        if bits & 0o022 != 0 && !shared_sticky {
            return Err(PrivatePathError::Writable {
                path: dir.to_owned(),
                mode: bits,
            });
        }
    }
    Ok(())
}

/// Checks an open key file: owned by the daemon's uid (or root), mode 0600 or stricter.
///
/// # Errors
///
/// [`PrivatePathError::Owner`], [`PrivatePathError::KeyMode`], or the `fstat` failure.
pub fn check_key_file(path: &Path, file: &File) -> Result<(), PrivatePathError> {
    let meta = file.metadata().map_err(|source| PrivatePathError::Io {
        what: "inspect",
        path: path.to_owned(),
        source,
    })?;
    check_owner(path, &meta)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PrivatePathError::KeyMode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads a secret (a key, a PIN) from `path` into zeroized memory, once the open file is
/// checked as [`check_key_file`] does (owned by the daemon's uid or root, mode 0600 or
/// stricter), with room for it from the start so that no copy is left behind by a reallocation.
///
/// # Errors
///
/// Why not (the checks' errors name the path; the caller names it for the others).
pub fn read_secret(path: &Path) -> Result<zeroize::Zeroizing<String>, String> {
    use std::io::Read as _;
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    check_key_file(path, &file).map_err(|e| e.to_string())?;
    let size = file.metadata().map_or(0, |m| m.len());
    let mut text = zeroize::Zeroizing::new(String::with_capacity(
        usize::try_from(size).unwrap_or(0).saturating_add(1),
    ));
    file.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// The mode of every file [`write_private`] writes.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Replaces `path` with `bytes` atomically, mode 0600: a temporary file beside it (created
/// anew, never followed through a link), fsync, rename over `path`, fsync of the directory.
/// A crash leaves either the old file or the new one, never a mix.
///
/// # Errors
///
/// The first I/O error, with the temporary file removed.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&tmp)?;
        // The umask can only remove bits; set the mode exactly.
        file.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_private_dir_is_created_or_must_be_the_daemons_and_not_writable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b/data");
        check_private_dir(&data, 0o700).unwrap();
        assert_eq!(
            fs::metadata(&data).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Existing and fine: accepted again.
        check_private_dir(&data, 0o700).unwrap();
        for mode in [0o770, 0o702, 0o777, 0o1777] {
            fs::set_permissions(&data, fs::Permissions::from_mode(mode)).unwrap();
            let err = check_private_dir(&data, 0o700).unwrap_err();
            assert!(
                matches!(err, PrivatePathError::Writable { .. }),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("chmod go-w"), "{err}");
        }
        fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
        check_private_dir(&data, 0o700).unwrap();
        // A directory above it that others may write: they could rename ours away.
        let above = dir.path().join("a");
        fs::set_permissions(&above, fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_private_dir(&data, 0o700).unwrap_err();
        assert!(
            matches!(&err, PrivatePathError::Writable { path, .. } if *path == above),
            "{err}"
        );
        // ...unless it is root's, with the sticky bit (as /tmp is).
        fs::set_permissions(&above, fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(check_private_dir(&data, 0o700).is_ok(), is_root());
        fs::set_permissions(&above, fs::Permissions::from_mode(0o755)).unwrap();
        // A file where the directory should be, and a link in its place.
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            check_private_dir(&file, 0o700),
            Err(PrivatePathError::NotADirectory { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        assert!(matches!(
            check_private_dir(&link, 0o700),
            Err(PrivatePathError::Symlink { .. })
        ));
        // Through a link of ours above it: fine.
        let via = dir.path().join("via");
        std::os::unix::fs::symlink(dir.path().join("a/b"), &via).unwrap();
        check_private_dir(&via.join("data"), 0o700).unwrap();
    }

    #[test]
    fn a_directory_or_key_of_another_uid_is_refused() {
        if !is_root() {
            eprintln!("note: skipping: giving a directory to another uid needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
        let err = check_private_dir(&data, 0o700).unwrap_err();
        assert!(
            matches!(err, PrivatePathError::Owner { owner: 65534, .. }),
            "{err}"
        );
        // A directory of another uid above ours.
        let inner = data.join("inner");
        std::os::unix::fs::chown(&data, Some(0), Some(0)).unwrap();
        check_private_dir(&inner, 0o700).unwrap();
        std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
        let err = check_private_dir(&inner, 0o700).unwrap_err();
        assert!(
            matches!(&err, PrivatePathError::Owner { path, owner: 65534, .. } if *path == data),
            "{err}"
        );
        let key = dir.path().join("key");
        write_private(&key, b"secret").unwrap();
        check_key_file(&key, &File::open(&key).unwrap()).unwrap();
        std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
        let err = check_key_file(&key, &File::open(&key).unwrap()).unwrap_err();
        assert!(matches!(err, PrivatePathError::Owner { .. }), "{err}");
        std::os::unix::fs::chown(&key, Some(0), None).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let err = check_key_file(&key, &File::open(&key).unwrap()).unwrap_err();
        assert!(
            matches!(err, PrivatePathError::KeyMode { mode: 0o640, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_private_file_is_replaced_whole_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_private(&path, b"first").unwrap();
        write_private(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing else is left in the directory.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // A missing directory is an error, not a panic.
        assert!(write_private(&dir.path().join("missing/state.json"), b"x").is_err());
    }
}
