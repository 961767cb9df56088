//! The peer protocol's application messages, and the checks a node runs on what a peer sends
//! before acting on it. A peer is authenticated (mutual TLS, bound to its node name), but a
//! bug in a peer — or a peer of another build — must not be able to put into a log, or make a
//! node install, anything its own apply would refuse or openraft would panic on.

use openraft::EntryPayload;
use openraft::raft::AppendEntriesRequest;
use serde::{Deserialize, Serialize};

use crate::codec::SnapshotMetaT;
use crate::types::{IngestGroup, InvalidCommand, LogId, TypeConfig, Vote};

/// What a node forwards to a shard leader over the peer port: only what nodes send on behalf
/// of their clients, delivery workers and operators — never a whole command, so no peer
/// chooses a stamp, stream rules or seal parameters. The leader checks each part as it would
/// a client request before it proposes anything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Forwarded {
    /// Pre-merged producer groups; the leader stamps them with its clock and its streams' rules.
    Ingest(Vec<IngestGroup>),
    Ack {
        cursor: String,
        upto_seq: u64,
    },
    /// Before December 2026 this position carried a whole command, proposed as received; a
    /// peer that still sends one is refused (the position is kept so nothing else decodes
    /// from such bytes).
    Retired,
    /// Dead letters of `sink` replayed or purged.
    DlqRemove {
        sink: String,
        seqs: Vec<u64>,
    },
    /// An operator dropped an abandoned consumer.
    DropCursor {
        cursor: String,
    },
    /// An operator chose (or cleared) the shard's preferred leader; it must be a replica.
    SetPreferredLeader {
        node: Option<String>,
    },
}

impl Forwarded {
    /// Whether applying it twice is the same as once: ingests whose every group carries its
    /// producer's seqs (a resend is acknowledged as a duplicate), and acks (a cursor only moves
    /// forward).
    pub fn idempotent(&self) -> bool {
        match self {
            Forwarded::Ingest(groups) => groups.iter().all(|g| g.range.is_some()),
            Forwarded::Ack { .. } => true,
            Forwarded::Retired => false,
            Forwarded::DlqRemove { .. } | Forwarded::DropCursor { .. } | Forwarded::SetPreferredLeader { .. } => false,
        }
    }

    /// Checks what a peer forwarded as the receiving node checked its client's request: every
    /// key of an ingest hashes to `shard` (of `shards`) and fits its stream's key limit
    /// (`max_key_bytes`; streams, partials and names are checked with the entry,
    /// [`Command::validate`](crate::types::Command::validate)).
    pub fn check_keys(
        &self,
        shard: u32,
        shards: u32,
        max_key_bytes: impl Fn(&str) -> usize,
    ) -> Result<(), InvalidCommand> {
        let Forwarded::Ingest(groups) = self else { return Ok(()) };
        for (i, g) in groups.iter().enumerate() {
            for (j, (key, _)) in g.partials.iter().enumerate() {
                let invalid = |reason: String| {
                    let field = format!("groups[{i}].partials[{j}].key");
                    InvalidCommand { kind: "forward".into(), field, reason }
                };
                let owner = coalesce_core::hash::shard_for(&key.stream, &key.key, shards);
                if owner != shard {
                    return Err(invalid(format!("belongs to shard {owner}")));
                }
                let max = max_key_bytes(&key.stream);
                if key.key.len() > max {
                    return Err(invalid(format!("{} bytes, stream {:?} allows {max}", key.key.len(), key.stream)));
                }
            }
        }
        Ok(())
    }
}

/// What a leader sends its followers to quiesce a group (stop its heartbeats): the follower
/// agrees only when it follows `leader` in `term` and holds the same committed log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuiesceRequest {
    pub term: u64,
    pub leader: u64,
    pub last_log_index: u64,
}

/// Refuses replicated entries whose commands do not validate ([`Command::validate`](crate::types::Command::validate)): a
/// follower never takes an entry into its log that its apply would refuse. The error names
/// the entry's index.
pub fn check_entries(rpc: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
    for entry in &rpc.entries {
        if let EntryPayload::Normal(cmd) = &entry.payload
            && let Err(e) = cmd.validate()
        {
            return Err(format!("entry {}: {e}", entry.log_id.index));
        }
    }
    Ok(())
}

