//! One shard's rows in the node database: its Raft log and metadata, and its state machine
//! (buffer, deadline index, outbox, producer sessions, metadata).
//!
//! The Raft crate stores log entries and Raft metadata as opaque bytes; this module does not
//! know openraft. State-machine writes go through an [`ApplyBatch`], which gives the core's
//! apply functions read-your-writes semantics and commits one Raft entry's effects (including
//! the applied log id) in one atomic RocksDB write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use coalesce_core::buffer::{BufKey, BufferStore, Buffered, ShardStats};
use coalesce_core::hash::ShardId;
use coalesce_core::output::{DeadLetter, Output};
use coalesce_core::session::Session;
use coalesce_core::time::Millis;
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

/// Accounted bytes ([`Buffered::bytes`]) of buffered aggregates one shard keeps in memory.
pub const BUFFER_CACHE_BYTES: u64 = 16 << 20;

/// The shard's committed buffer rows kept in memory, so applying an entry does not read (and
/// decode) RocksDB for every key it touches: a read-through cache of the buffer column family
/// that also remembers absent keys. Only two things write that column family — committed apply
/// batches, which update the cache with their writes, and snapshot installs, which clear it —
/// so a hit is always the committed value. Bounded by [`BUFFER_CACHE_BYTES`]; when full, about
/// half the entries are dropped (which ones does not matter: a miss reads RocksDB). Readers
/// other than the apply task (the leader's admission check) may fill it too: a row read from
/// RocksDB is cached only if no commit or clear happened since the read began (`generation`),
/// so a read racing a commit can never put the older value back.
#[derive(Default)]
struct BufferCache {
    rows: HashMap<BufKey, Option<Buffered>>,
    bytes: u64,
    generation: u64,
}

impl BufferCache {
    fn cost(key: &BufKey, row: &Option<Buffered>) -> u64 {
        (key.stream.len() + key.key.len()) as u64 + row.as_ref().map_or(0, |b| b.bytes) + 64
    }

    fn get(&self, key: &BufKey) -> Option<Option<Buffered>> {
        self.rows.get(key).cloned()
    }

    fn insert(&mut self, key: BufKey, row: Option<Buffered>) {
        let cost = Self::cost(&key, &row);
        if let Some(old) = self.rows.insert(key.clone(), row) {
            self.bytes = self.bytes.saturating_sub(Self::cost(&key, &old));
        }
        self.bytes += cost;
        if self.bytes > BUFFER_CACHE_BYTES {
            let mut keep = false;
            self.rows.retain(|_, _| {
                keep = !keep;
                keep
            });
            self.bytes = self.rows.iter().map(|(k, r)| Self::cost(k, r)).sum();
        }
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.bytes = 0;
        self.generation += 1;
    }
}

/// A shard's view of the node database.
#[derive(Clone)]
pub struct ShardStore {
    db: Arc<NodeDb>,
    shard: ShardId,
    /// Shared by every clone (see [`BufferCache`]).
    cache: Arc<Mutex<BufferCache>>,
    /// No deadline-index row below this deadline exists: scans seek here instead of walking
    /// the tombstones that sealed windows leave (RocksDB's queue anti-pattern). Raised only by
    /// committed apply batches (which are sequential), lowered by their inserts before the
    /// write is visible to anyone who checks the state version; reset by snapshot installs.
    /// Shared by every clone; in memory only (0 after a restart, raised by the first seal).
    deadline_floor: Arc<AtomicU64>,
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStore").field("shard", &self.shard).finish_non_exhaustive()
    }
}

