//! `/fhir`: the routes, the helpers every handler shares (parsing, validation, audit, response
//! headers), and the instance and type interactions: read, vread, create, update, patch, delete
//! (plain and conditional), history and search.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use kizuna_audit::{Actor, ActorKind, NewEntry, Outcome, Purpose, Target};
use kizuna_auth::http::Authorized;
use kizuna_fhir::outcome::Severity;
use kizuna_fhir::prepared::{EntryResource, PreparedBundle, PreparedEntry};
use kizuna_fhir::subset::SubsetView;
use kizuna_store::{SearchQuery, Stored, WriteOp};
use serde_json::{json, Value};

use crate::ValidationMode;
use crate::{bundle, capability, everything, export, fhir_json, format, share, ApiError, AppState};

pub(crate) type St = State<Arc<AppState>>;
pub(crate) type Auth = Option<Extension<Authorized>>;
type Pairs = Query<Vec<(String, String)>>;

/// The `/fhir` routes (with the auth middleware when configured) and `/healthz`.
pub fn router(state: Arc<AppState>) -> Router {
    let fhir = Router::new()
        .route("/fhir/metadata", get(capability::metadata))
        .route("/fhir", post(bundle::batch))
        .route("/fhir/_history", get(history_system))
        .route("/fhir/$export", get(export::kickoff_system))
        .route(
            "/fhir/$export-status/{job}",
            get(export::status).delete(export::cancel),
        )
        .route("/fhir/$export-file/{job}/{file}", get(export::file))
        .route(
            "/fhir/{rt}",
            get(search_get)
                .post(create)
                .put(conditional_update)
                .delete(conditional_delete)
                .patch(conditional_patch),
        )
        .route("/fhir/$retention-run", post(retention_run))
        .route(
            "/fhir/$reindex",
            post(crate::reindex::system).get(crate::reindex::status),
        )
        .route("/fhir/{rt}/_search", post(search_post))
        .route("/fhir/{rt}/_history", get(history_type))
        .route(
            "/fhir/{rt}/{id}",
            get(read)
                .put(update)
                .delete(delete)
                .patch(patch)
                .post(type_operation_post),
        )
        .route(
            "/fhir/{rt}/{id}/{op}",
            get(instance_operation).post(instance_operation),
        )
        .route("/fhir/{rt}/{id}/_history", get(history_instance))
        .route("/fhir/{rt}/{id}/_history/{vid}", get(vread));
    let fhir = match &state.auth {
        Some(a) => fhir.route_layer(axum::middleware::from_fn_with_state(
            a.clone(),
            kizuna_auth::http::require_fhir_auth,
        )),
        None => fhir,
    };
    fhir.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        format::negotiate,
    ))
    .layer(DefaultBodyLimit::max(state.max_body_bytes))
    .layer(tower_http::decompression::RequestDecompressionLayer::new())
    .layer(tower_http::compression::CompressionLayer::new())
    .route("/healthz", get(|| async { "ok" }))
    .with_state(state)
}

pub(crate) fn check_type(s: &AppState, rt: &str) -> Result<(), ApiError> {
    if s.store.registry().model().is_resource(rt) && rt != "Resource" && rt != "DomainResource" {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            rt,
            &format!("不明なリソース型 {rt}"),
            &format!("unknown resource type {rt}"),
        ))
    }
}

pub(crate) fn parse_body(
    headers: &HeaderMap,
    body: &Bytes,
    s: &AppState,
) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Checked once for the whole body: parsing from `&str` then skips the check serde_json makes
    // on every string of a byte slice (a tenth of the parse of a transaction Bundle).
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            "",
            &format!("本文が UTF-8 ではありません ({} バイト目)", e.valid_up_to()),
            &format!("body is not UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    if ct.contains("xml") {
        return kizuna_fhir::xml::from_xml(text, s.store.registry().model()).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "structure",
                "",
                &e.to_string(),
                &e.to_string(),
            )
        });
    }
    serde_json::from_str(text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            "",
            &format!("JSON が不正です: {e}"),
            &format!("invalid JSON: {e}"),
        )
    })
}

