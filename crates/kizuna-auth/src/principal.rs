//! Who is calling: every kind of user the seeds name, with the identifiers their role needs.

use serde::{Deserialize, Serialize};

use crate::scope::ScopeSet;
use crate::AuthError;

/// The kinds of user of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A hospital's or clinic's system (医療機関システム), submitting and retrieving on the institution's behalf.
    Institution,
    /// A clinician at an institution (医師・歯科医師・薬剤師・看護師).
    Clinician,
    /// A patient, bound to one person (本人, マイナポータル).
    Patient,
    /// An insurer (保険者), receiving check-up reports.
    Insurer,
    /// A researcher applying for and using data under a permit (利用者).
    Researcher,
    /// A member of the review body (審査委員会).
    Reviewer,
    /// The operator of the service (運営者).
    Operator,
}

impl Role {
    /// All roles, for exhaustive tests.
    pub const ALL: [Role; 7] = [
        Role::Institution,
        Role::Clinician,
        Role::Patient,
        Role::Insurer,
        Role::Researcher,
        Role::Reviewer,
        Role::Operator,
    ];

    /// Parses the claim value (`clinician`, `patient` …).
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "institution" => Role::Institution,
            "clinician" => Role::Clinician,
            "patient" => Role::Patient,
            "insurer" => Role::Insurer,
            "researcher" => Role::Researcher,
            "reviewer" => Role::Reviewer,
            "operator" => Role::Operator,
            _ => return None,
        })
    }

    /// The claim value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Institution => "institution",
            Role::Clinician => "clinician",
            Role::Patient => "patient",
            Role::Insurer => "insurer",
            Role::Researcher => "researcher",
            Role::Reviewer => "reviewer",
            Role::Operator => "operator",
        }
    }
}

/// A clinician's qualification (資格).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Qualification {
    /// 医師
    Doctor,
    /// 歯科医師
    Dentist,
    /// 薬剤師
    Pharmacist,
    /// 看護師
    Nurse,
}

impl Qualification {
    /// Parses the claim value.
    pub fn parse(s: &str) -> Option<Qualification> {
        Some(match s {
            "doctor" => Qualification::Doctor,
            "dentist" => Qualification::Dentist,
            "pharmacist" => Qualification::Pharmacist,
            "nurse" => Qualification::Nurse,
            _ => return None,
        })
    }
}

/// The user category of a researcher, which the review weighs differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResearcherCategory {
    /// 国・自治体等の公的機関
    PublicBody,
    /// 大学・研究機関
    Academic,
    /// 製薬企業
    Pharmaceutical,
    /// 医療機器企業
    Device,
    /// その他
    Other,
}

impl ResearcherCategory {
    /// Parses the claim value.
    pub fn parse(s: &str) -> Option<ResearcherCategory> {
        Some(match s {
            "public-body" => ResearcherCategory::PublicBody,
            "academic" => ResearcherCategory::Academic,
            "pharmaceutical" => ResearcherCategory::Pharmaceutical,
            "device" => ResearcherCategory::Device,
            "other" => ResearcherCategory::Other,
            _ => return None,
        })
    }
}

/// A 10-digit medical institution number (医療機関番号: 都道府県番号 2, 点数表番号 1, 医療機関コード 7).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstitutionNumber(String);

impl InstitutionNumber {
    /// Parses and checks the structure: prefecture 01–47, score table 1 (医科), 3 (歯科) or 4 (薬局).
    pub fn parse(s: &str) -> Result<InstitutionNumber, AuthError> {
        let bad = || {
            AuthError::InvalidClaims(format!(
                "医療機関番号は 10 桁です / institution number must be 10 digits: {s:?}"
            ))
        };
        if s.len() != 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let pref: u32 = s[..2].parse().map_err(|_| bad())?;
        if !(1..=47).contains(&pref) || !matches!(&s[2..3], "1" | "3" | "4") {
            return Err(bad());
        }
        Ok(InstitutionNumber(s.to_string()))
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for InstitutionNumber {
    type Error = AuthError;
    fn try_from(s: String) -> Result<Self, AuthError> {
        InstitutionNumber::parse(&s)
    }
}

impl From<InstitutionNumber> for String {
    fn from(n: InstitutionNumber) -> String {
        n.0
    }
}

/// An insurer number (保険者番号): 8 digits (法別番号 2, 都道府県番号 2, 保険者別番号 3, 検証番号 1), or 6 digits
/// for 国民健康保険.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InsurerNumber(String);

impl InsurerNumber {
    /// Parses and checks the structure.
    pub fn parse(s: &str) -> Result<InsurerNumber, AuthError> {
        if !(s.len() == 6 || s.len() == 8) || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AuthError::InvalidClaims(format!(
                "保険者番号は 6 桁または 8 桁です / insurer number must be 6 or 8 digits: {s:?}"
            )));
        }
        Ok(InsurerNumber(s.to_string()))
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for InsurerNumber {
    type Error = AuthError;
    fn try_from(s: String) -> Result<Self, AuthError> {
        InsurerNumber::parse(&s)
    }
}

impl From<InsurerNumber> for String {
    fn from(n: InsurerNumber) -> String {
        n.0
    }
}

/// An authenticated caller: role, the identifiers the role requires, and the granted scopes.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// Token subject (stable user or client id).
    pub subject: String,
    /// Token issuer.
    pub issuer: String,
    /// Role.
    pub role: Role,
    /// Institution, for institution systems and clinicians.
    pub institution: Option<InstitutionNumber>,
    /// Qualification, for clinicians.
    pub qualification: Option<Qualification>,
    /// The person a patient is (the service's person id).
    pub person: Option<String>,
    /// Insurer number, for insurers.
    pub insurer: Option<InsurerNumber>,
    /// Organisation, for researchers and reviewers.
    pub organization: Option<String>,
    /// Researcher user category.
    pub researcher_category: Option<ResearcherCategory>,
    /// Granted scopes.
    pub scopes: ScopeSet,
    /// Token id (`jti`), for audit.
    pub token_id: Option<String>,
}

impl Principal {
    /// Checks that the role has what it needs (a clinician an institution and a qualification, a patient
    /// a person …) and nothing that contradicts it.
    pub fn check(&self) -> Result<(), AuthError> {
        let missing = |what: &str| {
            Err(AuthError::InvalidClaims(format!(
                "{} に {what} がありません / {} token lacks {what}",
                self.role.as_str(),
                self.role.as_str()
            )))
        };
        match self.role {
            Role::Institution if self.institution.is_none() => missing("institution"),
            Role::Clinician if self.institution.is_none() => missing("institution"),
            Role::Clinician if self.qualification.is_none() => missing("qualification"),
            Role::Patient if self.person.is_none() => missing("person"),
            Role::Insurer if self.insurer.is_none() => missing("insurer"),
            Role::Researcher if self.organization.is_none() => missing("organization"),
            Role::Researcher if self.researcher_category.is_none() => {
                missing("researcher_category")
            }
            _ => Ok(()),
        }
    }
}
