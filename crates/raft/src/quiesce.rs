//! Quiescence: idle shard groups stop their Raft timers, and one ping per peer node stands in
//! for their heartbeats.
//!
//! Without it an idle cluster spends its CPU on heartbeats: every leader sends one to each
//! follower every `heartbeat` (64 shards × 2 followers × 10/s = 1,280 RPCs/s on a 3-node
//! cluster) and every replica runs election and heartbeat timers. Like CockroachDB's quiescent
//! ranges and TiKV's hibernate regions, a group whose leader has seen nothing to do for
//! `quiesce_after` stops them (openraft's `runtime_config().tick(false)`: no timers, no
//! wakeups) and nodes watch each other instead.
//!
//! ## Protocol
//! - **Quiesce** (leader, from the scheduler tick): idle for `quiesce_after` (no proposal,
//!   forwarded request or delivery work), no open window, the whole log committed, applied and
//!   held by every follower, lease valid. It sends `Quiesce {term, last_log_index}` to each
//!   follower; a follower that agrees (same leader and term, the same last log entry,
//!   committed) stops its ticker. Once all agreed, and nothing happened meanwhile, the leader
//!   stops its own: from then on it sends one heartbeat every other `heartbeat` period, only
//!   to keep its lease (openraft holds back heartbeats and refuses writes once a leader went a
//!   lease without a quorum acknowledgement), with no timers on either side. Otherwise it stays
//!   awake and asks again after another idle period; followers that stopped stay stopped
//!   meanwhile (its empty heartbeats count as their keepalives).
//! - **Wake**: a proposal on a quiesced leader restarts its ticker and proceeds at once (the
//!   lease is kept); should the lease have lapsed, it sends a heartbeat and waits (at most the
//!   maximum election timeout) for a quorum to answer. A Raft message arriving at a
//!   quiesced replica wakes it after it was processed, so the message renews the follower's
//!   view of its leader before its election timer runs again.
//! - **Liveness**: every node pings each peer every `heartbeat` ([`Ping`]: name and boot id).
//!   When a quiesced follower's leader node has neither answered nor pinged for the minimum
//!   election timeout, the follower wakes the group; the shard's successor (the first replica
//!   in placement order other than the silent leader) campaigns at once, the other replica only
//!   after the maximum election timeout, so the two do not split the vote. A node wakes its
//!   quiesced leaderships when it notices its own pause (the liveness loop slept past the
//!   lease: they may have been taken over), when a peer restarted (new boot id: its fresh
//!   replica would campaign unless it hears from the leader) and when a peer answers again
//!   after failing.
//!
//! Safety does not rest on any of this: votes and terms are Raft's; a quiesced follower never
//! campaigns sooner after its leader's last keepalive than its election timer would, so the
//! leader lease that fences sealing and delivery holds; and a wrong call costs an election,
//! never an acknowledged event.
//!
//! [`Ping`]: coalesce_proto::v1::PingRequest

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use coalesce_core::hash::ShardId;
use coalesce_proto::v1::raft_peer_client::RaftPeerClient;
use coalesce_proto::v1::{PingRequest, PingResponse, RaftMessage};
use openraft::async_runtime::WatchReceiver;

use crate::codec;
use crate::node::{Group, RaftNode};
use crate::types::PeerNode;
use coalesce_wire::peer::QuiesceRequest;

const AWAKE: u8 = 0;
const QUIESCED_LEADER: u8 = 1;
const QUIESCED_FOLLOWER: u8 = 2;
/// Quiesced leaders heartbeat every this many liveness rounds (heartbeats): often enough to
/// keep their lease (the maximum election timeout), a third of the normal rate at defaults.
const KEEPALIVE_ROUNDS: u64 = 2;

/// Milliseconds since this process started (for cheap atomic timestamps).
fn now_ms() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    START.elapsed().as_millis() as u64
}

/// A group's quiescence state.
#[derive(Debug)]
pub struct Quiet {
    state: AtomicU8,
    /// When something last needed the group (ms, [`now_ms`]).
    active_ms: AtomicU64,
    /// When a quiesced leader last woke (ms): proposals wait for its lease until it is valid.
    woke_ms: AtomicU64,
    /// A quiesced follower's leader (node name).
    leader: Mutex<String>,
    /// A quiesced follower's leader (Raft id) and term: its keepalive heartbeats do not wake it.
    leader_id: AtomicU64,
    leader_term: AtomicU64,
    /// When a quiesced follower last heard its leader's keepalive (ms): it never campaigns
    /// sooner than the minimum election timeout after it, as a Raft election timer would not.
    heard_ms: AtomicU64,
}

