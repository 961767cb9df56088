//! Merge operators and their accumulators.
//!
//! A stream has one [`MergeOp`]. Each accepted event is *lifted* into an [`Aggregate`] of the
//! operator's type ([`MergeOp::lift`]), and aggregates are merged pairwise
//! ([`Aggregate::merge`]) — at the ingest node (pre-merge per key), at the shard leader, and when
//! a batch is applied to the buffered aggregate. `merge(older, newer)` is associative for every
//! operator, so pre-merging never changes the result. Sum, min, max, count, set-union and the
//! sketches are also commutative; latest-wins, append and JSON merge-patch depend on order
//! (arrival order breaks ties, and the log fixes the order for every replica).
//!
//! A merge that cannot be represented — an `i64` sum that would overflow, a set or list that
//! would exceed its bound — is reported as a [`MergeError`], never wrapped, saturated or
//! truncated. The buffer then closes the current window early and starts a new one with the
//! incoming aggregate, so nothing is lost and sums stay exact (see [`crate::buffer`]).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use sketches_ddsketch::{Config as DdConfig, DDSketch};

use crate::error::EventError;
use crate::hll::Hll;
use crate::time::Millis;
use crate::value::{Value, json_text};

/// Which numeric type a `min`/`max` stream holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NumType {
    #[default]
    I64,
    F64,
}

/// A stream's merge operator. In config it is written `merge = "sum_i64"` or
/// `merge = { op = "set_union", max_members = 500 }` (see [`MergeOpConfig`]); its serde form
/// here is externally tagged so binary formats (Raft entries) can carry it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MergeOp {
    /// Keep the value with the greatest event time; ties go to the later arrival.
    Latest,
    /// Checked `i64` sum.
    SumI64,
    /// `f64` sum (ints are widened); NaN and infinities are rejected.
    SumF64,
    /// Minimum.
    Min { value_type: NumType },
    /// Maximum.
    Max { value_type: NumType },
    /// Number of events; values are ignored.
    Count,
    /// Union of string/int/bytes members, at most `max_members` per window.
    SetUnion { max_members: usize },
    /// All values in arrival order, at most `max_len` per window.
    Append { max_len: usize },
    /// RFC 7386 JSON merge-patch: patches compose in arrival order.
    JsonMergePatch,
    /// DDSketch quantile sketch of numeric values.
    Ddsketch { relative_accuracy: f64, max_bins: u32 },
    /// HyperLogLog distinct count of values.
    Hll { precision: u8 },
}

/// The table form of a merge operator in config: `{ op = "name", params... }`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum MergeOpConfig {
    Latest,
    SumI64,
    SumF64,
    Min {
        #[serde(default)]
        value_type: NumType,
    },
    Max {
        #[serde(default)]
        value_type: NumType,
    },
    Count,
    SetUnion {
        #[serde(default = "default_max_members")]
        max_members: usize,
    },
    Append {
        #[serde(default = "default_max_len")]
        max_len: usize,
    },
    JsonMergePatch,
    Ddsketch {
        #[serde(default = "default_relative_accuracy")]
        relative_accuracy: f64,
        #[serde(default = "default_max_bins")]
        max_bins: u32,
    },
    Hll {
        #[serde(default = "default_precision")]
        precision: u8,
    },
}

impl From<MergeOpConfig> for MergeOp {
    fn from(c: MergeOpConfig) -> Self {
        match c {
            MergeOpConfig::Latest => MergeOp::Latest,
            MergeOpConfig::SumI64 => MergeOp::SumI64,
            MergeOpConfig::SumF64 => MergeOp::SumF64,
            MergeOpConfig::Min { value_type } => MergeOp::Min { value_type },
            MergeOpConfig::Max { value_type } => MergeOp::Max { value_type },
            MergeOpConfig::Count => MergeOp::Count,
            MergeOpConfig::SetUnion { max_members } => MergeOp::SetUnion { max_members },
            MergeOpConfig::Append { max_len } => MergeOp::Append { max_len },
            MergeOpConfig::JsonMergePatch => MergeOp::JsonMergePatch,
            MergeOpConfig::Ddsketch { relative_accuracy, max_bins } => {
                MergeOp::Ddsketch { relative_accuracy, max_bins }
            }
            MergeOpConfig::Hll { precision } => MergeOp::Hll { precision },
        }
    }
}

