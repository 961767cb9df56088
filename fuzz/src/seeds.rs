//! Hand-made seed inputs, written to `fuzz/corpus/<target>/seed-*` by
//! `cargo run --example make_seeds` (fuzz/README.md, "The corpus").
//!
//! Seeds give the fuzzer the shapes it would take long to find alone: real Ingest entries of
//! every operator (built by the core's own [`BatchBuilder`] from a config), Seals, dedupe by
//! producer ranges, tiny limits with each overflow policy — and the November crash class, forged:
//! a `tumbling_ms = 0` window, HyperLogLog registers past the end, an inconsistent DDSketch,
//! stamps at `u64::MAX`. Those must be refused by validation or decoding; the fuzzer mutates
//! them looking for a variant that is not.

use std::collections::BTreeMap;

use coalesce_core::batch::{BatchBuilder, Event, Partial};
use coalesce_core::buffer::{BufKey, Buffered, IngestBatch, ShardStats};
use coalesce_core::hll::Hll;
use coalesce_core::merge::{Aggregate, Member, MergeOp};
use coalesce_core::output::{Epoch, Output};
use coalesce_core::samples::{SamplePick, SamplePolicy, Samples};
use coalesce_core::session::ProducerRange;
use coalesce_core::stream::{KeyOverflow, ShardLimits, StreamRules, StreamTable, StreamsFile};
use coalesce_core::value::Value;
use coalesce_core::window::{SealReason, WindowPolicy, WindowState};
use serde::Serialize;

use crate::entry::{Command, IngestGroup};

/// Named seed inputs of one target.
pub type Seeds = Vec<(String, Vec<u8>)>;

/// A config with one stream per operator and window kind, samples, adaptive windows and
/// every overflow policy.
pub const SEED_CONFIG: &str = r#"
[limits]
max_keys = 1000
max_bytes = 1048576

[sinks.out]
kind = "file"
path = "out.jsonl"

[streams.sum]
merge = "sum_i64"
window = { tumbling = "10s", max_count = 3 }
sinks = ["out"]

[streams.fsum]
merge = "sum_f64"
window = { max_wait = "5s", idle = "1s" }

[streams.min]
merge = { op = "min", value_type = "f64" }
window = { tumbling = "1s", adaptive = { max_staleness = "10s", backlog_high = 100 } }

[streams.max]
merge = "max"
window = { debounce = "250ms", max_wait = "2s" }
overflow = "flush_early"

[streams.count]
merge = "count"
window = { tumbling = "1m" }
samples = { n = 3, pick = "reservoir", max_value_bytes = 16 }

[streams.set]
merge = { op = "set_union", max_members = 3 }
window = { max_wait = "1s" }
overflow = "shed"

[streams.list]
merge = { op = "append", max_len = 2 }
window = { max_wait = "1s", max_bytes = 64 }
samples = { n = 2, pick = "last" }

[streams.patch]
merge = "json_merge_patch"
window = { debounce = "10ms", max_wait = "1s" }
samples = { n = 1 }

[streams.q]
merge = { op = "ddsketch", relative_accuracy = 0.02, max_bins = 64 }
window = { tumbling = "1s" }

[streams.hll]
merge = { op = "hll", precision = 4 }
window = { tumbling = "1s" }

[streams.latest]
merge = "latest"
window = { tumbling = "1s", max_wait = "500ms", adaptive = { max_staleness = "3s", cooldown = 1 } }
"#;

/// The leader's clock in the seed entries.
pub const NOW: u64 = 1_700_000_000_000;

/// The table of [`SEED_CONFIG`].
pub fn table() -> StreamTable {
    StreamsFile::parse(SEED_CONFIG)
        .and_then(|f| f.validate(crate::config::SINK_KINDS))
        .unwrap_or_else(|e| panic!("the seed config validates: {e}"))
}

fn values(i: i64) -> Vec<Value> {
    vec![
        Value::Int(i),
        Value::Float(i as f64 * 1.5),
        Value::Str(format!("v{i}")),
        Value::Bytes(vec![i as u8; 3]),
        Value::Json(serde_json::json!({ "n": i, "tag": { "x": i % 2 } })),
        Value::None,
    ]
}

