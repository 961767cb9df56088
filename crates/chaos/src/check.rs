//! The invariant checker: turns what a run recorded into a [`Verdict`].
//!
//! [`check`] (or [`check_run`], which also takes the ingest error count and a fencing sink's
//! rows) is pure: the same records always give the same verdict, details in the same order.
//!
//! # Definitions
//!
//! **Events.** Events are identified by `(producer, seq)`; a pair recorded twice counts once,
//! as acknowledged if any record says so (two records of one pair that disagree on stream,
//! key, value or shard are a `conflicting_events` violation: a runner bug). Per `(stream, key)`
//! let *A* be the number of acknowledged events and *B* the number of ambiguous ones.
//!
//! **Outputs.** Outputs are deduplicated on `(shard, seq)`, keeping the copy received first;
//! every other copy must be identical to it in stream, key, value, epoch, inputs, window
//! bounds, input stamps and reason (`received_ms` may differ) — a copy that differs is a
//! `conflicting_duplicates` violation (one per differing copy); one that does not is a
//! harmless redelivery (`redelivered_outputs`). Everything below looks at deduplicated outputs.
//!
//! **Sequence numbers** (`seq_gaps`, `epoch_regressions`, `invalid_seq`). Per shard the seqs
//! must be exactly `1..=max`: `seq_gaps` counts the missing ones (a missing tail beyond the
//! highest seq received cannot be seen here; it shows as lost events). Seq 0 is never assigned
//! (`invalid_seq`). Walking a shard's outputs in seq order, an output whose epoch is lower than
//! the highest epoch of a lower seq counts as one `epoch_regressions`.
//!
//! **Counting** (`lost_events`, `double_counted_events`). Per `(stream, key)` let *N* be the
//! sum of `inputs` over its outputs. Then `lost = max(0, A − N)` (acknowledged events not
//! reflected in any output) and `doubled = max(0, N − (A + B))` (more inputs than could ever
//! have been applied: an acknowledged event counted twice, or an ambiguous one counted more
//! than once). An ambiguous event counted once is fine; `ambiguous_applied` reports
//! `min(B, max(0, N − A))` summed over keys. Counts of different keys never cancel.
//! The runner must let the last windows close and be delivered before it stops the subscriber,
//! or their events count as lost.
//!
//! **Sum streams** (`value_mismatch`). When a key's counts are consistent (nothing lost or
//! doubled), `k = N − A` of its ambiguous events were applied, so the sum *V* of its output
//! values must lie in `[ΣA + (sum of the k smallest ambiguous values), ΣA + (sum of the k
//! largest)]` — for the positive values the load uses, within `[Σ acked, Σ acked + Σ
//! ambiguous]`. One violation per key outside that range. With distinct values per event this
//! also catches a lost event masked by an applied ambiguous one.
//!
//! **Latest streams** (`invented_values`, `latest_mismatch`). The runner writes each key from
//! one producer with strictly increasing values. Every output value must be a value sent for
//! that key (else one `invented_values` per output). The final output (highest seq) must carry
//! the last acknowledged value, or an ambiguous value sent after it (a larger one); with no
//! acknowledged event, any ambiguous value (else one `latest_mismatch` per key). Counting
//! applies as for sums.
//!
//! **Windows** (`early_emissions`, `duplicate_windows`). For a tumbling window of `w` ms, an
//! output closed by time (`reason == "time"`) must have `window_start` a multiple of `w`,
//! `window_end == window_start + w`, `window_start <= first_input_at <= last_input_at <
//! window_start + w`, and `received_ms + 50 >= window_start + w` ([`EARLY_TOLERANCE_MS`]:
//! leaders stamp and the subscriber reads the same machine's clock, but the leader's window
//! timer and the stamps are not read at the same instant, so a few ms either way are clock
//! granularity, not an early emission). An output closed early by a data trigger (`max_count`,
//! `max_bytes`, `overflow`, `flush_early`, …) must have an aligned `window_start`,
//! `window_start <= first_input_at <= last_input_at <= window_end <= window_start + w`, and
//! must not be received before its last input was stamped (`received_ms + 50 >=
//! last_input_at`). Each output breaking any rule counts once. Two time-closed outputs of the
//! same `(stream, key, window_start)` are a `duplicate_windows` violation (one output per key
//! per window). A stream with adaptive windows (`Window::Adaptive`) is held to the same rules
//! except that a time-closed window may end anywhere in `window_start + w ..= window_start +
//! max_staleness` (the stretch), and its inputs anywhere before that end.
//!
//! **Routing** (`wrong_shard`, `unknown_stream`, `unparseable_value`). An output of a key on
//! another shard than its events; an event or output of a stream the scenario did not declare;
//! a sum or latest output whose value is not an integer JSON number.
//!
//! **Fencing** (`stale_epoch_accepted`, `sink_duplicates`): see [`check_fencing`].
//!
//! **Fault timings** (never violations; reported): see [`FaultTiming`].
//!
//! **Overall**: `throughput_eps` = acknowledged events / load duration, the load lasting from
//! the first event sent to the last event acknowledged (or sent); `ingest_error_rate` =
//! errors / (acked + errors + ambiguous).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::record::{Epoch, Event, Fate, Fault, FaultKind, Merge, Output, StreamSpec, Window};

