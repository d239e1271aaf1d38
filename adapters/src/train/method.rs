//! Trainable parameterisations: how a flat parameter vector becomes the deltas (or
//! weights) the network runs, and how the network's gradients flow back to it.

use std::borrow::Cow;
use std::path::PathBuf;

use graft_runtime::model::{Layer, Model, ModelConfig, Proj, Weight};
use rand::{Rng, SeedableRng};

use super::net::{slot, DeltaGrad, DeltaOp, FullLayout, Grads, ParamTensor, Trainables};
use super::real::Real;
use super::sara::{
    pick_rank_tensor, progressive_adjust, rank_regulariser, sparse_delta, SaraEntries,
};
use super::TrainError;
use crate::delta::{f32_weight, projection_shape, Adapter, AdapterFormat, LoraDelta, TensorDelta};
use crate::rps::{Role, RpsLayout};

/// LoRA on a set of (layer, projection) targets: `A [rank, in]` (Kaiming-uniform
/// init, as PEFT) and `B [out, rank]` (zero init, so step 0 is the base).
#[derive(Debug, Clone)]
pub struct Lora {
    pub targets: Vec<(usize, Proj)>,
    pub rank: usize,
    pub alpha: f32,
    /// rsLoRA: scale alpha / sqrt(rank) instead of alpha / rank.
    pub rslora: bool,
    /// A then B of every target, in target order.
    pub tensors: Vec<ParamTensor>,
}

impl Lora {
    pub fn new(
        c: &ModelConfig,
        targets: Vec<(usize, Proj)>,
        rank: usize,
        alpha: f32,
        rslora: bool,
    ) -> Result<Lora, TrainError> {
        if rank == 0 {
            return Err(TrainError::Config("LoRA rank must be at least 1".into()));
        }
        if targets.is_empty() {
            return Err(TrainError::Config(
                "LoRA needs at least one target projection".into(),
            ));
        }
        let mut tensors = Vec::new();
        let mut at = 0;
        for &(layer, p) in &targets {
            if layer >= c.n_layer {
                return Err(TrainError::Config(format!(
                    "target layer {layer}: the model has {} layers",
                    c.n_layer
                )));
            }
            let (out, inp) = projection_shape(c, p);
            for (part, rows, cols) in [("lora_a", rank, inp), ("lora_b", out, rank)] {
                tensors.push(ParamTensor {
                    name: format!("{}.{part}", p.gguf_weight(layer)),
                    rows,
                    cols,
                    range: at..at + rows * cols,
                    decay: true,
                });
                at += rows * cols;
            }
        }
        Ok(Lora {
            targets,
            rank,
            alpha,
            rslora,
            tensors,
        })
    }

    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// Every tensor of the model trains (pretraining, full fine-tuning).
#[derive(Debug, Clone)]
pub struct Full {
    pub layout: FullLayout,
}

impl Full {
    pub fn new(model: &Model) -> Full {
        let tied = match &model.gguf {
            Some(g) => g.tensor("output.weight").is_none(),
            None => false,
        };
        let biases = model.layers.first().is_some_and(|l| l.bq.is_some());
        Full {
            layout: FullLayout::new(&model.config, tied, biases),
        }
    }
}

/// SaRA on one weight: the live (trainable) entries and those frozen by the
/// progressive adjustment, and where the live ones sit in their union.
#[derive(Debug, Clone)]
pub struct SaraPart {
    pub layer: usize,
    pub proj: Proj,
    /// Live entries: indices and initial values (current values are the parameters).
    pub live: SaraEntries,
    /// Entries frozen at their trained values.
    pub frozen: SaraEntries,
    /// Sorted union of live and frozen indices (the delta's structure).
    merged: Vec<u32>,
    /// Position in `merged` of each live entry.
    live_pos: Vec<usize>,
}

impl SaraPart {
    fn new(layer: usize, proj: Proj, live: SaraEntries, frozen: SaraEntries) -> Self {
        let mut all: Vec<(u32, bool)> = live
            .indices
            .iter()
            .map(|&i| (i, true))
            .chain(frozen.indices.iter().map(|&i| (i, false)))
            .collect();
        all.sort_unstable();
        let merged: Vec<u32> = all.iter().map(|&(i, _)| i).collect();
        let live_pos = all
            .iter()
            .enumerate()
            .filter(|(_, &(_, l))| l)
            .map(|(p, _)| p)
            .collect();
        SaraPart {
            layer,
            proj,
            live,
            frozen,
            merged,
            live_pos,
        }
    }

