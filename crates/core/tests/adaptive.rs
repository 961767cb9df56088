//! The adaptive-window controller in a toy shard, in the real buffer, and against arbitrary
//! pressure.
//!
//! The toy: inputs arrive at a fixed rate (2000/s) over N = 500 keys, windows are 1 s tumbling,
//! a window's deadline is its tumbling end plus the `extra_ms` of the entry that opened it or
//! last merged into it (what apply does with the stretch the leader puts in the Ingest rules),
//! every sealed window is one output in a FIFO outbox, and the sink is a token bucket delivering
//! 1000 outputs/s normally and 150/s from 20 s to 80 s (reporting "throttled", or in a second
//! run saying nothing). One output per distinct key per window is ~490/s, so a fixed window's
//! backlog grows ~340/s during the throttle; with the controller the windows stretch, outputs
//! fall below the sink's capacity and the backlog stays bounded, no input waits longer than
//! `max_staleness`, and the stretch is gone soon after the throttle.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, VecDeque};

use coalesce_core::adaptive::{AdaptiveConfig, AdaptiveController, AdaptivePolicy, Pressure};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};

const STEP_MS: u64 = 100;
const WINDOW_MS: u64 = 1_000;
const KEYS: u64 = 500;
const INPUTS_PER_STEP: u64 = 200; // 2000/s
const THROTTLE: std::ops::Range<u64> = 20_000..80_000;
const END_MS: u64 = 160_000;

#[derive(Debug, Default)]
struct Run {
    /// (time, backlog, extra) every second.
    trace: Vec<(u64, usize, u64)>,
    /// Windows sealed per second.
    sealed: BTreeMap<u64, u64>,
    max_staleness: u64,
    /// Largest backlog after any step.
    max_backlog: usize,
    inputs: u64,
    outputs_inputs: u64,
}

impl Run {
    fn at(&self, t: u64) -> (usize, u64) {
        let (_, b, e) = self.trace.iter().find(|(tt, _, _)| *tt == t).unwrap();
        (*b, *e)
    }
}

/// `signal_throttle`: whether the sink reports its throttling (else only the backlog and lag show it).
fn simulate(mut controller: Option<AdaptiveController>, signal_throttle: bool) -> Run {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // key → (effective deadline, first input stamp, inputs)
    let mut open: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    // sealed-at stamps of undelivered outputs
    let mut outbox: VecDeque<u64> = VecDeque::new();
    let mut run = Run::default();
    let mut credit = 0.0f64;
    let mut extra = 0;
    let mut t = 0;
    while t <= END_MS {
        let throttled = THROTTLE.contains(&t);
        if let Some(c) = controller.as_mut() {
            let p = Pressure {
                outbox_backlog: outbox.len() as u64,
                oldest_undelivered_age_ms: outbox.front().map_or(0, |s| t - s),
                sink_throttled: throttled && signal_throttle,
                sink_failing: false,
                buffer_fill: open.len() as f64 / 1e6,
            };
            extra = c.update(t, &p).extra_ms;
        }
        let mut seal = |open: &mut BTreeMap<u64, (u64, u64, u64)>, run: &mut Run, key: u64| {
            let (_, first, inputs) = open.remove(&key).unwrap();
            run.max_staleness = run.max_staleness.max(t - first);
            *run.sealed.entry(t / 1000).or_default() += 1;
            run.outputs_inputs += inputs;
            outbox.push_back(t);
        };
        // Ingest: a window past its deadline seals before new input joins it; a merge recomputes
        // the deadline with the current stretch (never before the input).
        for _ in 0..INPUTS_PER_STEP {
            let key = rng.random_range(0..KEYS);
            if open.get(&key).is_some_and(|w| w.0 <= t) {
                seal(&mut open, &mut run, key);
            }
            let w = open.entry(key).or_insert((0, t, 0));
            let base_deadline = w.1 - w.1 % WINDOW_MS + WINDOW_MS;
            w.0 = (base_deadline + extra).max(t);
            w.2 += 1;
            run.inputs += 1;
        }
        // Seal: what the deadline index says is due.
        let due: Vec<u64> = open.iter().filter(|(_, w)| w.0 <= t).map(|(k, _)| *k).collect();
        for key in due {
            seal(&mut open, &mut run, key);
        }
        // Sink.
        credit += if throttled { 150.0 } else { 1000.0 } * STEP_MS as f64 / 1000.0;
        while credit >= 1.0 && !outbox.is_empty() {
            outbox.pop_front();
            credit -= 1.0;
        }
        credit = credit.min(1000.0);
        run.max_backlog = run.max_backlog.max(outbox.len());
        if t % 1000 == 0 {
            run.trace.push((t, outbox.len(), extra));
        }
        t += STEP_MS;
    }
    // Whatever is still open would seal later; count it for the conservation check.
    run.outputs_inputs += open.values().map(|w| w.2).sum::<u64>();
    run
}

