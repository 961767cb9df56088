//! Representative samples of the inputs a window folded — suppression visibility.
//!
//! A dedupe stream (alerts, notifications) turns many inputs into one output; the output's
//! `inputs` says *how many* were suppressed, and its samples show *which* — up to `n` of the
//! folded inputs (value and event time), picked one of three ways:
//!
//! | `pick`      | keeps                                                            |
//! |-------------|------------------------------------------------------------------|
//! | `first`     | the first `n` inputs in arrival order (request order, then log order) |
//! | `last`      | the last `n` inputs in arrival order                             |
//! | `reservoir` | a uniform random sample of `n` inputs, the same on every replica |
//!
//! ```toml
//! [streams.alerts]
//! merge = "count"
//! window = { tumbling = "5m" }
//! samples = { n = 3, pick = "reservoir" }   # max_value_bytes = 1024 by default
//! ```
//!
//! Samples are merged wherever aggregates are: in the request pre-merge ([`crate::batch`]), and
//! when a Raft entry is applied to the buffered window ([`crate::buffer`]). So they travel in
//! [`crate::batch::Partial`], [`crate::buffer::Buffered`] and [`crate::output::Output`], and
//! [`Samples::merge`] must be associative (grouping inputs into partials differently never
//! changes the result) and deterministic (no clock, no randomness, no hash-map order):
//! - `first`/`last`: concatenation followed by keeping a prefix/suffix of length `n` is
//!   associative. Arrival order is the order the log fixes, so every replica agrees.
//! - `reservoir`: every input gets a *priority*, a 64-bit XXH3 hash (the same hash family the
//!   shard function uses, [`crate::hash`]) of its canonical value bytes, event time and a salt
//!   that tells equal inputs apart (the producer's (id, seq), else the receiving node's stamp and
//!   the event's position in the request). A merge keeps the `n` items of smallest priority
//!   (bottom-n). Bottom-n of a union equals bottom-n of the union of bottom-n's, so the merge is
//!   associative *and* commutative: the sample does not depend on how inputs were grouped or
//!   ordered. Because the priorities behave like independent uniform draws, the kept set is a
//!   uniform sample without replacement (this is "priority sampling" / bottom-k sketching; the
//!   classic one-pass reservoir algorithm R is not mergeable). Ties on priority are broken by
//!   event time, then by value bytes, so the order is total and the result is unique.
//!
//! Memory is bounded: at most [`MAX_SAMPLES`] samples per window, each value cut to the policy's
//! `max_value_bytes` (text at a character boundary, bytes by length, JSON replaced by its text cut
//! the same way; numbers and `none` are never cut) with [`Sample::truncated`] set. Sample bytes are
//! counted against the shard's byte limit with the aggregate.
//!
//! **Encoding.** Raft entries, buffered windows and outbox outputs are postcard, which is
//! positional: the `samples` fields (and [`crate::stream::StreamRules::samples`]) changed their
//! encoding, and bytes written before them do not decode (`DeserializeUnexpectedEnd`, tested);
//! `#[serde(default)]` only helps self-describing formats. There is no on-disk format version
//! yet, so a cluster upgrading across this change starts from empty storage.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::error::ConfigError;
use crate::time::Millis;
use crate::value::Value;

/// Most samples a stream may keep per window.
pub const MAX_SAMPLES: usize = 32;
/// Default cap on one sample's value bytes (never more than the stream's `max_value_bytes`).
pub const DEFAULT_SAMPLE_VALUE_BYTES: usize = 1024;
/// Bytes accounted per sample on top of its value (event time, priority, flags).
pub const SAMPLE_OVERHEAD_BYTES: usize = 24;

/// Which inputs a window keeps as samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SamplePick {
    /// The first `n` inputs in arrival order.
    #[default]
    First,
    /// The last `n` inputs in arrival order.
    Last,
    /// A uniform, deterministic, order-independent sample of `n` inputs.
    Reservoir,
}

impl SamplePick {
    /// The name as written in config.
    pub fn as_str(&self) -> &'static str {
        match self {
            SamplePick::First => "first",
            SamplePick::Last => "last",
            SamplePick::Reservoir => "reservoir",
        }
    }
}

