//! The WAL write buffer ([`kizuna_store::wal_buffer`]): readers on the default VFS see every
//! commit the moment it returns, the file stays exact through spills, overwritten frames, rolled
//! back transactions and restarts of the log, and a writer killed at any moment loses no commit it
//! had acknowledged.

use std::collections::BTreeMap;
use std::io::BufRead;

use rusqlite::{Connection, OpenFlags};
use support::{change, contents, integrity, Rng};

mod support;

fn writer(path: &std::path::Path, settings: &str) -> Connection {
    assert!(kizuna_store::wal_buffer::register(), "the VFS registers");
    let conn = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        kizuna_store::wal_buffer::VFS_NAME,
    )
    .expect("open through the VFS");
    conn.execute_batch(settings).expect("settings");
    conn
}

fn value(rng: &mut Rng) -> Vec<u8> {
    let len = 50 + (rng.next() % 3000) as usize;
    let seed = rng.next();
    (0..len).map(|i| (seed >> (i % 57)) as u8).collect()
}

#[test]
fn readers_see_every_commit_and_the_file_stays_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.db");
    // A tiny cache makes large transactions spill frames before they commit and write some
    // pages twice (overwriting their frame in place); a low threshold restarts the log often.
    let mut w = writer(
        &path,
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=16;
         PRAGMA wal_autocheckpoint=1000;
         CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);
         CREATE INDEX IF NOT EXISTS t_v ON t (v);",
    );
    let reader = Connection::open(&path).expect("reader on the default VFS");
    let (runs, gathered) = (
        kizuna_store::wal_buffer::runs_written(),
        kizuna_store::wal_buffer::writes_gathered(),
    );
    let mut model: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for round in 0..120 {
        let tx = w.transaction().expect("begin");
        let mut changed = model.clone();
        // Mostly small transactions; every tenth is large enough to spill.
        let n = if round % 10 == 9 {
            600
        } else {
            1 + rng.next() % 40
        };
        for _ in 0..n {
            let k = (rng.next() % 5_000) as i64;
            let v = value(&mut rng);
            change(&tx, &mut changed, k, (rng.next() % 5 != 0).then_some(v));
        }
        if round % 13 == 6 {
            tx.rollback().expect("rollback");
        } else {
            tx.commit().expect("commit");
            model = changed;
        }
        assert_eq!(
            contents(&reader),
            model,
            "a reader on the default VFS sees round {round} as soon as it returns"
        );
        if round % 5 == 4 {
            // What the files hold now is what a crash would leave: recovering a copy of them
            // (which checks every frame's checksum) must give exactly the commits so far.
            let copy = tempfile::tempdir().expect("tempdir");
            for (from, to) in [("t.db", "c.db"), ("t.db-wal", "c.db-wal")] {
                std::fs::copy(dir.path().join(from), copy.path().join(to)).expect("copy");
            }
            let recovered = Connection::open(copy.path().join("c.db")).expect("open the copy");
            assert_eq!(integrity(&recovered), "ok", "round {round}");
            assert_eq!(
                contents(&recovered),
                model,
                "round {round}: recovery from the files gives every commit"
            );
        }
    }
    assert!(
        kizuna_store::wal_buffer::writes_gathered() > gathered + 1000
            && kizuna_store::wal_buffer::runs_written() > runs,
        "the writes went through the buffer"
    );
    let header = std::fs::read(dir.path().join("t.db-wal")).expect("read the log");
    let restarts = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);
    assert!(
        restarts > 0,
        "the log started over (its header written at offset 0 again)"
    );
    assert_eq!(integrity(&w), "ok");
    drop(reader);
    drop(w);
    let reopened = Connection::open(&path).expect("reopen");
    assert_eq!(integrity(&reopened), "ok");
    assert_eq!(
        contents(&reopened),
        model,
        "the file holds exactly the commits"
    );
}

/// Set in the child process of the kill test: the database it writes to.
const CHILD_ENV: &str = "KIZUNA_WAL_BUFFER_CHILD_DB";
/// Rows each transaction of the kill test writes.
const ROWS_PER_COMMIT: i64 = 37;

/// The child: commits transaction after transaction, each announced on stdout once `COMMIT`
/// returned, until it is killed. Its cache is tiny, so transactions spill pages before they
/// commit and rewrite some frames in place (SQLite then rewrites their checksums at commit).
fn run_child(path: &str) -> ! {
    let mut w = writer(
        std::path::Path::new(path),
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=8;
         PRAGMA wal_autocheckpoint=128; PRAGMA busy_timeout=10000;
         CREATE TABLE IF NOT EXISTS c (txn INTEGER NOT NULL, i INTEGER NOT NULL, v BLOB NOT NULL,
                                       PRIMARY KEY (txn, i));",
    );
    let start: i64 = w
        .query_row("SELECT coalesce(max(txn), 0) + 1 FROM c", [], |r| r.get(0))
        .expect("next transaction number");
    let mut rng = Rng(start as u64 * 0x9E37_79B9 + 1);
    let mut out = std::io::stdout().lock();
    for txn in start..start + 1_000_000 {
        let tx = w.transaction().expect("begin");
        for i in 0..ROWS_PER_COMMIT {
            tx.execute(
                "INSERT INTO c (txn, i, v) VALUES (?1, ?2, ?3)",
                rusqlite::params![txn, i, value(&mut rng)],
            )
            .expect("insert");
        }
        tx.commit().expect("commit");
        use std::io::Write;
        writeln!(out, "committed {txn}").expect("stdout");
        out.flush().expect("stdout");
        // Idle between transactions, where a commit still held in memory would be lost.
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    std::process::exit(0)
}

#[test]
fn a_killed_writer_loses_no_acknowledged_commit() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        run_child(&path);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("k.db");
    let mut acknowledged = 0i64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..6 {
        let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "a_killed_writer_loses_no_acknowledged_commit",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the writer");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut note = |line: std::io::Result<String>| -> bool {
            match line.expect("child output").strip_prefix("committed ") {
                Some(n) => {
                    acknowledged = n.parse().expect("transaction number");
                    true
                }
                None => false,
            }
        };
        // Kill after a varying number of commits, while the child is in the middle of writing.
        let target = 20 + rng.next() % 200;
        let mut seen = 0;
        for line in lines.by_ref() {
            if note(line) {
                seen += 1;
                if seen == target {
                    break;
                }
            }
        }
        assert_eq!(seen, target, "round {round}: the child wrote until killed");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        // Commits the child announced before the kill landed count as acknowledged too.
        for line in lines {
            note(line);
        }

        let conn = Connection::open(&path).expect("open after the kill");
        assert_eq!(integrity(&conn), "ok", "round {round}");
        let per_txn: Vec<(i64, i64)> = conn
            .prepare("SELECT txn, count(*) FROM c GROUP BY txn ORDER BY txn")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        let last = per_txn.last().map_or(0, |t| t.0);
        assert!(
            last >= acknowledged,
            "round {round}: every acknowledged commit survives (last {last}, acknowledged {acknowledged})"
        );
        assert!(
            last <= acknowledged + 1,
            "round {round}: at most the commit in flight is extra"
        );
        for (i, (txn, rows)) in per_txn.iter().enumerate() {
            assert_eq!(
                *txn,
                i as i64 + 1,
                "round {round}: no transaction is missing"
            );
            assert_eq!(
                *rows, ROWS_PER_COMMIT,
                "round {round}: transaction {txn} is whole"
            );
        }
        acknowledged = last;
    }
}
