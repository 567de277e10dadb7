//! The access policy, cell by cell: every principal kind × item kind × flag set × consent state ×
//! emergency declaration × addressed-or-not, and every other request kind × principal kind. The
//! expectations are written here as the seeds state them, row by row, independently of the
//! policy's own code; every cell is asserted (15,120 reads).

use kizuna_audit::Purpose;
use kizuna_auth::{InstitutionNumber, InsurerNumber, Principal, Qualification, Role, ScopeSet};
use kizuna_share::policy::{decide, AccessContext, Request};
use kizuna_share::{ConsentCategory, Flags, ItemFacts, ItemKind};

const OURS: &str = "1318814790";
const THEIRS: &str = "2713456781";
const PERSON: &str = "person-1";
const INSURER: &str = "06138010";

/// The callers of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// The institution system that submitted the item.
    SubmittingSystem,
    /// Another institution's system.
    OtherSystem,
    /// A doctor at the submitting institution.
    SubmittingDoctor,
    /// Doctor, dentist, nurse, pharmacist at another institution.
    OtherClinician(Qualification),
    PatientSelf,
    PatientOther,
    InsurerOfRecord,
    InsurerOther,
    Researcher,
    Reviewer,
    Operator,
}

const WHO: [Who; 14] = [
    Who::SubmittingSystem,
    Who::OtherSystem,
    Who::SubmittingDoctor,
    Who::OtherClinician(Qualification::Doctor),
    Who::OtherClinician(Qualification::Dentist),
    Who::OtherClinician(Qualification::Nurse),
    Who::OtherClinician(Qualification::Pharmacist),
    Who::PatientSelf,
    Who::PatientOther,
    Who::InsurerOfRecord,
    Who::InsurerOther,
    Who::Researcher,
    Who::Reviewer,
    Who::Operator,
];

fn principal(w: Who) -> Principal {
    let inst = |n: &str| InstitutionNumber::parse(n).ok();
    let mut p = Principal {
        subject: format!("{w:?}"),
        issuer: "test".into(),
        role: Role::Operator,
        institution: None,
        qualification: None,
        person: None,
        insurer: None,
        organization: None,
        researcher_category: None,
        scopes: ScopeSet::default(),
        token_id: None,
    };
    match w {
        Who::SubmittingSystem => {
            p.role = Role::Institution;
            p.institution = inst(THEIRS);
        }
        Who::OtherSystem => {
            p.role = Role::Institution;
            p.institution = inst(OURS);
        }
        Who::SubmittingDoctor => {
            p.role = Role::Clinician;
            p.institution = inst(THEIRS);
            p.qualification = Some(Qualification::Doctor);
        }
        Who::OtherClinician(q) => {
            p.role = Role::Clinician;
            p.institution = inst(OURS);
            p.qualification = Some(q);
        }
        Who::PatientSelf => {
            p.role = Role::Patient;
            p.person = Some(PERSON.into());
        }
        Who::PatientOther => {
            p.role = Role::Patient;
            p.person = Some("person-2".into());
        }
        Who::InsurerOfRecord => {
            p.role = Role::Insurer;
            p.insurer = InsurerNumber::parse(INSURER).ok();
        }
        Who::InsurerOther => {
            p.role = Role::Insurer;
            p.insurer = InsurerNumber::parse("39170188").ok();
        }
        Who::Researcher => p.role = Role::Researcher,
        Who::Reviewer => p.role = Role::Reviewer,
        Who::Operator => p.role = Role::Operator,
    }
    p
}

fn flag_sets() -> Vec<Flags> {
    let f = |lts, uninformed, undelivered| Flags {
        lts,
        uninformed,
        undelivered,
    };
    vec![
        f(false, false, false),
        f(true, false, false),
        f(false, true, false),
        f(false, false, true),
        f(false, true, true),
    ]
}

fn consent_sets() -> Vec<Vec<ConsentCategory>> {
    vec![
        vec![],
        vec![ConsentCategory::Diagnosis],
        vec![ConsentCategory::Care],
        vec![ConsentCategory::Diagnosis, ConsentCategory::Care],
    ]
}

