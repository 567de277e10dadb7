//! `POST /fhir` with a batch or transaction Bundle.
//!
//! A transaction is planned entry by entry (conditional creates, updates, patches and deletes
//! resolved, ids assigned, `fullUrl` and conditional references rewritten, every resource
//! validated), then written in one store transaction: all of it or nothing. Reads (`GET` entries)
//! run after the writes, as the specification orders them. A batch runs each entry on its own and
//! answers each with its own status.

use std::collections::{HashMap, HashSet};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::Extension;
use base64::Engine;
use kizuna_auth::http::{check_scope, classify};
use kizuna_store::{Stored, WriteOp};
use serde_json::{json, Value};

use crate::fhir::{
    audit, parse_body, parse_version, prefer_return, query_pairs, resolve_condition, search_bundle,
    validate, Auth, Return, St,
};
use crate::{fhir_json, ApiError, AppState};

/// One entry of the request Bundle.
struct Entry {
    /// `Bundle.entry[i]`, for error paths.
    path: String,
    method: Method,
    url: String,
    resource: Option<Value>,
    full_url: Option<String>,
    if_none_exist: Option<String>,
    if_match: Option<i64>,
}

/// What an entry will do.
enum Plan {
    /// Create with a new id.
    Create(Value),
    /// A conditional create whose condition matched: nothing written.
    Exists(Stored),
    /// Update (or create at a known id).
    Update(Value, Option<i64>),
    /// Delete these ids (a conditional delete may match several).
    Delete(String, Vec<String>),
    /// A read or search, run after the writes.
    Read(String),
}

fn invalid(path: &str, ja: &str, en: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid", path, ja, en)
}

/// Reads one entry, moving its resource out (bundles can be large: nothing is copied).
fn parse_entry(i: usize, e: &mut Value) -> Result<Entry, ApiError> {
    let path = format!("Bundle.entry[{i}]");
    // Member lookups, not `Value::pointer`: that one allocates two unescaped copies of every
    // step, four times per entry of every transaction.
    let request = |name: &str| e.get("request").and_then(|r| r.get(name));
    let method = request("method").and_then(Value::as_str).unwrap_or("");
    let method = match method {
        "GET" | "HEAD" => Method::GET,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        "DELETE" => Method::DELETE,
        _ => {
            return Err(invalid(
                &format!("{path}.request.method"),
                "request.method は GET, POST, PUT, PATCH, DELETE のいずれかです",
                "request.method must be GET, POST, PUT, PATCH or DELETE",
            ))
        }
    };
    let url = request("url")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim_start_matches('/')
        .to_string();
    if url.is_empty() {
        return Err(invalid(
            &format!("{path}.request.url"),
            "request.url がありません",
            "request.url is missing",
        ));
    }
    let if_none_exist = request("ifNoneExist")
        .and_then(Value::as_str)
        .map(str::to_string);
    // Parsed now, while the entry is borrowed; refused below, after a missing resource.
    let if_match = request("ifMatch")
        .and_then(Value::as_str)
        .map(parse_version);
    let resource = e.get_mut("resource").map(Value::take);
    if matches!(method, Method::POST | Method::PUT | Method::PATCH) && resource.is_none() {
        return Err(invalid(
            &format!("{path}.resource"),
            "POST, PUT, PATCH には resource が必要です",
            "POST, PUT and PATCH entries need a resource",
        ));
    }
    let if_match = if_match
        .map(|v| {
            v.ok_or_else(|| {
                invalid(
                    &format!("{path}.request.ifMatch"),
                    "ifMatch が不正です",
                    "malformed ifMatch",
                )
            })
        })
        .transpose()?;
    Ok(Entry {
        path,
        method,
        url,
        resource,
        full_url: e.get("fullUrl").and_then(Value::as_str).map(str::to_string),
        if_none_exist,
        if_match,
    })
}

/// Splits `Type/id`, `Type?query`, `Type` from an entry URL.
fn split_url(url: &str) -> (String, Option<String>, Option<String>) {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (url, None),
    };
    let mut segs = path.split('/');
    let rt = segs.next().unwrap_or("").to_string();
    let id = segs.next().filter(|s| !s.is_empty()).map(str::to_string);
    (rt, id, query)
}

