//! `coalescectl tail`: follow emitted outputs of a node's shards and print them as JSON lines.

use anyhow::Context;
use coalesce_cli::outln;
use coalesce_proto::v1 as pb;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub(crate) struct TailArgs {
    /// Consumer name. With `--ack` it must be a durable consumer (a `grpc` sink of the streams
    /// file; or, with an admin token, the first ack creates its cursor): its cursor then holds
    /// outputs until it acks them.
    #[arg(long, default_value = "coalescectl-tail")]
    consumer: String,
    /// Shards to follow (comma-separated); default every shard the node replicates.
    #[arg(long, value_delimiter = ',')]
    shards: Vec<u32>,
    /// Only outputs of this stream.
    #[arg(long)]
    stream: Option<String>,
    /// Start from the oldest output still in each outbox instead of after the consumer's acks.
    #[arg(long)]
    from_start: bool,
    /// Acknowledge outputs once printed.
    #[arg(long)]
    ack: bool,
    /// Exit after this many outputs.
    #[arg(long)]
    limit: Option<u64>,
}

pub(crate) async fn run(addr: &str, args: TailArgs) -> anyhow::Result<()> {
    let mut client = crate::connect(addr).await?;
    // Acks on their own connection, so unread outputs cannot hold back their answers (HTTP/2
    // flow control is shared per connection).
    let mut acks = crate::connect(addr).await?;
    let from_seq = if args.from_start {
        let st = client.status(pb::StatusRequest {}).await.with_context(|| format!("asking {addr}"))?.into_inner();
        st.local_shards.iter().map(|s| (s.shard, 0)).collect()
    } else {
        Default::default()
    };
    let req = pb::SubscribeRequest { consumer: args.consumer.clone(), shards: args.shards.clone(), from_seq };
    let mut stream = client.subscribe(req).await.with_context(|| format!("subscribing at {addr}"))?.into_inner();
    let mut printed = 0u64;
    while let Some(batch) = stream.message().await.context("reading outputs")? {
        let mut last: std::collections::BTreeMap<u32, u64> = Default::default();
        for o in batch.outputs {
            last.insert(o.shard, o.seq);
            if args.stream.as_ref().is_some_and(|s| *s != o.stream) {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(&o.value_json).unwrap_or(json!(o.value_json));
            outln!(
                "{}",
                json!({
                    "stream": o.stream, "key": o.key, "value": value, "shard": o.shard, "seq": o.seq,
                    "epoch": o.epoch.map(|e| json!({"term": e.term, "node": e.node})),
                    "window_start": o.window_start, "window_end": o.window_end, "inputs": o.inputs,
                    "reason": o.reason,
                })
            );
            printed += 1;
            if args.limit.is_some_and(|l| printed >= l) {
                break;
            }
        }
        if args.ack {
            for (shard, seq) in last {
                acks.ack(pb::AckRequest { consumer: args.consumer.clone(), shard, upto_seq: seq })
                    .await
                    .with_context(|| format!("acking shard {shard}"))?;
            }
        }
        if args.limit.is_some_and(|l| printed >= l) {
            break;
        }
    }
    Ok(())
}