    /// Delta values over `merged` for live parameters `p`.
    fn delta<T: Real>(&self, p: &[T]) -> Vec<T> {
        let mut d = vec![T::ZERO; self.merged.len()];
        let mut fi = 0;
        let mut li = 0;
        for (k, &idx) in self.merged.iter().enumerate() {
            if li < self.live_pos.len() && self.live_pos[li] == k {
                d[k] = p[li] - T::from_f32(self.live.init[li]);
                li += 1;
            } else if let (Some(&v), Some(&p0)) =
                (self.frozen.values.get(fi), self.frozen.init.get(fi))
            {
                debug_assert_eq!(self.frozen.indices[fi], idx);
                d[k] = T::from_f32(v - p0);
                fi += 1;
            }
        }
        d
    }
}

/// SaRA: the base weights below `theta` in magnitude train in place (values
/// initialised to the base's, signed, so step 0 is the base); a nuclear-norm
/// regulariser keeps the update low-rank; at half the steps entries that grew past
/// `theta` freeze.
#[derive(Debug, Clone)]
pub struct Sara {
    pub theta: f32,
    /// Weight of the nuclear-norm regulariser (0 = off).
    pub lambda_rank: f32,
    /// Freeze grown entries at half the steps.
    pub progressive: bool,
    pub parts: Vec<SaraPart>,
    pub tensors: Vec<ParamTensor>,
}

impl Sara {
    pub fn new(
        model: &Model,
        targets: &[(usize, Proj)],
        theta: f32,
        lambda_rank: f32,
        progressive: bool,
    ) -> Result<Sara, TrainError> {
        if !(theta.is_finite() && theta > 0.0) {
            return Err(TrainError::Config(format!(
                "theta {theta}: expected a positive number"
            )));
        }
        let mut parts = Vec::new();
        for &(layer, p) in targets {
            let w = model.layers.get(layer).map(|l| l.proj(p)).ok_or_else(|| {
                TrainError::Config(format!("target layer {layer} is beyond the model"))
            })?;
            let live = SaraEntries::from_weight(w, theta)?;
            let frozen = SaraEntries {
                rows: live.rows,
                cols: live.cols,
                indices: Vec::new(),
                values: Vec::new(),
                init: Vec::new(),
            };
            parts.push(SaraPart::new(layer, p, live, frozen));
        }
        let mut s = Sara {
            theta,
            lambda_rank,
            progressive,
            parts,
            tensors: Vec::new(),
        };
        s.relayout();
        if s.tensors.last().is_none_or(|t| t.range.end == 0) {
            return Err(TrainError::Config(format!(
                "no base weight is below theta {theta} in magnitude: raise --theta"
            )));
        }
        Ok(s)
    }

    fn relayout(&mut self) {
        let mut at = 0;
        self.tensors = self
            .parts
            .iter()
            .map(|p| {
                let n = p.live.len();
                let t = ParamTensor {
                    name: format!("{}.sara", p.proj.gguf_weight(p.layer)),
                    rows: 1,
                    cols: n,
                    range: at..at + n,
                    decay: true,
                };
                at += n;
                t
            })
            .collect();
    }

