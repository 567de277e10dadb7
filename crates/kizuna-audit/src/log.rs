//! The append-only audit log: one JSON line per entry, a Merkle tree over the lines, signed checkpoints.
//!
//! Appends are batched (one write and one `fsync` per batch), which is what lets every access be
//! audited — one entry per resource a search returns — without slowing the service down.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::checkpoint::{Checkpoint, CheckpointSigner};
use crate::entry::{Actor, ActorKind, Entry, NewEntry, Outcome, Purpose, Target};
use crate::index::{ChunkRow, Coverage, EntryIndex, IndexRow};
use crate::merkle::{leaf_hash, perfect_root, Hash, LeafSource, MerkleTree};
use crate::AuditError;

/// File holding the entries, one JSON object per line.
pub const ENTRIES_FILE: &str = "entries.ndjson";
/// File holding the signed checkpoints, one per line.
pub const CHECKPOINTS_FILE: &str = "checkpoints.ndjson";

/// When to sign a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// After this many new entries.
    pub every_entries: u64,
    /// Or after this much time with new entries.
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every_entries: 10_000,
            every: Duration::from_secs(10),
        }
    }
}

/// How a log is opened.
#[derive(Debug, Default)]
pub struct LogOptions {
    /// Signs checkpoints; without one, no checkpoints are written (development only).
    pub signer: Option<CheckpointSigner>,
    /// When to checkpoint.
    pub policy: CheckpointPolicy,
    /// `fsync` after every batch (on by default in [`AuditLog::open_durable`]).
    pub sync: bool,
}

/// Filter for searching the log (the operator's view).
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Entries about this person's data.
    pub person: Option<String>,
    /// Entries by this actor id.
    pub actor: Option<String>,
    /// Entries about this resource type.
    pub resource_type: Option<String>,
    /// And id.
    pub resource_id: Option<String>,
    /// From this time (RFC 3339, inclusive).
    pub from: Option<String>,
    /// Until this time (RFC 3339, exclusive).
    pub to: Option<String>,
    /// At most this many (newest last).
    pub limit: Option<usize>,
}

/// One line of a patient's access history: who, when, why — never more than the patient may know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessRecord {
    /// Position in the log (for a proof of inclusion).
    pub seq: u64,
    /// When.
    pub time: String,
    /// Kind of accessor.
    pub actor_kind: ActorKind,
    /// Accessor id.
    pub actor: String,
    /// The accessor's institution.
    pub institution: Option<String>,
    /// What was done.
    pub action: String,
    /// The resource type touched.
    pub resource_type: Option<String>,
    /// Purpose code (`treatment`, `emergency` …).
    pub purpose: String,
    /// True for emergency access without consent (shown prominently in the portal).
    pub emergency: bool,
    /// The declared reason of an emergency access.
    pub emergency_reason: Option<String>,
    /// Whether access was granted.
    pub allowed: bool,
}

/// Who asks for an access history.
#[derive(Debug, Clone)]
pub enum HistoryRequester {
    /// A patient, bound to one person.
    Patient {
        /// The patient's actor record.
        actor: Actor,
        /// The person the patient is.
        person: String,
    },
    /// The operator, who may search everything.
    Operator {
        /// The operator's actor record.
        actor: Actor,
    },
    /// Anyone else (always refused).
    Other {
        /// Their actor record.
        actor: Actor,
    },
}

/// Leaves per chunk of the in-memory tree, as a power of two: the tree keeps two hashes per 256 entries,
/// and a proof reads back at most a few chunks of 256 lines.
pub const CHUNK_BITS: u32 = 8;

/// Entries parsed per index commit while catching up at open.
const CATCH_UP_BATCH: usize = 10_000;

