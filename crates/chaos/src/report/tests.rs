use serde_json::{Value, json};

use super::*;
use crate::check::{CheckInput, check, check_run};
use crate::record::{Event, Fate, Merge, Output, StreamSpec, Window, samples_from_events};

const T0: u64 = 1_700_000_000_000;

fn meta() -> RunMeta {
    RunMeta {
        scenario: "leader-kills".into(),
        seed: 4242,
        started_ms: T0,
        duration_ms: 20_000,
        nodes: 3,
        shards: 4,
        backend: "rocksdb".into(),
        command: "coalescectl chaos run chaos/scenarios/leader-kills.toml --seed 4242".into(),
    }
}

fn streams() -> Vec<StreamSpec> {
    vec![StreamSpec { name: "sums".into(), merge: Merge::Sum, window: Window::Tumbling { ms: 1_000 } }]
}

/// 20 s of load on one key of shard 0, one event every 10 ms, a leader kill at 8 s that
/// stalls acks for 1.2 s, and one output per window.
fn run() -> (Vec<Event>, Vec<Output>, Vec<Fault>) {
    let kill = T0 + 8_000;
    let mut events = Vec::new();
    for i in 0..2_000u64 {
        let sent = T0 + i * 10;
        let acked = if (kill..kill + 1_200).contains(&sent) { kill + 1_200 + (sent - kill) / 100 } else { sent + 4 };
        events.push(Event {
            producer: 1,
            seq: i + 1,
            stream: "sums".into(),
            key: "k".into(),
            value: 1,
            shard: 0,
            sent_ms: sent,
            fate: Fate::Acked,
            acked_ms: Some(acked),
        });
    }
    let mut outputs = Vec::new();
    for w in 0..20u64 {
        let start = T0 + w * 1_000;
        let inputs = events.iter().filter(|e| (start..start + 1_000).contains(&(e.sent_ms + 1))).count() as u64;
        outputs.push(Output {
            shard: 0,
            seq: w + 1,
            epoch: if start >= kill { (2, 2) } else { (1, 1) },
            stream: "sums".into(),
            key: "k".into(),
            value: json!(inputs),
            inputs,
            window_start: start,
            window_end: start + 1_000,
            first_input_at: start + 1,
            last_input_at: start + 991,
            reason: "time".into(),
            received_ms: start + 1_000 + if start + 1_000 >= kill && start < kill + 1_200 { 1_500 } else { 8 },
        });
    }
    let faults = vec![Fault {
        id: 1,
        kind: FaultKind::KillLeader,
        shard: Some(0),
        node: Some("coalesce-1".into()),
        old_epoch: Some((1, 1)),
        injected_ms: kill,
        healed_ms: Some(kill + 3_000),
    }];
    (events, outputs, faults)
}

