//! `kizuna bench load`: sustained mixed load on loopback. A `kizuna serve` child receives a
//! registered population, then for `--minutes` a fixed schedule of requests — registrations,
//! reads, patient searches and clinician summaries — at a set rate (by default 70 % of the
//! throughput a short calibration at full concurrency reached). Latency is measured from each
//! request's scheduled time, so a server that falls behind shows it (no coordinated omission).
//! The JSON report gives throughput, errors and p50/p99 per minute and per kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use kizuna_auth::dev::TokenRequest;
use kizuna_auth::Role;
use serde_json::{json, Value};

use crate::bench_server::{call, percentiles, rss_mib, BenchServer};
use crate::share_load::{eligibility_bundles, submissions, Submission};

/// Options of `kizuna bench load`.
#[derive(Args)]
pub struct LoadBenchArgs {
    /// 合成する人数 / people in the registered population
    #[arg(long, default_value_t = 1_000)]
    patients: u64,
    /// 負荷をかける分数 / minutes of load
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// 毎秒の要求数 (省略時は較正した最大の 70 %) / requests per second (default: 70 % of the calibrated maximum)
    #[arg(long)]
    rate: Option<f64>,
    /// 同時接続数 / concurrent connections
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// データベース URL (省略時は一時ディレクトリの SQLite) / database URL (default: SQLite in a temporary directory)
    #[arg(long)]
    database: Option<String>,
    /// 結果 JSON の出力先 / where to write the JSON report
    #[arg(long, default_value = "kizuna-data/bench/load.json")]
    out: PathBuf,
}

/// The kinds of request in the mix, with their share (in twentieths).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Register,
    Read,
    Search,
    Summary,
}

/// 4 registrations, 8 reads, 5 searches, 3 summaries in every 20 requests.
const MIX: [Kind; 20] = {
    use Kind::*;
    [
        Read, Search, Register, Read, Summary, Read, Search, Register, Read, Search, Read, Summary,
        Register, Read, Search, Read, Summary, Register, Search, Read,
    ]
};

/// Runs the benchmark.
pub fn run(a: LoadBenchArgs) -> anyhow::Result<ExitCode> {
    crate::bench_server::run_in_temp("load", &a.out.clone(), |tmp| bench(&a, tmp))
}

/// What every request needs: the server, tokens, and the sampled ids.
struct Fixture {
    base: String,
    operator: String,
    doctor: String,
    systems: BTreeMap<String, String>,
    /// Submissions kept back for the load (sent round-robin; after the first pass, re-sends
    /// replace).
    register: Vec<Submission>,
    observations: Vec<String>,
    persons: Vec<String>,
}

impl Fixture {
    /// One request of a kind; `n` picks which.
    fn request(&self, agent: &ureq::Agent, kind: Kind, n: usize) -> anyhow::Result<()> {
        let pick = |v: &[String]| v[(n * 7919) % v.len()].clone();
        match kind {
            Kind::Register => {
                let s = &self.register[n % self.register.len()];
                let token = self.systems.get(&s.from).map(String::as_str).unwrap_or("");
                let url = match &s.destination {
                    Some(d) => format!("{}/Bundle/$submit?destination={d}", self.base),
                    None => format!("{}/Bundle/$submit", self.base),
                };
                call(agent, "POST", &url, token, Some(&s.body))?;
            }
            Kind::Read => {
                let url = format!("{}/Observation/{}", self.base, pick(&self.observations));
                call(agent, "GET", &url, &self.operator, None)?;
            }
            Kind::Search => {
                let url = format!(
                    "{}/Observation?subject=Patient/{}&_sort=-date&_count=20",
                    self.base,
                    pick(&self.persons)
                );
                call(agent, "GET", &url, &self.operator, None)?;
            }
            Kind::Summary => {
                let url = format!("{}/Patient/{}/$summary", self.base, pick(&self.persons));
                call(agent, "GET", &url, &self.doctor, None)?;
            }
        }
        Ok(())
    }
}

/// One finished request: its kind, when it was due (seconds into the run), how long it took from
/// then, and whether it failed.
struct Done {
    kind: Kind,
    due_s: f64,
    latency: Duration,
    error: Option<String>,
}

