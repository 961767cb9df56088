//! The node's Prometheus metrics (the `prometheus` crate), served on the HTTP port's
//! `/metrics` (see `crate::http`). docs/operations.md lists every metric, what it means and the
//! alerts built on it.
//!
//! - Counters and histograms of events as they happen live in statics in the process-wide
//!   default registry: the API's here, the shards' in `coalesce_raft::metrics`.
//! - Gauges of state (buffer occupancy, outbox and sink backlogs, Raft term and lag, RocksDB
//!   sizes, breaker state) are read when scraped, by [`NodeCollector`], so they cost nothing
//!   between scrapes and are never stale.
//!
//! Labels are bounded: stream, sink, shard (at most the configured shard count), code and
//! method; never a key.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use coalesce_raft::RaftNode;
use coalesce_raft::metrics::{AGE_BUCKETS, LATENCY_BUCKETS, counter, counter_vec, histogram_vec};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts};

use crate::delivery::Delivery;

pub(crate) static API_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "coalesce_api_request_duration_seconds",
        "Client API calls by method and gRPC status code (ingest calls: until every event's status is known).",
        &["method", "code"],
        LATENCY_BUCKETS,
    )
});
pub(crate) static API_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_api_events_total",
        "Events received on this node's client port, by their per-event status (ok, duplicate, shed, \
         resource_exhausted, ...) and reason.",
        &["code", "reason"],
    )
});
pub(crate) static SINK_DELIVERED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_sink_outputs_delivered_total",
        "Outputs a sink accepted (delivered durably downstream), by sink.",
        &["sink"],
    )
});
pub(crate) static SINK_RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec("coalesce_sink_retries_total", "Delivery attempts that failed transiently and were retried.", &["sink"])
});
pub(crate) static RECEIVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_ingest_received_events_total",
        "Events this node accepted at ingest (before pre-merging them per key), by stream.",
        &["stream"],
    )
});
pub(crate) static PREMERGED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_ingest_premerged_partials_total",
        "Per-key partials this node's received events were pre-merged into before going to the shard \
         leaders; received / premerged = how much pre-merge shrinks forwarding and Raft entries.",
        &["stream"],
    )
});
pub(crate) static RATE_LIMITED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_stream_rate_limited_inputs_total",
        "Events over their key's `key_rate_limit` on this node, by stream and action (reject, shed).",
        &["stream", "action"],
    )
});
pub(crate) static ACKS_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "coalesce_api_acks_refused_total",
        "Acks refused because they named a consumer that is not declared (a `grpc` sink) and has no cursor, \
         from a caller without an admin token: acks never create cursors for arbitrary names.",
    )
});
pub(crate) static CURSORS_EXPIRED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "coalesce_outbox_cursors_expired_total",
        "Cursors of no configured sink dropped by this node as leader after not moving for `[outbox] cursor_ttl`.",
    )
});
pub(crate) static UNCLAIMED_TRIMMED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "coalesce_outbox_unclaimed_trimmed_outputs_total",
        "Outputs of shards without any cursor that this node as leader trimmed past `[outbox] max_outputs` or \
         `unclaimed_max_age`.",
    )
});
pub(crate) static SINK_DEAD_LETTERED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_sink_dead_lettered_total",
        "Outputs a sink refused for good, moved to its dead-letter queue.",
        &["sink"],
    )
});
pub(crate) static SINK_WRITES_SAVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_sink_writes_saved_total",
        "Downstream writes saved: events absorbed by delivered outputs minus the outputs (what per-event \
         delivery would have written in addition).",
        &["sink"],
    )
});
pub(crate) static SINK_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "coalesce_sink_request_duration_seconds",
        "One delivery attempt (a batch) to a sink, by sink and result (ok, transient, rejected, fenced); \
         includes waiting for the sink's rate limit.",
        &["sink", "result"],
        LATENCY_BUCKETS,
    )
});
pub(crate) static SINK_STALENESS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "coalesce_sink_staleness_seconds",
        "Age of the oldest event in an output when the sink accepted it (first input to delivery), by sink.",
        &["sink"],
        AGE_BUCKETS,
    )
});
pub(crate) static LEADER_CHANGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_raft_leader_changes_total",
        "Shard leaderships this node acquired or lost (observed every 100 ms).",
        &["event"],
    )
});
pub(crate) static LEASE_WRITE_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_k8s_lease_write_failures_total",
        "Failed writes of shard Leases to the Kubernetes API (Raft stays the authority: ingest and delivery \
         go on), by reason.",
        &["reason"],
    )
});

