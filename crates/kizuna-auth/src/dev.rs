//! The built-in development issuer: issues EdDSA-signed tokens for any role so the embedded default can
//! be tried without an identity provider. It is trusted only when a deployment configures it; a
//! production deployment trusts only its real identity provider's JWKS.

use std::path::Path;

use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};

use crate::jwt::{JwksSource, TrustedIssuer};
use crate::principal::{InstitutionNumber, InsurerNumber, Qualification, ResearcherCategory, Role};
use crate::scope::ScopeSet;
use crate::AuthError;

/// The development issuer's `iss`.
pub const DEV_ISSUER: &str = "urn:kizuna:dev-issuer";

/// What a development token should say.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Role.
    pub role: Role,
    /// Subject; a readable default is made from the role when empty.
    pub subject: String,
    /// Institution number (institution systems, clinicians).
    pub institution: Option<String>,
    /// Qualification (clinicians).
    pub qualification: Option<String>,
    /// Person id (patients).
    pub person: Option<String>,
    /// Insurer number (insurers).
    pub insurer: Option<String>,
    /// Organisation (researchers, reviewers).
    pub organization: Option<String>,
    /// Researcher category.
    pub researcher_category: Option<String>,
    /// Space-separated scopes.
    pub scope: String,
    /// Lifetime in seconds.
    pub lifetime: i64,
}

impl TokenRequest {
    /// A request with the scopes a role typically has.
    pub fn for_role(role: Role) -> TokenRequest {
        let scope = match role {
            Role::Institution => "system/*.cruds",
            // Reading and searching; recording consent and acknowledging documents.
            Role::Clinician => "user/*.rs user/Patient.cu user/Bundle.cu user/Consent.cu",
            Role::Patient => "patient/*.rs patient/Consent.cu",
            Role::Insurer => "system/Bundle.crus system/Composition.rs system/Coverage.cu",
            Role::Researcher | Role::Reviewer => "openid",
            Role::Operator => "system/*.cruds",
        };
        TokenRequest {
            role,
            subject: String::new(),
            institution: None,
            qualification: None,
            person: None,
            insurer: None,
            organization: None,
            researcher_category: None,
            scope: scope.into(),
            lifetime: 3600,
        }
    }

    /// [`TokenRequest::for_role`] with every identifying claim filled with a valid sample value
    /// (a role ignores those it does not need), so a test can ask the same of every role.
    pub fn with_sample_claims(role: Role) -> TokenRequest {
        TokenRequest {
            subject: format!("sample-{role:?}").to_lowercase(),
            institution: Some("1318814790".into()),
            qualification: Some("nurse".into()),
            person: Some("person-1".into()),
            insurer: Some("06139991".into()),
            organization: Some("university".into()),
            researcher_category: Some("academic".into()),
            ..TokenRequest::for_role(role)
        }
    }
}

/// Issues development tokens with a key kept in a private file.
pub struct DevIssuer {
    pkcs8: Vec<u8>,
    public: Vec<u8>,
    kid: String,
    audience: String,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevIssuer(kid={})", self.kid)
    }
}

impl DevIssuer {
    /// Loads the key file, or creates it (mode 0600) with a new Ed25519 key.
    pub fn load_or_create(path: &Path, audience: &str) -> Result<DevIssuer, AuthError> {
        let pkcs8 = if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| AuthError::Key(e.to_string()))?;
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| AuthError::Key("鍵ファイルが不正です / malformed key file".into()))?
        } else {
            let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| AuthError::Key("keygen".into()))?;
            let bytes = doc.as_ref().to_vec();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| AuthError::Key(e.to_string()))?;
            }
            write_private(
                path,
                base64::engine::general_purpose::STANDARD
                    .encode(&bytes)
                    .as_bytes(),
            )?;
            bytes
        };
        Self::from_pkcs8(pkcs8, audience)
    }

    /// An issuer with a fresh key that is never written anywhere (tests).
    pub fn ephemeral(audience: &str) -> Result<DevIssuer, AuthError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| AuthError::Key("keygen".into()))?;
        Self::from_pkcs8(doc.as_ref().to_vec(), audience)
    }

    fn from_pkcs8(pkcs8: Vec<u8>, audience: &str) -> Result<DevIssuer, AuthError> {
        let kp = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| AuthError::Key("鍵が不正です / invalid key".into()))?;
        let public = kp.public_key().as_ref().to_vec();
        let kid = hex_prefix(&public);
        Ok(DevIssuer {
            pkcs8,
            public,
            kid,
            audience: audience.to_string(),
        })
    }

    /// The public keys, as a JWKS.
    pub fn jwks(&self) -> JwkSet {
        let jwk = json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.public),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig"
        });
        serde_json::from_value(json!({"keys": [jwk]})).unwrap_or(JwkSet { keys: Vec::new() })
    }

    /// The trust entry to configure when development tokens should be accepted.
    pub fn trusted(&self) -> TrustedIssuer {
        TrustedIssuer {
            issuer: DEV_ISSUER.into(),
            audience: self.audience.clone(),
            jwks: JwksSource::Static(self.jwks()),
        }
    }

    /// Issues a token at time `now`, after checking the request would make a valid principal.
    pub fn issue(&self, r: &TokenRequest, now: i64) -> Result<String, AuthError> {
        // Reject what the verifier would reject, with a clear message, before signing.
        if let Some(i) = &r.institution {
            InstitutionNumber::parse(i)?;
        }
        if let Some(i) = &r.insurer {
            InsurerNumber::parse(i)?;
        }
        if let Some(q) = &r.qualification {
            Qualification::parse(q).ok_or_else(|| {
                AuthError::InvalidClaims(format!("不明な資格 / unknown qualification {q:?}"))
            })?;
        }
        if let Some(c) = &r.researcher_category {
            ResearcherCategory::parse(c).ok_or_else(|| {
                AuthError::InvalidClaims(format!(
                    "不明な利用者区分 / unknown researcher category {c:?}"
                ))
            })?;
        }
        ScopeSet::parse(&r.scope).map_err(|e| AuthError::InvalidClaims(e.to_string()))?;
        let subject = if r.subject.is_empty() {
            format!("dev-{}", r.role.as_str())
        } else {
            r.subject.clone()
        };
        let mut claims = json!({
            "iss": DEV_ISSUER,
            "sub": subject,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + r.lifetime,
            "jti": format!("dev-{now}-{}", hex_prefix(subject.as_bytes())),
            "role": r.role.as_str(),
            "scope": r.scope,
        });
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                claims[k] = Value::String(v.clone());
            }
        };
        put("institution", &r.institution);
        put("qualification", &r.qualification);
        put("person", &r.person);
        put("insurer", &r.insurer);
        put("organization", &r.organization);
        put("researcher_category", &r.researcher_category);
        let mut header = Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&self.pkcs8))
            .map_err(|e| AuthError::Key(e.to_string()))
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AuthError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| AuthError::Key(e.to_string()))?;
    f.write_all(bytes)
        .map_err(|e| AuthError::Key(e.to_string()))?;
    Ok(())
}
