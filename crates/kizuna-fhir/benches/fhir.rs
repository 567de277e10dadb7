//! Benchmarks: FHIRPath evaluation per expression class, and validation throughput on JP-CLINS data.
//!
//! `cargo bench -p kizuna-fhir` — figures are per core (criterion runs single-threaded).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kizuna_fhir::fhirpath::{EvalContext, FhirPath};
use kizuna_fhir::validate::Validator;
use kizuna_fhir::Registry;
use serde_json::Value;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/examples");

fn load(rel: &str) -> Value {
    let text = std::fs::read_to_string(format!("{EXAMPLES}/{rel}")).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Resources the validator checks in one call: the resource, its Bundle entries and every contained
/// resource (each is validated against its own profile). The closing note also gives the figure per
/// top-level resource ("submissions per second").
fn count(v: &Value) -> u64 {
    let own = |r: &Value| {
        1 + r
            .get("contained")
            .and_then(Value::as_array)
            .map(|a| a.len() as u64)
            .unwrap_or(0)
    };
    own(v)
        + v.get("entry")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|e| e.get("resource")).map(own).sum())
            .unwrap_or(0)
}

fn fhirpath(c: &mut Criterion) {
    let reg = Registry::builtin();
    let bundle = load("clinical-core/Bundle-Bundle-CLINS-Referral-Example-01.json");
    let patient = bundle
        .pointer("/entry/1/resource")
        .cloned()
        .unwrap_or(Value::Null);
    let cases = [
        ("path", "Bundle.entry.resource.ofType(Patient).name.given", &bundle),
        ("filter", "Bundle.entry.where(resource.is(Condition)).resource.code.coding.where(system = 'http://medis.or.jp/CodeSystem/master-disease-keyNumber').code", &bundle),
        ("arithmetic", "(1 + 2 * 3 - 4 / 2) > 3 and 10 div 3 = 3", &bundle),
        ("date", "Patient.birthDate < @2000-01-01 and Patient.birthDate.lowBoundary() < today()", &patient),
        ("string", "Patient.name.family.first().length() > 0 and Patient.identifier.value.first().matches('^[0-9]+$')", &patient),
        ("descendants", "descendants().count() > 10", &bundle),
        ("jp-clins-invariant", "entry.resource.meta.profile.exists() and entry.where(resource.is(Patient)).count() = 1 and identifier.system = 'http://jpfhir.jp/fhir/clins/bundle-identifier'", &bundle),
    ];
    let mut g = c.benchmark_group("fhirpath");
    for (name, src, input) in cases {
        let Ok(expr) = FhirPath::parse(src) else {
            continue;
        };
        let ctx = EvalContext::new(reg.model()).with_resource(input);
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| {
                expr.evaluate_resource(&ctx, input)
                    .map(|v| v.len())
                    .unwrap_or(0)
            })
        });
    }
    g.bench_function("parse", |b| {
        b.iter(|| FhirPath::parse("Bundle.entry.where(resource.is(Condition)).resource.code.coding.where(system = 'x').code.exists()").is_ok())
    });
    g.finish();
}

fn validation(c: &mut Criterion) {
    let v = Validator::builtin();
    let cases = [
        (
            "bundle-observations",
            "hapisample-2025-02/Bundle-Bundle-CLINS-Observations-Example-01.json",
        ),
        (
            "bundle-referral",
            "clinical-core/Bundle-Bundle-CLINS-Referral-Example-01.json",
        ),
        (
            "condition",
            "clinical-core/Condition-Example-JP-Condition-eCS-01.json",
        ),
        (
            "observation-labresult",
            "clinical-core/Observation-Example-JP-Obs-LabResult-eCS-K.json",
        ),
    ];
    let mut g = c.benchmark_group("validate");
    for (name, rel) in cases {
        let r = load(rel);
        // Warm the profile cache so the figure is steady-state throughput.
        let _ = v.validate(&r);
        g.throughput(Throughput::Elements(count(&r)));
        g.bench_function(name, |b| b.iter(|| v.validate(&r).issues.len()));
    }
    g.finish();
}

fn loading(c: &mut Criterion) {
    let mut g = c.benchmark_group("packages");
    g.sample_size(10);
    g.bench_function("load-builtin", |b| {
        b.iter(|| Registry::load_builtin().map(|r| r.len()).unwrap_or(0))
    });
    g.finish();
}

criterion_group!(benches, fhirpath, validation, loading);
criterion_main!(benches);