/// Prefixes the validator's element paths with the entry's path.
fn at_entry(mut err: ApiError, path: &str) -> ApiError {
    for issue in &mut err.outcome.issues {
        let rest = issue.expression.split_once('.').map(|x| x.1).unwrap_or("");
        issue.expression = if rest.is_empty() {
            format!("{path}.resource")
        } else {
            format!("{path}.resource.{rest}")
        };
    }
    err
}

/// The scope check for one entry, as if it were its own request.
fn authorize(a: &Auth, e: &Entry) -> Result<(), ApiError> {
    let Some(Extension(auth)) = a else {
        return Ok(());
    };
    let path = format!("/{}", e.url.split('?').next().unwrap_or(""));
    let Some(req) = classify(&e.method, &path) else {
        return Ok(());
    };
    check_scope(&auth.principal, &req)
        .map(|_| ())
        .map_err(|err| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                &e.path,
                &err.to_string(),
                &err.to_string(),
            )
        })
}

fn patch_of(e: &Entry) -> Result<json_patch::Patch, ApiError> {
    let r = e.resource.as_ref();
    let data = r
        .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("Binary"))
        .and_then(|r| r.get("data"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                &format!("{}.resource", e.path),
                "PATCH の resource は JSON Patch を data に持つ Binary です",
                "a PATCH entry's resource is a Binary holding a JSON Patch in data",
            )
        })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| {
            invalid(
                &format!("{}.resource.data", e.path),
                "base64 ではありません",
                "data is not base64",
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|err| {
        invalid(
            &format!("{}.resource.data", e.path),
            &format!("JSON Patch が不正です: {err}"),
            &format!("invalid JSON Patch: {err}"),
        )
    })
}

/// Resolves the ids of an entry's target, `Type/id` or `Type?criteria`.
async fn target_id(
    s: &AppState,
    e: &Entry,
    rt: &str,
    id: Option<String>,
    query: Option<&str>,
) -> Result<Option<String>, ApiError> {
    match (id, query) {
        (Some(id), _) => Ok(Some(id)),
        (None, Some(q)) => resolve_condition(s, rt, &query_pairs(Some(q)), &e.path).await,
        (None, None) => Err(invalid(
            &format!("{}.request.url", e.path),
            "対象 (Type/id または Type?条件) がありません",
            "the URL names no target (Type/id or Type?criteria)",
        )),
    }
}

