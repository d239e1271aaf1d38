//! Merging several adapters (task vectors) into one sparse adapter.
//!
//! Every method works per base projection on dense deltas. For input `t` with weight
//! `w_t` the task vector of a projection is `v_t = w_t * ΔW_t`, where `ΔW_t` is the
//! adapter's full additive delta there (`scale * B A` for LoRA, `scale * values` for a
//! sparse delta). The weights are applied first, for every method, so all-equal weights
//! `λ` reproduce the papers' final `θ_0 + λ τ_m` and a negative weight negates a task.
//! An input takes part in a projection only if it has a delta there and a nonzero
//! weight. DoRA deltas are refused: their magnitude rescaling is not additive. The
//! result holds the nonzero entries of each merged projection as a
//! [`TensorDelta::Sparse`] with scale 1 (all-zero projections are left out).
//!
//! - **Linear** (task arithmetic): `Σ_t v_t`.
//! - **TIES** (Yadav et al. 2023, "TIES-Merging"): *trim* each `v_t` to its
//!   `k = round(density * n)` largest magnitudes (ties broken toward the lower flat
//!   index), zeroing the rest; *elect* per entry the sign `γ = sgn(Σ_t v̂_t)`; *disjoint
//!   mean*: `Σ_{t ∈ A} v̂_t / |A|` over `A = {t : v̂_t ≠ 0, sgn(v̂_t) = γ}` (0 where
//!   `γ = 0` or `A` is empty). Weights enter through `v_t`, so with positive weights
//!   the trim is weight-independent and the election is weighted.
//! - **DARE** (Yu et al. 2024, "Language Models are Super Mario"): each entry of each
//!   `v_t` is dropped with probability `p`; survivors are multiplied by `1/(1-p)`
//!   ([`DareRescale::Standard`]) or by `1/q` ([`DareRescale::DarexQ`], Deng et al.
//!   2024, "DARE the Extreme": `q` replaces `1-p`, given explicitly). The rescaled
//!   vectors are then summed ([`DareMerge::Linear`]) or sign-elected and disjoint-
//!   averaged as in TIES without the trim ([`DareMerge::Ties`], the "DARE-TIES"
//!   combination). The factor is computed as `(1/(1-p))` (or `1/q`) in f64, rounded to
//!   f32, and multiplies each surviving f32 value.
//!   The mask is a pure function of (seed, task index, layer, projection, flat index),
//!   so it does not depend on processing order: the stream key is
//!   `k = mix(mix(mix(seed) ^ task) ^ (7 * layer + proj_index))` where `mix(x)` is the
//!   first splitmix64 output from state `x`; entry `i` uses the `i`-th (0-based)
//!   splitmix64 output `z_i` from state `k` (state `k + (i+1) * 0x9E3779B97F4A7C15`,
//!   finalised), `u_i = (z_i >> 11) * 2^-53`, and is dropped iff `u_i < p`.
//! - **PCB** (Du et al. 2024, "Parameter Competition Balancing for Model Merging"),
//!   following the paper's formulas over the `N` participating tasks of a projection
//!   (`d` entries, `⊙` elementwise, `Norm(x) = (x - min x) / (max x - min x)` over
//!   the projection, all zeros when `max = min`, softmax over the projection's `d`
//!   entries):
//!   - intra-balancing `β_intra,i = softmax(N * Norm(v_i ⊙ v_i))`;
//!   - inter-balancing `β_inter,i = Σ_{j=1..N} softmax(Norm(v_i ⊙ v_j))` (`j = i`
//!     included, as in the paper's sum);
//!   - score `β_i = β_intra,i ⊙ β_inter,i`;
//!   - drop: per task, the `round(drop_ratio * d)` lowest scores are set to 0 (ties:
//!     the higher flat index is dropped first), giving `β̂_i`;
//!   - rescale and merge: `Σ_i β̂_i ⊙ v_i / Σ_i β̂_i` per entry (0 where every task
//!     dropped it).
//!
//!   The authors' public code departs from these formulas (it uses
//!   `exp(N * Norm(|v|)^2)` without the softmax denominator, `tanh(v_i * Σ_j v_j)`
//!   for the inter term, clamps outliers and min-max normalises the kept scores); this
//!   module implements the paper's version. Scores are computed in f64 and stored in
//!   f32 (softmax values of large projections are ~1/d, well inside f32's range).

