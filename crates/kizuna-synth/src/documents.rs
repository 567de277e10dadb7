//! Documents: 診療情報提供書 (eReferral) between institutions and 健診結果報告書 (eCheckupReport) for
//! 特定健診 at ages 40–74, filled from the public example documents (which validate against JP-CLINS
//! 1.10 / eCheckupReport 1.5.0): the person, the institutions, the insurer, the conditions and the
//! measurements are the synthetic person's; every date is shifted consistently to the event.

use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::population::{Date, Institution, Person};
use crate::rng::Rng;
use crate::tables::{self, CONDITIONS};

fn load(s: &str) -> Value {
    let mut v: Value = serde_json::from_str(s).unwrap_or(Value::Null);
    strip_narratives(&mut v);
    v
}

fn strip_narratives(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.get("text")
                .map(|t| t.get("div").is_some())
                .unwrap_or(false)
            {
                o.remove("text");
            }
            o.values_mut().for_each(strip_narratives);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_narratives),
        _ => {}
    }
}

fn referral_template() -> &'static Value {
    static T: OnceLock<Value> = OnceLock::new();
    T.get_or_init(|| load(include_str!("../../kizuna-fhir/data/examples/clinical-core/Bundle-Bundle-CLINS-Referral-Example-01.json")))
}

fn checkup_template() -> &'static Value {
    static T: OnceLock<Value> = OnceLock::new();
    T.get_or_init(|| load(include_str!("../../kizuna-fhir/data/examples/eCheckupReport-1.5.0/Bundle-Bundle-eCheckupReport-Sample-01.json")))
}

fn parse_date(s: &str) -> Option<Date> {
    if s.len() < 10 || s.as_bytes()[4] != b'-' || s.as_bytes()[7] != b'-' {
        return None;
    }
    Some(Date {
        y: s[..4].parse().ok()?,
        m: s[5..7].parse().ok()?,
        d: s[8..10].parse().ok()?,
    })
}

/// Shifts every `YYYY-MM-DD…` string by `days`, keeping any time and zone; replaces institution numbers.
fn rewrite(v: &mut Value, days: i64, numbers: &[(&str, &str)]) {
    match v {
        Value::String(s) => {
            if let Some(d) = parse_date(s) {
                if s.len() == 10 || s.as_bytes().get(10) == Some(&b'T') {
                    *s = format!("{}{}", d.plus(days).iso(), &s[10..]);
                    return;
                }
            }
            for (from, to) in numbers {
                if s.contains(from) {
                    *s = s.replace(from, to);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite(x, days, numbers)),
        Value::Object(o) => o.values_mut().for_each(|x| rewrite(x, days, numbers)),
        _ => {}
    }
}

fn set_person(patient: &mut Value, p: &Person, inst: &Institution, on: Date, rng: &mut Rng) {
    let ours = crate::clinical::patient(p, inst, on, rng);
    for k in [
        "identifier",
        "name",
        "gender",
        "birthDate",
        "address",
        "telecom",
    ] {
        if let Some(v) = ours.get(k) {
            patient[k] = v.clone();
        }
    }
}

fn entries_mut<'a>(b: &'a mut Value, rt: &str) -> Vec<&'a mut Value> {
    b.get_mut("entry")
        .and_then(Value::as_array_mut)
        .map(|a| {
            a.iter_mut()
                .filter_map(|e| e.get_mut("resource"))
                .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some(rt))
                .collect()
        })
        .unwrap_or_default()
}

fn set_organization(org: &mut Value, inst: &Institution) {
    org["identifier"] = json!([{"system": "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no", "value": inst.number}]);
    org["name"] = json!(inst.name);
    if let Some(Value::Array(exts)) = org.get_mut("extension") {
        for e in exts.iter_mut() {
            if e.get("url")
                .and_then(Value::as_str)
                .map(|u| u.ends_with("JP_Organization_PrefectureNo"))
                .unwrap_or(false)
            {
                e["valueCoding"]["code"] = json!(tables::PREFECTURES[inst.pref].code);
            }
        }
    }
}

fn local_id(rng: &mut Rng) -> String {
    format!("{:012}", rng.below(1_000_000_000_000))
}