fn default_max_members() -> usize {
    1_000
}
fn default_max_len() -> usize {
    100
}
fn default_relative_accuracy() -> f64 {
    0.01
}
fn default_max_bins() -> u32 {
    2048
}
fn default_precision() -> u8 {
    12
}

impl MergeOp {
    /// Parses the short form `merge = "name"` (every parameter at its default).
    pub fn from_name(name: &str) -> Option<MergeOp> {
        Some(match name {
            "latest" => MergeOp::Latest,
            "sum_i64" => MergeOp::SumI64,
            "sum_f64" => MergeOp::SumF64,
            "min" => MergeOp::Min { value_type: NumType::I64 },
            "max" => MergeOp::Max { value_type: NumType::I64 },
            "count" => MergeOp::Count,
            "set_union" => MergeOp::SetUnion { max_members: default_max_members() },
            "append" => MergeOp::Append { max_len: default_max_len() },
            "json_merge_patch" => MergeOp::JsonMergePatch,
            "ddsketch" => {
                MergeOp::Ddsketch { relative_accuracy: default_relative_accuracy(), max_bins: default_max_bins() }
            }
            "hll" => MergeOp::Hll { precision: default_precision() },
            _ => return None,
        })
    }

    /// Every operator name, for error messages and docs.
    pub const NAMES: &'static [&'static str] = &[
        "latest",
        "sum_i64",
        "sum_f64",
        "min",
        "max",
        "count",
        "set_union",
        "append",
        "json_merge_patch",
        "ddsketch",
        "hll",
    ];

    /// The operator's name.
    pub fn name(&self) -> &'static str {
        match self {
            MergeOp::Latest => "latest",
            MergeOp::SumI64 => "sum_i64",
            MergeOp::SumF64 => "sum_f64",
            MergeOp::Min { .. } => "min",
            MergeOp::Max { .. } => "max",
            MergeOp::Count => "count",
            MergeOp::SetUnion { .. } => "set_union",
            MergeOp::Append { .. } => "append",
            MergeOp::JsonMergePatch => "json_merge_patch",
            MergeOp::Ddsketch { .. } => "ddsketch",
            MergeOp::Hll { .. } => "hll",
        }
    }

    /// Checks the operator's parameters; the message names the offending parameter.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        match *self {
            MergeOp::SetUnion { max_members } if max_members == 0 || max_members > 1_000_000 => {
                Err(("merge.max_members", format!("must be in 1..=1000000, got {max_members}")))
            }
            MergeOp::Append { max_len } if max_len == 0 || max_len > 1_000_000 => {
                Err(("merge.max_len", format!("must be in 1..=1000000, got {max_len}")))
            }
            MergeOp::Ddsketch { relative_accuracy, .. }
                if !(MIN_RELATIVE_ACCURACY..1.0).contains(&relative_accuracy) =>
            {
                Err((
                    "merge.relative_accuracy",
                    format!("must be in [{MIN_RELATIVE_ACCURACY}, 1), got {relative_accuracy}"),
                ))
            }
            MergeOp::Ddsketch { max_bins, .. } if !(16..=65_536).contains(&max_bins) => {
                Err(("merge.max_bins", format!("must be in 16..=65536, got {max_bins}")))
            }
            MergeOp::Hll { precision }
                if !(crate::hll::MIN_PRECISION..=crate::hll::MAX_PRECISION).contains(&precision) =>
            {
                Err(("merge.precision", format!("must be in 4..=16, got {precision}")))
            }
            _ => Ok(()),
        }
    }

    /// Turns one event's value into an aggregate of this operator's type, or says precisely why
    /// the value does not fit. `event_time` orders `latest`.
    pub fn lift(&self, value: &Value, event_time: Millis) -> Result<Aggregate, EventError> {
        let op = self.name();
        let mismatch = |expected: &'static str| EventError::TypeMismatch { op, expected, got: value.kind() };
        let finite = |f: f64| if f.is_finite() { Ok(f) } else { Err(EventError::NotFinite { op }) };
        Ok(match self {
            MergeOp::Latest => {
                if let Value::Float(f) = value {
                    finite(*f)?;
                }
                Aggregate::Latest { value: value.clone(), at: event_time }
            }
            MergeOp::SumI64 => match value {
                Value::Int(i) => Aggregate::SumI64(*i),
                _ => return Err(mismatch("int")),
            },
            MergeOp::SumF64 => Aggregate::SumF64(finite(as_f64(value).ok_or_else(|| mismatch("int or float"))?)?),
            MergeOp::Min { value_type: NumType::I64 } => match value {
                Value::Int(i) => Aggregate::MinI64(*i),
                _ => return Err(mismatch("int")),
            },
            MergeOp::Max { value_type: NumType::I64 } => match value {
                Value::Int(i) => Aggregate::MaxI64(*i),
                _ => return Err(mismatch("int")),
            },
            MergeOp::Min { value_type: NumType::F64 } => {
                Aggregate::MinF64(finite(as_f64(value).ok_or_else(|| mismatch("int or float"))?)?)
            }
            MergeOp::Max { value_type: NumType::F64 } => {
                Aggregate::MaxF64(finite(as_f64(value).ok_or_else(|| mismatch("int or float"))?)?)
            }
            MergeOp::Count => {
                // Values are not counted, but NaN and infinities are refused by every operator
                // (they reached a count stream's samples; found by fuzz/ `merge`).
                if let Value::Float(f) = value {
                    finite(*f)?;
                }
                Aggregate::Count(1)
            }
            MergeOp::SetUnion { .. } => {
                let member = match value {
                    Value::Int(i) => Member::Int(*i),
                    Value::Str(s) => Member::Str(s.clone()),
                    Value::Bytes(b) => Member::Bytes(b.clone()),
                    _ => return Err(mismatch("int, string or bytes")),
                };
                Aggregate::SetUnion(BTreeSet::from([member]))
            }
            MergeOp::Append { .. } => {
                if let Value::Float(f) = value {
                    finite(*f)?;
                }
                Aggregate::Append(vec![value.clone()])
            }
            MergeOp::JsonMergePatch => match value {
                Value::Json(j) => Aggregate::JsonMergePatch(j.clone()),
                Value::Str(s) => Aggregate::JsonMergePatch(
                    serde_json::from_str(s)
                        .map_err(|e| EventError::InvalidValue { op, reason: format!("not JSON: {e}") })?,
                ),
                _ => return Err(mismatch("json")),
            },
            MergeOp::Ddsketch { relative_accuracy, max_bins } => {
                let v = finite(as_f64(value).ok_or_else(|| mismatch("int or float"))?)?;
                let mut sketch = DDSketch::new(DdConfig::new(*relative_accuracy, *max_bins, 1.0e-9));
                sketch.add(v);
                Aggregate::Ddsketch(Sketch(Box::new(sketch)))
            }
            MergeOp::Hll { precision } => {
                if matches!(value, Value::None) {
                    return Err(mismatch("int, float, string, bytes or json"));
                }
                if let Value::Float(f) = value {
                    finite(*f)?;
                }
                let mut h = Hll::new(*precision);
                h.insert(&value.canonical_bytes());
                Aggregate::Hll(h)
            }
        })
    }

    /// Whether `agg` is of this operator's type (and parameters, where they matter for merging).
    pub fn accepts(&self, agg: &Aggregate) -> bool {
        match (self, agg) {
            (MergeOp::Ddsketch { relative_accuracy, max_bins }, Aggregate::Ddsketch(s)) => {
                s.0.count() == 0 || ddsketch_config_matches(&s.0, &DdConfig::new(*relative_accuracy, *max_bins, 1.0e-9))
            }
            (MergeOp::Hll { precision }, Aggregate::Hll(h)) => h.precision() == *precision,
            _ => self.name() == agg.op_name() && self.num_type() == agg.num_type(),
        }
    }

    fn num_type(&self) -> Option<NumType> {
        match self {
            MergeOp::Min { value_type } | MergeOp::Max { value_type } => Some(*value_type),
            _ => None,
        }
    }
}

