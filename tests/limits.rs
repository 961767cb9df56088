//! Every limit and error of the ingest API, against a 3-node cluster of real `coalesced`
//! processes: each asserts the exact code, reason and field (with the event's index), and that a
//! refused event changes nothing. (It found a real bug: an event whose value failed to decode
//! shifted the statuses of the events after it, so a refused event was reported acknowledged.)
//! And the bounds of the client port's connections: how many, how many per address, how long
//! silent or idle.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coalesce_proto::v1 as pb;
use coalesce_proto::v1::EventCode;
use harness::Cluster;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

const STREAMS: &str = r#"
[limits]
max_keys = 40
max_bytes = 1048576

[streams.sums]
merge = "sum_i64"
window = { tumbling = "1h" }
max_key_bytes = 16

[streams.floats]
merge = "sum_f64"
window = { tumbling = "1h" }

[streams.names]
merge = "latest"
window = { tumbling = "1h" }
max_value_bytes = 64

[streams.patches]
merge = "json_merge_patch"
window = { tumbling = "1h" }

[streams.capped]
merge = "sum_i64"
window = { tumbling = "1h" }
key_rate_limit = { per_second = 1, burst = 3 }

[streams.dropped]
merge = "sum_i64"
window = { tumbling = "1h" }
key_rate_limit = { per_second = 1, burst = 2, action = "shed" }
"#;

const API: &str = "[api]\nmax_events_per_request = 100\nmax_request_bytes = 65536\n";

fn ev(stream: &str, key: &str, kind: Option<pb::value::Kind>) -> pb::Event {
    pb::Event {
        stream: stream.into(),
        key: key.into(),
        value: kind.map(|k| pb::Value { kind: Some(k) }),
        ..Default::default()
    }
}

fn int(v: i64) -> Option<pb::value::Kind> {
    Some(pb::value::Kind::Int(v))
}

/// Asserts a status's code, reason and that its message names `field`.
fn expect(s: &pb::EventStatus, code: EventCode, reason: &str, field: &str) {
    assert_eq!(s.code, code as i32, "{s:?}");
    assert_eq!(s.reason, reason, "{s:?}");
    assert!(s.message.contains(field), "the message names {field:?}: {s:?}");
}

/// Sends `body` as the encoded request of `path` (e.g. `/coalesce.v1.Coalesce/Ingest`): bytes a
/// generated client would never produce.
async fn raw_call(cluster: &Cluster, path: &'static str, body: Vec<u8>) -> tonic::Status {
    #[derive(Debug, Clone, Default)]
    struct Raw;
    impl tonic::codec::Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }
    impl tonic::codec::Encoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
            prost::bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }
    impl tonic::codec::Decoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            let n = prost::bytes::Buf::remaining(src);
            Ok(Some(prost::bytes::Buf::copy_to_bytes(src, n).to_vec()))
        }
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", cluster.local.nodes[0].client_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(body), path, Raw).await.unwrap_err()
}

async fn buffered_keys(cluster: &Cluster) -> u64 {
    let st = cluster.status(0).await.unwrap();
    st.local_shards.iter().map(|s| s.buffered_keys).sum()
}

