//! The wall clock and the calendar, in one place on `jiff`: every record time, expiry
//! check and printed date reads the clock and turns Unix times into UTC dates here, and
//! every time shown to a person (a slip's expiry, `cloudpdi token inspect`) is turned
//! into the facility's local time here.
//!
//! Time zones come from the system's time zone database (`/usr/share/zoneinfo`, the
//! Debian package `tzdata`): `facility.time_zone` names one (IANA name, e.g.
//! `Asia/Tokyo`), else the system's zone applies (`TZ`, else `/etc/localtime`).

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::tz::{Offset, TimeZone};

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

/// The instant of a Unix time; a time beyond the calendar's range (the end of year 9999)
/// is its last representable second.
fn timestamp(unix_seconds: u64) -> Timestamp {
    i64::try_from(unix_seconds)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::MAX)
}

/// The UTC date and time of a Unix time; a time beyond the calendar's range (the end of
/// year 9999) is its last representable second.
pub fn civil(unix_seconds: u64) -> DateTime {
    Offset::UTC.to_datetime(timestamp(unix_seconds))
}

/// Why a configured time zone cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClockError {
    /// The name is not in the system's time zone database.
    #[error(
        "unknown time zone {name:?} ({reason}): give an IANA name such as \"Asia/Tokyo\" \
         (a file under /usr/share/zoneinfo; install the tzdata package if that folder is \
         missing), or leave it empty for the system's time zone"
    )]
    UnknownZone {
        /// The name given.
        name: String,
        /// What the time zone database reported.
        reason: String,
    },
}

