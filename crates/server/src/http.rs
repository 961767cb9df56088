//! The node's HTTP port (`node.http_listen`, axum): what Kubernetes and Prometheus talk to.
//!
//! | path | |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition (`crate::metrics`) |
//! | `GET /livez` | 200 unless the process is wedged: the runtime's watchdog tick is late |
//! | `GET /readyz` | 200 only when the node serves its shards: bootstrapped, not shutting down, every local shard has a leader; a line per shard group stopped on this node (an entry failed to apply), which does not make it unready |
//! | `GET /loglevel` | the current log filter (`tracing_subscriber::EnvFilter` syntax); admin |
//! | `PUT /loglevel` | replace it, e.g. `curl -X PUT -H "authorization: Bearer $TOKEN" --data 'info,coalesce_raft=debug' :7402/loglevel`; admin |
//!
//! `/metrics` and the probes are open (Prometheus and the kubelet); with `[[auth.tokens]]`,
//! everything else needs an admin token (401 without a known token, 403 without the role),
//! as the client port's `Admin` service does. Keep the port on the cluster network.
//!
//! The port serves HTTP/1.1 on the connections of the same accept loop as the gRPC ports
//! (`coalesce_raft::tls::incoming`), so the same bounds hold: at most `node.http_max_connections`
//! open, a first byte within 10 s, and no connection kept without a request in progress for
//! more than 60 s (a kept-alive one between scrapes, or a request header trickled forever).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use coalesce_raft::RaftNode;
use coalesce_raft::tls::Conn;
use futures::{Stream, StreamExt};

use crate::metrics::{WATCHDOG_LIMIT, WATCHDOG_TICK};
use crate::security::{Auth, Role};
use crate::telemetry::LogControl;

/// Liveness and readiness of a node.
#[derive(Debug)]
pub struct Health {
    node: Arc<RaftNode>,
    started: Instant,
    /// Milliseconds since `started` of the watchdog's last tick.
    last_tick_ms: AtomicU64,
    bootstrapped: AtomicBool,
    stopping: AtomicBool,
}

impl Health {
    pub fn new(node: Arc<RaftNode>) -> Arc<Self> {
        Arc::new(Self {
            node,
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            bootstrapped: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        })
    }

    /// Bootstrap finished: every local group is initialized (or joined).
    pub fn set_bootstrapped(&self) {
        self.bootstrapped.store(true, Ordering::Release);
    }

    /// Shutdown began: readiness turns false so traffic moves elsewhere.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Ticks until `shutdown`: a runtime too starved or blocked to run this task fails `/livez`.
    pub async fn run_watchdog(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(WATCHDOG_TICK);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {
                    self.last_tick_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Release);
                }
            }
        }
    }

    /// `Err(why)` when the process looks wedged.
    pub fn live(&self) -> Result<(), String> {
        let now = self.started.elapsed().as_millis() as u64;
        let late = now.saturating_sub(self.last_tick_ms.load(Ordering::Acquire));
        if late > WATCHDOG_LIMIT.as_millis() as u64 {
            return Err(format!("the runtime watchdog last ticked {late} ms ago"));
        }
        Ok(())
    }

    /// One line per shard group stopped on this node (an entry failed to apply), for the
    /// readiness body: the node stays ready for its other shards.
    pub fn degraded(&self) -> Vec<String> {
        self.node.stopped_groups().iter().map(|(shard, f)| format!("shard {shard} stopped: {f}")).collect()
    }

    /// `Err(why)` while the node does not serve its shards.
    pub fn ready(&self) -> Result<(), String> {
        if self.stopping.load(Ordering::Acquire) {
            return Err("shutting down".into());
        }
        if !self.bootstrapped.load(Ordering::Acquire) {
            return Err("bootstrapping: not every local shard group is initialized yet".into());
        }
        // A group stopped by an entry that failed to apply is reported (`degraded`, metrics,
        // `coalescectl shards`) but does not make the node unready: its other shards serve.
        let stopped = self.node.stopped_groups();
        let leaderless: Vec<String> = self
            .node
            .groups()
            .iter()
            .filter(|g| !stopped.contains_key(&g.shard))
            .filter(|g| self.node.shard_view(g.shard).is_none_or(|v| v.leader.is_none()))
            .map(|g| g.shard.to_string())
            .collect();
        if !leaderless.is_empty() {
            return Err(format!("shards without a known leader: {}", leaderless.join(", ")));
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    registry: prometheus::Registry,
    log: Option<Arc<LogControl>>,
    auth: Arc<Auth>,
}

/// Admin routes: a token with the admin role when tokens are configured.
fn admin(s: &AppState, headers: &HeaderMap, what: &str) -> Result<(), (StatusCode, String)> {
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    s.auth.check_role(Some(Role::Admin), what, authorization).map_err(|status| {
        let code = if status.code() == tonic::Code::PermissionDenied {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        (code, format!("{}\n", status.message()))
    })
}

fn verdict(r: Result<(), String>) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let body = tokio::task::spawn_blocking(move || crate::metrics::render(&s.registry)).await.unwrap_or_default();
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body)
}

