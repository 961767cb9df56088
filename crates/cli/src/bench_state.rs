//! Resource benchmarks of a local cluster, read from `/proc` (the `procfs` crate):
//!
//! * `bench state-scale` — buffers millions of distinct keys (1 h windows, so none is emitted)
//!   and samples each node's RSS and the ingest rate every second: the buffered aggregates live
//!   in RocksDB, so memory should stay flat while the key count grows, and the rate should hold
//!   within 2× of the rate over a small (100k) key set.
//! * `bench idle` — the CPU an idle cluster burns (64 shards by default: heartbeats, lease
//!   renewals, timers), per node and in total, over a measured interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use coalesce_cli::outln;
use coalesce_client::Client;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::time::Instant;

use crate::bench::{LocalArgs, fmt_q, histogram, machine, start_local};
use coalesce_cli::local::LocalCluster;

#[derive(Debug, clap::Args)]
pub(crate) struct StateArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// Distinct keys to buffer.
    #[arg(long, default_value_t = 10_000_000)]
    keys: u64,
    /// Keys of the reference phase that sets the baseline rate.
    #[arg(long, default_value_t = 100_000)]
    reference_keys: u64,
    /// Seconds of the reference phase.
    #[arg(long, default_value_t = 15)]
    reference_seconds: u64,
    /// Concurrent producer lanes.
    #[arg(long, default_value_t = 16)]
    producers: usize,
    /// Events (distinct keys) per request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
}

#[derive(Debug, clap::Args)]
pub(crate) struct IdleArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// Seconds to wait after the cluster is up and balanced before measuring.
    #[arg(long, default_value_t = 10)]
    settle: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

/// CPU seconds (user + system) and resident bytes of a process.
pub(crate) fn usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let cpu = (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64;
    Ok((cpu, stat.rss * procfs::page_size()))
}

fn pids(cluster: &LocalCluster) -> anyhow::Result<Vec<u32>> {
    (0..cluster.nodes.len()).map(|i| pid_of(cluster, i)).collect()
}

/// The process id of node `i`, while it runs.
pub(crate) fn pid_of(cluster: &LocalCluster, i: usize) -> anyhow::Result<u32> {
    let node = &cluster.nodes[i];
    node.child.as_ref().map(|c| c.id()).with_context(|| format!("{} is not running", node.name))
}

fn rss_all(pids: &[u32]) -> Vec<u64> {
    pids.iter().map(|p| usage(*p).map_or(0, |(_, rss)| rss)).collect()
}

const MIB: f64 = 1024.0 * 1024.0;

pub(crate) async fn state_scale(args: StateArgs) -> anyhow::Result<()> {
    if args.keys == 0 || args.reference_keys == 0 || args.producers == 0 || args.batch == 0 {
        bail!("--keys, --reference-keys, --producers and --batch must be at least 1");
    }
    // 1 h windows: nothing is emitted during the run, every key stays buffered. Limits sized
    // so no shard refuses keys.
    let streams = "[limits]\nmax_keys = 1000000000\nmax_bytes = 1099511627776\n\n\
                   [streams.state]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1h\" }\n";
    let mut cluster = start_local(&args.local, streams).await?;
    let result = fill(&args, &cluster).await;
    cluster.stop_all(Duration::from_secs(60));
    args.local.emit(&result?)
}

/// `lanes` producers send distinct keys `{prefix}{i}` for i in `0..keys` (lane l takes every
/// lanes-th batch), closed loop; returns events acknowledged. `acked` counts as they land.
async fn distinct_keys(
    client: &Client,
    prefix: &'static str,
    keys: u64,
    lanes: usize,
    batch: usize,
    until: Option<Instant>,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<(Duration, Histogram<u64>)> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..lanes {
        let (next, acked) = (next.clone(), acked.clone());
        let mut producer = client.producer();
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram();
            loop {
                if until.is_some_and(|u| Instant::now() >= u) {
                    break;
                }
                let from = next.fetch_add(batch as u64, Ordering::Relaxed);
                if until.is_none() && from >= keys {
                    break;
                }
                let events = (from..from + batch as u64)
                    .map(|i| coalesce_client::event("state", &format!("{prefix}{:010}", i % keys), 1i64))
                    .collect::<Vec<_>>();
                let sent = Instant::now();
                let report = producer.send(events).await?;
                let _ = latency.record(sent.elapsed().as_micros().max(1) as u64);
                if let Some((_, s)) = report.failures().next() {
                    bail!("events not acknowledged: {} {}", s.reason, s.message);
                }
                acked.fetch_add(report.acked() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(latency)
        }));
    }
    let mut latency = histogram();
    for t in tasks {
        latency.add(&t.await.context("producer lane panicked")??)?;
    }
    Ok((started.elapsed(), latency))
}

