//! What a node knows of its peers: the Hello exchange (cluster id, protocol), which peer may
//! speak for which Raft id, and whether every member of a group reads a newer protocol.

use std::sync::Arc;
use std::time::Duration;

use coalesce_core::hash::ShardId;
use coalesce_proto::v1::raft_peer_client::RaftPeerClient;
use coalesce_proto::v1::{HelloRequest, HelloResponse};
use tonic::{Request, Status};

use openraft::async_runtime::WatchReceiver;

use super::{Group, RaftNode};
use crate::network::ChannelError;
use crate::protocol::{PROTOCOL, PROTOCOL_MIN, check_protocol};

/// Why a Hello to a peer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("{name}: {detail}")]
    Unreachable { name: String, detail: String },
    #[error("{name} belongs to cluster {theirs:?}, not {ours:?}")]
    OtherCluster { name: String, theirs: String, ours: String },
    #[error("the address of {name} is answered by {answered:?}")]
    WrongNode { name: String, answered: String },
    /// It speaks a protocol this build cannot replicate with, or shows another cluster id.
    #[error("{name}: {detail}")]
    Incompatible { name: String, detail: String },
    #[error("{name} answered with the Raft id of {owner}")]
    IdTaken { name: String, owner: String },
}

impl RaftNode {
    /// Asks the node called `name` who it is, and remembers its Raft id.
    pub async fn hello(&self, name: &str) -> Result<HelloResponse, HelloError> {
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
        let reply = RaftPeerClient::new(channel)
            .hello(req)
            .await
            .map_err(|s| HelloError::Unreachable { name: name.to_owned(), detail: s.message().to_owned() })?
            .into_inner();
        if reply.cluster != self.spec.cluster {
            return Err(HelloError::OtherCluster {
                name: name.to_owned(),
                theirs: reply.cluster,
                ours: self.spec.cluster.clone(),
            });
        }
        if reply.name != name {
            return Err(HelloError::WrongNode { name: name.to_owned(), answered: reply.name });
        }
        let verdict = check_protocol(reply.protocol, reply.protocol_min).and_then(|()| {
            self.identity.learn(&self.db, name, &reply.cluster_id, reply.cluster_predates_id).map_err(|e| e.to_string())
        });
        self.note_protocol(name, reply.protocol, verdict)
            .map_err(|detail| HelloError::Incompatible { name: name.to_owned(), detail })?;
        let mut ids = self.peer_ids.lock().unwrap_or_else(|p| p.into_inner());
        match ids.get(&reply.node_id) {
            // Ids are random per data directory: one that another node already answered with is
            // a peer lying about its id, and must not take it over.
            Some(owner) if *owner != reply.name => {
                tracing::error!(id = reply.node_id, owner = %owner, claimed_by = %reply.name, "a peer answered Hello with another node's Raft id");
                return Err(HelloError::IdTaken { name: name.to_owned(), owner: owner.clone() });
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
    pub(super) fn note_protocol(&self, name: &str, protocol: u32, verdict: Result<(), String>) -> Result<(), String> {
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
    pub(super) fn owner_of(&self, group: &Group, id: u64) -> Option<String> {
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
    pub(super) async fn check_speaks_for(&self, sender: Option<&str>, group: &Group, id: u64) -> Result<(), Status> {
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
    pub(super) fn check_speaks_for_known(&self, sender: Option<&str>, group: &Group, id: u64) -> Result<(), Status> {
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
}
