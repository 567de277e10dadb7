//! # kizuna-store
//!
//! The versioned FHIR resource store: every write is a new version kept in the history, the current
//! version is searchable through index tables filled from the SearchParameter definitions, and a
//! transaction of many writes commits atomically or not at all.
//!
//! One implementation serves both backends through sqlx's `Any` driver: SQLite (bundled, WAL) is the
//! zero-setup default in `./kizuna-data/`, PostgreSQL is for production. The same test suite runs on both.

pub mod compartment;
pub mod include;
pub mod index;
pub mod scan;
pub mod search;

use std::sync::Arc;

use kizuna_fhir::Registry;
use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};

pub use compartment::PatientCompartment;
pub use include::Include;
pub use index::{IndexValue, Indexer, ParamType};
pub use scan::{CompartmentScope, ScanFilter, ScannedRow};
pub use search::{SearchParamValue, SearchQuery, SearchResult, SortSpec, Total};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("データベースエラー / database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored body could not be read.
    #[error("保存データが不正です / stored JSON is corrupt: {0}")]
    Json(#[from] serde_json::Error),
    /// The resource has no `resourceType`.
    #[error("resourceType がありません / resource has no resourceType")]
    NoResourceType,
    /// If-Match did not match the current version.
    #[error("版が一致しません (現在 {current}) / version conflict: current version is {current}")]
    VersionConflict {
        /// The current version.
        current: i64,
    },
    /// The resource was deleted.
    #[error("削除済みです / resource {0} was deleted")]
    Gone(String),
    /// A search parameter the type does not have.
    #[error("不明な検索パラメータ / unknown search parameter {0}")]
    UnknownParameter(String),
    /// A search value that does not fit its parameter type.
    #[error("検索値が不正です / invalid search value for {param}: {value}")]
    BadSearchValue {
        /// Parameter.
        param: String,
        /// Value.
        value: String,
    },
    /// Another writer changed the same resource at the same moment; the whole write was rolled back
    /// and may be retried.
    #[error(
        "同時に更新されました。再試行してください / concurrent write to the same resource; retry"
    )]
    Concurrent,
    /// The database URL is not SQLite or PostgreSQL.
    #[error("未対応のデータベース URL / unsupported database URL (use sqlite:// or postgres://)")]
    UnsupportedUrl,
}

/// Which SQL dialect the pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite (embedded default).
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// One stored version of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// Resource type.
    pub resource_type: String,
    /// Id.
    pub id: String,
    /// Version (1, 2, …).
    pub version: i64,
    /// `meta.lastUpdated` of this version.
    pub last_updated: String,
    /// True for a deletion marker.
    pub deleted: bool,
    /// The resource with `id` and `meta.versionId`/`meta.lastUpdated` set (absent when deleted).
    pub resource: Option<Value>,
}

