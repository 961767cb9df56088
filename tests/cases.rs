//! The four cases of DESIGN.md, as shipped in `deploy/examples/cases/`, each run on a 3-node
//! cluster of real `coalesced` processes against real downstreams: a throw-away PostgreSQL and
//! a local HTTP server. The configs are used as shipped except for the downstream addresses and
//! durations scaled down (minutes → seconds) so each runs in seconds.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coalesce_cli::pg::TempPostgres;
use coalesce_client::{Client, event};
use harness::Cluster;

fn case(name: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/examples/cases/");
    std::fs::read_to_string(format!("{path}{name}.toml")).unwrap()
}

/// A webhook that records every JSON body it receives.
async fn webhook() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let store = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| {
            let store = Arc::clone(&store);
            async move {
                store.lock().unwrap().push(body.0);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

async fn start(streams: &str, env: &[(String, String)]) -> (Cluster, Client) {
    let cluster = Cluster::start_env(tempfile::tempdir().unwrap(), 3, 4, streams, "", env);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect(addrs).await.unwrap();
    (cluster, client)
}

async fn wait_until(what: &str, cluster: &Cluster, within: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok().await {
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!("{what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Case 1: per-fingerprint counts accumulate in PostgreSQL, latency sketches land per window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_coalescing_into_postgres() {
    let pg = TempPostgres::start().unwrap();
    let streams = case("write-coalescing").replace("\"10s\"", "\"500ms\"");
    let env = [("COALESCE_PG_URL".to_owned(), pg.url())];
    let (cluster, client) = start(&streams, &env).await;
    let mut producer = client.producer();
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for round in 0..5 {
        let mut events = Vec::new();
        for q in 0..20 {
            let fp = format!("select-{q}");
            *expected.entry(fp.clone()).or_default() += 1 + round;
            events.push(event("query-counts", &fp, 1 + round));
            events.push(event("query-latency", &fp, 5.0 + q as f64));
        }
        assert!(producer.send(events).await.unwrap().all_acked());
    }
    let db = pg.client().await.unwrap();
    wait_until("query counts reach PostgreSQL", &cluster, Duration::from_secs(30), async || {
        let rows = db.query("SELECT key, (value)::bigint FROM query_counts", &[]).await.unwrap_or_default();
        let got: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        got == expected
    })
    .await;
    // The latency sketches go through their own sink: one row per fingerprint per window.
    wait_until("a latency sketch per fingerprint", &cluster, Duration::from_secs(30), async || {
        let n: i64 =
            db.query_one("SELECT count(DISTINCT key) FROM query_latency", &[]).await.map(|r| r.get(0)).unwrap_or(0);
        n == 20
    })
    .await;
}

/// Case 2: account changes settle, then one call per account; the rate ceiling is configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settle_then_call_a_rate_limited_api_once_per_account() {
    let (url, got) = webhook().await;
    let streams = case("rate-limited-api")
        .replace("https://accounts.internal/v1/sync", &url)
        .replace("\"30s\"", "\"300ms\"")
        .replace("\"2m\"", "\"2s\"");
    let (cluster, client) = start(&streams, &[]).await;
    let mut producer = client.producer();
    // Ten changes to each of 30 accounts, in quick succession: one call per account.
    for rev in 0..10 {
        let events = (0..30).map(|a| event("account-changes", &format!("acct-{a}"), rev)).collect();
        assert!(producer.send(events).await.unwrap().all_acked());
    }
    wait_until("every account called", &cluster, Duration::from_secs(30), async || got.lock().unwrap().len() >= 30)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = got.lock().unwrap().clone();
    assert_eq!(calls.len(), 30, "one call per account after it settled");
    for c in &calls {
        let o = &c["outputs"][0];
        assert_eq!(c["outputs"].as_array().unwrap().len(), 1);
        assert_eq!(o["value"], serde_json::json!(9), "the latest state: {o}");
        assert_eq!(o["inputs"], serde_json::json!(10));
    }
}

/// Case 3: page views counted per second and appended with COPY, one row per output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_ingest_into_postgres() {
    let pg = TempPostgres::start().unwrap();
    let env = [("COALESCE_PG_URL".to_owned(), pg.url())];
    let (cluster, client) = start(&case("bulk-postgres"), &env).await;
    let mut producer = client.producer();
    for _ in 0..10 {
        let events = (0..500).map(|i| event("page-views", &format!("/page/{}", i % 100), ())).collect();
        assert!(producer.send(events).await.unwrap().all_acked());
    }
    let db = pg.client().await.unwrap();
    wait_until("all page views appended", &cluster, Duration::from_secs(30), async || {
        db.query_one("SELECT coalesce(sum((value)::bigint), 0)::bigint FROM page_views_per_second", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 5_000)
            .unwrap_or(false)
    })
    .await;
    let rows: i64 = db.query_one("SELECT count(*) FROM page_views_per_second", &[]).await.unwrap().get(0);
    assert!(rows < 5_000, "coalesced: {rows} rows for 5,000 views");
    let dupes: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT shard, seq FROM page_views_per_second GROUP BY 1, 2 HAVING count(*) > 1) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dupes, 0);
}

/// Case 4: alerts grouped into one digest per group, posted to chat and kept in a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alert_digests_to_chat_and_file() {
    let (url, got) = webhook().await;
    let streams = case("alert-digest").replace("https://chat.internal/hooks/alerts", &url).replace("\"1m\"", "\"1s\"");
    let (cluster, client) = start(&streams, &[]).await;
    let mut producer = client.producer();
    // 3 groups, each firing the same 4 alerts five times over.
    for _ in 0..5 {
        let events = (0..3)
            .flat_map(|g| (0..4).map(move |a| event("alert-groups", &format!("team-{g}"), format!("alert-{a}"))))
            .collect();
        assert!(producer.send(events).await.unwrap().all_acked());
    }
    let digests = |got: &[serde_json::Value]| -> Vec<serde_json::Value> {
        got.iter().flat_map(|b| b["outputs"].as_array().cloned().unwrap_or_default()).collect()
    };
    wait_until("digests posted", &cluster, Duration::from_secs(30), async || {
        let d = digests(&got.lock().unwrap());
        d.iter().map(|o| o["inputs"].as_u64().unwrap()).sum::<u64>() == 60
    })
    .await;
    for d in digests(&got.lock().unwrap()) {
        let members = d["value"].as_array().unwrap();
        assert!(members.len() <= 4, "distinct alerts only: {d}");
    }
    // The file sink is delivered by its own worker: it may trail the webhook.
    let lines = || -> usize {
        (0..3)
            .map(|i| {
                let path = cluster.path().join(format!("data-{i}/digests-coalesce-{i}.jsonl"));
                std::fs::read_to_string(path).unwrap_or_default().lines().count()
            })
            .sum()
    };
    wait_until("digests kept in the nodes' files", &cluster, Duration::from_secs(30), async || lines() >= 3).await;
    assert!(lines() >= 3, "digests kept in the nodes' files: {}", lines());
}
