//! `coalescectl bench fetch`: request coalescing. The same closed-loop callers (Zipf keys,
//! spread evenly over the nodes) ask a local HTTP upstream for keys three ways, one phase each:
//!
//! 1. **direct** — every request is an upstream call;
//! 2. **in-process** — one singleflight per node (the same [`coalesce_sinks::flight`] engine,
//!    one instance per node, in this process): only callers on the same node share a call,
//!    as with Go's `singleflight` in each pod;
//! 3. **cluster** — the `Fetch` RPC of a local cluster: callers on every node share one call
//!    per key on the key's shard leader.
//!
//! Reported per phase: requests, upstream calls, the reduction of calls against requests, and
//! request latency p50/p99 (so the latency coalescing adds is the difference to `direct`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use coalesce_proto::v1 as pb;
use coalesce_sinks::flight::Flights;
use coalesce_sinks::upstream::{Answer, FetchParams, Upstream};
use serde_json::json;
use tokio::time::Instant;

use crate::bench::{KeyGen, LocalArgs, histogram, machine, quantiles_ms, start_local};

#[derive(Debug, clap::Args)]
pub(crate) struct FetchArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// Concurrent callers, each with one request in flight.
    #[arg(long, default_value_t = 96)]
    callers: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Zipf exponent of key popularity (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// How long the upstream takes to answer.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    upstream_latency: Duration,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The upstream: `GET /item/{key}` answers after the configured latency and counts calls.
async fn serve_upstream(latency: Duration, calls: Arc<AtomicU64>) -> anyhow::Result<String> {
    let app = axum::Router::new().route(
        "/item/{key}",
        axum::routing::get(move |axum::extract::Path(key): axum::extract::Path<String>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(latency).await;
                format!("{{\"key\":\"{key}\"}}")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/item/{{key}}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// How one phase's callers make a request.
#[derive(Clone)]
enum Way {
    Direct(Arc<Upstream>),
    InProcess(Arc<Upstream>, Arc<Vec<Flights<String, Result<Answer, String>>>>),
    Cluster(Vec<pb::coalesce_client::CoalesceClient<tonic::transport::Channel>>),
}

impl Way {
    async fn request(&mut self, node: usize, key: &str) -> anyhow::Result<()> {
        match self {
            Way::Direct(up) => {
                up.call(key).await.0.map_err(anyhow::Error::msg)?;
            }
            Way::InProcess(up, flights) => {
                let (up, k) = (up.clone(), key.to_owned());
                let call = move || async move { (up.call(&k).await.0, Duration::ZERO) };
                flights[node].get(key.to_owned(), Duration::ZERO, call).await?.value.map_err(anyhow::Error::msg)?;
            }
            Way::Cluster(clients) => {
                let req = pb::FetchRequest { stream: "items".into(), key: key.to_owned() };
                clients[node].fetch(req).await?;
            }
        }
        Ok(())
    }
}

async fn phase(args: &FetchArgs, nodes: usize, way: Way, calls: &AtomicU64) -> anyhow::Result<serde_json::Value> {
    let before = calls.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for c in 0..args.callers {
        let mut way = way.clone();
        let mut keys = KeyGen::new(args.keys, args.zipf, args.seed.wrapping_add(c as u64))?;
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let started = Instant::now();
                match way.request(c % nodes, keys.next()).await {
                    Ok(()) => {
                        let _ = h.record(started.elapsed().as_micros().max(1) as u64);
                    }
                    Err(_) => errors += 1,
                }
            }
            (h, errors)
        }));
    }
    let (mut all, mut errors) = (histogram(), 0u64);
    for t in tasks {
        let (h, e) = t.await?;
        all.add(&h)?;
        errors += e;
    }
    let upstream_calls = calls.load(Ordering::Relaxed) - before;
    let requests = all.len();
    let reduction = if requests == 0 { 0.0 } else { 1.0 - upstream_calls as f64 / requests as f64 };
    Ok(json!({
        "requests": requests,
        "errors": errors,
        "requests_per_sec": (requests as f64 / args.seconds as f64).round(),
        "upstream_calls": upstream_calls,
        "call_reduction": (reduction * 10_000.0).round() / 10_000.0,
        "latency": quantiles_ms(&all),
    }))
}

pub(crate) async fn run(args: FetchArgs) -> anyhow::Result<()> {
    if args.callers == 0 || args.seconds == 0 {
        bail!("--callers and --seconds must be at least 1");
    }
    let calls = Arc::new(AtomicU64::new(0));
    let url = serve_upstream(args.upstream_latency, calls.clone()).await?;
    let params: FetchParams = toml::from_str(&format!("url = \"{url}\"\ntimeout = \"10s\"\nmax_keys = 1000000"))?;
    let upstream = Arc::new(Upstream::new("bench", &params, None)?);
    let nodes = args.local.nodes.max(1);
    let say = |s: String| args.local.say(s);
    say(format!(
        "bench fetch: {} callers on {nodes} nodes, {} keys (zipf {}), upstream latency {:?}, {} s per phase",
        args.callers, args.keys, args.zipf, args.upstream_latency, args.seconds
    ));
    let direct = phase(&args, nodes, Way::Direct(upstream.clone()), &calls).await?;
    say(format!("direct      {direct}"));
    let flights = Arc::new((0..nodes).map(|_| Flights::new(1_000_000)).collect::<Vec<_>>());
    let in_process = phase(&args, nodes, Way::InProcess(upstream.clone(), flights), &calls).await?;
    say(format!("in-process  {in_process}"));

    let streams = format!(
        "[streams.items]\nmerge = \"latest\"\nwindow = {{ tumbling = \"1s\" }}\n\n\
         [streams.items.fetch]\nurl = \"{url}\"\ntimeout = \"10s\"\nmax_keys = 1000000\n"
    );
    let mut cluster = start_local(&args.local, &streams).await?;
    let result = async {
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.client_addr.clone()).collect();
        coalesce_client::Client::connect_lazy(addrs.iter().cloned())?.wait_ready(Duration::from_secs(60)).await?;
        let mut clients = Vec::new();
        for a in &addrs {
            clients.push(pb::coalesce_client::CoalesceClient::connect(format!("http://{a}")).await?);
        }
        phase(&args, nodes, Way::Cluster(clients), &calls).await
    }
    .await;
    cluster.stop_all(Duration::from_secs(20));
    let coalesced = result?;
    say(format!("cluster     {coalesced}"));
    let report = json!({
        "bench": "fetch",
        "machine": machine(),
        "callers": args.callers,
        "nodes": nodes,
        "shards": args.local.shards(),
        "keys": args.keys,
        "zipf": args.zipf,
        "upstream_latency_ms": args.upstream_latency.as_millis() as u64,
        "seconds_per_phase": args.seconds,
        "direct": direct,
        "in_process_singleflight": in_process,
        "cluster_fetch": coalesced,
    });
    args.local.emit(&report)
}
