//! A node's shard groups: one openraft instance per shard this node replicates, all sharing
//! the node's RocksDB, its WAL flusher and one gRPC channel per peer.
//!
//! Placement is static: with the peer names sorted (`coalesce-0`, `coalesce-1`, …), shard `s`
//! lives on the `R` nodes starting at index `s mod N`. The first of them initializes the group,
//! so each node starts out leading about `S/N` shards. Node ids are random per data directory
//! (kept in the `node` column family): a wiped node comes back as a new peer, never reusing
//! an id (reusing one can make a leader panic; openraft issue 898).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use coalesce_core::adaptive::{AdaptiveController, Decision, Pressure};
use coalesce_core::buffer::ShardBuffer;
use coalesce_core::hash::ShardId;
use coalesce_core::hotkeys::{HotKey, HotKeys};
use coalesce_core::stream::{KeyOverflow, MAX_KEY_BYTES_LIMIT, OverflowPolicy, StreamTable};
use coalesce_core::time::{Clock, Millis, SystemClock};
use coalesce_proto::v1::raft_peer_client::RaftPeerClient;
use coalesce_proto::v1::raft_peer_server::RaftPeer;
use coalesce_proto::v1::{HelloRequest, HelloResponse, PingRequest, PingResponse, RaftMessage, SnapshotChunk};
use coalesce_storage::{NodeDb, ShardStore, StorageError};
use openraft::errors::{ClientWriteError, ForwardReason, RaftError};
use openraft::{Config, Raft, SnapshotPolicy};
use tonic::{Request, Response as TonicResponse, Status, Streaming};

use crate::codec;
use crate::log_store::LogStore;
use crate::network::{Channels, GroupNetworkFactory};
use crate::state_machine::{ApplyFailure, FailureSlot, OutboxMeta, ShardStateMachine};
use crate::types::{Command, IngestGroup, InvalidCommand, PeerNode, Response, TypeConfig};
use coalesce_wire::peer::{Forwarded, check_snapshot_meta};
use openraft::async_runtime::WatchReceiver;

/// One node of the static peer list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub peer_addr: String,
    pub client_addr: String,
}

/// The cluster as configured.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub cluster: String,
    pub shards: u32,
    pub replication: usize,
    pub nodes: Vec<NodeSpec>,
}

impl ClusterSpec {
    /// The names of the nodes that replicate `shard`, first one initializing it.
    pub fn placement(&self, shard: ShardId) -> Vec<&NodeSpec> {
        let mut sorted: Vec<&NodeSpec> = self.nodes.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let n = sorted.len();
        let r = self.replication.min(n);
        (0..r).map(|k| sorted[(shard as usize + k) % n]).collect()
    }
}

/// Raft timing. A follower starts an election once the leader's lease (= the maximum election
/// timeout) has passed without a heartbeat; when the other follower's lease has not quite
/// expired yet, the pre-vote is refused and retried one election timeout later. Failover
/// therefore takes between one and about two and a half maximum election timeouts: with the
/// defaults, p50 0.78 s and p99 0.88 s over 20 leader kills (`coalescectl bench failover`,
/// docs/benchmarks.md).
#[derive(Clone, Copy, Debug)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// An idle group stops its timers after this long ([`crate::quiesce`]); 0: never.
    pub quiesce_after_ms: u64,
    /// Applied state is checkpointed to RocksDB at least this often
    /// ([`ShardStateMachine::checkpoint_every`]); 0: after every apply.
    pub checkpoint_ms: u64,
    /// Limits and pacing of snapshot transfers ([`crate::snapshot`]).
    pub snapshot: crate::snapshot::SnapshotOptions,
}

impl Default for RaftTiming {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 250,
            election_max_ms: 350,
            quiesce_after_ms: 2_000,
            checkpoint_ms: 1_000,
            snapshot: crate::snapshot::SnapshotOptions::DEFAULT,
        }
    }
}

impl RaftTiming {
    /// Heartbeats to a follower that acknowledged an RPC this recently are skipped. openraft
    /// requires `heartbeat + min_interval + tick < election_min` (tick = heartbeat × 13/64),
    /// so suppression never delays a heartbeat past a follower's election timeout.
    fn heartbeat_min_interval(&self) -> Option<u64> {
        let tick = self.heartbeat_ms * 13 / 64;
        let room = self.election_min_ms.saturating_sub(self.heartbeat_ms + tick + 1);
        (room > 0).then(|| room.min(self.heartbeat_ms))
    }

    fn config(&self, cluster: &str) -> Result<Config, String> {
        Config {
            cluster_name: cluster.to_owned(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            enable_pre_vote: Some(true),
            // Under load, replication responses prove liveness: skip redundant heartbeats.
            heartbeat_min_interval: self.heartbeat_min_interval(),
            // A leader that lost its quorum probes at this period instead of flooding (openraft #2080).
            quorum_loss_probe_interval: Some(2 * self.election_max_ms + 400),
            // A restarted node must win an election again: our applied state is not fsynced.
            enable_leader_restore: Some(false),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(20_000),
            max_in_snapshot_log_to_keep: 2_000,
            purge_batch_size: 256,
            max_payload_entries: 512,
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())
    }
}

/// The Raft instance of a shard group and its storage.
#[derive(Clone)]
pub struct Group {
    pub shard: ShardId,
    pub raft: Raft<TypeConfig, ShardStateMachine>,
    pub store: ShardStore,
    /// The state machine's change counter (see [`ShardStateMachine::version`]).
    pub version: Arc<std::sync::atomic::AtomicU64>,
    /// The adaptive stretch of each stream in the last Ingest entry applied here (see
    /// [`ShardStateMachine::applied_extra`]): where a new leader's controllers resume.
    pub applied_extra: crate::state_machine::AppliedExtra,
    /// Whether the group's timers are stopped ([`crate::quiesce`]), and when it was last needed.
    pub quiet: Arc<crate::quiesce::Quiet>,
    /// Set when an entry failed to apply here: the group has stopped on this node.
    failure: FailureSlot,
}

impl Group {
    /// Why the group stopped on this node, if it did ([`ShardStateMachine::apply_entries`]).
    pub fn failure(&self) -> Option<ApplyFailure> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("shard", &self.shard).finish()
    }
}

/// Why a proposal was not applied. Serializable: a forwarding node relays it to its client.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ProposeError {
    #[error("shard {0} is not replicated on this node")]
    NoGroup(ShardId),
    #[error("not the leader of shard {shard}")]
    NotLeader { shard: ShardId, leader: Option<PeerNode> },
    #[error("leader of shard {0} has lost its quorum lease")]
    LeaseExpired(ShardId),
    #[error("outcome unknown for shard {0}: the entry may or may not be committed")]
    Unknown(ShardId),
    #[error("shard {shard} is stopped: {detail}")]
    Fatal { shard: ShardId, detail: String },
    #[error("shard {shard}: {error}")]
    Invalid { shard: ShardId, error: InvalidCommand },
    #[error("shard {shard} buffer is full ({what}); retry after {retry_after_ms} ms")]
    BufferFull { shard: ShardId, what: String, retry_after_ms: u64 },
    #[error("stream {stream:?} is not configured on the leader of shard {shard}")]
    UnknownStream { shard: ShardId, stream: String },
    #[error("forwarding to the leader of shard {shard} failed: {detail}")]
    Unreachable { shard: ShardId, detail: String },
    #[error("{node:?} is not a replica of shard {shard}")]
    NotReplica { shard: ShardId, node: String },
    #[error(
        "shard {shard} keeps {kept} outputs, the limit is {max}: consumer {lagging:?} is behind (deliver or ack \
         its outputs, or purge the consumer); retry after {retry_after_ms} ms"
    )]
    OutboxFull { shard: ShardId, kept: u64, max: u64, lagging: String, retry_after_ms: u64 },
}

/// A node's view of one shard group.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardView {
    pub shard: ShardId,
    pub is_leader: bool,
    /// (node id, node) of the current leader, when known.
    pub leader: Option<(u64, PeerNode)>,
    /// The leader's epoch (term, node), once its vote is committed.
    pub epoch: Option<coalesce_core::output::Epoch>,
    pub last_applied: u64,
}

/// A node's leadership of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub epoch: coalesce_core::output::Epoch,
    /// Since a quorum last acknowledged this leader (zero for a single-replica group).
    pub quorum_acked_ago: Duration,
}

/// A replica as the local Raft state sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaDetail {
    pub name: String,
    pub id: u64,
    pub voter: bool,
    /// Highest log index known replicated to it (the leader's view; 0 elsewhere).
    pub matched: u64,
}

/// Raft state of one shard on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardDetail {
    pub shard: ShardId,
    pub role: &'static str,
    pub leader: Option<String>,
    pub term: u64,
    pub last_log_index: u64,
    pub committed: u64,
    pub last_applied: u64,
    pub replicas: Vec<ReplicaDetail>,
    /// The group's timers are stopped ([`crate::quiesce`]).
    pub quiesced: bool,
}

