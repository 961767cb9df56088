//! # coalesce-server — a Coalesce node
//!
//! - [`config`]: the typed config file (and the streams file it names), validated up front.
//! - [`app`]: all wiring — storage, shard groups, peer and client ports, bootstrap, window
//!   scheduler, graceful shutdown.
//! - [`grpc`]: the client API (`coalesce.v1.Coalesce`): ingest with per-event statuses and
//!   any-node forwarding, subscribe, ack, status.
//! - [`admin`]: the operator API (`coalesce.v1.Admin`): dead-letter queues, sink status,
//!   leases, shard details, streams, leader transfer, drain.
//! - [`security`]: TLS on both ports, bearer tokens with roles on the client port.
//! - [`leases`]: leader leases in the shape of Kubernetes `coordination.k8s.io/v1` Leases.
//! - [`convert`]: proto ↔ domain conversions.
//! - [`delivery`]: runs the sinks (crate `coalesce-sinks`: file, HTTP, PostgreSQL, durable
//!   gRPC subscribers) on each shard's leader.
//!
//! The binary `coalesced` parses flags and calls [`app::run`]. Libraries used: tonic/prost
//! (gRPC), clap (flags), toml + serde + humantime-serde (config), tracing-subscriber (logs),
//! and the sinks' own (see `coalesce-sinks`).

pub mod admin;
pub mod app;
pub mod config;
pub mod convert;
pub mod delivery;
pub mod grpc;
pub mod leases;
pub mod security;