use std::cmp::Ordering;
use std::path::PathBuf;

use graft_runtime::model::{ModelConfig, Proj};

use crate::delta::{projection_shape, Adapter, AdapterFormat, TensorDelta};
use crate::error::{AdapterError, Result};
use crate::sara;

/// How [`combine`] merges its inputs.
#[derive(Debug, Clone, PartialEq)]
pub enum CombineMethod {
    /// `Σ_t w_t ΔW_t`.
    Linear,
    /// TIES-merging; `density` in (0, 1] is the fraction of entries each task keeps.
    Ties { density: f32 },
    /// DARE: random drop at `drop_rate` in [0, 1), rescale, then `merge`.
    Dare {
        drop_rate: f32,
        seed: u64,
        rescale: DareRescale,
        merge: DareMerge,
    },
    /// PCB-merging; `drop_ratio` in [0, 1) is the fraction of entries each task drops.
    Pcb { drop_ratio: f32 },
}

/// What DARE multiplies surviving entries by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DareRescale {
    /// `1 / (1 - p)`.
    Standard,
    /// `1 / q` (DAREx-q), `q > 0`.
    DarexQ(f32),
}

impl DareRescale {
    /// The factor for drop rate `p`.
    pub fn factor(self, p: f32) -> f32 {
        match self {
            DareRescale::Standard => (1.0 / (1.0 - p as f64)) as f32,
            DareRescale::DarexQ(q) => (1.0 / q as f64) as f32,
        }
    }
}

/// How DARE combines the rescaled task vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DareMerge {
    /// Sum.
    Linear,
    /// TIES sign election and disjoint mean (no magnitude trim).
    Ties,
}

fn bad(what: impl Into<String>) -> AdapterError {
    AdapterError::invalid("combine", what)
}

impl CombineMethod {
    /// Checks the method's parameters.
    pub fn validate(&self) -> Result<()> {
        match *self {
            CombineMethod::Linear => Ok(()),
            CombineMethod::Ties { density } => {
                if density > 0.0 && density <= 1.0 {
                    Ok(())
                } else {
                    Err(bad(format!("TIES density {density}, expected in (0, 1]")))
                }
            }
            CombineMethod::Dare {
                drop_rate, rescale, ..
            } => {
                if !(0.0..1.0).contains(&drop_rate) {
                    return Err(bad(format!(
                        "DARE drop rate {drop_rate}, expected in [0, 1)"
                    )));
                }
                if let DareRescale::DarexQ(q) = rescale {
                    if !(q.is_finite() && q > 0.0) {
                        return Err(bad(format!("DAREx q {q}, expected a finite number > 0")));
                    }
                }
                Ok(())
            }
            CombineMethod::Pcb { drop_ratio } => {
                if (0.0..1.0).contains(&drop_ratio) {
                    Ok(())
                } else {
                    Err(bad(format!(
                        "PCB drop ratio {drop_ratio}, expected in [0, 1)"
                    )))
                }
            }
        }
    }
}

