//! RFC 6962 / RFC 9162 Merkle tree hashing with inclusion and consistency proofs.
//!
//! Leaves are `SHA-256(0x00 || entry)`, interior nodes `SHA-256(0x01 || left || right)`, so a signed root
//! commits to every entry and its position: changing, removing, inserting or reordering any entry
//! changes the root. Perfect subtrees are kept as they complete, so appending is O(1) amortised and any
//! proof needs O(log n) subtree hashes.

use sha2::{Digest, Sha256};

/// A 32-byte SHA-256 hash.
pub type Hash = [u8; 32];

/// The hash of an empty tree (`SHA-256("")`).
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The leaf hash of an entry's bytes.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// The hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly less than `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    let mut k = 1u64;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// A Merkle tree over appended leaf hashes.
#[derive(Debug, Default, Clone)]
pub struct MerkleTree {
    /// `levels[l][i]` is the root of the perfect subtree of leaves `[i·2^l, (i+1)·2^l)`.
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// An empty tree.
    pub fn new() -> MerkleTree {
        MerkleTree {
            levels: vec![Vec::new()],
        }
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.levels.first().map(|l| l.len() as u64).unwrap_or(0)
    }

    /// True when there are no leaves.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut l = 0;
        while self.levels[l].len() % 2 == 0 {
            let n = self.levels[l].len();
            let parent = node_hash(&self.levels[l][n - 2], &self.levels[l][n - 1]);
            if self.levels.len() <= l + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[l + 1].push(parent);
            l += 1;
        }
    }

    /// The leaf hash at `index`.
    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.levels
            .first()
            .and_then(|l| l.get(index as usize))
            .copied()
    }

    /// MTH of leaves `[lo, hi)`; ranges come from the RFC's recursion, so perfect ones are aligned.
    fn subtree(&self, lo: u64, hi: u64) -> Hash {
        let n = hi - lo;
        if n == 0 {
            return empty_root();
        }
        if n.is_power_of_two() && lo % n == 0 {
            let level = n.trailing_zeros() as usize;
            if let Some(h) = self
                .levels
                .get(level)
                .and_then(|l| l.get((lo / n) as usize))
            {
                return *h;
            }
        }
        let k = split(n);
        node_hash(&self.subtree(lo, lo + k), &self.subtree(lo + k, hi))
    }

    /// The root of the first `size` leaves (the tree as it was at that size).
    pub fn root_at(&self, size: u64) -> Option<Hash> {
        if size > self.len() {
            return None;
        }
        Some(self.subtree(0, size))
    }

    /// The current root.
    pub fn root(&self) -> Hash {
        self.subtree(0, self.len())
    }

    /// Audit path proving leaf `index` is in the tree of `size` leaves (RFC 9162 §2.1.3.1).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Option<Vec<Hash>> {
        if index >= size || size > self.len() {
            return None;
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof);
        Some(proof)
    }

    fn path(&self, m: u64, lo: u64, hi: u64, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            self.path(m, lo, lo + k, out);
            out.push(self.subtree(lo + k, hi));
        } else {
            self.path(m - k, lo + k, hi, out);
            out.push(self.subtree(lo, lo + k));
        }
    }

    /// Proof that the tree of `old` leaves is a prefix of the tree of `new` leaves (RFC 9162 §2.1.4.1).
    pub fn consistency_proof(&self, old: u64, new: u64) -> Option<Vec<Hash>> {
        if old > new || new > self.len() {
            return None;
        }
        let mut proof = Vec::new();
        if old == 0 || old == new {
            return Some(proof);
        }
        self.subproof(old, 0, new, true, &mut proof);
        Some(proof)
    }

    fn subproof(&self, m: u64, lo: u64, hi: u64, whole: bool, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if m == n {
            if !whole {
                out.push(self.subtree(lo, hi));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, lo, lo + k, whole, out);
            out.push(self.subtree(lo + k, hi));
        } else {
            self.subproof(m - k, lo + k, hi, false, out);
            out.push(self.subtree(lo, lo + k));
        }
    }
}

/// Verifies an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// Verifies a consistency proof between two roots (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old > new {
        return false;
    }
    if old == new {
        return proof.is_empty() && old_root == new_root;
    }
    if old == 0 {
        return proof.is_empty();
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some(first) = path.first().copied() else {
        return false;
    };
    let (mut f, mut s) = (old - 1, new - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (first, first);
    for c in &path[1..] {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *old_root && sr == *new_root && s == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook recursive MTH, as an oracle for the incremental tree.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    fn tree(n: u64) -> (MerkleTree, Vec<Hash>) {
        let mut t = MerkleTree::new();
        let mut leaves = Vec::new();
        for i in 0..n {
            let l = leaf_hash(format!("entry {i}").as_bytes());
            t.push(l);
            leaves.push(l);
        }
        (t, leaves)
    }

    #[test]
    fn roots_match_the_recursive_definition() {
        for n in 0..70u64 {
            let (t, leaves) = tree(n);
            assert_eq!(t.root(), mth(&leaves), "n={n}");
            for m in 0..=n {
                assert_eq!(
                    t.root_at(m),
                    Some(mth(&leaves[..m as usize])),
                    "n={n} m={m}"
                );
            }
        }
    }

    #[test]
    fn every_inclusion_and_consistency_proof_verifies() {
        let (t, leaves) = tree(37);
        for size in 1..=37u64 {
            let root = mth(&leaves[..size as usize]);
            for i in 0..size {
                let p = t.inclusion_proof(i, size).unwrap_or_default();
                assert!(
                    verify_inclusion(i, size, &leaves[i as usize], &p, &root),
                    "i={i} size={size}"
                );
                // A wrong leaf or a wrong index must not verify.
                let other = leaf_hash(b"forged");
                assert!(!verify_inclusion(i, size, &other, &p, &root));
                if size > 1 {
                    assert!(
                        !verify_inclusion((i + 1) % size, size, &leaves[i as usize], &p, &root)
                            || leaves[((i + 1) % size) as usize] == leaves[i as usize]
                    );
                }
            }
            for old in 0..=size {
                let p = t.consistency_proof(old, size).unwrap_or_default();
                let old_root = mth(&leaves[..old as usize]);
                assert!(
                    verify_consistency(old, size, &old_root, &root, &p),
                    "old={old} new={size}"
                );
                if old > 0 && old < size {
                    assert!(!verify_consistency(old, size, &leaf_hash(b"x"), &root, &p));
                }
            }
        }
    }
}
