//! The RandomFold map of STABLE-RPS and its sign hash.
//!
//! Positions `p` of a virtual array are cut into folds of `m` (`k = p / m`,
//! `r = p % m`); fold `k` is the pool rotated by `H(k)`:
//!
//! ```text
//! h(p)  = (H(k) + r) mod m
//! H(k)  = ((a k + b k^2 + c) mod P) mod m,   P = 2038074743
//! xi(p) = sigma(k) * tau(r)                  (graft's sign hash, see below)
//! ```
//!
//! Every fold is a bijection onto `[0, m)`, so each slot is hit `floor(n/m)` or
//! `ceil(n/m)` times and at `m = n` the map is a permutation.
//!
//! **Constants** (reproducible from the seed, never stored as indices): a
//! [`SplitMix64`] stream seeded with the mapper's seed gives, in order, `a`, `b`, `c`
//! (each `(x mod (P - 1)) | 1`: odd, in `[1, P - 2]`), then the sign keys `key_r`
//! and `key_k` (raw 64-bit outputs).
//!
//! **Sign hash (design)**: `tau(r) = -1` when bit 63 of `mix64(key_r ^ r)` is set,
//! else `+1`; `sigma(k)` likewise from `mix64(key_k ^ k)`. Two positions sharing a
//! slot come from different folds, so they sit at different offsets `r` (unless the
//! folds have the same shift, where `sigma` differs at random): their relative
//! sign is random, as a per-position hash would make it. But inside a fold the sign
//! is a fixed table times one factor, so a contiguous range maps to a few runs
//! `(tensor span, r span, slot span, sigma)` where expand and scatter are
//! straight loops over three contiguous slices (see [`RandomFold::runs`]).

/// The prime of the fold hash `H`.
pub const PRIME: u64 = 2_038_074_743;

/// The mapper's name in `.rps` files.
pub const MAPPER_NAME: &str = "random-fold";

/// The splitmix64 finalizer (Steele, Lea, Flood 2014): a bijective 64-bit mix.
pub fn mix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64: `state += 0x9E3779B97F4A7C15`, output `mix64(state)`. Small, fast
/// and fully specified, so files and initial pools are reproducible from a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)` with 24 random bits (exact in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

/// The constants of a RandomFold map, all derived from its seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoldConstants {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    /// Key of the per-offset sign `tau(r)`.
    pub key_r: u64,
    /// Key of the per-fold sign `sigma(k)`.
    pub key_k: u64,
}

impl FoldConstants {
    /// The constants a mapper seeded with `seed` uses.
    pub fn from_seed(seed: u64) -> Self {
        let mut g = SplitMix64::new(seed);
        let mut odd = || (g.next_u64() % (PRIME - 1)) | 1;
        let (a, b, c) = (odd(), odd(), odd());
        FoldConstants {
            a,
            b,
            c,
            key_r: g.next_u64(),
            key_k: g.next_u64(),
        }
    }
}

/// One stretch of a tensor that maps to consecutive slots: tensor elements
/// `i..i + len` use slots `j..j + len` with signs `sigma * tau[r..r + len]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    /// First element, relative to the start of the range.
    pub i: usize,
    /// Offset in the fold of the first element (index into [`RandomFold::tau`]).
    pub r: usize,
    /// First slot.
    pub j: usize,
    pub len: usize,
    /// The fold's sign, +1 or -1.
    pub sigma: f32,
}

/// A RandomFold map onto `m` slots, with its sign table.
#[derive(Debug, Clone)]
pub struct RandomFold {
    m: u64,
    seed: u64,
    consts: FoldConstants,
    /// `tau(r)` for `r` in `[0, m)`, as +1.0 / -1.0 so loops multiply by it.
    tau: Vec<f32>,
}

fn sign_bit(x: u64) -> f32 {
    if x >> 63 == 1 {
        -1.0
    } else {
        1.0
    }
}

impl RandomFold {
    /// The map onto `m >= 1` slots drawn from `seed` (`None` for `m == 0` or an `m`
    /// this machine cannot index).
    pub fn new(m: u64, seed: u64) -> Option<Self> {
        if m == 0 {
            return None;
        }
        let mu = usize::try_from(m).ok()?;
        let consts = FoldConstants::from_seed(seed);
        let tau = (0..mu as u64)
            .map(|r| sign_bit(mix64(consts.key_r ^ r)))
            .collect();
        Some(RandomFold {
            m,
            seed,
            consts,
            tau,
        })
    }

