//! `kizuna retention run`: the retention job on demand (the server also runs it on schedule), with
//! an optional `--now` to run as of another date.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use kizuna_auth::{Principal, Role, ScopeSet};

/// Subcommands of `kizuna retention`.
#[derive(Subcommand)]
pub enum RetentionCmd {
    /// 保存期間を過ぎた共有情報を削除 / Delete shared items past their retention period, once.
    Run(RetentionArgs),
}

/// Options of `kizuna retention run`.
#[derive(Args)]
pub struct RetentionArgs {
    /// データディレクトリ / data directory
    #[arg(long, default_value = "kizuna-data")]
    data_dir: PathBuf,
    /// データベース URL (省略時は組み込み SQLite) / database URL (default: embedded SQLite)
    #[arg(long)]
    database: Option<String>,
    /// この時点として実行 (RFC 3339) / run as of this instant (RFC 3339)
    #[arg(long)]
    now: Option<String>,
}

/// The principal the retention job acts as: the operator's scheduler (audited as such).
pub fn scheduler() -> Principal {
    Principal {
        subject: "retention-scheduler".into(),
        issuer: "kizuna".into(),
        role: Role::Operator,
        institution: None,
        qualification: None,
        person: None,
        insurer: None,
        organization: None,
        researcher_category: None,
        scopes: ScopeSet::default(),
        token_id: None,
    }
}

/// Runs retention once and prints the report.
pub fn run(cmd: RetentionCmd) -> anyhow::Result<ExitCode> {
    let RetentionCmd::Run(a) = cmd;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = crate::database::open(&a.data_dir, a.database.as_deref()).await?;
        let clock: Arc<dyn kizuna_share::Clock> = match &a.now {
            Some(t) => Arc::new(kizuna_share::FixedClock::at(
                chrono::DateTime::parse_from_rfc3339(t)
                    .context("--now は RFC 3339 です / --now must be RFC 3339")?
                    .with_timezone(&chrono::Utc),
            )),
            None => Arc::new(kizuna_share::SystemClock),
        };
        let signer = match kizuna_audit::CheckpointSigner::from_env()? {
            Some(s) => s,
            None => kizuna_audit::CheckpointSigner::load_or_create(&a.data_dir.join("audit.key"))?,
        };
        let log = kizuna_audit::AuditLog::open(
            &a.data_dir.join("audit"),
            kizuna_audit::LogOptions {
                signer: Some(signer),
                policy: kizuna_audit::CheckpointPolicy::default(),
                sync: true,
            },
        )?;
        let audit = kizuna_audit::AuditWriter::spawn(log);
        let share = kizuna_share::ShareService::new(
            store,
            kizuna_fhir::validate::Validator::builtin(),
            clock,
            kizuna_share::ShareConfig::default(),
            Some(audit.clone()),
        );
        let report = share.run_retention(&scheduler()).await?;
        audit.flush()?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        Ok(ExitCode::SUCCESS)
    })
}
