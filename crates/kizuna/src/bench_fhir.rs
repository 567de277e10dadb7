//! `kizuna bench fhir`: the FHIR server measured as a client sees it. It starts `kizuna serve` as a
//! child process on a loopback port (SQLite in a temporary directory, or `--database`), loads
//! synthetic JP-CLINS data as transaction Bundles over HTTP from several clients, times reads and
//! typical searches, then restarts the server and times a system `$export` while sampling the
//! server's resident memory. The report (JSON) names the machine, the backend and every figure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use kizuna_synth::clinical::BundleKind;
use serde_json::{json, Value};

use crate::bench_server::{get_json, percentiles, rss_mib, status_of, BenchServer};

/// Options of `kizuna bench fhir`.
#[derive(Args)]
pub struct FhirBenchArgs {
    /// 投入するリソース数 (概数) / resources to load (approximately)
    #[arg(long, default_value_t = 100_000)]
    resources: u64,
    /// データベース URL (省略時は一時ディレクトリの SQLite) / database URL (default: SQLite in a temporary directory)
    #[arg(long)]
    database: Option<String>,
    /// 同時クライアント数 / concurrent clients loading transaction Bundles
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// 1 Bundle あたりの人数 / people per transaction Bundle
    #[arg(long, default_value_t = 4)]
    people_per_bundle: u64,
    /// 書き込み時の検証 / validation on write: off, warn, enforce
    #[arg(long, default_value = "off")]
    validation: String,
    /// 各問い合わせの試行回数 / repetitions of each read and query
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// $export を測らない / skip the $export measurement
    #[arg(long)]
    no_export: bool,
    /// 結果 JSON の出力先 / where to write the JSON report
    #[arg(long, default_value = "kizuna-data/bench/fhir.json")]
    out: PathBuf,
}

/// One transaction Bundle of `people` persons' JP-CLINS submissions, as request text.
fn transaction(
    first: u64,
    people: u64,
    inst: &[kizuna_synth::population::Institution],
) -> (String, u64) {
    let mut entries = Vec::new();
    for i in first..first + people {
        for (kind, b) in kizuna_synth::sample_submissions(11, i, 2, inst) {
            if !matches!(
                kind,
                BundleKind::Condition | BundleKind::Observation | BundleKind::AllergyIntolerance
            ) {
                continue;
            }
            for e in b["entry"].as_array().into_iter().flatten() {
                let rt = e["resource"]["resourceType"].as_str().unwrap_or("");
                entries.push(json!({"fullUrl": e["fullUrl"], "resource": e["resource"], "request": {"method": "POST", "url": rt}}));
            }
        }
    }
    let n = entries.len() as u64;
    (
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}).to_string(),
        n,
    )
}

/// Runs the benchmark.
pub fn run(a: FhirBenchArgs) -> anyhow::Result<ExitCode> {
    crate::bench_server::run_in_temp("fhir", &a.out.clone(), |tmp| bench(&a, tmp))
}