fn ddsketch_config_matches(s: &DDSketch, c: &DdConfig) -> bool {
    let mut probe = DDSketch::new(*c);
    probe.merge(s).is_ok()
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    }
}

/// A set-union member. Ordered, so sets have one canonical order on every replica.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Member {
    Int(i64),
    Str(String),
    Bytes(Vec<u8>),
}

impl Member {
    fn size(&self) -> usize {
        match self {
            Member::Int(_) => 8,
            Member::Str(s) => s.len() + 4,
            Member::Bytes(b) => b.len() + 4,
        }
    }
}

/// The finest `relative_accuracy` a `ddsketch` stream may ask for. A sketch's keys are
/// `ln(v) / ln(γ)` with `γ = (1 + a) / (1 - a)`, and `sketches-ddsketch` does its key arithmetic
/// in `i32` without overflow checks: below about 2e-7 the keys of finite values (|ln v| ≤ 745)
/// no longer fit, and below about 5e-9 even building the sketch's configuration overflows (found
/// by a fuzz/ `streams_config` seed and by `apply`). At 1e-6 every key is within ±4e8.
pub const MIN_RELATIVE_ACCURACY: f64 = 1e-6;

/// The most values one DDSketch counts (2^53: exact as the `f64` its quantiles compute with).
/// Decoding refuses more, and a merge that would pass it is refused like an `i64` overflow, so
/// the sketch's `u64` count arithmetic, which has no overflow checks, can never wrap.
pub const MAX_SKETCH_COUNT: u64 = 1 << 53;

