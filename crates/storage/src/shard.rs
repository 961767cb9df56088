//! One shard's rows in the node database: its Raft log and metadata, and its state machine
//! (buffer, deadline index, outbox, producer sessions, metadata).
//!
//! The Raft crate stores log entries and Raft metadata as opaque bytes; this module does not
//! know openraft. State-machine writes go through an [`ApplyBatch`], which gives the core's
//! apply functions read-your-writes semantics and commits one Raft entry's effects (including
//! the applied log id) in one atomic RocksDB write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex};

use coalesce_core::buffer::{BufKey, BufferStore, Buffered, ShardStats};
use coalesce_core::hash::ShardId;
use coalesce_core::output::{DeadLetter, Output};
use coalesce_core::session::Session;
use coalesce_core::time::Millis;
use hashbrown::HashMap;
use hashbrown::hash_map::Entry;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::db::NodeDb;
use crate::error::StorageError;
use crate::flusher::FlushCallback;
use crate::keys::{self, RaftMetaTag, SmMetaTag};

pub(crate) fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(v).map_err(|e| StorageError::Encode { what, detail: e.to_string() })
}

pub(crate) fn decode<T: DeserializeOwned>(shard: ShardId, what: &'static str, bytes: &[u8]) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt { shard, what, detail: e.to_string() })
}

/// A producer session row. Rows written before December 2026 hold only `last_seq` and
/// `last_seen`, the prefix of today's encoding (so older builds read today's rows too, ignoring
/// the ranges): they read as [`Session::legacy`].
pub(crate) fn decode_session(shard: ShardId, bytes: &[u8]) -> Result<Session, StorageError> {
    let ((last_seq, last_seen), rest): ((u64, u64), &[u8]) = postcard::take_from_bytes(bytes)
        .map_err(|e| StorageError::Corrupt { shard, what: "session", detail: e.to_string() })?;
    if rest.is_empty() {
        return Ok(Session::legacy(last_seq, last_seen));
    }
    decode(shard, "session", bytes)
}

/// Accounted bytes ([`Buffered::bytes`]) of buffered aggregates one shard keeps in memory.
pub const BUFFER_CACHE_BYTES: u64 = 16 << 20;

/// Bytes of rows per RocksDB write when a snapshot replaces a shard's state.
pub const INSTALL_WRITE_BYTES: usize = 4 << 20;

/// Approximate bytes of applied-but-not-checkpointed state a shard holds before
/// [`ShardStore::checkpoint_due`] asks for a checkpoint, whatever the interval.
pub const PENDING_MAX_BYTES: u64 = 16 << 20;

/// The shard's committed buffer rows kept in memory, so applying an entry does not read (and
/// decode) RocksDB for every key it touches: a read-through cache of the buffer column family
/// that also remembers absent keys. Only two things write that column family — checkpoints,
/// which update the cache with their writes, and snapshot installs, which clear it — so a hit is
/// always the checkpointed value. Bounded by [`BUFFER_CACHE_BYTES`]; when full, about half the
/// entries are dropped (which ones does not matter: a miss reads RocksDB). Readers other than the
/// apply task (the leader's admission check) may fill it too: a row read from RocksDB is cached
/// only if no checkpoint or clear happened since the read began (`generation`), so a read racing
/// a checkpoint can never put the older value back.
#[derive(Default)]
struct BufferCache {
    rows: HashMap<BufKey, Option<Buffered>>,
    bytes: u64,
    generation: u64,
}

fn key_cost(key: &BufKey) -> u64 {
    (key.stream.len() + key.key.len()) as u64 + 64
}

fn row_cost(key: &BufKey, row: &Option<Buffered>) -> u64 {
    key_cost(key) + row.as_ref().map_or(0, |b| b.bytes)
}

impl BufferCache {
    fn get(&self, key: &BufKey) -> Option<Option<Buffered>> {
        self.rows.get(key).cloned()
    }

    fn insert(&mut self, key: BufKey, row: Option<Buffered>) {
        let cost = row_cost(&key, &row);
        let key_cost = key_cost(&key);
        if let Some(old) = self.rows.insert(key, row) {
            self.bytes = self.bytes.saturating_sub(key_cost + old.as_ref().map_or(0, |b| b.bytes));
        }
        self.bytes += cost;
        if self.bytes > BUFFER_CACHE_BYTES {
            let mut keep = false;
            self.rows.retain(|_, _| {
                keep = !keep;
                keep
            });
            self.bytes = self.rows.iter().map(|(k, r)| row_cost(k, r)).sum();
        }
    }
}

/// A buffer row applied since the last checkpoint.
#[derive(Clone)]
struct PendingRow {
    /// `None`: deleted.
    value: Option<Buffered>,
    /// Whether RocksDB holds a row for the key (as of the last checkpoint): deleting a key that
    /// was buffered and sealed between two checkpoints writes nothing at all.
    stored: bool,
}

/// A deadline-index row changed since the last checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IndexRow {
    /// Inserted; RocksDB holds no such row (removing it again leaves nothing to write).
    Inserted,
    /// A row RocksDB may hold, removed: the checkpoint deletes it.
    Removed,
    /// A removed stored row inserted again: RocksDB holds it, so removing it once more must
    /// still delete it (a deadline can move away and back, e.g. an adaptive window's stretch).
    Restored,
}

impl IndexRow {
    fn present(self) -> bool {
        self != IndexRow::Removed
    }

    /// The row after the apply batch inserted (`present`) or removed it.
    fn then(old: Option<IndexRow>, present: bool) -> Option<IndexRow> {
        match (old, present) {
            (Some(IndexRow::Inserted), false) => None,
            (_, false) => Some(IndexRow::Removed),
            (Some(IndexRow::Removed | IndexRow::Restored), true) => Some(IndexRow::Restored),
            (None | Some(IndexRow::Inserted), true) => Some(IndexRow::Inserted),
        }
    }
}

