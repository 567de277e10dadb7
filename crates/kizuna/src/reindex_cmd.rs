//! `kizuna reindex`: rebuilds the search index of some types (or all) from the stored bodies, for
//! an operator who loaded SearchParameters the stored resources predate. The work is recorded in
//! the store first, so if this command is stopped, the next `kizuna serve` finishes it in the
//! background.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

/// Options of `kizuna reindex`.
#[derive(Args)]
pub struct ReindexArgs {
    /// データディレクトリ / data directory
    #[arg(long, default_value = "kizuna-data")]
    data_dir: PathBuf,
    /// データベース URL (省略時は組み込み SQLite) / database URL (default: embedded SQLite)
    #[arg(long)]
    database: Option<String>,
    /// 再構築するリソース型 (繰り返し可) / a resource type to reindex (repeatable)
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,
    /// すべての型 / every type
    #[arg(long, conflicts_with = "types")]
    all: bool,
}

/// Records the reindex, waits for it with a spinner, and prints a JSON summary.
pub fn run(a: ReindexArgs) -> anyhow::Result<ExitCode> {
    let reg = kizuna_fhir::Registry::builtin();
    let types: Vec<String> = if a.all {
        vec!["*".to_string()]
    } else {
        if a.types.is_empty() {
            bail!("--type か --all を指定してください / give --type (repeatable) or --all");
        }
        for t in &a.types {
            if !reg.model().is_resource(t) {
                bail!("不明なリソース型 / unknown resource type {t}");
            }
        }
        a.types.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = crate::database::open(&a.data_dir, a.database.as_deref()).await?;
        let started = Instant::now();
        store
            .reindex_in_background(&types)
            .await
            .context("再構築を記録できません / cannot record the reindex")?;
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(200));
        let wait = store.reindexed();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    bar.set_message(format!(
                        "索引を再構築中 / reindexing: {}",
                        store.reindexing().join(", ")
                    ));
                }
            }
        }
        bar.finish_and_clear();
        let left = store.reindexing();
        let summary = serde_json::json!({
            "types": types,
            "seconds": started.elapsed().as_secs_f64(),
            "complete": left.is_empty(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
        if !left.is_empty() {
            eprintln!(
                "再構築が止まりました。次に開いたときに再開します / the reindex stopped; it resumes when the store is next opened ({})",
                left.join(", ")
            );
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })
}