/// The Ingest entries a leader would propose for `round` of events on every stream, one per
/// shard of a 2-shard cluster, with producer `producer` numbering from `first_seq`.
fn ingests(table: &StreamTable, stamp: u64, round: i64, producer: u64, first_seq: u64) -> Vec<Command> {
    let mut b = BatchBuilder::new(table, 2, stamp);
    let mut seq = first_seq;
    for def in table.iter() {
        for k in 0..3 {
            for v in values(round + k) {
                let e = Event {
                    stream: def.name.clone(),
                    key: format!("key-{k}"),
                    value: v,
                    event_time: Some(stamp - 5),
                    producer: Some((producer, seq)),
                };
                if b.add(&e).is_ok() {
                    seq += 1;
                }
            }
        }
    }
    let rules: BTreeMap<String, StreamRules> = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
    b.finish()
        .into_values()
        .map(|batch| Command::Ingest {
            stamp,
            rules: rules.clone(),
            limits: table.limits(),
            groups: batch.groups.into_iter().map(|g| IngestGroup { range: g.range, partials: g.partials }).collect(),
        })
        .collect()
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("a seed encodes")
}

fn entries(cmds: &[Command]) -> Vec<u8> {
    cmds.iter().flat_map(enc).collect()
}

/// Replaces the first occurrence of `from` in `bytes` by `to` (forging a field in place).
fn splice(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes.windows(from.len()).position(|w| w == from).expect("the field to forge is in the seed");
    [&bytes[..at], to, &bytes[at + from.len()..]].concat()
}

fn one_partial(stream: &str, rules: StreamRules, agg: Aggregate, stamp: u64) -> Command {
    Command::Ingest {
        stamp,
        rules: BTreeMap::from([(stream.to_owned(), rules)]),
        limits: ShardLimits::default(),
        groups: vec![IngestGroup {
            range: None,
            partials: vec![(
                BufKey { stream: stream.into(), key: "k".into() },
                Partial { agg, inputs: 1, first_event_at: 0, last_event_at: 0, samples: None },
            )],
        }],
    }
}

fn seal(stamp: u64) -> Command {
    Command::Seal { stamp, max: 1_000, session_ttl_ms: 60_000 }
}

