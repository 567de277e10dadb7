//! FHIR AuditEvent rendering of entries (in the style of IHE Basic Audit Log Patterns), for systems that
//! consume audit trails as FHIR.

use serde_json::{json, Value};

use crate::entry::{ActorKind, Entry, Purpose};

fn purpose_coding(p: &Purpose) -> Value {
    // HL7 v3 PurposeOfUse codes.
    let (code, display) = match p {
        Purpose::Treatment => ("TREAT", "treatment"),
        Purpose::Emergency { .. } => ("ETREAT", "emergency treatment"),
        Purpose::PatientSelfAccess => ("PATRQT", "patient requested"),
        Purpose::Insurer => ("COVERAGE", "coverage under policy or program"),
        Purpose::Research { .. } => ("HRESCH", "healthcare research"),
        Purpose::Operations => ("HOPERAT", "healthcare operations"),
        Purpose::Unknown => ("PURPOSE", "purpose of use"),
    };
    json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": code, "display": display})
}

fn action_code(action: &str) -> &'static str {
    match action {
        "create" => "C",
        "read" | "vread" | "search" | "history" | "access-history" | "export"
        | "emergency-open" => "R",
        "update" | "patch" => "U",
        "delete" => "D",
        _ => "E",
    }
}

/// Renders one entry as a FHIR R4 AuditEvent.
pub fn to_audit_event(e: &Entry) -> Value {
    let n = &e.entry;
    let mut entity = Vec::new();
    if let (Some(t), Some(i)) = (&n.target.resource_type, &n.target.resource_id) {
        entity.push(json!({"what": {"reference": format!("{t}/{i}")}, "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"}}));
    }
    if let Some(p) = &n.target.person {
        entity.push(json!({"what": {"identifier": {"system": "urn:kizuna:person", "value": p}}, "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"}, "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}}));
    }
    if let Purpose::Research { permit } = &n.purpose {
        entity.push(
            json!({"what": {"identifier": {"system": "urn:kizuna:permit", "value": permit}}}),
        );
    }
    let who_kind = match n.actor.kind {
        ActorKind::Institution | ActorKind::System => "110150",
        _ => "110153",
    };
    let mut agent = json!({
        "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": who_kind}]},
        "who": {"identifier": {"value": n.actor.id}},
        "requestor": true,
        "purposeOfUse": [{"coding": [purpose_coding(&n.purpose)]}]
    });
    if let Some(i) = &n.actor.institution {
        agent["who"]["identifier"]["assigner"] = json!({"identifier": {"system": "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no", "value": i}});
    }
    if let Some(src) = &n.source {
        agent["network"] = json!({"address": src, "type": "2"});
    }
    json!({
        "resourceType": "AuditEvent",
        "id": e.seq.to_string(),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": n.action}],
        "action": action_code(&n.action),
        "recorded": n.time,
        "outcome": if n.outcome.allowed { "0" } else { "4" },
        "outcomeDesc": n.outcome.rule,
        "agent": [agent],
        "source": {"observer": {"display": "kizuna"}},
        "entity": entity
    })
}
