//! The tables, their migration, and the parameter dictionary.
//!
//! Index rows are small: a parameter id (`pid`, one per resource type and parameter code, from
//! `kz_param`) and the resource's row id (`rid`) instead of repeating the type, the 32-character id
//! and the parameter name in every row and every index key. On SQLite the index tables are
//! `WITHOUT ROWID`, clustered on the search key, so each row lives in two B-trees, not three.

use std::sync::RwLock;

use sqlx::Row;

use crate::write::Bind;
use crate::{Backend, Store, StoreError};

/// Sets a `kz_meta` value (key, value).
pub(crate) const META_UPSERT: &str = "INSERT INTO kz_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value";
/// Reads a `kz_meta` value (key).
pub(crate) const META_GET: &str = "SELECT value FROM kz_meta WHERE key = ?";

/// The current schema version (recorded in `kz_meta`).
///
/// 2 added quantity and composite tables and the `:text`/`:of-type`/`:identifier` rows; 3 keyed the
/// per-resource lookups by (type, id, parameter); 4 replaced type, id and parameter in the index
/// tables by `pid` and `rid`; 5 keeps the current version's body once, in `resources` (its history
/// row has none until the version is replaced); 6 searches composites over the resource itself
/// through their components' rows instead of tuple rows; 7 stores a versioned canonical once
/// (`url|version`, found by its bare URL by prefix; PostgreSQL's `idx_uri_c` compares bytes);
/// 8 adds `idx_code_value`, the rows of a composite of a code and a quantity over the resource;
/// 9 reads a cast of a repeating element as a filter (every component's value quantity is
/// indexed, not none) and indexes computed values (`deceased`); 10 indexes the resource inside a
/// Bundle (`Bundle?composition.type=…`). Opening an older store migrates it.
pub const SCHEMA_VERSION: &str = "10";

const COMMON: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS kz_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS history (rtype TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL, last_updated TEXT NOT NULL, lu_ms BIGINT NOT NULL, deleted BIGINT NOT NULL, body TEXT, PRIMARY KEY (rtype, id, version))",
    "CREATE INDEX IF NOT EXISTS history_lu ON history (lu_ms)",
];

const SQLITE: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS kz_param (pid INTEGER PRIMARY KEY, rtype TEXT NOT NULL, code TEXT NOT NULL, UNIQUE (rtype, code))",
    "CREATE TABLE IF NOT EXISTS resources (rid INTEGER PRIMARY KEY, rtype TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL, last_updated TEXT NOT NULL, lu_ms BIGINT NOT NULL, deleted BIGINT NOT NULL, body TEXT, UNIQUE (rtype, id))",
    "CREATE INDEX IF NOT EXISTS resources_lu ON resources (rtype, lu_ms)",
    "CREATE TABLE IF NOT EXISTS idx_token (pid INTEGER NOT NULL, rid INTEGER NOT NULL, system TEXT NOT NULL, code TEXT NOT NULL, PRIMARY KEY (pid, code, system, rid)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS idx_string (pid INTEGER NOT NULL, rid INTEGER NOT NULL, norm TEXT NOT NULL, exact TEXT NOT NULL, PRIMARY KEY (pid, norm, exact, rid)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS idx_date (pid INTEGER NOT NULL, rid INTEGER NOT NULL, lo BIGINT NOT NULL, hi BIGINT NOT NULL, PRIMARY KEY (pid, lo, hi, rid)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS idx_reference (pid INTEGER NOT NULL, rid INTEGER NOT NULL, ttype TEXT NOT NULL, tid TEXT NOT NULL, PRIMARY KEY (pid, tid, ttype, rid)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS idx_number (pid INTEGER NOT NULL, rid INTEGER NOT NULL, val DOUBLE PRECISION NOT NULL, PRIMARY KEY (pid, val, rid)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS idx_uri (pid INTEGER NOT NULL, rid INTEGER NOT NULL, val TEXT NOT NULL, PRIMARY KEY (pid, val, rid)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS idx_quantity (pid INTEGER NOT NULL, rid INTEGER NOT NULL, val DOUBLE PRECISION NOT NULL, system TEXT NOT NULL, code TEXT NOT NULL, unit TEXT NOT NULL, PRIMARY KEY (pid, val, system, code, unit, rid)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS idx_composite (pid INTEGER NOT NULL, rid INTEGER NOT NULL, \
     c0_s1 TEXT NOT NULL, c0_s2 TEXT NOT NULL, c0_s3 TEXT NOT NULL, c0_n1 DOUBLE PRECISION NOT NULL, c0_n2 DOUBLE PRECISION NOT NULL, \
     c1_s1 TEXT NOT NULL, c1_s2 TEXT NOT NULL, c1_s3 TEXT NOT NULL, c1_n1 DOUBLE PRECISION NOT NULL, c1_n2 DOUBLE PRECISION NOT NULL, \
     c2_s1 TEXT NOT NULL, c2_s2 TEXT NOT NULL, c2_s3 TEXT NOT NULL, c2_n1 DOUBLE PRECISION NOT NULL, c2_n2 DOUBLE PRECISION NOT NULL, \
     PRIMARY KEY (pid, c0_s2, c0_s1, c0_s3, c0_n1, c0_n2, c1_s1, c1_s2, c1_s3, c1_n1, c1_n2, c2_s1, c2_s2, c2_s3, c2_n1, c2_n2, rid)) WITHOUT ROWID",
    // Keyed by code, then row id, the value beside: a code's rows come in row-id order and a new
    // one is appended to its code's range.
    "CREATE TABLE IF NOT EXISTS idx_code_value (pid INTEGER NOT NULL, rid INTEGER NOT NULL, system TEXT NOT NULL, code TEXT NOT NULL, val DOUBLE PRECISION NOT NULL, PRIMARY KEY (pid, code, system, rid, val)) WITHOUT ROWID",
];

