//! Which database a command uses: `--database`, or the embedded SQLite file in the data directory.

use std::path::Path;

use anyhow::Context;

/// The database URL: `database` when given, else `sqlite://{data_dir}/kizuna.db`.
pub fn url(data_dir: &Path, database: Option<&str>) -> String {
    database
        .map(str::to_string)
        .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("kizuna.db").display()))
}

/// Opens (and migrates) the store a command works on.
pub async fn open(data_dir: &Path, database: Option<&str>) -> anyhow::Result<kizuna_store::Store> {
    kizuna_store::Store::open(&url(data_dir, database), kizuna_fhir::Registry::builtin())
        .await
        .context("データベースを開けません / cannot open the database")
}
