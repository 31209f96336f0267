//! Keys in a PKCS#11 token (`key_manager = "pkcs11"`): an HSM, a cloud HSM or SoftHSM.
//!
//! Every key the server uses (the X.509 authorities', the JWT keys and the audit key) is an
//! ECDSA P-256 key pair generated in the token: the private key `CKA_TOKEN`, `CKA_PRIVATE`,
//! `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`, so it never leaves it. Both objects carry the key's
//! id as `CKA_LABEL` and `CKA_ID`; the CA journal names keys by that id. Signing hashes with
//! SHA-256 here and has the token sign the digest (`CKM_ECDSA`); the token's raw `r || s` is
//! returned in the ASN.1 DER form X.509 uses.
//!
//! One logged-in read-write session serves every call (PKCS#11 sessions are not to be used by
//! two threads at once): signing is serialized through it. When the token loses the session
//! (the HSM restarted, the connection dropped), the next call logs in again and retries once.
//! Labels are namespaced by the server's `server_id` (`sigil:<server_id>:<key id>`), so
//! servers sharing a token keep their keys apart.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::error::{Error as Pkcs11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::keys::{CaKey, KeyError, KeyManager, check_key_id};

/// DER of the P-256 curve OID (`CKA_EC_PARAMS`).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Why the token cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Pkcs11OpenError {
    /// The module cannot be loaded.
    #[error("pkcs11_module {module}: cannot load it: {reason}")]
    Module {
        /// The path.
        module: String,
        /// Why.
        reason: String,
    },
    /// No token has the label.
    #[error("no PKCS#11 token is labelled {label:?} (tokens: {found})")]
    NoToken {
        /// The configured label.
        label: String,
        /// The labels found.
        found: String,
    },
    /// The PIN is wrong.
    #[error("the PIN in pkcs11_pin_file is not the token's user PIN")]
    WrongPin,
    /// Another failure.
    #[error("PKCS#11: {0}")]
    Token(String),
}

/// Keys in one PKCS#11 token.
pub(crate) struct Pkcs11KeyManager {
    inner: Arc<Inner>,
}

/// The token: the context, the slot, the PIN to log in again with, and the one session.
struct Inner {
    context: Pkcs11,
    slot: Slot,
    token: String,
    pin: AuthPin,
    /// Labels are `sigil:<server_id>:<key id>`: servers sharing a token never see each
    /// other's keys (the audit key's id is the same on every server).
    namespace: String,
    state: Mutex<State>,
}

struct State {
    session: Option<Session>,
    /// Raised at every new session: object handles found in an older one are looked up again.
    generation: u64,
}

impl fmt::Debug for Pkcs11KeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11KeyManager")
            .field("token", &self.inner.token)
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

/// A key in the token: its public point and the private key's handle in the current session.
struct Pkcs11Key {
    id: String,
    label: Vec<u8>,
    public_key: Vec<u8>,
    inner: Arc<Inner>,
    /// `(session generation, handle)`.
    private: Mutex<(u64, ObjectHandle)>,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn token_error(e: &Pkcs11Error) -> KeyError {
    KeyError::Token {
        reason: format!("PKCS#11: {e}"),
    }
}

/// Errors after which a new session (and a new login) may succeed: the HSM restarted, the
/// connection to it dropped, the login was lost.
fn session_lost(e: &Pkcs11Error) -> bool {
    matches!(
        e,
        Pkcs11Error::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn,
            _
        )
    )
}

impl Inner {
    fn login(&self) -> Result<Session, Pkcs11OpenError> {
        let session = self
            .context
            .open_rw_session(self.slot)
            .map_err(|e| Pkcs11OpenError::Token(e.to_string()))?;
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(Pkcs11Error::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid, _)) => {
                Err(Pkcs11OpenError::WrongPin)
            }
            Err(e) => Err(Pkcs11OpenError::Token(e.to_string())),
        }
    }

    /// Runs `f` on the session (opened and logged in when there is none); when the session
    /// was lost, logs in again once and runs `f` again with the new session's generation.
    fn run<T>(
        &self,
        mut f: impl FnMut(&Session, u64) -> Result<T, Pkcs11Error>,
    ) -> Result<T, KeyError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for attempt in 0..2 {
            let session = match state.session.take() {
                Some(session) => session,
                None => {
                    let session = self.login().map_err(|e| KeyError::Token {
                        reason: e.to_string(),
                    })?;
                    state.generation += 1;
                    session
                }
            };
            match f(&session, state.generation) {
                Ok(value) => {
                    state.session = Some(session);
                    return Ok(value);
                }
                Err(e) if attempt == 0 && session_lost(&e) => {
                    tracing::warn!(token = %self.token, error = %e, "PKCS#11 session lost; logging in again");
                    // Dropped: closed if it still can be.
                }
                Err(e) => {
                    state.session = Some(session);
                    return Err(token_error(&e));
                }
            }
        }
        Err(KeyError::Token {
            reason: format!("PKCS#11 token {:?}: the session was lost twice", self.token),
        })
    }

    fn label(&self, id: &str) -> Vec<u8> {
        format!("{}{id}", self.namespace).into_bytes()
    }
}

