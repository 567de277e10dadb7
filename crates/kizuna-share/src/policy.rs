//! The one access policy. Every decision of the sharing service — who may read an item, submit for
//! an institution, record a consent, acknowledge a document, import eligibility, run retention — is
//! made by [`decide`], a pure function of the caller, the request and the context (consents in
//! force, a declared emergency). Handlers ask it and never decide on their own; every answer is
//! audited, allow and deny alike, with the rule that decided.

use kizuna_audit::Purpose;
use kizuna_auth::{Principal, Qualification, Role};

use crate::item::{ConsentCategory, ItemFacts, ItemKind};

/// What is being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// Read one item.
    Read(&'a ItemFacts),
    /// Submit (register, replace) items for an institution.
    Submit {
        /// The institution the submission is from.
        institution: &'a str,
    },
    /// Withdraw a submission of an institution.
    Withdraw {
        /// The institution the submission was from.
        institution: &'a str,
    },
    /// Record (or revoke) a viewing consent given at an institution.
    RecordConsent {
        /// The institution the consent is for.
        institution: &'a str,
        /// The person it is about.
        person: &'a str,
    },
    /// Acknowledge receipt of a document addressed to an institution.
    Acknowledge(&'a ItemFacts),
    /// Import eligibility (資格情報) into the person index.
    ImportEligibility {
        /// The insurer whose members are imported; `None` for several.
        insurer: Option<&'a str>,
    },
    /// Run the retention job.
    RunRetention,
}

/// The circumstances of a read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessContext {
    /// Consent categories in force for the caller's institution and the item's person, now.
    pub consents: Vec<ConsentCategory>,
    /// The reason a clinician declared an emergency (救急時医療情報閲覧), if any.
    pub emergency: Option<String>,
}

/// The answer: allowed or not, the rule, and the purpose of use to audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allowed.
    pub allowed: bool,
    /// The rule that decided (stable codes, used in the audit log and in refusals).
    pub rule: &'static str,
    /// Why the access happens.
    pub purpose: Purpose,
}

fn allow(rule: &'static str, purpose: Purpose) -> Decision {
    Decision {
        allowed: true,
        rule,
        purpose,
    }
}

fn deny(rule: &'static str, purpose: Purpose) -> Decision {
    Decision {
        allowed: false,
        rule,
        purpose,
    }
}

/// The purpose of use a role acts under when it reads.
fn purpose_of(p: &Principal) -> Purpose {
    match p.role {
        Role::Institution | Role::Clinician => Purpose::Treatment,
        Role::Patient => Purpose::PatientSelfAccess,
        Role::Insurer => Purpose::Insurer,
        Role::Operator => Purpose::Operations,
        Role::Researcher | Role::Reviewer => Purpose::Unknown,
    }
}

fn same_institution(p: &Principal, inst: &str) -> bool {
    p.institution.as_ref().is_some_and(|i| i.as_str() == inst)
}

/// Decides one request.
pub fn decide(p: &Principal, req: &Request<'_>, ctx: &AccessContext) -> Decision {
    match req {
        Request::Read(item) => decide_read(p, item, ctx),
        Request::Submit { institution } | Request::Withdraw { institution } => match p.role {
            Role::Institution if same_institution(p, institution) => {
                allow("submitting-institution", Purpose::Treatment)
            }
            Role::Institution => deny("institution-mismatch", Purpose::Treatment),
            _ => deny("submit-needs-institution-system", purpose_of(p)),
        },
        Request::RecordConsent {
            institution,
            person,
        } => match p.role {
            // Given at the visit, recorded by the institution's system or its clinician.
            Role::Institution | Role::Clinician if same_institution(p, institution) => {
                allow("consent-at-visit", Purpose::Treatment)
            }
            Role::Institution | Role::Clinician => {
                deny("consent-other-institution", Purpose::Treatment)
            }
            // The patient may withdraw (or give) their own consent.
            Role::Patient if p.person.as_deref() == Some(*person) => {
                allow("consent-own", Purpose::PatientSelfAccess)
            }
            Role::Patient => deny("consent-other-person", Purpose::PatientSelfAccess),
            _ => deny("consent-not-permitted", purpose_of(p)),
        },
        Request::Acknowledge(item) => match p.role {
            Role::Institution | Role::Clinician
                if item.kind.is_document()
                    && item
                        .destination
                        .as_deref()
                        .is_some_and(|d| same_institution(p, d)) =>
            {
                allow("destination", Purpose::Treatment)
            }
            Role::Insurer
                if item.kind == ItemKind::Checkup
                    && item.insurer.is_some()
                    && p.insurer.as_ref().map(|i| i.as_str()) == item.insurer.as_deref() =>
            {
                allow("insurer-of-record", Purpose::Insurer)
            }
            _ => deny("not-addressed", purpose_of(p)),
        },
        Request::ImportEligibility { insurer } => match p.role {
            Role::Operator => allow("operator-eligibility", Purpose::Operations),
            Role::Insurer
                if insurer.is_some() && p.insurer.as_ref().map(|i| i.as_str()) == *insurer =>
            {
                allow("insurer-own-members", Purpose::Insurer)
            }
            _ => deny("eligibility-not-permitted", purpose_of(p)),
        },
        Request::RunRetention => match p.role {
            Role::Operator => allow("operator-retention", Purpose::Operations),
            _ => deny("retention-not-permitted", purpose_of(p)),
        },
    }
}

