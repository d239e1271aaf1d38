//! The decoder as a differentiable function: forward with a tape, backward to the
//! gradients of whatever is trainable: per-projection deltas (LoRA, dense, sparse)
//! over a frozen base of any stored type, or every tensor (full training).

use std::borrow::Cow;
use std::ops::Range;

use graft_runtime::model::{Model, ModelConfig, Proj, Weight};

use super::ops::{self, AttnShape};
use super::real::{gemm, par_gemm, to_real, Mat, Real};
use super::TrainError;
use crate::delta::projection_shape;

/// One training example: the loss covers predicting `tokens[i + 1]` for every
/// `i >= n_prompt - 1` (the completion; plain text has `n_prompt = 1`).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub n_prompt: usize,
}

impl Example {
    /// Positions whose next token is a target.
    pub fn n_targets(&self) -> usize {
        self.tokens
            .len()
            .saturating_sub(self.n_prompt.max(1).min(self.tokens.len()))
    }
}

/// A trainable change to one projection of one layer.
#[derive(Debug, Clone)]
pub enum DeltaOp<'a, T: Real> {
    /// `scale * B A` with `A [rank, in]`, `B [out, rank]`.
    LowRank {
        a: Cow<'a, [T]>,
        b: Cow<'a, [T]>,
        rank: usize,
        scale: T,
    },
    /// A dense `[out, in]` delta.
    Dense { w: Cow<'a, [T]> },
    /// Values at sorted flat indices of `[out, in]`.
    Sparse {
        idx: Cow<'a, [u32]>,
        val: Cow<'a, [T]>,
    },
}

/// The gradient of a [`DeltaOp`], in its own shape.
#[derive(Debug, Clone, PartialEq)]
pub enum DeltaGrad<T> {
    LowRank { da: Vec<T>, db: Vec<T> },
    Dense { dw: Vec<T> },
    Sparse { dval: Vec<T> },
}

/// Index of (layer, projection) in per-projection tables.
pub fn slot(layer: usize, p: Proj) -> usize {
    layer * Proj::ALL.len() + p.index()
}

/// Where every tensor of a fully trainable model sits in one flat parameter vector
/// (GGUF tensor names, so a trained model is written as is).
#[derive(Debug, Clone)]
pub struct FullLayout {
    pub tensors: Vec<ParamTensor>,
    token_embd: usize,
    output: Option<usize>,
    output_norm: usize,
    /// Per layer: attn_norm, ffn_norm, then the 7 projections, then q/k/v biases.
    layers: Vec<[Option<usize>; 12]>,
    pub len: usize,
}

#[derive(Debug, Clone)]
pub struct ParamTensor {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub range: Range<usize>,
    /// Weight decay applies to matrices, not to norms and biases.
    pub decay: bool,
}

const ATTN_NORM: usize = 0;
const FFN_NORM: usize = 1;
const PROJ0: usize = 2;
const BIAS0: usize = 9;

impl FullLayout {
    pub fn new(c: &ModelConfig, tied_output: bool, biases: bool) -> FullLayout {
        let mut l = FullLayout {
            tensors: Vec::new(),
            token_embd: 0,
            output: None,
            output_norm: 0,
            layers: Vec::new(),
            len: 0,
        };
        let add = |l: &mut FullLayout, name: String, rows: usize, cols: usize, decay| {
            let start = l.len;
            l.len += rows * cols;
            l.tensors.push(ParamTensor {
                name,
                rows,
                cols,
                range: start..l.len,
                decay,
            });
            l.tensors.len() - 1
        };
        l.token_embd = add(
            &mut l,
            "token_embd.weight".into(),
            c.n_vocab,
            c.n_embd,
            true,
        );
        for i in 0..c.n_layer {
            let mut slots = [None; 12];
            slots[ATTN_NORM] = Some(add(
                &mut l,
                format!("blk.{i}.attn_norm.weight"),
                1,
                c.n_embd,
                false,
            ));
            slots[FFN_NORM] = Some(add(
                &mut l,
                format!("blk.{i}.ffn_norm.weight"),
                1,
                c.n_embd,
                false,
            ));
            for p in Proj::ALL {
                let (rows, cols) = projection_shape(c, p);
                slots[PROJ0 + p.index()] = Some(add(
                    &mut l,
                    format!("blk.{i}.{}.weight", p.gguf_stem()),
                    rows,
                    cols,
                    true,
                ));
            }
            if biases {
                for (j, p) in [Proj::Q, Proj::K, Proj::V].into_iter().enumerate() {
                    let (rows, _) = projection_shape(c, p);
                    slots[BIAS0 + j] = Some(add(
                        &mut l,
                        format!("blk.{i}.{}.bias", p.gguf_stem()),
                        1,
                        rows,
                        false,
                    ));
                }
            }
            l.layers.push(slots);
        }
        l.output_norm = add(&mut l, "output_norm.weight".into(), 1, c.n_embd, false);
        if !tied_output {
            l.output = Some(add(
                &mut l,
                "output.weight".into(),
                c.n_vocab,
                c.n_embd,
                true,
            ));
        }
        l
    }

