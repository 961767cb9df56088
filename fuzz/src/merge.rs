//! The `merge` target: an operator and a run of JSON-ish values → lift and merge.
//!
//! The input is read with `arbitrary`: a merge operator whose parameters pass
//! [`MergeOp::validate`] (the only ones config or an entry can carry), a sample policy, and up
//! to [`MAX_VALUES`] values of every kind (ints, floats including NaN and infinities, text,
//! bytes, JSON documents, JSON as text) with event times. Then:
//! - lifting never panics; a refused value gets an error with a code, and a lifted one is a
//!   partial that passes the check an entry's partials pass, and survives postcard;
//! - merging never panics: a merge either succeeds — giving an aggregate that still passes its
//!   check, still fits the operator and still survives postcard — or is refused and leaves the
//!   older aggregate unchanged (the buffer then closes the window and opens a new one);
//! - grouping does not matter ("pre-merging never changes the result"): when every merge
//!   succeeds, folding the values left to right equals merging the fold of a prefix with the fold
//!   of the rest, for every operator whose arithmetic is exact; for the commutative ones the
//!   reverse order gives the same bytes too;
//! - samples merge associatively for every pick (and commutatively for `reservoir`), never
//!   keeping more than `n`.

use arbitrary::{Arbitrary, Result, Unstructured};
use coalesce_core::batch::Partial;
use coalesce_core::merge::{Aggregate, MergeOp, NumType};
use coalesce_core::samples::{SamplePick, SamplePolicy, Samples};
use coalesce_core::value::Value;

use crate::roundtrip::must_roundtrip;

/// Most values one input lifts and merges.
pub const MAX_VALUES: usize = 24;

/// Interesting `relative_accuracy` values (a DDSketch's key range depends on it).
const ACCURACIES: &[f64] = &[0.01, 0.001, 0.05, 0.5, 0.999_999, 1e-4, 1e-6, 1e-8, 1e-10, 1e-13, 1e-16, 1e-17];
/// Interesting `max_bins` values.
const MAX_BINS: &[u32] = &[16, 17, 128, 129, 2048, 65_536];

/// A merge operator with parameters from tables of edge cases, or raw.
pub(crate) fn merge_op(u: &mut Unstructured<'_>) -> Result<MergeOp> {
    let num = |u: &mut Unstructured<'_>| -> Result<NumType> {
        Ok(if bool::arbitrary(u)? { NumType::F64 } else { NumType::I64 })
    };
    let small = |u: &mut Unstructured<'_>| -> Result<usize> {
        Ok(if bool::arbitrary(u)? { usize::from(u.int_in_range(0u8..=8)?) } else { usize::from(u16::arbitrary(u)?) })
    };
    Ok(match u.int_in_range(0u8..=10)? {
        0 => MergeOp::Latest,
        1 => MergeOp::SumI64,
        2 => MergeOp::SumF64,
        3 => MergeOp::Min { value_type: num(u)? },
        4 => MergeOp::Max { value_type: num(u)? },
        5 => MergeOp::Count,
        6 => MergeOp::SetUnion { max_members: small(u)? },
        7 => MergeOp::Append { max_len: small(u)? },
        8 => MergeOp::JsonMergePatch,
        9 => MergeOp::Ddsketch {
            relative_accuracy: if bool::arbitrary(u)? { *u.choose(ACCURACIES)? } else { f64::arbitrary(u)? },
            max_bins: if bool::arbitrary(u)? { *u.choose(MAX_BINS)? } else { u32::arbitrary(u)? },
        },
        _ => MergeOp::Hll { precision: u.int_in_range(0u8..=20)? },
    })
}

/// Numbers that sit on edges.
const FLOATS: &[f64] =
    &[0.0, -0.0, 1e-9, -1e-9, 1e-10, 5e-324, f64::MAX, f64::MIN, f64::NAN, f64::INFINITY, 1e300, 0.1];
const INTS: &[i64] = &[0, 1, -1, i64::MAX, i64::MIN, i64::MAX - 1, 1 << 53];

fn json(u: &mut Unstructured<'_>, depth: u32) -> Result<serde_json::Value> {
    use serde_json::Value as J;
    let leaf = depth >= 4 || u.is_empty();
    Ok(match u.int_in_range(0u8..=if leaf { 4 } else { 6 })? {
        0 => J::Null,
        1 => J::Bool(bool::arbitrary(u)?),
        2 => {
            if bool::arbitrary(u)? {
                J::from(i64::arbitrary(u)?)
            } else {
                serde_json::Number::from_f64(if bool::arbitrary(u)? { *u.choose(FLOATS)? } else { f64::arbitrary(u)? })
                    .map_or(J::Null, J::Number)
            }
        }
        3 => J::String(key(u)?),
        4 => J::from(u64::arbitrary(u)?),
        5 => {
            let n = u.int_in_range(0u8..=4)?;
            J::Array((0..n).map(|_| json(u, depth + 1)).collect::<Result<_>>()?)
        }
        _ => {
            let n = u.int_in_range(0u8..=4)?;
            J::Object((0..n).map(|_| Ok((key(u)?, json(u, depth + 1)?))).collect::<Result<_>>()?)
        }
    })
}

