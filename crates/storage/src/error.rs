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
}

impl StorageError {
    /// A stable code for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            StorageError::Rocks(_) => "rocksdb",
            StorageError::MissingColumnFamily(_) => "missing_cf",
            StorageError::Corrupt { .. } => "corrupt",
            StorageError::Encode { .. } => "encode",
        }
    }
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        std::io::Error::other(e)
    }
}
