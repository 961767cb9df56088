//! `coalescectl bench`: benchmarks that print numbers (never pass/fail).
//!
//! * `bench ingest` — ingest throughput with batched idempotent producers (closed loop), then
//!   ack latency at a fraction of that throughput (open loop, latency measured from each
//!   request's scheduled send time, so a stall is not hidden by the producer waiting on it).
//! * `bench latency` — the maximum throughput, then ack latency at 25/50/75/100 % of it.
//! * `bench failover` — repeatedly SIGKILLs the leader of a shard of a local cluster and times
//!   kill → first acknowledged write and kill → the new leader's first emission on that shard,
//!   restarting the node in between.
//! * `bench ingest-vs-etcd` ([`crate::bench_etcd`]), `bench savings` ([`crate::bench_savings`]),
//!   `bench state-scale` and `bench idle` ([`crate::bench_state`]), `bench postgres`
//!   ([`crate::bench_pg`]), `bench fetch` ([`crate::bench_fetch`]), `bench adaptive`
//!   ([`crate::bench_adaptive`]).
//!
//! Every benchmark writes its result as JSON with `--json FILE` (`--json` alone: to stdout).
//! They start a local cluster of real `coalesced` processes (the binary next to this one;
//! build with `--release` for numbers worth reporting); `bench ingest --endpoints` measures a
//! running cluster instead. Histograms are HdrHistogram (`hdrhistogram` crate).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use coalesce_cli::outln;
use coalesce_client::{Client, Event, Producer, RetryPolicy};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde_json::json;
use tokio::time::Instant;

use coalesce_cli::local::{LocalCluster, LocalOptions};