/// Validates per the configured mode: `Err` refuses, `Ok(issues)` carries warnings to return.
pub(crate) fn validate(s: &AppState, resource: &Value) -> Result<Option<Value>, ApiError> {
    match s.validation.mode_for(resource) {
        ValidationMode::Off => Ok(None),
        mode => {
            let oo = s.validator.validate(resource);
            if mode == ValidationMode::Enforce && oo.has_errors() {
                let mut oo = oo;
                oo.issues.retain(|i| i.severity <= Severity::Error);
                return Err(ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    outcome: oo,
                });
            }
            Ok(if oo.issues.is_empty() {
                None
            } else {
                Some(oo.to_fhir())
            })
        }
    }
}

pub(crate) fn actor(a: &Auth) -> Actor {
    match a {
        Some(Extension(a)) => a.principal.audit_actor(),
        None => Actor {
            kind: ActorKind::System,
            id: "unauthenticated-test".into(),
            institution: None,
            issuer: None,
        },
    }
}

/// The patient a resource is about, for the patient's access history.
pub(crate) fn person_of(r: &Value) -> Option<String> {
    if r.get("resourceType").and_then(Value::as_str) == Some("Patient") {
        return r.get("id").and_then(Value::as_str).map(str::to_string);
    }
    for k in ["subject", "patient", "beneficiary"] {
        if let Some(rf) = r
            .get(k)
            .and_then(|x| x.get("reference"))
            .and_then(Value::as_str)
        {
            if let Some(id) = rf.strip_prefix("Patient/") {
                return Some(id.to_string());
            }
        }
    }
    None
}

/// One audit entry per resource touched (a search returning 20 resources writes 20 entries).
pub(crate) fn audit(s: &AppState, a: &Auth, action: &str, stored: &[&Stored]) {
    let Some(w) = &s.audit else { return };
    let actor = actor(a);
    let time = chrono::Utc::now().to_rfc3339();
    let request = format!(
        "{}-{}",
        action,
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    );
    let entries = stored
        .iter()
        .map(|st| NewEntry {
            time: time.clone(),
            actor: actor.clone(),
            action: action.to_string(),
            target: Target {
                resource_type: Some(st.resource_type.clone()),
                resource_id: Some(st.id.clone()),
                person: st.resource.as_ref().and_then(person_of),
                ..Target::default()
            },
            purpose: Purpose::Operations,
            outcome: Outcome::allow("scope"),
            source: None,
            request: Some(request.clone()),
        })
        .collect();
    w.record_batch(entries);
}

pub(crate) fn etag(v: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{v}\"")).unwrap_or(HeaderValue::from_static("W/\"0\""))
}

/// `Last-Modified` text (RFC 7231) for a stored `lastUpdated`.
pub(crate) fn http_date(last_updated: &str) -> Option<String> {
    chrono::DateTime::parse_from_rfc3339(last_updated)
        .ok()
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string()
        })
}

fn with_version_headers(mut r: Response, st: &Stored) -> Response {
    r.headers_mut().insert(header::ETAG, etag(st.version));
    if let Some(v) = http_date(&st.last_updated).and_then(|d| HeaderValue::from_str(&d).ok()) {
        r.headers_mut().insert(header::LAST_MODIFIED, v);
    }
    r
}

/// What `Prefer: return=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Return {
    Minimal,
    Representation,
    Outcome,
}

pub(crate) fn prefer_return(headers: &HeaderMap) -> Return {
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if prefer.contains("return=minimal") {
        Return::Minimal
    } else if prefer.contains("return=OperationOutcome") {
        Return::Outcome
    } else {
        Return::Representation
    }
}

pub(crate) fn resource_response(
    s: &AppState,
    status: StatusCode,
    st: &Stored,
    headers: &HeaderMap,
    warnings: Option<Value>,
) -> Response {
    let body = match prefer_return(headers) {
        Return::Minimal => None,
        Return::Outcome => Some(
            warnings
                .clone()
                .unwrap_or_else(|| kizuna_fhir::outcome::OperationOutcome::default().to_fhir()),
        ),
        Return::Representation => st.resource.clone(),
    };
    let mut r = match body {
        Some(b) => fhir_json(status, &b),
        None => status.into_response(),
    };
    if status == StatusCode::CREATED {
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{}/{}/{}/_history/{}",
            s.base_url, st.resource_type, st.id, st.version
        )) {
            r.headers_mut().insert(header::LOCATION, v);
        }
    }
    with_version_headers(r, st)
}

pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The `_summary`/`_elements` view a request asks for; a bad `_summary` is a 400 naming it.
pub(crate) fn view_of(pairs: &[(String, String)]) -> Result<SubsetView, ApiError> {
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    SubsetView::from_params(get("_summary"), get("_elements")).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "value",
            "_summary",
            &e.to_string(),
            &e.to_string(),
        )
    })
}

pub(crate) fn apply_view(s: &AppState, view: &SubsetView, mut st: Stored) -> Stored {
    if *view != SubsetView::Full {
        if let Some(r) = st.resource.as_ref() {
            st.resource = Some(view.apply(s.store.registry().model(), r));
        }
    }
    st
}

/// The answer to a read the access policy refused (the decision is in the audit log).
fn refused() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "",
        "アクセス方針により閲覧できません",
        "the access policy does not allow reading this resource",
    )
}

/// Type-level operations: `/fhir/{type}/${op}`.
#[allow(clippy::too_many_arguments)]
async fn type_operation(
    s: &Arc<AppState>,
    a: &Auth,
    method: Method,
    rt: &str,
    op: &str,
    query: Option<&str>,
    body: &Bytes,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if op == "export" && method == Method::GET {
        return export::kickoff_patients(s, a, rt, query, headers).await;
    }
    if op == "reindex" && method == Method::POST {
        return crate::reindex::of_type(s, a, rt).await;
    }
    match share::type_operation(s, a, &method, rt, op, query, body, headers).await {
        Some(r) => r,
        None => Err(not_found(rt, &format!("${op}"))),
    }
}

async fn type_operation_post(
    State(s): St,
    a: Auth,
    Path((rt, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    match id.strip_prefix('$') {
        Some(op) => {
            type_operation(
                &s,
                &a,
                Method::POST,
                &rt,
                op,
                query.as_deref(),
                &body,
                &headers,
            )
            .await
        }
        None => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            &format!("{rt}/{id}"),
            "POST はリソース型に対して行います (作成)",
            "POST goes to the resource type (create), not to an instance",
        )),
    }
}

/// Instance-level operations: `/fhir/{type}/{id}/${op}`.
async fn instance_operation(
    State(s): St,
    a: Auth,
    method: Method,
    Path((rt, id, op)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(name) = op.strip_prefix('$') else {
        return Err(not_found(&rt, &id));
    };
    match (name, &method) {
        ("everything", &Method::GET) => {
            return everything::everything(&s, &a, &rt, &id, query.as_deref()).await
        }
        ("export", &Method::GET) => {
            return export::kickoff_group(&s, &a, &rt, &id, query.as_deref(), &headers).await
        }
        _ => {}
    }
    match share::instance_operation(&s, &a, &method, &rt, &id, name, query.as_deref(), &body).await
    {
        Some(r) => r,
        None => Err(not_found(&rt, &op)),
    }
}

async fn retention_run(State(s): St, a: Auth) -> Result<Response, ApiError> {
    share::retention_run(&s, &a).await
}

fn not_found(rt: &str, id: &str) -> ApiError {
    if id.starts_with('$') {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            id,
            &format!("操作 {id} は {rt} にありません"),
            &format!("operation {id} is not supported on {rt}"),
        );
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "",
        &format!("{rt}/{id} はありません"),
        &format!("{rt}/{id} not found"),
    )
}

