//! The chaos tool end to end (`coalescectl chaos run`, called as a library with this build's
//! `coalesced`): the smoke scenario — one leader kill, zombie pause, leader partition,
//! whole-cluster kill and slow disk under load, with a fencing PostgreSQL sink — passes every
//! invariant and writes a complete report; with
//! sealing made non-idempotent (the test-only `double_seal` failpoint) the same scenario
//! fails with double counting, proving the checker can fail. On the compose backend (every node
//! a Docker container of an image packed from this build's binaries) the same smoke game day
//! passes with the faults done by Docker; that test needs Docker and fails without it. The full
//! CI game day (`chaos/scenarios/ci.toml`) runs from `.ci/run`. The seed is printed for replay.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

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
        backend: None,
        image: "coalesce:local".into(),
        failpoint: failpoint.iter().map(|s| s.to_string()).collect(),
        postgres,
    }
}

/// The smoke scenario's report: enough load, nothing lost or doubled, the fencing PostgreSQL
/// sink took every output and its rows were checked, one fault of each kind.
fn assert_smoke_clean(r: &serde_json::Value) {
    assert!(r["acked_events"].as_u64().unwrap() > 500);
    assert_eq!(r["lost_events"], 0);
    assert_eq!(r["double_counted_events"], 0);
    assert!(r["metrics"]["fenced_rows"].as_u64().unwrap() > 0, "{:#}", r["metrics"]);
    assert_eq!(r["stale_epoch_accepted"], 0);
    for kind in ["kill_leader", "pause_leader", "partition_leader", "kill_all", "slow_disk"] {
        assert_eq!(r["faults"][kind], 1, "{kind}: {}", r["faults"]);
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
    assert_smoke_clean(&r);
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

/// An image of this build's `coalesced` and `coalescectl`, packed by deploy/docker/build-local.sh
/// under a tag of this test process's own; removed on drop.
struct Image(String);

impl Image {
    fn build() -> Image {
        let docker = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output();
        match docker {
            Ok(out) if out.status.success() => {}
            other => panic!(
                "this test runs the chaos compose backend and needs a reachable Docker engine with \
                 `docker compose` or `docker-compose`; `docker info` failed: {other:?}"
            ),
        }
        let bin = Path::new(env!("CARGO_BIN_EXE_coalesced")).parent().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/docker/build-local.sh");
        let tag = format!("coalesce-test:chaos-{}", std::process::id());
        let out = Command::new("bash").arg(&script).arg(bin).args(["--tag", &tag]).output().unwrap();
        assert!(
            out.status.success(),
            "{} {} --tag {tag} failed (it needs coalescectl next to coalesced: build with --workspace):\n{}{}",
            script.display(),
            bin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Image(tag)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["image", "rm", "--force", &self.0]).output();
    }
}

/// The smoke game day with every node a container of this build's image: kills, the zombie
/// pause and the whole-cluster kill done by Docker, the partition by the host-network links.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_smoke_game_day_passes_on_the_compose_backend() {
    let image = Image::build();
    let dir = tempfile::tempdir().unwrap();
    let mut run = args(dir.path(), &[], true);
    run.backend = Some("compose".into());
    run.image = image.0.clone();
    let result = coalesce_cli::chaos::run(ChaosCmd::Run(run)).await;
    let r = report(dir.path());
    assert!(result.is_ok(), "{result:?}: {r:#}");
    assert_eq!(r["verdict"], "pass");
    assert_eq!(r["backend"], "compose");
    assert!(r["command"].as_str().unwrap().contains("--backend compose"), "{}", r["command"]);
    assert_smoke_clean(&r);

    // The nodes were containers of the image, each log spans its restarts (kill_all restarted
    // every container), and no container is left.
    let cluster = dir.path().join("cluster");
    let compose = std::fs::read_to_string(cluster.join("compose.yaml")).unwrap();
    assert!(compose.contains(&format!("image: \"{}\"", image.0)), "{compose}");
    let containers: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("container_name: "))
        .map(|n| n.trim_matches('"'))
        .collect();
    assert_eq!(containers.len(), 3, "{compose}");
    for (i, name) in containers.iter().enumerate() {
        let log = std::fs::read_to_string(cluster.join(format!("node-{i}.log"))).unwrap();
        assert!(log.matches("listening").count() >= 2, "node-{i}.log holds every start of {name}: {log}");
        let left =
            Command::new("docker").args(["ps", "--all", "--quiet", "--filter"]).arg(format!("name=^{name}$")).output();
        let left = String::from_utf8(left.unwrap().stdout).unwrap();
        assert!(left.trim().is_empty(), "container {name} was not removed");
    }
}