/// A DDSketch, wrapped to give it `Debug` and `PartialEq` (by encoded bytes). Decoding checks
/// the sketch's shape first (see [`SketchWire`]): `sketches-ddsketch` indexes its bins by the
/// stored keys and offsets without bounds checks, so a forged sketch would panic in a merge.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "SketchWire")]
pub struct Sketch(pub Box<DDSketch>);

/// The serde shape of `sketches_ddsketch` 0.4's `DDSketch` (its fields are private): decoded
/// into this mirror, checked, then re-encoded into the real type. A test pins the two shapes
/// to the same bytes, so a new version of the crate that changes them fails loudly. Public
/// (hidden) only for tests and fuzz seeds that forge sketches field by field.
#[doc(hidden)]
#[derive(Debug, Serialize, Deserialize)]
pub struct SketchWire {
    pub config: DdConfigWire,
    pub store: StoreWire,
    pub negative_store: StoreWire,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub zero_count: u64,
}

#[doc(hidden)]
#[derive(Debug, Serialize, Deserialize)]
pub struct DdConfigWire {
    pub max_num_bins: u32,
    pub gamma: f64,
    pub gamma_ln: f64,
    pub min_value: f64,
    pub offset: i32,
}

#[doc(hidden)]
#[derive(Debug, Serialize, Deserialize)]
pub struct StoreWire {
    pub bins: Vec<u64>,
    pub count: u64,
    pub min_key: i32,
    pub max_key: i32,
    pub offset: i32,
    pub bin_limit: usize,
    pub is_collapsed: bool,
}