async fn read(
    State(s): St,
    a: Auth,
    Path((rt, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(op) = id.strip_prefix('$') {
        return type_operation(
            &s,
            &a,
            Method::GET,
            &rt,
            op,
            query.as_deref(),
            &Bytes::new(),
            &headers,
        )
        .await;
    }
    check_type(&s, &rt)?;
    if rt == "OperationDefinition" {
        if let Some(d) = kizuna_share::operations::operation_definition(&id)
            .or_else(|| crate::reindex::operation_definition(&id))
        {
            return Ok(fhir_json(StatusCode::OK, &d));
        }
    }
    let view = view_of(&query_pairs(query.as_deref()))?;
    match s.store.read(&rt, &id).await? {
        Some(st)
            if !st
                .resource
                .as_ref()
                .is_none_or(|r| share::may_read(&s, &a, r)) =>
        {
            Err(refused())
        }
        Some(st) => {
            audit(&s, &a, "read", &[&st]);
            // A client holding the current version gets 304 instead of the body again.
            if let Some(inm) = headers
                .get(header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok())
            {
                if parse_version(inm) == Some(st.version) {
                    let r = StatusCode::NOT_MODIFIED.into_response();
                    return Ok(with_version_headers(r, &st));
                }
            }
            let st = apply_view(&s, &view, st);
            Ok(resource_response(&s, StatusCode::OK, &st, &headers, None))
        }
        None => Err(not_found(&rt, &id)),
    }
}

async fn vread(
    State(s): St,
    a: Auth,
    Path((rt, id, vid)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    let view = view_of(&query_pairs(query.as_deref()))?;
    let v: i64 = vid.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "value",
            "vid",
            "版が数値ではありません",
            "version id is not a number",
        )
    })?;
    match s.store.vread(&rt, &id, v).await? {
        Some(st) if st.deleted => Err(ApiError::new(
            StatusCode::GONE,
            "deleted",
            "",
            "この版は削除です",
            "this version is a deletion",
        )),
        Some(st)
            if !st
                .resource
                .as_ref()
                .is_none_or(|r| share::may_read(&s, &a, r)) =>
        {
            Err(refused())
        }
        Some(st) => {
            audit(&s, &a, "vread", &[&st]);
            let st = apply_view(&s, &view, st);
            Ok(resource_response(&s, StatusCode::OK, &st, &headers, None))
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "",
            "版がありません",
            "version not found",
        )),
    }
}

/// The request body as a resource of the type the URL names.
pub(crate) fn parse_typed_body(
    headers: &HeaderMap,
    body: &Bytes,
    s: &AppState,
    rt: &str,
) -> Result<Value, ApiError> {
    let resource = parse_body(headers, body, s)?;
    if resource.get("resourceType").and_then(Value::as_str) != Some(rt) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "resourceType",
            "resourceType が URL と違います",
            "resourceType does not match the URL",
        ));
    }
    Ok(resource)
}

/// The search criteria of a conditional interaction (`If-None-Exist`, `PUT Type?…`), strict: a
/// condition the server cannot evaluate must not silently match everything.
pub(crate) fn criteria(pairs: &[(String, String)], what: &str) -> Result<SearchQuery, ApiError> {
    let q = SearchQuery::from_pairs(pairs);
    if q.params.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            what,
            &format!("{what} には検索条件が必要です"),
            &format!("{what} needs search criteria"),
        ));
    }
    Ok(q)
}

/// Ids matching a condition, refusing more than one where one is required.
pub(crate) async fn resolve_condition(
    s: &AppState,
    rt: &str,
    pairs: &[(String, String)],
    what: &str,
) -> Result<Option<String>, ApiError> {
    let ids = s.store.search_ids(rt, &criteria(pairs, what)?).await?;
    match ids.len() {
        0 => Ok(None),
        1 => Ok(ids.into_iter().next()),
        n => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "multiple-matches",
            what,
            &format!("条件に合う資源が {n} 件あります (1 件であるべきです)"),
            &format!("the condition matches {n} resources; it must match at most one"),
        )),
    }
}

async fn create(
    State(s): St,
    a: Auth,
    Path(rt): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    let mut resource = parse_typed_body(&headers, &body, &s, &rt)?;
    if let Some(cond) = headers.get("if-none-exist").and_then(|v| v.to_str().ok()) {
        let pairs = query_pairs(Some(cond.trim_start_matches('?')));
        if let Some(id) = resolve_condition(&s, &rt, &pairs, "If-None-Exist").await? {
            if let Some(st) = s.store.read(&rt, &id).await? {
                audit(&s, &a, "read", &[&st]);
                return Ok(resource_response(&s, StatusCode::OK, &st, &headers, None));
            }
        }
    }
    share::may_write(&s, &a, &resource)?;
    // The server assigns the id of a created resource; a client's id is ignored.
    if let Some(o) = resource.as_object_mut() {
        o.remove("id");
    }
    let warnings = validate(&s, &resource)?;
    let st = s.store.create(resource).await?;
    audit(&s, &a, "create", &[&st]);
    Ok(resource_response(
        &s,
        StatusCode::CREATED,
        &st,
        &headers,
        warnings,
    ))
}

