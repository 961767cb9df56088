//! The report of a run, written to a directory:
//!
//! | file | what |
//! |---|---|
//! | `report.json` | [`Report`]: the verdict, the headline numbers, faults by kind, failover quantiles, per-fault timings, violations, every metric |
//! | `report.md` | the same for a human: summary table, violations, per-fault table, the plots |
//! | `throughput.svg` | acked, refused and ambiguous events per second, fault markers |
//! | `latency.svg` | ack latency p50 and p99 per second, fault markers |
//! | `failover.svg` | histogram of failover times and of times to the new leader's first emission |

mod plot;
pub use plot::{Line, lines_svg};

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::check::{FaultTiming, Metrics, Quantiles, Verdict, Violation, ViolationKind};
use crate::record::{Fault, FaultKind, Sample};

pub const REPORT_JSON: &str = "report.json";
pub const REPORT_MD: &str = "report.md";
pub const THROUGHPUT_SVG: &str = "throughput.svg";
pub const LATENCY_SVG: &str = "latency.svg";
pub const FAILOVER_SVG: &str = "failover.svg";

/// What was run, for the report and for replaying it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMeta {
    /// The scenario's name (or file).
    pub scenario: String,
    /// The seed of the run: replaying with it repeats the load and the fault schedule.
    pub seed: u64,
    /// When the load started (ms since the UNIX epoch); plots count seconds from here.
    pub started_ms: u64,
    pub duration_ms: u64,
    pub nodes: u32,
    pub shards: u32,
    /// Storage / sink backend the cluster ran with (free text).
    pub backend: String,
    /// The command line that replays the run.
    pub command: String,
}

/// The file names of the plots, relative to the report directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plots {
    pub throughput: String,
    pub latency: String,
    pub failover: String,
}

/// `report.json`. The headline fields sit at the top level under stable names; `metrics`
/// holds every number the checker computed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `"pass"` or `"fail"`.
    pub verdict: String,
    #[serde(flatten)]
    pub run: RunMeta,
    pub acked_events: u64,
    pub ambiguous_events: u64,
    pub lost_events: u64,
    pub double_counted_events: u64,
    pub seq_gaps: u64,
    pub epoch_regressions: u64,
    pub conflicting_duplicates: u64,
    pub early_emissions: u64,
    pub stale_epoch_accepted: u64,
    pub throughput_eps: f64,
    pub ingest_error_rate: f64,
    /// Faults injected, by kind (every kind listed, 0 included).
    pub faults: BTreeMap<FaultKind, u64>,
    /// Fault → first acknowledged write, over the faults where it was observed.
    pub failover_ms: Quantiles,
    /// Fault → first output of the new leader, over the faults where it was observed.
    pub first_emission_ms: Quantiles,
    pub fault_details: Vec<FaultTiming>,
    /// Exact count per violated kind.
    pub violation_counts: BTreeMap<ViolationKind, u64>,
    /// Up to 20 details per kind.
    pub violations: Vec<Violation>,
    pub metrics: Metrics,
    pub plots: Plots,
}

impl Report {
    /// Assembles the report of a checked run (`faults` as injected, for the counts by kind).
    pub fn new(meta: &RunMeta, verdict: &Verdict, faults: &[Fault]) -> Self {
        let m = &verdict.metrics;
        let mut by_kind: BTreeMap<FaultKind, u64> = FaultKind::ALL.iter().map(|k| (*k, 0)).collect();
        for f in faults {
            *by_kind.entry(f.kind).or_default() += 1;
        }
        Report {
            verdict: if verdict.pass { "pass" } else { "fail" }.to_owned(),
            run: meta.clone(),
            acked_events: m.acked_events,
            ambiguous_events: m.ambiguous_events,
            lost_events: m.lost_events,
            double_counted_events: m.double_counted_events,
            seq_gaps: m.seq_gaps,
            epoch_regressions: m.epoch_regressions,
            conflicting_duplicates: m.conflicting_duplicates,
            early_emissions: m.early_emissions,
            stale_epoch_accepted: m.stale_epoch_accepted,
            throughput_eps: m.throughput_eps,
            ingest_error_rate: m.ingest_error_rate,
            faults: by_kind,
            failover_ms: m.failover_ms,
            first_emission_ms: m.first_emission_ms,
            fault_details: verdict.faults.clone(),
            violation_counts: verdict.violation_counts.clone(),
            violations: verdict.violations.clone(),
            metrics: m.clone(),
            plots: Plots {
                throughput: THROUGHPUT_SVG.to_owned(),
                latency: LATENCY_SVG.to_owned(),
                failover: FAILOVER_SVG.to_owned(),
            },
        }
    }
}

