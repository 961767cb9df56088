//! A node's shard groups: one openraft instance per shard this node replicates, all sharing
//! the node's RocksDB, its WAL flusher and one gRPC channel per peer.
//!
//! Placement is static: with the peer names sorted (`coalesce-0`, `coalesce-1`, …), shard `s`
//! lives on the `R` nodes starting at index `s mod N`. The first of them initializes the group,
//! so each node starts out leading about `S/N` shards. Node ids are random per data directory
//! (kept in the `node` column family): a wiped node comes back as a new peer, never reusing
//! an id (reusing one can make a leader panic; openraft issue 898).
//!
//! One job per file:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the node and its groups: specs, timing, start-up, accessors, shutdown |
//! | `bootstrap` | initializing each group once its replicas answer |
//! | `peers` | Hello, the cluster id, protocols peers speak, which peer speaks for which id |
//! | `propose` | proposing, forwarding to the leader, the leader's admission of ingests |
//! | `views` | read-only views: leader, epoch, lease, replication progress |
//! | `policy` | leader policy: hot keys, adaptive windows and sink health, the sealer |
//! | `balance` | leadership balancing, drain, preferred leaders, replacing wiped members |
//! | `service` | the peer gRPC service (`RaftPeer`) |
//!
//! The peer protocol's version and call metadata live in [`crate::protocol`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use coalesce_core::adaptive::AdaptiveController;
use coalesce_core::hash::ShardId;
use coalesce_core::hotkeys::HotKeys;
use coalesce_core::stream::StreamTable;
use coalesce_core::time::{Clock, SystemClock};
use coalesce_storage::{NodeDb, ShardStore, StorageError};
use openraft::{Config, Raft, SnapshotPolicy};

use crate::log_store::LogStore;
use crate::network::{Channels, GroupNetworkFactory};
use crate::state_machine::{ApplyFailure, FailureSlot, ShardStateMachine};
use crate::types::{InvalidCommand, PeerNode, TypeConfig};

mod balance;
mod bootstrap;
mod peers;
mod policy;
mod propose;
mod service;
mod views;

pub use crate::protocol::{PROTOCOL, PROTOCOL_MIN};
pub use peers::HelloError;
pub use policy::SinkHealth;
pub use service::PeerService;
pub use views::{Leadership, ReplicaDetail, ShardDetail, ShardView};

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
    /// Read by the raft crate only; everything else reads through [`Group::reader`].
    store: ShardStore,
    /// The state machine's change counter ([`crate::changes`]).
    changes: crate::changes::Changes,
    /// The adaptive stretch of each stream in the last Ingest entry applied here (see
    /// [`ShardStateMachine::applied_extra`]): where a new leader's controllers resume.
    pub applied_extra: crate::state_machine::AppliedExtra,
    /// Whether the group's timers are stopped ([`crate::quiesce`]), and when it was last needed.
    pub quiet: Arc<crate::quiesce::Quiet>,
    /// Set when an entry failed to apply here: the group has stopped on this node.
    failure: FailureSlot,
}

impl Group {
    /// The shard's applied state, read-only and typed.
    pub fn reader(&self) -> crate::reader::ShardReader {
        crate::reader::ShardReader::new(self.store.clone(), self.changes.clone())
    }

    /// The shard's storage: what the state machine, snapshots and this crate's tests work on.
    /// Read replicated state through [`Group::reader`] instead.
    pub fn store(&self) -> &ShardStore {
        &self.store
    }

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
    /// Moves with every shard's change counter ([`crate::changes`]).
    changes: crate::changes::NodeChanges,
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

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode").field("id", &self.id).field("name", &self.me.name).finish()
    }
}

const PEER_ID_KEY: &str = "peer_id";

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
        let changes = crate::changes::NodeChanges::default();
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
                .notifying(&changes)
                .counting_as(id)
                .checkpoint_every(Duration::from_millis(timing.checkpoint_ms));
            let shard_changes = sm.changes();
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
            groups.insert(shard, Group { shard, raft, store, changes: shard_changes, applied_extra, quiet, failure });
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
            changes,
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

    /// A receiver that wakes on the next change of any of this node's shards (an applied entry,
    /// an installed snapshot): what the sealer waits on ([`crate::changes`]).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.watch()
    }

    /// A receiver that wakes when the outputs of any of this node's shards next change: what
    /// Subscribe waits on ([`crate::changes`]).
    pub fn output_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.watch_outputs()
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

    /// The streams this node runs with.
    pub fn streams(&self) -> &StreamTable {
        &self.streams
    }

    /// The leader of `shard` as this node knows it.
    /// The channel to a peer's peer port (shared with Raft traffic), for services that ride on
    /// it (the server's `FetchPeer`).
    pub fn peer_channel(&self, peer: &PeerNode) -> Result<tonic::transport::Channel, crate::network::ChannelError> {
        self.channels.for_peer(peer)
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
