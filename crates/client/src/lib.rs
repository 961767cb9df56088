//! Rust client for Coalesce.
//!
//! * [`Client`] knows every shard's leader (from the nodes' `Status`) and sends each event
//!   straight to its shard's leader, so a request costs one network hop instead of two. Any
//!   node would accept it and forward it; routing here only saves the hop.
//! * [`Producer`] is an idempotent producer lane: it numbers events with a strictly increasing
//!   `producer_seq` under a random producer id and retries what the cluster could not settle
//!   (no leader, unknown outcome after a failover, buffer full) with the *same* seqs, so a
//!   retried event is applied exactly once. One lane has one request in flight (`send` takes
//!   `&mut self`); run several lanes for parallelism.
//!
//! ```no_run
//! # async fn demo() -> Result<(), coalesce_client::ClientError> {
//! use coalesce_client::{Client, event};
//! let client = Client::connect(["127.0.0.1:7400", "127.0.0.1:7410"]).await?;
//! let mut producer = client.producer();
//! let report = producer.send(vec![event("page-views", "home", 1i64)]).await?;
//! assert!(report.all_acked());
//! # Ok(()) }
//! ```
//!
//! Clusters with TLS on the client port and bearer tokens take [`ClientOptions`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), coalesce_client::ClientError> {
//! use coalesce_client::{Client, ClientOptions};
//! let ca = std::fs::read("ca.pem").expect("CA certificate");
//! let options = ClientOptions::default().with_ca_pem(ca).with_token("the-producer-token");
//! let client = Client::connect_with(["coalesce-0.example:7400"], options).await?;
//! # Ok(()) }
//! ```
//!
//! Uses tonic for gRPC (rustls for TLS) and the core crate's XXH3 shard hash (the same
//! function the nodes use).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coalesce_proto::v1 as pb;
use coalesce_proto::v1::EventCode;
use coalesce_proto::v1::coalesce_client::CoalesceClient;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The gRPC client of one node, with the bearer token (if any) on every call.
pub type NodeClient = CoalesceClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call (nothing without a token). Its `Debug`
/// never shows the token.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// A token for `authorization: Bearer …`; `None` when it is not a valid header value.
    pub fn new(token: &str) -> Option<Self> {
        let mut v: MetadataValue<Ascii> = format!("Bearer {}", token.trim()).parse().ok()?;
        v.set_sensitive(true);
        Some(Self(Some(v)))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "BearerToken(<redacted>)" } else { "BearerToken(none)" })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// How to reach the nodes: TLS (trusting a CA, optionally with a client certificate) and a
/// bearer token. The default is plain text without a token.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    tls: Option<ClientTlsConfig>,
    token: BearerToken,
}

impl ClientOptions {
    /// Speak TLS, trusting servers whose certificate `ca_pem` signed.
    pub fn with_ca_pem(mut self, ca_pem: impl AsRef<[u8]>) -> Self {
        let tls = self.tls.take().unwrap_or_default().ca_certificate(Certificate::from_pem(ca_pem));
        self.tls = Some(tls);
        self
    }

    /// Present a client certificate (for clusters that require one on the client port).
    pub fn with_identity_pem(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        let tls = self.tls.take().unwrap_or_default().identity(Identity::from_pem(cert_pem, key_pem));
        self.tls = Some(tls);
        self
    }

    /// Check the servers' certificates against this name instead of the host in the address.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        let tls = self.tls.take().unwrap_or_default().domain_name(name);
        self.tls = Some(tls);
        self
    }

    /// Send `authorization: Bearer <token>` with every call (a token with whitespace or
    /// control characters in it is ignored).
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = BearerToken::new(token).unwrap_or_default();
        self
    }

    /// A channel to `addr` (`host:port` or a URI) with these options.
    pub fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let bad = |detail: String| ClientError::BadEndpoint { addr: addr.to_owned(), detail };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let uri = if addr.contains("://") { addr.to_owned() } else { format!("{scheme}://{addr}") };
        let mut endpoint = Channel::from_shared(uri).map_err(|e| bad(e.to_string()))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| bad(e.to_string()))?;
        }
        Ok(endpoint
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            .connect_lazy())
    }

    /// The token interceptor.
    pub fn token(&self) -> BearerToken {
        self.token.clone()
    }
}

pub use coalesce_core::hash::shard_for;
pub use coalesce_proto::v1::{Event, EventStatus, Output, StatusResponse, Value};

