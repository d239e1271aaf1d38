//! Trainable parameterisations: how a flat parameter vector becomes the deltas (or
//! weights) the network runs, and how the network's gradients flow back to it.

use std::borrow::Cow;
use std::path::PathBuf;

use graft_runtime::model::{Layer, Model, ModelConfig, Proj, Weight};
use rand::{Rng, SeedableRng};

use super::net::{slot, DeltaGrad, DeltaOp, FullLayout, Grads, ParamTensor, Trainables};
use super::real::Real;
use super::TrainError;
use crate::delta::{f32_weight, projection_shape, Adapter, AdapterFormat, LoraDelta, TensorDelta};

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
            return Err(TrainError::Config("LoRA needs at least one target projection".into()));
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

#[derive(Debug, Clone)]
pub enum Method {
    Lora(Lora),
    Full(Full),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Lora(_) => "lora",
            Method::Full(_) => "full",
        }
    }

    /// The named tensors of the flat parameter vector.
    pub fn tensors(&self) -> &[ParamTensor] {
        match self {
            Method::Lora(l) => &l.tensors,
            Method::Full(f) => &f.layout.tensors,
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
        }
    }

    /// The network's view of `params`.
    pub fn trainables<'a, T: Real>(
        &'a self,
        c: &ModelConfig,
        params: &'a [T],
    ) -> Trainables<'a, T> {
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
        }
        tr
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
        }
        Ok(g)
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
    let need = |name: String| v(&name).ok_or(TrainError::Shape(format!("{name} is not in the layout")));
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
