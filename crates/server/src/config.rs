//! The node's configuration: one typed TOML file (unknown fields are errors), overridden by
//! environment variables and flags (see `coalesced --help`), validated before any port is
//! bound. The streams live in their own file (`streams_file`), the one a Kubernetes ConfigMap
//! mounts; see `deploy/examples/streams.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use coalesce_core::stream::{StreamTable, StreamsFile};
use coalesce_raft::connections::ConnLimits;
use coalesce_raft::snapshot::SnapshotOptions;
use coalesce_raft::{ClusterSpec, NodeSpec, RaftTiming};
use serde::Deserialize;

use coalesce_sinks::{SINK_KINDS, SinkConfig, SinkKind};

use crate::security::{Auth, AuthConfig, LoadedTls, TlsConfig};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub api: ApiLimits,
    /// TLS for the client and peer ports (see `crate::security`).
    #[serde(default)]
    pub tls: TlsConfig,
    /// Bearer tokens and roles on the client port (see `crate::security`).
    #[serde(default)]
    pub auth: AuthConfig,
    /// Publishing shard Leases to Kubernetes (see `crate::k8s`).
    #[serde(default)]
    pub kubernetes: crate::k8s::KubernetesConfig,
    /// Span export over OTLP (see `crate::telemetry`).
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// The node's RocksDB.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Path of the streams file, relative to the config file.
    pub streams_file: PathBuf,
}

/// `[storage]`: how the node's RocksDB is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `"strict"` (default): damage in the middle of the write-ahead log refuses the start
    /// instead of dropping the rest of the log; `"point_in_time"`: RocksDB's default, faster
    /// fsyncs (recycled WAL files) but a corrupt record silently drops everything after it
    /// (`coalesce_storage::WalRecovery`, docs/operations.md).
    #[serde(default)]
    pub wal_recovery: coalesce_storage::WalRecovery,
    /// Most RocksDB table files kept open at once (default 1,024, at least 64); more are
    /// reopened on use. Bounds the descriptors storage takes beside the ports' connections.
    #[serde(default = "default_max_open_files")]
    pub max_open_files: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { wal_recovery: Default::default(), max_open_files: default_max_open_files() }
    }
}

fn default_max_open_files() -> u32 {
    coalesce_storage::db::DEFAULT_MAX_OPEN_FILES
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; must appear in `cluster.nodes`.
    pub name: String,
    pub data_dir: PathBuf,
    /// Where the peer (Raft) port listens.
    pub peer_listen: SocketAddr,
    /// Where the client (API) port listens.
    pub client_listen: SocketAddr,
    /// Where the HTTP port listens (`/metrics`, `/livez`, `/readyz`, `/loglevel`); none
    /// when unset.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Let the peer port listen beyond loopback without `[tls.peer]`: anyone who reaches it can
    /// act as a node. Only for a network that nothing but Coalesce nodes can reach.
    #[serde(default)]
    pub insecure_peer: bool,
    /// Let the client and HTTP ports listen beyond loopback without `[[auth.tokens]]`: anyone
    /// who reaches them can ingest, read and administer. Only for a trusted network.
    #[serde(default)]
    pub insecure: bool,
    /// Connections the peer port holds open at once; more are reset as soon as accepted
    /// (`coalesce_net_connections_refused_total`). Each peer node needs a few.
    #[serde(default = "default_peer_max_connections")]
    pub peer_max_connections: usize,
    /// Connections the HTTP port holds open at once (probes, scrapes, operators); more are reset.
    #[serde(default = "default_http_max_connections")]
    pub http_max_connections: usize,
}

/// Peers hold a few connections each (Raft, forwards, fetches): room for clusters far larger
/// than a shard group ever spans, yet a bound on what a misbehaving peer can hold.
fn default_peer_max_connections() -> usize {
    1024
}
/// Prometheus, the kubelet's probes and an operator's curl need a handful; the port serves
/// short requests, so a small bound costs nothing and keeps its file descriptors few.
fn default_http_max_connections() -> usize {
    256
}

