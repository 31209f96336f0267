//! [`EntryId`], in a module of its own so that only [`EntryId::generate`] and
//! [`EntryId::parse`] can make one: what it holds is always 32 lowercase hex characters.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ENTRY_ID_BYTES, EntryIdError, StoreError};

/// How many leading bytes of a new [`EntryId`] hold its time.
const TIME_BYTES: usize = 6;

/// The identifier of a registration entry: 32 lowercase hex characters (16 bytes).
///
/// A new id is time-ordered, as a UUIDv7 is: its first 6 bytes are the milliseconds since the
/// Unix epoch, big-endian, and the other 10 are random (80 bits). Ids made later sort later, so
/// the entries a server creates go to the end of the sled store's `entries` tree instead of to
/// a random leaf each: with random ids, sled rewrote most of that tree's leaves for every batch
/// of creations (see BENCHMARKS.md, "Time-ordered entry ids"). Ids of earlier builds, 16 random
/// bytes, have the same form and are read as they are. Nothing reads the time back out of an
/// id: an entry's `created_at` is the time of record, and ids of a clock set back are still
/// unique, only out of order.
///
/// Held inline as its ASCII characters: an id is a key of several maps in the entry cache, and
/// copying it costs no allocation. Ordered as its string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EntryId([u8; 2 * ENTRY_ID_BYTES]);

// === impl EntryId ===

impl EntryId {
    /// A fresh id: the time now in milliseconds, then 80 bits from the system's secure random
    /// number generator.
    pub(crate) fn generate() -> Result<Self, StoreError> {
        Self::generate_at(SystemTime::now())
    }

    /// A fresh id made at `now` (a time before the epoch counts as the epoch).
    pub(crate) fn generate_at(now: SystemTime) -> Result<Self, StoreError> {
        let millis = now.duration_since(UNIX_EPOCH).map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        });
        let mut bytes = [0u8; ENTRY_ID_BYTES];
        // The low 48 bits, as a UUIDv7 holds them (they wrap in the year 10889).
        bytes[..TIME_BYTES].copy_from_slice(&millis.to_be_bytes()[8 - TIME_BYTES..]);
        SystemRandom::new()
            .fill(&mut bytes[TIME_BYTES..])
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

    /// The id of these 16 bytes (as [`EntryId::to_bytes`] gives them).
    pub(crate) fn from_bytes(bytes: &[u8; ENTRY_ID_BYTES]) -> Self {
        let mut id = [0u8; 2 * ENTRY_ID_BYTES];
        sigil_core::hex::encode_into(bytes, &mut id);
        Self(id)
    }

    /// The 16 bytes the hex form spells (for records that keep an id in half the room).
    pub(crate) fn to_bytes(&self) -> [u8; ENTRY_ID_BYTES] {
        let mut bytes = [0u8; ENTRY_ID_BYTES];
        // Always lowercase hex: every pair decodes.
        if let Some(decoded) = sigil_core::hex::decode(self.as_str()) {
            bytes.copy_from_slice(&decoded);
        }
        bytes
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_new_id_is_its_time_in_milliseconds_then_random_bits() {
        let at = UNIX_EPOCH + Duration::from_millis(0x0193_a4f2_c8a1);
        let a = EntryId::generate_at(at).unwrap();
        let b = EntryId::generate_at(at).unwrap();
        assert_eq!(&a.as_str()[..12], "0193a4f2c8a1");
        assert_eq!(&b.as_str()[..12], "0193a4f2c8a1");
        // 80 random bits apart.
        assert_ne!(a.as_str()[12..], b.as_str()[12..]);
        assert_eq!(EntryId::parse(a.as_str()).unwrap(), a);
        assert_eq!(EntryId::from_bytes(&a.to_bytes()), a);
        assert_eq!(
            EntryId::parse("00112233445566778899aabbccddeeff")
                .unwrap()
                .to_bytes(),
            [
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );

        // Later sorts later, whatever the random bits: a sled tree keyed by id grows at its end.
        let mut ids: Vec<EntryId> = (0..64u64)
            .map(|n| EntryId::generate_at(at + Duration::from_millis(n)).unwrap())
            .collect();
        let made = ids.clone();
        ids.sort();
        assert_eq!(ids, made);

        // Before the epoch counts as the epoch; past 48 bits of milliseconds, the low 48 bits.
        let early = EntryId::generate_at(UNIX_EPOCH - Duration::from_secs(1)).unwrap();
        assert_eq!(&early.as_str()[..12], "000000000000");
        let late = EntryId::generate_at(UNIX_EPOCH + Duration::from_millis((1 << 48) + 5));
        assert_eq!(&late.unwrap().as_str()[..12], "000000000005");
    }
}