impl Default for Quiet {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(AWAKE),
            active_ms: AtomicU64::new(now_ms()),
            woke_ms: AtomicU64::new(0),
            leader: Mutex::new(String::new()),
            leader_id: AtomicU64::new(0),
            leader_term: AtomicU64::new(0),
            heard_ms: AtomicU64::new(0),
        }
    }
}

impl Quiet {
    /// Records activity: the group must stay (or get) awake.
    pub fn touch(&self) {
        self.active_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether the group's timers are stopped.
    pub fn is_quiesced(&self) -> bool {
        self.state.load(Ordering::Acquire) != AWAKE
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.active_ms.load(Ordering::Relaxed)))
    }

    /// Whether an AppendEntries (`empty`: without entries) from leader `node_id` in `term` is a
    /// keepalive of the leader and term this follower last quiesced under, which must not wake
    /// it.
    ///
    /// The follower's state is deliberately not consulted, and the unary handler asks only
    /// after processing the message: a heartbeat the leader sent just before it asked the
    /// follower to quiesce can arrive before the follower agrees and finish after, and it must
    /// not then wake the follower it finds quiesced (which left one replica awake under a
    /// quiesced leader for good: nothing asks it again). On an awake replica the answer changes
    /// nothing.
    pub fn is_keepalive(&self, empty: bool, node_id: u64, term: u64) -> bool {
        let keepalive = empty
            && self.leader_id.load(Ordering::Acquire) == node_id
            && self.leader_term.load(Ordering::Acquire) == term;
        if keepalive {
            self.heard_ms.store(now_ms(), Ordering::Release);
        }
        keepalive
    }

    /// Marks the group awake; returns the state it left.
    fn take(&self) -> u8 {
        self.state.swap(AWAKE, Ordering::AcqRel)
    }
}

/// What this node knows of a peer node's liveness.
#[derive(Debug, Clone)]
struct PeerLive {
    /// Last successful ping either way.
    last_ok: Instant,
    boot: Option<u64>,
    failing: bool,
}

/// This node's view of its peers (see the module docs).
#[derive(Debug)]
pub struct Liveness {
    pub(crate) boot: u64,
    peers: Mutex<BTreeMap<String, PeerLive>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self { boot: rand::random::<u64>() | 1, peers: Mutex::new(BTreeMap::new()) }
    }
}

/// What a ping exchange with a peer revealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heard {
    Steady,
    /// A new process (boot id) or reachable again after failing.
    Returned,
}

impl Liveness {
    fn heard(&self, name: &str, boot: u64) -> Heard {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let p =
            peers.entry(name.to_owned()).or_insert(PeerLive { last_ok: Instant::now(), boot: None, failing: false });
        let returned = p.failing || p.boot.is_some_and(|b| b != boot);
        *p = PeerLive { last_ok: Instant::now(), boot: Some(boot), failing: false };
        if returned { Heard::Returned } else { Heard::Steady }
    }

    fn failed(&self, name: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .entry(name.to_owned())
            .or_insert(PeerLive { last_ok: Instant::now(), boot: None, failing: false })
            .failing = true;
    }

    /// Peers not heard from for `silent` or longer.
    fn silent(&self, silent: Duration) -> Vec<String> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.iter().filter(|(_, p)| p.last_ok.elapsed() >= silent).map(|(n, _)| n.clone()).collect()
    }

    /// After this node's own pause: every peer gets a fresh grace period.
    fn forgive_all(&self) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        for p in peers.values_mut() {
            p.last_ok = Instant::now();
        }
    }
}

impl RaftNode {
    /// Records activity on `shard` so it stays awake (delivery work, for instance).
    pub fn keep_awake(&self, shard: ShardId) {
        if let Some(g) = self.group(shard) {
            g.quiet.touch();
        }
    }

    /// Wakes `shard`'s group if it is quiesced and, on its leader, waits until the lease is
    /// valid again (see the module docs).
    pub async fn wake_shard(&self, shard: ShardId) {
        if let Some(g) = self.group(shard) {
            self.wake(&g).await;
        }
    }

    /// Number of local groups whose timers are stopped.
    pub fn quiesced_groups(&self) -> usize {
        self.groups().iter().filter(|g| g.quiet.is_quiesced()).count()
    }