/// Reads `If-Match` (`W/"3"`, `"3"`, `3`).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    match headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        Some(v) => parse_version(v).map(Some).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "value",
                "If-Match",
                "If-Match が不正です",
                "malformed If-Match",
            )
        }),
        None => Ok(None),
    }
}

/// A version from an ETag-like value.
pub(crate) fn parse_version(v: &str) -> Option<i64> {
    v.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse::<i64>()
        .ok()
}

/// The write of an update once the target id is known.
async fn store_update(
    s: &AppState,
    a: &Auth,
    resource: Value,
    version: Option<i64>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    share::may_write(s, a, &resource)?;
    if s.share.is_some() {
        let rt = resource["resourceType"].as_str().unwrap_or("");
        let id = resource["id"].as_str().unwrap_or("");
        if let Ok(Some(cur)) = s.store.read(rt, id).await {
            if let Some(r) = &cur.resource {
                share::may_write(s, a, r)?;
            }
        }
    }
    let warnings = validate(s, &resource)?;
    let st = s.store.update(resource, version).await?;
    audit(s, a, "update", &[&st]);
    let status = if st.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(resource_response(s, status, &st, headers, warnings))
}

async fn update(
    State(s): St,
    a: Auth,
    Path((rt, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    let resource = parse_typed_body(&headers, &body, &s, &rt)?;
    if resource.get("id").and_then(Value::as_str) != Some(id.as_str()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            &format!("{rt}.id"),
            "本文の id が URL と違います",
            "the id in the body does not match the URL",
        ));
    }
    let version = if_match(&headers)?;
    store_update(&s, &a, resource, version, &headers).await
}

/// `PUT Type?criteria`: no match creates, one match updates it, several are a 412.
async fn conditional_update(
    State(s): St,
    a: Auth,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    let mut resource = parse_typed_body(&headers, &body, &s, &rt)?;
    let pairs = query_pairs(query.as_deref());
    let body_id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = match resolve_condition(&s, &rt, &pairs, "conditional update").await? {
        Some(found) => {
            if body_id.as_deref().is_some_and(|b| b != found) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    &format!("{rt}.id"),
                    "本文の id が条件に合う資源と違います",
                    "the id in the body differs from the resource the condition matched",
                ));
            }
            found
        }
        None => body_id.unwrap_or_else(kizuna_store::new_id),
    };
    resource["id"] = json!(id);
    let version = if_match(&headers)?;
    store_update(&s, &a, resource, version, &headers).await
}

