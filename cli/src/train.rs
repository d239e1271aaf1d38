//! `graft train`: trains an adapter (or the whole model) on the CPU, over the base as
//! it is stored (quantized or float), and writes it in a format `--adapter` loads.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use graft_adapters::rps::Scaler;
use graft_adapters::train::job::{
    self, Control, JobSpec, MethodKind, OutputFormat, Progress, RpsMode, TrainData,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::common::{self, ModelArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// Low-rank adapters on the target projections.
    Lora,
    /// Every tensor of the model (pretraining, full fine-tuning); writes a GGUF model.
    Full,
    /// SaRA: the smallest base weights (|w| < theta) train in place as a sparse delta.
    Sara,
    /// STABLE-RPS: LoRA factors (or dense deltas) drawn from hashed shared pools.
    Rps,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RpsModeArg {
    /// RPS-LoRA: A and B of every target from two pools.
    Lora,
    /// RPS-Delta: every target's dense delta from one pool.
    Delta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScalerArg {
    V1,
    V5,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// llama.cpp GGUF LoRA file (LoRA) or GGUF model (full).
    Gguf,
    /// Hugging Face PEFT directory (LoRA).
    Peft,
    /// graft's SaRA sparse-delta .safetensors file (SaRA).
    Sara,
    /// graft's STABLE-RPS .rps file: seed, mapping and pools (RPS).
    Rps,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to train.
    #[arg(long, value_enum, default_value = "lora")]
    pub method: MethodArg,
    /// Training data: .jsonl with {"prompt", "completion"} per line (loss on the
    /// completion), or a plain text file.
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the result (a file for gguf, a directory for peft).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Output format (default: gguf for lora and full, sara for sara).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// LoRA rank.
    #[arg(long, default_value_t = JobSpec::default().rank)]
    pub rank: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = JobSpec::default().alpha)]
    pub alpha: f32,
    /// rsLoRA scaling (alpha / sqrt(rank)).
    #[arg(long)]
    pub rslora: bool,
    /// Projections to adapt: all, attn, mlp, or a list like q,v.
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = JobSpec::default().steps)]
    pub steps: usize,
    /// Peak learning rate (default: 1e-3; SaRA: 1e-3 * exp(-350 theta)).
    #[arg(long)]
    pub lr: Option<f32>,
    /// SaRA: magnitude threshold selecting the trainable base weights.
    #[arg(long, default_value_t = JobSpec::default().theta)]
    pub theta: f32,
    /// SaRA: weight of the nuclear-norm (low-rank) regulariser.
    #[arg(long, default_value_t = JobSpec::default().lambda_rank)]
    pub lambda_rank: f32,
    /// SaRA: skip the progressive re-selection at half the steps.
    #[arg(long)]
    pub no_progressive: bool,
    /// RPS: what the pools parameterise.
    #[arg(long, value_enum, default_value = "lora")]
    pub rps_mode: RpsModeArg,
    /// RPS: compression rho = pool slots / virtual parameters, in (0, 1].
    #[arg(long, default_value_t = JobSpec::default().rho)]
    pub rho: f64,
    /// RPS: pool slots in all (overrides --rho).
    #[arg(long)]
    pub budget: Option<u64>,
    /// RPS: gradient scaler (v1: A^2/c, v5: sum lambda^2).
    #[arg(long, value_enum, default_value = "v1")]
    pub scaler: ScalerArg,
    /// RPS: seed of the hash maps (stored in the file).
    #[arg(long, default_value_t = JobSpec::default().rps_seed)]
    pub rps_seed: u64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = JobSpec::default().batch)]
    pub batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = JobSpec::default().accum)]
    pub accum: usize,
    /// Linear warmup steps.
    #[arg(long, default_value_t = JobSpec::default().warmup)]
    pub warmup: usize,
    /// Gradient-norm clipping (0 = off).
    #[arg(long, default_value_t = JobSpec::default().clip)]
    pub clip: f32,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = JobSpec::default().weight_decay)]
    pub weight_decay: f32,
    /// Seed of the initialisation, the split and the batch order.
    #[arg(long, default_value_t = JobSpec::default().seed)]
    pub seed: u64,
    /// Longest example in tokens (longer ones are cut; text is cut into pieces).
    #[arg(long, default_value_t = JobSpec::default().max_len)]
    pub max_len: usize,
    /// Fraction of JSONL records held out for evaluation.
    #[arg(long, default_value_t = JobSpec::default().eval_frac)]
    pub eval_frac: f64,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = JobSpec::default().eval_every)]
    pub eval_every: usize,
    /// Held-out records used for exact match (greedy generation is the slow part).
    #[arg(long, default_value_t = JobSpec::default().eval_max)]
    pub eval_max: usize,
    /// Exact match on these records (.jsonl) with the trained adapter active, reported
    /// as retention (e.g. the base model's own task).
    #[arg(long)]
    pub retention_data: Option<PathBuf>,
    /// Recompute activations in the backward pass (less memory, ~1.3x the time).
    #[arg(long)]
    pub recompute: bool,
    /// Write a checkpoint here every --checkpoint-every steps and at the end.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = JobSpec::default().checkpoint_every)]
    pub checkpoint_every: usize,
    /// Resume from a checkpoint written with --checkpoint (same data and options).
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

