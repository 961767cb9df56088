//! A typed, read-only view of one shard's replicated state as this node's state machine has
//! applied it: the outbox and its cursors, outputs after a seq, buffer occupancy, dead letters,
//! the preferred leader, buffered keys, and the change counter that moves with every applied
//! entry. Everything outside the raft crate — delivery, Subscribe, retention, admin, metrics —
//! reads a shard through this, never through its storage rows, so the state machine's layout
//! stays the state machine's business.

use std::collections::BTreeMap;

use coalesce_core::buffer::{BufKey, BufferStore, Buffered, ShardBuffer, ShardStats};
use coalesce_core::hash::ShardId;
use coalesce_core::output::{DeadLetter, Output};
use coalesce_core::time::Millis;
use coalesce_storage::{ShardStore, StorageError};

use crate::changes::Changes;
use crate::state_machine::{OutboxMeta, load_outbox, load_preferred_leader};

/// Reads one shard's applied state ([`crate::node::Group::reader`]). Cheap to clone.
#[derive(Clone)]
pub struct ShardReader {
    store: ShardStore,
    changes: Changes,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader").field("shard", &self.store.shard()).finish()
    }
}

impl ShardReader {
    pub(crate) fn new(store: ShardStore, changes: Changes) -> Self {
        Self { store, changes }
    }

    pub fn shard(&self) -> ShardId {
        self.store.shard()
    }

    /// The state machine's change counter: it moves whenever an applied entry changed the
    /// outbox (or anything a reader sees). Read it before a read and compare after to know
    /// whether the read may have missed a change ([`crate::changes`]).
    pub fn version(&self) -> u64 {
        self.changes.version()
    }

    /// [`ShardReader::version`] of the outputs only: it moves when outputs are added or
    /// trimmed, not on every Ingest.
    pub fn outputs_version(&self) -> u64 {
        self.changes.outputs_version()
    }

    /// A receiver that wakes when the shard's outputs next change (added or trimmed): mark it
    /// seen (`borrow_and_update`) before reading the outbox, then await `changed()`
    /// ([`crate::changes`]).
    pub fn watch_outputs(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.watch_outputs()
    }

    /// The outbox: next seq, lowest kept seq, and every consumer's cursor.
    pub fn outbox(&self) -> Result<OutboxMeta, StorageError> {
        load_outbox(&self.store)
    }

    /// Up to `limit` outputs with a seq at or after `from`, in seq order.
    pub fn outputs_from(&self, from: u64, limit: usize) -> Result<Vec<Output>, StorageError> {
        self.store.outbox_from(from, limit)
    }

    /// Buffer occupancy and the shard's replicated counters.
    pub fn stats(&self) -> Result<ShardStats, StorageError> {
        self.store.stats()
    }

    /// Up to `limit` dead letters of `sink` with a seq at or after `from`.
    pub fn dead_letters(&self, sink: &str, from: u64, limit: usize) -> Result<Vec<DeadLetter>, StorageError> {
        self.store.dlq_from(sink, from, limit)
    }

    /// Dead letters per sink.
    pub fn dead_letter_counts(&self) -> Result<BTreeMap<String, u64>, StorageError> {
        self.store.dlq_counts()
    }

    /// The replica leader balancing keeps the shard's leadership on, if one was set.
    pub fn preferred_leader(&self) -> Result<Option<String>, StorageError> {
        load_preferred_leader(&self.store)
    }

    /// The open window of `key`, if it has one.
    pub fn buffered(&self, key: &BufKey) -> Result<Option<Buffered>, StorageError> {
        self.store.apply_batch().get(key)
    }

    /// When the earliest open window closes (a leader stamp).
    pub fn next_deadline(&self) -> Result<Option<Millis>, StorageError> {
        ShardBuffer::next_deadline(&mut self.store.apply_batch())
    }
}
