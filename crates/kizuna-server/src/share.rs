//! The sharing service's operations on `/fhir` (see `kizuna_share::operations` for their
//! definitions), and the gate every plain FHIR read of a shared item passes: the one policy decides,
//! and the decision is audited.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::Extension;
use kizuna_auth::{Principal, Role};
use kizuna_fhir::outcome::{Issue, OperationOutcome, Severity};
use kizuna_share::item::ItemFacts;
use kizuna_share::policy::{AccessContext, Request};
use kizuna_share::{ConsentCategory, MemberId, ShareError, ShareService, MEMBER_ID_SYSTEM};
use serde_json::{json, Value};

use crate::fhir::{parse_body, prepared_json, query_pairs, Auth};
use crate::{fhir_json, ApiError, AppState};

impl From<ShareError> for ApiError {
    fn from(e: ShareError) -> ApiError {
        match e {
            ShareError::Invalid { path, ja, en } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid", &path, &ja, &en)
            }
            ShareError::Validation(oo) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                outcome: oo,
            },
            ShareError::Denied(rule) => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "",
                &format!("アクセス方針により拒否されました (規則 {rule})"),
                &format!("refused by the access policy (rule {rule})"),
            ),
            ShareError::NotFound(what) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "",
                &format!("{what} はありません"),
                &format!("{what} not found"),
            ),
            ShareError::UnknownMember => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "not-found",
                "Patient.identifier",
                "被保険者番号が資格情報にありません (資格確認を先に)",
                "the insured-person identifier is not in the eligibility records",
            ),
            ShareError::TooLarge(n) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-costly",
                "",
                &format!("送信は {n} バイトまでです"),
                &format!("a submission may be at most {n} bytes"),
            ),
            ShareError::Store(e) => ApiError::from(e),
        }
    }
}

fn service(s: &AppState) -> Result<&Arc<ShareService>, ApiError> {
    s.share.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            "",
            "共有サービスは無効です",
            "the sharing service is not enabled on this server",
        )
    })
}

fn principal(a: &Auth) -> Result<&Principal, ApiError> {
    match a {
        Some(Extension(auth)) => Ok(&auth.principal),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "login",
            "",
            "この操作にはトークンが必要です",
            "this operation needs a bearer token",
        )),
    }
}

fn parameters(parts: Vec<Value>) -> Value {
    json!({"resourceType": "Parameters", "parameter": parts})
}

fn part(name: &str, value: Value) -> Value {
    match value {
        Value::String(s) => json!({"name": name, "valueString": s}),
        Value::Number(n) => json!({"name": name, "valueInteger": n}),
        Value::Bool(b) => json!({"name": name, "valueBoolean": b}),
        Value::Null => json!({"name": name}),
        other => json!({"name": name, "part": object_parts(&other)}),
    }
}

fn object_parts(v: &Value) -> Vec<Value> {
    match v {
        Value::Object(o) => o.iter().map(|(k, x)| part(k, x.clone())).collect(),
        Value::Array(a) => a.iter().map(|x| part("item", x.clone())).collect(),
        other => vec![part("value", other.clone())],
    }
}

/// A serialisable answer as Parameters (one part per field).
fn as_parameters<T: serde::Serialize>(v: &T) -> Value {
    parameters(object_parts(
        &serde_json::to_value(v).unwrap_or(Value::Null),
    ))
}

/// A list answer as Parameters, one `item` part per element.
fn list_parameters<T: serde::Serialize>(items: &[T]) -> Value {
    parameters(
        items
            .iter()
            .map(|i| part("item", serde_json::to_value(i).unwrap_or(Value::Null)))
            .collect(),
    )
}