/// Peer and HTTP ports: a connection that sends nothing this long after connecting (after its
/// TLS handshake) is closed. Real callers speak at once.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP port: a connection with no request in progress this long is closed — a kept-alive
/// connection between scrapes (a scraper reconnects), or a request header trickled byte by
/// byte. Its requests answer in milliseconds.
const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP port: connections from one address (a kubelet's probes and a Prometheus need a few):
/// one host cannot take the port from the kubelet.
const HTTP_MAX_CONNECTIONS_PER_IP: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    /// Number of shards; fixed when the cluster is created.
    pub shards: u32,
    #[serde(default = "default_replication")]
    pub replication: usize,
    /// The static peer list: stable names and advertised addresses.
    pub nodes: Vec<NodeEntry>,
}

fn default_replication() -> usize {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub name: String,
    /// Peer port address as other nodes reach it (`host:port`).
    pub peer: String,
    /// Client port address as clients reach it.
    pub client: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftConfig {
    #[serde(with = "humantime_serde", default = "default_heartbeat")]
    pub heartbeat: Duration,
    #[serde(with = "humantime_serde", default = "default_election_min")]
    pub election_timeout_min: Duration,
    #[serde(with = "humantime_serde", default = "default_election_max")]
    pub election_timeout_max: Duration,
    /// An idle shard group stops its Raft timers after this long (`0s`: never); node pings
    /// stand in for its heartbeats (`coalesce_raft::quiesce`).
    #[serde(with = "humantime_serde", default = "default_quiesce_after")]
    pub quiesce_after: Duration,
    /// Applied state waits in memory at most this long before it is written to RocksDB
    /// (`0s`: after every apply); a restarted node re-applies the rest from its Raft log.
    #[serde(with = "humantime_serde", default = "default_checkpoint_interval")]
    pub checkpoint_interval: Duration,
    /// The largest shard snapshot this node accepts from a peer, in bytes (a larger one is
    /// refused and counted: `coalesce_raft_snapshot_refused_total{reason="too_large"}`).
    #[serde(default = "default_snapshot_max_bytes")]
    pub snapshot_max_bytes: u64,
    /// A snapshot transfer that brings no chunk for this long is abandoned (its file removed).
    #[serde(with = "humantime_serde", default = "default_snapshot_stall_timeout")]
    pub snapshot_stall_timeout: Duration,
    /// Snapshots this node receives at once; more are refused as busy and retried by the leader.
    #[serde(default = "default_snapshot_concurrent_receives")]
    pub snapshot_concurrent_receives: usize,
    /// Bytes per second one snapshot is sent at, at most (0: no limit), so a replica catching
    /// up does not take the leader's disk and network from its live traffic.
    #[serde(default)]
    pub snapshot_send_bytes_per_second: u64,
}

fn default_heartbeat() -> Duration {
    Duration::from_millis(RaftTiming::default().heartbeat_ms)
}
fn default_election_min() -> Duration {
    Duration::from_millis(RaftTiming::default().election_min_ms)
}
fn default_election_max() -> Duration {
    Duration::from_millis(RaftTiming::default().election_max_ms)
}
fn default_quiesce_after() -> Duration {
    Duration::from_millis(RaftTiming::default().quiesce_after_ms)
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_millis(RaftTiming::default().checkpoint_ms)
}
fn default_snapshot_max_bytes() -> u64 {
    SnapshotOptions::DEFAULT.max_bytes
}
fn default_snapshot_stall_timeout() -> Duration {
    Duration::from_millis(SnapshotOptions::DEFAULT.stall_ms)
}
fn default_snapshot_concurrent_receives() -> usize {
    SnapshotOptions::DEFAULT.concurrent_receives
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat: default_heartbeat(),
            election_timeout_min: default_election_min(),
            election_timeout_max: default_election_max(),
            quiesce_after: default_quiesce_after(),
            checkpoint_interval: default_checkpoint_interval(),
            snapshot_max_bytes: default_snapshot_max_bytes(),
            snapshot_stall_timeout: default_snapshot_stall_timeout(),
            snapshot_concurrent_receives: default_snapshot_concurrent_receives(),
            snapshot_send_bytes_per_second: 0,
        }
    }
}