impl StoreWire {
    /// A store is either untouched (as `Store::new` makes it) or holds its keys inside its
    /// bins, with `count` their sum and at most `bin_limit` bins.
    /// `keys` is the range of keys the sketch's configuration can give a value.
    fn check(&self, bin_limit: u32, keys: (i64, i64)) -> Result<(), String> {
        if self.bin_limit != bin_limit as usize {
            return Err(format!("DDSketch store bin limit {} differs from the sketch's {bin_limit}", self.bin_limit));
        }
        if self.count == 0 {
            let pristine = self.bins.is_empty()
                && self.min_key == i32::MAX
                && self.max_key == i32::MIN
                && self.offset == 0
                && !self.is_collapsed;
            return if pristine { Ok(()) } else { Err("DDSketch store is empty but not pristine".into()) };
        }
        let len = self.bins.len() as i64;
        let (offset, min, max) = (i64::from(self.offset), i64::from(self.min_key), i64::from(self.max_key));
        if len == 0 || len > i64::from(bin_limit) || offset > min || min > max || max - offset >= len {
            return Err(format!(
                "DDSketch store keys {min}..={max} (offset {offset}) do not fit its {len} bins (limit {bin_limit})"
            ));
        }
        if min < keys.0 || max > keys.1 {
            return Err(format!(
                "DDSketch store keys {min}..={max} are outside {}..={}, where its values can be",
                keys.0, keys.1
            ));
        }
        let sum = self.bins.iter().try_fold(0u64, |a, b| a.checked_add(*b));
        if sum != Some(self.count) {
            return Err("DDSketch store count differs from the sum of its bins".into());
        }
        // A merge reads only the bins of keys min..=max: a count outside them would be dropped,
        // leaving a merged sketch whose count differs from its bins (found by fuzz/ `apply`).
        let (lo, hi) = ((min - offset) as usize, (max - offset) as usize);
        if self.bins[..lo].iter().chain(&self.bins[hi + 1..]).any(|&b| b != 0) {
            return Err(format!("DDSketch store holds counts outside its keys {min}..={max}"));
        }
        Ok(())
    }
}

impl TryFrom<SketchWire> for Sketch {
    type Error = String;

    fn try_from(w: SketchWire) -> Result<Self, String> {
        let c = &w.config;
        // γ no finer than MIN_RELATIVE_ACCURACY gives (checked first: it bounds every key, so the
        // `i32` arithmetic below cannot overflow, as it did on a forged γ close to 1).
        let finest = (1.0 + MIN_RELATIVE_ACCURACY) / (1.0 - MIN_RELATIVE_ACCURACY);
        let consistent = c.gamma.is_finite()
            && c.gamma >= finest
            && c.gamma_ln.to_bits() == c.gamma.ln().to_bits()
            && c.min_value.is_finite()
            && c.min_value > 0.0
            && c.offset == 1 - ((c.min_value.ln() / c.gamma_ln) as i32)
            && (16..=65_536).contains(&c.max_num_bins);
        if !consistent {
            return Err("DDSketch configuration is inconsistent".into());
        }
        // The keys values in (min_value, f64::MAX] map to, with a key of slack for rounding.
        let key = |v: f64| (v.ln() / c.gamma_ln).floor() as i64;
        let keys = (key(c.min_value) - 1, key(f64::MAX) + 1);
        w.store.check(c.max_num_bins, keys)?;
        w.negative_store.check(c.max_num_bins, keys)?;
        let total =
            [w.store.count, w.negative_store.count, w.zero_count].iter().try_fold(0u64, |a, b| a.checked_add(*b));
        if total.is_none_or(|t| t > MAX_SKETCH_COUNT) {
            return Err(format!("DDSketch counts more than {MAX_SKETCH_COUNT} values"));
        }
        if w.min.is_nan() || w.max.is_nan() || w.sum.is_nan() {
            return Err("DDSketch summary is NaN".into());
        }
        let bytes = postcard::to_allocvec(&w).map_err(|e| e.to_string())?;
        postcard::from_bytes::<DDSketch>(&bytes).map(|s| Sketch(Box::new(s))).map_err(|e| e.to_string())
    }
}

impl fmt::Debug for Sketch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DDSketch")
            .field("count", &self.0.count())
            .field("min", &self.0.min())
            .field("max", &self.0.max())
            .finish()
    }
}

impl PartialEq for Sketch {
    fn eq(&self, other: &Self) -> bool {
        postcard::to_allocvec(&self.0).ok() == postcard::to_allocvec(&other.0).ok()
    }
}

