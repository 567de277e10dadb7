//! `kizuna bench store` on a small data set: the report is written, counts what was stored, and its
//! searches found what the generated data holds (the timings themselves are not judged here).

use std::process::Command;

#[test]
fn bench_store_writes_a_consistent_report() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().join("store.json");
    let db = format!("sqlite://{}", dir.path().join("b.db").display());
    let run = Command::new(env!("CARGO_BIN_EXE_kizuna"))
        .args([
            "bench",
            "store",
            "--resources",
            "400",
            "--samples",
            "5",
            "--database",
            &db,
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("{e}"));
    let r: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r["backend"], "sqlite");
    let n = r["resources"].as_u64().unwrap_or(0);
    assert!(n >= 400, "{n}");
    assert!(r["ingest"]["resources_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    // Every transaction went through a group commit; concurrent ones may have shared one.
    let commits = r["ingest"]["group_commits"].as_u64().unwrap_or(0);
    let transactions = r["ingest"]["transaction"]["n"].as_u64().unwrap_or(0);
    assert!(
        commits >= 1 && commits <= transactions,
        "{commits} commits for {transactions} transactions"
    );
    let per = r["ingest"]["resources_per_commit"].as_f64().unwrap_or(0.0);
    assert!(
        (per * commits as f64 - n as f64).abs() < 0.5,
        "{per} × {commits} ≠ {n}"
    );
    assert_eq!(r["read"]["n"], 5);
    let searches = r["search"].as_array().cloned().unwrap_or_default();
    assert_eq!(searches.len(), 6);
    // Every sampled patient has observations, and a code taken from stored data matches something.
    for s in &searches {
        let q = s["query"].as_str().unwrap_or("");
        if !q.starts_with("Patient?") {
            assert!(s["mean_total"].as_f64().unwrap_or(0.0) >= 1.0, "{q}: {s}");
        }
    }
}