/// Values of a named parameter, from the query string or a Parameters body.
/// The first value of a query parameter.
fn param<'q>(query: &'q [(String, String)], name: &str) -> Option<&'q str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn param_values(query: &[(String, String)], body: Option<&Value>, name: &str) -> Vec<String> {
    let mut out: Vec<String> = query
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .collect();
    if let Some(b) =
        body.filter(|b| b.get("resourceType").and_then(Value::as_str) == Some("Parameters"))
    {
        for p in b
            .get("parameter")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if p.get("name").and_then(Value::as_str) == Some(name) {
                for k in ["valueCode", "valueString", "valueDateTime", "valueInstant"] {
                    if let Some(v) = p.get(k).and_then(Value::as_str) {
                        out.push(v.to_string());
                    }
                }
            }
        }
    }
    out
}

fn body_json(body: &Bytes) -> Option<Value> {
    if body.is_empty() {
        None
    } else {
        serde_json::from_slice(body).ok()
    }
}

/// Type-level operations of the sharing service (`/fhir/{type}/${op}`); `None` when the operation
/// is not one of them. Bodies may be JSON or XML.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn type_operation(
    s: &AppState,
    a: &Auth,
    method: &Method,
    rt: &str,
    op: &str,
    query: Option<&str>,
    body: &Bytes,
    headers: &HeaderMap,
) -> Option<Result<Response, ApiError>> {
    let q = query_pairs(query);
    let known = matches!(
        (rt, op),
        (
            "Bundle",
            "submit" | "withdraw" | "referral-inbox" | "checkup-reports"
        ) | ("Patient", "summary" | "my-record" | "access-history")
            | ("Coverage", "import-eligibility")
    );
    if !known {
        return None;
    }
    Some(
        async {
            let svc = service(s)?;
            let p = principal(a)?;
            match (method.clone(), rt, op) {
                (Method::POST, "Bundle", "submit") => {
                    let dest = param(&q, "destination");
                    // An XML submission is read into JSON first; the size limit applies to what
                    // was sent.
                    let xml = headers
                        .get(axum::http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|c| c.contains("xml"));
                    let r = if xml && body.len() <= svc.config().max_submission_bytes {
                        let v = parse_body(headers, body, s)?;
                        svc.submit(p, &serde_json::to_vec(&v).unwrap_or_default(), dest)
                            .await?
                    } else {
                        svc.submit(p, body, dest).await?
                    };
                    let mut resp = fhir_json(StatusCode::OK, &as_parameters(&r));
                    resp.headers_mut().insert(
                        axum::http::header::HeaderName::from_static("x-kizuna-person"),
                        axum::http::HeaderValue::from_str(&r.person)
                            .unwrap_or(axum::http::HeaderValue::from_static("")),
                    );
                    Ok(resp)
                }
                (Method::POST, "Bundle", "withdraw") => {
                    let b = body_json(body);
                    let id = param_values(&q, b.as_ref(), "identifier")
                        .into_iter()
                        .next()
                        .ok_or_else(|| {
                            ApiError::new(
                                StatusCode::BAD_REQUEST,
                                "required",
                                "identifier",
                                "identifier が必要です",
                                "identifier is required",
                            )
                        })?;
                    let n = svc.withdraw(p, &id).await?;
                    Ok(fhir_json(
                        StatusCode::OK,
                        &OperationOutcome::single(Issue::new(
                            Severity::Information,
                            "informational",
                            "",
                            format!("{n} 件を削除しました"),
                            format!("{n} resources deleted"),
                        ))
                        .to_fhir(),
                    ))
                }
                (Method::GET, "Bundle", "referral-inbox") => Ok(fhir_json(
                    StatusCode::OK,
                    &list_parameters(&svc.referral_inbox(p).await?),
                )),
                (Method::GET, "Bundle", "checkup-reports") => Ok(fhir_json(
                    StatusCode::OK,
                    &list_parameters(&svc.checkup_reports(p).await?),
                )),
                (Method::GET, "Patient", "summary") => {
                    let member = param(&q, "identifier").ok_or_else(|| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "required",
                            "identifier",
                            "identifier (被保険者番号) が必要です",
                            "identifier (the insured-person identifier) is required",
                        )
                    })?;
                    let text = member
                        .strip_prefix(&format!("{MEMBER_ID_SYSTEM}|"))
                        .unwrap_or(member);
                    let m = MemberId::parse(text).map_err(|e| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "value",
                            "identifier",
                            &e.to_string(),
                            &e.to_string(),
                        )
                    })?;
                    let person = svc
                        .resolve_member(&m)
                        .await?
                        .ok_or(ShareError::UnknownMember)?;
                    let emergency = param(&q, "emergency-reason").map(str::to_string);
                    Ok(prepared_json(
                        svc.clinician_summary_prepared(p, &person, emergency)
                            .await?,
                    ))
                }
                (Method::GET, "Patient", "my-record") => {
                    Ok(prepared_json(svc.patient_record_prepared(p).await?))
                }
                (Method::GET, "Patient", "access-history") => Ok(fhir_json(
                    StatusCode::OK,
                    &list_parameters(&svc.access_history(p).await?),
                )),
                (Method::POST, "Coverage", "import-eligibility") => {
                    let b = parse_body(headers, body, s)?;
                    let (records, demo) = kizuna_share::person::read_eligibility(&b)?;
                    let r = svc.import_eligibility(p, records, demo).await?;
                    Ok(fhir_json(StatusCode::OK, &as_parameters(&r)))
                }
                _ => Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "not-supported",
                    op,
                    &format!("${op} にこのメソッドは使えません"),
                    &format!("${op} does not take this method"),
                )),
            }
        }
        .await,
    )
}

