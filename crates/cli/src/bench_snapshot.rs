//! `bench snapshot` — a replica catching up through a large snapshot: how long it takes and
//! what it costs the receiving and the sending node in memory.
//!
//! One node of a local cluster is stopped; the others buffer `--keys` keys of `--value-bytes`
//! each (1 h windows, so nothing is emitted and the whole state stays in the snapshot) in
//! enough log entries that the shard leaders purge their logs past the stopped node. The node
//! is then started again and catches up through a snapshot of every shard; its RSS and the
//! leaders' are sampled every 50 ms until it has applied what the leaders had.

use std::time::Duration;

use anyhow::{Context, bail};
use coalesce_client::Client;
use coalesce_proto::v1::StatusRequest;
use coalesce_proto::v1::coalesce_client::CoalesceClient;
use serde_json::json;
use tokio::time::Instant;

use crate::bench::{LocalArgs, machine, start_local};
use crate::bench_state::{pid_of, usage};

#[derive(Debug, clap::Args)]
pub(crate) struct SnapshotArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// Distinct keys buffered while the node is down.
    #[arg(long, default_value_t = 240_000)]
    keys: u64,
    /// Bytes of each key's value.
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Keys per request (one log entry per shard per request): small, so the log grows past
    /// openraft's snapshot policy (20,000 entries) and is purged.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Concurrent producer lanes.
    #[arg(long, default_value_t = 16)]
    producers: usize,
    /// How long the node may take to catch up.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
}

const MIB: f64 = 1024.0 * 1024.0;

/// (last applied, leader name) per local shard of the node at `addr`.
async fn shards_of(addr: &str) -> anyhow::Result<Vec<(u32, u64, String)>> {
    let mut c = CoalesceClient::connect(format!("http://{addr}")).await?;
    let s = c.status(StatusRequest {}).await?.into_inner();
    Ok(s.local_shards.into_iter().map(|sh| (sh.shard, sh.last_applied, sh.leader)).collect())
}

pub(crate) async fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    if args.keys == 0 || args.batch == 0 || args.producers == 0 || args.value_bytes == 0 {
        bail!("--keys, --batch, --producers and --value-bytes must be at least 1");
    }
    if args.local.nodes < 3 {
        bail!("--nodes must be at least 3 (one is stopped, the others keep a quorum)");
    }
    let streams = format!(
        "[limits]\nmax_keys = 1000000000\nmax_bytes = 1099511627776\n\n\
         [streams.snap]\nmerge = \"latest\"\nwindow = {{ tumbling = \"1h\" }}\nmax_value_bytes = {}\n",
        args.value_bytes.max(16)
    );
    let mut cluster = start_local(&args.local, &streams).await?;
    let result = catch_up(&args, &mut cluster).await;
    cluster.stop_all(Duration::from_secs(60));
    args.local.emit(&result?)
}

