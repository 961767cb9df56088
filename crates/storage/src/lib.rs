//! # coalesce-storage — a node's RocksDB
//!
//! One RocksDB database per node, shared by every shard group the node replicates, with column
//! families for the Raft log, Raft metadata, buffered aggregates, the deadline index, the
//! outbox, producer sessions and state-machine metadata ([`keys`] owns the layout).
//!
//! - [`db`]: opening the database with its column families and options.
//! - [`flusher`]: group commit — one WAL fsync makes many groups' log appends durable.
//! - [`format`]: the database's format version, checked at open, and migrations.
//! - [`shard`]: one shard's rows: log operations, the [`coalesce_core::buffer::BufferStore`]
//!   implementation the state machine applies through, outbox, sessions, snapshots.
//! - [`snapshot`]: a shard snapshot's bytes (read and written by [`coalesce_core::snapshot`])
//!   for this build's column families.
//! - [`transfer`]: a snapshot on its way between nodes — the sender's consistent view read
//!   chunk by chunk, the receiver's checked spool file, installs that survive a restart.
//! - [`error`]: storage errors.
//!
//! This crate knows the core's types but not openraft: log entries and Raft metadata are opaque
//! bytes here, encoded by the Raft crate. It must not depend on tonic or openraft.

pub mod db;
pub mod error;
pub mod flusher;
pub mod format;
pub mod keys;
pub mod shard;
pub mod snapshot;
pub mod transfer;

pub use db::{NodeDb, StorageOptions, WalRecovery};
pub use error::StorageError;
pub use shard::{ApplyBatch, ShardStore};
