//! The OperationDefinitions of the sharing service, served at `/fhir/OperationDefinition/{id}` and
//! declared in the CapabilityStatement: what each operation takes, what it answers, who may call it.

use serde_json::{json, Value};

/// The canonical base of kizuna's OperationDefinitions.
pub const BASE: &str = "https://kizuna.example.org/fhir/OperationDefinition";

/// One operation: id, code, resource type (`None`: system level), instance level, whether it only
/// reads, its Japanese and English description, its parameters (name, use, min, max, type, doc).
struct Op {
    id: &'static str,
    code: &'static str,
    resource: Option<&'static str>,
    instance: bool,
    read_only: bool,
    ja: &'static str,
    en: &'static str,
    params: &'static [(
        &'static str,
        &'static str,
        u32,
        &'static str,
        &'static str,
        &'static str,
    )],
}

const OPS: &[Op] = &[
    Op { id: "submit", code: "submit", resource: Some("Bundle"), instance: false, read_only: false,
        ja: "6情報 (JP_Bundle_CLINS) や 3文書、処方を登録する。同じ識別子の再送は置換、本人は被保険者番号で照合、10 MB まで。医療機関システムのみ。",
        en: "Register six-item bundles (JP_Bundle_CLINS), the three documents or a prescription; re-sending an identifier replaces it atomically; the patient is matched by the insured-person identifier; at most 10 MB. Institution systems only.",
        params: &[("resource", "in", 1, "1", "Resource", "JP_Bundle_CLINS, a document Bundle, a collection of a referral and discharge summaries, or a MedicationRequest"),
                  ("destination", "in", 0, "1", "string", "医療機関番号 of the destination of a discharge summary sent on its own"),
                  ("return", "out", 1, "1", "Parameters", "identifier, person, stored items by kind, replaced count, inbox document")] },
    Op { id: "withdraw", code: "withdraw", resource: Some("Bundle"), instance: false, read_only: false,
        ja: "登録を識別子 (医療機関番号^年^ID) で取り下げる。", en: "Withdraw a submission by its identifier (医療機関番号^年^ID).",
        params: &[("identifier", "in", 1, "1", "string", "the bundle identifier"), ("return", "out", 1, "1", "OperationOutcome", "how many resources were deleted")] },
    Op { id: "summary", code: "summary", resource: Some("Patient"), instance: true, read_only: true,
        ja: "診療情報サマリー: 現在の傷病名、アレルギー、感染症、直近の検査と推移、現在の処方、文書。閲覧同意、または救急時 (emergency-reason) に医師が閲覧。",
        en: "Clinician summary: active conditions, allergies, infections, latest labs with trend, current prescriptions, documents. Needs the patient's viewing consent, or a physician's declared emergency (emergency-reason).",
        params: &[("emergency-reason", "in", 0, "1", "string", "救急時医療情報閲覧: the reason for opening without consent"), ("return", "out", 1, "1", "Bundle", "Composition and entries")] },
    Op { id: "record-consent", code: "consent", resource: Some("Patient"), instance: true, read_only: false,
        ja: "受診時の閲覧同意を記録する (区分: diagnosis=傷病名・手術・感染症, care=診療・薬剤・アレルギー・検査)。",
        en: "Record the viewing consent given at the visit (categories: diagnosis, care).",
        params: &[("category", "in", 1, "2", "code", "diagnosis | care"), ("until", "in", 0, "1", "dateTime", "end of the consent (default: the configured period)"), ("return", "out", 1, "1", "Consent", "the recorded Consent")] },
    Op { id: "revoke-consent", code: "revoke", resource: Some("Consent"), instance: true, read_only: false,
        ja: "閲覧同意を取り消す (本人または同意先の医療機関)。", en: "Revoke a viewing consent (the patient, or the institution it was given to).",
        params: &[("return", "out", 1, "1", "Consent", "the revoked Consent")] },
    Op { id: "referral-inbox", code: "referral-inbox", resource: Some("Bundle"), instance: false, read_only: true,
        ja: "自院宛ての診療情報提供書 (添付の退院時サマリーを含む) の一覧。", en: "The referrals (with attached discharge summaries) addressed to the caller's institution.",
        params: &[("return", "out", 1, "1", "Parameters", "one part per document: document, kind, from, person, registered, state, attachments")] },
    Op { id: "acknowledge", code: "acknowledge", resource: Some("Bundle"), instance: true, read_only: false,
        ja: "文書の受領を確認する (紹介先または健診の保険者)。", en: "Acknowledge receipt of a document (its destination, or a check-up report's insurer).",
        params: &[("return", "out", 1, "1", "Parameters", "the document's new state")] },
    Op { id: "checkup-reports", code: "checkup-reports", resource: Some("Bundle"), instance: false, read_only: true,
        ja: "保険者宛ての健診結果報告書の一覧。", en: "The check-up reports addressed to the caller's insurer.",
        params: &[("return", "out", 1, "1", "Parameters", "one part per report")] },
    Op { id: "my-record", code: "my-record", resource: Some("Patient"), instance: false, read_only: true,
        ja: "本人の 6情報と健診結果報告書 (未告知の項目を除く)。", en: "The patient's own six items and check-up reports, minus items they have not been told.",
        params: &[("return", "out", 1, "1", "Bundle", "collection")] },
    Op { id: "access-history", code: "access-history", resource: Some("Patient"), instance: false, read_only: true,
        ja: "本人のデータを誰が、いつ、何のために見たか (救急時の閲覧を含む)。", en: "Who looked at the patient's data, when and why (emergency access included).",
        params: &[("return", "out", 1, "1", "Parameters", "one part per access")] },
    Op { id: "identifiers", code: "identifiers", resource: Some("Patient"), instance: true, read_only: true,
        ja: "本人がこれまでに持った被保険者番号 (名寄せの履歴)。", en: "Every insured-person identifier the person has held, with periods.",
        params: &[("return", "out", 1, "1", "Parameters", "identifier and period per part")] },
    Op { id: "import-eligibility", code: "import-eligibility", resource: Some("Coverage"), instance: false, read_only: false,
        ja: "資格情報 (Coverage と Patient の Bundle) を名寄せ索引に取り込む。運営者または自保険者。",
        en: "Import eligibility records (a Bundle of Coverage and Patient) into the person index. The operator, or an insurer for its own members.",
        params: &[("resource", "in", 1, "1", "Bundle", "Coverage entries with beneficiary.identifier (urn:kizuna:eligibility-person), identifier (JP_Insurance_memberID) and period"), ("return", "out", 1, "1", "Parameters", "created, updated, identifiers")] },
    Op { id: "retention-run", code: "retention-run", resource: None, instance: false, read_only: false,
        ja: "保存期間の処理を実行する (運営者)。", en: "Run retention now (the operator).",
        params: &[("return", "out", 1, "1", "Parameters", "examined, deleted and kept-by-LTS counts by kind")] },
];

