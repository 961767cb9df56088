//! Regression tests for what the fuzz targets (`fuzz/`, see its README) found in the core.
//! Each test names the target that found it and fails on the code before the fix.

use coalesce_core::merge::{Aggregate, MIN_RELATIVE_ACCURACY, MergeError, MergeOp, Sketch, SketchWire};
use coalesce_core::stream::StreamsFile;
use coalesce_core::value::Value;

/// The serde shape of `sketches_ddsketch::DDSketch`, to forge sketches field by field.
type Wire = SketchWire;

fn sketch(op: &MergeOp, v: f64) -> Aggregate {
    op.lift(&Value::Float(v), 0).expect("a finite value lifts")
}

fn wire(a: &Aggregate) -> Wire {
    let Aggregate::Ddsketch(s) = a else { panic!("a sketch") };
    postcard::from_bytes(&postcard::to_allocvec(&s.0).expect("encode")).expect("the mirror decodes")
}

fn decode(w: &Wire) -> Result<Sketch, postcard::Error> {
    postcard::from_bytes(&postcard::to_allocvec(w).expect("encode"))
}

/// `streams_config`/`apply`: `relative_accuracy = 1e-9` passed validation, and building its
/// configuration overflowed `i32` inside `sketches-ddsketch` (a panic with overflow checks,
/// garbage keys without); finer than ~2e-7 the keys of large values overflowed in merges.
#[test]
fn ddsketch_accuracy_finer_than_the_minimum_is_refused() {
    for a in [1e-9, 1e-7, 0.0, -0.5, 1.0, f64::NAN] {
        let e = MergeOp::Ddsketch { relative_accuracy: a, max_bins: 2048 }.validate().unwrap_err();
        assert_eq!(e.0, "merge.relative_accuracy", "{a}");
    }
    let e = StreamsFile::parse(
        "[streams.q]\nmerge = { op = \"ddsketch\", relative_accuracy = 1e-9 }\nwindow = { tumbling = \"1s\" }",
    )
    .unwrap()
    .validate(&[])
    .unwrap_err();
    assert_eq!(e.to_string(), "stream \"q\": merge.relative_accuracy must be in [0.000001, 1), got 0.000000001");

    // At the finest accuracy, the extremes of f64 lift, merge and decode.
    let op = MergeOp::Ddsketch { relative_accuracy: MIN_RELATIVE_ACCURACY, max_bins: 65_536 };
    op.validate().unwrap();
    let mut acc = sketch(&op, 1.1e-9);
    for v in [f64::MAX, -f64::MAX, 1.0, -1.1e-9, 0.0, 5e-324] {
        let b = sketch(&op, v);
        let _ = acc.merge(&b, &op); // a sum past f64 is an overflow; either way it decodes
        let Aggregate::Ddsketch(s) = &acc else { unreachable!() };
        let bytes = postcard::to_allocvec(s).unwrap();
        postcard::from_bytes::<Sketch>(&bytes).expect("the merged sketch decodes");
    }
}

/// `decode`: a forged γ just above 1 made the decode check itself overflow `i32`
/// (`1 - (ln(min_value) / ln γ) as i32`); now such a configuration is refused, without panicking.
#[test]
fn sketches_finer_than_the_minimum_accuracy_are_refused_on_decode() {
    let op = MergeOp::from_name("ddsketch").unwrap();
    let mut w = wire(&sketch(&op, 3.0));
    w.config.gamma = 1.0 + 1e-12;
    w.config.gamma_ln = w.config.gamma.ln();
    w.config.offset = 1i32.wrapping_sub((w.config.min_value.ln() / w.config.gamma_ln) as i32);
    assert!(decode(&w).is_err());
}

/// `apply`: decoding checked that a store's bins add up to its count, not that the counts sit
/// at its keys; a merge reads only the bins of its keys, so it dropped the count and produced a
/// sketch whose own bytes no longer decoded (the buffered window became unreadable).
#[test]
fn sketch_counts_outside_the_keys_are_refused_on_decode() {
    let op = MergeOp::Ddsketch { relative_accuracy: 0.02, max_bins: 64 };
    let mut a = sketch(&op, 3.0);
    a.merge(&sketch(&op, 4.5), &op).unwrap();
    let mut w = wire(&a);
    let top = (w.store.max_key - w.store.offset) as usize;
    assert!(top + 2 < w.store.bins.len());
    w.store.bins[top + 2] = w.store.bins[top];
    w.store.bins[top] = 0;
    assert!(decode(&w).is_err(), "a count two bins past max_key");
}

