//! Loading mode: sends generated NDJSON to a FHIR server, each line to `{base}/{resourceType}`, with a
//! number of concurrent connections and a bearer token. Failures are reported by status and
//! OperationOutcome issue code and path only — never by body, which may hold personal data.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

/// What a load run did.
#[derive(Debug, Default)]
pub struct PostReport {
    /// 2xx answers.
    pub ok: u64,
    /// Other answers or transport errors.
    pub failed: u64,
    /// Up to ten failures, described without bodies.
    pub first_errors: Vec<String>,
    /// Seconds taken.
    pub seconds: f64,
}

fn ndjson_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let n = p.to_string_lossy();
            n.ends_with(".ndjson") || n.ends_with(".ndjson.gz")
        })
        .collect();
    files.sort();
    Ok(files)
}

fn open(path: &Path) -> anyhow::Result<Box<dyn BufRead + Send>> {
    let f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let r: Box<dyn Read + Send> = if path.to_string_lossy().ends_with(".gz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, r)))
}

fn describe(status: u16, body: &str) -> String {
    let issue = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let i = v.get("issue")?.get(0)?.clone();
        Some(format!(
            "{} {}",
            i.get("code").and_then(Value::as_str).unwrap_or(""),
            i.get("expression")
                .and_then(|e| e.get(0))
                .and_then(Value::as_str)
                .unwrap_or("")
        ))
    });
    format!("HTTP {status} {}", issue.unwrap_or_default())
}

/// Posts every line of every NDJSON file in `dir`.
pub fn post_dir(
    dir: &Path,
    base: &str,
    token: Option<&str>,
    concurrency: usize,
) -> anyhow::Result<PostReport> {
    let started = std::time::Instant::now();
    let base = base.trim_end_matches('/').to_string();
    let files = ndjson_files(dir)?;
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let errors = Mutex::new(Vec::new());
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .max_idle_connections_per_host(concurrency)
        .build();
    for f in files {
        let lines = Mutex::new(open(&f)?.lines());
        std::thread::scope(|s| {
            for _ in 0..concurrency {
                s.spawn(|| {
                    while let Some(Ok(line)) = lines.lock().ok().and_then(|mut l| l.next()) {
                        if line.trim().is_empty() {
                            continue;
                        }
                        let rt = serde_json::from_str::<Value>(&line)
                            .ok()
                            .and_then(|v| {
                                v.get("resourceType")
                                    .and_then(Value::as_str)
                                    .map(str::to_string)
                            })
                            .unwrap_or_else(|| "Bundle".into());
                        let mut req = agent
                            .post(&format!("{base}/{rt}"))
                            .set("Content-Type", "application/fhir+json");
                        if let Some(t) = token {
                            req = req.set("Authorization", &format!("Bearer {t}"));
                        }
                        match req.send_string(&line) {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let msg = match e {
                                    ureq::Error::Status(code, resp) => {
                                        describe(code, &resp.into_string().unwrap_or_default())
                                    }
                                    ureq::Error::Transport(t) => format!("transport: {}", t.kind()),
                                };
                                if let Ok(mut es) = errors.lock() {
                                    if es.len() < 10 {
                                        es.push(msg);
                                    }
                                }
                            }
                        }
                    }
                });
            }
        });
    }
    Ok(PostReport {
        ok: ok.into_inner(),
        failed: failed.into_inner(),
        first_errors: errors.into_inner().unwrap_or_default(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
