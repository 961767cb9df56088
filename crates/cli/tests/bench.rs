//! Every `coalescectl bench` runs end to end on a tiny workload and writes the JSON fields
//! docs/benchmarks.md relies on (`--json FILE`). Functional checks only: no speed is
//! asserted here (benchmarks print numbers; docs/benchmarks.md records them). Each starts its
//! own local cluster of this build's `coalesced` (next to `coalescectl`) on free ports.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs `coalescectl bench ARGS --dir DIR/cluster --json DIR/out.json` and returns the JSON.
fn bench(dir: &Path, args: &[&str]) -> Value {
    let out = dir.join("out.json");
    let status = Command::new(env!("CARGO_BIN_EXE_coalescectl"))
        .arg("bench")
        .args(args)
        .arg("--dir")
        .arg(dir.join("cluster"))
        .arg("--json")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "coalescectl bench {args:?} failed: {status}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1, "{v:#}");
    v
}

fn f(v: &Value, field: &str) -> f64 {
    v[field].as_f64().unwrap_or_else(|| panic!("{field} missing in {v:#}"))
}

#[test]
fn savings_counts_writes_three_ways() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(
        dir.path(),
        &[
            "savings",
            "--seconds",
            "3",
            "--rate",
            "3000",
            "--keys",
            "500",
            "--producers",
            "2",
            "--batch",
            "100",
            "--shards",
            "2",
        ],
    );
    let events = f(&v, "events");
    assert!(events > 1000.0, "{v:#}");
    assert_eq!(f(&v, "per_event_writes"), events);
    // 500 keys at 3,000 events/s in 1 s windows: at most 500 outputs per window per key set.
    let coalesced = f(&v, "coalesce_writes");
    assert!(coalesced > 0.0 && coalesced < events / 2.0, "{v:#}");
    let batch = f(&v, "consumer_batch_writes");
    assert!(batch >= coalesced && batch <= events, "{v:#}");
    let reduction = f(&v, "downstream_write_reduction");
    assert!((reduction - (1.0 - coalesced / events)).abs() < 0.001, "{v:#}");
    // Pre-merge at ingest: 100 events per request over Zipf(1.1) keys repeat some keys.
    let (received, partials) = (f(&v, "premerge_events"), f(&v, "premerge_partials"));
    assert!(received >= events && partials > 0.0 && partials < received, "{v:#}");
}

#[test]
fn adaptive_samples_both_phases_and_plots_them() {
    let dir = tempfile::tempdir().unwrap();
    let plots = dir.path().join("plots");
    let v = bench(
        dir.path(),
        &[
            "adaptive",
            "--seconds",
            "3",
            "--relax-seconds",
            "1",
            "--keys",
            "50",
            "--shards",
            "2",
            "--plots",
            plots.to_str().unwrap(),
        ],
    );
    for phase in ["fixed", "adaptive"] {
        let p = &v[phase];
        assert!(f(p, "events") >= 50.0, "{v:#}");
        assert!(f(p, "outputs_delivered") > 0.0, "{v:#}");
        assert_eq!(v[format!("{phase}_samples")].as_array().unwrap().len(), 4, "{v:#}");
    }
    for svg in ["adaptive-backlog.svg", "adaptive-staleness.svg"] {
        let text = std::fs::read_to_string(plots.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.contains("throttle lifted"), "{svg}");
    }
}

#[test]
fn latency_reports_each_level() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(
        dir.path(),
        &["latency", "--seconds", "1", "--levels", "0.25,0.5", "--producers", "2", "--batch", "50", "--shards", "2"],
    );
    assert!(f(&v, "events_per_sec") > 0.0);
    let levels = v["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for l in levels {
        assert!(f(l, "ack_p50_ms") > 0.0 && f(l, "ack_p99_ms") >= f(l, "ack_p50_ms"), "{l:#}");
        assert!(f(l, "ack_p999_ms") >= f(l, "ack_p99_ms"), "{l:#}");
    }
}

#[test]
fn failover_times_writes_and_emissions() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(dir.path(), &["failover", "--kills", "2", "--rate", "500", "--shards", "2"]);
    assert_eq!(v["failover_ms"].as_array().unwrap().len(), 2, "{v:#}");
    assert!(f(&v, "failover_ms_p99") > 0.0);
    // Every kill is followed by the new leader's emission (windows close every second).
    assert_eq!(v["first_emission_ms"].as_array().unwrap().len(), 2, "{v:#}");
    assert_eq!(f(&v, "background_failed_events"), 0.0, "{v:#}");
}

#[test]
fn state_scale_and_idle_read_proc() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(
        dir.path(),
        &[
            "state-scale",
            "--keys",
            "20000",
            "--reference-keys",
            "1000",
            "--reference-seconds",
            "1",
            "--producers",
            "2",
            "--batch",
            "500",
            "--shards",
            "2",
        ],
    );
    // Every distinct key is buffered (1 h windows), besides the reference phase's.
    assert_eq!(f(&v, "buffered_keys"), 21000.0, "{v:#}");
    assert!(f(&v, "rss_bytes") > 1e6, "{v:#}");
    assert!(f(&v, "events_per_sec") > 0.0 && f(&v, "reference_events_per_sec") > 0.0);

    let dir = tempfile::tempdir().unwrap();
    let v = bench(dir.path(), &["idle", "--settle", "0", "--seconds", "2", "--shards", "4"]);
    assert_eq!(f(&v, "shards"), 4.0);
    let per_node = v["cpu_pct_of_core_per_node"].as_array().unwrap();
    assert_eq!(per_node.len(), 3);
    // Heartbeats cost something: a node that used no CPU at all was not measured.
    assert!(f(&v, "cpu_pct_of_core_total") > 0.0, "{v:#}");
}

#[test]
fn ingest_vs_etcd_runs_both_clusters() {
    if Command::new("etcd").arg("--version").output().is_err() {
        // scripts/setup.sh installs Debian's etcd-server; CI runs it first.
        panic!("etcd not found: run scripts/setup.sh");
    }
    let dir = tempfile::tempdir().unwrap();
    let v = bench(
        dir.path(),
        &["ingest-vs-etcd", "--seconds", "1", "--producers", "2", "--batch", "50", "--keys", "1000", "--shards", "2"],
    );
    for field in
        ["events_per_sec", "unary_events_per_sec", "etcd_puts_per_sec", "etcd_txn_puts_per_sec", "ratio_vs_etcd"]
    {
        assert!(f(&v, field) > 0.0, "{field}: {v:#}");
    }
    assert_eq!(v["phases"].as_array().unwrap().len(), 4);
    for p in v["phases"].as_array().unwrap() {
        assert_eq!(f(p, "failed_events"), 0.0, "{p:#}");
    }
}

#[test]
fn emit_times_every_output_from_its_window_end() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench(dir.path(), &["emit", "--seconds", "1", "--rate", "20", "--shards", "2"]);
    assert_eq!(f(&v, "events"), 20.0, "{v:#}");
    assert_eq!(f(&v, "acked"), 20.0, "{v:#}");
    // One output per event (a fresh key each), every one seen by the subscriber.
    let d = &v["window_end_to_subscriber"];
    assert_eq!(f(d, "count"), 20.0, "{v:#}");
    assert!(f(d, "p99_ms") >= f(d, "p50_ms"), "{v:#}");
}
