use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::record::{Event, Fate, Fault, FaultKind, Merge, Output, StreamSpec, Window};

const T0: u64 = 1_700_000_000_000;
const W: u64 = 1_000;

fn specs() -> Vec<StreamSpec> {
    vec![
        StreamSpec { name: "sums".into(), merge: Merge::Sum, window: Window::Tumbling { ms: W } },
        StreamSpec { name: "latest".into(), merge: Merge::Latest, window: Window::Tumbling { ms: W } },
    ]
}

fn shard_of(key: &str) -> u32 {
    key.bytes().map(u32::from).sum::<u32>() % 2
}

fn ev(producer: u64, seq: u64, stream: &str, key: &str, value: i64, sent: u64, fate: Fate) -> Event {
    Event {
        producer,
        seq,
        stream: stream.into(),
        key: key.into(),
        value,
        shard: shard_of(key),
        sent_ms: sent,
        fate,
        acked_ms: (fate == Fate::Acked).then_some(sent + 5),
    }
}

/// Four sum keys written by producer 1 (distinct values) and four latest keys, each written by
/// its own producer with increasing values; one event per key every 100 ms for 3 s.
fn clean_events() -> Vec<Event> {
    let mut events = Vec::new();
    let mut seq = 0;
    for i in 0..30u64 {
        for k in 0..4u64 {
            seq += 1;
            let sent = T0 + i * 100 + k;
            events.push(ev(1, seq, "sums", &format!("s{k}"), (i * 4 + k + 1) as i64, sent, Fate::Acked));
            events.push(ev(10 + k, i + 1, "latest", &format!("l{k}"), ((i + 1) * 10) as i64, sent, Fate::Acked));
        }
    }
    events
}

/// A model of a correct cluster: applies `applied` (an event listed twice is applied twice),
/// stamping each one 1 ms after it was sent, and emits one output per key per tumbling window
/// when it closes, with gap-free seqs per shard, all sealed at epoch (1, 1) and received
/// 10 ms after the window's end.
fn emit(applied: &[&Event]) -> Vec<Output> {
    #[derive(Default)]
    struct Acc {
        inputs: u64,
        sum: i64,
        latest: i64,
        first: u64,
        last: u64,
        shard: u32,
    }
    let mut windows: BTreeMap<(u64, String, String), Acc> = BTreeMap::new();
    for e in applied {
        let stamp = e.sent_ms + 1;
        let start = stamp - stamp % W;
        let acc = windows
            .entry((start, e.stream.clone(), e.key.clone()))
            .or_insert_with(|| Acc { first: stamp, ..Acc::default() });
        acc.inputs += 1;
        acc.sum += e.value;
        acc.latest = e.value;
        acc.last = stamp;
        acc.shard = e.shard;
    }
    let mut next_seq: BTreeMap<u32, u64> = BTreeMap::new();
    windows
        .into_iter()
        .map(|((start, stream, key), acc)| {
            let seq = next_seq.entry(acc.shard).or_insert(0);
            *seq += 1;
            let value = if stream == "sums" { json!(acc.sum) } else { json!(acc.latest) };
            Output {
                shard: acc.shard,
                seq: *seq,
                epoch: (1, 1),
                stream,
                key,
                value,
                inputs: acc.inputs,
                window_start: start,
                window_end: start + W,
                first_input_at: acc.first,
                last_input_at: acc.last,
                reason: "time".into(),
                received_ms: start + W + 10,
            }
        })
        .collect()
}

fn all(events: &[Event]) -> Vec<&Event> {
    events.iter().collect()
}

fn assert_only(v: &Verdict, kind: ViolationKind, count: u64) {
    assert!(!v.pass, "expected a failing verdict");
    assert_eq!(v.violation_counts, BTreeMap::from([(kind, count)]), "{:#?}", v.violations);
    // One detail per finding (a gap of several seqs is one finding), capped per kind.
    let shown = v.violations.iter().filter(|x| x.kind == kind).count() as u64;
    assert!((1..=count.min(MAX_DETAILS_PER_KIND as u64)).contains(&shown), "{shown} details for {count}");
    assert_eq!(v.violations.len() as u64, shown);
}

