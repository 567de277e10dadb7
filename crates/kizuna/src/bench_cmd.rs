//! `kizuna bench store`: the store's throughput and latency on synthetic JP-CLINS data, written as
//! JSON so runs on SQLite and PostgreSQL, and across commits, can be compared.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use kizuna_fhir::Registry;
use kizuna_store::{SearchQuery, Store, WriteOp};
use kizuna_synth::clinical::BundleKind;
use serde_json::{json, Value};

use crate::bench_server::percentiles;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// 保存・検索の性能 / Store ingest, read and search latency (JSON report).
    Store(StoreBenchArgs),
    /// FHIR API の性能 / The FHIR server over HTTP: transaction ingest, read, search, $export and its memory (JSON report).
    Fhir(crate::bench_fhir::FhirBenchArgs),
    /// 共有サービスの性能 / The sharing service over HTTP: $submit with full JP-CLINS validation, policy and audit; $summary latency (JSON report).
    Share(crate::bench_share::ShareBenchArgs),
    /// 持続負荷 / Sustained mixed load (register, read, search, summary) at a fixed rate; throughput, errors, p50/p99 per minute (JSON report).
    Load(crate::bench_load::LoadBenchArgs),
    /// FHIRPath の比較 / FHIRPath: kizuna's results and throughput on the shared HL7 suite cases (bench/compare.py runs the peers).
    Fhirpath(crate::bench_peers::FhirpathBenchArgs),
    /// 検証の比較 / Structural validation throughput on the shared R4 resource set (bench/compare.py runs the peers).
    Validate(crate::bench_peers::ValidateBenchArgs),
}

/// Options of `kizuna bench store`.
#[derive(Args)]
pub struct StoreBenchArgs {
    /// 投入するリソース数 (概数) / resources to ingest (approximately)
    #[arg(long, default_value_t = 100_000)]
    resources: u64,
    /// データベース URL (省略時は一時ディレクトリの SQLite) / database URL (default: SQLite in a temporary directory)
    #[arg(long)]
    database: Option<String>,
    /// 同時書き込み数 / concurrent writers
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// 1 トランザクションあたりの人数 / people per transaction bundle
    #[arg(long, default_value_t = 4)]
    people_per_tx: u64,
    /// 各問い合わせの試行回数 / repetitions of each read and query
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// 結果 JSON の出力先 / where to write the JSON report
    #[arg(long, default_value = "kizuna-data/bench/store.json")]
    out: PathBuf,
}

/// Runs a benchmark.
pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Store(a) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(store_bench(a)),
        BenchCmd::Fhir(a) => crate::bench_fhir::run(a),
        BenchCmd::Share(a) => crate::bench_share::run(a),
        BenchCmd::Load(a) => crate::bench_load::run(a),
        BenchCmd::Fhirpath(a) => crate::bench_peers::run_fhirpath(a),
        BenchCmd::Validate(a) => crate::bench_peers::run_validate(a),
    }
}

/// One transaction's worth of writes and the patient ids it carries.
fn person_ops(
    seed: u64,
    first: u64,
    people: u64,
    inst: &[kizuna_synth::population::Institution],
) -> Vec<WriteOp> {
    let mut ops = Vec::new();
    for i in first..first + people {
        for (kind, b) in kizuna_synth::sample_submissions(seed, i, 2, inst) {
            if !matches!(
                kind,
                BundleKind::Condition | BundleKind::Observation | BundleKind::AllergyIntolerance
            ) {
                continue;
            }
            for e in b["entry"].as_array().into_iter().flatten() {
                ops.push(WriteOp::Create {
                    resource: e["resource"].clone(),
                    full_url: e["fullUrl"].as_str().map(str::to_string),
                });
            }
        }
    }
    ops
}

