//! Writes: every create, update and delete goes through [`Store::transaction`], which stores a new
//! version in the history, replaces the current row and its index rows, and commits all of it or
//! nothing.
//!
//! The CPU-heavy part, extracting index values with FHIRPath, runs before the write lock is taken.
//! Inside the transaction, rows that nothing reads back (history, index rows, new resources) wait in
//! [`PendingRows`] and go to the database as one statement per table at the end.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::Value;

use crate::index::IndexValue;
use crate::schema::{index_columns, INDEX_TABLES};
use crate::write_tx::{int, lock, text, WriteTx};
use crate::{
    concurrent_or_db, new_id, Backend, Store, StoreError, Stored, WriteOp, COMPOSITE_PARTS,
};

/// A value bound in an insert (rows travel as one JSON array per table).
#[derive(Debug, Clone)]
pub(crate) enum Bind {
    S(String),
    /// A nullable text (deleted versions have no body).
    O(Option<String>),
    I(i64),
    F(f64),
}

impl serde::Serialize for Bind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Bind::S(v) => s.serialize_str(v),
            Bind::O(Some(v)) => s.serialize_str(v),
            Bind::O(None) => s.serialize_none(),
            Bind::I(v) => s.serialize_i64(*v),
            Bind::F(v) => s.serialize_f64(*v),
        }
    }
}

/// Where rows go: the table, its columns with their SQL types, and what to return.
#[derive(Clone, Copy)]
struct InsertInto<'a> {
    table: &'a str,
    cols: &'a str,
    types: &'a [&'a str],
    returning: Option<&'a str>,
}

impl InsertInto<'_> {
    /// ` RETURNING …`, or nothing.
    fn returning_clause(&self) -> String {
        self.returning
            .map(|r| format!(" RETURNING {r}"))
            .unwrap_or_default()
    }
}

/// One request waiting for the SQLite group commit.
pub(crate) struct WriteRequest {
    ops: Vec<WriteOp>,
    rows: Vec<Vec<(i64, IndexValue)>>,
    /// Bodies of creates, serialised before the request reached the writer ([`Prepared`]).
    bodies: Vec<Option<String>>,
    now: chrono::DateTime<chrono::Utc>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Stored>, StoreError>>,
}

/// How one write treats the row it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    /// A create with a new id: nothing to look up or replace.
    Fresh,
    /// Create-or-update of a given id.
    Upsert,
    /// Delete (a new version without a body).
    Delete,
}

/// Index rows of one resource, waiting for its row id.
struct OwnedRows {
    rt: String,
    id: String,
    /// Known for replaced rows; filled from `RETURNING` for new ones.
    rid: Option<i64>,
    rows: Vec<(i64, IndexValue)>,
}

/// Rows a transaction writes at its end ([`Store::flush`]).
#[derive(Default)]
struct PendingRows {
    fresh: Vec<Vec<Bind>>,
    history: Vec<Vec<Bind>>,
    owners: Vec<OwnedRows>,
}

impl PendingRows {
    /// Whether a version of this resource waits here (a request writing it twice).
    fn holds(&self, rt: &str, id: &str) -> bool {
        self.history
            .iter()
            .any(|h| matches!((&h[0], &h[1]), (Bind::S(t), Bind::S(i)) if t == rt && i == id))
    }
}

/// Up to this many index rows, a resource's rows are deduplicated by comparison, not hashing.
const DEDUP_SCAN: usize = 64;

/// What [`Store::prepare`] computed for a request's writes, one entry per op.
struct Prepared {
    rows: Vec<Vec<(i64, IndexValue)>>,
    bodies: Vec<Option<String>>,
}

/// A component value spread over the generic composite columns (s1, s2, s3, n1, n2); the search
/// side reads them through the same mapping. Unused columns hold `''` and 0, never NULL.
fn component_columns(v: IndexValue) -> [Bind; 5] {
    let t = Bind::S;
    let e = || Bind::S(String::new());
    match v {
        IndexValue::Token(a, b) | IndexValue::String(a, b) | IndexValue::Reference(a, b) => {
            [t(a), t(b), e(), Bind::F(0.0), Bind::F(0.0)]
        }
        IndexValue::Date(lo, hi) => [e(), e(), e(), Bind::F(lo as f64), Bind::F(hi as f64)],
        IndexValue::Number(n) => [e(), e(), e(), Bind::F(n), Bind::F(0.0)],
        IndexValue::Quantity {
            value,
            system,
            code,
            unit,
        } => [t(system), t(code), t(unit), Bind::F(value), Bind::F(0.0)],
        IndexValue::Uri(u) => [e(), t(u), e(), Bind::F(0.0), Bind::F(0.0)],
        IndexValue::Composite(_) | IndexValue::CodeValue { .. } => {
            [e(), e(), e(), Bind::F(0.0), Bind::F(0.0)]
        }
    }
}

/// Appends one index row's column values (after `pid, rid`) to `row`; returns its table slot.
fn index_row(v: IndexValue, row: &mut Vec<Bind>) -> usize {
    match v {
        IndexValue::Token(s, c) => {
            row.extend([Bind::S(s), Bind::S(c)]);
            0
        }
        IndexValue::String(n, e) => {
            row.extend([Bind::S(n), Bind::S(e)]);
            1
        }
        IndexValue::Date(lo, hi) => {
            row.extend([Bind::I(lo), Bind::I(hi)]);
            2
        }
        IndexValue::Reference(t, i) => {
            row.extend([Bind::S(t), Bind::S(i)]);
            3
        }
        IndexValue::Number(n) => {
            row.push(Bind::F(n));
            4
        }
        IndexValue::Uri(u) => {
            row.push(Bind::S(u));
            5
        }
        IndexValue::Quantity {
            value,
            system,
            code,
            unit,
        } => {
            row.extend([
                Bind::F(value),
                Bind::S(system),
                Bind::S(code),
                Bind::S(unit),
            ]);
            6
        }
        IndexValue::Composite(parts) => {
            let mut parts = parts.into_iter();
            for _ in 0..COMPOSITE_PARTS {
                let c = parts.next().unwrap_or(IndexValue::Composite(Vec::new()));
                row.extend(component_columns(c));
            }
            7
        }
        IndexValue::CodeValue {
            system,
            code,
            value,
        } => {
            row.extend([Bind::S(system), Bind::S(code), Bind::F(value)]);
            8
        }
    }
}

