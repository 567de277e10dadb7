//! What auditing every resource costs on the ingest path: JP-CLINS validation of a submitted bundle,
//! with and without one audit entry per resource through the batched writer (fsync per bundle).
//! The store's write (issue 3) is not in either side yet, so this overstates the share audit takes.
//!
//! `cargo bench -p kizuna --bench ingest_audit`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kizuna_audit::checkpoint::CheckpointSigner;
use kizuna_audit::{
    Actor, ActorKind, AuditLog, AuditWriter, CheckpointPolicy, LogOptions, NewEntry, Outcome,
    Purpose, Target,
};
use kizuna_fhir::validate::Validator;
use serde_json::Value;

fn bundle() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../kizuna-fhir/data/examples/hapisample-2025-02/Bundle-Bundle-CLINS-Observations-Example-01.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_default()).unwrap_or(Value::Null)
}

fn entries_for(b: &Value) -> Vec<NewEntry> {
    b["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| NewEntry {
                    time: "2026-11-21T10:00:00+09:00".into(),
                    actor: Actor {
                        kind: ActorKind::Institution,
                        id: "system-1318814790".into(),
                        institution: Some("1318814790".into()),
                        issuer: None,
                    },
                    action: "create".into(),
                    target: Target {
                        resource_type: e["resource"]["resourceType"].as_str().map(str::to_string),
                        resource_id: e["resource"]["id"].as_str().map(str::to_string),
                        person: Some("person-1".into()),
                        ..Target::default()
                    },
                    purpose: Purpose::Treatment,
                    outcome: Outcome::allow("submission"),
                    source: Some("127.0.0.1".into()),
                    request: Some("req".into()),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn ingest(c: &mut Criterion) {
    let v = Validator::builtin();
    let b = bundle();
    let _ = v.validate(&b);
    let n = 1 + b["entry"].as_array().map(|a| a.len()).unwrap_or(0) as u64;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = AuditLog::open(
        dir.path(),
        LogOptions {
            signer: Some(CheckpointSigner::from_seed([3; 32])),
            policy: CheckpointPolicy::default(),
            sync: true,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let writer = AuditWriter::spawn(log);
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(n));
    g.bench_function("validate", |x| x.iter(|| v.validate(&b).issues.len()));
    g.bench_function("validate+audit", |x| {
        x.iter(|| {
            let k = v.validate(&b).issues.len();
            writer.record_batch(entries_for(&b));
            // The submission is acknowledged only after its audit entries are durable.
            writer.flush().unwrap_or(0) as usize + k
        })
    });
    g.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
