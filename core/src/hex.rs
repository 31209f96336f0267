//! Lowercase hexadecimal, the one spelling Sigil uses for serials, hashes, fingerprints and ids.
//!
//! Decoding accepts exactly what [`encode`] writes (lowercase, an even number of digits), so a
//! value has one spelling and comparisons of hex strings are comparisons of bytes.

/// The sixteen digits, lowercase.
pub const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Writes the lowercase hex of `bytes` (as ASCII) into `out`, two digits a byte, as far as the
/// shorter of the two goes: for a fixed-size buffer of twice the input's length.
pub fn encode_into(bytes: &[u8], out: &mut [u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

/// The bytes of lowercase hex; `None` for anything else (uppercase, odd length, other
/// characters).
pub fn decode(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Some((nibble(pair[0])? << 4) | nibble(pair[1])?))
        .collect()
}

/// Lowercase hex of the SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn encodes_lowercase_and_rejects_everything_else() {
        assert_eq!(encode(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(decode("000fa0ff"), Some(vec![0x00, 0x0f, 0xa0, 0xff]));
        let mut buffer = [b'-'; 9];
        encode_into(&[0x00, 0x0f, 0xa0, 0xff], &mut buffer);
        assert_eq!(&buffer, b"000fa0ff-");
        assert_eq!(decode(""), Some(vec![]));
        assert_eq!(decode("ABCD"), None);
        assert_eq!(decode("abc"), None);
        assert_eq!(decode("zz"), None);
        assert_eq!(
            sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    proptest! {
        #[test]
        fn round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(decode(&encode(&bytes)), Some(bytes));
        }
    }
}
