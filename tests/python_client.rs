//! A Python client generated with grpcio-tools from `proto/` talks to a 3-node cluster of real
//! processes (`tests/python/client_check.py`): ingest with an idempotent producer, a retried
//! request deduplicated, an error naming the event, and Subscribe totals matching. The Python
//! comes from `COALESCE_PYTHON` (the venv `scripts/setup.sh` creates).

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::path::Path;
use std::time::Duration;

use harness::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_python_client_ingests_and_subscribes() {
    let python = std::env::var("COALESCE_PYTHON").unwrap_or_else(|_| "python3".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cluster = Cluster::start(3, 4, "[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"200ms\" }\n");
    cluster.wait_ready(Duration::from_secs(60)).await;
    let seed: u64 = rand::random::<u32>().into();
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(root.join("tests/python/client_check.py"))
        .arg("--proto-dir")
        .arg(root.join("proto"))
        .arg("--seed")
        .arg(seed.to_string());
    for n in &cluster.local.nodes {
        cmd.arg("--addr").arg(&n.client_addr);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the Python client finishes within 2 minutes")
        .unwrap_or_else(|e| panic!("running {python} (set COALESCE_PYTHON, see scripts/setup.sh): {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        cluster.dump_logs();
    }
    assert!(out.status.success(), "python client (seed {seed}) failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("totals match"), "{stdout}");
}
