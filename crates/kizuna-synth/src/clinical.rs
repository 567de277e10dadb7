//! Clinical data as the EHR sharing service receives it: JP_Bundle_CLINS submissions of conditions,
//! allergies, lab results and prescriptions, one bundle per (institution, kind, visit).
//!
//! Resources are built from the public JP-CLINS example instances (which validate against JP-CLINS 1.10)
//! with the person's data filled in, so the shape follows the profiles the service enforces.

use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::population::{Date, Institution, Person};
use crate::rng::Rng;
use crate::tables::{self, CONDITIONS, DEPARTMENTS, DRUGS, LAB_ITEMS};

/// Kinds of JP_Bundle_CLINS submission (the `BundleResourceType_CS` tag), plus prescriptions, which
/// travel as standalone resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BundleKind {
    /// Condition (傷病名).
    Condition,
    /// AllergyIntolerance (アレルギー).
    AllergyIntolerance,
    /// Observation (検査).
    Observation,
    /// MedicationRequest (処方), standalone.
    MedicationRequest,
    /// 診療情報提供書 (eReferral document).
    Referral,
    /// 健診結果報告書 (eCheckupReport document).
    Checkup,
    /// 退院時サマリー (eDischargeSummary document).
    Discharge,
}

impl BundleKind {
    /// The tag code.
    pub fn code(self) -> &'static str {
        match self {
            BundleKind::Condition => "Condition",
            BundleKind::AllergyIntolerance => "AllergyIntolerance",
            BundleKind::Observation => "Observation",
            BundleKind::MedicationRequest => "MedicationRequest",
            BundleKind::Referral => "eReferral",
            BundleKind::Checkup => "eCheckupReport",
            BundleKind::Discharge => "eDischargeSummary",
        }
    }

    /// All kinds.
    pub const ALL: [BundleKind; 7] = [
        BundleKind::Condition,
        BundleKind::AllergyIntolerance,
        BundleKind::Observation,
        BundleKind::MedicationRequest,
        BundleKind::Referral,
        BundleKind::Checkup,
        BundleKind::Discharge,
    ];

    /// The output file name.
    pub fn file_name(self) -> String {
        match self {
            BundleKind::MedicationRequest => "MedicationRequest.ndjson".into(),
            BundleKind::Referral | BundleKind::Checkup => {
                format!("documents-{}.ndjson", self.code())
            }
            k => format!("bundles-{}.ndjson", k.code()),
        }
    }
}

struct Templates {
    bundle: Value,
    patient: Value,
    observation: Value,
    condition: Value,
    allergy: Value,
    medication: Value,
}

