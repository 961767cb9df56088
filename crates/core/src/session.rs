//! Idempotent producers.
//!
//! A producer has an id (random 64-bit, chosen by the client) and numbers its events with
//! strictly increasing sequence numbers. A producer id has at most one request in flight (the
//! client crate runs one id per concurrent lane); a retry resends the same events with the same
//! seqs. Each shard keeps, per producer, the highest seq it has accepted; a request's events for
//! that shard cover `first..=last` and are accepted only if `first > highest`. If `last <=
//! highest` they are duplicates: acknowledged, not applied again. Anything in between means the
//! client broke the contract and is refused (FAILED_PRECONDITION) rather than guessed at.
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
pub fn check_range(session: Option<Session>, range: &ProducerRange) -> SeqCheck {
    match session {
        None => SeqCheck::New,
        Some(s) if range.first_seq > s.last_seq => SeqCheck::New,
        Some(s) if range.last_seq <= s.last_seq => SeqCheck::Duplicate,
        Some(s) => SeqCheck::Overlap { accepted: s.last_seq },
    }
}

/// One producer's state on one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub last_seq: u64,
    pub last_seen: Millis,
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
        check_range(self.sessions.get(&range.producer).copied(), range)
    }

    /// Records that `range` was accepted at `stamp`.
    pub fn record(&mut self, range: &ProducerRange, stamp: Millis) {
        let entry = self.sessions.entry(range.producer).or_insert(Session { last_seq: 0, last_seen: stamp });
        self.by_age.remove(&(entry.last_seen, range.producer));
        entry.last_seq = entry.last_seq.max(range.last_seq);
        entry.last_seen = entry.last_seen.max(stamp);
        self.by_age.insert((entry.last_seen, range.producer));
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
        assert_eq!(t.check(&r(1, 3, 4)), SeqCheck::Duplicate);
        assert_eq!(t.check(&r(1, 4, 9)), SeqCheck::Overlap { accepted: 5 });
        assert_eq!(t.check(&r(1, 6, 9)), SeqCheck::New);
        assert_eq!(t.check(&r(2, 1, 1)), SeqCheck::New);
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
                    SeqCheck::Overlap { .. } => prop_assert!(false, "well-behaved producer saw overlap"),
                }
            }
            prop_assert!(applied.values().all(|&c| c == 1));
            for p in 0..3u64 {
                for s in 1..next[p as usize] { prop_assert_eq!(applied.get(&(p, s)), Some(&1)); }
            }
        }
    }
}
