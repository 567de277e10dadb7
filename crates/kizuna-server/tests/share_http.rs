//! The sharing service over HTTP: refusals answer with an OperationOutcome and store nothing, plain
//! FHIR reads, searches and writes of shared items pass the one policy, totals do not leak what
//! it hides, and every operation is declared.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{call, T};
use kizuna_auth::dev::{DevIssuer, TokenRequest};
use kizuna_auth::Role;
use kizuna_synth::clinical::BundleKind;
use serde_json::{json, Value};

struct Nop;
impl kizuna_auth::http::AccessAuditor for Nop {
    fn record(&self, _: kizuna_auth::http::AccessDecision) {}
}

struct Shared {
    t: T,
    dev: DevIssuer,
}

async fn shared() -> Shared {
    let dev = DevIssuer::ephemeral("http://test/fhir").unwrap_or_else(|e| panic!("{e}"));
    let auth = Arc::new(kizuna_auth::http::FhirAuth {
        verifier: kizuna_auth::jwt::TokenVerifier::new(vec![dev.trusted()]),
        auditor: Arc::new(Nop),
        now: Arc::new(|| chrono::Utc::now().timestamp()),
    });
    let t = common::setup_shared(Some(auth)).await;
    Shared { t, dev }
}

impl Shared {
    fn token(&self, role: Role, f: impl FnOnce(&mut TokenRequest)) -> String {
        let mut r = TokenRequest::for_role(role);
        r.subject = format!("{role:?}");
        f(&mut r);
        format!(
            "Bearer {}",
            self.dev
                .issue(&r, chrono::Utc::now().timestamp())
                .unwrap_or_default()
        )
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        token: &str,
        body: Option<String>,
    ) -> (StatusCode, Value) {
        let (s, v, _) = call(
            &self.t,
            method,
            uri,
            body.map(|b| ("application/fhir+json", b)),
            &[("authorization", token)],
        )
        .await;
        (s, v)
    }
}

/// A synthetic person with a Condition bundle, and the eligibility record that names them.
fn person_with_conditions() -> (Value, Value, String) {
    let inst = kizuna_synth::population::institutions(5);
    for i in 0..200 {
        let p = kizuna_synth::population::person(5, i, 2);
        let subs = kizuna_synth::sample_submissions(5, i, 2, &inst);
        let Some((_, b)) = subs.into_iter().find(|(k, _)| *k == BundleKind::Condition) else {
            continue;
        };
        let from = b["identifier"]["value"]
            .as_str()
            .unwrap_or("")
            .split('^')
            .next()
            .unwrap_or("")
            .to_string();
        let elig = kizuna_synth::eligibility::bundle(&[&p]);
        return (elig, b, from);
    }
    panic!("no synthetic person with conditions");
}

fn part<'a>(p: &'a Value, name: &str) -> Option<&'a Value> {
    p["parameter"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
}