fn sim_policy() -> AdaptivePolicy {
    toml::from_str::<AdaptiveConfig>("max_staleness = \"10s\"\nbacklog_high = 1000")
        .unwrap()
        .validate("toy", WINDOW_MS)
        .unwrap()
}

#[test]
fn stretching_keeps_the_backlog_bounded_where_a_fixed_window_does_not() {
    let fixed = simulate(None, true);
    // Without the controller the backlog grows through the throttle (~340 outputs/s).
    let (fixed_backlog, _) = fixed.at(THROTTLE.end - 1000);
    assert!(fixed_backlog > 15_000, "fixed backlog {fixed_backlog}");
    assert!(fixed.max_staleness <= WINDOW_MS, "{}", fixed.max_staleness);
    assert_eq!(fixed.inputs, fixed.outputs_inputs);

    for signal_throttle in [true, false] {
        let adaptive = simulate(Some(AdaptiveController::new(sim_policy())), signal_throttle);
        let ctx = format!("signal_throttle={signal_throttle}: {:?}", adaptive.trace);

        // Bounded, and far below the fixed window's. A sink that says it is throttled is
        // relieved at once; one that does not is found by the backlog crossing backlog_high
        // (1000) and then kept in a sawtooth between backlog_low and a little above backlog_high.
        let bound = if signal_throttle { 200 } else { 3_000 };
        assert!(adaptive.max_backlog < bound, "backlog peaked at {} {ctx}", adaptive.max_backlog);
        assert!(fixed_backlog > 5 * adaptive.max_backlog);

        // The output rate during the throttle stays under the sink's 150/s (on average; the
        // first second of the throttle still emits unstretched windows).
        let during: Vec<u64> = (25..80).map(|s| adaptive.sealed.get(&s).copied().unwrap_or(0)).collect();
        let avg = during.iter().sum::<u64>() as f64 / during.len() as f64;
        assert!(avg <= 150.0, "outputs/s while throttled: {avg} {during:?} {ctx}");

        // No stretch before the throttle, none some time after it.
        assert_eq!(adaptive.at(19_000).1, 0, "{ctx}");
        if signal_throttle {
            assert_eq!(adaptive.at(60_000).1, 9_000, "{ctx}");
        }
        let back_to_zero = adaptive.trace.iter().find(|(t, _, e)| *t >= THROTTLE.end && *e == 0).unwrap().0;
        assert!(back_to_zero <= THROTTLE.end + 20_000, "extra back to 0 at {back_to_zero} {ctx}");
        assert!(adaptive.trace.iter().filter(|(t, _, _)| *t >= back_to_zero).all(|(_, _, e)| *e == 0), "{ctx}");
        assert_eq!(adaptive.at(END_MS).0, 0, "backlog drained {ctx}");

        // Staleness never exceeds max_staleness, and the stretch was used.
        assert!(adaptive.max_staleness <= 10_000, "{}", adaptive.max_staleness);
        assert!(adaptive.max_staleness > 5_000, "{}", adaptive.max_staleness);
        // Nothing is lost.
        assert_eq!(adaptive.inputs, adaptive.outputs_inputs);
        eprintln!(
            "signal_throttle={signal_throttle}: fixed backlog {fixed_backlog}, adaptive peak {}, \
             outputs/s {avg:.0}, staleness {} ms",
            adaptive.max_backlog, adaptive.max_staleness
        );
    }
}

