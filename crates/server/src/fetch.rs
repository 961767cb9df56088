//! Cluster-wide request coalescing: the `Fetch` RPC. A (stream, key) belongs to one shard, so
//! every node passes a Fetch to that shard's leader (over the peer port, `FetchPeer`), where
//! it joins the key's flight ([`coalesce_sinks::flight`]): one upstream call (after the stream's settle
//! delay) answers every caller in the cluster, and a successful answer is cached for the
//! stream's TTL. The upstream is the stream's `fetch` table ([`coalesce_sinks::upstream`]).
//!
//! ```text
//!  caller ─► any node ─(FetchPeer)─► shard leader: valid lease? (epoch E) ── no ─► UNAVAILABLE
//!                 ▲                        │ yes: join the key's flight of epoch E        │
//!                 │                        ▼                                              │
//!                 │        settle ─► rate-limit permit ─► lease still E? ── no: no call ──┤
//!                 │                                            │ yes                      │
//!                 │                                            ▼                          │
//!                 │                                   upstream call ─► lease still E? ─no─┤
//!                 │                                                         │ yes         │
//!                 └──────────── answer tagged E ◄───────────────────────────┘             │
//!                  retry on the shard's (new) leader until the deadline ◄─────────────────┘
//! ```
//!
//! **Fencing.** A node acts on a flight only while it leads the shard with a valid lease
//! ([`RaftNode::delivery_epoch`], as delivery does): a quorum acknowledged it within the
//! minimum election timeout, before which no other replica can be elected. The lease is
//! checked when a caller arrives, right before the upstream call (after the settle delay and
//! any rate-limit wait) and again before each caller is answered; flights and cached answers
//! belong to the epoch they were made under, so a node that leads again later never serves
//! an earlier epoch's answer. When the check fails the caller gets UNAVAILABLE and its node
//! retries on the shard's leader. So a leader paused (SIGSTOP, a long GC-like stall) and
//! deposed meanwhile:
//! - starts no upstream call once it resumes; only a call already sent when the pause began
//!   may complete (the upstream may see it late), and its answer is handed to nobody;
//! - answers no caller with its old epoch, from a flight or its cache: every answer carries
//!   the epoch of a leader that held a valid lease when the call was made and when it
//!   answered (only an answer already on its way when the pause began may arrive late), and
//!   callers that waited on the deposed leader are answered by its successor.
//!
//! If the leader fails or is deposed mid-call, the node that passed the call on retries on the
//! new leader until the call's deadline: the upstream may then be called twice for that key
//! (at most once is not promised). Answers carry the shard and the leader's epoch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coalesce_core::hash::shard_for;
use coalesce_core::merge::Aggregate;
use coalesce_core::output::{Epoch, Output};
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::fetch_peer_client::FetchPeerClient;
use coalesce_raft::RaftNode;
use coalesce_sinks::DeliveryError;
use coalesce_sinks::upstream::{Answer, FetchParams, Upstream};
use tonic::{Request, Response, Status};

use crate::delivery::Delivery;
use crate::metrics;
use coalesce_sinks::flight::{Fetched, FlightError, Flights, Origin};

/// A flight's result.
#[derive(Debug, Clone)]
enum Outcome {
    /// The upstream's answer (any HTTP status).
    Answered(Answer),
    /// The upstream gave no answer (connection refused, timeout, a body over the limit).
    NoAnswer(String),
    /// No call was made: when it was due, this node no longer held the shard's lease in the
    /// flight's epoch.
    Deposed,
}

/// One stream's upstream and its flights on this node, each flight and cached answer tagged
/// with the epoch of the shard leadership it was made under.
struct Fetcher {
    upstream: Arc<Upstream>,
    flights: Flights<String, Outcome, Epoch>,
}

