//! Terminology: package CodeSystems and ValueSets, the JLAC code sets, master importers.

use kizuna_fhir::terminology::{jlac, Column, MasterImporter, MasterKind, Membership, Terminology};

#[test]
fn local_code_systems_are_complete() {
    let t = Terminology::builtin();
    let cs = "http://terminology.hl7.org/CodeSystem/condition-clinical";
    assert_eq!(t.code_in_system(cs, "active"), Membership::Member);
    assert_eq!(t.code_in_system(cs, "bogus"), Membership::NotMember);
    // External systems cannot be checked here: unknown, never "invalid".
    assert_eq!(
        t.code_in_system("http://loinc.org", "718-7"),
        Membership::Unknown
    );
}

#[test]
fn value_sets_with_hierarchy_filters() {
    let t = Terminology::builtin();
    // JLAC10 Hb value set: descendent-of "Hb" in the CLINS core-lab code system.
    let vs = "http://jpfhir.jp/fhir/clins/ValueSet/JLAC10/JP_CLINS_ObsLabResult_CoreLabo_hb_VS";
    let sys = jlac::JLAC10_CORE;
    let hb = jlac::rows(sys)
        .into_iter()
        .find(|r| r.item_group == "Hb")
        .map(|r| r.code);
    let tp = jlac::rows(sys)
        .into_iter()
        .find(|r| r.item_group == "TP")
        .map(|r| r.code);
    let (Some(hb), Some(tp)) = (hb, tp) else {
        panic!("JLAC10 rows for Hb and TP")
    };
    assert_eq!(t.validate_code(vs, Some(sys), &hb), Membership::Member);
    assert_eq!(t.validate_code(vs, Some(sys), &tp), Membership::NotMember);
    assert_eq!(
        t.validate_code(vs, Some(sys), "Hb"),
        Membership::NotMember,
        "descendent-of excludes the parent"
    );
    assert_eq!(
        t.validate_code("http://example.org/no-such-vs", None, "x"),
        Membership::Unknown
    );
}

#[test]
fn jlac_sets_cover_the_43_and_5_items() {
    let groups = |s: &str| {
        jlac::rows(s)
            .into_iter()
            .map(|r| r.item_group)
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert!(
        groups(jlac::JLAC10_CORE).len() >= 43,
        "43 core lab items (some split into sub-items)"
    );
    assert!(
        groups(jlac::JLAC10_INFECTION).len() >= 5,
        "5 infection items"
    );
    assert!(jlac::rows(jlac::JLAC11_CORE).len() > jlac::rows(jlac::JLAC10_CORE).len());
}

#[test]
fn master_importer_reads_named_and_positional_columns() {
    let csv = "病名管理番号,病名表記\n20061593,高血圧症\n,空行\n20058911,狭心症\n";
    let imp = MasterImporter {
        kind: MasterKind::MedisDisease,
        delimiter: b',',
        has_header: true,
        code_column: Column::Name("病名管理番号".into()),
        display_column: Column::Name("病名表記".into()),
    };
    let t = imp.import(csv.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.system,
        "http://medis.or.jp/CodeSystem/master-disease-keyNumber"
    );
    assert_eq!(t.codes.len(), 2);
    assert_eq!(
        t.codes.get("20061593").map(String::as_str),
        Some("高血圧症")
    );
    let tsv = "2171022F6276\tアムロジピンＯＤ錠１０ｍｇ\n";
    let imp = MasterImporter {
        kind: MasterKind::YjDrug,
        delimiter: b'\t',
        has_header: false,
        code_column: Column::Index(0),
        display_column: Column::Index(1),
    };
    let t = imp.import(tsv.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.codes.len(), 1);
    let bad = MasterImporter {
        kind: MasterKind::YjDrug,
        delimiter: b',',
        has_header: true,
        code_column: Column::Name("missing".into()),
        display_column: Column::Index(1),
    };
    assert!(bad.import("a,b\n1,2\n".as_bytes()).is_err());
}

#[test]
fn imported_master_makes_codes_checkable() {
    let t = Terminology::builtin();
    let sys = MasterKind::MedisDisease.system();
    // The sample table is incomplete: unknown codes are "cannot check", not "invalid".
    assert_eq!(t.code_in_system(sys, "20061593"), Membership::Member);
    assert_eq!(t.code_in_system(sys, "99999999"), Membership::Unknown);
}
