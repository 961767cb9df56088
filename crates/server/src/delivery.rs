//! Delivery: moves each shard's outbox into its sinks (`coalesce_sinks`), on the shard's
//! leader.
//!
//! ```text
//!  supervisor (every 50 ms): shards this node leads with a valid lease → one worker per
//!                            (sink, shard); sinks with a cluster-wide budget get the share
//!  worker:  cursor (replicated) → read outbox after it → outputs of the sink's streams,
//!           ≤ batch_max → lease still valid? → deliver → Ack through Raft
//!           transient failure → retry with exponential backoff + jitter (circuit breaker per sink)
//!           permanent refusal → isolate the refused outputs → DeadLetter through Raft
//! ```
//!
//! A worker stops when the leader's epoch changes or its lease lapses; the next leader's
//! worker starts from the replicated cursor, so the unacknowledged suffix is delivered again
//! with the same seqs (at least once; fencing sinks make it exactly once). A sink's cursor is
//! registered (at the outbox's low end) the first time a leader runs its worker, so outputs are
//! kept for it from then on.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coalesce_core::cluster::ClusterIdentity;
use coalesce_core::output::{DeadLetter, Epoch, Output};
use coalesce_core::time::{Clock, SystemClock};
use coalesce_raft::{Command, ProposeError, RaftNode, Response, SinkHealth};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use coalesce_sinks::{Batch, DeliveryError, Sink, SinkConfig};

use crate::metrics;

/// How often the supervisor looks at leadership.
const SUPERVISE_EVERY: Duration = Duration::from_millis(50);
/// How long stopping waits for workers (and their final acks).
const STOP_WAIT: Duration = Duration::from_secs(2);
/// How often a caught-up worker, which otherwise sleeps until the shard changes, looks whether
/// it still leads the shard under its epoch (and ends if not, so a new epoch gets a new worker).
const VALIDITY_CHECK: Duration = Duration::from_millis(250);
/// A full batch that waited at least this long for the sink's rate limit reports the sink as
/// throttled.
const RATE_WAIT_THROTTLED: Duration = Duration::from_millis(1);

/// Consecutive-failure circuit breaker shared by a sink's workers.
#[derive(Debug)]
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<(u32, Option<Instant>)>,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Self {
        Self { threshold, cooldown, state: Mutex::new((0, None)) }
    }

    /// When an open breaker lets the next trial through.
    fn open_until(&self) -> Option<Instant> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1.filter(|t| *t > Instant::now())
    }

    fn success(&self) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (0, None);
    }

    /// Records a failure; true when it opened the breaker.
    fn failure(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = s.0.saturating_add(1);
        if s.0 >= self.threshold && s.1.is_none_or(|t| t <= Instant::now()) {
            s.1 = Some(Instant::now() + self.cooldown);
            return true;
        }
        false
    }
}

/// One configured sink on this node.
#[derive(Debug)]
struct SinkRuntime {
    config: SinkConfig,
    /// `None` for durable subscribers (`grpc`): nothing to push, the cursor is all.
    sink: Option<Arc<dyn Sink>>,
    breaker: Breaker,
}

/// Delivery counters of a sink since start (summed over shards; the same numbers as its
/// `coalesce_sink_*` metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub delivered: u64,
    pub retries: u64,
    pub dead_lettered: u64,
    pub breaker_open: bool,
    pub rate_limit_waited: Duration,
}

/// The delivery engine of a node.
#[derive(Debug)]
pub struct Delivery {
    node: Arc<RaftNode>,
    sinks: Vec<Arc<SinkRuntime>>,
    clock: SystemClock,
    /// For streams that deliver fetched answers (`on_window_close`); set once at start.
    fetch: std::sync::OnceLock<crate::fetch::FetchService>,
}

/// What delivering one batch came to.
enum Outcome {
    Delivered,
    /// Some outputs were refused for good (the rest were delivered).
    Refused(Vec<DeadLetter>),
    /// Lost the lease, was fenced, or shutting down: stop this worker.
    Stop,
}

