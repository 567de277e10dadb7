//! The FHIRPath function library (existence, filtering, subsetting, combining, conversion, strings, math,
//! tree navigation, utility) and FHIR's additions (`extension`, `resolve`, `memberOf`, `conformsTo`,
//! `hasValue`, `htmlChecks`).

use std::cmp::Ordering;
use std::str::FromStr;

use base64::Engine as _;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use rust_decimal::{Decimal, MathematicalOps};
use serde_json::Value;

use crate::json::Member as _;

use super::eval::{
    contains_item, distinct, exec, item_cmp, single, single_int, single_str, to_bool3, to_system,
    Coll, Evaluator, Scope, R,
};
use super::parse::Expr;
use super::temporal::{DateTime, Precision, Time};
use super::{FhirPathError, Item, Node};

fn bool1<'a>(b: bool) -> R<Coll<'a>> {
    Ok(vec![Item::Bool(b)])
}

fn arity(name: &str, args: &[Expr], min: usize, max: usize) -> R<()> {
    if args.len() < min || args.len() > max {
        return Err(FhirPathError::Semantic(format!(
            "{name}() の引数の数が違います / wrong number of arguments to {name}()"
        )));
    }
    Ok(())
}

/// The type name written as a function argument (`ofType(Quantity)`, `is(FHIR.string)`).
fn type_arg(e: &Expr) -> R<String> {
    match e {
        Expr::Ident(n) => Ok(n.clone()),
        Expr::Member(b, n) => Ok(format!("{}.{n}", type_arg(b)?)),
        _ => Err(FhirPathError::Semantic(
            "型名が必要です / expected a type name".into(),
        )),
    }
}

fn parse_quantity_str(s: &str) -> Option<(Decimal, String)> {
    let s = s.trim();
    let num_end = s
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || *c == '.' || ((*c == '-' || *c == '+') && *i == 0)))
        .map(|(i, _)| i)
        .unwrap_or(s.len());
    let (n, rest) = s.split_at(num_end);
    if n.is_empty() || n.ends_with('.') || n.starts_with('.') {
        return None;
    }
    let v = Decimal::from_str(n).ok()?;
    let rest = rest.trim();
    if rest.is_empty() {
        return Some((v, "1".into()));
    }
    if let Some(u) = rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return Some((v, u.to_string()));
    }
    if super::temporal::CalendarUnit::from_unit(rest, false).is_some() {
        return Some((v, rest.to_string()));
    }
    None
}

fn decimal_precision(d: &Decimal) -> u32 {
    d.scale()
}

fn fmt_decimal(d: &Decimal) -> String {
    d.to_string()
}

impl<'c, 'a> Evaluator<'c, 'a> {
    fn arg(&self, e: &Expr, s: &Scope<'a>) -> R<Coll<'a>> {
        self.eval(e, s)
    }

    /// Evaluates `e` once per input item, with `$this` and `$index` set.
    fn per_item(&self, input: &Coll<'a>, e: &Expr, s: &Scope<'a>) -> R<Vec<Coll<'a>>> {
        let mut out = Vec::with_capacity(input.len());
        // One scope whose `$this` is refilled: an allocation per item was measurable in the
        // `entry.select(…).all(…)` rules JP-CLINS bundles carry.
        let mut scope = Scope {
            this: Vec::with_capacity(1),
            index: None,
            total: s.total.clone(),
        };
        for (i, item) in input.iter().enumerate() {
            scope.this.clear();
            scope.this.push(item.clone());
            scope.index = Some(i as i64);
            out.push(self.eval(e, &scope)?);
        }
        Ok(out)
    }

    fn str_input(&self, input: &Coll<'a>, name: &str) -> R<Option<String>> {
        match single(input, name)? {
            None => Ok(None),
            Some(x) => match to_system(x, self.model()) {
                Some(Item::Str(s)) => Ok(Some(s)),
                None => Ok(None),
                _ => Err(FhirPathError::Semantic(format!(
                    "{name}() は文字列に対する関数です / {name}() needs a string"
                ))),
            },
        }
    }