impl Store {
    /// Creates a resource with a new id.
    pub async fn create(&self, resource: Value) -> Result<Stored, StoreError> {
        let mut out = self
            .transaction(vec![WriteOp::Create {
                resource,
                full_url: None,
            }])
            .await?;
        out.pop().ok_or(StoreError::NoResourceType)
    }

    /// Creates or updates a resource at its id; with `if_match`, only when that is the current version.
    pub async fn update(
        &self,
        resource: Value,
        if_match: Option<i64>,
    ) -> Result<Stored, StoreError> {
        let mut out = self
            .transaction(vec![WriteOp::Update { resource, if_match }])
            .await?;
        out.pop().ok_or(StoreError::NoResourceType)
    }

    /// Deletes a resource (a new version marked deleted); returns it, or `None` when there was nothing.
    pub async fn delete(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<Stored>, StoreError> {
        let mut out = self
            .transaction(vec![WriteOp::Delete {
                resource_type: resource_type.to_string(),
                id: id.to_string(),
            }])
            .await?;
        Ok(out.pop().filter(|s| s.deleted))
    }

    /// Applies writes atomically: all are stored or none. `urn:uuid` references between entries are
    /// rewritten to the ids the creates receive.
    pub async fn transaction(&self, ops: Vec<WriteOp>) -> Result<Vec<Stored>, StoreError> {
        let mut map: Vec<(String, String)> = Vec::new();
        let mut ops = ops;
        for op in ops.iter_mut() {
            if let WriteOp::Create { resource, full_url } = op {
                let rt = resource
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .ok_or(StoreError::NoResourceType)?
                    .to_string();
                let id = new_id();
                resource["id"] = Value::String(id.clone());
                if let Some(u) = full_url {
                    map.push((u.clone(), format!("{rt}/{id}")));
                }
            }
        }
        if !map.is_empty() {
            for op in ops.iter_mut() {
                match op {
                    WriteOp::Create { resource, .. }
                    | WriteOp::CreateWithId { resource }
                    | WriteOp::Update { resource, .. } => rewrite_refs(resource, &map),
                    WriteOp::Delete { .. } => {}
                }
            }
        }
        self.apply(ops).await.map_err(concurrent_or_db)
    }

    /// Waits for the single in-process SQLite writer (a no-op on PostgreSQL).
    pub(crate) async fn writer_lock(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.backend() {
            Backend::Sqlite => Some(self.sqlite_writer.lock().await),
            Backend::Postgres => None,
        }
    }

    /// Deletes a resource's rows from every index table (before its new rows, or for good).
    async fn delete_index_rows(&self, tx: &mut WriteTx<'_>, rid: i64) -> Result<(), StoreError> {
        self.delete_index_rows_of(tx, &[rid]).await
    }

    /// [`Store::delete_index_rows`] for many resources: a statement per table and 500 resources,
    /// not per table and resource (a reindex of 88k resources spent most of its time on the
    /// 9 × 88k single deletes).
    async fn delete_index_rows_of(
        &self,
        tx: &mut WriteTx<'_>,
        rids: &[i64],
    ) -> Result<(), StoreError> {
        for chunk in rids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let binds: Vec<Bind> = chunk.iter().map(|r| Bind::I(*r)).collect();
            for table in INDEX_TABLES {
                let del = self.sql(&format!("DELETE FROM {table} WHERE rid IN ({marks})"));
                tx.execute(&del, &binds).await?;
            }
        }
        Ok(())
    }

