//! The Rust client against a 3-node cluster of real `coalesced` processes: events sent with
//! `coalesce_client::Producer` come out of Subscribe with exact totals, and a client that
//! starts with no routes learns every shard's leader from the nodes' leader hints, without
//! asking for Status. Replay with `COALESCE_TEST_SEED=<seed>`.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::time::Duration;

use coalesce_client::{BatchingProducer, Client, event};
use harness::Cluster;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const STREAMS: &str = "[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"200ms\" }\n";
const SHARDS: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_totals_come_out_of_subscribe_and_hints_fix_routes() {
    let seed = std::env::var("COALESCE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed = {seed} (replay with COALESCE_TEST_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let cluster = Cluster::start(3, SHARDS, STREAMS);
    let leaders = cluster.wait_ready(Duration::from_secs(60)).await;
    let leader_addr: BTreeMap<u32, String> = leaders
        .iter()
        .map(|(shard, name)| (*shard, cluster.local.nodes[cluster.index_of(name).unwrap()].client_addr.clone()))
        .collect();

    // No routes yet: the first request goes to arbitrary nodes, which forward and hint.
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let client = Client::connect_lazy(addrs).unwrap();
    assert!((0..SHARDS).all(|s| client.leader_addr(s).is_none()));
    let mut producer = client.producer();
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut batch = Vec::new();
    for k in 0..64 {
        let (key, v) = (format!("key-{k}"), rng.random_range(-50..50i64));
        *expected.entry(key.clone()).or_default() += v;
        batch.push(event("sums", &key, v));
    }
    let report = producer.send(batch).await.unwrap();
    assert!(report.all_acked(), "{:?}", report.failures().collect::<Vec<_>>());
    for shard in 0..SHARDS {
        if let Some(learned) = client.leader_addr(shard) {
            assert_eq!(learned, leader_addr[&shard], "shard {shard}: a hint names the leader");
        }
    }
    // The request went to one node (the client knew no shard count yet), which leads only
    // some shards: the others came back hinted. Learning took no Status call.
    assert_eq!(client.shards(), SHARDS, "the response taught the shard count");
    let learned = (0..SHARDS).filter(|s| client.leader_addr(*s).is_some()).count();
    assert!(learned >= 1, "at least one shard's leader was learned from a hint");

    // More traffic, then exact totals out of Subscribe.
    for _ in 0..20 {
        let events: Vec<_> = (0..250)
            .map(|_| {
                let (key, v) = (format!("key-{}", rng.random_range(0..500)), rng.random_range(-50..50i64));
                *expected.entry(key.clone()).or_default() += v;
                event("sums", &key, v)
            })
            .collect();
        let report = producer.send(events).await.unwrap();
        assert!(report.all_acked(), "{:?}", report.failures().collect::<Vec<_>>());
    }
    // Many callers through one batching producer: each gets its own event's status.
    let batching = BatchingProducer::new(&client, Duration::from_millis(5), 200, 2);
    let sends: Vec<_> = (0..1000)
        .map(|i| {
            let (b, key, v) = (batching.clone(), format!("key-{}", i % 50), (i % 7) as i64 - 3);
            *expected.entry(key.clone()).or_default() += v;
            tokio::spawn(async move { b.send(event("sums", &key, v)).await })
        })
        .collect();
    for s in sends {
        let status = s.await.unwrap().unwrap();
        assert_eq!(status.code, coalesce_proto::v1::EventCode::Ok as i32, "{status:?}");
    }

    // Standard health and reflection on the client port.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", cluster.local.nodes[0].client_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: "coalesce.v1.Coalesce".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("reflection did not list services")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"coalesce.v1.Coalesce".to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("RaftPeer")), "peer traffic is not on the client port: {names:?}");
    // The same in reflection `v1alpha`, the only version older tools (grpcurl before 1.9) speak.
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = ServerReflectionClient::new(channel)
            .server_reflection_info(futures::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let reply = replies.message().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::ListServicesResponse(list)) = reply else { panic!("v1alpha did not list services") };
        let alpha: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert_eq!(alpha, names, "v1alpha lists what v1 lists");
    }

    let emitted = cluster.collect_outputs().await;
    let expected: BTreeMap<String, i64> = expected.into_iter().filter(|(_, v)| *v != 0).collect();
    let emitted: BTreeMap<String, i64> = emitted.into_iter().filter(|(_, v)| *v != 0).collect();
    assert_eq!(emitted, expected, "Σ outputs per key == Σ acked inputs per key (seed {seed})");
}

/// `coalescectl send` (JSON lines on stdin) and `coalescectl tail` against real processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescectl_send_and_tail() {
    let cluster = Cluster::start(3, 2, STREAMS);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let ctl = std::path::Path::new(harness::COALESCED).with_file_name("coalescectl");
    assert!(ctl.exists(), "{} is built with the workspace (cargo build --workspace)", ctl.display());
    let addr = &cluster.local.nodes[1].client_addr;

    let input = "{\"stream\":\"sums\",\"key\":\"a\",\"value\":5}\n\
                 {\"stream\":\"sums\",\"key\":\"a\",\"value\":\"x\"}\n\
                 {\"key\":\"b\",\"value\":7}\n\
                 not json\n";
    let mut child = tokio::process::Command::new(&ctl)
        .args(["--addr", addr, "send", "--stream", "sums"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    child.stdin.take().unwrap().write_all(input.as_bytes()).await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "a refused line makes send exit 1\n{stdout}\n{stderr}");
    assert!(stdout.contains("2 events acknowledged, 2 refused"), "{stdout}");
    assert!(stderr.contains("line 2: events[1].value"), "the error names the line and the field: {stderr}");
    assert!(stderr.contains("line 4: not JSON"), "{stderr}");

    // Windows close after 200 ms; tail prints both outputs as JSON lines.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(&ctl).args(["--addr", addr, "tail", "--from-start", "--limit", "2"]).output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut got: Vec<(String, i64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["key"].as_str().unwrap().to_owned(), v["value"].as_i64().unwrap())
        })
        .collect();
    got.sort();
    assert_eq!(got, vec![("a".to_owned(), 5), ("b".to_owned(), 7)]);
}
