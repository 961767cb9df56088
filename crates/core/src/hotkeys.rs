//! Hot keys: the heaviest (stream, key) pairs of a shard by input rate, in bounded memory.
//!
//! A shard leader sees every input of its shard. Which keys carry most of them is what an
//! operator asks first when a shard runs hot (is one tenant flooding? is the coalesce ratio high
//! because of a few keys?), and it cannot be answered by counting every key: a shard may hold a
//! million. [`HotKeys`] answers it with **Space-Saving** (Metwally, Agrawal, El Abbadi, "Efficient
//! computation of frequent and top-k elements in data streams", ICDT 2005), weighted:
//!
//! - `m` counters (default 64), each (key, count, error). An observed key with a counter adds its
//!   weight; a new key takes a free counter, or else *replaces the smallest counter*, inheriting
//!   its count as `error`: `count = min + weight`, `error = min`.
//! - Guarantees (for any input order): every reported `count` overestimates the key's true count
//!   by at most its `error` (`count - error ≤ true ≤ count`), `error ≤ total / m`, and every key
//!   whose true count exceeds `total / m` holds a counter. Ties for the smallest counter go to the
//!   lowest slot, so the same observations give the same state.
//!
//! **Decay (why exponential).** Inputs *per second* matter, not inputs since the leader started.
//! [`HotKeys::tick`] multiplies every count, error and the total by `2^(-elapsed / half_life)`.
//! Space-Saving is homogeneous — scaling all past weights by one factor scales all counters by it
//! and keeps every comparison — so after decay the state is exactly Space-Saving over the
//! *exponentially weighted* stream, and the guarantees above hold for decayed counts. A key with
//! a steady rate `r` converges to `count ≈ r·τ` (τ = half_life / ln 2), from which
//! [`HotKey::rate_per_sec`] is derived (corrected for a tracker younger than a few half-lives).
//! Two alternating epochs would also work but report with an epoch's delay and drop all history
//! at each rotation; decay needs one summary and reacts continuously. Counts are `f64` for this
//! reason (integer weights below 2^53 stay exact while there is no decay).
//!
//! **Memory.** `m` counters plus a hash index of slot numbers; stream names and keys are cut to
//! `max_key_bytes` (default 128) at a character boundary, and [`HotKey::key_truncated`] says so.
//! Keys sharing a cut prefix share a counter, which then bounds each of them from above.
//!
//! **Why our own code.** The crates.io implementations seen (`topk`: Filtered Space-Saving, integer
//! counts, no decay; copies inside larger database crates) lack weighted updates with decay and
//! a deterministic order, and the algorithm is ~100 lines.
//!
//! This tracker is leader-local telemetry, not replicated state: it is not serialized, and a new
//! leader starts empty. Feed it on the leader when it proposes an Ingest entry:
//! `observe(stream, key, partial.inputs)` for each partial.

use std::hash::{BuildHasher, Hash};

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::time::Millis;

/// Default number of counters.
pub const DEFAULT_CAPACITY: usize = 64;
/// Largest accepted number of counters.
pub const MAX_CAPACITY: usize = 4096;
/// Default cap on the stored bytes of a key (and of a stream name).
pub const DEFAULT_MAX_KEY_BYTES: usize = 128;
/// Default decay half-life.
pub const DEFAULT_HALF_LIFE_MS: u64 = 60_000;

/// Tracker settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotKeysConfig {
    /// Counters kept (`m`), clamped to `1..=MAX_CAPACITY`.
    pub capacity: usize,
    /// Bytes of a key (and of a stream name) kept, at least 1.
    pub max_key_bytes: usize,
    /// Decay half-life; `None` counts forever (no rates reported).
    pub half_life_ms: Option<u64>,
}

impl Default for HotKeysConfig {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_CAPACITY,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            half_life_ms: Some(DEFAULT_HALF_LIFE_MS),
        }
    }
}

/// One reported hot key.
#[derive(Clone, Debug, PartialEq)]
pub struct HotKey {
    pub stream: String,
    pub key: String,
    /// The key (or stream name) was cut to `max_key_bytes`.
    pub key_truncated: bool,
    /// Estimated (decayed) inputs; at least the true count.
    pub count: f64,
    /// Most the count may overestimate by: `count - error ≤ true ≤ count`.
    pub error: f64,
    /// Estimated inputs per second (decaying trackers only, after their first tick interval).
    pub rate_per_sec: Option<f64>,
}

impl HotKey {
    /// The count the key certainly had: `count - error`.
    pub fn guaranteed_count(&self) -> f64 {
        self.count - self.error
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Counter {
    stream: String,
    key: String,
    truncated: bool,
    count: f64,
    error: f64,
}

/// The hash of a counter's identity; borrowed so lookups allocate nothing.
#[derive(Hash)]
struct IdRef<'a> {
    stream: &'a str,
    key: &'a str,
    truncated: bool,
}

/// A bounded top-k heavy-hitters tracker (weighted Space-Saving with exponential decay).
#[derive(Clone, Debug)]
pub struct HotKeys {
    config: HotKeysConfig,
    counters: Vec<Counter>,
    /// Slot numbers, hashed by their counter's identity.
    index: HashTable<usize>,
    hasher: DefaultHashBuilder,
    /// Decayed total weight observed.
    total: f64,
    /// First and last tick: the decay clock.
    first_tick: Option<Millis>,
    last_tick: Option<Millis>,
}

/// `s` cut to at most `max` bytes at a character boundary, and whether it was cut.
fn cut(s: &str, max: usize) -> (&str, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], true)
}