/// Seeds of the `apply` target: runs of log entries.
pub fn apply() -> Seeds {
    let t = table();
    let mut out = Vec::new();

    // A valid day in the life: two rounds of ingest, a retry (duplicate), seals in between.
    let mut run = ingests(&t, NOW, 1, 7, 1);
    run.push(seal(NOW + 600));
    run.extend(ingests(&t, NOW + 700, 2, 7, 1_000));
    run.extend(ingests(&t, NOW + 700, 2, 7, 1_000)); // a retry: duplicates
    run.push(seal(NOW + 2_000));
    run.extend(ingests(&t, NOW + 70_000, 3, 8, 1));
    run.push(seal(NOW + 200_000));
    out.push(("ingest-seal".into(), entries(&run)));

    // Tiny limits: the overflow policies (flush_early, shed, reject) at work.
    let mut tight = ingests(&t, NOW, 4, 9, 1);
    for c in &mut tight {
        if let Command::Ingest { limits, .. } = c {
            *limits = ShardLimits { max_keys: 2, max_bytes: 400 };
        }
    }
    tight.push(seal(NOW + 1));
    out.push(("tight-limits".into(), entries(&tight)));

    // Every other command kind, valid.
    let others = vec![
        Command::Ack { cursor: "out".into(), upto_seq: 3 },
        Command::DeadLetter { cursor: "out".into(), upto_seq: 4, letters: vec![] },
        Command::DlqRemove { sink: "out".into(), seqs: vec![1, 2] },
        Command::SetPreferredLeader { node: Some("coalesce-0".into()) },
        Command::DropCursor { cursor: "sub".into() },
        Command::Trim { below: 3 },
        seal(NOW),
    ];
    out.push(("other-commands".into(), entries(&others)));

    // Adaptive streams stretched by the leader (extra_ms in the entry's rules), then relaxed:
    // deadlines move forward, then back (never before the merging input).
    let stretch = |cmds: Vec<Command>, extra: u64| -> Vec<Command> {
        cmds.into_iter()
            .map(|mut c| {
                if let Command::Ingest { rules, .. } = &mut c {
                    for r in rules.values_mut() {
                        r.window = r.window.with_extra_ms(extra);
                    }
                }
                c
            })
            .collect()
    };
    let mut run = stretch(ingests(&t, NOW, 1, 11, 1), 4_000);
    run.push(seal(NOW + 1_500));
    run.extend(stretch(ingests(&t, NOW + 1_600, 2, 11, 1_000), 9_000));
    run.extend(stretch(ingests(&t, NOW + 2_000, 3, 11, 2_000), 0));
    run.push(seal(NOW + 2_100));
    run.push(seal(NOW + 20_000));
    out.push(("adaptive-stretch".into(), entries(&run)));

    // A stream whose operator changes between entries: the open window closes (op_changed).
    let sum = t.get("sum").expect("stream").rules.clone();
    let as_count = StreamRules { op: MergeOp::Count, ..sum.clone() };
    let changed = [
        one_partial("sum", sum.clone(), Aggregate::SumI64(5), NOW),
        one_partial("sum", as_count, Aggregate::Count(2), NOW + 10),
        one_partial("sum", sum.clone(), Aggregate::SumI64(i64::MAX), NOW + 20),
        one_partial("sum", sum.clone(), Aggregate::SumI64(1), NOW + 30),
        seal(NOW + 100_000),
    ];
    out.push(("op-changed".into(), entries(&changed)));

    // A set that outgrows `max_bytes` under each `key_overflow`: refused (the window stays
    // open and closes on time) or sealed early.
    for (name, key_overflow) in
        [("key-overflow-reject", KeyOverflow::Reject), ("key-overflow-flush", KeyOverflow::FlushEarly)]
    {
        let set = StreamRules {
            op: MergeOp::SetUnion { max_members: 1_000 },
            window: WindowPolicy { max_bytes: Some(100), ..sum.window },
            key_overflow,
            ..sum.clone()
        };
        let members = |from: i64, to: i64| Aggregate::SetUnion((from..to).map(Member::Int).collect());
        let growing = [
            one_partial("sum", set.clone(), members(0, 8), NOW),
            one_partial("sum", set.clone(), members(8, 11), NOW + 10),
            one_partial("sum", set.clone(), members(0, 11), NOW + 20),
            one_partial("sum", set.clone(), members(11, 12), NOW + 30),
            seal(NOW + 100_000),
            one_partial("sum", set.clone(), members(11, 12), NOW + 100_010),
            seal(NOW + 200_000),
        ];
        out.push((name.into(), entries(&growing)));
    }

    // Structured inputs (read with `arbitrary`, see crate::apply): patterned bytes.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..4 {
        let mut bytes = vec![crate::apply::STRUCTURED];
        bytes.extend((0..400).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
        out.push((format!("structured-{i}"), bytes));
    }

    // The November crash class, forged. Each must be refused; a valid entry follows.
    let valid = one_partial("sum", sum.clone(), Aggregate::SumI64(5), NOW);
    let zero = StreamRules { window: WindowPolicy { tumbling_ms: Some(0), ..sum.window }, ..sum.clone() };
    out.push((
        "forged-tumbling-zero".into(),
        entries(&[valid.clone(), one_partial("sum", zero, Aggregate::SumI64(1), NOW)]),
    ));
    out.push((
        "forged-stamp-max".into(),
        entries(&[valid.clone(), seal(u64::MAX), one_partial("sum", sum.clone(), Aggregate::SumI64(1), u64::MAX)]),
    ));
    out.push(("stamp-at-limit".into(), entries(&[valid.clone(), seal(coalesce_core::time::MAX_STAMP)])));

    let hll_rules = t.get("hll").expect("stream").rules.clone();
    let mut hll = Hll::new(4);
    hll.insert(b"x");
    let good = enc(&one_partial("hll", hll_rules, Aggregate::Hll(hll.clone()), NOW));
    // Sparse entry (index << 8 | rank) with index 200 past the 16 registers of precision 4.
    let forged_hll = [4u8, 0, 1, 0xa1, 0x90, 0x03];
    out.push(("forged-hll-index".into(), [good.clone(), splice(&good, &enc(&hll), &forged_hll)].concat()));
    // A dense sketch with 3 registers for precision 4.
    out.push(("forged-hll-dense".into(), [good.clone(), splice(&good, &enc(&hll), &[4, 1, 3, 1, 2, 3])].concat()));

    let q_rules = t.get("q").expect("stream").rules.clone();
    let sketch = q_rules.op.lift(&Value::Float(3.0), NOW).expect("a value lifts");
    let Aggregate::Ddsketch(s) = &sketch else { unreachable!("a ddsketch op lifts a sketch") };
    let sketch_bytes = enc(s);
    let good = enc(&one_partial("q", q_rules, sketch.clone(), NOW));
    // The positive store's count raised by one: its bins no longer add up to it.
    let mut wire: DdWire = postcard::from_bytes(&sketch_bytes).expect("a sketch decodes as its mirror");
    wire.store.count += 1;
    out.push(("forged-ddsketch-count".into(), [good.clone(), splice(&good, &sketch_bytes, &enc(&wire))].concat()));
    // A key past the bins (the panic `sketches-ddsketch` would hit in a merge).
    let mut wire: DdWire = postcard::from_bytes(&sketch_bytes).expect("a sketch decodes as its mirror");
    wire.store.max_key = wire.store.offset + wire.store.bins.len() as i32;
    out.push(("forged-ddsketch-key".into(), [good.clone(), splice(&good, &sketch_bytes, &enc(&wire))].concat()));
    // A count moved past max_key: the sum still matches, but a merge would drop it (found by
    // this target: the merged window no longer decoded).
    let mut wire: DdWire = postcard::from_bytes(&sketch_bytes).expect("a sketch decodes as its mirror");
    let top = (wire.store.max_key - wire.store.offset) as usize;
    wire.store.bins.swap(top, top + 1);
    let forged = enc(&one_partial("q", t.get("q").expect("stream").rules.clone(), sketch.clone(), NOW + 1));
    let forged = splice(&forged, &sketch_bytes, &enc(&wire));
    out.push(("forged-ddsketch-outside".into(), [good.clone(), forged, good].concat()));
    // A partial covering u64::MAX inputs (found by this target: the shard's total overflowed).
    let huge = Command::Ingest {
        stamp: NOW,
        rules: BTreeMap::from([("sum".to_owned(), sum.clone())]),
        limits: ShardLimits::default(),
        groups: vec![IngestGroup {
            range: None,
            partials: vec![(
                BufKey { stream: "sum".into(), key: "k".into() },
                Partial {
                    agg: Aggregate::SumI64(1),
                    inputs: u64::MAX,
                    first_event_at: 0,
                    last_event_at: 0,
                    samples: None,
                },
            )],
        }],
    };
    out.push(("forged-inputs-max".into(), entries(&[valid, huge.clone(), huge])));
    out
}

