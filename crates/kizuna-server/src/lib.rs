//! # kizuna-server
//!
//! The HTTP face of kizuna. This crate serves the FHIR R4 REST API under `/fhir` over
//! [`kizuna_store::Store`]: read, vread, create (with `If-None-Exist`), update (with `If-Match`, and
//! conditional), JSON Patch, delete (and conditional), search (GET and POST `_search`) as searchset
//! Bundles with paging links and totals, history, batch and transaction Bundles, `Patient/$everything`,
//! Bulk Data `$export`, JSON or XML (with gzip), and a CapabilityStatement generated from what is
//! implemented. Errors are HTTP 4xx with an OperationOutcome naming the element. Validation on write is
//! configurable per profile; bearer tokens are verified by `kizuna-auth` and every access is written to
//! the audit log.

mod bundle;
mod capability;
mod everything;
pub mod export;
mod fhir;
mod format;
mod reindex;
mod share;

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kizuna_audit::AuditWriter;
use kizuna_auth::http::FhirAuth;
use kizuna_fhir::outcome::{Issue, OperationOutcome, Severity};
use kizuna_fhir::validate::Validator;
use kizuna_store::Store;
use serde_json::Value;

pub use fhir::router;

/// What to do with validation issues on write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationMode {
    /// Store without validating.
    Off,
    /// Validate, store anyway, return the issues.
    Warn,
    /// Refuse with 422 and an OperationOutcome when there are errors; nothing is stored.
    Enforce,
}

/// Validation on write: a default and per-profile overrides (by canonical URL without version).
#[derive(Debug, Clone)]
pub struct ValidationConfig {
    /// For resources claiming no profile with an override.
    pub default: ValidationMode,
    /// Per profile.
    pub per_profile: HashMap<String, ValidationMode>,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            default: ValidationMode::Enforce,
            per_profile: HashMap::new(),
        }
    }
}

impl ValidationConfig {
    /// The strictest mode among the profiles a resource claims, or the default.
    pub fn mode_for(&self, resource: &Value) -> ValidationMode {
        let claimed = resource.pointer("/meta/profile").and_then(Value::as_array);
        let modes: Vec<ValidationMode> = claimed
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|p| {
                self.per_profile
                    .get(p.split('|').next().unwrap_or(p))
                    .copied()
            })
            .collect();
        if modes.is_empty() {
            return self.default;
        }
        if modes.contains(&ValidationMode::Enforce) {
            ValidationMode::Enforce
        } else if modes.contains(&ValidationMode::Warn) {
            ValidationMode::Warn
        } else {
            ValidationMode::Off
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    /// The store.
    pub store: Store,
    /// The validator.
    pub validator: &'static Validator,
    /// Validation on write.
    pub validation: ValidationConfig,
    /// Token verification and scope enforcement; `None` only in tests of the API itself.
    pub auth: Option<Arc<FhirAuth>>,
    /// The audit log.
    pub audit: Option<AuditWriter>,
    /// The public base URL of `/fhir` (for `fullUrl` and paging links).
    pub base_url: String,
    /// Bulk export jobs and their files.
    pub exports: export::ExportJobs,
    /// The largest request body accepted (a transaction Bundle of thousands of entries is large).
    pub max_body_bytes: usize,
    /// The EHR sharing service; when present, its operations are served and every plain read of
    /// a shared item passes its access policy.
    pub share: Option<Arc<kizuna_share::ShareService>>,
}

/// An error answer: status and OperationOutcome.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The outcome.
    pub outcome: OperationOutcome,
}

impl ApiError {
    /// An error with one issue.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        expression: &str,
        ja: &str,
        en: &str,
    ) -> ApiError {
        ApiError {
            status,
            outcome: OperationOutcome::single(Issue::new(
                Severity::Error,
                code,
                expression,
                ja,
                en,
            )),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        fhir_json(self.status, &self.outcome.to_fhir())
    }
}

impl From<kizuna_store::StoreError> for ApiError {
    fn from(e: kizuna_store::StoreError) -> ApiError {
        use kizuna_store::StoreError as E;
        match &e {
            E::VersionConflict { .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "conflict",
                "",
                &e.to_string(),
                &e.to_string(),
            ),
            E::Concurrent => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "",
                &e.to_string(),
                &e.to_string(),
            ),
            E::Gone(_) => ApiError::new(
                StatusCode::GONE,
                "deleted",
                "",
                &e.to_string(),
                &e.to_string(),
            ),
            E::UnknownParameter(p) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "not-supported",
                p,
                &e.to_string(),
                &e.to_string(),
            ),
            E::BadSearchValue { param, .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "value",
                param,
                &e.to_string(),
                &e.to_string(),
            ),
            E::NoResourceType => ApiError::new(
                StatusCode::BAD_REQUEST,
                "structure",
                "resourceType",
                &e.to_string(),
                &e.to_string(),
            ),
            _ => {
                // Internal details stay in the log (no resource bodies there), not in the answer.
                tracing::error!(error = %e, "store failure");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    "",
                    "内部エラー",
                    "internal error",
                )
            }
        }
    }
}

/// A FHIR JSON response.
pub fn fhir_json(status: StatusCode, body: &Value) -> Response {
    // `to_writer` into bytes: `to_string` goes through `fmt::Write`, a third slower on big Bundles.
    let mut bytes = Vec::with_capacity(16 * 1024);
    match serde_json::to_writer(&mut bytes, body) {
        Ok(()) => fhir_bytes(status, bytes),
        Err(e) => {
            tracing::error!(error = %e, "response not serialisable");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// A FHIR JSON response from JSON text already written.
pub fn fhir_bytes(status: StatusCode, bytes: Vec<u8>) -> Response {
    let mut r = (status, bytes).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json; charset=utf-8"),
    );
    r
}
