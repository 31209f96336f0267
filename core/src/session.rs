//! The privileged session a credential was issued under, as the credential itself says it, so
//! that a relying party (Sigil's broker, or anyone) learns from the peer's SVID alone which
//! session and ticket it serves and when that session ends.
//!
//! - **X509-SVIDs** carry a non-critical extension, OID [`SESSION_EXTENSION_OID`]
//!   (`2.25.7383958270214826139`: a fixed 63-bit arc under `2.25` picked for Sigil), whose
//!   value is
//!
//!   ```text
//!   SessionClaims ::= SEQUENCE {
//!       session  UTF8String,       -- the session id, 32 lowercase hex characters
//!       ticket   UTF8String,       -- the ticket, 1 to 128 bytes
//!       end      GeneralizedTime   -- when the session ends, whole seconds, UTC
//!   }
//!   ```
//!
//! - **JWT-SVIDs** carry the claims [`JWT_CLAIM_SESSION`], [`JWT_CLAIM_TICKET`] and
//!   [`JWT_CLAIM_SESSION_EXP`] (seconds since the Unix epoch).
//!
//! Credentials not issued under a session carry neither. The ticket is bounded (TLS 1.2 sends
//! client certificates in the clear, and a CRL-sized ticket helps nobody).
//!
//! **Trust.** Parsing verifies nothing: the claims mean something only in a credential already
//! verified against *your own* trust domain's bundle (an X509-SVID chain, a JWT-SVID signature).
//! A federated trust domain's CA could put the same extension or claims in its credentials.

use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::time::{format_rfc3339, from_unix_seconds, parse_rfc3339, unix_seconds};

/// The last arc of [`SESSION_EXTENSION_OID`]: a random number below 2^63.
pub const SESSION_EXTENSION_ARC: u64 = 7_383_958_270_214_826_139;

/// The OID of the session extension of X509-SVIDs, arc by arc: `2.25.7383958270214826139`.
pub const SESSION_EXTENSION_OID: [u64; 3] = [2, 25, SESSION_EXTENSION_ARC];

/// The JWT claim naming the session id.
pub const JWT_CLAIM_SESSION: &str = "sigil_session";

/// The JWT claim naming the session's ticket.
pub const JWT_CLAIM_TICKET: &str = "sigil_ticket";

/// The JWT claim saying when the session ends (seconds since the Unix epoch).
pub const JWT_CLAIM_SESSION_EXP: &str = "sigil_session_exp";

/// The longest ticket, in bytes.
pub const MAX_TICKET_LEN: usize = 128;

/// The session a credential was issued under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClaims {
    session_id: String,
    ticket: String,
    ends_at: i64,
}

/// Why session claims are malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionClaimsError {
    /// The session id is not 32 lowercase hex characters.
    #[error("session id {0:?} is not 32 lowercase hex characters")]
    SessionId(String),
    /// The ticket is empty or longer than [`MAX_TICKET_LEN`] bytes.
    #[error("the ticket is {0} bytes; it must be 1 to {MAX_TICKET_LEN}")]
    Ticket(usize),
    /// The end is before 1970 or past 9999.
    #[error("the session end is out of range")]
    End,
    /// The encoding is not the one documented in [`crate::session`].
    #[error("malformed session claims: {0}")]
    Malformed(&'static str),
    /// The certificate could not be parsed.
    #[error("the certificate cannot be parsed")]
    Certificate,
}

// === impl SessionClaims ===

impl SessionClaims {
    /// Claims for session `session_id`, opened for `ticket`, ending at `ends_at` (sub-second
    /// parts are dropped).
    ///
    /// # Errors
    ///
    /// [`SessionClaimsError`] naming the field that breaks its rule.
    pub fn new(
        session_id: &str,
        ticket: &str,
        ends_at: SystemTime,
    ) -> Result<Self, SessionClaimsError> {
        Self::checked(
            session_id.to_owned(),
            ticket.to_owned(),
            unix_seconds(ends_at),
        )
    }

