//! Idempotent producers.
//!
//! A producer has an id (random 64-bit, chosen by the client) and numbers its events with
//! strictly increasing sequence numbers. A producer id has at most one request in flight (the
//! client crate runs one id per concurrent lane); a retry resends the same events with the same
//! seqs. A request's events for one shard cover `first..=last` of the producer's seqs (the seqs
//! in between went to other shards). Each shard keeps, per producer, the highest seq it has
//! accepted and the ranges of the last [`RECENT_RANGES`] requests it applied (as Kafka keeps
//! its producers' last five batches). A range is:
//!
//! - **new** if `first > highest`: applied;
//! - a **duplicate** if it is exactly one of the recent ranges: acknowledged, not applied
//!   again (a retry of a request whose first attempt was committed after all);
//! - an **overlap** if `first <= highest < last`: refused (FAILED_PRECONDITION
//!   `sequence_overlap`) — the client broke the contract, and guessing would lose or double
//!   events;
//! - **too old** if `last <= highest` but it is none of the recent ranges: refused
//!   (FAILED_PRECONDITION `sequence_too_old`). This is a producer that restarted its seqs
//!   under the same id, or a retry of a request older than the last few; answering DUPLICATE
//!   there would drop events the shard never applied, without an error.
//!
//! What the rule cannot tell apart: a restarted producer whose new request has exactly the
//! seqs of one of its last requests to that shard looks like a retry. A producer id names one
//! run of a producer; a restarted process takes a new id (the client crate picks a random one).
//!
//! Sessions written before December 2026 carry no ranges; they read as one range covering
//! `1..=highest` that any range inside it matches ([`Session::legacy`]) — the old rule — until
//! newer requests push it out.
//!
//! The table is bounded: sessions idle longer than the TTL, and the least recently used ones
//! beyond `max_sessions`, are forgotten (deterministically, by leader stamps). A retry arriving
//! after its session was forgotten would be applied again; the TTL (default 24 h) is documented.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::time::Millis;

/// The seqs one request covers for one producer on one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerRange {
    pub producer: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// The verdict on a producer range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqCheck {
    /// Never seen: apply it.
    New,
    /// Already applied: acknowledge without applying.
    Duplicate,
    /// Partly applied or out of order: refuse.
    Overlap { accepted: u64 },
    /// At or below the highest accepted seq, yet not one of the ranges applied recently: refuse.
    TooOld { accepted: u64 },
}

impl ProducerRange {
    /// A range covers at least one seq: `first_seq <= last_seq`.
    pub fn check(&self) -> Result<(), String> {
        if self.first_seq > self.last_seq {
            return Err(format!(
                "producer {} range {}..={} is empty (first_seq > last_seq)",
                self.producer, self.first_seq, self.last_seq
            ));
        }
        Ok(())
    }
}

/// The verdict for `range` given the producer's session (`None`: never seen or expired).
pub fn check_range(session: Option<&Session>, range: &ProducerRange) -> SeqCheck {
    match session {
        None => SeqCheck::New,
        Some(s) if range.first_seq > s.last_seq => SeqCheck::New,
        Some(s) if range.last_seq > s.last_seq => SeqCheck::Overlap { accepted: s.last_seq },
        Some(s) if s.applied(range) => SeqCheck::Duplicate,
        Some(s) => SeqCheck::TooOld { accepted: s.last_seq },
    }
}

/// How many of a producer's last request ranges a shard remembers.
pub const RECENT_RANGES: usize = 5;

/// One producer's state on one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The highest seq accepted.
    pub last_seq: u64,
    /// The stamp of the last accepted request (for expiry).
    pub last_seen: Millis,
    /// `(first, last)` of the last requests applied, newest first; `(0, 0)` is an empty slot,
    /// and a range with `first == 0` stands for "every range inside it" ([`Session::legacy`]).
    pub recent: [(u64, u64); RECENT_RANGES],
}

impl Session {
    /// A session stored before ranges were kept: every range within `1..=last_seq` reads as
    /// applied (the rule of that time).
    pub fn legacy(last_seq: u64, last_seen: Millis) -> Self {
        let mut recent = [(0, 0); RECENT_RANGES];
        recent[0] = (0, last_seq);
        Self { last_seq, last_seen, recent }
    }

    /// Whether `range` is one this session applied recently.
    pub fn applied(&self, range: &ProducerRange) -> bool {
        self.recent.iter().any(|&(first, last)| match first {
            0 => last > 0 && range.first_seq >= 1 && range.last_seq <= last,
            _ => (first, last) == (range.first_seq, range.last_seq),
        })
    }

