//! How a node comes to know its cluster's id ([`coalesce_core::cluster`]) and keeps it.
//!
//! The id is kept in the node column family (key `cluster_id`) and travels in every Hello, both
//! ways. A node that has none takes the first one a peer shows it (its Hello answer, or a Hello
//! it receives). When every other node of the configured peer list answered Hello and none has
//! an id, the cluster has none yet: the **last** node in natural name order (`coalesce-10`
//! after `coalesce-9`) makes one, and the others learn it from their next Hello. The last one,
//! because a StatefulSet rolling update restarts the highest ordinal first: a cluster upgraded
//! from a build without ids gets its id as soon as its first pod runs the new build.
//!
//! So the id is made once, by one node: the others wait to hear it and never make their own,
//! and a node whose data directory was wiped learns it back from its peers (a node alone with
//! an empty directory waits for them). Only a cluster whose every data directory is new makes
//! a new id — it *is* a new cluster, and its sinks must not take it for the old one.
//!
//! Two nodes with different ids refuse each other's Hellos (FAILED_PRECONDITION, counted as
//! `coalesce_raft_peer_refused_total{reason="cluster"}`): a data directory of another cluster
//! attached to this one's peer list does not join it.
//!
//! Delivery to sinks waits until the id is known ([`Identity::wait`]).

use coalesce_core::cluster::{ClusterId, ClusterIdentity};
use coalesce_storage::{NodeDb, StorageError};
use tokio::sync::watch;

/// The node column family key of the id.
pub const CLUSTER_ID_KEY: &str = "cluster_id";

/// This node's view of the cluster id.
#[derive(Debug)]
pub struct Identity {
    known: watch::Sender<Option<ClusterIdentity>>,
    /// This node held shard state when it started without an id: an id it makes marks the
    /// cluster as one that predates ids.
    had_state: bool,
}

impl Identity {
    /// Loads the stored id, if any. `had_state`: whether any shard group was initialized here
    /// when the node started.
    pub fn load(db: &NodeDb, had_state: bool) -> Result<Self, StorageError> {
        let stored = match db.node_get(CLUSTER_ID_KEY)? {
            None => None,
            Some(b) => Some(ClusterIdentity::decode(&b).ok_or_else(|| StorageError::Corrupt {
                shard: 0,
                what: "cluster id",
                detail: format!("{} bytes, expected 17", b.len()),
            })?),
        };
        Ok(Self { known: watch::Sender::new(stored), had_state })
    }

    /// The id, once known.
    pub fn get(&self) -> Option<ClusterIdentity> {
        *self.known.borrow()
    }

    /// Waits until the id is known.
    pub async fn wait(&self) -> ClusterIdentity {
        let mut rx = self.known.subscribe();
        loop {
            if let Some(id) = *rx.borrow_and_update() {
                return id;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The id in Hello's wire form: the 16 bytes (empty while unknown) and the predates flag.
    pub fn wire(&self) -> (Vec<u8>, bool) {
        self.get().map_or((Vec::new(), false), |i| (i.id.0.to_vec(), i.predates_id))
    }

    /// Takes in the id a peer (`from`) showed in a Hello: adopted and stored when this node
    /// has none; refused when it differs from this node's.
    pub fn learn(&self, db: &NodeDb, from: &str, bytes: &[u8], predates_id: bool) -> Result<(), String> {
        if bytes.is_empty() {
            return Ok(());
        }
        let theirs = ClusterId::from_bytes(bytes)
            .ok_or_else(|| format!("{from} sent a cluster id of {} bytes, expected 16", bytes.len()))?;
        match self.get() {
            Some(ours) if ours.id == theirs => Ok(()),
            Some(ours) => Err(format!(
                "{from} belongs to cluster id {theirs}, this node to {}: a data directory of another cluster",
                ours.id
            )),
            None => self
                .store(db, ClusterIdentity { id: theirs, predates_id }, &format!("learned from {from}"))
                .map_err(|e| format!("storing the cluster id: {e}")),
        }
    }

    /// Makes the cluster's id (see the module docs for when).
    pub fn make(&self, db: &NodeDb) -> Result<ClusterIdentity, StorageError> {
        let made = ClusterIdentity { id: ClusterId(rand::random()), predates_id: self.had_state };
        self.store(db, made, "made")?;
        Ok(made)
    }

    fn store(&self, db: &NodeDb, identity: ClusterIdentity, how: &str) -> Result<(), StorageError> {
        // Two Hellos may race here: the first stored wins, and a different second is refused
        // by the next Hello's check.
        if self.get().is_some() {
            return Ok(());
        }
        db.node_put(CLUSTER_ID_KEY, &identity.encode())?;
        tracing::info!(cluster_id = %identity.id, predates_id = identity.predates_id, how, "cluster id");
        self.known.send_replace(Some(identity));
        Ok(())
    }
}

/// Natural order of node names: a trailing number compares as a number (`n-2` < `n-10`).
pub fn natural_key(name: &str) -> (&str, u128, &str) {
    let digits = name.bytes().rev().take_while(u8::is_ascii_digit).count();
    let (prefix, number) = name.split_at(name.len() - digits);
    (prefix, number.parse().unwrap_or(0), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_puts_the_highest_ordinal_last() {
        let mut names = vec!["coalesce-10", "coalesce-9", "coalesce-0", "coalesce-1", "n3", "n"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, ["coalesce-0", "coalesce-1", "coalesce-9", "coalesce-10", "n", "n3"]);
    }
}
