//! `kizuna demo` as a new user runs it: it loads a population through the real API and prints a
//! walkthrough; every flow the walkthrough names is then tried with the printed tokens, as the curl
//! commands would.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// Kills the demo server when the test ends, pass or fail.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The printed walkthrough: every `export NAME=value`, and the whole text.
struct Walkthrough {
    vars: HashMap<String, String>,
    text: String,
}

fn start(dir: &std::path::Path) -> (Running, Walkthrough) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kizuna"))
        .args([
            "demo",
            "--addr",
            "127.0.0.1:0",
            "--patients",
            "120",
            "--data-dir",
        ])
        .arg(dir.join("demo"))
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = child.stdout.take();
    let running = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(
            stdout
                .into_iter()
                .next()
                .unwrap_or_else(|| panic!("stdout")),
        )
        .lines()
        .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut text = String::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(600))
            .unwrap_or_else(|e| panic!("the demo stopped before serving: {e}\n{text}"));
        text.push_str(&line);
        text.push('\n');
        if line.contains("Ctrl-C") {
            break;
        }
    }
    let vars = text
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (running, Walkthrough { vars, text })
}

impl Walkthrough {
    fn var(&self, k: &str) -> &str {
        self.vars
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{k} is not printed:\n{}", self.text))
    }
}

/// One call; the status and the JSON answer (`Null` when there is none).
fn call(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut r = ureq::request(method, url).timeout(Duration::from_secs(60));
    if let Some(t) = token {
        r = r.set("authorization", &format!("Bearer {t}"));
    }
    let res = match body {
        Some(b) => r
            .set("content-type", "application/fhir+json")
            .send_string(b),
        None => r.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    (
        status,
        serde_json::from_reader(resp.into_reader()).unwrap_or(Value::Null),
    )
}

/// The `part` values of every `item` of a Parameters answer, by name.
fn items(p: &Value) -> Vec<HashMap<String, Value>> {
    p["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            i["part"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    let v = ["valueString", "valueBoolean", "valueInteger"]
                        .iter()
                        .find_map(|k| x.get(*k).cloned())
                        .unwrap_or(Value::Null);
                    (x["name"].as_str().unwrap_or("").to_string(), v)
                })
                .collect()
        })
        .collect()
}