/// The serde shape of `sketches_ddsketch::DDSketch`, to forge sketches field by field.
use coalesce_core::merge::SketchWire as DdWire;

/// Seeds of the `decode` target: the selector byte (its index in [`crate::decode::KINDS`]) and
/// a valid encoding of the type.
pub fn decode() -> Seeds {
    let t = table();
    let kind = |name: &str| crate::decode::KINDS.iter().position(|k| *k == name).expect("a kind") as u8;
    let with = |name: &str, parts: &[Vec<u8>]| [vec![kind(name)], parts.concat()].concat();
    let cmds = ingests(&t, NOW, 1, 3, 1);
    let sum_rules = t.get("sum").expect("stream").rules.clone();
    let mut hll = Hll::new(5);
    for i in 0..40u32 {
        hll.insert(&i.to_be_bytes());
    }
    let mut sparse = Hll::new(12);
    sparse.insert(b"a");
    let q = t.get("q").expect("stream").rules.op.clone();
    let sketch = |v: f64| match q.lift(&Value::Float(v), 0) {
        Ok(Aggregate::Ddsketch(s)) => s,
        _ => unreachable!("a ddsketch op lifts a sketch"),
    };
    let policy = SamplePolicy { n: 2, pick: SamplePick::Reservoir, max_value_bytes: 8 };
    let samples = |i: i64| Samples::of(&Value::Int(i), i as u64, 0, &policy);
    let partial = |agg: Aggregate| Partial { agg, inputs: 2, first_event_at: 1, last_event_at: 2, samples: None };
    let window =
        WindowState { start: 0, first_input_at: 1, last_input_at: 2, first_event_at: 0, last_event_at: 3, inputs: 2 };
    let output = Output {
        stream: "sum".into(),
        key: "k".into(),
        shard: 3,
        seq: 9,
        epoch: Epoch { term: 2, node: 1 },
        window_start: 0,
        window_end: 10_000,
        first_input_at: 1,
        last_input_at: 2,
        first_event_at: 0,
        last_event_at: 3,
        inputs: 2,
        reason: SealReason::Time,
        value: Aggregate::SumI64(7),
        samples: Some(samples(1)),
    };
    let latency = t.get("min").expect("stream").rules.clone();
    let range = ProducerRange { producer: 1, first_seq: 1, last_seq: 4 };
    let mut sessions = coalesce_core::session::ProducerSessions::default();
    sessions.record(&range, NOW);
    vec![
        ("command-ingest".into(), with("command", &[enc(&cmds[0])])),
        ("command-seal".into(), with("command", &[enc(&seal(NOW))])),
        (
            "aggregates-sum".into(),
            with("aggregates", &[enc(&MergeOp::SumI64), enc(&Aggregate::SumI64(i64::MAX)), enc(&Aggregate::SumI64(1))]),
        ),
        (
            "aggregates-hll".into(),
            with(
                "aggregates",
                &[
                    enc(&MergeOp::Hll { precision: 5 }),
                    enc(&Aggregate::Hll(hll.clone())),
                    enc(&Aggregate::Hll(hll.clone())),
                ],
            ),
        ),
        (
            "aggregates-ddsketch".into(),
            with(
                "aggregates",
                &[enc(&q), enc(&Aggregate::Ddsketch(sketch(1.0))), enc(&Aggregate::Ddsketch(sketch(-1e6)))],
            ),
        ),
        ("hll-dense-sparse".into(), with("hll", &[enc(&hll), enc(&sparse)])),
        ("ddsketch".into(), with("ddsketch", &[enc(&sketch(0.5)), enc(&sketch(1e9))])),
        (
            "partials".into(),
            with(
                "partials",
                &[enc(&MergeOp::Count), enc(&partial(Aggregate::Count(2))), enc(&partial(Aggregate::Count(5)))],
            ),
        ),
        ("output".into(), with("output", &[enc(&output)])),
        (
            "dead-letter".into(),
            with(
                "dead_letter",
                &[enc(&coalesce_core::output::DeadLetter {
                    sink: "out".into(),
                    output: output.clone(),
                    reason: "HTTP 422".into(),
                    failed_at: NOW,
                    attempts: 3,
                })],
            ),
        ),
        (
            "buffered".into(),
            with(
                "buffered",
                &[enc(&Buffered {
                    agg: Aggregate::Count(2),
                    window,
                    deadline: 10,
                    bytes: 80,
                    samples: Some(samples(2)),
                })],
            ),
        ),
        (
            "shard-stats".into(),
            with("shard_stats", &[enc(&ShardStats { keys: 1, bytes: 80, last_stamp: NOW, ..ShardStats::default() })]),
        ),
        ("stream-rules".into(), with("stream_rules", &[enc(&latency)])),
        ("window-policy".into(), with("window_policy", &[enc(&t.get("latest").expect("stream").rules.window)])),
        (
            "adaptive-policy".into(),
            with("adaptive_policy", &[enc(&latency.window.adaptive.expect("adaptive")), vec![0xff, 0x10, 0, 3, 0x80]]),
        ),
        ("samples".into(), with("samples", &[enc(&policy), enc(&samples(1)), enc(&samples(2))])),
        (
            "value-json-float".into(),
            with("value", &[enc(&Value::Json(serde_json::json!([-2.073713403038841e-180, 0.1])))]),
        ),
        ("value-json".into(), with("value", &[enc(&Value::Json(serde_json::json!({"a": [1, 2.5, null]})))])),
        ("merge-op".into(), with("merge_op", &[enc(&q), enc(&Value::Float(2.0))])),
        (
            "ingest-batch".into(),
            with(
                "ingest_batch",
                &[enc(&IngestBatch {
                    stamp: NOW,
                    rules: BTreeMap::from([("sum".to_owned(), sum_rules)]),
                    limits: ShardLimits::default(),
                    partials: vec![(BufKey { stream: "sum".into(), key: "k".into() }, partial(Aggregate::SumI64(3)))],
                })],
            ),
        ),
        ("event-batch".into(), with("event_batch", &[enc(&event_batch(&t))])),
        ("session".into(), with("session", &[enc(&sessions.get(1).expect("a session"))])),
        (
            "sessions".into(),
            with("sessions", &[enc(&sessions), enc(&ProducerRange { producer: 1, first_seq: 5, last_seq: 6 })]),
        ),
        ("misc-window-state".into(), with("misc", &[vec![7], enc(&window)])),
    ]
}