/// Why this node did not answer a Fetch itself.
#[derive(Debug, thiserror::Error)]
enum LocalError {
    /// It does not lead the shard with a valid lease, or no longer in the epoch the flight was
    /// made under: the caller's node retries on the shard's leader.
    #[error("this node does not lead shard {shard} with a valid lease; retry on its leader")]
    Deposed { shard: u32 },
    /// A final answer for the caller (an upstream without an answer, a full table, bad input).
    #[error(transparent)]
    Final(#[from] Status),
}

impl From<LocalError> for Status {
    fn from(e: LocalError) -> Self {
        match e {
            // Not `upstream: …`: the node that passed the call on retries it.
            LocalError::Deposed { .. } => Status::unavailable(e.to_string()),
            LocalError::Final(s) => s,
        }
    }
}

/// The Fetch service of a node (client RPC and peer RPC).
#[derive(Clone)]
pub struct FetchService {
    node: Arc<RaftNode>,
    fetchers: Arc<BTreeMap<String, Fetcher>>,
}

impl std::fmt::Debug for FetchService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchService").field("streams", &self.fetchers.keys().collect::<Vec<_>>()).finish()
    }
}

/// How long to wait between attempts to reach a shard's leader.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

impl FetchService {
    /// One fetcher per stream with a `fetch` table; `delivery` lends the rate limiters of the
    /// sinks named by `rate_limit_sink`.
    pub fn new(
        node: Arc<RaftNode>,
        params: &BTreeMap<String, FetchParams>,
        delivery: &Delivery,
    ) -> anyhow::Result<Self> {
        let mut fetchers = BTreeMap::new();
        for (stream, p) in params {
            let limiter = match &p.rate_limit_sink {
                Some(sink) => Some(
                    delivery
                        .limiter_of(sink)
                        .ok_or_else(|| anyhow::anyhow!("streams.{stream}.fetch: sink {sink} has no rate limiter"))?,
                ),
                None => None,
            };
            let upstream = Arc::new(Upstream::new(stream, p, limiter)?);
            fetchers.insert(stream.clone(), Fetcher { upstream, flights: Flights::new(p.max_keys) });
        }
        Ok(Self { node, fetchers: Arc::new(fetchers) })
    }

    fn fetcher(&self, stream: &str, key: &str) -> Result<&Fetcher, Status> {
        let def =
            self.node.streams().get(stream).ok_or_else(|| Status::not_found(format!("unknown stream {stream:?}")))?;
        let fetcher = self.fetchers.get(stream).ok_or_else(|| {
            Status::failed_precondition(format!("stream {stream:?} has no fetch upstream ([streams.{stream}.fetch])"))
        })?;
        if key.is_empty() || key.len() > def.max_key_bytes {
            return Err(Status::invalid_argument(format!(
                "key: must be 1 to {} bytes, got {}",
                def.max_key_bytes,
                key.len()
            )));
        }
        Ok(fetcher)
    }