/// Sends requests at `rate` per second (or as fast as `clients` connections allow when `None`)
/// for `secs` seconds and collects what happened.
fn drive(fx: &Fixture, clients: usize, rate: Option<f64>, secs: f64) -> Vec<Done> {
    let (tx, rx) = mpsc::channel::<(Kind, usize, Instant)>();
    let rx = Arc::new(Mutex::new(rx));
    let done = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let counter = AtomicU64::new(0);
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .max_idle_connections_per_host(clients * 2)
        .build();
    std::thread::scope(|sc| {
        for _ in 0..clients.max(1) {
            let (rx, done, agent) = (rx.clone(), done.clone(), agent.clone());
            let counter = &counter;
            sc.spawn(move || loop {
                let next = match rate {
                    Some(_) => rx.lock().ok().and_then(|r| r.recv().ok()),
                    // Closed loop: each connection sends its next request as soon as the last
                    // is answered.
                    None => {
                        if start.elapsed().as_secs_f64() >= secs {
                            None
                        } else {
                            let n = counter.fetch_add(1, Ordering::Relaxed) as usize;
                            Some((MIX[n % MIX.len()], n, Instant::now()))
                        }
                    }
                };
                let Some((kind, n, due)) = next else { break };
                let error = fx.request(&agent, kind, n).err().map(|e| e.to_string());
                let d = Done {
                    kind,
                    due_s: due.duration_since(start).as_secs_f64(),
                    latency: due.elapsed(),
                    error,
                };
                if let Ok(mut v) = done.lock() {
                    v.push(d);
                }
            });
        }
        if let Some(rate) = rate {
            // Open loop: requests fall due on a fixed schedule whatever the answers do.
            let gap = Duration::from_secs_f64(1.0 / rate.max(0.1));
            let mut n = 0usize;
            let mut due = start;
            while due.duration_since(start).as_secs_f64() < secs {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if tx.send((MIX[n % MIX.len()], n, due)).is_err() {
                    break;
                }
                n += 1;
                due += gap;
            }
        }
        drop(tx);
    });
    Arc::try_unwrap(done)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_default()
}

fn summarise(done: &[Done]) -> Value {
    let mut by_kind: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for d in done {
        by_kind
            .entry(format!("{:?}", d.kind).to_lowercase())
            .or_default()
            .push(d.latency);
        if let Some(e) = &d.error {
            let short: String = e.chars().take(120).collect();
            *errors.entry(short).or_default() += 1;
        }
    }
    json!({
        "requests": done.len(),
        "errors": done.iter().filter(|d| d.error.is_some()).count(),
        "error_kinds": errors,
        "latency": percentiles(done.iter().map(|d| d.latency).collect()),
        "by_kind": by_kind.into_iter().map(|(k, v)| (k, percentiles(v))).collect::<BTreeMap<_, _>>(),
    })
}

