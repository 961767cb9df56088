//! Window policies and buffers against an independent per-key model.
//!
//! A driver feeds random events into a [`ShardBuffer`] over a [`MemStore`], calling `seal_due`
//! every `tick` ms as a leader's scheduler would. The model replays the same timeline per key
//! with no store and no index. They must agree on every output, and every output must respect
//! the policy: never before its deadline, never later than the staleness bound (plus one tick).

use std::collections::BTreeMap;

use coalesce_core::batch::Partial;
use coalesce_core::buffer::{BufKey, BufferStore, GroupApplied, IngestBatch, MemStore, PartialOutcome, ShardBuffer};
use coalesce_core::merge::{Aggregate, Member, MergeOp};
use coalesce_core::output::Output;
use coalesce_core::stream::{KeyOverflow, OverflowPolicy, ShardLimits, StreamRules};
use coalesce_core::window::{SealReason, WindowPolicy};
use proptest::prelude::*;

const STREAM: &str = "s";

fn policy() -> impl Strategy<Value = WindowPolicy> {
    (
        prop::option::of(20u64..400),
        prop::option::of(20u64..400),
        prop::option::of(5u64..200),
        prop::option::of(5u64..200),
        prop::option::of(1u64..8),
    )
        .prop_map(|(tumbling, max_wait, debounce, idle, max_count)| {
            let mut p = WindowPolicy {
                tumbling_ms: tumbling,
                max_wait_ms: max_wait,
                idle_ms: idle,
                max_count,
                ..Default::default()
            };
            if p.tumbling_ms.is_none() && p.max_wait_ms.is_none() {
                p.max_wait_ms = Some(150);
            }
            // debounce only with max_wait, and never longer than it (as config validation demands)
            if let (Some(d), Some(m)) = (debounce, p.max_wait_ms) {
                p.debounce_ms = Some(d.min(m));
            }
            p
        })
}

fn rules(window: WindowPolicy) -> BTreeMap<String, StreamRules> {
    BTreeMap::from([(
        STREAM.to_owned(),
        StreamRules {
            op: MergeOp::SumI64,
            window,
            overflow: OverflowPolicy::Reject,
            samples: None,
            key_overflow: KeyOverflow::FlushEarly,
        },
    )])
}

fn key(k: u8) -> BufKey {
    BufKey { stream: STREAM.into(), key: format!("k{k}") }
}

fn partial(v: i64) -> Partial {
    Partial { agg: Aggregate::SumI64(v), inputs: 1, first_event_at: 0, last_event_at: 0, samples: None }
}

/// (key, first input, last input, inputs, sum, window end, sealed at)
type Win = (String, u64, u64, u64, i64, u64, u64);

struct Driver {
    store: MemStore,
    rules: BTreeMap<String, StreamRules>,
    tick: u64,
    next_tick: u64,
    outputs: Vec<(Output, u64)>,
}

impl Driver {
    fn ticks_until(&mut self, t: u64) {
        while self.next_tick <= t {
            let at = self.next_tick;
            for o in ShardBuffer::seal_due(&mut self.store, at, usize::MAX).unwrap() {
                self.outputs.push((o, at));
            }
            self.next_tick += self.tick;
        }
    }

    fn ingest(&mut self, t: u64, k: u8, v: i64) {
        self.ticks_until(t);
        let batch = IngestBatch {
            stamp: t,
            rules: self.rules.clone(),
            limits: ShardLimits::default(),
            partials: vec![(key(k), partial(v))],
        };
        for o in ShardBuffer::apply_ingest(&mut self.store, &batch).unwrap().outputs {
            self.outputs.push((o, t));
        }
    }
}

fn deadline(p: &WindowPolicy, start: u64, first: u64, last: u64) -> u64 {
    let mut d = u64::MAX;
    if let Some(t) = p.tumbling_ms {
        d = d.min(start + t);
    }
    if let Some(m) = p.max_wait_ms {
        d = d.min(first + m);
    }
    if let Some(x) = p.debounce_ms {
        d = d.min(last + x);
    }
    if let Some(i) = p.idle_ms {
        d = d.min(last + i);
    }
    d
}

