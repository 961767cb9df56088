//! TLS and tokens against a 3-node cluster of real `coalesced` processes, with certificates
//! generated at test time (rcgen): peers talk mutual TLS (a caller without a certificate the
//! cluster's CA signed is refused on the peer port), the client port speaks TLS and checks
//! bearer tokens per method (UNAUTHENTICATED without one, PERMISSION_DENIED without the role),
//! and everything works end to end for callers with the right credentials.

#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod harness;

use std::time::{Duration, Instant};

use coalesce_client::{Client, ClientOptions, event};
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::admin_client::AdminClient;
use coalesce_proto::v1::coalesce_client::CoalesceClient;
use coalesce_proto::v1::raft_peer_client::RaftPeerClient;
use harness::Cluster;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const PRODUCER: &str = "producer-secret-token-1";
const CONSUMER: &str = "consumer-secret-token-2";
const ADMIN: &str = "admin-secret-token-3";

/// A CA and one certificate it signed for 127.0.0.1/localhost, written as PEM files into `dir`.
fn certificates(dir: &std::path::Path) -> String {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("node.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
    ca_cert.pem()
}

fn tls_channel(addr: &str, ca: &str, identity: Option<(&str, &str)>) -> Channel {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_need_certificates_and_clients_need_tokens_with_roles() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates(dir.path());
    for (file, token) in [("producer.token", PRODUCER), ("consumer.token", CONSUMER), ("admin.token", ADMIN)] {
        std::fs::write(dir.path().join(file), token).unwrap();
    }
    let d = dir.path().display();
    let extra = format!(
        "[tls.client]\ncert = \"{d}/node.pem\"\nkey = \"{d}/node.key\"\n\n\
         [tls.peer]\ncert = \"{d}/node.pem\"\nkey = \"{d}/node.key\"\nca = \"{d}/ca.pem\"\n\n\
         [[auth.tokens]]\nname = \"ingester\"\ntoken_file = \"{d}/producer.token\"\nroles = [\"producer\"]\n\n\
         [[auth.tokens]]\nname = \"reader\"\ntoken_file = \"{d}/consumer.token\"\nroles = [\"consumer\"]\n\n\
         [[auth.tokens]]\nname = \"ops\"\ntoken_file = \"{d}/admin.token\"\nroles = [\"admin\"]\n"
    );
    let streams = "[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"200ms\" }\n";
    let cluster = Cluster::start_in(dir, 3, 2, streams, &extra);

    // Ready: every shard elected a leader over mutual TLS (Status needs any valid token).
    let addrs: Vec<String> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let producer_opts = ClientOptions::default().with_ca_pem(&ca).with_token(PRODUCER);
    let client = Client::connect_lazy_with(addrs.clone(), producer_opts).unwrap();
    if let Err(e) = client.wait_ready(Duration::from_secs(60)).await {
        cluster.dump_logs();
        panic!("{e}");
    }

    // A producer's events are acknowledged (forwarded and replicated over mutual TLS).
    let mut producer = client.producer();
    let report = producer.send((0..20).map(|i| event("sums", &format!("k{i}"), 5i64)).collect()).await.unwrap();
    assert!(report.all_acked(), "{:?}", report.failures().collect::<Vec<_>>());

    // The client port: TLS, then tokens per method.
    let node0 = tls_channel(&addrs[0], &ca, None);
    let mut api = CoalesceClient::new(node0.clone());
    let ingest = || pb::IngestRequest { producer_id: 0, events: vec![event("sums", "x", 1i64)] };
    let e = api.ingest(ingest()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = api.ingest(with_token(ingest(), "not-a-known-token-at-all")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = api.ingest(with_token(ingest(), CONSUMER)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("reader") && !e.message().contains(CONSUMER), "{e:?}");
    let mut admin = AdminClient::new(node0.clone());
    let e = admin.streams(with_token(pb::StreamsRequest {}, PRODUCER)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let streams = admin.streams(with_token(pb::StreamsRequest {}, ADMIN)).await.unwrap().into_inner();
    assert_eq!(streams.streams.len(), 1);
    // Plain text on a TLS port gets nowhere.
    let plain = Channel::from_shared(format!("http://{}", addrs[0])).unwrap().connect_lazy();
    assert!(CoalesceClient::new(plain).status(with_token(pb::StatusRequest {}, ADMIN)).await.is_err());

    // A consumer reads the outputs: Σ = 20 × 5.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut total = 0;
    'outer: for addr in &addrs {
        let mut sub = CoalesceClient::new(tls_channel(addr, &ca, None));
        let st = sub.status(with_token(pb::StatusRequest {}, CONSUMER)).await.unwrap().into_inner();
        let mine: Vec<u32> = st.local_shards.iter().filter(|s| s.leader == st.node).map(|s| s.shard).collect();
        if mine.is_empty() {
            continue;
        }
        let req = pb::SubscribeRequest {
            consumer: "audit".into(),
            shards: mine.clone(),
            from_seq: mine.iter().map(|s| (*s, 0)).collect(),
        };
        let mut stream = sub.subscribe(with_token(req, CONSUMER)).await.unwrap().into_inner();
        while let Ok(Ok(Some(batch))) = tokio::time::timeout(Duration::from_millis(1500), stream.message()).await {
            total += batch.outputs.iter().map(|o| o.value_json.parse::<i64>().unwrap()).sum::<i64>();
            if total == 100 || Instant::now() > deadline {
                break 'outer;
            }
        }
    }
    assert_eq!(total, 100, "every acknowledged event comes out for the consumer");

    // The peer port: TLS without a client certificate is refused, and so is plain text.
    let peer_addr = {
        let text = std::fs::read_to_string(&cluster.local.nodes[0].config).unwrap();
        let line = text.lines().find(|l| l.starts_with("peer_listen")).unwrap().to_owned();
        line.split('"').nth(1).unwrap().to_owned()
    };
    let hello = || pb::HelloRequest { cluster: "test".into() };
    let no_cert = RaftPeerClient::new(tls_channel(&peer_addr, &ca, None)).hello(hello()).await;
    assert!(no_cert.is_err(), "a caller without a client certificate must be refused on the peer port");
    let plain = Channel::from_shared(format!("http://{peer_addr}")).unwrap().connect_lazy();
    assert!(RaftPeerClient::new(plain).hello(hello()).await.is_err());
    let cert = std::fs::read_to_string(cluster.path().join("node.pem")).unwrap();
    let key = std::fs::read_to_string(cluster.path().join("node.key")).unwrap();
    let with_cert = RaftPeerClient::new(tls_channel(&peer_addr, &ca, Some((&cert, &key)))).hello(hello()).await;
    assert!(with_cert.is_ok(), "a certificate the CA signed is accepted: {with_cert:?}");

    // Secrets never reach the logs.
    for n in &cluster.local.nodes {
        let log = std::fs::read_to_string(&n.log).unwrap();
        for t in [PRODUCER, CONSUMER, ADMIN] {
            assert!(!log.contains(t), "{} logs a token", n.name);
        }
    }
}