impl Default for HotKeys {
    fn default() -> Self {
        Self::new(HotKeysConfig::default())
    }
}

impl HotKeys {
    /// An empty tracker.
    pub fn new(config: HotKeysConfig) -> Self {
        let config = HotKeysConfig {
            capacity: config.capacity.clamp(1, MAX_CAPACITY),
            max_key_bytes: config.max_key_bytes.max(1),
            half_life_ms: config.half_life_ms.filter(|&h| h > 0),
        };
        Self {
            config,
            counters: Vec::with_capacity(config.capacity),
            index: HashTable::with_capacity(config.capacity),
            hasher: DefaultHashBuilder::default(),
            total: 0.0,
            first_tick: None,
            last_tick: None,
        }
    }

    /// The settings (after clamping).
    pub fn config(&self) -> &HotKeysConfig {
        &self.config
    }

    /// Counts `weight` inputs (a partial's `inputs`) for `(stream, key)`.
    pub fn observe(&mut self, stream: &str, key: &str, weight: u64) {
        if weight == 0 {
            return;
        }
        let w = weight as f64;
        self.total += w;
        let (stream, s_cut) = cut(stream, self.config.max_key_bytes);
        let (key, k_cut) = cut(key, self.config.max_key_bytes);
        let id = IdRef { stream, key, truncated: s_cut || k_cut };
        let hash = self.hasher.hash_one(&id);
        let counters = &self.counters;
        let found = self.index.find(hash, |&i| {
            let c = &counters[i];
            c.stream == id.stream && c.key == id.key && c.truncated == id.truncated
        });
        if let Some(&slot) = found {
            self.counters[slot].count += w;
            return;
        }
        let slot = if self.counters.len() < self.config.capacity {
            self.counters.push(Counter {
                stream: id.stream.to_owned(),
                key: id.key.to_owned(),
                truncated: id.truncated,
                count: w,
                error: 0.0,
            });
            self.counters.len() - 1
        } else {
            // Replace the smallest counter (lowest slot on ties); it passes its count on as error.
            let mut slot = 0;
            for (i, c) in self.counters.iter().enumerate() {
                if c.count < self.counters[slot].count {
                    slot = i;
                }
            }
            let old = &self.counters[slot];
            let old_hash = self.hasher.hash_one(IdRef { stream: &old.stream, key: &old.key, truncated: old.truncated });
            if let Ok(entry) = self.index.find_entry(old_hash, |&i| i == slot) {
                entry.remove();
            }
            let c = &mut self.counters[slot];
            c.error = c.count;
            c.count += w;
            c.stream.clear();
            c.stream.push_str(id.stream);
            c.key.clear();
            c.key.push_str(id.key);
            c.truncated = id.truncated;
            slot
        };
        let (counters, hasher) = (&self.counters, &self.hasher);
        self.index.insert_unique(hash, slot, |&i| {
            let c = &counters[i];
            hasher.hash_one(IdRef { stream: &c.stream, key: &c.key, truncated: c.truncated })
        });
    }

    /// Advances the decay clock to `now`: counts, errors and the total are multiplied by
    /// `2^(-(now - last tick) / half_life)`. Call it first when the tracker starts, then
    /// periodically (every second, well under the half-life) and before [`HotKeys::top`].
    /// A clock going backwards is ignored.
    pub fn tick(&mut self, now: Millis) {
        let Some(half_life) = self.config.half_life_ms else { return };
        let Some(last) = self.last_tick else {
            self.first_tick = Some(now);
            self.last_tick = Some(now);
            return;
        };
        if now <= last {
            return;
        }
        let factor = 0.5f64.powf((now - last) as f64 / half_life as f64);
        for c in &mut self.counters {
            c.count *= factor;
            c.error *= factor;
        }
        self.total *= factor;
        self.last_tick = Some(now);
    }

    /// Multiplies all counts by `factor` in `(0, 1]` directly (for callers with their own
    /// schedule); the same as a tick of `-log2(factor)` half-lives, without moving the clock.
    pub fn decay(&mut self, factor: f64) {
        if !(factor > 0.0 && factor <= 1.0) {
            return;
        }
        for c in &mut self.counters {
            c.count *= factor;
            c.error *= factor;
        }
        self.total *= factor;
    }

    /// Inputs per second from a decayed count: a steady rate `r` started `t` ago gives
    /// `count = r·τ·(1 - e^(-t/τ))`.
    fn rate(&self, count: f64) -> Option<f64> {
        let half_life = self.config.half_life_ms? as f64 / 1000.0;
        let elapsed = self.last_tick?.saturating_sub(self.first_tick?) as f64 / 1000.0;
        if elapsed <= 0.0 {
            return None;
        }
        let tau = half_life / std::f64::consts::LN_2;
        Some(count / (tau * (1.0 - (-elapsed / tau).exp())))
    }

