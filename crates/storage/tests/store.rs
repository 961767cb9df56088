//! The RocksDB store against the in-memory model, the log operations, group commit, snapshots
//! and restarts.

mod common;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

use coalesce_core::batch::Partial;
use coalesce_core::buffer::{BufKey, BufferStore, IngestBatch, MemStore, ShardBuffer};
use coalesce_core::merge::{Aggregate, MergeOp};
use coalesce_core::output::Output;
use coalesce_core::stream::{KeyOverflow, OverflowPolicy, ShardLimits, StreamRules};
use coalesce_core::window::WindowPolicy;
use coalesce_storage::keys::RaftMetaTag;
use coalesce_storage::{NodeDb, ShardStore, StorageOptions};

use common::open;

#[test]
fn log_append_range_truncate_purge() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let a = ShardStore::new(db.clone(), 1);
    let b = ShardStore::new(db.clone(), 2);
    let (tx, rx) = mpsc::channel();
    for i in 0..10u64 {
        let tx = tx.clone();
        a.log_append([(i, vec![i as u8; 3])], Box::new(move |r| tx.send((i, r.is_ok())).unwrap())).unwrap();
    }
    b.log_append([(0, vec![42])], Box::new(|r| assert!(r.is_ok()))).unwrap();
    let mut durable: Vec<_> = (0..10).map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
    durable.sort();
    assert_eq!(durable, (0..10).map(|i| (i, true)).collect::<Vec<_>>(), "every append is reported durable");
    assert!(db.flusher().stats().syncs.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    assert_eq!(a.log_range(3, 6, usize::MAX).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(a.log_range(3, 100, 4).unwrap().len(), 2, "stops once max_bytes is exceeded");
    assert_eq!(a.log_last().unwrap().map(|e| e.0), Some(9));
    assert_eq!(b.log_last().unwrap(), Some((0, vec![42])), "shards do not see each other's rows");

    a.log_truncate_from(7).unwrap();
    assert_eq!(a.log_last().unwrap().map(|e| e.0), Some(6));
    a.log_purge_upto(4, b"marker").unwrap();
    assert_eq!(a.log_range(0, 100, usize::MAX).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), [5, 6]);
    assert_eq!(a.raft_meta_get(RaftMetaTag::Purged).unwrap().as_deref(), Some(&b"marker"[..]));
    a.log_purge_upto(6, b"all").unwrap();
    assert_eq!(a.log_last().unwrap(), None);
    assert_eq!(b.log_last().unwrap(), Some((0, vec![42])));
}

fn rules(overflow: OverflowPolicy) -> BTreeMap<String, StreamRules> {
    let window =
        WindowPolicy { debounce_ms: Some(30), max_wait_ms: Some(200), max_count: Some(9), ..Default::default() };
    BTreeMap::from([(
        "s".to_owned(),
        StreamRules { op: MergeOp::SumI64, window, overflow, samples: None, key_overflow: KeyOverflow::FlushEarly },
    )])
}

/// A deterministic pseudo-random workload of ingests and seals.
/// (stamp, None = seal | Some(partials as (key, value)))
type Op = (u64, Option<Vec<(u8, i64)>>);

fn workload(seed: u64, n: usize) -> Vec<Op> {
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut t = 1_000;
    (0..n)
        .map(|_| {
            t += next() % 20;
            if next() % 4 == 0 {
                (t, None)
            } else {
                let parts = (0..1 + next() % 5).map(|_| ((next() % 50) as u8, (next() % 100) as i64)).collect();
                (t, Some(parts))
            }
        })
        .collect()
}

fn run<S: BufferStore>(
    store: &mut S,
    op: &(u64, Option<Vec<(u8, i64)>>),
    rules: &BTreeMap<String, StreamRules>,
) -> Vec<Output>
where
    S::Error: std::fmt::Debug,
{
    let limits = ShardLimits { max_keys: 30, max_bytes: 1 << 20 };
    match op {
        (t, None) => ShardBuffer::seal_due(store, *t, 7).expect("seal"),
        (t, Some(parts)) => {
            let partials = parts
                .iter()
                .map(|(k, v)| {
                    (
                        BufKey { stream: "s".into(), key: format!("k{k}") },
                        Partial {
                            agg: Aggregate::SumI64(*v),
                            inputs: 1,
                            first_event_at: *t,
                            last_event_at: *t,
                            samples: None,
                        },
                    )
                })
                .collect();
            ShardBuffer::apply_ingest(store, &IngestBatch { stamp: *t, rules: rules.clone(), limits, partials })
                .expect("apply")
                .outputs
        }
    }
}