/// State-machine effects applied since the last checkpoint (write-behind): the state every
/// reader of the shard sees, ahead of RocksDB. A checkpoint writes all of it, with the applied
/// log id, in one atomic RocksDB write; until then a crash loses it and the node re-applies the
/// entries from its (durable) Raft log, so a checkpoint is an optimisation, never a
/// correctness step. Under load this turns one write per touched key per entry into one per
/// key per checkpoint, and a key buffered and sealed between two checkpoints (most keys of
/// short windows) never reaches RocksDB.
#[derive(Default)]
struct Pending {
    buffers: HashMap<BufKey, PendingRow>,
    /// Deadline-index rows changed since the last checkpoint.
    index: BTreeMap<(Millis, BufKey), IndexRow>,
    stats: Option<ShardStats>,
    sessions: HashMap<u64, Option<Session>>,
    outbox: BTreeMap<u64, Output>,
    /// Stored outbox seqs `[from, to)` to delete.
    trims: Vec<(u64, u64)>,
    meta: BTreeMap<u8, Vec<u8>>,
    /// Dead-letter rows (`None` = delete), in order.
    dlq: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Approximate bytes held.
    bytes: u64,
    /// When the oldest effect held was staged.
    since: Option<std::time::Instant>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.since.is_none()
    }

    fn trimmed(&self, seq: u64) -> bool {
        self.trims.iter().any(|(from, to)| (*from..*to).contains(&seq))
    }
}

/// The memory in front of one shard's rows: the pending (not yet checkpointed) state, the
/// state a checkpoint is writing, and the read cache of checkpointed buffer rows, under one
/// lock so a reader never sees a row in none of those places. Readers look in that order —
/// pending, in flight, cache, RocksDB — so the newest applied value wins.
#[derive(Default)]
struct Mem {
    pending: Pending,
    /// Effects handed to a checkpoint that has not landed (see [`ShardStore::begin_checkpoint`]).
    /// The lock is not held while it is written, so readers and the apply task go on.
    in_flight: Option<InFlight>,
    cache: BufferCache,
    /// No stored deadline-index row below this deadline exists that the pending or in-flight
    /// state has not removed: scans seek here instead of walking the tombstones that sealed
    /// windows leave (RocksDB's queue anti-pattern) or rows already removed in memory. Raised
    /// by every scan (under the lock) and by staged batches whose scan proved it with their
    /// own removals (only if no checkpoint happened since the scan), lowered by checkpoints to
    /// their lowest insert, reset by snapshot installs. In memory only (0 after a restart,
    /// raised by the first scan).
    floor: Millis,
    /// Checkpoints and installs so far: what a deadline scan proved about stored rows holds
    /// only while this has not changed.
    checkpoints: u64,
    /// 1 + the highest outbox seq a checkpoint wrote (`u64::MAX` when unknown, after a
    /// restart or install): trims of seqs at or above it have nothing stored to delete.
    outbox_stored_end: u64,
    /// A snapshot is being written over the shard's rows ([`ShardStore::install_file`]):
    /// readers get [`StorageError::Installing`] rather than part of it.
    installing: bool,
}

impl Mem {
    fn new() -> Self {
        Self { outbox_stored_end: u64::MAX, ..Self::default() }
    }

    /// The in-flight effects, if a checkpoint is writing (or failed to write) some.
    fn flying(&self) -> Option<&Pending> {
        self.in_flight.as_ref().map(|f| &*f.pending)
    }

    /// A producer session as applied, if the pending or in-flight state holds it.
    fn session(&self, producer: u64) -> Option<Option<Session>> {
        self.pending.sessions.get(&producer).or_else(|| self.flying()?.sessions.get(&producer)).copied()
    }

    /// A state-machine metadata value as applied, if the pending or in-flight state holds it.
    fn meta(&self, tag: u8) -> Option<&Vec<u8>> {
        self.pending.meta.get(&tag).or_else(|| self.flying()?.meta.get(&tag))
    }

    /// Whether the pending or in-flight state deletes the stored deadline-index row `entry`.
    fn index_removed(&self, entry: &(Millis, BufKey)) -> bool {
        self.pending.index.get(entry) == Some(&IndexRow::Removed)
            || self.flying().is_some_and(|f| f.index.get(entry) == Some(&IndexRow::Removed))
    }
}

/// Effects a checkpoint is writing.
struct InFlight {
    pending: Arc<Pending>,
    /// The last write of them failed: the next checkpoint retries them before anything else.
    failed: bool,
}

/// The lock around a shard's [`Mem`], and the signal that an in-flight checkpoint landed or
/// failed (what a synchronous checkpoint, a snapshot install or backpressure waits for).
#[derive(Default)]
struct MemLock {
    mem: Mutex<Mem>,
    landed: Condvar,
}

/// A checkpoint handed its effects by [`ShardStore::begin_checkpoint`]: [`CheckpointJob::run`]
/// writes them without holding the shard's lock (on any thread) and then makes them the
/// checkpointed state. Dropping it without running leaves the effects in flight, to be
/// retried by the next checkpoint.
#[must_use = "a checkpoint job writes nothing until it runs"]
pub struct CheckpointJob {
    store: ShardStore,
    pending: Arc<Pending>,
    ran: bool,
}

impl std::fmt::Debug for CheckpointJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointJob").field("shard", &self.store.shard).finish_non_exhaustive()
    }
}

impl CheckpointJob {
    /// Writes the effects in one atomic RocksDB write and publishes the result: on success the
    /// written buffer rows move to the read cache and the in-flight layer goes away; on failure
    /// it stays (readers keep seeing it) and the next checkpoint retries it.
    pub fn run(mut self) -> Result<Checkpoint, StorageError> {
        self.ran = true;
        let written = self.store.checkpoint_batch(&self.pending).and_then(|(batch, rows)| {
            self.store.db.write(batch)?;
            Ok(rows)
        });
        let lock = &self.store.mem;
        let mut mem = lock.mem.lock().unwrap_or_else(|p| p.into_inner());
        let result = match written {
            Ok(rows) => {
                let done = mem.in_flight.take().map(|f| f.pending);
                // Only the lock's holder and this job share the effects: unwrap the last copy.
                let pending = std::mem::replace(&mut self.pending, Arc::new(Pending::default()));
                drop(done);
                let pending = Arc::try_unwrap(pending).unwrap_or_else(|shared| Pending {
                    buffers: shared.buffers.clone(),
                    index: shared.index.clone(),
                    ..Pending::default()
                });
                mem.checkpoints += 1;
                mem.cache.generation += 1;
                if let Some(((lowest, _), _)) = pending.index.iter().find(|(_, row)| row.present()) {
                    mem.floor = mem.floor.min(*lowest);
                }
                for (key, row) in pending.buffers {
                    mem.cache.insert(key, row.value);
                }
                Ok(Checkpoint { rows })
            }
            Err(e) => {
                if let Some(f) = mem.in_flight.as_mut() {
                    f.failed = true;
                }
                Err(e)
            }
        };
        lock.landed.notify_all();
        result
    }
}