    /// `previous` (the session before, if any) after applying `range` at `stamp`.
    pub fn after(previous: Option<&Session>, range: &ProducerRange, stamp: Millis) -> Self {
        let mut s = previous.copied().unwrap_or(Session { last_seq: 0, last_seen: stamp, recent: Default::default() });
        s.last_seq = s.last_seq.max(range.last_seq);
        s.last_seen = s.last_seen.max(stamp);
        s.recent.copy_within(0..RECENT_RANGES - 1, 1);
        s.recent[0] = (range.first_seq, range.last_seq);
        s
    }
}

/// The producer session table of one shard.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProducerSessions {
    sessions: BTreeMap<u64, Session>,
    /// (last_seen, producer): eviction order.
    by_age: BTreeSet<(Millis, u64)>,
}

/// Default session TTL.
pub const DEFAULT_SESSION_TTL_MS: u64 = 24 * 3600 * 1000;

impl ProducerSessions {
    /// The verdict for `range` against what this table has accepted.
    pub fn check(&self, range: &ProducerRange) -> SeqCheck {
        check_range(self.sessions.get(&range.producer), range)
    }

    /// Records that `range` was accepted at `stamp`.
    pub fn record(&mut self, range: &ProducerRange, stamp: Millis) {
        let next = Session::after(self.sessions.get(&range.producer), range, stamp);
        self.insert(range.producer, next);
    }

    /// Forgets sessions idle since before `now - ttl_ms`, then the oldest beyond `max_sessions`.
    /// Returns the forgotten producer ids.
    pub fn expire(&mut self, now: Millis, ttl_ms: u64, max_sessions: usize) -> Vec<u64> {
        let cutoff = now.saturating_sub(ttl_ms);
        let mut gone = Vec::new();
        while let Some(&(seen, id)) = self.by_age.first() {
            if seen >= cutoff && self.sessions.len() <= max_sessions {
                break;
            }
            self.by_age.pop_first();
            self.sessions.remove(&id);
            gone.push(id);
        }
        gone
    }

    /// The session of `producer`, if any.
    pub fn get(&self, producer: u64) -> Option<Session> {
        self.sessions.get(&producer).copied()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// All sessions in producer order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Session)> + '_ {
        self.sessions.iter().map(|(k, v)| (*k, *v))
    }