/// Plans one entry: conditions resolved against the current state, ids assigned, `fullUrl`
/// recorded in `map` so other entries' references can be rewritten.
async fn plan(
    s: &AppState,
    e: &mut Entry,
    map: &mut HashMap<String, String>,
) -> Result<Plan, ApiError> {
    let (rt, id, query) = split_url(&e.url);
    if e.method != Method::GET {
        crate::fhir::check_type(s, &rt).map_err(|mut err| {
            for i in &mut err.outcome.issues {
                i.expression = format!("{}.request.url", e.path);
            }
            err
        })?;
    }
    let mut record = |id: &str| {
        if let Some(f) = &e.full_url {
            map.insert(f.clone(), format!("{rt}/{id}"));
        }
    };
    let mut typed = || {
        let r = e.resource.take().unwrap_or(Value::Null);
        if r.get("resourceType").and_then(Value::as_str) == Some(rt.as_str()) {
            Ok(r)
        } else {
            Err(invalid(
                &format!("{}.resource.resourceType", e.path),
                "resourceType が request.url と違います",
                "resourceType does not match request.url",
            ))
        }
    };
    Ok(match e.method {
        Method::GET => Plan::Read(e.url.clone()),
        Method::POST => {
            let mut r = typed()?;
            if let Some(cond) = &e.if_none_exist {
                let pairs = query_pairs(Some(cond.trim_start_matches('?')));
                if let Some(found) = resolve_condition(s, &rt, &pairs, &e.path).await? {
                    if let Some(st) = s.store.read(&rt, &found).await? {
                        record(&found);
                        return Ok(Plan::Exists(st));
                    }
                }
            }
            let new = kizuna_store::new_id();
            r["id"] = json!(new);
            record(&new);
            Plan::Create(r)
        }
        Method::PUT => {
            let mut r = typed()?;
            let id = match target_id(s, e, &rt, id, query.as_deref()).await? {
                Some(id) => id,
                None => r
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(kizuna_store::new_id),
            };
            r["id"] = json!(id);
            record(&id);
            Plan::Update(r, e.if_match)
        }
        Method::PATCH => {
            let patch = patch_of(e)?;
            let Some(id) = target_id(s, e, &rt, id, query.as_deref()).await? else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    &format!("{}.request.url", e.path),
                    "PATCH の対象がありません",
                    "nothing to patch",
                ));
            };
            let Some(current) = s.store.read(&rt, &id).await? else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    &format!("{}.request.url", e.path),
                    &format!("{rt}/{id} はありません"),
                    &format!("{rt}/{id} not found"),
                ));
            };
            let mut doc = current.resource.clone().unwrap_or(Value::Null);
            json_patch::patch(&mut doc, &patch).map_err(|err| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "processing",
                    &format!("{}.resource", e.path),
                    &format!("JSON Patch を適用できません: {err}"),
                    &format!("the JSON Patch does not apply: {err}"),
                )
            })?;
            if doc.get("id").and_then(Value::as_str) != Some(id.as_str())
                || doc.get("resourceType").and_then(Value::as_str) != Some(rt.as_str())
            {
                return Err(invalid(
                    &format!("{}.resource", e.path),
                    "resourceType と id は変更できません",
                    "a patch may not change resourceType or id",
                ));
            }
            record(&id);
            Plan::Update(doc, Some(e.if_match.unwrap_or(current.version)))
        }
        _ => {
            let ids = match (id, query) {
                (Some(id), _) => vec![id],
                (None, Some(q)) => {
                    let sq = crate::fhir::criteria(&query_pairs(Some(&q)), &e.path)?;
                    s.store.search_ids(&rt, &sq).await?
                }
                (None, None) => {
                    return Err(invalid(
                        &format!("{}.request.url", e.path),
                        "DELETE の対象がありません",
                        "the DELETE names no target",
                    ))
                }
            };
            Plan::Delete(rt, ids)
        }
    })
}

/// Rewrites references: `fullUrl`s of other entries to their `Type/id`, and conditional
/// references (`Patient?identifier=…`) to the one resource they match.
async fn rewrite_references(
    s: &AppState,
    v: &mut Value,
    map: &HashMap<String, String>,
    cache: &mut HashMap<String, String>,
    path: &str,
) -> Result<(), ApiError> {
    let model = s.store.registry().model();
    let conditional = |r: &str| {
        r.split_once('?')
            .is_some_and(|(rt, _)| model.is_resource(rt))
    };
    let mut pending: Vec<String> = Vec::new();
    replace_refs(v, &mut |r: &mut String| {
        if let Some(to) = map.get(r.as_str()).or_else(|| cache.get(r.as_str())) {
            *r = to.clone();
        } else if conditional(r) && !pending.contains(r) {
            pending.push(r.clone());
        }
    });
    if pending.is_empty() {
        return Ok(());
    }
    let mut resolved = HashMap::new();
    for r in pending {
        let Some((rt, q)) = r.split_once('?') else {
            continue;
        };
        match resolve_condition(s, rt, &query_pairs(Some(q)), path).await? {
            Some(id) => {
                resolved.insert(r.clone(), format!("{rt}/{id}"));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    "not-found",
                    path,
                    &format!("条件付き参照 {r} に合う資源がありません"),
                    &format!("the conditional reference {r} matches nothing"),
                ))
            }
        }
    }
    replace_refs(v, &mut |r: &mut String| {
        if let Some(to) = resolved.get(r.as_str()) {
            *r = to.clone();
        }
    });
    cache.extend(resolved);
    Ok(())
}

