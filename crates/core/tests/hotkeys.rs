//! The hot-key tracker against an exact count: Space-Saving's guarantees on skewed and
//! arbitrary workloads, with and without decay.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use coalesce_core::hotkeys::{HotKeys, HotKeysConfig};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};

fn exact_top(counts: &HashMap<String, u64>, k: usize) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = counts.iter().map(|(k, c)| (k.clone(), *c)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(k);
    v
}

/// Zipf(1.1) over 10k keys, with weights as partials carry them (1–3 inputs per observation).
#[test]
fn zipf_top_10_is_exact_and_counts_are_bounded() {
    for seed in [1u64, 2, 3] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let zipf = Zipf::new(10_000.0, 1.1).unwrap();
        let mut tracker = HotKeys::new(HotKeysConfig { half_life_ms: None, ..Default::default() });
        assert_eq!(tracker.config().capacity, 64, "the default capacity is what is tested");
        let mut exact: HashMap<String, u64> = HashMap::new();
        let mut total = 0u64;
        for i in 0..200_000u64 {
            let key = format!("k{}", zipf.sample(&mut rng) as u64);
            let weight = 1 + i % 3;
            tracker.observe("s", &key, weight);
            *exact.entry(key).or_default() += weight;
            total += weight;
        }
        let reported = tracker.top(10);
        let want = exact_top(&exact, 10);
        let got: Vec<&str> = reported.iter().map(|h| h.key.as_str()).collect();
        let want_keys: Vec<&str> = want.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(got, want_keys, "seed {seed}: top-10 order");
        for h in tracker.top(64) {
            let truth = exact[&h.key] as f64;
            assert!(h.count - h.error <= truth && truth <= h.count, "seed {seed}: {h:?} vs true {truth}");
            assert!(h.error <= total as f64 / 64.0, "error within total/m: {h:?}");
        }
        assert_eq!(tracker.total(), total as f64);
    }
}

/// Decay scales every count and the truth alike, so the bounds hold for decayed counts too.
#[test]
fn bounds_hold_for_decayed_counts() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let zipf = Zipf::new(2_000.0, 1.0).unwrap();
    let mut tracker = HotKeys::new(HotKeysConfig { capacity: 32, half_life_ms: Some(5_000), ..Default::default() });
    let mut exact: HashMap<String, f64> = HashMap::new();
    tracker.tick(0);
    for step in 1..=400u64 {
        for _ in 0..100 {
            let key = format!("k{}", zipf.sample(&mut rng) as u64);
            tracker.observe("s", &key, 1);
            *exact.entry(key).or_default() += 1.0;
        }
        tracker.tick(step * 100);
        let f = 0.5f64.powf(100.0 / 5_000.0);
        exact.values_mut().for_each(|v| *v *= f);
    }
    for h in tracker.top(32) {
        let truth = exact[&h.key];
        let eps = 1e-6 * h.count.max(1.0);
        assert!(h.count - h.error <= truth + eps && truth <= h.count + eps, "{h:?} vs {truth}");
    }
}

proptest! {
    /// For any weighted stream: count - error ≤ true ≤ count for every reported key, every key
    /// heavier than total/m is reported, and the report is sorted and deterministic.
    #[test]
    fn space_saving_guarantees(
        capacity in 1usize..12,
        obs in prop::collection::vec((0u8..40, 1u64..20, prop::bool::ANY), 1..600),
    ) {
        let mut tracker = HotKeys::new(HotKeysConfig { capacity, half_life_ms: None, ..Default::default() });
        let mut again = HotKeys::new(HotKeysConfig { capacity, half_life_ms: None, ..Default::default() });
        let mut exact: HashMap<(String, String), u64> = HashMap::new();
        let mut total = 0u64;
        for (k, w, other_stream) in &obs {
            let stream = if *other_stream { "b" } else { "a" };
            let key = format!("key-{k}");
            tracker.observe(stream, &key, *w);
            again.observe(stream, &key, *w);
            *exact.entry((stream.to_owned(), key)).or_default() += w;
            total += w;
        }
        let top = tracker.top(usize::MAX);
        prop_assert!(top.len() <= capacity);
        prop_assert_eq!(&top, &again.top(usize::MAX));
        for h in &top {
            let truth = exact[&(h.stream.clone(), h.key.clone())] as f64;
            prop_assert!(h.count - h.error <= truth, "{:?} true {}", h, truth);
            prop_assert!(truth <= h.count, "{:?} true {}", h, truth);
            prop_assert!(h.error <= total as f64 / capacity as f64);
        }
        for w in top.windows(2) {
            prop_assert!(w[0].count >= w[1].count);
        }
        for ((stream, key), c) in &exact {
            if *c as f64 > total as f64 / capacity as f64 {
                let found = top.iter().any(|h| &h.stream == stream && &h.key == key);
                prop_assert!(found, "heavy {}/{} missing", stream, key);
            }
        }
    }
}