    /// SaRA's progressive adjustment with the current parameters: returns the new
    /// (smaller) parameter vector; the caller restarts the optimizer state.
    pub fn adjust(&mut self, params: &[f32]) -> Result<Vec<f32>, TrainError> {
        let mut next = Vec::new();
        for (part, t) in self.parts.iter_mut().zip(&self.tensors) {
            let state = SaraEntries {
                values: params[t.range.clone()].to_vec(),
                ..part.live.clone()
            };
            let adj = progressive_adjust(&state, self.theta)?;
            let mut frozen = part.frozen.clone();
            let mut pairs: Vec<(u32, f32, f32)> = frozen
                .indices
                .iter()
                .zip(&frozen.values)
                .zip(&frozen.init)
                .chain(
                    adj.frozen
                        .indices
                        .iter()
                        .zip(&adj.frozen.values)
                        .zip(&adj.frozen.init),
                )
                .map(|((&i, &v), &p0)| (i, v, p0))
                .collect();
            pairs.sort_by_key(|p| p.0);
            frozen.indices = pairs.iter().map(|p| p.0).collect();
            frozen.values = pairs.iter().map(|p| p.1).collect();
            frozen.init = pairs.iter().map(|p| p.2).collect();
            next.extend_from_slice(&adj.live.values);
            *part = SaraPart::new(part.layer, part.proj, adj.live, frozen);
        }
        self.relayout();
        Ok(next)
    }

    /// The regulariser's loss and its gradient added into `grad` for one weight
    /// chosen by `draw` (the reference applies it to one random eligible weight per
    /// step).
    pub fn add_rank_gradient(
        &self,
        params: &[f32],
        grad: &mut [f32],
        draw: u64,
    ) -> Result<f32, TrainError> {
        if self.lambda_rank == 0.0 {
            return Ok(0.0);
        }
        let shapes: Vec<(usize, usize)> = self
            .parts
            .iter()
            .map(|p| (p.live.rows, p.live.cols))
            .collect();
        let Some(i) = pick_rank_tensor(&shapes, draw) else {
            return Ok(0.0);
        };
        let (part, t) = (&self.parts[i], &self.tensors[i]);
        let (reg, g) = rank_regulariser(
            part.live.rows,
            part.live.cols,
            &part.live.indices,
            &params[t.range.clone()],
            self.lambda_rank,
            None,
        )?;
        for (a, b) in grad[t.range.clone()].iter_mut().zip(g) {
            *a += b;
        }
        Ok(reg)
    }
}

/// STABLE-RPS: every adapted projection's LoRA factors (RPS-LoRA) or dense delta
/// (RPS-Delta) drawn from hashed shared pools; the pools are the parameters.
#[derive(Debug, Clone)]
pub struct Rps {
    pub layout: RpsLayout,
    /// One tensor per pool (`z_a`, `z_b` or `z`).
    pub tensors: Vec<ParamTensor>,
}

impl Rps {
    pub fn new(layout: RpsLayout) -> Rps {
        let mut at = 0;
        let tensors = layout
            .pools()
            .iter()
            .map(|p| {
                let n = p.m() as usize;
                let t = ParamTensor {
                    name: p.name().to_owned(),
                    rows: 1,
                    cols: n,
                    range: at..at + n,
                    decay: true,
                };
                at += n;
                t
            })
            .collect();
        Rps { layout, tensors }
    }

