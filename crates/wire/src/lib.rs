//! # coalesce-wire — what nodes keep and send each other
//!
//! The bytes of a shard's Raft log and of the peer protocol, the checks a node runs on a peer's
//! message before it acts on it, and the path of a client's request to a proposal, without
//! RocksDB and without doing any I/O (openraft and the generated protobuf code bring tokio and
//! tonic along, unused here): the node (`coalesce-raft`, `coalesce-server`) uses this crate as
//! it is, and the fuzz targets (`fuzz/`, which must not build RocksDB) feed it arbitrary bytes.
//!
//! - [`types`]: the openraft type configuration, the log's [`types::Command`]s (defined in
//!   [`coalesce_core::entry`]) and what applying them answers.
//! - [`codec`]: our encoding of openraft values on disk (its serde is not a stable format) and
//!   of peer messages.
//! - [`peer`]: the application messages of the peer protocol ([`peer::Forwarded`],
//!   [`peer::QuiesceRequest`]) and the checks on replicated entries, snapshot metadata and
//!   forwarded requests.
//! - [`api`]: a client's `Ingest` request from its protobuf to the batches a node proposes
//!   (bounds, conversion, admission, validation and pre-merge, one status per event).
//!
//! Depends on `coalesce-core`, `coalesce-proto` (the messages) and openraft (pinned to an exact
//! alpha; this crate and `coalesce-raft` are the only ones that name it); not on RocksDB, the
//! storage crate or the server.

pub mod api;
pub mod codec;
pub mod peer;
pub mod types;

pub use types::{Command, GroupOutcome, IngestGroup, PeerNode, Response, TypeConfig};
