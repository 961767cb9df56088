//! Writes the report of a synthetic run (no cluster involved) into a directory, to see what a
//! game-day report looks like: `cargo run -p coalesce-chaos --example synthetic_report -- DIR`.
//!
//! The "cluster" here is a model: 4 shards, one sum key per shard written every 5 ms for 60 s,
//! 1 s tumbling windows; each fault stalls acks (and emissions) on the shards it hits for a
//! while, and the stalled events are acknowledged when the new leader takes over.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use coalesce_chaos::{
    CheckInput, Event, Fate, Fault, FaultKind, Merge, Output, RunMeta, StreamSpec, Window, check_run,
    samples_from_events, summary_line, write_report,
};

const T0: u64 = 1_700_000_000_000;
const SHARDS: u32 = 4;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).context("usage: synthetic_report DIR")?);
    // (kind, shard, injected at s, stall ms, healed after ms)
    let plan = [
        (FaultKind::KillLeader, Some(1), 10, 900, 5_000),
        (FaultKind::PauseLeader, Some(2), 22, 1_400, 3_000),
        (FaultKind::PartitionLeader, Some(0), 33, 1_100, 4_000),
        (FaultKind::KillAll, None, 45, 2_600, 2_500),
    ];
    let faults: Vec<Fault> = plan
        .iter()
        .enumerate()
        .map(|(i, &(kind, shard, at_s, _, heal))| Fault {
            id: i as u32 + 1,
            kind,
            shard,
            node: Some(format!("coalesce-{}", i % 3)),
            old_epoch: shard.map(|_| (1, 1)),
            injected_ms: T0 + at_s * 1_000,
            healed_ms: Some(T0 + at_s * 1_000 + heal),
        })
        .collect();
    let stalled_until = |shard: u32, sent: u64| {
        plan.iter().zip(&faults).find_map(|(&(_, s, _, stall, _), f)| {
            let hit = s.is_none_or(|s| s == shard);
            (hit && (f.injected_ms..f.injected_ms + stall).contains(&sent)).then_some(f.injected_ms + stall)
        })
    };

    let mut events = Vec::new();
    let mut errors = Vec::new();
    for i in 0..12_000u64 {
        let sent = T0 + i * 5;
        let shard = (i % u64::from(SHARDS)) as u32;
        let (fate, acked) = match stalled_until(shard, sent) {
            // One in 20 stalled requests times out (ambiguous, never applied here); one in 10
            // is refused.
            Some(_) if i % 20 == 0 => (Fate::Ambiguous, None),
            Some(_) if i % 10 == 1 => {
                errors.push(sent + 200);
                continue;
            }
            Some(until) => (Fate::Acked, Some(until + 3 + i % 7)),
            None => (Fate::Acked, Some(sent + 2 + (i * 7919) % 9)),
        };
        events.push(Event {
            producer: 1,
            seq: i + 1,
            stream: "sums".into(),
            key: format!("key-{shard}"),
            value: 1 + (i % 5) as i64,
            shard,
            sent_ms: sent,
            fate,
            acked_ms: acked,
        });
    }

    // One output per key per window, sealed at epoch (2, 2) after a fault on its shard.
    let mut windows: BTreeMap<(u64, u32), (u64, i64, u64, u64)> = BTreeMap::new();
    for e in events.iter().filter(|e| e.fate == Fate::Acked) {
        let stamp = e.acked_ms.unwrap_or(e.sent_ms) - 1;
        let w = windows.entry((stamp - stamp % 1_000, e.shard)).or_insert((0, 0, stamp, stamp));
        w.0 += 1;
        w.1 += e.value;
        w.2 = w.2.min(stamp);
        w.3 = w.3.max(stamp);
    }
    let mut seqs = [0u64; SHARDS as usize];
    let outputs: Vec<Output> = windows
        .into_iter()
        .map(|((start, shard), (inputs, sum, first, last))| {
            seqs[shard as usize] += 1;
            let failed_over =
                faults.iter().any(|f| f.shard.is_none_or(|s| s == shard) && f.injected_ms < start + 1_000);
            let delay = stalled_until(shard, start + 1_000).map_or(6, |until| until - start - 1_000 + 40);
            Output {
                shard,
                seq: seqs[shard as usize],
                epoch: if failed_over { (2, 2) } else { (1, 1) },
                stream: "sums".into(),
                key: format!("key-{shard}"),
                value: sum.into(),
                inputs,
                window_start: start,
                window_end: start + 1_000,
                first_input_at: first,
                last_input_at: last,
                reason: "time".into(),
                received_ms: start + 1_000 + delay,
            }
        })
        .collect();

    let streams = [StreamSpec { name: "sums".into(), merge: Merge::Sum, window: Window::Tumbling { ms: 1_000 } }];
    let verdict = check_run(&CheckInput {
        streams: &streams,
        events: &events,
        outputs: &outputs,
        faults: &faults,
        ingest_errors: errors.len() as u64,
        fenced_rows: &[],
    });
    let samples = samples_from_events(&events, &errors, 1_000);
    let meta = RunMeta {
        scenario: "synthetic".into(),
        seed: 7,
        started_ms: T0,
        duration_ms: 60_000,
        nodes: 3,
        shards: SHARDS,
        backend: "model".into(),
        command: format!("cargo run -p coalesce-chaos --example synthetic_report -- {}", dir.display()),
    };
    write_report(&dir, &meta, &verdict, &samples, &faults)?;
    println!("{}", summary_line(&meta, &verdict));
    Ok(())
}