    fn pools<'p, T>(&self, params: &'p [T]) -> Vec<&'p [T]> {
        self.tensors
            .iter()
            .map(|t| &params[t.range.clone()])
            .collect()
    }

    /// Every virtual tensor's values. f32 takes the run-based fast path; other
    /// scalars (the f64 gradient checks) hash every position.
    fn expand<T: Real>(&self, params: &[T]) -> Result<Vec<Vec<T>>, TrainError> {
        let pools = self.pools(params);
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
            let f: Vec<Vec<f32>> = pools
                .iter()
                .map(|p| p.iter().map(|v| v.to_f32()).collect())
                .collect();
            let e = crate::rps::expand(&self.layout, &f)?;
            return Ok(e
                .into_iter()
                .map(|t| t.into_iter().map(T::from_f32).collect())
                .collect());
        }
        Ok(self
            .layout
            .tensors()
            .iter()
            .map(|t| {
                let fold = self.layout.pools()[t.pool()].fold();
                let z = pools[t.pool()];
                (0..t.len() as u64)
                    .map(|i| {
                        let p = t.offset + i;
                        T::from_f32(t.lambda * fold.sign(p)) * z[fold.slot(p) as usize]
                    })
                    .collect()
            })
            .collect())
    }

    /// The adjoint of [`expand`](Self::expand): the true gradient of the pools.
    fn scatter<T: Real>(&self, grads: &[Vec<T>]) -> Result<Vec<T>, TrainError> {
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
            let f: Vec<Vec<f32>> = grads
                .iter()
                .map(|g| g.iter().map(|v| v.to_f32()).collect())
                .collect();
            let dz = crate::rps::scatter_grad(&self.layout, &f)?;
            return Ok(dz.into_iter().flatten().map(T::from_f32).collect());
        }
        let mut pools: Vec<Vec<T>> = self.tensors.iter().map(|t| vec![T::ZERO; t.cols]).collect();
        for (t, g) in self.layout.tensors().iter().zip(grads) {
            let fold = self.layout.pools()[t.pool()].fold();
            for (i, &gv) in g.iter().enumerate() {
                let p = t.offset + i as u64;
                pools[t.pool()][fold.slot(p) as usize] += T::from_f32(t.lambda * fold.sign(p)) * gv;
            }
        }
        Ok(pools.into_iter().flatten().collect())
    }

    /// STABLE-RPS's gradient scaler: slot j's gradient divided by S_j, so a step on
    /// the pool is the mean of the colliding dense steps.
    fn scale_gradient(&self, grad: &mut [f32]) -> Result<(), TrainError> {
        let mut pools: Vec<Vec<f32>> = self
            .tensors
            .iter()
            .map(|t| grad[t.range.clone()].to_vec())
            .collect();
        self.layout.apply_scaler(&mut pools)?;
        for (t, p) in self.tensors.iter().zip(pools) {
            grad[t.range.clone()].copy_from_slice(&p);
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub enum Method {
    Lora(Lora),
    Full(Full),
    Sara(Sara),
    Rps(Rps),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Lora(_) => "lora",
            Method::Full(_) => "full",
            Method::Sara(_) => "sara",
            Method::Rps(_) => "rps",
        }
    }

    /// The named tensors of the flat parameter vector.
    pub fn tensors(&self) -> &[ParamTensor] {
        match self {
            Method::Lora(l) => &l.tensors,
            Method::Full(f) => &f.layout.tensors,
            Method::Sara(s) => &s.tensors,
            Method::Rps(r) => &r.tensors,
        }
    }

    pub fn n_params(&self) -> usize {
        self.tensors().last().map_or(0, |t| t.range.end)
    }

    /// Which parameters weight decay applies to (matrices, not norms and biases).
    pub fn decay_mask(&self) -> Vec<bool> {
        let mut m = vec![true; self.n_params()];
        for t in self.tensors() {
            if !t.decay {
                m[t.range.clone()].fill(false);
            }
        }
        m
    }

    /// Initial parameters: the base at step 0 for every method.
    pub fn init(&self, model: &Model, seed: u64) -> Result<Vec<f32>, TrainError> {
        match self {
            Method::Lora(l) => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut v = vec![0f32; self.n_params()];
                for t in l.tensors.iter().step_by(2) {
                    // Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in).
                    let bound = 1.0 / (t.cols as f32).sqrt();
                    for x in &mut v[t.range.clone()] {
                        *x = rng.gen_range(-bound..bound);
                    }
                }
                Ok(v)
            }
            Method::Full(f) => f.layout.values_of(model),
            Method::Sara(s) => Ok(s
                .parts
                .iter()
                .flat_map(|p| p.live.init.iter().copied())
                .collect()),
            Method::Rps(r) => Ok(r.layout.init_pools(seed).into_iter().flatten().collect()),
        }
    }

    /// The network's view of `params`.
    pub fn trainables<'a, T: Real>(
        &'a self,
        c: &ModelConfig,
        params: &'a [T],
    ) -> Result<Trainables<'a, T>, TrainError> {
        let mut tr = Trainables::none(c);
        match self {
            Method::Lora(l) => {
                let scale = T::from_f32(l.scale());
                for (i, &(layer, p)) in l.targets.iter().enumerate() {
                    let (a, b) = (&l.tensors[2 * i], &l.tensors[2 * i + 1]);
                    tr.deltas[slot(layer, p)] = Some(DeltaOp::LowRank {
                        a: Cow::Borrowed(&params[a.range.clone()]),
                        b: Cow::Borrowed(&params[b.range.clone()]),
                        rank: l.rank,
                        scale,
                    });
                }
            }
            Method::Full(f) => tr.full = Some((&f.layout, params)),
            Method::Sara(s) => {
                for (part, t) in s.parts.iter().zip(&s.tensors) {
                    tr.deltas[slot(part.layer, part.proj)] = Some(DeltaOp::Sparse {
                        idx: Cow::Borrowed(&part.merged),
                        val: Cow::Owned(part.delta(&params[t.range.clone()])),
                    });
                }
            }
            Method::Rps(r) => {
                let mut values: Vec<Option<Vec<T>>> =
                    r.expand(params)?.into_iter().map(Some).collect();
                let vt = r.layout.tensors();
                let scale = T::from_f32(r.layout.lora_scale());
                for i in 0..vt.len() {
                    let t = vt[i];
                    match t.role {
                        Role::A => {
                            let j = r.layout.find(t.layer, t.proj, Role::B).ok_or_else(|| {
                                TrainError::Shape(format!("{}: lora_b missing", t.name()))
                            })?;
                            let (a, b) = (values[i].take(), values[j].take());
                            if let (Some(a), Some(b)) = (a, b) {
                                tr.deltas[slot(t.layer, t.proj)] = Some(DeltaOp::LowRank {
                                    a: Cow::Owned(a),
                                    b: Cow::Owned(b),
                                    rank: t.rows,
                                    scale,
                                });
                            }
                        }
                        Role::Delta => {
                            if let Some(w) = values[i].take() {
                                tr.deltas[slot(t.layer, t.proj)] =
                                    Some(DeltaOp::Dense { w: Cow::Owned(w) });
                            }
                        }
                        Role::B => {}
                    }
                }
            }
        }
        Ok(tr)
    }

    /// The gradient of the flat parameters from the network's gradients.
    pub fn param_grad<T: Real>(&self, grads: &Grads<T>) -> Result<Vec<T>, TrainError> {
        let mut g = vec![T::ZERO; self.n_params()];
        match self {
            Method::Lora(l) => {
                for (i, &(layer, p)) in l.targets.iter().enumerate() {
                    match &grads.deltas[slot(layer, p)] {
                        Some(DeltaGrad::LowRank { da, db }) => {
                            g[l.tensors[2 * i].range.clone()].copy_from_slice(da);
                            g[l.tensors[2 * i + 1].range.clone()].copy_from_slice(db);
                        }
                        None => {}
                        Some(_) => {
                            return Err(TrainError::Shape(format!(
                                "{}: not a low-rank gradient",
                                p.gguf_weight(layer)
                            )))
                        }
                    }
                }
            }
            Method::Full(_) => {
                if let Some(f) = &grads.full {
                    g.copy_from_slice(f);
                }
            }
            Method::Sara(s) => {
                for (part, t) in s.parts.iter().zip(&s.tensors) {
                    match &grads.deltas[slot(part.layer, part.proj)] {
                        Some(DeltaGrad::Sparse { dval }) => {
                            for (dst, &k) in g[t.range.clone()].iter_mut().zip(&part.live_pos) {
                                *dst = dval[k];
                            }
                        }
                        None => {}
                        Some(_) => {
                            return Err(TrainError::Shape(format!(
                                "{}: not a sparse gradient",
                                part.proj.gguf_weight(part.layer)
                            )))
                        }
                    }
                }
            }
            Method::Rps(r) => {
                let tg: Vec<Vec<T>> = r
                    .layout
                    .tensors()
                    .iter()
                    .map(|t| {
                        let zero = || vec![T::ZERO; t.len()];
                        match (&grads.deltas[slot(t.layer, t.proj)], t.role) {
                            (Some(DeltaGrad::LowRank { da, .. }), Role::A) => da.clone(),
                            (Some(DeltaGrad::LowRank { db, .. }), Role::B) => db.clone(),
                            (Some(DeltaGrad::Dense { dw }), Role::Delta) => dw.clone(),
                            _ => zero(),
                        }
                    })
                    .collect();
                g = r.scatter(&tg)?;
            }
        }
        Ok(g)
    }

    /// Rescales the true gradient before the optimizer step where the method says so
    /// (STABLE-RPS's scaler); a no-op for the others.
    pub fn precondition(&self, grad: &mut [f32]) -> Result<(), TrainError> {
        match self {
            Method::Rps(r) => r.scale_gradient(grad),
            _ => Ok(()),
        }
    }

    /// The trained deltas as an adapter the inference engine runs (LoRA), so
    /// evaluation goes through exactly the code that serves it.
    pub fn to_adapter(&self, model: &Model, params: &[f32]) -> Result<Adapter, TrainError> {
        match self {
            Method::Lora(l) => {
                let c = &model.config;
                let mut ad = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
                for (i, &(layer, p)) in l.targets.iter().enumerate() {
                    let (ta, tb) = (&l.tensors[2 * i], &l.tensors[2 * i + 1]);
                    let delta = LoraDelta {
                        a: f32_weight(ta.rows, ta.cols, &params[ta.range.clone()])?,
                        b: f32_weight(tb.rows, tb.cols, &params[tb.range.clone()])?,
                        scale: l.scale(),
                        dora_factor: None,
                    };
                    ad.insert(c, layer, p, TensorDelta::Lora(delta))?;
                }
                Ok(ad)
            }
            Method::Sara(s) => {
                let c = &model.config;
                let mut ad = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
                for (part, t) in s.parts.iter().zip(&s.tensors) {
                    let live = SaraEntries {
                        values: params[t.range.clone()].to_vec(),
                        ..part.live.clone()
                    };
                    let delta = sparse_delta(&[&live, &part.frozen], 1.0)?;
                    ad.insert(c, part.layer, part.proj, TensorDelta::Sparse(delta))?;
                }
                Ok(ad)
            }
            Method::Rps(r) => {
                let pools = r.pools(params);
                Ok(r.layout.to_adapter(&model.config, &pools, PathBuf::new())?)
            }
            Method::Full(_) => Err(TrainError::Config(
                "full training produces a model, not an adapter".into(),
            )),
        }
    }
}