#[test]
fn clean_run_passes_and_redeliveries_are_harmless() {
    let events = clean_events();
    let mut outputs = emit(&all(&events));
    // A new leader redelivers the unacked suffix of shard 0, identical but for received_ms.
    let redelivered: Vec<Output> = outputs
        .iter()
        .filter(|o| o.shard == 0)
        .rev()
        .take(3)
        .map(|o| Output { received_ms: o.received_ms + 700, ..o.clone() })
        .collect();
    outputs.extend(redelivered);
    let v = check(&specs(), &events, &outputs, &[]);
    assert!(v.pass, "{:#?}", v.violations);
    assert!(v.violations.is_empty());
    let m = &v.metrics;
    assert_eq!(m.acked_events, 240);
    assert_eq!((m.ambiguous_events, m.lost_events, m.double_counted_events, m.seq_gaps), (0, 0, 0, 0));
    assert_eq!(m.redelivered_outputs, 3);
    assert_eq!(m.outputs_received, m.outputs_unique + 3);
    assert_eq!(m.inputs_emitted, 240);
    // 3 s of load, 8 keys, 1 s windows: 3 or 4 windows per key.
    assert!((24..=32).contains(&m.outputs_unique), "{}", m.outputs_unique);
    assert!(m.coalesce_ratio.is_some_and(|r| r > 7.0));
    // First send T0, last ack T0 + 2903 + 5.
    assert_eq!(m.load_duration_ms, 2_908);
    assert!((m.throughput_eps - 240.0 / 2.908).abs() < 1e-9);
    assert_eq!(m.ingest_error_rate, 0.0);
}

#[test]
fn an_acked_event_missing_from_the_outputs_is_lost() {
    let events = clean_events();
    let applied: Vec<&Event> = events.iter().filter(|e| !(e.key == "s2" && e.seq == 43)).collect();
    assert_eq!(applied.len(), events.len() - 1);
    let v = check(&specs(), &events, &emit(&applied), &[]);
    assert_only(&v, ViolationKind::LostEvents, 1);
    assert_eq!(v.metrics.lost_events, 1);
    assert!(v.violations[0].detail.contains("sums/s2"), "{}", v.violations[0].detail);
}

#[test]
fn an_acked_event_applied_twice_is_double_counted() {
    let events = clean_events();
    let mut applied = all(&events);
    applied.push(&events[17]);
    applied.push(&events[18]);
    let v = check(&specs(), &events, &emit(&applied), &[]);
    assert_only(&v, ViolationKind::DoubleCountedEvents, 2);
    assert_eq!(v.metrics.double_counted_events, 2);
}

#[test]
fn ambiguous_events_may_be_applied_at_most_once() {
    let mut events = clean_events();
    // Two ambiguous sum events and a later ambiguous latest value.
    events.push(ev(1, 1_000, "sums", "s1", 5_000, T0 + 1_234, Fate::Ambiguous));
    events.push(ev(1, 1_001, "sums", "s1", 7_000, T0 + 1_334, Fate::Ambiguous));
    events.push(ev(13, 31, "latest", "l3", 310, T0 + 2_950, Fate::Ambiguous));
    let n = events.len();

    // Not applied at all.
    let v = check(&specs(), &events, &emit(&all(&events[..n - 3])), &[]);
    assert!(v.pass, "{:#?}", v.violations);
    assert_eq!((v.metrics.ambiguous_events, v.metrics.ambiguous_applied), (3, 0));

    // All applied once: the latest key's final value is then the ambiguous one.
    let v = check(&specs(), &events, &emit(&all(&events)), &[]);
    assert!(v.pass, "{:#?}", v.violations);
    assert_eq!(v.metrics.ambiguous_applied, 3);

    // One of the two sum events applied once.
    let mut applied = all(&events[..n - 3]);
    applied.push(&events[n - 2]);
    let v = check(&specs(), &events, &emit(&applied), &[]);
    assert!(v.pass, "{:#?}", v.violations);
    assert_eq!(v.metrics.ambiguous_applied, 1);

    // One applied twice (the other not): the counts still fit A + B, but no choice of one
    // ambiguous event gives that sum.
    let mut applied = all(&events[..n - 3]);
    applied.push(&events[n - 3]);
    applied.push(&events[n - 3]);
    let v = check(&specs(), &events, &emit(&applied), &[]);
    assert_only(&v, ViolationKind::ValueMismatch, 1);

    // Both applied, one of them twice: more inputs than acked + ambiguous.
    let mut applied = all(&events[..n - 1]);
    applied.push(&events[n - 3]);
    let v = check(&specs(), &events, &emit(&applied), &[]);
    assert_only(&v, ViolationKind::DoubleCountedEvents, 1);
}