/// Limits on client requests (defaults documented in docs/api.md).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiLimits {
    #[serde(default = "default_max_events")]
    pub max_events_per_request: usize,
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Calls one client connection may have open at once (HTTP/2 concurrent streams): past
    /// it the connection's client waits, per HTTP/2 flow control. Subscriptions count.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_connection: u32,
    /// Calls of one connection the node works on at once; more wait their turn, so one
    /// connection cannot take every worker.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_calls_per_connection: usize,
    /// Longest a call may take to answer (DEADLINE_EXCEEDED past it; a shorter `grpc-timeout`
    /// from the caller wins). A subscription's stream of outputs is not cut: it has answered.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: std::time::Duration,
    /// Connections the client port holds open at once; more are reset as soon as accepted
    /// (`coalesce_net_connections_refused_total{reason="max_connections"}`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Of them, from one IP address (`reason="max_connections_per_ip"`).
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// A connection that sends nothing this long after connecting (after its TLS handshake)
    /// is closed.
    #[serde(default = "default_first_byte_timeout", with = "humantime_serde")]
    pub connection_first_byte_timeout: std::time::Duration,
    /// A connection with no call open this long is closed (`0s`: never). A subscription is a
    /// call however long it waits for outputs.
    #[serde(default = "default_connection_idle_timeout", with = "humantime_serde")]
    pub connection_idle_timeout: std::time::Duration,
}

fn default_max_events() -> usize {
    10_000
}
fn default_max_request_bytes() -> usize {
    8 << 20
}
fn default_max_streams() -> u32 {
    256
}
fn default_max_concurrent() -> usize {
    64
}
fn default_request_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}
/// A node's file descriptors (20k in production) must also hold its peers, RocksDB's files
/// and sink connections: 4,096 clients (plus 1,024 TLS handshakes at most) leave most of
/// them, and are far more than the producers and subscribers of a node need (clients
/// multiplex calls over one connection per node).
fn default_max_connections() -> usize {
    4096
}
/// An eighth of the port: a host (or a NAT gateway in front of many) has ample room, and
/// one address alone cannot fill the port.
fn default_max_connections_per_ip() -> usize {
    512
}
fn default_first_byte_timeout() -> std::time::Duration {
    FIRST_BYTE_TIMEOUT
}
/// Long enough that a client between bursts keeps its connection (no new handshake); short
/// enough that connections nobody uses are given back within minutes.
fn default_connection_idle_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(300)
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_events_per_request: default_max_events(),
            max_request_bytes: default_max_request_bytes(),
            max_streams_per_connection: default_max_streams(),
            max_concurrent_calls_per_connection: default_max_concurrent(),
            request_timeout: default_request_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            connection_first_byte_timeout: default_first_byte_timeout(),
            connection_idle_timeout: default_connection_idle_timeout(),
        }
    }
}

/// A configuration problem, found before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Streams { path: PathBuf, source: coalesce_core::ConfigError },
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("{path}: {source}")]
    Sink { path: PathBuf, source: coalesce_sinks::SinkConfigError },
    #[error("{path}: {source}")]
    Fetch { path: PathBuf, source: coalesce_sinks::upstream::FetchConfigError },
}

/// Everything a node needs, validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub streams: StreamTable,
    pub sinks: Vec<SinkConfig>,
    /// The `fetch` upstream of each stream that has one.
    pub fetch: std::collections::BTreeMap<String, coalesce_sinks::upstream::FetchParams>,
    pub tls: LoadedTls,
    pub auth: std::sync::Arc<Auth>,
}

