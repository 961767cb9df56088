//! Stream definitions and the TOML that declares them.
//!
//! ```toml
//! [limits]                      # per shard
//! max_keys = 1000000
//! max_bytes = 268435456
//!
//! [sinks.warehouse]             # parameters belong to the sink kind (server crate)
//! kind = "postgres"
//!
//! [streams.api-calls]
//! merge = "sum_i64"             # or { op = "set_union", max_members = 500 }
//! window = { tumbling = "10s" }
//! overflow = "reject"           # reject | flush_early | shed
//! sinks = ["warehouse"]
//! samples = { n = 3, pick = "last" }   # optional: keep 3 folded inputs per output
//! key_rate_limit = { per_second = 100, burst = 200, action = "reject" }   # optional
//! ```
//! Every table refuses unknown fields, and every validation error names the stream and field:
//! `stream "api-calls": window.debounce must be <= window.max_wait`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::ConfigError;
use crate::merge::{MergeOp, MergeOpConfig};
use crate::samples::{SamplePolicy, SamplesConfig};
use crate::window::{WindowConfig, WindowPolicy};

/// What a stream does when its shard's buffer is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Refuse new keys with RESOURCE_EXHAUSTED and a retry hint (lossless; the default).
    #[default]
    Reject,
    /// Close the windows with the earliest deadlines to make room.
    FlushEarly,
    /// Drop inputs for new keys, counting them (lossy, never silent).
    Shed,
}

impl OverflowPolicy {
    /// The name as written in config.
    pub fn as_str(&self) -> &'static str {
        match self {
            OverflowPolicy::Reject => "reject",
            OverflowPolicy::FlushEarly => "flush_early",
            OverflowPolicy::Shed => "shed",
        }
    }
}

/// What a stream does when an input would grow its key's merged value past the window's
/// `max_bytes` (`key_overflow` in config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyOverflow {
    /// Close the key's window (reason `max_bytes`) and open the next one with the input: a key
    /// may have more than one output per window (the default).
    #[default]
    FlushEarly,
    /// Refuse the input, and the rest of its producer group (RESOURCE_EXHAUSTED `key_full`;
    /// nothing of the group is applied, so a retry with the same seqs after the window closed
    /// is safe): the window never closes early for size and its value never passes
    /// `max_bytes`. Decided at apply ([`crate::buffer::ShardBuffer::apply_group`]), so every
    /// replica agrees.
    Reject,
}

impl KeyOverflow {
    /// The name as written in config.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyOverflow::FlushEarly => "flush_early",
            KeyOverflow::Reject => "reject",
        }
    }
}

/// Per-shard outbox bounds (`[outbox]` in the streams file): every output is kept until the
/// consumers that claim it acknowledge it, within these limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxLimits {
    /// When a shard keeps more outputs than this (a sink or durable subscriber is behind),
    /// its leader refuses new input with RESOURCE_EXHAUSTED naming the lagging consumer,
    /// instead of growing the outbox without bound. A shard without any cursor (no sink, no
    /// durable consumer) keeps at most this many: older outputs are trimmed.
    #[serde(default = "default_max_outputs")]
    pub max_outputs: u64,
    /// A shard without any cursor keeps an output at most this long after its window closed,
    /// for readers that subscribe without acknowledging (`0s`: only `max_outputs` bounds it).
    #[serde(default = "default_unclaimed_max_age", with = "humantime_serde")]
    pub unclaimed_max_age: std::time::Duration,
    /// A cursor that belongs to no configured sink (created by an admin's ack) and has not
    /// moved for this long is dropped, so an abandoned subscriber stops holding outputs
    /// (`0s`: never). Cursors of configured sinks are kept while the sink is configured.
    #[serde(default = "default_cursor_ttl", with = "humantime_serde")]
    pub cursor_ttl: std::time::Duration,
}

fn default_max_outputs() -> u64 {
    1_000_000
}

fn default_unclaimed_max_age() -> std::time::Duration {
    std::time::Duration::from_secs(3600)
}

fn default_cursor_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(7 * 24 * 3600)
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            max_outputs: default_max_outputs(),
            unclaimed_max_age: default_unclaimed_max_age(),
            cursor_ttl: default_cursor_ttl(),
        }
    }
}

