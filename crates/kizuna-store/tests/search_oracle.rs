//! The differential oracle for search: the store answers each generated query with SQL over its index
//! tables; this file answers the same query by walking every stored resource in memory, following the
//! FHIR R4 search rules written out here independently of the SQL compiler. The two must agree on the
//! set of matches (and, for `_sort`, on their order) for every parameter type and modifier, chains
//! and `_has`, on SQLite and on PostgreSQL.
//!
//! The data: the vendored JP-CLINS examples (entries of example Bundles stored as resources too), a
//! synthetic population's JP-CLINS submissions and documents, and a small linked graph (organisations,
//! practitioners, patients, encounters, observations, groups) so that two-level chains and nested
//! `_has` have something to find. Queries are drawn from the values actually stored, perturbed
//! (neighbouring dates and numbers, prefixes, other systems), so most are neither empty nor everything.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kizuna_fhir::fhirpath::{EvalContext, Item};
use kizuna_fhir::Registry;
use kizuna_store::index::{normalise, ParamType, SearchParam};
use kizuna_store::search::COUNT_CAP;
use kizuna_store::{SearchQuery, SortSpec, Store, Total, WriteOp};
use serde_json::{json, Value};

type Key = (String, String);

/// A fixed "now" for `ap` on dates: 2026-06-01T00:00:00Z.
const NOW_MS: i64 = 1_780_272_000_000;

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

fn examples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kizuna-fhir/data/examples")
}

fn json_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
}

/// Stores a Bundle's entries as resources (`urn:uuid` references rewritten) in one transaction.
async fn store_entries(s: &Store, b: &Value, out: &mut BTreeMap<Key, Value>) {
    let ops: Vec<WriteOp> = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["resource"].is_object())
        .map(|e| WriteOp::Create {
            resource: e["resource"].clone(),
            full_url: e["fullUrl"].as_str().map(str::to_string),
        })
        .collect();
    if ops.is_empty() {
        return;
    }
    for st in s.transaction(ops).await.unwrap_or_else(|e| panic!("{e}")) {
        if let Some(r) = st.resource {
            out.insert((st.resource_type, st.id), r);
        }
    }
}

async fn store_one(s: &Store, r: Value, out: &mut BTreeMap<Key, Value>) {
    let st = if r.get("id").and_then(Value::as_str).is_some() {
        s.update(r, None).await
    } else {
        s.create(r).await
    }
    .unwrap_or_else(|e| panic!("{e}"));
    if let Some(r) = st.resource {
        out.insert((st.resource_type, st.id), r);
    }
}

