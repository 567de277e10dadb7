//! Security tests through the real middleware: every way a token can be wrong is refused with 401, a
//! good token without the scope with 403, each with an OperationOutcome — and every refusal reaches the
//! auditor with its rule.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::routing::any;
use axum::Router;
use base64::Engine as _;
use http_body_util::BodyExt;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{EncodingKey, Header};
use kizuna_auth::dev::{DevIssuer, TokenRequest, DEV_ISSUER};
use kizuna_auth::http::{require_fhir_auth, AccessAuditor, AccessDecision, Authorized, FhirAuth};
use kizuna_auth::jwt::{JwksSource, TokenVerifier, TrustedIssuer};
use kizuna_auth::Role;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use tower::ServiceExt;

const NOW: i64 = 1_800_000_000;
const IDP: &str = "https://idp.test.invalid";
const AUD: &str = "https://kizuna.test.invalid/fhir";

#[derive(Default)]
struct RecordingAuditor(Mutex<Vec<AccessDecision>>);

impl AccessAuditor for RecordingAuditor {
    fn record(&self, d: AccessDecision) {
        if let Ok(mut v) = self.0.lock() {
            v.push(d);
        }
    }
}

struct Keys {
    rsa: EncodingKey,
    ec: EncodingKey,
    ec_jwk: Value,
    rsa_jwk: Value,
}

fn keys() -> Keys {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let pem = std::fs::read(format!("{dir}/rsa-test-key.pem")).unwrap_or_default();
    let rsa_jwk: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/rsa-test-jwk.json")).unwrap_or_default(),
    )
    .unwrap_or_default();
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .unwrap_or_else(|_| panic!("ec keygen"));
    let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng)
        .unwrap_or_else(|_| panic!("ec"));
    let pt = kp.public_key().as_ref();
    let b = |x: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(x);
    let ec_jwk = json!({"kty": "EC", "crv": "P-256", "x": b(&pt[1..33]), "y": b(&pt[33..65]), "kid": "ec-test-1", "alg": "ES256", "use": "sig"});
    Keys {
        rsa: EncodingKey::from_rsa_pem(&pem).unwrap_or_else(|e| panic!("{e}")),
        ec: EncodingKey::from_ec_der(doc.as_ref()),
        ec_jwk,
        rsa_jwk,
    }
}

fn claims(role: &str, scope: &str) -> Value {
    json!({"iss": IDP, "sub": "u1", "aud": AUD, "iat": NOW, "nbf": NOW - 10, "exp": NOW + 600, "jti": "t1",
           "role": role, "scope": scope, "institution": "1318814790", "qualification": "doctor", "person": "person-1"})
}

fn sign(alg: jsonwebtoken::Algorithm, kid: &str, key: &EncodingKey, c: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.to_string());
    jsonwebtoken::encode(&h, c, key).unwrap_or_else(|e| panic!("{e}"))
}

struct Harness {
    app: Router,
    audit: Arc<RecordingAuditor>,
    keys: Keys,
    dev: DevIssuer,
}

fn harness() -> Harness {
    let keys = keys();
    let dev = DevIssuer::ephemeral(AUD).unwrap_or_else(|e| panic!("{e}"));
    let jwks: JwkSet = serde_json::from_value(json!({"keys": [keys.rsa_jwk, keys.ec_jwk]}))
        .unwrap_or_else(|e| panic!("{e}"));
    let verifier = TokenVerifier::new(vec![
        TrustedIssuer {
            issuer: IDP.into(),
            audience: AUD.into(),
            jwks: JwksSource::Static(jwks),
        },
        dev.trusted(),
    ]);
    let audit = Arc::new(RecordingAuditor::default());
    let auth = Arc::new(FhirAuth {
        verifier,
        auditor: audit.clone(),
        now: Arc::new(|| NOW),
    });
    let app = Router::new()
        .route(
            "/fhir/{*rest}",
            any(|req: Request<Body>| async move {
                let a = req.extensions().get::<Authorized>().cloned();
                axum::Json(
                    json!({"role": a.map(|a| a.principal.role.as_str()).unwrap_or("anonymous")}),
                )
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            auth,
            require_fhir_auth,
        ));
    Harness {
        app,
        audit,
        keys,
        dev,
    }
}

async fn call(
    h: &Harness,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, Value, Option<String>) {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header("Authorization", format!("Bearer {t}"));
    }
    let resp = h
        .app
        .clone()
        .oneshot(b.body(Body::empty()).unwrap_or_default())
        .await
        .unwrap_or_else(|e| match e {});
    let status = resp.status();
    let www = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        www,
    )
}