/// The benchmark's stream: per-key sums in 1 s tumbling windows, limits sized for the load.
pub(crate) const STREAMS: &str = r#"[limits]
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
    /// Replicated durable ingest against a 3-member etcd: single puts, Txn batches, and
    /// Coalesce batched and unary, under the same concurrency.
    IngestVsEtcd(crate::bench_etcd::EtcdArgs),
    /// Ack latency p50/p99/p999 at 25/50/75/100 % of the maximum throughput (open loop).
    Latency(LatencyArgs),
    /// Downstream writes: Coalesce vs per-event vs a consumer merging batches of 200 by key.
    Savings(crate::bench_savings::SavingsArgs),
    /// Millions of distinct buffered keys: RSS over time and the ingest rate against 100k keys.
    StateScale(crate::bench_state::StateArgs),
    /// A stopped node catching up through snapshots of a large state: time and memory.
    Snapshot(crate::bench_snapshot::SnapshotArgs),
    /// CPU and memory of an idle cluster (64 shards by default).
    Idle(crate::bench_state::IdleArgs),
    /// A throttled sink: backlog and staleness with fixed windows vs load-adaptive windows.
    Adaptive(crate::bench_adaptive::AdaptiveArgs),
    /// Window end to subscriber at low load: one event per request, a fresh key each.
    Emit(crate::bench_emit::EmitArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LocalArgs {
    /// Directory for the local cluster's configs, data and logs (wiped first).
    #[arg(long, default_value = ".coalesce-data/bench")]
    pub(crate) dir: PathBuf,
    /// Nodes of the local cluster.
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: usize,
    /// Shards of the local cluster (default 8; `bench idle`: 64).
    #[arg(long)]
    pub(crate) shards: Option<u32>,
    /// Write the result as one JSON object to FILE (`--json` alone or `--json -`: print it to
    /// stdout instead of the report).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub(crate) json: Option<PathBuf>,
    /// Raft heartbeat of the local cluster (default: the node default).
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat: Option<Duration>,
    /// Raft election timeout range of the local cluster, e.g. `300ms..450ms`.
    #[arg(long, value_parser = parse_range)]
    election_timeout: Option<(Duration, Duration)>,
    /// Idle groups stop their Raft timers after this long (`0s`: never; default: the node
    /// default, 2 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    quiesce_after: Option<Duration>,
    /// How often each replica writes its applied state to RocksDB (default: the node default,
    /// 1 s; `0s`: after every apply).
    #[arg(long, value_parser = humantime::parse_duration)]
    checkpoint_interval: Option<Duration>,
    /// The nodes' `[storage] wal_recovery`: `strict` (the node default) or `point_in_time`
    /// (recycled WAL files; docs/operations.md).
    #[arg(long, value_parser = ["strict", "point_in_time"])]
    wal_recovery: Option<String>,
}

fn parse_range(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = s.split_once("..").ok_or("expected MIN..MAX, e.g. 300ms..450ms")?;
    let parse = |v: &str| humantime::parse_duration(v.trim()).map_err(|e| format!("{v:?}: {e}"));
    Ok((parse(a)?, parse(b)?))
}

impl LocalArgs {
    /// Shards of the local cluster.
    pub(crate) fn shards(&self) -> u32 {
        self.shards.unwrap_or(8)
    }

    /// True when the JSON goes to stdout, so the human report must stay off it.
    pub(crate) fn quiet(&self) -> bool {
        self.json.as_deref().is_some_and(|p| p == std::path::Path::new("-"))
    }

    /// Prints a line of the human report (unless the JSON goes to stdout).
    pub(crate) fn say(&self, line: impl std::fmt::Display) {
        if !self.quiet() {
            outln!("{line}");
        }
    }

    /// Writes the result where `--json` says (nothing without it).
    pub(crate) fn emit(&self, report: &serde_json::Value) -> anyhow::Result<()> {
        match &self.json {
            None => Ok(()),
            Some(_) if self.quiet() => {
                outln!("{report}");
                Ok(())
            }
            Some(path) => {
                std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
                outln!("wrote {}", path.display());
                Ok(())
            }
        }
    }
    /// The `[raft]` table for the nodes' configs.
    pub(crate) fn raft_toml(&self) -> String {
        let ms = |d: Duration| format!("\"{}ms\"", d.as_millis());
        let mut t = String::new();
        if let Some(h) = self.heartbeat {
            t += &format!("heartbeat = {}\n", ms(h));
        }
        if let Some((min, max)) = self.election_timeout {
            t += &format!("election_timeout_min = {}\nelection_timeout_max = {}\n", ms(min), ms(max));
        }
        if let Some(q) = self.quiesce_after {
            t += &format!("quiesce_after = {}\n", ms(q));
        }
        if let Some(c) = self.checkpoint_interval {
            t += &format!("checkpoint_interval = {}\n", ms(c));
        }
        t
    }
}

/// A closed- or open-loop load of `sum_i64` events: the knobs every throughput benchmark shares.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LoadArgs {
    #[command(flatten)]
    pub(crate) local: LocalArgs,
    /// Measure a running cluster at these client addresses (comma-separated) instead of
    /// starting one; it needs a `sum_i64` stream named by `--stream`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) endpoints: Vec<String>,
    #[arg(long, default_value = "bench")]
    pub(crate) stream: String,
    /// Concurrent producer lanes (one request in flight each).
    #[arg(long, default_value_t = 16)]
    pub(crate) producers: usize,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    pub(crate) batch: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) keys: u64,
    /// Zipf exponent of key popularity (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    pub(crate) zipf: f64,
    /// Seconds per measured phase (after a 2 s warm-up).
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Seed of the key generator.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
}

