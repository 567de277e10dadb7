//! Independent verification of a log directory against the checkpoint signer's public key.
//!
//! Recomputes every leaf and the root at every checkpoint: a modified, removed, inserted or reordered
//! entry changes a root (and usually breaks the gap-free sequence numbers); a forged or altered
//! checkpoint fails its signature.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use crate::checkpoint::{key_id, Checkpoint};
use crate::log::{CHECKPOINTS_FILE, ENTRIES_FILE};
use crate::merkle::{leaf_hash, MerkleTree};
use crate::AuditError;

/// What the verifier found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Entries read.
    pub entries: u64,
    /// Checkpoints read.
    pub checkpoints: u64,
    /// Entries covered by the newest valid checkpoint.
    pub covered: u64,
    /// Problems, each naming the line or checkpoint.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Entries written after the newest checkpoint (their integrity is not yet signed).
    pub fn uncovered(&self) -> u64 {
        self.entries - self.covered
    }
}

/// Verifies a log directory, in one pass over the entries and memory that does not grow with the log:
/// the root at each checkpoint's size is taken as the pass reaches it.
pub fn verify_dir(dir: &Path, key: &VerifyingKey) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport::default();
    let cp_path = dir.join(CHECKPOINTS_FILE);
    let text = if cp_path.exists() {
        std::fs::read_to_string(&cp_path)?
    } else {
        String::new()
    };
    let wanted: HashSet<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Checkpoint>(l).ok())
        .map(|cp| cp.size)
        .collect();
    let mut roots: HashMap<u64, crate::merkle::Hash> = HashMap::new();
    let mut tree = MerkleTree::with_chunk_bits(crate::log::CHUNK_BITS);
    if wanted.contains(&0) {
        roots.insert(0, tree.root());
    }
    let f = std::fs::File::open(dir.join(ENTRIES_FILE))?;
    let reader = BufReader::new(f);
    let mut seq_problem_reported = false;
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        let expected = i as u64;
        match serde_json::from_slice::<serde_json::Value>(&line) {
            Ok(v) => {
                let seq = v.get("seq").and_then(serde_json::Value::as_u64);
                if seq != Some(expected) && !seq_problem_reported {
                    report.problems.push(format!(
                        "行 {} の連番が {:?} (期待値 {expected}): 削除・挿入・並べ替え / line {}: sequence {:?}, expected {expected} — an entry was removed, inserted or reordered",
                        i + 1,
                        seq,
                        i + 1,
                        seq
                    ));
                    seq_problem_reported = true;
                }
            }
            Err(_) => report.problems.push(format!(
                "行 {} は JSON ではありません / line {} is not JSON",
                i + 1,
                i + 1
            )),
        }
        tree.push(leaf_hash(&line));
        report.entries += 1;
        if wanted.contains(&tree.len()) {
            roots.insert(tree.len(), tree.root());
        }
    }
    let kid = key_id(key);
    let mut last_size = 0u64;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        report.checkpoints += 1;
        let n = i + 1;
        let Ok(cp) = serde_json::from_str::<Checkpoint>(line) else {
            report.problems.push(format!(
                "チェックポイント {n} が読めません / checkpoint {n} is malformed"
            ));
            continue;
        };
        if cp.key_id != kid || !cp.verify(key) {
            report.problems.push(format!(
                "チェックポイント {n} の署名が不正です (偽造または改ざん) / checkpoint {n} (size {}) has an invalid signature: forged or altered",
                cp.size
            ));
            continue;
        }
        if cp.size < last_size {
            report.problems.push(format!("チェックポイント {n} のサイズが減っています / checkpoint {n} shrinks the log ({} < {last_size})", cp.size));
        }
        last_size = last_size.max(cp.size);
        match roots.get(&cp.size).copied() {
            None => report.problems.push(format!(
                "チェックポイント {n} は {} 件を署名していますが {} 件しかありません: 削除 / checkpoint {n} signs {} entries but only {} exist — entries were removed",
                cp.size, report.entries, cp.size, report.entries
            )),
            Some(root) => {
                if Some(root) != cp.root_hash() {
                    report.problems.push(format!(
                        "チェックポイント {n} (先頭 {} 件) の根ハッシュが一致しません: 改ざん・削除・挿入・並べ替え / checkpoint {n} root mismatch over the first {} entries — an entry was modified, removed, inserted or reordered",
                        cp.size, cp.size
                    ));
                } else {
                    report.covered = report.covered.max(cp.size);
                }
            }
        }
    }
    Ok(report)
}