#[test]
fn duplicate_event_records_count_once_and_acked_wins() {
    let mut events = clean_events();
    let mut again = events[5].clone();
    again.fate = Fate::Ambiguous;
    again.acked_ms = None;
    events.push(again);
    let v = check(&specs(), &events, &emit(&all(&events[..events.len() - 1])), &[]);
    assert!(v.pass, "{:#?}", v.violations);
    assert_eq!((v.metrics.acked_events, v.metrics.ambiguous_events), (240, 0));

    let mut bad = events[6].clone();
    bad.value += 1;
    events.push(bad);
    let v = check(&specs(), &events, &emit(&all(&events[..events.len() - 2])), &[]);
    assert_only(&v, ViolationKind::ConflictingEvents, 1);
}

#[test]
fn a_sum_off_by_one_with_consistent_counts_is_a_value_mismatch() {
    let events = clean_events();
    let mut outputs = emit(&all(&events));
    let o = outputs.iter_mut().find(|o| o.stream == "sums").expect("a sum output");
    o.value = json!(o.value.as_i64().expect("an integer") + 1);
    let v = check(&specs(), &events, &outputs, &[]);
    assert_only(&v, ViolationKind::ValueMismatch, 1);
    assert_eq!(v.metrics.value_mismatch, 1);
}

#[test]
fn missing_seqs_are_gaps() {
    let events = clean_events();
    let mut outputs = emit(&all(&events));
    // Shard 0 skips two seqs after seq 3 (the outputs are all there, renumbered).
    for o in outputs.iter_mut().filter(|o| o.shard == 0 && o.seq > 3) {
        o.seq += 2;
    }
    let v = check(&specs(), &events, &outputs, &[]);
    assert_only(&v, ViolationKind::SeqGaps, 2);
    assert!(v.violations[0].detail.contains("shard 0: seqs 4..=5 missing"), "{}", v.violations[0].detail);
    assert_eq!(v.metrics.seq_gaps, 2);

    // A shard that starts at seq 3 misses 1 and 2.
    let mut outputs = emit(&all(&events));
    for o in outputs.iter_mut().filter(|o| o.shard == 1) {
        o.seq += 2;
    }
    assert_only(&check(&specs(), &events, &outputs, &[]), ViolationKind::SeqGaps, 2);
}

#[test]
fn epochs_may_rise_but_never_fall_along_seqs() {
    let events = clean_events();
    let mut outputs = emit(&all(&events));
    // A failover at seq 4 of shard 0: later outputs sealed by (2, 3). Fine.
    for o in outputs.iter_mut().filter(|o| o.shard == 0 && o.seq >= 4) {
        o.epoch = (2, 3);
    }
    assert!(check(&specs(), &events, &outputs, &[]).pass);
    // Seq 6 sealed by the old leader after the new one sealed 4 and 5.
    for o in outputs.iter_mut().filter(|o| o.shard == 0 && o.seq == 6) {
        o.epoch = (1, 1);
    }
    let v = check(&specs(), &events, &outputs, &[]);
    assert_only(&v, ViolationKind::EpochRegressions, 1);
    // Same term, lower node id: a different (older) leader id is a regression too.
    for o in outputs.iter_mut().filter(|o| o.shard == 0 && o.seq == 6) {
        o.epoch = (2, 1);
    }
    assert_only(&check(&specs(), &events, &outputs, &[]), ViolationKind::EpochRegressions, 1);
}

#[test]
fn copies_of_a_seq_must_be_identical() {
    let events = clean_events();
    let mut outputs = emit(&all(&events));
    let mut copy = outputs[2].clone();
    copy.received_ms += 5_000;
    copy.epoch = (2, 2);
    outputs.push(copy);
    let mut copy = outputs[3].clone();
    copy.value = json!(123_456);
    outputs.push(copy);
    let v = check(&specs(), &events, &outputs, &[]);
    assert_only(&v, ViolationKind::ConflictingDuplicates, 2);
    assert_eq!(v.metrics.redelivered_outputs, 0);
}