async fn fill(args: &StateArgs, cluster: &LocalCluster) -> anyhow::Result<serde_json::Value> {
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect_lazy(endpoints.iter().cloned())?;
    client.wait_ready(Duration::from_secs(60)).await?;
    let pids = pids(cluster)?;
    let say = |s: String| args.local.say(s);
    say(format!(
        "bench state-scale: {} distinct keys (reference: {} keys), {} lanes × {} keys/request, {} shards, 1 h windows",
        args.keys,
        args.reference_keys,
        args.producers,
        args.batch,
        args.local.shards()
    ));

    // Reference: the same load cycling over a small key set.
    let acked = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(args.reference_seconds);
    let (took, _) =
        distinct_keys(&client, "ref-", args.reference_keys, args.producers, args.batch, Some(until), acked.clone())
            .await?;
    let reference_rate = acked.load(Ordering::Relaxed) as f64 / took.as_secs_f64();
    let rss_start = rss_all(&pids);
    say(format!("reference ({} keys): {reference_rate:.0} events/s; RSS {}", args.reference_keys, fmt_rss(&rss_start)));

    // Fill, sampling every second.
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (acked, done, pids) = (acked.clone(), done.clone(), pids.clone());
        let quiet = args.local.quiet();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut last = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                let now = acked.load(Ordering::Relaxed);
                let rss = rss_all(&pids);
                if !quiet {
                    outln!(
                        "{:>6.0} s  {:>11} keys  {:>8} events/s  RSS {}",
                        started.elapsed().as_secs_f64(),
                        now,
                        now - last,
                        fmt_rss(&rss)
                    );
                }
                samples.push(json!({
                    "t_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                    "keys": now,
                    "events_per_s": now - last,
                    "rss_bytes": rss,
                }));
                last = now;
            }
            samples
        })
    };
    let took = distinct_keys(&client, "key-", args.keys, args.producers, args.batch, None, acked.clone()).await;
    done.store(true, Ordering::Relaxed);
    let samples = sampler.await.context("sampler panicked")?;
    let (took, latency) = took?;
    let fill_rate = args.keys as f64 / took.as_secs_f64();

    // The rate over each tenth of the keys, from the per-second samples.
    let tenth = (args.keys / 10).max(1);
    let mut deciles = Vec::new();
    let (mut from_keys, mut from_t) = (0u64, 0f64);
    for s in &samples {
        let (k, t) = (s["keys"].as_u64().unwrap_or(0), s["t_s"].as_f64().unwrap_or(0.0));
        if k >= from_keys + tenth && t > from_t {
            deciles.push(((k - from_keys) as f64 / (t - from_t)).round());
            (from_keys, from_t) = (k, t);
        }
    }
    let slowest = deciles.iter().copied().fold(f64::INFINITY, f64::min);
    let slowest = if slowest.is_finite() { slowest } else { fill_rate };
    let rss_end = rss_all(&pids);
    let rss_max: Vec<u64> = (0..pids.len())
        .map(|i| samples.iter().filter_map(|s| s["rss_bytes"][i].as_u64()).max().unwrap_or(0).max(rss_end[i]))
        .collect();
    let mut buffered = 0u64;
    for (_, st) in client.statuses().await {
        if let Ok(st) = st {
            let mut by_shard = std::collections::BTreeMap::new();
            for s in st.local_shards {
                by_shard.insert(s.shard, s.buffered_keys);
            }
            buffered = buffered.max(by_shard.values().sum());
        }
    }
    say(format!(
        "filled {} keys in {:.1} s = {fill_rate:.0} events/s (slowest tenth {slowest:.0}/s, {:.2}× below the reference); \
         buffered keys {buffered}; RSS at the end {}, max {}; request latency {}",
        args.keys,
        took.as_secs_f64(),
        reference_rate / slowest.max(1.0),
        fmt_rss(&rss_end),
        fmt_rss(&rss_max),
        fmt_q(&latency)
    ));
    Ok(json!({
        "bench": "state-scale",
        "machine": machine(),
        "nodes": pids.len(),
        "shards": args.local.shards(),
        "keys": args.keys,
        "buffered_keys": buffered,
        "reference_keys": args.reference_keys,
        "reference_events_per_sec": reference_rate.round(),
        "events_per_sec": fill_rate.round(),
        "decile_events_per_sec": deciles,
        "slowest_decile_events_per_sec": slowest,
        "reference_over_slowest": ((reference_rate / slowest.max(1.0)) * 100.0).round() / 100.0,
        "fill_latency": crate::bench::quantiles_ms(&latency),
        "rss_bytes": rss_end.iter().max().copied().unwrap_or(0),
        "rss_bytes_start": rss_start,
        "rss_bytes_end": rss_end,
        "rss_bytes_max": rss_max,
        "samples": samples,
    }))
}

