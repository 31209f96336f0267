//! The signing keys of the trust domain's authorities, behind a small [`KeyManager`] trait.
//!
//! A key manager creates, loads and deletes ECDSA P-256 keys by id, and hands out each one as
//! a [`CaKey`]: something that knows its public key and signs, without ever showing its private
//! half. A KMS or HSM backend implements the same two traits; the CA never touches key bytes.
//!
//! [`RcgenSigner`] adapts a [`CaKey`] to rcgen's `SigningKey` (certificates), and
//! [`jws_signature`] turns its signature into the fixed-size form JOSE needs (JWT-SVIDs).
//!
//! The built-in backend, [`DiskKeyManager`], keeps each key as a PKCS#8 DER file, mode 0600, in
//! a directory of mode 0700. Files are written atomically (temporary file in the same directory,
//! write, fsync, rename, fsync the directory), so a crash leaves either no key or the whole key.
//! Key bytes are zeroized after use and never logged: every type here has a redacted `Debug`.

use sigil_daemon::PrivatePathError;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm, SigningKey};
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use zeroize::Zeroizing;

use super::hex;

/// The longest key id a [`KeyManager`] must accept, in bytes.
pub(crate) const MAX_KEY_ID_LEN: usize = 64;

/// The largest key file [`DiskKeyManager`] reads, in bytes (a P-256 PKCS#8 key is 138).
const MAX_KEY_FILE_LEN: u64 = 16 * 1024;

/// The mode of key files.
const KEY_FILE_MODE: u32 = 0o600;

/// The mode of the key directory.
const KEY_DIR_MODE: u32 = 0o700;

/// Why a key could not be generated, loaded, used or deleted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key id is empty, longer than [`MAX_KEY_ID_LEN`], or has characters other than
    /// lowercase letters, digits and `-`.
    #[error("invalid key id {id:?}: use 1 to 64 lowercase letters, digits and dashes")]
    InvalidKeyId {
        /// The id given.
        id: String,
    },
    /// There is no key with this id (deleted, or the key directory is not the one the journal
    /// was written with).
    #[error("no key with id {id}")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// A key with this id already exists; keys are never overwritten.
    #[error("a key with id {id} already exists")]
    AlreadyExists {
        /// The id asked for.
        id: String,
    },
    /// The key file can be read or written by its group or by others.
    #[error("key file {path} has mode {mode:o}; it must be 600")]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file belongs to another uid, or could not be inspected.
    #[error(transparent)]
    Untrusted(sigil_daemon::PrivatePathError),
    /// The stored key is not an unencrypted PKCS#8 ECDSA P-256 key.
    #[error("key {id} is not a valid pkcs#8 p-256 key")]
    InvalidKey {
        /// The key's id.
        id: String,
    },
    /// The crypto library failed to generate a key or a signature.
    #[error("{operation} failed")]
    Crypto {
        /// What was being done.
        operation: &'static str,
    },
    /// The PKCS#11 token failed or holds something unexpected.
    #[error("{reason}")]
    Token {
        /// What the token reported.
        reason: String,
    },
    /// A file system operation failed.
    #[error("cannot {operation} {path}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },
}

/// An ECDSA P-256 signing key held by a [`KeyManager`]. The private half never leaves it.
pub(crate) trait CaKey: Send + Sync + fmt::Debug {
    /// The id the key manager knows the key by.
    fn id(&self) -> &str;

    /// The public key as an uncompressed SEC 1 point (`0x04 || x || y`, 65 bytes).
    fn public_key(&self) -> &[u8];

    /// Signs `message` with ECDSA P-256 and SHA-256, returning the ASN.1 DER signature that
    /// X.509 uses (`SEQUENCE { r INTEGER, s INTEGER }`).
    ///
    /// # Errors
    ///
    /// Whatever the backend reports (a failed HSM or KMS call, for instance).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError>;
}

