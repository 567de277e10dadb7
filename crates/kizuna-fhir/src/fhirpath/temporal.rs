//! Dates, date-times and times with partial precision, as FHIR and FHIRPath define them.
//!
//! `2012`, `2012-03` and `2012-03-04T10:30+09:00` are all valid and compare only as far as both are known:
//! `@2012 = @2012-03` is empty (unknown), not false.

use std::cmp::Ordering;
use std::fmt;

use chrono::{Datelike, NaiveDate, Timelike};

/// Precision of a temporal value, coarsest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    /// Year only.
    Year,
    /// Year and month.
    Month,
    /// A full date.
    Day,
    /// Date and hour.
    Hour,
    /// Up to minutes.
    Minute,
    /// Up to seconds.
    Second,
    /// Up to milliseconds.
    Millisecond,
}

/// A date or date-time with partial precision and an optional time-zone offset (minutes east of UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateTime {
    /// Year (0001–9999).
    pub year: i32,
    /// Month 1–12 (0 when unknown).
    pub month: u32,
    /// Day 1–31 (0 when unknown).
    pub day: u32,
    /// Hour 0–23.
    pub hour: u32,
    /// Minute 0–59.
    pub minute: u32,
    /// Second 0–59.
    pub second: u32,
    /// Milliseconds 0–999.
    pub millis: u32,
    /// How much of the above is known.
    pub precision: Precision,
    /// Offset from UTC in minutes, when given.
    pub tz: Option<i32>,
}

/// A time of day with partial precision (no time zone, per FHIRPath).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Time {
    /// Hour 0–23.
    pub hour: u32,
    /// Minute.
    pub minute: u32,
    /// Second.
    pub second: u32,
    /// Milliseconds.
    pub millis: u32,
    /// Hour, Minute, Second or Millisecond.
    pub precision: Precision,
}

fn num(s: &str, len: usize) -> Option<(u32, &str)> {
    if s.len() < len || !s.as_bytes()[..len].iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((s[..len].parse().ok()?, &s[len..]))
}

fn parse_fraction(s: &str) -> Option<(u32, &str)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let frac = &s[..digits];
    let mut ms = 0u32;
    for (i, b) in frac.bytes().take(3).enumerate() {
        ms += (b - b'0') as u32 * 10u32.pow(2 - i as u32);
    }
    Some((ms, &s[digits..]))
}

fn parse_tz(s: &str) -> Option<(Option<i32>, &str)> {
    if let Some(rest) = s.strip_prefix('Z') {
        return Some((Some(0), rest));
    }
    let sign = match s.as_bytes().first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Some((None, s)),
    };
    let (h, rest) = num(&s[1..], 2)?;
    let rest = rest.strip_prefix(':')?;
    let (m, rest) = num(rest, 2)?;
    if h > 14 || m > 59 {
        return None;
    }
    Some((Some(sign * (h as i32 * 60 + m as i32)), rest))
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

impl DateTime {
    /// Parses a FHIR `date`, `dateTime` or `instant` string (`2012`, `2012-03-04`, `2012-03-04T10:30:00.5+09:00`).
    /// With `fhirpath_literal`, the FHIRPath forms `2012-03-04T` and `2012-03-04T10` are accepted too.
    pub fn parse(s: &str, fhirpath_literal: bool) -> Option<DateTime> {
        let (year, rest) = num(s, 4)?;
        let mut dt = DateTime {
            year: year as i32,
            month: 0,
            day: 0,
            hour: 0,
            minute: 0,
            second: 0,
            millis: 0,
            precision: Precision::Year,
            tz: None,
        };
        let mut rest = rest;
        if let Some(r) = rest.strip_prefix('-') {
            let (m, r) = num(r, 2)?;
            if !(1..=12).contains(&m) {
                return None;
            }
            dt.month = m;
            dt.precision = Precision::Month;
            rest = r;
            if let Some(r) = rest.strip_prefix('-') {
                let (d, r) = num(r, 2)?;
                if d < 1 || d > days_in_month(dt.year, m) {
                    return None;
                }
                dt.day = d;
                dt.precision = Precision::Day;
                rest = r;
            }
        }
        if let Some(r) = rest.strip_prefix('T') {
            if dt.precision != Precision::Day && !fhirpath_literal {
                return None;
            }
            rest = r;
            if !rest.is_empty() && rest.as_bytes()[0].is_ascii_digit() {
                let (h, r) = num(rest, 2)?;
                if h > 23 {
                    return None;
                }
                dt.hour = h;
                dt.precision = Precision::Hour;
                rest = r;
                if let Some(r) = rest.strip_prefix(':') {
                    let (mi, r) = num(r, 2)?;
                    if mi > 59 {
                        return None;
                    }
                    dt.minute = mi;
                    dt.precision = Precision::Minute;
                    rest = r;
                    if let Some(r) = rest.strip_prefix(':') {
                        let (se, r) = num(r, 2)?;
                        if se > 60 {
                            return None;
                        }
                        dt.second = se;
                        dt.precision = Precision::Second;
                        rest = r;
                        if let Some(r) = rest.strip_prefix('.') {
                            let (ms, r) = parse_fraction(r)?;
                            dt.millis = ms;
                            dt.precision = Precision::Millisecond;
                            rest = r;
                        }
                    }
                } else if !fhirpath_literal {
                    return None;
                }
            } else if !fhirpath_literal {
                return None;
            }
            let (tz, r) = parse_tz(rest)?;
            dt.tz = tz;
            rest = r;
        }
        if rest.is_empty() {
            Some(dt)
        } else {
            None
        }
    }