/// The accumulated state of one key in one window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Aggregate {
    Latest { value: Value, at: Millis },
    SumI64(i64),
    SumF64(f64),
    MinI64(i64),
    MaxI64(i64),
    MinF64(f64),
    MaxF64(f64),
    Count(u64),
    SetUnion(BTreeSet<Member>),
    Append(Vec<Value>),
    JsonMergePatch(#[serde(with = "json_text")] serde_json::Value),
    Ddsketch(Sketch),
    Hll(Hll),
}

/// Why two aggregates could not be merged. The older aggregate is left unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("i64 sum overflow")]
    Overflow,
    #[error("{what} would exceed {max}")]
    Capacity { what: &'static str, max: usize },
    #[error("cannot merge {got} into {have}")]
    Mismatch { have: &'static str, got: &'static str },
}

impl Aggregate {
    /// Checks what merging relies on beyond the shape decoding already checked (sketches):
    /// numbers are finite, as [`MergeOp::lift`] makes them.
    pub fn check(&self) -> Result<(), String> {
        let finite =
            |f: f64| if f.is_finite() { Ok(()) } else { Err(format!("{} holds a non-finite number", self.op_name())) };
        match self {
            Aggregate::SumF64(f) | Aggregate::MinF64(f) | Aggregate::MaxF64(f) => finite(*f),
            Aggregate::Latest { value: Value::Float(f), .. } => finite(*f),
            Aggregate::Append(values) => {
                values.iter().try_for_each(|v| if let Value::Float(f) = v { finite(*f) } else { Ok(()) })
            }
            Aggregate::Hll(h) => h.check(),
            _ => Ok(()),
        }
    }

