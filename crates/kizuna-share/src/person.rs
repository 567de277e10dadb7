//! The person index: every insured-person identifier a person has held — after a job change, at
//! 75 when 後期高齢者医療 begins — resolves to one person, with its history.
//!
//! The index is fed by eligibility records (資格情報: the online eligibility system knows which
//! identifiers belong to one person, under a key of its own), sent as FHIR Coverage resources. Each
//! person is one Patient resource, id = the service's person id, holding the eligibility key and
//! every identifier with its period. A submission naming an identifier the index does not know is
//! refused: in the real service the patient has always been checked for eligibility at the visit.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use kizuna_auth::Principal;
use kizuna_store::WriteOp;
use serde_json::{json, Value};

use crate::identity::{MemberId, MEMBER_ID_SYSTEM};
use crate::item::{set_tag, TAG_PERSON, TAG_PERSON_RECORD};
use crate::policy::{AccessContext, Request};
use crate::{ShareError, ShareService};

/// The identifier system of the eligibility system's person key.
pub const ELIGIBILITY_KEY_SYSTEM: &str = "urn:kizuna:eligibility-person";

/// One eligibility record: the person key, an identifier they held, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EligibilityRecord {
    /// The eligibility system's key for the person.
    pub key: String,
    /// The insured-person identifier.
    pub member: MemberId,
    /// From (inclusive).
    pub start: Option<NaiveDate>,
    /// Until (inclusive).
    pub end: Option<NaiveDate>,
}

/// Demographics the eligibility feed carries for a person key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Demographics {
    /// `Patient.name`, as given.
    pub name: Option<Value>,
    /// `Patient.gender`.
    pub gender: Option<String>,
    /// `Patient.birthDate`.
    pub birth_date: Option<String>,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportReport {
    /// Persons created.
    pub created: usize,
    /// Persons updated (new identifiers or periods).
    pub updated: usize,
    /// Identifiers recorded.
    pub identifiers: usize,
}

/// One identifier a person has held.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeldIdentifier {
    /// `保険者番号:記号:番号:枝番`.
    pub member: String,
    /// From.
    pub start: Option<String>,
    /// Until.
    pub end: Option<String>,
}

fn date(s: Option<&str>) -> Option<NaiveDate> {
    s.and_then(|d| NaiveDate::parse_from_str(d.get(..10)?, "%Y-%m-%d").ok())
}

/// Reads an eligibility Bundle: Coverage entries (identifier in [`MEMBER_ID_SYSTEM`], `period`,
/// `beneficiary.identifier` in [`ELIGIBILITY_KEY_SYSTEM`], `payor[].identifier` 保険者番号) and,
/// optionally, Patient entries carrying the same key with name, gender and birth date.
pub fn read_eligibility(
    b: &Value,
) -> Result<(Vec<EligibilityRecord>, BTreeMap<String, Demographics>), ShareError> {
    let entries = b
        .get("entry")
        .and_then(Value::as_array)
        .ok_or_else(|| ShareError::invalid("Bundle.entry", "entry がありません", "no entries"))?;
    let mut records = Vec::new();
    let mut demo = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        let path = format!("Bundle.entry[{i}].resource");
        let r = e.get("resource").unwrap_or(&Value::Null);
        let key_of = |ids: Option<&Value>| {
            ids.and_then(Value::as_array)
                .into_iter()
                .flatten()
                .chain(ids.filter(|v| v.is_object()))
                .find(|i| i.get("system").and_then(Value::as_str) == Some(ELIGIBILITY_KEY_SYSTEM))
                .and_then(|i| i.get("value").and_then(Value::as_str))
                .map(str::to_string)
        };
        match r.get("resourceType").and_then(Value::as_str) {
            Some("Coverage") => {
                let key = key_of(r.pointer("/beneficiary/identifier")).ok_or_else(|| {
                    ShareError::invalid(
                        format!("{path}.beneficiary.identifier"),
                        "資格情報の個人キーがありません",
                        "the beneficiary has no eligibility person key",
                    )
                })?;
                let member = r
                    .get("identifier")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|i| i.get("system").and_then(Value::as_str) == Some(MEMBER_ID_SYSTEM))
                    .and_then(|i| i.get("value").and_then(Value::as_str))
                    .ok_or_else(|| {
                        ShareError::invalid(
                            format!("{path}.identifier"),
                            "被保険者番号がありません",
                            "no insured-person identifier",
                        )
                    })?;
                let member = MemberId::parse(member).map_err(|e| {
                    ShareError::invalid(format!("{path}.identifier"), e.to_string(), e.to_string())
                })?;
                records.push(EligibilityRecord {
                    key,
                    member,
                    start: date(r.pointer("/period/start").and_then(Value::as_str)),
                    end: date(r.pointer("/period/end").and_then(Value::as_str)),
                });
            }
            Some("Patient") => {
                if let Some(key) = key_of(r.get("identifier")) {
                    demo.insert(
                        key,
                        Demographics {
                            name: r.get("name").cloned(),
                            gender: r.get("gender").and_then(Value::as_str).map(str::to_string),
                            birth_date: r
                                .get("birthDate")
                                .and_then(Value::as_str)
                                .map(str::to_string),
                        },
                    );
                }
            }
            _ => {
                return Err(ShareError::invalid(
                    format!("{path}.resourceType"),
                    "Coverage または Patient が必要です",
                    "expected Coverage or Patient",
                ))
            }
        }
    }
    Ok((records, demo))
}