/// A request's events for one shard, pre-merged.
fn event_batch(t: &StreamTable) -> coalesce_core::batch::EventBatch {
    let mut b = BatchBuilder::new(t, 1, NOW);
    for (i, v) in values(3).into_iter().enumerate() {
        let _ = b.add(&Event {
            stream: "latest".into(),
            key: "k".into(),
            value: v,
            event_time: None,
            producer: Some((5, i as u64 + 1)),
        });
    }
    b.finish().into_values().next().unwrap_or_default()
}

/// Seeds of the `streams_config` target: the seed config and the shipped examples.
pub fn streams_config() -> Seeds {
    vec![
        ("seed-config".into(), SEED_CONFIG.as_bytes().to_vec()),
        ("minimal".into(), b"[streams.a]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }\n".to_vec()),
        ("tumbling-zero".into(), b"[streams.a]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"0s\" }\n".to_vec()),
        (
            "ddsketch-edges".into(),
            b"[streams.q]\nmerge = { op = \"ddsketch\", relative_accuracy = 1e-9, max_bins = 16 }\nwindow = { max_wait = \"7d\" }\n"
                .to_vec(),
        ),
    ]
}

/// Seeds of the `merge` target: `arbitrary` reads any bytes, so a few patterned byte runs.
pub fn merge() -> Seeds {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..12u8)
        .map(|i| {
            let mut bytes = vec![i.wrapping_mul(23), 1, 0, 3, 0, 2];
            bytes.extend((0..200).map(|_| next() as u8));
            (format!("bytes-{i}"), bytes)
        })
        .collect()
}

