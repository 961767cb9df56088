//! `coalescectl dlq` (dead-letter queues) and `coalescectl sinks` (delivery counters).

use anyhow::Context;
use coalesce_cli::outln;
use coalesce_client::BearerToken;
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::admin_client::AdminClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum DlqCmd {
    /// List dead letters of the shards the node replicates, as JSON lines.
    List {
        /// Only this sink's letters.
        #[arg(long)]
        sink: Option<String>,
        /// Only these shards (comma-separated).
        #[arg(long, value_delimiter = ',')]
        shards: Vec<u32>,
        /// Most letters printed (at most 1000).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Deliver dead letters of one shard to their sink again (on the shard's leader, found
    /// automatically); delivered letters leave the queue.
    Replay(Selection),
    /// Delete dead letters of one shard.
    Purge(Selection),
}

#[derive(Debug, clap::Args)]
pub(crate) struct Selection {
    #[arg(long)]
    sink: String,
    #[arg(long)]
    shard: u32,
    /// The letters' seqs (repeat the flag).
    #[arg(long = "seq", required_unless_present = "all", conflicts_with = "all")]
    seqs: Vec<u64>,
    /// Every letter of the sink on the shard.
    #[arg(long)]
    all: bool,
}

/// The operator API of the node at `addr` (TLS and token from the global flags).
pub(crate) fn admin(addr: &str) -> anyhow::Result<AdminClient<InterceptedService<Channel, BearerToken>>> {
    let o = crate::options();
    let channel = o.channel(addr).with_context(|| format!("bad address {addr:?}"))?;
    Ok(AdminClient::with_interceptor(channel, o.token()))
}

/// The leader's address from an UNAVAILABLE answer, if it named one.
fn leader_hint(status: &tonic::Status) -> Option<String> {
    (status.code() == tonic::Code::Unavailable)
        .then(|| status.metadata().get("coalesce-leader")?.to_str().ok().map(str::to_owned))
        .flatten()
}

pub(crate) async fn run(addr: &str, cmd: DlqCmd) -> anyhow::Result<()> {
    match cmd {
        DlqCmd::List { sink, shards, limit } => {
            let resp = admin(addr)?
                .list_dead_letters(pb::ListDeadLettersRequest { sink: sink.unwrap_or_default(), shards, limit })
                .await
                .with_context(|| format!("asking {addr}"))?
                .into_inner();
            for l in &resp.letters {
                let o = l.output.clone().unwrap_or_default();
                let line = serde_json::json!({
                    "sink": l.sink, "shard": o.shard, "seq": o.seq, "stream": o.stream, "key": o.key,
                    "value": serde_json::from_str::<serde_json::Value>(&o.value_json).unwrap_or_default(),
                    "reason": l.reason, "failed_at": l.failed_at, "attempts": l.attempts,
                });
                outln!("{line}");
            }
            let total: u64 = resp.counts.values().sum();
            eprintln!(
                "{} dead letters shown; {total} in all ({})",
                resp.letters.len(),
                resp.counts.iter().map(|(s, n)| format!("{s}: {n}")).collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        DlqCmd::Replay(sel) => {
            let req = pb::ReplayDeadLettersRequest { sink: sel.sink, shard: sel.shard, seqs: sel.seqs, all: sel.all };
            let resp = match admin(addr)?.replay_dead_letters(req.clone()).await {
                Ok(r) => r.into_inner(),
                Err(s) => match leader_hint(&s) {
                    Some(leader) => admin(&leader)?
                        .replay_dead_letters(req)
                        .await
                        .with_context(|| format!("replaying at the leader {leader}"))?
                        .into_inner(),
                    None => return Err(anyhow::Error::new(s).context(format!("replaying at {addr}"))),
                },
            };
            outln!("{} delivered, {} refused again", resp.delivered, resp.refused.len());
            for r in &resp.refused {
                outln!("  seq {}: {}", r.seq, r.reason);
            }
            if resp.refused.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("{} letters were refused again", resp.refused.len())
            }
        }
        DlqCmd::Purge(sel) => {
            let req = pb::PurgeDeadLettersRequest { sink: sel.sink, shard: sel.shard, seqs: sel.seqs, all: sel.all };
            let resp =
                admin(addr)?.purge_dead_letters(req).await.with_context(|| format!("purging at {addr}"))?.into_inner();
            outln!("{} purged", resp.purged);
            Ok(())
        }
    }
}

/// `coalescectl sinks`: each sink of the node with its delivery counters.
pub(crate) async fn sinks(addr: &str) -> anyhow::Result<()> {
    let st = admin(addr)?.sink_status(pb::SinkStatusRequest {}).await.with_context(|| format!("asking {addr}"))?;
    let st = st.into_inner();
    outln!("node {}", st.node);
    outln!("{:<20} {:<9} {:>10} {:>8} {:>6} {:<8} STREAMS", "SINK", "KIND", "DELIVERED", "RETRIES", "DLQ", "BREAKER");
    for s in st.sinks {
        outln!(
            "{:<20} {:<9} {:>10} {:>8} {:>6} {:<8} {}",
            s.name,
            s.kind,
            s.delivered,
            s.retries,
            s.dead_lettered,
            if s.breaker_open { "open" } else { "closed" },
            s.streams.join(",")
        );
    }
    Ok(())
}
