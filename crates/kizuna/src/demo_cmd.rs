//! `kizuna demo`: the whole sharing service on this machine with nothing installed. It generates a
//! small synthetic population, starts the server on the embedded default (SQLite in
//! `kizuna-data/demo`), loads eligibility and every submission through the real API as the
//! institutions' systems would, then prints tokens and curl commands for a clinician, a patient
//! and an insurer, and keeps serving until Ctrl-C.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use kizuna_auth::dev::{DevIssuer, TokenRequest};
use kizuna_auth::Role;
use kizuna_synth::clinical::BundleKind;
use serde_json::Value;

/// Options of `kizuna demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// 待ち受けアドレス / listen address
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// 合成する人数 / people to generate
    #[arg(long, default_value_t = 300)]
    patients: u64,
    /// 乱数の種 / seed
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// データディレクトリ (起動時に空にします) / data directory (emptied at start)
    #[arg(long, default_value = "kizuna-data/demo")]
    data_dir: PathBuf,
    /// 読み込み後に終了 (テスト用) / exit after loading (for tests)
    #[arg(long)]
    load_only: bool,
}

/// What the load produced that the walkthrough needs.
#[derive(Default)]
struct Facts {
    ok: u64,
    failed: BTreeMap<String, u64>,
    /// (person, destination institution) of a referral.
    referral: Option<(String, String)>,
    /// (person, insurer) of a check-up report.
    checkup: Option<(String, String)>,
    /// What was registered for whom: the walkthrough's patient is the one with the most kinds.
    kinds: HashMap<String, std::collections::BTreeSet<String>>,
    /// person → (submitting institution, JP_Bundle_CLINS text) of a Condition bundle, for the
    /// walkthrough's re-send and withdrawal.
    conditions: HashMap<String, (String, String)>,
}

impl Facts {
    /// The person with the most kinds of registered items (ties: the smallest id, for stable output).
    fn richest_person(&self) -> Option<String> {
        self.kinds
            .iter()
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| b.0.cmp(a.0)))
            .map(|(p, _)| p.clone())
    }
}

pub(crate) fn parameter(p: &Value, name: &str) -> Option<String> {
    p["parameter"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
        .and_then(|x| x["valueString"].as_str())
        .map(str::to_string)
}

struct Tokens {
    dev: DevIssuer,
    cache: Mutex<HashMap<String, String>>,
}

impl Tokens {
    fn issue(&self, r: &TokenRequest) -> anyhow::Result<String> {
        Ok(self.dev.issue(r, chrono::Utc::now().timestamp())?)
    }

    fn institution(&self, inst: &str) -> anyhow::Result<String> {
        if let Some(t) = self.cache.lock().ok().and_then(|c| c.get(inst).cloned()) {
            return Ok(t);
        }
        let mut r = TokenRequest::for_role(Role::Institution);
        r.institution = Some(inst.to_string());
        r.subject = format!("system-{inst}");
        r.lifetime = 12 * 3600;
        let t = self.issue(&r)?;
        if let Ok(mut c) = self.cache.lock() {
            c.insert(inst.to_string(), t.clone());
        }
        Ok(t)
    }
}

/// Runs the demo.
pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = crate::request_runtime::build()?;
    rt.block_on(demo(a))
}

