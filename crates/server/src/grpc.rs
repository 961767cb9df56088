//! The client API (`coalesce.v1.Coalesce`) on the client port.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use coalesce_core::batch::EventBatch;
use coalesce_core::hash::ShardId;
use coalesce_core::stream::KeyRateAction;
use coalesce_core::time::{Clock, SystemClock};
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::EventCode;
use coalesce_raft::{GroupOutcome, IngestGroup, ProposeError, RaftNode, Response};
use coalesce_wire::api::{CheckedIngest, RequestLimits, check_ingest, status};
use futures::Stream;
use prost::Message;
use tonic::{Request, Response as TonicResponse, Status};

use crate::config::ApiLimits;
use crate::convert;
use crate::delivery::Delivery;
use crate::metrics::timed;

/// The client-facing service of one node.
#[derive(Debug, Clone)]
pub struct CoalesceService {
    node: Arc<RaftNode>,
    limits: ApiLimits,
    delivery: Arc<Delivery>,
    fetch: crate::fetch::FetchService,
    key_rates: Arc<crate::keyrate::KeyRates>,
    /// Turns true when the node starts shutting down: open subscriptions end then (UNAVAILABLE,
    /// so their clients resubscribe elsewhere) instead of holding the client port open until
    /// the shutdown's deadline.
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
}

impl CoalesceService {
    pub fn new(
        node: Arc<RaftNode>,
        limits: ApiLimits,
        delivery: Arc<Delivery>,
        fetch: crate::fetch::FetchService,
    ) -> Self {
        let key_rates = Arc::new(crate::keyrate::KeyRates::new(node.streams()));
        Self { node, limits, delivery, fetch, key_rates, stopping: None }
    }

