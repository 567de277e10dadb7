//! What people see: the clinician's summary of a patient (active conditions, allergies, infections,
//! latest labs with their trend, current prescriptions, documents) and the patient's own view (the
//! six items and check-up reports, minus what they have not been told, plus who looked).
//! Every item shown or withheld is a decision of the policy, and audited.

use std::collections::BTreeMap;

use kizuna_audit::HistoryRequester;
use kizuna_auth::{Principal, Role};
use serde_json::{json, Value};

use crate::item::*;
use crate::policy::{decide, AccessContext, Request};
use crate::{item_target, ShareError, ShareService};

/// The extension on the latest lab result giving its trend against the one before (`up`, `down`,
/// `same`).
pub const EXT_TREND: &str = "urn:kizuna:share:trend";

fn when(r: &Value) -> String {
    for k in [
        "effectiveDateTime",
        "authoredOn",
        "recordedDate",
        "onsetDateTime",
        "issued",
    ] {
        if let Some(s) = r.get(k).and_then(Value::as_str) {
            return s.to_string();
        }
    }
    r.pointer("/effectivePeriod/start")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn code_key(r: &Value) -> String {
    r.pointer("/code/coding/0")
        .map(|c| {
            format!(
                "{}|{}",
                c.get("system").and_then(Value::as_str).unwrap_or(""),
                c.get("code").and_then(Value::as_str).unwrap_or("")
            )
        })
        .unwrap_or_default()
}

fn value_of(r: &Value) -> Option<f64> {
    r.pointer("/valueQuantity/value").and_then(Value::as_f64)
}

fn is_active_condition(r: &Value) -> bool {
    let status = r
        .pointer("/clinicalStatus/coding/0/code")
        .and_then(Value::as_str);
    match status {
        Some(s) => matches!(s, "active" | "recurrence" | "relapse"),
        None => r.get("abatementDateTime").is_none() && r.get("abatementPeriod").is_none(),
    }
}

fn reference(r: &Value) -> Value {
    json!({"reference": format!("{}/{}", r["resourceType"].as_str().unwrap_or(""), r["id"].as_str().unwrap_or(""))})
}

impl ShareService {
    /// Every item of a person (any kind, any flag): what the policy then filters. The five item
    /// types are searched side by side (the store has several readers).
    pub async fn items_of(&self, person: &str) -> Result<Vec<Value>, ShareError> {
        let tag = format!("{TAG_PERSON}|{person}");
        let of = |rt: &'static str| {
            let q = crate::lookup(&[("_tag".into(), tag.clone())]);
            async move { self.store().search(rt, &q).await }
        };
        let [a, b, c, d, e] = crate::submit::ITEM_TYPES;
        let (a, b, c, d, e) = tokio::join!(of(a), of(b), of(c), of(d), of(e));
        let mut out = Vec::new();
        for found in [a?, b?, c?, d?, e?] {
            for st in found.resources {
                if let Some(r) = st.resource {
                    if ItemFacts::of(&r).is_some() {
                        out.push(r);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Decides every item for one request and audits each decision; returns what may be shown.
    fn filter_items(
        &self,
        p: &Principal,
        items: Vec<Value>,
        ctx: &AccessContext,
        action: &str,
    ) -> (Vec<(ItemFacts, Value)>, Vec<&'static str>) {
        let mut shown = Vec::new();
        let mut denied = Vec::new();
        let mut audit = Vec::with_capacity(items.len());
        let time = self.now().to_rfc3339();
        for r in items {
            let Some(f) = ItemFacts::of(&r) else { continue };
            let d = decide(p, &Request::Read(&f), ctx);
            audit.push(crate::decision_entry(
                time.clone(),
                p,
                &d,
                action,
                item_target(
                    r["resourceType"].as_str().unwrap_or(""),
                    r["id"].as_str().unwrap_or(""),
                    &f.person,
                ),
            ));
            if d.allowed {
                shown.push((f, r));
            } else {
                denied.push(d.rule);
            }
        }
        self.audit_batch(audit);
        (shown, denied)
    }

    /// The clinician summary of a person (`Patient/$summary`): a collection Bundle whose first
    /// entry is a Composition with one section per kind. With `emergency`, a physician sees what
    /// consent would otherwise withhold, and the access is audited as an emergency.
    pub async fn clinician_summary(
        &self,
        p: &Principal,
        person: &str,
        emergency: Option<String>,
    ) -> Result<Value, ShareError> {
        let inst = match (p.role, &p.institution) {
            (Role::Institution | Role::Clinician, Some(i)) => i.as_str().to_string(),
            (Role::Operator, _) => String::new(),
            _ => return Err(ShareError::Denied("summary-needs-institution")),
        };
        let consents = async {
            if inst.is_empty() {
                Ok(Vec::new())
            } else {
                self.consents_in_force(person, &inst).await
            }
        };
        let (patient, consents, items) = tokio::join!(
            self.store().read("Patient", person),
            consents,
            self.items_of(person)
        );
        if patient?.is_none() {
            return Err(ShareError::NotFound(format!("Patient/{person}")));
        }
        let ctx = AccessContext {
            consents: consents?,
            emergency: emergency.filter(|e| !e.trim().is_empty()),
        };
        let items = items?;
        let total = items.len();
        let action = if ctx.emergency.is_some() {
            "emergency-open"
        } else {
            "summary"
        };
        let (shown, denied) = self.filter_items(p, items, &ctx, action);
        if shown.is_empty() && total > 0 {
            // Nothing may be shown: say why (no consent, not a physician …), not an empty page.
            return Err(ShareError::Denied(
                denied.first().copied().unwrap_or("no-consent"),
            ));
        }
        Ok(self.assemble_summary(person, shown))
    }

    fn assemble_summary(&self, person: &str, shown: Vec<(ItemFacts, Value)>) -> Value {
        let mut by_kind: BTreeMap<ItemKind, Vec<Value>> = BTreeMap::new();
        for (f, r) in shown {
            by_kind.entry(f.kind).or_default().push(r);
        }
        let take = |k: ItemKind, by_kind: &mut BTreeMap<ItemKind, Vec<Value>>| {
            let mut v = by_kind.remove(&k).unwrap_or_default();
            v.sort_by_key(|r| std::cmp::Reverse(when(r)));
            v
        };
        let conditions: Vec<Value> = take(ItemKind::Condition, &mut by_kind)
            .into_iter()
            .filter(is_active_condition)
            .collect();
        let mut allergies = take(ItemKind::DrugAllergy, &mut by_kind);
        allergies.extend(take(ItemKind::OtherAllergy, &mut by_kind));
        let infections = take(ItemKind::Infection, &mut by_kind);
        // Labs: per test, the latest result with its trend and the two before it.
        let mut per_test: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for r in take(ItemKind::Lab, &mut by_kind) {
            per_test.entry(code_key(&r)).or_default().push(r);
        }
        let mut labs = Vec::new();
        for (_, mut results) in per_test {
            results.truncate(3);
            if let (Some(latest), Some(prev)) = (
                results.first().and_then(value_of),
                results.get(1).and_then(value_of),
            ) {
                let trend = if latest > prev {
                    "up"
                } else if latest < prev {
                    "down"
                } else {
                    "same"
                };
                if let Some(o) = results.first_mut().and_then(Value::as_object_mut) {
                    let ext = o.entry("extension").or_insert_with(|| json!([]));
                    if let Some(a) = ext.as_array_mut() {
                        a.push(json!({"url": EXT_TREND, "valueCode": trend}));
                    }
                }
            }
            labs.extend(results);
        }
        let now = self.now();
        let window = self.config().prescription_window;
        let prescriptions: Vec<Value> = take(ItemKind::Prescription, &mut by_kind)
            .into_iter()
            .filter(|r| {
                chrono::DateTime::parse_from_rfc3339(&when(r))
                    .map(|t| now.signed_duration_since(t) <= window)
                    .unwrap_or(true)
            })
            .collect();
        let mut documents = take(ItemKind::Checkup, &mut by_kind);
        documents.extend(take(ItemKind::Referral, &mut by_kind));
        documents.extend(take(ItemKind::DischargeSummary, &mut by_kind));
        let section = |title: &str, code: &str, rs: &[Value]| {
            json!({"title": title, "code": {"coding": [{"system": TAG_ITEM, "code": code}]},
                "entry": rs.iter().map(reference).collect::<Vec<_>>()})
        };
        let stamp = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let composition = json!({
            "resourceType": "Composition",
            "status": "final",
            "type": {"text": "診療情報サマリー / clinical summary"},
            "subject": {"reference": format!("Patient/{person}")},
            "date": stamp,
            "title": "診療情報サマリー / clinical summary",
            "author": [{"display": "kizuna 電子カルテ情報共有サービス"}],
            "section": [
                section("傷病名 (現在) / active conditions", "condition", &conditions),
                section("アレルギー / allergies", "allergy", &allergies),
                section("感染症 / infections", "infection", &infections),
                section("検査 (直近と推移) / latest labs with trend", "lab", &labs),
                section("処方 (現在) / current prescriptions", "prescription", &prescriptions),
                section("文書 / documents", "document", &documents),
            ]
        });
        let mut entries = vec![kizuna_fhir::object([("resource", composition)])];
        for r in conditions
            .into_iter()
            .chain(allergies)
            .chain(infections)
            .chain(labs)
            .chain(prescriptions)
            .chain(documents)
        {
            let url = format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or("")
            );
            entries.push(kizuna_fhir::object([
                ("fullUrl", Value::String(url)),
                ("resource", r),
            ]));
        }
        kizuna_fhir::object([
            ("resourceType", json!("Bundle")),
            ("type", json!("collection")),
            ("timestamp", Value::String(stamp)),
            ("entry", Value::Array(entries)),
        ])
    }

    /// The patient's own view (the マイナポータル equivalent): their six items and check-up reports,
    /// without what they have not been told (UNINFORMED) and without the letters between doctors.
    pub async fn patient_record(&self, p: &Principal) -> Result<Value, ShareError> {
        let person = match (p.role, &p.person) {
            (Role::Patient, Some(person)) => person.clone(),
            _ => return Err(ShareError::Denied("patient-view-needs-patient")),
        };
        let items = self.items_of(&person).await?;
        let (shown, _) = self.filter_items(p, items, &AccessContext::default(), "patient-view");
        let mut rs: Vec<Value> = shown.into_iter().map(|(_, r)| r).collect();
        rs.sort_by_key(|r| std::cmp::Reverse(when(r)));
        Ok(kizuna_fhir::object([
            ("resourceType", json!("Bundle")),
            ("type", json!("collection")),
            (
                "timestamp",
                Value::String(
                    self.now()
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ),
            ),
            (
                "entry",
                Value::Array(
                    rs.into_iter()
                        .map(|r| kizuna_fhir::object([("resource", r)]))
                        .collect(),
                ),
            ),
        ]))
    }

    /// Who looked at the patient's data, when and why (emergency access marked), from the audit log.
    pub async fn access_history(&self, p: &Principal) -> Result<Vec<Value>, ShareError> {
        let person = match (p.role, &p.person) {
            (Role::Patient, Some(person)) => person.clone(),
            _ => return Err(ShareError::Denied("history-needs-patient")),
        };
        let Some(w) = self.audit().cloned() else {
            return Ok(Vec::new());
        };
        let actor = p.audit_actor();
        let now = self.now().to_rfc3339();
        let records = tokio::task::spawn_blocking(move || {
            // Everything queued so far is part of the history.
            let _ = w.flush();
            let mut log = w
                .log()
                .lock()
                .map_err(|_| ShareError::NotFound("audit log".into()))?;
            log.access_history(
                &HistoryRequester::Patient {
                    actor,
                    person: person.clone(),
                },
                &person,
                &now,
            )
            .map_err(|e| ShareError::invalid("", e.to_string(), e.to_string()))
        })
        .await
        .map_err(|e| ShareError::invalid("", e.to_string(), e.to_string()))??;
        Ok(records
            .into_iter()
            .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
            .collect())
    }
}
