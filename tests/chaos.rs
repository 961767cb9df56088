//! The chaos tool end to end (`coalescectl chaos run`, called as a library with this build's
//! `coalesced`): the smoke scenario — one leader kill, zombie pause, leader partition,
//! whole-cluster kill and slow disk under load, with a fencing PostgreSQL sink — passes every
//! invariant and writes a complete report; with
//! sealing made non-idempotent (the test-only `double_seal` failpoint) the same scenario
//! fails with double counting, proving the checker can fail. The full CI game day
//! (`chaos/scenarios/ci.toml`) runs from `.ci/run`. The seed is printed for replay.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use coalesce_cli::chaos::{ChaosCmd, RunArgs};

fn scenario() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../chaos/scenarios/smoke.toml")
}

fn args(report: &Path, failpoint: &[&str], postgres: bool) -> RunArgs {
    let seed = std::env::var("COALESCE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed = {seed} (replay with COALESCE_TEST_SEED={seed})");
    RunArgs {
        scenario: scenario(),
        report_dir: report.to_owned(),
        seed: Some(seed),
        dir: None,
        coalesced: Some(PathBuf::from(env!("CARGO_BIN_EXE_coalesced"))),
        failpoint: failpoint.iter().map(|s| s.to_string()).collect(),
        postgres,
    }
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_smoke_game_day_passes_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let result = coalesce_cli::chaos::run(ChaosCmd::Run(args(dir.path(), &[], true))).await;
    let r = report(dir.path());
    assert!(result.is_ok(), "{result:?}: {r:#}");
    assert_eq!(r["verdict"], "pass");
    for field in [
        "acked_events",
        "ambiguous_events",
        "lost_events",
        "double_counted_events",
        "seq_gaps",
        "stale_epoch_accepted",
        "faults",
        "failover_ms",
        "ingest_error_rate",
        "seed",
    ] {
        assert!(!r[field].is_null(), "report.json has {field}: {r:#}");
    }
    assert!(r["acked_events"].as_u64().unwrap() > 500);
    assert_eq!(r["lost_events"], 0);
    assert_eq!(r["double_counted_events"], 0);
    // The fencing PostgreSQL sink took every output, and its rows were checked.
    assert!(r["metrics"]["fenced_rows"].as_u64().unwrap() > 0, "{:#}", r["metrics"]);
    assert_eq!(r["stale_epoch_accepted"], 0);
    for kind in ["kill_leader", "pause_leader", "partition_leader", "kill_all", "slow_disk"] {
        assert_eq!(r["faults"][kind], 1, "{kind}: {}", r["faults"]);
    }
    for plot in ["throughput.svg", "latency.svg", "failover.svg", "report.md"] {
        assert!(dir.path().join(plot).exists(), "{plot}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_idempotent_sealing_is_caught_as_double_counting() {
    let dir = tempfile::tempdir().unwrap();
    let result = coalesce_cli::chaos::run(ChaosCmd::Run(args(dir.path(), &["double_seal"], false))).await;
    let r = report(dir.path());
    assert!(result.is_err(), "the run must fail: {r:#}");
    assert_eq!(r["verdict"], "fail");
    assert!(r["double_counted_events"].as_u64().unwrap() > 0, "{r:#}");
}