impl Drop for CheckpointJob {
    fn drop(&mut self) {
        if !self.ran {
            // Never ran: let the next checkpoint retry the effects instead of waiting forever.
            let mut mem = self.store.mem();
            if let Some(f) = mem.in_flight.as_mut() {
                f.failed = true;
            }
            self.store.mem.landed.notify_all();
        }
    }
}

/// What a checkpoint wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Rows put or deleted (range deletes count once).
    pub rows: usize,
}

/// A shard's view of the node database.
#[derive(Clone)]
pub struct ShardStore {
    db: Arc<NodeDb>,
    shard: ShardId,
    /// Shared by every clone (see [`Mem`]).
    mem: Arc<MemLock>,
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStore").field("shard", &self.shard).finish_non_exhaustive()
    }
}

impl ShardStore {
    /// The rows of `shard` in `db`.
    pub fn new(db: Arc<NodeDb>, shard: ShardId) -> Self {
        Self { db, shard, mem: Arc::new(MemLock { mem: Mutex::new(Mem::new()), landed: Condvar::new() }) }
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `mem`, unless a snapshot install is under way.
    fn readable<'a>(
        &self,
        mem: std::sync::MutexGuard<'a, Mem>,
    ) -> Result<std::sync::MutexGuard<'a, Mem>, StorageError> {
        if mem.installing { Err(StorageError::Installing { shard: self.shard }) } else { Ok(mem) }
    }

    /// Waits, releasing the lock meanwhile, until no checkpoint is being written (one that
    /// failed may remain in flight).
    fn await_landed<'a>(&self, mut mem: std::sync::MutexGuard<'a, Mem>) -> std::sync::MutexGuard<'a, Mem> {
        while mem.in_flight.as_ref().is_some_and(|f| !f.failed) {
            mem = self.mem.landed.wait(mem).unwrap_or_else(|p| p.into_inner());
        }
        mem
    }

    /// The shard id.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The node database.
    pub fn db(&self) -> &Arc<NodeDb> {
        &self.db
    }

    fn range_opts(&self, lower: &[u8], upper: Vec<u8>) -> (ReadOptions, Vec<u8>) {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(upper);
        (ro, lower.to_vec())
    }

    // ---- Raft log -------------------------------------------------------------------------

    /// Writes log entries (index, bytes) without waiting for durability; `durable` is called
    /// once they are (group commit). Entries are readable when this returns.
    pub fn log_append(
        &self,
        entries: impl IntoIterator<Item = (u64, Vec<u8>)>,
        durable: FlushCallback,
    ) -> Result<(), StorageError> {
        let cf = self.db.cf(keys::CF_RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        for (index, bytes) in entries {
            batch.put_cf(cf, keys::log_key(self.shard, index), bytes);
        }
        self.db.write(batch)?;
        self.db.flusher().after_sync(durable);
        Ok(())
    }

    /// Entries with `start <= index < end`, in order, stopping early once `max_bytes` is
    /// exceeded (at least one entry is returned if any exists).
    pub fn log_range(&self, start: u64, end: u64, max_bytes: usize) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let cf = self.db.cf(keys::CF_RAFT_LOG)?;
        let (ro, from) = self.range_opts(&keys::log_key(self.shard, start), keys::log_key(self.shard, end).to_vec());
        let mut out = Vec::new();
        let mut bytes = 0;
        for item in self.db.raw().iterator_cf_opt(cf, ro, IteratorMode::From(&from, Direction::Forward)) {
            let (k, v) = item?;
            let index = keys::decode_u64_suffix(&k).ok_or_else(|| self.corrupt("log key", "short key"))?;
            bytes += v.len();
            out.push((index, v.into_vec()));
            if bytes > max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The last log entry, if any.
    pub fn log_last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let cf = self.db.cf(keys::CF_RAFT_LOG)?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(keys::shard_prefix(self.shard).to_vec());
        let end = keys::shard_end(self.shard);
        let mut it = self.db.raw().iterator_cf_opt(cf, ro, IteratorMode::From(&end, Direction::Reverse));
        match it.next() {
            Some(item) => {
                let (k, v) = item?;
                if !k.starts_with(&keys::shard_prefix(self.shard)) {
                    return Ok(None);
                }
                let index = keys::decode_u64_suffix(&k).ok_or_else(|| self.corrupt("log key", "short key"))?;
                Ok(Some((index, v.into_vec())))
            }
            None => Ok(None),
        }
    }

    /// Deletes entries with `index >= from` (a conflicting suffix), durably.
    pub fn log_truncate_from(&self, from: u64) -> Result<(), StorageError> {
        let cf = self.db.cf(keys::CF_RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, keys::log_key(self.shard, from).to_vec(), keys::shard_end(self.shard));
        self.db.write_sync(batch)
    }

    /// Records the purge marker and deletes entries with `index <= upto`, atomically.
    pub fn log_purge_upto(&self, upto: u64, purged_marker: &[u8]) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.db.cf(keys::CF_RAFT_META)?,
            keys::raft_meta_key(self.shard, RaftMetaTag::Purged),
            purged_marker,
        );
        let end = match upto.checked_add(1) {
            Some(e) => keys::log_key(self.shard, e).to_vec(),
            None => keys::shard_end(self.shard),
        };
        batch.delete_range_cf(self.db.cf(keys::CF_RAFT_LOG)?, keys::log_key(self.shard, 0).to_vec(), end);
        self.db.write_sync(batch)
    }

    /// A Raft metadata value.
    pub fn raft_meta_get(&self, tag: RaftMetaTag) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.raw().get_cf(self.db.cf(keys::CF_RAFT_META)?, keys::raft_meta_key(self.shard, tag))?)
    }

    /// Sets a Raft metadata value; `sync` makes it durable before returning (votes).
    pub fn raft_meta_put(&self, tag: RaftMetaTag, value: &[u8], sync: bool) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.db.cf(keys::CF_RAFT_META)?, keys::raft_meta_key(self.shard, tag), value);
        if sync { self.db.write_sync(batch) } else { self.db.write(batch) }
    }

    // ---- State machine --------------------------------------------------------------------

    /// A state-machine metadata value, as applied (pending values first).
    pub fn sm_meta_get(&self, tag: SmMetaTag) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(v) = self.mem().meta(tag as u8) {
            return Ok(Some(v.clone()));
        }
        self.stored_meta(tag)
    }

    /// A state-machine metadata value as of the last checkpoint.
    fn stored_meta(&self, tag: SmMetaTag) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.raw().get_cf(self.db.cf(keys::CF_SM_META)?, keys::sm_meta_key(self.shard, tag))?)
    }

    /// Starts applying one or more Raft entries.
    pub fn apply_batch(&self) -> ApplyBatch<'_> {
        ApplyBatch {
            store: self,
            buffers: HashMap::new(),
            index: BTreeMap::new(),
            stats: None,
            sessions: HashMap::new(),
            outbox: BTreeMap::new(),
            trims: Vec::new(),
            meta: BTreeMap::new(),
            dlq: Vec::new(),
            floor_seen: None,
        }
    }

    /// Whether the pending state should be checkpointed: it is older than `interval` or larger
    /// than [`PENDING_MAX_BYTES`] — and no checkpoint is being written (one that failed is due
    /// at once, to be retried).
    pub fn checkpoint_due(&self, interval: std::time::Duration) -> bool {
        let mem = self.mem();
        match &mem.in_flight {
            Some(f) => f.failed,
            None => {
                mem.pending.since.is_some_and(|t| t.elapsed() >= interval) || mem.pending.bytes >= PENDING_MAX_BYTES
            }
        }
    }

    /// Whether the last write of the in-flight checkpoint failed (the next checkpoint retries
    /// it).
    pub fn checkpoint_failed(&self) -> bool {
        self.mem().in_flight.as_ref().is_some_and(|f| f.failed)
    }

    /// Approximate bytes of applied state not yet checkpointed (pending and in flight).
    pub fn pending_bytes(&self) -> u64 {
        let mem = self.mem();
        mem.pending.bytes + mem.flying().map_or(0, |f| f.bytes)
    }

    /// Hands the pending state to a checkpoint and returns the job that writes it, to run on
    /// any thread: until it lands, readers see those effects as in flight, and applying goes
    /// on into a new pending state. A checkpoint that failed is retried first (its job is
    /// returned instead). Returns `None` when nothing is pending — or while another checkpoint
    /// is being written, unless the pending state has grown past twice [`PENDING_MAX_BYTES`],
    /// in which case this waits for it (backpressure on the apply task).
    pub fn begin_checkpoint(&self) -> Option<CheckpointJob> {
        let mut mem = self.mem();
        if mem.in_flight.as_ref().is_some_and(|f| !f.failed) {
            if mem.pending.bytes < 2 * PENDING_MAX_BYTES {
                return None;
            }
            mem = self.await_landed(mem);
        }
        self.take_checkpoint(&mut mem)
    }

    /// The job for the failed in-flight checkpoint, else one for the pending state (`None`:
    /// nothing to write). The caller made sure no checkpoint is being written.
    fn take_checkpoint(&self, mem: &mut Mem) -> Option<CheckpointJob> {
        if let Some(f) = mem.in_flight.as_mut() {
            f.failed = false;
            return Some(CheckpointJob { store: self.clone(), pending: Arc::clone(&f.pending), ran: false });
        }
        if mem.pending.is_empty() {
            return None;
        }
        let pending = Arc::new(std::mem::take(&mut mem.pending));
        // Once this lands RocksDB holds these outputs: later trims of them must delete rows.
        if let Some((&seq, _)) = pending.outbox.last_key_value() {
            mem.outbox_stored_end = seq + 1;
        }
        mem.in_flight = Some(InFlight { pending: Arc::clone(&pending), failed: false });
        Some(CheckpointJob { store: self.clone(), pending, ran: false })
    }

    /// Writes every applied effect to RocksDB before returning: waits for a checkpoint being
    /// written, retries one that failed, then writes the pending state (one atomic write each,
    /// no fsync: the log is the durable record, and the applied log id travels in the same
    /// write).
    pub fn checkpoint(&self) -> Result<Checkpoint, StorageError> {
        let mut total = Checkpoint::default();
        loop {
            let job = {
                let mut mem = self.await_landed(self.mem());
                self.take_checkpoint(&mut mem)
            };
            match job {
                Some(job) => total.rows += job.run()?.rows,
                None => return Ok(total),
            }
        }
    }

    fn checkpoint_batch(&self, p: &Pending) -> Result<(WriteBatch, usize), StorageError> {
        let db = &self.db;
        let shard = self.shard;
        let mut batch = WriteBatch::default();
        let cf = db.cf(keys::CF_BUFFER)?;
        for (key, row) in &p.buffers {
            let k = keys::buffer_key(shard, key);
            match &row.value {
                Some(b) => batch.put_cf(cf, k, encode("buffered aggregate", b)?),
                None => batch.delete_cf(cf, k),
            }
        }
        let cf = db.cf(keys::CF_DEADLINE)?;
        for ((deadline, key), row) in &p.index {
            let k = keys::deadline_key(shard, *deadline, key);
            if row.present() { batch.put_cf(cf, k, []) } else { batch.delete_cf(cf, k) }
        }
        let cf = db.cf(keys::CF_SM_META)?;
        if let Some(stats) = &p.stats {
            batch.put_cf(cf, keys::sm_meta_key(shard, SmMetaTag::Stats), encode("shard stats", stats)?);
        }
        for (tag, v) in &p.meta {
            batch.put_cf(cf, keys::sm_meta_key_raw(shard, *tag), v);
        }
        let cf = db.cf(keys::CF_SESSIONS)?;
        for (producer, s) in &p.sessions {
            let k = keys::session_key(shard, *producer);
            match s {
                Some(s) => batch.put_cf(cf, k, encode("session", s)?),
                None => batch.delete_cf(cf, k),
            }
        }
        let cf = db.cf(keys::CF_OUTBOX)?;
        for (from, to) in &p.trims {
            batch.delete_range_cf(cf, keys::outbox_key(shard, *from), keys::outbox_key(shard, *to));
        }
        for (seq, o) in &p.outbox {
            batch.put_cf(cf, keys::outbox_key(shard, *seq), encode("outbox entry", o)?);
        }
        let cf = db.cf(keys::CF_DLQ)?;
        for (k, v) in &p.dlq {
            match v {
                Some(v) => batch.put_cf(cf, k, v),
                None => batch.delete_cf(cf, k),
            }
        }
        let rows = batch.len();
        Ok((batch, rows))
    }

    /// Outbox entries with `seq >= from`, at most `limit`.
    pub fn outbox_from(&self, from: u64, limit: usize) -> Result<Vec<Output>, StorageError> {
        let mem = self.readable(self.mem())?;
        let cf = self.db.cf(keys::CF_OUTBOX)?;
        let (ro, start) = self.range_opts(&keys::outbox_key(self.shard, from), keys::shard_end(self.shard));
        let mut out = Vec::new();
        for item in self.db.raw().iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let seq = keys::decode_u64_suffix(&k).ok_or_else(|| self.corrupt("outbox key", "short key"))?;
            let flying = mem.flying();
            // An in-flight output may have landed already: it is taken from the in-flight layer.
            if flying.is_some_and(|f| f.trimmed(seq) || f.outbox.contains_key(&seq)) || mem.pending.trimmed(seq) {
                continue;
            }
            out.push(decode(self.shard, "outbox entry", &v)?);
        }
        // In-flight outputs follow the stored ones and pending outputs follow those (seqs only
        // grow).
        let flying = mem
            .flying()
            .into_iter()
            .flat_map(|f| f.outbox.range(from..))
            .filter(|(seq, _)| !mem.pending.trimmed(**seq));
        let room = limit.saturating_sub(out.len());
        out.extend(flying.chain(mem.pending.outbox.range(from..)).take(room).map(|(_, o)| o.clone()));
        Ok(out)
    }

    /// Dead letters of `sink` with `seq >= from`, at most `limit`, in seq order. (Entries that
    /// change dead letters are checkpointed at once, so RocksDB holds them all.)
    pub fn dlq_from(&self, sink: &str, from: u64, limit: usize) -> Result<Vec<DeadLetter>, StorageError> {
        let _mem = self.readable(self.mem())?;
        let cf = self.db.cf(keys::CF_DLQ)?;
        let (ro, start) = self.range_opts(&keys::dlq_key(self.shard, sink, from), keys::dlq_end(self.shard, sink));
        let mut out = Vec::new();
        for item in self.db.raw().iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward)).take(limit) {
            let (_, v) = item?;
            out.push(decode(self.shard, "dead letter", &v)?);
        }
        Ok(out)
    }

    /// Number of dead letters per sink (a scan: dead-letter queues are meant to stay small).
    pub fn dlq_counts(&self) -> Result<BTreeMap<String, u64>, StorageError> {
        let _mem = self.readable(self.mem())?;
        let cf = self.db.cf(keys::CF_DLQ)?;
        let (ro, start) = self.range_opts(&keys::shard_prefix(self.shard), keys::shard_end(self.shard));
        let mut out = BTreeMap::new();
        for item in self.db.raw().iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward)) {
            let (k, _) = item?;
            let (sink, _) = keys::decode_dlq_key(&k).ok_or_else(|| self.corrupt("dead-letter key", "undecodable"))?;
            *out.entry(sink).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Every producer session of the shard, as applied.
    pub fn sessions(&self) -> Result<Vec<(u64, Session)>, StorageError> {
        let mem = self.readable(self.mem())?;
        let cf = self.db.cf(keys::CF_SESSIONS)?;
        let (ro, start) = self.range_opts(&keys::shard_prefix(self.shard), keys::shard_end(self.shard));
        let mut all = BTreeMap::new();
        for item in self.db.raw().iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            let producer = keys::decode_u64_suffix(&k).ok_or_else(|| self.corrupt("session key", "short key"))?;
            all.insert(producer, decode_session(self.shard, &v)?);
        }
        for (producer, s) in mem.flying().into_iter().flat_map(|f| &f.sessions).chain(&mem.pending.sessions) {
            match s {
                Some(s) => all.insert(*producer, *s),
                None => all.remove(producer),
            };
        }
        Ok(all.into_iter().collect())
    }

    /// Occupancy and counters of the buffer, as applied (no scan).
    pub fn stats(&self) -> Result<ShardStats, StorageError> {
        let mem = self.mem();
        if let Some(s) = mem.pending.stats.or_else(|| mem.flying()?.stats) {
            return Ok(s);
        }
        drop(mem);
        match self.stored_meta(SmMetaTag::Stats)? {
            Some(b) => decode(self.shard, "shard stats", &b),
            None => Ok(ShardStats::default()),
        }
    }

    /// A consistent view of the shard's state-machine rows as applied (checkpoints first), to
    /// send as a snapshot chunk by chunk ([`crate::transfer::StateView`]).
    pub fn open_view(&self) -> Result<crate::transfer::StateView, StorageError> {
        self.checkpoint()?;
        crate::transfer::StateView::open(Arc::clone(&self.db), self.shard)
    }

    /// Replaces every state-machine row of the shard with those of `file` (a snapshot received
    /// from a peer), durably; pending effects are dropped. A durable marker naming the file is
    /// written first and removed by the last write, so a crash in between is finished by
    /// [`ShardStore::recover_install`] at the next start. Memory stays bounded whatever the
    /// file's size: rows go to RocksDB in writes of about [`INSTALL_WRITE_BYTES`]. Readers of
    /// the shard get [`StorageError::Installing`] meanwhile. The file is removed once installed.
    ///
    /// If the install fails part way, the file stays (its marker names it) and readers keep
    /// getting [`StorageError::Installing`]: the rows are incomplete until a restart finishes
    /// the install.
    pub fn install_file(&self, file: crate::transfer::SnapshotFile) -> Result<(), StorageError> {
        self.raft_meta_put(RaftMetaTag::Installing, file.name().as_bytes(), true)?;
        if let Err(e) = self.install_from(file.path()) {
            file.keep();
            return Err(e);
        }
        drop(file);
        Ok(())
    }

    /// Finishes a snapshot install a restart interrupted (see [`ShardStore::install_file`]).
    /// Run before the shard's state machine is opened (opening the database already removed
    /// the snapshot files no marker names). Fails, leaving the marker in place, if the file is
    /// gone or damaged: the shard's rows are then incomplete and the replica must be rebuilt
    /// from a healthy one (docs/operations.md).
    pub fn recover_install(&self) -> Result<bool, StorageError> {
        let marker = self.raft_meta_get(RaftMetaTag::Installing)?;
        let needed = marker.as_deref().map(String::from_utf8_lossy).map(|n| n.into_owned());
        let dir = self.db.snapshot_dir();
        let Some(name) = needed else { return Ok(false) };
        let path = dir.join(&name);
        if name.contains(['/', '\\']) || !path.is_file() {
            return Err(self.corrupt(
                "snapshot install",
                &format!(
                    "a restart interrupted the install of snapshot file {} and the file is gone: this replica's \
                     state is incomplete; rebuild it from a healthy replica (docs/operations.md)",
                    path.display()
                ),
            ));
        }
        tracing::warn!(shard = self.shard, file = %path.display(), "finishing a snapshot install a restart interrupted");
        self.install_from(&path).map_err(|e| match e {
            // The file's contents: the replica cannot be finished from it.
            StorageError::Corrupt { .. } => self.corrupt(
                "snapshot install",
                &format!(
                    "a restart interrupted the install of snapshot file {} and the file is damaged ({e}): this \
                     replica's state is incomplete; rebuild it from a healthy replica (docs/operations.md)",
                    path.display()
                ),
            ),
            // Reading the file or writing RocksDB (a full disk, an I/O error): the marker stays,
            // so the next start tries again.
            other => other,
        })?;
        let _ = std::fs::remove_file(&path);
        Ok(true)
    }

    /// Writes the rows of the snapshot file at `path` over the shard's, in writes of about
    /// [`INSTALL_WRITE_BYTES`]; the last, synced, removes the install marker. Readers get
    /// [`StorageError::Installing`] until it is done; pending effects are dropped.
    fn install_from(&self, path: &std::path::Path) -> Result<(), StorageError> {
        // Counters only grow, so a read or scan that began before the install proves nothing.
        let reset = |mem: &mut Mem, installing: bool| {
            let (checkpoints, generation) = (mem.checkpoints + 1, mem.cache.generation + 1);
            *mem = Mem { checkpoints, installing, ..Mem::new() };
            mem.cache.generation = generation;
        };
        {
            // A checkpoint landing during the install would bring back what it replaces.
            let mut mem = self.await_landed(self.mem());
            reset(&mut mem, true);
        }
        let mut cfs = Vec::with_capacity(keys::SM_CFS.len());
        for name in keys::SM_CFS {
            cfs.push(self.db.cf(name)?);
        }
        let mut batch = WriteBatch::default();
        for cf in &cfs {
            batch.delete_range_cf(*cf, keys::shard_prefix(self.shard).to_vec(), keys::shard_end(self.shard));
        }
        crate::transfer::read_rows(self.shard, path, |cf_index, suffix, value| {
            let cf =
                cfs.get(cf_index as usize).ok_or_else(|| self.corrupt("state snapshot", "unknown column family"))?;
            let mut key = keys::shard_prefix(self.shard).to_vec();
            key.extend_from_slice(suffix);
            batch.put_cf(*cf, key, value);
            if batch.size_in_bytes() >= INSTALL_WRITE_BYTES {
                self.db.write(std::mem::take(&mut batch))?;
            }
            Ok(())
        })?;
        batch.delete_cf(self.db.cf(keys::CF_RAFT_META)?, keys::raft_meta_key(self.shard, RaftMetaTag::Installing));
        self.db.write_sync(batch)?;
        reset(&mut self.await_landed(self.mem()), false);
        Ok(())
    }

    fn corrupt(&self, what: &'static str, detail: &str) -> StorageError {
        StorageError::Corrupt { shard: self.shard, what, detail: detail.to_owned() }
    }
}