async fn demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    if a.data_dir.exists() {
        std::fs::remove_dir_all(&a.data_dir).with_context(|| a.data_dir.display().to_string())?;
    }
    std::fs::create_dir_all(&a.data_dir)?;
    println!(
        "kizuna デモ / demo: {} 人を合成 / generating {} people …",
        a.patients, a.patients
    );
    let inst = kizuna_synth::population::institutions(a.seed);
    let people: Vec<kizuna_synth::PersonOutput> = (0..a.patients)
        .map(|i| kizuna_synth::person_output(a.seed, i, 2, &inst))
        .collect();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // The server runs here, on the thread that built the runtime: the store's writer thread
    // starts from it and so keeps its priority above the request threads
    // (`crate::request_runtime`). The loading runs as a task beside it.
    let server = crate::serve_cmd::serve(
        crate::serve_cmd::ServeArgs::demo(a.addr, a.data_dir.clone()),
        Some(tx),
    );
    tokio::pin!(server);
    let load_only = a.load_only;
    let mut loader = tokio::spawn(load(a, people, started, rx));
    tokio::select! {
        served = &mut server => {
            // The server stopped before the loading finished (a port in use, say).
            loader.abort();
            served?;
            anyhow::bail!("サーバーが停止しました / the server stopped during loading")
        }
        loaded = &mut loader => {
            let code = loaded??;
            if load_only {
                return Ok(code);
            }
        }
    }
    println!("Ctrl-C で終了 / Ctrl-C to stop");
    server.await?;
    Ok(ExitCode::SUCCESS)
}

