//! `coalescectl bench ingest-vs-etcd`: replicated, durable ingest of Coalesce against etcd on
//! the same machine, under the same client concurrency, keys and payload size.
//!
//! Both sides are 3-member clusters on loopback that acknowledge a write only once a quorum
//! has it durable (etcd fsyncs its WAL before replying; Coalesce acks after a quorum's group
//! commit). The phases run one after another, never at the same time, so each has the
//! machine's cores to itself:
//!
//! 1. **etcd single puts** — `--producers` lanes, each with one `Put` in flight.
//! 2. **etcd batched** — the same lanes, each sending one `Txn` of `--batch` puts (distinct keys:
//!    etcd refuses a key twice in one Txn; `--max-txn-ops` is raised to fit).
//! 3. **Coalesce batched** — the same lanes, each sending one request of `--batch` `sum_i64`
//!    events (idempotent producers, leader-aware routing).
//! 4. **Coalesce unary** — the same lanes, one event per request.
//!
//! Keys come from the same Zipf generator; etcd values are the 8 bytes of the i64 that Coalesce
//! events carry. etcd is Debian's `etcd-server` (`scripts/setup.sh` installs it), talked to with
//! the `etcd-client` crate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use coalesce_client::Client;
use etcd_client::{Txn, TxnOp};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::time::Instant;

use crate::bench::{KeyGen, LoadArgs, PhaseResult, fmt_q, histogram, machine, ms, quantiles_ms, run_phase};
use coalesce_cli::local::{free_port, reset_dir};

#[derive(Debug, clap::Args)]
pub(crate) struct EtcdArgs {
    #[command(flatten)]
    work: LoadArgs,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
}

/// A 3-member etcd cluster of child processes on loopback; killed and wiped on drop.
struct Etcd {
    dir: PathBuf,
    children: Vec<Child>,
    endpoints: Vec<String>,
}