    fn range(&self, i: usize) -> Range<usize> {
        self.tensors[i].range.clone()
    }

    fn layer(&self, li: usize, which: usize) -> Option<Range<usize>> {
        self.layers
            .get(li)?
            .get(which)
            .copied()
            .flatten()
            .map(|i| self.range(i))
    }

    fn output_range(&self) -> Range<usize> {
        self.range(self.output.unwrap_or(self.token_embd))
    }

    /// The values of a loaded model in this layout (dequantized to f32).
    pub fn values_of(&self, model: &Model) -> Result<Vec<f32>, TrainError> {
        let mut v = vec![0f32; self.len];
        let mut put = |r: Range<usize>, w: &Weight, name: &str| -> Result<(), TrainError> {
            let vals = w.to_f32().map_err(|e| TrainError::quant(name, e))?;
            v[r].copy_from_slice(&vals);
            Ok(())
        };
        put(
            self.range(self.token_embd),
            &model.token_embd,
            "token_embd.weight",
        )?;
        if let Some(o) = self.output {
            put(self.range(o), &model.output, "output.weight")?;
        }
        for (li, layer) in model.layers.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(r) = self.layer(li, PROJ0 + p.index()) {
                    put(r, layer.proj(p), p.gguf_stem())?;
                }
            }
        }
        let mut copy = |r: Option<Range<usize>>, src: Option<&Vec<f32>>| {
            if let (Some(r), Some(s)) = (r, src) {
                v[r].copy_from_slice(s);
            }
        };
        for (li, layer) in model.layers.iter().enumerate() {
            copy(self.layer(li, ATTN_NORM), Some(&layer.attn_norm));
            copy(self.layer(li, FFN_NORM), Some(&layer.ffn_norm));
            copy(self.layer(li, BIAS0), layer.bq.as_ref());
            copy(self.layer(li, BIAS0 + 1), layer.bk.as_ref());
            copy(self.layer(li, BIAS0 + 2), layer.bv.as_ref());
        }
        copy(Some(self.range(self.output_norm)), Some(&model.output_norm));
        Ok(v)
    }
}

/// What a step trains: deltas on projections (indexed by [`slot`]) and/or every
/// tensor of the model (full training; the base model then only gives the shape).
pub struct Trainables<'a, T: Real> {
    pub deltas: Vec<Option<DeltaOp<'a, T>>>,
    pub full: Option<(&'a FullLayout, &'a [T])>,
}

impl<'a, T: Real> Trainables<'a, T> {
    pub fn none(c: &ModelConfig) -> Self {
        Trainables {
            deltas: vec![None; c.n_layer * Proj::ALL.len()],
            full: None,
        }
    }
}

/// Gradients of one step, shaped like the [`Trainables`].
#[derive(Debug, Clone)]
pub struct Grads<T> {
    pub deltas: Vec<Option<DeltaGrad<T>>>,
    pub full: Option<Vec<T>>,
}

/// What one pass over a batch gives.
#[derive(Debug, Clone)]
pub struct StepOut<T> {
    /// Sum over targets of `weight * -log p(target)`.
    pub loss: f64,
    pub n_targets: usize,
    pub grads: Option<Grads<T>>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct StepOptions {
    /// Compute gradients (false: loss only).
    pub backward: bool,
    /// Keep only each layer's input and recompute the rest in the backward pass.
    pub recompute: bool,
}

/// The model seen by the trainer.
pub struct Net<'m> {
    pub model: &'m Model,
}

/// Activations of one layer kept for its backward.
struct Tape<T> {
    h1: Vec<T>,
    r1: Vec<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    probs: Vec<Vec<T>>,
    att: Vec<T>,
    x2: Vec<T>,
    h2: Vec<T>,
    r2: Vec<T>,
    gate: Vec<T>,
    up: Vec<T>,
    act: Vec<T>,
    /// `x A^T` of each low-rank delta, by projection.
    low: [Option<Vec<T>>; 7],
}

