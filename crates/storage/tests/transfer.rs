//! Snapshots between nodes: a view read chunk by chunk gives exactly the whole snapshot's
//! bytes; a spool checks and keeps what arrives; an install replaces the shard's rows, and a
//! restart in the middle of one finishes it (or refuses to start the shard if it cannot).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::sync::Arc;

use coalesce_core::merge::Aggregate;
use coalesce_core::output::Output;
use coalesce_core::value::Value;
use coalesce_storage::keys::RaftMetaTag;
use coalesce_storage::snapshot::{Limits, SnapshotError, header, put_row};
use coalesce_storage::transfer::{CHUNK_BYTES, Spool, SpoolError};
use coalesce_storage::{NodeDb, ShardStore, StorageError};

use common::open;

fn output(seq: u64, bytes: usize) -> Output {
    let value = Value::Bytes(vec![(seq % 251) as u8; bytes]);
    common::output(0, &format!("key-{seq}"), seq, Aggregate::Latest { value, at: 0 })
}

/// A shard with `n` outbox rows of `bytes` bytes each, checkpointed.
fn filled(db: &Arc<NodeDb>, shard: u32, n: u64, bytes: usize) -> ShardStore {
    let store = ShardStore::new(Arc::clone(db), shard);
    let mut seq = 1;
    while seq <= n {
        let mut batch = store.apply_batch();
        for _ in 0..64.min(n - seq + 1) {
            batch.outbox_put(&output(seq, bytes)).unwrap();
            seq += 1;
        }
        batch.sm_meta_put(coalesce_storage::keys::SmMetaTag::Applied, seq.to_be_bytes().to_vec());
        batch.commit().unwrap();
    }
    store.checkpoint().unwrap();
    store
}

fn view_bytes(store: &ShardStore) -> (Vec<u8>, usize) {
    let mut view = store.open_view().unwrap();
    let (mut all, mut chunks) = (Vec::new(), 0);
    while let Some(c) = view.next_chunk().unwrap() {
        assert!(c.len() <= CHUNK_BYTES);
        all.extend(c);
        chunks += 1;
    }
    assert_eq!(view.next_chunk().unwrap(), None, "a finished view stays finished");
    (all, chunks)
}

fn snapshot_files(db: &NodeDb) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(db.snapshot_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_view_streams_exactly_the_whole_snapshot_and_an_install_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    // About 5 MiB: several chunks.
    let source = filled(&db, 1, 2_600, 2_000);
    let whole = common::state_bytes(&source);
    let (streamed, chunks) = view_bytes(&source);
    assert_eq!(streamed, whole, "the streamed bytes are those of the whole encoding");
    assert!(chunks >= 5, "{chunks} chunks");

    // Writes after the view was opened are not in it.
    let mut view = source.open_view().unwrap();
    let applied_before = view.meta().applied.clone();
    let mut batch = source.apply_batch();
    batch.outbox_put(&output(9_999, 10)).unwrap();
    batch.commit().unwrap();
    source.checkpoint().unwrap();
    let mut from_view = Vec::new();
    while let Some(c) = view.next_chunk().unwrap() {
        from_view.extend(c);
    }
    assert_eq!(from_view, whole, "a view is one consistent point in time");
    assert_eq!(applied_before, Some(2_601u64.to_be_bytes().to_vec()));

    // Another node installs it, replacing what it had.
    let other_dir = tempfile::tempdir().unwrap();
    let other_db = open(other_dir.path());
    let other = filled(&other_db, 1, 40, 7);
    let file = common::spool_all(&other_db, 1, &whole, 77_777);
    assert_eq!(
        file.rows(),
        common::rows_in(&common::state_bytes(&source)) as u64 - 1,
        "all rows but the output written since"
    );
    assert_eq!(file.meta().applied, applied_before);
    other.install_file(file).unwrap();
    assert_eq!(common::state_bytes(&other), whole);
    assert_eq!(snapshot_files(&other_db), Vec::<String>::new(), "the installed file is removed");
    assert_eq!(other.raft_meta_get(RaftMetaTag::Installing).unwrap(), None);
}

