//! RFC 6962 / RFC 9162 Merkle tree hashing with inclusion and consistency proofs.
//!
//! Leaves are `SHA-256(0x00 || entry)`, interior nodes `SHA-256(0x01 || left || right)`, so a signed root
//! commits to every entry and its position: changing, removing, inserting or reordering any entry
//! changes the root. Perfect subtrees are kept as they complete, so appending is O(1) amortised and any
//! proof needs O(log n) subtree hashes.
//!
//! A log lives for years and grows by one leaf per access, so the tree need not keep every leaf: with
//! `chunk_bits = K` it keeps the roots of completed `2^K`-leaf chunks and everything above them (about
//! `2n / 2^K` hashes), plus the levels of the chunk being filled. The few hashes below a completed
//! chunk's root that a proof needs are recomputed from that chunk's leaves, which the caller reads
//! back from the log through a [`LeafSource`].

use std::io;

use sha2::{Digest, Sha256};

/// A 32-byte SHA-256 hash.
pub type Hash = [u8; 32];

/// Leaf levels a tree made by [`MerkleTree::new`] keeps: all of them (its chunks never complete).
pub const KEEP_ALL: u32 = 63;

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

/// The root of a power-of-two run of leaves.
pub(crate) fn perfect_root(leaves: &[Hash]) -> Hash {
    let mut level: Vec<Hash> = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| match p {
                [l, r] => node_hash(l, r),
                [one] => *one,
                _ => empty_root(),
            })
            .collect();
    }
    level.first().copied().unwrap_or_else(empty_root)
}

/// Where a tree that keeps only chunk roots reads back the leaves of a completed chunk.
pub trait LeafSource {
    /// The leaf hashes of chunk `chunk` (leaves `[chunk·2^K, (chunk+1)·2^K)`), in order.
    fn chunk_leaves(&self, chunk: u64) -> io::Result<Vec<Hash>>;
}

/// The source for a tree that keeps every leaf: it is never asked.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLeaves;

impl LeafSource for NoLeaves {
    fn chunk_leaves(&self, chunk: u64) -> io::Result<Vec<Hash>> {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("leaves of chunk {chunk} are not kept"),
        ))
    }
}

/// Chunks read during one proof: a proof touches at most three, each read once.
struct Chunks<'a> {
    source: &'a dyn LeafSource,
    size: usize,
    loaded: Vec<(u64, Vec<Hash>)>,
}

impl Chunks<'_> {
    fn leaves(&mut self, chunk: u64) -> io::Result<&[Hash]> {
        let at = match self.loaded.iter().position(|(c, _)| *c == chunk) {
            Some(at) => at,
            None => {
                let leaves = self.source.chunk_leaves(chunk)?;
                if leaves.len() != self.size {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "chunk {chunk} has {} leaves, expected {}",
                            leaves.len(),
                            self.size
                        ),
                    ));
                }
                self.loaded.push((chunk, leaves));
                self.loaded.len() - 1
            }
        };
        Ok(&self.loaded[at].1)
    }
}

/// A Merkle tree over appended leaf hashes.
#[derive(Debug, Clone)]
pub struct MerkleTree {
    /// Leaves per chunk, as a power of two.
    chunk_bits: u32,
    /// `low[l][i]`: root of the `i`-th perfect subtree of `2^l` leaves inside the chunk being filled.
    low: Vec<Vec<Hash>>,
    /// `high[j][i]`: root of leaves `[i·2^(K+j), (i+1)·2^(K+j))`, for completed subtrees only.
    high: Vec<Vec<Hash>>,
    len: u64,
}

impl Default for MerkleTree {
    fn default() -> Self {
        MerkleTree::new()
    }
}

impl MerkleTree {
    /// A tree that keeps every leaf (proofs never read the log).
    pub fn new() -> MerkleTree {
        MerkleTree::with_chunk_bits(KEEP_ALL)
    }

    /// A tree that keeps only the roots of completed `2^chunk_bits`-leaf chunks and above (`chunk_bits`
    /// is clamped to 1..=63).
    pub fn with_chunk_bits(chunk_bits: u32) -> MerkleTree {
        MerkleTree {
            chunk_bits: chunk_bits.clamp(1, KEEP_ALL),
            low: vec![Vec::new()],
            high: Vec::new(),
            len: 0,
        }
    }

    /// A tree resumed from the roots of its first completed chunks (what a log persisted), so a
    /// restart need not hash those chunks' leaves again.
    pub fn from_chunk_roots(chunk_bits: u32, roots: &[Hash]) -> MerkleTree {
        let mut t = MerkleTree::with_chunk_bits(chunk_bits);
        if t.chunk_bits >= KEEP_ALL {
            return t;
        }
        for r in roots {
            t.push_high(*r);
            t.len += 1u64 << t.chunk_bits;
        }
        t
    }

