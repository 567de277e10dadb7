//! Reading many resources in constant memory: pages in storage order (keyset paging on the row id),
//! bodies returned as the stored JSON text so an exporter can write them without parsing. The bulk
//! `$export` and the retention job read through here.
//!
//! Storage order, not id order: server-assigned ids follow the order of writes closely, but ids a
//! client chose (an update that creates) come in any order, and walking those fetched each body
//! from a random page of the resources table. Row ids follow the table's own layout, so a walk
//! reads it front to back whoever chose the ids; the cursor is an integer, not a string.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::Row;

use crate::write::Bind;
use crate::write_tx::bind_all;
use crate::{Store, StoreError};

/// Which resources of a type a scan returns.
#[derive(Debug, Clone, Default)]
pub struct ScanFilter {
    /// Only resources changed at or after this instant (epoch ms).
    pub since_ms: Option<i64>,
    /// Only resources in some patient's compartment (or in the compartments of a Group's members).
    pub compartment: Option<CompartmentScope>,
}

/// The patients whose compartments a scan covers.
#[derive(Debug, Clone)]
pub enum CompartmentScope {
    /// Every patient.
    AllPatients,
    /// The Patients a Group lists in `member.entity`.
    GroupMembers(String),
}

/// Where a scan stands: the next page starts after the row this was taken from.
/// `ScanCursor::default()` starts at the beginning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanCursor(i64);

/// One scanned resource: its id and its stored JSON (one line, no newline inside).
#[derive(Debug, Clone)]
pub struct ScannedRow {
    /// Id.
    pub id: String,
    /// The stored JSON text.
    pub body: String,
    /// The cursor that continues the scan after this row.
    pub cursor: ScanCursor,
}

/// A page of a scan as NDJSON, for writers that copy bodies out unparsed (the bulk export): the
/// stored JSON of each row followed by a newline, in one buffer.
#[derive(Debug, Clone, Default)]
pub struct NdjsonPage {
    /// The bodies, each ending in `\n` (a stored body holds no newline).
    pub ndjson: Vec<u8>,
    /// The rows' ids, in order, when asked for.
    pub ids: Vec<String>,
    /// Lines in `ndjson`.
    pub rows: usize,
    /// The cursor that continues the scan after this page: the one it started from at the end
    /// of the scan.
    pub next: ScanCursor,
}

impl NdjsonPage {
    fn push(&mut self, rid: i64, id: Option<String>, body: &[u8]) {
        self.ndjson.extend_from_slice(body);
        self.ndjson.push(b'\n');
        self.ids.extend(id);
        self.rows += 1;
        self.next = ScanCursor(rid);
    }
}

/// A page of one walk over several types in storage order (the bulk export of a whole server):
/// each type's rows of the page as NDJSON, the types in the order their first row came.
///
/// Rows of all types are interleaved in the table, so a walk per type reads most of its pages once
/// per type; with the database not in the OS cache that reading was most of an export's time.
#[derive(Debug, Clone, Default)]
pub struct MixedNdjsonPage {
    /// (resource type, its rows of this page).
    pub parts: Vec<(String, NdjsonPage)>,
    /// Rows in all parts.
    pub rows: usize,
    /// The cursor that continues the walk after this page: the one it started from at the end.
    pub next: ScanCursor,
}

impl MixedNdjsonPage {
    fn push(&mut self, rid: i64, rt: &str, id: Option<String>, body: &[u8]) {
        let at = match self.parts.iter().position(|(t, _)| t == rt) {
            Some(i) => i,
            None => {
                self.parts.push((rt.to_string(), NdjsonPage::default()));
                self.parts.len() - 1
            }
        };
        self.parts[at].1.push(rid, id, body);
        self.rows += 1;
        self.next = ScanCursor(rid);
    }
}

/// What one page of a scan asks the database.
enum ScanQuery {
    /// The type is outside the compartment the filter asks for.
    Outside,
    /// Nothing can match (no resource of the type was ever indexed with a patient link).
    Empty,
    /// `SELECT rid, id, body …` with `?` placeholders; the page size binds last.
    Sql(String, Vec<Bind>),
}

