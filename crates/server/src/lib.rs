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
//! - [`k8s`]: publishing them as real Leases through the Kubernetes API (kube, k8s-openapi);
//!   [`k8s_fake`]: the stateful fake API server its tests run against.
//! - [`keyrate`]: per-key input rate limits (`key_rate_limit`), with `governor`'s GCRA buckets.
//! - [`convert`]: proto ↔ domain conversions.
//! - [`metrics`]: Prometheus metrics (event counters and scrape-time gauges).
//! - [`http`]: the HTTP port (axum): `/metrics`, `/livez`, `/readyz`, `/loglevel`.
//! - [`telemetry`]: logs (text or JSON) with a filter replaceable at run time.
//! - [`retention`]: bounds outboxes nobody drains (outputs no cursor claims, abandoned
//!   cursors) on each shard's leader.
//! - [`delivery`]: runs the sinks (crate `coalesce-sinks`: file, HTTP, PostgreSQL, durable
//!   gRPC subscribers) on each shard's leader.
//!
//! The binary `coalesced` parses flags and calls [`app::run`]. Libraries used: tonic/prost
//! (gRPC), clap (flags), toml + serde + humantime-serde (config), tracing-subscriber (logs),
//! prometheus (metrics), governor (per-key rate limits), axum (HTTP port), kube + k8s-openapi (Leases),
//! mimalloc (the binary's allocator), and the sinks' own (see `coalesce-sinks`).

pub mod admin;
pub mod app;
pub mod config;
pub mod convert;
pub mod delivery;
pub mod fetch;
pub mod grpc;
pub mod http;
pub mod k8s;
pub mod k8s_fake;
pub mod keyrate;
pub mod leases;
pub mod metrics;
pub mod retention;
pub mod security;
pub mod telemetry;