impl Delivery {
    /// Builds every configured sink for this node (opening files, HTTP clients; PostgreSQL
    /// connects lazily).
    pub async fn new(
        node: Arc<RaftNode>,
        configs: &[SinkConfig],
        node_name: &str,
        data_dir: &Path,
    ) -> anyhow::Result<Arc<Self>> {
        let mut sinks = Vec::new();
        for config in configs {
            node.set_sink_streams(&config.name, config.streams.iter().cloned().collect());
            let sink =
                config.build(node_name, data_dir).await.map_err(|e| anyhow::anyhow!("sinks.{}: {e}", config.name))?;
            let d = &config.delivery;
            sinks.push(Arc::new(SinkRuntime {
                config: config.clone(),
                sink,
                breaker: Breaker::new(d.breaker_failures, d.breaker_cooldown),
            }));
        }
        Ok(Arc::new(Self { node, sinks, clock: SystemClock, fetch: std::sync::OnceLock::new() }))
    }

    /// Every configured sink with its counters since start.
    pub fn sinks(&self) -> Vec<(SinkConfig, SinkStats)> {
        self.sinks
            .iter()
            .map(|rt| {
                let name = [rt.config.name.as_str()];
                let st = SinkStats {
                    delivered: metrics::SINK_DELIVERED.with_label_values(&name).get(),
                    retries: metrics::SINK_RETRIES.with_label_values(&name).get(),
                    dead_lettered: metrics::SINK_DEAD_LETTERED.with_label_values(&name).get(),
                    breaker_open: rt.breaker.open_until().is_some(),
                    rate_limit_waited: rt.sink.as_ref().map(|s| s.rate_limit_waited()).unwrap_or_default(),
                };
                (rt.config.clone(), st)
            })
            .collect()
    }

    /// Lets delivery use the node's Fetch service (the event → fetch bridge); once, at start.
    pub fn set_fetch(&self, fetch: crate::fetch::FetchService) {
        let _ = self.fetch.set(fetch);
    }

    /// The request-rate limiter of sink `name` (an `http` sink with a `rate_limit`).
    pub fn limiter_of(&self, name: &str) -> Option<coalesce_sinks::limiter::WindowLimiter> {
        self.sinks.iter().find(|s| s.config.name == name)?.sink.as_ref()?.limiter()
    }

    /// Whether `name` is a declared durable subscriber: a `grpc` sink of the streams file.
    pub fn is_durable_consumer(&self, name: &str) -> bool {
        self.sinks.iter().any(|s| s.config.name == name && s.sink.is_none())
    }

    /// Whether `name` is a sink the cluster delivers to itself (not a subscriber name).
    pub fn is_push_sink(&self, name: &str) -> bool {
        self.sinks.iter().any(|s| s.config.name == name && s.sink.is_some())
    }

    /// Records outputs a sink accepted: counts, writes saved and staleness.
    fn delivered(&self, sink: &str, outputs: &[Output]) {
        let name = [sink];
        metrics::SINK_DELIVERED.with_label_values(&name).inc_by(outputs.len() as u64);
        let absorbed: u64 = outputs.iter().map(|o| o.inputs).sum();
        metrics::SINK_WRITES_SAVED.with_label_values(&name).inc_by(absorbed.saturating_sub(outputs.len() as u64));
        let now = self.clock.now();
        let staleness = metrics::SINK_STALENESS.with_label_values(&name);
        for o in outputs {
            staleness.observe(now.saturating_sub(o.first_input_at) as f64 / 1000.0);
        }
    }

