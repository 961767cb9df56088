//! The `decode` target: bytes → postcard decode of every core type that is stored or replicated.
//!
//! The first byte picks the type ([`KINDS`] names them, in order); the rest is its postcard
//! encoding — as a log entry, a RocksDB row, an outbox entry, a forwarded batch or a snapshot
//! holds it. Decoding must never panic, and whatever decodes must be usable:
//! - it survives postcard byte for byte (encode → decode → encode);
//! - what merges, merges with its operator without panicking: two decoded aggregates (HLLs,
//!   DDSketches, samples, partials) that pass their checks merge into one that still passes them
//!   and still decodes — or the merge is refused and leaves the older one unchanged;
//! - what carries a policy (stream rules, window and adaptive policies, sample policies) is either
//!   refused by its check or drives windows and the adaptive controller without panicking;
//! - a decoded Ingest batch that validates applies to a shard, with the `apply` target's checks.

use coalesce_core::adaptive::{AdaptiveController, AdaptivePolicy, Pressure};
use coalesce_core::batch::{EventBatch, Partial, ProducerGroup};
use coalesce_core::buffer::{BufKey, Buffered, IngestBatch, ShardStats};
use coalesce_core::hll::Hll;
use coalesce_core::merge::{Aggregate, Member, MergeOp, Sketch};
use coalesce_core::output::{DeadLetter, Epoch, Output};
use coalesce_core::samples::{SamplePolicy, Samples};
use coalesce_core::session::{ProducerRange, ProducerSessions, Session};
use coalesce_core::stream::{OutboxLimits, ShardLimits, StreamRules};
use coalesce_core::time::{MAX_STAMP, Millis};
use coalesce_core::value::Value;
use coalesce_core::window::{SealReason, WindowPolicy, WindowState};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::entry::{Command, IngestGroup};
use crate::roundtrip::{decode_front, must_roundtrip};
use crate::shard::Shard;

/// The types, by the first byte of the input (modulo their number).
pub const KINDS: &[&str] = &[
    "command",
    "aggregates",
    "hll",
    "ddsketch",
    "partials",
    "output",
    "dead_letter",
    "buffered",
    "shard_stats",
    "stream_rules",
    "window_policy",
    "adaptive_policy",
    "samples",
    "value",
    "merge_op",
    "ingest_batch",
    "event_batch",
    "session",
    "sessions",
    "misc",
];

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else { return };
    match KINDS[usize::from(selector) % KINDS.len()] {
        "command" => {
            if let Some((cmd, _)) = decode_front::<Command>(bytes, "log entry")
                && cmd.validate().is_ok()
            {
                let mut shard = Shard::default();
                shard.apply(&cmd);
                shard.drain();
            }
        }
        "aggregates" => aggregates(bytes),
        "hll" => {
            let Some((mut a, rest)) = decode_front::<Hll>(bytes, "HyperLogLog") else { return };
            a.check().unwrap_or_else(|e| panic!("a decoded HyperLogLog fails its check: {e}"));
            let _ = (a.estimate(), a.size(), a.precision());
            let Some((b, _)) = decode_front::<Hll>(rest, "HyperLogLog") else { return };
            let before = a.clone();
            match a.merge(&b) {
                Ok(()) => {
                    a.check().unwrap_or_else(|e| panic!("a merged HyperLogLog fails its check: {e}"));
                    must_roundtrip(&a, "merged HyperLogLog");
                    let _ = a.estimate();
                }
                Err(_) => assert_eq!(a, before, "a refused merge changes nothing"),
            }
        }
        "ddsketch" => {
            let Some((a, rest)) = decode_front::<Sketch>(bytes, "DDSketch") else { return };
            let mut a = Aggregate::Ddsketch(a);
            let _ = (a.to_json(), a.size());
            let Some((b, _)) = decode_front::<Sketch>(rest, "DDSketch") else { return };
            merge_checked(&mut a, &Aggregate::Ddsketch(b), &MergeOp::from_name("ddsketch").expect("an operator"));
        }
        "partials" => partials(bytes),
        "output" => {
            if let Some((o, _)) = decode_front::<Output>(bytes, "output") {
                let _ = (o.to_json(), o.value.check(), o.value.size());
            }
        }
        "dead_letter" => {
            if let Some((d, _)) = decode_front::<DeadLetter>(bytes, "dead letter") {
                let _ = d.output.to_json();
            }
        }
        "buffered" => {
            if let Some((b, _)) = decode_front::<Buffered>(bytes, "buffered window") {
                let _ = (b.agg.check(), b.agg.to_json(), b.samples.map(|s| s.size()));
            }
        }
        "shard_stats" => {
            decode_front::<ShardStats>(bytes, "shard stats");
        }
        "stream_rules" => {
            if let Some((r, _)) = decode_front::<StreamRules>(bytes, "stream rules")
                && r.check().is_ok()
            {
                window(&r.window);
                let _ = r.op.lift(&Value::Int(1), 0);
            }
        }
        "window_policy" => {
            if let Some((w, _)) = decode_front::<WindowPolicy>(bytes, "window policy")
                && w.check().is_ok()
            {
                window(&w);
            }
        }
        "adaptive_policy" => {
            if let Some((a, rest)) = decode_front::<AdaptivePolicy>(bytes, "adaptive policy")
                && a.check().is_ok()
            {
                adaptive(a, rest);
            }
        }
        "samples" => samples(bytes),
        "value" => {
            if let Some((v, _)) = decode_front::<Value>(bytes, "value") {
                let _ = (v.size(), v.canonical_bytes(), v.to_json(), v.kind());
            }
        }
        "merge_op" => {
            if let Some((op, rest)) = decode_front::<MergeOp>(bytes, "merge operator")
                && op.validate().is_ok()
                && let Some((v, _)) = decode_front::<Value>(rest, "value")
                && let Ok(agg) = op.lift(&v, 0)
            {
                let p = Partial { agg, inputs: 1, first_event_at: 0, last_event_at: 0, samples: None };
                p.check(&op).unwrap_or_else(|e| panic!("a lifted value fails the partial check of {op:?}: {e}"));
                must_roundtrip(&p, "lifted partial");
            }
        }
        "ingest_batch" => {
            if let Some((b, _)) = decode_front::<IngestBatch>(bytes, "ingest batch") {
                let cmd = Command::Ingest {
                    stamp: b.stamp,
                    rules: b.rules,
                    limits: b.limits,
                    groups: vec![IngestGroup { range: None, partials: b.partials }],
                };
                if cmd.validate().is_ok() {
                    let mut shard = Shard::default();
                    shard.apply(&cmd);
                    shard.drain();
                }
            }
        }
        "event_batch" => {
            if let Some((b, _)) = decode_front::<EventBatch>(bytes, "event batch") {
                let _ = (b.events(), b.partials());
                for g in &b.groups {
                    must_roundtrip::<ProducerGroup>(g, "producer group");
                }
            }
        }
        "session" => {
            decode_front::<Session>(bytes, "session");
        }
        "sessions" => {
            if let Some((mut s, rest)) = decode_front::<ProducerSessions>(bytes, "session table")
                && let Some((r, _)) = decode_front::<ProducerRange>(rest, "producer range")
            {
                let _ = (s.check(&r), s.len(), s.iter().count());
                if r.check().is_ok() {
                    s.record(&r, 1);
                }
                let _ = s.expire(0, 0, 1);
            }
        }
        _ => misc(bytes),
    }
}

