//! Viewing consent (閲覧同意): given by the patient at the visit, for one institution, for either or
//! both categories (傷病名・手術・感染症; 診療・薬剤・アレルギー・検査), for a period. Recorded as a FHIR
//! Consent; the policy reads which categories are in force at the moment of a read.

use kizuna_auth::Principal;
use serde_json::{json, Value};

use crate::item::{
    set_tag, tags, ConsentCategory, CONSENT_CATEGORY_SYSTEM, INSTITUTION_SYSTEM, TAG_INSTITUTION,
    TAG_PERSON,
};
use crate::policy::{AccessContext, Request};
use crate::{ShareError, ShareService};

/// A consent to record.
#[derive(Debug, Clone)]
pub struct ConsentRequest {
    /// The person.
    pub person: String,
    /// The institution the patient consents to.
    pub institution: String,
    /// The categories.
    pub categories: Vec<ConsentCategory>,
    /// Until when; the configured period when absent.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

fn period_covers(c: &Value, now: chrono::DateTime<chrono::Utc>) -> bool {
    let t = |p: &str| {
        c.pointer(p)
            .and_then(Value::as_str)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
    };
    let start_ok = t("/provision/period/start").is_none_or(|s| s <= now);
    let end_ok = t("/provision/period/end").is_none_or(|e| now <= e);
    start_ok && end_ok
}

impl ShareService {
    /// Records a consent as a Consent resource; returns it.
    pub async fn record_consent(
        &self,
        p: &Principal,
        req: &ConsentRequest,
    ) -> Result<Value, ShareError> {
        if req.categories.is_empty() {
            return Err(ShareError::invalid(
                "category",
                "同意の区分がありません",
                "no consent category given",
            ));
        }
        let d = self.check(
            p,
            &Request::RecordConsent {
                institution: &req.institution,
                person: &req.person,
            },
            &AccessContext::default(),
            "consent-record",
            crate::item_target("Consent", "", &req.person),
        );
        if !d.allowed {
            return Err(ShareError::Denied(d.rule));
        }
        if self.store().read("Patient", &req.person).await?.is_none() {
            return Err(ShareError::NotFound(format!("Patient/{}", req.person)));
        }
        let now = self.now();
        let until = req.until.unwrap_or(now + self.config().consent_period);
        if until <= now {
            return Err(ShareError::invalid(
                "until",
                "同意の期限が過去です",
                "the consent would end in the past",
            ));
        }
        let stamp =
            |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let inst_id = json!({"system": INSTITUTION_SYSTEM, "value": req.institution});
        let mut c = json!({
            "resourceType": "Consent",
            "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
            "category": req.categories.iter().map(|k| json!({"coding": [{"system": CONSENT_CATEGORY_SYSTEM, "code": k.code(), "display": k.name_ja()}]})).collect::<Vec<_>>(),
            "patient": {"reference": format!("Patient/{}", req.person)},
            "dateTime": stamp(now),
            "organization": [{"identifier": inst_id}],
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
            "provision": {
                "type": "permit",
                "period": {"start": stamp(now), "end": stamp(until)},
                "actor": [{
                    "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                    "reference": {"identifier": inst_id}
                }]
            }
        });
        set_tag(&mut c, TAG_PERSON, &req.person);
        set_tag(&mut c, TAG_INSTITUTION, &req.institution);
        let st = self.store().create(c).await?;
        st.resource
            .ok_or_else(|| ShareError::NotFound("Consent".into()))
    }

    /// Revokes a consent (the patient, or the institution it was given to).
    pub async fn revoke_consent(&self, p: &Principal, id: &str) -> Result<Value, ShareError> {
        let Some(cur) = self.store().read("Consent", id).await? else {
            return Err(ShareError::NotFound(format!("Consent/{id}")));
        };
        let mut c = cur.resource.unwrap_or(Value::Null);
        let person = tags(&c, TAG_PERSON).next().unwrap_or("").to_string();
        let inst = tags(&c, TAG_INSTITUTION).next().unwrap_or("").to_string();
        let d = self.check(
            p,
            &Request::RecordConsent {
                institution: &inst,
                person: &person,
            },
            &AccessContext::default(),
            "consent-revoke",
            crate::item_target("Consent", id, &person),
        );
        if !d.allowed {
            return Err(ShareError::Denied(d.rule));
        }
        c["status"] = json!("inactive");
        let st = self.store().update(c, Some(cur.version)).await?;
        st.resource
            .ok_or_else(|| ShareError::NotFound(format!("Consent/{id}")))
    }

    /// The categories a person's consents let an institution see now.
    pub async fn consents_in_force(
        &self,
        person: &str,
        institution: &str,
    ) -> Result<Vec<ConsentCategory>, ShareError> {
        let q = crate::lookup(&[
            ("_tag".into(), format!("{TAG_PERSON}|{person}")),
            ("status".into(), "active".into()),
        ]);
        let now = self.now();
        let mut out = Vec::new();
        for st in self.store().search("Consent", &q).await?.resources {
            let Some(c) = st.resource else { continue };
            if tags(&c, TAG_INSTITUTION).next() != Some(institution) || !period_covers(&c, now) {
                continue;
            }
            for code in c
                .get("category")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|cc| {
                    cc.get("coding")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                })
                .filter(|k| {
                    k.get("system").and_then(Value::as_str) == Some(CONSENT_CATEGORY_SYSTEM)
                })
                .filter_map(|k| k.get("code").and_then(Value::as_str))
            {
                if let Some(k) = ConsentCategory::from_code(code) {
                    if !out.contains(&k) {
                        out.push(k);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
