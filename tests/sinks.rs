//! Sinks against a 3-node cluster of real `coalesced` processes.
//!
//! HTTP: a local webhook records every request. A burst of outputs is delivered one request
//! per output under a cluster-wide ceiling of 20 requests/s, which must hold in every
//! 1-second window the server sees; 503 and 429 answers are retried; 422 answers put the
//! output in the dead-letter queue, from where it is replayed once the server accepts it.
//! The JSON-lines file sink receives every output as well.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use coalesce_client::{Client, event};
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::admin_client::AdminClient;
use harness::Cluster;

const RATE: usize = 20;

#[derive(Default)]
struct Hook {
    /// (arrival, key, status answered)
    requests: Mutex<Vec<(Instant, String, u16)>>,
    attempts: Mutex<BTreeMap<String, u32>>,
    /// Accepted outputs: (shard, seq) → (key, value)
    accepted: Mutex<BTreeMap<(u32, u64), (String, serde_json::Value)>>,
    accept_all: AtomicBool,
}

async fn hook(
    State(h): State<Arc<Hook>>,
    headers: HeaderMap,
    body: axum::Json<serde_json::Value>,
) -> (StatusCode, HeaderMap) {
    let at = Instant::now();
    let outputs = body["outputs"].as_array().cloned().unwrap_or_default();
    assert_eq!(outputs.len(), 1, "batch_max = 1: one output per request");
    let o = &outputs[0];
    let key = o["key"].as_str().unwrap().to_owned();
    let (shard, seq) = (o["shard"].as_u64().unwrap() as u32, o["seq"].as_u64().unwrap());
    let cluster = headers["coalesce-cluster"].to_str().unwrap();
    assert_eq!(cluster.len(), 32, "the cluster id: {cluster:?}");
    assert_eq!(headers["idempotency-key"].to_str().unwrap(), format!("{cluster}-hook-{shard}-{seq}-{seq}"));
    let attempt = {
        let mut a = h.attempts.lock().unwrap();
        let n = a.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let mut reply = HeaderMap::new();
    let status = if h.accept_all.load(Ordering::SeqCst) {
        StatusCode::OK
    } else if key.starts_with("bad-") {
        StatusCode::UNPROCESSABLE_ENTITY
    } else if key.starts_with("flaky-") && attempt == 1 {
        StatusCode::SERVICE_UNAVAILABLE
    } else if key.starts_with("flaky-") && attempt == 2 {
        reply.insert("retry-after", "0".parse().unwrap());
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::OK
    };
    if status == StatusCode::OK {
        h.accepted.lock().unwrap().insert((shard, seq), (key.clone(), o["value"].clone()));
    }
    h.requests.lock().unwrap().push((at, key, status.as_u16()));
    (status, reply)
}

/// The most requests that arrived within any window of one second.
fn max_per_second(times: &[Instant]) -> usize {
    let mut t = times.to_vec();
    t.sort();
    (0..t.len()).map(|i| t[i..].iter().take_while(|x| **x < t[i] + Duration::from_secs(1)).count()).max().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_rate_limit_retries_dead_letters_and_file_sink() {
    let state = Arc::new(Hook::default());
    let app = axum::Router::new().route("/hook", axum::routing::post(hook)).with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let streams = format!(
        "[sinks.hook]\nkind = \"http\"\nurl = \"{url}\"\nrate_limit = {RATE}\nbatch_max = 1\nretry_initial = \"50ms\"\n\
         headers = {{ authorization = \"Bearer s3cret\" }}\n\n\
         [sinks.lines]\nkind = \"file\"\npath = \"../outputs-{{node}}.jsonl\"\n\n\
         [streams.accounts]\nmerge = \"latest\"\nwindow = {{ tumbling = \"200ms\" }}\nsinks = [\"hook\", \"lines\"]\n"
    );
    let cluster = Cluster::start(3, 4, &streams);
    cluster.wait_ready(Duration::from_secs(60)).await;

    // A subscriber may not take a push sink's name (it would ack the sink's cursor).
    let err = cluster
        .client(0)
        .subscribe(pb::SubscribeRequest { consumer: "hook".into(), shards: vec![], from_seq: Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // A burst: 100 good, 10 flaky, 10 bad accounts, all at once.
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect(addrs).await.unwrap();
    let mut producer = client.producer();
    let keys: Vec<String> = (0..100)
        .map(|i| format!("acct-{i}"))
        .chain((0..10).map(|i| format!("flaky-{i}")))
        .chain((0..10).map(|i| format!("bad-{i}")))
        .collect();
    let events = keys.iter().enumerate().map(|(i, k)| event("accounts", k, i as i64)).collect();
    let report = producer.send(events).await.unwrap();
    assert!(report.all_acked(), "{:?}", report.failures().collect::<Vec<_>>());

    // Everything but the bad accounts arrives, retried where the server said so.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: BTreeSet<String> = state.accepted.lock().unwrap().values().map(|(k, _)| k.clone()).collect();
        let dlq = list_dead_letters(&cluster).await;
        if got.len() == 110 && dlq.len() == 10 {
            break;
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!("delivered {} of 110, {} dead letters of 10", got.len(), dlq.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    {
        let accepted = state.accepted.lock().unwrap();
        for (key, value) in accepted.values() {
            let i = keys.iter().position(|k| k == key).unwrap();
            assert_eq!(value, &serde_json::json!(i), "{key} carries its latest value");
        }
        let attempts = state.attempts.lock().unwrap();
        for i in 0..10 {
            assert!(attempts[&format!("flaky-{i}")] >= 3, "503 and 429 were retried: {attempts:?}");
            assert_eq!(attempts[&format!("bad-{i}")], 1, "a 422 is not retried");
        }
    }
    let times: Vec<Instant> = state.requests.lock().unwrap().iter().map(|r| r.0).collect();
    let peak = max_per_second(&times);
    eprintln!("{} requests, at most {peak} in any second (ceiling {RATE})", times.len());
    assert!(peak <= RATE, "the cluster-wide ceiling holds in every 1-second window: {peak} > {RATE}");
    assert!(times.len() >= 140, "every output and every retry is a request: {}", times.len());

    // The dead letters name the sink, the output and the reason.
    let letters = list_dead_letters(&cluster).await;
    let bad: BTreeSet<String> = letters.iter().map(|l| l.output.as_ref().unwrap().key.clone()).collect();
    assert_eq!(bad, (0..10).map(|i| format!("bad-{i}")).collect());
    assert!(letters.iter().all(|l| l.sink == "hook" && l.reason.starts_with("HTTP 422")), "{letters:?}");

    // Replay them on each shard's leader once the server accepts them.
    state.accept_all.store(true, Ordering::SeqCst);
    let leaders = cluster.wait_ready(Duration::from_secs(10)).await;
    let shards: BTreeSet<u32> = letters.iter().map(|l| l.output.as_ref().unwrap().shard).collect();
    let mut replayed = 0;
    for shard in shards {
        let i = cluster.index_of(&leaders[&shard]).unwrap();
        let r = admin(&cluster, i)
            .replay_dead_letters(pb::ReplayDeadLettersRequest { sink: "hook".into(), shard, seqs: vec![], all: true })
            .await
            .unwrap()
            .into_inner();
        assert!(r.refused.is_empty(), "{r:?}");
        replayed += r.delivered;
        // A follower refuses, pointing at the leader.
        let follower = (i + 1) % 3;
        let err = admin(&cluster, follower)
            .replay_dead_letters(pb::ReplayDeadLettersRequest { sink: "hook".into(), shard, seqs: vec![], all: true })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert_eq!(
            err.metadata().get("coalesce-leader").unwrap().to_str().unwrap(),
            cluster.local.nodes[i].client_addr
        );
    }
    assert_eq!(replayed, 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !list_dead_letters(&cluster).await.is_empty() {
        assert!(Instant::now() < deadline, "replayed letters leave the queue on every replica");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got: BTreeSet<String> = state.accepted.lock().unwrap().values().map(|(k, _)| k.clone()).collect();
    assert_eq!(got.len(), 120, "after the replay every account arrived");

    // Unknown sinks and bad selections are named.
    let err = admin(&cluster, 0)
        .purge_dead_letters(pb::PurgeDeadLettersRequest { sink: "nope".into(), shard: 0, seqs: vec![], all: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = admin(&cluster, 0)
        .purge_dead_letters(pb::PurgeDeadLettersRequest { sink: "hook".into(), shard: 0, seqs: vec![1], all: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // The file sink: every output, each (shard, seq) once after dedupe, in the nodes' files.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen: BTreeMap<(u64, u64), String> = BTreeMap::new();
        for i in 0..3 {
            let path = cluster.path().join(format!("outputs-coalesce-{i}.jsonl"));
            for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                seen.insert(
                    (v["shard"].as_u64().unwrap(), v["seq"].as_u64().unwrap()),
                    v["key"].as_str().unwrap().into(),
                );
            }
        }
        let keys_seen: BTreeSet<&String> = seen.values().collect();
        if seen.len() == 120 && keys_seen.len() == 120 {
            break;
        }
        assert!(Instant::now() < deadline, "file sink has {} outputs of 120", seen.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Counters per sink, summed over the nodes.
    let mut dead = 0;
    for i in 0..3 {
        let s = admin(&cluster, i).sink_status(pb::SinkStatusRequest {}).await.unwrap().into_inner();
        let hook = s.sinks.iter().find(|s| s.name == "hook").unwrap();
        assert_eq!(hook.kind, "http");
        dead += hook.dead_lettered;
    }
    assert_eq!(dead, 10);
    // Header values are secrets: never in the logs.
    for n in &cluster.local.nodes {
        assert!(!std::fs::read_to_string(&n.log).unwrap().contains("s3cret"), "{} logs a header value", n.name);
    }
    eprintln!("replay and checks took {:?}", started.elapsed());
}

fn admin(cluster: &Cluster, i: usize) -> AdminClient<tonic::transport::Channel> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", cluster.local.nodes[i].client_addr))
        .unwrap()
        .connect_lazy();
    AdminClient::new(ch)
}

/// Every dead letter, as node 0 (which replicates every shard here) holds them.
async fn list_dead_letters(cluster: &Cluster) -> Vec<pb::DeadLetter> {
    admin(cluster, 0)
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .map(|r| r.into_inner().letters)
        .unwrap_or_default()
}

/// Debounce with a max-wait cap (the failure Vector's `reduce` had): a key with steady traffic
/// — never quiet for the debounce — still flushes every max-wait, and an idle key flushes when
/// its debounce ends, with no new input. Checked on the leader stamps the outputs carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debounce_with_max_wait_flushes_steady_and_idle_keys() {
    let streams = "[sinks.watch]\nkind = \"grpc\"\n\n\
                   [streams.settle]\nmerge = \"latest\"\nwindow = { debounce = \"300ms\", max_wait = \"1s\" }\n\
                   sinks = [\"watch\"]\n";
    let cluster = Cluster::start(3, 2, streams);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect(addrs).await.unwrap();
    let mut producer = client.producer();
    let report = producer.send(vec![event("settle", "idle", 1i64)]).await.unwrap();
    assert!(report.all_acked());
    let mut sent = 0i64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        sent += 1;
        let report = producer.send(vec![event("settle", "steady", sent)]).await.unwrap();
        assert!(report.all_acked());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every output of both keys, from each shard's outbox (the `watch` subscriber never acks).
    let deadline = Instant::now() + Duration::from_secs(20);
    let outputs = loop {
        let mut all = Vec::new();
        let leaders = cluster.wait_ready(Duration::from_secs(10)).await;
        for (shard, leader) in &leaders {
            let i = cluster.index_of(leader).unwrap();
            let mut s = cluster
                .client(i)
                .subscribe(pb::SubscribeRequest {
                    consumer: "watch".into(),
                    shards: vec![*shard],
                    from_seq: Default::default(),
                })
                .await
                .unwrap()
                .into_inner();
            while let Ok(Ok(Some(batch))) = tokio::time::timeout(Duration::from_millis(300), s.message()).await {
                all.extend(batch.outputs);
            }
        }
        let steady_inputs: u64 = all.iter().filter(|o| o.key == "steady").map(|o| o.inputs).sum();
        if steady_inputs == sent as u64 && all.iter().any(|o| o.key == "idle") {
            break all;
        }
        assert!(Instant::now() < deadline, "outputs incomplete: {steady_inputs} of {sent} steady inputs");
    };
    let steady: Vec<_> = outputs.iter().filter(|o| o.key == "steady").collect();
    let (last, capped) = steady.split_last().unwrap();
    assert!(capped.len() >= 2, "steady traffic for 3.5 s flushed at max-wait at least twice: {steady:?}");
    for o in capped {
        assert_eq!(o.window_end - o.window_start, 1000, "closed by max-wait, 1 s after its first input: {o:?}");
        assert_eq!(o.reason, "time");
    }
    assert_eq!(last.window_end, last.last_input_at + 300, "the last window closed by debounce: {last:?}");
    let idle: Vec<_> = outputs.iter().filter(|o| o.key == "idle").collect();
    assert_eq!(idle.len(), 1);
    assert_eq!(idle[0].inputs, 1);
    assert_eq!(idle[0].window_end, idle[0].last_input_at + 300, "an idle key closes when its debounce ends: {idle:?}");
}

/// A consumer that stays behind bounds the outbox: past `[outbox] max_outputs` the leader refuses
/// new input with RESOURCE_EXHAUSTED naming the lagging consumer (never silently), and accepts
/// it again once the consumer acks. An undeclared name cannot create a cursor with an ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_consumer_bounds_the_outbox_loudly() {
    let streams = "[outbox]\nmax_outputs = 20\n\n[sinks.slow]\nkind = \"grpc\"\n\n\
                   [streams.events]\nmerge = \"count\"\nwindow = { tumbling = \"100ms\" }\nsinks = [\"slow\"]\n";
    let cluster = Cluster::start(3, 1, streams);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let mut api = cluster.client(0);
    let send = |keys: std::ops::Range<u32>| pb::IngestRequest {
        producer_id: 0,
        events: keys
            .map(|k| pb::Event { stream: "events".into(), key: format!("k{k}"), ..Default::default() })
            .collect(),
    };
    let r = api.ingest(send(0..30)).await.unwrap().into_inner();
    assert!(r.statuses.iter().all(|s| s.code == pb::EventCode::Ok as i32), "{r:?}");
    // 30 outputs once the window closes: more than the 20 the outbox may keep for `slow`.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let r = api.ingest(send(100..101)).await.unwrap().into_inner();
        let s = r.statuses[0].clone();
        if s.code == pb::EventCode::ResourceExhausted as i32 {
            break s;
        }
        assert!(Instant::now() < deadline, "input still accepted with a full outbox: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refused.reason, "outbox_full");
    assert!(refused.message.contains("\"slow\"") && refused.retry_after_ms > 0, "{refused:?}");
    // The consumer catches up: input is accepted again.
    let status = cluster.status(0).await.unwrap();
    let next_seq = status.local_shards[0].next_seq;
    let leader = cluster.index_of(&status.local_shards[0].leader).unwrap();
    cluster
        .client(leader)
        .ack(pb::AckRequest { consumer: "slow".into(), shard: 0, upto_seq: next_seq - 1 })
        .await
        .unwrap();
    let r = api.ingest(send(200..201)).await.unwrap().into_inner();
    assert_eq!(r.statuses[0].code, pb::EventCode::Ok as i32, "{r:?}");

    // A subscriber name nobody declared cannot create a cursor (which would hold the outbox the
    // same way, for ever): its ack is refused and ingest goes on.
    let e = cluster
        .client(leader)
        .ack(pb::AckRequest { consumer: "gone".into(), shard: 0, upto_seq: next_seq - 1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("\"gone\"") && e.message().contains("grpc"), "{e:?}");
    assert_eq!(cluster.metric("coalesce_api_acks_refused_total").await.iter().sum::<f64>(), 1.0);
    let r = api.ingest(send(300..330)).await.unwrap().into_inner();
    assert!(r.statuses.iter().all(|s| s.code == pb::EventCode::Ok as i32), "{r:?}");
    // `slow` keeps acking: input goes on; it stops, and the outbox stops input again.
    let r = ingest_while_slow_keeps_up(&cluster, leader, send(400..401), |s| s.code == pb::EventCode::Ok as i32).await;
    assert_eq!(r.code, pb::EventCode::Ok as i32);
    let again = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let s = api.ingest(send(600..630)).await.unwrap().into_inner().statuses[0].clone();
        if s.code == pb::EventCode::ResourceExhausted as i32 {
            break s;
        }
        assert!(Instant::now() < again, "input still accepted with a full outbox: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(refused.message.contains("\"slow\""), "{refused:?}");
}

/// Nobody can fill the disk with outputs nobody claims: a shard without any cursor (a stream
/// without sinks) keeps at most `[outbox] max_outputs` of them under sustained ingest — the
/// leader trims older ones through Raft, so every replica holds the same bounded outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outbox_nobody_claims_stays_within_its_retention() {
    const MAX: u64 = 40;
    let streams = format!(
        "[outbox]\nmax_outputs = {MAX}\nunclaimed_max_age = \"0s\"\n\n\
         [streams.events]\nmerge = \"count\"\nwindow = {{ tumbling = \"50ms\" }}\n"
    );
    let cluster = Cluster::start(3, 1, &streams);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let mut api = cluster.client(0);
    // (next_seq, outbox_low) of shard 0 on every node.
    let outboxes = || async {
        let mut all = Vec::new();
        for n in &cluster.local.nodes {
            let ch =
                tonic::transport::Channel::from_shared(format!("http://{}", n.client_addr)).unwrap().connect_lazy();
            let s = AdminClient::new(ch).shards(pb::ShardsRequest {}).await.unwrap().into_inner();
            let d = s.shards.iter().find(|d| d.shard == 0).unwrap();
            assert!(d.cursors.is_empty(), "no cursor: {:?}", d.cursors);
            all.push((d.next_seq, d.outbox_low));
        }
        all
    };
    let mut trimmed_while_ingesting = false;
    for round in 0..40 {
        let events = (0..30)
            .map(|k| pb::Event { stream: "events".into(), key: format!("r{round}-k{k}"), ..Default::default() })
            .collect();
        let r = api.ingest(pb::IngestRequest { producer_id: 0, events }).await.unwrap().into_inner();
        assert!(r.statuses.iter().all(|s| s.code == pb::EventCode::Ok as i32), "input is never refused: {r:?}");
        trimmed_while_ingesting |= outboxes().await.iter().any(|(_, low)| *low > 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(trimmed_while_ingesting, "the outbox was trimmed while input went on");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = outboxes().await;
        let done = all.iter().all(|(next, low)| *next == 1 + 40 * 30 && next - low <= MAX);
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "(next_seq, outbox_low) per node: {all:?}, want at most {MAX} kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let trimmed: f64 = cluster.metric("coalesce_outbox_unclaimed_trimmed_outputs_total").await.iter().sum();
    assert!(trimmed >= (40 * 30 - MAX) as f64, "trims counted: {trimmed}");
}

/// Acks everything for `slow` and sends `req` until its first status satisfies `done` (within
/// 20 s); returns that status.
async fn ingest_while_slow_keeps_up(
    cluster: &Cluster,
    leader: usize,
    req: pb::IngestRequest,
    done: impl Fn(&pb::EventStatus) -> bool,
) -> pb::EventStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = cluster.status(0).await.unwrap();
        let upto_seq = st.local_shards[0].next_seq - 1;
        let _ = cluster.client(leader).ack(pb::AckRequest { consumer: "slow".into(), shard: 0, upto_seq }).await;
        let s = cluster.client(0).ingest(req.clone()).await.unwrap().into_inner().statuses[0].clone();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "no change within 20 s: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Suppression visibility: alert-grouping streams keeping the first and the last 3 of the
/// inputs each digest folds. 10 alerts for one group, in 10 requests, become one output per
/// stream with `inputs == 10` and exactly the configured samples (value and event time), both
/// for subscribers and in the file sink's JSON lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alert_digests_carry_the_configured_samples() {
    let mut streams = String::from(
        "[sinks.watch]\nkind = \"grpc\"\n\n[sinks.digest-log]\nkind = \"file\"\npath = \"digests-{node}.jsonl\"\n\n",
    );
    for pick in ["first", "last"] {
        streams.push_str(&format!(
            "[streams.alerts-{pick}]\nmerge = {{ op = \"set_union\", max_members = 200 }}\n\
             window = {{ debounce = \"1s\", max_wait = \"30s\" }}\nsamples = {{ n = 3, pick = \"{pick}\" }}\n\
             sinks = [\"watch\", \"digest-log\"]\n\n"
        ));
    }
    let cluster = Cluster::start(3, 2, &streams);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect(addrs).await.unwrap();
    let mut producer = client.producer();
    for i in 0..10u64 {
        let batch = ["first", "last"]
            .iter()
            .map(|pick| {
                let mut e = event(&format!("alerts-{pick}"), "team-a", format!("alert-{i}"));
                e.event_time_ms = Some(1_000 + i);
                e
            })
            .collect();
        assert!(producer.send(batch).await.unwrap().all_acked());
    }

    // Both digests, from each shard's outbox (the `watch` subscriber never acks).
    let deadline = Instant::now() + Duration::from_secs(20);
    let outputs = loop {
        let all = watched(&cluster).await;
        if all.len() >= 2 {
            break all;
        }
        assert!(Instant::now() < deadline, "digests missing: {all:?}");
    };
    assert_eq!(outputs.len(), 2, "one digest per stream: {outputs:?}");
    for (pick, range) in [("first", 0..3u64), ("last", 7..10)] {
        let o = outputs.iter().find(|o| o.stream == format!("alerts-{pick}")).unwrap();
        assert_eq!(o.inputs, 10, "{o:?}");
        let got: Vec<(u64, String, bool)> =
            o.samples.iter().map(|s| (s.event_time, s.value_json.clone(), s.truncated)).collect();
        let want: Vec<(u64, String, bool)> = range.map(|i| (1_000 + i, format!("\"alert-{i}\""), false)).collect();
        assert_eq!(got, want, "{pick}: {o:?}");
    }

    // The file sink writes the same samples (`Output::to_json`).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines: Vec<serde_json::Value> = (0..3)
            .flat_map(|i| {
                let path = cluster.path().join(format!("data-{i}/digests-coalesce-{i}.jsonl"));
                let text = std::fs::read_to_string(path).unwrap_or_default();
                text.lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<_>>()
            })
            .collect();
        if let Some(line) = lines.iter().find(|l| l["stream"] == "alerts-last") {
            let samples: Vec<(u64, String)> = line["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["event_time"].as_u64().unwrap(), s["value"].as_str().unwrap().to_owned()))
                .collect();
            assert_eq!(samples, [(1_007, "alert-7".to_owned()), (1_008, "alert-8".into()), (1_009, "alert-9".into())]);
            assert_eq!(line["inputs"], 10);
            break;
        }
        assert!(Instant::now() < deadline, "no digest in the file sink: {lines:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every output of the `watch` subscriber, from each shard's leader (it never acks here).
async fn watched(cluster: &Cluster) -> Vec<pb::Output> {
    let mut all = Vec::new();
    for (shard, leader) in &cluster.wait_ready(Duration::from_secs(10)).await {
        let i = cluster.index_of(leader).unwrap();
        let mut s = cluster
            .client(i)
            .subscribe(pb::SubscribeRequest {
                consumer: "watch".into(),
                shards: vec![*shard],
                from_seq: Default::default(),
            })
            .await
            .unwrap()
            .into_inner();
        while let Ok(Ok(Some(batch))) = tokio::time::timeout(Duration::from_millis(300), s.message()).await {
            all.extend(batch.outputs);
        }
    }
    all
}

/// Load-adaptive windows: a durable consumer that does not ack makes the outbox backlog grow;
/// the adaptive stream's windows stretch (longer windows, fewer outputs than the same stream
/// with fixed windows, none longer than `max_staleness`), and once the consumer has caught up
/// the stretch goes back to zero (`coalesce_adaptive_extra_seconds`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adaptive_windows_stretch_under_backlog_and_relax_after() {
    let streams = "[sinks.watch]\nkind = \"grpc\"\n\n\
                   [streams.fixed]\nmerge = \"count\"\nwindow = { tumbling = \"200ms\" }\nsinks = [\"watch\"]\n\n\
                   [streams.stretchy]\nmerge = \"count\"\n\
                   window = { tumbling = \"200ms\", adaptive = { max_staleness = \"2s\", backlog_high = 4 } }\n\
                   sinks = [\"watch\"]\n";
    let cluster = Cluster::start(3, 2, streams);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect(addrs).await.unwrap();
    let mut producer = client.producer();
    let mut sent = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let batch =
            (0..10).flat_map(|k| ["fixed", "stretchy"].map(|s| event(s, &format!("k{k}"), ()))).collect::<Vec<_>>();
        assert!(producer.send(batch).await.unwrap().all_acked());
        sent += 10;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let outputs = loop {
        let all = watched(&cluster).await;
        let inputs = |s: &str| all.iter().filter(|o| o.stream == s).map(|o| o.inputs).sum::<u64>();
        if inputs("fixed") == sent && inputs("stretchy") == sent {
            break all;
        }
        assert!(Instant::now() < deadline, "outputs incomplete: {} {} of {sent}", inputs("fixed"), inputs("stretchy"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let of = |s: &str| outputs.iter().filter(|o| o.stream == s).collect::<Vec<_>>();
    let (fixed, stretchy) = (of("fixed"), of("stretchy"));
    for o in &fixed {
        assert!(o.window_end - o.window_start <= 200, "fixed windows keep their length: {o:?}");
    }
    let longest = stretchy.iter().map(|o| o.window_end - o.window_start).max().unwrap();
    assert!(longest > 200, "adaptive windows stretched under backlog: longest {longest} ms");
    assert!(longest <= 2_000, "never past max_staleness: {longest} ms");
    assert!(
        stretchy.len() < fixed.len(),
        "stretched windows coalesce more: {} outputs vs {} fixed",
        stretchy.len(),
        fixed.len()
    );

    // The consumer catches up: the stretch relaxes back to zero on every node.
    for (shard, leader) in &cluster.wait_ready(Duration::from_secs(10)).await {
        let upto = outputs.iter().filter(|o| o.shard == *shard).map(|o| o.seq).max().unwrap_or(0);
        let i = cluster.index_of(leader).unwrap();
        cluster
            .client(i)
            .ack(pb::AckRequest { consumer: "watch".into(), shard: *shard, upto_seq: upto })
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let extra = cluster.metric("coalesce_adaptive_extra_seconds{stream=\"stretchy\"}").await;
        if extra.len() == 3 && extra.iter().all(|e| *e == 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the stretch did not relax: {extra:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Sends one `count` event to each of `keys` keys of `stream` every 100 ms for `run`; returns
/// the events acked.
async fn steady_load(client: &Client, stream: &str, keys: usize, run: Duration) -> u64 {
    let mut producer = client.producer();
    let mut sent = 0;
    let started = Instant::now();
    while started.elapsed() < run {
        let tick = Instant::now();
        let batch = (0..keys).map(|k| event(stream, &format!("k{k}"), ())).collect::<Vec<_>>();
        let report = producer.send(batch).await.unwrap();
        assert!(report.all_acked(), "{:?}", report.failures().collect::<Vec<_>>());
        sent += keys as u64;
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed())).await;
    }
    sent
}

/// Issue 11's throttled-sink test. A webhook takes at most 200 outputs/s and answers 429
/// beyond. 200 keys written every 100 ms with 250 ms windows make 800 outputs/s: with fixed
/// windows the sink's backlog grows without bound; with adaptive windows (`max_staleness` 5 s)
/// the leader hears the 429s (sink_throttled), stretches the windows, and the backlog stops
/// growing while the outputs produced stay within the sink's capacity; no window outlives
/// `max_staleness`; when the throttle ends the windows return to 250 ms. Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_sink_bounds_the_adaptive_backlog_where_fixed_windows_grow() {
    const CAPACITY: u64 = 200;
    const KEYS: usize = 200;
    let (hook, base) = coalesce_cli::webhook::ThrottledHook::serve(CAPACITY).await.unwrap();
    let sink = |name: &str| {
        format!(
            "[sinks.{name}]\nkind = \"http\"\nurl = \"{base}/{name}\"\nbatch_max = 50\n\
             retry_initial = \"50ms\"\nretry_max = \"500ms\"\n\n"
        )
    };
    let streams = format!(
        "{}{}[streams.fixed]\nmerge = \"count\"\nwindow = {{ tumbling = \"250ms\" }}\nsinks = [\"fixed_hook\"]\n\n\
         [streams.stretchy]\nmerge = \"count\"\n\
         window = {{ tumbling = \"250ms\", adaptive = {{ max_staleness = \"5s\", backlog_high = 400 }} }}\n\
         sinks = [\"adaptive_hook\"]\n",
        sink("fixed_hook"),
        sink("adaptive_hook"),
    );
    let cluster = Cluster::start(3, 2, &streams);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect(addrs).await.unwrap();
    let total = |v: Vec<f64>| v.iter().sum::<f64>();
    let backlog = |sink: &'static str| {
        let cluster = &cluster;
        async move { total(cluster.metric(&format!("coalesce_sink_backlog_outputs{{sink=\"{sink}\"}}")).await) }
    };

    // A: fixed windows under the throttle. Sampled every second while the load runs.
    let load = steady_load(&client, "fixed", KEYS, Duration::from_secs(12));
    let sample = async {
        let mut seen = Vec::new();
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            seen.push(backlog("fixed_hook").await);
        }
        seen
    };
    let (sent_fixed, fixed_backlog) = tokio::join!(load, sample);
    eprintln!("fixed windows: sink backlog per second {fixed_backlog:?}");
    let grows = fixed_backlog[11] > fixed_backlog[5] * 1.5 && fixed_backlog[11] > 3_000.0;
    assert!(grows, "with fixed windows the throttled sink's backlog grows: {fixed_backlog:?}");

    // B: adaptive windows under the same throttle.
    let outputs_made = || cluster.metric("coalesce_stream_outputs_total{stream=\"stretchy\",reason=\"time\"}");
    let load = steady_load(&client, "stretchy", KEYS, Duration::from_secs(20));
    let sample = async {
        let mut seen = Vec::new();
        let mut made = Vec::new();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            seen.push(backlog("adaptive_hook").await);
            made.push(total(outputs_made().await));
        }
        (seen, made)
    };
    let (sent_stretchy, (adaptive_backlog, made)) = tokio::join!(load, sample);
    let rate = (made[19] - made[9]) / 10.0;
    eprintln!(
        "adaptive windows: sink backlog per second {adaptive_backlog:?}; outputs made {rate:.0}/s in the last 10 s"
    );
    let (early, late) = adaptive_backlog.split_at(10);
    let early_peak = early.iter().copied().fold(0.0, f64::max);
    let late_peak = late.iter().copied().fold(0.0, f64::max);
    assert!(
        late_peak <= early_peak.max(2.0 * CAPACITY as f64),
        "the adaptive backlog stops growing: {adaptive_backlog:?}"
    );
    assert!(late_peak * 3.0 < fixed_backlog[11], "adaptive {late_peak} vs fixed {}", fixed_backlog[11]);
    assert!(rate <= 1.25 * CAPACITY as f64, "outputs made stay within the sink's capacity: {rate:.0}/s");
    let throttled = total(
        cluster
            .metric("coalesce_adaptive_high_pressure_steps_total{stream=\"stretchy\",cause=\"sink_throttled\"}")
            .await,
    );
    assert!(throttled > 0.0, "the 429s reached the controller as sink_throttled");

    // C: the throttle ends; the stretch relaxes to zero on every node while the load goes on.
    hook.set_throttling(false);
    let relaxed = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let extra = cluster.metric("coalesce_adaptive_extra_seconds{stream=\"stretchy\"}").await;
            if extra.len() == 3 && extra.iter().all(|e| *e == 0.0) {
                return std::time::SystemTime::now();
            }
            assert!(Instant::now() < deadline, "the stretch did not relax after the throttle: {extra:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let (more, relaxed_at) = tokio::join!(steady_load(&client, "stretchy", KEYS, Duration::from_secs(15)), relaxed);
    let relaxed_ms = relaxed_at.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;

    // Everything arrives exactly: Σ inputs of accepted outputs (deduped by shard, seq) == sent.
    let want = [("fixed_hook", sent_fixed), ("adaptive_hook", sent_stretchy + more)];
    let deadline = Instant::now() + Duration::from_secs(60);
    while want.iter().any(|(route, sent)| hook.inputs(route) != *sent) {
        assert!(
            Instant::now() < deadline,
            "delivered inputs {:?} of {want:?}",
            want.map(|(route, _)| hook.inputs(route))
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let adaptive = hook.accepted("adaptive_hook");
    let longest = adaptive.iter().map(|o| o.field("window_end") - o.field("first_input_at")).max().unwrap();
    eprintln!("adaptive windows: longest first input → close {longest} ms");
    assert!(longest > 250, "windows stretched: {longest} ms");
    assert!(longest <= 5_000, "no window outlives max_staleness: {longest} ms");
    for o in adaptive.iter().filter(|o| o.field("window_start") > relaxed_ms + 1_000) {
        assert!(o.field("window_end") - o.field("window_start") <= 250, "back to 250 ms windows: {:?}", o.output);
    }
    for o in hook.accepted("fixed_hook") {
        let length = o.field("window_end") - o.field("window_start");
        assert!(length <= 250, "fixed windows keep their length: {:?}", o.output);
    }
}