/// A model running the weights of a full-training parameter vector (F32), sharing the
/// base's configuration, RoPE factors and GGUF metadata (tokenizer).
pub fn full_model(base: &Model, layout: &FullLayout, params: &[f32]) -> Result<Model, TrainError> {
    let c = &base.config;
    let w = |name: &str| -> Result<Weight, TrainError> {
        let t = layout
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| TrainError::Shape(format!("{name} is not in the layout")))?;
        Weight::from_f32(t.rows, t.cols, &params[t.range.clone()])
            .map_err(|e| TrainError::quant(name, e))
    };
    let v = |name: &str| -> Option<Vec<f32>> {
        layout
            .tensors
            .iter()
            .find(|t| t.name == name)
            .map(|t| params[t.range.clone()].to_vec())
    };
    let need =
        |name: String| v(&name).ok_or(TrainError::Shape(format!("{name} is not in the layout")));
    let token_embd = w("token_embd.weight")?;
    let output = match layout.tensors.iter().any(|t| t.name == "output.weight") {
        true => w("output.weight")?,
        false => token_embd.clone(),
    };
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let pw = |p: Proj| w(&p.gguf_weight(i));
        layers.push(Layer {
            attn_norm: need(format!("blk.{i}.attn_norm.weight"))?,
            wq: pw(Proj::Q)?,
            wk: pw(Proj::K)?,
            wv: pw(Proj::V)?,
            wo: pw(Proj::O)?,
            bq: v(&format!("blk.{i}.attn_q.bias")),
            bk: v(&format!("blk.{i}.attn_k.bias")),
            bv: v(&format!("blk.{i}.attn_v.bias")),
            ffn_norm: need(format!("blk.{i}.ffn_norm.weight"))?,
            w_gate: pw(Proj::Gate)?,
            w_up: pw(Proj::Up)?,
            w_down: pw(Proj::Down)?,
        });
    }
    Ok(Model {
        config: c.clone(),
        token_embd,
        layers,
        output_norm: need("output_norm.weight".into())?,
        output,
        rope_freqs: base.rope_freqs.clone(),
        gguf: base.gguf.clone(),
    })
}

