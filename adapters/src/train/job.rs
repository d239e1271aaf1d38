//! A whole training run as one call: data split, method, loop with progress and
//! cancellation, evaluation and the written result. `graft train`, the C ABI and the
//! Python bindings all run training through [`run`], so they agree on defaults,
//! formats and reports.

use std::path::{Path, PathBuf};
use std::time::Instant;

use graft_runtime::model::{Model, ModelConfig};
use graft_runtime::tokenizer::Tokenizer;
use serde::Serialize;

use super::data::{self, Data, Record};
use super::method::{parse_targets, save_full_gguf, targets_for, Full, Lora, Method, Rps, Sara};
use super::net::Example;
use super::optim::AdamWConfig;
use super::trainer::{StepStats, TrainConfig, Trainer};
use super::TrainError;
use crate::rps::{Budget, RpsConfig, RpsLayout, Scaler, DEFAULT_SEED};
use crate::sara::SaraMeta;

/// What to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodKind {
    /// Low-rank adapters on the target projections.
    Lora,
    /// Every tensor of the model; writes a GGUF model.
    Full,
    /// SaRA: the smallest base weights train in place as a sparse delta.
    Sara,
    /// STABLE-RPS: LoRA factors or dense deltas drawn from hashed shared pools.
    Rps,
}

impl MethodKind {
    pub fn from_name(s: &str) -> Option<MethodKind> {
        match s {
            "lora" => Some(MethodKind::Lora),
            "full" => Some(MethodKind::Full),
            "sara" => Some(MethodKind::Sara),
            "rps" => Some(MethodKind::Rps),
            _ => None,
        }
    }

    /// The file format written when none is asked for.
    pub fn default_format(self) -> OutputFormat {
        match self {
            MethodKind::Lora | MethodKind::Full => OutputFormat::Gguf,
            MethodKind::Sara => OutputFormat::Sara,
            MethodKind::Rps => OutputFormat::Rps,
        }
    }
}

/// What the RPS pools parameterise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpsMode {
    /// RPS-LoRA: A and B of every target from two pools.
    Lora,
    /// RPS-Delta: every target's dense delta from one pool.
    Delta,
}

/// How the result is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// llama.cpp GGUF LoRA file (LoRA) or GGUF model (full).
    Gguf,
    /// Hugging Face PEFT directory (LoRA).
    Peft,
    /// graft's SaRA sparse-delta .safetensors file (SaRA).
    Sara,
    /// graft's STABLE-RPS .rps file (RPS).
    Rps,
}

impl OutputFormat {
    pub fn from_name(s: &str) -> Option<OutputFormat> {
        match s {
            "gguf" => Some(OutputFormat::Gguf),
            "peft" => Some(OutputFormat::Peft),
            "sara" => Some(OutputFormat::Sara),
            "rps" => Some(OutputFormat::Rps),
            _ => None,
        }
    }
}

/// Where the training examples come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainData {
    /// `.jsonl` records or a plain text file (see [`data::load`]).
    File(PathBuf),
    /// Prompt/completion records given directly.
    Records(Vec<Record>),
    /// Plain text given directly.
    Text(String),
}

