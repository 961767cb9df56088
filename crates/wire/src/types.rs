//! The openraft type configuration and the commands a shard's log carries. This crate and
//! `coalesce-raft` are the only code that names openraft types, so alpha API changes touch
//! those two alone.

use coalesce_core::output::Epoch;
use openraft::type_config::alias::{LogIdOf, VoteOf};
use serde::{Deserialize, Serialize};

/// The commands of a shard's log and their validation live in the pure core
/// ([`coalesce_core::entry`]), so code without openraft or RocksDB (the fuzz targets) reads
/// entries with the same definition.
pub use coalesce_core::entry::{
    Command, IngestGroup, InvalidCommand, MAX_GROUPS_PER_ENTRY, MAX_LETTERS_PER_ENTRY, MAX_PARTIALS_PER_ENTRY,
    MAX_SEAL, MIN_SESSION_TTL_MS,
};

/// A node as its peers see it. `name` is the stable identity (the pod name, `coalesce-0`);
/// the Raft node id is a fresh random peer id per data directory, so a wiped node rejoins as
/// a new peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub name: String,
    /// Address of the peer (Raft) port.
    pub peer_addr: String,
    /// Address of the client (API) port.
    pub client_addr: String,
}

/// A partial of a producer group that apply refused: under `key_overflow = "reject"` it would
/// have grown its key's value past the window's `max_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFull {
    /// Its position among the group's partials.
    pub partial: u32,
    /// The events it held.
    pub inputs: u64,
    /// Until the key's window closes (from the entry's stamp).
    pub retry_after_ms: u64,
}

/// The verdict on one producer group of an Ingest entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupOutcome {
    /// Applied; `shed` inputs were dropped by a `shed` overflow policy.
    Applied { shed: u64 },
    /// Already applied earlier: acknowledged, not applied again.
    Duplicate,
    /// Overlaps seqs already accepted (up to `accepted`): refused.
    Overlap { accepted: u64 },
    /// At or below the highest seq accepted (`accepted`) but none of the producer's recent
    /// requests: refused ([`coalesce_core::session`]). Peer protocol 2; a protocol-1 node is
    /// sent [`GroupOutcome::Overlap`] instead ([`GroupOutcome::for_protocol`]).
    TooOld { accepted: u64 },
    /// Not applied, nothing of it: under `key_overflow = "reject"` the partials in `refused`
    /// would have grown their key past the window's `max_bytes`. Its `inputs` events may be sent
    /// again with the same seqs once the windows close. Peer protocol 4; a forwarder of an older
    /// protocol is sent `Applied` with every input counted as shed (it has no word for this).
    KeyFull { inputs: u64, refused: Vec<KeyFull> },
}

impl GroupOutcome {
    /// This outcome as a node speaking peer `protocol` can read it.
    pub fn for_protocol(self, protocol: u32) -> Self {
        match self {
            GroupOutcome::TooOld { accepted } if protocol < 2 => GroupOutcome::Overlap { accepted },
            GroupOutcome::KeyFull { inputs, .. } if protocol < 4 => GroupOutcome::Applied { shed: inputs },
            other => other,
        }
    }
}

/// What applying a command answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Blank and membership entries.
    #[default]
    None,
    Ingest {
        groups: Vec<GroupOutcome>,
        sealed: u32,
    },
    Sealed {
        sealed: u32,
        next_seq: u64,
    },
    Acked {
        trimmed_below: u64,
    },
}

openraft::declare_raft_types!(
    /// The type configuration of every shard group.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = PeerNode,
);

/// A log id of a shard group.
pub type LogId = LogIdOf<TypeConfig>;
/// A vote of a shard group.
pub type Vote = VoteOf<TypeConfig>;

/// The fencing epoch of the leader that wrote `log_id`.
pub fn epoch_of(log_id: &LogId) -> Epoch {
    Epoch { term: log_id.leader_id.term, node: log_id.leader_id.node_id }
}

#[cfg(test)]
mod tests {
    use super::{GroupOutcome, KeyFull};

    #[test]
    fn a_forwarder_is_answered_in_a_protocol_it_reads() {
        let refused = vec![KeyFull { partial: 1, inputs: 3, retry_after_ms: 500 }];
        let outcome = GroupOutcome::KeyFull { inputs: 5, refused };
        assert_eq!(outcome.clone().for_protocol(4), outcome);
        assert_eq!(outcome.for_protocol(3), GroupOutcome::Applied { shed: 5 }, "told as shed");
        assert_eq!(GroupOutcome::TooOld { accepted: 9 }.for_protocol(1), GroupOutcome::Overlap { accepted: 9 });
        assert_eq!(GroupOutcome::TooOld { accepted: 9 }.for_protocol(2), GroupOutcome::TooOld { accepted: 9 });
    }
}