    /// Runs the supervisor until `shutdown` resolves; then stops every worker (bounded).
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut workers: BTreeMap<(usize, u32), (Epoch, JoinHandle<()>)> = BTreeMap::new();
        let mut share = (u32::MAX, 0);
        let mut tick = tokio::time::interval(SUPERVISE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => {}
            }
            let total = self.node.spec().shards;
            let led: Vec<(u32, Epoch)> = self
                .node
                .groups()
                .iter()
                .filter_map(|g| self.node.delivery_epoch(g.shard).map(|e| (g.shard, e)))
                .collect();
            if share != (led.len() as u32, total) {
                share = (led.len() as u32, total);
                for rt in &self.sinks {
                    if let Some(s) = &rt.sink {
                        s.set_share(share.0, share.1);
                    }
                }
            }
            workers.retain(|_, (_, h)| !h.is_finished());
            for (i, rt) in self.sinks.iter().enumerate() {
                for (shard, epoch) in &led {
                    if workers.contains_key(&(i, *shard)) {
                        continue;
                    }
                    let worker = Worker {
                        delivery: Arc::clone(&self),
                        rt: Arc::clone(rt),
                        shard: *shard,
                        epoch: *epoch,
                        cluster: self.node.cluster_identity(),
                        stop: stop_rx.clone(),
                    };
                    workers.insert((i, *shard), (*epoch, tokio::spawn(worker.run())));
                }
            }
        }
        // Workers finish their request and record their progress; those that cannot (no quorum
        // while every node stops at once) are cut off after a bounded wait.
        let _ = stop_tx.send(true);
        let deadline = tokio::time::Instant::now() + STOP_WAIT;
        let mut late = 0;
        for (_, (_, mut handle)) in workers {
            if tokio::time::timeout_at(deadline, &mut handle).await.is_err() {
                handle.abort();
                late += 1;
            }
        }
        if late > 0 {
            tracing::warn!(
                workers = late,
                "delivery workers did not stop in time; the next leader repeats their last deliveries"
            );
        }
    }

    /// Delivers dead letters of `sink` on `shard` again (on this node, which must lead the
    /// shard), removing the delivered ones from the queue. Returns (delivered, still refused).
    pub async fn replay(&self, shard: u32, sink: &str, seqs: &[u64]) -> Result<(u64, Vec<(u64, String)>), ReplayError> {
        let rt = self
            .sinks
            .iter()
            .find(|s| s.config.name == sink)
            .ok_or_else(|| ReplayError::NotFound(format!("sink {sink:?} is not configured")))?;
        let Some(target) = &rt.sink else {
            return Err(ReplayError::Invalid(format!("sink {sink:?} is a subscriber: nothing to replay into")));
        };
        let epoch = self.node.delivery_epoch_waking(shard).await.ok_or(ReplayError::NotLeader(shard))?;
        let cluster = self.node.cluster_identity().ok_or(ReplayError::NoClusterId)?;
        let group = self.node.group(shard).ok_or(ReplayError::NotLeader(shard))?;
        let mut letters = Vec::new();
        for seq in seqs {
            if let Some(l) = group
                .reader()
                .dead_letters(sink, *seq, 1)
                .map_err(|e| ReplayError::Internal(e.to_string()))?
                .into_iter()
                .find(|l| l.output.seq == *seq)
            {
                letters.push(l);
            }
        }
        let mut done = Vec::new();
        let mut refused = Vec::new();
        for l in letters {
            let outputs = [l.output.clone()];
            match target.deliver(Batch { cluster, shard, epoch, outputs: &outputs }).await {
                Ok(()) => done.push(l.output.seq),
                Err(e) => refused.push((l.output.seq, e.to_string())),
            }
        }
        if !done.is_empty() {
            self.node
                .dlq_remove(shard, sink.to_owned(), done.clone())
                .await
                .map_err(|e| ReplayError::Internal(e.to_string()))?;
        }
        Ok((done.len() as u64, refused))
    }
}

/// Why a replay did not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("this node does not lead shard {0} (or its lease lapsed)")]
    NotLeader(u32),
    #[error("this node has not learned the cluster id from its peers yet")]
    NoClusterId,
    #[error("{0}")]
    Internal(String),
}