/// One write of a transaction.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Create with a server-assigned id; `full_url` (`urn:uuid:…`) is what other entries may reference.
    Create {
        /// The resource.
        resource: Value,
        /// Its `fullUrl` in the Bundle, if any.
        full_url: Option<String>,
    },
    /// Create with the id the resource carries, which the caller took from [`new_id`] (so it is new):
    /// for callers that rewrite references between entries themselves.
    CreateWithId {
        /// The resource, `id` set.
        resource: Value,
    },
    /// Create or update at a known id, optionally only if the current version matches.
    Update {
        /// The resource (its `id` must be set).
        resource: Value,
        /// If-Match version.
        if_match: Option<i64>,
    },
    /// Delete (a no-op if absent).
    Delete {
        /// Type.
        resource_type: String,
        /// Id.
        id: String,
    },
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS kz_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS resources (rtype TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL, last_updated TEXT NOT NULL, lu_ms BIGINT NOT NULL, deleted BIGINT NOT NULL, body TEXT, PRIMARY KEY (rtype, id))",
    "CREATE TABLE IF NOT EXISTS history (rtype TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL, last_updated TEXT NOT NULL, lu_ms BIGINT NOT NULL, deleted BIGINT NOT NULL, body TEXT, PRIMARY KEY (rtype, id, version))",
    "CREATE INDEX IF NOT EXISTS history_lu ON history (lu_ms)",
    "CREATE INDEX IF NOT EXISTS resources_lu ON resources (rtype, lu_ms)",
    "CREATE TABLE IF NOT EXISTS idx_token (rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, system TEXT NOT NULL, code TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_token_q ON idx_token (rtype, param, code)",
    "DROP INDEX IF EXISTS idx_token_r",
    "CREATE INDEX IF NOT EXISTS idx_token_rp ON idx_token (rtype, id, param)",
    "CREATE TABLE IF NOT EXISTS idx_string (rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, norm TEXT NOT NULL, exact TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_string_q ON idx_string (rtype, param, norm)",
    "DROP INDEX IF EXISTS idx_string_r",
    "CREATE INDEX IF NOT EXISTS idx_string_rp ON idx_string (rtype, id, param)",
    "CREATE TABLE IF NOT EXISTS idx_date (rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, lo BIGINT NOT NULL, hi BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_date_q ON idx_date (rtype, param, lo)",
    "DROP INDEX IF EXISTS idx_date_r",
    "CREATE INDEX IF NOT EXISTS idx_date_rp ON idx_date (rtype, id, param)",
    "CREATE TABLE IF NOT EXISTS idx_reference (rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, ttype TEXT NOT NULL, tid TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_reference_q ON idx_reference (rtype, param, tid)",
    "DROP INDEX IF EXISTS idx_reference_r",
    "CREATE INDEX IF NOT EXISTS idx_reference_rp ON idx_reference (rtype, id, param)",
    "CREATE TABLE IF NOT EXISTS idx_number (rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, val DOUBLE PRECISION NOT NULL)",
    "DROP INDEX IF EXISTS idx_number_r",
    "CREATE INDEX IF NOT EXISTS idx_number_rp ON idx_number (rtype, id, param)",
    "CREATE INDEX IF NOT EXISTS idx_number_q ON idx_number (rtype, param, val)",
    "CREATE TABLE IF NOT EXISTS idx_uri (rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, val TEXT NOT NULL)",
    "DROP INDEX IF EXISTS idx_uri_r",
    "CREATE INDEX IF NOT EXISTS idx_uri_rp ON idx_uri (rtype, id, param)",
    "CREATE INDEX IF NOT EXISTS idx_uri_q ON idx_uri (rtype, param, val)",
    "CREATE TABLE IF NOT EXISTS idx_quantity (rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, val DOUBLE PRECISION NOT NULL, system TEXT NOT NULL, code TEXT NOT NULL, unit TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_quantity_q ON idx_quantity (rtype, param, val)",
    "DROP INDEX IF EXISTS idx_quantity_r",
    "CREATE INDEX IF NOT EXISTS idx_quantity_rp ON idx_quantity (rtype, id, param)",
    "CREATE TABLE IF NOT EXISTS idx_composite (rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, \
     c0_s1 TEXT, c0_s2 TEXT, c0_s3 TEXT, c0_n1 DOUBLE PRECISION, c0_n2 DOUBLE PRECISION, \
     c1_s1 TEXT, c1_s2 TEXT, c1_s3 TEXT, c1_n1 DOUBLE PRECISION, c1_n2 DOUBLE PRECISION, \
     c2_s1 TEXT, c2_s2 TEXT, c2_s3 TEXT, c2_n1 DOUBLE PRECISION, c2_n2 DOUBLE PRECISION)",
    "CREATE INDEX IF NOT EXISTS idx_composite_q ON idx_composite (rtype, param, c0_s2)",
    "DROP INDEX IF EXISTS idx_composite_r",
    "CREATE INDEX IF NOT EXISTS idx_composite_rp ON idx_composite (rtype, id, param)",
    // `_has`, `$everything` and compartment exports look references up by their target.
    "CREATE INDEX IF NOT EXISTS idx_reference_t ON idx_reference (tid, ttype)",
];

