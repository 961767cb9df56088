//! # coalesce-sinks — where outputs go
//!
//! Sinks: where outputs go. Each sink is declared once in the streams file (`[sinks.NAME]`)
//! and named by the streams that feed it; see `docs/sinks.md` for every parameter.
//!
//! | kind | delivers to | idempotence |
//! |---|---|---|
//! | `file` | a JSON-lines file per node | at least once; readers dedupe on (shard, seq) |
//! | `http` | a webhook, JSON batches, optional cluster-wide request-rate ceiling | at least once; `Idempotency-Key` header |
//! | `postgres` | a table, via `COPY` into a staging table and one upsert | exactly once: fenced on (cluster id, sink, shard, seq, epoch) |
//! | `grpc` | nothing itself: a durable subscriber name whose cursor holds outputs until it acks | at least once |
//!
//! This crate holds the sink kinds, their configuration and the [`Sink`] trait, and the other
//! downstream calls: a stream's Fetch upstream ([`upstream`]) and the singleflight that
//! coalesces them ([`flight`]). Delivery — the
//! workers on each shard's leader that feed them, only while its lease is valid, per sink and
//! shard in seq order, with retries, a circuit breaker per sink and a replicated dead-letter
//! queue — lives in the server crate (`coalesce_server::delivery`).
//!
//! Libraries: `reqwest` (HTTP client), `tokio-postgres` (PostgreSQL, binary `COPY`) with
//! `tokio-postgres-rustls` (TLS, libpq's `sslmode` read by [`pgtls`]). The
//! request-rate ceiling is our own sliding-window limiter ([`limiter`]): it bounds requests in
//! *every* 1-second window exactly and its limit can change (as leadership moves) without
//! losing its history, which the token-bucket crates cannot.

pub mod file;
pub mod flight;
pub mod http;
pub mod limiter;
pub mod pgtls;
pub mod postgres;
pub mod upstream;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use coalesce_core::cluster::ClusterIdentity;
use coalesce_core::output::{Epoch, Output};
use coalesce_core::stream::{SinkDecl, StreamTable};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Sink kinds this build can run.
pub const SINK_KINDS: &[&str] = &["file", "postgres", "http", "grpc"];

/// Why a delivery did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Try again later (network, timeouts, HTTP 408/5xx, database unavailable). `retry_after`
    /// when the sink said how long to wait.
    #[error("{reason}")]
    Transient { reason: String, retry_after: Option<Duration> },
    /// The sink asked us to slow down (HTTP 429): retried like `Transient`, but it does not
    /// count towards the circuit breaker (the downstream is alive), and it is the signal that
    /// stretches adaptive windows (`coalesce_core::adaptive`).
    #[error("throttled: {reason}")]
    Throttled { reason: String, retry_after: Option<Duration> },
    /// The sink refuses these outputs for good (HTTP 4xx, a constraint violation): they go to
    /// the dead-letter queue.
    #[error("rejected: {reason}")]
    Rejected { reason: String },
    /// The sink has accepted deliveries from a newer leader epoch: this node must stop
    /// delivering the shard.
    #[error("fenced: {reason}")]
    Fenced { reason: String },
}

impl DeliveryError {
    pub fn transient(reason: impl Into<String>) -> Self {
        Self::Transient { reason: reason.into(), retry_after: None }
    }
}

/// One batch handed to a sink: outputs of one shard, in seq order, delivered by the leader of
/// `epoch` of cluster `cluster`.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The delivering cluster: what a sink records downstream to fence or deduplicate is keyed
    /// by its id too, so a re-created cluster (seqs and terms from the bottom again) is not
    /// taken for the old one.
    pub cluster: ClusterIdentity,
    pub shard: u32,
    /// The delivering leader's epoch (not the outputs' own, which is the sealing leader's).
    pub epoch: Epoch,
    pub outputs: &'a [Output],
}

/// A destination for outputs.
#[async_trait::async_trait]
pub trait Sink: Send + Sync + std::fmt::Debug + 'static {
    /// Delivers a batch. `Ok` means it is durable downstream: the shard's cursor then
    /// advances past it.
    async fn deliver(&self, batch: Batch<'_>) -> Result<(), DeliveryError>;

    /// Called when the set of shards this node leads changes (`led` of `total`); sinks with a
    /// cluster-wide budget take their share.
    fn set_share(&self, _led: u32, _total: u32) {}

    /// Total time deliveries waited for the sink's rate limit since start (a metric).
    fn rate_limit_waited(&self) -> Duration {
        Duration::ZERO
    }

    /// The sink's request-rate limiter, for other callers of the same downstream that share
    /// its ceiling (a stream's Fetch upstream, `rate_limit_sink`).
    fn limiter(&self) -> Option<limiter::WindowLimiter> {
        None
    }
}