/// The objects of class `class` labelled `label`.
fn find(
    session: &Session,
    label: &[u8],
    class: ObjectClass,
) -> Result<Vec<ObjectHandle>, Pkcs11Error> {
    session.find_objects(&[Attribute::Class(class), Attribute::Label(label.to_vec())])
}

/// The public point of `public`.
fn ec_point(session: &Session, public: ObjectHandle) -> Result<Option<Vec<u8>>, Pkcs11Error> {
    Ok(session
        .get_attributes(public, &[AttributeType::EcPoint])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(point) => uncompressed_point(&point),
            _ => None,
        }))
}

impl Pkcs11KeyManager {
    /// Loads `module`, finds the one initialised token labelled `label`, logs in with `pin`;
    /// keys are labelled under `server_id`.
    ///
    /// # Errors
    ///
    /// [`Pkcs11OpenError`] naming the cause: the module, the label, the PIN.
    pub(crate) fn open(
        module: &Path,
        label: &str,
        pin: AuthPin,
        server_id: &str,
    ) -> Result<Self, Pkcs11OpenError> {
        let context = Pkcs11::new(module).map_err(|e| Pkcs11OpenError::Module {
            module: module.display().to_string(),
            reason: e.to_string(),
        })?;
        context
            .initialize(CInitializeArgs::OsThreads)
            .map_err(|e| Pkcs11OpenError::Token(e.to_string()))?;
        let slots = context
            .get_slots_with_token()
            .map_err(|e| Pkcs11OpenError::Token(e.to_string()))?;
        let mut found = Vec::new();
        let mut matching = Vec::new();
        for candidate in slots {
            let info = context
                .get_token_info(candidate)
                .map_err(|e| Pkcs11OpenError::Token(e.to_string()))?;
            if !info.token_initialized() {
                continue;
            }
            let name = info.label().trim_end().to_owned();
            if name == label {
                matching.push(candidate);
            }
            found.push(format!("{name:?}"));
        }
        let slot = match matching.as_slice() {
            [slot] => *slot,
            [] => {
                return Err(Pkcs11OpenError::NoToken {
                    label: label.to_owned(),
                    found: if found.is_empty() {
                        "none".to_owned()
                    } else {
                        found.join(", ")
                    },
                });
            }
            several => {
                return Err(Pkcs11OpenError::Token(format!(
                    "{} tokens are labelled {label:?}: give each a label of its own",
                    several.len()
                )));
            }
        };
        let inner = Inner {
            context,
            slot,
            token: label.to_owned(),
            pin,
            namespace: format!("sigil:{server_id}:"),
            state: Mutex::new(State {
                session: None,
                generation: 0,
            }),
        };
        let session = inner.login()?;
        inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .session = Some(session);
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    fn key(
        &self,
        id: &str,
        private: ObjectHandle,
        public_key: Vec<u8>,
        generation: u64,
    ) -> Arc<dyn CaKey> {
        Arc::new(Pkcs11Key {
            id: id.to_owned(),
            label: self.inner.label(id),
            public_key,
            inner: self.inner.clone(),
            private: Mutex::new((generation, private)),
        })
    }
}

impl KeyManager for Pkcs11KeyManager {
    fn generate_key(&self, id: &str) -> Result<Arc<dyn CaKey>, KeyError> {
        check_key_id(id)?;
        let label = self.inner.label(id);
        let made = self.inner.run(|session, generation| {
            if !find(session, &label, ObjectClass::PRIVATE_KEY)?.is_empty() {
                return Ok(None);
            }
            let common = [
                Attribute::Token(true),
                Attribute::Label(label.clone()),
                Attribute::Id(label.clone()),
                Attribute::KeyType(KeyType::EC),
            ];
            let mut public = common.to_vec();
            public.extend([
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(true),
            ]);
            let mut private = common.to_vec();
            private.extend([
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
            ]);
            let (public, private) =
                session.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)?;
            match ec_point(session, public) {
                Ok(Some(point)) => Ok(Some((private, point, generation))),
                // Not a key we can use: nothing is left behind in the token.
                other => {
                    let _ = session.destroy_object(private);
                    let _ = session.destroy_object(public);
                    other.map(|_| None)
                }
            }
        })?;
        match made {
            Some((private, point, generation)) => Ok(self.key(id, private, point, generation)),
            None => Err(KeyError::AlreadyExists { id: id.to_owned() }),
        }
    }