    fn checked(
        session_id: String,
        ticket: String,
        ends_at: i64,
    ) -> Result<Self, SessionClaimsError> {
        let hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
        if session_id.len() != 32 || !session_id.bytes().all(hex) {
            return Err(SessionClaimsError::SessionId(session_id));
        }
        if ticket.is_empty() || ticket.len() > MAX_TICKET_LEN {
            return Err(SessionClaimsError::Ticket(ticket.len()));
        }
        // GeneralizedTime holds four-digit years.
        if !(0..=253_402_300_799).contains(&ends_at) {
            return Err(SessionClaimsError::End);
        }
        Ok(Self {
            session_id,
            ticket,
            ends_at,
        })
    }

    /// The session id.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The ticket the session was opened for.
    pub fn ticket(&self) -> &str {
        &self.ticket
    }

    /// When the session ends.
    pub fn ends_at(&self) -> SystemTime {
        from_unix_seconds(self.ends_at).unwrap_or(std::time::UNIX_EPOCH)
    }

    /// The DER value of the X.509 extension.
    pub fn extension_value(&self) -> Vec<u8> {
        let time: String = format_rfc3339(self.ends_at)
            .chars()
            .filter(|c| !matches!(c, '-' | ':' | 'T'))
            .collect();
        let mut body = Vec::new();
        der_put(&mut body, 0x0c, self.session_id.as_bytes());
        der_put(&mut body, 0x0c, self.ticket.as_bytes());
        der_put(&mut body, 0x18, time.as_bytes());
        let mut out = Vec::with_capacity(body.len() + 4);
        der_put(&mut out, 0x30, &body);
        out
    }