impl ShardStore {
    /// The rows of `shard` in `db`.
    pub fn new(db: Arc<NodeDb>, shard: ShardId) -> Self {
        Self { db, shard, deadline_floor: Arc::default(), cache: Arc::default() }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BufferCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
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

    /// A state-machine metadata value.
    pub fn sm_meta_get(&self, tag: SmMetaTag) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.raw().get_cf(self.db.cf(keys::CF_SM_META)?, keys::sm_meta_key(self.shard, tag))?)
    }

    /// Starts applying one Raft entry.
    pub fn apply_batch(&self) -> ApplyBatch<'_> {
        ApplyBatch {
            store: self,
            buffers: HashMap::new(),
            index: BTreeMap::new(),
            stats: None,
            sessions: HashMap::new(),
            rows: Vec::new(),
            floor_seen: None,
        }
    }

    /// Outbox entries with `seq >= from`, at most `limit`.
    pub fn outbox_from(&self, from: u64, limit: usize) -> Result<Vec<Output>, StorageError> {
        let cf = self.db.cf(keys::CF_OUTBOX)?;
        let (ro, start) = self.range_opts(&keys::outbox_key(self.shard, from), keys::shard_end(self.shard));
        let mut out = Vec::new();
        for item in self.db.raw().iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward)).take(limit) {
            let (_, v) = item?;
            out.push(decode(self.shard, "outbox entry", &v)?);
        }
        Ok(out)
    }

    /// Dead letters of `sink` with `seq >= from`, at most `limit`, in seq order.
    pub fn dlq_from(&self, sink: &str, from: u64, limit: usize) -> Result<Vec<DeadLetter>, StorageError> {
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

    /// Every producer session of the shard.
    pub fn sessions(&self) -> Result<Vec<(u64, Session)>, StorageError> {
        let cf = self.db.cf(keys::CF_SESSIONS)?;
        let (ro, start) = self.range_opts(&keys::shard_prefix(self.shard), keys::shard_end(self.shard));
        let mut out = Vec::new();
        for item in self.db.raw().iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            let producer = keys::decode_u64_suffix(&k).ok_or_else(|| self.corrupt("session key", "short key"))?;
            out.push((producer, decode(self.shard, "session", &v)?));
        }
        Ok(out)
    }

    /// Number of buffered keys (from the stats row; no scan).
    pub fn stats(&self) -> Result<ShardStats, StorageError> {
        match self.sm_meta_get(SmMetaTag::Stats)? {
            Some(b) => decode(self.shard, "shard stats", &b),
            None => Ok(ShardStats::default()),
        }
    }

    /// Every state-machine row of the shard, read from one consistent RocksDB snapshot.
    pub fn export_state(&self) -> Result<StateExport, StorageError> {
        let snap = self.db.raw().snapshot();
        let mut rows: Vec<(u8, Vec<u8>, Vec<u8>)> = Vec::new();
        for (i, name) in keys::SM_CFS.iter().enumerate() {
            let cf = self.db.cf(name)?;
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(keys::shard_end(self.shard));
            let start = keys::shard_prefix(self.shard);
            for item in snap.iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward)) {
                let (k, v) = item?;
                rows.push((i as u8, k[4..].to_vec(), v.into_vec()));
            }
        }
        Ok(StateExport { rows })
    }

    /// Replaces every state-machine row of the shard with `data` (an encoded [`StateExport`],
    /// possibly from another node), atomically and durably.
    pub fn import_state(&self, data: &[u8]) -> Result<(), StorageError> {
        let rows = StateExport::decode(self.shard, data)?.rows;
        let mut batch = WriteBatch::default();
        for name in keys::SM_CFS {
            batch.delete_range_cf(
                self.db.cf(name)?,
                keys::shard_prefix(self.shard).to_vec(),
                keys::shard_end(self.shard),
            );
        }
        for (cf_index, suffix, value) in rows {
            let name = keys::SM_CFS
                .get(cf_index as usize)
                .ok_or_else(|| self.corrupt("state snapshot", "unknown column family"))?;
            let mut key = keys::shard_prefix(self.shard).to_vec();
            key.extend_from_slice(&suffix);
            batch.put_cf(self.db.cf(name)?, key, value);
        }
        self.db.write_sync(batch)?;
        self.deadline_floor.store(0, Ordering::Release);
        self.cache().clear();
        Ok(())
    }

    fn corrupt(&self, what: &'static str, detail: &str) -> StorageError {
        StorageError::Corrupt { shard: self.shard, what, detail: detail.to_owned() }
    }
}

/// A shard's state-machine rows: `(index in SM_CFS, key without the shard prefix, value)`.
/// It is what a Raft snapshot of the shard carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateExport {
    rows: Vec<(u8, Vec<u8>, Vec<u8>)>,
}

impl StateExport {
    /// The bytes shipped to another node.
    pub fn encode(&self) -> Result<Vec<u8>, StorageError> {
        encode("state snapshot", &self.rows)
    }

    /// Parses bytes from [`StateExport::encode`].
    pub fn decode(shard: ShardId, data: &[u8]) -> Result<Self, StorageError> {
        Ok(Self { rows: decode(shard, "state snapshot", data)? })
    }

