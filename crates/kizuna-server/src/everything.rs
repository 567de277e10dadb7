//! `GET /fhir/Patient/{id}/$everything`: the patient, every resource in their compartment, and the
//! resources those refer to (practitioners, organisations, medications …), paged.

use axum::http::StatusCode;
use axum::response::Response;
use kizuna_store::{Include, Stored};
use serde_json::{json, Value};

use crate::fhir::{audit, bundle, Auth};
use crate::{fhir_json, ApiError, AppState};

/// `$everything` parameters: `_since`, `_type`, `_count`, `_offset`.
struct Params {
    since_ms: Option<i64>,
    types: Option<Vec<String>>,
    count: usize,
    offset: usize,
}

fn params(pairs: &[(String, String)]) -> Result<Params, ApiError> {
    let bad =
        |p: &str, ja: &str, en: &str| ApiError::new(StatusCode::BAD_REQUEST, "value", p, ja, en);
    let mut p = Params {
        since_ms: None,
        types: None,
        count: 100,
        offset: 0,
    };
    for (k, v) in pairs {
        match k.as_str() {
            "_since" => p.since_ms = Some(crate::fhir::parse_instant("_since", v)?),
            "_type" => p.types = Some(v.split(',').map(str::to_string).collect()),
            "_count" => {
                p.count = v
                    .parse::<usize>()
                    .map_err(|_| bad("_count", "_count は整数です", "_count must be an integer"))?
                    .clamp(1, 1000)
            }
            "_offset" => {
                p.offset = v.parse().map_err(|_| {
                    bad(
                        "_offset",
                        "_offset は整数です",
                        "_offset must be an integer",
                    )
                })?
            }
            "start" | "end" => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "not-supported",
                    k,
                    &format!("{k} は未対応です (_since と _type を使ってください)"),
                    &format!("{k} is not supported (use _since and _type)"),
                ))
            }
            _ => {}
        }
    }
    Ok(p)
}

pub(crate) async fn everything(
    s: &AppState,
    a: &Auth,
    rt: &str,
    id: &str,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    let pairs = crate::fhir::query_pairs(query);
    if rt != "Patient" {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            "$everything",
            "$everything は Patient のみです",
            "$everything is supported on Patient only",
        ));
    }
    let p = params(&pairs)?;
    if s.store.read("Patient", id).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "",
            &format!("Patient/{id} はありません"),
            &format!("Patient/{id} not found"),
        ));
    }
    let keys = s
        .store
        .compartment_members(id, p.types.as_deref(), p.since_ms)
        .await?;
    let total = keys.len();
    let page_keys = keys.iter().skip(p.offset).take(p.count);
    let mut by_type: Vec<(&str, Vec<&str>)> = Vec::new();
    for (t, i) in page_keys {
        match by_type.iter_mut().find(|(bt, _)| bt == t) {
            Some((_, v)) => v.push(i),
            None => by_type.push((t, vec![i])),
        }
    }
    let mut page: Vec<Stored> = Vec::new();
    for (t, ids) in &by_type {
        page.extend(s.store.read_many(t, ids).await?);
    }
    // What the page refers to, one level: the practitioners, organisations and medications a
    // reader needs to make sense of it.
    let includes: Vec<Include> = by_type
        .iter()
        .map(|(t, _)| Include {
            source_type: t.to_string(),
            param: "*".into(),
            target_type: None,
            iterate: false,
        })
        .collect();
    let mut referenced = s.store.resolve_includes(&page, &includes, &[]).await?;
    let in_compartment: std::collections::HashSet<(&str, &str)> =
        keys.iter().map(|(t, i)| (t.as_str(), i.as_str())).collect();
    referenced.retain(|r| !in_compartment.contains(&(r.resource_type.as_str(), r.id.as_str())));
    // Shared items only as the access policy allows.
    page.retain(|st| {
        st.resource
            .as_ref()
            .is_none_or(|r| crate::share::may_read(s, a, r))
    });
    referenced.retain(|st| {
        st.resource
            .as_ref()
            .is_none_or(|r| crate::share::may_read(s, a, r))
    });
    audit(
        s,
        a,
        "everything",
        &page.iter().chain(referenced.iter()).collect::<Vec<_>>(),
    );
    let entry = |st: Stored, mode: &str| -> Value {
        kizuna_fhir::object([
            (
                "fullUrl",
                Value::String(format!("{}/{}/{}", s.base_url, st.resource_type, st.id)),
            ),
            ("resource", st.resource.unwrap_or(Value::Null)),
            ("search", json!({ "mode": mode })),
        ])
    };
    let mut entries: Vec<Value> = page.into_iter().map(|st| entry(st, "match")).collect();
    entries.extend(referenced.into_iter().map(|st| entry(st, "include")));
    let link = |offset: usize| {
        let mut enc = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs.iter().filter(|(k, _)| k != "_offset") {
            enc.append_pair(k, v);
        }
        enc.append_pair("_offset", &offset.to_string());
        format!("{}/Patient/{id}/$everything?{}", s.base_url, enc.finish())
    };
    let mut links = vec![("self", link(p.offset))];
    if p.offset + p.count < total {
        links.push(("next", link(p.offset + p.count)));
    }
    if p.offset > 0 {
        links.push(("previous", link(p.offset.saturating_sub(p.count))));
    }
    Ok(fhir_json(
        StatusCode::OK,
        &bundle("searchset", Some(total as i64), entries, links),
    ))
}