impl LoadArgs {
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.producers == 0 || self.batch == 0 || self.seconds == 0 {
            bail!("--producers, --batch and --seconds must be at least 1");
        }
        Ok(())
    }

    /// Runs `measure` against `--endpoints`, else against a local cluster started with
    /// `streams` (stopped afterwards), with a client that is ready; writes its result where
    /// `--json` says.
    pub(crate) async fn measure_on(
        &self,
        streams: &str,
        measure: impl AsyncFnOnce(&Client, &[String]) -> anyhow::Result<serde_json::Value>,
    ) -> anyhow::Result<()> {
        let (endpoints, cluster) = self.cluster(streams).await?;
        let result = async {
            let client = Client::connect_lazy(endpoints.iter().cloned())?;
            client.wait_ready(Duration::from_secs(60)).await?;
            measure(&client, &endpoints).await
        }
        .await;
        if let Some(mut c) = cluster {
            c.stop_all(Duration::from_secs(20));
        }
        self.local.emit(&result?)
    }

    /// The client addresses to load: `--endpoints`, else a local cluster started with
    /// `streams` (returned so the caller stops it).
    pub(crate) async fn cluster(&self, streams: &str) -> anyhow::Result<(Vec<String>, Option<LocalCluster>)> {
        if !self.endpoints.is_empty() {
            return Ok((self.endpoints.clone(), None));
        }
        let c = start_local(&self.local, streams).await?;
        Ok((c.nodes.iter().map(|n| n.client_addr.clone()).collect(), Some(c)))
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct IngestArgs {
    #[command(flatten)]
    work: LoadArgs,
    /// Events per second offered in the latency phase (default: `--load` × the measured
    /// saturation throughput).
    #[arg(long)]
    rate: Option<f64>,
    /// Fraction of the measured throughput offered in the latency phase.
    #[arg(long, default_value_t = 0.5)]
    load: f64,
}

#[derive(Debug, clap::Args)]
pub(crate) struct LatencyArgs {
    #[command(flatten)]
    work: LoadArgs,
    /// Offered load levels as fractions of the measured maximum throughput.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75,1")]
    levels: Vec<f64>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct FailoverArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// Leader kills.
    #[arg(long, default_value_t = 50)]
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
        BenchCmd::IngestVsEtcd(args) => crate::bench_etcd::run(args).await,
        BenchCmd::Latency(args) => latency(args).await,
        BenchCmd::Savings(args) => crate::bench_savings::run(args).await,
        BenchCmd::StateScale(args) => crate::bench_state::state_scale(args).await,
        BenchCmd::Idle(args) => crate::bench_state::idle(args).await,
        BenchCmd::Snapshot(args) => crate::bench_snapshot::run(args).await,
        BenchCmd::Adaptive(args) => crate::bench_adaptive::run(args).await,
        BenchCmd::Emit(args) => crate::bench_emit::run(args).await,
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
    if args.nodes == 0 || args.shards() == 0 {
        bail!("--nodes and --shards must be at least 1");
    }
    let opts = LocalOptions {
        cluster: "bench".into(),
        nodes: args.nodes,
        shards: args.shards(),
        streams: streams.into(),
        raft: args.raft_toml(),
        log_filter: "warn".into(),
        extra: args.wal_recovery.as_ref().map_or_else(String::new, |m| format!("[storage]\nwal_recovery = \"{m}\"\n")),
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

    /// The key at `index`.
    pub(crate) fn key(&self, index: u32) -> &str {
        &self.keys[index as usize]
    }

    /// The index (0-based) of the next key drawn.
    pub(crate) fn next_index(&mut self) -> u32 {
        let i = match &self.zipf {
            Some(z) => (z.sample(&mut self.rng) as usize).saturating_sub(1),
            None => self.rng.random_range(0..self.keys.len()),
        };
        i.min(self.keys.len() - 1) as u32
    }

    pub(crate) fn next(&mut self) -> &str {
        let i = self.next_index() as usize;
        &self.keys[i]
    }

    fn batch(&mut self, stream: &str, n: usize) -> Vec<Event> {
        (0..n).map(|_| coalesce_client::event(stream, self.next(), 1i64)).collect()
    }

    /// `n` events of value 1, their key indices appended to `indices`.
    fn batch_indexed(&mut self, stream: &str, n: usize, indices: &mut Vec<u32>) -> Vec<Event> {
        (0..n)
            .map(|_| {
                let i = self.next_index();
                indices.push(i);
                coalesce_client::event(stream, &self.keys[i as usize], 1i64)
            })
            .collect()
    }
}

#[derive(Default)]
pub(crate) struct Phase {
    pub(crate) events: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) failed: AtomicU64,
}

/// What a phase measured: counters, the request latency histogram and its length in seconds.
pub(crate) struct PhaseResult {
    pub(crate) phase: Arc<Phase>,
    pub(crate) latency: Histogram<u64>,
    pub(crate) secs: f64,
}

impl PhaseResult {
    pub(crate) fn events(&self) -> u64 {
        self.phase.events.load(Ordering::Relaxed)
    }

    pub(crate) fn rate(&self) -> f64 {
        self.events() as f64 / self.secs.max(1e-9)
    }

    pub(crate) fn failed(&self) -> u64 {
        self.phase.failed.load(Ordering::Relaxed)
    }
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    args.work.check()?;
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be a positive number of events per second");
    }
    if !(args.load > 0.0 && args.load <= 1.0) {
        bail!("--load must be in (0, 1]");
    }
    args.work.measure_on(STREAMS, async |client, endpoints| ingest_phases(&args, client, endpoints).await).await
}