    /// Starts a write transaction. SQLite takes the write lock up front (`BEGIN IMMEDIATE`), so a
    /// reader turned writer never fails with `SQLITE_BUSY_SNAPSHOT` and waits on `busy_timeout`
    /// instead; PostgreSQL locks rows as it reads them (`FOR UPDATE` in [`Store::write`]).
    pub(crate) async fn begin_write(&self) -> Result<WriteTx<'static>, StoreError> {
        Ok(WriteTx::Sqlx(match self.backend() {
            Backend::Sqlite => self.write_pool().begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.write_pool().begin().await?,
        }))
    }

    /// Index rows of a resource (`_lastUpdated` is searched on the resources table: the client's
    /// meta value would be stale).
    pub(crate) fn index_rows_of(&self, resource: &Value) -> Vec<(String, IndexValue)> {
        self.indexer()
            .extract(self.registry(), resource)
            .into_iter()
            .filter(|(p, _)| p != "_lastUpdated")
            .collect()
    }

    async fn apply(&self, mut ops: Vec<WriteOp>) -> Result<Vec<Stored>, StoreError> {
        let now = chrono::Utc::now();
        let prepared = {
            let _announced = self
                .group_writer
                .as_ref()
                .map(|_| Preparing::new(&self.preparing));
            self.prepare(&mut ops, now).await
        };
        let Prepared { rows, bodies } = prepared?;
        if let Some(w) = &self.group_writer {
            let (reply, answer) = tokio::sync::oneshot::channel();
            w.send(WriteRequest {
                ops,
                rows,
                bodies,
                now,
                reply,
            })
            .map_err(|_| StoreError::WriterStopped)?;
            return answer.await.map_err(|_| StoreError::WriterStopped)?;
        }
        let _serial = self.writer_lock().await;
        let mut tx = self.begin_write().await?;
        let written = ops.len();
        let out = self.apply_in(&mut tx, ops, rows, bodies, now).await?;
        tx.commit().await?;
        if self.backend() == Backend::Postgres && self.pg_stats.due(written) {
            self.refresh_pg_stats();
        }
        Ok(out)
    }

    /// The work of a write that needs no lock, done by the requesting task so the one SQLite
    /// writer only writes: index extraction (FHIRPath over every SearchParameter, the CPU-heavy
    /// part), parameter ids, duplicate rows dropped, and the bodies of creates serialised (a
    /// create is always version 1 at `now`).
    async fn prepare(
        &self,
        ops: &mut [WriteOp],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Prepared, StoreError> {
        let extracted: Vec<(String, Vec<(String, IndexValue)>)> =
            ops.iter().map(|op| self.extract_op(op)).collect();
        let keys: Vec<(&str, &str)> = extracted
            .iter()
            .flat_map(|(rt, r)| r.iter().map(move |(p, _)| (rt.as_str(), p.as_str())))
            .collect();
        self.ensure_params(&keys).await?;
        let rows = extracted
            .into_iter()
            .map(|(rt, idx)| self.resolve_rows(&rt, idx))
            .collect();
        let last_updated = stamp_time(now);
        let mut bodies = Vec::with_capacity(ops.len());
        for op in ops.iter_mut() {
            bodies.push(match op {
                // Without an id the writer assigns one, and serialises the body itself.
                WriteOp::Create { resource, .. } | WriteOp::CreateWithId { resource }
                    if resource.get("id").is_some_and(Value::is_string) =>
                {
                    stamp(resource, 1, &last_updated);
                    Some(serde_json::to_string(&*resource)?)
                }
                _ => None,
            });
        }
        Ok(Prepared { rows, bodies })
    }

    /// Each op's index rows as [`Store::prepare`] made them, for a write run a second time (its
    /// parameters have ids by then).
    fn rows_again(&self, ops: &[WriteOp]) -> Vec<Vec<(i64, IndexValue)>> {
        ops.iter()
            .map(|op| {
                let (rt, idx) = self.extract_op(op);
                self.resolve_rows(&rt, idx)
            })
            .collect()
    }

    /// An op's resource type and index rows by parameter code (none for a delete).
    fn extract_op(&self, op: &WriteOp) -> (String, Vec<(String, IndexValue)>) {
        match op {
            WriteOp::Create { resource, .. }
            | WriteOp::CreateWithId { resource }
            | WriteOp::Update { resource, .. } => (
                resource
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                self.index_rows_of(resource),
            ),
            WriteOp::Delete { .. } => (String::new(), Vec::new()),
        }
    }

    /// Index rows keyed by parameter id (every id exists: [`Store::ensure_params`] ran), each
    /// (parameter, value) once: the index tables are keyed on them.
    fn resolve_rows(&self, rt: &str, idx: Vec<(String, IndexValue)>) -> Vec<(i64, IndexValue)> {
        let Ok(params) = self.params.read() else {
            return Vec::new();
        };
        let mut out: Vec<(i64, IndexValue)> = Vec::with_capacity(idx.len());
        // A resource has a few dozen rows: comparing with those kept is cheaper than hashing and
        // cloning every row into a set, which only a large resource needs.
        let large = idx.len() > DEDUP_SCAN;
        let mut seen = std::collections::HashSet::new();
        for (p, v) in idx {
            let Some(pid) = params.get(rt, &p) else {
                continue;
            };
            let row = (pid, v);
            let new = if large {
                seen.insert(row.clone())
            } else {
                !out.contains(&row)
            };
            if new {
                out.push(row);
            }
        }
        out
    }

    /// PostgreSQL: ANALYZE in the background. Autovacuum gets there too, but only after a minute
    /// and a tenth of a table changed; until then a freshly loaded store is planned as if empty
    /// (population searches were seen at 30–90 ms instead of a few).
    fn refresh_pg_stats(&self) {
        let stats = self.pg_stats.clone();
        if stats.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.write_pool().clone();
        tokio::spawn(async move {
            if let Err(e) = sqlx::query("ANALYZE").execute(&pool).await {
                tracing::warn!(error = %e, "ANALYZE failed");
            }
            stats.running.store(false, Ordering::Release);
        });
    }

    /// The writes of one request inside an open transaction.
    async fn apply_in(
        &self,
        tx: &mut WriteTx<'_>,
        mut ops: Vec<WriteOp>,
        mut rows: Vec<Vec<(i64, IndexValue)>>,
        mut bodies: Vec<Option<String>>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<Stored>, StoreError> {
        let mut pending = PendingRows::default();
        let out = self
            .apply_ops(tx, &mut pending, &mut ops, &mut rows, &mut bodies, now)
            .await?;
        self.flush(tx, pending).await?;
        Ok(attach(ops, out))
    }

    /// The writes of one request, their rows left in `pending` for a later [`Store::flush`]
    /// (statements run only for what reads the current row: updates and deletes). Resources get
    /// their `meta` in place and stay in `ops`: the group commit may have to run them again, and
    /// [`attach`] moves them into the answers once committed (no copy of any resource). Index rows
    /// and prepared bodies move into the writes; a second run makes them again.
    async fn apply_ops(
        &self,
        tx: &mut WriteTx<'_>,
        pending: &mut PendingRows,
        ops: &mut [WriteOp],
        rows: &mut [Vec<(i64, IndexValue)>],
        bodies: &mut [Option<String>],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::with_capacity(ops.len());
        for ((op, index_rows), body) in ops.iter_mut().zip(rows.iter_mut()).zip(bodies.iter_mut()) {
            let index_rows = std::mem::take(index_rows);
            let stored = match op {
                WriteOp::Create { resource, .. } | WriteOp::CreateWithId { resource } => {
                    self.write(
                        tx,
                        pending,
                        index_rows,
                        now,
                        (resource, body.take()),
                        None,
                        WriteKind::Fresh,
                    )
                    .await?
                }
                WriteOp::Update { resource, if_match } => {
                    self.write(
                        tx,
                        pending,
                        index_rows,
                        now,
                        (resource, None),
                        *if_match,
                        WriteKind::Upsert,
                    )
                    .await?
                }
                WriteOp::Delete { resource_type, id } => {
                    let mut stub = serde_json::json!({"resourceType": resource_type, "id": id});
                    self.write(
                        tx,
                        pending,
                        index_rows,
                        now,
                        (&mut stub, None),
                        None,
                        WriteKind::Delete,
                    )
                    .await?
                }
            };
            out.push(stored);
        }
        Ok(out)
    }

    /// The SQLite group commit: requests waiting at the same moment share one transaction, each in
    /// its own savepoint, so one failing request rolls back alone. Every commit rewrites each
    /// index page it touched; sharing commits among concurrent writers writes each page once.
    pub(crate) async fn group_commit(
        self,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<WriteRequest>,
        conn: crate::write_tx::DirectConnection,
    ) {
        /// Writes per shared transaction, so one commit stays short.
        const MAX_OPS: usize = 5000;
        // Planner statistics are refreshed after 1,000 writes, then after twice as many each time
        // (up to every 200,000): a growing store gets them early, a large one is not re-analysed
        // for nothing. Without them SQLite may walk a whole parameter's rows to test a chain.
        let mut since_stats = 0usize;
        let mut stats_every = 1000usize;
        let mut unchecked = false;
        loop {
            // When writes pause, the WAL is copied back into the database: readers then find
            // pages in the file's cache instead of looking each one up in a large log.
            let waiting = std::time::Instant::now();
            let first = match tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv())
                .await
            {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(_) => {
                    if unchecked {
                        unchecked = false;
                        let t = std::time::Instant::now();
                        let _ = lock(&conn).execute_batch("PRAGMA wal_checkpoint(PASSIVE)");
                        slow_upkeep("wal_checkpoint", t);
                    }
                    continue;
                }
            };
            unchecked = true;
            // A bulk load the writer holds up (its next write was queued before the writer
            // asked for it): only then is a larger batch worth a moment's wait. Measured before
            // the upkeep below, which is the writer's own time, not waiting.
            let writer_bound = waiting.elapsed() < WRITER_BOUND && first.ops.len() >= GATHER_BULK;
            if since_stats >= stats_every {
                since_stats = 0;
                stats_every = (stats_every * 2).min(200_000);
                let t = std::time::Instant::now();
                let _ = lock(&conn).execute_batch("PRAGMA optimize");
                slow_upkeep("optimize", t);
            }
            let mut batch = vec![first];
            let mut ops = batch[0].ops.len();
            let gathering = std::time::Instant::now();
            while ops < MAX_OPS {
                match rx.try_recv() {
                    Ok(r) => {
                        ops += r.ops.len();
                        batch.push(r);
                    }
                    Err(_) => {
                        // A small batch while other writes are on their way: wait a moment
                        // for them (see GATHER_WAIT).
                        let left = GATHER_WAIT.saturating_sub(gathering.elapsed());
                        if !writer_bound
                            || ops >= GATHER_OPS
                            || left.is_zero()
                            || self.preparing.load(Ordering::Acquire) == 0
                        {
                            break;
                        }
                        match tokio::time::timeout(left.min(GATHER_POLL), rx.recv()).await {
                            Ok(Some(r)) => {
                                ops += r.ops.len();
                                batch.push(r);
                            }
                            Ok(None) => break,
                            Err(_) => {}
                        }
                    }
                }
            }
            since_stats += ops;
            let started = std::time::Instant::now();
            let requests = batch.len();
            let _serial = self.writer_lock().await;
            let mut tx = match WriteTx::begin_direct(&conn) {
                Ok(tx) => tx,
                Err(e) => {
                    let msg = e.to_string();
                    for r in batch {
                        let _ = r.reply.send(Err(StoreError::Commit(msg.clone())));
                    }
                    continue;
                }
            };
            // All requests in one transaction. Failures are rare (a stale If-Match, a duplicate
            // id): then the shared transaction is dropped and each request runs alone, so one
            // failing request never takes the others down. (Savepoints per request would cost
            // every write a copy of each page it touches.)
            // Requests that only create share one set of inserts (one statement per table for
            // the whole batch); a request that updates or deletes first flushes what came
            // before, since it reads the current rows.
            let mut done = Vec::with_capacity(batch.len());
            let mut failed = false;
            let mut pending = PendingRows::default();
            for r in batch.iter_mut() {
                let reads = !r
                    .ops
                    .iter()
                    .all(|o| matches!(o, WriteOp::Create { .. } | WriteOp::CreateWithId { .. }));
                if reads
                    && self
                        .flush(&mut tx, std::mem::take(&mut pending))
                        .await
                        .is_err()
                {
                    failed = true;
                    break;
                }
                match self
                    .apply_ops(
                        &mut tx,
                        &mut pending,
                        &mut r.ops,
                        &mut r.rows,
                        &mut r.bodies,
                        r.now,
                    )
                    .await
                {
                    Ok(out) => done.push(out),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if !failed && self.flush(&mut tx, pending).await.is_err() {
                failed = true;
            }
            let shared = if failed {
                let _ = tx.rollback().await;
                Err(())
            } else {
                let r = tx.commit().await.map_err(|_| ());
                self.commits.fetch_add(1, Ordering::AcqRel);
                r
            };
            tracing::debug!(
                requests,
                ops,
                busy_us = started.elapsed().as_micros() as u64,
                "group commit"
            );
            match shared {
                Ok(()) => {
                    for (r, out) in batch.into_iter().zip(done) {
                        let _ = r.reply.send(Ok(attach(r.ops, out)));
                    }
                }
                Err(()) => {
                    for r in batch {
                        let result = async {
                            let mut tx = WriteTx::begin_direct(&conn)?;
                            // Bodies and index rows the shared attempt used are made again.
                            let rows = self.rows_again(&r.ops);
                            let out = self.apply_in(&mut tx, r.ops, rows, r.bodies, r.now).await?;
                            tx.commit().await?;
                            Ok(out)
                        }
                        .await;
                        let _ = r.reply.send(result);
                    }
                }
            }
        }
    }

    /// Inserts rows into a table. PostgreSQL: one `INSERT … SELECT` per table, the rows as one
    /// JSON array unpacked by `json_array_elements` (binding thousands of parameters through the
    /// driver cost more than inserting the rows). SQLite: multi-row `VALUES` with bound
    /// parameters, in chunks whose sizes are powers of two — few statement shapes, each prepared
    /// once — since unpacking JSON cost the one writer a quarter of its time.
    async fn insert_rows(
        &self,
        tx: &mut WriteTx<'_>,
        into: &InsertInto<'_>,
        rows: &[Vec<Bind>],
    ) -> Result<Vec<Vec<Bind>>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if self.backend() == Backend::Postgres {
            return self.insert_json(tx, into, rows).await;
        }
        let one = format!("({})", vec!["?"; into.types.len()].join(", "));
        let mut out = Vec::new();
        let mut rest = rows;
        while !rest.is_empty() {
            let n = sqlite_chunk(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let sql = format!(
                "INSERT OR IGNORE INTO {} ({}) VALUES {}{}",
                into.table,
                into.cols,
                vec![one.as_str(); n].join(", "),
                into.returning_clause()
            );
            if into.returning.is_some() {
                out.extend(tx.fetch(&sql, chunk.iter().flatten()).await?);
            } else {
                tx.execute(&sql, chunk.iter().flatten()).await?;
            }
        }
        Ok(out)
    }

    /// One `INSERT … SELECT` from a JSON array of rows (PostgreSQL).
    async fn insert_json(
        &self,
        tx: &mut WriteTx<'_>,
        into: &InsertInto<'_>,
        rows: &[Vec<Bind>],
    ) -> Result<Vec<Vec<Bind>>, StoreError> {
        let select: Vec<String> = into
            .types
            .iter()
            .enumerate()
            .map(|(i, t)| match *t {
                "text" => format!("value ->> {i}"),
                t => format!("(value ->> {i})::{t}"),
            })
            .collect();
        let sql = format!(
            "INSERT INTO {} ({}) SELECT {} FROM json_array_elements(CAST($1 AS json)){}",
            into.table,
            into.cols,
            select.join(", "),
            into.returning_clause()
        );
        let payload = [Bind::S(serde_json::to_string(rows)?)];
        Ok(if into.returning.is_some() {
            tx.fetch(&sql, &payload).await?
        } else {
            tx.execute(&sql, &payload).await?;
            Vec::new()
        })
    }

    async fn flush(
        &self,
        tx: &mut WriteTx<'_>,
        mut pending: PendingRows,
    ) -> Result<(), StoreError> {
        const RES_COLS: &str = "rtype, id, version, last_updated, lu_ms, deleted, body";
        const RES_TYPES: &[&str] = &["text", "text", "bigint", "text", "bigint", "bigint", "text"];
        let created = self
            .insert_rows(
                tx,
                &InsertInto {
                    table: "resources",
                    cols: RES_COLS,
                    types: RES_TYPES,
                    returning: Some("rid, rtype, id"),
                },
                &pending.fresh,
            )
            .await?;
        let mut rids: std::collections::HashMap<(String, String), i64> =
            std::collections::HashMap::with_capacity(created.len());
        for r in created {
            rids.insert((text(&r, 1)?, text(&r, 2)?), int(&r, 0)?);
        }
        let history = InsertInto {
            table: "history",
            cols: RES_COLS,
            types: RES_TYPES,
            returning: None,
        };
        self.insert_rows(tx, &history, &pending.history).await?;
        let mut tables: [Vec<Vec<Bind>>; INDEX_TABLES.len()] = Default::default();
        for owner in pending.owners.drain(..) {
            let Some(rid) = owner
                .rid
                .or_else(|| rids.get(&(owner.rt.clone(), owner.id.clone())).copied())
            else {
                continue;
            };
            for (pid, v) in owner.rows {
                // Sized for every table but the composites'.
                let mut row = Vec::with_capacity(6);
                row.push(Bind::I(pid));
                row.push(Bind::I(rid));
                let slot = index_row(v, &mut row);
                tables[slot].push(row);
            }
        }
        for (slot, rows) in tables.iter().enumerate() {
            let (cols, types) = index_columns(slot);
            let mut all_types = vec!["bigint", "bigint"];
            all_types.extend_from_slice(types);
            let into = InsertInto {
                table: INDEX_TABLES[slot],
                cols: &format!("pid, rid, {cols}"),
                types: &all_types,
                returning: None,
            };
            self.insert_rows(tx, &into, rows).await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        tx: &mut WriteTx<'_>,
        pending: &mut PendingRows,
        index_rows: Vec<(i64, IndexValue)>,
        now: chrono::DateTime<chrono::Utc>,
        (resource, prepared): (&mut Value, Option<String>),
        if_match: Option<i64>,
        kind: WriteKind,
    ) -> Result<Stored, StoreError> {
        let delete = kind == WriteKind::Delete;
        let rt = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .ok_or(StoreError::NoResourceType)?
            .to_string();
        let id = match resource.get("id").and_then(Value::as_str) {
            Some(i) => i.to_string(),
            None => {
                let i = new_id();
                resource["id"] = Value::String(i.clone());
                i
            }
        };
        // An earlier write of this request to the same resource must be in the tables before
        // the current row is read and its body moved into the history.
        if kind != WriteKind::Fresh && pending.holds(&rt, &id) {
            self.flush(tx, std::mem::take(pending)).await?;
        }
        let q = match self.backend() {
            Backend::Sqlite => {
                self.sql("SELECT version, deleted, rid FROM resources WHERE rtype = ? AND id = ?")
            }
            Backend::Postgres => self.sql(
                "SELECT version, deleted, rid FROM resources WHERE rtype = ? AND id = ? FOR UPDATE",
            ),
        };
        // (version, deleted, rid) of the current row.
        let current: Option<(i64, i64, i64)> = if kind == WriteKind::Fresh {
            None
        } else {
            match tx
                .fetch(&q, &[Bind::S(rt.clone()), Bind::S(id.clone())])
                .await?
                .first()
            {
                Some(r) => Some((int(r, 0)?, int(r, 1)?, int(r, 2)?)),
                None => None,
            }
        };
        if let Some(expected) = if_match {
            let cur = current.map(|c| c.0).unwrap_or(0);
            if cur != expected {
                return Err(StoreError::VersionConflict { current: cur });
            }
        }
        if delete && current.map(|c| c.1 == 1).unwrap_or(true) {
            // Nothing to delete (absent or already deleted).
            return Ok(Stored {
                resource_type: rt,
                id,
                version: current.map(|c| c.0).unwrap_or(0),
                last_updated: String::new(),
                deleted: false,
                resource: None,
                text: None,
            });
        }
        let version = current.map(|c| c.0).unwrap_or(0) + 1;
        let last_updated = stamp_time(now);
        let lu_ms = now.timestamp_millis();
        let body = if delete {
            None
        } else if let Some(b) = prepared {
            Some(b)
        } else {
            stamp(resource, version, &last_updated);
            Some(serde_json::to_string(&*resource)?)
        };
        if let Some((old_version, 0, old_rid)) = current {
            // The version being replaced keeps its body, now in the history.
            let keep = self.sql(
                "UPDATE history SET body = (SELECT body FROM resources WHERE rid = ?) \
                 WHERE rtype = ? AND id = ? AND version = ? AND body IS NULL",
            );
            tx.execute(
                &keep,
                &[
                    Bind::I(old_rid),
                    Bind::S(rt.clone()),
                    Bind::S(id.clone()),
                    Bind::I(old_version),
                ],
            )
            .await?;
        }
        // A row of `resources` or `history` (same columns) for this version.
        let version_row = |body: Option<String>| {
            vec![
                Bind::S(rt.clone()),
                Bind::S(id.clone()),
                Bind::I(version),
                Bind::S(last_updated.clone()),
                Bind::I(lu_ms),
                Bind::I(delete as i64),
                Bind::O(body),
            ]
        };
        let rid = if kind == WriteKind::Fresh {
            pending.fresh.push(version_row(body));
            None
        } else {
            let upsert = self.sql(
                "INSERT INTO resources (rtype, id, version, last_updated, lu_ms, deleted, body) VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (rtype, id) DO UPDATE SET version = excluded.version, last_updated = excluded.last_updated, lu_ms = excluded.lu_ms, deleted = excluded.deleted, body = excluded.body RETURNING rid",
            );
            let rows = tx.fetch(&upsert, &version_row(body)).await?;
            Some(int(rows.first().map(Vec::as_slice).unwrap_or_default(), 0)?)
        };
        // The current version's body is in `resources` only; the history gets it when the
        // version is replaced (above), so a create writes its body once.
        pending.history.push(version_row(None));
        // The previous version's index rows: in the database (pending rows of this resource
        // were flushed above).
        if let Some((_, _, old_rid)) = current {
            self.delete_index_rows(tx, old_rid).await?;
        }
        if !delete {
            pending.owners.push(OwnedRows {
                rt: rt.clone(),
                id: id.clone(),
                rid,
                rows: index_rows,
            });
        }
        Ok(Stored {
            resource_type: rt,
            id,
            version,
            last_updated,
            deleted: delete,
            resource: None,
            text: None,
        })
    }
}

/// How long the SQLite writer waits for writes still being prepared when its batch holds fewer
/// than [`GATHER_OPS`] resources. Each commit writes every page it touched once, so resources
/// sharing a commit share those writes: with 16 clients a batch held 4.5 requests (269
/// resources) and cost 46 KB written per resource; with 32 clients, 38 KB and a fifth less CPU.
/// Like PostgreSQL's `commit_delay` it only waits when others are on their way, so a lone
/// write never waits; and only for bulk loads the writer holds up (transactions of at least
/// [`GATHER_BULK`] resources, the next one queued before the writer asked for it). Registration's
/// small bundles, whose validation outlasts a commit, lost throughput to the wait.
pub(crate) const GATHER_WAIT: std::time::Duration = std::time::Duration::from_millis(4);
/// A writer that waited less than this for its first write is what writes wait on.
const WRITER_BOUND: std::time::Duration = std::time::Duration::from_micros(200);
/// The transaction size from which a write counts as part of a bulk load.
const GATHER_BULK: usize = 32;
/// The batch size past which the writer stops waiting.
const GATHER_OPS: usize = 600;
/// How often the waiting writer looks again at the writes being prepared.
const GATHER_POLL: std::time::Duration = std::time::Duration::from_micros(500);

/// Counts a write as being prepared for as long as it lives.
struct Preparing<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Preparing<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Preparing(n)
    }
}

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `meta.lastUpdated` of a write at `now`.
fn stamp_time(now: chrono::DateTime<chrono::Utc>) -> String {
    now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Sets `meta.versionId` and `meta.lastUpdated` of a resource about to be stored.
fn stamp(resource: &mut Value, version: i64, last_updated: &str) {
    let meta = resource.as_object_mut().map(|o| {
        o.entry("meta")
            .or_insert_with(|| Value::Object(Default::default()))
    });
    if let Some(Value::Object(m)) = meta {
        m.insert("versionId".into(), Value::String(version.to_string()));
        m.insert(
            "lastUpdated".into(),
            Value::String(last_updated.to_string()),
        );
    }
}

/// Moves the written resources (their `meta` set by [`Store::write`]) into the answers, which
/// [`Store::apply_ops`] returns one per op and in order.
fn attach(ops: Vec<WriteOp>, mut out: Vec<Stored>) -> Vec<Stored> {
    for (op, st) in ops.into_iter().zip(out.iter_mut()) {
        match op {
            WriteOp::Create { resource, .. }
            | WriteOp::CreateWithId { resource }
            | WriteOp::Update { resource, .. } => st.resource = Some(resource),
            WriteOp::Delete { .. } => {}
        }
    }
    out
}

impl Store {
    /// Erases resources for good — the current row, its index rows and every version in the
    /// history — in one transaction. Unlike a FHIR delete, nothing remains to read back: for
    /// retention periods that have run out. Absent resources are skipped; returns how many went.
    pub async fn purge(&self, keys: &[(&str, &str)]) -> Result<usize, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        // By type and 500 ids: a statement per table and page, not per table and resource.
        let mut by_type: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for (rt, id) in keys {
            by_type.entry(*rt).or_default().push(*id);
        }
        let _serial = self.writer_lock().await;
        let mut tx = self.begin_write().await?;
        let mut n = 0;
        for (rt, ids) in by_type {
            for chunk in ids.chunks(500) {
                let marks = vec!["?"; chunk.len()].join(", ");
                let binds: Vec<Bind> = std::iter::once(Bind::S(rt.to_string()))
                    .chain(chunk.iter().map(|id| Bind::S(id.to_string())))
                    .collect();
                let found = tx
                    .fetch(
                        &self.sql(&format!(
                            "SELECT rid FROM resources WHERE rtype = ? AND id IN ({marks})"
                        )),
                        &binds,
                    )
                    .await?;
                let rids = found
                    .iter()
                    .map(|r| int(r, 0))
                    .collect::<Result<Vec<_>, _>>()?;
                if rids.is_empty() {
                    continue;
                }
                self.delete_index_rows_of(&mut tx, &rids).await?;
                for table in ["resources", "history"] {
                    let del = self.sql(&format!(
                        "DELETE FROM {table} WHERE rtype = ? AND id IN ({marks})"
                    ));
                    tx.execute(&del, &binds).await?;
                }
                n += rids.len();
            }
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Rebuilds the search index of every current resource from its stored body (after a schema
    /// change or new SearchParameters), a page at a time, each page in its own transaction.
    pub async fn reindex(&self) -> Result<u64, StoreError> {
        self.reindex_some(None).await
    }

    /// [`Store::reindex`] for the current resources of some types only.
    pub async fn reindex_types(&self, types: &[String]) -> Result<u64, StoreError> {
        let mut n = 0;
        for t in types {
            n += self.reindex_some(Some(t)).await?;
        }
        Ok(n)
    }

    async fn reindex_some(&self, rtype: Option<&str>) -> Result<u64, StoreError> {
        let (mut after, mut n) = (0i64, 0u64);
        while let Some(page) = self.reindex_page(rtype, after, false).await? {
            after = page.last_rid;
            n += page.reindexed;
        }
        Ok(n)
    }

    /// Reindexes the next page (500) of current resources (of `rtype`, or all) after row id
    /// `after`; `None` when there are none. With `progress`, the page's last row id is recorded
    /// in `kz_meta` in the page's own transaction, so a reindex in the background resumes after
    /// the last page it finished. A resource written since its body was read (a newer version,
    /// or deleted) is left alone: that write gave it rows from its own body.
    pub(crate) async fn reindex_page(
        &self,
        rtype: Option<&str>,
        after: i64,
        progress: bool,
    ) -> Result<Option<ReindexedPage>, StoreError> {
        use sqlx::Row;
        let q = self.sql(match rtype {
            None => "SELECT rid, rtype, id, version, body FROM resources WHERE deleted = 0 AND rid > ? ORDER BY rid LIMIT 500",
            Some(_) => "SELECT rid, rtype, id, version, body FROM resources WHERE rtype = ? AND deleted = 0 AND rid > ? ORDER BY rid LIMIT 500",
        });
        let mut query = sqlx::query(&q);
        if let Some(t) = rtype {
            query = query.bind(t);
        }
        let rows = query.bind(after).fetch_all(self.pool()).await?;
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        let last_rid: i64 = last.try_get(0)?;
        let mut extracted = Vec::with_capacity(rows.len());
        for r in &rows {
            let rid: i64 = r.try_get(0)?;
            let rt: String = r.try_get(1)?;
            let id: String = r.try_get(2)?;
            let version: i64 = r.try_get(3)?;
            let body: Option<String> = r.try_get(4)?;
            let idx = match body.map(|b| serde_json::from_str::<Value>(&b)) {
                Some(Ok(v)) => self.index_rows_of(&v),
                // Never written so; a damaged row must not stop the reindex of the others.
                Some(Err(e)) => {
                    tracing::error!(rid, error = %e, "stored body is not JSON; its index rows are left as they were");
                    continue;
                }
                None => Vec::new(),
            };
            extracted.push((rid, version, rt, id, idx));
        }
        let keys: Vec<(&str, &str)> = extracted
            .iter()
            .flat_map(|(_, _, rt, _, idx)| idx.iter().map(move |(p, _)| (rt.as_str(), p.as_str())))
            .collect();
        self.ensure_params(&keys).await?;
        let _serial = self.writer_lock().await;
        let mut tx = self.begin_write().await?;
        // The versions now, under the write lock (PostgreSQL: locked until the commit).
        let marks = vec!["?"; extracted.len()].join(", ");
        let lock_rows = match self.backend() {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        let now: Vec<Vec<Bind>> = if extracted.is_empty() {
            Vec::new()
        } else {
            tx.fetch(
                &self.sql(&format!(
                    "SELECT rid, version FROM resources WHERE deleted = 0 AND rid IN ({marks}){lock_rows}"
                )),
                &extracted.iter().map(|e| Bind::I(e.0)).collect::<Vec<_>>(),
            )
            .await?
        };
        let current: std::collections::HashSet<(i64, i64)> = now
            .iter()
            .filter_map(|r| match r.as_slice() {
                [Bind::I(rid), Bind::I(v)] => Some((*rid, *v)),
                _ => None,
            })
            .collect();
        let mut pending = PendingRows::default();
        for (rid, version, rt, id, idx) in extracted {
            if !current.contains(&(rid, version)) {
                continue;
            }
            let rows = self.resolve_rows(&rt, idx);
            pending.owners.push(OwnedRows {
                rt,
                id,
                rid: Some(rid),
                rows,
            });
        }
        let rids: Vec<i64> = pending.owners.iter().filter_map(|o| o.rid).collect();
        self.delete_index_rows_of(&mut tx, &rids).await?;
        let reindexed = pending.owners.len() as u64;
        self.flush(&mut tx, pending).await?;
        if progress {
            self.set_meta(&mut tx, crate::reindex::AFTER_KEY, &last_rid.to_string())
                .await?;
        }
        tx.commit().await?;
        Ok(Some(ReindexedPage {
            last_rid,
            reindexed,
        }))
    }

    /// Sets a `kz_meta` value inside a write transaction.
    pub(crate) async fn set_meta(
        &self,
        tx: &mut WriteTx<'_>,
        key: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        let upsert = self.sql(crate::schema::META_UPSERT);
        tx.execute(
            &upsert,
            &[Bind::S(key.to_string()), Bind::S(value.to_string())],
        )
        .await?;
        Ok(())
    }
}

/// One page of a reindex ([`Store::reindex_page`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReindexedPage {
    /// The page's last row id: where the next page starts.
    pub(crate) last_rid: i64,
    /// Resources given new rows (those written since the page was read are skipped).
    pub(crate) reindexed: u64,
}

/// Rows in the next SQLite insert statement: 64 while that many remain, then the largest power of
/// two that fits, so every table has at most seven statement shapes for the cache to keep.
fn sqlite_chunk(remaining: usize) -> usize {
    const MAX: usize = 64;
    if remaining >= MAX {
        MAX
    } else {
        1 << (usize::BITS - 1 - remaining.leading_zeros())
    }
}

/// Rewrites `reference` values that name a Bundle `fullUrl` to the stored `Type/id`.
fn rewrite_refs(v: &mut Value, map: &[(String, String)]) {
    if map.is_empty() {
        return;
    }
    kizuna_fhir::for_each_reference(v, &mut |r| {
        if let Some((_, to)) = map.iter().find(|(from, _)| from == r) {
            *r = to.clone();
        }
    });
}

/// Upkeep on the writer holds every waiting write: a slow one is logged with its duration, so a
/// latency spike under load can be traced to it (or ruled out).
fn slow_upkeep(what: &'static str, started: std::time::Instant) {
    let ms = started.elapsed().as_millis();
    if ms >= 50 {
        tracing::info!(what, ms, "SQLite upkeep held the writer");
    }
}

/// When planner statistics are refreshed: after 1,000 writes, then each time the store has taken
/// as many writes again as it had (at most 200,000 apart), so a growing store gets them early and a
/// large one is not re-analysed for nothing.
#[derive(Debug)]
pub(crate) struct StatsSchedule {
    written: AtomicUsize,
    next: AtomicUsize,
    running: AtomicBool,
}

impl Default for StatsSchedule {
    fn default() -> Self {
        StatsSchedule {
            written: AtomicUsize::new(0),
            next: AtomicUsize::new(1000),
            running: AtomicBool::new(false),
        }
    }
}

impl StatsSchedule {
    /// Counts `n` writes; true for the one caller whose writes crossed the next threshold.
    pub(crate) fn due(&self, n: usize) -> bool {
        let total = self.written.fetch_add(n, Ordering::AcqRel) + n;
        let next = self.next.load(Ordering::Acquire);
        total >= next
            && self
                .next
                .compare_exchange(
                    next,
                    total + total.min(200_000),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }
}

#[cfg(test)]
mod chunk_tests {
    use super::sqlite_chunk;
    use proptest::prelude::*;

    proptest! {
        /// Any row count is covered exactly by chunks of at most seven sizes, powers of two up to 64.
        #[test]
        fn chunks_cover_every_row_with_few_shapes(n in 1usize..100_000) {
            let (mut left, mut sizes) = (n, std::collections::BTreeSet::new());
            while left > 0 {
                let c = sqlite_chunk(left);
                prop_assert!(c >= 1 && c <= left && c <= 64 && c.is_power_of_two());
                sizes.insert(c);
                left -= c;
            }
            prop_assert!(sizes.len() <= 7);
        }
    }
}

#[cfg(test)]
mod stats_schedule_tests {
    use super::StatsSchedule;

    #[test]
    fn fires_at_1000_then_at_doubling_intervals_capped_at_200k() {
        let s = StatsSchedule::default();
        let mut fired = Vec::new();
        let mut total = 0usize;
        for _ in 0..2_000_000 / 250 {
            total += 250;
            if s.due(250) {
                fired.push(total);
            }
        }
        assert_eq!(&fired[..5], &[1000, 2000, 4000, 8000, 16000]);
        let gaps: Vec<usize> = fired.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g <= 200_000), "{gaps:?}");
        assert_eq!(gaps.last(), Some(&200_000));
    }
}

#[cfg(test)]
mod preparing_tests {
    use super::Preparing;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_write_is_counted_as_preparing_until_its_guard_goes_even_on_an_early_return() {
        let n = AtomicUsize::new(0);
        let a = Preparing::new(&n);
        let b = Preparing::new(&n);
        assert_eq!(n.load(Ordering::Acquire), 2);
        drop(a);
        assert_eq!(n.load(Ordering::Acquire), 1);
        let failing = || -> Result<(), ()> {
            let _g = Preparing::new(&n);
            assert_eq!(n.load(Ordering::Acquire), 2);
            let refused: Result<(), ()> = Err(());
            refused?;
            Ok(())
        };
        assert!(failing().is_err());
        assert_eq!(n.load(Ordering::Acquire), 1);
        drop(b);
        assert_eq!(n.load(Ordering::Acquire), 0);
    }
}

#[cfg(test)]
mod shared_commit_tests {
    use crate::{Store, StoreError, WriteOp};
    use serde_json::json;

    /// A batch the SQLite group commit gathered with a failing write in it is run again one
    /// write at a time: the others are stored with every index row (made again, since the
    /// shared attempt used them), the failing one changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_shared_commit_stores_the_others_with_their_rows() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let url = format!("sqlite://{}", d.path().join("k.db").display());
        let s = Store::open(&url, kizuna_fhir::Registry::builtin())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let target = s
            .create(json!({"resourceType": "Patient", "gender": "unknown"}))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // The parameters get ids first (that takes the lock too).
        s.create(json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "urn:x", "code": "first"}]}, "valueQuantity": {"value": 1}}))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // While the lock is held the writer cannot commit: writes queue and are gathered into
        // one batch when it is released.
        let held = s.writer_lock().await;
        let mut tasks = Vec::new();
        for w in 0..8 {
            let s = s.clone();
            let target = target.id.clone();
            tasks.push(tokio::spawn(async move {
                if w == 5 {
                    // After the others, so the stale write is not alone in the first batch.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    let stale = json!({"resourceType": "Patient", "id": target, "gender": "male"});
                    return s.update(stale, Some(9)).await.map(|_| 0);
                }
                let ops = (0..30)
                    .map(|i| WriteOp::Create {
                        resource: json!({"resourceType": "Observation", "status": "final",
                            "code": {"coding": [{"system": "urn:x", "code": format!("w{w}")}]},
                            "valueQuantity": {"value": i}}),
                        full_url: None,
                    })
                    .collect();
                s.transaction(ops).await.map(|v| v.len())
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        drop(held);
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap_or_else(|e| panic!("{e}")));
        }
        for (w, r) in results.iter().enumerate() {
            match (w, r) {
                (5, Err(StoreError::VersionConflict { current: 1 })) => {}
                (5, other) => panic!("the stale write: {other:?}"),
                (_, Ok(30)) => {}
                (_, other) => panic!("write {w}: {other:?}"),
            }
        }
        let count = |q: String| {
            let s = s.clone();
            async move {
                let p: Vec<(String, String)> = q
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                s.search_ids("Observation", &crate::SearchQuery::from_pairs(&p))
                    .await
                    .map(|v| v.len())
                    .unwrap_or_else(|e| panic!("{q}: {e}"))
            }
        };
        for w in (0..8).filter(|w| *w != 5) {
            assert_eq!(count(format!("code=urn:x|w{w}")).await, 30, "w{w}");
            assert_eq!(
                count(format!("code-value-quantity=urn:x|w{w}$lt10")).await,
                10,
                "w{w}"
            );
        }
        let p = s
            .read("Patient", &target.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .and_then(|x| x.resource)
            .unwrap_or_default();
        assert_eq!(
            (p["gender"].as_str(), p["meta"]["versionId"].as_str()),
            (Some("unknown"), Some("1"))
        );
    }
}
