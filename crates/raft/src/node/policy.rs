//! Leader policy: hot-key tracking, load-adaptive windows fed by sink health, and the sealer
//! that proposes Seal entries on the leader's clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use coalesce_core::adaptive::{AdaptiveController, Decision, Pressure};
use coalesce_core::hash::ShardId;
use coalesce_core::hotkeys::{HotKey, HotKeys};
use coalesce_core::time::Millis;

use crate::state_machine::OutboxMeta;
use crate::types::{Command, IngestGroup, Response};

use super::{Group, RaftNode};

/// What a delivery worker last saw of its sink (see [`RaftNode::report_sink_health`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkHealth {
    /// The sink asked to slow down (HTTP 429), or full batches waited for its rate limit.
    pub throttled: bool,
    /// Deliveries fail and are being retried, or its circuit breaker is open.
    pub failing: bool,
}

/// A sink-health report older than this no longer counts (its worker stopped or stalled).
pub(super) const SINK_HEALTH_TTL: Duration = Duration::from_secs(3);

impl RaftNode {
    /// Counts admitted partials in the shard's hot-key tracker (created on first use).
    pub(super) fn observe_hot(&self, shard: ShardId, groups: &[IngestGroup]) {
        let Ok(mut hot) = self.hot.lock() else { return };
        let tracker = hot.entry(shard).or_insert_with(|| {
            let mut t = HotKeys::default();
            t.tick(self.clock.now());
            t
        });
        for (key, partial) in groups.iter().flat_map(|g| g.partials.iter()) {
            tracker.observe(&key.stream, &key.key, partial.inputs);
        }
    }

    /// Decays the hot-key tracker of every shard this node leads and forgets those of shards
    /// it no longer leads. Called on every sealer tick.
    pub(super) fn tick_hot(&self, led: &BTreeSet<ShardId>) {
        let now = self.clock.now();
        let Ok(mut hot) = self.hot.lock() else { return };
        hot.retain(|shard, _| led.contains(shard));
        for tracker in hot.values_mut() {
            tracker.tick(now);
        }
    }

    /// The adaptive controller's current decision for `stream` on `shard`, when this node
    /// leads it and the stream is adaptive.
    pub fn adaptive_decision(&self, shard: ShardId, stream: &str) -> Option<Decision> {
        let ctl = self.adaptive.lock().ok()?;
        ctl.get(&(shard, stream.to_owned())).map(AdaptiveController::decision)
    }

    /// Every adaptive controller's decision on the shards this node leads: (shard, stream).
    pub fn adaptive_decisions(&self) -> Vec<(ShardId, String, Decision)> {
        let Ok(ctl) = self.adaptive.lock() else { return Vec::new() };
        ctl.iter().map(|((shard, stream), c)| (*shard, stream.clone(), c.decision())).collect()
    }

    /// Tells the adaptive controllers which streams sink (cursor) `sink` carries; the server
    /// calls it once per configured sink at start.
    pub fn set_sink_streams(&self, sink: &str, streams: BTreeSet<String>) {
        if let Ok(mut m) = self.sink_streams.write() {
            m.insert(sink.to_owned(), streams);
        }
    }

    /// A delivery worker's latest view of `sink` on `shard` (reported after every delivery
    /// attempt and when it catches up); counts for [`SINK_HEALTH_TTL`].
    pub fn report_sink_health(&self, shard: ShardId, sink: &str, health: SinkHealth) {
        if let Ok(mut m) = self.sink_health.lock() {
            m.insert((shard, sink.to_owned()), (health, std::time::Instant::now()));
        }
    }

