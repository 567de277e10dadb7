//! Retention (保存期間), run on schedule and by `kizuna retention run`, reading the injected clock.
//!
//! | item | kept |
//! |---|---|
//! | 傷病名, 感染症, 薬剤アレルギー等, その他アレルギー等 | 5 years from registration |
//! | 検査 | 1 year from the test date, or while among the person's latest 3 test occasions |
//! | 処方 | 100 days from the prescription date, or while among the latest 3 prescription occasions |
//! | 健診結果報告書 | 5 years from registration |
//! | 診療情報提供書, 退院時サマリー | until acknowledged + 7 days, at most 6 months unacknowledged |
//!
//! "X or the latest 3" is read as: an item stays while it is inside its window, **or** while its
//! occasion — the calendar day of the test (`effectiveDateTime`) or of the prescription
//! (`authoredOn`) — is one of the person's three most recent occasions of that kind, across
//! institutions. So a patient seen once a year still has their last three sets of results, and a
//! day with twenty results counts as one occasion. Items tagged LTS are kept past all of this.
//! Deletions are real — the current row, its search index and its history — audited one by one
//! and counted.

use std::collections::{BTreeMap, BTreeSet};

use kizuna_audit::{NewEntry, Outcome, Purpose};
use kizuna_auth::Principal;
use kizuna_store::{ScanCursor, ScanFilter};
use serde_json::Value;

use crate::item::*;
use crate::policy::{AccessContext, Request};
use crate::{item_target, ShareError, ShareService};

/// What one run deleted, by kind code, and how many items it looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetentionReport {
    /// When the run counted from.
    pub now: String,
    /// Items examined.
    pub examined: usize,
    /// Deleted, by kind.
    pub deleted: BTreeMap<String, usize>,
    /// Kept past their window because of LTS, by kind.
    pub kept_lts: BTreeMap<String, usize>,
}

fn day_of(r: &Value, key: &str) -> Option<chrono::NaiveDate> {
    let s = r.get(key).and_then(Value::as_str)?;
    chrono::NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok()
}

/// An item waiting for the occasion rule (検査, 処方).
struct Occasional {
    rt: &'static str,
    id: String,
    kind: ItemKind,
    day: Option<chrono::NaiveDate>,
    lts: bool,
}

impl ShareService {
    /// Runs retention as `p` (the operator, or the scheduler acting as one).
    pub async fn run_retention(&self, p: &Principal) -> Result<RetentionReport, ShareError> {
        let d = self.check(
            p,
            &Request::RunRetention,
            &AccessContext::default(),
            "retention-run",
            kizuna_audit::Target::default(),
        );
        if !d.allowed {
            return Err(ShareError::Denied(d.rule));
        }
        let now = self.now();
        let cfg = self.config().clone();
        let mut report = RetentionReport {
            now: now.to_rfc3339(),
            ..RetentionReport::default()
        };
        let mut doomed: Vec<(&'static str, String, ItemKind, String)> = Vec::new();
        // Person → kind → occasions, and the items waiting for that rule.
        let mut occasions: BTreeMap<(String, ItemKind), BTreeSet<chrono::NaiveDate>> =
            BTreeMap::new();
        let mut waiting: Vec<(String, Occasional)> = Vec::new();
        for rt in crate::submit::ITEM_TYPES {
            let mut after = ScanCursor::default();
            loop {
                let Some(page) = self
                    .store()
                    .scan_page(rt, &ScanFilter::default(), after, 1000)
                    .await?
                else {
                    break;
                };
                let Some(last) = page.last() else { break };
                after = last.cursor;
                for row in page {
                    let Ok(r) = serde_json::from_str::<Value>(&row.body) else {
                        continue;
                    };
                    let Some(f) = ItemFacts::of(&r) else { continue };
                    report.examined += 1;
                    let registered = instant(&r, EXT_REGISTERED).unwrap_or(now);
                    let expired =
                        |keep: chrono::Duration| now.signed_duration_since(registered) > keep;
                    let lts = f.flags.lts;
                    let verdict = match f.kind {
                        ItemKind::Condition
                        | ItemKind::Infection
                        | ItemKind::DrugAllergy
                        | ItemKind::OtherAllergy => Some(expired(cfg.long_items)),
                        ItemKind::Checkup => Some(expired(cfg.checkup_keep)),
                        ItemKind::Referral | ItemKind::DischargeSummary => {
                            Some(match instant(&r, EXT_ACKNOWLEDGED) {
                                Some(ack) => {
                                    now.signed_duration_since(ack) > cfg.keep_after_receipt
                                }
                                None => expired(cfg.inbox_wait),
                            })
                        }
                        ItemKind::Lab | ItemKind::Prescription => {
                            let key = if f.kind == ItemKind::Lab {
                                "effectiveDateTime"
                            } else {
                                "authoredOn"
                            };
                            let day = day_of(&r, key);
                            if let Some(d) = day {
                                occasions
                                    .entry((f.person.clone(), f.kind))
                                    .or_default()
                                    .insert(d);
                            }
                            waiting.push((
                                f.person.clone(),
                                Occasional {
                                    rt,
                                    id: row.id.clone(),
                                    kind: f.kind,
                                    day,
                                    lts,
                                },
                            ));
                            None
                        }
                    };
                    match verdict {
                        // Documents travel between institutions; LTS is about clinical items.
                        Some(true) if lts && !f.kind.is_document() => {
                            *report.kept_lts.entry(f.kind.code().into()).or_default() += 1
                        }
                        Some(true) => doomed.push((rt, row.id.clone(), f.kind, f.person.clone())),
                        _ => {}
                    }
                }
            }
        }
        for (person, o) in waiting {
            let window = if o.kind == ItemKind::Lab {
                cfg.lab_window
            } else {
                cfg.prescription_window
            };
            let Some(day) = o.day else { continue };
            let in_window = now.date_naive().signed_duration_since(day) <= window;
            let latest: Vec<&chrono::NaiveDate> = occasions
                .get(&(person.clone(), o.kind))
                .map(|s| s.iter().rev().take(cfg.latest_occasions).collect())
                .unwrap_or_default();
            if in_window || latest.contains(&&day) {
                continue;
            }
            if o.lts {
                *report.kept_lts.entry(o.kind.code().into()).or_default() += 1;
            } else {
                doomed.push((o.rt, o.id, o.kind, person));
            }
        }
        let time = now.to_rfc3339();
        for chunk in doomed.chunks(500) {
            let ids: Vec<(&str, &str)> = chunk
                .iter()
                .map(|(rt, id, _, _)| (*rt, id.as_str()))
                .collect();
            self.store().purge(&ids).await?;
            self.audit_batch(
                chunk
                    .iter()
                    .map(|(rt, id, kind, person)| NewEntry {
                        time: time.clone(),
                        actor: p.audit_actor(),
                        action: "retention-delete".into(),
                        target: item_target(rt, id, person),
                        purpose: Purpose::Operations,
                        outcome: Outcome::allow(format!("retention-{}", kind.code())),
                        source: None,
                        request: None,
                    })
                    .collect(),
            );
            for (_, _, kind, _) in chunk {
                *report.deleted.entry(kind.code().into()).or_default() += 1;
            }
        }
        self.audit_durable().await;
        tracing::info!(
            examined = report.examined,
            deleted = report.deleted.values().sum::<usize>(),
            "retention run"
        );
        Ok(report)
    }
}