/// Resolves once `group`'s Raft on this node knows a leader other than `old` (possibly this
/// node). Never resolves while the group has no leader or still names `old`.
async fn leader_moves(group: &Group, old: u64) {
    let mut metrics = group.raft.metrics();
    loop {
        // The borrow ends before the await (openraft issue 1238).
        let moved = metrics.borrow_watched().current_leader.is_some_and(|l| l != old);
        if moved || metrics.changed().await.is_err() {
            // A stopped group never reports again: let the forward run its course.
            if !moved {
                std::future::pending::<()>().await;
            }
            return;
        }
    }
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("node {0:?} is not in the cluster's node list")]
    UnknownSelf(String),
    #[error("raft config: {0}")]
    Config(String),
    #[error("starting shard {shard}: {detail}")]
    Start { shard: ShardId, detail: String },
    #[error("bootstrap: {0}")]
    Bootstrap(String),
}

/// All shard groups of one node.
pub struct RaftNode {
    pub(crate) id: u64,
    me: PeerNode,
    pub(crate) spec: ClusterSpec,
    /// The streams this node runs with; a leader stamps their rules into Ingest entries.
    streams: StreamTable,
    pub(crate) channels: Arc<Channels>,
    /// Written only at start-up; never held across an await.
    groups: RwLock<BTreeMap<ShardId, Group>>,
    /// Shards whose group could not start here (an entry it re-applied at start failed):
    /// reported, not retried, so a bad entry cannot crash-loop the node.
    not_started: BTreeMap<ShardId, ApplyFailure>,
    clock: Arc<dyn Clock>,
    /// How long a quorum acknowledgement keeps this node's leadership valid for delivery.
    pub(crate) lease: Duration,
    /// The maximum election timeout: how long followers wait before campaigning.
    pub(crate) lease_max: Duration,
    pub(crate) heartbeat: Duration,
    /// Idle groups stop their timers after this long ([`crate::quiesce`]).
    pub(crate) quiesce_after: Option<Duration>,
    /// Peers' liveness, standing in for quiesced groups' heartbeats.
    pub(crate) liveness: crate::quiesce::Liveness,
    /// Set by an operator's drain: balancing moves leadership away from this node.
    draining: std::sync::atomic::AtomicBool,
    /// The Raft id each peer node answered Hello with (id → name), kept with the ids every
    /// group's membership names: the ids a peer's certificate may speak for.
    peer_ids: std::sync::Mutex<BTreeMap<u64, String>>,
    /// Peers whose last Hello (either way) announced a protocol this build cannot speak with,
    /// and why: with mutual TLS every call from them is refused until one announces a
    /// compatible one.
    incompatible: std::sync::Mutex<BTreeMap<String, String>>,
    /// The protocol each peer last announced in a Hello (either way): a leader writes an entry
    /// that needs a newer protocol only once every member of the group announced it
    /// ([`RaftNode::members_speak`]).
    protocols: std::sync::Mutex<BTreeMap<String, u32>>,
    /// Set once [`RaftNode::shutdown`] has stopped every group: replication streams that
    /// peers hold open into this node end, so the peer port can stop gracefully.
    stopped: tokio::sync::watch::Sender<bool>,
    db: Arc<NodeDb>,
    /// Hot-key trackers of the shards this node leads ([`coalesce_core::hotkeys`]):
    /// leader-local telemetry, fed when an Ingest is proposed, decayed on the sealer tick and
    /// dropped when leadership is lost. A std mutex: held only for map work, never across an
    /// await.
    hot: std::sync::Mutex<BTreeMap<ShardId, HotKeys>>,
    /// Adaptive-window controllers ([`coalesce_core::adaptive`]) of the shards this node leads,
    /// per (shard, adaptive stream): fed the shard's pressure on the sealer tick, read when an
    /// Ingest is proposed (the stretch rides in its rules), dropped when leadership is lost.
    adaptive: std::sync::Mutex<BTreeMap<(ShardId, String), AdaptiveController>>,
    /// What each delivery worker last saw of its sink on a shard this node leads, and when
    /// ([`RaftNode::report_sink_health`]); part of the adaptive controllers' pressure.
    sink_health: std::sync::Mutex<BTreeMap<(ShardId, String), (SinkHealth, std::time::Instant)>>,
    /// The streams each configured sink carries, by cursor name
    /// ([`RaftNode::set_sink_streams`]): a stream's pressure looks only at the cursors (and
    /// sink health) of sinks that carry it, and at every cursor not named here (subscribers).
    sink_streams: std::sync::RwLock<BTreeMap<String, BTreeSet<String>>>,
    /// The cluster id ([`crate::identity`]).
    identity: crate::identity::Identity,
    /// Snapshots this node may be receiving at once ([`crate::snapshot`]).
    snapshot_receives: Arc<tokio::sync::Semaphore>,
}

/// What a delivery worker last saw of its sink (see [`RaftNode::report_sink_health`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkHealth {
    /// The sink asked to slow down (HTTP 429), or full batches waited for its rate limit.
    pub throttled: bool,
    /// Deliveries fail and are being retried, or its circuit breaker is open.
    pub failing: bool,
}

/// A sink-health report older than this no longer counts (its worker stopped or stalled).
const SINK_HEALTH_TTL: Duration = Duration::from_secs(3);

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode").field("id", &self.id).field("name", &self.me.name).finish()
    }
}

const PEER_ID_KEY: &str = "peer_id";

/// The balancer waits for a leadership-transfer target at most this many entries behind.
const TRANSFER_MAX_LAG: u64 = 1_000;
/// How long a request forwarded to a shard's leader may take: twice the maximum election
/// timeout, within these bounds. A leader that does not answer by then is likely paused or cut
/// off, and a successor is being elected; the client retries (same seqs) and reaches it. (An
/// idempotent request goes to the successor as soon as this node learns of it.)
const FORWARD_TIMEOUT_MIN: Duration = Duration::from_millis(500);
const FORWARD_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// How many times one request follows a changing leader (see [`RaftNode::submit`]).
const MAX_FORWARD_REROUTES: u32 = 3;

impl RaftNode {
    /// Opens the node `name` of `spec` on `db` and starts a Raft instance for every shard it
    /// replicates. Groups are not initialized here; see [`RaftNode::bootstrap`].
    pub async fn start(
        db: Arc<NodeDb>,
        spec: ClusterSpec,
        name: &str,
        timing: RaftTiming,
        streams: StreamTable,
    ) -> Result<Arc<Self>, NodeError> {
        Self::start_with_tls(db, spec, name, timing, streams, None).await
    }

