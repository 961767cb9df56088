//! Leadership balancing and membership repair: preferred leaders, drain, replacing wiped
//! members.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use coalesce_core::hash::ShardId;

use crate::types::PeerNode;
use coalesce_wire::peer::Forwarded;
use openraft::async_runtime::WatchReceiver;

use super::{Group, ProposeError, RaftNode};

/// The balancer waits for a leadership-transfer target at most this many entries behind.
pub(super) const TRANSFER_MAX_LAG: u64 = 1_000;
impl RaftNode {
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
    pub(super) async fn wait_caught_up(group: &Group, to: u64, within: Duration) -> bool {
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
    pub(super) fn desired_leader(&self, group: &Group, draining: &BTreeSet<String>) -> Option<String> {
        let placement: Vec<String> = self.spec.placement(group.shard).iter().map(|n| n.name.clone()).collect();
        let chosen = group.reader().preferred_leader().ok().flatten();
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
    pub(super) async fn replace_wiped_members(&self, group: &Group, current_ids: &BTreeMap<String, u64>) {
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
}
