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

use crate::bench_server::{
    bytes_written, cpu_seconds, cpu_us_per, get_json, percentiles, rss_mib, status_of, BenchServer,
    MachineTicks,
};

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
    /// 投入済みの --database を測る (同じ --resources, --people-per-bundle で投入したもの) / measure a
    /// --database this benchmark loaded before (same --resources and --people-per-bundle): no ingest
    #[arg(long, requires = "database")]
    loaded: bool,
    /// 結果 JSON の出力先 / where to write the JSON report
    #[arg(long, default_value = "kizuna-data/bench/fhir.json")]
    out: PathBuf,
    /// 測るサーバー / the server to measure: kizuna, or hfs (Helios FHIR Server, a peer)
    #[arg(long, default_value = "kizuna")]
    server: String,
    /// hfs の実行ファイル / the hfs binary (with --server hfs)
    #[arg(long, default_value = "hfs")]
    hfs_bin: PathBuf,
    /// hfs のデータディレクトリ (search-parameters-r4.json, compartment-definitions-r4.json) / hfs's data directory
    #[arg(long)]
    hfs_data: Option<PathBuf>,
}

/// Insured-person identifiers (`system|value`) of the generated Patients and the `system|code` of
/// the generated Observations, in generation order: every server is asked about the same people
/// and codes, so result counts can be compared across servers.
#[derive(Default)]
struct Sample {
    members: Vec<String>,
    codes: Vec<String>,
}

const MEMBER_ID: &str = "http://jpfhir.jp/fhir/clins/Idsystem/JP_Insurance_memberID";

