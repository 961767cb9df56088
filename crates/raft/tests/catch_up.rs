//! A replica that was down while its shard moved on (and purged its log) catches up through a
//! snapshot after restarting from its data directory, and then holds byte-identical state.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use coalesce_core::batch::{BatchBuilder, Event};
use coalesce_core::stream::StreamsFile;
use coalesce_core::value::Value;
use coalesce_raft::{ClusterSpec, Command, IngestGroup, NodeSpec, RaftNode};
use coalesce_storage::{NodeDb, StorageOptions};
use openraft::async_runtime::WatchReceiver;
use tokio::sync::oneshot;

struct Running {
    node: Arc<RaftNode>,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    balancer: (oneshot::Sender<()>, tokio::task::JoinHandle<()>),
}

impl Running {
    /// Stops the server and the balancer and every group; the database closes once the last
    /// handle is gone.
    async fn halt(self) -> u64 {
        let id = self.node.id();
        let _ = self.balancer.0.send(());
        self.balancer.1.await.unwrap();
        // Groups first (which also ends the replication streams peers hold open into this
        // node), then the server: a graceful server stop waits for open streams, as
        // `coalesced` shuts down too.
        self.node.shutdown(Duration::from_secs(5)).await;
        let _ = self.stop.send(());
        self.server.await.unwrap();
        id
    }
}

async fn start(spec: &ClusterSpec, name: &str, dir: &Path, listener: tokio::net::TcpListener) -> Running {
    // The previous incarnation's database may still be closing: retry until it is released.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let db = loop {
        match NodeDb::open(dir, &StorageOptions::default()) {
            Ok(db) => break db,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopen {}: {e}", dir.display()),
        }
    };
    let (node, stop, server) = common::serve(db, spec, name, listener).await;
    let (balancer_stop, brx) = oneshot::channel::<()>();
    let balancer = tokio::spawn(node.clone().run_balancer(Duration::from_millis(200), async {
        let _ = brx.await;
    }));
    Running { node, stop, server, balancer: (balancer_stop, balancer) }
}

async fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node of `nodes` that leads shard 0, if any.
fn leader(nodes: &[Option<Running>]) -> Option<Arc<RaftNode>> {
    nodes.iter().flatten().find(|r| r.node.group(0).is_some_and(|g| g.raft.is_leader())).map(|r| r.node.clone())
}