/// `samples = { n = 3, pick = "first" }` in a stream's config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplesConfig {
    /// How many samples to keep per window, `1..=32`.
    pub n: usize,
    #[serde(default)]
    pub pick: SamplePick,
    /// Cap on one sample's value bytes; default `min(1024, stream max_value_bytes)`, at most the
    /// stream's `max_value_bytes`.
    #[serde(default)]
    pub max_value_bytes: Option<usize>,
}

/// A validated sample policy, carried in [`crate::stream::StreamRules`] (so in Raft entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplePolicy {
    /// Samples kept per window, `1..=MAX_SAMPLES`.
    pub n: u8,
    pub pick: SamplePick,
    /// Cap on one sample's value bytes.
    pub max_value_bytes: u32,
}

impl SamplePolicy {
    /// Checks the policy a Raft entry carries: `n` in `1..=MAX_SAMPLES`, a non-zero value cap.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.n == 0 || usize::from(self.n) > MAX_SAMPLES {
            return Err(("samples.n", format!("must be in 1..={MAX_SAMPLES}")));
        }
        if self.max_value_bytes == 0 {
            return Err(("samples.max_value_bytes", "must be at least 1".into()));
        }
        Ok(())
    }
}

impl SamplesConfig {
    /// Validates the `samples` table of stream `stream`, whose values are at most
    /// `stream_max_value_bytes`; errors name the field.
    pub fn validate(&self, stream: &str, stream_max_value_bytes: usize) -> Result<SamplePolicy, ConfigError> {
        if self.n == 0 || self.n > MAX_SAMPLES {
            return Err(ConfigError::stream(stream, "samples.n", format!("must be in 1..={MAX_SAMPLES}")));
        }
        let max = match self.max_value_bytes {
            None => DEFAULT_SAMPLE_VALUE_BYTES.min(stream_max_value_bytes),
            Some(0) => return Err(ConfigError::stream(stream, "samples.max_value_bytes", "must be at least 1")),
            Some(m) if m > stream_max_value_bytes => {
                return Err(ConfigError::stream(
                    stream,
                    "samples.max_value_bytes",
                    format!("must be <= max_value_bytes ({stream_max_value_bytes})"),
                ));
            }
            Some(m) => m,
        };
        Ok(SamplePolicy { n: self.n as u8, pick: self.pick, max_value_bytes: u32::try_from(max).unwrap_or(u32::MAX) })
    }
}

/// One folded input kept as a sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The input's value, cut to the policy's `max_value_bytes`.
    pub value: Value,
    /// The input's event time (producer clock).
    pub event_time: Millis,
    /// Whether `value` was cut.
    pub truncated: bool,
    /// The reservoir priority (see the module docs); computed for every pick so a policy change
    /// to `reservoir` still merges correctly.
    pub priority: u64,
}

impl Sample {
    /// Bytes this sample accounts for.
    pub fn size(&self) -> usize {
        self.value.size() + SAMPLE_OVERHEAD_BYTES
    }

    /// The sample as JSON: `{"event_time": ..., "value": ...}` (plus `"truncated": true`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::json!({ "event_time": self.event_time, "value": self.value.to_json() });
        if self.truncated
            && let Some(map) = o.as_object_mut()
        {
            map.insert("truncated".into(), true.into());
        }
        o
    }

    /// The total order bottom-n selection uses: priority, event time, then value bytes.
    fn reservoir_cmp(&self, other: &Sample) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then(self.event_time.cmp(&other.event_time))
            .then_with(|| self.value.canonical_bytes().cmp(&other.value.canonical_bytes()))
            .then(self.truncated.cmp(&other.truncated))
    }
}

/// The samples of one partial, window or output; at most the policy's `n`.
///
/// Order: arrival order for `first` and `last`; for `reservoir`, (event time, priority) — a
/// canonical order, so equal sample sets have equal bytes on every replica.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Samples {
    items: Vec<Sample>,
}

/// The reservoir priority of an input: XXH3-64 over a domain tag, the canonical value bytes,
/// the event time and the salt (big-endian).
pub fn sample_priority(value: &Value, event_time: Millis, salt: u64) -> u64 {
    let mut h = Xxh3::new();
    h.update(b"coalesce-sample\0");
    h.update(&value.canonical_bytes());
    h.update(&event_time.to_be_bytes());
    h.update(&salt.to_be_bytes());
    h.digest()
}

