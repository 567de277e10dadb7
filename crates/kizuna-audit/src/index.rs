//! The on-disk index of the log by person and by actor, so a patient's access history is found
//! without keeping a list per person in memory or reading the whole log.
//!
//! It is derived data: it records how many entries it covers and the leaf hash of the last one, and
//! opening the log indexes whatever it does not cover (or rebuilds it when it belongs to another
//! log). That is why the newest rows may wait in memory and be written in bulk: a crash loses at most
//! those, and the next start indexes them again from the log.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use redb::{Database, Durability, TableDefinition};

use sha2::{Digest, Sha256};

use crate::merkle::Hash;
use crate::AuditError;

/// File holding the index, next to the entries.
pub const INDEX_FILE: &str = "index.redb";

/// (key of a person or an actor, seq) → byte offset of the entry. Keys are 8 bytes of a hash, so rows
/// are fixed-width (a quarter of the size with the ids in clear); a collision only makes a query read
/// an entry it then filters out.
const ROWS: TableDefinition<(u64, u64), u64> = TableDefinition::new("rows");
/// chunk number → its first line's offset, its end (8 + 8 bytes) and its Merkle root (32 bytes): a
/// restart resumes the tree from these instead of hashing the whole log again.
const CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("chunks");
/// "covered" → entries indexed (8 bytes, big-endian) and the leaf hash of the last one (32 bytes).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Pages of the index kept in memory; the rest is read from the file (and the OS cache).
const CACHE_BYTES: usize = 16 << 20;

/// Rows held in memory before they are written, sorted, in one transaction (24 bytes each). redb
/// copies a leaf page on the first change to it in a transaction, so a commit per append batch of
/// random person keys rewrote a page per row (~46 µs an entry); in bulk, neighbours share the copy.
const FLUSH_ROWS: usize = 128 * 1024;

/// Rows handed to the committer and not yet on disk before [`EntryIndex::add`] waits (12 MB). A
/// commit of 128k rows into a large index takes seconds (each person row lands on its own page);
/// appends go on meanwhile, so a burst (an export records an entry per patient) does not stall
/// behind it, and only a writer that outpaces the disk for long waits.
const MAX_IN_FLIGHT_ROWS: usize = 4 * FLUSH_ROWS;

/// A completed chunk of the log, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkRow {
    /// Byte offset of its first line.
    pub start: u64,
    /// Byte offset just past its last line.
    pub end: u64,
    /// Its Merkle root.
    pub root: Hash,
}

/// One entry as the index sees it.
#[derive(Debug, Clone)]
pub(crate) struct IndexRow {
    pub seq: u64,
    pub offset: u64,
    pub person: Option<String>,
    pub actor: String,
}

/// How far the index goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Coverage {
    /// Entries indexed (all of `0..entries`).
    pub entries: u64,
    /// Leaf hash of entry `entries - 1`, to tell this log from another.
    pub last_leaf: Option<Hash>,
}

/// The person and actor index of one log directory: what is on disk, the rows being written by its
/// committer thread, and the newest rows in memory (lost in a crash with those in flight, and indexed
/// again from the log at the next open).
pub(crate) struct EntryIndex {
    db: Arc<Database>,
    /// (key, seq, offset) not yet handed over; every seq here is above every seq in flight or on disk.
    pending: Vec<(u64, u64, u64)>,
    /// What the index covers once `pending` is written.
    pending_coverage: Option<Coverage>,
    /// Completed chunks not yet handed over, by number.
    pending_chunks: Vec<(u64, ChunkRow)>,
    in_flight: Arc<InFlight>,
    committer: Option<(mpsc::Sender<Arc<Batch>>, JoinHandle<()>)>,
}

/// One transaction's worth: sorted rows, the chunks completed and the coverage after it.
struct Batch {
    rows: Vec<(u64, u64, u64)>,
    chunks: Vec<(u64, ChunkRow)>,
    coverage: Option<Coverage>,
}

/// The batches handed to the committer, oldest first, until each is on disk.
#[derive(Default)]
struct InFlight {
    state: Mutex<InFlightState>,
    changed: Condvar,
}

