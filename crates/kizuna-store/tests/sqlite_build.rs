//! How the bundled SQLite is compiled: the workspace's `.cargo/config.toml` removes
//! `SQLITE_ENABLE_MEMORY_MANAGEMENT`, which would put every connection's page cache behind one
//! mutex. A build that lost the setting (run from outside the workspace, or a changed
//! `libsqlite3-sys`) fails here instead of only running slower.

#[test]
fn each_connection_keeps_its_own_page_cache() {
    let conn = rusqlite::Connection::open_in_memory().expect("open");
    let mut stmt = conn.prepare("PRAGMA compile_options").expect("pragma");
    let options: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert!(
        options.iter().any(|o| o == "THREADSAFE=1"),
        "the options were read: {options:?}"
    );
    assert!(
        !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
        "SQLITE_ENABLE_MEMORY_MANAGEMENT is compiled in: {options:?}"
    );
}