    /// Name of the operator that produces this aggregate.
    pub fn op_name(&self) -> &'static str {
        match self {
            Aggregate::Latest { .. } => "latest",
            Aggregate::SumI64(_) => "sum_i64",
            Aggregate::SumF64(_) => "sum_f64",
            Aggregate::MinI64(_) | Aggregate::MinF64(_) => "min",
            Aggregate::MaxI64(_) | Aggregate::MaxF64(_) => "max",
            Aggregate::Count(_) => "count",
            Aggregate::SetUnion(_) => "set_union",
            Aggregate::Append(_) => "append",
            Aggregate::JsonMergePatch(_) => "json_merge_patch",
            Aggregate::Ddsketch(_) => "ddsketch",
            Aggregate::Hll(_) => "hll",
        }
    }

    fn num_type(&self) -> Option<NumType> {
        match self {
            Aggregate::MinI64(_) | Aggregate::MaxI64(_) => Some(NumType::I64),
            Aggregate::MinF64(_) | Aggregate::MaxF64(_) => Some(NumType::F64),
            _ => None,
        }
    }

    /// Merges `newer` (later in arrival order) into `self`. On error `self` is unchanged.
    /// `limits` supplies the bounds of `set_union` and `append`.
    pub fn merge(&mut self, newer: &Aggregate, limits: &MergeOp) -> Result<(), MergeError> {
        use Aggregate as A;
        match (&mut *self, newer) {
            (A::Latest { value, at }, A::Latest { value: v2, at: at2 }) => {
                if *at2 >= *at {
                    *value = v2.clone();
                    *at = *at2;
                }
            }
            (A::SumI64(a), A::SumI64(b)) => *a = a.checked_add(*b).ok_or(MergeError::Overflow)?,
            (A::SumF64(a), A::SumF64(b)) => {
                let s = *a + *b;
                if !s.is_finite() {
                    return Err(MergeError::Overflow);
                }
                *a = s;
            }
            (A::MinI64(a), A::MinI64(b)) => *a = (*a).min(*b),
            (A::MaxI64(a), A::MaxI64(b)) => *a = (*a).max(*b),
            (A::MinF64(a), A::MinF64(b)) => *a = a.min(*b),
            (A::MaxF64(a), A::MaxF64(b)) => *a = a.max(*b),
            (A::Count(a), A::Count(b)) => *a = a.checked_add(*b).ok_or(MergeError::Overflow)?,
            (A::SetUnion(a), A::SetUnion(b)) => {
                let max = match limits {
                    MergeOp::SetUnion { max_members } => *max_members,
                    _ => usize::MAX,
                };
                let added = b.iter().filter(|m| !a.contains(m)).count();
                if a.len() + added > max {
                    return Err(MergeError::Capacity { what: "set members", max });
                }
                a.extend(b.iter().cloned());
            }
            (A::Append(a), A::Append(b)) => {
                let max = match limits {
                    MergeOp::Append { max_len } => *max_len,
                    _ => usize::MAX,
                };
                if a.len() + b.len() > max {
                    return Err(MergeError::Capacity { what: "appended values", max });
                }
                a.extend(b.iter().cloned());
            }
            (A::JsonMergePatch(a), A::JsonMergePatch(b)) => compose_merge_patch(a, b),
            (A::Ddsketch(a), A::Ddsketch(b)) => {
                // Refused before merging, as `sum_f64` refuses: a count past MAX_SKETCH_COUNT, and a
                // sum that is not finite (+inf and -inf sums would merge into NaN, which decoding
                // refuses: the merged window could not be read back; see tests/fuzzed.rs).
                let count = (a.0.count() as u64).checked_add(b.0.count() as u64);
                let sum = a.0.sum().unwrap_or(0.0) + b.0.sum().unwrap_or(0.0);
                if count.is_none_or(|c| c > MAX_SKETCH_COUNT) || !sum.is_finite() {
                    return Err(MergeError::Overflow);
                }
                a.0.merge(&b.0)
                    .map_err(|_| MergeError::Mismatch { have: "ddsketch", got: "ddsketch (other accuracy)" })?
            }
            (A::Hll(a), A::Hll(b)) => {
                a.merge(b).map_err(|_| MergeError::Mismatch { have: "hll", got: "hll (other precision)" })?
            }
            (have, got) => return Err(MergeError::Mismatch { have: have.op_name(), got: got.op_name() }),
        }
        Ok(())
    }

    /// Approximate bytes the aggregate occupies.
    pub fn size(&self) -> usize {
        match self {
            Aggregate::Latest { value, .. } => 8 + value.size(),
            Aggregate::SumI64(_)
            | Aggregate::SumF64(_)
            | Aggregate::MinI64(_)
            | Aggregate::MaxI64(_)
            | Aggregate::MinF64(_)
            | Aggregate::MaxF64(_)
            | Aggregate::Count(_) => 8,
            Aggregate::SetUnion(s) => 8 + s.iter().map(Member::size).sum::<usize>(),
            Aggregate::Append(v) => 8 + v.iter().map(|x| x.size() + 2).sum::<usize>(),
            Aggregate::JsonMergePatch(j) => crate::value::json_size(j),
            Aggregate::Ddsketch(s) => 64 + 16 * s.0.length(),
            Aggregate::Hll(h) => h.size(),
        }
    }

    /// The merged value as JSON, as sinks present it. Sketches are summarized
    /// (`{"count","min","max","sum","p50","p90","p99"}` and `{"estimate"}`).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Aggregate::Latest { value, .. } => value.to_json(),
            Aggregate::SumI64(v) | Aggregate::MinI64(v) | Aggregate::MaxI64(v) => json!(v),
            Aggregate::SumF64(v) | Aggregate::MinF64(v) | Aggregate::MaxF64(v) => json!(v),
            Aggregate::Count(c) => json!(c),
            Aggregate::SetUnion(s) => serde_json::Value::Array(
                s.iter()
                    .map(|m| match m {
                        Member::Int(i) => json!(i),
                        Member::Str(s) => json!(s),
                        Member::Bytes(b) => json!(crate::value::hex(b)),
                    })
                    .collect(),
            ),
            Aggregate::Append(v) => serde_json::Value::Array(v.iter().map(Value::to_json).collect()),
            Aggregate::JsonMergePatch(j) => j.clone(),
            Aggregate::Ddsketch(s) => {
                let q = |p: f64| s.0.quantile(p).ok().flatten();
                json!({
                    "count": s.0.count(), "min": s.0.min(), "max": s.0.max(), "sum": s.0.sum(),
                    "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
                })
            }
            Aggregate::Hll(h) => json!({ "estimate": h.estimate() }),
        }
    }
}

