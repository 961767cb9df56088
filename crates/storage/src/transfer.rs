//! A shard snapshot on its way between nodes, never whole in memory.
//!
//! - The sender reads a [`StateView`]: one consistent RocksDB snapshot of the shard's
//!   state-machine rows, turned into [`crate::snapshot`] bytes one chunk at a time as the
//!   network asks for them (the receiver's flow control paces it). The view belongs to a thread
//!   of its own, since a RocksDB snapshot borrows the database; dropping the view ends the
//!   thread and releases the snapshot.
//! - The receiver writes what arrives into a [`Spool`]: a `.part` file in the node's snapshot
//!   directory, checked row by row with a [`RowReader`] as it grows (size, order, column
//!   families), then fsynced and renamed to a [`SnapshotFile`].
//! - [`crate::ShardStore::install_file`] replaces the shard's rows with the file's in bounded
//!   RocksDB writes, behind a durable marker so that a restart mid-way finishes the install
//!   ([`crate::ShardStore::recover_install`]) instead of starting from half a state.
//!
//! Memory per transfer: a chunk or two on each side (about [`CHUNK_BYTES`]), plus one row.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use coalesce_core::hash::ShardId;
use rocksdb::{Direction, IteratorMode, ReadOptions};

use crate::db::NodeDb;
use crate::error::StorageError;
use crate::keys::{self, SmMetaTag};
use crate::snapshot::{Limits, RowReader, SnapshotError, header, put_row, reader};

/// Bytes per chunk a sender produces (the last of a snapshot may be shorter).
pub const CHUNK_BYTES: usize = 1 << 20;

/// The directory, inside the data directory, that holds snapshot files.
pub const SNAPSHOT_DIR: &str = "snapshots";

fn file_error(path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError::SnapshotFile { path: path.display().to_string(), detail: e.to_string() }
}

/// Creates the snapshot directory if needed and removes what no install needs: `.part` files
/// (transfers a previous process did not finish) and any other file not named by its shard's
/// install marker (`needed(shard, name)`), whether or not this node still hosts that shard.
pub(crate) fn prepare_dir(
    dir: &Path,
    needed: impl Fn(ShardId, &str) -> Result<bool, StorageError>,
) -> Result<(), StorageError> {
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    for entry in std::fs::read_dir(dir).map_err(|e| file_error(dir, e))? {
        let entry = entry.map_err(|e| file_error(dir, e))?;
        let path = entry.path();
        if entry.file_type().map_err(|e| file_error(&path, e))?.is_dir() {
            // Nothing of ours: someone else's, left alone.
            tracing::warn!(path = %path.display(), "a directory among snapshot files: left alone");
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep = match file_shard(&name) {
            Some(shard) if name.ends_with(".snap") => needed(shard, &name)?,
            _ => false,
        };
        if !keep {
            std::fs::remove_file(&path).map_err(|e| file_error(&path, e))?;
        }
    }
    Ok(())
}

/// The shard a snapshot file name (`shard-<id>-<nonce>.snap`) belongs to.
pub(crate) fn file_shard(name: &str) -> Option<ShardId> {
    name.strip_prefix("shard-")?.split('-').next()?.parse().ok()
}

/// The values of a snapshot's applied-log-id and membership rows (encoded by the Raft crate).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMetaRows {
    pub applied: Option<Vec<u8>>,
    pub membership: Option<Vec<u8>>,
}

impl SnapshotMetaRows {
    /// Records `row` if it is one of the two.
    fn see(&mut self, cf: u8, key: &[u8], value: &[u8]) {
        if keys::SM_CFS.get(cf as usize) != Some(&keys::CF_SM_META) {
            return;
        }
        if key == [SmMetaTag::Applied as u8] {
            self.applied = Some(value.to_vec());
        } else if key == [SmMetaTag::Membership as u8] {
            self.membership = Some(value.to_vec());
        }
    }
}

// ---- Sending ---------------------------------------------------------------------------------

