//! The transaction a write runs in: sqlx on PostgreSQL (and for SQLite's occasional writes from
//! other tasks: parameter ids, retention purges, reindexing), or the SQLite group-commit writer's
//! own connection, called directly on the writer's thread.
//!
//! Through sqlx's `Any` driver every statement's arguments were converted twice and the statement
//! sent to the connection's worker thread, the writer waiting for the answer: about a thousand
//! round trips per commit, a third of the one writer's time spent waiting for a thread or a core.

use rusqlite::types::{ToSqlOutput, ValueRef};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::write::Bind;
use crate::StoreError;

/// Statements the direct connection keeps prepared: each table's insert shapes (seven chunk sizes)
/// and the per-resource statements, with room to spare.
const PREPARED_STATEMENTS: usize = 160;

/// An open write transaction on either kind of connection.
pub(crate) enum WriteTx<'c> {
    /// A sqlx transaction (rolled back when dropped uncommitted).
    Sqlx(Transaction<'c, Any>),
    /// A transaction on the SQLite writer's direct connection.
    Direct(DirectTx<'c>),
}

/// `BEGIN IMMEDIATE` on the writer's connection; rolled back when dropped uncommitted, as sqlx's
/// transactions are, so an error returned half-way never leaves the connection inside a
/// transaction that the next `BEGIN` would trip over.
pub(crate) struct DirectTx<'c> {
    conn: &'c DirectConnection,
    open: bool,
}

/// The writer's connection. Behind a mutex only so that futures holding a [`WriteTx`] stay
/// `Send`; the writer thread is its one user, so the lock is never contended.
pub(crate) type DirectConnection = std::sync::Mutex<rusqlite::Connection>;

/// The connection, whatever a panic elsewhere left in the lock (SQLite's own state is consistent).
pub(crate) fn lock(c: &DirectConnection) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for DirectTx<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Err(e) = lock(self.conn).execute_batch("ROLLBACK") {
                tracing::error!(error = %e, "rollback of the SQLite writer's transaction failed");
            }
        }
    }
}

impl rusqlite::ToSql for Bind {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Bind::S(v) | Bind::O(Some(v)) => ValueRef::Text(v.as_bytes()),
            Bind::O(None) => ValueRef::Null,
            Bind::I(v) => ValueRef::Integer(*v),
            Bind::F(v) => ValueRef::Real(*v),
        }))
    }
}

/// Opens the SQLite writer's connection with the pool connections' settings
/// ([`crate::sqlite_settings`]), its own page cache and checkpoint threshold, through the VFS
/// that writes each commit's log in one call ([`crate::wal_buffer`]) when it is available.
pub(crate) fn open_direct(
    path: &std::path::Path,
    cache_kib: i64,
    autocheckpoint: u32,
) -> Result<DirectConnection, StoreError> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = if crate::wal_buffer::register() {
        rusqlite::Connection::open_with_flags_and_vfs(path, flags, crate::wal_buffer::VFS_NAME)?
    } else {
        rusqlite::Connection::open_with_flags(path, flags)?
    };
    conn.execute_batch(&crate::sqlite_settings(cache_kib, autocheckpoint).join(";"))?;
    conn.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
    Ok(std::sync::Mutex::new(conn))
}

impl<'c> WriteTx<'c> {
    /// Starts `BEGIN IMMEDIATE` on the writer's connection.
    pub(crate) fn begin_direct(conn: &'c DirectConnection) -> Result<Self, StoreError> {
        lock(conn).execute_batch("BEGIN IMMEDIATE")?;
        Ok(WriteTx::Direct(DirectTx { conn, open: true }))
    }

