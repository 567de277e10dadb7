//! # kizuna-share
//!
//! The EHR information sharing service (電子カルテ情報共有サービス): hospitals and clinics register the
//! six clinical items (6情報 — 傷病名, 感染症, 薬剤アレルギー等, その他アレルギー等, 検査, 処方) and three
//! documents (3文書 — 診療情報提供書, 退院時サマリー, 健診結果報告書) as JP-CLINS FHIR; other institutions
//! see them with the patient's consent, or in an emergency; patients see their own; insurers receive
//! check-up reports.
//!
//! - [`identity`]: the insured-person identifier (被保険者番号) and its normalisation.
//! - [`person`]: the person index — every identifier a person has held resolves to one person.
//! - [`submit`]: registering submissions (validated, matched, replaced atomically), withdrawal.
//! - [`policy`]: **the one access policy**; every decision is made there and audited.
//! - [`consent`]: viewing consent given at the visit, as FHIR Consent.
//! - [`documents`]: the referral inbox and check-up delivery.
//! - [`views`]: the clinician summary and the patient's view.
//! - [`retention`]: the retention job (clock-injected).
//! - [`operations`]: the OperationDefinitions of the service's operations.
//!
//! Everything is stored through [`kizuna_store::Store`] as FHIR resources; the facts the policy
//! needs travel with each item in `meta.tag` ([`item`]).

pub mod clock;
pub mod consent;
pub mod documents;
pub mod identity;
pub mod item;
pub mod operations;
pub mod person;
pub mod policy;
pub mod retention;
pub mod submit;
pub mod views;

use std::sync::Arc;

use kizuna_audit::{AuditWriter, NewEntry, Outcome, Target};
use kizuna_auth::Principal;
use kizuna_fhir::outcome::OperationOutcome;
use kizuna_fhir::validate::Validator;
use kizuna_store::{Store, StoreError};

pub use clock::{Clock, FixedClock, SystemClock};
pub use identity::{MemberId, MEMBER_ID_SYSTEM};
pub use item::{ConsentCategory, Flags, ItemFacts, ItemKind};
pub use policy::{decide, AccessContext, Decision, Request};

/// Why a sharing-service request failed. Each maps to one HTTP status and an OperationOutcome.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// Malformed input: the element path and a Japanese and English reason.
    #[error("{en}")]
    Invalid {
        /// FHIRPath of the offending element.
        path: String,
        /// 日本語の理由.
        ja: String,
        /// The reason in English.
        en: String,
    },
    /// The profile validator found errors (nothing was stored).
    #[error("検証エラー / validation failed")]
    Validation(OperationOutcome),
    /// The policy refused; the refusal was audited.
    #[error("拒否されました / denied by rule {0}")]
    Denied(&'static str),
    /// Nothing with that identifier.
    #[error("見つかりません / not found: {0}")]
    NotFound(String),
    /// The insured-person identifier is not in the eligibility records.
    #[error("被保険者番号が資格情報にありません / the insured-person identifier is not in the eligibility records")]
    UnknownMember,
    /// The submission is larger than the service accepts.
    #[error("送信が大きすぎます (上限 {0} バイト) / submission larger than {0} bytes")]
    TooLarge(usize),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ShareError {
    /// An [`ShareError::Invalid`] with both languages.
    pub fn invalid(path: impl Into<String>, ja: impl Into<String>, en: impl Into<String>) -> Self {
        ShareError::Invalid {
            path: path.into(),
            ja: ja.into(),
            en: en.into(),
        }
    }
}

/// A search the service runs for itself: up to 1,000 matches and no total, which nothing shows
/// (counting would cost a query per search).
pub(crate) fn lookup(pairs: &[(String, String)]) -> kizuna_store::SearchQuery {
    kizuna_store::SearchQuery {
        count: 1000,
        total: kizuna_store::Total::None,
        ..kizuna_store::SearchQuery::from_pairs(pairs)
    }
}

/// The audit entry of one policy decision: who, what, on whose data, why, and the rule.
pub fn decision_entry(
    time: String,
    p: &Principal,
    d: &Decision,
    action: &str,
    target: Target,
) -> NewEntry {
    NewEntry {
        time,
        actor: p.audit_actor(),
        action: action.to_string(),
        target,
        purpose: d.purpose.clone(),
        outcome: if d.allowed {
            Outcome::allow(d.rule)
        } else {
            Outcome::deny(d.rule)
        },
        source: None,
        request: None,
    }
}

/// The service's settings; the defaults follow the seeds.
#[derive(Debug, Clone)]
pub struct ShareConfig {
    /// How long a viewing consent lasts when the request names no period.
    pub consent_period: chrono::Duration,
    /// How long a referral waits in the destination's inbox (6 months).
    pub inbox_wait: chrono::Duration,
    /// How long a document is kept after its destination acknowledged it (about 7 days).
    pub keep_after_receipt: chrono::Duration,
    /// Retention of 傷病名, 感染症 and both allergy kinds (5 years).
    pub long_items: chrono::Duration,
    /// Retention of 検査 (1 year, or the latest occasions).
    pub lab_window: chrono::Duration,
    /// Retention of 処方 (100 days, or the latest occasions).
    pub prescription_window: chrono::Duration,
    /// How many latest occasions of 検査 and 処方 are kept past their window (3).
    pub latest_occasions: usize,
    /// Retention of 健診結果報告書 (5 years).
    pub checkup_keep: chrono::Duration,
    /// The largest submission accepted (10 MB).
    pub max_submission_bytes: usize,
}

impl Default for ShareConfig {
    fn default() -> Self {
        let days = chrono::Duration::days;
        ShareConfig {
            consent_period: days(30),
            inbox_wait: days(183),
            keep_after_receipt: days(7),
            long_items: days(5 * 365 + 1),
            lab_window: days(365),
            prescription_window: days(100),
            latest_occasions: 3,
            checkup_keep: days(5 * 365 + 1),
            max_submission_bytes: 10 * 1024 * 1024,
        }
    }
}

/// How many locks the submissions' turns are striped over.
const IDENTIFIER_STRIPES: usize = 1024;

/// The sharing service: the store, the validator, the clock, the settings and the audit log.
#[derive(Clone)]
pub struct ShareService {
    store: Store,
    validator: &'static Validator,
    clock: Arc<dyn Clock>,
    config: ShareConfig,
    audit: Option<AuditWriter>,
    /// Submissions of one bundle identifier take turns (by a stripe of its hash): finding what an
    /// earlier one stored and replacing it must not interleave with a concurrent re-send.
    identifier_locks: Arc<Vec<tokio::sync::Mutex<()>>>,
}

impl std::fmt::Debug for ShareService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareService")
            .field("config", &self.config)
            .finish()
    }
}