/// Every seed, by target.
/// Snapshots as a sender writes them: the first byte picks the limits (0xff: the largest), the
/// second the chunking; one with rows in every column family (an empty key first in one), an
/// empty one, and refused ones (keys out of order, a length not in its shortest form, an
/// unknown column family, a row missing).
pub fn snapshot() -> Seeds {
    use coalesce_core::snapshot::{header, put_row};
    let write = |rows: &[(u8, &[u8], &[u8])], announced: u64| {
        let mut out = vec![0xff, 7];
        out.extend(header(announced));
        for (cf, k, v) in rows {
            put_row(&mut out, *cf, k, v);
        }
        out
    };
    let filled: Vec<Vec<u8>> = (0..crate::snapshot::COLUMN_FAMILIES as u8).map(|cf| vec![cf; 40]).collect();
    let mut full: Vec<(u8, &[u8], &[u8])> = vec![(0, b"", b"empty key first")];
    for (cf, value) in filled.iter().enumerate() {
        let cf = cf as u8;
        full.extend([(cf, &b"k1"[..], &b"v"[..]), (cf, b"k2", b""), (cf, b"k3\xff", value)]);
    }
    full.sort_by_key(|r| r.0);
    let mut padded = vec![0xff, 1];
    padded.extend(header(1));
    padded.extend([0, 0x81, 0x00, b'k', 0]);
    vec![
        ("rows", write(&full, full.len() as u64)),
        ("rows-bytewise", {
            let mut b = write(&full, full.len() as u64);
            b[1] = 0;
            b
        }),
        ("empty", write(&[], 0)),
        ("out-of-order", write(&[(1, b"b", b"v"), (1, b"a", b"v")], 2)),
        ("unknown-cf", write(&[(6, b"k", b"v")], 1)),
        ("missing-row", write(&[(0, b"k", b"v")], 2)),
        ("not-shortest", padded),
    ]
    .into_iter()
    .map(|(name, bytes)| (name.to_owned(), bytes))
    .collect()
}

