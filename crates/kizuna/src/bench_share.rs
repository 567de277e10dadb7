//! `kizuna bench share`: the sharing service measured as its clients see it. A `kizuna serve`
//! child (SQLite in a temporary directory, or `--database`) receives eligibility records, then every
//! submission of a generated population through `Bundle/$submit` from several institution systems
//! at once — with full JP-CLINS validation, the policy decision and the audit record on each — and
//! then answers `$summary` (after consent and in an emergency) and `$my-record`. The report (JSON)
//! gives bundles/s, resources/s and latencies. `--background-patients` first registers a large
//! population streamed from the generator, so the same figures can be taken at a national scale.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use kizuna_auth::dev::TokenRequest;
use kizuna_auth::Role;
use serde_json::{json, Value};

use crate::bench_server::{
    call, cpu_seconds, cpu_us_per, import_eligibility, percentiles, rss_mib, BenchServer,
    MachineTicks,
};
use crate::share_load::{eligibility_bundles, submissions, Submission};
use kizuna_synth::clinical::BundleKind;

/// Options of `kizuna bench share`.
#[derive(Args)]
pub struct ShareBenchArgs {
    /// 合成する人数 / people to generate and register
    #[arg(long, default_value_t = 2_000)]
    patients: u64,
    /// データベース URL (省略時は一時ディレクトリの SQLite) / database URL (default: SQLite in a temporary directory)
    #[arg(long)]
    database: Option<String>,
    /// 同時に送信する医療機関システム数 / institution systems submitting at once
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// $summary などの試行回数 / repetitions of $summary and $my-record
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// 乱数の種 / seed
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// 計測前に登録する背景人口 (資格情報と傷病名・アレルギー・処方のみ、生成しながら送信) / people
    /// registered before the timed part (eligibility plus their condition, allergy and prescription
    /// submissions, generated while they are sent), so that the timed part runs against a large
    /// person index and store
    #[arg(long, default_value_t = 0)]
    background_patients: u64,
    /// 結果 JSON の出力先 / where to write the JSON report
    #[arg(long, default_value = "kizuna-data/bench/share.json")]
    out: PathBuf,
}

/// The institution whose clinicians read summaries in the benchmark (not one that submits).
const READER: &str = "2713456781";
/// A second one, for emergency access without consent.
const EMERGENCY: &str = "1319876540";

/// Runs the benchmark.
pub fn run(a: ShareBenchArgs) -> anyhow::Result<ExitCode> {
    crate::bench_server::run_in_temp("share", &a.out.clone(), |tmp| bench(&a, tmp))
}

/// What the submitting clients measured.
#[derive(Default)]
struct Submitted {
    latencies: Vec<Duration>,
    resources: u64,
    items: u64,
    failed: HashMap<String, u64>,
    /// person → kinds submitted for them.
    persons: HashMap<String, usize>,
}