/// Per-shard buffer limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardLimits {
    /// Most buffered keys per shard.
    #[serde(default = "default_max_keys")]
    pub max_keys: u64,
    /// Most buffered bytes (keys plus merged values) per shard.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

fn default_max_keys() -> u64 {
    1_000_000
}
fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}

impl Default for ShardLimits {
    fn default() -> Self {
        Self { max_keys: default_max_keys(), max_bytes: default_max_bytes() }
    }
}

/// `key_rate_limit = { per_second = N, burst = B, action = "reject" | "shed" }`: at most `N`
/// events per second per key, with bursts up to `B` (default `N`), enforced where events
/// arrive, before they are merged (the server's `keyrate` module). A leader-aware producer
/// sends a shard's events to its leader, so the budget is per key for the cluster; events sent
/// to other nodes get each node's budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRateConfig {
    pub per_second: u32,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub action: KeyRateAction,
}

/// What happens to an event over its key's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyRateAction {
    /// RESOURCE_EXHAUSTED (`key_rate_limited`) with a retry hint; the event is not applied and
    /// its seq is used up: resend it as a new event.
    #[default]
    Reject,
    /// Acknowledged as SHED (`key_rate_limited`) and dropped, counted per stream.
    Shed,
}

impl KeyRateAction {
    /// The name as written in config.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyRateAction::Reject => "reject",
            KeyRateAction::Shed => "shed",
        }
    }
}

/// A validated per-key rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRateLimit {
    pub per_second: std::num::NonZeroU32,
    pub burst: std::num::NonZeroU32,
    pub action: KeyRateAction,
}

/// The largest `key_rate_limit.per_second` / `burst`.
pub const MAX_KEY_RATE: u32 = 1_000_000_000;

impl KeyRateConfig {
    fn validate(&self, stream: &str) -> Result<KeyRateLimit, ConfigError> {
        let positive = |field: &str, v: u32| {
            std::num::NonZeroU32::new(v).filter(|v| v.get() <= MAX_KEY_RATE).ok_or_else(|| {
                ConfigError::stream(
                    stream,
                    &format!("key_rate_limit.{field}"),
                    format!("must be in 1..={MAX_KEY_RATE}"),
                )
            })
        };
        let per_second = positive("per_second", self.per_second)?;
        let burst = positive("burst", self.burst.unwrap_or(self.per_second))?;
        Ok(KeyRateLimit { per_second, burst, action: self.action })
    }
}

/// What a Raft entry carries about a stream so apply never depends on local config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamRules {
    pub op: MergeOp,
    pub window: WindowPolicy,
    pub overflow: OverflowPolicy,
    /// Representative samples of folded inputs ([`crate::samples`]); `None` keeps none.
    #[serde(default)]
    pub samples: Option<SamplePolicy>,
    /// Growth of a key past the window's `max_bytes`. Entries written before peer protocol 4
    /// carry none (read as [`KeyOverflow::FlushEarly`]): [`crate::entry`] writes those rules in
    /// the older shape whenever this field is the default, so older builds still read them.
    #[serde(default)]
    pub key_overflow: KeyOverflow,
}

impl StreamRules {
    /// The most a key's merged value may hold when growth past it is refused
    /// (`key_overflow = "reject"`: the window's `max_bytes`); `None` when the window closes
    /// early instead.
    pub fn growth_limit(&self) -> Option<u64> {
        self.window.max_bytes.filter(|_| self.key_overflow == KeyOverflow::Reject)
    }

    /// Checks rules as a Raft entry carries them, with the same bounds config validation
    /// applied: the merge operator's parameters, the window and the sample policy. The error
    /// names the field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        self.op.validate()?;
        self.window.check()?;
        if let Some(s) = &self.samples {
            s.check()?;
        }
        Ok(())
    }
}

/// A validated stream.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamDef {
    pub name: String,
    pub rules: StreamRules,
    pub sinks: Vec<String>,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub description: String,
    /// Per-key input rate limit, enforced at ingest (not part of the replicated rules).
    pub key_rate_limit: Option<KeyRateLimit>,
}

