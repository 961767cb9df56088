//! The one place that knows how keys are laid out in RocksDB.
//!
//! Every key starts with the shard id (u32 big-endian), so one shard's rows are contiguous in
//! every column family and range scans/deletes per shard are cheap. Integers are big-endian so
//! byte order is numeric order: log entries iterate in index order, the outbox in seq order,
//! the deadline index in deadline order.
//!
//! | column family | key                                            | value                 |
//! |---------------|------------------------------------------------|-----------------------|
//! | `raft_log`    | shard ‖ index u64                              | encoded log entry     |
//! | `raft_meta`   | shard ‖ tag u8 (vote, committed, purged)       | encoded value         |
//! | `buffer`      | shard ‖ stream ‖ 0x00 ‖ key                    | `Buffered`            |
//! | `deadline`    | shard ‖ deadline u64 ‖ stream ‖ 0x00 ‖ key      | empty                 |
//! | `outbox`      | shard ‖ seq u64                                | `Output`              |
//! | `sessions`    | shard ‖ producer u64                           | `Session`             |
//! | `sm_meta`     | shard ‖ tag u8                                 | encoded value         |
//! | `dlq`         | shard ‖ sink ‖ 0x00 ‖ seq u64                  | `DeadLetter`          |
//! | `node`        | name (no shard)                                | node-level facts      |
//!
//! Stream and sink names never contain 0x00 (they are `[a-z0-9_.-]`), so `stream ‖ 0x00 ‖ key`
//! sorts exactly like the pair (stream, key), and `sink ‖ 0x00 ‖ seq` like (sink, seq).

use coalesce_core::buffer::BufKey;
use coalesce_core::hash::ShardId;
use coalesce_core::time::Millis;

pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_META: &str = "raft_meta";
pub const CF_BUFFER: &str = "buffer";
pub const CF_DEADLINE: &str = "deadline";
pub const CF_OUTBOX: &str = "outbox";
pub const CF_SESSIONS: &str = "sessions";
pub const CF_SM_META: &str = "sm_meta";
pub const CF_NODE: &str = "node";
pub const CF_DLQ: &str = "dlq";

/// Every column family, in creation order.
pub const ALL_CFS: &[&str] =
    &[CF_RAFT_LOG, CF_RAFT_META, CF_BUFFER, CF_DEADLINE, CF_OUTBOX, CF_SESSIONS, CF_SM_META, CF_NODE, CF_DLQ];

/// The column families that hold a shard's state machine (what a snapshot carries). Snapshot
/// rows name their family by index in this list: append only.
pub const SM_CFS: &[&str] = &[CF_BUFFER, CF_DEADLINE, CF_OUTBOX, CF_SESSIONS, CF_SM_META, CF_DLQ];
// Snapshot readers that cannot see this list (the fuzz targets) use the core's count.
const _: () = assert!(SM_CFS.len() == coalesce_core::snapshot::STATE_COLUMN_FAMILIES);

/// Tags of per-shard Raft metadata rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RaftMetaTag {
    Vote = 1,
    Committed = 2,
    Purged = 3,
    /// Present while a received snapshot is being written over the shard's state machine: the
    /// name of its file in the node's snapshot directory ([`crate::transfer`]). A restart that
    /// finds it finishes the install from that file before the group starts.
    Installing = 4,
}

/// Tags of per-shard state-machine metadata rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SmMetaTag {
    /// Last applied log id (encoded by the raft crate).
    Applied = 1,
    /// Last applied membership (encoded by the raft crate).
    Membership = 2,
    /// `ShardStats` of the buffer.
    Stats = 3,
    /// Outbox state: next seq, acked cursors.
    Outbox = 4,
    /// Dead-letter queue state.
    Dlq = 5,
    /// The replica an operator chose to lead the shard (`Option<String>`).
    PreferredLeader = 6,
}

/// The 4-byte prefix of every row of `shard`.
pub fn shard_prefix(shard: ShardId) -> [u8; 4] {
    shard.to_be_bytes()
}

/// The first key of the shard after `shard` (exclusive upper bound of a shard's rows).
pub fn shard_end(shard: ShardId) -> Vec<u8> {
    match shard.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 5],
    }
}

fn with_u64(shard: ShardId, n: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&shard.to_be_bytes());
    k[4..].copy_from_slice(&n.to_be_bytes());
    k
}

/// Key of log entry `index` of `shard`.
pub fn log_key(shard: ShardId, index: u64) -> [u8; 12] {
    with_u64(shard, index)
}

/// Key of outbox entry `seq` of `shard`.
pub fn outbox_key(shard: ShardId, seq: u64) -> [u8; 12] {
    with_u64(shard, seq)
}

/// Key of producer `producer`'s session on `shard`.
pub fn session_key(shard: ShardId, producer: u64) -> [u8; 12] {
    with_u64(shard, producer)
}

/// The u64 after the shard prefix of a 12-byte key (log index, seq, producer).
pub fn decode_u64_suffix(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(4..12)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Key of a Raft metadata row.
pub fn raft_meta_key(shard: ShardId, tag: RaftMetaTag) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&shard.to_be_bytes());
    k[4] = tag as u8;
    k
}

/// Key of a state-machine metadata row.
pub fn sm_meta_key(shard: ShardId, tag: SmMetaTag) -> [u8; 5] {
    sm_meta_key_raw(shard, tag as u8)
}

/// [`sm_meta_key`] of a tag given as its number.
pub(crate) fn sm_meta_key_raw(shard: ShardId, tag: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&shard.to_be_bytes());
    k[4] = tag;
    k
}

fn push_bufkey(out: &mut Vec<u8>, key: &BufKey) {
    out.extend_from_slice(key.stream.as_bytes());
    out.push(0);
    out.extend_from_slice(key.key.as_bytes());
}

