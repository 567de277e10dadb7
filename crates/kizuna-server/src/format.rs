//! Content negotiation on `/fhir`: JSON by default, XML when `_format` or `Accept` asks for it
//! (the handlers answer JSON; this layer rewrites the body), `_pretty=true` indents, and a format
//! the server cannot produce is a 406 with an OperationOutcome.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::{ApiError, AppState};

/// The representation a client wants.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    Json,
    Xml,
    Unsupported(String),
}

fn from_format(f: &str) -> Wanted {
    match f.split(';').next().unwrap_or("").trim() {
        "json" | "application/json" | "application/fhir+json" | "application/json+fhir" => {
            Wanted::Json
        }
        "xml"
        | "text/xml"
        | "application/xml"
        | "application/fhir+xml"
        | "application/xml+fhir" => Wanted::Xml,
        other => Wanted::Unsupported(other.to_string()),
    }
}

fn wanted(req: &Request) -> (Wanted, bool) {
    let mut w = None;
    let mut pretty = false;
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "_format" => w = Some(from_format(&v)),
            "_pretty" => pretty = v == "true",
            _ => {}
        }
    }
    if let Some(w) = w {
        return (w, pretty);
    }
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // XML only when it is asked for and JSON is not: browsers and curl send */*.
    let xml = accept.contains("fhir+xml") || accept.contains("application/xml");
    let json = accept.contains("json");
    (
        if xml && !json {
            Wanted::Xml
        } else {
            Wanted::Json
        },
        pretty,
    )
}

/// Answers biggest than this are not rewritten (an export file is streamed, never buffered here).
const MAX_REWRITE: usize = 256 * 1024 * 1024;

/// The middleware.
pub(crate) async fn negotiate(
    State(s): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let (want, pretty) = wanted(&req);
    if let Wanted::Unsupported(f) = &want {
        return ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            "_format",
            &format!("形式 {f} は未対応です (json, xml)"),
            &format!("format {f} is not supported (json, xml)"),
        )
        .into_response();
    }
    let resp = next.run(req).await;
    let is_fhir_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/fhir+json"));
    if !is_fhir_json || (want == Wanted::Json && !pretty) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_REWRITE).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let (text, ct) = if want == Wanted::Xml {
        (
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>{}",
                kizuna_fhir::xml::to_xml(&v, s.store.registry().model())
            ),
            "application/fhir+xml; charset=utf-8",
        )
    } else {
        (
            serde_json::to_string_pretty(&v).unwrap_or_default(),
            "application/fhir+json; charset=utf-8",
        )
    };
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(text))
}