fn fmt_rss(rss: &[u64]) -> String {
    rss.iter().map(|b| format!("{:.0} MiB", *b as f64 / MIB)).collect::<Vec<_>>().join(" / ")
}

pub(crate) async fn idle(mut args: IdleArgs) -> anyhow::Result<()> {
    if args.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    args.local.shards.get_or_insert(64);
    let streams = "[streams.idle]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1s\" }\n";
    let mut cluster = start_local(&args.local, streams).await?;
    let result = measure_idle(&args, &cluster).await;
    cluster.stop_all(Duration::from_secs(20));
    args.local.emit(&result?)
}

async fn measure_idle(args: &IdleArgs, cluster: &LocalCluster) -> anyhow::Result<serde_json::Value> {
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect_lazy(endpoints.iter().cloned())?;
    client.wait_ready(Duration::from_secs(120)).await?;
    crate::bench::wait_balanced(&client, args.local.shards(), Duration::from_secs(60)).await;
    drop(client);
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let pids = pids(cluster)?;
    let before: Vec<(f64, u64)> = pids.iter().map(|p| usage(*p)).collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let wall = started.elapsed().as_secs_f64();
    let after: Vec<(f64, u64)> = pids.iter().map(|p| usage(*p)).collect::<anyhow::Result<_>>()?;
    let per_node: Vec<f64> =
        before.iter().zip(&after).map(|(b, a)| ((a.0 - b.0) / wall * 1000.0).round() / 10.0).collect();
    let total: f64 = per_node.iter().sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let rss: Vec<u64> = after.iter().map(|a| a.1).collect();
    args.local.say(format!(
        "bench idle: {} nodes, {} shards, measured {:.0} s after {} s settling, raft [{}]",
        pids.len(),
        args.local.shards(),
        wall,
        args.settle,
        args.local.raft_toml().trim().replace('\n', ", ")
    ));
    args.local.say(format!(
        "CPU per node: {} % of one core; total {total:.1} % of one core = {:.1} % of the machine's {cores} cores; RSS {}",
        per_node.iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>().join(" / "),
        total / cores,
        fmt_rss(&rss)
    ));
    Ok(json!({
        "bench": "idle",
        "machine": machine(),
        "nodes": pids.len(),
        "shards": args.local.shards(),
        "seconds": wall,
        "raft": args.local.raft_toml(),
        "cpu_pct_of_core_per_node": per_node,
        "cpu_pct_of_core_total": (total * 10.0).round() / 10.0,
        "cpu_pct_of_machine": (total / cores * 10.0).round() / 10.0,
        "rss_bytes": rss,
    }))
}