fn last_rule(h: &Harness) -> Option<(bool, String)> {
    h.audit
        .0
        .lock()
        .ok()
        .and_then(|v| v.last().map(|d| (d.allowed, d.rule.clone())))
}

/// Asserts a refusal: status, OperationOutcome, WWW-Authenticate, and the audited rule.
async fn refused(
    h: &Harness,
    method: Method,
    path: &str,
    token: Option<&str>,
    status: StatusCode,
    rule: &str,
) {
    let before = h.audit.0.lock().map(|v| v.len()).unwrap_or(0);
    let (s, body, www) = call(h, method, path, token).await;
    assert_eq!(s, status, "{rule}: {body}");
    assert_eq!(body["resourceType"], "OperationOutcome", "{rule}");
    assert_eq!(body["issue"][0]["diagnostics"], rule);
    assert!(
        www.is_some_and(|w| w.starts_with("Bearer")),
        "{rule}: WWW-Authenticate"
    );
    let after = h.audit.0.lock().map(|v| v.len()).unwrap_or(0);
    assert_eq!(after, before + 1, "{rule}: exactly one audit record");
    assert_eq!(last_rule(h), Some((false, rule.to_string())));
}

#[tokio::test]
async fn good_tokens_of_each_algorithm_pass() {
    let h = harness();
    let c = claims("clinician", "user/*.rs");
    for t in [
        sign(
            jsonwebtoken::Algorithm::RS256,
            "rsa-test-1",
            &h.keys.rsa,
            &c,
        ),
        sign(jsonwebtoken::Algorithm::ES256, "ec-test-1", &h.keys.ec, &c),
    ] {
        let (s, body, _) = call(&h, Method::GET, "/fhir/Observation/1", Some(&t)).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["role"], "clinician");
    }
    let mut r = TokenRequest::for_role(Role::Clinician);
    r.institution = Some("1318814790".into());
    r.qualification = Some("doctor".into());
    let t = h.dev.issue(&r, NOW).unwrap_or_else(|e| panic!("{e}"));
    let (s, _, _) = call(&h, Method::GET, "/fhir/Condition?patient=1", Some(&t)).await;
    assert_eq!(s, StatusCode::OK);
    // The CapabilityStatement needs no token.
    let (s, _, _) = call(&h, Method::GET, "/fhir/metadata", None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn missing_token() {
    let h = harness();
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        None,
        StatusCode::UNAUTHORIZED,
        "token-missing",
    )
    .await;
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(""),
        StatusCode::UNAUTHORIZED,
        "token-missing",
    )
    .await;
}

#[tokio::test]
async fn tampered_signature_and_payload() {
    let h = harness();
    let t = sign(
        jsonwebtoken::Algorithm::ES256,
        "ec-test-1",
        &h.keys.ec,
        &claims("clinician", "user/*.rs"),
    );
    let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
    // Flip the signature.
    let mut sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&parts[2])
        .unwrap_or_default();
    sig[5] ^= 0x01;
    let bad_sig = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&sig)
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&bad_sig),
        StatusCode::UNAUTHORIZED,
        "token-bad-signature",
    )
    .await;
    // Escalate the role in the payload, keeping the signature.
    let mut c = claims("operator", "system/*.cruds");
    c["sub"] = json!("u1");
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&c).unwrap_or_default());
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&parts.join(".")),
        StatusCode::UNAUTHORIZED,
        "token-bad-signature",
    )
    .await;
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some("not.a.jwt"),
        StatusCode::UNAUTHORIZED,
        "token-malformed",
    )
    .await;
}

