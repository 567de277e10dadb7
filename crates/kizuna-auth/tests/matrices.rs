//! Exhaustive matrices: every scope shape against every interaction (checked against an independent
//! oracle), every role against every combination of identifying claims, and refusals landing in the
//! real audit log.

use std::sync::{Arc, Mutex};

use kizuna_audit::{ActorKind, AuditLog, AuditQuery, LogOptions};
use kizuna_auth::dev::{DevIssuer, TokenRequest};
use kizuna_auth::http::{classify, AccessAuditor, AccessDecision};
use kizuna_auth::jwt::TokenVerifier;
use kizuna_auth::{Interaction, Role, ScopeSet};
use proptest::prelude::*;

const INTERACTIONS: &[(&str, &str)] = &[
    ("POST", "/Observation"),
    ("GET", "/Observation/1"),
    ("GET", "/Observation/1/_history/2"),
    ("PUT", "/Observation/1"),
    ("PATCH", "/Observation/1"),
    ("DELETE", "/Observation/1"),
    ("GET", "/Observation"),
    ("POST", "/Observation/_search"),
    ("GET", "/Observation/1/_history"),
    ("GET", "/Observation/$lastn"),
    ("POST", "/Observation/$bulk-write"),
];

/// The oracle: letters an interaction needs, written out by hand from the SMART and FHIR specs.
fn oracle_needs(method: &str, path: &str) -> &'static str {
    match (method, path) {
        ("POST", "/Observation") => "c",
        ("GET", "/Observation/1") | ("GET", "/Observation/1/_history/2") => "r",
        ("PUT", "/Observation/1") | ("PATCH", "/Observation/1") => "u",
        ("DELETE", "/Observation/1") => "d",
        ("GET", "/Observation")
        | ("POST", "/Observation/_search")
        | ("GET", "/Observation/1/_history") => "s",
        ("GET", "/Observation/$lastn") => "r",
        ("POST", "/Observation/$bulk-write") => "cu",
        _ => unreachable!(),
    }
}

#[test]
fn every_scope_against_every_interaction() {
    let letters = ['c', 'r', 'u', 'd', 's'];
    let mut cells = 0;
    for ctx in ["patient", "user", "system"] {
        for res in ["Observation", "Condition", "*"] {
            for mask in 1u32..32 {
                let perms: String = letters
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, c)| *c)
                    .collect();
                let scope = format!("{ctx}/{res}.{perms}");
                let set = ScopeSet::parse(&scope).unwrap_or_else(|e| panic!("{e}"));
                for (m, p) in INTERACTIONS {
                    let method = axum::http::Method::from_bytes(m.as_bytes()).unwrap_or_default();
                    let req = classify(&method, p).unwrap_or_else(|| panic!("{m} {p}"));
                    let granted = set.grant(&req.resource_type, &req.interaction).is_some();
                    let needs = oracle_needs(m, p);
                    let expected = (res == "*" || res == "Observation")
                        && needs.chars().all(|c| perms.contains(c));
                    assert_eq!(granted, expected, "{scope} {m} {p}");
                    cells += 1;
                }
            }
        }
    }
    assert_eq!(cells, 3 * 3 * 31 * INTERACTIONS.len());
}

#[test]
fn v1_scopes_map_to_v2() {
    for (v1, v2) in [
        ("user/Observation.read", "user/Observation.rs"),
        ("user/Observation.write", "user/Observation.cud"),
        ("user/Observation.*", "user/Observation.cruds"),
    ] {
        let a = ScopeSet::parse(v1).unwrap_or_default();
        let b = ScopeSet::parse(v2).unwrap_or_default();
        for (m, p) in INTERACTIONS {
            let method = axum::http::Method::from_bytes(m.as_bytes()).unwrap_or_default();
            let r = classify(&method, p).unwrap_or_else(|| panic!());
            assert_eq!(
                a.grant(&r.resource_type, &r.interaction).is_some(),
                b.grant(&r.resource_type, &r.interaction).is_some(),
                "{v1} {m} {p}"
            );
        }
    }
}

