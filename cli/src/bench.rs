//! `graft bench`: prompt-processing and generation speed, measured like llama-bench
//! (random tokens, an empty context for each run, the median over repetitions).

use std::time::Instant;

use anyhow::{anyhow, Result};
use clap::Args;
use graft_adapters::{load_adapter, parse_adapter_arg, AdapterStack, Registry, RegistryLimits};
use graft_runtime::kv_cache::KvType;
use graft_runtime::model::{sequence_batch, BatchDeltas, BatchToken, LinearDelta, Model, Scratch};
use serde_json::json;

use crate::common::{init_threads, load_adapters, load_model, ModelArgs};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Option<BenchMode>,
    #[command(flatten)]
    pub model: Option<ModelArgs>,
    /// Prompt tokens processed in one batch (0 skips the test).
    #[arg(long, default_value_t = 512)]
    pub pp: usize,
    /// Tokens generated one at a time (0 skips the test).
    #[arg(long, default_value_t = 128)]
    pub tg: usize,
    /// Timed repetitions of each test (after one warm-up run).
    #[arg(long, short = 'r', default_value_t = 5)]
    pub reps: usize,
    /// Sequences decoded together in the generation test (one token each per step;
    /// tg_tokens_per_s counts the tokens of all of them).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// With several --adapter: give the sequences of the batch one adapter each, in
    /// turn (a mixed-adapter batch), instead of stacking them on every sequence.
    #[arg(long)]
    pub per_sequence: bool,
    #[command(flatten)]
    pub provider: crate::provider::ProviderArgs,
}

pub(crate) fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    // splitmix64: the bench needs varied ids, not quality randomness
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % vocab as u64) as u32
        })
        .collect()
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchMode {
    /// Offline serving throughput (vLLM's `bench throughput`): all requests queued at
    /// once, run by the continuous-batching engine; prints one JSON line.
    Throughput(crate::bench_throughput::ThroughputArgs),
    /// Online serving benchmark (vLLM's `bench serve`) against a running server:
    /// streams /v1/completions, reports TTFT, TPOT, ITL, E2E and throughput as JSON.
    Serve(crate::bench_serve::ServeBenchArgs),
}

/// The delta of each sequence of the batch.
type SeqDeltas<'a> = [Option<&'a dyn LinearDelta>];

fn prompt_run(
    model: &Model,
    tokens: &[u32],
    delta: Option<&dyn LinearDelta>,
    scratch: &mut Scratch,
) -> Result<f64> {
    let mut cache = model.new_cache(tokens.len(), KvType::F16);
    let batch = sequence_batch(tokens, 0, 0, false);
    let deltas = delta.map(|d| BatchDeltas::uniform(d, batch.len()));
    let start = Instant::now();
    model.forward_adapted(&batch, &mut cache, scratch, deltas.as_ref())?;
    Ok(start.elapsed().as_secs_f64())
}