    fn load_key(&self, id: &str) -> Result<Arc<dyn CaKey>, KeyError> {
        check_key_id(id)?;
        let label = self.inner.label(id);
        let found = self.inner.run(|session, generation| {
            Ok((
                find(session, &label, ObjectClass::PRIVATE_KEY)?,
                find(session, &label, ObjectClass::PUBLIC_KEY)?,
                generation,
            ))
        })?;
        let (private, point, generation) = match found {
            (private, public, generation) if private.len() == 1 && public.len() == 1 => {
                let point = self
                    .inner
                    .run(|session, _| ec_point(session, public[0]))?
                    .ok_or_else(|| KeyError::Token {
                        reason: format!(
                            "PKCS#11 key {id}: CKA_EC_POINT is not an uncompressed P-256 point"
                        ),
                    })?;
                (private[0], point, generation)
            }
            (private, public, _) if private.is_empty() || public.is_empty() => {
                return Err(KeyError::NotFound { id: id.to_owned() });
            }
            _ => {
                return Err(KeyError::Token {
                    reason: format!(
                        "PKCS#11 token {:?} holds several keys labelled {}",
                        self.inner.token,
                        String::from_utf8_lossy(&label)
                    ),
                });
            }
        };
        let key = self.key(id, private, point, generation);
        // The two halves must belong together: a stray private key under the label would
        // otherwise only show as signatures that do not verify.
        let probe = b"sigil pkcs11 key check";
        let signature = key.sign(probe)?;
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            key.public_key(),
        )
        .verify(probe, &signature)
        .map_err(|_| KeyError::Token {
            reason: format!("PKCS#11 key {id}: the private key does not match the public key"),
        })?;
        Ok(key)
    }

    fn delete_key(&self, id: &str) -> Result<(), KeyError> {
        check_key_id(id)?;
        let label = self.inner.label(id);
        self.inner.run(|session, _| {
            for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                for object in find(session, &label, class)? {
                    session.destroy_object(object)?;
                }
            }
            Ok(())
        })
    }
}

impl CaKey for Pkcs11Key {
    fn id(&self) -> &str {
        &self.id
    }

    fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        let raw = self.inner.run(|session, generation| {
            let mut cached = self.private.lock().unwrap_or_else(PoisonError::into_inner);
            if cached.0 != generation {
                // A new session: find the key again.
                let handle = find(session, &self.label, ObjectClass::PRIVATE_KEY)?
                    .into_iter()
                    .next()
                    .ok_or(Pkcs11Error::Pkcs11(
                        RvError::KeyHandleInvalid,
                        cryptoki::context::Function::Sign,
                    ))?;
                *cached = (generation, handle);
            }
            session.sign(&Mechanism::Ecdsa, cached.1, digest.as_ref())
        })?;
        fixed_to_der(&raw).ok_or_else(|| KeyError::Token {
            reason: format!(
                "PKCS#11 key {}: a signature of {} bytes, not 64",
                self.id,
                raw.len()
            ),
        })
    }
}

/// The uncompressed point in `CKA_EC_POINT`: a DER OCTET STRING around it (as PKCS#11 says),
/// or the bare point (as some tokens give it).
fn uncompressed_point(value: &[u8]) -> Option<Vec<u8>> {
    match value {
        [0x04, 0x41, point @ ..] if point.len() == 65 && point[0] == 0x04 => Some(point.to_vec()),
        [0x04, ..] if value.len() == 65 => Some(value.to_vec()),
        _ => None,
    }
}

/// `r || s` (32 bytes each) as the DER `SEQUENCE { INTEGER r, INTEGER s }`.
fn fixed_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() != 64 {
        return None;
    }
    let integer = |half: &[u8]| {
        let start = half.iter().position(|b| *b != 0).unwrap_or(half.len() - 1);
        let mut bytes = half[start..].to_vec();
        if bytes[0] & 0x80 != 0 {
            bytes.insert(0, 0);
        }
        let mut out = vec![0x02, u8::try_from(bytes.len()).unwrap_or(0)];
        out.extend(bytes);
        out
    };
    let (r, s) = raw.split_at(32);
    let body = [integer(r), integer(s)].concat();
    let mut out = vec![0x30, u8::try_from(body.len()).ok()?];
    out.extend(body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_signatures_become_der_that_ring_verifies() {
        use ring::signature::{
            ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
            UnparsedPublicKey,
        };
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        for i in 0..64u8 {
            let message = [i; 16];
            let raw = key.sign(&rng, &message).unwrap();
            let der = fixed_to_der(raw.as_ref()).unwrap();
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref())
                .verify(&message, &der)
                .unwrap();
        }
        assert!(fixed_to_der(&[0; 63]).is_none());
        // Leading zeros are dropped, a high bit gets a zero byte.
        let mut raw = [0u8; 64];
        raw[31] = 1;
        raw[32] = 0x80;
        let der = fixed_to_der(&raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x26, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 0x21, 0x00]);
    }

    #[test]
    fn ec_points_are_read_wrapped_or_bare() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend(&point);
        assert_eq!(uncompressed_point(&wrapped), Some(point.clone()));
        assert_eq!(uncompressed_point(&point), Some(point.clone()));
        assert_eq!(uncompressed_point(&point[..33]), None);
    }
}