#[test]
fn every_role_against_every_claim_combination() {
    let dev = DevIssuer::ephemeral("aud").unwrap_or_else(|e| panic!("{e}"));
    let verifier = TokenVerifier::new(vec![dev.trusted()]);
    // (role, required claims)
    let required: &[(Role, &[&str])] = &[
        (Role::Institution, &["institution"]),
        (Role::Clinician, &["institution", "qualification"]),
        (Role::Patient, &["person"]),
        (Role::Insurer, &["insurer"]),
        (Role::Researcher, &["organization", "researcher_category"]),
        (Role::Reviewer, &[]),
        (Role::Operator, &[]),
    ];
    let claims = [
        "institution",
        "qualification",
        "person",
        "insurer",
        "organization",
        "researcher_category",
    ];
    let mut cells = 0;
    for (role, needs) in required {
        for mask in 0u32..64 {
            let has = |c: &str| {
                claims
                    .iter()
                    .position(|x| *x == c)
                    .map(|i| mask & (1 << i) != 0)
                    .unwrap_or(false)
            };
            let mut r = TokenRequest::for_role(*role);
            r.institution = has("institution").then(|| "1318814790".into());
            r.qualification = has("qualification").then(|| "nurse".into());
            r.person = has("person").then(|| "person-1".into());
            r.insurer = has("insurer").then(|| "06139991".into());
            r.organization = has("organization").then(|| "university".into());
            r.researcher_category = has("researcher_category").then(|| "academic".into());
            let token = dev.issue(&r, 1_000).unwrap_or_else(|e| panic!("{e}"));
            let ok = verifier.verify(&token, 1_000).is_ok();
            let expected = needs.iter().all(|n| has(n));
            assert_eq!(ok, expected, "{role:?} with mask {mask:06b}");
            cells += 1;
        }
    }
    assert_eq!(cells, 7 * 64);
}

/// Every role, with every scope shape on every resource, against the operator's operation
/// (`$reindex`, system and type level) and two ordinary ones: the operation needs the operator
/// role and `c`+`u` on the type; the others are decided by scope alone, whatever the role.
#[test]
fn every_role_against_the_operators_operation() {
    use kizuna_auth::http::check_scope;
    let dev = DevIssuer::ephemeral("aud").unwrap_or_else(|e| panic!("{e}"));
    let verifier = TokenVerifier::new(vec![dev.trusted()]);
    let requests: &[(&str, &str, &str, bool)] = &[
        // (method, path, letters needed, operator only)
        ("POST", "/$reindex", "cu", true),
        ("POST", "/Observation/$reindex", "cu", true),
        ("GET", "/Observation/$lastn", "r", false),
        ("GET", "/Observation", "s", false),
    ];
    let mut cells = 0;
    for role in Role::ALL {
        for res in ["Observation", "Condition", "*"] {
            for perms in ["cruds", "cu", "r", "s", "c"] {
                let mut r = TokenRequest::with_sample_claims(role);
                r.scope = format!("system/{res}.{perms}");
                let token = dev.issue(&r, 1_000).unwrap_or_else(|e| panic!("{e}"));
                let p = verifier
                    .verify(&token, 1_000)
                    .unwrap_or_else(|e| panic!("{role:?}: {e}"));
                for (m, path, needs, operator_only) in requests {
                    let method = axum::http::Method::from_bytes(m.as_bytes()).unwrap_or_default();
                    let req = classify(&method, path).unwrap_or_else(|| panic!("{m} {path}"));
                    let answer = check_scope(&p, &req);
                    let scope_ok = (res == "*" || (res == "Observation" && *path != "/$reindex"))
                        && needs.chars().all(|c| perms.contains(c));
                    let expected = scope_ok && (!operator_only || role == Role::Operator);
                    assert_eq!(
                        answer.is_ok(),
                        expected,
                        "{role:?} system/{res}.{perms} {m} {path}: {answer:?}"
                    );
                    if *operator_only && role != Role::Operator {
                        assert_eq!(
                            answer.err().map(|e| (e.rule(), e.status())),
                            Some(("operator-only", 403))
                        );
                    }
                    cells += 1;
                }
            }
        }
    }
    assert_eq!(cells, 7 * 3 * 5 * requests.len());
}

