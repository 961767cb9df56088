//! What a chaos run records, as the runner fills it in: every event a producer sent that may
//! have been applied ([`Event`]), every output the subscriber received ([`Output`]), every fault
//! injected ([`Fault`]), per-second load aggregates ([`Sample`]) and the streams the scenario
//! configured ([`StreamSpec`]).
//!
//! Every type is plain serde, one JSON object per record, so a run can be kept as JSON lines
//! (`events.jsonl`, `outputs.jsonl`, …: [`write_jsonl`], [`read_jsonl`]) and checked again
//! later. All times are milliseconds since the UNIX epoch, read from the same machine's clock by
//! the runner, the subscriber and the cluster's leaders.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A shard leader's epoch as (Raft term, node id), compared as a tuple: a later leader of a
/// shard always has a greater epoch. Serialized as the JSON array `[term, node]`.
pub type Epoch = (u64, u64);

/// What a producer learned about an event it sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// The cluster acknowledged it: it must be reflected in exactly one output.
    Acked,
    /// The producer gave up without a definite answer (timeout, connection lost mid-request):
    /// it may have been applied, but at most once.
    Ambiguous,
}

/// One event a producer sent and that may have been applied. Events the cluster definitely
/// refused (not applied) are not recorded here, only counted as errors in [`Sample`]s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The producer's id (its idempotence session).
    pub producer: u64,
    /// The producer's sequence number of this event; `(producer, seq)` identifies the event.
    pub seq: u64,
    pub stream: String,
    pub key: String,
    pub value: i64,
    /// The shard of `(stream, key)`, as the cluster's hash computes it.
    pub shard: u32,
    /// When the producer first sent it.
    pub sent_ms: u64,
    pub fate: Fate,
    /// When the acknowledgement arrived (`None` unless [`Fate::Acked`]).
    #[serde(default)]
    pub acked_ms: Option<u64>,
}

/// One output as the subscriber received it (redeliveries included: the checker dedupes on
/// `(shard, seq)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub shard: u32,
    pub seq: u64,
    /// The epoch of the leader that sealed it (not of the one that delivered it).
    pub epoch: Epoch,
    pub stream: String,
    pub key: String,
    /// The merged value as JSON (a number for the sum and latest streams a scenario uses).
    pub value: serde_json::Value,
    /// Number of events merged into it.
    pub inputs: u64,
    pub window_start: u64,
    /// When the window closed: its time deadline, or the leader stamp of the input that
    /// closed it early.
    pub window_end: u64,
    /// Leader stamps of the first and last input merged into it.
    pub first_input_at: u64,
    pub last_input_at: u64,
    /// Why the window closed: `time`, `max_count`, `max_bytes`, `overflow`, `flush_early`, …
    pub reason: String,
    /// When the subscriber received it.
    pub received_ms: u64,
}

/// The kinds of fault a scenario injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL the shard's leader.
    KillLeader,
    /// SIGSTOP the shard's leader (SIGCONT when healed).
    PauseLeader,
    /// Cut the shard's leader off from its peers (and clients).
    PartitionLeader,
    /// SIGKILL every node, then restart them.
    KillAll,
    /// Slow down the disk of a node.
    SlowDisk,
}

impl FaultKind {
    /// Every kind, in declaration order.
    pub const ALL: [FaultKind; 5] = [
        FaultKind::KillLeader,
        FaultKind::PauseLeader,
        FaultKind::PartitionLeader,
        FaultKind::KillAll,
        FaultKind::SlowDisk,
    ];

    /// Whether the fault takes the leader away, so recovering from it is a failover. A slow
    /// disk does not: its recovery times are reported per fault, not in the failover numbers.
    pub fn loses_leader(&self) -> bool {
        !matches!(self, FaultKind::SlowDisk)
    }

    /// The snake_case name, as serialized.
    pub fn as_str(&self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill_leader",
            FaultKind::PauseLeader => "pause_leader",
            FaultKind::PartitionLeader => "partition_leader",
            FaultKind::KillAll => "kill_all",
            FaultKind::SlowDisk => "slow_disk",
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub id: u32,
    pub kind: FaultKind,
    /// The shard whose leader was targeted (`None` for whole-cluster faults, or a fault on a
    /// node rather than a shard: timings then look at every shard).
    #[serde(default)]
    pub shard: Option<u32>,
    /// The node the fault hit (its name), when one node.
    #[serde(default)]
    pub node: Option<String>,
    /// The epoch of the shard's leader when the fault was injected, when known.
    #[serde(default)]
    pub old_epoch: Option<Epoch>,
    pub injected_ms: u64,
    /// When the fault was undone (node restarted, resumed, partition healed), if it was.
    #[serde(default)]
    pub healed_ms: Option<u64>,
}

/// Load aggregates over one time bucket (one second unless said otherwise).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Start of the bucket.
    pub t_ms: u64,
    /// Events acknowledged in the bucket.
    pub acked: u64,
    /// Events definitely refused in the bucket.
    pub errors: u64,
    /// Events given up on without an answer in the bucket.
    pub ambiguous: u64,
    /// Ack latency (ack time − send time) of the events acknowledged in the bucket; 0 when
    /// none was.
    pub ack_latency_p50_ms: f64,
    pub ack_latency_p99_ms: f64,
}

