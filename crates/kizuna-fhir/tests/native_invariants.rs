//! The validator decides dom-2, dom-4, dom-5 and dom-6 on the JSON instead of running their
//! FHIRPath. These tests hold the native answers to the engine's, over every example resource
//! (bundle entries and contained resources included) and over random shapes of the elements the
//! four rules read.

use kizuna_fhir::fhirpath::{EvalContext, FhirPath, Item};
use kizuna_fhir::validate::dom_invariant;
use kizuna_fhir::Registry;
use proptest::prelude::*;
use serde_json::{json, Value};

const RULES: [(&str, &str); 4] = [
    ("dom-2", "contained.contained.empty()"),
    (
        "dom-4",
        "contained.meta.versionId.empty() and contained.meta.lastUpdated.empty()",
    ),
    ("dom-5", "contained.meta.security.empty()"),
    ("dom-6", "text.`div`.exists()"),
];

/// Native and engine answers for one resource, as `(key, native, engine)`.
fn answers(r: &Value) -> Vec<(&'static str, Option<bool>, Option<bool>)> {
    let model = Registry::builtin().model();
    RULES
        .iter()
        .map(|(key, src)| {
            let expr = FhirPath::parse(src).expect("the base expressions parse");
            let ctx = EvalContext::new(model).with_resource(r);
            let engine = expr
                .evaluate_bool(&ctx, vec![Item::resource(r)])
                .unwrap_or_else(|e| panic!("{key} on {r}: {e}"));
            (*key, dom_invariant(key, src, r), engine)
        })
        .collect()
}

/// Every DomainResource in a document: itself, its Bundle entries and their contained resources.
fn resources<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    if v.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        out.push(v);
    }
    for e in v
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(r) = e.get("resource") {
            resources(r, out);
        }
    }
    for c in v
        .get("contained")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        resources(c, out);
    }
}

fn example_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            example_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

#[test]
fn the_native_rules_agree_with_the_engine_on_every_example() {
    let mut files = Vec::new();
    example_files(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data/examples")),
        &mut files,
    );
    assert!(files.len() > 50, "examples found: {}", files.len());
    let (mut checked, mut failing) = (0, 0);
    for f in &files {
        let text = std::fs::read_to_string(f).expect("readable example");
        let Ok(doc) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let mut rs = Vec::new();
        resources(&doc, &mut rs);
        for r in rs {
            for (key, native, engine) in answers(r) {
                assert_eq!(native, engine, "{key} in {}", f.display());
                checked += 1;
                failing += usize::from(engine == Some(false));
            }
        }
    }
    // Both answers occur: the examples without narrative fail dom-6.
    assert!(
        checked > 1000 && failing > 0,
        "{checked} checked, {failing} failing"
    );
}

#[test]
fn other_rules_and_changed_expressions_are_left_to_the_engine() {
    let r = json!({"resourceType": "Patient"});
    assert_eq!(dom_invariant("dom-3", "anything", &r), None);
    assert_eq!(dom_invariant("ele-1", "hasValue()", &r), None);
    assert_eq!(dom_invariant("dom-6", "text.exists()", &r), None);
    assert_eq!(
        dom_invariant("dom-6", "text.`div`.exists()", &r),
        Some(false)
    );
}

/// A value the rules may meet where an element is expected: absent, null, an object, an
/// array (empty, with nulls, with objects).
fn shape(inner: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        inner.clone().prop_map(Some),
        Just(Some(json!([]))),
        Just(Some(json!([null]))),
        prop::collection::vec(inner, 1..3).prop_map(|v| Some(Value::Array(v))),
    ]
    .boxed()
}

fn with(mut obj: Value, key: &str, v: Option<Value>) -> Value {
    if let (Some(v), Some(m)) = (v, obj.as_object_mut()) {
        m.insert(key.to_string(), v);
    }
    obj
}

fn primitive() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(json!("1")),
        Just(json!("2024-04-01T09:00:00+09:00")),
        Just(json!({"extension": [{"url": "http://example.org/x", "valueString": "x"}]})),
    ]
    .boxed()
}

fn meta() -> impl Strategy<Value = Value> {
    (
        shape(primitive()),
        shape(primitive()),
        shape(primitive()),
        shape(Just(json!({"code": "R"})).boxed()),
    )
        .prop_map(|(vid, ext, lu, sec)| {
            let m = with(json!({}), "versionId", vid);
            let m = with(m, "_versionId", ext);
            let m = with(m, "lastUpdated", lu);
            with(m, "security", sec)
        })
}

fn contained() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just("Practitioner"),
            Just("Encounter"),
            Just("Organization")
        ],
        shape(meta().boxed()),
        shape(Just(json!({"resourceType": "Patient", "id": "x"})).boxed()),
    )
        .prop_map(|(rt, m, c)| {
            let r = with(json!({"resourceType": rt, "id": "c"}), "meta", m);
            with(r, "contained", c)
        })
}

fn text() -> impl Strategy<Value = Option<Value>> {
    shape(
        (
            shape(Just(json!("<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>")).boxed()),
            shape(primitive()),
        )
            .prop_map(|(div, ext)| {
                let t = with(json!({"status": "generated"}), "div", div);
                with(t, "_div", ext)
            })
            .boxed(),
    )
}

proptest! {
    #[test]
    fn the_native_rules_agree_with_the_engine_on_random_shapes(
        cs in shape(contained().boxed()),
        t in text(),
    ) {
        let r = with(json!({"resourceType": "Observation", "status": "final"}), "contained", cs);
        let r = with(r, "text", t);
        for (key, native, engine) in answers(&r) {
            prop_assert_eq!(native, engine, "{} on {}", key, r);
        }
    }
}
