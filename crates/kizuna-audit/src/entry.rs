//! What one audit entry records: who, what, why, the policy outcome, when and from where.
//!
//! Entries carry identifiers and codes only — never names, insurance numbers, addresses or resource
//! bodies — so the log itself is not a second copy of the health data.

use serde::{Deserialize, Serialize};

/// The kind of principal, mirrored from `kizuna-auth` so the audit log stands alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActorKind {
    /// A hospital or clinic system (医療機関システム).
    Institution,
    /// A clinician at an institution.
    Clinician,
    /// A patient (本人).
    Patient,
    /// An insurer (保険者).
    Insurer,
    /// A researcher (利用者).
    Researcher,
    /// A member of the review body (審査委員).
    Reviewer,
    /// The operator (運営者).
    Operator,
    /// The service itself (retention jobs, processing runs).
    System,
    /// A caller that could not be identified (bad or missing token).
    Anonymous,
}

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// Kind of principal.
    pub kind: ActorKind,
    /// Subject identifier (token `sub`), never a name.
    pub id: String,
    /// 10-digit institution number, for institution systems and clinicians.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub institution: Option<String>,
    /// Issuer of the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

/// Why (purpose of use), as the seeds distinguish them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Purpose {
    /// Care with the patient's consent (診療).
    Treatment,
    /// Emergency access without consent (救急時医療情報閲覧), with the declared reason.
    Emergency {
        /// The clinician's stated reason.
        reason: String,
    },
    /// The patient looking at their own data.
    PatientSelfAccess,
    /// An insurer receiving check-up reports.
    Insurer,
    /// Secondary use under a data permit.
    Research {
        /// The permit id.
        permit: String,
    },
    /// Operations (retention, processing, administration).
    Operations,
    /// Not established (rejected before a purpose was known).
    Unknown,
}

impl Purpose {
    /// Short code for display and search.
    pub fn code(&self) -> &'static str {
        match self {
            Purpose::Treatment => "treatment",
            Purpose::Emergency { .. } => "emergency",
            Purpose::PatientSelfAccess => "patient",
            Purpose::Insurer => "insurer",
            Purpose::Research { .. } => "research",
            Purpose::Operations => "operations",
            Purpose::Unknown => "unknown",
        }
    }
}

/// What was acted on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// FHIR resource type, when the action touched a resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    /// Resource id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// The person whose data it is (the service's person id), for the patient's access history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<String>,
    /// A dataset (secondary use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// A permit (secondary use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permit: Option<String>,
}

/// The policy outcome: allowed or denied, and by which rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// True when access was allowed.
    pub allowed: bool,
    /// The rule that decided (`consent-category-1`, `scope-missing`, `token-expired` …).
    pub rule: String,
}

impl Outcome {
    /// Allowed by `rule`.
    pub fn allow(rule: impl Into<String>) -> Outcome {
        Outcome {
            allowed: true,
            rule: rule.into(),
        }
    }

    /// Denied by `rule`.
    pub fn deny(rule: impl Into<String>) -> Outcome {
        Outcome {
            allowed: false,
            rule: rule.into(),
        }
    }
}

/// An entry as the caller records it; the log adds the sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEntry {
    /// When (RFC 3339, from the injected clock).
    pub time: String,
    /// Who.
    pub actor: Actor,
    /// What: the interaction (`read`, `search`, `create`, `emergency-open`, `token`, `history` …).
    pub action: String,
    /// On what.
    #[serde(default)]
    pub target: Target,
    /// Why.
    pub purpose: Purpose,
    /// Allow or deny, with the rule.
    pub outcome: Outcome,
    /// From where (client address), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Request id, to group the entries of one request (one per resource a search returned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// An entry as stored: its position in the log and the recorded fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the log, from 0, without gaps.
    pub seq: u64,
    /// The recorded fields.
    #[serde(flatten)]
    pub entry: NewEntry,
}
