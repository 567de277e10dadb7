//! A long log on a small memory: proofs and reads of entries whose leaves are no longer held, and the
//! on-disk person/actor index — kept up to date, caught up after a crash, rebuilt when it is not this
//! log's — always answering what a scan of the whole log answers.

use std::collections::BTreeSet;
use std::path::Path;

use kizuna_audit::merkle::{verify_consistency, verify_inclusion};
use kizuna_audit::{
    Actor, ActorKind, AuditError, AuditLog, AuditQuery, Entry, LogOptions, NewEntry, Outcome,
    Purpose, Target,
};

fn entry(i: u64) -> NewEntry {
    NewEntry {
        time: format!("2026-11-30T10:{:02}:{:02}Z", (i / 60) % 60, i % 60),
        actor: Actor {
            kind: ActorKind::Clinician,
            id: format!("doctor-{}", i % 7),
            institution: Some("1318814790".into()),
            issuer: None,
        },
        action: "read".into(),
        target: Target {
            resource_type: Some("Observation".into()),
            resource_id: Some(format!("o{i}")),
            // Every fifth entry is about no one (a token exchange, say).
            person: (i % 5 != 0).then(|| format!("person-{}", i % 13)),
            ..Target::default()
        },
        purpose: Purpose::Treatment,
        outcome: Outcome::allow("consent-category-2"),
        source: None,
        request: None,
    }
}

/// A proof, root or leaf the log must have.
fn found<T>(r: Result<Option<T>, AuditError>, what: &str) -> T {
    match r {
        Ok(Some(v)) => v,
        other => panic!("{what}: {:?}", other.err()),
    }
}

fn open(dir: &Path) -> AuditLog {
    AuditLog::open(dir, LogOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn append(log: &mut AuditLog, range: std::ops::Range<u64>) {
    let batch: Vec<NewEntry> = range.map(entry).collect();
    for part in batch.chunks(97) {
        log.append(part).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// What a scan of the whole log says each person's and each actor's entries are.
fn oracle(log: &AuditLog) -> Vec<(String, Vec<u64>)> {
    let all: Vec<Entry> = log.query(&AuditQuery::default()).unwrap_or_default();
    assert_eq!(all.len() as u64, log.len(), "the scan reads every entry");
    let mut keys = BTreeSet::new();
    for e in &all {
        keys.insert(format!("actor:{}", e.entry.actor.id));
        if let Some(p) = &e.entry.target.person {
            keys.insert(format!("person:{p}"));
        }
    }
    keys.into_iter()
        .map(|k| {
            let seqs = all
                .iter()
                .filter(|e| match k.split_once(':') {
                    Some(("actor", a)) => e.entry.actor.id == a,
                    Some((_, p)) => e.entry.target.person.as_deref() == Some(p),
                    None => false,
                })
                .map(|e| e.seq)
                .collect();
            (k, seqs)
        })
        .collect()
}

/// What the index answers for the same keys.
fn indexed(log: &AuditLog, keys: &[(String, Vec<u64>)]) -> Vec<(String, Vec<u64>)> {
    keys.iter()
        .map(|(k, _)| {
            let q = match k.split_once(':') {
                Some(("actor", a)) => AuditQuery {
                    actor: Some(a.into()),
                    ..AuditQuery::default()
                },
                Some((_, p)) => AuditQuery {
                    person: Some(p.into()),
                    ..AuditQuery::default()
                },
                None => AuditQuery::default(),
            };
            let seqs = log
                .query(&q)
                .unwrap_or_default()
                .iter()
                .map(|e| e.seq)
                .collect();
            (k.clone(), seqs)
        })
        .collect()
}

fn assert_index_answers_like_a_scan(log: &AuditLog) {
    let expected = oracle(log);
    assert!(expected.len() >= 7 + 13, "{}", expected.len());
    assert_eq!(indexed(log, &expected), expected);
}

#[test]
fn entries_and_proofs_of_completed_chunks_are_read_back_from_the_log() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut log = open(d.path());
    let n = 1_000u64;
    append(&mut log, 0..n);
    // Two hashes per 256 entries and the open chunk, not two per entry.
    assert!(log.hashes_held() < 2 * 256 + 16, "{}", log.hashes_held());
    let root = log.root();
    // Every chunk's edges and a spread in between (each proof re-hashes a chunk of the log).
    let edges = [0, 1, 254, 255, 256, 257, 511, 512, 767, 768, 769, 998, 999];
    for seq in (0..n).step_by(23).chain(edges) {
        let e = log.get(seq).unwrap_or_else(|e| panic!("{seq}: {e}"));
        assert_eq!(e.seq, seq);
        assert_eq!(e.entry.target.resource_id, Some(format!("o{seq}")));
        let leaf = found(log.leaf(seq), "leaf");
        let proof = found(log.inclusion_proof(seq, n), "inclusion proof");
        assert!(verify_inclusion(seq, n, &leaf, &proof, &root), "seq {seq}");
    }
    assert!(matches!(log.get(n), Err(AuditError::NoSuchEntry(_))));
    for (old, new) in [
        (1, n),
        (255, 256),
        (256, 700),
        (300, 513),
        (999, n),
        (513, 999),
    ] {
        let old_root = found(log.root_at(old), "old root");
        let new_root = found(log.root_at(new), "new root");
        let proof = found(log.consistency_proof(old, new), "consistency proof");
        assert!(
            verify_consistency(old, new, &old_root, &new_root, &proof),
            "{old}→{new}"
        );
    }
    // The same roots after a reopen, which rebuilds the tree from the file.
    drop(log);
    let log = open(d.path());
    assert_eq!(log.root(), root);
    assert_eq!(log.root_at(300).ok().flatten(), open_root_at(d.path(), 300));
}

fn open_root_at(dir: &Path, size: u64) -> Option<kizuna_audit::merkle::Hash> {
    // A tree that keeps every leaf, as the oracle for a chunked one.
    let text = std::fs::read_to_string(dir.join("entries.ndjson")).unwrap_or_default();
    let mut t = kizuna_audit::merkle::MerkleTree::new();
    for l in text.lines().take(size as usize) {
        t.push(kizuna_audit::merkle::leaf_hash(l.as_bytes()));
    }
    Some(t.root())
}

#[test]
fn the_index_answers_like_a_scan_before_and_after_a_reopen() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut log = open(d.path());
    append(&mut log, 0..600);
    assert_index_answers_like_a_scan(&log);
    drop(log);
    let mut log = open(d.path());
    append(&mut log, 600..700);
    assert_index_answers_like_a_scan(&log);
}

#[test]
fn an_index_behind_the_log_catches_up_on_open() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut log = open(d.path());
    append(&mut log, 0..300);
    drop(log);
    // The index as a crash would leave it: covering the first 300 entries of a log of 800.
    let saved = std::fs::read(d.path().join("index.redb")).unwrap_or_default();
    let mut log = open(d.path());
    append(&mut log, 300..800);
    drop(log);
    std::fs::write(d.path().join("index.redb"), saved).unwrap_or_else(|e| panic!("{e}"));
    let log = open(d.path());
    assert_eq!(log.len(), 800);
    assert_index_answers_like_a_scan(&log);
}

#[test]
fn a_missing_index_or_another_logs_index_is_rebuilt() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut log = open(d.path());
    append(&mut log, 0..400);
    drop(log);
    std::fs::remove_file(d.path().join("index.redb")).unwrap_or_else(|e| panic!("{e}"));
    let log = open(d.path());
    assert_index_answers_like_a_scan(&log);
    drop(log);

    // Another log, as long, with other people in it: its index must not answer for this one.
    let other = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut o = open(other.path());
    let shifted: Vec<NewEntry> = (0..400).map(|i| entry(i + 3)).collect();
    o.append(&shifted).unwrap_or_else(|e| panic!("{e}"));
    drop(o);
    std::fs::copy(other.path().join("index.redb"), d.path().join("index.redb"))
        .unwrap_or_else(|e| panic!("{e}"));
    let log = open(d.path());
    assert_index_answers_like_a_scan(&log);
    drop(log);

    // An index longer than the log (entries cut off behind its back).
    let text = std::fs::read_to_string(d.path().join("entries.ndjson")).unwrap_or_default();
    let kept: Vec<&str> = text.lines().take(250).collect();
    std::fs::write(d.path().join("entries.ndjson"), kept.join("\n") + "\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let log = open(d.path());
    assert_eq!(log.len(), 250);
    assert_index_answers_like_a_scan(&log);
}

#[test]
fn a_second_process_cannot_open_a_log_in_use() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let _log = open(d.path());
    match AuditLog::open(d.path(), LogOptions::default()) {
        Err(AuditError::InUse(_)) => {}
        other => panic!("expected InUse, got {other:?}"),
    }
}

