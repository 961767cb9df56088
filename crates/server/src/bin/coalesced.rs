//! `coalesced`: one Coalesce node. Flags override the config file; see `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use coalesce_server::config::Config;

/// A Coalesce node: a replica of its shards' Raft groups, serving the client API.
#[derive(Debug, Parser)]
#[command(version, about)]
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
    /// Log format.
    #[arg(long, env = "COALESCE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log = coalesce_server::telemetry::init_logging(args.log_format == "json");

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
    let base = args.config.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    let loaded = config.finish(&base).context("invalid configuration")?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(coalesce_server::app::run(loaded, Some(log), |_| {}, shutdown_signal()))
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