/// Seeds of the `peer` target: each message kind as a node sends it, replicated entries of
/// every operator, and the forged `apply` seeds arriving by replication (refused by
/// `check_entries`).
pub fn peer() -> Seeds {
    use coalesce_wire::codec::{self, encode_msg};
    use coalesce_wire::peer::{Forwarded, QuiesceRequest};
    use coalesce_wire::types::{PeerNode, TypeConfig};
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest};
    use openraft::{EntryPayload, Membership};

    use crate::peer::{entry, vote};

    let t = table();
    let append = |entries: Vec<codec::Entry>| {
        let leader_commit = entries.last().map(|e| e.log_id);
        let rpc = AppendEntriesRequest::<TypeConfig> { vote: vote(2, true), prev_log_id: None, entries, leader_commit };
        [vec![0], encode_msg("append", &rpc).expect("encodes")].concat()
    };
    let mut out: Seeds = Vec::new();
    let mut run = ingests(&t, NOW, 1, 7, 1);
    run.push(seal(NOW + 600));
    run.push(Command::Ack { cursor: "c".into(), upto_seq: 2 });
    let replicated: Vec<_> = run.iter().enumerate().map(|(i, c)| entry(2, i as u64 + 1, c.clone())).collect();
    out.push(("append-ingest-seal".into(), append(replicated.clone())));
    let members = BTreeMap::from([(1u64, PeerNode { name: "coalesce-0".into(), ..PeerNode::default() })]);
    let membership = Membership::new(vec![members.keys().copied().collect()], members).expect("a membership");
    let config = codec::Entry { log_id: codec::log_id(1, 1, 0), payload: EntryPayload::Membership(membership.clone()) };
    let blank = codec::Entry { log_id: codec::log_id(2, 1, 1), payload: EntryPayload::Blank };
    out.push(("append-membership".into(), append(vec![config.clone(), blank])));
    // The forged entries of the apply seeds, replicated.
    for (name, bytes) in apply().into_iter().filter(|(n, _)| n.starts_with("forged-")) {
        let mut rest = &bytes[..];
        let mut cmds = Vec::new();
        while let Ok((cmd, tail)) = postcard::take_from_bytes::<Command>(rest) {
            cmds.push(cmd);
            rest = tail;
        }
        let replicated = cmds.into_iter().enumerate().map(|(i, c)| entry(3, i as u64 + 1, c)).collect();
        out.push((format!("append-{name}"), append(replicated)));
    }
    let rpc = VoteRequest::<TypeConfig>::new(vote(3, false), Some(codec::log_id(2, 1, 5)));
    out.push(("vote".into(), [vec![1], encode_msg("vote", &rpc).expect("encodes")].concat()));
    for (shard, cmd) in ingests(&t, NOW, 2, 8, 1).into_iter().enumerate() {
        let Command::Ingest { groups, .. } = cmd else { continue };
        let fwd = Forwarded::Ingest(groups);
        out.push((
            format!("forward-ingest-{shard}"),
            [vec![3, shard as u8], encode_msg("fwd", &fwd).expect("encodes")].concat(),
        ));
    }
    let ack = Forwarded::Ack { cursor: "sink".into(), upto_seq: 9 };
    out.push(("forward-ack".into(), [vec![3, 0], encode_msg("fwd", &ack).expect("encodes")].concat()));
    let v = codec::encode_vote(&vote(3, true)).expect("encodes");
    let committed = codec::encode_log_id(&codec::log_id(2, 1, 4)).expect("encodes");
    let meta = codec::SnapshotMetaT {
        last_log_id: Some(codec::log_id(2, 1, 6)),
        last_membership: openraft::StoredMembership::new(Some(codec::log_id(1, 1, 0)), membership),
    };
    let meta = codec::encode_snapshot_meta(&meta).expect("encodes");
    out.push((
        "snapshot-meta".into(),
        [vec![4, v.len() as u8], v, vec![committed.len() as u8], committed, meta].concat(),
    ));
    let q = QuiesceRequest { term: 2, leader: 1, last_log_index: 7 };
    out.push(("quiesce".into(), [vec![5], encode_msg("q", &q).expect("encodes")].concat()));
    let stored = codec::encode_entry(&replicated[0]).expect("encodes");
    out.push(("stored-entry".into(), [vec![6], stored].concat()));
    out.push(("stored-membership".into(), [vec![6], codec::encode_entry(&config).expect("encodes")].concat()));
    let reply = AppendEntriesResponse::<TypeConfig>::Success;
    out.push(("reply-append".into(), [vec![7], encode_msg("reply", &reply).expect("encodes")].concat()));
    out
}

