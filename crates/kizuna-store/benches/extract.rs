//! Benchmark: search index extraction (every SearchParameter of a resource's type evaluated and
//! reduced to index rows), the request-side step of every write besides JSON parsing.
//!
//! `cargo bench -p kizuna-store --bench extract` — per core (criterion runs single-threaded), over
//! the JP-CLINS Condition, AllergyIntolerance and Observation submissions of 40 synthetic people,
//! the resources `kizuna bench fhir` loads.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kizuna_fhir::Registry;
use kizuna_store::Indexer;
use kizuna_synth::clinical::BundleKind;
use serde_json::Value;

fn resources() -> Vec<Value> {
    let inst = kizuna_synth::population::institutions(11);
    let mut out = Vec::new();
    for person in 0..40u64 {
        for (kind, bundle) in kizuna_synth::sample_submissions(11, person, 2, &inst) {
            if !matches!(
                kind,
                BundleKind::Condition | BundleKind::Observation | BundleKind::AllergyIntolerance
            ) {
                continue;
            }
            for e in bundle["entry"].as_array().into_iter().flatten() {
                out.push(e["resource"].clone());
            }
        }
    }
    out
}

fn extract(c: &mut Criterion) {
    let reg = Registry::builtin();
    let idx = Indexer::new(reg);
    let all = resources();
    let mut g = c.benchmark_group("index");
    g.throughput(Throughput::Elements(all.len() as u64));
    g.bench_function("extract_jp_clins_submissions", |b| {
        b.iter(|| all.iter().map(|r| idx.extract(reg, r).len()).sum::<usize>())
    });
    g.finish();
}

criterion_group!(benches, extract);
criterion_main!(benches);
