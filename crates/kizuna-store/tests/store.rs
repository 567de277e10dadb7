//! The same storage suite on SQLite and PostgreSQL: versioning, history, deletes, atomic transactions
//! with reference rewriting, and search checked against a brute-force walk over the stored JSON.

use kizuna_fhir::Registry;
use kizuna_store::{ScanCursor, ScanFilter, SearchQuery, Store, StoreError, WriteOp};
use kizuna_synth::clinical::BundleKind;
use serde_json::{json, Value};

fn pairs(q: &str) -> SearchQuery {
    let p: Vec<(String, String)> = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let mut sq = SearchQuery::from_pairs(&p);
    if !p.iter().any(|(k, _)| k == "_count") {
        sq.count = 1000;
    }
    sq
}

/// The versions of a resource as the history gives them: (version, gender of the stored body).
async fn genders(s: &Store, id: &str) -> Vec<(i64, Option<String>)> {
    s.history(Some("Patient"), Some(id), None, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|x| {
            let g = x
                .resource
                .and_then(|r| r["gender"].as_str().map(str::to_string));
            (x.version, g)
        })
        .collect()
}

/// The gender of one version of a Patient, read with vread.
async fn vread_gender(s: &Store, id: &str, version: i64) -> Option<Value> {
    s.vread("Patient", id, version)
        .await
        .ok()
        .flatten()
        .and_then(|x| x.resource)
        .map(|r| r["gender"].clone())
}

/// How many history rows of a resource hold a body of their own (the current version's body is
/// kept once, in the resources table).
async fn history_bodies(url: &str, id: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let sql = if url.starts_with("postgres") {
        "SELECT COUNT(*) FROM history WHERE id = $1 AND body IS NOT NULL"
    } else {
        "SELECT COUNT(*) FROM history WHERE id = ? AND body IS NOT NULL"
    };
    let n: i64 = sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    pool.close().await;
    n
}

