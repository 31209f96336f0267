//! Times as Sigil's command lines show and read them: RFC 3339 in UTC
//! (`2025-01-31T12:00:00Z`), as seconds since the Unix epoch.
//!
//! Hand-written (days-from-civil arithmetic) to keep a date crate out of the tree.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::HumanDuration;

/// A string that is not an RFC 3339 date-time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid time {input:?}: write an RFC 3339 date-time such as 2025-01-31T12:00:00Z")]
pub struct TimeError {
    /// The rejected input.
    pub input: String,
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    unix_seconds(SystemTime::now())
}

/// Whole seconds since the Unix epoch, as the protos carry times: 0 for a time before the
/// epoch, `i64::MAX` past the end of `i64`.
pub fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The time `secs` seconds after the Unix epoch; `None` for a negative value or one past what
/// [`SystemTime`] holds.
pub fn from_unix_seconds(secs: i64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(std::time::Duration::from_secs(u64::try_from(secs).ok()?))
}

/// `2025-01-31T12:00:00Z` for seconds since the Unix epoch.
pub fn format_rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// `2025-01-31T12:00:00.123456789Z` for seconds since the Unix epoch and the nanoseconds
/// within that second (clamped to 999,999,999): always nine fractional digits, so that two such
/// strings of years 1970 to 9999 sort as the times they name.
pub fn format_rfc3339_nanos(unix: i64, nanos: u32) -> String {
    let whole = format_rfc3339(unix);
    let date_time = whole.strip_suffix('Z').unwrap_or(&whole);
    format!("{date_time}.{:09}Z", nanos.min(999_999_999))
}

/// The time and how far it is from now: `2025-01-31T12:00:00Z (in 5m)`, `... (3h ago)`. The
/// distance is rounded down to minutes past an hour and to hours past a day.
pub fn format_with_distance(unix: i64, now: i64) -> String {
    let distance = |secs: i64| {
        let secs = secs.unsigned_abs();
        let rounded = match secs {
            s if s >= 86_400 => s - s % 3600,
            s if s >= 3600 => s - s % 60,
            s => s,
        };
        HumanDuration(std::time::Duration::from_secs(rounded))
    };
    let at = format_rfc3339(unix);
    if unix >= now {
        format!("{at} (in {})", distance(unix - now))
    } else {
        format!("{at} ({} ago)", distance(now - unix))
    }
}

/// Parses an RFC 3339 date-time (`2025-01-31T12:00:00Z`, `2025-01-31T14:00:00+02:00`,
/// fractional seconds allowed and dropped) into seconds since the Unix epoch.
pub fn parse_rfc3339(input: &str) -> Result<i64, TimeError> {
    let bad = || TimeError {
        input: input.to_owned(),
    };
    let b = input.as_bytes();
    if b.len() < 20 {
        return Err(bad());
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64, TimeError> {
        let part = input.get(range).ok_or_else(bad)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse::<i64>().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let separators_ok = b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[16] == b':';
    if !separators_ok {
        return Err(bad());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &input[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':' =>
        {
            let hours = num_in(rest, 1..3).ok_or_else(bad)?;
            let minutes = num_in(rest, 4..6).ok_or_else(bad)?;
            if hours > 23 || minutes > 59 {
                return Err(bad());
            }
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (hours * 3600 + minutes * 60)
        }
        _ => return Err(bad()),
    };
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    // Second 60 is a leap second; it is read as the next second's start.
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    let days = days_from_civil(year, month, day);
    Ok(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

fn num_in(s: &str, range: std::ops::Range<usize>) -> Option<i64> {
    let part = s.get(range)?;
    if part.bytes().all(|c| c.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_seconds_clamp_and_round_trip() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_738_324_800_900);
        assert_eq!(unix_seconds(t), 1_738_324_800);
        assert_eq!(
            unix_seconds(UNIX_EPOCH - std::time::Duration::from_secs(5)),
            0
        );
        assert_eq!(
            from_unix_seconds(1_738_324_800),
            Some(UNIX_EPOCH + std::time::Duration::from_secs(1_738_324_800))
        );
        assert_eq!(from_unix_seconds(-1), None);
        assert_eq!(from_unix_seconds(0), Some(UNIX_EPOCH));
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(1_738_324_800), "2025-01-31T12:00:00Z");
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn nanosecond_times_have_nine_digits_and_sort_as_times() {
        assert_eq!(
            format_rfc3339_nanos(1_738_324_800, 5),
            "2025-01-31T12:00:00.000000005Z"
        );
        assert_eq!(
            format_rfc3339_nanos(0, 2_000_000_000),
            "1970-01-01T00:00:00.999999999Z"
        );
        let times = [(5, 10), (5, 999_999_999), (6, 0), (4_102_444_799, 1)];
        for pair in times.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(format_rfc3339_nanos(a.0, a.1) < format_rfc3339_nanos(b.0, b.1));
        }
        assert_eq!(
            parse_rfc3339(&format_rfc3339_nanos(1_738_324_800, 123)),
            Ok(1_738_324_800)
        );
    }

    #[test]
    fn parses_what_it_formats_and_offsets() {
        for t in [0, 951_782_400, 1_738_324_800, 4_102_444_799, 1_709_164_800] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Ok(t));
        }
        assert_eq!(
            parse_rfc3339("2025-01-31T14:00:00+02:00"),
            Ok(1_738_324_800)
        );
        assert_eq!(
            parse_rfc3339("2025-01-31t12:00:00.123456z"),
            Ok(1_738_324_800)
        );
        assert_eq!(
            parse_rfc3339("2025-01-31T07:30:00-04:30"),
            Ok(1_738_324_800)
        );
    }

    #[test]
    fn refuses_malformed_times() {
        for bad in [
            "",
            "2025-01-31",
            "2025-01-31T12:00:00",
            "2025-02-30T12:00:00Z",
            "2023-02-29T12:00:00Z",
            "2025-13-01T12:00:00Z",
            "2025-01-31T24:00:00Z",
            "2025-01-31T12:00:00+2:00",
            "2025-01-31T12:00:00.Z",
            "+025-01-31T12:00:00Z",
            "tomorrow at noon please",
        ] {
            let error = parse_rfc3339(bad).unwrap_err();
            assert!(error.to_string().contains("RFC 3339"), "{bad}: {error}");
        }
    }

    #[test]
    fn distances_read_naturally() {
        assert_eq!(format_with_distance(300, 0), "1970-01-01T00:05:00Z (in 5m)");
        assert_eq!(
            format_with_distance(0, 5400),
            "1970-01-01T00:00:00Z (1h30m ago)"
        );
    }
}
