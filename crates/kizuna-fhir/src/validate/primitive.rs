//! Formats of FHIR primitive values in JSON (R4 §2.24 and the JSON representation rules).

use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;

use crate::fhirpath::{DateTime, Precision, Time};

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| {
        Regex::new(pattern).unwrap_or_else(|_| Regex::new("^$").unwrap_or_else(|_| unreachable!()))
    })
}

/// Checks one JSON primitive against its FHIR type; `Err` has the Japanese and English reason.
pub fn check(ty: &str, v: &Value) -> Result<(), (String, String)> {
    let fail = |ja: &str, en: &str| Err((ja.to_string(), en.to_string()));
    static CODE: OnceLock<Regex> = OnceLock::new();
    static ID: OnceLock<Regex> = OnceLock::new();
    static OID: OnceLock<Regex> = OnceLock::new();
    static UUID: OnceLock<Regex> = OnceLock::new();
    static B64: OnceLock<Regex> = OnceLock::new();
    match ty {
        "boolean" => {
            if !v.is_boolean() {
                return fail(
                    "真偽値 (true/false) である必要があります",
                    "must be a JSON boolean",
                );
            }
        }
        "integer" | "positiveInt" | "unsignedInt" => {
            let Some(n) = v
                .as_i64()
                .filter(|_| v.is_number() && !v.to_string().contains(['.', 'e', 'E']))
            else {
                return fail("整数である必要があります", "must be a JSON integer");
            };
            if n > i32::MAX as i64 || n < i32::MIN as i64 {
                return fail("32 ビット整数の範囲外です", "out of 32-bit integer range");
            }
            if ty == "positiveInt" && n < 1 {
                return fail("1 以上である必要があります", "must be 1 or more");
            }
            if ty == "unsignedInt" && n < 0 {
                return fail("0 以上である必要があります", "must be 0 or more");
            }
        }
        "decimal" => {
            if !v.is_number() {
                return fail("数値である必要があります", "must be a JSON number");
            }
        }
        _ => {
            let Some(s) = v.as_str() else {
                return fail("文字列である必要があります", "must be a JSON string");
            };
            if s.is_empty() {
                return fail("空文字列は使えません", "must not be empty");
            }
            if ty != "xhtml" && ty != "markdown" && ty != "string" && s.trim() != s {
                return fail(
                    "前後に空白は使えません",
                    "must not have leading or trailing whitespace",
                );
            }
            let ok = match ty {
                "code" => re(&CODE, r"^[^\s]+( [^\s]+)*$").is_match(s),
                "id" => re(&ID, r"^[A-Za-z0-9\-\.]{1,64}$").is_match(s),
                "oid" => re(&OID, r"^urn:oid:[0-2](\.(0|[1-9][0-9]*))+$").is_match(s),
                "uuid" => re(
                    &UUID,
                    r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
                )
                .is_match(s),
                "uri" | "url" | "canonical" => !s.chars().any(char::is_whitespace),
                "base64Binary" => re(&B64, r"^(\s*([0-9a-zA-Z+/=]){4}\s*)+$").is_match(s),
                "date" => DateTime::parse(s, false)
                    .map(|d| !d.has_time())
                    .unwrap_or(false),
                "dateTime" => DateTime::parse(s, false)
                    .map(|d| !d.has_time() || (d.precision >= Precision::Second && d.tz.is_some()))
                    .unwrap_or(false),
                "instant" => DateTime::parse(s, false)
                    .map(|d| d.precision >= Precision::Second && d.tz.is_some())
                    .unwrap_or(false),
                "time" => Time::parse(s, false).is_some(),
                "xhtml" => crate::xhtml::is_safe_narrative(s),
                _ => true,
            };
            if !ok {
                let (ja, en) = match ty {
                    "date" => (
                        "日付の形式 (YYYY, YYYY-MM, YYYY-MM-DD) ではありません",
                        "not a valid date (YYYY, YYYY-MM or YYYY-MM-DD)",
                    ),
                    "dateTime" => (
                        "日時の形式ではありません (時刻にはタイムゾーンが必要)",
                        "not a valid dateTime (a time needs seconds and a time zone)",
                    ),
                    "instant" => (
                        "instant の形式ではありません (秒とタイムゾーンが必要)",
                        "not a valid instant (needs seconds and a time zone)",
                    ),
                    "xhtml" => (
                        "ナラティブに使えない内容があります",
                        "narrative contains content FHIR does not allow",
                    ),
                    _ => (
                        "値の形式が不正です",
                        "value does not match the type's format",
                    ),
                };
                return fail(
                    &format!("{ja} ({ty}: {})", short(s)),
                    &format!("{en} ({ty}: {})", short(s)),
                );
            }
        }
    }
    Ok(())
}

fn short(s: &str) -> String {
    let t: String = s.chars().take(40).collect();
    if t.len() < s.len() {
        format!("{t}…")
    } else {
        t
    }
}
