//! The operator API (`coalesce.v1.Admin`) on the client port: dead-letter queues, sink
//! status, leases, shard details, streams, hot keys, leader transfer and draining.

use std::sync::Arc;

use coalesce_proto::v1 as pb;
use coalesce_raft::reader::ShardReader;
use coalesce_raft::{ProposeError, RaftNode};
use tonic::{Request, Response, Status};

use crate::convert;
use crate::delivery::{Delivery, ReplayError};
use crate::leases::LeaseBook;

/// How long transfer-leader and drain wait for leadership to move before answering.
const TRANSFER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most dead letters one list, replay or purge call handles.
pub const MAX_LETTERS: usize = 1_000;

/// Hot keys per shard a `HotKeys` call returns by default, and at most.
pub const DEFAULT_HOT_KEYS: usize = 10;
pub const MAX_HOT_KEYS: usize = 64;

/// The operator service of one node.
#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<RaftNode>,
    delivery: Arc<Delivery>,
    leases: Arc<LeaseBook>,
}

impl AdminService {
    pub fn new(node: Arc<RaftNode>, delivery: Arc<Delivery>, leases: Arc<LeaseBook>) -> Self {
        Self { node, delivery, leases }
    }

    fn reader(&self, shard: u32) -> Result<ShardReader, Status> {
        self.node
            .group(shard)
            .map(|g| g.reader())
            .ok_or_else(|| Status::not_found(format!("shard: shard {shard} is not replicated on this node")))
    }

