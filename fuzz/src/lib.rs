//! # coalesce-fuzz — fuzz targets over the pure core
//!
//! Each target is a function here taking the fuzz input's bytes, so `cargo fuzz` (the binaries
//! in `fuzz_targets/`) and `cargo test` (which replays the committed corpus, `tests/corpus.rs`)
//! run the same code. See `fuzz/README.md` for what each target checks and how to run it.
//!
//! Modules:
//! - [`entry`]: the raft crate's `Command` (a log entry's payload) and its validation, from
//!   `coalesce-core`; the peer protocol's messages and checks come from `coalesce-wire`. Neither
//!   builds RocksDB.
//! - [`shard`]: a shard state machine over the core's in-memory `MemStore` that checks the
//!   buffer's invariants after every entry.
//! - [`roundtrip`]: postcard round trips as storage and replication do them.
//! - [`apply`], [`decode`], [`config`], [`merge`], [`snapshot`], [`peer`], [`request`]: the
//!   targets.
//! - [`seeds`]: the hand-made seed inputs of the corpus (`cargo run --example make_seeds`).

pub mod apply;
pub mod config;
pub mod decode;
pub mod entry;
pub mod merge;
pub mod peer;
pub mod request;
pub mod roundtrip;
pub mod seeds;
pub mod shard;
pub mod snapshot;

/// A target: runs one input, panicking on a finding.
pub type Target = fn(&[u8]);

/// The targets by name, for tools that run them all.
pub const TARGETS: &[(&str, Target)] = &[
    ("apply", apply::run),
    ("decode", decode::run),
    ("streams_config", config::run),
    ("merge", merge::run),
    ("snapshot", snapshot::run),
    ("peer", peer::run),
    ("request", request::run),
];