pub(crate) static FETCH_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_fetch_requests_total",
        "Fetch calls answered on the key's shard leader, by stream and origin: called (started the upstream \
         call), joined (shared another caller's call), cached (within the TTL), refused (too many keys), \
         deposed (the node lost the shard's lease before answering; the caller was retried on the leader).",
        &["stream", "origin"],
    )
});
pub(crate) static FETCH_UPSTREAM_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "coalesce_fetch_upstream_duration_seconds",
        "Upstream calls made for Fetch (its _count is the number of calls), by stream and result (2xx, 4xx, \
         5xx, error: no answer); excludes rate-limit waits.",
        &["stream", "result"],
        LATENCY_BUCKETS,
    )
});
pub(crate) static FETCH_SETTLE_WAITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_fetch_settle_waits_total",
        "Fetch flights that waited the stream's settle delay before calling, by stream.",
        &["stream"],
    )
});
pub(crate) static FETCH_RATE_LIMIT_WAIT: LazyLock<prometheus::CounterVec> = LazyLock::new(|| {
    prometheus::register_counter_vec!(
        "coalesce_fetch_rate_limit_wait_seconds_total",
        "Time Fetch upstream calls waited for the shared rate limit (rate_limit_sink), by stream.",
        &["stream"]
    )
    .expect("static metric definition")
});

/// Why a Lease write failed (`coalesce_k8s_lease_write_failures_total{reason}`).
pub const LEASE_FAILURE_REASONS: &[&str] = &["conflict", "rejected", "unreachable"];

/// Creates every family and the children of every configured stream and sink, so each series
/// is listed (at zero) from the first scrape on: a family with labels appears only once it has
/// a child, and `rate()` over a series that appears late misses its first increments.
pub fn init(streams: &[&str], sinks: &[&str], fetch_streams: &[&str]) {
    LazyLock::force(&API_DURATION);
    LazyLock::force(&API_EVENTS);
    LazyLock::force(&SINK_DELIVERED);
    LazyLock::force(&SINK_RETRIES);
    LazyLock::force(&SINK_DEAD_LETTERED);
    LazyLock::force(&SINK_WRITES_SAVED);
    LazyLock::force(&SINK_DURATION);
    LazyLock::force(&SINK_STALENESS);
    LazyLock::force(&LEADER_CHANGES);
    LazyLock::force(&LEASE_WRITE_FAILURES);
    LazyLock::force(&ACKS_REFUSED);
    LazyLock::force(&CURSORS_EXPIRED);
    LazyLock::force(&UNCLAIMED_TRIMMED);
    for event in ["acquired", "lost"] {
        LEADER_CHANGES.with_label_values(&[event]);
    }
    for reason in LEASE_FAILURE_REASONS {
        LEASE_WRITE_FAILURES.with_label_values(&[reason]);
    }
    for sink in sinks {
        for m in [&SINK_DELIVERED, &SINK_RETRIES, &SINK_DEAD_LETTERED, &SINK_WRITES_SAVED] {
            m.with_label_values(&[sink]);
        }
        SINK_STALENESS.with_label_values(&[sink]);
        SINK_DURATION.with_label_values(&[sink, "ok"]);
    }
    for method in ["Ingest", "IngestStream"] {
        API_DURATION.with_label_values(&[method, "OK"]);
    }
    API_EVENTS.with_label_values(&["ok", ""]);
    for stream in fetch_streams {
        for origin in ["called", "joined", "cached"] {
            FETCH_REQUESTS.with_label_values(&[stream, origin]);
        }
        FETCH_UPSTREAM_DURATION.with_label_values(&[stream, "2xx"]);
        FETCH_SETTLE_WAITS.with_label_values(&[stream]);
        FETCH_RATE_LIMIT_WAIT.with_label_values(&[stream]);
    }
    coalesce_raft::metrics::init(streams);
}