/// The salt of an event for [`Samples::of`]: its producer (id, seq) when it has one (unique per
/// accepted event), else the receiving node's stamp and the event's position in the request.
pub fn sample_salt(producer: Option<(u64, u64)>, now: Millis, index: u32) -> u64 {
    let (a, b, tag) = match producer {
        Some((id, seq)) => (id, seq, 1u8),
        None => (now, u64::from(index), 2u8),
    };
    let mut h = Xxh3::new();
    h.update(&[tag]);
    h.update(&a.to_be_bytes());
    h.update(&b.to_be_bytes());
    h.digest()
}

/// `value` cut to `max` bytes, and whether it was cut.
fn truncate_value(value: &Value, max: usize) -> (Value, bool) {
    fn cut_str(s: &str, max: usize) -> &str {
        if s.len() <= max {
            return s;
        }
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    }
    if value.size() <= max {
        return (value.clone(), false);
    }
    match value {
        Value::Str(s) => (Value::Str(cut_str(s, max).to_owned()), true),
        Value::Bytes(b) => (Value::Bytes(b[..max.min(b.len())].to_vec()), true),
        Value::Json(j) => (Value::Str(cut_str(&j.to_string(), max).to_owned()), true),
        // Fixed-size values are never cut.
        Value::None | Value::Int(_) | Value::Float(_) => (value.clone(), false),
    }
}

impl Samples {
    /// At most [`MAX_SAMPLES`] samples.
    pub fn check(&self) -> Result<(), String> {
        if self.items.len() > MAX_SAMPLES {
            return Err(format!("{} samples, at most {MAX_SAMPLES} are kept", self.items.len()));
        }
        Ok(())
    }

    /// The samples of one input: `value` at `event_time`; `salt` tells equal inputs apart
    /// (see [`sample_salt`]).
    pub fn of(value: &Value, event_time: Millis, salt: u64, policy: &SamplePolicy) -> Samples {
        let (v, truncated) = truncate_value(value, policy.max_value_bytes as usize);
        let priority = sample_priority(value, event_time, salt);
        Samples { items: vec![Sample { value: v, event_time, truncated, priority }] }
    }

    /// Samples from items in any order, normalized for `policy` as a merge would leave them.
    pub fn from_items(items: Vec<Sample>, policy: &SamplePolicy) -> Samples {
        let mut s = Samples::default();
        s.merge(&Samples { items }, policy);
        s
    }

    /// Merges the samples of inputs that arrived after `self`'s. Associative for every pick;
    /// also commutative for `reservoir`.
    pub fn merge(&mut self, newer: &Samples, policy: &SamplePolicy) {
        let n = usize::from(policy.n).clamp(1, MAX_SAMPLES);
        match policy.pick {
            SamplePick::First => {
                let room = n.saturating_sub(self.items.len());
                self.items.extend(newer.items.iter().take(room).cloned());
                self.items.truncate(n);
            }
            SamplePick::Last => {
                let take = newer.items.len().min(n);
                self.items.extend(newer.items[newer.items.len() - take..].iter().cloned());
                let excess = self.items.len().saturating_sub(n);
                self.items.drain(..excess);
            }
            SamplePick::Reservoir => {
                self.items.extend(newer.items.iter().cloned());
                if self.items.len() > n {
                    self.items.sort_by(Sample::reservoir_cmp);
                    self.items.truncate(n);
                }
                self.items.sort_by(|a, b| a.event_time.cmp(&b.event_time).then_with(|| a.reservoir_cmp(b)));
            }
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The samples, in the order described on [`Samples`].
    pub fn iter(&self) -> std::slice::Iter<'_, Sample> {
        self.items.iter()
    }

    /// The samples as a slice.
    pub fn as_slice(&self) -> &[Sample] {
        &self.items
    }

    /// Bytes accounted against the shard's byte limit.
    pub fn size(&self) -> usize {
        self.items.iter().map(Sample::size).sum()
    }

    /// The samples as a JSON array.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Array(self.items.iter().map(Sample::to_json).collect())
    }
}