const POSTGRES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS kz_param (pid INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, rtype TEXT NOT NULL, code TEXT NOT NULL, UNIQUE (rtype, code))",
    "CREATE TABLE IF NOT EXISTS resources (rid BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, rtype TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL, last_updated TEXT NOT NULL, lu_ms BIGINT NOT NULL, deleted BIGINT NOT NULL, body TEXT, UNIQUE (rtype, id))",
    "CREATE INDEX IF NOT EXISTS resources_lu ON resources (rtype, lu_ms)",
    "CREATE TABLE IF NOT EXISTS idx_token (pid INTEGER NOT NULL, rid BIGINT NOT NULL, system TEXT NOT NULL, code TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_token_q ON idx_token (pid, code, system, rid)",
    "CREATE TABLE IF NOT EXISTS idx_string (pid INTEGER NOT NULL, rid BIGINT NOT NULL, norm TEXT NOT NULL, exact TEXT NOT NULL)",
    // Prefix search compares bytes (COLLATE "C"), as SQLite does.
    "CREATE INDEX IF NOT EXISTS idx_string_q ON idx_string (pid, (norm COLLATE \"C\"), rid)",
    "CREATE INDEX IF NOT EXISTS idx_string_e ON idx_string (pid, exact)",
    "CREATE TABLE IF NOT EXISTS idx_date (pid INTEGER NOT NULL, rid BIGINT NOT NULL, lo BIGINT NOT NULL, hi BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_date_q ON idx_date (pid, lo, hi, rid)",
    "CREATE TABLE IF NOT EXISTS idx_reference (pid INTEGER NOT NULL, rid BIGINT NOT NULL, ttype TEXT NOT NULL, tid TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_reference_q ON idx_reference (pid, tid, ttype, rid)",
    "CREATE TABLE IF NOT EXISTS idx_number (pid INTEGER NOT NULL, rid BIGINT NOT NULL, val DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_number_q ON idx_number (pid, val, rid)",
    "CREATE TABLE IF NOT EXISTS idx_uri (pid INTEGER NOT NULL, rid BIGINT NOT NULL, val TEXT NOT NULL)",
    // Bytewise, as SQLite compares: a bare canonical finds its versions (`url|…`) by range.
    "DROP INDEX IF EXISTS idx_uri_q",
    "CREATE INDEX IF NOT EXISTS idx_uri_c ON idx_uri (pid, (val COLLATE \"C\"), rid)",
    "CREATE TABLE IF NOT EXISTS idx_quantity (pid INTEGER NOT NULL, rid BIGINT NOT NULL, val DOUBLE PRECISION NOT NULL, system TEXT NOT NULL, code TEXT NOT NULL, unit TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_quantity_q ON idx_quantity (pid, val, rid)",
    "CREATE TABLE IF NOT EXISTS idx_composite (pid INTEGER NOT NULL, rid BIGINT NOT NULL, \
     c0_s1 TEXT NOT NULL, c0_s2 TEXT NOT NULL, c0_s3 TEXT NOT NULL, c0_n1 DOUBLE PRECISION NOT NULL, c0_n2 DOUBLE PRECISION NOT NULL, \
     c1_s1 TEXT NOT NULL, c1_s2 TEXT NOT NULL, c1_s3 TEXT NOT NULL, c1_n1 DOUBLE PRECISION NOT NULL, c1_n2 DOUBLE PRECISION NOT NULL, \
     c2_s1 TEXT NOT NULL, c2_s2 TEXT NOT NULL, c2_s3 TEXT NOT NULL, c2_n1 DOUBLE PRECISION NOT NULL, c2_n2 DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_composite_q ON idx_composite (pid, c0_s2)",
    "CREATE TABLE IF NOT EXISTS idx_code_value (pid INTEGER NOT NULL, rid BIGINT NOT NULL, system TEXT NOT NULL, code TEXT NOT NULL, val DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx_code_value_q ON idx_code_value (pid, code, system, rid, val)",
];

