//! Helpers shared by the storage tests.

#![allow(dead_code)]

use coalesce_core::merge::Aggregate;
use coalesce_core::output::Output;

/// An output of stream `s` for `key` at `seq` on `shard`, holding `value`.
pub(crate) fn output(shard: u32, key: &str, seq: u64, value: Aggregate) -> Output {
    Output {
        stream: "s".into(),
        key: key.into(),
        shard,
        seq,
        epoch: Default::default(),
        window_start: 0,
        window_end: 1,
        first_input_at: 0,
        last_input_at: 0,
        first_event_at: 0,
        last_event_at: 0,
        inputs: 1,
        reason: coalesce_core::window::SealReason::Time,
        value,
        samples: None,
    }
}

/// Every state-machine row of `store`'s shard as applied, in the bytes of a snapshot (postcard
/// of the rows), read straight from one RocksDB snapshot after a checkpoint: an oracle that
/// shares no code with the view that streams snapshots.
pub(crate) fn state_bytes(store: &coalesce_storage::ShardStore) -> Vec<u8> {
    use coalesce_storage::keys;
    store.checkpoint().expect("checkpoint");
    let db = store.db();
    let snap = db.raw().snapshot();
    let mut rows: Vec<(u8, Vec<u8>, Vec<u8>)> = Vec::new();
    for (i, name) in keys::SM_CFS.iter().enumerate() {
        let cf = db.cf(name).expect("column family");
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(keys::shard_end(store.shard()));
        let start = keys::shard_prefix(store.shard());
        for item in snap.iterator_cf_opt(cf, ro, rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward)) {
            let (k, v) = item.expect("a row");
            rows.push((i as u8, k[4..].to_vec(), v.into_vec()));
        }
    }
    postcard::to_allocvec(&rows).expect("rows encode")
}

/// The number of rows in snapshot bytes.
pub(crate) fn rows_in(bytes: &[u8]) -> usize {
    postcard::from_bytes::<Vec<(u8, Vec<u8>, Vec<u8>)>>(bytes).expect("snapshot bytes").len()
}

/// Opens (creating) a node database at `dir` with default options.
pub(crate) fn open(dir: &std::path::Path) -> std::sync::Arc<coalesce_storage::NodeDb> {
    coalesce_storage::NodeDb::open(dir, &coalesce_storage::StorageOptions::default()).expect("open db")
}

/// Spools the snapshot `bytes` for `shard` as a receiving node does, `chunk` bytes at a time.
pub(crate) fn spool_all(
    db: &coalesce_storage::NodeDb,
    shard: u32,
    bytes: &[u8],
    chunk: usize,
) -> coalesce_storage::transfer::SnapshotFile {
    let mut spool = coalesce_storage::transfer::Spool::create(db, shard, Default::default()).expect("spool");
    for c in bytes.chunks(chunk) {
        spool.push(c).expect("valid snapshot bytes");
    }
    spool.finish().expect("finish")
}

/// Replaces `store`'s state with the snapshot `bytes`, as a node installs one from a peer
/// (spooled, checked, installed).
pub(crate) fn import(store: &coalesce_storage::ShardStore, bytes: &[u8]) {
    store.install_file(spool_all(store.db(), store.shard(), bytes, 1 << 20)).expect("install");
}