/// Loads eligibility and every submission through the API once the server answers at the URL
/// `rx` brings, and prints the walkthrough. Success when every submission was accepted.
async fn load(
    a: DemoArgs,
    people: Vec<kizuna_synth::PersonOutput>,
    started: Instant,
    rx: tokio::sync::oneshot::Receiver<String>,
) -> anyhow::Result<ExitCode> {
    let base = rx
        .await
        .context("サーバーが起動しません / the server did not start")?;
    let tokens = Arc::new(Tokens {
        dev: DevIssuer::load_or_create(&a.data_dir.join("dev-issuer.key"), &base)?,
        cache: Mutex::new(HashMap::new()),
    });
    let mut op = TokenRequest::for_role(Role::Operator);
    op.subject = "demo-operator".into();
    op.lifetime = 12 * 3600;
    let operator = tokens.issue(&op)?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    // 1. Eligibility (資格情報): who holds which insured-person identifier, over time.
    println!("資格情報を登録 / importing eligibility …");
    for body in crate::share_load::eligibility_bundles(&people, 100) {
        let (agent, base, operator) = (agent.clone(), base.clone(), operator.clone());
        tokio::task::spawn_blocking(move || {
            agent
                .post(&format!("{base}/Coverage/$import-eligibility"))
                .set("authorization", &format!("Bearer {operator}"))
                .set("content-type", "application/fhir+json")
                .send_string(&body)
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("資格情報 / eligibility: {e}"))
        })
        .await??;
    }
    // 2. Every submission, through $submit, as the submitting institution's system.
    println!("6情報・3文書を登録 / submitting the six items and documents …");
    let jobs = crate::share_load::submissions(&people);
    let facts = Arc::new(Mutex::new(Facts::default()));
    let queue = Arc::new(Mutex::new(jobs));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (queue, facts, tokens, agent, base) = (
            queue.clone(),
            facts.clone(),
            tokens.clone(),
            agent.clone(),
            base.clone(),
        );
        workers.push(tokio::task::spawn_blocking(move || loop {
            let job = queue.lock().ok().and_then(|mut q| q.pop());
            let Some(crate::share_load::Submission {
                kind,
                from,
                body,
                destination: dest,
                ..
            }) = job
            else {
                break;
            };
            let Ok(token) = tokens.institution(&from) else {
                continue;
            };
            let url = match &dest {
                Some(d) => format!("{base}/Bundle/$submit?destination={d}"),
                None => format!("{base}/Bundle/$submit"),
            };
            let r = agent
                .post(&url)
                .set("authorization", &format!("Bearer {token}"))
                .set("content-type", "application/fhir+json")
                .send_string(&body);
            // Read the answer before taking the lock: the workers only meet to record it.
            let answer = match r {
                Ok(resp) => {
                    Ok(serde_json::from_reader::<_, Value>(resp.into_reader()).unwrap_or_default())
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let oo: Value = serde_json::from_reader(resp.into_reader()).unwrap_or_default();
                    let issue = oo
                        .pointer("/issue/0/code")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    Err(format!("{kind:?} {code} {issue}"))
                }
                Err(e) => Err(format!("{kind:?} {e}")),
            };
            let Ok(mut f) = facts.lock() else { break };
            match answer {
                Ok(p) => {
                    f.ok += 1;
                    let person = parameter(&p, "person").unwrap_or_default();
                    f.kinds
                        .entry(person.clone())
                        .or_default()
                        .insert(format!("{kind:?}"));
                    match kind {
                        BundleKind::Referral if f.referral.is_none() => {
                            let b: Value = serde_json::from_str(&body).unwrap_or_default();
                            let dest = dest_of_referral(&b);
                            f.referral = dest.map(|d| (person, d));
                        }
                        BundleKind::Checkup if f.checkup.is_none() => {
                            let b: Value = serde_json::from_str(&body).unwrap_or_default();
                            f.checkup = insurer_of(&b).map(|i| (person, i));
                        }
                        BundleKind::Condition => {
                            f.conditions.insert(person, (from, body));
                        }
                        _ => {}
                    }
                }
                Err(k) => *f.failed.entry(k).or_default() += 1,
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let facts = Arc::try_unwrap(facts)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_default();
    println!(
        "登録 / submitted: {} 件成功 / ok, {} 件失敗 / failed ({:.1} 秒 / s)",
        facts.ok,
        facts.failed.values().sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
    for (k, n) in &facts.failed {
        println!("  失敗 / failed: {k} × {n}");
    }
    print_walkthrough(&base, &tokens, &facts, &a.data_dir)?;
    Ok(if facts.failed.is_empty() && facts.ok > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn dest_of_referral(b: &Value) -> Option<String> {
    let entries = b["entry"].as_array()?;
    let comp = entries
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Composition")?;
    let section = comp["resource"]["section"]
        .as_array()?
        .iter()
        .find(|s| s.pointer("/code/coding/0/code").and_then(Value::as_str) == Some("910"))?;
    let org_url = section["entry"]
        .as_array()?
        .iter()
        .filter_map(|e| e["reference"].as_str())
        .find(|r| {
            entries.iter().any(|e| {
                e["fullUrl"].as_str() == Some(*r) && e["resource"]["resourceType"] == "Organization"
            })
        })?;
    let org = entries
        .iter()
        .find(|e| e["fullUrl"].as_str() == Some(org_url))?;
    org["resource"]["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"] == kizuna_share::item::INSTITUTION_SYSTEM)
        .and_then(|i| i["value"].as_str())
        .map(str::to_string)
}

fn insurer_of(b: &Value) -> Option<String> {
    b["entry"]
        .as_array()?
        .iter()
        .filter_map(|e| e["resource"]["identifier"].as_array())
        .flatten()
        .find(|i| i["system"] == kizuna_share::item::INSURER_SYSTEM)
        .and_then(|i| i["value"].as_str())
        .map(str::to_string)
}

fn print_walkthrough(
    base: &str,
    tokens: &Tokens,
    f: &Facts,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let life = 12 * 3600;
    let doctor_at = |inst: &str, subject: &str| -> anyhow::Result<String> {
        let mut r = TokenRequest::for_role(Role::Clinician);
        r.institution = Some(inst.into());
        r.qualification = Some("doctor".into());
        r.subject = subject.into();
        r.lifetime = life;
        tokens.issue(&r)
    };
    println!();
    println!("# ── 試してみる / try it ─────────────────────────────────────────────");
    println!("export KZ={base}");
    if let Some((person, dest)) = &f.referral {
        println!();
        println!("# 紹介先の医師 (医療機関 {dest}) / a doctor at the referral's destination");
        println!("export DOCTOR={}", doctor_at(dest, "demo-doctor")?);
        println!("export PERSON={person}");
        println!("curl -s -H \"Authorization: Bearer $DOCTOR\" \"$KZ/Bundle/\\$referral-inbox\"          # 受信箱 / inbox");
        println!("curl -s -H \"Authorization: Bearer $DOCTOR\" \"$KZ/Bundle/<id>\"                       # 紹介状を取得 / retrieve");
        println!("curl -s -X POST -H \"Authorization: Bearer $DOCTOR\" \"$KZ/Bundle/<id>/\\$acknowledge\" # 受領 / acknowledge");
        println!("curl -s -H \"Authorization: Bearer $DOCTOR\" \"$KZ/Patient/$PERSON/\\$summary\"          # 同意前: 自院宛ての文書のみ / before consent: only documents addressed here");
        println!("curl -s -X POST -H \"Authorization: Bearer $DOCTOR\" \"$KZ/Patient/$PERSON/\\$consent?category=diagnosis&category=care\"  # 受診時の閲覧同意 / consent at the visit");
        println!("curl -s -H \"Authorization: Bearer $DOCTOR\" \"$KZ/Patient/$PERSON/\\$summary\"          # 診療情報サマリー / clinical summary");
    }
    if let Some(person) = &f.richest_person() {
        let mut r = TokenRequest::for_role(Role::Patient);
        r.person = Some(person.clone());
        r.subject = format!("demo-patient-{person}");
        r.lifetime = life;
        println!();
        println!("# 本人 / the patient (マイナポータル相当)");
        println!("export PATIENT={}", tokens.issue(&r)?);
        println!("export ME={person}");
        println!("curl -s -H \"Authorization: Bearer $PATIENT\" \"$KZ/Patient/\\$my-record\"       # 6情報と健診 / my items and check-ups");
        println!("curl -s -H \"Authorization: Bearer $PATIENT\" \"$KZ/Patient/\\$access-history\"  # 閲覧履歴 / who looked");
        if let Some((from, body)) = f.conditions.get(person) {
            let file = data_dir.join("sample-condition-bundle.json");
            std::fs::write(&file, body)?;
            let file = std::fs::canonicalize(&file).unwrap_or(file);
            let identifier = serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|b| {
                    b.pointer("/identifier/value")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_default();
            println!();
            println!("# 医療機関 {from} のシステム / the system of institution {from}");
            println!("export SYSTEM={}", tokens.institution(from)?);
            println!("curl -s -X POST -H \"Authorization: Bearer $SYSTEM\" -H \"Content-Type: application/fhir+json\" --data-binary @{} \"$KZ/Bundle/\\$submit\"  # 再送は置換 / re-sending replaces", file.display());
            println!("curl -s -X POST -H \"Authorization: Bearer $SYSTEM\" \"$KZ/Bundle/\\$withdraw?identifier={}\"  # 取り下げ / withdraw", identifier.replace('^', "%5E"));
        }
        println!();
        println!("# 救急時医療情報閲覧 / emergency access (another hospital, no consent)");
        println!("export ER={}", doctor_at("2713456781", "demo-er-doctor")?);
        println!("curl -s -G -H \"Authorization: Bearer $ER\" \"$KZ/Patient/$ME/\\$summary\" --data-urlencode \"emergency-reason=意識障害で救急搬送\"");
    }
    if let Some((_, insurer)) = &f.checkup {
        let mut r = TokenRequest::for_role(Role::Insurer);
        r.insurer = Some(insurer.clone());
        r.subject = format!("demo-insurer-{insurer}");
        r.lifetime = life;
        println!();
        println!("# 保険者 {insurer} / an insurer");
        println!("export INSURER={}", tokens.issue(&r)?);
        println!("curl -s -H \"Authorization: Bearer $INSURER\" \"$KZ/Bundle/\\$checkup-reports\"   # 健診結果報告書 / check-up reports");
    }
    println!();
    println!("# 運営者 / the operator");
    let mut op = TokenRequest::for_role(Role::Operator);
    op.subject = "demo-operator".into();
    op.lifetime = life;
    println!("export OPERATOR={}", tokens.issue(&op)?);
    println!("curl -s -X POST -H \"Authorization: Bearer $OPERATOR\" \"$KZ/\\$retention-run\"       # 保存期間の処理 / retention");
    println!("curl -s \"$KZ/metadata\" | head -c 300                                                # CapabilityStatement");
    println!();
    println!("詳しくは docs/share-api.md / walkthrough: docs/share-api.md");
    Ok(())
}
