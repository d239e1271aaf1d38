//! The batched forward pass: RMSNorm, RoPE, causal GQA attention over the paged KV
//! cache, SwiGLU, on weights in any supported type.
//!
//! One call processes a batch of tokens that may belong to several sequences at
//! different positions (prefill and decode alike); each token attends to its own
//! sequence only.

use std::collections::HashMap;

use graft_quant::{kernels, pool};
use rayon::prelude::*;

use super::delta::{BatchDeltas, Proj};
use super::{simd, Model, ModelError, RopeScaling, RopeStyle, Weight};
use crate::kv_cache::{KvCache, SeqId};

/// One token of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchToken {
    pub token: u32,
    /// Position within its sequence.
    pub pos: usize,
    pub seq: SeqId,
    /// Whether to return logits for this token.
    pub logits: bool,
}

/// Tokens to run in one forward step.
pub type Batch = [BatchToken];

/// The batch for `tokens` of sequence `seq` at positions `start..`: logits for every
/// token when `all_logits`, else for the last one only.
pub fn sequence_batch(
    tokens: &[u32],
    seq: SeqId,
    start: usize,
    all_logits: bool,
) -> Vec<BatchToken> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &token)| BatchToken {
            token,
            pos: start + i,
            seq,
            logits: all_logits || i + 1 == tokens.len(),
        })
        .collect()
}

/// Logits of the batch tokens that asked for them, in batch order.
#[derive(Debug, Clone, Default)]
pub struct Logits {
    pub n_vocab: usize,
    /// Batch index of each row.
    pub rows: Vec<usize>,
    pub data: Vec<f32>,
}

impl Logits {
    /// Row `i` (the i-th token that asked for logits).
    pub fn row(&self, i: usize) -> &[f32] {
        self.data
            .get(i * self.n_vocab..(i + 1) * self.n_vocab)
            .unwrap_or(&[])
    }

    /// The row of batch index `b`, if that token asked for logits.
    pub fn for_batch_index(&self, b: usize) -> Option<&[f32]> {
        let i = self.rows.iter().position(|&r| r == b)?;
        Some(self.row(i))
    }
}

/// Reusable buffers, so decode steps do not allocate per layer.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

fn fwd_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Forward(e.to_string())
}

fn linear(w: &Weight, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), ModelError> {
    kernels::matmul(w.ty, w.data(), w.rows, w.cols, x, n, y).map_err(fwd_err)
}

/// Where a projection sits, for the deltas that may change its output.
#[derive(Clone, Copy)]
struct Site<'a> {
    deltas: Option<&'a BatchDeltas<'a>>,
    layer: usize,
}

/// A base projection of a layer followed by its deltas (inside the same parallel
/// branch, so the adapter work of q/k/v or gate/up overlaps too). For small batches
/// an additive delta term is computed concurrently with the base matmul.
fn project(
    site: Site,
    proj: Proj,
    w: &Weight,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) -> Result<(), ModelError> {
    let layer = site.layer;
    let Some(deltas) = site.deltas.filter(|d| d.touches(layer, proj)) else {
        return linear(w, x, n, y);
    };
    if !deltas.is_additive(layer, proj) {
        linear(w, x, n, y)?;
        return apply_deltas(Some(deltas), (layer, proj), x, w.cols, y, w.rows);
    }
    // The term is always summed apart and added last, so a sequence gets the same
    // rounding whatever the batch around it. Only o and down overlap it with the base
    // matmul: q/k/v and gate/up already run in parallel branches, where one more
    // fork-join cost more than it saved (paired decode runs, smollm2-135m Q4_0).
    let mut term = vec![0f32; y.len()];
    let delta_term =
        |term: &mut [f32]| apply_deltas(Some(deltas), (layer, proj), x, w.cols, term, w.rows);
    if !fork(n) || !matches!(proj, Proj::O | Proj::Down) {
        linear(w, x, n, y)?;
        delta_term(&mut term)?;
    } else {
        let (rb, rd) = rayon::join(|| linear(w, x, n, y), || delta_term(&mut term));
        rb.and(rd)?;
    }
    for (v, t) in y.iter_mut().zip(&term) {
        *v += t;
    }
    Ok(())
}