    /// True when the value carries a time part.
    pub fn has_time(&self) -> bool {
        self.precision >= Precision::Hour
    }

    /// Shifts to UTC when an offset is known and the value has at least hour precision.
    pub fn to_utc(&self) -> DateTime {
        match self.tz {
            Some(off) if off != 0 && self.has_time() => {
                let Some(date) = NaiveDate::from_ymd_opt(self.year, self.month, self.day) else {
                    return self.clone();
                };
                let Some(t) = date.and_hms_milli_opt(
                    self.hour,
                    self.minute,
                    self.second.min(59),
                    self.millis,
                ) else {
                    return self.clone();
                };
                let u = t - chrono::Duration::minutes(off as i64);
                DateTime {
                    year: u.year(),
                    month: u.month(),
                    day: u.day(),
                    hour: u.hour(),
                    minute: u.minute(),
                    second: u.second(),
                    millis: u.nanosecond() / 1_000_000,
                    precision: self.precision,
                    tz: Some(0),
                }
            }
            _ => self.clone(),
        }
    }

    fn parts(&self) -> [i64; 7] {
        [
            self.year as i64,
            self.month as i64,
            self.day as i64,
            self.hour as i64,
            self.minute as i64,
            self.second as i64,
            self.millis as i64,
        ]
    }

    /// FHIRPath comparison: `None` when the answer depends on parts one side does not know.
    pub fn compare(&self, other: &DateTime) -> Option<Ordering> {
        // One side with a zone and one without cannot be placed on one time line.
        if self.has_time() && other.has_time() && self.tz.is_some() != other.tz.is_some() {
            return None;
        }
        let (a, b) = if self.tz.is_some() && other.tz.is_some() {
            (self.to_utc(), other.to_utc())
        } else {
            (self.clone(), other.clone())
        };
        compare_parts(&a.parts(), a.precision, &b.parts(), b.precision)
    }

    /// Adds a calendar quantity (years … milliseconds) to this value, keeping its precision.
    pub fn add(&self, amount: i64, unit: CalendarUnit) -> Option<DateTime> {
        let mut r = self.clone();
        match unit {
            CalendarUnit::Year => {
                r.year = r.year.checked_add(amount as i32)?;
                if r.precision >= Precision::Day {
                    r.day = r.day.min(days_in_month(r.year, r.month));
                }
            }
            CalendarUnit::Month => {
                if r.precision < Precision::Month {
                    r.year = r.year.checked_add((amount / 12) as i32)?;
                } else {
                    let total = r.year as i64 * 12 + (r.month as i64 - 1) + amount;
                    r.year = total.div_euclid(12) as i32;
                    r.month = (total.rem_euclid(12) + 1) as u32;
                    if r.precision >= Precision::Day {
                        r.day = r.day.min(days_in_month(r.year, r.month));
                    }
                }
            }
            _ => {
                let ms = unit.millis()? * amount;
                if r.precision < Precision::Day {
                    // A duration finer than the value's precision changes nothing it can show.
                    return Some(r);
                }
                let date = NaiveDate::from_ymd_opt(r.year, r.month, r.day)?;
                let t = date.and_hms_milli_opt(r.hour, r.minute, r.second.min(59), r.millis)?;
                let step = match r.precision {
                    Precision::Day => 86_400_000,
                    Precision::Hour => 3_600_000,
                    Precision::Minute => 60_000,
                    Precision::Second => 1000,
                    _ => 1,
                };
                let ms = ms / step * step;
                let u = t.checked_add_signed(chrono::Duration::milliseconds(ms))?;
                r.year = u.year();
                r.month = u.month();
                r.day = u.day();
                r.hour = u.hour();
                r.minute = u.minute();
                r.second = u.second();
                r.millis = u.nanosecond() / 1_000_000;
            }
        }
        if !(1..=9999).contains(&r.year) {
            return None;
        }
        Some(r)
    }

