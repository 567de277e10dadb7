//! Ed25519-signed checkpoints: (tree size, root hash, time), so anyone holding the public key can check
//! that the log they are shown is the log that was written.
//!
//! The signing key lives in a key file readable only by its owner (0600) or in an environment variable,
//! never in the database or the log directory's data files.

use std::path::Path;

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::merkle::Hash;
use crate::AuditError;

/// Environment variable holding the checkpoint signing key (base64 of the 32-byte seed).
pub const KEY_ENV: &str = "KIZUNA_AUDIT_KEY";

/// A signed statement of the log's size and root at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Number of entries covered.
    pub size: u64,
    /// Merkle root of those entries (hex).
    pub root: String,
    /// When it was made (RFC 3339).
    pub time: String,
    /// Which key signed it (first 8 bytes of SHA-256 of the public key, hex).
    pub key_id: String,
    /// Ed25519 signature over [`Checkpoint::message`] (base64).
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes that are signed.
    pub fn message(size: u64, root_hex: &str, time: &str) -> String {
        format!("kizuna audit checkpoint v1\n{size}\n{root_hex}\n{time}\n")
    }

    /// The root as bytes.
    pub fn root_hash(&self) -> Option<Hash> {
        let v = hex::decode(&self.root).ok()?;
        v.try_into().ok()
    }

    /// Checks the signature against a public key.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(&self.signature) else {
            return false;
        };
        let Ok(sig) = Signature::from_slice(&sig) else {
            return false;
        };
        key.verify(
            Self::message(self.size, &self.root, &self.time).as_bytes(),
            &sig,
        )
        .is_ok()
    }
}

/// Signs checkpoints.
pub struct CheckpointSigner {
    key: SigningKey,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "CheckpointSigner({})", self.key_id())
    }
}

/// Identifies a public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

impl CheckpointSigner {
    /// A signer from a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> CheckpointSigner {
        CheckpointSigner {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// A fresh random key.
    pub fn generate() -> CheckpointSigner {
        CheckpointSigner {
            key: SigningKey::generate(&mut rand_core::OsRng),
        }
    }

    /// From the environment variable, if set.
    pub fn from_env() -> Result<Option<CheckpointSigner>, AuditError> {
        match std::env::var(KEY_ENV) {
            Ok(v) => Ok(Some(Self::from_base64(v.trim())?)),
            Err(_) => Ok(None),
        }
    }

    fn from_base64(s: &str) -> Result<CheckpointSigner, AuditError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| {
                AuditError::Key("鍵が base64 ではありません / key is not base64".into())
            })?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| AuditError::Key("鍵は 32 バイトです / key must be 32 bytes".into()))?;
        Ok(Self::from_seed(seed))
    }

    /// Loads the key file, creating it (mode 0600) with a new key if it does not exist. Refuses a key
    /// file that others can read.
    pub fn load_or_create(path: &Path) -> Result<CheckpointSigner, AuditError> {
        if path.exists() {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path)?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(AuditError::Key(format!(
                        "鍵ファイルの権限が広すぎます (0600 にしてください) / key file {} is readable by others (mode {:o}); chmod 600",
                        path.display(),
                        mode & 0o777
                    )));
                }
            }
            let text = std::fs::read_to_string(path)?;
            return Self::from_base64(text.trim());
        }
        let signer = Self::generate();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = base64::engine::general_purpose::STANDARD.encode(signer.key.to_bytes());
        write_private(path, text.as_bytes())?;
        Ok(signer)
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The public key as hex, for verifiers.
    pub fn public_hex(&self) -> String {
        hex::encode(self.verifying_key().as_bytes())
    }

    /// The key id.
    pub fn key_id(&self) -> String {
        key_id(&self.verifying_key())
    }

    /// Signs a checkpoint for a tree state.
    pub fn sign(&self, size: u64, root: &Hash, time: &str) -> Checkpoint {
        let root_hex = hex::encode(root);
        let sig = self
            .key
            .sign(Checkpoint::message(size, &root_hex, time).as_bytes());
        Checkpoint {
            size,
            root: root_hex,
            time: time.to_string(),
            key_id: self.key_id(),
            signature: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
        }
    }
}

/// Parses a public key given as hex.
pub fn public_key_from_hex(s: &str) -> Result<VerifyingKey, AuditError> {
    let bytes = hex::decode(s.trim()).map_err(|_| {
        AuditError::Key("公開鍵が hex ではありません / public key is not hex".into())
    })?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| {
        AuditError::Key("公開鍵は 32 バイトです / public key must be 32 bytes".into())
    })?;
    VerifyingKey::from_bytes(&arr)
        .map_err(|_| AuditError::Key("公開鍵が不正です / invalid public key".into()))
}

/// Writes a file readable only by its owner.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AuditError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}