/// Parameters every sink kind takes.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    /// Most outputs per delivery (1 = one call per output).
    #[serde(default)]
    pub batch_max: Option<usize>,
    /// First retry delay; doubles per failure up to `retry_max`, with ±50% jitter.
    #[serde(with = "humantime_serde", default = "default_retry_initial")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde", default = "default_retry_max")]
    pub retry_max: Duration,
    /// Consecutive failed deliveries (any shard) that open the circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker blocks deliveries before one trial is let through.
    #[serde(with = "humantime_serde", default = "default_breaker_cooldown")]
    pub breaker_cooldown: Duration,
    /// How often a shard's progress is recorded through Raft: at most this much delivered
    /// work is delivered again after a leader dies.
    #[serde(with = "humantime_serde", default = "default_ack_interval")]
    pub ack_interval: Duration,
}

fn default_retry_initial() -> Duration {
    Duration::from_millis(100)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_ack_interval() -> Duration {
    Duration::from_millis(200)
}

const DELIVERY_KEYS: &[&str] =
    &["batch_max", "retry_initial", "retry_max", "breaker_failures", "breaker_cooldown", "ack_interval"];

/// The kind-specific part of a sink declaration.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    File(file::FileParams),
    Http(http::HttpParams),
    Postgres(postgres::PostgresParams),
    /// A durable subscriber: consumers subscribing under this name keep outputs in the outbox
    /// until they ack them.
    Grpc,
}

/// A validated sink declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
    pub delivery: DeliveryParams,
    /// The streams that feed this sink.
    pub streams: BTreeSet<String>,
}

/// A sink declaration the node cannot run.
#[derive(Debug, thiserror::Error)]
#[error("sinks.{name}: {message}")]
pub struct SinkConfigError {
    pub name: String,
    pub message: String,
}

fn params<T: DeserializeOwned>(name: &str, table: toml::Table) -> Result<T, SinkConfigError> {
    T::deserialize(toml::Value::Table(table))
        .map_err(|e| SinkConfigError { name: name.to_owned(), message: e.to_string().trim().to_owned() })
}

impl SinkConfig {
    /// Validates every sink declaration against the streams that use them.
    pub fn parse_all(
        decls: &BTreeMap<String, SinkDecl>,
        streams: &StreamTable,
    ) -> Result<Vec<SinkConfig>, SinkConfigError> {
        let sinks: Vec<SinkConfig> =
            decls.iter().map(|(name, decl)| Self::parse(name, decl, streams)).collect::<Result<_, _>>()?;
        // Each PostgreSQL sink fences its own deliveries: two writing one stream into one table
        // would each apply every output of that stream once — twice in all.
        let mut writers: BTreeMap<(&str, &str), &str> = BTreeMap::new();
        for sink in &sinks {
            let SinkKind::Postgres(p) = &sink.kind else { continue };
            for stream in &sink.streams {
                if let Some(other) = writers.insert((p.table.as_str(), stream.as_str()), sink.name.as_str()) {
                    return Err(SinkConfigError {
                        name: sink.name.clone(),
                        message: format!(
                            "sinks {other:?} and {:?} both write stream {stream:?} into table {:?}: each would \
                             apply its outputs once, twice in all; use one sink",
                            sink.name, p.table
                        ),
                    });
                }
            }
        }
        Ok(sinks)
    }

    fn parse(name: &str, decl: &SinkDecl, streams: &StreamTable) -> Result<SinkConfig, SinkConfigError> {
        let err = |message: String| SinkConfigError { name: name.to_owned(), message };
        let (common, own): (toml::Table, toml::Table) =
            decl.params.clone().into_iter().partition(|(k, _)| DELIVERY_KEYS.contains(&k.as_str()));
        let delivery: DeliveryParams = params(name, common)?;
        if delivery.batch_max == Some(0) {
            return Err(err("batch_max must be at least 1".into()));
        }
        if delivery.retry_initial.is_zero() || delivery.retry_initial > delivery.retry_max {
            return Err(err("need 0 < retry_initial <= retry_max".into()));
        }
        if delivery.breaker_failures == 0 {
            return Err(err("breaker_failures must be at least 1".into()));
        }
        let fed: BTreeSet<String> =
            streams.iter().filter(|s| s.sinks.iter().any(|n| n == name)).map(|s| s.name.clone()).collect();
        let kind = match decl.kind.as_str() {
            "file" => SinkKind::File(params(name, own)?),
            "http" => SinkKind::Http(params::<http::HttpParams>(name, own)?.validate().map_err(err)?),
            "postgres" => {
                let p: postgres::PostgresParams = params(name, own)?;
                SinkKind::Postgres(p.validate(fed.iter().filter_map(|s| streams.get(s))).map_err(err)?)
            }
            "grpc" => {
                if !own.is_empty() {
                    return Err(err("a grpc sink takes no parameters besides the delivery ones".into()));
                }
                SinkKind::Grpc
            }
            other => {
                return Err(err(format!("unknown sink kind {other:?}, expected one of: {}", SINK_KINDS.join(", "))));
            }
        };
        Ok(SinkConfig { name: name.to_owned(), kind, delivery, streams: fed })
    }

