//! `GET /fhir/metadata`: the CapabilityStatement, generated from what the server implements — every
//! resource type of the loaded definitions with its search parameters, includes, the conditional
//! interactions, `$everything` and the Bulk Data `$export` operations.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use crate::fhir::St;
use crate::fhir_json;

/// The operations this server implements, with the canonical OperationDefinitions they follow.
const OPERATIONS: &[(&str, &str, &str)] = &[
    (
        "Patient",
        "everything",
        "http://hl7.org/fhir/OperationDefinition/Patient-everything",
    ),
    (
        "Patient",
        "export",
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
    ),
    (
        "Group",
        "export",
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
    ),
];

pub(crate) async fn metadata(State(s): St) -> Response {
    let types = s.store.registry().model().resource_types();
    let interactions: Vec<Value> = [
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ]
    .iter()
    .map(|c| json!({"code": c}))
    .collect();
    let idx = s.store.indexer();
    let reference_params = |t: &str| -> Vec<String> {
        idx.params(t)
            .filter(|p| p.kind == kizuna_store::ParamType::Reference)
            .map(|p| p.code.clone())
            .collect()
    };
    // Which types refer to which, for searchRevInclude.
    let mut rev: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for t in &types {
        for p in idx
            .params(t)
            .filter(|p| p.kind == kizuna_store::ParamType::Reference)
        {
            for target in &p.targets {
                rev.entry(target.clone())
                    .or_default()
                    .push(format!("{t}:{}", p.code));
            }
        }
    }
    // The sharing service's operations, when it runs.
    let share_ops: Vec<(Option<&str>, &str, String)> = if s.share.is_some() {
        kizuna_share::operations::declared()
    } else {
        Vec::new()
    };
    let resources: Vec<Value> = types
        .iter()
        .map(|t| {
            let params: Vec<Value> = idx
                .params(t)
                .map(|p| json!({"name": p.code, "type": p.kind.name()}))
                .collect();
            let mut includes: Vec<String> = reference_params(t)
                .into_iter()
                .map(|p| format!("{t}:{p}"))
                .collect();
            if !includes.is_empty() {
                includes.push(format!("{t}:*"));
            }
            let mut r = json!({
                "type": t,
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-match",
                "conditionalUpdate": true,
                "conditionalDelete": "multiple",
                "referencePolicy": ["literal", "logical"],
                "searchInclude": includes,
                "searchRevInclude": rev.get(*t).cloned().unwrap_or_default(),
                "interaction": interactions.clone(),
                "searchParam": params
            });
            let ops: Vec<Value> = OPERATIONS
                .iter()
                .filter(|(rt, _, _)| rt == t)
                .map(|(_, name, def)| json!({"name": name, "definition": def}))
                .chain(
                    share_ops
                        .iter()
                        .filter(|(rt, _, _)| *rt == Some(*t))
                        .map(|(_, name, def)| json!({"name": name, "definition": def})),
                )
                .collect();
            if !ops.is_empty() {
                r["operation"] = json!(ops);
            }
            r
        })
        .collect();
    // Bulk export, the operator's `$reindex`, and the sharing service's system operations.
    let system_ops: Vec<Value> = [
        json!({"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}),
        json!({"name": "reindex", "definition": crate::reindex::definition_url()}),
    ]
    .into_iter()
    .chain(
        share_ops
            .iter()
            .filter(|(rt, _, _)| rt.is_none())
            .map(|(_, name, def)| json!({"name": name, "definition": def})),
    )
    .collect();
    let cs = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-29",
        "kind": "instance",
        "software": {"name": "kizuna", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "kizuna FHIR R4 server", "url": s.base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/fhir+xml"],
        "patchFormat": ["application/json-patch+json"],
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "rest": [{
            "mode": "server",
            "security": {"cors": false, "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}]},
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            "searchParam": [
                {"name": "_id", "type": "token"},
                {"name": "_lastUpdated", "type": "date"},
                {"name": "_has", "type": "special"},
                {"name": "_sort", "type": "special"},
                {"name": "_total", "type": "special"},
                {"name": "_summary", "type": "special"},
                {"name": "_elements", "type": "special"}
            ],
            "operation": system_ops,
            "resource": resources
        }]
    });
    fhir_json(StatusCode::OK, &cs)
}