    /// The `k` heaviest keys, by count (descending), then stream and key: a deterministic order.
    pub fn top(&self, k: usize) -> Vec<HotKey> {
        let mut order: Vec<&Counter> = self.counters.iter().filter(|c| c.count > 0.0).collect();
        order.sort_by(|a, b| {
            b.count.total_cmp(&a.count).then_with(|| a.stream.cmp(&b.stream)).then_with(|| a.key.cmp(&b.key))
        });
        order
            .into_iter()
            .take(k)
            .map(|c| HotKey {
                stream: c.stream.clone(),
                key: c.key.clone(),
                key_truncated: c.truncated,
                count: c.count,
                error: c.error,
                rate_per_sec: self.rate(c.count),
            })
            .collect()
    }

    /// Decayed total weight observed (for "share of the shard's inputs").
    pub fn total(&self) -> f64 {
        self.total
    }

    /// Inputs per second over the whole shard, estimated like a key's rate.
    pub fn total_rate_per_sec(&self) -> Option<f64> {
        self.rate(self.total)
    }

    /// Keys tracked (at most the capacity).
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    /// The most an untracked key's count can be: the smallest counter when all are in use, else 0.
    pub fn untracked_bound(&self) -> f64 {
        if self.counters.len() < self.config.capacity {
            0.0
        } else {
            self.counters.iter().map(|c| c.count).fold(f64::INFINITY, f64::min)
        }
    }

    /// Forgets everything (e.g. when the node loses the shard's leadership).
    pub fn clear(&mut self) {
        self.counters.clear();
        self.index.clear();
        self.total = 0.0;
        self.first_tick = None;
        self.last_tick = None;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn no_decay(capacity: usize) -> HotKeys {
        HotKeys::new(HotKeysConfig { capacity, half_life_ms: None, ..Default::default() })
    }

    #[test]
    fn replacement_inherits_the_smallest_count_as_error() {
        let mut h = no_decay(2);
        h.observe("s", "a", 5);
        h.observe("s", "b", 2);
        h.observe("s", "c", 1); // replaces b
        let top = h.top(10);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].key.as_str(), top[0].count, top[0].error), ("a", 5.0, 0.0));
        assert_eq!((top[1].key.as_str(), top[1].count, top[1].error), ("c", 3.0, 2.0));
        assert_eq!(h.untracked_bound(), 3.0);
        h.observe("s", "c", 2);
        let top = h.top(2);
        assert_eq!((top[0].count, top[1].count), (5.0, 5.0));
        assert_eq!((top[0].key.as_str(), top[1].key.as_str()), ("a", "c"), "ties order by key");
    }

    #[test]
    fn long_keys_are_cut_and_share_a_counter() {
        let mut h = HotKeys::new(HotKeysConfig { max_key_bytes: 4, half_life_ms: None, ..Default::default() });
        h.observe("s", "abcdef", 1);
        h.observe("s", "abcdxy", 2);
        h.observe("s", "abcd", 4);
        h.observe("s", "ééé", 1); // 6 bytes, cut to 4 at a char boundary
        let top = h.top(10);
        assert_eq!(top.len(), 3);
        assert_eq!((top[0].key.as_str(), top[0].key_truncated, top[0].count), ("abcd", false, 4.0));
        assert_eq!((top[1].key.as_str(), top[1].key_truncated, top[1].count), ("abcd", true, 3.0));
        assert_eq!((top[2].key.as_str(), top[2].key_truncated), ("éé", true));
    }

    #[test]
    fn decay_turns_counts_into_rates() {
        let mut h = HotKeys::new(HotKeysConfig { half_life_ms: Some(10_000), ..Default::default() });
        h.tick(0);
        // 100/s on "hot" and 10/s on "warm" for 30 s, ticking every 100 ms.
        for t in 1..=300u64 {
            h.observe("s", "hot", 10);
            h.observe("s", "warm", 1);
            h.tick(t * 100);
        }
        let top = h.top(2);
        let hot = top[0].rate_per_sec.unwrap();
        let warm = top[1].rate_per_sec.unwrap();
        assert!((95.0..=101.0).contains(&hot), "{hot}");
        assert!((9.5..=10.1).contains(&warm), "{warm}");
        assert!((104.0..=111.0).contains(&h.total_rate_per_sec().unwrap()));
        // "hot" stops; after 3 half-lives its count is an eighth.
        let before = h.top(1)[0].count;
        for t in 301..=600u64 {
            h.observe("s", "warm", 1);
            h.tick(t * 100);
        }
        let after = h.top(2).into_iter().find(|k| k.key == "hot").unwrap().count;
        assert!((after / before - 0.125).abs() < 1e-9, "{after} {before}");
        h.clear();
        assert!(h.is_empty() && h.top(1).is_empty());
    }
}
