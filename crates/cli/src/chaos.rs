//! `coalescectl chaos run SCENARIO --report-dir DIR`: a game day on a local cluster of real
//! `coalesced` processes (or, with `--backend compose`, containers of the Coalesce image run by
//! docker compose, [`crate::compose`]). Producers write a sum stream (Zipf keys) and a
//! latest-wins stream (each key owned by one producer, strictly increasing values) at a fixed
//! rate; subscribers on every node record every output; the fault schedule kills (SIGKILL),
//! pauses (SIGSTOP; a container's cgroup freezer) and partitions (cuts its peer links,
//! [`crate::netproxy`]) shard leaders found from their Lease holder, and kills and restarts the
//! whole cluster. Then `coalesce-chaos` checks the invariants and writes the report; the command
//! exits 1 on any violation and prints the seed.
//!
//! Scenario files: `chaos/scenarios/*.toml` (see `chaos/README.md`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use coalesce_chaos::{self as chaos, Event, Fate, Fault, FaultKind, Merge, StreamSpec, Window};
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::EventCode;
use coalesce_proto::v1::admin_client::AdminClient;
use coalesce_proto::v1::coalesce_client::CoalesceClient;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::Deserialize;
use tonic::transport::Channel;

use crate::compose::ComposeOptions;
use crate::local::{LocalCluster, LocalOptions, Runtime, Signal};
use crate::outln;
use crate::outputs::{channel, now_ms};

#[derive(Debug, clap::Subcommand)]
pub enum ChaosCmd {
    /// Run a scenario: load, faults, then the invariant check and the report.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Scenario file (TOML), e.g. chaos/scenarios/ci.toml.
    pub scenario: PathBuf,
    /// Where report.json, report.md, the plots and the raw records go.
    #[arg(long)]
    pub report_dir: PathBuf,
    /// Seed of the load and the fault schedule (default: the scenario's, else random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the cluster's configs, data and logs go (default: REPORT_DIR/cluster).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The `coalesced` binary (default: $COALESCED_BIN, else next to coalescectl).
    #[arg(long)]
    pub coalesced: Option<PathBuf>,
    /// Where the nodes run (default: the scenario's `backend`): `local` processes, or `compose`
    /// containers of `--image` (chaos/README.md).
    #[arg(long, value_parser = BACKENDS)]
    pub backend: Option<String>,
    /// The Coalesce image of the compose backend (deploy/docker/build-local.sh builds it).
    #[arg(long, default_value = "coalesce:local")]
    pub image: String,
    /// TEST ONLY: run the nodes with a deliberate defect (`COALESCE_FAILPOINTS`, see
    /// `coalesce_raft::failpoints`), to prove the checker catches it, e.g. `double_seal`.
    #[arg(long)]
    pub failpoint: Vec<String>,
    /// Also deliver to a fencing PostgreSQL sink and check its rows (as `postgres = true` in
    /// the scenario); needs Debian's postgresql (scripts/setup.sh installs it).
    #[arg(long)]
    pub postgres: bool,
}

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "default_nodes")]
    pub nodes: usize,
    pub shards: u32,
    /// `local` (processes on loopback) or `compose` (containers on the host network); see
    /// chaos/README.md for Kubernetes.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Load before the first fault.
    #[serde(with = "humantime_serde", default = "default_warmup")]
    pub warmup: Duration,
    /// Load after a fault is healed before the next one.
    #[serde(with = "humantime_serde", default = "default_gap")]
    pub gap: Duration,
    /// Load after the last fault.
    #[serde(with = "humantime_serde", default = "default_warmup")]
    pub cooldown: Duration,
    /// Tumbling window of both streams.
    #[serde(with = "humantime_serde", default = "default_window")]
    pub window: Duration,
    /// Makes the sum stream's windows load-adaptive up to this staleness (`window.adaptive`,
    /// stretching once 50 outputs wait for a consumer); the checker then allows windows to
    /// close anywhere up to it.
    #[serde(with = "humantime_serde", default)]
    pub adaptive_max_staleness: Option<Duration>,
    pub load: Load,
    pub faults: Vec<FaultPlan>,
    /// Deliver both streams to a fencing PostgreSQL sink (`append` mode, a throw-away server)
    /// and check the rows it accepted (`stale_epoch_accepted`, `sink_duplicates`).
    #[serde(default)]
    pub postgres: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Events per second, all producers together (open loop: sent on schedule).
    pub rate: u32,
    #[serde(default = "default_producers")]
    pub producers: u32,
    /// Events per request.
    #[serde(default = "default_batch")]
    pub batch: u32,
    /// Keys of the sum stream, chosen with Zipf skew.
    #[serde(default = "default_keys")]
    pub keys: u32,
    #[serde(default = "default_zipf")]
    pub zipf: f64,
    /// Keys of the latest-wins stream per producer.
    #[serde(default = "default_latest_keys")]
    pub latest_keys: u32,
    /// A request not acknowledged within this long is given up: its events are ambiguous.
    #[serde(with = "humantime_serde", default = "default_give_up")]
    pub give_up: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultPlan {
    pub kind: FaultKind,
    pub count: u32,
    /// How long the fault lasts before it is healed (restart, SIGCONT, links restored).
    #[serde(with = "humantime_serde")]
    pub down: Duration,
    /// `slow_disk` only: how much longer every fsync of the leader's node takes.
    #[serde(with = "humantime_serde", default = "default_disk_latency")]
    pub latency: Duration,
}