async fn delete(
    State(s): St,
    a: Auth,
    Path((rt, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    if s.share.is_some() {
        if let Ok(Some(cur)) = s.store.read(&rt, &id).await {
            if let Some(r) = &cur.resource {
                share::may_write(&s, &a, r)?;
            }
        }
    }
    if let Some(st) = s.store.delete(&rt, &id).await? {
        audit(&s, &a, "delete", &[&st]);
        let mut r = StatusCode::NO_CONTENT.into_response();
        r.headers_mut().insert(header::ETAG, etag(st.version));
        return Ok(r);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// How many resources one conditional delete may remove.
const MAX_CONDITIONAL_DELETE: usize = 1000;

/// `DELETE Type?criteria`: every match is deleted in one transaction (at most 1,000).
async fn conditional_delete(
    State(s): St,
    a: Auth,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    let pairs = query_pairs(query.as_deref());
    let ids = s
        .store
        .search_ids(&rt, &criteria(&pairs, "conditional delete")?)
        .await?;
    if ids.len() > MAX_CONDITIONAL_DELETE {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "too-costly",
            "conditional delete",
            &format!("条件に合う資源が {} 件あり、一度に削除できる上限 {MAX_CONDITIONAL_DELETE} を超えます", ids.len()),
            &format!("the condition matches {} resources, more than the {MAX_CONDITIONAL_DELETE} one request may delete", ids.len()),
        ));
    }
    if s.share.is_some() {
        for id in &ids {
            if let Ok(Some(cur)) = s.store.read(&rt, id).await {
                if let Some(r) = &cur.resource {
                    share::may_write(&s, &a, r)?;
                }
            }
        }
    }
    let ops = ids
        .into_iter()
        .map(|id| WriteOp::Delete {
            resource_type: rt.clone(),
            id,
        })
        .collect();
    let done = s.store.transaction(ops).await?;
    let deleted: Vec<&Stored> = done.iter().filter(|d| d.deleted).collect();
    audit(&s, &a, "delete", &deleted);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Applies an RFC 6902 JSON Patch to the current version and stores the result as the next version
/// (refused with 409/412 if someone else wrote in between).
async fn apply_patch(
    s: &AppState,
    a: &Auth,
    rt: &str,
    id: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json-patch+json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            "Content-Type",
            "PATCH は application/json-patch+json を受け付けます",
            "PATCH accepts application/json-patch+json",
        ));
    }
    let patch: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            "",
            &format!("JSON Patch が不正です: {e}"),
            &format!("invalid JSON Patch: {e}"),
        )
    })?;
    let Some(current) = s.store.read(rt, id).await? else {
        return Err(not_found(rt, id));
    };
    let expected = if_match(headers)?.unwrap_or(current.version);
    let mut doc = current.resource.clone().unwrap_or(Value::Null);
    json_patch::patch(&mut doc, &patch).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            "",
            &format!("JSON Patch を適用できません: {e}"),
            &format!("the JSON Patch does not apply: {e}"),
        )
    })?;
    if doc.get("resourceType").and_then(Value::as_str) != Some(rt)
        || doc.get("id").and_then(Value::as_str) != Some(id)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            &format!("{rt}.id"),
            "resourceType と id は変更できません",
            "a patch may not change resourceType or id",
        ));
    }
    store_update(s, a, doc, Some(expected), headers).await
}

async fn patch(
    State(s): St,
    a: Auth,
    Path((rt, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    apply_patch(&s, &a, &rt, &id, &headers, &body).await
}

async fn conditional_patch(
    State(s): St,
    a: Auth,
    Path(rt): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    let pairs = query_pairs(query.as_deref());
    match resolve_condition(&s, &rt, &pairs, "conditional patch").await? {
        Some(id) => apply_patch(&s, &a, &rt, &id, &headers, &body).await,
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "conditional patch",
            "条件に合う資源がありません",
            "no resource matches the condition",
        )),
    }
}

pub(crate) fn bundle(
    kind: &str,
    total: Option<i64>,
    entries: Vec<Value>,
    links: Vec<(&str, String)>,
) -> Value {
    let mut b = kizuna_fhir::object([
        ("resourceType", json!("Bundle")),
        ("type", json!(kind)),
        (
            "link",
            Value::Array(
                links
                    .into_iter()
                    .map(|(r, u)| json!({"relation": r, "url": u}))
                    .collect(),
            ),
        ),
        ("entry", Value::Array(entries)),
    ]);
    if let Some(t) = total {
        b["total"] = json!(t);
    }
    b
}

/// A searchset answer as a response.
pub(crate) async fn do_search(
    s: &AppState,
    a: &Auth,
    rt: &str,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let set = searchset(s, a, rt, pairs, headers, true).await?;
    Ok(prepared_json(set))
}

/// The top-level elements the access policy and the audit read from a search match
/// (`share::may_read`, `person_of`); a page without `_summary`/`_elements` parses only these and
/// writes each match out as stored.
const POLICY_OUTLINE: &[&str] = &[
    "resourceType",
    "id",
    "meta",
    "subject",
    "patient",
    "beneficiary",
];

/// A searchset: matches, includes, paging links (the query repeated with a new `_offset`,
/// `_summary` and `_elements` kept so every page has the same shape).
pub(crate) async fn search_bundle(
    s: &AppState,
    a: &Auth,
    rt: &str,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<Value, ApiError> {
    searchset(s, a, rt, pairs, headers, false)
        .await?
        .into_value()
        .map_err(unserialisable)
}

/// A prepared Bundle as a 200 response, stored resources copied in as they are.
pub(crate) fn prepared_json(b: PreparedBundle) -> Response {
    match b.into_bytes() {
        Ok(bytes) => crate::fhir_bytes(StatusCode::OK, bytes),
        Err(e) => unserialisable(e).into_response(),
    }
}

/// A stored resource or an answer's Bundle JSON could not be read or written: a fault of the
/// server (searches, `$summary`, `$my-record`).
pub(crate) fn unserialisable(e: serde_json::Error) -> ApiError {
    tracing::error!(error = %e, "answer JSON");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "exception",
        "",
        "応答を JSON にできません",
        "the answer could not be written as JSON",
    )
}

