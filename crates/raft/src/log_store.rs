//! The Raft log of one shard group in the node's RocksDB.
//!
//! Appends are written at once (readable immediately by every reader) and made durable by the
//! node's group-commit flusher, which calls openraft's `IOFlushed` when the shared WAL fsync
//! covering them completes — many groups, one fsync. Votes and purge markers are synced
//! before returning; the committed log id is written without a sync (it is a hint that saves
//! re-applying after a restart, never needed for safety).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use coalesce_storage::ShardStore;
use coalesce_storage::keys::RaftMetaTag;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, RaftTypeConfig};

use crate::codec::{self, Entry};
use crate::types::{LogId, TypeConfig, Vote};

/// Most bytes of entries returned for one replication message.
const MAX_REPLICATION_BYTES: usize = 4 << 20;

/// A shard group's log store (and its own reader: reads go to RocksDB, which sees every append).
#[derive(Debug, Clone)]
pub struct LogStore {
    store: ShardStore,
}

impl LogStore {
    /// The log of `store`'s shard.
    pub fn new(store: ShardStore) -> Self {
        Self { store }
    }

    fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        (start, end)
    }

    fn read(&self, start: u64, end: u64, max_bytes: usize) -> Result<Vec<Entry>, io::Error> {
        let shard = self.store.shard();
        Ok(self
            .store
            .log_range(start, end, max_bytes)?
            .into_iter()
            .map(|(_, bytes)| codec::decode_entry(shard, &bytes))
            .collect::<Result<_, _>>()?)
    }

    fn purged(&self) -> Result<Option<LogId>, io::Error> {
        match self.store.raft_meta_get(RaftMetaTag::Purged)? {
            Some(b) => Ok(Some(codec::decode_log_id(self.store.shard(), &b)?)),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = Self::bounds(&range);
        self.read(start, end, usize::MAX)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match self.store.raft_meta_get(RaftMetaTag::Vote)? {
            Some(b) => Ok(Some(codec::decode_vote(self.store.shard(), &b)?)),
            None => Ok(None),
        }
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        self.read(start, end, MAX_REPLICATION_BYTES)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged = self.purged()?;
        let last = match self.store.log_last()? {
            Some((_, bytes)) => Some(codec::decode_entry(self.store.shard(), &bytes)?.log_id),
            None => purged,
        };
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.store.raft_meta_put(RaftMetaTag::Vote, &codec::encode_vote(vote)?, true)?;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        if let Some(c) = committed {
            self.store.raft_meta_put(RaftMetaTag::Committed, &codec::encode_log_id(&c)?, false)?;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        match self.store.raft_meta_get(RaftMetaTag::Committed)? {
            Some(b) => Ok(Some(codec::decode_log_id(self.store.shard(), &b)?)),
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = <TypeConfig as RaftTypeConfig>::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, codec::encode_entry(&e)?)))
            .collect::<Result<Vec<_>, coalesce_storage::StorageError>>()?;
        self.store.log_append(encoded, Box::new(move |r| callback.io_completed(r)))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.store.log_truncate_from(from)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.store.log_purge_upto(log_id.index, &codec::encode_log_id(&log_id)?)?;
        Ok(())
    }
}
