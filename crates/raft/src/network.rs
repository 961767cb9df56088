//! Raft traffic between nodes over gRPC (`coalesce.v1.RaftPeer`, peer port only).
//!
//! One lazily connected tonic channel per peer address carries the messages of every shard
//! group; each message names its group. We implement openraft's network traits ourselves
//! (rather than the multi-raft adapter) to get a real pre-vote, leadership transfer and
//! pipelined replication: `stream_append` keeps one bidirectional gRPC call per (group,
//! follower) open, sends AppendEntries requests as openraft produces them and yields the
//! follower's answers in request order, so a follower has several appends in flight instead
//! of one round trip (and one fsync) at a time. A call that makes no progress for its stall
//! time while requests are outstanding fails like a timed-out RPC, and openraft opens a new
//! one. Single requests (heartbeats) stay unary calls.
//! Errors map to openraft's: a refused or broken connection is `Unreachable` (openraft backs
//! off at once), anything else is a `NetworkError`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coalesce_core::hash::ShardId;
use coalesce_proto::v1::RaftMessage;
use coalesce_proto::v1::raft_peer_client::RaftPeerClient;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2, stream_append_sequential};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::codec;
use crate::snapshot::{ShardSnapshot, SnapshotOptions};
use crate::types::{PeerNode, TypeConfig, Vote};

/// The least time a replication stream may go without an answer while requests are
/// outstanding before it counts as broken (a paused follower, a black-holed connection).
const MIN_STREAM_STALL: Duration = Duration::from_millis(500);

/// One channel per peer address, shared by every group (and by the Hello exchange).
#[derive(Debug, Default)]
pub struct Channels {
    /// Channels are cheap handles onto one HTTP/2 connection; created lazily, never dialed
    /// here. Keyed by address and the node name expected there.
    by_addr: Mutex<HashMap<(String, String), Channel>>,
    /// Mutual TLS towards peers (CA and this node's certificate), when configured.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// This node's own view of where each peer (by name) listens: its config's peer list.
    addrs: HashMap<String, String>,
    /// How snapshots are sent (and received) by this node.
    snapshot: SnapshotOptions,
}

/// Why no channel to a peer could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("{0:?} is not in this node's peer list")]
    UnknownPeer(String),
    #[error("bad peer address {addr:?}: {detail}")]
    BadAddress { addr: String, detail: String },
    #[error("node name {node:?} cannot be checked against a certificate: {detail}")]
    BadName { node: String, detail: String },
}

impl From<ChannelError> for tonic::Status {
    /// A node's own peer list or names are wrong: the node's fault, not the caller's.
    fn from(e: ChannelError) -> Self {
        tonic::Status::internal(e.to_string())
    }
}

impl Channels {
    /// Channels that speak TLS (with this node's client certificate, checking that each peer's
    /// certificate names the node dialed: [`crate::tls::Connector`]) when `tls` is set, to the
    /// peers at `addrs` (name → `host:port`).
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>, addrs: HashMap<String, String>) -> Self {
        Self { by_addr: Mutex::default(), tls, addrs, snapshot: SnapshotOptions::default() }
    }

    /// The same channels, sending and receiving snapshots with `options`.
    pub fn with_snapshot_options(mut self, options: SnapshotOptions) -> Self {
        self.snapshot = options;
        self
    }

    /// How this node sends and receives snapshots.
    pub fn snapshot_options(&self) -> SnapshotOptions {
        self.snapshot
    }

    /// Whether peers speak mutual TLS (and must prove which node they are).
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Where this node dials `node`: the address its own config gives for that name. The
    /// address stored in a group's membership is the view of whichever node wrote it; peers
    /// may reach each other differently (NAT, per-node DNS, a changed address after a
    /// restart, the cuttable links of a local test cluster). Unknown names fall back to it.
    pub fn addr_of<'a>(&'a self, node: &'a PeerNode) -> &'a str {
        self.addrs.get(&node.name).map_or(node.peer_addr.as_str(), String::as_str)
    }

    /// The channel to `node` (see [`Channels::addr_of`]).
    pub fn for_peer(&self, node: &PeerNode) -> Result<Channel, ChannelError> {
        self.channel(self.addr_of(node), &node.name)
    }

    /// The channel to the configured node called `name`.
    pub fn for_name(&self, name: &str) -> Result<Channel, ChannelError> {
        let addr = self.addrs.get(name).ok_or_else(|| ChannelError::UnknownPeer(name.to_owned()))?;
        self.channel(addr, name)
    }

    /// The channel to `addr` (`host:port`) where the node `name` listens, created on first use.
    fn channel(&self, addr: &str, name: &str) -> Result<Channel, ChannelError> {
        // A panic while the map was held cannot leave it half-written (one insert).
        let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        let key = (addr.to_owned(), name.to_owned());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ChannelError::BadAddress { addr: addr.to_owned(), detail: e.to_string() })?;
        let endpoint = endpoint
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = match &self.tls {
            Some(tls) => {
                let cluster = Arc::new(self.addrs.keys().cloned().collect::<Vec<_>>());
                endpoint.connect_with_connector_lazy(crate::tls::Connector::new(tls.clone(), name, cluster)?)
            }
            None => endpoint.connect_lazy(),
        };
        map.insert(key, channel.clone());
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
            snapshot: self.channels.snapshot_options(),
        }
    }
}

