//! What the service holds: the six clinical items (6情報) and the three documents (3文書), the flags
//! institutions put on them, and the facts the access policy decides on.
//!
//! Every stored item carries its facts in `meta.tag` (kind, person, submitting institution,
//! destination, insurer), so the policy can decide from the resource alone and the store can find a
//! person's items by token search.

use serde_json::{json, Value};

/// `meta.tag` system: the item kind ([`ItemKind::code`]).
pub const TAG_ITEM: &str = "urn:kizuna:share:item";
/// `meta.tag` system: the person (the service's person id).
pub const TAG_PERSON: &str = "urn:kizuna:share:person";
/// `meta.tag` system: the submitting institution (医療機関番号).
pub const TAG_INSTITUTION: &str = "urn:kizuna:share:institution";
/// `meta.tag` system: the institution a referral is addressed to.
pub const TAG_DESTINATION: &str = "urn:kizuna:share:destination";
/// `meta.tag` system: the insurer a check-up report goes to (保険者番号).
pub const TAG_INSURER: &str = "urn:kizuna:share:insurer";
/// `meta.tag` system: a document's inbox state (`pending`, `acknowledged`).
pub const TAG_INBOX: &str = "urn:kizuna:share:inbox";
/// `meta.tag` system: the referral a discharge summary travels with.
pub const TAG_ATTACHED_TO: &str = "urn:kizuna:share:attached-to";
/// `meta.tag` system: a person record of the person index.
pub const TAG_PERSON_RECORD: &str = "urn:kizuna:share:person-record";
/// `meta.extension`: when the service registered the item (its clock).
pub const EXT_REGISTERED: &str = "urn:kizuna:share:registered-at";
/// `meta.extension`: when the destination acknowledged a document.
pub const EXT_ACKNOWLEDGED: &str = "urn:kizuna:share:acknowledged-at";
/// The flags code system (LTS, UNINFORMED, UNDELIVERED).
pub const FLAG_SYSTEM: &str = "http://jpfhir.jp/fhir/clins/CodeSystem/JP_ehrshrs_indication";
/// The 医療機関番号 identifier system.
pub const INSTITUTION_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";
/// The 保険者番号 identifier system.
pub const INSURER_SYSTEM: &str = "http://jpfhir.jp/fhir/core/mhlw/IdSystem/InsurerNumber";
/// The bundle identifier system (`医療機関番号^年^ID`).
pub const BUNDLE_ID_SYSTEM: &str = "http://jpfhir.jp/fhir/clins/bundle-identifier";

/// The kinds of item the service shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ItemKind {
    /// 傷病名
    Condition,
    /// 感染症
    Infection,
    /// 薬剤アレルギー等
    DrugAllergy,
    /// その他アレルギー等
    OtherAllergy,
    /// 検査
    Lab,
    /// 処方
    Prescription,
    /// 診療情報提供書
    Referral,
    /// 退院時サマリー
    DischargeSummary,
    /// 健診結果報告書
    Checkup,
}

impl ItemKind {
    /// Every kind, for exhaustive tests.
    pub const ALL: [ItemKind; 9] = [
        ItemKind::Condition,
        ItemKind::Infection,
        ItemKind::DrugAllergy,
        ItemKind::OtherAllergy,
        ItemKind::Lab,
        ItemKind::Prescription,
        ItemKind::Referral,
        ItemKind::DischargeSummary,
        ItemKind::Checkup,
    ];

