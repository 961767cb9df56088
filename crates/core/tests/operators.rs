//! Algebraic properties of the merge operators, checked against simple models.

use coalesce_core::merge::{Aggregate, MergeOp, NumType};
use coalesce_core::value::Value;
use proptest::prelude::*;

fn lift_all(op: &MergeOp, values: &[Value]) -> Vec<Aggregate> {
    values.iter().enumerate().map(|(i, v)| op.lift(v, i as u64).expect("valid value")).collect()
}

/// Folds left to right; merges that hit a bound are not expected in these tests.
fn fold(op: &MergeOp, aggs: &[Aggregate]) -> Option<Aggregate> {
    let mut it = aggs.iter().cloned();
    let mut acc = it.next()?;
    for a in it {
        acc.merge(&a, op).expect("merge");
    }
    Some(acc)
}

/// Folds the two halves separately, then merges them: what pre-merging does.
fn fold_split(op: &MergeOp, aggs: &[Aggregate], at: usize) -> Option<Aggregate> {
    let (l, r) = aggs.split_at(at.min(aggs.len()));
    match (fold(op, l), fold(op, r)) {
        (Some(mut a), Some(b)) => {
            a.merge(&b, op).expect("merge");
            Some(a)
        }
        (a, b) => a.or(b),
    }
}

fn ints(max: i64) -> impl Strategy<Value = Vec<i64>> {
    prop::collection::vec(-max..max, 1..60)
}

proptest! {
    #[test]
    fn sum_i64_is_associative_commutative_and_conserving(xs in ints(1 << 40), at in 0usize..60, seed in any::<u64>()) {
        let op = MergeOp::SumI64;
        let aggs = lift_all(&op, &xs.iter().map(|&x| Value::Int(x)).collect::<Vec<_>>());
        let total: i64 = xs.iter().sum();
        prop_assert_eq!(fold(&op, &aggs), Some(Aggregate::SumI64(total)));
        prop_assert_eq!(fold_split(&op, &aggs, at), Some(Aggregate::SumI64(total)));
        let mut shuffled = aggs.clone();
        shuffle(&mut shuffled, seed);
        prop_assert_eq!(fold(&op, &shuffled), Some(Aggregate::SumI64(total)));
    }

    #[test]
    fn min_max_count_match_the_model(xs in ints(i64::MAX), at in 0usize..60, seed in any::<u64>()) {
        let values: Vec<Value> = xs.iter().map(|&x| Value::Int(x)).collect();
        for (op, expect) in [
            (MergeOp::Min { value_type: NumType::I64 }, Aggregate::MinI64(*xs.iter().min().unwrap())),
            (MergeOp::Max { value_type: NumType::I64 }, Aggregate::MaxI64(*xs.iter().max().unwrap())),
            (MergeOp::Count, Aggregate::Count(xs.len() as u64)),
        ] {
            let mut aggs = lift_all(&op, &values);
            prop_assert_eq!(fold_split(&op, &aggs, at), Some(expect.clone()));
            shuffle(&mut aggs, seed);
            prop_assert_eq!(fold(&op, &aggs), Some(expect));
        }
    }

    #[test]
    fn set_union_is_the_set_of_members(xs in prop::collection::vec(0u8..40, 1..80), at in 0usize..80, seed in any::<u64>()) {
        let op = MergeOp::SetUnion { max_members: 1000 };
        let values: Vec<Value> = xs.iter().map(|x| Value::Str(format!("m{x}"))).collect();
        let mut aggs = lift_all(&op, &values);
        let model: std::collections::BTreeSet<String> = xs.iter().map(|x| format!("m{x}")).collect();
        let expect = serde_json::Value::Array(model.into_iter().map(Into::into).collect());
        prop_assert_eq!(fold_split(&op, &aggs, at).unwrap().to_json(), expect.clone());
        shuffle(&mut aggs, seed);
        prop_assert_eq!(fold(&op, &aggs).unwrap().to_json(), expect);
    }

    #[test]
    fn hll_merge_order_does_not_matter(xs in prop::collection::vec(any::<u32>(), 1..300), at in 0usize..300, seed in any::<u64>()) {
        let op = MergeOp::Hll { precision: 10 };
        let mut aggs = lift_all(&op, &xs.iter().map(|&x| Value::Int(i64::from(x))).collect::<Vec<_>>());
        let a = fold(&op, &aggs).unwrap();
        prop_assert_eq!(fold_split(&op, &aggs, at).unwrap(), a.clone());
        shuffle(&mut aggs, seed);
        prop_assert_eq!(fold(&op, &aggs).unwrap(), a);
    }

    #[test]
    fn ddsketch_counts_are_exact_and_quantiles_within_accuracy(xs in prop::collection::vec(1.0f64..1e6, 1..200), at in 0usize..200, seed in any::<u64>()) {
        let op = MergeOp::Ddsketch { relative_accuracy: 0.01, max_bins: 2048 };
        let mut aggs = lift_all(&op, &xs.iter().map(|&x| Value::Float(x)).collect::<Vec<_>>());
        shuffle(&mut aggs, seed);
        let merged = fold_split(&op, &aggs, at).unwrap();
        let json = merged.to_json();
        prop_assert_eq!(json["count"].as_u64(), Some(xs.len() as u64));
        let mut sorted = xs.clone();
        sorted.sort_by(f64::total_cmp);
        let p50 = json["p50"].as_f64().unwrap();
        // DDSketch's p50 is the value at rank floor(0.5 * (n - 1)), within 1% relative error.
        let exact = sorted[((sorted.len() - 1) as f64 * 0.5) as usize];
        prop_assert!((p50 - exact).abs() <= exact * 0.0101, "p50 {} exact {}", p50, exact);
    }

    #[test]
    fn latest_wins_by_event_time_then_arrival(times in prop::collection::vec(0u64..20, 1..50), at in 0usize..50) {
        let op = MergeOp::Latest;
        let aggs: Vec<Aggregate> = times.iter().enumerate()
            .map(|(i, &t)| op.lift(&Value::Int(i as i64), t).unwrap()).collect();
        // Model: greatest event time; among equals, the last to arrive.
        let max_t = *times.iter().max().unwrap();
        let winner = times.iter().rposition(|&t| t == max_t).unwrap() as i64;
        let expect = Aggregate::Latest { value: Value::Int(winner), at: max_t };
        prop_assert_eq!(fold(&op, &aggs), Some(expect.clone()));
        prop_assert_eq!(fold_split(&op, &aggs, at), Some(expect));
    }

    #[test]
    fn append_keeps_arrival_order(xs in prop::collection::vec(any::<i64>(), 1..50), at in 0usize..50) {
        let op = MergeOp::Append { max_len: 100 };
        let aggs = lift_all(&op, &xs.iter().map(|&x| Value::Int(x)).collect::<Vec<_>>());
        let expect = Aggregate::Append(xs.iter().map(|&x| Value::Int(x)).collect());
        prop_assert_eq!(fold_split(&op, &aggs, at), Some(expect));
    }

    /// Composing merge patches and applying the result equals applying them one by one,
    /// for patches that stay within what RFC 7386 can express (objects patched by objects).
    #[test]
    fn merge_patch_composition_matches_sequential_application(
        patches in prop::collection::vec(prop::collection::btree_map("[a-c]", prop::option::of(0i32..5), 0..4), 1..8),
        at in 0usize..8,
    ) {
        let op = MergeOp::JsonMergePatch;
        let as_json: Vec<serde_json::Value> = patches.iter().map(|p| serde_json::Value::Object(
            p.iter().map(|(k, v)| (k.clone(), v.map_or(serde_json::Value::Null, Into::into))).collect())).collect();
        let aggs = lift_all(&op, &as_json.iter().cloned().map(Value::Json).collect::<Vec<_>>());
        let target = serde_json::json!({"a": 9, "z": 1});
        let mut sequential = target.clone();
        for p in &as_json { json_patch::merge(&mut sequential, p); }
        let Aggregate::JsonMergePatch(composed) = fold_split(&op, &aggs, at).unwrap() else { unreachable!() };
        let mut once = target;
        json_patch::merge(&mut once, &composed);
        prop_assert_eq!(once, sequential);
    }
}

