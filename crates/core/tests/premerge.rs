//! Pre-merging a request per key (per producer) equals merging the events one by one.

use std::collections::BTreeMap;

use coalesce_core::batch::{BatchBuilder, Event};
use coalesce_core::hash::shard_for;
use coalesce_core::merge::Aggregate;
use coalesce_core::stream::StreamsFile;
use coalesce_core::value::Value;
use proptest::prelude::*;

proptest! {
    #[test]
    fn premerge_matches_per_key_model(events in prop::collection::vec((0u8..40, -1000i64..1000, 0u64..3, prop::bool::ANY), 1..400)) {
        let table = StreamsFile::parse("[streams.a]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1s\" }\n[streams.b]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1s\" }")
            .and_then(|f| f.validate(&[])).unwrap();
        let mut builder = BatchBuilder::new(&table, 4, 0);
        let mut model: BTreeMap<(Option<u64>, String, String), (i64, u64)> = BTreeMap::new();
        let mut seqs = [0u64; 3];
        for (k, v, producer, stream_b) in &events {
            let stream = if *stream_b { "b" } else { "a" };
            let key = format!("key-{k}");
            let producer = (*producer > 0).then(|| { seqs[*producer as usize] += 1; (*producer, seqs[*producer as usize]) });
            let shard = builder.add(&Event { stream: stream.into(), key: key.clone(), value: Value::Int(*v), event_time: None, producer }).unwrap();
            prop_assert_eq!(shard, shard_for(stream, &key, 4));
            let e = model.entry((producer.map(|p| p.0), stream.to_owned(), key)).or_default();
            e.0 += v;
            e.1 += 1;
        }
        let mut got: BTreeMap<(Option<u64>, String, String), (i64, u64)> = BTreeMap::new();
        for (shard, batch) in builder.finish() {
            for g in batch.groups {
                for (k, p) in g.partials {
                    prop_assert_eq!(shard, shard_for(&k.stream, &k.key, 4));
                    let Aggregate::SumI64(s) = p.agg else { panic!("sum") };
                    let prev = got.insert((g.range.map(|r| r.producer), k.stream, k.key), (s, p.inputs));
                    prop_assert!(prev.is_none(), "one partial per (producer, key)");
                }
            }
        }
        prop_assert_eq!(got, model);
    }
}

/// Event indices are positions in the request, counting refused and skipped events too: the
/// server maps each group's outcome back to its events by them, so a shifted index would report
/// a refused event as acknowledged (a bug once: a value that failed to decode was not counted).
#[test]
fn event_indices_count_refused_and_skipped_events() {
    let table = StreamsFile::parse("[streams.a]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1s\" }")
        .and_then(|f| f.validate(&[]))
        .unwrap();
    let mut builder = BatchBuilder::new(&table, 1, 0);
    let ev = |stream: &str, key: &str| Event {
        stream: stream.into(),
        key: key.into(),
        value: Value::Int(1),
        event_time: None,
        producer: None,
    };
    builder.add(&ev("a", "x")).unwrap(); // 0
    assert!(builder.add(&ev("nope", "x")).is_err()); // 1: refused by the builder
    builder.skip(); // 2: refused by the caller before the builder saw it
    builder.add(&ev("a", "y")).unwrap(); // 3
    let batches = builder.finish();
    let indices: Vec<u32> = batches.values().flat_map(|b| b.groups.iter().flat_map(|g| g.events.clone())).collect();
    assert_eq!(indices, vec![0, 3]);
}

/// Under `key_overflow = "reject"` a key keeps one partial per request and producer: the event
/// that would take it past `max_bytes` is refused up front (`key_full_in_request`), since apply
/// would refuse a group holding two partials of the key in every window. Without it, the event
/// starts a second partial (the window is then sealed early at apply). Every event's partial is
/// recorded for the per-event statuses.
#[test]
fn a_reject_stream_keeps_one_partial_per_key_and_refuses_what_would_pass_max_bytes() {
    for (policy, refused) in [("reject", true), ("flush_early", false)] {
        let text = format!(
            "[streams.s]\nmerge = {{ op = \"set_union\", max_members = 1000 }}\n\
             window = {{ tumbling = \"1s\", max_bytes = 100 }}\nkey_overflow = \"{policy}\"\nmax_value_bytes = 20\n"
        );
        let table = StreamsFile::parse(&text).and_then(|f| f.validate(&[])).unwrap();
        let mut builder = BatchBuilder::new(&table, 1, 0);
        let ev = |key: &str, member: &str, seq: u64| Event {
            stream: "s".into(),
            key: key.into(),
            value: Value::Str(member.into()),
            event_time: None,
            producer: Some((7, seq)),
        };
        // A set counts 8 bytes and each 10-byte member 14: six members are 92 bytes, seven 106.
        for i in 0..6 {
            builder.add(&ev("k", &format!("member{i:04}"), i + 1)).unwrap();
        }
        builder.add(&ev("k", "member0000", 7)).expect("a member the set holds adds nothing");
        let seventh = builder.add(&ev("k", "member0006", 8));
        builder.add(&ev("other", "member0000", 9)).unwrap();
        let batches = builder.finish();
        let group = &batches[&0].groups[0];
        let keys: Vec<&str> = group.partials.iter().map(|(k, _)| k.key.as_str()).collect();
        if refused {
            let e = seventh.unwrap_err();
            assert_eq!(e.code(), "key_full_in_request", "{e}");
            assert_eq!(keys, ["k", "other"]);
            assert_eq!(group.events, [0, 1, 2, 3, 4, 5, 6, 8], "the refused event is left out");
            assert_eq!(group.partial_of, [0, 0, 0, 0, 0, 0, 0, 1]);
            assert_eq!(group.range.unwrap().last_seq, 9);
        } else {
            // The size bound (not the exact size) cuts here: the member already held starts the
            // key's second partial, and the next one joins it.
            seventh.unwrap();
            assert_eq!(keys, ["k", "k", "other"]);
            assert_eq!(group.partial_of, [0, 0, 0, 0, 0, 0, 1, 1, 2]);
        }
    }
}
