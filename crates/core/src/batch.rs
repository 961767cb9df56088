//! Validating a request's events and pre-merging them per key.
//!
//! The node that receives a request validates every event (stream exists, key and value within
//! limits, value fits the operator), routes it to its shard, and merges events for the same key
//! into one [`Partial`] — so a hot key costs one entry per request, not one per event. Partials
//! are grouped by producer ([`ProducerGroup`]) because deduplication works on a producer's whole
//! range of seqs in the request (see [`crate::session`]). A merge that cannot be represented
//! (overflow, bound) starts a second partial for the key instead of failing the event.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

use serde::{Deserialize, Serialize};

use crate::buffer::BufKey;
use crate::error::EventError;
use crate::hash::{ShardId, shard_for};
use crate::merge::Aggregate;
use crate::samples::{self as samples_mod, Samples, sample_salt};
use crate::session::ProducerRange;
use crate::stream::StreamTable;
use crate::time::Millis;
use crate::value::Value;

/// One event as a producer sends it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub stream: String,
    pub key: String,
    pub value: Value,
    /// Producer clock; defaults to the receiving node's clock.
    pub event_time: Option<Millis>,
    /// (producer id, producer seq) for idempotent producers.
    pub producer: Option<(u64, u64)>,
}

/// Pre-merged inputs for one key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    pub agg: Aggregate,
    pub inputs: u64,
    pub first_event_at: Millis,
    pub last_event_at: Millis,
    /// Samples of the inputs, for streams with a sample policy ([`crate::samples`]; see its
    /// "Encoding" note: this field changed the postcard encoding of Ingest entries).
    #[serde(default)]
    pub samples: Option<Samples>,
}

/// The most inputs one partial may cover. A partial holds one request's events for a key, and a
/// request is at most a few MiB, so real partials stay far below; the bound keeps the `u64`
/// input counts summed from partials (window, shard and sink totals) from overflowing on a
/// forged entry (one at `u64::MAX` overflowed the shard's total; found by fuzz/ `apply`).
pub const MAX_PARTIAL_INPUTS: u64 = 1 << 32;

impl Partial {
    /// Checks a partial as a Raft entry or a forwarding peer carries it, before it is merged
    /// under `op`: at least one input and at most [`MAX_PARTIAL_INPUTS`], ordered event times,
    /// an aggregate of `op`'s type (and parameters) with finite numbers, and bounded samples.
    pub fn check(&self, op: &crate::merge::MergeOp) -> Result<(), String> {
        if self.inputs == 0 {
            return Err("inputs must be at least 1".into());
        }
        if self.inputs > MAX_PARTIAL_INPUTS {
            return Err(format!(
                "inputs {} is more than one partial covers (at most {MAX_PARTIAL_INPUTS})",
                self.inputs
            ));
        }
        if self.first_event_at > self.last_event_at {
            return Err("first_event_at is after last_event_at".into());
        }
        if !op.accepts(&self.agg) {
            return Err(format!("a {} aggregate does not fit the stream's {} operator", self.agg.op_name(), op.name()));
        }
        self.agg.check()?;
        if let Some(s) = &self.samples {
            s.check()?;
        }
        Ok(())
    }
}

/// A producer's events in one request for one shard, pre-merged per key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProducerGroup {
    /// `None` for events without a producer id (at-least-once; never deduplicated).
    pub range: Option<ProducerRange>,
    pub partials: Vec<(BufKey, Partial)>,
    /// Positions of the events in the original request, for per-event statuses.
    pub events: Vec<u32>,
    /// The partial each of `events` merged into (its position in `partials`), for statuses
    /// that apply refuses per partial ([`crate::buffer::PartialOutcome::KeyFull`]).
    pub partial_of: Vec<u32>,
}

/// Everything one request sends to one shard.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct EventBatch {
    pub groups: Vec<ProducerGroup>,
}

impl EventBatch {
    /// Number of events covered.
    pub fn events(&self) -> usize {
        self.groups.iter().map(|g| g.events.len()).sum()
    }

    /// Number of partials (distinct keys per producer).
    pub fn partials(&self) -> usize {
        self.groups.iter().map(|g| g.partials.len()).sum()
    }
}

