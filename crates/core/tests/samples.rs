//! Representative samples end to end: events → pre-merge → apply → seal → output, for an
//! alert-grouping stream with each pick, and the merge laws the samples rely on.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use coalesce_core::batch::{BatchBuilder, Event, Partial};
use coalesce_core::buffer::{IngestBatch, MemStore, ShardBuffer};
use coalesce_core::merge::Aggregate;
use coalesce_core::output::Output;
use coalesce_core::samples::{SamplePick, SamplePolicy, Samples, sample_priority, sample_salt};
use coalesce_core::stream::{StreamTable, StreamsFile};
use coalesce_core::value::Value;
use proptest::prelude::*;

const CONFIG: &str = r#"
[streams.alerts-first]
merge = "count"
window = { tumbling = "1m" }
samples = { n = 3, pick = "first" }

[streams.alerts-last]
merge = "count"
window = { tumbling = "1m" }
samples = { n = 3, pick = "last" }

[streams.alerts-reservoir]
merge = "count"
window = { tumbling = "1m" }
samples = { n = 3, pick = "reservoir" }

[streams.plain]
merge = "count"
window = { tumbling = "1m" }
"#;

fn table() -> StreamTable {
    StreamsFile::parse(CONFIG).and_then(|f| f.validate(&[])).unwrap()
}

fn alert(stream: &str, group: &str, i: u64, producer: Option<(u64, u64)>) -> Event {
    Event {
        stream: stream.into(),
        key: group.into(),
        value: Value::Json(serde_json::json!({ "alertname": "DiskFull", "instance": format!("node-{i}") })),
        event_time: Some(1_000 + i),
        producer,
    }
}

/// Sends `events` in requests of the given sizes (cycled) through pre-merge and apply, one
/// shard, then seals everything; returns the outputs by (stream, key).
fn run(table: &StreamTable, events: &[Event], request_sizes: &[usize]) -> BTreeMap<(String, String), Output> {
    let mut store = MemStore::default();
    let mut outputs = Vec::new();
    let rules: BTreeMap<_, _> = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
    let mut rest = events;
    for (now, size) in (10_000u64..).zip(request_sizes.iter().cycle()) {
        if rest.is_empty() {
            break;
        }
        let (req, tail) = rest.split_at((*size).clamp(1, rest.len()));
        rest = tail;
        let mut b = BatchBuilder::new(table, 1, now);
        for e in req {
            b.add(e).unwrap();
        }
        let partials: Vec<_> =
            b.finish().into_values().flat_map(|batch| batch.groups).flat_map(|g| g.partials).collect();
        let entry = IngestBatch { stamp: now, rules: rules.clone(), limits: table.limits(), partials };
        outputs.extend(ShardBuffer::apply_ingest(&mut store, &entry).unwrap().outputs);
    }
    outputs.extend(ShardBuffer::seal_due(&mut store, u64::MAX / 2, usize::MAX).unwrap());
    assert_eq!(store.stats.keys, 0);
    assert_eq!(store.stats.bytes, 0, "sample bytes are released with the window");
    outputs.into_iter().map(|o| ((o.stream.clone(), o.key.clone()), o)).collect()
}

fn instances(o: &Output) -> Vec<String> {
    o.samples
        .as_ref()
        .unwrap()
        .iter()
        .map(|s| match &s.value {
            Value::Json(j) => j["instance"].as_str().unwrap().to_owned(),
            v => panic!("json sample, got {v:?}"),
        })
        .collect()
}