/// A stream as written in config.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub merge: MergeSpec,
    pub window: WindowConfig,
    #[serde(default)]
    pub overflow: OverflowPolicy,
    /// `key_overflow = "flush_early" | "reject"`: what an input that would grow its key past
    /// `window.max_bytes` does ([`KeyOverflow`]).
    #[serde(default)]
    pub key_overflow: KeyOverflow,
    #[serde(default)]
    pub sinks: Vec<String>,
    #[serde(default = "default_max_key_bytes")]
    pub max_key_bytes: usize,
    /// Largest event value; default 64 KiB, or the window's `max_bytes` if that is smaller.
    #[serde(default)]
    pub max_value_bytes: Option<usize>,
    #[serde(default)]
    pub description: String,
    /// The upstream that `Fetch` calls for this stream's keys (request coalescing). Only its
    /// presence is seen here; the sinks crate parses it (`coalesce_sinks::upstream`).
    #[serde(default)]
    pub fetch: Option<toml::Table>,
    /// `samples = { n = 3, pick = "first" | "last" | "reservoir" }`: keep up to `n` of the
    /// folded inputs in each output (suppression visibility for dedupe streams).
    #[serde(default)]
    pub samples: Option<SamplesConfig>,
    /// `key_rate_limit = { per_second = 100, burst = 200, action = "reject" | "shed" }`.
    #[serde(default)]
    pub key_rate_limit: Option<KeyRateConfig>,
}

fn default_max_key_bytes() -> usize {
    1024
}
fn default_max_value_bytes() -> usize {
    64 * 1024
}

/// `merge = "name"` or `merge = { op = "name", ... }`.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeSpec(pub MergeOp);

