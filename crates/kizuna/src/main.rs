//! `kizuna`: the one binary of the kizuna health-data infrastructure.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// mimalloc: the server allocates and frees millions of small JSON nodes; glibc's allocator spent
/// a third of the request path merging and splitting free chunks. Called through
/// [`allocator::WordAligned`], which skips mimalloc's aligned entry points when any block will do.
#[global_allocator]
static GLOBAL: allocator::WordAligned = allocator::WordAligned;

mod allocator;
mod audit_cmd;
mod bench_cmd;
mod bench_fhir;
mod bench_load;
mod bench_peers;
mod bench_server;
mod bench_share;
mod database;
mod demo_cmd;
mod post;
mod reindex_cmd;
mod request_runtime;
mod retention_cmd;
mod serve_cmd;
mod share_load;
mod synth_cmd;
mod token_cmd;
mod validate_cmd;

/// kizuna (絆) — 電子カルテ情報共有サービスと医療等情報の二次利用基盤
/// / Japan's EHR information sharing service and secondary-use platform.
#[derive(Parser)]
#[command(name = "kizuna", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// FHIR リソースを検証する / Validate FHIR resources (JSON, NDJSON, XML) against their profiles.
    Validate(validate_cmd::ValidateArgs),
    /// 適合性テストを実行する / Run a conformance suite.
    Conformance {
        #[command(subcommand)]
        suite: Suite,
    },
    /// 読み込んだ FHIR パッケージを表示する / List the loaded FHIR packages and their load time.
    Packages,
    /// サーバーを起動 / Start the server (FHIR REST API at /fhir) on the embedded SQLite default or PostgreSQL.
    Serve(serve_cmd::ServeArgs),
    /// 合成データを生成 / Generate a synthetic population, JP-CLINS submissions and holder datasets.
    Synth(synth_cmd::SynthArgs),
    /// 開発用トークン / Development tokens (the built-in issuer; trusted only where configured).
    Token {
        #[command(subcommand)]
        cmd: token_cmd::TokenCmd,
    },
    /// 性能測定 / Benchmarks that write a JSON report (store ingest, read and search latency).
    Bench {
        #[command(subcommand)]
        cmd: bench_cmd::BenchCmd,
    },
    /// デモ / Start the sharing service with a generated population already registered, and print a walkthrough.
    Demo(demo_cmd::DemoArgs),
    /// 保存期間 / Retention: delete shared items whose retention period has passed.
    Retention {
        #[command(subcommand)]
        cmd: retention_cmd::RetentionCmd,
    },
    /// 索引の再構築 / Rebuild the search index of some types from the stored resources (after loading new SearchParameters).
    Reindex(reindex_cmd::ReindexArgs),
    /// 監査ログ / The audit log: verify it, show the checkpoint public key.
    Audit {
        #[command(subcommand)]
        cmd: audit_cmd::AuditCmd,
    },
}

#[derive(Subcommand)]
enum Suite {
    /// HL7 FHIRPath テストスイート / The HL7 FHIRPath test suite (tests-fhir-r4.xml).
    Fhirpath {
        /// tests-fhir-r4.xml のパス / path to tests-fhir-r4.xml
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    allocator::init();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("エラー / error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate(args) => validate_cmd::run(args),
        Command::Conformance {
            suite: Suite::Fhirpath { file },
        } => {
            let reg = kizuna_fhir::Registry::builtin();
            let term = kizuna_fhir::terminology::Terminology::builtin();
            let validator = kizuna_fhir::validate::Validator::builtin();
            let results =
                kizuna_fhir::conformance::run_fhirpath_suite(&file, reg, term, Some(validator))
                    .with_context(|| format!("{}", file.display()))?;
            let mut passed = 0;
            let mut failed = 0;
            for r in &results {
                if r.passed {
                    passed += 1;
                } else {
                    failed += 1;
                    println!(
                        "FAIL {}/{}: {} — {}",
                        r.test.group,
                        r.test.name,
                        r.test.expression.trim(),
                        r.detail
                    );
                }
            }
            println!("{passed} passed, {failed} failed");
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Serve(a) => serve_cmd::run(a),
        Command::Synth(a) => synth_cmd::run(a),
        Command::Token { cmd } => token_cmd::run(cmd),
        Command::Audit { cmd } => audit_cmd::run(cmd),
        Command::Demo(a) => demo_cmd::run(a),
        Command::Retention { cmd } => retention_cmd::run(cmd),
        Command::Reindex(a) => reindex_cmd::run(a),
        Command::Bench { cmd } => bench_cmd::run(cmd),
        Command::Packages => {
            let t = std::time::Instant::now();
            let reg = kizuna_fhir::Registry::load_builtin()?;
            let elapsed = t.elapsed();
            for p in reg.packages() {
                println!(
                    "{}@{}\t{} definitions\t{} examples",
                    p.name, p.version, p.resources, p.examples
                );
            }
            println!(
                "{} canonical URLs, {} types; 読み込み時間 / load time {:.0} ms",
                reg.len(),
                reg.model().len(),
                elapsed.as_secs_f64() * 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
