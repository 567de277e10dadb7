//! Search index values, extracted from resources by the SearchParameter definitions' FHIRPath.
//!
//! Every SearchParameter of the loaded packages whose `base` names a resource type is compiled once; on
//! write, its expression is evaluated on the resource and each value is reduced to rows of one of the
//! index tables (token, string, date range, reference, number, uri).

use std::collections::HashMap;
use std::sync::Arc;

use kizuna_fhir::fhirpath::{DateTime, EvalContext, FhirPath, Item, Precision};
use kizuna_fhir::Registry;
use serde_json::Value;

/// The kinds of search parameter the index stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// token
    Token,
    /// string
    String,
    /// date
    Date,
    /// reference
    Reference,
    /// number and quantity values
    Number,
    /// uri
    Uri,
}

/// A compiled search parameter.
#[derive(Debug, Clone)]
pub struct SearchParam {
    /// The code used in queries (`code`, `patient`, `birthdate`).
    pub code: String,
    /// Its type.
    pub kind: ParamType,
    /// The expression.
    pub expr: Arc<FhirPath>,
}

/// Rewrites `where(resolve() is Type)` into a test of the reference text. A stored resource is
/// indexed on its own, with no Bundle to resolve against, and the type in `Type/id` (relative or
/// absolute) is what the FHIR search spec matches on — so `Condition?patient=` finds Conditions
/// whose subject is a Patient.
pub fn without_resolve(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find("where(resolve() is ") {
        let after = &rest[i + "where(resolve() is ".len()..];
        let Some(end) = after.find(')') else {
            break;
        };
        let ty = &after[..end];
        if !ty.chars().all(|c| c.is_ascii_alphanumeric()) {
            break;
        }
        out.push_str(&rest[..i]);
        out.push_str(&format!(
            "where(reference.startsWith('{ty}/') or reference.contains('/{ty}/'))"
        ));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// One extracted index row.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// system, code (system may be empty).
    Token(String, String),
    /// Normalised string (lower case, whitespace folded) for `:contains`/prefix, and the exact text.
    String(String, String),
    /// Range in epoch milliseconds, inclusive.
    Date(i64, i64),
    /// Target type and id (or the full reference when it is not `Type/id`).
    Reference(String, String),
    /// Numeric value.
    Number(f64),
    /// URI.
    Uri(String),
}

/// The search parameters of every resource type.
#[derive(Debug, Default)]
pub struct Indexer {
    by_type: HashMap<String, Vec<SearchParam>>,
}

impl Indexer {
    /// Compiles the SearchParameters of a registry.
    pub fn new(reg: &Registry) -> Indexer {
        let mut by_type: HashMap<String, Vec<SearchParam>> = HashMap::new();
        for sp in reg.definitions_of("SearchParameter") {
            let kind = match sp.get("type").and_then(Value::as_str) {
                Some("token") => ParamType::Token,
                Some("string") => ParamType::String,
                Some("date") => ParamType::Date,
                Some("reference") => ParamType::Reference,
                Some("number") | Some("quantity") => ParamType::Number,
                Some("uri") => ParamType::Uri,
                _ => continue,
            };
            let (Some(code), Some(expr)) = (
                sp.get("code").and_then(Value::as_str),
                sp.get("expression").and_then(Value::as_str),
            ) else {
                continue;
            };
            let expr = without_resolve(expr);
            let Ok(parsed) = FhirPath::parse(&expr) else {
                continue;
            };
            let parsed = Arc::new(parsed);
            for base in sp
                .get("base")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let list = by_type.entry(base.to_string()).or_default();
                if !list.iter().any(|p| p.code == code) {
                    list.push(SearchParam {
                        code: code.to_string(),
                        kind,
                        expr: parsed.clone(),
                    });
                }
            }
        }
        Indexer { by_type }
    }

    /// The parameters of a type (including those on `Resource` and `DomainResource`).
    pub fn params<'a>(&'a self, rt: &'a str) -> impl Iterator<Item = &'a SearchParam> + 'a {
        ["Resource", "DomainResource", rt]
            .into_iter()
            .flat_map(move |t| self.by_type.get(t).into_iter().flatten())
    }

    /// Looks up one parameter of a type.
    pub fn param(&self, rt: &str, code: &str) -> Option<&SearchParam> {
        ["Resource", "DomainResource", rt]
            .into_iter()
            .filter_map(|t| self.by_type.get(t))
            .flatten()
            .find(|p| p.code == code)
    }

    /// All index rows of a resource: (parameter code, value).
    pub fn extract(&self, reg: &Registry, resource: &Value) -> Vec<(String, IndexValue)> {
        let rt = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("");
        let ctx = EvalContext::new(reg.model()).with_resource(resource);
        let mut out = Vec::new();
        for p in self.params(rt) {
            if matches!(p.code.as_str(), "_id" | "_lastUpdated") {
                continue;
            }
            let Ok(items) = p.expr.evaluate_resource(&ctx, resource) else {
                continue;
            };
            for item in &items {
                for v in values(p.kind, item, reg) {
                    out.push((p.code.clone(), v));
                }
            }
        }
        out
    }
}