async fn crud(s: &Store, url: &str) {
    let c = s
        .create(json!({"resourceType": "Patient", "gender": "female", "birthDate": "1970-05-01"}))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.version, 1);
    assert_eq!(
        history_bodies(url, &c.id).await,
        0,
        "a create stores its body once"
    );
    assert_eq!(genders(s, &c.id).await, vec![(1, Some("female".into()))]);
    assert_eq!(c.id.len(), 32);
    let r = c.resource.clone().unwrap_or_default();
    assert_eq!(r["meta"]["versionId"], "1");
    let mut r2 = r.clone();
    r2["gender"] = json!("male");
    let u = s
        .update(r2.clone(), Some(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(u.version, 2);
    // A stale If-Match is refused and changes nothing.
    assert!(matches!(
        s.update(r2.clone(), Some(1)).await,
        Err(StoreError::VersionConflict { current: 2 })
    ));
    assert_eq!(
        s.read("Patient", &c.id)
            .await
            .ok()
            .flatten()
            .map(|x| x.version),
        Some(2)
    );
    assert_eq!(vread_gender(s, &c.id, 1).await, Some(json!("female")));
    let d = s
        .delete("Patient", &c.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.map(|d| d.version), Some(3));
    assert!(matches!(
        s.read("Patient", &c.id).await,
        Err(StoreError::Gone(_))
    ));
    assert!(
        s.delete("Patient", &c.id).await.ok().flatten().is_none(),
        "deleting twice is a no-op"
    );
    assert!(s
        .delete("Patient", "never-there")
        .await
        .ok()
        .flatten()
        .is_none());
    let h = s
        .history(Some("Patient"), Some(&c.id), None, 10)
        .await
        .unwrap_or_default();
    assert_eq!(
        h.iter().map(|x| (x.version, x.deleted)).collect::<Vec<_>>(),
        vec![(3, true), (2, false), (1, false)]
    );
    // Every replaced version kept its body; the deletion has none.
    assert_eq!(
        genders(s, &c.id).await,
        vec![
            (3, None),
            (2, Some("male".into())),
            (1, Some("female".into()))
        ]
    );
    assert_eq!(history_bodies(url, &c.id).await, 2);
    // Deleted resources are not found by search.
    let found = s
        .search("Patient", &pairs(&format!("_id={}", c.id)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(found.total.unwrap_or(-1), 0);
    // Update-as-create at a client id.
    let u = s
        .update(
            json!({"resourceType": "Patient", "id": "client-chosen-1"}),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((u.id.as_str(), u.version), ("client-chosen-1", 1));
}

async fn transactions(s: &Store) {
    // One resource written twice in one transaction: only the second version is indexed.
    let twice = vec![
        WriteOp::Update {
            resource: json!({"resourceType": "Patient", "id": "twice", "gender": "male"}),
            if_match: None,
        },
        WriteOp::Update {
            resource: json!({"resourceType": "Patient", "id": "twice", "gender": "female"}),
            if_match: None,
        },
    ];
    let out = s.transaction(twice).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((out[0].version, out[1].version), (1, 2));
    for (g, n) in [("male", 0), ("female", 1)] {
        let r = s
            .search("Patient", &pairs(&format!("_id=twice&gender={g}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.total.unwrap_or(-1), n, "gender={g}");
    }
    // Both versions readable: the first was replaced inside the same transaction.
    assert_eq!(
        genders(s, "twice").await,
        vec![(2, Some("female".into())), (1, Some("male".into()))]
    );
    assert_eq!(vread_gender(s, "twice", 1).await, Some(json!("male")));
    s.delete("Patient", "twice")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r = s
        .search("Patient", &pairs("_id=twice"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.total.unwrap_or(-1), 0);
    let ops = vec![
        WriteOp::Create {
            resource: json!({"resourceType": "Patient", "gender": "other"}),
            full_url: Some("urn:uuid:aaaa".into()),
        },
        WriteOp::Create {
            resource: json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:aaaa"}}),
            full_url: None,
        },
    ];
    let out = s.transaction(ops).await.unwrap_or_else(|e| panic!("{e}"));
    let pid = &out[0].id;
    assert_eq!(
        out[1]
            .resource
            .as_ref()
            .map(|r| r["subject"]["reference"].clone()),
        Some(json!(format!("Patient/{pid}")))
    );
    let by_subject = s
        .search("Observation", &pairs(&format!("subject=Patient/{pid}")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(by_subject.total.unwrap_or(-1), 1);
    // A failing entry rolls the whole transaction back.
    let before = s
        .search("Patient", &pairs("gender=unknown"))
        .await
        .map(|r| r.total.unwrap_or(-1))
        .unwrap_or(-1);
    let ops = vec![
        WriteOp::Create {
            resource: json!({"resourceType": "Patient", "gender": "unknown"}),
            full_url: None,
        },
        WriteOp::Update {
            resource: json!({"resourceType": "Patient", "id": "client-chosen-1"}),
            if_match: Some(99),
        },
    ];
    assert!(matches!(
        s.transaction(ops).await,
        Err(StoreError::VersionConflict { .. })
    ));
    let after = s
        .search("Patient", &pairs("gender=unknown"))
        .await
        .map(|r| r.total.unwrap_or(-1))
        .unwrap_or(-2);
    assert_eq!(
        before, after,
        "nothing of the failed transaction was stored"
    );
}

/// One transaction larger than a SQLite insert statement (64 rows): 301 creates go in as
/// 4 × 64 + 32 + 8 + 4 + 1 rows per table, and every one is stored whole and indexed.
async fn large_transaction(s: &Store) {
    let ops: Vec<WriteOp> = (0..301)
        .map(|i| WriteOp::Create {
            resource: json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "urn:kizuna:test", "code": format!("bulk-{i}")}], "text": "bulk-301"},
                "valueQuantity": {"value": i, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}),
            full_url: None,
        })
        .collect();
    let out = s.transaction(ops).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.len(), 301);
    let all = s
        .search("Observation", &pairs("code:text=bulk-301&_count=1000"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all.total, Some(301));
    for i in [0, 63, 64, 255, 256, 287, 288, 295, 296, 299, 300] {
        let one = s
            .search(
                "Observation",
                &pairs(&format!(
                    "code=urn:kizuna:test|bulk-{i}&value-quantity={i}||mg"
                )),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.total, Some(1), "bulk-{i}");
        let st = &one.resources[0];
        assert_eq!(st.id, out[i].id);
        let body = s
            .read("Observation", &st.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .and_then(|r| r.resource)
            .unwrap_or_default();
        assert_eq!(body["valueQuantity"]["value"], json!(i));
        assert_eq!(body["meta"]["versionId"], json!("1"));
    }
    for st in out {
        s.delete("Observation", &st.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Queries whose every criterion matches more than the count cap on its own: SQLite walks the
/// type's rows in row-id order and probes each criterion instead of collecting a driving set.
/// Pages must still be exact, ordered by creation, without gaps or repeats, and `_total=accurate`
/// still counts. Criteria: parity as a code (1,300 each) and the value as a quantity (0..2,600).
async fn broad_criteria(s: &Store) {
    let ops: Vec<WriteOp> = (0..2600)
        .map(|i| WriteOp::Create {
            resource: json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "urn:kizuna:broad", "code": if i % 2 == 0 { "even" } else { "odd" }}]},
                "valueQuantity": {"value": i, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}),
            full_url: None,
        })
        .collect();
    let out = s.transaction(ops).await.unwrap_or_else(|e| panic!("{e}"));
    // Both backends plan each page from per-criterion counts and leave broad intersections
    // uncounted.
    let search = |q: String| async move {
        s.search("Observation", &pairs(&q))
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"))
    };
    // (query, every criterion matches more than the count cap on its own, the expected matches)
    type Case = (&'static str, bool, fn(usize) -> bool);
    let cases: [Case; 6] = [
        // A code with its system: read along its index rows, in row-id order.
        ("code=urn:kizuna:broad|even&value-quantity=lt2400", true, |i| {
            i % 2 == 0 && i < 2400
        }),
        ("code=urn:kizuna:broad|odd", true, |i| i % 2 == 1),
        // Without a system the index rows are not in row-id order: the type's rows are walked.
        ("code=even&value-quantity=lt2400", true, |i| i % 2 == 0 && i < 2400),
        // Two broad ranges of one parameter with a narrow overlap.
        ("value-quantity=ge1250&value-quantity=lt1350&code=urn:kizuna:broad|odd,urn:kizuna:broad|even", true, |i| {
            (1250..1350).contains(&i)
        }),
        // A narrow criterion drives; the broad one is probed.
        ("code=urn:kizuna:broad|odd&value-quantity=lt90", false, |i| {
            i % 2 == 1 && i < 90
        }),
        // Nothing in common.
        ("code=urn:kizuna:broad|odd&code:not=urn:kizuna:broad|odd&value-quantity=lt2600", true, |_| false),
    ];
    for (q, broad, pred) in cases {
        let expected: Vec<&str> = out
            .iter()
            .enumerate()
            .filter(|(i, _)| pred(*i))
            .map(|(_, st)| st.id.as_str())
            .collect();
        let want_total = if broad {
            None
        } else {
            Some(expected.len() as i64).filter(|n| *n <= kizuna_store::search::COUNT_CAP)
        };
        let mut got: Vec<String> = Vec::new();
        let mut offset = 0;
        loop {
            let page = search(format!("{q}&_count=70&_offset={offset}")).await;
            let n = page.resources.len();
            // The last page knows the total without a count.
            let ends = n < 70 && (offset == 0 || n > 0);
            let want = if ends {
                Some(expected.len() as i64)
            } else {
                want_total
            };
            assert_eq!(page.total, want, "{q} offset {offset}");
            got.extend(page.resources.into_iter().map(|st| st.id));
            if n < 70 {
                break;
            }
            offset += 70;
        }
        assert_eq!(got, expected, "{q}");
        let accurate = search(format!("{q}&_total=accurate&_count=1")).await;
        assert_eq!(accurate.total, Some(expected.len() as i64), "{q} accurate");
    }
}

/// Loads synthetic JP-CLINS submissions (their entries, references rewritten) and returns what was stored.
async fn load(s: &Store, n: u64) -> Vec<Value> {
    let inst = kizuna_synth::population::institutions(21);
    let mut stored = Vec::new();
    for i in 0..n {
        for (kind, b) in kizuna_synth::sample_submissions(21, i, 2, &inst) {
            if !matches!(kind, BundleKind::Condition | BundleKind::Observation) {
                continue;
            }
            let ops: Vec<WriteOp> = b["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| WriteOp::Create {
                    resource: e["resource"].clone(),
                    full_url: e["fullUrl"].as_str().map(str::to_string),
                })
                .collect();
            for st in s.transaction(ops).await.unwrap_or_else(|e| panic!("{e}")) {
                if let Some(r) = st.resource {
                    stored.push(r);
                }
            }
        }
    }
    stored
}

fn count(all: &[Value], rt: &str, pred: impl Fn(&Value) -> bool) -> i64 {
    all.iter()
        .filter(|r| r["resourceType"] == rt && pred(r))
        .count() as i64
}

fn codings(v: &Value) -> Vec<(String, String)> {
    v["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["system"].as_str().unwrap_or("").to_string(),
                c["code"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn searches(s: &Store) {
    let all = load(s, 40).await;
    assert!(all.len() > 200, "{}", all.len());
    let check = |q: &'static str, rt: &'static str, expected: i64| async move {
        let got = s
            .search(rt, &pairs(q))
            .await
            .unwrap_or_else(|e| panic!("{rt}?{q}: {e}"));
        assert_eq!(got.total.unwrap_or(-1), expected, "{rt}?{q}");
        assert_eq!(
            got.resources.len() as i64,
            expected.min(1000),
            "{rt}?{q} page"
        );
    };
    let icd = "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/ICD10-2013-full";
    check(
        "code=http://jpfhir.jp/fhir/core/mhlw/CodeSystem/ICD10-2013-full|I10",
        "Condition",
        count(&all, "Condition", |r| {
            codings(&r["code"]).contains(&(icd.into(), "I10".into()))
        }),
    )
    .await;
    check(
        "code=I10,E11.9",
        "Condition",
        count(&all, "Condition", |r| {
            codings(&r["code"])
                .iter()
                .any(|c| c.1 == "I10" || c.1 == "E11.9")
        }),
    )
    .await;
    check(
        "code:not=I10",
        "Condition",
        count(&all, "Condition", |r| {
            !codings(&r["code"]).iter().any(|c| c.1 == "I10")
        }),
    )
    .await;
    check(
        "code=http://jpfhir.jp/fhir/core/mhlw/CodeSystem/ICD10-2013-full|",
        "Condition",
        count(&all, "Condition", |r| {
            codings(&r["code"]).iter().any(|c| c.0 == icd)
        }),
    )
    .await;
    check(
        "gender=female",
        "Patient",
        count(&all, "Patient", |r| r["gender"] == "female"),
    )
    .await;
    check(
        "birthdate=ge1950-01-01&birthdate=lt1960",
        "Patient",
        count(&all, "Patient", |r| {
            r["birthDate"]
                .as_str()
                .map(|b| ("1950".to_string()..="1959-12-31".to_string()).contains(&b.to_string()))
                .unwrap_or(false)
        }),
    )
    .await;
    check(
        "birthdate=1960",
        "Patient",
        count(&all, "Patient", |r| {
            r["birthDate"]
                .as_str()
                .map(|b| b.starts_with("1960"))
                .unwrap_or(false)
        }),
    )
    .await;
    let family = |r: &Value, pred: &dyn Fn(&str) -> bool| {
        r["name"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["family"].as_str().map(pred).unwrap_or(false))
    };
    check(
        "family=佐藤",
        "Patient",
        count(&all, "Patient", |r| family(r, &|f| f.starts_with("佐藤"))),
    )
    .await;
    check(
        "family:exact=サトウ",
        "Patient",
        count(&all, "Patient", |r| family(r, &|f| f == "サトウ")),
    )
    .await;
    check(
        "family:contains=トウ",
        "Patient",
        count(&all, "Patient", |r| family(r, &|f| f.contains("トウ"))),
    )
    .await;
    check(
        "onset-date=lt2000",
        "Condition",
        count(&all, "Condition", |r| {
            r["onsetDateTime"]
                .as_str()
                .map(|d| d < "2000")
                .unwrap_or(false)
        }),
    )
    .await;
    check(
        "abatement-date:missing=true",
        "Condition",
        count(&all, "Condition", |r| r.get("abatementDateTime").is_none()),
    )
    .await;
    check(
        "value-quantity:missing=false",
        "Observation",
        count(&all, "Observation", |r| r.get("valueQuantity").is_some()),
    )
    .await;
    // Reference search for one patient equals the brute-force count.
    let pid = all
        .iter()
        .find(|r| r["resourceType"] == "Patient")
        .and_then(|p| p["id"].as_str())
        .unwrap_or("")
        .to_string();
    let q = format!("subject=Patient/{pid}");
    let got = s
        .search("Observation", &pairs(&q))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        got.total.unwrap_or(-1),
        count(&all, "Observation", |r| r["subject"]["reference"]
            == format!("Patient/{pid}"))
    );
    // Paging: stable order, complete and disjoint pages, accurate total.
    let total = s
        .search("Observation", &pairs("_count=7"))
        .await
        .map(|r| r.total.unwrap_or(-1))
        .unwrap_or(0);
    let mut seen = std::collections::BTreeSet::new();
    let mut offset = 0;
    while offset < total {
        let page = s
            .search("Observation", &pairs(&format!("_count=7&_offset={offset}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for r in &page.resources {
            assert!(seen.insert(r.id.clone()), "duplicate across pages");
        }
        offset += 7;
    }
    assert_eq!(seen.len() as i64, total);
    // Unknown parameters: an error when strict, ignored and reported when lenient.
    assert!(matches!(
        s.search("Patient", &pairs("nonsense=1")).await,
        Err(StoreError::UnknownParameter(_))
    ));
    let mut lenient = pairs("nonsense=1&gender=male");
    lenient.strict = false;
    let r = s
        .search("Patient", &lenient)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.ignored, vec!["nonsense".to_string()]);
    assert!(matches!(
        s.search("Patient", &pairs("birthdate=notadate")).await,
        Err(StoreError::BadSearchValue { .. })
    ));
    check(
        "_lastUpdated=gt2000-01-01",
        "Patient",
        count(&all, "Patient", |_| true) + 2,
    )
    .await;
    includes(s, &all).await;
    ids_across_types(s, &all).await;
}

/// `search_ids_in` answers like one `search_ids` per type, merged: for a common parameter that
/// matches everything, for ids picked from two types, and for nothing.
async fn ids_across_types(s: &Store, all: &[Value]) {
    let types = ["Condition", "Observation", "Patient"];
    let per_type = |q: SearchQuery| async move {
        let mut out = Vec::new();
        for rt in types {
            let ids = s.search_ids(rt, &q).await.unwrap_or_else(|e| panic!("{e}"));
            out.extend(ids.into_iter().map(|id| (rt.to_string(), id)));
        }
        out.sort();
        out
    };
    let everything = pairs("_lastUpdated=gt2000-01-01");
    let got = s
        .search_ids_in(&types, &everything)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(got.len() > 200, "{}", got.len());
    assert_eq!(got, per_type(everything).await);
    let pick = |rt: &str| {
        all.iter()
            .find(|r| r["resourceType"] == rt)
            .map(key)
            .unwrap_or_else(|| panic!("no {rt} loaded"))
    };
    let (c, o) = (pick("Condition"), pick("Observation"));
    let two = pairs(&format!("_id={},{}", c.1, o.1));
    let got = s
        .search_ids_in(&types, &two)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, vec![c, o]);
    let none = pairs("_id=no-such-id");
    let got = s
        .search_ids_in(&types, &none)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(got.is_empty(), "{got:?}");
    assert!(s
        .search_ids_in(&[], &none)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_empty());
}

fn key(r: &Value) -> (String, String) {
    (
        r["resourceType"].as_str().unwrap_or("").to_string(),
        r["id"].as_str().unwrap_or("").to_string(),
    )
}

fn subject_of(r: &Value) -> Option<(String, String)> {
    let (t, i) = r["subject"]["reference"].as_str()?.split_once('/')?;
    Some((t.to_string(), i.to_string()))
}

fn sorted_keys(v: &[kizuna_store::Stored]) -> Vec<(String, String)> {
    let mut k: Vec<_> = v
        .iter()
        .map(|s| (s.resource_type.clone(), s.id.clone()))
        .collect();
    k.sort();
    k
}

/// `_include`, `_revinclude` and `:iterate`, each checked against the references in the stored JSON.
async fn includes(s: &Store, all: &[Value]) {
    let live: std::collections::HashSet<(String, String)> = all.iter().map(key).collect();
    // Observation → its subjects.
    let r = s
        .search(
            "Observation",
            &pairs("_include=Observation:subject&_count=30"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut want: Vec<(String, String)> = r
        .resources
        .iter()
        .filter_map(|m| m.resource.as_ref().and_then(subject_of))
        .collect();
    want.sort();
    want.dedup();
    // Only subjects that exist (live) on the server can be included.
    let mut present = Vec::new();
    for k in want {
        if live.contains(&k) || matches!(s.read(&k.0, &k.1).await, Ok(Some(st)) if !st.deleted) {
            present.push(k);
        }
    }
    let want = present;
    assert!(!want.is_empty());
    assert_eq!(sorted_keys(&r.included), want);
    // A target type that never matches includes nothing; Source:* includes at least the subjects.
    let r2 = s
        .search(
            "Observation",
            &pairs("_include=Observation:subject:Group&_count=30"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r2.included.is_empty());
    let r3 = s
        .search("Observation", &pairs("_include=Observation:*&_count=30"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let star = sorted_keys(&r3.included);
    assert!(want.iter().all(|k| star.contains(k)));
    // Patient ← the Observations and Conditions that name it.
    // A patient with at least one Condition, so every hop below has something to find.
    let conditions_of = |p: &(String, String)| {
        all.iter()
            .filter(|r| r["resourceType"] == "Condition" && subject_of(r).as_ref() == Some(p))
            .count()
    };
    let c = all
        .iter()
        .find(|r| {
            r["resourceType"] == "Condition"
                && subject_of(r).is_some_and(|p| conditions_of(&p) >= 2)
        })
        .map(key)
        .unwrap_or_default();
    let p = all
        .iter()
        .find(|r| key(r) == c)
        .and_then(subject_of)
        .unwrap_or_default();
    // `patient` is `subject.where(resolve() is Patient)`: indexed from the reference's type.
    for q in [
        format!("patient={}", p.1),
        format!("patient=Patient/{}", p.1),
        format!("subject:Patient={}", p.1),
    ] {
        let r = s
            .search("Condition", &pairs(&q))
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        assert_eq!(
            r.total.unwrap_or(-1),
            conditions_of(&p) as i64,
            "Condition?{q}"
        );
    }
    let r = s
        .search(
            "Patient",
            &pairs(&format!(
                "_id={}&_revinclude=Observation:subject&_revinclude=Condition:subject",
                p.1
            )),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut want: Vec<(String, String)> = all
        .iter()
        .filter(|r| {
            matches!(
                r["resourceType"].as_str(),
                Some("Observation" | "Condition")
            ) && subject_of(r).as_ref() == Some(&p)
        })
        .map(key)
        .collect();
    want.sort();
    assert!(!want.is_empty());
    assert_eq!(sorted_keys(&r.included), want);
    // Iterate: one Condition → its patient → every Condition of that patient.
    let r = s
        .search(
            "Condition",
            &pairs(&format!(
                "_id={}&_include=Condition:subject&_revinclude:iterate=Condition:subject",
                c.1
            )),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut want: Vec<(String, String)> = all
        .iter()
        .filter(|r| {
            r["resourceType"] == "Condition" && subject_of(r).as_ref() == Some(&p) && key(r) != c
        })
        .map(key)
        .collect();
    assert!(
        !want.is_empty(),
        "the iterate case needs a second Condition"
    );
    want.push(p.clone());
    want.sort();
    assert_eq!(sorted_keys(&r.included), want);
    // Without :iterate the second hop does not happen.
    let r = s
        .search(
            "Condition",
            &pairs(&format!(
                "_id={}&_include=Condition:subject&_revinclude=Condition:subject",
                c.1
            )),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sorted_keys(&r.included), vec![p.clone()]);
    for bad in [
        "_include=Observation:status",
        "_include=Observation:nosuch",
        "_include=Observation",
    ] {
        assert!(
            matches!(
                s.search("Observation", &pairs(bad)).await,
                Err(StoreError::BadSearchValue { .. })
            ),
            "{bad}"
        );
    }
}

/// Eight writers at once: unconditional updates of one resource must serialise into one gap-free
/// version sequence, and concurrent creates must all land. On SQLite this fails with
/// `database is locked` unless writes take the lock up front.
async fn concurrent_writers(s: &Store) {
    let base = s
        .create(json!({"resourceType": "Patient", "gender": "other"}))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        let id = base.id.clone();
        tasks.push(tokio::spawn(async move {
            let mut created = Vec::new();
            for i in 0..10 {
                let r = json!({"resourceType": "Patient", "id": id, "gender": "other",
                    "name": [{"text": format!("w{w}-{i}")}]});
                s.update(r, None)
                    .await
                    .unwrap_or_else(|e| panic!("update: {e}"));
                let o = s
                    .create(json!({"resourceType": "Observation", "status": "final",
                        "code": {"text": format!("concurrent-{w}")}}))
                    .await
                    .unwrap_or_else(|e| panic!("create: {e}"));
                created.push(o.id);
            }
            created
        }));
    }
    let mut created = Vec::new();
    for t in tasks {
        created.extend(t.await.unwrap_or_else(|e| panic!("{e}")));
    }
    created.sort();
    created.dedup();
    assert_eq!(created.len(), 80);
    let cur = s
        .read("Patient", &base.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("patient vanished"));
    assert_eq!(cur.version, 81);
    let mut versions: Vec<i64> = s
        .history(Some("Patient"), Some(&base.id), None, 1000)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|h| h.version)
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=81).collect::<Vec<i64>>());
    // Every write announced while it was prepared was counted off again: a count left behind
    // would make the writer wait for writes that never come.
    assert_eq!(s.writes_preparing(), 0);
    // Leave the store as found: the search oracle below counts everything that is live.
    for id in created {
        s.delete("Observation", &id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    s.delete("Patient", &base.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A store of schema 4 kept the current version's body twice (in `resources` and `history`):
/// opening it drops the second copy, and every version still reads back.
async fn migrates_duplicated_bodies(url: &str) {
    let s = Store::open(url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let c = s
        .create(json!({"resourceType": "Patient", "gender": "male"}))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut r = c.resource.clone().unwrap_or_default();
    r["gender"] = json!("female");
    s.update(r, None).await.unwrap_or_else(|e| panic!("{e}"));
    s.execute_raw(&format!(
        "UPDATE history SET body = (SELECT body FROM resources r WHERE r.rtype = history.rtype \
         AND r.id = history.id AND r.version = history.version) WHERE id = '{}' AND version = 2",
        c.id
    ))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    s.execute_raw("UPDATE kz_meta SET value = '4' WHERE key = 'schema_version'")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(history_bodies(url, &c.id).await, 2, "the schema-4 layout");
    drop(s);
    let s = upgraded(url).await;
    assert_eq!(history_bodies(url, &c.id).await, 1);
    assert_eq!(
        genders(&s, &c.id).await,
        vec![(2, Some("female".into())), (1, Some("male".into()))]
    );
}

/// Schema 5 kept `code-value-*` as tuple rows and no component rows of their own: opening such
/// a store reindexes the Observations, dropping the tuples and adding the component rows. Schema
/// 7 had no rows of `code-value-quantity`'s own; 8 writes them when it opens the store.
async fn migrates_composites(url: &str) {
    let s = Store::open(url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let o = s
        .create(json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "urn:kizuna:test:migrate", "code": "m"}]},
            "valueString": "migrated"}))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let q = pairs("code-value-string=urn:kizuna:test:migrate|m$migr");
    let found = |s: Store| {
        let q = q.clone();
        async move {
            s.search("Observation", &q)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .resources
                .into_iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(found(s.clone()).await, vec![o.id.clone()]);
    // The schema-5 layout: a tuple row, no component rows.
    for sql in [
        "INSERT INTO kz_param (rtype, code) SELECT 'Observation', 'code-value-string' WHERE NOT EXISTS \
         (SELECT 1 FROM kz_param WHERE rtype = 'Observation' AND code = 'code-value-string')"
            .to_string(),
        format!(
            "INSERT INTO idx_composite SELECT p.pid, r.rid, '', 'm', '', 0, 0, 'migrated', 'migrated', '', 0, 0, \
             '', '', '', 0, 0 FROM kz_param p, resources r WHERE p.rtype = 'Observation' AND \
             p.code = 'code-value-string' AND r.id = '{}'",
            o.id
        ),
        "DELETE FROM idx_string WHERE pid IN (SELECT pid FROM kz_param WHERE code = 'code-value-string#1')"
            .to_string(),
        "UPDATE kz_meta SET value = '5' WHERE key = 'schema_version'".to_string(),
    ] {
        s.execute_raw(&sql).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(found(s.clone()).await.is_empty(), "the schema-5 layout");
    drop(s);
    let s = upgraded(url).await;
    assert_eq!(found(s.clone()).await, vec![o.id.clone()]);
    assert_eq!(
        composite_rows(url, "idx_composite", "code-value-%", "%").await,
        0,
        "tuple rows of code-value-* are gone"
    );

    // Schema 7 searched `code-value-quantity` through its components alone: no rows of its own.
    let q = s
        .create(json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "urn:kizuna:test:migrate", "code": "q"},
                                {"system": "urn:kizuna:test:local", "code": "L1"}]},
            "valueQuantity": {"value": 7.5, "unit": "mg/dL"}}))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        composite_rows(url, "idx_code_value", "code-value-quantity", &q.id).await,
        2,
        "a row per code"
    );
    for sql in [
        "DELETE FROM idx_code_value",
        "UPDATE kz_meta SET value = '7' WHERE key = 'schema_version'",
    ] {
        s.execute_raw(sql).await.unwrap_or_else(|e| panic!("{e}"));
    }
    drop(s);
    let s = upgraded(url).await;
    assert_eq!(
        composite_rows(url, "idx_code_value", "code-value-quantity", &q.id).await,
        2,
        "the rows again"
    );
    // Schema 8 read `(Observation.component.value as Quantity)` strictly: nothing for two
    // components.
    let bp = s
        .create(json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "urn:kizuna:test:migrate", "code": "bp"}]},
            "component": [
                {"code": {"text": "収縮期"}, "valueQuantity": {"value": 131.5}},
                {"code": {"text": "拡張期"}, "valueQuantity": {"value": 77.5}}]}))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let by_component = |s: Store| async move {
        sorted_ids(&s, "Observation", "component-value-quantity=77.5").await
    };
    assert_eq!(by_component(s.clone()).await, vec![bp.id.clone()]);
    let rows_before = index_rows(url).await;
    for sql in [
        "DELETE FROM idx_quantity WHERE pid IN (SELECT pid FROM kz_param WHERE \
         code IN ('component-value-quantity', 'combo-value-quantity'))",
        "UPDATE kz_meta SET value = '8' WHERE key = 'schema_version'",
    ] {
        s.execute_raw(sql).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        by_component(s.clone()).await.is_empty(),
        "the schema-8 rows"
    );
    drop(s);
    let s = upgraded(url).await;
    assert_eq!(
        by_component(s.clone()).await,
        vec![bp.id.clone()],
        "reindexed"
    );
    // Every resource of the reindexed types (the suite stored well over 500 Observations, so
    // several batches of 500) has its rows again,
    // none twice.
    assert_eq!(
        index_rows(url).await,
        rows_before,
        "index rows after the reindex"
    );
    for (query, hit) in [
        ("urn:kizuna:test:migrate|q$gt7", true),
        ("urn:kizuna:test:local|L1$7.5", true),
        ("urn:kizuna:test:migrate|q$lt7", false),
        ("urn:kizuna:test:migrate|L1$gt7", false),
        // With a unit: through the components.
        ("urn:kizuna:test:migrate|q$7.5||mg/dL", true),
        ("urn:kizuna:test:migrate|q$7.5||mg", false),
    ] {
        let ids: Vec<String> = s
            .search(
                "Observation",
                &pairs(&format!("code-value-quantity={query}")),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .resources
            .into_iter()
            .map(|m| m.id)
            .collect();
        let want = if hit { vec![q.id.clone()] } else { Vec::new() };
        assert_eq!(ids, want, "{query}");
    }
}

/// The store opened again after a test set it back to an older schema, once the background
/// reindex that opening started is done (the checks need its rows).
async fn upgraded(url: &str) -> Store {
    let s = Store::open(url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.reindexed().await;
    s
}

/// Rows in all index tables.
async fn index_rows(url: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut n = 0;
    for t in kizuna_store::INDEX_TABLES {
        let c: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {t}"))
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        n += c;
    }
    pool.close().await;
    n
}

/// Rows in `table` for the composites whose code is `LIKE code`, of the resources whose id is
/// `LIKE id`.
async fn composite_rows(url: &str, table: &str, code: &str, id: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let sql = format!(
        "SELECT COUNT(*) FROM {table} c JOIN kz_param p ON p.pid = c.pid \
         JOIN resources r ON r.rid = c.rid WHERE p.code LIKE '{code}' AND r.id LIKE '{id}'"
    );
    let n: i64 = sqlx::query_scalar(&sql)
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    pool.close().await;
    n
}

/// Scans (the bulk export's and the retention job's reads): page by page, every current resource
/// of the type once, with its current body, even when resources change between pages; deleted
/// ones never; `since` filters by last change.
async fn scans(s: &Store) {
    // Client-chosen ids, stored in another order than their ids sort in (a scan must not
    // depend on either order).
    let mut ids = Vec::new();
    for i in 0..25 {
        let id = format!("loc-{:02}", (i * 7) % 25);
        let c = s
            .update(
                json!({"resourceType": "Location", "id": id, "name": format!("room {i}")}),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        ids.push(c.id);
    }
    for id in &ids[20..23] {
        s.delete("Location", id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let rename = |id: &str, name: &str| json!({"resourceType": "Location", "id": id, "name": name});
    let (mut seen, mut after, mut pages, mut added) = (Vec::new(), ScanCursor::default(), 0, None);
    loop {
        let page = s
            .scan_page("Location", &ScanFilter::default(), after, 4)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("Location has no compartment filter here"));
        let Some(last) = page.last() else { break };
        assert!(page.len() <= 4);
        after = last.cursor;
        for row in &page {
            let body: Value = serde_json::from_str(&row.body).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(body["id"], json!(row.id));
            seen.push((
                row.id.clone(),
                body["name"].as_str().unwrap_or("").to_string(),
            ));
        }
        pages += 1;
        if pages == 2 {
            // One already scanned, one ahead, and a new one: each is scanned once (the one
            // ahead with its new body), the scanned one not again.
            for id in [&ids[1], &ids[15]] {
                s.update(rename(id, "renamed"), None)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            let c = s
                .create(json!({"resourceType": "Location", "name": "late"}))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            added = Some(c.id);
        }
    }
    let mut expected: Vec<String> = ids[..20].iter().chain(&ids[23..]).cloned().collect();
    expected.extend(added);
    let mut got: Vec<String> = seen.iter().map(|(id, _)| id.clone()).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "every current Location once, no deleted one");
    let name_of = |id: &str| seen.iter().find(|(i, _)| i == id).map(|(_, n)| n.as_str());
    assert_eq!(name_of(&ids[15]), Some("renamed"));
    assert_eq!(name_of(&ids[1]), Some("room 1"));
    // Pages continue where the last one ended: the whole walk in pages of one gives the same.
    let mut single = Vec::new();
    let mut after = ScanCursor::default();
    while let Some(row) = s
        .scan_page("Location", &ScanFilter::default(), after, 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .and_then(|p| p.into_iter().next())
    {
        after = row.cursor;
        single.push(row.id);
    }
    single.sort();
    assert_eq!(single, got);
    let late = ScanFilter {
        since_ms: Some(chrono::Utc::now().timestamp_millis() + 3_600_000),
        ..ScanFilter::default()
    };
    let none = s
        .scan_page("Location", &late, ScanCursor::default(), 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_default();
    assert!(none.is_empty(), "nothing changed after an hour from now");
    let early = ScanFilter {
        since_ms: Some(0),
        ..ScanFilter::default()
    };
    let all = s
        .scan_page("Location", &early, ScanCursor::default(), 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_default();
    assert_eq!(all.len(), got.len());
    // The NDJSON pages (the export's reads; on SQLite over a connection of their own) hold the
    // same rows, bodies and cursors as the row pages, with or without the ids.
    for (size, with_ids) in [(4, true), (3, false), (100, true)] {
        let mut after = ScanCursor::default();
        loop {
            let rows = s
                .scan_page("Location", &ScanFilter::default(), after, size)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_default();
            let page = s
                .scan_ndjson("Location", &ScanFilter::default(), after, size, with_ids)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_default();
            let lines: String = rows.iter().map(|r| format!("{}\n", r.body)).collect();
            assert_eq!(
                String::from_utf8_lossy(&page.ndjson),
                lines,
                "page of {size}"
            );
            assert_eq!(page.rows, rows.len());
            let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
            assert_eq!(page.ids, if with_ids { ids } else { Vec::new() });
            match rows.last() {
                Some(last) => assert_eq!(page.next, last.cursor),
                None => {
                    assert_eq!(page.next, after, "the end gives the cursor back");
                    break;
                }
            }
            after = page.next;
        }
    }
    let none = s
        .scan_ndjson("Location", &late, ScanCursor::default(), 100, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_default();
    assert_eq!((none.rows, none.ndjson.len()), (0, 0));
    one_walk_over_types(s).await;
}

/// One walk over several types (the whole server's export) gives each type the NDJSON, ids and
/// order a walk of that type alone gives, whatever the page size.
async fn one_walk_over_types(s: &Store) {
    // Rows of three types interleaved in the table.
    for i in 0..4 {
        for r in [
            json!({"resourceType": "Basic", "code": {"text": format!("walk {i}")}}),
            json!({"resourceType": "Device", "deviceName": [{"name": "walk", "type": "other"}]}),
            json!({"resourceType": "Substance", "code": {"text": "walk"}}),
        ] {
            s.create(r).await.unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let types = s.stored_types().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        types.len() >= 3,
        "the suite stored several types: {types:?}"
    );
    let mut alone: Vec<(String, String, Vec<String>)> = Vec::new();
    for rt in &types {
        let page = s
            .scan_ndjson(
                rt,
                &ScanFilter::default(),
                ScanCursor::default(),
                100_000,
                rt == "Patient",
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_default();
        alone.push((
            rt.clone(),
            String::from_utf8_lossy(&page.ndjson).into_owned(),
            page.ids,
        ));
    }
    for size in [1, 3, 7, 100_000] {
        let mut walked: std::collections::BTreeMap<String, (String, Vec<String>)> =
            std::collections::BTreeMap::new();
        let mut after = ScanCursor::default();
        loop {
            let page = s
                .scan_ndjson_types(&types, None, after, size, "Patient")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(page.rows as i64 <= size, "page of {size}");
            let rows: usize = page.parts.iter().map(|(_, p)| p.rows).sum();
            assert_eq!(rows, page.rows);
            if page.next == after {
                assert_eq!(page.rows, 0, "the end gives the cursor back");
                break;
            }
            after = page.next;
            for (rt, part) in page.parts {
                let e = walked.entry(rt).or_default();
                e.0.push_str(&String::from_utf8_lossy(&part.ndjson));
                e.1.extend(part.ids);
            }
        }
        for (rt, ndjson, ids) in &alone {
            let (w, wids) = walked.remove(rt).unwrap_or_default();
            assert_eq!(&w, ndjson, "{rt}, pages of {size}");
            assert_eq!(&wids, ids, "{rt} ids, pages of {size}");
        }
        assert!(walked.is_empty(), "only the types asked for: {walked:?}");
    }
    // Only the types asked for, and nothing changed after an hour from now.
    let one = s
        .scan_ndjson_types(&types[..1], None, ScanCursor::default(), 100_000, "Patient")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(one.parts.len(), usize::from(!alone[0].1.is_empty()));
    let late = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let none = s
        .scan_ndjson_types(&types, Some(late), ScanCursor::default(), 100, "Patient")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((none.rows, none.parts.len()), (0, 0));
}

/// The ids a search finds (one page of up to 1,000), sorted.
async fn sorted_ids(s: &Store, rt: &str, q: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .search(rt, &pairs(q))
        .await
        .unwrap_or_else(|e| panic!("{q}: {e}"))
        .resources
        .into_iter()
        .map(|m| m.id)
        .collect();
    v.sort();
    v
}

/// A versioned canonical is stored once (`url|version`) and found by its bare URL, by its version,
/// and by `:below`/`:above`; a URL that merely starts like it is not found, and a resource with two
/// versions of one profile is found once.
async fn versioned_canonicals(s: &Store) {
    const P: &str = "http://example.org/fhir/StructureDefinition/kz-basic";
    let basic = |profiles: &[&str]| {
        json!({"resourceType": "Basic", "meta": {"profile": profiles},
            "code": {"coding": [{"system": "urn:kizuna:test", "code": "canonicals"}]}})
    };
    let mut ids = Vec::new();
    for profiles in [
        vec![format!("{P}|1.0")],
        vec![format!("{P}|1.0"), format!("{P}|2.0")],
        vec![P.to_string()],
        vec![format!("{P}-extra|1.0")],
        vec![format!("{P}x")],
    ] {
        let refs: Vec<&str> = profiles.iter().map(String::as_str).collect();
        let id = s
            .create(basic(&refs))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .id;
        ids.push(id);
    }
    let want = |idx: &[usize]| {
        let mut v: Vec<String> = idx.iter().map(|&i| ids[i].clone()).collect();
        v.sort();
        v
    };
    let cases: Vec<(String, Vec<usize>)> = vec![
        (format!("_profile={P}"), vec![0, 1, 2]),
        (format!("_profile={P}|1.0"), vec![0, 1]),
        (format!("_profile={P}|2.0"), vec![1]),
        (format!("_profile={P}|3.0"), vec![]),
        (format!("_profile={P}-extra"), vec![3]),
        (format!("_profile:below={P}"), vec![0, 1, 2, 3, 4]),
        (format!("_profile:above={P}/sub"), vec![0, 1, 2]),
        (format!("_profile:above={P}x/sub"), vec![0, 1, 2, 4]),
    ];
    for (q, idx) in cases {
        let q = format!("code=urn:kizuna:test|canonicals&{q}");
        assert_eq!(sorted_ids(s, "Basic", &q).await, want(&idx), "{q}");
        let total = s
            .search("Basic", &pairs(&format!("{q}&_total=accurate")))
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"))
            .total;
        assert_eq!(total, Some(idx.len() as i64), "{q}");
    }
}

/// Rows a store wrote before schema 7 (a versioned canonical's bare URL beside it, a Patient
/// subject under `subject` as well as `patient`) are read twice by today's searches: each resource
/// is still found once, counted once and included once.
async fn rows_written_before_narrowing(s: &Store) {
    let tag = json!([{"system": "urn:kizuna:test", "code": "pre-narrowing"}]);
    let patient = s
        .create(json!({"resourceType": "Patient", "meta": {"tag": tag}}))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    let profile = "http://example.org/fhir/StructureDefinition/kz-pre";
    let obs = |subject: String| {
        json!({"resourceType": "Observation", "status": "final",
            "meta": {"tag": tag, "profile": [format!("{profile}|1")]},
            "code": {"text": "x"}, "subject": {"reference": subject}})
    };
    // A Group subject gives `subject` rows (and a parameter id) of its own.
    let g = s
        .create(obs("Group/pre-narrowing".into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    let o = s
        .create(obs(format!("Patient/{patient}")))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    for (code, insert) in [
        (
            "subject",
            format!("INSERT INTO idx_reference (pid, rid, ttype, tid) SELECT p.pid, r.rid, 'Patient', '{patient}'"),
        ),
        (
            "_profile",
            format!("INSERT INTO idx_uri (pid, rid, val) SELECT p.pid, r.rid, '{profile}'"),
        ),
    ] {
        s.execute_raw(&format!(
            "{insert} FROM kz_param p, resources r WHERE p.rtype = 'Observation' AND p.code = '{code}' \
             AND r.rtype = 'Observation' AND r.id = '{o}'"
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let tagged = "_tag=urn:kizuna:test|pre-narrowing";
    for q in [
        format!("{tagged}&subject=Patient/{patient}"),
        format!("{tagged}&subject:Patient.gender:missing=true"),
        format!("{tagged}&_profile={profile}&subject:missing=false&patient:missing=false"),
    ] {
        let page = s
            .search("Observation", &pairs(&format!("{q}&_total=accurate")))
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        let ids: Vec<&str> = page.resources.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, vec![o.as_str()], "{q}");
        assert_eq!(page.total, Some(1), "{q}");
    }
    let page = s
        .search(
            "Observation",
            &pairs(&format!(
                "{tagged}&subject=Patient/{patient}&_include=Observation:subject"
            )),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut ids: Vec<&str> = page.resources.iter().map(|m| m.id.as_str()).collect();
    ids.extend(page.included.iter().map(|m| m.id.as_str()));
    assert_eq!(ids, vec![o.as_str(), patient.as_str()]);
    // The old rows are really there and read: without today's rows they alone find it.
    for (table, code) in [("idx_reference", "patient"), ("idx_uri", "_profile")] {
        let newer = if code == "_profile" {
            format!(" AND val = '{profile}|1'")
        } else {
            String::new()
        };
        s.execute_raw(&format!(
            "DELETE FROM {table} WHERE rid = (SELECT rid FROM resources WHERE rtype = 'Observation' AND id = '{o}') \
             AND pid = (SELECT pid FROM kz_param WHERE rtype = 'Observation' AND code = '{code}'){newer}"
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut both = vec![g.clone(), o.clone()];
    both.sort();
    for (q, want) in [
        (format!("subject=Patient/{patient}"), vec![o.clone()]),
        (format!("patient=Patient/{patient}"), vec![]),
        (format!("_profile={profile}"), both),
        (format!("_profile={profile}|1"), vec![g.clone()]),
    ] {
        let q = format!("{tagged}&{q}");
        assert_eq!(sorted_ids(s, "Observation", &q).await, want, "{q}");
    }
}

/// Composites over the resource itself (`code-value-*`) are searched through their components'
/// rows; those over an element (`component-code-value-quantity`) keep pairing values of one
/// element; a union of both (`combo-code-value-quantity`) finds either; `:missing` and `_has`
/// see the same sets.
async fn composites(s: &Store) {
    const SYS: &str = "urn:kizuna:test:composite";
    let tag = json!([{"system": "urn:kizuna:test", "code": "composites"}]);
    let coded = |code: &str| json!({"coding": [{"system": SYS, "code": code}, {"system": "urn:kizuna:test:local", "code": format!("local-{code}")}]});
    let patient = s
        .create(json!({"resourceType": "Patient", "meta": {"tag": tag}}))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    let subject = json!({"reference": format!("Patient/{patient}")});
    let bodies = [
        json!({"code": coded("cv-1"), "valueQuantity": {"value": 5, "system": "http://unitsofmeasure.org", "code": "mg", "unit": "mg"}, "subject": subject}),
        json!({"code": coded("cv-1"), "valueCodeableConcept": {"coding": [{"system": SYS, "code": "pos"}]}}),
        json!({"code": coded("cv-1"), "valueDateTime": "2024-05-01"}),
        json!({"code": coded("cv-1"), "valueString": "high"}),
        json!({"code": coded("cv-bp"), "component": [
            {"code": coded("cv-sys"), "valueQuantity": {"value": 120}},
            {"code": coded("cv-dia"), "valueQuantity": {"value": 80}}]}),
        json!({"code": {"text": "no coding"}, "valueQuantity": {"value": 5}}),
    ];
    let mut ids = Vec::new();
    for mut b in bodies {
        b["resourceType"] = json!("Observation");
        b["status"] = json!("final");
        b["meta"] = json!({"tag": tag});
        ids.push(s.create(b).await.unwrap_or_else(|e| panic!("{e}")).id);
    }
    let found = |q: String| async move {
        sorted_ids(
            s,
            "Observation",
            &format!("_tag=urn:kizuna:test|composites&{q}"),
        )
        .await
    };
    let expect = |which: &[usize]| {
        let mut v: Vec<String> = which.iter().map(|i| ids[*i].clone()).collect();
        v.sort();
        v
    };
    let cases: Vec<(String, Vec<usize>)> = vec![
        (format!("code-value-quantity={SYS}|cv-1$5"), vec![0]),
        ("code-value-quantity=local-cv-1$5".into(), vec![0]),
        (format!("code-value-quantity={SYS}|cv-1$gt5"), vec![]),
        (
            format!("code-value-quantity={SYS}|cv-1$ge5|http://unitsofmeasure.org|mg"),
            vec![0],
        ),
        (format!("code-value-quantity={SYS}|cv-1$5||kg"), vec![]),
        (
            format!("code-value-quantity={SYS}|cv-1$7,{SYS}|cv-1$5"),
            vec![0],
        ),
        (format!("code-value-quantity={SYS}|cv-bp$120"), vec![]),
        (format!("code-value-concept={SYS}|cv-1${SYS}|pos"), vec![1]),
        (format!("code-value-concept={SYS}|cv-1$pos"), vec![1]),
        (format!("code-value-date={SYS}|cv-1$ge2024-01-01"), vec![2]),
        (format!("code-value-date={SYS}|cv-1$lt2024-01-01"), vec![]),
        (format!("code-value-string={SYS}|cv-1$hi"), vec![3]),
        (
            format!("component-code-value-quantity={SYS}|cv-sys$120"),
            vec![4],
        ),
        // Pairs come from one component: systolic 80 is no pair.
        (
            format!("component-code-value-quantity={SYS}|cv-sys$80"),
            vec![],
        ),
        (
            format!("combo-code-value-quantity={SYS}|cv-dia$80"),
            vec![4],
        ),
        (format!("combo-code-value-quantity={SYS}|cv-1$5"), vec![0]),
        (
            format!("combo-code-value-quantity={SYS}|cv-1$5,{SYS}|cv-sys$120"),
            vec![0, 4],
        ),
        (format!("combo-code-value-concept={SYS}|cv-1$pos"), vec![1]),
        // A cast of every component's value (`(Observation.component.value as Quantity)`):
        // both of the blood pressure's, not none because there are two.
        ("component-value-quantity=80".into(), vec![4]),
        ("component-value-quantity=gt100".into(), vec![4]),
        ("component-value-quantity=5".into(), vec![]),
        ("component-value-quantity:missing=false".into(), vec![4]),
        ("combo-value-quantity=80".into(), vec![4]),
        ("combo-value-quantity=5".into(), vec![0, 5]),
        ("code-value-quantity:missing=false".into(), vec![0]),
        (
            "code-value-quantity:missing=true".into(),
            vec![1, 2, 3, 4, 5],
        ),
        ("code-value-concept:missing=false".into(), vec![1]),
        ("combo-code-value-quantity:missing=false".into(), vec![0, 4]),
        (
            "combo-code-value-quantity:missing=true".into(),
            vec![1, 2, 3, 5],
        ),
        (
            format!("code={SYS}|cv-1&code-value-quantity:missing=true"),
            vec![1, 2, 3],
        ),
    ];
    for (q, want) in cases {
        assert_eq!(found(q.clone()).await, expect(&want), "{q}");
    }
    // A value with the wrong number of parts is refused, naming the parameter.
    let err = s
        .search(
            "Observation",
            &pairs(&format!("code-value-quantity={SYS}|cv-1")),
        )
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("code-value-quantity"), "{err}");
    // Reverse chains read the same set.
    let via_has = s
        .search(
            "Patient",
            &pairs(&format!(
                "_has:Observation:subject:code-value-quantity={SYS}|cv-1$5"
            )),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .resources
        .into_iter()
        .map(|m| m.id)
        .collect::<Vec<_>>();
    assert_eq!(via_has, vec![patient]);
}

/// References to contained resources: not found by a reference search, yet present for
/// `:missing` (also through a parameter that reads another's rows).
async fn contained_references(s: &Store) {
    let tag = |id: &str| json!({"system": "urn:kizuna:test", "code": id});
    let obs = |encounter: Option<&str>| {
        let mut o = json!({"resourceType": "Observation", "status": "final",
            "meta": {"tag": [tag("contained-refs")]},
            "contained": [{"resourceType": "Encounter", "id": "e1", "status": "finished"}],
            "code": {"text": "x"}});
        if let Some(e) = encounter {
            o["encounter"] = json!({"reference": e});
        }
        if encounter != Some("#e1") {
            o.as_object_mut().map(|m| m.remove("contained"));
        }
        o
    };
    let mut ids = Vec::new();
    for e in [Some("#e1"), Some("Encounter/real-1"), None] {
        let stored = s.create(obs(e)).await.unwrap_or_else(|e| panic!("{e}"));
        ids.push(stored.id);
    }
    let (local, real, none) = (&ids[0], &ids[1], &ids[2]);
    let found = |q: &'static str, rt: &'static str| sorted_ids(s, rt, q);
    let sorted = |mut v: Vec<&String>| {
        v.sort();
        v.into_iter().cloned().collect::<Vec<_>>()
    };
    assert_eq!(
        found(
            "_tag=urn:kizuna:test|contained-refs&encounter:missing=false",
            "Observation"
        )
        .await,
        sorted(vec![local, real])
    );
    assert_eq!(
        found(
            "_tag=urn:kizuna:test|contained-refs&encounter:missing=true",
            "Observation"
        )
        .await,
        vec![none.clone()]
    );
    assert!(found("encounter=#e1", "Observation").await.is_empty());
    assert_eq!(
        found("encounter=Encounter/real-1", "Observation").await,
        vec![real.clone()]
    );
    // DeviceUseStatement's `subject` reads the rows of `patient` (defined alike).
    let dus = |p: &str| {
        json!({"resourceType": "DeviceUseStatement", "status": "active",
            "meta": {"tag": [tag("contained-dus")]},
            "contained": [{"resourceType": "Patient", "id": "p1"}],
            "subject": {"reference": p}, "device": {"reference": "Device/d1"}})
    };
    let with_local = s
        .create(dus("#p1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    assert_eq!(
        found(
            "_tag=urn:kizuna:test|contained-dus&subject:missing=false",
            "DeviceUseStatement"
        )
        .await,
        vec![with_local]
    );
    assert!(found(
        "_tag=urn:kizuna:test|contained-dus&patient:missing=true",
        "DeviceUseStatement"
    )
    .await
    .is_empty());
}

/// A patient's compartment, found through the parameters that link each type to the patient
/// (`subject`, whose Patient rows are `patient`'s; `performer`; DeviceUseStatement's `subject`,
/// which reads `patient`'s rows; Basic's `patient`): the patient's own resources, none of
/// another's nor of a type outside the compartment, `types` and `since` honoured.
async fn compartment(s: &Store) {
    let me = s
        .create(json!({"resourceType": "Patient", "name": [{"family": "区画"}]}))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    let other = s
        .create(json!({"resourceType": "Patient"}))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    let mut want = vec![("Patient".to_string(), me.clone())];
    for (who, body) in [
        (
            &me,
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "a"}, "subject": {"reference": format!("Patient/{me}")}}),
        ),
        (
            &me,
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "b"}, "subject": {"reference": format!("Patient/{other}")}, "performer": [{"reference": format!("Patient/{me}")}]}),
        ),
        (
            &me,
            json!({"resourceType": "DeviceUseStatement", "status": "active", "subject": {"reference": format!("Patient/{me}")}, "device": {"reference": "Device/d"}}),
        ),
        (
            &me,
            json!({"resourceType": "Condition", "subject": {"reference": format!("Patient/{me}")}}),
        ),
        (
            &other,
            json!({"resourceType": "Condition", "subject": {"reference": format!("Patient/{other}")}}),
        ),
        (
            &me,
            json!({"resourceType": "Basic", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{me}")}}),
        ),
        // R4's compartment lists no parameter of Device: not a member through its `patient`.
        (
            &other,
            json!({"resourceType": "Device", "patient": {"reference": format!("Patient/{me}")}}),
        ),
    ] {
        let stored = s.create(body).await.unwrap_or_else(|e| panic!("{e}"));
        if who == &me {
            want.push((stored.resource_type, stored.id));
        }
    }
    want.sort();
    let members = s
        .compartment_members(&me, None, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(members, want);
    let only: Vec<String> = vec!["Condition".into(), "DeviceUseStatement".into()];
    let members = s
        .compartment_members(&me, Some(&only), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let kinds: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(kinds, ["Condition", "DeviceUseStatement"]);
    let later = s
        .compartment_members(&me, None, Some(i64::MAX))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(later.is_empty(), "{later:?}");
}

/// The resource inside a Bundle (`Bundle.entry[0].resource`: R4's `composition` and `message`) is
/// searched through its own parameters, and chains go on from its references; a store of schema 9
/// (no such rows) gets them when opened.
async fn embedded_resources(s: &Store, url: &str) {
    const TAG: &str = "_tag=urn:kizuna:test|embedded";
    let meta = json!({"tag": [{"system": "urn:kizuna:test", "code": "embedded"}]});
    let patient = s
        .create(
            json!({"resourceType": "Patient", "name": [{"family": "埋込山田"}],
            "identifier": [{"system": "urn:kizuna:test:embedded", "value": "E-1"}]}),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    let composition = |id: &str, code: &str, subject: &str, date: &str, title: &str| {
        json!({"resourceType": "Composition", "id": id, "status": "final",
            "type": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": subject}, "date": date, "title": title,
            "author": [{"reference": "Practitioner/embedded-1"}]})
    };
    let bundle = |kind: &str, first: Value| {
        json!({"resourceType": "Bundle", "type": kind, "meta": meta,
            "entry": [{"fullUrl": "urn:uuid:8f0a6b1e-0000-4000-8000-000000000001", "resource": first},
                      {"fullUrl": "urn:uuid:8f0a6b1e-0000-4000-8000-000000000002",
                       "resource": {"resourceType": "Patient", "gender": "male"}}]})
    };
    let mut d2_composition = composition(
        "comp-2",
        "18842-5",
        "Patient/embedded-other",
        "2025-05-01",
        "退院時サマリー",
    );
    d2_composition["contained"] =
        json!([{"resourceType": "Encounter", "id": "e", "status": "finished"}]);
    d2_composition["encounter"] = json!({"reference": "#e"});
    let header = json!({"resourceType": "MessageHeader", "id": "mh-1",
        "eventCoding": {"system": "urn:kizuna:test:event", "code": "notify"},
        "source": {"endpoint": "urn:kizuna:test:source"},
        "focus": [{"reference": format!("Patient/{patient}")}]});
    let mut ids = Vec::new();
    for b in [
        bundle(
            "document",
            composition(
                "comp-1",
                "57133-1",
                &format!("Patient/{patient}"),
                "2026-11-01",
                "診療情報提供書",
            ),
        ),
        bundle("document", d2_composition),
        bundle("message", header),
        bundle(
            "collection",
            json!({"resourceType": "Patient", "gender": "female"}),
        ),
    ] {
        ids.push(s.create(b).await.unwrap_or_else(|e| panic!("{e}")).id);
    }
    let (d1, d2, m, other) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    let all = {
        let mut v = ids.clone();
        v.sort();
        v
    };
    let cases: Vec<(String, Vec<&String>)> = vec![
        ("composition.type=http://loinc.org|57133-1".into(), vec![d1]),
        ("composition.type=57133-1,18842-5".into(), vec![d1, d2]),
        (format!("composition.subject=Patient/{patient}"), vec![d1]),
        (format!("composition.patient={patient}"), vec![d1]),
        ("composition.subject.family=埋込山田".into(), vec![d1]),
        (
            "composition.subject:Patient.family=埋込山田".into(),
            vec![d1],
        ),
        (
            "composition.patient.identifier=urn:kizuna:test:embedded|E-1".into(),
            vec![d1],
        ),
        ("composition.date=ge2026-01-01".into(), vec![d1]),
        ("composition.date=lt2026".into(), vec![d2]),
        ("composition.title:contains=提供".into(), vec![d1]),
        ("composition._id=comp-2".into(), vec![d2]),
        ("composition.encounter:missing=false".into(), vec![d2]),
        // As in any chain: a Bundle without a Composition has no encounter to miss.
        ("composition.encounter:missing=true".into(), vec![d1]),
        ("composition.type:missing=true".into(), vec![]),
        ("composition:missing=false".into(), vec![d1, d2]),
        ("composition:missing=true".into(), vec![m, other]),
        ("message:missing=false".into(), vec![m]),
        ("composition=Composition/comp-1".into(), vec![d1]),
        ("message=MessageHeader/mh-1".into(), vec![m]),
        ("message.event=urn:kizuna:test:event|notify".into(), vec![m]),
        (format!("message.focus=Patient/{patient}"), vec![m]),
        // The message's header is no Composition, nor a document's Composition a header.
        ("composition.type:missing=false".into(), vec![d1, d2]),
        ("message.event:missing=false".into(), vec![m]),
        ("type=document".into(), vec![d1, d2]),
    ];
    let cases: Vec<(String, Vec<String>)> = cases
        .into_iter()
        .map(|(q, want)| {
            let mut want: Vec<String> = want.into_iter().cloned().collect();
            want.sort();
            (q, want)
        })
        .collect();
    let check = |s: Store, cases: Vec<(String, Vec<String>)>| async move {
        for (q, want) in cases {
            assert_eq!(
                sorted_ids(&s, "Bundle", &format!("{TAG}&{q}")).await,
                want,
                "Bundle?{q}"
            );
        }
    };
    check(s.clone(), cases.clone()).await;
    assert_eq!(sorted_ids(s, "Bundle", TAG).await, all);
    // `_include=Bundle:composition` brings a stored Composition of the held one's id, if any.
    let stored = s
        .update(
            json!({"resourceType": "Composition", "id": "comp-1", "status": "final",
                "type": {"text": "stored"}, "date": "2026-11-01", "title": "stored",
                "author": [{"display": "x"}]}),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r = s
        .search(
            "Bundle",
            &pairs(&format!("{TAG}&type=document&_include=Bundle:composition")),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.resources.len(), 2);
    let included: Vec<(&str, &str)> = r
        .included
        .iter()
        .map(|m| (m.resource_type.as_str(), m.id.as_str()))
        .collect();
    assert_eq!(included, [("Composition", stored.id.as_str())]);
    assert!(matches!(
        s.search("Bundle", &pairs("composition.no-such=1")).await,
        Err(StoreError::UnknownParameter(_))
    ));
    // Schema 9 had no rows for them.
    for sql in [
        "DELETE FROM idx_token WHERE pid IN (SELECT pid FROM kz_param WHERE rtype = 'Bundle' \
         AND (code LIKE 'composition.%' OR code LIKE 'message.%'))",
        "DELETE FROM idx_reference WHERE pid IN (SELECT pid FROM kz_param WHERE rtype = 'Bundle' \
         AND (code LIKE 'composition%' OR code LIKE 'message%'))",
        "UPDATE kz_meta SET value = '9' WHERE key = 'schema_version'",
    ] {
        s.execute_raw(sql).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        sorted_ids(s, "Bundle", &format!("{TAG}&composition.type=57133-1"))
            .await
            .is_empty()
    );
    let reopened = upgraded(url).await;
    check(reopened, cases).await;
}

/// A background reindex interrupted after some pages resumes, when the store is next opened, after
/// the last page it recorded, and leaves no record once done.
async fn resumes_a_background_reindex(s: &Store, url: &str) {
    let doc = json!({"resourceType": "Bundle", "type": "document",
        "entry": [{"resource": {"resourceType": "Composition", "status": "final",
            "type": {"coding": [{"system": "urn:kizuna:test:resume", "code": "doc"}]}}}]});
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            s.create(doc.clone())
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .id,
        );
    }
    let q = "composition.type=urn:kizuna:test:resume|doc";
    let mut all = ids.clone();
    all.sort();
    assert_eq!(sorted_ids(s, "Bundle", q).await, all);
    let list = ids
        .iter()
        .map(|i| format!("'{i}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // Their rows gone (as before schema 10), and a reindex of Bundle recorded as done up to the
    // first of them.
    let mut sql: Vec<String> = ["idx_token", "idx_reference"]
        .iter()
        .map(|t| {
            format!(
                "DELETE FROM {t} WHERE rid IN (SELECT rid FROM resources WHERE rtype = 'Bundle' \
                 AND id IN ({list})) AND pid IN (SELECT pid FROM kz_param WHERE rtype = 'Bundle' \
                 AND code LIKE 'composition%')"
            )
        })
        .collect();
    sql.push("INSERT INTO kz_meta (key, value) VALUES ('reindex_pending', 'Bundle')".into());
    sql.push(format!(
        "INSERT INTO kz_meta (key, value) SELECT 'reindex_after', CAST(rid AS TEXT) FROM resources \
         WHERE rtype = 'Bundle' AND id = '{}'",
        ids[0]
    ));
    for q in &sql {
        s.execute_raw(q).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(sorted_ids(s, "Bundle", q).await.is_empty());
    let reopened = upgraded(url).await;
    assert!(reopened.reindexing().is_empty());
    let mut rest = ids[1..].to_vec();
    rest.sort();
    assert_eq!(
        sorted_ids(&reopened, "Bundle", q).await,
        rest,
        "resumed after the first"
    );
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM kz_meta WHERE key LIKE 'reindex%'")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    pool.close().await;
    assert_eq!(left, 0, "no record left");
    // A search after the reindex says nothing is missing.
    let r = reopened
        .search("Bundle", &pairs(q))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!r.reindexing);
}

/// A stored body that is not JSON (never written so) does not stop a background reindex: the
/// others get their rows, the damaged one keeps those it had, and the reindex finishes.
async fn a_damaged_body_does_not_stop_a_reindex(s: &Store, url: &str) {
    let basic = json!({"resourceType": "Basic",
        "code": {"coding": [{"system": "urn:kizuna:test:damaged", "code": "b"}]}});
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            s.create(basic.clone())
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .id,
        );
    }
    let (damaged, fine) = (&ids[0], &ids[1]);
    for q in [
        format!("UPDATE resources SET body = '{{' WHERE rtype = 'Basic' AND id = '{damaged}'"),
        format!(
            "DELETE FROM idx_token WHERE rid = (SELECT rid FROM resources WHERE rtype = 'Basic' \
             AND id = '{fine}')"
        ),
        "INSERT INTO kz_meta (key, value) VALUES ('reindex_pending', 'Basic')".into(),
        "INSERT INTO kz_meta (key, value) VALUES ('reindex_after', '0')".into(),
    ] {
        s.execute_raw(&q).await.unwrap_or_else(|e| panic!("{e}"));
    }
    // Ids only: a search that returns the damaged body fails on it, as a read does.
    let ids_of = |s: Store| async move {
        let mut v = s
            .search_ids("Basic", &pairs("code=urn:kizuna:test:damaged|b"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        v.sort();
        v
    };
    assert_eq!(ids_of(s.clone()).await, vec![damaged.clone()]);
    let reopened = Store::open(url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::timeout(std::time::Duration::from_secs(60), reopened.reindexed())
        .await
        .unwrap_or_else(|e| panic!("the reindex did not finish: {e}"));
    assert!(reopened.reindexing().is_empty());
    let mut both = ids.clone();
    both.sort();
    assert_eq!(ids_of(reopened.clone()).await, both);
    let gone = reopened
        .purge(&[("Basic", damaged.as_str())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gone, 1);
}

/// An operator's reindex of one type rebuilds its rows from the stored bodies and leaves no
/// record once done.
async fn operator_reindex(s: &Store) {
    let id = s
        .create(json!({"resourceType": "Basic",
            "code": {"coding": [{"system": "urn:kizuna:test:operator", "code": "x"}]}}))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    s.execute_raw(&format!(
        "DELETE FROM idx_token WHERE rid = (SELECT rid FROM resources WHERE rtype = 'Basic' AND id = '{id}')"
    ))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let q = "code=urn:kizuna:test:operator|x";
    assert!(sorted_ids(s, "Basic", q).await.is_empty());
    s.reindex_in_background(&["Basic".to_string()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::timeout(std::time::Duration::from_secs(60), s.reindexed())
        .await
        .unwrap_or_else(|e| panic!("the reindex did not finish: {e}"));
    assert!(s.reindexing().is_empty());
    assert_eq!(sorted_ids(s, "Basic", q).await, vec![id]);
}

/// Retention's erase: every version, the index rows and the current row of the named resources,
/// across types and pages of 500; absent and repeated keys count once or not at all; others stay.
async fn purges(s: &Store) {
    const SYS: &str = "urn:kizuna:test:purge";
    let ident = |i: usize| json!([{"system": SYS, "value": format!("p{i}")}]);
    let mut patients = Vec::new();
    for i in 0..520 {
        let c = s
            .create(json!({"resourceType": "Patient", "identifier": ident(i)}))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        patients.push(c.id);
    }
    // A second version for the first one: its history goes too.
    let mut r = s
        .read("Patient", &patients[0])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .and_then(|x| x.resource)
        .unwrap_or_default();
    r["gender"] = json!("other");
    s.update(r, None).await.unwrap_or_else(|e| panic!("{e}"));
    let obs = s
        .create(json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": SYS, "code": "o"}]}}))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    // All but the last Patient, the Observation, a repeat and an absent one.
    let mut keys: Vec<(&str, &str)> = patients[..519]
        .iter()
        .map(|id| ("Patient", id.as_str()))
        .collect();
    keys.push(("Observation", obs.as_str()));
    keys.push(("Patient", patients[3].as_str()));
    keys.push(("Patient", "no-such-patient"));
    assert_eq!(s.purge(&keys).await.unwrap_or_else(|e| panic!("{e}")), 520);
    assert_eq!(
        sorted_ids(s, "Patient", &format!("identifier={SYS}|")).await,
        vec![patients[519].clone()]
    );
    assert!(sorted_ids(s, "Observation", &format!("code={SYS}|o"))
        .await
        .is_empty());
    for id in [&patients[0], &patients[518]] {
        assert!(s
            .read("Patient", id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none());
        assert!(s
            .vread("Patient", id, 1)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none());
        assert!(s
            .history(Some("Patient"), Some(id), None, 10)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty());
    }
    assert!(s
        .read("Patient", &patients[519])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_some());
    // Nothing of this test is left for the searches after it.
    let last = [("Patient", patients[519].as_str())];
    assert_eq!(s.purge(&last).await.unwrap_or_else(|e| panic!("{e}")), 1);
    assert!(sorted_ids(s, "Patient", &format!("identifier={SYS}|"))
        .await
        .is_empty());
}

async fn suite(s: Store, url: &str) {
    crud(&s, url).await;
    purges(&s).await;
    contained_references(&s).await;
    scans(&s).await;
    concurrent_writers(&s).await;
    transactions(&s).await;
    large_transaction(&s).await;
    searches(&s).await;
    broad_criteria(&s).await;
    versioned_canonicals(&s).await;
    rows_written_before_narrowing(&s).await;
    // After the searches checked against the loaded data: they store Patients.
    embedded_resources(&s, url).await;
    resumes_a_background_reindex(&s, url).await;
    operator_reindex(&s).await;
    compartment(&s).await;
    // Last: its Observations would count in the searches checked against the loaded data.
    composites(&s).await;
    a_damaged_body_does_not_stop_a_reindex(&s, url).await;
}

#[tokio::test]
async fn sqlite_suite() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("sqlite://{}", d.path().join("kizuna.db").display());
    let s = Store::open(&url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    suite(s.clone(), &url).await;
    migrates_duplicated_bodies(&url).await;
    migrates_composites(&url).await;
    // Reopening migrates again without losing anything.
    drop(s);
    let s = Store::open(&url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        s.search("Patient", &pairs("gender=female"))
            .await
            .map(|r| r.total.unwrap_or(-1))
            .unwrap_or(0)
            > 0
    );
}

/// SQLite: committed pages reach the database file while writes keep coming, without a pause
/// and long before the writer's own checkpoint (64 MB of WAL) — the checkpointer beside the writer
/// does it. Writes run back to back (no 200 ms pause for the idle checkpoint) until the file grows.
#[tokio::test]
async fn sqlite_checkpoints_beside_a_busy_writer() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = d.path().join("kizuna.db");
    let s = Store::open(&format!("sqlite://{}", db.display()), Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let start = size(&db);
    let wal = d.path().join("kizuna.db-wal");
    let mut grew = false;
    for i in 0..2000 {
        let ops = (0..20)
            .map(|j| WriteOp::Create {
                resource: json!({"resourceType": "Observation", "status": "final",
                    "code": {"text": format!("ckpt-{i}-{j}")}}),
                full_url: None,
            })
            .collect();
        s.transaction(ops).await.unwrap_or_else(|e| panic!("{e}"));
        if size(&db) > start {
            grew = true;
            break;
        }
    }
    assert!(grew, "the database file never grew during the writes");
    assert!(
        size(&wal) < 64 << 20,
        "the checkpointer copies pages back long before the WAL nears the writer's own threshold (256 MiB)"
    );
}

/// SQLite: the schema-5 upgrade rewrites every history page that held a current body; the WAL that
/// rewrite produced is copied back and truncated, not left on disk at its size.
#[tokio::test]
async fn sqlite_upgrade_gives_back_its_wal() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = d.path().join("kizuna.db");
    let url = format!("sqlite://{}", db.display());
    let s = Store::open(&url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let text = "x".repeat(8_000);
    for chunk in 0..10 {
        let ops = (0..100)
            .map(|i| WriteOp::Create {
                resource: json!({"resourceType": "Basic", "code": {"text": format!("{chunk}-{i}")},
                    "extension": [{"url": "urn:kizuna:test", "valueString": text}]}),
                full_url: None,
            })
            .collect();
        s.transaction(ops).await.unwrap_or_else(|e| panic!("{e}"));
    }
    // The schema-4 layout: every current body in its history row too.
    for sql in [
        "UPDATE history SET body = (SELECT body FROM resources r WHERE r.rtype = history.rtype \
         AND r.id = history.id AND r.version = history.version) WHERE body IS NULL AND deleted = 0",
        "UPDATE kz_meta SET value = '4' WHERE key = 'schema_version'",
        "PRAGMA wal_checkpoint(TRUNCATE)",
    ] {
        s.execute_raw(sql).await.unwrap_or_else(|e| panic!("{e}"));
    }
    drop(s);
    let wal = d.path().join("kizuna.db-wal");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let s = Store::open(&url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The background reindex (every type, from schema 4) writes a little WAL of its own.
    s.reindexed().await;
    // 1,000 history rows of 8 KB were rewritten (about 8 MB of pages).
    assert!(
        size(&wal) < 1 << 20,
        "the WAL kept {} bytes after the upgrade",
        size(&wal)
    );
    let all = s
        .search("Basic", &pairs("_count=1000"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all.resources.len(), 1000);
    let one = &all.resources[0];
    let v1 = s
        .vread("Basic", &one.id, 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .and_then(|x| x.resource)
        .unwrap_or_default();
    assert_eq!(v1["extension"][0]["valueString"], json!(text));
}

/// PostgreSQL: `bash .ci/run` starts a server and runs this (`--include-ignored`); the URL comes from
/// `KIZUNA_TEST_POSTGRES`.
#[tokio::test]
#[ignore = "needs PostgreSQL: run `bash .ci/run`, or set KIZUNA_TEST_POSTGRES and pass --include-ignored"]
async fn postgres_suite() {
    let url = std::env::var("KIZUNA_TEST_POSTGRES")
        .unwrap_or_else(|_| panic!("KIZUNA_TEST_POSTGRES is not set"));
    let s = Store::open(&url, Registry::builtin())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    // A fresh schema each run.
    for t in ["resources", "history"]
        .into_iter()
        .chain(kizuna_store::INDEX_TABLES)
    {
        let _ = sqlx_truncate(&s, t).await;
    }
    // Planner statistics are gathered as the store grows (the suite writes well over 1,000
    // resources): forget when they last were, then expect the store to have run ANALYZE itself.
    s.execute_raw("SELECT pg_stat_reset()")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    suite(s.clone(), &url).await;
    migrates_duplicated_bodies(&url).await;
    migrates_composites(&url).await;
    for chunk in 0..12 {
        let ops = (0..100)
            .map(|i| kizuna_store::WriteOp::Create {
                resource: serde_json::json!({"resourceType": "Patient", "gender": "other",
                    "identifier": [{"system": "urn:stats", "value": format!("{chunk}-{i}")}]}),
                full_url: None,
            })
            .collect();
        s.transaction(ops).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let analysed = "DO $$ BEGIN IF (SELECT last_analyze FROM pg_stat_user_tables \
        WHERE relname = 'idx_token' AND schemaname = current_schema()) IS NULL \
        THEN RAISE EXCEPTION 'not analysed'; END IF; END $$";
    let mut tries = 0;
    while let Err(e) = s.execute_raw(analysed).await {
        tries += 1;
        assert!(
            tries < 100,
            "the store never refreshed PostgreSQL's statistics: {e}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn sqlx_truncate(s: &Store, table: &str) -> Result<(), StoreError> {
    s.execute_raw(&format!("DELETE FROM {table}")).await
}

/// Database URLs the store cannot serve get a clear error instead of a broken store: an in-memory
/// SQLite database would be a different empty database on each pooled connection (fuzzing met
/// "no such table" from it).
#[tokio::test]
async fn unusable_database_urls_are_refused_clearly() {
    for url in [
        "sqlite::memory:",
        "sqlite://:memory:",
        "sqlite:file:x?mode=memory&cache=shared",
    ] {
        match Store::open(url, Registry::builtin()).await {
            Err(StoreError::InMemory) => {}
            other => panic!("{url}: {other:?}"),
        }
    }
    match Store::open("mysql://localhost/x", Registry::builtin()).await {
        Err(StoreError::UnsupportedUrl) => {}
        other => panic!("{other:?}"),
    }
}