fn policy() -> impl Strategy<Value = AdaptivePolicy> {
    (1u64..5_000, 0u64..20_000, 1u64..2_000, 1u64..10_000, 1u16..=1000, 1u64..3_000, 1u32..6).prop_map(
        |(base, extra_room, backlog_high, lag_high_ms, buffer_high_permille, adjust_every_ms, cooldown)| {
            AdaptivePolicy {
                max_staleness_ms: base + extra_room,
                base_bound_ms: base,
                backlog_high,
                backlog_low: backlog_high / 4,
                lag_high_ms,
                buffer_high_permille,
                adjust_every_ms,
                cooldown,
                extra_ms: 0,
            }
        },
    )
}

fn pressure() -> impl Strategy<Value = Pressure> {
    (0u64..4_000, 0u64..20_000, prop::bool::weighted(0.2), prop::bool::weighted(0.1), 0.0f64..1.0).prop_map(
        |(outbox_backlog, oldest_undelivered_age_ms, sink_throttled, sink_failing, buffer_fill)| Pressure {
            outbox_backlog,
            oldest_undelivered_age_ms,
            sink_throttled,
            sink_failing,
            buffer_fill,
        },
    )
}

proptest! {
    /// Whatever the pressure and however time moves, extra_ms stays within max_staleness - base,
    /// and the same inputs give the same decisions.
    #[test]
    fn extra_never_exceeds_the_bound(
        policy in policy(),
        samples in prop::collection::vec((0u64..5_000, pressure()), 1..200),
        start in 0u64..1_000_000,
    ) {
        let mut a = AdaptiveController::new(policy);
        let mut b = AdaptiveController::new(policy);
        let mut now = start;
        for (dt, p) in &samples {
            // Mostly forward, sometimes backwards (a new leader's clock).
            now = if dt % 17 == 0 { now.saturating_sub(*dt) } else { now + dt };
            let d = a.update(now, p);
            prop_assert!(d.extra_ms <= policy.max_staleness_ms - policy.base_bound_ms, "{:?}", d);
            prop_assert_eq!(d, b.update(now, p));
        }
    }

    /// Monotone response: a pressure sequence that is everywhere at least as high (same buffer
    /// fill, same times) never gets a smaller extra_ms.
    #[test]
    fn response_is_monotone_in_pressure(
        policy in policy(),
        samples in prop::collection::vec((1u64..3_000, pressure(), pressure()), 1..200),
    ) {
        let mut hi = AdaptiveController::new(policy);
        let mut lo = AdaptiveController::new(policy);
        let mut now = 0;
        for (dt, p, q) in &samples {
            now += dt;
            let high = Pressure {
                outbox_backlog: p.outbox_backlog.max(q.outbox_backlog),
                oldest_undelivered_age_ms: p.oldest_undelivered_age_ms.max(q.oldest_undelivered_age_ms),
                sink_throttled: p.sink_throttled || q.sink_throttled,
                sink_failing: p.sink_failing || q.sink_failing,
                buffer_fill: p.buffer_fill,
            };
            let low = Pressure {
                outbox_backlog: p.outbox_backlog.min(q.outbox_backlog),
                oldest_undelivered_age_ms: p.oldest_undelivered_age_ms.min(q.oldest_undelivered_age_ms),
                sink_throttled: p.sink_throttled && q.sink_throttled,
                sink_failing: p.sink_failing && q.sink_failing,
                buffer_fill: p.buffer_fill,
            };
            let (h, l) = (hi.update(now, &high), lo.update(now, &low));
            prop_assert!(h.extra_ms >= l.extra_ms, "{:?} < {:?}", h, l);
        }
    }

    /// After any history, calm pressure brings extra back to 0 within
    /// cooldown + O(log(cap / first step)) intervals.
    #[test]
    fn calm_returns_extra_to_zero(
        policy in policy(),
        samples in prop::collection::vec((1u64..3_000, pressure()), 0..100),
    ) {
        let mut c = AdaptiveController::new(policy);
        let mut now = 0;
        for (dt, p) in &samples {
            now += dt;
            c.update(now, p);
        }
        // Each calm step takes a quarter (at least 1 ms) off.
        let ratio = (policy.max_extra_ms() as f64 / policy.first_step_ms() as f64).max(1.0);
        let steps = 2 * (ratio.ln() / (4.0f64 / 3.0).ln()).ceil() as u32 + 8;
        for _ in 0..(policy.cooldown + steps) {
            now += policy.adjust_every_ms;
            c.update(now, &Pressure::default());
        }
        prop_assert_eq!(c.decision().extra_ms, 0);
    }
}

