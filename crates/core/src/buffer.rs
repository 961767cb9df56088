//! Per-shard buffered aggregates.
//!
//! A shard's buffer maps [`BufKey`] (stream, key) to a [`Buffered`] aggregate with its window
//! bookkeeping and time deadline, plus a *deadline index* ordered by (deadline, key) so the
//! scheduler finds closed windows without scanning keys, and [`ShardStats`] (occupancy and
//! counters). All of it lives behind [`BufferStore`]: [`MemStore`] here, a RocksDB-backed store
//! in the storage crate. The functions of [`ShardBuffer`] are the state machine's apply: they
//! read only the store and their arguments (a leader stamp, the batch, the rules the entry
//! carries), so every replica computes the same state.
//!
//! Triggers evaluated at apply time: a key whose deadline has passed at the entry's stamp is
//! sealed before new input joins it; count and bytes triggers seal right after a merge; a merge
//! that overflows or exceeds a bound seals the old window and opens a new one with the input;
//! an operator change seals the old window. Time-only closes come from [`ShardBuffer::seal_due`],
//! which the leader proposes on its clock (the Seal command).
//!
//! Limits: when a new key would exceed the shard's key or byte limit, the stream's overflow
//! policy decides: `reject` is enforced before proposing ([`ShardBuffer::admit`]; apply then
//! accepts, so limits are soft by at most the in-flight proposals), `flush_early` seals the
//! earliest-deadline windows to make room, `shed` drops the input and counts it.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;

use serde::{Deserialize, Serialize};

use crate::batch::Partial;
use crate::error::EventError;
use crate::merge::Aggregate;
use crate::output::{Epoch, Output};
use crate::samples::{self, Samples};
use crate::stream::{OverflowPolicy, ShardLimits, StreamRules};
use crate::time::Millis;
use crate::window::{SealReason, WindowState};

/// The buffer key: a key of a stream.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BufKey {
    pub stream: String,
    pub key: String,
}

/// One buffered aggregate and its window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffered {
    pub agg: Aggregate,
    pub window: WindowState,
    /// When the window closes by time (a leader stamp).
    pub deadline: Millis,
    /// Bytes accounted against the shard's byte limit.
    pub bytes: u64,
    /// Samples of the folded inputs, for streams with a sample policy ([`crate::samples`]).
    #[serde(default)]
    pub samples: Option<Samples>,
}

/// Occupancy and counters of one shard; replicated with the buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    pub keys: u64,
    pub bytes: u64,
    /// Highest stamp applied; stamps are clamped to never go backwards.
    pub last_stamp: Millis,
    pub inputs_total: u64,
    pub outputs_total: u64,
    pub shed_inputs_total: u64,
    pub flushed_early_total: u64,
}

/// Fixed per-key overhead counted against the byte limit.
pub const KEY_OVERHEAD_BYTES: u64 = 64;

fn accounted_bytes(key: &BufKey, agg: &Aggregate, samples: Option<&Samples>) -> u64 {
    let samples = samples.map_or(0, Samples::size);
    (key.stream.len() + key.key.len() + agg.size() + samples) as u64 + KEY_OVERHEAD_BYTES
}

/// Storage of one shard's buffer. Reads must observe the caller's earlier writes.
pub trait BufferStore {
    type Error: std::error::Error + Send + Sync + 'static;
    fn get(&mut self, key: &BufKey) -> Result<Option<Buffered>, Self::Error>;
    fn put(&mut self, key: &BufKey, value: Buffered) -> Result<(), Self::Error>;
    fn delete(&mut self, key: &BufKey) -> Result<(), Self::Error>;
    fn index_insert(&mut self, deadline: Millis, key: &BufKey) -> Result<(), Self::Error>;
    fn index_remove(&mut self, deadline: Millis, key: &BufKey) -> Result<(), Self::Error>;
    /// Up to `limit` index entries with `deadline <= upto`, by (deadline, key).
    fn due(&mut self, upto: Millis, limit: usize) -> Result<Vec<(Millis, BufKey)>, Self::Error>;
    fn stats(&mut self) -> Result<ShardStats, Self::Error>;
    fn set_stats(&mut self, stats: &ShardStats) -> Result<(), Self::Error>;
}