    /// Ends open subscriptions once `stopping` turns true.
    pub fn with_stopping(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    /// Whether an Ack may move (and so perhaps create) `consumer`'s cursor on `shard`: a cursor
    /// holds every output until it acks, so only declared durable consumers (`grpc` sinks) and
    /// callers with an admin token create one; a cursor that exists (created so, or before
    /// December 2026) may be acked by any consumer. Refused: NOT_FOUND, counted.
    fn may_ack(&self, shard: ShardId, consumer: &str, admin: bool) -> Result<(), Status> {
        if admin || self.delivery.is_durable_consumer(consumer) {
            return Ok(());
        }
        // A shard this node does not replicate is answered by the Ack itself (NOT_FOUND).
        let Some(group) = self.node.group(shard) else { return Ok(()) };
        let outbox = group.reader().outbox().map_err(convert::storage_status)?;
        if outbox.cursors.contains_key(consumer) {
            return Ok(());
        }
        crate::metrics::ACKS_REFUSED.inc();
        Err(Status::not_found(format!(
            "consumer: {consumer:?} is not a durable consumer of this cluster and has no cursor on shard {shard}: \
             declare it as a `grpc` sink in the streams file, or ack once with an admin token to create its cursor"
        )))
    }

    /// Checks a subscriber's consumer name: the cursor it acks must not be a sink's.
    fn consumer(&self, name: &str) -> Result<(), Status> {
        if !coalesce_core::stream::valid_name(name) {
            return Err(Status::invalid_argument(format!(
                "consumer: {name:?} must be 1-64 characters of a-z, 0-9, '_', '.', '-'"
            )));
        }
        if self.delivery.is_push_sink(name) {
            return Err(Status::invalid_argument(format!(
                "consumer: {name:?} is a sink the cluster delivers itself; subscribe under another name"
            )));
        }
        Ok(())
    }
}

/// Counts, per stream, the events accepted into `batches` and the partials they became.
fn count_premerge(batches: &BTreeMap<ShardId, EventBatch>) {
    let mut per_stream: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (key, partial) in batches.values().flat_map(|b| &b.groups).flat_map(|g| &g.partials) {
        let c = per_stream.entry(key.stream.as_str()).or_default();
        c.0 += partial.inputs;
        c.1 += 1;
    }
    for (stream, (events, partials)) in per_stream {
        crate::metrics::RECEIVED.with_label_values(&[stream]).inc_by(events);
        crate::metrics::PREMERGED.with_label_values(&[stream]).inc_by(partials);
    }
}

/// The status of an event over its key's `key_rate_limit` (see [`crate::keyrate`]).
fn rate_limited(stream: &str, index: usize, l: &crate::keyrate::Limited) -> pb::EventStatus {
    let what = format!(
        "events[{index}].key: over stream {stream:?}'s per-key rate limit ({}/s, burst {})",
        l.per_second, l.burst
    );
    let retry_after_ms = l.retry_after.as_millis().max(1) as u64;
    match l.action {
        KeyRateAction::Reject => {
            let mut s = status(
                EventCode::ResourceExhausted,
                "key_rate_limited",
                format!("{what}; not applied, resend it as a new event after {retry_after_ms} ms"),
            );
            s.retry_after_ms = retry_after_ms;
            s
        }
        KeyRateAction::Shed => status(EventCode::Shed, "key_rate_limited", format!("{what}; dropped")),
    }
}

/// A producer group's event positions in the request, and the partial each merged into.
type GroupEvents = (Vec<u32>, Vec<u32>);

/// The statuses of a producer group that apply refused (`key_overflow = "reject"`): nothing of
/// it was applied, so every event gets RESOURCE_EXHAUSTED/`key_full` with the wait until the
/// last of the full keys' windows closes, to be sent again with the same seqs; the message of
/// an event whose key is full says so, the others name one that is.
fn key_full_statuses(
    statuses: &mut [pb::EventStatus],
    shard: u32,
    offset: usize,
    refused: &[coalesce_raft::types::KeyFull],
    events: &[u32],
    partial_of: &[u32],
) {
    let retry_after_ms = refused.iter().map(|r| r.retry_after_ms).max().unwrap_or(0);
    let full: BTreeMap<u32, &coalesce_raft::types::KeyFull> = refused.iter().map(|r| (r.partial, r)).collect();
    let first_full =
        events.iter().zip(partial_of).find(|(_, p)| full.contains_key(p)).map(|(i, _)| offset + *i as usize);
    for (&i, p) in events.iter().zip(partial_of) {
        let message = if full.contains_key(p) {
            format!(
                "events[{}]: merging it would grow its key's value past the stream's window.max_bytes \
                 (key_overflow = \"reject\"); nothing of this producer's events for shard {shard} was applied: send \
                 them again, same seqs, once the key's window closes (in {retry_after_ms} ms)",
                offset + i as usize
            )
        } else {
            format!(
                "events[{}]: not applied: events[{}] of this request would grow its key past window.max_bytes \
                 (key_overflow = \"reject\"), and a producer's events for one shard are applied together; send \
                 them again, same seqs, in {retry_after_ms} ms",
                offset + i as usize,
                first_full.unwrap_or(offset)
            )
        };
        let mut s = status(EventCode::ResourceExhausted, "key_full", message);
        s.retry_after_ms = retry_after_ms;
        statuses[i as usize] = pb::EventStatus { shard, ..s };
    }
}

/// Outbox entries read per shard per look.
const SUBSCRIBE_PAGE: usize = 1_000;
/// A Subscribe message stops growing at about this size (well under gRPC's default 4 MiB
/// decoding limit, which a lagging subscriber of many shards would otherwise exceed).
const MAX_SUBSCRIBE_MESSAGE_BYTES: usize = 1 << 20;

/// Most events one `IngestStream` call carries (its statuses are held until the stream ends).
pub const MAX_EVENTS_PER_STREAM: usize = 100_000;

/// The per-event status for every event of a shard's part when it could not be applied.
fn failure(e: &ProposeError) -> pb::EventStatus {
    let mut s = match e {
        ProposeError::BufferFull { retry_after_ms, .. } => {
            let mut s = status(EventCode::ResourceExhausted, "buffer_full", e.to_string());
            s.retry_after_ms = *retry_after_ms;
            s
        }
        ProposeError::UnknownStream { .. } => status(EventCode::NotFound, "unknown_stream", e.to_string()),
        ProposeError::OutboxFull { retry_after_ms, .. } => {
            let mut s = status(EventCode::ResourceExhausted, "outbox_full", e.to_string());
            s.retry_after_ms = *retry_after_ms;
            s
        }
        ProposeError::Unknown(_) => status(EventCode::Unknown, "outcome_unknown", e.to_string()),
        ProposeError::Invalid { .. } => status(EventCode::InvalidArgument, "invalid_command", e.to_string()),
        ProposeError::NotLeader { leader, .. } => {
            let mut s = status(EventCode::Unavailable, "not_leader", e.to_string());
            s.leader_hint = leader.as_ref().map(|l| l.client_addr.clone()).unwrap_or_default();
            s.retry_after_ms = 100;
            s
        }
        ProposeError::LeaseExpired(_)
        | ProposeError::Unreachable { .. }
        | ProposeError::NoGroup(_)
        | ProposeError::NotReplica { .. }
        | ProposeError::Fatal { .. } => {
            let mut s = status(EventCode::Unavailable, "unavailable", e.to_string());
            s.retry_after_ms = 200;
            s
        }
    };
    if let ProposeError::NotLeader { shard, .. }
    | ProposeError::BufferFull { shard, .. }
    | ProposeError::OutboxFull { shard, .. }
    | ProposeError::UnknownStream { shard, .. }
    | ProposeError::Unreachable { shard, .. }
    | ProposeError::Invalid { shard, .. }
    | ProposeError::Fatal { shard, .. } = e
    {
        s.shard = *shard;
    }
    s
}

impl CoalesceService {
    /// Validates, pre-merges and applies one request; event `i` is named `events[offset + i]`.
    #[tracing::instrument(name = "ingest", level = "debug", skip_all, fields(events = req.events.len(), producer = req.producer_id))]
    async fn ingest_request(&self, req: pb::IngestRequest, offset: usize) -> Result<pb::IngestResponse, Status> {
        let limits =
            RequestLimits { max_events: self.limits.max_events_per_request, max_bytes: self.limits.max_request_bytes };
        let spec = self.node.spec();
        let admit = |ev: &coalesce_core::batch::Event, index: usize| {
            self.key_rates.check(&ev.stream, &ev.key).map_err(|limited| rate_limited(&ev.stream, index, &limited))
        };
        let CheckedIngest { mut statuses, batches } =
            check_ingest(&req, offset, limits, self.node.streams(), spec.shards, SystemClock.now(), admit)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        count_premerge(&batches);
        let mut leader_hints = std::collections::HashMap::new();
        for shard in batches.keys() {
            if let Some(view) = self.node.shard_view(*shard)
                && !view.is_leader
                && let Some((_, leader)) = view.leader
            {
                leader_hints.insert(*shard, leader.client_addr);
            }
        }
        let calls = batches.into_iter().map(|(shard, batch)| {
            let node = self.node.clone();
            async move {
                // Each group's event indices (and the partial each merged into) stay here, for
                // the per-event statuses.
                let (events, groups): (Vec<GroupEvents>, Vec<IngestGroup>) = batch
                    .groups
                    .into_iter()
                    .map(|mut g| {
                        ((std::mem::take(&mut g.events), std::mem::take(&mut g.partial_of)), IngestGroup::from(g))
                    })
                    .unzip();
                (shard, events, node.ingest(shard, groups).await)
            }
        });
        for (shard, events, outcome) in futures::future::join_all(calls).await {
            match outcome {
                Ok(Response::Ingest { groups, .. }) => {
                    for (g, (idx, partial_of)) in groups.iter().zip(events) {
                        if let GroupOutcome::KeyFull { refused, .. } = g {
                            key_full_statuses(&mut statuses, shard, offset, refused, &idx, &partial_of);
                            continue;
                        }
                        let s = match g {
                            GroupOutcome::Applied { shed: 0 } => status(EventCode::Ok, "", String::new()),
                            GroupOutcome::Applied { shed } => status(
                                EventCode::Shed,
                                "shed",
                                format!("{shed} inputs of this request were shed: the buffer of shard {shard} is full"),
                            ),
                            GroupOutcome::Duplicate => status(EventCode::Duplicate, "duplicate", String::new()),
                            GroupOutcome::KeyFull { .. } => unreachable!("answered above"),
                            GroupOutcome::Overlap { accepted } => status(
                                EventCode::FailedPrecondition,
                                "sequence_overlap",
                                format!(
                                    "producer_seq overlaps seqs already accepted by shard {shard} (up to {accepted})"
                                ),
                            ),
                            GroupOutcome::TooOld { accepted } => status(
                                EventCode::FailedPrecondition,
                                "sequence_too_old",
                                format!(
                                    "producer_seq is at or below the highest seq shard {shard} accepted from this \
                                     producer ({accepted}) but is none of its last {} requests: a producer id must \
                                     not restart its seqs (use a new id per run); nothing was applied",
                                    coalesce_core::session::RECENT_RANGES
                                ),
                            ),
                        };
                        for i in idx {
                            statuses[i as usize] = pb::EventStatus { shard, ..s.clone() };
                        }
                    }
                }
                Ok(other) => {
                    return Err(Status::internal(format!("unexpected response from shard {shard}: {other:?}")));
                }
                Err(e) => {
                    let s = failure(&e);
                    for i in events.into_iter().flat_map(|(idx, _)| idx) {
                        statuses[i as usize] = pb::EventStatus { shard, ..s.clone() };
                    }
                }
            }
        }
        count_events(&statuses);
        Ok(pb::IngestResponse { statuses, leader_hints, shards: spec.shards })
    }
}

/// Counts per-event statuses (`coalesce_api_events_total`): code without its prefix, in lower
/// case (`ok`, `resource_exhausted`, ...), and the stable reason.
fn count_events(statuses: &[pb::EventStatus]) {
    let mut counts: BTreeMap<(i32, &str), u64> = BTreeMap::new();
    for s in statuses {
        *counts.entry((s.code, s.reason.as_str())).or_default() += 1;
    }
    for ((code, reason), n) in counts {
        let name = EventCode::try_from(code)
            .map_or("unknown", |c| c.as_str_name().strip_prefix("EVENT_CODE_").unwrap_or("unknown"));
        crate::metrics::API_EVENTS.with_label_values(&[name.to_ascii_lowercase().as_str(), reason]).inc_by(n);
    }
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::coalesce_server::Coalesce for CoalesceService {
    async fn ingest(&self, request: Request<pb::IngestRequest>) -> Result<TonicResponse<pb::IngestResponse>, Status> {
        timed("Ingest", self.ingest_request(request.into_inner(), 0)).await.map(TonicResponse::new)
    }

    async fn ingest_stream(
        &self,
        request: Request<tonic::Streaming<pb::IngestRequest>>,
    ) -> Result<TonicResponse<pb::IngestResponse>, Status> {
        timed("IngestStream", async {
            let mut stream = request.into_inner();
            let mut out = pb::IngestResponse { shards: self.node.spec().shards, ..Default::default() };
            while let Some(req) = stream.message().await? {
                if out.statuses.len() + req.events.len() > MAX_EVENTS_PER_STREAM {
                    return Err(Status::invalid_argument(format!(
                        "events: a stream carries at most {MAX_EVENTS_PER_STREAM} events; the first {} were \
                         processed, open a new stream for the rest",
                        out.statuses.len()
                    )));
                }
                let r = self.ingest_request(req, out.statuses.len()).await?;
                out.statuses.extend(r.statuses);
                out.leader_hints.extend(r.leader_hints);
            }
            Ok(TonicResponse::new(out))
        })
        .await
    }

    type SubscribeStream = OutputStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<TonicResponse<Self::SubscribeStream>, Status> {
        let req = request.into_inner();
        self.consumer(&req.consumer)?;
        let local: Vec<u32> = self.node.groups().iter().map(|g| g.shard).collect();
        let shards = if req.shards.is_empty() { local.clone() } else { req.shards.clone() };
        let mut next: BTreeMap<u32, u64> = BTreeMap::new();
        for shard in &shards {
            let group = self
                .node
                .group(*shard)
                .ok_or_else(|| Status::not_found(format!("shards: shard {shard} is not replicated on this node")))?;
            let from = match req.from_seq.get(shard) {
                Some(after) => after + 1,
                None => {
                    let meta = group.reader().outbox().map_err(convert::storage_status)?;
                    meta.cursors.get(&req.consumer).map_or(meta.low, |acked| acked + 1)
                }
            };
            next.insert(*shard, from);
        }
        let node = self.node.clone();
        let stream = async_stream(node, next, self.stopping.clone());
        Ok(TonicResponse::new(Box::pin(stream)))
    }

    async fn ack(&self, request: Request<pb::AckRequest>) -> Result<TonicResponse<pb::AckResponse>, Status> {
        let admin = crate::security::Caller::is_admin(&request);
        let req = request.into_inner();
        timed("Ack", async {
            self.consumer(&req.consumer)?;
            self.may_ack(req.shard, &req.consumer, admin)?;
            match self.node.ack(req.shard, req.consumer, req.upto_seq).await {
                Ok(Response::Acked { trimmed_below }) => Ok(TonicResponse::new(pb::AckResponse { trimmed_below })),
                Ok(other) => Err(Status::internal(format!("unexpected response {other:?}"))),
                Err(ProposeError::NoGroup(s)) => {
                    Err(Status::not_found(format!("shard: shard {s} is not replicated on this node")))
                }
                Err(e) => Err(Status::unavailable(e.to_string())),
            }
        })
        .await
    }

    async fn fetch(&self, request: Request<pb::FetchRequest>) -> Result<TonicResponse<pb::FetchResponse>, Status> {
        let r = request.into_inner();
        timed("Fetch", self.fetch.fetch(&r.stream, &r.key)).await.map(TonicResponse::new)
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<TonicResponse<pb::StatusResponse>, Status> {
        let spec = self.node.spec();
        let mut local = Vec::new();
        for g in self.node.groups() {
            let view = self.node.shard_view(g.shard).ok_or_else(|| Status::internal("group vanished"))?;
            let stats = g.reader().stats().map_err(convert::storage_status)?;
            let outbox = g.reader().outbox().map_err(convert::storage_status)?;
            let (leader, leader_addr) = view.leader.map(|(_, n)| (n.name, n.client_addr)).unwrap_or_default();
            local.push(pb::ShardStatus {
                shard: g.shard,
                leader,
                leader_addr,
                epoch: view.epoch.map(|e| pb::Epoch { term: e.term, node: e.node }),
                replicas: spec.placement(g.shard).iter().map(|n| n.name.clone()).collect(),
                buffered_keys: stats.keys,
                buffered_bytes: stats.bytes,
                next_seq: outbox.next_seq,
                last_applied: view.last_applied,
                shed_inputs: stats.shed_inputs_total,
            });
        }
        Ok(TonicResponse::new(pb::StatusResponse {
            cluster: spec.cluster.clone(),
            cluster_id: self.node.cluster_identity().map(|c| c.id.to_string()).unwrap_or_default(),
            node: self.node.me().name.clone(),
            node_id: self.node.id(),
            shards: spec.shards,
            local_shards: local,
            nodes: spec
                .nodes
                .iter()
                .map(|n| pb::NodeInfo { name: n.name.clone(), client_addr: n.client_addr.clone() })
                .collect(),
            streams: self
                .node
                .streams()
                .iter()
                .map(|d| {
                    let c = coalesce_raft::metrics::stream_counts(&d.name);
                    pb::StreamCounters {
                        stream: d.name.clone(),
                        inputs: c.inputs,
                        shed: c.shed,
                        key_full: c.key_full,
                        outputs: c.outputs,
                        absorbed: c.absorbed,
                        received: crate::metrics::counter_of(&crate::metrics::RECEIVED, &[&d.name]),
                        premerged: crate::metrics::counter_of(&crate::metrics::PREMERGED, &[&d.name]),
                        rate_limited: ["reject", "shed"]
                            .iter()
                            .map(|a| crate::metrics::counter_of(&crate::metrics::RATE_LIMITED, &[&d.name, a]))
                            .sum(),
                    }
                })
                .collect(),
        }))
    }
}

/// Streams new outputs of the local outboxes, in seq order per shard. The stream sleeps until
/// the outputs of one of the node's shards change ([`RaftNode::output_changes`]); a shard's outbox is read only when
/// its state machine changed since the last read. Once `stopping` turns true (or its sender is
/// gone) the stream ends with UNAVAILABLE.
fn async_stream(
    node: Arc<RaftNode>,
    next: BTreeMap<u32, u64>,
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
) -> impl Stream<Item = Result<pb::SubscribeResponse, Status>> + Send {
    let changes = node.output_changes();
    let state = Subscription { node, cursor: next, seen: BTreeMap::new(), stopping, changes };
    // `None` once the stream has ended (after telling the client the node is shutting down).
    futures::stream::unfold(Some(state), |state| async move {
        let mut sub = state?;
        loop {
            if sub.stopping() {
                let ended = Status::unavailable("the node is shutting down: subscribe again (to another node)");
                return Some((Err(ended), None));
            }
            // Marked seen before the read: a change that lands after it wakes the wait below.
            sub.changes.borrow_and_update();
            match sub.read() {
                Ok(outputs) if outputs.is_empty() => {}
                Ok(outputs) => return Some((Ok(pb::SubscribeResponse { outputs }), Some(sub))),
                Err(e) => return Some((Err(e), Some(sub))),
            }
            let Subscription { stopping, changes, .. } = &mut sub;
            let stopped = async {
                match stopping.as_mut() {
                    Some(s) => {
                        let _ = s.changed().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        // Unreachable while the node lives (it holds the sender): end as a stop.
                        return Some((Err(Status::unavailable("the node is shutting down: subscribe again (to another node)")), None));
                    }
                }
                _ = stopped => {}
            }
        }
    })
}

/// The state of one open subscription.
struct Subscription {
    node: Arc<RaftNode>,
    /// The next seq to send, per shard.
    cursor: BTreeMap<u32, u64>,
    /// The outputs version (`ShardReader::outputs_version`) each shard had when its outbox was last read to the end.
    seen: BTreeMap<u32, u64>,
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
    /// The node's outputs notification ([`RaftNode::output_changes`]).
    changes: tokio::sync::watch::Receiver<u64>,
}

impl Subscription {
    /// Whether the node is shutting down (a sender that is gone counts: the node is stopping).
    fn stopping(&mut self) -> bool {
        self.stopping.as_mut().is_some_and(|s| *s.borrow_and_update() || s.has_changed().is_err())
    }

    /// The outputs after the cursor of every shard whose state changed, at most about
    /// [`MAX_SUBSCRIBE_MESSAGE_BYTES`].
    fn read(&mut self) -> Result<Vec<pb::Output>, Status> {
        let mut outputs = Vec::new();
        let mut bytes = 0;
        for (shard, from) in self.cursor.iter_mut() {
            if bytes >= MAX_SUBSCRIBE_MESSAGE_BYTES {
                break;
            }
            let Some(group) = self.node.group(*shard) else { continue };
            let version = group.reader().outputs_version();
            if self.seen.get(shard) == Some(&version) {
                continue;
            }
            let batch = group.reader().outputs_from(*from, SUBSCRIBE_PAGE).map_err(convert::storage_status)?;
            let page = batch.len();
            let mut taken = 0;
            for o in &batch {
                let out = convert::output(o);
                bytes += out.encoded_len();
                outputs.push(out);
                *from = o.seq + 1;
                taken += 1;
                if bytes >= MAX_SUBSCRIBE_MESSAGE_BYTES {
                    break;
                }
            }
            // A full page, or one cut short, may have more behind it: read again.
            if page < SUBSCRIBE_PAGE && taken == page {
                self.seen.insert(*shard, version);
            }
        }
        Ok(outputs)
    }
}