/// The log, open for appending and reading. What it holds in memory does not grow with the log
/// beyond a few bytes per 256 entries: the upper Merkle levels and where each chunk of 256 lines
/// starts. The lists of a person's or an actor's entries live in an on-disk index.
pub struct AuditLog {
    dir: PathBuf,
    entries: File,
    checkpoints: File,
    tree: MerkleTree,
    /// Byte offset of the first line of each chunk (the open one included).
    chunk_starts: Vec<u64>,
    end: u64,
    index: EntryIndex,
    /// Set when an index write failed: queries scan the log until the next open re-indexes.
    index_behind: bool,
    options: LogOptions,
    last_checkpoint: Option<Checkpoint>,
    since_checkpoint: Instant,
    buf: Vec<u8>,
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.sync_index();
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.dir)
            .field("len", &self.len())
            .finish()
    }
}

/// The fields the index needs, parsed without the rest of an entry.
#[derive(serde::Deserialize)]
struct IndexedFields {
    actor: IndexedActor,
    #[serde(default)]
    target: IndexedTarget,
}

#[derive(serde::Deserialize)]
struct IndexedActor {
    id: String,
}

#[derive(serde::Deserialize, Default)]
struct IndexedTarget {
    #[serde(default)]
    person: Option<String>,
}

fn index_row(seq: u64, offset: u64, body: &[u8]) -> Option<IndexRow> {
    let f: IndexedFields = serde_json::from_slice(body).ok()?;
    Some(IndexRow {
        seq,
        offset,
        person: f.target.person,
        actor: f.actor.id,
    })
}

/// Reads the lines of a chunk back from the entries file, for proofs below a chunk's root.
struct LogLeaves<'a> {
    path: PathBuf,
    chunk_starts: &'a [u64],
    end: u64,
}

impl LogLeaves<'_> {
    fn lines(&self, chunk: u64) -> std::io::Result<Vec<u8>> {
        let missing = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such chunk");
        let start = *self.chunk_starts.get(chunk as usize).ok_or_else(missing)?;
        let stop = self
            .chunk_starts
            .get(chunk as usize + 1)
            .copied()
            .unwrap_or(self.end);
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(start))?;
        let mut buf = vec![0u8; stop.saturating_sub(start) as usize];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }
}

impl LeafSource for LogLeaves<'_> {
    fn chunk_leaves(&self, chunk: u64) -> std::io::Result<Vec<Hash>> {
        let buf = self.lines(chunk)?;
        Ok(buf
            .strip_suffix(b"\n")
            .unwrap_or(&buf)
            .split(|b| *b == b'\n')
            .map(leaf_hash)
            .collect())
    }
}

impl AuditLog {
    /// Opens (or creates) a log directory with `fsync` after every batch.
    pub fn open_durable(
        dir: &Path,
        signer: Option<CheckpointSigner>,
    ) -> Result<AuditLog, AuditError> {
        Self::open(
            dir,
            LogOptions {
                signer,
                policy: CheckpointPolicy::default(),
                sync: true,
            },
        )
    }