/// Batches up to this size run independent projections of one input concurrently:
/// a decode-sized matmul is too short to amortise a thread-pool wake-up (measured
/// +15-20% decode on smollm2-135m), while large batches already fill every thread.
const JOIN_MAX_TOKENS: usize = 8;

/// Whether independent projections of `n` tokens run as concurrent rayon branches.
/// Not for one token when the matmuls run on the persistent team (`pool`): there
/// each product uses every thread without a wake-up, and a rayon branch would move
/// it back onto rayon's pool.
fn fork(n: usize) -> bool {
    n <= JOIN_MAX_TOKENS && !(n == 1 && pool::prefers_team())
}

/// One (sequence, kv head)'s keys (transposed, see [`transpose_keys`]) and values,
/// widened to f32.
type History = (Vec<f32>, Vec<f32>);

type Target<'w, 'y> = (Proj, &'w Weight, &'y mut Vec<f32>);

/// Two projections of the same input `x`.
fn project2(site: Site, n: usize, x: &[f32], [a, b]: [Target; 2]) -> Result<(), ModelError> {
    if !fork(n) {
        project(site, a.0, a.1, x, n, a.2)?;
        return project(site, b.0, b.1, x, n, b.2);
    }
    let (ra, rb) = rayon::join(
        || project(site, a.0, a.1, x, n, a.2),
        || project(site, b.0, b.1, x, n, b.2),
    );
    ra.and(rb)
}

/// Three projections of the same input `x` (q, k, v).
fn project3(site: Site, n: usize, x: &[f32], [a, b, c]: [Target; 3]) -> Result<(), ModelError> {
    if !fork(n) {
        project(site, a.0, a.1, x, n, a.2)?;
        return project2(site, n, x, [b, c]);
    }
    let (ra, rbc) = rayon::join(
        || project(site, a.0, a.1, x, n, a.2),
        || project2(site, n, x, [b, c]),
    );
    ra.and(rbc)
}

/// Lets every delta group of `deltas` update its tokens' rows of `y` (`n` rows of
/// `out_dim`), the base output of projection `proj` of layer `layer` for input `x`
/// (`n` rows of `in_dim`).
fn apply_deltas(
    deltas: Option<&BatchDeltas>,
    (layer, proj): (usize, Proj),
    x: &[f32],
    in_dim: usize,
    y: &mut [f32],
    out_dim: usize,
) -> Result<(), ModelError> {
    let Some(deltas) = deltas else {
        return Ok(());
    };
    let n = y.len() / out_dim.max(1);
    let delta_err = |e: super::delta::DeltaError| {
        ModelError::Forward(format!("delta on blk.{layer}.{proj}: {e}"))
    };
    let active: Vec<_> = deltas
        .groups
        .iter()
        .filter(|(d, _)| d.touches(layer, proj))
        .collect();
    if let [(d, idx)] = active.as_slice() {
        if idx.len() == n {
            return d.apply(layer, proj, x, n, y).map_err(delta_err);
        }
    }
    // Each group works on its gathered rows; groups run concurrently.
    let y_ref = &*y;
    let updated: Vec<Vec<f32>> = active
        .par_iter()
        .map(|(d, idx)| {
            let mut xg = Vec::with_capacity(idx.len() * in_dim);
            let mut yg = Vec::with_capacity(idx.len() * out_dim);
            for &i in idx.iter() {
                xg.extend_from_slice(&x[i * in_dim..(i + 1) * in_dim]);
                yg.extend_from_slice(&y_ref[i * out_dim..(i + 1) * out_dim]);
            }
            d.apply(layer, proj, &xg, idx.len(), &mut yg)
                .map(|()| yg)
                .map_err(delta_err)
        })
        .collect::<Result<_, _>>()?;
    for ((_, idx), yg) in active.iter().zip(updated) {
        for (&i, row) in idx.iter().zip(yg.chunks_exact(out_dim)) {
            y[i * out_dim..(i + 1) * out_dim].copy_from_slice(row);
        }
    }
    Ok(())
}

/// ggml's rms_norm: the mean of squares accumulated in f64.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * w;
        }
    }
}

