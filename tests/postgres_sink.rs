//! The PostgreSQL sink against a real PostgreSQL server and a 3-node cluster of real
//! `coalesced` processes. A producer writes sum events while the test SIGKILLs shard leaders
//! during delivery (and restarts them). Afterwards, per key, the accumulated total in
//! PostgreSQL equals the acknowledged inputs exactly, and each row holds the newest seq the
//! shard sealed for its key (no stale or repeated delivery won). Replay with
//! `COALESCE_TEST_SEED=<seed>`.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coalesce_cli::pg::TempPostgres;
use coalesce_proto::v1 as pb;
use harness::{Cluster, produce, seed};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const SHARDS: u32 = 4;

/// Totals and seqs per key as PostgreSQL holds them.
async fn table(pg: &tokio_postgres::Client) -> BTreeMap<String, (i64, i64)> {
    pg.query("SELECT key, (value)::bigint, seq FROM sums_total", &[])
        .await
        .map(|rows| rows.iter().map(|r| (r.get::<_, String>(0), (r.get::<_, i64>(1), r.get::<_, i64>(2)))).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn totals_in_postgres_are_exact_across_leader_kills_during_delivery() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let pg = TempPostgres::start().unwrap();
    // Small batches: many deliveries, so kills land in the middle of them. `audit` is a
    // durable subscriber that never acks, so the test can read every output afterwards.
    let streams = format!(
        "[sinks.pg]\nkind = \"postgres\"\nurl = \"{}\"\ntable = \"sums_total\"\nmode = \"accumulate\"\nbatch_max = 20\n\
         retry_initial = \"20ms\"\nretry_max = \"500ms\"\n\n\
         [sinks.audit]\nkind = \"grpc\"\n\n\
         [streams.sums]\nmerge = \"sum_i64\"\nwindow = {{ tumbling = \"300ms\" }}\nsinks = [\"pg\", \"audit\"]\n",
        pg.url()
    );
    let mut cluster = Cluster::start(3, SHARDS, &streams);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let db = pg.client().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let clients = (0..3).map(|i| cluster.client(i)).collect();
    let producer = tokio::spawn(produce(clients, seed, stop.clone()));
    for kill in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(400..900))).await;
        let (shard, victim) = cluster.random_leader(&mut rng).await;
        eprintln!("kill {kill}: SIGKILL {} (leader of shard {shard})", cluster.local.nodes[victim].name);
        cluster.kill(victim);
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        cluster.spawn(victim);
    }
    stop.store(true, Ordering::Relaxed);
    let (acked, requests, _) = producer.await.unwrap();
    assert!(requests > 0);
    cluster.wait_ready(Duration::from_secs(30)).await;

    // Every acknowledged input reaches PostgreSQL exactly once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let totals = loop {
        let t = table(&db).await;
        let totals: BTreeMap<String, i64> = t.iter().map(|(k, (v, _))| (k.clone(), *v)).collect();
        if totals == acked {
            break t;
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            let wrong: Vec<_> = acked.iter().filter(|(k, v)| totals.get(*k) != Some(v)).take(5).collect();
            panic!("PostgreSQL totals differ from acknowledged inputs for {wrong:?}… (seed {seed})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Every output, from the durable subscriber's view of each shard's outbox.
    let leaders = cluster.wait_ready(Duration::from_secs(30)).await;
    let mut newest: BTreeMap<String, u64> = BTreeMap::new();
    let mut sums: BTreeMap<String, i64> = BTreeMap::new();
    for shard in 0..SHARDS {
        let i = cluster.index_of(&leaders[&shard]).unwrap();
        let status = cluster.status(i).await.unwrap();
        let next_seq = status.local_shards.iter().find(|s| s.shard == shard).unwrap().next_seq;
        let mut stream = cluster
            .client(i)
            .subscribe(pb::SubscribeRequest {
                consumer: "audit".into(),
                shards: vec![shard],
                from_seq: Default::default(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = 0;
        while seen + 1 < next_seq {
            let batch =
                tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
            for o in batch.outputs {
                seen = o.seq;
                newest.insert(o.key.clone(), o.seq);
                *sums.entry(o.key).or_insert(0) += o.value_json.parse::<i64>().unwrap();
            }
        }
    }
    assert_eq!(sums, acked, "Σ outputs per key == Σ acknowledged inputs (seed {seed})");
    for (key, (_, seq)) in &totals {
        assert_eq!(*seq as u64, newest[key], "{key}: the row holds the newest seq sealed for it (seed {seed})");
    }
    // The fence of each shard: the last seq delivered, by the current leader's term or older.
    let fences = db.query("SELECT shard, seq FROM coalesce_fence WHERE target = 'sums_total'", &[]).await.unwrap();
    assert_eq!(fences.len(), SHARDS as usize);
    eprintln!("{requests} requests, {} keys, {} fences", totals.len(), fences.len());
}
