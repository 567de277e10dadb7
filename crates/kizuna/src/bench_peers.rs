//! `kizuna bench fhirpath` and `kizuna bench validate`: kizuna's side of the side-by-side
//! comparisons with other FHIRPath engines and validators (`bench/compare.py` runs the peers).
//!
//! Every engine reads the same case file and writes results in the same shape, so one grader
//! (in `bench/compare.py`) judges them all by the same rules:
//!
//! * FHIRPath: `--write-cases` turns the HL7 R4 suite into JSON (XML inputs converted once, here);
//!   a run evaluates every case, records its result or error, then times parse+evaluate and
//!   evaluate-only over the cases that have an input and are meant to succeed.
//! * Validation: `--write-resources` writes R4 resources (JP-CLINS examples and synthetic records,
//!   `meta.profile` removed) as NDJSON; a run validates each for structure only, records
//!   valid/invalid, then times the whole set.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use kizuna_fhir::conformance::{load_input, parse_suite};
use kizuna_fhir::fhirpath::{EvalContext, FhirPath, Item};
use kizuna_fhir::terminology::Terminology;
use kizuna_fhir::validate::Validator;
use kizuna_fhir::Registry;
use serde_json::{json, Value};

/// Options of `kizuna bench fhirpath`.
#[derive(Args)]
pub struct FhirpathBenchArgs {
    /// テストスイートを共通の JSON 形式に書き出して終了 / write the suite as the shared JSON case file and exit
    #[arg(long, value_name = "FILE")]
    write_cases: Option<PathBuf>,
    /// tests-fhir-r4.xml のパス / the suite to convert with --write-cases
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../kizuna-fhir/data/fhirpath/tests-fhir-r4.xml"))]
    suite: PathBuf,
    /// 共通形式のケースファイル / the shared case file to run
    #[arg(long, value_name = "FILE")]
    cases: Option<PathBuf>,
    /// 計測時間 (秒、各方式) / seconds to time each of parse+evaluate and evaluate-only
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// 結果 JSON の出力先 / where to write the JSON results
    #[arg(long, default_value = "kizuna-data/bench/fhirpath-kizuna.json")]
    out: PathBuf,
}

/// Options of `kizuna bench validate`.
#[derive(Args)]
pub struct ValidateBenchArgs {
    /// 共通の NDJSON を書き出して終了 / write the shared NDJSON resource set and exit
    #[arg(long, value_name = "FILE")]
    write_resources: Option<PathBuf>,
    /// 合成データの人数 (--write-resources) / synthetic people to include with --write-resources
    #[arg(long, default_value_t = 300)]
    people: u64,
    /// 検証するリソース (NDJSON) / the shared resources to validate (NDJSON)
    #[arg(long, value_name = "FILE")]
    resources: Option<PathBuf>,
    /// 計測時間 (秒) / seconds to time
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// 結果 JSON の出力先 / where to write the JSON results
    #[arg(long, default_value = "kizuna-data/bench/validate-kizuna.json")]
    out: PathBuf,
}

/// Runs `kizuna bench fhirpath`.
pub fn run_fhirpath(a: FhirpathBenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(out) = &a.write_cases {
        let cases = suite_as_json(&a.suite)?;
        write_json(out, &cases)?;
        eprintln!(
            "{} 件 / cases written to {}",
            cases["cases"].as_array().map_or(0, Vec::len),
            out.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let path = a
        .cases
        .as_ref()
        .context("--cases か --write-cases を指定してください / give --cases or --write-cases")?;
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| path.display().to_string())?,
    )?;
    let report = fhirpath_run(&file, Duration::from_secs_f64(a.seconds.max(0.1)))?;
    write_json(&a.out, &report)?;
    Ok(ExitCode::SUCCESS)
}