    /// Wakes `group` before a proposal or any other leader action.
    pub(crate) async fn wake(&self, group: &Group) {
        group.quiet.touch();
        if group.quiet.is_quiesced() && group.quiet.take() != AWAKE {
            group.quiet.woke_ms.store(now_ms(), Ordering::Relaxed);
            group.raft.runtime_config().tick(true);
            tracing::debug!(shard = group.shard, "woken");
            let _ = group.raft.trigger().heartbeat().await;
        }
        // A leader that woke recently waits for a quorum's answer: openraft refuses writes
        // without a valid lease.
        let woke = group.quiet.woke_ms.load(Ordering::Relaxed);
        if woke > 0 && now_ms().saturating_sub(woke) < self.lease_max.as_millis() as u64 {
            self.await_lease(group).await;
        }
    }

    /// Waits (at most one maximum election timeout) until this node either does not lead
    /// `group` or leads it with a valid lease: a quorum answered it recently. openraft refuses
    /// writes in between (a leader just woken, or just elected and not yet heard by a quorum).
    pub(crate) async fn await_lease(&self, group: &Group) {
        let deadline = tokio::time::Instant::now() + self.lease_max;
        let mut metrics = group.raft.metrics();
        loop {
            let valid = !group.raft.is_leader()
                || self.leadership(group.shard).is_some_and(|l| l.quorum_acked_ago < self.lease);
            if valid || tokio::time::timeout_at(deadline, metrics.changed()).await.map_or(true, |r| r.is_err()) {
                break;
            }
        }
    }

    /// Wakes a quiesced replica on an incoming Raft message (after it was processed); `why`
    /// names the message for the debug log.
    pub(crate) fn wake_on_message(&self, group: &Group, why: &'static str) {
        if group.quiet.is_quiesced() && group.quiet.take() != AWAKE {
            group.raft.runtime_config().tick(true);
            tracing::debug!(shard = group.shard, why, "woken");
        }
    }

    /// Quiesces `group` if its leader (this node) finds it idle; see the module docs.
    /// `window_open`: a window of the shard is still open (the scheduler will seal it).
    pub(crate) async fn maybe_quiesce(&self, group: &Group, window_open: bool) {
        let Some(after) = self.quiesce_after else { return };
        if window_open {
            group.quiet.touch();
            return;
        }
        if group.quiet.is_quiesced() || group.quiet.idle_for() < after {
            return;
        }
        let since = group.quiet.active_ms.load(Ordering::Relaxed);
        let Some((req, followers)) = self.quiesce_plan(group) else {
            // Not settled yet: look again after another idle period.
            group.quiet.touch();
            return;
        };
        let payload = match codec::encode_msg("quiesce", &req) {
            Ok(p) => p,
            Err(_) => return,
        };
        let asks = followers.iter().map(|(id, peer)| {
            let msg = RaftMessage { group: group.shard, payload: payload.clone(), target: *id };
            let channel = self.channels.for_peer(peer);
            async move {
                let Ok(channel) = channel else { return false };
                let mut client = RaftPeerClient::new(channel);
                match tokio::time::timeout(self.lease, client.quiesce(msg)).await {
                    Ok(Ok(r)) => codec::decode_msg::<bool>("quiesce reply", &r.into_inner().payload).unwrap_or(false),
                    _ => false,
                }
            }
        });
        let agreed = futures::future::join_all(asks).await.into_iter().all(|ok| ok);
        let undisturbed = group.quiet.active_ms.load(Ordering::Relaxed) == since;
        if agreed && undisturbed && self.quiesce_plan(group).is_some() {
            group.quiet.state.store(QUIESCED_LEADER, Ordering::Release);
            group.raft.runtime_config().tick(false);
            tracing::debug!(shard = group.shard, "quiesced");
        } else {
            tracing::debug!(
                shard = group.shard,
                agreed,
                undisturbed,
                "not quiesced: trying again after another idle period"
            );
            group.quiet.touch();
        }
    }

