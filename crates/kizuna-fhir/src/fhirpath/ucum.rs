//! Enough of UCUM to compare and convert the quantities that clinical data and FHIRPath use:
//! metric prefixes, mass, length, volume, time, amount of substance, and products and quotients of them
//! (`mg/dL`, `mmol/L`, `kg/m2`).

use rust_decimal::Decimal;
use std::str::FromStr;

/// Exponents of the base dimensions: mass, length, time, amount, arbitrary (`[iU]`), and the count.
pub type Dim = [i32; 5];

/// A unit reduced to a factor times base units.
#[derive(Debug, Clone, PartialEq)]
pub struct Canonical {
    /// Multiply a value in this unit by this to get base units.
    pub factor: Decimal,
    /// Dimension exponents.
    pub dim: Dim,
}

fn atom(a: &str) -> Option<(Decimal, Dim)> {
    let d = |s: &str| Decimal::from_str(s).ok();
    Some(match a {
        "g" => (Decimal::ONE, [1, 0, 0, 0, 0]),
        "m" => (Decimal::ONE, [0, 1, 0, 0, 0]),
        "s" => (Decimal::ONE, [0, 0, 1, 0, 0]),
        "min" => (d("60")?, [0, 0, 1, 0, 0]),
        "h" => (d("3600")?, [0, 0, 1, 0, 0]),
        "d" => (d("86400")?, [0, 0, 1, 0, 0]),
        "wk" => (d("604800")?, [0, 0, 1, 0, 0]),
        "mo" => (d("2629800")?, [0, 0, 1, 0, 0]),
        "a" => (d("31557600")?, [0, 0, 1, 0, 0]),
        "L" | "l" => (d("0.001")?, [0, 3, 0, 0, 0]),
        "mol" => (Decimal::ONE, [0, 0, 0, 1, 0]),
        "[iU]" | "[IU]" | "U" => (Decimal::ONE, [0, 0, 0, 0, 1]),
        "%" => (d("0.01")?, [0; 5]),
        "1" => (Decimal::ONE, [0; 5]),
        "[in_i]" => (d("0.0254")?, [0, 1, 0, 0, 0]),
        "[ft_i]" => (d("0.3048")?, [0, 1, 0, 0, 0]),
        "[lb_av]" => (d("453.59237")?, [1, 0, 0, 0, 0]),
        "[oz_av]" => (d("28.349523125")?, [1, 0, 0, 0, 0]),
        "mm[Hg]" => (d("133.322")?, [1, -1, -2, 0, 0]),
        _ => return None,
    })
}

fn prefix(p: &str) -> Option<Decimal> {
    let s = match p {
        "k" => "1000",
        "h" => "100",
        "da" => "10",
        "d" => "0.1",
        "c" => "0.01",
        "m" => "0.001",
        "u" | "μ" => "0.000001",
        "n" => "0.000000001",
        "p" => "0.000000000001",
        _ => return None,
    };
    Decimal::from_str(s).ok()
}

fn term(t: &str) -> Option<(Decimal, Dim)> {
    // Split a trailing integer exponent (`m2`, `s-1`).
    let body_end = t
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_ascii_digit() || *c == '-')
        .last()
        .map(|(i, _)| i)
        .unwrap_or(t.len());
    let (body, exp) = if body_end > 0 && body_end < t.len() && !t.starts_with('[') {
        (&t[..body_end], t[body_end..].parse::<i32>().ok()?)
    } else {
        (t, 1)
    };
    if let Ok(n) = Decimal::from_str(body) {
        return Some((n, [0; 5]));
    }
    let (f, dim) = atom(body).or_else(|| {
        for plen in [2, 1] {
            if body.len() > plen && body.is_char_boundary(plen) {
                if let (Some(p), Some((f, dim))) = (prefix(&body[..plen]), atom(&body[plen..])) {
                    return Some((p * f, dim));
                }
            }
        }
        None
    })?;
    let mut factor = Decimal::ONE;
    for _ in 0..exp.unsigned_abs() {
        factor = factor.checked_mul(f)?;
    }
    if exp < 0 {
        factor = Decimal::ONE.checked_div(factor)?;
    }
    Some((factor, dim.map(|x| x * exp)))
}

/// Reduces a UCUM expression to base units, or `None` when it uses something this table does not know.
pub fn canonical(unit: &str) -> Option<Canonical> {
    let unit = unit.trim();
    if unit.is_empty() {
        return Some(Canonical {
            factor: Decimal::ONE,
            dim: [0; 5],
        });
    }
    // Drop annotations such as `{cells}`.
    let mut cleaned = String::with_capacity(unit.len());
    let mut depth = 0;
    for c in unit.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ if depth == 0 => cleaned.push(c),
            _ => {}
        }
    }
    let mut factor = Decimal::ONE;
    let mut dim = [0; 5];
    let mut divide = false;
    let mut cur = String::new();
    let flush = |cur: &str, divide: bool, factor: &mut Decimal, dim: &mut Dim| -> Option<()> {
        if cur.is_empty() {
            return Some(());
        }
        let (f, d) = term(cur)?;
        if divide {
            *factor = factor.checked_div(f)?;
            for i in 0..5 {
                dim[i] -= d[i];
            }
        } else {
            *factor = factor.checked_mul(f)?;
            for i in 0..5 {
                dim[i] += d[i];
            }
        }
        Some(())
    };
    let mut bracket = false;
    for c in cleaned.chars() {
        match c {
            '[' => {
                bracket = true;
                cur.push(c)
            }
            ']' => {
                bracket = false;
                cur.push(c)
            }
            '.' | '/' if !bracket => {
                flush(&cur, divide, &mut factor, &mut dim)?;
                cur.clear();
                if c == '/' {
                    divide = true;
                }
            }
            _ => cur.push(c),
        }
    }
    flush(&cur, divide, &mut factor, &mut dim)?;
    Some(Canonical { factor, dim })
}

/// Converts `value` from one UCUM unit to another, when both are known and of the same dimension.
pub fn convert(value: Decimal, from: &str, to: &str) -> Option<Decimal> {
    if from == to {
        return Some(value);
    }
    let a = canonical(from)?;
    let b = canonical(to)?;
    if a.dim != b.dim {
        return None;
    }
    value.checked_mul(a.factor)?.checked_div(b.factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap_or_default()
    }

    #[test]
    fn converts_common_clinical_units() {
        assert_eq!(
            convert(dec("4"), "g", "mg").map(|d| d.normalize()),
            Some(dec("4000"))
        );
        assert_eq!(
            convert(dec("1"), "wk", "d").map(|d| d.normalize()),
            Some(dec("7"))
        );
        assert_eq!(
            convert(dec("100"), "mg/dL", "g/L").map(|d| d.normalize()),
            Some(dec("1"))
        );
        assert_eq!(
            convert(dec("1"), "m2", "cm2").map(|d| d.normalize()),
            Some(dec("10000"))
        );
        assert_eq!(convert(dec("1"), "g", "m"), None);
        assert_eq!(canonical("mmol/L").map(|c| c.dim), Some([0, -3, 0, 1, 0]));
    }
}
