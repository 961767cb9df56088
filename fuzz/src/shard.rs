//! A shard's state machine over the in-memory [`MemStore`], applying [`Command`]s the way
//! `coalesce_raft::state_machine` applies them to RocksDB (producer dedupe, then
//! [`ShardBuffer::apply_ingest`] / [`ShardBuffer::seal_due`]), with a ledger that checks the
//! design's invariants after every entry.
//!
//! What is checked (each a panic with a message, so libFuzzer reports it as a crash):
//! - the buffer's own accounting: the deadline index holds exactly one entry per buffered key, at
//!   its deadline; `stats.keys` and `stats.bytes` are the count and the sum of the accounted bytes
//!   of the buffered windows, each of which is what `accounted_bytes` would compute;
//! - every buffered window and every output is well formed: inputs ≥ 1, `window_start ≤
//!   first_input_at ≤ last_input_at ≤ deadline / window_end`, event times ordered, aggregate
//!   finite and of a decodable shape, and it survives postcard (what RocksDB, the outbox and a
//!   snapshot store) byte for byte;
//! - time: the shard clock never goes backwards; a time-sealed output is never emitted before
//!   its deadline; a Seal that closed fewer windows than it could leaves none due;
//! - per key, outputs come in input order (a window never holds inputs stamped before the
//!   previous window's last input), and nothing is lost or doubled: inputs, `sum_i64` sums and
//!   `count` counts of applied partials == emitted + still buffered (design invariant 1); a
//!   producer group refused as `key_full` changed nothing (not even a time seal), and under
//!   `key_overflow = "reject"` a key that took an input holds at most the window's `max_bytes`;
//! - determinism and snapshots: a second replica that applies the same entries — and is rebuilt
//!   from a postcard snapshot of the first every few entries — holds equal state and emits equal
//!   outputs.

use std::collections::{BTreeMap, BTreeSet};

use coalesce_core::buffer::{
    BufKey, Buffered, GroupApplied, KEY_OVERHEAD_BYTES, MemStore, PartialOutcome, ShardBuffer,
};
use coalesce_core::merge::Aggregate;
use coalesce_core::output::Output;
use coalesce_core::session::{ProducerSessions, SeqCheck};
use coalesce_core::time::Millis;
use coalesce_core::window::SealReason;

use crate::entry::Command;
use crate::roundtrip;

/// How often (in leader time) expired producer sessions are swept
/// (`coalesce_raft::state_machine::SESSION_SWEEP_INTERVAL_MS`).
const SESSION_SWEEP_INTERVAL_MS: u64 = 60_000;

/// What went in per key, to compare with what came out.
#[derive(Clone, Debug, Default, PartialEq)]
struct Ledger {
    inputs: u128,
    sum_i64: i128,
    count: u128,
}

impl Ledger {
    fn add(&mut self, agg: &Aggregate, inputs: u64) {
        self.inputs += u128::from(inputs);
        match agg {
            Aggregate::SumI64(v) => self.sum_i64 += i128::from(*v),
            Aggregate::Count(c) => self.count += u128::from(*c),
            _ => {}
        }
    }
}

/// The partials an Ingest applied: key, aggregate, inputs and what became of them.
type Applied = Vec<(BufKey, Aggregate, u64, PartialOutcome)>;

/// The replicated state of one shard as far as the core holds it.
#[derive(Clone, Debug, Default)]
struct Replica {
    store: MemStore,
    sessions: ProducerSessions,
    next_session_sweep: u64,
}