/// The merge operator of a scenario stream, as far as the checker cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Merge {
    /// Integer sum (`sum_i64`): every value counts once.
    Sum,
    /// Latest wins. The runner writes each key from exactly one producer with strictly
    /// increasing values, so "latest" is also "largest".
    Latest,
}

/// The window policy of a scenario stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// Aligned windows `[k·ms, (k+1)·ms)` of the leader clock.
    Tumbling { ms: u64 },
    /// Tumbling windows of `ms` that the leader may stretch under downstream pressure
    /// (`window.adaptive`): a window starting at an aligned `k·ms` closes no earlier than
    /// `(k+1)·ms` and no later than `k·ms + max_staleness_ms`.
    Adaptive { ms: u64, max_staleness_ms: u64 },
}

impl Window {
    /// The window length in milliseconds (at least 1).
    pub fn length_ms(&self) -> u64 {
        match self {
            Window::Tumbling { ms } | Window::Adaptive { ms, .. } => (*ms).max(1),
        }
    }

    /// The latest a window may close after its start.
    pub fn max_staleness_ms(&self) -> u64 {
        match self {
            Window::Tumbling { .. } => self.length_ms(),
            Window::Adaptive { max_staleness_ms, .. } => (*max_staleness_ms).max(self.length_ms()),
        }
    }
}

/// A stream the scenario configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSpec {
    pub name: String,
    pub merge: Merge,
    pub window: Window,
}

/// Builds per-bucket [`Sample`]s from the recorded events and the times of refused events.
///
/// Acknowledged events count in the bucket of their `acked_ms` (ack latency = `acked_ms −
/// sent_ms`, in an HdrHistogram with 3 significant digits), ambiguous ones in the bucket of
/// their `sent_ms`, errors at their time. Buckets are aligned to multiples of `bucket_ms`
/// (at least 1) and cover the whole run without holes, so a stall shows as zeros.
pub fn samples_from_events(events: &[Event], error_times_ms: &[u64], bucket_ms: u64) -> Vec<Sample> {
    let bucket_ms = bucket_ms.max(1);
    let event_times = events.iter().map(|e| match (e.fate, e.acked_ms) {
        (Fate::Acked, Some(a)) => a,
        _ => e.sent_ms,
    });
    let times: Vec<u64> = event_times.chain(error_times_ms.iter().copied()).collect();
    let (Some(&first), Some(&last)) = (times.iter().min(), times.iter().max()) else {
        return Vec::new();
    };
    let first = first - first % bucket_ms;
    let mut buckets: BTreeMap<u64, (u64, u64, u64, Vec<u64>)> = BTreeMap::new();
    for t in (first..=last).step_by(usize::try_from(bucket_ms).unwrap_or(usize::MAX)) {
        buckets.insert(t, (0, 0, 0, Vec::new()));
    }
    let slot = |t: u64| t - t % bucket_ms;
    for e in events {
        match (e.fate, e.acked_ms) {
            (Fate::Acked, Some(acked)) => {
                let b = buckets.entry(slot(acked)).or_default();
                b.0 += 1;
                b.3.push(acked.saturating_sub(e.sent_ms));
            }
            (Fate::Acked, None) => buckets.entry(slot(e.sent_ms)).or_default().0 += 1,
            (Fate::Ambiguous, _) => buckets.entry(slot(e.sent_ms)).or_default().2 += 1,
        }
    }
    for &t in error_times_ms {
        buckets.entry(slot(t)).or_default().1 += 1;
    }
    buckets
        .into_iter()
        .map(|(t_ms, (acked, errors, ambiguous, latencies))| {
            let (p50, p99) = latency_quantiles(&latencies);
            Sample { t_ms, acked, errors, ambiguous, ack_latency_p50_ms: p50, ack_latency_p99_ms: p99 }
        })
        .collect()
}

