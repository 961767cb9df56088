//! The peer gRPC service (`RaftPeer`): Hello, Ping, Raft messages, snapshots and forwards,
//! each checked against the calling peer's identity before it is acted on.

use std::sync::Arc;
use std::time::Duration;

use coalesce_core::hash::ShardId;
use coalesce_proto::v1::raft_peer_server::RaftPeer;
use coalesce_proto::v1::{HelloRequest, HelloResponse, PingRequest, PingResponse, RaftMessage, SnapshotChunk};
use tonic::{Request, Response as TonicResponse, Status, Streaming};

use crate::codec;
use crate::types::{Response, TypeConfig};
use coalesce_wire::peer::{Forwarded, check_snapshot_meta};
use openraft::async_runtime::WatchReceiver;

use super::{Group, ProposeError, RaftNode};
use crate::protocol::{
    PROTOCOL, PROTOCOL_HEADER, PROTOCOL_MIN, STREAM_GROUP_HEADER, STREAM_TARGET_HEADER, check_protocol,
};

/// The server side of `coalesce.v1.RaftPeer`: dispatches to the target group's Raft.
#[derive(Debug, Clone)]
pub struct PeerService {
    node: Arc<RaftNode>,
}

impl PeerService {
    /// Serves `node`'s groups.
    pub fn new(node: Arc<RaftNode>) -> Self {
        Self { node }
    }

    /// The local group of `shard`, for a message meant for node id `target`.
    fn group(&self, shard: ShardId, target: u64) -> Result<Group, Status> {
        if target != self.node.id {
            // NOT_FOUND reads as "unreachable" to the sender: that peer id no longer exists.
            return Err(Status::not_found(format!(
                "peer id {target} is not here: {} is now id {} (its data was replaced)",
                self.node.me.name, self.node.id
            )));
        }
        self.node.group(shard).ok_or_else(|| Status::not_found(format!("shard {shard} is not replicated on this node")))
    }
}

pub(super) fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Refuses replicated entries whose commands do not validate
/// ([`coalesce_wire::peer::check_entries`]).
pub(super) fn check_entries(rpc: &openraft::raft::AppendEntriesRequest<TypeConfig>) -> Result<(), Status> {
    if crate::failpoints::active("skip_validation") {
        return Ok(());
    }
    coalesce_wire::peer::check_entries(rpc).map_err(|e| {
        crate::metrics::INVALID_COMMANDS.with_label_values(&["peer"]).inc();
        bad(e)
    })
}