/// Writes `report.json`, `report.md` and the three plots into `dir` (created if missing).
pub fn write_report(
    dir: &Path,
    meta: &RunMeta,
    verdict: &Verdict,
    samples: &[Sample],
    faults: &[Fault],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let report = Report::new(meta, verdict, faults);
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    let json = serde_json::to_string_pretty(&report).context("serializing the report")?;
    write(REPORT_JSON, &(json + "\n"))?;
    write(REPORT_MD, &render_markdown(&report))?;
    write(THROUGHPUT_SVG, &plot::throughput_svg(meta, samples, faults).context("the throughput plot")?)?;
    write(LATENCY_SVG, &plot::latency_svg(meta, samples, faults).context("the latency plot")?)?;
    write(FAILOVER_SVG, &plot::failover_svg(meta, &verdict.faults).context("the failover plot")?)?;
    Ok(())
}

/// One line for the terminal: the verdict, the violations and the seed to replay.
pub fn summary_line(meta: &RunMeta, verdict: &Verdict) -> String {
    let m = &verdict.metrics;
    let mut line = format!(
        "chaos {}: {} acked, {} ambiguous ({} applied), {} lost, {} double-counted, {} seq gaps, {} stale-epoch \
         accepted; failover p50 {} p99 {} max {}; {:.0} events/s, error rate {:.4}",
        if verdict.pass { "PASS" } else { "FAIL" },
        m.acked_events,
        m.ambiguous_events,
        m.ambiguous_applied,
        m.lost_events,
        m.double_counted_events,
        m.seq_gaps,
        m.stale_epoch_accepted,
        ms(m.failover_ms.p50),
        ms(m.failover_ms.p99),
        ms(m.failover_ms.max),
        m.throughput_eps,
        m.ingest_error_rate,
    );
    if !verdict.pass {
        let kinds: Vec<String> = verdict.violation_counts.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let _ = write!(line, "; violations: {}", kinds.join(", "));
    }
    let _ = write!(line, "; seed {} (replay: {})", meta.seed, meta.command);
    line
}

fn ms(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"))
}

/// Seconds of `t` since the run started, for tables.
fn rel(meta: &RunMeta, t: u64) -> String {
    format!("{:.3}", (t as f64 - meta.started_ms as f64) / 1000.0)
}