/// A small linked graph for chains and `_has`: 3 organisations, 4 practitioners, 12 patients (some
/// with a managing organisation and a GP), an encounter per patient at an organisation, observations
/// and conditions referring to both, and a Group of half the patients.
fn graph() -> Vec<Value> {
    let mut v = Vec::new();
    let orgs = ["東京中央病院", "Osaka Clinic", "ｻｸﾗ医院"];
    for (i, name) in orgs.iter().enumerate() {
        v.push(json!({"resourceType": "Organization", "id": format!("org-{i}"), "name": name,
            "identifier": [{"system": "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no", "value": format!("13188147{i}0")}],
            "active": i != 1}));
    }
    let prs = [
        ("山田", "太郎"),
        ("Suzuki", "Hanako"),
        ("ヤマダ", "ジロウ"),
        ("Ève", "Dupont"),
    ];
    for (i, (f, g)) in prs.iter().enumerate() {
        v.push(json!({"resourceType": "Practitioner", "id": format!("pr-{i}"),
            "name": [{"family": f, "given": [g]}], "gender": if i % 2 == 0 { "male" } else { "female" }}));
    }
    let codes = [
        ("8480-6", 120.0, "mm[Hg]"),
        ("8462-4", 80.5, "mm[Hg]"),
        ("29463-7", 61.25, "kg"),
    ];
    for p in 0..12 {
        let mut pat = json!({"resourceType": "Patient", "id": format!("gp-{p}"),
            "gender": (["male", "female", "other"][p % 3]),
            "birthDate": format!("{}-0{}-1{}", 1940 + p * 5, 1 + p % 9, p % 10),
            "name": [{"family": (["佐藤", "Sato", "鈴木", "ｻﾄｳ"][p % 4]), "given": [format!("名{p}")]}],
            "identifier": [{"system": "http://jpfhir.jp/fhir/clins/Idsystem/JP_Insurance_memberID",
                "value": format!("0613801{p}:1:{p}:00"),
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB"}]}}]});
        // `deceased` is computed: true for a date or `true`, false for `false` or nothing.
        match p {
            5 => pat["deceasedDateTime"] = json!("2023-03-01"),
            7 => pat["deceasedBoolean"] = json!(true),
            9 => pat["deceasedBoolean"] = json!(false),
            _ => {}
        }
        if p % 4 != 3 {
            pat["managingOrganization"] =
                json!({"reference": format!("Organization/org-{}", p % 3)});
        }
        if p % 3 != 2 {
            pat["generalPractitioner"] =
                json!([{"reference": format!("Practitioner/pr-{}", p % 4)}]);
        }
        v.push(pat);
        v.push(json!({"resourceType": "Encounter", "id": format!("enc-{p}"), "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": if p % 2 == 0 { "AMB" } else { "IMP" }},
            "subject": {"reference": format!("Patient/gp-{p}")},
            "serviceProvider": {"reference": format!("Organization/org-{}", (p + 1) % 3)},
            "period": {"start": format!("2024-0{}-1{}T09:00:00+09:00", 1 + p % 9, p % 10)}}));
        for (k, (code, val, unit)) in codes.iter().enumerate() {
            if (p + k) % 3 == 0 {
                continue;
            }
            v.push(json!({"resourceType": "Observation", "id": format!("gobs-{p}-{k}"), "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": format!("Item {code}")}], "text": format!("項目{k}")},
                "subject": {"reference": format!("Patient/gp-{p}")},
                "encounter": {"reference": format!("Encounter/enc-{p}")},
                "performer": [{"reference": format!("Practitioner/pr-{}", (p + k) % 4), "display": "x"}],
                "effectiveDateTime": format!("2024-0{}-1{}T10:{:02}:00+09:00", 1 + p % 9, p % 10, k * 7),
                "valueQuantity": {"value": val + p as f64, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}));
        }
        v.push(json!({"resourceType": "Condition", "id": format!("gcond-{p}"),
            "code": {"coding": [{"system": "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/ICD10-2013-full", "code": (["I10", "E11.9", "J45"][p % 3])}]},
            "subject": {"reference": format!("Patient/gp-{p}")},
            "encounter": {"reference": format!("Encounter/enc-{p}")},
            "recorder": {"reference": format!("Practitioner/pr-{}", p % 4), "identifier": {"system": "urn:test:staff", "value": format!("staff-{}", p % 4)}},
            "onsetPeriod": if p % 5 == 0 { json!({"start": "2019-04"}) } else { json!({"start": format!("20{:02}-03-01", 10 + p), "end": format!("20{:02}-12", 12 + p)}) }}));
    }
    for (i, pr) in [0.05, 0.125, 0.5, 0.73, 0.9].iter().enumerate() {
        v.push(
            json!({"resourceType": "RiskAssessment", "id": format!("risk-{i}"), "status": "final",
            "subject": {"reference": format!("Patient/gp-{i}")},
            "prediction": [{"probabilityDecimal": pr}]}),
        );
    }
    // Documents and a message about the patients, their first entries naming stored resources.
    for (i, p) in [1, 2, 6].iter().enumerate() {
        v.push(json!({"resourceType": "Bundle", "id": format!("gdoc-{i}"), "type": "document",
            "entry": [{"fullUrl": format!("urn:uuid:5b1c0d2e-0000-4000-8000-00000000000{i}"),
                "resource": {"resourceType": "Composition", "id": format!("gcomp-{i}"),
                "status": "final", "title": format!("診療情報提供書 {i}"),
                "type": {"coding": [{"system": "http://loinc.org", "code": (["57133-1", "18842-5"][i % 2])}]},
                "subject": {"reference": format!("Patient/gp-{p}")},
                "author": [{"reference": format!("Practitioner/pr-{}", p % 4)}],
                "date": format!("2024-0{}-01", 1 + i)}}]}));
    }
    v.push(
        json!({"resourceType": "Bundle", "id": "gmsg-1", "type": "message",
        "entry": [{"resource": {"resourceType": "MessageHeader", "id": "gmh-1",
            "eventCoding": {"system": "urn:kizuna:test:event", "code": "notify"},
            "source": {"endpoint": "urn:kizuna:test:source"},
            "focus": [{"reference": "Patient/gp-3"}]}}]}),
    );
    v.push(json!({"resourceType": "Group", "id": "grp-1", "type": "person", "actual": true,
        "member": (0..12).step_by(2).map(|p| json!({"entity": {"reference": format!("Patient/gp-{p}")}})).collect::<Vec<_>>()}));
    v
}

async fn load(s: &Store) -> BTreeMap<Key, Value> {
    let mut out = BTreeMap::new();
    // 1. The JP-CLINS examples: each file as it is, and the entries of example Bundles.
    let mut files = Vec::new();
    json_files(&examples_dir(), &mut files);
    assert!(files.len() >= 90, "examples: {}", files.len());
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let Ok(r) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if r["resourceType"] == "Bundle" {
            store_entries(s, &r, &mut out).await;
        }
        store_one(s, r, &mut out).await;
    }
    // 2. A synthetic population's submissions.
    let inst = kizuna_synth::population::institutions(5);
    for i in 0..30 {
        for (_, b) in kizuna_synth::sample_submissions(5, i, 3, &inst) {
            store_entries(s, &b, &mut out).await;
        }
    }
    // 3. The linked graph.
    for r in graph() {
        store_one(s, r, &mut out).await;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The oracle
// ---------------------------------------------------------------------------------------------

type AtomCache = std::cell::RefCell<HashMap<(Key, String), std::rc::Rc<Vec<Atom>>>>;

struct Oracle<'a> {
    reg: &'static Registry,
    store: &'a Store,
    all: &'a BTreeMap<Key, Value>,
    /// The resources inside stored ones (a Bundle's Composition under `composition`), keyed by
    /// their type and `{holder id}#{embedding parameter}`.
    embedded: BTreeMap<Key, Value>,
    /// Extracted values per (resource, param code), computed once.
    cache: AtomCache,
}

/// One value a parameter's expression yields, in the shape the matching rules need.
#[derive(Debug, Clone)]
enum Atom {
    Token {
        system: String,
        code: String,
        texts: Vec<String>,
        of_type: Vec<(String, String)>,
    },
    Str(String),
    Date(i64, i64),
    Number(f64),
    Quantity(f64, String, String, String),
    Ref {
        reference: Option<String>,
        identifier: Option<(String, String)>,
    },
    Uri(String),
    Composite(Vec<Vec<Atom>>),
}

fn st<'v>(v: &'v Value, k: &str) -> &'v str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// FHIR date, dateTime or instant → inclusive [lo, hi] in epoch ms; no zone means +09:00.
fn oracle_range(s: &str) -> Option<(i64, i64)> {
    use chrono::{FixedOffset, NaiveDate, TimeZone};
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let dp: Vec<&str> = date.split('-').collect();
    let y: i32 = dp.first()?.parse().ok()?;
    if dp.first()?.len() != 4 {
        return None;
    }
    let m: Option<u32> = dp.get(1).map(|x| x.parse().ok()).unwrap_or(Some(0));
    let d: Option<u32> = dp.get(2).map(|x| x.parse().ok()).unwrap_or(Some(0));
    let (m, d) = (m?, d?);
    let (mut tz_min, mut lo_t, mut hi_t) = (9 * 60, (0, 0, 0, 0), (23, 59, 59, 999));
    if let Some(t) = time {
        let (clock, zone) = if let Some(c) = t.strip_suffix('Z') {
            (c, Some(0))
        } else if let Some(i) = t.rfind(['+', '-']) {
            let z = &t[i..];
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let (h, mm) = z[1..].split_once(':')?;
            (
                &t[..i],
                Some(sign * (h.parse::<i32>().ok()? * 60 + mm.parse::<i32>().ok()?)),
            )
        } else {
            (t, None)
        };
        if let Some(z) = zone {
            tz_min = z;
        }
        let cp: Vec<&str> = clock.split(':').collect();
        let h: u32 = cp.first()?.parse().ok()?;
        let mi: u32 = cp.get(1)?.parse().ok()?;
        match cp.get(2) {
            None => {
                lo_t = (h, mi, 0, 0);
                hi_t = (h, mi, 59, 999);
            }
            Some(sec) => {
                let (sx, frac) = match sec.split_once('.') {
                    Some((a, b)) => (a, Some(b)),
                    None => (*sec, None),
                };
                let sx: u32 = sx.parse().ok()?;
                match frac {
                    Some(f) => {
                        let ms: u32 = format!("{f:0<3}")[..3].parse().ok()?;
                        lo_t = (h, mi, sx, ms);
                        hi_t = (h, mi, sx, ms);
                    }
                    None => {
                        lo_t = (h, mi, sx, 0);
                        hi_t = (h, mi, sx, 999);
                    }
                }
            }
        }
    }
    let (lm, hm) = if m == 0 { (1, 12) } else { (m, m) };
    let last = |yy: i32, mm: u32| {
        (28..=31)
            .rev()
            .find(|dd| NaiveDate::from_ymd_opt(yy, mm, *dd).is_some())
            .unwrap_or(28)
    };
    let (ld, hd) = if d == 0 { (1, last(y, hm)) } else { (d, d) };
    let off = FixedOffset::east_opt(tz_min * 60)?;
    let lo = off
        .from_local_datetime(
            &NaiveDate::from_ymd_opt(y, lm, ld)?
                .and_hms_milli_opt(lo_t.0, lo_t.1, lo_t.2, lo_t.3)?,
        )
        .single()?
        .timestamp_millis();
    let hi = off
        .from_local_datetime(
            &NaiveDate::from_ymd_opt(y, hm, hd)?
                .and_hms_milli_opt(hi_t.0, hi_t.1, hi_t.2, hi_t.3)?,
        )
        .single()?
        .timestamp_millis();
    Some((lo, hi))
}