/// Both backends: the per-resource lookup of every index table (deletes, `EXISTS` probes, sort
/// keys, `_has`, compartment exports).
const LOOKUPS: &[&str] = &[
    // A type's current resources in the server's default search order, covering what a walk
    // over them tests (`deleted`), so pages, offsets and probing walks read no resource rows.
    // It replaced `resources_rt (rtype, rid)`.
    "DROP INDEX IF EXISTS resources_rt",
    "CREATE INDEX IF NOT EXISTS resources_live ON resources (rtype, deleted, rid)",
    "CREATE INDEX IF NOT EXISTS idx_token_r ON idx_token (rid, pid)",
    "CREATE INDEX IF NOT EXISTS idx_string_r ON idx_string (rid, pid)",
    "CREATE INDEX IF NOT EXISTS idx_date_r ON idx_date (rid, pid)",
    "CREATE INDEX IF NOT EXISTS idx_reference_r ON idx_reference (rid, pid)",
    // References by target alone: `$everything` and compartment exports name the parameters
    // (one range of the table's key each), so this index only cost every reference a write.
    "DROP INDEX IF EXISTS idx_reference_t",
    "CREATE INDEX IF NOT EXISTS idx_number_r ON idx_number (rid, pid)",
    "CREATE INDEX IF NOT EXISTS idx_uri_r ON idx_uri (rid, pid)",
    "CREATE INDEX IF NOT EXISTS idx_quantity_r ON idx_quantity (rid, pid)",
    "CREATE INDEX IF NOT EXISTS idx_composite_r ON idx_composite (rid, pid)",
    "CREATE INDEX IF NOT EXISTS idx_code_value_r ON idx_code_value (rid, pid)",
];

/// A backend's schema statements in the order every open runs them (also what tests of SQLite's
/// query plans build their empty schema from).
pub(crate) fn ddl(backend: Backend) -> impl Iterator<Item = &'static str> {
    let dialect = match backend {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    };
    COMMON.iter().chain(dialect).chain(LOOKUPS).copied()
}

/// The index tables (what a reindex rewrites; a test may count or clear their rows).
pub const INDEX_TABLES: [&str; 9] = [
    "idx_token",
    "idx_string",
    "idx_date",
    "idx_reference",
    "idx_number",
    "idx_uri",
    "idx_quantity",
    "idx_composite",
    "idx_code_value",
];

