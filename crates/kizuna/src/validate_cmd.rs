//! `kizuna validate`: checks FHIR resources in files, directories and NDJSON against their profiles.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Context;
use kizuna_fhir::outcome::{OperationOutcome, Severity};
use kizuna_fhir::validate::Validator;
use serde_json::{json, Value};

/// Arguments of `kizuna validate`.
#[derive(clap::Args)]
pub struct ValidateArgs {
    /// 検証するプロファイルの URL (任意、複数可) / profile canonical URL to validate against (repeatable)
    #[arg(long = "profile", value_name = "URL")]
    profiles: Vec<String>,
    /// OperationOutcome を JSON で出力 / print OperationOutcome JSON (one per line when several)
    #[arg(long)]
    json: bool,
    /// 警告も表示する / also list warnings in the human summary
    #[arg(long, short = 'w')]
    warnings: bool,
    /// ファイル、ディレクトリ、NDJSON / files, directories (searched for .json, .ndjson, .xml)
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

/// One resource to validate and where it came from.
struct Input {
    source: String,
    resource: Result<Value, String>,
}

fn collect_files(p: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("{}", p.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            if e.is_dir() {
                collect_files(&e, out)?;
            } else if matches!(
                e.extension().and_then(|x| x.to_str()),
                Some("json" | "ndjson" | "xml")
            ) {
                out.push(e);
            }
        }
    } else {
        out.push(p.to_path_buf());
    }
    Ok(())
}

fn read_inputs(
    path: &Path,
    model: &kizuna_fhir::model::TypeModel,
    out: &mut Vec<Input>,
) -> anyhow::Result<()> {
    let name = path.display().to_string();
    let gz = name.ends_with(".gz");
    let text = if gz {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(path).with_context(|| name.clone())?)
            .read_to_string(&mut s)
            .with_context(|| name.clone())?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?
    };
    let ext = if gz {
        "ndjson"
    } else {
        path.extension().and_then(|x| x.to_str()).unwrap_or("")
    };
    if ext == "ndjson" {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            out.push(Input {
                source: format!("{name}:{}", i + 1),
                resource: serde_json::from_str(line).map_err(|e| e.to_string()),
            });
        }
    } else if ext == "xml" || text.trim_start().starts_with('<') {
        out.push(Input {
            source: name,
            resource: kizuna_fhir::xml::from_xml(&text, model).map_err(|e| e.to_string()),
        });
    } else {
        out.push(Input {
            source: name,
            resource: serde_json::from_str(&text).map_err(|e| e.to_string()),
        });
    }
    Ok(())
}

/// Runs the validation command; exit status 1 when any resource has an error.
pub fn run(a: ValidateArgs) -> anyhow::Result<ExitCode> {
    let validator = Validator::builtin();
    let model = validator.registry().model();
    for p in &a.profiles {
        if validator.profile(p).is_none() {
            anyhow::bail!("プロファイルが見つかりません / profile not found: {p}");
        }
    }
    let mut files = Vec::new();
    for p in &a.paths {
        collect_files(p, &mut files)?;
    }
    let mut inputs = Vec::new();
    for f in &files {
        read_inputs(f, model, &mut inputs)?;
    }
    let started = std::time::Instant::now();
    let bar = if inputs.len() >= 200 && !a.json {
        let b = indicatif::ProgressBar::new(inputs.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} resources {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<OperationOutcome>>> = Mutex::new(vec![None; inputs.len()]);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(input) = inputs.get(i) else { break };
                let oo = match &input.resource {
                    Ok(r) => validator.validate_with(r, &a.profiles),
                    Err(e) => OperationOutcome::single(kizuna_fhir::outcome::Issue::new(
                        Severity::Fatal,
                        "structure",
                        "",
                        format!("読み込めません: {e}"),
                        format!("cannot parse: {e}"),
                    )),
                };
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(oo);
                }
                if let Some(b) = &bar {
                    b.inc(1);
                }
            });
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let elapsed = started.elapsed();
    let results = results.into_inner().unwrap_or_default();
    let mut errors = 0;
    let mut warnings = 0;
    let mut failed = 0;
    for (input, oo) in inputs.iter().zip(results.iter()) {
        let Some(oo) = oo else { continue };
        errors += oo.error_count();
        warnings += oo.warning_count();
        if oo.has_errors() {
            failed += 1;
        }
        if a.json {
            let mut v = oo.to_fhir();
            if inputs.len() > 1 {
                v["extension"] = json!([{"url": "urn:kizuna:source", "valueString": input.source}]);
            }
            println!(
                "{}",
                if inputs.len() > 1 {
                    v.to_string()
                } else {
                    serde_json::to_string_pretty(&v)?
                }
            );
            continue;
        }
        let label = input
            .resource
            .as_ref()
            .ok()
            .map(|r| {
                format!(
                    "{}/{}",
                    r.get("resourceType").and_then(Value::as_str).unwrap_or("?"),
                    r.get("id").and_then(Value::as_str).unwrap_or("-")
                )
            })
            .unwrap_or_default();
        let status = if oo.has_errors() { "NG" } else { "OK" };
        println!(
            "{status} {} {label}: {} エラー/errors, {} 警告/warnings",
            input.source,
            oo.error_count(),
            oo.warning_count()
        );
        for i in &oo.issues {
            if i.severity <= Severity::Error || a.warnings {
                println!(
                    "   {} [{}] {}: {} / {}",
                    i.severity.as_str(),
                    i.code,
                    i.expression,
                    i.ja,
                    i.en
                );
            }
        }
    }
    if !a.json {
        println!(
            "{} リソース / resources, {failed} 不合格 / failed, {errors} エラー / errors, {warnings} 警告 / warnings ({:.0} resources/s)",
            inputs.len(),
            inputs.len() as f64 / elapsed.as_secs_f64().max(1e-9)
        );
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
