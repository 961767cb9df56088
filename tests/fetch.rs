//! Request coalescing across the cluster (the `Fetch` RPC) against real processes and a local
//! upstream HTTP server that counts its calls: concurrent callers on every node share one
//! upstream call per key; callers during the settle delay join it; a caller that goes away
//! cancels nothing for the others (and the last one leaving during the delay cancels the
//! call); the shared rate limit holds under a burst; a leader SIGKILL while callers wait still
//! answers every one of them; a leader SIGSTOPped and replaced while its flight settles calls
//! nothing and answers nothing once it resumes.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use coalesce_proto::v1 as pb;
use harness::Cluster;

/// The upstream: `GET /accounts/{key}` answers `{"key": .., "call": n}` after `delay`;
/// `missing-*` keys get a 404.
#[derive(Default)]
struct Upstream {
    calls: Mutex<BTreeMap<String, Vec<Instant>>>,
    delay: Duration,
}

impl Upstream {
    fn calls(&self, key: &str) -> usize {
        self.calls.lock().unwrap().get(key).map_or(0, Vec::len)
    }

    fn total(&self) -> usize {
        self.calls.lock().unwrap().values().map(Vec::len).sum()
    }
}

async fn account(
    State(up): State<Arc<Upstream>>,
    Path(key): Path<String>,
) -> (axum::http::StatusCode, [(&'static str, &'static str); 1], String) {
    let n = {
        let mut calls = up.calls.lock().unwrap();
        let v = calls.entry(key.clone()).or_default();
        v.push(Instant::now());
        v.len()
    };
    tokio::time::sleep(up.delay).await;
    let status = if key.starts_with("missing-") { 404 } else { 200 };
    let code = axum::http::StatusCode::from_u16(status).unwrap();
    (code, [("content-type", "application/json")], serde_json::json!({ "key": key, "call": n }).to_string())
}

async fn upstream(delay: Duration) -> (Arc<Upstream>, String) {
    let state = Arc::new(Upstream { delay, ..Default::default() });
    let app = axum::Router::new().route("/accounts/{key}", axum::routing::get(account)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/accounts/{{key}}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, url)
}

/// A streams file with one `accounts` stream fetching from `url`; `fetch` adds settings.
fn streams(url: &str, fetch: &str) -> String {
    format!(
        "[streams.accounts]\nmerge = \"latest\"\nwindow = {{ tumbling = \"1s\" }}\n\n\
         [streams.accounts.fetch]\nurl = \"{url}\"\ntimeout = \"5s\"\n{fetch}\n"
    )
}

async fn fetch(cluster: &Cluster, node: usize, key: &str) -> Result<pb::FetchResponse, tonic::Status> {
    let req = pb::FetchRequest { stream: "accounts".into(), key: key.into() };
    cluster.client(node).fetch(req).await.map(tonic::Response::into_inner)
}

/// A client of node `i` without the harness's 5 s timeout (calls here may wait longer).
async fn patient_client(cluster: &Cluster, i: usize) -> pb::coalesce_client::CoalesceClient<tonic::transport::Channel> {
    let addr = format!("http://{}", cluster.local.nodes[i].client_addr);
    pb::coalesce_client::CoalesceClient::connect(addr).await.unwrap()
}

