//! Lifetime and rotation arithmetic, as pure functions of `now`.
//!
//! One place decides when credentials start, end and are renewed, for the server (which signs
//! them) and the agent (which renews them) alike. Nothing here reads the clock: every function
//! takes the time it reasons about, so tests can ask about any instant.
//!
//! The rules:
//! - An SVID issued at time T with TTL t is valid from `T - NOT_BEFORE_BACKDATE` (for peers whose
//!   clock runs a little behind) until `min(T + t, caps...)`, where the caps are the signing
//!   authority's NotAfter and any other limit (a privileged session's end).
//! - The lifetime a TTL promises is measured from T, not from NotBefore.
//! - It is renewed halfway through its lifetime from T: at `T + (NotAfter - T) / 2`. Uncapped,
//!   that is `T + t/2`; capped, renewal comes earlier, always before expiry.
//! - It is not renewed when a fresh SVID could not end later than the current one (a cap keeps
//!   NotAfter where it is), so a capped SVID is never re-issued in a loop.
//! - A signing authority of lifetime L prepares its successor at L/2 and hands over at 5L/6, so
//!   the longest SVID TTL it can always honour is L/6 ([`max_svid_ttl`]).

use std::time::{Duration, SystemTime};

/// How far NotBefore is set before the issuing time, to absorb clock skew between machines
/// (SPIRE's `NotBeforeCushion`).
pub const NOT_BEFORE_BACKDATE: Duration = Duration::from_secs(10);

/// Why a validity period cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LifetimeError {
    /// The TTL is zero.
    #[error("ttl must be greater than zero")]
    ZeroTtl,
    /// A cap (the issuer's NotAfter, a session's end) is already at or before the issuing time,
    /// so nothing valid can be issued.
    #[error("cannot issue: a lifetime cap has already passed")]
    CapPassed,
    /// The times do not fit in a `SystemTime`.
    #[error("time out of range")]
    OutOfRange,
}

/// The validity period of an issued credential, and the time it was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    issued_at: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// The phase a signing authority is in at a given time ([`authority_phase`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthorityPhase {
    /// Before its NotBefore: not usable yet.
    NotYetValid,
    /// The first half of its life: signs, no successor needed yet.
    Active,
    /// From L/2: signs, and its successor must be prepared and published in the bundle.
    PrepareNext,
    /// From 5L/6: its successor signs; it stays in the bundle to validate what it signed.
    HandOver,
    /// At or after its NotAfter: to be pruned from the bundle.
    Expired,
}

// === impl Validity ===

impl Validity {
    /// Computes the validity of a credential issued at `now` with `ttl`, capped by every time
    /// in `caps` (NotAfter = min(now + ttl, caps...)); NotBefore is backdated by
    /// [`NOT_BEFORE_BACKDATE`].
    pub fn issue(
        now: SystemTime,
        ttl: Duration,
        caps: &[SystemTime],
    ) -> Result<Self, LifetimeError> {
        if ttl.is_zero() {
            return Err(LifetimeError::ZeroTtl);
        }
        let uncapped = now.checked_add(ttl).ok_or(LifetimeError::OutOfRange)?;
        let not_after = caps.iter().copied().fold(uncapped, SystemTime::min);
        if not_after <= now {
            return Err(LifetimeError::CapPassed);
        }
        let not_before = now
            .checked_sub(NOT_BEFORE_BACKDATE)
            .ok_or(LifetimeError::OutOfRange)?;
        Ok(Self {
            issued_at: now,
            not_before,
            not_after,
        })
    }

    /// Rebuilds the validity of an existing credential from its NotAfter and the time it was
    /// issued (for one issued by Sigil, its NotBefore plus [`NOT_BEFORE_BACKDATE`]).
    pub fn from_parts(issued_at: SystemTime, not_after: SystemTime) -> Self {
        Self {
            issued_at,
            not_before: issued_at
                .checked_sub(NOT_BEFORE_BACKDATE)
                .unwrap_or(issued_at),
            not_after,
        }
    }

