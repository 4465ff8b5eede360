//! Timestamps: parsing RFC 3339 / epoch milliseconds, formatting RFC 3339, durations.
//!
//! All times inside microseg are `i64` milliseconds since the Unix epoch (UTC). This module owns
//! the conversions at the edges (input decoding, output formatting, config durations) so the
//! hot path never touches a calendar library.

/// Milliseconds in one day.
pub const DAY_MS: i64 = 86_400_000;
/// Milliseconds in one hour.
pub const HOUR_MS: i64 = 3_600_000;

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    match u32::try_from(z + 719_468) {
        // From 0000-03-01 on (every time this service writes): the same arithmetic on
        // unsigned 32-bit values, whose divisions by constants are cheaper.
        Ok(z) => {
            let era = z / 146_097;
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let y = yoe + era * 400;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let d = doy - (153 * mp + 2) / 5 + 1;
            let m = if mp < 10 { mp + 3 } else { mp - 9 };
            ((y + (m <= 2) as u32) as i64, m, d)
        }
        Err(_) => civil_from_days_signed(z),
    }
}

/// [`civil_from_days`] for any day (the algorithm of Howard Hinnant's `civil_from_days`).
fn civil_from_days_signed(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let s = b.get(at..at + n)?;
    let mut v = 0u32;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u32;
    }
    Some(v)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses an RFC 3339 timestamp (`2026-11-22T10:00:00Z`, `2026-11-22T10:00:00.123+01:00`,
/// lower-case `t`/`z` or a space separator accepted) into epoch milliseconds.
/// Fractions beyond milliseconds are truncated.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let y = digits(b, 0, 4)? as i64;
    let mo = digits(b, 5, 2)?;
    let d = digits(b, 8, 2)?;
    let h = digits(b, 11, 2)?;
    let mi = digits(b, 14, 2)?;
    let sec = digits(b, 17, 2)?;
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if !(1..=12).contains(&mo)
        || d == 0
        || d > days_in_month(y, mo)
        || h > 23
        || mi > 59
        || sec > 60
    {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                ms = ms * 10 + (b[i] - b'0') as i64;
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..3 {
            ms *= 10;
        }
    }
    let offset_min: i64 = match b.get(i) {
        // No offset: read as UTC (common in exports; documented in the README).
        None => 0,
        Some(c) => match c {
            b'Z' | b'z' if i + 1 == b.len() => 0,
            c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
                let oh = digits(b, i + 1, 2)? as i64;
                let om = digits(b, i + 4, 2)? as i64;
                if oh > 23 || om > 59 {
                    return None;
                }
                let off = oh * 60 + om;
                if *c == b'-' {
                    -off
                } else {
                    off
                }
            }
            _ => return None,
        },
    };
    let days = days_from_civil(y, mo, d);
    let secs =
        days * 86_400 + h as i64 * 3600 + mi as i64 * 60 + sec.min(59) as i64 - offset_min * 60;
    Some(secs * 1000 + ms)
}

/// Formats epoch milliseconds as RFC 3339 UTC, with milliseconds only when non-zero.
pub fn format_rfc3339(ms: i64) -> String {
    let mut out = Vec::with_capacity(24);
    write_rfc3339(&mut out, ms);
    // Only ASCII digits and punctuation were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the RFC 3339 form of `ms` to `out` (the change serializer's buffer).
pub fn write_rfc3339(out: &mut Vec<u8>, ms: i64) {
    let secs = ms.div_euclid(1000);
    let frac = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (h, min, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
    if !(0..=9999).contains(&y) {
        // Outside four-digit years: the general (slower) formatting.
        use std::io::Write;
        let _ = write!(out, "{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}");
        if frac != 0 {
            let _ = write!(out, ".{frac:03}");
        }
        out.push(b'Z');
        return;
    }
    // Written into one array and appended once: a push per piece cost a capacity check and a
    // small copy each; two digits at a time from a table (BENCHMARKS.md, fourteenth session).
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut two = |at: usize, v: u32| {
        let i = 2 * (v % 100) as usize;
        b[at..at + 2].copy_from_slice(&PAIRS[i..i + 2]);
    };
    let y = y as u32; // 0..=9999, checked above
    two(0, y / 100);
    two(2, y);
    two(5, m);
    two(8, d);
    two(11, h as u32);
    two(14, min as u32);
    two(17, s as u32);
    if frac != 0 {
        let frac = frac as u32;
        two(20, frac / 10);
        two(21, frac);
        out.extend_from_slice(&b);
    } else {
        b[19] = b'Z';
        out.extend_from_slice(&b[..20]);
    }
}

/// "00" to "99", two bytes each.
const PAIRS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        t[2 * i] = b'0' + (i / 10) as u8;
        t[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    t
};

/// Parses a duration such as `90d`, `12h`, `30m`, `15s`, `250ms` into milliseconds.
pub fn parse_duration(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: i64 = num.parse().ok()?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => HOUR_MS,
        "d" => DAY_MS,
        "w" => 7 * DAY_MS,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formatting the digit writer replaced, as the reference.
    fn rfc3339_reference(ms: i64) -> String {
        let secs = ms.div_euclid(1000);
        let frac = ms.rem_euclid(1000);
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        let sod = secs.rem_euclid(86_400);
        let mut s = format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            sod / 3600,
            sod % 3600 / 60,
            sod % 60
        );
        if frac != 0 {
            s += &format!(".{frac:03}");
        }
        s + "Z"
    }

    proptest::proptest! {
        #[test]
        fn dates_from_unsigned_arithmetic_match_the_signed(
            z in proptest::prop_oneof![-800_000i64..4_000_000, -300_000_000_000i64..300_000_000_000],
        ) {
            proptest::prop_assert_eq!(civil_from_days(z), civil_from_days_signed(z));
        }

        #[test]
        fn rfc3339_digits_match_the_reference(ms in -100_000_000_000_000i64..400_000_000_000_000i64) {
            proptest::prop_assert_eq!(format_rfc3339(ms), rfc3339_reference(ms));
        }
    }

    #[test]
    fn parses_rfc3339_variants() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-11-22T10:00:00Z"),
            Some(1_795_341_600_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-22T11:00:00+01:00"),
            Some(1_795_341_600_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-22T10:00:00.5Z"),
            Some(1_795_341_600_500)
        );
        assert_eq!(
            parse_rfc3339("2026-11-22T10:00:00.123456Z"),
            Some(1_795_341_600_123)
        );
        assert!(parse_rfc3339("2024-02-29T00:00:00Z").is_some());
        assert_eq!(
            parse_rfc3339("2026-11-22T10:00:00"),
            Some(1_795_341_600_000),
            "no offset: UTC"
        );
        assert_eq!(
            parse_rfc3339("2026-11-22 10:00:00.250"),
            Some(1_795_341_600_250)
        );
    }

    #[test]
    fn rejects_bad_rfc3339() {
        for bad in [
            "",
            "2026-11-22",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-22T10:00:00.Z",
            "2026-11-22T25:00:00Z",
            "yesterday at noon!!",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn format_round_trips() {
        for ms in [
            0,
            1_795_341_600_000,
            1_795_341_600_123,
            -86_400_000,
            951_782_400_000,
        ] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Some(ms));
        }
        assert_eq!(format_rfc3339(1_795_341_600_000), "2026-11-22T10:00:00Z");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d"), Some(90 * DAY_MS));
        assert_eq!(parse_duration("1h"), Some(HOUR_MS));
        assert_eq!(parse_duration("250ms"), Some(250));
        assert_eq!(parse_duration("d"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
    }
}
