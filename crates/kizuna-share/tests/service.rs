//! The sharing service end to end on a temporary store: eligibility and the person index,
//! submissions (validation, matching, replacement, refusal, withdrawal), documents and the inbox,
//! consent and emergency access, the patient's view and access history, and retention on an
//! injected clock.

use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use kizuna_audit::{AuditLog, AuditQuery, AuditWriter, LogOptions};
use kizuna_auth::{InstitutionNumber, InsurerNumber, Principal, Qualification, Role, ScopeSet};
use kizuna_fhir::validate::Validator;
use kizuna_fhir::Registry;
use kizuna_share::item::{ItemFacts, FLAG_SYSTEM, TAG_ITEM};
use kizuna_share::person::read_eligibility;
use kizuna_share::{
    ConsentCategory, FixedClock, ItemKind, MemberId, ShareConfig, ShareError, ShareService,
};
use kizuna_store::{SearchQuery, Store};
use kizuna_synth::clinical::BundleKind;
use kizuna_synth::population::{Institution, Person};
use serde_json::{json, Value};

struct World {
    svc: ShareService,
    clock: Arc<FixedClock>,
    audit: AuditWriter,
    _dir: tempfile::TempDir,
}

/// A service on a store: a temporary SQLite file, or (`schema` given) a fresh PostgreSQL schema of
/// its own on `KIZUNA_TEST_POSTGRES`, so the tests run side by side on one database.
async fn world_on(schema: Option<&str>) -> World {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = match schema {
        None => format!("sqlite://{}", dir.path().join("s.db").display()),
        Some(schema) => {
            // PostgreSQL cuts identifiers at 63 bytes; the test names are unique well before.
            let schema = &schema[..schema.len().min(40)];
            let base = std::env::var("KIZUNA_TEST_POSTGRES")
                .unwrap_or_else(|_| panic!("KIZUNA_TEST_POSTGRES is not set"));
            let admin = Store::open(&base, Registry::builtin())
                .await
                .unwrap_or_else(|e| panic!("{base}: {e}"));
            for sql in [
                format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
                format!("CREATE SCHEMA {schema}"),
            ] {
                admin
                    .execute_raw(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            let sep = if base.contains('?') { "&" } else { "?" };
            format!("{base}{sep}options=-csearch_path%3D{schema}")
        }
    };
    let store = Store::open(&url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let audit = AuditWriter::spawn(
        AuditLog::open(&dir.path().join("audit"), LogOptions::default())
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let clock = Arc::new(FixedClock::at(
        Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0)
            .single()
            .unwrap_or_default(),
    ));
    let svc = ShareService::new(
        store,
        Validator::builtin(),
        clock.clone(),
        ShareConfig::default(),
        Some(audit.clone()),
    );
    World {
        svc,
        clock,
        audit,
        _dir: dir,
    }
}

/// Each scenario runs on SQLite, and on PostgreSQL under `--include-ignored` (`bash .ci/run`).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::world_on(None).await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                #[ignore = "needs PostgreSQL: run `bash .ci/run`, or set KIZUNA_TEST_POSTGRES and pass --include-ignored"]
                async fn $name() {
                    super::$name(super::world_on(Some(concat!("share_", stringify!($name)))).await).await
                }
            )*
        }
    };
}

on_both_backends!(
    person_index_resolves_every_identifier_to_one_person,
    submissions_are_validated_matched_replaced_and_withdrawn,
    referrals_wait_in_the_destination_inbox_and_leave_after_receipt,
    discharge_summaries_alone_get_a_cover_letter_and_unread_letters_expire,
    checkups_go_to_the_insurer_and_the_patient,
    consent_emergency_flags_and_the_patients_view,
    retention_keeps_windows_latest_occasions_and_lts,
    concurrent_resends_leave_one_copy,
);

fn base(role: Role) -> Principal {
    Principal {
        subject: format!("{role:?}-1"),
        issuer: "test".into(),
        role,
        institution: None,
        qualification: None,
        person: None,
        insurer: None,
        organization: None,
        researcher_category: None,
        scopes: ScopeSet::default(),
        token_id: None,
    }
}

fn system(inst: &str) -> Principal {
    Principal {
        institution: InstitutionNumber::parse(inst).ok(),
        subject: format!("system-{inst}"),
        ..base(Role::Institution)
    }
}

fn clinician(inst: &str, q: Qualification) -> Principal {
    Principal {
        institution: InstitutionNumber::parse(inst).ok(),
        qualification: Some(q),
        subject: format!("clinician-{inst}"),
        ..base(Role::Clinician)
    }
}