    /// Opens (or creates) a log directory: rebuilds the tree from its entries, brings the person and
    /// actor index up to date, and cuts off a torn last line (a crash mid-write, never acknowledged).
    /// Only one process may have a log open ([`AuditError::InUse`] otherwise).
    pub fn open(dir: &Path, options: LogOptions) -> Result<AuditLog, AuditError> {
        std::fs::create_dir_all(dir)?;
        let mut index = EntryIndex::open(dir)?;
        let path = dir.join(ENTRIES_FILE);
        let mut entries = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let mut coverage = index.coverage()?;
        // Resume from the persisted chunk roots when the log still ends them as recorded.
        let resumed = match resume(&path, &index, coverage)? {
            Resume::From(r) => Some(r),
            Resume::Fresh => None,
            Resume::Changed => {
                // Lines the index points at may have changed too: index the log anew as it is read.
                index.clear()?;
                coverage = Coverage {
                    entries: 0,
                    last_leaf: None,
                };
                None
            }
        };
        let (mut tree, mut chunk_starts, mut end, mut index_fits) = match &resumed {
            Some(r) => (
                MerkleTree::from_chunk_roots(CHUNK_BITS, &r.roots),
                r.starts.clone(),
                r.end,
                r.index_fits,
            ),
            // Whether the index describes this log: its last covered leaf must be this log's.
            None => (
                MerkleTree::with_chunk_bits(CHUNK_BITS),
                Vec::new(),
                0,
                coverage.entries == 0,
            ),
        };
        let persisted_chunks = resumed.as_ref().map(|r| r.roots.len() as u64).unwrap_or(0);
        let mut pending: Vec<IndexRow> = Vec::new();
        let mut indexed = 0u64;
        let mut last_leaf = resumed.as_ref().and_then(|r| r.last_leaf);
        {
            entries.seek(SeekFrom::Start(end))?;
            let mut reader = BufReader::with_capacity(1 << 20, &entries);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line)?;
                if n == 0 {
                    break;
                }
                if line.last() != Some(&b'\n') {
                    tracing::warn!(offset = end, "audit log: torn last line dropped");
                    break;
                }
                let body = &line[..line.len() - 1];
                let seq = tree.len();
                if seq % (1u64 << CHUNK_BITS) == 0 {
                    chunk_starts.push(end);
                }
                let leaf = leaf_hash(body);
                tree.push(leaf);
                last_leaf = Some(leaf);
                if seq + 1 == coverage.entries {
                    index_fits = coverage.last_leaf == Some(leaf);
                }
                if seq >= coverage.entries && index_fits {
                    pending.extend(index_row(seq, end, body));
                    if pending.len() >= CATCH_UP_BATCH {
                        let c = Coverage {
                            entries: seq + 1,
                            last_leaf: Some(leaf),
                        };
                        index.add(&pending, c)?;
                        indexed += pending.len() as u64;
                        pending.clear();
                    }
                }
                end += n as u64;
            }
        }
        let file_len = entries.metadata()?.len();
        if file_len != end {
            entries.set_len(end)?;
        }
        let covered_now = Coverage {
            entries: tree.len(),
            last_leaf,
        };
        if index_fits && coverage.entries <= tree.len() {
            if !pending.is_empty() || coverage != covered_now {
                indexed += pending.len() as u64;
                index.add(&pending, covered_now)?;
            }
        } else {
            // The index is of another log or of a longer one (entries were cut): build it anew.
            tracing::warn!(
                covered = coverage.entries,
                entries = tree.len(),
                "audit index does not match the log; rebuilding it"
            );
            index.clear()?;
            coverage = Coverage {
                entries: 0,
                last_leaf: None,
            };
            indexed = reindex(&path, end, &mut index, covered_now)?;
        }
        let complete = tree.len() >> CHUNK_BITS;
        let from = if index_fits { persisted_chunks } else { 0 };
        index.add_chunks(chunk_rows(&tree, &chunk_starts, end, from..complete));
        index.sync()?;
        if indexed > 0 {
            tracing::info!(
                indexed,
                from = coverage.entries,
                entries = tree.len(),
                "audit index brought up to date"
            );
        }
        let cp_path = dir.join(CHECKPOINTS_FILE);
        let mut last_checkpoint = None;
        if cp_path.exists() {
            let text = std::fs::read_to_string(&cp_path)?;
            last_checkpoint = text
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Checkpoint>(l).ok());
        }
        let checkpoints = OpenOptions::new().create(true).append(true).open(cp_path)?;
        Ok(AuditLog {
            dir: dir.to_path_buf(),
            entries,
            checkpoints,
            tree,
            chunk_starts,
            end,
            index,
            index_behind: false,
            options,
            last_checkpoint,
            since_checkpoint: Instant::now(),
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.tree.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Current Merkle root.
    pub fn root(&self) -> Hash {
        self.tree.root()
    }

    /// Merkle hashes held in memory (capacity planning: about two per 256 entries).
    pub fn hashes_held(&self) -> usize {
        self.tree.hashes_held()
    }

    /// The latest checkpoint written.
    pub fn latest_checkpoint(&self) -> Option<&Checkpoint> {
        self.last_checkpoint.as_ref()
    }

    fn leaves(&self) -> LogLeaves<'_> {
        LogLeaves {
            path: self.dir.join(ENTRIES_FILE),
            chunk_starts: &self.chunk_starts,
            end: self.end,
        }
    }

    /// Appends a batch: one write (and one `fsync` when durable); returns the first sequence number.
    pub fn append(&mut self, batch: &[NewEntry]) -> Result<u64, AuditError> {
        let first = self.len();
        self.buf.clear();
        let mut leaves = Vec::with_capacity(batch.len());
        for (i, e) in batch.iter().enumerate() {
            let seq = first + i as u64;
            let start = self.buf.len();
            serde_json::to_writer(&mut self.buf, &EntryRef { seq, entry: e })?;
            leaves.push((leaf_hash(&self.buf[start..]), self.buf.len() - start));
            self.buf.push(b'\n');
        }
        self.entries.write_all(&self.buf)?;
        if self.options.sync {
            self.entries.sync_data()?;
        }
        let mut rows = Vec::with_capacity(batch.len());
        let mut last_leaf = None;
        for (i, (leaf, len)) in leaves.into_iter().enumerate() {
            let seq = first + i as u64;
            let e = &batch[i];
            if seq % (1u64 << CHUNK_BITS) == 0 {
                self.chunk_starts.push(self.end);
            }
            self.tree.push(leaf);
            rows.push(IndexRow {
                seq,
                offset: self.end,
                person: e.target.person.clone(),
                actor: e.actor.id.clone(),
            });
            self.end += len as u64 + 1;
            last_leaf = Some(leaf);
        }
        if !self.index_behind {
            let covered = Coverage {
                entries: self.len(),
                last_leaf,
            };
            self.index.add_chunks(chunk_rows(
                &self.tree,
                &self.chunk_starts,
                self.end,
                first >> CHUNK_BITS..self.len() >> CHUNK_BITS,
            ));
            if let Err(e) = self.index.add(&rows, covered) {
                // The entries are written; queries scan the log until the next open re-indexes.
                tracing::error!(error = %e, "audit index write failed; queries scan the log");
                self.index_behind = true;
            }
        }
        let covered = self.last_checkpoint.as_ref().map(|c| c.size).unwrap_or(0);
        if self.len() - covered >= self.options.policy.every_entries {
            self.checkpoint(None)?;
        }
        Ok(first)
    }

    /// Signs and writes a checkpoint of the current state (if there are new entries and a signer).
    pub fn checkpoint(&mut self, time: Option<&str>) -> Result<Option<Checkpoint>, AuditError> {
        let Some(signer) = &self.options.signer else {
            return Ok(None);
        };
        if self.last_checkpoint.as_ref().map(|c| c.size) == Some(self.len()) {
            return Ok(None);
        }
        let now = time
            .map(str::to_string)
            .unwrap_or_else(|| chrono::Utc::now().to_rfc3339());
        let cp = signer.sign(self.len(), &self.root(), &now);
        let mut line = serde_json::to_vec(&cp)?;
        line.push(b'\n');
        self.checkpoints.write_all(&line)?;
        if self.options.sync {
            self.checkpoints.sync_data()?;
        }
        self.last_checkpoint = Some(cp.clone());
        self.since_checkpoint = Instant::now();
        Ok(Some(cp))
    }

    /// Writes the index rows held in memory, durably.
    fn sync_index(&mut self) {
        if !self.index_behind {
            if let Err(e) = self.index.sync() {
                tracing::error!(error = %e, "audit index sync failed; queries scan the log");
                self.index_behind = true;
            }
        }
    }

    /// Checkpoints when the time policy says so (called by the background writer when idle).
    pub fn checkpoint_if_due(&mut self) -> Result<(), AuditError> {
        let covered = self.last_checkpoint.as_ref().map(|c| c.size).unwrap_or(0);
        if self.len() > covered && self.since_checkpoint.elapsed() >= self.options.policy.every {
            self.checkpoint(None)?;
        }
        Ok(())
    }

    /// Reads one entry (from the start of its chunk: at most 255 lines are skipped).
    pub fn get(&self, seq: u64) -> Result<Entry, AuditError> {
        if seq >= self.len() {
            return Err(AuditError::NoSuchEntry(seq));
        }
        let chunk = self.leaves().lines(seq >> CHUNK_BITS)?;
        let within = (seq - ((seq >> CHUNK_BITS) << CHUNK_BITS)) as usize;
        let body = chunk
            .split(|b| *b == b'\n')
            .nth(within)
            .ok_or(AuditError::NoSuchEntry(seq))?;
        Ok(serde_json::from_slice(body)?)
    }

    /// Proof that entry `seq` is in the tree of `size` entries.
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Option<Vec<Hash>>, AuditError> {
        Ok(self.tree.inclusion_proof(seq, size, &self.leaves())?)
    }

    /// Proof that the log of `old` entries is a prefix of the log of `new` entries.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Option<Vec<Hash>>, AuditError> {
        Ok(self.tree.consistency_proof(old, new, &self.leaves())?)
    }

    /// The leaf hash of an entry.
    pub fn leaf(&self, seq: u64) -> Result<Option<Hash>, AuditError> {
        Ok(self.tree.leaf(seq, &self.leaves())?)
    }

    /// The root at an earlier size.
    pub fn root_at(&self, size: u64) -> Result<Option<Hash>, AuditError> {
        Ok(self.tree.root_at(size, &self.leaves())?)
    }

    /// Searches the log (operator view). Uses the person or actor index when the query names one,
    /// and reads the log from the start otherwise.
    pub fn query(&self, q: &AuditQuery) -> Result<Vec<Entry>, AuditError> {
        let listed = match (&q.person, &q.actor) {
            _ if self.index_behind => None,
            (Some(p), _) => Some(self.index.person(p)?),
            (None, Some(a)) => Some(self.index.actor(a)?),
            (None, None) => None,
        };
        let mut out = Vec::new();
        let mut line = Vec::new();
        let mut f = BufReader::new(File::open(self.dir.join(ENTRIES_FILE))?);
        match listed {
            Some(rows) => {
                for (seq, offset) in rows {
                    if seq >= self.len() {
                        continue;
                    }
                    f.seek(SeekFrom::Start(offset))?;
                    line.clear();
                    f.read_until(b'\n', &mut line)?;
                    let body = line.strip_suffix(b"\n").unwrap_or(&line);
                    let e: Entry = serde_json::from_slice(body)?;
                    if e.seq != seq {
                        tracing::warn!(seq, found = e.seq, "audit index points at another entry");
                        continue;
                    }
                    if matches(&e.entry, q) {
                        out.push(e);
                    }
                }
            }
            None => {
                let mut position = 0u64;
                while position < self.end {
                    line.clear();
                    let n = f.read_until(b'\n', &mut line)?;
                    if n == 0 {
                        break;
                    }
                    position += n as u64;
                    let body = line.strip_suffix(b"\n").unwrap_or(&line);
                    let e: Entry = serde_json::from_slice(body)?;
                    if matches(&e.entry, q) {
                        out.push(e);
                    }
                }
            }
        }
        if let Some(limit) = q.limit {
            let skip = out.len().saturating_sub(limit);
            out.drain(..skip);
        }
        Ok(out)
    }

    /// A person's access history. Patients see only their own; the operator sees anyone's; everyone
    /// else is refused. Every request is itself audited, allowed or denied.
    pub fn access_history(
        &mut self,
        requester: &HistoryRequester,
        person: &str,
        time: &str,
    ) -> Result<Vec<AccessRecord>, AuditError> {
        let (actor, allowed, rule, purpose) = match requester {
            HistoryRequester::Patient { actor, person: own } if own == person => (
                actor,
                true,
                "history-own-person",
                Purpose::PatientSelfAccess,
            ),
            HistoryRequester::Patient { actor, .. } => (
                actor,
                false,
                "history-other-person",
                Purpose::PatientSelfAccess,
            ),
            HistoryRequester::Operator { actor } => {
                (actor, true, "history-operator", Purpose::Operations)
            }
            HistoryRequester::Other { actor } => {
                (actor, false, "history-not-permitted", Purpose::Unknown)
            }
        };
        // Read before recording the request, so the answer is the history up to the request.
        let entries = if allowed {
            self.query(&AuditQuery {
                person: Some(person.to_string()),
                ..AuditQuery::default()
            })?
        } else {
            Vec::new()
        };
        self.append(&[NewEntry {
            time: time.to_string(),
            actor: actor.clone(),
            action: "access-history".into(),
            target: Target {
                person: Some(person.to_string()),
                ..Target::default()
            },
            purpose,
            outcome: if allowed {
                Outcome::allow(rule)
            } else {
                Outcome::deny(rule)
            },
            source: None,
            request: None,
        }])?;
        if !allowed {
            return Err(AuditError::Denied(rule.to_string()));
        }
        Ok(entries
            .into_iter()
            .map(|e| {
                let (emergency, reason) = match &e.entry.purpose {
                    Purpose::Emergency { reason } => (true, Some(reason.clone())),
                    _ => (false, None),
                };
                AccessRecord {
                    seq: e.seq,
                    time: e.entry.time,
                    actor_kind: e.entry.actor.kind,
                    actor: e.entry.actor.id,
                    institution: e.entry.actor.institution,
                    action: e.entry.action,
                    resource_type: e.entry.target.resource_type,
                    purpose: e.entry.purpose.code().to_string(),
                    emergency,
                    emergency_reason: reason,
                    allowed: e.entry.outcome.allowed,
                }
            })
            .collect())
    }
}