#[test]
fn a_spool_refuses_bad_bytes_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let source = filled(&db, 3, 100, 500);
    let whole = common::state_bytes(&source);

    let small = Limits { max_bytes: whole.len() as u64 / 2, ..Limits::default() };
    let mut spool = Spool::create(&db, 3, small).unwrap();
    let refused = whole.chunks(4096).map(|c| spool.push(c)).find_map(Result::err);
    assert!(matches!(refused, Some(SpoolError::Invalid(SnapshotError::TooLarge { .. }))), "{refused:?}");
    assert_eq!(snapshot_files(&db).len(), 1, "the .part file exists while the spool does");
    drop(spool);
    assert_eq!(snapshot_files(&db), Vec::<String>::new(), "a dropped spool removes its file");

    let mut spool = Spool::create(&db, 3, Limits::default()).unwrap();
    spool.push(&whole[..whole.len() - 1]).unwrap();
    assert!(matches!(spool.finish(), Err(SpoolError::Invalid(SnapshotError::Truncated { .. }))));
    assert_eq!(snapshot_files(&db), Vec::<String>::new());

    let mut unordered = header(2);
    put_row(&mut unordered, 2, b"b", b"v");
    put_row(&mut unordered, 2, b"a", b"v");
    let mut spool = Spool::create(&db, 3, Limits::default()).unwrap();
    assert!(matches!(spool.push(&unordered), Err(SpoolError::Invalid(SnapshotError::OutOfOrder { .. }))));
}

#[test]
fn a_restart_in_the_middle_of_an_install_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let source_dir = tempfile::tempdir().unwrap();
    let whole = {
        let source_db = open(source_dir.path());
        common::state_bytes(&filled(&source_db, 5, 300, 300))
    };
    let old = {
        let db = open(dir.path());
        let store = filled(&db, 5, 20, 5);
        let old = common::state_bytes(&store);
        // What install_file leaves behind when the process dies after its marker and some of
        // its writes: the marker, the file, and the old rows (here: all of them).
        let file = common::spool_all(&db, 5, &whole, 1 << 16);
        let name = file.path().file_name().unwrap().to_string_lossy().into_owned();
        store.raft_meta_put(RaftMetaTag::Installing, name.as_bytes(), true).unwrap();
        std::mem::forget(file);
        // A stray file of this shard and one of another shard.
        std::fs::write(db.snapshot_dir().join("shard-5-ffff.snap"), b"stray").unwrap();
        std::fs::write(db.snapshot_dir().join("shard-6-ffff.snap"), b"other").unwrap();
        std::fs::write(db.snapshot_dir().join("shard-5-eeee.part"), b"half").unwrap();
        old
    };
    let db = open(dir.path());
    assert_eq!(snapshot_files(&db).len(), 1, "opening keeps only the file a marker names: {:?}", snapshot_files(&db));
    let store = ShardStore::new(Arc::clone(&db), 5);
    assert_ne!(common::state_bytes(&store), whole);
    assert_ne!(old, whole);
    assert!(store.recover_install().unwrap(), "the install is finished");
    assert_eq!(common::state_bytes(&store), whole);
    assert_eq!(store.raft_meta_get(RaftMetaTag::Installing).unwrap(), None);
    assert_eq!(snapshot_files(&db), Vec::<String>::new(), "the installed file is removed");
    assert!(!store.recover_install().unwrap(), "nothing left to finish");
}

#[test]
fn an_interrupted_install_whose_file_is_gone_refuses_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let store = filled(&db, 2, 10, 5);
    store.raft_meta_put(RaftMetaTag::Installing, b"shard-2-1234.snap", true).unwrap();
    let err = store.recover_install().unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { shard: 2, .. }), "{err}");
    assert!(err.to_string().contains("rebuild it from a healthy replica"), "{err}");
    // The marker stays: every later start refuses the shard too, until an operator acts.
    assert!(store.recover_install().is_err());
    // A marker that names a path outside the directory is refused the same way.
    store.raft_meta_put(RaftMetaTag::Installing, b"../../etc/passwd", true).unwrap();
    assert!(store.recover_install().is_err());
}

#[test]
fn readers_are_told_while_an_install_runs() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    // About 9 MiB: more than two of the install's RocksDB writes.
    let source = filled(&db, 1, 3_000, 3_000);
    let whole = common::state_bytes(&source);
    let target = filled(&db, 2, 5, 5);
    let file = common::spool_all(&db, 2, &whole, 1 << 20);
    let reader = target.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut lens = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match reader.outbox_from(0, usize::MAX) {
                    Ok(rows) => {
                        lens.insert(rows.len());
                    }
                    Err(StorageError::Installing { shard: 2 }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            lens
        })
    };
    target.install_file(file).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let lens = seen.join().unwrap();
    assert!(lens.iter().all(|n| *n == 5 || *n == 3_000), "a reader saw part of the install: {lens:?}");
    assert_eq!(target.outbox_from(0, usize::MAX).unwrap().len(), 3_000);
}