#[test]
fn outputs_before_their_window_allows_are_early() {
    let events = clean_events();
    let base = emit(&all(&events));

    // Within the 50 ms tolerance: fine.
    let mut outputs = base.clone();
    outputs[0].received_ms = outputs[0].window_end - EARLY_TOLERANCE_MS;
    assert!(check(&specs(), &events, &outputs, &[]).pass);

    // 100 ms early.
    let mut outputs = base.clone();
    outputs[0].received_ms = outputs[0].window_end - 100;
    let v = check(&specs(), &events, &outputs, &[]);
    assert_only(&v, ViolationKind::EarlyEmissions, 1);
    assert!(v.violations[0].detail.contains("received 100 ms before"), "{}", v.violations[0].detail);

    // A window not aligned, or shorter than the policy, or holding an input stamped after it.
    let mut outputs = base.clone();
    outputs[1].window_start += 1;
    outputs[2].window_end -= 300;
    outputs[3].last_input_at = outputs[3].window_end;
    outputs[4].first_input_at = outputs[4].window_start - 1;
    let v = check(&specs(), &events, &outputs, &[]);
    assert_only(&v, ViolationKind::EarlyEmissions, 4);
    assert_eq!(v.metrics.early_emissions, 4);

    // A data trigger may close a window early — but not before its last input.
    let mut outputs = base.clone();
    outputs[0].reason = "max_count".into();
    outputs[0].window_end = outputs[0].last_input_at;
    outputs[0].received_ms = outputs[0].last_input_at + 3;
    assert!(check(&specs(), &events, &outputs, &[]).pass);
    outputs[0].received_ms = outputs[0].last_input_at - 200;
    assert_only(&check(&specs(), &events, &outputs, &[]), ViolationKind::EarlyEmissions, 1);
}

#[test]
fn adaptive_windows_may_close_late_but_never_past_max_staleness() {
    let events = clean_events();
    let base = emit(&all(&events));
    let adaptive = vec![
        StreamSpec {
            name: "sums".into(),
            merge: Merge::Sum,
            window: Window::Adaptive { ms: W, max_staleness_ms: 3 * W },
        },
        specs()[1].clone(),
    ];
    let i = base.iter().position(|o| o.stream == "sums").unwrap();
    let stretch = |outputs: &mut Vec<Output>, end: u64| {
        outputs[i].window_end = outputs[i].window_start + end;
        outputs[i].received_ms = outputs[i].window_end + 10;
    };
    // Stretched within the bound: fine for the adaptive stream, a violation for a fixed one.
    let mut outputs = base.clone();
    stretch(&mut outputs, 2_500);
    assert!(check(&adaptive, &events, &outputs, &[]).pass);
    assert_only(&check(&specs(), &events, &outputs, &[]), ViolationKind::EarlyEmissions, 1);
    // Past max_staleness, or received before its stretched end.
    stretch(&mut outputs, 3_001);
    let v = check(&adaptive, &events, &outputs, &[]);
    assert_only(&v, ViolationKind::EarlyEmissions, 1);
    let (start, d) = (outputs[i].window_start, &v.violations[0].detail);
    assert!(d.contains(&format!("({}..={})", start + W, start + 3 * W)), "{d}");
    stretch(&mut outputs, 2_500);
    outputs[i].received_ms = outputs[i].window_start + 2_000;
    assert_only(&check(&adaptive, &events, &outputs, &[]), ViolationKind::EarlyEmissions, 1);
    // Never shorter than the configured window.
    stretch(&mut outputs, W - 100);
    assert_only(&check(&adaptive, &events, &outputs, &[]), ViolationKind::EarlyEmissions, 1);
}

#[test]
fn two_time_closed_outputs_of_one_window_are_duplicates() {
    let events = clean_events();
    let mut outputs = emit(&all(&events));
    // Split one window's output in two (same inputs in total, next free seq on its shard).
    let i = outputs.iter().position(|o| o.stream == "sums" && o.inputs >= 2).expect("a window of 2+");
    let shard = outputs[i].shard;
    let max_seq = outputs.iter().filter(|o| o.shard == shard).map(|o| o.seq).max().expect("outputs");
    let mut second = outputs[i].clone();
    second.seq = max_seq + 1;
    second.inputs = 1;
    second.value = json!(0);
    outputs[i].inputs -= 1;
    outputs.push(second);
    let v = check(&specs(), &events, &outputs, &[]);
    assert_eq!(v.count(ViolationKind::DuplicateWindows), 1, "{:#?}", v.violations);
}

