//! Store records of privileged sessions and of revoked certificate serials.
//!
//! A [`Session`] is the record of one privileged session through its whole life (`pending`,
//! `active`, then `closed`, `revoked` or `expired`); records are never deleted. While a session
//! is active, a registration entry carrying its id ([`RegistrationEntry::session_id`]) grants
//! its identity: the store creates and deletes that entry in the same atomic write as the state
//! change ([`SessionEntryOp`]), so the change feed tells agents about a session exactly when its
//! state says so.
//!
//! A [`Revocation`] is a serial that must appear on the certificate revocation lists until its
//! certificate expires.
//!
//! [`RegistrationEntry::session_id`]: super::RegistrationEntry::session_id

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sigil_core::{SelectorSet, SpiffeId};

use super::{EntryId, EntryIdError, NewEntry, StoreError};
use crate::audit::NewAuditRecord;
pub(crate) use crate::ca::RevocationReason;

/// The identifier of a session: 32 lowercase hex characters (16 random bytes).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SessionId(String);

/// The state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SessionState {
    /// Waiting for a second admin's approval; grants nothing.
    Pending,
    /// Grants its identity until it ends.
    Active,
    /// Ended by an admin: the task is done.
    Closed,
    /// Ended by an admin because something is wrong; its unexpired serials are on the CRLs.
    Revoked,
    /// Reached its end time (approved or not).
    Expired,
}

/// One X509-SVID issued under a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionSerial {
    /// The certificate's serial, lowercase hex.
    pub(crate) serial: String,
    /// Its NotAfter.
    pub(crate) not_after: SystemTime,
    /// The authority that signed it (its id), so its CRL lists it on revocation.
    pub(crate) authority_id: String,
}

/// One JWT-SVID issued under a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionJwt {
    /// Its `jti` claim, lowercase hex.
    pub(crate) jti: String,
    /// Its `aud` claim.
    pub(crate) audience: Vec<String>,
    /// Its `exp` claim.
    pub(crate) expires_at: SystemTime,
}

/// A credential issued under a session, as recorded on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionCredential {
    /// An X509-SVID.
    X509(SessionSerial),
    /// A JWT-SVID.
    Jwt(SessionJwt),
}

/// The record of a privileged session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Session {
    /// Assigned at open.
    pub(crate) id: SessionId,
    /// The identity granted.
    pub(crate) spiffe_id: SpiffeId,
    /// The agent (or alias) under which the workload runs.
    pub(crate) parent_id: SpiffeId,
    /// What the workload must present.
    pub(crate) selectors: SelectorSet,
    /// The change or incident ticket the session is for.
    pub(crate) ticket: String,
    /// Why it is needed.
    pub(crate) reason: String,
    /// The state.
    pub(crate) state: SessionState,
    /// `uid:N` of the admin who opened it.
    pub(crate) requester: String,
    /// `uid:N` of the admin who approved it.
    pub(crate) approver: Option<String>,
    /// Whether a second admin must approve it before it grants anything.
    pub(crate) approval_required: bool,
    /// When it was opened.
    pub(crate) opened_at: SystemTime,
    /// When it was approved.
    pub(crate) approved_at: Option<SystemTime>,
    /// When it ends at the latest (opened + ttl).
    pub(crate) expires_at: SystemTime,
    /// When it was closed, revoked or expired.
    pub(crate) ended_at: Option<SystemTime>,
    /// `uid:N` (or `server`) of whoever ended it.
    pub(crate) ended_by: Option<String>,
    /// Why it was revoked.
    pub(crate) end_reason: Option<String>,
    /// Lifetime of each SVID issued under it.
    pub(crate) svid_ttl: Duration,
    /// The X509-SVIDs issued under it, in order.
    pub(crate) serials: Vec<SessionSerial>,
    /// The JWT-SVIDs issued under it, in order (absent from records of earlier builds).
    #[serde(default)]
    pub(crate) jwts: Vec<SessionJwt>,
    /// The registration entry carrying it while active (kept after it ends, for the record).
    pub(crate) entry_id: Option<EntryId>,
}

/// What [`Store::update_session`](super::Store::update_session) does to the session's entry in
/// the same atomic write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionEntryOp {
    /// Create the entry (the session becomes active); its id goes to `Session::entry_id`.
    Create(Box<NewEntry>),
    /// Delete the session's entry if it still exists (the session ended).
    Delete,
}

/// A state change of a session, applied atomically by
/// [`Store::update_session`](super::Store::update_session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionUpdate {
    /// The new record (same id).
    pub(crate) session: Session,
    /// The state the stored record must still be in; otherwise
    /// [`StoreError::StateChanged`] and nothing is written.
    pub(crate) expected: SessionState,
    /// What happens to its entry.
    pub(crate) entry: SessionEntryOp,
    /// Serials to put on the CRLs in the same write.
    pub(crate) revocations: Vec<Revocation>,
    /// Audit records appended to the chain in the same write: the change and its record are
    /// durable together or not at all.
    pub(crate) audit: Vec<NewAuditRecord>,
}

/// Which sessions [`Store::list_sessions`](super::Store::list_sessions) returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SessionFilter {
    /// Only sessions in this state.
    pub(crate) state: Option<SessionState>,
    /// Only sessions for exactly this ticket.
    pub(crate) ticket: Option<String>,
}

/// A revoked certificate serial, on the CRLs until `not_after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Revocation {
    /// The serial, lowercase hex.
    pub(crate) serial: String,
    /// The certificate's NotAfter; after it, the serial leaves the CRLs.
    pub(crate) not_after: SystemTime,
    /// The id of the authority that signed it; `None` puts it on every authority's CRL.
    pub(crate) authority_id: Option<String>,
    /// When it was revoked.
    pub(crate) revoked_at: SystemTime,
    /// What it was: `session:<id>` or `agent:<spiffe id>`.
    pub(crate) cause: String,
    /// Why, as the CRL entry says it (absent from records of earlier builds: unspecified).
    #[serde(default)]
    pub(crate) reason: RevocationReason,
}

// === impl SessionId ===

impl SessionId {
    /// A fresh random id.
    pub(crate) fn generate() -> Result<Self, StoreError> {
        Ok(Self(EntryId::generate()?.as_str().to_owned()))
    }

    /// Parses the 32-character lowercase hex form.
    pub(crate) fn parse(input: &str) -> Result<Self, EntryIdError> {
        EntryId::parse(input).map(|id| Self(id.as_str().to_owned()))
    }

    /// The hex form.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SessionId {
    type Err = EntryIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0)
    }
}

impl Serialize for SessionId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

// === impl SessionState ===

impl SessionState {
    /// The lowercase name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Closed => "closed",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }

    /// True for `closed`, `revoked` and `expired`: nothing changes it any more.
    pub(crate) fn is_final(self) -> bool {
        matches!(self, Self::Closed | Self::Revoked | Self::Expired)
    }
}

impl FromStr for SessionState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pending" => Self::Pending,
            "active" => Self::Active,
            "closed" => Self::Closed,
            "revoked" => Self::Revoked,
            "expired" => Self::Expired,
            other => {
                return Err(format!(
                    "unknown session state {other:?}: expected pending, active, closed, revoked or expired"
                ));
            }
        })
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl SessionFilter ===

impl SessionFilter {
    /// True when `session` passes every condition that is set.
    pub(crate) fn matches(&self, session: &Session) -> bool {
        self.state.is_none_or(|s| s == session.state)
            && self.ticket.as_ref().is_none_or(|t| *t == session.ticket)
    }
}