/// The effects of one or more Raft entries, staged or committed atomically. Reads see earlier
/// writes of the same batch, then the pending state, then RocksDB.
pub struct ApplyBatch<'a> {
    store: &'a ShardStore,
    /// Buffer overlay: rows this batch wrote, and rows it read from the cache or RocksDB.
    buffers: HashMap<BufKey, BatchRow>,
    /// Deadline-index overlay: `true` = inserted, `false` = removed in this batch.
    index: BTreeMap<(Millis, BufKey), bool>,
    stats: Option<ShardStats>,
    /// Session overlay (`None` = deleted).
    sessions: HashMap<u64, Option<Session>>,
    outbox: BTreeMap<u64, Output>,
    /// Outbox seqs `[from, to)` deleted, in order.
    trims: Vec<(u64, u64)>,
    meta: BTreeMap<u8, Vec<u8>>,
    dlq: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// What a deadline scan of the database proved — no stored row below this deadline — and
    /// the checkpoint count it was proved at.
    floor_seen: Option<(Millis, u64)>,
}

impl std::fmt::Debug for ApplyBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyBatch")
            .field("shard", &self.store.shard)
            .field("buffers", &self.buffers.len())
            .field("index", &self.index.len())
            .field("outbox", &self.outbox.len())
            .finish()
    }
}