/// Drops narratives (`text` objects with a `div`); keeps `text` strings, which profiles may require.
fn without_text(mut v: Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(o) => {
                if o.get("text")
                    .map(|t| t.get("div").is_some())
                    .unwrap_or(false)
                {
                    o.remove("text");
                }
                for x in o.values_mut() {
                    strip(x);
                }
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

fn templates() -> &'static Templates {
    static T: OnceLock<Templates> = OnceLock::new();
    T.get_or_init(|| {
        let load = |s: &str| without_text(serde_json::from_str::<Value>(s).unwrap_or(Value::Null));
        let bundle = load(include_str!("../../kizuna-fhir/data/examples/hapisample-2025-02/Bundle-Bundle-CLINS-Observations-Example-01.json"));
        let patient = bundle.pointer("/entry/0/resource").cloned().unwrap_or(Value::Null);
        let observation = bundle.pointer("/entry/1/resource").cloned().unwrap_or(Value::Null);
        let mut envelope = bundle.clone();
        envelope["entry"] = json!([]);
        Templates {
            bundle: envelope,
            patient,
            observation,
            condition: load(include_str!("../../kizuna-fhir/data/examples/clinical-core/Condition-Example-JP-Condition-eCS-01.json")),
            allergy: load(include_str!("../../kizuna-fhir/data/examples/clinical-core/AllergyIntolerance-Example-JP-AllergyIntolerance-eCS-01.json")),
            medication: load(include_str!("../../kizuna-fhir/data/examples/clinical-core/MedicationRequest-Example-JP-MedReq-PO-SID-28days.json")),
        }
    })
}

const FLAG_SYSTEM: &str = "http://jpfhir.jp/fhir/clins/CodeSystem/JP_ehrshrs_indication";
const INSTITUTION_EXT: &str =
    "http://jpfhir.jp/fhir/clins/Extension/StructureDefinition/JP_eCS_InstitutionNumber";
const DEPARTMENT_EXT: &str =
    "http://jpfhir.jp/fhir/eCS/Extension/StructureDefinition/JP_eCS_Department";
const MEMBER_ID: &str = crate::eligibility::MEMBER_ID_SYSTEM;

fn flag(code: &str) -> Value {
    let display = match code {
        "LTS" => "長期保存",
        "UNINFORMED" => "未告知",
        _ => "未提供",
    };
    json!({"system": FLAG_SYSTEM, "code": code, "display": display})
}

/// A decimal with fixed places, kept exact in JSON.
fn decimal(v: f64, places: usize) -> Value {
    let s = format!("{v:.places$}");
    serde_json::from_str::<serde_json::Number>(&s)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

fn stamp(d: Date, h: u32, m: u32) -> String {
    format!("{}T{:02}:{:02}:00+09:00", d.iso(), h, m)
}

fn set_institution(r: &mut Value, inst: &Institution, dept: Option<(&str, &str)>) {
    let mut exts = vec![
        json!({"url": INSTITUTION_EXT, "valueIdentifier": {"system": "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no", "value": inst.number}}),
    ];
    if let Some((code, name)) = dept {
        exts.push(json!({"url": DEPARTMENT_EXT, "valueCodeableConcept": {"coding": [{"system": "http://jami.jp/SS-MIX2/CodeSystem/ClinicalDepartment", "code": code, "display": name}]}}));
    }
    r["extension"] = Value::Array(exts);
}

/// The Patient resource as an institution sends it (its local id, the insured-person identifier in force).
pub fn patient(p: &Person, inst: &Institution, on: Date, rng: &mut Rng) -> Value {
    let mut r = templates().patient.clone();
    r["id"] = json!(format!("pt-{}", p.id));
    r["meta"] = json!({"lastUpdated": stamp(on, 9, 0), "profile": ["http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Patient_eCS|1.10.0"]});
    // R1012: exactly one insured-person identifier; the coverage in force, else the nearest one.
    let member = p
        .coverage_on(on)
        .or_else(|| {
            p.coverage
                .iter()
                .min_by_key(|c| (c.start.days() - on.days()).abs())
        })
        .map(|c| c.member_id());
    let mut ids = vec![
        json!({"system": format!("urn:oid:1.2.392.100495.20.3.51.1{}", inst.number), "value": format!("{:09}", p.index * 7 + 100_000 + rng.below(7))}),
    ];
    if let Some(m) = member {
        // Some systems send 記号・番号 in full-width digits (allowed); the service normalises them.
        let m = if rng.chance(0.05) {
            let parts: Vec<&str> = m.split(':').collect();
            match parts.as_slice() {
                [ins, kigo, bango, eda] => format!(
                    "{ins}:{}:{}:{eda}",
                    to_fullwidth_digits(kigo),
                    to_fullwidth_digits(bango)
                ),
                _ => m,
            }
        } else {
            m
        };
        ids.push(json!({"system": MEMBER_ID, "value": m}));
    }
    r["identifier"] = Value::Array(ids);
    r["name"] = json!([
        {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "IDE"}], "use": "official", "text": format!("{} {}", p.family.kanji, p.given.kanji), "family": p.family.kanji, "given": [p.given.kanji]},
        {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "SYL"}], "use": "official", "text": format!("{} {}", p.family.kana, p.given.kana), "family": p.family.kana, "given": [p.given.kana]}
    ]);
    r["telecom"] = json!([{"system": "phone", "value": p.phone, "use": "home"}]);
    r["gender"] = json!(p.sex.fhir());
    r["birthDate"] = json!(p.birth.iso());
    let pref = &tables::PREFECTURES[p.pref];
    r["address"] = json!([{"text": format!("{}{}", pref.name, p.city), "city": p.city, "state": pref.name, "postalCode": p.postal, "country": "JP"}]);
    if let Some(o) = r.as_object_mut() {
        o.remove("contact");
    }
    r
}

fn to_fullwidth_digits(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_digit() {
                char::from_u32(c as u32 - '0' as u32 + '０' as u32).unwrap_or(c)
            } else {
                c
            }
        })
        .collect()
}