/// p50 and p99 of latencies in ms (0 when there are none).
fn latency_quantiles(latencies: &[u64]) -> (f64, f64) {
    if latencies.is_empty() {
        return (0.0, 0.0);
    }
    // 1 ms .. 1 h at 3 significant digits; larger values saturate at the top.
    let mut h = match Histogram::<u64>::new_with_bounds(1, 3_600_000, 3) {
        Ok(h) => h,
        Err(_) => return (0.0, 0.0),
    };
    for &l in latencies {
        h.saturating_record(l.max(1));
    }
    (h.value_at_quantile(0.5) as f64, h.value_at_quantile(0.99) as f64)
}

/// Writes records as JSON lines (one object per line), replacing the file.
pub fn write_jsonl<T: Serialize>(path: &Path, records: &[T]) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(file);
    for r in records {
        serde_json::to_writer(&mut w, r).with_context(|| format!("writing {}", path.display()))?;
        w.write_all(b"\n").with_context(|| format!("writing {}", path.display()))?;
    }
    w.flush().with_context(|| format!("writing {}", path.display()))
}

/// Reads records from JSON lines; blank lines are skipped, errors name the line.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Vec<T>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record =
            serde_json::from_str(&line).with_context(|| format!("{} line {}: not a record", path.display(), i + 1))?;
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(seq: u64, sent: u64, acked: u64) -> Event {
        Event {
            producer: 1,
            seq,
            stream: "s".into(),
            key: "k".into(),
            value: 1,
            shard: 0,
            sent_ms: sent,
            fate: Fate::Acked,
            acked_ms: Some(acked),
        }
    }

    #[test]
    fn records_round_trip_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut amb = acked(2, 10, 0);
        amb.fate = Fate::Ambiguous;
        amb.acked_ms = None;
        let events = vec![acked(1, 5, 9), amb];
        write_jsonl(&path, &events).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("\"fate\":\"ambiguous\""), "{text}");
        assert_eq!(read_jsonl::<Event>(&path).unwrap(), events);

        let fault = Fault {
            id: 1,
            kind: FaultKind::PartitionLeader,
            shard: Some(2),
            node: Some("coalesce-1".into()),
            old_epoch: Some((3, 1)),
            injected_ms: 100,
            healed_ms: None,
        };
        let json = serde_json::to_string(&fault).unwrap();
        assert!(json.contains("\"kind\":\"partition_leader\"") && json.contains("\"old_epoch\":[3,1]"), "{json}");
        assert_eq!(serde_json::from_str::<Fault>(&json).unwrap(), fault);

        let spec = StreamSpec { name: "s".into(), merge: Merge::Sum, window: Window::Tumbling { ms: 1000 } };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(json, r#"{"name":"s","merge":"sum","window":{"tumbling":{"ms":1000}}}"#);
    }

    #[test]
    fn read_jsonl_names_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "{\"t_ms\":1,\"acked\":1,\"errors\":0,\"ambiguous\":0,\"ack_latency_p50_ms\":1.0,\"ack_latency_p99_ms\":1.0}\n\nnope\n").unwrap();
        let err = read_jsonl::<Sample>(&path).unwrap_err();
        assert!(format!("{err:#}").contains("line 3"), "{err:#}");
    }

    #[test]
    fn samples_cover_every_bucket_and_measure_latency() {
        let mut events: Vec<Event> = (0..100).map(|i| acked(i, 1_000 + i, 1_000 + i + 10)).collect();
        // A stall: nothing acknowledged in [2000, 4000), then one slow ack.
        events.push(acked(100, 1_500, 4_500));
        let mut amb = acked(101, 2_100, 0);
        amb.fate = Fate::Ambiguous;
        amb.acked_ms = None;
        events.push(amb);
        let samples = samples_from_events(&events, &[2_500, 2_600, 3_999], 1_000);
        let ts: Vec<u64> = samples.iter().map(|s| s.t_ms).collect();
        assert_eq!(ts, vec![1_000, 2_000, 3_000, 4_000]);
        assert_eq!(samples[0].acked, 100);
        assert_eq!(samples[0].ack_latency_p50_ms, 10.0);
        assert_eq!((samples[1].acked, samples[1].errors, samples[1].ambiguous), (0, 2, 1));
        assert_eq!(samples[1].ack_latency_p99_ms, 0.0);
        assert_eq!((samples[2].acked, samples[2].errors), (0, 1));
        assert_eq!(samples[3].acked, 1);
        let p99 = samples[3].ack_latency_p99_ms;
        assert!((2_995.0..=3_005.0).contains(&p99), "{p99}");
        assert!(samples_from_events(&[], &[], 1_000).is_empty());
    }
}