/// How early (ms) a time-closed output may be received relative to its window's end, for clock
/// granularity.
pub const EARLY_TOLERANCE_MS: u64 = 50;

/// At most this many details are kept per violation kind (the count is always exact).
pub const MAX_DETAILS_PER_KIND: usize = 20;

/// A row a fencing sink accepted: `(shard, seq, epoch)`.
pub type SinkRow = (u32, u64, Epoch);

/// What can be wrong with a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    LostEvents,
    DoubleCountedEvents,
    ValueMismatch,
    InventedValues,
    LatestMismatch,
    SeqGaps,
    InvalidSeq,
    EpochRegressions,
    ConflictingDuplicates,
    EarlyEmissions,
    DuplicateWindows,
    StaleEpochAccepted,
    SinkDuplicates,
    WrongShard,
    UnknownStream,
    UnparseableValue,
    ConflictingEvents,
}

impl ViolationKind {
    /// The snake_case name, as serialized.
    pub fn as_str(&self) -> &'static str {
        match self {
            ViolationKind::LostEvents => "lost_events",
            ViolationKind::DoubleCountedEvents => "double_counted_events",
            ViolationKind::ValueMismatch => "value_mismatch",
            ViolationKind::InventedValues => "invented_values",
            ViolationKind::LatestMismatch => "latest_mismatch",
            ViolationKind::SeqGaps => "seq_gaps",
            ViolationKind::InvalidSeq => "invalid_seq",
            ViolationKind::EpochRegressions => "epoch_regressions",
            ViolationKind::ConflictingDuplicates => "conflicting_duplicates",
            ViolationKind::EarlyEmissions => "early_emissions",
            ViolationKind::DuplicateWindows => "duplicate_windows",
            ViolationKind::StaleEpochAccepted => "stale_epoch_accepted",
            ViolationKind::SinkDuplicates => "sink_duplicates",
            ViolationKind::WrongShard => "wrong_shard",
            ViolationKind::UnknownStream => "unknown_stream",
            ViolationKind::UnparseableValue => "unparseable_value",
            ViolationKind::ConflictingEvents => "conflicting_events",
        }
    }

    /// What the count counts, for the human report.
    pub fn meaning(&self) -> &'static str {
        match self {
            ViolationKind::LostEvents => "acknowledged events reflected in no output",
            ViolationKind::DoubleCountedEvents => "inputs beyond acknowledged + ambiguous events",
            ViolationKind::ValueMismatch => "sum keys whose emitted total is impossible",
            ViolationKind::InventedValues => "latest outputs with a value never sent",
            ViolationKind::LatestMismatch => "latest keys whose final value is not the last written",
            ViolationKind::SeqGaps => "missing seqs",
            ViolationKind::InvalidSeq => "outputs with seq 0",
            ViolationKind::EpochRegressions => "outputs with a lower epoch than a lower seq",
            ViolationKind::ConflictingDuplicates => "copies of a (shard, seq) that differ",
            ViolationKind::EarlyEmissions => {
                "outputs emitted before their window allowed (or breaking its bounds: misaligned, past max_staleness)"
            }
            ViolationKind::DuplicateWindows => "second time-closed output of one key and window",
            ViolationKind::StaleEpochAccepted => "fencing-sink rows accepted from a stale epoch",
            ViolationKind::SinkDuplicates => "fencing-sink rows accepted twice",
            ViolationKind::WrongShard => "outputs on another shard than their key's events",
            ViolationKind::UnknownStream => "events or outputs of an undeclared stream",
            ViolationKind::UnparseableValue => "outputs whose value is not an integer",
            ViolationKind::ConflictingEvents => "event records that disagree on one (producer, seq)",
        }
    }
}

