//! The PostgreSQL sink against a real PostgreSQL server.
//!
//! - With a 3-node cluster of real `coalesced` processes: a producer writes sum events while
//!   the test SIGKILLs shard leaders during delivery (and restarts them). Afterwards, per key,
//!   the accumulated total in PostgreSQL equals the acknowledged inputs exactly, and each row
//!   holds the newest seq the shard sealed for its key (no stale or repeated delivery won).
//!   Replay with `COALESCE_TEST_SEED=<seed>`.
//! - A cluster created anew on the same table and webhook, with two sinks sharing the table:
//!   everything of both clusters and both sinks arrives (fences and idempotency keys carry the
//!   cluster id and the sink).
//! - The sink alone: `sslmode` over TLS as libpq reads it; the fence rows of builds from before
//!   cluster ids (kept by an upgraded cluster, ignored by a new one); an `append` table of an
//!   older build re-keyed by cluster.

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
    let fences = db.query("SELECT shard, seq FROM coalesce_sink_fence WHERE target = 'sums_total'", &[]).await.unwrap();
    assert_eq!(fences.len(), SHARDS as usize);
    eprintln!("{requests} requests, {} keys, {} fences", totals.len(), fences.len());
}

/// A webhook that keeps what an idempotent receiver would: one delivery per `Idempotency-Key`.
#[derive(Default)]
struct Receiver {
    /// Idempotency-Key → (stream, key, value) of the one output in it.
    seen: std::sync::Mutex<BTreeMap<String, (String, String, i64)>>,
    /// Requests that repeated a key already seen.
    repeats: std::sync::atomic::AtomicU64,
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Arc<Receiver>>,
    headers: axum::http::HeaderMap,
    body: axum::Json<serde_json::Value>,
) -> axum::http::StatusCode {
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    let cluster = body["cluster"].as_str().unwrap();
    assert_eq!(headers["coalesce-cluster"].to_str().unwrap(), cluster);
    let outputs = body["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "batch_max = 1");
    let o = &outputs[0];
    let (shard, seq) = (o["shard"].as_u64().unwrap(), o["seq"].as_u64().unwrap());
    assert_eq!(key, format!("{cluster}-hook-{shard}-{seq}-{seq}"));
    let value = o["value"].as_i64().unwrap();
    let entry = (o["stream"].as_str().unwrap().to_owned(), o["key"].as_str().unwrap().to_owned(), value);
    if r.seen.lock().unwrap().insert(key, entry).is_some() {
        r.repeats.fetch_add(1, Ordering::Relaxed);
    }
    axum::http::StatusCode::OK
}

/// Sends `per_stream` events with seqs from 1 to each of `streams` under one producer id, every
/// request retried until acknowledged; adds what was acknowledged to `acked`.
async fn send_known(
    cluster: &Cluster,
    streams: &[&str],
    rounds: u64,
    rng: &mut StdRng,
    acked: &mut BTreeMap<(String, String), i64>,
) {
    let producer_id = rng.random::<u64>() | 1;
    let mut seq = 0;
    for _ in 0..rounds {
        let events: Vec<pb::Event> = streams
            .iter()
            .flat_map(|s| (0..10).map(move |k| (*s, k)))
            .map(|(s, k)| {
                seq += 1;
                harness::sum_event(s, &format!("k-{k}"), rng.random_range(1..100), seq)
            })
            .collect();
        let req = pb::IngestRequest { producer_id, events: events.clone() };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempt = 0;
        loop {
            assert!(Instant::now() < deadline, "request not acknowledged within 30 s");
            let mut client = cluster.client(attempt % 3);
            attempt += 1;
            if let Ok(r) = client.ingest(req.clone()).await
                && r.get_ref()
                    .statuses
                    .iter()
                    .all(|s| s.code == pb::EventCode::Ok as i32 || s.code == pb::EventCode::Duplicate as i32)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for e in events {
            let Some(pb::value::Kind::Int(v)) = e.value.and_then(|v| v.kind) else { unreachable!() };
            *acked.entry((e.stream, e.key)).or_insert(0) += v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recreated_cluster_and_a_second_sink_on_one_table_deliver_everything() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let pg = TempPostgres::start().unwrap();
    let db = pg.client().await.unwrap();
    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // Two sinks (one per stream) share the table `shared`; both streams also go to the webhook.
    let sink = |name: &str| {
        format!(
            "[sinks.{name}]\nkind = \"postgres\"\nurl = \"{}\"\ntable = \"shared\"\nmode = \"accumulate\"\n\
             batch_max = 7\nretry_initial = \"20ms\"\nretry_max = \"500ms\"\n\n",
            pg.url()
        )
    };
    let streams = format!(
        "{}{}[sinks.hook]\nkind = \"http\"\nurl = \"{hook_url}\"\nbatch_max = 1\nretry_initial = \"20ms\"\n\
         retry_max = \"500ms\"\n\n\
         [streams.a]\nmerge = \"sum_i64\"\nwindow = {{ tumbling = \"200ms\" }}\nsinks = [\"pg_a\", \"hook\"]\n\n\
         [streams.b]\nmerge = \"sum_i64\"\nwindow = {{ tumbling = \"200ms\" }}\nsinks = [\"pg_b\", \"hook\"]\n",
        sink("pg_a"),
        sink("pg_b")
    );
    let mut acked: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut ids = Vec::new();
    for life in 0..2 {
        // New data directories each time: the second cluster starts its terms and seqs again.
        let cluster = Cluster::start(3, SHARDS, &streams);
        cluster.wait_ready(Duration::from_secs(60)).await;
        send_known(&cluster, &["a", "b"], 8, &mut rng, &mut acked).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = db.query("SELECT stream, key, (value)::bigint FROM shared", &[]).await.unwrap_or_default();
            let in_pg: BTreeMap<(String, String), i64> =
                rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect();
            let mut at_hook: BTreeMap<(String, String), i64> = BTreeMap::new();
            for (stream, key, v) in receiver.seen.lock().unwrap().values() {
                *at_hook.entry((stream.clone(), key.clone())).or_insert(0) += v;
            }
            if in_pg == acked && at_hook == acked {
                break;
            }
            if Instant::now() > deadline {
                cluster.dump_logs();
                panic!("life {life}: PostgreSQL {in_pg:?}, webhook {at_hook:?}, acknowledged {acked:?} (seed {seed})");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let id = cluster.status(0).await.unwrap().cluster_id;
        assert_eq!(id.len(), 32, "the cluster id is known: {id:?}");
        for i in 1..3 {
            assert_eq!(cluster.status(i).await.unwrap().cluster_id, id, "every node has the same id");
        }
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "a cluster created anew has a new id");
    let fences = db.query("SELECT DISTINCT cluster, sink FROM coalesce_sink_fence", &[]).await.unwrap();
    assert_eq!(fences.len(), 4, "one fence per (cluster, sink): {fences:?}");
    eprintln!("clusters {ids:?}; {} repeated webhook deliveries", receiver.repeats.load(Ordering::Relaxed));
}

mod direct {
    //! The sink without a cluster: batches built by hand.

    use super::*;
    use coalesce_core::cluster::{ClusterId, ClusterIdentity};
    use coalesce_core::output::{Epoch, Output};
    use coalesce_sinks::postgres::{PgMode, PostgresParams, PostgresSink};
    use coalesce_sinks::{Batch, DeliveryError, Sink};

    fn sink(url: String, table: &str, mode: PgMode) -> PostgresSink {
        let params = PostgresParams {
            url: Some(url),
            url_env: None,
            table: table.into(),
            mode,
            create_table: true,
            connections: 1,
        };
        PostgresSink::new("s", params)
    }

    fn output(shard: u32, seq: u64, value: i64) -> Output {
        let at = 1_700_000_000_000 + seq;
        Output {
            stream: "sums".into(),
            key: format!("key-{seq}"),
            shard,
            seq,
            epoch: Epoch { term: 1, node: 1 },
            window_start: at,
            window_end: at + 1000,
            first_input_at: at,
            last_input_at: at,
            first_event_at: at,
            last_event_at: at,
            inputs: 1,
            reason: coalesce_core::window::SealReason::Time,
            value: coalesce_core::merge::Aggregate::SumI64(value),
            samples: None,
        }
    }

    async fn deliver(
        sink: &PostgresSink,
        cluster: ClusterIdentity,
        term: u64,
        seqs: std::ops::RangeInclusive<u64>,
    ) -> Result<(), DeliveryError> {
        let outputs: Vec<Output> = seqs.map(|s| output(0, s, 1)).collect();
        sink.deliver(Batch { cluster, shard: 0, epoch: Epoch { term, node: 9 }, outputs: &outputs }).await
    }

    async fn total(db: &tokio_postgres::Client, table: &str) -> i64 {
        db.query_one(&format!("SELECT coalesce(sum((value)::bigint), 0)::bigint FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test]
    async fn the_sink_speaks_tls_as_sslmode_says() {
        let pg = TempPostgres::start_tls().unwrap();
        let db = pg.client().await.unwrap();
        let ca = pg.ca_file();
        let other_ca = tempfile::NamedTempFile::new().unwrap();
        let stranger = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(other_ca.path(), stranger.cert.pem()).unwrap();
        let ip = pg.tcp_url("127.0.0.1").unwrap();
        let name = pg.tcp_url("localhost").unwrap();
        let cluster = ClusterIdentity { id: ClusterId(rand::random()), predates_id: false };
        // (connection string, whether it connects, whether the session is encrypted)
        let cases = [
            (format!("{name} sslmode=verify-full sslrootcert={}", ca.display()), true, true),
            (format!("{ip} sslmode=verify-full sslrootcert={}", ca.display()), false, true),
            (format!("{ip} sslmode=verify-ca sslrootcert={}", ca.display()), true, true),
            (format!("{name} sslmode=verify-full sslrootcert={}", other_ca.path().display()), false, true),
            (format!("{ip} sslmode=require"), true, true),
            (format!("{ip} sslmode=require sslrootcert={}", other_ca.path().display()), false, true),
            (ip.clone(), true, true),
            (format!("{ip} sslmode=disable"), true, false),
        ];
        for (i, (url, connects, encrypted)) in cases.into_iter().enumerate() {
            let app = format!("tls-case-{i}");
            let s = sink(format!("{url} application_name={app}"), "tls_t", PgMode::Append);
            let result = deliver(&s, cluster, 1, (i as u64 * 10 + 1)..=(i as u64 * 10 + 3)).await;
            assert_eq!(result.is_ok(), connects, "{url}: {result:?}");
            if connects {
                let ssl: bool = db
                    .query_one(
                        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
                        &[&app],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(ssl, encrypted, "{url}");
            } else {
                let reason = result.unwrap_err().to_string();
                assert!(reason.contains("certificate") || reason.contains("Certificate"), "{url}: {reason}");
            }
        }
        let rows: i64 = db.query_one("SELECT count(*) FROM tls_t", &[]).await.unwrap().get(0);
        assert_eq!(rows, 5 * 3);
    }

    #[tokio::test]
    async fn fences_are_per_cluster_and_a_cluster_from_before_ids_keeps_its_old_fence() {
        let pg = TempPostgres::start().unwrap();
        let db = pg.client().await.unwrap();
        // What a build from before cluster ids left: its fence table, at term 5 and seq 10 for
        // shard 0, and a table without the `cluster` column.
        db.batch_execute(
            "CREATE TABLE coalesce_fence (target text NOT NULL, shard integer NOT NULL, epoch_term bigint NOT NULL,
                 epoch_node bigint NOT NULL, seq bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (target, shard));
             INSERT INTO coalesce_fence (target, shard, epoch_term, epoch_node, seq) VALUES ('old_t', 0, 5, 1, 10);
             CREATE TABLE old_t (stream text NOT NULL, key text NOT NULL, value jsonb NOT NULL, inputs bigint NOT NULL,
                 window_start timestamptz NOT NULL, window_end timestamptz NOT NULL, reason text NOT NULL,
                 shard integer NOT NULL, seq bigint NOT NULL, epoch_term bigint NOT NULL, epoch_node bigint NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (stream, key));
             INSERT INTO old_t VALUES ('sums', 'before', '0', 1, now(), now(), 'time', 0, 3, 5, 1);",
        )
        .await
        .unwrap();
        let upgraded = ClusterIdentity { id: ClusterId(rand::random()), predates_id: true };
        let s = sink(pg.url(), "old_t", PgMode::Accumulate);
        // The upgraded cluster skips what it delivered before the upgrade (seqs up to 10).
        deliver(&s, upgraded, 5, 5..=15).await.unwrap();
        assert_eq!(total(&db, "old_t").await, 5, "seqs 11..=15 only");
        let legacy: (i64, i64) = {
            let r =
                db.query_one("SELECT epoch_term, seq FROM coalesce_fence WHERE target = 'old_t'", &[]).await.unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!(legacy, (5, 15), "the old fence moves too, for nodes not upgraded yet");
        // A node of the older build took over at term 6 and delivered up to 20: a paused
        // upgraded leader of term 5 is fenced, and the next upgraded leader skips 16..=20.
        db.execute("UPDATE coalesce_fence SET epoch_term = 6, seq = 20 WHERE target = 'old_t'", &[]).await.unwrap();
        assert!(matches!(deliver(&s, upgraded, 5, 16..=22).await, Err(DeliveryError::Fenced { .. })));
        deliver(&s, upgraded, 7, 16..=22).await.unwrap();
        assert_eq!(total(&db, "old_t").await, 5 + 2, "seqs 21 and 22");
        // A cluster created with an id never reads the old fence: everything it sends lands.
        let fresh = ClusterIdentity { id: ClusterId(rand::random()), predates_id: false };
        deliver(&s, fresh, 1, 1..=3).await.unwrap();
        assert_eq!(total(&db, "old_t").await, 7 + 3);
        // The table gained the `cluster` column; rows from before keep ''.
        let clusters: i64 = db.query_one("SELECT count(DISTINCT cluster) FROM old_t", &[]).await.unwrap().get(0);
        assert_eq!(clusters, 3, "'' and the two ids");
        // Dropping the old fence table (every node upgraded) ends its use.
        db.batch_execute("DROP TABLE coalesce_fence").await.unwrap();
        let s = sink(pg.url(), "old_t", PgMode::Accumulate);
        deliver(&s, upgraded, 7, 20..=23).await.unwrap();
        assert_eq!(total(&db, "old_t").await, 10 + 1, "seq 23 only: its own fence was at 22");
    }

    #[tokio::test]
    async fn an_append_table_of_an_older_build_is_rekeyed_by_cluster_once_the_upgrade_is_done() {
        let pg = TempPostgres::start().unwrap();
        let db = pg.client().await.unwrap();
        db.batch_execute(
            "CREATE TABLE app_t (stream text NOT NULL, key text NOT NULL, value jsonb NOT NULL, inputs bigint NOT NULL,
                 window_start timestamptz NOT NULL, window_end timestamptz NOT NULL, reason text NOT NULL,
                 shard integer NOT NULL, seq bigint NOT NULL, epoch_term bigint NOT NULL, epoch_node bigint NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (shard, seq));
             CREATE TABLE coalesce_fence (target text NOT NULL, shard integer NOT NULL, epoch_term bigint NOT NULL,
                 epoch_node bigint NOT NULL, seq bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (target, shard));",
        )
        .await
        .unwrap();
        let key = async || -> Vec<String> {
            db.query_one(
                "SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_constraint c
                   CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
                   JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
                  WHERE c.conrelid = 'app_t'::regclass AND c.contype = 'p'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
        };
        let upgraded = ClusterIdentity { id: ClusterId(rand::random()), predates_id: true };
        deliver(&sink(pg.url(), "app_t", PgMode::Append), upgraded, 1, 1..=4).await.unwrap();
        // Nodes of the older build may still insert by (shard, seq) while `coalesce_fence` exists.
        assert_eq!(key().await, ["shard", "seq"]);
        db.batch_execute("DROP TABLE coalesce_fence").await.unwrap();
        for _ in 0..2 {
            let cluster = ClusterIdentity { id: ClusterId(rand::random()), predates_id: false };
            deliver(&sink(pg.url(), "app_t", PgMode::Append), cluster, 1, 1..=4).await.unwrap();
        }
        assert_eq!(key().await, ["cluster", "shard", "seq"]);
        let rows: i64 = db.query_one("SELECT count(*) FROM app_t", &[]).await.unwrap().get(0);
        assert_eq!(rows, 12, "three clusters' seqs 1..=4 do not collide");
    }
}