    /// [`RaftNode::start`], speaking mutual TLS to peers when `peer_tls` is set (the peer
    /// port's server side is configured by whoever serves [`PeerService`], with
    /// [`crate::tls::incoming`]; every peer call must then prove its node with a certificate).
    pub async fn start_with_tls(
        db: Arc<NodeDb>,
        spec: ClusterSpec,
        name: &str,
        timing: RaftTiming,
        streams: StreamTable,
        peer_tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Arc<Self>, NodeError> {
        let me_spec =
            spec.nodes.iter().find(|n| n.name == name).ok_or_else(|| NodeError::UnknownSelf(name.to_owned()))?;
        let me = PeerNode {
            name: me_spec.name.clone(),
            peer_addr: me_spec.peer_addr.clone(),
            client_addr: me_spec.client_addr.clone(),
        };
        let id = match db.node_get(PEER_ID_KEY)? {
            Some(b) if b.len() == 8 => u64::from_be_bytes(b.as_slice().try_into().unwrap_or([0; 8])),
            _ => {
                let id = rand::random::<u64>() | 1; // never 0
                db.node_put(PEER_ID_KEY, &id.to_be_bytes())?;
                id
            }
        };
        let config = Arc::new(timing.config(&spec.cluster).map_err(NodeError::Config)?);
        let addrs = spec.nodes.iter().map(|n| (n.name.clone(), n.peer_addr.clone())).collect();
        let channels = Arc::new(Channels::new(peer_tls, addrs).with_snapshot_options(timing.snapshot));
        let mut groups = BTreeMap::new();
        let mut not_started = BTreeMap::new();
        for shard in 0..spec.shards {
            if !spec.placement(shard).iter().any(|n| n.name == name) {
                continue;
            }
            let store = ShardStore::new(Arc::clone(&db), shard);
            // A snapshot install a restart interrupted is finished first; if it cannot be, the
            // shard's rows are incomplete and the group must not start on them.
            let recovering = store.clone();
            let recovered = tokio::task::spawn_blocking(move || recovering.recover_install())
                .await
                .map_err(|e| NodeError::Start { shard, detail: format!("snapshot install recovery: {e}") })?;
            if let Err(e) = recovered {
                let why = ApplyFailure { index: 0, term: 0, detail: e.to_string() };
                tracing::error!(shard, error = %why.detail, "shard group not started on this node; its other groups run");
                not_started.insert(shard, why);
                continue;
            }
            let sm = ShardStateMachine::open(store.clone())?
                .counting_as(id)
                .checkpoint_every(Duration::from_millis(timing.checkpoint_ms));
            let version = sm.version();
            let applied_extra = sm.applied_extra();
            let failure = sm.failure();
            let net = GroupNetworkFactory::new(shard, Arc::clone(&channels));
            // openraft re-applies committed entries here; one that fails stops this group only.
            let raft = match Raft::new(id, Arc::clone(&config), net, LogStore::new(store.clone()), sm).await {
                Ok(raft) => raft,
                Err(e) => {
                    let recorded = failure.lock().ok().and_then(|f| f.clone());
                    let why = recorded.unwrap_or(ApplyFailure { index: 0, term: 0, detail: e.to_string() });
                    tracing::error!(shard, error = %why, "shard group not started on this node; its other groups run");
                    not_started.insert(shard, why);
                    continue;
                }
            };
            let quiet = Arc::default();
            groups.insert(shard, Group { shard, raft, store, version, applied_extra, quiet, failure });
        }
        let identity = crate::identity::Identity::load(&db)?;
        crate::metrics::CLUSTER_ID_KNOWN.set(i64::from(identity.get().is_some()));
        Ok(Arc::new(Self {
            id,
            me,
            spec,
            streams,
            channels,
            groups: RwLock::new(groups),
            not_started,
            clock: Arc::new(SystemClock),
            lease: Duration::from_millis(timing.election_min_ms),
            lease_max: Duration::from_millis(timing.election_max_ms),
            heartbeat: Duration::from_millis(timing.heartbeat_ms),
            quiesce_after: (timing.quiesce_after_ms > 0).then(|| Duration::from_millis(timing.quiesce_after_ms)),
            liveness: crate::quiesce::Liveness::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
            peer_ids: std::sync::Mutex::new(BTreeMap::new()),
            incompatible: std::sync::Mutex::new(BTreeMap::new()),
            protocols: std::sync::Mutex::new(BTreeMap::new()),
            stopped: tokio::sync::watch::Sender::new(false),
            db,
            hot: std::sync::Mutex::new(BTreeMap::new()),
            adaptive: std::sync::Mutex::new(BTreeMap::new()),
            sink_health: std::sync::Mutex::new(BTreeMap::new()),
            sink_streams: std::sync::RwLock::new(BTreeMap::new()),
            identity,
            snapshot_receives: Arc::new(tokio::sync::Semaphore::new(timing.snapshot.concurrent_receives.max(1))),
        }))
    }

    /// Makes every fsync of this node's database take `extra` longer (the slow-disk fault).
    pub fn set_disk_latency(&self, extra: Duration) {
        self.db.flusher().set_extra_latency(extra);
    }

    /// Approximate size of each RocksDB column family (for metrics).
    pub fn column_family_sizes(&self) -> Vec<(&'static str, u64)> {
        coalesce_storage::keys::ALL_CFS
            .iter()
            .filter_map(|cf| self.db.cf_size_bytes(cf).ok().map(|b| (*cf, b)))
            .collect()
    }

    /// This node's Raft id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This node as peers see it.
    pub fn me(&self) -> &PeerNode {
        &self.me
    }

    /// The cluster spec.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// The group of `shard`, if this node replicates it.
    pub fn group(&self, shard: ShardId) -> Option<Group> {
        self.groups.read().ok()?.get(&shard).cloned()
    }

    /// Every local group.
    pub fn groups(&self) -> Vec<Group> {
        self.groups.read().map(|g| g.values().cloned().collect()).unwrap_or_default()
    }

    /// The shards whose group has stopped on this node because an entry failed to apply
    /// (at start or since), and why. Their other replicas may still serve them.
    pub fn stopped_groups(&self) -> BTreeMap<ShardId, ApplyFailure> {
        let mut stopped = self.not_started.clone();
        stopped.extend(self.groups().iter().filter_map(|g| g.failure().map(|f| (g.shard, f))));
        stopped
    }

    /// The running group of `shard`, or why there is none.
    fn live_group(&self, shard: ShardId) -> Result<Group, ProposeError> {
        let stopped = |f: &ApplyFailure| ProposeError::Fatal { shard, detail: f.to_string() };
        match self.group(shard) {
            Some(g) => match g.failure() {
                Some(f) => Err(stopped(&f)),
                None => Ok(g),
            },
            None => Err(self.not_started.get(&shard).map_or(ProposeError::NoGroup(shard), stopped)),
        }
    }

    /// Asks the node called `name` who it is, and remembers its Raft id.
    pub async fn hello(&self, name: &str) -> Result<HelloResponse, String> {
        let channel = self.channels.for_name(name)?;
        let (cluster_id, cluster_predates_id) = self.identity.wire();
        let mut req = tonic::Request::new(HelloRequest {
            cluster: self.spec.cluster.clone(),
            protocol: PROTOCOL,
            protocol_min: PROTOCOL_MIN,
            cluster_id,
            cluster_predates_id,
            born_with_ids: self.identity.born_with_ids(),
        });
        req.set_timeout(Duration::from_secs(1));
        let reply =
            RaftPeerClient::new(channel).hello(req).await.map_err(|s| format!("{name}: {}", s.message()))?.into_inner();
        if reply.cluster != self.spec.cluster {
            return Err(format!("{name} belongs to cluster {:?}, not {:?}", reply.cluster, self.spec.cluster));
        }
        if reply.name != name {
            return Err(format!("the address of {name} is answered by {:?}", reply.name));
        }
        let verdict = check_protocol(reply.protocol, reply.protocol_min)
            .and_then(|()| self.identity.learn(&self.db, name, &reply.cluster_id, reply.cluster_predates_id));
        self.note_protocol(name, reply.protocol, verdict).map_err(|e| format!("{name}: {e}"))?;
        let mut ids = self.peer_ids.lock().unwrap_or_else(|p| p.into_inner());
        match ids.get(&reply.node_id) {
            // Ids are random per data directory: one that another node already answered with is
            // a peer lying about its id, and must not take it over.
            Some(owner) if *owner != reply.name => {
                tracing::error!(id = reply.node_id, owner = %owner, claimed_by = %reply.name, "a peer answered Hello with another node's Raft id");
                return Err(format!("{name} answered with the Raft id of {owner}"));
            }
            Some(_) => {}
            None => {
                ids.insert(reply.node_id, reply.name.clone());
            }
        }
        drop(ids);
        Ok(reply)
    }

    /// The cluster id, once known ([`crate::identity`]).
    pub fn cluster_identity(&self) -> Option<coalesce_core::cluster::ClusterIdentity> {
        self.identity.get()
    }

    /// Waits until the cluster id is known.
    pub async fn cluster_identity_wait(&self) -> coalesce_core::cluster::ClusterIdentity {
        self.identity.wait().await
    }

    /// Greets every peer until this node knows the cluster id, making it when this node is the
    /// one to (the rule is in [`crate::identity`]). Returns at once when the id is known.
    pub async fn settle_identity(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut names: Vec<&str> = self.spec.nodes.iter().map(|n| n.name.as_str()).collect();
        names.sort_by_key(|n| crate::identity::natural_key(n));
        let last = names.last().copied() == Some(self.me.name.as_str());
        let peers: Vec<String> = names.iter().filter(|n| **n != self.me.name).map(|n| (*n).to_owned()).collect();
        let waiting = crate::connections::LogEvery::new(Duration::from_secs(30));
        while self.identity.get().is_none() {
            let (mut answered, mut born) = (0, true);
            for peer in &peers {
                if let Ok(reply) = self.hello(peer).await {
                    answered += 1;
                    born &= reply.born_with_ids;
                }
            }
            if self.identity.get().is_some() {
                break;
            }
            if last && answered == peers.len() {
                if let Err(e) = self.identity.make(&self.db, born) {
                    tracing::error!(error = %e, "could not store the cluster id; retrying");
                }
                continue;
            }
            if waiting.hit(tokio::time::Instant::now()).is_some() {
                tracing::warn!(
                    answered,
                    peers = peers.len(),
                    maker = names.last().copied().unwrap_or_default(),
                    "the cluster id is not known yet: deliveries to push sinks wait; it is made by the maker once \
                     every peer answers (docs/upgrades.md)"
                );
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Records whether peer `name` is one this build can replicate with — it speaks a protocol
    /// this build reads and shows the same cluster id — (logged when that changes), passing
    /// `verdict` on.
    fn note_protocol(&self, name: &str, protocol: u32, verdict: Result<(), String>) -> Result<(), String> {
        self.protocols.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned(), protocol.max(1));
        let mut bad = self.incompatible.lock().unwrap_or_else(|p| p.into_inner());
        match &verdict {
            Ok(()) => {
                if bad.remove(name).is_some() {
                    tracing::info!(peer = name, "the peer is compatible again");
                }
            }
            Err(e) => {
                if bad.insert(name.to_owned(), e.clone()).is_none() {
                    tracing::error!(peer = name, error = %e, "a peer is incompatible (protocol or cluster id): not replicating with it");
                }
            }
        }
        verdict
    }

    /// Whether every other member (voter or learner) of `shard`'s group has announced, in its
    /// last Hello, a peer protocol of at least `protocol`: only then may this node propose an
    /// entry that needs it (during a rolling upgrade an older member could not decode it). A
    /// member not heard from yet counts as protocol 1; the balancer greets every peer every
    /// couple of seconds.
    pub fn members_speak(&self, shard: ShardId, protocol: u32) -> bool {
        let Some(group) = self.group(shard) else { return false };
        let names: Vec<String> = {
            let metrics = group.raft.metrics();
            let m = metrics.borrow_watched();
            m.membership_config.membership().nodes().map(|(_, n)| n.name.clone()).collect()
        };
        let known = self.protocols.lock().unwrap_or_else(|p| p.into_inner());
        names.iter().filter(|n| **n != self.me.name).all(|n| known.get(n).copied().unwrap_or(1) >= protocol)
    }

    /// The node a peer-port call comes from, proven by its client certificate
    /// ([`crate::tls`]); `None` when peers do not speak TLS (nothing can be proven). Refused
    /// (PERMISSION_DENIED, counted) when the certificate names no single node of the cluster.
    pub fn peer_sender<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        if !self.channels.tls() {
            return Ok(None);
        }
        let names = crate::tls::ConnInfo::of(request).and_then(|c| c.peer.clone());
        let found = match &names {
            Some(names) => names.node(self.spec.nodes.iter().map(|n| n.name.as_str())),
            None => Err("no client certificate".to_owned()),
        };
        let sender = found.map_err(|e| {
            crate::metrics::PEER_REFUSED.with_label_values(&["not_a_node"]).inc();
            tracing::warn!(reason = %e, "peer call refused");
            Status::permission_denied(format!("peer port: {e}"))
        })?;
        if let Some(why) = self.incompatible.lock().unwrap_or_else(|p| p.into_inner()).get(sender) {
            crate::metrics::PEER_REFUSED.with_label_values(&["protocol"]).inc();
            return Err(Status::failed_precondition(format!("peer port: {sender}: {why}")));
        }
        Ok(Some(sender.to_owned()))
    }

    /// The node Raft id `id` belongs to, by `group`'s membership or the ids peers answered
    /// Hello with.
    fn owner_of(&self, group: &Group, id: u64) -> Option<String> {
        if id == self.id {
            return Some(self.me.name.clone());
        }
        let metrics = group.raft.metrics();
        let from_membership =
            metrics.borrow_watched().membership_config.membership().get_node(&id).map(|n| n.name.clone());
        from_membership.or_else(|| self.peer_ids.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned())
    }

    /// [`RaftNode::check_speaks_for_known`], first asking `sender` who it is when the id is
    /// unknown (a group not initialized here yet, a peer that just came back with new data).
    async fn check_speaks_for(&self, sender: Option<&str>, group: &Group, id: u64) -> Result<(), Status> {
        if let Some(sender) = sender
            && self.owner_of(group, id).is_none()
        {
            let _ = self.hello(sender).await;
        }
        self.check_speaks_for_known(sender, group, id)
    }

    /// Checks that Raft id `id` (the leader or candidate a message speaks for) belongs to
    /// `sender` ([`RaftNode::owner_of`]). An id of nobody this node knows is refused too: it
    /// cannot tell whose it is (the sender retries).
    fn check_speaks_for_known(&self, sender: Option<&str>, group: &Group, id: u64) -> Result<(), Status> {
        let Some(sender) = sender else { return Ok(()) };
        let owner = self.owner_of(group, id);
        if owner.as_deref() == Some(sender) {
            return Ok(());
        }
        crate::metrics::PEER_REFUSED.with_label_values(&["impersonation"]).inc();
        let whose = owner.map_or_else(|| "an id this node does not know".to_owned(), |o| format!("node {o}'s id"));
        tracing::warn!(shard = group.shard, sender, id, whose, "peer message refused: it speaks for another node");
        Err(Status::permission_denied(format!(
            "peer port: {sender}'s certificate cannot speak for Raft id {id} of shard {} ({whose})",
            group.shard
        )))
    }

    /// Initializes every group this node is the first replica of, once all its replicas answer
    /// (retrying until `within`). Groups initialized before are left alone.
    pub async fn bootstrap(&self, within: Duration) -> Result<(), NodeError> {
        let deadline = tokio::time::Instant::now() + within;
        for group in self.groups() {
            let placement = self.spec.placement(group.shard);
            if placement.first().map(|n| n.name.as_str()) != Some(self.me.name.as_str()) {
                continue;
            }
            if group.raft.is_initialized().await.map_err(|e| NodeError::Bootstrap(e.to_string()))? {
                continue;
            }
            let mut members = BTreeMap::new();
            let mut running_elsewhere = false;
            for node in placement {
                let id = loop {
                    if node.name == self.me.name {
                        break self.id;
                    }
                    match self.hello(&node.name).await {
                        Ok(h) => {
                            running_elsewhere |= h.initialized.contains(&group.shard);
                            break h.node_id;
                        }
                        Err(e) if tokio::time::Instant::now() >= deadline => {
                            return Err(NodeError::Bootstrap(format!("shard {}: {e}", group.shard)));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                };
                members.insert(
                    id,
                    PeerNode {
                        name: node.name.clone(),
                        peer_addr: node.peer_addr.clone(),
                        client_addr: node.client_addr.clone(),
                    },
                );
            }
            if running_elsewhere {
                // Our data was wiped (or lost): the group lives on without us. Its leader adds
                // this node back under its new id (see `run_balancer`).
                tracing::warn!(shard = group.shard, "group already runs on peers; waiting to be added back");
                continue;
            }
            match group.raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(openraft::errors::InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(NodeError::Bootstrap(format!("shard {}: {e}", group.shard))),
            }
        }
        Ok(())
    }

    /// Proposes `cmd` to `shard`'s log and waits until it is committed and applied here.
    /// The command is validated first ([`Command::validate`]); an invalid one is refused and
    /// never reaches the log.
    pub async fn propose(&self, shard: ShardId, cmd: Command) -> Result<Response, ProposeError> {
        let group = self.live_group(shard)?;
        // Test-only (`skip_validation`): lets a test put an entry below validation into the
        // log, to prove that apply stops the group rather than the node.
        if !crate::failpoints::active("skip_validation")
            && let Err(error) = cmd.validate()
        {
            crate::metrics::INVALID_COMMANDS.with_label_values(&["propose"]).inc();
            return Err(ProposeError::Invalid { shard, error });
        }
        self.wake(&group).await;
        // A leader just elected has no quorum answer yet and openraft would refuse the write
        // (lease expired): wait for the first one instead (a request rerouted to a successor
        // arrives exactly then).
        if group.raft.is_leader() && self.leadership(shard).is_none() {
            self.await_lease(&group).await;
        }
        let (kind, started) = (cmd.kind(), std::time::Instant::now());
        let span = tracing::debug_span!("replicate", shard, command = kind);
        match tracing::Instrument::instrument(group.raft.client_write(cmd), span).await {
            Ok(r) => {
                crate::metrics::PROPOSE.with_label_values(&[kind]).observe(started.elapsed().as_secs_f64());
                Ok(r.data)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => match f.reason {
                ForwardReason::LeaseExpired => Err(ProposeError::LeaseExpired(shard)),
                _ => Err(ProposeError::NotLeader { shard, leader: f.leader_node }),
            },
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_))) => Err(ProposeError::Unknown(shard)),
            Err(e) => Err(ProposeError::Fatal { shard, detail: e.to_string() }),
        }
    }

    /// The streams this node runs with.
    pub fn streams(&self) -> &StreamTable {
        &self.streams
    }

    /// What this node knows of `shard`'s group right now.
    pub fn shard_view(&self, shard: ShardId) -> Option<ShardView> {
        let group = self.group(shard)?;
        let metrics = group.raft.metrics();
        let m = metrics.borrow_watched();
        let leader =
            m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).cloned().map(|n| (id, n)));
        Some(ShardView {
            shard,
            is_leader: m.state.is_leader(),
            leader,
            epoch: m.vote.committed.then_some(coalesce_core::output::Epoch {
                term: m.vote.leader_id.term,
                node: m.vote.leader_id.node_id,
            }),
            last_applied: m.last_applied.map_or(0, |l| l.index),
        })
    }