/// Three nodes replicating one shard over loopback gRPC, bootstrapped, with a leader.
async fn three_nodes(cluster: &str) -> (ClusterSpec, Vec<tempfile::TempDir>, Vec<Option<Running>>) {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut listeners = Vec::new();
    let mut nodes_spec = Vec::new();
    for i in 0..3 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        nodes_spec.push(NodeSpec { name: format!("coalesce-{i}"), peer_addr: addr.clone(), client_addr: addr });
        listeners.push(l);
    }
    let spec = ClusterSpec { cluster: cluster.into(), shards: 1, replication: 3, nodes: nodes_spec };
    let mut nodes = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        nodes.push(Some(start(&spec, &format!("coalesce-{i}"), dirs[i].path(), l).await));
    }
    for n in nodes.iter().flatten() {
        n.node.bootstrap(Duration::from_secs(10)).await.unwrap();
    }
    wait_for("a leader", Duration::from_secs(10), || leader(&nodes).is_some()).await;
    (spec, dirs, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_replica_catches_up_through_a_snapshot() {
    let table = StreamsFile::parse("[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1h\" }")
        .and_then(|f| f.validate(&[]))
        .unwrap();
    let rules: BTreeMap<_, _> = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
    let (spec, dirs, mut nodes) = three_nodes("catch-up").await;

    // Stop a follower (keeping its data directory).
    let lagging =
        nodes.iter().position(|r| r.as_ref().is_some_and(|r| !r.node.group(0).unwrap().raft.is_leader())).unwrap();
    let addr = spec.nodes[lagging].peer_addr.clone();
    let old_id = nodes[lagging].take().unwrap().halt().await;

    // The shard moves on: many entries, then a snapshot and a purge of the whole log.
    let l = leader(&nodes).unwrap();
    let mut seq = 0;
    for round in 0..200u64 {
        let mut b = BatchBuilder::new(&table, 1, 1_000);
        for i in 0..20u64 {
            seq += 1;
            let ev = Event {
                stream: "sums".into(),
                key: format!("k{}", (round * 20 + i) % 300),
                value: Value::Int(1),
                event_time: None,
                producer: Some((5, seq)),
            };
            b.add(&ev).unwrap();
        }
        let groups = b.finish().into_values().flat_map(|b| b.groups).map(IngestGroup::from).collect();
        l.propose(0, Command::Ingest { stamp: 1_000 + round, rules: rules.clone(), limits: table.limits(), groups })
            .await
            .unwrap();
    }
    let g = l.group(0).unwrap();
    g.raft.trigger().snapshot().await.unwrap();
    g.raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.snapshot.is_some(), "snapshot built").await.unwrap();
    let snap_index = g.raft.metrics().borrow_watched().snapshot.unwrap().index;
    g.raft.trigger().purge_log(snap_index).await.unwrap();
    g.raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= snap_index), "log purged")
        .await
        .unwrap();

    // Restart the lagging node from its directory on its old address.
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    let back = start(&spec, &spec.nodes[lagging].name.clone(), dirs[lagging].path(), listener).await;
    assert_eq!(back.node.id(), old_id, "a restarted node keeps its peer id");
    let target = g.raft.metrics().borrow_watched().last_applied.unwrap().index;
    let bg = back.node.group(0).unwrap();
    bg.raft
        .wait(Some(Duration::from_secs(20)))
        .metrics(|m| m.last_applied.is_some_and(|a| a.index >= target), "caught up")
        .await
        .unwrap();
    assert!(
        bg.raft.metrics().borrow_watched().snapshot.is_some_and(|s| s.index >= snap_index),
        "caught up through a snapshot"
    );
    // Byte-identical state machines.
    wait_for("identical state", Duration::from_secs(10), || {
        let a = common::state_bytes(bg.store());
        let b = common::state_bytes(g.store());
        a == b
    })
    .await;
    assert_eq!(bg.reader().stats().unwrap().inputs_total, 4_000);

    nodes[lagging] = Some(back);
    for r in nodes.into_iter().flatten() {
        r.halt().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_replica_rejoins_as_a_new_peer() {
    let table = StreamsFile::parse("[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1h\" }")
        .and_then(|f| f.validate(&[]))
        .unwrap();
    let rules: BTreeMap<_, _> = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
    let (spec, mut dirs, mut nodes) = three_nodes("wiped").await;
    let l = leader(&nodes).unwrap();
    for round in 0..20u64 {
        let mut b = BatchBuilder::new(&table, 1, 1_000);
        b.add(&Event {
            stream: "sums".into(),
            key: format!("k{round}"),
            value: Value::Int(1),
            event_time: None,
            producer: None,
        })
        .unwrap();
        let groups = b.finish().into_values().flat_map(|b| b.groups).map(IngestGroup::from).collect();
        l.propose(0, Command::Ingest { stamp: 1_000 + round, rules: rules.clone(), limits: table.limits(), groups })
            .await
            .unwrap();
    }

    // Wipe coalesce-0 — the node that initialized the group, most likely its leader: stop it,
    // delete its data, start it again on the same address. It must not initialize the group
    // again (its peers report it initialized); the new leader adds it back under its new id.
    let victim = 0;
    let addr = spec.nodes[victim].peer_addr.clone();
    let old_id = nodes[victim].take().unwrap().halt().await;
    let fresh = tempfile::tempdir().unwrap();
    dirs[victim] = fresh;
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    let back = start(&spec, &spec.nodes[victim].name.clone(), dirs[victim].path(), listener).await;
    assert_ne!(back.node.id(), old_id, "a wiped node comes back with a new id");
    back.node.bootstrap(Duration::from_secs(10)).await.unwrap(); // must not initialize anything

    // The leader replaces the old id with the new one, and the new peer catches up. (The
    // balancer may then hand leadership to it: it is the shard's preferred leader.)
    nodes[victim] = Some(back);
    let new_id = nodes[victim].as_ref().unwrap().node.id();
    let groups: Vec<_> = nodes.iter().flatten().map(|r| r.node.group(0).unwrap()).collect();
    let settled = || {
        let states: Vec<_> = groups.iter().map(|g| common::state_bytes(g.store())).collect();
        groups.iter().all(|g| {
            let m = g.raft.metrics().borrow_watched().clone();
            let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
            voters.contains(&new_id) && !voters.contains(&old_id) && g.reader().stats().unwrap().inputs_total == 20
        }) && states.windows(2).all(|w| w[0] == w[1])
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !settled() {
        if tokio::time::Instant::now() >= deadline {
            for r in nodes.iter().flatten() {
                let g = r.node.group(0).unwrap();
                let m = g.raft.metrics().borrow_watched().clone();
                eprintln!(
                    "{} id {}: {:?}, applied {:?}, last log {:?}, membership {:?}, {:?}",
                    r.node.me().name,
                    r.node.id(),
                    m.state,
                    m.last_applied,
                    m.last_log_index,
                    m.membership_config,
                    g.reader().stats().unwrap()
                );
            }
            panic!("the wiped peer was not replaced, or replicas differ, after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for r in nodes.into_iter().flatten() {
        r.halt().await;
    }
}