    pub fn m(&self) -> u64 {
        self.m
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn constants(&self) -> FoldConstants {
        self.consts
    }

    /// `tau(r)` for every offset of a fold.
    pub fn tau(&self) -> &[f32] {
        &self.tau
    }

    /// The shift of fold `k`, `H(k)`. Reducing `k` mod P first keeps every product
    /// below 2^63 and gives the same value as exact integer arithmetic.
    pub fn fold_shift(&self, k: u64) -> u64 {
        let FoldConstants { a, b, c, .. } = self.consts;
        let k = k % PRIME;
        let k2 = k * k % PRIME;
        ((a * k + b * k2 + c) % PRIME) % self.m
    }

    /// `sigma(k)`, the sign of fold `k`.
    pub fn fold_sign(&self, k: u64) -> f32 {
        sign_bit(mix64(self.consts.key_k ^ k))
    }

    /// The slot of position `p`.
    pub fn slot(&self, p: u64) -> u64 {
        let (k, r) = (p / self.m, p % self.m);
        // r < m and H < m, so the sum cannot overflow when m < 2^63; u128 for the rest.
        ((self.fold_shift(k) as u128 + r as u128) % self.m as u128) as u64
    }

    /// The sign `xi(p)` of position `p`.
    pub fn sign(&self, p: u64) -> f32 {
        let (k, r) = (p / self.m, p % self.m);
        self.fold_sign(k) * self.tau[r as usize]
    }

    /// The runs covering positions `offset..offset + len`: at most two per fold
    /// touched (one where the rotated fold wraps past slot `m - 1`).
    pub fn runs(&self, offset: u64, len: u64) -> Runs<'_> {
        Runs {
            fold: self,
            start: offset,
            p: offset,
            end: offset.saturating_add(len),
            pending: None,
        }
    }
}

/// Iterator of [`RandomFold::runs`].
pub struct Runs<'a> {
    fold: &'a RandomFold,
    start: u64,
    p: u64,
    end: u64,
    /// The second half of a wrapped fold segment.
    pending: Option<Run>,
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if let Some(r) = self.pending.take() {
            return Some(r);
        }
        if self.p >= self.end {
            return None;
        }
        let m = self.fold.m;
        let (k, r) = (self.p / m, self.p % m);
        // The fold ends at (k + 1) m; m - r avoids overflowing that product.
        let seg = (m - r).min(self.end - self.p);
        let j = (self.fold.fold_shift(k) as u128 + r as u128) % m as u128;
        let j = j as u64;
        let first = seg.min(m - j);
        let sigma = self.fold.fold_sign(k);
        // Lengths and indices are below m or the range length, both usize-sized
        // (m is checked at construction, ranges index tensors in memory).
        let i = (self.p - self.start) as usize;
        let run = Run {
            i,
            r: r as usize,
            j: j as usize,
            len: first as usize,
            sigma,
        };
        if seg > first {
            self.pending = Some(Run {
                i: i + first as usize,
                r: (r + first) as usize,
                j: 0,
                len: (seg - first) as usize,
                sigma,
            });
        }
        self.p += seg;
        Some(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_odd_and_below_the_prime() {
        for seed in [0, 1, 123321, u64::MAX] {
            let c = FoldConstants::from_seed(seed);
            for v in [c.a, c.b, c.c] {
                assert!(v % 2 == 1 && v < PRIME, "{v}");
            }
        }
        assert_ne!(FoldConstants::from_seed(1), FoldConstants::from_seed(2));
    }

    #[test]
    fn splitmix_matches_the_published_sequence() {
        // Reference outputs of splitmix64 seeded with 1234567 (the generator's
        // original test vector).
        let mut g = SplitMix64::new(1234567);
        let want = [
            6457827717110365317u64,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ];
        for w in want {
            assert_eq!(g.next_u64(), w);
        }
    }

    #[test]
    fn fold_shift_equals_exact_integer_arithmetic() {
        let f = RandomFold::new(1000, 5).unwrap();
        let FoldConstants { a, b, c, .. } = f.constants();
        for k in [
            0u64,
            1,
            2,
            999,
            PRIME - 1,
            PRIME,
            PRIME + 7,
            1 << 40,
            u64::MAX / 3,
        ] {
            let (a, b, c, kk) = (a as u128, b as u128, c as u128, k as u128);
            // a k + b k^2 + c in u128 overflows for k >= 2^48; reduce k^2 exactly.
            let k2 = (kk % PRIME as u128) * (kk % PRIME as u128);
            let exact = ((a * (kk % PRIME as u128) + b * k2 + c) % PRIME as u128) % 1000;
            if k < 1 << 48 {
                let direct = ((a * kk + b * kk * kk + c) % PRIME as u128) % 1000;
                assert_eq!(direct, exact);
            }
            assert_eq!(f.fold_shift(k) as u128, exact, "k = {k}");
        }
    }

    #[test]
    fn runs_agree_with_per_position_hashing() {
        for (m, off, len) in [
            (7u64, 0u64, 50u64),
            (7, 3, 4),
            (13, 20, 1),
            (1, 5, 9),
            (64, 100, 300),
        ] {
            let f = RandomFold::new(m, 99).unwrap();
            let mut seen = vec![false; len as usize];
            for run in f.runs(off, len) {
                assert!(
                    run.len > 0 && run.j + run.len <= m as usize && run.r + run.len <= m as usize
                );
                for t in 0..run.len {
                    let p = off + (run.i + t) as u64;
                    assert!(!seen[run.i + t]);
                    seen[run.i + t] = true;
                    assert_eq!(f.slot(p), (run.j + t) as u64);
                    assert_eq!(f.sign(p), run.sigma * f.tau()[run.r + t]);
                }
            }
            assert!(seen.iter().all(|&s| s), "m {m}: not every element covered");
        }
    }

    #[test]
    fn zero_slots_is_refused() {
        assert!(RandomFold::new(0, 1).is_none());
    }
}