fn bench(a: &ShareBenchArgs, tmp: &Path) -> anyhow::Result<Value> {
    let (db, backend) = crate::bench_server::bench_database(&a.database, tmp);
    // Generated before the server starts, so the timed part measures the server.
    eprintln!("生成中 / generating {} people", a.patients);
    let inst = kizuna_synth::population::institutions(a.seed);
    let people: Vec<kizuna_synth::PersonOutput> = (0..a.patients)
        .map(|i| kizuna_synth::person_output(a.seed, i, 2, &inst))
        .collect();
    let eligibility = eligibility_bundles(&people, 200);
    let jobs = submissions(&people);
    drop(people);
    let n_bundles = jobs.len();
    let srv = BenchServer::start(tmp, &db, "enforce")?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(600))
        .max_idle_connections_per_host(a.clients.max(1) * 2)
        .build();

    let t = Instant::now();
    import_eligibility(&agent, &srv, &eligibility)?;
    let eligibility_s = t.elapsed().as_secs_f64();

    // Every institution system submits with its own token, as in production.
    let mut tokens: HashMap<String, String> = HashMap::new();
    for from in jobs
        .iter()
        .map(|j| &j.from)
        .chain(inst.iter().map(|i| &i.number))
    {
        if !tokens.contains_key(from) {
            let mut r = TokenRequest::for_role(Role::Institution);
            r.institution = Some(from.clone());
            r.subject = format!("system-{from}");
            r.lifetime = 7 * 24 * 3600;
            tokens.insert(from.clone(), srv.token_for(&r)?);
        }
    }
    let background = load_background(a, &srv, &agent, &inst, &tokens)?;
    let queue: Arc<Mutex<Vec<Submission>>> = Arc::new(Mutex::new(jobs));
    let done = Arc::new(Mutex::new(Submitted::default()));
    let bar = indicatif::ProgressBar::new(n_bundles as u64);
    let cpu_before = cpu_seconds(srv.child.id());
    let machine_before = MachineTicks::now();
    let started = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..a.clients.max(1) {
            let (queue, done, bar, agent, tokens) = (
                queue.clone(),
                done.clone(),
                bar.clone(),
                agent.clone(),
                &tokens,
            );
            let base = srv.base.clone();
            sc.spawn(move || loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some(job) = next else { break };
                let resources = job.resources;
                let url = match &job.destination {
                    Some(d) => format!("{base}/Bundle/$submit?destination={d}"),
                    None => format!("{base}/Bundle/$submit"),
                };
                let token = tokens.get(&job.from).map(String::as_str).unwrap_or("");
                let t = Instant::now();
                let r = call(&agent, "POST", &url, token, Some(&job.body));
                let took = t.elapsed();
                bar.inc(1);
                let Ok(mut d) = done.lock() else { break };
                d.latencies.push(took);
                match r {
                    Ok(p) => {
                        d.resources += resources;
                        let mut person = String::new();
                        for part in p["parameter"].as_array().into_iter().flatten() {
                            match part["name"].as_str() {
                                Some("person") => {
                                    person = part["valueString"].as_str().unwrap_or("").into()
                                }
                                Some("stored") => {
                                    for k in part["part"].as_array().into_iter().flatten() {
                                        d.items += k["valueInteger"].as_u64().unwrap_or(0);
                                    }
                                }
                                _ => {}
                            }
                        }
                        *d.persons.entry(person).or_default() += 1;
                    }
                    Err(e) => {
                        let key = format!(
                            "{:?}: {}",
                            job.kind,
                            e.to_string().rsplit(": ").next().unwrap_or("")
                        );
                        *d.failed.entry(key).or_default() += 1;
                    }
                }
            });
        }
    });
    let submit_s = started.elapsed().as_secs_f64();
    let cpu_after = cpu_seconds(srv.child.id());
    let machine_after = MachineTicks::now();
    bar.finish_and_clear();
    let done = Arc::try_unwrap(done)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_default();
    let failed: u64 = done.failed.values().sum();
    if done.persons.is_empty() {
        bail!(
            "一件も登録できませんでした / nothing was registered: {:?}",
            done.failed
        );
    }
    let rss_after_load = rss_mib(srv.child.id());

    // The people with the most submissions first: their summaries are the largest.
    let mut persons: Vec<(String, usize)> = done.persons.into_iter().collect();
    persons.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    let sample: Vec<String> = persons
        .iter()
        .map(|(p, _)| p.clone())
        .cycle()
        .take(a.samples.max(1))
        .collect();
    let doctor_at = |inst: &str, subject: &str| -> anyhow::Result<String> {
        let mut r = TokenRequest::for_role(Role::Clinician);
        r.institution = Some(inst.into());
        r.qualification = Some("doctor".into());
        r.subject = subject.into();
        r.lifetime = 24 * 3600;
        srv.token_for(&r)
    };
    let doctor = doctor_at(READER, "bench-doctor")?;
    let er = doctor_at(EMERGENCY, "bench-er-doctor")?;
    let mut consent = Vec::new();
    let mut consented = std::collections::HashSet::new();
    for p in &sample {
        if consented.insert(p.clone()) {
            let t = Instant::now();
            call(
                &agent,
                "POST",
                &format!(
                    "{}/Patient/{p}/$consent?category=diagnosis&category=care",
                    srv.base
                ),
                &doctor,
                None,
            )?;
            consent.push(t.elapsed());
        }
    }
    let timed = |url: &dyn Fn(&str) -> String, token: &dyn Fn(&str) -> anyhow::Result<String>| {
        let mut times = Vec::new();
        let mut entries = 0u64;
        for p in &sample {
            let tok = token(p)?;
            let t = Instant::now();
            let bytes = crate::bench_server::call_bytes(&agent, "GET", &url(p), &tok, None)?;
            times.push(t.elapsed());
            let b: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            entries += b["entry"].as_array().map(|a| a.len() as u64).unwrap_or(0);
        }
        let mut r = percentiles(times);
        r["mean_entries"] = json!(entries as f64 / sample.len().max(1) as f64);
        anyhow::Ok(r)
    };
    let summary = timed(&|p| format!("{}/Patient/{p}/$summary", srv.base), &|_| {
        Ok(doctor.clone())
    })?;
    let emergency = timed(
        &|p| {
            format!(
                "{}/Patient/{p}/$summary?emergency-reason=%E6%95%91%E6%80%A5%E6%90%AC%E9%80%81",
                srv.base
            )
        },
        &|_| Ok(er.clone()),
    )?;
    let my_record = timed(&|_| format!("{}/Patient/$my-record", srv.base), &|p| {
        let mut r = TokenRequest::for_role(Role::Patient);
        r.person = Some(p.to_string());
        r.subject = format!("bench-patient-{p}");
        srv.token_for(&r)
    })?;
    let rss = rss_mib(srv.child.id());
    Ok(json!({
        "benchmark": "kizuna bench share",
        "machine": crate::bench_server::machine(),
        "backend": backend,
        "validation": "enforce (JP-CLINS), policy and audit on every submission",
        "patients": a.patients,
        "persons_registered": persons.len(),
        "background": background,
        "eligibility": {
            "bundles": eligibility.len(),
            "seconds": eligibility_s,
        },
        "submit": {
            "clients": a.clients,
            "bundles": n_bundles,
            "failed": failed,
            "failures": done.failed,
            "resources": done.resources,
            "items_stored": done.items,
            "seconds": submit_s,
            "bundles_per_s": (n_bundles as u64 - failed) as f64 / submit_s.max(1e-9),
            "resources_per_s": done.resources as f64 / submit_s.max(1e-9),
            "server_cpu_us_per_resource": cpu_us_per(cpu_before, cpu_after, done.resources),
            "machine_cpu": MachineTicks::shares(machine_before, machine_after),
            "latency": percentiles(done.latencies),
            "goal_resources_per_s": 5000,
        },
        "consent": percentiles(consent),
        "summary_after_consent": summary,
        "summary_emergency": emergency,
        "my_record": my_record,
        "server_rss_after_load_mib": rss_after_load.map(|r| r.0),
        "server_rss_mib": rss.map(|r| r.0),
        "server_peak_rss_mib": rss.map(|r| r.1),
    }))
}