/// Where a log resumes from its persisted chunks.
struct Resumed {
    roots: Vec<Hash>,
    starts: Vec<u64>,
    /// Offset just past the last persisted chunk: reading continues there.
    end: u64,
    /// Leaf hash of the last persisted entry.
    last_leaf: Option<Hash>,
    /// Whether the index covers exactly the persisted chunks and they are this log's.
    index_fits: bool,
}

/// What opening a log can start from.
enum Resume {
    /// The persisted chunks, checked against the log.
    From(Resumed),
    /// Nothing persisted: hash the log from its start.
    Fresh,
    /// The log no longer ends the persisted chunks as recorded: hash it from its start and index it
    /// anew.
    Changed,
}

/// Reads the persisted chunks and checks the last one against the log (its lines must hash to its
/// root).
fn resume(path: &Path, index: &EntryIndex, coverage: Coverage) -> Result<Resume, AuditError> {
    let chunks = index.chunks()?;
    let Some(last) = chunks.last().copied() else {
        return Ok(Resume::Fresh);
    };
    let size = 1u64 << CHUNK_BITS;
    let persisted = chunks.len() as u64 * size;
    if coverage.entries < persisted {
        return Ok(Resume::Changed);
    }
    if std::fs::metadata(path)?.len() < last.end {
        tracing::error!(
            end = last.end,
            "audit log is shorter than its recorded chunks; hashing it again from the start"
        );
        return Ok(Resume::Changed);
    }
    let starts: Vec<u64> = chunks.iter().map(|c| c.start).collect();
    let leaves = LogLeaves {
        path: path.to_path_buf(),
        chunk_starts: &starts,
        end: last.end,
    }
    .chunk_leaves(chunks.len() as u64 - 1)?;
    if leaves.len() as u64 != size || perfect_root(&leaves) != last.root {
        tracing::error!(
            chunk = chunks.len() - 1,
            "audit log differs from its recorded chunk roots (changed while the server was stopped?); \
             hashing it again from the start — run `kizuna audit verify`"
        );
        return Ok(Resume::Changed);
    }
    let last_leaf = leaves.last().copied();
    Ok(Resume::From(Resumed {
        roots: chunks.iter().map(|c| c.root).collect(),
        starts,
        end: last.end,
        last_leaf,
        index_fits: coverage.entries > persisted || coverage.last_leaf == last_leaf,
    }))
}