    /// The tag code.
    pub fn code(self) -> &'static str {
        match self {
            ItemKind::Condition => "condition",
            ItemKind::Infection => "infection",
            ItemKind::DrugAllergy => "drug-allergy",
            ItemKind::OtherAllergy => "other-allergy",
            ItemKind::Lab => "lab",
            ItemKind::Prescription => "prescription",
            ItemKind::Referral => "referral",
            ItemKind::DischargeSummary => "discharge-summary",
            ItemKind::Checkup => "checkup",
        }
    }

    /// The Japanese name the service uses.
    pub fn name_ja(self) -> &'static str {
        match self {
            ItemKind::Condition => "傷病名",
            ItemKind::Infection => "感染症",
            ItemKind::DrugAllergy => "薬剤アレルギー等",
            ItemKind::OtherAllergy => "その他アレルギー等",
            ItemKind::Lab => "検査",
            ItemKind::Prescription => "処方",
            ItemKind::Referral => "診療情報提供書",
            ItemKind::DischargeSummary => "退院時サマリー",
            ItemKind::Checkup => "健診結果報告書",
        }
    }

    /// Reads a tag code.
    pub fn from_code(c: &str) -> Option<ItemKind> {
        ItemKind::ALL.into_iter().find(|k| k.code() == c)
    }

    /// The resource type the item is stored as.
    pub fn resource_type(self) -> &'static str {
        match self {
            ItemKind::Condition => "Condition",
            ItemKind::Infection | ItemKind::Lab => "Observation",
            ItemKind::DrugAllergy | ItemKind::OtherAllergy => "AllergyIntolerance",
            ItemKind::Prescription => "MedicationRequest",
            ItemKind::Referral | ItemKind::DischargeSummary | ItemKind::Checkup => "Bundle",
        }
    }

    /// True for the three documents.
    pub fn is_document(self) -> bool {
        matches!(
            self,
            ItemKind::Referral | ItemKind::DischargeSummary | ItemKind::Checkup
        )
    }

    /// The viewing-consent category that lets another institution see the item; `None` for the
    /// documents addressed to one institution (referral, discharge summary).
    pub fn consent_category(self) -> Option<ConsentCategory> {
        match self {
            ItemKind::Condition | ItemKind::Infection => Some(ConsentCategory::Diagnosis),
            ItemKind::DrugAllergy
            | ItemKind::OtherAllergy
            | ItemKind::Lab
            | ItemKind::Prescription
            | ItemKind::Checkup => Some(ConsentCategory::Care),
            ItemKind::Referral | ItemKind::DischargeSummary => None,
        }
    }
}

/// The two viewing-consent categories a patient gives at the visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConsentCategory {
    /// 傷病名・手術・感染症
    Diagnosis,
    /// 診療・薬剤・アレルギー・検査
    Care,
}

/// The code system of the consent categories (`Consent.category`).
pub const CONSENT_CATEGORY_SYSTEM: &str = "urn:kizuna:share:consent-category";

impl ConsentCategory {
    /// Both categories.
    pub const ALL: [ConsentCategory; 2] = [ConsentCategory::Diagnosis, ConsentCategory::Care];

    /// The code.
    pub fn code(self) -> &'static str {
        match self {
            ConsentCategory::Diagnosis => "diagnosis",
            ConsentCategory::Care => "care",
        }
    }

    /// The Japanese name.
    pub fn name_ja(self) -> &'static str {
        match self {
            ConsentCategory::Diagnosis => "傷病名・手術・感染症",
            ConsentCategory::Care => "診療・薬剤・アレルギー・検査",
        }
    }

    /// Reads a code.
    pub fn from_code(c: &str) -> Option<ConsentCategory> {
        ConsentCategory::ALL.into_iter().find(|k| k.code() == c)
    }
}

/// The flags of JP-CLINS (`meta.tag` in [`FLAG_SYSTEM`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags {
    /// LTS: keep past the normal retention (長期保存).
    pub lts: bool,
    /// UNINFORMED: the patient has not been told; never shown to the patient (未告知).
    pub uninformed: bool,
    /// UNDELIVERED: never shown to another institution (提供不可).
    pub undelivered: bool,
}

impl Flags {
    /// Reads the flags of a resource.
    pub fn of(r: &Value) -> Flags {
        let mut f = Flags::default();
        for t in tags(r, FLAG_SYSTEM) {
            match t {
                "LTS" => f.lts = true,
                "UNINFORMED" => f.uninformed = true,
                "UNDELIVERED" => f.undelivered = true,
                _ => {}
            }
        }
        f
    }
}

