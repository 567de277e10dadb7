//! The audit log as its users rely on it: tampering of every kind is detected, the patient sees only
//! their own history (and asking for someone else's is refused and itself audited), proofs verify.

use std::path::Path;

use kizuna_audit::checkpoint::CheckpointSigner;
use kizuna_audit::merkle::{verify_consistency, verify_inclusion};
use kizuna_audit::{
    verify_dir, Actor, ActorKind, AuditLog, AuditQuery, AuditWriter, CheckpointPolicy,
    HistoryRequester, LogOptions, NewEntry, Outcome, Purpose, Target,
};

fn actor(kind: ActorKind, id: &str) -> Actor {
    Actor {
        kind,
        id: id.into(),
        institution: Some("1318814790".into()),
        issuer: None,
    }
}

fn entry(i: u64, person: &str, purpose: Purpose) -> NewEntry {
    NewEntry {
        time: format!("2026-11-21T10:{:02}:{:02}+09:00", (i / 60) % 60, i % 60),
        actor: actor(ActorKind::Clinician, &format!("doctor-{}", i % 3)),
        action: "read".into(),
        target: Target {
            resource_type: Some("Condition".into()),
            resource_id: Some(format!("c{i}")),
            person: Some(person.into()),
            ..Target::default()
        },
        purpose,
        outcome: Outcome::allow("consent-category-1"),
        source: Some("127.0.0.1".into()),
        request: None,
    }
}

fn seed() -> [u8; 32] {
    [7u8; 32]
}

/// A log of `n` entries with a checkpoint at the end.
fn write_log(dir: &Path, n: u64) -> CheckpointSigner {
    let mut log = AuditLog::open(
        dir,
        LogOptions {
            signer: Some(CheckpointSigner::from_seed(seed())),
            policy: CheckpointPolicy {
                every_entries: 4,
                every: std::time::Duration::from_secs(3600),
            },
            sync: false,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let batch: Vec<NewEntry> = (0..n)
        .map(|i| {
            entry(
                i,
                if i % 2 == 0 { "person-A" } else { "person-B" },
                Purpose::Treatment,
            )
        })
        .collect();
    // Batches of three: the policy checkpoints after a batch once four or more entries are uncovered.
    for chunk in batch.chunks(3) {
        log.append(chunk).unwrap_or_else(|e| panic!("{e}"));
    }
    log.checkpoint(Some("2026-11-21T11:00:00Z"))
        .unwrap_or_else(|e| panic!("{e}"));
    CheckpointSigner::from_seed(seed())
}

fn lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("entries.ndjson"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(dir: &Path, ls: &[String]) {
    std::fs::write(dir.join("entries.ndjson"), ls.join("\n") + "\n")
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn untouched_log_verifies() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = write_log(d.path(), 10);
    let r = verify_dir(d.path(), &s.verifying_key()).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!((r.entries, r.covered, r.uncovered()), (10, 10, 0));
    assert!(
        r.checkpoints >= 2,
        "periodic checkpoints every 4 entries plus the final one"
    );
}

#[test]
fn modified_entry_is_detected() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = write_log(d.path(), 10);
    let mut ls = lines(d.path());
    ls[3] = ls[3].replace("doctor-0", "doctor-9");
    write_lines(d.path(), &ls);
    let r = verify_dir(d.path(), &s.verifying_key()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!r.ok());
    assert!(
        r.problems.iter().any(|p| p.contains("root mismatch")),
        "{:?}",
        r.problems
    );
}

#[test]
fn removed_entry_is_detected() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = write_log(d.path(), 10);
    let mut ls = lines(d.path());
    ls.remove(5);
    write_lines(d.path(), &ls);
    let r = verify_dir(d.path(), &s.verifying_key()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.problems.iter().any(|p| p.contains("removed")),
        "{:?}",
        r.problems
    );
}

#[test]
fn removed_last_entry_is_detected() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = write_log(d.path(), 10);
    let mut ls = lines(d.path());
    ls.pop();
    write_lines(d.path(), &ls);
    let r = verify_dir(d.path(), &s.verifying_key()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.problems.iter().any(|p| p.contains("only 9 exist")),
        "{:?}",
        r.problems
    );
}

