//! Metrics of the replicated shards, in the process-wide `prometheus` default registry (the
//! node's `/metrics` serves it). Names follow `coalesce_<subsystem>_<name>_<unit>`; labels are
//! bounded (stream names come from the config, never keys).
//!
//! Stream counters are recorded where an entry is applied, but only on the replica whose
//! leader proposed the entry (the log id names it): every replica applies every entry, and
//! counting on one of them makes the cluster-wide sum over nodes exact. A leader that dies
//! between commit and apply loses that entry's counts; replaying the log after a restart
//! counts only entries that were never applied here, so nothing is counted twice.

use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    // Only fails for a duplicate or malformed name: a bug caught by the first scrape test.
    if let Err(e) = prometheus::default_registry().register(Box::new(c.clone())) {
        tracing::error!(error = %e, "registering a metric");
    }
    c
}

/// A counter family registered in the default registry.
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition"))
}

/// A counter registered in the default registry.
pub fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::with_opts(Opts::new(name, help)).expect("static metric definition"))
}

/// A histogram family registered in the default registry.
pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    register(
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
            .expect("static metric definition"),
    )
}

/// A histogram registered in the default registry.
pub fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("static metric definition"),
    )
}

/// Buckets for request and commit latencies: 0.5 ms … 10 s.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Buckets for ages of data (aggregation latency, staleness): 10 ms … 1 h.
pub const AGE_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

pub(crate) static CHECKPOINT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "coalesce_state_checkpoint_seconds",
        "Time to write a shard's applied-but-pending state machine effects to RocksDB.",
        LATENCY_BUCKETS,
    )
});
pub(crate) static CHECKPOINT_ROWS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "coalesce_state_checkpoint_rows_total",
        "RocksDB rows written or deleted by state machine checkpoints (all shards of the node).",
    )
});
pub(crate) static INPUTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_stream_inputs_total",
        "Events merged into shard buffers (after deduplication), by stream.",
        &["stream"],
    )
});
pub(crate) static SHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_stream_shed_inputs_total",
        "Events dropped by a `shed` overflow policy because the shard buffer was full, by stream.",
        &["stream"],
    )
});
pub(crate) static KEY_FULL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_stream_key_full_inputs_total",
        "Events refused (key_full) by `key_overflow = \"reject\"`: one event of their producer group would \
         have grown its key's value past the window's `max_bytes`, by stream; per attempt.",
        &["stream"],
    )
});
pub(crate) static DUPLICATES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "coalesce_stream_duplicate_batches_total",
        "Producer batches acknowledged as duplicates of ones already applied (not applied again).",
    )
});
pub(crate) static FORWARD_REROUTES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "coalesce_raft_forward_reroutes_total",
        "Requests forwarded to a shard leader that were sent again to its successor once this node saw \
         a new leader, instead of waiting for the silent one (producer seqs make the resend safe).",
    )
});
pub(crate) static APPEND_STREAMS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_raft_append_streams_total",
        "Pipelined replication streams (one per group and follower, reopened after an error), by event: \
         `opened`, `stalled` (ended: no answer within its stall time), `failed` (could not open, or ended \
         by a network error).",
        &["event"],
    )
});
pub(crate) static OUTPUTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_stream_outputs_total",
        "Outputs emitted (windows closed into the outbox), by stream and why the window closed.",
        &["stream", "reason"],
    )
});
pub(crate) static ABSORBED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_stream_absorbed_inputs_total",
        "Events absorbed by emitted outputs, by stream; divided by outputs it is the coalesce ratio.",
        &["stream"],
    )
});
pub(crate) static MERGE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_stream_merge_errors_total",
        "Merges refused (overflow, a size bound, mismatched sketch parameters); the window closed early.",
        &["stream"],
    )
});
pub(crate) static AGGREGATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "coalesce_stream_aggregation_latency_seconds",
        "From a window's first input to its emission (leader clock), by stream.",
        &["stream"],
        AGE_BUCKETS,
    )
});
pub(crate) static PROPOSE: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "coalesce_raft_commit_duration_seconds",
        "From proposing a command on the leader to its being committed by a quorum and applied, by command.",
        &["command"],
        LATENCY_BUCKETS,
    )
});
pub(crate) static SNAPSHOTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_raft_snapshots_total",
        "Shard snapshots by event: built (for log purge), sent (to a lagging replica), received (complete and \
         checked, from a leader), installed.",
        &["event"],
    )
});
pub(crate) static ADAPTIVE_STEPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_adaptive_steps_total",
        "Control steps of the load-adaptive window controllers on shards this node leads, by stream and \
         decision (calm, stretching, buffer_brake, holding, relaxing).",
        &["stream", "reason"],
    )
});
pub(crate) static ADAPTIVE_HIGH: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_adaptive_high_pressure_steps_total",
        "Adaptive control steps taken under high pressure, by stream and what made it high (backlog, \
         sink_lag, sink_throttled, sink_failing).",
        &["stream", "cause"],
    )
});