/// The packed batch: token ids, rope tables and sequence spans.
struct Packed<T> {
    tokens: Vec<u32>,
    seqs: Vec<(usize, usize)>,
    cos: Vec<T>,
    sin: Vec<T>,
    /// (row, target) of every position with a loss.
    targets: Vec<(usize, u32)>,
}

impl<'m> Net<'m> {
    pub fn new(model: &'m Model) -> Self {
        Net { model }
    }

    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn pack<T: Real>(&self, batch: &[Example]) -> Result<Packed<T>, TrainError> {
        let c = self.config();
        let half = c.n_rot / 2;
        let mut p = Packed {
            tokens: Vec::new(),
            seqs: Vec::new(),
            cos: Vec::new(),
            sin: Vec::new(),
            targets: Vec::new(),
        };
        let (mut cf, mut sf) = (vec![0f32; half], vec![0f32; half]);
        for (ei, ex) in batch.iter().enumerate() {
            if ex.tokens.is_empty() {
                continue;
            }
            if let Some(&t) = ex.tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
                return Err(TrainError::Data(format!(
                    "example {ei}: token {t} is outside the vocabulary ({})",
                    c.n_vocab
                )));
            }
            let start = p.tokens.len();
            for (i, &t) in ex.tokens.iter().enumerate() {
                p.tokens.push(t);
                self.model.rope_angles(i, &mut cf, &mut sf);
                p.cos.extend(cf.iter().map(|&v| T::from_f32(v)));
                p.sin.extend(sf.iter().map(|&v| T::from_f32(v)));
            }
            let first = ex.n_prompt.max(1) - 1;
            for i in first..ex.tokens.len() - 1 {
                p.targets.push((start + i, ex.tokens[i + 1]));
            }
            p.seqs.push((start, ex.tokens.len()));
        }
        Ok(p)
    }

    /// Loss (and gradients) of `batch`, each target weighted by `weight`.
    pub fn step<T: Real>(
        &self,
        batch: &[Example],
        tr: &Trainables<'_, T>,
        weight: f64,
        opts: StepOptions,
    ) -> Result<StepOut<T>, TrainError> {
        let c = self.config();
        let d = c.n_embd;
        let pk = self.pack::<T>(batch)?;
        let n = pk.tokens.len();
        let n_slots = c.n_layer * Proj::ALL.len();
        if tr.deltas.len() != n_slots {
            return Err(TrainError::Shape(format!(
                "{} delta slots, the model has {n_slots}",
                tr.deltas.len()
            )));
        }
        if let Some((l, v)) = tr.full {
            if v.len() != l.len {
                return Err(TrainError::Shape(format!(
                    "{} full-model parameters, the layout has {}",
                    v.len(),
                    l.len
                )));
            }
        }

        // Embeddings.
        let mut x = vec![T::ZERO; n * d];
        let mut row = vec![0f32; d];
        for (t, xr) in pk.tokens.iter().zip(x.chunks_exact_mut(d)) {
            match tr.full {
                Some((l, v)) => {
                    let r = l.range(l.token_embd);
                    xr.copy_from_slice(&v[r][*t as usize * d..(*t as usize + 1) * d]);
                }
                None => {
                    self.model
                        .token_embd
                        .row_into(*t as usize, &mut row)
                        .map_err(|e| TrainError::quant("token_embd.weight", e))?;
                    for (o, &v) in xr.iter_mut().zip(&row) {
                        *o = T::from_f32(v);
                    }
                }
            }
        }

        let mut inputs = Vec::with_capacity(c.n_layer);
        let mut tapes = Vec::with_capacity(c.n_layer);
        for li in 0..c.n_layer {
            let (out, tape) = self.layer_fwd(li, &x, &pk, tr)?;
            if opts.backward {
                inputs.push(std::mem::replace(&mut x, out));
                tapes.push(if opts.recompute { None } else { Some(tape) });
            } else {
                x = out;
            }
        }

        // Final norm, then logits and cross-entropy only where there are targets.
        let norm_w = self.norm_weights(tr, None)?;
        let mut hn = vec![T::ZERO; n * d];
        let mut rn = vec![T::ZERO; n];
        ops::rms_norm_fwd(&x, &norm_w, c.rms_eps as f64, &mut hn, &mut rn);
        let mut grads = Grads {
            deltas: vec![None; n_slots],
            full: tr.full.map(|(l, _)| vec![T::ZERO; l.len]),
        };
        let mut dhn = vec![T::ZERO; n * d];
        let loss = self.head(
            &hn,
            &pk.targets,
            T::from_f64(weight),
            tr,
            opts.backward,
            &mut dhn,
            &mut grads,
        )?;
        if !opts.backward {
            return Ok(StepOut {
                loss,
                n_targets: pk.targets.len(),
                grads: None,
            });
        }

        let mut dx = vec![T::ZERO; n * d];
        let dnorm = match (&mut grads.full, tr.full) {
            (Some(g), Some((l, _))) => Some(&mut g[l.range(l.output_norm)]),
            _ => None,
        };
        ops::rms_norm_bwd(&dhn, &x, &norm_w, &rn, &mut dx, dnorm);

        for li in (0..c.n_layer).rev() {
            let x_in = inputs.pop().unwrap_or_default();
            let tape = match tapes.pop().flatten() {
                Some(t) => t,
                None => self.layer_fwd(li, &x_in, &pk, tr)?.1,
            };
            dx = self.layer_bwd(li, &x_in, tape, dx, &pk, tr, &mut grads)?;
        }

        // Embedding gradient (full training only).
        if let (Some(g), Some((l, _))) = (&mut grads.full, tr.full) {
            let r = l.range(l.token_embd);
            let ge = &mut g[r];
            for (t, dr) in pk.tokens.iter().zip(dx.chunks_exact(d)) {
                let dst = &mut ge[*t as usize * d..(*t as usize + 1) * d];
                for (a, &b) in dst.iter_mut().zip(dr) {
                    *a += b;
                }
            }
        }
        Ok(StepOut {
            loss,
            n_targets: pk.targets.len(),
            grads: Some(grads),
        })
    }

    /// A norm's weights: the model's (frozen) or the trainable copy.
    /// `layer_which`: None = output norm, Some((layer, ATTN_NORM | FFN_NORM)).
    fn norm_weights<T: Real>(
        &self,
        tr: &Trainables<'_, T>,
        layer_which: Option<(usize, usize)>,
    ) -> Result<Vec<T>, TrainError> {
        if let Some((l, v)) = tr.full {
            let r = match layer_which {
                None => Some(l.range(l.output_norm)),
                Some((li, w)) => l.layer(li, w),
            };
            let r = r.ok_or_else(|| TrainError::Shape("norm missing from the layout".into()))?;
            return Ok(v[r].to_vec());
        }
        let src = match layer_which {
            None => &self.model.output_norm,
            Some((li, ATTN_NORM)) => &self.model.layers[li].attn_norm,
            Some((li, _)) => &self.model.layers[li].ffn_norm,
        };
        Ok(to_real(src))
    }

    fn bias<T: Real>(&self, tr: &Trainables<'_, T>, li: usize, p: Proj) -> Option<Vec<T>> {
        let j = match p {
            Proj::Q => 0,
            Proj::K => 1,
            Proj::V => 2,
            _ => return None,
        };
        if let Some((l, v)) = tr.full {
            return l.layer(li, BIAS0 + j).map(|r| v[r].to_vec());
        }
        let layer = &self.model.layers[li];
        [&layer.bq, &layer.bk, &layer.bv][j]
            .as_ref()
            .map(|b| to_real(b))
    }

    /// `y = x W^T (+ bias) + delta(x)`; returns y and the low-rank intermediate.
    fn proj_fwd<T: Real>(
        &self,
        li: usize,
        p: Proj,
        x: &[T],
        n: usize,
        tr: &Trainables<'_, T>,
    ) -> Result<(Vec<T>, Option<Vec<T>>), TrainError> {
        let (out, inp) = projection_shape(self.config(), p);
        let mut y = vec![T::ZERO; n * out];
        match tr.full {
            Some((l, v)) => {
                let r = l.layer(li, PROJ0 + p.index()).unwrap_or(0..0);
                ops::dense_fwd(&v[r], out, inp, x, n, &mut y);
            }
            None => ops::frozen_fwd(self.model.layers[li].proj(p), x, n, &mut y)?,
        }
        if let Some(b) = self.bias(tr, li, p) {
            for row in y.chunks_exact_mut(out) {
                for (a, &bb) in row.iter_mut().zip(&b) {
                    *a += bb;
                }
            }
        }
        let mut low = None;
        match &tr.deltas[slot(li, p)] {
            None => {}
            Some(DeltaOp::LowRank { a, b, rank, scale }) => {
                let mut t = vec![T::ZERO; n * rank];
                par_gemm(
                    Mat::new(x, n, inp),
                    Mat::new(a, *rank, inp).t(),
                    T::ZERO,
                    &mut t,
                );
                let st: Vec<T> = t.iter().map(|&v| v * *scale).collect();
                par_gemm(
                    Mat::new(&st, n, *rank),
                    Mat::new(b, out, *rank).t(),
                    T::ONE,
                    &mut y,
                );
                low = Some(t);
            }
            Some(DeltaOp::Dense { w }) => {
                par_gemm(
                    Mat::new(x, n, inp),
                    Mat::new(w, out, inp).t(),
                    T::ONE,
                    &mut y,
                );
            }
            Some(DeltaOp::Sparse { idx, val }) => {
                sparse_fwd(idx, val, (out, inp), x, &mut y)?;
            }
        }
        Ok((y, low))
    }

    /// Adds `dy`'s contribution to `dx` and to the trainables' gradients.
    #[allow(clippy::too_many_arguments)]
    fn proj_bwd<T: Real>(
        &self,
        li: usize,
        p: Proj,
        x: &[T],
        dy: &[T],
        low: Option<&Vec<T>>,
        tr: &Trainables<'_, T>,
        grads: &mut Grads<T>,
        dx: &mut [T],
    ) -> Result<(), TrainError> {
        let (out, inp) = projection_shape(self.config(), p);
        let n = x.len() / inp.max(1);
        match (tr.full, &mut grads.full) {
            (Some((l, v)), Some(g)) => {
                let r = l.layer(li, PROJ0 + p.index()).unwrap_or(0..0);
                ops::dense_bwd(&v[r.clone()], out, inp, x, dy, n, Some(dx), Some(&mut g[r]));
                if let Some(j) = [Proj::Q, Proj::K, Proj::V].iter().position(|&q| q == p) {
                    if let Some(br) = l.layer(li, BIAS0 + j) {
                        let gb = &mut g[br];
                        for row in dy.chunks_exact(out) {
                            for (a, &b) in gb.iter_mut().zip(row) {
                                *a += b;
                            }
                        }
                    }
                }
            }
            _ => ops::frozen_bwd(self.model.layers[li].proj(p), dy, n, dx)?,
        }
        let s = slot(li, p);
        let grad = match &tr.deltas[s] {
            None => None,
            Some(DeltaOp::LowRank { a, b, rank, scale }) => {
                let r = *rank;
                let t = low.ok_or_else(|| TrainError::Shape("low-rank tape missing".into()))?;
                let st: Vec<T> = t.iter().map(|&v| v * *scale).collect();
                // dB = dY^T (s t); d(t) = s dY B; dA = dt^T x; dx += dt A.
                let mut db = vec![T::ZERO; out * r];
                gemm(
                    Mat::new(dy, n, out).t(),
                    Mat::new(&st, n, r),
                    T::ZERO,
                    &mut db,
                    r,
                );
                let mut dt = vec![T::ZERO; n * r];
                par_gemm(Mat::new(dy, n, out), Mat::new(b, out, r), T::ZERO, &mut dt);
                for v in &mut dt {
                    *v *= *scale;
                }
                let mut da = vec![T::ZERO; r * inp];
                gemm(
                    Mat::new(&dt, n, r).t(),
                    Mat::new(x, n, inp),
                    T::ZERO,
                    &mut da,
                    inp,
                );
                par_gemm(Mat::new(&dt, n, r), Mat::new(a, r, inp), T::ONE, dx);
                Some(DeltaGrad::LowRank { da, db })
            }
            Some(DeltaOp::Dense { w }) => {
                let mut dw = vec![T::ZERO; out * inp];
                ops::dense_bwd(w, out, inp, x, dy, n, Some(dx), Some(&mut dw));
                Some(DeltaGrad::Dense { dw })
            }
            Some(DeltaOp::Sparse { idx, val }) => {
                let dval = sparse_bwd(idx, val, (out, inp), x, dy, dx)?;
                Some(DeltaGrad::Sparse { dval })
            }
        };
        if let Some(g) = grad {
            grads.deltas[s] = Some(match grads.deltas[s].take() {
                None => g,
                Some(prev) => add_grads(prev, g),
            });
        }
        Ok(())
    }

    fn attn_shape(&self) -> AttnShape {
        let c = self.config();
        AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
        }
    }

    fn layer_fwd<T: Real>(
        &self,
        li: usize,
        x: &[T],
        pk: &Packed<T>,
        tr: &Trainables<'_, T>,
    ) -> Result<(Vec<T>, Tape<T>), TrainError> {
        let c = self.config();
        let (d, n) = (c.n_embd, pk.tokens.len());
        let eps = c.rms_eps as f64;
        let mut low: [Option<Vec<T>>; 7] = Default::default();
        let mut h1 = vec![T::ZERO; n * d];
        let mut r1 = vec![T::ZERO; n];
        ops::rms_norm_fwd(
            x,
            &self.norm_weights(tr, Some((li, ATTN_NORM)))?,
            eps,
            &mut h1,
            &mut r1,
        );
        let mut proj = |p: Proj, input: &[T]| -> Result<Vec<T>, TrainError> {
            let (y, l) = self.proj_fwd(li, p, input, n, tr)?;
            low[p.index()] = l;
            Ok(y)
        };
        let mut q = proj(Proj::Q, &h1)?;
        let mut k = proj(Proj::K, &h1)?;
        let v = proj(Proj::V, &h1)?;
        ops::rope(
            &mut q,
            c.n_head,
            c.head_dim,
            c.n_rot,
            c.rope_style,
            &pk.cos,
            &pk.sin,
            false,
        );
        ops::rope(
            &mut k,
            c.n_head_kv,
            c.head_dim,
            c.n_rot,
            c.rope_style,
            &pk.cos,
            &pk.sin,
            false,
        );
        let (att, probs) = ops::attention_fwd(&q, &k, &v, &pk.seqs, self.attn_shape());
        let o = proj(Proj::O, &att)?;
        let x2: Vec<T> = x.iter().zip(&o).map(|(&a, &b)| a + b).collect();
        let mut h2 = vec![T::ZERO; n * d];
        let mut r2 = vec![T::ZERO; n];
        ops::rms_norm_fwd(
            &x2,
            &self.norm_weights(tr, Some((li, FFN_NORM)))?,
            eps,
            &mut h2,
            &mut r2,
        );
        let gate = proj(Proj::Gate, &h2)?;
        let up = proj(Proj::Up, &h2)?;
        let mut act = vec![T::ZERO; gate.len()];
        ops::swiglu_fwd(&gate, &up, &mut act);
        let down = proj(Proj::Down, &act)?;
        let out: Vec<T> = x2.iter().zip(&down).map(|(&a, &b)| a + b).collect();
        Ok((
            out,
            Tape {
                h1,
                r1,
                q,
                k,
                v,
                probs,
                att,
                x2,
                h2,
                r2,
                gate,
                up,
                act,
                low,
            },
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_bwd<T: Real>(
        &self,
        li: usize,
        x: &[T],
        t: Tape<T>,
        d_out: Vec<T>,
        pk: &Packed<T>,
        tr: &Trainables<'_, T>,
        grads: &mut Grads<T>,
    ) -> Result<Vec<T>, TrainError> {
        let c = self.config();
        let n = pk.tokens.len();
        let low = |p: Proj| t.low[p.index()].as_ref();

        // FFN block: out = x2 + down(swiglu(gate(h2), up(h2))).
        let mut d_x2 = d_out.clone();
        let mut d_act = vec![T::ZERO; t.act.len()];
        self.proj_bwd(
            li,
            Proj::Down,
            &t.act,
            &d_out,
            low(Proj::Down),
            tr,
            grads,
            &mut d_act,
        )?;
        let mut d_gate = vec![T::ZERO; t.gate.len()];
        let mut d_up = vec![T::ZERO; t.up.len()];
        ops::swiglu_bwd(&d_act, &t.gate, &t.up, &mut d_gate, &mut d_up);
        let mut d_h2 = vec![T::ZERO; t.h2.len()];
        self.proj_bwd(
            li,
            Proj::Gate,
            &t.h2,
            &d_gate,
            low(Proj::Gate),
            tr,
            grads,
            &mut d_h2,
        )?;
        self.proj_bwd(
            li,
            Proj::Up,
            &t.h2,
            &d_up,
            low(Proj::Up),
            tr,
            grads,
            &mut d_h2,
        )?;
        let ffn_w = self.norm_weights(tr, Some((li, FFN_NORM)))?;
        let full_range = |which| tr.full.and_then(|(l, _)| l.layer(li, which));
        let dw = match (&mut grads.full, full_range(FFN_NORM)) {
            (Some(g), Some(r)) => Some(&mut g[r]),
            _ => None,
        };
        ops::rms_norm_bwd(&d_h2, &t.x2, &ffn_w, &t.r2, &mut d_x2, dw);

        // Attention block: x2 = x + o(attn(rope(q(h1)), rope(k(h1)), v(h1))).
        let mut d_att = vec![T::ZERO; t.att.len()];
        self.proj_bwd(
            li,
            Proj::O,
            &t.att,
            &d_x2,
            low(Proj::O),
            tr,
            grads,
            &mut d_att,
        )?;
        let mut dq = vec![T::ZERO; t.q.len()];
        let mut dk = vec![T::ZERO; t.k.len()];
        let mut dv = vec![T::ZERO; t.v.len()];
        ops::attention_bwd(
            &d_att,
            &t.q,
            &t.k,
            &t.v,
            &t.probs,
            &pk.seqs,
            self.attn_shape(),
            &mut dq,
            &mut dk,
            &mut dv,
        );
        ops::rope(
            &mut dq,
            c.n_head,
            c.head_dim,
            c.n_rot,
            c.rope_style,
            &pk.cos,
            &pk.sin,
            true,
        );
        ops::rope(
            &mut dk,
            c.n_head_kv,
            c.head_dim,
            c.n_rot,
            c.rope_style,
            &pk.cos,
            &pk.sin,
            true,
        );
        let mut d_h1 = vec![T::ZERO; t.h1.len()];
        self.proj_bwd(li, Proj::Q, &t.h1, &dq, low(Proj::Q), tr, grads, &mut d_h1)?;
        self.proj_bwd(li, Proj::K, &t.h1, &dk, low(Proj::K), tr, grads, &mut d_h1)?;
        self.proj_bwd(li, Proj::V, &t.h1, &dv, low(Proj::V), tr, grads, &mut d_h1)?;
        let attn_w = self.norm_weights(tr, Some((li, ATTN_NORM)))?;
        let dw = match (&mut grads.full, full_range(ATTN_NORM)) {
            (Some(g), Some(r)) => Some(&mut g[r]),
            _ => None,
        };
        let mut d_x = d_x2;
        ops::rms_norm_bwd(&d_h1, x, &attn_w, &t.r1, &mut d_x, dw);
        debug_assert_eq!(d_x.len(), n * c.n_embd);
        Ok(d_x)
    }

    /// Logits and cross-entropy for the target rows, 64 rows at a time so the
    /// `[rows, vocab]` logits never exist for the whole batch.
    #[allow(clippy::too_many_arguments)]
    fn head<T: Real>(
        &self,
        hn: &[T],
        targets: &[(usize, u32)],
        weight: T,
        tr: &Trainables<'_, T>,
        backward: bool,
        dhn: &mut [T],
        grads: &mut Grads<T>,
    ) -> Result<f64, TrainError> {
        let c = self.config();
        let (d, vocab) = (c.n_embd, c.n_vocab);
        let mut loss = 0.0;
        for chunk in targets.chunks(64) {
            let m = chunk.len();
            let mut h = vec![T::ZERO; m * d];
            for (dst, &(r, _)) in h.chunks_exact_mut(d).zip(chunk) {
                dst.copy_from_slice(&hn[r * d..(r + 1) * d]);
            }
            let mut logits = vec![T::ZERO; m * vocab];
            match tr.full {
                Some((l, v)) => ops::dense_fwd(&v[l.output_range()], vocab, d, &h, m, &mut logits),
                None => ops::frozen_fwd(&self.model.output, &h, m, &mut logits)?,
            }
            let tg: Vec<u32> = chunk.iter().map(|&(_, t)| t).collect();
            loss += ops::cross_entropy(&mut logits, vocab, &tg, weight);
            if !backward {
                continue;
            }
            let mut dh = vec![T::ZERO; m * d];
            match (tr.full, &mut grads.full) {
                (Some((l, v)), Some(g)) => {
                    let r = l.output_range();
                    ops::dense_bwd(
                        &v[r.clone()],
                        vocab,
                        d,
                        &h,
                        &logits,
                        m,
                        Some(&mut dh),
                        Some(&mut g[r]),
                    );
                }
                _ => ops::frozen_bwd(&self.model.output, &logits, m, &mut dh)?,
            }
            for (src, &(r, _)) in dh.chunks_exact(d).zip(chunk) {
                for (a, &b) in dhn[r * d..(r + 1) * d].iter_mut().zip(src) {
                    *a += b;
                }
            }
        }
        Ok(loss)
    }
}

fn add_grads<T: Real>(a: DeltaGrad<T>, b: DeltaGrad<T>) -> DeltaGrad<T> {
    let add = |mut x: Vec<T>, y: Vec<T>| {
        for (p, q) in x.iter_mut().zip(y) {
            *p += q;
        }
        x
    };
    match (a, b) {
        (DeltaGrad::LowRank { da, db }, DeltaGrad::LowRank { da: a2, db: b2 }) => {
            DeltaGrad::LowRank {
                da: add(da, a2),
                db: add(db, b2),
            }
        }
        (DeltaGrad::Dense { dw }, DeltaGrad::Dense { dw: d2 }) => {
            DeltaGrad::Dense { dw: add(dw, d2) }
        }
        (DeltaGrad::Sparse { dval }, DeltaGrad::Sparse { dval: d2 }) => DeltaGrad::Sparse {
            dval: add(dval, d2),
        },
        (a, _) => a,
    }
}

/// `v` as f32 when `T` is f32 (the training scalar), so the f32 path can use the
/// SIMD sparse kernels; the reference scalar takes the plain loops.
fn as_f32<T: Real>(v: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so the slice is a slice of f32.
        .then(|| unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<f32>(), v.len()) })
}