fn decide_read(p: &Principal, item: &ItemFacts, ctx: &AccessContext) -> Decision {
    match p.role {
        // The operator administers the service (exports for processing, support): allowed and
        // audited under the purpose of operations.
        Role::Operator => allow("operator-administration", Purpose::Operations),
        // Primary-use data never goes to researchers or reviewers: they see processed data under
        // a permit, elsewhere.
        Role::Researcher | Role::Reviewer => deny("no-primary-use", Purpose::Unknown),
        Role::Insurer => {
            let ours = item.kind == ItemKind::Checkup
                && item.insurer.is_some()
                && p.insurer.as_ref().map(|i| i.as_str()) == item.insurer.as_deref();
            if ours {
                allow("insurer-of-record", Purpose::Insurer)
            } else {
                deny("insurer-checkup-only", Purpose::Insurer)
            }
        }
        Role::Patient => {
            if p.person.as_deref() != Some(item.person.as_str()) {
                deny("other-person", Purpose::PatientSelfAccess)
            } else if matches!(item.kind, ItemKind::Referral | ItemKind::DischargeSummary) {
                // The seeds show patients their six items and check-up reports, not the letters
                // between doctors.
                deny("document-not-for-patient", Purpose::PatientSelfAccess)
            } else if item.flags.uninformed {
                deny("uninformed", Purpose::PatientSelfAccess)
            } else {
                allow("own-record", Purpose::PatientSelfAccess)
            }
        }
        Role::Institution | Role::Clinician => {
            if item
                .institution
                .as_deref()
                .is_some_and(|i| same_institution(p, i))
            {
                // What an institution itself submitted is its own record.
                return allow("own-institution", Purpose::Treatment);
            }
            if matches!(item.kind, ItemKind::Referral | ItemKind::DischargeSummary) {
                return if item
                    .destination
                    .as_deref()
                    .is_some_and(|d| same_institution(p, d))
                {
                    allow("destination", Purpose::Treatment)
                } else {
                    deny("not-destination", Purpose::Treatment)
                };
            }
            if item.flags.undelivered {
                return deny("undelivered", Purpose::Treatment);
            }
            let category = item.kind.consent_category();
            if category.is_some_and(|c| ctx.consents.contains(&c)) {
                return allow(
                    match category {
                        Some(ConsentCategory::Diagnosis) => "consent-diagnosis",
                        _ => "consent-care",
                    },
                    Purpose::Treatment,
                );
            }
            // 救急時医療情報閲覧: a physician who declares an emergency, with a reason.
            let physician = p.role == Role::Clinician
                && matches!(
                    p.qualification,
                    Some(Qualification::Doctor | Qualification::Dentist)
                );
            match &ctx.emergency {
                Some(reason) if physician && !reason.trim().is_empty() => allow(
                    "emergency",
                    Purpose::Emergency {
                        reason: reason.clone(),
                    },
                ),
                Some(_) if !physician => deny("emergency-physicians-only", Purpose::Treatment),
                Some(_) => deny("emergency-needs-reason", Purpose::Treatment),
                None => deny("no-consent", Purpose::Treatment),
            }
        }
    }
}