#[test]
fn rocksdb_store_behaves_exactly_like_the_model() {
    for (seed, overflow) in [(1, OverflowPolicy::FlushEarly), (2, OverflowPolicy::Shed), (3, OverflowPolicy::Reject)] {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let shard = ShardStore::new(db.clone(), 5);
        let rules = rules(overflow);
        let mut model = MemStore::default();
        for (i, op) in workload(seed, 3_000).iter().enumerate() {
            let expect = run(&mut model, op, &rules);
            // Commit every op except a few, which share a batch with the next one, to exercise
            // reads through the overlay.
            let mut batch = shard.apply_batch();
            let got = run(&mut batch, op, &rules);
            assert_eq!(got, expect, "seed {seed} op {i}");
            batch.commit().unwrap();
        }
        assert_eq!(shard.stats().unwrap(), model.stats, "seed {seed}");
        // Everything that is buffered is indexed and due at the same times as in the model.
        let mut batch = shard.apply_batch();
        let due = batch.due(u64::MAX, usize::MAX).unwrap();
        assert_eq!(due, model.index.iter().cloned().collect::<Vec<_>>());
        for (_, key) in &due {
            assert_eq!(batch.get(key).unwrap().as_ref(), model.buffers.get(key), "seed {seed} key {key:?}");
        }
    }
}

/// The in-memory buffer cache is transparent: a store whose cache was warmed by applies and
/// reads answers exactly as a cold one over the same database, and a snapshot install replaces
/// what the cache held (no stale row survives it).
#[test]
fn the_buffer_cache_never_serves_a_stale_row() {
    let keys: Vec<BufKey> = (0..50).map(|k| BufKey { stream: "s".into(), key: format!("k{k}") }).collect();
    let rows = |shard: &ShardStore| keys.iter().map(|k| shard.apply_batch().get(k).unwrap()).collect::<Vec<_>>();
    let rules = rules(OverflowPolicy::FlushEarly);

    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let warm = ShardStore::new(db.clone(), 2);
    for op in workload(11, 2_000) {
        let mut batch = warm.apply_batch();
        run(&mut batch, &op, &rules);
        batch.commit().unwrap();
        // A batch that is dropped without commit leaves nothing behind in the cache.
        let mut aborted = warm.apply_batch();
        run(&mut aborted, &(op.0 + 1, Some(vec![(1, 1_000)])), &rules);
    }
    let cold = ShardStore::new(db.clone(), 2);
    assert_eq!(rows(&warm), rows(&cold));

    // Another node's state replaces this one's, cached rows included.
    let other_dir = tempfile::tempdir().unwrap();
    let other = ShardStore::new(open(other_dir.path()), 2);
    for op in workload(12, 700) {
        let mut batch = other.apply_batch();
        run(&mut batch, &op, &rules);
        batch.commit().unwrap();
    }
    let before = rows(&other);
    assert_ne!(before, rows(&warm), "the two workloads leave different states");
    common::import(&other, &common::state_bytes(&warm));
    assert_eq!(rows(&other), rows(&warm));
}

/// One op of [`workload`] applied the way the state machine does: outputs enter the outbox at
/// the next seqs, every fifth op acknowledges (trims) what is older than 20 outputs, and the
/// producer session of the op is updated. Returns the outputs.
fn apply_op(batch: &mut coalesce_storage::ApplyBatch<'_>, op: &Op, next_seq: &mut u64, i: usize) -> Vec<Output> {
    let rules = rules(OverflowPolicy::FlushEarly);
    let mut outputs = run(batch, op, &rules);
    for o in &mut outputs {
        o.seq = *next_seq;
        *next_seq += 1;
        batch.outbox_put(o).expect("outbox put");
    }
    if i.is_multiple_of(5) && *next_seq > 21 {
        batch.outbox_trim(1, *next_seq - 20);
    }
    let producer = (i % 7) as u64;
    let last_seq = batch.session_get(producer).expect("session").map_or(0, |s| s.last_seq) + 1;
    batch.session_put(producer, &session(last_seq, op.0)).expect("session put");
    if i.is_multiple_of(97) {
        batch.session_delete((i % 7 + 1) as u64 % 7);
    }
    outputs
}