pub fn run(args: &TrainArgs) -> Result<()> {
    common::init_threads(args.model.threads)?;
    let model = common::load_model(&args.model)?;
    let tok = common::load_tokenizer(&args.model, &model)?;
    let spec = args.spec();

    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut on_progress = |p: &Progress| {
        match *p {
            Progress::Started {
                method,
                trainable_params,
                train_examples,
                eval_examples,
                step,
                steps,
            } => {
                bar.suspend(|| {
                    eprintln!(
                        "training {method} ({trainable_params} trainable parameters) on \
                         {train_examples} examples ({eval_examples} held out), {steps} steps"
                    )
                });
                bar.set_position(step as u64);
            }
            Progress::Step {
                stats,
                tokens_per_s,
                ..
            } => {
                bar.set_message(format!(
                    "loss {:.4}  lr {:.2e}  {tokens_per_s:.0} tok/s",
                    stats.loss, stats.lr
                ));
                bar.set_position(stats.step as u64);
            }
            Progress::Eval {
                step,
                train_loss,
                eval_loss,
            } => bar.suspend(|| {
                eprintln!("step {step}: train loss {train_loss:.4}, eval loss {eval_loss:.4}")
            }),
            Progress::Finishing => bar.finish_and_clear(),
        }
        Control::Continue
    };
    let report = job::run(&model, &tok, &spec, &mut on_progress)?;
    let mut json = serde_json::to_value(&report)?;
    json["peak_rss_mib"] = serde_json::json!(peak_rss_mib());
    println!("{json}");
    Ok(())
}

impl TrainArgs {
    fn spec(&self) -> JobSpec {
        JobSpec {
            method: match self.method {
                MethodArg::Lora => MethodKind::Lora,
                MethodArg::Full => MethodKind::Full,
                MethodArg::Sara => MethodKind::Sara,
                MethodArg::Rps => MethodKind::Rps,
            },
            data: TrainData::File(self.data.clone()),
            out: self.out.clone(),
            format: self.format.map(|f| match f {
                FormatArg::Gguf => OutputFormat::Gguf,
                FormatArg::Peft => OutputFormat::Peft,
                FormatArg::Sara => OutputFormat::Sara,
                FormatArg::Rps => OutputFormat::Rps,
            }),
            rank: self.rank,
            alpha: self.alpha,
            rslora: self.rslora,
            targets: self.targets.clone(),
            steps: self.steps,
            lr: self.lr,
            theta: self.theta,
            lambda_rank: self.lambda_rank,
            progressive: !self.no_progressive,
            rps_mode: match self.rps_mode {
                RpsModeArg::Lora => RpsMode::Lora,
                RpsModeArg::Delta => RpsMode::Delta,
            },
            rho: self.rho,
            budget: self.budget,
            scaler: match self.scaler {
                ScalerArg::V1 => Scaler::V1,
                ScalerArg::V5 => Scaler::V5,
                ScalerArg::None => Scaler::None,
            },
            rps_seed: self.rps_seed,
            batch: self.batch,
            accum: self.accum,
            warmup: self.warmup,
            clip: self.clip,
            weight_decay: self.weight_decay,
            seed: self.seed,
            max_len: self.max_len,
            eval_frac: self.eval_frac,
            eval_every: self.eval_every,
            eval_max: self.eval_max,
            retention_data: self.retention_data.clone(),
            recompute: self.recompute,
            checkpoint: self.checkpoint.clone(),
            checkpoint_every: self.checkpoint_every,
            resume: self.resume.clone(),
        }
    }
}

/// Peak resident memory of this process (VmHWM), where /proc has it.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}
