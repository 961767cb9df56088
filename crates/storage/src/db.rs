//! The node's RocksDB: one database shared by every shard group on the node.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use crate::error::StorageError;
use crate::flusher::Flusher;
use crate::keys::{ALL_CFS, CF_NODE};

/// Tuning knobs; the defaults suit a small node.
#[derive(Clone, Debug)]
pub struct StorageOptions {
    /// Block cache shared by all column families.
    pub block_cache_bytes: usize,
    /// Memtable size per column family.
    pub write_buffer_bytes: usize,
    /// WAL files kept for reuse under [`WalRecovery::PointInTime`]: syncing an overwritten,
    /// preallocated file is far cheaper than syncing a growing one (see docs/benchmarks.md).
    pub recycle_wal_files: usize,
    /// How the write-ahead log is replayed at open.
    pub wal_recovery: WalRecovery,
    /// Most table files RocksDB keeps open (its `max_open_files`; RocksDB's own default keeps
    /// every one open, so file descriptors grow with the data). Files beyond it are reopened
    /// on use through the table cache.
    pub max_open_files: u32,
}

/// The default of [`StorageOptions::max_open_files`]: with the ports' connection bounds
/// (docs/security.md) a node stays within a 10,000-descriptor limit.
pub const DEFAULT_MAX_OPEN_FILES: u32 = 1_024;

impl Default for StorageOptions {
    fn default() -> Self {
        Self {
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 32 << 20,
            recycle_wal_files: 4,
            wal_recovery: WalRecovery::default(),
            max_open_files: DEFAULT_MAX_OPEN_FILES,
        }
    }
}

/// How RocksDB replays its write-ahead log when the database opens. Raft's safety rests on
/// what a node synced staying synced: a vote or a log entry it acknowledged and then forgot
/// can elect two leaders in one term or lose a committed entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalRecovery {
    /// A torn last record (the write a crash interrupted, never acknowledged) is dropped; any
    /// other damage — a corrupt record with valid ones after it, a synced WAL missing or
    /// shorter than recorded — refuses the open, naming it, instead of dropping the rest of the
    /// log (RocksDB `kTolerateCorruptedTailRecords`, with synced WALs tracked in the MANIFEST).
    /// WAL files are then never recycled (RocksDB turns recycling off in this mode: it could not
    /// tell a recycled file's old bytes from corruption), so every sync also grows a file.
    #[default]
    Strict,
    /// RocksDB's default (`kPointInTimeRecovery`): replay stops at the first damaged record and
    /// whatever follows it is dropped **silently**, so mid-log corruption can make a node forget
    /// a vote or an entry it synced. WAL files are recycled (cheaper fsyncs).
    PointInTime,
}

/// A node's database and its group-commit flusher.
#[derive(Debug)]
pub struct NodeDb {
    db: Arc<DB>,
    path: PathBuf,
    /// Where snapshot files are received ([`crate::transfer`]).
    snapshots: PathBuf,
    flusher: Flusher,
}

impl NodeDb {
    /// Opens (creating if needed) the database at `path` with every column family, checks its
    /// format version and migrates it from an older one ([`crate::format`]).
    pub fn open(path: &Path, options: &StorageOptions) -> Result<Arc<Self>, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        match options.wal_recovery {
            WalRecovery::Strict => {
                opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
                // Said explicitly: RocksDB would turn it off silently in this mode.
                opts.set_recycle_log_file_num(0);
            }
            WalRecovery::PointInTime => {
                opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
                opts.set_recycle_log_file_num(options.recycle_wal_files);
            }
        }
        // A synced WAL that goes missing or shrinks is an error at open, in either mode.
        opts.set_track_and_verify_wals_in_manifest(true);
        opts.set_max_background_jobs(2);
        opts.set_max_open_files(i32::try_from(options.max_open_files).unwrap_or(i32::MAX));
        opts.set_bytes_per_sync(1 << 20);
        let cache = rocksdb::Cache::new_lru_cache(options.block_cache_bytes);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_write_buffer_size(options.write_buffer_bytes);
            cf.set_block_based_table_factory(&table);
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let db = Arc::new(db);
        let flusher = Flusher::start(Arc::clone(&db));
        let snapshots = path.join(crate::transfer::SNAPSHOT_DIR);
        let node = Self { db, path: path.to_owned(), snapshots, flusher };
        // First: a data directory of a newer build is refused before anything is touched.
        crate::format::check_and_migrate(&node)?;
        // A marker that cannot be read stops the open: its file may be the only copy of a
        // half-installed shard's state.
        let meta_cf = node.cf(crate::keys::CF_RAFT_META)?;
        crate::transfer::prepare_dir(&node.snapshots, |shard, name| {
            let key = crate::keys::raft_meta_key(shard, crate::keys::RaftMetaTag::Installing);
            Ok(node.db.get_cf(meta_cf, key)?.is_some_and(|m| m == name.as_bytes()))
        })?;
        Ok(Arc::new(node))
    }

    /// The column family `name` (every name in [`ALL_CFS`] exists once opened).
    pub fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StorageError> {
        self.db.cf_handle(name).ok_or(StorageError::MissingColumnFamily(name))
    }

    /// The raw database, for reads and iteration.
    pub fn raw(&self) -> &DB {
        &self.db
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory that holds received snapshot files (inside the data directory).
    pub fn snapshot_dir(&self) -> &Path {
        &self.snapshots
    }

    /// Writes a batch to the WAL and memtables without waiting for an fsync. Durability comes
    /// from [`NodeDb::flusher`] (log appends) or [`NodeDb::write_sync`].
    pub fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Writes a batch and fsyncs the WAL before returning (votes, purge markers).
    pub fn write_sync(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let extra = self.flusher.extra_latency();
        if !extra.is_zero() {
            std::thread::sleep(extra);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// The shared group-commit flusher.
    pub fn flusher(&self) -> &Flusher {
        &self.flusher
    }

    /// A node-level value (not per shard), e.g. the node's peer identity.
    pub fn node_get(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(self.cf(CF_NODE)?, name.as_bytes())?)
    }

    /// Sets a node-level value durably.
    pub fn node_put(&self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_NODE)?, name.as_bytes(), value);
        self.write_sync(batch)
    }

    /// Approximate on-disk size of a column family (for metrics).
    pub fn cf_size_bytes(&self, name: &'static str) -> Result<u64, StorageError> {
        Ok(self.db.property_int_value_cf(self.cf(name)?, rocksdb::properties::TOTAL_SST_FILES_SIZE)?.unwrap_or(0)
            + self.db.property_int_value_cf(self.cf(name)?, rocksdb::properties::CUR_SIZE_ALL_MEM_TABLES)?.unwrap_or(0))
    }
}