/// PostgreSQL only: its `LIKE 'prefix%'` uses a B-tree only with pattern operators.
const SCHEMA_POSTGRES: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS idx_string_p ON idx_string (rtype, param, norm text_pattern_ops)",
];

/// How many components a composite parameter may have (R4 has two or three).
pub const COMPOSITE_PARTS: usize = 3;

/// Turns the database's "someone else wrote this first" answers into [`StoreError::Concurrent`]:
/// a duplicate key (two creates of one id), PostgreSQL serialization failure or deadlock, SQLite busy.
fn concurrent_or_db(e: StoreError) -> StoreError {
    if let StoreError::Db(sqlx::Error::Database(d)) = &e {
        let code = d.code();
        let code = code.as_deref().unwrap_or("");
        if d.is_unique_violation() || matches!(code, "40001" | "40P01" | "5" | "517" | "6") {
            return StoreError::Concurrent;
        }
    }
    e
}

/// The current schema version (recorded in `kz_meta`). Version 2 added quantity and composite
/// tables and the `:text`/`:of-type`/`:identifier` rows (opening an older store re-indexes it);
/// version 3 keys the per-resource index lookups by (type, id, parameter), so a parameter probed
/// per candidate is found by three equalities rather than by a range over the parameter's values.
pub const SCHEMA_VERSION: &str = "3";

/// The first schema version whose index rows are complete.
const INDEX_ROWS_SINCE: u32 = 2;

/// The store: a connection pool, the dialect, and the index definitions.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// SQLite has one writer: queueing in-process writers here is fairer and faster than letting
    /// them sleep in SQLite's busy handler. (Other processes still wait on `busy_timeout`.)
    sqlite_writer: Arc<tokio::sync::Mutex<()>>,
    backend: Backend,
    registry: &'static Registry,
    indexer: Arc<Indexer>,
    compartment: Arc<PatientCompartment>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish()
    }
}

/// A new resource id: 32 hex digits, time-ordered like UUIDv7 — 12 digits of milliseconds, 4 of a
/// per-process sequence, 16 random. Ordered ids land at the right edge of every `(rtype, id)`
/// B-tree, so a commit dirties a few pages instead of one per row (random ids made ingest
/// several times slower); the random tail keeps ids from different processes apart.
pub fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ms = now.as_millis() as u64 & 0xFFFF_FFFF_FFFF;
    let mut z = (now.as_nanos() as u64)
        ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (std::process::id() as u64).rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    format!("{ms:012x}{:04x}{:016x}", n & 0xFFFF, z ^ (z >> 31))
}