impl<'de> Deserialize<'de> for MergeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MergeSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an operator name ({}) or a table with `op`", MergeOp::NAMES.join(", "))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<MergeSpec, E> {
                MergeOp::from_name(s).map(MergeSpec).ok_or_else(|| {
                    E::custom(format!("unknown merge operator {s:?}, expected one of: {}", MergeOp::NAMES.join(", ")))
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MergeSpec, A::Error> {
                MergeOpConfig::deserialize(de::value::MapAccessDeserializer::new(map)).map(|c| MergeSpec(c.into()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A sink declaration. Only `kind` is interpreted here; the server parses the parameters.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct SinkDecl {
    pub kind: String,
    #[serde(flatten)]
    pub params: toml::Table,
}

/// The part of the config file the core understands.
#[derive(Clone, Debug, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamsFile {
    #[serde(default)]
    pub limits: ShardLimits,
    #[serde(default)]
    pub outbox: OutboxLimits,
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkDecl>,
    #[serde(default)]
    pub streams: BTreeMap<String, StreamConfig>,
}

/// Longest accepted key limit; keys longer than this are never useful as coalescing keys.
pub const MAX_KEY_BYTES_LIMIT: usize = 64 * 1024;
/// Largest accepted value limit.
pub const MAX_VALUE_BYTES_LIMIT: usize = 16 * 1024 * 1024;

/// Checks a stream or sink name: 1–64 of `[a-z0-9_.-]`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

impl StreamConfig {
    /// Validates one stream; `sink_exists` tells whether a sink name is declared.
    pub fn validate(&self, name: &str, sink_exists: &dyn Fn(&str) -> bool) -> Result<StreamDef, ConfigError> {
        if !valid_name(name) {
            return Err(ConfigError::stream(name, "name", "must be 1-64 characters of a-z, 0-9, '_', '.', '-'"));
        }
        let op = self.merge.0.clone();
        op.validate().map_err(|(field, msg)| ConfigError::stream(name, field, msg))?;
        let window = self.window.validate(name)?;
        for sink in &self.sinks {
            if !sink_exists(sink) {
                return Err(ConfigError::stream(name, "sinks", format!("names unknown sink {sink:?}")));
            }
        }
        if self.max_key_bytes == 0 || self.max_key_bytes > MAX_KEY_BYTES_LIMIT {
            return Err(ConfigError::stream(name, "max_key_bytes", format!("must be in 1..={MAX_KEY_BYTES_LIMIT}")));
        }
        // One value must fit a window's bound, so a window's value stays below twice the bound.
        let bound = window.max_bytes.map_or(usize::MAX, |b| usize::try_from(b).unwrap_or(usize::MAX));
        let max_value_bytes = self.max_value_bytes.unwrap_or_else(|| default_max_value_bytes().min(bound));
        if max_value_bytes == 0 || max_value_bytes > MAX_VALUE_BYTES_LIMIT {
            return Err(ConfigError::stream(
                name,
                "max_value_bytes",
                format!("must be in 1..={MAX_VALUE_BYTES_LIMIT}"),
            ));
        }
        if max_value_bytes > bound {
            return Err(ConfigError::stream(
                name,
                "max_value_bytes",
                format!("must be <= window.max_bytes ({bound}): one value must fit a window"),
            ));
        }
        let samples = self.samples.as_ref().map(|s| s.validate(name, max_value_bytes)).transpose()?;
        Ok(StreamDef {
            name: name.to_owned(),
            rules: StreamRules { op, window, overflow: self.overflow, samples, key_overflow: self.key_overflow },
            sinks: self.sinks.clone(),
            max_key_bytes: self.max_key_bytes,
            max_value_bytes,
            description: self.description.clone(),
            key_rate_limit: self.key_rate_limit.map(|k| k.validate(name)).transpose()?,
        })
    }
}

/// Validated streams, looked up by name.
#[derive(Clone, Debug, Default)]
pub struct StreamTable {
    streams: BTreeMap<String, Arc<StreamDef>>,
    limits: ShardLimits,
    outbox: OutboxLimits,
}

impl StreamTable {
    /// Builds a table from definitions.
    pub fn new(defs: impl IntoIterator<Item = StreamDef>, limits: ShardLimits) -> Self {
        Self {
            streams: defs.into_iter().map(|d| (d.name.clone(), Arc::new(d))).collect(),
            limits,
            outbox: OutboxLimits::default(),
        }
    }

    /// This table with an outbox limit.
    pub fn with_outbox(mut self, outbox: OutboxLimits) -> Self {
        self.outbox = outbox;
        self
    }

    /// The per-shard outbox limit.
    pub fn outbox(&self) -> OutboxLimits {
        self.outbox
    }

    /// The stream called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<StreamDef>> {
        self.streams.get(name)
    }

    /// All streams in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<StreamDef>> {
        self.streams.values()
    }

    /// Per-shard buffer limits.
    pub fn limits(&self) -> ShardLimits {
        self.limits
    }
}

impl StreamsFile {
    /// Parses TOML text (unknown fields are errors).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Validates every stream and limit, returning the table the cluster runs with.
    /// `known_sink_kinds` lists the sink kinds the caller can build.
    pub fn validate(&self, known_sink_kinds: &[&str]) -> Result<StreamTable, ConfigError> {
        if self.limits.max_keys == 0 {
            return Err(ConfigError::Global { field: "limits.max_keys".into(), message: "must be at least 1".into() });
        }
        if self.limits.max_bytes < 1024 {
            return Err(ConfigError::Global {
                field: "limits.max_bytes".into(),
                message: "must be at least 1024".into(),
            });
        }
        for (name, sink) in &self.sinks {
            if !valid_name(name) {
                return Err(ConfigError::Global {
                    field: format!("sinks.{name}"),
                    message: "name must be 1-64 characters of a-z, 0-9, '_', '.', '-'".into(),
                });
            }
            if !known_sink_kinds.contains(&sink.kind.as_str()) {
                return Err(ConfigError::Global {
                    field: format!("sinks.{name}.kind"),
                    message: format!(
                        "unknown sink kind {:?}, expected one of: {}",
                        sink.kind,
                        known_sink_kinds.join(", ")
                    ),
                });
            }
        }
        let exists = |s: &str| self.sinks.contains_key(s);
        let defs = self.streams.iter().map(|(name, cfg)| cfg.validate(name, &exists)).collect::<Result<Vec<_>, _>>()?;
        if self.outbox.max_outputs == 0 {
            return Err(ConfigError::Global {
                field: "outbox.max_outputs".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(StreamTable::new(defs, self.limits).with_outbox(self.outbox))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::NumType;

    const KINDS: &[&str] = &["file", "postgres", "http", "grpc"];

    fn parse_err(text: &str) -> String {
        match StreamsFile::parse(text) {
            Err(e) => e.to_string(),
            Ok(f) => f.validate(KINDS).expect_err("config should be refused").to_string(),
        }
    }

    #[test]
    fn short_and_long_merge_forms() {
        let f = StreamsFile::parse(
            "[streams.a]\nmerge = \"max\"\nwindow = { tumbling = \"1s\" }\n\
             [streams.b]\nmerge = { op = \"max\", value_type = \"f64\" }\nwindow = { max_wait = \"1s\" }\n\
             [streams.c]\nmerge = { op = \"set_union\", max_members = 5 }\nwindow = { max_wait = \"1s\" }\n",
        )
        .unwrap();
        let t = f.validate(KINDS).unwrap();
        assert_eq!(t.get("a").unwrap().rules.op, MergeOp::Max { value_type: NumType::I64 });
        assert_eq!(t.get("b").unwrap().rules.op, MergeOp::Max { value_type: NumType::F64 });
        assert_eq!(t.get("c").unwrap().rules.op, MergeOp::SetUnion { max_members: 5 });
    }

    #[test]
    fn key_rate_limits_default_their_burst_and_name_bad_fields() {
        let t = StreamsFile::parse(
            "[streams.a]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }\nkey_rate_limit = { per_second = 10 }\n\
             [streams.b]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }\n\
             key_rate_limit = { per_second = 10, burst = 50, action = \"shed\" }\n",
        )
        .unwrap()
        .validate(KINDS)
        .unwrap();
        let a = t.get("a").unwrap().key_rate_limit.unwrap();
        assert_eq!((a.per_second.get(), a.burst.get(), a.action), (10, 10, KeyRateAction::Reject));
        let b = t.get("b").unwrap().key_rate_limit.unwrap();
        assert_eq!((b.per_second.get(), b.burst.get(), b.action), (10, 50, KeyRateAction::Shed));
        let base = "[streams.x]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }\n";
        assert_eq!(
            parse_err(&format!("{base}key_rate_limit = {{ per_second = 0 }}")),
            "stream \"x\": key_rate_limit.per_second must be in 1..=1000000000"
        );
        assert_eq!(
            parse_err(&format!("{base}key_rate_limit = {{ per_second = 5, burst = 0 }}")),
            "stream \"x\": key_rate_limit.burst must be in 1..=1000000000"
        );
        assert!(parse_err(&format!("{base}key_rate_limit = {{ per_second = 5, action = \"drop\" }}")).contains("drop"));
        assert!(parse_err(&format!("{base}key_rate_limit = {{ rate = 5 }}")).contains("unknown field `rate`"));
    }

    #[test]
    fn errors_name_stream_and_field() {
        assert_eq!(
            parse_err("[streams.api-calls]\nmerge = \"sum_i64\"\nwindow = { debounce = \"30s\", max_wait = \"10s\" }"),
            "stream \"api-calls\": window.debounce must be <= window.max_wait"
        );
        assert!(
            parse_err("[streams.x]\nmerge = \"summ\"\nwindow = { tumbling = \"1s\" }")
                .contains("unknown merge operator \"summ\"")
        );
        assert!(
            parse_err("[streams.x]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1s\" }\ncolour = 1")
                .contains("unknown field `colour`")
        );
        assert!(
            parse_err("[streams.x]\nmerge = { op = \"set_union\", max_member = 5 }\nwindow = { tumbling = \"1s\" }")
                .contains("max_member")
        );
        assert_eq!(
            parse_err(
                "[streams.x]\nmerge = { op = \"ddsketch\", relative_accuracy = 2.0 }\nwindow = { tumbling = \"1s\" }"
            ),
            "stream \"x\": merge.relative_accuracy must be in [0.000001, 1), got 2"
        );
        assert_eq!(
            parse_err("[streams.x]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }\nsinks = [\"nope\"]"),
            "stream \"x\": sinks names unknown sink \"nope\""
        );
        assert_eq!(
            parse_err("[streams.Bad]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }"),
            "stream \"Bad\": name must be 1-64 characters of a-z, 0-9, '_', '.', '-'"
        );
        assert!(parse_err("[sinks.s]\nkind = \"kafka\"").contains("unknown sink kind \"kafka\""));
        assert!(parse_err("[streams.x]\nmerge = \"count\"").contains("missing field `window`"));
    }
}