async fn livez(State(s): State<AppState>) -> impl IntoResponse {
    verdict(s.health.live())
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let (code, mut body) = verdict(s.health.ready());
    for line in s.health.degraded() {
        body.push_str(&line);
        body.push('\n');
    }
    (code, body)
}

async fn get_log(State(s): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    if let Err(refused) = admin(&s, &headers, "GET /loglevel") {
        return refused;
    }
    match &s.log {
        Some(l) => (StatusCode::OK, format!("{}\n", l.current())),
        None => (StatusCode::NOT_FOUND, "this process does not control its log filter\n".into()),
    }
}

async fn put_log(State(s): State<AppState>, headers: HeaderMap, body: String) -> impl IntoResponse {
    if let Err(refused) = admin(&s, &headers, "PUT /loglevel") {
        return refused;
    }
    match &s.log {
        Some(l) => match l.set(body.trim()) {
            Ok(()) => {
                tracing::info!(filter = %body.trim(), "log filter changed");
                (StatusCode::OK, format!("{}\n", l.current()))
            }
            Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        None => (StatusCode::NOT_FOUND, "this process does not control its log filter\n".into()),
    }
}

/// `PUT /failpoints/slow_disk` with a duration ("300ms", "0s"): every fsync of this node takes
/// that much longer. Test-only (the chaos tool's slow-disk fault): the route exists only when
/// the node started with the `runtime` failpoint (`COALESCE_FAILPOINTS=runtime`).
async fn put_slow_disk(State(s): State<AppState>, headers: HeaderMap, body: String) -> impl IntoResponse {
    if let Err(refused) = admin(&s, &headers, "PUT /failpoints/slow_disk") {
        return refused;
    }
    match humantime::parse_duration(body.trim()) {
        Ok(d) if d <= std::time::Duration::from_secs(60) => {
            s.health.node.set_disk_latency(d);
            tracing::warn!(extra = ?d, "failpoint slow_disk: every fsync takes this much longer");
            (StatusCode::OK, format!("slow_disk {}\n", humantime::format_duration(d)))
        }
        Ok(_) => (StatusCode::BAD_REQUEST, "slow_disk: at most 60s\n".into()),
        Err(e) => (StatusCode::BAD_REQUEST, format!("slow_disk: {:?} is not a duration: {e}\n", body.trim())),
    }
}

/// Serves the HTTP port on the connections `conns` yields until `shutdown` resolves.
pub async fn serve(
    conns: impl Stream<Item = std::io::Result<Conn>> + Send + 'static,
    health: Arc<Health>,
    registry: prometheus::Registry,
    log: Option<Arc<LogControl>>,
    auth: Arc<Auth>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/loglevel", get(get_log).put(put_log));
    let app = if coalesce_raft::failpoints::active("runtime") {
        app.route("/failpoints/slow_disk", axum::routing::put(put_slow_disk))
    } else {
        app
    };
    let app = app.with_state(AppState { health, registry, log, auth });
    serve_connections(conns, app, shutdown).await;
    Ok(())
}

/// Serves `app` over HTTP/1.1 on every connection of `conns` until `shutdown` resolves, then
/// stops accepting and lets each connection finish the request it is serving.
async fn serve_connections(
    conns: impl Stream<Item = std::io::Result<Conn>>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new()).http1_only();
    // Every connection's task holds a receiver: `closed` resolves once all have ended.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    // Boxed, not pinned in place: dropping it must stop the accept loop before the drain.
    let mut conns = Box::pin(conns);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            _ = &mut shutdown => break,
            next = conns.next() => match next {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        // Requests count as the connection's calls: none in progress is what its idle timeout
        // measures.
        let service = hyper_util::service::TowerToHyperService::new(conn.track_calls(app.clone()));
        let builder = builder.clone();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let served = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            let mut served = std::pin::pin!(served);
            let ended = tokio::select! {
                r = served.as_mut() => Some(r),
                _ = stopping.wait_for(|s| *s) => None,
            };
            let outcome = match ended {
                Some(r) => r,
                None => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(error) = outcome {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        });
    }
    // Stop accepting (the accept loop ends with its stream), then drain.
    drop(conns);
    drop(stopping);
    let _ = stop.send(true);
    stop.closed().await;
}
