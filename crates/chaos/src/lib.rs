//! The pure half of chaos game days: what a run records, the invariant checker, and the
//! report. The runner (cluster control, load, subscriber, fault injection) lives in
//! `coalescectl chaos`; it fills in the records of [`record`], calls [`check::check_run`] and
//! [`report::write_report`], prints [`report::summary_line`] and exits non-zero unless the
//! verdict passed.
//!
//! ```text
//!  producers ──► events (acked | ambiguous) ─┐
//!  subscriber ─► outputs (with redeliveries) ─┤
//!  fault injector ─► faults ──────────────────┼─► check ─► Verdict ─► report.json, report.md,
//!  fencing sink ─► accepted (shard, seq, epoch)┘                       throughput.svg, latency.svg,
//!  load samples (per second) ─────────────────────────────────────────► failover.svg
//! ```
//!
//! # Invariants checked
//!
//! These are the invariants of the design (`docs/architecture.md`), stated over what a run
//! can observe from outside the cluster; [`mod@check`] defines each count precisely.
//!
//! 1. **No acknowledged event is lost**: per `(stream, key)`, the inputs counted by the
//!    outputs (after `(shard, seq)` dedupe) cover every acknowledged event.
//! 2. **Nothing is counted twice**: those inputs never exceed acknowledged + ambiguous events;
//!    an ambiguous event (the producer got no answer) may be applied, but at most once; the
//!    same `(shard, seq)` delivered twice must be the same output. Sums must add up (within
//!    what the ambiguous events allow); latest-wins keys must end on the last value written.
//! 3. **Sequence numbers are gap-free per shard and epochs never decrease** along them.
//! 4. **Nothing is emitted before its window allowed it**: tumbling windows are aligned, a
//!    time-closed output is received no earlier than its window's end (50 ms tolerance), and
//!    each key has one time-closed output per window.
//! 5. **No stale-epoch output is accepted by a fencing sink** ([`check::check_fencing`]).
//!
//! Besides pass/fail it measures, per fault, the time to the first acknowledged write and to
//! the first emission by the new leader, and overall throughput and ingest error rate.
//!
//! # Modules
//!
//! * [`record`] — serde record types (JSON-lines friendly) and per-second load samples.
//! * [`mod@check`] — the checker: [`check::check`], [`check::check_run`], [`check::check_fencing`].
//! * [`report`] — `report.json`, `report.md` and the SVG plots.
//!
//! # Libraries
//!
//! `serde`/`serde_json` for the records and `report.json`; `hdrhistogram` for per-second ack
//! latency quantiles; `plotters` (SVG backend only, no font or bitmap features: SVG text is
//! laid out by the viewer, so no system font is needed) for the plots; `anyhow` for I/O errors.
//!
//! This crate depends on no other crate of the workspace (in particular on nothing that builds
//! RocksDB), so it builds and tests in seconds.

pub mod check;
pub mod record;
pub mod report;

pub use check::{CheckInput, SinkRow, Verdict, ViolationKind, check, check_fencing, check_run};
pub use record::{
    Epoch, Event, Fate, Fault, FaultKind, Merge, Output, Sample, StreamSpec, Window, read_jsonl, samples_from_events,
    write_jsonl,
};
pub use report::{RunMeta, summary_line, write_report};
