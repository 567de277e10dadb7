//! The `kizuna` binary as a user runs it: exit status, human and JSON output, NDJSON, XML, directories.

use std::path::PathBuf;
use std::process::Command;

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../kizuna-fhir/data")
        .join(rel)
}

fn kizuna(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kizuna"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kizuna-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap_or_else(|e| panic!("{e}"));
    p
}

#[test]
fn valid_bundle_exits_zero() {
    let f = data("examples/hapisample-2025-02/Bundle-Bundle-CLINS-Observations-Example-01.json");
    let (code, out, _) = kizuna(&["validate", f.to_str().unwrap_or_default()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK "), "{out}");
    assert!(
        out.contains("1 リソース / resources, 0 不合格 / failed"),
        "{out}"
    );
}

#[test]
fn invalid_resource_exits_one_with_path() {
    let f = tmp(
        "bad.json",
        r#"{"resourceType":"Patient","birthDate":"1980-02-30","foo":1}"#,
    );
    let (code, out, _) = kizuna(&["validate", f.to_str().unwrap_or_default()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("Patient.birthDate"), "{out}");
    assert!(out.contains("Patient.foo"), "{out}");
}

#[test]
fn json_output_is_an_operation_outcome() {
    let f = tmp("bad2.json", r#"{"resourceType":"Patient","gender":"x"}"#);
    let (code, out, _) = kizuna(&["validate", "--json", f.to_str().unwrap_or_default()]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["resourceType"], "OperationOutcome");
    let issue = v["issue"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["severity"] == "error"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(issue["expression"][0], "Patient.gender");
    assert_eq!(issue["code"], "code-invalid");
}

#[test]
fn ndjson_lines_are_validated_one_by_one() {
    let f = tmp(
        "many.ndjson",
        "{\"resourceType\":\"Patient\",\"gender\":\"male\"}\n\n{\"resourceType\":\"Patient\",\"gender\":\"x\"}\nnot json\n",
    );
    let (code, out, _) = kizuna(&["validate", f.to_str().unwrap_or_default()]);
    assert_eq!(code, 1);
    assert!(out.contains("many.ndjson:1 Patient"), "{out}");
    assert!(
        out.contains("3 リソース / resources, 2 不合格 / failed"),
        "{out}"
    );
}

#[test]
fn xml_input_and_explicit_profile() {
    let f = data("fhirpath/input/patient-example.xml");
    let (code, out, _) = kizuna(&["validate", f.to_str().unwrap_or_default()]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = kizuna(&[
        "validate",
        "--profile",
        "http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Patient_eCS",
        f.to_str().unwrap_or_default(),
    ]);
    assert_eq!(
        code, 1,
        "the HL7 example does not meet the JP profile: {out}"
    );
    let (code, _, err) = kizuna(&[
        "validate",
        "--profile",
        "http://example.org/none",
        f.to_str().unwrap_or_default(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("profile not found"), "{err}");
}

#[test]
fn directories_are_walked() {
    let (code, out, _) = kizuna(&[
        "validate",
        data("examples/clinical-core").to_str().unwrap_or_default(),
    ]);
    // The directory holds documented exceptions (docs/conformance.md), so some fail.
    assert_eq!(code, 1);
    assert!(
        out.contains("58 リソース / resources, 9 不合格 / failed"),
        "{out}"
    );
}

#[test]
fn fhirpath_conformance_command_reports_counts() {
    let (code, out, _) = kizuna(&[
        "conformance",
        "fhirpath",
        data("fhirpath/tests-fhir-r4.xml")
            .to_str()
            .unwrap_or_default(),
    ]);
    assert_eq!(code, 1, "two documented failures remain");
    assert!(
        out.lines()
            .last()
            .unwrap_or("")
            .ends_with("933 passed, 2 failed"),
        "{out}"
    );
}

#[test]
fn synth_writes_a_population_and_its_files_validate() {
    let d = std::env::temp_dir().join(format!("kizuna-synth-cli-{}", std::process::id()));
    let (code, out, err) = kizuna(&[
        "synth",
        "--patients",
        "60",
        "--seed",
        "4",
        "--years",
        "1",
        "--out",
        d.to_str().unwrap_or_default(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("60 人 / people"), "{out}");
    for f in [
        "people.csv",
        "coverage.csv",
        "institutions.csv",
        "holder/claims.csv",
        "holder/ground_truth.csv",
        "fhir/bundles-Observation.ndjson",
        "summary.json",
    ] {
        assert!(d.join(f).exists(), "{f}");
    }
    let (code, out, _) = kizuna(&["validate", d.join("fhir").to_str().unwrap_or_default()]);
    assert_eq!(
        code,
        0,
        "{}",
        out.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
    let (code, _, err) = kizuna(&[
        "synth",
        "--patients",
        "0",
        "--out",
        d.to_str().unwrap_or_default(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("patients"));
}

#[test]
fn reindex_rebuilds_the_named_types_and_refuses_unknown_ones() {
    let dir = std::env::temp_dir().join(format!("kizuna-cli-reindex-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let d = dir.to_str().unwrap_or_default();
    let (code, out, err) = kizuna(&[
        "reindex",
        "--data-dir",
        d,
        "--type",
        "Observation",
        "--type",
        "Patient",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["types"], serde_json::json!(["Observation", "Patient"]));
    assert_eq!(v["complete"], true);
    let (code, _, err) = kizuna(&["reindex", "--data-dir", d, "--type", "Nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown resource type Nope"), "{err}");
    let (code, _, err) = kizuna(&["reindex", "--data-dir", d]);
    assert_ne!(code, 0);
    assert!(err.contains("--all"), "{err}");
    let (code, out, err) = kizuna(&["reindex", "--data-dir", d, "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
