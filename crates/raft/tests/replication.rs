//! Three nodes over real gRPC sockets on loopback (in one process): shard groups bootstrap,
//! elect leaders, replicate ingest, survive the loss of a leader node, and seal windows into
//! gap-free outboxes whose totals equal the acknowledged inputs.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use coalesce_core::batch::{BatchBuilder, Event};
use coalesce_core::merge::Aggregate;
use coalesce_core::stream::StreamsFile;
use coalesce_core::value::Value;
use coalesce_raft::{ClusterSpec, Command, GroupOutcome, IngestGroup, NodeSpec, ProposeError, RaftNode, Response};
use coalesce_storage::{NodeDb, StorageOptions};
use tokio::sync::oneshot;

const SHARDS: u32 = 4;

struct Running {
    node: Arc<RaftNode>,
    stop_server: Option<oneshot::Sender<()>>,
    stop_sealer: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

async fn start(spec: &ClusterSpec, name: &str, listener: tokio::net::TcpListener) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let db = NodeDb::open(dir.path(), &StorageOptions::default()).unwrap();
    let (node, tx, _server) = common::serve(db, spec, name, listener).await;
    let (stx, srx) = oneshot::channel::<()>();
    tokio::spawn(node.clone().run_sealer(Duration::from_millis(20), async {
        let _ = srx.await;
    }));
    Running { node, stop_server: Some(tx), stop_sealer: Some(stx), _dir: dir }
}

