//! `graft run`: generate text from a prompt, streamed to stdout; timings to stderr.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use graft_runtime::chat::ChatMessage;
use graft_runtime::generate::{generate_adapted, generate_with, GenerateError, GenerateParams};
use graft_runtime::kv_cache::KvType;
use graft_runtime::sampling::SamplingParams;

use crate::common::{init_threads, load_adapters, load_model, load_tokenizer, ModelArgs};
use graft_adapters::LinearDelta;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (with --chat: the user's message).
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub n_predict: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise recently generated tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Random seed: the same seed gives the same text.
    #[arg(long, short = 's', default_value_t = 0)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Format the prompt with the model's chat template (ChatML if it has none).
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Do not add the BOS token.
    #[arg(long)]
    pub no_bos: bool,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// KV cache element type: f16 (as llama.cpp) or f32.
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    pub kv_type: String,
    #[command(flatten)]
    pub provider: crate::provider::ProviderArgs,
}

pub fn run(args: &RunArgs) -> Result<()> {
    init_threads(args.model.threads)?;
    let model = load_model(&args.model)?;
    let adapters = load_adapters(&args.model, &model)?;
    let tokenizer = load_tokenizer(&args.model, &model)?;
    let mut add_bos = !args.no_bos;
    let (text, parse_special) = if args.chat {
        let template = crate::common::chat_template(&model, &tokenizer)?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(ChatMessage::system(s.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        let rendered = template.render(&messages, true)?;
        // Templates that write the BOS text themselves must not get a second BOS.
        if !template.bos_token().is_empty() && rendered.starts_with(template.bos_token()) {
            add_bos = false;
        }
        (rendered, true)
    } else {
        (args.prompt.clone(), false)
    };
    let prompt = tokenizer.encode(&text, add_bos, parse_special);
    let params = GenerateParams {
        max_tokens: args.n_predict,
        sampling: SamplingParams {
            temperature: args.temp,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repeat_penalty,
            frequency_penalty: args.frequency_penalty,
            presence_penalty: args.presence_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        kv_type: if args.kv_type == "f32" {
            KvType::F32
        } else {
            KvType::F16
        },
    };
    let mut stdout = std::io::stdout().lock();
    let delta = adapters.as_ref().map(|a| a as &dyn LinearDelta);
    let on_text = |piece: &str| {
        // A closed stdout (piped into `head`) ends generation quietly.
        stdout
            .write_all(piece.as_bytes())
            .and_then(|()| stdout.flush())
            .is_ok()
    };
    let provider = args.provider.provider()?;
    let out = if provider.is_ort() {
        let mut r = crate::provider::OrtRunner::new(
            &args.provider,
            provider,
            &model,
            adapters.as_ref(),
            args.model.threads,
            prompt.len() + args.n_predict + 1,
        )?;
        let step = |tokens: &[u32], pos: usize| {
            r.step(tokens, pos, false)
                .map_err(|e| GenerateError::Backend(format!("{e:#}")))
        };
        generate_with(
            model.config.n_vocab,
            &tokenizer,
            &prompt,
            &params,
            step,
            on_text,
        )?
    } else {
        generate_adapted(&model, &tokenizer, &prompt, &params, delta, on_text)?
    };
    let _ = writeln!(stdout);
    let s = &out.stats;
    eprintln!(
        "prompt: {} tokens in {:.3} s ({:.1} tok/s) | generated: {} tokens in {:.3} s ({:.1} tok/s) | finish: {}",
        s.prompt_tokens,
        s.prompt_secs,
        s.prompt_tokens_per_s(),
        s.completion_tokens,
        s.generation_secs,
        s.generation_tokens_per_s(),
        out.finish.as_str()
    );
    Ok(())
}