/// Runs a search and shapes its page; `outline` lets matches be written out as stored when no
/// `_summary`/`_elements` changes them.
async fn searchset(
    s: &AppState,
    a: &Auth,
    rt: &str,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
    outline: bool,
) -> Result<PreparedBundle, ApiError> {
    check_type(s, rt)?;
    let summary_count = pairs.iter().any(|(k, v)| k == "_summary" && v == "count");
    let mut q = SearchQuery::from_pairs(&pairs);
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    q.strict = !prefer.contains("handling=lenient");
    if summary_count {
        q.count = 0;
    }
    q.count = q.count.min(1000);
    let view = view_of(&pairs)?;
    if outline && view == SubsetView::Full {
        q.outline = Some(POLICY_OUTLINE);
    }
    let mut result = s.store.search(rt, &q).await?;
    // Shared items only as the access policy allows; a filtered page cannot claim the total.
    let before = result.resources.len();
    result.resources.retain(|st| {
        st.resource
            .as_ref()
            .is_none_or(|r| share::may_read(s, a, r))
    });
    result.included.retain(|st| {
        st.resource
            .as_ref()
            .is_none_or(|r| share::may_read(s, a, r))
    });
    if result.resources.len() != before || share::hides_totals(s, a, rt) {
        result.total = None;
    }
    let stored: Vec<&Stored> = result
        .resources
        .iter()
        .chain(result.included.iter())
        .collect();
    audit(s, a, "search", &stored);
    let entry = |st: Stored, mode: &'static str| {
        let url = format!("{}/{}/{}", s.base_url, st.resource_type, st.id);
        let resource = match st.text {
            Some(t) => EntryResource::Text(t),
            None => EntryResource::Tree(apply_view(s, &view, st).resource.unwrap_or(Value::Null)),
        };
        PreparedEntry {
            full_url: Some(url),
            resource,
            search_mode: Some(mode),
        }
    };
    let mut entries = Vec::new();
    let page_len = result.resources.len() as i64;
    for st in result.resources {
        entries.push(entry(st, "match"));
    }
    for st in result.included {
        entries.push(entry(st, "include"));
    }
    let page = |offset: i64| {
        let mut enc = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs.iter().filter(|(k, _)| k != "_offset") {
            enc.append_pair(k, v);
        }
        enc.append_pair("_offset", &offset.to_string());
        format!("{}/{}?{}", s.base_url, rt, enc.finish())
    };
    let mut links = vec![("self", page(q.offset))];
    let more = match result.total {
        Some(t) => q.offset + q.count < t,
        None => page_len == q.count,
    };
    if q.count > 0 && more {
        links.push(("next", page(q.offset + q.count)));
    }
    if q.offset > 0 && q.count > 0 {
        links.push(("previous", page((q.offset - q.count).max(0))));
    }
    let head = bundle("searchset", result.total, Vec::new(), links);
    if !result.ignored.is_empty() || result.reindexing {
        let mut issues: Vec<_> = result
            .ignored
            .iter()
            .map(|p| {
                kizuna_fhir::outcome::Issue::new(
                    Severity::Warning,
                    "not-supported",
                    p,
                    format!("検索パラメータ {p} は無視されました"),
                    format!("search parameter {p} was ignored"),
                )
            })
            .collect();
        if result.reindexing {
            // After an upgrade the store rebuilds some types' index rows in the background.
            issues.push(kizuna_fhir::outcome::Issue::new(
                Severity::Warning,
                "incomplete",
                rt,
                "検索索引を再構築中のため、一致するリソースが欠けている可能性があります"
                    .to_string(),
                "the search index is being rebuilt after an upgrade: matches may be missing"
                    .to_string(),
            ));
        }
        let oo = kizuna_fhir::outcome::OperationOutcome { issues };
        entries.push(PreparedEntry {
            full_url: None,
            resource: EntryResource::Tree(oo.to_fhir()),
            search_mode: Some("outcome"),
        });
    }
    Ok(PreparedBundle { head, entries })
}