/// The live node that leads `shard`, waiting up to `within`.
async fn leader_of(nodes: &[Running], shard: u32, within: Duration) -> Arc<RaftNode> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        for r in nodes.iter().filter(|r| r.stop_server.is_some()) {
            if r.node.group(shard).is_some_and(|g| g.raft.is_leader()) {
                return r.node.clone();
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader for shard {shard} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends one request's worth of events; retries each shard's part on the current leader with
/// the same producer range until it is acknowledged. Returns the acked sums per key.
async fn send(
    nodes: &[Running],
    table: &coalesce_core::stream::StreamTable,
    producer: u64,
    seq: &mut u64,
    keys: &[(String, i64)],
) -> BTreeMap<String, i64> {
    let rules: BTreeMap<_, _> = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
    let mut b = BatchBuilder::new(table, SHARDS, now());
    for (k, v) in keys {
        *seq += 1;
        b.add(&Event {
            stream: "sums".into(),
            key: k.clone(),
            value: Value::Int(*v),
            event_time: None,
            producer: Some((producer, *seq)),
        })
        .unwrap();
    }
    for (shard, batch) in b.finish() {
        let groups: Vec<IngestGroup> = batch.groups.into_iter().map(IngestGroup::from).collect();
        loop {
            let leader = leader_of(nodes, shard, Duration::from_secs(10)).await;
            let cmd =
                Command::Ingest { stamp: now(), rules: rules.clone(), limits: table.limits(), groups: groups.clone() };
            match leader.propose(shard, cmd).await {
                Ok(Response::Ingest { groups, .. }) => {
                    assert!(
                        groups.iter().all(|g| matches!(g, GroupOutcome::Applied { shed: 0 } | GroupOutcome::Duplicate)),
                        "{groups:?}"
                    );
                    break;
                }
                Ok(other) => panic!("unexpected response {other:?}"),
                Err(
                    e @ (ProposeError::NotLeader { .. }
                    | ProposeError::Unknown(_)
                    | ProposeError::LeaseExpired(_)
                    | ProposeError::Fatal { .. }),
                ) => {
                    eprintln!("retry shard {shard}: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let mut acked = BTreeMap::new();
    for (k, v) in keys {
        *acked.entry(k.clone()).or_insert(0) += v;
    }
    acked
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_and_survive_a_leader_loss() {
    let table = StreamsFile::parse("[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"200ms\" }")
        .and_then(|f| f.validate(&[]))
        .unwrap();
    let mut listeners = Vec::new();
    let mut specs = Vec::new();
    for i in 0..3 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        specs.push(NodeSpec { name: format!("coalesce-{i}"), peer_addr: addr.clone(), client_addr: addr });
        listeners.push(l);
    }
    let spec = ClusterSpec { cluster: "test".into(), shards: SHARDS, replication: 3, nodes: specs };
    let mut nodes = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        nodes.push(start(&spec, &format!("coalesce-{i}"), l).await);
    }
    let boots: Vec<_> = nodes
        .iter()
        .map(|r| {
            let n = r.node.clone();
            tokio::spawn(async move { n.bootstrap(Duration::from_secs(10)).await })
        })
        .collect();
    for b in boots {
        b.await.unwrap().unwrap();
    }
    // Each node initialized its own groups, so leadership starts out spread.
    let mut leaders = BTreeMap::new();
    for shard in 0..SHARDS {
        *leaders.entry(leader_of(&nodes, shard, Duration::from_secs(10)).await.me().name.clone()).or_insert(0) += 1;
    }
    assert!(leaders.len() >= 2, "leadership spread over nodes: {leaders:?}");

    let mut acked: BTreeMap<String, i64> = BTreeMap::new();
    let (producer, mut seq) = (42u64, 0u64);
    let add = |a: BTreeMap<String, i64>, acked: &mut BTreeMap<String, i64>| {
        for (k, v) in a {
            *acked.entry(k).or_insert(0) += v;
        }
    };
    for round in 0..30i64 {
        let keys: Vec<(String, i64)> = (0..40).map(|i| (format!("k{}", (i * 7 + round) % 50), round + i)).collect();
        let a = send(&nodes, &table, producer, &mut seq, &keys).await;
        add(a, &mut acked);
    }

    // Lose the leader of shard 0 (its server and every group stop, no hand-off).
    let victim = leader_of(&nodes, 0, Duration::from_secs(5)).await;
    let vi = nodes.iter().position(|r| Arc::ptr_eq(&r.node, &victim)).unwrap();
    nodes[vi].stop_server.take().unwrap().send(()).unwrap();
    nodes[vi].stop_sealer.take().unwrap().send(()).unwrap();
    for g in victim.groups() {
        g.raft.shutdown().await.unwrap();
    }
    let started = std::time::Instant::now();
    let new_leader = leader_of(&nodes, 0, Duration::from_secs(10)).await;
    assert_ne!(new_leader.id(), victim.id());
    eprintln!("shard 0 failed over in {:?}", started.elapsed());

    for round in 30..60i64 {
        let keys: Vec<(String, i64)> = (0..40).map(|i| (format!("k{}", (i * 3 + round) % 50), round - i)).collect();
        let a = send(&nodes, &table, producer, &mut seq, &keys).await;
        add(a, &mut acked);
    }

    // Wait for every window to close, then read each shard's outbox from its leader.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut emitted: BTreeMap<String, i64> = BTreeMap::new();
    loop {
        emitted.clear();
        let mut buffered = 0;
        for shard in 0..SHARDS {
            let leader = leader_of(&nodes, shard, Duration::from_secs(10)).await;
            let g = leader.group(shard).unwrap();
            buffered += g.reader().stats().unwrap().keys;
            let outputs = g.reader().outputs_from(0, usize::MAX).unwrap();
            for (i, o) in outputs.iter().enumerate() {
                assert_eq!(o.seq, i as u64 + 1, "shard {shard}: seqs are gap-free from 1");
                assert_eq!(o.shard, shard);
                let Aggregate::SumI64(v) = o.value else { panic!("sum") };
                *emitted.entry(o.key.clone()).or_insert(0) += v;
            }
            let epochs: Vec<_> = outputs.iter().map(|o| o.epoch).collect();
            assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "shard {shard}: epochs never decrease");
        }
        if buffered == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "windows did not close: {buffered} keys still buffered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(emitted, acked, "Σ emitted per key == Σ acknowledged per key");

    // Re-sending an already acknowledged request applies nothing.
    let before = emitted.clone();
    seq -= 40;
    let keys: Vec<(String, i64)> = (0..40).map(|i| (format!("k{}", (i * 3 + 59) % 50), 59 - i)).collect();
    send(&nodes, &table, producer, &mut seq, &keys).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    for shard in 0..SHARDS {
        let leader = leader_of(&nodes, shard, Duration::from_secs(10)).await;
        assert_eq!(leader.group(shard).unwrap().reader().stats().unwrap().keys, 0, "duplicate was not buffered");
    }
    let _ = before;

    for r in &mut nodes {
        if let Some(tx) = r.stop_server.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = r.stop_sealer.take() {
            let _ = tx.send(());
        }
        r.node.shutdown(Duration::from_secs(2)).await;
    }
}
