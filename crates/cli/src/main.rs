//! `coalescectl`: talk to a Coalesce cluster, or run the local demo cluster.
//!
//! Exit codes: 0 success (also when the reader of stdout stopped early, as `| head` does:
//! `coalesce_cli::stdout`), 1 error (message on stderr), 2 usage error (from clap).

mod admin;
mod bench;
mod bench_adaptive;
mod bench_emit;
mod bench_etcd;
mod bench_fetch;
mod bench_pg;
mod bench_savings;
mod bench_snapshot;
mod bench_state;
mod certs;
mod demo;
mod dlq;
mod send;
mod tail;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coalesce_cli::outln;
use coalesce_client::{ClientOptions, NodeClient};
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::coalesce_client::CoalesceClient;

#[derive(Debug, Parser)]
#[command(name = "coalescectl", version, about = "Operate a Coalesce cluster")]
struct Cli {
    /// Client address of any node.
    #[arg(long, global = true, env = "COALESCE_ADDR", default_value = "127.0.0.1:7400")]
    addr: String,
    /// Bearer token for clusters that require one (never printed).
    #[arg(long, global = true, env = "COALESCE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the bearer token from this file instead (surrounding whitespace ignored).
    #[arg(long, global = true, env = "COALESCE_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
    /// Speak TLS to the client port, trusting this CA certificate (PEM file).
    #[arg(long, global = true, env = "COALESCE_CA")]
    ca: Option<std::path::PathBuf>,
    /// With --ca: check the nodes' certificates against this name instead of the address host.
    #[arg(long, global = true, env = "COALESCE_SERVER_NAME")]
    server_name: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show the shards a node replicates (leader, epoch, replicas, buffered keys, shed inputs)
    /// and every stream's input, shed and output counts over the cluster.
    Status,
    /// Send events read as JSON lines from stdin, e.g. `{"stream": "s", "key": "k", "value": 1}`.
    /// Exits 1 if any event was not acknowledged.
    Send(send::SendArgs),
    /// Follow emitted outputs and print them as JSON lines.
    Tail(tail::TailArgs),
    /// Fetch a key through the stream's upstream, coalesced with every concurrent caller in
    /// the cluster: the body goes to stdout, status and sharing to stderr.
    Fetch {
        #[arg(long)]
        stream: String,
        #[arg(long)]
        key: String,
    },
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
    /// The heaviest keys by input rate, cluster-wide (asks every node for the shards it leads).
    HotKeys {
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
        /// How many keys (at most 64 per shard).
        #[arg(long, default_value_t = 10)]
        k: u32,
        /// One JSON object per key.
        #[arg(long)]
        json: bool,
    },
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
    /// Forget an abandoned subscriber's cursor, so it no longer holds outputs in the outboxes.
    DropConsumer {
        /// The consumer name it subscribed and acked with.
        consumer: String,
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
    /// Generate a CA, one certificate per node and bearer tokens (files for `[tls.peer]`,
    /// `[tls.client]` and `[[auth.tokens]]`, or Kubernetes Secrets; docs/security.md).
    Certs(certs::CertsArgs),
    /// Game days: kill, pause and partition shard leaders under load on a local cluster, then
    /// check the invariants and write a report (exit 1 on any violation).
    #[command(subcommand)]
    Chaos(coalesce_cli::chaos::ChaosCmd),
}

/// How to reach the nodes (TLS, token), from the global flags.
static OPTIONS: std::sync::OnceLock<ClientOptions> = std::sync::OnceLock::new();

pub(crate) fn options() -> ClientOptions {
    OPTIONS.get().cloned().unwrap_or_default()
}

fn client_options(cli: &Cli) -> anyhow::Result<ClientOptions> {
    let mut o = ClientOptions::default();
    if let Some(ca) = &cli.ca {
        o = o.with_ca_pem(std::fs::read(ca).with_context(|| format!("reading --ca {}", ca.display()))?);
        if let Some(name) = &cli.server_name {
            o = o.with_server_name(name.clone());
        }
    }
    if let Some(t) = &cli.token {
        o = o.with_token(t);
    }
    if let Some(f) = &cli.token_file {
        let t = std::fs::read_to_string(f).with_context(|| format!("reading --token-file {}", f.display()))?;
        o = o.with_token(t.trim());
    }
    Ok(o)
}

fn main() {
    let cli = Cli::parse();
    match client_options(&cli) {
        Ok(o) => {
            let _ = OPTIONS.set(o);
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let command = async {
        match cli.command {
            Cmd::Status => status(&cli.addr).await,
            Cmd::Send(args) => send::run(&cli.addr, args).await,
            Cmd::Tail(args) => tail::run(&cli.addr, args).await,
            Cmd::Fetch { stream, key } => fetch(&cli.addr, stream, key).await,
            Cmd::Sinks => dlq::sinks(&cli.addr).await,
            Cmd::Leases { json } => admin::leases(&cli.addr, json).await,
            Cmd::Shards { json } => admin::shards(&cli.addr, json).await,
            Cmd::Streams => admin::streams(&cli.addr).await,
            Cmd::HotKeys { stream, k, json } => admin::hot_keys(&cli.addr, stream, k, json).await,
            Cmd::TransferLeader { shard, to, reset: _ } => admin::transfer_leader(&cli.addr, shard, to).await,
            Cmd::Drain { undrain } => admin::drain(&cli.addr, undrain).await,
            Cmd::DropConsumer { consumer } => admin::drop_consumer(&cli.addr, consumer).await,
            Cmd::Dlq(cmd) => dlq::run(&cli.addr, cmd).await,
            Cmd::Demo(args) => demo::run(args).await,
            Cmd::Certs(args) => certs::run(&args),
            Cmd::Bench(cmd) => bench::run(cmd).await,
            Cmd::Chaos(cmd) => coalesce_cli::chaos::run(cmd).await,
        }
    };
    // Written to a closed pipe (`coalescectl tail | head -1`): ends quietly (status 0).
    let result = coalesce_cli::stdout::run(|| runtime.block_on(command));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A client for the node at `addr` (TLS and token from the global flags).
pub(crate) async fn connect(addr: &str) -> anyhow::Result<NodeClient> {
    let o = options();
    let channel = o.channel(addr).with_context(|| format!("bad address {addr:?}"))?;
    Ok(CoalesceClient::with_interceptor(channel, o.token()))
}

async fn fetch(addr: &str, stream: String, key: String) -> anyhow::Result<()> {
    let r = connect(addr)
        .await?
        .fetch(pb::FetchRequest { stream, key })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let epoch = r.epoch.map(|e| format!("{}-{}", e.term, e.node)).unwrap_or_default();
    eprintln!(
        "HTTP {} {} — {} bytes, shared {}, cached {}, shard {} epoch {epoch}",
        r.status,
        r.content_type,
        r.body.len(),
        r.shared,
        r.cached,
        r.shard
    );
    coalesce_cli::stdout::bytes(&r.body);
    Ok(())
}

async fn status(addr: &str) -> anyhow::Result<()> {
    let st =
        connect(addr).await?.status(pb::StatusRequest {}).await.with_context(|| format!("asking {addr}"))?.into_inner();
    let id = if st.cluster_id.is_empty() { "not known yet" } else { st.cluster_id.as_str() };
    outln!("cluster {} (id {id}) — node {} (id {}) — {} shards", st.cluster, st.node, st.node_id, st.shards);
    outln!(
        "{:>5}  {:<14} {:>12}  {:<40} {:>9} {:>10} {:>9} {:>9}",
        "SHARD",
        "LEADER",
        "EPOCH",
        "REPLICAS",
        "KEYS",
        "BYTES",
        "NEXT-SEQ",
        "SHED"
    );
    for s in &st.local_shards {
        let epoch = s.epoch.as_ref().map(|e| format!("{}-{}", e.term, e.node % 100_000)).unwrap_or_else(|| "-".into());
        outln!(
            "{:>5}  {:<14} {:>12}  {:<40} {:>9} {:>10} {:>9} {:>9}",
            s.shard,
            if s.leader.is_empty() { "-" } else { &s.leader },
            epoch,
            s.replicas.join(","),
            s.buffered_keys,
            s.buffered_bytes,
            s.next_seq,
            s.shed_inputs
        );
    }
    // Stream counters are counted once per cluster, on one node each: add up every node's.
    let mut totals: std::collections::BTreeMap<String, pb::StreamCounters> = Default::default();
    let mut unreachable = Vec::new();
    for n in &st.nodes {
        let answer = if n.name == st.node {
            Ok(st.streams.clone())
        } else {
            match connect(&n.client_addr).await {
                Ok(mut c) => c
                    .status(pb::StatusRequest {})
                    .await
                    .map(|r| r.into_inner().streams)
                    .map_err(|e| e.message().to_owned()),
                Err(e) => Err(e.to_string()),
            }
        };
        match answer {
            Ok(streams) => {
                for c in streams {
                    let t = totals
                        .entry(c.stream.clone())
                        .or_insert_with(|| pb::StreamCounters { stream: c.stream.clone(), ..Default::default() });
                    t.inputs += c.inputs;
                    t.shed += c.shed;
                    t.outputs += c.outputs;
                    t.absorbed += c.absorbed;
                    t.received += c.received;
                    t.premerged += c.premerged;
                    t.rate_limited += c.rate_limited;
                    t.key_full += c.key_full;
                }
            }
            Err(e) => unreachable.push(format!("{} ({e})", n.name)),
        }
    }
    outln!();
    outln!(
        "{:<24} {:>12} {:>10} {:>12} {:>12} {:>8} {:>10} {:>10}",
        "STREAM",
        "INPUTS",
        "PRE-MERGE",
        "SHED",
        "OUTPUTS",
        "RATIO",
        "KEY-RATE",
        "KEY-FULL"
    );
    let ratio = |a: u64, b: u64| if b == 0 { "-".to_owned() } else { format!("{:.1}", a as f64 / b as f64) };
    for t in totals.values() {
        outln!(
            "{:<24} {:>12} {:>10} {:>12} {:>12} {:>8} {:>10} {:>10}",
            t.stream,
            t.inputs,
            ratio(t.received, t.premerged),
            t.shed,
            t.outputs,
            ratio(t.absorbed, t.outputs),
            t.rate_limited,
            t.key_full
        );
    }
    outln!(
        "(stream counters: every node since it started, summed; PRE-MERGE: events per partial sent to leaders; \
         SHED: dropped by overflow = \"shed\"; RATIO: inputs per output; KEY-RATE: over key_rate_limit; \
         KEY-FULL: refused by key_overflow = \"reject\")"
    );
    if !unreachable.is_empty() {
        eprintln!("not reachable (its counts are missing): {}", unreachable.join(", "));
    }
    Ok(())
}
