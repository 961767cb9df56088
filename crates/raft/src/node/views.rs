//! Read-only views of the shard groups: leader, epoch, lease and replication progress.

use std::collections::BTreeSet;
use std::time::Duration;

use coalesce_core::hash::ShardId;

use crate::types::PeerNode;
use openraft::async_runtime::WatchReceiver;

use super::RaftNode;
use super::propose::leader_moves;

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

impl RaftNode {
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

    /// Shard ids led by this node (per local Raft state).
    pub fn led_shards(&self) -> BTreeSet<ShardId> {
        self.groups().into_iter().filter(|g| g.raft.is_leader()).map(|g| g.shard).collect()
    }
}
