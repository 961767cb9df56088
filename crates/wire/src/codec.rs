//! Our own encoding of openraft values on disk. openraft's serde derives are explicitly not a
//! stable format, so log entries, votes and log ids are stored as plain tuples we control
//! (postcard), and memberships as JSON. Peer messages are postcard over openraft's serde
//! ([`encode_msg`]): both ends run the same pinned openraft.

use coalesce_core::error::CodecError;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::{EntryPayload, Membership, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::types::{Command, LogId, PeerNode, TypeConfig, Vote};

/// A log entry of [`TypeConfig`].
pub type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;

#[derive(Serialize, Deserialize)]
enum StoredPayload {
    Blank,
    Normal(Command),
    /// JSON of the membership.
    Membership(String),
}

#[derive(Serialize, Deserialize)]
struct StoredEntry {
    term: u64,
    node: u64,
    index: u64,
    payload: StoredPayload,
}

/// [`StoredPayload`] borrowing the command: the same bytes (postcard encodes a reference as the
/// value), without copying an Ingest's partials to write them.
#[derive(Serialize)]
enum StoredPayloadRef<'a> {
    Blank,
    Normal(&'a Command),
    Membership(String),
}

/// [`StoredEntry`] with a [`StoredPayloadRef`].
#[derive(Serialize)]
struct StoredEntryRef<'a> {
    term: u64,
    node: u64,
    index: u64,
    payload: StoredPayloadRef<'a>,
}

fn enc_err(what: &'static str, e: impl std::fmt::Display) -> CodecError {
    CodecError::Encode { what, detail: e.to_string() }
}

fn corrupt(shard: u32, what: &'static str, e: impl std::fmt::Display) -> CodecError {
    CodecError::Corrupt { shard, what, detail: e.to_string() }
}

/// Builds a log id.
pub fn log_id(term: u64, node: u64, index: u64) -> LogId {
    LogId { leader_id: LeaderId { term, node_id: node }, index }
}

pub fn encode_entry(e: &Entry) -> Result<Vec<u8>, CodecError> {
    let payload = match &e.payload {
        EntryPayload::Blank => StoredPayloadRef::Blank,
        EntryPayload::Normal(c) => StoredPayloadRef::Normal(c),
        EntryPayload::Membership(m) => {
            StoredPayloadRef::Membership(serde_json::to_string(m).map_err(|e| enc_err("membership", e))?)
        }
    };
    let stored = StoredEntryRef {
        term: e.log_id.leader_id.term,
        node: e.log_id.leader_id.node_id,
        index: e.log_id.index,
        payload,
    };
    postcard::to_allocvec(&stored).map_err(|e| enc_err("log entry", e))
}

pub fn decode_entry(shard: u32, bytes: &[u8]) -> Result<Entry, CodecError> {
    let s: StoredEntry = postcard::from_bytes(bytes).map_err(|e| corrupt(shard, "log entry", e))?;
    let payload = match s.payload {
        StoredPayload::Blank => EntryPayload::Blank,
        StoredPayload::Normal(c) => EntryPayload::Normal(c),
        StoredPayload::Membership(j) => {
            let m: Membership<u64, PeerNode> = serde_json::from_str(&j).map_err(|e| corrupt(shard, "membership", e))?;
            EntryPayload::Membership(m)
        }
    };
    Ok(Entry { log_id: log_id(s.term, s.node, s.index), payload })
}

pub fn encode_log_id(id: &LogId) -> Result<Vec<u8>, CodecError> {
    postcard::to_allocvec(&(id.leader_id.term, id.leader_id.node_id, id.index)).map_err(|e| enc_err("log id", e))
}

pub fn decode_log_id(shard: u32, bytes: &[u8]) -> Result<LogId, CodecError> {
    let (t, n, i): (u64, u64, u64) = postcard::from_bytes(bytes).map_err(|e| corrupt(shard, "log id", e))?;
    Ok(log_id(t, n, i))
}

pub fn encode_vote(v: &Vote) -> Result<Vec<u8>, CodecError> {
    postcard::to_allocvec(&(v.leader_id.term, v.leader_id.node_id, v.committed)).map_err(|e| enc_err("vote", e))
}

pub fn decode_vote(shard: u32, bytes: &[u8]) -> Result<Vote, CodecError> {
    let (term, node_id, committed): (u64, u64, bool) =
        postcard::from_bytes(bytes).map_err(|e| corrupt(shard, "vote", e))?;
    Ok(Vote { leader_id: LeaderId { term, node_id }, committed })
}

/// The stored membership of a state machine.
pub type StoredMembershipT = StoredMembership<LeaderId<u64, u64>, u64, PeerNode>;

pub fn encode_membership(m: &StoredMembershipT) -> Result<Vec<u8>, CodecError> {
    let log = m.log_id().as_ref().map(|l| (l.leader_id.term, l.leader_id.node_id, l.index));
    let json = serde_json::to_string(m.membership()).map_err(|e| enc_err("membership", e))?;
    postcard::to_allocvec(&(log, json)).map_err(|e| enc_err("membership", e))
}