#[test]
fn sum_overflow_is_an_error_and_leaves_the_aggregate_unchanged() {
    let op = MergeOp::SumI64;
    let mut a = Aggregate::SumI64(i64::MAX - 1);
    let e = a.merge(&Aggregate::SumI64(2), &op).unwrap_err();
    assert_eq!(e.to_string(), "i64 sum overflow");
    assert_eq!(a, Aggregate::SumI64(i64::MAX - 1));
}

#[test]
fn bounds_are_errors_not_truncation() {
    let op = MergeOp::SetUnion { max_members: 2 };
    let mut a = op.lift(&Value::Str("x".into()), 0).unwrap();
    a.merge(&op.lift(&Value::Str("y".into()), 0).unwrap(), &op).unwrap();
    a.merge(&op.lift(&Value::Str("y".into()), 0).unwrap(), &op).unwrap(); // already a member
    let before = a.clone();
    assert!(a.merge(&op.lift(&Value::Str("z".into()), 0).unwrap(), &op).is_err());
    assert_eq!(a, before);
    let op = MergeOp::Append { max_len: 1 };
    let mut a = op.lift(&Value::Int(1), 0).unwrap();
    assert!(a.merge(&op.lift(&Value::Int(2), 0).unwrap(), &op).is_err());
}

#[test]
fn mismatched_values_are_precise_errors() {
    let e = MergeOp::SumI64.lift(&Value::Str("3".into()), 0).unwrap_err();
    assert_eq!(e.to_string(), "operator sum_i64 takes a int value, got string");
    assert_eq!((e.code(), e.field()), ("type_mismatch", "value"));
    let e = MergeOp::SumF64.lift(&Value::Float(f64::NAN), 0).unwrap_err();
    assert_eq!(e.code(), "not_finite");
    let e = MergeOp::JsonMergePatch.lift(&Value::Str("{nope".into()), 0).unwrap_err();
    assert_eq!(e.code(), "invalid_value");
    let mut sum = Aggregate::SumI64(1);
    assert!(sum.merge(&Aggregate::Count(1), &MergeOp::SumI64).is_err());
}

/// Deterministic Fisher-Yates driven by a splitmix64 stream.
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    let mut next = || {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}