impl Store {
    /// Opens a store (`sqlite://path/to/file.db` or `postgres://…`) and migrates it.
    pub async fn open(url: &str, registry: &'static Registry) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let url = if backend == Backend::Sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
        } else {
            url.to_string()
        };
        let mut opts =
            AnyPoolOptions::new().max_connections(if backend == Backend::Sqlite { 4 } else { 16 });
        if backend == Backend::Sqlite {
            opts = opts.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode=WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous=NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    // A 64 MB page cache and memory-mapped reads: the index B-trees of a busy
                    // store do not fit the 2 MB default, and every miss is a read syscall.
                    sqlx::query("PRAGMA cache_size=-65536")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA mmap_size=1073741824")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout=10000")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA foreign_keys=ON")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        }
        let pool = opts.connect(&url).await?;
        let store = Store {
            pool,
            sqlite_writer: Arc::new(tokio::sync::Mutex::new(())),
            backend,
            registry,
            indexer: Arc::new(Indexer::new(registry)),
            compartment: Arc::new(PatientCompartment::from_registry(registry)),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&mut *tx).await?;
        }
        if self.backend == Backend::Postgres {
            for stmt in SCHEMA_POSTGRES {
                sqlx::query(stmt).execute(&mut *tx).await?;
            }
        }
        let before: Option<String> =
            sqlx::query(&self.sql("SELECT value FROM kz_meta WHERE key = ?"))
                .bind("schema_version")
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
        let upsert = self.sql("INSERT INTO kz_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value");
        sqlx::query(&upsert)
            .bind("schema_version")
            .bind(SCHEMA_VERSION)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let before_n: Option<u32> = before.as_deref().and_then(|v| v.parse().ok());
        if before_n.is_some_and(|v| v < INDEX_ROWS_SINCE) {
            let n = self.reindex().await?;
            tracing::info!(resources = n, from = ?before, "search index rebuilt for the new schema");
        }
        Ok(())
    }

    /// Rebuilds the search index of every current resource from its stored body (after a schema
    /// change or new SearchParameters), a page at a time, each page in its own transaction.
    pub async fn reindex(&self) -> Result<u64, StoreError> {
        let mut after: (String, String) = (String::new(), String::new());
        let mut n = 0u64;
        loop {
            let q = self.sql(
                "SELECT rtype, id, body FROM resources WHERE deleted = 0 AND (rtype > ? OR (rtype = ? AND id > ?)) ORDER BY rtype, id LIMIT 500",
            );
            let rows = sqlx::query(&q)
                .bind(&after.0)
                .bind(&after.0)
                .bind(&after.1)
                .fetch_all(&self.pool)
                .await?;
            let Some(last) = rows.last() else {
                return Ok(n);
            };
            after = (last.try_get(0)?, last.try_get(1)?);
            let mut pending = PendingRows::default();
            let mut keys = Vec::with_capacity(rows.len());
            for r in &rows {
                let rt: String = r.try_get(0)?;
                let id: String = r.try_get(1)?;
                let body: Option<String> = r.try_get(2)?;
                if let Some(b) = body {
                    let v: Value = serde_json::from_str(&b)?;
                    for (param, iv) in self.indexer.extract(self.registry, &v) {
                        if param != "_lastUpdated" {
                            pending.push_index(&rt, &id, param, iv);
                        }
                    }
                }
                keys.push((rt, id));
            }
            let _serial = match self.backend {
                Backend::Sqlite => Some(self.sqlite_writer.lock().await),
                Backend::Postgres => None,
            };
            let mut tx = self.begin_write().await?;
            for (rt, id) in &keys {
                for table in INDEX_TABLES {
                    let del = self.sql(&format!("DELETE FROM {table} WHERE rtype = ? AND id = ?"));
                    sqlx::query(&del)
                        .bind(rt)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            self.flush(&mut tx, pending).await?;
            tx.commit().await?;
            n += keys.len() as u64;
        }
    }

    /// Runs one statement (administration and tests).
    pub async fn execute_raw(&self, sql: &str) -> Result<(), StoreError> {
        sqlx::query(sql).execute(&self.pool).await?;
        Ok(())
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The index definitions.
    pub fn indexer(&self) -> &Indexer {
        &self.indexer
    }

    /// The Patient compartment definition.
    pub fn compartment(&self) -> &PatientCompartment {
        &self.compartment
    }

    /// The registry.
    pub fn registry(&self) -> &'static Registry {
        self.registry
    }

    /// Rewrites `?` placeholders for PostgreSQL (`$1`, `$2` …).
    pub(crate) fn sql(&self, q: &str) -> String {
        if self.backend == Backend::Sqlite {
            return q.to_string();
        }
        let mut out = String::with_capacity(q.len() + 16);
        let mut n = 0;
        let mut in_str = false;
        for c in q.chars() {
            match c {
                '\'' => {
                    in_str = !in_str;
                    out.push(c)
                }
                '?' if !in_str => {
                    n += 1;
                    out.push_str(&format!("${n}"));
                }
                c => out.push(c),
            }
        }
        out
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

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
        // Assign ids to creates first, so references between entries can be rewritten.
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

    async fn apply(&self, ops: Vec<WriteOp>) -> Result<Vec<Stored>, StoreError> {
        let now = chrono::Utc::now();
        // Index extraction (FHIRPath over every SearchParameter) is the CPU-heavy part of a
        // write: done before taking the write lock, so one writer computes while another writes.
        let rows: Vec<Vec<(String, IndexValue)>> = ops
            .iter()
            .map(|op| match op {
                WriteOp::Create { resource, .. }
                | WriteOp::CreateWithId { resource }
                | WriteOp::Update { resource, .. } => self
                    .indexer
                    .extract(self.registry, resource)
                    .into_iter()
                    // Searched on the resources table; the client's meta value would be stale.
                    .filter(|(p, _)| p != "_lastUpdated")
                    .collect(),
                WriteOp::Delete { .. } => Vec::new(),
            })
            .collect();
        let _serial = match self.backend {
            Backend::Sqlite => Some(self.sqlite_writer.lock().await),
            Backend::Postgres => None,
        };
        let mut tx = self.begin_write().await?;
        let mut out = Vec::with_capacity(ops.len());
        let mut pending = PendingRows::default();
        for (op, index_rows) in ops.into_iter().zip(rows) {
            let w = Write {
                pending: &mut pending,
                index_rows,
                now,
            };
            let stored = match op {
                // `transaction` gave every create a new random id: nothing to look up or replace.
                WriteOp::Create { resource, .. } | WriteOp::CreateWithId { resource } => {
                    self.write(&mut tx, w, resource, None, WriteKind::Fresh)
                        .await?
                }
                WriteOp::Update { resource, if_match } => {
                    self.write(&mut tx, w, resource, if_match, WriteKind::Upsert)
                        .await?
                }
                WriteOp::Delete { resource_type, id } => {
                    let stub = serde_json::json!({"resourceType": resource_type, "id": id});
                    self.write(&mut tx, w, stub, None, WriteKind::Delete)
                        .await?
                }
            };
            out.push(stored);
        }
        self.flush(&mut tx, pending).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Starts a write transaction. SQLite takes the write lock up front (`BEGIN IMMEDIATE`), so a
    /// reader turned writer never fails with `SQLITE_BUSY_SNAPSHOT` and waits on `busy_timeout`
    /// instead; PostgreSQL locks rows as it reads them (`FOR UPDATE` in [`Store::write`]).
    async fn begin_write(&self) -> Result<Transaction<'static, Any>, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Writes the rows of a transaction that nothing in the same transaction reads back (history and
    /// index rows) as multi-row INSERTs: one statement per table per few hundred rows instead of one
    /// per row, which is most of the cost of ingest.
    async fn flush(
        &self,
        tx: &mut Transaction<'_, Any>,
        pending: PendingRows,
    ) -> Result<(), StoreError> {
        // One statement per table: the rows travel as one JSON array parameter and the database
        // unpacks them (`json_each` / `json_array_elements`). Binding thousands of parameters one
        // by one through the driver cost three times what SQLite needs to insert the rows.
        for (table, cols, rows) in pending.by_table() {
            if rows.is_empty() {
                continue;
            }
            let types = column_types(table);
            let select: Vec<String> = types
                .iter()
                .enumerate()
                .map(|(i, t)| match (self.backend, *t) {
                    (Backend::Sqlite, _) => format!("value ->> {i}"),
                    (Backend::Postgres, "text") => format!("value ->> {i}"),
                    (Backend::Postgres, t) => format!("(value ->> {i})::{t}"),
                })
                .collect();
            let source = match self.backend {
                Backend::Sqlite => "json_each(?)",
                Backend::Postgres => "json_array_elements(CAST($1 AS json))",
            };
            let sql = format!(
                "INSERT INTO {table} ({cols}) SELECT {} FROM {source}",
                select.join(", ")
            );
            let payload = serde_json::to_string(rows)?;
            sqlx::query(&sql).bind(payload).execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn write(
        &self,
        tx: &mut Transaction<'_, Any>,
        w: Write<'_>,
        mut resource: Value,
        if_match: Option<i64>,
        kind: WriteKind,
    ) -> Result<Stored, StoreError> {
        let Write {
            pending,
            index_rows,
            now,
        } = w;
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
        let q = match self.backend {
            Backend::Sqlite => {
                self.sql("SELECT version, deleted FROM resources WHERE rtype = ? AND id = ?")
            }
            Backend::Postgres => self.sql(
                "SELECT version, deleted FROM resources WHERE rtype = ? AND id = ? FOR UPDATE",
            ),
        };
        let current: Option<(i64, i64)> = if kind == WriteKind::Fresh {
            None
        } else {
            sqlx::query(&q)
                .bind(&rt)
                .bind(&id)
                .fetch_optional(&mut **tx)
                .await?
                .map(|r: AnyRow| {
                    (
                        r.try_get::<i64, _>(0).unwrap_or(0),
                        r.try_get::<i64, _>(1).unwrap_or(0),
                    )
                })
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
            });
        }
        let version = current.map(|c| c.0).unwrap_or(0) + 1;
        let last_updated = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let lu_ms = now.timestamp_millis();
        let body = if delete {
            None
        } else {
            let meta = resource.as_object_mut().map(|o| {
                o.entry("meta")
                    .or_insert_with(|| Value::Object(Default::default()))
            });
            if let Some(Value::Object(m)) = meta {
                m.insert("versionId".into(), Value::String(version.to_string()));
                m.insert("lastUpdated".into(), Value::String(last_updated.clone()));
            }
            Some(serde_json::to_string(&resource)?)
        };
        if kind == WriteKind::Fresh {
            pending.resources.push(vec![
                Bind::S(rt.clone()),
                Bind::S(id.clone()),
                Bind::I(version),
                Bind::S(last_updated.clone()),
                Bind::I(lu_ms),
                Bind::I(0),
                Bind::O(body.clone()),
            ]);
        } else {
            let upsert = self.sql(
                "INSERT INTO resources (rtype, id, version, last_updated, lu_ms, deleted, body) VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (rtype, id) DO UPDATE SET version = excluded.version, last_updated = excluded.last_updated, lu_ms = excluded.lu_ms, deleted = excluded.deleted, body = excluded.body",
            );
            sqlx::query(&upsert)
                .bind(&rt)
                .bind(&id)
                .bind(version)
                .bind(&last_updated)
                .bind(lu_ms)
                .bind(delete as i64)
                .bind(body.clone())
                .execute(&mut **tx)
                .await?;
        }
        pending.history.push(vec![
            Bind::S(rt.clone()),
            Bind::S(id.clone()),
            Bind::I(version),
            Bind::S(last_updated.clone()),
            Bind::I(lu_ms),
            Bind::I(delete as i64),
            Bind::O(body),
        ]);
        // Index rows of the previous version: in the database (if it was there before this
        // transaction) and possibly still pending (if this transaction wrote it earlier).
        if current.is_some() {
            pending.forget(&rt, &id);
            for table in INDEX_TABLES {
                let del = self.sql(&format!("DELETE FROM {table} WHERE rtype = ? AND id = ?"));
                sqlx::query(&del)
                    .bind(&rt)
                    .bind(&id)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        if !delete {
            for (param, v) in index_rows {
                pending.push_index(&rt, &id, param, v);
            }
        }
        Ok(Stored {
            resource_type: rt,
            id,
            version,
            last_updated,
            deleted: delete,
            resource: if delete { None } else { Some(resource) },
        })
    }

    /// Reads the current version; `Err(Gone)` when deleted, `Ok(None)` when never stored.
    pub async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Stored>, StoreError> {
        let q = self.sql(
            "SELECT version, last_updated, deleted, body FROM resources WHERE rtype = ? AND id = ?",
        );
        let row = sqlx::query(&q)
            .bind(resource_type)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            None => Ok(None),
            Some(r) => {
                let s = stored_from(resource_type, id, &r)?;
                if s.deleted {
                    Err(StoreError::Gone(format!("{resource_type}/{id}")))
                } else {
                    Ok(Some(s))
                }
            }
        }
    }

    /// Reads one version.
    pub async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<Stored>, StoreError> {
        let q = self.sql("SELECT version, last_updated, deleted, body FROM history WHERE rtype = ? AND id = ? AND version = ?");
        let row = sqlx::query(&q)
            .bind(resource_type)
            .bind(id)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| stored_from(resource_type, id, &r)).transpose()
    }

    /// History of an instance, a type (`id` None) or everything (`resource_type` None), newest first.
    pub async fn history(
        &self,
        resource_type: Option<&str>,
        id: Option<&str>,
        since_ms: Option<i64>,
        count: i64,
    ) -> Result<Vec<Stored>, StoreError> {
        let mut sql = String::from(
            "SELECT rtype, id, version, last_updated, deleted, body FROM history WHERE 1=1",
        );
        if resource_type.is_some() {
            sql.push_str(" AND rtype = ?");
        }
        if id.is_some() {
            sql.push_str(" AND id = ?");
        }
        if since_ms.is_some() {
            sql.push_str(" AND lu_ms >= ?");
        }
        sql.push_str(" ORDER BY lu_ms DESC, version DESC LIMIT ?");
        let q = self.sql(&sql);
        let mut query = sqlx::query(&q);
        if let Some(t) = resource_type {
            query = query.bind(t);
        }
        if let Some(i) = id {
            query = query.bind(i);
        }
        if let Some(s) = since_ms {
            query = query.bind(s);
        }
        let rows = query.bind(count).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let rt: String = r.try_get(0)?;
                let id: String = r.try_get(1)?;
                stored_from_offset(&rt, &id, r, 2)
            })
            .collect()
    }
}

enum Bind {
    S(String),
    /// A nullable text (deleted versions have no body).
    O(Option<String>),
    I(i64),
    F(f64),
}

/// The search index tables, in the order of [`PendingRows::index`].
pub(crate) const INDEX_TABLES: [&str; 8] = [
    "idx_token",
    "idx_string",
    "idx_date",
    "idx_reference",
    "idx_number",
    "idx_uri",
    "idx_quantity",
    "idx_composite",
];

const INDEX_COLUMNS: [&str; 8] = [
    "rtype, id, param, system, code",
    "rtype, id, param, norm, exact",
    "rtype, id, param, lo, hi",
    "rtype, id, param, ttype, tid",
    "rtype, id, param, val",
    "rtype, id, param, val",
    "rtype, id, param, val, system, code, unit",
    "rtype, id, param, c0_s1, c0_s2, c0_s3, c0_n1, c0_n2, c1_s1, c1_s2, c1_s3, c1_n1, c1_n2, c2_s1, c2_s2, c2_s3, c2_n1, c2_n2",
];

/// The SQL type of each column a table's rows are inserted with (PostgreSQL casts the JSON text).
fn column_types(table: &str) -> &'static [&'static str] {
    const T: &str = "text";
    const B: &str = "bigint";
    const F: &str = "double precision";
    match table {
        "resources" | "history" => &[T, T, B, T, B, B, T],
        "idx_date" => &[T, T, T, B, B],
        "idx_number" => &[T, T, T, F],
        "idx_uri" => &[T, T, T, T],
        "idx_quantity" => &[T, T, T, F, T, T, T],
        "idx_composite" => &[T, T, T, T, T, T, F, F, T, T, T, F, F, T, T, T, F, F],
        _ => &[T, T, T, T, T],
    }
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

/// A component value spread over the generic composite columns (s1, s2, s3, n1, n2); the search
/// side reads them through the same mapping ([`crate::search`]). Unused columns hold `''` and 0,
/// never NULL: sqlx's `Any` driver declares a NULL double as `float4` to PostgreSQL, which then
/// refuses the cached statement's next real `float8`.
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
        IndexValue::Composite(_) => [e(), e(), e(), Bind::F(0.0), Bind::F(0.0)],
    }
}