fn default_disk_latency() -> Duration {
    Duration::from_millis(200)
}

fn default_nodes() -> usize {
    3
}
fn default_backend() -> String {
    "local".into()
}
fn default_warmup() -> Duration {
    Duration::from_secs(3)
}
fn default_gap() -> Duration {
    Duration::from_secs(2)
}
fn default_window() -> Duration {
    Duration::from_millis(500)
}
fn default_producers() -> u32 {
    4
}
fn default_batch() -> u32 {
    20
}
fn default_keys() -> u32 {
    1000
}
fn default_zipf() -> f64 {
    1.1
}
fn default_latest_keys() -> u32 {
    20
}
fn default_give_up() -> Duration {
    Duration::from_secs(30)
}

/// The backends `coalescectl` runs.
const BACKENDS: [&str; 2] = ["local", "compose"];

const SUMS: &str = "sums";
/// `window.adaptive.backlog_high` of an adaptive sum stream: low, so faults make it stretch.
const ADAPTIVE_BACKLOG_HIGH: u64 = 50;
const LATEST: &str = "latest";

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let s: Scenario = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        s.validate().with_context(|| format!("{}", path.display()))?;
        Ok(s)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !BACKENDS.contains(&self.backend.as_str()) {
            bail!("backend {:?}: coalescectl runs {BACKENDS:?} (see chaos/README.md for Kubernetes)", self.backend);
        }
        if self.nodes != 3 {
            bail!("nodes: the {} backend runs 3 nodes (replication 3), got {}", self.backend, self.nodes);
        }
        if self.shards == 0 || self.load.rate == 0 || self.load.producers == 0 || self.load.batch == 0 {
            bail!("shards, load.rate, load.producers and load.batch must be positive");
        }
        if self.window.is_zero() {
            bail!("window must be positive");
        }
        if self.adaptive_max_staleness.is_some_and(|m| m < self.window) {
            bail!("adaptive_max_staleness must be at least the window");
        }
        for f in &self.faults {
            if f.kind == FaultKind::SlowDisk && (f.latency.is_zero() || f.latency > Duration::from_secs(60)) {
                bail!("faults: slow_disk latency must be between 1ms and 60s, got {:?}", f.latency);
            }
        }
        Ok(())
    }

    fn streams(&self) -> Vec<StreamSpec> {
        let ms = self.window.as_millis() as u64;
        let sums = match self.adaptive_max_staleness {
            Some(m) => Window::Adaptive { ms, max_staleness_ms: m.as_millis() as u64 },
            None => Window::Tumbling { ms },
        };
        vec![
            StreamSpec { name: SUMS.into(), merge: Merge::Sum, window: sums },
            StreamSpec { name: LATEST.into(), merge: Merge::Latest, window: Window::Tumbling { ms } },
        ]
    }

    /// The streams file; with `pg_url`, both streams feed the fencing PostgreSQL sink `pg`.
    fn streams_toml(&self, pg_url: Option<&str>) -> String {
        let w = humantime::format_duration(self.window);
        // The subscribers are the durable consumer `chaos` (a grpc sink): the outbox keeps every
        // output for them, whatever another sink has acknowledged.
        let (sink, feeds) = match pg_url {
            Some(url) => (
                format!(
                    "[sinks.chaos]\nkind = \"grpc\"\n\n\
                     [sinks.pg]\nkind = \"postgres\"\nurl = \"{url}\"\ntable = \"{PG_TABLE}\"\nmode = \"append\"\n\
                     retry_max = \"1s\"\n\n"
                ),
                "sinks = [\"chaos\", \"pg\"]\n",
            ),
            None => ("[sinks.chaos]\nkind = \"grpc\"\n\n".to_owned(), "sinks = [\"chaos\"]\n"),
        };
        let adaptive = match self.adaptive_max_staleness {
            Some(m) => format!(
                ", adaptive = {{ max_staleness = \"{}\", backlog_high = {ADAPTIVE_BACKLOG_HIGH} }}",
                humantime::format_duration(m)
            ),
            None => String::new(),
        };
        format!(
            "{sink}[streams.{SUMS}]\nmerge = \"sum_i64\"\nwindow = {{ tumbling = \"{w}\"{adaptive} }}\n{feeds}\n\
             [streams.{LATEST}]\nmerge = \"latest\"\nwindow = {{ tumbling = \"{w}\" }}\n{feeds}"
        )
    }

    /// The faults in the order they run (shuffled by the seed).
    fn schedule(&self, rng: &mut StdRng) -> Vec<FaultPlan> {
        let mut all: Vec<FaultPlan> = self.faults.iter().flat_map(|f| (0..f.count).map(move |_| f.clone())).collect();
        all.shuffle(rng);
        all
    }
}

