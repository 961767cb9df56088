//! Merge + buffer throughput over 100k Zipf(1.1)-skewed keys, for sum and latest-wins.
//! `cargo bench -p coalesce-core --bench merge`; results in docs/benchmarks.md.
//!
//! - `premerge`: validating events and pre-merging them per key into batches (what every
//!   ingest node does), 1,000 events per request.
//! - `apply`: applying pre-merged batches to the shard buffer (what the state machine does).

use std::collections::BTreeMap;

use coalesce_core::batch::{BatchBuilder, Event};
use coalesce_core::buffer::{IngestBatch, MemStore, ShardBuffer};
use coalesce_core::stream::StreamsFile;
use coalesce_core::value::Value;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};

const EVENTS: usize = 100_000;
const PER_REQUEST: usize = 1_000;

fn events(stream: &str, value: impl Fn(usize) -> Value) -> Vec<Event> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let zipf = Zipf::new(100_000.0, 1.1).expect("zipf");
    (0..EVENTS)
        .map(|i| Event {
            stream: stream.into(),
            key: format!("key-{}", zipf.sample(&mut rng) as u64),
            value: value(i),
            event_time: Some(1_000 + i as u64),
            producer: None,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let table = StreamsFile::parse(
        "[streams.sum]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1h\" }\n\
         [streams.latest]\nmerge = \"latest\"\nwindow = { tumbling = \"1h\" }\n",
    )
    .and_then(|f| f.validate(&[]))
    .expect("bench config");
    let rules: BTreeMap<_, _> = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
    for (name, evs) in
        [("sum", events("sum", |i| Value::Int(i as i64 % 100))), ("latest", events("latest", |i| Value::Int(i as i64)))]
    {
        let mut g = c.benchmark_group(format!("{name}/100k-keys-zipf1.1"));
        g.throughput(Throughput::Elements(EVENTS as u64));
        g.sample_size(20);
        g.bench_function("premerge", |b| {
            b.iter(|| {
                let mut partials = 0;
                for chunk in evs.chunks(PER_REQUEST) {
                    let mut builder = BatchBuilder::new(&table, 1, 10_000);
                    for e in chunk {
                        builder.add(e).expect("valid");
                    }
                    partials += builder.finish().values().map(|b| b.partials()).sum::<usize>();
                }
                partials
            })
        });
        let batches: Vec<IngestBatch> = evs
            .chunks(PER_REQUEST)
            .map(|chunk| {
                let mut builder = BatchBuilder::new(&table, 1, 10_000);
                for e in chunk {
                    builder.add(e).expect("valid");
                }
                let partials = builder.finish().into_values().flat_map(|b| b.groups).flat_map(|g| g.partials).collect();
                IngestBatch { stamp: 10_000, rules: rules.clone(), limits: table.limits(), partials }
            })
            .collect();
        g.bench_function("apply", |b| {
            b.iter_batched(
                MemStore::default,
                |mut store| {
                    for batch in &batches {
                        ShardBuffer::apply_ingest(&mut store, batch).expect("mem");
                    }
                    store
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