/// Composes two RFC 7386 merge patches so that applying the result equals applying `first`
/// then `second` — exact except in one case RFC 7386 cannot express: a member that `first`
/// sets to a non-object (or deletes with `null`) and `second` then patches with an object
/// becomes a merge into whatever the target holds rather than a replacement of it.
/// Documented in `docs/architecture.md`.
pub fn compose_merge_patch(first: &mut serde_json::Value, second: &serde_json::Value) {
    use serde_json::Value as J;
    let J::Object(second_map) = second else {
        *first = second.clone();
        return;
    };
    if !first.is_object() {
        // Applying a non-object patch replaces the target; the object patch then applies to that
        // value, which the result expresses as the object with its nulls removed.
        let mut base = first.clone();
        json_patch::merge(&mut base, second);
        *first = base;
        return;
    }
    if let J::Object(first_map) = first {
        for (k, v) in second_map {
            match (first_map.get_mut(k), v) {
                (Some(existing @ J::Object(_)), J::Object(_)) => compose_merge_patch(existing, v),
                (Some(existing), J::Object(_)) => json_patch::merge(existing, v),
                _ => {
                    first_map.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod sketch_decoding {
    use super::*;

    fn forged(bytes: &[u8], edit: impl FnOnce(&mut SketchWire)) -> Result<Sketch, postcard::Error> {
        let mut w: SketchWire = postcard::from_bytes(bytes).expect("mirror decodes");
        edit(&mut w);
        postcard::from_bytes::<Sketch>(&postcard::to_allocvec(&w).expect("encode"))
    }

    #[test]
    fn sketches_decode_only_when_their_bins_hold_their_keys() {
        let mut s = DDSketch::new(DdConfig::new(0.01, 2048, 1.0e-9));
        for v in [0.5, 3.0, -2.0, 0.0, 1e6, 7.25] {
            s.add(v);
        }
        let bytes = postcard::to_allocvec(&s).expect("encode");
        // The mirror has the real type's shape: the same bytes both ways.
        let wire: SketchWire = postcard::from_bytes(&bytes).expect("mirror decodes");
        assert_eq!(postcard::to_allocvec(&wire).expect("encode"), bytes);
        let back: Sketch = postcard::from_bytes(&bytes).expect("a real sketch decodes");
        assert_eq!(postcard::to_allocvec(&back.0).expect("encode"), bytes);
        let empty = postcard::to_allocvec(&DDSketch::new(DdConfig::new(0.02, 512, 1.0e-9))).expect("encode");
        assert!(postcard::from_bytes::<Sketch>(&empty).is_ok(), "an empty sketch decodes");

        assert!(forged(&bytes, |w| w.store.max_key = w.store.offset + w.store.bins.len() as i32).is_err());
        assert!(forged(&bytes, |w| w.store.offset = w.store.min_key + 1).is_err());
        assert!(forged(&bytes, |w| w.store.count += 1).is_err());
        assert!(forged(&bytes, |w| w.store.bin_limit = 4).is_err());
        assert!(forged(&bytes, |w| w.config.gamma_ln *= 2.0).is_err());
        assert!(forged(&bytes, |w| w.config.max_num_bins = 0).is_err());
        assert!(forged(&bytes, |w| w.sum = f64::NAN).is_err());
        assert!(forged(&empty, |w| w.store.bins = vec![0; 3]).is_err(), "an empty store with bins");
        // A count moved past max_key: the sum still matches, but a merge would drop it.
        let moved = forged(&bytes, |w| {
            let top = (w.store.max_key - w.store.offset) as usize;
            let last = w.store.bins.len() - 1;
            assert!(top < last, "the test sketch has spare bins above its keys");
            w.store.bins[last] += w.store.bins[top];
            w.store.bins[top] = 0;
        });
        assert!(moved.is_err(), "a count outside the store's keys");
    }
}
