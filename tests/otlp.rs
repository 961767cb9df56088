//! OTLP span export (the `otlp` feature; the endpoint from `OTEL_EXPORTER_OTLP_ENDPOINT`, which
//! fills `[telemetry] otlp_endpoint` when the config names none): a 3-node cluster exports
//! to an OTLP/gRPC collector run by this test (opentelemetry-proto's `TraceService`). One
//! ingest request that carries a caller's W3C `traceparent` and touches every shard must come
//! back as one trace across processes: the caller's span → `rpc` → `ingest` on the node called
//! → `forward` → `forwarded` on the other shards' leaders → `replicate`. Window seals and sink
//! deliveries are exported too, every span names its node (`service.instance.id`), and the
//! spans still queued when the nodes get SIGTERM are flushed before they exit.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::Cluster;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio_stream::wrappers::TcpListenerStream;

const STREAMS: &str = "[sinks.lines]\nkind = \"file\"\npath = \"../outputs-{node}.jsonl\"\n\n\
                       [streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"300ms\" }\nsinks = [\"lines\"]\n";

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    node: String,
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
}

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let attr = |key: &str| {
                rs.resource.iter().flat_map(|r| &r.attributes).find(|a| a.key == key).and_then(|a| {
                    match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    }
                })
            };
            let (node, service) = (attr("service.instance.id").unwrap_or_default(), attr("service.name").unwrap());
            for s in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                spans.push(Span {
                    node: node.clone(),
                    service: service.clone(),
                    name: s.name.clone(),
                    trace: s.trace_id.clone(),
                    id: s.span_id.clone(),
                    parent: s.parent_span_id.clone(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_cross_nodes_in_one_trace_and_are_flushed_at_exit() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    // The endpoint from the standard OpenTelemetry variable, as an operator-injected pod gets it
    // (the config file's `[telemetry] otlp_endpoint` sets the same field).
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), format!("http://127.0.0.1:{port}"))];
    let mut cluster = Cluster::start_env(tempfile::tempdir().unwrap(), 3, 3, STREAMS, "", &env);
    let leaders = cluster.wait_ready(Duration::from_secs(60)).await;
    assert!(
        leaders.values().any(|l| l != "coalesce-0"),
        "some shard is led elsewhere, so node 0 forwards: {leaders:?}"
    );

    // The caller's trace: a fixed trace id and span id, sampled.
    let (trace, caller) = (rand::random::<u128>() | 1, rand::random::<u64>() | 1);
    let events: Vec<_> = (0..60).map(|i| harness::sum_event(harness::STREAM, &format!("k{i}"), 1, i + 1)).collect();
    let mut request = tonic::Request::new(coalesce_proto::v1::IngestRequest { producer_id: 7, events });
    request.metadata_mut().insert("traceparent", format!("00-{trace:032x}-{caller:016x}-01").parse().unwrap());
    let statuses = cluster.client(0).ingest(request).await.unwrap().into_inner().statuses;
    assert!(statuses.iter().all(|s| s.code == coalesce_proto::v1::EventCode::Ok as i32), "{statuses:?}");
    // Every key's output reaches the file sink (so seals and deliveries ran on every leader).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let keys: BTreeSet<String> = (0..3)
            .flat_map(|i| std::fs::read_to_string(cluster.path().join(format!("outputs-coalesce-{i}.jsonl"))).ok())
            .flat_map(|text| {
                text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).collect::<Vec<_>>()
            })
            .filter_map(|o| o["key"].as_str().map(str::to_owned))
            .collect();
        if keys.len() == 60 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "only {} of 60 keys delivered", keys.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Nodes stop gracefully: what they still queue is exported before they exit.
    for i in 0..3 {
        cluster.terminate(i, Duration::from_secs(30));
    }
    let spans = collector.0.lock().unwrap().clone();
    let trace_id = trace.to_be_bytes().to_vec();
    let ours: Vec<&Span> = spans.iter().filter(|s| s.trace == trace_id).collect();
    let dump = || {
        ours.iter().map(|s| format!("{} {} {} <- {}", s.node, s.name, hex(&s.id), hex(&s.parent))).collect::<Vec<_>>()
    };
    let by_id: BTreeMap<&[u8], &Span> = ours.iter().map(|s| (s.id.as_slice(), *s)).collect();
    let parent_name = |s: &Span| by_id.get(s.parent.as_slice()).map(|p| p.name.as_str());

    let rpc = ours.iter().find(|s| s.name == "rpc").unwrap_or_else(|| panic!("no rpc span: {:?}", dump()));
    assert_eq!((rpc.node.as_str(), rpc.parent.as_slice()), ("coalesce-0", caller.to_be_bytes().as_slice()));
    let ingest = ours.iter().find(|s| s.name == "ingest").unwrap();
    assert_eq!(parent_name(ingest), Some("rpc"), "{:?}", dump());
    let forwarded: Vec<&&Span> = ours.iter().filter(|s| s.name == "forwarded").collect();
    let remote_leaders: BTreeSet<&String> = leaders.values().filter(|l| *l != "coalesce-0").collect();
    assert_eq!(forwarded.iter().map(|s| &s.node).collect::<BTreeSet<_>>(), remote_leaders, "{:?}", dump());
    for f in &forwarded {
        let parent = by_id.get(f.parent.as_slice()).unwrap_or_else(|| panic!("forwarded without parent: {:?}", dump()));
        assert_eq!((parent.name.as_str(), parent.node.as_str()), ("forward", "coalesce-0"));
        assert!(
            ours.iter().any(|s| s.name == "replicate" && s.node == f.node && s.parent == f.id),
            "the leader {} replicated under its forwarded span: {:?}",
            f.node,
            dump()
        );
    }
    // Seals and deliveries run on their own (not part of the caller's trace), on every leader.
    let seal_nodes: BTreeSet<&String> = spans.iter().filter(|s| s.name == "seal").map(|s| &s.node).collect();
    let deliver_nodes: BTreeSet<&String> = spans.iter().filter(|s| s.name == "deliver").map(|s| &s.node).collect();
    let all_leaders: BTreeSet<&String> = leaders.values().collect();
    assert!(seal_nodes.is_superset(&all_leaders), "seals from {seal_nodes:?}, leaders {all_leaders:?}");
    assert!(deliver_nodes.is_superset(&all_leaders), "deliveries from {deliver_nodes:?}, leaders {all_leaders:?}");
    assert!(spans.iter().all(|s| s.service == "coalesce"));
}
