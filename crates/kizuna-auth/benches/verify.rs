//! Bearer-token verification per request: a token seen for the first time (signature checked) and
//! a repeat of a verified one (remembered; expiry still checked).
//!
//! `cargo bench -p kizuna-auth`

use criterion::{criterion_group, criterion_main, Criterion};
use kizuna_auth::dev::{DevIssuer, TokenRequest};
use kizuna_auth::jwt::TokenVerifier;
use kizuna_auth::Role;

const NOW: i64 = 1_800_000_000;

fn verify(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dev = DevIssuer::load_or_create(&dir.path().join("dev.key"), "https://bench.invalid/fhir")
        .unwrap_or_else(|e| panic!("{e}"));
    let token = dev
        .issue(&TokenRequest::for_role(Role::Operator), NOW)
        .unwrap_or_else(|e| panic!("{e}"));
    // Measure the success path: a refused token is never remembered.
    if let Err(e) = TokenVerifier::new(vec![dev.trusted()]).verify(&token, NOW) {
        panic!("the benchmark token does not verify: {e}");
    }
    let mut g = c.benchmark_group("token-verify");
    g.bench_function("first-sight (EdDSA signature)", |b| {
        b.iter_batched(
            || TokenVerifier::new(vec![dev.trusted()]),
            |v| v.verify(&token, NOW).map(|p| p.role),
            criterion::BatchSize::SmallInput,
        )
    });
    let v = TokenVerifier::new(vec![dev.trusted()]);
    g.bench_function("repeat (remembered)", |b| {
        b.iter(|| v.verify(&token, NOW).map(|p| p.role))
    });
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
