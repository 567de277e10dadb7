//! `/fhir` handlers.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use kizuna_audit::{Actor, ActorKind, NewEntry, Outcome, Purpose, Target};
use kizuna_auth::http::Authorized;
use kizuna_fhir::outcome::Severity;
use kizuna_fhir::subset::SubsetView;
use kizuna_store::{SearchQuery, Stored, WriteOp};
use serde_json::{json, Value};

use crate::{fhir_json, ApiError, AppState, ValidationMode};

type St = State<Arc<AppState>>;
type Auth = Option<Extension<Authorized>>;
type Pairs = Query<Vec<(String, String)>>;

/// The `/fhir` routes (with the auth middleware when configured) and `/healthz`.
pub fn router(state: Arc<AppState>) -> Router {
    let fhir = Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir", axum::routing::post(batch))
        .route("/fhir/_history", get(history_system))
        .route("/fhir/{rt}", get(search_get).post(create))
        .route("/fhir/{rt}/_search", axum::routing::post(search_post))
        .route("/fhir/{rt}/_history", get(history_type))
        .route("/fhir/{rt}/{id}", get(read).put(update).delete(delete))
        .route("/fhir/{rt}/{id}/_history", get(history_instance))
        .route("/fhir/{rt}/{id}/_history/{vid}", get(vread));
    let fhir = match &state.auth {
        Some(a) => fhir.route_layer(axum::middleware::from_fn_with_state(
            a.clone(),
            kizuna_auth::http::require_fhir_auth,
        )),
        None => fhir,
    };
    fhir.route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

fn check_type(s: &AppState, rt: &str) -> Result<(), ApiError> {
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

fn parse_body(headers: &HeaderMap, body: &Bytes, s: &AppState) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.contains("xml") {
        let text = std::str::from_utf8(body).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "structure",
                "",
                "UTF-8 ではありません",
                "body is not UTF-8",
            )
        })?;
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
    serde_json::from_slice(body).map_err(|e| {
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
fn validate(s: &AppState, resource: &Value) -> Result<Option<Value>, ApiError> {
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

fn actor(a: &Auth) -> Actor {
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

fn person_of(r: &Value) -> Option<String> {
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
fn audit(s: &AppState, a: &Auth, action: &str, stored: &[&Stored]) {
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

fn etag(v: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{v}\"")).unwrap_or(HeaderValue::from_static("W/\"0\""))
}

fn with_version_headers(mut r: Response, st: &Stored) -> Response {
    r.headers_mut().insert(header::ETAG, etag(st.version));
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&st.last_updated) {
        if let Ok(v) = HeaderValue::from_str(
            &t.with_timezone(&chrono::Utc)
                .format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string(),
        ) {
            r.headers_mut().insert(header::LAST_MODIFIED, v);
        }
    }
    r
}

fn resource_response(
    s: &AppState,
    status: StatusCode,
    st: &Stored,
    headers: &HeaderMap,
    warnings: Option<Value>,
) -> Response {
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let body = if prefer.contains("return=minimal") {
        None
    } else if prefer.contains("return=OperationOutcome") {
        Some(
            warnings
                .clone()
                .unwrap_or_else(|| kizuna_fhir::outcome::OperationOutcome::default().to_fhir()),
        )
    } else {
        st.resource.clone()
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

async fn metadata(State(s): St) -> Response {
    let reg = s.store.registry();
    let mut types: Vec<&str> = Vec::new();
    for sd in reg.definitions_of("StructureDefinition") {
        if sd.get("kind").and_then(Value::as_str) == Some("resource")
            && sd.get("derivation").and_then(Value::as_str) == Some("specialization")
            && sd.get("abstract").and_then(Value::as_bool) != Some(true)
        {
            if let Some(t) = sd.get("type").and_then(Value::as_str) {
                types.push(t);
            }
        }
    }
    types.sort_unstable();
    types.dedup();
    let interactions: Vec<Value> = [
        "read",
        "vread",
        "update",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ]
    .iter()
    .map(|c| json!({"code": c}))
    .collect();
    let resources: Vec<Value> = types
        .iter()
        .map(|t| {
            let params: Vec<Value> = s
                .store
                .indexer()
                .params(t)
                .map(|p| json!({"name": p.code, "type": format!("{:?}", p.kind).to_lowercase()}))
                .collect();
            let mut includes: Vec<String> = s
                .store
                .indexer()
                .params(t)
                .filter(|p| p.kind == kizuna_store::ParamType::Reference)
                .map(|p| format!("{t}:{}", p.code))
                .collect();
            if !includes.is_empty() {
                includes.push(format!("{t}:*"));
            }
            json!({
                "searchInclude": includes,
                "type": t,
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "interaction": interactions.clone(),
                "searchParam": params
            })
        })
        .collect();
    let cs = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-21",
        "kind": "instance",
        "software": {"name": "kizuna", "version": env!("CARGO_PKG_VERSION")},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/fhir+xml"],
        "rest": [{
            "mode": "server",
            "security": {"cors": false, "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}]},
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            "resource": resources
        }]
    });
    fhir_json(StatusCode::OK, &cs)
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The `_summary`/`_elements` view a request asks for; a bad `_summary` is a 400 naming it.
fn view_of(pairs: &[(String, String)]) -> Result<SubsetView, ApiError> {
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

fn apply_view(s: &AppState, view: &SubsetView, mut st: Stored) -> Stored {
    if *view != SubsetView::Full {
        if let Some(r) = st.resource.as_ref() {
            st.resource = Some(view.apply(s.store.registry().model(), r));
        }
    }
    st
}

async fn read(
    State(s): St,
    a: Auth,
    Path((rt, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    let view = view_of(&query_pairs(query.as_deref()))?;
    match s.store.read(&rt, &id).await? {
        Some(st) => {
            audit(&s, &a, "read", &[&st]);
            let st = apply_view(&s, &view, st);
            Ok(resource_response(&s, StatusCode::OK, &st, &headers, None))
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "",
            &format!("{rt}/{id} はありません"),
            &format!("{rt}/{id} not found"),
        )),
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
fn parse_typed_body(
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

async fn create(
    State(s): St,
    a: Auth,
    Path(rt): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    let resource = parse_typed_body(&headers, &body, &s, &rt)?;
    // Conditional create.
    if let Some(cond) = headers.get("if-none-exist").and_then(|v| v.to_str().ok()) {
        let pairs: Vec<(String, String)> = cond
            .split('&')
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let found = s
            .store
            .search(&rt, &SearchQuery::from_pairs(&pairs))
            .await?;
        match found.total.unwrap_or(found.resources.len() as i64) {
            0 => {}
            1 => {
                let st = &found.resources[0];
                return Ok(resource_response(&s, StatusCode::OK, st, &headers, None));
            }
            _ => {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    "duplicate",
                    "",
                    "条件に合う資源が複数あります",
                    "If-None-Exist matches more than one resource",
                ))
            }
        }
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
    let if_match = match headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        Some(v) => Some(
            v.trim_start_matches("W/")
                .trim_matches('"')
                .parse::<i64>()
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "value",
                        "If-Match",
                        "If-Match が不正です",
                        "malformed If-Match",
                    )
                })?,
        ),
        None => None,
    };
    let warnings = validate(&s, &resource)?;
    let st = s.store.update(resource, if_match).await?;
    audit(&s, &a, "update", &[&st]);
    let status = if st.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(resource_response(&s, status, &st, &headers, warnings))
}

async fn delete(
    State(s): St,
    a: Auth,
    Path((rt, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&s, &rt)?;
    if let Some(st) = s.store.delete(&rt, &id).await? {
        audit(&s, &a, "delete", &[&st]);
        let mut r = StatusCode::NO_CONTENT.into_response();
        r.headers_mut().insert(header::ETAG, etag(st.version));
        return Ok(r);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn bundle(
    s: &AppState,
    kind: &str,
    total: Option<i64>,
    entries: Vec<Value>,
    links: Vec<(&str, String)>,
) -> Value {
    let mut b = json!({"resourceType": "Bundle", "type": kind, "link": links.into_iter().map(|(r, u)| json!({"relation": r, "url": u})).collect::<Vec<_>>(), "entry": entries});
    if let Some(t) = total {
        b["total"] = json!(t);
    }
    let _ = s;
    b
}

async fn do_search(
    s: &AppState,
    a: &Auth,
    rt: &str,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    check_type(s, rt)?;
    let summary_count = pairs.iter().any(|(k, v)| k == "_summary" && v == "count");
    let control = ["_summary", "_format", "_total", "_elements"];
    let query_pairs: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| !control.contains(&k.as_str()))
        .cloned()
        .collect();
    let mut q = SearchQuery::from_pairs(&query_pairs);
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    q.strict = !prefer.contains("handling=lenient");
    if summary_count {
        q.count = 0;
    }
    let view = view_of(&pairs)?;
    let result = s.store.search(rt, &q).await?;
    let stored: Vec<&Stored> = result
        .resources
        .iter()
        .chain(result.included.iter())
        .collect();
    audit(s, a, "search", &stored);
    let entry = |st: Stored, mode: &str| {
        let st = apply_view(s, &view, st);
        json!({"fullUrl": format!("{}/{}/{}", s.base_url, st.resource_type, st.id), "resource": st.resource, "search": {"mode": mode}})
    };
    let mut entries: Vec<Value> = Vec::new();
    let page_len = result.resources.len() as i64;
    for st in result.resources {
        entries.push(entry(st, "match"));
    }
    for st in result.included {
        entries.push(entry(st, "include"));
    }
    // Paging links repeat the query (encoded) with a new _offset; _summary and _elements travel
    // along so every page has the same shape.
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
    let mut b = bundle(s, "searchset", result.total, entries, links);
    if !result.ignored.is_empty() {
        let oo = kizuna_fhir::outcome::OperationOutcome {
            issues: result
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
                .collect(),
        };
        if let Some(e) = b["entry"].as_array_mut() {
            e.push(json!({"resource": oo.to_fhir(), "search": {"mode": "outcome"}}));
        }
    }
    Ok(fhir_json(StatusCode::OK, &b))
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
    let form = std::str::from_utf8(&body).unwrap_or("");
    for kv in form.split('&').filter(|x| !x.is_empty()) {
        if let Some((k, v)) = kv.split_once('=') {
            pairs.push((k.to_string(), v.replace('+', " ")));
        }
    }
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
    bundle(s, "history", Some(items.len() as i64), entries, vec![])
}

fn history_params(pairs: &[(String, String)]) -> Result<(Option<i64>, i64), ApiError> {
    let mut since = None;
    let mut count = 100;
    for (k, v) in pairs {
        match k.as_str() {
            "_since" => {
                let t = chrono::DateTime::parse_from_rfc3339(v).map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "value",
                        "_since",
                        "_since は instant です",
                        "_since must be an instant",
                    )
                })?;
                since = Some(t.timestamp_millis());
            }
            "_count" => count = v.parse().unwrap_or(100),
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
    let items = s.store.history(Some(&rt), Some(&id), since, count).await?;
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
    let items = s.store.history(Some(&rt), None, since, count).await?;
    audit(&s, &a, "history", &items.iter().collect::<Vec<_>>());
    Ok(fhir_json(StatusCode::OK, &history_bundle(&s, &items)))
}

async fn history_system(State(s): St, a: Auth, Query(p): Pairs) -> Result<Response, ApiError> {
    let (since, count) = history_params(&p)?;
    let items = s.store.history(None, None, since, count).await?;
    audit(&s, &a, "history", &items.iter().collect::<Vec<_>>());
    Ok(fhir_json(StatusCode::OK, &history_bundle(&s, &items)))
}

/// `POST /fhir` with a batch or transaction Bundle. A transaction is validated and stored atomically;
/// any failing entry rejects the whole Bundle with the entry's path in the OperationOutcome.
async fn batch(
    State(s): St,
    a: Auth,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b = parse_body(&headers, &body, &s)?;
    let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
    if b.get("resourceType").and_then(Value::as_str) != Some("Bundle")
        || !matches!(kind, "transaction" | "batch")
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "Bundle.type",
            "transaction か batch の Bundle が必要です",
            "expected a transaction or batch Bundle",
        ));
    }
    let entries = b
        .get("entry")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut ops = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let path = format!("Bundle.entry[{i}]");
        let method = e
            .pointer("/request/method")
            .and_then(Value::as_str)
            .unwrap_or("");
        let url = e
            .pointer("/request/url")
            .and_then(Value::as_str)
            .unwrap_or("");
        let res = e.get("resource").cloned();
        let op = match (method, res) {
            ("POST", Some(r)) => {
                if let Err(mut err) = validate(&s, &r) {
                    for issue in &mut err.outcome.issues {
                        issue.expression = format!(
                            "{path}.resource.{}",
                            issue.expression.split_once('.').map(|x| x.1).unwrap_or("")
                        );
                    }
                    return Err(err);
                }
                WriteOp::Create {
                    resource: r,
                    full_url: e.get("fullUrl").and_then(Value::as_str).map(str::to_string),
                }
            }
            ("PUT", Some(mut r)) => {
                let id = url.rsplit('/').next().unwrap_or("").to_string();
                r["id"] = json!(id);
                validate(&s, &r).map_err(|mut err| {
                    for issue in &mut err.outcome.issues {
                        issue.expression = format!(
                            "{path}.resource.{}",
                            issue.expression.split_once('.').map(|x| x.1).unwrap_or("")
                        );
                    }
                    err
                })?;
                WriteOp::Update {
                    resource: r,
                    if_match: None,
                }
            }
            ("DELETE", _) => {
                let mut parts = url.split('/');
                let (Some(t), Some(id)) = (parts.next(), parts.next()) else {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        &format!("{path}.request.url"),
                        "URL が不正です",
                        "malformed request.url",
                    ));
                };
                WriteOp::Delete {
                    resource_type: t.to_string(),
                    id: id.to_string(),
                }
            }
            _ => return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                &format!("{path}.request"),
                "request.method と resource が必要です",
                "each entry needs request.method (POST, PUT, DELETE) and, for POST/PUT, a resource",
            )),
        };
        ops.push(op);
    }
    let stored = if kind == "transaction" {
        s.store.transaction(ops).await?
    } else {
        // Batch: each entry on its own.
        let mut out = Vec::new();
        for op in ops {
            match s.store.transaction(vec![op]).await {
                Ok(mut v) => out.append(&mut v),
                Err(e) => tracing::warn!(error = %e, "batch entry failed"),
            }
        }
        out
    };
    audit(&s, &a, "transaction", &stored.iter().collect::<Vec<_>>());
    let entries: Vec<Value> = stored
        .iter()
        .map(|st| json!({"response": {"status": if st.deleted { "204" } else if st.version == 1 { "201 Created" } else { "200 OK" }, "location": format!("{}/{}/_history/{}", st.resource_type, st.id, st.version), "etag": format!("W/\"{}\"", st.version)}}))
        .collect();
    Ok(fhir_json(
        StatusCode::OK,
        &bundle(&s, &format!("{kind}-response"), None, entries, vec![]),
    ))
}
