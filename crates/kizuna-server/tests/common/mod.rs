//! The test harness for the `/fhir` API: a server on a temporary SQLite store, called in-process.
#![allow(dead_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use kizuna_audit::{AuditLog, AuditWriter, LogOptions};
use kizuna_fhir::validate::Validator;
use kizuna_fhir::Registry;
use kizuna_server::{router, AppState, ValidationConfig};
use kizuna_store::Store;
use serde_json::Value;
use tower::ServiceExt;

/// A server under test.
pub struct T {
    pub app: axum::Router,
    pub audit: AuditWriter,
    pub store: Store,
    pub dir: tempfile::TempDir,
}

pub async fn setup(auth: Option<Arc<kizuna_auth::http::FhirAuth>>) -> T {
    setup_with(auth, false).await
}

/// A server with the sharing service on (its operations, and the policy on shared items).
pub async fn setup_shared(auth: Option<Arc<kizuna_auth::http::FhirAuth>>) -> T {
    setup_with(auth, true).await
}

async fn setup_with(auth: Option<Arc<kizuna_auth::http::FhirAuth>>, share: bool) -> T {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = Store::open(
        &format!("sqlite://{}", dir.path().join("k.db").display()),
        Registry::builtin(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let audit = AuditWriter::spawn(
        AuditLog::open(&dir.path().join("audit"), LogOptions::default())
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let state = Arc::new(AppState {
        store: store.clone(),
        validator: Validator::builtin(),
        validation: ValidationConfig::default(),
        auth,
        audit: Some(audit.clone()),
        base_url: "http://test/fhir".into(),
        exports: kizuna_server::export::ExportJobs::open(&dir.path().join("export"))
            .unwrap_or_else(|e| panic!("{e}")),
        max_body_bytes: 64 << 20,
        share: share.then(|| {
            Arc::new(kizuna_share::ShareService::new(
                store.clone(),
                Validator::builtin(),
                Arc::new(kizuna_share::SystemClock),
                kizuna_share::ShareConfig::default(),
                Some(audit.clone()),
            ))
        }),
    });
    T {
        app: router(state),
        audit,
        store,
        dir,
    }
}

/// One request; the answer's status, headers and raw body.
pub async fn raw(
    t: &T,
    method: &str,
    uri: &str,
    body: Option<(&str, Vec<u8>)>,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = match body {
        Some((ct, bytes)) => b.header("content-type", ct).body(Body::from(bytes)),
        None => b.body(Body::empty()),
    }
    .unwrap_or_default();
    let resp = t
        .app
        .clone()
        .oneshot(req)
        .await
        .unwrap_or_else(|e| match e {});
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes().to_vec())
        .unwrap_or_default();
    (status, headers, bytes)
}

/// One request with a text body; the answer parsed as JSON (`Null` when it is not JSON).
pub async fn call(
    t: &T,
    method: &str,
    uri: &str,
    body: Option<(&str, String)>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value, HeaderMap) {
    let (status, headers, bytes) = raw(
        t,
        method,
        uri,
        body.map(|(ct, s)| (ct, s.into_bytes())),
        headers,
    )
    .await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        headers,
    )
}

pub fn json_body(v: &Value) -> Option<(&'static str, String)> {
    Some(("application/fhir+json", v.to_string()))
}
