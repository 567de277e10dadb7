//! Runs the HL7 FHIRPath conformance suite (`tests-fhir-r4.xml`) against our engine.
//!
//! The suite's inputs are FHIR XML and JSON files named by each test; they are read with [`crate::xml`],
//! the same reader that serves `application/fhir+xml`.

use std::path::{Path, PathBuf};

use quick_xml::events::Event;
use quick_xml::Reader;
use serde_json::Value;

use crate::fhirpath::{EvalContext, FhirPath, Item};
use crate::package::Registry;

/// One test of the suite.
#[derive(Debug, Clone, Default)]
pub struct SuiteTest {
    /// Group name.
    pub group: String,
    /// Test name.
    pub name: String,
    /// Input file name (relative to the suite).
    pub input: Option<String>,
    /// The expression.
    pub expression: String,
    /// `syntax`, `semantic`, `execution` … when the expression must fail.
    pub invalid: Option<String>,
    /// Whether the result is read as a predicate (exists).
    pub predicate: bool,
    /// `strict` mode.
    pub strict: bool,
    /// Expected outputs: (type, text).
    pub outputs: Vec<(Option<String>, String)>,
}

/// The result of one test.
#[derive(Debug, Clone)]
pub struct TestResult {
    /// The test.
    pub test: SuiteTest,
    /// Passed or not.
    pub passed: bool,
    /// Why it failed.
    pub detail: String,
}

/// Why the suite could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    /// The suite file could not be read.
    #[error("テストスイートを読めません / cannot read suite {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The suite file is not the expected XML.
    #[error("テストスイートの XML が不正です / malformed suite: {0}")]
    Xml(String),
}