/// Merges `newer` into `acc` under `policy`, as the pre-merge and the buffer do: a stream
/// without a policy keeps no samples; a missing side counts as no samples.
pub fn merge_opt(acc: &mut Option<Samples>, newer: Option<&Samples>, policy: Option<&SamplePolicy>) {
    match policy {
        None => *acc = None,
        Some(p) => {
            let s = acc.get_or_insert_with(Samples::default);
            if let Some(newer) = newer {
                s.merge(newer, p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(n: u8, pick: SamplePick) -> SamplePolicy {
        SamplePolicy { n, pick, max_value_bytes: 16 }
    }

    fn one(i: i64, p: &SamplePolicy) -> Samples {
        Samples::of(&Value::Int(i), i as u64, i as u64, p)
    }

    fn ints(s: &Samples) -> Vec<i64> {
        s.iter()
            .map(|x| match x.value {
                Value::Int(i) => i,
                _ => panic!("int"),
            })
            .collect()
    }

    #[test]
    fn first_and_last_keep_the_ends_in_arrival_order() {
        for (pick, want) in [(SamplePick::First, vec![0, 1, 2]), (SamplePick::Last, vec![7, 8, 9])] {
            let p = policy(3, pick);
            let mut acc = Samples::default();
            for i in 0..10 {
                acc.merge(&one(i, &p), &p);
            }
            assert_eq!(ints(&acc), want, "{pick:?}");
        }
    }

    #[test]
    fn fewer_inputs_than_n_keeps_them_all() {
        let p = policy(5, SamplePick::Reservoir);
        let mut acc = one(1, &p);
        acc.merge(&one(2, &p), &p);
        assert_eq!(ints(&acc), vec![1, 2]);
    }

    #[test]
    fn long_values_are_cut_at_a_char_boundary() {
        let p = policy(1, SamplePick::First);
        let s = Samples::of(&Value::Str("ééééééééééé".into()), 0, 0, &p); // 22 bytes
        let Value::Str(v) = &s.as_slice()[0].value else { panic!() };
        assert_eq!(v.len(), 16);
        assert!(s.as_slice()[0].truncated);
        let s = Samples::of(&Value::Json(serde_json::json!({"a": "0123456789abcdef"})), 0, 0, &p);
        assert_eq!(s.as_slice()[0].value, Value::Str("{\"a\":\"0123456789".into()));
        let s = Samples::of(&Value::Int(i64::MAX), 0, 0, &SamplePolicy { max_value_bytes: 1, ..p });
        assert!(!s.as_slice()[0].truncated);
        assert_eq!(s.to_json(), serde_json::json!([{ "event_time": 0, "value": i64::MAX }]));
    }

    #[test]
    fn config_is_validated() {
        let cfg = |t: &str| toml::from_str::<SamplesConfig>(t).unwrap();
        let e = cfg("n = 0").validate("alerts", 100).unwrap_err();
        assert_eq!(e.to_string(), "stream \"alerts\": samples.n must be in 1..=32");
        assert!(cfg("n = 33").validate("a", 100).is_err());
        let e = cfg("n = 3\nmax_value_bytes = 101").validate("a", 100).unwrap_err();
        assert_eq!(e.to_string(), "stream \"a\": samples.max_value_bytes must be <= max_value_bytes (100)");
        let p = cfg("n = 3\npick = \"last\"").validate("a", 100).unwrap();
        assert_eq!(p, SamplePolicy { n: 3, pick: SamplePick::Last, max_value_bytes: 100 });
        assert_eq!(cfg("n = 3").validate("a", 1 << 20).unwrap().max_value_bytes, 1024);
        assert!(toml::from_str::<SamplesConfig>("n = 3\npick = \"random\"").is_err());
        assert!(toml::from_str::<SamplesConfig>("n = 3\ncount = 1").is_err());
    }

    #[test]
    fn reservoir_is_roughly_uniform() {
        // Each of 20 inputs should land in a 4-sample reservoir about 1/5 of the time.
        let p = policy(4, SamplePick::Reservoir);
        let mut hits = [0u32; 20];
        for trial in 0..2000u64 {
            let mut acc = Samples::default();
            for i in 0..20i64 {
                acc.merge(&Samples::of(&Value::Int(i), 0, trial * 100 + i as u64, &p), &p);
            }
            for i in ints(&acc) {
                hits[i as usize] += 1;
            }
        }
        for h in hits {
            assert!((320..480).contains(&h), "{hits:?}");
        }
    }
}