/// The model: per key, walk the events and the ticks in time order.
fn model(p: &WindowPolicy, events: &[(u64, u8, i64)], tick: u64) -> Vec<Win> {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<u8> = events.iter().map(|e| e.1).collect();
    for k in keys {
        let mine: Vec<(u64, i64)> = events.iter().filter(|e| e.1 == k).map(|e| (e.0, e.2)).collect();
        // open window: (start, first, last, count, sum)
        let mut open: Option<(u64, u64, u64, u64, i64)> = None;
        let close = |w: (u64, u64, u64, u64, i64), end_at: u64, at: u64, out: &mut Vec<Win>| {
            out.push((format!("k{k}"), w.1, w.2, w.3, w.4, end_at, at));
        };
        let mut next_tick = tick;
        for &(t, v) in &mine {
            // The scheduler's ticks up to and including this event's time come first.
            while next_tick <= t {
                if let Some(w) = open {
                    let d = deadline(p, w.0, w.1, w.2);
                    if next_tick >= d {
                        close(w, d, next_tick, &mut out);
                        open = None;
                    }
                }
                next_tick += tick;
            }
            if let Some(w) = open {
                let d = deadline(p, w.0, w.1, w.2);
                if t >= d {
                    close(w, d, t, &mut out);
                    open = None;
                }
            }
            let w = match open {
                None => {
                    let start = p.tumbling_ms.map_or(t, |tm| t - t % tm);
                    (start, t, t, 1, v)
                }
                Some((s, f, _, c, sum)) => (s, f, t, c + 1, sum + v),
            };
            if p.max_count.is_some_and(|m| w.3 >= m) {
                close(w, t, t, &mut out);
                open = None;
            } else {
                open = Some(w);
            }
        }
        // No more input: the first tick at or after the deadline closes the window.
        if let Some(w) = open.take() {
            let d = deadline(p, w.0, w.1, w.2);
            let at = next_tick.max(d.div_ceil(tick) * tick);
            close(w, d, at, &mut out);
        }
        assert!(open.is_none(), "model left a window open");
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn buffer_matches_model_and_respects_policy(
        p in policy(),
        raw in prop::collection::vec((0u64..60, 0u8..5, -100i64..100), 1..120),
        tick in prop::sample::select(vec![1u64, 7, 25]),
    ) {
        let mut t = 1_000;
        let events: Vec<(u64, u8, i64)> = raw.iter().map(|&(dt, k, v)| { t += dt; (t, k, v) }).collect();
        let end = t + 8 * 24 * 3600 * 1000; // far enough to close everything
        let mut d = Driver { store: MemStore::default(), rules: rules(p), tick, next_tick: tick, outputs: Vec::new() };
        for &(t, k, v) in &events {
            d.ingest(t, k, v);
        }
        // Jump the scheduler to the end instead of ticking through days.
        let last_tick = end - end % tick;
        d.next_tick = d.next_tick.max(t + 1);
        d.ticks_until(t + 1000 + tick);
        for (o, at) in ShardBuffer::seal_due(&mut d.store, last_tick, usize::MAX).unwrap().into_iter().map(|o| (o, last_tick)) {
            d.outputs.push((o, at));
        }
        prop_assert!(d.store.buffers.is_empty() && d.store.index.is_empty());
        prop_assert_eq!(d.store.stats.keys, 0);

        let bound = p.staleness_bound_ms();
        for (o, at) in &d.outputs {
            let Aggregate::SumI64(_) = o.value else { panic!("wrong aggregate") };
            // never before the policy allows
            match o.reason {
                SealReason::Time => prop_assert!(o.window_end <= *at, "sealed at {} before deadline {}", at, o.window_end),
                SealReason::MaxCount => prop_assert!(p.max_count.is_some_and(|m| o.inputs >= m)),
                other => prop_assert!(false, "unexpected reason {:?}", other),
            }
            // staleness bound (the final far-future sweep is excluded: it models a stopped clock)
            if *at < last_tick {
                prop_assert!(at - o.first_input_at <= bound + tick, "staleness {} > {} + {}", at - o.first_input_at, bound, tick);
            }
        }

        // Outputs == the model's windows, exactly. Ticks after the last event are folded into the
        // far-future sweep for the buffer, so compare windows without their seal time there.
        let mut got: Vec<Win> = d.outputs.iter().map(|(o, at)| {
            let Aggregate::SumI64(s) = o.value else { unreachable!() };
            (o.key.clone(), o.first_input_at, o.last_input_at, o.inputs, s, o.window_end, *at)
        }).collect();
        got.sort();
        let mut want = model(&p, &events, tick);
        let strip = |w: &mut Vec<Win>| for x in w.iter_mut() { if x.6 > t + 1000 { x.6 = 0; } };
        strip(&mut got);
        strip(&mut want);
        want.sort();
        got.sort();
        prop_assert_eq!(&got, &want);

        // Conservation: Σ per key of outputs == Σ of inputs.
        let mut sums: BTreeMap<String, (i64, u64)> = BTreeMap::new();
        for w in &got { let e = sums.entry(w.0.clone()).or_default(); e.0 += w.4; e.1 += w.3; }
        let mut expect: BTreeMap<String, (i64, u64)> = BTreeMap::new();
        for &(_, k, v) in &events { let e = expect.entry(format!("k{k}")).or_default(); e.0 += v; e.1 += 1; }
        prop_assert_eq!(sums, expect);
    }

    /// Pure tumbling windows: one output per distinct (key, aligned window) with input.
    #[test]
    fn tumbling_outputs_are_distinct_key_window_pairs(
        interval in 10u64..300,
        raw in prop::collection::vec((0u64..80, 0u8..6), 1..150),
    ) {
        let p = WindowPolicy { tumbling_ms: Some(interval), ..Default::default() };
        let mut d = Driver { store: MemStore::default(), rules: rules(p), tick: 5, next_tick: 5, outputs: Vec::new() };
        let mut t = 0;
        let mut pairs = std::collections::BTreeSet::new();
        for (dt, k) in raw {
            t += dt;
            d.ingest(t, k, 1);
            pairs.insert((format!("k{k}"), t - t % interval));
        }
        d.ticks_until(t + interval + 5);
        let got: Vec<(String, u64)> = d.outputs.iter().map(|(o, _)| (o.key.clone(), o.window_start)).collect();
        prop_assert_eq!(got.len(), pairs.len(), "one output per (key, window)");
        prop_assert_eq!(got.into_iter().collect::<std::collections::BTreeSet<_>>(), pairs);
        for (o, at) in &d.outputs {
            prop_assert_eq!(o.window_end, o.window_start + interval);
            prop_assert!(*at >= o.window_end);
        }
    }
}

#[test]
fn steady_traffic_still_flushes_at_max_wait() {
    // Debounce 100ms, max-wait 1s, an input every 50ms for 5s: the debounce never fires, so
    // max-wait must close a window every second (the failure Vector's reduce had).
    let p = WindowPolicy { debounce_ms: Some(100), max_wait_ms: Some(1000), ..Default::default() };
    let mut d = Driver { store: MemStore::default(), rules: rules(p), tick: 10, next_tick: 10, outputs: Vec::new() };
    for i in 0..100 {
        d.ingest(i * 50, 1, 1);
    }
    let closed: Vec<u64> = d.outputs.iter().map(|(o, _)| o.window_end).collect();
    assert_eq!(closed, vec![1000, 2000, 3000, 4000], "max-wait closes the window on time");
    // With no new input, the scheduler still closes the last window at max-wait...
    d.ticks_until(5_200);
    let last = &d.outputs.last().unwrap().0;
    assert_eq!((last.window_end, last.inputs), (5000, 20));
    assert_eq!(d.outputs.iter().map(|(o, _)| o.inputs).sum::<u64>(), 100);
    // ...and an idle key closes at its debounce, on the wall clock, with nothing else arriving.
    d.ingest(10_000, 2, 1);
    d.ticks_until(10_090);
    assert_eq!(d.outputs.len(), 5);
    d.ticks_until(10_100);
    let (o, at) = d.outputs.last().unwrap();
    assert_eq!((o.key.as_str(), o.window_end, *at), ("k2", 10_100, 10_100));
}

#[test]
fn overflow_closes_the_window_and_keeps_the_sum_exact() {
    let p = WindowPolicy { tumbling_ms: Some(1000), ..Default::default() };
    let mut d = Driver { store: MemStore::default(), rules: rules(p), tick: 10, next_tick: 10, outputs: Vec::new() };
    d.ingest(1, 1, i64::MAX - 5);
    d.ingest(2, 1, 10);
    d.ingest(3, 1, -3);
    d.ticks_until(2000);
    let got: Vec<(SealReason, i64, u64)> = d
        .outputs
        .iter()
        .map(|(o, _)| {
            let Aggregate::SumI64(s) = o.value else { unreachable!() };
            (o.reason, s, o.inputs)
        })
        .collect();
    assert_eq!(got, vec![(SealReason::Overflow, i64::MAX - 5, 1), (SealReason::Time, 7, 2)]);
}

fn limited(overflow: OverflowPolicy, max_keys: u64) -> (MemStore, BTreeMap<String, StreamRules>, ShardLimits) {
    let window = WindowPolicy { max_wait_ms: Some(1000), ..Default::default() };
    let rules = BTreeMap::from([(
        STREAM.to_owned(),
        StreamRules { op: MergeOp::SumI64, window, overflow, samples: None, key_overflow: KeyOverflow::FlushEarly },
    )]);
    (MemStore::default(), rules, ShardLimits { max_keys, max_bytes: 1 << 30 })
}

#[test]
fn shed_policy_drops_new_keys_and_counts_them() {
    let (mut store, rules, limits) = limited(OverflowPolicy::Shed, 3);
    for k in 0..5u8 {
        let b = IngestBatch {
            stamp: 10 + u64::from(k),
            rules: rules.clone(),
            limits,
            partials: vec![(key(k), partial(1))],
        };
        ShardBuffer::apply_ingest(&mut store, &b).unwrap();
    }
    // Existing keys still merge.
    let b = IngestBatch { stamp: 20, rules: rules.clone(), limits, partials: vec![(key(0), partial(1))] };
    ShardBuffer::apply_ingest(&mut store, &b).unwrap();
    assert_eq!(store.stats.keys, 3);
    assert_eq!(store.stats.shed_inputs_total, 2);
    assert_eq!(store.stats.inputs_total, 4);
}

#[test]
fn flush_early_policy_seals_the_earliest_windows() {
    let (mut store, rules, limits) = limited(OverflowPolicy::FlushEarly, 3);
    let mut outputs = Vec::new();
    for k in 0..5u8 {
        let b = IngestBatch {
            stamp: 10 + u64::from(k),
            rules: rules.clone(),
            limits,
            partials: vec![(key(k), partial(1))],
        };
        outputs.extend(ShardBuffer::apply_ingest(&mut store, &b).unwrap().outputs);
    }
    assert_eq!(store.stats.keys, 3);
    assert_eq!(
        outputs.iter().map(|o| (o.key.as_str(), o.reason)).collect::<Vec<_>>(),
        vec![("k0", SealReason::FlushEarly), ("k1", SealReason::FlushEarly)]
    );
    assert_eq!(store.stats.flushed_early_total, 2);
}

#[test]
fn reject_policy_is_enforced_by_admission() {
    let (store, _, limits) = limited(OverflowPolicy::Reject, 3);
    let mut stats = store.stats;
    assert!(ShardBuffer::admit(&stats, &limits, 3, 100, 250).is_ok());
    stats.keys = 2;
    let e = ShardBuffer::admit(&stats, &limits, 2, 100, 250).unwrap_err();
    assert_eq!(e.to_string(), "shard buffer is full (keys); retry after 250 ms");
    assert_eq!(e.code(), "buffer_full");
}

#[test]
fn replicas_applying_the_same_entries_hold_identical_bytes() {
    let p = WindowPolicy { tumbling_ms: Some(100), max_count: Some(3), ..Default::default() };
    let entries: Vec<IngestBatch> = (0..200u64)
        .map(|i| IngestBatch {
            stamp: i * 7,
            rules: rules(p),
            limits: ShardLimits::default(),
            partials: vec![(key((i % 7) as u8), partial(i as i64))],
        })
        .collect();
    let run = || {
        let mut s = MemStore::default();
        let mut outs = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            outs.extend(ShardBuffer::apply_ingest(&mut s, e).unwrap().outputs);
            if i % 10 == 0 {
                outs.extend(ShardBuffer::seal_due(&mut s, e.stamp, 100).unwrap());
            }
        }
        let sorted: BTreeMap<_, _> = s.buffers.iter().collect();
        let bytes: Vec<Vec<u8>> = sorted.iter().map(|kv| postcard::to_allocvec(&kv).unwrap()).collect();
        (bytes, postcard::to_allocvec(&outs).unwrap(), s.stats)
    };
    assert_eq!(run(), run());
}