/// The completed chunks `range` of a tree, as the index persists them.
fn chunk_rows(
    tree: &MerkleTree,
    starts: &[u64],
    end: u64,
    range: std::ops::Range<u64>,
) -> Vec<(u64, ChunkRow)> {
    range
        .filter_map(|c| {
            let root = *tree.chunk_roots().get(c as usize)?;
            let start = *starts.get(c as usize)?;
            let stop = starts.get(c as usize + 1).copied().unwrap_or(end);
            Some((
                c,
                ChunkRow {
                    start,
                    end: stop,
                    root,
                },
            ))
        })
        .collect()
}

/// Indexes a whole log from its first line (the index was of another log).
fn reindex(
    path: &Path,
    end: u64,
    index: &mut EntryIndex,
    covered: Coverage,
) -> Result<u64, AuditError> {
    let f = File::open(path)?;
    let mut reader = BufReader::with_capacity(1 << 20, f);
    let mut line = Vec::new();
    let (mut offset, mut seq, mut indexed) = (0u64, 0u64, 0u64);
    let mut pending = Vec::new();
    while offset < end {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        pending.extend(index_row(seq, offset, body));
        if pending.len() >= CATCH_UP_BATCH {
            let c = Coverage {
                entries: seq + 1,
                last_leaf: Some(leaf_hash(body)),
            };
            index.add(&pending, c)?;
            indexed += pending.len() as u64;
            pending.clear();
        }
        offset += n as u64;
        seq += 1;
    }
    indexed += pending.len() as u64;
    index.add(&pending, covered)?;
    Ok(indexed)
}

