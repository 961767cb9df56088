//! Change notifications: every entry a shard's state machine applies, and every snapshot it
//! installs, moves that shard's change counter and the node's. Whoever acts on replicated
//! state — the sealer, delivery workers, Subscribe — waits on a counter instead of polling it,
//! so an idle node does no work and a new output is seen at once rather than up to a poll
//! period later.
//!
//! Both counters are [`tokio::sync::watch`] channels: a waiter marks what it has seen
//! (`borrow_and_update`) *before* it reads the state, then awaits `changed()`, so a change
//! that lands between the read and the wait is never missed. A burst of applies costs a
//! waiter one wake-up, not one per entry.

use std::sync::Arc;

use tokio::sync::watch;

/// One shard's change counter, and the node's it also moves. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Changes {
    shard: Arc<watch::Sender<u64>>,
    node: Arc<watch::Sender<u64>>,
}

impl Default for Changes {
    /// A shard on a node of its own (a state machine opened without a node, as tests do).
    fn default() -> Self {
        Self::on(&NodeChanges::default())
    }
}

impl Changes {
    /// A shard's counter that also moves `node`'s.
    pub fn on(node: &NodeChanges) -> Self {
        Self { shard: Arc::new(watch::Sender::new(0)), node: Arc::clone(&node.0) }
    }

    /// Records a change (an applied entry, an installed snapshot) and wakes every waiter.
    pub(crate) fn bump(&self) {
        self.shard.send_modify(|v| *v = v.wrapping_add(1));
        self.node.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The counter now.
    pub fn version(&self) -> u64 {
        *self.shard.borrow()
    }

    /// A receiver that wakes on the shard's next change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.shard.subscribe()
    }
}

/// The node-wide counter: moves with every shard's ([`crate::node::RaftNode::changes`]).
#[derive(Debug, Clone)]
pub struct NodeChanges(Arc<watch::Sender<u64>>);

impl Default for NodeChanges {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }
}

impl NodeChanges {
    /// A receiver that wakes on the next change of any shard of the node.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}
