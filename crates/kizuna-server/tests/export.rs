//! Bulk Data `$export`: the async pattern (kick-off, status, manifest, files, cancel), `_type` and
//! `_since`, system / Patient / Group level, checked line by line against the store; and the owner
//! rule: only who started a job may poll it or download its files.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::http::StatusCode;
use common::{call, json_body, raw, setup, T};
use serde_json::{json, Value};

async fn create(t: &T, r: Value, h: &[(&str, &str)]) -> String {
    let rt = r["resourceType"].as_str().unwrap_or("").to_string();
    let (s, v, _) = call(t, "POST", &format!("/fhir/{rt}"), json_body(&r), h).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap_or("").to_string()
}

/// Kicks off, polls until done, downloads every file: (manifest, type → ids exported).
async fn export(
    t: &T,
    url: &str,
    h: &[(&str, &str)],
) -> (Value, BTreeMap<String, BTreeSet<String>>) {
    let mut hk: Vec<(&str, &str)> = h.to_vec();
    hk.push(("prefer", "respond-async"));
    let (s, oo, headers) = call(t, "GET", url, None, &hk).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{url}: {oo}");
    let status_url = headers
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .strip_prefix("http://test")
        .unwrap_or("")
        .to_string();
    let mut manifest = Value::Null;
    for _ in 0..500 {
        let (s, m, _) = call(t, "GET", &status_url, None, h).await;
        if s == StatusCode::OK {
            manifest = m;
            break;
        }
        assert_eq!(s, StatusCode::ACCEPTED);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(manifest["requiresAccessToken"], true, "{manifest}");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for o in manifest["output"].as_array().into_iter().flatten() {
        let file = o["url"]
            .as_str()
            .unwrap_or("")
            .strip_prefix("http://test")
            .unwrap_or("");
        let (s, headers, body) = raw(t, "GET", file, None, h).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/fhir+ndjson")
        );
        let text = String::from_utf8_lossy(&body).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() as u64, o["count"].as_u64().unwrap_or(0));
        for l in lines {
            let r: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            assert_eq!(r["resourceType"], o["type"]);
            let id = r["id"].as_str().unwrap_or("").to_string();
            assert!(
                out.entry(o["type"].as_str().unwrap_or("").to_string())
                    .or_default()
                    .insert(id),
                "exported twice"
            );
        }
    }
    (manifest, out)
}

struct World {
    patients: Vec<String>,
    obs_of: BTreeMap<String, Vec<String>>,
    orgs: Vec<String>,
    group: String,
}

async fn world(t: &T, h: &[(&str, &str)]) -> World {
    let mut w = World {
        patients: vec![],
        obs_of: BTreeMap::new(),
        orgs: vec![],
        group: String::new(),
    };
    for i in 0..3 {
        w.orgs.push(
            create(
                t,
                json!({"resourceType": "Organization", "name": format!("org{i}")}),
                h,
            )
            .await,
        );
    }
    for i in 0..7 {
        let p = create(t, json!({"resourceType": "Patient", "gender": "male", "birthDate": format!("19{}0-01-01", 3 + i)}), h).await;
        for k in 0..(i % 3 + 1) {
            let o = create(t, json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("o{k}")}, "subject": {"reference": format!("Patient/{p}")}}), h).await;
            w.obs_of.entry(p.clone()).or_default().push(o);
        }
        w.patients.push(p);
    }
    let members: Vec<Value> = w
        .patients
        .iter()
        .take(3)
        .map(|p| json!({"entity": {"reference": format!("Patient/{p}")}}))
        .collect();
    w.group = create(
        t,
        json!({"resourceType": "Group", "type": "person", "actual": true, "member": members}),
        h,
    )
    .await;
    w
}