async fn store_bench(a: StoreBenchArgs) -> anyhow::Result<ExitCode> {
    let tmp = tempfile_dir()?;
    let url = match &a.database {
        Some(u) => u.clone(),
        None => format!("sqlite://{}", tmp.join("bench.db").display()),
    };
    let store = Store::open(&url, Registry::builtin())
        .await
        .with_context(|| "データベースを開けません / cannot open the database".to_string())?;
    let backend = format!("{:?}", store.backend()).to_lowercase();
    let inst = kizuna_synth::population::institutions(7);
    // Generated up front so the timed part measures the store, not the generator (which would take
    // one of this machine's two cores).
    let per_tx = a.people_per_tx.max(1);
    let mut batches: Vec<Vec<WriteOp>> = Vec::new();
    let mut produced = 0u64;
    let mut next = 0u64;
    while produced < a.resources {
        let ops = person_ops(7, next, per_tx, &inst);
        next += per_tx;
        produced += ops.len() as u64;
        batches.push(ops);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<WriteOp>>(batches.len().max(1));
    for b in batches {
        tx.send(b).await?;
    }
    drop(tx);
    let rx_shared = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
    let bar = indicatif::ProgressBar::new(a.resources);
    let commits_before = store.group_commits();
    let started = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..a.writers.max(1) {
        let rx = rx_shared.clone();
        let store = store.clone();
        let bar = bar.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            // Subjects of stored Observations and Conditions: the queries below look for the
            // records of patients who have some.
            let mut patients = Vec::new();
            let mut cond_patients = Vec::new();
            let mut observations = Vec::new();
            let mut tx_times = Vec::new();
            let mut codes: Vec<String> = Vec::new();
            loop {
                let ops = { rx.lock().await.recv().await };
                let Some(ops) = ops else { break };
                let t = Instant::now();
                let stored = store.transaction(ops).await?;
                tx_times.push(t.elapsed());
                n += stored.len() as u64;
                bar.inc(stored.len() as u64);
                for s in stored {
                    let subject = s
                        .resource
                        .as_ref()
                        .and_then(|r| r["subject"]["reference"].as_str())
                        .and_then(|r| r.strip_prefix("Patient/"))
                        .map(str::to_string);
                    match s.resource_type.as_str() {
                        "Condition" if cond_patients.len() < 5000 => {
                            cond_patients.extend(subject);
                        }
                        "Observation" if observations.len() < 5000 => {
                            patients.extend(subject);
                            if codes.len() < 50 {
                                if let Some(c) = s
                                    .resource
                                    .as_ref()
                                    .and_then(|r| r["code"]["coding"][0].as_object())
                                {
                                    codes.push(format!(
                                        "{}|{}",
                                        c.get("system").and_then(Value::as_str).unwrap_or(""),
                                        c.get("code").and_then(Value::as_str).unwrap_or("")
                                    ));
                                }
                            }
                            observations.push(s.id)
                        }
                        _ => {}
                    }
                }
            }
            Ok::<_, kizuna_store::StoreError>((
                n,
                (patients, cond_patients),
                observations,
                tx_times,
                codes,
            ))
        }));
    }
    let mut ingested = 0u64;
    let mut patients = Vec::new();
    let mut cond_patients = Vec::new();
    let mut observations = Vec::new();
    let mut tx_times = Vec::new();
    let mut codes = Vec::new();
    for w in writers {
        let (n, p, o, t, c) = w.await??;
        codes.extend(c);
        ingested += n;
        patients.extend(p.0);
        cond_patients.extend(p.1);
        observations.extend(o);
        tx_times.extend(t);
    }
    let ingest_s = started.elapsed().as_secs_f64();
    let commits = store.group_commits() - commits_before;
    bar.finish_and_clear();
    // Let a few random reads and typical clinical queries run against the full store.
    let pick = |v: &[String], i: usize| {
        v.get((i * 7919) % v.len().max(1))
            .cloned()
            .unwrap_or_default()
    };
    let mut reads = Vec::new();
    for i in 0..a.samples {
        let id = pick(&observations, i);
        let t = Instant::now();
        store.read("Observation", &id).await?;
        reads.push(t.elapsed());
    }
    let queries: Vec<(&str, &str, QueryMaker)> = vec![
        (
            "Observation",
            "subject=Patient/{p}",
            Box::new(|i| format!("subject=Patient/{}", pick(&patients, i))),
        ),
        (
            "Condition",
            "patient={p}",
            Box::new(|i| format!("patient={}", pick(&cond_patients, i))),
        ),
        (
            "Observation",
            "subject={p}&date=ge2025-01-01",
            Box::new(|i| format!("subject=Patient/{}&date=ge2025-01-01", pick(&patients, i))),
        ),
        (
            "Observation",
            "code={system|code}&_count=50",
            Box::new(|i| format!("code={}&_count=50", pick(&codes, i))),
        ),
        (
            "Patient",
            "gender=female&birthdate=lt1960&_count=50",
            Box::new(|_| "gender=female&birthdate=lt1960&_count=50".to_string()),
        ),
        (
            "Observation",
            "subject={p}&_include=Observation:subject",
            Box::new(|i| {
                format!(
                    "subject=Patient/{}&_include=Observation:subject",
                    pick(&patients, i)
                )
            }),
        ),
    ];
    let mut searches = Vec::new();
    for (rt, label, make) in &queries {
        let mut times = Vec::new();
        let mut totals = 0i64;
        for i in 0..a.samples {
            let pairs: Vec<(String, String)> = form_pairs(&make(i));
            let q = SearchQuery::from_pairs(&pairs);
            let t = Instant::now();
            let r = store.search(rt, &q).await?;
            times.push(t.elapsed());
            totals += r.total.unwrap_or(0);
        }
        let mut p = percentiles(times);
        p["query"] = json!(format!("{rt}?{label}"));
        p["mean_total"] = json!(totals as f64 / a.samples.max(1) as f64);
        searches.push(p);
    }
    let report = json!({
        "backend": backend,
        "resources": ingested,
        "writers": a.writers,
        "people_per_transaction": a.people_per_tx,
        "ingest": {
            "seconds": ingest_s,
            "resources_per_s": ingested as f64 / ingest_s.max(1e-9),
            // SQLite's group commits during the load (null on PostgreSQL).
            "group_commits": (commits > 0).then_some(commits),
            "resources_per_commit": (commits > 0).then(|| ingested as f64 / commits as f64),
            "transaction": percentiles(tx_times),
        },
        "read": percentiles(reads),
        "search": searches,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(ExitCode::SUCCESS)
}

/// Builds the i-th sample of a query (a different patient each time).
type QueryMaker<'a> = Box<dyn Fn(usize) -> String + 'a>;

fn form_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("kizuna-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