/// Applies op `i` to `through` write-through and to `behind` staged (write-behind): both emit
/// the same outputs and report the same stats.
fn apply_both(through: &ShardStore, behind: &ShardStore, op: &Op, seqs: (&mut u64, &mut u64), i: usize, seed: u64) {
    let mut a = through.apply_batch();
    let expect = apply_op(&mut a, op, seqs.0, i);
    a.commit().expect("commit");
    let mut b = behind.apply_batch();
    assert_eq!(apply_op(&mut b, op, seqs.1, i), expect, "seed {seed} op {i}");
    assert!(!b.stage().expect("stage").urgent);
    assert_eq!(behind.stats().expect("stats"), through.stats().expect("stats"), "seed {seed} op {i}");
}

/// The recent outbox and the producer sessions read the same from both stores.
fn same_outbox_and_sessions(through: &ShardStore, behind: &ShardStore, next_seq: u64, i: usize, seed: u64) {
    let from = next_seq.saturating_sub(30);
    let outbox = |s: &ShardStore| s.outbox_from(from, 25).expect("outbox");
    assert_eq!(outbox(behind), outbox(through), "seed {seed} op {i}");
    assert_eq!(behind.sessions().expect("sessions"), through.sessions().expect("sessions"), "seed {seed} op {i}");
}

fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Write-behind: staging batches and checkpointing at random points answers every read exactly
/// as committing each batch does (buffer rows, due keys, outbox, sessions, stats), leaves
/// byte-identical rows once checkpointed, and a store reopened without its pending state holds
/// the last checkpoint — from which re-applying the same ops (the Raft log's replay) converges.
#[test]
fn staged_batches_checkpointed_at_random_points_match_write_through() {
    for seed in [21u64, 22, 23] {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let through = ShardStore::new(db.clone(), 1);
        let mut behind = ShardStore::new(db.clone(), 2);
        let ops = workload(seed, 2_000);
        let mut rand = xorshift(seed * 7919);
        let (mut seq_a, mut seq_b) = (1, 1);
        // (op index after the last checkpoint, its next seq, the write-through export then)
        let mut last_checkpoint = (0, 1, common::state_bytes(&through));
        let crash_at = 800 + (rand() % 800) as usize;
        let mut i = 0;
        while i < ops.len() {
            apply_both(&through, &behind, &ops[i], (&mut seq_a, &mut seq_b), i, seed);
            i += 1;
            if i % 7 == 0 {
                same_outbox_and_sessions(&through, &behind, seq_a, i, seed);
            }
            if rand().is_multiple_of(25) {
                behind.checkpoint().unwrap();
                last_checkpoint = (i, seq_b, common::state_bytes(&through));
            }
            if i == crash_at {
                // The process dies: the pending state is gone, RocksDB holds the last checkpoint.
                behind = ShardStore::new(db.clone(), 2);
                assert_eq!(common::state_bytes(&behind), last_checkpoint.2, "seed {seed}");
                // Replay from there.
                (i, seq_b) = (last_checkpoint.0, last_checkpoint.1);
                seq_a = seq_b;
                common::import(&through, &last_checkpoint.2);
            }
        }
        let mut a = through.apply_batch();
        let mut b = behind.apply_batch();
        assert_eq!(b.due(u64::MAX, usize::MAX).unwrap(), a.due(u64::MAX, usize::MAX).unwrap(), "seed {seed}");
        assert_eq!(
            common::state_bytes(&behind),
            common::state_bytes(&through),
            "seed {seed}: byte-identical rows once checkpointed"
        );
    }
}