impl Replica {
    /// Applies one valid command as `ShardStateMachine::apply_entry` does; returns the outputs
    /// and, for an Ingest, the partials that were applied with their outcomes.
    fn apply(&mut self, cmd: &Command) -> (Vec<Output>, Applied) {
        match cmd {
            Command::Ingest { stamp, rules, limits, groups } => {
                // As the state machine: the clock moves to the stamp, then group by group, a
                // group's session recorded only if it is applied (a `key_full` group is not).
                let Ok(clock) = ShardBuffer::apply_partials(&mut self.store, *stamp, rules, limits, &[]);
                assert!(clock.outputs.is_empty() && clock.outcomes.is_empty());
                let (mut outputs, mut applied) = (Vec::new(), Vec::new());
                for g in groups {
                    let verdict = g.range.as_ref().map_or(SeqCheck::New, |r| self.sessions.check(r));
                    if verdict != SeqCheck::New {
                        continue;
                    }
                    // Only a group of a growth-limited stream can be refused: snapshot those alone.
                    let limited = g
                        .partials
                        .iter()
                        .any(|(k, _)| rules.get(&k.stream).is_some_and(|r| r.growth_limit().is_some()));
                    let before = limited.then(|| self.snapshot());
                    let Ok(result) = ShardBuffer::apply_group(&mut self.store, *stamp, rules, limits, &g.partials);
                    match result {
                        GroupApplied::Applied(result) => {
                            assert_eq!(result.outcomes.len(), g.partials.len(), "one outcome per partial");
                            assert!(
                                !result.outcomes.iter().any(|o| matches!(o, PartialOutcome::KeyFull { .. })),
                                "an applied group has no refused partial"
                            );
                            if let Some(r) = &g.range {
                                self.sessions.record(r, *stamp);
                            }
                            outputs.extend(result.outputs);
                            applied.extend(
                                g.partials
                                    .iter()
                                    .zip(result.outcomes)
                                    .map(|((k, p), o)| (k.clone(), p.agg.clone(), p.inputs, o)),
                            );
                        }
                        GroupApplied::KeyFull(refused) => {
                            assert!(!refused.is_empty(), "a refused group names a full key");
                            assert!(before == Some(self.snapshot()), "a refused group changes nothing");
                        }
                    }
                }
                (outputs, applied)
            }
            Command::Seal { stamp, max, session_ttl_ms } => {
                let Ok(outputs) = ShardBuffer::seal_due(&mut self.store, *stamp, *max as usize);
                if *stamp >= self.next_session_sweep {
                    self.sessions.expire(*stamp, *session_ttl_ms, usize::MAX);
                    self.next_session_sweep = stamp.saturating_add(SESSION_SWEEP_INTERVAL_MS);
                }
                (outputs, Vec::new())
            }
            // Outbox cursors and trimming, dead letters and the preferred leader live in the
            // raft crate's state; nothing of the core's changes.
            Command::Ack { .. }
            | Command::DeadLetter { .. }
            | Command::DlqRemove { .. }
            | Command::SetPreferredLeader { .. }
            | Command::DropCursor { .. }
            | Command::Trim { .. } => (Vec::new(), Vec::new()),
        }
    }

    /// The replica's state as a snapshot carries it: postcard of its rows in key order. Two
    /// replicas are equal when these bytes are (`PartialEq` would call a NaN that a forged
    /// sample carries unequal to itself).
    fn snapshot(&self) -> Vec<u8> {
        let mut rows: Vec<(&BufKey, &Buffered)> = self.store.buffers.iter().collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        postcard::to_allocvec(&(&rows, &self.store.index, &self.store.stats, &self.sessions, self.next_session_sweep))
            .expect("a shard's state encodes")
    }

    /// The replica rebuilt from its [`Replica::snapshot`].
    fn through_snapshot(&self) -> Replica {
        let bytes = self.snapshot();
        type Rows = (
            Vec<(BufKey, Buffered)>,
            BTreeSet<(Millis, BufKey)>,
            coalesce_core::buffer::ShardStats,
            ProducerSessions,
            u64,
        );
        let (rows, index, stats, sessions, next_session_sweep): Rows =
            postcard::from_bytes(&bytes).expect("a shard's state decodes from its snapshot");
        Replica { store: MemStore { buffers: rows.into_iter().collect(), index, stats }, sessions, next_session_sweep }
    }
}

/// A shard: the replica under test, a second replica that must stay identical, and the ledger.
#[derive(Debug, Default)]
pub struct Shard {
    a: Replica,
    b: Replica,
    applied: u64,
    fed: BTreeMap<BufKey, Ledger>,
    emitted: BTreeMap<BufKey, Ledger>,
    /// (first, last) input stamps of the last output of each key.
    last_output: BTreeMap<BufKey, (Millis, Millis)>,
    /// Totals the stats must match.
    inputs_total: u128,
    shed_total: u128,
    outputs_total: u128,
}

