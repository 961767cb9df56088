//! Real `coalesced` processes on loopback: a producer writes sum events to 1,000 keys while the
//! test SIGKILLs the current leader of a shard again and again and restarts it. Afterwards
//! Σ of outputs per key == Σ of acknowledged inputs per key, and every shard's seqs are
//! gap-free. Replay a run with `COALESCE_TEST_SEED=<seed>`.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coalesce_proto::v1 as pb;
use harness::{Cluster, produce, seed};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const STREAMS: &str = "[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"300ms\" }\n";
const SHARDS: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sums_are_exact_across_repeated_leader_kills() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::start(3, SHARDS, STREAMS);
    cluster.wait_ready(Duration::from_secs(60)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let clients = (0..3).map(|i| cluster.client(i)).collect();
    let producer = tokio::spawn(produce(clients, seed, stop.clone()));

    let mut failovers = Vec::new();
    for kill in 0..10 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..700))).await;
        let (shard, victim) = cluster.random_leader(&mut rng).await;
        cluster.kill(victim);
        let t = Instant::now();
        loop {
            let l = cluster.leaders().await;
            if l.get(&shard).is_some_and(|n| cluster.index_of(n) != Some(victim)) {
                break;
            }
            if t.elapsed() > Duration::from_secs(20) {
                cluster.dump_logs();
                panic!("kill {kill}: shard {shard} has no new leader after 20s (seed {seed})");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        failovers.push(t.elapsed());
        cluster.spawn(victim);
    }
    stop.store(true, Ordering::Relaxed);
    let (acked, requests, _) = producer.await.unwrap();
    cluster.wait_ready(Duration::from_secs(30)).await;
    let emitted = cluster.collect_outputs().await;
    failovers.sort();
    eprintln!(
        "{requests} requests acknowledged; failover (kill → new leader seen) p50 {:?} max {:?}",
        failovers[failovers.len() / 2],
        failovers.last().unwrap()
    );
    if emitted != acked {
        cluster.dump_logs();
    }
    assert_eq!(emitted, acked, "Σ emitted per key == Σ acknowledged per key (seed {seed})");
}