/// Normalises a string for matching: lower case, whitespace folded.
pub fn normalise(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The inclusive epoch-millisecond range a date or date-time stands for. Times without a zone are read
/// in Japan Standard Time (+09:00), the service's zone.
pub fn date_range(d: &DateTime) -> Option<(i64, i64)> {
    let lo = edge(d, false)?;
    let hi = edge(d, true)?;
    Some((lo, hi))
}

fn edge(d: &DateTime, high: bool) -> Option<i64> {
    use chrono::{NaiveDate, TimeZone};
    let month = if d.precision >= Precision::Month {
        d.month
    } else if high {
        12
    } else {
        1
    };
    let last_day = |y: i32, m: u32| -> u32 {
        let next = if m == 12 {
            NaiveDate::from_ymd_opt(y + 1, 1, 1)
        } else {
            NaiveDate::from_ymd_opt(y, m + 1, 1)
        };
        next.and_then(|n| n.pred_opt())
            .map(|p| chrono::Datelike::day(&p))
            .unwrap_or(28)
    };
    let day = if d.precision >= Precision::Day {
        d.day
    } else if high {
        last_day(d.year, month)
    } else {
        1
    };
    let (h, mi, s, ms) = match d.precision {
        Precision::Year | Precision::Month | Precision::Day => {
            if high {
                (23, 59, 59, 999)
            } else {
                (0, 0, 0, 0)
            }
        }
        Precision::Hour => (
            d.hour,
            if high { 59 } else { 0 },
            if high { 59 } else { 0 },
            if high { 999 } else { 0 },
        ),
        Precision::Minute => (
            d.hour,
            d.minute,
            if high { 59 } else { 0 },
            if high { 999 } else { 0 },
        ),
        Precision::Second => (
            d.hour,
            d.minute,
            d.second.min(59),
            if high { 999 } else { 0 },
        ),
        Precision::Millisecond => (d.hour, d.minute, d.second.min(59), d.millis),
    };
    let naive = NaiveDate::from_ymd_opt(d.year, month, day)?.and_hms_milli_opt(h, mi, s, ms)?;
    let offset = chrono::FixedOffset::east_opt(d.tz.unwrap_or(9 * 60) * 60)?;
    Some(
        offset
            .from_local_datetime(&naive)
            .single()?
            .timestamp_millis(),
    )
}

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

fn values(kind: ParamType, item: &Item<'_>, reg: &Registry) -> Vec<IndexValue> {
    let model = reg.model();
    let (node_ty, v) = match item {
        Item::Node(n) => (model.type_name(n.ty).to_string(), n.value),
        _ => (String::new(), None),
    };
    let mut out = Vec::new();
    match kind {
        ParamType::Token => match (node_ty.as_str(), v) {
            ("Coding", Some(c)) => out.push(IndexValue::Token(
                s(c, "system").unwrap_or("").into(),
                s(c, "code").unwrap_or("").into(),
            )),
            ("CodeableConcept", Some(cc)) => {
                for c in cc
                    .get("coding")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out.push(IndexValue::Token(
                        s(c, "system").unwrap_or("").into(),
                        s(c, "code").unwrap_or("").into(),
                    ));
                }
            }
            ("Identifier", Some(i)) => out.push(IndexValue::Token(
                s(i, "system").unwrap_or("").into(),
                s(i, "value").unwrap_or("").into(),
            )),
            ("ContactPoint", Some(c)) => out.push(IndexValue::Token(
                s(c, "system").unwrap_or("").into(),
                s(c, "value").unwrap_or("").into(),
            )),
            (_, Some(Value::String(code))) => {
                out.push(IndexValue::Token(String::new(), code.clone()))
            }
            (_, Some(Value::Bool(b))) => out.push(IndexValue::Token(String::new(), b.to_string())),
            _ => {}
        },
        ParamType::String => match (node_ty.as_str(), v) {
            ("HumanName", Some(n)) | ("Address", Some(n)) => {
                let mut parts: Vec<String> = Vec::new();
                for k in [
                    "text",
                    "family",
                    "city",
                    "district",
                    "state",
                    "postalCode",
                    "country",
                ] {
                    if let Some(x) = s(n, k) {
                        parts.push(x.to_string());
                    }
                }
                for k in ["given", "prefix", "suffix", "line"] {
                    for x in n
                        .get(k)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                    {
                        parts.push(x.to_string());
                    }
                }
                for p in parts {
                    out.push(IndexValue::String(normalise(&p), p));
                }
            }
            (_, Some(Value::String(x))) => out.push(IndexValue::String(normalise(x), x.clone())),
            _ => {}
        },
        ParamType::Date => {
            let range = match (node_ty.as_str(), v) {
                ("Period", Some(p)) => {
                    let lo = s(p, "start")
                        .and_then(|x| DateTime::parse(x, false))
                        .and_then(|d| date_range(&d))
                        .map(|r| r.0)
                        .unwrap_or(i64::MIN / 2);
                    let hi = s(p, "end")
                        .and_then(|x| DateTime::parse(x, false))
                        .and_then(|d| date_range(&d))
                        .map(|r| r.1)
                        .unwrap_or(i64::MAX / 2);
                    Some((lo, hi))
                }
                (_, Some(Value::String(x))) => {
                    DateTime::parse(x, false).and_then(|d| date_range(&d))
                }
                _ => None,
            };
            if let Some((lo, hi)) = range {
                out.push(IndexValue::Date(lo, hi));
            }
        }
        ParamType::Reference => {
            let r = match v {
                Some(Value::Object(_)) => v.and_then(|x| s(x, "reference")).map(str::to_string),
                Some(Value::String(x)) => Some(x.clone()),
                _ => None,
            };
            if let Some(r) = r {
                let mut parts = r.rsplit('/');
                match (parts.next(), parts.next()) {
                    (Some(id), Some(t)) if t.starts_with(|c: char| c.is_ascii_uppercase()) => {
                        out.push(IndexValue::Reference(t.to_string(), id.to_string()))
                    }
                    _ => out.push(IndexValue::Reference(String::new(), r)),
                }
            }
        }
        ParamType::Number => {
            let n = match v {
                Some(Value::Number(n)) => n.as_f64(),
                Some(Value::Object(q)) => q.get("value").and_then(Value::as_f64),
                _ => None,
            };
            if let Some(n) = n {
                out.push(IndexValue::Number(n));
            }
        }
        ParamType::Uri => {
            if let Some(Value::String(x)) = v {
                out.push(IndexValue::Uri(x.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::without_resolve;

    #[test]
    fn resolve_is_becomes_a_reference_test() {
        assert_eq!(
            without_resolve("Condition.subject.where(resolve() is Patient) | X.y"),
            "Condition.subject.where(reference.startsWith('Patient/') or reference.contains('/Patient/')) | X.y"
        );
        assert_eq!(without_resolve("Patient.link.other"), "Patient.link.other");
        // Not a plain type name: left alone rather than half-rewritten.
        assert_eq!(
            without_resolve("a.where(resolve() is (x))"),
            "a.where(resolve() is (x))"
        );
    }
}
