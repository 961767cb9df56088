//! Applying committed entries several per RocksDB write must give exactly the state and the
//! responses of applying them one by one (replicas see different batch boundaries, and must
//! still hold byte-identical state). Random logs of ingests with producer sessions (including
//! retries), seals, session sweeps, acks that trim what the same batch emitted, and
//! dead-letter moves and removals.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use coalesce_core::batch::{BatchBuilder, Event};
use coalesce_core::merge::Aggregate;
use coalesce_core::output::{DeadLetter, Output};
use coalesce_core::stream::StreamsFile;
use coalesce_core::value::Value;
use coalesce_core::window::SealReason;
use coalesce_raft::codec::{Entry, log_id};
use coalesce_raft::{Command, IngestGroup, Response, ShardStateMachine};
use coalesce_storage::{NodeDb, ShardStore, StorageOptions};
use openraft::EntryPayload;
use proptest::prelude::*;

const STREAMS: &str = r#"
[streams.sums]
merge = "sum_i64"
window = { tumbling = "100ms" }

[streams.last]
merge = "latest"
window = { debounce = "30ms", max_wait = "200ms" }
"#;

#[derive(Debug, Clone)]
enum Op {
    /// (producer, first seq, events (stream index, key, value))
    Ingest(u64, u64, Vec<(usize, u8, i64)>),
    Seal,
    Ack(u8, u64),
    /// (cursor, upto, seqs refused)
    Dead(u8, u64, Vec<u64>),
    /// (sink, seqs)
    DlqRemove(u8, Vec<u64>),
    /// Leader time moves on by this many ms.
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..3, 1u64..6, prop::collection::vec((0usize..2, 0u8..6, -5i64..5), 1..6))
            .prop_map(|(p, s, e)| Op::Ingest(p, s, e)),
        2 => Just(Op::Seal),
        1 => (0u8..2, 0u64..12).prop_map(|(c, s)| Op::Ack(c, s)),
        1 => (0u8..2, 0u64..12, prop::collection::vec(0u64..12, 0..3)).prop_map(|(c, u, s)| Op::Dead(c, u, s)),
        1 => (0u8..2, prop::collection::vec(0u64..12, 0..3)).prop_map(|(c, s)| Op::DlqRemove(c, s)),
        2 => prop_oneof![1u64..80, 20_000u64..40_000].prop_map(Op::Advance),
    ]
}

/// A dead letter of sink `c{c}` for output `seq` (its content does not matter here).
fn letter(c: u8, seq: u64, now: u64) -> DeadLetter {
    let output = Output {
        stream: "sums".into(),
        key: format!("k{seq}"),
        shard: 3,
        seq,
        epoch: Default::default(),
        window_start: now,
        window_end: now,
        first_input_at: now,
        last_input_at: now,
        first_event_at: now,
        last_event_at: now,
        inputs: 1,
        reason: SealReason::Time,
        value: Aggregate::SumI64(seq as i64),
        samples: None,
    };
    DeadLetter { sink: format!("c{c}"), output, reason: "HTTP 400".into(), failed_at: now, attempts: 1 }
}

/// Turns ops into log entries (index from 1).
fn entries(ops: &[Op]) -> Vec<Entry> {
    let table = StreamsFile::parse(STREAMS).and_then(|f| f.validate(&[])).unwrap();
    let rules: BTreeMap<_, _> = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
    let mut now = 1_000u64;
    let mut out = Vec::new();
    for op in ops {
        let cmd = match op {
            Op::Advance(ms) => {
                now += ms;
                continue;
            }
            Op::Ingest(producer, first, events) => {
                let mut b = BatchBuilder::new(&table, 1, now);
                for (i, (stream, key, v)) in events.iter().enumerate() {
                    let producer = (*producer > 0).then_some((*producer, first + i as u64));
                    b.add(&Event {
                        stream: ["sums", "last"][*stream].into(),
                        key: format!("k{key}"),
                        value: Value::Int(*v),
                        event_time: None,
                        producer,
                    })
                    .unwrap();
                }
                let groups = b.finish().into_values().flat_map(|b| b.groups).map(IngestGroup::from).collect();
                Command::Ingest { stamp: now, rules: rules.clone(), limits: table.limits(), groups }
            }
            Op::Seal => Command::Seal { stamp: now, max: 3, session_ttl_ms: 10_000 },
            Op::Ack(c, upto) => Command::Ack { cursor: format!("c{c}"), upto_seq: *upto },
            Op::Dead(c, upto, seqs) => Command::DeadLetter {
                cursor: format!("c{c}"),
                upto_seq: *upto,
                letters: seqs.iter().map(|seq| letter(*c, *seq, now)).collect(),
            },
            Op::DlqRemove(c, seqs) => Command::DlqRemove { sink: format!("c{c}"), seqs: seqs.clone() },
        };
        out.push(Entry { log_id: log_id(1, 1, out.len() as u64 + 1), payload: EntryPayload::Normal(cmd) });
    }
    out
}

/// Applies `entries` in chunks of the given sizes (cycled); returns the state and responses.
fn apply_in_chunks(entries: &[Entry], chunks: &[usize]) -> (Vec<u8>, Vec<Response>) {
    let dir = tempfile::tempdir().unwrap();
    let db = NodeDb::open(dir.path(), &StorageOptions::default()).unwrap();
    let store = ShardStore::new(db, 3);
    let mut sm = ShardStateMachine::open(store.clone()).unwrap();
    let mut responses = Vec::new();
    let mut at = 0;
    for size in chunks.iter().cycle() {
        if at >= entries.len() {
            break;
        }
        let chunk = &entries[at..(at + size).min(entries.len())];
        at += chunk.len();
        responses.extend(sm.apply_entries(chunk.to_vec()).unwrap());
    }
    (common::state_bytes(&store), responses)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn batched_apply_equals_one_by_one(ops in prop::collection::vec(op(), 1..80), chunks in prop::collection::vec(1usize..100, 1..4)) {
        let entries = entries(&ops);
        let (one_state, one_resp) = apply_in_chunks(&entries, &[1]);
        let (batched_state, batched_resp) = apply_in_chunks(&entries, &chunks);
        prop_assert_eq!(format!("{one_resp:?}"), format!("{batched_resp:?}"));
        prop_assert!(one_state == batched_state, "state differs with chunks {:?}", chunks);
    }
}