struct Worker {
    delivery: Arc<Delivery>,
    rt: Arc<SinkRuntime>,
    shard: u32,
    epoch: Epoch,
    /// Known before the first delivery (the worker waits for it).
    cluster: Option<ClusterIdentity>,
    stop: watch::Receiver<bool>,
}

impl Worker {
    fn valid(&self) -> bool {
        !*self.stop.borrow() && self.delivery.node.delivery_epoch(self.shard) == Some(self.epoch)
    }

    async fn propose(&self, cmd: Command) -> Result<Response, ProposeError> {
        self.delivery.node.propose(self.shard, cmd).await
    }

    /// Tells the shard's leader (this node) how the sink is doing: the adaptive windows'
    /// throttled / failing signals.
    fn report(&self, throttled: bool, failing: bool) {
        self.delivery.node.report_sink_health(self.shard, &self.rt.config.name, SinkHealth { throttled, failing });
    }

    async fn run(mut self) {
        let name = self.rt.config.name.clone();
        if let Err(e) = self.deliver_loop().await {
            tracing::debug!(sink = %name, shard = self.shard, error = %e, "delivery worker stopped");
        }
    }

    async fn deliver_loop(&mut self) -> Result<(), String> {
        let name = self.rt.config.name.clone();
        let Some(group) = self.delivery.node.group(self.shard) else { return Ok(()) };
        let meta = group.reader().outbox().map_err(|e| e.to_string())?;
        let mut acked = match meta.cursors.get(&name) {
            Some(c) => *c,
            None => {
                // Register the cursor so outputs are kept for this sink from now on.
                self.propose(Command::Ack { cursor: name.clone(), upto_seq: 0 }).await.map_err(|e| e.to_string())?;
                0
            }
        };
        let Some(sink) = self.rt.sink.clone() else {
            // A durable subscriber: its consumers ack through the API.
            while self.valid() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = self.stop.changed() => {}
                }
            }
            return Ok(());
        };
        // What sinks record downstream is keyed by the cluster id: wait until this node knows it
        // (a node learns it from its peers when it starts; see coalesce_raft::identity).
        while self.cluster.is_none() {
            tokio::select! {
                id = self.delivery.node.cluster_identity_wait() => self.cluster = Some(id),
                _ = self.stop.changed() => {}
            }
            if !self.valid() {
                return Ok(());
            }
        }
        // `next`: the first seq not yet handled (delivered or skipped); `pending`: read ahead
        // from the outbox. Progress is acknowledged through Raft at most every `ack_interval`
        // (and when stopping): what a dying leader delivered but had not acknowledged yet is
        // delivered again by the next one.
        let mut next = (acked + 1).max(meta.low);
        let mut changes = group.reader().watch_outputs();
        let mut pending: VecDeque<Output> = VecDeque::new();
        let mut last_ack = Instant::now();
        let ack_interval = self.rt.config.delivery.ack_interval;
        let batch_max = self.rt.config.batch_max();
        let page_size = batch_max.clamp(256, 2_000);
        loop {
            if !self.valid() {
                break;
            }
            if next - 1 > acked && last_ack.elapsed() >= ack_interval {
                self.propose(Command::Ack { cursor: name.clone(), upto_seq: next - 1 })
                    .await
                    .map_err(|e| e.to_string())?;
                acked = next - 1;
                last_ack = Instant::now();
            }
            if !pending.is_empty() || next - 1 > acked {
                // Work in hand (or progress to record): the shard must not quiesce.
                self.delivery.node.keep_awake(self.shard);
            }
            if pending.is_empty() {
                // Marked seen before the read: a change that lands after it wakes the wait.
                changes.borrow_and_update();
                pending.extend(group.reader().outputs_from(next, page_size).map_err(|e| e.to_string())?);
                if pending.is_empty() {
                    // Caught up: wait for new outputs (the shard's change notification), until
                    // an acknowledgement is due, or the stop; the leadership is looked at again
                    // at least every VALIDITY_CHECK.
                    self.report(false, false);
                    let ack_due = (next - 1 > acked).then(|| last_ack + ack_interval);
                    let check = Instant::now() + VALIDITY_CHECK;
                    let until = ack_due.map_or(check, |a| a.min(check));
                    tokio::select! {
                        _ = changes.changed() => {}
                        _ = tokio::time::sleep_until(until) => {}
                        _ = self.stop.changed() => {}
                    }
                    continue;
                }
            }
            // The next batch: up to batch_max of this sink's outputs, skipping other streams'.
            let mut ours: Vec<Output> = Vec::new();
            let mut upto = next - 1;
            while let Some(o) = pending.front() {
                let seq = o.seq;
                if self.rt.config.streams.contains(&o.stream) {
                    if ours.len() == batch_max {
                        break;
                    }
                    ours.extend(pending.pop_front());
                } else {
                    pending.pop_front();
                }
                upto = seq;
            }
            if !ours.is_empty() {
                match self.deliver(sink.as_ref(), &ours).await {
                    Outcome::Stop => break,
                    Outcome::Delivered => self.delivery.delivered(&name, &ours),
                    Outcome::Refused(letters) => {
                        let n = letters.len() as u64;
                        let refused: std::collections::BTreeSet<u64> = letters.iter().map(|l| l.output.seq).collect();
                        ours.retain(|o| !refused.contains(&o.seq));
                        self.delivery.delivered(&name, &ours);
                        metrics::SINK_DEAD_LETTERED.with_label_values(&[name.as_str()]).inc_by(n);
                        tracing::warn!(sink = %name, shard = self.shard, outputs = n, "outputs refused by the sink, moved to its dead-letter queue");
                        // The letters and the cursor move together, now.
                        self.propose(Command::DeadLetter { cursor: name.clone(), upto_seq: upto, letters })
                            .await
                            .map_err(|e| e.to_string())?;
                        acked = upto;
                        last_ack = Instant::now();
                    }
                }
            }
            next = upto + 1;
        }
        // Stopping (shutdown, lost lease, fenced): record what was delivered if this node may
        // still speak for the shard (a graceful shutdown); otherwise the next leader repeats it.
        if next - 1 > acked && self.delivery.node.delivery_epoch(self.shard) == Some(self.epoch) {
            let ack = self.propose(Command::Ack { cursor: name, upto_seq: next - 1 });
            match tokio::time::timeout(STOP_WAIT, ack).await {
                Ok(r) => {
                    r.map_err(|e| e.to_string())?;
                }
                Err(_) => return Err("the final ack did not commit in time".into()),
            }
        }
        Ok(())
    }

    /// Delivers `outputs` (retrying transient failures); refused batches are split to find
    /// the outputs the sink refuses.
    async fn deliver(&mut self, sink: &dyn Sink, outputs: &[Output]) -> Outcome {
        let d = self.rt.config.delivery;
        let mut attempts = 0u32;
        loop {
            while let Some(until) = self.rt.breaker.open_until() {
                self.report(false, true);
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = self.stop.changed() => {}
                }
                if *self.stop.borrow() {
                    return Outcome::Stop;
                }
            }
            // Fencing: deliver only under a valid lease of the epoch this worker started in.
            if !self.valid() {
                return Outcome::Stop;
            }
            attempts += 1;
            let started = Instant::now();
            let span = tracing::debug_span!(
                "deliver",
                sink = %self.rt.config.name,
                shard = self.shard,
                first_seq = outputs.first().map_or(0, |o| o.seq),
                last_seq = outputs.last().map_or(0, |o| o.seq),
                attempt = attempts,
            );
            let (shard, epoch, fetch) = (self.shard, self.epoch, self.delivery.fetch.get());
            let Some(cluster) = self.cluster else { return Outcome::Stop };
            let waited_before = sink.rate_limit_waited();
            let attempt = async move {
                // The event → fetch bridge swaps in fetched answers first (crate::fetch).
                let bridged = match fetch {
                    Some(f) => f.bridge(outputs).await?,
                    None => None,
                };
                sink.deliver(Batch { cluster, shard, epoch, outputs: bridged.as_deref().unwrap_or(outputs) }).await
            };
            let result = tracing::Instrument::instrument(attempt, span).await;
            let kind = match &result {
                Ok(()) => "ok",
                Err(DeliveryError::Transient { .. }) => "transient",
                Err(DeliveryError::Throttled { .. }) => "throttled",
                Err(DeliveryError::Rejected { .. }) => "rejected",
                Err(DeliveryError::Fenced { .. }) => "fenced",
            };
            metrics::SINK_DURATION
                .with_label_values(&[self.rt.config.name.as_str(), kind])
                .observe(started.elapsed().as_secs_f64());
            let (reason, retry_after, throttled) = match result {
                Ok(()) => {
                    self.rt.breaker.success();
                    // A full batch that had to wait for the sink's rate limit: more is queued
                    // than the limit lets through.
                    let waited = sink.rate_limit_waited().saturating_sub(waited_before);
                    let full = outputs.len() >= self.rt.config.batch_max();
                    self.report(full && waited >= RATE_WAIT_THROTTLED, false);
                    return Outcome::Delivered;
                }
                Err(DeliveryError::Transient { reason, retry_after }) => (reason, retry_after, false),
                Err(DeliveryError::Throttled { reason, retry_after }) => (reason, retry_after, true),
                Err(DeliveryError::Rejected { reason }) => {
                    self.rt.breaker.success();
                    self.report(false, false);
                    if let [one] = outputs {
                        return Outcome::Refused(vec![DeadLetter {
                            sink: self.rt.config.name.clone(),
                            output: one.clone(),
                            reason,
                            failed_at: self.delivery.clock.now(),
                            attempts,
                        }]);
                    }
                    // Find the refused ones: halves, recursively (boxed: async recursion).
                    let (a, b) = outputs.split_at(outputs.len() / 2);
                    let mut letters = Vec::new();
                    for half in [a, b] {
                        match Box::pin(self.deliver(sink, half)).await {
                            Outcome::Stop => return Outcome::Stop,
                            Outcome::Delivered => {}
                            Outcome::Refused(l) => letters.extend(l),
                        }
                    }
                    return if letters.is_empty() { Outcome::Delivered } else { Outcome::Refused(letters) };
                }
                Err(DeliveryError::Fenced { reason }) => {
                    tracing::warn!(sink = %self.rt.config.name, shard = self.shard, epoch = %self.epoch, %reason, "fenced by the sink: a newer leader delivers this shard");
                    // Not again under this epoch: wait for it to end.
                    while self.valid() {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                            _ = self.stop.changed() => {}
                        }
                    }
                    return Outcome::Stop;
                }
            };
            self.report(throttled, !throttled);
            // A throttling sink is alive: it does not open the breaker.
            let opened = !throttled && self.rt.breaker.failure();
            metrics::SINK_RETRIES.with_label_values(&[self.rt.config.name.as_str()]).inc();
            if attempts == 1 || opened || attempts.is_multiple_of(10) {
                tracing::warn!(sink = %self.rt.config.name, shard = self.shard, attempts, breaker_opened = opened, throttled, %reason, "delivery failed, retrying");
            }
            let exp = d.retry_initial.saturating_mul(1u32 << (attempts - 1).min(20)).min(d.retry_max);
            let jitter = 0.5 + rand::random::<f64>();
            let wait = retry_after.unwrap_or_default().max(exp.mul_f64(jitter));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop.changed() => return Outcome::Stop,
            }
        }
    }
}
