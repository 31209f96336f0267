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
//! two threads at once): signing is serialized through it.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::error::{Error as Pkcs11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
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
    label: String,
    session: Arc<Mutex<Session>>,
    /// Kept alive for the session's sake (finalized on drop).
    _context: Pkcs11,
}

impl fmt::Debug for Pkcs11KeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11KeyManager")
            .field("token", &self.label)
            .finish_non_exhaustive()
    }
}

/// A key in the token: its public point and the private key's handle.
struct Pkcs11Key {
    id: String,
    public_key: Vec<u8>,
    private: ObjectHandle,
    session: Arc<Mutex<Session>>,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn token_error(e: Pkcs11Error) -> KeyError {
    KeyError::Token {
        reason: format!("PKCS#11: {e}"),
    }
}

impl Pkcs11KeyManager {
    /// Loads `module`, finds the token labelled `label` and logs in with `pin`.
    ///
    /// # Errors
    ///
    /// [`Pkcs11OpenError`] naming the cause: the module, the label, the PIN.
    pub(crate) fn open(module: &Path, label: &str, pin: AuthPin) -> Result<Self, Pkcs11OpenError> {
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
        let mut slot = None;
        for candidate in slots {
            let info = context
                .get_token_info(candidate)
                .map_err(|e| Pkcs11OpenError::Token(e.to_string()))?;
            if !info.token_initialized() {
                continue;
            }
            let name = info.label().trim_end().to_owned();
            if name == label && slot.is_none() {
                slot = Some(candidate);
            }
            found.push(format!("{name:?}"));
        }
        let slot = slot.ok_or_else(|| Pkcs11OpenError::NoToken {
            label: label.to_owned(),
            found: if found.is_empty() {
                "none".to_owned()
            } else {
                found.join(", ")
            },
        })?;
        let session = context
            .open_rw_session(slot)
            .map_err(|e| Pkcs11OpenError::Token(e.to_string()))?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(Pkcs11Error::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid, _)) => {
                return Err(Pkcs11OpenError::WrongPin);
            }
            Err(e) => return Err(Pkcs11OpenError::Token(e.to_string())),
        }
        Ok(Self {
            label: label.to_owned(),
            session: Arc::new(Mutex::new(session)),
            _context: context,
        })
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The objects of class `class` labelled `id`.
    fn find(
        session: &Session,
        id: &str,
        class: ObjectClass,
    ) -> Result<Vec<ObjectHandle>, KeyError> {
        session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Label(id.as_bytes().to_vec()),
            ])
            .map_err(token_error)
    }

    fn key(
        &self,
        id: &str,
        private: ObjectHandle,
        public: ObjectHandle,
    ) -> Result<Arc<dyn CaKey>, KeyError> {
        let session = self.session();
        let attributes = session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(token_error)?;
        let point = attributes
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(point) => Some(point),
                _ => None,
            })
            .ok_or_else(|| KeyError::Token {
                reason: format!("PKCS#11 key {id}: no CKA_EC_POINT"),
            })?;
        drop(session);
        Ok(Arc::new(Pkcs11Key {
            id: id.to_owned(),
            public_key: uncompressed_point(&point).ok_or_else(|| KeyError::Token {
                reason: format!(
                    "PKCS#11 key {id}: CKA_EC_POINT is not an uncompressed P-256 point"
                ),
            })?,
            private,
            session: self.session.clone(),
        }))
    }
}

impl KeyManager for Pkcs11KeyManager {
    fn generate_key(&self, id: &str) -> Result<Arc<dyn CaKey>, KeyError> {
        check_key_id(id)?;
        let (public, private) = {
            let session = self.session();
            if !Self::find(&session, id, ObjectClass::PRIVATE_KEY)?.is_empty() {
                return Err(KeyError::AlreadyExists { id: id.to_owned() });
            }
            let common = [
                Attribute::Token(true),
                Attribute::Label(id.as_bytes().to_vec()),
                Attribute::Id(id.as_bytes().to_vec()),
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
            session
                .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
                .map_err(token_error)?
        };
        self.key(id, private, public)
    }

    fn load_key(&self, id: &str) -> Result<Arc<dyn CaKey>, KeyError> {
        check_key_id(id)?;
        let (private, public) = {
            let session = self.session();
            (
                Self::find(&session, id, ObjectClass::PRIVATE_KEY)?,
                Self::find(&session, id, ObjectClass::PUBLIC_KEY)?,
            )
        };
        match (private.as_slice(), public.as_slice()) {
            ([private], [public]) => self.key(id, *private, *public),
            ([], _) | (_, []) => Err(KeyError::NotFound { id: id.to_owned() }),
            _ => Err(KeyError::Token {
                reason: format!(
                    "PKCS#11 token {:?} holds several keys labelled {id}",
                    self.label
                ),
            }),
        }
    }

    fn delete_key(&self, id: &str) -> Result<(), KeyError> {
        check_key_id(id)?;
        let session = self.session();
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            for object in Self::find(&session, id, class)? {
                session.destroy_object(object).map_err(token_error)?;
            }
        }
        Ok(())
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
        let raw = self
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sign(&Mechanism::Ecdsa, self.private, digest.as_ref())
            .map_err(token_error)?;
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
