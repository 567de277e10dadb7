//! Audit append throughput: batches as the writer thread forms them, with and without fsync per batch.
//!
//! `cargo bench -p kizuna-audit`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kizuna_audit::checkpoint::CheckpointSigner;
use kizuna_audit::{
    Actor, ActorKind, AuditLog, CheckpointPolicy, LogOptions, NewEntry, Outcome, Purpose, Target,
};

fn entries(n: usize) -> Vec<NewEntry> {
    (0..n)
        .map(|i| NewEntry {
            time: "2026-11-21T10:00:00+09:00".into(),
            actor: Actor {
                kind: ActorKind::Clinician,
                id: format!("doctor-{}", i % 50),
                institution: Some("1318814790".into()),
                issuer: None,
            },
            action: "read".into(),
            target: Target {
                resource_type: Some("Observation".into()),
                resource_id: Some(format!("obs-{i}")),
                person: Some(format!("person-{}", i % 1000)),
                ..Target::default()
            },
            purpose: Purpose::Treatment,
            outcome: Outcome::allow("consent-category-2"),
            source: Some("10.0.0.1".into()),
            request: Some("req-1".into()),
        })
        .collect()
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit-append");
    g.sample_size(20);
    for (name, sync, batch) in [
        ("batch-1000-fsync", true, 1000usize),
        ("batch-10000-fsync", true, 10_000),
        ("batch-1000-nosync", false, 1000),
    ] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut log = AuditLog::open(
            dir.path(),
            LogOptions {
                signer: Some(CheckpointSigner::from_seed([1; 32])),
                policy: CheckpointPolicy::default(),
                sync,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let data = entries(batch);
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(name, |b| {
            b.iter_batched(
                || data.clone(),
                |d| log.append(&d).unwrap_or(0),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