/// The time zone named `name` (IANA, e.g. `Asia/Tokyo`), or the system's when `name` is
/// empty (`TZ`, else `/etc/localtime`; UTC when neither names a usable zone), so that
/// times printed for people are the facility's wall-clock times.
///
/// # Errors
/// [`ClockError::UnknownZone`] for a name the time zone database does not have.
pub fn time_zone(name: &str) -> Result<TimeZone, ClockError> {
    if name.trim().is_empty() {
        return Ok(TimeZone::try_system().unwrap_or(TimeZone::UTC));
    }
    TimeZone::get(name.trim()).map_err(|e| ClockError::UnknownZone {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

/// A Unix time as the wall-clock time of a zone, to the minute, with the zone's
/// abbreviation (`JST`, `UTC`, `+09`).
struct Local {
    time: DateTime,
    zone: String,
}

impl Local {
    fn of(unix_seconds: u64, zone: &TimeZone) -> Local {
        let instant = timestamp(unix_seconds);
        let info = zone.to_offset_info(instant);
        Local {
            time: info.offset().to_datetime(instant),
            zone: info.abbreviation().to_owned(),
        }
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// A deadline in Japanese, in the zone's wall-clock time: `2026年12月13日 17:37まで`
/// (the zone's abbreviation follows when it is not JST, so a slip printed elsewhere does
/// not mislead).
pub fn until_ja(unix_seconds: u64, zone: &TimeZone) -> String {
    let Local { time: t, zone } = Local::of(unix_seconds, zone);
    let suffix = if zone == "JST" {
        String::new()
    } else {
        format!(" ({zone})")
    };
    format!(
        "{}年{}月{}日 {:02}:{:02}まで{suffix}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute()
    )
}

/// A deadline in English, in the zone's wall-clock time: `until 13 Dec 2026 17:37 (JST)`.
pub fn until_en(unix_seconds: u64, zone: &TimeZone) -> String {
    format!("until {}", local_text(unix_seconds, zone))
}

/// A time for a person, in the zone's wall-clock time: `13 Dec 2026 17:37 (JST)`.
pub fn local_text(unix_seconds: u64, zone: &TimeZone) -> String {
    let Local { time: t, zone } = Local::of(unix_seconds, zone);
    let month = usize::try_from(t.month() - 1)
        .ok()
        .and_then(|m| MONTHS.get(m))
        .copied()
        .unwrap_or("?");
    format!(
        "{} {month} {} {:02}:{:02} ({zone})",
        t.day(),
        t.year(),
        t.hour(),
        t.minute()
    )
}

/// A record time (Unix milliseconds) in the zone's wall-clock time, to the minute, for
/// tables: `2026-11-29 17:37`.
pub fn local_short(unix_ms: u64, zone: &TimeZone) -> String {
    let Local { time: t, .. } = Local::of(unix_ms / 1000, zone);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute()
    )
}

/// How far `then` is from `now` (both Unix milliseconds), for a person: `in 2 min`,
/// `5 s ago`, `3 h ago`, `in 12 days`.
pub fn relative(then: u64, now: u64) -> String {
    let (seconds, future) = if then >= now {
        ((then - now) / 1000, true)
    } else {
        ((now - then) / 1000, false)
    };
    let amount = match seconds {
        0..60 => format!("{seconds} s"),
        60..7200 => format!("{} min", seconds / 60),
        7200..172_800 => format!("{} h", seconds / 3600),
        _ => format!("{} days", seconds / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// What is left until `deadline` at `now` (Unix seconds) for a person: `13 days 4 hours
/// left`, `4 hours 12 minutes left`, `12 minutes left`, `less than a minute left`; `None`
/// from the deadline on (the repository refuses a document at its expiry second), so
/// nothing ever says "0 days 0 hours left" of something that has expired.
pub fn time_left(now: u64, deadline: u64) -> Option<String> {
    let left = deadline.checked_sub(now).filter(|&left| left > 0)?;
    let plural = |n: u64, unit: &str| {
        if n == 1 {
            format!("1 {unit}")
        } else {
            format!("{n} {unit}s")
        }
    };
    let (days, hours, minutes) = (left / 86_400, left % 86_400 / 3_600, left % 3_600 / 60);
    Some(if days > 0 {
        format!("{} {} left", plural(days, "day"), plural(hours, "hour"))
    } else if hours > 0 {
        format!(
            "{} {} left",
            plural(hours, "hour"),
            plural(minutes, "minute")
        )
    } else if minutes > 0 {
        format!("{} left", plural(minutes, "minute"))
    } else {
        "less than a minute left".to_owned()
    })
}

/// `YYYY-MM-DD` of a Unix time (UTC): expiry and receipt dates in messages and in the
/// repository's command-line output.
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

    /// 2026-12-13 08:37:00 UTC.
    const EXPIRY: u64 = 1_797_151_020;

    #[test]
    fn deadlines_are_printed_in_the_zone_with_the_hour() {
        let tokyo = time_zone("Asia/Tokyo").expect("tzdata has Asia/Tokyo");
        assert_eq!(until_ja(EXPIRY, &tokyo), "2026年12月13日 17:37まで");
        assert_eq!(until_en(EXPIRY, &tokyo), "until 13 Dec 2026 17:37 (JST)");
        let utc = time_zone("UTC").expect("UTC");
        assert_eq!(until_ja(EXPIRY, &utc), "2026年12月13日 08:37まで (UTC)");
        assert_eq!(local_text(EXPIRY, &utc), "13 Dec 2026 08:37 (UTC)");
    }

    #[test]
    fn an_unknown_zone_is_refused_with_the_fix() {
        let error = time_zone("Asia/Tokio")
            .expect_err("no such zone")
            .to_string();
        assert!(error.contains("\"Asia/Tokio\""), "{error}");
        assert!(
            error.contains("Asia/Tokyo") && error.contains("tzdata"),
            "{error}"
        );
        assert!(time_zone("").is_ok());
    }

    #[test]
    fn nothing_is_left_at_the_deadline() {
        assert_eq!(time_left(EXPIRY, EXPIRY), None);
        assert_eq!(time_left(EXPIRY + 1, EXPIRY), None);
        assert_eq!(
            time_left(EXPIRY - 30, EXPIRY).as_deref(),
            Some("less than a minute left")
        );
        assert_eq!(
            time_left(EXPIRY - 61, EXPIRY).as_deref(),
            Some("1 minute left")
        );
        assert_eq!(
            time_left(EXPIRY - 3_600 - 120, EXPIRY).as_deref(),
            Some("1 hour 2 minutes left")
        );
        assert_eq!(
            time_left(EXPIRY - 2 * 86_400 - 3_600, EXPIRY).as_deref(),
            Some("2 days 1 hour left")
        );
    }

    #[test]
    fn record_times_read_in_the_zone_and_relative_to_now() {
        let tokyo = time_zone("Asia/Tokyo").expect("zone");
        // 2026-11-29 08:37:00 UTC is 17:37 in Tokyo.
        assert_eq!(local_short(1_795_941_420_000, &tokyo), "2026-11-29 17:37");
        assert_eq!(
            local_short(1_795_941_420_000, &TimeZone::UTC),
            "2026-11-29 08:37"
        );
        let now = 1_795_941_420_000;
        assert_eq!(relative(now + 120_000, now), "in 2 min");
        assert_eq!(relative(now - 5_000, now), "5 s ago");
        assert_eq!(relative(now - 3 * 3_600_000, now), "3 h ago");
        assert_eq!(relative(now + 12 * 86_400_000, now), "in 12 days");
    }
}