fn bench(a: &FhirBenchArgs, tmp: &Path) -> anyhow::Result<Value> {
    let db = a
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", tmp.join("kizuna.db").display()));
    let backend = if db.starts_with("postgres") {
        "postgresql"
    } else {
        "sqlite"
    };
    // Generated before the server starts, so the timed part measures the server, not the
    // generator (which would take one of this machine's two cores).
    let inst = kizuna_synth::population::institutions(11);
    let mut bundles: Vec<(String, u64)> = Vec::new();
    let (mut produced, mut next) = (0u64, 0u64);
    let per = a.people_per_bundle.max(1);
    eprintln!("生成中 / generating ~{} resources", a.resources);
    while produced < a.resources {
        let b = transaction(next, per, &inst);
        next += per;
        produced += b.1;
        bundles.push(b);
    }
    let n_bundles = bundles.len();
    let srv = BenchServer::start(tmp, &db, &a.validation)?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(600))
        .max_idle_connections_per_host(a.clients.max(1) * 2)
        .build();
    // Load.
    let queue = Arc::new(Mutex::new(bundles));
    let loaded = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let times = Arc::new(Mutex::new(Vec::new()));
    let bar = indicatif::ProgressBar::new(produced);
    let started = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..a.clients.max(1) {
            let (queue, loaded, failures, times, bar, agent) = (
                queue.clone(),
                loaded.clone(),
                failures.clone(),
                times.clone(),
                bar.clone(),
                agent.clone(),
            );
            let (url, token) = (srv.base.clone(), format!("Bearer {}", srv.token));
            sc.spawn(move || loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some((body, n)) = next else { break };
                let t = Instant::now();
                let r = agent
                    .post(&url)
                    .set("authorization", &token)
                    .set("content-type", "application/fhir+json")
                    .set("prefer", "return=minimal")
                    .send_string(&body);
                if let Ok(mut v) = times.lock() {
                    v.push(t.elapsed());
                }
                match r {
                    Ok(resp) => {
                        let mut sink = Vec::new();
                        let _ = resp.into_reader().read_to_end(&mut sink);
                        loaded.fetch_add(n, Ordering::Relaxed);
                        bar.inc(n);
                    }
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let ingest_s = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let loaded = loaded.load(Ordering::Relaxed);
    let failed = failures.load(Ordering::Relaxed);
    if loaded == 0 {
        bail!("一件も保存できませんでした / nothing was stored ({failed} failures)");
    }
    let tx_times = times.lock().map(|v| v.clone()).unwrap_or_default();
    // Sample ids, subjects, codes and insured-person identifiers from what is stored.
    let sample = get_json(
        &agent,
        &srv,
        &format!(
            "{}/Observation?_count=1000&_elements=subject,code",
            srv.base
        ),
    )?;
    let mut obs_ids = Vec::new();
    let mut subjects = Vec::new();
    let mut codes = Vec::new();
    for e in sample["entry"].as_array().into_iter().flatten() {
        let r = &e["resource"];
        obs_ids.extend(r["id"].as_str().map(str::to_string));
        subjects.extend(r["subject"]["reference"].as_str().map(str::to_string));
        if let Some(c) = r["code"]["coding"][0].as_object() {
            codes.push(format!(
                "{}|{}",
                c.get("system").and_then(Value::as_str).unwrap_or(""),
                c.get("code").and_then(Value::as_str).unwrap_or("")
            ));
        }
    }
    let conds = get_json(
        &agent,
        &srv,
        &format!("{}/Condition?_count=500&_elements=subject", srv.base),
    )?;
    let cond_subjects: Vec<String> = conds["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            e["resource"]["subject"]["reference"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    let pats = get_json(
        &agent,
        &srv,
        &format!("{}/Patient?_count=500&_elements=identifier", srv.base),
    )?;
    let mut members = Vec::new();
    for e in pats["entry"].as_array().into_iter().flatten() {
        for i in e["resource"]["identifier"].as_array().into_iter().flatten() {
            if i["system"] == "http://jpfhir.jp/fhir/clins/Idsystem/JP_Insurance_memberID" {
                members.push(format!(
                    "{}|{}",
                    i["system"].as_str().unwrap_or(""),
                    i["value"].as_str().unwrap_or("")
                ));
            }
        }
    }
    if obs_ids.is_empty()
        || subjects.is_empty()
        || cond_subjects.is_empty()
        || codes.is_empty()
        || members.is_empty()
    {
        bail!("標本が取れません / could not sample the stored data");
    }
    let pick = |v: &[String], i: usize| v[(i * 7919) % v.len()].clone();
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let mut reads = Vec::new();
    for i in 0..a.samples {
        let url = format!("{}/Observation/{}", srv.base, pick(&obs_ids, i));
        let t = Instant::now();
        get_json(&agent, &srv, &url)?;
        reads.push(t.elapsed());
    }
    type Make<'a> = Box<dyn Fn(usize) -> String + 'a>;
    let queries: Vec<(&str, Make)> = vec![
        (
            "Observation?subject={patient}",
            Box::new(|i| format!("Observation?subject={}", pick(&subjects, i))),
        ),
        (
            "Condition?patient={patient}",
            Box::new(|i| format!("Condition?patient={}", pick(&cond_subjects, i))),
        ),
        (
            "Observation?subject={patient}&date=ge2025-01-01",
            Box::new(|i| {
                format!(
                    "Observation?subject={}&date=ge2025-01-01",
                    pick(&subjects, i)
                )
            }),
        ),
        (
            "Observation?code={system|code}&_count=50",
            Box::new(|i| format!("Observation?code={}&_count=50", enc(&pick(&codes, i)))),
        ),
        (
            "Observation?patient={patient}&code={code}&_sort=-date&_count=10",
            Box::new(|i| {
                format!(
                    "Observation?patient={}&code={}&_sort=-date&_count=10",
                    pick(&subjects, i),
                    enc(&pick(&codes, i))
                )
            }),
        ),
        (
            "Patient?identifier={被保険者番号}",
            Box::new(|i| format!("Patient?identifier={}", enc(&pick(&members, i)))),
        ),
        (
            "Observation?subject.identifier={被保険者番号}",
            Box::new(|i| format!("Observation?subject.identifier={}", enc(&pick(&members, i)))),
        ),
        (
            "Patient?gender=female&birthdate=lt1960&_count=50",
            Box::new(|_| "Patient?gender=female&birthdate=lt1960&_count=50".to_string()),
        ),
        (
            "Observation?subject={patient}&_include=Observation:subject",
            Box::new(|i| {
                format!(
                    "Observation?subject={}&_include=Observation:subject",
                    pick(&subjects, i)
                )
            }),
        ),
        // Population queries again with an exact count of every match.
        (
            "Observation?code={system|code}&_count=50&_total=accurate",
            Box::new(|i| {
                format!(
                    "Observation?code={}&_count=50&_total=accurate",
                    enc(&pick(&codes, i))
                )
            }),
        ),
        (
            "Patient?gender=female&birthdate=lt1960&_count=50&_total=accurate",
            Box::new(|_| {
                "Patient?gender=female&birthdate=lt1960&_count=50&_total=accurate".to_string()
            }),
        ),
    ];
    let mut searches = Vec::new();
    for (label, make) in &queries {
        let mut times = Vec::new();
        let mut totals = 0i64;
        let mut counted = 0i64;
        for i in 0..a.samples {
            let url = format!("{}/{}", srv.base, make(i));
            let t = Instant::now();
            let b = get_json(&agent, &srv, &url)?;
            times.push(t.elapsed());
            if let Some(t) = b["total"].as_i64() {
                totals += t;
                counted += 1;
            }
        }
        let mut p = percentiles(times);
        p["query"] = json!(label);
        // `total` is left out beyond the count cap unless asked for: averaged where given.
        p["mean_total"] = if counted > 0 {
            json!(totals as f64 / counted as f64)
        } else {
            Value::Null
        };
        searches.push(p);
    }
    let export = if a.no_export {
        Value::Null
    } else {
        // A fresh process, so the high-water mark is the export's own.
        drop(srv);
        let srv = BenchServer::start(tmp, &db, &a.validation)?;
        measure_export(&agent, &srv)?
    };
    Ok(json!({
        "benchmark": "kizuna bench fhir",
        "machine": crate::bench_server::machine(),
        "backend": backend,
        "validation": a.validation,
        "resources": loaded,
        "ingest": {
            "clients": a.clients,
            "bundles": n_bundles,
            "failed_bundles": failed,
            "resources_per_bundle": produced as f64 / n_bundles.max(1) as f64,
            "seconds": ingest_s,
            "resources_per_s": loaded as f64 / ingest_s.max(1e-9),
            "bundles_per_s": n_bundles as f64 / ingest_s.max(1e-9),
            "bundle_latency": percentiles(tx_times),
        },
        "read": percentiles(reads),
        "search": searches,
        "export": export,
    }))
}

fn measure_export(agent: &ureq::Agent, srv: &BenchServer) -> anyhow::Result<Value> {
    let pid = srv.child.id();
    let before = rss_mib(pid);
    let t = Instant::now();
    let kick = agent
        .get(&format!("{}/$export", srv.base))
        .set("authorization", &format!("Bearer {}", srv.token))
        .set("prefer", "respond-async")
        .call()
        .map_err(|e| anyhow::anyhow!("$export: {}", status_of(&e)))?;
    let status_url = kick
        .header("content-location")
        .context("Content-Location がありません / no Content-Location")?
        .to_string();
    let mut peak_rss = before.map(|b| b.0).unwrap_or(0.0);
    let manifest = loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some((rss, _)) = rss_mib(pid) {
            peak_rss = peak_rss.max(rss);
        }
        let r = agent
            .get(&status_url)
            .set("authorization", &format!("Bearer {}", srv.token))
            .call()
            .map_err(|e| anyhow::anyhow!("status: {}", status_of(&e)))?;
        if r.status() == 200 {
            break serde_json::from_reader::<_, Value>(r.into_reader())?;
        }
    };
    let export_s = t.elapsed().as_secs_f64();
    let exported: u64 = manifest["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["count"].as_u64())
        .sum();
    // Download every file, as a client would; bytes are counted, not kept.
    let t = Instant::now();
    let mut bytes = 0u64;
    for o in manifest["output"].as_array().into_iter().flatten() {
        let url = o["url"].as_str().unwrap_or("");
        let r = agent
            .get(url)
            .set("authorization", &format!("Bearer {}", srv.token))
            .call()
            .map_err(|e| anyhow::anyhow!("{url}: {}", status_of(&e)))?;
        bytes += std::io::copy(&mut r.into_reader(), &mut std::io::sink())?;
        if let Some((rss, _)) = rss_mib(pid) {
            peak_rss = peak_rss.max(rss);
        }
    }
    let download_s = t.elapsed().as_secs_f64();
    let after = rss_mib(pid);
    Ok(json!({
        "resources": exported,
        "files": manifest["output"].as_array().map(Vec::len),
        "seconds": export_s,
        "resources_per_s": exported as f64 / export_s.max(1e-9),
        "download_mib": bytes as f64 / 1048576.0,
        "download_mib_per_s": bytes as f64 / 1048576.0 / download_s.max(1e-9),
        "server_rss_before_mib": before.map(|b| b.0),
        "server_rss_sampled_peak_mib": peak_rss,
        "server_peak_rss_mib": after.map(|a| a.1),
    }))
}
