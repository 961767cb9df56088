//! The commands a shard's Raft log carries, and the checks every one passes before it is
//! proposed, when a follower receives it and again when it is applied. Pure (no openraft, no
//! storage), so the replication crate, the fuzz targets (`fuzz/`) and anything else that must
//! read an entry use this one definition; `coalesce-raft` re-exports it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::batch::Partial;
use crate::buffer::BufKey;
use crate::output::DeadLetter;
use crate::session::ProducerRange;
use crate::stream::{MAX_KEY_BYTES_LIMIT, ShardLimits, StreamRules};
use crate::time::{MAX_STAMP, Millis};

/// A producer's part of an Ingest entry: deduplicated as a unit at apply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IngestGroup {
    pub range: Option<ProducerRange>,
    pub partials: Vec<(BufKey, Partial)>,
}

impl From<crate::batch::ProducerGroup> for IngestGroup {
    /// A pre-merged producer group as the log carries it (the event indices stay behind).
    fn from(g: crate::batch::ProducerGroup) -> Self {
        Self { range: g.range, partials: g.partials }
    }
}

/// What a shard's Raft log carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Pre-merged events. `stamp` is the leader's clock; `rules` and `limits` make apply
    /// independent of local config.
    Ingest { stamp: Millis, rules: BTreeMap<String, StreamRules>, limits: ShardLimits, groups: Vec<IngestGroup> },
    /// Close up to `max` windows whose deadline is at or before the leader's `stamp`, and expire
    /// producer sessions idle for longer than `session_ttl_ms`.
    Seal { stamp: Millis, max: u32, session_ttl_ms: u64 },
    /// A consumer (sink or subscriber) has durably processed every output up to `upto_seq`.
    Ack { cursor: String, upto_seq: u64 },
    /// A sink refused `letters` permanently: they enter its dead-letter queue and `cursor`
    /// advances to `upto_seq`, as one step. Letters at or below the cursor are ignored, so a
    /// retried proposal changes nothing.
    DeadLetter { cursor: String, upto_seq: u64, letters: Vec<DeadLetter> },
    /// Removes dead letters of `sink` (replayed successfully, or purged).
    DlqRemove { sink: String, seqs: Vec<u64> },
    /// Sets (or with `None` clears) the replica that leader balancing keeps the shard's
    /// leadership on, instead of the first of its placement.
    SetPreferredLeader { node: Option<String> },
    /// Forgets a consumer's cursor (an abandoned subscriber), so it no longer holds outputs.
    DropCursor { cursor: String },
    /// Deletes outputs below seq `below` that no cursor still needs: the retention of outputs
    /// no consumer claims (a shard without cursors). Never past a cursor or the next seq, so a
    /// late or repeated Trim deletes nothing a consumer has not acknowledged. Peer protocol 3.
    Trim { below: u64 },
}

impl Command {
    /// The command's kind, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Ingest { .. } => "ingest",
            Command::Seal { .. } => "seal",
            Command::Ack { .. } => "ack",
            Command::DeadLetter { .. } => "dead_letter",
            Command::DlqRemove { .. } => "dlq_remove",
            Command::SetPreferredLeader { .. } => "set_preferred_leader",
            Command::DropCursor { .. } => "drop_cursor",
            Command::Trim { .. } => "trim",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Ingest { stamp, groups, .. } => write!(f, "ingest(stamp={stamp}, groups={})", groups.len()),
            Command::Seal { stamp, max, .. } => write!(f, "seal(stamp={stamp}, max={max})"),
            Command::Ack { cursor, upto_seq } => write!(f, "ack({cursor}<={upto_seq})"),
            Command::DeadLetter { cursor, upto_seq, letters } => {
                write!(f, "dead_letter({cursor}<={upto_seq}, letters={})", letters.len())
            }
            Command::DlqRemove { sink, seqs } => write!(f, "dlq_remove({sink}, {})", seqs.len()),
            Command::SetPreferredLeader { node } => write!(f, "set_preferred_leader({node:?})"),
            Command::DropCursor { cursor } => write!(f, "drop_cursor({cursor})"),
            Command::Trim { below } => write!(f, "trim(<{below})"),
        }
    }
}

/// Most producer groups in one Ingest entry, partials in one entry, dead letters in one
/// DeadLetter entry and seqs in one DlqRemove entry. Far above what a node proposes (a
/// request is at most 4 MiB), they bound what one decoded entry can make apply do.
pub const MAX_GROUPS_PER_ENTRY: usize = 100_000;
pub const MAX_PARTIALS_PER_ENTRY: usize = 1_000_000;
pub const MAX_LETTERS_PER_ENTRY: usize = 100_000;
/// Most windows one Seal closes.
pub const MAX_SEAL: u32 = 1_000_000;
/// Shortest producer-session TTL a Seal may sweep with: a shorter one would forget sessions
/// whose producers are still retrying, and accept their resends twice.
pub const MIN_SESSION_TTL_MS: u64 = 1_000;

