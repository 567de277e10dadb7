//! 資格情報 (eligibility records) as the sharing service imports them: per person, a Patient keyed
//! by the person's id (`urn:kizuna:eligibility-person`) and one Coverage per insurance period with
//! the insured-person identifier of that period. The insurers' side of the person index, so tests,
//! the demo and the benchmarks load the same thing.

use serde_json::{json, Value};

use crate::population::Person;

/// The identifier system keying eligibility records to one person.
pub const PERSON_KEY_SYSTEM: &str = "urn:kizuna:eligibility-person";

/// The insured-person identifier system of JP-CLINS (`保険者番号:記号:番号:枝番`).
pub const MEMBER_ID_SYSTEM: &str = "http://jpfhir.jp/fhir/clins/Idsystem/JP_Insurance_memberID";

/// A collection Bundle of the people's eligibility records.
pub fn bundle(people: &[&Person]) -> Value {
    let mut entries = Vec::new();
    for p in people {
        entries.push(json!({"resource": {"resourceType": "Patient",
            "identifier": [{"system": PERSON_KEY_SYSTEM, "value": p.id}],
            "gender": p.sex.fhir(), "birthDate": p.birth.iso()}}));
        for c in &p.coverage {
            let mut period = json!({"start": c.start.iso()});
            if let Some(e) = c.end {
                period["end"] = json!(e.iso());
            }
            entries.push(
                json!({"resource": {"resourceType": "Coverage", "status": "active",
                "identifier": [{"system": MEMBER_ID_SYSTEM, "value": c.member_id()}],
                "beneficiary": {"identifier": {"system": PERSON_KEY_SYSTEM, "value": p.id}},
                "period": period}}),
            );
        }
    }
    json!({"resourceType": "Bundle", "type": "collection", "entry": entries})
}
