//! All the wiring of a node in one place; the binary only parses flags and calls [`run`].
//!
//! ```text
//!  start:    open RocksDB → start shard groups → build sinks → bind peer + client ports →
//!            bootstrap (initialize the groups this node is first replica of) → window
//!            scheduler, leader balancer, delivery
//!  shutdown: stop the client port → stop delivery (workers ack what they delivered) → hand
//!            leadership of every local shard to a peer → stop the groups → stop the peer port
//!            → close RocksDB (bounded by the grace period)
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use coalesce_proto::v1::admin_server::AdminServer;
use coalesce_proto::v1::coalesce_server::CoalesceServer;
use coalesce_proto::v1::raft_peer_server::RaftPeerServer;
use coalesce_raft::{PeerService, RaftNode};
use coalesce_storage::{NodeDb, StorageOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::AdminService;
use crate::config::Loaded;
use crate::delivery::Delivery;
use crate::grpc::CoalesceService;
use crate::http::Health;
use crate::k8s::LeasePublisher;
use crate::leases::LeaseBook;
use crate::security::AuthLayer;

/// How long shutdown may take before the process gives up on a clean hand-off.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// The gRPC decoding limit of the client port: twice the request limit, so a request somewhat
/// over it still reaches the handler and is refused with INVALID_ARGUMENT naming the limit;
/// anything larger is cut off by gRPC (OUT_OF_RANGE) before it is held in memory.
fn decode_limit(max_request_bytes: usize) -> usize {
    max_request_bytes.saturating_mul(2).saturating_add(1024)
}

/// Addresses a running node listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub peer: SocketAddr,
    pub client: SocketAddr,
    /// The HTTP port, when configured.
    pub http: Option<SocketAddr>,
}

/// The Kubernetes Lease publisher, when `[kubernetes]` enables it. Without an API client it
/// is a configuration error when Leases were asked for explicitly, a warning when they were
/// only detected (running in a pod).
async fn lease_publisher(loaded: &Loaded, node: &Arc<RaftNode>) -> anyhow::Result<Option<Arc<LeasePublisher>>> {
    let cfg = &loaded.config;
    let k = &cfg.kubernetes;
    if !k.enabled() {
        return Ok(None);
    }
    match k.client().await {
        Ok((client, namespace)) => {
            tracing::info!(%namespace, renew = ?k.renew_interval, "publishing shard Leases to Kubernetes");
            Ok(Some(Arc::new(LeasePublisher::new(
                client,
                &namespace,
                &cfg.cluster.name,
                &cfg.node.name,
                node.lease_duration(),
                k,
            ))))
        }
        Err(e) if k.leases == Some(true) => Err(e.context("kubernetes.leases = true, but no Kubernetes API client")),
        Err(e) => {
            tracing::warn!(error = %e, "not publishing shard Leases: no Kubernetes API client");
            Ok(None)
        }
    }
}

/// Waits (bounded) for a stopping server and logs how it ended.
async fn join_server<E: std::fmt::Display>(name: &str, server: tokio::task::JoinHandle<Result<(), E>>) {
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "{name} server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "{name} server task failed"),
        Err(_) => tracing::warn!("{name} server did not stop in time"),
    }
}

/// Streams a peer may reset before the peer port accepts them (see where it is set).
const PEER_PENDING_RESETS: usize = 4096;
/// Calls one peer connection may have open at once: every forward, Raft message and Fetch
/// from one node to another shares a connection, so this is far above what a node sends
/// (forwards are bounded by their callers' concurrency and time out in seconds), yet bounds
/// what one connection can make this node hold. Past it, the peer's client waits.
const PEER_MAX_STREAMS: u32 = 4096;