#[tokio::test]
async fn system_patient_and_group_exports_match_the_store() {
    let t = setup(None).await;
    let w = world(&t, &[]).await;
    let all_obs: BTreeSet<String> = w.obs_of.values().flatten().cloned().collect();
    // System level: everything, file by file.
    let (m, out) = export(&t, "/fhir/$export", &[]).await;
    assert!(m["request"]
        .as_str()
        .unwrap_or("")
        .ends_with("/fhir/$export"));
    assert_eq!(out.get("Patient").map(|s| s.len()), Some(7));
    assert_eq!(out.get("Observation"), Some(&all_obs));
    assert_eq!(out.get("Organization").map(|s| s.len()), Some(3));
    assert_eq!(out.get("Group").map(|s| s.len()), Some(1));
    // _type.
    let (_, out) = export(&t, "/fhir/$export?_type=Organization,Group", &[]).await;
    assert_eq!(
        out.keys().cloned().collect::<Vec<_>>(),
        vec!["Group", "Organization"]
    );
    // _since: only what changed after the instant.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let late = create(
        &t,
        json!({"resourceType": "Organization", "name": "late"}),
        &[],
    )
    .await;
    let (_, out) = export(
        &t,
        &format!("/fhir/$export?_since={}", since.replace('+', "%2B")),
        &[],
    )
    .await;
    assert_eq!(
        out.get("Organization").cloned().unwrap_or_default(),
        BTreeSet::from([late])
    );
    assert_eq!(out.get("Patient"), None);
    // Patient level: the compartments — patients, their observations, the Group listing them
    // (Group.member is a compartment link) — and not the organisations.
    let (_, out) = export(&t, "/fhir/Patient/$export", &[]).await;
    assert_eq!(out.get("Observation"), Some(&all_obs));
    assert_eq!(out.get("Patient").map(|s| s.len()), Some(7));
    assert_eq!(out.get("Group").map(|s| s.len()), Some(1));
    assert!(!out.contains_key("Organization"));
    // Group level: only the members' data.
    let (_, out) = export(&t, &format!("/fhir/Group/{}/$export", w.group), &[]).await;
    let members: BTreeSet<String> = w.patients.iter().take(3).cloned().collect();
    let member_obs: BTreeSet<String> = members.iter().flat_map(|p| w.obs_of[p].clone()).collect();
    assert_eq!(out.get("Patient"), Some(&members));
    assert_eq!(out.get("Observation"), Some(&member_obs));
    // Files split at the per-file limit keep every resource once (checked in `export`).
}