#[test]
fn random_pressure_smoke() {
    // A long random run through a validated policy, checking the bound at every step.
    let policy = sim_policy();
    let mut c = AdaptiveController::new(policy);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for i in 0..20_000u64 {
        let p = Pressure {
            outbox_backlog: rng.random_range(0..3_000),
            oldest_undelivered_age_ms: rng.random_range(0..8_000),
            sink_throttled: rng.random_bool(0.05),
            sink_failing: rng.random_bool(0.01),
            buffer_fill: rng.random_range(0.0..1.0),
        };
        assert!(c.update(i * 250, &p).extra_ms <= policy.max_extra_ms());
    }
}

/// The stretch through the real buffer: rules carrying `extra_ms` defer the deadline in the
/// index, the window keeps absorbing, seal_due closes it at deadline + extra, and a shrunk
/// stretch never puts a deadline before the merging input.
#[test]
fn the_stretch_defers_seals_in_the_real_buffer() {
    use coalesce_core::batch::Partial;
    use coalesce_core::buffer::{BufKey, IngestBatch, MemStore, ShardBuffer};
    use coalesce_core::merge::Aggregate;
    use coalesce_core::stream::StreamsFile;

    let table = StreamsFile::parse(
        "[streams.a]\nmerge = \"sum_i64\"\nwindow = { tumbling = \"1s\", adaptive = { max_staleness = \"10s\" } }",
    )
    .and_then(|f| f.validate(&[]))
    .unwrap();
    let def = table.get("a").unwrap();
    let key = BufKey { stream: "a".into(), key: "k".into() };
    let entry = |stamp: u64, extra: u64| {
        let mut rules = def.rules.clone();
        rules.window = rules.window.with_extra_ms(extra);
        IngestBatch {
            stamp,
            rules: BTreeMap::from([("a".to_owned(), rules)]),
            limits: table.limits(),
            partials: vec![(
                key.clone(),
                Partial {
                    agg: Aggregate::SumI64(1),
                    inputs: 1,
                    first_event_at: stamp,
                    last_event_at: stamp,
                    samples: None,
                },
            )],
        }
    };
    let mut store = MemStore::default();
    // Opened at 10_200 with a 4 s stretch: deadline 11_000 + 4_000.
    assert!(ShardBuffer::apply_ingest(&mut store, &entry(10_200, 4_000)).unwrap().outputs.is_empty());
    assert_eq!(ShardBuffer::next_deadline(&mut store).unwrap(), Some(15_000));
    // Inputs after the tumbling end still join the window.
    for t in [11_500, 13_000, 14_900] {
        assert!(ShardBuffer::apply_ingest(&mut store, &entry(t, 4_000)).unwrap().outputs.is_empty());
    }
    assert!(ShardBuffer::seal_due(&mut store, 14_999, 100).unwrap().is_empty());
    let out = ShardBuffer::seal_due(&mut store, 15_000, 100).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].inputs, out[0].window_start, out[0].window_end), (4, 10_000, 15_000));
    assert!(out[0].window_end - out[0].first_input_at <= def.rules.window.max_staleness_ms());

    // A stretch beyond max_staleness - base is capped.
    ShardBuffer::apply_ingest(&mut store, &entry(20_000, u64::MAX)).unwrap();
    assert_eq!(ShardBuffer::next_deadline(&mut store).unwrap(), Some(30_000));
    // The stretch shrinks to 0 while the window is open: the next input recomputes the
    // deadline (21_000), which is in the past at 25_000, so it becomes 25_000.
    ShardBuffer::apply_ingest(&mut store, &entry(25_000, 0)).unwrap();
    assert_eq!(ShardBuffer::next_deadline(&mut store).unwrap(), Some(25_000));
    let out = ShardBuffer::seal_due(&mut store, 25_000, 100).unwrap();
    assert_eq!((out[0].inputs, out[0].window_end, out[0].last_input_at), (2, 25_000, 25_000));

    // Without the stretch (or for a non-adaptive stream) nothing changes.
    let plain = def.rules.window.with_extra_ms(0);
    assert_eq!(plain.adaptive.unwrap().extra_ms, 0);
    let fixed = coalesce_core::window::WindowPolicy { tumbling_ms: Some(1000), ..Default::default() };
    assert_eq!(fixed.with_extra_ms(5_000), fixed);
}