/// Every knob of a training run; [`Default`] gives `graft train`'s defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub method: MethodKind,
    pub data: TrainData,
    /// A file (gguf, sara, rps) or a directory (peft).
    pub out: PathBuf,
    /// `None`: [`MethodKind::default_format`].
    pub format: Option<OutputFormat>,
    pub rank: usize,
    pub alpha: f32,
    pub rslora: bool,
    /// `all`, `attn`, `mlp` or a list like `q,v`.
    pub targets: String,
    pub steps: usize,
    /// `None`: 1e-3, SaRA 1e-3 * exp(-350 theta).
    pub lr: Option<f32>,
    pub theta: f32,
    pub lambda_rank: f32,
    pub progressive: bool,
    pub rps_mode: RpsMode,
    pub rho: f64,
    /// Pool slots in all; overrides `rho`.
    pub budget: Option<u64>,
    pub scaler: Scaler,
    pub rps_seed: u64,
    pub batch: usize,
    pub accum: usize,
    pub warmup: usize,
    pub clip: f32,
    pub weight_decay: f32,
    pub seed: u64,
    pub max_len: usize,
    pub eval_frac: f64,
    /// Evaluation loss every N steps (0: only at the end).
    pub eval_every: usize,
    /// Held-out records used for exact match.
    pub eval_max: usize,
    /// Records whose exact match with the result active is reported as retention.
    pub retention_data: Option<PathBuf>,
    pub recompute: bool,
    pub checkpoint: Option<PathBuf>,
    pub checkpoint_every: usize,
    pub resume: Option<PathBuf>,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            method: MethodKind::Lora,
            data: TrainData::Records(Vec::new()),
            out: PathBuf::new(),
            format: None,
            rank: 8,
            alpha: 16.0,
            rslora: false,
            targets: "all".into(),
            steps: 200,
            lr: None,
            theta: 2e-3,
            lambda_rank: 5e-4,
            progressive: true,
            rps_mode: RpsMode::Lora,
            rho: 0.1,
            budget: None,
            scaler: Scaler::V1,
            rps_seed: DEFAULT_SEED,
            batch: 8,
            accum: 1,
            warmup: 10,
            clip: 1.0,
            weight_decay: 0.01,
            seed: 0,
            max_len: 256,
            eval_frac: 0.1,
            eval_every: 0,
            eval_max: 64,
            retention_data: None,
            recompute: false,
            checkpoint: None,
            checkpoint_every: 100,
            resume: None,
        }
    }
}

/// What [`run`] tells its caller while it works.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// Data and method are ready; training starts at `step` (non-zero on resume).
    Started {
        method: &'static str,
        trainable_params: usize,
        train_examples: usize,
        eval_examples: usize,
        step: usize,
        steps: usize,
    },
    /// One optimizer step finished.
    Step {
        stats: StepStats,
        steps: usize,
        tokens_per_s: f64,
    },
    /// Periodic evaluation (`eval_every`).
    Eval {
        step: usize,
        train_loss: f64,
        eval_loss: f64,
    },
    /// Training is done; evaluation and saving follow.
    Finishing,
}

/// The callback's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop after the current step: the checkpoint (if any) is written, the result is
    /// not, and [`run`] returns [`TrainError::Cancelled`].
    Cancel,
}

/// The outcome of a finished run.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    pub method: &'static str,
    pub steps: usize,
    pub trainable_params: usize,
    pub train_loss: f64,
    pub eval_loss: f64,
    pub eval_exact_match: Option<f64>,
    pub eval_records: usize,
    pub retention_exact_match: Option<f64>,
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    pub out: PathBuf,
    pub out_bytes: u64,
}

/// The retention records (at most `eval_max`), if `spec` names a file.
fn retention_records(spec: &JobSpec) -> Result<Option<Vec<Record>>, TrainError> {
    let Some(path) = &spec.retention_data else {
        return Ok(None);
    };
    match data::load(path)? {
        Data::Pairs(records) => Ok(Some(records.into_iter().take(spec.eval_max).collect())),
        Data::Text(_) => Err(TrainError::Config(format!(
            "{}: retention data must be .jsonl records",
            path.display()
        ))),
    }
}

