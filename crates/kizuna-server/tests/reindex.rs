//! `$reindex` through the HTTP API: the operator starts a rebuild of the search index on the
//! running server and follows it; other roles are refused whatever their scopes; bad requests
//! name the element at fault; each request is audited.

mod common;

use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use common::{call, json_body, setup, T};
use kizuna_audit::{ActorKind, AuditQuery};
use kizuna_auth::dev::{DevIssuer, TokenRequest};
use kizuna_auth::http::{AccessAuditor, AccessDecision, FhirAuth};
use kizuna_auth::Role;
use serde_json::{json, Value};

const MEMBER: &str = "http://jpfhir.jp/fhir/clins/Idsystem/JP_Insurance_memberID";

/// The access decisions the middleware reports.
#[derive(Default)]
struct Decisions(Mutex<Vec<AccessDecision>>);

impl AccessAuditor for Decisions {
    fn record(&self, d: AccessDecision) {
        if let Ok(mut v) = self.0.lock() {
            v.push(d);
        }
    }
}

fn parameters(types: &[&str]) -> Value {
    json!({"resourceType": "Parameters", "parameter": types
        .iter()
        .map(|t| json!({"name": "type", "valueCode": t}))
        .collect::<Vec<_>>()})
}

async fn status(t: &T, auth: &[(&str, &str)]) -> (StatusCode, Value) {
    let (s, v, _) = call(t, "GET", "/fhir/$reindex", None, auth).await;
    (s, v)
}

/// The audit log's `reindex` entries: the type (none: every type) and who asked.
async fn reindex_entries(t: &T) -> Vec<(Option<String>, ActorKind)> {
    let _ = t.audit.flush();
    t.audit
        .log()
        .lock()
        .map(|l| l.query(&AuditQuery::default()).unwrap_or_default())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.entry.action == "reindex")
        .map(|e| (e.entry.target.resource_type, e.entry.actor.kind))
        .collect()
}

