//! `kizuna serve`: the FHIR REST API over the store, with token verification and the audit log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kizuna_audit::checkpoint::CheckpointSigner;
use kizuna_audit::{AuditLog, AuditWriter, CheckpointPolicy, LogOptions};
use kizuna_auth::http::{AccessAuditor, AccessDecision, FhirAuth};
use kizuna_auth::jwt::{JwksSource, TokenVerifier, TrustedIssuer};
use kizuna_server::{AppState, ValidationConfig, ValidationMode};

/// Arguments of `kizuna serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// 待ち受けアドレス / listen address
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// データディレクトリ / data directory (SQLite database, audit log, keys)
    #[arg(long, default_value = "kizuna-data")]
    data_dir: PathBuf,
    /// データベース URL (省略時は組み込み SQLite) / database URL (default: embedded SQLite in the data directory)
    #[arg(long)]
    database: Option<String>,
    /// 開発用発行者のトークンを受け付ける (開発専用) / accept development-issuer tokens (development only)
    #[arg(long)]
    dev_issuer: bool,
    /// 信頼する IdP の JWKS (ファイルまたは URL) / trusted identity provider's JWKS (file or URL)
    #[arg(long, requires_all = ["issuer", "audience"])]
    jwks: Option<String>,
    /// その IdP の iss / its issuer
    #[arg(long)]
    issuer: Option<String>,
    /// このサービスの aud / this service's audience
    #[arg(long)]
    audience: Option<String>,
    /// 書き込み時の検証 / validation on write: enforce, warn, off
    #[arg(long, default_value = "enforce")]
    validation: String,
    /// 公開ベース URL / public base URL of /fhir (default: http://ADDR/fhir)
    #[arg(long)]
    base_url: Option<String>,
    /// リクエスト本文の上限 (MB) / largest request body accepted, in MB
    #[arg(long, default_value_t = 64)]
    max_body_mb: usize,
    /// 保存期間の処理の間隔 (時間、0 で無効) / hours between scheduled retention runs (0: never)
    #[arg(long, default_value_t = 24)]
    retention_hours: u64,
}

impl ServeArgs {
    /// The settings `kizuna demo` serves with: development issuer, embedded SQLite in `data_dir`.
    pub fn demo(addr: SocketAddr, data_dir: PathBuf) -> ServeArgs {
        ServeArgs {
            addr,
            data_dir,
            database: None,
            dev_issuer: true,
            jwks: None,
            issuer: None,
            audience: None,
            validation: "enforce".into(),
            base_url: None,
            max_body_mb: 64,
            retention_hours: 24,
        }
    }
}

/// Refusals by the auth middleware, written to the audit log.
struct AuditSink(AuditWriter);

impl AccessAuditor for AuditSink {
    fn record(&self, d: AccessDecision) {
        self.0
            .record(d.to_audit_entry(chrono::Utc::now().to_rfc3339()));
    }
}

/// Runs the server until Ctrl-C, then flushes and checkpoints the audit log.
pub fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let rt = crate::request_runtime::build()?;
    rt.block_on(serve(a, None))
}