/// An in-memory [`BufferStore`] for tests, simulations and the single-process demo.
/// Only the index is iterated, so the buffers can live in a hash map.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemStore {
    pub buffers: hashbrown::HashMap<BufKey, Buffered>,
    pub index: BTreeSet<(Millis, BufKey)>,
    pub stats: ShardStats,
}

impl BufferStore for MemStore {
    type Error = Infallible;
    fn get(&mut self, key: &BufKey) -> Result<Option<Buffered>, Infallible> {
        Ok(self.buffers.get(key).cloned())
    }
    fn put(&mut self, key: &BufKey, value: Buffered) -> Result<(), Infallible> {
        match self.buffers.get_mut(key) {
            Some(slot) => *slot = value,
            None => {
                self.buffers.insert(key.clone(), value);
            }
        }
        Ok(())
    }
    fn delete(&mut self, key: &BufKey) -> Result<(), Infallible> {
        self.buffers.remove(key);
        Ok(())
    }
    fn index_insert(&mut self, deadline: Millis, key: &BufKey) -> Result<(), Infallible> {
        self.index.insert((deadline, key.clone()));
        Ok(())
    }
    fn index_remove(&mut self, deadline: Millis, key: &BufKey) -> Result<(), Infallible> {
        self.index.remove(&(deadline, key.clone()));
        Ok(())
    }
    fn due(&mut self, upto: Millis, limit: usize) -> Result<Vec<(Millis, BufKey)>, Infallible> {
        Ok(self.index.iter().take_while(|(d, _)| *d <= upto).take(limit).cloned().collect())
    }
    fn stats(&mut self) -> Result<ShardStats, Infallible> {
        Ok(self.stats)
    }
    fn set_stats(&mut self, stats: &ShardStats) -> Result<(), Infallible> {
        self.stats = *stats;
        Ok(())
    }
}

/// What a Raft Ingest entry carries once the leader has deduplicated it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IngestBatch {
    /// The leader's clock when it proposed the entry.
    pub stamp: Millis,
    /// The rules of every stream the partials name.
    pub rules: BTreeMap<String, StreamRules>,
    pub limits: ShardLimits,
    pub partials: Vec<(BufKey, Partial)>,
}

/// What happened to one partial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartialOutcome {
    Applied,
    /// Dropped by the `shed` overflow policy (counted in [`ShardStats::shed_inputs_total`]).
    Shed,
    /// Not merged: under `key_overflow = "reject"` it would have grown its key's value past the
    /// window's `max_bytes`. The key's window closes in `retry_after_ms` (from the entry's
    /// stamp; 0 when the partial alone is larger than a window may hold).
    /// [`ShardBuffer::apply_group`] then applies nothing of its group.
    KeyFull {
        retry_after_ms: u64,
    },
}

/// What became of a producer group ([`ShardBuffer::apply_group`]).
#[derive(Clone, Debug, PartialEq)]
pub enum GroupApplied {
    Applied(IngestResult),
    /// Nothing applied: these partials (position in the group, wait until their key's window
    /// closes) would have grown their key past `max_bytes`.
    KeyFull(Vec<(usize, u64)>),
}

/// A [`BufferStore`] layered over another whose writes stay in memory until
/// [`Tentative::commit`] replays them onto the store below; dropped without it, it leaves that
/// store as it was. Reads see the layer's own writes.
#[derive(Debug)]
pub struct Tentative<'a, S: BufferStore> {
    below: &'a mut S,
    /// `None`: deleted in this layer.
    buffers: hashbrown::HashMap<BufKey, Option<Buffered>>,
    /// `true`: inserted in this layer, `false`: removed.
    index: BTreeMap<(Millis, BufKey), bool>,
    stats: Option<ShardStats>,
}