fn body(r: &pb::FetchResponse) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_callers_on_three_nodes_make_one_call_per_key() {
    let (up, url) = upstream(Duration::from_millis(300)).await;
    let cluster = Cluster::start(3, 3, &streams(&url, "settle = \"200ms\""));
    cluster.wait_ready(Duration::from_secs(60)).await;
    let cluster = Arc::new(cluster);
    let callers: Vec<_> = (0..200)
        .map(|i| {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let key = format!("acct-{}", i % 10);
                (key.clone(), fetch(&cluster, i % 3, &key).await)
            })
        })
        .collect();
    for c in callers {
        let (key, r) = c.await.unwrap();
        let r = r.unwrap_or_else(|e| panic!("{key}: {e:?}"));
        assert_eq!((r.status, r.content_type.as_str()), (200, "application/json"));
        assert_eq!(body(&r), serde_json::json!({ "key": key, "call": 1 }));
        assert!(r.shared && !r.cached, "{key}: {r:?}");
        assert!(r.epoch.is_some_and(|e| e.term > 0), "the answering leader's epoch");
    }
    for k in 0..10 {
        assert_eq!(up.calls(&format!("acct-{k}")), 1, "acct-{k}");
    }
    assert_eq!(up.total(), 10);

    // Any HTTP answer is a result; an unknown stream or a stream without fetch is refused.
    let missing = fetch(&cluster, 1, "missing-1").await.unwrap();
    assert_eq!((missing.status, missing.shared), (404, false));
    let err = cluster.client(0).fetch(pb::FetchRequest { stream: "nope".into(), key: "k".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let err = fetch(&cluster, 2, "").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // coalescectl fetch: the body on stdout, status and sharing on stderr.
    let ctl = std::path::Path::new(harness::COALESCED).with_file_name("coalescectl");
    let out = tokio::process::Command::new(&ctl)
        .args(["--addr", &cluster.local.nodes[2].client_addr, "fetch", "--stream", "accounts", "--key", "acct-77"])
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["key"], "acct-77");
    assert!(stderr.contains("HTTP 200 application/json") && stderr.contains("shared false"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settle_delay_joins_late_callers_and_a_cancelled_caller_cancels_nothing() {
    let (up, url) = upstream(Duration::from_millis(50)).await;
    let cluster = Arc::new(Cluster::start(3, 3, &streams(&url, "settle = \"1500ms\"\nttl = \"2s\"")));
    cluster.wait_ready(Duration::from_secs(60)).await;

    // Callers 500 ms apart, on different nodes, all inside one settle delay: one call.
    let started = Instant::now();
    let mut waiting = Vec::new();
    for i in 0..3 {
        let cluster = cluster.clone();
        waiting.push(tokio::spawn(async move { fetch(&cluster, i, "settling").await }));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for w in waiting {
        let r = w.await.unwrap().unwrap();
        assert_eq!(body(&r)["call"], 1);
    }
    assert!(started.elapsed() >= Duration::from_millis(1500), "answered only after the settle delay");
    assert_eq!(up.calls("settling"), 1);
    // Within the TTL: from the cache.
    let cached = fetch(&cluster, 1, "settling").await.unwrap();
    assert!(cached.cached && cached.shared && body(&cached)["call"] == 1, "{cached:?}");

    // A caller that gives up (its deadline passes during the delay) cancels nothing for a
    // caller on another node that waits.
    let impatient = {
        let mut req = tonic::Request::new(pb::FetchRequest { stream: "accounts".into(), key: "k2".into() });
        req.set_timeout(Duration::from_millis(300));
        let mut client = cluster.client(0);
        tokio::spawn(async move { client.fetch(req).await })
    };
    let patient = {
        let cluster = cluster.clone();
        tokio::spawn(async move { fetch(&cluster, 1, "k2").await })
    };
    let gave_up = impatient.await.unwrap().unwrap_err();
    assert!(matches!(gave_up.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{gave_up:?}");
    let r = patient.await.unwrap().unwrap();
    assert_eq!(body(&r)["call"], 1);
    assert_eq!(up.calls("k2"), 1);

    // The only caller leaving during the delay cancels the call.
    let mut req = tonic::Request::new(pb::FetchRequest { stream: "accounts".into(), key: "k3".into() });
    req.set_timeout(Duration::from_millis(300));
    let gave_up = cluster.client(2).fetch(req).await.unwrap_err();
    assert!(matches!(gave_up.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{gave_up:?}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(up.calls("k3"), 0, "nobody waited: the upstream was never called");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shared_rate_limit_holds_under_a_burst() {
    const RATE: usize = 6;
    let (up, url) = upstream(Duration::ZERO).await;
    let text = format!(
        "[sinks.api]\nkind = \"http\"\nurl = \"{}\"\nrate_limit = {RATE}\n\n{}",
        url.replace("{key}", "hook"),
        streams(&url, "rate_limit_sink = \"api\"")
    );
    let cluster = Arc::new(Cluster::start(3, 3, &text));
    cluster.wait_ready(Duration::from_secs(60)).await;
    let burst: Vec<_> = (0..24)
        .map(|i| {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let req = pb::FetchRequest { stream: "accounts".into(), key: format!("burst-{i}") };
                patient_client(&cluster, i % 3).await.fetch(req).await.map(tonic::Response::into_inner)
            })
        })
        .collect();
    for b in burst {
        assert_eq!(b.await.unwrap().unwrap().status, 200);
    }
    let mut times: Vec<Instant> = up.calls.lock().unwrap().values().flatten().copied().collect();
    times.sort();
    assert_eq!(times.len(), 24);
    let most = (0..times.len())
        .map(|i| times[i..].iter().take_while(|t| **t < times[i] + Duration::from_secs(1)).count())
        .max()
        .unwrap();
    assert!(most <= RATE, "{most} upstream calls within one second, the ceiling is {RATE}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_kill_during_the_call_still_answers_every_caller() {
    let seed = harness::seed();
    let (up, url) = upstream(Duration::from_millis(50)).await;
    let mut cluster = Cluster::start(3, 3, &streams(&url, "settle = \"1s\""));
    let leaders = cluster.wait_ready(Duration::from_secs(60)).await;
    // A key whose shard leader is chosen by the seed; callers on the other two nodes.
    let key = format!("acct-{seed}");
    let shard = coalesce_core::hash::shard_for("accounts", &key, 3);
    let leader = cluster.index_of(&leaders[&shard]).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let mut waiting = Vec::new();
    for i in 0..20 {
        let mut client = patient_client(&cluster, others[i % 2]).await;
        let req = pb::FetchRequest { stream: "accounts".into(), key: key.clone() };
        waiting.push(tokio::spawn(async move { client.fetch(req).await.map(tonic::Response::into_inner) }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(leader);
    for w in waiting {
        let r = w.await.unwrap().unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
        assert_eq!(r.status, 200);
        assert_ne!(r.epoch.unwrap().node, 0);
    }
    assert!(up.calls(&key) >= 1);
}

/// Issue 23 item 9 (fencing): the key's leader is SIGSTOPped while its flight settles, with a
/// caller on its own node and one forwarded from another node; a successor is elected and
/// answers a Fetch; then the old leader resumes (and more callers ask it at once). It must not
/// call the upstream after it resumes, and no caller may get an answer with its old epoch: one
/// upstream call for the whole episode (the TTL keeps the successor's answer for the retries;
/// the successor is made the shard's preferred leader so that it keeps the shard), and every
/// answer is the successor's, with its epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_calls_nothing_and_answers_nothing_after_it_resumes() {
    let seed = harness::seed();
    let (up, url) = upstream(Duration::from_millis(50)).await;
    let cluster = Arc::new(Cluster::start(3, 3, &streams(&url, "settle = \"1500ms\"\nttl = \"60s\"")));
    let leaders = cluster.wait_ready(Duration::from_secs(60)).await;
    let key = format!("acct-{seed}");
    let shard = coalesce_core::hash::shard_for("accounts", &key, 3);
    let zombie = cluster.index_of(&leaders[&shard]).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != zombie).collect();

    // One caller on the leader's own node, one whose node passes the call to the leader.
    let mut waiting = Vec::new();
    for node in [zombie, others[seed as usize % 2]] {
        let mut client = patient_client(&cluster, node).await;
        let req = pb::FetchRequest { stream: "accounts".into(), key: key.clone() };
        waiting.push((node, tokio::spawn(async move { client.fetch(req).await.map(tonic::Response::into_inner) })));
    }
    // Inside the 1.5 s settle delay: the flight waits, nothing is called yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.signal(zombie, "STOP");
    assert_eq!(up.calls(&key), 0, "seed {seed}: the pause began before the upstream call");

    // A successor (a node that reports itself as the shard's leader), then a Fetch on it.
    let t = Instant::now();
    let successor = loop {
        let mut found = None;
        for &i in &others {
            if let Some(st) = cluster.status(i).await
                && st.local_shards.iter().any(|s| s.shard == shard && s.leader == cluster.local.nodes[i].name)
            {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "seed {seed}: no successor while the leader is paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Keep the shard there: balancing would hand it back to the old leader once it resumes, in
    // a new epoch that may rightly call the upstream again.
    let name = cluster.local.nodes[successor].name.clone();
    let mut admin =
        pb::admin_client::AdminClient::connect(format!("http://{}", cluster.local.nodes[successor].client_addr))
            .await
            .unwrap();
    let pinned = admin.transfer_leader(pb::TransferLeaderRequest { shard, to: name.clone(), reset: false }).await;
    assert_eq!(pinned.unwrap().into_inner().leader, name, "seed {seed}");
    let req = pb::FetchRequest { stream: "accounts".into(), key: key.clone() };
    let first = patient_client(&cluster, successor).await.fetch(req).await.unwrap().into_inner();
    let epoch = first.epoch.unwrap();
    assert_eq!((first.status, body(&first)["call"].as_u64()), (200, Some(1)), "seed {seed}: {first:?}");
    assert_eq!(up.calls(&key), 1, "seed {seed}: the successor called once");
    // The caller whose node passed its Fetch to the paused leader is answered by the successor
    // while the old leader is still paused: its node gives up on the old leader as soon as it
    // learns of the election (it held on for the whole per-attempt timeout, ~12 s, before).
    let (node, forwarded) = waiting.remove(1);
    let early = tokio::time::timeout(Duration::from_secs(5), forwarded)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the forwarded caller waited on the paused leader"))
        .unwrap()
        .unwrap_or_else(|e| panic!("seed {seed}: forwarded caller on node {node}: {e:?}"));
    let mut answers = vec![(node, early)];

    // The old leader resumes; callers ask it right away, besides the one that waited on it.
    let resumed = Instant::now();
    cluster.signal(zombie, "CONT");
    for _ in 0..5 {
        let mut client = patient_client(&cluster, zombie).await;
        let req = pb::FetchRequest { stream: "accounts".into(), key: key.clone() };
        waiting.push((zombie, tokio::spawn(async move { client.fetch(req).await.map(tonic::Response::into_inner) })));
    }
    for (node, w) in waiting {
        let r = tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a caller on node {node} got no answer"))
            .unwrap()
            .unwrap_or_else(|e| panic!("seed {seed}: caller on node {node}: {e:?}"));
        answers.push((node, r));
    }
    let calls = up.calls.lock().unwrap().get(&key).cloned().unwrap_or_default();
    let late: Vec<Duration> = calls.iter().filter(|c| **c >= resumed).map(|c| c.duration_since(resumed)).collect();
    assert!(late.is_empty(), "seed {seed}: upstream calls {late:?} after the old leader resumed");
    assert_eq!(calls.len(), 1, "seed {seed}: one upstream call for the key in the whole episode");
    for (node, r) in answers {
        assert_eq!(r.epoch, Some(epoch), "seed {seed}: caller on node {node} got another epoch than the successor's");
        assert_eq!((r.status, body(&r)), (200, body(&first)), "seed {seed}: caller on node {node}");
    }
    let deposed = cluster.metric("coalesce_fetch_requests_total{stream=\"accounts\",origin=\"deposed\"}").await;
    eprintln!("callers the resumed leader refused and sent to its successor: {deposed:?} (seed {seed})");
}

/// The event → fetch bridge (`on_window_close`): an account-change stream whose closed windows
/// are fetched once per key and delivered as the fetched document; a 404 is refused into the
/// dead-letter queue. A Fetch caller of the same key during the delivery shares the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed_windows_deliver_the_fetched_answer() {
    let (up, url) = upstream(Duration::from_millis(20)).await;
    let text = format!(
        "[sinks.lines]\nkind = \"file\"\npath = \"../outputs-{{node}}.jsonl\"\n\n\
         [streams.accounts]\nmerge = \"latest\"\nwindow = {{ tumbling = \"300ms\" }}\nsinks = [\"lines\"]\n\n\
         [streams.accounts.fetch]\nurl = \"{url}\"\non_window_close = true\n"
    );
    let cluster = Cluster::start(3, 3, &text);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = coalesce_client::Client::connect(addrs).await.unwrap();
    let mut producer = client.producer();
    // Five changes per account (one window each, at most a few): one fetch per closed window.
    let keys: Vec<String> = (0..20).map(|i| format!("acct-{i}")).chain(["missing-1".to_owned()]).collect();
    let events =
        keys.iter().flat_map(|k| (0..5).map(move |v| coalesce_client::event("accounts", k, v as i64))).collect();
    assert!(producer.send(events).await.unwrap().all_acked());

    let deadline = Instant::now() + Duration::from_secs(30);
    let delivered = loop {
        let outputs: Vec<serde_json::Value> = (0..3)
            .flat_map(|i| std::fs::read_to_string(cluster.path().join(format!("outputs-coalesce-{i}.jsonl"))).ok())
            .flat_map(|t| t.lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<serde_json::Value>>())
            .collect();
        let letters = cluster_dead_letters(&cluster).await;
        if outputs.len() >= 20 && !letters.is_empty() {
            assert_eq!(letters.len(), 1);
            assert!(letters[0].reason.contains("fetch accounts/missing-1: HTTP 404"), "{:?}", letters[0]);
            break outputs;
        }
        assert!(Instant::now() < deadline, "{} outputs, {} dead letters", outputs.len(), letters.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for o in &delivered {
        let key = o["key"].as_str().unwrap();
        assert!(key.starts_with("acct-"), "{o}");
        assert_eq!(o["value"]["key"], key, "the fetched document, not the merged value: {o}");
    }
    // At least one call per delivered window (a batch split to isolate the refused output
    // fetches its other keys again).
    let mut windows: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &delivered {
        *windows.entry(o["key"].as_str().unwrap()).or_default() += 1;
    }
    assert_eq!(windows.len(), 20);
    for (key, n) in windows {
        assert!(up.calls(key) >= n, "{key}: {} calls for {n} windows", up.calls(key));
    }
}

async fn cluster_dead_letters(cluster: &Cluster) -> Vec<pb::DeadLetter> {
    let addr = format!("http://{}", cluster.local.nodes[0].client_addr);
    let mut admin = pb::admin_client::AdminClient::connect(addr).await.unwrap();
    admin
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .map(|r| r.into_inner().letters)
        .unwrap_or_default()
}