/// Instance-level operations of the sharing service (`/fhir/{type}/{id}/${op}`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn instance_operation(
    s: &AppState,
    a: &Auth,
    method: &Method,
    rt: &str,
    id: &str,
    op: &str,
    query: Option<&str>,
    body: &Bytes,
) -> Option<Result<Response, ApiError>> {
    let known = matches!(
        (rt, op),
        ("Patient", "summary" | "consent" | "identifiers")
            | ("Consent", "revoke")
            | ("Bundle", "acknowledge")
    );
    if !known {
        return None;
    }
    let q = query_pairs(query);
    Some(
        async {
            let svc = service(s)?;
            let p = principal(a)?;
            match (method.clone(), rt, op) {
                (Method::GET, "Patient", "summary") => {
                    let emergency = param(&q, "emergency-reason").map(str::to_string);
                    Ok(prepared_json(
                        svc.clinician_summary_prepared(p, id, emergency).await?,
                    ))
                }
                (Method::POST, "Patient", "consent") => {
                    let b = body_json(body);
                    let mut categories = Vec::new();
                    for c in param_values(&q, b.as_ref(), "category") {
                        categories.push(ConsentCategory::from_code(&c).ok_or_else(|| {
                            ApiError::new(
                                StatusCode::BAD_REQUEST,
                                "code-invalid",
                                "category",
                                &format!("同意区分 {c} は diagnosis か care です"),
                                &format!("consent category {c} must be diagnosis or care"),
                            )
                        })?);
                    }
                    let until = match param_values(&q, b.as_ref(), "until").into_iter().next() {
                        Some(u) => Some(
                            chrono::DateTime::parse_from_rfc3339(&u)
                                .map_err(|_| {
                                    ApiError::new(
                                        StatusCode::BAD_REQUEST,
                                        "value",
                                        "until",
                                        "until は日時です",
                                        "until must be a dateTime",
                                    )
                                })?
                                .with_timezone(&chrono::Utc),
                        ),
                        None => None,
                    };
                    let institution = match (p.role, &p.institution) {
                        (_, Some(i)) => i.as_str().to_string(),
                        (Role::Patient, None) => param_values(&q, b.as_ref(), "institution")
                            .into_iter()
                            .next()
                            .unwrap_or_default(),
                        _ => String::new(),
                    };
                    let c = svc
                        .record_consent(
                            p,
                            &kizuna_share::consent::ConsentRequest {
                                person: id.to_string(),
                                institution,
                                categories,
                                until,
                            },
                        )
                        .await?;
                    Ok(fhir_json(StatusCode::CREATED, &c))
                }
                (Method::GET, "Patient", "identifiers") => {
                    // The history of identifiers is the person's own data: the patient, the
                    // operator, or an institution the patient consented to.
                    let allowed = match p.role {
                        Role::Patient => p.person.as_deref() == Some(id),
                        Role::Operator => true,
                        Role::Institution | Role::Clinician => {
                            let inst = p.institution.as_ref().map(|i| i.as_str()).unwrap_or("");
                            !svc.consents_in_force(id, inst).await?.is_empty()
                        }
                        _ => false,
                    };
                    if !allowed {
                        return Err(ShareError::Denied("identifiers-not-permitted").into());
                    }
                    Ok(fhir_json(
                        StatusCode::OK,
                        &list_parameters(&svc.identifiers_of(id).await?),
                    ))
                }
                (Method::POST, "Consent", "revoke") => {
                    Ok(fhir_json(StatusCode::OK, &svc.revoke_consent(p, id).await?))
                }
                (Method::POST, "Bundle", "acknowledge") => Ok(fhir_json(
                    StatusCode::OK,
                    &as_parameters(&svc.acknowledge(p, id).await?),
                )),
                _ => Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "not-supported",
                    op,
                    &format!("${op} にこのメソッドは使えません"),
                    &format!("${op} does not take this method"),
                )),
            }
        }
        .await,
    )
}