/// Partitions (real: the isolated leader's peer links stop carrying bytes) under load: the
/// majority elects a new leader, the isolated one seals nothing the majority does not know of,
/// and after healing Σ emitted == Σ acknowledged per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sums_are_exact_across_leader_partitions() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let cluster = Cluster::start_partitionable(3, SHARDS, STREAMS);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = (0..3).map(|i| cluster.client(i)).collect();
    let producer = tokio::spawn(produce(clients, seed, stop.clone()));
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..700))).await;
        let (shard, victim) = cluster.random_leader(&mut rng).await;
        cluster.isolate(victim, true);
        let t = Instant::now();
        // The majority side elects someone else.
        loop {
            let mut majority_leader = None;
            for i in (0..3).filter(|i| *i != victim) {
                if let Some(s) = cluster.status(i).await
                    && let Some(sh) = s.local_shards.iter().find(|s| s.shard == shard)
                    && !sh.leader.is_empty()
                    && cluster.index_of(&sh.leader) != Some(victim)
                {
                    majority_leader = Some(sh.leader.clone());
                }
            }
            if majority_leader.is_some() {
                break;
            }
            if t.elapsed() > Duration::from_secs(20) {
                for i in 0..3 {
                    eprintln!("coalesce-{i}: {:?}", cluster.status(i).await.map(|s| s.local_shards));
                }
                cluster.dump_logs();
                panic!("partition {round}: shard {shard} has no leader on the majority side after 20s (seed {seed})");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("partition {round}: shard {shard} moved off coalesce-{victim} in {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        cluster.isolate(victim, false);
    }
    stop.store(true, Ordering::Relaxed);
    let (acked, requests, _) = producer.await.unwrap();
    cluster.wait_ready(Duration::from_secs(30)).await;
    let emitted = cluster.collect_outputs().await;
    eprintln!("{requests} requests acknowledged across 3 leader partitions");
    if emitted != acked {
        cluster.dump_logs();
    }
    assert_eq!(emitted, acked, "Σ emitted per key == Σ acknowledged per key (seed {seed})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restart_keeps_buffered_state() {
    let seed = seed();
    // Long windows: everything is still buffered when the cluster dies.
    let streams = "[streams.sums]\nmerge = \"sum_i64\"\nwindow = { max_wait = \"4s\" }\n";
    let mut cluster = Cluster::start(3, SHARDS, streams);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = (0..3).map(|i| cluster.client(i)).collect();
    let producer = tokio::spawn(produce(clients, seed, stop.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, requests, _) = producer.await.unwrap();
    assert!(requests > 0);
    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        cluster.spawn(i);
    }
    cluster.wait_ready(Duration::from_secs(60)).await;
    let emitted = cluster.collect_outputs().await;
    assert_eq!(emitted, acked, "buffered state survived a whole-cluster restart (seed {seed})");
}

/// A SIGSTOPped leader is replaced; when it resumes it never seals with its old epoch. Each
/// round also sends a probe event through a follower right after the pause: the follower
/// forwards it to the silent leader and, once it sees the successor, sends it there instead of
/// waiting out the forward timeout (a reroute; the producer seq makes the resend safe).
/// Throughout, every node's published Leases are polled: no two holders of one shard are ever
/// valid at the same instant by Kubernetes rules (renewTime + leaseDurationSeconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_never_seals_with_its_old_epoch() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let cluster = Arc::new(Cluster::start(3, SHARDS, STREAMS));
    cluster.wait_ready(Duration::from_secs(60)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = (0..3).map(|i| cluster.client(i)).collect();
    let producer = tokio::spawn(produce(clients, seed, stop.clone()));
    let leases = harness::LeaseWatch::start(cluster.clone());
    let probe_producer = rng.random::<u64>() | 1;
    let mut probed = BTreeMap::new();
    for round in 0..3u64 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..800))).await;
        let (shard, zombie) = cluster.random_leader(&mut rng).await;
        cluster.signal(zombie, "STOP");
        let via = (zombie + 1 + rng.random_range(0..2)) % 3;
        let probe = tokio::spawn(probe_through(cluster.clone(), via, shard, probe_producer, round + 1));
        // Wait for the others to elect a new leader, let it work, then wake the zombie.
        let t = Instant::now();
        loop {
            let mut others = BTreeMap::new();
            for i in (0..3).filter(|i| *i != zombie) {
                if let Some(st) = cluster.status(i).await {
                    for s in st.local_shards {
                        if s.shard == shard && !s.leader.is_empty() && cluster.index_of(&s.leader) != Some(zombie) {
                            others.insert(i, s.leader);
                        }
                    }
                }
            }
            if !others.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no new leader while shard {shard}'s leader is paused (seed {seed})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (key, value, took, attempts) = probe.await.unwrap();
        eprintln!(
            "round {round}: probe through node {via} acknowledged {took:?} after the pause ({attempts} attempts)"
        );
        *probed.entry(key).or_insert(0) += value;
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.signal(zombie, "CONT");
    }
    stop.store(true, Ordering::Relaxed);
    let (mut acked, _, _) = producer.await.unwrap();
    cluster.wait_ready(Duration::from_secs(30)).await;
    let (overlaps, holders) = leases.finish().await;
    eprintln!("Lease holders seen (shard, term, node): {holders}");
    assert!(holders > SHARDS as usize, "the pauses moved leaderships (seed {seed})");
    assert!(overlaps.is_empty(), "two valid Leases of one shard at once (seed {seed}):\n{}", overlaps.join("\n"));
    for (key, value) in probed {
        *acked.entry(key).or_insert(0) += value;
    }
    cluster.wait_ready(Duration::from_secs(30)).await;
    let reroutes = metric_sum(&cluster, "coalesce_raft_forward_reroutes_total").await;
    eprintln!("forwards rerouted to a successor: {reroutes}");
    assert!(reroutes >= 1.0, "no forward followed the new leader in 3 pauses (seed {seed})");
    // `collect` asserts seqs are gap-free and epochs never decrease in seq order: an output
    // sealed by the zombie's old epoch after the new leader's would fail it.
    let emitted = cluster.collect_outputs().await;
    assert_eq!(emitted, acked, "Σ emitted per key == Σ acknowledged per key (seed {seed})");
    // A resumed node finds the forwards its peers gave up on reset: it must not answer them by
    // cutting its peers off (h2's rapid-reset guard, sized for the peer port in app.rs).
    for n in &cluster.local.nodes {
        let log = std::fs::read_to_string(&n.log).unwrap();
        assert!(!log.contains("pending-accept streams reached limit"), "{} dropped its peers (seed {seed})", n.name);
    }
}

