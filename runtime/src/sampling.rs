//! Token sampling and stop strings.
//!
//! [`Sampler`] follows llama.cpp's default sampler chain: penalties → top-k → top-p →
//! min-p → temperature → draw. Top-p and min-p therefore look at the distribution
//! before temperature, as in llama.cpp. With `temperature <= 0` it is greedy: the
//! argmax of the penalised logits, ties going to the lowest token id (the filters can
//! never drop the argmax, so they are skipped).
//!
//! Randomness comes from a self-contained xoshiro256** generator seeded through
//! splitmix64, so a seed gives the same tokens on every platform and across
//! dependency upgrades (the `rand` crate documents `StdRng` as not reproducible across
//! its versions).
//!
//! [`StopChecker`] holds back streamed text that might be the start of a stop string,
//! so a caller never emits text that later turns out to belong to a stop sequence.

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};

/// Sampling configuration. Neutral values turn a stage off.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` or below means greedy decoding.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; `0` = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p`; `1` = off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's; `0` = off.
    pub min_p: f32,
    /// Divides positive (multiplies non-positive) logits of recent tokens; `1` = off.
    pub repetition_penalty: f32,
    /// Subtracted once per occurrence of a token in the window (OpenAI's definition).
    pub frequency_penalty: f32,
    /// Subtracted once from any token present in the window (OpenAI's definition).
    pub presence_penalty: f32,
    /// How many of the most recent accepted tokens the penalties look at; `0` = off.
    pub penalty_last_n: usize,
    /// Seed of the random generator; the same seed replays the same draws.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// llama.cpp's command-line defaults (its default seed is random; ours is fixed, so
    /// callers wanting varied output pass their own seed).
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with every other stage off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field's range, naming the first bad one.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let check = |field: &'static str, found: f32, ok: bool, expected: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(SamplingError::OutOfRange {
                    field,
                    found,
                    expected,
                })
            }
        };
        let t = self.temperature;
        // Any finite value: llama.cpp treats a negative temperature as greedy too.
        check(
            "temperature",
            t,
            t.is_finite(),
            "a finite value (<= 0 = greedy)",
        )?;
        let p = self.top_p;
        check("top_p", p, (0.0..=1.0).contains(&p), "[0, 1] (1 = off)")?;
        let m = self.min_p;
        check("min_p", m, (0.0..=1.0).contains(&m), "[0, 1] (0 = off)")?;
        let r = self.repetition_penalty;
        check(
            "repetition_penalty",
            r,
            r.is_finite() && r > 0.0,
            "a finite value > 0 (1 = off)",
        )?;
        // OpenAI's documented range for both.
        let f = self.frequency_penalty;
        check(
            "frequency_penalty",
            f,
            (-2.0..=2.0).contains(&f),
            "[-2, 2] (0 = off)",
        )?;
        let pr = self.presence_penalty;
        check(
            "presence_penalty",
            pr,
            (-2.0..=2.0).contains(&pr),
            "[-2, 2] (0 = off)",
        )?;
        Ok(())
    }

    fn penalties_active(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repetition_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("sampling parameter `{field}` is {found}, expected {expected}")]
    OutOfRange {
        field: &'static str,
        found: f32,
        expected: &'static str,
    },
    #[error("cannot sample from an empty vocabulary")]
    EmptyVocab,
    #[error("no token to sample: all {n} logits are NaN or -inf")]
    NoFiniteLogits { n: usize },
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64 as its authors advise.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn from_seed(seed: u64) -> Self {
        let mut x = seed;
        let mut splitmix = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [splitmix(), splitmix(), splitmix(), splitmix()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    logit: f32,
}

/// Most likely first; equal logits by lowest id, so every step is deterministic.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit
        .partial_cmp(&a.logit)
        .unwrap_or(Ordering::Equal)
        .then(a.id.cmp(&b.id))
}

/// One token's penalised logit, `count` being its occurrences in the window (> 0).
fn penalize(p: &SamplingParams, logit: f32, count: u32) -> f32 {
    // As llama.cpp: a non-positive logit is multiplied (zero stays zero), so a
    // repetition penalty > 1 always makes the token less likely.
    let l = if logit <= 0.0 {
        logit * p.repetition_penalty
    } else {
        logit / p.repetition_penalty
    };
    l - (count as f32 * p.frequency_penalty + p.presence_penalty)
}

