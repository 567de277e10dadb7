//! # kizuna-store
//!
//! The versioned FHIR resource store: every write is a new version kept in the history, the current
//! version is searchable through index tables filled from the SearchParameter definitions, and a
//! transaction of many writes commits atomically or not at all.
//!
//! One implementation serves both backends through sqlx's `Any` driver: SQLite (bundled, WAL) is the
//! zero-setup default in `./kizuna-data/`, PostgreSQL is for production. The same test suite runs on both.
//! SQLite's one writer is the exception: its group commit runs on a thread of its own and calls its
//! connection directly (rusqlite, over the same SQLite library), not through a driver's worker thread.

pub mod compartment;
pub mod include;
pub mod index;
pub mod page_cache;
mod reindex;
pub mod scan;
mod schema;
pub mod search;
pub mod wal_buffer;
mod write;
mod write_tx;

use std::sync::Arc;

use kizuna_fhir::Registry;
use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

pub use compartment::PatientCompartment;
pub use include::Include;
pub use index::{IndexValue, Indexer, ParamType};
pub use scan::{CompartmentScope, MixedNdjsonPage, NdjsonPage, ScanCursor, ScanFilter, ScannedRow};
pub use schema::{INDEX_TABLES, SCHEMA_VERSION};
pub use search::{SearchParamValue, SearchQuery, SearchResult, SortSpec, Total};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("データベースエラー / database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A SQLite connection called directly (the writer's, or a bulk read's) failed.
    #[error("データベースエラー / database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
    /// The shared commit of several requests failed; this request's writes were rolled back.
    #[error("コミットに失敗しました / the commit failed: {0}")]
    Commit(String),
    /// A read on a blocking thread did not finish (the runtime is shutting down, or it panicked).
    #[error("読み出しが中断されました / a read was interrupted: {0}")]
    Interrupted(String),
    /// The store's writer task is gone (the runtime is shutting down).
    #[error("書き込みを受け付けられません / the store is shutting down")]
    WriterStopped,
    /// The database URL is not SQLite or PostgreSQL.
    #[error("未対応のデータベース URL / unsupported database URL (use sqlite:// or postgres://)")]
    UnsupportedUrl,
    /// An in-memory SQLite database: each pooled connection would see a database of its own.
    #[error("SQLite のメモリ上データベースは使えません。ファイルを指定してください / in-memory SQLite is not supported (every connection would get its own empty database): give a file, e.g. sqlite:///tmp/kizuna.db")]
    InMemory,
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
    /// Only the top-level elements a search asked for with [`SearchQuery::outline`], then.
    pub resource: Option<Value>,
    /// The stored JSON text of the whole resource, when a search asked for an outline: a caller
    /// that writes resources out as stored copies it instead of serialising a parsed tree again.
    pub text: Option<String>,
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

/// How many components a composite parameter may have (R4 has two or three).
pub const COMPOSITE_PARTS: usize = 3;

/// Turns the database's "someone else wrote this first" answers into [`StoreError::Concurrent`]:
/// a duplicate key (two creates of one id), PostgreSQL serialization failure or deadlock, SQLite busy.
fn concurrent_or_db(e: StoreError) -> StoreError {
    if let StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) = &e {
        use rusqlite::ErrorCode;
        // 2067: SQLITE_CONSTRAINT_UNIQUE, 1555: SQLITE_CONSTRAINT_PRIMARYKEY.
        if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
            || matches!(f.extended_code, 2067 | 1555)
        {
            return StoreError::Concurrent;
        }
    }
    if let StoreError::Db(sqlx::Error::Database(d)) = &e {
        let code = d.code();
        let code = code.as_deref().unwrap_or("");
        if d.is_unique_violation() || matches!(code, "40001" | "40P01" | "5" | "517" | "6") {
            return StoreError::Concurrent;
        }
    }
    e
}

