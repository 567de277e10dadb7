//! The HTTP benchmarks on small data sets: `bench share` and `bench load` run end to end against
//! a real `kizuna serve` child and write consistent reports. Their timings are not judged here.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().join("report.json");
    let run = Command::new(env!("CARGO_BIN_EXE_kizuna"))
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(&out)
        .env("TMPDIR", dir.path())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn bench_share_registers_everything_and_times_the_views() {
    let r = bench(&[
        "share",
        "--patients",
        "25",
        "--samples",
        "6",
        "--clients",
        "2",
        "--background-patients",
        "120",
    ]);
    // The background population streams in first, in two batches, with nothing refused.
    let bg = &r["background"];
    assert_eq!(bg["people"], 120, "{bg}");
    assert_eq!(bg["failed"], 0, "{bg}");
    let sent = bg["submissions"].as_u64().unwrap_or(0);
    assert!(sent > 60, "{bg}");
    assert!(bg["resources"].as_u64().unwrap_or(0) >= sent, "{bg}");
    let s = &r["submit"];
    assert_eq!(s["failed"], 0, "{s}");
    let bundles = s["bundles"].as_u64().unwrap_or(0);
    assert!(bundles > 25, "{s}");
    assert_eq!(s["latency"]["n"].as_u64(), Some(bundles));
    assert!(s["items_stored"].as_u64().unwrap_or(0) > 0);
    assert!(s["resources"].as_u64() > s["items_stored"].as_u64());
    // The server's CPU time over the submissions, per resource: validation alone costs some.
    let cpu = s["server_cpu_us_per_resource"].as_f64().unwrap_or(0.0);
    assert!(cpu > 0.0, "{s}");
    for k in ["summary_after_consent", "summary_emergency", "my_record"] {
        assert_eq!(r[k]["n"], 6, "{k}");
        assert!(
            r[k]["mean_entries"].as_f64().unwrap_or(0.0) > 1.0,
            "{k}: {}",
            r[k]
        );
    }
}

#[test]
fn bench_load_keeps_its_schedule_and_counts_errors() {
    let r = bench(&[
        "load",
        "--patients",
        "25",
        "--minutes",
        "0.1",
        "--rate",
        "10",
        "--clients",
        "2",
    ]);
    let o = &r["overall"];
    // 6 s at 10 requests/s: the schedule, not the server, sets how many are sent.
    assert_eq!(o["requests"], 60, "{o}");
    assert_eq!(o["errors"], 0, "{o}");
    let kinds = o["by_kind"].as_object().cloned().unwrap_or_default();
    for k in ["register", "read", "search", "summary"] {
        assert!(
            kinds.get(k).and_then(|v| v["n"].as_u64()).unwrap_or(0) > 0,
            "{k}"
        );
    }
    assert_eq!(r["per_minute"].as_array().map(Vec::len), Some(1));
}
