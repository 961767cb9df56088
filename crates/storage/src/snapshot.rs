//! A shard snapshot's bytes: the format and its checked reader live in
//! [`coalesce_core::snapshot`] (so the fuzz targets read snapshots without RocksDB); this module
//! binds the reader to the state machine's column families ([`crate::keys::SM_CFS`]).

pub use coalesce_core::snapshot::{Limits, RowReader, SnapshotError, header, put_row};

/// A reader of a snapshot of this build's state-machine column families.
pub fn reader(limits: Limits) -> RowReader {
    RowReader::new(limits, crate::keys::SM_CFS.len())
}