/// Rebuild the second replica from a snapshot of the first every this many entries.
const SNAPSHOT_EVERY: u64 = 3;

impl Shard {
    /// Applies a command that passed [`Command::validate`] and checks every invariant.
    /// Returns the outputs (seqs and epochs are the raft crate's business, left at zero).
    pub fn apply(&mut self, cmd: &Command) -> Vec<Output> {
        let before = self.a.store.stats;
        let (outputs, applied) = self.a.apply(cmd);
        let (outputs_b, _) = self.b.apply(cmd);
        let bytes = |o: &[Output]| postcard::to_allocvec(o).expect("outputs encode");
        assert!(bytes(&outputs) == bytes(&outputs_b), "two replicas applying the same entry emit the same outputs");
        assert!(self.a.snapshot() == self.b.snapshot(), "two replicas applying the same entry hold the same state");

        let stats = self.a.store.stats;
        let stamp = match cmd {
            Command::Ingest { stamp, .. } | Command::Seal { stamp, .. } => (*stamp).max(before.last_stamp),
            _ => before.last_stamp,
        };
        assert_eq!(stats.last_stamp, stamp, "the shard clock is the latest stamp applied, never going back");

        for (key, agg, inputs, outcome) in &applied {
            match outcome {
                PartialOutcome::Applied => {
                    self.fed.entry(key.clone()).or_default().add(agg, *inputs);
                    self.inputs_total += u128::from(*inputs);
                }
                PartialOutcome::Shed => self.shed_total += u128::from(*inputs),
                PartialOutcome::KeyFull { .. } => unreachable!("asserted above"),
            }
        }
        if let Command::Ingest { rules, .. } = cmd {
            // Under `key_overflow = "reject"` a key that took an input holds at most `max_bytes`.
            for (key, _, _, outcome) in &applied {
                let Some(r) = rules.get(&key.stream) else { continue };
                let (Some(max), PartialOutcome::Applied) = (r.growth_limit(), outcome) else {
                    continue;
                };
                if let Some(b) = self.a.store.buffers.get(key) {
                    assert!(
                        b.agg.size() as u64 <= max,
                        "key {key:?} grew to {} bytes past max_bytes {max}",
                        b.agg.size()
                    );
                }
            }
        }
        for o in &outputs {
            self.check_output(o, cmd, stamp);
        }
        if let Command::Seal { max, .. } = cmd
            && outputs.len() < *max as usize
        {
            let due = self.a.store.index.first().is_some_and(|(d, _)| *d <= stamp);
            assert!(!due, "a Seal that closed {} of at most {max} windows left a window due", outputs.len());
        }
        self.check_store();
        self.applied += 1;
        if self.applied.is_multiple_of(SNAPSHOT_EVERY) {
            self.b = self.a.through_snapshot();
            assert!(self.a.snapshot() == self.b.snapshot(), "a replica rebuilt from a snapshot holds the same state");
        }
        outputs
    }

    fn check_output(&mut self, o: &Output, cmd: &Command, stamp: Millis) {
        self.outputs_total += 1;
        assert!(o.inputs >= 1, "an output covers at least one input: {o:?}");
        assert!(
            o.window_start <= o.first_input_at
                && o.first_input_at <= o.last_input_at
                && o.last_input_at <= o.window_end
                && o.window_end <= stamp,
            "output window bounds out of order (sealed at {stamp}): {o:?}"
        );
        assert!(o.first_event_at <= o.last_event_at, "output event times out of order: {o:?}");
        match (cmd, o.reason) {
            (Command::Seal { .. }, SealReason::Time) | (Command::Ingest { .. }, _) => {}
            (_, reason) => panic!("a {reason:?} output from {cmd:?}"),
        }
        if o.reason != SealReason::Time {
            assert_eq!(o.window_end, stamp, "a window closed by data or overflow ends at the closing stamp");
        }
        o.value.check().unwrap_or_else(|e| panic!("an output's aggregate is invalid: {e}: {o:?}"));
        if let Some(s) = &o.samples {
            s.check().unwrap_or_else(|e| panic!("an output's samples are invalid: {e}"));
        }
        roundtrip::must_roundtrip(o, "output");
        let _ = o.to_json();

        let key = BufKey { stream: o.stream.clone(), key: o.key.clone() };
        if let Some((_, prev_last)) = self.last_output.get(&key) {
            assert!(
                *prev_last <= o.first_input_at,
                "key {key:?}: a window with inputs from {} follows one with inputs up to {prev_last}",
                o.first_input_at
            );
        }
        self.last_output.insert(key.clone(), (o.first_input_at, o.last_input_at));
        self.emitted.entry(key).or_default().add(&o.value, o.inputs);
    }

