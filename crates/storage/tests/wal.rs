//! What a node finds of its synced writes after a crash, by WAL recovery mode: the database
//! directory is copied while it is open (a crash image), its WAL damaged, and the copy opened.
//!
//! - A torn last record (the crash cut the write in progress) is dropped in both modes.
//! - A corrupt record with synced records after it: `Strict` refuses to open, naming the
//!   corruption; `PointInTime` (RocksDB's default) opens and has silently forgotten every record
//!   from the damaged one on — the loss `Strict` exists to prevent.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use coalesce_storage::{NodeDb, StorageOptions, WalRecovery};

const KEYS: usize = 200;

fn key(i: usize) -> String {
    format!("k{i:04}")
}

/// A copy of a database directory taken while the database is open and every write synced.
fn crash_image(mode: WalRecovery) -> (tempfile::TempDir, PathBuf) {
    let live = tempfile::tempdir().unwrap();
    let db = NodeDb::open(live.path(), &StorageOptions { wal_recovery: mode, ..Default::default() }).unwrap();
    for i in 0..KEYS {
        db.node_put(&key(i), &[i as u8; 512]).unwrap();
    }
    let image = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(live.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), image.path().join(entry.file_name())).unwrap();
        }
    }
    drop(db);
    let wal = std::fs::read_dir(image.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a WAL file");
    (image, wal)
}

fn open(dir: &Path, mode: WalRecovery) -> Result<std::sync::Arc<NodeDb>, coalesce_storage::StorageError> {
    NodeDb::open(dir, &StorageOptions { wal_recovery: mode, ..Default::default() })
}

fn present(db: &NodeDb) -> usize {
    (0..KEYS).filter(|i| db.node_get(&key(*i)).unwrap().is_some()).count()
}

/// The length of the WAL's data: recycled or preallocated files end in zeros.
fn data_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1)
}

#[test]
fn a_torn_last_record_is_dropped_in_both_modes() {
    for mode in [WalRecovery::Strict, WalRecovery::PointInTime] {
        let (image, wal) = crash_image(mode);
        let bytes = std::fs::read(&wal).unwrap();
        // Cut the last record in half: the write a crash interrupted.
        std::fs::write(&wal, &bytes[..data_len(&bytes) - 300]).unwrap();
        let db = open(image.path(), mode).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_eq!(present(&db), KEYS - 1, "{mode:?}: all but the torn write");
    }
}

#[test]
fn mid_log_corruption_refuses_the_open_in_strict_mode_and_is_silent_in_point_in_time() {
    for mode in [WalRecovery::Strict, WalRecovery::PointInTime] {
        let (image, wal) = crash_image(mode);
        let mut bytes = std::fs::read(&wal).unwrap();
        let middle = data_len(&bytes) / 2;
        for b in &mut bytes[middle..middle + 16] {
            *b ^= 0x5a;
        }
        std::fs::write(&wal, &bytes).unwrap();
        match (mode, open(image.path(), mode)) {
            (WalRecovery::Strict, Err(e)) => {
                let e = e.to_string();
                assert!(e.to_lowercase().contains("corrupt"), "the error names the corruption: {e}");
            }
            (WalRecovery::PointInTime, Ok(db)) => {
                let n = present(&db);
                assert!(n < KEYS / 2 + 10, "PointInTime drops everything after the damage: {n} of {KEYS} kept");
            }
            (mode, r) => panic!("{mode:?}: unexpected {:?}", r.map(|_| ())),
        }
    }
}
