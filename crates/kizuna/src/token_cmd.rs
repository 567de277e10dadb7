//! `kizuna token`: tokens from the built-in development issuer, for trying the embedded default.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use kizuna_auth::dev::{DevIssuer, TokenRequest};
use kizuna_auth::Role;

/// The audience of the embedded default server.
pub const DEFAULT_AUDIENCE: &str = "http://127.0.0.1:8080/fhir";

/// Subcommands of `kizuna token`.
// Parsed once per process; boxing the larger variant would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum TokenCmd {
    /// 開発用トークンを発行 / Issue a development token (EdDSA, from ./kizuna-data/dev-issuer.key).
    Issue {
        /// 役割 / role: institution, clinician, patient, insurer, researcher, reviewer, operator
        #[arg(long)]
        role: String,
        /// 医療機関番号 (10 桁) / institution number
        #[arg(long)]
        institution: Option<String>,
        /// 資格 / qualification: doctor, dentist, pharmacist, nurse
        #[arg(long)]
        qualification: Option<String>,
        /// 本人の person id / the patient's person id
        #[arg(long)]
        person: Option<String>,
        /// 保険者番号 / insurer number
        #[arg(long)]
        insurer: Option<String>,
        /// 所属組織 / organisation (researchers, reviewers)
        #[arg(long)]
        organization: Option<String>,
        /// 利用者区分 / researcher category: public-body, academic, pharmaceutical, device, other
        #[arg(long)]
        researcher_category: Option<String>,
        /// SMART スコープ (省略時は役割の既定) / SMART scopes (default: the role's usual ones)
        #[arg(long)]
        scope: Option<String>,
        /// sub
        #[arg(long)]
        subject: Option<String>,
        /// 有効期間 (秒) / lifetime in seconds
        #[arg(long, default_value_t = 3600)]
        lifetime: i64,
        /// aud
        #[arg(long, default_value = DEFAULT_AUDIENCE)]
        audience: String,
        /// 鍵ファイル / key file
        #[arg(long, default_value = "kizuna-data/dev-issuer.key")]
        key_file: PathBuf,
    },
    /// 開発用発行者の JWKS を表示 / Print the development issuer's JWKS.
    Jwks {
        /// 鍵ファイル / key file
        #[arg(long, default_value = "kizuna-data/dev-issuer.key")]
        key_file: PathBuf,
        /// aud
        #[arg(long, default_value = DEFAULT_AUDIENCE)]
        audience: String,
    },
}

/// Runs `kizuna token …`.
pub fn run(cmd: TokenCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCmd::Issue {
            role,
            institution,
            qualification,
            person,
            insurer,
            organization,
            researcher_category,
            scope,
            subject,
            lifetime,
            audience,
            key_file,
        } => {
            let role = Role::parse(&role)
                .ok_or_else(|| anyhow::anyhow!("不明な役割 / unknown role {role:?}"))?;
            let issuer = DevIssuer::load_or_create(&key_file, &audience)?;
            let mut r = TokenRequest::for_role(role);
            r.institution = institution;
            r.qualification = qualification;
            r.person = person;
            r.insurer = insurer;
            r.organization = organization;
            r.researcher_category = researcher_category;
            if let Some(s) = scope {
                r.scope = s;
            }
            if let Some(s) = subject {
                r.subject = s;
            }
            r.lifetime = lifetime;
            // Refuse what the verifier would refuse, before printing a useless token.
            let token = issuer.issue(&r, chrono::Utc::now().timestamp())?;
            let verifier = kizuna_auth::jwt::TokenVerifier::new(vec![issuer.trusted()]);
            verifier.verify(&token, chrono::Utc::now().timestamp())?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        TokenCmd::Jwks { key_file, audience } => {
            let issuer = DevIssuer::load_or_create(&key_file, &audience)?;
            println!("{}", serde_json::to_string_pretty(&issuer.jwks())?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
