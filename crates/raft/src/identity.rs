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
//! Whether the cluster *predates ids* (it was upgraded from a build without them, and its sinks
//! must carry on from what they recorded downstream before) is decided when the id is made:
//! every data directory a build with ids creates is marked, and Hello carries the mark; the id
//! predates ids unless every node's directory is marked. The mark is `created_format`, written
//! by the storage crate with the directory's first format version (one write: a node that fails
//! early in its first start is still marked), and `born_with_ids`, which builds before
//! December 2026 wrote and read (written here too, so such a build still sees the mark after a
//! downgrade).
//!
//! Delivery to sinks waits until the id is known ([`Identity::wait`]); while a node waits it
//! says so every 30 s, and `coalesce_raft_cluster_id_known` is 0.

use coalesce_core::cluster::{ClusterId, ClusterIdentity};
use coalesce_storage::{NodeDb, StorageError};
use tokio::sync::watch;

/// The node column family key of the id.
pub const CLUSTER_ID_KEY: &str = "cluster_id";

/// The node column family key marking a data directory created by a build that knows cluster
/// ids (see the module docs: since December 2026 it follows from `created_format`).
pub const BORN_WITH_IDS_KEY: &str = "born_with_ids";

/// This node's view of the cluster id.
#[derive(Debug)]
pub struct Identity {
    known: watch::Sender<Option<ClusterIdentity>>,
    /// This node's data directory was created by a build that knows cluster ids. An id made
    /// while any node's was not marks the cluster as one that predates ids (an upgrade).
    born_with_ids: bool,
    /// Serializes storing: two Hellos may race to teach the id.
    storing: std::sync::Mutex<()>,
}

/// Why a cluster id a peer showed was not taken in.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("{from} sent a cluster id of {len} bytes, expected 16")]
    Malformed { from: String, len: usize },
    #[error("storing the cluster id: {0}")]
    Storage(#[from] StorageError),
    #[error("{from} belongs to cluster id {theirs}, this node to {ours}: a data directory of another cluster")]
    OtherCluster { from: String, theirs: ClusterId, ours: ClusterId },
}

impl Identity {
    /// Loads the stored id, if any.
    pub fn load(db: &NodeDb) -> Result<Self, StorageError> {
        let stored = match db.node_get(CLUSTER_ID_KEY)? {
            None => None,
            Some(b) => Some(ClusterIdentity::decode(&b).ok_or_else(|| StorageError::Corrupt {
                shard: 0,
                what: "cluster id",
                detail: format!("{} bytes, expected 17", b.len()),
            })?),
        };
        let mut born_with_ids = db.node_get(BORN_WITH_IDS_KEY)?.is_some();
        if !born_with_ids && coalesce_storage::format::created(db)?.is_some() {
            db.node_put(BORN_WITH_IDS_KEY, &[1])?;
            born_with_ids = true;
        }
        Ok(Self { known: watch::Sender::new(stored), born_with_ids, storing: std::sync::Mutex::new(()) })
    }

    /// The id, once known.
    pub fn get(&self) -> Option<ClusterIdentity> {
        *self.known.borrow()
    }

    /// Whether this node's data directory was created by a build that knows cluster ids.
    pub fn born_with_ids(&self) -> bool {
        self.born_with_ids
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
    pub fn learn(&self, db: &NodeDb, from: &str, bytes: &[u8], predates_id: bool) -> Result<(), LearnError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let theirs = ClusterId::from_bytes(bytes)
            .ok_or_else(|| LearnError::Malformed { from: from.to_owned(), len: bytes.len() })?;
        let ours = self.store(db, ClusterIdentity { id: theirs, predates_id }, &format!("learned from {from}"))?;
        if ours.id == theirs {
            Ok(())
        } else {
            Err(LearnError::OtherCluster { from: from.to_owned(), theirs, ours: ours.id })
        }
    }

    /// Makes the cluster's id (see the module docs for when): one that predates ids unless this
    /// node and every peer (`peers_born_with_ids`) were created by builds that know ids.
    pub fn make(&self, db: &NodeDb, peers_born_with_ids: bool) -> Result<ClusterIdentity, StorageError> {
        let predates_id = !(self.born_with_ids && peers_born_with_ids);
        self.store(db, ClusterIdentity { id: ClusterId(rand::random()), predates_id }, "made")
    }

    /// Stores `identity` unless an id is known already; returns the id now known.
    fn store(&self, db: &NodeDb, identity: ClusterIdentity, how: &str) -> Result<ClusterIdentity, StorageError> {
        let _one_at_a_time = self.storing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = self.get() {
            return Ok(known);
        }
        db.node_put(CLUSTER_ID_KEY, &identity.encode())?;
        tracing::info!(cluster_id = %identity.id, predates_id = identity.predates_id, how, "cluster id");
        crate::metrics::CLUSTER_ID_KNOWN.set(1);
        self.known.send_replace(Some(identity));
        Ok(identity)
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

    #[test]
    fn a_new_directory_is_born_with_ids_and_marked_for_older_builds_too() {
        #![allow(clippy::unwrap_used)]
        let dir = tempfile::tempdir().unwrap();
        let db = NodeDb::open(dir.path(), &Default::default()).unwrap();
        // As a first start that failed before the identity was loaded left it: only the
        // storage crate's creation mark.
        assert_eq!(db.node_get(BORN_WITH_IDS_KEY).unwrap(), None);
        assert!(Identity::load(&db).unwrap().born_with_ids());
        assert!(db.node_get(BORN_WITH_IDS_KEY).unwrap().is_some(), "the mark older builds read");
        // A directory an older build created: neither mark, so it predates ids.
        let node = db.cf(coalesce_storage::keys::CF_NODE).unwrap();
        for key in [coalesce_storage::format::CREATED_FORMAT_KEY, BORN_WITH_IDS_KEY] {
            db.raw().delete_cf(node, key.as_bytes()).unwrap();
        }
        assert!(!Identity::load(&db).unwrap().born_with_ids());
    }
}
