//! What people see: the clinician's summary of a patient (active conditions, allergies, infections,
//! latest labs with their trend, current prescriptions, documents) and the patient's own view (the
//! six items and check-up reports, minus what they have not been told, plus who looked).
//! Every item shown or withheld is a decision of the policy, and audited.

use std::collections::BTreeMap;

use kizuna_audit::HistoryRequester;
use kizuna_auth::{Principal, Role};
use kizuna_fhir::prepared::{EntryResource, PreparedBundle, PreparedEntry};
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

/// The elements of an item the policy (`meta`) and the views (dates, code, value, clinical status)
/// read; the rest of the stored resource is not parsed.
const VIEW_OUTLINE: &[&str] = &[
    "resourceType",
    "id",
    "meta",
    "effectiveDateTime",
    "effectivePeriod",
    "authoredOn",
    "recordedDate",
    "onsetDateTime",
    "issued",
    "code",
    "valueQuantity",
    "clinicalStatus",
    "abatementDateTime",
    "abatementPeriod",
];

/// A prepared Bundle as a tree, for callers that inspect it.
fn as_tree(b: PreparedBundle) -> Result<Value, ShareError> {
    b.into_value().map_err(|e| ShareError::Store(e.into()))
}

/// A `collection` Bundle stamped at `timestamp` (the clinician summary, the patient's record).
fn collection(timestamp: String, entries: Vec<PreparedEntry>) -> PreparedBundle {
    PreparedBundle {
        head: kizuna_fhir::object([
            ("resourceType", json!("Bundle")),
            ("type", json!("collection")),
            ("timestamp", Value::String(timestamp)),
        ]),
        entries,
    }
}

/// A stored item: the elements the views read, and its stored text for the answer.
struct Item {
    outline: Value,
    text: String,
}