    /// Roots of the completed chunks, in order.
    pub fn chunk_roots(&self) -> &[Hash] {
        self.high.first().map(Vec::as_slice).unwrap_or(&[])
    }

    /// Leaves per chunk as a power of two.
    pub fn chunk_bits(&self) -> u32 {
        self.chunk_bits
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when there are no leaves.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hashes held in memory: what the tree costs, for tests and capacity planning.
    pub fn hashes_held(&self) -> usize {
        self.low.iter().chain(&self.high).map(Vec::len).sum()
    }

    /// The chunk being filled (its leaves are held).
    fn open_chunk(&self) -> u64 {
        self.len >> self.chunk_bits
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let k = self.chunk_bits as usize;
        if self.low.is_empty() {
            self.low.push(Vec::new());
        }
        self.low[0].push(leaf);
        self.len += 1;
        let mut l = 0;
        while self.low[l].len() % 2 == 0 {
            let n = self.low[l].len();
            let parent = node_hash(&self.low[l][n - 2], &self.low[l][n - 1]);
            if l + 1 == k {
                // The chunk is complete: keep its root, drop what is below it.
                self.low.iter_mut().for_each(Vec::clear);
                self.push_high(parent);
                return;
            }
            if self.low.len() <= l + 1 {
                self.low.push(Vec::new());
            }
            self.low[l + 1].push(parent);
            l += 1;
        }
    }

    fn push_high(&mut self, root: Hash) {
        if self.high.is_empty() {
            self.high.push(Vec::new());
        }
        self.high[0].push(root);
        let mut j = 0;
        while self.high[j].len() % 2 == 0 {
            let n = self.high[j].len();
            let parent = node_hash(&self.high[j][n - 2], &self.high[j][n - 1]);
            if self.high.len() <= j + 1 {
                self.high.push(Vec::new());
            }
            self.high[j + 1].push(parent);
            j += 1;
        }
    }

    /// Root of the perfect subtree of `2^level` leaves numbered `index` (wholly inside the tree).
    fn perfect(&self, level: u32, index: u64, chunks: &mut Chunks<'_>) -> io::Result<Hash> {
        let k = self.chunk_bits;
        let missing = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no subtree {index} at level {level}"),
            )
        };
        if level >= k {
            return self
                .high
                .get((level - k) as usize)
                .and_then(|l| l.get(index as usize))
                .copied()
                .ok_or_else(missing);
        }
        let lo = index << level;
        let chunk = lo >> k;
        let within = lo - (chunk << k);
        if chunk == self.open_chunk() {
            return self
                .low
                .get(level as usize)
                .and_then(|l| l.get((within >> level) as usize))
                .copied()
                .ok_or_else(missing);
        }
        let leaves = chunks.leaves(chunk)?;
        let run = leaves
            .get(within as usize..(within + (1 << level)) as usize)
            .ok_or_else(missing)?;
        Ok(perfect_root(run))
    }

    /// MTH of leaves `[lo, hi)`; ranges come from the RFC's recursion, so perfect ones are aligned.
    fn subtree(&self, lo: u64, hi: u64, chunks: &mut Chunks<'_>) -> io::Result<Hash> {
        let n = hi - lo;
        if n == 0 {
            return Ok(empty_root());
        }
        if n.is_power_of_two() && lo % n == 0 {
            return self.perfect(n.trailing_zeros(), lo / n, chunks);
        }
        let k = split(n);
        Ok(node_hash(
            &self.subtree(lo, lo + k, chunks)?,
            &self.subtree(lo + k, hi, chunks)?,
        ))
    }

    fn chunks<'a>(&self, source: &'a dyn LeafSource) -> Chunks<'a> {
        Chunks {
            source,
            size: 1usize << self.chunk_bits.min(usize::BITS - 1),
            loaded: Vec::new(),
        }
    }

    /// The current root: the perfect subtrees of the size's binary digits, folded from the right. It
    /// never needs the log (the small ones all lie in the chunk being filled).
    pub fn root(&self) -> Hash {
        let k = self.chunk_bits;
        let mut acc: Option<Hash> = None;
        for b in 0..64u32 {
            if self.len & (1u64 << b) == 0 {
                continue;
            }
            let index = (self.len >> b) - 1;
            let peak = if b >= k {
                self.high[(b - k) as usize][index as usize]
            } else {
                let within = (index << b) - (self.open_chunk() << k);
                self.low[b as usize][(within >> b) as usize]
            };
            acc = Some(match acc {
                None => peak,
                Some(right) => node_hash(&peak, &right),
            });
        }
        acc.unwrap_or_else(empty_root)
    }

    /// The leaf hash at `index`.
    pub fn leaf(&self, index: u64, source: &dyn LeafSource) -> io::Result<Option<Hash>> {
        if index >= self.len {
            return Ok(None);
        }
        self.perfect(0, index, &mut self.chunks(source)).map(Some)
    }

    /// The root of the first `size` leaves (the tree as it was at that size).
    pub fn root_at(&self, size: u64, source: &dyn LeafSource) -> io::Result<Option<Hash>> {
        if size > self.len {
            return Ok(None);
        }
        self.subtree(0, size, &mut self.chunks(source)).map(Some)
    }

    /// Audit path proving leaf `index` is in the tree of `size` leaves (RFC 9162 §2.1.3.1).
    pub fn inclusion_proof(
        &self,
        index: u64,
        size: u64,
        source: &dyn LeafSource,
    ) -> io::Result<Option<Vec<Hash>>> {
        if index >= size || size > self.len {
            return Ok(None);
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut self.chunks(source), &mut proof)?;
        Ok(Some(proof))
    }

    fn path(
        &self,
        m: u64,
        lo: u64,
        hi: u64,
        chunks: &mut Chunks<'_>,
        out: &mut Vec<Hash>,
    ) -> io::Result<()> {
        let n = hi - lo;
        if n <= 1 {
            return Ok(());
        }
        let k = split(n);
        if m < k {
            self.path(m, lo, lo + k, chunks, out)?;
            out.push(self.subtree(lo + k, hi, chunks)?);
        } else {
            self.path(m - k, lo + k, hi, chunks, out)?;
            out.push(self.subtree(lo, lo + k, chunks)?);
        }
        Ok(())
    }

    /// Proof that the tree of `old` leaves is a prefix of the tree of `new` leaves (RFC 9162 §2.1.4.1).
    pub fn consistency_proof(
        &self,
        old: u64,
        new: u64,
        source: &dyn LeafSource,
    ) -> io::Result<Option<Vec<Hash>>> {
        if old > new || new > self.len {
            return Ok(None);
        }
        let mut proof = Vec::new();
        if old == 0 || old == new {
            return Ok(Some(proof));
        }
        self.subproof(old, 0, new, true, &mut self.chunks(source), &mut proof)?;
        Ok(Some(proof))
    }

    fn subproof(
        &self,
        m: u64,
        lo: u64,
        hi: u64,
        whole: bool,
        chunks: &mut Chunks<'_>,
        out: &mut Vec<Hash>,
    ) -> io::Result<()> {
        let n = hi - lo;
        if m == n {
            if !whole {
                out.push(self.subtree(lo, hi, chunks)?);
            }
            return Ok(());
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, lo, lo + k, whole, chunks, out)?;
            out.push(self.subtree(lo + k, hi, chunks)?);
        } else {
            self.subproof(m - k, lo + k, hi, false, chunks, out)?;
            out.push(self.subtree(lo, lo + k, chunks)?);
        }
        Ok(())
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
    use std::cell::Cell;

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

    /// The log as a chunked tree sees it: all leaves, handed out a chunk at a time, reads counted.
    struct Log {
        leaves: Vec<Hash>,
        bits: u32,
        reads: Cell<usize>,
    }

    impl LeafSource for Log {
        fn chunk_leaves(&self, chunk: u64) -> io::Result<Vec<Hash>> {
            self.reads.set(self.reads.get() + 1);
            let size = 1usize << self.bits;
            let lo = chunk as usize * size;
            let hi = (lo + size).min(self.leaves.len());
            Ok(self.leaves.get(lo..hi).unwrap_or_default().to_vec())
        }
    }

    fn tree(n: u64, bits: u32) -> (MerkleTree, Log) {
        let mut t = MerkleTree::with_chunk_bits(bits);
        let mut leaves = Vec::new();
        for i in 0..n {
            let l = leaf_hash(format!("entry {i}").as_bytes());
            t.push(l);
            leaves.push(l);
        }
        let log = Log {
            leaves,
            bits,
            reads: Cell::new(0),
        };
        (t, log)
    }

    const CHUNKINGS: [u32; 5] = [1, 2, 3, 5, KEEP_ALL];

    #[test]
    fn roots_and_leaves_match_the_recursive_definition_whatever_the_chunking() {
        for bits in CHUNKINGS {
            for n in 0..70u64 {
                let (t, log) = tree(n, bits);
                let leaves = &log.leaves;
                assert_eq!(t.root(), mth(leaves), "bits={bits} n={n}");
                for m in 0..=n {
                    assert_eq!(
                        t.root_at(m, &log).ok().flatten(),
                        Some(mth(&leaves[..m as usize])),
                        "bits={bits} n={n} m={m}"
                    );
                }
                for i in 0..n {
                    assert_eq!(t.leaf(i, &log).ok().flatten(), Some(leaves[i as usize]));
                }
                assert_eq!(t.leaf(n, &log).ok().flatten(), None);
                assert_eq!(t.root_at(n + 1, &log).ok().flatten(), None);
            }
        }
    }

    #[test]
    fn every_inclusion_and_consistency_proof_verifies_whatever_the_chunking() {
        let (full, _) = tree(37, KEEP_ALL);
        for bits in CHUNKINGS {
            let (t, log) = tree(37, bits);
            let leaves = &log.leaves;
            for size in 1..=37u64 {
                let root = mth(&leaves[..size as usize]);
                for i in 0..size {
                    let p = t
                        .inclusion_proof(i, size, &log)
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    // The same proof as the tree that keeps every leaf.
                    assert_eq!(
                        Some(&p),
                        full.inclusion_proof(i, size, &NoLeaves)
                            .ok()
                            .flatten()
                            .as_ref()
                    );
                    assert!(
                        verify_inclusion(i, size, &leaves[i as usize], &p, &root),
                        "bits={bits} i={i} size={size}"
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
                    let p = t
                        .consistency_proof(old, size, &log)
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    let old_root = mth(&leaves[..old as usize]);
                    assert!(
                        verify_consistency(old, size, &old_root, &root, &p),
                        "bits={bits} old={old} new={size}"
                    );
                    if old > 0 && old < size {
                        assert!(!verify_consistency(old, size, &leaf_hash(b"x"), &root, &p));
                    }
                }
            }
        }
    }

    #[test]
    fn a_chunked_tree_holds_a_few_hashes_per_chunk_and_reads_few_chunks_per_proof() {
        let n = 100_000u64;
        let (full, _) = tree(n, KEEP_ALL);
        let (t, log) = tree(n, 8);
        // Every leaf and every complete interior node: 2n less one per binary digit of n.
        assert_eq!(full.hashes_held() as u64, 2 * n - u64::from(n.count_ones()));
        // Two hashes per completed chunk of 256 leaves, plus the open chunk's leaves and levels.
        assert!(
            t.hashes_held() as u64 <= 2 * (n / 256) + 2 * 256,
            "{}",
            t.hashes_held()
        );
        assert_eq!(t.root(), full.root());
        for (i, size) in [(0, n), (12_345, 99_999), (n - 1, n), (70_000, 70_001)] {
            log.reads.set(0);
            let p = t.inclusion_proof(i, size, &log).ok().flatten();
            assert_eq!(p, full.inclusion_proof(i, size, &NoLeaves).ok().flatten());
            assert!(
                log.reads.get() <= 2,
                "i={i} size={size}: {}",
                log.reads.get()
            );
        }
        log.reads.set(0);
        let p = t.consistency_proof(40_001, 99_999, &log).ok().flatten();
        assert_eq!(
            p,
            full.consistency_proof(40_001, 99_999, &NoLeaves)
                .ok()
                .flatten()
        );
        assert!(log.reads.get() <= 3, "{}", log.reads.get());
    }

    #[test]
    fn a_tree_resumed_from_chunk_roots_is_the_same_tree() {
        for n in [0u64, 8, 9, 23, 64, 70] {
            let (whole, log) = tree(n, 3);
            let roots = whole.chunk_roots().to_vec();
            assert_eq!(roots.len() as u64, n / 8);
            let mut resumed = MerkleTree::from_chunk_roots(3, &roots);
            for l in &log.leaves[(n / 8 * 8) as usize..] {
                resumed.push(*l);
            }
            assert_eq!(resumed.len(), n);
            assert_eq!(resumed.root(), mth(&log.leaves), "n={n}");
            for m in 0..=n {
                assert_eq!(
                    resumed.root_at(m, &log).ok().flatten(),
                    Some(mth(&log.leaves[..m as usize]))
                );
            }
        }
    }

    #[test]
    fn a_short_chunk_from_the_log_is_an_error_not_a_wrong_proof() {
        let (t, mut log) = tree(20, 2);
        log.leaves.truncate(5);
        assert!(t.inclusion_proof(9, 20, &log).is_err());
        assert!(t.inclusion_proof(9, 20, &NoLeaves).is_err());
    }
}