    /// A state-machine metadata value in the export (read from the same consistent view).
    pub fn sm_meta(&self, tag: SmMetaTag) -> Option<&[u8]> {
        let cf = keys::SM_CFS.iter().position(|c| *c == keys::CF_SM_META)? as u8;
        self.rows.iter().find(|(c, k, _)| *c == cf && k.as_slice() == [tag as u8]).map(|(_, _, v)| v.as_slice())
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Column families an [`ApplyBatch`] writes besides the buffer and index.
#[derive(Debug, Clone, Copy)]
enum Row {
    Outbox,
    Session,
    SmMeta,
    Dlq,
    /// Outbox seqs `[from, to)` deleted (key = from, value = to), in order with outbox puts so
    /// a trim after a put in the same batch deletes it.
    OutboxTrim,
}

/// One Raft entry's state-machine effects, committed atomically. Reads see earlier writes of
/// the same batch.
pub struct ApplyBatch<'a> {
    store: &'a ShardStore,
    /// Buffer overlay: `None` = deleted in this batch.
    buffers: HashMap<BufKey, Option<Buffered>>,
    /// Deadline-index overlay: `true` = inserted, `false` = removed in this batch.
    index: BTreeMap<(Millis, BufKey), bool>,
    stats: Option<ShardStats>,
    /// Session overlay (`None` = deleted), so later reads in the batch see earlier writes.
    sessions: HashMap<u64, Option<Session>>,
    /// Other writes, in order.
    rows: Vec<(Row, Vec<u8>, Option<Vec<u8>>)>,
    /// What deadline scans of the database proved: no stored row below this deadline.
    floor_seen: Option<Millis>,
}

impl std::fmt::Debug for ApplyBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyBatch")
            .field("shard", &self.store.shard)
            .field("buffers", &self.buffers.len())
            .field("index", &self.index.len())
            .field("rows", &self.rows.len())
            .finish()
    }
}

impl ApplyBatch<'_> {
    /// Adds an output to the outbox at its seq.
    pub fn outbox_put(&mut self, output: &Output) -> Result<(), StorageError> {
        let v = encode("outbox entry", output)?;
        self.rows.push((Row::Outbox, keys::outbox_key(self.store.shard, output.seq).to_vec(), Some(v)));
        Ok(())
    }

    /// Deletes outbox entries with `from <= seq < to`.
    pub fn outbox_trim(&mut self, from: u64, to: u64) {
        if from < to {
            let (from, to) = (keys::outbox_key(self.store.shard, from), keys::outbox_key(self.store.shard, to));
            self.rows.push((Row::OutboxTrim, from.to_vec(), Some(to.to_vec())));
        }
    }

    /// A producer session, as of this batch's writes.
    pub fn session_get(&mut self, producer: u64) -> Result<Option<Session>, StorageError> {
        if let Some(s) = self.sessions.get(&producer) {
            return Ok(*s);
        }
        let db = &self.store.db;
        match db.raw().get_pinned_cf(db.cf(keys::CF_SESSIONS)?, keys::session_key(self.store.shard, producer))? {
            Some(bytes) => Ok(Some(decode(self.store.shard, "session", &bytes)?)),
            None => Ok(None),
        }
    }

    /// Sets a producer session.
    pub fn session_put(&mut self, producer: u64, session: &Session) -> Result<(), StorageError> {
        self.sessions.insert(producer, Some(*session));
        let v = encode("session", session)?;
        self.rows.push((Row::Session, keys::session_key(self.store.shard, producer).to_vec(), Some(v)));
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
        self.rows.push((Row::Session, keys::session_key(self.store.shard, producer).to_vec(), None));
    }

    /// Stores a dead letter under its sink and seq.
    pub fn dlq_put(&mut self, letter: &DeadLetter) -> Result<(), StorageError> {
        let v = encode("dead letter", letter)?;
        let k = keys::dlq_key(self.store.shard, &letter.sink, letter.output.seq);
        self.rows.push((Row::Dlq, k, Some(v)));
        Ok(())
    }

    /// Deletes a dead letter (nothing happens when it does not exist).
    pub fn dlq_delete(&mut self, sink: &str, seq: u64) {
        self.rows.push((Row::Dlq, keys::dlq_key(self.store.shard, sink, seq), None));
    }

    /// Sets a state-machine metadata value.
    pub fn sm_meta_put(&mut self, tag: SmMetaTag, value: Vec<u8>) {
        self.rows.push((Row::SmMeta, keys::sm_meta_key(self.store.shard, tag).to_vec(), Some(value)));
    }

    /// Writes everything, atomically (no fsync: the log is the durable record; a lost apply is
    /// redone from the log on restart because the applied log id is in the same write).
    pub fn commit(self) -> Result<(), StorageError> {
        let db = &self.store.db;
        let shard = self.store.shard;
        let mut batch = WriteBatch::default();
        let cf_buffer = db.cf(keys::CF_BUFFER)?;
        for (key, value) in &self.buffers {
            let k = keys::buffer_key(shard, key);
            match value {
                Some(b) => batch.put_cf(cf_buffer, k, encode("buffered aggregate", b)?),
                None => batch.delete_cf(cf_buffer, k),
            }
        }
        let cf_deadline = db.cf(keys::CF_DEADLINE)?;
        for ((deadline, key), present) in &self.index {
            let k = keys::deadline_key(shard, *deadline, key);
            if *present { batch.put_cf(cf_deadline, k, []) } else { batch.delete_cf(cf_deadline, k) }
        }
        if let Some(stats) = &self.stats {
            batch.put_cf(
                db.cf(keys::CF_SM_META)?,
                keys::sm_meta_key(shard, SmMetaTag::Stats),
                encode("shard stats", stats)?,
            );
        }
        for (row, key, value) in self.rows {
            let cf = db.cf(match row {
                Row::Outbox | Row::OutboxTrim => keys::CF_OUTBOX,
                Row::Session => keys::CF_SESSIONS,
                Row::SmMeta => keys::CF_SM_META,
                Row::Dlq => keys::CF_DLQ,
            })?;
            match (row, value) {
                (Row::OutboxTrim, Some(to)) => batch.delete_range_cf(cf, key, to),
                (_, Some(v)) => batch.put_cf(cf, key, v),
                (_, None) => batch.delete_cf(cf, key),
            }
        }
        db.write(batch)?;
        let mut cache = self.store.cache();
        cache.generation += 1;
        for (key, row) in self.buffers {
            cache.insert(key, row);
        }
        drop(cache);
        // The rows below `floor_seen` that this batch did not insert are gone.
        let inserted = self.index.iter().find(|(_, present)| **present).map(|((d, _), _)| *d);
        let floor = &self.store.deadline_floor;
        let mut next = floor.load(Ordering::Acquire);
        if let Some(seen) = self.floor_seen {
            next = next.max(seen);
        }
        if let Some(d) = inserted {
            next = next.min(d);
        }
        floor.store(next, Ordering::Release);
        Ok(())
    }
}