/// Builds per-shard batches from a request's events.
#[derive(Debug)]
pub struct BatchBuilder<'a> {
    streams: &'a StreamTable,
    shards: u32,
    now: Millis,
    max_future_skew_ms: u64,
    next_index: u32,
    batches: BTreeMap<ShardId, EventBatch>,
    /// (shard, producer) → group position in its batch.
    groups: HashMap<(ShardId, Option<u64>), usize>,
    /// (shard, group, partial, size bound) of each key's newest partial, hashed by (shard,
    /// group, stream, key); the key itself is stored once, in the partial. The bound is at
    /// least the partial's size (the sum of what merged into it), so the partial's exact size —
    /// a walk of the whole value for `append`, `set_union`, `json_merge_patch` — is computed
    /// only when the bound passes the window's `max_bytes`.
    partials: HashTable<(ShardId, usize, usize, u64)>,
    hasher: DefaultHashBuilder,
    /// Highest seq seen per producer in this request (seqs must increase).
    last_seq: HashMap<u64, u64>,
}

/// Default tolerated producer clock skew into the future.
pub const DEFAULT_MAX_FUTURE_SKEW_MS: u64 = 5 * 60 * 1000;

impl<'a> BatchBuilder<'a> {
    /// A builder for a cluster of `shards` shards, at time `now`.
    pub fn new(streams: &'a StreamTable, shards: u32, now: Millis) -> Self {
        Self {
            streams,
            shards,
            now,
            max_future_skew_ms: DEFAULT_MAX_FUTURE_SKEW_MS,
            next_index: 0,
            batches: BTreeMap::new(),
            groups: HashMap::new(),
            partials: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            last_seq: HashMap::new(),
        }
    }

    /// Sets the tolerated producer clock skew.
    pub fn max_future_skew_ms(mut self, ms: u64) -> Self {
        self.max_future_skew_ms = ms;
        self
    }

    /// Counts an event the caller refused before calling [`BatchBuilder::add`] (e.g. it could
    /// not be decoded), so that later events keep their position in the request: the indices
    /// in [`ProducerGroup::events`] are positions among all `add` and `skip` calls.
    pub fn skip(&mut self) {
        self.next_index += 1;
    }

