//! In-process demo of the coalescing core: a Zipf-skewed producer writes to three streams of a
//! 4-shard buffer on a simulated clock; every simulated second prints inputs, outputs and the
//! coalesce ratio, plus one sample output. `cargo run -p coalesce-core --example demo -- 10`
//! runs 10 simulated seconds (default 10).

use std::collections::BTreeMap;

use coalesce_core::batch::{BatchBuilder, Event};
use coalesce_core::buffer::{IngestBatch, MemStore, ShardBuffer};
use coalesce_core::stream::StreamsFile;
use coalesce_core::value::Value;
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};

const CONFIG: &str = r#"
[streams.page-views]
merge = "sum_i64"
window = { tumbling = "1s" }

[streams.profile]
merge = "latest"
window = { debounce = "300ms", max_wait = "2s" }

[streams.visitors]
merge = { op = "hll", precision = 12 }
window = { tumbling = "1s" }
"#;

const SHARDS: u32 = 4;
const EVENTS_PER_SECOND: u64 = 50_000;
const KEYS: f64 = 10_000.0;

fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let table = StreamsFile::parse(CONFIG).and_then(|f| f.validate(&[])).expect("demo config is valid");
    let rules: BTreeMap<_, _> = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
    let mut shards: Vec<MemStore> = (0..SHARDS).map(|_| MemStore::default()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let zipf = Zipf::new(KEYS, 1.1).expect("valid zipf");
    let start: u64 = 1_700_000_000_000;
    let (mut total_in, mut total_out) = (0u64, 0u64);
    println!("coalesce core demo: {EVENTS_PER_SECOND} events/s, Zipf(1.1) over {KEYS} keys, {SHARDS} shards\n");
    println!("{:>4} {:>10} {:>10} {:>8}", "sec", "inputs", "outputs", "ratio");
    for sec in 0..seconds {
        let (mut inputs, mut outputs) = (0u64, 0u64);
        let mut sample = None;
        // 100 requests of 500 events per simulated second, 10 ms apart.
        for req in 0..100u64 {
            let now = start + sec * 1000 + req * 10;
            let mut builder = BatchBuilder::new(&table, SHARDS, now);
            for i in 0..EVENTS_PER_SECOND / 100 {
                let k = zipf.sample(&mut rng) as u64;
                let (stream, value) = match i % 3 {
                    0 => ("page-views", Value::Int(1)),
                    1 => ("profile", Value::Str(format!("v{i}"))),
                    _ => ("visitors", Value::Str(format!("visitor-{}", i % 977))),
                };
                let event =
                    Event { stream: stream.into(), key: format!("k{k}"), value, event_time: None, producer: None };
                builder.add(&event).expect("demo events are valid");
                inputs += 1;
            }
            for (shard, batch) in builder.finish() {
                let store = &mut shards[shard as usize];
                let partials = batch.groups.into_iter().flat_map(|g| g.partials).collect();
                let entry = IngestBatch { stamp: now, rules: rules.clone(), limits: table.limits(), partials };
                outputs += ShardBuffer::apply_ingest(store, &entry).expect("in-memory store").outputs.len() as u64;
                let sealed = ShardBuffer::seal_due(store, now, usize::MAX).expect("in-memory store");
                outputs += sealed.len() as u64;
                if sample.is_none() {
                    sample = sealed.into_iter().find(|o| o.stream == "page-views");
                }
            }
        }
        total_in += inputs;
        total_out += outputs;
        println!("{:>4} {:>10} {:>10} {:>7.1}x", sec + 1, inputs, outputs, inputs as f64 / outputs.max(1) as f64);
        if let Some(o) = sample {
            println!("     sample output: {}", o.to_json());
        }
    }
    let buffered: u64 = shards.iter().map(|s| s.stats.keys).sum();
    println!(
        "\ntotal: {total_in} inputs -> {total_out} outputs ({:.1}x fewer writes downstream), {buffered} keys still buffered",
        total_in as f64 / total_out.max(1) as f64
    );
}
