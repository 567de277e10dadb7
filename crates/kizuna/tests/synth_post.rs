//! `kizuna synth --post`: everything generated reaches the server, with the token, by resource type.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

type Seen = Arc<Mutex<(BTreeMap<String, u64>, u64)>>;

async fn receive(
    State(seen): State<Seen>,
    Path(rt): Path<String>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let authorized =
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer test-token");
    let parsed = serde_json::from_str::<serde_json::Value>(&body).ok();
    if let Ok(mut s) = seen.lock() {
        if !authorized {
            s.1 += 1;
            return (
                StatusCode::UNAUTHORIZED,
                r#"{"resourceType":"OperationOutcome","issue":[{"code":"login"}]}"#.into(),
            );
        }
        if parsed.and_then(|v| {
            v.get("resourceType")
                .and_then(|r| r.as_str().map(str::to_string))
        }) == Some(rt.clone())
        {
            *s.0.entry(rt).or_default() += 1;
        }
    }
    (StatusCode::CREATED, "{}".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_sends_every_resource_with_the_token() {
    let seen: Seen = Arc::new(Mutex::new((BTreeMap::new(), 0)));
    let app = Router::new()
        .route("/fhir/{rt}", post(receive))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    let out = std::env::temp_dir().join(format!("kizuna-post-{}", std::process::id()));
    let base = format!("http://{addr}/fhir");
    let run = |token: &'static str, out: std::path::PathBuf, base: String| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_kizuna"))
                .args([
                    "synth",
                    "--patients",
                    "40",
                    "--years",
                    "1",
                    "--gzip",
                    "--concurrency",
                    "3",
                    "--out",
                    out.to_str().unwrap_or_default(),
                    "--post",
                    &base,
                    "--token",
                    token,
                ])
                .output()
        })
    };
    let o = run("test-token", out.clone(), base.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("summary.json")).unwrap_or_default(),
    )
    .unwrap_or_default();
    let generated: u64 = summary["bundles"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    let (by_type, unauthorized) = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(unauthorized, 0);
    assert_eq!(by_type.values().sum::<u64>(), generated, "{by_type:?}");
    assert!(by_type.contains_key("Bundle") && by_type.contains_key("MedicationRequest"));
    // A wrong token: every request refused, the command says so and exits 1.
    let o = run("wrong", out.clone(), base)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("HTTP 401 login"));
}