    /// Validates `event` and merges it into its shard's batch. Returns the shard, or why the
    /// event was refused (a refused event is left out; the others are unaffected).
    pub fn add(&mut self, event: &Event) -> Result<ShardId, EventError> {
        let index = self.next_index;
        self.next_index += 1;
        let def = self
            .streams
            .get(&event.stream)
            .ok_or_else(|| EventError::UnknownStream { stream: event.stream.clone() })?;
        if event.key.is_empty() {
            return Err(EventError::EmptyKey);
        }
        if event.key.len() > def.max_key_bytes {
            return Err(EventError::KeyTooLarge { len: event.key.len(), max: def.max_key_bytes });
        }
        let size = event.value.size();
        if size > def.max_value_bytes {
            return Err(EventError::ValueTooLarge { len: size, max: def.max_value_bytes });
        }
        let event_time = event.event_time.unwrap_or(self.now);
        if event_time > self.now.saturating_add(self.max_future_skew_ms) {
            return Err(EventError::EventTimeInFuture { event_time, max_skew_ms: self.max_future_skew_ms });
        }
        let agg = def.rules.op.lift(&event.value, event_time)?;
        if let Some(max) = def.rules.growth_limit()
            && agg.size() as u64 > max
        {
            // With its operator's overhead the value alone passes what a window may hold: it
            // would be refused as `key_full` in every window.
            return Err(EventError::ValueTooLarge { len: agg.size(), max: max as usize });
        }
        if let Some((producer, seq)) = event.producer {
            let last = self.last_seq.entry(producer).or_insert(0);
            if seq <= *last {
                return Err(EventError::SequenceOverlap { producer, seq, accepted: *last });
            }
            *last = seq;
        }
        let samples = def
            .rules
            .samples
            .as_ref()
            .map(|p| Samples::of(&event.value, event_time, sample_salt(event.producer, self.now, index), p));

        let shard = shard_for(&event.stream, &event.key, self.shards);
        let batch = self.batches.entry(shard).or_default();
        let producer = event.producer.map(|(p, _)| p);
        let gi = *self.groups.entry((shard, producer)).or_insert_with(|| {
            batch.groups.push(ProducerGroup {
                range: None,
                partials: Vec::new(),
                events: Vec::new(),
                partial_of: Vec::new(),
            });
            batch.groups.len() - 1
        });
        let group = &mut batch.groups[gi];
        let hash = self.hasher.hash_one(SlotRef { shard, group: gi, stream: &event.stream, key: &event.key });
        let partials = &group.partials;
        let mut found = self.partials.find_mut(hash, |&(s, g, p, _)| {
            s == shard && g == gi && partials[p].0.stream == event.stream && partials[p].0.key == event.key
        });
        // A key's newest partial takes the event unless merging fails (a capacity or overflow)
        // or would pass the window's `max_bytes`: then the event starts a new partial of the
        // key, after the old one, and the key's slot points at it (so later events never merge
        // into an older partial, which would reorder `append` and `json_merge_patch`). Apply
        // seals a window once it reaches `max_bytes`, so a merged value stays below twice it.
        // Under `key_overflow = "reject"` a key has one partial per group and apply refuses the
        // whole group when its key is full: a second partial of the key would make the group
        // refused in every window, so the event that would pass `max_bytes` (merged exactly) is
        // refused here instead, before anything of it is recorded.
        let max_bytes = def.rules.window.max_bytes.unwrap_or(u64::MAX);
        let reject = def.rules.growth_limit().is_some();
        let size = agg.size() as u64;
        let merged = match found.as_deref_mut() {
            Some((_, _, pi, bound)) => {
                let into = *pi as u32;
                let p = &mut group.partials[*pi].1;
                if bound.saturating_add(size) > max_bytes {
                    *bound = p.agg.size() as u64;
                }
                // A DDSketch merge can outgrow its inputs (its bins span both ranges): under
                // reject its size is always taken exactly.
                let by_bound = !(reject && matches!(def.rules.op, crate::merge::MergeOp::Ddsketch { .. }));
                let fits = if by_bound && bound.saturating_add(size) <= max_bytes {
                    p.agg.merge(&agg, &def.rules.op).is_ok()
                } else if reject {
                    let mut trial = p.agg.clone();
                    match trial.merge(&agg, &def.rules.op) {
                        Ok(()) if trial.size() as u64 <= max_bytes => {
                            *bound = (trial.size() as u64).saturating_sub(size);
                            p.agg = trial;
                            true
                        }
                        Ok(()) => return Err(EventError::KeyFullInRequest { max: max_bytes }),
                        Err(_) => false,
                    }
                } else {
                    false
                };
                if fits {
                    *bound += size;
                    samples_mod::merge_opt(&mut p.samples, samples.as_ref(), def.rules.samples.as_ref());
                    p.inputs += 1;
                    p.first_event_at = p.first_event_at.min(event_time);
                    p.last_event_at = p.last_event_at.max(event_time);
                    group.partial_of.push(into);
                    true
                } else {
                    false
                }
            }
            None => false,
        };
        if let Some((producer, seq)) = event.producer {
            let range = group.range.get_or_insert(ProducerRange { producer, first_seq: seq, last_seq: seq });
            range.last_seq = seq;
        }
        group.events.push(index);
        if !merged {
            group.partial_of.push(group.partials.len() as u32);
            let key = BufKey { stream: event.stream.clone(), key: event.key.clone() };
            group.partials.push((
                key,
                Partial { agg, inputs: 1, first_event_at: event_time, last_event_at: event_time, samples },
            ));
            let slot = (shard, gi, group.partials.len() - 1, size);
            match found {
                Some(existing) => *existing = slot,
                None => {
                    // Growing the table rehashes entries from the keys held in their partials.
                    let (batches, hasher) = (&self.batches, &self.hasher);
                    self.partials.insert_unique(hash, slot, |&(s, g, p, _)| {
                        let k = &batches[&s].groups[g].partials[p].0;
                        hasher.hash_one(SlotRef { shard: s, group: g, stream: &k.stream, key: &k.key })
                    });
                }
            }
        }
        Ok(shard)
    }

    /// The per-shard batches.
    pub fn finish(self) -> BTreeMap<ShardId, EventBatch> {
        self.batches
    }
}

/// What a partial slot is hashed by; borrowed, so lookups allocate nothing.
#[derive(Debug)]
struct SlotRef<'a> {
    shard: ShardId,
    group: usize,
    stream: &'a str,
    key: &'a str,
}

impl Hash for SlotRef<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.shard.hash(h);
        self.group.hash(h);
        self.stream.hash(h);
        self.key.hash(h);
    }
}