    /// The time the credential was issued (T).
    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    /// NotBefore: T minus the backdate.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// NotAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The lifetime from T to NotAfter (what the TTL promised, or less when capped).
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO)
    }

    /// True when `now` falls within `[NotBefore, NotAfter)`.
    pub fn contains(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// When renewal is due: halfway through the lifetime measured from T.
    pub fn renew_at(&self) -> SystemTime {
        self.issued_at + self.lifetime() / 2
    }

    /// Whether the credential should be renewed at `now`, given the TTL and caps a fresh one
    /// would get. True once [`renew_at`](Self::renew_at) has passed, unless a fresh credential
    /// could not end later than this one (then renewing gains nothing and would loop).
    pub fn should_renew(&self, now: SystemTime, ttl: Duration, caps: &[SystemTime]) -> bool {
        if now < self.renew_at() {
            return false;
        }
        match Self::issue(now, ttl, caps) {
            Ok(fresh) => fresh.not_after > self.not_after,
            Err(_) => false,
        }
    }
}

/// The longest SVID TTL a signing authority with lifetime `ca_lifetime` can always honour: one
/// sixth of it, because it signs until 5/6 of its life and then hands over to its successor, and
/// nothing it signs may outlive it. Configuration is checked against this (equality allowed).
pub fn max_svid_ttl(ca_lifetime: Duration) -> Duration {
    ca_lifetime / 6
}

/// When a signing authority valid over `[not_before, not_after)` should have its successor
/// prepared (and published in the bundle): half-way through its life.
pub fn prepare_next_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    not_before + span(not_before, not_after) / 2
}

/// When a signing authority valid over `[not_before, not_after)` should hand signing over to its
/// successor: at five sixths of its life.
pub fn hand_over_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    not_before + span(not_before, not_after) / 6 * 5
}

/// The phase of a signing authority valid over `[not_before, not_after)` at `now`.
pub fn authority_phase(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
) -> AuthorityPhase {
    if now < not_before {
        AuthorityPhase::NotYetValid
    } else if now >= not_after {
        AuthorityPhase::Expired
    } else if now >= hand_over_at(not_before, not_after) {
        AuthorityPhase::HandOver
    } else if now >= prepare_next_at(not_before, not_after) {
        AuthorityPhase::PrepareNext
    } else {
        AuthorityPhase::Active
    }
}

