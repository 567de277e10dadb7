//! `kizuna token` and `kizuna audit` as a user runs them.

use std::process::Command;

use base64::Engine as _;
use kizuna_audit::checkpoint::CheckpointSigner;
use kizuna_audit::{
    Actor, ActorKind, AuditLog, CheckpointPolicy, LogOptions, NewEntry, Outcome, Purpose, Target,
};

fn kizuna(args: &[&str], cwd: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kizuna"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn token_issue_makes_a_verifiable_token_with_the_claims() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (code, out, err) = kizuna(
        &[
            "token",
            "issue",
            "--role",
            "clinician",
            "--institution",
            "1318814790",
            "--qualification",
            "doctor",
        ],
        d.path(),
    );
    assert_eq!(code, 0, "{err}");
    let payload = out.trim().split('.').nth(1).unwrap_or("");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    assert_eq!(claims["role"], "clinician");
    assert_eq!(claims["institution"], "1318814790");
    assert_eq!(claims["iss"], "urn:kizuna:dev-issuer");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("kizuna-data/dev-issuer.key"))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600, "the key file is private");
    }
    // A clinician without an institution is refused before a token is printed.
    let (code, out, err) = kizuna(
        &[
            "token",
            "issue",
            "--role",
            "clinician",
            "--qualification",
            "doctor",
        ],
        d.path(),
    );
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(err.contains("institution"), "{err}");
    let (code, _, err) = kizuna(
        &[
            "token",
            "issue",
            "--role",
            "clinician",
            "--institution",
            "12345",
            "--qualification",
            "doctor",
        ],
        d.path(),
    );
    assert_eq!(code, 2);
    assert!(err.contains("10"), "{err}");
    let (code, out, _) = kizuna(&["token", "jwks"], d.path());
    assert_eq!(code, 0);
    assert!(out.contains("\"OKP\""));
}

#[test]
fn audit_verify_reports_tampering() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let key = d.path().join("audit.key");
    let signer = CheckpointSigner::load_or_create(&key).unwrap_or_else(|e| panic!("{e}"));
    let dir = d.path().join("audit");
    {
        let mut log = AuditLog::open(
            &dir,
            LogOptions {
                signer: Some(signer),
                policy: CheckpointPolicy::default(),
                sync: true,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = |i: u64| NewEntry {
            time: "2026-11-21T10:00:00+09:00".into(),
            actor: Actor {
                kind: ActorKind::Clinician,
                id: format!("d{i}"),
                institution: None,
                issuer: None,
            },
            action: "read".into(),
            target: Target {
                person: Some("p1".into()),
                ..Target::default()
            },
            purpose: Purpose::Treatment,
            outcome: Outcome::allow("consent"),
            source: None,
            request: None,
        };
        log.append(&(0..5).map(e).collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("{e}"));
        log.checkpoint(None).unwrap_or_else(|e| panic!("{e}"));
    }
    let args = |extra: &str| {
        vec![
            "audit".to_string(),
            "verify".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--key-file".into(),
            key.display().to_string(),
            extra.to_string(),
        ]
    };
    let a = args("--json");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let (code, out, err) = kizuna(&a, d.path());
    assert_eq!(code, 0, "{out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(r["covered"], 5);
    let text = std::fs::read_to_string(dir.join("entries.ndjson"))
        .unwrap_or_default()
        .replace("\"d3\"", "\"d9\"");
    std::fs::write(dir.join("entries.ndjson"), text).unwrap_or_else(|e| panic!("{e}"));
    let a = args("");
    let a: Vec<&str> = a
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let (code, out, _) = kizuna(&a, d.path());
    assert_eq!(code, 1);
    assert!(
        out.contains("NG ") && out.contains("root mismatch"),
        "{out}"
    );
    let (code, out, _) = kizuna(
        &[
            "audit",
            "public-key",
            "--key-file",
            key.to_str().unwrap_or_default(),
        ],
        d.path(),
    );
    assert_eq!(code, 0);
    assert_eq!(out.trim().len(), 64);
}