/// What the policy decides on: the item's kind, whose it is, who sent it, to whom, its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemFacts {
    /// Kind.
    pub kind: ItemKind,
    /// The person (service person id).
    pub person: String,
    /// The submitting institution.
    pub institution: Option<String>,
    /// The destination (referrals, discharge summaries).
    pub destination: Option<String>,
    /// The insurer (check-up reports).
    pub insurer: Option<String>,
    /// Flags.
    pub flags: Flags,
}

/// The codes of `meta.tag` entries of one system.
pub fn tags<'a>(r: &'a Value, system: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    r.pointer("/meta/tag")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |t| t.get("system").and_then(Value::as_str) == Some(system))
        .filter_map(|t| t.get("code").and_then(Value::as_str))
}

fn tag<'a>(r: &'a Value, system: &'a str) -> Option<&'a str> {
    tags(r, system).next()
}

impl ItemFacts {
    /// The facts of a stored item; `None` for a resource the service does not manage.
    pub fn of(r: &Value) -> Option<ItemFacts> {
        let kind = tag(r, TAG_ITEM).and_then(ItemKind::from_code)?;
        Some(ItemFacts {
            kind,
            person: tag(r, TAG_PERSON)?.to_string(),
            institution: tag(r, TAG_INSTITUTION).map(str::to_string),
            destination: tag(r, TAG_DESTINATION).map(str::to_string),
            insurer: tag(r, TAG_INSURER).map(str::to_string),
            flags: Flags::of(r),
        })
    }
}

/// Sets (replacing) the tag of a system.
pub fn set_tag(r: &mut Value, system: &str, code: &str) {
    remove_tags(r, system);
    let meta = ensure_meta(r);
    if !meta.get("tag").is_some_and(Value::is_array) {
        meta["tag"] = json!([]);
    }
    if let Some(a) = meta["tag"].as_array_mut() {
        a.push(json!({"system": system, "code": code}));
    }
}

/// Removes the tags of a system.
pub fn remove_tags(r: &mut Value, system: &str) {
    if let Some(a) = r.pointer_mut("/meta/tag").and_then(Value::as_array_mut) {
        a.retain(|t| t.get("system").and_then(Value::as_str) != Some(system));
    }
}

fn ensure_meta(r: &mut Value) -> &mut Value {
    if !r.get("meta").is_some_and(Value::is_object) {
        r["meta"] = json!({});
    }
    &mut r["meta"]
}

/// Sets (replacing) a `meta.extension` instant.
pub fn set_instant(r: &mut Value, url: &str, t: chrono::DateTime<chrono::Utc>) {
    let meta = ensure_meta(r);
    if !meta.get("extension").is_some_and(Value::is_array) {
        meta["extension"] = json!([]);
    }
    if let Some(a) = meta["extension"].as_array_mut() {
        a.retain(|e| e.get("url").and_then(Value::as_str) != Some(url));
        a.push(json!({"url": url, "valueInstant": t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)}));
    }
}

/// Reads a `meta.extension` instant.
pub fn instant(r: &Value, url: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    r.pointer("/meta/extension")
        .and_then(Value::as_array)?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
        .and_then(|e| e.get("valueInstant").and_then(Value::as_str))
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
}

fn codings(cc: Option<&Value>) -> impl Iterator<Item = &Value> {
    cc.and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The kind of a clinical resource a submission carries; `None` for what is not one of the six
/// items (the Patient, a vital sign, a practitioner …).
pub fn classify(r: &Value) -> Option<ItemKind> {
    match r.get("resourceType").and_then(Value::as_str)? {
        "Condition" => Some(ItemKind::Condition),
        "AllergyIntolerance" => {
            let medication = r
                .get("category")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|c| c.as_str() == Some("medication"));
            Some(if medication {
                ItemKind::DrugAllergy
            } else {
                ItemKind::OtherAllergy
            })
        }
        "Observation" => {
            // 感染症: coded from the JP-CLINS infection lab code systems (JLAC10/JLAC11).
            let infection = codings(r.get("code")).any(|c| {
                c.get("system")
                    .and_then(Value::as_str)
                    .is_some_and(|s| s.contains("ObsLabResult_InfectionLabo"))
            });
            if infection {
                return Some(ItemKind::Infection);
            }
            let lab_profile = r
                .pointer("/meta/profile")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .any(|p| p.contains("JP_Observation_LabResult_eCS"));
            let lab_category = r
                .get("category")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|c| codings(Some(c)))
                .any(|c| c.get("code").and_then(Value::as_str) == Some("laboratory"));
            (lab_profile || lab_category).then_some(ItemKind::Lab)
        }
        "MedicationRequest" => Some(ItemKind::Prescription),
        _ => None,
    }
}

