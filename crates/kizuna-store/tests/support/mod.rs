//! Helpers shared by the tests that drive SQLite directly (the page cache wrapper and the WAL
//! write buffer): a replayable generator, a table `t (k, v)` kept beside an in-memory model, and
//! SQLite's own integrity check.

use std::collections::BTreeMap;

use rusqlite::types::FromSql;
use rusqlite::ToSql;

/// A small deterministic generator (xorshift64*), so a failure can be replayed.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Table `t` as a map from `k` to `v`.
pub fn contents<K: FromSql + Ord, V: FromSql>(conn: &rusqlite::Connection) -> BTreeMap<K, V> {
    let mut st = conn
        .prepare("SELECT k, v FROM t ORDER BY k")
        .expect("prepare");
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// One change to table `t` and to its model: a value upserts `k`, `None` deletes it.
pub fn change<K: ToSql + Ord, V: ToSql>(
    tx: &rusqlite::Transaction,
    model: &mut BTreeMap<K, V>,
    k: K,
    v: Option<V>,
) {
    match v {
        None => {
            tx.execute("DELETE FROM t WHERE k = ?1", [&k])
                .expect("delete");
            model.remove(&k);
        }
        Some(v) => {
            tx.execute(
                "INSERT INTO t (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                rusqlite::params![k, v],
            )
            .expect("upsert");
            model.insert(k, v);
        }
    }
}

/// `PRAGMA integrity_check`'s answer (`ok` when the file is sound).
pub fn integrity(conn: &rusqlite::Connection) -> String {
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}