/// Columns of each index table as rows are inserted (after `pid, rid`), with their SQL types.
pub(crate) fn index_columns(slot: usize) -> (&'static str, &'static [&'static str]) {
    const T: &str = "text";
    const B: &str = "bigint";
    const F: &str = "double precision";
    match slot {
        0 => ("system, code", &[T, T]),
        1 => ("norm, exact", &[T, T]),
        2 => ("lo, hi", &[B, B]),
        3 => ("ttype, tid", &[T, T]),
        4 | 5 => ("val", if slot == 4 { &[F] } else { &[T] }),
        6 => ("val, system, code, unit", &[F, T, T, T]),
        8 => ("system, code, val", &[T, T, F]),
        _ => (
            "c0_s1, c0_s2, c0_s3, c0_n1, c0_n2, c1_s1, c1_s2, c1_s3, c1_n1, c1_n2, c2_s1, c2_s2, c2_s3, c2_n1, c2_n2",
            &[T, T, T, F, F, T, T, T, F, F, T, T, T, F, F],
        ),
    }
}

/// Parameter ids by resource type and code. Keyed type first so that a lookup borrows
/// its two strings instead of building an owned pair (it runs for every index row written). The
/// FHIR core's hasher, seeded per process, holds only the loaded SearchParameters' names; with
/// SipHash these lookups were 0.7 % of all instructions while registering.
#[derive(Debug, Default)]
pub(crate) struct ParamIds {
    by_key: kizuna_fhir::DefMap<String, kizuna_fhir::DefMap<String, i64>>,
}

impl ParamIds {
    /// The id of a parameter of a type, if it has one.
    pub(crate) fn get(&self, rt: &str, code: &str) -> Option<i64> {
        self.by_key.get(rt)?.get(code).copied()
    }
}

/// The dictionary, shared by clones of a [`Store`].
pub(crate) type ParamCache = RwLock<ParamIds>;

impl Store {
    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        let before = self.schema_version().await;
        let old_layout = before.is_some_and(|v| v < 4);
        let mut tx = self.pool().begin().await?;
        if old_layout {
            // Resource rows are kept (renamed, copied below); old index tables are rebuilt.
            let mut stmts = vec![
                "DROP INDEX IF EXISTS resources_lu".to_string(),
                "ALTER TABLE resources RENAME TO resources_v3".to_string(),
            ];
            if self.backend() == Backend::Postgres {
                stmts.push(
                    "ALTER INDEX IF EXISTS resources_pkey RENAME TO resources_v3_pkey".into(),
                );
            }
            for t in INDEX_TABLES {
                stmts.push(format!("DROP TABLE IF EXISTS {t}"));
            }
            for s in stmts {
                sqlx::query(&s).execute(&mut *tx).await?;
            }
        }
        for stmt in ddl(self.backend()) {
            sqlx::query(stmt).execute(&mut *tx).await?;
        }
        if old_layout {
            sqlx::query("INSERT INTO resources (rtype, id, version, last_updated, lu_ms, deleted, body) SELECT rtype, id, version, last_updated, lu_ms, deleted, body FROM resources_v3 ORDER BY lu_ms")
                .execute(&mut *tx)
                .await?;
            sqlx::query("DROP TABLE resources_v3")
                .execute(&mut *tx)
                .await?;
        }
        let mut bodies_dropped = 0;
        if before.is_some_and(|v| v < 5) {
            bodies_dropped = sqlx::query(
                "UPDATE history SET body = NULL WHERE deleted = 0 AND body IS NOT NULL AND EXISTS \
                 (SELECT 1 FROM resources r WHERE r.rtype = history.rtype AND r.id = history.id AND r.version = history.version)",
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        if let Some(v) = before.filter(|v| !old_layout && *v < 10) {
            // Schema 6: tuple rows went and components' own rows came; 8: a code with a
            // quantity has rows in `idx_code_value`; 9: casts of repeating elements and computed
            // values give rows; 10: resources inside a Bundle (`composition.…`) give rows. The
            // types are reindexed in the background, after the store opens.
            let mut types = Vec::new();
            if v < 8 {
                types.extend(self.indexer().resource_composite_types());
            }
            if v < 9 {
                types.extend(self.indexer().repeating_cast_types(self.registry().model()));
                types.extend(self.indexer().computed_value_types());
            }
            types.extend(self.indexer().embedding_types());
            if types
                .iter()
                .any(|t| t == "Resource" || t == "DomainResource")
            {
                types = vec!["*".to_string()];
            }
            types.sort();
            types.dedup();
            tracing::info!(
                types = types.len(),
                from = v,
                "types to reindex in the background"
            );
            self.schedule_reindex(&mut tx, &types).await?;
        }
        let upsert = self.sql(META_UPSERT);
        sqlx::query(&upsert)
            .bind("schema_version")
            .bind(SCHEMA_VERSION)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if bodies_dropped > 0 {
            tracing::info!(
                versions = bodies_dropped,
                "current versions' second copy dropped from the history"
            );
            if self.backend() == Backend::Sqlite {
                // That rewrote every history page (3.4 GB of WAL for a 1M-resource store): copy
                // it back and give the log file's space back rather than keep it at that size.
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(self.pool())
                    .await?;
            }
        }
        self.load_params().await?;
        if self.backend() == Backend::Sqlite {
            // Statistics for the planner on the tables that need them (cheap when fresh).
            sqlx::query("PRAGMA optimize=0x10002")
                .execute(self.pool())
                .await?;
        }
        if old_layout {
            let n = self.reindex().await?;
            tracing::info!(resources = n, from = ?before, "store migrated; search index rebuilt");
        }
        Ok(())
    }

    /// The recorded schema version, if the store has one.
    async fn schema_version(&self) -> Option<u32> {
        sqlx::query(&self.sql(META_GET))
            .bind("schema_version")
            .fetch_optional(self.pool())
            .await
            .ok()
            .flatten()
            .and_then(|r| r.try_get::<String, _>(0).ok())
            .and_then(|v| v.parse().ok())
    }

    async fn load_params(&self) -> Result<(), StoreError> {
        let rows = sqlx::query("SELECT pid, rtype, code FROM kz_param")
            .fetch_all(self.pool())
            .await?;
        let mut ids = ParamIds::default();
        for r in rows {
            let pid: i64 = match r.try_get::<i64, _>(0) {
                Ok(v) => v,
                Err(_) => r.try_get::<i32, _>(0)? as i64,
            };
            let (rt, code) = (r.try_get::<String, _>(1)?, r.try_get::<String, _>(2)?);
            ids.by_key.entry(rt).or_default().insert(code, pid);
        }
        if let Ok(mut p) = self.params.write() {
            *p = ids;
        }
        Ok(())
    }

    /// The id of a parameter of a type, if any resource was ever indexed with it.
    pub(crate) fn pid(&self, rt: &str, code: &str) -> Option<i64> {
        self.params.read().ok()?.get(rt, code)
    }

    /// The ids whose rows hold a parameter's values (with `suffix`, one of its pseudo-parameters):
    /// its own, or for a union parameter those of its members.
    pub(crate) fn pids(&self, rt: &str, code: &str, suffix: &str) -> Vec<i64> {
        self.member_codes(rt, code)
            .iter()
            .filter_map(|c| self.pid(rt, &format!("{c}{suffix}")))
            .collect()
    }

    /// The codes whose rows hold a parameter's values: its own, or for a union parameter its
    /// members' (themselves resolved the same way), for a name or address those of its parts
    /// with parameters of their own, and those of the parameters narrowing it (`patient` for
    /// `subject`).
    pub(crate) fn member_codes(&self, rt: &str, code: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_codes(rt, code, &mut out, 0);
        out
    }

    fn collect_codes(&self, rt: &str, code: &str, out: &mut Vec<String>, depth: u8) {
        let (members, parts) = self
            .indexer()
            .param(rt, code)
            .map(|p| {
                let parts = p.part_params.iter().map(|x| x.code.clone());
                let parts: Vec<String> = parts.chain(p.narrowings.iter().cloned()).collect();
                (p.union_of.clone(), parts)
            })
            .unwrap_or_default();
        if members.is_empty() || depth > 4 {
            out.push(code.to_string());
            // A name's or address's parts, and narrower parameters, indexed under their own codes.
            for c in parts {
                if depth <= 4 && !out.contains(&c) {
                    self.collect_codes(rt, &c, out, depth + 1);
                }
            }
        } else {
            for m in members {
                self.collect_codes(rt, &m, out, depth + 1);
            }
        }
    }

    /// Makes sure every (type, code) has an id, in its own short transaction: a write that rolls
    /// back never leaves the cache holding an id the database does not have.
    pub(crate) async fn ensure_params(&self, keys: &[(&str, &str)]) -> Result<(), StoreError> {
        let mut missing: Vec<(String, String)> = {
            let Ok(p) = self.params.read() else {
                return Ok(());
            };
            keys.iter()
                .filter(|(rt, code)| p.get(rt, code).is_none())
                .map(|(rt, code)| (rt.to_string(), code.to_string()))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort();
        missing.dedup();
        tracing::debug!(parameters = missing.len(), "new parameter ids");
        {
            let _serial = self.writer_lock().await;
            let mut tx = self.begin_write().await?;
            let sql = self.sql("INSERT INTO kz_param (rtype, code) VALUES (?, ?) ON CONFLICT (rtype, code) DO NOTHING");
            for (rt, code) in &missing {
                tx.execute(&sql, &[Bind::S(rt.clone()), Bind::S(code.clone())])
                    .await?;
            }
            tx.commit().await?;
        }
        self.load_params().await
    }
}