/// The document kind of a document Bundle, from its profile or its Composition's type.
pub fn document_kind(b: &Value) -> Option<ItemKind> {
    let profiles: Vec<&str> = b
        .pointer("/meta/profile")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let by_profile = |needle: &str| profiles.iter().any(|p| p.contains(needle));
    if by_profile("JP_Bundle_eReferral") {
        return Some(ItemKind::Referral);
    }
    if by_profile("JP_Bundle_eDischargeSummary") {
        return Some(ItemKind::DischargeSummary);
    }
    if by_profile("eCheckup") {
        return Some(ItemKind::Checkup);
    }
    let composition = b
        .get("entry")
        .and_then(Value::as_array)?
        .iter()
        .filter_map(|e| e.get("resource"))
        .find(|r| r.get("resourceType").and_then(Value::as_str) == Some("Composition"))?;
    codings(composition.get("type")).find_map(|c| match c.get("code").and_then(Value::as_str) {
        Some("57133-1") => Some(ItemKind::Referral),
        Some("18842-5") => Some(ItemKind::DischargeSummary),
        Some("53576-5") => Some(ItemKind::Checkup),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_of_the_six_items() {
        let obs = |code_system: &str, category: &str| {
            json!({"resourceType": "Observation", "code": {"coding": [{"system": code_system, "code": "x"}]},
                "category": [{"coding": [{"code": category}]}]})
        };
        assert_eq!(
            classify(&json!({"resourceType": "Condition"})),
            Some(ItemKind::Condition)
        );
        assert_eq!(
            classify(&json!({"resourceType": "AllergyIntolerance", "category": ["medication"]})),
            Some(ItemKind::DrugAllergy)
        );
        assert_eq!(
            classify(&json!({"resourceType": "AllergyIntolerance", "category": ["food"]})),
            Some(ItemKind::OtherAllergy)
        );
        assert_eq!(
            classify(&obs("http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_InfectionLabo_CS", "laboratory")),
            Some(ItemKind::Infection)
        );
        assert_eq!(
            classify(&obs("urn:oid:1.2.392.200119.4.504", "laboratory")),
            Some(ItemKind::Lab)
        );
        assert_eq!(classify(&obs("http://loinc.org", "vital-signs")), None);
        assert_eq!(
            classify(&json!({"resourceType": "MedicationRequest"})),
            Some(ItemKind::Prescription)
        );
        assert_eq!(classify(&json!({"resourceType": "Patient"})), None);
    }

    #[test]
    fn facts_and_flags_round_trip_through_tags() {
        let mut r = json!({"resourceType": "Condition", "meta": {"tag": [{"system": FLAG_SYSTEM, "code": "UNINFORMED"}]}});
        set_tag(&mut r, TAG_ITEM, "condition");
        set_tag(&mut r, TAG_PERSON, "p1");
        set_tag(&mut r, TAG_INSTITUTION, "1318814790");
        let f = ItemFacts::of(&r).unwrap_or_else(|| panic!("facts"));
        assert_eq!(f.kind, ItemKind::Condition);
        assert_eq!(f.person, "p1");
        assert!(f.flags.uninformed && !f.flags.lts && !f.flags.undelivered);
        set_tag(&mut r, TAG_PERSON, "p2");
        assert_eq!(ItemFacts::of(&r).map(|f| f.person), Some("p2".to_string()));
        assert!(ItemFacts::of(&json!({"resourceType": "Condition"})).is_none());
    }
}