#[tokio::test]
async fn expired_and_not_yet_valid() {
    let h = harness();
    let mut c = claims("clinician", "user/*.rs");
    c["exp"] = json!(NOW - 120);
    let t = sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-test-1",
        &h.keys.rsa,
        &c,
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&t),
        StatusCode::UNAUTHORIZED,
        "token-expired",
    )
    .await;
    let mut c = claims("clinician", "user/*.rs");
    c["nbf"] = json!(NOW + 3600);
    let t = sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-test-1",
        &h.keys.rsa,
        &c,
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&t),
        StatusCode::UNAUTHORIZED,
        "token-not-yet-valid",
    )
    .await;
    // Within the 30 s leeway it is still accepted.
    let mut c = claims("clinician", "user/*.rs");
    c["exp"] = json!(NOW - 10);
    let t = sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-test-1",
        &h.keys.rsa,
        &c,
    );
    assert_eq!(
        call(&h, Method::GET, "/fhir/Patient/1", Some(&t)).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn wrong_audience_and_issuer() {
    let h = harness();
    let mut c = claims("clinician", "user/*.rs");
    c["aud"] = json!("https://other.invalid");
    let t = sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-test-1",
        &h.keys.rsa,
        &c,
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&t),
        StatusCode::UNAUTHORIZED,
        "token-wrong-audience",
    )
    .await;
    let mut c = claims("clinician", "user/*.rs");
    c["iss"] = json!("https://evil.invalid");
    let t = sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-test-1",
        &h.keys.rsa,
        &c,
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&t),
        StatusCode::UNAUTHORIZED,
        "token-wrong-issuer",
    )
    .await;
    // A token from the development issuer's key but claiming the real issuer does not verify.
    let mut r = TokenRequest::for_role(Role::Operator);
    r.subject = "x".into();
    let dev = h.dev.issue(&r, NOW).unwrap_or_default();
    let mut parts: Vec<String> = dev.split('.').map(str::to_string).collect();
    let mut c: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&parts[1])
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    c["iss"] = json!(IDP);
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&c).unwrap_or_default());
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&parts.join(".")),
        StatusCode::UNAUTHORIZED,
        "token-unknown-key",
    )
    .await;
    assert_eq!(DEV_ISSUER, "urn:kizuna:dev-issuer");
}

#[tokio::test]
async fn alg_none_and_algorithm_confusion() {
    let h = harness();
    let b = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(v).unwrap_or_default())
    };
    let none = format!(
        "{}.{}.",
        b(&json!({"alg": "none", "typ": "JWT"})),
        b(&claims("operator", "system/*.cruds"))
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&none),
        StatusCode::UNAUTHORIZED,
        "token-malformed",
    )
    .await;
    // HS256 signed with the RSA public modulus as secret (the classic confusion attack).
    let secret = h.keys.rsa_jwk["n"]
        .as_str()
        .unwrap_or("")
        .as_bytes()
        .to_vec();
    let mut hdr = Header::new(jsonwebtoken::Algorithm::HS256);
    hdr.kid = Some("rsa-test-1".into());
    let hs = jsonwebtoken::encode(
        &hdr,
        &claims("operator", "system/*.cruds"),
        &EncodingKey::from_secret(&secret),
    )
    .unwrap_or_default();
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&hs),
        StatusCode::UNAUTHORIZED,
        "token-algorithm-not-allowed",
    )
    .await;
    // ES256 header with the RSA key's kid.
    let t = sign(
        jsonwebtoken::Algorithm::ES256,
        "rsa-test-1",
        &h.keys.ec,
        &claims("clinician", "user/*.rs"),
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&t),
        StatusCode::UNAUTHORIZED,
        "token-algorithm-not-allowed",
    )
    .await;
    let t = sign(
        jsonwebtoken::Algorithm::ES256,
        "no-such-kid",
        &h.keys.ec,
        &claims("clinician", "user/*.rs"),
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&t),
        StatusCode::UNAUTHORIZED,
        "token-unknown-key",
    )
    .await;
}