    /// Restores a session (when loading from storage).
    pub fn insert(&mut self, producer: u64, session: Session) {
        if let Some(old) = self.sessions.insert(producer, session) {
            self.by_age.remove(&(old.last_seen, producer));
        }
        self.by_age.insert((session.last_seen, producer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(producer: u64, first_seq: u64, last_seq: u64) -> ProducerRange {
        ProducerRange { producer, first_seq, last_seq }
    }

    #[test]
    fn duplicates_and_overlaps() {
        let mut t = ProducerSessions::default();
        assert_eq!(t.check(&r(1, 1, 5)), SeqCheck::New);
        t.record(&r(1, 1, 5), 10);
        assert_eq!(t.check(&r(1, 1, 5)), SeqCheck::Duplicate);
        assert_eq!(t.check(&r(1, 3, 4)), SeqCheck::TooOld { accepted: 5 }, "never sent as one request");
        assert_eq!(t.check(&r(1, 4, 9)), SeqCheck::Overlap { accepted: 5 });
        assert_eq!(t.check(&r(1, 6, 9)), SeqCheck::New);
        assert_eq!(t.check(&r(2, 1, 1)), SeqCheck::New);
    }

    /// The outside client's case: seq 100, then a new event with seq 50 under the same id.
    #[test]
    fn a_restarted_counter_is_an_error_not_a_duplicate() {
        let mut t = ProducerSessions::default();
        t.record(&r(1, 100, 100), 10);
        assert_eq!(t.check(&r(1, 50, 50)), SeqCheck::TooOld { accepted: 100 });
        assert_eq!(t.check(&r(1, 100, 100)), SeqCheck::Duplicate);
    }

    #[test]
    fn the_last_ranges_are_remembered_and_older_ones_are_too_old() {
        let mut t = ProducerSessions::default();
        for i in 0..(RECENT_RANGES as u64 + 2) {
            t.record(&r(1, 10 * i + 1, 10 * i + 3), i);
        }
        // The two oldest fell out; the last five are duplicates.
        assert_eq!(t.check(&r(1, 1, 3)), SeqCheck::TooOld { accepted: 63 });
        assert_eq!(t.check(&r(1, 11, 13)), SeqCheck::TooOld { accepted: 63 });
        for i in 2..(RECENT_RANGES as u64 + 2) {
            assert_eq!(t.check(&r(1, 10 * i + 1, 10 * i + 3)), SeqCheck::Duplicate, "range {i}");
        }
        assert_eq!(t.get(1).unwrap().recent[0], (61, 63), "newest first");
    }

    #[test]
    fn legacy_sessions_keep_the_old_rule_until_pushed_out() {
        let mut t = ProducerSessions::default();
        t.insert(1, Session::legacy(40, 5));
        assert_eq!(t.check(&r(1, 3, 4)), SeqCheck::Duplicate);
        assert_eq!(t.check(&r(1, 1, 40)), SeqCheck::Duplicate);
        assert_eq!(t.check(&r(1, 39, 41)), SeqCheck::Overlap { accepted: 40 });
        for i in 0..RECENT_RANGES as u64 {
            t.record(&r(1, 41 + i, 41 + i), 6 + i);
        }
        assert_eq!(t.check(&r(1, 3, 4)), SeqCheck::TooOld { accepted: 45 });
        assert_eq!(t.check(&r(1, 45, 45)), SeqCheck::Duplicate);
    }

    #[test]
    fn expiry_is_bounded_and_by_age() {
        let mut t = ProducerSessions::default();
        for p in 0..10 {
            t.record(&r(p, 1, 1), p * 100);
        }
        assert_eq!(t.expire(1_000, 10_000, 8), vec![0, 1]);
        assert_eq!(t.len(), 8);
        assert_eq!(t.expire(1_000, 500, 8), vec![2, 3, 4]);
        assert_eq!(t.check(&r(2, 1, 1)), SeqCheck::New);
        assert_eq!(t.check(&r(9, 1, 1)), SeqCheck::Duplicate);
    }

    proptest! {
        /// Model: a set of applied (producer, seq). Requests are retried at random; every seq is
        /// applied exactly once whatever the retry pattern.
        #[test]
        fn retries_never_apply_twice(ops in prop::collection::vec((0u64..3, 1u64..4, any::<bool>()), 1..200)) {
            let mut table = ProducerSessions::default();
            let mut next = [1u64; 3];
            let mut last_req: [Option<ProducerRange>; 3] = [None; 3];
            let mut applied = std::collections::BTreeMap::<(u64, u64), u32>::new();
            for (i, (p, n, retry)) in ops.into_iter().enumerate() {
                let req = match (retry, last_req[p as usize]) {
                    (true, Some(prev)) => prev,
                    _ => { let req = r(p, next[p as usize], next[p as usize] + n - 1); next[p as usize] += n; req }
                };
                last_req[p as usize] = Some(req);
                match table.check(&req) {
                    SeqCheck::New => {
                        table.record(&req, i as u64);
                        for s in req.first_seq..=req.last_seq { *applied.entry((p, s)).or_default() += 1; }
                    }
                    SeqCheck::Duplicate => {}
                    other => prop_assert!(false, "well-behaved producer saw {:?}", other),
                }
            }
            prop_assert!(applied.values().all(|&c| c == 1));
            for p in 0..3u64 {
                for s in 1..next[p as usize] { prop_assert_eq!(applied.get(&(p, s)), Some(&1)); }
            }
        }

        /// Model: a producer that restarts its counter under the same id (new events, seqs
        /// from 1 again) is never answered DUPLICATE for a request it did not send before —
        /// unless that request has exactly the seqs of one of its last requests (documented).
        #[test]
        fn restarted_producers_are_not_silently_deduplicated(
            first_run in prop::collection::vec(1u64..6, 1..20),
            second_run in prop::collection::vec(1u64..6, 1..20),
        ) {
            let mut table = ProducerSessions::default();
            let mut sent = Vec::new();
            let mut next = 1;
            for (i, n) in first_run.into_iter().enumerate() {
                let req = r(7, next, next + n - 1);
                next += n;
                prop_assert_eq!(table.check(&req), SeqCheck::New);
                table.record(&req, i as u64);
                sent.push((req.first_seq, req.last_seq));
            }
            let recent: Vec<_> = sent.iter().rev().take(RECENT_RANGES).copied().collect();
            let mut next = 1;
            for (i, n) in second_run.into_iter().enumerate() {
                let req = r(7, next, next + n - 1);
                next += n;
                match table.check(&req) {
                    SeqCheck::New => table.record(&req, 100 + i as u64),
                    SeqCheck::Duplicate => {
                        prop_assert!(recent.contains(&(req.first_seq, req.last_seq)), "{:?} is a new request", req);
                    }
                    SeqCheck::Overlap { .. } | SeqCheck::TooOld { .. } => {}
                }
            }
        }
    }
}