impl std::fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One violation, described for a human.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: ViolationKind,
    pub detail: String,
}

/// Nearest-rank quantiles of a small set of millisecond values; `None` when it is empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quantiles {
    pub count: u64,
    pub p50: Option<u64>,
    pub p99: Option<u64>,
    pub max: Option<u64>,
}

impl Quantiles {
    pub fn of(values: &[u64]) -> Self {
        let mut v = values.to_vec();
        v.sort_unstable();
        let rank = |q: f64| -> Option<u64> {
            if v.is_empty() {
                return None;
            }
            let r = (q * v.len() as f64).ceil() as usize;
            v.get(r.clamp(1, v.len()) - 1).copied()
        };
        Quantiles { count: v.len() as u64, p50: rank(0.5), p99: rank(0.99), max: v.last().copied() }
    }
}

/// How the cluster recovered from one fault.
///
/// * `failover_ms`: from `injected_ms` to the first acknowledgement of an event **sent at or
///   after** `injected_ms` on the fault's shard (any shard for [`FaultKind::KillAll`] or a
///   fault without a shard). Events sent before the fault are ignored because their acks can
///   still arrive from the old leader in the first milliseconds after a kill or pause, which
///   would report a failover that did not happen; the cost is that a closed-loop producer
///   stuck on a retry is seen one ack latency late.
/// * `first_emission_ms`: from `injected_ms` to the first output received on that shard (any
///   shard, as above) whose epoch is greater than the epoch of the leader at fault time. That
///   epoch is `old_epoch` for the fault's shard when known; otherwise (whole-cluster faults,
///   other shards, unknown epoch) the highest epoch among that shard's outputs received at or
///   before `injected_ms`, and a shard with no such output is not looked at. The fallback can
///   only be later than the truth, never earlier, unless the old leader had not emitted yet.
///
/// Either is `None` when not observed during the run; that is reported, not a violation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultTiming {
    pub id: u32,
    pub kind: FaultKind,
    pub shard: Option<u32>,
    pub node: Option<String>,
    pub injected_ms: u64,
    pub healed_ms: Option<u64>,
    pub failover_ms: Option<u64>,
    pub first_emission_ms: Option<u64>,
}

/// The numbers of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Distinct acknowledged events.
    pub acked_events: u64,
    /// Distinct ambiguous events (never acknowledged).
    pub ambiguous_events: u64,
    /// Ambiguous events that were applied, as far as counts tell.
    pub ambiguous_applied: u64,
    /// Events definitely refused (from the runner).
    pub ingest_errors: u64,
    pub lost_events: u64,
    pub double_counted_events: u64,
    pub value_mismatch: u64,
    pub invented_values: u64,
    pub latest_mismatch: u64,
    pub seq_gaps: u64,
    pub epoch_regressions: u64,
    pub conflicting_duplicates: u64,
    pub early_emissions: u64,
    pub duplicate_windows: u64,
    pub stale_epoch_accepted: u64,
    /// Outputs received, redeliveries included.
    pub outputs_received: u64,
    /// Distinct `(shard, seq)`.
    pub outputs_unique: u64,
    /// Identical copies of an output received again.
    pub redelivered_outputs: u64,
    /// Σ inputs over distinct outputs.
    pub inputs_emitted: u64,
    /// inputs_emitted / outputs_unique.
    pub coalesce_ratio: Option<f64>,
    /// Rows a fencing sink accepted (0 when none was checked).
    pub fenced_rows: u64,
    pub load_duration_ms: u64,
    pub throughput_eps: f64,
    pub ingest_error_rate: f64,
    /// Over the faults where it was observed.
    pub failover_ms: Quantiles,
    pub first_emission_ms: Quantiles,
}

/// The checker's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// No violation of any kind.
    pub pass: bool,
    /// Exact count per violated kind (kinds with no violation are absent).
    pub violation_counts: BTreeMap<ViolationKind, u64>,
    /// Up to [`MAX_DETAILS_PER_KIND`] details per kind.
    pub violations: Vec<Violation>,
    pub metrics: Metrics,
    /// One per fault, in the order given.
    pub faults: Vec<FaultTiming>,
}

impl Verdict {
    /// The count of one kind of violation (0 if none).
    pub fn count(&self, kind: ViolationKind) -> u64 {
        self.violation_counts.get(&kind).copied().unwrap_or(0)
    }
}