#[test]
fn identifier_formats() {
    use kizuna_auth::{InstitutionNumber, InsurerNumber};
    for ok in ["1318814790", "0110000001", "4740000000", "1341234567"] {
        assert!(InstitutionNumber::parse(ok).is_ok(), "{ok}");
    }
    for bad in [
        "131881479",
        "13188147900",
        "4818814790",
        "0018814790",
        "1328814790",
        "13188147９0",
        "abcdefghij",
    ] {
        assert!(InstitutionNumber::parse(bad).is_err(), "{bad}");
    }
    for ok in ["06139991", "138057", "39131011"] {
        assert!(InsurerNumber::parse(ok).is_ok(), "{ok}");
    }
    for bad in ["0613999", "061399911", "0613999a", ""] {
        assert!(InsurerNumber::parse(bad).is_err(), "{bad}");
    }
}

/// Refusals written to the real audit log: an adapter like the one the server uses.
struct LogAuditor(Mutex<AuditLog>);

impl AccessAuditor for LogAuditor {
    fn record(&self, d: AccessDecision) {
        let e = d.to_audit_entry("2026-11-21T10:00:00+09:00".into());
        if let Ok(mut l) = self.0.lock() {
            let _ = l.append(&[e]);
        }
    }
}

#[tokio::test]
async fn refusals_are_in_the_audit_log() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = AuditLog::open(dir.path(), LogOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let auditor = Arc::new(LogAuditor(Mutex::new(log)));
    let dev = DevIssuer::ephemeral("aud").unwrap_or_else(|e| panic!("{e}"));
    let mut r = TokenRequest::for_role(Role::Patient);
    r.person = Some("person-1".into());
    r.scope = "patient/Observation.rs".into();
    let token = dev.issue(&r, 1_000).unwrap_or_default();
    let auth = Arc::new(kizuna_auth::http::FhirAuth {
        verifier: TokenVerifier::new(vec![dev.trusted()]),
        auditor: auditor.clone(),
        now: Arc::new(|| 1_000),
    });
    let app = axum::Router::new()
        .route("/fhir/{*rest}", axum::routing::any(|| async { "ok" }))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            kizuna_auth::http::require_fhir_auth,
        ));
    for (method, path, tok) in [
        ("GET", "/fhir/Observation/1", None),
        ("POST", "/fhir/Observation", Some(token.as_str())),
        ("GET", "/fhir/Observation/1", Some(token.as_str())),
    ] {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = tok {
            b = b.header("Authorization", format!("Bearer {t}"));
        }
        let _ = app
            .clone()
            .oneshot(b.body(Body::empty()).unwrap_or_default())
            .await;
    }
    let log = auditor.0.lock().unwrap_or_else(|e| e.into_inner());
    let all = log.query(&AuditQuery::default()).unwrap_or_default();
    let rules: Vec<(bool, &str, &str)> = all
        .iter()
        .map(|e| {
            (
                e.entry.outcome.allowed,
                e.entry.outcome.rule.as_str(),
                e.entry.action.as_str(),
            )
        })
        .collect();
    assert_eq!(
        rules,
        vec![
            (false, "token-missing", "read"),
            (false, "scope-insufficient", "create")
        ],
        "the allowed read is audited by its handler, not twice"
    );
    assert_eq!(all[1].entry.actor.kind, ActorKind::Patient);
    let _ = Interaction::Read;
}

proptest! {
    #[test]
    fn scope_parser_never_panics(s in "\\PC{0,60}") {
        let _ = ScopeSet::parse(&s);
    }

    #[test]
    fn valid_scopes_round_trip(ctx in prop_oneof![Just("patient"), Just("user"), Just("system")],
                               res in prop_oneof![Just("Observation"), Just("*"), Just("Condition")],
                               mask in 1u32..32,
                               param in proptest::option::of(("[a-z]{1,8}", "[a-z0-9]{1,8}"))) {
        let perms: String = ['c','r','u','d','s'].iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, c)| *c).collect();
        let text = match &param { Some((k, v)) => format!("{ctx}/{res}.{perms}?{k}={v}"), None => format!("{ctx}/{res}.{perms}") };
        let set = ScopeSet::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(set.scopes.len(), 1);
        prop_assert_eq!(set.scopes[0].to_string(), text);
    }
}