/// A 診療情報提供書 from `from` to `to`, issued on `date`, listing the person's conditions.
pub fn referral(
    p: &Person,
    from: &Institution,
    to: &Institution,
    date: Date,
    rng: &mut Rng,
) -> Value {
    let mut b = referral_template().clone();
    let template_date = Date {
        y: 2021,
        m: 11,
        d: 26,
    };
    rewrite(
        &mut b,
        date.days() - template_date.days(),
        &[
            ("1318814790", &from.number),
            ("1311234567", &from.number),
            ("1319876543", &to.number),
        ],
    );
    b["id"] = json!(rng.uuid());
    b["identifier"]["value"] = json!(format!(
        "{}^{}^{}",
        from.number,
        date.y.max(2025),
        local_id(rng)
    ));
    if let Some(pt) = entries_mut(&mut b, "Patient").into_iter().next() {
        set_person(pt, p, from, date, rng);
    }
    let mut orgs = entries_mut(&mut b, "Organization");
    if orgs.len() >= 2 {
        set_organization(orgs[0], from);
        set_organization(orgs[1], to);
    }
    let conds: Vec<(usize, Date)> = if p.conditions.is_empty() {
        vec![(0, date)]
    } else {
        p.conditions.clone()
    };
    for (i, c) in entries_mut(&mut b, "Condition").into_iter().enumerate() {
        let (ci, onset) = conds[i % conds.len()];
        let cond = &CONDITIONS[ci];
        c["code"] = json!({"coding": [{"system": "http://medis.or.jp/CodeSystem/master-disease-keyNumber", "code": cond.medis, "display": cond.name}], "text": cond.name});
        c["clinicalStatus"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active", "display": "Active"}]});
        c["verificationStatus"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed", "display": "Confirmed"}]});
        if c.get("onsetDateTime").is_some() {
            c["onsetDateTime"] = json!(onset.min(date).iso());
        }
    }
    b
}

/// A 健診結果報告書 for a 特定健診 on `date` at `site`, billed to the person's insurer then.
pub fn checkup(p: &Person, site: &Institution, date: Date, rng: &mut Rng) -> Option<Value> {
    let cov = p.coverage_on(date)?;
    let mut b = checkup_template().clone();
    // The sample's report date; its measurements are dated earlier and are re-dated below.
    let template_date = Date {
        y: 2024,
        m: 4,
        d: 5,
    };
    rewrite(
        &mut b,
        date.days() - template_date.days(),
        &[("1318814790", &site.number), ("1311234567", &site.number)],
    );
    b["id"] = json!(rng.uuid());
    b["identifier"]["value"] = json!(format!(
        "{}^{}^{}",
        site.number,
        date.y.max(2025),
        local_id(rng)
    ));
    if let Some(pt) = entries_mut(&mut b, "Patient").into_iter().next() {
        set_person(pt, p, site, date, rng);
    }
    // The insurer: 8-digit 保険者番号 (国保 zero-padded) and the 記号・番号 on the card.
    let insurer = format!("{:0>8}", cov.insurer);
    for org in entries_mut(&mut b, "Organization") {
        let is_insurer = org
            .pointer("/identifier/0/system")
            .and_then(Value::as_str)
            .map(|s| s.ends_with("InsurerNumber"))
            .unwrap_or(false);
        if is_insurer {
            org["identifier"][0]["value"] = json!(insurer);
            org["name"] = json!(format!("{}保険者", cov.kind.label()));
        } else {
            set_organization(org, site);
        }
    }
    for c in entries_mut(&mut b, "Coverage") {
        if let Some(Value::Array(exts)) = c.get_mut("extension") {
            for e in exts.iter_mut() {
                let url = e
                    .get("url")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if url.ends_with("InsuredPersonSymbol") {
                    e["valueString"] = json!(cov.kigo);
                } else if url.ends_with("InsuredPersonNumber") {
                    e["valueString"] = json!(cov.bango);
                } else if url.ends_with("InsuredPersonSubNumber") {
                    e["valueString"] = json!(cov.edaban);
                }
            }
        }
    }
    // Measurements: the template's values moved around the person's own level.
    for o in entries_mut(&mut b, "Observation") {
        if o.get("effectiveDateTime").is_some() {
            o["effectiveDateTime"] = json!(date.iso());
        }
        if let Some(v) = o.pointer_mut("/valueQuantity/value") {
            let text = v.to_string();
            let places = text.split('.').nth(1).map(str::len).unwrap_or(0);
            let x = v.as_f64().unwrap_or(0.0) * rng.normal(1.0, 0.06).clamp(0.8, 1.25);
            let s = format!("{x:.places$}");
            if let Ok(n) = serde_json::from_str::<serde_json::Number>(&s) {
                *v = Value::Number(n);
            }
        }
    }
    Some(b)
}

/// Structured sections of a 退院時サマリー: (code, title, what fills it).
const DISCHARGE_SECTIONS: &[(&str, &str, SectionFill)] = &[
    ("322", "入院時詳細", SectionFill::Encounter),
    ("342", "入院時診断", SectionFill::Conditions),
    ("510", "アレルギー・不耐性反応", SectionFill::Allergies),
    ("352", "主訴", SectionFill::Text),
    ("312", "入院理由", SectionFill::Text),
    ("360", "現病歴", SectionFill::Text),
    ("444", "退院時投薬指示", SectionFill::Text),
    ("424", "退院時方針指示", SectionFill::Text),
    ("333", "入院中経過", SectionFill::CourseDocument),
    ("324", "退院時詳細", SectionFill::Encounter),
    ("344", "退院時診断", SectionFill::Conditions),
];

#[derive(Clone, Copy)]
enum SectionFill {
    Encounter,
    Conditions,
    Allergies,
    CourseDocument,
    Text,
}

fn narrative(text: &str) -> Value {
    json!({"status": "additional", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{text}</div>")})
}

/// A 退院時サマリー from `hospital` for a stay from `admit` to `discharge`.
pub fn discharge_summary(
    p: &Person,
    hospital: &Institution,
    admit: Date,
    discharge: Date,
    rng: &mut Rng,
) -> Value {
    // Start from the referral: its Patient, practitioners, organisations, conditions, allergies and
    // clinical-course document are the resources a discharge summary carries too.
    let mut b = referral(p, hospital, hospital, discharge, rng);
    b["meta"]["profile"] = json!([
        "http://jpfhir.jp/fhir/eDischargeSummary/StructureDefinition/JP_Bundle_eDischargeSummary"
    ]);
    let entries = b["entry"].as_array().cloned().unwrap_or_default();
    let mut kept = Vec::new();
    let mut encounter_url = None;
    let (mut conditions, mut allergies, mut course) = (Vec::new(), Vec::new(), None);
    for e in entries {
        let rt = e
            .pointer("/resource/resourceType")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let url = e
            .get("fullUrl")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match rt.as_str() {
            // One Encounter: the stay.
            "Encounter" if encounter_url.is_some() => continue,
            "Encounter" => encounter_url = Some(url.clone()),
            "Observation" => continue,
            "Condition" => conditions.push(url.clone()),
            "AllergyIntolerance" => allergies.push(url.clone()),
            "DocumentReference" => course = Some(url.clone()),
            _ => {}
        }
        kept.push(e);
    }
    let enc_url = encounter_url.unwrap_or_default();
    for e in kept.iter_mut() {
        let Some(r) = e.get_mut("resource") else {
            continue;
        };
        if r.get("resourceType").and_then(Value::as_str) == Some("Encounter") {
            r["class"] = json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP", "display": "入院"});
            r["period"] = json!({"start": admit.iso(), "end": discharge.iso()});
            r["status"] = json!("finished");
        }
    }
    let refs =
        |urls: &[String]| -> Vec<Value> { urls.iter().map(|u| json!({"reference": u})).collect() };
    let subsections: Vec<Value> = DISCHARGE_SECTIONS
        .iter()
        .map(|(code, title, fill)| {
            let mut s = json!({
                "title": title,
                "code": {"coding": [{"system": "http://jpfhir.jp/fhir/clins/CodeSystem/document-section", "code": code, "display": format!("{title}セクション")}]}
            });
            match fill {
                SectionFill::Encounter => s["entry"] = json!([{"reference": enc_url}]),
                SectionFill::Conditions if !conditions.is_empty() => s["entry"] = Value::Array(refs(&conditions)),
                SectionFill::Allergies if !allergies.is_empty() => s["entry"] = Value::Array(refs(&allergies)),
                SectionFill::CourseDocument if course.is_some() => s["entry"] = Value::Array(refs(&course.iter().cloned().collect::<Vec<_>>())),
                _ => s["text"] = narrative("特記事項なし"),
            }
            s
        })
        .collect();
    if let Some(c) = kept.first_mut().and_then(|e| e.get_mut("resource")) {
        c["meta"]["profile"] = json!(["http://jpfhir.jp/fhir/eDischargeSummary/StructureDefinition/JP_Composition_eDischargeSummary"]);
        c["title"] = json!("退院時サマリー");
        c["type"] = json!({"coding": [{"system": "http://jpfhir.jp/fhir/Common/CodeSystem/doc-typecodes", "code": "18842-5", "display": "退院時サマリー"}]});
        c["category"] = json!([{"coding": [{"system": "http://jpfhir.jp/fhir/Common/CodeSystem/doc-subtypecodes", "code": "DISCHARGE", "display": "退院時文書"}]}]);
        c["event"] = json!([{"period": {"start": admit.iso(), "end": discharge.iso()}}]);
        c["encounter"] = json!({"reference": enc_url, "type": "Encounter"});
        c["section"] = json!([{
            "title": "構造情報",
            "code": {"coding": [{"system": "http://jpfhir.jp/fhir/clins/CodeSystem/document-section", "code": "300", "display": "構造情報セクション"}]},
            "section": subsections
        }]);
    }
    b["entry"] = Value::Array(kept);
    b
}
