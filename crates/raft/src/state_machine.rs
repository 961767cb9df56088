//! A shard's replicated state machine: the core's buffer, the outbox and producer sessions in
//! the node's RocksDB. Applying reads only the entry and the stored state — never the clock —
//! so every replica holds byte-identical state after the same log.
//!
//! Applied effects are staged in memory ahead of RocksDB (the store's pending state, which
//! every reader sees) and checkpointed — all of them with the applied log id, in one atomic
//! RocksDB write — every `checkpoint_interval`, when they grow large, before a snapshot, and at
//! once for the rare entries whose effects are read from RocksDB only (dead letters,
//! membership). A crash loses what was not checkpointed and the node re-applies those entries
//! from its durable log, so no acknowledged input depends on a checkpoint.
//! Outputs sealed by an entry enter the outbox with gap-free, increasing per-shard seqs and
//! the epoch (term, node) of the leader that wrote the entry.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use coalesce_core::buffer::{GroupApplied, PartialOutcome, ShardBuffer};
use coalesce_core::output::Output;
use coalesce_core::session::{self, SeqCheck, Session};
use coalesce_storage::keys::SmMetaTag;
use coalesce_storage::{ApplyBatch, ShardStore, StorageError};

use crate::changes::{Changes, NodeChanges};
use crate::snapshot::ShardSnapshot;
use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::type_config::alias::SnapshotOf;
use openraft::{EntryPayload, OptionalSend, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::codec::{self, StoredMembershipT};
use crate::types::{Command, GroupOutcome, IngestGroup, KeyFull, LogId, Response, TypeConfig, epoch_of};

/// Replicated outbox bookkeeping of a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxMeta {
    /// The seq the next output gets (seqs start at 1).
    pub next_seq: u64,
    /// Outputs with a seq below this have been acked by every cursor and deleted.
    pub low: u64,
    /// Highest seq each consumer has acked.
    pub cursors: BTreeMap<String, u64>,
    /// Stamp at or after which the next Seal sweeps expired producer sessions.
    pub next_session_sweep: u64,
}

impl Default for OutboxMeta {
    fn default() -> Self {
        Self { next_seq: 1, low: 1, cursors: BTreeMap::new(), next_session_sweep: 0 }
    }
}

/// How often (in leader time) expired producer sessions are swept.
const SESSION_SWEEP_INTERVAL_MS: u64 = 60_000;

/// Why this replica stopped applying a shard's log (see [`ShardStateMachine::failure`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyFailure {
    /// The log entry that failed.
    pub index: u64,
    pub term: u64,
    /// What failed: the validation error, the storage error or the panic message.
    pub detail: String,
}

impl std::fmt::Display for ApplyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "applying log entry {} (term {}) failed: {}", self.index, self.term, self.detail)
    }
}

/// Set once, when an entry fails to apply; shared with the node, which reports it.
pub type FailureSlot = Arc<Mutex<Option<ApplyFailure>>>;

/// Per adaptive stream, the window stretch (`extra_ms`) of the last Ingest entry applied:
/// an observation for the node (where a new leader's controller resumes), not replicated state.
pub type AppliedExtra = Arc<Mutex<BTreeMap<String, u64>>>;

/// A shard group's state machine.
#[derive(Debug, Clone)]
pub struct ShardStateMachine {
    store: ShardStore,
    /// Cached copy of the stored outbox meta; apply is sequential so it never goes stale.
    outbox: OutboxMeta,
    /// Moved after every applied entry or installed snapshot ([`crate::changes`]): waiters
    /// wake, and readers of derived state (the sealer's cached next deadline) look again.
    changes: Changes,
    /// This node's peer id when it records metrics (see `crate::metrics`): entries proposed by
    /// it are counted here.
    counting_as: Option<u64>,
    applied_extra: AppliedExtra,
    /// The longest applied effects wait in memory before a checkpoint writes them.
    checkpoint_interval: std::time::Duration,
    /// The entry this replica could not apply, once one failed: nothing is applied after it.
    failure: FailureSlot,
}

/// Default of [`ShardStateMachine::checkpoint_every`] (`[raft] checkpoint_interval`).
pub const DEFAULT_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The outbox bookkeeping of `store`'s shard as last applied there.
pub(crate) fn load_outbox(store: &ShardStore) -> Result<OutboxMeta, StorageError> {
    match store.sm_meta_get(SmMetaTag::Outbox)? {
        Some(b) => postcard::from_bytes(&b).map_err(|e| StorageError::Corrupt {
            shard: store.shard(),
            what: "outbox meta",
            detail: e.to_string(),
        }),
        None => Ok(OutboxMeta::default()),
    }
}

fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(v).map_err(|e| StorageError::Encode { what, detail: e.to_string() })
}

/// The replica an operator chose to lead `store`'s shard, if any.
pub(crate) fn load_preferred_leader(store: &ShardStore) -> Result<Option<String>, StorageError> {
    match store.sm_meta_get(SmMetaTag::PreferredLeader)? {
        Some(b) => postcard::from_bytes(&b).map_err(|e| StorageError::Corrupt {
            shard: store.shard(),
            what: "preferred leader",
            detail: e.to_string(),
        }),
        None => Ok(None),
    }
}

impl ShardStateMachine {
    /// The state machine of `store`'s shard, as persisted.
    pub fn open(store: ShardStore) -> Result<Self, StorageError> {
        let outbox = load_outbox(&store)?;
        Ok(Self {
            store,
            outbox,
            changes: Changes::default(),
            counting_as: None,
            applied_extra: Arc::default(),
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            failure: Arc::default(),
        })
    }

    /// Checkpoints applied effects to RocksDB at least this often (zero: after every apply,
    /// i.e. write-through). Longer intervals write less under load and make a restarted node
    /// re-apply more of its log.
    pub fn checkpoint_every(mut self, interval: std::time::Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// Records stream metrics for the entries node `me` proposed (`crate::metrics`).
    pub fn counting_as(mut self, me: u64) -> Self {
        self.counting_as = Some(me);
        self
    }

    /// Whether this replica counts the effects of the entry `log_id`.
    fn counts(&self, log_id: &LogId) -> bool {
        self.counting_as == Some(log_id.leader_id.node_id)
    }

    /// The shard's storage.
    pub fn store(&self) -> &ShardStore {
        &self.store
    }

    /// Moves `node`'s change counter too, besides the shard's own ([`crate::changes`]).
    pub fn notifying(mut self, node: &NodeChanges) -> Self {
        self.changes = Changes::on(node);
        self
    }

    /// The shard's change counter: it moves whenever the state changes (entry applied,
    /// snapshot installed).
    pub fn changes(&self) -> Changes {
        self.changes.clone()
    }

    /// The adaptive stretch per stream of the last Ingest entry applied here.
    pub fn applied_extra(&self) -> AppliedExtra {
        Arc::clone(&self.applied_extra)
    }

    /// The entry this replica failed to apply, if one did (the group then stops here).
    pub fn failure(&self) -> FailureSlot {
        Arc::clone(&self.failure)
    }

    /// The outbox bookkeeping as of the last applied entry.
    pub fn outbox(&self) -> &OutboxMeta {
        &self.outbox
    }

    fn emit(
        &mut self,
        batch: &mut ApplyBatch<'_>,
        outputs: Vec<Output>,
        log_id: &LogId,
        stamp: u64,
    ) -> Result<u32, StorageError> {
        // Test-only mutation (chaos's checker must catch it): every output emitted twice.
        let outputs = if crate::failpoints::active("double_seal") {
            outputs.into_iter().flat_map(|o| [o.clone(), o]).collect()
        } else {
            outputs
        };
        let n = outputs.len() as u32;
        if self.counts(log_id) {
            crate::metrics::record_outputs(&outputs, stamp);
        }
        for mut o in outputs {
            o.shard = self.store.shard();
            o.seq = self.outbox.next_seq;
            o.epoch = epoch_of(log_id);
            self.outbox.next_seq += 1;
            batch.outbox_put(&o)?;
        }
        Ok(n)
    }

    fn apply_ingest(
        &mut self,
        batch: &mut ApplyBatch<'_>,
        log_id: &LogId,
        stamp: u64,
        rules: BTreeMap<String, coalesce_core::stream::StreamRules>,
        limits: coalesce_core::stream::ShardLimits,
        groups: Vec<IngestGroup>,
    ) -> Result<Response, StorageError> {
        if let Ok(mut extra) = self.applied_extra.lock() {
            for (stream, r) in &rules {
                if let Some(a) = r.window.adaptive {
                    extra.insert(stream.clone(), a.extra_ms);
                }
            }
        }
        // The shard clock moves to the entry's stamp whatever becomes of its groups.
        let mut outputs = ShardBuffer::apply_partials(batch, stamp, &rules, &limits, &[])?.outputs;
        let counts = self.counts(log_id);
        let count = |metric: &prometheus::IntCounterVec, key: &coalesce_core::buffer::BufKey, inputs: u64| {
            if counts {
                metric.with_label_values(&[key.stream.as_str()]).inc_by(inputs);
            }
        };
        let mut outcomes = Vec::with_capacity(groups.len());
        // Group by group: a group's session is recorded only if it is applied, before the next
        // group (a retry of it in the same entry) is checked.
        for g in groups {
            let (session, verdict) = match &g.range {
                None => (None, SeqCheck::New),
                Some(r) => {
                    let session = batch.session_get(r.producer)?;
                    let verdict = session::check_range(session.as_ref(), r);
                    (session, verdict)
                }
            };
            let outcome = match verdict {
                SeqCheck::New => match ShardBuffer::apply_group(batch, stamp, &rules, &limits, &g.partials)? {
                    GroupApplied::Applied(result) => {
                        if let Some(r) = &g.range {
                            batch.session_put(r.producer, &Session::after(session.as_ref(), r, stamp))?;
                        }
                        let mut shed = 0u64;
                        for ((key, p), outcome) in g.partials.iter().zip(&result.outcomes) {
                            if *outcome == PartialOutcome::Shed {
                                shed = shed.saturating_add(p.inputs);
                                count(&crate::metrics::SHED, key, p.inputs);
                            } else {
                                count(&crate::metrics::INPUTS, key, p.inputs);
                            }
                        }
                        outputs.extend(result.outputs);
                        GroupOutcome::Applied { shed }
                    }
                    GroupApplied::KeyFull(refused) => {
                        for (key, p) in &g.partials {
                            count(&crate::metrics::KEY_FULL, key, p.inputs);
                        }
                        let refused = refused
                            .into_iter()
                            .map(|(i, retry_after_ms)| KeyFull {
                                partial: i as u32,
                                inputs: g.partials[i].1.inputs,
                                retry_after_ms,
                            })
                            .collect();
                        let inputs = g.partials.iter().fold(0u64, |n, (_, p)| n.saturating_add(p.inputs));
                        GroupOutcome::KeyFull { inputs, refused }
                    }
                },
                SeqCheck::Duplicate => GroupOutcome::Duplicate,
                SeqCheck::Overlap { accepted } => GroupOutcome::Overlap { accepted },
                SeqCheck::TooOld { accepted } => GroupOutcome::TooOld { accepted },
            };
            outcomes.push(outcome);
        }
        if counts {
            let duplicates = outcomes.iter().filter(|o| **o == GroupOutcome::Duplicate).count();
            crate::metrics::DUPLICATES.inc_by(duplicates as u64);
        }
        let sealed = self.emit(batch, outputs, log_id, stamp)?;
        Ok(Response::Ingest { groups: outcomes, sealed })
    }

    fn apply_seal(
        &mut self,
        batch: &mut ApplyBatch<'_>,
        log_id: &LogId,
        stamp: u64,
        max: u32,
        session_ttl_ms: u64,
    ) -> Result<Response, StorageError> {
        let outputs = ShardBuffer::seal_due(batch, stamp, max as usize)?;
        let sealed = self.emit(batch, outputs, log_id, stamp)?;
        if stamp >= self.outbox.next_session_sweep {
            let cutoff = stamp.saturating_sub(session_ttl_ms);
            for (producer, s) in batch.sessions_all()? {
                if s.last_seen < cutoff {
                    batch.session_delete(producer);
                }
            }
            self.outbox.next_session_sweep = stamp.saturating_add(SESSION_SWEEP_INTERVAL_MS);
        }
        Ok(Response::Sealed { sealed, next_seq: self.outbox.next_seq })
    }

    fn apply_ack(&mut self, batch: &mut ApplyBatch<'_>, cursor: String, upto_seq: u64) -> Response {
        // A consumer cannot ack what does not exist yet.
        let upto = upto_seq.min(self.outbox.next_seq.saturating_sub(1));
        let c = self.outbox.cursors.entry(cursor).or_insert(0);
        *c = (*c).max(upto);
        self.trim(batch);
        Response::Acked { trimmed_below: self.outbox.low }
    }

    /// Deletes outputs every cursor has acknowledged.
    fn trim(&mut self, batch: &mut ApplyBatch<'_>) {
        let low = self.outbox.cursors.values().min().map_or(self.outbox.low, |m| m + 1);
        self.trim_below(batch, low);
    }

    /// Deletes outputs below `below`, but none a cursor has not acknowledged and none not yet
    /// emitted ([`Command::Trim`]).
    fn trim_below(&mut self, batch: &mut ApplyBatch<'_>, below: u64) {
        let claimed = self.outbox.cursors.values().min().map_or(u64::MAX, |m| m + 1);
        let low = below.min(claimed).min(self.outbox.next_seq);
        if low > self.outbox.low {
            batch.outbox_trim(self.outbox.low, low);
            self.outbox.low = low;
        }
    }

    /// Applies `entries` (consecutive, committed) in one atomic RocksDB write and returns their
    /// responses. The result is the same for any split of a log into such calls: reads see the
    /// batch's own writes.
    ///
    /// An entry that is invalid ([`Command::validate`]), whose apply fails, or whose apply
    /// panics stops the group on this replica: nothing of the call is staged, the failure is
    /// recorded ([`ShardStateMachine::failure`]), logged and counted, and the error returned
    /// makes openraft stop the group. The process and its other groups go on; the same entry
    /// fails the same way after a restart, so the group stays stopped instead of crash-looping.
    pub fn apply_entries(&mut self, entries: Vec<crate::codec::Entry>) -> Result<Vec<Response>, StorageError> {
        let Some(last) = entries.last().map(|e| e.log_id) else { return Ok(Vec::new()) };
        if let Some(f) = self.failure.lock().map_err(|_| self.stopped("failure slot poisoned"))?.clone() {
            return Err(StorageError::ApplyFailed { shard: self.store.shard(), index: f.index, detail: f.detail });
        }
        let before = self.outbox.clone();
        let store = self.store.clone();
        let mut batch = store.apply_batch();
        let mut responses = Vec::with_capacity(entries.len());
        for entry in entries {
            let log_id = entry.log_id;
            let applied = match &entry.payload {
                EntryPayload::Normal(cmd) => cmd.validate().map_err(|e| e.to_string()),
                _ => Ok(()),
            }
            .and_then(|()| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply_entry(&mut batch, entry)))
                    .map_err(|panic| format!("panicked: {}", panic_message(panic.as_ref())))?
                    .map_err(|e| e.to_string())
            });
            match applied {
                Ok(r) => responses.push(r),
                Err(detail) => {
                    self.outbox = before;
                    return Err(self.fail(&log_id, detail));
                }
            }
        }
        if let Err(e) = self.commit(batch, &last, &before) {
            return Err(self.fail(&last, e.to_string()));
        }
        Ok(responses)
    }

    fn stopped(&self, detail: &str) -> StorageError {
        StorageError::ApplyFailed { shard: self.store.shard(), index: 0, detail: detail.to_owned() }
    }

    /// Records that `log_id` failed to apply (see [`ShardStateMachine::apply_entries`]).
    fn fail(&self, log_id: &LogId, detail: String) -> StorageError {
        let shard = self.store.shard();
        let failure = ApplyFailure { index: log_id.index, term: log_id.leader_id.term, detail };
        tracing::error!(
            shard,
            index = failure.index,
            term = failure.term,
            error = %failure.detail,
            "a log entry failed to apply: this shard group stops on this node (docs/operations.md, \"A shard group stopped\")"
        );
        crate::metrics::APPLY_FAILURES.inc();
        let err = StorageError::ApplyFailed { shard, index: failure.index, detail: failure.detail.clone() };
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert(failure);
        }
        err
    }

    /// Applies one entry's effects to `batch` (not yet written).
    fn apply_entry(
        &mut self,
        batch: &mut ApplyBatch<'_>,
        entry: crate::codec::Entry,
    ) -> Result<Response, StorageError> {
        let log_id = entry.log_id;
        Ok(match entry.payload {
            EntryPayload::Blank => Response::None,
            EntryPayload::Membership(m) => {
                batch.sm_meta_put(
                    SmMetaTag::Membership,
                    codec::encode_membership(&StoredMembership::new(Some(log_id), m))?,
                );
                Response::None
            }
            EntryPayload::Normal(Command::Ingest { stamp, rules, limits, groups }) => {
                self.apply_ingest(batch, &log_id, stamp, rules, limits, groups)?
            }
            EntryPayload::Normal(Command::Seal { stamp, max, session_ttl_ms }) => {
                self.apply_seal(batch, &log_id, stamp, max, session_ttl_ms)?
            }
            EntryPayload::Normal(Command::Ack { cursor, upto_seq }) => self.apply_ack(batch, cursor, upto_seq),
            EntryPayload::Normal(Command::DeadLetter { cursor, upto_seq, letters }) => {
                let acked = self.outbox.cursors.get(&cursor).copied().unwrap_or(0);
                for letter in letters.iter().filter(|l| l.output.seq > acked && l.output.seq <= upto_seq) {
                    batch.dlq_put(letter)?;
                }
                self.apply_ack(batch, cursor, upto_seq)
            }
            EntryPayload::Normal(Command::Trim { below }) => {
                self.trim_below(batch, below);
                Response::Acked { trimmed_below: self.outbox.low }
            }
            EntryPayload::Normal(Command::DropCursor { cursor }) => {
                self.outbox.cursors.remove(&cursor);
                self.trim(batch);
                Response::Acked { trimmed_below: self.outbox.low }
            }
            EntryPayload::Normal(Command::SetPreferredLeader { node }) => {
                batch.sm_meta_put(SmMetaTag::PreferredLeader, encode("preferred leader", &node)?);
                Response::None
            }
            EntryPayload::Normal(Command::DlqRemove { sink, seqs }) => {
                for seq in seqs {
                    batch.dlq_delete(&sink, seq);
                }
                Response::None
            }
        })
    }

    /// Writes the applied state held in memory to RocksDB before returning (see the module
    /// docs).
    pub fn checkpoint(&self) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let written = self.store.checkpoint()?;
        record_checkpoint(written, started);
        Ok(())
    }

    /// Starts writing the applied state held in memory to RocksDB on a blocking thread, so
    /// applying goes on meanwhile; readers see it in flight until it lands. A failed
    /// background write is logged and retried by the next apply, synchronously, whose error
    /// then stops the group (as a failed synchronous checkpoint does).
    fn checkpoint_in_background(&self) {
        let Some(job) = self.store.begin_checkpoint() else { return };
        let shard = self.store.shard();
        let run = move || {
            let started = std::time::Instant::now();
            match job.run() {
                Ok(written) => record_checkpoint(written, started),
                Err(e) => tracing::warn!(shard, error = %e, "background checkpoint failed; the next one retries it"),
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(run)),
            Err(_) => run(),
        }
    }

    /// Stages `batch` with the outbox meta and the applied log id `last` (one atomic unit),
    /// checkpointing when due. On failure the cached outbox meta returns to `before`.
    fn commit(&mut self, mut batch: ApplyBatch<'_>, last: &LogId, before: &OutboxMeta) -> Result<(), StorageError> {
        let result = (|| {
            if self.outbox != *before {
                batch.sm_meta_put(SmMetaTag::Outbox, encode("outbox meta", &self.outbox)?);
            }
            batch.sm_meta_put(SmMetaTag::Applied, codec::encode_log_id(last)?);
            batch.stage()
        })();
        match result {
            Ok(staged) => {
                // Write-through (a zero interval), effects read from RocksDB only, and the retry
                // of a failed background write happen here, before the entries are answered.
                if staged.urgent || self.checkpoint_interval.is_zero() || self.store.checkpoint_failed() {
                    self.checkpoint()?;
                } else if self.store.checkpoint_due(self.checkpoint_interval) {
                    self.checkpoint_in_background();
                }
                let outputs = self.outbox.next_seq != before.next_seq || self.outbox.low != before.low;
                self.changes.bump(outputs);
                Ok(())
            }
            Err(e) => {
                self.outbox = before.clone();
                Err(e)
            }
        }
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Counts a checkpoint that wrote something (`coalesce_state_checkpoint_*`).
fn record_checkpoint(written: coalesce_storage::shard::Checkpoint, started: std::time::Instant) {
    if written.rows > 0 {
        crate::metrics::CHECKPOINT_SECONDS.observe(started.elapsed().as_secs_f64());
        crate::metrics::CHECKPOINT_ROWS.inc_by(written.rows as u64);
    }
}

/// Entries applied in one RocksDB write at most. Applying several committed entries together
/// costs one write and lets a key touched by several of them be read and written once; the
/// result is the same as applying them one by one, because reads see the batch's own writes.
const MAX_ENTRIES_PER_WRITE: usize = 64;

impl ShardStateMachine {
    /// A consistent view of the applied state (checkpointed first) and its snapshot metadata,
    /// read from that view (no log id before anything was applied).
    fn view(&self) -> Result<SnapshotOf<TypeConfig, ShardSnapshot>, io::Error> {
        let shard = self.store.shard();
        let view = self.store.open_view()?;
        let last_log_id = view.meta().applied.as_deref().map(|b| codec::decode_log_id(shard, b)).transpose()?;
        let last_membership = match view.meta().membership.as_deref() {
            Some(b) => codec::decode_membership(shard, b)?,
            None => StoredMembershipT::default(),
        };
        Ok(Snapshot { meta: SnapshotMeta { last_log_id, last_membership }, snapshot: ShardSnapshot::View(view) })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for ShardStateMachine {
    type SnapshotData = ShardSnapshot;

    /// The snapshot openraft purges the log up to: the applied state, checkpointed. No bytes
    /// are produced here (see [`crate::snapshot`]): the state in RocksDB is the snapshot.
    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, ShardSnapshot>, io::Error> {
        let built = self.view()?;
        crate::metrics::SNAPSHOTS.with_label_values(&["built"]).inc();
        Ok(built)
    }
}

type Meta = SnapshotMeta<openraft::impls::leader_id_adv::LeaderId<u64, u64>, u64, crate::types::PeerNode>;

impl RaftStateMachine<TypeConfig> for ShardStateMachine {
    type SnapshotData = ShardSnapshot;
    type SnapshotBuilder = ShardStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembershipT), io::Error> {
        let shard = self.store.shard();
        let applied = match self.store.sm_meta_get(SmMetaTag::Applied)? {
            Some(b) => Some(codec::decode_log_id(shard, &b)?),
            None => None,
        };
        let membership = match self.store.sm_meta_get(SmMetaTag::Membership)? {
            Some(b) => codec::decode_membership(shard, &b)?,
            None => StoredMembershipT::default(),
        };
        Ok((applied, membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut next = entries.try_next().await?;
        while next.is_some() {
            let mut chunk = Vec::new();
            let mut responders = Vec::new();
            while let Some((entry, responder)) = next.take() {
                chunk.push(entry);
                responders.push(responder);
                // The stream holds committed entries only: pulling the next never waits.
                next = entries.try_next().await?;
                if chunk.len() >= MAX_ENTRIES_PER_WRITE {
                    break;
                }
            }
            let responses = self.apply_entries(chunk)?;
            for (responder, response) in responders.into_iter().zip(responses) {
                if let Some(r) = responder {
                    r.send(response);
                }
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    /// The rows carry the applied log id and membership openraft passes as `_meta` (a received
    /// snapshot was checked to agree with it before it got here).
    async fn install_snapshot(&mut self, _meta: &Meta, snapshot: ShardSnapshot) -> Result<(), io::Error> {
        let store = self.store.clone();
        let install = move || -> Result<(), StorageError> {
            let file = match snapshot {
                ShardSnapshot::Received(file) => file,
                // A view of another state machine (openraft's storage suite does this): spooled
                // to a file here first, so it installs the same way.
                ShardSnapshot::View(mut view) => {
                    let limits = coalesce_storage::snapshot::Limits::default();
                    let mut spool = coalesce_storage::transfer::Spool::create(store.db(), store.shard(), limits)?;
                    let spooled = |e: coalesce_storage::transfer::SpoolError| StorageError::Corrupt {
                        shard: store.shard(),
                        what: "snapshot view",
                        detail: e.to_string(),
                    };
                    while let Some(chunk) = view.next_chunk()? {
                        spool.push(&chunk).map_err(spooled)?;
                    }
                    spool.finish().map_err(spooled)?
                }
            };
            store.install_file(file)
        };
        tokio::task::spawn_blocking(install)
            .await
            .map_err(|e| io::Error::other(format!("snapshot install: {e}")))??;
        crate::metrics::SNAPSHOTS.with_label_values(&["installed"]).inc();
        self.outbox = load_outbox(&self.store)?;
        self.changes.bump(true);
        Ok(())
    }

    /// The applied state, read as it is sent (see [`crate::snapshot`]); none before anything
    /// was applied.
    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, ShardSnapshot>>, io::Error> {
        let view = self.view()?;
        Ok(view.meta.last_log_id.is_some().then_some(view))
    }
}