impl ShareService {
    /// A service over a store.
    pub fn new(
        store: Store,
        validator: &'static Validator,
        clock: Arc<dyn Clock>,
        config: ShareConfig,
        audit: Option<AuditWriter>,
    ) -> ShareService {
        ShareService {
            store,
            validator,
            clock,
            config,
            audit,
            // Enough stripes that submissions of different sources rarely share one: with 64,
            // a registration shared its stripe with one of 15 others in flight one time in five.
            identifier_locks: Arc::new(
                (0..IDENTIFIER_STRIPES)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
            ),
        }
    }

    /// Holds the turn of one submission source (see `identifier_locks`).
    pub(crate) async fn identifier_turn(&self, source: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        source.hash(&mut h);
        let n = self.identifier_locks.len().max(1);
        // The vector always has IDENTIFIER_STRIPES stripes; `n` only guards the modulo.
        let i = (h.finish() % n as u64) as usize;
        self.identifier_locks[i].lock().await
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &ShareConfig {
        &self.config
    }

    /// Now, by the injected clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    /// Decides a request with [`decide`] and audits the decision (allow and deny alike).
    pub fn check(
        &self,
        p: &Principal,
        req: &Request<'_>,
        ctx: &AccessContext,
        action: &str,
        target: Target,
    ) -> Decision {
        let d = decide(p, req, ctx);
        self.audit_decision(p, &d, action, target);
        d
    }

    /// Records one decision.
    pub fn audit_decision(&self, p: &Principal, d: &Decision, action: &str, target: Target) {
        if let Some(w) = &self.audit {
            w.record(decision_entry(
                self.now().to_rfc3339(),
                p,
                d,
                action,
                target,
            ));
        }
    }

    /// Records many decisions at once.
    pub fn audit_batch(&self, entries: Vec<NewEntry>) {
        if let Some(w) = &self.audit {
            w.record_batch(entries);
        }
    }

    /// Waits until every audit entry queued so far is durable (a submission is acknowledged only
    /// after its entries are).
    pub async fn audit_durable(&self) {
        if let Some(w) = self.audit.clone() {
            let _ = tokio::task::spawn_blocking(move || w.flush()).await;
        }
    }

    /// The audit writer, for the access history.
    pub fn audit(&self) -> Option<&AuditWriter> {
        self.audit.as_ref()
    }

    /// The validator.
    pub fn validator(&self) -> &'static Validator {
        self.validator
    }
}

/// The audit target of an item.
pub fn item_target(rt: &str, id: &str, person: &str) -> Target {
    Target {
        resource_type: Some(rt.to_string()),
        resource_id: Some(id.to_string()),
        person: Some(person.to_string()),
        ..Target::default()
    }
}