impl<'a, S: BufferStore> Tentative<'a, S> {
    pub fn new(below: &'a mut S) -> Self {
        Self { below, buffers: Default::default(), index: BTreeMap::new(), stats: None }
    }

    /// Writes everything this layer holds onto the store below.
    pub fn commit(self) -> Result<(), S::Error> {
        for (key, row) in self.buffers {
            match row {
                Some(b) => self.below.put(&key, b)?,
                None => self.below.delete(&key)?,
            }
        }
        for ((deadline, key), inserted) in self.index {
            if inserted {
                self.below.index_insert(deadline, &key)?;
            } else {
                self.below.index_remove(deadline, &key)?;
            }
        }
        if let Some(stats) = self.stats {
            self.below.set_stats(&stats)?;
        }
        Ok(())
    }
}

impl<S: BufferStore> BufferStore for Tentative<'_, S> {
    type Error = S::Error;
    fn get(&mut self, key: &BufKey) -> Result<Option<Buffered>, S::Error> {
        match self.buffers.get(key) {
            Some(row) => Ok(row.clone()),
            None => self.below.get(key),
        }
    }
    fn put(&mut self, key: &BufKey, value: Buffered) -> Result<(), S::Error> {
        self.buffers.insert(key.clone(), Some(value));
        Ok(())
    }
    fn delete(&mut self, key: &BufKey) -> Result<(), S::Error> {
        self.buffers.insert(key.clone(), None);
        Ok(())
    }
    fn index_insert(&mut self, deadline: Millis, key: &BufKey) -> Result<(), S::Error> {
        self.index.insert((deadline, key.clone()), true);
        Ok(())
    }
    fn index_remove(&mut self, deadline: Millis, key: &BufKey) -> Result<(), S::Error> {
        self.index.insert((deadline, key.clone()), false);
        Ok(())
    }
    fn due(&mut self, upto: Millis, limit: usize) -> Result<Vec<(Millis, BufKey)>, S::Error> {
        // The store below may list entries this layer removed: ask it for that many more.
        let removed = self.index.values().filter(|inserted| !**inserted).count();
        let mut due: BTreeSet<(Millis, BufKey)> = self
            .below
            .due(upto, limit.saturating_add(removed))?
            .into_iter()
            .filter(|e| self.index.get(e) != Some(&false))
            .collect();
        due.extend(self.index.iter().filter(|(e, inserted)| **inserted && e.0 <= upto).map(|(e, _)| e.clone()));
        Ok(due.into_iter().take(limit).collect())
    }
    fn stats(&mut self) -> Result<ShardStats, S::Error> {
        match self.stats {
            Some(s) => Ok(s),
            None => self.below.stats(),
        }
    }
    fn set_stats(&mut self, stats: &ShardStats) -> Result<(), S::Error> {
        self.stats = Some(*stats);
        Ok(())
    }
}

/// The result of applying an ingest batch.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct IngestResult {
    pub outcomes: Vec<PartialOutcome>,
    /// Windows the batch closed (in order); seqs are assigned by the caller.
    pub outputs: Vec<Output>,
}

/// Most windows flushed to make room for one new key under `flush_early`.
const MAX_FLUSH_PER_KEY: usize = 64;

/// The shard state machine's buffer operations.
#[derive(Debug)]
pub struct ShardBuffer;

impl ShardBuffer {
    /// Admission check for `reject` streams, done by the leader before proposing: would
    /// `new_keys` more keys of `new_bytes` fit? `retry_after_ms` is the hint for the client.
    pub fn admit(
        stats: &ShardStats,
        limits: &ShardLimits,
        new_keys: u64,
        new_bytes: u64,
        retry_after_ms: u64,
    ) -> Result<(), EventError> {
        if stats.keys.saturating_add(new_keys) > limits.max_keys {
            return Err(EventError::BufferFull { what: "keys", retry_after_ms });
        }
        if stats.bytes.saturating_add(new_bytes) > limits.max_bytes {
            return Err(EventError::BufferFull { what: "bytes", retry_after_ms });
        }
        Ok(())
    }