fn as_f32_mut<T: Real>(v: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so the slice is a slice of f32.
        .then(|| unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<f32>(), v.len()) })
}

fn sparse_delta_of(
    idx: &[u32],
    val: &[f32],
    (out, inp): (usize, usize),
) -> Result<crate::delta::SparseDelta, TrainError> {
    crate::delta::SparseDelta::from_flat(out, inp, idx, val, 1.0)
        .map_err(|e| TrainError::Shape(format!("sparse delta: {e}")))
}

/// `y[b, o] += sum_k val_k x[b, i_k]` over the entries of row `o` (sorted flat indices).
fn sparse_fwd<T: Real>(
    idx: &[u32],
    val: &[T],
    (out, inp): (usize, usize),
    x: &[T],
    y: &mut [T],
) -> Result<(), TrainError> {
    if let (Some(v), Some(xf)) = (as_f32(val), as_f32(x)) {
        let d = sparse_delta_of(idx, v, (out, inp))?;
        let n = xf.len() / inp.max(1);
        let yf = as_f32_mut(y).ok_or_else(|| TrainError::Shape("scalar mismatch".into()))?;
        return Ok(super::sara::sparse_forward(&d, xf, n, yf)?);
    }
    for (xr, yr) in x.chunks_exact(inp).zip(y.chunks_exact_mut(out)) {
        for (&f, &v) in idx.iter().zip(val) {
            let (o, i) = (f as usize / inp, f as usize % inp);
            yr[o] += v * xr[i];
        }
    }
    Ok(())
}