/// Samples one token per step from a row of logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    n_vocab: usize,
    rng: Xoshiro256,
    /// The last `penalty_last_n` accepted tokens, oldest first.
    history: VecDeque<u32>,
    /// Occurrences of each token in `history`.
    counts: HashMap<u32, u32>,
    /// Scratch reused across steps (a vocabulary is ~10^5 entries).
    cands: Vec<Candidate>,
    weights: Vec<f64>,
}

/// What the chain leaves: one token (greedy) or candidates in `Sampler::cands`.
enum Chain {
    Greedy(u32),
    Distribution,
}

impl Sampler {
    /// A sampler for a vocabulary of `n_vocab` tokens; logits past `n_vocab` (padding
    /// rows some checkpoints carry) are never sampled.
    pub fn new(params: SamplingParams, n_vocab: usize) -> Result<Self, SamplingError> {
        params.validate()?;
        if n_vocab == 0 {
            return Err(SamplingError::EmptyVocab);
        }
        Ok(Self {
            rng: Xoshiro256::from_seed(params.seed),
            history: VecDeque::with_capacity(params.penalty_last_n.min(4096)),
            counts: HashMap::new(),
            cands: Vec::new(),
            weights: Vec::new(),
            params,
            n_vocab,
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Forgets the token history and restarts the generator from the seed.
    pub fn reset(&mut self) {
        self.history.clear();
        self.counts.clear();
        self.rng = Xoshiro256::from_seed(self.params.seed);
    }

    /// Records a generated (or prompt) token for the penalties.
    pub fn accept(&mut self, token: u32) {
        let n = self.params.penalty_last_n;
        if n == 0 {
            return;
        }
        if self.history.len() == n {
            if let Some(old) = self.history.pop_front() {
                if let Some(c) = self.counts.get_mut(&old) {
                    *c -= 1;
                    if *c == 0 {
                        self.counts.remove(&old);
                    }
                }
            }
        }
        self.history.push_back(token);
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Applies the repetition, frequency and presence penalties for the recorded
    /// history to `logits` in place (ids past its end are ignored).
    pub fn apply_penalties(&self, logits: &mut [f32]) {
        if !self.params.penalties_active() {
            return;
        }
        let p = &self.params;
        for (&token, &count) in &self.counts {
            if let Some(l) = logits.get_mut(token as usize) {
                *l = penalize(p, *l, count);
            }
        }
    }

    /// Samples a token. Never panics: when nothing can be sampled (empty logits, or
    /// every logit NaN or -inf) it returns token 0; use [`Sampler::try_sample`] to see
    /// why.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.try_sample(logits).unwrap_or(0)
    }

    /// Samples a token, or says why none can be.
    pub fn try_sample(&mut self, logits: &[f32]) -> Result<u32, SamplingError> {
        match self.run_chain(logits)? {
            Chain::Greedy(id) => Ok(id),
            Chain::Distribution => {
                let total = self.fill_weights();
                let mut u = self.rng.next_f64() * total;
                for (c, &w) in self.cands.iter().zip(&self.weights) {
                    if u < w {
                        return Ok(c.id);
                    }
                    u -= w;
                }
                // Rounding left `u` just past the last weight.
                self.cands
                    .last()
                    .map(|c| c.id)
                    .ok_or(SamplingError::NoFiniteLogits { n: logits.len() })
            }
        }
    }

    /// The distribution the next [`Sampler::try_sample`] would draw from: surviving
    /// tokens with their probabilities, most likely first. Draws nothing.
    pub fn probabilities(&mut self, logits: &[f32]) -> Result<Vec<(u32, f32)>, SamplingError> {
        match self.run_chain(logits)? {
            Chain::Greedy(id) => Ok(vec![(id, 1.0)]),
            Chain::Distribution => {
                let total = self.fill_weights();
                let mut out: Vec<(u32, f32)> = self
                    .cands
                    .iter()
                    .zip(&self.weights)
                    .map(|(c, &w)| (c.id, (w / total) as f32))
                    .collect();
                out.sort_by(|a, b| {
                    b.1.partial_cmp(&a.1)
                        .unwrap_or(Ordering::Equal)
                        .then(a.0.cmp(&b.0))
                });
                Ok(out)
            }
        }
    }

    /// Penalties and filters; leaves survivors in `self.cands` (all finite logits).
    fn run_chain(&mut self, logits: &[f32]) -> Result<Chain, SamplingError> {
        let n = logits.len().min(self.n_vocab).min(u32::MAX as usize);
        if n == 0 {
            return Err(SamplingError::EmptyVocab);
        }
        let no_token = SamplingError::NoFiniteLogits { n };
        self.cands.clear();
        self.cands
            .extend(logits[..n].iter().enumerate().map(|(i, &l)| Candidate {
                id: i as u32,
                // A NaN logit can never be chosen.
                logit: if l.is_nan() { f32::NEG_INFINITY } else { l },
            }));
        if self.params.penalties_active() {
            // `cands[i].id == i` here, so the ids index the candidates directly.
            let p = &self.params;
            for (&token, &count) in &self.counts {
                if let Some(c) = self.cands.get_mut(token as usize) {
                    // Finite penalties keep ±inf as they are: no NaN appears.
                    c.logit = penalize(p, c.logit, count);
                }
            }
        }

        if self.params.temperature <= 0.0 {
            // Strictly greater keeps the lowest id among equal maxima.
            let mut best = Candidate {
                id: 0,
                logit: f32::NEG_INFINITY,
            };
            for c in &self.cands {
                if c.logit > best.logit {
                    best = *c;
                }
            }
            return if best.logit > f32::NEG_INFINITY {
                Ok(Chain::Greedy(best.id))
            } else {
                Err(no_token)
            };
        }

        self.cands.retain(|c| c.logit > f32::NEG_INFINITY);
        if self.cands.is_empty() {
            return Err(no_token);
        }
        // +inf logits hold all the mass: keep them, equally likely.
        if self.cands.iter().any(|c| c.logit == f32::INFINITY) {
            self.cands.retain(|c| c.logit == f32::INFINITY);
            for c in &mut self.cands {
                c.logit = 0.0;
            }
        }

        let k = self.params.top_k;
        if k > 0 && k < self.cands.len() {
            self.cands.select_nth_unstable_by(k - 1, by_logit_desc);
            self.cands.truncate(k);
        }

        let top_p = self.params.top_p;
        if top_p < 1.0 {
            self.cands.sort_unstable_by(by_logit_desc);
            // Softmax without temperature, as llama.cpp orders the chain.
            let max = self.cands[0].logit as f64;
            let mut total = 0.0f64;
            self.weights.clear();
            for c in &self.cands {
                let w = (c.logit as f64 - max).exp();
                self.weights.push(w);
                total += w;
            }
            let target = top_p as f64 * total;
            let mut cum = 0.0f64;
            let mut keep = self.cands.len();
            for (i, &w) in self.weights.iter().enumerate() {
                cum += w;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.cands.truncate(keep);
        }

        let min_p = self.params.min_p;
        if min_p > 0.0 {
            let max = self
                .cands
                .iter()
                .map(|c| c.logit)
                .fold(f32::NEG_INFINITY, f32::max) as f64;
            // p_i >= min_p * p_max  <=>  logit_i - logit_max >= ln(min_p).
            let floor = (min_p as f64).ln();
            self.cands.retain(|c| c.logit as f64 - max >= floor);
        }

        Ok(Chain::Distribution)
    }

    /// Tempered softmax weights of `self.cands` (unnormalised); returns their sum.
    fn fill_weights(&mut self) -> f64 {
        let t = self.params.temperature as f64;
        let max = self
            .cands
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        self.weights.clear();
        let mut total = 0.0f64;
        for c in &self.cands {
            // Dividing the (non-positive) difference keeps huge logits or a tiny
            // temperature from overflowing: the result is at most exp(0) = 1.
            let w = ((c.logit as f64 - max) / t).exp();
            self.weights.push(w);
            total += w;
        }
        total
    }
}

/// What [`StopChecker::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopResult {
    /// Text that is safe to show: it cannot be part of a stop string.
    pub emit: String,
    /// A stop string was found; `emit` ends right before it and generation should stop.
    pub stopped: bool,
}

/// Finds stop strings in streamed text, holding back any suffix that could still grow
/// into one.
#[derive(Debug, Clone)]
pub struct StopChecker {
    stops: Vec<String>,
    /// Text received but not yet emitted: always a prefix of some stop string.
    pending: String,
    stopped: Option<usize>,
}

impl StopChecker {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|s| !s.is_empty())
                .collect(),
            pending: String::new(),
            stopped: None,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// The stop string that ended the stream, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.stopped
            .and_then(|i| self.stops.get(i))
            .map(String::as_str)
    }

    /// Feeds the next piece of text. After a stop, everything is swallowed.
    pub fn push(&mut self, text: &str) -> StopResult {
        if self.stopped.is_some() {
            return StopResult {
                emit: String::new(),
                stopped: true,
            };
        }
        self.pending.push_str(text);

        // The earliest occurrence of any stop string wins.
        let first = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, stop)| self.pending.find(stop.as_str()).map(|pos| (pos, i)))
            .min();
        if let Some((pos, i)) = first {
            self.pending.truncate(pos);
            self.stopped = Some(i);
            return StopResult {
                emit: std::mem::take(&mut self.pending),
                stopped: true,
            };
        }