fn parse_bufkey(bytes: &[u8]) -> Option<BufKey> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    let stream = std::str::from_utf8(&bytes[..nul]).ok()?.to_owned();
    let key = std::str::from_utf8(&bytes[nul + 1..]).ok()?.to_owned();
    Some(BufKey { stream, key })
}

/// Key of a buffered aggregate.
pub fn buffer_key(shard: ShardId, key: &BufKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + key.stream.len() + key.key.len());
    k.extend_from_slice(&shard.to_be_bytes());
    push_bufkey(&mut k, key);
    k
}

/// Decodes a buffer key.
pub fn decode_buffer_key(bytes: &[u8]) -> Option<(ShardId, BufKey)> {
    let shard = ShardId::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    Some((shard, parse_bufkey(&bytes[4..])?))
}

/// The first dead-letter key of `sink` on `shard` with a seq of at least `seq`.
pub fn dlq_key(shard: ShardId, sink: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(13 + sink.len());
    k.extend_from_slice(&shard.to_be_bytes());
    k.extend_from_slice(sink.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The exclusive upper bound of `sink`'s dead letters on `shard`.
pub fn dlq_end(shard: ShardId, sink: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + sink.len());
    k.extend_from_slice(&shard.to_be_bytes());
    k.extend_from_slice(sink.as_bytes());
    k.push(1);
    k
}

/// Decodes a dead-letter key into (sink, seq).
pub fn decode_dlq_key(bytes: &[u8]) -> Option<(String, u64)> {
    let rest = bytes.get(4..)?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let sink = std::str::from_utf8(&rest[..nul]).ok()?.to_owned();
    let seq = u64::from_be_bytes(rest.get(nul + 1..)?.try_into().ok()?);
    Some((sink, seq))
}

/// Key of a deadline-index row.
pub fn deadline_key(shard: ShardId, deadline: Millis, key: &BufKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(13 + key.stream.len() + key.key.len());
    k.extend_from_slice(&shard.to_be_bytes());
    k.extend_from_slice(&deadline.to_be_bytes());
    push_bufkey(&mut k, key);
    k
}

/// The first possible deadline-index key of `shard` with a deadline of at least `deadline`.
pub fn deadline_from(shard: ShardId, deadline: Millis) -> Vec<u8> {
    let mut k = shard.to_be_bytes().to_vec();
    k.extend_from_slice(&deadline.to_be_bytes());
    k
}

/// Decodes a deadline-index key.
pub fn decode_deadline_key(bytes: &[u8]) -> Option<(ShardId, Millis, BufKey)> {
    let shard = ShardId::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    let deadline = Millis::from_be_bytes(bytes.get(4..12)?.try_into().ok()?);
    Some((shard, deadline, parse_bufkey(&bytes[12..])?))
}

/// The exclusive upper bound of deadline rows of `shard` with deadline <= `upto`.
pub fn deadline_upper_bound(shard: ShardId, upto: Millis) -> Vec<u8> {
    match upto.checked_add(1) {
        Some(next) => deadline_from(shard, next),
        None => shard_end(shard),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bk(stream: &str, key: &str) -> BufKey {
        BufKey { stream: stream.into(), key: key.into() }
    }

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(log_key(1, 2), [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(raft_meta_key(3, RaftMetaTag::Purged), [0, 0, 0, 3, 3]);
        assert_eq!(buffer_key(1, &bk("s", "k\0x")), b"\0\0\0\x01s\0k\0x".to_vec());
        assert_eq!(deadline_key(1, 258, &bk("s", "k")), b"\0\0\0\x01\0\0\0\0\0\0\x01\x02s\0k".to_vec());
    }

    #[test]
    fn byte_order_is_logical_order() {
        assert!(log_key(1, 255) < log_key(1, 256));
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        // (stream, key) order, not length order
        assert!(buffer_key(0, &bk("a", "zzz")) < buffer_key(0, &bk("aa", "a")));
        assert!(buffer_key(0, &bk("a", "b")) < buffer_key(0, &bk("a", "b\0")));
        assert!(deadline_key(0, 5, &bk("z", "z")) < deadline_key(0, 6, &bk("a", "a")));
        assert!(deadline_key(0, u64::MAX, &bk("z", "z")) < deadline_upper_bound(0, u64::MAX));
        assert!(deadline_key(0, 7, &bk("z", "z")) < deadline_upper_bound(0, 7));
        assert!(deadline_key(0, 8, &bk("", "")) >= deadline_upper_bound(0, 7));
        assert!(buffer_key(u32::MAX, &bk("z", "z")).as_slice() < shard_end(u32::MAX).as_slice());
    }

    #[test]
    fn round_trips() {
        let k = bk("api-calls", "user:\0:42");
        assert_eq!(decode_buffer_key(&buffer_key(9, &k)), Some((9, k.clone())));
        assert_eq!(decode_deadline_key(&deadline_key(9, 77, &k)), Some((9, 77, k)));
        assert_eq!(decode_u64_suffix(&outbox_key(4, 99)), Some(99));
        assert_eq!(decode_buffer_key(b"\0\0"), None);
        assert_eq!(decode_dlq_key(&dlq_key(3, "pg", 7)), Some(("pg".into(), 7)));
    }

    #[test]
    fn dead_letters_sort_by_sink_then_seq() {
        assert!(dlq_key(0, "a", u64::MAX) < dlq_key(0, "a.", 0));
        assert!(dlq_key(0, "a", u64::MAX) < dlq_end(0, "a"));
        assert!(dlq_end(0, "a") <= dlq_key(0, "a.", 0));
        assert!(dlq_key(0, "a", 255) < dlq_key(0, "a", 256));
    }
}