/// `POST /fhir/$retention-run`.
pub(crate) async fn retention_run(s: &AppState, a: &Auth) -> Result<Response, ApiError> {
    let svc = service(s)?;
    let p = principal(a)?;
    Ok(fhir_json(
        StatusCode::OK,
        &as_parameters(&svc.run_retention(p).await?),
    ))
}

/// The gate of plain FHIR reads: a shared item is shown only when the policy allows it (with no
/// consent in view: plain reads serve the operator and the item's own institution and person;
/// other institutions go through `$summary`). Non-items pass. The decision is audited.
pub(crate) fn may_read(s: &AppState, a: &Auth, r: &Value) -> bool {
    let (Some(svc), Some(Extension(auth))) = (&s.share, a) else {
        return true;
    };
    let Some(f) = ItemFacts::of(r) else {
        return true;
    };
    let d = svc.check(
        &auth.principal,
        &Request::Read(&f),
        &AccessContext::default(),
        "read",
        kizuna_share::item_target(
            r.get("resourceType").and_then(Value::as_str).unwrap_or(""),
            r.get("id").and_then(Value::as_str).unwrap_or(""),
            &f.person,
        ),
    );
    d.allowed
}

/// The gate of plain FHIR writes: shared items change only through `$submit`, `$withdraw`,
/// `$acknowledge` and retention — or by the operator.
pub(crate) fn may_write(s: &AppState, a: &Auth, r: &Value) -> Result<(), ApiError> {
    let (Some(_), Some(Extension(auth))) = (&s.share, a) else {
        return Ok(());
    };
    if ItemFacts::of(r).is_some() && auth.principal.role != Role::Operator {
        return Err(ShareError::Denied("items-change-through-submit").into());
    }
    Ok(())
}

/// Whether a search's total must be left out: counting shared items the caller may not see (say,
/// `Condition?_tag=…person…&_summary=count` without consent) would tell what the policy hides.
/// Only the operator gets totals over the item types.
pub(crate) fn hides_totals(s: &AppState, a: &Auth, rt: &str) -> bool {
    s.share.is_some()
        && kizuna_share::submit::ITEM_TYPES.contains(&rt)
        && !matches!(a, Some(Extension(auth)) if auth.principal.role == Role::Operator)
}