/// A set of `members` strings of 10 bytes (14 bytes each as the set counts them).
fn members(from: u32, to: u32) -> Partial {
    let set = (from..to).map(|i| Member::Str(format!("member{i:04}"))).collect();
    Partial { agg: Aggregate::SetUnion(set), inputs: 1, first_event_at: 0, last_event_at: 0, samples: None }
}

fn set_rules(key_overflow: KeyOverflow) -> BTreeMap<String, StreamRules> {
    let window = WindowPolicy { tumbling_ms: Some(1_000), max_bytes: Some(8 + 14 * 10), ..Default::default() };
    let op = MergeOp::SetUnion { max_members: 1_000 };
    BTreeMap::from([(
        STREAM.to_owned(),
        StreamRules { op, window, overflow: OverflowPolicy::Reject, samples: None, key_overflow },
    )])
}

#[test]
fn key_overflow_reject_refuses_growth_past_max_bytes_and_keeps_the_window_open() {
    let rules = set_rules(KeyOverflow::Reject);
    let limits = ShardLimits::default();
    let mut store = MemStore::default();
    let apply = |store: &mut MemStore, stamp: u64, p: Partial| {
        let b = IngestBatch { stamp, rules: rules.clone(), limits, partials: vec![(key(0), p)] };
        ShardBuffer::apply_ingest(store, &b).unwrap()
    };
    // 8 members, then 2 more: exactly max_bytes, and the window stays open.
    assert_eq!(apply(&mut store, 100, members(0, 8)).outcomes, [PartialOutcome::Applied]);
    let r = apply(&mut store, 200, members(8, 10));
    assert_eq!((r.outcomes.as_slice(), r.outputs.len()), ([PartialOutcome::Applied].as_slice(), 0));
    // One more member would pass it: refused, with the wait until the window ends (1,000).
    let r = apply(&mut store, 300, members(10, 11));
    assert_eq!(r.outcomes, [PartialOutcome::KeyFull { retry_after_ms: 700 }]);
    assert!(r.outputs.is_empty());
    // Members it already holds do not grow it (the size bound alone would have refused them).
    assert_eq!(apply(&mut store, 400, members(0, 10)).outcomes, [PartialOutcome::Applied]);
    // A partial that alone passes max_bytes never fits.
    assert_eq!(apply(&mut store, 500, members(100, 120)).outcomes, [PartialOutcome::KeyFull { retry_after_ms: 0 }]);
    let b = store.get(&key(0)).unwrap().unwrap();
    assert_eq!(b.window.inputs, 3, "only the applied partials are counted");
    assert_eq!(b.agg, members(0, 10).agg);
    assert_eq!(store.stats.inputs_total, 3);
    // After the window closes the key takes input again.
    let r = apply(&mut store, 1_000, members(10, 11));
    assert_eq!(r.outcomes, [PartialOutcome::Applied]);
    assert_eq!(r.outputs.len(), 1);
    assert_eq!((r.outputs[0].reason, r.outputs[0].inputs), (SealReason::Time, 3));
}