#[derive(Serialize)]
struct EntryRef<'a> {
    seq: u64,
    #[serde(flatten)]
    entry: &'a NewEntry,
}

fn matches(e: &NewEntry, q: &AuditQuery) -> bool {
    if let Some(p) = &q.person {
        if e.target.person.as_ref() != Some(p) {
            return false;
        }
    }
    if let Some(a) = &q.actor {
        if &e.actor.id != a {
            return false;
        }
    }
    if let Some(t) = &q.resource_type {
        if e.target.resource_type.as_ref() != Some(t) {
            return false;
        }
    }
    if let Some(i) = &q.resource_id {
        if e.target.resource_id.as_ref() != Some(i) {
            return false;
        }
    }
    // RFC 3339 times in one offset compare as strings; normalise to UTC for mixed offsets.
    let t = normalise_time(&e.time);
    if let Some(from) = &q.from {
        if t < normalise_time(from) {
            return false;
        }
    }
    if let Some(to) = &q.to {
        if t >= normalise_time(to) {
            return false;
        }
    }
    true
}

fn normalise_time(s: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|d| {
            d.with_timezone(&chrono::Utc)
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string()
        })
        .unwrap_or_else(|_| s.to_string())
}

enum Msg {
    Entries(Vec<NewEntry>),
    Flush(mpsc::Sender<Result<u64, String>>),
}