/// One transaction Bundle of `people` persons' JP-CLINS submissions, as request text.
fn transaction(
    first: u64,
    people: u64,
    inst: &[kizuna_synth::population::Institution],
    sample: &mut Sample,
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
                let r = &e["resource"];
                let rt = r["resourceType"].as_str().unwrap_or("");
                if rt == "Patient" && sample.members.len() < 300 {
                    for i in r["identifier"].as_array().into_iter().flatten() {
                        if i["system"] == MEMBER_ID {
                            if let Some(v) = i["value"].as_str() {
                                sample.members.push(format!("{MEMBER_ID}|{v}"));
                            }
                        }
                    }
                }
                if rt == "Observation" && sample.codes.len() < 50 {
                    if let Some(c) = r["code"]["coding"][0].as_object() {
                        let code = format!(
                            "{}|{}",
                            c.get("system").and_then(Value::as_str).unwrap_or(""),
                            c.get("code").and_then(Value::as_str).unwrap_or("")
                        );
                        if !sample.codes.contains(&code) {
                            sample.codes.push(code);
                        }
                    }
                }
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
    let (db, backend) = crate::bench_server::bench_database(&a.database, tmp);
    // Generated before the server starts, so the timed part measures the server, not the
    // generator (which would take one of this machine's two cores).
    let inst = kizuna_synth::population::institutions(11);
    let mut bundles: Vec<(String, u64)> = Vec::new();
    let (mut produced, mut next) = (0u64, 0u64);
    let per = a.people_per_bundle.max(1);
    let mut sample = Sample::default();
    eprintln!("生成中 / generating ~{} resources", a.resources);
    while produced < a.resources {
        let b = transaction(next, per, &inst, &mut sample);
        next += per;
        produced += b.1;
        bundles.push(b);
    }
    let n_bundles = bundles.len();
    // Bundles are sent last-first (popped); the people asked about are loaded early either way.
    let start = || -> anyhow::Result<BenchServer> {
        match a.server.as_str() {
            "kizuna" => BenchServer::start(tmp, &db, &a.validation),
            "hfs" => {
                let data = a.hfs_data.as_deref().context(
                    "--hfs-data を指定してください / give --hfs-data (bench/compare.py prepares it)",
                )?;
                BenchServer::start_hfs(tmp, &a.hfs_bin, data)
            }
            other => bail!("不明なサーバー / unknown server {other} (kizuna, hfs)"),
        }
    };
    let backend = if a.server == "hfs" { "sqlite" } else { backend };
    let srv = start()?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(600))
        .max_idle_connections_per_host(a.clients.max(1) * 2)
        .build();
    // Load.
    if a.loaded {
        bundles.clear();
    }
    let queue = Arc::new(Mutex::new(bundles));
    let loaded = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let times = Arc::new(Mutex::new(Vec::new()));
    let bar = indicatif::ProgressBar::new(produced);
    let written_before = bytes_written(srv.child.id());
    let cpu_before = cpu_seconds(srv.child.id());
    let machine_before = MachineTicks::now();
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
    let cpu_after = cpu_seconds(srv.child.id());
    let machine_after = MachineTicks::now();
    // The server's writes during the load (database, WAL, audit log, answers): what a stored
    // resource costs in bytes, the figure SQLite's page-sized WAL frames make large.
    let written = bytes_written(srv.child.id())
        .zip(written_before)
        .map(|(after, before)| after.saturating_sub(before));
    bar.finish_and_clear();
    let loaded = if a.loaded {
        produced
    } else {
        loaded.load(Ordering::Relaxed)
    };
    let failed = failures.load(Ordering::Relaxed);
    if loaded == 0 {
        bail!("一件も保存できませんでした / nothing was stored ({failed} failures)");
    }
    let tx_times = times.lock().map(|v| v.clone()).unwrap_or_default();
    // The same people and codes on every server. A person has a Patient per submitting bundle, so
    // the one asked about is found through their records (untimed): the Patient their
    // Observations name (with the code of one of them, so patient+code queries have answers) and
    // the one their Conditions name.
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let mut subjects = Vec::new();
    let mut subject_codes = Vec::new();
    let mut members = Vec::new();
    let mut obs_ids = Vec::new();
    let mut cond_subjects = Vec::new();
    let subject_of = |b: &Value| {
        let mut refs: Vec<String> = b["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["resource"]["subject"]["reference"].as_str())
            .map(str::to_string)
            .collect();
        refs.sort();
        refs.into_iter().next()
    };
    for m in &sample.members {
        let url = |rt: &str| format!("{}/{rt}?subject.identifier={}&_count=100", srv.base, enc(m));
        let b = get_json(&agent, &srv, &url("Observation"))?;
        if let Some(s) = subject_of(&b) {
            let mine = b["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["resource"]["subject"]["reference"].as_str() == Some(s.as_str()));
            let mut code = None;
            for e in mine.take(3) {
                obs_ids.extend(e["resource"]["id"].as_str().map(str::to_string));
                let c = &e["resource"]["code"]["coding"][0];
                code.get_or_insert_with(|| {
                    format!(
                        "{}|{}",
                        c["system"].as_str().unwrap_or(""),
                        c["code"].as_str().unwrap_or("")
                    )
                });
            }
            subjects.push(s);
            subject_codes.push(code.unwrap_or_default());
            members.push(m.clone());
        }
        let b = get_json(&agent, &srv, &url("Condition"))?;
        cond_subjects.extend(subject_of(&b));
    }
    let codes = sample.codes.clone();
    if obs_ids.is_empty() || subjects.is_empty() || codes.is_empty() || cond_subjects.is_empty() {
        bail!(
            "標本が取れません / could not sample the stored data ({} people found)",
            subjects.len()
        );
    }
    let pick = |v: &[String], i: usize| v[(i * 7919) % v.len()].clone();
    let mut reads = Vec::new();
    for i in 0..a.samples {
        let url = format!("{}/Observation/{}", srv.base, pick(&obs_ids, i));
        let t = Instant::now();
        crate::bench_server::get_bytes(&agent, &srv, &url)?;
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
            "Observation?code-value-quantity={system|code}$gt5&_count=50",
            Box::new(|i| {
                format!(
                    "Observation?code-value-quantity={}&_count=50",
                    enc(&format!("{}$gt5", pick(&codes, i)))
                )
            }),
        ),
        (
            "Observation?patient={patient}&code={one of theirs}&_sort=-date&_count=10",
            Box::new(|i| {
                format!(
                    "Observation?patient={}&code={}&_sort=-date&_count=10",
                    pick(&subjects, i),
                    enc(&pick(&subject_codes, i))
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
        let mut matches = 0u64;
        let mut errors = 0u64;
        let mut first_error = None;
        let ty = label.split('?').next().unwrap_or("");
        for i in 0..a.samples {
            let url = format!("{}/{}", srv.base, make(i));
            let t = Instant::now();
            let b = match crate::bench_server::get_bytes(&agent, &srv, &url) {
                Ok(bytes) => {
                    times.push(t.elapsed());
                    serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null)
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                    continue;
                }
            };
            if let Some(t) = b["total"].as_i64() {
                totals += t;
                counted += 1;
            }
            // Matches on the first page (included resources excluded), to compare servers.
            matches += b["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| match e["search"]["mode"].as_str() {
                    Some(m) => m == "match",
                    None => e["resource"]["resourceType"] == ty,
                })
                .count() as u64;
        }
        let mut p = percentiles(times);
        p["query"] = json!(label);
        p["errors"] = json!(errors);
        p["first_error"] = json!(first_error);
        p["mean_matches"] = json!(matches as f64 / (a.samples as u64 - errors).max(1) as f64);
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
        let srv = start()?;
        match measure_export(&agent, &srv) {
            Ok(v) => v,
            Err(e) => json!({"error": e.to_string()}),
        }
    };
    Ok(json!({
        "benchmark": "kizuna bench fhir",
        "server": a.server,
        "machine": crate::bench_server::machine(),
        "backend": backend,
        "validation": a.validation,
        "resources": loaded,
        "ingest": if a.loaded { Value::Null } else { json!({
            "clients": a.clients,
            "bundles": n_bundles,
            "failed_bundles": failed,
            "resources_per_bundle": produced as f64 / n_bundles.max(1) as f64,
            "seconds": ingest_s,
            "resources_per_s": loaded as f64 / ingest_s.max(1e-9),
            "bundles_per_s": n_bundles as f64 / ingest_s.max(1e-9),
            "server_bytes_written": written,
            "server_bytes_written_per_resource": written.map(|w| w as f64 / loaded.max(1) as f64),
            "server_cpu_us_per_resource": cpu_us_per(cpu_before, cpu_after, loaded),
            "machine_cpu": MachineTicks::shares(machine_before, machine_after),
            "bundle_latency": percentiles(tx_times),
        })},
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
    let mut exported: u64 = manifest["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["count"].as_u64())
        .sum();
    // Download every file, as a client would; bytes are counted, not kept.
    let t = Instant::now();
    let mut bytes = 0u64;
    let mut lines = 0u64;
    for o in manifest["output"].as_array().into_iter().flatten() {
        let url = o["url"].as_str().unwrap_or("");
        let r = agent
            .get(url)
            .set("authorization", &format!("Bearer {}", srv.token))
            .call()
            .map_err(|e| anyhow::anyhow!("{url}: {}", status_of(&e)))?;
        let mut counter = LineCounter::default();
        bytes += std::io::copy(&mut r.into_reader(), &mut counter)?;
        lines += counter.lines;
        if let Some((rss, _)) = rss_mib(pid) {
            peak_rss = peak_rss.max(rss);
        }
    }
    let download_s = t.elapsed().as_secs_f64();
    // Not every server counts its files in the manifest; the lines downloaded are the count then.
    if exported == 0 {
        exported = lines;
    }
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

/// Counts NDJSON lines as a download streams through, keeping nothing.
#[derive(Default)]
struct LineCounter {
    lines: u64,
}

impl std::io::Write for LineCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lines += buf.iter().filter(|b| **b == b'\n').count() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
