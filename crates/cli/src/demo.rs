//! `coalescectl demo`: the embedded default. Starts a local cluster of real `coalesced`
//! processes on loopback (data and logs under `--dir`), runs a Zipf-skewed producer on three
//! example streams and a subscriber, and prints every second what goes in and what comes out,
//! until Ctrl-C (or `--seconds`). Stopping sends SIGTERM: nodes hand off leadership and exit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use coalesce_cli::outln;
use coalesce_client::{Client, event};
use coalesce_proto::v1 as pb;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use tokio::sync::Mutex;

use coalesce_cli::local::{LocalCluster, LocalOptions};

const STREAMS: &str = r#"# Demo streams (see deploy/examples/streams.toml for every option).
# The leader of each shard also writes profile outputs to a JSON-lines file per node (a sink;
# see docs/sinks.md), next to the nodes' data directories.
[sinks.profile-file]
kind = "file"
path = "../profile-outputs-{node}.jsonl"

# The demo's own subscriber ("demo"), declared so the outboxes keep outputs until it acks them.
[sinks.demo]
kind = "grpc"

[streams.page-views]
merge = "sum_i64"
window = { tumbling = "1s" }

[streams.visitors]
merge = { op = "hll", precision = 12 }
window = { tumbling = "2s" }

[streams.profile]
merge = "latest"
window = { debounce = "300ms", max_wait = "2s" }
sinks = ["profile-file"]
"#;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Directory for configs, data and logs (wiped at start, kept after exit).
    #[arg(long, default_value = ".coalesce-data/demo")]
    dir: PathBuf,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Number of shards.
    #[arg(long, default_value_t = 8)]
    shards: u32,
    /// Target input events per second (0: no producer and no subscriber, an idle cluster).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Number of distinct keys (Zipf(1.1)-skewed).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long)]
    seconds: Option<u64>,
}

#[derive(Default)]
struct Counters {
    inputs: AtomicU64,
    outputs: AtomicU64,
    output_inputs: AtomicU64,
    retries: AtomicU64,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.shards == 0 || args.keys == 0 {
        bail!("--nodes, --shards and --keys must be at least 1");
    }
    let opts = LocalOptions {
        cluster: "demo".into(),
        nodes: args.nodes,
        shards: args.shards,
        streams: STREAMS.into(),
        raft: String::new(),
        log_filter: "info,openraft=error".into(),
        extra: String::new(),
        env: Vec::new(),
        proxied: false,
    };
    let mut cluster = LocalCluster::launch(&args.dir, &opts)?;
    outln!(
        "started {} coalesced nodes (logs: {}/node-*.log); waiting for shard leaders…",
        args.nodes,
        args.dir.display()
    );
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect_lazy(addrs.iter().cloned())?;
    if let Err(e) = client.wait_ready(Duration::from_secs(60)).await {
        cluster.stop_all(Duration::from_secs(5));
        return Err(anyhow::anyhow!("{e}; see the node logs"));
    }

    outln!("\nclient ports: {}", addrs.join(", "));
    outln!("try, in another terminal:");
    if let Ok(me) = std::env::current_exe() {
        outln!("  alias coalescectl={}", me.display());
    }
    outln!("  export COALESCE_ADDR={}", addrs[0]);
    outln!("  coalescectl status                  # each shard's leader, epoch, replicas, buffer");
    outln!("  coalescectl tail --stream page-views --limit 5");
    outln!("  echo '{{\"stream\":\"page-views\",\"key\":\"home\",\"value\":1}}' | coalescectl send");
    outln!("  coalescectl leases                  # who leads each shard, as Kubernetes Leases");
    outln!("  coalescectl hot-keys                # the heaviest keys by input rate");

    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let sample: Arc<Mutex<Option<pb::Output>>> = Arc::default();
    let lanes = if args.rate == 0 { 0 } else { 4u64 };
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        tasks.push(tokio::spawn(produce(
            client.clone(),
            (args.rate / lanes).max(1),
            args.keys,
            lane,
            stop.clone(),
            counters.clone(),
        )));
    }
    let subscriber = (args.rate > 0)
        .then(|| tokio::spawn(subscribe(addrs[0].clone(), counters.clone(), sample.clone(), stop.clone())));

    outln!("\n{:>5} {:>10} {:>10} {:>8}  leaders", "sec", "inputs/s", "outputs/s", "ratio");
    let started = Instant::now();
    let (mut last_in, mut last_out) = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let (inputs, outputs) = (counters.inputs.load(Ordering::Relaxed), counters.outputs.load(Ordering::Relaxed));
        let (din, dout) = (inputs - last_in, outputs - last_out);
        (last_in, last_out) = (inputs, outputs);
        let leaders = leader_counts(&client).await;
        let secs = started.elapsed().as_secs();
        outln!("{secs:>5} {din:>10} {dout:>10} {:>7.1}x  {leaders}", din as f64 / dout.max(1) as f64);
        if secs.is_multiple_of(5)
            && let Some(o) = sample.lock().await.take()
        {
            outln!(
                "      e.g. {} {:?} shard {} seq {}: {} inputs → {}",
                o.stream,
                o.key,
                o.shard,
                o.seq,
                o.inputs,
                o.value_json
            );
        }
        if args.seconds.is_some_and(|s| secs >= s) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    if let Some(s) = subscriber {
        s.abort();
    }
    outln!("\nstopping: SIGTERM → each node hands off its shards and exits…");
    cluster.stop_all(Duration::from_secs(20));
    let (inputs, outputs) = (counters.inputs.load(Ordering::Relaxed), counters.outputs.load(Ordering::Relaxed));
    outln!(
        "{inputs} events acknowledged, {outputs} outputs received ({:.1}x fewer writes downstream); {} retried requests",
        inputs as f64 / outputs.max(1) as f64,
        counters.retries.load(Ordering::Relaxed)
    );
    outln!("data and logs kept in {}", args.dir.display());
    outln!("profile outputs delivered by the file sink: {}/profile-outputs-*.jsonl", args.dir.display());
    Ok(())
}