/// Merges `inputs` (adapter, weight) for a base of configuration `config` into one
/// adapter of sparse deltas (see the module documentation for each method).
pub fn combine(
    inputs: &[(&Adapter, f32)],
    method: &CombineMethod,
    config: &ModelConfig,
) -> Result<Adapter> {
    method.validate()?;
    if inputs.is_empty() {
        return Err(bad("no adapters to merge, expected at least one"));
    }
    for (t, (a, w)) in inputs.iter().enumerate() {
        if !w.is_finite() {
            return Err(bad(format!(
                "input {t} ({}): weight {w}, expected a finite number",
                a.source.display()
            )));
        }
        if a.n_layer() != config.n_layer {
            return Err(AdapterError::invalid(
                a.source.display().to_string(),
                format!(
                    "built for {} layers, expected the base's {}",
                    a.n_layer(),
                    config.n_layer
                ),
            ));
        }
    }
    let mut out = Adapter::new(AdapterFormat::Memory, PathBuf::new(), config.n_layer);
    for layer in 0..config.n_layer {
        for proj in Proj::ALL {
            let (rows, cols) = projection_shape(config, proj);
            let mut tasks: Vec<(usize, Vec<f32>)> = Vec::new();
            for (t, (a, w)) in inputs.iter().enumerate() {
                let Some(d) = a.get(layer, proj) else {
                    continue;
                };
                if *w == 0.0 {
                    continue;
                }
                let mut dense = dense_delta(a, layer, proj, d, (rows, cols))?;
                for v in &mut dense {
                    *v *= w;
                }
                tasks.push((t, dense));
            }
            if tasks.is_empty() {
                continue;
            }
            let merged = merge_tensor(&tasks, method, layer, proj)?;
            if let Some(k) = merged.iter().position(|v| !v.is_finite()) {
                return Err(AdapterError::tensor(
                    "combine",
                    proj.gguf_weight(layer),
                    format!(
                        "merged entry {k} is {}, expected a finite number (an input holds huge or non-finite values)",
                        merged[k]
                    ),
                ));
            }
            let sparse = sara::from_dense(rows, cols, &merged, 1.0)?;
            if !sparse.values.is_empty() {
                out.insert(config, layer, proj, TensorDelta::Sparse(sparse))?;
            }
        }
    }
    Ok(out)
}

/// The dense `[out, in]` additive delta of `d`, checked against the base's shape.
fn dense_delta(
    a: &Adapter,
    layer: usize,
    proj: Proj,
    d: &TensorDelta,
    shape: (usize, usize),
) -> Result<Vec<f32>> {
    let file = a.source.display().to_string();
    let name = proj.gguf_weight(layer);
    let found = d.shape();
    if found != shape {
        return Err(AdapterError::Shape {
            file,
            tensor: name,
            found: vec![found.0, found.1],
            expected: vec![shape.0, shape.1],
        });
    }
    match d {
        TensorDelta::Lora(l) => {
            if l.dora_factor.is_some() {
                return Err(AdapterError::tensor(
                    file,
                    name,
                    "is a DoRA delta, expected an additive one (DoRA rescales rows and cannot be merged as a task vector)",
                ));
            }
            l.dense()
        }
        TensorDelta::Sparse(s) => {
            let idx =
                sara::checked_flat_indices(s).map_err(|e| AdapterError::tensor(&file, &name, e))?;
            let mut out = vec![0f32; shape.0 * shape.1];
            for (i, v) in idx.into_iter().zip(&s.values) {
                if let Some(o) = out.get_mut(i as usize) {
                    *o = v * s.scale;
                }
            }
            Ok(out)
        }
        TensorDelta::Dense(d) => d.dense(),
    }
}

fn merge_tensor(
    tasks: &[(usize, Vec<f32>)],
    method: &CombineMethod,
    layer: usize,
    proj: Proj,
) -> Result<Vec<f32>> {
    let views: Vec<&[f32]> = tasks.iter().map(|(_, v)| v.as_slice()).collect();
    match *method {
        CombineMethod::Linear => linear(&views),
        CombineMethod::Ties { density } => ties(&views, density),
        CombineMethod::Dare {
            drop_rate,
            seed,
            rescale,
            merge,
        } => {
            let factor = rescale.factor(drop_rate);
            let mut dropped = Vec::with_capacity(tasks.len());
            for (t, v) in tasks {
                let keep = dare_keep_mask(seed, *t, layer, proj, v.len(), drop_rate);
                dropped.push(dare_apply(v, &keep, factor)?);
            }
            let views: Vec<&[f32]> = dropped.iter().map(Vec::as_slice).collect();
            match merge {
                DareMerge::Linear => linear(&views),
                DareMerge::Ties => disjoint_merge(&views),
            }
        }
        CombineMethod::Pcb { drop_ratio } => pcb(&views, drop_ratio),
    }
}