#[test]
fn a_passing_run_writes_every_file_with_every_field() {
    let (events, outputs, faults) = run();
    let errors: Vec<u64> = (0..40).map(|i| T0 + 8_000 + i * 25).collect();
    let samples = samples_from_events(&events, &errors, 1_000);
    let verdict = check_run(&CheckInput {
        streams: &streams(),
        events: &events,
        outputs: &outputs,
        faults: &faults,
        ingest_errors: errors.len() as u64,
        fenced_rows: &[],
    });
    assert!(verdict.pass, "{:#?}", verdict.violations);
    assert_eq!(verdict.faults[0].failover_ms, Some(1_200));
    assert!(verdict.faults[0].first_emission_ms.is_some());

    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("nested/report");
    write_report(&out, &meta(), &verdict, &samples, &faults).expect("report written");
    for name in [REPORT_JSON, REPORT_MD, THROUGHPUT_SVG, LATENCY_SVG, FAILOVER_SVG] {
        assert!(out.join(name).is_file(), "{name} missing");
    }

    let text = std::fs::read_to_string(out.join(REPORT_JSON)).expect("report.json");
    let json: Value = serde_json::from_str(&text).expect("report.json parses");
    for field in [
        "verdict",
        "acked_events",
        "ambiguous_events",
        "lost_events",
        "double_counted_events",
        "seq_gaps",
        "stale_epoch_accepted",
        "faults",
        "failover_ms",
        "ingest_error_rate",
        "seed",
        "fault_details",
        "scenario",
        "command",
        "throughput_eps",
        "violations",
        "metrics",
    ] {
        assert!(json.get(field).is_some(), "report.json lacks {field}: {text}");
    }
    assert_eq!(json["verdict"], json!("pass"));
    assert_eq!(json["seed"], json!(4242));
    assert_eq!(json["acked_events"], json!(2_000));
    assert_eq!(json["lost_events"], json!(0));
    assert_eq!(
        json["faults"],
        json!({"kill_leader": 1, "pause_leader": 0, "partition_leader": 0, "kill_all": 0, "slow_disk": 0})
    );
    assert_eq!(json["failover_ms"], json!({"count": 1, "p50": 1_200, "p99": 1_200, "max": 1_200}));
    assert_eq!(json["fault_details"][0]["failover_ms"], json!(1_200));
    assert_eq!(json["fault_details"][0]["kind"], json!("kill_leader"));
    let rate = json["ingest_error_rate"].as_f64().expect("a number");
    assert!((rate - 40.0 / 2_040.0).abs() < 1e-9, "{rate}");
    let back: Report = serde_json::from_str(&text).expect("parses back as a Report");
    assert_eq!(back.run, meta());
    assert_eq!(back.fault_details, verdict.faults);
    assert_eq!(back.violation_counts, verdict.violation_counts);

    let md = std::fs::read_to_string(out.join(REPORT_MD)).expect("report.md");
    assert!(md.contains("# Chaos report: leader-kills — PASS"), "{md}");
    assert!(md.contains("Seed **4242**") && md.contains("--seed 4242"), "{md}");
    assert!(md.contains("None: every invariant held."), "{md}");
    assert!(md.contains("| 1 | kill_leader | 0 | coalesce-1 | 8.000 | 11.000 | 1200 ms |"), "{md}");
    assert!(md.contains("![throughput](throughput.svg)") && md.contains("![failover](failover.svg)"), "{md}");

    let svg = std::fs::read_to_string(out.join(THROUGHPUT_SVG)).expect("throughput.svg");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // Text is real SVG text: titles, axis descriptions, legend and fault labels.
    for text in [
        "Throughput — leader-kills (seed 4242)",
        "seconds since start",
        "acked/s",
        "errors/s",
        "#1 kill_leader (shard 0)",
    ] {
        assert!(svg.contains(text), "throughput.svg lacks {text:?}");
    }
    assert!(svg.contains("<polyline") || svg.contains("<path"), "no line drawn");
    let svg = std::fs::read_to_string(out.join(LATENCY_SVG)).expect("latency.svg");
    for text in ["Ack latency", "ack latency (ms)", "p50", "p99", "#1 kill_leader"] {
        assert!(svg.contains(text), "latency.svg lacks {text:?}");
    }
    let svg = std::fs::read_to_string(out.join(FAILOVER_SVG)).expect("failover.svg");
    for text in ["Failover over 1 faults", "milliseconds after the fault", "first acked write"] {
        assert!(svg.contains(text), "failover.svg lacks {text:?}");
    }
    assert!(svg.contains("<rect"), "no bar drawn");
}

#[test]
fn a_failing_run_reports_violations_and_the_seed() {
    let (events, mut outputs, faults) = run();
    outputs.retain(|o| o.seq != 5); // a lost output: a gap and lost events
    let verdict = check(&streams(), &events, &outputs, &faults);
    assert!(!verdict.pass);
    assert_eq!(verdict.count(ViolationKind::SeqGaps), 1);
    assert_eq!(verdict.count(ViolationKind::LostEvents), 100);

    let dir = tempfile::tempdir().expect("tempdir");
    write_report(dir.path(), &meta(), &verdict, &[], &faults).expect("report written");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(REPORT_JSON)).expect("read")).expect("parses");
    assert_eq!(json["verdict"], json!("fail"));
    assert_eq!(json["lost_events"], json!(100));
    assert_eq!(json["seq_gaps"], json!(1));
    assert_eq!(json["violation_counts"], json!({"lost_events": 100, "seq_gaps": 1}));
    let md = std::fs::read_to_string(dir.path().join(REPORT_MD)).expect("read");
    assert!(md.contains("— FAIL"), "{md}");
    assert!(md.contains("| `lost_events` | 100 |") && md.contains("### `seq_gaps` (1)"), "{md}");
    assert!(md.contains("shard 0: seqs 5..=5 missing"), "{md}");

    let line = summary_line(&meta(), &verdict);
    assert!(line.starts_with("chaos FAIL"), "{line}");
    assert!(line.contains("lost_events=100") && line.contains("seq_gaps=1"), "{line}");
    assert!(line.contains("seed 4242 (replay: coalescectl chaos run"), "{line}");
}

#[test]
fn an_empty_run_still_writes_a_report() {
    let verdict = check(&streams(), &[], &[], &[]);
    assert!(verdict.pass);
    let dir = tempfile::tempdir().expect("tempdir");
    write_report(dir.path(), &meta(), &verdict, &[], &[]).expect("report written");
    let svg = std::fs::read_to_string(dir.path().join(FAILOVER_SVG)).expect("read");
    assert!(svg.contains("no failover observed"));
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(REPORT_JSON)).expect("read")).expect("parses");
    assert_eq!(json["failover_ms"], json!({"count": 0, "p50": null, "p99": null, "max": null}));
    let md = std::fs::read_to_string(dir.path().join(REPORT_MD)).expect("read");
    assert!(md.contains("No fault was injected."), "{md}");
    assert!(summary_line(&meta(), &verdict).starts_with("chaos PASS"));
}