/// Decodes two aggregates and an operator; merges them when both pass the checks apply runs.
fn aggregates(bytes: &[u8]) {
    let Some((op, rest)) = decode_front::<MergeOp>(bytes, "merge operator") else { return };
    let Some((mut a, rest)) = decode_front::<Aggregate>(rest, "aggregate") else { return };
    let _ = (a.to_json(), a.size(), a.op_name(), a.check());
    if op.validate().is_err() {
        return; // apply only meets operators that pass (every entry's rules are checked first)
    }
    let _ = op.accepts(&a);
    let Some((b, _)) = decode_front::<Aggregate>(rest, "aggregate") else { return };
    if a.check().is_ok() && b.check().is_ok() {
        merge_checked(&mut a, &b, &op);
    }
}

/// Merges `b` into `a` under `op`: a success gives an aggregate that passes its check and
/// survives postcard; a refusal leaves `a` as it was.
fn merge_checked(a: &mut Aggregate, b: &Aggregate, op: &MergeOp) {
    let before = postcard::to_allocvec(a).expect("an aggregate encodes");
    match a.merge(b, op) {
        Ok(()) => {
            a.check().unwrap_or_else(|e| panic!("merging two valid aggregates gave an invalid one: {e}"));
            must_roundtrip(a, "merged aggregate");
            let _ = (a.to_json(), a.size());
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert_eq!(postcard::to_allocvec(a).expect("encodes"), before, "a refused merge ({e}) changes nothing");
        }
    }
}

/// Two partials under one operator, as the pre-merge and the buffer merge them: if both pass
/// the check an entry's partials pass, their merge (when it succeeds) passes it too — otherwise
/// a node's pre-merge would build entries its leader refuses.
fn partials(bytes: &[u8]) {
    let Some((op, rest)) = decode_front::<MergeOp>(bytes, "merge operator") else { return };
    let Some((a, rest)) = decode_front::<Partial>(rest, "partial") else { return };
    let Some((b, _)) = decode_front::<Partial>(rest, "partial") else { return };
    if op.validate().is_err() || a.check(&op).is_err() || b.check(&op).is_err() {
        return;
    }
    let mut merged = a.agg.clone();
    merge_checked(&mut merged, &b.agg, &op);
    let p = Partial {
        agg: merged,
        inputs: a.inputs.saturating_add(b.inputs),
        first_event_at: a.first_event_at.min(b.first_event_at),
        last_event_at: a.last_event_at.max(b.last_event_at),
        samples: None,
    };
    p.check(&op).unwrap_or_else(|e| panic!("two valid partials of {op:?} merge into an invalid one: {e}"));
}

