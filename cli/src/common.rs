//! Options and set-up shared by the commands that run a model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use graft_adapters::{load_adapter, parse_adapter_arg, AdapterStack};
use graft_quant::GgmlType;
use graft_runtime::chat::ChatTemplate;
use graft_runtime::model::Model;
use graft_runtime::tokenizer::Tokenizer;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a GGUF file, an HF checkpoint directory, or a llama2.c checkpoint.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Convert an HF checkpoint's weight matrices to this type at load (e.g. Q8_0, Q4_0).
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Tokenizer to use instead of the model's own: tokenizer.json, a llama2.c
    /// tokenizer.bin, or a GGUF file.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Adapter applied without merging, PATH[:SCALE] (scale 1 by default): a GGUF LoRA
    /// file, a PEFT directory or a SaRA .safetensors file. Repeat to stack adapters.
    #[arg(long, value_name = "PATH[:SCALE]")]
    pub adapter: Vec<String>,
}

/// Sizes the global rayon pool; call once, before any parallel work.
pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if n == 0 {
        return Err(anyhow!("--threads must be at least 1"));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("cannot start the thread pool")?;
    Ok(n)
}

pub fn load_model(args: &ModelArgs) -> Result<Model> {
    let quantize = match &args.quantize {
        None => None,
        Some(t) => {
            Some(GgmlType::from_name(t).ok_or_else(|| anyhow!("--quantize {t}: unknown type"))?)
        }
    };
    let start = Instant::now();
    let model = Model::load(Path::new(&args.model), quantize)?;
    tracing::info!(
        "loaded {} ({} layers, {} MiB of weights) in {:.0} ms",
        args.model.display(),
        model.config.n_layer,
        model.weight_bytes() >> 20,
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(model)
}

/// The `--adapter` stack for `model`, or None without adapters.
pub fn load_adapters(args: &ModelArgs, model: &Model) -> Result<Option<AdapterStack>> {
    if args.adapter.is_empty() {
        return Ok(None);
    }
    let mut layers = Vec::new();
    for arg in &args.adapter {
        let (path, scale) = parse_adapter_arg(arg)?;
        let start = Instant::now();
        let adapter = load_adapter(&path, model)?;
        tracing::info!(
            "adapter {} ({} tensors, {} KiB) at scale {scale} loaded in {:.1} ms",
            path.display(),
            adapter.len(),
            adapter.bytes() >> 10,
            start.elapsed().as_secs_f64() * 1e3
        );
        layers.push((Arc::new(adapter), scale));
    }
    Ok(Some(AdapterStack::new(layers)))
}

/// The tokenizer for a model: `--tokenizer` if given (tokenizer.json, llama2.c
/// tokenizer.bin, or a GGUF to take the vocabulary from), else the GGUF's own, else a
/// tokenizer.json / tokenizer.bin beside the model.
pub fn load_tokenizer(args: &ModelArgs, model: &Model) -> Result<Tokenizer> {
    if let Some(path) = &args.tokenizer {
        return tokenizer_from_path(path, Some(model.config.n_vocab));
    }
    if let Some(gguf) = &model.gguf {
        return Ok(Tokenizer::from_gguf(gguf)?);
    }
    beside_model(&args.model, Some(model.config.n_vocab))
}

/// The tokenizer without loading the weights (for `graft tokenize`).
pub fn tokenizer_only(args: &ModelArgs) -> Result<Tokenizer> {
    if let Some(path) = &args.tokenizer {
        return tokenizer_from_path(path, None);
    }
    if graft_runtime::gguf::has_gguf_magic(&args.model) {
        return Ok(Tokenizer::open_gguf(&args.model)?);
    }
    beside_model(&args.model, None)
}

fn tokenizer_from_path(path: &Path, n_vocab: Option<usize>) -> Result<Tokenizer> {
    Ok(match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Tokenizer::from_hf_file(path)?,
        Some("bin") => Tokenizer::open_llama2c_bin(path, n_vocab)?,
        _ => Tokenizer::open_gguf(path)?,
    })
}

fn beside_model(model: &Path, n_vocab: Option<usize>) -> Result<Tokenizer> {
    let dir = if model.is_dir() {
        model
    } else {
        model.parent().unwrap_or(Path::new("."))
    };
    for name in ["tokenizer.json", "tokenizer.bin"] {
        let p = dir.join(name);
        if p.is_file() {
            return tokenizer_from_path(&p, n_vocab);
        }
    }
    Err(anyhow!(
        "{}: no tokenizer found (the model has none, and there is no tokenizer.json or tokenizer.bin beside it); pass --tokenizer",
        model.display()
    ))
}

/// The model's chat template (`tokenizer.chat_template`), or ChatML.
pub fn chat_template(model: &Model, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
    let piece = |id: Option<u32>| {
        id.map(|i| String::from_utf8_lossy(tokenizer.token_to_piece_with(i, true)).into_owned())
            .unwrap_or_default()
    };
    let source = model.gguf.as_ref().and_then(|g| {
        g.get_str_opt("tokenizer.chat_template")
            .ok()
            .flatten()
            .map(str::to_owned)
    });
    Ok(match source {
        Some(t) => ChatTemplate::new(&t, &piece(tokenizer.bos()), &piece(tokenizer.eos()))?,
        None => ChatTemplate::chatml(),
    })
}