    /// The request and followers for quiescing `group`, if it is settled: this node leads it
    /// with a valid lease, and the whole log is committed, applied and held by every voter.
    fn quiesce_plan(&self, group: &Group) -> Option<(QuiesceRequest, Vec<(u64, PeerNode)>)> {
        let metrics = group.raft.metrics();
        let m = metrics.borrow_watched();
        if !m.state.is_leader() || !m.vote.committed {
            return None;
        }
        let last = m.last_log_index?;
        if m.local_committed.as_ref().map(|c| c.index) != Some(last)
            || m.last_applied.as_ref().map(|a| a.index) != Some(last)
        {
            return None;
        }
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() != 1 || membership.nodes().count() != membership.voter_ids().count() {
            return None;
        }
        let replication = m.replication.as_ref()?;
        let mut followers = Vec::new();
        for id in membership.voter_ids().filter(|id| *id != self.id) {
            let matched = replication.get(&id).cloned().flatten().map(|l| l.index);
            if matched != Some(last) {
                return None;
            }
            followers.push((id, membership.get_node(&id)?.clone()));
        }
        drop(m);
        // A valid lease: a quorum acknowledged this leader just now.
        self.delivery_epoch(group.shard)?;
        Some((QuiesceRequest { term: group_term(group), leader: self.id, last_log_index: last }, followers))
    }

    /// A follower's answer to [`QuiesceRequest`]: agrees (and stops its ticker) when it
    /// follows that leader in that term and holds the same committed log.
    /// A quiesce request from the node that `from_leader` accepts as the sender of the
    /// leader id the request names.
    pub(crate) fn on_quiesce(&self, group: &Group, payload: &[u8], from_leader: impl FnOnce(u64) -> bool) -> bool {
        let Ok(req) = codec::decode_msg::<QuiesceRequest>("quiesce", payload) else { return false };
        if !from_leader(req.leader) {
            return false;
        }
        let leader_name = {
            let metrics = group.raft.metrics();
            let m = metrics.borrow_watched();
            let agrees = !m.state.is_leader()
                && m.current_leader == Some(req.leader)
                && m.vote.committed
                && m.vote.leader_id.term == req.term
                && m.last_log_index == Some(req.last_log_index)
                && m.local_committed.as_ref().map(|c| c.index) == Some(req.last_log_index);
            if !agrees {
                tracing::debug!(
                    shard = group.shard,
                    leader = req.leader,
                    term = req.term,
                    last = req.last_log_index,
                    my_leader = ?m.current_leader,
                    my_term = m.vote.leader_id.term,
                    my_last = ?m.last_log_index,
                    my_committed = ?m.local_committed.as_ref().map(|c| c.index),
                    "refusing to quiesce"
                );
                return false;
            }
            match m.membership_config.membership().get_node(&req.leader) {
                Some(n) => n.name.clone(),
                None => return false,
            }
        };
        *group.quiet.leader.lock().unwrap_or_else(|p| p.into_inner()) = leader_name;
        group.quiet.leader_id.store(req.leader, Ordering::Release);
        group.quiet.leader_term.store(req.term, Ordering::Release);
        group.quiet.heard_ms.store(now_ms(), Ordering::Release);
        group.quiet.state.store(QUIESCED_FOLLOWER, Ordering::Release);
        group.raft.runtime_config().tick(false);
        true
    }

    /// A ping from peer `name` (process `boot`).
    pub(crate) fn on_ping(&self, req: &PingRequest) -> PingResponse {
        if self.liveness.heard(&req.name, req.boot) == Heard::Returned {
            self.wake_leaderships_with(&req.name);
        }
        PingResponse { name: self.me().name.clone(), boot: self.liveness.boot }
    }

    /// Wakes the quiesced groups this node leads that `peer` replicates.
    fn wake_leaderships_with(&self, peer: &str) {
        for g in self.groups() {
            if g.quiet.state.load(Ordering::Acquire) == QUIESCED_LEADER
                && self.spec.placement(g.shard).iter().any(|n| n.name == peer)
                && g.quiet.take() != AWAKE
            {
                g.quiet.woke_ms.store(now_ms(), Ordering::Relaxed);
                g.raft.runtime_config().tick(true);
                tracing::debug!(shard = g.shard, peer, "woken: the peer is back");
            }
        }
    }