/// A counter's value for `labels` (a child that did not exist yet is created, at 0).
pub(crate) fn counter_of(family: &IntCounterVec, labels: &[&str]) -> u64 {
    family.get_metric_with_label_values(labels).map_or(0, |c| c.get())
}

/// Times a client API call: records its duration under its method and status code.
pub(crate) async fn timed<T>(
    method: &'static str,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let started = std::time::Instant::now();
    let result = call.await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    API_DURATION.with_label_values(&[method, code_name(code)]).observe(started.elapsed().as_secs_f64());
    result
}

/// gRPC status codes as metric labels (the canonical upper-case names).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Gauges read from the node's state when scraped.
#[derive(Debug)]
pub struct NodeCollector {
    node: Arc<RaftNode>,
    delivery: Arc<Delivery>,
    descs: Vec<Desc>,
}

/// The scrape-time families, freshly built for each scrape.
struct Families {
    cluster_shards: IntGaugeVec,
    led: IntGaugeVec,
    is_leader: IntGaugeVec,
    term: IntGaugeVec,
    apply_lag: IntGaugeVec,
    replication_lag: IntGaugeVec,
    buffer_keys: IntGaugeVec,
    buffer_bytes: IntGaugeVec,
    buffer_occupancy: GaugeVec,
    buffer_limit: IntGaugeVec,
    outbox: IntGaugeVec,
    sink_backlog: IntGaugeVec,
    dlq: IntGaugeVec,
    breaker: IntGaugeVec,
    rate_wait: prometheus::CounterVec,
    cf_bytes: IntGaugeVec,
    build: IntGaugeVec,
    hot_key_rate: GaugeVec,
    adaptive_extra: GaugeVec,
    quiesced: IntGaugeVec,
    stopped: IntGaugeVec,
}

/// Ranks of hot keys exported per stream (`rank` = 1..=HOT_KEY_RANKS): a bounded label set.
pub const HOT_KEY_RANKS: usize = 10;

fn int_gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("static metric definition")
}

impl Families {
    fn new() -> Self {
        Self {
            cluster_shards: int_gauge("coalesce_cluster_shards", "Shards in the cluster (configured).", &["cluster"]),
            led: int_gauge("coalesce_raft_shards_led", "Shards this node leads.", &[]),
            is_leader: int_gauge(
                "coalesce_raft_is_leader",
                "1 for each local shard replica that is its shard's leader, else 0.",
                &["shard"],
            ),
            term: int_gauge("coalesce_raft_term", "Current Raft term of each local shard replica.", &["shard"]),
            apply_lag: int_gauge(
                "coalesce_raft_apply_lag_entries",
                "Committed log entries not yet applied, per local shard replica.",
                &["shard"],
            ),
            replication_lag: int_gauge(
                "coalesce_raft_replication_lag_entries",
                "On a leader: log entries its slowest follower still lacks, per shard.",
                &["shard"],
            ),
            buffer_keys: int_gauge(
                "coalesce_buffer_keys",
                "Keys with an open window, per shard this node leads.",
                &["shard"],
            ),
            buffer_bytes: int_gauge(
                "coalesce_buffer_bytes",
                "Accounted bytes of open windows, per shard this node leads.",
                &["shard"],
            ),
            buffer_occupancy: gauge(
                "coalesce_buffer_occupancy_ratio",
                "Fullness of each led shard's buffer: the larger of keys/max_keys and bytes/max_bytes (1 = full).",
                &["shard"],
            ),
            buffer_limit: int_gauge(
                "coalesce_buffer_limit",
                "Per-shard buffer limits ([limits] in the streams file), by resource (keys, bytes).",
                &["resource"],
            ),
            outbox: int_gauge(
                "coalesce_outbox_outputs",
                "Outputs kept in the outbox (emitted, not yet acknowledged by every consumer), per led shard.",
                &["shard"],
            ),
            sink_backlog: int_gauge(
                "coalesce_sink_backlog_outputs",
                "Outputs emitted but not yet acknowledged by a sink or subscriber, summed over led shards.",
                &["sink"],
            ),
            dlq: int_gauge(
                "coalesce_sink_dead_letters",
                "Outputs in a sink's dead-letter queue, summed over led shards.",
                &["sink"],
            ),
            breaker: int_gauge(
                "coalesce_sink_breaker_open",
                "1 while a sink's circuit breaker is open (deliveries paused).",
                &["sink"],
            ),
            rate_wait: prometheus::CounterVec::new(
                Opts::new(
                    "coalesce_sink_rate_limit_wait_seconds_total",
                    "Time deliveries waited for a sink's rate limit since start.",
                ),
                &["sink"],
            )
            .expect("static metric definition"),
            cf_bytes: int_gauge(
                "coalesce_storage_column_family_bytes",
                "Approximate RocksDB size of each column family (SST files and memtables).",
                &["cf"],
            ),
            build: int_gauge("coalesce_build_info", "Always 1; labels name the build.", &["version"]),
            hot_key_rate: gauge(
                "coalesce_hot_key_inputs_per_second",
                "Estimated input rate of the stream's rank-th heaviest key over the shards this node leads \
                 (decaying Space-Saving sketch; the key itself is in the HotKeys admin call, never a label).",
                &["stream", "rank"],
            ),
            quiesced: int_gauge(
                "coalesce_raft_quiesced_groups",
                "Local shard replicas that are idle with their Raft timers stopped (no heartbeats until the next write).",
                &[],
            ),
            stopped: int_gauge(
                "coalesce_raft_groups_stopped",
                "Local shard replicas stopped because a log entry failed to apply (see \
                 coalesce_raft_apply_failures_total and docs/operations.md, \"A shard group stopped\").",
                &[],
            ),
            adaptive_extra: gauge(
                "coalesce_adaptive_extra_seconds",
                "Load-adaptive window stretch in force for an adaptive stream: the largest over the shards this \
                 node leads (0 = windows at their configured length).",
                &["stream"],
            ),
        }
    }