#[tokio::test]
async fn shared_items_pass_the_policy_on_every_path() {
    let h = shared().await;
    let (elig, bundle, from) = person_with_conditions();
    let operator = h.token(Role::Operator, |_| {});
    let system = h.token(Role::Institution, |r| r.institution = Some(from.clone()));
    let elsewhere = "2713456781";
    let other_doctor = h.token(Role::Clinician, |r| {
        r.institution = Some(elsewhere.into());
        r.qualification = Some("doctor".into());
    });
    let (s, r) = h
        .send(
            "POST",
            "/fhir/Coverage/$import-eligibility",
            &operator,
            Some(elig.to_string()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");

    // Refusals: an OperationOutcome naming the element, and nothing stored.
    let count = |v: &Value| v["total"].as_i64().unwrap_or(-1);
    let (_, before) = h
        .send("GET", "/fhir/Condition?_summary=count", &operator, None)
        .await;
    let mut broken = bundle.clone();
    broken["identifier"]["value"] = json!("not-an-identifier");
    let (s, oo) = h
        .send(
            "POST",
            "/fhir/Bundle/$submit",
            &system,
            Some(broken.to_string()),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{oo}");
    assert_eq!(oo["issue"][0]["expression"][0], "Bundle.identifier.value");
    let mut invalid = bundle.clone();
    if let Some(e) = invalid["entry"].as_array_mut().and_then(|a| {
        a.iter_mut()
            .find(|e| e["resource"]["resourceType"] == "Condition")
    }) {
        e["resource"]["clinicalStatus"] = json!({"coding": [{"code": 42}]});
    }
    let (s, oo) = h
        .send(
            "POST",
            "/fhir/Bundle/$submit",
            &system,
            Some(invalid.to_string()),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{oo}");
    assert!(
        oo["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["expression"][0]
                .as_str()
                .is_some_and(|e| e.contains("clinicalStatus"))),
        "{oo}"
    );
    let (s, oo) = h
        .send(
            "POST",
            "/fhir/Bundle/$submit",
            &other_doctor,
            Some(bundle.to_string()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{oo}");
    let huge = format!(
        "{{\"resourceType\": \"Bundle\", \"type\": \"collection\", \"id\": \"{}\"}}",
        "x".repeat(10 * 1024 * 1024 + 1)
    );
    let (s, oo) = h
        .send("POST", "/fhir/Bundle/$submit", &system, Some(huge))
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(oo["resourceType"], "OperationOutcome");
    let (_, after) = h
        .send("GET", "/fhir/Condition?_summary=count", &operator, None)
        .await;
    assert_eq!(
        count(&before),
        count(&after),
        "nothing stored from a refusal"
    );

    // Accepted.
    let (s, r) = h
        .send(
            "POST",
            "/fhir/Bundle/$submit",
            &system,
            Some(bundle.to_string()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let person = part(&r, "person")
        .and_then(|p| p["valueString"].as_str())
        .unwrap_or("")
        .to_string();
    // The same submission in XML replaces the first.
    let xml = kizuna_fhir::xml::to_xml(&bundle, kizuna_fhir::Registry::builtin().model());
    let (s, r, _) = call(
        &h.t,
        "POST",
        "/fhir/Bundle/$submit",
        Some(("application/fhir+xml", xml)),
        &[
            ("authorization", &system),
            ("accept", "application/fhir+json"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(
        part(&r, "replaced").and_then(|p| p["valueInteger"].as_u64()) > Some(0),
        "{r}"
    );
    let tag = format!("/fhir/Condition?_tag=urn:kizuna:share:person%7C{person}");
    let (_, mine) = h.send("GET", &tag, &system, None).await;
    let ids: Vec<String> = mine["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
        .collect();
    assert!(!ids.is_empty(), "the submitter finds its own items: {mine}");
    assert!(
        mine.get("total").is_none(),
        "no totals over shared items but for the operator"
    );
    let read = format!("/fhir/Condition/{}", ids[0]);

    // Reads: the submitter, the patient and the operator; not another institution or patient,
    // not a researcher.
    let patient = h.token(Role::Patient, |r| r.person = Some(person.clone()));
    let someone = h.token(Role::Patient, |r| r.person = Some("someone-else".into()));
    let researcher = h.token(Role::Researcher, |r| {
        r.organization = Some("univ".into());
        r.researcher_category = Some("academic".into());
        r.scope = "user/*.rs".into();
    });
    for (who, token, want) in [
        ("submitter", &system, StatusCode::OK),
        ("patient", &patient, StatusCode::OK),
        ("operator", &operator, StatusCode::OK),
        ("other institution", &other_doctor, StatusCode::FORBIDDEN),
        ("other patient", &someone, StatusCode::FORBIDDEN),
        ("researcher", &researcher, StatusCode::FORBIDDEN),
    ] {
        let (s, _) = h.send("GET", &read, token, None).await;
        assert_eq!(s, want, "{who} reads an item");
    }
    // Searches drop what the policy hides and do not count it.
    let (s, b) = h.send("GET", &tag, &other_doctor, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["entry"].as_array().map(Vec::len).unwrap_or(0), 0);
    let (_, b) = h
        .send("GET", &format!("{tag}&_summary=count"), &other_doctor, None)
        .await;
    assert!(b.get("total").is_none(), "{b}");
    let (_, b) = h
        .send("GET", &format!("{tag}&_summary=count"), &operator, None)
        .await;
    assert_eq!(b["total"].as_u64(), Some(ids.len() as u64));
    // Items change only through $submit: a plain update is refused even to the submitter.
    let (_, item) = h.send("GET", &read, &system, None).await;
    let (s, oo) = h.send("PUT", &read, &system, Some(item.to_string())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{oo}");
    // The summary: refused without consent (the rule named), shown with it.
    let summary = format!("/fhir/Patient/{person}/$summary");
    let (s, oo) = h.send("GET", &summary, &other_doctor, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(oo.to_string().contains("no-consent"), "{oo}");
    let (s, c) = h
        .send(
            "POST",
            &format!("/fhir/Patient/{person}/$consent?category=diagnosis"),
            &other_doctor,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    let (s, b) = h.send("GET", &summary, &other_doctor, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.to_string().contains("\"resourceType\":\"Condition\""));
    // Bad parameters name themselves.
    let (s, oo) = h
        .send(
            "POST",
            &format!("/fhir/Patient/{person}/$consent?category=everything"),
            &other_doctor,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(oo["issue"][0]["expression"][0], "category");
}

#[tokio::test]
async fn every_share_operation_is_declared_and_defined() {
    let h = shared().await;
    let (s, cs, _) = call(&h.t, "GET", "/fhir/metadata", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let declared: Vec<String> = cs["rest"][0]["resource"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["operation"].as_array().cloned().unwrap_or_default())
        .chain(
            cs["rest"][0]["operation"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        )
        .filter_map(|o| o["definition"].as_str().map(str::to_string))
        .collect();
    let token = h.token(Role::Operator, |_| {});
    for (_, code, url) in kizuna_share::operations::declared() {
        assert!(declared.contains(&url), "{code} is declared");
        let id = url.rsplit('/').next().unwrap_or("");
        let (s, d) = h
            .send(
                "GET",
                &format!("/fhir/OperationDefinition/{id}"),
                &token,
                None,
            )
            .await;
        assert_eq!((s, d["code"].as_str()), (StatusCode::OK, Some(code)));
    }
}