pub(crate) static APPLY_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "coalesce_raft_apply_failures_total",
        "Log entries that failed to apply (invalid, an error, or a panic): each stops its shard group on \
         this node (see coalesce_raft_groups_stopped and docs/operations.md).",
    )
});
pub(crate) static PEER_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_raft_peer_refused_total",
        "Peer-port calls refused before any work, by reason: `not_a_node` (the client certificate names no \
         single node of this cluster, or is a client certificate), `impersonation` (the call speaks for a \
         node its certificate does not name), `cluster` (a Hello from another cluster), `protocol` (a \
         call from a peer whose last Hello announced a protocol this build cannot replicate with).",
        &["reason"],
    )
});
pub(crate) static TLS_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_tls_reloads_total",
        "Certificate files re-read after a change, by port (`peer`, `client`) and result (`reloaded`, or \
         `failed`: the previous certificates stay in use).",
        &["port", "result"],
    )
});
pub(crate) static TLS_HANDSHAKE_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_tls_handshake_failures_total",
        "Inbound TLS handshakes that failed or timed out, by port (`peer`, `client`).",
        &["port"],
    )
});
pub(crate) static TLS_CERT_EXPIRY: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    register(
        prometheus::IntGaugeVec::new(
            Opts::new(
                "coalesce_tls_cert_expiry_timestamp_seconds",
                "When the certificate a port presents expires (Unix time), by port (`peer`, `client`).",
            ),
            &["port"],
        )
        .expect("static metric definition"),
    )
});
pub(crate) static CONNECTIONS: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    register(
        prometheus::IntGaugeVec::new(
            Opts::new(
                "coalesce_net_connections",
                "Connections open on a port, by port (`client`, `peer`, `http`); on a TLS port, from the end of \
                 their handshake.",
            ),
            &["port"],
        )
        .expect("static metric definition"),
    )
});
pub(crate) static CONNECTION_LIMIT: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    register(
        prometheus::IntGaugeVec::new(
            Opts::new(
                "coalesce_net_connection_limit",
                "The most connections a port holds open at once (`api.max_connections`, \
                 `node.peer_max_connections`, `node.http_max_connections`), by port.",
            ),
            &["port"],
        )
        .expect("static metric definition"),
    )
});
pub(crate) static CONNECTIONS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_net_connections_refused_total",
        "Connections reset as soon as accepted, by port and reason: `max_connections` (the port was full) or \
         `max_connections_per_ip` (the caller's address held its share).",
        &["port", "reason"],
    )
});
pub(crate) static CONNECTIONS_TIMED_OUT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_net_connections_timed_out_total",
        "Connections closed by a timeout, by port and reason: `first_byte` (sent nothing after connecting) or \
         `idle` (no call open for the idle timeout).",
        &["port", "reason"],
    )
});
pub(crate) static CLUSTER_ID_KNOWN: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    register(
        prometheus::IntGauge::with_opts(Opts::new(
            "coalesce_raft_cluster_id_known",
            "1 once this node knows the cluster id (crate identity), else 0: deliveries to push sinks wait for it.",
        ))
        .expect("static metric definition"),
    )
});
pub(crate) static INVALID_COMMANDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "coalesce_raft_invalid_commands_total",
        "Commands refused by validation before they reached the log, by where: `propose` (this node was \
         about to propose it) or `peer` (an entry, forward or snapshot a peer sent).",
        &["where"],
    )
});

/// Creates every family, so each is listed from the first scrape on,
/// with a zero child for every stream in `streams`.
pub fn init(streams: &[&str]) {
    LazyLock::force(&CLUSTER_ID_KNOWN);
    LazyLock::force(&DUPLICATES);
    LazyLock::force(&FORWARD_REROUTES);
    LazyLock::force(&APPLY_FAILURES);
    for place in ["propose", "peer"] {
        INVALID_COMMANDS.with_label_values(&[place]);
    }
    for reason in ["not_a_node", "impersonation", "cluster", "protocol"] {
        PEER_REFUSED.with_label_values(&[reason]);
    }
    for event in ["opened", "stalled", "failed"] {
        APPEND_STREAMS.with_label_values(&[event]);
    }
    for event in ["built", "sent", "received", "installed"] {
        SNAPSHOTS.with_label_values(&[event]);
    }
    crate::snapshot::init_metrics();
    for stream in streams {
        for m in [&INPUTS, &SHED, &KEY_FULL, &ABSORBED, &MERGE_ERRORS] {
            m.with_label_values(&[stream]);
        }
        OUTPUTS.with_label_values(&[stream, coalesce_core::window::SealReason::Time.as_str()]);
        AGGREGATION.with_label_values(&[stream]);
    }
    for command in ["ingest", "seal", "ack"] {
        PROPOSE.with_label_values(&[command]);
    }
}

/// Records the outputs a leader's entry emitted, sealed at leader time `stamp`.
pub(crate) fn record_outputs(outputs: &[coalesce_core::output::Output], stamp: u64) {
    for o in outputs {
        let stream = o.stream.as_str();
        OUTPUTS.with_label_values(&[stream, o.reason.as_str()]).inc();
        ABSORBED.with_label_values(&[stream]).inc_by(o.inputs);
        if o.reason == coalesce_core::window::SealReason::Overflow {
            MERGE_ERRORS.with_label_values(&[stream]).inc();
        }
        let age_ms = stamp.saturating_sub(o.first_input_at);
        AGGREGATION.with_label_values(&[stream]).observe(age_ms as f64 / 1000.0);
    }
}

/// A stream's counters on this node since it started (see the module docs: summed over nodes
/// they are the cluster's numbers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamCounts {
    pub inputs: u64,
    pub shed: u64,
    pub key_full: u64,
    pub outputs: u64,
    pub absorbed: u64,
}

/// This node's counters of `stream`.
pub fn stream_counts(stream: &str) -> StreamCounts {
    use prometheus::core::Collector;
    let get = |m: &IntCounterVec| m.get_metric_with_label_values(&[stream]).map_or(0, |c| c.get());
    // Outputs are counted by (stream, reason): add up the stream's reasons.
    let outputs = OUTPUTS
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.name() == "stream" && l.value() == stream))
        .map(|m| m.get_counter().get_value() as u64)
        .sum();
    StreamCounts { inputs: get(&INPUTS), shed: get(&SHED), key_full: get(&KEY_FULL), outputs, absorbed: get(&ABSORBED) }
}