#[derive(Default)]
struct InFlightState {
    batches: VecDeque<Arc<Batch>>,
    rows: usize,
    /// The first failed commit. The committer writes nothing after it: a later batch on disk
    /// would claim coverage over the failed one's entries.
    failed: Option<String>,
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, InFlightState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes batches in order, each in one durable transaction.
fn committer_loop(
    db: Arc<Database>,
    batches: mpsc::Receiver<Arc<Batch>>,
    in_flight: Arc<InFlight>,
) {
    for batch in batches {
        if in_flight.lock().failed.is_some() {
            continue;
        }
        let result = commit(&db, &batch);
        let mut st = in_flight.lock();
        match result {
            Ok(()) => {
                st.batches.pop_front();
                st.rows -= batch.rows.len();
            }
            Err(e) => st.failed = Some(e.to_string()),
        }
        drop(st);
        in_flight.changed.notify_all();
    }
}

fn committer_stopped() -> AuditError {
    AuditError::Index("索引の書き込みが止まっています / the index committer has stopped".into())
}

/// Rows written per transaction of a batch. A batch's rows are sorted, so each slice covers one
/// stretch of keys and dirties only the leaves there: a commit holds at most about this many pages
/// in memory, where one transaction per batch dirtied nearly every leaf of the index (person keys
/// are random), a cost that grew with the index. The leaves are still each written about once per
/// batch.
const SLICE_ROWS: usize = 8 * 1024;

/// Writes a batch in slices of [`SLICE_ROWS`], each durable, with the chunks and the coverage in
/// the last: a crash between slices leaves the coverage where it was, and the entries after it are
/// indexed again at the next open (the same keys, so the rows written twice are replaced).
fn commit(db: &Database, batch: &Batch) -> Result<(), AuditError> {
    let mut slices = batch.rows.chunks(SLICE_ROWS).peekable();
    loop {
        let rows = slices.next().unwrap_or(&[]);
        let last = slices.peek().is_none();
        let mut tx = db.begin_write().map_err(ix)?;
        tx.set_durability(Durability::Immediate);
        {
            let mut table = tx.open_table(ROWS).map_err(ix)?;
            for (k, seq, offset) in rows {
                table.insert((*k, *seq), *offset).map_err(ix)?;
            }
            if last {
                write_progress(&tx, batch)?;
            }
        }
        tx.commit().map_err(ix)?;
        if last {
            return Ok(());
        }
    }
}

/// The chunks a batch completed and the coverage after it.
fn write_progress(tx: &redb::WriteTransaction, batch: &Batch) -> Result<(), AuditError> {
    let mut chunks = tx.open_table(CHUNKS).map_err(ix)?;
    for (n, c) in &batch.chunks {
        let mut v = Vec::with_capacity(48);
        v.extend_from_slice(&c.start.to_be_bytes());
        v.extend_from_slice(&c.end.to_be_bytes());
        v.extend_from_slice(&c.root);
        chunks.insert(*n, v.as_slice()).map_err(ix)?;
    }
    if let Some(covered) = batch.coverage {
        let mut meta = tx.open_table(META).map_err(ix)?;
        let mut value = covered.entries.to_be_bytes().to_vec();
        if let Some(h) = covered.last_leaf {
            value.extend_from_slice(&h);
        }
        meta.insert("covered", value.as_slice()).map_err(ix)?;
    }
    Ok(())
}

/// The index key of a person's or an actor's id (the tag keeps the two apart).
fn key(tag: u8, id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update([tag]);
    h.update(id.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

const PERSON: u8 = b'p';
const ACTOR: u8 = b'a';

fn ix(e: impl Into<redb::Error>) -> AuditError {
    AuditError::Index(e.into().to_string())
}

/// Creates the tables a transaction will find (opening a table in a write transaction creates it).
fn create_tables(tx: &redb::WriteTransaction) -> Result<(), AuditError> {
    tx.open_table(ROWS).map_err(ix)?;
    tx.open_table(CHUNKS).map_err(ix)?;
    tx.open_table(META).map_err(ix)?;
    Ok(())
}

impl EntryIndex {
    /// Opens (or creates) the index; another process holding it is [`AuditError::InUse`].
    pub fn open(dir: &Path) -> Result<EntryIndex, AuditError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join(INDEX_FILE))
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    AuditError::InUse(dir.display().to_string())
                }
                other => ix(other),
            })?;
        let tx = db.begin_write().map_err(ix)?;
        create_tables(&tx)?;
        tx.commit().map_err(ix)?;
        let db = Arc::new(db);
        let in_flight = Arc::new(InFlight::default());
        let (tx, rx) = mpsc::channel();
        let committer = std::thread::Builder::new()
            .name("kizuna-audit-ix".into())
            .spawn({
                let (db, in_flight) = (db.clone(), in_flight.clone());
                move || committer_loop(db, rx, in_flight)
            })?;
        Ok(EntryIndex {
            db,
            pending: Vec::new(),
            pending_coverage: None,
            pending_chunks: Vec::new(),
            in_flight,
            committer: Some((tx, committer)),
        })
    }

    /// What the index on disk covers.
    pub fn coverage(&self) -> Result<Coverage, AuditError> {
        let tx = self.db.begin_read().map_err(ix)?;
        let meta = tx.open_table(META).map_err(ix)?;
        let Some(v) = meta.get("covered").map_err(ix)? else {
            return Ok(Coverage {
                entries: 0,
                last_leaf: None,
            });
        };
        let bytes = v.value();
        let entries = bytes
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let last_leaf = bytes.get(8..40).and_then(|b| <Hash>::try_from(b).ok());
        Ok(Coverage { entries, last_leaf })
    }

    /// Forgets everything (the index belongs to another log, or the log was cut).
    pub fn clear(&mut self) -> Result<(), AuditError> {
        // Whatever is in flight belongs to what is being forgotten. A failure stays: the batches
        // the committer skipped after it are still listed, so the index stays behind until the
        // next open rebuilds it.
        let _ = self.wait_idle();
        self.pending.clear();
        self.pending_coverage = None;
        self.pending_chunks.clear();
        let mut tx = self.db.begin_write().map_err(ix)?;
        tx.set_durability(Durability::Immediate);
        tx.delete_table(ROWS).map_err(ix)?;
        tx.delete_table(CHUNKS).map_err(ix)?;
        tx.delete_table(META).map_err(ix)?;
        create_tables(&tx)?;
        tx.commit().map_err(ix)?;
        Ok(())
    }

    /// The persisted chunks, from the first, as long as they follow each other.
    pub fn chunks(&self) -> Result<Vec<ChunkRow>, AuditError> {
        let tx = self.db.begin_read().map_err(ix)?;
        let t = tx.open_table(CHUNKS).map_err(ix)?;
        let mut out = Vec::new();
        for row in t.range(0u64..).map_err(ix)? {
            let (k, v) = row.map_err(ix)?;
            let b = v.value();
            let (Some(start), Some(end), Some(root)) = (
                b.get(..8).and_then(|x| <[u8; 8]>::try_from(x).ok()),
                b.get(8..16).and_then(|x| <[u8; 8]>::try_from(x).ok()),
                b.get(16..48).and_then(|x| <Hash>::try_from(x).ok()),
            ) else {
                break;
            };
            if k.value() != out.len() as u64 {
                break;
            }
            out.push(ChunkRow {
                start: u64::from_be_bytes(start),
                end: u64::from_be_bytes(end),
                root,
            });
        }
        Ok(out)
    }

    /// Adds completed chunks, written with the next rows.
    pub fn add_chunks(&mut self, chunks: impl IntoIterator<Item = (u64, ChunkRow)>) {
        self.pending_chunks.extend(chunks);
    }

    /// Adds entries that directly follow what is covered, and moves the coverage to `covered`.
    /// They are written when enough have gathered (or at [`EntryIndex::sync`]).
    pub fn add(&mut self, rows: &[IndexRow], covered: Coverage) -> Result<(), AuditError> {
        for r in rows {
            if let Some(p) = &r.person {
                self.pending.push((key(PERSON, p), r.seq, r.offset));
            }
            self.pending.push((key(ACTOR, &r.actor), r.seq, r.offset));
        }
        self.pending_coverage = Some(covered);
        if self.pending.len() >= FLUSH_ROWS {
            self.hand_over()?;
        }
        Ok(())
    }

    /// Hands everything added so far to the committer and waits until it is on disk. Every write
    /// is durable: redb reuses the pages a write replaces only after a durable commit (with
    /// non-durable ones the file grew to 340 bytes an entry), and one `fsync` per 64k entries costs
    /// nothing measurable.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.hand_over()?;
        self.wait_idle()
    }

    /// Passes the rows held here to the committer as one batch, first waiting while too many are
    /// in flight.
    fn hand_over(&mut self) -> Result<(), AuditError> {
        if self.pending_coverage.is_none() && self.pending_chunks.is_empty() {
            return Ok(());
        }
        let mut rows = std::mem::take(&mut self.pending);
        rows.sort_unstable();
        let batch = Arc::new(Batch {
            rows,
            chunks: std::mem::take(&mut self.pending_chunks),
            coverage: self.pending_coverage.take(),
        });
        let Some((to_committer, _)) = &self.committer else {
            return Err(committer_stopped());
        };
        let mut st = self.in_flight.lock();
        while st.failed.is_none() && st.rows > 0 && st.rows + batch.rows.len() > MAX_IN_FLIGHT_ROWS
        {
            st = self
                .in_flight
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
        if let Some(e) = &st.failed {
            return Err(AuditError::Index(e.clone()));
        }
        st.rows += batch.rows.len();
        st.batches.push_back(batch.clone());
        drop(st);
        to_committer.send(batch).map_err(|_| committer_stopped())
    }

    /// Waits until every batch handed over is on disk (or one failed).
    fn wait_idle(&self) -> Result<(), AuditError> {
        let mut st = self.in_flight.lock();
        while st.failed.is_none() && !st.batches.is_empty() {
            st = self
                .in_flight
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
        match &st.failed {
            Some(e) => Err(AuditError::Index(e.clone())),
            None => Ok(()),
        }
    }

    /// (seq, offset) of a person's entries (and of any whose key collides), in log order.
    pub fn person(&self, person: &str) -> Result<Vec<(u64, u64)>, AuditError> {
        self.lookup(key(PERSON, person))
    }

    /// (seq, offset) of an actor's entries (and of any whose key collides), in log order.
    pub fn actor(&self, actor: &str) -> Result<Vec<(u64, u64)>, AuditError> {
        self.lookup(key(ACTOR, actor))
    }

    fn lookup(&self, key: u64) -> Result<Vec<(u64, u64)>, AuditError> {
        // Held across the read so a batch cannot leave the in-flight list before the snapshot
        // holds it; a batch committed meanwhile is in both, and the duplicates go below.
        let st = self.in_flight.lock();
        let tx = self.db.begin_read().map_err(ix)?;
        let t = tx.open_table(ROWS).map_err(ix)?;
        let mut out = Vec::new();
        for row in t.range((key, 0u64)..=(key, u64::MAX)).map_err(ix)? {
            let (k, v) = row.map_err(ix)?;
            out.push((k.value().1, v.value()));
        }
        let mut newer: Vec<(u64, u64)> = st
            .batches
            .iter()
            .flat_map(|b| b.rows.iter())
            .chain(self.pending.iter())
            .filter(|(k, _, _)| *k == key)
            .map(|(_, seq, offset)| (*seq, *offset))
            .collect();
        drop(st);
        out.append(&mut newer);
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

impl Drop for EntryIndex {
    /// Lets the committer finish what it was handed; rows never handed over are indexed again at
    /// the next open.
    fn drop(&mut self) {
        if let Some((to_committer, thread)) = self.committer.take() {
            drop(to_committer);
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(from: u64, to: u64) -> Vec<IndexRow> {
        (from..to)
            .map(|seq| IndexRow {
                seq,
                offset: seq * 100,
                person: Some(format!("person-{}", seq % 3)),
                actor: "operator".into(),
            })
            .collect()
    }

    fn covering(n: u64) -> Coverage {
        Coverage {
            entries: n,
            last_leaf: None,
        }
    }

    #[test]
    fn rows_being_written_are_found_once_before_and_after_the_commit() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut ix = EntryIndex::open(d.path()).unwrap_or_else(|e| panic!("{e}"));
        // Holding a write transaction keeps the committer from writing the batch handed to it.
        let held = ix.db.begin_write().unwrap_or_else(|e| panic!("{e}"));
        // Two rows an entry: the first call fills a batch, the second stays here.
        let n = FLUSH_ROWS as u64 / 2 + 10;
        ix.add(&rows(0, n - 10), covering(n - 10))
            .unwrap_or_else(|e| panic!("{e}"));
        ix.add(&rows(n - 10, n), covering(n))
            .unwrap_or_else(|e| panic!("{e}"));
        {
            let st = ix.in_flight.lock();
            assert_eq!(st.batches.len(), 1, "one batch handed over");
            assert!(st.rows >= FLUSH_ROWS);
        }
        assert_eq!(ix.pending.len(), 20, "the rest is still held here");
        let expect: Vec<(u64, u64)> = (0..n)
            .filter(|s| s % 3 == 1)
            .map(|s| (s, s * 100))
            .collect();
        assert_eq!(ix.person("person-1").ok(), Some(expect.clone()));
        assert_eq!(ix.actor("operator").map(|v| v.len()).ok(), Some(n as usize));
        drop(held);
        ix.sync().unwrap_or_else(|e| panic!("{e}"));
        assert!(ix.in_flight.lock().batches.is_empty());
        assert_eq!(ix.person("person-1").ok(), Some(expect));
        assert_eq!(ix.coverage().ok(), Some(covering(n)));
        drop(ix);
        // On disk after a reopen.
        let ix = EntryIndex::open(d.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ix.actor("operator").map(|v| v.len()).ok(), Some(n as usize));
    }
}
