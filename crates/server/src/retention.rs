//! Outbox retention on each shard's leader: what bounds an outbox that nobody drains.
//!
//! A shard's outbox keeps every output until the lowest cursor has acknowledged it
//! (`coalesce_raft::state_machine`). Two cases would keep outputs for ever:
//!
//! - **No cursor at all** (a stream without sinks, read only by subscribers that never ack):
//!   nothing claims the outputs. The leader keeps the newest `[outbox] max_outputs` and those
//!   whose window closed less than `unclaimed_max_age` ago, and proposes a `Trim` for the
//!   rest. The Trim is replicated, so every replica deletes the same rows; it never passes a
//!   cursor that appeared meanwhile (apply re-checks).
//! - **An abandoned cursor** that belongs to no configured sink (an admin created it with an
//!   ack): once it has not moved for `[outbox] cursor_ttl`, the leader proposes `DropCursor`,
//!   logged at warn and counted. "Not moved" is as this leader saw it: a new leader starts
//!   every cursor's idle time afresh, so leadership changes only ever delay an expiry.
//!   Cursors of configured sinks (push sinks and declared `grpc` consumers) are never expired:
//!   a sink that stays behind holds the outbox up to `max_outputs` and then stops ingest
//!   loudly (`outbox_full`), which is what its operator must see.
//!
//! `Trim` needs peer protocol 3; during a rolling upgrade from an older build the leader waits
//! until every replica of the shard announces it (`RaftNode::members_speak`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coalesce_core::hash::ShardId;
use coalesce_core::stream::OutboxLimits;
use coalesce_core::time::{Clock, SystemClock};
use coalesce_raft::reader::ShardReader;
use coalesce_raft::{Command, RaftNode, Response};

use crate::delivery::Delivery;
use crate::metrics;

/// How many outputs one round reads to find the first one young enough to keep.
const AGE_SCAN: usize = 512;

/// The retention task of one node.
#[derive(Debug)]
pub struct Retention {
    node: Arc<RaftNode>,
    delivery: Arc<Delivery>,
    limits: OutboxLimits,
    /// (shard, cursor) → (its acked seq when last seen to move, since when), for the shards
    /// this node leads.
    idle: BTreeMap<(ShardId, String), (u64, Instant)>,
}

impl Retention {
    pub fn new(node: Arc<RaftNode>, delivery: Arc<Delivery>) -> Self {
        let limits = node.streams().outbox();
        Self { node, delivery, limits, idle: BTreeMap::new() }
    }

    /// Runs a round every `period` until `shutdown` resolves.
    pub async fn run(mut self, period: Duration, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => self.round(Instant::now()).await,
            }
        }
    }

    /// One round over the shards this node leads.
    pub async fn round(&mut self, now: Instant) {
        let led = self.node.led_shards();
        self.idle.retain(|(shard, _), _| led.contains(shard));
        for shard in led {
            let Some(group) = self.node.group(shard) else { continue };
            let Ok(outbox) = group.reader().outbox() else { continue };
            if outbox.cursors.is_empty() {
                self.trim_unclaimed(shard, &group.reader(), outbox.low, outbox.next_seq).await;
                continue;
            }
            for (cursor, acked) in &outbox.cursors {
                if self.delivery.is_durable_consumer(cursor) || self.delivery.is_push_sink(cursor) {
                    continue;
                }
                let entry = self.idle.entry((shard, cursor.clone())).or_insert((*acked, now));
                if entry.0 != *acked {
                    *entry = (*acked, now);
                }
                let idle_for = now.duration_since(entry.1);
                if self.limits.cursor_ttl.is_zero() || idle_for < self.limits.cursor_ttl {
                    continue;
                }
                match self.node.propose(shard, Command::DropCursor { cursor: cursor.clone() }).await {
                    Ok(_) => {
                        metrics::CURSORS_EXPIRED.inc();
                        tracing::warn!(
                            shard,
                            cursor = %cursor,
                            acked = *acked,
                            idle_s = idle_for.as_secs(),
                            "dropped a cursor idle for longer than outbox.cursor_ttl: it no longer holds outputs"
                        );
                    }
                    Err(e) => tracing::debug!(shard, cursor = %cursor, error = %e, "cursor expiry not proposed"),
                }
            }
        }
    }

    /// Trims the outputs of a shard without cursors beyond `max_outputs` and
    /// `unclaimed_max_age`.
    async fn trim_unclaimed(&self, shard: ShardId, reader: &ShardReader, low: u64, next_seq: u64) {
        let mut below = next_seq.saturating_sub(self.limits.max_outputs).max(low);
        if !self.limits.unclaimed_max_age.is_zero() {
            let cutoff = SystemClock.now().saturating_sub(self.limits.unclaimed_max_age.as_millis() as u64);
            // Usually the oldest kept output is young enough: one row read, nothing to trim.
            let oldest_is_old =
                reader.outputs_from(below, 1).is_ok_and(|o| o.first().is_some_and(|o| o.window_end < cutoff));
            if oldest_is_old && let Ok(oldest) = reader.outputs_from(below, AGE_SCAN) {
                below = match oldest.iter().find(|o| o.window_end >= cutoff) {
                    Some(young) => young.seq,
                    // All of the scanned ones are old: trim them, the next round goes on.
                    None => oldest.last().map_or(below, |o| o.seq + 1),
                };
            }
        }
        if below <= low {
            return;
        }
        if !self.node.members_speak(shard, 3) {
            tracing::debug!(shard, "unclaimed outputs kept: a replica does not speak peer protocol 3 yet");
            return;
        }
        match self.node.propose(shard, Command::Trim { below }).await {
            Ok(Response::Acked { trimmed_below }) => {
                metrics::UNCLAIMED_TRIMMED.inc_by(trimmed_below.saturating_sub(low))
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(shard, error = %e, "trim of unclaimed outputs not proposed"),
        }
    }
}