/// The seeds, as a reader of them would write the rule for one cell: (allowed, purpose kind).
fn expected(
    w: Who,
    kind: ItemKind,
    flags: Flags,
    consents: &[ConsentCategory],
    emergency: Option<&str>,
    addressed_to_us: bool,
) -> (bool, &'static str) {
    let letter = matches!(kind, ItemKind::Referral | ItemKind::DischargeSummary);
    let category = match kind {
        ItemKind::Condition | ItemKind::Infection => Some(ConsentCategory::Diagnosis),
        ItemKind::Referral | ItemKind::DischargeSummary => None,
        _ => Some(ConsentCategory::Care),
    };
    match w {
        Who::Operator => (true, "operations"),
        Who::Researcher | Who::Reviewer => (false, "unknown"),
        Who::InsurerOfRecord => (kind == ItemKind::Checkup, "insurer"),
        Who::InsurerOther => (false, "insurer"),
        Who::PatientOther => (false, "patient"),
        Who::PatientSelf => (!letter && !flags.uninformed, "patient"),
        // The submitting institution sees its own record, flags and all.
        Who::SubmittingSystem | Who::SubmittingDoctor => (true, "treatment"),
        Who::OtherSystem | Who::OtherClinician(_) => {
            if letter {
                return (addressed_to_us, "treatment");
            }
            if flags.undelivered {
                return (false, "treatment");
            }
            if category.is_some_and(|c| consents.contains(&c)) {
                return (true, "treatment");
            }
            let physician = matches!(
                w,
                Who::OtherClinician(Qualification::Doctor | Qualification::Dentist)
            );
            match emergency {
                Some(reason) if physician && !reason.trim().is_empty() => (true, "emergency"),
                _ => (false, "treatment"),
            }
        }
    }
}

