//! `$reindex`: the operator rebuilds the search index of some resource types (or all) on the
//! running server, after loading SearchParameters the stored resources predate — the job HAPI's
//! `$reindex` does. The work runs in the store's background task (the one that finishes an
//! upgrade), so the server keeps answering and searches of a pending type carry an `incomplete`
//! warning until it is done; `kizuna reindex` does the same on a stopped server.
//!
//! - `POST /fhir/$reindex` with an optional `Parameters` body of `type` codes (none: every type),
//! - `POST /fhir/{type}/$reindex` for one type,
//! - `GET /fhir/$reindex`: what is still pending.
//!
//! Only the operator may ask (`kizuna_auth::http::check_scope` refuses other roles before a
//! handler runs); each request is audited with the types it covers.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use kizuna_audit::{NewEntry, Outcome, Purpose, Target};
use serde_json::{json, Value};

use crate::fhir::{actor, check_type, parse_body, Auth, St};
use crate::{fhir_json, ApiError, AppState};

/// `POST /fhir/$reindex`.
pub(crate) async fn system(
    State(s): St,
    a: Auth,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let types = if body.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        requested_types(&s, &parse_body(&headers, &body, &s)?)?
    };
    start(&s, &a, types).await
}

/// `POST /fhir/{type}/$reindex`.
pub(crate) async fn of_type(s: &AppState, a: &Auth, rt: &str) -> Result<Response, ApiError> {
    check_type(s, rt)?;
    start(s, a, vec![rt.to_string()]).await
}

/// `GET /fhir/$reindex`: the types whose index is still being rebuilt (`*`: every type).
pub(crate) async fn status(State(s): St) -> Result<Response, ApiError> {
    let pending = s.store.reindexing();
    Ok(fhir_json(StatusCode::OK, &parameters(&pending)))
}

/// The `type` parameters of a `Parameters` body, each a known resource type.
fn requested_types(s: &AppState, body: &Value) -> Result<Vec<String>, ApiError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(bad(
            "Parameters",
            "Parameters リソースが必要です",
            "expected a Parameters resource",
        ));
    }
    let mut types = Vec::new();
    let params = body.get("parameter").and_then(Value::as_array);
    for (i, p) in params.into_iter().flatten().enumerate() {
        let path = format!("Parameters.parameter[{i}]");
        if p.get("name").and_then(Value::as_str) != Some("type") {
            return Err(bad(
                &format!("{path}.name"),
                "使えるパラメータは type だけです",
                "the only parameter is type",
            ));
        }
        let Some(rt) = p
            .get("valueCode")
            .or_else(|| p.get("valueString"))
            .and_then(Value::as_str)
        else {
            return Err(bad(
                &format!("{path}.valueCode"),
                "type にはリソース型を valueCode で指定します",
                "type needs a resource type as valueCode",
            ));
        };
        check_type(s, rt).map_err(|_| {
            bad(
                &format!("{path}.valueCode"),
                &format!("不明なリソース型 {rt}"),
                &format!("unknown resource type {rt}"),
            )
        })?;
        if !types.iter().any(|t| t == rt) {
            types.push(rt.to_string());
        }
    }
    Ok(types)
}

/// Records the types (none: every type) for the background task, audits the request and answers
/// 202 with where to follow it.
async fn start(s: &AppState, a: &Auth, types: Vec<String>) -> Result<Response, ApiError> {
    let types = if types.is_empty() {
        vec!["*".to_string()]
    } else {
        types
    };
    s.store.reindex_in_background(&types).await?;
    tracing::info!(types = types.len(), "search index rebuild requested");
    if let Some(w) = &s.audit {
        let time = chrono::Utc::now().to_rfc3339();
        let request = format!(
            "reindex-{}",
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
        );
        w.record_batch(
            types
                .iter()
                .map(|t| NewEntry {
                    time: time.clone(),
                    actor: actor(a),
                    action: "reindex".into(),
                    target: Target {
                        resource_type: (t != "*").then(|| t.clone()),
                        ..Target::default()
                    },
                    purpose: Purpose::Operations,
                    outcome: Outcome::allow("operator"),
                    source: None,
                    request: Some(request.clone()),
                })
                .collect(),
        );
    }
    let named = types.join(", ");
    let outcome = json!({
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "information",
            "code": "informational",
            "details": {"text": format!(
                "検索索引の再構築を始めました ({named}); 終わるまで検索結果が欠けることがあります / \
                 rebuilding the search index of {named}; searches may miss matches until it is done"
            )}
        }]
    });
    let mut resp = fhir_json(StatusCode::ACCEPTED, &outcome);
    if let Ok(v) = HeaderValue::from_str(&format!("{}/$reindex", s.base_url)) {
        resp.headers_mut().insert(header::CONTENT_LOCATION, v);
    }
    Ok(resp)
}

/// The answer of `GET $reindex`: a `pending` code per type still being rebuilt, and `complete`.
fn parameters(pending: &[String]) -> Value {
    let mut params: Vec<Value> = pending
        .iter()
        .map(|t| json!({"name": "pending", "valueCode": t}))
        .collect();
    params.push(json!({"name": "complete", "valueBoolean": pending.is_empty()}));
    json!({"resourceType": "Parameters", "parameter": params})
}

/// The id of [`operation_definition`].
pub(crate) const DEFINITION_ID: &str = "reindex";

/// The canonical URL the CapabilityStatement names for `$reindex`.
pub(crate) fn definition_url() -> String {
    format!("{}/{DEFINITION_ID}", kizuna_share::operations::BASE)
}

/// `OperationDefinition/reindex`: a client reads what the operation takes.
pub(crate) fn operation_definition(id: &str) -> Option<Value> {
    (id == DEFINITION_ID).then(|| {
        json!({
            "resourceType": "OperationDefinition",
            "id": DEFINITION_ID,
            "url": definition_url(),
            "name": "Reindex",
            "title": "検索索引の再構築",
            "status": "active",
            "kind": "operation",
            "description": "保存済みリソースの検索索引を、読み込まれている SearchParameter で作り直す (運営者)。\
                 結果は GET $reindex で確かめる / Rebuild the search index of stored resources from the \
                 loaded SearchParameters (the operator); follow it with GET $reindex.",
            "affectsState": true,
            "code": "reindex",
            "system": true,
            "type": true,
            "instance": false,
            "parameter": [
                {"name": "type", "use": "in", "min": 0, "max": "*", "type": "code",
                 "documentation": "再構築するリソース型 (省略時はすべて) / the resource types to rebuild (none: every type)"},
                {"name": "pending", "use": "out", "min": 0, "max": "*", "type": "code",
                 "documentation": "GET: まだ再構築中の型 / GET: the types still being rebuilt"},
                {"name": "complete", "use": "out", "min": 0, "max": "1", "type": "boolean",
                 "documentation": "GET: 再構築が終わったか / GET: whether the rebuild is done"}
            ]
        })
    })
}

fn bad(path: &str, ja: &str, en: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid", path, ja, en)
}