    /// Formats as FHIR does (without the FHIRPath `@`).
    pub fn to_fhir_string(&self) -> String {
        let mut s = format!("{:04}", self.year);
        if self.precision >= Precision::Month {
            s += &format!("-{:02}", self.month);
        }
        if self.precision >= Precision::Day {
            s += &format!("-{:02}", self.day);
        }
        if self.precision >= Precision::Hour {
            s += &format!("T{:02}", self.hour);
            if self.precision >= Precision::Minute {
                s += &format!(":{:02}", self.minute);
            }
            if self.precision >= Precision::Second {
                s += &format!(":{:02}", self.second);
            }
            if self.precision >= Precision::Millisecond {
                s += &format!(".{:03}", self.millis);
            }
            if let Some(tz) = self.tz {
                if tz == 0 {
                    s.push('Z');
                } else {
                    let sign = if tz < 0 { '-' } else { '+' };
                    s += &format!("{sign}{:02}:{:02}", tz.abs() / 60, tz.abs() % 60);
                }
            }
        }
        s
    }
}

fn compare_parts(a: &[i64], pa: Precision, b: &[i64], pb: Precision) -> Option<Ordering> {
    // Seconds and milliseconds are one precision for comparison.
    let norm = |p: Precision| {
        if p == Precision::Millisecond {
            Precision::Second
        } else {
            p
        }
    };
    let (na, nb) = (norm(pa), norm(pb));
    let common = na.min(nb);
    let upto = precision_index(common);
    for i in 0..=upto {
        let (x, y) = if precision_index(Precision::Second) == i {
            (
                a[i] * 1000 + a.get(i + 1).copied().unwrap_or(0),
                b[i] * 1000 + b.get(i + 1).copied().unwrap_or(0),
            )
        } else {
            (a[i], b[i])
        };
        match x.cmp(&y) {
            Ordering::Equal => {}
            o => return Some(o),
        }
    }
    if na == nb {
        Some(Ordering::Equal)
    } else {
        None
    }
}

fn precision_index(p: Precision) -> usize {
    match p {
        Precision::Year => 0,
        Precision::Month => 1,
        Precision::Day => 2,
        Precision::Hour => 3,
        Precision::Minute => 4,
        Precision::Second => 5,
        Precision::Millisecond => 6,
    }
}

impl fmt::Display for DateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_fhir_string())
    }
}

impl Time {
    /// Parses `hh`, `hh:mm`, `hh:mm:ss` or `hh:mm:ss.fff` (FHIR `time` requires seconds; FHIRPath does not).
    pub fn parse(s: &str, fhirpath_literal: bool) -> Option<Time> {
        let (h, rest) = num(s, 2)?;
        if h > 23 {
            return None;
        }
        let mut t = Time {
            hour: h,
            minute: 0,
            second: 0,
            millis: 0,
            precision: Precision::Hour,
        };
        let mut rest = rest;
        if let Some(r) = rest.strip_prefix(':') {
            let (m, r) = num(r, 2)?;
            if m > 59 {
                return None;
            }
            t.minute = m;
            t.precision = Precision::Minute;
            rest = r;
            if let Some(r) = rest.strip_prefix(':') {
                let (se, r) = num(r, 2)?;
                if se > 59 {
                    return None;
                }
                t.second = se;
                t.precision = Precision::Second;
                rest = r;
                if let Some(r) = rest.strip_prefix('.') {
                    let (ms, r) = parse_fraction(r)?;
                    t.millis = ms;
                    t.precision = Precision::Millisecond;
                    rest = r;
                }
            }
        }
        if !fhirpath_literal && t.precision < Precision::Second {
            return None;
        }
        if rest.is_empty() {
            Some(t)
        } else {
            None
        }
    }

    /// FHIRPath comparison with partial precision.
    pub fn compare(&self, other: &Time) -> Option<Ordering> {
        let a = [
            0,
            0,
            0,
            self.hour as i64,
            self.minute as i64,
            self.second as i64,
            self.millis as i64,
        ];
        let b = [
            0,
            0,
            0,
            other.hour as i64,
            other.minute as i64,
            other.second as i64,
            other.millis as i64,
        ];
        compare_parts(&a, self.precision, &b, other.precision)
    }