#[tokio::test]
async fn scope_escalation_is_forbidden_and_audited_with_the_principal() {
    let h = harness();
    let t = sign(
        jsonwebtoken::Algorithm::ES256,
        "ec-test-1",
        &h.keys.ec,
        &claims("patient", "patient/Observation.rs"),
    );
    assert_eq!(
        call(&h, Method::GET, "/fhir/Observation?code=x", Some(&t))
            .await
            .0,
        StatusCode::OK
    );
    refused(
        &h,
        Method::POST,
        "/fhir/Observation",
        Some(&t),
        StatusCode::FORBIDDEN,
        "scope-insufficient",
    )
    .await;
    refused(
        &h,
        Method::GET,
        "/fhir/Condition/1",
        Some(&t),
        StatusCode::FORBIDDEN,
        "scope-insufficient",
    )
    .await;
    refused(
        &h,
        Method::DELETE,
        "/fhir/Observation/1",
        Some(&t),
        StatusCode::FORBIDDEN,
        "scope-insufficient",
    )
    .await;
    refused(
        &h,
        Method::POST,
        "/fhir",
        Some(&t),
        StatusCode::FORBIDDEN,
        "scope-insufficient",
    )
    .await;
    let d = h
        .audit
        .0
        .lock()
        .ok()
        .and_then(|v| v.last().cloned())
        .unwrap_or_else(|| panic!("audited"));
    assert_eq!(d.principal.map(|p| p.subject), Some("u1".to_string()));
    let (_, _, www) = call(&h, Method::POST, "/fhir/Observation", Some(&t)).await;
    assert!(www.unwrap_or_default().contains("insufficient_scope"));
}

#[tokio::test]
async fn claims_must_fit_the_role() {
    let h = harness();
    let mut c = claims("clinician", "user/*.rs");
    c.as_object_mut().map(|o| o.remove("institution"));
    let t = sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-test-1",
        &h.keys.rsa,
        &c,
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&t),
        StatusCode::UNAUTHORIZED,
        "token-invalid-claims",
    )
    .await;
    let mut c = claims("clinician", "user/*.rs");
    c["institution"] = json!("131881479");
    let t = sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-test-1",
        &h.keys.rsa,
        &c,
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&t),
        StatusCode::UNAUTHORIZED,
        "token-invalid-claims",
    )
    .await;
    let t = sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-test-1",
        &h.keys.rsa,
        &claims("superuser", "user/*.rs"),
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&t),
        StatusCode::UNAUTHORIZED,
        "token-invalid-claims",
    )
    .await;
    let t = sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-test-1",
        &h.keys.rsa,
        &claims("clinician", "user/observation.rs"),
    );
    refused(
        &h,
        Method::GET,
        "/fhir/Patient/1",
        Some(&t),
        StatusCode::UNAUTHORIZED,
        "token-invalid-claims",
    )
    .await;
}