/// Gradient at the stored entries (`sum_b dy[b, o] x[b, i]`) and `dx += dy dW`.
fn sparse_bwd<T: Real>(
    idx: &[u32],
    val: &[T],
    (out, inp): (usize, usize),
    x: &[T],
    dy: &[T],
    dx: &mut [T],
) -> Result<Vec<T>, TrainError> {
    let mut dval = vec![T::ZERO; idx.len()];
    if let (Some(v), Some(xf), Some(dyf)) = (as_f32(val), as_f32(x), as_f32(dy)) {
        let d = sparse_delta_of(idx, v, (out, inp))?;
        let n = xf.len() / inp.max(1);
        let dxf = as_f32_mut(dx).ok_or_else(|| TrainError::Shape("scalar mismatch".into()))?;
        super::sara::sparse_backward_input(&d, dyf, n, dxf)?;
        let g = as_f32_mut(&mut dval).ok_or_else(|| TrainError::Shape("scalar mismatch".into()))?;
        super::sara::sddmm(dyf, xf, n, out, inp, idx, g)?;
        return Ok(dval);
    }
    for ((xr, dyr), dxr) in x
        .chunks_exact(inp)
        .zip(dy.chunks_exact(out))
        .zip(dx.chunks_exact_mut(inp))
    {
        for ((&f, &v), g) in idx.iter().zip(val).zip(dval.iter_mut()) {
            let (o, i) = (f as usize / inp, f as usize % inp);
            *g += dyr[o] * xr[i];
            dxr[i] += dyr[o] * v;
        }
    }
    Ok(dval)
}