    fn num_input(&self, input: &Coll<'a>, name: &str) -> R<Option<Item<'a>>> {
        match single(input, name)? {
            None => Ok(None),
            Some(x) => match to_system(x, self.model()) {
                Some(i @ (Item::Int(_) | Item::Long(_) | Item::Dec(_) | Item::Quantity(..))) => {
                    Ok(Some(i))
                }
                None => Ok(None),
                _ => Err(exec(format!(
                    "{name}() は数値に対する関数です / {name}() needs a number"
                ))),
            },
        }
    }

    pub(super) fn call(
        &self,
        name: &str,
        input: Coll<'a>,
        args: &[Expr],
        s: &Scope<'a>,
    ) -> R<Coll<'a>> {
        let model = self.model();
        match name {
            // Existence
            "empty" => bool1(input.is_empty()),
            "exists" => {
                arity(name, args, 0, 1)?;
                if let Some(c) = args.first() {
                    for r in self.per_item(&input, c, s)? {
                        if to_bool3(&r, model)? == Some(true) {
                            return bool1(true);
                        }
                    }
                    bool1(false)
                } else {
                    bool1(!input.is_empty())
                }
            }
            "all" => {
                arity(name, args, 1, 1)?;
                for r in self.per_item(&input, &args[0], s)? {
                    if to_bool3(&r, model)? != Some(true) {
                        return bool1(false);
                    }
                }
                bool1(true)
            }
            "allTrue" | "anyTrue" | "allFalse" | "anyFalse" => {
                let mut bools = Vec::new();
                for i in &input {
                    match to_system(i, model) {
                        Some(Item::Bool(b)) => bools.push(b),
                        _ => {
                            return Err(exec(format!(
                                "{name}() は真偽値の集合に対する関数です / needs booleans"
                            )))
                        }
                    }
                }
                bool1(match name {
                    "allTrue" => bools.iter().all(|b| *b),
                    "anyTrue" => bools.iter().any(|b| *b),
                    "allFalse" => bools.iter().all(|b| !*b),
                    _ => bools.iter().any(|b| !*b),
                })
            }
            "subsetOf" | "supersetOf" => {
                arity(name, args, 1, 1)?;
                let other = self.arg(&args[0], s)?;
                let (sub, sup) = if name == "subsetOf" {
                    (&input, &other)
                } else {
                    (&other, &input)
                };
                bool1(sub.iter().all(|x| contains_item(sup, x, model)))
            }
            "count" => Ok(vec![Item::Int(input.len() as i64)]),
            "distinct" => Ok(distinct(input, model)),
            "isDistinct" => {
                let n = input.len();
                bool1(distinct(input, model).len() == n)
            }
            // Filtering and projection
            "where" => {
                arity(name, args, 1, 1)?;
                let rs = self.per_item(&input, &args[0], s)?;
                let mut out = Vec::new();
                for (item, r) in input.into_iter().zip(rs) {
                    if to_bool3(&r, model)? == Some(true) {
                        out.push(item);
                    }
                }
                Ok(out)
            }
            "select" => {
                arity(name, args, 1, 1)?;
                Ok(self
                    .per_item(&input, &args[0], s)?
                    .into_iter()
                    .flatten()
                    .collect())
            }
            "repeat" => {
                arity(name, args, 1, 1)?;
                let mut out: Coll<'a> = Vec::new();
                let mut frontier = input;
                let mut rounds = 0;
                while !frontier.is_empty() {
                    rounds += 1;
                    if rounds > 1000 {
                        return Err(exec(
                            "repeat() が終わりません / repeat() does not terminate",
                        ));
                    }
                    let next: Coll<'a> = self
                        .per_item(&frontier, &args[0], s)?
                        .into_iter()
                        .flatten()
                        .collect();
                    frontier = Vec::new();
                    for n in next {
                        if !contains_item(&out, &n, model) {
                            out.push(n.clone());
                            frontier.push(n);
                        }
                    }
                }
                Ok(out)
            }
            "ofType" => {
                arity(name, args, 1, 1)?;
                let t = self.known_type(type_arg(&args[0])?)?;
                Ok(input
                    .into_iter()
                    .filter(|i| self.type_matches(i, &t, true))
                    .collect())
            }
            "is" => {
                arity(name, args, 1, 1)?;
                let t = type_arg(&args[0])?;
                match single(&input, "is")? {
                    None => Ok(Vec::new()),
                    Some(x) => bool1(self.is_type(x, &t)),
                }
            }
            "as" => {
                arity(name, args, 1, 1)?;
                let t = self.known_type(type_arg(&args[0])?)?;
                if input.len() > 1 {
                    return Err(exec("as() は一つの値のみ / as() needs a single item"));
                }
                Ok(input
                    .into_iter()
                    .filter(|i| self.type_matches(i, &t, true))
                    .collect())
            }
            // Subsetting
            "single" => match input.len() {
                0 | 1 => Ok(input),
                _ => Err(exec("single(): 複数の値があります / more than one item")),
            },
            "first" => Ok(input.into_iter().take(1).collect()),
            "last" => Ok(input.into_iter().last().into_iter().collect()),
            "tail" => Ok(input.into_iter().skip(1).collect()),
            "skip" | "take" => {
                arity(name, args, 1, 1)?;
                let n = single_int(&self.arg(&args[0], s)?, model)?
                    .unwrap_or(0)
                    .max(0) as usize;
                Ok(if name == "skip" {
                    input.into_iter().skip(n).collect()
                } else {
                    input.into_iter().take(n).collect()
                })
            }
            "intersect" | "exclude" | "union" | "combine" => {
                arity(name, args, 1, 1)?;
                let other = self.arg(&args[0], s)?;
                Ok(match name {
                    "intersect" => distinct(
                        input
                            .into_iter()
                            .filter(|x| contains_item(&other, x, model))
                            .collect(),
                        model,
                    ),
                    "exclude" => input
                        .into_iter()
                        .filter(|x| !contains_item(&other, x, model))
                        .collect(),
                    "union" => {
                        let mut a = input;
                        a.extend(other);
                        distinct(a, model)
                    }
                    _ => {
                        let mut a = input;
                        a.extend(other);
                        a
                    }
                })
            }
            // Conditional
            "iif" => {
                arity(name, args, 2, 3)?;
                if input.len() > 1 {
                    return Err(exec(
                        "iif() の入力は一つまで / iif() input must be at most one item",
                    ));
                }
                let scope = Scope {
                    this: input.clone(),
                    index: s.index,
                    total: s.total.clone(),
                };
                let cond = self.eval(&args[0], &scope)?;
                let c = match cond.as_slice() {
                    [] => None,
                    [x] => match to_system(x, model) {
                        Some(Item::Bool(b)) => Some(b),
                        _ => {
                            return Err(FhirPathError::Semantic(
                                "iif() の条件は真偽値 / iif() needs a boolean".into(),
                            ))
                        }
                    },
                    _ => {
                        return Err(FhirPathError::Semantic(
                            "iif() の条件は真偽値 / iif() needs a boolean".into(),
                        ))
                    }
                };
                if c == Some(true) {
                    self.eval(&args[1], &scope)
                } else if let Some(e) = args.get(2) {
                    self.eval(e, &scope)
                } else {
                    Ok(Vec::new())
                }
            }
            // Boolean
            "not" => match input.as_slice() {
                [] => Ok(Vec::new()),
                [x] => match to_system(x, model) {
                    Some(Item::Bool(b)) => bool1(!b),
                    None => Ok(Vec::new()),
                    // Singleton evaluation: one non-Boolean item is true, so not() is false.
                    Some(_) => bool1(false),
                },
                _ => Err(exec("not() は一つの値のみ / not() needs a single item")),
            },
            // Conversion
            "toBoolean" | "convertsToBoolean" => {
                let v = match single(&input, name)? {
                    None => return Ok(Vec::new()),
                    Some(x) => match to_system(x, model) {
                        Some(Item::Bool(b)) => Some(b),
                        Some(Item::Int(1)) => Some(true),
                        Some(Item::Int(0)) => Some(false),
                        Some(Item::Dec(d)) if d == Decimal::ONE => Some(true),
                        Some(Item::Dec(d)) if d.is_zero() => Some(false),
                        Some(Item::Str(s)) => match s.to_lowercase().as_str() {
                            "true" | "t" | "yes" | "y" | "1" | "1.0" => Some(true),
                            "false" | "f" | "no" | "n" | "0" | "0.0" => Some(false),
                            _ => None,
                        },
                        _ => None,
                    },
                };
                self.conv(name, v.map(Item::Bool))
            }
            "toInteger" | "convertsToInteger" => {
                let v = match single(&input, name)? {
                    None => return Ok(Vec::new()),
                    Some(x) => match to_system(x, model) {
                        Some(Item::Int(i)) => Some(i),
                        Some(Item::Bool(b)) => Some(b as i64),
                        Some(Item::Str(s)) => {
                            let t = s.strip_prefix('+').unwrap_or(&s);
                            if !t.is_empty()
                                && t.trim_start_matches('-')
                                    .bytes()
                                    .all(|b| b.is_ascii_digit())
                            {
                                t.parse::<i32>().ok().map(|i| i as i64)
                            } else {
                                None
                            }
                        }
                        _ => None,
                    },
                };
                self.conv(name, v.map(Item::Int))
            }
            "toLong" | "convertsToLong" => {
                let v = match single(&input, name)? {
                    None => return Ok(Vec::new()),
                    Some(x) => match to_system(x, model) {
                        Some(Item::Int(i) | Item::Long(i)) => Some(i),
                        Some(Item::Bool(b)) => Some(b as i64),
                        Some(Item::Str(s)) => s.parse::<i64>().ok(),
                        _ => None,
                    },
                };
                self.conv(name, v.map(Item::Long))
            }
            "toDecimal" | "convertsToDecimal" => {
                let v = match single(&input, name)? {
                    None => return Ok(Vec::new()),
                    Some(x) => match to_system(x, model) {
                        Some(Item::Int(i) | Item::Long(i)) => Some(Decimal::from(i)),
                        Some(Item::Dec(d)) => Some(d),
                        Some(Item::Bool(b)) => Some(if b { Decimal::ONE } else { Decimal::ZERO }),
                        Some(Item::Str(s)) => {
                            let ok = {
                                let t = s.strip_prefix(['+', '-']).unwrap_or(&s);
                                let mut parts = t.splitn(2, '.');
                                let a = parts.next().unwrap_or("");
                                let b = parts.next();
                                !a.is_empty()
                                    && a.bytes().all(|c| c.is_ascii_digit())
                                    && b.map(|b| {
                                        !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit())
                                    })
                                    .unwrap_or(true)
                            };
                            if ok {
                                Decimal::from_str(&s).ok()
                            } else {
                                None
                            }
                        }
                        _ => None,
                    },
                };
                self.conv(name, v.map(Item::Dec))
            }
            "toString" | "convertsToString" => {
                let v = match single(&input, name)? {
                    None => return Ok(Vec::new()),
                    Some(x) => match to_system(x, model) {
                        Some(Item::Str(s)) => Some(s),
                        Some(Item::Bool(b)) => Some(b.to_string()),
                        Some(Item::Int(i) | Item::Long(i)) => Some(i.to_string()),
                        Some(Item::Dec(d)) => Some(fmt_decimal(&d)),
                        Some(Item::Date(d) | Item::DateTime(d)) => Some(d.to_fhir_string()),
                        Some(Item::Time(t)) => Some(t.to_string()),
                        Some(Item::Quantity(v, u)) => Some(
                            if super::temporal::CalendarUnit::from_unit(&u, false).is_some() {
                                format!("{} {u}", fmt_decimal(&v))
                            } else {
                                format!("{} '{u}'", fmt_decimal(&v))
                            },
                        ),
                        _ => None,
                    },
                };
                self.conv(name, v.map(Item::Str))
            }
            "toDate" | "convertsToDate" => {
                let v = match single(&input, name)? {
                    None => return Ok(Vec::new()),
                    Some(x) => match to_system(x, model) {
                        Some(Item::Date(d)) => Some(d),
                        Some(Item::DateTime(mut d)) => {
                            if d.precision > Precision::Day {
                                d.precision = Precision::Day;
                                d.tz = None;
                            }
                            Some(d)
                        }
                        Some(Item::Str(s)) => DateTime::parse(&s, false).filter(|d| !d.has_time()),
                        _ => None,
                    },
                };
                self.conv(name, v.map(Item::Date))
            }
            "toDateTime" | "convertsToDateTime" => {
                let v = match single(&input, name)? {
                    None => return Ok(Vec::new()),
                    Some(x) => match to_system(x, model) {
                        Some(Item::Date(d) | Item::DateTime(d)) => Some(d),
                        Some(Item::Str(s)) => DateTime::parse(&s, true),
                        _ => None,
                    },
                };
                self.conv(name, v.map(Item::DateTime))
            }
            "toTime" | "convertsToTime" => {
                let v = match single(&input, name)? {
                    None => return Ok(Vec::new()),
                    Some(x) => match to_system(x, model) {
                        Some(Item::Time(t)) => Some(t),
                        Some(Item::Str(s)) => Time::parse(&s, true),
                        _ => None,
                    },
                };
                self.conv(name, v.map(Item::Time))
            }
            "toQuantity" | "convertsToQuantity" => {
                let target = match args.first() {
                    Some(a) => single_str(&self.arg(a, s)?, model)?,
                    None => None,
                };
                let v = match single(&input, name)? {
                    None => return Ok(Vec::new()),
                    Some(x) => match to_system(x, model) {
                        Some(Item::Quantity(v, u)) => Some((v, u)),
                        Some(Item::Int(i)) => Some((Decimal::from(i), "1".to_string())),
                        Some(Item::Dec(d)) => Some((d, "1".to_string())),
                        Some(Item::Bool(b)) => Some((
                            if b { Decimal::ONE } else { Decimal::ZERO },
                            "1".to_string(),
                        )),
                        Some(Item::Str(s)) => parse_quantity_str(&s),
                        _ => None,
                    },
                };
                let v = match (v, target) {
                    (Some((v, u)), Some(t)) if u != t => {
                        super::ucum::convert(v, &u, &t).map(|c| (c, t))
                    }
                    (v, _) => v,
                };
                self.conv(name, v.map(|(v, u)| Item::Quantity(v, u)))
            }
            // Strings
            "indexOf" | "lastIndexOf" => {
                arity(name, args, 1, 1)?;
                let Some(st) = self.str_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let Some(sub) = single_str(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                let pos = if name == "indexOf" {
                    st.find(&sub)
                } else {
                    st.rfind(&sub)
                };
                Ok(vec![Item::Int(
                    pos.map(|b| st[..b].chars().count() as i64).unwrap_or(-1),
                )])
            }
            "substring" => {
                arity(name, args, 1, 2)?;
                let Some(st) = self.str_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let Some(start) = single_int(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                let chars: Vec<char> = st.chars().collect();
                if start < 0 || start as usize >= chars.len() {
                    return Ok(Vec::new());
                }
                let len = match args.get(1) {
                    Some(a) => match single_int(&self.arg(a, s)?, model)? {
                        Some(l) => l.max(0) as usize,
                        None => chars.len(),
                    },
                    None => chars.len(),
                };
                let end = (start as usize + len).min(chars.len());
                Ok(vec![Item::Str(chars[start as usize..end].iter().collect())])
            }
            "startsWith" | "endsWith" | "contains" => {
                arity(name, args, 1, 1)?;
                let Some(st) = self.str_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let Some(sub) = single_str(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                bool1(match name {
                    "startsWith" => st.starts_with(&sub),
                    "endsWith" => st.ends_with(&sub),
                    _ => st.contains(&sub),
                })
            }
            "upper" | "lower" | "trim" | "length" | "toChars" => {
                let Some(st) = self.str_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                Ok(match name {
                    "upper" => vec![Item::Str(st.to_uppercase())],
                    "lower" => vec![Item::Str(st.to_lowercase())],
                    "trim" => vec![Item::Str(st.trim().to_string())],
                    "length" => vec![Item::Int(st.chars().count() as i64)],
                    _ => st.chars().map(|c| Item::Str(c.to_string())).collect(),
                })
            }
            "replace" => {
                arity(name, args, 2, 2)?;
                let Some(st) = self.str_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let Some(pat) = single_str(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                let Some(rep) = single_str(&self.arg(&args[1], s)?, model)? else {
                    return Ok(Vec::new());
                };
                if pat.is_empty() {
                    // Insert the replacement between every character.
                    let mut out = rep.clone();
                    for c in st.chars() {
                        out.push(c);
                        out.push_str(&rep);
                    }
                    return Ok(vec![Item::Str(out)]);
                }
                Ok(vec![Item::Str(st.replace(&pat, &rep))])
            }
            "matches" | "matchesFull" | "replaceMatches" => {
                arity(name, args, 1, 2)?;
                let Some(st) = self.str_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let Some(pat) = single_str(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                let pattern = if name == "matchesFull" {
                    format!("^(?:{pat})$")
                } else {
                    format!("(?s){pat}")
                };
                let re = cached_regex(&pattern)?;
                if name == "replaceMatches" {
                    arity(name, args, 2, 2)?;
                    let Some(rep) = single_str(&self.arg(&args[1], s)?, model)? else {
                        return Ok(Vec::new());
                    };
                    if pat.is_empty() {
                        return Ok(vec![Item::Str(st)]);
                    }
                    return Ok(vec![Item::Str(
                        re.replace_all(&st, rep.as_str()).into_owned(),
                    )]);
                }
                bool1(re.is_match(&st))
            }
            "split" => {
                arity(name, args, 1, 1)?;
                let Some(st) = self.str_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let Some(sep) = single_str(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                Ok(st
                    .split(sep.as_str())
                    .map(|p| Item::Str(p.to_string()))
                    .collect())
            }
            "join" => {
                let sep = match args.first() {
                    Some(a) => single_str(&self.arg(a, s)?, model)?.unwrap_or_default(),
                    None => String::new(),
                };
                let mut parts = Vec::new();
                for i in &input {
                    match to_system(i, model) {
                        Some(Item::Str(s)) => parts.push(s),
                        _ => return Err(exec("join() は文字列のみ / join() needs strings")),
                    }
                }
                Ok(vec![Item::Str(parts.join(&sep))])
            }
            "encode" | "decode" => {
                arity(name, args, 1, 1)?;
                let Some(st) = self.str_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let Some(fmt) = single_str(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                let std = base64::engine::general_purpose::STANDARD;
                let url = base64::engine::general_purpose::URL_SAFE;
                let out = if name == "encode" {
                    match fmt.as_str() {
                        "base64" => Some(std.encode(st.as_bytes())),
                        "urlbase64" => Some(url.encode(st.as_bytes())),
                        "hex" => Some(st.bytes().map(|b| format!("{b:02x}")).collect()),
                        _ => None,
                    }
                } else {
                    let bytes = match fmt.as_str() {
                        "base64" => std.decode(st.as_bytes()).ok(),
                        "urlbase64" => url.decode(st.as_bytes()).ok(),
                        "hex" => (0..st.len())
                            .step_by(2)
                            .map(|i| {
                                st.get(i..i + 2)
                                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                            })
                            .collect::<Option<Vec<u8>>>(),
                        _ => None,
                    };
                    bytes.and_then(|b| String::from_utf8(b).ok())
                };
                Ok(out.map(Item::Str).into_iter().collect())
            }
            "escape" | "unescape" => {
                arity(name, args, 1, 1)?;
                let Some(st) = self.str_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let Some(fmt) = single_str(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                let out = match (name, fmt.as_str()) {
                    ("escape", "html") => Some(
                        st.replace('&', "&amp;")
                            .replace('<', "&lt;")
                            .replace('>', "&gt;")
                            .replace('"', "&quot;")
                            .replace('\'', "&#39;"),
                    ),
                    ("unescape", "html") => Some(
                        st.replace("&lt;", "<")
                            .replace("&gt;", ">")
                            .replace("&quot;", "\"")
                            .replace("&#39;", "'")
                            .replace("&amp;", "&"),
                    ),
                    ("escape", "json") => {
                        let j = serde_json::to_string(&st).unwrap_or_default();
                        Some(j[1..j.len().saturating_sub(1)].to_string())
                    }
                    ("unescape", "json") => Some(json_unescape(&st)),
                    _ => None,
                };
                Ok(out.map(Item::Str).into_iter().collect())
            }
            // Math
            "abs" | "ceiling" | "floor" | "truncate" | "exp" | "ln" | "sqrt" => {
                let Some(v) = self.num_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let d = match &v {
                    Item::Int(i) | Item::Long(i) => Decimal::from(*i),
                    Item::Dec(d) => *d,
                    Item::Quantity(q, u) if name == "abs" => {
                        return Ok(vec![Item::Quantity(q.abs(), u.clone())])
                    }
                    _ => return Err(exec(format!("{name}() は数値のみ / needs a number"))),
                };
                let r: Option<Item<'a>> = match name {
                    "abs" => Some(match v {
                        Item::Int(i) => Item::Int(i.abs()),
                        _ => Item::Dec(d.abs()),
                    }),
                    "ceiling" => d.ceil().to_i64().map(Item::Int),
                    "floor" => d.floor().to_i64().map(Item::Int),
                    "truncate" => d.trunc().to_i64().map(Item::Int),
                    "exp" => d.checked_exp().map(|x| Item::Dec(x.normalize())),
                    "ln" => {
                        if d <= Decimal::ZERO {
                            None
                        } else {
                            d.checked_ln().map(|x| Item::Dec(x.normalize()))
                        }
                    }
                    _ => {
                        if d < Decimal::ZERO {
                            None
                        } else {
                            d.sqrt().map(|x| Item::Dec(x.normalize()))
                        }
                    }
                };
                Ok(r.into_iter().collect())
            }
            "log" | "power" => {
                arity(name, args, 1, 1)?;
                let Some(v) = self.num_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let a = self.arg(&args[0], s)?;
                let Some(b) = single(&a, name)?.and_then(|x| to_system(x, model)) else {
                    return Ok(Vec::new());
                };
                let to_d = |i: &Item<'_>| match i {
                    Item::Int(x) | Item::Long(x) => Some(Decimal::from(*x)),
                    Item::Dec(d) => Some(*d),
                    _ => None,
                };
                let (Some(x), Some(y)) = (to_d(&v), to_d(&b)) else {
                    return Err(exec("数値が必要です / needs numbers"));
                };
                if name == "log" {
                    let (Some(lx), Some(ly)) = (x.to_f64().map(f64::ln), y.to_f64().map(f64::ln))
                    else {
                        return Ok(Vec::new());
                    };
                    let r = lx / ly;
                    return Ok(Decimal::from_f64(r)
                        .map(|d| Item::Dec(d.round_dp(15).normalize()))
                        .into_iter()
                        .collect());
                }
                if let (Item::Int(bx), Item::Int(by)) = (&v, &b) {
                    if *by >= 0 {
                        return Ok(u32::try_from(*by)
                            .ok()
                            .and_then(|e| bx.checked_pow(e))
                            .filter(|r| *r <= i32::MAX as i64 && *r >= i32::MIN as i64)
                            .map(Item::Int)
                            .into_iter()
                            .collect());
                    }
                }
                let r = x.to_f64().zip(y.to_f64()).map(|(a, b)| a.powf(b));
                Ok(r.filter(|f| f.is_finite())
                    .and_then(Decimal::from_f64)
                    .map(|d| Item::Dec(d.normalize()))
                    .into_iter()
                    .collect())
            }
            "round" => {
                let Some(v) = self.num_input(&input, name)? else {
                    return Ok(Vec::new());
                };
                let p = match args.first() {
                    Some(a) => single_int(&self.arg(a, s)?, model)?.unwrap_or(0),
                    None => 0,
                };
                if p < 0 {
                    return Err(exec("round() の精度は 0 以上 / precision must be >= 0"));
                }
                let d = match v {
                    Item::Int(i) | Item::Long(i) => Decimal::from(i),
                    Item::Dec(d) => d,
                    _ => return Err(exec("round() は数値のみ / needs a number")),
                };
                Ok(vec![Item::Dec(d.round_dp_with_strategy(
                    p as u32,
                    rust_decimal::RoundingStrategy::MidpointAwayFromZero,
                ))])
            }
            // Precision and boundaries
            "precision" => match single(&input, name)?.and_then(|x| to_system(x, model)) {
                None => Ok(Vec::new()),
                Some(Item::Dec(d)) => Ok(vec![Item::Int(decimal_precision(&d) as i64)]),
                Some(Item::Int(_)) => Ok(vec![Item::Int(0)]),
                Some(Item::Date(d) | Item::DateTime(d)) => Ok(vec![Item::Int(match d.precision {
                    Precision::Year => 4,
                    Precision::Month => 6,
                    Precision::Day => 8,
                    Precision::Hour => 10,
                    Precision::Minute => 12,
                    Precision::Second => 14,
                    Precision::Millisecond => 17,
                })]),
                Some(Item::Time(t)) => Ok(vec![Item::Int(match t.precision {
                    Precision::Hour => 2,
                    Precision::Minute => 4,
                    Precision::Second => 6,
                    _ => 9,
                })]),
                _ => Err(exec(
                    "precision() の対象外 / precision() not defined for this type",
                )),
            },
            "lowBoundary" | "highBoundary" => {
                let p = match args.first() {
                    Some(a) => single_int(&self.arg(a, s)?, model)?,
                    None => None,
                };
                let Some(v) = single(&input, name)?.and_then(|x| to_system(x, model)) else {
                    return Ok(Vec::new());
                };
                Ok(super::boundary::boundary(&v, name == "highBoundary", p)
                    .into_iter()
                    .collect())
            }
            "comparable" => {
                arity(name, args, 1, 1)?;
                let a = single(&input, name)?.and_then(|x| to_system(x, model));
                let bs = self.arg(&args[0], s)?;
                let b = single(&bs, name)?.and_then(|x| to_system(x, model));
                match (a, b) {
                    (Some(Item::Quantity(_, au)), Some(Item::Quantity(bv, bu))) => {
                        bool1(au == bu || super::ucum::convert(bv, &bu, &au).is_some())
                    }
                    (Some(_), Some(_)) => bool1(false),
                    _ => Ok(Vec::new()),
                }
            }
            // Tree navigation
            "children" => {
                let mut out = Vec::new();
                for i in &input {
                    self.children(i, &mut out);
                }
                Ok(out)
            }
            "descendants" => {
                let mut out = Vec::new();
                let mut frontier = input;
                while !frontier.is_empty() {
                    let mut next = Vec::new();
                    for i in &frontier {
                        self.children(i, &mut next);
                    }
                    out.extend(next.iter().cloned());
                    frontier = next;
                }
                Ok(out)
            }
            // Utility
            "trace" => Ok(input),
            "now" => {
                let n = self.now();
                let s = n.format("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string();
                Ok(DateTime::parse(&s, false)
                    .map(Item::DateTime)
                    .into_iter()
                    .collect())
            }
            "today" => {
                let s = self.now().format("%Y-%m-%d").to_string();
                Ok(DateTime::parse(&s, false)
                    .map(Item::Date)
                    .into_iter()
                    .collect())
            }
            "timeOfDay" => {
                let s = self.now().format("%H:%M:%S%.3f").to_string();
                Ok(Time::parse(&s, false).map(Item::Time).into_iter().collect())
            }
            "type" => Ok(input
                .iter()
                .map(|i| match i {
                    Item::Node(n) => {
                        Item::TypeInfo("FHIR".into(), model.type_name(n.ty).to_string())
                    }
                    other => Item::TypeInfo(
                        "System".into(),
                        super::eval::system_type_name(other)
                            .unwrap_or("Any")
                            .to_string(),
                    ),
                })
                .collect()),
            "aggregate" => {
                arity(name, args, 1, 2)?;
                let mut total = match args.get(1) {
                    Some(init) => self.arg(init, s)?,
                    None => Vec::new(),
                };
                for (i, item) in input.iter().enumerate() {
                    let scope = Scope {
                        this: vec![item.clone()],
                        index: Some(i as i64),
                        total: Some(total),
                    };
                    total = self.eval(&args[0], &scope)?;
                }
                Ok(total)
            }
            "sort" => {
                let mut keyed: Vec<(Vec<Coll<'a>>, Item<'a>)> = Vec::new();
                for (i, item) in input.iter().enumerate() {
                    let scope = Scope {
                        this: vec![item.clone()],
                        index: Some(i as i64),
                        total: None,
                    };
                    let mut keys = Vec::new();
                    for a in args {
                        let inner = match a {
                            Expr::Neg(e) => e.as_ref(),
                            e => e,
                        };
                        keys.push(self.eval(inner, &scope)?);
                    }
                    keyed.push((keys, item.clone()));
                }
                let desc: Vec<bool> = args.iter().map(|a| matches!(a, Expr::Neg(_))).collect();
                let mut err = None;
                keyed.sort_by(|(ka, a), (kb, b)| {
                    if args.is_empty() {
                        return item_cmp(a, b, model)
                            .ok()
                            .flatten()
                            .unwrap_or(Ordering::Equal);
                    }
                    for (i, (x, y)) in ka.iter().zip(kb).enumerate() {
                        let o = match (x.first(), y.first()) {
                            (None, None) => Ordering::Equal,
                            // Items without a key sort after those with one.
                            (None, Some(_)) => Ordering::Greater,
                            (Some(_), None) => Ordering::Less,
                            (Some(x), Some(y)) => match item_cmp(x, y, model) {
                                Ok(o) => o.unwrap_or(Ordering::Equal),
                                Err(e) => {
                                    err = Some(e);
                                    Ordering::Equal
                                }
                            },
                        };
                        let o = if desc[i] { o.reverse() } else { o };
                        if o != Ordering::Equal {
                            return o;
                        }
                    }
                    Ordering::Equal
                });
                if let Some(e) = err {
                    return Err(e);
                }
                Ok(keyed.into_iter().map(|(_, i)| i).collect())
            }
            // FHIR additions
            "extension" => {
                arity(name, args, 1, 1)?;
                let Some(url) = single_str(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for i in &input {
                    let mut exts = Vec::new();
                    if let Item::Node(n) = i {
                        let obj = if model.is_primitive(model.type_name(n.ty)) {
                            n.ext
                        } else {
                            n.value
                        };
                        if let Some(Value::Array(a)) = obj.and_then(|o| o.member("extension")) {
                            for e in a {
                                exts.push(Item::Node(Node {
                                    value: Some(e),
                                    ext: None,
                                    ty: "Extension",
                                }));
                            }
                        }
                    }
                    out.extend(exts.into_iter().filter(|e| {
                        match e {
                            Item::Node(n) => {
                                n.value
                                    .and_then(|v| v.member("url"))
                                    .and_then(Value::as_str)
                                    == Some(url.as_str())
                            }
                            _ => false,
                        }
                    }));
                }
                Ok(out)
            }
            "hasValue" => match input.as_slice() {
                [Item::Node(n)] => {
                    bool1(model.is_primitive(model.type_name(n.ty)) && n.value.is_some())
                }
                [x] => bool1(!matches!(x, Item::Node(_))),
                _ => bool1(false),
            },
            "getValue" => match input.as_slice() {
                [x @ Item::Node(n)]
                    if model.is_primitive(model.type_name(n.ty)) && n.value.is_some() =>
                {
                    Ok(to_system(x, model).into_iter().collect())
                }
                _ => Ok(Vec::new()),
            },
            "htmlChecks" => {
                let ok = input.iter().all(|i| match to_system(i, model) {
                    Some(Item::Str(h)) => crate::xhtml::is_safe_narrative(&h),
                    _ => true,
                });
                bool1(ok)
            }
            "resolve" => {
                let mut out = Vec::new();
                for i in &input {
                    let reference = match to_system(i, model) {
                        Some(Item::Str(s)) => Some(s),
                        Some(Item::Node(n)) => n
                            .value
                            .and_then(|v| v.member("reference"))
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        _ => None,
                    };
                    if let Some(r) = reference {
                        if let Some(v) = self.resolve_reference(&r) {
                            out.push(Item::resource(v));
                        }
                    }
                }
                Ok(out)
            }
            "memberOf" => {
                arity(name, args, 1, 1)?;
                let Some(vs) = single_str(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                let Some(term) = self.ctx.terminology else {
                    return Ok(Vec::new());
                };
                let Some(x) = single(&input, name)? else {
                    return Ok(Vec::new());
                };
                let codings: Vec<(Option<String>, String)> = match x {
                    Item::Node(n) if matches!(model.type_name(n.ty), "Coding") => n
                        .value
                        .and_then(|v| {
                            Some((
                                v.member("system")
                                    .and_then(Value::as_str)
                                    .map(str::to_string),
                                v.member("code")?.as_str()?.to_string(),
                            ))
                        })
                        .into_iter()
                        .collect(),
                    Item::Node(n) if matches!(model.type_name(n.ty), "CodeableConcept") => n
                        .value
                        .and_then(|v| v.member("coding"))
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|c| {
                                    Some((
                                        c.member("system")
                                            .and_then(Value::as_str)
                                            .map(str::to_string),
                                        c.member("code")?.as_str()?.to_string(),
                                    ))
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    other => match to_system(other, model) {
                        Some(Item::Str(c)) => vec![(None, c)],
                        _ => Vec::new(),
                    },
                };
                let mut any_known = false;
                for (sys, code) in codings {
                    match term.member_of(&vs, sys.as_deref(), &code) {
                        Some(true) => return bool1(true),
                        Some(false) => any_known = true,
                        None => {}
                    }
                }
                if any_known {
                    bool1(false)
                } else {
                    Ok(Vec::new())
                }
            }
            "conformsTo" => {
                arity(name, args, 1, 1)?;
                let Some(url) = single_str(&self.arg(&args[0], s)?, model)? else {
                    return Ok(Vec::new());
                };
                let Some(Item::Node(n)) = single(&input, name)? else {
                    return Ok(Vec::new());
                };
                let Some(v) = n.value else {
                    return Ok(Vec::new());
                };
                let Some(p) = self.ctx.profiles else {
                    return Err(exec(
                        "conformsTo() はプロファイル検査器が必要 / no profile checker",
                    ));
                };
                match p.conforms_to(v, &url) {
                    Some(b) => bool1(b),
                    None => Err(exec(format!("不明なプロファイル / unknown profile {url}"))),
                }
            }
            "elementDefinition" | "slice" | "checkModifiers" => Ok(input),
            _ => Err(FhirPathError::Semantic(format!(
                "不明な関数 / unknown function {name}()"
            ))),
        }
    }

    /// Checks that a type name names a FHIR or System type.
    fn known_type(&self, t: String) -> R<String> {
        let model = self.model();
        let bare = t
            .strip_prefix("FHIR.")
            .or_else(|| t.strip_prefix("System."))
            .unwrap_or(&t);
        const SYSTEM: &[&str] = &[
            "Boolean", "String", "Integer", "Long", "Decimal", "Date", "DateTime", "Time",
            "Quantity",
        ];
        if model.get(bare).is_some() || model.is_primitive(bare) || SYSTEM.contains(&bare) {
            Ok(t)
        } else {
            Err(exec(format!("不明な型 / unknown type {t}")))
        }
    }

    fn now(&self) -> chrono::DateTime<chrono::FixedOffset> {
        self.ctx
            .now
            .unwrap_or_else(|| chrono::Local::now().fixed_offset())
    }

    fn conv(&self, name: &str, v: Option<Item<'a>>) -> R<Coll<'a>> {
        if name.starts_with("convertsTo") {
            bool1(v.is_some())
        } else {
            Ok(v.into_iter().collect())
        }
    }

    /// Finds the resource a reference points to: `#id` in the current resource's `contained`, otherwise an
    /// entry of the root Bundle by `fullUrl` or `Type/id`.
    fn resolve_reference(&self, r: &str) -> Option<&'a Value> {
        if let Some(id) = r.strip_prefix('#') {
            let res = self.ctx.root_resource.or(self.ctx.resource)?;
            return res
                .member("contained")?
                .as_array()?
                .iter()
                .find(|c| c.member("id").and_then(Value::as_str) == Some(id));
        }
        let root = self.ctx.bundle.or(self.ctx.root_resource)?;
        let entries = root.member("entry")?.as_array()?;
        for e in entries {
            let Some(res) = e.member("resource") else {
                continue;
            };
            if e.member("fullUrl").and_then(Value::as_str) == Some(r) {
                return Some(res);
            }
            let rt = res
                .member("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("");
            let id = res.member("id").and_then(Value::as_str).unwrap_or("");
            if !id.is_empty() && (r == format!("{rt}/{id}") || r.ends_with(&format!("/{rt}/{id}")))
            {
                return Some(res);
            }
        }
        None
    }
}

fn json_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                if let Some(ch) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(ch);
                }
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Compiled regular expressions by pattern: invariants run the same `matches()` on every resource.
fn cached_regex(pattern: &str) -> R<std::sync::Arc<regex::Regex>> {
    use std::collections::HashMap;
    use std::sync::{Arc, OnceLock, RwLock};
    static CACHE: OnceLock<RwLock<HashMap<String, Arc<regex::Regex>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| RwLock::new(HashMap::new()));
    if let Some(r) = cache.read().ok().and_then(|c| c.get(pattern).cloned()) {
        return Ok(r);
    }
    let re = Arc::new(
        regex::Regex::new(pattern)
            .map_err(|e| exec(format!("正規表現が不正です / invalid regex: {e}")))?,
    );
    if let Ok(mut c) = cache.write() {
        // Bounded: patterns come from profiles, but expressions can come from users too.
        if c.len() > 4096 {
            c.clear();
        }
        c.insert(pattern.to_string(), re.clone());
    }
    Ok(re)
}
