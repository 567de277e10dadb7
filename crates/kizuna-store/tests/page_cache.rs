//! The page cache wrapper ([`kizuna_store::page_cache`]) under a workload that makes SQLite's B-tree
//! rebalance sibling pages: the pages it parks go through the wrapper, and the database stays
//! intact and holds exactly what was written, in the writing connection and after reopening.
//!
//! This file holds one test so that it runs in a process of its own: the wrapper can only be
//! installed before SQLite first initialises.

mod support;

use std::collections::BTreeMap;

use support::{change, contents, integrity, Rng};

#[test]
fn rebalancing_through_the_wrapper_keeps_the_database_exact() {
    assert!(
        kizuna_store::page_cache::install(),
        "the wrapper installs before SQLite first initialises"
    );
    assert!(
        kizuna_store::page_cache::install(),
        "installing twice is harmless"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.db");
    let mut conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA cache_size=-65536;
         CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
         CREATE INDEX t_v ON t (v);",
    )
    .expect("schema");
    let mut model = BTreeMap::new();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..60 {
        let tx = conn.transaction().expect("begin");
        for _ in 0..800 {
            let r = rng.next();
            // Random keys of varying length fill pages unevenly, so siblings get split and merged.
            let k = format!("{:x}{}", r % 50_000, "x".repeat((r >> 40) as usize % 60));
            let v = (r >> 8) as i64 % 1_000_000;
            change(&tx, &mut model, k, (r % 5 != 0).then_some(v));
        }
        // Every tenth transaction is rolled back: the cache must drop what it held for it.
        if round % 10 == 9 {
            tx.rollback().expect("rollback");
            model = contents::<String, i64>(&conn);
        } else {
            tx.commit().expect("commit");
        }
    }
    assert!(
        kizuna_store::page_cache::parked_pages() > 0,
        "the workload made SQLite park pages, so the wrapper's remapping was exercised"
    );
    assert_eq!(integrity(&conn), "ok");
    assert_eq!(contents(&conn), model);
    drop(conn);
    let conn = rusqlite::Connection::open(&path).expect("reopen");
    assert_eq!(integrity(&conn), "ok");
    assert_eq!(contents(&conn), model, "the file holds what was committed");
    // Installed with the wrapper: no memory statistics, so SQLite's allocations take no global
    // mutex. With them, 60 rounds through a 64 MiB cache count megabytes here.
    // SAFETY: reads a counter.
    assert_eq!(unsafe { rusqlite::ffi::sqlite3_memory_used() }, 0);
}