/// Creates, loads and deletes the authorities' ECDSA P-256 keys by id.
///
/// Ids are 1 to [`MAX_KEY_ID_LEN`] lowercase letters, digits and dashes. The calls may block
/// (disk, network): the CA runs them on tokio's blocking pool.
pub(crate) trait KeyManager: Send + Sync + fmt::Debug {
    /// Generates and stores a new key under `id`.
    ///
    /// # Errors
    ///
    /// [`KeyError::AlreadyExists`] when `id` is taken, and any backend failure.
    fn generate_key(&self, id: &str) -> Result<Arc<dyn CaKey>, KeyError>;

    /// Loads the key stored under `id`.
    ///
    /// # Errors
    ///
    /// [`KeyError::NotFound`] when there is none, and any backend failure.
    fn load_key(&self, id: &str) -> Result<Arc<dyn CaKey>, KeyError>;

    /// Deletes the key stored under `id`. Deleting a key that does not exist succeeds.
    ///
    /// # Errors
    ///
    /// Any backend failure.
    fn delete_key(&self, id: &str) -> Result<(), KeyError>;
}

/// A [`CaKey`] as rcgen's `SigningKey` (ECDSA P-256 with SHA-256), to sign certificates
/// through `rcgen::Issuer`.
#[derive(Clone)]
pub(crate) struct RcgenSigner {
    key: Arc<dyn CaKey>,
}

/// Keys as PKCS#8 DER files in one directory: `<dir>/<id>.key`, mode 0600, directory 0700.
#[derive(Debug, Clone)]
pub(crate) struct DiskKeyManager {
    dir: PathBuf,
}

/// A key loaded by [`DiskKeyManager`]. The private key lives inside `ring`.
struct DiskKey {
    id: String,
    key_pair: EcdsaKeyPair,
}

// === impl RcgenSigner ===

impl RcgenSigner {
    /// Wraps `key`.
    pub(crate) fn new(key: Arc<dyn CaKey>) -> Self {
        Self { key }
    }
}

impl PublicKeyData for RcgenSigner {
    fn der_bytes(&self) -> &[u8] {
        self.key.public_key()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for RcgenSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key.sign(msg).map_err(|error| {
            tracing::warn!(%error, key_id = self.key.id(), "ca key failed to sign");
            rcgen::Error::RemoteKeyError
        })
    }
}

impl fmt::Debug for RcgenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RcgenSigner")
            .field("key_id", &self.key.id())
            .finish()
    }
}

/// Signs `message` with `key` and returns the 64-byte `r || s` signature that JWS ES256 uses
/// (RFC 7518 §3.4), converted from the key's DER signature.
///
/// # Errors
///
/// The key's signing error, or [`KeyError::Crypto`] when its signature is not a well-formed
/// DER ECDSA P-256 signature.
pub(crate) fn jws_signature(key: &dyn CaKey, message: &[u8]) -> Result<[u8; 64], KeyError> {
    let der = key.sign(message)?;
    der_signature_to_fixed(&der).ok_or(KeyError::Crypto {
        operation: "decoding an ecdsa signature",
    })
}

/// `SEQUENCE { INTEGER r, INTEGER s }` (short-form lengths: a P-256 signature is at most 72
/// bytes) to `r || s`, each left-padded to 32 bytes.
fn der_signature_to_fixed(der: &[u8]) -> Option<[u8; 64]> {
    let (&tag, rest) = der.split_first()?;
    let (&len, body) = rest.split_first()?;
    if tag != 0x30 || len >= 0x80 || usize::from(len) != body.len() {
        return None;
    }
    let (r, body) = der_integer(body)?;
    let (s, body) = der_integer(body)?;
    if !body.is_empty() {
        return None;
    }
    let mut fixed = [0u8; 64];
    fixed[32 - r.len()..32].copy_from_slice(r);
    fixed[64 - s.len()..].copy_from_slice(s);
    Some(fixed)
}

/// One positive DER INTEGER of at most 32 significant bytes, and what follows it.
fn der_integer(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&len, rest) = rest.split_first()?;
    if tag != 0x02 || len >= 0x80 || usize::from(len) > rest.len() {
        return None;
    }
    let (value, rest) = rest.split_at(usize::from(len));
    let value = match value {
        [0, tail @ ..] => tail,
        other => other,
    };
    (value.len() <= 32).then_some((value, rest))
}