/// Background checkpoints: while a checkpoint is in flight (handed its effects, not yet
/// written) or failed, every read answers as write-through does, applying goes on into a new
/// pending state, and what lands is exactly the state when the checkpoint began — also when a
/// write is abandoned and retried, and across a crash with a checkpoint still in flight.
#[test]
fn checkpoints_in_flight_or_failed_answer_reads_like_write_through() {
    let keys: Vec<BufKey> = (0..50).map(|k| BufKey { stream: "s".into(), key: format!("k{k}") }).collect();
    let rows = |shard: &ShardStore| keys.iter().map(|k| shard.apply_batch().get(k).unwrap()).collect::<Vec<_>>();
    for seed in [31u64, 32, 33] {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let through = ShardStore::new(db.clone(), 1);
        let mut behind = ShardStore::new(db.clone(), 2);
        let ops = workload(seed, 2_500);
        let mut rand = xorshift(seed * 104_729);
        let (mut seq_a, mut seq_b) = (1, 1);
        let export = |s: &ShardStore| common::state_bytes(s);
        // What RocksDB holds for `behind` (op index, next seq, write-through export then), and
        // the same for the checkpoint in flight.
        let mut landed = (0, 1, export(&through));
        let mut flying = None;
        let mut job: Option<coalesce_storage::shard::CheckpointJob> = None;
        let crash_at = 1_000 + (rand() % 1_000) as usize;
        let (mut began, mut abandoned, mut ran_elsewhere) = (0, 0, 0);
        let mut i = 0;
        while i < ops.len() {
            apply_both(&through, &behind, &ops[i], (&mut seq_a, &mut seq_b), i, seed);
            i += 1;
            if i % 5 == 0 {
                same_outbox_and_sessions(&through, &behind, seq_a, i, seed);
                assert_eq!(rows(&behind), rows(&through), "seed {seed} op {i}");
                let (mut a, mut b) = (through.apply_batch(), behind.apply_batch());
                assert_eq!(b.due(u64::MAX, 40).unwrap(), a.due(u64::MAX, 40).unwrap(), "seed {seed} op {i}");
            }
            match rand() % 40 {
                0..=3 => match job.take() {
                    None => {
                        let retry = behind.checkpoint_failed();
                        job = behind.begin_checkpoint();
                        if job.is_some() && !retry {
                            flying = Some((i, seq_b, export(&through)));
                            began += 1;
                        }
                    }
                    Some(j) if i % 2 == 0 => {
                        // Written on another thread, as the state machine does.
                        std::thread::spawn(move || j.run().unwrap()).join().unwrap();
                        landed = flying.take().unwrap();
                        ran_elsewhere += 1;
                    }
                    Some(j) => {
                        j.run().unwrap();
                        landed = flying.take().unwrap();
                    }
                },
                // A write that never happens: the effects stay in flight, marked failed.
                4 if job.take().is_some() => {
                    assert!(behind.checkpoint_failed());
                    abandoned += 1;
                }
                5 => {
                    if let Some(j) = job.take() {
                        j.run().unwrap();
                    }
                    behind.checkpoint().unwrap();
                    flying = None;
                    landed = (i, seq_b, export(&through));
                }
                _ => {}
            }
            if i == crash_at {
                // The process dies with a checkpoint in flight (or not): RocksDB holds the last
                // one that landed.
                drop(job.take());
                flying = None;
                behind = ShardStore::new(db.clone(), 2);
                assert_eq!(export(&behind), landed.2, "seed {seed}");
                (i, seq_b) = (landed.0, landed.1);
                seq_a = seq_b;
                common::import(&through, &landed.2);
            }
        }
        if let Some(j) = job.take() {
            j.run().unwrap();
        }
        assert_eq!(export(&behind), export(&through), "seed {seed}: byte-identical rows once checkpointed");
        assert!(
            began >= 20 && abandoned >= 2 && ran_elsewhere >= 5,
            "seed {seed}: {began} {abandoned} {ran_elsewhere}"
        );
    }
}

/// A deadline that moves away from a stored index row and back (an adaptive window's stretch
/// going up and down) and is then removed leaves no row behind — whether or not a checkpoint
/// fell in between, so replicas that checkpoint at different times hold the same rows.
#[test]
fn a_deadline_that_moves_back_and_is_removed_leaves_no_row() {
    let key = BufKey { stream: "s".into(), key: "k".into() };
    let (a, b) = (5_000, 6_000);
    for checkpoint_between in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let shard = ShardStore::new(db.clone(), 4);
        let mut batch = shard.apply_batch();
        batch.index_insert(a, &key).unwrap();
        batch.commit().unwrap();
        let steps: [&dyn Fn(&mut coalesce_storage::ApplyBatch<'_>); 3] = [
            &|x| {
                x.index_remove(a, &key).unwrap();
                x.index_insert(b, &key).unwrap();
            },
            &|x| {
                x.index_remove(b, &key).unwrap();
                x.index_insert(a, &key).unwrap();
            },
            &|x| x.index_remove(a, &key).unwrap(),
        ];
        for (i, step) in steps.iter().enumerate() {
            let mut batch = shard.apply_batch();
            step(&mut batch);
            batch.stage().unwrap();
            if checkpoint_between && i == 0 {
                shard.checkpoint().unwrap();
            }
            if i == 1 {
                assert_eq!(shard.apply_batch().due(u64::MAX, 10).unwrap(), vec![(a, key.clone())]);
            }
        }
        assert_eq!(shard.apply_batch().due(u64::MAX, 10).unwrap(), vec![], "checkpoint between: {checkpoint_between}");
        shard.checkpoint().unwrap();
        let reopened = ShardStore::new(db.clone(), 4);
        assert_eq!(
            reopened.apply_batch().due(u64::MAX, 10).unwrap(),
            vec![],
            "checkpoint between: {checkpoint_between}"
        );
    }
}

