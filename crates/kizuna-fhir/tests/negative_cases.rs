//! Negative cases: valid JP-CLINS examples, each broken in one way, must be rejected with the right
//! issue code at the right element path — and the unbroken originals must pass (so a case cannot pass
//! by the validator rejecting everything).

use kizuna_fhir::outcome::Severity;
use kizuna_fhir::validate::Validator;
use serde_json::{json, Value};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/examples");

fn load(rel: &str) -> Value {
    let text = std::fs::read_to_string(format!("{EXAMPLES}/{rel}"))
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

const COND: &str = "clinical-core/Condition-Example-JP-Condition-eCS-01.json";
const OBS: &str = "clinical-core/Observation-Example-JP-Obs-LabResult-eCS-K.json";
const PAT: &str = "clinical-core/Patient-Example-JP-Patient-eCS-MAKINO.json";
/// A core R4 extension (value `dateTime`) that JP_Condition_eCS does not slice.
const ASSERTED_DATE: &str = "http://hl7.org/fhir/StructureDefinition/condition-assertedDate";
const BUNDLE: &str = "hapisample-2025-02/Bundle-Bundle-CLINS-Observations-Example-01.json";

/// One mutation of a JSON document.
enum Op {
    Set(&'static str, Value),
    Remove(&'static str),
    Push(&'static str, Value),
    Swap(&'static str, usize, usize),
}

fn parent<'a>(v: &'a mut Value, ptr: &str) -> (&'a mut Value, String) {
    let (p, last) = ptr.rsplit_once('/').unwrap_or(("", ptr));
    let target = if p.is_empty() {
        v
    } else {
        v.pointer_mut(p).unwrap_or_else(|| panic!("no {p}"))
    };
    (target, last.to_string())
}

fn apply(v: &mut Value, op: &Op) {
    match op {
        Op::Set(ptr, val) => {
            let (t, last) = parent(v, ptr);
            match t {
                Value::Object(o) => {
                    o.insert(last, val.clone());
                }
                Value::Array(a) => {
                    let i: usize = last.parse().unwrap_or(0);
                    a[i] = val.clone();
                }
                _ => panic!("cannot set {ptr}"),
            }
        }
        Op::Remove(ptr) => {
            let (t, last) = parent(v, ptr);
            match t {
                Value::Object(o) => {
                    o.shift_remove(&last)
                        .unwrap_or_else(|| panic!("nothing at {ptr}"));
                }
                Value::Array(a) => {
                    a.remove(last.parse().unwrap_or(0));
                }
                _ => panic!("cannot remove {ptr}"),
            }
        }
        Op::Push(ptr, val) => v
            .pointer_mut(ptr)
            .and_then(Value::as_array_mut)
            .unwrap_or_else(|| panic!("no array {ptr}"))
            .push(val.clone()),
        Op::Swap(ptr, i, j) => v
            .pointer_mut(ptr)
            .and_then(Value::as_array_mut)
            .unwrap_or_else(|| panic!("no array {ptr}"))
            .swap(*i, *j),
    }
}

struct Case {
    name: &'static str,
    base: &'static str,
    ops: Vec<Op>,
    /// Expected issue code and element path of an error.
    code: &'static str,
    expression: &'static str,
    /// Validate against this profile too.
    profile: Option<&'static str>,
}

fn case(
    name: &'static str,
    base: &'static str,
    ops: Vec<Op>,
    code: &'static str,
    expression: &'static str,
) -> Case {
    Case {
        name,
        base,
        ops,
        code,
        expression,
        profile: None,
    }
}

fn cases() -> Vec<Case> {
    let ext_both = json!({
        "url": "http://jpfhir.jp/fhir/eCS/Extension/StructureDefinition/JP_eCS_Department",
        "valueCodeableConcept": {"text": "x"},
        "extension": [{"url": "a", "valueString": "b"}]
    });
    vec![
        // Missing required elements
        case(
            "missing code",
            COND,
            vec![Op::Remove("/code")],
            "required",
            "Condition.code",
        ),
        case(
            "missing subject",
            COND,
            vec![Op::Remove("/subject")],
            "required",
            "Condition.subject",
        ),
        case(
            "missing observation status",
            OBS,
            vec![Op::Remove("/status")],
            "required",
            "Observation.status",
        ),
        case(
            "missing bundle timestamp",
            BUNDLE,
            vec![Op::Remove("/timestamp")],
            "required",
            "Bundle.timestamp",
        ),
        case(
            "missing meta.lastUpdated",
            BUNDLE,
            vec![Op::Remove("/meta/lastUpdated")],
            "required",
            "Bundle.meta.lastUpdated",
        ),
        case(
            "missing entry fullUrl",
            BUNDLE,
            vec![Op::Remove("/entry/0/fullUrl")],
            "required",
            "Bundle.entry[0].fullUrl",
        ),
        case(
            "missing coding display (JP rule)",
            COND,
            vec![Op::Remove("/clinicalStatus/coding/0/display")],
            "required",
            "Condition.clinicalStatus.coding[0].display",
        ),
        // Too many
        case(
            "two categories where one allowed",
            OBS,
            vec![Op::Push("/category", json!({"text": "x"}))],
            "structure",
            "Observation.category",
        ),
        case(
            "two patients in a CLINS bundle",
            BUNDLE,
            vec![
                Op::Push("/entry", json!(null)),
                Op::Set("/entry/5", json!(null)),
            ],
            "structure",
            "Bundle.entry",
        ),
        // Wrong JSON shape and types
        case(
            "complex given as string",
            COND,
            vec![Op::Set("/clinicalStatus", json!("active"))],
            "structure",
            "Condition.clinicalStatus",
        ),
        case(
            "array given as object",
            COND,
            vec![Op::Set("/identifier", json!({"value": "1"}))],
            "structure",
            "Condition.identifier",
        ),
        case(
            "single given as array",
            COND,
            vec![Op::Set("/subject", json!([{"reference": "Patient/1"}]))],
            "structure",
            "Condition.subject",
        ),
        case(
            "boolean as string",
            PAT,
            vec![Op::Set("/active", json!("yes"))],
            "value",
            "Patient.active",
        ),
        case(
            "decimal as string",
            OBS,
            vec![Op::Set("/valueQuantity/value", json!("4.2"))],
            "value",
            "Observation.valueQuantity.value",
        ),
        case(
            "choice type not allowed",
            COND,
            vec![Op::Set("/onsetBoolean", json!(true))],
            "structure",
            "Condition.onsetBoolean",
        ),
        case(
            "empty object",
            COND,
            vec![Op::Set("/code", json!({}))],
            "required",
            "Condition.code",
        ),
        case(
            "empty array",
            COND,
            vec![Op::Set("/note", json!([]))],
            "structure",
            "Condition.note",
        ),
        case(
            "_element not an object",
            COND,
            vec![Op::Set("/_language", json!("x"))],
            "structure",
            "Condition.language",
        ),
        // Unknown elements
        case(
            "unknown top-level element",
            COND,
            vec![Op::Set("/foo", json!(1))],
            "structure",
            "Condition.foo",
        ),
        case(
            "unknown nested element",
            COND,
            vec![Op::Set("/code/codingX", json!([]))],
            "structure",
            "Condition.code.codingX",
        ),
        case(
            "unknown element in contained",
            COND,
            vec![Op::Set("/contained/0/bogus", json!("x"))],
            "structure",
            "Condition.contained[0].bogus",
        ),
        case(
            "unknown resourceType",
            COND,
            vec![Op::Set("/resourceType", json!("Conditionn"))],
            "structure",
            "",
        ),
        case(
            "unknown contained resourceType",
            COND,
            vec![Op::Set("/contained/0/resourceType", json!("Foo"))],
            "structure",
            "Condition.contained[0]",
        ),
        // Primitive formats
        case(
            "bad date",
            PAT,
            vec![Op::Set("/birthDate", json!("1980-02-30"))],
            "value",
            "Patient.birthDate",
        ),
        case(
            "dateTime with time but no zone",
            COND,
            vec![Op::Set("/recordedDate", json!("2023-04-01T10:00"))],
            "value",
            "Condition.recordedDate",
        ),
        case(
            "bad instant",
            BUNDLE,
            vec![Op::Set("/timestamp", json!("2023-11-12"))],
            "value",
            "Bundle.timestamp",
        ),
        case(
            "bad id",
            COND,
            vec![Op::Set("/id", json!("bad id!"))],
            "value",
            "Condition.id",
        ),
        case(
            "empty string",
            COND,
            vec![Op::Set("/code/text", json!(""))],
            "value",
            "Condition.code.text",
        ),
        case(
            "code with leading space",
            OBS,
            vec![Op::Set("/status", json!(" final"))],
            "value",
            "Observation.status",
        ),
        // Codes and bindings
        case(
            "code not in local CodeSystem",
            COND,
            vec![Op::Set("/clinicalStatus/coding/0/code", json!("bogus"))],
            "code-invalid",
            "Condition.clinicalStatus.coding[0].code",
        ),
        case(
            "status not in required value set",
            OBS,
            vec![Op::Set("/status", json!("done"))],
            "code-invalid",
            "Observation.status",
        ),
        case(
            "gender not in required value set",
            PAT,
            vec![Op::Set("/gender", json!("m"))],
            "code-invalid",
            "Patient.gender",
        ),
        // Fixed values and slices
        case(
            "fixed Bundle.type",
            BUNDLE,
            vec![Op::Set("/type", json!("document"))],
            "value",
            "Bundle.type",
        ),
        case(
            "fixed identifier system",
            BUNDLE,
            vec![Op::Set("/identifier/system", json!("urn:x"))],
            "value",
            "Bundle.identifier.system",
        ),
        case(
            "required slice missing (category)",
            OBS,
            vec![Op::Set("/category/0/coding/0/code", json!("vital-signs"))],
            "required",
            "Observation.category",
        ),
        case(
            "closed slicing: entry matches no slice",
            BUNDLE,
            vec![Op::Push(
                "/entry",
                json!({"fullUrl": "urn:uuid:00000000-0000-0000-0000-000000000001", "resource": {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}}}),
            )],
            "structure",
            "Bundle.entry[5]",
        ),
        case(
            "bundle tag slice missing",
            BUNDLE,
            vec![Op::Remove("/meta/tag")],
            "required",
            "Bundle.meta.tag",
        ),
        // Invariants (including the JP-CLINS numbered rules)
        case(
            "R2152 bundle identifier format",
            BUNDLE,
            vec![Op::Set("/identifier/value", json!("131881479^2024^x"))],
            "invariant",
            "Bundle",
        ),
        case(
            "R0211 first entry is Patient",
            BUNDLE,
            vec![Op::Swap("/entry", 0, 1)],
            "invariant",
            "Bundle",
        ),
        case(
            "R9012 institution number 10 digits",
            BUNDLE,
            vec![Op::Set(
                "/entry/1/resource/extension/0/valueIdentifier/value",
                json!("131881479"),
            )],
            "invariant",
            "Bundle",
        ),
        case(
            "ext-1 value and extensions",
            COND,
            vec![Op::Set("/extension/1", ext_both)],
            "invariant",
            "Condition.extension[1]",
        ),
        case(
            "dom-3 unreferenced contained",
            COND,
            vec![Op::Push(
                "/contained",
                json!({"resourceType": "Practitioner", "id": "lonely"}),
            )],
            "invariant",
            "Condition.contained[1]",
        ),
        // References
        case(
            "reference not in bundle",
            BUNDLE,
            vec![Op::Set(
                "/entry/1/resource/subject/reference",
                json!("urn:uuid:11111111-2222-3333-4444-555555555555"),
            )],
            "not-found",
            "Bundle.entry[1].resource.subject.reference",
        ),
        case(
            "contained reference missing",
            COND,
            vec![Op::Set("/encounter", json!({"reference": "#nope"}))],
            "not-found",
            "Condition.encounter.reference",
        ),
        // Core extensions no profile slices, checked against their R4 definitions by URL
        case(
            "core extension with a value of the wrong type",
            COND,
            vec![Op::Push(
                "/extension",
                json!({"url": ASSERTED_DATE, "valueString": "昨日"}),
            )],
            "structure",
            "Condition.extension[2].valueString",
        ),
        case(
            "core extension with a bad value",
            COND,
            vec![Op::Push(
                "/extension",
                json!({"url": ASSERTED_DATE, "valueDateTime": "2024-13-01"}),
            )],
            "value",
            "Condition.extension[2].valueDateTime",
        ),
        case(
            "core extension code outside its required binding",
            COND,
            vec![Op::Push(
                "/extension",
                json!({"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                       "valueCode": "forgotten"}),
            )],
            "code-invalid",
            "Condition.extension[2].valueCode",
        ),
        case(
            "core extension code outside an HL7 v3 value set",
            COND,
            vec![Op::Push(
                "/extension",
                json!({"url": "http://hl7.org/fhir/StructureDefinition/iso21090-nullFlavor",
                       "valueCode": "NOPE"}),
            )],
            "code-invalid",
            "Condition.extension[2].valueCode",
        ),
        // Core extensions outside the context their definitions allow
        case(
            "name extension on a resource",
            COND,
            vec![Op::Push(
                "/extension",
                json!({"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "IDE"}),
            )],
            "structure",
            "Condition.extension[2]",
        ),
        case(
            "Coding extension on a CodeableConcept",
            COND,
            vec![Op::Set(
                "/code/extension",
                json!([{"url": "http://hl7.org/fhir/StructureDefinition/coding-sctdescid", "valueId": "123"}]),
            )],
            "structure",
            "Condition.code.extension[0]",
        ),
        case(
            "Observation extension on a primitive",
            OBS,
            vec![Op::Set(
                "/_status",
                json!({"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/observation-delta", "valueCodeableConcept": {"text": "x"}}]}),
            )],
            "structure",
            "Observation.status.extension[0]",
        ),
        case(
            "literal reference to a resource of the wrong type",
            COND,
            vec![Op::Set(
                "/subject",
                json!({"reference": "Organization/123"}),
            )],
            "structure",
            "Condition.subject.reference",
        ),
        case(
            "absolute reference to a resource of the wrong type",
            COND,
            vec![Op::Set(
                "/subject",
                json!({"reference": "https://example.jp/fhir/Practitioner/9/_history/2"}),
            )],
            "structure",
            "Condition.subject.reference",
        ),
        case(
            "unknown modifier extension",
            COND,
            vec![Op::Set(
                "/modifierExtension",
                json!([{"url": "http://example.jp/fhir/StructureDefinition/negated", "valueBoolean": true}]),
            )],
            "extension",
            "Condition.modifierExtension[0]",
        ),
        case(
            "ordinary extension sent as a modifier",
            COND,
            vec![Op::Set(
                "/modifierExtension",
                json!([{"url": ASSERTED_DATE, "valueDateTime": "2024-04-01"}]),
            )],
            "structure",
            "Condition.modifierExtension[0]",
        ),
        Case {
            name: "resource against a profile of another type",
            base: COND,
            ops: vec![],
            code: "invalid",
            expression: "Condition",
            profile: Some(
                "http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Observation_LabResult_eCS",
            ),
        },
    ]
}

#[test]
fn bases_are_valid() {
    let v = Validator::builtin();
    for base in [COND, OBS, PAT, BUNDLE] {
        let oo = v.validate(&load(base));
        assert!(!oo.has_errors(), "{base} should be valid: {:#?}", oo.issues);
    }
}

#[test]
fn every_negative_case_is_rejected_at_the_right_path() {
    let v = Validator::builtin();
    let all = cases();
    assert!(
        all.len() >= 40,
        "at least 40 negative cases, have {}",
        all.len()
    );
    let mut failures = Vec::new();
    for c in &all {
        let mut doc = load(c.base);
        for op in &c.ops {
            apply(&mut doc, op);
        }
        // A null pushed entry is a placeholder for a second Patient entry.
        if c.name == "two patients in a CLINS bundle" {
            let first = doc["entry"][0].clone();
            let mut second = first.clone();
            second["fullUrl"] = json!("urn:uuid:00000000-0000-0000-0000-0000000000aa");
            doc["entry"][5] = second;
        }
        let profiles: Vec<String> = c.profile.iter().map(|p| p.to_string()).collect();
        let oo = v.validate_with(&doc, &profiles);
        let hit = oo.issues.iter().any(|i| {
            i.severity <= Severity::Error && i.code == c.code && i.expression == c.expression
        });
        if !hit {
            let got: Vec<String> = oo
                .issues
                .iter()
                .filter(|i| i.severity <= Severity::Error)
                .map(|i| format!("{} @ {} ({})", i.code, i.expression, i.en))
                .collect();
            failures.push(format!(
                "{}: want {} @ {:?}; got {:#?}",
                c.name, c.code, c.expression, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The structure-only validator (used to compare with validators that check no more) still rejects
/// structural faults, but not broken invariants or codes outside a required binding, which the full
/// validator rejects.
#[test]
fn structure_only_skips_invariants_and_bindings_but_not_structure() {
    use kizuna_fhir::{terminology::Terminology, Registry};
    let full = Validator::builtin();
    let structural = Validator::structure_only(Registry::builtin(), Terminology::builtin());
    let base = json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "体重"}, "valueQuantity": {"value": 60, "unit": "kg"}});
    let errors = |v: &Validator, r: &Value| {
        v.validate(r)
            .issues
            .iter()
            .filter(|i| i.severity <= Severity::Error)
            .map(|i| i.expression.clone())
            .collect::<Vec<_>>()
    };
    assert!(errors(full, &base).is_empty(), "{:?}", errors(full, &base));
    assert!(errors(&structural, &base).is_empty());
    // obs-6: dataAbsentReason only when there is no value (an invariant).
    let mut inv = base.clone();
    inv["dataAbsentReason"] = json!({"text": "不明"});
    assert!(!errors(full, &inv).is_empty());
    assert!(errors(&structural, &inv).is_empty());
    // status outside its required value set (a binding).
    let mut bound = base.clone();
    bound["status"] = json!("almost-final");
    assert!(!errors(full, &bound).is_empty());
    assert!(errors(&structural, &bound).is_empty());
    // Structural faults: unknown element, wrong type, wrong cardinality shape, bad primitive.
    for (ptr, val) in [
        ("/colour", json!("red")),
        ("/status", json!(7)),
        ("/code", json!([{"text": "x"}])),
        ("/effectiveDateTime", json!("2024-13-45")),
    ] {
        let mut bad = base.clone();
        let key = &ptr[1..];
        bad[key] = val;
        let e = errors(&structural, &bad);
        assert!(
            !e.is_empty(),
            "{ptr} accepted by the structure-only validator"
        );
        assert!(e.iter().any(|p| p.contains(key)), "{ptr}: {e:?}");
    }
}

/// Extensions by URL: a valid core extension and an unknown one outside the core namespace pass
/// without a word; an unknown URL in the core namespace (where all of R4's are loaded) is a
/// warning, not an error, since later FHIR versions add extensions there.
#[test]
fn extensions_are_looked_up_by_url() {
    let v = Validator::builtin();
    let with = |ext: Value| {
        let mut doc = load(COND);
        apply(&mut doc, &Op::Push("/extension", ext));
        v.validate(&doc)
    };
    let about_extension = |oo: &kizuna_fhir::outcome::OperationOutcome| -> Vec<String> {
        oo.issues
            .iter()
            .filter(|i| i.expression.starts_with("Condition.extension[2]"))
            .map(|i| format!("{:?} {} @ {}: {}", i.severity, i.code, i.expression, i.en))
            .collect()
    };
    let valid = with(json!({"url": ASSERTED_DATE, "valueDateTime": "2024-04-01"}));
    assert!(!valid.has_errors(), "{:#?}", valid.issues);
    assert_eq!(about_extension(&valid), Vec::<String>::new());

    let local = with(
        json!({"url": "http://example.jp/fhir/StructureDefinition/local", "valueString": "x"}),
    );
    assert!(!local.has_errors(), "{:#?}", local.issues);
    assert_eq!(about_extension(&local), Vec::<String>::new());

    let misspelt = with(
        json!({"url": "http://hl7.org/fhir/StructureDefinition/condition-assertedDat", "valueDateTime": "2024-04-01"}),
    );
    assert!(!misspelt.has_errors(), "{:#?}", misspelt.issues);
    let found = about_extension(&misspelt);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("Warning not-found @ Condition.extension[2]:"),
        "{found:#?}"
    );

    // Placements their definitions allow: on the resource, in a data type inside a data type,
    // on a Quantity through `valueQuantity`, on a primitive, and `Element` (anywhere).
    let placements: [(&str, Op); 5] = [
        (
            OBS,
            Op::Push(
                "/extension",
                json!({"url": "http://hl7.org/fhir/StructureDefinition/observation-delta", "valueCodeableConcept": {"text": "x"}}),
            ),
        ),
        (
            COND,
            Op::Set(
                "/code/coding/0/extension",
                json!([{"url": "http://hl7.org/fhir/StructureDefinition/coding-sctdescid", "valueId": "123"}]),
            ),
        ),
        (
            OBS,
            Op::Set(
                "/valueQuantity/extension",
                json!([{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-uncertaintyType", "valueCode": "N"}]),
            ),
        ),
        (
            OBS,
            Op::Set(
                "/_status",
                json!({"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]}),
            ),
        ),
        (
            OBS,
            Op::Set(
                "/subject/extension",
                json!([{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]),
            ),
        ),
    ];
    for (base, op) in &placements {
        let mut doc = load(base);
        apply(&mut doc, op);
        let oo = v.validate(&doc);
        assert!(!oo.has_errors(), "{base}: {:#?}", oo.issues);
    }

    // A modifier extension sent as an ordinary one (request-doNotPerform is one, for NutritionOrder).
    let hidden = with(
        json!({"url": "http://hl7.org/fhir/StructureDefinition/request-doNotPerform", "valueBoolean": true}),
    );
    assert!(
        hidden
            .issues
            .iter()
            .any(|i| i.expression == "Condition.extension[2]"
                && i.severity == Severity::Error
                && i.en.contains("must be sent as modifierExtension")),
        "{:#?}",
        hidden.issues
    );

    // References whose target type is right, or cannot be known, pass.
    for subject in [
        json!({"reference": "Patient/123"}),
        json!({"reference": "https://example.jp/fhir/Patient/9/_history/2"}),
        json!({"identifier": {"system": "urn:oid:1.2.392.100495.20.3.51.11318814790", "value": "1"}}),
    ] {
        let mut doc = load(COND);
        apply(&mut doc, &Op::Set("/subject", subject.clone()));
        let oo = v.validate(&doc);
        assert!(
            !oo.issues
                .iter()
                .any(|i| i.expression.starts_with("Condition.subject")
                    && i.severity <= Severity::Error),
            "{subject}: {:#?}",
            oo.issues
        );
    }

    // A URL naming a definition that is not an extension is not used as one.
    let not_an_extension =
        with(json!({"url": "http://hl7.org/fhir/StructureDefinition/Patient", "valueString": "x"}));
    assert!(
        !not_an_extension.has_errors(),
        "{:#?}",
        not_an_extension.issues
    );
}

/// A fault two claimed profiles both see (JP_Encounter and the base Encounter bind `class`) is
/// reported once.
#[test]
fn a_fault_seen_by_two_profiles_is_reported_once() {
    let v = Validator::builtin();
    let oo = v.validate(&load(
        "eDischargeSummary/Encounter-purposeReferralExample01.json",
    ));
    let at_class: Vec<_> = oo
        .issues
        .iter()
        .filter(|i| i.expression == "Encounter.class.code")
        .collect();
    assert_eq!(at_class.len(), 1, "{at_class:#?}");
    assert_eq!(at_class[0].code, "code-invalid");
}