/// The store: a connection pool, the dialect, and the index definitions.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// The connection(s) writes use: SQLite's single writer, or the PostgreSQL pool.
    write_pool: AnyPool,
    /// SQLite has one writer: queueing in-process writers here is fairer and faster than letting
    /// them sleep in SQLite's busy handler. (Other processes still wait on `busy_timeout`.)
    sqlite_writer: Arc<tokio::sync::Mutex<()>>,
    backend: Backend,
    registry: &'static Registry,
    indexer: Arc<Indexer>,
    compartment: Arc<PatientCompartment>,
    params: Arc<schema::ParamCache>,
    /// SQLite: the queue of the group-commit writer task (`None` in that task's own handle and on
    /// PostgreSQL, where transactions run side by side).
    group_writer: Option<tokio::sync::mpsc::UnboundedSender<write::WriteRequest>>,
    /// PostgreSQL: when to refresh the planner statistics as the store grows.
    pg_stats: Arc<write::StatsSchedule>,
    /// SQLite: commits so far, for the [`checkpointer`] (which stops when the store is gone).
    commits: Arc<std::sync::atomic::AtomicU64>,
    /// SQLite: writes whose index rows are being extracted, on their way to the writer. The
    /// writer waits a moment for them when its batch is small ([`write::GATHER_WAIT`]).
    preparing: Arc<std::sync::atomic::AtomicUsize>,
    /// SQLite: read connections called directly, for bulk reads ([`Store::scan_ndjson`]).
    direct_reads: Option<Arc<scan::DirectReads>>,
    /// The background reindex after an upgrade, if one is under way.
    reindex: Arc<reindex::ReindexState>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish()
    }
}

/// SQLite connections: WAL, `synchronous=NORMAL` (durable at checkpoints, never corrupt), a page
/// cache of `cache_kib`, and a 10 s wait for the write lock held by another process. No ping
/// before each use: an embedded connection cannot drop like a network one, and the ping was a
/// round trip to the connection's thread on every query (1.4 % of the CPU during registration).
fn sqlite_pool(max: u32, cache_kib: i64, autocheckpoint: u32) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(max)
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                for pragma in sqlite_settings(cache_kib, autocheckpoint) {
                    sqlx::query(&pragma).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
}

/// The settings of every SQLite connection, pooled or the writer's own: WAL, `synchronous=NORMAL`,
/// its page cache and checkpoint threshold.
pub(crate) fn sqlite_settings(cache_kib: i64, autocheckpoint: u32) -> [String; 7] {
    [
        "PRAGMA journal_mode=WAL".to_string(),
        "PRAGMA synchronous=NORMAL".to_string(),
        format!("PRAGMA cache_size=-{cache_kib}"),
        // Pages of WAL after which a commit checkpoints. The writer's is a safety net: its
        // checkpoints are done beside it ([`checkpointer`]).
        format!("PRAGMA wal_autocheckpoint={autocheckpoint}"),
        "PRAGMA busy_timeout=10000".to_string(),
        // Savepoints of the group commit journal pages in memory, not in a temp file.
        "PRAGMA temp_store=MEMORY".to_string(),
        "PRAGMA foreign_keys=ON".to_string(),
    ]
}

