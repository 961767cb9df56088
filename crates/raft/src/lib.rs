//! # coalesce-raft — replicated shards
//!
//! Each shard is an openraft group over R replicas whose state machine is the core's buffer,
//! stored in the node's RocksDB. This crate is the only one that names openraft (pinned to an
//! exact alpha; API churn stays here).
//!
//! - [`types`], [`codec`]: the type configuration, the log's [`types::Command`]s and their
//!   encoding on disk and between peers (from `coalesce-wire`, which the fuzz targets read
//!   without RocksDB).
//! - [`log_store`]: the log store over `coalesce-storage`, durable through group commit.
//! - [`state_machine`]: applying Ingest/Seal/Ack deterministically.
//! - [`reader`]: a shard's applied state, read-only and typed — how every other crate reads it.
//! - [`snapshot`]: shard snapshots between replicas, streamed and bounded on both sides.
//! - [`network`]: the peer transport (tonic, one channel per peer, real pre-vote and
//!   leadership transfer).
//! - [`identity`]: the cluster id — made once, learned through Hello, checked on every Hello.
//! - [`tls`]: TLS on both ports, reloadable certificates, peer identities bound to node names;
//!   the accept loop every port (client, peer, HTTP) takes its connections from.
//! - [`connections`]: the bounds of a port's connections — how many, how many per address, how
//!   long silent or idle — counted where they are accepted.
//! - [`metrics`]: Prometheus metrics of the shards (stream inputs/outputs, commit latency).
//! - [`node`]: a node's groups — placement, bootstrap, proposals, the window scheduler,
//!   graceful hand-off — and the peer gRPC service, one job per file.
//! - [`protocol`]: the peer protocol's version, its check, and the metadata peers send.
//!
//! Depends on `coalesce-core`, `coalesce-wire`, `coalesce-storage` and `coalesce-proto`; not on
//! the server.

pub mod changes;
pub mod connections;
pub mod failpoints;
pub mod identity;
pub mod log_store;
pub mod metrics;
pub mod network;
pub mod node;
pub mod protocol;
pub mod quiesce;
pub mod reader;
pub mod snapshot;
pub mod state_machine;
pub mod tls;
pub mod tracectx;

pub use coalesce_wire::{codec, types};
pub use log_store::LogStore;
pub use node::{
    ClusterSpec, Leadership, NodeSpec, PeerService, ProposeError, RaftNode, RaftTiming, ReplicaDetail, ShardDetail,
    ShardView, SinkHealth,
};
pub use state_machine::ShardStateMachine;
pub use types::{Command, GroupOutcome, IngestGroup, PeerNode, Response, TypeConfig};