fn patient(person: &str) -> Principal {
    Principal {
        person: Some(person.into()),
        ..base(Role::Patient)
    }
}

fn operator() -> Principal {
    base(Role::Operator)
}

fn eligibility(people: &[&Person]) -> Value {
    kizuna_synth::eligibility::bundle(people)
}

async fn import(w: &World, people: &[&Person]) {
    let (records, demo) = read_eligibility(&eligibility(people)).unwrap_or_else(|e| panic!("{e}"));
    w.svc
        .import_eligibility(&operator(), records, demo)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A synthetic person with several insurance periods, their submissions and their clinic.
fn subject(index_from: u64) -> (Person, Vec<(BundleKind, Value)>, Vec<Institution>) {
    let inst = kizuna_synth::population::institutions(21);
    for i in index_from..index_from + 400 {
        let p = kizuna_synth::population::person(21, i, 3);
        let subs = kizuna_synth::sample_submissions(21, i, 3, &inst);
        let has = |k| subs.iter().any(|(kind, _)| *kind == k);
        if p.coverage.len() >= 2
            && has(BundleKind::Condition)
            && has(BundleKind::Referral)
            && has(BundleKind::Checkup)
        {
            return (p, subs, inst);
        }
    }
    panic!("no suitable synthetic person");
}

fn bundle_of(subs: &[(BundleKind, Value)], k: BundleKind) -> Value {
    subs.iter()
        .find(|(kind, _)| *kind == k)
        .map(|(_, b)| b.clone())
        .unwrap_or_else(|| panic!("no {k:?}"))
}

fn submitter(b: &Value) -> String {
    b["identifier"]["value"]
        .as_str()
        .unwrap_or("")
        .split('^')
        .next()
        .unwrap_or("")
        .to_string()
}

/// The test subject's eligibility imported and one of their submissions registered by its
/// institution: (the bundle, the institution, the report).
async fn registered(
    w: &World,
    k: BundleKind,
) -> (Value, String, kizuna_share::submit::SubmissionReport) {
    let (p, subs, _) = subject(0);
    import(w, &[&p]).await;
    let b = bundle_of(&subs, k);
    let from = submitter(&b);
    let r = w
        .svc
        .submit(
            &system(&from),
            &serde_json::to_vec(&b).unwrap_or_default(),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (b, from, r)
}

/// A clinician's summary of a person, and the kinds of item it shows.
async fn summary_kinds(
    w: &World,
    doctor: &Principal,
    person: &str,
) -> (Value, std::collections::BTreeSet<ItemKind>) {
    let s = w
        .svc
        .clinician_summary(doctor, person, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let kinds = s["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| ItemFacts::of(&e["resource"]).map(|f| f.kind))
        .collect();
    (s, kinds)
}

/// Runs retention as the operator at the world's current time.
async fn retention(w: &World) -> kizuna_share::retention::RetentionReport {
    w.svc
        .run_retention(&operator())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn count(w: &World, rt: &str, person: &str) -> usize {
    let q =
        SearchQuery::from_pairs(&[("_tag".into(), format!("urn:kizuna:share:person|{person}"))]);
    w.svc
        .store()
        .search_ids(rt, &q)
        .await
        .map(|v| v.len())
        .unwrap_or(0)
}

async fn person_index_resolves_every_identifier_to_one_person(w: World) {
    let (p, _, _) = subject(0);
    import(&w, &[&p]).await;
    let ids: Vec<MemberId> = p
        .coverage
        .iter()
        .map(|c| MemberId::parse(&c.member_id()).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let mut persons = std::collections::BTreeSet::new();
    for m in &ids {
        persons.insert(w.svc.resolve_member(m).await.unwrap_or_default());
    }
    assert_eq!(
        persons.len(),
        1,
        "all {} identifiers are one person",
        ids.len()
    );
    let person = persons.into_iter().next().flatten().unwrap_or_default();
    let held = w.svc.identifiers_of(&person).await.unwrap_or_default();
    assert_eq!(held.len(), p.coverage.len());
    assert!(
        held.windows(2).all(|h| h[0].start <= h[1].start),
        "history in time order"
    );
    // Re-importing changes nothing; a second key claiming the identifier is refused.
    import(&w, &[&p]).await;
    let mut other = eligibility(&[&p]);
    other["entry"][1]["resource"]["beneficiary"]["identifier"]["value"] = json!("someone-else");
    let (records, demo) = read_eligibility(&other).unwrap_or_else(|e| panic!("{e}"));
    let r = w.svc.import_eligibility(&operator(), records, demo).await;
    assert!(matches!(r, Err(ShareError::Invalid { .. })), "{r:?}");
    // Only the operator (or the insurer for its own members) imports.
    let (records, demo) = read_eligibility(&eligibility(&[&p])).unwrap_or_else(|e| panic!("{e}"));
    let r = w
        .svc
        .import_eligibility(&system("1318814790"), records, demo)
        .await;
    assert!(matches!(r, Err(ShareError::Denied(_))));
}

async fn concurrent_resends_leave_one_copy(w: World) {
    let (p, subs, _) = subject(0);
    import(&w, &[&p]).await;
    let b = bundle_of(&subs, BundleKind::Condition);
    let me = system(&submitter(&b));
    let body = serde_json::to_vec(&b).unwrap_or_default();
    let conditions = b["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["resource"]["resourceType"] == "Condition")
                .count()
        })
        .unwrap_or(0);
    // Eight systems re-sending one identifier at once: each replaces the one before.
    let sends = (0..8).map(|_| w.svc.submit(&me, &body, None));
    let results = futures_join_all(sends).await;
    let mut person = String::new();
    let mut replaced = 0;
    for r in results {
        let r = r.unwrap_or_else(|e| panic!("{e}"));
        person = r.person;
        replaced += r.replaced;
    }
    assert_eq!(count(&w, "Condition", &person).await, conditions);
    assert_eq!(
        replaced,
        7 * conditions,
        "every send but the first replaced one copy"
    );
}

/// Polls futures side by side on the test's runtime (no extra dependency for `join_all`).
async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = fs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in pinned.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Submits a bundle given as JSON.
async fn submit_json(
    w: &World,
    p: &Principal,
    b: &Value,
) -> Result<kizuna_share::submit::SubmissionReport, ShareError> {
    w.svc
        .submit(p, &serde_json::to_vec(b).unwrap_or_default(), None)
        .await
}

async fn submissions_are_validated_matched_replaced_and_withdrawn(w: World) {
    let (p, subs, _) = subject(0);
    import(&w, &[&p]).await;
    let b = bundle_of(&subs, BundleKind::Condition);
    let inst = submitter(&b);
    let me = system(&inst);
    let body = serde_json::to_vec(&b).unwrap_or_default();
    let r = w
        .svc
        .submit(&me, &body, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let conditions = b["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["resource"]["resourceType"] == "Condition")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(r.stored.get("condition").copied(), Some(conditions));
    assert_eq!(count(&w, "Condition", &r.person).await, conditions);
    // The stored item points at the person, carries its facts, and is self-contained.
    let q = SearchQuery::from_pairs(&[(
        "_tag".into(),
        format!("urn:kizuna:share:person|{}", r.person),
    )]);
    let stored = w
        .svc
        .store()
        .search("Condition", &q)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let c = stored.resources[0].resource.clone().unwrap_or_default();
    assert_eq!(c["subject"]["reference"], format!("Patient/{}", r.person));
    let f = ItemFacts::of(&c).unwrap_or_else(|| panic!("facts"));
    assert_eq!(
        (f.kind, f.institution.as_deref()),
        (ItemKind::Condition, Some(inst.as_str()))
    );
    assert!(
        !c.to_string().contains("urn:uuid:"),
        "no dangling bundle references"
    );

    // Re-sending replaces, atomically: same count, new ids.
    let r2 = w
        .svc
        .submit(&me, &body, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r2.replaced, conditions);
    assert_eq!(count(&w, "Condition", &r.person).await, conditions);
    // The same card in full-width digits, and an older card of the same person, land on the person.
    let mut wide = b.clone();
    let old = p.coverage[0].member_id();
    for e in wide["entry"].as_array_mut().into_iter().flatten() {
        if e["resource"]["resourceType"] == "Patient" {
            for i in e["resource"]["identifier"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                if i["system"] == kizuna_share::MEMBER_ID_SYSTEM {
                    // JP-CLINS allows full-width 記号 and 番号; the insurer number stays half-width.
                    let widen = |p: &str| -> String {
                        p.chars()
                            .map(|c| {
                                if c.is_ascii_digit() {
                                    char::from_u32(c as u32 - '0' as u32 + 0xFF10).unwrap_or(c)
                                } else {
                                    c
                                }
                            })
                            .collect()
                    };
                    let full: String = old
                        .split(':')
                        .enumerate()
                        .map(|(n, p)| {
                            if n == 1 || n == 2 {
                                widen(p)
                            } else {
                                p.to_string()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(":");
                    i["value"] = json!(full);
                }
            }
        }
    }
    wide["identifier"]["value"] = json!(format!("{inst}^2026^OLDCARD1"));
    let r3 = submit_json(&w, &me, &wide)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        r3.person, r.person,
        "old identifier, full-width digits: same person"
    );
    assert_eq!(count(&w, "Condition", &r.person).await, 2 * conditions);

    // Refusals store nothing.
    let before = count(&w, "Condition", &r.person).await;
    let other = system("2713456781");
    assert!(matches!(
        w.svc.submit(&other, &body, None).await,
        Err(ShareError::Denied("institution-mismatch"))
    ));
    let mut bad = b.clone();
    bad["entry"][1]["resource"]["code"] = json!({"coding": [{"system": "x", "code": 1}]});
    assert!(matches!(
        submit_json(&w, &me, &bad).await,
        Err(ShareError::Validation(_))
    ));
    let mut stranger = b.clone();
    for e in stranger["entry"].as_array_mut().into_iter().flatten() {
        for i in e["resource"]["identifier"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            if i["system"] == kizuna_share::MEMBER_ID_SYSTEM {
                i["value"] = json!("39999999:1:1:00");
            }
        }
    }
    assert!(matches!(
        submit_json(&w, &me, &stranger).await,
        Err(ShareError::UnknownMember)
    ));
    // Invalid and of an unknown person (the person is looked up while the bundle is validated):
    // the validation answer comes first.
    let mut both = stranger.clone();
    both["entry"][1]["resource"]["code"] = json!({"coding": [{"system": "x", "code": 1}]});
    assert!(matches!(
        submit_json(&w, &me, &both).await,
        Err(ShareError::Validation(_))
    ));
    let mut foreign = b.clone();
    if let Some(e) = foreign["entry"].as_array_mut().and_then(|e| {
        e.iter_mut()
            .find(|e| e["resource"]["resourceType"] == "Condition")
    }) {
        e["resource"]["extension"][0]["valueIdentifier"]["value"] = json!("2713456781");
    }
    assert!(matches!(
        submit_json(&w, &me, &foreign).await,
        Err(ShareError::Invalid { .. })
    ));
    let huge = vec![b' '; 10 * 1024 * 1024 + 1];
    assert!(matches!(
        w.svc.submit(&me, &huge, None).await,
        Err(ShareError::TooLarge(_))
    ));
    assert!(matches!(
        w.svc.submit(&me, b"{not json", None).await,
        Err(ShareError::Invalid { .. })
    ));
    assert_eq!(count(&w, "Condition", &r.person).await, before);

    // Withdrawal: only by the submitting institution, and then it is gone.
    let id = b["identifier"]["value"].as_str().unwrap_or("");
    assert!(matches!(
        w.svc.withdraw(&other, id).await,
        Err(ShareError::Denied(_))
    ));
    assert_eq!(w.svc.withdraw(&me, id).await.unwrap_or(0), conditions);
    assert_eq!(count(&w, "Condition", &r.person).await, conditions);
    assert!(matches!(
        w.svc.withdraw(&me, id).await,
        Err(ShareError::NotFound(_))
    ));
}

async fn referrals_wait_in_the_destination_inbox_and_leave_after_receipt(w: World) {
    let (b, from, r) = registered(&w, BundleKind::Referral).await;
    let doc = r.inbox_document.clone().unwrap_or_default();
    let doc_id = doc.trim_start_matches("Bundle/").to_string();
    let stored = w
        .svc
        .store()
        .read("Bundle", &doc_id)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.resource)
        .unwrap_or_default();
    let facts = ItemFacts::of(&stored).unwrap_or_else(|| panic!("facts"));
    let dest = facts.destination.clone().unwrap_or_default();
    assert_ne!(dest, from);
    // The destination sees it; another institution does not; the patient does not.
    let inbox = w
        .svc
        .referral_inbox(&clinician(&dest, Qualification::Doctor))
        .await
        .unwrap_or_default();
    assert_eq!(
        inbox.iter().map(|e| e.document.clone()).collect::<Vec<_>>(),
        vec![doc.clone()]
    );
    assert!(w
        .svc
        .referral_inbox(&system("2713456781"))
        .await
        .unwrap_or_default()
        .is_empty());
    let ctx = kizuna_share::AccessContext::default();
    assert!(
        kizuna_share::decide(&system(&dest), &kizuna_share::Request::Read(&facts), &ctx).allowed
    );
    assert!(
        !kizuna_share::decide(
            &patient(&r.person),
            &kizuna_share::Request::Read(&facts),
            &ctx
        )
        .allowed
    );
    // The conditions inside the referral were registered as items too; no prescriptions.
    assert!(
        r.stored.get("condition").copied().unwrap_or(0) > 0,
        "{:?}",
        r.stored
    );
    assert!(!r.stored.contains_key("prescription"));
    // Acknowledged, it stays a week, then retention removes it for good.
    assert!(matches!(
        w.svc.acknowledge(&system("2713456781"), &doc_id).await,
        Err(ShareError::Denied(_))
    ));
    let ack = w
        .svc
        .acknowledge(&system(&dest), &doc_id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ack.state, "acknowledged");
    w.clock.advance(Duration::days(6));
    let rep = retention(&w).await;
    assert_eq!(rep.deleted.get("referral"), None);
    w.clock.advance(Duration::days(2));
    let rep = retention(&w).await;
    assert_eq!(rep.deleted.get("referral").copied(), Some(1));
    assert!(
        w.svc
            .store()
            .read("Bundle", &doc_id)
            .await
            .ok()
            .flatten()
            .is_none(),
        "deleted for good"
    );
    assert!(
        w.svc
            .store()
            .vread("Bundle", &doc_id, 1)
            .await
            .ok()
            .flatten()
            .is_none(),
        "history too"
    );

    // Without a destination a referral is refused.
    let mut nodest = b.clone();
    nodest["identifier"]["value"] = json!(format!("{from}^2026^NODEST"));
    for e in nodest["entry"].as_array_mut().into_iter().flatten() {
        if e["resource"]["resourceType"] == "Composition" {
            for s in e["resource"]["section"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                if s.pointer("/code/coding/0/code").and_then(Value::as_str) == Some("910") {
                    s["entry"] = json!([]);
                }
            }
        }
    }
    let refused = w
        .svc
        .submit(
            &system(&from),
            &serde_json::to_vec(&nodest).unwrap_or_default(),
            None,
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(ShareError::Invalid { .. }) | Err(ShareError::Validation(_))
        ),
        "{refused:?}"
    );
}

async fn discharge_summaries_alone_get_a_cover_letter_and_unread_letters_expire(w: World) {
    let (p, subs, _) = subject(0);
    import(&w, &[&p]).await;
    let b = bundle_of(&subs, BundleKind::Discharge);
    let from = submitter(&b);
    let body = serde_json::to_vec(&b).unwrap_or_default();
    assert!(
        matches!(
            w.svc.submit(&system(&from), &body, None).await,
            Err(ShareError::Invalid { .. })
        ),
        "needs a destination"
    );
    let dest = "2713456781";
    let r = w
        .svc
        .submit(&system(&from), &body, Some(dest))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let inbox = w
        .svc
        .referral_inbox(&system(dest))
        .await
        .unwrap_or_default();
    assert_eq!(inbox.len(), 1);
    assert_eq!(
        inbox[0].attachments.len(),
        1,
        "the summary travels with the cover letter"
    );
    assert_eq!(
        inbox[0].document,
        r.inbox_document.clone().unwrap_or_default()
    );
    // Never acknowledged: gone after six months, with the attachment.
    w.clock.advance(Duration::days(182));
    let rep = retention(&w).await;
    assert!(!rep.deleted.contains_key("referral"));
    w.clock.advance(Duration::days(2));
    let rep = retention(&w).await;
    assert_eq!(rep.deleted.get("referral").copied(), Some(1));
    assert_eq!(rep.deleted.get("discharge-summary").copied(), Some(1));
    assert!(w
        .svc
        .referral_inbox(&system(dest))
        .await
        .unwrap_or_default()
        .is_empty());
}

async fn checkups_go_to_the_insurer_and_the_patient(w: World) {
    let (b, _, r) = registered(&w, BundleKind::Checkup).await;
    let insurer = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["identifier"].as_array())
        .flatten()
        .find(|i| i["system"] == kizuna_share::item::INSURER_SYSTEM)
        .and_then(|i| i["value"].as_str())
        .unwrap_or("")
        .to_string();
    let ins = Principal {
        insurer: InsurerNumber::parse(&insurer).ok(),
        ..base(Role::Insurer)
    };
    let reports = w.svc.checkup_reports(&ins).await.unwrap_or_default();
    assert_eq!(reports.len(), 1);
    let other = Principal {
        insurer: InsurerNumber::parse("39170188").ok(),
        ..base(Role::Insurer)
    };
    assert!(w
        .svc
        .checkup_reports(&other)
        .await
        .unwrap_or_default()
        .is_empty());
    let mine = w
        .svc
        .patient_record(&patient(&r.person))
        .await
        .unwrap_or_default();
    assert!(mine["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| ItemFacts::of(&e["resource"]).map(|f| f.kind) == Some(ItemKind::Checkup)));
    // Kept five years.
    w.clock.advance(Duration::days(5 * 365));
    let rep = retention(&w).await;
    assert!(!rep.deleted.contains_key("checkup"));
    w.clock.advance(Duration::days(3));
    let rep = retention(&w).await;
    assert_eq!(rep.deleted.get("checkup").copied(), Some(1));
}

async fn consent_emergency_flags_and_the_patients_view(w: World) {
    let (p, subs, _) = subject(0);
    import(&w, &[&p]).await;
    let mut person = String::new();
    for k in [
        BundleKind::Condition,
        BundleKind::Observation,
        BundleKind::AllergyIntolerance,
    ] {
        let mut b = bundle_of(&subs, k);
        let from = submitter(&b);
        if k == BundleKind::Condition {
            // One condition the patient has not been told of, one never to be delivered: make sure
            // there are two.
            if let Some(entries) = b["entry"].as_array_mut() {
                let conditions = entries
                    .iter()
                    .filter(|e| e["resource"]["resourceType"] == "Condition")
                    .count();
                if conditions < 2 {
                    let first = entries
                        .iter()
                        .find(|e| e["resource"]["resourceType"] == "Condition")
                        .cloned();
                    if let Some(mut c) = first {
                        let id = "9d1c0a52-5f7e-4c1b-9a55-000000000002";
                        c["fullUrl"] = json!(format!("urn:uuid:{id}"));
                        c["resource"]["id"] = json!(id);
                        entries.push(c);
                    }
                }
            }
            let mut n = 0;
            for e in b["entry"].as_array_mut().into_iter().flatten() {
                if e["resource"]["resourceType"] == "Condition" {
                    let flag = ["UNINFORMED", "UNDELIVERED"].get(n).copied();
                    if let Some(f) = flag {
                        e["resource"]["meta"]["tag"] = json!([{"system": FLAG_SYSTEM, "code": f}]);
                    }
                    n += 1;
                }
            }
            assert!(n >= 2, "two conditions to flag");
        }
        if k == BundleKind::Observation {
            // An earlier result of the first measured test, higher than the latest: a trend "down".
            if let Some(entries) = b["entry"].as_array_mut() {
                let first = entries
                    .iter()
                    .find(|e| {
                        e["resource"]["resourceType"] == "Observation"
                            && e["resource"]["valueQuantity"]["value"].is_number()
                    })
                    .cloned();
                let Some(mut o) = first else {
                    panic!("no measured lab result")
                };
                let id = "9d1c0a52-5f7e-4c1b-9a55-000000000003";
                o["fullUrl"] = json!(format!("urn:uuid:{id}"));
                o["resource"]["id"] = json!(id);
                o["resource"]["effectiveDateTime"] = json!("2001-02-03T09:00:00+09:00");
                let v = o["resource"]["valueQuantity"]["value"]
                    .as_f64()
                    .unwrap_or(0.0);
                o["resource"]["valueQuantity"]["value"] = json!(v + 1.0);
                entries.push(o);
            }
        }
        let r = w
            .svc
            .submit(
                &system(&from),
                &serde_json::to_vec(&b).unwrap_or_default(),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{k:?}: {e}"));
        person = r.person;
    }
    let here = "2713456781";
    let doctor = clinician(here, Qualification::Doctor);
    // No consent: nothing.
    assert!(matches!(
        w.svc.clinician_summary(&doctor, &person, None).await,
        Err(ShareError::Denied("no-consent"))
    ));
    // Consent to diagnoses only: conditions and infections, not labs or allergies, never UNDELIVERED.
    let req = kizuna_share::consent::ConsentRequest {
        person: person.clone(),
        institution: here.into(),
        categories: vec![ConsentCategory::Diagnosis],
        until: None,
    };
    assert!(
        matches!(
            w.svc
                .record_consent(&clinician("1318814790", Qualification::Doctor), &req)
                .await,
            Err(ShareError::Denied(_))
        ),
        "only at the visit's institution"
    );
    let consent = w
        .svc
        .record_consent(&doctor, &req)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (s, kinds) = summary_kinds(&w, &doctor, &person).await;
    assert!(
        kinds.contains(&ItemKind::Condition) && kinds.contains(&ItemKind::Infection),
        "{kinds:?}"
    );
    assert!(
        !kinds.contains(&ItemKind::Lab)
            && !kinds.contains(&ItemKind::OtherAllergy)
            && !kinds.contains(&ItemKind::DrugAllergy)
    );
    assert!(
        !s.to_string().contains("UNDELIVERED"),
        "undelivered items never reach another institution"
    );
    // Care consent too: labs (with trends) and allergies appear.
    let req2 = kizuna_share::consent::ConsentRequest {
        categories: vec![ConsentCategory::Care],
        ..req.clone()
    };
    w.svc
        .record_consent(&doctor, &req2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (s, kinds) = summary_kinds(&w, &doctor, &person).await;
    assert!(kinds.contains(&ItemKind::Lab), "{kinds:?}");
    // Every item is shown whole, as stored; the latest result of a test also carries its trend.
    let mut trends = 0;
    for e in s["entry"].as_array().into_iter().flatten().skip(1) {
        let mut shown = e["resource"].clone();
        let (rt, id) = (
            shown["resourceType"].as_str().unwrap_or("").to_string(),
            shown["id"].as_str().unwrap_or("").to_string(),
        );
        let stored = w
            .svc
            .store()
            .read(&rt, &id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .and_then(|st| st.resource)
            .unwrap_or_default();
        if let Some(ext) = shown.get_mut("extension").and_then(Value::as_array_mut) {
            let before = ext.len();
            ext.retain(|x| x["url"] != kizuna_share::views::EXT_TREND);
            trends += before - ext.len();
            assert!(
                before == ext.len()
                    || e["resource"]["extension"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|x| x["valueCode"] == "down"),
                "the earlier, higher result makes the trend down"
            );
            if ext.is_empty() && stored.get("extension").is_none() {
                if let Some(o) = shown.as_object_mut() {
                    o.remove("extension");
                }
            }
        }
        assert_eq!(shown, stored, "{rt}/{id}");
    }
    assert!(trends > 0, "no lab result carries a trend");
    // The consent lapses after its period; the patient may revoke earlier.
    w.svc
        .revoke_consent(&patient(&person), consent["id"].as_str().unwrap_or(""))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    w.clock.advance(Duration::days(31));
    assert!(matches!(
        w.svc.clinician_summary(&doctor, &person, None).await,
        Err(ShareError::Denied("no-consent"))
    ));
    // Emergency: a physician with a reason; a nurse cannot.
    let nurse = clinician(here, Qualification::Nurse);
    assert!(matches!(
        w.svc
            .clinician_summary(&nurse, &person, Some("搬送".into()))
            .await,
        Err(ShareError::Denied("emergency-physicians-only"))
    ));
    let e = w
        .svc
        .clinician_summary(&doctor, &person, Some("意識障害で救急搬送".into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(e["entry"].as_array().map(|a| a.len() > 1).unwrap_or(false));
    assert!(!e.to_string().contains("UNDELIVERED"));
    // The patient's view: the six items minus UNINFORMED; the history shows the emergency access.
    let me = patient(&person);
    let mine = w
        .svc
        .patient_record(&me)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!mine.to_string().contains("UNINFORMED"));
    assert!(
        mine.to_string().contains("UNDELIVERED"),
        "the patient sees what is not delivered to others"
    );
    let history = w
        .svc
        .access_history(&me)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let emergency: Vec<&Value> = history.iter().filter(|h| h["emergency"] == true).collect();
    assert!(!emergency.is_empty());
    assert_eq!(emergency[0]["emergency_reason"], "意識障害で救急搬送");
    assert!(
        history.iter().any(|h| h["allowed"] == false),
        "refusals are in the history too"
    );
    assert!(matches!(
        w.svc
            .access_history(&patient("someone-else"))
            .await
            .map(|h| h.len()),
        Ok(0) | Err(_)
    ));
    // Every decision was audited, with the person.
    let _ = w.audit.flush();
    let n = w
        .audit
        .log()
        .lock()
        .map(|l| {
            l.query(&AuditQuery {
                person: Some(person.clone()),
                ..Default::default()
            })
            .map(|v| v.len())
            .unwrap_or(0)
        })
        .unwrap_or(0);
    assert!(n > 20, "{n}");
}

async fn retention_keeps_windows_latest_occasions_and_lts(w: World) {
    let (p, subs, _) = subject(0);
    import(&w, &[&p]).await;
    let b = bundle_of(&subs, BundleKind::Observation);
    let from = submitter(&b);
    let me = system(&from);
    // Five lab occasions a year apart. In the first, one infection item is LTS (JP-CLINS allows
    // the flag on the designated infection items only); nothing else is flagged.
    let kinds: Vec<Option<ItemKind>> = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| kizuna_share::item::classify(&e["resource"]))
        .collect();
    let labs_per_occasion = kinds.iter().filter(|k| **k == Some(ItemKind::Lab)).count();
    let infections_per_occasion = kinds
        .iter()
        .filter(|k| **k == Some(ItemKind::Infection))
        .count();
    assert!(labs_per_occasion > 1 && infections_per_occasion > 1);
    let mut person = String::new();
    for year in 0..5 {
        let mut o = b.clone();
        o["identifier"]["value"] = json!(format!("{from}^{}^LAB{year}", 2021 + year));
        let mut flagged = std::collections::BTreeSet::new();
        for (e, kind) in o["entry"].as_array_mut().into_iter().flatten().zip(&kinds) {
            if e["resource"]["resourceType"] == "Observation" {
                e["resource"]["effectiveDateTime"] =
                    json!(format!("{}-02-01T09:30:00+09:00", 2021 + year));
                if let Some(m) = e["resource"]["meta"].as_object_mut() {
                    m.remove("tag");
                }
                if year == 0 && *kind == Some(ItemKind::Infection) && flagged.insert(*kind) {
                    e["resource"]["meta"]["tag"] = json!([{"system": FLAG_SYSTEM, "code": "LTS"}]);
                }
            }
        }
        let r = w
            .svc
            .submit(&me, &serde_json::to_vec(&o).unwrap_or_default(), None)
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        person = r.person;
    }
    let labs_before = count(&w, "Observation", &person).await;
    assert_eq!(
        labs_before,
        5 * (labs_per_occasion + infections_per_occasion)
    );
    // 2026-04-01: only 2025-02-01 is inside the year, but the latest three occasions stay; the
    // lab items of 2021 and 2022 go. Infection items are kept 5 years.
    let rep = retention(&w).await;
    let deleted = rep.deleted.get("lab").copied().unwrap_or(0);
    assert_eq!(deleted, 2 * labs_per_occasion, "{rep:?}");
    assert_eq!(rep.deleted.get("infection"), None, "{rep:?}");
    assert!(rep.kept_lts.is_empty(), "{rep:?}");
    assert_eq!(
        count(&w, "Observation", &person).await,
        labs_before - deleted
    );
    // Five years on, the 5-year items go too (but LTS ones stay).
    let rep = retention(&w).await;
    assert_eq!(
        rep.deleted.values().sum::<usize>(),
        0,
        "a second run finds nothing new"
    );
    w.clock.advance(Duration::days(5 * 365 + 2));
    let rep = retention(&w).await;
    assert_eq!(
        rep.deleted.get("infection").copied().unwrap_or(0),
        5 * infections_per_occasion - 1,
        "{rep:?}"
    );
    assert_eq!(rep.kept_lts.get("infection"), Some(&1), "{rep:?}");
    // Only the operator runs retention; each deletion is audited.
    assert!(matches!(
        w.svc.run_retention(&me).await,
        Err(ShareError::Denied(_))
    ));
    let _ = w.audit.flush();
    let audited = w
        .audit
        .log()
        .lock()
        .map(|l| {
            l.query(&AuditQuery {
                person: Some(person.clone()),
                ..Default::default()
            })
            .map(|v| {
                v.iter()
                    .filter(|e| e.entry.action == "retention-delete")
                    .count()
            })
            .unwrap_or(0)
        })
        .unwrap_or(0);
    assert!(audited >= deleted);
    let tagged = SearchQuery::from_pairs(&[("_tag".into(), format!("{TAG_ITEM}|lab"))]);
    assert!(
        w.svc
            .store()
            .search_ids("Observation", &tagged)
            .await
            .map(|v| v.len())
            .unwrap_or(0)
            < labs_before
    );
}