impl Store {
    fn scan_query(&self, rt: &str, filter: &ScanFilter, after: ScanCursor) -> ScanQuery {
        let mut sql = String::from(
            "SELECT r.rid, r.id, r.body FROM resources r WHERE r.rtype = ? AND r.deleted = 0 AND r.rid > ?",
        );
        let mut binds: Vec<Bind> = vec![Bind::S(rt.to_string()), Bind::I(after.0)];
        if let Some(s) = filter.since_ms {
            sql.push_str(" AND r.lu_ms >= ?");
            binds.push(Bind::I(s));
        }
        let members = |group: &str, binds: &mut Vec<Bind>| {
            binds.push(Bind::I(
                self.pids("Group", "member", "")
                    .first()
                    .copied()
                    .unwrap_or(-1),
            ));
            binds.push(Bind::S(group.to_string()));
            "SELECT g.tid FROM idx_reference g WHERE g.pid = ? AND g.ttype = 'Patient' AND g.rid = (SELECT gr.rid FROM resources gr WHERE gr.rtype = 'Group' AND gr.id = ?)"
        };
        match (&filter.compartment, rt) {
            (None, _) | (Some(CompartmentScope::AllPatients), "Patient") => {}
            (Some(CompartmentScope::GroupMembers(g)), "Patient") => {
                let m = members(g, &mut binds);
                sql.push_str(&format!(" AND r.id IN ({m})"));
            }
            (Some(scope), _) => {
                let params = self.compartment().params(rt).to_vec();
                if params.is_empty() {
                    return ScanQuery::Outside;
                }
                let pids: Vec<i64> = params.iter().flat_map(|p| self.pids(rt, p, "")).collect();
                if pids.is_empty() {
                    return ScanQuery::Empty;
                }
                let list = vec!["?"; pids.len()].join(", ");
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM idx_reference x WHERE x.rid = r.rid AND x.ttype = 'Patient' AND x.pid IN ({list})"
                ));
                binds.extend(pids.into_iter().map(Bind::I));
                if let CompartmentScope::GroupMembers(g) = scope {
                    let m = members(g, &mut binds);
                    sql.push_str(&format!(" AND x.tid IN ({m})"));
                }
                sql.push(')');
            }
        }
        sql.push_str(" ORDER BY r.rid LIMIT ?");
        ScanQuery::Sql(sql, binds)
    }

    /// The next page of current resources of `rt` after `after`, at most `limit`, in storage
    /// order. A resource updated during a scan keeps its place, so a scan visits every resource
    /// that exists throughout it once. `None` when the type is outside the compartment the
    /// filter asks for.
    pub async fn scan_page(
        &self,
        rt: &str,
        filter: &ScanFilter,
        after: ScanCursor,
        limit: i64,
    ) -> Result<Option<Vec<ScannedRow>>, StoreError> {
        let (sql, mut binds) = match self.scan_query(rt, filter, after) {
            ScanQuery::Outside => return Ok(None),
            ScanQuery::Empty => return Ok(Some(Vec::new())),
            ScanQuery::Sql(sql, binds) => (sql, binds),
        };
        binds.push(Bind::I(limit));
        let sql = self.sql(&sql);
        let rows = bind_all(sqlx::query(&sql), &binds)
            .fetch_all(self.pool())
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let body: Option<String> = r.try_get(2)?;
            out.push(ScannedRow {
                id: r.try_get(1)?,
                body: body.unwrap_or_default(),
                cursor: ScanCursor(r.try_get(0)?),
            });
        }
        Ok(Some(out))
    }

    /// The same page as [`Store::scan_page`], as NDJSON, with the ids when `with_ids`. On SQLite
    /// it is read on a blocking thread over a connection called directly, each body copied once
    /// into the page: through the driver each was copied three times and handed over row by row,
    /// which bounded the export at one core.
    pub async fn scan_ndjson(
        &self,
        rt: &str,
        filter: &ScanFilter,
        after: ScanCursor,
        limit: i64,
        with_ids: bool,
    ) -> Result<Option<NdjsonPage>, StoreError> {
        let (sql, mut binds) = match self.scan_query(rt, filter, after) {
            ScanQuery::Outside => return Ok(None),
            ScanQuery::Empty => {
                return Ok(Some(NdjsonPage {
                    next: after,
                    ..NdjsonPage::default()
                }))
            }
            ScanQuery::Sql(sql, binds) => (sql, binds),
        };
        binds.push(Bind::I(limit));
        if let Some(direct) = self.direct_reads.clone() {
            return blocking(move || direct.ndjson_page(&sql, &binds, with_ids, after))
                .await
                .map(Some);
        }
        let sql = self.sql(&sql);
        let rows = bind_all(sqlx::query(&sql), &binds)
            .fetch_all(self.pool())
            .await?;
        let mut page = NdjsonPage {
            next: after,
            ..NdjsonPage::default()
        };
        for r in rows {
            let body: Option<String> = r.try_get(2)?;
            let id = if with_ids { Some(r.try_get(1)?) } else { None };
            match body {
                Some(body) => page.push(r.try_get(0)?, id, body.as_bytes()),
                None => page.next = ScanCursor(r.try_get(0)?),
            }
        }
        Ok(Some(page))
    }

    /// The next page of one walk over the current resources of all of `types` after `after`, at
    /// most `limit` rows, in storage order, with the ids of the rows of type `ids_of`. Each type's
    /// rows come in the order [`Store::scan_ndjson`] gives them.
    pub async fn scan_ndjson_types(
        &self,
        types: &[String],
        since_ms: Option<i64>,
        after: ScanCursor,
        limit: i64,
        ids_of: &str,
    ) -> Result<MixedNdjsonPage, StoreError> {
        if types.is_empty() {
            return Ok(MixedNdjsonPage {
                next: after,
                ..MixedNdjsonPage::default()
            });
        }
        // On SQLite `+` keeps the planner off the (rtype, deleted, rid) index: the walk goes along
        // the table itself by row id, instead of gathering and sorting every row of the types.
        let rtype = match self.backend() {
            crate::Backend::Sqlite => "+r.rtype",
            crate::Backend::Postgres => "r.rtype",
        };
        let marks = vec!["?"; types.len()].join(", ");
        let mut sql = format!(
            "SELECT r.rid, r.rtype, r.id, r.body FROM resources r WHERE {rtype} IN ({marks}) AND r.deleted = 0 AND r.rid > ?"
        );
        let mut binds: Vec<Bind> = types.iter().map(|t| Bind::S(t.clone())).collect();
        binds.push(Bind::I(after.0));
        if let Some(s) = since_ms {
            sql.push_str(" AND r.lu_ms >= ?");
            binds.push(Bind::I(s));
        }
        sql.push_str(" ORDER BY r.rid LIMIT ?");
        binds.push(Bind::I(limit));
        if let Some(direct) = self.direct_reads.clone() {
            let ids_of = ids_of.to_string();
            return blocking(move || direct.mixed_page(&sql, &binds, &ids_of, after)).await;
        }
        let sql = self.sql(&sql);
        let rows = bind_all(sqlx::query(&sql), &binds)
            .fetch_all(self.pool())
            .await?;
        let mut page = MixedNdjsonPage {
            next: after,
            ..MixedNdjsonPage::default()
        };
        for r in rows {
            let rt: String = r.try_get(1)?;
            let body: Option<String> = r.try_get(3)?;
            let id = if rt == ids_of {
                Some(r.try_get(2)?)
            } else {
                None
            };
            match body {
                Some(body) => page.push(r.try_get(0)?, &rt, id, body.as_bytes()),
                None => page.next = ScanCursor(r.try_get(0)?),
            }
        }
        Ok(page)
    }

    /// The resource types that have at least one current resource.
    pub async fn stored_types(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT rtype FROM resources WHERE deleted = 0")
            .fetch_all(self.pool())
            .await?;
        let mut out: Vec<String> = rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect();
        out.sort();
        Ok(out)
    }
}

