//! HyperLogLog distinct counting with a canonical encoding.
//!
//! Registers are indexed by the top `p` bits of a 64-bit XXH3 hash of the value's canonical
//! bytes ([`crate::value::Value::canonical_bytes`]); the register holds the position of the first
//! set bit in the remaining bits (1-based). A sketch starts *sparse* (a sorted list of
//! `index << 8 | rank` for non-zero registers, a few bytes per distinct value) and turns *dense*
//! (one byte per register, `2^p` bytes) once that is smaller. Both forms are canonical: the same
//! set of inserted values always yields the same bytes, whatever the insertion or merge order —
//! a requirement for byte-identical replicas that the crates we evaluated do not meet.
//! Merging is register-wise max, so it is associative, commutative and idempotent.
//! The estimate is the classic HLL estimator with linear counting for small cardinalities;
//! the standard error is about `1.04 / sqrt(2^p)` (1.6 % at the default p = 12).

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// Smallest and largest supported precision.
pub const MIN_PRECISION: u8 = 4;
pub const MAX_PRECISION: u8 = 16;

/// A HyperLogLog sketch. Decoding checks its shape (precision, register count, index and
/// rank ranges), so a sketch from a log entry, a row or a snapshot can never index past its
/// registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedHll")]
pub struct Hll {
    precision: u8,
    repr: Repr,
}

/// [`Hll`] as decoded, before [`Hll::check`]: the same fields, so the same encoding.
#[derive(Deserialize)]
struct UncheckedHll {
    precision: u8,
    repr: Repr,
}

impl TryFrom<UncheckedHll> for Hll {
    type Error = String;