/// Trains per `spec` on `model`, calling `progress` after every step; writes the
/// result to `spec.out` only when training completes.
pub fn run(
    model: &Model,
    tok: &Tokenizer,
    spec: &JobSpec,
    progress: &mut dyn FnMut(&Progress) -> Control,
) -> Result<JobReport, TrainError> {
    let c = &model.config;
    let format = output_format(spec)?;
    let (train, eval_examples, eval_records) = split_data(tok, spec)?;
    // read before training, so a bad file fails in a second, not after the run
    let retention = retention_records(spec)?;
    let method = build_method(model, spec)?;
    let lr = spec.lr.unwrap_or(match spec.method {
        MethodKind::Sara => super::sara::default_lr(spec.theta),
        _ => 1e-3,
    });
    let config = TrainConfig {
        steps: spec.steps,
        batch: spec.batch,
        accum: spec.accum,
        lr,
        warmup: spec.warmup,
        min_lr_ratio: 0.1,
        clip: spec.clip,
        adam: AdamWConfig {
            weight_decay: spec.weight_decay,
            ..Default::default()
        },
        seed: spec.seed,
        recompute: spec.recompute,
    };
    let mut trainer = Trainer::new(model, method, config)?;
    if let Some(path) = &spec.resume {
        trainer.load_checkpoint(path)?;
    }
    let trainable_params = trainer.params.len();
    let mut control = progress(&Progress::Started {
        method: trainer.method.name(),
        trainable_params,
        train_examples: train.len(),
        eval_examples: eval_examples.len(),
        step: trainer.step,
        steps: spec.steps,
    });

    let started = Instant::now();
    let mut tokens = 0usize;
    let mut last_loss = f64::NAN;
    while trainer.step < spec.steps && control == Control::Continue {
        let stats = trainer.train_step(&train)?;
        tokens += stats.tokens;
        last_loss = stats.loss;
        control = progress(&Progress::Step {
            stats,
            steps: spec.steps,
            tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
        });
        if spec.eval_every > 0 && trainer.step % spec.eval_every == 0 && trainer.step < spec.steps {
            let eval_loss = trainer.eval_loss(&eval_examples)?;
            let answer = progress(&Progress::Eval {
                step: trainer.step,
                train_loss: stats.loss,
                eval_loss,
            });
            if answer == Control::Cancel {
                control = answer;
            }
        }
        if let Some(ck) = &spec.checkpoint {
            if trainer.step % spec.checkpoint_every.max(1) == 0 {
                trainer.save_checkpoint(ck)?;
            }
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    if let Some(ck) = &spec.checkpoint {
        trainer.save_checkpoint(ck)?;
    }
    if control == Control::Cancel && trainer.step < spec.steps {
        return Err(TrainError::Cancelled { step: trainer.step });
    }
    progress(&Progress::Finishing);

    let eval_loss = trainer.eval_loss(&eval_examples)?;
    let eval_records: Vec<Record> = eval_records.into_iter().take(spec.eval_max).collect();
    let eval_exact_match = if eval_records.is_empty() {
        None
    } else {
        Some(trainer.exact_match(tok, &eval_records)?)
    };
    let retention_exact_match = match &retention {
        Some(records) => Some(trainer.exact_match(tok, records)?),
        None => None,
    };
    save(&trainer, c, format, &spec.out)?;
    Ok(JobReport {
        method: trainer.method.name(),
        steps: trainer.step,
        trainable_params,
        train_loss: last_loss,
        eval_loss,
        eval_exact_match,
        eval_records: eval_records.len(),
        retention_exact_match,
        train_seconds,
        tokens_per_s: tokens as f64 / train_seconds.max(1e-9),
        out_bytes: path_bytes(&spec.out),
        out: spec.out.clone(),
    })
}

/// The format to write, checked against the method before any work starts.
fn output_format(spec: &JobSpec) -> Result<OutputFormat, TrainError> {
    use MethodKind as M;
    use OutputFormat as F;
    match (spec.method, spec.format) {
        (m, None) => Ok(m.default_format()),
        (M::Lora, Some(f @ (F::Gguf | F::Peft)))
        | (M::Full, Some(f @ F::Gguf))
        | (M::Sara, Some(f @ F::Sara))
        | (M::Rps, Some(f @ F::Rps)) => Ok(f),
        (m, Some(f)) => Err(TrainError::Config(format!(
            "method {m:?} cannot be written as format {f:?}"
        ))),
    }
}

type Split = (Vec<Example>, Vec<Example>, Vec<Record>);

/// `items[i]` for each index of `ix`.
fn pick<T: Clone>(items: &[T], ix: &[usize]) -> Vec<T> {
    ix.iter().map(|&i| items[i].clone()).collect()
}

/// Tokenized training and held-out examples, plus the held-out records (for exact
/// match; text data has none).
fn split_data(tok: &Tokenizer, spec: &JobSpec) -> Result<Split, TrainError> {
    let (name, loaded) = match &spec.data {
        TrainData::File(path) => (path.display().to_string(), data::load(path)?),
        TrainData::Records(r) => ("records".to_owned(), Data::Pairs(r.clone())),
        TrainData::Text(t) => ("text".to_owned(), Data::Text(t.clone())),
    };
    let split = match loaded {
        Data::Pairs(records) => {
            let (ti, ei) = data::split(records.len(), spec.eval_frac, spec.seed);
            let (tr, er) = (pick(&records, &ti), pick(&records, &ei));
            let (train, dropped) = data::pair_examples(tok, &tr, spec.max_len);
            if dropped > 0 {
                tracing::warn!(
                    "{name}: {dropped} records dropped: their prompt is longer than max_len"
                );
            }
            let (eval, _) = data::pair_examples(tok, &er, spec.max_len);
            (train, eval, er)
        }
        Data::Text(text) => {
            let all = data::text_examples(tok, &text, spec.max_len);
            let (ti, ei) = data::split(all.len(), spec.eval_frac, spec.seed);
            (pick(&all, &ti), pick(&all, &ei), Vec::new())
        }
    };
    if split.0.is_empty() {
        return Err(TrainError::Data(format!("{name}: no training examples")));
    }
    Ok(split)
}

fn build_method(model: &Model, spec: &JobSpec) -> Result<Method, TrainError> {
    let c = &model.config;
    Ok(match spec.method {
        MethodKind::Lora => {
            let projs = parse_targets(&spec.targets)?;
            Method::Lora(Lora::new(
                c,
                targets_for(c, &projs),
                spec.rank,
                spec.alpha,
                spec.rslora,
            )?)
        }
        MethodKind::Full => Method::Full(Full::new(model)),
        MethodKind::Sara => {
            let projs = parse_targets(&spec.targets)?;
            Method::Sara(Sara::new(
                model,
                &targets_for(c, &projs),
                spec.theta,
                spec.lambda_rank,
                spec.progressive,
            )?)
        }
        MethodKind::Rps => {
            let budget = match spec.budget {
                Some(m) => Budget::Slots(m),
                None => Budget::Ratio(spec.rho),
            };
            let mut rc = match spec.rps_mode {
                RpsMode::Lora => RpsConfig::lora(spec.rank, spec.alpha, budget),
                RpsMode::Delta => RpsConfig::delta(budget),
            };
            rc.seed = spec.rps_seed;
            rc.scaler = spec.scaler;
            let projs = parse_targets(&spec.targets)?;
            Method::Rps(Rps::new(RpsLayout::new(c, &projs, &rc)?))
        }
    })
}

fn save(
    trainer: &Trainer<'_>,
    c: &ModelConfig,
    format: OutputFormat,
    out: &Path,
) -> Result<(), TrainError> {
    let model = trainer.model;
    match (&trainer.method, format) {
        (Method::Lora(_), OutputFormat::Gguf) => {
            let adapter = trainer.method.to_adapter(model, &trainer.params)?;
            crate::gguf_lora::save(&adapter, c.arch.name(), out)?;
        }
        (Method::Lora(l), OutputFormat::Peft) => {
            let adapter = trainer.method.to_adapter(model, &trainer.params)?;
            crate::peft::save(&adapter, c, l.alpha, l.rslora, out)?;
        }
        (Method::Full(f), OutputFormat::Gguf) => {
            save_full_gguf(model, &f.layout, &trainer.params, out)?;
        }
        (Method::Sara(s), OutputFormat::Sara) => {
            let adapter = trainer.method.to_adapter(model, &trainer.params)?;
            let meta = SaraMeta {
                theta: Some(s.theta),
                ..SaraMeta::new(c.arch)
            };
            crate::sara::save(&adapter, &meta, out)?;
        }
        (Method::Rps(r), OutputFormat::Rps) => {
            let pools: Vec<&[f32]> = r
                .tensors
                .iter()
                .map(|t| &trainer.params[t.range.clone()])
                .collect();
            crate::rps::save(out, &r.layout, &pools)?;
        }
        (m, f) => {
            return Err(TrainError::Config(format!(
                "{} cannot be written as {f:?}",
                m.name()
            )))
        }
    }
    if !out.exists() {
        return Err(TrainError::Config(format!(
            "{} was not written",
            out.display()
        )));
    }
    Ok(())
}

/// Bytes of a file, or of every file in a directory (PEFT output).
fn path_bytes(p: &Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(p).map_or(0, |m| m.len())
    }
}
