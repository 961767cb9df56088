//! `coalescectl`: talk to a Coalesce cluster, or run the local demo cluster.
//!
//! Exit codes: 0 success, 1 error (message on stderr), 2 usage error (from clap).

mod admin;
mod bench;
mod bench_pg;
mod demo;
mod dlq;
mod send;
mod tail;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::coalesce_client::CoalesceClient;

#[derive(Debug, Parser)]
#[command(name = "coalescectl", version, about = "Operate a Coalesce cluster")]
struct Cli {
    /// Client address of any node.
    #[arg(long, global = true, env = "COALESCE_ADDR", default_value = "127.0.0.1:7400")]
    addr: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show the shards a node replicates: leader, epoch, replicas, buffered keys.
    Status,
    /// Send events read as JSON lines from stdin, e.g. `{"stream": "s", "key": "k", "value": 1}`.
    /// Exits 1 if any event was not acknowledged.
    Send(send::SendArgs),
    /// Follow emitted outputs and print them as JSON lines.
    Tail(tail::TailArgs),
    /// Show the node's sinks and their delivery counters.
    Sinks,
    /// Every shard's leader lease, as Kubernetes `coordination.k8s.io/v1` Leases (asks every node).
    Leases {
        /// Print a Kubernetes List of Leases as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The shards a node replicates in detail: role, term, commit/apply lag, replication lag,
    /// buffer and outbox.
    Shards {
        /// One JSON object per shard.
        #[arg(long)]
        json: bool,
    },
    /// The streams the node runs with.
    Streams,
    /// Move a shard's leadership to a replica and keep it there (replicated), or `--reset` to
    /// return to the default placement.
    TransferLeader {
        #[arg(long)]
        shard: u32,
        /// Node name of a replica, e.g. coalesce-2.
        #[arg(long, required_unless_present = "reset", conflicts_with = "reset")]
        to: Option<String>,
        #[arg(long)]
        reset: bool,
    },
    /// Move leadership of every shard away from the node at --addr and keep it away (e.g.
    /// before maintenance); `--undrain` ends it.
    Drain {
        #[arg(long)]
        undrain: bool,
    },
    /// Dead-letter queues: outputs a sink refused for good.
    #[command(subcommand)]
    Dlq(dlq::DlqCmd),
    /// Start a local 3-node cluster of real `coalesced` processes with a demo producer and
    /// show what goes in and what comes out, until Ctrl-C.
    Demo(demo::DemoArgs),
    /// Benchmarks that print numbers: ingest throughput and ack latency, failover time.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Status => status(&cli.addr).await,
            Cmd::Send(args) => send::run(&cli.addr, args).await,
            Cmd::Tail(args) => tail::run(&cli.addr, args).await,
            Cmd::Sinks => dlq::sinks(&cli.addr).await,
            Cmd::Leases { json } => admin::leases(&cli.addr, json).await,
            Cmd::Shards { json } => admin::shards(&cli.addr, json).await,
            Cmd::Streams => admin::streams(&cli.addr).await,
            Cmd::TransferLeader { shard, to, reset: _ } => admin::transfer_leader(&cli.addr, shard, to).await,
            Cmd::Drain { undrain } => admin::drain(&cli.addr, undrain).await,
            Cmd::Dlq(cmd) => dlq::run(&cli.addr, cmd).await,
            Cmd::Demo(args) => demo::run(args).await,
            Cmd::Bench(cmd) => bench::run(cmd).await,
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A client for `addr` with sane timeouts.
pub(crate) async fn connect(addr: &str) -> anyhow::Result<CoalesceClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .with_context(|| format!("bad address {addr:?}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    Ok(CoalesceClient::new(channel))
}

async fn status(addr: &str) -> anyhow::Result<()> {
    let st =
        connect(addr).await?.status(pb::StatusRequest {}).await.with_context(|| format!("asking {addr}"))?.into_inner();
    println!("cluster {} — node {} (id {}) — {} shards", st.cluster, st.node, st.node_id, st.shards);
    println!(
        "{:>5}  {:<14} {:>12}  {:<40} {:>9} {:>10} {:>9}",
        "SHARD", "LEADER", "EPOCH", "REPLICAS", "KEYS", "BYTES", "NEXT-SEQ"
    );
    for s in st.local_shards {
        let epoch = s.epoch.map(|e| format!("{}-{}", e.term, e.node % 100_000)).unwrap_or_else(|| "-".into());
        println!(
            "{:>5}  {:<14} {:>12}  {:<40} {:>9} {:>10} {:>9}",
            s.shard,
            if s.leader.is_empty() { "-" } else { &s.leader },
            epoch,
            s.replicas.join(","),
            s.buffered_keys,
            s.buffered_bytes,
            s.next_seq
        );
    }
    Ok(())
}