/// Splits on an unescaped separator and unescapes each part (the oracle's own reading of FHIR escapes).
fn parts(v: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut esc = false;
    for c in v.chars() {
        if esc {
            if !matches!(c, ',' | '$' | '|' | '\\') && c != sep {
                cur.push('\\');
            }
            cur.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Comma-separated alternatives, each still escaped for the next level.
fn alternatives(v: &str) -> Vec<String> {
    split_keep(v, ',')
}

/// Splits on an unescaped separator, keeping escapes for the next level.
fn split_keep(v: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut esc = false;
    for c in v.chars() {
        if esc {
            cur.push(c);
            esc = false;
        } else if c == '\\' {
            cur.push(c);
            esc = true;
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn split_prefix(v: &str) -> (&str, &str) {
    for p in ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"] {
        if let Some(r) = v.strip_prefix(p) {
            if r.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.') {
                return (p, r);
            }
        }
    }
    ("eq", v)
}

/// A reference as (type, id-or-url), per the rules the spec gives: relative `Type/id`, absolute
/// URLs kept whole, versions dropped.
fn oracle_ref(r: &str) -> (String, String) {
    let r = r.split("/_history/").next().unwrap_or(r);
    let segs: Vec<&str> = r.split('/').collect();
    let is_type = |t: &str| {
        t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            && t.chars().all(|c| c.is_ascii_alphanumeric())
    };
    if r.contains("://") {
        let r = r.split('|').next().unwrap_or(r);
        let segs: Vec<&str> = r.split('/').collect();
        if segs.len() >= 2 && is_type(segs[segs.len() - 2]) && !segs[segs.len() - 1].is_empty() {
            return (segs[segs.len() - 2].to_string(), r.to_string());
        }
        return (String::new(), r.to_string());
    }
    if segs.len() == 2 && is_type(segs[0]) && !segs[1].is_empty() && !r.starts_with("urn:") {
        return (segs[0].to_string(), segs[1].to_string());
    }
    (String::new(), r.to_string())
}

/// The resources the embedding parameters (`Bundle.composition`: `Bundle.entry[0].resource`)
/// find in the stored ones, of the parameters' target types.
fn embedded_of(reg: &Registry, s: &Store, all: &BTreeMap<Key, Value>) -> BTreeMap<Key, Value> {
    let mut out = BTreeMap::new();
    for (k, res) in all {
        for sp in s.indexer().params(&k.0).filter(|p| p.embeds) {
            let ctx = EvalContext::new(reg.model()).with_resource(res);
            for it in sp.expr.evaluate_resource(&ctx, res).unwrap_or_default() {
                let Item::Node(n) = it else { continue };
                let Some(v) = n.value else { continue };
                let t = st(v, "resourceType");
                if t != k.0 && sp.targets.iter().any(|x| x == t) {
                    out.insert((t.to_string(), format!("{}#{}", k.1, sp.code)), v.clone());
                }
            }
        }
    }
    out
}

impl<'a> Oracle<'a> {
    /// A stored or an embedded resource.
    fn res(&self, key: &Key) -> &Value {
        match self.all.get(key) {
            Some(v) => v,
            None => &self.embedded[key],
        }
    }

    /// The embedded resources `key`'s parameter `code` holds.
    fn embedded_in(&self, key: &Key, code: &str) -> Vec<Key> {
        let id = format!("{}#{code}", key.1);
        self.embedded
            .keys()
            .filter(|k| k.1 == id)
            .cloned()
            .collect()
    }

    fn param(&self, rt: &str, code: &str) -> Option<&'a SearchParam> {
        self.store.indexer().param(rt, code)
    }

    fn atoms_of(&self, kind: ParamType, items: &[Item<'_>]) -> Vec<Atom> {
        let model = self.reg.model();
        let mut out = Vec::new();
        for it in items {
            // A computed value (`deceased`: `… exists() and … != false`) is its text as a code.
            if let (ParamType::Token, Item::Bool(b)) = (kind, it) {
                out.push(Atom::Token {
                    system: String::new(),
                    code: b.to_string(),
                    texts: vec![],
                    of_type: vec![],
                });
                continue;
            }
            let Item::Node(n) = it else { continue };
            let Some(v) = n.value else { continue };
            let ty = model.type_name(n.ty);
            match kind {
                ParamType::Token => {
                    let tok =
                        |c: &Value, code_key: &str, texts: Vec<String>, of_type| Atom::Token {
                            system: st(c, "system").to_string(),
                            code: st(c, code_key).to_string(),
                            texts,
                            of_type,
                        };
                    match (ty, v) {
                        ("CodeableConcept", _) => {
                            let mut texts: Vec<String> = Vec::new();
                            if let Some(t) = v.get("text").and_then(Value::as_str) {
                                texts.push(t.into());
                            }
                            let codings = v["coding"].as_array().cloned().unwrap_or_default();
                            for c in &codings {
                                if let Some(d) = c.get("display").and_then(Value::as_str) {
                                    texts.push(d.into());
                                }
                            }
                            for c in &codings {
                                out.push(tok(c, "code", texts.clone(), vec![]));
                            }
                            if codings.is_empty() && !texts.is_empty() {
                                // Text without a code: findable by :text only.
                                out.push(Atom::Token {
                                    system: "\u{0}".into(),
                                    code: "\u{0}".into(),
                                    texts,
                                    of_type: vec![],
                                });
                            }
                        }
                        ("Coding", _) => {
                            let texts = v
                                .get("display")
                                .and_then(Value::as_str)
                                .map(|d| vec![d.to_string()])
                                .unwrap_or_default();
                            out.push(tok(v, "code", texts, vec![]));
                        }
                        ("Identifier", _) => {
                            let of_type = v
                                .pointer("/type/coding")
                                .and_then(Value::as_array)
                                .into_iter()
                                .flatten()
                                .map(|c| {
                                    (
                                        format!("{}|{}", st(c, "system"), st(c, "code")),
                                        st(v, "value").to_string(),
                                    )
                                })
                                .collect();
                            out.push(tok(v, "value", vec![], of_type));
                        }
                        ("ContactPoint", _) => out.push(tok(v, "value", vec![], vec![])),
                        (_, Value::String(s)) => out.push(Atom::Token {
                            system: String::new(),
                            code: s.clone(),
                            texts: vec![],
                            of_type: vec![],
                        }),
                        (_, Value::Bool(b)) => out.push(Atom::Token {
                            system: String::new(),
                            code: b.to_string(),
                            texts: vec![],
                            of_type: vec![],
                        }),
                        _ => {}
                    }
                }
                ParamType::String => match (ty, v) {
                    ("HumanName" | "Address", o) => {
                        for k in [
                            "text",
                            "family",
                            "city",
                            "district",
                            "state",
                            "postalCode",
                            "country",
                        ] {
                            if let Some(s) = o.get(k).and_then(Value::as_str) {
                                out.push(Atom::Str(s.into()));
                            }
                        }
                        for k in ["given", "prefix", "suffix", "line"] {
                            for s in o[k]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(Value::as_str)
                            {
                                out.push(Atom::Str(s.into()));
                            }
                        }
                    }
                    (_, Value::String(s)) => out.push(Atom::Str(s.clone())),
                    _ => {}
                },
                ParamType::Date => match (ty, v) {
                    ("Period", p) => {
                        let lo = p
                            .get("start")
                            .and_then(Value::as_str)
                            .and_then(oracle_range)
                            .map(|r| r.0);
                        let hi = p
                            .get("end")
                            .and_then(Value::as_str)
                            .and_then(oracle_range)
                            .map(|r| r.1);
                        if lo.is_some() || hi.is_some() {
                            out.push(Atom::Date(
                                lo.unwrap_or(i64::MIN / 4),
                                hi.unwrap_or(i64::MAX / 4),
                            ));
                        }
                    }
                    ("Timing", t) => {
                        for e in t["event"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                        {
                            if let Some((lo, hi)) = oracle_range(e) {
                                out.push(Atom::Date(lo, hi));
                            }
                        }
                    }
                    (_, Value::String(s)) => {
                        if let Some((lo, hi)) = oracle_range(s) {
                            out.push(Atom::Date(lo, hi));
                        }
                    }
                    _ => {}
                },
                ParamType::Number => {
                    if let Some(x) = v.as_f64() {
                        out.push(Atom::Number(x));
                    }
                }
                ParamType::Quantity => {
                    if let Some(x) = v.get("value").and_then(Value::as_f64) {
                        if ty == "Money" {
                            let c = st(v, "currency").to_string();
                            out.push(Atom::Quantity(
                                x,
                                "urn:iso:std:iso:4217".into(),
                                c.clone(),
                                c,
                            ));
                        } else {
                            out.push(Atom::Quantity(
                                x,
                                st(v, "system").into(),
                                st(v, "code").into(),
                                st(v, "unit").into(),
                            ));
                        }
                    }
                }
                ParamType::Reference => {
                    // A reference parameter reads Reference elements and canonical/uri strings;
                    // a whole resource (Bundle.entry[0].resource) is not a reference.
                    let reference = match (ty, v) {
                        (_, Value::String(s)) => Some(s.clone()),
                        ("Reference", _) => v
                            .get("reference")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        _ => continue,
                    };
                    let identifier = v
                        .get("identifier")
                        .map(|i| (st(i, "system").to_string(), st(i, "value").to_string()));
                    out.push(Atom::Ref {
                        reference,
                        identifier,
                    });
                }
                ParamType::Uri => {
                    if let Value::String(s) = v {
                        out.push(Atom::Uri(s.clone()));
                        if ty == "canonical" {
                            if let Some((bare, _)) = s.split_once('|') {
                                out.push(Atom::Uri(bare.into()));
                            }
                        }
                    }
                }
                ParamType::Composite => {}
            }
        }
        out
    }

    fn atoms(&self, key: &Key, code: &str) -> std::rc::Rc<Vec<Atom>> {
        let ck = (key.clone(), code.to_string());
        if let Some(a) = self.cache.borrow().get(&ck) {
            return a.clone();
        }
        let res = self.res(key);
        let mut out = Vec::new();
        if let Some(sp) = self.param(&key.0, code).filter(|sp| sp.embeds) {
            // The embedding parameter names each embedded resource by type and id.
            out = self
                .embedded_in(key, &sp.code)
                .into_iter()
                .map(|k| Atom::Ref {
                    reference: Some(format!("{}/{}", k.0, st(self.res(&k), "id"))),
                    identifier: None,
                })
                .collect();
        } else if let Some(sp) = self.param(&key.0, code) {
            let ctx = EvalContext::new(self.reg.model()).with_resource(res);
            if let Ok(items) = sp.expr.evaluate_resource(&ctx, res) {
                if sp.kind == ParamType::Composite {
                    for it in &items {
                        let mut comps = Vec::new();
                        for c in &sp.components {
                            let mut vals = c
                                .expr
                                .evaluate(&ctx, vec![it.clone()])
                                .map(|v| self.atoms_of(c.kind, &v))
                                .unwrap_or_default();
                            // A text-only CodeableConcept has no code to pair with.
                            vals.retain(
                                |a| !matches!(a, Atom::Token { code, .. } if code == "\u{0}"),
                            );
                            comps.push(vals);
                        }
                        if comps.iter().all(|c| !c.is_empty()) {
                            out.push(Atom::Composite(comps));
                        }
                    }
                } else {
                    out = self.atoms_of(sp.kind, &items);
                }
            }
        }
        let rc = std::rc::Rc::new(out);
        self.cache.borrow_mut().insert(ck, rc.clone());
        rc
    }

    /// Does the resource match `key=value`? (`None`: the query is one the oracle does not answer.)
    fn matches(&self, key: &Key, pkey: &str, value: &str, depth: usize) -> bool {
        assert!(depth < 6);
        let rt = &key.0;
        if let Some(rest) = pkey.strip_prefix("_has:") {
            let mut it = rest.splitn(3, ':');
            let (src, refp, inner) = (
                it.next().unwrap_or(""),
                it.next().unwrap_or(""),
                it.next().unwrap_or(""),
            );
            return self.all.keys().filter(|k| k.0 == src).any(|sk| {
                self.atoms(sk, refp).iter().any(|a| match a {
                    Atom::Ref {
                        reference: Some(r), ..
                    } => oracle_ref(r) == (rt.clone(), key.1.clone()),
                    _ => false,
                }) && self.matches(sk, inner, value, depth + 1)
            });
        }
        if let Some(dot) = pkey.find('.') {
            let (link, rest) = (&pkey[..dot], &pkey[dot + 1..]);
            let (pname, restrict) = match link.split_once(':') {
                Some((p, t)) => (p, Some(t.to_string())),
                None => (link, None),
            };
            let next = rest.split(['.', ':']).next().unwrap_or(rest);
            if self.param(rt, pname).is_some_and(|sp| sp.embeds) {
                // The embedded resources are the chain's targets.
                return self.embedded_in(key, pname).iter().any(|k| {
                    restrict.as_ref().is_none_or(|t| *t == k.0)
                        && self.matches(k, rest, value, depth + 1)
                });
            }
            let allowed: Vec<String> = match restrict {
                Some(t) => vec![t],
                None => self
                    .param(rt, pname)
                    .map(|sp| sp.targets.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| {
                        matches!(next, "_id" | "_lastUpdated" | "_has")
                            || self.param(t, next).is_some()
                    })
                    .collect(),
            };
            return self.atoms(key, pname).iter().any(|a| {
                let Atom::Ref {
                    reference: Some(r), ..
                } = a
                else {
                    return false;
                };
                let target = oracle_ref(r);
                allowed.contains(&target.0)
                    && self.all.contains_key(&target)
                    && self.matches(&target, rest, value, depth + 1)
            });
        }
        let (name, modifier) = match pkey.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (pkey, None),
        };
        let res = self.res(key);
        if name == "_id" {
            return alternatives(value)
                .iter()
                .any(|v| parts(v, ',')[0] == st(res, "id"));
        }
        if name == "_lastUpdated" {
            let lu = res
                .pointer("/meta/lastUpdated")
                .and_then(Value::as_str)
                .and_then(oracle_range)
                .map(|r| r.0)
                .unwrap_or(0);
            return alternatives(value).iter().any(|v| date_match(v, lu, lu));
        }
        let Some(sp) = self.param(rt, name) else {
            panic!("oracle asked about unknown {rt}.{name}");
        };
        let atoms = self.atoms(key, name);
        if modifier == Some("missing") {
            let has = atoms.iter().any(|a| match a {
                // A CodeableConcept with only text has no token value to index.
                Atom::Token { code, .. } => code != "\u{0}",
                Atom::Ref { reference, .. } => reference.is_some(),
                _ => true,
            });
            return (value == "true") != has;
        }
        let comps = sp_kinds(sp);
        if modifier == Some("not") {
            return !alternatives(value).iter().any(|v| {
                atoms
                    .iter()
                    .any(|a| atom_match(sp.kind, None, a, v, &comps))
            });
        }
        alternatives(value).iter().any(|v| {
            atoms
                .iter()
                .any(|a| atom_match(sp.kind, modifier, a, v, &comps))
        })
    }
}

fn sp_kinds(sp: &SearchParam) -> Vec<ParamType> {
    sp.components.iter().map(|c| c.kind).collect()
}

fn date_match(v: &str, tlo: i64, thi: i64) -> bool {
    let (pre, rest) = split_prefix(v);
    let Some((lo, hi)) = oracle_range(rest) else {
        return false;
    };
    let within = tlo >= lo && thi <= hi;
    match pre {
        "eq" => within,
        "ne" => !within,
        "gt" => thi > hi,
        "lt" => tlo < lo,
        "ge" => thi > hi || within,
        "le" => tlo < lo || within,
        "sa" => tlo > hi,
        "eb" => thi < lo,
        _ => {
            let dist = if NOW_MS < lo {
                lo - NOW_MS
            } else if NOW_MS > hi {
                NOW_MS - hi
            } else {
                0
            };
            let gap = (dist / 10).max(86_400_000);
            thi >= lo - gap && tlo <= hi + gap
        }
    }
}

fn number_match(v: &str, x: f64) -> bool {
    let (pre, rest) = split_prefix(v);
    let Ok(n) = rest.parse::<f64>() else {
        return false;
    };
    let places = rest.split('.').nth(1).map(str::len).unwrap_or(0) as i32;
    let half = 0.5 * 10f64.powi(-places);
    match pre {
        "eq" => x >= n - half && x < n + half,
        "ne" => !(x >= n - half && x < n + half),
        "ap" => x >= n - (n * 0.1).abs() && x <= n + (n * 0.1).abs(),
        "lt" | "eb" => x < n,
        "gt" | "sa" => x > n,
        "le" => x <= n,
        _ => x >= n,
    }
}

fn atom_match(
    kind: ParamType,
    modifier: Option<&str>,
    a: &Atom,
    v: &str,
    comps: &[ParamType],
) -> bool {
    match (kind, a) {
        (
            ParamType::Token,
            Atom::Token {
                system,
                code,
                texts,
                of_type,
            },
        ) => match modifier {
            Some("text") => {
                let want = normalise(&parts(v, '\u{1}')[0]);
                texts.iter().any(|t| normalise(t).starts_with(&want))
            }
            Some("of-type") => {
                let p = parts(v, '|');
                p.len() == 3
                    && of_type
                        .iter()
                        .any(|(t, val)| *t == format!("{}|{}", p[0], p[1]) && *val == p[2])
            }
            _ => {
                if code == "\u{0}" {
                    return false;
                }
                let p = parts(v, '|');
                match p.as_slice() {
                    [c] => code == c,
                    [s, c] if s.is_empty() => system.is_empty() && code == c,
                    [s, c] if c.is_empty() => system == s,
                    [s, c] => system == s && code == c,
                    _ => false,
                }
            }
        },
        (ParamType::Token, _) => false,
        (ParamType::String, Atom::Str(s)) => {
            let want = parts(v, '\u{1}')[0].clone();
            match modifier {
                Some("exact") => *s == want,
                Some("contains") => normalise(s).contains(&normalise(&want)),
                _ => normalise(s).starts_with(&normalise(&want)),
            }
        }
        (ParamType::Date, Atom::Date(lo, hi)) => date_match(v, *lo, *hi),
        (ParamType::Number, Atom::Number(x)) => number_match(v, *x),
        (ParamType::Quantity, Atom::Quantity(x, sys, code, unit)) => {
            let p = parts(v, '|');
            match p.as_slice() {
                [n] => number_match(n, *x),
                [n, s, c] => {
                    number_match(n, *x)
                        && (s.is_empty() || s == sys)
                        && (c.is_empty()
                            || (if s.is_empty() {
                                c == code || c == unit
                            } else {
                                c == code
                            }))
                }
                _ => false,
            }
        }
        (
            ParamType::Reference,
            Atom::Ref {
                reference,
                identifier,
            },
        ) => {
            if modifier == Some("identifier") {
                let Some((sys, val)) = identifier else {
                    return false;
                };
                let p = parts(v, '|');
                return match p.as_slice() {
                    [c] => val == c,
                    [s, c] if s.is_empty() => sys.is_empty() && val == c,
                    [s, c] if c.is_empty() => sys == s,
                    [s, c] => sys == s && val == c,
                    _ => false,
                };
            }
            let Some(r) = reference else {
                return false;
            };
            // A reference to a contained resource names no resource a search can find (it
            // still makes the element present for `:missing`).
            if r.starts_with('#') {
                return false;
            }
            let (rt, rid) = oracle_ref(r);
            let (qt, qid) = oracle_ref(&parts(v, '\u{1}')[0]);
            match modifier {
                Some(t) if t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => {
                    (qt.is_empty() || qt == t) && rt == t && rid == qid
                }
                _ => {
                    if qt.is_empty() {
                        rid == qid
                    } else {
                        rt == qt && rid == qid
                    }
                }
            }
        }
        (ParamType::Uri, Atom::Uri(u)) => {
            let want = parts(v, '\u{1}')[0].clone();
            match modifier {
                Some("below") => u.starts_with(&want),
                Some("above") => !u.is_empty() && want.starts_with(u.as_str()),
                _ => *u == want,
            }
        }
        (ParamType::Composite, Atom::Composite(cs)) => {
            let p = split_keep(v, '$');
            p.len() == cs.len()
                && p.iter()
                    .zip(cs)
                    .zip(comps)
                    .all(|((pv, atoms), k)| atoms.iter().any(|a| atom_match(*k, None, a, pv, &[])))
        }
        _ => false,
    }
}

/// Escapes a literal for a query value.
fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if matches!(c, '\\' | ',' | '$' | '|') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Query generation
// ---------------------------------------------------------------------------------------------

/// One generated query and the category it exercises (type:modifier-or-prefix).
struct Q {
    rt: String,
    pairs: Vec<(String, String)>,
    category: String,
}

fn q(rt: &str, category: &str, pairs: &[(&str, String)]) -> Q {
    Q {
        rt: rt.to_string(),
        pairs: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        category: category.to_string(),
    }
}

/// A deterministic pseudo-random choice.
struct Pick(u64);
impl Pick {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn some<'t, T>(&mut self, v: &'t [T], n: usize) -> Vec<&'t T> {
        let mut out = Vec::new();
        if v.is_empty() {
            return out;
        }
        for _ in 0..n.min(v.len()) {
            let i = (self.next() % v.len() as u64) as usize;
            out.push(&v[i]);
        }
        out
    }
}

fn fmt_date(ms: i64, precision: usize) -> String {
    let jst = chrono::FixedOffset::east_opt(9 * 3600).unwrap_or_else(|| panic!("offset"));
    let t = chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .with_timezone(&jst);
    match precision {
        0 => t.format("%Y").to_string(),
        1 => t.format("%Y-%m").to_string(),
        2 => t.format("%Y-%m-%d").to_string(),
        3 => t.format("%Y-%m-%dT%H:%M:%S+09:00").to_string(),
        _ => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    }
}

fn generate(o: &Oracle<'_>) -> Vec<Q> {
    let mut pick = Pick(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::new();
    let types: BTreeSet<String> = o.all.keys().map(|k| k.0.clone()).collect();
    // Each type's parameters on its resources, then, asked on the same type, the parameters of
    // the resources it embeds (`Bundle?composition.type=…` from the Bundles' Compositions):
    // (type asked, key prefix, resources the values come from, their type).
    let mut scopes: Vec<(&String, String, Vec<&Key>, String)> = Vec::new();
    for rt in &types {
        scopes.push((
            rt,
            String::new(),
            o.all.keys().filter(|k| &k.0 == rt).collect(),
            rt.clone(),
        ));
        for sp in o.store.indexer().params(rt).filter(|p| p.embeds) {
            let held = format!("#{}", sp.code);
            for t in &sp.targets {
                let keys: Vec<&Key> = o
                    .embedded
                    .keys()
                    .filter(|k| &k.0 == t && k.1.ends_with(&held))
                    .collect();
                scopes.push((rt, format!("{}.", sp.code), keys, t.clone()));
            }
        }
    }
    // The embedded scopes pick with their own sequence, leaving the others' picks as they were.
    let mut embedded_pick = Pick(0x2545_F491_4F6C_DD1D);
    for (rt, prefix, keys, of) in &scopes {
        let pick = if prefix.is_empty() {
            &mut pick
        } else {
            &mut embedded_pick
        };
        let params: Vec<&SearchParam> = o.store.indexer().params(of).collect();
        for sp in params {
            if matches!(sp.code.as_str(), "_id" | "_lastUpdated") {
                continue;
            }
            let atoms: Vec<Atom> = keys
                .iter()
                .flat_map(|k| o.atoms(k, &sp.code).iter().cloned().collect::<Vec<_>>())
                .collect();
            let full = format!("{prefix}{}", sp.code);
            let code = full.as_str();
            if atoms.is_empty() {
                continue;
            }
            let embedded = if prefix.is_empty() { "" } else { "embedded:" };
            let cat = |m: &str| format!("{embedded}{}:{m}", sp.kind.name());
            out.push(q(
                rt,
                &cat("missing"),
                &[(&format!("{code}:missing"), "true".into())],
            ));
            out.push(q(
                rt,
                &cat("missing"),
                &[(&format!("{code}:missing"), "false".into())],
            ));
            // Typed identifiers are rare in the data: every one gets an :of-type query.
            for a in atoms
                .iter()
                .filter(|a| matches!(a, Atom::Token { of_type, .. } if !of_type.is_empty()))
                .take(3)
            {
                if let Atom::Token { of_type, .. } = a {
                    for (t, v) in of_type {
                        out.push(q(
                            rt,
                            &cat("of-type"),
                            &[(&format!("{code}:of-type"), format!("{t}|{}", escape(v)))],
                        ));
                    }
                }
            }
            for a in pick.some(&atoms, 4) {
                match a {
                    Atom::Token {
                        system,
                        code: c,
                        texts,
                        of_type,
                    } if c != "\u{0}" => {
                        out.push(q(rt, &cat("code"), &[(code, escape(c))]));
                        out.push(q(
                            rt,
                            &cat("system|code"),
                            &[(code, format!("{}|{}", escape(system), escape(c)))],
                        ));
                        out.push(q(rt, &cat("|code"), &[(code, format!("|{}", escape(c)))]));
                        out.push(q(
                            rt,
                            &cat("system|"),
                            &[(code, format!("{}|", escape(system)))],
                        ));
                        out.push(q(rt, &cat("not"), &[(&format!("{code}:not"), escape(c))]));
                        out.push(q(
                            rt,
                            &cat("or"),
                            &[(code, format!("{},{}", escape(c), "no-such-code"))],
                        ));
                        if let Some(t) = texts.first() {
                            let pre: String = t.chars().take(2).collect();
                            out.push(q(
                                rt,
                                &cat("text"),
                                &[(&format!("{code}:text"), escape(&pre.to_uppercase()))],
                            ));
                        }
                        let _ = of_type;
                    }
                    Atom::Str(s) => {
                        let chars: Vec<char> = s.chars().collect();
                        let pre: String = chars.iter().take(2).collect();
                        out.push(q(rt, &cat("prefix"), &[(code, escape(&pre))]));
                        out.push(q(
                            rt,
                            &cat("prefix"),
                            &[(code, escape(&pre.to_uppercase()))],
                        ));
                        out.push(q(
                            rt,
                            &cat("exact"),
                            &[(&format!("{code}:exact"), escape(s))],
                        ));
                        out.push(q(
                            rt,
                            &cat("exact"),
                            &[(&format!("{code}:exact"), escape(&s.to_lowercase()))],
                        ));
                        if chars.len() > 2 {
                            let mid: String = chars[1..chars.len().min(4)].iter().collect();
                            out.push(q(
                                rt,
                                &cat("contains"),
                                &[(&format!("{code}:contains"), escape(&mid))],
                            ));
                        }
                    }
                    Atom::Date(lo, hi) => {
                        let base = if *lo > i64::MIN / 8 { *lo } else { *hi };
                        for pre in ["eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap"] {
                            let prec = (pick.next() % 5) as usize;
                            let shift = [0i64, 86_400_000 * 40, -86_400_000 * 400]
                                [(pick.next() % 3) as usize];
                            let v = format!("{pre}{}", fmt_date(base + shift, prec));
                            out.push(q(rt, &cat(pre), &[(code, v)]));
                        }
                    }
                    Atom::Number(x) => {
                        for pre in ["", "ne", "lt", "gt", "le", "ge", "ap"] {
                            let v = format!(
                                "{pre}{}",
                                [*x, x + 1.0, x * 0.95][(pick.next() % 3) as usize]
                            );
                            out.push(q(
                                rt,
                                &cat(if pre.is_empty() { "eq" } else { pre }),
                                &[(code, v)],
                            ));
                        }
                    }
                    Atom::Quantity(x, sys, c, unit) => {
                        for pre in ["", "ne", "lt", "gt", "le", "ge", "ap"] {
                            let n = [*x, x + 1.0, (x * 0.95 * 100.0).round() / 100.0]
                                [(pick.next() % 3) as usize];
                            out.push(q(
                                rt,
                                &cat(if pre.is_empty() { "eq" } else { pre }),
                                &[(code, format!("{pre}{n}"))],
                            ));
                        }
                        out.push(q(
                            rt,
                            &cat("number|system|code"),
                            &[(code, format!("{x}|{}|{}", escape(sys), escape(c)))],
                        ));
                        out.push(q(
                            rt,
                            &cat("number||unit"),
                            &[(code, format!("{x}||{}", escape(unit)))],
                        ));
                        out.push(q(
                            rt,
                            &cat("number|system|code"),
                            &[(code, format!("ge{x}|other-system|{}", escape(c)))],
                        ));
                    }
                    Atom::Ref {
                        reference,
                        identifier,
                    } => {
                        if let Some(r) = reference {
                            let (t, id) = oracle_ref(r);
                            out.push(q(rt, &cat("Type/id"), &[(code, escape(r))]));
                            if !t.is_empty() && !id.contains("://") {
                                out.push(q(rt, &cat("id"), &[(code, escape(&id))]));
                                out.push(q(
                                    rt,
                                    &cat(":Type"),
                                    &[(&format!("{code}:{t}"), escape(&id))],
                                ));
                                out.push(q(
                                    rt,
                                    &cat(":Type"),
                                    &[(&format!("{code}:Basic"), escape(&id))],
                                ));
                            }
                        }
                        if let Some((s, v)) = identifier {
                            out.push(q(
                                rt,
                                &cat("identifier"),
                                &[(
                                    &format!("{code}:identifier"),
                                    format!("{}|{}", escape(s), escape(v)),
                                )],
                            ));
                        }
                    }
                    Atom::Uri(u) => {
                        out.push(q(rt, &cat("eq"), &[(code, escape(u))]));
                        let cut: String = u.chars().take(u.chars().count() * 2 / 3).collect();
                        out.push(q(
                            rt,
                            &cat("below"),
                            &[(&format!("{code}:below"), escape(&cut))],
                        ));
                        out.push(q(
                            rt,
                            &cat("above"),
                            &[(&format!("{code}:above"), escape(&format!("{u}/sub")))],
                        ));
                    }
                    Atom::Composite(cs) => {
                        // A quantity component as `ge`, and (a second round) in the other forms:
                        // `lt`, equal at its precision, with the unit's system and code, with the
                        // unit as written.
                        let has_quantity = sp_kinds(sp).contains(&ParamType::Quantity);
                        let forms = if has_quantity { 5 } else { 1 };
                        for form in 0..forms {
                            let mut vals = Vec::new();
                            for (atoms, k) in cs.iter().zip(sp_kinds(sp)) {
                                let v = match (k, atoms.first()) {
                                    (ParamType::Token, Some(Atom::Token { system, code, .. })) => {
                                        format!("{}|{}", escape(system), escape(code))
                                    }
                                    (
                                        ParamType::Quantity,
                                        Some(Atom::Quantity(x, sys, c, unit)),
                                    ) => match form {
                                        0 => format!("ge{x}"),
                                        1 => format!("lt{x}"),
                                        2 => format!("{x}"),
                                        3 => format!("{x}|{}|{}", escape(sys), escape(c)),
                                        _ => format!("{x}||{}", escape(unit)),
                                    },
                                    (ParamType::Date, Some(Atom::Date(lo, _))) => {
                                        format!("ge{}", fmt_date(*lo, 2))
                                    }
                                    (ParamType::String, Some(Atom::Str(s))) => escape(s),
                                    (
                                        ParamType::Reference,
                                        Some(Atom::Ref {
                                            reference: Some(r), ..
                                        }),
                                    ) => escape(r),
                                    (ParamType::Number, Some(Atom::Number(x))) => format!("{x}"),
                                    (ParamType::Uri, Some(Atom::Uri(u))) => escape(u),
                                    _ => String::new(),
                                };
                                vals.push(v);
                            }
                            out.push(q(rt, &cat("tuple"), &[(code, vals.join("$"))]));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    // Chains and _has over the linked graph (and the submissions' references).
    let chains: &[(&str, &str, &str)] = &[
        ("Observation", "subject.gender", "female"),
        ("Observation", "subject:Patient.birthdate", "lt1970"),
        ("Observation", "subject.name", "sato"),
        ("Observation", "subject.organization.name", "東京"),
        (
            "Observation",
            "subject:Patient.general-practitioner:Practitioner.family",
            "山田",
        ),
        (
            "Observation",
            "encounter.service-provider.name:exact",
            "Osaka Clinic",
        ),
        (
            "Observation",
            "encounter.subject.identifier",
            "http://jpfhir.jp/fhir/clins/Idsystem/JP_Insurance_memberID|06138013:1:3:00",
        ),
        ("Condition", "subject.organization.active", "true"),
        // Through the resource inside a Bundle, then on to stored ones.
        ("Bundle", "composition.subject.name", "sato"),
        ("Bundle", "composition.subject:Patient.gender", "female"),
        ("Bundle", "composition.patient.organization.name", "東京"),
        ("Bundle", "composition.author:Practitioner.family", "suzuki"),
        ("Bundle", "message.focus:Patient.birthdate", "lt1970"),
        ("Condition", "subject._id", "gp-1,gp-2"),
        ("Condition", "encounter.class", "AMB"),
        (
            "Condition",
            "subject.general-practitioner.gender:not",
            "male",
        ),
        ("Encounter", "subject._has:Condition:subject:code", "I10"),
        ("Patient", "_has:Observation:subject:code", "8480-6"),
        (
            "Patient",
            "_has:Observation:subject:value-quantity",
            "gt130",
        ),
        ("Patient", "_has:Condition:subject:code:not", "I10"),
        ("Patient", "_has:Group:member:_id", "grp-1"),
        (
            "Organization",
            "_has:Patient:organization:_has:Observation:subject:code",
            "29463-7",
        ),
        (
            "Organization",
            "_has:Encounter:service-provider:subject.gender",
            "male",
        ),
        (
            "Practitioner",
            "_has:Patient:general-practitioner:_has:Condition:subject:code",
            "E11.9,J45",
        ),
        (
            "Practitioner",
            "_has:Observation:performer:subject.name",
            "鈴木",
        ),
    ];
    for (rt, k, v) in chains {
        out.push(q(
            rt,
            if k.starts_with("_has") {
                "has"
            } else {
                "chain"
            },
            &[(k, v.to_string())],
        ));
    }
    // AND across parameters.
    out.push(q(
        "Observation",
        "and",
        &[
            ("code", "8480-6".into()),
            ("value-quantity", "gt125".into()),
        ],
    ));
    out.push(q(
        "Patient",
        "and",
        &[
            ("gender", "male,female".into()),
            ("birthdate", "ge1960".into()),
            ("name", "sa".into()),
        ],
    ));
    out.push(q(
        "Condition",
        "and",
        &[
            ("code", "I10".into()),
            ("subject.gender", "male".into()),
            ("onset-date", "ge2015".into()),
        ],
    ));
    out
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

fn sort_order(o: &Oracle<'_>, ids: &[Key], sort: &[(String, bool)]) -> Vec<String> {
    #[derive(PartialEq, PartialOrd)]
    enum SortVal {
        S(String),
        N(f64),
    }
    let val = |k: &Key, p: &str, desc: bool| -> Option<SortVal> {
        if p == "_id" {
            return Some(SortVal::S(k.1.clone()));
        }
        let vals: Vec<SortVal> = o
            .atoms(k, p)
            .iter()
            .filter_map(|a| match a {
                Atom::Token { code, .. } if code != "\u{0}" => Some(SortVal::S(code.clone())),
                Atom::Str(s) => Some(SortVal::S(normalise(s))),
                Atom::Date(lo, hi) => Some(SortVal::N(if desc { *hi as f64 } else { *lo as f64 })),
                Atom::Number(x) | Atom::Quantity(x, ..) => Some(SortVal::N(*x)),
                Atom::Ref {
                    reference: Some(r), ..
                } => Some(SortVal::S(oracle_ref(r).1)),
                Atom::Uri(u) => Some(SortVal::S(u.clone())),
                _ => None,
            })
            .collect();
        vals.into_iter().reduce(|a, b| {
            let a_first = if desc { a >= b } else { a <= b };
            if a_first {
                a
            } else {
                b
            }
        })
    };
    let mut v: Vec<&Key> = ids.iter().collect();
    v.sort_by(|a, b| {
        for (p, desc) in sort {
            let (x, y) = (val(a, p, *desc), val(b, p, *desc));
            let ord = match (x, y) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(_), None) => std::cmp::Ordering::Less,
                (Some(x), Some(y)) => {
                    let o = x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
                    if *desc {
                        o.reverse()
                    } else {
                        o
                    }
                }
            };
            if ord != std::cmp::Ordering::Equal {
                return ord;
            }
        }
        a.1.cmp(&b.1)
    });
    v.into_iter().map(|k| k.1.clone()).collect()
}

/// Every page of a search: the ids (checked to be disjoint across pages) and each page's total.
async fn search_all(
    s: &Store,
    rt: &str,
    mut sq: SearchQuery,
) -> Result<(BTreeSet<String>, Vec<Option<i64>>), kizuna_store::StoreError> {
    let mut ids = BTreeSet::new();
    let mut totals = Vec::new();
    loop {
        let page = s.search(rt, &sq).await?;
        totals.push(page.total);
        let n = page.resources.len() as i64;
        for r in page.resources {
            assert!(ids.insert(r.id.clone()), "{rt}: {} on two pages", r.id);
        }
        if n < sq.count {
            return Ok((ids, totals));
        }
        sq.offset += sq.count;
    }
}

async fn run(s: &Store) {
    let all = load(s).await;
    assert!(all.len() > 900, "loaded {}", all.len());
    let o = Oracle {
        reg: Registry::builtin(),
        store: s,
        all: &all,
        embedded: embedded_of(Registry::builtin(), s, &all),
        cache: Default::default(),
    };
    assert!(
        o.embedded.keys().filter(|k| k.0 == "Composition").count() >= 3,
        "documents' Compositions: {:?}",
        o.embedded.keys().collect::<Vec<_>>()
    );
    let queries = generate(&o);
    assert!(queries.len() > 1500, "{} queries", queries.len());
    let mut failures = Vec::new();
    // category → (queries, some-but-not-all results)
    let mut seen: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (qi, qu) in queries.iter().enumerate() {
        let mut sq = SearchQuery::from_pairs(&qu.pairs);
        sq.count = 1000;
        sq.now_ms = Some(NOW_MS);
        // Every other query asks for an exact total; the rest get the default, exact up to the
        // cap and beyond it absent but on the last page (which knows it without a count).
        let accurate = qi % 2 == 0;
        if accurate {
            sq.total = Total::Accurate;
        }
        let (got_ids, totals) = match search_all(s, &qu.rt, sq).await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}?{:?}: error {e}", qu.rt, qu.pairs));
                continue;
            }
        };
        let of_type: Vec<&Key> = all.keys().filter(|k| k.0 == qu.rt).collect();
        let want: BTreeSet<String> = of_type
            .iter()
            .filter(|k| qu.pairs.iter().all(|(pk, v)| o.matches(k, pk, v, 0)))
            .map(|k| k.1.clone())
            .collect();
        let n = want.len() as i64;
        let must = accurate || n <= COUNT_CAP;
        let last = totals.len() - 1;
        let totals_right = totals.iter().enumerate().all(|(i, t)| match t {
            Some(t) => *t == n,
            // An empty last page (the matches fill whole pages) cannot know the total.
            None => !must && (i != last || n % 1000 == 0),
        });
        if got_ids != want || !totals_right {
            let extra: Vec<_> = got_ids.difference(&want).take(3).collect();
            let missing: Vec<_> = want.difference(&got_ids).take(3).collect();
            failures.push(format!(
                "{}?{:?}: store {} (totals {:?}), oracle {}; extra {extra:?}, missing {missing:?}",
                qu.rt,
                qu.pairs,
                got_ids.len(),
                totals,
                want.len()
            ));
        }
        let e = seen.entry(qu.category.clone()).or_default();
        e.0 += 1;
        if !want.is_empty() && want.len() < of_type.len() {
            e.1 += 1;
        }
    }
    // _sort on one and several keys, each direction.
    let sorts: &[(&str, &[(&str, bool)])] = &[
        ("Patient", &[("birthdate", false)]),
        ("Patient", &[("family", true), ("birthdate", false)]),
        ("Patient", &[("gender", false), ("_id", true)]),
        ("Observation", &[("value-quantity", true)]),
        ("Observation", &[("code", false), ("date", true)]),
        ("Condition", &[("onset-date", false), ("subject", false)]),
        ("Encounter", &[("date", true)]),
    ];
    for (rt, keys) in sorts {
        let mut sq = SearchQuery {
            count: 1000,
            sort: keys
                .iter()
                .map(|(p, d)| SortSpec {
                    param: p.to_string(),
                    descending: *d,
                })
                .collect(),
            ..SearchQuery::default()
        };
        let mut got: Vec<String> = Vec::new();
        loop {
            let page = s.search(rt, &sq).await.unwrap_or_else(|e| panic!("{e}"));
            let n = page.resources.len() as i64;
            got.extend(page.resources.into_iter().map(|r| r.id));
            if n < sq.count {
                break;
            }
            sq.offset += sq.count;
        }
        let ids: Vec<Key> = all.keys().filter(|k| &k.0 == rt).cloned().collect();
        let spec: Vec<(String, bool)> = keys.iter().map(|(p, d)| (p.to_string(), *d)).collect();
        let want = sort_order(&o, &ids, &spec);
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b);
            failures.push(format!("{rt}?_sort={keys:?}: order differs at {at:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries disagree:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
    // Every kind of criterion was exercised with a result that was neither empty nor everything.
    let must = [
        "token:code",
        "token:system|code",
        "token:|code",
        "token:system|",
        "token:not",
        "token:text",
        "token:of-type",
        "token:missing",
        "token:or",
        "string:prefix",
        "string:exact",
        "string:contains",
        "date:eq",
        "date:ne",
        "date:lt",
        "date:gt",
        "date:le",
        "date:ge",
        "date:sa",
        "date:eb",
        "date:ap",
        "number:eq",
        "number:gt",
        "quantity:eq",
        "quantity:lt",
        "quantity:ap",
        "quantity:number|system|code",
        "quantity:number||unit",
        "reference:Type/id",
        "reference:id",
        "reference::Type",
        "reference:identifier",
        "reference:missing",
        "uri:eq",
        "uri:below",
        "composite:tuple",
        "chain",
        "has",
        "and",
        // A Bundle's Composition's parameters (`composition.type=…`).
        "embedded:token:code",
        "embedded:token:not",
        "embedded:token:missing",
        "embedded:string:prefix",
        "embedded:date:ge",
        "embedded:reference:Type/id",
        "embedded:reference:missing",
    ];
    let weak: Vec<&str> = must
        .iter()
        .filter(|c| seen.get(**c).map(|e| e.1).unwrap_or(0) == 0)
        .copied()
        .collect();
    assert!(
        weak.is_empty(),
        "categories never tested with a partial result: {weak:?}\n{seen:?}"
    );
}

#[tokio::test]
async fn search_agrees_with_the_oracle_on_sqlite() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("sqlite://{}", d.path().join("oracle.db").display());
    let s = Store::open(&url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    run(&s).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run `bash .ci/run`, or set KIZUNA_TEST_POSTGRES and pass --include-ignored"]
async fn search_agrees_with_the_oracle_on_postgres() {
    let url = std::env::var("KIZUNA_TEST_POSTGRES")
        .unwrap_or_else(|_| panic!("KIZUNA_TEST_POSTGRES is not set"));
    let s = Store::open(&url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    s.execute_raw("DROP SCHEMA IF EXISTS oracle CASCADE")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(s);
    // A schema of its own, so it runs beside the storage suite on the same database.
    let sep = if url.contains('?') { "&" } else { "?" };
    let url = format!("{url}{sep}options=-csearch_path%3Doracle");
    let admin = Store::open(
        &std::env::var("KIZUNA_TEST_POSTGRES").unwrap_or_default(),
        Registry::builtin(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    admin
        .execute_raw("CREATE SCHEMA oracle")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let s = Store::open(&url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    run(&s).await;
}
