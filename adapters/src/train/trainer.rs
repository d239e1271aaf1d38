//! The training loop: micro-batches with gradient accumulation, clipping, AdamW on a
//! warmup + cosine schedule, evaluation (loss and exact match of greedy completions
//! through the inference engine) and checkpoints that resume exactly.

use std::collections::BTreeMap;
use std::path::Path;

use graft_runtime::generate::{generate_adapted, GenerateParams};
use graft_runtime::model::{LinearDelta, Model};
use graft_runtime::sampling::SamplingParams;
use graft_runtime::tokenizer::Tokenizer;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use super::data::{self, Record};
use super::method::{full_model, Method};
use super::net::{Example, Net, StepOptions};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
use super::TrainError;
use crate::st_write::{self, StTensor};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub accum: usize,
    pub lr: f32,
    pub warmup: usize,
    /// The cosine schedule ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f32,
    /// Global gradient-norm limit (0 = off).
    pub clip: f32,
    pub adam: AdamWConfig,
    pub seed: u64,
    /// Recompute activations in the backward pass instead of keeping them.
    pub recompute: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            batch: 8,
            accum: 1,
            lr: 1e-3,
            warmup: 10,
            min_lr_ratio: 0.1,
            clip: 1.0,
            adam: AdamWConfig::default(),
            seed: 0,
            recompute: false,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub step: usize,
    /// Mean loss per target token.
    pub loss: f64,
    pub grad_norm: f32,
    pub lr: f32,
    /// Tokens the step ran through (prompt + completion).
    pub tokens: usize,
}

/// Checkpoint tensor holding [`Trainer::sara_adjusted_from`].
const SARA_ADJUSTED_FROM: &str = "sara_adjusted_from";

pub struct Trainer<'m> {
    pub model: &'m Model,
    pub method: Method,
    pub params: Vec<f32>,
    pub opt: AdamW,
    pub config: TrainConfig,
    /// Optimizer steps taken.
    pub step: usize,
    decay: Vec<bool>,
    /// SaRA: the parameters its progressive step chose the new mask from. Checkpoints
    /// keep them so a resumed run rebuilds the same mask.
    sara_adjusted_from: Option<Vec<f32>>,
}

impl<'m> Trainer<'m> {
    pub fn new(model: &'m Model, method: Method, config: TrainConfig) -> Result<Self, TrainError> {
        if config.batch == 0 || config.accum == 0 {
            return Err(TrainError::Config(
                "batch and accum must be at least 1".into(),
            ));
        }
        let params = method.init(model, config.seed)?;
        let n = params.len();
        Ok(Trainer {
            model,
            decay: method.decay_mask(),
            method,
            params,
            opt: AdamW::new(config.adam, n),
            config,
            step: 0,
            sara_adjusted_from: None,
        })
    }