    /// Bytes a new key holding `partial` would account for.
    pub fn new_key_bytes(key: &BufKey, partial: &Partial) -> u64 {
        accounted_bytes(key, &partial.agg, partial.samples.as_ref())
    }

    /// Applies an ingest batch, partial by partial: admission happened before proposing, so
    /// nothing is refused, except a partial that would pass `max_bytes` under `key_overflow =
    /// "reject"` ([`PartialOutcome::KeyFull`], skipped while the others apply). The state machine
    /// applies producer groups with [`Self::apply_group`], which refuses such a group whole.
    pub fn apply_ingest<S: BufferStore>(store: &mut S, batch: &IngestBatch) -> Result<IngestResult, S::Error> {
        Self::apply_partials(store, batch.stamp, &batch.rules, &batch.limits, &batch.partials)
    }

    /// Applies one producer group of an Ingest entry as a unit: under `key_overflow =
    /// "reject"` it is applied only if none of its partials would grow its key past the
    /// window's `max_bytes` ([`GroupApplied::KeyFull`] otherwise: nothing of it is applied, not
    /// even the time seals it would have done first). The group is tried on a [`Tentative`]
    /// layer over `store` when one of its streams rejects growth, and its writes are committed
    /// only if it fits; any other group is applied straight away, as [`Self::apply_ingest`].
    pub fn apply_group<S: BufferStore>(
        store: &mut S,
        stamp: Millis,
        rules: &BTreeMap<String, StreamRules>,
        limits: &ShardLimits,
        partials: &[(BufKey, Partial)],
    ) -> Result<GroupApplied, S::Error> {
        let rejects = partials.iter().any(|(k, _)| rules.get(&k.stream).is_some_and(|r| r.growth_limit().is_some()));
        if !rejects {
            return Self::apply_partials(store, stamp, rules, limits, partials).map(GroupApplied::Applied);
        }
        let mut tentative = Tentative::new(store);
        let result = Self::apply_partials(&mut tentative, stamp, rules, limits, partials)?;
        let refused: Vec<(usize, u64)> = result
            .outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                PartialOutcome::KeyFull { retry_after_ms } => Some((i, *retry_after_ms)),
                _ => None,
            })
            .collect();
        if refused.is_empty() {
            tentative.commit()?;
            Ok(GroupApplied::Applied(result))
        } else {
            Ok(GroupApplied::KeyFull(refused))
        }
    }

    /// Applies partials in order (see [`Self::apply_ingest`]).
    pub fn apply_partials<S: BufferStore>(
        store: &mut S,
        stamp: Millis,
        rules: &BTreeMap<String, StreamRules>,
        limits: &ShardLimits,
        partials: &[(BufKey, Partial)],
    ) -> Result<IngestResult, S::Error> {
        let mut stats = store.stats()?;
        let stamp = stamp.max(stats.last_stamp);
        stats.last_stamp = stamp;
        let mut result = IngestResult::default();
        for (key, partial) in partials {
            let Some(rules) = rules.get(&key.stream) else {
                // The leader always includes the rules; an entry without them is shed, counted.
                stats.shed_inputs_total = stats.shed_inputs_total.saturating_add(partial.inputs);
                result.outcomes.push(PartialOutcome::Shed);
                continue;
            };
            let outcome =
                Self::apply_partial(store, &mut stats, stamp, rules, limits, key, partial, &mut result.outputs)?;
            result.outcomes.push(outcome);
        }
        store.set_stats(&stats)?;
        Ok(result)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_partial<S: BufferStore>(
        store: &mut S,
        stats: &mut ShardStats,
        stamp: Millis,
        rules: &StreamRules,
        limits: &ShardLimits,
        key: &BufKey,
        partial: &Partial,
        outputs: &mut Vec<Output>,
    ) -> Result<PartialOutcome, S::Error> {
        let mut existing = store.get(key)?;
        if let Some(b) = existing.take() {
            if stamp >= b.deadline {
                let end = b.deadline;
                outputs.push(Self::seal(store, stats, key, b, end, SealReason::Time)?);
            } else if !rules.op.accepts(&b.agg) {
                outputs.push(Self::seal(store, stats, key, b, stamp, SealReason::OpChanged)?);
            } else {
                existing = Some(b);
            }
        }
        // Under `key_overflow = "reject"` a key's value never passes `max_bytes`: an input that
        // would grow it further is refused, and the window stays open (no `max_bytes` seal).
        let reject_growth = rules.growth_limit();
        if reject_growth.is_some_and(|max| partial.agg.size() as u64 > max) {
            // Alone larger than a window may hold (leaders cut partials below it): never fits.
            return Ok(PartialOutcome::KeyFull { retry_after_ms: 0 });
        }
        let current = match existing {
            Some(mut b) => {
                let old_deadline = b.deadline;
                let merged = b.agg.merge(&partial.agg, &rules.op);
                if merged.is_ok()
                    && let Some(max) = reject_growth
                    && b.agg.size() as u64 > max
                {
                    // `b` is this call's copy: the stored window is as it was.
                    let retry_after_ms = b.deadline.saturating_sub(stamp).max(1);
                    return Ok(PartialOutcome::KeyFull { retry_after_ms });
                }
                if merged.is_ok() {
                    b.window.absorb(stamp, partial.inputs, partial.first_event_at, partial.last_event_at);
                    samples::merge_opt(&mut b.samples, partial.samples.as_ref(), rules.samples.as_ref());
                    stats.bytes = stats.bytes.saturating_sub(b.bytes);
                    b.bytes = accounted_bytes(key, &b.agg, b.samples.as_ref());
                    stats.bytes += b.bytes;
                    // Never before this input: an adaptive stretch that shrank since the window's
                    // last input may put the recomputed deadline in the past (then the next Seal
                    // closes it at this stamp). Other policies never move a deadline backwards.
                    b.deadline = rules.window.deadline(&b.window).max(stamp);
                    if b.deadline != old_deadline {
                        // Debounce and idle deadlines move; tumbling and max-wait ones only when an
                        // adaptive stream's stretch changed.
                        store.index_remove(old_deadline, key)?;
                        store.index_insert(b.deadline, key)?;
                    }
                    b
                } else {
                    // Overflow or bound: close this window, the input opens the next one.
                    outputs.push(Self::seal(store, stats, key, b, stamp, SealReason::Overflow)?);
                    match Self::open(store, stats, stamp, rules, limits, key, partial, outputs)? {
                        Some(b) => b,
                        None => return Ok(PartialOutcome::Shed),
                    }
                }
            }
            None => match Self::open(store, stats, stamp, rules, limits, key, partial, outputs)? {
                Some(b) => b,
                None => return Ok(PartialOutcome::Shed),
            },
        };
        // Saturating, as a window's input count is: an entry's `inputs` is u64 and unbounded, and a
        // forged one at u64::MAX overflowed here (a panic with overflow checks; found by fuzz/ `apply`).
        stats.inputs_total = stats.inputs_total.saturating_add(partial.inputs);
        let trigger = rules
            .window
            .data_trigger(current.window.inputs, current.agg.size())
            .filter(|r| reject_growth.is_none() || *r != SealReason::MaxBytes);
        if let Some(reason) = trigger {
            outputs.push(Self::seal(store, stats, key, current, stamp, reason)?);
        } else {
            store.put(key, current)?;
        }
        Ok(PartialOutcome::Applied)
    }

    /// Opens a new window for `key` (indexed and counted), making room or shedding per policy.
    #[allow(clippy::too_many_arguments)]
    fn open<S: BufferStore>(
        store: &mut S,
        stats: &mut ShardStats,
        stamp: Millis,
        rules: &StreamRules,
        limits: &ShardLimits,
        key: &BufKey,
        partial: &Partial,
        outputs: &mut Vec<Output>,
    ) -> Result<Option<Buffered>, S::Error> {
        let mut samples = None;
        samples::merge_opt(&mut samples, partial.samples.as_ref(), rules.samples.as_ref());
        let bytes = accounted_bytes(key, &partial.agg, samples.as_ref());
        let full = |s: &ShardStats| s.keys + 1 > limits.max_keys || s.bytes + bytes > limits.max_bytes;
        if full(stats) {
            match rules.overflow {
                OverflowPolicy::Reject => {} // admission already checked; limits are soft here
                OverflowPolicy::Shed => {
                    stats.shed_inputs_total = stats.shed_inputs_total.saturating_add(partial.inputs);
                    return Ok(None);
                }
                OverflowPolicy::FlushEarly => {
                    for (deadline, victim) in store.due(Millis::MAX, MAX_FLUSH_PER_KEY)? {
                        if !full(stats) {
                            break;
                        }
                        if let Some(b) = store.get(&victim)? {
                            debug_assert_eq!(b.deadline, deadline);
                            outputs.push(Self::seal(store, stats, &victim, b, stamp, SealReason::FlushEarly)?);
                            stats.flushed_early_total += 1;
                        }
                    }
                }
            }
        }
        let window =
            WindowState::open(&rules.window, stamp, partial.inputs, partial.first_event_at, partial.last_event_at);
        let b = Buffered { agg: partial.agg.clone(), window, deadline: rules.window.deadline(&window), bytes, samples };
        stats.keys += 1;
        stats.bytes += bytes;
        store.index_insert(b.deadline, key)?;
        Ok(Some(b))
    }

    /// Removes `key`'s window from the store and index and turns it into an output.
    fn seal<S: BufferStore>(
        store: &mut S,
        stats: &mut ShardStats,
        key: &BufKey,
        b: Buffered,
        window_end: Millis,
        reason: SealReason,
    ) -> Result<Output, S::Error> {
        store.delete(key)?;
        store.index_remove(b.deadline, key)?;
        stats.keys = stats.keys.saturating_sub(1);
        stats.bytes = stats.bytes.saturating_sub(b.bytes);
        stats.outputs_total += 1;
        Ok(Output {
            stream: key.stream.clone(),
            key: key.key.clone(),
            shard: 0,
            seq: 0,
            epoch: Epoch::default(),
            window_start: b.window.start,
            window_end,
            first_input_at: b.window.first_input_at,
            last_input_at: b.window.last_input_at,
            first_event_at: b.window.first_event_at,
            last_event_at: b.window.last_event_at,
            inputs: b.window.inputs,
            reason,
            value: b.agg,
            samples: b.samples,
        })
    }

    /// Closes up to `limit` windows whose deadline is at or before `stamp`, earliest first.
    /// This is the Seal command's apply; the leader proposes it from its clock.
    pub fn seal_due<S: BufferStore>(store: &mut S, stamp: Millis, limit: usize) -> Result<Vec<Output>, S::Error> {
        let mut stats = store.stats()?;
        let stamp = stamp.max(stats.last_stamp);
        stats.last_stamp = stamp;
        let mut outputs = Vec::new();
        for (deadline, key) in store.due(stamp, limit)? {
            if let Some(b) = store.get(&key)?
                && b.deadline == deadline
            {
                outputs.push(Self::seal(store, &mut stats, &key, b, deadline, SealReason::Time)?);
                continue;
            }
            // A stale index entry cannot exist if every write goes through these functions;
            // drop it rather than loop on it forever.
            store.index_remove(deadline, &key)?;
        }
        store.set_stats(&stats)?;
        Ok(outputs)
    }

    /// The earliest deadline in the index, if any: when the scheduler should next wake.
    pub fn next_deadline<S: BufferStore>(store: &mut S) -> Result<Option<Millis>, S::Error> {
        Ok(store.due(Millis::MAX, 1)?.first().map(|(d, _)| *d))
    }
}