/// Runs a direct read on a blocking thread.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| StoreError::Interrupted(e.to_string()))?
}

/// SQLite read connections called directly, for bulk reads. Idle ones are kept a while (a
/// connection's planner statistics date from its opening, as with the pool's readers).
#[derive(Debug)]
pub(crate) struct DirectReads {
    path: PathBuf,
    idle: Mutex<Vec<(Instant, rusqlite::Connection)>>,
}

impl DirectReads {
    /// How long an idle connection is reused.
    const FRESH: Duration = Duration::from_secs(30);
    /// Idle connections kept.
    const KEEP: usize = 2;

    pub(crate) fn new(path: PathBuf) -> DirectReads {
        DirectReads {
            path,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Result<(Instant, rusqlite::Connection), StoreError> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((opened, conn)) = idle.pop() {
            if opened.elapsed() < Self::FRESH {
                return Ok((opened, conn));
            }
        }
        drop(idle);
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // A walk front to back: a small cache, as every page is read once.
        conn.execute_batch("PRAGMA cache_size=-2048; PRAGMA busy_timeout=10000")?;
        Ok((Instant::now(), conn))
    }

    fn give_back(&self, conn: (Instant, rusqlite::Connection)) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < Self::KEEP {
            idle.push(conn);
        }
    }

    /// Runs `sql` on a connection of its own, handing each row to `each`. Blocking.
    fn each_row(
        &self,
        sql: &str,
        binds: &[Bind],
        mut each: impl FnMut(&rusqlite::Row<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let conn = self.take()?;
        let result = (|| -> Result<(), StoreError> {
            let mut st = conn.1.prepare_cached(sql)?;
            let mut rows = st.query(rusqlite::params_from_iter(binds))?;
            while let Some(r) = rows.next()? {
                each(r)?;
            }
            Ok(())
        })();
        self.give_back(conn);
        result
    }

    /// Runs a walk over several types (see [`Store::scan_ndjson_types`]) into a page. Blocking.
    fn mixed_page(
        &self,
        sql: &str,
        binds: &[Bind],
        ids_of: &str,
        after: ScanCursor,
    ) -> Result<MixedNdjsonPage, StoreError> {
        let mut page = MixedNdjsonPage {
            next: after,
            ..MixedNdjsonPage::default()
        };
        self.each_row(sql, binds, |r| {
            let rt = match r.get_ref(1)? {
                rusqlite::types::ValueRef::Text(t) => std::str::from_utf8(t).unwrap_or(""),
                _ => "",
            };
            let id = if rt == ids_of {
                Some(r.get::<_, String>(2)?)
            } else {
                None
            };
            match r.get_ref(3)? {
                rusqlite::types::ValueRef::Text(body) => page.push(r.get(0)?, rt, id, body),
                _ => page.next = ScanCursor(r.get(0)?),
            }
            Ok(())
        })?;
        Ok(page)
    }

    /// Runs a scan query (see `ScanQuery::Sql`) into a page. Blocking.
    fn ndjson_page(
        &self,
        sql: &str,
        binds: &[Bind],
        with_ids: bool,
        after: ScanCursor,
    ) -> Result<NdjsonPage, StoreError> {
        let mut page = NdjsonPage {
            next: after,
            ..NdjsonPage::default()
        };
        self.each_row(sql, binds, |r| {
            let id = if with_ids {
                Some(r.get::<_, String>(1)?)
            } else {
                None
            };
            match r.get_ref(2)? {
                rusqlite::types::ValueRef::Text(body) => page.push(r.get(0)?, id, body),
                _ => page.next = ScanCursor(r.get(0)?),
            }
            Ok(())
        })?;
        Ok(page)
    }
}