#[test]
fn alert_groups_carry_first_last_and_reservoir_samples_and_exact_counts() {
    let table = table();
    let mut events = Vec::new();
    for stream in ["alerts-first", "alerts-last", "alerts-reservoir", "plain"] {
        for i in 0..40 {
            events.push(alert(stream, "team-a/DiskFull", i, Some((7, events.len() as u64 + 1))));
        }
        // A quiet group: fewer inputs than n.
        events.push(alert(stream, "team-b/DiskFull", 99, Some((7, events.len() as u64 + 1))));
    }
    let out = run(&table, &events, &[5, 3, 11]);
    let get = |s: &str, k: &str| &out[&(s.to_owned(), k.to_owned())];

    let first = get("alerts-first", "team-a/DiskFull");
    assert_eq!(first.inputs, 40, "the exact suppressed count");
    assert_eq!(first.value, Aggregate::Count(40));
    assert_eq!(instances(first), ["node-0", "node-1", "node-2"]);
    let first_times: Vec<u64> = first.samples.as_ref().unwrap().iter().map(|s| s.event_time).collect();
    assert_eq!(first_times, [1_000, 1_001, 1_002]);

    let last = get("alerts-last", "team-a/DiskFull");
    assert_eq!(last.inputs, 40);
    assert_eq!(instances(last), ["node-37", "node-38", "node-39"]);

    let res = get("alerts-reservoir", "team-a/DiskFull");
    assert_eq!(res.inputs, 40);
    assert_eq!(res.samples.as_ref().unwrap().len(), 3);
    // The reservoir is the 3 inputs of smallest priority, computed here from scratch.
    let mut by_priority: Vec<(u64, String)> = events
        .iter()
        .filter(|e| e.stream == "alerts-reservoir" && e.key == "team-a/DiskFull")
        .map(|e| {
            let p = sample_priority(&e.value, e.event_time.unwrap(), sample_salt(e.producer, 0, 0));
            let Value::Json(j) = &e.value else { unreachable!() };
            (p, j["instance"].as_str().unwrap().to_owned())
        })
        .collect();
    by_priority.sort();
    let mut want: Vec<String> = by_priority.into_iter().take(3).map(|(_, i)| i).collect();
    let mut got = instances(res);
    want.sort();
    got.sort();
    assert_eq!(got, want);
    let times: Vec<u64> = res.samples.as_ref().unwrap().iter().map(|s| s.event_time).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "reservoir samples are listed by event time");

    for s in ["alerts-first", "alerts-last", "alerts-reservoir"] {
        let quiet = get(s, "team-b/DiskFull");
        assert_eq!((quiet.inputs, instances(quiet)), (1, vec!["node-99".to_owned()]), "{s}");
    }
    assert_eq!(get("plain", "team-a/DiskFull").samples, None, "no policy, no samples");

    let json = first.to_json();
    assert_eq!(json["inputs"], 40);
    assert_eq!(json["samples"][0]["value"]["instance"], "node-0");
    assert_eq!(json["samples"][0]["event_time"], 1_000);
    assert!(get("plain", "team-a/DiskFull").to_json().get("samples").is_none());
}

#[test]
fn samples_survive_postcard_and_count_against_the_byte_limit() {
    let table = table();
    let mut b = BatchBuilder::new(&table, 1, 0);
    for i in 0..5 {
        b.add(&alert("alerts-last", "g", i, None)).unwrap();
    }
    let partial: Partial = b.finish().into_values().next().unwrap().groups.remove(0).partials.remove(0).1;
    assert_eq!(partial.inputs, 5);
    let bytes = postcard::to_allocvec(&partial).unwrap();
    assert_eq!(postcard::from_bytes::<Partial>(&bytes).unwrap(), partial);
    let plain = Partial { samples: None, ..partial.clone() };
    let key = coalesce_core::buffer::BufKey { stream: "alerts-last".into(), key: "g".into() };
    assert!(
        ShardBuffer::new_key_bytes(&key, &partial)
            >= ShardBuffer::new_key_bytes(&key, &plain) + partial.samples.as_ref().unwrap().size() as u64
    );
}

#[test]
fn sample_config_errors_name_the_field() {
    let err = |t: &str| StreamsFile::parse(t).and_then(|f| f.validate(&[])).unwrap_err().to_string();
    assert_eq!(
        err("[streams.a]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }\nsamples = { n = 40 }"),
        "stream \"a\": samples.n must be in 1..=32"
    );
    assert_eq!(
        err("[streams.a]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }\nmax_value_bytes = 100\n\
             samples = { n = 1, max_value_bytes = 200 }"),
        "stream \"a\": samples.max_value_bytes must be <= max_value_bytes (100)"
    );
    assert!(
        err("[streams.a]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }\nsamples = { n = 1, pick = \"any\" }")
            .contains("unknown variant `any`")
    );
}

fn ints(s: &Samples) -> Vec<i64> {
    s.iter()
        .map(|s| match s.value {
            Value::Int(i) => i,
            _ => unreachable!(),
        })
        .collect()
}

fn items() -> impl Strategy<Value = Vec<(i64, u64, u64)>> {
    prop::collection::vec((-5i64..5, 0u64..4, any::<u64>()), 0..60)
}