/// Object keys and short strings from a small alphabet, so patches touch the same members.
fn key(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(if bool::arbitrary(u)? { (*u.choose(&["a", "b", "c", ""])?).to_owned() } else { String::arbitrary(u)? })
}

pub(crate) fn value(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 => Value::None,
        1 => Value::Int(if bool::arbitrary(u)? { *u.choose(INTS)? } else { i64::arbitrary(u)? }),
        2 => Value::Float(if bool::arbitrary(u)? { *u.choose(FLOATS)? } else { f64::arbitrary(u)? }),
        3 => Value::Str(key(u)?),
        4 => Value::Bytes(Vec::<u8>::arbitrary(u)?),
        5 => Value::Json(json(u, 0)?),
        6 => Value::Str(json(u, 0)?.to_string()),
        _ => Value::Str(String::arbitrary(u)?),
    })
}

pub(crate) fn sample_policy(u: &mut Unstructured<'_>) -> Result<SamplePolicy> {
    Ok(SamplePolicy {
        n: u.int_in_range(1u8..=32)?,
        pick: *u.choose(&[SamplePick::First, SamplePick::Last, SamplePick::Reservoir])?,
        max_value_bytes: u.int_in_range(1u32..=64)?,
    })
}

/// One input.
#[derive(Debug)]
pub struct Input {
    pub op: MergeOp,
    pub samples: SamplePolicy,
    pub values: Vec<(Value, u64)>,
    pub split: usize,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let op = merge_op(u)?;
        let samples = sample_policy(u)?;
        let split = usize::from(u8::arbitrary(u)?);
        let mut values = Vec::new();
        while values.len() < MAX_VALUES && !u.is_empty() {
            let t = if bool::arbitrary(u)? { u64::from(u8::arbitrary(u)?) } else { u64::arbitrary(u)? };
            values.push((value(u)?, t));
        }
        Ok(Input { op, samples, values, split })
    }
}

/// Whether grouping and order provably cannot change `op`'s result (exact arithmetic).
fn exact(op: &MergeOp) -> bool {
    !matches!(op, MergeOp::SumF64 | MergeOp::Ddsketch { .. })
}

fn commutative(op: &MergeOp) -> bool {
    matches!(
        op,
        MergeOp::SumI64
            | MergeOp::Min { .. }
            | MergeOp::Max { .. }
            | MergeOp::Count
            | MergeOp::SetUnion { .. }
            | MergeOp::Hll { .. }
    )
}

/// Folds `aggs` left to right under `op`; `None` if a merge was refused (each refusal checked).
fn fold(op: &MergeOp, aggs: &[Aggregate]) -> Option<Aggregate> {
    let (first, rest) = aggs.split_first()?;
    let mut acc = first.clone();
    for a in rest {
        if !merge_one(op, &mut acc, a) {
            return None;
        }
    }
    Some(acc)
}

/// Merges `b` into `acc`, checking what a merge promises; false if it was refused.
fn merge_one(op: &MergeOp, acc: &mut Aggregate, b: &Aggregate) -> bool {
    let before = postcard::to_allocvec(acc).expect("an aggregate encodes");
    match acc.merge(b, op) {
        Ok(()) => {
            acc.check().unwrap_or_else(|e| panic!("{op:?}: a merge gave an invalid aggregate: {e}"));
            assert!(op.accepts(acc), "{op:?}: a merge gave an aggregate the operator does not accept: {acc:?}");
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert_eq!(
                postcard::to_allocvec(acc).expect("encodes"),
                before,
                "{op:?}: a refused merge ({e}) changed the older aggregate"
            );
            false
        }
    }
}

fn same(a: &Aggregate, b: &Aggregate) -> bool {
    match (a, b) {
        // -0.0 and 0.0: `f64::min`/`max` may return either; they are the same number.
        (Aggregate::MinF64(x), Aggregate::MinF64(y)) | (Aggregate::MaxF64(x), Aggregate::MaxF64(y)) => x == y,
        _ => postcard::to_allocvec(a).ok() == postcard::to_allocvec(b).ok(),
    }
}