/// How one write treats the row it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    /// A create with a new random id: no current version to read, lock or replace.
    Fresh,
    /// Create-or-update of a given id.
    Upsert,
    /// Delete (a new version without a body).
    Delete,
}

/// What one write needs besides the resource.
struct Write<'p> {
    pending: &'p mut PendingRows,
    index_rows: Vec<(String, IndexValue)>,
    now: chrono::DateTime<chrono::Utc>,
}

/// Rows a transaction writes at its end ([`Store::flush`]).
#[derive(Default)]
struct PendingRows {
    resources: Vec<Vec<Bind>>,
    history: Vec<Vec<Bind>>,
    index: [Vec<Vec<Bind>>; 8],
}

impl PendingRows {
    /// Queues one index row in the table its value belongs to.
    fn push_index(&mut self, rt: &str, id: &str, param: String, v: IndexValue) {
        let head = [
            Bind::S(rt.to_string()),
            Bind::S(id.to_string()),
            Bind::S(param),
        ];
        let (slot, vals) = match v {
            IndexValue::Token(s, c) => (0, vec![Bind::S(s), Bind::S(c)]),
            IndexValue::String(n, e) => (1, vec![Bind::S(n), Bind::S(e)]),
            IndexValue::Date(lo, hi) => (2, vec![Bind::I(lo), Bind::I(hi)]),
            IndexValue::Reference(t, i) => (3, vec![Bind::S(t), Bind::S(i)]),
            IndexValue::Number(n) => (4, vec![Bind::F(n)]),
            IndexValue::Uri(u) => (5, vec![Bind::S(u)]),
            IndexValue::Quantity {
                value,
                system,
                code,
                unit,
            } => (
                6,
                vec![
                    Bind::F(value),
                    Bind::S(system),
                    Bind::S(code),
                    Bind::S(unit),
                ],
            ),
            IndexValue::Composite(parts) => {
                let mut cols = Vec::with_capacity(5 * COMPOSITE_PARTS);
                let mut parts = parts.into_iter();
                for _ in 0..COMPOSITE_PARTS {
                    let c = parts.next().unwrap_or(IndexValue::Composite(Vec::new()));
                    cols.extend(component_columns(c));
                }
                (7, cols)
            }
        };
        self.index[slot].push(head.into_iter().chain(vals).collect());
    }

