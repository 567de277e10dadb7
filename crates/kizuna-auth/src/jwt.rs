//! Bearer-token verification: JWTs signed with RS256, ES256 or EdDSA by a trusted issuer, whose keys come
//! from a JWKS (file, URL or given), cached and re-fetched when an unknown key id appears (rotation).
//!
//! Time is injected (`now` in seconds since the epoch), so expiry and not-before are testable.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::principal::{
    InstitutionNumber, InsurerNumber, Principal, Qualification, ResearcherCategory, Role,
};
use crate::scope::ScopeSet;
use crate::AuthError;

/// Algorithms a token may be signed with. `none` and the HMAC family are never accepted.
pub const ALLOWED_ALGORITHMS: &[Algorithm] =
    &[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// Tolerated clock skew for `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: i64 = 30;

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// Keys given directly (the development issuer, tests).
    Static(JwkSet),
    /// A JWKS file, re-read when it changes.
    File(PathBuf),
    /// A JWKS URL, cached for `ttl` and re-fetched early when an unknown `kid` appears.
    Url {
        /// The URL.
        url: String,
        /// Cache lifetime.
        ttl: Duration,
    },
}

/// An issuer whose tokens are accepted, for one audience.
#[derive(Debug, Clone)]
pub struct TrustedIssuer {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud` (this service's identifier).
    pub audience: String,
    /// Where its keys are.
    pub jwks: JwksSource,
}

struct Cached {
    keys: JwkSet,
    fetched: Instant,
    mtime: Option<SystemTime>,
}

struct IssuerState {
    cfg: TrustedIssuer,
    cache: RwLock<Option<Cached>>,
    last_refresh: Mutex<Option<Instant>>,
    /// Bumped whenever the keys are (re)loaded: tokens verified under older keys are verified again.
    generation: AtomicU64,
}

/// A token whose signature, issuer and audience were checked: what a repeat of it needs.
struct VerifiedToken {
    principal: Principal,
    issuer: usize,
    generation: u64,
    exp: i64,
    nbf: Option<i64>,
}

/// Verified tokens kept at most; past this the memory is emptied and refilled.
const VERIFIED_CAPACITY: usize = 10_000;

/// Verifies bearer tokens from the configured issuers and turns them into [`Principal`]s.
///
/// A client sends the same token with every request until it expires, so a verified token is
/// remembered (by the SHA-256 of its text, never the text) with its expiry: a repeat skips the
/// signature check but not the expiry and not-before checks, and any reload of the issuer's keys
/// (rotation) makes every token verify again.
pub struct TokenVerifier {
    issuers: Vec<IssuerState>,
    verified: RwLock<HashMap<[u8; 32], VerifiedToken>>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.issuers.iter().map(|i| i.cfg.issuer.as_str()).collect();
        f.debug_struct("TokenVerifier")
            .field("issuers", &names)
            .finish()
    }
}

/// Re-fetches of a JWKS URL on unknown key ids are at most this frequent.
const MIN_REFRESH: Duration = Duration::from_secs(30);

impl TokenVerifier {
    /// A verifier trusting these issuers.
    pub fn new(issuers: Vec<TrustedIssuer>) -> TokenVerifier {
        TokenVerifier {
            issuers: issuers
                .into_iter()
                .map(|cfg| IssuerState {
                    cfg,
                    cache: RwLock::new(None),
                    last_refresh: Mutex::new(None),
                    generation: AtomicU64::new(0),
                })
                .collect(),
            verified: RwLock::new(HashMap::new()),
        }
    }

    /// Verifies a token at time `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<Principal, AuthError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        let known = self.verified.read().ok().and_then(|m| {
            m.get(&key)
                .map(|t| (t.issuer, t.generation, t.exp, t.nbf, t.principal.clone()))
        });
        if let Some((issuer, generation, exp, nbf, principal)) = known {
            if let Some(state) = self.issuers.get(issuer) {
                state.ensure_fresh()?;
                if state.generation.load(Ordering::Acquire) == generation {
                    check_times(exp, nbf, now)?;
                    return Ok(principal);
                }
            }
        }
        let (principal, issuer, generation, exp, nbf) = self.verify_signed(token, now)?;
        if let Ok(mut m) = self.verified.write() {
            if m.len() >= VERIFIED_CAPACITY {
                m.clear();
            }
            m.insert(
                key,
                VerifiedToken {
                    principal: principal.clone(),
                    issuer,
                    generation,
                    exp,
                    nbf,
                },
            );
        }
        Ok(principal)
    }

    /// The full check: signature against the issuer's current keys, audience, times, claims.
    /// Returns the principal with what [`TokenVerifier::verify`] remembers of the token.
    fn verify_signed(
        &self,
        token: &str,
        now: i64,
    ) -> Result<(Principal, usize, u64, i64, Option<i64>), AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if !ALLOWED_ALGORITHMS.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed(format!("{:?}", header.alg)));
        }
        // Find the issuer from the (not yet verified) payload, then verify with that issuer's keys.
        let unverified = unverified_claims(token)?;
        let iss = unverified.get("iss").and_then(Value::as_str).unwrap_or("");
        let (index, state) = self
            .issuers
            .iter()
            .enumerate()
            .find(|(_, s)| s.cfg.issuer == iss)
            .ok_or_else(|| AuthError::WrongIssuer(iss.to_string()))?;
        // Read before the keys: a reload during this check leaves the token to be checked again.
        state.ensure_fresh()?;
        let generation = state.generation.load(Ordering::Acquire);
        let key = state.key(header.kid.as_deref(), header.alg)?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => AuthError::BadSignature,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                AuthError::AlgorithmNotAllowed(format!("{:?}", header.alg))
            }
            _ => AuthError::Malformed(e.to_string()),
        })?;
        let c = data.claims;
        check_audience(&c, &state.cfg.audience)?;
        let exp = c
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| AuthError::InvalidClaims("exp がありません / exp missing".into()))?;
        let nbf = c.get("nbf").and_then(Value::as_i64);
        check_times(exp, nbf, now)?;
        Ok((principal_from_claims(&c, iss)?, index, generation, exp, nbf))
    }
}

