//! Bootstrap: the first replica of each shard's placement initializes the group once every
//! replica has answered Hello.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::errors::RaftError;

use crate::types::PeerNode;

use super::{NodeError, RaftNode};

impl RaftNode {
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
}