/// Markdown cells must not break the table.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// `report.md`.
pub fn render_markdown(r: &Report) -> String {
    let m = &r.metrics;
    let mut s = String::new();
    let verdict = if r.verdict == "pass" { "PASS" } else { "FAIL" };
    let _ = writeln!(s, "# Chaos report: {} — {verdict}\n", cell(&r.run.scenario));
    let _ = writeln!(s, "Seed **{}**. Replay with:\n\n```sh\n{}\n```\n", r.run.seed, r.run.command);
    let _ = writeln!(
        s,
        "{} nodes, {} shards, backend `{}`, load {:.1} s from {} ms since the UNIX epoch.\n",
        r.run.nodes,
        r.run.shards,
        r.run.backend,
        r.run.duration_ms as f64 / 1000.0,
        r.run.started_ms
    );

    let _ = writeln!(s, "## Summary\n\n| metric | value |\n|---|---|");
    let q = |q: &Quantiles| format!("p50 {} · p99 {} · max {} (n = {})", ms(q.p50), ms(q.p99), ms(q.max), q.count);
    let rows: Vec<(&str, String)> = vec![
        ("verdict", verdict.to_owned()),
        ("acked events", r.acked_events.to_string()),
        ("ambiguous events (applied)", format!("{} ({})", r.ambiguous_events, m.ambiguous_applied)),
        ("refused events", m.ingest_errors.to_string()),
        ("ingest error rate", format!("{:.4}", r.ingest_error_rate)),
        (
            "throughput",
            format!("{:.1} acked events/s over {:.1} s", r.throughput_eps, m.load_duration_ms as f64 / 1000.0),
        ),
        ("lost events", r.lost_events.to_string()),
        ("double-counted events", r.double_counted_events.to_string()),
        ("seq gaps", r.seq_gaps.to_string()),
        ("epoch regressions", r.epoch_regressions.to_string()),
        ("conflicting duplicates", r.conflicting_duplicates.to_string()),
        ("early emissions", r.early_emissions.to_string()),
        ("stale-epoch rows accepted", format!("{} of {} fenced rows", r.stale_epoch_accepted, m.fenced_rows)),
        ("outputs (distinct / received)", format!("{} / {}", m.outputs_unique, m.outputs_received)),
        ("coalesce ratio", m.coalesce_ratio.map_or_else(|| "-".to_owned(), |c| format!("{c:.1} inputs per output"))),
        ("failover (fault → first acked write)", q(&r.failover_ms)),
        ("fault → first emission by the new leader", q(&r.first_emission_ms)),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {} |", cell(&v));
    }
    let faults: Vec<String> = r.faults.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{n} × {k}")).collect();
    let faults = if faults.is_empty() { "none".to_owned() } else { faults.join(", ") };
    let _ = writeln!(s, "| faults | {} |\n", cell(&faults));

    let _ = writeln!(s, "## Violations\n");
    if r.violation_counts.is_empty() {
        let _ = writeln!(s, "None: every invariant held.\n");
    } else {
        let _ = writeln!(s, "| kind | count | meaning |\n|---|---|---|");
        for (kind, n) in &r.violation_counts {
            let _ = writeln!(s, "| `{kind}` | {n} | {} |", kind.meaning());
        }
        let _ = writeln!(s);
        for (kind, n) in &r.violation_counts {
            let details: Vec<&Violation> = r.violations.iter().filter(|v| v.kind == *kind).collect();
            let _ = writeln!(s, "### `{kind}` ({n})\n");
            for v in &details {
                let _ = writeln!(s, "- {}", v.detail);
            }
            if (details.len() as u64) < *n {
                let _ = writeln!(s, "- … and {} more", *n - details.len() as u64);
            }
            let _ = writeln!(s);
        }
    }

    let _ = writeln!(s, "## Faults\n");
    if r.fault_details.is_empty() {
        let _ = writeln!(s, "No fault was injected.\n");
    } else {
        let _ = writeln!(
            s,
            "Times in seconds since the start; failover = fault → first acknowledged write sent after it; \
             first emission = fault → first output with a newer epoch.\n"
        );
        let _ = writeln!(
            s,
            "| # | kind | shard | node | injected (s) | healed (s) | failover | first emission |\n\
             |---|---|---|---|---|---|---|---|"
        );
        for f in &r.fault_details {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                f.id,
                f.kind,
                f.shard.map_or_else(|| "all".to_owned(), |x| x.to_string()),
                cell(f.node.as_deref().unwrap_or("-")),
                rel(&r.run, f.injected_ms),
                f.healed_ms.map_or_else(|| "-".to_owned(), |h| rel(&r.run, h)),
                f.failover_ms.map_or_else(|| "not observed".to_owned(), |v| format!("{v} ms")),
                f.first_emission_ms.map_or_else(|| "not observed".to_owned(), |v| format!("{v} ms")),
            );
        }
        let _ = writeln!(s);
    }

    let _ = writeln!(s, "## Plots\n");
    let _ = writeln!(s, "![throughput]({})\n", r.plots.throughput);
    let _ = writeln!(s, "![ack latency]({})\n", r.plots.latency);
    let _ = writeln!(s, "![failover]({})", r.plots.failover);
    s
}

#[cfg(test)]
mod tests;