async fn catch_up(
    args: &SnapshotArgs,
    cluster: &mut coalesce_cli::local::LocalCluster,
) -> anyhow::Result<serde_json::Value> {
    let say = |s: String| args.local.say(s);
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let down = cluster.nodes.len() - 1;
    let client = Client::connect_lazy(endpoints[..down].iter().cloned())?;
    client.wait_ready(Duration::from_secs(60)).await?;
    say(format!(
        "bench snapshot: {} keys × {} B ({:.0} MiB of values), {} per request, {} lanes, {} shards; {} is stopped",
        args.keys,
        args.value_bytes,
        (args.keys as f64 * args.value_bytes as f64) / MIB,
        args.batch,
        args.producers,
        args.local.shards(),
        cluster.nodes[down].name,
    ));
    cluster.terminate(down, Duration::from_secs(30))?;
    client.wait_ready(Duration::from_secs(60)).await?;

    // Fill: distinct keys, closed loop.
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let value = "v".repeat(args.value_bytes);
    let mut lanes = Vec::new();
    for _ in 0..args.producers {
        let (next, value, keys, batch) = (next.clone(), value.clone(), args.keys, args.batch as u64);
        let mut producer = client.producer();
        lanes.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
                if from >= keys {
                    return anyhow::Ok(());
                }
                let events = (from..(from + batch).min(keys))
                    .map(|i| coalesce_client::event("snap", &format!("key-{i:010}"), value.as_str()))
                    .collect::<Vec<_>>();
                let report = producer.send(events).await?;
                if let Some((_, s)) = report.failures().next() {
                    bail!("events not acknowledged: {} {}", s.reason, s.message);
                }
            }
        }));
    }
    for lane in lanes {
        lane.await.context("producer lane panicked")??;
    }
    let fill = started.elapsed();
    say(format!("filled in {:.1} s", fill.as_secs_f64()));

    // What the node must reach: the leaders' applied index per shard.
    let mut target = std::collections::BTreeMap::new();
    let mut leaders = std::collections::BTreeSet::new();
    for (i, addr) in endpoints[..down].iter().enumerate() {
        for (shard, applied, leader) in shards_of(addr).await? {
            if leader == cluster.nodes[i].name {
                target.insert(shard, applied);
                leaders.insert(i);
            }
        }
    }
    let built: f64 = cluster.metric("coalesce_raft_snapshots_total{event=\"built\"}").await.iter().sum();
    say(format!("leaders built {built} snapshots (log purge); restarting {}", cluster.nodes[down].name));

    cluster.spawn(down)?;
    let restarted = Instant::now();
    let pid = pid_of(cluster, down)?;
    let leader_pids: Vec<u32> = leaders.iter().map(|i| pid_of(cluster, *i)).collect::<anyhow::Result<_>>()?;
    let (mut peak, mut leader_peak, mut first_rss) = (0u64, 0u64, None);
    let deadline = restarted + Duration::from_secs(args.timeout_seconds);
    let mut last_probe = Instant::now() - Duration::from_secs(1);
    loop {
        let rss = usage(pid).map_or(0, |(_, r)| r);
        first_rss.get_or_insert(rss);
        peak = peak.max(rss);
        for p in &leader_pids {
            leader_peak = leader_peak.max(usage(*p).map_or(0, |(_, r)| r));
        }
        if last_probe.elapsed() >= Duration::from_millis(250) {
            last_probe = Instant::now();
            if let Ok(shards) = shards_of(&endpoints[down]).await
                && target.iter().all(|(s, t)| shards.iter().any(|(sh, applied, _)| sh == s && applied >= t))
            {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not catch up within {} s", cluster.nodes[down].name, args.timeout_seconds);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = restarted.elapsed();
    let hwm = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.status())
        .ok()
        .and_then(|s| s.vmhwm)
        .map(|kb| kb * 1024);
    let received: f64 = cluster.metric("coalesce_raft_snapshot_bytes_total{direction=\"received\"}").await.iter().sum();
    let installed: f64 = cluster.metric("coalesce_raft_snapshots_total{event=\"installed\"}").await.iter().sum();
    say(format!(
        "caught up in {:.1} s: {installed} snapshots installed, {:.0} MiB received; RSS of {}: {:.0} MiB at start, peak {:.0} MiB sampled ({} VmHWM); leaders' peak {:.0} MiB",
        took.as_secs_f64(),
        received / MIB,
        cluster.nodes[down].name,
        first_rss.unwrap_or(0) as f64 / MIB,
        peak as f64 / MIB,
        hwm.map_or("no".to_owned(), |h| format!("{:.0} MiB", h as f64 / MIB)),
        leader_peak as f64 / MIB,
    ));
    Ok(json!({
        "bench": "snapshot",
        "machine": machine(),
        "keys": args.keys,
        "value_bytes": args.value_bytes,
        "shards": args.local.shards(),
        "fill_seconds": fill.as_secs_f64(),
        "catch_up_seconds": took.as_secs_f64(),
        "snapshots_installed": installed,
        "snapshot_bytes_received": received,
        "follower_rss_start_bytes": first_rss,
        "follower_rss_peak_bytes": peak,
        "follower_vmhwm_bytes": hwm,
        "leader_rss_peak_bytes": leader_peak,
    }))
}