    /// Adds hours … milliseconds, wrapping around midnight.
    pub fn add(&self, amount: i64, unit: CalendarUnit) -> Option<Time> {
        let ms = unit.millis()?.checked_mul(amount)?;
        let day = 86_400_000i64;
        let cur = ((self.hour * 3600 + self.minute * 60 + self.second) as i64) * 1000
            + self.millis as i64;
        let n = (cur + ms).rem_euclid(day);
        Some(Time {
            hour: (n / 3_600_000) as u32,
            minute: ((n / 60_000) % 60) as u32,
            second: ((n / 1000) % 60) as u32,
            millis: (n % 1000) as u32,
            precision: self.precision,
        })
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}", self.hour)?;
        if self.precision >= Precision::Minute {
            write!(f, ":{:02}", self.minute)?;
        }
        if self.precision >= Precision::Second {
            write!(f, ":{:02}", self.second)?;
        }
        if self.precision >= Precision::Millisecond {
            write!(f, ".{:03}", self.millis)?;
        }
        Ok(())
    }
}

/// The calendar-duration units date arithmetic understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarUnit {
    /// Years.
    Year,
    /// Months.
    Month,
    /// Weeks.
    Week,
    /// Days.
    Day,
    /// Hours.
    Hour,
    /// Minutes.
    Minute,
    /// Seconds.
    Second,
    /// Milliseconds.
    Millisecond,
}

impl CalendarUnit {
    /// Maps a calendar keyword (`year`, `months`) or, when `ucum` is set, a UCUM time code (`d`, `wk`).
    /// UCUM `a` and `mo` are not calendar durations and are refused for date arithmetic.
    pub fn from_unit(unit: &str, allow_ucum: bool) -> Option<CalendarUnit> {
        let u = match unit {
            "year" | "years" => CalendarUnit::Year,
            "month" | "months" => CalendarUnit::Month,
            "week" | "weeks" => CalendarUnit::Week,
            "day" | "days" => CalendarUnit::Day,
            "hour" | "hours" => CalendarUnit::Hour,
            "minute" | "minutes" => CalendarUnit::Minute,
            "second" | "seconds" => CalendarUnit::Second,
            "millisecond" | "milliseconds" => CalendarUnit::Millisecond,
            "wk" if allow_ucum => CalendarUnit::Week,
            "d" if allow_ucum => CalendarUnit::Day,
            "h" if allow_ucum => CalendarUnit::Hour,
            "min" if allow_ucum => CalendarUnit::Minute,
            "s" if allow_ucum => CalendarUnit::Second,
            "ms" if allow_ucum => CalendarUnit::Millisecond,
            _ => return None,
        };
        Some(u)
    }

    /// Fixed length in milliseconds (none for years and months).
    pub fn millis(self) -> Option<i64> {
        Some(match self {
            CalendarUnit::Week => 604_800_000,
            CalendarUnit::Day => 86_400_000,
            CalendarUnit::Hour => 3_600_000,
            CalendarUnit::Minute => 60_000,
            CalendarUnit::Second => 1000,
            CalendarUnit::Millisecond => 1,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_partial_dates() {
        assert_eq!(
            DateTime::parse("2012", false).map(|d| d.precision),
            Some(Precision::Year)
        );
        assert_eq!(DateTime::parse("2012-02-30", false), None);
        assert_eq!(
            DateTime::parse("2012-02-29", false).map(|d| d.day),
            Some(29)
        );
        let d = DateTime::parse("2015-02-04T14:34:28.123+09:00", false);
        assert_eq!(d.as_ref().map(|d| d.tz), Some(Some(540)));
        assert_eq!(
            d.map(|d| d.to_fhir_string()).as_deref(),
            Some("2015-02-04T14:34:28.123+09:00")
        );
        assert_eq!(DateTime::parse("2015-02-04T14", false), None);
        assert!(DateTime::parse("2015-02-04T14", true).is_some());
    }

    #[test]
    fn compares_with_precision() {
        let a = DateTime::parse("2012", true).unwrap_or_else(|| unreachable!());
        let b = DateTime::parse("2012-03", true).unwrap_or_else(|| unreachable!());
        let c = DateTime::parse("2013-01", true).unwrap_or_else(|| unreachable!());
        assert_eq!(a.compare(&b), None);
        assert_eq!(a.compare(&c), Some(Ordering::Less));
        let x =
            DateTime::parse("2017-11-05T01:30:00.0-04:00", false).unwrap_or_else(|| unreachable!());
        let y = DateTime::parse("2017-11-05T05:30:00.0Z", false).unwrap_or_else(|| unreachable!());
        assert_eq!(x.compare(&y), Some(Ordering::Equal));
    }
}
