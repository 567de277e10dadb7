//! # kizuna-auth
//!
//! Who is calling and what they may ask for.
//!
//! - [`principal`]: every kind of user the seeds name (institution systems, clinicians with their
//!   qualification, patients bound to one person, insurers, researchers with their category, reviewers,
//!   the operator) and the identifiers each needs (10-digit 医療機関番号, 保険者番号).
//! - [`scope`]: SMART App Launch v2 scopes (v1 accepted) and the permission each FHIR interaction needs.
//! - [`jwt`]: bearer-token verification against trusted issuers' JWKS (RS256, ES256, EdDSA).
//! - [`dev`]: the development issuer for the embedded default (trusted only when configured).
//! - [`http`]: the axum middleware that enforces all of this on `/fhir` and audits every refusal.
//!
//! Access *policy* (consent, flags, emergency) is not decided here: it is the sharing service's one
//! policy function, which receives the [`Principal`] and the [`scope::Grant`] from this crate.

pub mod dev;
pub mod http;
pub mod jwt;
pub mod principal;
pub mod scope;

pub use principal::{
    InstitutionNumber, InsurerNumber, Principal, Qualification, ResearcherCategory, Role,
};
pub use scope::{Context, Grant, Interaction, Permission, Scope, ScopeSet};

/// Why a caller was refused. Each variant names its rule for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token.
    #[error(
        "認証が必要です (Bearer トークンがありません) / authentication required: no bearer token"
    )]
    MissingToken,
    /// Not a well-formed JWT.
    #[error("トークンが不正です / malformed token: {0}")]
    Malformed(String),
    /// The signature does not verify.
    #[error("トークンの署名が不正です / token signature is invalid")]
    BadSignature,
    /// `alg` is not RS256, ES256 or EdDSA (or does not match the key).
    #[error("署名アルゴリズムが許可されていません / signing algorithm not allowed: {0}")]
    AlgorithmNotAllowed(String),
    /// No key with the token's `kid`.
    #[error("署名鍵が不明です / unknown signing key {0:?}")]
    UnknownKey(String),
    /// `exp` has passed.
    #[error("トークンの有効期限が切れています / token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("トークンはまだ有効ではありません / token not yet valid")]
    NotYetValid,
    /// The issuer is not trusted.
    #[error("発行者が信頼されていません / untrusted issuer {0:?}")]
    WrongIssuer(String),
    /// The audience is not this service.
    #[error("トークンの対象 (aud) が違います / token audience is not this service")]
    WrongAudience,
    /// Claims are missing or contradict the role.
    #[error("トークンの内容が不正です / invalid token claims: {0}")]
    InvalidClaims(String),
    /// The JWKS could not be loaded.
    #[error("JWKS を取得できません / cannot load JWKS: {0}")]
    Jwks(String),
    /// A key file problem.
    #[error("鍵のエラー / key error: {0}")]
    Key(String),
    /// The token lacks the scope the interaction needs.
    #[error("スコープが不足しています (必要: {0}) / insufficient scope (needs {0})")]
    InsufficientScope(String),
    /// An operation on the whole store (`$reindex`) asked for by a role other than the operator.
    #[error("運営者のみが実行できる操作です / only the operator may run ${0}")]
    OperatorOnly(String),
}

impl AuthError {
    /// HTTP status: 403 for a good token without the needed scope, 401 for everything else.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::InsufficientScope(_) | AuthError::OperatorOnly(_) => 403,
            AuthError::Jwks(_) | AuthError::Key(_) => 503,
            _ => 401,
        }
    }

    /// The rule name recorded in the audit log.
    pub fn rule(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "token-missing",
            AuthError::Malformed(_) => "token-malformed",
            AuthError::BadSignature => "token-bad-signature",
            AuthError::AlgorithmNotAllowed(_) => "token-algorithm-not-allowed",
            AuthError::UnknownKey(_) => "token-unknown-key",
            AuthError::Expired => "token-expired",
            AuthError::NotYetValid => "token-not-yet-valid",
            AuthError::WrongIssuer(_) => "token-wrong-issuer",
            AuthError::WrongAudience => "token-wrong-audience",
            AuthError::InvalidClaims(_) => "token-invalid-claims",
            AuthError::Jwks(_) => "jwks-unavailable",
            AuthError::Key(_) => "key-error",
            AuthError::InsufficientScope(_) => "scope-insufficient",
            AuthError::OperatorOnly(_) => "operator-only",
        }
    }
}