async fn search_get(
    State(s): St,
    a: Auth,
    Path(rt): Path<String>,
    Query(pairs): Pairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    do_search(&s, &a, &rt, pairs, &headers).await
}

async fn search_post(
    State(s): St,
    a: Auth,
    Path(rt): Path<String>,
    Query(mut pairs): Pairs,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    pairs.extend(form_urlencoded::parse(&body).map(|(k, v)| (k.into_owned(), v.into_owned())));
    do_search(&s, &a, &rt, pairs, &headers).await
}

fn history_bundle(s: &AppState, items: &[Stored]) -> Value {
    let entries: Vec<Value> = items
        .iter()
        .map(|st| {
            let url = format!("{}/{}/{}", s.base_url, st.resource_type, st.id);
            let mut e = json!({"fullUrl": url, "request": {"method": if st.deleted { "DELETE" } else if st.version == 1 { "POST" } else { "PUT" }, "url": format!("{}/{}", st.resource_type, st.id)}, "response": {"status": "200", "etag": format!("W/\"{}\"", st.version), "lastModified": st.last_updated}});
            if let Some(r) = &st.resource {
                e["resource"] = r.clone();
            }
            e
        })
        .collect();
    bundle("history", Some(items.len() as i64), entries, vec![])
}

/// An instant parameter (`_since`) as epoch milliseconds; anything else is a 400 naming it.
pub(crate) fn parse_instant(param: &str, v: &str) -> Result<i64, ApiError> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "value",
                param,
                &format!("{param} は instant (例 2026-01-01T00:00:00Z) です"),
                &format!("{param} must be an instant (e.g. 2026-01-01T00:00:00Z)"),
            )
        })
}

fn history_params(pairs: &[(String, String)]) -> Result<(Option<i64>, i64), ApiError> {
    let mut since = None;
    let mut count = 100;
    for (k, v) in pairs {
        match k.as_str() {
            "_since" => since = Some(parse_instant("_since", v)?),
            "_count" => {
                count = v.parse().map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "value",
                        "_count",
                        "_count は整数です",
                        "_count must be an integer",
                    )
                })?
            }
            _ => {}
        }
    }
    Ok((since, count.clamp(1, 1000)))
}

async fn history_instance(
    State(s): St,
    a: Auth,
    Path((rt, id)): Path<(String, String)>,
    Query(p): Pairs,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    let (since, count) = history_params(&p)?;
    let mut items = s.store.history(Some(&rt), Some(&id), since, count).await?;
    items.retain(|st| {
        st.resource
            .as_ref()
            .is_none_or(|r| share::may_read(&s, &a, r))
    });
    audit(&s, &a, "history", &items.iter().collect::<Vec<_>>());
    Ok(fhir_json(StatusCode::OK, &history_bundle(&s, &items)))
}

async fn history_type(
    State(s): St,
    a: Auth,
    Path(rt): Path<String>,
    Query(p): Pairs,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    let (since, count) = history_params(&p)?;
    let mut items = s.store.history(Some(&rt), None, since, count).await?;
    items.retain(|st| {
        st.resource
            .as_ref()
            .is_none_or(|r| share::may_read(&s, &a, r))
    });
    audit(&s, &a, "history", &items.iter().collect::<Vec<_>>());
    Ok(fhir_json(StatusCode::OK, &history_bundle(&s, &items)))
}

async fn history_system(State(s): St, a: Auth, Query(p): Pairs) -> Result<Response, ApiError> {
    let (since, count) = history_params(&p)?;
    let mut items = s.store.history(None, None, since, count).await?;
    items.retain(|st| {
        st.resource
            .as_ref()
            .is_none_or(|r| share::may_read(&s, &a, r))
    });
    audit(&s, &a, "history", &items.iter().collect::<Vec<_>>());
    Ok(fhir_json(StatusCode::OK, &history_bundle(&s, &items)))
}