/// A handle to a log written by a background thread: callers hand entries over and carry on; the
/// thread appends whatever has queued up as one batch (group commit) and checkpoints on schedule.
#[derive(Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<Msg>,
    log: Arc<Mutex<AuditLog>>,
    /// Entries handed over and not yet written: what a bulk producer watches to stay within memory.
    queued: Arc<AtomicU64>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditWriter")
    }
}

impl AuditWriter {
    /// Starts the writer thread for a log.
    pub fn spawn(log: AuditLog) -> AuditWriter {
        let every = log.options.policy.every;
        let log = Arc::new(Mutex::new(log));
        let (tx, rx) = mpsc::channel::<Msg>();
        let shared = log.clone();
        let queued = Arc::new(AtomicU64::new(0));
        let counter = queued.clone();
        std::thread::Builder::new()
            .name("kizuna-audit".into())
            .spawn(move || writer_loop(rx, shared, every, counter))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "audit writer thread failed to start"));
        AuditWriter { tx, log, queued }
    }

    /// Entries queued and not yet written. A caller that records in bulk (an export records one entry
    /// per patient) waits while this is above [`AuditWriter::QUEUE_HIGH`], so the queue — about
    /// 1.7 KB of heap an entry — cannot outgrow the writer.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Acquire)
    }

    /// The queue length above which bulk producers wait for the writer. Two export pages' worth:
    /// at 20,000 the queue alone held ~35 MB of a 1M-resource export's peak, with no faster export.
    pub const QUEUE_HIGH: u64 = 2_000;

    /// Queues one entry.
    pub fn record(&self, e: NewEntry) {
        self.record_batch(vec![e]);
    }

    /// Queues entries (one per resource a search returned, say).
    pub fn record_batch(&self, entries: Vec<NewEntry>) {
        let n = entries.len() as u64;
        self.queued.fetch_add(n, Ordering::AcqRel);
        if self.tx.send(Msg::Entries(entries)).is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            tracing::error!("audit writer stopped; entries lost");
        }
    }

    /// Waits until everything queued so far is written (and synced, for a durable log); returns the size.
    pub fn flush(&self) -> Result<u64, AuditError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Msg::Flush(tx))
            .map_err(|_| AuditError::WriterStopped)?;
        rx.recv()
            .map_err(|_| AuditError::WriterStopped)?
            .map_err(AuditError::Write)
    }

    /// The log, for queries and proofs.
    pub fn log(&self) -> &Arc<Mutex<AuditLog>> {
        &self.log
    }
}

