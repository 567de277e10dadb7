//! `kizuna audit`: verify a log directory against its checkpoint key.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use kizuna_audit::checkpoint::{public_key_from_hex, CheckpointSigner};

/// Subcommands of `kizuna audit`.
#[derive(Subcommand)]
pub enum AuditCmd {
    /// 監査ログを検証 / Verify the log: recompute every entry against the signed checkpoints.
    Verify {
        /// ログのディレクトリ / log directory
        #[arg(long, default_value = "kizuna-data/audit")]
        dir: PathBuf,
        /// 署名者の公開鍵 (hex) / the checkpoint signer's public key (hex)
        #[arg(long, conflicts_with = "key_file")]
        public_key: Option<String>,
        /// 署名鍵ファイル (公開鍵をここから得る) / the signing key file (to derive the public key)
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// JSON で出力 / print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// 署名鍵の公開鍵を表示 / Print the public key of a checkpoint key file (created if missing).
    PublicKey {
        /// 署名鍵ファイル / key file
        #[arg(long, default_value = "kizuna-data/audit.key")]
        key_file: PathBuf,
    },
}

/// Runs `kizuna audit …`; verify exits 1 when anything is wrong.
pub fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Verify {
            dir,
            public_key,
            key_file,
            json,
        } => {
            let key = match (public_key, key_file) {
                (Some(h), _) => public_key_from_hex(&h)?,
                (None, Some(f)) => CheckpointSigner::load_or_create(&f)?.verifying_key(),
                (None, None) => anyhow::bail!(
                    "--public-key か --key-file が必要です / give --public-key or --key-file"
                ),
            };
            let r = kizuna_audit::verify_dir(&dir, &key)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for p in &r.problems {
                    println!("NG {p}");
                }
                println!(
                    "{} 件 / entries, {} チェックポイント / checkpoints, {} 件が署名済み / covered, {} 件が未署名 / not yet covered, {} 問題 / problems",
                    r.entries,
                    r.checkpoints,
                    r.covered,
                    r.uncovered(),
                    r.problems.len()
                );
            }
            Ok(if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        AuditCmd::PublicKey { key_file } => {
            let s = CheckpointSigner::load_or_create(&key_file)?;
            println!("{}", s.public_hex());
            Ok(ExitCode::SUCCESS)
        }
    }
}