/// Calls `f` on every `reference` text in a resource. One walk that compares member names instead
/// of hashing them: it runs over every object of every entry of a transaction.
fn replace_refs(v: &mut Value, f: &mut impl FnMut(&mut String)) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                match x {
                    Value::String(r) if k == "reference" => f(r),
                    Value::Object(_) | Value::Array(_) => replace_refs(x, f),
                    _ => {}
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| replace_refs(x, f)),
        _ => {}
    }
}

fn response_entry(st: &Stored, status: &str, with_resource: bool) -> Value {
    let mut resp = json!({
        "status": status,
        "location": format!("{}/{}/_history/{}", st.resource_type, st.id, st.version),
        "etag": format!("W/\"{}\"", st.version),
    });
    // Only checked, not formatted: one answer per entry of every transaction.
    if chrono::DateTime::parse_from_rfc3339(&st.last_updated).is_ok() {
        resp["lastModified"] = json!(st.last_updated);
    }
    let mut e = json!({"response": resp});
    if with_resource {
        if let Some(r) = &st.resource {
            e["resource"] = r.clone();
        }
    }
    e
}

fn error_entry(err: &ApiError) -> Value {
    json!({"response": {
        "status": format!("{} {}", err.status.as_u16(), err.status.canonical_reason().unwrap_or("")),
        "outcome": err.outcome.to_fhir(),
    }})
}

/// Shared items change only through the sharing service's operations (or by the operator).
async fn gate_write(s: &AppState, a: &Auth, p: &Plan) -> Result<(), ApiError> {
    if s.share.is_none() {
        return Ok(());
    }
    match p {
        Plan::Create(r) => crate::share::may_write(s, a, r),
        Plan::Update(r, _) => {
            crate::share::may_write(s, a, r)?;
            let rt = r["resourceType"].as_str().unwrap_or("");
            let id = r["id"].as_str().unwrap_or("");
            if let Ok(Some(cur)) = s.store.read(rt, id).await {
                if let Some(old) = &cur.resource {
                    crate::share::may_write(s, a, old)?;
                }
            }
            Ok(())
        }
        Plan::Delete(rt, ids) => {
            for id in ids {
                if let Ok(Some(cur)) = s.store.read(rt, id).await {
                    if let Some(old) = &cur.resource {
                        crate::share::may_write(s, a, old)?;
                    }
                }
            }
            Ok(())
        }
        Plan::Exists(_) | Plan::Read(_) => Ok(()),
    }
}

/// Runs a `GET` entry: read, vread or search.
async fn run_read(
    s: &AppState,
    a: &Auth,
    url: &str,
    headers: &HeaderMap,
) -> Result<Value, ApiError> {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let segs: Vec<&str> = path.split('/').filter(|x| !x.is_empty()).collect();
    match segs.as_slice() {
        [rt] => {
            let b = search_bundle(s, a, rt, query_pairs(query), headers).await?;
            Ok(kizuna_fhir::object([
                ("resource", b),
                ("response", json!({"status": "200 OK"})),
            ]))
        }
        [rt, id] => {
            crate::fhir::check_type(s, rt)?;
            match s.store.read(rt, id).await? {
                Some(st)
                    if !st
                        .resource
                        .as_ref()
                        .is_none_or(|r| crate::share::may_read(s, a, r)) =>
                {
                    Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "",
                        "アクセス方針により閲覧できません",
                        "the access policy does not allow reading this resource",
                    ))
                }
                Some(st) => {
                    audit(s, a, "read", &[&st]);
                    Ok(response_entry(&st, "200 OK", true))
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
        [rt, id, "_history", v] => {
            crate::fhir::check_type(s, rt)?;
            let v: i64 = v
                .parse()
                .map_err(|_| invalid("", "版が数値ではありません", "version id is not a number"))?;
            match s.store.vread(rt, id, v).await? {
                Some(st)
                    if !st.deleted
                        && st
                            .resource
                            .as_ref()
                            .is_none_or(|r| crate::share::may_read(s, a, r)) =>
                {
                    audit(s, a, "vread", &[&st]);
                    Ok(response_entry(&st, "200 OK", true))
                }
                _ => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    "",
                    "版がありません",
                    "version not found",
                )),
            }
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "not-supported",
            url,
            "この GET は Bundle では扱えません",
            "this GET is not supported inside a Bundle",
        )),
    }
}

