//! The `/fhir` API as a client sees it.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{call, json_body, setup, T};
use kizuna_audit::AuditQuery;
use serde_json::{json, Value};

fn patient() -> Value {
    json!({"resourceType": "Patient", "gender": "female", "birthDate": "1960-02-03", "name": [{"family": "佐藤", "given": ["花子"]}]})
}

#[tokio::test]
async fn crud_with_versions_and_errors() {
    let t = setup(None).await;
    let (s, cs, _) = call(&t, "GET", "/fhir/metadata", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert!(cs["rest"][0]["resource"]
        .as_array()
        .map(|a| a.len() > 100)
        .unwrap_or(false));
    let (s, created, h) = call(&t, "POST", "/fhir/Patient", json_body(&patient()), &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap_or("").to_string();
    assert_eq!(h.get("etag").and_then(|v| v.to_str().ok()), Some("W/\"1\""));
    assert!(h
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .ends_with(&format!("Patient/{id}/_history/1")));
    assert!(h.get("last-modified").is_some());
    let (s, read, _) = call(&t, "GET", &format!("/fhir/Patient/{id}"), None, &[]).await;
    assert_eq!(
        (s, read["gender"].clone()),
        (StatusCode::OK, json!("female"))
    );
    let mut p2 = read.clone();
    p2["gender"] = json!("male");
    let (s, _, h) = call(
        &t,
        "PUT",
        &format!("/fhir/Patient/{id}"),
        json_body(&p2),
        &[("if-match", "W/\"1\"")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h.get("etag").and_then(|v| v.to_str().ok()), Some("W/\"2\""));
    let (s, oo, _) = call(
        &t,
        "PUT",
        &format!("/fhir/Patient/{id}"),
        json_body(&p2),
        &[("if-match", "W/\"1\"")],
    )
    .await;
    assert_eq!(
        (s, oo["resourceType"].clone()),
        (StatusCode::PRECONDITION_FAILED, json!("OperationOutcome"))
    );
    let (s, v1, _) = call(
        &t,
        "GET",
        &format!("/fhir/Patient/{id}/_history/1"),
        None,
        &[],
    )
    .await;
    assert_eq!((s, v1["gender"].clone()), (StatusCode::OK, json!("female")));
    let (s, hist, _) = call(
        &t,
        "GET",
        &format!("/fhir/Patient/{id}/_history"),
        None,
        &[],
    )
    .await;
    assert_eq!((s, hist["total"].clone()), (StatusCode::OK, json!(2)));
    let (s, _, _) = call(&t, "DELETE", &format!("/fhir/Patient/{id}"), None, &[]).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, oo, _) = call(&t, "GET", &format!("/fhir/Patient/{id}"), None, &[]).await;
    assert_eq!(
        (s, oo["resourceType"].clone()),
        (StatusCode::GONE, json!("OperationOutcome"))
    );
    let (s, oo, _) = call(&t, "GET", "/fhir/Patient/nope", None, &[]).await;
    assert_eq!(
        (s, oo["issue"][0]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("not-found"))
    );
    let (s, oo, _) = call(&t, "GET", "/fhir/NotAType/1", None, &[]).await;
    assert_eq!(
        (s, oo["resourceType"].clone()),
        (StatusCode::NOT_FOUND, json!("OperationOutcome"))
    );
    // Id in the body must match the URL.
    let (s, oo, _) = call(&t, "PUT", "/fhir/Patient/other", json_body(&p2), &[]).await;
    assert_eq!(
        (s, oo["issue"][0]["expression"][0].clone()),
        (StatusCode::BAD_REQUEST, json!("Patient.id"))
    );
    // Prefer: return=minimal.
    let (s, body, _) = call(
        &t,
        "POST",
        "/fhir/Patient",
        json_body(&patient()),
        &[("prefer", "return=minimal")],
    )
    .await;
    assert_eq!((s, body), (StatusCode::CREATED, Value::Null));
}

#[tokio::test]
async fn bad_input_gets_an_outcome_and_stores_nothing() {
    let t = setup(None).await;
    async fn count(t: &T) -> i64 {
        call(t, "GET", "/fhir/Patient?_summary=count", None, &[])
            .await
            .1["total"]
            .as_i64()
            .unwrap_or(-1)
    }
    let before = count(&t).await;
    let (s, oo, _) = call(
        &t,
        "POST",
        "/fhir/Patient",
        Some(("application/fhir+json", "{not json".into())),
        &[],
    )
    .await;
    assert_eq!(
        (s, oo["resourceType"].clone()),
        (StatusCode::BAD_REQUEST, json!("OperationOutcome"))
    );
    let bad = json!({"resourceType": "Patient", "birthDate": "1980-02-30", "foo": 1});
    let (s, oo, _) = call(&t, "POST", "/fhir/Patient", json_body(&bad), &[]).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let paths: Vec<String> = oo["issue"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["expression"][0].as_str().map(str::to_string))
        .collect();
    assert!(
        paths.contains(&"Patient.birthDate".to_string())
            && paths.contains(&"Patient.foo".to_string()),
        "{paths:?}"
    );
    let (s, _, _) = call(&t, "POST", "/fhir/Observation", json_body(&patient()), &[]).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "resourceType must match the URL"
    );
    assert_eq!(count(&t).await, before);
    // A transaction with one bad entry stores nothing at all.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": patient(), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": "nonsense"}, "request": {"method": "POST", "url": "Patient"}}
    ]});
    let (s, oo, _) = call(&t, "POST", "/fhir", json_body(&tx), &[]).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        oo["issue"][0]["expression"][0],
        "Bundle.entry[1].resource.gender"
    );
    assert_eq!(count(&t).await, before);
}

