//! Shard Leases published by real `coalesced` processes to a fake Kubernetes API server
//! (`coalesce_server::k8s_fake`, served over HTTP; the nodes find it through `KUBECONFIG`).
//!
//! - Every shard's Lease names its Raft leader, and is renewed.
//! - A leader SIGKILL: the new leader takes the Lease over (holder changes, leaseTransitions
//!   +1, a new acquireTime) within a few seconds.
//! - An API-server outage never stops ingest: events are acknowledged while every Lease write
//!   fails, the failures are counted in `/metrics`, and the Leases are current again once the
//!   API server heals.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use coalesce_proto::v1 as pb;
use coalesce_server::k8s_fake::{FakeApiServer, Fault};
use harness::Cluster;
use k8s_openapi::api::coordination::v1::Lease;

const NS: &str = "coalesce-test";
const STREAMS: &str = "[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"200ms\" }\n";

fn holders(fake: &FakeApiServer) -> BTreeMap<u32, (String, Lease)> {
    fake.leases()
        .into_iter()
        .filter(|((ns, _), _)| ns == NS)
        .map(|((_, name), l)| {
            let shard: u32 = name.strip_prefix("test-shard-").unwrap().parse().unwrap();
            (shard, (l.spec.clone().unwrap().holder_identity.unwrap(), l))
        })
        .collect()
}

async fn until<T>(what: &str, within: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn lease_failures(http: &reqwest::Client, addr: &str) -> u64 {
    let text = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("coalesce_k8s_lease_write_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_follow_raft_leadership_and_an_api_outage_never_stops_ingest() {
    let fake = FakeApiServer::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let (stop_api, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(fake.clone().serve(listener, async move {
        let _ = stopped.await;
    }));

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{api}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
             user: fake\n    namespace: {NS}\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let env = [("KUBECONFIG".to_owned(), kubeconfig.display().to_string())];
    let extra = "[kubernetes]\nleases = true\nrenew_interval = \"300ms\"\nrequest_timeout = \"500ms\"\n";
    let mut cluster = Cluster::start_env(dir, 3, 4, STREAMS, extra, &env);
    let leaders = cluster.wait_ready(Duration::from_secs(30)).await;

    // Every shard's Lease names its Raft leader.
    let leases = until("every Lease names its Raft leader", Duration::from_secs(15), async || {
        let leaders = cluster.leaders().await;
        let h = holders(&fake);
        (leaders.len() == 4 && h.len() == 4 && h.iter().all(|(s, (holder, _))| leaders.get(s) == Some(holder)))
            .then_some(h)
    })
    .await;
    for (shard, (holder, l)) in &leases {
        let spec = l.spec.as_ref().unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(1), "shard {shard}: max(600 ms, 3 x 300 ms) rounded up");
        assert!(spec.acquire_time.is_some() && spec.renew_time.is_some(), "shard {shard}");
        assert_eq!(l.metadata.labels.as_ref().unwrap()["coalesce.io/shard"], shard.to_string());
        assert!(leaders.values().any(|l| l == holder));
    }
    // Renewed while held.
    let (shard, (holder, first)) = leases.iter().next().map(|(s, v)| (*s, v.clone())).unwrap();
    until("a Lease is renewed", Duration::from_secs(5), async || {
        let (h, now) = holders(&fake).remove(&shard)?;
        let renewed = now.spec.as_ref()?.renew_time > first.spec.as_ref()?.renew_time;
        (h == holder && renewed).then_some(())
    })
    .await;

    // Kill that shard's leader: the new leader takes the Lease over.
    let victim = cluster.index_of(&holder).unwrap();
    let before = first.spec.clone().unwrap();
    cluster.kill(victim);
    let killed = Instant::now();
    let (new_holder, taken) = until("the new leader takes the Lease over", Duration::from_secs(10), async || {
        let (h, l) = holders(&fake).remove(&shard)?;
        (h != holder).then_some((h, l))
    })
    .await;
    eprintln!("Lease of shard {shard}: {holder} -> {new_holder} {:?} after the kill", killed.elapsed());
    let spec = taken.spec.unwrap();
    assert_eq!(spec.lease_transitions, Some(before.lease_transitions.unwrap_or(0) + 1));
    assert!(spec.acquire_time > before.acquire_time);
    assert_eq!(cluster.leaders().await.get(&shard), Some(&new_holder), "the Lease follows Raft");
    cluster.spawn(victim);
    cluster.wait_ready(Duration::from_secs(30)).await;

    // API-server outage: ingest goes on, failures are counted.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let survivor = (victim + 1) % 3;
    let survivor_http = cluster.local.nodes[survivor].http_addr.clone();
    let failures_before = lease_failures(&http, &survivor_http).await;
    fake.set_fault(Some(Fault::Status(503)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut client = cluster.client(survivor);
    let mut acked = 0;
    for seq in 1..=20u64 {
        let events = (0..10).map(|k| harness::sum_event("sums", &format!("k{k}"), 1, (seq - 1) * 10 + k + 1)).collect();
        let started = Instant::now();
        let mut last = None;
        loop {
            assert!(started.elapsed() < Duration::from_secs(10), "ingest stalled during the API outage: {last:?}");
            let r = client.ingest(pb::IngestRequest { producer_id: 77, events: Clone::clone(&events) }).await;
            // DUPLICATE: an earlier attempt of these seqs was applied.
            if let Ok(ok) = &r
                && ok.get_ref().statuses.iter().all(|s| coalesce_client::is_acked(s.code))
            {
                acked += 10;
                break;
            }
            eprintln!("attempt: {r:?}");
            last = Some(r);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(acked, 200, "every event acknowledged while the API server fails");
    let failures = until("Lease write failures are counted", Duration::from_secs(10), async || {
        let n = lease_failures(&http, &survivor_http).await;
        (n > failures_before).then_some(n)
    })
    .await;
    eprintln!("Lease write failures on {survivor_http}: {failures_before} -> {failures}");

    // Healed: every Lease names its leader again and is renewed after the outage.
    let healed_at = k8s_openapi::jiff::Timestamp::now();
    fake.set_fault(None);
    until("Leases are current again after the outage", Duration::from_secs(15), async || {
        let leaders = cluster.leaders().await;
        let h = holders(&fake);
        let current = h.iter().all(|(s, (holder, l))| {
            leaders.get(s) == Some(holder)
                && l.spec.as_ref().and_then(|s| s.renew_time.as_ref()).is_some_and(|t| t.0 > healed_at)
        });
        (leaders.len() == 4 && h.len() == 4 && current).then_some(())
    })
    .await;
    let _ = stop_api.send(());
}
