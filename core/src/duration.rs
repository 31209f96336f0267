//! Durations as operators write them: `90s`, `5m`, `1h`, `7d`, or combined, `1h30m`.
//!
//! Every config key and command-line flag that takes a duration uses this format, and every
//! duration Sigil prints is written in it, in the largest units that are exact (`300s` prints as
//! `5m`, `5400s` as `1h30m`).

use std::fmt;
use std::time::Duration;

/// Why a string is not a valid duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// The input is empty.
    #[error("duration cannot be empty (write it like 90s, 5m or 1h)")]
    Empty,
    /// A number is missing its unit, or a unit its number, or the unit is unknown.
    #[error(
        "invalid duration {input:?}: write a number and a unit (ms, s, m, h, d), like 90s, 5m or 1h30m"
    )]
    Invalid {
        /// The input that was rejected.
        input: String,
    },
    /// The duration does not fit in 64-bit seconds.
    #[error("duration {input:?} is too large")]
    Overflow {
        /// The input that was rejected.
        input: String,
    },
}

/// Parses `90s`, `5m`, `1h`, `2d`, `250ms`, or a sequence such as `1h30m`. Zero (`0s`) is
/// allowed here; callers that need a positive duration check for it.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    if input.is_empty() {
        return Err(DurationError::Empty);
    }
    let invalid = || DurationError::Invalid {
        input: input.to_owned(),
    };
    let overflow = || DurationError::Overflow {
        input: input.to_owned(),
    };
    let mut total = Duration::ZERO;
    let mut rest = input;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| overflow())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.checked_mul(60).ok_or_else(overflow)?),
            "h" => Duration::from_secs(number.checked_mul(3600).ok_or_else(overflow)?),
            "d" => Duration::from_secs(number.checked_mul(86_400).ok_or_else(overflow)?),
            _ => return Err(invalid()),
        };
        total = total.checked_add(part).ok_or_else(overflow)?;
    }
    Ok(total)
}

/// Formats a duration in the format [`parse_duration`] reads, in the largest exact units:
/// `5m`, `1h30m`, `90s` stays `1m30s`, `1500ms` is `1s500ms`, zero is `0s`.
pub fn format_duration(duration: Duration) -> String {
    HumanDuration(duration).to_string()
}

/// A [`Duration`] that displays as `5m`, `1h30m` (see [`format_duration`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut secs = self.0.as_secs();
        let millis = self.0.subsec_millis();
        if secs == 0 && millis == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
            if secs >= size {
                write!(f, "{}{unit}", secs / size)?;
                secs %= size;
            }
        }
        if millis > 0 {
            write!(f, "{millis}ms")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_durations() {
        let cases: &[(&str, u64)] = &[
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("24h", 86_400),
            ("7d", 604_800),
            ("1h30m", 5400),
            ("1m30s", 90),
            ("0s", 0),
        ];
        for (input, secs) in cases {
            assert_eq!(
                parse_duration(input),
                Ok(Duration::from_secs(*secs)),
                "{input}"
            );
        }
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for input in [
            "5", "m", "5x", "5 m", "-5m", "1.5h", "5M", "h1", "1h 30m", "5mm",
        ] {
            assert!(
                matches!(parse_duration(input), Err(DurationError::Invalid { .. })),
                "{input}"
            );
        }
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("99999999999999999999s"),
            Err(DurationError::Overflow { .. })
        ));
        assert!(matches!(
            parse_duration("999999999999999999d"),
            Err(DurationError::Overflow { .. })
        ));
    }

    #[test]
    fn formats_in_the_largest_exact_units_and_round_trips() {
        let cases: &[(Duration, &str)] = &[
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(5400), "1h30m"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(86_400), "1d"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_millis(1500), "1s500ms"),
            (Duration::ZERO, "0s"),
        ];
        for (duration, text) in cases {
            assert_eq!(format_duration(*duration), *text);
            assert_eq!(parse_duration(text), Ok(*duration));
        }
    }
}
