//! Enforcement on the FHIR REST API: every request under `/fhir` is classified into a FHIR interaction,
//! its bearer token verified and its scopes checked before any handler runs. A missing or bad token is a
//! 401, a token without the needed scope a 403 — both with a FHIR OperationOutcome and an RFC 6750
//! `WWW-Authenticate` header — and every refusal is handed to the auditor.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::jwt::TokenVerifier;
use crate::principal::{Principal, Role};
use crate::scope::{Grant, Interaction, ScopeSet};
use crate::AuthError;

/// Operations that only read.
const READ_ONLY_OPERATIONS: &[&str] = &[
    "everything",
    "summary",
    "export",
    "validate",
    "meta",
    "lastn",
    "stats",
    "document",
    "export-status",
    "export-file",
    "my-record",
    "access-history",
    "referral-inbox",
    "checkup-reports",
    "identifiers",
];

/// Operations on the store as a whole, the operator's alone whatever the scopes: rebuilding the
/// search index reads and rewrites every resource of a type.
const OPERATOR_OPERATIONS: &[&str] = &["reindex"];

/// A request classified as a FHIR interaction on a resource type (and id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirRequest {
    /// The interaction.
    pub interaction: Interaction,
    /// The resource type (`*` for system-level interactions).
    pub resource_type: String,
    /// The resource id, for instance-level interactions.
    pub resource_id: Option<String>,
}

/// Classifies a request under the FHIR base (path relative to `/fhir`). `None` for requests that need
/// no token (`metadata`, SMART discovery).
pub fn classify(method: &Method, path: &str) -> Option<FhirRequest> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let op = |name: &str, rt: &str, id: Option<&str>| FhirRequest {
        interaction: Interaction::Operation {
            name: name.to_string(),
            read_only: *method == Method::GET || READ_ONLY_OPERATIONS.contains(&name),
        },
        resource_type: rt.to_string(),
        resource_id: id.map(str::to_string),
    };
    let plain = |i: Interaction, rt: &str, id: Option<&str>| FhirRequest {
        interaction: i,
        resource_type: rt.to_string(),
        resource_id: id.map(str::to_string),
    };
    Some(match segs.as_slice() {
        [] if *method == Method::POST => op("transaction", "Bundle", None),
        [] => plain(Interaction::Search, "*", None),
        ["metadata"] | [".well-known", ..] => return None,
        ["_history"] => plain(Interaction::History, "*", None),
        // Bulk export polling and downloads: the handler checks the job belongs to the caller.
        ["$export-status", job] => op("export-status", "*", Some(job)),
        ["$export-file", job, ..] => op("export-file", "*", Some(job)),
        [o] if o.starts_with('$') => op(&o[1..], "*", None),
        [rt] if *method == Method::POST => plain(Interaction::Create, rt, None),
        [rt] if *method == Method::PUT || *method == Method::PATCH => {
            plain(Interaction::Update, rt, None)
        }
        [rt] if *method == Method::DELETE => plain(Interaction::Delete, rt, None),
        [rt] => plain(Interaction::Search, rt, None),
        [rt, "_search"] => plain(Interaction::Search, rt, None),
        [rt, "_history"] => plain(Interaction::History, rt, None),
        [rt, o] if o.starts_with('$') => op(&o[1..], rt, None),
        [rt, id] if *method == Method::PUT => plain(Interaction::Update, rt, Some(id)),
        [rt, id] if *method == Method::PATCH => plain(Interaction::Patch, rt, Some(id)),
        [rt, id] if *method == Method::DELETE => plain(Interaction::Delete, rt, Some(id)),
        [rt, id] => plain(Interaction::Read, rt, Some(id)),
        [rt, id, "_history"] => plain(Interaction::History, rt, Some(id)),
        [rt, id, "_history", _vid] => plain(Interaction::Vread, rt, Some(id)),
        [rt, id, o] if o.starts_with('$') => op(&o[1..], rt, Some(id)),
        // Compartment search: Patient/123/Observation
        [_, _, rt] => plain(Interaction::Search, rt, None),
        _ => plain(Interaction::Search, "*", None),
    })
}

/// A refusal (or, from handlers, a decision) for the audit log.
#[derive(Debug, Clone)]
pub struct AccessDecision {
    /// The caller, when the token was good enough to know.
    pub principal: Option<Principal>,
    /// What was asked.
    pub request: Option<FhirRequest>,
    /// Allowed or not.
    pub allowed: bool,
    /// The rule (`token-missing`, `token-expired`, `scope-insufficient` …).
    pub rule: String,
    /// Client address.
    pub source: Option<String>,
}

/// Where decisions go. The server connects this to the audit log.
pub trait AccessAuditor: Send + Sync {
    /// Records one decision.
    fn record(&self, decision: AccessDecision);
}

/// The state the middleware needs.
pub struct FhirAuth {
    /// Token verification.
    pub verifier: TokenVerifier,
    /// Where refusals are recorded.
    pub auditor: Arc<dyn AccessAuditor>,
    /// The current time in seconds since the epoch (injected for tests).
    pub now: Arc<dyn Fn() -> i64 + Send + Sync>,
}

/// What a handler finds in the request's extensions after the middleware let it through.
#[derive(Debug, Clone)]
pub struct Authorized {
    /// The caller.
    pub principal: Principal,
    /// The interaction.
    pub request: FhirRequest,
    /// The scope that allowed it.
    pub grant: Grant,
}

