//! `coalesced`: one Coalesce node. Flags override the config file; see `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use coalesce_server::config::Config;

/// mimalloc instead of glibc's malloc: applying entries allocates and frees many small values
/// (keys, aggregates, outputs) across threads, where glibc's allocator cost a fifth of a loaded
/// node's CPU (docs/benchmarks.md, "Profile of benchmark 1"). Built without transparent huge
/// pages (feature `no_thp`): with them an idle node's RSS was 207 MiB instead of 66 MiB, and
/// throughput was no better.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A Coalesce node: a replica of its shards' Raft groups, serving the client API.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "A Coalesce node: buffers keyed events per window, merges them and emits one output per key \
             per window, replicated by Raft (docs: README.md, docs/operations.md)"
)]
struct Args {
    /// Node config file (TOML).
    #[arg(long, env = "COALESCE_CONFIG")]
    config: PathBuf,
    /// This node's name (overrides node.name; in Kubernetes, the pod name).
    #[arg(long, env = "COALESCE_NODE_NAME")]
    name: Option<String>,
    /// Data directory (overrides node.data_dir).
    #[arg(long, env = "COALESCE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Peer (Raft) listen address (overrides node.peer_listen).
    #[arg(long, env = "COALESCE_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// Client (API) listen address (overrides node.client_listen).
    #[arg(long, env = "COALESCE_CLIENT_LISTEN")]
    client_listen: Option<SocketAddr>,
    /// HTTP (metrics, probes) listen address (overrides node.http_listen).
    #[arg(long, env = "COALESCE_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// OTLP/gRPC collector for spans (overrides telemetry.otlp_endpoint; with neither,
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, unless
    /// OTEL_SDK_DISABLED=true).
    #[arg(long, env = "COALESCE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Log format.
    #[arg(long, env = "COALESCE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
    let mut config: Config = toml::from_str(&text).with_context(|| format!("parsing {}", args.config.display()))?;
    if let Some(n) = args.name {
        config.node.name = n;
    }
    if let Some(d) = args.data_dir {
        config.node.data_dir = d;
    }
    if let Some(a) = args.peer_listen {
        config.node.peer_listen = a;
    }
    if let Some(a) = args.client_listen {
        config.node.client_listen = a;
    }
    if let Some(a) = args.http_listen {
        config.node.http_listen = Some(a);
    }
    if let Some(e) = args.otlp_endpoint {
        config.telemetry.otlp_endpoint = Some(e);
    }
    if config.telemetry.otlp_endpoint.is_none() {
        let var = |name: &str| std::env::var(name).ok();
        config.telemetry.otlp_endpoint = coalesce_server::telemetry::otlp_endpoint_from_env(var);
    }
    let base = args.config.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    let loaded = config.finish(&base).context("invalid configuration")?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The OTLP client is created inside the runtime; its spans are flushed after the node stops.
    let (log, spans) = {
        let _in_runtime = runtime.enter();
        let c = &loaded.config;
        coalesce_server::telemetry::init(args.log_format == "json", &c.telemetry, &c.node.name, &c.cluster.name)?
    };
    let result = runtime.block_on(coalesce_server::app::run(loaded, Some(log), |_| {}, shutdown_signal()));
    spans.shutdown();
    result
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