#[tokio::test]
async fn search_transactions_xml_and_audit() {
    let t = setup(None).await;
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:p1", "resource": patient(), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}, "subject": {"reference": "urn:uuid:p1"}, "valueQuantity": {"value": 13.2, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"}}, "request": {"method": "POST", "url": "Observation"}}
    ]});
    let (s, resp, _) = call(&t, "POST", "/fhir", json_body(&tx), &[]).await;
    assert_eq!(
        (s, resp["type"].clone()),
        (StatusCode::OK, json!("transaction-response"))
    );
    let loc = resp["entry"][0]["response"]["location"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let pid = loc.split('/').nth(1).unwrap_or("").to_string();
    let (s, b, _) = call(
        &t,
        "GET",
        &format!("/fhir/Observation?subject=Patient/{pid}&code=http://loinc.org|718-7"),
        None,
        &[],
    )
    .await;
    assert_eq!((s, b["total"].clone()), (StatusCode::OK, json!(1)));
    assert_eq!(
        b["entry"][0]["resource"]["subject"]["reference"],
        format!("Patient/{pid}")
    );
    // A match is written out as stored: the same resource a read returns, whole.
    let oid = b["entry"][0]["resource"]["id"].as_str().unwrap_or("");
    let (_, read, _) = call(&t, "GET", &format!("/fhir/Observation/{oid}"), None, &[]).await;
    assert_eq!(b["entry"][0]["resource"], read);
    assert_eq!(read["valueQuantity"]["value"], json!(13.2));
    let (_, b, _) = call(
        &t,
        "GET",
        &format!("/fhir/Observation?subject=Patient/{pid}&_include=Observation:subject"),
        None,
        &[],
    )
    .await;
    let modes: Vec<(Value, Value)> = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["resource"]["resourceType"].clone(),
                e["search"]["mode"].clone(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        [
            (json!("Observation"), json!("match")),
            (json!("Patient"), json!("include"))
        ]
    );
    assert_eq!(b["total"], 1, "total counts matches only");
    for _ in 0..4 {
        call(&t, "POST", "/fhir/Patient", json_body(&patient()), &[]).await;
    }
    let (_, page, _) = call(&t, "GET", "/fhir/Patient?family=佐藤&_count=2", None, &[]).await;
    assert_eq!(page["total"], 5);
    assert_eq!(page["entry"].as_array().map(|a| a.len()), Some(2));
    // Walking the next links (the Japanese value percent-encoded in them) visits every match once.
    let mut seen: Vec<String> = Vec::new();
    let mut page = page;
    for _ in 0..10 {
        for e in page["entry"].as_array().into_iter().flatten() {
            seen.push(e["resource"]["id"].as_str().unwrap_or("").to_string());
        }
        let next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(|u| u.trim_start_matches("http://test").to_string());
        let Some(next) = next else { break };
        assert!(next.contains("family=%E4%BD%90%E8%97%A4"), "{next}");
        page = call(&t, "GET", &next, None, &[]).await.1;
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5);
    let (s, _, _) = call(
        &t,
        "POST",
        "/fhir/Patient/_search",
        Some(("application/x-www-form-urlencoded", "gender=female".into())),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, oo, _) = call(&t, "GET", "/fhir/Patient?nonsense=1", None, &[]).await;
    assert_eq!(
        (s, oo["issue"][0]["expression"][0].clone()),
        (StatusCode::BAD_REQUEST, json!("nonsense"))
    );
    let (s, b, _) = call(
        &t,
        "GET",
        "/fhir/Patient?nonsense=1",
        None,
        &[("prefer", "handling=lenient")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["search"]["mode"] == "outcome"));
    // Conditional create finds the existing one.
    let (s, _, _) = call(
        &t,
        "POST",
        "/fhir/Patient",
        json_body(&patient()),
        &[("if-none-exist", &format!("_id={pid}"))],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // FHIR XML in.
    let xml = r#"<Patient xmlns="http://hl7.org/fhir"><gender value="male"/><birthDate value="1990-01-01"/></Patient>"#;
    let (s, created, _) = call(
        &t,
        "POST",
        "/fhir/Patient",
        Some(("application/fhir+xml", xml.into())),
        &[],
    )
    .await;
    assert_eq!(
        (s, created["gender"].clone()),
        (StatusCode::CREATED, json!("male"))
    );
    // One audit entry per resource a search returned.
    let before = t.audit.flush().unwrap_or(0);
    let (_, b, _) = call(&t, "GET", "/fhir/Patient?family=佐藤", None, &[]).await;
    let after = t.audit.flush().unwrap_or(0);
    assert_eq!(after - before, b["total"].as_u64().unwrap_or(0));
    let log = t
        .audit
        .log()
        .lock()
        .map(|l| {
            l.query(&AuditQuery {
                resource_type: Some("Observation".into()),
                ..AuditQuery::default()
            })
            .unwrap_or_default()
        })
        .unwrap_or_default();
    assert!(
        log.iter()
            .any(|e| e.entry.target.person.as_deref() == Some(pid.as_str())),
        "audit names whose data it was"
    );
}

#[tokio::test]
async fn tokens_are_required_and_scopes_enforced() {
    let dev = kizuna_auth::dev::DevIssuer::ephemeral("http://test/fhir")
        .unwrap_or_else(|e| panic!("{e}"));
    #[derive(Default)]
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
    let (s, _, _) = call(&t, "GET", "/fhir/metadata", None, &[]).await;
    assert_eq!(s, StatusCode::OK, "metadata is public");
    let (s, oo, _) = call(&t, "GET", "/fhir/Patient", None, &[]).await;
    assert_eq!(
        (s, oo["issue"][0]["code"].clone()),
        (StatusCode::UNAUTHORIZED, json!("login"))
    );
    let mut r = kizuna_auth::dev::TokenRequest::for_role(kizuna_auth::Role::Patient);
    r.person = Some("p1".into());
    r.scope = "patient/Observation.rs".into();
    let tok = dev
        .issue(&r, chrono::Utc::now().timestamp())
        .unwrap_or_default();
    let bearer = format!("Bearer {tok}");
    let (s, _, _) = call(
        &t,
        "GET",
        "/fhir/Observation",
        None,
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, oo, _) = call(
        &t,
        "GET",
        "/fhir/Patient",
        None,
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(
        (s, oo["issue"][0]["code"].clone()),
        (StatusCode::FORBIDDEN, json!("forbidden"))
    );
}

#[tokio::test]
async fn summary_and_elements_return_tagged_subsets() {
    let t = setup(None).await;
    let mut p = patient();
    p["text"] = json!({"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">佐藤 花子</div>"});
    p["contact"] = json!([{"name": {"family": "佐藤"}}]);
    let (_, _, h) = call(&t, "POST", "/fhir/Patient", json_body(&p), &[]).await;
    let loc = h
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let id = loc.split('/').nth(5).unwrap_or("").to_string();
    let subsetted = |v: &Value| {
        v["meta"]["tag"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["code"] == "SUBSETTED")
    };
    let (s, full, _) = call(&t, "GET", &format!("/fhir/Patient/{id}"), None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(full.get("contact").is_some() && full.get("text").is_some() && !subsetted(&full));
    // Patient.contact and text are not summary elements; name and gender are.
    let (_, sum, _) = call(
        &t,
        "GET",
        &format!("/fhir/Patient/{id}?_summary=true"),
        None,
        &[],
    )
    .await;
    assert!(
        sum.get("contact").is_none() && sum.get("text").is_none(),
        "{sum}"
    );
    assert_eq!(
        (sum["gender"].clone(), sum["name"][0]["family"].clone()),
        (json!("female"), json!("佐藤"))
    );
    assert!(subsetted(&sum));
    let (_, el, _) = call(
        &t,
        "GET",
        &format!("/fhir/Patient/{id}/_history/1?_elements=birthDate"),
        None,
        &[],
    )
    .await;
    let mut keys: Vec<String> = el
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    assert_eq!(keys, ["birthDate", "id", "meta", "resourceType"]);
    let (_, b, _) = call(
        &t,
        "GET",
        "/fhir/Patient?_elements=gender&gender=female",
        None,
        &[],
    )
    .await;
    assert_eq!(b["total"], 1);
    assert!(b["entry"][0]["resource"].get("name").is_none());
    assert!(subsetted(&b["entry"][0]["resource"]));
    let (s, oo, _) = call(
        &t,
        "GET",
        &format!("/fhir/Patient/{id}?_summary=maybe"),
        None,
        &[],
    )
    .await;
    assert_eq!(
        (s, oo["issue"][0]["expression"][0].clone()),
        (StatusCode::BAD_REQUEST, json!("_summary"))
    );
    // The stored resource is untouched by the views.
    let (_, again, _) = call(&t, "GET", &format!("/fhir/Patient/{id}"), None, &[]).await;
    assert_eq!(again, full);
}