#[test]
fn latest_values_never_sent_are_invented() {
    let events = clean_events();
    let mut outputs = emit(&all(&events));
    let o = outputs.iter_mut().find(|o| o.stream == "latest").expect("a latest output");
    o.value = json!(15); // sent values are multiples of 10
    let v = check(&specs(), &events, &outputs, &[]);
    assert_only(&v, ViolationKind::InventedValues, 1);
    assert_eq!(v.metrics.invented_values, 1);
}

#[test]
fn the_final_latest_value_is_the_last_acked_one() {
    let events = clean_events();
    let mut outputs = emit(&all(&events));
    // The final output of l1 carries an older value that was sent.
    let last = outputs.iter_mut().filter(|o| o.key == "l1").max_by_key(|o| o.seq).expect("outputs of l1");
    assert_eq!(last.value, json!(300));
    last.value = json!(290);
    let v = check(&specs(), &events, &outputs, &[]);
    assert_only(&v, ViolationKind::LatestMismatch, 1);
    assert!(v.violations[0].detail.contains("final value 290, last acked 300"), "{}", v.violations[0].detail);

    // A later ambiguous value may win; an earlier ambiguous one may not.
    let mut events = clean_events();
    events.push(ev(11, 31, "latest", "l1", 310, T0 + 2_990, Fate::Ambiguous));
    events.push(ev(11, 32, "latest", "l1", 320, T0 + 2_991, Fate::Ambiguous));
    let mut outputs = emit(&all(&events[..events.len() - 1]));
    assert!(check(&specs(), &events, &outputs, &[]).pass);
    let last = outputs.iter_mut().filter(|o| o.key == "l1").max_by_key(|o| o.seq).expect("outputs of l1");
    last.value = json!(320);
    assert!(check(&specs(), &events, &outputs, &[]).pass);
}

#[test]
fn routing_and_parsing_violations() {
    let events = clean_events();
    let mut outputs = emit(&all(&events));
    // An output of an undeclared stream, one on the wrong shard, one with a non-integer value.
    let next_seq = |outputs: &[Output], shard: u32| {
        outputs.iter().filter(|o| o.shard == shard).map(|o| o.seq).max().unwrap_or(0) + 1
    };
    let mut stray = outputs[0].clone();
    stray.stream = "nope".into();
    stray.seq = next_seq(&outputs, stray.shard);
    outputs.push(stray);
    let i = outputs.iter().position(|o| o.key == "s0").expect("s0");
    let other = 1 - outputs[i].shard;
    let mut moved = outputs.remove(i);
    // Keep the original shard gap-free by giving its seq to a placeholder of another stream.
    let hole = Output { stream: "nope".into(), ..moved.clone() };
    outputs.push(hole);
    moved.shard = other;
    moved.seq = next_seq(&outputs, other);
    outputs.push(moved);
    let j = outputs.iter().position(|o| o.key == "s3").expect("s3");
    outputs[j].value = json!("lots");
    let v = check(&specs(), &events, &outputs, &[]);
    assert_eq!(v.count(ViolationKind::UnknownStream), 2, "{:#?}", v.violations);
    assert_eq!(v.count(ViolationKind::WrongShard), 1, "{:#?}", v.violations);
    assert_eq!(v.count(ViolationKind::UnparseableValue), 1, "{:#?}", v.violations);
    assert_eq!(v.count(ViolationKind::SeqGaps), 0, "{:#?}", v.violations);
    assert!(!v.pass);
    // Integral floats are integers.
    assert_eq!(as_int(&json!(12.0)), Some(12));
    assert_eq!(as_int(&json!(12.5)), None);
}

#[test]
fn details_are_capped_but_counts_are_exact() {
    let events: Vec<Event> = (0..30).map(|k| ev(1, k + 1, "sums", &format!("k{k}"), 1, T0 + k, Fate::Acked)).collect();
    let v = check(&specs(), &events, &[], &[]);
    assert_eq!(v.count(ViolationKind::LostEvents), 30);
    assert_eq!(v.violations.len(), MAX_DETAILS_PER_KIND);
    assert_eq!(v.metrics.lost_events, 30);
}