fn bench(a: &LoadBenchArgs, tmp: &Path) -> anyhow::Result<Value> {
    let (db, backend) = crate::bench_server::bench_database(&a.database, tmp);
    eprintln!("生成中 / generating {} people", a.patients);
    let inst = kizuna_synth::population::institutions(3);
    let people: Vec<kizuna_synth::PersonOutput> = (0..a.patients)
        .map(|i| kizuna_synth::person_output(3, i, 2, &inst))
        .collect();
    let eligibility = eligibility_bundles(&people, 200);
    let mut all = submissions(&people);
    drop(people);
    // One in five submissions is kept for the load.
    let mut register = Vec::new();
    let mut preload = Vec::new();
    for (i, s) in all.drain(..).enumerate() {
        if i % 5 == 0 {
            register.push(s);
        } else {
            preload.push(s);
        }
    }
    let srv = BenchServer::start(tmp, &db, "enforce")?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(600))
        .build();
    crate::bench_server::import_eligibility(&agent, &srv, &eligibility)?;
    let mut systems = BTreeMap::new();
    for s in preload.iter().chain(register.iter()) {
        if !systems.contains_key(&s.from) {
            let mut r = TokenRequest::for_role(Role::Institution);
            r.institution = Some(s.from.clone());
            r.lifetime = 24 * 3600;
            systems.insert(s.from.clone(), srv.token_for(&r)?);
        }
    }
    let mut doctor = TokenRequest::for_role(Role::Clinician);
    doctor.institution = Some("2713456781".into());
    doctor.qualification = Some("doctor".into());
    doctor.lifetime = 24 * 3600;
    let mut fx = Fixture {
        base: srv.base.clone(),
        operator: srv.token.clone(),
        doctor: srv.token_for(&doctor)?,
        systems,
        register,
        observations: Vec::new(),
        persons: Vec::new(),
    };
    // The population, registered before the clock starts (through the same API, in parallel).
    eprintln!("登録中 / registering {} submissions", preload.len());
    let queue = Mutex::new(preload);
    let persons = Mutex::new(std::collections::BTreeSet::new());
    std::thread::scope(|sc| {
        for _ in 0..a.clients.max(1) {
            let (queue, persons, fx, agent) = (&queue, &persons, &fx, agent.clone());
            sc.spawn(move || {
                while let Some(s) = queue.lock().ok().and_then(|mut q| q.pop()) {
                    let token = fx.systems.get(&s.from).map(String::as_str).unwrap_or("");
                    let url = match &s.destination {
                        Some(d) => format!("{}/Bundle/$submit?destination={d}", fx.base),
                        None => format!("{}/Bundle/$submit", fx.base),
                    };
                    if let Ok(p) = call(&agent, "POST", &url, token, Some(&s.body)) {
                        let person = crate::demo_cmd::parameter(&p, "person").unwrap_or_default();
                        if let Ok(mut ps) = persons.lock() {
                            ps.insert(person);
                        }
                    }
                }
            });
        }
    });
    fx.persons = persons
        .into_inner()
        .map(|s| s.into_iter().filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    let sample = call(
        &agent,
        "GET",
        &format!("{}/Observation?_count=1000&_elements=id", srv.base),
        &srv.token,
        None,
    )?;
    fx.observations = sample["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
        .collect();
    if fx.persons.is_empty() || fx.observations.is_empty() || fx.register.is_empty() {
        bail!("登録できませんでした / the population was not registered");
    }
    // The reading doctor has the patients' consent.
    for p in &fx.persons {
        call(
            &agent,
            "POST",
            &format!(
                "{}/Patient/{p}/$consent?category=diagnosis&category=care",
                srv.base
            ),
            &fx.doctor,
            None,
        )?;
    }
    let (rate, calibration) = match a.rate {
        Some(r) => (r, Value::Null),
        None => {
            eprintln!("較正中 / calibrating (30 s at full concurrency)");
            let done = drive(&fx, a.clients, None, 30.0);
            let max = done.len() as f64 / 30.0;
            let mut c = summarise(&done);
            c["requests_per_s"] = json!(max);
            ((max * 0.7).max(1.0), c)
        }
    };
    eprintln!("負荷 / load: {rate:.0} req/s for {} min", a.minutes);
    let secs = a.minutes * 60.0;
    let done = drive(&fx, a.clients, Some(rate), secs);
    let mut minutes = Vec::new();
    let mut m = 0.0;
    while m * 60.0 < secs {
        let slice: Vec<&Done> = done
            .iter()
            .filter(|d| d.due_s >= m * 60.0 && d.due_s < (m + 1.0) * 60.0)
            .collect();
        let mut p = percentiles(slice.iter().map(|d| d.latency).collect());
        p["minute"] = json!(m + 1.0);
        p["errors"] = json!(slice.iter().filter(|d| d.error.is_some()).count());
        minutes.push(p);
        m += 1.0;
    }
    let p99s: Vec<f64> = minutes
        .iter()
        .filter_map(|p| p["p99_ms"].as_f64())
        .collect();
    let flatness = match (
        p99s.iter()
            .cloned()
            .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x)))),
        p99s.iter()
            .cloned()
            .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.min(x)))),
    ) {
        (Some(hi), Some(lo)) if lo > 0.0 => json!(hi / lo),
        _ => Value::Null,
    };
    let mut overall = summarise(&done);
    overall["requests_per_s"] = json!(done.len() as f64 / secs.max(1e-9));
    let rss = rss_mib(srv.child.id());
    Ok(json!({
        "benchmark": "kizuna bench load",
        "machine": crate::bench_server::machine(),
        "backend": backend,
        "patients": a.patients,
        "clients": a.clients,
        "mix_per_20": {"register": 4, "read": 8, "search": 5, "summary": 3},
        "calibration": calibration,
        "target_requests_per_s": rate,
        "minutes": a.minutes,
        "overall": overall,
        "per_minute": minutes,
        "p99_max_over_min": flatness,
        "server_rss_mib": rss.map(|r| r.0),
        "server_peak_rss_mib": rss.map(|r| r.1),
    }))
}