/// Seeds of the `request` target: `Ingest` requests as clients send them (protobuf), with
/// events of every stream and value kind, with and without a producer id, and refused events
/// among them (an unknown stream, an empty key, JSON that is not, a zero producer seq).
pub fn request() -> Seeds {
    use coalesce_proto::v1 as pb;
    use prost::Message;
    let value = |v: Value| {
        let kind = match v {
            Value::None => return None,
            Value::Int(i) => pb::value::Kind::Int(i),
            Value::Float(f) => pb::value::Kind::Float(f),
            Value::Str(s) => pb::value::Kind::Str(s),
            Value::Bytes(b) => pb::value::Kind::Bytes(b),
            Value::Json(j) => pb::value::Kind::Json(j.to_string()),
        };
        Some(pb::Value { kind: Some(kind) })
    };
    let t = table();
    let mut events = Vec::new();
    for def in t.iter() {
        for (k, v) in values(3).into_iter().enumerate() {
            let seq = events.len() as u64 + 1;
            events.push(pb::Event {
                stream: def.name.clone(),
                key: format!("key-{}", k % 2),
                value: value(v),
                event_time_ms: Some(NOW - 10),
                producer_seq: seq,
            });
        }
    }
    let mut refused = events[..4].to_vec();
    refused[0].stream = "no-such-stream".into();
    refused[1].key = String::new();
    refused[2].value = Some(pb::Value { kind: Some(pb::value::Kind::Json("{not json".into())) });
    refused[3].producer_seq = 0;
    [
        ("producer", pb::IngestRequest { producer_id: 7, events: events.clone() }),
        ("no-producer", pb::IngestRequest { producer_id: 0, events }),
        ("refused", pb::IngestRequest { producer_id: 9, events: refused }),
    ]
    .into_iter()
    .map(|(name, req)| (name.to_owned(), [vec![0], req.encode_to_vec()].concat()))
    .collect()
}

pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("apply", apply()),
        ("decode", decode()),
        ("streams_config", streams_config()),
        ("merge", merge()),
        ("snapshot", snapshot()),
        ("peer", peer()),
        ("request", request()),
    ]
}
