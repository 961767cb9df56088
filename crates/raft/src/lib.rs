//! # coalesce-raft — replicated shards
//!
//! Each shard is an openraft group over R replicas whose state machine is the core's buffer,
//! stored in the node's RocksDB. This crate is the only one that names openraft (pinned to an
//! exact alpha; API churn stays here).
//!
//! - [`types`]: the type configuration, the log's [`types::Command`]s and their responses.
//! - [`codec`]: our on-disk encoding of openraft values (its serde is not a stable format).
//! - [`log_store`]: the log store over `coalesce-storage`, durable through group commit.
//! - [`state_machine`]: applying Ingest/Seal/Ack deterministically; snapshots.
//!
//! Depends on `coalesce-core` and `coalesce-storage`; must not depend on tonic or the server.

pub mod codec;
pub mod log_store;
pub mod state_machine;
pub mod types;

pub use log_store::LogStore;
pub use state_machine::ShardStateMachine;
pub use types::{Command, GroupOutcome, IngestGroup, PeerNode, Response, TypeConfig};