        let hold = self.held_suffix_len();
        let emit = self.pending[..self.pending.len() - hold].to_owned();
        self.pending.drain(..self.pending.len() - hold);
        StopResult {
            emit,
            stopped: false,
        }
    }

    /// Ends the stream: returns the held-back text, which can no longer become a stop
    /// string (nothing after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop
    /// string. Char boundaries are checked because a stop string starts on one.
    fn held_suffix_len(&self) -> usize {
        let text = self.pending.as_bytes();
        let longest = self
            .stops
            .iter()
            .map(|s| s.len() - 1)
            .max()
            .unwrap_or(0)
            .min(text.len());
        (1..=longest)
            .rev()
            .find(|&k| {
                let start = text.len() - k;
                self.pending.is_char_boundary(start)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.as_bytes().starts_with(&text[start..]))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: 42,
        }
    }

    fn sampler(p: SamplingParams, n_vocab: usize) -> Sampler {
        match Sampler::new(p, n_vocab) {
            Ok(s) => s,
            Err(e) => panic!("sampler: {e}"),
        }
    }

    /// Logits whose softmax is `probs` (which need not sum to exactly 1).
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn ids(dist: &[(u32, f32)]) -> Vec<u32> {
        dist.iter().map(|d| d.0).collect()
    }

    fn lcg_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
            })
            .collect()
    }

    #[test]
    fn xoshiro_matches_reference_outputs() {
        // Reference xoshiro256** from state {1, 2, 3, 4}.
        let mut r = Xoshiro256 { s: [1, 2, 3, 4] };
        assert_eq!(r.next_u64(), 11520);
        assert_eq!(r.next_u64(), 0);
        assert_eq!(r.next_u64(), 1509978240);
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut s = sampler(params(0.0), 6);
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.5, 0.0, 1.9]), 1);
        assert_eq!(s.sample(&[0.5, 3.0, 3.0, 1.0, 3.0, -2.0]), 1);
        let mut neg = sampler(
            SamplingParams {
                temperature: -1.0,
                ..params(0.0)
            },
            3,
        );
        assert_eq!(neg.sample(&[-3.0, -1.0, -2.0]), 1);
        for seed in 0..20 {
            let logits = lcg_logits(1000, seed);
            let argmax = logits
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &l)| if l > b.1 { (i, l) } else { b },
                )
                .0;
            let mut big = sampler(params(0.0), 1000);
            assert_eq!(big.sample(&logits) as usize, argmax);
        }
    }

    #[test]
    fn greedy_uses_penalised_logits() {
        let mut s = sampler(
            SamplingParams {
                repetition_penalty: 2.0,
                ..params(0.0)
            },
            3,
        );
        s.accept(0);
        // 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(s.sample(&[3.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_for_any_temperature() {
        for (i, &t) in [0.1f32, 0.7, 1.0, 2.0, 50.0].iter().enumerate() {
            let mut s = sampler(
                SamplingParams {
                    top_k: 1,
                    seed: i as u64,
                    ..params(t)
                },
                500,
            );
            for step in 0..20 {
                let logits = lcg_logits(500, step * 7 + 1);
                let mut g = sampler(params(0.0), 500);
                assert_eq!(s.sample(&logits), g.sample(&logits), "temperature {t}");
            }
        }
        // Ties under top-k = 1 keep the lowest id, as greedy does.
        let mut s = sampler(
            SamplingParams {
                top_k: 1,
                ..params(1.0)
            },
            4,
        );
        for _ in 0..10 {
            assert_eq!(s.sample(&[0.0, 5.0, 5.0, 5.0]), 1);
        }
    }

    #[test]
    fn same_seed_same_sequence_different_seeds_differ() {
        let run = |seed: u64| {
            let mut s = sampler(
                SamplingParams {
                    seed,
                    ..SamplingParams::default()
                },
                256,
            );
            (0..64)
                .map(|step| {
                    let t = s.sample(&lcg_logits(256, step));
                    s.accept(t);
                    t
                })
                .collect::<Vec<u32>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // `reset` replays from the seed.
        let mut s = sampler(params(1.0), 256);
        let a: Vec<u32> = (0..32).map(|i| s.sample(&lcg_logits(256, i))).collect();
        s.reset();
        let b: Vec<u32> = (0..32).map(|i| s.sample(&lcg_logits(256, i))).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn top_p_keeps_the_minimal_nucleus() {
        let logits = logits_of(&[0.1, 0.4, 0.2, 0.3]);
        let keep = |top_p: f32| {
            let mut s = sampler(
                SamplingParams {
                    top_p,
                    ..params(1.0)
                },
                4,
            );
            match s.probabilities(&logits) {
                Ok(d) => d,
                Err(e) => panic!("{e}"),
            }
        };
        // 0.4 alone reaches 0.35; 0.4 + 0.3 = 0.7 is the first to reach 0.6.
        assert_eq!(ids(&keep(0.35)), vec![1]);
        assert_eq!(ids(&keep(0.6)), vec![1, 3]);
        assert_eq!(ids(&keep(0.85)), vec![1, 3, 2]);
        assert_eq!(ids(&keep(0.95)), vec![1, 3, 2, 0]);
        assert_eq!(ids(&keep(0.0)), vec![1]);
        // The survivors are renormalised: 0.4/0.7 and 0.3/0.7.
        let d = keep(0.6);
        assert!((d[0].1 - 4.0 / 7.0).abs() < 1e-6 && (d[1].1 - 3.0 / 7.0).abs() < 1e-6);
        // The sampler never draws outside the nucleus.
        let mut s = sampler(
            SamplingParams {
                top_p: 0.6,
                ..params(1.0)
            },
            4,
        );
        for _ in 0..2000 {
            let t = s.sample(&logits);
            assert!(t == 1 || t == 3, "{t}");
        }
    }

    #[test]
    fn top_p_is_taken_before_temperature() {
        // At temperature 1, 0.5 covers top_p 0.5 alone; a high temperature would flatten
        // the distribution and keep more if it ran first (llama.cpp's order: it does not).
        let logits = logits_of(&[0.5, 0.3, 0.2]);
        let mut s = sampler(
            SamplingParams {
                top_p: 0.5,
                ..params(10.0)
            },
            3,
        );
        assert_eq!(s.probabilities(&logits).map(|d| ids(&d)), Ok(vec![0]));
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        let logits = logits_of(&[0.05, 0.5, 0.15, 0.3]);
        let keep = |min_p: f32| {
            let mut s = sampler(
                SamplingParams {
                    min_p,
                    ..params(1.0)
                },
                4,
            );
            s.probabilities(&logits).map(|d| ids(&d))
        };
        // Floors: 0.2 * 0.5 = 0.1, 0.5 * 0.5 = 0.25, 0.9 * 0.5 = 0.45.
        assert_eq!(keep(0.2), Ok(vec![1, 3, 2]));
        assert_eq!(keep(0.5), Ok(vec![1, 3]));
        assert_eq!(keep(0.9), Ok(vec![1]));
        assert_eq!(keep(0.0), Ok(vec![1, 3, 2, 0]));
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let mut s = sampler(
            SamplingParams {
                top_k: 2,
                ..params(1.0)
            },
            5,
        );
        let d = s.probabilities(&[1.0, 4.0, 2.0, 3.0, 0.0]).map(|d| ids(&d));
        assert_eq!(d, Ok(vec![1, 3]));
        // k past the vocabulary is off.
        let mut s = sampler(
            SamplingParams {
                top_k: 99,
                ..params(1.0)
            },
            3,
        );
        assert_eq!(s.probabilities(&[1.0, 2.0, 3.0]).map(|d| d.len()), Ok(3));
    }

    #[test]
    fn penalties_match_a_hand_computed_example() {
        let mut s = sampler(
            SamplingParams {
                repetition_penalty: 2.0,
                frequency_penalty: 0.5,
                presence_penalty: 0.25,
                ..params(1.0)
            },
            5,
        );
        for t in [0, 1, 0, 2, 9] {
            s.accept(t); // 9 is past the logits: ignored.
        }
        let mut logits = [2.0f32, -1.0, 0.5, 3.0, 0.0];
        s.apply_penalties(&mut logits);
        // 0 (twice): 2/2 - (2*0.5 + 0.25) = -0.25
        // 1 (once): -1*2 - (0.5 + 0.25) = -2.75
        // 2 (once): 0.5/2 - 0.75 = -0.5
        // 3, 4: untouched.
        assert_eq!(logits, [-0.25, -2.75, -0.5, 3.0, 0.0]);
        // The same penalties feed the distribution.
        let d = s.probabilities(&[2.0, -1.0, 0.5, 3.0, 0.0]);
        let z: f64 = [-0.25f64, -2.75, -0.5, 3.0, 0.0]
            .iter()
            .map(|l| l.exp())
            .sum();
        let p_top = (3.0f64.exp() / z) as f32;
        assert!(matches!(d.as_deref(), Ok([(3, p), ..]) if (p - p_top).abs() < 1e-6));
    }

    #[test]
    fn penalties_only_see_the_last_n_tokens() {
        let mut s = sampler(
            SamplingParams {
                presence_penalty: 1.0,
                penalty_last_n: 2,
                ..params(1.0)
            },
            4,
        );
        for t in [0, 1, 2] {
            s.accept(t);
        }
        let mut logits = [1.0f32; 4];
        s.apply_penalties(&mut logits);
        assert_eq!(logits, [1.0, 0.0, 0.0, 1.0]);
        // penalty_last_n = 0 disables them.
        let mut off = sampler(
            SamplingParams {
                presence_penalty: 1.0,
                penalty_last_n: 0,
                ..params(1.0)
            },
            4,
        );
        off.accept(0);
        let mut logits = [1.0f32; 4];
        off.apply_penalties(&mut logits);
        assert_eq!(logits, [1.0; 4]);
    }

    #[test]
    fn temperature_one_matches_the_distribution() {
        let probs = [0.5f32, 0.25, 0.15, 0.07, 0.03];
        let logits = logits_of(&probs);
        let mut s = sampler(
            SamplingParams {
                seed: 1234,
                ..params(1.0)
            },
            probs.len(),
        );
        let n = 20_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        for (i, (&c, &p)) in counts.iter().zip(&probs).enumerate() {
            let f = c as f32 / n as f32;
            // Five standard deviations of a binomial frequency at p = 0.5 is 0.018.
            assert!((f - p).abs() < 0.018, "token {i}: {f} vs {p}");
        }
    }

    #[test]
    fn temperature_reshapes_the_distribution() {
        // p ∝ exp(l / T): logits [0, ln 4] at T = 2 give [1, 2] / 3.
        let mut s = sampler(params(2.0), 2);
        let d = s.probabilities(&[0.0, 4.0f32.ln()]);
        assert!(
            matches!(d.as_deref(), Ok([(1, a), (0, b)]) if (a - 2.0 / 3.0).abs() < 1e-6 && (b - 1.0 / 3.0).abs() < 1e-6),
            "{d:?}"
        );
    }

    #[test]
    fn nan_and_inf_logits_do_not_panic() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        for p in [params(0.0), params(1.0), SamplingParams::default()] {
            let mut s = sampler(p.clone(), 4);
            // NaN is never chosen.
            for _ in 0..50 {
                assert_ne!(s.sample(&[nan, 1.0, nan, 0.5]), 0);
            }
            assert_eq!(
                s.try_sample(&[nan; 4]),
                Err(SamplingError::NoFiniteLogits { n: 4 })
            );
            assert_eq!(s.sample(&[nan; 4]), 0);
            assert_eq!(s.sample(&[f32::NEG_INFINITY, nan, -inf, 2.0]), 3);
            // +inf takes all the mass.
            for _ in 0..50 {
                let t = s.sample(&[1.0, inf, 3.0, inf]);
                assert!(t == 1 || t == 3, "{t}");
            }
            assert!(s.try_sample(&[]).is_err());
            assert_eq!(s.sample(&[]), 0);
            // Huge logits with a tiny temperature stay finite.
            s.sample(&[f32::MAX, -f32::MAX, 0.0, f32::MAX]);
        }
        let mut s = sampler(
            SamplingParams {
                repetition_penalty: 1.3,
                frequency_penalty: -2.0,
                presence_penalty: -2.0,
                temperature: 1e-6,
                ..params(1.0)
            },
            4,
        );
        for t in [0, 1, 2, 3] {
            s.accept(t);
        }
        for _ in 0..10 {
            assert!(s.sample(&[-inf, inf, nan, 1e30]) == 1);
        }
    }

    #[test]
    fn logits_past_the_vocabulary_are_ignored() {
        let mut s = sampler(params(0.0), 3);
        assert_eq!(s.sample(&[0.0, 1.0, 0.5, 9.0]), 1);
        // A short row is sampled as it is.
        assert_eq!(s.sample(&[0.0, 1.0]), 1);
    }

    #[test]
    fn validate_names_the_field_and_range() {
        let bad = |p: SamplingParams| match p.validate() {
            Err(SamplingError::OutOfRange { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let base = SamplingParams::default();
        assert!(base.validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        assert!(SamplingParams {
            temperature: -0.5,
            ..base.clone()
        }
        .validate()
        .is_ok());
        assert_eq!(
            bad(SamplingParams {
                temperature: f32::NAN,
                ..base.clone()
            }),
            "temperature"
        );
        assert_eq!(
            bad(SamplingParams {
                top_p: 1.5,
                ..base.clone()
            }),
            "top_p"
        );
        assert_eq!(
            bad(SamplingParams {
                top_p: f32::NAN,
                ..base.clone()
            }),
            "top_p"
        );
        assert_eq!(
            bad(SamplingParams {
                min_p: -0.1,
                ..base.clone()
            }),
            "min_p"
        );
        assert_eq!(
            bad(SamplingParams {
                repetition_penalty: 0.0,
                ..base.clone()
            }),
            "repetition_penalty"
        );
        assert_eq!(
            bad(SamplingParams {
                frequency_penalty: 2.5,
                ..base.clone()
            }),
            "frequency_penalty"
        );
        assert_eq!(
            bad(SamplingParams {
                presence_penalty: f32::INFINITY,
                ..base.clone()
            }),
            "presence_penalty"
        );
        let msg = SamplingParams {
            top_p: 1.5,
            ..base.clone()
        }
        .validate()
        .map_err(|e| e.to_string());
        assert_eq!(
            msg,
            Err("sampling parameter `top_p` is 1.5, expected [0, 1] (1 = off)".into())
        );
        assert!(Sampler::new(
            SamplingParams {
                min_p: 2.0,
                ..base.clone()
            },
            10
        )
        .is_err());
        assert_eq!(Sampler::new(base, 0).err(), Some(SamplingError::EmptyVocab));
    }

    fn push_all(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut c = StopChecker::new(stops.iter().copied());
        let mut emitted = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let r = c.push(p);
            emitted.push(r.emit);
            stopped |= r.stopped;
        }
        (emitted, stopped, c.finish())
    }

    #[test]
    fn stop_string_split_across_pushes() {
        let (emitted, stopped, rest) = push_all(&["</s>"], &["Hello <", "/", "s> world"]);
        assert_eq!(emitted, vec!["Hello ", "", ""]);
        assert!(stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn partial_match_then_divergence_releases_the_text() {
        let (emitted, stopped, rest) = push_all(&["STOP"], &["a ST", "O", "P!"]);
        assert_eq!(emitted, vec!["a ", "", ""]);
        assert!(stopped);
        assert_eq!(rest, "");
        let (emitted, stopped, rest) = push_all(&["STOP"], &["a ST", "O", "X and ST"]);
        assert_eq!(emitted, vec!["a ", "", "STOX and "]);
        assert!(!stopped);
        // The end of the stream releases what was held back.
        assert_eq!(rest, "ST");
        // A held suffix that diverges but contains a new start keeps only that part.
        let (emitted, _, rest) = push_all(&["abc"], &["xab", "ab"]);
        assert_eq!(emitted, vec!["x", "ab"]);
        assert_eq!(rest, "ab");
    }

    #[test]
    fn stop_at_the_very_start() {
        let mut c = StopChecker::new(["###"]);
        assert_eq!(
            c.push("### and more"),
            StopResult {
                emit: String::new(),
                stopped: true
            }
        );
        assert_eq!(c.matched(), Some("###"));
        // Everything after a stop is swallowed.
        assert_eq!(
            c.push("more"),
            StopResult {
                emit: String::new(),
                stopped: true
            }
        );
        assert_eq!(c.finish(), "");
    }

    #[test]
    fn multiple_stop_strings_earliest_wins() {
        let mut c = StopChecker::new(["\n\n", "User:", "END"]);
        let r = c.push("answer.");
        assert_eq!((r.emit.as_str(), r.stopped), ("answer.", false));
        let r = c.push(" Us");
        assert_eq!((r.emit.as_str(), r.stopped), (" ", false));
        let r = c.push("er: hi END\n\n");
        assert_eq!((r.emit.as_str(), r.stopped), ("", true));
        assert_eq!(c.matched(), Some("User:"));

        // A later-listed stop that occurs earlier in the text wins.
        let (emitted, stopped, _) = push_all(&["zzz", "b"], &["aab zzz"]);
        assert_eq!((emitted, stopped), (vec!["aa".to_owned()], true));
        // No stop strings: everything passes straight through; empty ones are ignored.
        let (emitted, stopped, rest) = push_all(&[""], &["a", "b"]);
        assert_eq!(
            (emitted, stopped, rest),
            (vec!["a".to_owned(), "b".to_owned()], false, String::new())
        );
    }

    #[test]
    fn unicode_stop_strings_and_text() {
        let (emitted, stopped, _) = push_all(&["世界"], &["你好世", "界！"]);
        assert_eq!(
            (emitted, stopped),
            (vec!["你好".to_owned(), String::new()], true)
        );
        // Multi-byte text that shares no prefix with the stop is never held.
        let (emitted, stopped, rest) = push_all(&["é!"], &["café", "s é", "?"]);
        assert_eq!(emitted, vec!["caf", "és ", "é?"]);
        assert!(!stopped);
        assert_eq!(rest, "");
        // Stop string sharing a leading byte with other characters: "é" vs "è".
        let (emitted, stopped, rest) = push_all(&["è"], &["aé", "b"]);
        assert_eq!(
            (emitted, stopped, rest),
            (vec!["aé".to_owned(), "b".to_owned()], false, String::new())
        );
        let (emitted, stopped, _) = push_all(&["🦀x"], &["rust 🦀", "x"]);
        assert_eq!(
            (emitted, stopped),
            (vec!["rust ".to_owned(), String::new()], true)
        );
    }

    #[test]
    fn concatenated_emits_equal_text_up_to_the_stop() {
        // Whatever the split, the emitted text is the input up to the first stop.
        let text = "the answer is 42.\nUser: and then";
        for cut in 0..=text.len() {
            if !text.is_char_boundary(cut) {
                continue;
            }
            for cut2 in cut..=text.len() {
                if !text.is_char_boundary(cut2) {
                    continue;
                }
                let (emitted, stopped, rest) = push_all(
                    &["\nUser:", "Assistant:"],
                    &[&text[..cut], &text[cut..cut2], &text[cut2..]],
                );
                assert!(stopped);
                assert_eq!(emitted.concat() + &rest, "the answer is 42.");
            }
        }
    }
}