    fn try_from(u: UncheckedHll) -> Result<Self, String> {
        let h = Hll { precision: u.precision, repr: u.repr };
        h.check()?;
        Ok(h)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Repr {
    /// Sorted by index, one entry per non-zero register: `index << 8 | rank`.
    Sparse(Vec<u32>),
    /// One byte per register.
    Dense(Vec<u8>),
}

impl Hll {
    /// An empty sketch with `2^precision` registers; `precision` is clamped to the valid range.
    pub fn new(precision: u8) -> Self {
        Self { precision: precision.clamp(MIN_PRECISION, MAX_PRECISION), repr: Repr::Sparse(Vec::new()) }
    }

    /// Checks the invariants every operation relies on: precision in range; dense sketches
    /// hold exactly `2^p` registers, sparse ones strictly increasing indices below `2^p`; every
    /// rank at most `65 - p`.
    pub fn check(&self) -> Result<(), String> {
        if !(MIN_PRECISION..=MAX_PRECISION).contains(&self.precision) {
            return Err(format!(
                "HyperLogLog precision {} is outside {MIN_PRECISION}..={MAX_PRECISION}",
                self.precision
            ));
        }
        let m = self.registers();
        let max_rank = 65 - u32::from(self.precision);
        match &self.repr {
            Repr::Dense(regs) => {
                if regs.len() != m {
                    return Err(format!(
                        "HyperLogLog has {} registers, precision {} needs {m}",
                        regs.len(),
                        self.precision
                    ));
                }
                if regs.iter().any(|&r| u32::from(r) > max_rank) {
                    return Err(format!("HyperLogLog register rank above {max_rank}"));
                }
            }
            Repr::Sparse(entries) => {
                let mut last = None;
                for e in entries {
                    let (index, rank) = (e >> 8, e & 0xff);
                    if index as usize >= m || rank == 0 || rank > max_rank || last.is_some_and(|l| l >= index) {
                        return Err(format!(
                            "HyperLogLog sparse entry {e:#x} is out of order or range (precision {})",
                            self.precision
                        ));
                    }
                    last = Some(index);
                }
            }
        }
        Ok(())
    }

    /// The sketch's precision.
    pub fn precision(&self) -> u8 {
        self.precision
    }

    /// Adds a value given by its canonical bytes.
    pub fn insert(&mut self, bytes: &[u8]) {
        self.insert_hash(xxh3_64(bytes));
    }

    /// Adds a value given by its 64-bit hash.
    pub fn insert_hash(&mut self, hash: u64) {
        let p = u32::from(self.precision);
        let index = (hash >> (64 - p)) as u32;
        let rest = hash << p;
        // Rank = 1-based position of the first set bit in the remaining 64 - p bits.
        let rank = (rest.leading_zeros().min(64 - p) + 1) as u8;
        self.set_max(index, rank);
    }

    fn set_max(&mut self, index: u32, rank: u8) {
        match &mut self.repr {
            Repr::Dense(regs) => {
                let r = &mut regs[index as usize];
                *r = (*r).max(rank);
            }
            Repr::Sparse(entries) => {
                match entries.binary_search_by_key(&index, |e| e >> 8) {
                    Ok(pos) => {
                        let old = (entries[pos] & 0xff) as u8;
                        if rank > old {
                            entries[pos] = index << 8 | u32::from(rank);
                        }
                    }
                    Err(pos) => entries.insert(pos, index << 8 | u32::from(rank)),
                }
                self.maybe_densify();
            }
        }
    }

    fn registers(&self) -> usize {
        1usize << self.precision
    }

    fn maybe_densify(&mut self) {
        let m = self.registers();
        if let Repr::Sparse(entries) = &self.repr {
            // 4 bytes per sparse entry vs 1 byte per dense register.
            if entries.len() * 4 >= m {
                let mut regs = vec![0u8; m];
                for e in entries {
                    regs[(e >> 8) as usize] = (e & 0xff) as u8;
                }
                self.repr = Repr::Dense(regs);
            }
        }
    }

    /// Merges `other` into `self`. Sketches of different precision cannot be merged.
    pub fn merge(&mut self, other: &Hll) -> Result<(), PrecisionMismatch> {
        if self.precision != other.precision {
            return Err(PrecisionMismatch { have: self.precision, got: other.precision });
        }
        match &other.repr {
            Repr::Sparse(entries) => {
                for e in entries {
                    self.set_max(e >> 8, (e & 0xff) as u8);
                }
            }
            Repr::Dense(regs) => {
                if let Repr::Sparse(_) = self.repr {
                    let mut dense = Hll { precision: self.precision, repr: Repr::Dense(regs.clone()) };
                    dense.merge(self)?;
                    *self = dense;
                    return Ok(());
                }
                if let Repr::Dense(mine) = &mut self.repr {
                    for (a, b) in mine.iter_mut().zip(regs) {
                        *a = (*a).max(*b);
                    }
                }
            }
        }
        Ok(())
    }

    /// The estimated number of distinct values inserted.
    pub fn estimate(&self) -> u64 {
        let m = self.registers() as f64;
        let (sum, zeros) = match &self.repr {
            Repr::Sparse(entries) => {
                let nonzero = entries.len();
                let sum: f64 = entries.iter().map(|e| 2f64.powi(-i32::from((e & 0xff) as u8))).sum::<f64>()
                    + (self.registers() - nonzero) as f64;
                (sum, self.registers() - nonzero)
            }
            Repr::Dense(regs) => {
                let sum = regs.iter().map(|&r| 2f64.powi(-i32::from(r))).sum::<f64>();
                (sum, regs.iter().filter(|&&r| r == 0).count())
            }
        };
        let alpha = match self.registers() {
            16 => 0.673,
            32 => 0.697,
            64 => 0.709,
            n => 0.7213 / (1.0 + 1.079 / n as f64),
        };
        let raw = alpha * m * m / sum;
        let est = if raw <= 2.5 * m && zeros > 0 { m * (m / zeros as f64).ln() } else { raw };
        est.round() as u64
    }

    /// Bytes the sketch occupies (for buffer accounting).
    pub fn size(&self) -> usize {
        match &self.repr {
            Repr::Sparse(e) => 8 + e.len() * 4,
            Repr::Dense(r) => 8 + r.len(),
        }
    }
}

/// Two sketches of different precision were merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("HyperLogLog precision mismatch: {have} vs {got}")]
pub struct PrecisionMismatch {
    pub have: u8,
    pub got: u8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn estimate_is_close_to_exact() {
        for &n in &[0u64, 1, 10, 100, 1_000, 10_000, 100_000] {
            let mut h = Hll::new(12);
            for i in 0..n {
                h.insert(format!("item-{i}").as_bytes());
                h.insert(format!("item-{i}").as_bytes()); // duplicates do not count
            }
            let est = h.estimate() as f64;
            let err = if n == 0 { est } else { (est - n as f64).abs() / n as f64 };
            assert!(err <= 0.05, "n={n} est={est} err={err}");
        }
    }

    proptest! {
        #[test]
        fn merge_is_order_independent_and_canonical(a in prop::collection::vec(any::<u32>(), 0..600),
                                                     b in prop::collection::vec(any::<u32>(), 0..600)) {
            let sketch = |xs: &[u32]| { let mut h = Hll::new(8); for x in xs { h.insert(&x.to_be_bytes()); } h };
            let mut ab = sketch(&a); ab.merge(&sketch(&b)).unwrap();
            let mut ba = sketch(&b); ba.merge(&sketch(&a)).unwrap();
            let all: Vec<u32> = a.iter().chain(b.iter()).copied().collect();
            let direct = sketch(&all);
            let bytes = |h: &Hll| postcard::to_allocvec(h).unwrap();
            prop_assert_eq!(bytes(&ab), bytes(&ba));
            prop_assert_eq!(bytes(&ab), bytes(&direct));
        }
    }

    #[test]
    fn decoding_refuses_sketches_that_would_index_out_of_range() {
        let encode = |precision: u8, repr: Repr| postcard::to_allocvec(&Hll { precision, repr }).unwrap();
        let decode = |b: &[u8]| postcard::from_bytes::<Hll>(b);
        let mut good = Hll::new(4);
        for i in 0..100u32 {
            good.insert(&i.to_be_bytes());
        }
        assert_eq!(decode(&postcard::to_allocvec(&good).unwrap()).unwrap(), good);
        assert!(decode(&encode(4, Repr::Dense(vec![0; 15]))).is_err(), "short register array");
        assert!(decode(&encode(4, Repr::Dense(vec![62; 16]))).is_err(), "rank too high");
        assert!(decode(&encode(17, Repr::Sparse(vec![]))).is_err(), "precision too high");
        assert!(decode(&encode(4, Repr::Sparse(vec![16 << 8 | 1]))).is_err(), "index past the registers");
        assert!(decode(&encode(4, Repr::Sparse(vec![2 << 8 | 1, 1 << 8 | 1]))).is_err(), "unsorted");
        assert!(decode(&encode(4, Repr::Sparse(vec![2 << 8]))).is_err(), "zero rank");
        assert!(decode(&encode(4, Repr::Sparse(vec![2 << 8 | 3, 5 << 8 | 61]))).is_ok());
    }

    #[test]
    fn precision_mismatch_is_an_error() {
        let mut a = Hll::new(10);
        assert_eq!(a.merge(&Hll::new(12)), Err(PrecisionMismatch { have: 10, got: 12 }));
    }
}
