//! Our own encoding of openraft values on disk. openraft's serde derives are explicitly not a
//! stable format, so log entries, votes and log ids are stored as plain tuples we control
//! (postcard), and memberships as JSON.

use coalesce_storage::StorageError;
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

fn enc_err(what: &'static str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Encode { what, detail: e.to_string() }
}

fn corrupt(shard: u32, what: &'static str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt { shard, what, detail: e.to_string() }
}

/// Builds a log id.
pub fn log_id(term: u64, node: u64, index: u64) -> LogId {
    LogId { leader_id: LeaderId { term, node_id: node }, index }
}

pub fn encode_entry(e: &Entry) -> Result<Vec<u8>, StorageError> {
    let payload = match &e.payload {
        EntryPayload::Blank => StoredPayload::Blank,
        EntryPayload::Normal(c) => StoredPayload::Normal(c.clone()),
        EntryPayload::Membership(m) => {
            StoredPayload::Membership(serde_json::to_string(m).map_err(|e| enc_err("membership", e))?)
        }
    };
    let stored =
        StoredEntry { term: e.log_id.leader_id.term, node: e.log_id.leader_id.node_id, index: e.log_id.index, payload };
    postcard::to_allocvec(&stored).map_err(|e| enc_err("log entry", e))
}

pub fn decode_entry(shard: u32, bytes: &[u8]) -> Result<Entry, StorageError> {
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

pub fn encode_log_id(id: &LogId) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(&(id.leader_id.term, id.leader_id.node_id, id.index)).map_err(|e| enc_err("log id", e))
}

pub fn decode_log_id(shard: u32, bytes: &[u8]) -> Result<LogId, StorageError> {
    let (t, n, i): (u64, u64, u64) = postcard::from_bytes(bytes).map_err(|e| corrupt(shard, "log id", e))?;
    Ok(log_id(t, n, i))
}

pub fn encode_vote(v: &Vote) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(&(v.leader_id.term, v.leader_id.node_id, v.committed)).map_err(|e| enc_err("vote", e))
}

pub fn decode_vote(shard: u32, bytes: &[u8]) -> Result<Vote, StorageError> {
    let (term, node_id, committed): (u64, u64, bool) =
        postcard::from_bytes(bytes).map_err(|e| corrupt(shard, "vote", e))?;
    Ok(Vote { leader_id: LeaderId { term, node_id }, committed })
}

/// The stored membership of a state machine.
pub type StoredMembershipT = StoredMembership<LeaderId<u64, u64>, u64, PeerNode>;

pub fn encode_membership(m: &StoredMembershipT) -> Result<Vec<u8>, StorageError> {
    let log = m.log_id().as_ref().map(|l| (l.leader_id.term, l.leader_id.node_id, l.index));
    let json = serde_json::to_string(m.membership()).map_err(|e| enc_err("membership", e))?;
    postcard::to_allocvec(&(log, json)).map_err(|e| enc_err("membership", e))
}

pub fn decode_membership(shard: u32, bytes: &[u8]) -> Result<StoredMembershipT, StorageError> {
    let (log, json): (Option<(u64, u64, u64)>, String) =
        postcard::from_bytes(bytes).map_err(|e| corrupt(shard, "membership", e))?;
    let m: Membership<u64, PeerNode> = serde_json::from_str(&json).map_err(|e| corrupt(shard, "membership", e))?;
    Ok(StoredMembership::new(log.map(|(t, n, i)| log_id(t, n, i)), m))
}
