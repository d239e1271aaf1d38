//! `graft train`: trains an adapter (or the whole model) on the CPU, over the base as
//! it is stored (quantized or float), and writes it in a format `--adapter` loads.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use graft_adapters::rps::{Budget, RpsConfig, RpsLayout, Scaler};
use graft_adapters::sara::SaraMeta;
use graft_adapters::train::data::{self, Data, Record};
use graft_adapters::train::method::{parse_targets, targets_for, Full, Lora, Method, Rps, Sara};
use graft_adapters::train::net::Example;
use graft_adapters::train::optim::AdamWConfig;
use graft_adapters::train::sara::default_lr;
use graft_adapters::train::trainer::{TrainConfig, Trainer};
use graft_runtime::model::ModelConfig;
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
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// rsLoRA scaling (alpha / sqrt(rank)).
    #[arg(long)]
    pub rslora: bool,
    /// Projections to adapt: all, attn, mlp, or a list like q,v.
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Peak learning rate (default: 1e-3; SaRA: 1e-3 * exp(-350 theta)).
    #[arg(long)]
    pub lr: Option<f32>,
    /// SaRA: magnitude threshold selecting the trainable base weights.
    #[arg(long, default_value_t = 2e-3)]
    pub theta: f32,
    /// SaRA: weight of the nuclear-norm (low-rank) regulariser.
    #[arg(long, default_value_t = 5e-4)]
    pub lambda_rank: f32,
    /// SaRA: skip the progressive re-selection at half the steps.
    #[arg(long)]
    pub no_progressive: bool,
    /// RPS: what the pools parameterise.
    #[arg(long, value_enum, default_value = "lora")]
    pub rps_mode: RpsModeArg,
    /// RPS: compression rho = pool slots / virtual parameters, in (0, 1].
    #[arg(long, default_value_t = 0.1)]
    pub rho: f64,
    /// RPS: pool slots in all (overrides --rho).
    #[arg(long)]
    pub budget: Option<u64>,
    /// RPS: gradient scaler (v1: A^2/c, v5: sum lambda^2).
    #[arg(long, value_enum, default_value = "v1")]
    pub scaler: ScalerArg,
    /// RPS: seed of the hash maps (stored in the file).
    #[arg(long, default_value_t = graft_adapters::rps::DEFAULT_SEED)]
    pub rps_seed: u64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Gradient-norm clipping (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Seed of the initialisation, the split and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Longest example in tokens (longer ones are cut; text is cut into pieces).
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Fraction of JSONL records held out for evaluation.
    #[arg(long, default_value_t = 0.1)]
    pub eval_frac: f64,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Held-out records used for exact match (greedy generation is the slow part).
    #[arg(long, default_value_t = 64)]
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
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Resume from a checkpoint written with --checkpoint (same data and options).
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

pub fn run(args: &TrainArgs) -> Result<()> {
    common::init_threads(args.model.threads)?;
    let model = common::load_model(&args.model)?;
    let tok = common::load_tokenizer(&args.model, &model)?;
    let c = &model.config;

    let data = data::load(&args.data)?;
    let (train, eval_examples, eval_records): (Vec<Example>, Vec<Example>, Vec<Record>) =
        match &data {
            Data::Pairs(records) => {
                let (ti, ei) = data::split(records.len(), args.eval_frac, args.seed);
                let pick =
                    |ix: &[usize]| ix.iter().map(|&i| records[i].clone()).collect::<Vec<_>>();
                let (tr, er) = (pick(&ti), pick(&ei));
                let (train, dropped) = data::pair_examples(&tok, &tr, args.max_len);
                if dropped > 0 {
                    tracing::warn!(
                        "{dropped} records dropped: their prompt is longer than --max-len"
                    );
                }
                let (eval, _) = data::pair_examples(&tok, &er, args.max_len);
                (train, eval, er)
            }
            Data::Text(text) => {
                let all = data::text_examples(&tok, text, args.max_len);
                let (ti, ei) = data::split(all.len(), args.eval_frac, args.seed);
                (
                    ti.iter().map(|&i| all[i].clone()).collect(),
                    ei.iter().map(|&i| all[i].clone()).collect(),
                    Vec::new(),
                )
            }
        };
    if train.is_empty() {
        bail!("{}: no training examples", args.data.display());
    }

    let method = match args.method {
        MethodArg::Lora => {
            let projs = parse_targets(&args.targets)?;
            Method::Lora(Lora::new(
                c,
                targets_for(c, &projs),
                args.rank,
                args.alpha,
                args.rslora,
            )?)
        }
        MethodArg::Full => Method::Full(Full::new(&model)),
        MethodArg::Rps => rps_method(args, c)?,
        MethodArg::Sara => {
            let projs = parse_targets(&args.targets)?;
            Method::Sara(Sara::new(
                &model,
                &targets_for(c, &projs),
                args.theta,
                args.lambda_rank,
                !args.no_progressive,
            )?)
        }
    };
    let format = match (args.method, args.format) {
        (MethodArg::Lora, None) | (MethodArg::Full, None) => FormatArg::Gguf,
        (MethodArg::Sara, None) => FormatArg::Sara,
        (MethodArg::Rps, None) => FormatArg::Rps,
        (MethodArg::Lora, Some(f @ (FormatArg::Gguf | FormatArg::Peft)))
        | (MethodArg::Full, Some(f @ FormatArg::Gguf))
        | (MethodArg::Sara, Some(f @ FormatArg::Sara))
        | (MethodArg::Rps, Some(f @ FormatArg::Rps)) => f,
        (m, Some(f)) => bail!("--method {m:?} cannot be written as --format {f:?}"),
    };
    let lr = args.lr.unwrap_or(match args.method {
        MethodArg::Sara => default_lr(args.theta),
        _ => 1e-3,
    });
    let config = TrainConfig {
        steps: args.steps,
        batch: args.batch,
        accum: args.accum,
        lr,
        warmup: args.warmup,
        min_lr_ratio: 0.1,
        clip: args.clip,
        adam: AdamWConfig {
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        seed: args.seed,
        recompute: args.recompute,
    };
    let mut trainer = Trainer::new(&model, method, config)?;
    if let Some(path) = &args.resume {
        trainer
            .load_checkpoint(path)
            .with_context(|| format!("resuming from {}", path.display()))?;
    }
    let n_params = trainer.params.len();
    eprintln!(
        "training {} ({} trainable parameters) on {} examples ({} held out), {} steps",
        trainer.method.name(),
        n_params,
        train.len(),
        eval_examples.len(),
        args.steps
    );

    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step as u64);
    let started = Instant::now();
    let mut tokens = 0usize;
    let mut last_loss = f64::NAN;
    let eval_records: Vec<Record> = eval_records.into_iter().take(args.eval_max).collect();
    while trainer.step < args.steps {
        let s = trainer.train_step(&train)?;
        tokens += s.tokens;
        last_loss = s.loss;
        let tps = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            s.loss, s.lr, tps
        ));
        bar.set_position(trainer.step as u64);
        if args.eval_every > 0 && trainer.step % args.eval_every == 0 && trainer.step < args.steps {
            let el = trainer.eval_loss(&eval_examples)?;
            bar.suspend(|| {
                eprintln!(
                    "step {}: train loss {:.4}, eval loss {el:.4}",
                    trainer.step, s.loss
                )
            });
        }
        if let Some(ck) = &args.checkpoint {
            if trainer.step % args.checkpoint_every.max(1) == 0 {
                trainer.save_checkpoint(ck)?;
            }
        }
    }
    bar.finish_and_clear();
    let train_secs = started.elapsed().as_secs_f64();
    if let Some(ck) = &args.checkpoint {
        trainer.save_checkpoint(ck)?;
    }

    let eval_loss = trainer.eval_loss(&eval_examples)?;
    let exact = if eval_records.is_empty() {
        None
    } else {
        Some(trainer.exact_match(&tok, &eval_records)?)
    };
    let retention = match &args.retention_data {
        Some(path) => match data::load(path)? {
            Data::Pairs(records) => {
                let records: Vec<Record> = records.into_iter().take(args.eval_max).collect();
                Some(trainer.exact_match(&tok, &records)?)
            }
            Data::Text(_) => bail!("{}: --retention-data needs .jsonl records", path.display()),
        },
        None => None,
    };
    save(&trainer, args, format)?;
    let out_bytes = path_bytes(&args.out);
    let report = serde_json::json!({
        "method": trainer.method.name(),
        "steps": trainer.step,
        "trainable_params": n_params,
        "train_loss": last_loss,
        "eval_loss": eval_loss,
        "eval_exact_match": exact,
        "eval_records": eval_records.len(),
        "retention_exact_match": retention,
        "train_seconds": train_secs,
        "peak_rss_mib": peak_rss_mib(),
        "out_bytes": out_bytes,
        "tokens_per_s": tokens as f64 / train_secs.max(1e-9),
        "out": args.out.display().to_string(),
    });
    println!("{report}");
    Ok(())
}

