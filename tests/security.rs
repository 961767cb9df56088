//! TLS and tokens against a 3-node cluster of real `coalesced` processes, with certificates
//! generated at test time (rcgen): peers talk mutual TLS with one certificate per node (a caller
//! without a certificate the cluster's CA signed is refused on the peer port; a certificate of
//! node A cannot speak for node B; a client certificate of the same CA is not a peer), the
//! client port speaks TLS and checks bearer tokens per method (UNAUTHENTICATED without one,
//! PERMISSION_DENIED without the role), `/loglevel` needs the admin token, and everything works
//! end to end for callers with the right credentials.

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

/// A CA and, signed by it and written as PEM files into `dir`: one certificate per node
/// (`coalesce-N.pem`/`.key`, naming the node, 127.0.0.1 and localhost), a client-only
/// certificate naming node 1 (`client-only.*`, extended key usage clientAuth) and one naming no
/// node (`stranger.*`).
fn certificates(dir: &std::path::Path) -> String {
    use rcgen::ExtendedKeyUsagePurpose as Eku;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let issue = |file: &str, name: &str, usages: Vec<Eku>| {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec![name.to_owned(), "127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    };
    for i in 0..3 {
        issue(&format!("coalesce-{i}"), &format!("coalesce-{i}"), vec![Eku::ServerAuth, Eku::ClientAuth]);
    }
    issue("client-only", "coalesce-1", vec![Eku::ClientAuth]);
    issue("stranger", "producer-7", vec![Eku::ServerAuth, Eku::ClientAuth]);
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    ca_cert.pem()
}

/// The PEM certificate and key `certificates` wrote as `file`.
fn identity(dir: &std::path::Path, file: &str) -> (String, String) {
    let read = |ext: &str| std::fs::read_to_string(dir.join(format!("{file}.{ext}"))).unwrap();
    (read("pem"), read("key"))
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
        "[tls.client]\ncert = \"{d}/{{node}}.pem\"\nkey = \"{d}/{{node}}.key\"\n\n\
         [tls.peer]\ncert = \"{d}/{{node}}.pem\"\nkey = \"{d}/{{node}}.key\"\nca = \"{d}/ca.pem\"\n\n\
         [[auth.tokens]]\nname = \"ingester\"\ntoken_file = \"{d}/producer.token\"\nroles = [\"producer\"]\n\n\
         [[auth.tokens]]\nname = \"reader\"\ntoken_file = \"{d}/consumer.token\"\nroles = [\"consumer\"]\n\n\
         [[auth.tokens]]\nname = \"ops\"\ntoken_file = \"{d}/admin.token\"\nroles = [\"admin\", \"consumer\"]\n"
    );
    let streams =
        "[outbox]\ncursor_ttl = \"3s\"\n\n[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"200ms\" }\n";
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

    // Acks never create a cursor for an arbitrary name (it would hold every output, and past
    // `max_outputs` stop ingest cluster-wide): `audit` is declared nowhere, so a consumer token
    // is refused; an admin's token (which also has the consumer role Ack needs) creates the
    // cursor, and then the consumer may move it.
    let st = api.status(with_token(pb::StatusRequest {}, CONSUMER)).await.unwrap().into_inner();
    let (shard, leader) = st.local_shards.iter().map(|s| (s.shard, s.leader.clone())).next().unwrap();
    let mut on_leader = CoalesceClient::new(tls_channel(&addrs[cluster.index_of(&leader).unwrap()], &ca, None));
    let ack = || pb::AckRequest { consumer: "audit".into(), shard, upto_seq: 1 };
    let e = on_leader.ack(with_token(ack(), CONSUMER)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("declare it as a `grpc` sink"), "{e:?}");
    let cursors = |i: usize| {
        let ch = tls_channel(&addrs[i], &ca, None);
        async move {
            let mut admin = AdminClient::new(ch);
            let s = admin.shards(with_token(pb::ShardsRequest {}, ADMIN)).await.unwrap().into_inner();
            s.shards.iter().find(|d| d.shard == shard).map(|d| d.cursors.clone()).unwrap_or_default()
        }
    };
    let leader_index = cluster.index_of(&leader).unwrap();
    assert!(!cursors(leader_index).await.contains_key("audit"), "a refused ack creates nothing");
    on_leader.ack(with_token(ack(), ADMIN)).await.unwrap();
    on_leader.ack(with_token(pb::AckRequest { upto_seq: 2, ..ack() }, CONSUMER)).await.unwrap();
    assert!(cursors(leader_index).await.contains_key("audit"), "the admin's ack created the cursor");
    let dropped = AdminClient::new(tls_channel(&addrs[leader_index], &ca, None))
        .drop_consumer(with_token(pb::DropConsumerRequest { consumer: "audit".into() }, ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dropped.shards, vec![shard]);
    assert!(!cursors(leader_index).await.contains_key("audit"), "an operator dropped the cursor");
    on_leader.ack(with_token(ack(), ADMIN)).await.unwrap();
    // Nobody acks it again: after `[outbox] cursor_ttl` the leader drops it (counted).
    let deadline = Instant::now() + Duration::from_secs(20);
    while cursors(leader_index).await.contains_key("audit") {
        assert!(Instant::now() < deadline, "an idle cursor of no configured sink outlived its TTL");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let expired: f64 = cluster.metric("coalesce_outbox_cursors_expired_total").await.iter().sum();
    assert_eq!(expired, 1.0);

    // The peer port: TLS without a client certificate is refused, and so is plain text.
    let peer_addr = {
        let text = std::fs::read_to_string(&cluster.local.nodes[0].config).unwrap();
        let line = text.lines().find(|l| l.starts_with("peer_listen")).unwrap().to_owned();
        line.split('"').nth(1).unwrap().to_owned()
    };
    let hello = || pb::HelloRequest { cluster: "test".into(), ..Default::default() };
    let mut no_cert = RaftPeerClient::new(tls_channel(&peer_addr, &ca, None));
    assert!(no_cert.hello(hello()).await.is_err(), "a caller without a client certificate is refused on the peer port");
    let plain = Channel::from_shared(format!("http://{peer_addr}")).unwrap().connect_lazy();
    assert!(RaftPeerClient::new(plain).hello(hello()).await.is_err());
    let (cert, key) = identity(cluster.path(), "coalesce-1");
    let as_node1 = tls_channel(&peer_addr, &ca, Some((&cert, &key)));
    let with_cert = RaftPeerClient::new(as_node1.clone()).hello(hello()).await;
    assert!(with_cert.is_ok(), "node 1's certificate is accepted on node 0's peer port: {with_cert:?}");
    let node0_id = with_cert.unwrap().into_inner().node_id;
    let ack = postcard::to_allocvec(&Forged::Ack { cursor: "x".into(), upto_seq: 1 }).unwrap();
    let e = no_cert.forward(pb::RaftMessage { group: 0, payload: ack, target: node0_id }).await.unwrap_err();
    assert!(
        !matches!(e.code(), tonic::Code::Ok | tonic::Code::NotFound | tonic::Code::PermissionDenied),
        "a forward without a certificate does not get past the TLS handshake: {e:?}"
    );

    // Certificates the CA signed that are not a node's are refused on every peer call.
    for (file, why) in [("client-only", "client certificate"), ("stranger", "names no node")] {
        let (c, k) = identity(cluster.path(), file);
        let mut peer = RaftPeerClient::new(tls_channel(&peer_addr, &ca, Some((&c, &k))));
        let e = peer.hello(hello()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{file}: {e:?}");
        assert!(e.message().contains(why), "{file}: {e:?}");
        let ping = pb::PingRequest { name: "coalesce-1".into(), boot: 1 };
        assert_eq!(peer.ping(ping).await.unwrap_err().code(), tonic::Code::PermissionDenied, "{file}");
        let forward = pb::RaftMessage { group: 0, payload: vec![0], target: node0_id };
        assert_eq!(peer.forward(forward).await.unwrap_err().code(), tonic::Code::PermissionDenied, "{file}");
    }

    // Node 1's certificate cannot speak for another node: not in a ping, not as a candidate.
    let mut peer = RaftPeerClient::new(as_node1);
    let e = peer.hello(pb::HelloRequest { cluster: "another".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "the cluster name is checked: {e:?}");
    let own = peer.ping(pb::PingRequest { name: "coalesce-1".into(), boot: 7 }).await;
    assert!(own.is_ok(), "{own:?}");
    let e = peer.ping(pb::PingRequest { name: "coalesce-2".into(), boot: 7 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let ids = peer_ids(&cluster, &ca).await;
    let pre_vote = |candidate: u64| {
        let vote = coalesce_raft::types::Vote::new(1, candidate);
        let req: openraft::raft::VoteRequest<coalesce_raft::TypeConfig> = openraft::raft::VoteRequest::new(vote, None);
        pb::RaftMessage {
            group: 0,
            payload: coalesce_raft::codec::encode_msg("pre_vote", &req).unwrap(),
            target: node0_id,
        }
    };
    let e = peer.pre_vote(pre_vote(ids[2])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "node 1 posing as candidate node 2: {e:?}");
    assert!(e.message().contains("cannot speak for"), "{e:?}");
    let own = peer.pre_vote(pre_vote(ids[1])).await;
    assert!(own.is_ok(), "a pre-vote node 1 asks for itself is answered: {own:?}");
    // The certificate metrics the alerts use (deploy/k8s/base/prometheusrule.yaml) are exported.
    let expiry = cluster.metric("coalesce_tls_cert_expiry_timestamp_seconds{port=\"peer\"}").await;
    assert!(expiry.first().is_some_and(|t| *t > 1.7e9), "{expiry:?}");
    assert_eq!(cluster.metric("coalesce_tls_reloads_total{port=\"peer\",result=\"failed\"}").await.first(), Some(&0.0));
    let refused = cluster.metric("coalesce_raft_peer_refused_total{reason=\"impersonation\"}").await;
    assert!(refused.first().is_some_and(|n| *n >= 2.0), "counted on node 0: {refused:?}");

    // A peer announcing a protocol this build cannot read is refused, and so is everything it
    // sends until it announces a compatible one (as after its upgrade or rollback).
    let future = pb::HelloRequest { cluster: "test".into(), protocol: 90, protocol_min: 90, ..Default::default() };
    let e = peer.hello(future).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "a peer that writes what this build cannot read: {e:?}");
    let e = peer.ping(pb::PingRequest { name: "coalesce-1".into(), boot: 7 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(peer.hello(hello()).await.is_ok(), "a compatible announcement is accepted again");
    assert!(peer.ping(pb::PingRequest { name: "coalesce-1".into(), boot: 7 }).await.is_ok());

    // /loglevel needs the admin token; the probes and /metrics stay open.
    let http = &cluster.local.nodes[0].http_addr;
    let web = reqwest::Client::new();
    let get = |token: Option<&str>| {
        let mut r = web.get(format!("http://{http}/loglevel"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(get(Some(PRODUCER)).await.unwrap().status(), 403);
    assert_eq!(get(Some(ADMIN)).await.unwrap().status(), 200);
    let put = web.put(format!("http://{http}/loglevel")).body("info").send().await.unwrap();
    assert_eq!(put.status(), 401, "changing the log level without a token is refused");
    let put = web.put(format!("http://{http}/loglevel")).bearer_auth(ADMIN).body("info").send().await.unwrap();
    assert_eq!(put.status(), 200);
    for path in ["/metrics", "/livez", "/readyz"] {
        assert_eq!(web.get(format!("http://{http}{path}")).send().await.unwrap().status(), 200, "{path}");
    }

    // Secrets never reach the logs.
    for n in &cluster.local.nodes {
        let log = std::fs::read_to_string(&n.log).unwrap();
        for t in [PRODUCER, CONSUMER, ADMIN] {
            assert!(!log.contains(t), "{} logs a token", n.name);
        }
    }
}

/// Every node's Raft id, by index, asked over the peer port as node 1.
async fn peer_ids(cluster: &Cluster, ca: &str) -> Vec<u64> {
    let (cert, key) = identity(cluster.path(), "coalesce-1");
    let mut ids = Vec::new();
    for i in 0..cluster.local.nodes.len() {
        let mut peer = RaftPeerClient::new(tls_channel(&peer_addr(cluster, i), ca, Some((&cert, &key))));
        ids.push(
            peer.hello(pb::HelloRequest { cluster: "test".into(), ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .node_id,
        );
    }
    ids
}

/// The peer (Raft) address of node `i`, from its config.
fn peer_addr(cluster: &Cluster, i: usize) -> String {
    let text = std::fs::read_to_string(&cluster.local.nodes[i].config).unwrap();
    let line = text.lines().find(|l| l.starts_with("peer_listen")).unwrap().to_owned();
    line.split('"').nth(1).unwrap().to_owned()
}

/// What a node forwards to a shard leader, as postcard lays it out (the raft crate's private
/// `Forwarded`): position 2 carried a whole command before December 2026.
#[derive(serde::Serialize)]
#[allow(dead_code)]
enum Forged {
    Ingest(Vec<coalesce_raft::IngestGroup>),
    Ack { cursor: String, upto_seq: u64 },
    Command(coalesce_raft::Command),
}

/// Sends `forged` to the leader of `shard` on its peer port as a plain caller (no certificate:
/// the peer port of these clusters is loopback-only plain text), and decodes the answer.
async fn forward(
    cluster: &Cluster,
    shard: u32,
    forged: &Forged,
) -> Result<coalesce_raft::Response, coalesce_raft::ProposeError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no leader of shard {shard} answered the forward");
        let leader = cluster.leaders().await.get(&shard).and_then(|l| cluster.index_of(l));
        let Some(i) = leader else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let channel = Channel::from_shared(format!("http://{}", peer_addr(cluster, i)))
            .unwrap()
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        let mut peer = RaftPeerClient::new(channel);
        let Ok(hello) = peer.hello(pb::HelloRequest { cluster: "test".into(), ..Default::default() }).await else {
            continue;
        };
        let payload = postcard::to_allocvec(forged).unwrap();
        let msg = pb::RaftMessage { group: shard, payload, target: hello.into_inner().node_id };
        match peer.forward(msg).await {
            Ok(reply) => return postcard::from_bytes(&reply.into_inner().payload).unwrap(),
            Err(s) => return Err(coalesce_raft::ProposeError::Unreachable { shard, detail: s.to_string() }),
        }
    }
}

/// A key of `stream` that hashes to `shard` of `shards`.
fn key_on(stream: &str, shard: u32, shards: u32, n: usize) -> String {
    (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| coalesce_core::hash::shard_for(stream, k, shards) == shard)
        .nth(n)
        .unwrap()
}

/// One producer group of one partial, as a forwarding node would build it.
fn group(stream: &str, key: &str, sum: i64, inputs: u64, seq: u64) -> coalesce_raft::IngestGroup {
    use coalesce_core::batch::Partial;
    use coalesce_core::buffer::BufKey;
    let partial = Partial {
        agg: coalesce_core::merge::Aggregate::SumI64(sum),
        inputs,
        first_event_at: 1,
        last_event_at: 1,
        samples: None,
    };
    coalesce_raft::IngestGroup {
        range: Some(coalesce_core::session::ProducerRange { producer: 77, first_seq: seq, last_seq: seq }),
        partials: vec![(BufKey { stream: stream.into(), key: key.into() }, partial)],
    }
}

const SUMS: &str = "[streams.sums]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"200ms\" }\nmax_key_bytes = 32\n";

/// Sends one event per key through node 0 (which forwards), retrying until acknowledged.
async fn ingest_all(cluster: &Cluster, producer_id: u64, keys: &[(String, i64)], first_seq: u64) {
    let events: Vec<pb::Event> =
        keys.iter().enumerate().map(|(i, (k, v))| harness::sum_event("sums", k, *v, first_seq + i as u64)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "events on running shards were not acknowledged");
        let req = pb::IngestRequest { producer_id, events: events.clone() };
        if let Ok(r) = cluster.client(0).ingest(req).await
            && r.get_ref()
                .statuses
                .iter()
                .all(|s| s.code == pb::EventCode::Ok as i32 || s.code == pb::EventCode::Duplicate as i32)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_forwards_are_refused_before_anything_is_proposed() {
    use coalesce_raft::ProposeError;
    let cluster = Cluster::start(3, 2, SUMS);
    cluster.wait_ready(Duration::from_secs(30)).await;
    let key = key_on("sums", 0, 2, 0);
    let invalid = |r: Result<coalesce_raft::Response, ProposeError>, what: &str, needle: &str| match r {
        Err(ProposeError::Invalid { error, .. }) => {
            let text = error.to_string();
            assert!(text.contains(needle), "{what}: {text}");
        }
        other => panic!("{what}: expected a refusal, got {other:?}"),
    };

    // The crash of November 2026: a whole Ingest command with a zero tumbling window.
    let mut rules = std::collections::BTreeMap::new();
    let mut r = coalesce_core::stream::StreamsFile::parse(SUMS)
        .and_then(|f| f.validate(&[]))
        .unwrap()
        .get("sums")
        .unwrap()
        .rules
        .clone();
    r.window.tumbling_ms = Some(0);
    rules.insert("sums".to_owned(), r);
    let zero_window = coalesce_raft::Command::Ingest {
        stamp: 1,
        rules,
        limits: Default::default(),
        groups: vec![group("sums", &key, 5, 1, 1)],
    };
    invalid(forward(&cluster, 0, &Forged::Command(zero_window)).await, "whole command", "not forwarded");
    let moved = coalesce_raft::Command::SetPreferredLeader { node: Some("coalesce-2".into()) };
    invalid(forward(&cluster, 0, &Forged::Command(moved)).await, "preferred leader", "not forwarded");
    let seal_all = coalesce_raft::Command::Seal { stamp: u64::MAX, max: 10, session_ttl_ms: 0 };
    invalid(forward(&cluster, 0, &Forged::Command(seal_all)).await, "seal", "not forwarded");
    // Forwarded ingests are checked like a client's request.
    invalid(forward(&cluster, 0, &Forged::Ingest(vec![group("sums", &key, 5, 0, 2)])).await, "zero inputs", "inputs");
    let elsewhere = key_on("sums", 1, 2, 0);
    invalid(forward(&cluster, 0, &Forged::Ingest(vec![group("sums", &elsewhere, 5, 1, 3)])).await, "shard", "shard 1");
    let long = "x".repeat(40);
    let long = (0..).map(|i| format!("{long}{i}")).find(|k| coalesce_core::hash::shard_for("sums", k, 2) == 0).unwrap();
    invalid(forward(&cluster, 0, &Forged::Ingest(vec![group("sums", &long, 5, 1, 4)])).await, "long key", "allows 32");
    let mut bad_range = group("sums", &key, 5, 1, 5);
    bad_range.range = Some(coalesce_core::session::ProducerRange { producer: 77, first_seq: 9, last_seq: 5 });
    invalid(forward(&cluster, 0, &Forged::Ingest(vec![bad_range])).await, "empty range", "first_seq > last_seq");

    // None of it reached the log; a well-formed forward still works, and the cluster is whole.
    let ok = forward(&cluster, 0, &Forged::Ingest(vec![group("sums", &key, 5, 1, 6)])).await;
    assert!(ok.is_ok(), "a well-formed forward is applied: {ok:?}");
    let outputs = cluster.collect_outputs().await;
    assert_eq!(outputs, [(key.clone(), 5)].into(), "only the well-formed forward was applied");
    for i in 0..3 {
        assert!(cluster.is_running(i), "node {i} survived the forged messages");
    }
    let mut refused = 0.0;
    for place in ["peer", "propose"] {
        let series = format!("coalesce_raft_invalid_commands_total{{where=\"{place}\"}}");
        refused += cluster.metric(&series).await.iter().sum::<f64>();
    }
    assert_eq!(refused, 7.0, "every refusal is counted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_that_fails_to_apply_stops_its_group_not_the_nodes() {
    // Validation is skipped before proposing and on replication (test-only failpoint), so the
    // bad entry reaches every replica's apply, which still refuses it.
    let env = [("COALESCE_FAILPOINTS".to_owned(), "skip_validation".to_owned())];
    let shards = 4;
    let mut cluster = Cluster::start_env(tempfile::tempdir().unwrap(), 3, shards, SUMS, "", &env);
    cluster.wait_ready(Duration::from_secs(30)).await;
    let poisoned = 1u32;
    let running: Vec<u32> = (0..shards).filter(|s| *s != poisoned).collect();
    let keys: Vec<(String, i64)> =
        running.iter().flat_map(|s| (0..3).map(move |n| (key_on("sums", *s, shards, n), 1 + i64::from(*s)))).collect();
    ingest_all(&cluster, 5, &keys, 1).await;

    let bad = key_on("sums", poisoned, shards, 0);
    let reply = forward(&cluster, poisoned, &Forged::Ingest(vec![group("sums", &bad, 5, 0, 1)])).await;
    assert!(reply.is_err(), "the entry that stopped its group is not acknowledged: {reply:?}");

    // Every replica that applies the entry stops; it was committed, so that is at least a
    // quorum. A replica that never learned of the commit (the leader stopped before telling
    // it) keeps the entry unapplied, and cannot elect a leader without the stopped ones.
    let stopped_on_a_quorum = |cluster: &Cluster| {
        let nodes: Vec<_> = cluster.local.nodes.iter().map(|n| n.client_addr.clone()).collect();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (mut stopped, mut leading) = (Vec::new(), Vec::new());
                for addr in &nodes {
                    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
                    let Ok(r) = AdminClient::new(channel).shards(pb::ShardsRequest {}).await else { continue };
                    let Some(d) = r.into_inner().shards.into_iter().find(|d| d.shard == poisoned) else { continue };
                    if d.role == "stopped" {
                        assert!(d.stopped.contains("inputs must be at least 1"), "{addr}: {}", d.stopped);
                        stopped.push(addr.clone());
                    } else if d.role == "leader" {
                        leading.push(addr.clone());
                    }
                }
                if stopped.len() >= 2 && leading.is_empty() {
                    return stopped.len();
                }
                assert!(
                    Instant::now() < deadline,
                    "shard {poisoned}: stopped on {stopped:?}, led by {leading:?} (want a quorum stopped, no leader)"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let stopped_replicas = stopped_on_a_quorum(&cluster).await;
    let stopped: f64 = cluster.metric("coalesce_raft_groups_stopped").await.iter().sum();
    assert!(stopped >= stopped_replicas as f64, "every stopped replica counts its group: {stopped}");

    // The other shards keep accepting and emitting.
    ingest_all(&cluster, 5, &keys, 1_000).await;
    let expected: std::collections::BTreeMap<String, i64> = keys.iter().map(|(k, v)| (k.clone(), 2 * v)).collect();
    assert_eq!(cluster.collect_outputs_of(running.clone()).await, expected);
    // A node that stopped the group names it and stays ready (its other shards serve). (A
    // replica that did not apply the entry still waits for a leader of that shard, and is
    // ready or not by the usual rule.)
    let mut named = 0;
    for n in &cluster.local.nodes {
        let r = reqwest::get(format!("http://{}/readyz", n.http_addr)).await.unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        if body.contains(&format!("shard {poisoned} stopped")) {
            assert_eq!(status, 200, "{}: a stopped group does not make the node unready: {body}", n.name);
            named += 1;
        }
    }
    assert!(named >= 2, "readiness names the stopped group on every replica that stopped it");

    // All three restart (the entry is re-applied at start and fails again): no crash loop.
    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        cluster.spawn(i);
    }
    stopped_on_a_quorum(&cluster).await;
    ingest_all(&cluster, 5, &keys, 2_000).await;
    let expected: std::collections::BTreeMap<String, i64> = keys.iter().map(|(k, v)| (k.clone(), 3 * v)).collect();
    assert_eq!(cluster.collect_outputs_of(running).await, expected);
    for i in 0..3 {
        assert!(cluster.is_running(i), "node {i} runs after the restart");
    }
}

/// One forged InstallSnapshot stream to `addr` (the peer port): `chunks` are sent one after
/// the other, then the stream stays open for `hold` before it ends.
async fn send_snapshot(addr: &str, chunks: Vec<pb::SnapshotChunk>, hold: Duration) -> Result<(), tonic::Status> {
    use futures::StreamExt;
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let mut peer = RaftPeerClient::new(channel).max_encoding_message_size(64 << 20);
    let stream = futures::stream::iter(chunks.into_iter().map(Some))
        .chain(futures::stream::once(async move {
            tokio::time::sleep(hold).await;
            None
        }))
        .filter_map(|c| async move { c });
    peer.install_snapshot(stream).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_snapshots_are_refused_and_leave_nothing_behind() {
    use coalesce_storage::snapshot::{header, put_row};
    let raft = "snapshot_max_bytes = 1048576\nsnapshot_stall_timeout = \"1s\"\nsnapshot_concurrent_receives = 1";
    let cluster = Cluster::start_raft(3, 1, SUMS, raft);
    let leaders = cluster.wait_ready(Duration::from_secs(30)).await;
    let leader = cluster.index_of(&leaders[&0]).unwrap();
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let ids = {
        let mut ids = Vec::new();
        for i in 0..3 {
            let channel = Channel::from_shared(format!("http://{}", peer_addr(&cluster, i))).unwrap().connect_lazy();
            let hello = pb::HelloRequest { cluster: "test".into(), ..Default::default() };
            ids.push(RaftPeerClient::new(channel).hello(hello).await.unwrap().into_inner().node_id);
        }
        ids
    };
    let target = ids[follower];
    let addr = peer_addr(&cluster, follower);
    // The current leader's vote, at a term no lower than the follower's.
    let vote = coalesce_raft::types::Vote {
        leader_id: openraft::impls::leader_id_adv::LeaderId { term: 1_000, node_id: ids[leader] },
        committed: true,
    };
    let meta = |term: u64, index: u64| coalesce_raft::codec::SnapshotMetaT {
        last_log_id: Some(coalesce_raft::codec::log_id(term, ids[leader], index)),
        last_membership: Default::default(),
    };
    let first = |meta: &coalesce_raft::codec::SnapshotMetaT, data: Vec<u8>| pb::SnapshotChunk {
        group: 0,
        target,
        vote: coalesce_raft::codec::encode_vote(&vote).unwrap(),
        meta: coalesce_raft::codec::encode_snapshot_meta(meta).unwrap(),
        data,
    };
    let more = |data: Vec<u8>| pb::SnapshotChunk { group: 0, target, vote: Vec::new(), meta: Vec::new(), data };
    let refused = |r: Result<(), tonic::Status>, what: &str, code: tonic::Code, needle: &str| match r {
        Err(s) if s.code() == code && s.message().contains(needle) => {}
        other => panic!("{what}: expected {code:?} with {needle:?}, got {other:?}"),
    };
    let good = meta(900, 1 << 40);

    // Bigger than the 1 MiB the follower accepts, in chunks it would take one by one.
    let mut big = header(3);
    for i in 0..3u8 {
        put_row(&mut big, 2, &[i], &vec![i; 600 << 10]);
    }
    let chunks = std::iter::once(first(&good, big[..1000].to_vec()))
        .chain(big[1000..].chunks(256 << 10).map(|c| more(c.to_vec())))
        .collect();
    refused(send_snapshot(&addr, chunks, Duration::ZERO).await, "too large", tonic::Code::InvalidArgument, "too_large");
    // One chunk past the 4 MiB any sender uses.
    let huge = vec![first(&good, Vec::new()), more(vec![0; 5 << 20])];
    refused(send_snapshot(&addr, huge, Duration::ZERO).await, "huge chunk", tonic::Code::InvalidArgument, "a chunk of");
    // Bytes that are not a snapshot.
    let garbage = vec![first(&good, vec![0xff; 64])];
    refused(send_snapshot(&addr, garbage, Duration::ZERO).await, "garbage", tonic::Code::InvalidArgument, "malformed");
    // Metadata openraft would panic on: a log id beyond the leadership of the vote.
    let beyond = vec![first(&meta(2_000, 1 << 40), header(0))];
    refused(send_snapshot(&addr, beyond, Duration::ZERO).await, "beyond vote", tonic::Code::InvalidArgument, "beyond");
    // Rows that contradict the metadata (no applied log id among them).
    let mut rows = header(1);
    put_row(&mut rows, 2, b"k", b"v");
    let contradicting = vec![first(&good, rows)];
    refused(
        send_snapshot(&addr, contradicting, Duration::ZERO).await,
        "rows",
        tonic::Code::InvalidArgument,
        "contradict",
    );
    // A stream that stops moving is dropped; while it is open, a second one finds the node busy.
    // (A probe that reaches the node first takes its one receive: then the stalled stream is
    // the one refused as busy, and is sent again.)
    let stall = || {
        let (addr, chunks) = (addr.clone(), vec![first(&good, header(5))]);
        tokio::spawn(async move { send_snapshot(&addr, chunks, Duration::from_secs(20)).await })
    };
    let mut stalled = stall();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if stalled.is_finished() {
            match stalled.await.unwrap() {
                Err(s) if s.code() == tonic::Code::ResourceExhausted => stalled = stall(),
                other => panic!("the stalled stream ended before a probe found the node busy: {other:?}"),
            }
        }
        let busy = send_snapshot(&addr, vec![first(&good, header(0))], Duration::ZERO).await;
        if matches!(&busy, Err(s) if s.code() == tonic::Code::ResourceExhausted) {
            break;
        }
        assert!(Instant::now() < deadline, "a second snapshot was not refused as busy: {busy:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    refused(stalled.await.unwrap(), "stalled", tonic::Code::DeadlineExceeded, "stalled");
    assert!(started.elapsed() < Duration::from_secs(10), "the stall was noticed after {:?}", started.elapsed());

    // Nothing was kept, nothing was installed, and every node is still serving.
    let snapshots = cluster.path().join(format!("data-{follower}")).join("snapshots");
    let left: Vec<_> = std::fs::read_dir(&snapshots).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left in {}: {left:?}", snapshots.display());
    for i in 0..3 {
        assert!(cluster.is_running(i), "node {i} survived the forged snapshots");
    }
    let key = key_on("sums", 0, 1, 0);
    ingest_all(&cluster, 9, &[(key.clone(), 3)], 1).await;
    assert_eq!(cluster.collect_outputs().await, [(key, 3)].into());
    let mut counted = 0.0;
    for reason in ["too_large", "invalid", "stalled", "busy"] {
        let series = format!("coalesce_raft_snapshot_refused_total{{reason=\"{reason}\"}}");
        counted += cluster.metric(&series).await.iter().sum::<f64>();
    }
    assert!(counted >= 7.0, "refusals counted: {counted}");
}