    /// The leader of `shard` as this node knows it.
    /// The channel to a peer's peer port (shared with Raft traffic), for services that ride on
    /// it (the server's `FetchPeer`).
    pub fn peer_channel(&self, peer: &PeerNode) -> Result<tonic::transport::Channel, String> {
        self.channels.for_peer(peer)
    }

    pub fn leader_of(&self, shard: ShardId) -> Option<(u64, PeerNode)> {
        self.shard_view(shard)?.leader
    }

    /// Resolves once this node's replica of `shard` knows a leader other than Raft id `old`
    /// (a successor elected while `old` was asked something); never when this node holds no
    /// replica of the shard, or while the shard has no leader.
    pub async fn leader_moved_from(&self, shard: ShardId, old: u64) {
        match self.group(shard) {
            Some(group) => leader_moves(&group, old).await,
            None => std::future::pending().await,
        }
    }

    /// Applies producer groups to `shard`: proposed here when this node leads it, else
    /// forwarded once to the leader, which stamps and proposes them.
    pub async fn ingest(&self, shard: ShardId, groups: Vec<IngestGroup>) -> Result<Response, ProposeError> {
        self.submit(shard, Forwarded::Ingest(groups)).await
    }

    /// Records a consumer's progress on `shard` (through the leader).
    pub async fn ack(&self, shard: ShardId, cursor: String, upto_seq: u64) -> Result<Response, ProposeError> {
        self.submit(shard, Forwarded::Ack { cursor, upto_seq }).await
    }

    /// Removes dead letters of `sink` on `shard` (replayed or purged), through the leader.
    pub async fn dlq_remove(&self, shard: ShardId, sink: String, seqs: Vec<u64>) -> Result<Response, ProposeError> {
        self.submit(shard, Forwarded::DlqRemove { sink, seqs }).await
    }