/// Node 0's buffered keys once they reach `n` (or whatever they are after 10 s): node 0 may
/// follow a shard, and a follower applies an entry only after the leader acknowledged it.
async fn buffered_keys_reaching(cluster: &Cluster, n: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let keys = buffered_keys(cluster).await;
        if keys >= n || tokio::time::Instant::now() >= deadline {
            return keys;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_limit_and_error_has_its_code_and_field() {
    let cluster = Cluster::start_with(3, 2, STREAMS, API);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let mut api = cluster.client(0);
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;

    // Per-event errors in one request: each event gets its own status; the valid one applies.
    let mut future = ev("sums", "later", int(1));
    future.event_time_ms = Some(now_ms + 24 * 3600 * 1000);
    let events = vec![
        ev("nope", "k", int(1)),
        ev("sums", "", int(1)),
        ev("sums", "a-key-longer-than-16", int(1)),
        ev("sums", "k", Some(pb::value::Kind::Str("seven".into()))),
        ev("floats", "k", Some(pb::value::Kind::Float(f64::NAN))),
        ev("patches", "k", Some(pb::value::Kind::Json("{not json".into()))),
        future,
        ev("names", "k", Some(pb::value::Kind::Str("x".repeat(100)))),
        ev("sums", "ok", int(5)),
    ];
    let before = buffered_keys(&cluster).await;
    let r = api.ingest(pb::IngestRequest { producer_id: 0, events }).await.unwrap().into_inner();
    let s = &r.statuses;
    assert_eq!(s.len(), 9);
    expect(&s[0], EventCode::NotFound, "unknown_stream", "events[0].stream");
    expect(&s[1], EventCode::InvalidArgument, "empty_key", "events[1].key");
    expect(&s[2], EventCode::InvalidArgument, "key_too_large", "events[2].key");
    expect(&s[3], EventCode::InvalidArgument, "type_mismatch", "events[3].value");
    expect(&s[4], EventCode::InvalidArgument, "not_finite", "events[4].value");
    expect(&s[5], EventCode::InvalidArgument, "invalid_value", "events[5].value");
    expect(&s[6], EventCode::InvalidArgument, "event_time_in_future", "events[6].event_time");
    expect(&s[7], EventCode::InvalidArgument, "value_too_large", "events[7].value");
    assert_eq!(s[8].code, EventCode::Ok as i32, "{:?}", s[8]);
    let after = buffered_keys_reaching(&cluster, before + 1).await;
    assert_eq!(after, before + 1, "only the valid event changed anything");

    // A request that does not decode is the caller's fault: INVALID_ARGUMENT, never INTERNAL
    // (which clients retry). Truncated: field 2 (events) announces 100 bytes, has 2.
    for (what, body) in [
        ("truncated", vec![0x12, 100, 0x0a, 0x00]),
        ("invalid UTF-8", vec![0x12, 6, 0x0a, 4, 0xff, 0xfe, 0xfd, 0xfc]),
        ("a wire type that does not exist", vec![0x0f]),
    ] {
        let e = raw_call(&cluster, "/coalesce.v1.Coalesce/Ingest", body).await;
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains("does not decode as protobuf"), "{what}: {e:?}");
    }
    assert_eq!(buffered_keys(&cluster).await, after, "nothing undecodable changed anything");

    // The client-streaming call: statuses of every message in order, indices across messages.
    let msgs = vec![
        pb::IngestRequest { producer_id: 0, events: (1..=3).map(|i| ev("sums", &format!("s{i}"), int(1))).collect() },
        pb::IngestRequest { producer_id: 0, events: vec![ev("sums", "s4", int(1)), ev("nope", "x", int(1))] },
    ];
    let r = api.ingest_stream(futures::stream::iter(msgs)).await.unwrap().into_inner();
    assert_eq!(r.statuses.len(), 5);
    assert!(r.statuses[..4].iter().all(|s| s.code == EventCode::Ok as i32), "{r:?}");
    expect(&r.statuses[4], EventCode::NotFound, "unknown_stream", "events[4].stream");
    let before = buffered_keys_reaching(&cluster, 5).await;
    assert!(before >= 5, "the stream's events were applied");

    // Request-level limits: the whole request is refused, naming the field.
    let many: Vec<pb::Event> = (0..101).map(|i| ev("sums", &format!("m{i}"), int(1))).collect();
    let e = api.ingest(pb::IngestRequest { producer_id: 0, events: many }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("events") && e.message().contains("100"), "{e:?}");
    let big: Vec<pb::Event> =
        (0..40).map(|i| ev("names", &format!("b{i}"), Some(pb::value::Kind::Str("y".repeat(2000))))).collect();
    let e = api.ingest(pb::IngestRequest { producer_id: 0, events: big }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("bytes, the limit is 65536"), "{e:?}");
    // Far beyond the limit, gRPC refuses to decode it at all (never held in memory).
    let huge: Vec<pb::Event> =
        (0..60).map(|i| ev("names", &format!("h{i}"), Some(pb::value::Kind::Str("z".repeat(4000))))).collect();
    let e = api.ingest(pb::IngestRequest { producer_id: 0, events: huge }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert_eq!(buffered_keys(&cluster).await, before, "refused requests change nothing");

    // Idempotent producers: seq 0 is invalid, a retry is a duplicate, an overlap is refused.
    let seq = |n: u64, key: &str| pb::Event { producer_seq: n, ..ev("sums", key, int(1)) };
    let r = api.ingest(pb::IngestRequest { producer_id: 77, events: vec![seq(0, "p")] }).await.unwrap().into_inner();
    expect(&r.statuses[0], EventCode::InvalidArgument, "invalid_value", "events[0].producer_seq");
    let first = pb::IngestRequest { producer_id: 77, events: vec![seq(1, "p"), seq(2, "p"), seq(3, "p")] };
    let r = api.ingest(first.clone()).await.unwrap().into_inner();
    assert!(r.statuses.iter().all(|s| s.code == EventCode::Ok as i32), "{r:?}");
    let r = api.ingest(first).await.unwrap().into_inner();
    assert!(r.statuses.iter().all(|s| s.code == EventCode::Duplicate as i32), "a retry is acknowledged once: {r:?}");
    let overlap = pb::IngestRequest { producer_id: 77, events: vec![seq(3, "p"), seq(4, "p")] };
    let r = api.ingest(overlap).await.unwrap().into_inner();
    expect(&r.statuses[0], EventCode::FailedPrecondition, "sequence_overlap", "overlaps");
    // A producer that restarts its counter under the same id (seq 100, then a new event with
    // seq 50) gets an error, not DUPLICATE: the shard never applied seq 50. A retry of the
    // request it did apply is still a duplicate.
    let r = api.ingest(pb::IngestRequest { producer_id: 78, events: vec![seq(100, "q")] }).await.unwrap().into_inner();
    assert_eq!(r.statuses[0].code, EventCode::Ok as i32, "{r:?}");
    let r = api.ingest(pb::IngestRequest { producer_id: 78, events: vec![seq(50, "q")] }).await.unwrap().into_inner();
    expect(&r.statuses[0], EventCode::FailedPrecondition, "sequence_too_old", "must not restart its seqs");
    let r = api.ingest(pb::IngestRequest { producer_id: 78, events: vec![seq(100, "q")] }).await.unwrap().into_inner();
    assert_eq!(r.statuses[0].code, EventCode::Duplicate as i32, "{r:?}");

    // Per-key rate limits: a key's burst passes, the rest is refused with a retry hint (or shed
    // and acknowledged), other keys keep their own budget, and nothing over the rate is applied.
    let mut events: Vec<pb::Event> = (0..6).map(|_| ev("capped", "hot", int(1))).collect();
    events.push(ev("capped", "cold", int(1)));
    events.extend((0..4).map(|_| ev("dropped", "hot", int(1))));
    let r = api.ingest(pb::IngestRequest { producer_id: 0, events }).await.unwrap().into_inner();
    let s = &r.statuses;
    assert!(s[..3].iter().all(|s| s.code == EventCode::Ok as i32), "the burst passes: {s:?}");
    for (i, st) in s.iter().enumerate().take(6).skip(3) {
        expect(st, EventCode::ResourceExhausted, "key_rate_limited", &format!("events[{i}].key"));
        assert!(st.retry_after_ms >= 1 && st.retry_after_ms <= 1_000, "a retry hint: {st:?}");
    }
    assert_eq!(s[6].code, EventCode::Ok as i32, "another key has its own bucket: {:?}", s[6]);
    assert!(s[7..9].iter().all(|s| s.code == EventCode::Ok as i32), "{s:?}");
    for (i, st) in s.iter().enumerate().skip(9) {
        expect(st, EventCode::Shed, "key_rate_limited", &format!("events[{i}].key"));
    }
    let mut inputs = std::collections::BTreeMap::new();
    for i in 0..3 {
        for c in cluster.status(i).await.unwrap().streams {
            *inputs.entry(c.stream).or_insert(0) += c.inputs;
        }
    }
    assert_eq!((inputs["capped"], inputs["dropped"]), (4, 2), "only events within the rate were applied");

    // Buffer limits (40 keys per shard, 2 shards): a request of new keys that cannot fit is
    // refused whole for its shard, with a retry hint, and changes nothing.
    let before = buffered_keys(&cluster).await;
    let flood: Vec<pb::Event> = (0..90).map(|i| ev("sums", &format!("f{i}"), int(1))).collect();
    let r = api.ingest(pb::IngestRequest { producer_id: 0, events: flood }).await.unwrap().into_inner();
    let full: Vec<&pb::EventStatus> =
        r.statuses.iter().filter(|s| s.code == EventCode::ResourceExhausted as i32).collect();
    assert!(!full.is_empty(), "some shard is full: {:?}", r.statuses.first());
    for s in &full {
        assert_eq!(s.reason, "buffer_full");
        assert!(s.retry_after_ms >= 100, "a retry hint: {s:?}");
    }
    let applied = r.statuses.iter().filter(|s| s.code == EventCode::Ok as i32).count() as u64;
    assert_eq!(
        buffered_keys_reaching(&cluster, before + applied).await,
        before + applied,
        "refused events change nothing"
    );

    // Subscribe and Ack refuse bad consumers and shards, naming the field.
    let e = api
        .subscribe(pb::SubscribeRequest { consumer: "Bad Name".into(), shards: vec![], from_seq: Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("consumer"), "{e:?}");
    let e = api
        .subscribe(pb::SubscribeRequest { consumer: "ok".into(), shards: vec![99], from_seq: Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().starts_with("shards"), "{e:?}");
    let e = api.ack(pb::AckRequest { consumer: "ok".into(), shard: 99, upto_seq: 1 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().starts_with("shard"), "{e:?}");
}

/// Per-connection limits on the client port: with `api.max_streams_per_connection = 2`, a
/// third call on a connection that holds two open subscriptions waits (HTTP/2 flow control,
/// not an error) until one of them ends; another connection is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_holds_at_most_its_stream_limit() {
    let cluster = Cluster::start_with(3, 2, STREAMS, "[api]\nmax_streams_per_connection = 2\n");
    cluster.wait_ready(Duration::from_secs(60)).await;
    let one_connection =
        tonic::transport::Channel::from_shared(format!("http://{}", cluster.local.nodes[0].client_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut api = pb::coalesce_client::CoalesceClient::new(one_connection);
    let subscribe = || pb::SubscribeRequest { consumer: "reader".into(), shards: vec![], from_seq: Default::default() };
    let first = api.subscribe(subscribe()).await.unwrap().into_inner();
    let _second = api.subscribe(subscribe()).await.unwrap().into_inner();
    let mut third = std::pin::pin!(api.status(pb::StatusRequest {}));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut third).await.is_err(),
        "a third call on the connection waits while two streams are open"
    );
    // Another connection is served meanwhile.
    assert!(cluster.status(0).await.is_some());
    drop(first);
    let status = tokio::time::timeout(Duration::from_secs(10), third).await.expect("served once a stream ended");
    assert!(status.is_ok(), "{status:?}");
}

/// A subscription of `consumer` to `shard` on the shard's leader.
async fn subscribe(cluster: &Cluster, shard: u32, consumer: &str) -> tonic::Streaming<pb::SubscribeResponse> {
    let leaders = cluster.wait_ready(Duration::from_secs(30)).await;
    let leader = cluster.index_of(&leaders[&shard]).unwrap();
    let req = pb::SubscribeRequest { consumer: consumer.into(), shards: vec![shard], from_seq: Default::default() };
    cluster.client(leader).subscribe(req).await.unwrap().into_inner()
}

/// Issue 23: a `json_merge_patch` key grew to 5.6 MB (no bound counted growth of an existing
/// key), an output no subscriber could read (gRPC messages hold 4 MiB). Now a key's window is
/// sealed (reason `max_bytes`) as soon as its value reaches `window.max_bytes` (default and most
/// 1 MiB), so every output stays below twice that, and a subscriber reads them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_patch_key_cannot_outgrow_what_a_subscriber_can_read() {
    let streams = "[sinks.reader]\nkind = \"grpc\"\n\n\
                   [streams.doc]\nmerge = \"json_merge_patch\"\nwindow = { tumbling = \"10s\" }\n\
                   max_value_bytes = 70000\nsinks = [\"reader\"]\n";
    let cluster = Cluster::start(3, 2, streams);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let mut client = cluster.client(0);
    // 48 patches of ~60 kB, each adding its own field to one key: ~2.9 MB merged, in requests
    // of 4 (so the leader also cuts one request's events into several partials).
    const FIELDS: usize = 48;
    let filler = "x".repeat(60_000);
    for chunk in (0..FIELDS).collect::<Vec<_>>().chunks(4) {
        let events = chunk
            .iter()
            .map(|i| {
                let patch = serde_json::json!({ format!("f{i:02}"): filler }).to_string();
                ev("doc", "big", Some(pb::value::Kind::Json(patch)))
            })
            .collect();
        let resp = client.ingest(pb::IngestRequest { producer_id: 0, events }).await.unwrap().into_inner();
        assert!(resp.statuses.iter().all(|s| s.code == EventCode::Ok as i32), "{:?}", resp.statuses);
    }
    let shard = coalesce_core::hash::shard_for("doc", "big", 2);
    let mut sub = subscribe(&cluster, shard, "reader").await;
    let mut fields = std::collections::BTreeSet::new();
    let (mut outputs, mut by_size, mut largest) = (0, 0, 0);
    while fields.len() < FIELDS {
        let batch = tokio::time::timeout(Duration::from_secs(20), sub.message())
            .await
            .expect("outputs within 20 s")
            .expect("the subscription stays readable")
            .expect("a batch");
        for o in batch.outputs {
            outputs += 1;
            largest = largest.max(o.value_json.len());
            assert!(o.value_json.len() < 2 << 20, "an output below 2 MiB: {} bytes", o.value_json.len());
            if o.reason == "max_bytes" {
                by_size += 1;
            }
            let v: serde_json::Value = serde_json::from_str(&o.value_json).unwrap();
            fields.extend(v.as_object().unwrap().keys().cloned());
        }
    }
    assert!(by_size >= 2, "windows sealed for size: {by_size} of {outputs}");
    eprintln!("{outputs} outputs, {by_size} sealed at max_bytes, the largest {largest} bytes");
}

/// `key_overflow = "reject"`: a request whose event would grow its key past `window.max_bytes`
/// is refused for that shard as a whole (RESOURCE_EXHAUSTED/`key_full`, with the wait until the
/// key's window closes) and nothing of it is applied, so sending it again with the same seqs is
/// safe — refused again while the window is open, applied once after it closed, never a
/// DUPLICATE of something that was not applied. The key's window closes once, on time, with
/// what it accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reject_stream_refuses_growth_past_max_bytes_and_a_retry_with_the_same_seqs_lands_once() {
    let streams = "[sinks.reader]\nkind = \"grpc\"\n\n\
                   [streams.doc]\nmerge = \"json_merge_patch\"\n\
                   window = { tumbling = \"3s\", max_bytes = 200000 }\nkey_overflow = \"reject\"\n\
                   max_value_bytes = 70000\nsinks = [\"reader\"]\n";
    let cluster = Cluster::start(3, 2, streams);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let mut client = cluster.client(0);
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", cluster.local.nodes[0].client_addr))
        .unwrap()
        .connect_lazy();
    let mut admin = pb::admin_client::AdminClient::new(ch);
    let streams = admin.streams(pb::StreamsRequest {}).await.unwrap().into_inner().streams;
    assert_eq!(streams[0].key_overflow, "reject", "Streams reports the policy: {streams:?}");
    let shard = coalesce_core::hash::shard_for("doc", "big", 2);
    // A second key on the same shard: the producer's events for it travel in the same group.
    let small_key =
        (0..).map(|i| format!("small-{i}")).find(|k| coalesce_core::hash::shard_for("doc", k, 2) == shard).unwrap();
    let filler = "x".repeat(60_000);
    let patch = |field: &str| {
        let json = serde_json::json!({ field: filler }).to_string();
        ev("doc", "big", Some(pb::value::Kind::Json(json)))
    };
    // Start early in a window, so the first requests share one.
    while now_ms() % 3_000 > 500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seq = 0;
    let mut request = |events: Vec<pb::Event>| {
        let events = events
            .into_iter()
            .map(|e| {
                seq += 1;
                pb::Event { producer_seq: seq, ..e }
            })
            .collect();
        pb::IngestRequest { producer_id: 0x5eed_0023, events }
    };
    for field in ["a", "b", "c"] {
        let resp = client.ingest(request(vec![patch(field)])).await.unwrap().into_inner();
        assert_eq!(resp.statuses[0].code, EventCode::Ok as i32, "{:?}", resp.statuses);
    }
    // ~180 kB held: a fourth patch would pass 200,000 bytes. Nothing of the request is applied.
    let small = ev("doc", &small_key, Some(pb::value::Kind::Json(r#"{"n":1}"#.into())));
    let fourth = request(vec![small, patch("d")]);
    for attempt in 0..2 {
        let resp = client.ingest(fourth.clone()).await.unwrap().into_inner();
        expect(&resp.statuses[1], EventCode::ResourceExhausted, "key_full", "events[1]");
        assert!(resp.statuses[1].message.contains("window.max_bytes"), "{:?}", resp.statuses[1]);
        expect(&resp.statuses[0], EventCode::ResourceExhausted, "key_full", "events[1] of this request");
        for s in &resp.statuses {
            assert_eq!(s.shard, shard);
            assert!(s.retry_after_ms > 0 && s.retry_after_ms <= 3_000, "until the window closes: {s:?}");
        }
        assert!(attempt == 0 || resp.statuses.iter().all(|s| s.reason == "key_full"), "not a DUPLICATE");
    }
    let mut refused = 0;
    for node in 0..3 {
        let status = cluster.status(node).await.unwrap();
        refused += status.streams.iter().map(|c| c.key_full).sum::<u64>();
    }
    assert_eq!(refused, 4, "StreamCounters.key_full: two events refused twice, on the leader's node");

    // The window closes once, on time, with a, b and c; then the same request lands.
    let mut sub = subscribe(&cluster, shard, "reader").await;
    let mut big = Vec::new();
    while big.is_empty() {
        let batch = tokio::time::timeout(Duration::from_secs(20), sub.message())
            .await
            .expect("outputs within 20 s")
            .expect("the subscription stays readable")
            .expect("a batch");
        assert!(batch.outputs.iter().all(|o| o.key == "big"), "the small key was never applied: {batch:?}");
        big.extend(batch.outputs);
    }
    assert_eq!(big.len(), 1, "{big:?}");
    let v: serde_json::Value = serde_json::from_str(&big[0].value_json).unwrap();
    assert_eq!(v.as_object().unwrap().keys().cloned().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(big[0].reason, "time");
    assert!(big[0].value_json.len() <= 200_000);
    let resp = client.ingest(fourth.clone()).await.unwrap().into_inner();
    assert!(resp.statuses.iter().all(|s| s.code == EventCode::Ok as i32), "the same seqs land: {:?}", resp.statuses);
    let again = client.ingest(fourth).await.unwrap().into_inner();
    assert!(again.statuses.iter().all(|s| s.code == EventCode::Duplicate as i32), "and only once: {again:?}");
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A stream whose windows close a second after their first event, for the connection tests.
const QUICK: &str = r#"
[streams.sums]
merge = "sum_i64"
window = { tumbling = "1s" }
"#;

/// Polls node 0's metric `series` until `ok` holds of it (20 s at most); returns its value.
async fn metric_reaching(cluster: &Cluster, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = cluster.metric(series).await.first().copied();
        if let Some(v) = v
            && ok(v)
        {
            return v;
        }
        assert!(Instant::now() < deadline, "{series} is {v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the node closed `s` (an end of stream or a reset) within `within`. What it sent
/// before (an HTTP/2 server's SETTINGS) is read and dropped.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 256];
    let until_closed = async {
        while let Ok(n) = s.read(&mut b).await
            && n > 0
        {}
    };
    tokio::time::timeout(within, until_closed).await.is_ok()
}

/// The incident of December 2026, small: connections that connect and say nothing. With room
/// for 8 (4 per address), the 5th from one address and the 9th on the port are reset at once,
/// and so is a real call while the port is full, each counted; the 8 admitted ones are closed
/// by the first-byte timeout, not before, after which real calls are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_connections_beyond_the_bounds_are_reset_and_the_rest_time_out() {
    const FIRST_BYTE: Duration = Duration::from_secs(5);
    let cluster = Cluster::start_with(
        1,
        1,
        QUICK,
        "[api]\nmax_connections = 8\nmax_connections_per_ip = 4\nconnection_first_byte_timeout = \"5s\"\n",
    );
    cluster.wait_ready(Duration::from_secs(60)).await;
    let node: SocketAddr = cluster.local.nodes[0].client_addr.parse().unwrap();
    let series = |name: &str, reason: &str| format!(r#"{name}{{port="client",reason="{reason}"}}"#);
    // The readiness checks' connections are gone: every slot is free.
    metric_reaching(&cluster, r#"coalesce_net_connections{port="client"}"#, |v| v == 0.0).await;
    assert_eq!(
        cluster.metric(r#"coalesce_net_connection_limit{port="client"}"#).await,
        vec![8.0],
        "the bound is exported"
    );

    // A refused connection may be reset before `connect` even returns.
    let connect_from = |host: u8| async move {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from(([127, 0, 0, host], 0))).unwrap();
        s.connect(node).await
    };
    let started = Instant::now();
    let mut admitted = Vec::new();
    for _ in 0..4 {
        admitted.push(connect_from(2).await.unwrap());
    }
    let over_address = connect_from(2).await;
    for _ in 0..4 {
        admitted.push(connect_from(3).await.unwrap());
    }
    let over_port = connect_from(4).await;
    for (what, s) in [("the 5th from 127.0.0.2", over_address), ("the 9th on the port", over_port)] {
        if let Ok(mut s) = s {
            assert!(closed_within(&mut s, Duration::from_secs(10)).await, "{what} is reset");
        }
    }
    assert!(started.elapsed() < FIRST_BYTE, "at once, not by a timeout: {:?}", started.elapsed());
    assert!(cluster.status(0).await.is_none(), "a real call finds the port full too");
    assert!(started.elapsed() < FIRST_BYTE, "the port was still full: {:?}", started.elapsed());
    assert_eq!(
        cluster.metric(&series("coalesce_net_connections_refused_total", "max_connections_per_ip")).await,
        vec![1.0]
    );
    let full = cluster.metric(&series("coalesce_net_connections_refused_total", "max_connections")).await;
    assert!(full[0] >= 2.0, "the 9th connection and the real call: {full:?}");

    for (i, s) in admitted.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(20)).await, "admitted connection {i} is closed");
    }
    assert!(started.elapsed() >= FIRST_BYTE, "by the first-byte timeout: {:?}", started.elapsed());
    let timed_out =
        metric_reaching(&cluster, &series("coalesce_net_connections_timed_out_total", "first_byte"), |v| v >= 8.0)
            .await;
    assert_eq!(timed_out, 8.0, "exactly the silent ones");
    metric_reaching(&cluster, r#"coalesce_net_connections{port="client"}"#, |v| v == 0.0).await;
    assert!(cluster.status(0).await.is_some(), "served again once they are gone");
    let mut log = String::new();
    for _ in 0..100 {
        log = std::fs::read_to_string(&cluster.local.nodes[0].log).unwrap();
        if log.contains("connection refused: the port is at its connection limit") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        log.matches("connection refused: the port is at its connection limit").count(),
        1,
        "three refusals within 10 s, logged once"
    );
}

/// `api.connection_idle_timeout`: a connection with no call open is closed (its client's next
/// call reconnects), while a subscription that receives nothing for longer keeps its
/// connection and still delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_connection_is_closed_and_a_quiet_subscription_is_not() {
    const IDLE: Duration = Duration::from_secs(1);
    let cluster = Cluster::start_with(1, 1, QUICK, "[api]\nconnection_idle_timeout = \"1s\"\n");
    cluster.wait_ready(Duration::from_secs(60)).await;
    let addr = format!("http://{}", cluster.local.nodes[0].client_addr);
    let idle_closed = r#"coalesce_net_connections_timed_out_total{port="client",reason="idle"}"#;
    // The readiness checks' connections are gone (closed by their clients).
    metric_reaching(&cluster, r#"coalesce_net_connections{port="client"}"#, |v| v == 0.0).await;
    let before = cluster.metric(idle_closed).await[0];

    let channel = tonic::transport::Channel::from_shared(addr.clone()).unwrap().connect().await.unwrap();
    let subscribe = pb::SubscribeRequest { consumer: "quiet".into(), shards: vec![], from_seq: Default::default() };
    let mut outputs =
        pb::coalesce_client::CoalesceClient::new(channel).subscribe(subscribe).await.unwrap().into_inner();
    let subscribed = Instant::now();
    // Another connection: one call, then nothing.
    let channel = tonic::transport::Channel::from_shared(addr).unwrap().connect().await.unwrap();
    let mut idle = pb::coalesce_client::CoalesceClient::new(channel);
    idle.status(pb::StatusRequest {}).await.unwrap();

    metric_reaching(&cluster, idle_closed, |v| v >= before + 1.0).await;
    // The condition is time itself: the subscription has been quiet for three idle timeouts.
    tokio::time::sleep_until((subscribed + 3 * IDLE).into()).await;
    assert_eq!(cluster.metric(idle_closed).await[0], before + 1.0, "only the idle connection was closed");
    assert!(idle.status(pb::StatusRequest {}).await.is_ok(), "its client reconnects");

    let event = harness::sum_event("sums", "quiet-key", 7, 0);
    let r = cluster.client(0).ingest(pb::IngestRequest { producer_id: 0, events: vec![event] }).await.unwrap();
    assert_eq!(r.into_inner().statuses[0].code, EventCode::Ok as i32);
    let batch = tokio::time::timeout(Duration::from_secs(20), outputs.message())
        .await
        .expect("an output within 20 s")
        .expect("the subscription is alive")
        .expect("and not ended");
    assert_eq!(batch.outputs[0].key, "quiet-key");
    assert_eq!(batch.outputs[0].value_json, "7");
}