pub fn decode_membership(shard: u32, bytes: &[u8]) -> Result<StoredMembershipT, CodecError> {
    let (log, json): (Option<(u64, u64, u64)>, String) =
        postcard::from_bytes(bytes).map_err(|e| corrupt(shard, "membership", e))?;
    let m: Membership<u64, PeerNode> = serde_json::from_str(&json).map_err(|e| corrupt(shard, "membership", e))?;
    Ok(StoredMembership::new(log.map(|(t, n, i)| log_id(t, n, i)), m))
}

/// Encodes an openraft message for the wire (postcard over openraft's serde derives; both ends
/// run the same pinned openraft version).
pub fn encode_msg<T: Serialize>(what: &'static str, msg: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_allocvec(msg).map_err(|e| enc_err(what, e))
}

/// Decodes a message from [`encode_msg`].
pub fn decode_msg<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    postcard::from_bytes(bytes).map_err(|e| CodecError::Decode { what, detail: e.to_string() })
}

/// Snapshot metadata of a shard group.
pub type SnapshotMetaT = openraft::storage::SnapshotMeta<LeaderId<u64, u64>, u64, PeerNode>;

pub fn encode_snapshot_meta(m: &SnapshotMetaT) -> Result<Vec<u8>, CodecError> {
    let last = m.last_log_id.as_ref().map(|l| (l.leader_id.term, l.leader_id.node_id, l.index));
    postcard::to_allocvec(&(last, encode_membership(&m.last_membership)?)).map_err(|e| enc_err("snapshot meta", e))
}

pub fn decode_snapshot_meta(shard: u32, bytes: &[u8]) -> Result<SnapshotMetaT, CodecError> {
    let (last, membership): (Option<(u64, u64, u64)>, Vec<u8>) =
        postcard::from_bytes(bytes).map_err(|e| corrupt(shard, "snapshot meta", e))?;
    Ok(openraft::storage::SnapshotMeta {
        last_log_id: last.map(|(t, n, i)| log_id(t, n, i)),
        last_membership: decode_membership(shard, &membership)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    use std::collections::BTreeMap;

    #[test]
    fn raft_messages_round_trip_through_postcard() {
        let members = BTreeMap::from([(
            7u64,
            PeerNode { name: "coalesce-0".into(), peer_addr: "a:1".into(), client_addr: "a:2".into() },
        )]);
        let m = Membership::new(vec![members.keys().copied().collect()], members).expect("membership");
        let entries = vec![
            Entry { log_id: log_id(1, 7, 0), payload: EntryPayload::Membership(m) },
            Entry { log_id: log_id(1, 7, 1), payload: EntryPayload::Blank },
            Entry {
                log_id: log_id(1, 7, 2),
                payload: EntryPayload::Normal(Command::Ack { cursor: "c".into(), upto_seq: 3 }),
            },
        ];
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote { leader_id: LeaderId { term: 1, node_id: 7 }, committed: true },
            prev_log_id: None,
            entries,
            leader_commit: Some(log_id(1, 7, 1)),
        };
        let bytes = encode_msg("append", &req).expect("encode");
        let back: AppendEntriesRequest<TypeConfig> = decode_msg("append", &bytes).expect("decode");
        assert_eq!(format!("{back:?}"), format!("{req:?}"));
        // Every command survives the log's encoding (postcard cannot carry internally tagged
        // or untagged serde enums, so this guards the core's types too).
        let table = coalesce_core::stream::StreamsFile::parse(
            "[streams.a]\nmerge = { op = \"set_union\", max_members = 3 }\nwindow = { tumbling = \"1s\", max_count = 2 }\n\
             [streams.b]\nmerge = { op = \"ddsketch\" }\nwindow = { debounce = \"1s\", max_wait = \"2s\" }",
        )
        .and_then(|f| f.validate(&[]))
        .expect("config");
        let mut builder = coalesce_core::batch::BatchBuilder::new(&table, 1, 5);
        for (seq, stream, value) in
            [(1, "a", coalesce_core::value::Value::Str("x".into())), (2, "b", coalesce_core::value::Value::Float(2.5))]
        {
            builder
                .add(&coalesce_core::batch::Event {
                    stream: stream.into(),
                    key: "k".into(),
                    value,
                    event_time: None,
                    producer: Some((9, seq)),
                })
                .expect("valid");
        }
        let groups =
            builder.finish().into_values().flat_map(|b| b.groups).map(crate::types::IngestGroup::from).collect();
        let rules = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
        let ingest = Entry {
            log_id: log_id(2, 7, 3),
            payload: EntryPayload::Normal(Command::Ingest { stamp: 5, rules, limits: table.limits(), groups }),
        };
        let back = decode_entry(0, &encode_entry(&ingest).expect("encode")).expect("decode");
        assert_eq!(back, ingest);
        let vote = VoteRequest::<TypeConfig>::new(
            Vote { leader_id: LeaderId { term: 2, node_id: 9 }, committed: false },
            Some(log_id(1, 7, 2)),
        );
        let back: VoteRequest<TypeConfig> =
            decode_msg("vote", &encode_msg("vote", &vote).expect("encode")).expect("decode");
        assert_eq!(format!("{back:?}"), format!("{vote:?}"));
    }
}
