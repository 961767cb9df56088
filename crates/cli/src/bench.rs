//! `coalescectl bench`: benchmarks that print numbers (never pass/fail).
//!
//! * `bench ingest` — ingest throughput with batched idempotent producers (closed loop), then
//!   ack latency at a fraction of that throughput (open loop, latency measured from each
//!   request's scheduled send time, so a stall is not hidden by the producer waiting on it).
//! * `bench failover` — repeatedly SIGKILLs the leader of a shard of a local cluster and times
//!   kill → first acknowledged write on that shard, restarting the node in between.
//!
//! Both start a local cluster of real `coalesced` processes (the binary next to this one;
//! build with `--release` for numbers worth reporting); `bench ingest --endpoints` measures a
//! running cluster instead. Histograms are HdrHistogram (`hdrhistogram` crate).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use coalesce_client::{Client, Event, Producer, RetryPolicy};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde_json::json;
use tokio::time::Instant;

use coalesce_cli::local::{LocalCluster, LocalOptions};

/// The benchmark's stream: per-key sums in 1 s tumbling windows, limits sized for the load.
const STREAMS: &str = r#"[limits]
max_keys = 4000000
max_bytes = 2147483648

[streams.bench]
merge = "sum_i64"
window = { tumbling = "1s" }
"#;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum BenchCmd {
    /// Ingest throughput and ack latency.
    Ingest(IngestArgs),
    /// Failover time: kill → first acknowledged write, over repeated leader kills.
    Failover(FailoverArgs),
    /// The same workload into PostgreSQL as per-event upserts, through the coalesced sink, and
    /// the sink's raw COPY rate.
    Postgres(crate::bench_pg::PostgresArgs),
    /// Request coalescing: upstream calls and latency, direct vs an in-process singleflight per
    /// node vs the cluster's Fetch.
    Fetch(crate::bench_fetch::FetchArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LocalArgs {
    /// Directory for the local cluster's configs, data and logs (wiped first).
    #[arg(long, default_value = ".coalesce-data/bench")]
    dir: PathBuf,
    /// Nodes of the local cluster.
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: usize,
    /// Shards of the local cluster.
    #[arg(long, default_value_t = 8)]
    pub(crate) shards: u32,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub(crate) json: bool,
    /// Raft heartbeat of the local cluster (default: the node default).
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat: Option<Duration>,
    /// Raft election timeout range of the local cluster, e.g. `300ms..450ms`.
    #[arg(long, value_parser = parse_range)]
    election_timeout: Option<(Duration, Duration)>,
}

fn parse_range(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = s.split_once("..").ok_or("expected MIN..MAX, e.g. 300ms..450ms")?;
    let parse = |v: &str| humantime::parse_duration(v.trim()).map_err(|e| format!("{v:?}: {e}"));
    Ok((parse(a)?, parse(b)?))
}

impl LocalArgs {
    /// The `[raft]` table for the nodes' configs.
    fn raft_toml(&self) -> String {
        let ms = |d: Duration| format!("\"{}ms\"", d.as_millis());
        let mut t = String::new();
        if let Some(h) = self.heartbeat {
            t += &format!("heartbeat = {}\n", ms(h));
        }
        if let Some((min, max)) = self.election_timeout {
            t += &format!("election_timeout_min = {}\nelection_timeout_max = {}\n", ms(min), ms(max));
        }
        t
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct IngestArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// Measure a running cluster at these client addresses (comma-separated) instead of
    /// starting one; it needs a `sum_i64` stream named by `--stream`.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    #[arg(long, default_value = "bench")]
    stream: String,
    /// Concurrent producer lanes (one request in flight each).
    #[arg(long, default_value_t = 16)]
    producers: usize,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Zipf exponent of key popularity (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Seconds per measured phase (after a 2 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Events per second offered in the latency phase (default: `--load` × the measured
    /// saturation throughput).
    #[arg(long)]
    rate: Option<f64>,
    /// Fraction of the measured throughput offered in the latency phase.
    #[arg(long, default_value_t = 0.5)]
    load: f64,
    /// Seed of the key generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, clap::Args)]
pub(crate) struct FailoverArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// Leader kills.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Background load in events/s while killing (0 = only the probe writes).
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Seed choosing which shard's leader dies each round.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub(crate) async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Ingest(args) => ingest(args).await,
        BenchCmd::Failover(args) => failover(args).await,
        BenchCmd::Postgres(args) => crate::bench_pg::run(args).await,
        BenchCmd::Fetch(args) => crate::bench_fetch::run(args).await,
    }
}

/// The machine and build a result was measured on.
pub(crate) fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    json!({
        "cpu": cpu,
        "cores": cores,
        "mem_gib": (mem_gib * 10.0).round() / 10.0,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

pub(crate) async fn start_local(args: &LocalArgs, streams: &str) -> anyhow::Result<LocalCluster> {
    if args.nodes == 0 || args.shards == 0 {
        bail!("--nodes and --shards must be at least 1");
    }
    let opts = LocalOptions {
        cluster: "bench".into(),
        nodes: args.nodes,
        shards: args.shards,
        streams: streams.into(),
        raft: args.raft_toml(),
        log_filter: "warn".into(),
        extra: String::new(),
        env: Vec::new(),
        proxied: false,
    };
    LocalCluster::launch(&args.dir, &opts)
}

pub(crate) fn histogram() -> Histogram<u64> {
    // 1 µs .. 100 s at 3 significant digits.
    #[allow(clippy::expect_used)] // constant, valid bounds
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

pub(crate) fn quantiles_ms(h: &Histogram<u64>) -> serde_json::Value {
    let q = |p: f64| (h.value_at_quantile(p) as f64 / 1000.0 * 100.0).round() / 100.0;
    json!({
        "count": h.len(),
        "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "p999_ms": q(0.999),
        "max_ms": (h.max() as f64 / 1000.0 * 100.0).round() / 100.0,
    })
}

/// Pre-generated keys and a Zipf sampler over them.
pub(crate) struct KeyGen {
    keys: Vec<String>,
    zipf: Option<Zipf<f64>>,
    rng: StdRng,
}

impl KeyGen {
    pub(crate) fn new(keys: u64, s: f64, seed: u64) -> anyhow::Result<Self> {
        if keys == 0 {
            bail!("--keys must be at least 1");
        }
        let zipf = if s > 0.0 { Some(Zipf::new(keys as f64, s).context("--zipf")?) } else { None };
        Ok(Self { keys: (0..keys).map(|k| format!("key-{k:08}")).collect(), zipf, rng: StdRng::seed_from_u64(seed) })
    }

    pub(crate) fn next(&mut self) -> &str {
        let i = match &self.zipf {
            Some(z) => (z.sample(&mut self.rng) as usize).saturating_sub(1),
            None => self.rng.random_range(0..self.keys.len()),
        };
        &self.keys[i.min(self.keys.len() - 1)]
    }

    fn batch(&mut self, stream: &str, n: usize) -> Vec<Event> {
        (0..n).map(|_| coalesce_client::event(stream, self.next(), 1i64)).collect()
    }
}

#[derive(Default)]
struct Phase {
    events: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    failed: AtomicU64,
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    if args.producers == 0 || args.batch == 0 {
        bail!("--producers and --batch must be at least 1");
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be a positive number of events per second");
    }
    if !(args.load > 0.0 && args.load <= 1.0) {
        bail!("--load must be in (0, 1]");
    }
    let mut cluster = None;
    let endpoints = if args.endpoints.is_empty() {
        let c = start_local(&args.local, STREAMS).await?;
        let addrs = c.nodes.iter().map(|n| n.client_addr.clone()).collect();
        cluster = Some(c);
        addrs
    } else {
        args.endpoints.clone()
    };
    let result = ingest_phases(&args, &endpoints).await;
    if let Some(mut c) = cluster {
        c.stop_all(Duration::from_secs(20));
    }
    let report = result?;
    if args.local.json {
        println!("{report}");
    }
    Ok(())
}

async fn ingest_phases(args: &IngestArgs, endpoints: &[String]) -> anyhow::Result<serde_json::Value> {
    let client = Client::connect_lazy(endpoints.iter().cloned())?;
    client.wait_ready(Duration::from_secs(60)).await?;
    let say = |s: String| {
        if !args.local.json {
            println!("{s}");
        }
    };
    say(format!(
        "bench ingest: {} producers × {} events/request, {} keys (zipf {}), {} shards, {} nodes",
        args.producers,
        args.batch,
        args.keys,
        args.zipf,
        client.shards(),
        endpoints.len()
    ));
    // Warm-up, then saturation.
    let (warm, _, _) = run_phase(args, &client, None, Duration::from_secs(2)).await?;
    let (sat, sat_hist, sat_secs) = run_phase(args, &client, None, Duration::from_secs(args.seconds)).await?;
    let throughput = sat.events.load(Ordering::Relaxed) as f64 / sat_secs;
    say(format!(
        "saturation: {:.0} events/s acked ({} requests, {} retried rounds, {} events failed); request latency {}",
        throughput,
        sat.requests.load(Ordering::Relaxed),
        sat.retries.load(Ordering::Relaxed),
        sat.failed.load(Ordering::Relaxed),
        fmt_q(&sat_hist)
    ));
    let offered = args.rate.unwrap_or(throughput * args.load);
    let (half, half_hist, half_secs) =
        run_phase(args, &client, Some(offered), Duration::from_secs(args.seconds)).await?;
    let achieved = half.events.load(Ordering::Relaxed) as f64 / half_secs;
    say(format!(
        "at {:.0}% load ({:.0} events/s offered, {:.0} acked): ack latency {}",
        100.0 * offered / throughput.max(1.0),
        offered,
        achieved,
        fmt_q(&half_hist)
    ));
    // Coalesce ratio: every acknowledged input against the outputs the windows produced (wait
    // for the last 1 s windows to close).
    let inputs: u64 = [&warm, &sat, &half].iter().map(|p| p.events.load(Ordering::Relaxed)).sum();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut next_seq: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    for (_, st) in client.statuses().await {
        for sh in st.map(|s| s.local_shards).unwrap_or_default() {
            let e = next_seq.entry(sh.shard).or_insert(1);
            *e = (*e).max(sh.next_seq);
        }
    }
    let outputs: u64 = next_seq.values().map(|n| n - 1).sum();
    let ratio = inputs as f64 / outputs.max(1) as f64;
    say(format!("coalesce ratio: {inputs} inputs → {outputs} outputs = {ratio:.1}:1"));
    Ok(json!({
        "coalesce": { "inputs": inputs, "outputs": outputs, "ratio": (ratio * 10.0).round() / 10.0 },
        "bench": "ingest",
        "machine": machine(),
        "nodes": endpoints.len(),
        "shards": client.shards(),
        "producers": args.producers,
        "batch": args.batch,
        "keys": args.keys,
        "zipf": args.zipf,
        "saturation": {
            "events_per_s": throughput.round(),
            "requests": sat.requests.load(Ordering::Relaxed),
            "failed_events": sat.failed.load(Ordering::Relaxed),
            "latency": quantiles_ms(&sat_hist),
        },
        "load": {
            "fraction": offered / throughput.max(1.0),
            "offered_events_per_s": offered.round(),
            "acked_events_per_s": achieved.round(),
            "failed_events": half.failed.load(Ordering::Relaxed),
            "latency": quantiles_ms(&half_hist),
        },
    }))
}

fn fmt_q(h: &Histogram<u64>) -> String {
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

/// Runs `args.producers` lanes for `length`: closed loop when `rate` is None, else each lane
/// offers its share of `rate` events/s on a fixed schedule.
async fn run_phase(
    args: &IngestArgs,
    client: &Client,
    rate: Option<f64>,
    length: Duration,
) -> anyhow::Result<(Arc<Phase>, Histogram<u64>, f64)> {
    let phase = Arc::new(Phase::default());
    let started = Instant::now();
    let end = started + length;
    let mut lanes = Vec::new();
    for lane in 0..args.producers {
        let mut producer = client.producer();
        let mut keys = KeyGen::new(args.keys, args.zipf, args.seed.wrapping_mul(1_000_003).wrapping_add(lane as u64))?;
        let phase = phase.clone();
        let (stream, batch) = (args.stream.clone(), args.batch);
        // Lanes start spread over one period so they do not fire in lockstep.
        let period = rate.map(|r| Duration::from_secs_f64(batch as f64 * args.producers as f64 / r.max(1.0)));
        let offset = period.map_or(Duration::ZERO, |p| p.mul_f64(lane as f64 / args.producers as f64));
        lanes.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut scheduled = started + offset;
            while Instant::now() < end {
                if period.is_some() {
                    tokio::time::sleep_until(scheduled).await;
                }
                let events = keys.batch(&stream, batch);
                let sent = if period.is_some() { scheduled } else { Instant::now() };
                let report = producer.send(events).await?;
                let _ = hist.record(sent.elapsed().as_micros().max(1) as u64);
                phase.requests.fetch_add(1, Ordering::Relaxed);
                phase.events.fetch_add(report.acked() as u64, Ordering::Relaxed);
                phase.retries.fetch_add(report.retries, Ordering::Relaxed);
                phase.failed.fetch_add((report.statuses.len() - report.acked()) as u64, Ordering::Relaxed);
                if let Some(p) = period {
                    scheduled += p;
                }
            }
            anyhow::Ok(hist)
        }));
    }
    let ticker = progress(phase.clone(), started, length, rate.is_some());
    let mut hist = histogram();
    for lane in lanes {
        let h = lane.await.context("producer lane panicked")??;
        hist.add(&h).context("merging histograms")?;
    }
    ticker.abort();
    if std::io::stderr().is_terminal() {
        eprint!("\r{:80}\r", "");
    }
    Ok((phase, hist, started.elapsed().as_secs_f64()))
}

/// A live progress line on stderr (only when it is a terminal): a bar of the phase's length,
/// events acknowledged so far and the current rate.
fn progress(phase: Arc<Phase>, started: Instant, length: Duration, paced: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let done = phase.events.load(Ordering::Relaxed);
            let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
            last = (Instant::now(), done);
            let frac = (started.elapsed().as_secs_f64() / length.as_secs_f64()).min(1.0);
            let filled = (frac * 30.0) as usize;
            eprint!(
                "\r{} [{}{}] {:>4.1}s  {:>10} events  {:>9.0} events/s ",
                if paced { "paced" } else { "  max" },
                "#".repeat(filled),
                "-".repeat(30 - filled),
                started.elapsed().as_secs_f64(),
                done,
                rate
            );
        }
    })
}

async fn failover(args: FailoverArgs) -> anyhow::Result<()> {
    let mut cluster = start_local(&args.local, STREAMS).await?;
    let result = failover_rounds(&args, &mut cluster).await;
    cluster.stop_all(Duration::from_secs(20));
    let report = result?;
    if args.local.json {
        println!("{report}");
    }
    Ok(())
}

async fn failover_rounds(args: &FailoverArgs, cluster: &mut LocalCluster) -> anyhow::Result<serde_json::Value> {
    let say = |s: String| {
        if !args.local.json {
            println!("{s}");
        }
    };
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect_lazy(endpoints.iter().cloned())?;
    client.wait_ready(Duration::from_secs(60)).await?;
    say(format!(
        "bench failover: {} kills, {} nodes, {} shards, background {} events/s, seed {}, raft [{}]",
        args.kills,
        args.local.nodes,
        args.local.shards,
        args.rate,
        args.seed,
        args.local.raft_toml().trim().replace('\n', ", ")
    ));

    // Background load: a few lanes spread over all shards.
    let stop = Arc::new(AtomicBool::new(false));
    let background_failed = Arc::new(AtomicU64::new(0));
    let mut background = Vec::new();
    if args.rate > 0 {
        for lane in 0..4u64 {
            let (client, stop, failed) = (client.clone(), stop.clone(), background_failed.clone());
            let per_request = (args.rate / 4 / 20).max(1) as usize;
            background.push(tokio::spawn(async move {
                let mut producer = client.producer();
                let Ok(mut keys) = KeyGen::new(10_000, 0.0, lane) else { return };
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    match producer.send(keys.batch("bench", per_request)).await {
                        Ok(r) => {
                            for (_, s) in r.failures() {
                                eprintln!("background event not acknowledged: {} {}", s.reason, s.message);
                            }
                            failed.fetch_add((r.statuses.len() - r.acked()) as u64, Ordering::Relaxed)
                        }
                        Err(e) => {
                            eprintln!("background request failed: {e}");
                            failed.fetch_add(per_request as u64, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
    }

    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut hist = histogram();
    let mut times = Vec::new();
    let probe_policy = RetryPolicy {
        give_up_after: Duration::from_secs(30),
        attempt_timeout: Duration::from_millis(500),
        min_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(20),
    };
    for round in 0..args.kills {
        let shard = rng.random_range(0..args.local.shards);
        // A key of that shard, for the probe.
        let key =
            (0u64..).map(|k| format!("probe-{k}")).find(|k| client.shard_of("bench", k) == shard).unwrap_or_default();
        client.refresh_routes().await?;
        let leader_addr = client.leader_addr(shard).context("no leader known")?;
        let victim = cluster
            .nodes
            .iter()
            .position(|n| n.client_addr == leader_addr)
            .with_context(|| format!("leader {leader_addr} is not a local node"))?;
        let mut probe: Producer = client.producer_with(probe_policy);
        // The probe's route must point at the victim, as every client's would.
        let warm = probe.send(vec![coalesce_client::event("bench", &key, 1i64)]).await?;
        if !warm.all_acked() {
            bail!("round {round}: shard {shard} does not accept writes before the kill: {:?}", warm.statuses);
        }
        let killed_at = Instant::now();
        cluster.kill(victim);
        let report = probe.send(vec![coalesce_client::event("bench", &key, 1i64)]).await?;
        let took = killed_at.elapsed();
        if !report.all_acked() {
            bail!("round {round}: shard {shard} accepted no write within 30 s of the kill: {:?}", report.statuses);
        }
        let _ = hist.record(took.as_micros() as u64);
        times.push(took.as_secs_f64() * 1000.0);
        say(format!(
            "kill {:>2}: shard {shard:>3} leader {} → first acked write after {:>7.1} ms",
            round + 1,
            cluster.nodes[victim].name,
            took.as_secs_f64() * 1000.0
        ));
        cluster.spawn(victim)?;
        wait_balanced(&client, args.local.shards, Duration::from_secs(30)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for b in background {
        let _ = b.await;
    }
    say(format!("failover over {} kills: {}", args.kills, fmt_q(&hist)));
    say(format!("background events not acknowledged: {}", background_failed.load(Ordering::Relaxed)));
    Ok(json!({
        "bench": "failover",
        "machine": machine(),
        "nodes": args.local.nodes,
        "shards": args.local.shards,
        "kills": args.kills,
        "seed": args.seed,
        "background_events_per_s": args.rate,
        "raft": args.local.raft_toml(),
        "background_failed_events": background_failed.load(Ordering::Relaxed),
        "failover": quantiles_ms(&hist),
        "failover_ms": times,
    }))
}

/// Waits until every node answers and leaders are spread evenly again (the balancer hands
/// shards back to a restarted node once it has caught up). Best effort within `within`.
async fn wait_balanced(client: &Client, shards: u32, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let statuses = client.statuses().await;
        let all_up = statuses.iter().all(|(_, r)| r.is_ok());
        let mut leaders: std::collections::BTreeMap<u32, String> = Default::default();
        for st in statuses.iter().filter_map(|(_, r)| r.as_ref().ok()) {
            for s in &st.local_shards {
                if !s.leader.is_empty() {
                    leaders.insert(s.shard, s.leader.clone());
                }
            }
        }
        let mut per_node: std::collections::BTreeMap<&str, u32> = Default::default();
        for l in leaders.values() {
            *per_node.entry(l).or_default() += 1;
        }
        let n = statuses.len() as u32;
        let fair = shards.div_ceil(n.max(1));
        if all_up
            && leaders.len() == shards as usize
            && per_node.len() as u32 == n.min(shards)
            && per_node.values().all(|c| *c <= fair)
        {
            let _ = client.refresh_routes().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