/// All (layer, projection) pairs of the named projections in every layer.
pub fn targets_for(c: &ModelConfig, projs: &[Proj]) -> Vec<(usize, Proj)> {
    (0..c.n_layer)
        .flat_map(|l| projs.iter().map(move |&p| (l, p)))
        .collect()
}

/// Parses a target list: `all`, `attn` (q,k,v,o), `mlp` (gate,up,down), or names
/// separated by commas (`q,v`, `q_proj,v_proj`, `attn_q`, ...).
pub fn parse_targets(s: &str) -> Result<Vec<Proj>, TrainError> {
    let mut out: Vec<Proj> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let add: Vec<Proj> = match part {
            "all" | "all-linear" => Proj::ALL.to_vec(),
            "attn" => vec![Proj::Q, Proj::K, Proj::V, Proj::O],
            "mlp" | "ffn" => vec![Proj::Gate, Proj::Up, Proj::Down],
            name => vec![Proj::ALL
                .into_iter()
                .find(|p| {
                    let short = p.hf_module().trim_end_matches("_proj");
                    name == short || name == p.hf_module() || name == p.gguf_stem()
                })
                .ok_or_else(|| {
                    TrainError::Config(format!(
                        "unknown target {name:?}: expected all, attn, mlp or q,k,v,o,gate,up,down"
                    ))
                })?],
        };
        for p in add {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    if out.is_empty() {
        return Err(TrainError::Config("empty target list".into()));
    }
    Ok(out)
}

/// Writes a fully trained model as GGUF (F32 tensors): the base file's metadata
/// (architecture, hyperparameters, tokenizer) with the trained tensors.
pub fn save_full_gguf(
    base: &Model,
    layout: &FullLayout,
    params: &[f32],
    path: &std::path::Path,
) -> Result<(), TrainError> {
    use graft_runtime::gguf::GgufWriter;
    let file = path.display().to_string();
    let gerr = |e: graft_runtime::gguf::GgufError| TrainError::Config(format!("{file}: {e}"));
    let mut w = GgufWriter::new();
    if let Some(g) = &base.gguf {
        for (k, v) in g.metadata() {
            if k != "general.alignment" {
                w.add_kv(k.clone(), v.clone()).map_err(gerr)?;
            }
        }
        if let Some(t) = g.tensor("rope_freqs.weight") {
            w.add_tensor(t.name.clone(), t.ty, &t.dims, g.tensor_data(t))
                .map_err(gerr)?;
        }
    } else {
        return Err(TrainError::Config(
            "the base model has no GGUF metadata to copy (load it from a GGUF file)".into(),
        ));
    }
    for t in &layout.tensors {
        let bytes: Vec<u8> = params[t.range.clone()]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let dims: Vec<u64> = if t.rows == 1 {
            vec![t.cols as u64]
        } else {
            vec![t.cols as u64, t.rows as u64]
        };
        w.add_tensor(t.name.clone(), graft_quant::GgmlType::F32, &dims, bytes)
            .map_err(gerr)?;
    }
    let bytes = w.to_bytes().map_err(gerr)?;
    crate::st_write::write_atomic(path, &bytes)?;
    Ok(())
}