/// Counts past 2^53 are refused on decode, and a merge that would pass it is an overflow:
/// `sketches-ddsketch` adds counts without overflow checks.
#[test]
fn sketch_counts_are_bounded() {
    let op = MergeOp::from_name("ddsketch").unwrap();
    let mut w = wire(&sketch(&op, 3.0));
    w.zero_count = u64::MAX;
    assert!(decode(&w).is_err(), "a count that overflows u64");
    w.zero_count = 1 << 53;
    assert!(decode(&w).is_err(), "a count past MAX_SKETCH_COUNT");
    w.zero_count = (1 << 53) - 1;
    let big = Aggregate::Ddsketch(decode(&w).expect("a count at the bound decodes"));
    let mut acc = sketch(&op, 1.0);
    assert_eq!(acc.merge(&big, &op), Err(MergeError::Overflow));
    assert_eq!(acc, sketch(&op, 1.0), "a refused merge changes nothing");
}

/// `merge`: sums of +inf and -inf merged into NaN, which decoding refuses: the merged window
/// could not be stored and read back. A sketch sum that leaves f64 is an overflow, as in `sum_f64`.
#[test]
fn sketch_sums_past_f64_are_an_overflow() {
    let op = MergeOp::from_name("ddsketch").unwrap();
    let mut up = sketch(&op, f64::MAX);
    assert_eq!(up.merge(&sketch(&op, f64::MAX), &op), Err(MergeError::Overflow));
    assert_eq!(up, sketch(&op, f64::MAX));
    let mut down = sketch(&op, -f64::MAX);
    down.merge(&sketch(&op, 1.0), &op).unwrap();
    let Aggregate::Ddsketch(s) = &down else { unreachable!() };
    postcard::from_bytes::<Sketch>(&postcard::to_allocvec(s).unwrap()).expect("decodes");
}

/// `merge`: JSON is stored as its text, and serde_json parsed some floats one ulp off without
/// `float_roundtrip`: the value changed each time it was stored and read back.
#[test]
fn json_floats_survive_storage_exactly() {
    for f in [-2.073713403038841e-180, 0.1, 1.7976931348623157e308, 5e-324, 2.2250738585072014e-308] {
        let v = Value::Json(serde_json::json!({ "x": f }));
        let bytes = postcard::to_allocvec(&v).unwrap();
        let back: Value = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, v);
        assert_eq!(postcard::to_allocvec(&back).unwrap(), bytes, "{f}");
    }
}

/// `merge`: `count` accepted NaN and infinities (every other operator refuses them, as
/// `Value::Float` documents), and they reached the stream's samples.
#[test]
fn count_refuses_non_finite_values() {
    for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert_eq!(MergeOp::Count.lift(&Value::Float(f), 0).unwrap_err().code(), "not_finite");
    }
    assert_eq!(MergeOp::Count.lift(&Value::Float(1.5), 0), Ok(Aggregate::Count(1)));
}

/// `apply`: a forged partial with `inputs = u64::MAX` overflowed the shard's input total (and
/// the sums the raft and server crates make of partial and output inputs). The entry check
/// bounds a partial's inputs, and the shard totals saturate as window counts do.
#[test]
fn partial_inputs_are_bounded_and_totals_cannot_overflow() {
    use coalesce_core::batch::{MAX_PARTIAL_INPUTS, Partial};
    use coalesce_core::buffer::{BufKey, IngestBatch, MemStore, ShardBuffer};
    use coalesce_core::stream::{OverflowPolicy, ShardLimits, StreamRules};
    use coalesce_core::window::WindowPolicy;

    let p = |inputs| Partial { agg: Aggregate::Count(1), inputs, first_event_at: 0, last_event_at: 0, samples: None };
    assert!(p(MAX_PARTIAL_INPUTS).check(&MergeOp::Count).is_ok());
    assert!(p(MAX_PARTIAL_INPUTS + 1).check(&MergeOp::Count).is_err());
    assert!(p(u64::MAX).check(&MergeOp::Count).is_err());

    let rules = StreamRules {
        op: MergeOp::Count,
        window: WindowPolicy { tumbling_ms: Some(1000), ..WindowPolicy::default() },
        overflow: OverflowPolicy::Reject,
        samples: None,
        key_overflow: Default::default(),
    };
    let key = |k: &str| BufKey { stream: "s".into(), key: k.into() };
    let mut store = MemStore::default();
    let batch = IngestBatch {
        stamp: 1,
        rules: [("s".to_owned(), rules)].into(),
        limits: ShardLimits::default(),
        partials: vec![(key("a"), p(u64::MAX)), (key("b"), p(u64::MAX))],
    };
    ShardBuffer::apply_ingest(&mut store, &batch).unwrap();
    assert_eq!(store.stats.inputs_total, u64::MAX);
}