#[test]
fn key_overflow_flush_early_seals_at_max_bytes_instead() {
    let rules = set_rules(KeyOverflow::FlushEarly);
    let mut store = MemStore::default();
    let mut outputs = Vec::new();
    for (stamp, p) in [(100, members(0, 8)), (200, members(8, 10)), (300, members(10, 11))] {
        let b =
            IngestBatch { stamp, rules: rules.clone(), limits: ShardLimits::default(), partials: vec![(key(0), p)] };
        let r = ShardBuffer::apply_ingest(&mut store, &b).unwrap();
        assert_eq!(r.outcomes, [PartialOutcome::Applied]);
        outputs.extend(r.outputs);
    }
    assert_eq!(outputs.iter().map(|o| (o.reason, o.inputs)).collect::<Vec<_>>(), [(SealReason::MaxBytes, 2)]);
}

#[test]
fn a_group_with_a_full_key_applies_nothing_and_one_that_fits_applies_as_if_direct() {
    let rules = set_rules(KeyOverflow::Reject);
    let limits = ShardLimits::default();
    let mut store = MemStore::default();
    let apply = |store: &mut MemStore, stamp: u64, partials: &[(BufKey, Partial)]| {
        ShardBuffer::apply_group(store, stamp, &rules, &limits, partials).unwrap()
    };
    // Key 1 in the window [0, 1000), key 0 nearly full in [1000, 2000).
    assert!(matches!(apply(&mut store, 100, &[(key(1), members(0, 1))]), GroupApplied::Applied(_)));
    assert!(matches!(apply(&mut store, 1_100, &[(key(0), members(0, 9))]), GroupApplied::Applied(_)));
    let before = store.clone();
    // At 1,500 key 1's window is due: its time seal and new window come first in the group, and
    // are not applied either when key 0's growth is refused.
    let group = [(key(1), members(5, 6)), (key(0), members(9, 11))];
    assert_eq!(apply(&mut store, 1_500, &group), GroupApplied::KeyFull(vec![(1, 500)]));
    assert_eq!(store, before, "nothing of the group was applied");
    // The same group once both windows closed: applied, as applying it directly would.
    let mut direct = store.clone();
    let GroupApplied::Applied(r) = apply(&mut store, 2_000, &group) else { panic!("fits new windows") };
    let batch = IngestBatch { stamp: 2_000, rules: rules.clone(), limits, partials: group.to_vec() };
    assert_eq!(ShardBuffer::apply_ingest(&mut direct, &batch).unwrap(), r);
    assert_eq!(store, direct);
    assert_eq!(r.outputs.len(), 2, "both windows closed on time");
}
