//! `graft bench`: prompt-processing and generation speed, measured like llama-bench
//! (random tokens, an empty context for each run, the median over repetitions).

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use graft_runtime::kv_cache::KvType;
use graft_runtime::model::{sequence_batch, BatchToken, Model, Scratch};
use serde_json::json;

use crate::common::{init_threads, load_model, ModelArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens processed in one batch (0 skips the test).
    #[arg(long, default_value_t = 512)]
    pub pp: usize,
    /// Tokens generated one at a time (0 skips the test).
    #[arg(long, default_value_t = 128)]
    pub tg: usize,
    /// Timed repetitions of each test (after one warm-up run).
    #[arg(long, short = 'r', default_value_t = 5)]
    pub reps: usize,
}

fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
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

fn prompt_run(model: &Model, tokens: &[u32], scratch: &mut Scratch) -> Result<f64> {
    let mut cache = model.new_cache(tokens.len(), KvType::F16);
    let batch = sequence_batch(tokens, 0, 0, false);
    let start = Instant::now();
    model.forward_with(&batch, &mut cache, scratch)?;
    Ok(start.elapsed().as_secs_f64())
}

fn generation_run(model: &Model, tokens: &[u32], scratch: &mut Scratch) -> Result<f64> {
    let mut cache = model.new_cache(tokens.len(), KvType::F16);
    let start = Instant::now();
    for (pos, &token) in tokens.iter().enumerate() {
        model.forward_with(
            &[BatchToken {
                token,
                pos,
                seq: 0,
                logits: true,
            }],
            &mut cache,
            scratch,
        )?;
    }
    Ok(start.elapsed().as_secs_f64())
}

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

pub fn run(args: &BenchArgs) -> Result<()> {
    let threads = init_threads(args.model.threads)?;
    let model = load_model(&args.model)?;
    let vocab = model.config.n_vocab;
    let mut scratch = Scratch::default();
    let mut out = json!({
        "model": args.model.model.display().to_string(),
        "threads": threads,
        "kernel": graft_quant::kernels::level().name(),
        "reps": args.reps,
        "weight_bytes": model.weight_bytes(),
    });
    if args.pp > 0 {
        let (mean, sd) = measure(args.reps, args.pp, |seed| {
            prompt_run(&model, &random_tokens(args.pp, vocab, seed), &mut scratch)
        })?;
        out["pp"] = json!(args.pp);
        out["pp_tokens_per_s"] = json!(mean);
        out["pp_tokens_per_s_sd"] = json!(sd);
    }
    if args.tg > 0 {
        let (mean, sd) = measure(args.reps, args.tg, |seed| {
            generation_run(
                &model,
                &random_tokens(args.tg, vocab, seed + 1000),
                &mut scratch,
            )
        })?;
        out["tg"] = json!(args.tg);
        out["tg_tokens_per_s"] = json!(mean);
        out["tg_tokens_per_s_sd"] = json!(sd);
    }
    crate::write_stdout(&format!("{out}\n"))
}
