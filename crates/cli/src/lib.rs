//! # coalesce-cli — `coalescectl` and the local cluster
//!
//! - [`chaos`]: `coalescectl chaos run`: game days on a local cluster (load, kills, pauses,
//!   partitions), checked and reported by `coalesce-chaos`.
//! - [`local`]: a cluster of real `coalesced` processes on loopback (configs, processes,
//!   signals, graceful stop), used by `coalescectl demo` and by the multi-process tests.
//! - [`compose`]: the same cluster's nodes as Docker containers of the Coalesce image in a
//!   compose project (host network, faults through the `docker` CLI): the chaos `compose` backend.
//! - [`outputs`]: following a node's outputs as a durable consumer (game days, benchmarks).
//! - [`netproxy`]: cuttable TCP links between local nodes, for real partitions on loopback.
//! - [`pg`]: a throw-away PostgreSQL server (for the Postgres sink's tests and benchmark).
//! - [`webhook`]: a webhook that throttles with 429s (adaptive-window benchmark and tests).
//! - [`stdout`]: `coalescectl`'s output ([`outln!`]), ending quietly when its reader stops early.
//!
//! The binary talks to nodes over the client API only (generated from `proto/`).
//! Libraries: clap (flags), tonic (gRPC), nix (signals), rand/rand_distr (demo load),
//! tokio-postgres and tempfile (the throw-away PostgreSQL).

pub mod chaos;
pub mod compose;
pub mod local;
pub mod netproxy;
pub mod outputs;
pub mod pg;
pub mod stdout;
pub mod webhook;