/// The client side of one (group, peer) pair.
#[derive(Debug)]
pub struct GroupClient {
    group: ShardId,
    target: u64,
    addr: String,
    client: Result<RaftPeerClient<Channel>, ChannelError>,
    snapshot: SnapshotOptions,
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
        self.client.clone().map_err(|e| RPCError::Unreachable(Unreachable::from_string(e.to_string())))
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
    type SnapshotData = ShardSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("append_entries", &rpc, option.hard_ttl(), |mut c, m| async move { c.append_entries(m).await }).await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + openraft::OptionalSend + Unpin + 'static,
    {
        // openraft's heartbeats are one-request streams: a unary call is cheaper than a stream.
        if input.size_hint().1.is_some_and(|n| n <= 1) {
            return stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let mut client = self.client()?;
            let (group, target, addr) = (self.group, self.target, self.addr.clone());
            // Opening waits for the follower's response headers, under load too: the stall time.
            let stall = option.hard_ttl().max(MIN_STREAM_STALL);
            let sent = Arc::new(Sent::default());
            let outbound = {
                let sent = sent.clone();
                // A request that cannot be encoded ends the stream: openraft then opens a new one.
                input
                    .map(move |rpc| codec::encode_msg("stream_append", &rpc))
                    .take_while(|r| futures::future::ready(r.is_ok()))
                    .filter_map(|r| futures::future::ready(r.ok()))
                    .map(move |payload| {
                        sent.push();
                        RaftMessage { group, payload, target }
                    })
            };
            let mut request = tonic::Request::new(outbound);
            let md = request.metadata_mut();
            md.insert(crate::protocol::STREAM_GROUP_HEADER, group.into());
            md.insert(crate::protocol::STREAM_TARGET_HEADER, target.into());
            let opened = tokio::time::timeout(stall, client.stream_append(request))
                .await
                .map_err(|_| network_err(format!("stream_append to peer {target} timed out after {stall:?}")))
                .and_then(|r| r.map_err(|s| status_err(target, &addr, s)));
            let inbound = match opened {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    crate::metrics::APPEND_STREAMS.with_label_values(&["failed"]).inc();
                    return Err(e);
                }
            };
            crate::metrics::APPEND_STREAMS.with_label_values(&["opened"]).inc();
            let answers = inbound.map(move |m| match m {
                Ok(m) => codec::decode_msg::<Result<StreamAppendResult<TypeConfig>, String>>(
                    "stream_append reply",
                    &m.payload,
                )
                .map_err(network_err)?
                .map_err(|fatal| network_err(format!("peer {target}: {fatal}"))),
                Err(s) => Err(status_err(target, &addr, s)),
            });
            Ok(Box::pin(watch_stalls(Box::pin(answers), sent, stall, target)) as BoxStream<'s, _>)
        })
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
        snapshot: SnapshotOf<TypeConfig, ShardSnapshot>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let fail = |e: &dyn std::fmt::Display| StreamingError::Network(NetworkError::from_string(e.to_string()));
        let vote_bytes = codec::encode_vote(&vote).map_err(|e| fail(&e))?;
        let meta_bytes = codec::encode_snapshot_meta(&snapshot.meta).map_err(|e| fail(&e))?;
        let mut cancel = std::pin::pin!(cancel);
        // The first chunk is read (a view counts its rows) before the transfer opens.
        let prepared = tokio::select! {
            p = crate::snapshot::prepare(self.group, snapshot.snapshot) => p.map_err(|e| fail(&e))?,
            closed = &mut cancel => return Err(StreamingError::Closed(closed)),
        };
        let (chunks, read_error) =
            crate::snapshot::chunks(self.group, self.target, vote_bytes, meta_bytes, prepared, self.snapshot);
        let mut client = self.client().map_err(StreamingError::from)?;
        let send = client.install_snapshot(chunks);
        let reply = tokio::select! {
            r = send => r,
            closed = &mut cancel => return Err(StreamingError::Closed(closed)),
        };
        // A local read error ended the stream early: that, not the receiver's complaint about a
        // short snapshot, is the cause.
        if let Some(e) = read_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(fail(&format!("reading the snapshot to send: {e}")));
        }
        let reply = reply.map_err(|s| StreamingError::from(status_err(self.target, &self.addr, s)))?;
        crate::metrics::SNAPSHOTS.with_label_values(&["sent"]).inc();
        codec::decode_msg("snapshot response", &reply.into_inner().payload).map_err(|e| fail(&e))
    }
}