/// Everything the checker looks at.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckInput<'a> {
    pub streams: &'a [StreamSpec],
    pub events: &'a [Event],
    pub outputs: &'a [Output],
    pub faults: &'a [Fault],
    /// Events definitely refused, e.g. `samples.iter().map(|s| s.errors).sum()`.
    pub ingest_errors: u64,
    /// Rows a fencing sink accepted, in acceptance order (see [`check_fencing`]); empty when
    /// the scenario ran no fencing sink.
    pub fenced_rows: &'a [SinkRow],
}

/// Checks a run without ingest errors or fencing-sink rows; see the module docs.
pub fn check(streams: &[StreamSpec], events: &[Event], outputs: &[Output], faults: &[Fault]) -> Verdict {
    check_run(&CheckInput { streams, events, outputs, faults, ingest_errors: 0, fenced_rows: &[] })
}

/// The result of [`check_fencing`]: indices into the rows given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencingCheck {
    /// Rows accepted from a stale epoch.
    pub stale: Vec<usize>,
    /// Rows whose `(shard, seq)` had already been accepted (all but the first accepted copy).
    pub duplicates: Vec<usize>,
}

/// Checks the rows a fencing sink accepted, given **in acceptance order** (the sink's insertion
/// order, e.g. `ORDER BY` a serial id or commit time; for a table that keeps one row per
/// `(shard, seq)`, such as the PostgreSQL sink's `append` mode, seq order is acceptance order
/// because a fencing sink skips seqs at or below its fence).
///
/// A row `r` of shard `s` is a **stale-epoch acceptance** when another row of shard `s` with a
/// strictly greater epoch either was accepted before `r`, or has a strictly lower seq than `r`.
/// The first clause is the fence itself: once a newer leader's epoch is accepted, an older one
/// must be refused. The second holds whatever the order: seqs are sealed in Raft log order,
/// so along seqs the epoch never decreases, and an accepted row breaking that came from a
/// leader that had been replaced (e.g. a row rewritten by a stale leader in an upsert-by-seq
/// table). A redelivery by a newer leader of a seq already accepted is not stale (the earlier
/// row has the lower epoch), but it is a **duplicate**: a fencing sink accepts each `(shard,
/// seq)` once, so every accepted copy after the first is reported in `duplicates`.
pub fn check_fencing(rows: &[SinkRow]) -> FencingCheck {
    let mut by_shard: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_shard.entry(r.0).or_default().push(i);
    }
    let mut stale = BTreeSet::new();
    let mut duplicates = BTreeSet::new();
    for idx in by_shard.values() {
        // Accepted before, with a greater epoch.
        let mut high: Option<Epoch> = None;
        for &i in idx {
            let epoch = rows[i].2;
            if high.is_some_and(|h| h > epoch) {
                stale.insert(i);
            }
            high = high.max(Some(epoch));
        }
        // A strictly lower seq with a greater epoch.
        let mut by_seq = idx.clone();
        by_seq.sort_by_key(|&i| (rows[i].1, i));
        let mut below: Option<Epoch> = None;
        for group in by_seq.chunk_by(|&a, &b| rows[a].1 == rows[b].1) {
            let mut group_high: Option<Epoch> = None;
            for &i in group {
                let epoch = rows[i].2;
                if below.is_some_and(|h| h > epoch) {
                    stale.insert(i);
                }
                group_high = group_high.max(Some(epoch));
            }
            duplicates.extend(group.iter().skip(1));
            below = below.max(group_high);
        }
    }
    FencingCheck { stale: stale.into_iter().collect(), duplicates: duplicates.into_iter().collect() }
}

/// Violations found so far: exact counts, capped details.
#[derive(Debug, Default)]
struct Findings {
    counts: BTreeMap<ViolationKind, u64>,
    details: Vec<Violation>,
    shown: BTreeMap<ViolationKind, usize>,
}

impl Findings {
    fn add(&mut self, kind: ViolationKind, n: u64, detail: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        *self.counts.entry(kind).or_default() += n;
        let shown = self.shown.entry(kind).or_default();
        if *shown < MAX_DETAILS_PER_KIND {
            *shown += 1;
            self.details.push(Violation { kind, detail: detail() });
        }
    }

    fn count(&self, kind: ViolationKind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }
}

/// An event after `(producer, seq)` dedupe.
#[derive(Debug, Clone, Copy)]
struct Unique<'a> {
    event: &'a Event,
    fate: Fate,
    acked_ms: Option<u64>,
}