/// `POST /fhir` with a batch or transaction Bundle.
pub(crate) async fn batch(
    State(s): St,
    a: Auth,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut b = parse_body(&headers, &body, &s)?;
    let kind = b
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if b.get("resourceType").and_then(Value::as_str) != Some("Bundle")
        || !matches!(kind.as_str(), "transaction" | "batch")
    {
        return Err(invalid(
            "Bundle.type",
            "transaction か batch の Bundle が必要です",
            "expected a transaction or batch Bundle",
        ));
    }
    let raw = match b.get_mut("entry") {
        Some(Value::Array(a)) => std::mem::take(a),
        _ => Vec::new(),
    };
    let with_resource = prefer_return(&headers) == Return::Representation
        && headers
            .get("prefer")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.contains("return=representation"));
    let out = if kind == "transaction" {
        transaction(&s, &a, raw, &headers, with_resource).await?
    } else {
        run_batch(&s, &a, raw, &headers, with_resource).await
    };
    Ok(fhir_json(
        StatusCode::OK,
        &kizuna_fhir::object([
            ("resourceType", json!("Bundle")),
            ("type", Value::String(format!("{kind}-response"))),
            ("entry", Value::Array(out)),
        ]),
    ))
}

async fn transaction(
    s: &AppState,
    a: &Auth,
    raw: Vec<Value>,
    headers: &HeaderMap,
    with_resource: bool,
) -> Result<Vec<Value>, ApiError> {
    let mut entries = Vec::with_capacity(raw.len());
    for (i, mut e) in raw.into_iter().enumerate() {
        let e = parse_entry(i, &mut e)?;
        authorize(a, &e)?;
        entries.push(e);
    }
    // Plan in the specification's order (DELETE, POST, PUT/PATCH, GET) so a conditional create
    // sees the state before this transaction, and answer in the request's order.
    let rank = |m: &Method| match *m {
        Method::DELETE => 0,
        Method::POST => 1,
        Method::PUT | Method::PATCH => 2,
        _ => 3,
    };
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|i| rank(&entries[*i].method));
    let mut map = HashMap::new();
    let mut plans: Vec<Option<Plan>> = (0..entries.len()).map(|_| None).collect();
    for i in order {
        plans[i] = Some(plan(s, &mut entries[i], &mut map).await?);
    }
    let mut plans: Vec<Plan> = plans.into_iter().flatten().collect();
    // One resource may be the target of one entry only.
    let mut touched = HashSet::new();
    for (p, e) in plans.iter().zip(&entries) {
        let keys: Vec<(String, String)> = match p {
            Plan::Create(r) | Plan::Update(r, _) => vec![(
                r["resourceType"].as_str().unwrap_or("").to_string(),
                r["id"].as_str().unwrap_or("").to_string(),
            )],
            Plan::Delete(rt, ids) => ids.iter().map(|i| (rt.clone(), i.clone())).collect(),
            _ => vec![],
        };
        for k in keys {
            if !touched.insert(k.clone()) {
                return Err(invalid(
                    &e.path,
                    &format!("{}/{} を一つの transaction で二度変更しています", k.0, k.1),
                    &format!(
                        "{}/{} is changed by more than one entry of the transaction",
                        k.0, k.1
                    ),
                ));
            }
        }
    }
    for p in &plans {
        gate_write(s, a, p).await?;
    }
    let mut cache = HashMap::new();
    for (p, e) in plans.iter_mut().zip(&entries) {
        if let Plan::Create(r) | Plan::Update(r, _) = p {
            rewrite_references(s, r, &map, &mut cache, &e.path).await?;
            validate(s, r).map_err(|err| at_entry(err, &e.path))?;
        }
    }
    // The resources move into the writes; the plans keep only what the answers need.
    let mut ops = Vec::new();
    for p in plans.iter_mut() {
        match p {
            Plan::Create(r) => ops.push(WriteOp::CreateWithId { resource: r.take() }),
            Plan::Update(r, m) => ops.push(WriteOp::Update {
                resource: r.take(),
                if_match: *m,
            }),
            Plan::Delete(rt, ids) => ops.extend(ids.iter().map(|id| WriteOp::Delete {
                resource_type: rt.clone(),
                id: id.clone(),
            })),
            Plan::Exists(_) | Plan::Read(_) => {}
        }
    }
    let mut stored = s.store.transaction(ops).await?.into_iter();
    let mut out = Vec::with_capacity(plans.len());
    let mut written: Vec<Stored> = Vec::new();
    for p in &plans {
        out.push(match p {
            Plan::Create(_) => {
                let st = stored.next();
                let e = st
                    .as_ref()
                    .map(|st| response_entry(st, "201 Created", with_resource))
                    .unwrap_or(Value::Null);
                written.extend(st);
                e
            }
            Plan::Update(..) => {
                let st = stored.next();
                let e = st
                    .as_ref()
                    .map(|st| {
                        let status = if st.version == 1 {
                            "201 Created"
                        } else {
                            "200 OK"
                        };
                        response_entry(st, status, with_resource)
                    })
                    .unwrap_or(Value::Null);
                written.extend(st);
                e
            }
            Plan::Delete(_, ids) => {
                for _ in ids {
                    if let Some(st) = stored.next() {
                        if st.deleted {
                            written.push(st);
                        }
                    }
                }
                json!({"response": {"status": "204 No Content"}})
            }
            Plan::Exists(st) => response_entry(st, "200 OK", with_resource),
            Plan::Read(_) => Value::Null,
        });
    }
    audit(s, a, "transaction", &written.iter().collect::<Vec<_>>());
    for (i, p) in plans.iter().enumerate() {
        if let Plan::Read(url) = p {
            out[i] = match run_read(s, a, url, headers).await {
                Ok(v) => v,
                Err(err) => error_entry(&err),
            };
        }
    }
    Ok(out)
}