    /// Forgets consumer `cursor` on `shard`, through the leader.
    pub async fn drop_cursor(&self, shard: ShardId, cursor: String) -> Result<Response, ProposeError> {
        self.submit(shard, Forwarded::DropCursor { cursor }).await
    }

    /// This node's leadership of `shard`, if it leads it with a committed vote.
    pub fn leadership(&self, shard: ShardId) -> Option<Leadership> {
        let group = self.group(shard)?;
        let metrics = group.raft.metrics();
        let m = metrics.borrow_watched();
        if !m.state.is_leader() || !m.vote.committed {
            return None;
        }
        let alone = m.membership_config.membership().voter_ids().count() == 1;
        let quorum_acked_ago = match m.last_quorum_acked.as_ref() {
            _ if alone => Duration::ZERO,
            Some(acked) => openraft::Instant::elapsed(&**acked),
            None => return None,
        };
        Some(Leadership {
            epoch: coalesce_core::output::Epoch { term: m.vote.leader_id.term, node: m.vote.leader_id.node_id },
            quorum_acked_ago,
        })
    }

    /// The epoch under which this node may deliver `shard`'s outputs right now: `Some` only
    /// while it leads the shard with a valid lease — a quorum acknowledged it within the
    /// minimum election timeout, before which no other replica can be elected.
    pub fn delivery_epoch(&self, shard: ShardId) -> Option<coalesce_core::output::Epoch> {
        self.leadership(shard).filter(|l| l.quorum_acked_ago < self.lease).map(|l| l.epoch)
    }

    /// [`RaftNode::delivery_epoch`], first waking the group when this node leads it without a
    /// valid lease ([`RaftNode::wake_shard`]: a quiesced group waits, at most a maximum election
    /// timeout, for a quorum to answer its heartbeat). For a leader-only action that may find
    /// the group asleep (a replay, a Fetch).
    pub async fn delivery_epoch_waking(&self, shard: ShardId) -> Option<coalesce_core::output::Epoch> {
        if let Some(epoch) = self.delivery_epoch(shard) {
            return Some(epoch);
        }
        if !self.group(shard)?.raft.is_leader() {
            return None;
        }
        self.wake_shard(shard).await;
        self.delivery_epoch(shard)
    }

    /// How long after its last quorum acknowledgement a leader may still act as one: the
    /// minimum election timeout, before which no other replica can be elected
    /// ([`RaftNode::delivery_epoch`] fences on it).
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How long a follower waits without hearing from a leader before it may campaign: the
    /// leader lease's duration as others see it.
    pub fn lease_duration(&self) -> Duration {
        self.lease_max
    }

