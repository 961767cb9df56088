//! The `apply` target: bytes → log entries → the shard state machine.
//!
//! The input is a run of postcard-encoded [`Command`]s back to back — each exactly what a log
//! entry's payload holds — decoded one after the other until the bytes stop being a command.
//! Each is validated as the raft crate validates an entry before proposing and at apply
//! ([`Command::validate`]); a refused entry is skipped (a real replica refuses it and changes
//! nothing), an accepted one is applied to a [`Shard`], which checks its invariants after every
//! entry. At the end a far-future Seal drains the buffer and the ledger must balance.
//!
//! An input whose first byte is [`STRUCTURED`] (never the start of an encoded command: as a
//! postcard varint it announces a variant past the last) is read with `arbitrary` instead: a
//! leader's life — entries over a few streams and keys whose rules (operator, window with
//! adaptive stretch, overflow policy, samples, limits) change from entry to entry, producer
//! ranges that repeat and overlap, stamps that jump and go back — built from valid pieces so
//! the fuzzer spends its time past validation. Each entry is still encoded and decoded with
//! postcard, then validated and applied exactly as above.

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Result, Unstructured};
use coalesce_core::adaptive::AdaptivePolicy;
use coalesce_core::batch::Partial;
use coalesce_core::buffer::BufKey;
use coalesce_core::merge::MergeOp;
use coalesce_core::session::ProducerRange;
use coalesce_core::stream::{KeyOverflow, OverflowPolicy, ShardLimits, StreamRules};
use coalesce_core::window::WindowPolicy;

use crate::entry::{Command, IngestGroup};
use crate::roundtrip::decode_front;
use crate::shard::Shard;

/// Most entries one input applies (longer runs add time, not coverage).
pub const MAX_ENTRIES: usize = 64;

/// The first byte of a structured input.
pub const STRUCTURED: u8 = 0xa5;

/// Runs one input.
pub fn run(data: &[u8]) {
    if let Some((&STRUCTURED, rest)) = data.split_first() {
        return structured(rest);
    }
    let mut shard = Shard::default();
    let mut rest = data;
    for _ in 0..MAX_ENTRIES {
        let Some((cmd, tail)) = decode_front::<Command>(rest, "log entry") else { break };
        rest = tail;
        apply(&mut shard, &cmd);
    }
    shard.drain();
}

/// Validates `cmd` as a replica does and applies it if it passes (a refusal must name the
/// field and the reason).
pub(crate) fn apply(shard: &mut Shard, cmd: &Command) {
    if let Err(e) = cmd.validate() {
        assert!(!e.field.is_empty() && !e.reason.is_empty(), "a refusal names the field and the reason");
        return;
    }
    shard.apply(cmd);
}

fn structured(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut shard = Shard::default();
    let mut leader = Leader { stamp: 1_700_000_000_000, seqs: [0; 2] };
    for _ in 0..MAX_ENTRIES {
        if u.is_empty() {
            break;
        }
        let Ok(cmd) = leader.command(&mut u) else { break };
        let bytes = postcard::to_allocvec(&cmd).expect("a command encodes");
        let Some((decoded, _)) = decode_front::<Command>(&bytes, "log entry") else {
            // An entry a leader can build but no replica can read: the crash class itself.
            panic!("an entry built from valid pieces does not decode: {cmd:?}");
        };
        apply(&mut shard, &decoded);
    }
    shard.drain();
}

const STREAMS: &[&str] = &["a", "b", "c"];
const KEYS: &[&str] = &["k0", "k1", "k2", "k3"];
const DURATIONS: &[u64] = &[1, 7, 10, 100, 250, 1_000, 5_000, 60_000, 7 * 24 * 3_600_000];

/// What the fuzzed leader remembers between entries.
struct Leader {
    stamp: u64,
    /// The last seq each of two producers used.
    seqs: [u64; 2],
}

impl Leader {
    fn command(&mut self, u: &mut Unstructured<'_>) -> Result<Command> {
        self.stamp = match u.int_in_range(0u8..=9)? {
            0 => self.stamp.saturating_sub(u64::from(u16::arbitrary(u)?)), // a stale leader's stamp
            1 => self.stamp + u64::from(u32::arbitrary(u)?),
            n => self.stamp + *u.choose(DURATIONS)? / u64::from(n),
        };
        Ok(match u.int_in_range(0u8..=9)? {
            0..=5 => self.ingest(u)?,
            6..=8 => Command::Seal {
                stamp: self.stamp,
                max: *u.choose(&[1, 2, 3, 1_000])?,
                session_ttl_ms: *u.choose(&[1_000, 60_000, 86_400_000])?,
            },
            _ => match u8::arbitrary(u)? {
                n if n % 2 == 0 => Command::Ack { cursor: "out".into(), upto_seq: u64::from(n) },
                n => Command::Trim { below: u64::from(n) },
            },
        })
    }