#[test]
fn overlay_reads_its_own_writes_within_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let shard = ShardStore::new(open(dir.path()), 0);
    let rules = rules(OverflowPolicy::Reject);
    let mut model = MemStore::default();
    let mut batch = shard.apply_batch();
    for op in workload(9, 400) {
        assert_eq!(run(&mut batch, &op, &rules), run(&mut model, &op, &rules));
    }
    batch.commit().unwrap();
    assert_eq!(shard.stats().unwrap(), model.stats);
}

#[test]
fn state_survives_restart_and_moves_by_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules(OverflowPolicy::Reject);
    let mut model = MemStore::default();
    let ops = workload(4, 500);
    {
        let shard = ShardStore::new(open(dir.path()), 3);
        for op in &ops {
            let mut batch = shard.apply_batch();
            run(&mut batch, op, &rules);
            run(&mut model, op, &rules);
            batch.commit().unwrap();
        }
        let mut batch = shard.apply_batch();
        let out = common::output(3, "k", 7, Aggregate::SumI64(5));
        batch.outbox_put(&out).unwrap();
        batch.session_put(77, &session(9, 1)).unwrap();
        batch.commit().unwrap();
    }
    // Reopen: everything is still there.
    let db = open(dir.path());
    let shard = ShardStore::new(db.clone(), 3);
    assert_eq!(shard.stats().unwrap(), model.stats);
    assert_eq!(shard.outbox_from(0, 10).unwrap().len(), 1);
    assert_eq!(shard.sessions().unwrap(), vec![(77, session(9, 1))]);

    // Export to another shard in another database; it is the same state.
    let data = common::state_bytes(&shard);
    // Read a row at a time (as a receiving node will), the rows are the export's, in order.
    let mut reader = coalesce_storage::snapshot::reader(Default::default());
    let mut rows = Vec::new();
    for chunk in data.chunks(5) {
        reader
            .push(chunk, |cf, k, v| {
                rows.push((cf, k.to_vec(), v.to_vec()));
                Ok::<_, coalesce_storage::snapshot::SnapshotError>(())
            })
            .unwrap();
    }
    reader.finish().unwrap();
    assert_eq!(rows.len(), common::rows_in(&data));
    let meta_cf = coalesce_storage::keys::SM_CFS.iter().position(|c| *c == coalesce_storage::keys::CF_SM_META).unwrap();
    let stats = [coalesce_storage::keys::SmMetaTag::Stats as u8];
    assert!(rows.iter().any(|(cf, k, _)| *cf as usize == meta_cf && k[..] == stats), "the stats row is in it");
    let mut again = coalesce_storage::snapshot::header(rows.len() as u64);
    for (cf, k, v) in &rows {
        coalesce_storage::snapshot::put_row(&mut again, *cf, k, v);
    }
    assert_eq!(again, data, "written a row at a time, the same bytes");
    let other_dir = tempfile::tempdir().unwrap();
    let other = ShardStore::new(open(other_dir.path()), 3);
    // Pre-existing rows of the target are replaced.
    let mut junk = other.apply_batch();
    junk.session_put(1, &session(1, 1)).unwrap();
    junk.commit().unwrap();
    common::import(&other, &data);
    assert_eq!(common::state_bytes(&other), data, "byte-identical after a snapshot install");
    assert_eq!(other.sessions().unwrap().len(), 1);
}