impl ShareService {
    /// The person record holding an eligibility key.
    async fn person_by_key(&self, key: &str) -> Result<Option<Value>, ShareError> {
        let q = crate::lookup(&[
            (
                "identifier".into(),
                format!("{ELIGIBILITY_KEY_SYSTEM}|{key}"),
            ),
            ("_tag".into(), format!("{TAG_PERSON_RECORD}|person")),
        ]);
        let r = self.store().search("Patient", &q).await?;
        Ok(r.resources.into_iter().next().and_then(|s| s.resource))
    }

    /// The person an insured-person identifier belongs to.
    pub async fn resolve_member(&self, member: &MemberId) -> Result<Option<String>, ShareError> {
        let q = crate::lookup(&[
            (
                "identifier".into(),
                format!("{MEMBER_ID_SYSTEM}|{}", member.as_text()),
            ),
            ("_tag".into(), format!("{TAG_PERSON_RECORD}|person")),
        ]);
        let r = self.store().search("Patient", &q).await?;
        Ok(r.resources.first().map(|s| s.id.clone()))
    }

    /// Every identifier a person has held, oldest first.
    pub async fn identifiers_of(&self, person: &str) -> Result<Vec<HeldIdentifier>, ShareError> {
        let Some(p) = self.store().read("Patient", person).await? else {
            return Err(ShareError::NotFound(format!("Patient/{person}")));
        };
        let mut out: Vec<HeldIdentifier> = p
            .resource
            .as_ref()
            .and_then(|r| r.get("identifier"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|i| i.get("system").and_then(Value::as_str) == Some(MEMBER_ID_SYSTEM))
            .map(|i| HeldIdentifier {
                member: i["value"].as_str().unwrap_or("").to_string(),
                start: i
                    .pointer("/period/start")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                end: i
                    .pointer("/period/end")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
            .collect();
        out.sort_by(|a, b| a.start.cmp(&b.start));
        Ok(out)
    }

    /// Imports eligibility records: new persons are created, known ones gain identifiers; an
    /// identifier already held by another person is refused (the feed contradicts itself), and
    /// nothing of the import is stored then.
    pub async fn import_eligibility(
        &self,
        p: &Principal,
        records: Vec<EligibilityRecord>,
        demographics: BTreeMap<String, Demographics>,
    ) -> Result<ImportReport, ShareError> {
        let insurers: std::collections::BTreeSet<&str> =
            records.iter().map(|r| r.member.insurer.as_str()).collect();
        let one = (insurers.len() == 1)
            .then(|| insurers.iter().next().copied())
            .flatten();
        let d = self.check(
            p,
            &Request::ImportEligibility { insurer: one },
            &AccessContext::default(),
            "import-eligibility",
            kizuna_audit::Target::default(),
        );
        if !d.allowed {
            return Err(ShareError::Denied(d.rule));
        }
        let mut by_key: BTreeMap<String, Vec<EligibilityRecord>> = BTreeMap::new();
        for r in records {
            by_key.entry(r.key.clone()).or_default().push(r);
        }
        let mut report = ImportReport::default();
        let mut ops = Vec::new();
        // Identifiers claimed in this import, so two keys cannot take one identifier either.
        let mut claimed: BTreeMap<String, String> = BTreeMap::new();
        for (key, recs) in by_key {
            let existing = self.person_by_key(&key).await?;
            let created = existing.is_none();
            let mut person = existing.unwrap_or_else(|| {
                let id = kizuna_store::new_id();
                let mut v = json!({"resourceType": "Patient", "id": id, "active": true,
                    "identifier": [{"system": ELIGIBILITY_KEY_SYSTEM, "value": key}]});
                set_tag(&mut v, TAG_PERSON_RECORD, "person");
                set_tag(&mut v, TAG_PERSON, &id);
                v
            });
            let person_id = person["id"].as_str().unwrap_or("").to_string();
            let mut changed = created;
            for r in recs {
                let text = r.member.as_text();
                if claimed
                    .insert(text.clone(), key.clone())
                    .is_some_and(|k| k != key)
                {
                    return Err(ShareError::invalid(
                        "Coverage.identifier",
                        "同じ被保険者番号が別の人の資格情報にもあります",
                        "the same insured-person identifier is given for two persons",
                    ));
                }
                if let Some(owner) = self.resolve_member(&r.member).await? {
                    if owner != person_id {
                        return Err(ShareError::invalid(
                            "Coverage.identifier",
                            "この被保険者番号は別の人に登録されています",
                            "this insured-person identifier already belongs to another person",
                        ));
                    }
                }
                let mut period = json!({});
                if let Some(s) = r.start {
                    period["start"] = json!(s.to_string());
                }
                if let Some(e) = r.end {
                    period["end"] = json!(e.to_string());
                }
                let ids = person["identifier"].as_array_mut();
                let Some(ids) = ids else { continue };
                match ids.iter_mut().find(|i| {
                    i.get("system").and_then(Value::as_str) == Some(MEMBER_ID_SYSTEM)
                        && i.get("value").and_then(Value::as_str) == Some(text.as_str())
                }) {
                    Some(i) if i.get("period") != Some(&period) => {
                        i["period"] = period;
                        changed = true;
                    }
                    Some(_) => {}
                    None => {
                        ids.push(
                            json!({"system": MEMBER_ID_SYSTEM, "value": text, "period": period}),
                        );
                        changed = true;
                    }
                }
                report.identifiers += 1;
            }
            if let Some(d) = demographics.get(&key) {
                for (k, v) in [
                    ("name", d.name.clone()),
                    ("gender", d.gender.clone().map(Value::String)),
                    ("birthDate", d.birth_date.clone().map(Value::String)),
                ] {
                    if let Some(v) = v {
                        if person.get(k) != Some(&v) {
                            person[k] = v;
                            changed = true;
                        }
                    }
                }
            }
            if changed {
                if created {
                    report.created += 1;
                } else {
                    report.updated += 1;
                }
                ops.push(WriteOp::Update {
                    resource: person,
                    if_match: None,
                });
            }
        }
        for chunk in ops.chunks(500) {
            self.store().transaction(chunk.to_vec()).await?;
        }
        tracing::info!(
            created = report.created,
            updated = report.updated,
            identifiers = report.identifiers,
            "eligibility imported"
        );
        Ok(report)
    }
}
