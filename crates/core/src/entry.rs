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

/// What a shard's Raft log carries. Its encoding (serde, postcard in the log and between
/// peers) is [`wire`]'s: an Ingest whose rules all have the default `key_overflow` keeps the
/// shape older builds read; one that needs the field is a variant of its own (peer protocol 4).
#[derive(Clone, Debug, PartialEq)]
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

impl Serialize for Command {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        wire::CommandRef::from(self).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        wire::CommandOwned::deserialize(deserializer).map(Command::from)
    }
}

/// The encoding of [`Command`]: every variant in the order older builds numbered them, and
/// new ones appended, so an entry written by an older build decodes here, and one this build
/// writes decodes on an older build unless it uses what that build lacks — then its variant is
/// unknown there and decoding fails loudly rather than applying it differently.
///
/// - `Ingest` (0) carries the rules as they were before `key_overflow` existed ([`RulesV1`]);
///   written whenever every stream of the entry has the default `key_overflow`.
/// - `IngestV2` (8, peer protocol 4) carries whole [`StreamRules`]; written only when some
///   stream rejects growth past `max_bytes`, which a leader allows once every member of the
///   group announced protocol 4.
pub mod wire {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize, Serializer};

    use super::{Command, IngestGroup};
    use crate::merge::MergeOp;
    use crate::output::DeadLetter;
    use crate::samples::SamplePolicy;
    use crate::stream::{KeyOverflow, OverflowPolicy, ShardLimits, StreamRules};
    use crate::time::Millis;
    use crate::window::WindowPolicy;

    /// [`StreamRules`] as entries of peer protocol 1-3 carry them.
    #[derive(Deserialize)]
    pub(super) struct RulesV1 {
        op: MergeOp,
        window: WindowPolicy,
        overflow: OverflowPolicy,
        #[serde(default)]
        samples: Option<SamplePolicy>,
    }

    /// [`RulesV1`], borrowed.
    #[derive(Serialize)]
    struct RulesV1Ref<'a> {
        op: &'a MergeOp,
        window: &'a WindowPolicy,
        overflow: &'a OverflowPolicy,
        samples: &'a Option<SamplePolicy>,
    }

    impl From<RulesV1> for StreamRules {
        fn from(r: RulesV1) -> Self {
            StreamRules {
                op: r.op,
                window: r.window,
                overflow: r.overflow,
                samples: r.samples,
                key_overflow: KeyOverflow::FlushEarly,
            }
        }
    }

    fn rules_v1<S: Serializer>(rules: &&BTreeMap<String, StreamRules>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(rules.iter().map(|(name, r)| {
            (name, RulesV1Ref { op: &r.op, window: &r.window, overflow: &r.overflow, samples: &r.samples })
        }))
    }

    /// Whether rules need [`CommandRef::IngestV2`].
    pub fn needs_v2(rules: &BTreeMap<String, StreamRules>) -> bool {
        rules.values().any(|r| r.key_overflow != KeyOverflow::FlushEarly)
    }

    /// A [`Command`] borrowed for encoding (no copy of an Ingest's partials).
    #[derive(Serialize)]
    #[serde(rename = "Command")]
    pub(super) enum CommandRef<'a> {
        Ingest {
            stamp: Millis,
            #[serde(serialize_with = "rules_v1")]
            rules: &'a BTreeMap<String, StreamRules>,
            limits: &'a ShardLimits,
            groups: &'a [IngestGroup],
        },
        Seal {
            stamp: Millis,
            max: u32,
            session_ttl_ms: u64,
        },
        Ack {
            cursor: &'a str,
            upto_seq: u64,
        },
        DeadLetter {
            cursor: &'a str,
            upto_seq: u64,
            letters: &'a [DeadLetter],
        },
        DlqRemove {
            sink: &'a str,
            seqs: &'a [u64],
        },
        SetPreferredLeader {
            node: &'a Option<String>,
        },
        DropCursor {
            cursor: &'a str,
        },
        Trim {
            below: u64,
        },
        IngestV2 {
            stamp: Millis,
            rules: &'a BTreeMap<String, StreamRules>,
            limits: &'a ShardLimits,
            groups: &'a [IngestGroup],
        },
    }

    impl<'a> From<&'a Command> for CommandRef<'a> {
        fn from(c: &'a Command) -> Self {
            match c {
                Command::Ingest { stamp, rules, limits, groups } if needs_v2(rules) => {
                    CommandRef::IngestV2 { stamp: *stamp, rules, limits, groups }
                }
                Command::Ingest { stamp, rules, limits, groups } => {
                    CommandRef::Ingest { stamp: *stamp, rules, limits, groups }
                }
                Command::Seal { stamp, max, session_ttl_ms } => {
                    CommandRef::Seal { stamp: *stamp, max: *max, session_ttl_ms: *session_ttl_ms }
                }
                Command::Ack { cursor, upto_seq } => CommandRef::Ack { cursor, upto_seq: *upto_seq },
                Command::DeadLetter { cursor, upto_seq, letters } => {
                    CommandRef::DeadLetter { cursor, upto_seq: *upto_seq, letters }
                }
                Command::DlqRemove { sink, seqs } => CommandRef::DlqRemove { sink, seqs },
                Command::SetPreferredLeader { node } => CommandRef::SetPreferredLeader { node },
                Command::DropCursor { cursor } => CommandRef::DropCursor { cursor },
                Command::Trim { below } => CommandRef::Trim { below: *below },
            }
        }
    }

    /// A decoded [`Command`], before the rules of a protocol-1 Ingest are completed.
    #[derive(Deserialize)]
    #[serde(rename = "Command")]
    pub(super) enum CommandOwned {
        Ingest { stamp: Millis, rules: BTreeMap<String, RulesV1>, limits: ShardLimits, groups: Vec<IngestGroup> },
        Seal { stamp: Millis, max: u32, session_ttl_ms: u64 },
        Ack { cursor: String, upto_seq: u64 },
        DeadLetter { cursor: String, upto_seq: u64, letters: Vec<DeadLetter> },
        DlqRemove { sink: String, seqs: Vec<u64> },
        SetPreferredLeader { node: Option<String> },
        DropCursor { cursor: String },
        Trim { below: u64 },
        IngestV2 { stamp: Millis, rules: BTreeMap<String, StreamRules>, limits: ShardLimits, groups: Vec<IngestGroup> },
    }

    impl From<CommandOwned> for Command {
        fn from(c: CommandOwned) -> Self {
            match c {
                CommandOwned::Ingest { stamp, rules, limits, groups } => Command::Ingest {
                    stamp,
                    rules: rules.into_iter().map(|(name, r)| (name, r.into())).collect(),
                    limits,
                    groups,
                },
                CommandOwned::IngestV2 { stamp, rules, limits, groups } => {
                    Command::Ingest { stamp, rules, limits, groups }
                }
                CommandOwned::Seal { stamp, max, session_ttl_ms } => Command::Seal { stamp, max, session_ttl_ms },
                CommandOwned::Ack { cursor, upto_seq } => Command::Ack { cursor, upto_seq },
                CommandOwned::DeadLetter { cursor, upto_seq, letters } => {
                    Command::DeadLetter { cursor, upto_seq, letters }
                }
                CommandOwned::DlqRemove { sink, seqs } => Command::DlqRemove { sink, seqs },
                CommandOwned::SetPreferredLeader { node } => Command::SetPreferredLeader { node },
                CommandOwned::DropCursor { cursor } => Command::DropCursor { cursor },
                CommandOwned::Trim { below } => Command::Trim { below },
            }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{Command, IngestGroup};
    use crate::batch::Partial;
    use crate::buffer::BufKey;
    use crate::merge::{Aggregate, MergeOp};
    use crate::output::DeadLetter;
    use crate::samples::SamplePolicy;
    use crate::stream::{KeyOverflow, OverflowPolicy, ShardLimits, StreamRules};
    use crate::time::Millis;
    use crate::window::WindowPolicy;

    /// `StreamRules` and `Command` exactly as builds of peer protocol 1-3 derived them.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct OldRules {
        op: MergeOp,
        window: WindowPolicy,
        overflow: OverflowPolicy,
        #[serde(default)]
        samples: Option<SamplePolicy>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum OldCommand {
        Ingest { stamp: Millis, rules: BTreeMap<String, OldRules>, limits: ShardLimits, groups: Vec<IngestGroup> },
        Seal { stamp: Millis, max: u32, session_ttl_ms: u64 },
        Ack { cursor: String, upto_seq: u64 },
        DeadLetter { cursor: String, upto_seq: u64, letters: Vec<DeadLetter> },
        DlqRemove { sink: String, seqs: Vec<u64> },
        SetPreferredLeader { node: Option<String> },
        DropCursor { cursor: String },
        Trim { below: u64 },
    }

    fn ingest(key_overflow: KeyOverflow) -> Command {
        let rules = StreamRules {
            op: MergeOp::SumI64,
            window: WindowPolicy { tumbling_ms: Some(1_000), max_bytes: Some(1 << 20), ..WindowPolicy::default() },
            overflow: OverflowPolicy::Shed,
            samples: None,
            key_overflow,
        };
        let partial =
            Partial { agg: Aggregate::SumI64(7), inputs: 2, first_event_at: 5, last_event_at: 6, samples: None };
        Command::Ingest {
            stamp: 42,
            rules: BTreeMap::from([("s".to_owned(), rules)]),
            limits: ShardLimits::default(),
            groups: vec![IngestGroup {
                range: None,
                partials: vec![(BufKey { stream: "s".into(), key: "k".into() }, partial)],
            }],
        }
    }

    fn old_ingest() -> OldCommand {
        let Command::Ingest { stamp, rules, limits, groups } = ingest(KeyOverflow::FlushEarly) else { unreachable!() };
        let rules = rules
            .into_iter()
            .map(|(n, r)| (n, OldRules { op: r.op, window: r.window, overflow: r.overflow, samples: r.samples }))
            .collect();
        OldCommand::Ingest { stamp, rules, limits, groups }
    }

    #[test]
    fn entries_without_the_new_field_keep_the_bytes_older_builds_read_and_wrote() {
        let old = old_ingest();
        let new = ingest(KeyOverflow::FlushEarly);
        let old_bytes = postcard::to_allocvec(&old).unwrap();
        assert_eq!(postcard::to_allocvec(&new).unwrap(), old_bytes, "the same bytes as protocol 1-3");
        assert_eq!(postcard::from_bytes::<Command>(&old_bytes).unwrap(), new);
        let others = [
            (
                Command::Seal { stamp: 9, max: 3, session_ttl_ms: 1_000 },
                OldCommand::Seal { stamp: 9, max: 3, session_ttl_ms: 1_000 },
            ),
            (Command::Ack { cursor: "c".into(), upto_seq: 4 }, OldCommand::Ack { cursor: "c".into(), upto_seq: 4 }),
            (
                Command::DeadLetter { cursor: "c".into(), upto_seq: 4, letters: vec![] },
                OldCommand::DeadLetter { cursor: "c".into(), upto_seq: 4, letters: vec![] },
            ),
            (
                Command::DlqRemove { sink: "s".into(), seqs: vec![1, 2] },
                OldCommand::DlqRemove { sink: "s".into(), seqs: vec![1, 2] },
            ),
            (
                Command::SetPreferredLeader { node: Some("n".into()) },
                OldCommand::SetPreferredLeader { node: Some("n".into()) },
            ),
            (Command::DropCursor { cursor: "c".into() }, OldCommand::DropCursor { cursor: "c".into() }),
            (Command::Trim { below: 8 }, OldCommand::Trim { below: 8 }),
        ];
        for (new, old) in others {
            let bytes = postcard::to_allocvec(&old).unwrap();
            assert_eq!(postcard::to_allocvec(&new).unwrap(), bytes, "{new}");
            assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), new);
        }
    }

    #[test]
    fn an_entry_that_rejects_growth_round_trips_and_an_older_build_cannot_misread_it() {
        let new = ingest(KeyOverflow::Reject);
        let bytes = postcard::to_allocvec(&new).unwrap();
        assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), new);
        assert!(postcard::from_bytes::<OldCommand>(&bytes).is_err(), "an unknown variant to older builds");
        let json = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), new);
        let json = serde_json::to_string(&ingest(KeyOverflow::FlushEarly)).unwrap();
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), ingest(KeyOverflow::FlushEarly));
    }
}