    fn ingest(&mut self, u: &mut Unstructured<'_>) -> Result<Command> {
        let mut rules = BTreeMap::new();
        for s in STREAMS.iter().take(u.int_in_range(1..=3)?) {
            rules.insert((*s).to_owned(), stream_rules(u)?);
        }
        let mut groups = Vec::new();
        for _ in 0..u.int_in_range(1..=3)? {
            let range = match u.int_in_range(0u8..=4)? {
                0 => None,
                p => {
                    let p = usize::from(p % 2);
                    let last = self.seqs[p];
                    let (first, n) = match u.int_in_range(0u8..=5)? {
                        0 => (last.saturating_sub(u64::from(u8::arbitrary(u)?)).max(1), 1), // a retry or overlap
                        _ => (last + 1, u64::from(u.int_in_range(1u8..=4)?)),
                    };
                    self.seqs[p] = self.seqs[p].max(first + n - 1);
                    Some(ProducerRange { producer: p as u64 + 1, first_seq: first, last_seq: first + n - 1 })
                }
            };
            let mut partials = Vec::new();
            for _ in 0..u.int_in_range(1..=4)? {
                let stream = *u.choose(STREAMS)?;
                let key = BufKey { stream: stream.into(), key: (*u.choose(KEYS)?).into() };
                let op = rules.get(stream).map_or(MergeOp::Count, |r: &StreamRules| r.op.clone());
                if let Some(p) = partial(u, &op, self.stamp)? {
                    partials.push((key, p));
                }
            }
            groups.push(IngestGroup { range, partials });
        }
        let limits = ShardLimits {
            max_keys: *u.choose(&[1, 2, 3, 1_000_000])?,
            max_bytes: *u.choose(&[100, 300, 1_000, 1 << 28])?,
        };
        Ok(Command::Ingest { stamp: self.stamp, rules, limits, groups })
    }
}

/// A partial of `op`: 1..=3 lifted values merged as a node's pre-merge does (`None` if no value fit).
fn partial(u: &mut Unstructured<'_>, op: &MergeOp, stamp: u64) -> Result<Option<Partial>> {
    let mut p: Option<Partial> = None;
    for _ in 0..u.int_in_range(1..=3)? {
        let at = stamp.saturating_sub(u64::from(u16::arbitrary(u)?));
        let Ok(agg) = op.lift(&crate::merge::value(u)?, at) else { continue };
        match &mut p {
            None => p = Some(Partial { agg, inputs: 1, first_event_at: at, last_event_at: at, samples: None }),
            Some(p) => {
                if p.agg.merge(&agg, op).is_ok() {
                    p.inputs += 1;
                    p.first_event_at = p.first_event_at.min(at);
                    p.last_event_at = p.last_event_at.max(at);
                }
            }
        }
    }
    Ok(p)
}

fn duration(u: &mut Unstructured<'_>) -> Result<Option<u64>> {
    Ok(if bool::arbitrary(u)? { Some(*u.choose(DURATIONS)?) } else { None })
}

/// Rules that mostly pass [`StreamRules::check`] (a refused entry is skipped, so the pieces are
/// drawn from valid ones; the rare invalid one exercises the refusal).
fn stream_rules(u: &mut Unstructured<'_>) -> Result<StreamRules> {
    let mut op = crate::merge::merge_op(u)?;
    if op.validate().is_err() {
        op = MergeOp::SumI64;
    }
    let mut window = WindowPolicy {
        tumbling_ms: duration(u)?,
        max_wait_ms: duration(u)?,
        debounce_ms: None,
        idle_ms: duration(u)?,
        max_count: if bool::arbitrary(u)? { Some(u64::from(u.int_in_range(1u8..=5)?)) } else { None },
        max_bytes: if bool::arbitrary(u)? { Some(*u.choose(&[1, 64, 1_000, 5_000, 20_000])?) } else { None },
        adaptive: None,
    };
    if window.tumbling_ms.is_none() && window.max_wait_ms.is_none() {
        window.max_wait_ms = Some(*u.choose(DURATIONS)?);
    }
    if let Some(max_wait) = window.max_wait_ms
        && bool::arbitrary(u)?
    {
        window.debounce_ms = Some(max_wait / u64::from(u.int_in_range(1u8..=4)?)).filter(|d| *d > 0);
    }
    if bool::arbitrary(u)? {
        let base = window.staleness_bound_ms();
        let policy = AdaptivePolicy {
            max_staleness_ms: (base + *u.choose(&[0, 10, 1_000, 60_000])?).min(7 * 24 * 3_600_000),
            base_bound_ms: base,
            backlog_high: 100,
            backlog_low: 25,
            lag_high_ms: 5_000,
            buffer_high_permille: 800,
            adjust_every_ms: base.clamp(100, 10_000),
            cooldown: 3,
            extra_ms: 0,
        };
        window.adaptive = Some(policy.with_extra(if bool::arbitrary(u)? { u64::arbitrary(u)? } else { 0 }));
    }
    Ok(StreamRules {
        op,
        window,
        overflow: *u.choose(&[OverflowPolicy::Reject, OverflowPolicy::FlushEarly, OverflowPolicy::Shed])?,
        samples: if bool::arbitrary(u)? { Some(crate::merge::sample_policy(u)?) } else { None },
        key_overflow: *u.choose(&[KeyOverflow::FlushEarly, KeyOverflow::Reject])?,
    })
}