fn singles(items: &[(i64, u64, u64)], policy: &SamplePolicy) -> Vec<Samples> {
    items.iter().map(|(v, t, salt)| Samples::of(&Value::Int(*v), *t, *salt, policy)).collect()
}

/// Merges `parts` left to right, each part pre-merged on its own (a partial).
fn grouped(parts: &[Samples], cuts: &[usize], policy: &SamplePolicy) -> Samples {
    let mut acc = Samples::default();
    let mut start = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (parts.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(parts.len());
    for end in cuts {
        if end < start {
            continue;
        }
        let mut partial = Samples::default();
        for s in &parts[start..end] {
            partial.merge(s, policy);
        }
        acc.merge(&partial, policy);
        start = end;
    }
    acc
}

proptest! {
    /// Every pick is associative: grouping inputs into partials never changes the samples.
    #[test]
    fn grouping_never_changes_the_samples(
        items in items(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        n in 1u8..6,
        pick in prop::sample::select(vec![SamplePick::First, SamplePick::Last, SamplePick::Reservoir]),
    ) {
        let policy = SamplePolicy { n, pick, max_value_bytes: 64 };
        let parts = singles(&items, &policy);
        let one_by_one = grouped(&parts, &[], &policy);
        prop_assert_eq!(&grouped(&parts, &cuts, &policy), &one_by_one);
        prop_assert_eq!(one_by_one.len(), items.len().min(n as usize));
        match pick {
            SamplePick::First => {
                let head: Vec<i64> = items.iter().take(n as usize).map(|i| i.0).collect();
                let got = ints(&one_by_one);
                prop_assert_eq!(got, head);
            }
            SamplePick::Last => {
                let tail: Vec<i64> = items.iter().rev().take(n as usize).rev().map(|i| i.0).collect();
                let got = ints(&one_by_one);
                prop_assert_eq!(got, tail);
            }
            SamplePick::Reservoir => {}
        }
    }

    /// The reservoir is also commutative: any merge order of any grouping gives the same sample.
    #[test]
    fn reservoir_is_order_independent(
        items in items(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        shuffle_seed in any::<u64>(),
        n in 1u8..6,
    ) {
        let policy = SamplePolicy { n, pick: SamplePick::Reservoir, max_value_bytes: 64 };
        let mut parts = singles(&items, &policy);
        let reference = grouped(&parts, &[], &policy);
        // Deterministic Fisher-Yates from the seed.
        let mut x = shuffle_seed | 1;
        for i in (1..parts.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            parts.swap(i, (x % (i as u64 + 1)) as usize);
        }
        prop_assert_eq!(grouped(&parts, &cuts, &policy), reference);
    }

    /// End to end: however a producer's events are split into requests, the reservoir and the
    /// count in the output are the same.
    #[test]
    fn outputs_do_not_depend_on_request_boundaries(
        n_events in 1u64..80,
        sizes_a in prop::collection::vec(1usize..20, 1..5),
        sizes_b in prop::collection::vec(1usize..20, 1..5),
    ) {
        let table = table();
        let events: Vec<Event> = (0..n_events)
            .map(|i| alert("alerts-reservoir", "g", i % 7, Some((3, i + 1))))
            .collect();
        let a = run(&table, &events, &sizes_a);
        let b = run(&table, &events, &sizes_b);
        let key = ("alerts-reservoir".to_owned(), "g".to_owned());
        prop_assert_eq!(a[&key].inputs, n_events);
        prop_assert_eq!(&a[&key].samples, &b[&key].samples);
        prop_assert_eq!(a[&key].samples.as_ref().unwrap().len() as u64, n_events.min(3));
    }
}

/// What an entry or buffered window encoded before samples existed looks like to postcard.
#[derive(serde::Serialize)]
struct OldPartial {
    agg: Aggregate,
    inputs: u64,
    first_event_at: u64,
    last_event_at: u64,
}

/// Postcard is positional: the layout before samples is refused, not misread into defaults.
/// (If storage gains a format version and a migration, this is the test to change.)
#[test]
fn old_encodings_are_refused() {
    let old = OldPartial { agg: Aggregate::Count(3), inputs: 3, first_event_at: 1, last_event_at: 2 };
    let bytes = postcard::to_allocvec(&old).unwrap();
    assert_eq!(postcard::from_bytes::<Partial>(&bytes).unwrap_err(), postcard::Error::DeserializeUnexpectedEnd);
}