/// One consistent view of a shard's state-machine rows, read as snapshot bytes chunk by chunk
/// (see the module docs). Opened by [`crate::ShardStore::open_view`].
#[derive(Debug)]
pub struct StateView {
    shard: ShardId,
    meta: SnapshotMetaRows,
    /// One request per chunk wanted.
    ask: mpsc::SyncSender<()>,
    /// One answer per request: a chunk, or `None` after the last.
    chunks: mpsc::Receiver<Result<Option<Vec<u8>>, StorageError>>,
    ended: bool,
    /// Set when the view is dropped: the thread stops scanning at once.
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for StateView {
    fn drop(&mut self) {
        self.dropped.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl StateView {
    pub(crate) fn open(db: Arc<NodeDb>, shard: ShardId) -> Result<Self, StorageError> {
        let (meta_tx, meta_rx) = mpsc::sync_channel(1);
        let (ask, asked) = mpsc::sync_channel::<()>(1);
        let (chunk_tx, chunks) = mpsc::sync_channel(1);
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gone = Arc::clone(&dropped);
        std::thread::Builder::new()
            .name(format!("snapshot-view-{shard}"))
            .spawn(move || serve_view(&db, shard, &meta_tx, &asked, &chunk_tx, &gone))
            .map_err(|e| StorageError::SnapshotReader {
                shard,
                detail: format!("the view thread did not start: {e}"),
            })?;
        let meta = meta_rx.recv().map_err(|_| view_gone(shard))??;
        Ok(Self { shard, meta, ask, chunks, ended: false, dropped })
    }

    /// The view's applied-log-id and membership rows.
    pub fn meta(&self) -> &SnapshotMetaRows {
        &self.meta
    }

    /// The next bytes of the snapshot (at most [`CHUNK_BYTES`]); `None` once all were read.
    /// Blocks while RocksDB is read: call it off the async runtime's workers.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, StorageError> {
        if self.ended {
            return Ok(None);
        }
        self.ask.send(()).map_err(|_| view_gone(self.shard))?;
        let chunk = self.chunks.recv().map_err(|_| view_gone(self.shard))??;
        self.ended = chunk.is_none();
        Ok(chunk)
    }
}

fn view_gone(shard: ShardId) -> StorageError {
    StorageError::SnapshotReader { shard, detail: "the view thread ended".into() }
}

type ChunkSender = mpsc::SyncSender<Result<Option<Vec<u8>>, StorageError>>;

/// Called with each row (column family index, key without the shard prefix, value); false
/// stops the scan.
type RowVisitor<'a> = dyn FnMut(u8, &[u8], &[u8]) -> bool + 'a;

/// The view's thread: reads the metadata rows at once, then (when the first chunk is asked
/// for) counts the rows and streams them, one chunk per request, from the same RocksDB
/// snapshot. Returns as soon as the view is dropped.
fn serve_view(
    db: &NodeDb,
    shard: ShardId,
    meta_tx: &mpsc::SyncSender<Result<SnapshotMetaRows, StorageError>>,
    asked: &mpsc::Receiver<()>,
    chunks: &ChunkSender,
    dropped: &std::sync::atomic::AtomicBool,
) {
    let snap = db.raw().snapshot();
    let read_meta = || -> Result<SnapshotMetaRows, StorageError> {
        let cf = db.cf(keys::CF_SM_META)?;
        Ok(SnapshotMetaRows {
            applied: snap.get_cf(cf, keys::sm_meta_key(shard, SmMetaTag::Applied))?,
            membership: snap.get_cf(cf, keys::sm_meta_key(shard, SmMetaTag::Membership))?,
        })
    };
    if meta_tx.send(read_meta()).is_err() || asked.recv().is_err() {
        return;
    }
    let scan = |each: &mut RowVisitor<'_>| -> Result<bool, StorageError> {
        for (i, name) in keys::SM_CFS.iter().enumerate() {
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(keys::shard_end(shard));
            let start = keys::shard_prefix(shard);
            for (n, item) in
                snap.iterator_cf_opt(db.cf(name)?, ro, IteratorMode::From(&start, Direction::Forward)).enumerate()
            {
                let (k, v) = item?;
                // A dropped view stops a long scan (the count, or rows nobody will read).
                if n % 4096 == 0 && dropped.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(false);
                }
                if !each(i as u8, &k[4..], &v) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    };
    let mut rows = 0u64;
    match scan(&mut |_, _, _| {
        rows += 1;
        true
    }) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            let _ = chunks.send(Err(e));
            return;
        }
    }
    let mut out = header(rows);
    // Sends full chunks while `out` holds one; false once the view is gone.
    let flush = |out: &mut Vec<u8>, all: bool| -> bool {
        while out.len() >= CHUNK_BYTES || (all && !out.is_empty()) {
            let rest = out.split_off(out.len().min(CHUNK_BYTES));
            let chunk = std::mem::replace(out, rest);
            if chunks.send(Ok(Some(chunk))).is_err() || asked.recv().is_err() {
                return false;
            }
        }
        true
    };
    let finished = scan(&mut |cf, k, v| {
        put_row(&mut out, cf, k, v);
        flush(&mut out, false)
    });
    match finished {
        Ok(true) if flush(&mut out, true) => {
            let _ = chunks.send(Ok(None));
        }
        Ok(_) => {}
        Err(e) => {
            let _ = chunks.send(Err(e));
        }
    }
}

// ---- Receiving -------------------------------------------------------------------------------

/// A snapshot being received into a `.part` file (see the module docs). Dropping it before
/// [`Spool::finish`] removes the file.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: Option<BufWriter<File>>,
    /// Set once the file is handed over as a [`SnapshotFile`].
    done: bool,
    reader: RowReader,
    meta: SnapshotMetaRows,
    bytes: u64,
}