fn types_in(b: &Value) -> Vec<String> {
    b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["resourceType"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn the_demo_loads_everything_and_every_printed_flow_works() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (server, w) = start(dir.path());
    assert!(
        w.text.contains("0 件失敗 / failed"),
        "every submission is accepted:\n{}",
        w.text
    );
    let kz = w.var("KZ").to_string();

    // The CapabilityStatement declares the sharing operations, each with its definition.
    let (s, cs) = call("GET", &format!("{kz}/metadata"), None, None);
    assert_eq!(s, 200);
    let text = cs.to_string();
    for op in [
        "submit",
        "summary",
        "referral-inbox",
        "my-record",
        "retention-run",
    ] {
        assert!(
            text.contains(&format!("OperationDefinition/{op}")),
            "{op} declared"
        );
    }
    let (s, od) = call(
        "GET",
        &format!("{kz}/OperationDefinition/summary"),
        Some(w.var("DOCTOR")),
        None,
    );
    assert_eq!((s, od["code"].as_str()), (200, Some("summary")));

    // The referral's destination: inbox, retrieve, summary before and after consent, acknowledge.
    let doctor = w.var("DOCTOR");
    let person = w.var("PERSON");
    let (s, inbox) = call(
        "GET",
        &format!("{kz}/Bundle/$referral-inbox"),
        Some(doctor),
        None,
    );
    assert_eq!(s, 200);
    let mine = items(&inbox);
    let doc = mine
        .iter()
        .find(|i| i.get("person").and_then(Value::as_str) == Some(person))
        .and_then(|i| i.get("document").and_then(Value::as_str))
        .unwrap_or_else(|| panic!("the referral is in the inbox: {inbox}"))
        .to_string();
    let (s, letter) = call("GET", &format!("{kz}/{doc}"), Some(doctor), None);
    assert_eq!((s, letter["type"].as_str()), (200, Some("document")));
    let (s, before) = call(
        "GET",
        &format!("{kz}/Patient/{person}/$summary"),
        Some(doctor),
        None,
    );
    assert_eq!(s, 200);
    let clinical = |b: &Value| {
        types_in(b)
            .iter()
            .filter(|t| {
                matches!(
                    t.as_str(),
                    "Condition" | "Observation" | "AllergyIntolerance"
                )
            })
            .count()
    };
    assert_eq!(clinical(&before), 0, "no clinical items before consent");
    let (s, consent) = call(
        "POST",
        &format!("{kz}/Patient/{person}/$consent?category=diagnosis&category=care"),
        Some(doctor),
        None,
    );
    assert_eq!(
        (s, consent["resourceType"].as_str()),
        (201, Some("Consent"))
    );
    let (s, after) = call(
        "GET",
        &format!("{kz}/Patient/{person}/$summary"),
        Some(doctor),
        None,
    );
    assert_eq!(s, 200);
    assert!(clinical(&after) > 0, "consent opens the summary: {after}");
    let (s, ack) = call(
        "POST",
        &format!("{kz}/{doc}/$acknowledge"),
        Some(doctor),
        None,
    );
    assert_eq!(s, 200, "{ack}");
    let (_, inbox) = call(
        "GET",
        &format!("{kz}/Bundle/$referral-inbox"),
        Some(doctor),
        None,
    );
    assert!(items(&inbox).iter().any(|i| {
        i.get("document").and_then(Value::as_str) == Some(doc.as_str())
            && i.get("state").and_then(Value::as_str) == Some("acknowledged")
    }));

    // The patient's own record; the emergency access at another hospital shows in their history.
    let patient = w.var("PATIENT");
    let me = w.var("ME");
    let er = w.var("ER");
    let (s, record) = call(
        "GET",
        &format!("{kz}/Patient/$my-record"),
        Some(patient),
        None,
    );
    assert_eq!(s, 200);
    assert!(!types_in(&record).is_empty(), "{record}");
    let (s, _) = call(
        "GET",
        &format!("{kz}/Patient/{me}/$summary"),
        Some(er),
        None,
    );
    assert_eq!(s, 403, "no consent, no emergency: refused");
    let (s, em) = call(
        "GET",
        &format!(
            "{kz}/Patient/{me}/$summary?emergency-reason=%E6%84%8F%E8%AD%98%E9%9A%9C%E5%AE%B3"
        ),
        Some(er),
        None,
    );
    assert_eq!(s, 200);
    assert!(clinical(&em) > 0, "{em}");
    let (s, history) = call(
        "GET",
        &format!("{kz}/Patient/$access-history"),
        Some(patient),
        None,
    );
    assert_eq!(s, 200);
    assert!(
        items(&history)
            .iter()
            .any(|i| i.get("emergency") == Some(&Value::Bool(true))),
        "the emergency access is in the patient's history"
    );

    // The institution's system: re-sending the sample replaces, withdrawing removes.
    let system = w.var("SYSTEM");
    let sample = std::fs::read_to_string(dir.path().join("demo/sample-condition-bundle.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (s, r) = call(
        "POST",
        &format!("{kz}/Bundle/$submit"),
        Some(system),
        Some(&sample),
    );
    assert_eq!(s, 200, "{r}");
    assert!(r.to_string().contains("replaced"), "{r}");
    let identifier = serde_json::from_str::<Value>(&sample)
        .ok()
        .and_then(|b| b["identifier"]["value"].as_str().map(str::to_string))
        .unwrap_or_default();
    let withdraw = format!(
        "{kz}/Bundle/$withdraw?identifier={}",
        identifier.replace('^', "%5E")
    );
    let (s, oo) = call("POST", &withdraw, Some(system), None);
    assert_eq!(s, 200, "{oo}");
    let (s, _) = call("POST", &withdraw, Some(system), None);
    assert_eq!(s, 404, "withdrawn once");
    let (s, bad) = call(
        "POST",
        &format!("{kz}/Bundle/$submit"),
        Some(system),
        Some("{\"resourceType\": \"Bundle\", \"type\": \"collection\"}"),
    );
    assert!((400..500).contains(&s), "{s}");
    assert_eq!(bad["resourceType"], "OperationOutcome");

    // The insurer's check-up reports; the operator's retention run.
    let (s, reports) = call(
        "GET",
        &format!("{kz}/Bundle/$checkup-reports"),
        Some(w.var("INSURER")),
        None,
    );
    assert_eq!(s, 200);
    assert!(!items(&reports).is_empty(), "{reports}");
    let (s, rep) = call(
        "POST",
        &format!("{kz}/$retention-run"),
        Some(w.var("OPERATOR")),
        None,
    );
    assert_eq!(s, 200, "{rep}");
    let (s, _) = call("POST", &format!("{kz}/$retention-run"), Some(doctor), None);
    assert_eq!(s, 403, "only the operator runs retention");
    let (_, before) = call(
        "GET",
        &format!("{kz}/Condition?_summary=count&_total=accurate"),
        Some(w.var("OPERATOR")),
        None,
    );
    let conditions = before["total"].as_u64().unwrap_or(0);
    assert!(conditions > 0);

    // Offline retention as of six years on (the 5-year items would go).
    let offline_retention = || {
        Command::new(env!("CARGO_BIN_EXE_kizuna"))
            .args([
                "retention",
                "run",
                "--now",
                "2032-12-01T00:00:00Z",
                "--data-dir",
            ])
            .arg(dir.path().join("demo"))
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    // While the server runs it is refused before it changes anything: both would append to one
    // audit log.
    let out = offline_retention();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("他のプロセスが使用中") && err.contains("open in another process"),
        "{err}"
    );
    let (_, again) = call(
        "GET",
        &format!("{kz}/Condition?_summary=count&_total=accurate"),
        Some(w.var("OPERATOR")),
        None,
    );
    assert_eq!(again["total"].as_u64(), Some(conditions), "nothing deleted");

    // With the server stopped it runs: the 5-year items go.
    drop(server);
    let out = offline_retention();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let deleted = report["deleted"]["condition"].as_u64().unwrap_or(0);
    let kept = report["kept_lts"]["condition"].as_u64().unwrap_or(0);
    assert_eq!(deleted + kept, conditions, "{report}");
}