/// Outputs the cluster's windows have emitted so far (every shard's next seq − 1, asked of
/// every node).
/// (events received, partials they were pre-merged into) for `stream`, summed over nodes.
pub(crate) async fn premerge_counts(client: &Client, stream: &str) -> (u64, u64) {
    let mut total = (0, 0);
    for (_, st) in client.statuses().await {
        for c in st.map(|s| s.streams).unwrap_or_default().into_iter().filter(|c| c.stream == stream) {
            total.0 += c.received;
            total.1 += c.premerged;
        }
    }
    total
}

pub(crate) async fn outputs_emitted(client: &Client) -> u64 {
    let mut next_seq: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    for (_, st) in client.statuses().await {
        for sh in st.map(|s| s.local_shards).unwrap_or_default() {
            let e = next_seq.entry(sh.shard).or_insert(1);
            *e = (*e).max(sh.next_seq);
        }
    }
    next_seq.values().map(|n| n - 1).sum()
}

async fn ingest_phases(args: &IngestArgs, client: &Client, endpoints: &[String]) -> anyhow::Result<serde_json::Value> {
    let w = &args.work;
    let say = |s: String| w.local.say(s);
    say(format!(
        "bench ingest: {} producers × {} events/request, {} keys (zipf {}), {} shards, {} nodes",
        w.producers,
        w.batch,
        w.keys,
        w.zipf,
        client.shards(),
        endpoints.len()
    ));
    // Warm-up, then saturation.
    let warm = run_phase(w, client, None, Duration::from_secs(2), None).await?;
    let sat = run_phase(w, client, None, Duration::from_secs(w.seconds), None).await?;
    let throughput = sat.rate();
    say(format!(
        "saturation: {:.0} events/s acked ({} requests, {} retried rounds, {} events failed); request latency {}",
        throughput,
        sat.phase.requests.load(Ordering::Relaxed),
        sat.phase.retries.load(Ordering::Relaxed),
        sat.failed(),
        fmt_q(&sat.latency)
    ));
    let offered = args.rate.unwrap_or(throughput * args.load);
    let half = run_phase(w, client, Some(offered), Duration::from_secs(w.seconds), None).await?;
    say(format!(
        "at {:.0}% load ({:.0} events/s offered, {:.0} acked): ack latency {}",
        100.0 * offered / throughput.max(1.0),
        offered,
        half.rate(),
        fmt_q(&half.latency)
    ));
    // Coalesce ratio: every acknowledged input against the outputs the windows produced (wait
    // for the last 1 s windows to close).
    let inputs: u64 = [&warm, &sat, &half].iter().map(|p| p.events()).sum();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let outputs = outputs_emitted(client).await;
    let ratio = inputs as f64 / outputs.max(1) as f64;
    say(format!("coalesce ratio: {inputs} inputs → {outputs} outputs = {ratio:.1}:1"));
    Ok(json!({
        "coalesce": { "inputs": inputs, "outputs": outputs, "ratio": (ratio * 10.0).round() / 10.0 },
        "bench": "ingest",
        "machine": machine(),
        "nodes": endpoints.len(),
        "shards": client.shards(),
        "producers": w.producers,
        "batch": w.batch,
        "keys": w.keys,
        "zipf": w.zipf,
        "events_per_sec": throughput.round(),
        "ack_p50_ms": ms(half.latency.value_at_quantile(0.5)),
        "ack_p99_ms": ms(half.latency.value_at_quantile(0.99)),
        "ack_p999_ms": ms(half.latency.value_at_quantile(0.999)),
        "saturation": {
            "events_per_s": throughput.round(),
            "requests": sat.phase.requests.load(Ordering::Relaxed),
            "failed_events": sat.failed(),
            "latency": quantiles_ms(&sat.latency),
        },
        "load": {
            "fraction": offered / throughput.max(1.0),
            "offered_events_per_s": offered.round(),
            "acked_events_per_s": half.rate().round(),
            "failed_events": half.failed(),
            "latency": quantiles_ms(&half.latency),
        },
    }))
}