/// Checks a principal's scopes (and, for the operator's operations, role) for an interaction: the
/// middleware asks it for every request, handlers for each entry of a transaction.
pub fn check_scope(p: &Principal, r: &FhirRequest) -> Result<Grant, AuthError> {
    if let Interaction::Operation { name, .. } = &r.interaction {
        if OPERATOR_OPERATIONS.contains(&name.as_str()) && p.role != Role::Operator {
            return Err(AuthError::OperatorOnly(name.clone()));
        }
        // Bulk export: any read scope lets the request in; the handler exports only the types the
        // token may read and refuses a `_type` it may not.
        if matches!(name.as_str(), "export" | "export-status" | "export-file") {
            return p
                .scopes
                .grant_any_read()
                .ok_or_else(|| AuthError::InsufficientScope("user/*.r".into()));
        }
    }
    p.scopes
        .grant(&r.resource_type, &r.interaction)
        .ok_or_else(|| {
            AuthError::InsufficientScope(ScopeSet::needed(&r.resource_type, &r.interaction))
        })
}

/// The OperationOutcome body for an authentication or authorisation failure.
pub fn outcome(e: &AuthError) -> serde_json::Value {
    let code = if e.status() == 401 {
        "login"
    } else {
        "forbidden"
    };
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "error",
            "code": code,
            "details": {"text": e.to_string(), "coding": [{"system": "urn:kizuna:auth-rule", "code": e.rule()}]},
            "diagnostics": e.rule()
        }]
    })
}

/// The error response: status, OperationOutcome, and `WWW-Authenticate`.
pub fn error_response(e: &AuthError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    let mut resp = (status, axum::Json(outcome(e))).into_response();
    let www = match e {
        AuthError::MissingToken => "Bearer realm=\"kizuna\"".to_string(),
        AuthError::InsufficientScope(s) => {
            format!("Bearer realm=\"kizuna\", error=\"insufficient_scope\", scope=\"{s}\"")
        }
        // A good token whose role lacks the privilege (RFC 6750 §3.1).
        AuthError::OperatorOnly(_) => {
            "Bearer realm=\"kizuna\", error=\"insufficient_scope\"".to_string()
        }
        other => format!(
            "Bearer realm=\"kizuna\", error=\"invalid_token\", error_description=\"{}\"",
            other.rule()
        ),
    };
    if let Ok(v) = HeaderValue::from_str(&www) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json; charset=utf-8"),
    );
    resp
}

/// The axum middleware for routes nested under `/fhir`.
pub async fn require_fhir_auth(
    State(auth): State<Arc<FhirAuth>>,
    mut req: Request<Body>,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    let rel = path.strip_prefix("/fhir").unwrap_or(&path);
    let Some(fhir) = classify(req.method(), rel) else {
        return next.run(req).await;
    };
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .map(str::to_string);
    let deny = |e: AuthError, principal: Option<Principal>| {
        auth.auditor.record(AccessDecision {
            principal,
            request: Some(fhir.clone()),
            allowed: false,
            rule: e.rule().to_string(),
            source: source.clone(),
        });
        error_response(&e)
    };
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return deny(AuthError::MissingToken, None);
    };
    let principal = match auth.verifier.verify(&token, (auth.now)()) {
        Ok(p) => p,
        Err(e) => return deny(e, None),
    };
    let grant = match check_scope(&principal, &fhir) {
        Ok(g) => g,
        Err(e) => return deny(e, Some(principal)),
    };
    req.extensions_mut().insert(Authorized {
        principal,
        request: fhir,
        grant,
    });
    next.run(req).await
}

impl Principal {
    /// The audit log's view of this caller: its kind, subject, institution and issuer (never a name).
    pub fn audit_actor(&self) -> kizuna_audit::Actor {
        use crate::principal::Role;
        use kizuna_audit::ActorKind;
        kizuna_audit::Actor {
            kind: match self.role {
                Role::Institution => ActorKind::Institution,
                Role::Clinician => ActorKind::Clinician,
                Role::Patient => ActorKind::Patient,
                Role::Insurer => ActorKind::Insurer,
                Role::Researcher => ActorKind::Researcher,
                Role::Reviewer => ActorKind::Reviewer,
                Role::Operator => ActorKind::Operator,
            },
            id: self.subject.clone(),
            institution: self.institution.as_ref().map(|i| i.as_str().to_string()),
            issuer: Some(self.issuer.clone()),
        }
    }
}

impl AccessDecision {
    /// The audit entry for this decision, so every server and test records refusals the same way.
    pub fn to_audit_entry(&self, time: String) -> kizuna_audit::NewEntry {
        use kizuna_audit::{Outcome, Purpose, Target};
        kizuna_audit::NewEntry {
            time,
            actor: match &self.principal {
                Some(p) => p.audit_actor(),
                None => kizuna_audit::log::anonymous_actor(self.source.as_deref()),
            },
            action: self
                .request
                .as_ref()
                .map(|r| r.interaction.name())
                .unwrap_or_default(),
            target: Target {
                resource_type: self.request.as_ref().map(|r| r.resource_type.clone()),
                resource_id: self.request.as_ref().and_then(|r| r.resource_id.clone()),
                ..Target::default()
            },
            purpose: Purpose::Unknown,
            outcome: if self.allowed {
                Outcome::allow(self.rule.clone())
            } else {
                Outcome::deny(self.rule.clone())
            },
            source: self.source.clone(),
            request: None,
        }
    }
}