    /// A client's Fetch: answered here when this node leads the key's shard, else passed to
    /// the leader (retried on a new one until the deadline).
    pub async fn fetch(&self, stream: &str, key: &str) -> Result<pb::FetchResponse, Status> {
        let fetcher = self.fetcher(stream, key)?;
        let shard = shard_for(stream, key, self.node.spec().shards);
        let p = fetcher.upstream.params();
        // One attempt may take the settle delay, a rate-limit wait and the call itself.
        let attempt = p.settle + p.timeout * 2 + Duration::from_secs(2);
        let deadline = Instant::now() + attempt * 2;
        let mut last = String::from("no leader yet");
        loop {
            if Instant::now() >= deadline {
                return Err(Status::unavailable(format!("shard {shard}: {last}; retry")));
            }
            let leader = self.node.leader_of(shard);
            match leader {
                Some((id, _)) if id == self.node.id() => match self.local(shard, stream, key).await {
                    // Deposed (or not yet holding the lease): its successor answers.
                    Err(e @ LocalError::Deposed { .. }) => last = e.to_string(),
                    r => return r.map_err(Status::from),
                },
                Some((id, peer)) => {
                    let channel = self.node.peer_channel(&peer)?;
                    let mut req = Request::new(pb::PeerFetchRequest {
                        shard,
                        stream: stream.to_owned(),
                        key: key.to_owned(),
                        target: id,
                    });
                    req.set_timeout(attempt);
                    // A leader that stops answering (paused, cut off) is replaced within an
                    // election timeout: ask its successor then, rather than wait out `attempt`
                    // (the deposed one acts on nothing when it resumes).
                    let mut client = FetchPeerClient::new(channel);
                    let answer = tokio::select! {
                        r = client.fetch(req) => r,
                        () = self.node.leader_moved_from(shard, id) => {
                            last = format!("{}: leadership moved while it was asked", peer.name);
                            continue;
                        }
                    };
                    match answer {
                        Ok(r) => return Ok(r.into_inner()),
                        // The leader's own answer (an upstream error, a full table) is final;
                        // anything about reaching it is retried.
                        Err(s) if s.code() == tonic::Code::Unavailable && s.message().starts_with("upstream:") => {
                            return Err(s);
                        }
                        Err(s) if matches!(s.code(), tonic::Code::ResourceExhausted) => return Err(s),
                        Err(s) => last = format!("{}: {}", peer.name, s.message()),
                    }
                }
                None => {}
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Joins the key's flight on this node, which must lead the shard with a valid lease.
    async fn local(&self, shard: u32, stream: &str, key: &str) -> Result<pb::FetchResponse, LocalError> {
        self.fetcher(stream, key)?;
        let epoch = self.node.delivery_epoch_waking(shard).await.ok_or(LocalError::Deposed { shard })?;
        let fetched = self.join(stream, key, shard, epoch).await?;
        let answer = fetched.value.map_err(|reason| Status::unavailable(format!("upstream: {reason}")))?;
        Ok(pb::FetchResponse {
            status: u32::from(answer.status),
            content_type: answer.content_type,
            body: answer.body,
            shared: fetched.shared,
            cached: fetched.origin == Origin::Cached,
            shard,
            epoch: Some(pb::Epoch { term: epoch.term, node: epoch.node }),
        })
    }

    /// Whether `stream` replaces its outputs' values with the fetched answer (the event →
    /// fetch bridge, `on_window_close`).
    pub fn bridges(&self, stream: &str) -> bool {
        self.fetchers.get(stream).is_some_and(|f| f.upstream.params().on_window_close)
    }

    /// The bridge, on the leader delivering `outputs`: each output of a bridging stream gets
    /// its key's fetched answer as its value (joining any Fetch callers of that key). A call
    /// without an answer, or a 408/429/5xx, is transient; another non-2xx refuses the output.
    pub async fn bridge(&self, outputs: &[Output]) -> Result<Option<Vec<Output>>, DeliveryError> {
        if !outputs.iter().any(|o| self.bridges(&o.stream)) {
            return Ok(None);
        }
        let mut out = outputs.to_vec();
        for o in out.iter_mut().filter(|o| self.bridges(&o.stream)) {
            let what = |m: String| format!("fetch {}/{}: {m}", o.stream, o.key);
            // The delivery worker checked its lease; the flight checks it again before calling
            // and before answering.
            let epoch = self
                .node
                .delivery_epoch(o.shard)
                .ok_or_else(|| DeliveryError::transient(what(LocalError::Deposed { shard: o.shard }.to_string())))?;
            let fetched = self.join(&o.stream, &o.key, o.shard, epoch).await.map_err(|e| {
                let message = match e {
                    LocalError::Final(s) => s.message().to_owned(),
                    deposed => deposed.to_string(),
                };
                DeliveryError::transient(what(message))
            })?;
            let answer = fetched.value.map_err(|reason| DeliveryError::transient(what(reason)))?;
            match answer.status {
                200..=299 => {}
                408 | 429 | 500..=599 => {
                    return Err(DeliveryError::transient(what(format!("HTTP {}", answer.status))));
                }
                other => return Err(DeliveryError::Rejected { reason: what(format!("HTTP {other}")) }),
            }
            let at = match &o.value {
                Aggregate::Latest { at, .. } => *at,
                _ => o.last_event_at,
            };
            o.value = Aggregate::Latest { value: answer.to_value(), at };
        }
        Ok(Some(out))
    }

    /// The key's flight result under `epoch`, this node's lease of `shard`: joined, cached, or
    /// from a new flight that calls the upstream only if the lease still holds then. `Deposed`
    /// when the lease is gone (or its epoch changed) by the time the caller is answered.
    async fn join(
        &self,
        stream: &str,
        key: &str,
        shard: u32,
        epoch: Epoch,
    ) -> Result<Fetched<Result<Answer, String>>, LocalError> {
        let fetcher = self.fetcher(stream, key)?;
        let upstream = fetcher.upstream.clone();
        let node = self.node.clone();
        let (stream_owned, key_owned) = (stream.to_owned(), key.to_owned());
        let settle = upstream.params().settle;
        let call = move || async move {
            if !settle.is_zero() {
                metrics::FETCH_SETTLE_WAITS.with_label_values(&[&stream_owned]).inc();
            }
            let started = Instant::now();
            // Fencing: right before sending (after the settle delay and any rate-limit wait).
            let holds = || node.delivery_epoch(shard) == Some(epoch);
            let (sent, waited) = upstream.call_if(&key_owned, holds).await;
            metrics::FETCH_RATE_LIMIT_WAIT.with_label_values(&[&stream_owned]).inc_by(waited.as_secs_f64());
            let Some(outcome) = sent else {
                tracing::info!(
                    stream = %stream_owned,
                    shard,
                    epoch = %epoch,
                    "fetch: this node lost the shard's lease before the upstream call; not calling (callers retry on \
                     the new leader)"
                );
                return (Outcome::Deposed, Duration::ZERO);
            };
            let result = match &outcome {
                Ok(a) => format!("{}xx", a.status / 100),
                Err(_) => "error".to_owned(),
            };
            metrics::FETCH_UPSTREAM_DURATION
                .with_label_values(&[&stream_owned, &result])
                .observe((started.elapsed() - waited).as_secs_f64());
            // Only successful answers are cached: an error is retried by the next caller.
            match outcome {
                Ok(a) if (200..300).contains(&a.status) => (Outcome::Answered(a), upstream.params().ttl),
                Ok(a) => (Outcome::Answered(a), Duration::ZERO),
                Err(reason) => (Outcome::NoAnswer(reason), Duration::ZERO),
            }
        };
        let fetched = fetcher.flights.get_tagged(key.to_owned(), epoch, settle, call).await;
        // Fencing: answer only under the lease the flight was made under.
        let holds = self.node.delivery_epoch(shard) == Some(epoch);
        let origin = match &fetched {
            Ok(f) if matches!(f.value, Outcome::Deposed) || !holds => "deposed",
            Ok(f) => match f.origin {
                Origin::Called => "called",
                Origin::Joined => "joined",
                Origin::Cached => "cached",
            },
            Err(_) => "refused",
        };
        metrics::FETCH_REQUESTS.with_label_values(&[stream, origin]).inc();
        let fetched = fetched.map_err(|e| match e {
            FlightError::Full(_) => Status::resource_exhausted(e.to_string()),
            FlightError::Abandoned => Status::internal(e.to_string()),
        })?;
        let value = match fetched.value {
            Outcome::Answered(a) if holds => Ok(a),
            Outcome::NoAnswer(reason) if holds => Err(reason),
            _ => return Err(LocalError::Deposed { shard }),
        };
        Ok(Fetched { value, shared: fetched.shared, origin: fetched.origin })
    }
}

#[tonic::async_trait]
impl pb::fetch_peer_server::FetchPeer for FetchService {
    async fn fetch(&self, request: Request<pb::PeerFetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        self.node.peer_sender(&request)?;
        let r = request.into_inner();
        if r.target != self.node.id() {
            return Err(Status::unavailable(format!("this is not node {} (it restarted with new data)", r.target)));
        }
        let owner = shard_for(&r.stream, &r.key, self.node.spec().shards);
        if owner != r.shard {
            return Err(Status::invalid_argument(format!("shard: the key belongs to shard {owner}, not {}", r.shard)));
        }
        // `local` answers only under a valid lease of the shard (UNAVAILABLE otherwise: the
        // caller's node retries on the leader it learns next).
        self.local(r.shard, &r.stream, &r.key).await.map(Response::new).map_err(Status::from)
    }
}