/// What the run records, shared by its tasks.
#[derive(Default)]
struct Records {
    events: Mutex<Vec<Event>>,
    outputs: Mutex<Vec<chaos::Output>>,
    errors: Mutex<Vec<u64>>,
}

/// One producer: sends on schedule, retries a request with the same seqs until every event has
/// a definite answer or `give_up` passes.
async fn produce(
    p: u32,
    seed: u64,
    scenario: Arc<Scenario>,
    clients: Vec<CoalesceClient<Channel>>,
    records: Arc<Records>,
    stop: Arc<AtomicBool>,
) {
    let load = &scenario.load;
    let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(p) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let producer_id = rng.random::<u64>() | 1;
    let zipf = Zipf::new(f64::from(load.keys.max(1)), load.zipf.max(0.01)).ok();
    let per_request = Duration::from_secs_f64(f64::from(load.batch) * f64::from(load.producers) / f64::from(load.rate));
    let mut next_send = Instant::now();
    let (mut seq, mut latest_value) = (0u64, 0i64);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next_send.into()).await;
        next_send += per_request;
        let sent_ms = now_ms();
        let mut events = Vec::with_capacity(load.batch as usize);
        let mut pending: Vec<Event> = Vec::with_capacity(load.batch as usize);
        for i in 0..load.batch {
            seq += 1;
            let (stream, key, value) = if i % 2 == 0 {
                let k = zipf.as_ref().map_or(0, |z| z.sample(&mut rng) as u64).saturating_sub(1);
                (SUMS, format!("k{k}"), rng.random_range(1..1000i64))
            } else {
                latest_value += 1;
                (LATEST, format!("p{p}-k{}", rng.random_range(0..load.latest_keys.max(1))), latest_value)
            };
            let shard = coalesce_core::hash::shard_for(stream, &key, scenario.shards);
            events.push(pb::Event {
                stream: stream.into(),
                key: key.clone(),
                value: Some(pb::Value { kind: Some(pb::value::Kind::Int(value)) }),
                event_time_ms: None,
                producer_seq: seq,
            });
            pending.push(Event {
                producer: producer_id,
                seq,
                stream: stream.into(),
                key,
                value,
                shard,
                sent_ms,
                fate: Fate::Ambiguous,
                acked_ms: None,
            });
        }
        let req = pb::IngestRequest { producer_id, events };
        let started = Instant::now();
        let mut attempt = rng.random_range(0..clients.len());
        let mut answered = vec![false; pending.len()];
        while started.elapsed() < load.give_up && answered.iter().any(|a| !a) {
            let mut client = clients[attempt % clients.len()].clone();
            attempt += 1;
            match client.ingest(req.clone()).await {
                Ok(resp) => {
                    let at = now_ms();
                    let mut refused = 0;
                    for (i, s) in resp.into_inner().statuses.iter().enumerate() {
                        match EventCode::try_from(s.code) {
                            Ok(EventCode::Ok | EventCode::Duplicate) if !answered[i] => {
                                answered[i] = true;
                                pending[i].fate = Fate::Acked;
                                pending[i].acked_ms = Some(at);
                            }
                            Ok(EventCode::Ok | EventCode::Duplicate) => {}
                            _ => refused += 1,
                        }
                    }
                    if refused > 0 {
                        records.errors.lock().unwrap_or_else(|p| p.into_inner()).extend((0..refused).map(|_| at));
                    }
                }
                // No definite answer: retried with the same seqs (deduplicated if applied).
                Err(_) => records.errors.lock().unwrap_or_else(|p| p.into_inner()).push(now_ms()),
            }
            if answered.iter().any(|a| !a) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        records.events.lock().unwrap_or_else(|p| p.into_inner()).extend(pending);
    }
}