/// The suite with every input converted to JSON, in the shape all engines read.
fn suite_as_json(suite: &Path) -> anyhow::Result<Value> {
    let xml = std::fs::read_to_string(suite).with_context(|| suite.display().to_string())?;
    let tests = parse_suite(&xml)?;
    let dir = suite.parent().unwrap_or(Path::new("."));
    let reg = Registry::builtin();
    let mut inputs = serde_json::Map::new();
    let mut cases = Vec::new();
    for (i, t) in tests.iter().enumerate() {
        if let Some(name) = &t.input {
            if !inputs.contains_key(name) {
                let v = load_input(dir, name, reg).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                inputs.insert(name.clone(), v);
            }
        }
        cases.push(json!({
            "id": format!("{:04}:{}:{}", i, t.group, t.name),
            "expression": t.expression,
            "input": t.input,
            "invalid": t.invalid,
            "predicate": t.predicate,
            "strict": t.strict,
            "outputs": t.outputs.iter().map(|(ty, text)| json!({"type": ty, "text": text})).collect::<Vec<_>>(),
        }));
    }
    Ok(json!({
        "source": "HL7 FHIRPath R4 suite (tests-fhir-r4.xml, github.com/FHIR/fhir-test-cases)",
        "inputs": inputs,
        "cases": cases,
    }))
}

/// A result value as the grader reads it: booleans and integers as JSON, the rest as FHIRPath text.
fn item_json(i: &Item<'_>, reg: &Registry) -> Value {
    match i {
        Item::Bool(b) => json!(b),
        Item::Int(n) | Item::Long(n) => json!(n),
        other => match other.to_display_string(reg.model()) {
            Some(s) => json!(s),
            None => json!({"complex": true}),
        },
    }
}

fn fhirpath_run(file: &Value, budget: Duration) -> anyhow::Result<Value> {
    let reg = Registry::builtin();
    let term = Terminology::builtin();
    let model = reg.model();
    let empty = serde_json::Map::new();
    let inputs = file["inputs"].as_object().unwrap_or(&empty);
    let cases = file["cases"].as_array().cloned().unwrap_or_default();
    let input_of = |c: &Value| c["input"].as_str().and_then(|n| inputs.get(n));
    let mut results = Vec::new();
    for c in &cases {
        let expr = c["expression"].as_str().unwrap_or("");
        let input = input_of(c);
        let mut ctx = EvalContext::new(model);
        if let Some(r) = input {
            ctx = ctx.with_resource(r);
        }
        ctx.strict = c["strict"].as_bool().unwrap_or(false);
        ctx.terminology = Some(term);
        ctx.profiles = Some(Validator::builtin());
        let out = FhirPath::parse(expr).and_then(|e| {
            let start = input.map(Item::resource).into_iter().collect();
            e.evaluate(&ctx, start)
        });
        results.push(match out {
            Ok(items) => {
                json!({"id": c["id"], "result": items.iter().map(|i| item_json(i, reg)).collect::<Vec<_>>()})
            }
            Err(e) => json!({"id": c["id"], "error": e.to_string()}),
        });
    }
    // The timed workload: cases with an input that are meant to succeed.
    let work: Vec<(&str, &Value)> = cases
        .iter()
        .filter(|c| c["invalid"].is_null())
        .filter_map(|c| Some((c["expression"].as_str()?, input_of(c)?)))
        .collect();
    let timed = |compiled: bool| -> (u64, f64) {
        let parsed: Vec<Option<FhirPath>> =
            work.iter().map(|(e, _)| FhirPath::parse(e).ok()).collect();
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < budget || n == 0 {
            for (i, (e, r)) in work.iter().enumerate() {
                let mut ctx = EvalContext::new(model).with_resource(r);
                ctx.terminology = Some(term);
                let out =
                    if compiled {
                        parsed[i]
                            .as_ref()
                            .map(|p| p.evaluate(&ctx, vec![Item::resource(r)]).map(|v| v.len()))
                    } else {
                        Some(FhirPath::parse(e).and_then(|p| {
                            p.evaluate(&ctx, vec![Item::resource(r)]).map(|v| v.len())
                        }))
                    };
                std::hint::black_box(&out);
                n += 1;
            }
        }
        (n, started.elapsed().as_secs_f64())
    };
    let (n1, s1) = timed(false);
    let (n2, s2) = timed(true);
    Ok(json!({
        "engine": "kizuna",
        "version": env!("CARGO_PKG_VERSION"),
        "results": results,
        "throughput": {
            "expressions": work.len(),
            "parse_and_evaluate": {"evaluations": n1, "seconds": s1, "per_s": n1 as f64 / s1.max(1e-9)},
            "evaluate_only": {"evaluations": n2, "seconds": s2, "per_s": n2 as f64 / s2.max(1e-9)},
        },
    }))
}

