//! # coalesce-core — what "correct" means for the whole cluster
//!
//! This crate holds all coalescing logic and nothing else: no async runtime, no network, no
//! RocksDB, no Raft. Everything here is deterministic and driven by timestamps passed in by the
//! caller (see [`time`]), so the replicated state machine can run it on every replica and get the
//! same bytes, and tests can drive it without sleeping.
//!
//! ```text
//!   Event ──validate──► EventBatch (pre-merged per key, producer coverage)
//!                              │ (replicated through Raft by the storage/raft crates)
//!                              ▼
//!   ShardBuffer::apply_ingest(stamp) ── merge into Buffered aggregates (BufferStore)
//!                              │ window triggers: count / bytes / overflow at apply,
//!                              │ time triggers via the deadline index
//!                              ▼
//!   ShardBuffer::seal_due(stamp) ──► Output (stream, key, window, inputs, merged value)
//! ```
//!
//! Modules:
//! - [`time`]: millisecond timestamps and the injected [`time::Clock`].
//! - [`hash`]: the stable (stream, key) → shard function, with committed test vectors.
//! - [`value`]: the values events carry.
//! - [`merge`]: merge operators ([`merge::MergeOp`]) and their accumulators ([`merge::Aggregate`]).
//! - [`hll`]: a deterministic, canonically encoded HyperLogLog (see its docs for why it is ours).
//! - [`window`]: window policies and per-key window bookkeeping (deadlines, triggers).
//! - [`adaptive`]: the load-adaptive window controller — downstream pressure in, how late the
//!   leader seals out (bounded by the stream's `max_staleness`).
//! - [`stream`]: stream definitions and the TOML config that declares them.
//! - [`batch`]: validation of events and pre-merging of a request into an [`batch::EventBatch`].
//! - [`buffer`]: per-shard buffered aggregates behind the [`buffer::BufferStore`] trait, bounded
//!   by keys and bytes, with overflow policies, and the deadline index the scheduler reads.
//! - [`session`]: the idempotent-producer session table.
//! - [`hotkeys`]: the heaviest keys of a shard by input rate (Space-Saving with exponential decay,
//!   bounded memory) — leader-local telemetry, not replicated.
//! - [`output`]: what a closed window emits.
//! - [`samples`]: up to `n` representative inputs (first, last or a mergeable reservoir) that a
//!   window keeps so a dedupe output shows what it suppressed.
//! - [`entry`]: the commands a shard's Raft log carries and their validation (re-exported by
//!   `coalesce-raft`; decoded and applied by the fuzz targets in `fuzz/`).
//! - [`cluster`]: the cluster id sinks key their fences and idempotency keys by.
//! - [`snapshot`]: a shard snapshot's bytes, written and read a row at a time with limits on
//!   what a peer may send (streamed by `coalesce-storage`).
//! - [`error`]: error types with stable codes.
//!
//! Libraries used instead of hand-written code: `xxhash-rust` (XXH3, the shard hash),
//! `sketches-ddsketch` (DDSketch quantiles), `json-patch` (RFC 7386 merge), `toml` + `serde` +
//! `humantime-serde` (config), `postcard` (canonical binary encoding), `thiserror` (errors).
//! HyperLogLog is implemented here because the available crates serialize nondeterministically
//! (pointer bits or hash-set order), which would break byte-identical replicas.

pub mod adaptive;
pub mod batch;
pub mod buffer;
pub mod cluster;
pub mod entry;
pub mod error;
pub mod hash;
pub mod hll;
pub mod hotkeys;
pub mod merge;
pub mod output;
pub mod samples;
pub mod session;
pub mod snapshot;
pub mod stream;
pub mod time;
pub mod value;
pub mod window;

pub use adaptive::{AdaptiveController, AdaptivePolicy, Decision, Pressure};
pub use error::{ConfigError, EventError};
pub use hotkeys::{HotKey, HotKeys, HotKeysConfig};
pub use samples::{Sample, SamplePick, SamplePolicy, Samples};
pub use time::Millis;
