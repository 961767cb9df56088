//! Random hostile input yields precise errors and never panics, and what is refused changes
//! nothing.

use std::collections::BTreeMap;

use coalesce_core::batch::{BatchBuilder, Event};
use coalesce_core::buffer::{IngestBatch, MemStore, ShardBuffer};
use coalesce_core::error::Category;
use coalesce_core::stream::{StreamTable, StreamsFile};
use coalesce_core::value::Value;
use proptest::prelude::*;

fn table() -> StreamTable {
    StreamsFile::parse(
        r#"
        [streams.sum]
        merge = "sum_i64"
        window = { tumbling = "1s" }
        max_key_bytes = 16
        max_value_bytes = 64
        [streams.fsum]
        merge = "sum_f64"
        window = { tumbling = "1s" }
        [streams.max]
        merge = { op = "max", value_type = "f64" }
        window = { max_wait = "1s" }
        [streams.set]
        merge = { op = "set_union", max_members = 3 }
        window = { max_wait = "1s" }
        [streams.list]
        merge = { op = "append", max_len = 2 }
        window = { max_wait = "1s", max_count = 3 }
        [streams.patch]
        merge = "json_merge_patch"
        window = { debounce = "10ms", max_wait = "1s" }
        [streams.q]
        merge = "ddsketch"
        window = { tumbling = "1s", max_bytes = 200 }
        [streams.hll]
        merge = "hll"
        window = { tumbling = "1s" }
        [streams.latest]
        merge = "latest"
        window = { tumbling = "1s" }
        "#,
    )
    .and_then(|f| f.validate(&[]))
    .expect("test config")
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::None),
        any::<i64>().prop_map(Value::Int),
        prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::MAX), Just(-0.0), any::<f64>()]
            .prop_map(Value::Float),
        ".{0,80}".prop_map(Value::Str),
        prop::collection::vec(any::<u8>(), 0..100).prop_map(Value::Bytes),
        "[{}\\[\\]\":a-c0-9,null ]{0,30}"
            .prop_map(|s| serde_json::from_str(&s).map(Value::Json).unwrap_or(Value::Str(s))),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        prop::sample::select(vec!["sum", "fsum", "max", "set", "list", "patch", "q", "hll", "latest", "nope", ""]),
        ".{0,24}",
        value(),
        prop::option::of(prop_oneof![Just(u64::MAX), Just(0u64), 0u64..100_000]),
        prop::option::of((0u64..3, prop_oneof![Just(0u64), Just(u64::MAX), 0u64..10])),
    )
        .prop_map(|(stream, key, value, event_time, producer)| Event {
            stream: stream.into(),
            key,
            value,
            event_time,
            producer,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn hostile_events_are_refused_precisely_and_never_panic(events in prop::collection::vec(event(), 1..60), now in 0u64..50_000) {
        let table = table();
        let rules: BTreeMap<_, _> = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
        let mut builder = BatchBuilder::new(&table, 4, now);
        let mut accepted = 0usize;
        for e in &events {
            match builder.add(e) {
                Ok(shard) => { prop_assert!(shard < 4); accepted += 1; }
                Err(err) => {
                    prop_assert!(!err.code().is_empty() && !err.to_string().is_empty());
                    if table.get(&e.stream).is_none() {
                        prop_assert_eq!(err.category(), Category::NotFound);
                        prop_assert_eq!(err.field(), "stream");
                    }
                    if matches!(e.value, Value::Float(f) if !f.is_finite()) && table.get(&e.stream).is_some() && !e.key.is_empty() && e.key.len() <= 16 {
                        prop_assert!(matches!(err.code(), "not_finite" | "type_mismatch" | "event_time_in_future" | "sequence_overlap" | "key_too_large"), "{}", err);
                    }
                }
            }
        }
        let batches = builder.finish();
        prop_assert_eq!(batches.values().map(|b| b.events()).sum::<usize>(), accepted, "refused events are left out");
        let mut store = MemStore::default();
        let mut inputs = 0u64;
        let mut outputs_inputs = 0u64;
        for batch in batches.values() {
            let partials: Vec<_> = batch.groups.iter().flat_map(|g| g.partials.clone()).collect();
            inputs += partials.iter().map(|p| p.1.inputs).sum::<u64>();
            let r = ShardBuffer::apply_ingest(&mut store, &IngestBatch { stamp: now, rules: rules.clone(), limits: table.limits(), partials }).unwrap();
            outputs_inputs += r.outputs.iter().map(|o| o.inputs).sum::<u64>();
            for o in &r.outputs { let _ = o.to_json(); }
        }
        prop_assert_eq!(inputs, accepted as u64);
        for o in ShardBuffer::seal_due(&mut store, u64::MAX, usize::MAX).unwrap() {
            outputs_inputs += o.inputs;
            let _ = o.to_json();
        }
        prop_assert_eq!(outputs_inputs, inputs, "every accepted input comes out exactly once");
    }
}