/// Why a command was refused before it was proposed, when it was received from a peer, or
/// when it was applied. `field` names where (`groups[2].partials[0]`, `rules["a"].window`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("invalid {kind} command: {field}: {reason}")]
pub struct InvalidCommand {
    pub kind: String,
    pub field: String,
    pub reason: String,
}

impl Command {
    /// Checks everything apply relies on: stamps no later than [`MAX_STAMP`], rules as config
    /// validation would accept them, partials of their stream's operator, bounded sizes, and
    /// names that are valid consumer, sink or node names. Deterministic, so every replica
    /// reaches the same verdict on the same entry; run before proposing, on entries a peer
    /// sends, and again at apply.
    ///
    /// Across versions these checks may only loosen: a newer build that refused at apply what an
    /// older leader accepted would stop the group on every upgraded replica. A stricter rule
    /// comes with a format version (`coalesce_storage::format`) and applies to entries written
    /// under it.
    pub fn validate(&self) -> Result<(), InvalidCommand> {
        let err = |field: String, reason: String| InvalidCommand { kind: self.kind().to_owned(), field, reason };
        let stamp = |stamp: Millis| {
            if stamp > MAX_STAMP {
                return Err(err("stamp".into(), format!("{stamp} is after the latest allowed stamp {MAX_STAMP}")));
            }
            Ok(())
        };
        let name = |field: &str, n: &str| {
            if !crate::stream::valid_name(n) {
                return Err(err(field.into(), format!("{n:?} must be 1-64 characters of a-z, 0-9, '_', '.', '-'")));
            }
            Ok(())
        };
        let at_most = |field: &str, len: usize, max: usize| {
            if len > max {
                return Err(err(field.into(), format!("{len} entries, at most {max}")));
            }
            Ok(())
        };
        match self {
            Command::Ingest { stamp: s, rules, limits: _, groups } => {
                stamp(*s)?;
                for (stream, r) in rules {
                    name(&format!("rules[{stream:?}]"), stream)?;
                    r.check().map_err(|(field, reason)| err(format!("rules[{stream:?}].{field}"), reason))?;
                }
                at_most("groups", groups.len(), MAX_GROUPS_PER_ENTRY)?;
                at_most("partials", groups.iter().map(|g| g.partials.len()).sum(), MAX_PARTIALS_PER_ENTRY)?;
                for (i, g) in groups.iter().enumerate() {
                    if let Some(r) = &g.range {
                        r.check().map_err(|reason| err(format!("groups[{i}].range"), reason))?;
                    }
                    for (j, (key, partial)) in g.partials.iter().enumerate() {
                        let field = || format!("groups[{i}].partials[{j}]");
                        let r = rules.get(&key.stream).ok_or_else(|| {
                            err(field(), format!("stream {:?} has no rules in the entry", key.stream))
                        })?;
                        if key.key.len() > MAX_KEY_BYTES_LIMIT {
                            return Err(err(
                                field(),
                                format!("key of {} bytes, at most {MAX_KEY_BYTES_LIMIT}", key.key.len()),
                            ));
                        }
                        partial.check(&r.op).map_err(|reason| err(field(), reason))?;
                    }
                }
            }
            Command::Seal { stamp: s, max, session_ttl_ms } => {
                stamp(*s)?;
                if *max == 0 || *max > MAX_SEAL {
                    return Err(err("max".into(), format!("{max} must be in 1..={MAX_SEAL}")));
                }
                if *session_ttl_ms < MIN_SESSION_TTL_MS {
                    return Err(err(
                        "session_ttl_ms".into(),
                        format!("{session_ttl_ms} must be at least {MIN_SESSION_TTL_MS}"),
                    ));
                }
            }
            Command::Ack { cursor, .. } | Command::DropCursor { cursor } => name("cursor", cursor)?,
            Command::Trim { .. } => {}
            Command::DeadLetter { cursor, upto_seq: _, letters } => {
                name("cursor", cursor)?;
                at_most("letters", letters.len(), MAX_LETTERS_PER_ENTRY)?;
                for (i, l) in letters.iter().enumerate() {
                    name(&format!("letters[{i}].sink"), &l.sink)?;
                    stamp(l.failed_at).map_err(|e| err(format!("letters[{i}].failed_at"), e.reason))?;
                }
            }
            Command::DlqRemove { sink, seqs } => {
                name("sink", sink)?;
                at_most("seqs", seqs.len(), MAX_LETTERS_PER_ENTRY)?;
            }
            Command::SetPreferredLeader { node: Some(node) } => {
                if node.is_empty() || node.len() > 253 {
                    return Err(err("node".into(), "a node name is 1-253 bytes".into()));
                }
            }
            Command::SetPreferredLeader { node: None } => {}
        }
        Ok(())
    }
}