async fn leader_counts(client: &Client) -> String {
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for (_, st) in client.statuses().await {
        for s in st.map(|st| st.local_shards).unwrap_or_default() {
            if !s.leader.is_empty() && seen.insert(s.shard) {
                *by_node.entry(s.leader).or_default() += 1;
            }
        }
    }
    by_node.iter().map(|(n, c)| format!("{n}:{c}")).collect::<Vec<_>>().join(" ")
}

/// One producer lane: an idempotent producer sending to the shard leaders, retrying with the
/// same seqs until every event is acknowledged.
async fn produce(client: Client, rate: u64, keys: u64, lane: u64, stop: Arc<AtomicBool>, counters: Arc<Counters>) {
    let mut rng = StdRng::seed_from_u64(lane);
    let Ok(zipf) = Zipf::new(keys as f64, 1.1) else { return };
    let mut producer = client.producer();
    let per_tick = (rate / 20).max(1);
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let events: Vec<pb::Event> = (0..per_tick)
            .map(|i| {
                n += 1;
                let key = format!("page-{}", zipf.sample(&mut rng) as u64);
                match i % 4 {
                    0 | 1 => event("page-views", &key, 1i64),
                    2 => event("visitors", &key, format!("visitor-{}", rng.random_range(0..5_000))),
                    _ => event("profile", &key, format!("{{\"rev\":{n}}}")),
                }
            })
            .collect();
        match producer.send(events).await {
            Ok(report) => {
                counters.inputs.fetch_add(report.acked() as u64, Ordering::Relaxed);
                counters.retries.fetch_add(report.retries, Ordering::Relaxed);
            }
            Err(e) => eprintln!("producer: {e}"),
        }
    }
}

/// Follows every shard's outputs on one node and acks them once a second.
async fn subscribe(
    addr: String,
    counters: Arc<Counters>,
    sample: Arc<Mutex<Option<pb::Output>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut client) = crate::connect(&addr).await else { return };
        // Acks go over their own connection: while this task waits for an ack, nobody reads
        // the subscription, and outputs it has not read could fill the shared connection's
        // HTTP/2 flow-control window and hold back the ack's answer.
        let Ok(mut acks) = crate::connect(&addr).await else { return };
        let req = pb::SubscribeRequest { consumer: "demo".into(), shards: Vec::new(), from_seq: Default::default() };
        let Ok(resp) = client.subscribe(req).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut stream = resp.into_inner();
        let mut acked: BTreeMap<u32, u64> = BTreeMap::new();
        let mut last_ack = Instant::now();
        while let Ok(Some(batch)) = stream.message().await {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            for o in batch.outputs {
                counters.outputs.fetch_add(1, Ordering::Relaxed);
                counters.output_inputs.fetch_add(o.inputs, Ordering::Relaxed);
                acked.insert(o.shard, o.seq);
                if o.stream == "page-views" && o.inputs > 3 {
                    *sample.lock().await = Some(o);
                }
            }
            if last_ack.elapsed() >= Duration::from_secs(1) {
                for (shard, seq) in &acked {
                    let _ = acks.ack(pb::AckRequest { consumer: "demo".into(), shard: *shard, upto_seq: *seq }).await;
                }
                last_ack = Instant::now();
            }
        }
    }
}