    /// Raft state of `shard` on this node, for operators.
    pub fn shard_detail(&self, shard: ShardId) -> Option<ShardDetail> {
        let group = self.group(shard)?;
        let metrics = group.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let last = m.last_log_index.unwrap_or(0);
        let replicas = membership
            .nodes()
            .map(|(id, node)| {
                let matched = m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index);
                ReplicaDetail {
                    name: node.name.clone(),
                    id: *id,
                    voter: membership.voter_ids().any(|v| v == *id),
                    matched: matched.unwrap_or(if *id == self.id { last } else { 0 }),
                }
            })
            .collect();
        let role = match m.state {
            openraft::ServerState::Leader => "leader",
            openraft::ServerState::Follower => "follower",
            openraft::ServerState::Candidate => "candidate",
            openraft::ServerState::Learner => "learner",
            openraft::ServerState::Shutdown => "shutdown",
        };
        Some(ShardDetail {
            shard,
            role,
            leader: m.current_leader.and_then(|id| membership.get_node(&id).map(|n| n.name.clone())),
            term: m.current_term,
            last_log_index: last,
            committed: m.cluster_committed.map_or(0, |c| c.index),
            last_applied: m.last_applied.map_or(0, |a| a.index),
            replicas,
            quiesced: group.quiet.is_quiesced(),
        })
    }

    /// Checks what a peer forwarded as this node would check its own client's request
    /// ([`Forwarded::check_keys`]; streams, partials and names are checked with the entry in
    /// [`RaftNode::propose`]).
    fn check_forwarded(&self, shard: ShardId, req: &Forwarded) -> Result<(), ProposeError> {
        let max_key_bytes = |stream: &str| self.streams.get(stream).map_or(MAX_KEY_BYTES_LIMIT, |d| d.max_key_bytes);
        req.check_keys(shard, self.spec.shards, max_key_bytes).map_err(|error| {
            crate::metrics::INVALID_COMMANDS.with_label_values(&["peer"]).inc();
            ProposeError::Invalid { shard, error }
        })
    }

    async fn on_leader(&self, group: &Group, req: Forwarded) -> Result<Response, ProposeError> {
        match req {
            Forwarded::Ingest(groups) => self.ingest_as_leader(group, groups).await,
            Forwarded::Ack { cursor, upto_seq } => self.propose(group.shard, Command::Ack { cursor, upto_seq }).await,
            Forwarded::Retired => {
                crate::metrics::INVALID_COMMANDS.with_label_values(&["peer"]).inc();
                let error = InvalidCommand {
                    kind: "forward".into(),
                    field: "payload".into(),
                    reason: "whole commands are not forwarded; only ingest, ack and operator requests are".into(),
                };
                Err(ProposeError::Invalid { shard: group.shard, error })
            }
            Forwarded::DlqRemove { sink, seqs } => self.propose(group.shard, Command::DlqRemove { sink, seqs }).await,
            Forwarded::DropCursor { cursor } => self.propose(group.shard, Command::DropCursor { cursor }).await,
            Forwarded::SetPreferredLeader { node } => {
                let shard = group.shard;
                if let Some(n) = &node
                    && !self.spec.placement(shard).iter().any(|p| &p.name == n)
                {
                    return Err(ProposeError::NotReplica { shard, node: n.clone() });
                }
                self.propose(shard, Command::SetPreferredLeader { node }).await
            }
        }
    }

    async fn submit(&self, shard: ShardId, req: Forwarded) -> Result<Response, ProposeError> {
        let group = self.live_group(shard)?;
        let mut reroutes = 0;
        loop {
            if group.raft.is_leader() {
                return self.on_leader(&group, req).await;
            }
            let (leader_id, leader) = self.leader_of(shard).ok_or(ProposeError::NotLeader { shard, leader: None })?;
            let payload =
                codec::encode_msg("forward", &req).map_err(|e| ProposeError::Fatal { shard, detail: e.to_string() })?;
            let channel =
                self.channels.for_peer(&leader).map_err(|detail| ProposeError::Unreachable { shard, detail })?;
            let span = tracing::debug_span!("forward", shard, leader = %leader.name);
            // Bounded: a paused leader or one behind a partition must not hold the request for
            // long; the client gets UNAVAILABLE and retries elsewhere (with the same producer seqs).
            let mut request = tonic::Request::new(RaftMessage { group: shard, payload, target: leader_id });
            request.set_timeout((self.lease_max * 2).clamp(FORWARD_TIMEOUT_MIN, FORWARD_TIMEOUT_MAX));
            crate::tracectx::inject(&span, request.metadata_mut().as_mut());
            request.metadata_mut().insert(PROTOCOL_HEADER, PROTOCOL.into());
            let mut client = RaftPeerClient::new(channel);
            let forward = tracing::Instrument::instrument(client.forward(request), span);
            // A request that is safe to send twice goes to the successor as soon as this node
            // sees one, instead of waiting out the timeout on a leader that went silent.
            let reroute = reroutes < MAX_FORWARD_REROUTES && req.idempotent();
            let reply = tokio::select! {
                reply = forward => reply,
                () = leader_moves(&group, leader_id), if reroute => {
                    reroutes += 1;
                    crate::metrics::FORWARD_REROUTES.inc();
                    tracing::debug!(shard, from = %leader.name, "leader changed during a forward; sending it again");
                    continue;
                }
            };
            let reply = reply.map_err(|s| ProposeError::Unreachable {
                shard,
                detail: format!("{}: {}", leader.name, s.message()),
            })?;
            return codec::decode_msg::<Result<Response, ProposeError>>("forward reply", &reply.into_inner().payload)
                .map_err(|e| ProposeError::Unreachable { shard, detail: e.to_string() })?;
        }
    }

    /// Admission and proposal on the leader.
    async fn ingest_as_leader(&self, group: &Group, groups: Vec<IngestGroup>) -> Result<Response, ProposeError> {
        let shard = group.shard;
        let mut rules = BTreeMap::new();
        let fatal = |e: coalesce_storage::StorageError| ProposeError::Fatal { shard, detail: e.to_string() };
        // A consumer that stays behind bounds the outbox: refuse input, loudly, rather than
        // grow it without limit.
        let outbox = crate::state_machine::load_outbox(&group.store).map_err(fatal)?;
        let kept = outbox.next_seq.saturating_sub(outbox.low);
        let max = self.streams.outbox().max_outputs;
        // (Without any consumer nothing waits on the outbox, and nothing is refused.)
        if kept > max
            && let Some((lagging, _)) = outbox.cursors.iter().min_by_key(|(_, acked)| **acked)
        {
            let lagging = lagging.clone();
            return Err(ProposeError::OutboxFull { shard, kept, max, lagging, retry_after_ms: 1_000 });
        } // Keys of `reject` streams may be refused when the buffer is full. First assume every
        // one is new: if even that fits, no key needs looking up (the common case).
        let mut gated = Vec::new();
        for (key, partial) in groups.iter().flat_map(|g| g.partials.iter()) {
            let def = self
                .streams
                .get(&key.stream)
                .ok_or_else(|| ProposeError::UnknownStream { shard, stream: key.stream.clone() })?;

            if def.rules.overflow == OverflowPolicy::Reject {
                gated.push((key, ShardBuffer::new_key_bytes(key, partial)));
            }
            rules.entry(key.stream.clone()).or_insert_with(|| {
                let mut r = def.rules.clone();
                if let Some(d) = self.adaptive_decision(shard, &key.stream) {
                    r.window = r.window.with_extra_ms(d.extra_ms);
                }
                if r.key_overflow != KeyOverflow::FlushEarly && !self.members_speak(shard, 4) {
                    // Replicas of protocol 3 or older could not read the rule: until they are
                    // upgraded the stream flushes early, as those builds do.
                    r.key_overflow = KeyOverflow::FlushEarly;
                    if !KEY_OVERFLOW_WAITS.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(
                            shard,
                            stream = %key.stream,
                            "key_overflow = \"reject\" waits until every replica runs peer protocol 4; until then \
                             keys that outgrow window.max_bytes close early (docs/upgrades.md)"
                        );
                    }
                }
                r
            });
        }
        if !gated.is_empty() {
            let stats = group.store.stats().map_err(fatal)?;
            let limits = self.streams.limits();
            let all_new_bytes = gated.iter().map(|(_, b)| b).sum();
            if ShardBuffer::admit(&stats, &limits, gated.len() as u64, all_new_bytes, 0).is_err() {
                let mut view = group.store.apply_batch();
                let (mut new_keys, mut new_bytes) = (0u64, 0u64);
                for (key, bytes) in &gated {
                    if coalesce_core::buffer::BufferStore::get(&mut view, key).map_err(fatal)?.is_none() {
                        new_keys += 1;
                        new_bytes += bytes;
                    }
                }
                if let Err(e) = ShardBuffer::admit(&stats, &limits, new_keys, new_bytes, 0) {
                    let what = match &e {
                        coalesce_core::EventError::BufferFull { what, .. } => (*what).to_owned(),
                        other => other.to_string(),
                    };
                    // Room comes back when the earliest window closes.
                    let now = self.clock.now();
                    let next = ShardBuffer::next_deadline(&mut view).ok().flatten().unwrap_or(now);
                    let retry_after_ms = next.saturating_sub(now).clamp(100, 5_000);
                    return Err(ProposeError::BufferFull { shard, what, retry_after_ms });
                }
            }
        }
        self.observe_hot(shard, &groups);
        let cmd = Command::Ingest { stamp: self.clock.now(), rules, limits: self.streams.limits(), groups };
        self.propose(shard, cmd).await
    }

    /// Counts admitted partials in the shard's hot-key tracker (created on first use).
    fn observe_hot(&self, shard: ShardId, groups: &[IngestGroup]) {
        let Ok(mut hot) = self.hot.lock() else { return };
        let tracker = hot.entry(shard).or_insert_with(|| {
            let mut t = HotKeys::default();
            t.tick(self.clock.now());
            t
        });
        for (key, partial) in groups.iter().flat_map(|g| g.partials.iter()) {
            tracker.observe(&key.stream, &key.key, partial.inputs);
        }
    }

    /// Decays the hot-key tracker of every shard this node leads and forgets those of shards
    /// it no longer leads. Called on every sealer tick.
    fn tick_hot(&self, led: &BTreeSet<ShardId>) {
        let now = self.clock.now();
        let Ok(mut hot) = self.hot.lock() else { return };
        hot.retain(|shard, _| led.contains(shard));
        for tracker in hot.values_mut() {
            tracker.tick(now);
        }
    }

    /// The adaptive controller's current decision for `stream` on `shard`, when this node
    /// leads it and the stream is adaptive.
    pub fn adaptive_decision(&self, shard: ShardId, stream: &str) -> Option<Decision> {
        let ctl = self.adaptive.lock().ok()?;
        ctl.get(&(shard, stream.to_owned())).map(AdaptiveController::decision)
    }

    /// Every adaptive controller's decision on the shards this node leads: (shard, stream).
    pub fn adaptive_decisions(&self) -> Vec<(ShardId, String, Decision)> {
        let Ok(ctl) = self.adaptive.lock() else { return Vec::new() };
        ctl.iter().map(|((shard, stream), c)| (*shard, stream.clone(), c.decision())).collect()
    }

    /// Tells the adaptive controllers which streams sink (cursor) `sink` carries; the server
    /// calls it once per configured sink at start.
    pub fn set_sink_streams(&self, sink: &str, streams: BTreeSet<String>) {
        if let Ok(mut m) = self.sink_streams.write() {
            m.insert(sink.to_owned(), streams);
        }
    }

    /// A delivery worker's latest view of `sink` on `shard` (reported after every delivery
    /// attempt and when it catches up); counts for [`SINK_HEALTH_TTL`].
    pub fn report_sink_health(&self, shard: ShardId, sink: &str, health: SinkHealth) {
        if let Ok(mut m) = self.sink_health.lock() {
            m.insert((shard, sink.to_owned()), (health, std::time::Instant::now()));
        }
    }

    /// The downstream pressure on `stream` of a shard this node leads: outputs the slowest
    /// cursor that carries the stream has not acknowledged, the age of the oldest of them
    /// (since its window closed), whether a sink carrying it reported throttling or failures
    /// recently, and the buffer fill. Backlogs count every output after the cursor (the outbox
    /// is one seq space for all streams).
    fn pressure(&self, group: &Group, outbox: &OutboxMeta, fill: f64, stream: &str, now: Millis) -> Pressure {
        let carriers = self.sink_streams.read().unwrap_or_else(|p| p.into_inner());
        let carries = |cursor: &str| carriers.get(cursor).is_none_or(|s| s.contains(stream));
        let slowest = outbox.cursors.iter().filter(|(c, _)| carries(c)).map(|(_, acked)| *acked).min();
        let (outbox_backlog, oldest_undelivered_age_ms) = match slowest {
            // Without any consumer nothing waits on the outbox.
            None => (0, 0),
            Some(acked) => {
                let backlog = outbox.next_seq.saturating_sub(1).saturating_sub(acked);
                let age = if backlog == 0 {
                    0
                } else {
                    let first = group.store.outbox_from(acked.max(outbox.low.saturating_sub(1)) + 1, 1);
                    first.ok().and_then(|f| f.first().map(|o| now.saturating_sub(o.window_end))).unwrap_or(0)
                };
                (backlog, age)
            }
        };
        let (mut sink_throttled, mut sink_failing) = (false, false);
        let health = self.sink_health.lock().unwrap_or_else(|p| p.into_inner());
        for ((_, sink), (h, at)) in
            health.range((group.shard, String::new())..).take_while(|((s, _), _)| *s == group.shard)
        {
            if at.elapsed() <= SINK_HEALTH_TTL && carries(sink) {
                sink_throttled |= h.throttled;
                sink_failing |= h.failing;
            }
        }
        Pressure { outbox_backlog, oldest_undelivered_age_ms, sink_throttled, sink_failing, buffer_fill: fill }
    }

    /// One control step of every adaptive stream on every shard this node leads (sealer tick);
    /// controllers of shards no longer led are dropped. A new leader's controller resumes from
    /// the stretch of the last Ingest entry it applied, so a failover does not close every
    /// stretched window at once.
    fn tick_adaptive(&self, led: &BTreeSet<ShardId>) {
        let adaptive: Vec<_> =
            self.streams.iter().filter_map(|d| d.rules.window.adaptive.map(|p| (d.name.clone(), p))).collect();
        if let Ok(mut health) = self.sink_health.lock() {
            health.retain(|(shard, _), _| led.contains(shard));
        }
        if adaptive.is_empty() {
            return;
        }
        let now = self.clock.now();
        let limits = self.streams.limits();
        let ratio = |used: u64, max: u64| if max == 0 { 0.0 } else { used as f64 / max as f64 };
        // Storage reads first, without the controllers' lock.
        let mut samples = Vec::new();
        for shard in led {
            let Some(group) = self.group(*shard) else { continue };
            let (Ok(outbox), Ok(stats)) = (crate::state_machine::load_outbox(&group.store), group.store.stats()) else {
                continue;
            };
            let fill = ratio(stats.keys, limits.max_keys).max(ratio(stats.bytes, limits.max_bytes));
            let applied = group.applied_extra.lock().map(|m| m.clone()).unwrap_or_default();
            for (stream, policy) in &adaptive {
                let pressure = self.pressure(&group, &outbox, fill, stream, now);
                let resume = applied.get(stream).copied().unwrap_or(0);
                samples.push((*shard, stream, *policy, pressure, resume));
            }
        }
        let Ok(mut ctl) = self.adaptive.lock() else { return };
        ctl.retain(|(shard, _), _| led.contains(shard));
        for (shard, stream, policy, pressure, resume) in samples {
            let c = ctl.entry((shard, stream.clone())).or_insert_with(|| AdaptiveController::resume(policy, resume));
            let (before, steps) = (c.decision(), c.steps());
            let after = c.update(now, &pressure);
            if c.steps() != steps {
                crate::metrics::ADAPTIVE_STEPS.with_label_values(&[stream.as_str(), after.reason.as_str()]).inc();
                if let Some(cause) = after.reason.cause() {
                    crate::metrics::ADAPTIVE_HIGH.with_label_values(&[stream.as_str(), cause.as_str()]).inc();
                }
            }
            if after != before {
                tracing::debug!(
                    shard,
                    stream,
                    extra_ms = after.extra_ms,
                    reason = after.reason.as_str(),
                    cause = after.reason.cause().map_or("", |c| c.as_str()),
                    "adaptive window"
                );
            }
        }
    }

    /// The `k` heaviest keys of each shard this node leads (all of them, or `shard`), only of
    /// `stream` when given, with the shard's decayed total inputs. Shards without input yet
    /// are left out.
    pub fn hot_keys(&self, shard: Option<ShardId>, stream: Option<&str>, k: usize) -> Vec<(ShardId, f64, Vec<HotKey>)> {
        let led = self.led_shards();
        let Ok(hot) = self.hot.lock() else { return Vec::new() };
        hot.iter()
            .filter(|(s, _)| led.contains(s) && shard.is_none_or(|want| want == **s))
            .map(|(s, tracker)| {
                let keys = match stream {
                    // Filter before cutting to k: the top k of one stream, not k of all streams.
                    Some(name) => tracker.top(tracker.len()).into_iter().filter(|h| h.stream == name).take(k).collect(),
                    None => tracker.top(k),
                };
                (*s, tracker.total(), keys)
            })
            .collect()
    }

    /// Runs the window scheduler of every local group until `shutdown` resolves: while this
    /// node leads a shard, it proposes a Seal whenever the earliest deadline has passed. The
    /// earliest deadline is read from the deadline index only when the state machine changed
    /// since the last look, so an idle shard costs an atomic load per tick.
    pub async fn run_sealer(self: Arc<Self>, tick: Duration, shutdown: impl std::future::Future<Output = ()>) {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        // shard → (state version, earliest deadline at that version)
        let mut cache: BTreeMap<ShardId, (u64, Option<u64>)> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = interval.tick() => {}
            }
            let led = self.led_shards();
            self.tick_hot(&led);
            self.tick_adaptive(&led);
            for group in self.groups() {
                if !group.raft.is_leader() {
                    continue;
                }
                let now = self.clock.now();
                let version = group.version.load(std::sync::atomic::Ordering::Acquire);
                let due = match cache.get(&group.shard) {
                    Some((v, d)) if *v == version => *d,
                    _ => {
                        let mut view = group.store.apply_batch();
                        let Ok(d) = ShardBuffer::next_deadline(&mut view) else { continue };
                        cache.insert(group.shard, (version, d));
                        d
                    }
                };
                if due.is_some_and(|d| d <= now) {
                    let cmd = Command::Seal {
                        stamp: now,
                        max: 10_000,
                        session_ttl_ms: coalesce_core::session::DEFAULT_SESSION_TTL_MS,
                    };
                    let span = tracing::debug_span!("seal", shard = group.shard, outputs = tracing::field::Empty);
                    match tracing::Instrument::instrument(self.propose(group.shard, cmd), span.clone()).await {
                        Ok(Response::Sealed { sealed, .. }) => {
                            span.record("outputs", sealed);
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(shard = group.shard, error = %e, "seal not proposed"),
                    }
                }
            }
        }
    }

    /// Keeps leadership balanced until `shutdown` resolves: every `period`, each shard this
    /// node leads is handed to its desired leader (see [`RaftNode::balance_once`]). After a
    /// failover the restarted node gets its shards back; a drained node loses them.
    pub async fn run_balancer(self: Arc<Self>, period: Duration, shutdown: impl std::future::Future<Output = ()>) {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = interval.tick() => {}
            }
            self.balance_once().await;
        }
    }

    /// One balancing round. For each shard this node leads, the desired leader is the replica
    /// an operator chose (`SetPreferredLeader`) unless it is draining, else the first replica of
    /// the placement that is not draining (so about S/N shards per node); leadership is handed
    /// to it once it has replicated the whole log. Peers answer Hello with their id (to notice
    /// one that came back with wiped data) and whether they are draining.
    pub async fn balance_once(&self) {
        let mut ids = BTreeMap::new();
        let mut draining = BTreeSet::new();
        if self.is_draining() {
            draining.insert(self.me.name.clone());
        }
        for peer in self.spec.nodes.iter().filter(|n| n.name != self.me.name) {
            if let Ok(h) = self.hello(&peer.name).await {
                if h.draining {
                    draining.insert(h.name.clone());
                }
                ids.insert(h.name, h.node_id);
            }
        }
        for group in self.groups() {
            self.replace_wiped_members(&group, &ids).await;
            let Some(preferred) = self.desired_leader(&group, &draining) else { continue };
            if preferred == self.me.name {
                continue;
            }
            let target = {
                let metrics = group.raft.metrics();
                let m = metrics.borrow_watched();
                if !m.state.is_leader() {
                    continue;
                }
                let membership = m.membership_config.membership();
                // Not while a membership change is under way (joint config, or a returning
                // peer still a learner): the preferred name may then map to two ids, and a
                // learner cannot take over.
                let settled = membership.get_joint_config().len() == 1
                    && membership.nodes().count() == membership.voter_ids().count();
                if !settled {
                    continue;
                }
                membership.voter_ids().find(|id| membership.get_node(id).is_some_and(|n| n.name == preferred))
            };
            // The target ignores a transfer unless it holds the leader's whole log when the
            // request arrives. Under steady load the log grows between two looks, so a target
            // that is close is watched for a moment until it has everything.
            let Some(to) = target else { continue };
            self.wake(&group).await;
            if Self::wait_caught_up(&group, to, Duration::from_millis(200)).await {
                tracing::info!(shard = group.shard, to = %preferred, "handing leadership to the desired replica");
                let _ = group.raft.trigger().transfer_leader(to).await;
            }
        }
    }

    /// True once `to` has replicated the leader's whole log, watching the leader's metrics for
    /// at most `within` (only while `to` is at most [`TRANSFER_MAX_LAG`] entries behind).
    async fn wait_caught_up(group: &Group, to: u64, within: Duration) -> bool {
        let mut metrics = group.raft.metrics();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let lag = {
                let m = metrics.borrow_watched();
                if !m.state.is_leader() {
                    return false;
                }
                let Some(last) = m.last_log_index else { return false };
                let matched = m.replication.as_ref().and_then(|r| r.get(&to).cloned().flatten());
                matched.map_or(u64::MAX, |l| last.saturating_sub(l.index))
            };
            if lag == 0 {
                return true;
            }
            if lag > TRANSFER_MAX_LAG {
                return false;
            }
            if tokio::time::timeout_at(deadline, metrics.changed()).await.map_or(true, |r| r.is_err()) {
                return false;
            }
        }
    }

    /// The replica that should lead `group`'s shard, given the names of draining nodes.
    fn desired_leader(&self, group: &Group, draining: &BTreeSet<String>) -> Option<String> {
        let placement: Vec<String> = self.spec.placement(group.shard).iter().map(|n| n.name.clone()).collect();
        let chosen = crate::state_machine::load_preferred_leader(&group.store).ok().flatten();
        chosen
            .filter(|c| placement.contains(c) && !draining.contains(c))
            .or_else(|| placement.into_iter().find(|n| !draining.contains(n)))
    }

    /// Starts or ends draining this node: while draining, leader balancing (here and on the
    /// peers, which learn it through Hello) moves every shard's leadership to other replicas.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, std::sync::atomic::Ordering::Release);
    }

    /// Whether this node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Drains this node: moves leadership of every shard it leads to another replica, waiting
    /// up to `within`. Returns the shards it still leads (a replica that was not caught up; the
    /// balancer keeps trying).
    pub async fn drain(&self, within: Duration) -> BTreeSet<ShardId> {
        self.set_draining(true);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.balance_once().await;
            let led = self.led_shards();
            if led.is_empty() || tokio::time::Instant::now() >= deadline {
                return led;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Makes `node` (a replica of `shard`) the shard's preferred leader, or with `None` returns
    /// to the placement's order; replicated, so every future leader balances towards it.
    pub async fn set_preferred_leader(&self, shard: ShardId, node: Option<String>) -> Result<(), ProposeError> {
        if let Some(n) = &node
            && !self.spec.placement(shard).iter().any(|p| &p.name == n)
        {
            return Err(ProposeError::NotReplica { shard, node: n.clone() });
        }
        self.submit(shard, Forwarded::SetPreferredLeader { node }).await?;
        if self.group(shard).is_some_and(|g| g.raft.is_leader()) {
            self.balance_once().await;
        }
        Ok(())
    }

    /// On the leader of `group`: a member whose node now answers Hello with a different id
    /// lost its data and came back as a new peer. Add the new id as a learner (it catches up
    /// from the log or a snapshot), then make it a voter in place of the old id. Ids are never
    /// reused, so the old id can never come back (openraft issue 898).
    async fn replace_wiped_members(&self, group: &Group, current_ids: &BTreeMap<String, u64>) {
        let (members, voters) = {
            let metrics = group.raft.metrics();
            let m = metrics.borrow_watched();
            if !m.state.is_leader() {
                return;
            }
            let membership = m.membership_config.membership();
            let members: Vec<(u64, PeerNode)> = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
            let voters: BTreeSet<u64> = membership.voter_ids().collect();
            (members, voters)
        };
        for (old_id, node) in members {
            let Some(&new_id) = current_ids.get(&node.name) else { continue };
            if old_id == self.id || new_id == old_id || voters.contains(&new_id) {
                continue;
            }
            tracing::warn!(shard = group.shard, node = %node.name, old_id, new_id, "peer came back with a new id; replacing it");
            self.wake(group).await;
            if let Err(e) = group.raft.add_learner(new_id, node.clone(), true).await {
                tracing::warn!(shard = group.shard, error = %e, "adding the returning peer failed");
                continue;
            }
            let mut next: BTreeSet<u64> = voters.clone();
            next.remove(&old_id);
            next.insert(new_id);
            if let Err(e) = group.raft.change_membership(next, false).await {
                tracing::warn!(shard = group.shard, error = %e, "replacing the returning peer failed");
            }
        }
    }

    /// Hands leadership of every shard this node leads to another replica, then stops every
    /// group. Bounded by `within`.
    pub async fn shutdown(&self, within: Duration) {
        // A hand-off takes about one election; when peers are stopping too (a whole cluster
        // going down) it may never complete, and waiting longer only delays the exit.
        let deadline = tokio::time::Instant::now() + within.min(self.lease_max * 10);
        // Quiesced leaderships wake first (all at once: a round trip each, or the lease).
        let led: Vec<Group> = self.groups().into_iter().filter(|g| g.raft.is_leader()).collect();
        futures::future::join_all(led.iter().map(|g| self.wake(g))).await;
        for group in self.groups() {
            if group.raft.is_leader() {
                let target = group.raft.voter_ids().find(|id| *id != self.id);
                if let Some(to) = target {
                    let _ = group.raft.trigger().transfer_leader(to).await;
                }
            }
        }
        for group in self.groups() {
            while group.raft.is_leader() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for group in self.groups() {
            let _ = group.raft.shutdown().await;
            // What is applied but not checkpointed would be re-applied from the log after a
            // restart; writing it now makes the restart cheaper.
            if let Err(e) = group.store.checkpoint() {
                tracing::warn!(shard = group.shard, error = %e, "checkpoint at shutdown");
            }
        }
        self.stopped.send_replace(true);
    }

    /// Resolves once [`RaftNode::shutdown`] has stopped every group.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopped.subscribe();
        async move {
            // An error means the node is gone: stopped as well.
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }

    /// Shard ids led by this node (per local Raft state).
    pub fn led_shards(&self) -> BTreeSet<ShardId> {
        self.groups().into_iter().filter(|g| g.raft.is_leader()).map(|g| g.shard).collect()
    }
}

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

/// Set once a leader has written `key_overflow = "reject"` as `flush_early` because a replica
/// spoke an older protocol (logged once per process).
static KEY_OVERFLOW_WAITS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The peer protocol this build writes: the encoding of log entries ([`Command`]), forwards
/// and openraft messages ([`codec`]) between nodes. Bump it with every change a node of the
/// previous version could not read, and keep writing the old encoding until every member
/// announces the new one (docs/upgrades.md).
///
/// - 1: the first announced protocol (December 2026).
/// - 2: a forward's reply may carry [`crate::types::GroupOutcome::TooOld`].
/// - 3: log entries may carry [`Command::Trim`] (proposed only once every member of the group
///   announced 3: [`RaftNode::members_speak`]).
/// - 4: Ingest entries may carry `key_overflow = "reject"` rules (a variant of their own,
///   `coalesce_core::entry::wire`; written only once every member announced 4), and a
///   forward's reply may carry [`crate::types::GroupOutcome::KeyFull`].
pub const PROTOCOL: u32 = 4;
/// The oldest peer protocol this build reads.
pub const PROTOCOL_MIN: u32 = 1;

/// Whether a peer announcing `protocol` (what it writes) and `protocol_min` (the oldest it
/// reads) can replicate with this build. 0 is a build from before the announcement: 1.
fn check_protocol(protocol: u32, protocol_min: u32) -> Result<(), String> {
    let (theirs, their_min) = (protocol.max(1), protocol_min.max(1));
    if theirs < PROTOCOL_MIN || their_min > PROTOCOL {
        return Err(format!(
            "the peer writes protocol {theirs} and reads {their_min}..={theirs}; this build writes {PROTOCOL} and \
             reads {PROTOCOL_MIN}..={PROTOCOL}: upgrade one release at a time (docs/upgrades.md)"
        ));
    }
    Ok(())
}

/// Metadata of a `Forward` call: the protocol the forwarding node reads, so the leader writes
/// a reply it can decode.
pub(crate) const PROTOCOL_HEADER: &str = "x-coalesce-protocol";

/// Metadata of a `StreamAppend` call: the group, and the node id meant.
pub(crate) const STREAM_GROUP_HEADER: &str = "x-coalesce-group";
pub(crate) const STREAM_TARGET_HEADER: &str = "x-coalesce-target";

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Refuses replicated entries whose commands do not validate
/// ([`coalesce_wire::peer::check_entries`]).
fn check_entries(rpc: &openraft::raft::AppendEntriesRequest<TypeConfig>) -> Result<(), Status> {
    if crate::failpoints::active("skip_validation") {
        return Ok(());
    }
    coalesce_wire::peer::check_entries(rpc).map_err(|e| {
        crate::metrics::INVALID_COMMANDS.with_label_values(&["peer"]).inc();
        bad(e)
    })
}

fn reply<T: serde::Serialize>(group: ShardId, what: &'static str, v: &T) -> Result<TonicResponse<RaftMessage>, Status> {
    let payload = codec::encode_msg(what, v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(TonicResponse::new(RaftMessage { group, payload, target: 0 }))
}

fn unavailable(e: impl std::fmt::Display) -> Status {
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
        let keepalive = g.quiet.is_keepalive(&rpc);
        let resp = g.raft.append_entries(rpc).await.map_err(unavailable)?;
        if !keepalive {
            self.node.wake_on_message(&g);
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
                if !quiet.quiet.is_keepalive(rpc) {
                    node.wake_on_message(&quiet);
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
        self.node.wake_on_message(&g);
        reply(m.group, "vote", &resp)
    }

    async fn pre_vote(&self, request: Request<RaftMessage>) -> Result<TonicResponse<RaftMessage>, Status> {
        let sender = self.node.peer_sender(&request)?;
        let m = request.into_inner();
        let g = self.group(m.group, m.target)?;
        let rpc: openraft::raft::VoteRequest<TypeConfig> = codec::decode_msg("pre_vote", &m.payload).map_err(bad)?;
        self.node.check_speaks_for(sender.as_deref(), &g, rpc.vote.leader_id.node_id).await?;
        let resp = g.raft.pre_vote(rpc).await.map_err(unavailable)?;
        self.node.wake_on_message(&g);
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
        self.node.wake_on_message(&g);
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
        self.node.wake_on_message(&g);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: usize, shards: u32, replication: usize) -> ClusterSpec {
        ClusterSpec {
            cluster: "t".into(),
            shards,
            replication,
            nodes: (0..n)
                .rev()
                .map(|i| NodeSpec {
                    name: format!("coalesce-{i}"),
                    peer_addr: String::new(),
                    client_addr: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn peers_must_read_what_each_other_writes() {
        assert!(check_protocol(PROTOCOL, PROTOCOL_MIN).is_ok());
        assert!(check_protocol(0, 0).is_ok(), "a build from before the announcement speaks 1");
        let e = check_protocol(PROTOCOL + 5, PROTOCOL + 3).unwrap_err();
        assert!(e.contains("upgrade one release at a time"), "{e}");
        assert!(check_protocol(PROTOCOL + 1, PROTOCOL).is_ok(), "a newer peer that still reads ours");
    }

    #[test]
    fn placement_spreads_replicas_and_preferred_leaders() {
        for (n, r) in [(3, 3), (5, 3), (7, 3), (4, 2), (1, 1)] {
            let s = spec(n, 64, r);
            let mut preferred = BTreeMap::<String, u32>::new();
            let mut replicas = BTreeMap::<String, u32>::new();
            for shard in 0..64 {
                let p = s.placement(shard);
                let names: BTreeSet<&str> = p.iter().map(|n| n.name.as_str()).collect();
                assert_eq!(names.len(), r, "n={n} r={r} shard {shard}: distinct replicas");
                *preferred.entry(p[0].name.clone()).or_default() += 1;
                for x in p {
                    *replicas.entry(x.name.clone()).or_default() += 1;
                }
            }
            // Every node is the preferred leader of ⌊S/N⌋ or ⌈S/N⌉ shards, and holds about R·S/N.
            let (lo, hi) = (64 / n as u32, 64u32.div_ceil(n as u32));
            assert!(preferred.values().all(|c| (lo..=hi).contains(c)), "n={n}: {preferred:?}");
            assert_eq!(preferred.len(), n);
            assert!(replicas.values().all(|c| (lo * r as u32..=hi * r as u32).contains(c)), "n={n}: {replicas:?}");
        }
    }
}
