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

    // Leases: one per shard across the nodes, held by the Raft leader, valid now. A new
    // leader's Lease appears a lease after its election, so poll (balancing just moved some).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut leases = BTreeMap::new();
        for i in 0..3 {
            let r = admin(&cluster, i).leases(pb::LeasesRequest {}).await.unwrap().into_inner();
            for l in r.leases {
                assert_eq!((l.api_version.as_str(), l.kind.as_str()), ("coordination.k8s.io/v1", "Lease"));
                let spec = l.spec.unwrap();
                assert_eq!(spec.holder_identity, r.node, "a node reports only the leases it holds");
                let renewed = humantime::parse_rfc3339(&spec.renew_time).unwrap();
                let acquired = humantime::parse_rfc3339(&spec.acquire_time).unwrap();
                assert_eq!(spec.lease_duration_seconds, 1, "the sub-second Raft lease rounds up to 1 s");
                let expires = renewed + Duration::from_secs(1);
                assert!(acquired <= SystemTime::now() && acquired < expires, "{spec:?}");
                assert!(expires.duration_since(SystemTime::now()).is_ok(), "valid now by Kubernetes rules: {spec:?}");
                assert!(spec.lease_transitions >= 1);
                let meta = l.metadata.unwrap();
                let shard: u32 = meta.labels["coalesce.io/shard"].parse().unwrap();
                assert_eq!(meta.name, format!("test-shard-{shard}"));
                assert!(leases.insert(shard, spec.holder_identity).is_none(), "shard {shard} has one lease holder");
            }
        }
        let leaders_now = cluster.leaders().await;
        if leases == leaders_now {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lease holders {leases:?} are not the Raft leaders {leaders_now:?} (initially {leaders:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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

    // The CLI's table: one line per shard, under a header (once the last leader's Lease shows).
    let ctl = std::path::Path::new(harness::COALESCED).with_file_name("coalescectl");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let table = loop {
        let out = tokio::process::Command::new(&ctl)
            .args(["--addr", &cluster.local.nodes[0].client_addr, "leases"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        if table.lines().count() == 1 + SHARDS as usize || std::time::Instant::now() > deadline {
            break table;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(table.lines().count(), 1 + SHARDS as usize, "{table}");
    assert!(table.lines().next().unwrap().contains("EXPIRES"), "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("test-shard-0"), "{table}");
}

/// Hot keys: a skewed (Zipf-like) workload over many more keys than a shard's sketch holds;
/// the cluster-wide top 5 by count, gathered from every node's `HotKeys` (each answers for the
/// shards it leads), equals the exact top 5 of what was sent, and every count is within its
/// error bound of the exact count (allowing for the few seconds of decay).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_keys_match_the_exact_top_keys_of_a_skewed_workload() {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;

    let cluster = Cluster::start(3, SHARDS, STREAMS);
    cluster.wait_ready(Duration::from_secs(60)).await;
    // Trackers are the leaders' own: wait until balancing has settled leadership.
    let mut before = cluster.leaders().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = cluster.leaders().await;
        if now == before && now.len() == SHARDS as usize {
            break;
        }
        assert!(Instant::now() < deadline, "leadership did not settle: {now:?}");
        before = now;
    }
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = coalesce_client::Client::connect(addrs).await.unwrap();

    // Zipf (s = 1.5) over 70 keys, and a tail of 1000 keys sent once: about 270 keys per
    // shard for 64 counters.
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..70u32 {
        let n = (600.0 / f64::from(i + 1).powf(1.5)).floor() as u64;
        sent.insert(format!("user-{i}"), n.max(1));
    }
    for i in 0..1000 {
        sent.insert(format!("tail-{i}"), 1);
    }
    let mut events: Vec<&String> = sent.iter().flat_map(|(k, n)| std::iter::repeat_n(k, *n as usize)).collect();
    let seed = harness::seed();
    events.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut producer = client.producer();
    for chunk in events.chunks(100) {
        let batch = chunk.iter().map(|k| coalesce_client::event("sums", k, 1i64)).collect();
        assert!(producer.send(batch).await.unwrap().all_acked());
    }
    let mut exact: Vec<(&String, &u64)> = sent.iter().collect();
    exact.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let want: Vec<String> = exact.iter().take(5).map(|(k, _)| (*k).clone()).collect();
    assert_eq!(want, ["user-0", "user-1", "user-2", "user-3", "user-4"]);

    // Every shard's keys from its leader.
    let mut by_shard: BTreeMap<u32, Vec<pb::HotKey>> = BTreeMap::new();
    for i in 0..3 {
        let r = admin(&cluster, i)
            .hot_keys(pb::HotKeysRequest { shard: None, stream: Some("sums".into()), k: 10 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.node, cluster.local.nodes[i].name);
        for h in r.keys {
            by_shard.entry(h.shard).or_default().push(h);
        }
    }
    assert_eq!(by_shard.len(), SHARDS as usize, "every shard's leader reports: {by_shard:?}");
    let mut all: Vec<pb::HotKey> = by_shard.into_values().flatten().collect();
    for h in &all {
        assert!(h.shard < SHARDS && h.stream == "sums" && !h.key_truncated, "{h:?}");
        assert!(h.share > 0.0 && h.share <= 1.0, "{h:?}");
        let truth = sent[&h.key] as f64;
        // count - error <= decayed truth <= count, and decay over these seconds is under 10%.
        assert!(h.count - h.error <= truth + 1e-6, "{h:?} overcounts (sent {truth})");
        assert!(h.count >= 0.9 * truth, "{h:?} undercounts (sent {truth})");
    }
    all.sort_by(|a, b| b.count.total_cmp(&a.count));
    let got: Vec<String> = all.iter().take(5).map(|h| h.key.clone()).collect();
    assert_eq!(got, want, "top 5 by count: {:?}", &all[..5.min(all.len())]);

    // One shard, and a k out of range.
    let shard = all[0].shard;
    let leaders = cluster.leaders().await;
    let i = cluster.index_of(&leaders[&shard]).unwrap();
    let r = admin(&cluster, i)
        .hot_keys(pb::HotKeysRequest { shard: Some(shard), stream: None, k: 3 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keys.len(), 3);
    assert!(r.keys.iter().all(|h| h.shard == shard));
    assert_eq!(r.keys[0].key, "user-0");
    let err = admin(&cluster, i).hot_keys(pb::HotKeysRequest { shard: None, stream: None, k: 65 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}