/// A policy/samples pair: two checked sample sets merge into a checked one of at most `n`.
fn samples(bytes: &[u8]) {
    let Some((policy, rest)) = decode_front::<SamplePolicy>(bytes, "sample policy") else { return };
    let Some((mut a, rest)) = decode_front::<Samples>(rest, "samples") else { return };
    let _ = (a.size(), a.to_json(), a.len());
    let Some((b, _)) = decode_front::<Samples>(rest, "samples") else { return };
    if policy.check().is_err() || a.check().is_err() || b.check().is_err() {
        return;
    }
    a.merge(&b, &policy);
    a.check().unwrap_or_else(|e| panic!("merged samples fail their check: {e}"));
    assert!(a.len() <= usize::from(policy.n), "merged samples exceed n = {}", policy.n);
    must_roundtrip(&a, "merged samples");
}

/// Drives a checked window policy through windows opened at a few stamps.
fn window(w: &WindowPolicy) {
    let _ = (w.to_string(), w.staleness_bound_ms(), w.max_staleness_ms());
    for extra in [0, 1, u64::MAX] {
        let stretched = w.with_extra_ms(extra);
        stretched.check().unwrap_or_else(|e| panic!("a checked policy stretched by {extra} fails its check: {e:?}"));
    }
    for stamp in [0, 1, 999, 1_700_000_000_000, MAX_STAMP] {
        let mut state = WindowState::open(w, stamp, 1, 0, 0);
        assert!(state.start <= stamp, "a window starts at or before its first input");
        let d = w.deadline(&state);
        assert!(d > stamp, "a window's deadline {d} is after its first input {stamp}");
        state.absorb(stamp.saturating_add(1), 1, 0, 1);
        let _ = (w.deadline(&state), w.data_trigger(state.inputs, 1 << 20));
    }
    if let Some(a) = w.adaptive {
        adaptive(a, &[]);
    }
}

/// Feeds a checked adaptive policy's controller a few pressures: `extra_ms` stays within bounds.
fn adaptive(policy: AdaptivePolicy, seed: &[u8]) {
    let mut c = AdaptiveController::new(policy);
    let mut now: Millis = 0;
    let bytes = if seed.is_empty() { &[0xff, 0, 0x80, 0x7f, 3][..] } else { seed };
    for (i, &b) in bytes.iter().take(64).enumerate() {
        now = now.saturating_add(u64::from(b) * policy.adjust_every_ms.min(1 << 20) / 16 + i as u64);
        let p = Pressure {
            outbox_backlog: (policy.backlog_high / 64).saturating_mul(u64::from(b)),
            oldest_undelivered_age_ms: u64::from(b >> 4) * policy.lag_high_ms / 8,
            sink_throttled: b & 1 == 1,
            sink_failing: b & 2 == 2,
            buffer_fill: f64::from(b) / 255.0,
        };
        let d = c.update(now, &p);
        assert!(d.extra_ms <= policy.max_extra_ms(), "extra {} passes max {}", d.extra_ms, policy.max_extra_ms());
        let resumed = AdaptiveController::resume(policy, d.extra_ms);
        assert_eq!(resumed.decision().extra_ms, d.extra_ms);
        policy
            .with_extra(d.extra_ms)
            .check()
            .unwrap_or_else(|e| panic!("the controller's stretch fails the check: {e:?}"));
    }
}

/// The small types.
fn misc(bytes: &[u8]) {
    fn one<T: Serialize + DeserializeOwned + std::fmt::Debug>(bytes: &[u8], what: &str) {
        decode_front::<T>(bytes, what);
    }
    let Some((&which, bytes)) = bytes.split_first() else { return };
    match which % 9 {
        0 => one::<BufKey>(bytes, "buffer key"),
        1 => one::<ShardLimits>(bytes, "shard limits"),
        2 => one::<OutboxLimits>(bytes, "outbox limits"),
        3 => one::<Epoch>(bytes, "epoch"),
        4 => one::<SealReason>(bytes, "seal reason"),
        5 => one::<Member>(bytes, "set member"),
        6 => one::<ProducerRange>(bytes, "producer range"),
        7 => one::<WindowState>(bytes, "window state"),
        _ => one::<SamplePolicy>(bytes, "sample policy"),
    }
}
