//! Storage errors.

use thiserror::Error;

/// What can go wrong in storage. Any of these stops the affected shard group: the Raft layer
/// treats storage errors as fatal rather than guessing.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("column family {0} is missing")]
    MissingColumnFamily(&'static str),
    #[error("corrupt {what} in shard {shard}: {detail}")]
    Corrupt { shard: u32, what: &'static str, detail: String },
    #[error("encoding {what}: {detail}")]
    Encode { what: &'static str, detail: String },
    /// Bytes that do not decode as the message they should be (a peer's, or a stored row's).
    #[error("decoding {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    /// A log entry could not be applied (invalid, or its apply failed or panicked): the shard
    /// group stops on this replica rather than skip or half-apply it.
    #[error("shard {shard} stopped: applying log entry {index} failed: {detail}")]
    ApplyFailed { shard: u32, index: u64, detail: String },
    #[error(
        "the data directory {path} was written in storage format {found} by a newer Coalesce; this build reads \
         formats up to {supported}: run the newer build (or restore a backup taken before the upgrade)"
    )]
    NewerFormat { found: u32, supported: u32, path: String },
    /// The shard's state machine is being replaced by a snapshot: reads would see part of it.
    #[error("shard {shard} is installing a snapshot; try again")]
    Installing { shard: u32 },
    /// Reading or writing a snapshot file.
    #[error("snapshot file {path}: {detail}")]
    SnapshotFile { path: String, detail: String },
    /// The thread reading a snapshot of the shard's state could not start or ended early.
    #[error("reading a snapshot of shard {shard}: {detail}")]
    SnapshotReader { shard: u32, detail: String },
}

impl StorageError {
    /// A stable code for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            StorageError::Rocks(_) => "rocksdb",
            StorageError::MissingColumnFamily(_) => "missing_cf",
            StorageError::Corrupt { .. } => "corrupt",
            StorageError::Encode { .. } => "encode",
            StorageError::Decode { .. } => "decode",
            StorageError::ApplyFailed { .. } => "apply_failed",
            StorageError::NewerFormat { .. } => "newer_format",
            StorageError::Installing { .. } => "installing",
            StorageError::SnapshotFile { .. } => "snapshot_file",
            StorageError::SnapshotReader { .. } => "snapshot_reader",
        }
    }
}

impl From<coalesce_core::error::CodecError> for StorageError {
    fn from(e: coalesce_core::error::CodecError) -> Self {
        use coalesce_core::error::CodecError as C;
        match e {
            C::Corrupt { shard, what, detail } => StorageError::Corrupt { shard, what, detail },
            C::Encode { what, detail } => StorageError::Encode { what, detail },
            C::Decode { what, detail } => StorageError::Decode { what, detail },
        }
    }
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        std::io::Error::other(e)
    }
}