#[test]
fn fencing_rows_in_order_pass() {
    // Shard 0: leader (1,1) seals 1..=3, leader (2,2) seals 4..=5; shard 1 at its own epochs.
    let rows: Vec<SinkRow> = vec![
        (0, 1, (1, 1)),
        (0, 2, (1, 1)),
        (1, 1, (5, 2)),
        (0, 3, (1, 1)),
        (0, 4, (2, 2)),
        (0, 5, (2, 2)),
        (1, 2, (5, 2)),
    ];
    assert_eq!(check_fencing(&rows), FencingCheck::default());
    assert_eq!(check_fencing(&[]), FencingCheck::default());
}

#[test]
fn fencing_rows_from_a_stale_leader_are_caught() {
    // Acceptance order: the new leader's seq 4 is accepted, then the old leader's seq 5.
    let rows: Vec<SinkRow> = vec![(0, 3, (1, 1)), (0, 4, (2, 2)), (0, 5, (1, 1)), (0, 6, (2, 2))];
    assert_eq!(check_fencing(&rows).stale, vec![2]);

    // Accepted after a newer epoch even at a lower seq (a fence that let an old leader back in).
    let rows: Vec<SinkRow> = vec![(0, 7, (2, 2)), (0, 5, (1, 1))];
    assert_eq!(check_fencing(&rows).stale, vec![1]);

    // An upsert-by-seq table read back in seq order: seq 5 was rewritten by the old leader.
    let rows: Vec<SinkRow> = vec![(0, 3, (1, 1)), (0, 4, (2, 2)), (0, 5, (1, 1))];
    assert_eq!(check_fencing(&rows).stale, vec![2]);

    // Different shards never compare.
    let rows: Vec<SinkRow> = vec![(0, 1, (9, 1)), (1, 1, (1, 1)), (1, 2, (1, 1))];
    assert_eq!(check_fencing(&rows), FencingCheck::default());
}

#[test]
fn fencing_redelivery_by_a_newer_leader_is_a_duplicate_not_stale() {
    let rows: Vec<SinkRow> = vec![(0, 1, (1, 1)), (0, 2, (1, 1)), (0, 2, (2, 3)), (0, 3, (2, 3))];
    assert_eq!(check_fencing(&rows), FencingCheck { stale: vec![], duplicates: vec![2] });
    // The same seq from an older leader after a newer one: stale and a duplicate.
    let rows: Vec<SinkRow> = vec![(0, 2, (2, 3)), (0, 2, (1, 1))];
    assert_eq!(check_fencing(&rows), FencingCheck { stale: vec![1], duplicates: vec![1] });
}

#[test]
fn check_run_reports_stale_epochs_and_error_rate() {
    let events = clean_events();
    let outputs = emit(&all(&events));
    let rows: Vec<SinkRow> = vec![(0, 1, (1, 1)), (0, 2, (3, 1)), (0, 3, (2, 2)), (0, 4, (2, 2))];
    let v = check_run(&CheckInput {
        streams: &specs(),
        events: &events,
        outputs: &outputs,
        faults: &[],
        ingest_errors: 60,
        fenced_rows: &rows,
    });
    assert_only(&v, ViolationKind::StaleEpochAccepted, 2);
    assert_eq!(v.metrics.stale_epoch_accepted, 2);
    assert_eq!(v.metrics.fenced_rows, 4);
    assert!((v.metrics.ingest_error_rate - 60.0 / 300.0).abs() < 1e-12);
}