impl Spool {
    /// A new, empty spool file for `shard` in the snapshot directory of `db`.
    pub fn create(db: &NodeDb, shard: ShardId, limits: Limits) -> Result<Self, StorageError> {
        let nonce: u64 =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let path = db.snapshot_dir().join(format!("shard-{shard}-{nonce:x}.part"));
        // create_new: never write into a file another transfer owns.
        let file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| file_error(&path, e))?;
        Ok(Self {
            path,
            file: Some(BufWriter::with_capacity(1 << 16, file)),
            done: false,
            reader: reader(limits),
            meta: SnapshotMetaRows::default(),
            bytes: 0,
        })
    }

    /// Checks and appends the next bytes. A [`SnapshotError`] says what is wrong with them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        let meta = &mut self.meta;
        self.reader.push(bytes, |cf, key, value| {
            meta.see(cf, key, value);
            Ok::<_, SpoolError>(())
        })?;
        let file = self.file.as_mut().ok_or_else(|| SpoolError::Io(file_error(&self.path, "already finished")))?;
        file.write_all(bytes).map_err(|e| SpoolError::Io(file_error(&self.path, e)))?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Checks that the snapshot is complete, makes the file durable and names it `.snap`.
    /// Blocks on fsync.
    pub fn finish(mut self) -> Result<SnapshotFile, SpoolError> {
        self.reader.finish()?;
        let writer = self.file.take().ok_or_else(|| SpoolError::Io(file_error(&self.path, "already finished")))?;
        let file = writer.into_inner().map_err(|e| SpoolError::Io(file_error(&self.path, e.error())))?;
        file.sync_all().map_err(|e| SpoolError::Io(file_error(&self.path, e)))?;
        let done = self.path.with_extension("snap");
        std::fs::rename(&self.path, &done).map_err(|e| SpoolError::Io(file_error(&self.path, e)))?;
        sync_dir(&done)?;
        self.done = true;
        let rows = self.reader.read();
        Ok(SnapshotFile { path: done, bytes: self.bytes, rows, meta: std::mem::take(&mut self.meta), keep: false })
    }
}

impl Drop for Spool {
    /// Removes the file, under whichever name it has, unless it was handed over: a spool that
    /// fails anywhere (even in [`Spool::finish`]) leaves nothing behind.
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
            let _ = std::fs::remove_file(self.path.with_extension("snap"));
        }
    }
}

/// Why received snapshot bytes were not kept.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(transparent)]
    Invalid(#[from] SnapshotError),
    #[error(transparent)]
    Io(StorageError),
}

fn sync_dir(path: &Path) -> Result<(), SpoolError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| SpoolError::Io(file_error(dir, e)))
}

/// A complete, durable snapshot file received from a peer. Dropping it removes the file
/// (after [`crate::ShardStore::install_file`], the install owns what is left of it).
#[derive(Debug)]
pub struct SnapshotFile {
    path: PathBuf,
    bytes: u64,
    rows: u64,
    meta: SnapshotMetaRows,
    /// Left on disk when dropped: an install marker names it.
    keep: bool,
}

impl SnapshotFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's name in the snapshot directory (what an install marker records).
    pub(crate) fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The file's applied-log-id and membership rows.
    pub fn meta(&self) -> &SnapshotMetaRows {
        &self.meta
    }
}

impl SnapshotFile {
    /// Leaves the file on disk when this is dropped (a failed install's marker names it, and
    /// the next start finishes the install from it).
    pub(crate) fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A snapshot file's bytes, [`CHUNK_BYTES`] at a time.
#[derive(Debug)]
struct FileChunks {
    file: File,
    path: PathBuf,
}

impl FileChunks {
    /// The next bytes; `None` at the end. Blocks on the read.
    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, StorageError> {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut filled = 0;
        while filled < buf.len() {
            match self.file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(file_error(&self.path, e)),
            }
        }
        buf.truncate(filled);
        Ok((filled > 0).then_some(buf))
    }
}

/// Rows of the snapshot file at `path`, read and checked again (a file on this node's disk is
/// trusted no more than the bytes that came over the network).
pub(crate) fn read_rows(
    shard: ShardId,
    path: &Path,
    mut each: impl FnMut(u8, &[u8], &[u8]) -> Result<(), StorageError>,
) -> Result<u64, StorageError> {
    let file = File::open(path).map_err(|e| file_error(path, e))?;
    let mut chunks = FileChunks { file, path: path.to_owned() };
    let mut reader = reader(Limits::default());
    let corrupt = |e: SnapshotError| StorageError::Corrupt { shard, what: "snapshot file", detail: e.to_string() };
    while let Some(chunk) = chunks.next_chunk()? {
        reader.push(&chunk, |cf, k, v| each(cf, k, v).map_err(SpoolError::Io)).map_err(|e| match e {
            SpoolError::Invalid(e) => corrupt(e),
            SpoolError::Io(e) => e,
        })?;
    }
    reader.finish().map_err(corrupt)?;
    Ok(reader.read())
}
