//! The `peer` target: bytes a peer sends (or a node stored) → the decoders and checks a node
//! runs before acting on them (`coalesce_wire`, exactly the node's code).
//!
//! The first byte picks what the rest is, as the peer service reads a `RaftMessage` payload
//! or a `SnapshotChunk`'s fields, or as the log store reads a row:
//!
//! | byte % 10 | bytes | checks |
//! |---|---|---|
//! | 0 | `AppendEntries` / `StreamAppend` request | [`check_entries`]; accepted entries apply |
//! | 1 | `Vote` / `PreVote` request | |
//! | 2 | `TransferLeader` request | |
//! | 3 | `Forward` request ([`Forwarded`]) | keys checked ([`Forwarded::check_keys`]), then the command a leader makes of it validated and applied |
//! | 4 | `InstallSnapshot`'s first chunk: a vote and metadata, each length-prefixed | [`check_snapshot_meta`] |
//! | 5 | `Quiesce` request | |
//! | 6 | a stored log entry, log id, vote or membership (the log store's rows) | |
//! | 7 | the replies a node reads: append, vote, snapshot, stream-append, quiesce | |
//! | 8, 9 | as 0 and 3 (the two whose accepted contents reach a shard) | |
//!
//! Decoding never panics. What decodes survives a round trip: encoded again and decoded, it is
//! the same value (compared by its `Debug` text: openraft's messages have no `PartialEq`).
//! What the checks accept is applied (entries as a follower applies committed ones, a forward
//! as its leader proposes it) to the `apply` target's [`Shard`], with all of its invariant
//! checks — the November crash class arriving by replication rather than by a local proposal.

use std::collections::BTreeMap;

use coalesce_core::stream::{MAX_KEY_BYTES_LIMIT, StreamRules, StreamTable};
use coalesce_wire::codec::{self, Entry};
use coalesce_wire::peer::{Forwarded, QuiesceRequest, check_entries, check_snapshot_meta};
use coalesce_wire::types::{Command, IngestGroup, LogId, TypeConfig, Vote};
use openraft::EntryPayload;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::shard::Shard;

/// Shards of the cluster a forward is checked against.
pub const SHARDS: u32 = 2;

/// Decodes a `T` as the node does ([`codec::decode_msg`]); if it decodes, it must survive a
/// round trip.
fn decode<T: Serialize + DeserializeOwned + std::fmt::Debug>(what: &'static str, bytes: &[u8]) -> Option<T> {
    let v: T = codec::decode_msg(what, bytes).ok()?;
    let again = codec::encode_msg(what, &v).unwrap_or_else(|e| panic!("a decoded {what} does not encode: {e}"));
    let back: T = codec::decode_msg(what, &again).unwrap_or_else(|e| panic!("a {what} does not decode again: {e}"));
    assert_eq!(format!("{back:?}"), format!("{v:?}"), "a {what} changes through its encoding");
    Some(v)
}

/// Applies accepted commands to a fresh shard, with every check of the `apply` target.
fn apply_all(cmds: impl IntoIterator<Item = Command>) {
    let mut shard = Shard::default();
    for cmd in cmds {
        crate::apply::apply(&mut shard, &cmd);
    }
    shard.drain();
}

fn append_entries(bytes: &[u8]) {
    let Some(rpc) = decode::<AppendEntriesRequest<TypeConfig>>("append_entries", bytes) else { return };
    if let Err(e) = check_entries(&rpc) {
        assert!(e.starts_with("entry "), "a refusal names the entry: {e}");
        return;
    }
    // Accepted: every command must be one a replica applies (no second validation here to
    // hide a check that let one through).
    let mut shard = Shard::default();
    for entry in rpc.entries {
        if let EntryPayload::Normal(cmd) = entry.payload {
            if let Err(e) = cmd.validate() {
                panic!("check_entries accepted entry {} that does not validate: {e:?}", entry.log_id.index);
            }
            shard.apply(&cmd);
        }
    }
    shard.drain();
}

/// The Ingest entry a leader proposes for `groups`: stamped with its clock and carrying its
/// streams' rules (`None`: a stream it does not know, which it refuses).
pub fn ingest_command(table: &StreamTable, groups: Vec<IngestGroup>) -> Option<Command> {
    let mut rules = BTreeMap::<String, StreamRules>::new();
    for (key, _) in groups.iter().flat_map(|g| g.partials.iter()) {
        rules.insert(key.stream.clone(), table.get(&key.stream)?.rules.clone());
    }
    Some(Command::Ingest { stamp: crate::seeds::NOW, rules, limits: table.limits(), groups })
}

/// The command a leader proposes for a forward: an ingest ([`ingest_command`]), or the
/// operator's or consumer's command.
fn leader_command(table: &StreamTable, req: Forwarded) -> Option<Command> {
    Some(match req {
        Forwarded::Ingest(groups) => return ingest_command(table, groups),
        Forwarded::Ack { cursor, upto_seq } => Command::Ack { cursor, upto_seq },
        Forwarded::DlqRemove { sink, seqs } => Command::DlqRemove { sink, seqs },
        Forwarded::DropCursor { cursor } => Command::DropCursor { cursor },
        Forwarded::Retired | Forwarded::SetPreferredLeader { .. } => return None,
    })
}