#[test]
fn reordered_entries_are_detected() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = write_log(d.path(), 10);
    let mut ls = lines(d.path());
    ls.swap(2, 7);
    write_lines(d.path(), &ls);
    let r = verify_dir(d.path(), &s.verifying_key()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.problems.iter().any(|p| p.contains("reordered")),
        "{:?}",
        r.problems
    );
    assert!(
        r.problems.iter().any(|p| p.contains("root mismatch")),
        "{:?}",
        r.problems
    );
}

#[test]
fn reordered_entries_with_fixed_sequence_numbers_are_still_detected() {
    // An attacker who also rewrites the sequence numbers still cannot match the signed root.
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = write_log(d.path(), 10);
    let mut ls = lines(d.path());
    ls.swap(2, 7);
    ls[2] = ls[2].replace("\"seq\":7", "\"seq\":2");
    ls[7] = ls[7].replace("\"seq\":2", "\"seq\":7");
    write_lines(d.path(), &ls);
    let r = verify_dir(d.path(), &s.verifying_key()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.problems.iter().any(|p| p.contains("root mismatch")),
        "{:?}",
        r.problems
    );
}

#[test]
fn inserted_entry_is_detected() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = write_log(d.path(), 10);
    let mut ls = lines(d.path());
    let forged = ls[4].clone();
    ls.insert(5, forged);
    write_lines(d.path(), &ls);
    let r = verify_dir(d.path(), &s.verifying_key()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.problems.iter().any(|p| p.contains("inserted")),
        "{:?}",
        r.problems
    );
}

#[test]
fn forged_checkpoint_is_detected() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = write_log(d.path(), 10);
    // Modify an entry and sign a new checkpoint with another key.
    let mut ls = lines(d.path());
    ls[1] = ls[1].replace("doctor-1", "doctor-X");
    write_lines(d.path(), &ls);
    let mut tree = kizuna_audit::merkle::MerkleTree::new();
    for l in &ls {
        tree.push(kizuna_audit::merkle::leaf_hash(l.as_bytes()));
    }
    let mallory = CheckpointSigner::from_seed([9u8; 32]);
    let mut cp = mallory.sign(10, &tree.root(), "2026-11-21T12:00:00Z");
    cp.key_id = s.key_id();
    std::fs::write(
        d.path().join("checkpoints.ndjson"),
        serde_json::to_string(&cp).unwrap_or_default() + "\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let r = verify_dir(d.path(), &s.verifying_key()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.problems.iter().any(|p| p.contains("invalid signature")),
        "{:?}",
        r.problems
    );
    assert_eq!(r.covered, 0);
}

#[test]
fn altered_checkpoint_is_detected() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = write_log(d.path(), 10);
    let text = std::fs::read_to_string(d.path().join("checkpoints.ndjson")).unwrap_or_default();
    let altered = text.replacen("\"size\":10", "\"size\":9", 1);
    std::fs::write(d.path().join("checkpoints.ndjson"), altered).unwrap_or_else(|e| panic!("{e}"));
    let r = verify_dir(d.path(), &s.verifying_key()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.problems.iter().any(|p| p.contains("invalid signature")),
        "{:?}",
        r.problems
    );
}

#[test]
fn proofs_from_the_log_verify_against_its_checkpoint() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    write_log(d.path(), 10);
    let log = AuditLog::open(d.path(), LogOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let cp = log
        .latest_checkpoint()
        .cloned()
        .unwrap_or_else(|| panic!("checkpoint"));
    let root = cp.root_hash().unwrap_or_else(|| panic!("root"));
    for seq in 0..10 {
        let proof = log
            .inclusion_proof(seq, cp.size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let leaf = log
            .leaf(seq)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("leaf"));
        assert!(verify_inclusion(seq, cp.size, &leaf, &proof, &root));
    }
    let old = log
        .root_at(4)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("root 4"));
    let proof = log
        .consistency_proof(4, 10)
        .ok()
        .flatten()
        .unwrap_or_default();
    assert!(verify_consistency(4, 10, &old, &root, &proof));
}