/// What went wrong talking to the cluster as a whole (per-event outcomes are in [`SendReport`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("bad endpoint {addr:?}: {detail}")]
    BadEndpoint { addr: String, detail: String },
    #[error("no node answered ({detail})")]
    NoNodeAnswered { detail: String },
    #[error("cluster not ready: {detail}")]
    NotReady { detail: String },
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
}

/// Builds an event of `stream` for `key` carrying `value`.
pub fn event(stream: &str, key: &str, value: impl Into<ValueKind>) -> Event {
    Event {
        stream: stream.to_owned(),
        key: key.to_owned(),
        value: value.into().0.map(|kind| Value { kind: Some(kind) }),
        event_time_ms: None,
        producer_seq: 0,
    }
}

/// An event value; `()` for `count` streams.
#[derive(Debug, Clone)]
pub struct ValueKind(Option<pb::value::Kind>);

impl From<i64> for ValueKind {
    fn from(v: i64) -> Self {
        Self(Some(pb::value::Kind::Int(v)))
    }
}
impl From<f64> for ValueKind {
    fn from(v: f64) -> Self {
        Self(Some(pb::value::Kind::Float(v)))
    }
}
impl From<&str> for ValueKind {
    fn from(v: &str) -> Self {
        Self(Some(pb::value::Kind::Str(v.to_owned())))
    }
}
impl From<String> for ValueKind {
    fn from(v: String) -> Self {
        Self(Some(pb::value::Kind::Str(v)))
    }
}
impl From<Vec<u8>> for ValueKind {
    fn from(v: Vec<u8>) -> Self {
        Self(Some(pb::value::Kind::Bytes(v)))
    }
}
impl From<()> for ValueKind {
    fn from(_: ()) -> Self {
        Self(None)
    }
}

/// How a [`Producer`] retries.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Give up on an event (returning its last status) after this long.
    pub give_up_after: Duration,
    /// Timeout of one attempt (one RPC to one node).
    pub attempt_timeout: Duration,
    /// First backoff after an unavailable shard; doubles per round up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            give_up_after: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(5),
            min_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, Default)]
struct Routes {
    shards: u32,
    /// Client address of each shard's leader, with the term it was learned at.
    leaders: HashMap<u32, (u64, String)>,
}

#[derive(Debug)]
struct Inner {
    endpoints: Vec<String>,
    options: ClientOptions,
    channels: Mutex<HashMap<String, Channel>>,
    routes: Mutex<Routes>,
    /// Serializes route refreshes so a failover does not trigger one per in-flight request.
    refreshing: tokio::sync::Mutex<Instant>,
}