/// The common length of `tasks` (at least one).
fn common_len(tasks: &[&[f32]]) -> Result<usize> {
    let n = tasks
        .first()
        .map(|t| t.len())
        .ok_or_else(|| bad("no task vectors, expected at least one"))?;
    if let Some((t, v)) = tasks.iter().enumerate().find(|(_, v)| v.len() != n) {
        return Err(bad(format!(
            "task vector {t} has {} entries, expected {n} like task 0",
            v.len()
        )));
    }
    Ok(n)
}

/// `Σ_t v_t` (accumulated in f64).
pub fn linear(tasks: &[&[f32]]) -> Result<Vec<f32>> {
    let n = common_len(tasks)?;
    let mut acc = vec![0f64; n];
    for t in tasks {
        for (a, &v) in acc.iter_mut().zip(t.iter()) {
            *a += v as f64;
        }
    }
    Ok(acc.into_iter().map(|a| a as f32).collect())
}

/// A mask of the `k` entries ranking first under `before` (a strict total order).
fn top_k(n: usize, k: usize, before: impl Fn(usize, usize) -> Ordering) -> Vec<bool> {
    let mut mask = vec![false; n];
    if k == 0 {
        return mask;
    }
    if k >= n {
        return vec![true; n];
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| before(a, b));
    for &i in &idx[..k] {
        mask[i] = true;
    }
    mask
}

/// `round(fraction * n)`, clamped to `n`.
fn fraction_count(fraction: f32, n: usize) -> usize {
    ((fraction as f64 * n as f64).round() as usize).min(n)
}

/// TIES trim: `v` with all but its `round(density * n)` largest magnitudes zeroed
/// (equal magnitudes: the lower index is kept).
pub fn ties_trim(v: &[f32], density: f32) -> Vec<f32> {
    let k = fraction_count(density, v.len());
    let mask = top_k(v.len(), k, |a, b| {
        v[b].abs().total_cmp(&v[a].abs()).then(a.cmp(&b))
    });
    v.iter()
        .zip(mask)
        .map(|(&x, keep)| if keep { x } else { 0.0 })
        .collect()
}

/// TIES sign election and disjoint mean: per entry, the mean of the nonzero values
/// whose sign matches `sgn(Σ_t v_t)` (0 when that sum is 0).
pub fn disjoint_merge(tasks: &[&[f32]]) -> Result<Vec<f32>> {
    let n = common_len(tasks)?;
    let mut out = vec![0f32; n];
    for (e, o) in out.iter_mut().enumerate() {
        let total: f64 = tasks.iter().map(|t| t[e] as f64).sum();
        if total == 0.0 {
            continue;
        }
        let (mut sum, mut count) = (0f64, 0usize);
        for t in tasks {
            let x = t[e];
            if x != 0.0 && (x > 0.0) == (total > 0.0) {
                sum += x as f64;
                count += 1;
            }
        }
        if count > 0 {
            *o = (sum / count as f64) as f32;
        }
    }
    Ok(out)
}

/// TIES-merging of task vectors: [`ties_trim`] each, then [`disjoint_merge`].
pub fn ties(tasks: &[&[f32]], density: f32) -> Result<Vec<f32>> {
    common_len(tasks)?;
    let trimmed: Vec<Vec<f32>> = tasks.iter().map(|t| ties_trim(t, density)).collect();
    let views: Vec<&[f32]> = trimmed.iter().map(Vec::as_slice).collect();
    disjoint_merge(&views)
}

/// One splitmix64 step: advances `state` and returns the next output.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mix(x: u64) -> u64 {
    let mut s = x;
    splitmix64(&mut s)
}

/// The splitmix64 state DARE's mask for (`seed`, `task`, `layer`, `proj`) starts from.
pub fn dare_stream_key(seed: u64, task: usize, layer: usize, proj: Proj) -> u64 {
    let tensor = (layer as u64)
        .wrapping_mul(Proj::ALL.len() as u64)
        .wrapping_add(proj.index() as u64);
    mix(mix(mix(seed) ^ task as u64) ^ tensor)
}