fn forward(bytes: &[u8]) {
    let [shard, rest @ ..] = bytes else { return };
    let Some(req) = decode::<Forwarded>("forward", rest) else { return };
    let shard = u32::from(*shard) % SHARDS;
    let table = crate::seeds::table();
    let max_key_bytes = |stream: &str| table.get(stream).map_or(MAX_KEY_BYTES_LIMIT, |d| d.max_key_bytes);
    if let Err(e) = req.check_keys(shard, SHARDS, max_key_bytes) {
        assert!(e.field.contains(".key") && !e.reason.is_empty(), "a refusal names the key: {e:?}");
        return;
    }
    if let Some(cmd) = leader_command(&table, req) {
        apply_all([cmd]);
    }
}

/// A length-prefixed (one byte) field from the front of `bytes`.
fn field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    let len = usize::from(len).min(rest.len());
    Some(rest.split_at(len))
}

fn snapshot_meta(bytes: &[u8]) {
    let Some((vote, rest)) = field(bytes) else { return };
    let Some((committed, meta)) = field(rest) else { return };
    let (Ok(vote), Ok(meta)) = (codec::decode_vote(0, vote), codec::decode_snapshot_meta(0, meta)) else { return };
    let committed = codec::decode_log_id(0, committed).ok();
    // Both encode again to what decodes to the same.
    let again = codec::decode_snapshot_meta(0, &codec::encode_snapshot_meta(&meta).expect("meta encodes"));
    assert_eq!(format!("{:?}", again.expect("meta decodes again")), format!("{meta:?}"));
    let again = codec::decode_vote(0, &codec::encode_vote(&vote).expect("vote encodes"));
    assert_eq!(again.expect("vote decodes again"), vote);
    if check_snapshot_meta(&meta, &vote, committed.as_ref()).is_ok() {
        assert!(meta.last_log_id.is_some(), "a snapshot without a log id was accepted");
        assert!(!openraft_would_panic(meta.last_log_id.as_ref(), &vote, committed.as_ref()), "{meta:?} {vote:?}");
    }
}

/// Whether openraft (0.10.0-alpha.37, `FollowingHandler::install_full_snapshot`) would hit one
/// of its assertions installing a snapshot whose last log id is `last`, sent with `vote`, on a
/// node that committed `committed`. Transcribed from its source; with `leader_id_adv` a
/// committed leader id is the leader id itself.
fn openraft_would_panic(last: Option<&LogId>, vote: &Vote, committed: Option<&LogId>) -> bool {
    // "No need to install snapshot": nothing happens.
    if last <= committed {
        return false;
    }
    let Some(last) = last else { return false };
    // "can not be owned by the installing leader with vote …"
    if last.leader_id > vote.leader_id {
        return true;
    }
    // "greater than the locally committed log id … but not at a greater index"
    committed.is_some_and(|c| last.index <= c.index)
}

fn stored(bytes: &[u8]) {
    if let Ok(e) = codec::decode_entry(0, bytes) {
        // Compared as bytes: an unvalidated entry may hold a NaN, which is not equal to itself.
        let encoded = codec::encode_entry(&e).expect("an entry encodes");
        let again = codec::decode_entry(0, &encoded).expect("an entry decodes again");
        assert_eq!(codec::encode_entry(&again).expect("encodes"), encoded, "an entry changes through its encoding");
        if let EntryPayload::Normal(cmd) = e.payload {
            apply_all([cmd]);
        }
    }
    if let Ok(id) = codec::decode_log_id(0, bytes) {
        assert_eq!(codec::decode_log_id(0, &codec::encode_log_id(&id).expect("encodes")).ok(), Some(id));
    }
    if let Ok(m) = codec::decode_membership(0, bytes) {
        let again = codec::decode_membership(0, &codec::encode_membership(&m).expect("a membership encodes"));
        assert_eq!(format!("{:?}", again.expect("a membership decodes again")), format!("{m:?}"));
    }
}

fn replies(bytes: &[u8]) {
    decode::<AppendEntriesResponse<TypeConfig>>("append reply", bytes);
    decode::<VoteResponse<TypeConfig>>("vote reply", bytes);
    decode::<SnapshotResponse<TypeConfig>>("snapshot reply", bytes);
    decode::<Result<StreamAppendResult<TypeConfig>, String>>("stream_append reply", bytes);
    decode::<bool>("quiesce reply", bytes);
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else { return };
    match kind % 10 {
        0 | 8 => append_entries(bytes),
        1 => {
            decode::<VoteRequest<TypeConfig>>("vote", bytes);
        }
        2 => {
            decode::<TransferLeaderRequest<TypeConfig>>("transfer_leader", bytes);
        }
        3 | 9 => forward(bytes),
        4 => snapshot_meta(bytes),
        5 => {
            decode::<QuiesceRequest>("quiesce", bytes);
        }
        6 => stored(bytes),
        _ => replies(bytes),
    }
}

/// A log entry as a leader replicates it (for the seeds).
pub fn entry(term: u64, index: u64, cmd: Command) -> Entry {
    Entry { log_id: codec::log_id(term, 1, index), payload: EntryPayload::Normal(cmd) }
}

/// A vote (for the seeds).
pub fn vote(term: u64, committed: bool) -> Vote {
    Vote { leader_id: openraft::impls::leader_id_adv::LeaderId { term, node_id: 1 }, committed }
}