/// When each request of a replication stream that is not answered yet was sent.
#[derive(Debug, Default)]
struct Sent {
    times: Mutex<VecDeque<Instant>>,
    more: tokio::sync::Notify,
}

impl Sent {
    fn push(&self) {
        self.times.lock().unwrap_or_else(|p| p.into_inner()).push_back(Instant::now());
        self.more.notify_one();
    }

    /// Forgets the oldest request (it was answered).
    fn pop(&self) {
        self.times.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
    }

    fn oldest(&self) -> Option<Instant> {
        self.times.lock().unwrap_or_else(|p| p.into_inner()).front().copied()
    }
}

/// `answers`, failing with a network error once requests are outstanding and neither the
/// oldest of them nor the last answer is younger than `stall`: the follower or the connection
/// stopped moving, and openraft retries on a new stream. Ends after the first error.
fn watch_stalls<T: Send + 'static>(
    answers: impl Stream<Item = Result<T, RPCError<TypeConfig>>> + Send + Unpin + 'static,
    sent: Arc<Sent>,
    stall: Duration,
    target: u64,
) -> impl Stream<Item = Result<T, RPCError<TypeConfig>>> + Send + 'static {
    futures::stream::unfold(Some((answers, Instant::now())), move |state| {
        let sent = sent.clone();
        async move {
            let (mut answers, mut last) = state?;
            loop {
                let next = match sent.oldest() {
                    Some(oldest) => tokio::select! {
                        next = answers.next() => next,
                        () = tokio::time::sleep_until(oldest.max(last) + stall) => {
                            crate::metrics::APPEND_STREAMS.with_label_values(&["stalled"]).inc();
                            let e = network_err(format!("stream_append to peer {target}: no answer for {stall:?}"));
                            return Some((Err(e), None));
                        }
                    },
                    None => tokio::select! {
                        next = answers.next() => next,
                        () = sent.more.notified() => continue,
                    },
                };
                let item = next?;
                if item.is_err() {
                    crate::metrics::APPEND_STREAMS.with_label_values(&["failed"]).inc();
                }
                sent.pop();
                last = Instant::now();
                let more = item.is_ok().then_some((answers, last));
                return Some((item, more));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answers = futures::channel::mpsc::UnboundedSender<Result<u32, RPCError<TypeConfig>>>;

    fn watched(stall: Duration) -> (Answers, Arc<Sent>, impl Stream<Item = Result<u32, RPCError<TypeConfig>>>) {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let sent = Arc::new(Sent::default());
        let stream = watch_stalls(rx, sent.clone(), stall, 7);
        (tx, sent, stream)
    }

    #[tokio::test]
    async fn an_unanswered_request_fails_the_stream_after_the_stall_time() {
        let stall = Duration::from_millis(100);
        let (tx, sent, stream) = watched(stall);
        let mut stream = Box::pin(stream);
        sent.push();
        tx.unbounded_send(Ok(1)).unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        let started = Instant::now();
        sent.push();
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap();
        assert!(started.elapsed() >= stall, "failed after {:?}", started.elapsed());
        let e = next.unwrap().unwrap_err();
        assert!(e.to_string().contains("no answer"), "{e}");
        // The stream ends after its error, as openraft expects.
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn an_idle_stream_with_nothing_outstanding_never_fails() {
        let stall = Duration::from_secs(1);
        let (tx, sent, stream) = watched(stall);
        let mut stream = Box::pin(stream);
        // Nothing sent: waiting longer than the stall time yields nothing.
        assert!(tokio::time::timeout(stall * 2, stream.next()).await.is_err());
        // A request sent after the idle time gets its own full stall time, and its answer.
        sent.push();
        tokio::time::sleep(stall / 20).await;
        tx.unbounded_send(Ok(2)).unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), 2);
        assert!(sent.oldest().is_none());
        // A backlog drains: each answer is yielded in order.
        for _ in 0..4 {
            sent.push();
        }
        for i in 0..4 {
            tokio::time::sleep(stall / 20).await;
            tx.unbounded_send(Ok(10 + i)).unwrap();
            assert_eq!(stream.next().await.unwrap().unwrap(), 10 + i);
        }
        drop(tx);
        assert!(stream.next().await.is_none());
    }
}