/// Type and system level, with and without a `Parameters` body: 202 pointing at the status,
/// the status complete once the background task is done, searches answering throughout, one
/// audit entry per type.
#[tokio::test]
async fn the_rebuild_runs_in_the_background_and_is_followed() {
    let t = setup(None).await;
    let p = json!({"resourceType": "Patient", "gender": "female",
        "identifier": [{"system": MEMBER, "value": "R:1:1:00"}], "name": [{"family": "再索引"}]});
    let (s, _, _) = call(&t, "POST", "/fhir/Patient", json_body(&p), &[]).await;
    assert_eq!(s, StatusCode::CREATED);
    for (uri, body, audited) in [
        (
            "/fhir/Patient/$reindex",
            None,
            vec![Some("Patient".to_string())],
        ),
        (
            "/fhir/$reindex",
            json_body(&parameters(&["Patient", "Observation", "Patient"])),
            vec![Some("Patient".into()), Some("Observation".into())],
        ),
        ("/fhir/$reindex", None, vec![None]),
    ] {
        let before = reindex_entries(&t).await.len();
        let (s, oo, h) = call(&t, "POST", uri, body, &[]).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{uri}: {oo}");
        assert_eq!(oo["issue"][0]["severity"], "information", "{oo}");
        assert_eq!(
            h.get("content-location").and_then(|v| v.to_str().ok()),
            Some("http://test/fhir/$reindex")
        );
        t.store.reindexed().await;
        let (s, st) = status(&t, &[]).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(st["resourceType"], "Parameters");
        assert_eq!(
            st["parameter"],
            json!([{"name": "complete", "valueBoolean": true}])
        );
        let types: Vec<Option<String>> = reindex_entries(&t).await[before..]
            .iter()
            .map(|(rt, _)| rt.clone())
            .collect();
        assert_eq!(types, audited, "{uri}");
        let (_, b, _) = call(
            &t,
            "GET",
            &format!("/fhir/Patient?identifier={MEMBER}|R:1:1:00&family=再索引"),
            None,
            &[],
        )
        .await;
        assert_eq!(b["total"], 1, "{uri}: {b}");
    }
    // Declared and defined.
    let (_, cs, _) = call(&t, "GET", "/fhir/metadata", None, &[]).await;
    let ops = cs["rest"][0]["operation"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let def = ops
        .iter()
        .find(|o| o["name"] == "reindex")
        .and_then(|o| o["definition"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(def.ends_with("/OperationDefinition/reindex"), "{def}");
    let (s, d, _) = call(&t, "GET", "/fhir/OperationDefinition/reindex", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (d["url"].as_str(), d["code"].as_str()),
        (Some(def.as_str()), Some("reindex"))
    );
}

/// Bad requests are refused with 400 naming the element, and start nothing.
#[tokio::test]
async fn bad_requests_name_the_element_and_start_nothing() {
    let t = setup(None).await;
    let cases = [
        (json!({"resourceType": "Patient"}), "Parameters"),
        (
            json!({"resourceType": "Parameters", "parameter": [{"name": "type", "valueCode": "Patient"}, {"name": "type", "valueCode": "Nonsense"}]}),
            "Parameters.parameter[1].valueCode",
        ),
        (
            json!({"resourceType": "Parameters", "parameter": [{"name": "url", "valueString": "Patient?"}]}),
            "Parameters.parameter[0].name",
        ),
        (
            json!({"resourceType": "Parameters", "parameter": [{"name": "type", "valueInteger": 3}]}),
            "Parameters.parameter[0].valueCode",
        ),
    ];
    for (body, path) in cases {
        let (s, oo, _) = call(&t, "POST", "/fhir/$reindex", json_body(&body), &[]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {oo}");
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(oo["issue"][0]["expression"][0], path, "{oo}");
    }
    let (s, oo, _) = call(&t, "POST", "/fhir/Nonsense/$reindex", None, &[]).await;
    assert!(s.is_client_error(), "{s}: {oo}");
    let (s, _, _) = call(
        &t,
        "POST",
        "/fhir/$reindex",
        Some(("application/fhir+json", "{not json".into())),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(reindex_entries(&t).await.is_empty());
    assert!(t.store.reindexing().is_empty());
}

/// Only the operator: other roles are refused with 403 (`operator-only`) even with every scope,
/// and the refusal reaches the auditor; the operator still needs the scope.
#[tokio::test]
async fn only_the_operator_may_reindex() {
    let dev = DevIssuer::ephemeral("http://test/fhir").unwrap_or_else(|e| panic!("{e}"));
    let decisions = Arc::new(Decisions::default());
    let auth = Arc::new(FhirAuth {
        verifier: kizuna_auth::jwt::TokenVerifier::new(vec![dev.trusted()]),
        auditor: decisions.clone(),
        now: Arc::new(|| chrono::Utc::now().timestamp()),
    });
    let t = setup(Some(auth)).await;
    let token = |role: Role, scope: &str| {
        let mut r = TokenRequest::with_sample_claims(role);
        r.scope = scope.into();
        format!(
            "Bearer {}",
            dev.issue(&r, chrono::Utc::now().timestamp())
                .unwrap_or_else(|e| panic!("{role:?}: {e}"))
        )
    };
    for role in Role::ALL.into_iter().filter(|r| *r != Role::Operator) {
        let bearer = token(role, "system/*.cruds");
        for (method, uri) in [
            ("POST", "/fhir/$reindex"),
            ("POST", "/fhir/Patient/$reindex"),
            ("GET", "/fhir/$reindex"),
        ] {
            let (s, oo, h) = call(&t, method, uri, None, &[("authorization", &bearer)]).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{role:?} {method} {uri}: {oo}");
            assert_eq!(oo["issue"][0]["diagnostics"], "operator-only", "{oo}");
            assert!(h
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|w| w.contains("insufficient_scope")));
        }
    }
    let refused = decisions
        .0
        .lock()
        .map(|v| {
            v.iter()
                .filter(|d| !d.allowed && d.rule == "operator-only")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(refused, 6 * 3);
    assert!(t.store.reindexing().is_empty());
    // The operator with a read-only scope may follow but not start.
    let reader = token(Role::Operator, "system/*.rs");
    let (s, _, _) = call(
        &t,
        "POST",
        "/fhir/$reindex",
        None,
        &[("authorization", &reader)],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = status(&t, &[("authorization", &reader)]).await;
    assert_eq!(s, StatusCode::OK);
    let admin = token(Role::Operator, "system/*.cruds");
    let (s, oo, _) = call(
        &t,
        "POST",
        "/fhir/Patient/$reindex",
        None,
        &[("authorization", &admin)],
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{oo}");
    t.store.reindexed().await;
    assert_eq!(
        reindex_entries(&t).await,
        vec![(Some("Patient".to_string()), ActorKind::Operator)]
    );
}
