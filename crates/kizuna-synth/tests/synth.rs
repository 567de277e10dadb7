//! The synthetic data is what later tests and benchmarks stand on: it must validate, be reproducible to
//! the byte, and look like the population it imitates.

use std::collections::BTreeMap;
use std::path::Path;

use kizuna_fhir::outcome::Severity;
use kizuna_fhir::validate::Validator;
use kizuna_synth::clinical::BundleKind;
use kizuna_synth::population::{institutions, person, InsuranceKind, REFERENCE_DATE};
use kizuna_synth::{generate, sample_submissions, Config};
use sha2::{Digest, Sha256};

#[test]
fn a_thousand_submissions_of_every_kind_validate_with_zero_errors() {
    let v = Validator::builtin();
    let inst = institutions(11);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut index = 0;
    while counts.values().copied().min().unwrap_or(0) < 1000 || counts.len() < BundleKind::ALL.len()
    {
        for (kind, b) in sample_submissions(11, index, 3, &inst) {
            let n = counts.entry(kind.code()).or_default();
            if *n >= 1000 {
                continue;
            }
            *n += 1;
            let oo = v.validate(&b);
            if oo.has_errors() && failures.len() < 5 {
                let errs: Vec<String> = oo
                    .issues
                    .iter()
                    .filter(|i| i.severity <= Severity::Error)
                    .map(|i| format!("{} @ {}: {}", i.code, i.expression, i.en))
                    .collect();
                failures.push(format!("{} #{index}: {errs:#?}", kind.code()));
            }
        }
        index += 1;
        assert!(index < 20_000, "not enough submissions: {counts:?}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(counts.len(), BundleKind::ALL.len());
}

fn digest_dir(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().and_then(|n| n.to_str()) != Some("summary.json") {
                let bytes = std::fs::read(&p).unwrap_or_default();
                out.insert(
                    p.strip_prefix(dir).unwrap_or(&p).display().to_string(),
                    hex::encode(Sha256::digest(&bytes)),
                );
            }
        }
    }
    out
}

#[test]
fn same_seed_gives_byte_identical_output_whatever_the_thread_count() {
    let a = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let b = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = |out: &Path, threads: usize, seed: u64| Config {
        patients: 600,
        seed,
        years: 2,
        out: out.to_path_buf(),
        threads,
        gzip: false,
    };
    let s1 = generate(&cfg(a.path(), 1, 5), &|_| {}).unwrap_or_else(|e| panic!("{e}"));
    let s2 = generate(&cfg(b.path(), 3, 5), &|_| {}).unwrap_or_else(|e| panic!("{e}"));
    let d1 = digest_dir(a.path());
    assert_eq!(d1, digest_dir(b.path()));
    assert_eq!(s1.bundles, s2.bundles);
    assert!(d1.len() >= 12, "{d1:?}");
    generate(&cfg(c.path(), 2, 6), &|_| {}).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        d1.get("people.csv"),
        digest_dir(c.path()).get("people.csv"),
        "another seed, another population"
    );
}

#[test]
fn population_looks_like_japan() {
    let n = 20_000;
    let people: Vec<_> = (0..n).map(|i| person(3, i, 1)).collect();
    let share = |f: &dyn Fn(&kizuna_synth::population::Person) -> bool| {
        people.iter().filter(|p| f(p)).count() as f64 / n as f64
    };
    let over65 = share(&|p| p.age_on(REFERENCE_DATE) >= 65);
    assert!((0.25..0.33).contains(&over65), "65+ share {over65}");
    let tokyo = share(&|p| p.pref == 12);
    assert!((0.09..0.13).contains(&tokyo), "Tokyo share {tokyo}");
    let htn_70s = people
        .iter()
        .filter(|p| (70..80).contains(&p.age_on(REFERENCE_DATE)))
        .collect::<Vec<_>>();
    let htn = htn_70s.iter().filter(|p| p.has("I10")).count() as f64 / htn_70s.len() as f64;
    assert!((0.45..0.70).contains(&htn), "hypertension in the 70s {htn}");
    let koki = share(&|p| {
        p.age_on(REFERENCE_DATE) >= 76
            && p.death.is_none()
            && p.coverage.last().map(|c| c.kind) == Some(InsuranceKind::KokiKoreisha)
    });
    let over76 = share(&|p| p.age_on(REFERENCE_DATE) >= 76 && p.death.is_none());
    assert!(
        (koki - over76).abs() < 1e-9,
        "everyone 76+ is in 後期高齢者医療"
    );
    // Names are drawn by frequency: 佐藤 is the most common.
    let mut fam: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &people {
        *fam.entry(p.family.kanji.as_str()).or_default() += 1;
    }
    let top = fam.iter().max_by_key(|(_, c)| **c).map(|(k, _)| *k);
    assert_eq!(top, Some("佐藤"));
}

#[test]
fn holder_records_are_keyed_like_their_holders_and_the_ground_truth_covers_them() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    generate(
        &Config {
            patients: 800,
            seed: 9,
            years: 3,
            out: d.path().to_path_buf(),
            threads: 2,
            gzip: false,
        },
        &|_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let read = |f: &str| -> Vec<csv::StringRecord> {
        csv::Reader::from_path(d.path().join(f))
            .map(|mut r| r.records().filter_map(Result::ok).collect())
            .unwrap_or_default()
    };
    let truth = read("holder/ground_truth.csv");
    let claims = read("holder/claims.csv");
    let deaths = read("holder/deaths.csv");
    assert!(!claims.is_empty() && !deaths.is_empty());
    let ids: std::collections::HashSet<String> = truth
        .iter()
        .map(|r| format!("{}/{}", &r[0], &r[1]))
        .collect();
    for r in &claims {
        assert!(
            ids.contains(&format!("claims/{}", &r[0])),
            "claim {} has ground truth",
            &r[0]
        );
        let ins = &r[3];
        assert!(ins.len() == 6 || ins.len() == 8, "insurer number {ins}");
    }
    for r in &deaths {
        assert!(ids.contains(&format!("deaths/{}", &r[0])));
    }
    // People who changed insurer appear in claims under more than one insurer number.
    let coverage = read("coverage.csv");
    let mut per_person: BTreeMap<String, usize> = BTreeMap::new();
    for r in &coverage {
        *per_person.entry(r[0].to_string()).or_default() += 1;
    }
    assert!(
        per_person.values().any(|n| *n > 1),
        "some insurance histories have changes"
    );
}
