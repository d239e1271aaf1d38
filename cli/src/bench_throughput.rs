//! `graft bench throughput`: offline serving throughput like vLLM's `bench throughput`:
//! every request is queued at once and the continuous-batching engine runs them to the
//! end; requests spread over K adapters (round-robin), each a separate copy in memory.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use clap::Args;
use graft_adapters::{load_adapter, parse_adapter_arg, AdapterStack, LinearDelta};
use graft_runtime::generate::GenerateParams;
use graft_runtime::kv_cache::{KvCache, KvType};
use graft_runtime::sampling::SamplingParams;
use graft_runtime::scheduler::{Engine, EngineConfig, Event, Request};
use serde_json::json;

use crate::bench::{random_tokens, KV_BLOCK};
use crate::common::{init_threads, load_model, load_tokenizer, ModelArgs};

#[derive(Args, Debug)]
pub struct ThroughputArgs {
    /// The base model; --adapter files (repeatable) are the pool the K adapters are
    /// loaded from, in turn.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Requests, all queued at the start.
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Random prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Tokens generated per request (end-of-sequence ignored).
    #[arg(long, default_value_t = 64)]
    pub output_len: usize,
    /// Distinct adapters the requests spread over, round-robin (0: the base only).
    #[arg(long, default_value_t = 0)]
    pub adapters: usize,
    /// Tokens per forward step.
    #[arg(long, default_value_t = 512)]
    pub max_batch: usize,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Distinct adapters per forward step.
    #[arg(long, default_value_t = 8)]
    pub max_loras: usize,
}

pub fn run(args: &ThroughputArgs) -> Result<()> {
    let threads = init_threads(args.model.threads)?;
    if args.num_prompts == 0 || args.input_len == 0 {
        return Err(anyhow!("--num-prompts and --input-len must be at least 1"));
    }
    if args.adapters > 0 && args.model.adapter.is_empty() {
        return Err(anyhow!(
            "--adapters K needs at least one --adapter file to load from"
        ));
    }
    let model = load_model(&args.model)?;
    let tokenizer = load_tokenizer(&args.model, &model)?;
    let mut stacks: Vec<Arc<dyn LinearDelta>> = Vec::new();
    for k in 0..args.adapters {
        let (path, scale) = parse_adapter_arg(&args.model.adapter[k % args.model.adapter.len()])?;
        let adapter = Arc::new(load_adapter(&path, &model)?);
        stacks.push(Arc::new(AdapterStack::single(adapter, scale)));
    }
    // Room for every running sequence's whole context.
    let block = KV_BLOCK;
    let per_seq = (args.input_len + args.output_len + 1).div_ceil(block);
    let running = args.max_running.min(args.num_prompts).max(1);
    let cache = KvCache::new(
        model.config.n_layer,
        model.config.kv_dim(),
        per_seq * running,
        block,
        KvType::F16,
    );
    let config = EngineConfig {
        max_batch_tokens: args.max_batch,
        max_running: running,
        max_deltas_per_step: args.max_loras,
        max_waiting: args.num_prompts,
    };
    let mut engine = Engine::new(&model, &tokenizer, cache, config);
    let vocab = model.config.n_vocab;
    for i in 0..args.num_prompts {
        engine.submit(Request {
            prompt: random_tokens(args.input_len, vocab, i as u64),
            params: GenerateParams {
                max_tokens: args.output_len,
                sampling: SamplingParams::greedy(),
                ignore_eos: true,
                ..GenerateParams::default()
            },
            delta: (!stacks.is_empty()).then(|| stacks[i % stacks.len()].clone()),
        })?;
    }
    let start = Instant::now();
    let mut output_tokens = 0usize;
    let mut steps = 0usize;
    while !engine.is_idle() {
        output_tokens += engine
            .step()?
            .iter()
            .filter(|e| matches!(e, Event::Token { .. }))
            .count();
        steps += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let total_tokens = args.num_prompts * args.input_len + output_tokens;
    let out = json!({
        "model": args.model.model.display().to_string(),
        "threads": threads,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "adapters": args.adapters,
        "max_batch": args.max_batch,
        "max_running": running,
        "max_loras": args.max_loras,
        "elapsed_s": secs,
        "steps": steps,
        "preemptions": engine.preemptions(),
        "requests_per_s": args.num_prompts as f64 / secs,
        "tokens_per_s": total_tokens as f64 / secs,
        "output_tokens_per_s": output_tokens as f64 / secs,
    });
    crate::write_stdout(&format!("{out}\n"))
}