impl Etcd {
    fn start(bin: &Path, dir: &Path, max_txn_ops: usize) -> anyhow::Result<Self> {
        // A marker, so a later run may wipe what an interrupted one left (and nothing else).
        let marker = dir.join("coalesce-bench-etcd");
        if marker.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        reset_dir(dir, "etcd")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(&marker, "")?;
        let members: Vec<(String, u16, u16)> = (0..3).map(|i| (format!("m{i}"), free_port(), free_port())).collect();
        let initial = members
            .iter()
            .map(|(name, peer, _)| format!("{name}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd { dir: dir.to_owned(), children: Vec::new(), endpoints: Vec::new() };
        for (name, peer, client) in &members {
            let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
            let child = Command::new(bin)
                .args(["--name", name])
                .arg("--data-dir")
                .arg(dir.join(name))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new", "--initial-cluster-token", "coalesce-bench"])
                .args(["--max-txn-ops", &max_txn_ops.max(128).to_string()])
                .args(["--quota-backend-bytes", &(8u64 << 30).to_string()])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| {
                    format!("starting {} (Debian's etcd-server; scripts/setup.sh installs it)", bin.display())
                })?;
            etcd.children.push(child);
            etcd.endpoints.push(format!("http://127.0.0.1:{client}"));
        }
        Ok(etcd)
    }

    /// Waits until a put through every member succeeds (a leader exists and a quorum is up).
    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        for ep in self.endpoints.clone() {
            loop {
                let attempt = async {
                    let mut c = etcd_client::Client::connect([ep.as_str()], None).await?;
                    c.put("bench-ready", "1", None).await?;
                    anyhow::Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                    Ok(Ok(())) => break,
                    _ if Instant::now() > deadline => {
                        bail!("etcd at {ep} not ready within {within:?} (logs in {})", self.dir.display())
                    }
                    _ => {}
                }
                for c in &mut self.children {
                    if let Some(status) = c.try_wait()? {
                        bail!("etcd exited with {status} (logs in {})", self.dir.display());
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One etcd lane's loop: single puts (`batch` = None) or Txns of `batch` distinct keys.
async fn etcd_phase(
    w: &LoadArgs,
    client: &etcd_client::Client,
    batch: Option<usize>,
    length: Duration,
) -> anyhow::Result<PhaseResult> {
    let phase = Arc::new(crate::bench::Phase::default());
    let started = Instant::now();
    let end = started + length;
    let errors = Arc::new(AtomicU64::new(0));
    let mut lanes = Vec::new();
    for lane in 0..w.producers {
        let mut kv = client.kv_client();
        let mut keys = KeyGen::new(w.keys, w.zipf, w.seed.wrapping_mul(1_000_003).wrapping_add(lane as u64))?;
        let (phase, errors) = (phase.clone(), errors.clone());
        let value = 1i64.to_be_bytes().to_vec();
        lanes.push(tokio::spawn(async move {
            let mut hist: Histogram<u64> = histogram();
            let mut picked = std::collections::HashSet::new();
            while Instant::now() < end {
                let sent = Instant::now();
                let (result, n) = match batch {
                    None => (kv.put(keys.next().to_owned(), value.clone(), None).await.map(|_| ()), 1),
                    Some(b) => {
                        picked.clear();
                        let mut ops = Vec::with_capacity(b);
                        while ops.len() < b {
                            let k = keys.next_index();
                            if picked.insert(k) {
                                ops.push(TxnOp::put(keys.key(k).to_owned(), value.clone(), None));
                            }
                        }
                        (kv.txn(Txn::new().and_then(ops)).await.map(|_| ()), b)
                    }
                };
                let _ = hist.record(sent.elapsed().as_micros().max(1) as u64);
                phase.requests.fetch_add(1, Ordering::Relaxed);
                match result {
                    Ok(()) => phase.events.fetch_add(n as u64, Ordering::Relaxed),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("etcd request failed: {e}");
                        }
                        phase.failed.fetch_add(n as u64, Ordering::Relaxed)
                    }
                };
            }
            hist
        }));
    }
    let mut hist = histogram();
    for lane in lanes {
        hist.add(&lane.await.context("etcd lane panicked")?).context("merging histograms")?;
    }
    Ok(PhaseResult { phase, latency: hist, secs: started.elapsed().as_secs_f64() })
}

fn row(name: &str, r: &PhaseResult) -> serde_json::Value {
    json!({
        "phase": name,
        "events_per_sec": r.rate().round(),
        "requests": r.phase.requests.load(Ordering::Relaxed),
        "failed_events": r.failed(),
        "ack_p50_ms": ms(r.latency.value_at_quantile(0.5)),
        "ack_p99_ms": ms(r.latency.value_at_quantile(0.99)),
        "ack_p999_ms": ms(r.latency.value_at_quantile(0.999)),
        "latency": quantiles_ms(&r.latency),
    })
}

pub(crate) async fn run(args: EtcdArgs) -> anyhow::Result<()> {
    let w = &args.work;
    w.check()?;
    if !w.endpoints.is_empty() {
        bail!("ingest-vs-etcd starts both clusters itself; --endpoints is not supported");
    }
    let say = |s: String| w.local.say(s);
    let length = Duration::from_secs(w.seconds);
    say(format!(
        "bench ingest-vs-etcd: {} lanes, {} events per batch, {} keys (zipf {}), 8-byte values, {} s per phase, 3 members each",
        w.producers, w.batch, w.keys, w.zipf, w.seconds
    ));

    // etcd first, alone on the machine.
    let etcd_dir = w.local.dir.join("etcd");
    let mut etcd = Etcd::start(&args.etcd, &etcd_dir, w.batch)?;
    let etcd_result = async {
        etcd.wait_ready(Duration::from_secs(30)).await?;
        let client = etcd_client::Client::connect(&etcd.endpoints, None).await?;
        etcd_phase(w, &client, None, Duration::from_secs(2)).await?;
        let single = etcd_phase(w, &client, None, length).await?;
        say(format!("etcd single puts:        {:>10.0} puts/s   latency {}", single.rate(), fmt_q(&single.latency)));
        let txn = etcd_phase(w, &client, Some(w.batch), length).await?;
        say(format!("etcd Txn of {:>5} puts:  {:>10.0} puts/s   latency {}", w.batch, txn.rate(), fmt_q(&txn.latency)));
        anyhow::Ok((single, txn))
    }
    .await;
    drop(etcd);
    let (single, txn) = etcd_result?;

    // Then Coalesce.
    let mut unary_args = w.clone();
    unary_args.batch = 1;
    let (endpoints, cluster) = w.cluster(crate::bench::STREAMS).await?;
    let coalesce_result = async {
        let client = Client::connect_lazy(endpoints.iter().cloned())?;
        client.wait_ready(Duration::from_secs(60)).await?;
        run_phase(w, &client, None, Duration::from_secs(2), None).await?;
        let batched = run_phase(w, &client, None, length, None).await?;
        say(format!(
            "coalesce {:>5} events/request: {:>8.0} events/s latency {}",
            w.batch,
            batched.rate(),
            fmt_q(&batched.latency)
        ));
        let unary = run_phase(&unary_args, &client, None, length, None).await?;
        say(format!("coalesce unary:          {:>10.0} events/s latency {}", unary.rate(), fmt_q(&unary.latency)));
        anyhow::Ok((batched, unary))
    }
    .await;
    if let Some(mut c) = cluster {
        c.stop_all(Duration::from_secs(20));
    }
    let (batched, unary) = coalesce_result?;

    let ratio = |a: f64, b: f64| (a / b.max(1e-9) * 100.0).round() / 100.0;
    let vs_single = ratio(batched.rate(), single.rate());
    let vs_txn = ratio(batched.rate(), txn.rate());
    let unary_vs_single = ratio(unary.rate(), single.rate());
    say(format!(
        "ratios: batched Coalesce / etcd single puts = {vs_single}×, / etcd Txn batches = {vs_txn}×; \
         unary Coalesce / etcd single puts = {unary_vs_single}×"
    ));
    w.local.emit(&json!({
        "bench": "ingest-vs-etcd",
        "machine": machine(),
        "etcd_version": etcd_version(&args.etcd),
        "lanes": w.producers,
        "batch": w.batch,
        "keys": w.keys,
        "zipf": w.zipf,
        "value_bytes": 8,
        "seconds_per_phase": w.seconds,
        "shards": w.local.shards(),
        "events_per_sec": batched.rate().round(),
        "unary_events_per_sec": unary.rate().round(),
        "etcd_puts_per_sec": single.rate().round(),
        "etcd_txn_puts_per_sec": txn.rate().round(),
        "ratio_vs_etcd": vs_single,
        "ratio_vs_etcd_txn": vs_txn,
        "unary_ratio_vs_etcd": unary_vs_single,
        "phases": [row("etcd_single", &single), row("etcd_txn", &txn), row("coalesce_batched", &batched), row("coalesce_unary", &unary)],
    }))
}

fn etcd_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim_start_matches("etcd Version:").trim().to_owned()))
        .unwrap_or_else(|| "unknown".into())
}