/// Sends one event of `shard` (producer `producer`, seq `seq`) through node `via` until it is
/// acknowledged, retrying at once on anything else. Returns its key, value, the time to the
/// acknowledgement and the attempts made.
async fn probe_through(
    cluster: Arc<Cluster>,
    via: usize,
    shard: u32,
    producer: u64,
    seq: u64,
) -> (String, i64, Duration, u32) {
    let key = (0u64..)
        .map(|k| format!("probe-{k}"))
        .find(|k| coalesce_core::hash::shard_for(harness::STREAM, k, SHARDS) == shard)
        .unwrap();
    let req =
        pb::IngestRequest { producer_id: producer, events: vec![harness::sum_event(harness::STREAM, &key, 1, seq)] };
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "probe of shard {shard} through node {via} not acknowledged"
        );
        attempts += 1;
        if let Ok(resp) = cluster.client(via).ingest(req.clone()).await {
            let code = resp.into_inner().statuses[0].code;
            if code == pb::EventCode::Ok as i32 || code == pb::EventCode::Duplicate as i32 {
                return (key, 1, started.elapsed(), attempts);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_with_sigterm_loses_nothing() {
    let seed = seed();
    let mut cluster = Cluster::start(3, SHARDS, STREAMS);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = (0..3).map(|i| cluster.client(i)).collect();
    let producer = tokio::spawn(produce(clients, seed, stop.clone()));
    let mut exits = Vec::new();
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        // A subscriber is reading from the node: SIGTERM ends its stream (UNAVAILABLE, so it
        // resubscribes elsewhere) rather than holding the client port open until the deadline.
        let watcher = pb::SubscribeRequest { consumer: "watcher".into(), shards: vec![], from_seq: Default::default() };
        let mut subscription = cluster.client(i).subscribe(watcher).await.unwrap().into_inner();
        // SIGTERM: the node closes its client port, hands its shards to peers, then exits.
        exits.push(cluster.terminate(i, Duration::from_secs(20)));
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(5), subscription.message()).await.unwrap() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("node {i}: the subscription ended without a status"),
                Err(status) => break status,
            }
        };
        assert_eq!(ended.code(), tonic::Code::Unavailable, "node {i}: {ended:?}");
        assert!(ended.message().contains("shutting down"), "node {i}: {ended:?}");
        cluster.spawn(i);
        cluster.wait_ready(Duration::from_secs(30)).await;
    }
    for n in &cluster.local.nodes {
        let log = std::fs::read_to_string(&n.log).unwrap();
        assert!(!log.contains("did not stop in time"), "{}: a server outlived the shutdown (seed {seed})", n.name);
        assert!(!log.contains('\u{1b}'), "{}: a log written to a file carries no colour codes", n.name);
    }
    stop.store(true, Ordering::Relaxed);
    let (acked, requests, retries) = producer.await.unwrap();
    let emitted = cluster.collect_outputs().await;
    // After the restarts, leadership returns to each shard's preferred replica (shard s → the
    // node at s mod 3): every node leads again.
    let t = Instant::now();
    loop {
        let leaders = cluster.leaders().await;
        let balanced = (0..SHARDS).all(|s| leaders.get(&s) == Some(&format!("coalesce-{}", s % 3)));
        if balanced {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "leadership not rebalanced: {leaders:?} (seed {seed})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "rolling restart: {requests} requests, {retries} retried attempts ({:.1}%), SIGTERM→exit {exits:?}",
        100.0 * retries as f64 / requests.max(1) as f64
    );
    assert_eq!(emitted, acked, "Σ emitted per key == Σ acknowledged per key (seed {seed})");
}

/// Sum of one metric over the running nodes.
async fn metric_sum(cluster: &Cluster, series: &str) -> f64 {
    cluster.metric(series).await.iter().sum()
}