fn signed(dir: &Path) -> AuditLog {
    AuditLog::open(
        dir,
        LogOptions {
            signer: Some(kizuna_audit::CheckpointSigner::from_seed([3u8; 32])),
            policy: kizuna_audit::CheckpointPolicy::default(),
            sync: false,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn edit_line(dir: &Path, n: usize, from: &str, to: &str) {
    let text = std::fs::read_to_string(dir.join("entries.ndjson")).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[n] = lines[n].replacen(from, to, 1);
    std::fs::write(dir.join("entries.ndjson"), lines.join("\n") + "\n")
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_restart_keeps_the_recorded_chunk_roots_so_an_edit_while_stopped_stays_evident() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut log = signed(d.path());
    append(&mut log, 0..700);
    let root = log.root();
    drop(log);
    // Unchanged: the same tree, proofs included.
    let log = signed(d.path());
    assert_eq!((log.len(), log.root()), (700, root));
    let proof = found(log.inclusion_proof(10, 700), "proof");
    assert!(verify_inclusion(
        10,
        700,
        &found(log.leaf(10), "leaf"),
        &proof,
        &root
    ));
    drop(log);

    // An entry of the first chunk edited while the server is stopped: the restarted log keeps the
    // recorded root, so its next checkpoint does not vouch for the edit and `verify` reports it.
    edit_line(d.path(), 10, "doctor-3", "doctor-9");
    let mut log = signed(d.path());
    assert_eq!(log.root(), root, "chunk 0 was not hashed again");
    append(&mut log, 700..701);
    let cp = log.checkpoint(Some("2026-11-30T12:00:00Z")).ok().flatten();
    assert_eq!(cp.map(|c| c.size), Some(701));
    drop(log);
    let key = kizuna_audit::CheckpointSigner::from_seed([3u8; 32]).verifying_key();
    let r = kizuna_audit::verify_dir(d.path(), &key).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.covered < 701,
        "the new checkpoint must not cover the edited log"
    );
    assert!(
        r.problems.iter().any(|p| p.contains("root mismatch")),
        "{:?}",
        r.problems
    );
}

#[test]
fn a_log_that_no_longer_ends_its_recorded_chunks_is_hashed_again() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut log = signed(d.path());
    append(&mut log, 0..600);
    drop(log);
    // An edit inside the last recorded chunk (entries 256..512) is seen at open: the tree is the
    // file's again, and the index is rebuilt to match it.
    edit_line(d.path(), 300, "doctor-6", "doctor-1");
    let log = signed(d.path());
    assert_eq!(log.len(), 600);
    assert_eq!(Some(log.root()), open_root_at(d.path(), 600));
    assert_index_answers_like_a_scan(&log);
}