// === impl DiskKeyManager ===

impl DiskKeyManager {
    /// Uses `dir` for keys, creating it (and its parents) when missing. The directory is set to
    /// mode 0700.
    ///
    /// # Errors
    ///
    /// [`KeyError::Io`] when the directory cannot be created or its mode set.
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Result<Self, KeyError> {
        let dir = dir.into();
        DirBuilder::new()
            .recursive(true)
            .mode(KEY_DIR_MODE)
            .create(&dir)
            .map_err(|source| io_error("create key directory", &dir, source))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(KEY_DIR_MODE))
            .map_err(|source| io_error("set the mode of key directory", &dir, source))?;
        Ok(Self { dir })
    }

    #[cfg(test)]
    /// The key directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds key `id`.
    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.key"))
    }

    /// Writes `bytes` to `path` atomically: a temporary file in the same directory, mode 0600,
    /// written and fsynced, then renamed over `path`, then the directory fsynced.
    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
        let mut suffix = [0u8; 8];
        SystemRandom::new()
            .fill(&mut suffix)
            .map_err(|_| KeyError::Crypto {
                operation: "generating a temporary file name",
            })?;
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = self.dir.join(format!(".{name}.tmp-{}", hex(&suffix)));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(KEY_FILE_MODE)
                .open(&tmp)
                .map_err(|source| io_error("create", &tmp, source))?;
            // The umask can only remove bits; set the mode exactly.
            file.set_permissions(fs::Permissions::from_mode(KEY_FILE_MODE))
                .map_err(|source| io_error("set the mode of", &tmp, source))?;
            file.write_all(bytes)
                .map_err(|source| io_error("write", &tmp, source))?;
            file.sync_all()
                .map_err(|source| io_error("sync", &tmp, source))?;
            drop(file);
            fs::rename(&tmp, path).map_err(|source| io_error("rename into", path, source))?;
            self.sync_dir()
        })();
        if result.is_err() {
            // Best effort: the temporary file holds key material.
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn sync_dir(&self) -> Result<(), KeyError> {
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| io_error("sync key directory", &self.dir, source))
    }
}

impl KeyManager for DiskKeyManager {
    fn generate_key(&self, id: &str) -> Result<Arc<dyn CaKey>, KeyError> {
        check_key_id(id)?;
        let path = self.path(id);
        if path
            .try_exists()
            .map_err(|source| io_error("check", &path, source))?
        {
            return Err(KeyError::AlreadyExists { id: id.to_owned() });
        }
        // ring's document is not zeroized on drop (it has no Drop); keep it short-lived and
        // work on a zeroizing copy.
        let pkcs8 = {
            let document =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
                    .map_err(|_| KeyError::Crypto {
                        operation: "generating a p-256 key",
                    })?;
            Zeroizing::new(document.as_ref().to_vec())
        };
        let key = DiskKey::from_pkcs8(id, &pkcs8)?;
        self.write_atomically(&path, &pkcs8)?;
        tracing::debug!(key_id = id, path = %path.display(), "ca key generated");
        Ok(Arc::new(key))
    }

    fn load_key(&self, id: &str) -> Result<Arc<dyn CaKey>, KeyError> {
        check_key_id(id)?;
        let path = self.path(id);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound { id: id.to_owned() });
            }
            Err(source) => return Err(io_error("open", &path, source)),
        };
        sigil_daemon::check_key_file(&path, &file).map_err(|e| match e {
            PrivatePathError::KeyMode { path, mode } => {
                KeyError::InsecurePermissions { path, mode }
            }
            other => KeyError::Untrusted(other),
        })?;
        let mut pkcs8 = Zeroizing::new(Vec::new());
        (&mut file)
            .take(MAX_KEY_FILE_LEN)
            .read_to_end(&mut pkcs8)
            .map_err(|source| io_error("read", &path, source))?;
        Ok(Arc::new(DiskKey::from_pkcs8(id, &pkcs8)?))
    }

    fn delete_key(&self, id: &str) -> Result<(), KeyError> {
        check_key_id(id)?;
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(io_error("delete", &path, source)),
        }
    }
}