impl BufferStore for ApplyBatch<'_> {
    type Error = StorageError;

    fn get(&mut self, key: &BufKey) -> Result<Option<Buffered>, StorageError> {
        if let Some(v) = self.buffers.get(key) {
            return Ok(v.clone());
        }
        let generation = {
            let cache = self.store.cache();
            if let Some(row) = cache.get(key) {
                return Ok(row);
            }
            cache.generation
        };
        let db = &self.store.db;
        let row = match db.raw().get_pinned_cf(db.cf(keys::CF_BUFFER)?, keys::buffer_key(self.store.shard, key))? {
            Some(bytes) => Some(decode(self.store.shard, "buffered aggregate", &bytes)?),
            None => None,
        };
        let mut cache = self.store.cache();
        if cache.generation == generation {
            cache.insert(key.clone(), row.clone());
        }
        Ok(row)
    }

    fn put(&mut self, key: &BufKey, value: &Buffered) -> Result<(), StorageError> {
        self.buffers.insert(key.clone(), Some(value.clone()));
        Ok(())
    }

    fn delete(&mut self, key: &BufKey) -> Result<(), StorageError> {
        self.buffers.insert(key.clone(), None);
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
        let mut from_db = Vec::new();
        if limit > 0 {
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(keys::deadline_upper_bound(shard, upto));
            let floor = self.store.deadline_floor.load(Ordering::Acquire);
            let start = keys::deadline_from(shard, floor);
            let mut first = None;
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
                if self.index.get(&entry) == Some(&false) {
                    continue;
                }
                from_db.push(entry);
                if from_db.len() >= limit {
                    break;
                }
            }
            // Nothing stored below the first row seen (or up to `upto` when none was).
            let proved = first.unwrap_or_else(|| upto.saturating_add(1));
            self.floor_seen = Some(self.floor_seen.map_or(proved, |f| f.max(proved)));
        }
        let mut all: BTreeSet<(Millis, BufKey)> = from_db.into_iter().collect();
        all.extend(self.index.iter().filter(|((d, _), present)| **present && *d <= upto).map(|(e, _)| e.clone()));
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
