//! `lowBoundary()` and `highBoundary()`: the range a value of limited precision stands for.
//! Used by period comparisons in invariants and by search on partial dates.

use rust_decimal::Decimal;

use super::temporal::{DateTime, Precision, Time};
use super::Item;

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

fn decimal_boundary(d: Decimal, high: bool, p: Option<i64>) -> Option<Decimal> {
    let p = p.unwrap_or(8);
    if !(0..=28).contains(&p) {
        return None;
    }
    // A value smaller than the requested precision's unit has boundaries that round to zero there.
    if !d.is_zero() && d.abs() < Decimal::new(1, p as u32) && d.scale() > p as u32 {
        let mut z = Decimal::ZERO;
        z.rescale(p as u32);
        if d.is_sign_negative() && !high {
            z.set_sign_negative(true);
        }
        return Some(z);
    }
    let half = Decimal::new(5, d.scale() + 1);
    let b = if high { d + half } else { d - half };
    let b = if (p as u32) < b.scale() {
        let strategy = if high {
            rust_decimal::RoundingStrategy::ToPositiveInfinity
        } else {
            rust_decimal::RoundingStrategy::ToNegativeInfinity
        };
        b.round_dp_with_strategy(p as u32, strategy)
    } else {
        b
    };
    let mut b = b;
    b.rescale(p as u32);
    Some(b)
}

fn precision_of_digits(p: i64, datetime: bool) -> Option<Precision> {
    Some(match p {
        4 => Precision::Year,
        6 => Precision::Month,
        8 => Precision::Day,
        10 if datetime => Precision::Hour,
        12 if datetime => Precision::Minute,
        14 if datetime => Precision::Second,
        17 if datetime => Precision::Millisecond,
        _ => return None,
    })
}

fn datetime_boundary(d: &DateTime, high: bool, p: Option<i64>, is_date: bool) -> Option<DateTime> {
    let target = match p {
        Some(p) => precision_of_digits(p, !is_date)?,
        None if is_date => Precision::Day,
        None => Precision::Millisecond,
    };
    let mut r = d.clone();
    if r.precision < Precision::Month {
        r.month = if high { 12 } else { 1 };
    }
    if r.precision < Precision::Day {
        r.day = if high {
            days_in_month(r.year, r.month)
        } else {
            1
        };
    }
    if r.precision < Precision::Hour {
        r.hour = if high { 23 } else { 0 };
    }
    // An hour-only time is read as hh:00 before filling.
    if r.precision < Precision::Minute {
        r.minute = if high && r.precision < Precision::Hour {
            59
        } else {
            0
        };
    }
    if r.precision < Precision::Second {
        r.second = if high { 59 } else { 0 };
    }
    if r.precision < Precision::Millisecond {
        r.millis = if high { 999 } else { 0 };
    }
    if target >= Precision::Hour && r.tz.is_none() {
        r.tz = Some(if high { -12 * 60 } else { 14 * 60 });
    }
    if target < Precision::Hour {
        r.tz = None;
    }
    r.precision = target;
    Some(r)
}

fn time_boundary(t: &Time, high: bool, p: Option<i64>) -> Option<Time> {
    let target = match p {
        None | Some(9) => Precision::Millisecond,
        Some(2) => Precision::Hour,
        Some(4) => Precision::Minute,
        Some(6) => Precision::Second,
        _ => return None,
    };
    let mut r = t.clone();
    if r.precision < Precision::Minute {
        r.minute = 0;
    }
    if r.precision < Precision::Second {
        r.second = if high { 59 } else { 0 };
    }
    if r.precision < Precision::Millisecond {
        r.millis = if high { 999 } else { 0 };
    }
    r.precision = target;
    Some(r)
}

/// The low or high boundary of a value at the requested precision (digits), or `None` when undefined.
pub fn boundary<'a>(v: &Item<'a>, high: bool, p: Option<i64>) -> Option<Item<'a>> {
    match v {
        Item::Int(i) => decimal_boundary(Decimal::from(*i), high, p).map(Item::Dec),
        Item::Dec(d) => decimal_boundary(*d, high, p).map(Item::Dec),
        Item::Quantity(d, u) => decimal_boundary(*d, high, p).map(|d| Item::Quantity(d, u.clone())),
        Item::Date(d) => datetime_boundary(d, high, p, true).map(Item::Date),
        Item::DateTime(d) => datetime_boundary(d, high, p, false).map(|r| {
            if r.precision <= Precision::Day {
                Item::Date(r)
            } else {
                Item::DateTime(r)
            }
        }),
        Item::Time(t) => time_boundary(t, high, p).map(Item::Time),
        _ => None,
    }
}