#[tokio::test]
async fn kickoff_errors_cancel_and_paths() {
    let t = setup(None).await;
    world(&t, &[]).await;
    let cases = [
        ("/fhir/$export", vec![], StatusCode::BAD_REQUEST), // no Prefer: respond-async
        (
            "/fhir/$export?_outputFormat=text/csv",
            vec![("prefer", "respond-async")],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/fhir/$export?_since=yesterday",
            vec![("prefer", "respond-async")],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/fhir/$export?_type=Nonsense",
            vec![("prefer", "respond-async")],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/fhir/$export?_typeFilter=Patient%3Fgender%3Dmale",
            vec![("prefer", "respond-async")],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/fhir/Observation/$export",
            vec![("prefer", "respond-async")],
            StatusCode::NOT_FOUND,
        ),
        (
            "/fhir/Group/none/$export",
            vec![("prefer", "respond-async")],
            StatusCode::NOT_FOUND,
        ),
    ];
    for (url, h, want) in cases {
        let (s, oo, _) = call(&t, "GET", url, None, &h).await;
        assert_eq!(
            (s, oo["resourceType"].as_str()),
            (want, Some("OperationOutcome")),
            "{url}"
        );
    }
    // Lenient handling ignores what it does not know.
    let (s, _, _) = call(
        &t,
        "GET",
        "/fhir/$export?_typeFilter=x",
        None,
        &[("prefer", "respond-async, handling=lenient")],
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    // Cancel: the job and its files go away.
    let (_, _, h) = call(
        &t,
        "GET",
        "/fhir/$export",
        None,
        &[("prefer", "respond-async")],
    )
    .await;
    let status = h
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .replace("http://test", "");
    let (s, _, _) = call(&t, "DELETE", &status, None, &[]).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _, _) = call(&t, "GET", &status, None, &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Unknown jobs and path tricks are 404s.
    for u in [
        "/fhir/$export-status/nope",
        "/fhir/$export-file/nope/Patient-1.ndjson",
    ] {
        let (s, _, _) = call(&t, "GET", u, None, &[]).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{u}");
    }
    let (m, _) = export(&t, "/fhir/$export?_type=Patient", &[]).await;
    let file = m["output"][0]["url"]
        .as_str()
        .unwrap_or("")
        .replace("http://test", "");
    let job = file.split('/').nth(3).unwrap_or("").to_string();
    for name in ["..%2Fjob.json", "job.json", "Patient-1.ndjson%00"] {
        let (s, _, _) = raw(
            &t,
            "GET",
            &format!("/fhir/$export-file/{job}/{name}"),
            None,
            &[],
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{name}");
    }
}

#[tokio::test]
async fn only_the_requester_polls_and_downloads() {
    let dev = kizuna_auth::dev::DevIssuer::ephemeral("http://test/fhir")
        .unwrap_or_else(|e| panic!("{e}"));
    struct Nop;
    impl kizuna_auth::http::AccessAuditor for Nop {
        fn record(&self, _: kizuna_auth::http::AccessDecision) {}
    }
    let auth = Arc::new(kizuna_auth::http::FhirAuth {
        verifier: kizuna_auth::jwt::TokenVerifier::new(vec![dev.trusted()]),
        auditor: Arc::new(Nop),
        now: Arc::new(|| chrono::Utc::now().timestamp()),
    });
    let t = setup(Some(auth)).await;
    let token = |subject: &str, scope: &str| {
        let mut r = kizuna_auth::dev::TokenRequest::for_role(kizuna_auth::Role::Operator);
        r.subject = subject.into();
        r.scope = scope.into();
        format!(
            "Bearer {}",
            dev.issue(&r, chrono::Utc::now().timestamp())
                .unwrap_or_default()
        )
    };
    let admin = token("ops-1", "system/*.cruds");
    let other = token("ops-2", "system/*.rs");
    let obs_only = token("ops-3", "system/Observation.rs");
    world(&t, &[("authorization", &admin)]).await;
    let (m, out) = export(&t, "/fhir/$export", &[("authorization", &admin)]).await;
    assert!(out.contains_key("Patient"));
    let file = m["output"][0]["url"]
        .as_str()
        .unwrap_or("")
        .replace("http://test", "");
    let status = format!(
        "/fhir/$export-status/{}",
        file.split('/').nth(3).unwrap_or("")
    );
    for u in [&file, &status] {
        let (s, _, _) = raw(&t, "GET", u, None, &[("authorization", &other)]).await;
        assert_eq!(
            s,
            StatusCode::NOT_FOUND,
            "another operator must not see {u}"
        );
        let (s, _, _) = raw(&t, "GET", u, None, &[]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // A token for one type exports that type only, and may not ask for others.
    let (_, out) = export(&t, "/fhir/$export", &[("authorization", &obs_only)]).await;
    assert_eq!(out.keys().cloned().collect::<Vec<_>>(), vec!["Observation"]);
    let (s, _, _) = call(
        &t,
        "GET",
        "/fhir/$export?_type=Patient",
        None,
        &[("authorization", &obs_only), ("prefer", "respond-async")],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A patient's token never exports: its scopes reach one person only.
    let mut r = kizuna_auth::dev::TokenRequest::for_role(kizuna_auth::Role::Patient);
    r.person = Some("p1".into());
    r.scope = "patient/*.rs".into();
    let patient = format!(
        "Bearer {}",
        dev.issue(&r, chrono::Utc::now().timestamp())
            .unwrap_or_default()
    );
    let (s, _, _) = call(
        &t,
        "GET",
        "/fhir/$export?_type=Observation",
        None,
        &[("authorization", &patient), ("prefer", "respond-async")],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Every exported patient has an entry in the audit log naming them.
    let n = t.audit.flush().unwrap_or(0);
    assert!(n > 0);
    let exported = t
        .audit
        .log()
        .lock()
        .map(|l| {
            l.query(&kizuna_audit::AuditQuery {
                resource_type: Some("Patient".into()),
                ..Default::default()
            })
            .unwrap_or_default()
        })
        .unwrap_or_default();
    let people: BTreeSet<String> = exported
        .iter()
        .filter(|e| e.entry.action == "export" && e.entry.actor.id == "ops-1")
        .filter_map(|e| e.entry.target.person.clone())
        .collect();
    assert_eq!(people.len(), 7);
}
