//! `graft logits`: logits at every position of a prompt, as safetensors.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use graft_runtime::kv_cache::KvType;
use graft_runtime::model::{sequence_batch, BatchDeltas, Scratch};

use crate::common::{init_threads, load_adapters, load_model, ModelArgs};

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to tokenize (BOS is added unless --no-bos).
    #[arg(
        long,
        short = 'p',
        conflicts_with = "tokens",
        required_unless_present = "tokens"
    )]
    pub prompt: Option<String>,
    /// Comma-separated token ids, used exactly as given (no BOS added).
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<u32>>,
    /// Do not add the BOS token to --prompt.
    #[arg(long)]
    pub no_bos: bool,
    /// Output file: `tokens` (i32 [n]) and `logits` (f32 [n, vocab]).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    #[command(flatten)]
    pub provider: crate::provider::ProviderArgs,
}

pub fn run(args: &LogitsArgs) -> Result<()> {
    init_threads(args.model.threads)?;
    let model = load_model(&args.model)?;
    let adapters = load_adapters(&args.model, &model)?;
    let tokens: Vec<u32> = match (&args.tokens, &args.prompt) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => {
            crate::common::load_tokenizer(&args.model, &model)?.encode(p, !args.no_bos, false)
        }
        (None, None) => return Err(anyhow!("give --prompt or --tokens")),
    };
    if tokens.is_empty() {
        return Err(anyhow!("no tokens to evaluate"));
    }
    let c = &model.config;
    let provider = args.provider.provider()?;
    let logits = if provider.is_ort() {
        let mut r = crate::provider::OrtRunner::new(
            &args.provider,
            provider,
            &model,
            adapters.as_ref(),
            args.model.threads,
            tokens.len(),
        )?;
        r.step(&tokens, 0, true)?
    } else {
        let mut cache = model.new_cache(tokens.len(), KvType::F16);
        let batch = sequence_batch(&tokens, 0, 0, true);
        let deltas = adapters
            .as_ref()
            .map(|a| BatchDeltas::uniform(a, batch.len()));
        model
            .forward_adapted(&batch, &mut cache, &mut Scratch::default(), deltas.as_ref())?
            .data
    };

    let token_bytes: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| (t as i32).to_le_bytes())
        .collect();
    let logit_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let n = tokens.len();
    let views = HashMap::from([
        (
            "tokens".to_owned(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![n], &token_bytes)?,
        ),
        (
            "logits".to_owned(),
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![n, c.n_vocab],
                &logit_bytes,
            )?,
        ),
    ]);
    safetensors::serialize_to_file(&views, &None, &args.out)
        .with_context(|| format!("{}: cannot write", args.out.display()))?;
    eprintln!(
        "{n} positions x {} logits -> {}",
        c.n_vocab,
        args.out.display()
    );
    Ok(())
}