impl Config {
    /// Reads and validates `path` and the streams file it names.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.finish(base)
    }

    /// Validates this config, reading the streams file relative to `base`.
    pub fn finish(mut self, base: &Path) -> Result<Loaded, ConfigError> {
        if self.streams_file.is_relative() {
            self.streams_file = base.join(&self.streams_file);
        }
        let text = std::fs::read_to_string(&self.streams_file)
            .map_err(|source| ConfigError::Read { path: self.streams_file.clone(), source })?;
        let file = StreamsFile::parse(&text)
            .map_err(|source| ConfigError::Streams { path: self.streams_file.clone(), source })?;
        let streams = file
            .validate(SINK_KINDS)
            .map_err(|source| ConfigError::Streams { path: self.streams_file.clone(), source })?;
        let sinks = SinkConfig::parse_all(&file.sinks, &streams)
            .map_err(|source| ConfigError::Sink { path: self.streams_file.clone(), source })?;
        let mut fetch = std::collections::BTreeMap::new();
        for (stream, config) in &file.streams {
            if let Some(table) = &config.fetch {
                let params = coalesce_sinks::upstream::FetchParams::parse(stream, table, &sinks)
                    .map_err(|source| ConfigError::Fetch { path: self.streams_file.clone(), source })?;
                if params.on_window_close && config.merge.0 != coalesce_core::merge::MergeOp::Latest {
                    return Err(ConfigError::Fetch {
                        path: self.streams_file.clone(),
                        source: coalesce_sinks::upstream::FetchConfigError {
                            stream: stream.clone(),
                            message: format!(
                                "on_window_close replaces a latest-wins value with the fetched answer; this \
                                 stream merges with {}",
                                config.merge.0.name()
                            ),
                        },
                    });
                }
                fetch.insert(stream.clone(), params);
            }
        }
        self.validate()?;
        self.telemetry.validate(base).map_err(|message| ConfigError::Invalid { field: "telemetry", message })?;
        for sink in &sinks {
            if let SinkKind::Http(h) = &sink.kind
                && let Some(rate) = h.rate_limit
                && rate < self.cluster.shards
            {
                return Err(ConfigError::Invalid {
                    field: "sinks",
                    message: format!(
                        "sinks.{}: rate_limit {rate} is below the number of shards ({}): nodes split the ceiling by \
                         the shards they lead, so it must allow at least one request per second per shard",
                        sink.name, self.cluster.shards
                    ),
                });
            }
        }
        let names: Vec<String> = self.cluster.nodes.iter().map(|n| n.name.clone()).collect();
        let tls = self
            .tls
            .load(base, &self.node.name, &names)
            .map_err(|message| ConfigError::Invalid { field: "tls", message })?;
        let auth = self.auth.load(base).map_err(|message| ConfigError::Invalid { field: "auth", message })?;
        crate::security::check_exposure(&self.node, &tls, &auth)
            .map_err(|(field, message)| ConfigError::Invalid { field, message })?;
        if tls.peer.is_some()
            && let Some(bad) = self.cluster.nodes.iter().find(|n| !coalesce_raft::tls::is_certificate_name(&n.name))
        {
            return Err(ConfigError::Invalid {
                field: "cluster.nodes",
                message: format!(
                    "with [tls.peer], node names are checked against certificates and must be DNS names; {:?} is not",
                    bad.name
                ),
            });
        }
        Ok(Loaded { config: self, streams, sinks, fetch, tls, auth: std::sync::Arc::new(auth) })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        if self.cluster.shards == 0 || self.cluster.shards > 4096 {
            return invalid("cluster.shards", format!("must be in 1..=4096, got {}", self.cluster.shards));
        }
        if self.cluster.replication == 0 || self.cluster.replication > self.cluster.nodes.len() {
            return invalid(
                "cluster.replication",
                format!(
                    "must be in 1..={} (the number of nodes), got {}",
                    self.cluster.nodes.len(),
                    self.cluster.replication
                ),
            );
        }
        let mut names: Vec<&str> = self.cluster.nodes.iter().map(|n| n.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return invalid("cluster.nodes", "node names must be unique".into());
        }
        if !names.contains(&self.node.name.as_str()) {
            return invalid("node.name", format!("{:?} is not in cluster.nodes", self.node.name));
        }
        if !(64..=1_000_000).contains(&self.storage.max_open_files) {
            return invalid(
                "storage.max_open_files",
                format!("must be in 64..=1000000, got {}", self.storage.max_open_files),
            );
        }
        let r = &self.raft;
        if !(r.heartbeat < r.election_timeout_min && r.election_timeout_min < r.election_timeout_max) {
            return invalid("raft", "need heartbeat < election_timeout_min < election_timeout_max".into());
        }
        if r.snapshot_concurrent_receives == 0 {
            return invalid("raft.snapshot_concurrent_receives", "must be at least 1".into());
        }
        if r.snapshot_max_bytes < 1 << 20 {
            return invalid("raft.snapshot_max_bytes", format!("must be at least 1 MiB, got {}", r.snapshot_max_bytes));
        }
        if r.snapshot_stall_timeout < Duration::from_secs(1) {
            return invalid("raft.snapshot_stall_timeout", "must be at least 1s".into());
        }
        // One 1 MiB chunk per second at least: slower, a receiver's stall timeout (or its 64 KiB/s
        // floor) would drop every transfer.
        if r.snapshot_send_bytes_per_second != 0 && r.snapshot_send_bytes_per_second < 1 << 20 {
            return invalid(
                "raft.snapshot_send_bytes_per_second",
                format!("must be 0 (no limit) or at least 1048576 (1 MiB/s), got {}", r.snapshot_send_bytes_per_second),
            );
        }
        self.kubernetes.validate().map_err(|message| ConfigError::Invalid { field: "kubernetes", message })?;
        if self.api.max_events_per_request == 0 {
            return invalid("api.max_events_per_request", "must be at least 1".into());
        }
        if self.api.max_streams_per_connection == 0 {
            return invalid("api.max_streams_per_connection", "must be at least 1".into());
        }
        if self.api.max_concurrent_calls_per_connection == 0 {
            return invalid("api.max_concurrent_calls_per_connection", "must be at least 1".into());
        }
        if self.api.request_timeout < std::time::Duration::from_secs(1) {
            return invalid("api.request_timeout", format!("{:?} is shorter than 1s", self.api.request_timeout));
        }
        for (field, n) in [
            ("api.max_connections", self.api.max_connections),
            ("api.max_connections_per_ip", self.api.max_connections_per_ip),
            ("node.peer_max_connections", self.node.peer_max_connections),
            ("node.http_max_connections", self.node.http_max_connections),
        ] {
            if n == 0 {
                return invalid(field, "must be at least 1".into());
            }
        }
        if self.api.connection_first_byte_timeout < Duration::from_millis(100) {
            return invalid(
                "api.connection_first_byte_timeout",
                format!("{:?} is shorter than 100ms", self.api.connection_first_byte_timeout),
            );
        }
        let idle = self.api.connection_idle_timeout;
        if !idle.is_zero() && idle < Duration::from_secs(1) {
            return invalid("api.connection_idle_timeout", format!("{idle:?} is shorter than 1s (0s: never)"));
        }
        Ok(())
    }

    /// The client port's connection bounds (`[api]`).
    pub fn client_connections(&self) -> ConnLimits {
        let a = &self.api;
        ConnLimits {
            max_connections: a.max_connections,
            max_connections_per_ip: a.max_connections_per_ip,
            first_byte_timeout: a.connection_first_byte_timeout,
            idle_timeout: Some(a.connection_idle_timeout).filter(|d| !d.is_zero()),
        }
    }

    /// The peer port's connection bounds. No bound per address: peers share one on loopback
    /// and behind NAT, and an unauthenticated address holds only handshakes (bounded per
    /// address in `coalesce_raft::tls`). No idle timeout: a node keeps one channel per peer for
    /// good (closing it would only cost a handshake); a dead peer is found by HTTP/2 keepalive.
    pub fn peer_connections(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.node.peer_max_connections,
            max_connections_per_ip: usize::MAX,
            first_byte_timeout: FIRST_BYTE_TIMEOUT,
            idle_timeout: None,
        }
    }

    /// The HTTP port's connection bounds.
    pub fn http_connections(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.node.http_max_connections,
            max_connections_per_ip: HTTP_MAX_CONNECTIONS_PER_IP,
            first_byte_timeout: FIRST_BYTE_TIMEOUT,
            idle_timeout: Some(HTTP_IDLE_TIMEOUT),
        }
    }

    /// The cluster as the Raft layer sees it.
    pub fn cluster_spec(&self) -> ClusterSpec {
        ClusterSpec {
            cluster: self.cluster.name.clone(),
            shards: self.cluster.shards,
            replication: self.cluster.replication,
            nodes: self
                .cluster
                .nodes
                .iter()
                .map(|n| NodeSpec { name: n.name.clone(), peer_addr: n.peer.clone(), client_addr: n.client.clone() })
                .collect(),
        }
    }

    /// Raft timing in milliseconds.
    pub fn raft_timing(&self) -> RaftTiming {
        RaftTiming {
            heartbeat_ms: self.raft.heartbeat.as_millis() as u64,
            election_min_ms: self.raft.election_timeout_min.as_millis() as u64,
            election_max_ms: self.raft.election_timeout_max.as_millis() as u64,
            quiesce_after_ms: self.raft.quiesce_after.as_millis() as u64,
            checkpoint_ms: self.raft.checkpoint_interval.as_millis() as u64,
            snapshot: SnapshotOptions {
                max_bytes: self.raft.snapshot_max_bytes,
                stall_ms: self.raft.snapshot_stall_timeout.as_millis() as u64,
                concurrent_receives: self.raft.snapshot_concurrent_receives,
                send_bytes_per_second: self.raft.snapshot_send_bytes_per_second,
            },
        }
    }
}
