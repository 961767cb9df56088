//! Upgrades keep data: this build starts on data directories an earlier build wrote (committed
//! under `tests/fixtures/upgrade/`) and every buffered key and pending output comes out.
//!
//! Each fixture is the three data directories of a 3-node, 2-shard cluster, killed (SIGKILL)
//! right after its last acknowledged request, so some state exists only as Raft log entries
//! not yet checkpointed: outputs of the `fast` stream already sealed and waiting in the outbox
//! for the durable consumer `audit`, and keys of the `slow` stream still buffered in open
//! windows. `expected.json` beside it holds the acknowledged sums. Write a new fixture for
//! every storage format or peer protocol change, before changing the code:
//!
//!     scripts/make-upgrade-fixture.sh     # runs `write_fixture` below, then commits nothing
//!
//! and keep the old ones: each is a format this build must still read.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coalesce_client::{Client, event};
use harness::Cluster;

/// The streams every fixture was written with. `slow` windows were open when the cluster was
/// killed; by the time a test reads a fixture they have long closed and seal at start.
const STREAMS: &str = "[sinks.audit]\nkind = \"grpc\"\n\n\
                       [streams.fast]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"200ms\" }\nsinks = [\"audit\"]\n\n\
                       [streams.slow]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"10s\" }\nsinks = [\"audit\"]\n";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/upgrade")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

async fn send(client: &Client, stream: &str, keys: usize, round: i64) -> BTreeMap<String, i64> {
    let mut producer = client.producer();
    let events = (0..keys).map(|k| event(stream, &format!("{stream}-{k}"), round * 1000 + k as i64)).collect();
    let report = producer.send(events).await.unwrap();
    assert!(report.all_acked(), "{:?}", report.failures().collect::<Vec<_>>());
    (0..keys).map(|k| (format!("{stream}-{k}"), round * 1000 + k as i64)).collect()
}

/// Writes a fixture of this build's formats (`COALESCE_FIXTURE_OUT=<dir>`; see the module docs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "writes a fixture: scripts/make-upgrade-fixture.sh"]
async fn write_fixture() {
    let out = PathBuf::from(std::env::var("COALESCE_FIXTURE_OUT").expect("COALESCE_FIXTURE_OUT"));
    let mut cluster = Cluster::start(3, 2, STREAMS);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect_lazy(addrs).unwrap();
    client.wait_ready(Duration::from_secs(30)).await.unwrap();
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for round in 1..=3 {
        for (k, v) in send(&client, "fast", 40, round).await {
            *expected.entry(k).or_default() += v;
        }
    }
    // Sealed: every fast window closed and its output is in the outbox.
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Slow windows must stay open until the kill: start right after a 10 s boundary.
    while now_ms() % 10_000 > 1_000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for round in 1..=2 {
        for (k, v) in send(&client, "slow", 30, round).await {
            *expected.entry(k).or_default() += v;
        }
    }
    for i in 0..3 {
        cluster.kill(i);
    }
    let window_left = 10_000 - now_ms() % 10_000;
    assert!(window_left > 2_000, "killed with only {window_left} ms of the slow window left: run again");
    std::fs::create_dir_all(&out).unwrap();
    let tar = std::process::Command::new("tar")
        .arg("czf")
        .arg(out.join("data.tar.gz"))
        .arg("-C")
        .arg(cluster.path())
        .args(["data-0", "data-1", "data-2"])
        .status()
        .unwrap();
    assert!(tar.success());
    std::fs::write(out.join("expected.json"), serde_json::to_string_pretty(&expected).unwrap()).unwrap();
}

/// Every fixture: unpacked as the data directories of a fresh cluster of this build.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_written_by_earlier_builds_comes_back_whole() {
    let mut found = 0;
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("data.tar.gz").is_file() {
            continue;
        }
        found += 1;
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let expected: BTreeMap<String, i64> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let tar = std::process::Command::new("tar")
            .arg("xzf")
            .arg(dir.join("data.tar.gz"))
            .arg("-C")
            .arg(tmp.path())
            .status()
            .unwrap();
        assert!(tar.success(), "{name}: unpacking");
        let cluster = Cluster::start_in(tmp, 3, 2, STREAMS, "");
        cluster.wait_ready(Duration::from_secs(60)).await;
        let emitted = cluster.collect_outputs().await;
        if emitted != expected {
            cluster.dump_logs();
        }
        assert_eq!(emitted, expected, "{name}: every acknowledged event, once, in outputs");
        println!("{name}: {} keys, every sum exact", expected.len());
    }
    assert!(found > 0, "no fixture under {}", fixtures().display());
}