    /// The kind as written in config.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            SinkKind::File(_) => "file",
            SinkKind::Http(_) => "http",
            SinkKind::Postgres(_) => "postgres",
            SinkKind::Grpc => "grpc",
        }
    }

    /// Most outputs per delivery.
    pub fn batch_max(&self) -> usize {
        self.delivery.batch_max.unwrap_or(match self.kind {
            SinkKind::Http(_) => 100,
            _ => 1_000,
        })
    }

    /// Builds the sink for node `node` whose data directory is `data_dir` (relative file paths
    /// resolve against it).
    pub async fn build(&self, node: &str, data_dir: &Path) -> anyhow::Result<Option<std::sync::Arc<dyn Sink>>> {
        Ok(match &self.kind {
            SinkKind::File(p) => Some(std::sync::Arc::new(file::FileSink::open(p, node, data_dir)?)),
            SinkKind::Http(p) => Some(std::sync::Arc::new(http::HttpSink::new(&self.name, p)?)),
            SinkKind::Postgres(p) => Some(std::sync::Arc::new(postgres::PostgresSink::new(&self.name, p.clone()))),
            SinkKind::Grpc => None,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use coalesce_core::stream::StreamsFile;

    fn parse(text: &str) -> Result<Vec<SinkConfig>, String> {
        let file = StreamsFile::parse(text).map_err(|e| e.to_string())?;
        let table = file.validate(SINK_KINDS).map_err(|e| e.to_string())?;
        SinkConfig::parse_all(&file.sinks, &table).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_each_kind_with_defaults() {
        let sinks = parse(
            r#"
            [sinks.f]
            kind = "file"
            path = "out-{node}.jsonl"
            [sinks.h]
            kind = "http"
            url = "http://127.0.0.1:9/hook"
            rate_limit = 1500
            batch_max = 1
            [sinks.p]
            kind = "postgres"
            url = "host=/tmp dbname=x"
            table = "counts"
            mode = "accumulate"
            [sinks.g]
            kind = "grpc"
            [streams.c]
            merge = "sum_i64"
            window = { tumbling = "1s" }
            sinks = ["f", "h", "p", "g"]
            "#,
        )
        .unwrap();
        assert_eq!(sinks.len(), 4);
        let h = sinks.iter().find(|s| s.name == "h").unwrap();
        assert_eq!(h.batch_max(), 1);
        assert_eq!(h.delivery.retry_initial, Duration::from_millis(100));
        assert_eq!(h.streams, BTreeSet::from(["c".to_owned()]));
        assert_eq!(sinks.iter().find(|s| s.name == "f").unwrap().batch_max(), 1000);
    }

    #[test]
    fn refuses_bad_parameters_naming_them() {
        let e = parse("[sinks.f]\nkind = \"file\"\npath = \"x\"\ncolour = 1").unwrap_err();
        assert!(e.contains("sinks.f") && e.contains("colour"), "{e}");
        let e = parse("[sinks.f]\nkind = \"file\"").unwrap_err();
        assert!(e.contains("path"), "{e}");
        let e = parse("[sinks.h]\nkind = \"http\"\nurl = \"ftp://x\"").unwrap_err();
        assert!(e.contains("http:// or https://"), "{e}");
        let e = parse("[sinks.h]\nkind = \"http\"\nurl = \"http://x\"\nbatch_max = 0").unwrap_err();
        assert!(e.contains("batch_max"), "{e}");
        let e = parse("[sinks.g]\nkind = \"grpc\"\nurl = \"x\"").unwrap_err();
        assert!(e.contains("no parameters"), "{e}");
        let e = parse(
            "[sinks.p]\nkind = \"postgres\"\nurl = \"host=db\"\ntable = \"t\"\nmode = \"accumulate\"\n\
             [streams.l]\nmerge = \"latest\"\nwindow = { tumbling = \"1s\" }\nsinks = [\"p\"]",
        )
        .unwrap_err();
        assert!(e.contains("accumulate") && e.contains("\"l\""), "{e}");
        let e = parse("[sinks.p]\nkind = \"postgres\"\nurl = \"host=db\"\ntable = \"drop table\"").unwrap_err();
        assert!(e.contains("table"), "{e}");
        let e = parse(
            "[sinks.p]\nkind = \"postgres\"\nurl = \"host=db\"\ntable = \"t\"\n\
             [sinks.q]\nkind = \"postgres\"\nurl = \"host=db\"\ntable = \"t\"\n\
             [streams.s]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1s\" }\nsinks = [\"p\", \"q\"]",
        )
        .unwrap_err();
        assert!(e.contains("twice in all"), "{e}");
        let e = parse("[sinks.p]\nkind = \"postgres\"\nurl = \"host=db sslmode=verify\"\ntable = \"t\"").unwrap_err();
        assert!(e.contains("sinks.p") && e.contains("verify-full"), "{e}");
    }
}