/// Copies committed WAL pages into the database file on a connection of its own, so the one writer
/// never does it inside a commit: a checkpoint every 32 MB of WAL took 15 % of the writer's time
/// (copying and two `fsync`s) and stalled every write queued behind it. `PASSIVE` never waits for
/// or blocks the writer or readers. Runs while the store exists.
async fn checkpointer(pool: AnyPool, commits: std::sync::Weak<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::Ordering;
    let mut done = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let Some(c) = commits.upgrade() else { break };
        let now = c.load(Ordering::Acquire);
        drop(c);
        if now != done {
            done = now;
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                tracing::warn!(error = %e, "WAL checkpoint failed");
            }
        }
    }
    pool.close().await;
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
        if url.starts_with("sqlite:") && (url.contains(":memory:") || url.contains("mode=memory")) {
            return Err(StoreError::InMemory);
        }
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
        if backend == Backend::Sqlite {
            page_cache::install();
        }
        let (pool, write_pool) = match backend {
            // Readers share four connections. The group-commit writer has a connection of its own
            // (opened below), so its page cache stays warm from one transaction to the next; the
            // write pool serves the occasional other writes (migration, parameter ids, purges).
            // Reader connections are renewed every 30 s: SQLite loads planner statistics when a
            // connection opens, and those the writer gathers as the store grows would otherwise
            // never reach the readers that plan the searches.
            Backend::Sqlite => (
                sqlite_pool(4, 16 * 1024, 8192)
                    .max_lifetime(std::time::Duration::from_secs(30))
                    .connect(&url)
                    .await?,
                sqlite_pool(1, 16 * 1024, 16384).connect(&url).await?,
            ),
            Backend::Postgres => {
                let p = AnyPoolOptions::new()
                    .max_connections(16)
                    .connect(&url)
                    .await?;
                (p.clone(), p)
            }
        };
        let store = Store {
            pool,
            write_pool,
            sqlite_writer: Arc::new(tokio::sync::Mutex::new(())),
            backend,
            registry,
            indexer: Arc::new(Indexer::new(registry)),
            compartment: Arc::new(PatientCompartment::from_registry(registry)),
            params: Arc::new(Default::default()),
            group_writer: None,
            pg_stats: Arc::new(write::StatsSchedule::default()),
            commits: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            preparing: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            direct_reads: None,
            reindex: Arc::new(Default::default()),
        };
        store.migrate().await?;
        let mut store = store;
        if backend == Backend::Sqlite {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            // The writer runs on a thread of its own, with a connection it calls directly: on the
            // request runtime it waited behind validation and JSON work for every statement it
            // sent, and the one writer is what every submission queues on.
            let path = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&url)?
                .get_filename()
                .to_path_buf();
            // The writer checkpoints only past 65,536 WAL pages (256 MiB). Its checkpoints are
            // what let the WAL start over under continuous writes (the checkpointer never catches
            // the last commit), but each one stalls every write on two `fsync`s: at 16,384 pages
            // they took 1.2 s of every 15 s of the writer's time during a 100k ingest.
            let conn = write_tx::open_direct(&path, 64 * 1024, 65536)?;
            store.direct_reads = Some(Arc::new(scan::DirectReads::new(path.clone())));
            let writer = store.clone();
            std::thread::Builder::new()
                .name("kizuna-sqlite-writer".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(writer.group_commit(rx, conn)),
                        Err(e) => tracing::error!(error = %e, "SQLite writer failed to start"),
                    }
                })
                .map_err(|e| StoreError::Commit(e.to_string()))?;
            store.group_writer = Some(tx);
            let pool = sqlite_pool(1, 1024, 8192).connect(&url).await?;
            tokio::spawn(checkpointer(pool, Arc::downgrade(&store.commits)));
        }
        store.resume_reindex().await?;
        Ok(store)
    }

    /// Runs one statement (administration and tests).
    pub async fn execute_raw(&self, sql: &str) -> Result<(), StoreError> {
        sqlx::query(sql).execute(&self.pool).await?;
        Ok(())
    }

    /// SQLite: writes being prepared (index rows extracted) on their way to the writer, which
    /// waits a moment for them when its batch is small; 0 on PostgreSQL and whenever no write is
    /// under way.
    pub fn writes_preparing(&self) -> usize {
        self.preparing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// SQLite: the group commits so far (each shared by the requests queued at that moment; 0 on
    /// PostgreSQL). Benchmarks divide the resources they wrote by it: how many resources a commit
    /// carries is what most decides SQLite's write cost per resource, since each commit writes
    /// every page it touched again.
    pub fn group_commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Acquire)
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

    pub(crate) fn write_pool(&self) -> &AnyPool {
        &self.write_pool
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
        let q = self.sql(&format!(
            "SELECT h.version, h.last_updated, h.deleted, {HISTORY_BODY} WHERE h.rtype = ? AND h.id = ? AND h.version = ?"
        ));
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
        let mut sql = format!(
            "SELECT h.rtype, h.id, h.version, h.last_updated, h.deleted, {HISTORY_BODY} WHERE 1=1"
        );
        if resource_type.is_some() {
            sql.push_str(" AND h.rtype = ?");
        }
        if id.is_some() {
            sql.push_str(" AND h.id = ?");
        }
        if since_ms.is_some() {
            sql.push_str(" AND h.lu_ms >= ?");
        }
        sql.push_str(" ORDER BY h.lu_ms DESC, h.version DESC LIMIT ?");
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

/// A history row's body and the table it comes from: the current version's body is kept once,
/// in `resources` (the history row has none until the version is replaced).
const HISTORY_BODY: &str = "COALESCE(h.body, r.body) FROM history h LEFT JOIN resources r \
     ON h.body IS NULL AND h.deleted = 0 AND r.rtype = h.rtype AND r.id = h.id AND r.version = h.version";

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
        text: None,
    })
}