#[test]
fn patient_sees_only_own_history_and_refusals_are_audited() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut log = AuditLog::open(d.path(), LogOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    log.append(&[
        entry(1, "person-A", Purpose::Treatment),
        entry(2, "person-B", Purpose::Treatment),
        entry(
            3,
            "person-A",
            Purpose::Emergency {
                reason: "意識障害で搬送".into(),
            },
        ),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let patient_a = HistoryRequester::Patient {
        actor: actor(ActorKind::Patient, "pt-a"),
        person: "person-A".into(),
    };
    let h = log
        .access_history(&patient_a, "person-A", "2026-11-21T12:00:00+09:00")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.len(), 2);
    assert!(h
        .iter()
        .any(|r| r.emergency && r.emergency_reason.as_deref() == Some("意識障害で搬送")));
    assert!(h
        .iter()
        .all(|r| r.resource_type.as_deref() == Some("Condition")));
    // Asking for another person's history is refused…
    let err = log.access_history(&patient_a, "person-B", "2026-11-21T12:01:00+09:00");
    assert!(
        matches!(err, Err(kizuna_audit::AuditError::Denied(ref r)) if r == "history-other-person")
    );
    // … and a clinician may not read histories at all.
    let other = HistoryRequester::Other {
        actor: actor(ActorKind::Clinician, "doctor-0"),
    };
    assert!(log
        .access_history(&other, "person-A", "2026-11-21T12:02:00+09:00")
        .is_err());
    // Each request, allowed or refused, is in the log.
    let audit = log
        .query(&AuditQuery {
            actor: Some("pt-a".into()),
            ..AuditQuery::default()
        })
        .unwrap_or_default();
    assert_eq!(audit.len(), 2);
    assert!(audit
        .iter()
        .any(|e| e.entry.outcome.allowed && e.entry.action == "access-history"));
    assert!(audit
        .iter()
        .any(|e| !e.entry.outcome.allowed && e.entry.outcome.rule == "history-other-person"));
    // The operator may search anyone's.
    let op = HistoryRequester::Operator {
        actor: actor(ActorKind::Operator, "ops-1"),
    };
    let h = log
        .access_history(&op, "person-B", "2026-11-21T12:03:00+09:00")
        .unwrap_or_else(|e| panic!("{e}"));
    // person-B's record read, and patient A's refused attempt to see person-B's history.
    assert_eq!(h.len(), 2);
    assert!(h
        .iter()
        .any(|r| r.action == "access-history" && !r.allowed && r.actor == "pt-a"));
}

#[test]
fn operator_search_by_principal_resource_and_time() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut log = AuditLog::open(d.path(), LogOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let batch: Vec<NewEntry> = (0..30)
        .map(|i| entry(i, "person-A", Purpose::Treatment))
        .collect();
    log.append(&batch).unwrap_or_else(|e| panic!("{e}"));
    let by_actor = log
        .query(&AuditQuery {
            actor: Some("doctor-1".into()),
            ..AuditQuery::default()
        })
        .unwrap_or_default();
    assert_eq!(by_actor.len(), 10);
    let by_res = log
        .query(&AuditQuery {
            resource_type: Some("Condition".into()),
            resource_id: Some("c7".into()),
            ..AuditQuery::default()
        })
        .unwrap_or_default();
    assert_eq!(by_res.len(), 1);
    let by_time = log
        .query(&AuditQuery {
            from: Some("2026-11-21T01:00:10Z".into()),
            to: Some("2026-11-21T01:00:20Z".into()),
            ..AuditQuery::default()
        })
        .unwrap_or_default();
    assert_eq!(by_time.len(), 10, "mixed offsets compare as instants");
    let last = log
        .query(&AuditQuery {
            limit: Some(3),
            ..AuditQuery::default()
        })
        .unwrap_or_default();
    assert_eq!(
        last.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![27, 28, 29]
    );
}

#[test]
fn torn_last_line_is_dropped_on_reopen() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    write_log(d.path(), 5);
    let mut text = std::fs::read_to_string(d.path().join("entries.ndjson")).unwrap_or_default();
    text.push_str("{\"seq\":5,\"time\":\"20");
    std::fs::write(d.path().join("entries.ndjson"), &text).unwrap_or_else(|e| panic!("{e}"));
    let mut log = AuditLog::open(d.path(), LogOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(log.len(), 5);
    log.append(&[entry(5, "person-A", Purpose::Treatment)])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(log.get(5).map(|e| e.seq).ok(), Some(5));
    let r = verify_dir(
        d.path(),
        &CheckpointSigner::from_seed(seed()).verifying_key(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.uncovered(), 1);
}

#[test]
fn background_writer_batches_and_flushes() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = AuditLog::open(
        d.path(),
        LogOptions {
            signer: Some(CheckpointSigner::from_seed(seed())),
            policy: CheckpointPolicy::default(),
            sync: true,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let w = AuditWriter::spawn(log);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let w = w.clone();
            std::thread::spawn(move || {
                for i in 0..250 {
                    w.record(entry(t * 1000 + i, "person-A", Purpose::Treatment));
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    assert_eq!(w.flush().unwrap_or(0), 1000);
    let cp = w
        .log()
        .lock()
        .map(|mut l| l.checkpoint(None).ok().flatten())
        .ok()
        .flatten();
    assert_eq!(cp.map(|c| c.size), Some(1000));
    let r = verify_dir(
        d.path(),
        &CheckpointSigner::from_seed(seed()).verifying_key(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.ok() && r.covered == 1000, "{:?}", r.problems);
}

#[test]
fn the_writer_counts_what_is_queued_until_it_is_written() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = AuditLog::open(d.path(), LogOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let w = AuditWriter::spawn(log);
    {
        // While the log is held, nothing can be written: everything handed over stays queued.
        let held = w.log().lock().unwrap_or_else(|e| panic!("{e}"));
        w.record_batch(
            (0..5)
                .map(|i| entry(i, "person-A", Purpose::Treatment))
                .collect(),
        );
        w.record(entry(5, "person-B", Purpose::Treatment));
        assert_eq!(w.queued(), 6);
        assert_eq!(held.len(), 0);
    }
    assert_eq!(w.flush().unwrap_or(0), 6);
    assert_eq!(w.queued(), 0);
}

#[test]
fn key_file_is_private_and_exposed_keys_are_refused() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = d.path().join("keys/audit.key");
    let a = CheckpointSigner::load_or_create(&path).unwrap_or_else(|e| panic!("{e}"));
    let b = CheckpointSigner::load_or_create(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        a.public_hex(),
        b.public_hex(),
        "the same key is loaded again"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(CheckpointSigner::load_or_create(&path).is_err());
    }
    assert!(
        !format!("{a:?}").contains(&a.public_hex()),
        "debug output shows only the key id"
    );
}

#[test]
fn entries_render_as_fhir_audit_events() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut log = AuditLog::open(d.path(), LogOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    log.append(&[entry(
        1,
        "person-A",
        Purpose::Emergency { reason: "x".into() },
    )])
    .unwrap_or_else(|e| panic!("{e}"));
    let e = log.get(0).unwrap_or_else(|e| panic!("{e}"));
    let ae = kizuna_audit::event::to_audit_event(&e);
    assert_eq!(ae["resourceType"], "AuditEvent");
    assert_eq!(
        ae["agent"][0]["purposeOfUse"][0]["coding"][0]["code"],
        "ETREAT"
    );
    assert_eq!(ae["entity"][0]["what"]["reference"], "Condition/c1");
    assert_eq!(ae["outcome"], "0");
}