/// HTTP/2 keepalive on both gRPC ports: after this long without a frame from the other end,
/// the node pings it, and closes the connection if no answer comes within
/// [`KEEPALIVE_TIMEOUT`]. It finds clients that vanished without closing (a crashed host, a cut
/// network) even while a call — a subscription — holds their connection open, which the idle
/// timeout rightly does not close. Every HTTP/2 stack answers pings by itself.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The connections a gRPC port accepts (`TCP_NODELAY`, TLS when `certs` is set, within
/// `limits`: [`coalesce_raft::tls::incoming`]).
fn incoming(
    listener: tokio::net::TcpListener,
    certs: Option<Arc<coalesce_raft::tls::Certs>>,
    port: &'static str,
    limits: coalesce_raft::connections::ConnLimits,
) -> impl futures::Stream<Item = Result<coalesce_raft::tls::Conn, std::io::Error>> + use<> {
    coalesce_raft::tls::incoming(listener, certs.map(|c| c.server_config()), port, limits)
}

/// Says loudly, once the log is up, which ports the config lets listen unauthenticated.
fn warn_insecure(cfg: &crate::config::Config, loaded: &Loaded) {
    let node = &cfg.node;
    if loaded.tls.peer.is_none() && !node.peer_listen.ip().is_loopback() {
        tracing::warn!(
            peer = %node.peer_listen,
            "INSECURE: node.insecure_peer is set and the peer port listens beyond loopback without mutual TLS: \
             anyone who can reach it can act as a node of this cluster"
        );
    }
    let exposed = !node.client_listen.ip().is_loopback() || node.http_listen.is_some_and(|a| !a.ip().is_loopback());
    if !loaded.auth.enabled() && exposed {
        tracing::warn!(
            client = %node.client_listen,
            http = ?node.http_listen,
            "INSECURE: node.insecure is set and no [[auth.tokens]] are configured: anyone who can reach the client \
             or HTTP port can ingest, read and administer this cluster"
        );
    }
    if loaded.auth.enabled() && node.http_listen.is_some_and(|a| !a.ip().is_loopback()) {
        tracing::warn!(
            http = ?node.http_listen,
            "the admin token for /loglevel travels in plain text on the HTTP port: call it from inside the \
             cluster network (or through a port-forward), never across an untrusted one"
        );
    }
    if loaded.auth.enabled() && loaded.tls.client.is_none() && !node.client_listen.ip().is_loopback() {
        tracing::warn!(
            client = %node.client_listen,
            "bearer tokens travel in plain text: the client port has no [tls.client]"
        );
    }
}