    /// The claims in the DER value of the X.509 extension.
    ///
    /// # Errors
    ///
    /// [`SessionClaimsError::Malformed`] for anything but the documented encoding, and the
    /// field rules of [`SessionClaims::new`].
    pub fn from_extension_value(der: &[u8]) -> Result<Self, SessionClaimsError> {
        let (body, rest) = der_take(der, 0x30)?;
        if !rest.is_empty() {
            return Err(SessionClaimsError::Malformed("bytes after the sequence"));
        }
        let (session, body) = der_take(body, 0x0c)?;
        let (ticket, body) = der_take(body, 0x0c)?;
        let (time, body) = der_take(body, 0x18)?;
        if !body.is_empty() {
            return Err(SessionClaimsError::Malformed(
                "extra fields in the sequence",
            ));
        }
        let text = |bytes: &[u8]| {
            std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|_| SessionClaimsError::Malformed("a string is not UTF-8"))
        };
        // YYYYMMDDHHMMSSZ, as DER requires (no fraction, UTC), checked byte by byte before any
        // slicing; seconds up to 59, so that each time has one encoding.
        let well_formed = time.len() == 15
            && time[..14].iter().all(u8::is_ascii_digit)
            && time[14] == b'Z'
            && &time[12..14] <= b"59".as_slice();
        let t = std::str::from_utf8(time)
            .ok()
            .filter(|_| well_formed)
            .ok_or(SessionClaimsError::Malformed(
                "the end is not YYYYMMDDHHMMSSZ",
            ))?;
        let rfc3339 = format!(
            "{}-{}-{}T{}:{}:{}Z",
            &t[0..4],
            &t[4..6],
            &t[6..8],
            &t[8..10],
            &t[10..12],
            &t[12..14]
        );
        let ends_at = parse_rfc3339(&rfc3339)
            .map_err(|_| SessionClaimsError::Malformed("the end is not YYYYMMDDHHMMSSZ"))?;
        Self::checked(text(session)?, text(ticket)?, ends_at)
    }

    /// The claims of a DER certificate: `None` when it has no session extension. Verify the
    /// certificate against your trust domain's bundle first (see the module docs).
    ///
    /// # Errors
    ///
    /// [`SessionClaimsError::Certificate`] when it does not parse; the errors of
    /// [`SessionClaims::from_extension_value`].
    pub fn from_certificate(cert_der: &[u8]) -> Result<Option<Self>, SessionClaimsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|_| SessionClaimsError::Certificate)?;
        let oid = x509_parser::oid_registry::Oid::from(&SESSION_EXTENSION_OID)
            .map_err(|_| SessionClaimsError::Malformed("the session extension OID"))?;
        let mut found = cert.extensions().iter().filter(|e| e.oid == oid);
        match (found.next(), found.next()) {
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(SessionClaimsError::Malformed(
                "the session extension appears twice",
            )),
            (Some(ext), None) => Self::from_extension_value(ext.value).map(Some),
        }
    }

    /// The JWT claims.
    pub fn jwt_claims(&self) -> Map<String, Value> {
        let mut claims = Map::new();
        claims.insert(JWT_CLAIM_SESSION.to_owned(), self.session_id.clone().into());
        claims.insert(JWT_CLAIM_TICKET.to_owned(), self.ticket.clone().into());
        claims.insert(JWT_CLAIM_SESSION_EXP.to_owned(), self.ends_at.into());
        claims
    }

    /// The claims of a JWT-SVID's claim set: `None` when it has none of the three.
    ///
    /// # Errors
    ///
    /// [`SessionClaimsError::Malformed`] when only some are present or one has the wrong type;
    /// the field rules of [`SessionClaims::new`].
    pub fn from_jwt_claims(
        claims: &Map<String, Value>,
    ) -> Result<Option<Self>, SessionClaimsError> {
        let session = claims.get(JWT_CLAIM_SESSION);
        let ticket = claims.get(JWT_CLAIM_TICKET);
        let end = claims.get(JWT_CLAIM_SESSION_EXP);
        match (session, ticket, end) {
            (None, None, None) => Ok(None),
            (Some(Value::String(s)), Some(Value::String(t)), Some(Value::Number(e))) => {
                let end = e.as_i64().ok_or(SessionClaimsError::Malformed(
                    "sigil_session_exp is not an integer",
                ))?;
                Self::checked(s.clone(), t.clone(), end).map(Some)
            }
            _ => Err(SessionClaimsError::Malformed(
                "sigil_session, sigil_ticket and sigil_session_exp go together, as two strings and an integer",
            )),
        }
    }
}

/// Appends a DER TLV with a definite length.
fn der_put(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    match (u8::try_from(value.len()), u16::try_from(value.len())) {
        (Ok(short), _) if short < 0x80 => out.push(short),
        (Ok(one), _) => out.extend_from_slice(&[0x81, one]),
        (_, Ok(two)) => {
            out.push(0x82);
            out.extend_from_slice(&two.to_be_bytes());
        }
        // Claims are bounded far below 64 KiB (an id, 128 bytes of ticket, a time).
        _ => out.extend_from_slice(&[0x82, 0xff, 0xff]),
    }
    out.extend_from_slice(value);
}