/// Bytes of a file, or of every file in a directory (PEFT output).
fn path_bytes(p: &std::path::Path) -> u64 {
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

fn rps_method(args: &TrainArgs, c: &ModelConfig) -> Result<Method> {
    let budget = match args.budget {
        Some(m) => Budget::Slots(m),
        None => Budget::Ratio(args.rho),
    };
    let mut rc = match args.rps_mode {
        RpsModeArg::Lora => RpsConfig::lora(args.rank, args.alpha, budget),
        RpsModeArg::Delta => RpsConfig::delta(budget),
    };
    rc.seed = args.rps_seed;
    rc.scaler = match args.scaler {
        ScalerArg::V1 => Scaler::V1,
        ScalerArg::V5 => Scaler::V5,
        ScalerArg::None => Scaler::None,
    };
    let projs = parse_targets(&args.targets)?;
    Ok(Method::Rps(Rps::new(RpsLayout::new(c, &projs, &rc)?)))
}

fn save(trainer: &Trainer<'_>, args: &TrainArgs, format: FormatArg) -> Result<()> {
    let model = trainer.model;
    match (&trainer.method, format) {
        (Method::Lora(_), FormatArg::Gguf) => {
            let adapter = trainer.method.to_adapter(model, &trainer.params)?;
            graft_adapters::gguf_lora::save(&adapter, model.config.arch.name(), &args.out)?;
        }
        (Method::Lora(l), FormatArg::Peft) => {
            let adapter = trainer.method.to_adapter(model, &trainer.params)?;
            graft_adapters::peft::save(&adapter, &model.config, l.alpha, l.rslora, &args.out)?;
        }
        (Method::Full(f), _) => {
            graft_adapters::train::method::save_full_gguf(
                model,
                &f.layout,
                &trainer.params,
                &args.out,
            )?;
        }
        (Method::Sara(s), _) => {
            let adapter = trainer.method.to_adapter(model, &trainer.params)?;
            let meta = SaraMeta {
                theta: Some(s.theta),
                ..SaraMeta::new(model.config.arch)
            };
            graft_adapters::sara::save(&adapter, &meta, &args.out)?;
        }
        (Method::Rps(r), _) => {
            let pools: Vec<&[f32]> = r
                .tensors
                .iter()
                .map(|t| &trainer.params[t.range.clone()])
                .collect();
            graft_adapters::rps::save(&args.out, &r.layout, &pools)?;
        }
        (m, f) => bail!("{} cannot be written as {f:?}", m.name()),
    }
    if !args.out.exists() {
        return Err(anyhow!("{} was not written", args.out.display()));
    }
    Ok(())
}