    /// Runs a statement; returns the rows it changed.
    pub(crate) async fn execute<'b>(
        &mut self,
        sql: &str,
        binds: impl IntoIterator<Item = &'b Bind>,
    ) -> Result<u64, StoreError> {
        match self {
            WriteTx::Sqlx(tx) => Ok(bind_all(sqlx::query(sql), binds)
                .execute(&mut **tx)
                .await?
                .rows_affected()),
            WriteTx::Direct(d) => {
                let conn = lock(d.conn);
                let mut st = conn.prepare_cached(sql)?;
                Ok(st.execute(rusqlite::params_from_iter(binds))? as u64)
            }
        }
    }

    /// Runs a statement that returns rows (a `SELECT`, or an insert with `RETURNING`): integers as
    /// [`Bind::I`], text as [`Bind::S`], NULL as `Bind::O(None)`.
    pub(crate) async fn fetch<'b>(
        &mut self,
        sql: &str,
        binds: impl IntoIterator<Item = &'b Bind>,
    ) -> Result<Vec<Vec<Bind>>, StoreError> {
        match self {
            WriteTx::Sqlx(tx) => {
                let rows = bind_all(sqlx::query(sql), binds)
                    .fetch_all(&mut **tx)
                    .await?;
                rows.iter().map(any_row).collect()
            }
            WriteTx::Direct(d) => {
                let conn = lock(d.conn);
                let mut st = conn.prepare_cached(sql)?;
                let n = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(binds))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut cells = Vec::with_capacity(n);
                    for i in 0..n {
                        cells.push(match r.get_ref(i)? {
                            ValueRef::Integer(v) => Bind::I(v),
                            ValueRef::Real(v) => Bind::F(v),
                            ValueRef::Null => Bind::O(None),
                            ValueRef::Text(t) | ValueRef::Blob(t) => {
                                Bind::S(String::from_utf8_lossy(t).into_owned())
                            }
                        });
                    }
                    out.push(cells);
                }
                Ok(out)
            }
        }
    }

    /// Commits.
    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        match self {
            WriteTx::Sqlx(tx) => Ok(tx.commit().await?),
            WriteTx::Direct(mut d) => {
                d.open = false;
                let conn = lock(d.conn);
                if let Err(e) = conn.execute_batch("COMMIT") {
                    // A failed COMMIT may leave the transaction open (SQLITE_BUSY): end it.
                    if !conn.is_autocommit() {
                        let _ = conn.execute_batch("ROLLBACK");
                    }
                    return Err(e.into());
                }
                Ok(())
            }
        }
    }

    /// Rolls back.
    pub(crate) async fn rollback(self) -> Result<(), StoreError> {
        match self {
            WriteTx::Sqlx(tx) => Ok(tx.rollback().await?),
            WriteTx::Direct(mut d) => {
                d.open = false;
                let r = lock(d.conn).execute_batch("ROLLBACK");
                Ok(r?)
            }
        }
    }
}

pub(crate) fn bind_all<'q, 'b: 'q>(
    mut q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    binds: impl IntoIterator<Item = &'b Bind>,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    for b in binds {
        q = match b {
            Bind::S(v) => q.bind(v.as_str()),
            Bind::O(v) => q.bind(v.as_deref()),
            Bind::I(v) => q.bind(*v),
            Bind::F(v) => q.bind(*v),
        };
    }
    q
}

/// A sqlx row as cells: each column an integer if it decodes as one, else text or NULL.
fn any_row(r: &AnyRow) -> Result<Vec<Bind>, StoreError> {
    (0..r.len())
        .map(|i| {
            if let Ok(Some(v)) = r.try_get::<Option<i64>, _>(i) {
                return Ok(Bind::I(v));
            }
            Ok(match r.try_get::<Option<String>, _>(i)? {
                Some(s) => Bind::S(s),
                None => Bind::O(None),
            })
        })
        .collect()
}

/// A cell the caller expects to be an integer.
pub(crate) fn int(cells: &[Bind], i: usize) -> Result<i64, StoreError> {
    match cells.get(i) {
        Some(Bind::I(v)) => Ok(*v),
        _ => Err(StoreError::Commit(format!("column {i} is not an integer"))),
    }
}

/// A cell the caller expects to be text.
pub(crate) fn text(cells: &[Bind], i: usize) -> Result<String, StoreError> {
    match cells.get(i) {
        Some(Bind::S(v)) => Ok(v.clone()),
        _ => Err(StoreError::Commit(format!("column {i} is not text"))),
    }
}
