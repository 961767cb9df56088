//! Raft traffic between nodes over gRPC (`coalesce.v1.RaftPeer`, peer port only).
//!
//! One lazily connected tonic channel per peer address carries the messages of every shard
//! group; each message names its group. We implement openraft's network traits ourselves
//! (rather than the multi-raft adapter) to get a real pre-vote and leadership transfer.
//! Errors map to openraft's: a refused or broken connection is `Unreachable` (openraft backs
//! off at once), anything else is a `NetworkError`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coalesce_core::hash::ShardId;
use coalesce_proto::v1::raft_peer_client::RaftPeerClient;
use coalesce_proto::v1::{RaftMessage, SnapshotChunk};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::codec;
use crate::types::{PeerNode, TypeConfig, Vote};

/// Size of a snapshot chunk on the wire.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// One channel per peer address, shared by every group (and by the Hello exchange).
#[derive(Debug, Default)]
pub struct Channels {
    /// Channels are cheap handles onto one HTTP/2 connection; created lazily, never dialed here.
    by_addr: Mutex<HashMap<String, Channel>>,
    /// Mutual TLS towards peers (CA and this node's certificate), when configured.
    tls: Option<ClientTlsConfig>,
    /// This node's own view of where each peer (by name) listens: its config's peer list.
    addrs: HashMap<String, String>,
}

impl Channels {
    /// Channels that speak TLS (with this node's client certificate) when `tls` is set, to the
    /// peers at `addrs` (name → `host:port`).
    pub fn new(tls: Option<ClientTlsConfig>, addrs: HashMap<String, String>) -> Self {
        Self { by_addr: Mutex::default(), tls, addrs }
    }

    /// Where this node dials `node`: the address its own config gives for that name. The
    /// address stored in a group's membership is the view of whichever node wrote it; peers
    /// may reach each other differently (NAT, per-node DNS, a changed address after a
    /// restart, the cuttable links of a local test cluster). Unknown names fall back to it.
    pub fn addr_of<'a>(&'a self, node: &'a PeerNode) -> &'a str {
        self.addrs.get(&node.name).map_or(node.peer_addr.as_str(), String::as_str)
    }

    /// The channel to `node` (see [`Channels::addr_of`]).
    pub fn for_peer(&self, node: &PeerNode) -> Result<Channel, String> {
        self.get(self.addr_of(node))
    }

    /// The channel to `addr` (`host:port`), created on first use.
    pub fn get(&self, addr: &str) -> Result<Channel, String> {
        let mut map = self.by_addr.lock().map_err(|_| "channel map poisoned".to_owned())?;
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("bad peer address {addr:?}: {e}"))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| format!("peer TLS for {addr}: {e}"))?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        map.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// Creates network clients for one shard group.
#[derive(Debug, Clone)]
pub struct GroupNetworkFactory {
    group: ShardId,
    channels: Arc<Channels>,
}

impl GroupNetworkFactory {
    /// The factory of `group`, using the node's shared channels.
    pub fn new(group: ShardId, channels: Arc<Channels>) -> Self {
        Self { group, channels }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetworkFactory {
    type Network = GroupClient;

    async fn new_client(&mut self, target: u64, node: &PeerNode) -> Self::Network {
        GroupClient {
            group: self.group,
            target,
            addr: self.channels.addr_of(node).to_owned(),
            client: self.channels.for_peer(node).map(RaftPeerClient::new),
        }
    }
}

/// The client side of one (group, peer) pair.
#[derive(Debug)]
pub struct GroupClient {
    group: ShardId,
    target: u64,
    addr: String,
    client: Result<RaftPeerClient<Channel>, String>,
}

fn network_err(msg: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(msg.to_string()))
}

fn status_err(target: u64, addr: &str, s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::NotFound => RPCError::Unreachable(
            Unreachable::from_string(format!("peer {target} at {addr}: {}: {}", s.code(), s.message())),
        ),
        _ => network_err(format!("peer {target} at {addr}: {}: {}", s.code(), s.message())),
    }
}

impl GroupClient {
    fn client(&self) -> Result<RaftPeerClient<Channel>, RPCError<TypeConfig>> {
        self.client.clone().map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))
    }

    async fn call<Req, Resp, F, Fut>(
        &self,
        what: &'static str,
        req: &Req,
        ttl: Duration,
        f: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftPeerClient<Channel>, RaftMessage) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let payload = codec::encode_msg(what, req).map_err(network_err)?;
        let msg = RaftMessage { group: self.group, payload, target: self.target };
        let reply = tokio::time::timeout(ttl, f(self.client()?, msg))
            .await
            .map_err(|_| network_err(format!("{what} to peer {} timed out after {ttl:?}", self.target)))?
            .map_err(|s| status_err(self.target, &self.addr, s))?;
        codec::decode_msg(what, &reply.into_inner().payload).map_err(network_err)
    }
}

impl RaftNetworkV2<TypeConfig> for GroupClient {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("append_entries", &rpc, option.hard_ttl(), |mut c, m| async move { c.append_entries(m).await }).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("vote", &rpc, option.hard_ttl(), |mut c, m| async move { c.vote(m).await }).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("pre_vote", &rpc, option.hard_ttl(), |mut c, m| async move { c.pre_vote(m).await }).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("transfer_leader", &req, option.hard_ttl(), |mut c, m| async move { c.transfer_leader(m).await })
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<openraft::impls::leader_id_adv::LeaderId<u64, u64>, u64, PeerNode, Vec<u8>>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let group = self.group;
        let vote_bytes =
            codec::encode_vote(&vote).map_err(|e| StreamingError::Network(NetworkError::from_string(e.to_string())))?;
        let meta_bytes = codec::encode_snapshot_meta(&snapshot.meta)
            .map_err(|e| StreamingError::Network(NetworkError::from_string(e.to_string())))?;
        let data = snapshot.snapshot;
        let mut chunks: Vec<SnapshotChunk> = data
            .chunks(SNAPSHOT_CHUNK_BYTES)
            .map(|c| SnapshotChunk { group, target: self.target, vote: Vec::new(), meta: Vec::new(), data: c.to_vec() })
            .collect();
        if chunks.is_empty() {
            chunks.push(SnapshotChunk {
                group,
                target: self.target,
                vote: Vec::new(),
                meta: Vec::new(),
                data: Vec::new(),
            });
        }
        chunks[0].vote = vote_bytes;
        chunks[0].meta = meta_bytes;
        let mut client = self.client().map_err(StreamingError::from)?;
        let send = client.install_snapshot(tokio_stream_iter(chunks));
        let reply = tokio::select! {
            r = send => r.map_err(|s| StreamingError::from(status_err(self.target, &self.addr, s)))?,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        codec::decode_msg("snapshot response", &reply.into_inner().payload)
            .map_err(|e| StreamingError::Network(NetworkError::from_string(e.to_string())))
    }
}

/// A stream over owned chunks, for client-streaming calls.
fn tokio_stream_iter(chunks: Vec<SnapshotChunk>) -> impl futures::Stream<Item = SnapshotChunk> + Send + 'static {
    futures::stream::iter(chunks)
}