/// Every OperationDefinition.
pub fn operation_definitions() -> Vec<Value> {
    OPS.iter()
        .map(|o| {
            let mut d = json!({
                "resourceType": "OperationDefinition",
                "id": o.id,
                "url": format!("{BASE}/{}", o.id),
                "text": {"status": "generated", "div": format!(
                    "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>{}</p><p>{}</p></div>",
                    o.ja, o.en
                )},
                "name": pascal(o.id),
                "title": o.ja,
                "status": "active",
                "kind": "operation",
                "description": format!("{} / {}", o.ja, o.en),
                "affectsState": !o.read_only,
                "code": o.code,
                "system": o.resource.is_none(),
                "type": o.resource.is_some() && !o.instance,
                "instance": o.instance,
                "parameter": o.params.iter().map(|(name, use_, min, max, ty, doc)| json!({
                    "name": name, "use": use_, "min": min, "max": max, "type": ty, "documentation": doc
                })).collect::<Vec<_>>()
            });
            if let Some(r) = o.resource {
                d["resource"] = json!([r]);
            }
            d
        })
        .collect()
}

/// `record-consent` → `RecordConsent`: opd-0 wants a name usable as a code identifier.
fn pascal(id: &str) -> String {
    id.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The definition with an id.
pub fn operation_definition(id: &str) -> Option<Value> {
    operation_definitions().into_iter().find(|d| d["id"] == id)
}

/// (resource type or `None` for system level, code, canonical URL) of every operation, for the
/// CapabilityStatement.
pub fn declared() -> Vec<(Option<&'static str>, &'static str, String)> {
    OPS.iter()
        .map(|o| (o.resource, o.code, format!("{BASE}/{}", o.id)))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_definition_is_well_formed() {
        let defs = super::operation_definitions();
        assert_eq!(defs.len(), super::OPS.len());
        let v = kizuna_fhir::validate::Validator::builtin();
        for d in defs {
            let oo = v.validate(&d);
            assert!(oo.issues.is_empty(), "{}: {:?}", d["id"], oo.issues);
        }
    }
}