/// Microseconds as milliseconds with two decimals.
pub(crate) fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

async fn latency(args: LatencyArgs) -> anyhow::Result<()> {
    args.work.check()?;
    if args.levels.is_empty() || args.levels.iter().any(|l| !(l.is_finite() && *l > 0.0 && *l <= 2.0)) {
        bail!("--levels must be fractions in (0, 2], e.g. 0.25,0.5,0.75,1");
    }
    args.work.measure_on(STREAMS, async |client, endpoints| latency_levels(&args, client, endpoints).await).await
}

/// Saturation (closed loop) gives the maximum; then one open-loop phase per level at that
/// fraction of it, latency counted from each request's scheduled send time.
async fn latency_levels(
    args: &LatencyArgs,
    client: &Client,
    endpoints: &[String],
) -> anyhow::Result<serde_json::Value> {
    let w = &args.work;
    w.local.say(format!(
        "bench latency: {} producers × {} events/request, {} keys (zipf {}), {} shards, {} nodes, {} s per level",
        w.producers,
        w.batch,
        w.keys,
        w.zipf,
        client.shards(),
        endpoints.len(),
        w.seconds
    ));
    run_phase(w, client, None, Duration::from_secs(2), None).await?;
    let sat = run_phase(w, client, None, Duration::from_secs(w.seconds), None).await?;
    let max = sat.rate();
    w.local.say(format!("maximum (closed loop): {max:.0} events/s; request latency {}", fmt_q(&sat.latency)));
    let mut levels = Vec::new();
    for &level in &args.levels {
        // Let the previous phase's backlog (windows sealing, outputs) drain first.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let offered = max * level;
        let r = run_phase(w, client, Some(offered), Duration::from_secs(w.seconds), None).await?;
        w.local.say(format!(
            "{:>4.0}% ({:>8.0} events/s offered, {:>8.0} acked): {}",
            level * 100.0,
            offered,
            r.rate(),
            fmt_q(&r.latency)
        ));
        levels.push(json!({
            "fraction": level,
            "offered_events_per_s": offered.round(),
            "acked_events_per_s": r.rate().round(),
            "failed_events": r.failed(),
            "ack_p50_ms": ms(r.latency.value_at_quantile(0.5)),
            "ack_p99_ms": ms(r.latency.value_at_quantile(0.99)),
            "ack_p999_ms": ms(r.latency.value_at_quantile(0.999)),
            "ack_max_ms": ms(r.latency.max()),
        }));
    }
    Ok(json!({
        "bench": "latency",
        "machine": machine(),
        "nodes": endpoints.len(),
        "shards": client.shards(),
        "producers": w.producers,
        "batch": w.batch,
        "keys": w.keys,
        "zipf": w.zipf,
        "seconds_per_level": w.seconds,
        "events_per_sec": max.round(),
        "levels": levels,
    }))
}

