//! The operator API against a 3-node cluster of real `coalesced` processes: leases in the
//! shape of Kubernetes Leases agree with Raft, leader transfer sticks (balancing follows the
//! replicated choice) until reset, and a drained node gives up every shard until undrained.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use coalesce_proto::v1 as pb;
use coalesce_proto::v1::admin_client::AdminClient;
use harness::Cluster;

const STREAMS: &str = "[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1m\", max_count = 50 }\n";
const SHARDS: u32 = 4;

fn admin(cluster: &Cluster, i: usize) -> AdminClient<tonic::transport::Channel> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", cluster.local.nodes[i].client_addr))
        .unwrap()
        .connect_lazy();
    AdminClient::new(ch)
}

/// Waits until `check(leaders)` holds, or panics after `within`.
async fn wait_leaders(cluster: &Cluster, within: Duration, what: &str, check: impl Fn(&BTreeMap<u32, String>) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let leaders = cluster.leaders().await;
        if leaders.len() == SHARDS as usize && check(&leaders) {
            return;
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!("{what}: leaders {leaders:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_transfer_and_drain() {
    let cluster = Cluster::start(3, SHARDS, STREAMS);
    let leaders = cluster.wait_ready(Duration::from_secs(60)).await;
    // Balanced: shard s on coalesce-(s mod 3).
    wait_leaders(&cluster, Duration::from_secs(20), "initial balance", |l| {
        (0..SHARDS).all(|s| l[&s] == format!("coalesce-{}", s % 3))
    })
    .await;

    // Leases: one per shard across the nodes, held by the Raft leader, renewed just now.
    let mut leases = BTreeMap::new();
    for i in 0..3 {
        let r = admin(&cluster, i).leases(pb::LeasesRequest {}).await.unwrap().into_inner();
        for l in r.leases {
            assert_eq!((l.api_version.as_str(), l.kind.as_str()), ("coordination.k8s.io/v1", "Lease"));
            let spec = l.spec.unwrap();
            assert_eq!(spec.holder_identity, r.node, "a node reports only the leases it holds");
            let renewed = humantime::parse_rfc3339(&spec.renew_time).unwrap();
            let acquired = humantime::parse_rfc3339(&spec.acquire_time).unwrap();
            assert!(acquired <= renewed, "{spec:?}");
            assert!(SystemTime::now().duration_since(renewed).unwrap_or_default() < Duration::from_secs(3), "{spec:?}");
            assert_eq!(spec.lease_duration_seconds, 1, "600 ms election timeout rounds up to 1 s");
            assert!(spec.lease_transitions >= 1);
            let meta = l.metadata.unwrap();
            let shard: u32 = meta.labels["coalesce.io/shard"].parse().unwrap();
            assert_eq!(meta.name, format!("test-shard-{shard}"));
            assert!(leases.insert(shard, spec.holder_identity).is_none(), "shard {shard} has one lease holder");
        }
    }
    let leaders_now = cluster.leaders().await;
    assert_eq!(leases, leaders_now, "lease holders are the Raft leaders (initially {leaders:?})");

    // Streams and shards.
    let streams = admin(&cluster, 0).streams(pb::StreamsRequest {}).await.unwrap().into_inner().streams;
    assert_eq!(streams.len(), 1);
    assert_eq!((streams[0].merge.as_str(), streams[0].window.as_str()), ("sum_i64", "tumbling 1m, max_count 50"));
    let shards = admin(&cluster, 0).shards(pb::ShardsRequest {}).await.unwrap().into_inner();
    let s0 = shards.shards.iter().find(|s| s.shard == 0).unwrap();
    assert_eq!((s0.role.as_str(), s0.leader.as_str()), ("leader", "coalesce-0"));
    assert!(s0.lease_valid);
    assert_eq!(s0.replicas.len(), 3);
    assert!(s0.replicas.iter().all(|r| r.voter && r.lag <= 1), "{s0:?}");

    // Transfer shard 0 to coalesce-2: it stays there past several balancing rounds.
    let r = admin(&cluster, 1)
        .transfer_leader(pb::TransferLeaderRequest { shard: 0, to: "coalesce-2".into(), reset: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.leader, "coalesce-2");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(cluster.leaders().await[&0], "coalesce-2", "balancing follows the replicated choice");
    let err = admin(&cluster, 0)
        .transfer_leader(pb::TransferLeaderRequest { shard: 0, to: "nobody".into(), reset: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let r = admin(&cluster, 0)
        .transfer_leader(pb::TransferLeaderRequest { shard: 0, to: String::new(), reset: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.leader, "coalesce-0", "reset returns to the placement's first replica");

    // Drain coalesce-1: it leads nothing, and peers do not hand shards back while it drains.
    let r = admin(&cluster, 1).drain(pb::DrainRequest { undrain: false }).await.unwrap().into_inner();
    assert!(r.still_leading.is_empty(), "{r:?}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let led: BTreeSet<u32> =
        cluster.leaders().await.into_iter().filter(|(_, l)| l == "coalesce-1").map(|(s, _)| s).collect();
    assert!(led.is_empty(), "a draining node leads nothing: {led:?}");
    admin(&cluster, 1).drain(pb::DrainRequest { undrain: true }).await.unwrap();
    wait_leaders(&cluster, Duration::from_secs(20), "undrained node gets its shard back", |l| l[&1] == "coalesce-1")
        .await;

    // The CLI's table: one line per shard, under a header.
    let ctl = std::path::Path::new(harness::COALESCED).with_file_name("coalescectl");
    let out = tokio::process::Command::new(&ctl)
        .args(["--addr", &cluster.local.nodes[0].client_addr, "leases"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.lines().count(), 1 + SHARDS as usize, "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("test-shard-0"), "{table}");
}