fn add_bias(y: &mut [f32], bias: Option<&Vec<f32>>) {
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(b.len()) {
            for (v, &bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    }
}

thread_local! {
    /// One kv head's widened keys, values and transposed keys, reused across layers and steps by the
    /// thread that attends for a single token (no allocation or zeroing per layer).
    static KV_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = Default::default();
}

/// Causal attention of one token's query heads of kv group `g` (`group` heads of
/// `hd`, query row `qt` of all heads) over the first `len` keys/values: keys `kt`
/// dimension-major with rows `stride` apart (see [`simd::scores_t`]), values `vh`
/// position-major; written to `out` (`group * hd`). Decode and prefill both attend
/// here, so a sequence's rounding does not depend on the batch around it.
fn attend(
    (group, hd, scale): (usize, usize, f32),
    g: usize,
    qt: &[f32],
    (kt, stride): (&[f32], usize),
    vh: &[f32],
    len: usize,
    out: &mut [f32],
) {
    let mut scores = vec![0f32; len];
    for (j, o) in out.chunks_exact_mut(hd).enumerate() {
        let head = g * group + j;
        let qh = &qt[head * hd..(head + 1) * hd];
        simd::scores_t(qh, kt, stride, scale, &mut scores);
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let sum = simd::exp_sub_sum(&mut scores, max);
        simd::weighted_sum(o, &scores, 1.0 / sum, vh);
    }
}

/// Keys position-major (`len` rows of `hd`) to dimension-major (`hd` rows of `len`).
fn transpose_keys(k: &[f32], hd: usize, kt: &mut [f32]) {
    let len = k.len() / hd.max(1);
    for (p, kr) in k.chunks_exact(hd).enumerate() {
        for (d, &x) in kr.iter().enumerate() {
            kt[d * len + p] = x;
        }
    }
}

impl Model {
    /// cos/sin of each rotated pair at `pos`, computed like ggml's rope cache
    /// (theta advanced by repeated multiplication in f32). Training uses the same
    /// angles so a trained adapter sees exactly the inference positions.
    pub fn rope_angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let c = &self.config;
        let theta_scale = c.rope_base.powf(-2.0 / c.n_rot as f32);
        let freq_scale = match c.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
        };
        let mut theta = pos as f32;
        for i in 0..c.n_rot / 2 {
            let ff = self
                .rope_freqs
                .as_ref()
                .and_then(|f| f.get(i))
                .copied()
                .unwrap_or(1.0);
            let t = freq_scale * (theta / ff);
            cos[i] = t.cos();
            sin[i] = t.sin();
            theta *= theta_scale;
        }
    }

    /// Rotates every head of every token in `x` (`n_heads * head_dim` per token).
    fn apply_rope(&self, x: &mut [f32], n_heads: usize, cos_all: &[f32], sin_all: &[f32]) {
        let c = &self.config;
        let hd = c.head_dim;
        let half = c.n_rot / 2;
        for (t, row) in x.chunks_exact_mut(n_heads * hd).enumerate() {
            let (cos, sin) = (
                &cos_all[t * half..(t + 1) * half],
                &sin_all[t * half..(t + 1) * half],
            );
            for head in row.chunks_exact_mut(hd) {
                match c.rope_style {
                    RopeStyle::Normal => {
                        for i in 0..half {
                            let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                            head[2 * i] = x0 * cos[i] - x1 * sin[i];
                            head[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
                        }
                    }
                    RopeStyle::Neox => {
                        for i in 0..half {
                            let (x0, x1) = (head[i], head[i + half]);
                            head[i] = x0 * cos[i] - x1 * sin[i];
                            head[i + half] = x0 * sin[i] + x1 * cos[i];
                        }
                    }
                }
            }
        }
    }

    /// Runs one forward step over `batch`, writing its keys and values into `cache`.
    pub fn forward(&self, batch: &Batch, cache: &mut KvCache) -> Result<Logits, ModelError> {
        let mut scratch = Scratch::default();
        self.forward_with(batch, cache, &mut scratch)
    }

    /// [`forward`](Self::forward) with caller-owned scratch buffers.
    pub fn forward_with(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        s: &mut Scratch,
    ) -> Result<Logits, ModelError> {
        self.forward_adapted(batch, cache, s, None)
    }

    /// [`forward_with`](Self::forward_with) where each token's projections also go
    /// through the delta `deltas` assigns it (an adapter, a stack, or none).
    pub fn forward_adapted(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        s: &mut Scratch,
        deltas: Option<&BatchDeltas>,
    ) -> Result<Logits, ModelError> {
        let c = &self.config;
        if let Some(d) = deltas {
            if d.n_tokens() != batch.len() {
                return Err(ModelError::Forward(format!(
                    "deltas were assigned for {} tokens, the batch has {}",
                    d.n_tokens(),
                    batch.len()
                )));
            }
        }
        let deltas = deltas.filter(|d| !d.is_empty());
        let n = batch.len();
        let (d, qd, kvd, ff, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.head_dim);
        if n == 0 {
            return Ok(Logits {
                n_vocab: c.n_vocab,
                ..Default::default()
            });
        }

        // Validate tokens and positions, then reserve cache blocks for every sequence.
        let mut seq_len_after: HashMap<SeqId, usize> = HashMap::new();
        for (i, t) in batch.iter().enumerate() {
            if t.token as usize >= c.n_vocab {
                return Err(ModelError::Forward(format!(
                    "batch token {i}: id {} is out of the vocabulary (size {})",
                    t.token, c.n_vocab
                )));
            }
            let pending = seq_len_after.get(&t.seq).copied().unwrap_or(0);
            cache.check_pos(t.seq, t.pos, pending).map_err(fwd_err)?;
            let e = seq_len_after.entry(t.seq).or_insert(0);
            *e = (*e).max(t.pos + 1).max(cache.seq_len(t.seq));
        }
        for (&seq, &len) in &seq_len_after {
            cache.reserve(seq, len).map_err(fwd_err)?;
        }

        // Token embeddings.
        resize(&mut s.x, n * d);
        for (t, row) in batch.iter().zip(s.x.chunks_exact_mut(d)) {
            self.token_embd
                .row_into(t.token as usize, row)
                .map_err(fwd_err)?;
        }

        // RoPE angles per token.
        let half = c.n_rot / 2;
        let mut cos = vec![0f32; n * half];
        let mut sin = vec![0f32; n * half];
        for (i, t) in batch.iter().enumerate() {
            self.rope_angles(
                t.pos,
                &mut cos[i * half..(i + 1) * half],
                &mut sin[i * half..(i + 1) * half],
            );
        }

        // Sequences in this batch and how much of each the attention reads.
        let mut seqs: Vec<SeqId> = seq_len_after.keys().copied().collect();
        seqs.sort_unstable();
        let seq_slot: HashMap<SeqId, usize> =
            seqs.iter().enumerate().map(|(i, &s)| (s, i)).collect();
        let read_len: Vec<usize> = seqs
            .iter()
            .map(|sq| {
                batch
                    .iter()
                    .filter(|t| t.seq == *sq)
                    .map(|t| t.pos + 1)
                    .max()
                    .unwrap_or(0)
            })
            .collect();

        resize(&mut s.h, n * d);
        resize(&mut s.q, n * qd);
        resize(&mut s.k, n * kvd);
        resize(&mut s.v, n * kvd);
        resize(&mut s.attn, n * qd);
        resize(&mut s.proj, n * d);
        resize(&mut s.gate, n * ff);
        resize(&mut s.up, n * ff);
        let group = c.n_head / c.n_head_kv;
        let scale = 1.0 / (hd as f32).sqrt();

        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&s.x, &layer.attn_norm, c.rms_eps, &mut s.h);
            let site = Site { deltas, layer: li };
            project3(
                site,
                n,
                &s.h,
                [
                    (Proj::Q, &layer.wq, &mut s.q),
                    (Proj::K, &layer.wk, &mut s.k),
                    (Proj::V, &layer.wv, &mut s.v),
                ],
            )?;
            add_bias(&mut s.q, layer.bq.as_ref());
            add_bias(&mut s.k, layer.bk.as_ref());
            add_bias(&mut s.v, layer.bv.as_ref());
            self.apply_rope(&mut s.q, c.n_head, &cos, &sin);
            self.apply_rope(&mut s.k, c.n_head_kv, &cos, &sin);
            for (i, t) in batch.iter().enumerate() {
                cache
                    .write(
                        li,
                        t.seq,
                        t.pos,
                        &s.k[i * kvd..(i + 1) * kvd],
                        &s.v[i * kvd..(i + 1) * kvd],
                    )
                    .map_err(fwd_err)?;
            }

            let cache_ref = &*cache;
            let q = &s.q;
            let head_shape = (group, hd, scale);
            if let ([t], &[len]) = (batch, read_len.as_slice()) {
                // One token: each task widens one kv head's history into its thread's
                // buffers and attends with it, in a single parallel step.
                let failed = std::sync::Mutex::new(None);
                pool::for_each_chunk_mut(&mut s.attn, group * hd, |g, out| {
                    KV_SCRATCH.with(|buf| {
                        let (k, v, kt) = &mut *buf.borrow_mut();
                        for b in [&mut *k, &mut *v, &mut *kt] {
                            b.resize(len * hd, 0.0);
                        }
                        let (k, v) = (&mut k[..len * hd], &mut v[..len * hd]);
                        match cache_ref.read_head((li, t.seq, len), (g * hd, hd), k, v) {
                            Ok(()) => {
                                transpose_keys(k, hd, &mut kt[..len * hd]);
                                attend(head_shape, g, q, (kt, len), v, len, out)
                            }
                            Err(e) => {
                                let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                                f.get_or_insert(fwd_err(e));
                            }
                        }
                    })
                });
                if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    return Err(e);
                }
            } else {
                // Widen each (sequence, kv head) history once, keys transposed; every
                // token of that sequence then reads its prefix.
                let histories: Vec<History> = (0..seqs.len() * c.n_head_kv)
                    .into_par_iter()
                    .map(|idx| {
                        let (si, g) = (idx / c.n_head_kv, idx % c.n_head_kv);
                        let len = read_len[si];
                        let mut k = vec![0f32; len * hd];
                        let mut v = vec![0f32; len * hd];
                        cache_ref.read_head((li, seqs[si], len), (g * hd, hd), &mut k, &mut v)?;
                        let mut kt = vec![0f32; len * hd];
                        transpose_keys(&k, hd, &mut kt);
                        Ok((kt, v))
                    })
                    .collect::<Result<_, crate::kv_cache::KvError>>()
                    .map_err(fwd_err)?;
                s.attn
                    .par_chunks_mut(group * hd)
                    .enumerate()
                    .for_each(|(idx, out)| {
                        let (ti, g) = (idx / c.n_head_kv, idx % c.n_head_kv);
                        let t = &batch[ti];
                        let si = seq_slot.get(&t.seq).copied().unwrap_or(0);
                        let (kt, vh) = &histories[si * c.n_head_kv + g];
                        let qt = &q[ti * qd..(ti + 1) * qd];
                        attend(head_shape, g, qt, (kt, read_len[si]), vh, t.pos + 1, out);
                    });
            }

            project(site, Proj::O, &layer.wo, &s.attn, n, &mut s.proj)?;
            for (x, p) in s.x.iter_mut().zip(&s.proj) {
                *x += p;
            }

            rms_norm(&s.x, &layer.ffn_norm, c.rms_eps, &mut s.h);
            project2(
                site,
                n,
                &s.h,
                [
                    (Proj::Gate, &layer.w_gate, &mut s.gate),
                    (Proj::Up, &layer.w_up, &mut s.up),
                ],
            )?;
            simd::silu_mul(&mut s.gate, &s.up);
            project(site, Proj::Down, &layer.w_down, &s.gate, n, &mut s.proj)?;
            for (x, p) in s.x.iter_mut().zip(&s.proj) {
                *x += p;
            }
        }

        for (&seq, &len) in &seq_len_after {
            cache.set_len(seq, len);
        }

        // Final norm and output projection for the tokens that want logits.
        let rows: Vec<usize> = batch
            .iter()
            .enumerate()
            .filter(|(_, t)| t.logits)
            .map(|(i, _)| i)
            .collect();
        let mut selected = vec![0f32; rows.len() * d];
        for (dst, &r) in selected.chunks_exact_mut(d).zip(&rows) {
            rms_norm(&s.x[r * d..(r + 1) * d], &self.output_norm, c.rms_eps, dst);
        }
        let mut data = vec![0f32; rows.len() * c.n_vocab];
        if !rows.is_empty() {
            linear(&self.output, &selected, rows.len(), &mut data)?;
        }
        Ok(Logits {
            n_vocab: c.n_vocab,
            rows,
            data,
        })
    }
}