    fn sink(&self, name: &str) -> Result<(), Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("sink: must not be empty"));
        }
        if !self.delivery.sinks().iter().any(|(c, _)| c.name == name) {
            return Err(Status::not_found(format!("sink: {name:?} is not configured")));
        }
        Ok(())
    }

    /// The seqs a replay or purge names: the listed ones, or every letter with `all`.
    fn selected(&self, shard: u32, sink: &str, seqs: &[u64], all: bool) -> Result<Vec<u64>, Status> {
        match (all, seqs.is_empty()) {
            (true, true) => Ok(self
                .reader(shard)?
                .dead_letters(sink, 0, MAX_LETTERS)
                .map_err(convert::storage_status)?
                .iter()
                .map(|l| l.output.seq)
                .collect()),
            (false, false) if seqs.len() <= MAX_LETTERS => Ok(seqs.to_vec()),
            (false, false) => Err(Status::invalid_argument(format!("seqs: at most {MAX_LETTERS} per call"))),
            _ => Err(Status::invalid_argument("seqs: name seqs, or set all (not both)")),
        }
    }

    /// UNAVAILABLE with the leader's client address in `coalesce-leader` metadata.
    fn not_leader(&self, shard: u32, what: &str) -> Status {
        let mut status = Status::unavailable(format!("this node does not lead shard {shard}: {what}"));
        if let Some((_, leader)) = self.node.leader_of(shard)
            && let Ok(v) = leader.client_addr.parse()
        {
            status.metadata_mut().insert("coalesce-leader", v);
        }
        status
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let req = request.into_inner();
        if !req.sink.is_empty() {
            self.sink(&req.sink)?;
        }
        let limit = match req.limit {
            0 => MAX_LETTERS,
            n => (n as usize).min(MAX_LETTERS),
        };
        let shards: Vec<u32> =
            if req.shards.is_empty() { self.node.groups().iter().map(|g| g.shard).collect() } else { req.shards };
        let mut resp = pb::ListDeadLettersResponse::default();
        for shard in shards {
            let reader = self.reader(shard)?;
            let counts = reader.dead_letter_counts().map_err(convert::storage_status)?;
            for (sink, n) in counts {
                if !req.sink.is_empty() && sink != req.sink {
                    continue;
                }
                *resp.counts.entry(sink.clone()).or_insert(0) += n;
                let room = limit - resp.letters.len();
                if room > 0 {
                    let letters = reader.dead_letters(&sink, 0, room).map_err(convert::storage_status)?;
                    resp.letters.extend(letters.iter().map(convert::dead_letter));
                }
            }
        }
        Ok(Response::new(resp))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        let req = request.into_inner();
        self.sink(&req.sink)?;
        let seqs = self.selected(req.shard, &req.sink, &req.seqs, req.all)?;
        match self.delivery.replay(req.shard, &req.sink, &seqs).await {
            Ok((delivered, refused)) => Ok(Response::new(pb::ReplayDeadLettersResponse {
                delivered,
                refused: refused.into_iter().map(|(seq, reason)| pb::RefusedLetter { seq, reason }).collect(),
            })),
            Err(ReplayError::NotLeader(shard)) => Err(self.not_leader(shard, "replay runs on the leader")),
            Err(ReplayError::NotFound(m)) => Err(Status::not_found(m)),
            Err(ReplayError::Invalid(m)) => Err(Status::failed_precondition(m)),
            Err(ReplayError::Internal(m)) => Err(Status::unavailable(m)),
            Err(e @ ReplayError::NoClusterId) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn purge_dead_letters(
        &self,
        request: Request<pb::PurgeDeadLettersRequest>,
    ) -> Result<Response<pb::PurgeDeadLettersResponse>, Status> {
        let req = request.into_inner();
        self.sink(&req.sink)?;
        let seqs = self.selected(req.shard, &req.sink, &req.seqs, req.all)?;
        let reader = self.reader(req.shard)?;
        let mut present = Vec::new();
        for seq in seqs {
            if reader.dead_letters(&req.sink, seq, 1).map_err(convert::storage_status)?.first().map(|l| l.output.seq)
                == Some(seq)
            {
                present.push(seq);
            }
        }
        if present.is_empty() {
            return Ok(Response::new(pb::PurgeDeadLettersResponse { purged: 0 }));
        }
        let purged = present.len() as u64;
        match self.node.dlq_remove(req.shard, req.sink, present).await {
            Ok(_) => Ok(Response::new(pb::PurgeDeadLettersResponse { purged })),
            Err(ProposeError::NotLeader { shard, .. }) => Err(self.not_leader(shard, "no leader reachable")),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn sink_status(
        &self,
        _request: Request<pb::SinkStatusRequest>,
    ) -> Result<Response<pb::SinkStatusResponse>, Status> {
        let sinks = self
            .delivery
            .sinks()
            .into_iter()
            .map(|(c, s)| pb::SinkStatus {
                name: c.name.clone(),
                kind: c.kind_name().to_owned(),
                streams: c.streams.iter().cloned().collect(),
                delivered: s.delivered,
                retries: s.retries,
                dead_lettered: s.dead_lettered,
                breaker_open: s.breaker_open,
            })
            .collect();
        Ok(Response::new(pb::SinkStatusResponse { node: self.node.me().name.clone(), sinks }))
    }

    async fn leases(&self, _request: Request<pb::LeasesRequest>) -> Result<Response<pb::LeasesResponse>, Status> {
        Ok(Response::new(pb::LeasesResponse { node: self.node.me().name.clone(), leases: self.leases.leases() }))
    }

    async fn shards(&self, _request: Request<pb::ShardsRequest>) -> Result<Response<pb::ShardsResponse>, Status> {
        let internal = convert::storage_status;
        let mut shards = Vec::new();
        let adaptive = self.node.adaptive_decisions();
        for g in self.node.groups() {
            let Some(d) = self.node.shard_detail(g.shard) else { continue };
            let stats = g.reader().stats().map_err(internal)?;
            let outbox = g.reader().outbox().map_err(internal)?;
            let leading = d.role == "leader";
            shards.push(pb::ShardDetail {
                shard: d.shard,
                role: d.role.to_owned(),
                leader: d.leader.clone().unwrap_or_default(),
                epoch: self
                    .node
                    .shard_view(g.shard)
                    .and_then(|v| v.epoch)
                    .map(|e| pb::Epoch { term: e.term, node: e.node }),
                term: d.term,
                last_log_index: d.last_log_index,
                committed: d.committed,
                last_applied: d.last_applied,
                apply_lag: d.committed.saturating_sub(d.last_applied),
                replicas: d
                    .replicas
                    .iter()
                    .map(|r| pb::ReplicaState {
                        name: r.name.clone(),
                        node_id: r.id,
                        voter: r.voter,
                        matched: if leading { r.matched } else { 0 },
                        lag: if leading { d.last_log_index.saturating_sub(r.matched) } else { 0 },
                    })
                    .collect(),
                buffered_keys: stats.keys,
                buffered_bytes: stats.bytes,
                next_seq: outbox.next_seq,
                outbox_low: outbox.low,
                cursors: outbox.cursors.into_iter().collect(),
                preferred_leader: g.reader().preferred_leader().map_err(internal)?.unwrap_or_default(),
                lease_valid: self.node.delivery_epoch(g.shard).is_some(),
                quiesced: d.quiesced,
                adaptive: adaptive
                    .iter()
                    .filter(|(shard, _, _)| *shard == g.shard)
                    .map(|(_, stream, d)| pb::AdaptiveWindow {
                        stream: stream.clone(),
                        extra_ms: d.extra_ms,
                        reason: d.reason.as_str().to_owned(),
                        cause: d.reason.cause().map_or("", |c| c.as_str()).to_owned(),
                    })
                    .collect(),
                stopped: String::new(),
            });
        }
        // Groups stopped here by an entry that failed to apply, including those that could
        // not start at all (they have no Raft state to show).
        for (shard, failure) in self.node.stopped_groups() {
            match shards.iter_mut().find(|d| d.shard == shard) {
                Some(d) => {
                    d.role = "stopped".into();
                    d.stopped = failure.to_string();
                }
                None => shards.push(pb::ShardDetail {
                    shard,
                    role: "stopped".into(),
                    stopped: failure.to_string(),
                    ..Default::default()
                }),
            }
        }
        shards.sort_by_key(|d| d.shard);
        Ok(Response::new(pb::ShardsResponse {
            node: self.node.me().name.clone(),
            draining: self.node.is_draining(),
            shards,
        }))
    }

    async fn hot_keys(&self, request: Request<pb::HotKeysRequest>) -> Result<Response<pb::HotKeysResponse>, Status> {
        let r = request.into_inner();
        let k = match r.k {
            0 => DEFAULT_HOT_KEYS,
            k if k as usize > MAX_HOT_KEYS => {
                return Err(Status::invalid_argument(format!("k: at most {MAX_HOT_KEYS}")));
            }
            k => k as usize,
        };
        let mut keys = Vec::new();
        for (shard, total, top) in self.node.hot_keys(r.shard, r.stream.as_deref(), k) {
            keys.extend(top.into_iter().map(|h| pb::HotKey {
                shard,
                share: if total > 0.0 { h.count / total } else { 0.0 },
                stream: h.stream,
                key: h.key,
                key_truncated: h.key_truncated,
                count: h.count,
                error: h.error,
                rate_per_second: h.rate_per_sec.unwrap_or(0.0),
            }));
        }
        Ok(Response::new(pb::HotKeysResponse { node: self.node.me().name.clone(), keys }))
    }

    async fn streams(&self, _request: Request<pb::StreamsRequest>) -> Result<Response<pb::StreamsResponse>, Status> {
        let streams = self
            .node
            .streams()
            .iter()
            .map(|d| pb::StreamInfo {
                name: d.name.clone(),
                description: d.description.clone(),
                merge: d.rules.op.name().to_owned(),
                window: d.rules.window.to_string(),
                overflow: d.rules.overflow.as_str().to_owned(),
                key_overflow: d.rules.key_overflow.as_str().to_owned(),
                sinks: d.sinks.clone(),
                max_key_bytes: d.max_key_bytes as u64,
                max_value_bytes: d.max_value_bytes as u64,
            })
            .collect();
        Ok(Response::new(pb::StreamsResponse { streams }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let req = request.into_inner();
        let target = match (req.reset, req.to.is_empty()) {
            (true, true) => None,
            (false, false) => Some(req.to.clone()),
            _ => return Err(Status::invalid_argument("to: name a replica, or set reset (not both)")),
        };
        self.reader(req.shard)?;
        match self.node.set_preferred_leader(req.shard, target.clone()).await {
            Ok(()) => {}
            Err(ProposeError::NotReplica { shard, node }) => {
                return Err(Status::invalid_argument(format!("to: {node:?} is not a replica of shard {shard}")));
            }
            Err(ProposeError::NotLeader { shard, .. }) => return Err(self.not_leader(shard, "no leader reachable")),
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
        // Wait (bounded) for the move; balancing on the leader makes it.
        let expect = target.unwrap_or_else(|| {
            self.node.spec().placement(req.shard).first().map(|n| n.name.clone()).unwrap_or_default()
        });
        let deadline = tokio::time::Instant::now() + TRANSFER_WAIT;
        loop {
            let leader = self.node.leader_of(req.shard).map(|(_, n)| n.name).unwrap_or_default();
            if leader == expect || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(pb::TransferLeaderResponse { leader }));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn drain(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        let req = request.into_inner();
        let still_leading = if req.undrain {
            self.node.set_draining(false);
            self.node.balance_once().await;
            Vec::new()
        } else {
            self.node.drain(TRANSFER_WAIT).await.into_iter().collect()
        };
        Ok(Response::new(pb::DrainResponse { node: self.node.me().name.clone(), still_leading }))
    }

    async fn drop_consumer(
        &self,
        request: Request<pb::DropConsumerRequest>,
    ) -> Result<Response<pb::DropConsumerResponse>, Status> {
        let consumer = request.into_inner().consumer;
        if consumer.is_empty() {
            return Err(Status::invalid_argument("consumer: must not be empty"));
        }
        if self.delivery.sinks().iter().any(|(c, _)| c.name == consumer) {
            return Err(Status::failed_precondition(format!(
                "consumer: {consumer:?} is a configured sink; remove it from the streams file instead"
            )));
        }
        let mut shards = Vec::new();
        for g in self.node.groups() {
            let outbox = g.reader().outbox().map_err(convert::storage_status)?;
            if !outbox.cursors.contains_key(&consumer) {
                continue;
            }
            self.node.drop_cursor(g.shard, consumer.clone()).await.map_err(|e| Status::unavailable(e.to_string()))?;
            shards.push(g.shard);
        }
        Ok(Response::new(pb::DropConsumerResponse { shards }))
    }
}