/// Takes one DER TLV of `tag` from the front of `input`: its value and the rest.
fn der_take(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), SessionClaimsError> {
    let malformed =
        SessionClaimsError::Malformed("a field is missing, of the wrong type or truncated");
    let (&got, rest) = input.split_first().ok_or(malformed.clone())?;
    if got != tag {
        return Err(malformed);
    }
    let (&first, rest) = rest.split_first().ok_or(malformed.clone())?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 2 || rest.len() < n {
            return Err(malformed);
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        // DER: the shortest form.
        if len < 0x80 || (n == 2 && len < 0x100) {
            return Err(SessionClaimsError::Malformed(
                "a length is not in its shortest form",
            ));
        }
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(malformed);
    }
    Ok(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    const ID: &str = "6a0f4c1d2e3b4a5968778695a4b3c2d1";

    fn claims() -> SessionClaims {
        SessionClaims::new(
            ID,
            "CHG-123",
            UNIX_EPOCH + Duration::from_secs(1_893_456_000),
        )
        .unwrap()
    }

    #[test]
    fn the_extension_value_round_trips_and_is_the_documented_der() {
        let c = claims();
        let der = c.extension_value();
        // SEQUENCE { UTF8String id, UTF8String ticket, GeneralizedTime 20300101000000Z }
        let mut expected = vec![0x30, 2 + 32 + 2 + 7 + 2 + 15, 0x0c, 32];
        expected.extend_from_slice(ID.as_bytes());
        expected.extend_from_slice(&[0x0c, 7]);
        expected.extend_from_slice(b"CHG-123");
        expected.extend_from_slice(&[0x18, 15]);
        expected.extend_from_slice(b"20300101000000Z");
        assert_eq!(der, expected);
        assert_eq!(SessionClaims::from_extension_value(&der).unwrap(), c);
        // A 128-byte ticket needs the long length form and still round-trips.
        let long = SessionClaims::new(ID, &"t".repeat(128), c.ends_at()).unwrap();
        assert_eq!(
            SessionClaims::from_extension_value(&long.extension_value()).unwrap(),
            long
        );
    }

    #[test]
    fn field_rules_hold_both_ways() {
        let end = UNIX_EPOCH + Duration::from_secs(10);
        assert!(SessionClaims::new("ABC", "t", end).is_err());
        assert!(SessionClaims::new(&ID.to_uppercase(), "t", end).is_err());
        assert!(SessionClaims::new(ID, "", end).is_err());
        assert_eq!(
            SessionClaims::new(ID, &"t".repeat(129), end),
            Err(SessionClaimsError::Ticket(129))
        );
        // Every truncation and trailing byte is an error, never a panic.
        let der = claims().extension_value();
        for cut in 0..der.len() {
            assert!(
                SessionClaims::from_extension_value(&der[..cut]).is_err(),
                "{cut}"
            );
        }
        let mut longer = der.clone();
        longer.push(0);
        assert!(SessionClaims::from_extension_value(&longer).is_err());
        // A non-shortest length form.
        let mut padded = vec![0x30, 0x81, der[1]];
        padded.extend_from_slice(&der[2..]);
        assert!(SessionClaims::from_extension_value(&padded).is_err());
        // A time of the right length whose bytes are not digits (a multi-byte character where
        // a digit should be), a leap second, a misplaced Z: errors, not panics or a second
        // encoding of one time.
        for time in ["203\u{e9}101000000Z", "20300101235960Z", "2030010100000Z0"] {
            let mut body = Vec::new();
            der_put(&mut body, 0x0c, ID.as_bytes());
            der_put(&mut body, 0x0c, b"t");
            der_put(&mut body, 0x18, time.as_bytes());
            let mut bad = Vec::new();
            der_put(&mut bad, 0x30, &body);
            assert!(SessionClaims::from_extension_value(&bad).is_err(), "{time}");
        }
    }

    #[test]
    fn jwt_claims_round_trip_and_must_come_together() {
        let c = claims();
        let map = c.jwt_claims();
        assert_eq!(map[JWT_CLAIM_SESSION], ID);
        assert_eq!(map[JWT_CLAIM_TICKET], "CHG-123");
        assert_eq!(map[JWT_CLAIM_SESSION_EXP], 1_893_456_000);
        assert_eq!(SessionClaims::from_jwt_claims(&map).unwrap(), Some(c));
        assert_eq!(SessionClaims::from_jwt_claims(&Map::new()).unwrap(), None);
        let mut partial = map.clone();
        partial.remove(JWT_CLAIM_TICKET);
        assert!(SessionClaims::from_jwt_claims(&partial).is_err());
        let mut wrong = map;
        wrong.insert(JWT_CLAIM_SESSION_EXP.to_owned(), "soon".into());
        assert!(SessionClaims::from_jwt_claims(&wrong).is_err());
    }
}