async fn run_batch(
    s: &AppState,
    a: &Auth,
    raw: Vec<Value>,
    headers: &HeaderMap,
    with_resource: bool,
) -> Vec<Value> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, mut e) in raw.into_iter().enumerate() {
        let one = async {
            let mut e = parse_entry(i, &mut e)?;
            authorize(a, &e)?;
            if e.method == Method::GET {
                return run_read(s, a, &e.url, headers).await;
            }
            let mut map = HashMap::new();
            let mut p = plan(s, &mut e, &mut map).await?;
            gate_write(s, a, &p).await?;
            let mut cache = HashMap::new();
            if let Plan::Create(r) | Plan::Update(r, _) = &mut p {
                rewrite_references(s, r, &HashMap::new(), &mut cache, &e.path).await?;
                validate(s, r).map_err(|err| at_entry(err, &e.path))?;
            }
            let op = match p {
                Plan::Exists(st) => return Ok(response_entry(&st, "200 OK", with_resource)),
                Plan::Create(r) => vec![WriteOp::CreateWithId { resource: r }],
                Plan::Update(r, m) => vec![WriteOp::Update {
                    resource: r,
                    if_match: m,
                }],
                Plan::Delete(rt, ids) => ids
                    .into_iter()
                    .map(|id| WriteOp::Delete {
                        resource_type: rt.clone(),
                        id,
                    })
                    .collect(),
                Plan::Read(url) => return run_read(s, a, &url, headers).await,
            };
            let is_delete = matches!(op.first(), Some(WriteOp::Delete { .. }) | None);
            let done = s.store.transaction(op).await?;
            audit(
                s,
                a,
                "batch",
                &done
                    .iter()
                    .filter(|d| !is_delete || d.deleted)
                    .collect::<Vec<_>>(),
            );
            if is_delete {
                return Ok(json!({"response": {"status": "204 No Content"}}));
            }
            let st = done.into_iter().next().ok_or_else(|| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    "",
                    "内部エラー",
                    "internal error",
                )
            })?;
            let status = if st.version == 1 {
                "201 Created"
            } else {
                "200 OK"
            };
            Ok::<Value, ApiError>(response_entry(&st, status, with_resource))
        };
        out.push(match one.await {
            Ok(v) => v,
            Err(err) => error_entry(&err),
        });
    }
    out
}