async fn wait(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Runs a node until `shutdown` resolves, then shuts it down gracefully. `on_bound` is told the
/// bound addresses once both ports listen.
pub async fn run(
    loaded: Loaded,
    log: Option<crate::telemetry::LogControl>,
    on_bound: impl FnOnce(Bound),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let cfg = &loaded.config;
    coalesce_raft::failpoints::init();
    warn_insecure(cfg, &loaded);
    std::fs::create_dir_all(&cfg.node.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.node.data_dir.display()))?;
    let storage = StorageOptions {
        wal_recovery: cfg.storage.wal_recovery,
        max_open_files: cfg.storage.max_open_files,
        ..StorageOptions::default()
    };
    let db = NodeDb::open(&cfg.node.data_dir, &storage).context("opening RocksDB")?;
    let node = RaftNode::start_with_tls(
        db,
        cfg.cluster_spec(),
        &cfg.node.name,
        cfg.raft_timing(),
        loaded.streams.clone(),
        loaded.tls.peer.as_ref().map(|c| c.client_config()),
    )
    .await
    .context("starting shard groups")?;
    let delivery = Delivery::new(node.clone(), &loaded.sinks, &cfg.node.name, &cfg.node.data_dir)
        .await
        .context("building sinks")?;
    let leases = LeaseBook::new(node.clone());
    let peer_listener = TcpListener::bind(cfg.node.peer_listen)
        .await
        .with_context(|| format!("binding peer port {}", cfg.node.peer_listen))?;
    let client_listener = TcpListener::bind(cfg.node.client_listen)
        .await
        .with_context(|| format!("binding client port {}", cfg.node.client_listen))?;
    let http_listener = match cfg.node.http_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("binding HTTP port {addr}"))?),
        None => None,
    };
    let bound = Bound {
        peer: peer_listener.local_addr()?,
        client: client_listener.local_addr()?,
        http: http_listener.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    tracing::info!(node = %cfg.node.name, id = node.id(), peer = %bound.peer, client = %bound.client, http = ?bound.http, "listening");
    let stream_names: Vec<&str> = loaded.streams.iter().map(|d| d.name.as_str()).collect();
    let sink_names: Vec<&str> = loaded.sinks.iter().map(|s| s.name.as_str()).collect();
    let fetch_streams: Vec<&str> = loaded.fetch.keys().map(String::as_str).collect();
    crate::metrics::init(&stream_names, &sink_names, &fetch_streams);
    let fetch = crate::fetch::FetchService::new(node.clone(), &loaded.fetch, &delivery).context("fetch upstreams")?;
    delivery.set_fetch(fetch.clone());
    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(crate::metrics::NodeCollector::new(node.clone(), delivery.clone())))
        .context("registering the node's metrics")?;
    let node_health = Health::new(node.clone());
    let publisher = lease_publisher(&loaded, &node).await?;

    let (stop_peer, stop_peer_rx) = watch::channel(false);
    let (stop_client, stop_client_rx) = watch::channel(false);
    let stop_client_rx2 = stop_client_rx.clone();
    // h2 answers more than this many streams that the caller reset before the server accepted
    // them with GOAWAY (its guard against rapid-reset floods, default 20). A node paused past
    // its peers' forward timeouts resumes to exactly such a backlog of cancelled forwards and
    // would cut every peer off; the peer port only serves authenticated nodes, so it allows
    // many more. It has no idle timeout (`Config::peer_connections`), so its calls are not
    // counted (`TrackCallsLayer`).
    let mut peer_builder = tonic::transport::Server::builder()
        .http2_max_pending_accept_reset_streams(Some(PEER_PENDING_RESETS))
        .max_concurrent_streams(Some(PEER_MAX_STREAMS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    // One `rpc` span per call, continuing the caller's trace (crate::telemetry). Per
    // connection: bounded streams, bounded calls in progress, and a deadline on each answer;
    // its calls are counted for its idle timeout (`api.connection_idle_timeout`).
    let client_builder = tonic::transport::Server::builder()
        .trace_fn(crate::telemetry::rpc_span)
        .max_concurrent_streams(Some(cfg.api.max_streams_per_connection))
        .concurrency_limit_per_connection(cfg.api.max_concurrent_calls_per_connection)
        .timeout(cfg.api.request_timeout)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    // Rotated certificates are picked up without a restart.
    let reloads: Vec<_> = [&loaded.tls.peer, &loaded.tls.client]
        .into_iter()
        .flatten()
        .map(|c| tokio::spawn(c.clone().watch(loaded.config.tls.reload_interval, wait(stop_peer_rx.clone()))))
        .collect();
    let peer_server = tokio::spawn(
        peer_builder
            .add_service(RaftPeerServer::new(PeerService::new(node.clone())).max_decoding_message_size(64 << 20))
            .add_service(coalesce_proto::v1::fetch_peer_server::FetchPeerServer::new(fetch.clone()))
            .serve_with_incoming_shutdown(
                incoming(peer_listener, loaded.tls.peer.clone(), "peer", cfg.peer_connections()),
                wait(stop_peer_rx.clone()),
            ),
    );
    // Standard gRPC health (`grpc.health.v1`) and server reflection on the client port.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoalesceServer<CoalesceService>>().await;
    // Reflection in both versions: `v1`, and `v1alpha`, the only one many tools still speak
    // (grpcurl before 1.9 among them).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(coalesce_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Only what this port serves (the descriptors also hold the peer service).
            .with_service_name("coalesce.v1.Coalesce")
            .with_service_name("coalesce.v1.Admin")
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1alpha = reflection().build_v1alpha().context("building the reflection service (v1alpha)")?;
    let reflection = reflection().build_v1().context("building the reflection service")?;
    let client_server = tokio::spawn(
        client_builder
            .layer(coalesce_raft::connections::TrackCallsLayer)
            .layer(AuthLayer::new(loaded.auth.clone()))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(AdminServer::new(AdminService::new(node.clone(), delivery.clone(), leases.clone())))
            .add_service(
                CoalesceServer::new(
                    CoalesceService::new(node.clone(), cfg.api, delivery.clone(), fetch)
                        .with_stopping(stop_client_rx.clone()),
                )
                .max_decoding_message_size(decode_limit(cfg.api.max_request_bytes)),
            )
            .serve_with_incoming_shutdown(
                incoming(client_listener, loaded.tls.client.clone(), "client", cfg.client_connections()),
                wait(stop_client_rx),
            ),
    );
    // The HTTP port stops last: probes and scrapes answer (not ready) during the hand-off.
    let (stop_http, stop_http_rx) = watch::channel(false);
    let http_server = http_listener.map(|listener| {
        let log = log.map(Arc::new);
        let auth = loaded.auth.clone();
        let conns = coalesce_raft::tls::incoming(listener, None, "http", cfg.http_connections());
        tokio::spawn(crate::http::serve(conns, node_health.clone(), registry, log, auth, wait(stop_http_rx.clone())))
    });
    let watchdog = tokio::spawn(node_health.clone().run_watchdog(wait(stop_http_rx)));
    on_bound(bound);

    let boot_node = node.clone();
    let boot_health = node_health.clone();
    let bootstrap = tokio::spawn(async move {
        loop {
            match boot_node.bootstrap(Duration::from_secs(30)).await {
                Ok(()) => {
                    tracing::info!("bootstrap complete");
                    boot_health.set_bootstrapped();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bootstrap incomplete, retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    let identity = tokio::spawn(Arc::clone(&node).settle_identity(wait(stop_peer_rx.clone())));
    let sealer = tokio::spawn(Arc::clone(&node).run_sealer(Duration::from_millis(20), wait(stop_peer_rx.clone())));
    let liveness = tokio::spawn(Arc::clone(&node).run_liveness(wait(stop_peer_rx.clone())));
    let balancer = tokio::spawn(Arc::clone(&node).run_balancer(Duration::from_secs(2), wait(stop_client_rx2.clone())));
    let delivering = tokio::spawn(Arc::clone(&delivery).run(wait(stop_client_rx2.clone())));
    let retention = tokio::spawn(
        crate::retention::Retention::new(node.clone(), delivery.clone())
            .run(Duration::from_secs(1), wait(stop_client_rx2.clone())),
    );
    let lease_book = tokio::spawn(Arc::clone(&leases).run(Duration::from_millis(100), wait(stop_client_rx2.clone())));
    let publishing =
        publisher.map(|p| tokio::spawn(p.run(node.clone(), Duration::from_millis(100), wait(stop_client_rx2))));

    shutdown.await;
    tracing::info!("shutting down: closing the client port, handing off leadership");
    node_health.set_stopping();
    health.set_not_serving::<CoalesceServer<CoalesceService>>().await;
    let _ = stop_client.send(true);
    bootstrap.abort();
    identity.abort();
    let _ = balancer.await;
    let _ = delivering.await;
    let _ = retention.await;
    let _ = lease_book.await;
    if let Some(p) = publishing {
        let _ = p.await;
    }
    node.shutdown(SHUTDOWN_GRACE).await;
    let _ = stop_peer.send(true);
    let _ = sealer.await;
    let _ = liveness.await;
    for r in reloads {
        let _ = r.await;
    }
    for (name, server) in [("client", client_server), ("peer", peer_server)] {
        join_server(name, server).await;
    }
    let _ = stop_http.send(true);
    let _ = watchdog.await;
    if let Some(server) = http_server {
        join_server("HTTP", server).await;
    }
    tracing::info!("stopped");
    Ok(())
}