/// A connection to a cluster: one HTTP/2 channel per node, and a route table.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects through any of `endpoints` (client addresses, `host:port`) and learns the
    /// shard count and leaders. Fails only if no endpoint answers.
    pub async fn connect<I, S>(endpoints: I) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::connect_with(endpoints, ClientOptions::default()).await
    }

    /// [`Client::connect`] with TLS and/or a bearer token.
    pub async fn connect_with<I, S>(endpoints: I, options: ClientOptions) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let client = Self::connect_lazy_with(endpoints, options)?;
        client.refresh_routes().await?;
        Ok(client)
    }

    /// A client that has not talked to the cluster yet (see [`Client::wait_ready`]).
    pub fn connect_lazy<I, S>(endpoints: I) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::connect_lazy_with(endpoints, ClientOptions::default())
    }

    /// [`Client::connect_lazy`] with TLS and/or a bearer token.
    pub fn connect_lazy_with<I, S>(endpoints: I, options: ClientOptions) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let mut channels = HashMap::new();
        for addr in &endpoints {
            channels.insert(addr.clone(), options.channel(addr)?);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                endpoints,
                options,
                channels: Mutex::new(channels),
                routes: Mutex::default(),
                refreshing: tokio::sync::Mutex::new(
                    Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(Instant::now),
                ),
            }),
        })
    }

    /// Polls the endpoints until every shard has a known leader, or fails after `within`
    /// saying how many shards have one.
    pub async fn wait_ready(&self, within: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + within;
        loop {
            let refreshed = self.refresh_routes().await;
            let (led, shards) = {
                let r = self.routes();
                (r.leaders.len(), r.shards)
            };
            if refreshed.is_ok() && shards > 0 && led == shards as usize {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let detail = match refreshed {
                    Err(e) => e.to_string(),
                    Ok(()) => format!("only {led} of {shards} shards have a leader after {within:?}"),
                };
                return Err(ClientError::NotReady { detail });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The gRPC client of the node at `addr` (channels are created once and shared).
    pub fn node(&self, addr: &str) -> Result<NodeClient, ClientError> {
        let mut channels = self.inner.channels.lock().unwrap_or_else(|p| p.into_inner());
        let c = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = self.inner.options.channel(addr)?;
                channels.insert(addr.to_owned(), c.clone());
                c
            }
        };
        Ok(CoalesceClient::with_interceptor(c, self.inner.options.token()))
    }

    /// The endpoints this client was given.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// The number of shards of the cluster.
    pub fn shards(&self) -> u32 {
        self.routes().shards
    }

    /// The shard of `(stream, key)`.
    pub fn shard_of(&self, stream: &str, key: &str) -> u32 {
        shard_for(stream, key, self.shards().max(1))
    }

    /// The client address of `shard`'s leader, if known.
    pub fn leader_addr(&self, shard: u32) -> Option<String> {
        self.routes().leaders.get(&shard).map(|(_, a)| a.clone())
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.inner.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Status` of every endpoint, in parallel (failures are skipped).
    pub async fn statuses(&self) -> Vec<(String, Result<StatusResponse, tonic::Status>)> {
        let calls = self.inner.endpoints.iter().map(|addr| async move {
            let result = match self.node(addr) {
                Ok(mut c) => {
                    let mut req = tonic::Request::new(pb::StatusRequest {});
                    req.set_timeout(Duration::from_secs(2));
                    c.status(req).await.map(tonic::Response::into_inner)
                }
                Err(e) => Err(tonic::Status::invalid_argument(e.to_string())),
            };
            (addr.clone(), result)
        });
        futures::future::join_all(calls).await
    }

    /// Asks every endpoint for its view and keeps, per shard, the leader of the highest term.
    pub async fn refresh_routes(&self) -> Result<(), ClientError> {
        let mut answered = 0;
        let mut last_error = String::new();
        let mut fresh: HashMap<u32, (u64, String)> = HashMap::new();
        let mut shards = 0;
        for (addr, result) in self.statuses().await {
            match result {
                Ok(st) => {
                    answered += 1;
                    shards = st.shards;
                    for s in st.local_shards {
                        let term = s.epoch.map_or(0, |e| e.term);
                        if s.leader_addr.is_empty() {
                            continue;
                        }
                        let newer = fresh.get(&s.shard).is_none_or(|(t, _)| term > *t);
                        if newer {
                            fresh.insert(s.shard, (term, s.leader_addr));
                        }
                    }
                }
                Err(e) => last_error = format!("{addr}: {}", e.message()),
            }
        }
        if answered == 0 {
            return Err(ClientError::NoNodeAnswered { detail: last_error });
        }
        let mut routes = self.routes();
        routes.shards = shards;
        routes.leaders = fresh;
        Ok(())
    }

    /// Refreshes routes unless another caller did in the last 20 ms.
    async fn refresh_soon(&self) {
        let mut last = self.inner.refreshing.lock().await;
        if last.elapsed() < Duration::from_millis(20) {
            return;
        }
        if let Err(e) = self.refresh_routes().await {
            tracing::debug!(error = %e, "route refresh failed");
        }
        *last = Instant::now();
    }

    fn forget_leader(&self, addr: &str) {
        self.routes().leaders.retain(|_, (_, a)| a != addr);
    }

    /// A new idempotent producer lane with a random id.
    pub fn producer(&self) -> Producer {
        self.producer_with(RetryPolicy::default())
    }

    /// A new producer lane that retries per `policy`.
    pub fn producer_with(&self, policy: RetryPolicy) -> Producer {
        Producer { client: self.clone(), id: rand::random::<u64>() | 1, next_seq: 1, policy, rr: 0 }
    }
}

/// The outcome of [`Producer::send`]: one final status per event, in order.
#[derive(Debug, Clone, Default)]
pub struct SendReport {
    pub statuses: Vec<EventStatus>,
    /// Requests retried (a request per node per round).
    pub retries: u64,
}

impl SendReport {
    /// Acknowledged events: applied (`OK`), already applied (`DUPLICATE`) or shed by policy.
    pub fn acked(&self) -> usize {
        self.statuses.iter().filter(|s| is_acked(s.code)).count()
    }

    /// True when every event was acknowledged.
    pub fn all_acked(&self) -> bool {
        self.statuses.iter().all(|s| is_acked(s.code))
    }

    /// The events that were not acknowledged, with their status.
    pub fn failures(&self) -> impl Iterator<Item = (usize, &EventStatus)> {
        self.statuses.iter().enumerate().filter(|(_, s)| !is_acked(s.code))
    }
}

/// True when an event status `code` means the event is acknowledged (applied, a duplicate of an
/// applied one, or shed by the stream's overflow policy).
pub fn is_acked(code: i32) -> bool {
    code == EventCode::Ok as i32 || code == EventCode::Duplicate as i32 || code == EventCode::Shed as i32
}

/// True when retrying with the same seqs may succeed: no leader right now, outcome unknown,
/// a full buffer or outbox, or a key full until its window closes (`key_overflow = "reject"`).
fn is_retryable(s: &EventStatus) -> bool {
    let code = s.code;
    code == EventCode::Unavailable as i32
        || code == EventCode::Unknown as i32
        || (code == EventCode::ResourceExhausted as i32
            && matches!(s.reason.as_str(), "buffer_full" | "outbox_full" | "key_full"))
}

/// An idempotent producer lane (see the crate docs).
#[derive(Debug)]
pub struct Producer {
    client: Client,
    id: u64,
    next_seq: u64,
    policy: RetryPolicy,
    rr: usize,
}

impl Producer {
    /// This lane's producer id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends `events`, numbering those without a `producer_seq` after the last one sent, and
    /// retries retryable failures with the same seqs until they settle or the policy gives up.
    /// Events with an explicit `producer_seq` must continue this lane's increasing sequence.
    ///
    /// An event that comes back `UNAVAILABLE` or `UNKNOWN` after giving up may or may not have
    /// been applied; sending it again from this lane with the same seq is always safe.
    pub async fn send(&mut self, mut events: Vec<Event>) -> Result<SendReport, ClientError> {
        for e in &mut events {
            if e.producer_seq == 0 {
                e.producer_seq = self.next_seq;
            }
            self.next_seq = self.next_seq.max(e.producer_seq + 1);
        }
        let give_up = Instant::now() + self.policy.give_up_after;
        let mut report = SendReport { statuses: vec![EventStatus::default(); events.len()], retries: 0 };
        let mut pending: Vec<usize> = (0..events.len()).collect();
        let mut backoff = self.policy.min_backoff;
        loop {
            let shards = self.client.shards().max(1);
            self.rr = self.rr.wrapping_add(1);
            let by_target = {
                let routes = self.client.routes();
                route(&events, &pending, shards, &routes.leaders, &self.client.inner.endpoints, self.rr)
            };
            let calls = by_target.into_iter().map(|(addr, idx)| {
                let req = pb::IngestRequest {
                    producer_id: self.id,
                    events: idx.iter().map(|&i| events[i].clone()).collect(),
                };
                let client = &self.client;
                let timeout = self.policy.attempt_timeout;
                async move {
                    let result = match client.node(&addr) {
                        Ok(mut c) => {
                            let mut req = tonic::Request::new(req);
                            req.set_timeout(timeout);
                            c.ingest(req).await.map(tonic::Response::into_inner)
                        }
                        Err(e) => Err(tonic::Status::invalid_argument(e.to_string())),
                    };
                    (addr, idx, result)
                }
            });
            let mut retry = Vec::new();
            let mut retry_after = Duration::ZERO;
            let mut stale = false;
            for (addr, idx, result) in futures::future::join_all(calls).await {
                match result {
                    Ok(resp) if resp.statuses.len() == idx.len() => {
                        if !resp.leader_hints.is_empty() || resp.shards != shards {
                            let mut routes = self.client.routes();
                            if resp.shards > 0 {
                                routes.shards = resp.shards;
                            }
                            for (shard, addr) in resp.leader_hints {
                                routes.leaders.insert(shard, (0, addr));
                            }
                        }
                        for (i, s) in idx.into_iter().zip(resp.statuses) {
                            if is_retryable(&s) {
                                if !s.leader_hint.is_empty() {
                                    self.client.routes().leaders.insert(s.shard, (0, s.leader_hint.clone()));
                                }
                                retry_after = retry_after.max(Duration::from_millis(s.retry_after_ms));
                                if s.code != EventCode::ResourceExhausted as i32 {
                                    stale = true;
                                }
                                retry.push(i);
                            }
                            report.statuses[i] = s;
                        }
                    }
                    Ok(resp) => {
                        return Err(ClientError::Rpc(tonic::Status::internal(format!(
                            "{addr} answered {} statuses for {} events",
                            resp.statuses.len(),
                            idx.len()
                        ))));
                    }
                    Err(status) if is_request_error(&status) => return Err(ClientError::Rpc(status)),
                    Err(status) => {
                        tracing::debug!(%addr, error = %status.message(), "ingest attempt failed");
                        self.client.forget_leader(&addr);
                        stale = true;
                        for i in idx {
                            report.statuses[i] = EventStatus {
                                code: EventCode::Unavailable as i32,
                                reason: "transport".into(),
                                message: format!("{addr}: {}", status.message()),
                                ..Default::default()
                            };
                            retry.push(i);
                        }
                    }
                }
            }
            if retry.is_empty() || Instant::now() >= give_up {
                return Ok(report);
            }
            retry.sort_unstable();
            pending = retry;
            report.retries += 1;
            if stale {
                self.client.refresh_soon().await;
            }
            let jitter = Duration::from_micros(rand::random::<u64>() % (backoff.as_micros() as u64 / 2 + 1));
            let wait = if retry_after > Duration::ZERO && !stale { retry_after } else { backoff + jitter };
            tokio::time::sleep(wait.min(give_up.saturating_duration_since(Instant::now()))).await;
            backoff = (backoff * 2).min(self.policy.max_backoff);
        }
    }
}

/// Splits the `pending` events by target node: a shard's known leader, else an endpoint
/// chosen per shard (rotating with `rr`). All of a shard's events go to one target, so a
/// producer never has two requests for one shard in flight: a shard applies a producer's
/// seqs in order, and a later, higher range applied first would make the earlier one look
/// like a duplicate.
fn route(
    events: &[Event],
    pending: &[usize],
    shards: u32,
    leaders: &HashMap<u32, (u64, String)>,
    endpoints: &[String],
    rr: usize,
) -> BTreeMap<String, Vec<usize>> {
    let mut by_target: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for &i in pending {
        let e = &events[i];
        let shard = shard_for(&e.stream, &e.key, shards);
        let target = match leaders.get(&shard) {
            Some((_, addr)) => addr.clone(),
            None => endpoints[rr.wrapping_add(shard as usize) % endpoints.len()].clone(),
        };
        by_target.entry(target).or_default().push(i);
    }
    by_target
}

/// Errors that retrying elsewhere cannot fix: the request itself is refused.
fn is_request_error(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_and_retryable_codes() {
        let s = |code: EventCode, reason: &str| EventStatus {
            code: code as i32,
            reason: reason.into(),
            ..Default::default()
        };
        assert!(is_acked(EventCode::Ok as i32) && is_acked(EventCode::Duplicate as i32));
        assert!(!is_acked(EventCode::Unavailable as i32));
        assert!(is_retryable(&s(EventCode::Unavailable, "not_leader")));
        assert!(is_retryable(&s(EventCode::Unknown, "outcome_unknown")));
        assert!(is_retryable(&s(EventCode::ResourceExhausted, "buffer_full")));
        assert!(!is_retryable(&s(EventCode::ResourceExhausted, "set_too_large")));
        assert!(is_retryable(&s(EventCode::ResourceExhausted, "key_full")), "nothing of its group was applied");
        assert!(!is_retryable(&s(EventCode::ResourceExhausted, "key_rate_limited")), "its seq is used up");
        assert!(!is_retryable(&s(EventCode::InvalidArgument, "type_mismatch")));
        assert!(!is_retryable(&s(EventCode::FailedPrecondition, "sequence_overlap")));
    }

    #[test]
    fn a_shard_never_spans_two_targets_in_one_round() {
        let events: Vec<Event> = (0..200).map(|k| event("s", &format!("k{k}"), 1i64)).collect();
        let pending: Vec<usize> = (0..events.len()).collect();
        let endpoints: Vec<String> = (0..3).map(|i| format!("n{i}:1")).collect();
        let leaders = HashMap::from([(2u32, (7u64, "leader-of-2:1".to_owned()))]);
        for rr in 0..5 {
            let routed = route(&events, &pending, 8, &leaders, &endpoints, rr);
            let mut target_of: HashMap<u32, &String> = HashMap::new();
            let mut seen = 0;
            for (target, idx) in &routed {
                for &i in idx {
                    seen += 1;
                    let shard = shard_for("s", &events[i].key, 8);
                    assert_eq!(*target_of.entry(shard).or_insert(target), target, "shard {shard} split");
                    if shard == 2 {
                        assert_eq!(target, "leader-of-2:1");
                    }
                }
            }
            assert_eq!(seen, events.len());
        }
    }

    #[tokio::test]
    async fn connect_without_endpoints_or_with_bad_ones_fails_clearly() {
        assert!(matches!(Client::connect(Vec::<String>::new()).await, Err(ClientError::NoEndpoints)));
        let err = Client::connect(["not a uri"]).await.unwrap_err();
        assert!(matches!(err, ClientError::BadEndpoint { .. }), "{err}");
        // Nothing listens on port 1.
        let err = Client::connect(["127.0.0.1:1"]).await.unwrap_err();
        assert!(matches!(err, ClientError::NoNodeAnswered { .. }), "{err}");
    }
}

/// Batches events from many callers into few requests: a request leaves when `max_events`
/// events are waiting or `linger` has passed since the first of them, on one of `lanes`
/// idempotent producer lanes (each with one request in flight). Each [`BatchingProducer::send`]
/// resolves to its own event's final status. Waiting events are bounded (`max_events × lanes`):
/// callers wait for room instead of growing memory.
///
/// ```no_run
/// # async fn demo(client: coalesce_client::Client) -> Result<(), coalesce_client::ClientError> {
/// use std::time::Duration;
/// let producer = coalesce_client::BatchingProducer::new(&client, Duration::from_millis(5), 500, 4);
/// let status = producer.send(coalesce_client::event("page-views", "home", 1i64)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BatchingProducer {
    tx: tokio::sync::mpsc::Sender<(Event, tokio::sync::oneshot::Sender<EventStatus>)>,
}

impl BatchingProducer {
    /// Starts the batching task on the current runtime; it ends when every clone is dropped.
    pub fn new(client: &Client, linger: Duration, max_events: usize, lanes: usize) -> Self {
        let (max_events, lanes) = (max_events.max(1), lanes.max(1));
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<(Event, tokio::sync::oneshot::Sender<EventStatus>)>(max_events * lanes);
        let (lane_tx, lane_rx) = async_channel_pair(client, lanes);
        tokio::spawn(async move {
            let lane_rx = Arc::new(tokio::sync::Mutex::new(lane_rx));
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let deadline = Instant::now() + linger;
                while batch.len() < max_events {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(item)) => batch.push(item),
                        Ok(None) | Err(_) => break,
                    }
                }
                // A free lane (waits while all have a request in flight).
                let Some(mut producer) = lane_rx.lock().await.recv().await else { return };
                let lane_tx = lane_tx.clone();
                tokio::spawn(async move {
                    let (events, waiters): (Vec<Event>, Vec<_>) = batch.into_iter().unzip();
                    let statuses = match producer.send(events).await {
                        Ok(report) => report.statuses,
                        Err(e) => {
                            let failed = EventStatus {
                                code: EventCode::Unavailable as i32,
                                reason: "client_error".into(),
                                message: e.to_string(),
                                ..Default::default()
                            };
                            vec![failed; waiters.len()]
                        }
                    };
                    for (w, s) in waiters.into_iter().zip(statuses) {
                        let _ = w.send(s);
                    }
                    let _ = lane_tx.send(producer).await;
                });
            }
        });
        Self { tx }
    }

    /// Queues `event` and waits for its final status (see [`SendReport`] for the codes).
    pub async fn send(&self, event: Event) -> Result<EventStatus, ClientError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx.send((event, done)).await.map_err(|_| ClientError::NotReady { detail: "producer stopped".into() })?;
        wait.await.map_err(|_| ClientError::NotReady { detail: "producer stopped".into() })
    }
}

/// A pool of `lanes` producers handed out through a channel.
fn async_channel_pair(
    client: &Client,
    lanes: usize,
) -> (tokio::sync::mpsc::Sender<Producer>, tokio::sync::mpsc::Receiver<Producer>) {
    let (tx, rx) = tokio::sync::mpsc::channel(lanes);
    for _ in 0..lanes {
        let _ = tx.try_send(client.producer());
    }
    (tx, rx)
}