fn writer_loop(
    rx: mpsc::Receiver<Msg>,
    log: Arc<Mutex<AuditLog>>,
    every: Duration,
    queued: Arc<AtomicU64>,
) {
    loop {
        let first = match rx.recv_timeout(every) {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(mut l) = log.lock() {
                    if let Err(e) = l.checkpoint_if_due() {
                        tracing::error!(error = %e, "audit checkpoint failed");
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Entries(es) => batch.extend(es),
                Msg::Flush(w) => waiters.push(w),
            }
            if batch.len() < 100_000 {
                next = rx.try_recv().ok();
            }
        }
        let result = match log.lock() {
            Ok(mut l) => {
                let r = if batch.is_empty() {
                    Ok(l.len())
                } else {
                    l.append(&batch).map(|_| l.len())
                };
                let _ = l.checkpoint_if_due();
                r.map_err(|e| e.to_string())
            }
            Err(_) => Err("audit log lock poisoned".to_string()),
        };
        queued.fetch_sub(batch.len() as u64, Ordering::AcqRel);
        if let Err(e) = &result {
            tracing::error!(error = %e, entries = batch.len(), "audit append failed");
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
    if let Ok(mut l) = log.lock() {
        let _ = l.checkpoint(None);
    }
}

/// A convenience for tests and the CLI: a denied-access entry by an unidentified caller.
pub fn anonymous_actor(source: Option<&str>) -> Actor {
    Actor {
        kind: ActorKind::Anonymous,
        id: source.unwrap_or("unknown").to_string(),
        institution: None,
        issuer: None,
    }
}