fn contained_encounter(r: &mut Value, id: &str, visit_id: u64, hospital_stay: bool) {
    if let Some(Value::Array(cs)) = r.get_mut("contained") {
        for c in cs.iter_mut() {
            if c.get("resourceType").and_then(Value::as_str) == Some("Encounter") {
                c["id"] = json!(id);
                c["identifier"] = json!([{"system": "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier", "value": format!("{visit_id}")}]);
                if hospital_stay {
                    c["class"] = json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP", "display": "入院"});
                }
            }
        }
    }
}

/// A Condition resource.
#[allow(clippy::too_many_arguments)]
pub fn condition(
    p: &Person,
    ci: usize,
    onset: Date,
    inst: &Institution,
    recorded: Date,
    subject_ref: &str,
    rng: &mut Rng,
) -> Value {
    let c = &CONDITIONS[ci];
    let mut r = templates().condition.clone();
    let id = format!("cond-{}-{}-{}", p.id, ci, inst.number);
    r["id"] = json!(id);
    r["meta"] = json!({"lastUpdated": stamp(recorded, 10, 0), "profile": ["http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Condition_eCS|1.10.0"]});
    let mut tags = Vec::new();
    if c.chronic && rng.chance(0.3) {
        tags.push(flag("LTS"));
    }
    if c.cancer && rng.chance(0.15) {
        tags.push(flag("UNINFORMED"));
    }
    if rng.chance(0.01) {
        tags.push(flag("UNDELIVERED"));
    }
    if !tags.is_empty() {
        r["meta"]["tag"] = Value::Array(tags);
    }
    r["identifier"] = json!([{"system": "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier", "value": format!("{}{:06}", inst.number, p.index % 1_000_000)}]);
    let dept = if c.icd10.starts_with('S') {
        DEPARTMENTS[3]
    } else if c.icd10.starts_with('I') {
        DEPARTMENTS[1]
    } else {
        DEPARTMENTS[0]
    };
    set_institution(&mut r, inst, Some(dept));
    r["code"] = json!({
        "coding": [
            {"system": "http://medis.or.jp/CodeSystem/master-disease-keyNumber", "code": c.medis, "display": c.name},
            {"system": "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/ICD10-2013-full", "code": c.icd10, "display": c.name}
        ],
        "text": c.name
    });
    let resolved = !c.chronic && recorded.days() - onset.days() > 60;
    r["clinicalStatus"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": if resolved { "resolved" } else { "active" }, "display": if resolved { "Resolved" } else { "Active" }}]});
    r["verificationStatus"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed", "display": "Confirmed"}]});
    r["subject"] = json!({"reference": subject_ref});
    r["onsetDateTime"] = json!(onset.iso());
    r["recordedDate"] = json!(recorded.iso());
    if let Some(o) = r.as_object_mut() {
        o.remove("note");
    }
    let enc = format!("enc-{}", rng.below(1_000_000_000));
    contained_encounter(&mut r, &enc, rng.below(1_000_000_000), false);
    r["encounter"] = json!({"reference": format!("#{enc}")});
    r
}

/// An AllergyIntolerance resource.
pub fn allergy(
    p: &Person,
    ai: usize,
    inst: &Institution,
    recorded: Date,
    subject_ref: &str,
    rng: &mut Rng,
) -> Value {
    let a = &tables::ALLERGENS[ai];
    let mut r = templates().allergy.clone();
    r["id"] = json!(format!("alg-{}-{}", p.id, ai));
    let mut meta = json!({"lastUpdated": stamp(recorded, 11, 0), "profile": ["http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_AllergyIntolerance_eCS|1.10.0"]});
    if rng.chance(0.6) {
        meta["tag"] = json!([flag("LTS")]);
    }
    r["meta"] = meta;
    r["identifier"] = json!([{"system": "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier", "value": format!("{}A{:06}", inst.number, p.index % 1_000_000)}]);
    set_institution(&mut r, inst, None);
    r["code"] = json!({"coding": [{"system": a.system, "code": a.code, "display": a.display}], "text": a.display});
    r["patient"] = json!({"reference": subject_ref});
    r["recordedDate"] = json!(recorded.iso());
    r
}

/// One lab-result Observation; `value` already drawn.
#[allow(clippy::too_many_arguments)]
pub fn lab(
    p: &Person,
    li: usize,
    value: f64,
    inst: &Institution,
    when: Date,
    subject_ref: &str,
    enc: &str,
    seq: u64,
) -> Value {
    let item = &LAB_ITEMS[li];
    let mut r = templates().observation.clone();
    r["id"] = json!(format!("obs-{}-{}-{}", p.id, when.days(), li));
    r["meta"] = json!({"lastUpdated": stamp(when, 15, 0), "profile": ["http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Observation_LabResult_eCS|1.10.0"]});
    set_institution(&mut r, inst, Some(DEPARTMENTS[0]));
    r["identifier"] = json!([{"system": "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier", "value": format!("{}-{}-{}-{}", inst.number, p.index, when.days(), seq)}]);
    let mut coding = vec![
        json!({"system": "http://jpfhir.jp/fhir/clins/CodeSystem/JP_CLINS_ObsLabResult_LocalCode_CS", "code": format!("L{:04}", li + 1), "display": item.ja}),
    ];
    if let Some(code) = tables::jlac10_code(item.group) {
        coding.push(json!({"system": "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_CoreLabo_CS", "code": code, "display": item.group}));
    }
    r["code"] = json!({"coding": coding, "text": item.ja});
    r["subject"] = json!({"reference": subject_ref});
    contained_encounter(&mut r, enc, when.days() as u64, false);
    r["encounter"] = json!({"reference": format!("#{enc}")});
    r["effectiveDateTime"] = json!(stamp(when, 9, 30));
    r["issued"] = json!(format!("{}T15:00:00.000+09:00", when.iso()));
    r["valueQuantity"] = json!({"value": decimal(value, item.decimals), "unit": item.unit});
    if let Some(o) = r.as_object_mut() {
        o.remove("note");
    }
    r
}

/// One infection-item Observation (qualitative: 陽性 / 陰性), possibly flagged LTS.
#[allow(clippy::too_many_arguments)]
pub fn infection(
    p: &Person,
    ii: usize,
    positive: bool,
    inst: &Institution,
    when: Date,
    subject_ref: &str,
    enc: &str,
    seq: u64,
    lts: bool,
) -> Value {
    let (group, display, _) = tables::INFECTIONS[ii];
    let mut r = templates().observation.clone();
    r["id"] = json!(format!("inf-{}-{}-{}", p.id, when.days(), ii));
    let mut meta = json!({"lastUpdated": stamp(when, 15, 0), "profile": ["http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Observation_LabResult_eCS|1.10.0"]});
    if lts {
        meta["tag"] = json!([flag("LTS")]);
    }
    r["meta"] = meta;
    set_institution(&mut r, inst, Some(DEPARTMENTS[0]));
    r["identifier"] = json!([{"system": "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier", "value": format!("{}-{}-{}-I{}", inst.number, p.index, when.days(), seq)}]);
    let mut coding = vec![
        json!({"system": "http://jpfhir.jp/fhir/clins/CodeSystem/JP_CLINS_ObsLabResult_LocalCode_CS", "code": format!("I{:04}", ii + 1), "display": display}),
    ];
    if let Some(code) = tables::jlac10_infection_code(group) {
        coding.push(json!({"system": "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_InfectionLabo_CS", "code": code, "display": display}));
    }
    r["code"] = json!({"coding": coding, "text": display});
    r["subject"] = json!({"reference": subject_ref});
    contained_encounter(&mut r, enc, when.days() as u64, false);
    r["encounter"] = json!({"reference": format!("#{enc}")});
    r["effectiveDateTime"] = json!(stamp(when, 9, 30));
    r["issued"] = json!(format!("{}T15:00:00.000+09:00", when.iso()));
    let (code, text) = if positive {
        ("1", "陽性")
    } else {
        ("2", "陰性")
    };
    if let Some(o) = r.as_object_mut() {
        o.remove("valueQuantity");
        o.remove("note");
    }
    r["valueCodeableConcept"] = json!({"coding": [{"system": "http://jpfhir.jp/fhir/LaboResult/CodeSystem/JP_PosNegHold_CS", "code": code, "display": text}]});
    r
}

/// A MedicationRequest for a drug, 28 days from `when`. JP_Bundle_CLINS does not carry prescriptions
/// (R02142), so these are standalone resources naming the patient by the insured-person identifier.
pub fn prescription(p: &Person, di: usize, inst: &Institution, when: Date, seq: u64) -> Value {
    let d = &DRUGS[di];
    let mut r = templates().medication.clone();
    let rx = format!("{}-{}-RX{}{:03}", inst.number, p.index, when.days(), seq);
    r["id"] = json!(format!("rx-{}-{}-{}", p.id, when.days(), seq));
    r["meta"] = json!({"lastUpdated": stamp(when, 12, 0), "profile": ["http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_MedicationRequest_eCS|1.10.0"]});
    set_institution(&mut r, inst, None);
    if let Some(Value::Array(ids)) = r.get_mut("identifier") {
        for id in ids.iter_mut() {
            let sys = id.get("system").and_then(Value::as_str).unwrap_or("");
            if sys == "urn:oid:1.2.392.100495.20.3.11"
                || sys.ends_with("resourceInstance-identifier")
            {
                id["value"] = json!(rx);
            }
        }
    }
    r["medicationCodeableConcept"] = json!({"coding": [{"system": "http://capstandard.jp/iyaku.info/CodeSystem/YJ-code", "code": d.yj, "display": d.name}], "text": d.name});
    let member = p
        .coverage_on(when)
        .or_else(|| {
            p.coverage
                .iter()
                .min_by_key(|c| (c.start.days() - when.days()).abs())
        })
        .map(|c| c.member_id())
        .unwrap_or_default();
    r["subject"] = json!({"identifier": {"system": MEMBER_ID, "value": member}});
    r["authoredOn"] = json!(stamp(when, 11, 30));
    if let Some(di) = r.pointer_mut("/dosageInstruction/0") {
        di["extension"][0]["valuePeriod"]["start"] = json!(when.iso());
        di["timing"]["event"] = json!([stamp(when, 0, 0)]);
    }
    if let Some(o) = r.as_object_mut() {
        o.remove("note");
    }
    r
}

/// Wraps resources into a JP_Bundle_CLINS submission with its `医療機関番号^年^ID` identifier.
pub fn bundle(
    kind: BundleKind,
    inst: &Institution,
    patient: Value,
    patient_url: &str,
    resources: Vec<Value>,
    when: Date,
    rng: &mut Rng,
) -> Value {
    let mut b = templates().bundle.clone();
    // Submissions exist from the service's start; older events arrive in the initial load.
    let year = when.y.max(2025);
    let local = format!("{:012}", rng.below(1_000_000_000_000));
    b["id"] = json!(rng.uuid());
    b["meta"] = json!({
        "lastUpdated": stamp(when, 18, 0),
        "profile": ["http://jpfhir.jp/fhir/clins/StructureDefinition/JP_Bundle_CLINS|1.10.0"],
        "tag": [{"system": "http://jpfhir.jp/fhir/clins/CodeSystem/BundleResourceType_CS", "code": kind.code()}]
    });
    b["identifier"] = json!({"system": "http://jpfhir.jp/fhir/clins/bundle-identifier", "value": format!("{}^{}^{}", inst.number, year, local)});
    b["timestamp"] = json!(stamp(when, 18, 0));
    let mut entries = vec![json!({"fullUrl": patient_url, "resource": patient})];
    for r in resources {
        entries.push(json!({"fullUrl": format!("urn:uuid:{}", rng.uuid()), "resource": r}));
    }
    b["entry"] = Value::Array(entries);
    b
}

/// Draws a lab value for a person: the healthy distribution shifted by their conditions.
pub fn lab_value(p: &Person, li: usize, rng: &mut Rng) -> f64 {
    let item = &LAB_ITEMS[li];
    let shift: f64 = item
        .shifts
        .iter()
        .filter(|(icd, _)| p.has(icd))
        .map(|(_, s)| *s)
        .sum();
    let sex_shift = match (item.group, p.sex) {
        ("Hb", crate::population::Sex::Female) => -1.3,
        ("Cre", crate::population::Sex::Female) => -0.2,
        ("UA", crate::population::Sex::Female) => -1.2,
        _ => 0.0,
    };
    rng.normal(item.mean + shift + sex_shift, item.sd)
        .max(item.floor)
}