// === impl DiskKey ===

impl DiskKey {
    fn from_pkcs8(id: &str, pkcs8: &[u8]) -> Result<Self, KeyError> {
        let key_pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &SystemRandom::new())
                .map_err(|_| KeyError::InvalidKey { id: id.to_owned() })?;
        Ok(Self {
            id: id.to_owned(),
            key_pair,
        })
    }
}

impl CaKey for DiskKey {
    fn id(&self) -> &str {
        &self.id
    }

    fn public_key(&self) -> &[u8] {
        self.key_pair.public_key().as_ref()
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let signature = self
            .key_pair
            .sign(&SystemRandom::new(), message)
            .map_err(|_| KeyError::Crypto {
                operation: "ecdsa signing",
            })?;
        Ok(signature.as_ref().to_vec())
    }
}

impl fmt::Debug for DiskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskKey")
            .field("id", &self.id)
            .field("alg", &"ecdsa-p256")
            .field("private_key", &"[redacted]")
            .finish()
    }
}

/// Checks that `id` is 1 to [`MAX_KEY_ID_LEN`] lowercase letters, digits and dashes, so that
/// it is safe as a file name and in any backend.
pub(crate) fn check_key_id(id: &str) -> Result<(), KeyError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(KeyError::InvalidKeyId { id: id.to_owned() });
    }
    Ok(())
}