    /// The downstream pressure on `stream` of a shard this node leads: outputs the slowest
    /// cursor that carries the stream has not acknowledged, the age of the oldest of them
    /// (since its window closed), whether a sink carrying it reported throttling or failures
    /// recently, and the buffer fill. Backlogs count every output after the cursor (the outbox
    /// is one seq space for all streams).
    pub(super) fn pressure(
        &self,
        group: &Group,
        outbox: &OutboxMeta,
        fill: f64,
        stream: &str,
        now: Millis,
    ) -> Pressure {
        let carriers = self.sink_streams.read().unwrap_or_else(|p| p.into_inner());
        let carries = |cursor: &str| carriers.get(cursor).is_none_or(|s| s.contains(stream));
        let slowest = outbox.cursors.iter().filter(|(c, _)| carries(c)).map(|(_, acked)| *acked).min();
        let (outbox_backlog, oldest_undelivered_age_ms) = match slowest {
            // Without any consumer nothing waits on the outbox.
            None => (0, 0),
            Some(acked) => {
                let backlog = outbox.next_seq.saturating_sub(1).saturating_sub(acked);
                let age = if backlog == 0 {
                    0
                } else {
                    let first = group.reader().outputs_from(acked.max(outbox.low.saturating_sub(1)) + 1, 1);
                    first.ok().and_then(|f| f.first().map(|o| now.saturating_sub(o.window_end))).unwrap_or(0)
                };
                (backlog, age)
            }
        };
        let (mut sink_throttled, mut sink_failing) = (false, false);
        let health = self.sink_health.lock().unwrap_or_else(|p| p.into_inner());
        for ((_, sink), (h, at)) in
            health.range((group.shard, String::new())..).take_while(|((s, _), _)| *s == group.shard)
        {
            if at.elapsed() <= SINK_HEALTH_TTL && carries(sink) {
                sink_throttled |= h.throttled;
                sink_failing |= h.failing;
            }
        }
        Pressure { outbox_backlog, oldest_undelivered_age_ms, sink_throttled, sink_failing, buffer_fill: fill }
    }

    /// One control step of every adaptive stream on every shard this node leads (sealer tick);
    /// controllers of shards no longer led are dropped. A new leader's controller resumes from
    /// the stretch of the last Ingest entry it applied, so a failover does not close every
    /// stretched window at once.
    pub(super) fn tick_adaptive(&self, led: &BTreeSet<ShardId>) {
        let adaptive: Vec<_> =
            self.streams.iter().filter_map(|d| d.rules.window.adaptive.map(|p| (d.name.clone(), p))).collect();
        if let Ok(mut health) = self.sink_health.lock() {
            health.retain(|(shard, _), _| led.contains(shard));
        }
        if adaptive.is_empty() {
            return;
        }
        let now = self.clock.now();
        let limits = self.streams.limits();
        let ratio = |used: u64, max: u64| if max == 0 { 0.0 } else { used as f64 / max as f64 };
        // Storage reads first, without the controllers' lock.
        let mut samples = Vec::new();
        for shard in led {
            let Some(group) = self.group(*shard) else { continue };
            let (Ok(outbox), Ok(stats)) = (group.reader().outbox(), group.reader().stats()) else {
                continue;
            };
            let fill = ratio(stats.keys, limits.max_keys).max(ratio(stats.bytes, limits.max_bytes));
            let applied = group.applied_extra.lock().map(|m| m.clone()).unwrap_or_default();
            for (stream, policy) in &adaptive {
                let pressure = self.pressure(&group, &outbox, fill, stream, now);
                let resume = applied.get(stream).copied().unwrap_or(0);
                samples.push((*shard, stream, *policy, pressure, resume));
            }
        }
        let Ok(mut ctl) = self.adaptive.lock() else { return };
        ctl.retain(|(shard, _), _| led.contains(shard));
        for (shard, stream, policy, pressure, resume) in samples {
            let c = ctl.entry((shard, stream.clone())).or_insert_with(|| AdaptiveController::resume(policy, resume));
            let (before, steps) = (c.decision(), c.steps());
            let after = c.update(now, &pressure);
            if c.steps() != steps {
                crate::metrics::ADAPTIVE_STEPS.with_label_values(&[stream.as_str(), after.reason.as_str()]).inc();
                if let Some(cause) = after.reason.cause() {
                    crate::metrics::ADAPTIVE_HIGH.with_label_values(&[stream.as_str(), cause.as_str()]).inc();
                }
            }
            if after != before {
                tracing::debug!(
                    shard,
                    stream,
                    extra_ms = after.extra_ms,
                    reason = after.reason.as_str(),
                    cause = after.reason.cause().map_or("", |c| c.as_str()),
                    "adaptive window"
                );
            }
        }
    }

    /// The `k` heaviest keys of each shard this node leads (all of them, or `shard`), only of
    /// `stream` when given, with the shard's decayed total inputs. Shards without input yet
    /// are left out.
    pub fn hot_keys(&self, shard: Option<ShardId>, stream: Option<&str>, k: usize) -> Vec<(ShardId, f64, Vec<HotKey>)> {
        let led = self.led_shards();
        let Ok(hot) = self.hot.lock() else { return Vec::new() };
        hot.iter()
            .filter(|(s, _)| led.contains(s) && shard.is_none_or(|want| want == **s))
            .map(|(s, tracker)| {
                let keys = match stream {
                    // Filter before cutting to k: the top k of one stream, not k of all streams.
                    Some(name) => tracker.top(tracker.len()).into_iter().filter(|h| h.stream == name).take(k).collect(),
                    None => tracker.top(k),
                };
                (*s, tracker.total(), keys)
            })
            .collect()
    }