/// Serves until Ctrl-C; `ready` receives the base URL once the port is bound.
pub async fn serve(
    a: ServeArgs,
    ready: Option<tokio::sync::oneshot::Sender<String>>,
) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&a.data_dir).with_context(|| a.data_dir.display().to_string())?;
    // Bound first, so that port 0 (any free port) gives the real address in the base URL.
    let listener = tokio::net::TcpListener::bind(a.addr)
        .await
        .with_context(|| a.addr.to_string())?;
    let bound = listener.local_addr()?;
    let base_url = a
        .base_url
        .clone()
        .unwrap_or_else(|| format!("http://{bound}/fhir"));
    let mut issuers = Vec::new();
    if let (Some(j), Some(iss), Some(aud)) = (&a.jwks, &a.issuer, &a.audience) {
        let source = if j.starts_with("http://") || j.starts_with("https://") {
            JwksSource::Url {
                url: j.clone(),
                ttl: std::time::Duration::from_secs(600),
            }
        } else {
            JwksSource::File(PathBuf::from(j))
        };
        issuers.push(TrustedIssuer {
            issuer: iss.clone(),
            audience: aud.clone(),
            jwks: source,
        });
    }
    if a.dev_issuer {
        let dev = kizuna_auth::dev::DevIssuer::load_or_create(
            &a.data_dir.join("dev-issuer.key"),
            &base_url,
        )?;
        issuers.push(dev.trusted());
        eprintln!("警告: 開発用発行者のトークンを受け付けます / WARNING: development-issuer tokens are accepted");
    }
    if issuers.is_empty() {
        anyhow::bail!("認証の設定が必要です: --jwks/--issuer/--audience か --dev-issuer / configure authentication: --jwks/--issuer/--audience, or --dev-issuer for development");
    }
    let validation = match a.validation.as_str() {
        "enforce" => ValidationMode::Enforce,
        "warn" => ValidationMode::Warn,
        "off" => ValidationMode::Off,
        other => {
            anyhow::bail!("--validation は enforce, warn, off / unknown validation mode {other}")
        }
    };
    let url = crate::database::url(&a.data_dir, a.database.as_deref());
    let store = kizuna_store::Store::open(&url, kizuna_fhir::Registry::builtin()).await?;
    let signer = match CheckpointSigner::from_env()? {
        Some(s) => s,
        None => CheckpointSigner::load_or_create(&a.data_dir.join("audit.key"))?,
    };
    let public = signer.public_hex();
    let log = AuditLog::open(
        &a.data_dir.join("audit"),
        LogOptions {
            signer: Some(signer),
            policy: CheckpointPolicy::default(),
            sync: true,
        },
    )?;
    let audit = AuditWriter::spawn(log);
    let share = Arc::new(kizuna_share::ShareService::new(
        store.clone(),
        kizuna_fhir::validate::Validator::builtin(),
        Arc::new(kizuna_share::SystemClock),
        kizuna_share::ShareConfig::default(),
        Some(audit.clone()),
    ));
    let auth = Arc::new(FhirAuth {
        verifier: TokenVerifier::new(issuers),
        auditor: Arc::new(AuditSink(audit.clone())),
        now: Arc::new(|| chrono::Utc::now().timestamp()),
    });
    let export_dir = a.data_dir.join("export");
    let mut exports = kizuna_server::export::ExportJobs::open(&export_dir)
        .with_context(|| export_dir.display().to_string())?;
    exports.on_streaming = Some(crate::allocator::export_streaming);
    let state = Arc::new(AppState {
        store,
        validator: kizuna_fhir::validate::Validator::builtin(),
        validation: ValidationConfig {
            default: validation,
            per_profile: Default::default(),
        },
        auth: Some(auth),
        audit: Some(audit.clone()),
        base_url: base_url.clone(),
        exports,
        max_body_bytes: a.max_body_mb.saturating_mul(1024 * 1024),
        share: Some(share.clone()),
    });
    let app = kizuna_server::router(state);
    println!(
        "kizuna: {base_url} ({})",
        if url.starts_with("sqlite") {
            "SQLite"
        } else {
            "PostgreSQL"
        }
    );
    println!("監査ログ公開鍵 / audit checkpoint public key: {public}");
    if a.retention_hours > 0 {
        // The scheduled retention job, acting as the operator (its decisions are audited as such).
        let share = share.clone();
        let every = std::time::Duration::from_secs(a.retention_hours * 3600);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                let op = crate::retention_cmd::scheduler();
                match share.run_retention(&op).await {
                    Ok(r) => tracing::info!(
                        deleted = r.deleted.values().sum::<usize>(),
                        "scheduled retention"
                    ),
                    Err(e) => tracing::error!(error = %e, "scheduled retention failed"),
                }
            }
        });
    }
    if let Some(tx) = ready {
        let _ = tx.send(base_url.clone());
    }
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    let n = audit.flush()?;
    if let Ok(mut l) = audit.log().lock() {
        let _ = l.checkpoint(None);
    }
    println!("停止 / stopped; audit log has {n} entries");
    Ok(ExitCode::SUCCESS)
}