/// Records every output node `addr` delivers to the consumer `chaos`.
async fn subscribe(addr: String, records: Arc<Records>, stop: Arc<AtomicBool>) {
    crate::outputs::follow(addr, "chaos".into(), false, stop, |batch, at| {
        let mut outputs = records.outputs.lock().unwrap_or_else(|p| p.into_inner());
        for o in batch {
            let e = o.epoch.unwrap_or_default();
            outputs.push(chaos::Output {
                shard: o.shard,
                seq: o.seq,
                epoch: (e.term, e.node),
                value: serde_json::from_str(&o.value_json).unwrap_or(serde_json::Value::String(o.value_json)),
                stream: o.stream,
                key: o.key,
                inputs: o.inputs,
                window_start: o.window_start,
                window_end: o.window_end,
                first_input_at: o.first_input_at,
                last_input_at: o.last_input_at,
                reason: o.reason,
                received_ms: at,
            });
        }
    })
    .await;
}

/// The shard's leader as its Lease holder says (asking every running node), and its epoch.
async fn leader_from_lease(cluster: &LocalCluster, name: &str, shard: u32) -> Option<(usize, Option<(u64, u64)>)> {
    let lease = format!("{name}-shard-{shard}");
    for (i, n) in cluster.nodes.iter().enumerate() {
        if !cluster.is_running(i) {
            continue;
        }
        let Ok(ch) = channel(&n.client_addr) else { continue };
        let Ok(r) = AdminClient::new(ch).leases(pb::LeasesRequest {}).await else { continue };
        for l in r.into_inner().leases {
            if l.metadata.as_ref().is_some_and(|m| m.name == lease)
                && let Some(spec) = l.spec
                && let Some(idx) = cluster.nodes.iter().position(|n| n.name == spec.holder_identity)
            {
                let epoch = epoch_of(cluster, idx, shard).await;
                return Some((idx, epoch));
            }
        }
    }
    None
}

async fn epoch_of(cluster: &LocalCluster, i: usize, shard: u32) -> Option<(u64, u64)> {
    let ch = channel(&cluster.nodes[i].client_addr).ok()?;
    let st = CoalesceClient::new(ch).status(pb::StatusRequest {}).await.ok()?.into_inner();
    let e = st.local_shards.iter().find(|s| s.shard == shard)?.epoch?;
    Some((e.term, e.node))
}

/// Waits until every shard has a leader (by its Lease).
async fn wait_leaders(cluster: &LocalCluster, name: &str, shards: u32, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    'outer: loop {
        if Instant::now() > deadline {
            bail!("the cluster has no leader for some shard after {within:?} (logs in {})", cluster.dir.display());
        }
        for shard in 0..shards {
            if leader_from_lease(cluster, name, shard).await.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue 'outer;
            }
        }
        return Ok(());
    }
}