    /// Runs the window scheduler of every local group until `shutdown` resolves: while this
    /// node leads a shard, it proposes a Seal once the shard's earliest deadline has passed.
    ///
    /// It sleeps until the earliest deadline of the shards this node leads and wakes early on
    /// any applied change ([`RaftNode::changes`]: a new key may bring an earlier deadline, a
    /// new leadership starts with an applied entry), so an idle node does no sealing work and
    /// a window is sealed when it ends rather than up to a poll period later. A shard's
    /// earliest deadline is read from the deadline index only when its state changed since the
    /// last look. Change-driven passes are at least `tick` apart, so a busy node rescans no
    /// more often than a poll every `tick` did (a 5 ms spacing raised ack latency p99 under
    /// load, docs/benchmarks.md); a deadline is still met on time,
    /// as the pass that learns of a key sleeps until its window ends. `tick` is also the period
    /// of the hot-key and adaptive-window housekeeping, and of retrying a seal that could not be
    /// proposed.
    pub async fn run_sealer(self: Arc<Self>, tick: Duration, shutdown: impl std::future::Future<Output = ()>) {
        let mut housekeeping = tokio::time::interval(tick);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = self.changes();
        let min_gap = tick;
        tokio::pin!(shutdown);
        // shard → (state version, earliest deadline at that version)
        let mut cache: BTreeMap<ShardId, (u64, Option<u64>)> = BTreeMap::new();
        // When the next pass is due (a deadline, or a retry), and when the last one ran.
        let mut wake_at = tokio::time::Instant::now();
        let mut last_pass = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = housekeeping.tick() => {
                    let led = self.led_shards();
                    self.tick_hot(&led);
                    self.tick_adaptive(&led);
                    continue;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // The gap never holds back a deadline that falls inside it.
                    tokio::time::sleep_until((last_pass + min_gap).min(wake_at)).await;
                }
                _ = tokio::time::sleep_until(wake_at) => {}
            }
            changes.borrow_and_update();
            last_pass = tokio::time::Instant::now();
            let next = self.seal_due(&mut cache, tick).await;
            // At most a second between passes: a wall clock that jumped back cannot hold a
            // window open for longer than that past its end.
            wake_at = last_pass + next.min(Duration::from_secs(1));
        }
    }

    /// Proposes a Seal for every shard this node leads whose earliest deadline has passed;
    /// returns how long until the next pass is due (the earliest deadline still ahead, or
    /// `retry` when a due shard is still waiting).
    async fn seal_due(&self, cache: &mut BTreeMap<ShardId, (u64, Option<u64>)>, retry: Duration) -> Duration {
        let mut next = Duration::MAX;
        for group in self.groups() {
            if !group.raft.is_leader() {
                continue;
            }
            let now = self.clock.now();
            let version = group.reader().version();
            let due = match cache.get(&group.shard) {
                Some((v, d)) if *v == version => *d,
                _ => {
                    let Ok(d) = group.reader().next_deadline() else {
                        next = next.min(retry);
                        continue;
                    };
                    cache.insert(group.shard, (version, d));
                    d
                }
            };
            let Some(due) = due else { continue };
            if due > now {
                next = next.min(Duration::from_millis(due - now));
                continue;
            }
            let cmd = Command::Seal {
                stamp: now,
                max: 10_000,
                session_ttl_ms: coalesce_core::session::DEFAULT_SESSION_TTL_MS,
            };
            let span = tracing::debug_span!("seal", shard = group.shard, outputs = tracing::field::Empty);
            match tracing::Instrument::instrument(self.propose(group.shard, cmd), span.clone()).await {
                Ok(Response::Sealed { sealed, .. }) => {
                    span.record("outputs", sealed);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(shard = group.shard, error = %e, "seal not proposed"),
            }
            // The seal's apply moves the version, and the change wakes the next pass; should
            // nothing have been applied (not proposed, or more still due), look again soon.
            next = next.min(retry);
        }
        next
    }
}
