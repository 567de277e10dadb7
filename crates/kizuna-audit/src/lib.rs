//! # kizuna-audit
//!
//! The tamper-evident audit log every access decision is written to.
//!
//! - [`entry`]: what an entry says — who, what, why (purpose of use), the policy outcome, when, from where.
//! - [`merkle`]: RFC 6962 hashing, inclusion and consistency proofs.
//! - [`checkpoint`]: Ed25519-signed (size, root, time) checkpoints and their keys.
//! - [`log`]: the append-only log, batched appends, queries, the patient's access history.
//! - `index` (private): the on-disk person and actor index the log's queries use.
//! - [`verify`]: recomputes the log against its checkpoints and reports tampering.
//! - [`event`]: FHIR AuditEvent rendering.

pub mod checkpoint;
pub mod entry;
pub mod event;
mod index;
pub mod log;
pub mod merkle;
pub mod verify;

pub use checkpoint::{Checkpoint, CheckpointSigner};
pub use entry::{Actor, ActorKind, Entry, NewEntry, Outcome, Purpose, Target};
pub use log::{
    AccessRecord, AuditLog, AuditQuery, AuditWriter, CheckpointPolicy, HistoryRequester, LogOptions,
};
pub use verify::{verify_dir, VerifyReport};

/// Why an audit operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading or writing the log failed.
    #[error("監査ログの入出力エラー / audit log I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// An entry could not be (de)serialised.
    #[error("監査エントリが不正です / malformed audit entry: {0}")]
    Json(#[from] serde_json::Error),
    /// A key is missing, malformed or exposed.
    #[error("監査鍵のエラー / audit key error: {0}")]
    Key(String),
    /// No entry with that sequence number.
    #[error("監査エントリ {0} はありません / no audit entry {0}")]
    NoSuchEntry(u64),
    /// The request was refused by the rule named (and the refusal was audited).
    #[error("拒否されました / denied: {0}")]
    Denied(String),
    /// The background writer is gone.
    #[error("監査ライターが停止しています / audit writer stopped")]
    WriterStopped,
    /// The person/actor index could not be read or written.
    #[error("監査索引のエラー / audit index error: {0}")]
    Index(String),
    /// Another process has this log open (only one writer may append to a log).
    #[error("監査ログ {0} は他のプロセスが使用中です (サーバーが動いていれば止めてください) / the audit log {0} is open in another process (stop the server first)")]
    InUse(String),
    /// The background writer could not write.
    #[error("監査ログに書けません / audit write failed: {0}")]
    Write(String),
}