    pub fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.config.lr,
            warmup: self.config.warmup,
            total: self.config.steps,
            min_ratio: self.config.min_lr_ratio,
        }
    }

    /// One optimizer step over the next batches of `train` (the whole training set;
    /// which examples is fixed by the step number and the seed).
    pub fn train_step(&mut self, train: &[Example]) -> Result<StepStats, TrainError> {
        if train.is_empty() {
            return Err(TrainError::Data("no training examples".into()));
        }
        let c = &self.config;
        let micro: Vec<Vec<&Example>> = (0..c.accum)
            .map(|m| {
                data::batch_indices(train.len(), c.batch, c.accum, self.step, m, c.seed)
                    .into_iter()
                    .map(|i| &train[i])
                    .collect()
            })
            .collect();
        let n_targets: usize = micro.iter().flatten().map(|e| e.n_targets()).sum();
        let tokens: usize = micro.iter().flatten().map(|e| e.tokens.len()).sum();
        if n_targets == 0 {
            return Err(TrainError::Data(
                "the batch has no target tokens (completions empty or cut off)".into(),
            ));
        }
        let net = Net::new(self.model);
        let tr = self.method.trainables(&self.model.config, &self.params)?;
        let weight = 1.0 / n_targets as f64;
        let opts = StepOptions {
            backward: true,
            recompute: c.recompute,
        };
        let mut grad = vec![0f32; self.params.len()];
        let mut loss = 0.0;
        for mb in &micro {
            let batch: Vec<Example> = mb.iter().map(|&e| e.clone()).collect();
            let out = net.step(&batch, &tr, weight, opts)?;
            loss += out.loss;
            if let Some(g) = &out.grads {
                for (a, b) in grad.iter_mut().zip(self.method.param_grad(g)?) {
                    *a += b;
                }
            }
        }
        drop(tr);
        if let Method::Sara(s) = &self.method {
            // One seeded draw per step picks the weight the regulariser acts on.
            let draw = rand::rngs::StdRng::seed_from_u64(
                c.seed ^ (self.step as u64).wrapping_mul(0xA24B_AED4_963E_E407),
            )
            .next_u64();
            loss += s.add_rank_gradient(&self.params, &mut grad, draw)? as f64;
        }
        self.method.precondition(&mut grad)?;
        let grad_norm = clip_grad_norm(&mut grad, c.clip);
        let lr = self.schedule().lr_at(self.step);
        self.opt
            .step(&mut self.params, &grad, lr, Some(&self.decay));
        self.step += 1;
        let half = self.config.steps / 2;
        if let Method::Sara(s) = &mut self.method {
            if s.progressive && half > 0 && self.step == half {
                let before = std::mem::take(&mut self.params);
                self.params = s.adjust(&before)?;
                self.sara_adjusted_from = Some(before);
                self.opt.reset(self.params.len());
                self.decay = self.method.decay_mask();
            }
        }
        Ok(StepStats {
            step: self.step,
            loss,
            grad_norm,
            lr,
            tokens,
        })
    }

    /// Mean loss per target token over `examples`.
    pub fn eval_loss(&self, examples: &[Example]) -> Result<f64, TrainError> {
        let net = Net::new(self.model);
        let tr = self.method.trainables(&self.model.config, &self.params)?;
        let (mut loss, mut n) = (0.0, 0usize);
        for chunk in examples.chunks(self.config.batch.max(1)) {
            let out = net.step(chunk, &tr, 1.0, StepOptions::default())?;
            loss += out.loss;
            n += out.n_targets;
        }
        Ok(if n == 0 { 0.0 } else { loss / n as f64 })
    }

    /// Runs `f` with the trained weights in inference form: the base plus the adapter,
    /// or the fully trained model.
    pub fn with_inference<R>(
        &self,
        f: impl FnOnce(&Model, Option<&dyn LinearDelta>) -> Result<R, TrainError>,
    ) -> Result<R, TrainError> {
        match &self.method {
            Method::Full(full) => {
                let m = full_model(self.model, &full.layout, &self.params)?;
                f(&m, None)
            }
            method => {
                let adapter = method.to_adapter(self.model, &self.params)?;
                f(self.model, Some(&adapter))
            }
        }
    }

    /// Fraction of `records` whose greedy completion (through the inference engine)
    /// equals the expected completion, whitespace at the ends ignored.
    pub fn exact_match(&self, tok: &Tokenizer, records: &[Record]) -> Result<f64, TrainError> {
        if records.is_empty() {
            return Ok(0.0);
        }
        self.with_inference(|model, delta| exact_match(model, delta, tok, records))
    }

    /// Writes parameters, optimizer state and progress (safetensors).
    pub fn save_checkpoint(&self, path: &Path) -> Result<(), TrainError> {
        let mut meta = BTreeMap::new();
        meta.insert("format".to_owned(), "graft-train-checkpoint".to_owned());
        meta.insert("method".to_owned(), self.method.name().to_owned());
        meta.insert("step".to_owned(), self.step.to_string());
        meta.insert("adam_t".to_owned(), self.opt.t.to_string());
        meta.insert(
            "config".to_owned(),
            serde_json::to_string(&self.config).unwrap_or_default(),
        );
        let n = self.params.len();
        let mut t = BTreeMap::new();
        t.insert("params".to_owned(), StTensor::f32(vec![n], &self.params));
        t.insert("adam_m".to_owned(), StTensor::f32(vec![n], &self.opt.m));
        t.insert("adam_v".to_owned(), StTensor::f32(vec![n], &self.opt.v));
        if let Some(before) = &self.sara_adjusted_from {
            t.insert(
                SARA_ADJUSTED_FROM.to_owned(),
                StTensor::f32(vec![before.len()], before),
            );
        }
        let name = path.display().to_string();
        st_write::write_atomic(path, &st_write::to_bytes(&meta, &t, &name)?)?;
        Ok(())
    }

    /// Restores a checkpoint written by [`save_checkpoint`](Self::save_checkpoint) for
    /// the same method and model; training then continues exactly where it stopped.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<(), TrainError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
            file: name.clone(),
            source,
        })?;
        self.load_checkpoint_bytes(&bytes, &name)
    }

    /// [`load_checkpoint`](Self::load_checkpoint) from the file's bytes (`name` stands
    /// for the file in errors). On any error the trainer is unchanged.
    pub fn load_checkpoint_bytes(&mut self, bytes: &[u8], name: &str) -> Result<(), TrainError> {
        let bad = |what: String| TrainError::Data(format!("{name}: {what}"));
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata {k:?} is missing")))
        };
        if field("format")? != "graft-train-checkpoint" {
            return Err(bad("format is not graft-train-checkpoint".into()));
        }
        let method = field("method")?;
        if method != self.method.name() {
            return Err(bad(format!(
                "method {method}, expected {}",
                self.method.name()
            )));
        }
        let step: usize = field("step")?
            .parse()
            .map_err(|_| bad("step is not a number".into()))?;
        let adam_t: u64 = field("adam_t")?
            .parse()
            .map_err(|_| bad("adam_t is not a number".into()))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let read_n = |k: &str, n: usize| -> Result<Vec<f32>, TrainError> {
            let t = st
                .tensor(k)
                .map_err(|_| bad(format!("tensor {k:?} is missing")))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != [n] {
                return Err(bad(format!(
                    "tensor {k}: {:?} {:?}, expected F32 [{n}]",
                    t.dtype(),
                    t.shape()
                )));
            }
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            // Adam's second moments are squares; nothing here may be NaN or infinite.
            let ok = |x: &f32| x.is_finite() && (k != "adam_v" || *x >= 0.0);
            if let Some(i) = v.iter().position(|x| !ok(x)) {
                return Err(bad(format!(
                    "tensor {k}[{i}] is {}, expected a finite value{}",
                    v[i],
                    if k == "adam_v" { " >= 0" } else { "" }
                )));
            }
            Ok(v)
        };
        // A SaRA run past its progressive step: redo that step from the saved
        // parameters, which rebuilds the mask the checkpointed parameters live on.
        let mut adjusted = None;
        if st.tensor(SARA_ADJUSTED_FROM).is_ok() {
            let Method::Sara(s) = &self.method else {
                return Err(bad(format!("tensor {SARA_ADJUSTED_FROM} is for SaRA only")));
            };
            if self.sara_adjusted_from.is_some() {
                return Err(bad(
                    "load it into a fresh trainer (its mask has changed)".into()
                ));
            }
            let before = read_n(SARA_ADJUSTED_FROM, self.params.len())?;
            let mut s = s.clone();
            s.adjust(&before)?;
            adjusted = Some((s, before));
        }
        let n = match &adjusted {
            Some((s, _)) => s.tensors.last().map_or(0, |t| t.range.end),
            None => self.params.len(),
        };
        let read = |k: &str| read_n(k, n);
        let (p, m, v) = (read("params")?, read("adam_m")?, read("adam_v")?);
        if let Some((s, before)) = adjusted {
            self.method = Method::Sara(s);
            self.decay = self.method.decay_mask();
            self.sara_adjusted_from = Some(before);
        }
        self.params = p;
        self.opt.m = m;
        self.opt.v = v;
        self.opt.t = adam_t;
        self.step = step;
        Ok(())
    }
}

/// Exact-match accuracy of greedy completions of `records` by `model` (+ `delta`).
pub fn exact_match(
    model: &Model,
    delta: Option<&dyn LinearDelta>,
    tok: &Tokenizer,
    records: &[Record],
) -> Result<f64, TrainError> {
    let records: Vec<&Record> = records.iter().filter(|r| !r.prompt.is_empty()).collect();
    if records.is_empty() {
        return Ok(0.0);
    }
    let mut hits = 0usize;
    for r in &records {
        let (prompt, completion) = data::encode_record(tok, r);
        let params = GenerateParams {
            max_tokens: completion.len() + 4,
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let out = generate_adapted(model, tok, &prompt, &params, delta, |_| true)
            .map_err(|e| TrainError::Config(format!("generation failed: {e}")))?;
        if out.text.trim() == r.completion.trim() {
            hits += 1;
        }
    }
    Ok(hits as f64 / records.len() as f64)
}