    /// Drops the pending index rows of one resource (it is being written again).
    fn forget(&mut self, rt: &str, id: &str) {
        let is = |row: &Vec<Bind>| matches!((&row[0], &row[1]), (Bind::S(t), Bind::S(i)) if t == rt && i == id);
        for rows in self.index.iter_mut() {
            rows.retain(|r| !is(r));
        }
    }

    fn by_table(&self) -> Vec<(&'static str, &'static str, &[Vec<Bind>])> {
        let mut out = vec![
            (
                "resources",
                "rtype, id, version, last_updated, lu_ms, deleted, body",
                self.resources.as_slice(),
            ),
            (
                "history",
                "rtype, id, version, last_updated, lu_ms, deleted, body",
                self.history.as_slice(),
            ),
        ];
        for i in 0..INDEX_TABLES.len() {
            out.push((INDEX_TABLES[i], INDEX_COLUMNS[i], self.index[i].as_slice()));
        }
        out
    }
}

fn stored_from(rt: &str, id: &str, r: &AnyRow) -> Result<Stored, StoreError> {
    stored_from_offset(rt, id, r, 0)
}

pub(crate) fn stored_from_offset(
    rt: &str,
    id: &str,
    r: &AnyRow,
    o: usize,
) -> Result<Stored, StoreError> {
    let version: i64 = r.try_get(o)?;
    let last_updated: String = r.try_get(o + 1)?;
    let deleted: i64 = r.try_get(o + 2)?;
    let body: Option<String> = r.try_get(o + 3)?;
    Ok(Stored {
        resource_type: rt.to_string(),
        id: id.to_string(),
        version,
        last_updated,
        deleted: deleted == 1,
        resource: body.map(|b| serde_json::from_str(&b)).transpose()?,
    })
}

/// Rewrites `reference` values that name a Bundle `fullUrl` to the stored `Type/id`.
fn rewrite_refs(v: &mut Value, map: &[(String, String)]) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("reference") {
                if let Some((_, to)) = map.iter().find(|(from, _)| from == r) {
                    *r = to.clone();
                }
            }
            for x in o.values_mut() {
                rewrite_refs(x, map);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_refs(x, map)),
        _ => {}
    }
}
