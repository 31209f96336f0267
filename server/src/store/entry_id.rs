//! [`EntryId`], in a module of its own so that only [`EntryId::generate`] and
//! [`EntryId::parse`] can make one: what it holds is always 32 lowercase hex characters.

use std::fmt;
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ENTRY_ID_BYTES, EntryIdError, StoreError};

/// The identifier of a registration entry: 32 lowercase hex characters (16 random bytes).
///
/// Held inline as its ASCII characters: an id is a key of several maps in the entry cache, and
/// copying it costs no allocation. Ordered as its string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EntryId([u8; 2 * ENTRY_ID_BYTES]);

// === impl EntryId ===

impl EntryId {
    /// A fresh random id (16 bytes from the system's secure random number generator).
    pub(crate) fn generate() -> Result<Self, StoreError> {
        let mut bytes = [0u8; ENTRY_ID_BYTES];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| StoreError::Random)?;
        let mut id = [0u8; 2 * ENTRY_ID_BYTES];
        sigil_core::hex::encode_into(&bytes, &mut id);
        Ok(Self(id))
    }

    /// Parses the 32-character lowercase hex form.
    pub(crate) fn parse(input: &str) -> Result<Self, EntryIdError> {
        match <[u8; 2 * ENTRY_ID_BYTES]>::try_from(input.as_bytes()) {
            Ok(id) if id.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => Ok(Self(id)),
            _ => Err(EntryIdError {
                input: input.to_owned(),
            }),
        }
    }

    /// The 32-character hex form.
    pub(crate) fn as_str(&self) -> &str {
        // Only `generate` and `parse` make ids: always ASCII hex, so never the empty fallback.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl FromStr for EntryId {
    type Err = EntryIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({})", self.as_str())
    }
}

impl Serialize for EntryId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EntryId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Parses the string where the decoder holds it (no copy of it first).
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = EntryId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an entry id (32 lowercase hex characters)")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<EntryId, E> {
                EntryId::parse(s).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(Visitor)
    }
}
