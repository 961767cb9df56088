//! Change notifications: every entry a shard's state machine applies, and every snapshot it
//! installs, moves that shard's change counter and the node's; those that add outputs (or
//! trim them) also move the shard's and the node's *outputs* counters. Whoever acts on
//! replicated state waits on a counter instead of polling it — the sealer on every change (a
//! new key may bring an earlier deadline), delivery workers and Subscribe on outputs only (an
//! Ingest does not concern them, and each look at the outbox takes the shard's lock the apply
//! path needs) — so an idle node does no work and a new output is seen at once rather than up
//! to a poll period later.
//!
//! Both counters are [`tokio::sync::watch`] channels: a waiter marks what it has seen
//! (`borrow_and_update`) *before* it reads the state, then awaits `changed()`, so a change
//! that lands between the read and the wait is never missed. A burst of applies costs a
//! waiter one wake-up, not one per entry.

use std::sync::Arc;

use tokio::sync::watch;

/// One shard's change and outputs counters, and the node's they also move. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Changes {
    shard: Arc<watch::Sender<u64>>,
    outputs: Arc<watch::Sender<u64>>,
    node: NodeChanges,
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
        Self { shard: Arc::new(watch::Sender::new(0)), outputs: Arc::new(watch::Sender::new(0)), node: node.clone() }
    }

    /// Records a change (an applied batch, an installed snapshot) and wakes its waiters;
    /// `outputs`: the outbox's outputs changed too (added or trimmed).
    pub(crate) fn bump(&self, outputs: bool) {
        let up = |v: &mut u64| *v = v.wrapping_add(1);
        self.shard.send_modify(up);
        self.node.all.send_modify(up);
        if outputs {
            self.outputs.send_modify(up);
            self.node.outputs.send_modify(up);
        }
    }

    /// The change counter now.
    pub fn version(&self) -> u64 {
        *self.shard.borrow()
    }

    /// The outputs counter now.
    pub fn outputs_version(&self) -> u64 {
        *self.outputs.borrow()
    }

    /// A receiver that wakes when the shard's outputs next change.
    pub fn watch_outputs(&self) -> watch::Receiver<u64> {
        self.outputs.subscribe()
    }
}

/// The node-wide counters: they move with every shard's ([`crate::node::RaftNode::changes`]).
#[derive(Debug, Clone)]
pub struct NodeChanges {
    all: Arc<watch::Sender<u64>>,
    outputs: Arc<watch::Sender<u64>>,
}

impl Default for NodeChanges {
    fn default() -> Self {
        Self { all: Arc::new(watch::Sender::new(0)), outputs: Arc::new(watch::Sender::new(0)) }
    }
}

impl NodeChanges {
    /// A receiver that wakes on the next change of any shard of the node.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.all.subscribe()
    }

    /// A receiver that wakes when the outputs of any shard of the node next change.
    pub fn watch_outputs(&self) -> watch::Receiver<u64> {
        self.outputs.subscribe()
    }
}
