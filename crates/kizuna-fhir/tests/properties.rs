//! Property tests: arbitrary input never panics the readers, the validator or the FHIRPath engine, and
//! valid input round-trips (FHIRPath print/parse, XML write/read, dates).

use kizuna_fhir::fhirpath::{parse, DateTime, EvalContext, FhirPath};
use kizuna_fhir::validate::Validator;
use kizuna_fhir::xml::{from_xml, to_xml};
use kizuna_fhir::Registry;
use proptest::prelude::*;
use serde_json::{json, Value};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/examples");

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|i| json!(i)),
        "[a-zA-Z0-9 :#/._-]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("2023-01-01"),
            Just("2023-13-40"),
            Just("T10:00"),
            Just("urn:uuid:x"),
            Just("#c1")
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("id".to_string()),
                        Just("code".to_string()),
                        Just("coding".to_string()),
                        Just("system".to_string()),
                        Just("extension".to_string()),
                        Just("url".to_string()),
                        Just("valueString".to_string()),
                        Just("reference".to_string()),
                        Just("contained".to_string()),
                        Just("resourceType".to_string()),
                        Just("entry".to_string()),
                        Just("resource".to_string()),
                        Just("_birthDate".to_string()),
                        "[a-z]{1,8}",
                    ],
                    inner,
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_resource() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just("Patient"), Just("Condition"), Just("Observation"), Just("Bundle"), Just("Composition")],
        prop::collection::vec(("[a-zA-Z]{1,10}", arb_json()), 0..6),
    )
        .prop_map(|(rt, kv)| {
            let mut m: serde_json::Map<String, Value> = kv.into_iter().collect();
            m.insert("resourceType".into(), json!(rt));
            if rt == "Condition" {
                m.insert("meta".into(), json!({"profile": ["http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Condition_eCS"]}));
            }
            Value::Object(m)
        })
}

/// A generator of well-formed FHIRPath expressions.
fn arb_expr() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("name".to_string()),
        Just("Patient.name.given".to_string()),
        Just("birthDate".to_string()),
        Just("telecom.value".to_string()),
        Just("$this".to_string()),
        Just("%resource".to_string()),
        (0i32..1000).prop_map(|i| i.to_string()),
        (0u32..1000, 1u32..100).prop_map(|(a, b)| format!("{a}.{b}")),
        "[a-z ]{0,6}".prop_map(|s| format!("'{s}'")),
        Just("@2012-04-15".to_string()),
        Just("@2012-04-15T10:00:00+09:00".to_string()),
        Just("@T10:30".to_string()),
        Just("5 'mg'".to_string()),
        Just("3 days".to_string()),
        Just("true".to_string()),
        Just("{}".to_string()),
    ];
    leaf.prop_recursive(4, 32, 3, |inner| {
        prop_oneof![
            (
                inner.clone(),
                prop_oneof![
                    Just("+"),
                    Just("-"),
                    Just("*"),
                    Just("and"),
                    Just("or"),
                    Just("="),
                    Just("!="),
                    Just("<"),
                    Just("|"),
                    Just("&"),
                    Just("implies"),
                    Just("~"),
                    Just("mod")
                ],
                inner.clone()
            )
                .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
            (
                inner.clone(),
                prop_oneof![
                    Just("exists()"),
                    Just("count()"),
                    Just("first()"),
                    Just("empty()"),
                    Just("toString()"),
                    Just("distinct()"),
                    Just("not()")
                ]
            )
                .prop_map(|(a, f)| format!("({a}).{f}")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}).where({b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}).select({b})")),
            (inner.clone(), 0i32..3).prop_map(|(a, i)| format!("({a})[{i}]")),
            inner.clone().prop_map(|a| format!("-({a})")),
            (
                inner.clone(),
                prop_oneof![Just("String"), Just("Integer"), Just("FHIR.HumanName")]
            )
                .prop_map(|(a, t)| format!("({a}) is {t}")),
            (inner.clone(), inner.clone(), inner)
                .prop_map(|(a, b, c)| format!("iif({a}, {b}, {c})")),
        ]
    })
}