pub(crate) fn fmt_q(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

/// Runs `args.producers` lanes for `length`: closed loop when `rate` is None, else each lane
/// offers its share of `rate` events/s on a fixed schedule (open loop: latency counts from
/// the scheduled send time, so a stall is not hidden by the lane waiting on it). With `keys`,
/// every acknowledged request's key indices are appended to it in acknowledgement order.
pub(crate) async fn run_phase(
    args: &LoadArgs,
    client: &Client,
    rate: Option<f64>,
    length: Duration,
    record: Option<Arc<std::sync::Mutex<Vec<u32>>>>,
) -> anyhow::Result<PhaseResult> {
    let phase = Arc::new(Phase::default());
    let started = Instant::now();
    let end = started + length;
    let mut lanes = Vec::new();
    for lane in 0..args.producers {
        let mut producer = client.producer();
        let mut keys = KeyGen::new(args.keys, args.zipf, args.seed.wrapping_mul(1_000_003).wrapping_add(lane as u64))?;
        let phase = phase.clone();
        let record = record.clone();
        let (stream, batch) = (args.stream.clone(), args.batch);
        // Lanes start spread over one period so they do not fire in lockstep.
        let period = rate.map(|r| Duration::from_secs_f64(batch as f64 * args.producers as f64 / r.max(1.0)));
        let offset = period.map_or(Duration::ZERO, |p| p.mul_f64(lane as f64 / args.producers as f64));
        lanes.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut scheduled = started + offset;
            let mut indices = Vec::with_capacity(batch);
            while Instant::now() < end {
                if period.is_some() {
                    tokio::time::sleep_until(scheduled).await;
                }
                indices.clear();
                let events = keys.batch_indexed(&stream, batch, &mut indices);
                let sent = if period.is_some() { scheduled } else { Instant::now() };
                let report = producer.send(events).await?;
                let _ = hist.record(sent.elapsed().as_micros().max(1) as u64);
                phase.requests.fetch_add(1, Ordering::Relaxed);
                phase.events.fetch_add(report.acked() as u64, Ordering::Relaxed);
                phase.retries.fetch_add(report.retries, Ordering::Relaxed);
                phase.failed.fetch_add((report.statuses.len() - report.acked()) as u64, Ordering::Relaxed);
                if let Some(r) = &record {
                    let acked = report
                        .statuses
                        .iter()
                        .zip(&indices)
                        .filter(|(s, _)| coalesce_client::is_acked(s.code))
                        .map(|(_, i)| *i);
                    r.lock().unwrap_or_else(|p| p.into_inner()).extend(acked);
                }
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
    Ok(PhaseResult { phase, latency: hist, secs: started.elapsed().as_secs_f64() })
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

/// The failover benchmark's stream: as [`STREAMS`], delivered to the durable consumer `bench`
/// that the benchmark follows on every node to see each shard's first emission after a kill.
const FAILOVER_STREAMS: &str = r#"[sinks.bench]
kind = "grpc"

[streams.bench]
merge = "sum_i64"
window = { tumbling = "1s" }
sinks = ["bench"]
"#;

/// Kubernetes client-go leader election defaults (`LeaseDuration` 15 s, `RetryPeriod` 2 s): a
/// dead holder's Lease must expire before a candidate, retrying every 2 s, takes it.
const CLIENT_GO_LEASE_MS: u64 = 15_000;
const CLIENT_GO_RETRY_MS: u64 = 2_000;

/// Every output's (received at, epoch) per shard, as the followers saw them.
type Emissions = std::sync::Mutex<std::collections::BTreeMap<u32, Vec<(u64, (u64, u64))>>>;

/// The first output on `shard` received at or after `since_ms` with an epoch newer than every
/// one seen before `since_ms`: the new leader's first emission.
fn first_emission(emissions: &Emissions, shard: u32, since_ms: u64) -> Option<u64> {
    let all = emissions.lock().unwrap_or_else(|p| p.into_inner());
    let seen = all.get(&shard)?;
    let before = seen.iter().filter(|(at, _)| *at < since_ms).map(|(_, e)| *e).max().unwrap_or_default();
    seen.iter().filter(|(at, e)| *at >= since_ms && *e > before).map(|(at, _)| at - since_ms).min()
}

async fn failover(args: FailoverArgs) -> anyhow::Result<()> {
    let mut cluster = start_local(&args.local, FAILOVER_STREAMS).await?;
    let result = failover_rounds(&args, &mut cluster).await;
    cluster.stop_all(Duration::from_secs(20));
    args.local.emit(&result?)
}

async fn failover_rounds(args: &FailoverArgs, cluster: &mut LocalCluster) -> anyhow::Result<serde_json::Value> {
    let say = |s: String| args.local.say(s);
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect_lazy(endpoints.iter().cloned())?;
    client.wait_ready(Duration::from_secs(60)).await?;
    say(format!(
        "bench failover: {} kills, {} nodes, {} shards, background {} events/s, seed {}, raft [{}]",
        args.kills,
        args.local.nodes,
        args.local.shards(),
        args.rate,
        args.seed,
        args.local.raft_toml().trim().replace('\n', ", ")
    ));

    // Followers on every node: each shard's emissions, to time the new leader's first one.
    let stop = Arc::new(AtomicBool::new(false));
    let emissions: Arc<Emissions> = Arc::default();
    let mut followers = Vec::new();
    for addr in &endpoints {
        let emissions = emissions.clone();
        followers.push(tokio::spawn(coalesce_cli::outputs::follow(
            addr.clone(),
            "bench".into(),
            true,
            stop.clone(),
            move |batch, at| {
                let mut all = emissions.lock().unwrap_or_else(|p| p.into_inner());
                for o in batch {
                    let e = o.epoch.unwrap_or_default();
                    all.entry(o.shard).or_default().push((at, (e.term, e.node)));
                }
            },
        )));
    }

    // Background load: a few lanes spread over all shards.
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
    let mut emission_hist = histogram();
    let mut times = Vec::new();
    let mut emission_times = Vec::new();
    let mut no_emission = 0u64;
    let probe_policy = RetryPolicy {
        give_up_after: Duration::from_secs(30),
        attempt_timeout: Duration::from_millis(500),
        min_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(20),
    };
    for round in 0..args.kills {
        let shard = rng.random_range(0..args.local.shards());
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
        let killed_ms = coalesce_cli::outputs::now_ms();
        cluster.kill(victim);
        let report = probe.send(vec![coalesce_client::event("bench", &key, 1i64)]).await?;
        let took = killed_at.elapsed();
        if !report.all_acked() {
            bail!("round {round}: shard {shard} accepted no write within 30 s of the kill: {:?}", report.statuses);
        }
        let _ = hist.record(took.as_micros() as u64);
        times.push(took.as_secs_f64() * 1000.0);
        // The new leader's first emission: windows close every second under the background
        // load, so it comes within a window of the election (give it 10 s).
        let emission_deadline = Instant::now() + Duration::from_secs(10);
        let emitted = loop {
            if let Some(ms) = first_emission(&emissions, shard, killed_ms) {
                break Some(ms);
            }
            if Instant::now() > emission_deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        match emitted {
            Some(ms) => {
                let _ = emission_hist.record(ms.max(1) * 1000);
                emission_times.push(ms);
            }
            None => no_emission += 1,
        }
        say(format!(
            "kill {:>2}: shard {shard:>3} leader {} → first acked write after {:>7.1} ms, first emission after {}",
            round + 1,
            cluster.nodes[victim].name,
            took.as_secs_f64() * 1000.0,
            emitted.map_or_else(|| "none within 10 s".to_owned(), |ms| format!("{ms} ms"))
        ));
        cluster.spawn(victim)?;
        wait_balanced(&client, args.local.shards(), Duration::from_secs(30)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for b in background {
        let _ = b.await;
    }
    for f in followers {
        let _ = f.await;
    }
    say(format!("failover over {} kills: first acked write {}", args.kills, fmt_q(&hist)));
    say(format!("                      first emission     {}", fmt_q(&emission_hist)));
    say(format!(
        "for comparison, client-go leader election defaults: a dead holder's Lease expires after {} s, \
         a candidate retries every {} s",
        CLIENT_GO_LEASE_MS / 1000,
        CLIENT_GO_RETRY_MS / 1000
    ));
    say(format!("background events not acknowledged: {}", background_failed.load(Ordering::Relaxed)));
    Ok(json!({
        "bench": "failover",
        "machine": machine(),
        "nodes": args.local.nodes,
        "shards": args.local.shards(),
        "kills": args.kills,
        "seed": args.seed,
        "background_events_per_s": args.rate,
        "raft": args.local.raft_toml(),
        "background_failed_events": background_failed.load(Ordering::Relaxed),
        "failover": quantiles_ms(&hist),
        "failover_ms_p50": ms(hist.value_at_quantile(0.5)),
        "failover_ms_p99": ms(hist.value_at_quantile(0.99)),
        "failover_ms_max": ms(hist.max()),
        "failover_ms": times,
        "first_emission": quantiles_ms(&emission_hist),
        "first_emission_ms": emission_times,
        "kills_without_emission_within_10s": no_emission,
        "client_go_default_lease_ms": CLIENT_GO_LEASE_MS,
        "client_go_default_retry_ms": CLIENT_GO_RETRY_MS,
    }))
}

/// Waits until every node answers and leaders are spread evenly again (the balancer hands
/// shards back to a restarted node once it has caught up). Best effort within `within`.
pub(crate) async fn wait_balanced(client: &Client, shards: u32, within: Duration) {
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