fn span(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + secs(1_800_000_000 + s)
    }

    #[test]
    fn issue_backdates_not_before_and_measures_the_ttl_from_issuance() {
        let v = Validity::issue(t(0), secs(300), &[]).unwrap();
        assert_eq!(v.issued_at(), t(0));
        assert_eq!(v.not_before(), t(0) - secs(10));
        assert_eq!(v.not_after(), t(300));
        assert_eq!(v.lifetime(), secs(300));
        assert!(v.contains(t(0) - secs(5)), "backdate absorbs skew");
        assert!(!v.contains(t(0) - secs(11)));
        assert!(v.contains(t(299)));
        assert!(!v.contains(t(300)), "NotAfter is exclusive here");
    }

    #[test]
    fn not_after_is_the_earliest_cap() {
        let ca_end = t(200);
        let session_end = t(120);
        let v = Validity::issue(t(0), secs(300), &[ca_end]).unwrap();
        assert_eq!(v.not_after(), ca_end);
        let v = Validity::issue(t(0), secs(300), &[ca_end, session_end]).unwrap();
        assert_eq!(v.not_after(), session_end);
        let v = Validity::issue(t(0), secs(60), &[ca_end, session_end]).unwrap();
        assert_eq!(
            v.not_after(),
            t(60),
            "a cap later than the TTL changes nothing"
        );
    }

    #[test]
    fn issue_refuses_a_cap_that_has_passed_and_a_zero_ttl() {
        assert_eq!(
            Validity::issue(t(100), secs(60), &[t(100)]),
            Err(LifetimeError::CapPassed)
        );
        assert_eq!(
            Validity::issue(t(100), secs(60), &[t(50)]),
            Err(LifetimeError::CapPassed)
        );
        assert_eq!(
            Validity::issue(t(0), Duration::ZERO, &[]),
            Err(LifetimeError::ZeroTtl)
        );
    }

    #[test]
    fn renews_at_half_the_ttl() {
        let v = Validity::issue(t(0), secs(300), &[]).unwrap();
        assert_eq!(v.renew_at(), t(150));
        assert!(!v.should_renew(t(149), secs(300), &[]));
        assert!(v.should_renew(t(150), secs(300), &[]));
        assert!(v.should_renew(t(400), secs(300), &[]), "expired: renew");
    }

    #[test]
    fn a_capped_svid_renews_before_it_expires() {
        // Capped to 100 s of a 300 s TTL: renewal at T + 50 s, not at T + 150 s (after expiry).
        let v = Validity::issue(t(0), secs(300), &[t(100)]).unwrap();
        assert_eq!(v.renew_at(), t(50));
        // The cap was the old CA's end; a new CA lifts it, so renewing gains lifetime.
        assert!(v.should_renew(t(50), secs(300), &[t(10_000)]));
    }

    #[test]
    fn never_renews_when_a_fresh_svid_could_not_end_later() {
        // A session ends at t(100); the SVID is already capped there.
        let session_end = t(100);
        let v = Validity::issue(t(0), secs(300), &[session_end]).unwrap();
        for now in [50, 60, 90, 99, 100, 150] {
            assert!(
                !v.should_renew(t(now), secs(300), &[session_end]),
                "renewing at {now} cannot move NotAfter"
            );
        }
    }

    #[test]
    fn from_parts_rebuilds_issuance() {
        let issued = Validity::issue(t(0), secs(600), &[]).unwrap();
        let rebuilt = Validity::from_parts(
            issued.not_before() + NOT_BEFORE_BACKDATE,
            issued.not_after(),
        );
        assert_eq!(rebuilt, issued);
        assert_eq!(rebuilt.renew_at(), t(300));
    }

    #[test]
    fn max_svid_ttl_is_a_sixth_of_the_ca_lifetime() {
        assert_eq!(max_svid_ttl(secs(24 * 3600)), secs(4 * 3600));
        assert_eq!(max_svid_ttl(secs(60)), secs(10));
        assert_eq!(max_svid_ttl(secs(5)), Duration::from_nanos(833_333_333));
    }

    #[test]
    fn authority_rotation_points() {
        let (nb, na) = (t(0), t(600));
        assert_eq!(prepare_next_at(nb, na), t(300));
        assert_eq!(hand_over_at(nb, na), t(500));
        let cases = [
            (t(0) - secs(1), AuthorityPhase::NotYetValid),
            (t(0), AuthorityPhase::Active),
            (t(299), AuthorityPhase::Active),
            (t(300), AuthorityPhase::PrepareNext),
            (t(499), AuthorityPhase::PrepareNext),
            (t(500), AuthorityPhase::HandOver),
            (t(599), AuthorityPhase::HandOver),
            (t(600), AuthorityPhase::Expired),
        ];
        for (now, want) in cases {
            assert_eq!(authority_phase(now, nb, na), want, "{now:?}");
        }
    }

    #[test]
    fn an_svid_of_max_ttl_signed_before_hand_over_never_needs_more_than_the_ca() {
        // Signed at the last instant before hand-over with the largest allowed TTL, the SVID
        // still ends by the CA's NotAfter: the L/6 rule is what makes capping rare.
        let (nb, na) = (t(0), t(600));
        let last = hand_over_at(nb, na) - Duration::from_nanos(1);
        let v = Validity::issue(last, max_svid_ttl(secs(600)), &[na]).unwrap();
        assert_eq!(v.lifetime(), max_svid_ttl(secs(600)));
        assert!(v.not_after() <= na);
    }
}