fn io_error(operation: &'static str, path: &Path, source: io::Error) -> KeyError {
    KeyError::Io {
        operation,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::{ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    use super::*;

    fn manager() -> (tempfile::TempDir, DiskKeyManager) {
        let dir = tempfile::tempdir().unwrap();
        let manager = DiskKeyManager::new(dir.path().join("keys")).unwrap();
        (dir, manager)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generated_keys_are_0600_files_in_a_0700_directory_and_reload() {
        let (_tmp, manager) = manager();
        assert_eq!(mode(manager.dir()), 0o700);
        let key = manager.generate_key("x509-abc").unwrap();
        let path = manager.dir().join("x509-abc.key");
        assert_eq!(mode(&path), 0o600);
        // Only the key file: no temporary file is left behind.
        let names: Vec<_> = fs::read_dir(manager.dir())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x509-abc.key")]);

        let reloaded = manager.load_key("x509-abc").unwrap();
        assert_eq!(reloaded.public_key(), key.public_key());
        assert_eq!(reloaded.id(), "x509-abc");

        // Both sign, and the signatures verify with the public key.
        let signature = reloaded.sign(b"message").unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key())
            .verify(b"message", &signature)
            .unwrap();
        let fixed = jws_signature(key.as_ref(), b"jws").unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key())
            .verify(b"jws", &fixed)
            .unwrap();
    }

    #[test]
    fn an_existing_directory_is_tightened_to_0700() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        fs::create_dir(&keys).unwrap();
        fs::set_permissions(&keys, fs::Permissions::from_mode(0o755)).unwrap();
        DiskKeyManager::new(&keys).unwrap();
        assert_eq!(mode(&keys), 0o700);
    }

    #[test]
    fn keys_are_never_overwritten_and_ids_are_checked() {
        let (_tmp, manager) = manager();
        let key = manager.generate_key("jwt-1").unwrap();
        assert!(matches!(
            manager.generate_key("jwt-1").unwrap_err(),
            KeyError::AlreadyExists { .. }
        ));
        assert_eq!(
            manager.load_key("jwt-1").unwrap().public_key(),
            key.public_key()
        );
        for bad in ["", "../etc/passwd", "A", "a/b", "a.key", &"a".repeat(65)] {
            assert!(
                matches!(
                    manager.generate_key(bad).unwrap_err(),
                    KeyError::InvalidKeyId { .. }
                ),
                "{bad:?}"
            );
            assert!(matches!(
                manager.load_key(bad).unwrap_err(),
                KeyError::InvalidKeyId { .. }
            ));
        }
    }

    #[test]
    fn load_refuses_missing_loose_and_malformed_keys() {
        let (_tmp, manager) = manager();
        assert!(matches!(
            manager.load_key("missing").unwrap_err(),
            KeyError::NotFound { .. }
        ));

        manager.generate_key("loose").unwrap();
        let path = manager.dir().join("loose.key");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = manager.load_key("loose").unwrap_err();
        assert!(
            matches!(err, KeyError::InsecurePermissions { mode: 0o644, .. }),
            "{err}"
        );

        let garbage = manager.dir().join("garbage.key");
        fs::write(&garbage, b"not a key").unwrap();
        fs::set_permissions(&garbage, fs::Permissions::from_mode(0o600)).unwrap();
        let err = manager.load_key("garbage").unwrap_err();
        assert!(matches!(err, KeyError::InvalidKey { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "key garbage is not a valid pkcs#8 p-256 key"
        );
    }

    #[test]
    fn delete_removes_the_file_and_is_idempotent() {
        let (_tmp, manager) = manager();
        manager.generate_key("gone").unwrap();
        manager.delete_key("gone").unwrap();
        assert!(!manager.dir().join("gone.key").exists());
        manager.delete_key("gone").unwrap();
        assert!(matches!(
            manager.load_key("gone").unwrap_err(),
            KeyError::NotFound { .. }
        ));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let (_tmp, manager) = manager();
        let key = manager.generate_key("secret").unwrap();
        let pkcs8 = fs::read(manager.dir().join("secret.key")).unwrap();
        let shown = format!("{key:?} {:?} {manager:?}", RcgenSigner::new(key.clone()));
        assert!(shown.contains("[redacted]"), "{shown}");
        assert!(shown.contains("secret"), "the id is shown: {shown}");
        // Neither the PKCS#8 bytes nor the private scalar appear, in any common rendering.
        let private_scalar = &pkcs8[36..68];
        for needle in [
            hex(&pkcs8),
            hex(private_scalar),
            format!("{:?}", &pkcs8[..]),
            format!("{private_scalar:?}"),
        ] {
            assert!(!shown.contains(&needle));
        }
    }

    #[test]
    fn der_signatures_convert_to_fixed_size() {
        // r and s with and without the leading zero of a "negative-looking" integer.
        let mut der = vec![0x30, 0x45, 0x02, 0x21, 0x00];
        der.extend([0x80; 32]);
        der.extend([0x02, 0x20]);
        der.extend([0x01; 32]);
        let fixed = der_signature_to_fixed(&der).unwrap();
        assert_eq!(&fixed[..32], &[0x80; 32]);
        assert_eq!(&fixed[32..], &[0x01; 32]);
        // A short r is left-padded.
        let der = [0x30, 0x06, 0x02, 0x01, 0x05, 0x02, 0x01, 0x07];
        let fixed = der_signature_to_fixed(&der).unwrap();
        assert_eq!(fixed[31], 5);
        assert_eq!(fixed[63], 7);
        assert!(fixed[..31].iter().all(|&b| b == 0));
        // Malformed input is refused, never a panic.
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x03, 0x02, 0x01],
            &[0x31, 0x06, 0x02, 0x01, 0x05, 0x02, 0x01, 0x07],
            &[0x30, 0x06, 0x02, 0x01, 0x05, 0x02, 0x02, 0x07],
            &[0x30, 0x07, 0x02, 0x01, 0x05, 0x02, 0x01, 0x07, 0x00],
        ] {
            assert_eq!(der_signature_to_fixed(bad), None, "{bad:?}");
        }
        let mut too_long = vec![0x30, 0x47, 0x02, 0x21, 0x01];
        too_long.extend([0x01; 32]);
        too_long.extend([0x02, 0x22, 0x01]);
        too_long.extend([0x01; 32]);
        assert_eq!(der_signature_to_fixed(&too_long), None);
    }
}
