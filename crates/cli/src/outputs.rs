//! Following a node's outputs as a durable consumer (the client API's `Subscribe`), for the
//! tools that must see every emission: the game-day recorder ([`crate::chaos`]) and the
//! failover benchmark (first emission by a new leader).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use coalesce_proto::v1 as pb;
use coalesce_proto::v1::coalesce_client::CoalesceClient;
use tonic::transport::Channel;

/// Milliseconds since the Unix epoch on this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A lazily connecting channel to `addr` with short connect and request timeouts (a node
/// that is down or paused must not stall the caller).
pub fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(3))
        .connect_lazy())
}

/// Follows the outboxes of the shards node `addr` replicates as consumer `consumer` (which
/// must be a `grpc` sink of the streams), calling `on_batch(outputs, received_ms)` for every
/// batch, until `stop` is set. Reconnects when the node goes away (killed, restarted) and
/// resumes after the last seq it saw per shard, so a restart does not replay what was seen.
/// With `ack`, acknowledges each batch (so the outbox is trimmed, as a real consumer would);
/// without, the outbox keeps everything for this consumer (a short game day can afford it).
pub async fn follow(
    addr: String,
    consumer: String,
    ack: bool,
    stop: Arc<AtomicBool>,
    mut on_batch: impl FnMut(Vec<pb::Output>, u64) + Send,
) {
    let mut seen: BTreeMap<u32, u64> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(ch) = channel(&addr) else { return };
        let mut client = CoalesceClient::new(ch);
        let local = match client.status(pb::StatusRequest {}).await {
            Ok(s) => s.into_inner().local_shards.into_iter().map(|s| s.shard).collect::<Vec<_>>(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let from_seq = local.iter().map(|s| (*s, seen.get(s).copied().unwrap_or(0))).collect();
        let req = pb::SubscribeRequest { consumer: consumer.clone(), shards: local, from_seq };
        let mut stream = match client.subscribe(req).await {
            Ok(s) => s.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if stop.load(Ordering::Relaxed) { return }
                    continue;
                }
            };
            let Ok(Some(batch)) = msg else { break };
            let at = now_ms();
            let mut upto: BTreeMap<u32, u64> = BTreeMap::new();
            for o in &batch.outputs {
                seen.insert(o.shard, o.seq);
                let u = upto.entry(o.shard).or_default();
                *u = (*u).max(o.seq);
            }
            on_batch(batch.outputs, at);
            if ack {
                for (shard, upto_seq) in upto {
                    // Best effort: an ack lost to a leader change is repeated by the next batch.
                    let _ = client.ack(pb::AckRequest { consumer: consumer.clone(), shard, upto_seq }).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