    /// Pings every peer each `heartbeat` until `shutdown` resolves, and wakes quiesced groups
    /// whose leader went silent (see the module docs).
    pub async fn run_liveness(self: std::sync::Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        if self.quiesce_after.is_none() {
            return shutdown.await;
        }
        let period = self.heartbeat;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut last_round = Instant::now();
        let mut round = 0u64;
        let peers: Vec<PeerNode> = self
            .spec
            .nodes
            .iter()
            .filter(|n| n.name != self.me().name)
            .map(|n| PeerNode {
                name: n.name.clone(),
                peer_addr: n.peer_addr.clone(),
                client_addr: n.client_addr.clone(),
            })
            .collect();
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            if last_round.elapsed() > self.lease {
                // This node was paused or starved: peers get a fresh grace period, and its own
                // quiesced leaderships may have been taken over meanwhile.
                self.liveness.forgive_all();
                for g in self.groups() {
                    if g.quiet.state.load(Ordering::Acquire) == QUIESCED_LEADER {
                        self.wake_on_message(&g, "this node was paused");
                    }
                }
            }
            last_round = Instant::now();
            round += 1;
            if round.is_multiple_of(KEEPALIVE_ROUNDS) {
                self.keep_leases().await;
            }
            let me = PingRequest { name: self.me().name.clone(), boot: self.liveness.boot };
            let pings = peers.iter().map(|p| {
                let channel = self.channels.for_peer(p);
                let req = me.clone();
                async move {
                    let Ok(channel) = channel else { return (p.name.clone(), None) };
                    let mut client = RaftPeerClient::new(channel);
                    let r = tokio::time::timeout(period, client.ping(req)).await;
                    (p.name.clone(), r.ok().and_then(Result::ok).map(|r| r.into_inner()))
                }
            });
            for (name, answer) in futures::future::join_all(pings).await {
                match answer {
                    Some(a) => {
                        if self.liveness.heard(&name, a.boot) == Heard::Returned {
                            self.wake_leaderships_with(&name);
                        }
                    }
                    None => self.liveness.failed(&name),
                }
            }
            let silent = self.liveness.silent(self.lease);
            if !silent.is_empty() {
                self.wake_orphans(&silent);
            }
            self.quiesce_idle().await;
        }
    }

    /// One heartbeat from every quiesced leadership: it keeps the leader's lease (openraft
    /// holds back heartbeats and refuses writes once a leader has gone a lease without a quorum
    /// acknowledgement), so a quiesced group wakes without a wait, at a fraction of the normal
    /// heartbeat rate and with no timers.
    async fn keep_leases(&self) {
        for g in self.groups() {
            if g.quiet.state.load(Ordering::Acquire) == QUIESCED_LEADER {
                let _ = g.raft.trigger().heartbeat().await;
            }
        }
    }

    /// Quiesces the groups this node leads that have been idle long enough.
    async fn quiesce_idle(&self) {
        let Some(after) = self.quiesce_after else { return };
        let idle: Vec<Group> = self
            .groups()
            .into_iter()
            .filter(|g| !g.quiet.is_quiesced() && g.quiet.idle_for() >= after && g.raft.is_leader())
            .collect();
        futures::future::join_all(idle.iter().map(|g| {
            // Buffered keys are open windows: the scheduler will seal them.
            let open = g.reader().stats().map_or(true, |s| s.keys > 0);
            self.maybe_quiesce(g, open)
        }))
        .await;
    }

    /// Wakes the groups quiesced under a leader on a silent node; the successor campaigns.
    fn wake_orphans(&self, silent: &[String]) {
        for g in self.groups() {
            if g.quiet.state.load(Ordering::Acquire) != QUIESCED_FOLLOWER {
                continue;
            }
            let leader = g.quiet.leader.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let heard = Duration::from_millis(now_ms().saturating_sub(g.quiet.heard_ms.load(Ordering::Acquire)));
            // Never sooner after the leader's last keepalive than a Raft election timer would:
            // the leader's lease (delivery, sealing) rests on that.
            if !silent.contains(&leader) || heard < self.lease || g.quiet.take() == AWAKE {
                continue;
            }
            let successor = self.spec.placement(g.shard).into_iter().find(|n| n.name != leader).map(|n| n.name.clone());
            let me = successor.as_deref() == Some(self.me().name.as_str());
            tracing::info!(shard = g.shard, %leader, campaign = me, "the leader's node is silent: waking the group");
            if me {
                g.raft.runtime_config().tick(true);
                let raft = g.raft.clone();
                tokio::spawn(async move {
                    let _ = raft.trigger().elect(true).await;
                });
            } else {
                // Give the successor a head start, so the two followers do not split the vote.
                g.raft.runtime_config().elect(false);
                g.raft.runtime_config().tick(true);
                let (raft, delay) = (g.raft.clone(), self.lease_max);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    raft.runtime_config().elect(true);
                });
            }
        }
    }
}

fn group_term(group: &Group) -> u64 {
    group.raft.metrics().borrow_watched().vote.leader_id.term
}