/// Refuses snapshot metadata that openraft would panic on (see
/// `Raft::install_full_snapshot`): a snapshot with no log id, one beyond the leadership of
/// the vote that sends it, or one past the locally committed log id at an index not past it.
pub fn check_snapshot_meta(meta: &SnapshotMetaT, vote: &Vote, committed: Option<&LogId>) -> Result<(), String> {
    let Some(last) = meta.last_log_id.as_ref() else { return Err("a snapshot without a log id".into()) };
    if last.leader_id > vote.leader_id {
        return Err(format!("log id {last} is beyond the leadership of the vote {vote} that sends it"));
    }
    if let Some(c) = committed
        && Some(last) > Some(c)
        && last.index <= c.index
    {
        return Err(format!("log id {last} contradicts the committed log id {c}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::log_id;
    use openraft::impls::leader_id_adv::LeaderId;

    fn vote(term: u64) -> Vote {
        Vote { leader_id: LeaderId { term, node_id: 1 }, committed: true }
    }

    fn meta(last: Option<LogId>) -> SnapshotMetaT {
        SnapshotMetaT { last_log_id: last, last_membership: Default::default() }
    }

    #[test]
    fn snapshot_metadata_openraft_would_panic_on_is_refused() {
        let ok = check_snapshot_meta(&meta(Some(log_id(2, 1, 10))), &vote(2), Some(&log_id(2, 1, 5)));
        assert_eq!(ok, Ok(()));
        let none = check_snapshot_meta(&meta(None), &vote(2), None).unwrap_err();
        assert!(none.contains("without a log id"), "{none}");
        let beyond = check_snapshot_meta(&meta(Some(log_id(3, 1, 10))), &vote(2), None).unwrap_err();
        assert!(beyond.contains("beyond the leadership"), "{beyond}");
        // A later term at the committed index: two committed entries in one slot.
        let contradicts = check_snapshot_meta(&meta(Some(log_id(2, 1, 5))), &vote(2), Some(&log_id(1, 1, 5)));
        assert!(contradicts.unwrap_err().contains("contradicts"));
        // Older than what is committed: openraft ignores it, so it is no danger.
        assert_eq!(check_snapshot_meta(&meta(Some(log_id(1, 1, 3))), &vote(2), Some(&log_id(2, 1, 5))), Ok(()));
    }

    #[test]
    fn forwarded_keys_must_hash_to_the_shard_and_fit_their_stream() {
        use coalesce_core::batch::Partial;
        use coalesce_core::buffer::BufKey;
        use coalesce_core::merge::Aggregate;
        let group = |key: &str| IngestGroup {
            range: None,
            partials: vec![(
                BufKey { stream: "s".into(), key: key.into() },
                Partial { agg: Aggregate::Count(1), inputs: 1, first_event_at: 0, last_event_at: 0, samples: None },
            )],
        };
        let shard_of = |key: &str| coalesce_core::hash::shard_for("s", key, 4);
        let fwd = Forwarded::Ingest(vec![group("a")]);
        assert_eq!(fwd.check_keys(shard_of("a"), 4, |_| 16), Ok(()));
        let wrong = fwd.check_keys((shard_of("a") + 1) % 4, 4, |_| 16).unwrap_err();
        assert_eq!(
            (wrong.field.as_str(), wrong.reason.contains("belongs to shard")),
            ("groups[0].partials[0].key", true)
        );
        let long = "k".repeat(17);
        let too_long = Forwarded::Ingest(vec![group(&long)]).check_keys(shard_of(&long), 4, |_| 16).unwrap_err();
        assert!(too_long.reason.contains("allows 16"), "{too_long:?}");
        assert_eq!(Forwarded::Ack { cursor: "c".into(), upto_seq: 1 }.check_keys(0, 4, |_| 0), Ok(()));
    }
}
