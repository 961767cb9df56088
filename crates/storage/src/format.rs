//! The on-disk format of a node's database: a version, checked when the database opens, and
//! the migrations from every older version.
//!
//! The version lives in the node column family (key `format_version`, a big-endian `u32`),
//! written in the same synced write as the migration that reached it. Opening a database:
//!
//! - empty: it is stamped with [`FORMAT_VERSION`], and with the version it was created in
//!   (`created_format`, the same write; [`created`]);
//! - written by a newer build (a version above [`FORMAT_VERSION`]): refused with
//!   [`StorageError::NewerFormat`], before anything is read or written, so a downgrade cannot
//!   misread state it does not understand (run the newer build, or restore a backup);
//! - older: every migration from its version up runs in order, each recorded as it completes,
//!   so a crash mid-upgrade resumes where it stopped. Buffered state, the log and the outbox
//!   are carried forward; an upgrade never needs an empty data directory.
//!
//! Version 0 is a database written before versions were recorded (up to November 2026); its
//! bytes are format 1, so its migration only records the version.
//!
//! When an encoding of anything stored changes (keys in [`crate::keys`], rows, the log entry
//! and Raft metadata encodings of `coalesce_wire::codec`, the snapshot files of
//! `coalesce_core::snapshot` an interrupted install leaves), bump [`FORMAT_VERSION`], add the migration that
//! rewrites the old rows, and add a data directory written by the previous build to the
//! upgrade test fixtures.
//!
//! A change that both builds read needs no new version, and keeps downgrades possible: a field
//! appended to the end of a postcard row, which an older build ignores (postcard does not
//! check for trailing bytes) and this build reads as absent when the row ends before it.
//! Producer session rows grew that way in December 2026 (`crate::shard::decode_session`): a
//! row of the older shape still arrives in snapshots from older nodes, so its reader stays.

use rocksdb::WriteBatch;

use crate::db::NodeDb;
use crate::error::StorageError;
use crate::keys::{ALL_CFS, CF_NODE};

/// The format this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// The node column family key holding the version.
pub const FORMAT_KEY: &str = "format_version";

/// The node column family key holding the version a data directory was created in, written
/// with the first [`FORMAT_KEY`] of an empty database (in the same write, so a directory has
/// either both or was not created by this build or a later one).
pub const CREATED_FORMAT_KEY: &str = "created_format";

/// `MIGRATIONS[v]` turns a database of format `v` into format `v + 1`, adding its writes to
/// the batch that also records `v + 1`.
type Migration = fn(&NodeDb, &mut WriteBatch) -> Result<(), StorageError>;
const MIGRATIONS: [Migration; FORMAT_VERSION as usize] = [
    // 0 → 1: rows unchanged; only the version is recorded.
    |_, _| Ok(()),
];

/// The format version recorded in `db`, `None` when none is (an empty or a version-0 database).
pub fn recorded(db: &NodeDb) -> Result<Option<u32>, StorageError> {
    db.node_get(FORMAT_KEY)?.map(|b| version(db, &b)).transpose()
}

/// A stored version number (4 bytes, big-endian).
fn version(db: &NodeDb, b: &[u8]) -> Result<u32, StorageError> {
    let bytes: [u8; 4] = b.try_into().map_err(|_| StorageError::Corrupt {
        shard: 0,
        what: "format version",
        detail: format!("{} bytes, expected 4 ({})", b.len(), db.path().display()),
    })?;
    Ok(u32::from_be_bytes(bytes))
}

fn is_empty(db: &NodeDb) -> Result<bool, StorageError> {
    for cf in ALL_CFS {
        let mut it = db.raw().raw_iterator_cf(db.cf(cf)?);
        it.seek_to_first();
        it.status()?;
        if it.valid() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The format version `db` was created in: `None` for a data directory made by a build from
/// before December 2026 (when this was first recorded).
pub fn created(db: &NodeDb) -> Result<Option<u32>, StorageError> {
    db.node_get(CREATED_FORMAT_KEY)?.map(|b| version(db, &b)).transpose()
}

/// Checks `db`'s format and migrates it to [`FORMAT_VERSION`] (see the module docs).
pub(crate) fn check_and_migrate(db: &NodeDb) -> Result<(), StorageError> {
    let found = match recorded(db)? {
        Some(v) => v,
        None if is_empty(db)? => {
            let mut batch = WriteBatch::default();
            batch.put_cf(db.cf(CF_NODE)?, CREATED_FORMAT_KEY.as_bytes(), FORMAT_VERSION.to_be_bytes());
            return record(db, batch, FORMAT_VERSION);
        }
        None => 0,
    };
    if found > FORMAT_VERSION {
        return Err(StorageError::NewerFormat {
            found,
            supported: FORMAT_VERSION,
            path: db.path().display().to_string(),
        });
    }
    for (from, migrate) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let mut batch = WriteBatch::default();
        migrate(db, &mut batch)?;
        let to = from as u32 + 1;
        record(db, batch, to)?;
        tracing::info!(from, to, path = %db.path().display(), "migrated the data directory's format");
    }
    Ok(())
}

fn record(db: &NodeDb, mut batch: WriteBatch, version: u32) -> Result<(), StorageError> {
    batch.put_cf(db.cf(CF_NODE)?, FORMAT_KEY.as_bytes(), version.to_be_bytes());
    db.write_sync(batch)
}