fn patient() -> Value {
    json!({
        "resourceType": "Patient", "id": "p1",
        "name": [{"family": "山田", "given": ["太郎", "一"]}, {"family": "ヤマダ", "given": ["タロウ"]}],
        "telecom": [{"system": "phone", "value": "03-0000-0000"}],
        "birthDate": "1974-12-25", "_birthDate": {"extension": [{"url": "x", "valueString": "y"}]}
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn validator_never_panics_on_arbitrary_resources(r in arb_resource()) {
        let oo = Validator::builtin().validate(&r);
        // Whatever happens, the answer is an outcome that FHIR can carry.
        let fhir = oo.to_fhir();
        prop_assert_eq!(fhir["resourceType"].as_str(), Some("OperationOutcome"));
    }

    #[test]
    fn json_reader_never_panics(s in "\\PC{0,200}") {
        if let Ok(v) = serde_json::from_str::<Value>(&s) {
            let _ = Validator::builtin().validate(&v);
        }
    }

    #[test]
    fn xml_reader_never_panics(s in "\\PC{0,300}") {
        let _ = from_xml(&s, Registry::builtin().model());
    }

    #[test]
    fn xml_reader_never_panics_on_damaged_fhir_xml(cut in 0usize..4000, junk in "[<>/=\"a-z ]{0,8}") {
        let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/fhirpath/input/patient-example.xml")).unwrap_or_default();
        let mut cut = cut.min(src.len());
        while !src.is_char_boundary(cut) { cut -= 1; }
        let damaged = format!("{}{}{}", &src[..cut], junk, &src[cut..]);
        let _ = from_xml(&damaged, Registry::builtin().model());
    }

    #[test]
    fn fhirpath_parser_never_panics(s in "\\PC{0,120}") {
        let _ = parse(&s);
    }

    #[test]
    fn fhirpath_round_trips_and_evaluates(src in arb_expr()) {
        let e1 = parse(&src).map_err(|e| TestCaseError::fail(format!("{src}: {e}")))?;
        let printed = e1.to_string();
        let e2 = parse(&printed).map_err(|e| TestCaseError::fail(format!("{printed}: {e}")))?;
        prop_assert_eq!(&e1, &e2, "printed as {}", printed);
        // Evaluation may fail with an error, never with a panic.
        let p = patient();
        let ctx = EvalContext::new(Registry::builtin().model()).with_resource(&p);
        if let Ok(fp) = FhirPath::parse(&src) {
            let _ = fp.evaluate_resource(&ctx, &p);
        }
    }

    #[test]
    fn dates_round_trip(y in 1u32..9999, m in 1u32..13, d in 1u32..29, h in 0u32..24, mi in 0u32..60, s in 0u32..60, tz in -12i32..14) {
        let text = format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}{}{:02}:00", if tz < 0 { '-' } else { '+' }, tz.abs());
        let parsed = DateTime::parse(&text, false);
        prop_assert!(parsed.is_some(), "{}", text);
        let text2 = parsed.map(|p| p.to_fhir_string()).unwrap_or_default();
        prop_assert_eq!(text.replace("+00:00", "Z"), text2);
    }

    #[test]
    fn date_parser_never_panics(s in "\\PC{0,40}") {
        let _ = DateTime::parse(&s, true);
        let _ = DateTime::parse(&s, false);
    }
}

/// Every vendored JSON example written as XML and read back is the same resource.
#[test]
fn xml_round_trips_every_example() {
    let model = Registry::builtin().model();
    let mut checked = 0;
    let mut stack = vec![std::path::PathBuf::from(EXAMPLES)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_default())
                .unwrap_or(Value::Null);
            let xml = to_xml(&v, model);
            let back =
                from_xml(&xml, model).unwrap_or_else(|e| panic!("{}: {e}\n{xml}", p.display()));
            let (a, b) = (normalise(&v), normalise(&back));
            assert!(
                a == b,
                "{}: first difference at {}",
                p.display(),
                first_diff(&a, &b, "").unwrap_or_default()
            );
            checked += 1;
        }
    }
    assert!(checked >= 100);
}