    fn check_store(&self) {
        let store = &self.a.store;
        let stats = store.stats;
        assert_eq!(stats.keys, store.buffers.len() as u64, "stats.keys counts the buffered keys");
        assert_eq!(store.index.len(), store.buffers.len(), "one deadline-index entry per buffered key");
        let mut bytes = 0u64;
        for (key, b) in &store.buffers {
            assert!(store.index.contains(&(b.deadline, key.clone())), "key {key:?} is indexed at its deadline");
            let samples = b.samples.as_ref().map_or(0, |s| s.size());
            let accounted = (key.stream.len() + key.key.len() + b.agg.size() + samples) as u64 + KEY_OVERHEAD_BYTES;
            assert_eq!(b.bytes, accounted, "key {key:?}: accounted bytes");
            bytes += b.bytes;
            let w = &b.window;
            assert!(w.inputs >= 1, "key {key:?}: an open window holds an input");
            assert!(
                w.start <= w.first_input_at && w.first_input_at <= w.last_input_at && w.last_input_at <= b.deadline,
                "key {key:?}: window bounds out of order: {b:?}"
            );
            assert!(w.last_input_at <= stats.last_stamp, "key {key:?}: an input stamped after the shard clock");
            assert!(w.first_event_at <= w.last_event_at, "key {key:?}: event times out of order");
            if let Some((_, prev_last)) = self.last_output.get(key) {
                assert!(*prev_last <= w.first_input_at, "key {key:?}: the open window overlaps the last output");
            }
            b.agg.check().unwrap_or_else(|e| panic!("key {key:?}: buffered aggregate is invalid: {e}"));
            roundtrip::must_roundtrip(b, "buffered window");
        }
        assert_eq!(stats.bytes, bytes, "stats.bytes sums the accounted bytes");

        // Conservation, per key: fed == emitted + buffered.
        let keys: BTreeSet<&BufKey> = self.fed.keys().chain(self.emitted.keys()).collect();
        for key in keys {
            let mut out = self.emitted.get(key).cloned().unwrap_or_default();
            if let Some(b) = store.buffers.get(key) {
                out.add(&b.agg, b.window.inputs);
            }
            let fed = self.fed.get(key).cloned().unwrap_or_default();
            assert_eq!(fed, out, "key {key:?}: what was applied differs from what was emitted plus what is buffered");
        }
        assert_eq!(u128::from(stats.inputs_total), self.inputs_total, "stats.inputs_total");
        assert_eq!(u128::from(stats.shed_inputs_total), self.shed_total, "stats.shed_inputs_total");
        assert_eq!(u128::from(stats.outputs_total), self.outputs_total, "stats.outputs_total");
    }

    /// Seals everything left with a Seal at the latest allowed stamp, repeated until nothing
    /// more is due, and checks that only windows whose deadline lies past [`MAX_STAMP`] (opened
    /// within the longest window of it) stay open — everything else was emitted.
    ///
    /// [`MAX_STAMP`]: coalesce_core::time::MAX_STAMP
    pub fn drain(&mut self) {
        let end = coalesce_core::time::MAX_STAMP;
        while self.a.store.index.first().is_some_and(|(d, _)| *d <= end) {
            self.apply(&Command::Seal { stamp: end, max: crate::entry::MAX_SEAL, session_ttl_ms: 1_000 });
        }
        for (key, b) in &self.a.store.buffers {
            assert!(b.deadline > end, "key {key:?}: a window due at {} outlived a Seal at {end}", b.deadline);
        }
    }
}
