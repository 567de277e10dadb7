//! Proof on real data: every JP-CLINS example validates against the profiles it claims with zero errors,
//! except the ones listed in `docs/conformance.md`, which break their profile; for those, the test pins
//! the exact rule and path so a change in the validator cannot silently hide or widen the difference.

use std::collections::BTreeMap;
use std::path::Path;

use kizuna_fhir::outcome::Severity;
use kizuna_fhir::validate::Validator;
use serde_json::Value;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/examples");

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            files(&e, out);
        } else if e.extension().and_then(|x| x.to_str()) == Some("json") {
            out.push(e);
        }
    }
}

/// Examples that break their own profile, with the (code, path suffix) of every error they must show.
fn exceptions() -> BTreeMap<&'static str, Vec<(&'static str, &'static str)>> {
    let display = |n: &'static str| vec![("required", n)];
    let mut m = BTreeMap::new();
    // JP_AllergyIntolerance_eCS / JP_Condition_eCS: clinicalStatus.coding.display (and verificationStatus) 1..1.
    m.insert(
        "clinical-core/AllergyIntolerance-Example-JP-Allergy-eCS-01.json",
        display("clinicalStatus.coding[0].display"),
    );
    m.insert(
        "clinical-core/AllergyIntolerance-Example-JP-Allergy-eCS-02.json",
        display("clinicalStatus.coding[0].display"),
    );
    for f in [
        "clinical-core/Condition-Example-JP-Condition-eCS-ABDPAIN.json",
        "clinical-core/Condition-Example-JP-Condition-eCS-ANGINA.json",
        "clinical-core/Condition-Example-JP-Condition-eCS-Fx.json",
        "clinical-core/Condition-Example-JP-Condition-eCS-cc1-Referral01.json",
        "clinical-core/Condition-Example-JP-Condition-eCS-cc2-Referral01.json",
        "clinical-core/Bundle-Bundle-CLINS-PCS-Example-01.json",
        "clinical-core/Bundle-Bundle-CLINS-Referral-Example-01.json",
    ] {
        m.insert(
            f,
            vec![
                ("required", "clinicalStatus.coding[0].display"),
                ("required", "verificationStatus.coding[0].display"),
            ],
        );
    }
    // FHIR: strings must not be empty (code.text is "").
    m.insert(
        "eDischargeSummary/Condition-piReferralExample01.json",
        vec![("value", "Condition.code.text")],
    );
    m.insert(
        "eReferral/generated-samples-fromEgg_Condition-piReferralExample01.json",
        vec![("value", "Condition.code.text")],
    );
    // Pre-1.10 eReferral samples: category uses doc-typecodes where JP_Composition_eReferral fixes
    // doc-subtypecodes, sections use the retired eReferral document-section system.
    for f in [
        "eDischargeSummary/Composition-compositionReferralExample01.json",
        "eReferral/generated-samples-fromEgg_Composition-compositionReferralExample01.json",
        "eReferral/ExampleJson_Bundle-BundleReferralExample01.json",
    ] {
        m.insert(
            f,
            vec![
                ("value", "category[0].coding[0].system"),
                ("code-invalid", "category[0].coding[0].code"),
            ],
        );
    }
    // Encounter.class "AMP" (外来): v3-ActCode has AMB (ambulatory), no AMP.
    for f in [
        "eDischargeSummary/Encounter-encounterReferralExample01.json",
        "eDischargeSummary/Encounter-purposeReferralExample01.json",
        "eReferral/generated-samples-fromEgg_Encounter-encounterReferralExample01.json",
        "eReferral/generated-samples-fromEgg_Encounter-purposeReferralExample01.json",
    ] {
        m.insert(f, vec![("code-invalid", "Encounter.class.code")]);
    }
    m
}

#[test]
fn every_example_conforms_or_is_a_documented_exception() {
    let v = Validator::builtin();
    let mut all = Vec::new();
    files(Path::new(EXAMPLES), &mut all);
    assert!(
        all.len() >= 100,
        "expected the 100 vendored examples, found {}",
        all.len()
    );
    let exceptions = exceptions();
    let mut problems = Vec::new();
    let mut seen_exceptions = 0;
    for f in &all {
        let rel = f
            .strip_prefix(EXAMPLES)
            .unwrap_or(f)
            .to_string_lossy()
            .trim_start_matches('/')
            .to_string();
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let r: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let oo = v.validate(&r);
        let errors: Vec<_> = oo
            .issues
            .iter()
            .filter(|i| i.severity <= Severity::Error)
            .collect();
        match exceptions.get(rel.as_str()) {
            None => {
                if !errors.is_empty() {
                    problems.push(format!(
                        "{rel}: {:#?}",
                        errors
                            .iter()
                            .map(|i| format!("{} @ {}: {}", i.code, i.expression, i.en))
                            .collect::<Vec<_>>()
                    ));
                }
            }
            Some(expected) => {
                seen_exceptions += 1;
                for (code, suffix) in expected {
                    if !errors
                        .iter()
                        .any(|i| i.code == *code && i.expression.ends_with(suffix))
                    {
                        problems.push(format!(
                            "{rel}: documented error {code} @ …{suffix} no longer reported"
                        ));
                    }
                }
                // Every error must be of a documented kind. The pre-1.10 eReferral samples break many
                // section rules for one root cause (retired code systems), documented as a group.
                for e in &errors {
                    let documented = expected.iter().any(|(c, _)| *c == e.code)
                        || rel.contains("eReferral/")
                        || rel.contains("compositionReferralExample01");
                    if !documented {
                        problems.push(format!(
                            "{rel}: undocumented error {} @ {}: {}",
                            e.code, e.expression, e.en
                        ));
                    }
                }
            }
        }
    }
    assert_eq!(
        seen_exceptions,
        exceptions.len(),
        "every documented exception file exists"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