/// Per `(stream, key)`: its events and outputs.
#[derive(Debug, Default)]
struct KeyState<'a> {
    shard: Option<u32>,
    acked: Vec<i64>,
    ambiguous: Vec<i64>,
    outputs: Vec<&'a Output>,
}

fn ep(e: Epoch) -> String {
    format!("{}-{}", e.0, e.1)
}

/// An integer JSON value (integral floats included, as `sum_f64` would print them).
fn as_int(v: &serde_json::Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    let f = v.as_f64()?;
    (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

fn same_content(a: &Output, b: &Output) -> bool {
    a.stream == b.stream
        && a.key == b.key
        && a.value == b.value
        && a.epoch == b.epoch
        && a.inputs == b.inputs
        && a.window_start == b.window_start
        && a.window_end == b.window_end
        && a.first_input_at == b.first_input_at
        && a.last_input_at == b.last_input_at
        && a.reason == b.reason
}

fn describe(o: &Output) -> String {
    format!(
        "shard {} seq {} epoch {} {}/{} value {} inputs {} window [{}, {}) reason {} received {}",
        o.shard,
        o.seq,
        ep(o.epoch),
        o.stream,
        o.key,
        o.value,
        o.inputs,
        o.window_start,
        o.window_end,
        o.reason,
        o.received_ms
    )
}

/// Why an output breaks its stream's window policy, if it does (see the module docs).
fn window_violation(window: Window, o: &Output) -> Option<String> {
    let w = window.length_ms();
    let end = o.window_start.saturating_add(w);
    // Adaptive windows may close later, up to the staleness bound.
    let latest_end = o.window_start.saturating_add(window.max_staleness_ms());
    let mut why = Vec::new();
    if !o.window_start.is_multiple_of(w) {
        why.push(format!("window_start not aligned to {w} ms"));
    }
    if o.first_input_at < o.window_start {
        why.push(format!("first input at {} before window_start", o.first_input_at));
    }
    if o.last_input_at < o.first_input_at {
        why.push(format!("last input at {} before first input at {}", o.last_input_at, o.first_input_at));
    }
    if o.reason == "time" {
        if o.window_end < end || o.window_end > latest_end {
            let allowed = if latest_end == end { format!("{end}") } else { format!("{end}..={latest_end}") };
            why.push(format!("closed by time but window_end {} is not window_start + {w} ({allowed})", o.window_end));
        }
        if o.last_input_at >= o.window_end.max(end) {
            why.push(format!("last input at {} not before the window's end {}", o.last_input_at, o.window_end));
        }
        let closes = o.window_end.max(end);
        if o.received_ms.saturating_add(EARLY_TOLERANCE_MS) < closes {
            why.push(format!("received {} ms before the window's end {closes}", closes - o.received_ms));
        }
    } else {
        if o.window_end > latest_end {
            why.push(format!("closed by {} at {} after the window's end {latest_end}", o.reason, o.window_end));
        }
        if o.last_input_at > o.window_end {
            why.push(format!("last input at {} after window_end", o.last_input_at));
        }
        if o.received_ms.saturating_add(EARLY_TOLERANCE_MS) < o.last_input_at {
            why.push(format!("received {} ms before its last input", o.last_input_at - o.received_ms));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Checks a run; see the module docs for every definition.
pub fn check_run(input: &CheckInput<'_>) -> Verdict {
    let mut f = Findings::default();
    let mut m = Metrics { ingest_errors: input.ingest_errors, ..Metrics::default() };
    let specs: HashMap<&str, &StreamSpec> = input.streams.iter().map(|s| (s.name.as_str(), s)).collect();

    // Events, deduplicated on (producer, seq).
    let mut unique_events: BTreeMap<(u64, u64), Unique<'_>> = BTreeMap::new();
    for e in input.events {
        match unique_events.entry((e.producer, e.seq)) {
            Entry::Vacant(v) => {
                v.insert(Unique { event: e, fate: e.fate, acked_ms: e.acked_ms });
            }
            Entry::Occupied(mut o) => {
                let u = o.get_mut();
                let first = u.event;
                if (&first.stream, &first.key, first.value, first.shard) != (&e.stream, &e.key, e.value, e.shard) {
                    f.add(ViolationKind::ConflictingEvents, 1, || {
                        format!(
                            "producer {} seq {} recorded as {}/{}={} (shard {}) and {}/{}={} (shard {})",
                            e.producer,
                            e.seq,
                            first.stream,
                            first.key,
                            first.value,
                            first.shard,
                            e.stream,
                            e.key,
                            e.value,
                            e.shard
                        )
                    });
                }
                if e.fate == Fate::Acked {
                    u.fate = Fate::Acked;
                    u.acked_ms = match (u.acked_ms, e.acked_ms) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
        }
    }
    let unique_events: Vec<Unique<'_>> = unique_events.into_values().collect();

    let mut keys: BTreeMap<(&str, &str), KeyState<'_>> = BTreeMap::new();
    for u in &unique_events {
        let e = u.event;
        match u.fate {
            Fate::Acked => m.acked_events += 1,
            Fate::Ambiguous => m.ambiguous_events += 1,
        }
        if !specs.contains_key(e.stream.as_str()) {
            f.add(ViolationKind::UnknownStream, 1, || {
                format!("event producer {} seq {} of undeclared stream {:?}", e.producer, e.seq, e.stream)
            });
            continue;
        }
        let k = keys.entry((&e.stream, &e.key)).or_default();
        if let Some(shard) = k.shard
            && shard != e.shard
        {
            f.add(ViolationKind::ConflictingEvents, 1, || {
                format!("{}/{} recorded on shards {shard} and {}", e.stream, e.key, e.shard)
            });
        }
        k.shard.get_or_insert(e.shard);
        match u.fate {
            Fate::Acked => k.acked.push(e.value),
            Fate::Ambiguous => k.ambiguous.push(e.value),
        }
    }

    // Outputs, deduplicated on (shard, seq), first received wins.
    m.outputs_received = input.outputs.len() as u64;
    let mut sorted: Vec<&Output> = input.outputs.iter().collect();
    sorted.sort_by_key(|o| (o.shard, o.seq, o.received_ms));
    let mut unique: Vec<&Output> = Vec::with_capacity(sorted.len());
    for o in sorted {
        if let Some(first) = unique.last()
            && (first.shard, first.seq) == (o.shard, o.seq)
        {
            if same_content(first, o) {
                m.redelivered_outputs += 1;
            } else {
                f.add(ViolationKind::ConflictingDuplicates, 1, || {
                    format!("first {}; then {}", describe(first), describe(o))
                });
            }
            continue;
        }
        unique.push(o);
    }
    m.outputs_unique = unique.len() as u64;
    m.inputs_emitted = unique.iter().fold(0u64, |acc, o| acc.saturating_add(o.inputs));
    m.coalesce_ratio = (!unique.is_empty()).then(|| m.inputs_emitted as f64 / unique.len() as f64);

    // Per shard: gap-free seqs, non-decreasing epochs (`unique` is sorted by shard, seq).
    for shard_outputs in unique.chunk_by(|a, b| a.shard == b.shard) {
        let mut expected = 1u64;
        let mut high: Option<Epoch> = None;
        for o in shard_outputs {
            if o.seq == 0 {
                f.add(ViolationKind::InvalidSeq, 1, || describe(o));
                continue;
            }
            if o.seq > expected {
                let (from, to) = (expected, o.seq - 1);
                f.add(ViolationKind::SeqGaps, to - from + 1, || {
                    format!("shard {}: seqs {from}..={to} missing ({})", o.shard, to - from + 1)
                });
            }
            expected = o.seq + 1;
            match high {
                Some(h) if o.epoch < h => f.add(ViolationKind::EpochRegressions, 1, || {
                    format!(
                        "shard {} seq {} has epoch {} after epoch {} at a lower seq",
                        o.shard,
                        o.seq,
                        ep(o.epoch),
                        ep(h)
                    )
                }),
                _ => high = Some(o.epoch),
            }
        }
    }

    // Per output: stream, window policy; then group by key.
    let mut time_windows: HashMap<(&str, &str, u64), &Output> = HashMap::new();
    for &o in &unique {
        let Some(spec) = specs.get(o.stream.as_str()) else {
            f.add(ViolationKind::UnknownStream, 1, || format!("output of undeclared stream: {}", describe(o)));
            continue;
        };
        if let Some(why) = window_violation(spec.window, o) {
            f.add(ViolationKind::EarlyEmissions, 1, || format!("{why}: {}", describe(o)));
        }
        if o.reason == "time" {
            match time_windows.entry((&o.stream, &o.key, o.window_start)) {
                std::collections::hash_map::Entry::Occupied(first) => {
                    let first = *first.get();
                    f.add(ViolationKind::DuplicateWindows, 1, || {
                        format!("{} and {} close the same window", describe(first), describe(o))
                    });
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(o);
                }
            }
        }
        keys.entry((&o.stream, &o.key)).or_default().outputs.push(o);
    }

    // Per key: counts, then the merge-specific value rules.
    for ((stream, key), k) in &keys {
        let Some(spec) = specs.get(stream) else { continue };
        if let Some(shard) = k.shard {
            let wrong: Vec<&&Output> = k.outputs.iter().filter(|o| o.shard != shard).collect();
            f.add(ViolationKind::WrongShard, wrong.len() as u64, || {
                format!("{stream}/{key}: events on shard {shard}, output {}", describe(wrong[0]))
            });
        }
        let (a, b) = (k.acked.len() as u64, k.ambiguous.len() as u64);
        let n = k.outputs.iter().fold(0u64, |acc, o| acc.saturating_add(o.inputs));
        let lost = a.saturating_sub(n);
        let doubled = n.saturating_sub(a + b);
        f.add(ViolationKind::LostEvents, lost, || {
            format!("{stream}/{key}: {a} acked, {b} ambiguous, {n} inputs emitted in {} outputs", k.outputs.len())
        });
        f.add(ViolationKind::DoubleCountedEvents, doubled, || {
            format!("{stream}/{key}: {a} acked, {b} ambiguous, {n} inputs emitted in {} outputs", k.outputs.len())
        });
        m.ambiguous_applied += n.saturating_sub(a).min(b);
        let mut values = Vec::with_capacity(k.outputs.len());
        for &o in &k.outputs {
            match as_int(&o.value) {
                Some(v) => values.push(v),
                None => f.add(ViolationKind::UnparseableValue, 1, || describe(o)),
            }
        }
        if values.len() != k.outputs.len() {
            continue;
        }
        match spec.merge {
            Merge::Sum => {
                if lost > 0 || doubled > 0 {
                    continue;
                }
                let applied = (n - a) as usize;
                let mut amb: Vec<i128> = k.ambiguous.iter().map(|&v| i128::from(v)).collect();
                amb.sort_unstable();
                let acked: i128 = k.acked.iter().map(|&v| i128::from(v)).sum();
                let lo = acked + amb[..applied].iter().sum::<i128>();
                let hi = acked + amb[amb.len() - applied..].iter().sum::<i128>();
                let emitted: i128 = values.iter().map(|&v| i128::from(v)).sum();
                if emitted < lo || emitted > hi {
                    f.add(ViolationKind::ValueMismatch, 1, || {
                        format!(
                            "{stream}/{key}: emitted sum {emitted}, expected {} with {applied} of {b} ambiguous \
                             events applied (Σ acked {acked})",
                            if lo == hi { lo.to_string() } else { format!("in [{lo}, {hi}]") }
                        )
                    });
                }
            }
            Merge::Latest => {
                let sent: BTreeSet<i64> = k.acked.iter().chain(&k.ambiguous).copied().collect();
                let mut invented = false;
                for (&o, &v) in k.outputs.iter().zip(&values) {
                    if !sent.contains(&v) {
                        invented = true;
                        f.add(ViolationKind::InventedValues, 1, || format!("value {v} never sent: {}", describe(o)));
                    }
                }
                let last = k.outputs.iter().zip(&values).max_by_key(|(o, _)| (o.shard, o.seq));
                if let Some((&o, &v)) = last
                    && !invented
                {
                    let last_acked = k.acked.iter().max().copied();
                    let ok = match last_acked {
                        Some(la) => v == la || (v > la && k.ambiguous.contains(&v)),
                        None => k.ambiguous.contains(&v),
                    };
                    if !ok {
                        f.add(ViolationKind::LatestMismatch, 1, || {
                            format!(
                                "{stream}/{key}: final value {v}, last acked {}: {}",
                                last_acked.map_or("none".into(), |la| la.to_string()),
                                describe(o)
                            )
                        });
                    }
                }
            }
        }
    }

    // A fencing sink's rows.
    m.fenced_rows = input.fenced_rows.len() as u64;
    let fencing = check_fencing(input.fenced_rows);
    for &i in &fencing.stale {
        let (shard, seq, epoch) = input.fenced_rows[i];
        f.add(ViolationKind::StaleEpochAccepted, 1, || {
            format!("row {i}: shard {shard} seq {seq} epoch {} accepted after a newer epoch", ep(epoch))
        });
    }
    for &i in &fencing.duplicates {
        let (shard, seq, epoch) = input.fenced_rows[i];
        f.add(ViolationKind::SinkDuplicates, 1, || {
            format!("row {i}: shard {shard} seq {seq} epoch {} accepted again", ep(epoch))
        });
    }

    // Faults.
    let faults: Vec<FaultTiming> =
        input.faults.iter().map(|fault| fault_timing(fault, &unique_events, &unique)).collect();
    // Failover numbers count only faults that take the leader away.
    let failovers: Vec<u64> = faults.iter().filter(|t| t.kind.loses_leader()).filter_map(|t| t.failover_ms).collect();
    let emissions: Vec<u64> =
        faults.iter().filter(|t| t.kind.loses_leader()).filter_map(|t| t.first_emission_ms).collect();
    m.failover_ms = Quantiles::of(&failovers);
    m.first_emission_ms = Quantiles::of(&emissions);

    // Overall.
    let start = unique_events.iter().map(|u| u.event.sent_ms).min();
    let end = unique_events.iter().map(|u| u.acked_ms.unwrap_or(u.event.sent_ms).max(u.event.sent_ms)).max();
    if let (Some(start), Some(end)) = (start, end) {
        m.load_duration_ms = end - start;
        m.throughput_eps = m.acked_events as f64 * 1000.0 / (end - start).max(1) as f64;
    }
    let attempts = m.acked_events + m.ingest_errors + m.ambiguous_events;
    m.ingest_error_rate = if attempts == 0 { 0.0 } else { m.ingest_errors as f64 / attempts as f64 };

    m.lost_events = f.count(ViolationKind::LostEvents);
    m.double_counted_events = f.count(ViolationKind::DoubleCountedEvents);
    m.value_mismatch = f.count(ViolationKind::ValueMismatch);
    m.invented_values = f.count(ViolationKind::InventedValues);
    m.latest_mismatch = f.count(ViolationKind::LatestMismatch);
    m.seq_gaps = f.count(ViolationKind::SeqGaps);
    m.epoch_regressions = f.count(ViolationKind::EpochRegressions);
    m.conflicting_duplicates = f.count(ViolationKind::ConflictingDuplicates);
    m.early_emissions = f.count(ViolationKind::EarlyEmissions);
    m.duplicate_windows = f.count(ViolationKind::DuplicateWindows);
    m.stale_epoch_accepted = f.count(ViolationKind::StaleEpochAccepted);

    Verdict { pass: f.counts.is_empty(), violation_counts: f.counts, violations: f.details, metrics: m, faults }
}

/// Failover timings of one fault (see [`FaultTiming`]).
fn fault_timing(fault: &Fault, events: &[Unique<'_>], outputs: &[&Output]) -> FaultTiming {
    let scope = if fault.kind == FaultKind::KillAll { None } else { fault.shard };
    let in_scope = |shard: u32| scope.is_none_or(|s| s == shard);
    let t0 = fault.injected_ms;

    let failover_ms = events
        .iter()
        .filter(|u| u.fate == Fate::Acked && in_scope(u.event.shard) && u.event.sent_ms >= t0)
        .filter_map(|u| u.acked_ms)
        .min()
        .map(|acked| acked.saturating_sub(t0));

    // The epoch of each shard's leader at fault time, as well as known.
    let mut baseline: BTreeMap<u32, Epoch> = BTreeMap::new();
    for o in outputs.iter().filter(|o| in_scope(o.shard) && o.received_ms <= t0) {
        let e = baseline.entry(o.shard).or_insert(o.epoch);
        *e = (*e).max(o.epoch);
    }
    if let (Some(shard), Some(old)) = (fault.shard, fault.old_epoch) {
        baseline.insert(shard, old);
    }
    let first_emission_ms = outputs
        .iter()
        .filter(|o| in_scope(o.shard) && baseline.get(&o.shard).is_some_and(|b| o.epoch > *b))
        .map(|o| o.received_ms.saturating_sub(t0))
        .min();

    FaultTiming {
        id: fault.id,
        kind: fault.kind,
        shard: fault.shard,
        node: fault.node.clone(),
        injected_ms: fault.injected_ms,
        healed_ms: fault.healed_ms,
        failover_ms,
        first_emission_ms,
    }
}

#[cfg(test)]
mod tests;