/// A buffer row as an [`ApplyBatch`] sees it.
struct BatchRow {
    /// `None`: absent or deleted.
    value: Option<Buffered>,
    /// Written (put or deleted) by this batch; rows only read are not staged.
    written: bool,
    /// Whether RocksDB held a row, when this batch read the key from the cache or RocksDB
    /// (`None`: read from the pending state, which knows, or never read).
    stored: Option<bool>,
}

/// What staging a batch asks of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Staged {
    /// The batch changed something readers take from RocksDB only (dead letters, membership,
    /// the preferred leader): checkpoint now.
    pub urgent: bool,
}

impl ApplyBatch<'_> {
    /// Adds an output to the outbox at its seq.
    pub fn outbox_put(&mut self, output: &Output) -> Result<(), StorageError> {
        self.outbox.insert(output.seq, output.clone());
        Ok(())
    }

    /// Deletes outbox entries with `from <= seq < to`.
    pub fn outbox_trim(&mut self, from: u64, to: u64) {
        if from < to {
            self.outbox.retain(|seq, _| !(from..to).contains(seq));
            push_range(&mut self.trims, from, to);
        }
    }

    /// A producer session, as of this batch's writes.
    pub fn session_get(&mut self, producer: u64) -> Result<Option<Session>, StorageError> {
        if let Some(s) = self.sessions.get(&producer) {
            return Ok(*s);
        }
        if let Some(s) = self.store.mem().session(producer) {
            return Ok(s);
        }
        let db = &self.store.db;
        match db.raw().get_pinned_cf(db.cf(keys::CF_SESSIONS)?, keys::session_key(self.store.shard, producer))? {
            Some(bytes) => Ok(Some(decode_session(self.store.shard, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Sets a producer session.
    pub fn session_put(&mut self, producer: u64, session: &Session) -> Result<(), StorageError> {
        self.sessions.insert(producer, Some(*session));
        Ok(())
    }

    /// Every producer session as of this batch's writes, by producer id.
    pub fn sessions_all(&self) -> Result<Vec<(u64, Session)>, StorageError> {
        let mut all: BTreeMap<u64, Session> = self.store.sessions()?.into_iter().collect();
        for (producer, s) in &self.sessions {
            match s {
                Some(s) => all.insert(*producer, *s),
                None => all.remove(producer),
            };
        }
        Ok(all.into_iter().collect())
    }

    /// Deletes a producer session.
    pub fn session_delete(&mut self, producer: u64) {
        self.sessions.insert(producer, None);
    }

    /// Stores a dead letter under its sink and seq.
    pub fn dlq_put(&mut self, letter: &DeadLetter) -> Result<(), StorageError> {
        let v = encode("dead letter", letter)?;
        self.dlq.push((keys::dlq_key(self.store.shard, &letter.sink, letter.output.seq), Some(v)));
        Ok(())
    }

    /// Deletes a dead letter (nothing happens when it does not exist).
    pub fn dlq_delete(&mut self, sink: &str, seq: u64) {
        self.dlq.push((keys::dlq_key(self.store.shard, sink, seq), None));
    }

    /// Sets a state-machine metadata value.
    pub fn sm_meta_put(&mut self, tag: SmMetaTag, value: Vec<u8>) {
        self.meta.insert(tag as u8, value);
    }

    /// Makes the batch the applied state: readers of the shard see it at once; RocksDB gets it
    /// at the next [`ShardStore::checkpoint`].
    pub fn stage(self) -> Result<Staged, StorageError> {
        let urgent = !self.dlq.is_empty()
            || self.meta.keys().any(|t| ![SmMetaTag::Applied as u8, SmMetaTag::Outbox as u8].contains(t));
        let mut mem = self.store.mem();
        let mem = &mut *mem;
        let p = &mut mem.pending;
        for (key, row) in self.buffers {
            if !row.written {
                continue;
            }
            let value = row.value;
            let added = row_cost(&key, &value);
            match p.buffers.entry(key) {
                Entry::Occupied(mut e) => {
                    p.bytes = (p.bytes + added).saturating_sub(row_cost(e.key(), &e.get().value));
                    if value.is_none() && !e.get().stored {
                        e.remove();
                    } else {
                        e.get_mut().value = value;
                    }
                }
                Entry::Vacant(e) => {
                    // Unknown means stored: deleting writes a tombstone that may be needless.
                    let stored = row.stored.unwrap_or(true);
                    if value.is_some() || stored {
                        p.bytes += added;
                        e.insert(PendingRow { value, stored });
                    }
                }
            }
        }
        for (entry, present) in self.index {
            match IndexRow::then(p.index.get(&entry).copied(), present) {
                None => {
                    p.index.remove(&entry);
                }
                Some(row) => {
                    p.bytes += (entry.1.stream.len() + entry.1.key.len()) as u64 + 32;
                    p.index.insert(entry, row);
                }
            }
        }
        if self.stats.is_some() {
            p.stats = self.stats;
        }
        for (producer, s) in self.sessions {
            p.bytes += 32;
            p.sessions.insert(producer, s);
        }
        for (from, to) in self.trims {
            p.outbox.retain(|seq, _| !(from..to).contains(seq));
            let to = to.min(mem.outbox_stored_end);
            if from < to {
                push_range(&mut p.trims, from, to);
            }
        }
        for (seq, o) in self.outbox {
            p.bytes += 128 + (o.key.len() + o.stream.len()) as u64;
            p.outbox.insert(seq, o);
        }
        p.meta.extend(self.meta);
        p.dlq.extend(self.dlq);
        p.since.get_or_insert_with(std::time::Instant::now);
        if let Some((seen, at)) = self.floor_seen
            && at == mem.checkpoints
        {
            mem.floor = mem.floor.max(seen);
        }
        Ok(Staged { urgent })
    }

    /// Stages the batch and checkpoints at once (write-through).
    pub fn commit(self) -> Result<(), StorageError> {
        let store = self.store;
        self.stage()?;
        store.checkpoint().map(|_| ())
    }
}

/// Appends `[from, to)` to `ranges`, merging it with the last range when they touch (trims
/// follow each other).
fn push_range(ranges: &mut Vec<(u64, u64)>, from: u64, to: u64) {
    match ranges.last_mut() {
        Some(last) if last.1 == from => last.1 = to,
        _ => ranges.push((from, to)),
    }
}

impl ApplyBatch<'_> {
    /// Remembers a row read from the cache or RocksDB (and whether RocksDB holds it).
    fn remember_read(&mut self, key: &BufKey, value: &Option<Buffered>) {
        let row = BatchRow { value: value.clone(), written: false, stored: Some(value.is_some()) };
        self.buffers.insert(key.clone(), row);
    }

    /// Sets a buffer row in this batch (`None`: deleted), cloning the key only for a key the
    /// batch has not seen.
    fn write(&mut self, key: &BufKey, value: Option<Buffered>) {
        match self.buffers.get_mut(key) {
            Some(row) => {
                row.value = value;
                row.written = true;
            }
            None => {
                self.buffers.insert(key.clone(), BatchRow { value, written: true, stored: None });
            }
        }
    }
}

impl BufferStore for ApplyBatch<'_> {
    type Error = StorageError;

    fn get(&mut self, key: &BufKey) -> Result<Option<Buffered>, StorageError> {
        if let Some(row) = self.buffers.get(key) {
            return Ok(row.value.clone());
        }
        let generation = {
            let mem = self.store.mem();
            if let Some(row) = mem.pending.buffers.get(key) {
                return Ok(row.value.clone());
            }
            // What an in-flight checkpoint writes is what RocksDB will hold.
            if let Some(row) = mem.flying().and_then(|f| f.buffers.get(key)) {
                let value = row.value.clone();
                drop(mem);
                self.remember_read(key, &value);
                return Ok(value);
            }
            if let Some(value) = mem.cache.get(key) {
                self.remember_read(key, &value);
                return Ok(value);
            }
            mem.cache.generation
        };
        let db = &self.store.db;
        let value = match db.raw().get_pinned_cf(db.cf(keys::CF_BUFFER)?, keys::buffer_key(self.store.shard, key))? {
            Some(bytes) => Some(decode(self.store.shard, "buffered aggregate", &bytes)?),
            None => None,
        };
        self.remember_read(key, &value);
        let mut mem = self.store.mem();
        if mem.cache.generation == generation {
            mem.cache.insert(key.clone(), value.clone());
        }
        Ok(value)
    }

    fn put(&mut self, key: &BufKey, value: Buffered) -> Result<(), StorageError> {
        self.write(key, Some(value));
        Ok(())
    }

    fn delete(&mut self, key: &BufKey) -> Result<(), StorageError> {
        self.write(key, None);
        Ok(())
    }

    fn index_insert(&mut self, deadline: Millis, key: &BufKey) -> Result<(), StorageError> {
        self.index.insert((deadline, key.clone()), true);
        Ok(())
    }

    fn index_remove(&mut self, deadline: Millis, key: &BufKey) -> Result<(), StorageError> {
        self.index.insert((deadline, key.clone()), false);
        Ok(())
    }

    fn due(&mut self, upto: Millis, limit: usize) -> Result<Vec<(Millis, BufKey)>, StorageError> {
        let shard = self.store.shard;
        let db = &self.store.db;
        let mut mem = self.store.mem();
        let mut all = BTreeSet::new();
        let mut proved = None;
        if limit > 0 {
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(keys::deadline_upper_bound(shard, upto));
            let start = keys::deadline_from(shard, mem.floor);
            let (mut first, mut first_live) = (None, None);
            for item in
                db.raw().iterator_cf_opt(db.cf(keys::CF_DEADLINE)?, ro, IteratorMode::From(&start, Direction::Forward))
            {
                let (k, _) = item?;
                let (_, deadline, key) = keys::decode_deadline_key(&k).ok_or_else(|| StorageError::Corrupt {
                    shard,
                    what: "deadline key",
                    detail: "undecodable".into(),
                })?;
                first.get_or_insert(deadline);
                let entry = (deadline, key);
                let gone = mem.index_removed(&entry);
                if !gone {
                    first_live.get_or_insert(deadline);
                }
                if gone || self.index.get(&entry) == Some(&false) {
                    continue;
                }
                all.insert(entry);
                if all.len() >= limit {
                    break;
                }
            }
            // Nothing stored below the first row seen (or up to `upto` when none was).
            proved = Some(first.unwrap_or_else(|| upto.saturating_add(1)));
            // Stored rows the pending or in-flight state removed stay removed until a checkpoint
            // deletes them (inserting one again goes through those states), so later scans may
            // seek past them at once — the sealer's, every tick, would otherwise walk every key
            // sealed since the last checkpoint.
            mem.floor = mem.floor.max(first_live.unwrap_or_else(|| upto.saturating_add(1)));
            // Each source contributes its `limit` first live entries, so the union's first
            // `limit` are the same however the state is split between checkpoints.
            let live = |e: &(Millis, BufKey)| self.index.get(e) != Some(&false);
            let flying = mem
                .flying()
                .into_iter()
                .flat_map(|f| f.index.iter().take_while(|((d, _), _)| *d <= upto))
                .filter(|(e, row)| row.present() && mem.pending.index.get(*e) != Some(&IndexRow::Removed) && live(e))
                .take(limit);
            let staged = mem
                .pending
                .index
                .iter()
                .take_while(|((d, _), _)| *d <= upto)
                .filter(|(e, row)| row.present() && live(e))
                .take(limit);
            all.extend(flying.chain(staged).map(|(e, _)| e.clone()));
        }
        all.extend(self.index.iter().filter(|((d, _), present)| **present && *d <= upto).map(|(e, _)| e.clone()));
        let checkpoints = mem.checkpoints;
        drop(mem);
        if let Some(proved) = proved {
            self.floor_seen = Some(match self.floor_seen {
                Some((f, at)) if at == checkpoints => (f.max(proved), at),
                _ => (proved, checkpoints),
            });
        }
        Ok(all.into_iter().take(limit).collect())
    }

    fn stats(&mut self) -> Result<ShardStats, StorageError> {
        match self.stats {
            Some(s) => Ok(s),
            None => self.store.stats(),
        }
    }

    fn set_stats(&mut self, stats: &ShardStats) -> Result<(), StorageError> {
        self.stats = Some(*stats);
        Ok(())
    }
}