/// The slow-disk fault (the chaos tool's `slow_disk`): with extra latency set, a log append's
/// durability callback waits at least that long; set back to zero, syncs are fast again.
#[test]
fn a_slow_disk_delays_every_sync_until_restored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let synced = |db: &NodeDb| {
        let (tx, rx) = std::sync::mpsc::channel();
        let started = std::time::Instant::now();
        db.flusher().after_sync(Box::new(move |r| tx.send(r.is_ok()).expect("receiver")));
        assert!(rx.recv().expect("callback"));
        started.elapsed()
    };
    let extra = std::time::Duration::from_millis(150);
    db.flusher().set_extra_latency(extra);
    assert_eq!(db.flusher().extra_latency(), extra);
    assert!(synced(&db) >= extra);
    db.flusher().set_extra_latency(std::time::Duration::ZERO);
    assert_eq!(db.flusher().extra_latency(), std::time::Duration::ZERO);
}

#[test]
fn the_format_version_is_recorded_checked_and_migrated() {
    use coalesce_storage::format::{FORMAT_KEY, FORMAT_VERSION, created, recorded};
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open(dir.path());
        assert_eq!(recorded(&db).unwrap(), Some(FORMAT_VERSION), "a new database records its format");
        assert_eq!(created(&db).unwrap(), Some(FORMAT_VERSION), "and the format it was created in");
        db.node_put("peer_id", &7u64.to_be_bytes()).unwrap();
        // As a database written before versions were recorded (format 0) looks.
        let node = db.cf(coalesce_storage::keys::CF_NODE).unwrap();
        db.raw().delete_cf(node, FORMAT_KEY.as_bytes()).unwrap();
    }
    {
        let db = open(dir.path());
        assert_eq!(recorded(&db).unwrap(), Some(FORMAT_VERSION), "format 0 is migrated");
        assert_eq!(db.node_get("peer_id").unwrap(), Some(7u64.to_be_bytes().to_vec()), "its data is kept");
        assert_eq!(created(&db).unwrap(), Some(FORMAT_VERSION), "the creation mark stays as it was written");
        db.node_put(FORMAT_KEY, &(FORMAT_VERSION + 98).to_be_bytes()).unwrap();
    }
    let newer = NodeDb::open(dir.path(), &StorageOptions::default()).expect_err("a newer format is refused");
    let text = newer.to_string();
    assert!(text.contains(&format!("format {}", FORMAT_VERSION + 98)), "{text}");
    assert!(text.contains(&format!("formats up to {FORMAT_VERSION}")), "{text}");
    assert_eq!(newer.code(), "newer_format");
}

/// A session as the state machine writes one: it applied `last_seq` alone at `last_seen`.
fn session(last_seq: u64, last_seen: u64) -> coalesce_core::session::Session {
    let range = coalesce_core::session::ProducerRange { producer: 0, first_seq: last_seq, last_seq };
    coalesce_core::session::Session::after(None, &range, last_seen)
}

/// Session rows written before December 2026 (`last_seq`, `last_seen` only) read as legacy
/// sessions, in the database and in a snapshot from such a node; today's rows start with the
/// same two fields, so an older build reads them too.
#[test]
fn session_rows_of_older_builds_read_as_legacy_sessions() {
    use coalesce_core::session::Session;
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let old_row = postcard::to_allocvec(&(41u64, 5u64)).unwrap();
    let sessions = db.cf(coalesce_storage::keys::CF_SESSIONS).unwrap();
    db.raw().put_cf(sessions, coalesce_storage::keys::session_key(3, 8), &old_row).unwrap();
    let shard = ShardStore::new(db.clone(), 3);
    assert_eq!(shard.sessions().unwrap(), vec![(8, Session::legacy(41, 5))]);
    assert_eq!(shard.apply_batch().session_get(8).unwrap(), Some(Session::legacy(41, 5)));
    // Through a snapshot to another node: the same.
    let data = common::state_bytes(&shard);
    let other_dir = tempfile::tempdir().unwrap();
    let other = ShardStore::new(open(other_dir.path()), 3);
    common::import(&other, &data);
    assert_eq!(other.sessions().unwrap(), vec![(8, Session::legacy(41, 5))]);
    // Today's row: an older build decodes its first two fields and ignores the rest.
    let mut batch = shard.apply_batch();
    batch.session_put(9, &session(12, 7)).unwrap();
    batch.commit().unwrap();
    shard.checkpoint().unwrap();
    let row = db.raw().get_cf(sessions, coalesce_storage::keys::session_key(3, 9)).unwrap().unwrap();
    assert_eq!(postcard::from_bytes::<(u64, u64)>(&row).unwrap(), (12, 7));
}
