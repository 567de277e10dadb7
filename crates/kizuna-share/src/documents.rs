//! Documents on their way: the referral inbox of a destination institution (診療情報提供書 and the
//! 退院時サマリー attached to it wait there up to six months, and are deleted about a week after the
//! destination acknowledges them), and check-up reports (健診結果報告書) delivered to the insurer.

use kizuna_auth::{Principal, Role};
use serde_json::Value;

use crate::item::*;
use crate::policy::{AccessContext, Request};
use crate::{item_target, ShareError, ShareService};

/// One document in an inbox or a delivery list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DocumentEntry {
    /// `Bundle/{id}`, to retrieve at `/fhir/Bundle/{id}`.
    pub document: String,
    /// Kind code.
    pub kind: String,
    /// The submitting institution.
    pub from: Option<String>,
    /// The person.
    pub person: String,
    /// When the service registered it.
    pub registered: Option<String>,
    /// `pending`, `acknowledged` (or `delivered` for check-ups).
    pub state: String,
    /// Documents attached to it (`Bundle/{id}`).
    pub attachments: Vec<String>,
}

fn entry_of(r: &Value, attachments: Vec<String>) -> Option<DocumentEntry> {
    let f = ItemFacts::of(r)?;
    Some(DocumentEntry {
        document: format!("Bundle/{}", r.get("id").and_then(Value::as_str)?),
        kind: f.kind.code().to_string(),
        from: f.institution,
        person: f.person,
        registered: instant(r, EXT_REGISTERED).map(|t| t.to_rfc3339()),
        state: tags(r, TAG_INBOX).next().unwrap_or("pending").to_string(),
        attachments,
    })
}

impl ShareService {
    /// The documents of a kind addressed to someone (a destination institution, an insurer) that the
    /// policy lets the caller see; each decision is audited under `action`.
    async fn addressed(
        &self,
        p: &Principal,
        to_system: &str,
        to: &str,
        kind: ItemKind,
        action: &str,
    ) -> Result<Vec<(String, Value)>, ShareError> {
        let q = crate::lookup(&[
            ("_tag".into(), format!("{to_system}|{to}")),
            ("_tag".into(), format!("{TAG_ITEM}|{}", kind.code())),
        ]);
        let mut out = Vec::new();
        for st in self.store().search("Bundle", &q).await?.resources {
            let Some(r) = st.resource else { continue };
            let Some(f) = ItemFacts::of(&r) else { continue };
            let d = self.check(
                p,
                &Request::Read(&f),
                &AccessContext::default(),
                action,
                item_target("Bundle", &st.id, &f.person),
            );
            if d.allowed {
                out.push((st.id, r));
            }
        }
        Ok(out)
    }

    /// The documents addressed to the caller's institution, newest last.
    pub async fn referral_inbox(&self, p: &Principal) -> Result<Vec<DocumentEntry>, ShareError> {
        let inst = match (p.role, &p.institution) {
            (Role::Institution | Role::Clinician, Some(i)) => i.as_str().to_string(),
            _ => return Err(ShareError::Denied("inbox-needs-institution")),
        };
        let mut out = Vec::new();
        for (id, r) in self
            .addressed(p, TAG_DESTINATION, &inst, ItemKind::Referral, "inbox-list")
            .await?
        {
            let attached = self.attachments_of(&id).await?;
            out.extend(entry_of(&r, attached));
        }
        Ok(out)
    }

    /// The documents attached to a referral.
    pub async fn attachments_of(&self, id: &str) -> Result<Vec<String>, ShareError> {
        let q = crate::lookup(&[("_tag".into(), format!("{TAG_ATTACHED_TO}|{id}"))]);
        Ok(self
            .store()
            .search_ids("Bundle", &q)
            .await?
            .into_iter()
            .map(|i| format!("Bundle/{i}"))
            .collect())
    }

    /// Acknowledges receipt of a document (and what is attached to it); the retention job deletes it
    /// the configured time after.
    pub async fn acknowledge(&self, p: &Principal, id: &str) -> Result<DocumentEntry, ShareError> {
        let Some(cur) = self.store().read("Bundle", id).await? else {
            return Err(ShareError::NotFound(format!("Bundle/{id}")));
        };
        let r = cur.resource.unwrap_or(Value::Null);
        let f = ItemFacts::of(&r).ok_or_else(|| ShareError::NotFound(format!("Bundle/{id}")))?;
        let d = self.check(
            p,
            &Request::Acknowledge(&f),
            &AccessContext::default(),
            "acknowledge",
            item_target("Bundle", id, &f.person),
        );
        if !d.allowed {
            return Err(ShareError::Denied(d.rule));
        }
        let state = if f.kind == ItemKind::Checkup {
            "delivered"
        } else {
            "acknowledged"
        };
        let now = self.now();
        let mut targets = vec![(id.to_string(), r, cur.version)];
        for a in self.attachments_of(id).await? {
            let aid = a.trim_start_matches("Bundle/").to_string();
            if let Some(st) = self.store().read("Bundle", &aid).await? {
                targets.push((aid, st.resource.unwrap_or(Value::Null), st.version));
            }
        }
        let mut ops = Vec::new();
        for (_, mut doc, version) in targets {
            set_tag(&mut doc, TAG_INBOX, state);
            set_instant(&mut doc, EXT_ACKNOWLEDGED, now);
            ops.push(kizuna_store::WriteOp::Update {
                resource: doc,
                if_match: Some(version),
            });
        }
        let stored = self.store().transaction(ops).await?;
        let first = stored
            .into_iter()
            .next()
            .and_then(|s| s.resource)
            .unwrap_or(Value::Null);
        let attached = self.attachments_of(id).await?;
        entry_of(&first, attached).ok_or_else(|| ShareError::NotFound(format!("Bundle/{id}")))
    }

    /// The check-up reports addressed to the caller's insurer.
    pub async fn checkup_reports(&self, p: &Principal) -> Result<Vec<DocumentEntry>, ShareError> {
        let ins = match (p.role, &p.insurer) {
            (Role::Insurer, Some(i)) => i.as_str().to_string(),
            _ => return Err(ShareError::Denied("checkups-need-insurer")),
        };
        let mut out = Vec::new();
        for (_, r) in self
            .addressed(p, TAG_INSURER, &ins, ItemKind::Checkup, "checkup-list")
            .await?
        {
            out.extend(entry_of(&r, Vec::new()));
        }
        Ok(out)
    }
}