/// Parses the suite's XML.
pub fn parse_suite(xml: &str) -> Result<Vec<SuiteTest>, SuiteError> {
    let mut r = Reader::from_str(xml);
    let mut tests = Vec::new();
    let mut group = String::new();
    let mut cur: Option<SuiteTest> = None;
    let mut text_target: Option<(bool, Option<String>)> = None; // (is_expression, output type)
    let mut text = String::new();
    loop {
        let ev = r.read_event().map_err(|e| SuiteError::Xml(e.to_string()))?;
        match ev {
            Event::Start(s) | Event::Empty(s) if s.local_name().as_ref() == b"group" => {
                group = get_attr(&s, "name").unwrap_or_default();
            }
            Event::Start(s) if s.local_name().as_ref() == b"test" => {
                cur = Some(SuiteTest {
                    group: group.clone(),
                    name: get_attr(&s, "name").unwrap_or_default(),
                    input: get_attr(&s, "inputfile"),
                    predicate: get_attr(&s, "predicate").as_deref() == Some("true"),
                    strict: get_attr(&s, "mode").as_deref() == Some("strict"),
                    invalid: get_attr(&s, "invalid"),
                    ..SuiteTest::default()
                });
            }
            Event::Start(s) if s.local_name().as_ref() == b"expression" => {
                if let Some(t) = cur.as_mut() {
                    if let Some(inv) = get_attr(&s, "invalid") {
                        t.invalid = Some(inv);
                    }
                    if get_attr(&s, "mode").as_deref() == Some("strict") {
                        t.strict = true;
                    }
                }
                text_target = Some((true, None));
                text.clear();
            }
            Event::Start(s) if s.local_name().as_ref() == b"output" => {
                text_target = Some((false, get_attr(&s, "type")));
                text.clear();
            }
            Event::Empty(s) if s.local_name().as_ref() == b"output" => {
                if let Some(t) = cur.as_mut() {
                    t.outputs.push((get_attr(&s, "type"), String::new()));
                }
            }
            Event::Text(t) if text_target.is_some() => {
                text.push_str(&t.unescape().map_err(|e| SuiteError::Xml(e.to_string()))?);
            }
            Event::CData(t) if text_target.is_some() => {
                text.push_str(&String::from_utf8_lossy(&t));
            }
            Event::End(e) => match e.local_name().as_ref() {
                b"expression" => {
                    if let Some(t) = cur.as_mut() {
                        t.expression = text.clone();
                    }
                    text_target = None;
                }
                b"output" => {
                    if let (Some(t), Some((_, ty))) = (cur.as_mut(), text_target.take()) {
                        t.outputs.push((ty, text.clone()));
                    }
                }
                b"test" => {
                    if let Some(t) = cur.take() {
                        tests.push(t);
                    }
                }
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(tests)
}

fn get_attr(s: &quick_xml::events::BytesStart<'_>, name: &str) -> Option<String> {
    s.attributes()
        .with_checks(false)
        .filter_map(Result::ok)
        .find(|a| a.key.as_ref() == name.as_bytes())
        .and_then(|a| a.unescape_value().ok().map(|v| v.to_string()))
}

/// Reads one of the suite's input files (JSON as is, XML through [`crate::xml`]) from beside the suite
/// or its `input/` folder.
pub fn load_input(dir: &Path, name: &str, reg: &Registry) -> Result<Value, String> {
    let candidates = [dir.join(name), dir.join("input").join(name)];
    let path = candidates
        .iter()
        .find(|p| p.exists())
        .ok_or_else(|| format!("input {name} not found"))?;
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    if name.ends_with(".json") {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        crate::xml::from_xml(&text, reg.model()).map_err(|e| e.to_string())
    }
}

fn expected_text(ty: Option<&str>, text: &str) -> String {
    match ty {
        Some("date") | Some("dateTime") => text.trim_start_matches('@').to_string(),
        Some("time") => text
            .trim_start_matches('@')
            .trim_start_matches('T')
            .to_string(),
        _ => {
            if let Some(t) = text.strip_prefix("@T") {
                t.to_string()
            } else if let Some(t) = text.strip_prefix('@') {
                t.to_string()
            } else {
                text.to_string()
            }
        }
    }
}

/// Runs every test of the suite at `path`.
pub fn run_fhirpath_suite(
    path: &Path,
    registry: &'static Registry,
    terminology: &'static crate::terminology::Terminology,
    profiles: Option<&dyn crate::fhirpath::ConformsTo>,
) -> Result<Vec<TestResult>, SuiteError> {
    let xml = std::fs::read_to_string(path).map_err(|e| SuiteError::Io(path.to_path_buf(), e))?;
    let tests = parse_suite(&xml)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut cache: std::collections::HashMap<String, Result<Value, String>> =
        std::collections::HashMap::new();
    for t in &tests {
        if let Some(i) = &t.input {
            cache
                .entry(i.clone())
                .or_insert_with(|| load_input(dir, i, registry));
        }
    }
    let empty = Value::Null;
    let mut results = Vec::new();
    for t in tests {
        let input = match &t.input {
            Some(i) => match cache.get(i) {
                Some(Ok(v)) => v,
                Some(Err(e)) => {
                    let detail = format!("input error: {e}");
                    results.push(TestResult {
                        test: t,
                        passed: false,
                        detail,
                    });
                    continue;
                }
                None => &empty,
            },
            None => &empty,
        };
        let (passed, detail) = run_one(&t, input, registry, terminology, profiles);
        results.push(TestResult {
            test: t,
            passed,
            detail,
        });
    }
    Ok(results)
}

fn run_one(
    t: &SuiteTest,
    input: &Value,
    registry: &Registry,
    terminology: &crate::terminology::Terminology,
    profiles: Option<&dyn crate::fhirpath::ConformsTo>,
) -> (bool, String) {
    let model = registry.model();
    let mut ctx = EvalContext::new(model);
    if !input.is_null() {
        ctx = ctx.with_resource(input);
    }
    ctx.strict = t.strict;
    ctx.terminology = Some(terminology);
    ctx.profiles = profiles;
    let result = FhirPath::parse(&t.expression).and_then(|e| {
        let inputs = if input.is_null() {
            Vec::new()
        } else {
            vec![Item::resource(input)]
        };
        e.evaluate(&ctx, inputs)
    });
    if let Some(kind) = &t.invalid {
        return match result {
            Err(_) => (true, String::new()),
            Ok(v) => (
                false,
                format!("expected {kind} error, got {} item(s)", v.len()),
            ),
        };
    }
    let out = match result {
        Ok(v) => v,
        Err(e) => return (false, e.to_string()),
    };
    let out: Vec<Item<'_>> = if t.predicate {
        vec![Item::Bool(!out.is_empty())]
    } else {
        out
    };
    let got: Vec<String> = out
        .iter()
        .map(|i| {
            i.to_display_string(model)
                .unwrap_or_else(|| "<complex>".into())
        })
        .collect();
    let want: Vec<String> = t
        .outputs
        .iter()
        .map(|(ty, s)| expected_text(ty.as_deref(), s))
        .collect();
    if got == want {
        (true, String::new())
    } else {
        (false, format!("expected {want:?}, got {got:?}"))
    }
}