/// Numbers compare by value (XML has no distinction between 1.0 and 1.00 once parsed); drop empty text.
fn normalise(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), normalise(x)))
                .collect::<serde_json::Map<_, _>>(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
        Value::Number(n) => json!(n.as_f64()),
        Value::String(s) if s.starts_with("<div") => {
            json!(s.replacen(" xmlns=\"http://www.w3.org/1999/xhtml\"", "", 1))
        }
        other => other.clone(),
    }
}

fn first_diff(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => {
                        if let Some(d) = first_diff(v, w, &format!("{path}.{k}")) {
                            return Some(d);
                        }
                    }
                    None => return Some(format!("{path}.{k} missing after round trip")),
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| format!("{path}.{k} added by round trip"))
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_diff(v, w, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} != {b}")),
    }
}

/// Every function of the library, called with 0 to 3 arguments on several inputs, answers or errs;
/// none panics (arity is checked before arguments are used).
#[test]
fn every_function_with_any_arity_never_panics() {
    const FUNCTIONS: &[&str] = &[
        "empty",
        "exists",
        "all",
        "allTrue",
        "anyTrue",
        "allFalse",
        "anyFalse",
        "subsetOf",
        "supersetOf",
        "count",
        "distinct",
        "isDistinct",
        "where",
        "select",
        "repeat",
        "ofType",
        "is",
        "as",
        "single",
        "first",
        "last",
        "tail",
        "skip",
        "take",
        "intersect",
        "exclude",
        "union",
        "combine",
        "iif",
        "not",
        "toBoolean",
        "convertsToBoolean",
        "toInteger",
        "convertsToInteger",
        "toLong",
        "toDecimal",
        "convertsToDecimal",
        "toString",
        "convertsToString",
        "toDate",
        "convertsToDate",
        "toDateTime",
        "convertsToDateTime",
        "toTime",
        "convertsToTime",
        "toQuantity",
        "convertsToQuantity",
        "indexOf",
        "lastIndexOf",
        "substring",
        "startsWith",
        "endsWith",
        "contains",
        "upper",
        "lower",
        "trim",
        "length",
        "toChars",
        "replace",
        "matches",
        "matchesFull",
        "replaceMatches",
        "split",
        "join",
        "encode",
        "decode",
        "escape",
        "unescape",
        "abs",
        "ceiling",
        "floor",
        "truncate",
        "exp",
        "ln",
        "sqrt",
        "log",
        "power",
        "round",
        "precision",
        "lowBoundary",
        "highBoundary",
        "comparable",
        "children",
        "descendants",
        "trace",
        "now",
        "today",
        "timeOfDay",
        "type",
        "aggregate",
        "sort",
        "extension",
        "hasValue",
        "getValue",
        "htmlChecks",
        "resolve",
        "memberOf",
        "conformsTo",
        "elementDefinition",
        "slice",
        "checkModifiers",
    ];
    let inputs = [
        "Patient.name",
        "'abc'",
        "3.5",
        "@2012-01",
        "5 'mg'",
        "{}",
        "(1 | 2)",
        "Patient.birthDate",
    ];
    let args = ["", "1", "'x', 2", "$this, 'y', 3"];
    let p = patient();
    let ctx = EvalContext::new(Registry::builtin().model()).with_resource(&p);
    for f in FUNCTIONS {
        for i in inputs {
            for a in args {
                let src = format!("({i}).{f}({a})");
                if let Ok(e) = FhirPath::parse(&src) {
                    let _ = e.evaluate_resource(&ctx, &p);
                }
            }
        }
    }
}

/// Pathologically long or deep expressions are refused, not a stack overflow.
#[test]
fn huge_expressions_are_refused() {
    for src in [
        "-".repeat(100_000) + "1",
        "(".repeat(100_000) + "1" + &")".repeat(100_000),
        "1".to_string() + &" + 1".repeat(100_000),
        "a".to_string() + &".b".repeat(100_000),
    ] {
        assert!(parse(&src).is_err());
    }
}
