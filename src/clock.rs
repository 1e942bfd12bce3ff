//! The wall clock and the calendar, in one place on `jiff`: every record time, expiry
//! check and printed date reads the clock and turns Unix times into UTC dates here.

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::tz::Offset;

/// Seconds since the Unix epoch (0 if the clock is before it): token expiry, repository
/// times, the creation time of a file set.
pub fn now_seconds() -> u64 {
    u64::try_from(Timestamp::now().as_second()).unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it), for records that
/// must survive restarts (batches, jobs).
pub fn now_ms() -> u64 {
    u64::try_from(Timestamp::now().as_millisecond()).unwrap_or(0)
}

/// The UTC date and time of a Unix time; a time beyond the calendar's range (the end of
/// year 9999) is its last representable second.
pub fn civil(unix_seconds: u64) -> DateTime {
    let timestamp = i64::try_from(unix_seconds)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::MAX);
    Offset::UTC.to_datetime(timestamp)
}

/// `YYYY-MM-DD` of a Unix time (UTC): token expiry on the slip and in messages.
pub fn date(unix_seconds: u64) -> String {
    let t = civil(unix_seconds);
    format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day())
}

/// RFC 3339 text of a Unix time (UTC), to the second: `2026-11-25T08:30:00Z`.
pub fn rfc3339(unix_seconds: u64) -> String {
    let t = civil(unix_seconds);
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        date(unix_seconds),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_as_before() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(1_796_083_201), "2026-12-01");
        assert_eq!(rfc3339(1_764_059_400), "2025-11-25T08:30:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(date(u64::MAX), "9999-12-30");
        let now = now_seconds();
        assert!(now > 1_700_000_000, "{now}");
        assert!(now_ms() / 1000 >= now, "{}", now_ms());
    }
}