/// DARE's keep mask (`true` = survives) for `n` entries of task `task`'s delta of
/// `proj` in `layer`, at drop rate `p`.
pub fn dare_keep_mask(
    seed: u64,
    task: usize,
    layer: usize,
    proj: Proj,
    n: usize,
    p: f32,
) -> Vec<bool> {
    let mut state = dare_stream_key(seed, task, layer, proj);
    let p = p as f64;
    (0..n)
        .map(|_| {
            let u = (splitmix64(&mut state) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            u >= p
        })
        .collect()
}

/// `v` with dropped entries zeroed and survivors multiplied by `factor`.
pub fn dare_apply(v: &[f32], keep: &[bool], factor: f32) -> Result<Vec<f32>> {
    if keep.len() != v.len() {
        return Err(bad(format!(
            "DARE mask has {} entries, expected {}",
            keep.len(),
            v.len()
        )));
    }
    Ok(v.iter()
        .zip(keep)
        .map(|(&x, &k)| if k { x * factor } else { 0.0 })
        .collect())
}

/// Min-max normalisation to [0, 1] (all zeros for a constant vector).
fn minmax_norm(x: &mut [f64]) {
    let (lo, hi) = x
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = hi - lo;
    for v in x.iter_mut() {
        *v = if range > 0.0 { (*v - lo) / range } else { 0.0 };
    }
}

/// `softmax(c * x)` in place.
fn softmax_scaled(x: &mut [f64], c: f64) {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(c * v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (c * *v - max).exp();
        sum += *v;
    }
    if sum > 0.0 {
        for v in x.iter_mut() {
            *v /= sum;
        }
    }
}

/// PCB balancing scores `β_i = β_intra,i ⊙ β_inter,i` of each task vector.
pub fn pcb_scores(tasks: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
    let d = common_len(tasks)?;
    let n = tasks.len();
    let mut inter = vec![vec![0f32; d]; n];
    let mut buf = vec![0f64; d];
    for i in 0..n {
        for j in i..n {
            for ((b, &x), &y) in buf.iter_mut().zip(tasks[i].iter()).zip(tasks[j].iter()) {
                *b = x as f64 * y as f64;
            }
            minmax_norm(&mut buf);
            softmax_scaled(&mut buf, 1.0);
            // softmax(Norm(v_i ⊙ v_j)) is symmetric in i and j: add it to both.
            for (o, &b) in inter[i].iter_mut().zip(&buf) {
                *o += b as f32;
            }
            if j != i {
                for (o, &b) in inter[j].iter_mut().zip(&buf) {
                    *o += b as f32;
                }
            }
        }
    }
    let mut scores = inter;
    for (i, s) in scores.iter_mut().enumerate() {
        for (b, &x) in buf.iter_mut().zip(tasks[i].iter()) {
            *b = x as f64 * x as f64;
        }
        minmax_norm(&mut buf);
        softmax_scaled(&mut buf, n as f64);
        for (o, &b) in s.iter_mut().zip(&buf) {
            *o = (*o as f64 * b) as f32;
        }
    }
    Ok(scores)
}

/// PCB-merging of task vectors: scores, per-task drop of the `round(drop_ratio * d)`
/// lowest, then `Σ β̂_i v_i / Σ β̂_i`.
pub fn pcb(tasks: &[&[f32]], drop_ratio: f32) -> Result<Vec<f32>> {
    let d = common_len(tasks)?;
    let scores = pcb_scores(tasks)?;
    let keep = d - fraction_count(drop_ratio, d);
    let mut num = vec![0f64; d];
    let mut den = vec![0f64; d];
    for (t, s) in tasks.iter().zip(&scores) {
        let mask = top_k(d, keep, |a, b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        for e in (0..d).filter(|&e| mask[e]) {
            num[e] += s[e] as f64 * t[e] as f64;
            den[e] += s[e] as f64;
        }
    }
    Ok(num
        .iter()
        .zip(&den)
        .map(|(&n, &d)| if d > 0.0 { (n / d) as f32 } else { 0.0 })
        .collect())
}