    fn collectors(&self) -> [&dyn Collector; 21] {
        [
            &self.cluster_shards,
            &self.led,
            &self.is_leader,
            &self.term,
            &self.apply_lag,
            &self.replication_lag,
            &self.buffer_keys,
            &self.buffer_bytes,
            &self.buffer_occupancy,
            &self.buffer_limit,
            &self.outbox,
            &self.sink_backlog,
            &self.dlq,
            &self.breaker,
            &self.rate_wait,
            &self.cf_bytes,
            &self.build,
            &self.hot_key_rate,
            &self.adaptive_extra,
            &self.quiesced,
            &self.stopped,
        ]
    }
}

impl NodeCollector {
    pub fn new(node: Arc<RaftNode>, delivery: Arc<Delivery>) -> Self {
        let descs = Families::new().collectors().iter().flat_map(|c| c.desc()).cloned().collect();
        Self { node, delivery, descs }
    }

    fn fill(&self, f: &Families) {
        let spec = self.node.spec();
        f.cluster_shards.with_label_values(&[spec.cluster.as_str()]).set(i64::from(spec.shards));
        f.build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let limits = self.node.streams().limits();
        f.buffer_limit.with_label_values(&["keys"]).set(limits.max_keys as i64);
        f.buffer_limit.with_label_values(&["bytes"]).set(limits.max_bytes as i64);
        let sinks = self.delivery.sinks();
        let mut led = 0;
        let mut backlog: std::collections::BTreeMap<String, i64> = Default::default();
        let mut dlq: std::collections::BTreeMap<String, i64> = Default::default();
        for (config, stats) in &sinks {
            f.breaker.with_label_values(&[config.name.as_str()]).set(i64::from(stats.breaker_open));
            f.rate_wait.with_label_values(&[config.name.as_str()]).inc_by(stats.rate_limit_waited.as_secs_f64());
            backlog.insert(config.name.clone(), 0);
            dlq.insert(config.name.clone(), 0);
        }
        for g in self.node.groups() {
            let shard = g.shard.to_string();
            let shard = shard.as_str();
            let Some(d) = self.node.shard_detail(g.shard) else { continue };
            let leading = d.role == "leader";
            f.is_leader.with_label_values(&[shard]).set(i64::from(leading));
            f.term.with_label_values(&[shard]).set(d.term as i64);
            f.apply_lag.with_label_values(&[shard]).set(d.committed.saturating_sub(d.last_applied) as i64);
            if !leading {
                continue;
            }
            led += 1;
            let slowest = d.replicas.iter().map(|r| r.matched).min().unwrap_or(d.last_log_index);
            f.replication_lag.with_label_values(&[shard]).set(d.last_log_index.saturating_sub(slowest) as i64);
            if let Ok(stats) = g.reader().stats() {
                f.buffer_keys.with_label_values(&[shard]).set(stats.keys as i64);
                f.buffer_bytes.with_label_values(&[shard]).set(stats.bytes as i64);
                let ratio = |used: u64, max: u64| if max == 0 { 0.0 } else { used as f64 / max as f64 };
                let occupancy = ratio(stats.keys, limits.max_keys).max(ratio(stats.bytes, limits.max_bytes));
                f.buffer_occupancy.with_label_values(&[shard]).set(occupancy);
            }
            if let Ok(outbox) = g.reader().outbox() {
                let last = outbox.next_seq.saturating_sub(1);
                f.outbox.with_label_values(&[shard]).set(outbox.next_seq.saturating_sub(outbox.low) as i64);
                for (name, total) in backlog.iter_mut() {
                    // A sink whose cursor is not registered yet has everything ahead of it.
                    let acked = outbox.cursors.get(name).copied().unwrap_or(outbox.low.saturating_sub(1));
                    *total += last.saturating_sub(acked) as i64;
                }
                for (name, acked) in &outbox.cursors {
                    if !backlog.contains_key(name) {
                        // A subscriber (not a configured sink).
                        backlog.insert(name.clone(), last.saturating_sub(*acked) as i64);
                    }
                }
            }
            if let Ok(counts) = g.reader().dead_letter_counts() {
                for (sink, n) in counts {
                    *dlq.entry(sink).or_default() += n as i64;
                }
            }
        }
        f.led.with_label_values::<&str>(&[]).set(led);
        f.quiesced.with_label_values::<&str>(&[]).set(self.node.quiesced_groups() as i64);
        f.stopped.with_label_values::<&str>(&[]).set(self.node.stopped_groups().len() as i64);
        for (sink, n) in backlog {
            f.sink_backlog.with_label_values(&[sink.as_str()]).set(n);
        }
        for (sink, n) in dlq {
            f.dlq.with_label_values(&[sink.as_str()]).set(n);
        }
        for (cf, bytes) in self.node.column_family_sizes() {
            f.cf_bytes.with_label_values(&[cf]).set(bytes as i64);
        }
        for d in self.node.streams().iter().filter(|d| d.rules.window.adaptive.is_some()) {
            f.adaptive_extra.with_label_values(&[d.name.as_str()]).set(0.0);
        }
        let mut extra: std::collections::BTreeMap<String, u64> = Default::default();
        for (_, stream, decision) in self.node.adaptive_decisions() {
            let e = extra.entry(stream).or_default();
            *e = (*e).max(decision.extra_ms);
        }
        for (stream, ms) in extra {
            f.adaptive_extra.with_label_values(&[stream.as_str()]).set(ms as f64 / 1000.0);
        }
        // Per stream, the heaviest keys of all led shards, ranked by rate.
        let mut rates: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for (_, _, keys) in self.node.hot_keys(None, None, coalesce_core::hotkeys::DEFAULT_CAPACITY) {
            for k in keys {
                if let Some(rate) = k.rate_per_sec {
                    rates.entry(k.stream).or_default().push(rate);
                }
            }
        }
        for (stream, mut r) in rates {
            r.sort_by(|a, b| b.total_cmp(a));
            for (i, rate) in r.into_iter().take(HOT_KEY_RANKS).enumerate() {
                let rank = (i + 1).to_string();
                f.hot_key_rate.with_label_values(&[stream.as_str(), rank.as_str()]).set(rate);
            }
        }
    }
}

impl Collector for NodeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let f = Families::new();
        self.fill(&f);
        f.collectors().iter().flat_map(|c| c.collect()).collect()
    }
}

/// The text exposition of the default registry plus `extra`.
pub fn render(extra: &prometheus::Registry) -> String {
    let mut families = prometheus::gather();
    families.extend(extra.gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    prometheus::TextEncoder::new().encode_to_string(&families).unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
}

/// How often the watchdog behind `/livez` ticks, and how late it may be before the node counts
/// as wedged.
pub const WATCHDOG_TICK: Duration = Duration::from_secs(1);
pub const WATCHDOG_LIMIT: Duration = Duration::from_secs(10);