/// Waits until every local replica of every shard is quiesced (`[raft] quiesce_after`). The
/// deadline is generous: on a machine busy with other tests, late pings wake groups (a peer that
/// seems to return wakes the leaderships it replicates), and each wake restarts the idle timer.
/// (CI twice found 11 of 12 quiet for good: a heartbeat in flight woke a follower that had just
/// agreed to quiesce under a leader that then quiesced — fixed in `Quiet::is_keepalive`.)
async fn wait_quiesced(cluster: &Cluster, replicas: f64) {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let quiet = metric_sum(cluster, "coalesce_raft_quiesced_groups").await;
        if quiet == replicas {
            return;
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            cluster.dump_shards().await;
            panic!("only {quiet} of {replicas} replicas quiesced");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Quiescence: an idle cluster stops every group's timers; a write wakes its group and is
/// acknowledged at once; a SIGKILL of a quiesced leader is noticed through node pings and a
/// follower takes over; a SIGSTOPped quiesced leader is replaced, and when it resumes it
/// steps down. Every acknowledged event is in the outputs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quiesced_groups_wake_on_writes_and_fail_over_when_their_leader_dies() {
    // Quiescence decisions are logged at debug: a failure shows which group woke and why.
    let log = ("RUST_LOG".to_owned(), "info,openraft=warn,coalesce_raft::quiesce=debug".to_owned());
    let mut cluster = Cluster::start_env(tempfile::tempdir().unwrap(), 3, SHARDS, STREAMS, "", &[log]);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let replicas = f64::from(SHARDS * 3);
    let mut seq = 0u64;
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    // One event per shard key set, from node `via`, acknowledged within `within`.
    async fn write(
        cluster: &Cluster,
        via: usize,
        seq: &mut u64,
        expected: &mut BTreeMap<String, i64>,
        within: Duration,
    ) -> Duration {
        let events: Vec<_> = (0..16)
            .map(|k| {
                *seq += 1;
                harness::sum_event("sums", &format!("q{k}"), 1, *seq)
            })
            .collect();
        let started = Instant::now();
        loop {
            let r = cluster.client(via).ingest(pb::IngestRequest { producer_id: 99, events: events.clone() }).await;
            if let Ok(ref ok) = r
                && ok.get_ref().statuses.iter().all(|s| coalesce_client::is_acked(s.code))
            {
                for e in &events {
                    *expected.entry(e.key.clone()).or_default() += 1;
                }
                return started.elapsed();
            }
            if let Ok(ok) = &r {
                let failed: Vec<_> =
                    ok.get_ref().statuses.iter().filter(|s| !coalesce_client::is_acked(s.code)).collect();
                eprintln!("attempt after {:?}: {failed:?}", started.elapsed());
            }
            assert!(started.elapsed() < within, "a write was not acknowledged within {within:?}: {r:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    wait_quiesced(&cluster, replicas).await;
    let took = write(&cluster, 0, &mut seq, &mut expected, Duration::from_secs(5)).await;
    eprintln!("first write to a quiesced cluster acknowledged in {took:?}");

    // SIGKILL a quiesced leader: its followers hear no pings and elect a successor.
    wait_quiesced(&cluster, replicas).await;
    let leaders = cluster.wait_ready(Duration::from_secs(10)).await;
    let victim = cluster.index_of(&leaders[&0]).unwrap();
    cluster.kill(victim);
    let killed = Instant::now();
    loop {
        let now = cluster.leaders().await;
        if now.len() == SHARDS as usize && now.values().all(|l| cluster.index_of(l) != Some(victim)) {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "no new leaders after the kill: {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("quiesced leader killed: every shard led again after {:?}", killed.elapsed());
    let survivor = (victim + 1) % 3;
    write(&cluster, survivor, &mut seq, &mut expected, Duration::from_secs(5)).await;
    cluster.spawn(victim);
    cluster.wait_ready(Duration::from_secs(30)).await;
    // The balancer hands the restarted node its shards back; quiesced groups wake for it.
    wait_quiesced(&cluster, replicas).await;
    let took = write(&cluster, survivor, &mut seq, &mut expected, Duration::from_secs(5)).await;
    eprintln!("write after the restarted node got its shards back acknowledged in {took:?}");

    // SIGSTOP a quiesced leader, write through another node, then let it resume.
    wait_quiesced(&cluster, replicas).await;
    let leaders = cluster.wait_ready(Duration::from_secs(10)).await;
    let zombie = cluster.index_of(&leaders[&1]).unwrap();
    cluster.signal(zombie, "STOP");
    let survivor = (zombie + 1) % 3;
    let took = write(&cluster, survivor, &mut seq, &mut expected, Duration::from_secs(10)).await;
    eprintln!("write while a quiesced leader is paused acknowledged in {took:?}");
    cluster.signal(zombie, "CONT");
    write(&cluster, zombie, &mut seq, &mut expected, Duration::from_secs(10)).await;

    let outputs = cluster.collect_outputs().await;
    assert_eq!(outputs, expected, "every acknowledged event counted exactly once");
}