/// `tokens.len()` decode steps of `seq_deltas.len()` sequences each.
fn generation_run(
    model: &Model,
    tokens: &[u32],
    seq_deltas: &SeqDeltas,
    scratch: &mut Scratch,
) -> Result<f64> {
    let n_seq = seq_deltas.len();
    let per_seq = tokens.len().next_multiple_of(KV_BLOCK);
    let mut cache = model.new_cache(per_seq * n_seq, KvType::F16);
    let any_delta = seq_deltas.iter().any(Option::is_some);
    let deltas = any_delta.then(|| BatchDeltas::per_token(seq_deltas));
    let start = Instant::now();
    for (pos, &token) in tokens.iter().enumerate() {
        let batch: Vec<BatchToken> = (0..n_seq)
            .map(|s| BatchToken {
                token,
                pos,
                seq: s as u32,
                logits: true,
            })
            .collect();
        model.forward_adapted(&batch, &mut cache, scratch, deltas.as_ref())?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Tokens per KV cache block (a sequence holds whole blocks).
pub(crate) const KV_BLOCK: usize = 32;

fn measure(reps: usize, n: usize, mut run: impl FnMut(u64) -> Result<f64>) -> Result<(f64, f64)> {
    run(0)?; // warm-up: page in the weights, fill caches
    let mut rates = Vec::with_capacity(reps);
    for r in 0..reps.max(1) {
        rates.push(n as f64 / run(r as u64 + 1)?);
    }
    // the median, as the peer script reports; the spread as a standard deviation
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let var = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64;
    rates.sort_by(f64::total_cmp);
    Ok((rates[rates.len() / 2], var.sqrt()))
}

/// Median time from the first --adapter file on disk to an adapter usable from a
/// registry (loaded, validated against the model, inserted).
fn adapter_load_ms(args: &ModelArgs, model: &Model, reps: usize) -> Result<f64> {
    let Some(first) = args.adapter.first() else {
        return Ok(0.0);
    };
    let (path, _) = parse_adapter_arg(first)?;
    let registry = Registry::new(RegistryLimits::default());
    let (rate, _) = measure(reps, 1, |_| {
        let start = Instant::now();
        registry.load_file("bench", &path, model, load_adapter)?;
        let handle = registry.get("bench");
        let secs = start.elapsed().as_secs_f64();
        drop(handle);
        registry.unload("bench")?;
        Ok(secs)
    })?;
    // measure reports a rate: loads per second
    Ok(1e3 / rate)
}

pub fn run(args: &BenchArgs) -> Result<()> {
    match (&args.mode, &args.model) {
        (Some(BenchMode::Throughput(t)), _) => crate::bench_throughput::run(t),
        (Some(BenchMode::Serve(s)), _) => crate::bench_serve::run(s),
        (None, Some(m)) => run_model(args, m),
        (None, None) => Err(anyhow!("give --model (see graft bench --help)")),
    }
}

fn run_model(args: &BenchArgs, model_args: &ModelArgs) -> Result<()> {
    let threads = init_threads(model_args.threads)?;
    if args.batch == 0 {
        return Err(anyhow!("--batch must be at least 1"));
    }
    let model = load_model(model_args)?;
    let adapters = load_adapters(model_args, &model)?;
    let provider = args.provider.provider()?;
    if provider.is_ort() {
        return bench_ort(
            args,
            model_args,
            &model,
            adapters.as_ref(),
            provider,
            threads,
        );
    }
    // Each adapter alone (per-sequence mode) or the whole stack on every sequence.
    let singles: Vec<AdapterStack> = adapters
        .iter()
        .flat_map(|s| s.layers.iter().cloned())
        .map(|(a, scale)| AdapterStack::single(a, scale))
        .collect();
    let seq_deltas: Vec<Option<&dyn LinearDelta>> = (0..args.batch)
        .map(|s| match (&adapters, args.per_sequence) {
            (None, _) => None,
            (Some(_), true) => Some(&singles[s % singles.len()] as &dyn LinearDelta),
            (Some(stack), false) => Some(stack as &dyn LinearDelta),
        })
        .collect();
    let vocab = model.config.n_vocab;
    let mut scratch = Scratch::default();
    let mut out = json!({
        "model": model_args.model.display().to_string(),
        "threads": threads,
        "kernel": graft_quant::kernels::level().name(),
        "provider": "native",
        "reps": args.reps,
        "weight_bytes": model.weight_bytes(),
    });
    if let Some(stack) = &adapters {
        out["adapters"] = json!(model_args.adapter);
        out["adapter_bytes"] = json!(stack.layers.iter().map(|(a, _)| a.bytes()).sum::<usize>());
        out["per_sequence"] = json!(args.per_sequence);
        out["adapter_load_ms"] = json!(adapter_load_ms(model_args, &model, args.reps)?);
    }
    if args.pp > 0 {
        let (mean, sd) = measure(args.reps, args.pp, |seed| {
            prompt_run(
                &model,
                &random_tokens(args.pp, vocab, seed),
                seq_deltas[0],
                &mut scratch,
            )
        })?;
        out["pp"] = json!(args.pp);
        out["pp_tokens_per_s"] = json!(mean);
        out["pp_tokens_per_s_sd"] = json!(sd);
    }
    if args.tg > 0 {
        let (mean, sd) = measure(args.reps, args.tg * args.batch, |seed| {
            generation_run(
                &model,
                &random_tokens(args.tg, vocab, seed + 1000),
                &seq_deltas,
                &mut scratch,
            )
        })?;
        out["batch"] = json!(args.batch);
        out["tg"] = json!(args.tg);
        out["tg_tokens_per_s"] = json!(mean);
        out["tg_tokens_per_s_sd"] = json!(sd);
    }
    crate::write_stdout(&format!("{out}\n"))
}

/// `graft bench --provider ort-*`: the same pp/tg tests through an ONNX Runtime
/// session (one sequence; a fresh KV cache for each run; the --adapter stack active).
fn bench_ort(
    args: &BenchArgs,
    model_args: &ModelArgs,
    model: &Model,
    adapters: Option<&AdapterStack>,
    provider: graft_ort::Provider,
    threads: usize,
) -> Result<()> {
    if args.batch != 1 || args.per_sequence {
        return Err(anyhow!(
            "--provider {provider}: one sequence only (no --batch, no --per-sequence)"
        ));
    }
    let vocab = model.config.n_vocab;
    let mut r = crate::provider::OrtRunner::new(
        &args.provider,
        provider,
        model,
        adapters,
        model_args.threads,
        args.pp.max(args.tg) + 1,
    )?;
    let mut out = json!({
        "model": model_args.model.display().to_string(),
        "threads": threads,
        "provider": provider.name(),
        "reps": args.reps,
        "weight_bytes": model.weight_bytes(),
    });
    if adapters.is_some() {
        out["adapters"] = json!(model_args.adapter);
    }
    if args.pp > 0 {
        let (mean, sd) = measure(args.reps, args.pp, |seed| {
            let tokens = random_tokens(args.pp, vocab, seed);
            r.reset();
            let start = Instant::now();
            r.step(&tokens, 0, false)?;
            Ok(start.elapsed().as_secs_f64())
        })?;
        out["pp"] = json!(args.pp);
        out["pp_tokens_per_s"] = json!(mean);
        out["pp_tokens_per_s_sd"] = json!(sd);
    }
    if args.tg > 0 {
        let (mean, sd) = measure(args.reps, args.tg, |seed| {
            let tokens = random_tokens(args.tg, vocab, seed + 1000);
            r.reset();
            let start = Instant::now();
            for (pos, &t) in tokens.iter().enumerate() {
                r.step(&[t], pos, false)?;
            }
            Ok(start.elapsed().as_secs_f64())
        })?;
        out["batch"] = json!(1);
        out["tg"] = json!(args.tg);
        out["tg_tokens_per_s"] = json!(mean);
        out["tg_tokens_per_s_sd"] = json!(sd);
    }
    crate::write_stdout(&format!("{out}\n"))
}