/// The kinds a background person sends: the items that make up most people's record, without the
/// documents and lab reports, which give a full record about fourteen times as many resources
/// (53 against 3.8 a person).
const BACKGROUND_KINDS: [BundleKind; 3] = [
    BundleKind::Condition,
    BundleKind::AllergyIntolerance,
    BundleKind::MedicationRequest,
];

/// People registered per eligibility bundle while the background population streams in.
const BACKGROUND_BATCH: u64 = 100;

/// Registers `--background-patients` people after the timed population's indices, generating each
/// batch in the client thread that sends it, so the client's memory does not grow with the
/// population (a million people's submissions would not fit).
fn load_background(
    a: &ShareBenchArgs,
    srv: &BenchServer,
    agent: &ureq::Agent,
    inst: &[kizuna_synth::population::Institution],
    tokens: &HashMap<String, String>,
) -> anyhow::Result<Value> {
    if a.background_patients == 0 {
        return Ok(Value::Null);
    }
    eprintln!(
        "背景人口を登録中 / registering {} background people",
        a.background_patients
    );
    let next = AtomicU64::new(0);
    let (sent_submissions, resources, failed) =
        (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let bar = indicatif::ProgressBar::new(a.background_patients);
    let started = Instant::now();
    let cpu_before = cpu_seconds(srv.child.id());
    let submit_url = format!("{}/Bundle/$submit", srv.base);
    std::thread::scope(|sc| {
        for _ in 0..a.clients.max(1) {
            sc.spawn(|| loop {
                let from = next.fetch_add(BACKGROUND_BATCH, Ordering::Relaxed);
                if from >= a.background_patients {
                    break;
                }
                let to = (from + BACKGROUND_BATCH).min(a.background_patients);
                // The other kinds are dropped before `submissions` parses what is left.
                let people: Vec<kizuna_synth::PersonOutput> = (from..to)
                    .map(|i| {
                        let mut po = kizuna_synth::person_output(a.seed, a.patients + i, 2, inst);
                        po.bundles.retain(|(k, _)| BACKGROUND_KINDS.contains(k));
                        po
                    })
                    .collect();
                let (mut sent, mut carried) = (0u64, 0u64);
                let eligibility = eligibility_bundles(&people, BACKGROUND_BATCH as usize);
                if let Err(e) = import_eligibility(agent, srv, &eligibility) {
                    failed.fetch_add(1, Ordering::Relaxed);
                    note_first(&first_error, e);
                }
                for job in submissions(&people) {
                    let token = tokens.get(&job.from).map(String::as_str).unwrap_or("");
                    match call(agent, "POST", &submit_url, token, Some(&job.body)) {
                        Ok(_) => {
                            sent += 1;
                            carried += job.resources;
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            note_first(&first_error, e);
                        }
                    }
                }
                sent_submissions.fetch_add(sent, Ordering::Relaxed);
                resources.fetch_add(carried, Ordering::Relaxed);
                bar.inc(to - from);
                if bar.is_hidden() && to % 50_000 < BACKGROUND_BATCH {
                    eprintln!(
                        "背景人口 / background: {to} people, {} resources, {:.0} s",
                        resources.load(Ordering::Relaxed),
                        started.elapsed().as_secs_f64()
                    );
                }
            });
        }
    });
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let resources = resources.into_inner();
    let failed = failed.into_inner();
    let first_error = first_error.into_inner().ok().flatten();
    eprintln!(
        "背景人口 / background: {} 件 / submissions, {resources} resources, {failed} failed, {seconds:.0} s",
        sent_submissions.load(Ordering::Relaxed)
    );
    Ok(json!({
        "people": a.background_patients,
        "kinds": BACKGROUND_KINDS.iter().map(|k| k.code()).collect::<Vec<_>>(),
        "submissions": sent_submissions.into_inner(),
        "resources": resources,
        "failed": failed,
        "first_error": first_error,
        "seconds": seconds,
        "resources_per_s": resources as f64 / seconds.max(1e-9),
        "server_cpu_us_per_resource": cpu_us_per(cpu_before, cpu_seconds(srv.child.id()), resources),
    }))
}

/// Keeps the first failure's text for the report (later ones are only counted).
fn note_first(slot: &Mutex<Option<String>>, e: anyhow::Error) {
    if let Ok(mut s) = slot.lock() {
        s.get_or_insert_with(|| e.to_string());
    }
}
