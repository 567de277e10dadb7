//! `kizuna synth`: a synthetic population with its JP-CLINS submissions and holder datasets.

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `kizuna synth`.
#[derive(clap::Args)]
pub struct SynthArgs {
    /// 人数 / number of people
    #[arg(long, default_value_t = 1000)]
    patients: u64,
    /// 乱数の種 (同じ種なら同じ出力) / seed (same seed, byte-identical output)
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// 履歴の年数 (2026-03-31 まで) / years of history ending 2026-03-31
    #[arg(long, default_value_t = 2)]
    years: u32,
    /// 出力先 / output directory
    #[arg(long, default_value = "kizuna-data/synth")]
    out: PathBuf,
    /// スレッド数 (出力には影響しない) / worker threads (does not change the output)
    #[arg(long)]
    threads: Option<usize>,
    /// 生成後に FHIR サーバーへ送信 (FHIR ベース URL) / after generating, POST everything to this FHIR base URL
    #[arg(long, value_name = "URL")]
    post: Option<String>,
    /// 送信時の Bearer トークン (または環境変数 KIZUNA_TOKEN) / bearer token for --post (or KIZUNA_TOKEN)
    #[arg(long, env = "KIZUNA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// 同時送信数 / concurrent connections for --post
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// FHIR NDJSON を gzip で出力 (大規模向け、約 1/10) / gzip the FHIR NDJSON (large runs; about a tenth the size)
    #[arg(long)]
    gzip: bool,
}

/// Runs the generator with a progress bar and prints the summary.
pub fn run(a: SynthArgs) -> anyhow::Result<ExitCode> {
    if a.patients == 0 {
        anyhow::bail!("--patients は 1 以上 / --patients must be at least 1");
    }
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let bar = indicatif::ProgressBar::new(a.patients);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} 人 / people {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let cfg = kizuna_synth::Config {
        patients: a.patients,
        seed: a.seed,
        years: a.years,
        out: a.out.clone(),
        threads,
        gzip: a.gzip,
    };
    let progress = |n: u64| bar.set_position(n.min(a.patients));
    let s = kizuna_synth::generate(&cfg, &progress)?;
    bar.finish_and_clear();
    println!("合成データ / synthetic data → {}", a.out.display());
    println!(
        "  {} 人 / people ({} 死亡 / deaths, {} 保険期間 / insurance periods), {} 医療機関 / institutions",
        s.people, s.deaths, s.coverage_periods, s.institutions
    );
    for (k, n) in &s.bundles {
        println!("  {k}: {n}");
    }
    println!("  FHIR リソース / resources: {}", s.resources);
    for (k, n) in &s.holder_records {
        println!("  holder/{k}: {n}");
    }
    println!(
        "  {:.1} 秒 / s, {:.0} 人/分 / people per minute",
        s.seconds,
        s.people as f64 * 60.0 / s.seconds.max(1e-9)
    );
    if let Some(base) = &a.post {
        let r = crate::post::post_dir(
            &a.out.join("fhir"),
            base,
            a.token.as_deref(),
            a.concurrency.max(1),
        )?;
        println!(
            "送信 / posted to {base}: {} 件成功 / ok, {} 件失敗 / failed, {:.0} 件/秒 / per s",
            r.ok,
            r.failed,
            r.ok as f64 / r.seconds.max(1e-9)
        );
        for e in &r.first_errors {
            println!("  NG {e}");
        }
        if r.failed > 0 {
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}