/// `exp` and `nbf` against the clock, with [`LEEWAY_SECS`] either way.
fn check_times(exp: i64, nbf: Option<i64>, now: i64) -> Result<(), AuthError> {
    if now > exp + LEEWAY_SECS {
        return Err(AuthError::Expired);
    }
    if nbf.is_some_and(|nbf| now + LEEWAY_SECS < nbf) {
        return Err(AuthError::NotYetValid);
    }
    Ok(())
}

fn check_audience(c: &Value, audience: &str) -> Result<(), AuthError> {
    let ok = match c.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(audience)),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(AuthError::WrongAudience)
    }
}

fn unverified_claims(token: &str) -> Result<Value, AuthError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| AuthError::Malformed("JWT ではありません / not a JWT".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| {
            AuthError::Malformed(
                "ペイロードが base64url ではありません / payload is not base64url".into(),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|_| {
        AuthError::Malformed("ペイロードが JSON ではありません / payload is not JSON".into())
    })
}

impl IssuerState {
    fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        if let Some(k) = self.lookup(kid, alg)? {
            return Ok(k);
        }
        // Unknown key: the issuer may have rotated. Refresh once (rate-limited) and try again.
        let due = {
            let mut last = self
                .last_refresh
                .lock()
                .map_err(|_| AuthError::Jwks("lock".into()))?;
            let due = last.map(|t| t.elapsed() >= MIN_REFRESH).unwrap_or(true);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            self.refresh()?;
            if let Some(k) = self.lookup(kid, alg)? {
                return Ok(k);
            }
        }
        Err(AuthError::UnknownKey(kid.unwrap_or("").to_string()))
    }

    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Result<Option<DecodingKey>, AuthError> {
        self.ensure_fresh()?;
        let cache = self
            .cache
            .read()
            .map_err(|_| AuthError::Jwks("lock".into()))?;
        let Some(c) = cache.as_ref() else {
            return Ok(None);
        };
        let jwk = match kid {
            Some(k) => c.keys.find(k),
            // Without a kid, only an unambiguous single key is used.
            None if c.keys.keys.len() == 1 => c.keys.keys.first(),
            None => None,
        };
        let Some(jwk) = jwk else { return Ok(None) };
        if let Some(key_alg) = jwk.common.key_algorithm {
            if format!("{key_alg:?}") != format!("{alg:?}") {
                return Err(AuthError::AlgorithmNotAllowed(format!(
                    "{alg:?} for a {key_alg:?} key"
                )));
            }
        }
        DecodingKey::from_jwk(jwk)
            .map(Some)
            .map_err(|e| AuthError::Jwks(e.to_string()))
    }

    fn ensure_fresh(&self) -> Result<(), AuthError> {
        let stale = {
            let cache = self
                .cache
                .read()
                .map_err(|_| AuthError::Jwks("lock".into()))?;
            match (&self.cfg.jwks, cache.as_ref()) {
                (_, None) => true,
                (JwksSource::Url { ttl, .. }, Some(c)) => c.fetched.elapsed() > *ttl,
                (JwksSource::File(p), Some(c)) => {
                    std::fs::metadata(p).and_then(|m| m.modified()).ok() != c.mtime
                }
                (JwksSource::Static(_), Some(_)) => false,
            }
        };
        if stale {
            self.refresh()?;
        }
        Ok(())
    }

    fn refresh(&self) -> Result<(), AuthError> {
        let (keys, mtime) = match &self.cfg.jwks {
            JwksSource::Static(k) => (k.clone(), None),
            JwksSource::File(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| AuthError::Jwks(format!("{}: {e}", p.display())))?;
                let mtime = std::fs::metadata(p).and_then(|m| m.modified()).ok();
                (
                    serde_json::from_str(&text).map_err(|e| AuthError::Jwks(e.to_string()))?,
                    mtime,
                )
            }
            JwksSource::Url { url, .. } => {
                let resp = ureq::get(url)
                    .timeout(Duration::from_secs(5))
                    .call()
                    .map_err(|e| AuthError::Jwks(e.to_string()))?;
                let text = resp
                    .into_string()
                    .map_err(|e| AuthError::Jwks(e.to_string()))?;
                (
                    serde_json::from_str(&text).map_err(|e| AuthError::Jwks(e.to_string()))?,
                    None,
                )
            }
        };
        let mut cache = self
            .cache
            .write()
            .map_err(|_| AuthError::Jwks("lock".into()))?;
        *cache = Some(Cached {
            keys,
            fetched: Instant::now(),
            mtime,
        });
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

fn principal_from_claims(c: &Value, iss: &str) -> Result<Principal, AuthError> {
    let s = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);
    let role_s = s("role")
        .ok_or_else(|| AuthError::InvalidClaims("role がありません / role claim missing".into()))?;
    let role = Role::parse(&role_s).ok_or_else(|| {
        AuthError::InvalidClaims(format!("不明な role / unknown role {role_s:?}"))
    })?;
    let scopes = ScopeSet::parse(&s("scope").unwrap_or_default())
        .map_err(|e| AuthError::InvalidClaims(e.to_string()))?;
    let p = Principal {
        subject: s("sub").ok_or_else(|| {
            AuthError::InvalidClaims("sub がありません / sub claim missing".into())
        })?,
        issuer: iss.to_string(),
        role,
        institution: s("institution")
            .map(|i| InstitutionNumber::parse(&i))
            .transpose()?,
        qualification: match s("qualification") {
            Some(q) => Some(Qualification::parse(&q).ok_or_else(|| {
                AuthError::InvalidClaims(format!("不明な資格 / unknown qualification {q:?}"))
            })?),
            None => None,
        },
        // SMART's `patient` launch context doubles as the person for patient tokens.
        person: s("person").or_else(|| {
            if role == Role::Patient {
                s("patient")
            } else {
                None
            }
        }),
        insurer: s("insurer").map(|i| InsurerNumber::parse(&i)).transpose()?,
        organization: s("organization"),
        researcher_category: match s("researcher_category") {
            Some(r) => Some(ResearcherCategory::parse(&r).ok_or_else(|| {
                AuthError::InvalidClaims(format!(
                    "不明な利用者区分 / unknown researcher category {r:?}"
                ))
            })?),
            None => None,
        },
        scopes,
        token_id: s("jti"),
    };
    p.check()?;
    Ok(p)
}