/// Runs `kizuna bench validate`.
pub fn run_validate(a: ValidateBenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(out) = &a.write_resources {
        let n = write_resources(out, a.people)?;
        eprintln!("{n} 件 / resources written to {}", out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let path = a
        .resources
        .as_ref()
        .context("--resources か --write-resources を指定してください / give --resources or --write-resources")?;
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let resources: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let v = Validator::structure_only(Registry::builtin(), Terminology::builtin());
    let mut verdicts = Vec::new();
    for r in &resources {
        let oo = v.validate(r);
        let errors: Vec<String> = oo
            .issues
            .iter()
            .filter(|i| i.severity <= kizuna_fhir::outcome::Severity::Error)
            .map(|i| format!("{}: {}", i.expression, i.en))
            .collect();
        verdicts.push(json!({"id": r["id"], "valid": errors.is_empty(), "errors": errors}));
    }
    let budget = Duration::from_secs_f64(a.seconds.max(0.1));
    let started = Instant::now();
    let mut n = 0u64;
    // Parsing is part of the work: peers validate from text too.
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    while started.elapsed() < budget || n == 0 {
        for l in &lines {
            let valid = serde_json::from_str::<Value>(l)
                .map(|r| v.validate(&r).issues.is_empty())
                .unwrap_or(false);
            std::hint::black_box(valid);
            n += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let report = json!({
        "engine": "kizuna",
        "version": env!("CARGO_PKG_VERSION"),
        "mode": "structure only (Validator::structure_only)",
        "results": verdicts,
        "throughput": {"resources": lines.len(), "validations": n, "seconds": secs, "per_s": n as f64 / secs.max(1e-9)},
    });
    write_json(&a.out, &report)?;
    Ok(ExitCode::SUCCESS)
}

/// The shared resource set: every JP-CLINS example that is not a Bundle, the resources inside the
/// example Bundles, and synthetic submissions' resources; `meta.profile` removed so all engines
/// check the same base R4 structure.
fn write_resources(out: &Path, people: u64) -> anyhow::Result<usize> {
    let mut all: Vec<Value> = Vec::new();
    let examples = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../kizuna-fhir/data/examples"
    ));
    let mut files = Vec::new();
    collect_json(examples, &mut files)?;
    files.sort();
    for f in files {
        let Ok(v) = serde_json::from_str::<Value>(&std::fs::read_to_string(&f)?) else {
            continue;
        };
        flatten(v, &mut all);
    }
    let inst = kizuna_synth::population::institutions(3);
    for i in 0..people {
        for (_, b) in kizuna_synth::sample_submissions(3, i, 2, &inst) {
            flatten(b, &mut all);
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p)?;
    }
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut n = 0;
    for mut r in all {
        if let Some(m) = r.get_mut("meta").and_then(Value::as_object_mut) {
            m.shift_remove("profile");
            if m.is_empty() {
                r.as_object_mut().map(|o| o.shift_remove("meta"));
            }
        }
        let key = serde_json::to_string(&r)?;
        if seen.insert(key.clone()) {
            writeln!(w, "{key}")?;
            n += 1;
        }
    }
    w.flush()?;
    Ok(n)
}

fn collect_json(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let p = e?.path();
        if p.is_dir() {
            collect_json(&p, out)?;
        } else if p.extension().and_then(|x| x.to_str()) == Some("json") {
            out.push(p);
        }
    }
    Ok(())
}

/// A resource, or the resources inside a Bundle (nested Bundles too).
fn flatten(v: Value, out: &mut Vec<Value>) {
    if v["resourceType"] == "Bundle" {
        if let Some(entries) = v["entry"].as_array() {
            for e in entries {
                flatten(e["resource"].clone(), out);
            }
        }
    } else if v["resourceType"].is_string() {
        out.push(v);
    }
}

fn write_json(out: &Path, v: &Value) -> anyhow::Result<()> {
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(out, serde_json::to_string(v)?)?;
    Ok(())
}
