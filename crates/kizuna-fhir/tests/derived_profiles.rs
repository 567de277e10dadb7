//! A resource is checked once against a profile and the profiles it derives from: JP-CLINS
//! observations contain an Encounter claiming JP_Encounter_eCS in a slice typed JP_Encounter, and
//! checking both reported every fault twice and cost a third of a bundle's contained validation.
//! Profiles that do not derive from one another are still each applied.

use kizuna_fhir::outcome::Severity;
use kizuna_fhir::validate::Validator;
use serde_json::Value;

const BUNDLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/examples/hapisample-2025-02/Bundle-Bundle-CLINS-Observations-Example-01.json"
);
const OBS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/examples/clinical-core/Observation-Example-JP-Obs-LabResult-eCS-K.json"
);
const JP_ENCOUNTER: &str = "http://jpfhir.jp/fhir/core/StructureDefinition/JP_Encounter";
const JP_ENCOUNTER_ECS: &str = "http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Encounter_eCS";

fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The error messages reported at `path`, with the profile each came from.
fn errors_at(v: &Validator, doc: &Value, profiles: &[String], path: &str) -> Vec<(String, String)> {
    v.validate_with(doc, profiles)
        .issues
        .iter()
        .filter(|i| i.severity <= Severity::Error && i.expression == path)
        .map(|i| (i.en.clone(), i.rule.clone().unwrap_or_default()))
        .collect()
}

/// Each fault once, and from `profile`.
fn once_from(errors: &[(String, String)], profile: &str) {
    assert!(!errors.is_empty(), "the fault was not reported");
    for (k, (en, rule)) in errors.iter().enumerate() {
        assert_eq!(rule, profile, "{en}");
        assert!(
            errors[..k].iter().all(|(e, _)| e != en),
            "reported twice: {en}"
        );
    }
}

#[test]
fn a_profile_knows_the_chain_it_derives_from() {
    let v = Validator::builtin();
    let ecs = v.profile(JP_ENCOUNTER_ECS).expect("JP_Encounter_eCS");
    assert!(ecs.covers(JP_ENCOUNTER));
    assert!(
        ecs.covers(&format!("{JP_ENCOUNTER}|1.1.2")),
        "versions are ignored"
    );
    assert!(ecs.covers("http://hl7.org/fhir/StructureDefinition/Encounter"));
    assert!(ecs.covers(JP_ENCOUNTER_ECS));
    assert!(!ecs.covers("http://jpfhir.jp/fhir/core/StructureDefinition/JP_Practitioner"));
    let core = v.profile(JP_ENCOUNTER).expect("JP_Encounter");
    assert!(
        !core.covers(JP_ENCOUNTER_ECS),
        "a base does not cover what derives from it"
    );
}

#[test]
fn a_contained_resource_in_a_slice_is_checked_once_against_its_derived_claim() {
    let v = Validator::builtin();
    let mut doc = load(BUNDLE);
    let enc = &mut doc["entry"][1]["resource"]["contained"][0];
    assert_eq!(enc["resourceType"], "Encounter");
    assert_eq!(enc["meta"]["profile"][0], JP_ENCOUNTER_ECS);
    enc["status"] = Value::from("somewhere");
    let path = "Bundle.entry[1].resource.contained[0].status";
    once_from(&errors_at(v, &doc, &[], path), JP_ENCOUNTER_ECS);
    // Naming the base profile as well adds no second check of the same rules.
    let enc = doc["entry"][1]["resource"]["contained"][0].clone();
    let both = [JP_ENCOUNTER_ECS.to_string(), JP_ENCOUNTER.to_string()];
    once_from(
        &errors_at(v, &enc, &both, "Encounter.status"),
        JP_ENCOUNTER_ECS,
    );
    let base_named = [JP_ENCOUNTER.to_string()];
    once_from(
        &errors_at(v, &enc, &base_named, "Encounter.status"),
        JP_ENCOUNTER_ECS,
    );
}

#[test]
fn profiles_that_do_not_derive_from_one_another_are_each_applied() {
    let v = Validator::builtin();
    let obs = load(OBS);
    assert!(!v.validate(&obs).has_errors());
    // The vital-signs profile is a sibling of JP_Observation_LabResult_eCS, not a base: its own
    // rules (a vital-signs category) still apply to a laboratory result.
    let vitals =
        ["http://jpfhir.jp/fhir/core/StructureDefinition/JP_Observation_VitalSigns".to_string()];
    let oo = v.validate_with(&obs, &vitals);
    assert!(
        oo.issues.iter().any(|i| i.severity <= Severity::Error
            && i.rule.as_deref() == Some(vitals[0].as_str())),
        "{:#?}",
        oo.issues
    );
}