pub(super) fn reply<T: serde::Serialize>(
    group: ShardId,
    what: &'static str,
    v: &T,
) -> Result<TonicResponse<RaftMessage>, Status> {
    let payload = codec::encode_msg(what, v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(TonicResponse::new(RaftMessage { group, payload, target: 0 }))
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<TonicResponse<HelloResponse>, Status> {
        let sender = match self.node.peer_sender(&request) {
            // An incompatible peer may announce a compatible protocol after its upgrade.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => crate::tls::ConnInfo::of(&request)
                .and_then(|c| c.peer.clone())
                .and_then(|n| n.node(self.node.spec.nodes.iter().map(|x| x.name.as_str())).ok().map(str::to_owned)),
            other => other?,
        };
        if request.get_ref().cluster != self.node.spec.cluster {
            crate::metrics::PEER_REFUSED.with_label_values(&["cluster"]).inc();
            return Err(Status::failed_precondition(format!(
                "this node belongs to cluster {:?}, not {:?}",
                self.node.spec.cluster,
                request.get_ref().cluster
            )));
        }
        let hello = request.get_ref();
        let verdict = check_protocol(hello.protocol, hello.protocol_min).and_then(|()| {
            let from = sender.as_deref().unwrap_or("a peer");
            self.node
                .identity
                .learn(&self.node.db, from, &hello.cluster_id, hello.cluster_predates_id)
                .map_err(|e| e.to_string())
                .inspect_err(|_| crate::metrics::PEER_REFUSED.with_label_values(&["cluster"]).inc())
        });
        let verdict = match &sender {
            Some(name) => self.node.note_protocol(name, hello.protocol, verdict),
            None => verdict.inspect_err(|e| tracing::error!(error = %e, "an incompatible peer said Hello")),
        };
        if let Err(e) = verdict {
            return Err(Status::failed_precondition(e));
        }
        let me = self.node.me();
        let (cluster_id, cluster_predates_id) = self.node.identity.wire();
        let mut initialized = Vec::new();
        for g in self.node.groups() {
            if g.raft.is_initialized().await.unwrap_or(false) {
                initialized.push(g.shard);
            }
        }
        Ok(TonicResponse::new(HelloResponse {
            cluster: self.node.spec.cluster.clone(),
            node_id: self.node.id,
            name: me.name.clone(),
            peer_addr: me.peer_addr.clone(),
            client_addr: me.client_addr.clone(),
            initialized,
            draining: self.node.is_draining(),
            protocol: PROTOCOL,
            protocol_min: PROTOCOL_MIN,
            cluster_id,
            cluster_predates_id,
            born_with_ids: self.node.identity.born_with_ids(),
        }))
    }

    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<TonicResponse<RaftMessage>, Status> {
        let sender = self.node.peer_sender(&request)?;
        let m = request.into_inner();
        let g = self.group(m.group, m.target)?;
        let rpc: openraft::raft::AppendEntriesRequest<TypeConfig> =
            codec::decode_msg("append_entries", &m.payload).map_err(bad)?;
        self.node.check_speaks_for(sender.as_deref(), &g, rpc.vote.leader_id.node_id).await?;
        check_entries(&rpc)?;
        let (empty, leader, term) = (rpc.entries.is_empty(), rpc.vote.leader_id.node_id, rpc.vote.leader_id.term);
        let resp = g.raft.append_entries(rpc).await.map_err(unavailable)?;
        // Judged after processing: the follower may have agreed to quiesce under this very
        // leader and term meanwhile, and then this heartbeat must not wake it.
        if !g.quiet.is_keepalive(empty, leader, term) {
            self.node.wake_on_message(&g, "append_entries");
        }
        reply(m.group, "append_entries", &resp)
    }

    type StreamAppendStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftMessage, Status>> + Send>>;

    async fn stream_append(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<TonicResponse<Self::StreamAppendStream>, Status> {
        use futures::StreamExt;
        // Group and target come in the metadata: the leader produces its first request only
        // once this call has answered, so nothing here may wait for a message.
        let meta = |name: &str| -> Result<u64, Status> {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("stream_append: missing or bad {name} metadata")))
        };
        let sender = self.node.peer_sender(&request)?;
        let group = ShardId::try_from(meta(STREAM_GROUP_HEADER)?).map_err(bad)?;
        let g = self.group(group, meta(STREAM_TARGET_HEADER)?)?;
        let (node, quiet, check) = (self.node.clone(), g.clone(), g.clone());
        let speaks_for = self.node.clone();
        // Requests until the leader ends the stream, sends something undecodable or invalid,
        // or this node stops; each wakes a quiesced group as a unary AppendEntries would.
        let input = request
            .into_inner()
            .take_until(self.node.stopped())
            .map(move |m| {
                // A refused message ends the stream (the leader opens a new one); each refusal is
                // logged here or, for the checks, where they count it.
                let rpc = match m.map(|m| codec::decode_msg("stream_append", &m.payload)) {
                    Ok(Ok(rpc)) => Some(rpc),
                    Ok(Err(e)) => {
                        tracing::warn!(shard = group, error = %e, "replication stream ended: a message did not decode");
                        None
                    }
                    Err(_) => None,
                };
                rpc.filter(|rpc: &openraft::raft::AppendEntriesRequest<TypeConfig>| {
                    let checked = check_entries(rpc).and_then(|()| {
                        speaks_for.check_speaks_for_known(sender.as_deref(), &check, rpc.vote.leader_id.node_id)
                    });
                    if let Err(e) = &checked {
                        tracing::warn!(shard = group, error = %e.message(), "replication stream ended: a message was refused");
                    }
                    checked.is_ok()
                })
            })
            .take_while(|r| futures::future::ready(r.is_some()))
            .filter_map(futures::future::ready)
            .inspect(move |rpc: &openraft::raft::AppendEntriesRequest<TypeConfig>| {
                let leader = &rpc.vote.leader_id;
                if !quiet.quiet.is_keepalive(rpc.entries.is_empty(), leader.node_id, leader.term) {
                    node.wake_on_message(&quiet, "append_entries (stream)");
                }
            });
        let replies = g.raft.stream_append(input).take_until(self.node.stopped()).map(move |r| {
            let r: Result<_, String> = r.map_err(|fatal| fatal.to_string());
            let payload = codec::encode_msg("stream_append reply", &r).map_err(|e| Status::internal(e.to_string()))?;
            Ok(RaftMessage { group, payload, target: 0 })
        });
        Ok(TonicResponse::new(Box::pin(replies)))
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<TonicResponse<RaftMessage>, Status> {
        let sender = self.node.peer_sender(&request)?;
        let m = request.into_inner();
        let g = self.group(m.group, m.target)?;
        let rpc: openraft::raft::VoteRequest<TypeConfig> = codec::decode_msg("vote", &m.payload).map_err(bad)?;
        self.node.check_speaks_for(sender.as_deref(), &g, rpc.vote.leader_id.node_id).await?;
        let resp = g.raft.vote(rpc).await.map_err(unavailable)?;
        self.node.wake_on_message(&g, "vote");
        reply(m.group, "vote", &resp)
    }

    async fn pre_vote(&self, request: Request<RaftMessage>) -> Result<TonicResponse<RaftMessage>, Status> {
        let sender = self.node.peer_sender(&request)?;
        let m = request.into_inner();
        let g = self.group(m.group, m.target)?;
        let rpc: openraft::raft::VoteRequest<TypeConfig> = codec::decode_msg("pre_vote", &m.payload).map_err(bad)?;
        self.node.check_speaks_for(sender.as_deref(), &g, rpc.vote.leader_id.node_id).await?;
        let resp = g.raft.pre_vote(rpc).await.map_err(unavailable)?;
        self.node.wake_on_message(&g, "pre_vote");
        reply(m.group, "pre_vote", &resp)
    }

    async fn transfer_leader(&self, request: Request<RaftMessage>) -> Result<TonicResponse<RaftMessage>, Status> {
        let sender = self.node.peer_sender(&request)?;
        let m = request.into_inner();
        let g = self.group(m.group, m.target)?;
        let req: openraft::raft::TransferLeaderRequest<TypeConfig> =
            codec::decode_msg("transfer_leader", &m.payload).map_err(bad)?;
        self.node.check_speaks_for(sender.as_deref(), &g, req.from_leader().leader_id.node_id).await?;
        let resp = g.raft.handle_transfer_leader(req).await.map_err(unavailable)?;
        self.node.wake_on_message(&g, "transfer_leader");
        reply(m.group, "transfer_leader", &resp)
    }

    async fn forward(&self, request: Request<RaftMessage>) -> Result<TonicResponse<RaftMessage>, Status> {
        self.node.peer_sender(&request)?;
        let span = tracing::debug_span!("forwarded", shard = request.get_ref().group);
        crate::tracectx::extract(&span, request.metadata().as_ref());
        // The forwarder's protocol: what its reply may carry (a build before 2 sends none).
        let protocol =
            request.metadata().get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok()?.parse::<u32>().ok()).unwrap_or(1);
        let m = request.into_inner();
        let g = self.group(m.group, m.target)?;
        let req: Forwarded = codec::decode_msg("forward", &m.payload).map_err(bad)?;
        let outcome = if let Err(e) = self.node.check_forwarded(m.group, &req) {
            Err(e)
        } else if g.raft.is_leader() {
            tracing::Instrument::instrument(self.node.on_leader(&g, req), span).await
        } else {
            Err(ProposeError::NotLeader { shard: m.group, leader: self.node.leader_of(m.group).map(|(_, n)| n) })
        };
        let outcome = outcome.map(|r| match r {
            Response::Ingest { groups, sealed } => {
                Response::Ingest { groups: groups.into_iter().map(|g| g.for_protocol(protocol)).collect(), sealed }
            }
            other => other,
        });
        reply(m.group, "forward reply", &outcome)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<TonicResponse<RaftMessage>, Status> {
        let sender = self.node.peer_sender(&request)?;
        let options = self.node.channels.snapshot_options();
        let mut stream = request.into_inner();
        let stall = Duration::from_millis(options.stall_ms.max(1));
        let first = tokio::time::timeout(stall, stream.message())
            .await
            .map_err(|_| crate::snapshot::refuse("stalled", "no first chunk"))??
            .ok_or_else(|| bad("empty snapshot stream"))?;
        let g = self.group(first.group, first.target)?;
        let vote = codec::decode_vote(first.group, &first.vote).map_err(bad)?;
        self.node.check_speaks_for(sender.as_deref(), &g, vote.leader_id.node_id).await?;
        let meta = codec::decode_snapshot_meta(first.group, &first.meta).map_err(bad)?;
        // openraft panics on a snapshot that contradicts the vote or the committed log: refuse
        // one before it gets there, and before a byte of it is stored. A vote older than this
        // node's would be refused after the whole transfer: refuse it now.
        let check = |meta: &crate::codec::SnapshotMetaT| {
            let m = g.raft.metrics().borrow_watched().clone();
            if vote < m.vote {
                return Err(crate::snapshot::refuse("stale", format!("shard {}: vote {vote} < {}", g.shard, m.vote)));
            }
            check_snapshot_meta(meta, &vote, m.local_committed.as_ref())
                .map_err(|e| crate::snapshot::refuse("invalid", format!("shard {}: {e}", g.shard)))
        };
        check(&meta)?;
        // Held until the snapshot is installed (or refused): the node's disk and I/O for
        // snapshots stay bounded. A busy node is asked again after openraft's backoff. Taken
        // only once the first chunk checked out, so a caller that says nothing holds none.
        let _permit = Arc::clone(&self.node.snapshot_receives).try_acquire_owned().map_err(|_| {
            crate::snapshot::refuse("busy", format!("{} snapshots are being received", options.concurrent_receives))
        })?;
        let file = crate::snapshot::receive(&g.store, first, std::pin::pin!(stream), options).await?;
        // The rows must say what the metadata says: openraft takes the metadata as the applied
        // state, this replica's reads take the rows.
        let rows_applied = file.meta().applied.as_deref().map(|b| codec::decode_log_id(g.shard, b)).transpose();
        let rows_membership =
            file.meta().membership.as_deref().map(|b| codec::decode_membership(g.shard, b)).transpose();
        match (rows_applied, rows_membership) {
            (Ok(applied), Ok(membership))
                if applied == meta.last_log_id
                    && membership.as_ref().unwrap_or(&Default::default()) == &meta.last_membership => {}
            _ => {
                return Err(crate::snapshot::refuse(
                    "invalid",
                    format!("shard {}: the snapshot's rows contradict its metadata", g.shard),
                ));
            }
        }
        crate::metrics::SNAPSHOTS.with_label_values(&["received"]).inc();
        // The transfer may have taken minutes: the vote and committed log id are read again.
        check(&meta)?;
        let snapshot = openraft::storage::Snapshot { meta, snapshot: crate::snapshot::ShardSnapshot::Received(file) };
        let resp = g.raft.install_full_snapshot(vote, snapshot).await.map_err(unavailable)?;
        self.node.wake_on_message(&g, "snapshot");
        reply(g.shard, "snapshot response", &resp)
    }

    async fn quiesce(&self, request: Request<RaftMessage>) -> Result<TonicResponse<RaftMessage>, Status> {
        let sender = self.node.peer_sender(&request)?;
        let m = request.into_inner();
        let g = self.group(m.group, m.target)?;
        let agreed = self.node.on_quiesce(&g, &m.payload, |leader| {
            self.node.check_speaks_for_known(sender.as_deref(), &g, leader).is_ok()
        });
        reply(m.group, "quiesce reply", &agreed)
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<TonicResponse<PingResponse>, Status> {
        if let Some(sender) = self.node.peer_sender(&request)?
            && sender != request.get_ref().name
        {
            crate::metrics::PEER_REFUSED.with_label_values(&["impersonation"]).inc();
            return Err(Status::permission_denied(format!(
                "peer port: {sender}'s certificate cannot ping as {:?}",
                request.get_ref().name
            )));
        }
        Ok(TonicResponse::new(self.node.on_ping(request.get_ref())))
    }
}
