//! Text generation for one sequence: prefill, then sample token by token with
//! streaming, stop strings, EOS and a token budget.

use std::time::Instant;

use crate::kv_cache::{KvError, KvType};
use crate::model::{sequence_batch, BatchDeltas, LinearDelta, Model, ModelError, Scratch};
use crate::sampling::{Sampler, SamplingError, SamplingParams, StopChecker};
use crate::tokenizer::Tokenizer;

/// Prompt tokens per forward step during prefill: bounds scratch memory for long prompts.
const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    pub kv_type: KvType,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            kv_type: KvType::F16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// A stop string or an end-of-generation token.
    Stop,
    /// The callback asked to stop.
    Cancelled,
}

impl FinishReason {
    /// OpenAI's `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub prompt_secs: f64,
    pub generation_secs: f64,
}

impl GenerateStats {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(1e-9)
    }

    pub fn generation_tokens_per_s(&self) -> f64 {
        self.completion_tokens as f64 / self.generation_secs.max(1e-9)
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub stats: GenerateStats,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    /// A backend other than graft's forward pass failed (see [`generate_with`]).
    #[error("{0}")]
    Backend(String),
}

/// Generates a continuation of `prompt`. `on_text` receives each piece of text as it
/// becomes final (never a broken UTF-8 sequence, never part of a stop string) and
/// returns `false` to cancel.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: impl FnMut(&str) -> bool,
) -> Result<GenerateOutput, GenerateError> {
    generate_adapted(model, tokenizer, prompt, params, None, on_text)
}

/// [`generate`] with every token going through `delta` (an adapter or a stack).
pub fn generate_adapted(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    delta: Option<&dyn LinearDelta>,
    on_text: impl FnMut(&str) -> bool,
) -> Result<GenerateOutput, GenerateError> {
    let mut cache = model.new_cache(prompt.len() + params.max_tokens + 1, params.kv_type);
    let mut scratch = Scratch::default();
    let step = |tokens: &[u32], pos: usize| -> Result<Vec<f32>, GenerateError> {
        let batch = sequence_batch(tokens, 0, pos, false);
        let deltas = delta.map(|d| BatchDeltas::uniform(d, batch.len()));
        let out = model.forward_adapted(&batch, &mut cache, &mut scratch, deltas.as_ref())?;
        Ok(out.row(0).to_vec())
    };
    generate_with(
        model.config.n_vocab,
        tokenizer,
        prompt,
        params,
        step,
        on_text,
    )
}

/// [`generate`] over any backend: `step(tokens, pos)` runs `tokens` at positions
/// `pos..` of the one sequence and returns the `n_vocab` logits of the last of them.
pub fn generate_with(
    n_vocab: usize,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    mut step: impl FnMut(&[u32], usize) -> Result<Vec<f32>, GenerateError>,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<GenerateOutput, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let mut sampler = Sampler::new(params.sampling.clone(), n_vocab)?;
    let mut stats = GenerateStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    for &t in prompt {
        sampler.accept(t);
    }

    let start = Instant::now();
    let mut logits = Vec::new();
    for (ci, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
        logits = step(chunk, ci * PREFILL_CHUNK)?;
    }
    stats.prompt_secs = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut decoder = tokenizer.stream_decoder();
    let mut stops = StopChecker::new(params.stop.iter());
    let mut finish = FinishReason::Length;
    let mut pos = prompt.len();
    while tokens.len() < params.max_tokens {
        let next = sampler.try_sample(&logits)?;
        sampler.accept(next);
        if tokenizer.is_eog(next) && !params.ignore_eos {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(next);
        let piece = decoder.push(next);
        let r = stops.push(&piece);
        if !r.emit.is_empty() {
            text.push_str(&r.emit);
            if !on_text(&r.emit) {
                finish = FinishReason::Cancelled;
                break;
            }
        }
        if r.stopped {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() == params.max_tokens {
            break;
        }
        logits = step(&[next], pos)?;
        pos += 1;
    }
    if finish != FinishReason::Cancelled && !stops.is_stopped() {
        let rest = decoder.flush();
        let mut tail = stops.push(&rest).emit;
        if !stops.is_stopped() {
            tail.push_str(&stops.finish());
        }
        if !tail.is_empty() {
            text.push_str(&tail);
            on_text(&tail);
        }
    }
    stats.completion_tokens = tokens.len();
    stats.generation_secs = start.elapsed().as_secs_f64();
    Ok(GenerateOutput {
        tokens,
        text,
        finish,
        stats,
    })
}
