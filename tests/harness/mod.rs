//! A local cluster of real `coalesced` processes for integration tests, built on
//! `coalesce_cli::local` (the same code `coalescectl demo` runs): free loopback ports, configs in
//! a temp dir, readiness polled with a deadline, SIGKILL / SIGSTOP / SIGTERM / restart.

#![allow(dead_code, unreachable_pub, missing_debug_implementations, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use coalesce_cli::local::{LocalCluster, LocalOptions, Signal};
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::EventCode;
use coalesce_proto::v1::coalesce_client::CoalesceClient;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tonic::transport::Channel;

/// The `coalesced` binary built for these tests.
pub const COALESCED: &str = env!("CARGO_BIN_EXE_coalesced");

pub struct Cluster {
    /// Dropped first: its Drop kills the processes before the directory goes.
    pub local: LocalCluster,
    dir: tempfile::TempDir,
    pub shards: u32,
}

impl Cluster {
    /// Writes configs for `n` nodes and `shards` shards with `streams` (TOML) and starts them.
    pub fn start(n: usize, shards: u32, streams: &str) -> Cluster {
        Self::start_with(n, shards, streams, "")
    }

    /// [`Cluster::start`] with more node-config tables (`extra`, e.g. `[tls]` and `[auth]`);
    /// relative paths in them resolve against [`Cluster::path`], which exists from the start.
    pub fn start_with(n: usize, shards: u32, streams: &str, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, n, shards, streams, extra)
    }

    /// [`Cluster::start_with`] in a directory the caller prepared (certificates, token files).
    pub fn start_in(dir: tempfile::TempDir, n: usize, shards: u32, streams: &str, extra: &str) -> Cluster {
        Self::start_env(dir, n, shards, streams, extra, &[])
    }

    /// [`Cluster::start_in`] with environment variables for the nodes.
    pub fn start_env(
        dir: tempfile::TempDir,
        n: usize,
        shards: u32,
        streams: &str,
        extra: &str,
        env: &[(String, String)],
    ) -> Cluster {
        Self::start_opts(dir, n, shards, streams, extra, env, false, "")
    }

    /// [`Cluster::start`] with more `[raft]` settings (`raft`, e.g. `snapshot_max_bytes = 1`).
    pub fn start_raft(n: usize, shards: u32, streams: &str, raft: &str) -> Cluster {
        Self::start_opts(tempfile::tempdir().unwrap(), n, shards, streams, "", &[], false, raft)
    }

    /// [`Cluster::start`] with peer traffic through cuttable links, for [`Cluster::isolate`].
    pub fn start_partitionable(n: usize, shards: u32, streams: &str) -> Cluster {
        Self::start_opts(tempfile::tempdir().unwrap(), n, shards, streams, "", &[], true, "")
    }

    /// Cuts node `i` off from its peers (its clients still reach it), or heals it.
    pub fn isolate(&self, i: usize, cut: bool) {
        self.local.isolate(i, cut).unwrap();
    }

    #[allow(clippy::too_many_arguments)]
    fn start_opts(
        dir: tempfile::TempDir,
        n: usize,
        shards: u32,
        streams: &str,
        extra: &str,
        env: &[(String, String)],
        proxied: bool,
        raft: &str,
    ) -> Cluster {
        let opts = LocalOptions {
            cluster: "test".into(),
            nodes: n,
            shards,
            streams: streams.into(),
            raft: format!(
                "heartbeat = \"50ms\"\nelection_timeout_min = \"300ms\"\nelection_timeout_max = \"600ms\"\n{raft}"
            ),
            log_filter: std::env::var("COALESCE_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            extra: extra.into(),
            env: env.to_vec(),
            proxied,
        };
        let mut local = LocalCluster::create(dir.path(), PathBuf::from(COALESCED), &opts).unwrap();
        local.spawn_all().unwrap();
        Cluster { local, dir, shards }
    }

    /// Starts node `i` again (same data directory and ports).
    pub fn spawn(&mut self, i: usize) {
        self.local.spawn(i).unwrap();
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        self.local.kill(i);
    }

    /// Sends a signal ("STOP", "CONT", "TERM") to node `i`.
    pub fn signal(&self, i: usize, sig: &str) {
        let signal = match sig {
            "STOP" => Signal::SIGSTOP,
            "CONT" => Signal::SIGCONT,
            "TERM" => Signal::SIGTERM,
            other => panic!("unsupported signal {other}"),
        };
        self.local.signal(i, signal).unwrap();
    }

    /// SIGTERMs node `i` and waits for a clean exit; returns how long it took.
    pub fn terminate(&mut self, i: usize, within: Duration) -> Duration {
        match self.local.terminate(i, within) {
            Ok(d) => d,
            Err(e) => {
                self.dump_logs();
                panic!("{e:#}");
            }
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.local.nodes.iter().position(|n| n.name == name)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.local.is_running(i)
    }

    /// A client for node `i` (connects lazily).
    pub fn client(&self, i: usize) -> CoalesceClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.local.nodes[i].client_addr))
            .unwrap()
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        CoalesceClient::new(ch)
    }

    /// An admin client for node `i` (connects lazily).
    pub fn admin(&self, i: usize) -> pb::admin_client::AdminClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.local.nodes[i].client_addr))
            .unwrap()
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        pb::admin_client::AdminClient::new(ch)
    }

    /// Prints every running node's view of its shard replicas (on failure): role, leader,
    /// term, log position and whether the group is quiesced.
    pub async fn dump_shards(&self) {
        for i in 0..self.local.nodes.len() {
            if !self.is_running(i) {
                continue;
            }
            match self.admin(i).shards(pb::ShardsRequest {}).await {
                Ok(r) => {
                    for d in r.into_inner().shards {
                        eprintln!(
                            "{} shard {}: {} leader={} term={} last={} committed={} applied={} quiesced={} lease_valid={} buffered={}",
                            self.local.nodes[i].name,
                            d.shard,
                            d.role,
                            d.leader,
                            d.term,
                            d.last_log_index,
                            d.committed,
                            d.last_applied,
                            d.quiesced,
                            d.lease_valid,
                            d.buffered_keys
                        );
                    }
                }
                Err(e) => eprintln!("{}: Shards failed: {e}", self.local.nodes[i].name),
            }
        }
    }

    /// The status of node `i`, if it answers.
    pub async fn status(&self, i: usize) -> Option<pb::StatusResponse> {
        self.client(i).status(pb::StatusRequest {}).await.ok().map(|r| r.into_inner())
    }

    /// Leader name per shard, as reported by running nodes, counting only running leaders.
    pub async fn leaders(&self) -> BTreeMap<u32, String> {
        let mut out = BTreeMap::new();
        for i in 0..self.local.nodes.len() {
            if !self.is_running(i) {
                continue;
            }
            if let Some(s) = self.status(i).await {
                for sh in s.local_shards {
                    if !sh.leader.is_empty() && self.index_of(&sh.leader).is_some_and(|l| self.is_running(l)) {
                        out.entry(sh.shard).or_insert(sh.leader);
                    }
                }
            }
        }
        out
    }

    /// Waits until every shard has a running leader.
    pub async fn wait_ready(&self, within: Duration) -> BTreeMap<u32, String> {
        let deadline = Instant::now() + within;
        loop {
            let l = self.leaders().await;
            if l.len() == self.shards as usize {
                return l;
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("cluster not ready within {within:?}: leaders {l:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A shard chosen by `rng` and the index of its leader, once every shard has one.
    pub async fn random_leader(&self, rng: &mut StdRng) -> (u32, usize) {
        let leaders = self.wait_ready(Duration::from_secs(30)).await;
        let shard = rng.random_range(0..self.shards);
        (shard, self.index_of(&leaders[&shard]).unwrap())
    }

    /// The value of one metric series (its name and labels exactly as exposed, e.g.
    /// `coalesce_sink_backlog_outputs{sink="hook"}`) on every running node that exposes it.
    pub async fn metric(&self, series: &str) -> Vec<f64> {
        self.local.metric(series).await
    }

    /// Prints errors and the tail of every node's log (on failure).
    pub fn dump_logs(&self) {
        for n in &self.local.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            eprintln!("==== {} ({}) ====", n.name, n.log.display());
            for l in text
                .lines()
                .filter(|l| l.contains("panicked") || l.contains("ERROR") || l.starts_with("Error:"))
                .take(10)
            {
                eprintln!("!! {l}");
            }
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    /// Waits until every shard's windows are closed, then reads each shard's whole outbox from
    /// its leader, checking seqs are gap-free and epochs never decrease. Σ of values per key.
    pub async fn collect_outputs(&self) -> BTreeMap<String, i64> {
        self.collect_outputs_of(0..self.shards).await
    }

    /// [`Cluster::collect_outputs`] of some shards only.
    pub async fn collect_outputs_of(&self, shards: impl IntoIterator<Item = u32>) -> BTreeMap<String, i64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut emitted = BTreeMap::new();
        for shard in shards {
            let (node, next_seq) = loop {
                assert!(Instant::now() < deadline, "shard {shard} did not drain");
                let leaders = self.leaders().await;
                if let Some(i) = leaders.get(&shard).and_then(|l| self.index_of(l))
                    && let Some(st) = self.status(i).await
                    && let Some(s) = st.local_shards.iter().find(|s| s.shard == shard)
                    && s.buffered_keys == 0
                {
                    break (i, s.next_seq);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let mut stream = self
                .client(node)
                .subscribe(pb::SubscribeRequest {
                    consumer: "checker".into(),
                    shards: vec![shard],
                    from_seq: [(shard, 0)].into(),
                })
                .await
                .unwrap()
                .into_inner();
            let mut expect_seq = 1;
            let mut last_epoch = (0, 0);
            while expect_seq < next_seq {
                let batch =
                    tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
                for o in batch.outputs {
                    assert_eq!(o.seq, expect_seq, "shard {shard}: seqs are gap-free");
                    let e = o.epoch.unwrap();
                    assert!((e.term, e.node) >= last_epoch, "shard {shard}: epochs never decrease");
                    last_epoch = (e.term, e.node);
                    expect_seq += 1;
                    let v: i64 = o.value_json.parse().unwrap();
                    *emitted.entry(o.key).or_insert(0) += v;
                }
            }
        }
        emitted
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The stream `produce` writes to (a `sum_i64` stream the test configures).
pub const STREAM: &str = "sums";

/// The seed of a randomized test: `COALESCE_TEST_SEED` or a fresh one, printed for replay.
pub fn seed() -> u64 {
    let seed = std::env::var("COALESCE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed = {seed} (replay with COALESCE_TEST_SEED={seed})");
    seed
}

/// Sends requests of 50 events until `stop`; every request is retried with the same seqs until
/// all its events are acknowledged. Returns the acknowledged sums per key.
pub async fn produce(
    clients: Vec<pb::coalesce_client::CoalesceClient<tonic::transport::Channel>>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (BTreeMap<String, i64>, u64, u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let producer_id = rng.random::<u64>() | 1;
    let (mut seq, mut acked, mut requests, mut retries) = (0u64, BTreeMap::<String, i64>::new(), 0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let events: Vec<pb::Event> = (0..50)
            .map(|_| {
                seq += 1;
                sum_event(STREAM, &format!("key-{}", rng.random_range(0..1000)), rng.random_range(1..100), seq)
            })
            .collect();
        let req = pb::IngestRequest { producer_id, events: events.clone() };
        let started = Instant::now();
        let mut attempt = rng.random_range(0..clients.len());
        loop {
            assert!(started.elapsed() < Duration::from_secs(60), "request {requests} not acknowledged within 60s");
            let mut client = clients[attempt % clients.len()].clone();
            attempt += 1;
            // A transport error means the node is down: the next attempt tries another.
            if let Ok(resp) = client.ingest(req.clone()).await {
                let statuses = resp.into_inner().statuses;
                for s in &statuses {
                    let code = EventCode::try_from(s.code).unwrap();
                    assert!(
                        matches!(
                            code,
                            EventCode::Ok
                                | EventCode::Duplicate
                                | EventCode::Unavailable
                                | EventCode::Unknown
                                | EventCode::ResourceExhausted
                        ),
                        "unexpected status {s:?}"
                    );
                }
                if statuses.iter().all(|s| s.code == EventCode::Ok as i32 || s.code == EventCode::Duplicate as i32) {
                    break;
                }
            }
            retries += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for e in events {
            let Some(pb::value::Kind::Int(v)) = e.value.and_then(|v| v.kind) else { unreachable!() };
            *acked.entry(e.key).or_insert(0) += v;
        }
        requests += 1;
    }
    (acked, requests, retries)
}

/// An event of a sum stream.
pub fn sum_event(stream: &str, key: &str, v: i64, seq: u64) -> pb::Event {
    pb::Event {
        stream: stream.into(),
        key: key.into(),
        value: Some(pb::Value { kind: Some(pb::value::Kind::Int(v)) }),
        event_time_ms: None,
        producer_seq: seq,
    }
}

/// One Lease holder of one shard, as the nodes published it (`Admin.Leases`).
#[derive(Debug, Clone, Copy)]
pub struct LeaseSeen {
    /// The earliest `acquireTime` seen.
    pub acquired: std::time::SystemTime,
    /// The latest `renewTime + leaseDurationSeconds` seen: when Kubernetes rules call it expired.
    pub expires: std::time::SystemTime,
}

/// Polls every running node's `Admin.Leases` every 20 ms until [`LeaseWatch::finish`], keeping
/// per (shard, term, holder) the earliest acquisition and the latest expiry published.
pub struct LeaseWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<BTreeMap<(u32, i32, String), LeaseSeen>>,
}

impl LeaseWatch {
    pub fn start(cluster: Arc<Cluster>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen: BTreeMap<(u32, i32, String), LeaseSeen> = BTreeMap::new();
            let parse = |t: &str| humantime::parse_rfc3339(t).unwrap();
            while !flag.load(Ordering::Relaxed) {
                // A paused node answers nothing: ask all at once, each with a short deadline.
                let asks = (0..cluster.local.nodes.len()).map(|i| {
                    let ch = Channel::from_shared(format!("http://{}", cluster.local.nodes[i].client_addr))
                        .unwrap()
                        .connect_timeout(Duration::from_millis(200))
                        .timeout(Duration::from_millis(300))
                        .connect_lazy();
                    async move { pb::admin_client::AdminClient::new(ch).leases(pb::LeasesRequest {}).await.ok() }
                });
                for r in futures::future::join_all(asks).await.into_iter().flatten() {
                    for l in r.into_inner().leases {
                        let (Some(meta), Some(spec)) = (l.metadata, l.spec) else { continue };
                        let shard: u32 = meta.labels["coalesce.io/shard"].parse().unwrap();
                        let acquired = parse(&spec.acquire_time);
                        let expires = parse(&spec.renew_time) + Duration::from_secs(spec.lease_duration_seconds as u64);
                        let e = seen
                            .entry((shard, spec.lease_transitions, spec.holder_identity))
                            .or_insert(LeaseSeen { acquired, expires });
                        e.acquired = e.acquired.min(acquired);
                        e.expires = e.expires.max(expires);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        });
        Self { stop, task }
    }

    /// Stops polling; returns every pair of Leases of one shard that were valid at the same
    /// instant by Kubernetes rules (an older holder's expiry after a newer one's acquisition),
    /// described, and how many holders were seen.
    pub async fn finish(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.task.await.unwrap();
        let mut overlaps = Vec::new();
        for ((shard, term, holder), a) in &seen {
            for ((shard2, term2, holder2), b) in &seen {
                if shard == shard2
                    && (term, holder) != (term2, holder2)
                    && a.acquired <= b.acquired
                    && a.expires > b.acquired
                {
                    overlaps.push(format!(
                        "shard {shard}: {holder} (term {term}) valid until {} after {holder2} (term {term2}) acquired at {}",
                        humantime::format_rfc3339_micros(a.expires),
                        humantime::format_rfc3339_micros(b.acquired)
                    ));
                }
            }
        }
        (overlaps, seen.len())
    }
}