/// Whether a run of merge patches holds the composition RFC 7386 cannot express (documented in
/// docs/architecture.md, "Merge operators"): a patch sets a member (or the whole document) to a
/// non-object or deletes it, and a later patch patches it with an object. There composing is
/// inexact — the composed patch merges into the target instead of replacing it — and the
/// grouping of the patches changes the result, so the checks below skip such runs.
pub fn merge_patch_inexpressible(patches: &[&serde_json::Value]) -> bool {
    let replaced_then_patched =
        patches.iter().enumerate().any(|(i, p)| !p.is_object() && patches[i + 1..].iter().any(|q| q.is_object()));
    if replaced_then_patched {
        return true;
    }
    let mut keys: Vec<&String> = patches.iter().filter_map(|p| p.as_object()).flat_map(|o| o.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().any(|k| {
        let children: Vec<&serde_json::Value> = patches.iter().filter_map(|p| p.get(k)).collect();
        merge_patch_inexpressible(&children)
    })
}

/// Checks that composing merge patches means applying them one after the other, to a few
/// targets, unless the run holds the documented inexpressible case.
fn merge_patch_composes(patches: &[&serde_json::Value], composed: &Aggregate) {
    let Aggregate::JsonMergePatch(composed) = composed else { return };
    if merge_patch_inexpressible(patches) {
        return;
    }
    for target in [serde_json::json!({}), serde_json::json!({"a": {"b": 1}, "c": 2}), serde_json::json!(7)] {
        let mut one_by_one = target.clone();
        for p in patches {
            json_patch::merge(&mut one_by_one, p);
        }
        let mut at_once = target;
        json_patch::merge(&mut at_once, composed);
        assert_eq!(one_by_one, at_once, "the composed patch {composed} differs from applying {patches:?} in turn");
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let op = &input.op;
    if op.validate().is_err() {
        return; // neither config nor an entry can carry it
    }
    let mut aggs = Vec::new();
    let mut samples = Vec::new();
    for (i, (v, t)) in input.values.iter().enumerate() {
        match op.lift(v, *t) {
            Ok(agg) => {
                let p = Partial { agg, inputs: 1, first_event_at: *t, last_event_at: *t, samples: None };
                p.check(op)
                    .unwrap_or_else(|e| panic!("{op:?} lifted {v:?} into a partial that fails the entry check: {e}"));
                let p = must_roundtrip(&p, "lifted partial");
                let _ = (p.agg.to_json(), p.agg.size());
                aggs.push(p.agg);
                let s = Samples::of(v, *t, i as u64, &input.samples);
                s.check().unwrap_or_else(|e| panic!("the samples of one input fail their check: {e}"));
                samples.push(s);
            }
            Err(e) => assert!(!e.code().is_empty() && !e.to_string().is_empty(), "a refused value says why"),
        }
    }

    // Every merge of a left fold, including refused ones (then the window would split).
    let mut acc: Option<Aggregate> = None;
    for a in &aggs {
        match &mut acc {
            None => acc = Some(a.clone()),
            Some(x) => {
                if !merge_one(op, x, a) {
                    acc = Some(a.clone());
                }
            }
        }
        if let Some(x) = &acc {
            let p = Partial { agg: x.clone(), inputs: 1, first_event_at: 0, last_event_at: 0, samples: None };
            p.check(op).unwrap_or_else(|e| panic!("{op:?}: a merged partial fails the entry check: {e}"));
            must_roundtrip(x, "merged aggregate");
            let _ = x.to_json();
        }
    }

    let patches: Vec<&serde_json::Value> =
        aggs.iter().filter_map(|a| if let Aggregate::JsonMergePatch(j) = a { Some(j) } else { None }).collect();
    if let Some(all) = fold(op, &aggs) {
        merge_patch_composes(&patches, &all);
    }

    // Grouping and order.
    if aggs.len() >= 3 && exact(op) && !merge_patch_inexpressible(&patches) {
        let k = 1 + input.split % (aggs.len() - 1);
        if let (Some(all), Some(mut left), Some(right)) = (fold(op, &aggs), fold(op, &aggs[..k]), fold(op, &aggs[k..]))
            && merge_one(op, &mut left, &right)
        {
            assert!(
                same(&all, &left),
                "{op:?}: merging [..{k}] with [{k}..] differs from the left fold:\n  {all:?}\n  {left:?}"
            );
            if commutative(op) {
                let reversed: Vec<_> = aggs.iter().rev().cloned().collect();
                if let Some(rev) = fold(op, &reversed) {
                    assert!(same(&all, &rev), "{op:?}: the reverse order differs:\n  {all:?}\n  {rev:?}");
                }
            }
        }
    }

    // Samples.
    if samples.len() >= 2 {
        let policy = &input.samples;
        let fold_samples = |items: &[Samples]| {
            let mut acc = Samples::default();
            for s in items {
                acc.merge(s, policy);
                assert!(acc.len() <= usize::from(policy.n), "samples exceed n = {}", policy.n);
            }
            acc
        };
        let all = fold_samples(&samples);
        all.check().unwrap_or_else(|e| panic!("merged samples fail their check: {e}"));
        must_roundtrip(&all, "merged samples");
        let k = 1 + input.split % (samples.len() - 1);
        let mut left = fold_samples(&samples[..k]);
        left.merge(&fold_samples(&samples[k..]), policy);
        let bytes = |s: &Samples| postcard::to_allocvec(s).expect("samples encode");
        assert!(
            bytes(&all) == bytes(&left),
            "{policy:?}: sample merge is not associative (split at {k}):\n  {all:?}\n  {left:?}"
        );
        if policy.pick == SamplePick::Reservoir {
            let reversed: Vec<_> = samples.iter().rev().cloned().collect();
            assert!(bytes(&all) == bytes(&fold_samples(&reversed)), "reservoir samples depend on order");
        }
    }
}