/// Injects one fault and heals it; returns its record.
async fn inject(
    cluster: &mut LocalCluster,
    name: &str,
    shards: u32,
    id: u32,
    plan: &FaultPlan,
    rng: &mut StdRng,
) -> anyhow::Result<Fault> {
    let mut fault =
        Fault { id, kind: plan.kind, shard: None, node: None, old_epoch: None, injected_ms: 0, healed_ms: None };
    if plan.kind == FaultKind::KillAll {
        fault.injected_ms = now_ms();
        for i in 0..cluster.nodes.len() {
            cluster.kill(i);
        }
        tokio::time::sleep(plan.down).await;
        cluster.spawn_all()?;
        fault.healed_ms = Some(now_ms());
        return Ok(fault);
    }
    let shard = rng.random_range(0..shards);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (victim, epoch) = loop {
        if let Some(found) = leader_from_lease(cluster, name, shard).await {
            break found;
        }
        if Instant::now() > deadline {
            bail!("fault {id}: shard {shard} has no Lease holder after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    fault.shard = Some(shard);
    fault.node = Some(cluster.nodes[victim].name.clone());
    fault.old_epoch = epoch;
    fault.injected_ms = now_ms();
    match plan.kind {
        FaultKind::KillLeader => {
            cluster.kill(victim);
            tokio::time::sleep(plan.down).await;
            cluster.spawn(victim)?;
        }
        FaultKind::PauseLeader => {
            cluster.signal(victim, Signal::SIGSTOP)?;
            tokio::time::sleep(plan.down).await;
            cluster.signal(victim, Signal::SIGCONT)?;
        }
        FaultKind::PartitionLeader => {
            cluster.isolate(victim, true)?;
            tokio::time::sleep(plan.down).await;
            cluster.isolate(victim, false)?;
        }
        FaultKind::SlowDisk => {
            let url = format!("http://{}/failpoints/slow_disk", cluster.nodes[victim].http_addr);
            slow_disk(&url, plan.latency).await?;
            tokio::time::sleep(plan.down).await;
            slow_disk(&url, Duration::ZERO).await?;
        }
        FaultKind::KillAll => unreachable!("handled above"),
    }
    fault.healed_ms = Some(now_ms());
    Ok(fault)
}

/// The fencing sink's table.
const PG_TABLE: &str = "chaos_outputs";

/// The rows the PostgreSQL sink accepted, in acceptance order (commit time, then seq), once it
/// holds at least `outputs` rows (every output the subscribers saw) or `within` has passed.
async fn fenced_rows(
    pg: &crate::pg::TempPostgres,
    outputs: usize,
    within: Duration,
) -> anyhow::Result<Vec<chaos::SinkRow>> {
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let deadline = Instant::now() + within;
    loop {
        let rows = client
            .query(&format!("SELECT shard, seq, epoch_term, epoch_node FROM {PG_TABLE} ORDER BY updated_at, seq"), &[])
            .await;
        if let Ok(rows) = &rows
            && rows.len() >= outputs
        {
            return Ok(rows
                .iter()
                .map(|r| {
                    let (shard, seq, term, node): (i32, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
                    (shard as u32, seq as u64, (term as u64, node as u64))
                })
                .collect());
        }
        if Instant::now() > deadline {
            let have = rows.map(|r| r.len().to_string()).unwrap_or_else(|e| e.to_string());
            bail!("the PostgreSQL sink holds {have} rows after {within:?}, the subscribers saw {outputs} outputs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sets a node's extra fsync latency through its test-only failpoint route.
async fn slow_disk(url: &str, latency: Duration) -> anyhow::Result<()> {
    let body = format!("{}ms", latency.as_millis());
    let response = reqwest::Client::new()
        .put(url)
        .body(body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("PUT {url}"))?;
    if !response.status().is_success() {
        bail!("PUT {url}: HTTP {}: {}", response.status(), response.text().await.unwrap_or_default());
    }
    Ok(())
}

/// Waits until every shard's windows are closed and the subscribers saw every output.
async fn drain(cluster: &LocalCluster, shards: u32, records: &Records, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut next: BTreeMap<u32, u64> = BTreeMap::new();
        let mut buffered = 0;
        for n in &cluster.nodes {
            let Ok(ch) = channel(&n.client_addr) else { continue };
            let Ok(st) = CoalesceClient::new(ch).status(pb::StatusRequest {}).await else { continue };
            for s in st.into_inner().local_shards {
                if s.leader == n.name {
                    buffered += s.buffered_keys;
                    next.insert(s.shard, s.next_seq);
                }
            }
        }
        let seen: BTreeMap<u32, u64> = {
            let outputs = records.outputs.lock().unwrap_or_else(|p| p.into_inner());
            let mut m = BTreeMap::new();
            for o in outputs.iter() {
                let e = m.entry(o.shard).or_insert(0);
                *e = (*e).max(o.seq);
            }
            m
        };
        let caught_up =
            next.len() == shards as usize && next.iter().all(|(s, n)| seen.get(s).copied().unwrap_or(0) + 1 >= *n);
        if buffered == 0 && caught_up {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "outputs did not drain within {within:?}: {buffered} keys buffered, leaders' next seqs {next:?}, seen {seen:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(cmd: ChaosCmd) -> anyhow::Result<()> {
    let ChaosCmd::Run(args) = cmd;
    let mut scenario = Scenario::load(&args.scenario)?;
    if let Some(b) = &args.backend {
        scenario.backend = b.clone();
    }
    let scenario = Arc::new(scenario);
    let seed = args.seed.or(scenario.seed).unwrap_or_else(rand::random);
    let backend = scenario.backend.clone();
    let mut command = format!(
        "coalescectl chaos run {} --report-dir {} --seed {seed}",
        args.scenario.display(),
        args.report_dir.display()
    );
    if backend != "local" {
        command += &format!(" --backend {backend} --image {}", args.image);
    }
    eprintln!("chaos: scenario {} seed {seed} (replay: {command})", scenario.name);
    std::fs::create_dir_all(&args.report_dir).with_context(|| format!("creating {}", args.report_dir.display()))?;
    let dir = args.dir.clone().unwrap_or_else(|| args.report_dir.join("cluster"));
    let cluster_name = "chaos";
    let pg = if scenario.postgres || args.postgres {
        Some(crate::pg::TempPostgres::start().context("starting PostgreSQL for the fencing sink")?)
    } else {
        None
    };
    let opts = LocalOptions {
        cluster: cluster_name.into(),
        nodes: scenario.nodes,
        shards: scenario.shards,
        streams: scenario.streams_toml(pg.as_ref().map(|p| p.url()).as_deref()),
        raft: String::new(),
        // `COALESCE_CHAOS_LOG` sets the nodes' `RUST_LOG` (e.g. `info,coalesce_raft=debug` to see
        // elections and forwards around a fault); their logs are in the report's `cluster/`.
        log_filter: std::env::var("COALESCE_CHAOS_LOG").unwrap_or_else(|_| "info,openraft=error".into()),
        extra: String::new(),
        env: {
            // `runtime` lets the slow-disk fault be switched on a node's HTTP port.
            let mut fps = args.failpoint.clone();
            if scenario.faults.iter().any(|f| f.kind == FaultKind::SlowDisk) {
                fps.push("runtime".into());
            }
            if fps.is_empty() { Vec::new() } else { vec![("COALESCE_FAILPOINTS".to_owned(), fps.join(","))] }
        },
        proxied: true,
    };
    crate::local::reset_dir(&dir, "chaos cluster")?;
    let runtime = match backend.as_str() {
        // The fencing sink's URL names its socket directory: the containers must see it.
        "compose" => Runtime::Compose(ComposeOptions {
            image: args.image.clone(),
            mounts: pg.iter().map(|p| p.socket_dir().to_owned()).collect(),
        }),
        _ => Runtime::Processes(match &args.coalesced {
            Some(b) => b.clone(),
            None => crate::local::coalesced_bin()?,
        }),
    };
    let mut cluster = LocalCluster::create_on(&dir, runtime, &opts)?;
    cluster.spawn_all()?;
    let result = run_in(&mut cluster, &scenario, seed, &args, &command, cluster_name, pg.as_ref()).await;
    cluster.stop_all(Duration::from_secs(20));
    let pass = result?;
    if !pass {
        bail!("invariants violated (seed {seed}; replay: {command})");
    }
    Ok(())
}

async fn run_in(
    cluster: &mut LocalCluster,
    scenario: &Arc<Scenario>,
    seed: u64,
    args: &RunArgs,
    command: &str,
    name: &str,
    pg: Option<&crate::pg::TempPostgres>,
) -> anyhow::Result<bool> {
    wait_leaders(cluster, name, scenario.shards, Duration::from_secs(60)).await?;
    let records = Arc::new(Records::default());
    let stop_load = Arc::new(AtomicBool::new(false));
    let stop_subs = Arc::new(AtomicBool::new(false));
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let subs: Vec<_> =
        addrs.iter().map(|a| tokio::spawn(subscribe(a.clone(), records.clone(), stop_subs.clone()))).collect();
    let clients: Vec<CoalesceClient<Channel>> =
        addrs.iter().map(|a| channel(a).map(CoalesceClient::new)).collect::<anyhow::Result<_>>()?;
    let started_ms = now_ms();
    let producers: Vec<_> = (0..scenario.load.producers)
        .map(|p| tokio::spawn(produce(p, seed, scenario.clone(), clients.clone(), records.clone(), stop_load.clone())))
        .collect();

    let mut rng = StdRng::seed_from_u64(seed);
    let schedule = scenario.schedule(&mut rng);
    tokio::time::sleep(scenario.warmup).await;
    let mut faults = Vec::new();
    for (id, plan) in schedule.iter().enumerate() {
        let f = inject(cluster, name, scenario.shards, id as u32, plan, &mut rng).await?;
        eprintln!(
            "chaos: fault {id}/{}: {} shard {:?} node {:?}",
            schedule.len(),
            f.kind.as_str(),
            f.shard,
            f.node.as_deref().unwrap_or("all")
        );
        faults.push(f);
        tokio::time::sleep(scenario.gap).await;
    }
    tokio::time::sleep(scenario.cooldown).await;
    stop_load.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.context("a producer task failed")?;
    }
    let duration_ms = now_ms().saturating_sub(started_ms);
    wait_leaders(cluster, name, scenario.shards, Duration::from_secs(60)).await?;
    let bound = scenario.adaptive_max_staleness.unwrap_or(scenario.window);
    drain(cluster, scenario.shards, &records, Duration::from_secs(60) + bound).await?;
    stop_subs.store(true, Ordering::Relaxed);
    for s in subs {
        let _ = s.await;
    }

    let events = std::mem::take(&mut *records.events.lock().unwrap_or_else(|p| p.into_inner()));
    let outputs = std::mem::take(&mut *records.outputs.lock().unwrap_or_else(|p| p.into_inner()));
    let mut errors = std::mem::take(&mut *records.errors.lock().unwrap_or_else(|p| p.into_inner()));
    errors.sort_unstable();
    chaos::write_jsonl(&args.report_dir.join("events.jsonl"), &events)?;
    chaos::write_jsonl(&args.report_dir.join("outputs.jsonl"), &outputs)?;
    chaos::write_jsonl(&args.report_dir.join("faults.jsonl"), &faults)?;
    let fenced_rows = match pg {
        Some(pg) => {
            let seqs: std::collections::BTreeSet<(u32, u64)> = outputs.iter().map(|o| (o.shard, o.seq)).collect();
            fenced_rows(pg, seqs.len(), Duration::from_secs(60)).await?
        }
        None => Vec::new(),
    };
    let streams = scenario.streams();
    let verdict = chaos::check_run(&chaos::CheckInput {
        streams: &streams,
        events: &events,
        outputs: &outputs,
        faults: &faults,
        ingest_errors: errors.len() as u64,
        fenced_rows: &fenced_rows,
    });
    let samples = chaos::samples_from_events(&events, &errors, 1000);
    let meta = chaos::RunMeta {
        scenario: scenario.name.clone(),
        seed,
        started_ms,
        duration_ms,
        nodes: scenario.nodes as u32,
        shards: scenario.shards,
        backend: scenario.backend.clone(),
        command: command.to_owned(),
    };
    chaos::write_report(&args.report_dir, &meta, &verdict, &samples, &faults)?;
    outln!("{}", chaos::summary_line(&meta, &verdict));
    outln!("report: {}", args.report_dir.join("report.md").display());
    Ok(verdict.pass)
}