#[test]
fn every_read_cell() {
    let mut cells = 0;
    let mut allowed = 0;
    for w in WHO {
        let p = principal(w);
        for kind in ItemKind::ALL {
            for flags in flag_sets() {
                for consents in consent_sets() {
                    for emergency in [None, Some("意識障害で搬送"), Some("  ")] {
                        for addressed in [true, false] {
                            let item = ItemFacts {
                                kind,
                                person: PERSON.into(),
                                institution: Some(THEIRS.into()),
                                destination: kind.is_document().then(|| {
                                    if addressed { OURS } else { "1310000001" }.to_string()
                                }),
                                insurer: (kind == ItemKind::Checkup).then(|| INSURER.to_string()),
                                flags,
                            };
                            let ctx = AccessContext {
                                consents: consents.clone(),
                                emergency: emergency.map(str::to_string),
                            };
                            let d = decide(&p, &Request::Read(&item), &ctx);
                            let (want, purpose) =
                                expected(w, kind, flags, &consents, emergency, addressed);
                            assert_eq!(
                                d.allowed, want,
                                "{w:?} {kind:?} {flags:?} consents={consents:?} emergency={emergency:?} addressed={addressed}: rule {}",
                                d.rule
                            );
                            assert_eq!(
                                d.purpose.code(),
                                purpose,
                                "{w:?} {kind:?} {flags:?} {emergency:?}: purpose"
                            );
                            if let Purpose::Emergency { reason } = &d.purpose {
                                assert_eq!(
                                    Some(reason.as_str()),
                                    emergency,
                                    "the declared reason is audited"
                                );
                            }
                            cells += 1;
                            allowed += d.allowed as usize;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(cells, 14 * 9 * 5 * 4 * 3 * 2);
    assert!(
        allowed > 1000 && allowed < cells - 1000,
        "{allowed} of {cells}"
    );
}

#[test]
fn rules_name_the_reason() {
    let item = |kind, flags| ItemFacts {
        kind,
        person: PERSON.into(),
        institution: Some(THEIRS.into()),
        destination: None,
        insurer: None,
        flags,
    };
    let none = AccessContext::default();
    let doc = principal(Who::OtherClinician(Qualification::Doctor));
    let rule =
        |p: &Principal, i: &ItemFacts, c: &AccessContext| decide(p, &Request::Read(i), c).rule;
    let undelivered = Flags {
        undelivered: true,
        ..Flags::default()
    };
    let uninformed = Flags {
        uninformed: true,
        ..Flags::default()
    };
    assert_eq!(
        rule(&doc, &item(ItemKind::Condition, Flags::default()), &none),
        "no-consent"
    );
    assert_eq!(
        rule(&doc, &item(ItemKind::Condition, undelivered), &none),
        "undelivered"
    );
    assert_eq!(
        rule(
            &principal(Who::PatientSelf),
            &item(ItemKind::Condition, uninformed),
            &none
        ),
        "uninformed"
    );
    let nurse = principal(Who::OtherClinician(Qualification::Nurse));
    let emergency = AccessContext {
        emergency: Some("搬送".into()),
        ..AccessContext::default()
    };
    assert_eq!(
        rule(&nurse, &item(ItemKind::Lab, Flags::default()), &emergency),
        "emergency-physicians-only"
    );
    assert_eq!(
        rule(&doc, &item(ItemKind::Lab, Flags::default()), &emergency),
        "emergency"
    );
    let consent = AccessContext {
        consents: vec![ConsentCategory::Care],
        ..AccessContext::default()
    };
    assert_eq!(
        rule(&doc, &item(ItemKind::Lab, Flags::default()), &consent),
        "consent-care"
    );
    assert_eq!(
        rule(&doc, &item(ItemKind::Infection, Flags::default()), &consent),
        "no-consent"
    );
}

#[test]
fn every_other_request_cell() {
    let ours_doc = ItemFacts {
        kind: ItemKind::Referral,
        person: PERSON.into(),
        institution: Some(THEIRS.into()),
        destination: Some(OURS.into()),
        insurer: None,
        flags: Flags::default(),
    };
    let checkup = ItemFacts {
        kind: ItemKind::Checkup,
        insurer: Some(INSURER.into()),
        destination: None,
        ..ours_doc.clone()
    };
    for w in WHO {
        let p = principal(w);
        let ctx = AccessContext::default();
        let institution_system = matches!(w, Who::SubmittingSystem);
        let d = decide(
            &p,
            &Request::Submit {
                institution: THEIRS,
            },
            &ctx,
        );
        assert_eq!(d.allowed, institution_system, "{w:?} submit");
        let d = decide(
            &p,
            &Request::Withdraw {
                institution: THEIRS,
            },
            &ctx,
        );
        assert_eq!(d.allowed, institution_system, "{w:?} withdraw");
        // Consent for our institution: our system and our clinicians; the patient for themself.
        let at_ours = matches!(w, Who::OtherSystem | Who::OtherClinician(_));
        let d = decide(
            &p,
            &Request::RecordConsent {
                institution: OURS,
                person: PERSON,
            },
            &ctx,
        );
        assert_eq!(d.allowed, at_ours || w == Who::PatientSelf, "{w:?} consent");
        let d = decide(&p, &Request::Acknowledge(&ours_doc), &ctx);
        assert_eq!(d.allowed, at_ours, "{w:?} acknowledge referral");
        let d = decide(&p, &Request::Acknowledge(&checkup), &ctx);
        assert_eq!(
            d.allowed,
            w == Who::InsurerOfRecord,
            "{w:?} acknowledge check-up"
        );
        let d = decide(
            &p,
            &Request::ImportEligibility {
                insurer: Some(INSURER),
            },
            &ctx,
        );
        assert_eq!(
            d.allowed,
            matches!(w, Who::Operator | Who::InsurerOfRecord),
            "{w:?} eligibility"
        );
        let d = decide(&p, &Request::ImportEligibility { insurer: None }, &ctx);
        assert_eq!(
            d.allowed,
            w == Who::Operator,
            "{w:?} eligibility of several insurers"
        );
        let d = decide(&p, &Request::RunRetention, &ctx);
        assert_eq!(d.allowed, w == Who::Operator, "{w:?} retention");
    }
}