impl ShareService {
    /// Every item of a person (any kind, any flag): what the policy then filters. The five item
    /// types are searched side by side (the store has several readers). Only the elements the
    /// policy and the views read are parsed; each item keeps its stored text for the answer.
    async fn items_of(&self, person: &str) -> Result<Vec<Item>, ShareError> {
        let tag = format!("{TAG_PERSON}|{person}");
        let of = |rt: &'static str| {
            let mut q = crate::lookup(&[("_tag".into(), tag.clone())]);
            q.outline = Some(VIEW_OUTLINE);
            async move { self.store().search(rt, &q).await }
        };
        let [a, b, c, d, e] = crate::submit::ITEM_TYPES;
        let (a, b, c, d, e) = tokio::join!(of(a), of(b), of(c), of(d), of(e));
        let mut out = Vec::new();
        for found in [a?, b?, c?, d?, e?] {
            for st in found.resources {
                if let (Some(r), Some(text)) = (st.resource, st.text) {
                    if ItemFacts::of(&r).is_some() {
                        out.push(Item { outline: r, text });
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
        items: Vec<Item>,
        ctx: &AccessContext,
        action: &str,
    ) -> (Vec<(ItemFacts, Item)>, Vec<&'static str>) {
        let mut shown = Vec::new();
        let mut denied = Vec::new();
        let mut audit = Vec::with_capacity(items.len());
        let time = self.now().to_rfc3339();
        for item in items {
            let r = &item.outline;
            let Some(f) = ItemFacts::of(r) else { continue };
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
                shown.push((f, item));
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
        as_tree(
            self.clinician_summary_prepared(p, person, emergency)
                .await?,
        )
    }

    /// [`Self::clinician_summary`] before it is written: the items that are not changed are
    /// their stored text, copied into the answer as they are.
    pub async fn clinician_summary_prepared(
        &self,
        p: &Principal,
        person: &str,
        emergency: Option<String>,
    ) -> Result<PreparedBundle, ShareError> {
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

    fn assemble_summary(&self, person: &str, shown: Vec<(ItemFacts, Item)>) -> PreparedBundle {
        let mut by_kind: BTreeMap<ItemKind, Vec<Item>> = BTreeMap::new();
        for (f, it) in shown {
            by_kind.entry(f.kind).or_default().push(it);
        }
        let take = |k: ItemKind, by_kind: &mut BTreeMap<ItemKind, Vec<Item>>| {
            let mut v = by_kind.remove(&k).unwrap_or_default();
            v.sort_by_key(|it| std::cmp::Reverse(when(&it.outline)));
            v
        };
        let conditions: Vec<Item> = take(ItemKind::Condition, &mut by_kind)
            .into_iter()
            .filter(|it| is_active_condition(&it.outline))
            .collect();
        let mut allergies = take(ItemKind::DrugAllergy, &mut by_kind);
        allergies.extend(take(ItemKind::OtherAllergy, &mut by_kind));
        let infections = take(ItemKind::Infection, &mut by_kind);
        // Labs: per test, the latest result with its trend and the two before it.
        let mut per_test: BTreeMap<String, Vec<Item>> = BTreeMap::new();
        for it in take(ItemKind::Lab, &mut by_kind) {
            per_test.entry(code_key(&it.outline)).or_default().push(it);
        }
        let mut labs: Vec<(Item, Option<&'static str>)> = Vec::new();
        for (_, mut results) in per_test {
            results.truncate(3);
            let trend = match (
                results.first().and_then(|it| value_of(&it.outline)),
                results.get(1).and_then(|it| value_of(&it.outline)),
            ) {
                (Some(latest), Some(prev)) if latest > prev => Some("up"),
                (Some(latest), Some(prev)) if latest < prev => Some("down"),
                (Some(_), Some(_)) => Some("same"),
                _ => None,
            };
            for (i, it) in results.into_iter().enumerate() {
                labs.push((it, if i == 0 { trend } else { None }));
            }
        }
        let now = self.now();
        let window = self.config().prescription_window;
        let prescriptions: Vec<Item> = take(ItemKind::Prescription, &mut by_kind)
            .into_iter()
            .filter(|it| {
                chrono::DateTime::parse_from_rfc3339(&when(&it.outline))
                    .map(|t| now.signed_duration_since(t) <= window)
                    .unwrap_or(true)
            })
            .collect();
        let mut documents = take(ItemKind::Checkup, &mut by_kind);
        documents.extend(take(ItemKind::Referral, &mut by_kind));
        documents.extend(take(ItemKind::DischargeSummary, &mut by_kind));
        let section = |title: &str, code: &str, rs: &mut dyn Iterator<Item = &Item>| {
            json!({"title": title, "code": {"coding": [{"system": TAG_ITEM, "code": code}]},
                "entry": rs.map(|it| reference(&it.outline)).collect::<Vec<_>>()})
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
                section("傷病名 (現在) / active conditions", "condition", &mut conditions.iter()),
                section("アレルギー / allergies", "allergy", &mut allergies.iter()),
                section("感染症 / infections", "infection", &mut infections.iter()),
                section("検査 (直近と推移) / latest labs with trend", "lab", &mut labs.iter().map(|(it, _)| it)),
                section("処方 (現在) / current prescriptions", "prescription", &mut prescriptions.iter()),
                section("文書 / documents", "document", &mut documents.iter()),
            ]
        });
        let mut entries = vec![PreparedEntry {
            full_url: None,
            resource: EntryResource::Tree(composition),
            search_mode: None,
        }];
        let unchanged = |it: Item| (it, None);
        for (it, trend) in conditions
            .into_iter()
            .map(unchanged)
            .chain(allergies.into_iter().map(unchanged))
            .chain(infections.into_iter().map(unchanged))
            .chain(labs)
            .chain(prescriptions.into_iter().map(unchanged))
            .chain(documents.into_iter().map(unchanged))
        {
            let url = format!(
                "{}/{}",
                it.outline["resourceType"].as_str().unwrap_or(""),
                it.outline["id"].as_str().unwrap_or("")
            );
            let resource = match trend {
                None => EntryResource::Text(it.text),
                // The latest result of a test carries its trend: the one item that changes.
                Some(trend) => {
                    let mut r: Value = serde_json::from_str(&it.text).unwrap_or(it.outline);
                    if let Some(o) = r.as_object_mut() {
                        let ext = o.entry("extension").or_insert_with(|| json!([]));
                        if let Some(a) = ext.as_array_mut() {
                            a.push(json!({"url": EXT_TREND, "valueCode": trend}));
                        }
                    }
                    EntryResource::Tree(r)
                }
            };
            entries.push(PreparedEntry {
                full_url: Some(url),
                resource,
                search_mode: None,
            });
        }
        collection(stamp, entries)
    }

    /// The patient's own view (the マイナポータル equivalent): their six items and check-up reports,
    /// without what they have not been told (UNINFORMED) and without the letters between doctors.
    pub async fn patient_record(&self, p: &Principal) -> Result<Value, ShareError> {
        as_tree(self.patient_record_prepared(p).await?)
    }

    /// [`Self::patient_record`] before it is written, the items as their stored text.
    pub async fn patient_record_prepared(
        &self,
        p: &Principal,
    ) -> Result<PreparedBundle, ShareError> {
        let person = match (p.role, &p.person) {
            (Role::Patient, Some(person)) => person.clone(),
            _ => return Err(ShareError::Denied("patient-view-needs-patient")),
        };
        let items = self.items_of(&person).await?;
        let (shown, _) = self.filter_items(p, items, &AccessContext::default(), "patient-view");
        let mut rs: Vec<Item> = shown.into_iter().map(|(_, it)| it).collect();
        rs.sort_by_key(|it| std::cmp::Reverse(when(&it.outline)));
        let entries = rs
            .into_iter()
            .map(|it| PreparedEntry {
                full_url: None,
                resource: EntryResource::Text(it.text),
                search_mode: None,
            })
            .collect();
        let stamp = self
            .now()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        Ok(collection(stamp, entries))
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