#[test]
fn failover_and_first_emission_are_timed_per_fault() {
    let t = T0 + 10_000;
    let at = |shard: u32, sent: u64, acked: u64, seq: u64| Event {
        producer: 7,
        seq,
        stream: "sums".into(),
        key: format!("x{shard}"),
        value: 1,
        shard,
        sent_ms: sent,
        fate: Fate::Acked,
        acked_ms: Some(acked),
    };
    let events = vec![
        at(0, t - 10, t + 1, 1),    // in flight at the kill: ignored
        at(0, t + 100, t + 900, 2), // first acked write sent after the kill
        at(0, t + 200, t + 850, 3), // … or this one, acked earlier
        at(1, t + 50, t + 60, 4),   // another shard
        at(0, t - 500, t - 490, 5), // before
    ];
    let out = |shard: u32, seq: u64, epoch: Epoch, received: u64| Output {
        shard,
        seq,
        epoch,
        stream: "sums".into(),
        key: format!("x{shard}"),
        value: json!(1),
        inputs: 1,
        window_start: 0,
        window_end: 0,
        first_input_at: 0,
        last_input_at: 0,
        reason: "time".into(),
        received_ms: received,
    };
    let outputs = vec![
        out(0, 1, (1, 1), t - 300),
        out(0, 2, (1, 1), t + 400), // the old leader's, delivered late
        out(0, 3, (2, 2), t + 1_500),
        out(0, 4, (2, 2), t + 1_200), // redelivery order does not matter: earliest wins
        out(1, 1, (4, 1), t - 100),
        out(1, 2, (5, 3), t + 2_000),
    ];
    let fault = |id, kind, shard, old_epoch| Fault {
        id,
        kind,
        shard,
        node: Some("coalesce-0".into()),
        old_epoch,
        injected_ms: t,
        healed_ms: Some(t + 5_000),
    };
    let faults = vec![
        fault(1, FaultKind::KillLeader, Some(0), Some((1, 1))),
        fault(2, FaultKind::KillLeader, Some(0), None),
        fault(3, FaultKind::KillAll, None, None),
        fault(4, FaultKind::PauseLeader, Some(2), Some((1, 1))),
        fault(5, FaultKind::PartitionLeader, Some(0), Some((2, 2))),
    ];
    let timings: Vec<(Option<u64>, Option<u64>)> = faults
        .iter()
        .map(|f| {
            let ft = fault_timing(f, &dedupe_for_test(&events), &outputs.iter().collect::<Vec<_>>());
            (ft.failover_ms, ft.first_emission_ms)
        })
        .collect();
    assert_eq!(
        timings,
        vec![
            (Some(850), Some(1_200)), // old epoch given
            (Some(850), Some(1_200)), // old epoch from shard 0's outputs before the kill: (1, 1)
            (Some(60), Some(1_200)),  // any shard: shard 1's ack at +60; shard 0 emits first
            (None, None),             // shard 2 saw nothing
            (Some(850), None),        // no output above (2, 2) on shard 0
        ]
    );

    // Through check(): quantiles over the observed ones.
    let streams = vec![StreamSpec { name: "sums".into(), merge: Merge::Sum, window: Window::Tumbling { ms: W } }];
    let v = check(&streams, &events, &outputs, &faults);
    assert_eq!(v.faults.len(), 5);
    assert_eq!(v.faults[2].failover_ms, Some(60));
    assert_eq!(v.metrics.failover_ms, Quantiles { count: 4, p50: Some(850), p99: Some(850), max: Some(850) });
    assert_eq!(v.metrics.first_emission_ms.count, 3);

    // A slow disk is timed per fault but is not a failover: the quantiles leave it out.
    let mut with_slow_disk = faults.clone();
    with_slow_disk.push(fault(6, FaultKind::SlowDisk, Some(1), Some((4, 1))));
    let v = check(&streams, &events, &outputs, &with_slow_disk);
    assert_eq!(v.faults[5].failover_ms, Some(60), "timed like the others");
    assert_eq!(v.metrics.failover_ms.count, 4);
    assert_eq!(v.metrics.first_emission_ms.count, 3);
}

fn dedupe_for_test(events: &[Event]) -> Vec<Unique<'_>> {
    events.iter().map(|e| Unique { event: e, fate: e.fate, acked_ms: e.acked_ms }).collect()
}

#[test]
fn quantiles_use_nearest_rank() {
    let v: Vec<u64> = (1..=100).collect();
    assert_eq!(Quantiles::of(&v), Quantiles { count: 100, p50: Some(50), p99: Some(99), max: Some(100) });
    assert_eq!(Quantiles::of(&[7]), Quantiles { count: 1, p50: Some(7), p99: Some(7), max: Some(7) });
    assert_eq!(Quantiles::of(&[]), Quantiles::default());
    assert_eq!(Quantiles::of(&[30, 10, 20]).p50, Some(20));
}

#[test]
fn verdict_serializes_with_snake_case_kinds() {
    let v = check(&specs(), &[ev(1, 1, "sums", "a", 1, T0, Fate::Acked)], &[], &[]);
    let json = serde_json::to_value(&v).expect("serializes");
    assert_eq!(json["violation_counts"]["lost_events"], json!(1));
    assert_eq!(json["violations"][0]["kind"], json!("lost_events"));
    let back: Verdict = serde_json::from_value(json).expect("parses back");
    assert_eq!(back, v);
}