#[test]
fn jwks_file_is_reread_when_rotated() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, json!({"keys": [k.rsa_jwk]}).to_string())
        .unwrap_or_else(|e| panic!("{e}"));
    let v = TokenVerifier::new(vec![TrustedIssuer {
        issuer: IDP.into(),
        audience: AUD.into(),
        jwks: JwksSource::File(path.clone()),
    }]);
    let c = claims("clinician", "user/*.rs");
    let rsa = sign(jsonwebtoken::Algorithm::RS256, "rsa-test-1", &k.rsa, &c);
    let ec = sign(jsonwebtoken::Algorithm::ES256, "ec-test-1", &k.ec, &c);
    assert!(v.verify(&rsa, NOW).is_ok());
    assert!(v.verify(&ec, NOW).is_err());
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&path, json!({"keys": [k.ec_jwk]}).to_string())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(v.verify(&ec, NOW).is_ok(), "new key picked up");
    assert!(v.verify(&rsa, NOW).is_err(), "retired key refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_is_fetched_and_refetched_on_an_unknown_kid() {
    let k = keys();
    let served = Arc::new(Mutex::new(json!({"keys": [k.rsa_jwk]})));
    let s2 = served.clone();
    let app = Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let s = s2.clone();
            async move { axum::Json(s.lock().map(|v| v.clone()).unwrap_or_default()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    let url = format!("http://{addr}/jwks");
    let c = claims("clinician", "user/*.rs");
    let rsa = sign(jsonwebtoken::Algorithm::RS256, "rsa-test-1", &k.rsa, &c);
    let ec = sign(jsonwebtoken::Algorithm::ES256, "ec-test-1", &k.ec, &c);
    let result = tokio::task::spawn_blocking(move || {
        let v = TokenVerifier::new(vec![TrustedIssuer {
            issuer: IDP.into(),
            audience: AUD.into(),
            jwks: JwksSource::Url {
                url,
                ttl: std::time::Duration::from_secs(3600),
            },
        }]);
        let first = v.verify(&rsa, NOW).is_ok();
        // The issuer rotates to the EC key; the cached set does not have it, so one re-fetch happens.
        if let Ok(mut s) = served.lock() {
            *s = json!({"keys": [k.ec_jwk]});
        }
        let rotated = v.verify(&ec, NOW).is_ok();
        (first, rotated)
    })
    .await
    .unwrap_or((false, false));
    assert_eq!(result, (true, true));
}

/// A verified token is remembered, but a repeat is still held to `exp` and `nbf` at the time of
/// the request, and a token differing in one character is checked from scratch.
#[test]
fn remembered_tokens_still_expire_and_altered_ones_are_checked_again() {
    let k = keys();
    let jwks: JwkSet =
        serde_json::from_value(json!({"keys": [k.rsa_jwk]})).unwrap_or_else(|e| panic!("{e}"));
    let v = TokenVerifier::new(vec![TrustedIssuer {
        issuer: IDP.into(),
        audience: AUD.into(),
        jwks: JwksSource::Static(jwks),
    }]);
    let mut c = claims("clinician", "user/*.rs");
    c["nbf"] = json!(NOW + 100);
    c["exp"] = json!(NOW + 600);
    let t = sign(jsonwebtoken::Algorithm::RS256, "rsa-test-1", &k.rsa, &c);
    let leeway = kizuna_auth::jwt::LEEWAY_SECS;
    // Not yet valid, then valid (now remembered), then asked about an earlier time again.
    assert!(matches!(
        v.verify(&t, NOW),
        Err(kizuna_auth::AuthError::NotYetValid)
    ));
    assert!(v.verify(&t, NOW + 100).is_ok());
    assert!(v.verify(&t, NOW + 101).is_ok());
    assert!(matches!(
        v.verify(&t, NOW),
        Err(kizuna_auth::AuthError::NotYetValid)
    ));
    // Past expiry (beyond the leeway) the remembered token is refused.
    assert!(v.verify(&t, NOW + 600 + leeway).is_ok());
    assert!(matches!(
        v.verify(&t, NOW + 600 + leeway + 1),
        Err(kizuna_auth::AuthError::Expired)
    ));
    // One character of the signature changed: a different token, verified and refused.
    let mut bad = t.clone().into_bytes();
    let last = bad.len() - 2;
    bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap_or_else(|e| panic!("{e}"));
    assert!(v.verify(&bad, NOW + 200).is_err());
    assert!(v.verify(&t, NOW + 200).is_ok());
    // A payload swapped in under the remembered signature is refused too.
    let parts: Vec<&str> = t.split('.').collect();
    let mut c2 = c.clone();
    c2["role"] = json!("operator");
    let forged_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c2.to_string());
    let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert!(matches!(
        v.verify(&forged, NOW + 200),
        Err(kizuna_auth::AuthError::BadSignature)
    ));
}
