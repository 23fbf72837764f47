//! Parsers for command-line values: money, durations, days and instants.

use chrono::{DateTime, NaiveDate, Utc};

/// Parses a USD amount into integer micro-USD without going through floats:
/// `12`, `0.5`, `19.999999`. More than six decimals is refused, not rounded.
pub fn usd_to_micros(text: &str) -> Result<u64, String> {
    let invalid = || format!("invalid USD amount {text:?} (expected e.g. 25 or 0.50)");
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(invalid());
    }
    if fraction.len() > 6 {
        return Err(format!(
            "{text:?} has more than 6 decimals (the unit is one micro-USD)"
        ));
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| invalid())?
    };
    let fraction: u64 = format!("{fraction:0<6}").parse().map_err(|_| invalid())?;
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses `30d`, `12h`, `90m`, `45s` or `2w`.
pub fn duration(text: &str) -> Result<chrono::Duration, String> {
    let invalid = || format!("invalid duration {text:?} (expected e.g. 30d, 12h, 90m, 45s, 2w)");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(invalid)?;
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(invalid()),
    };
    if number == 0 {
        return Err(format!("duration {text:?} must be positive"));
    }
    number
        .checked_mul(seconds)
        .filter(|seconds| *seconds <= MAX_DURATION_SECS)
        .and_then(chrono::Duration::try_seconds)
        .ok_or_else(|| format!("duration {text:?} is too long (at most 36500d)"))
}

/// The longest duration [`duration`] accepts: 100 years of days, so that now
/// plus it is always a date.
const MAX_DURATION_SECS: i64 = 36_500 * 86_400;

/// Parses a UTC day, `YYYY-MM-DD`.
pub fn day(text: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| format!("invalid day {text:?} (expected YYYY-MM-DD)"))
}

/// Parses an RFC 3339 time, or a day meaning its start (00:00 UTC).
pub fn instant(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    day(text)
        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc())
        .map_err(|_| format!("invalid time {text:?} (expected RFC 3339 or YYYY-MM-DD)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_is_parsed_exactly() {
        assert_eq!(usd_to_micros("12"), Ok(12_000_000));
        assert_eq!(usd_to_micros("0.5"), Ok(500_000));
        assert_eq!(usd_to_micros(".25"), Ok(250_000));
        assert_eq!(usd_to_micros("19.999999"), Ok(19_999_999));
        assert_eq!(usd_to_micros("0.1"), Ok(100_000));
        for bad in [
            "",
            ".",
            "-1",
            "1e3",
            "1.2.3",
            "abc",
            "0.0000001",
            "99999999999999999",
        ] {
            assert!(usd_to_micros(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(duration("30d"), Ok(chrono::Duration::days(30)));
        assert_eq!(duration("90m"), Ok(chrono::Duration::minutes(90)));
        assert_eq!(duration("2w"), Ok(chrono::Duration::weeks(2)));
        assert_eq!(duration("36500d"), Ok(chrono::Duration::days(36_500)));
        for bad in [
            "",
            "d",
            "30",
            "30y",
            "0d",
            "-1d",
            "36501d",
            "100000000d",
            "99999999999999999w",
        ] {
            assert!(duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn instants() {
        assert_eq!(
            instant("2026-01-02").unwrap().to_rfc3339(),
            "2026-01-02T00:00:00+00:00"
        );
        assert_eq!(
            instant("2026-01-02T03:04:05+01:00").unwrap().to_rfc3339(),
            "2026-01-02T02:04:05+00:00"
        );
        assert!(instant("yesterday").is_err());
    }
}
