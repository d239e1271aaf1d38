//! `graft serve`: the OpenAI-compatible HTTP server with hot-swappable adapters.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use graft_adapters::{load_adapter, Registry, RegistryLimits};
use graft_runtime::scheduler::EngineConfig;
use graft_server::{Server, ServerOptions};

use crate::common::{chat_template, init_threads, load_model, load_tokenizer, ModelArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model: a GGUF file, an HF checkpoint directory, or a llama2.c checkpoint.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Tokenizer to use instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Adapter loaded at start, NAME=PATH (repeatable); clients select it by NAME.
    #[arg(long, value_name = "NAME=PATH")]
    pub adapter: Vec<String>,
    /// Directory confining the paths of POST /v1/load_lora_adapter.
    #[arg(long, value_name = "DIR")]
    pub adapter_root: Option<PathBuf>,
    /// Let clients load and unload adapters (needs --adapter-root).
    #[arg(long)]
    pub allow_adapter_loading: bool,
    /// Distinct adapters (or stacks) per forward step.
    #[arg(long, default_value_t = 8)]
    pub max_loras: usize,
    /// Adapters kept loaded at most (least recently used evicted).
    #[arg(long, default_value_t = 64)]
    pub max_cpu_loras: usize,
    /// Tokens per forward step.
    #[arg(long, default_value_t = 512)]
    pub max_batch: usize,
    /// Sequences generating at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// KV cache size in blocks of 16 tokens.
    #[arg(long, default_value_t = 512)]
    pub kv_blocks: usize,
    /// Requests waiting for admission before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port; 0 picks a free one (printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Worker threads for the model (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    init_threads(args.threads)?;
    let margs = ModelArgs {
        model: args.model.clone(),
        quantize: None,
        threads: args.threads,
        tokenizer: args.tokenizer.clone(),
        adapter: Vec::new(),
    };
    let model = load_model(&margs)?;
    let tokenizer = load_tokenizer(&margs, &model)?;
    let template = chat_template(&model, &tokenizer)?;
    let registry = Arc::new(Registry::new(RegistryLimits {
        max_adapters: args.max_cpu_loras,
        max_bytes: usize::MAX,
    }));
    for spec in &args.adapter {
        let (name, path) = spec
            .split_once('=')
            .filter(|(n, p)| !n.is_empty() && !p.is_empty())
            .ok_or_else(|| anyhow!("--adapter {spec}: expected NAME=PATH"))?;
        registry
            .load_file(name, path.as_ref(), &model, load_adapter)
            .with_context(|| format!("--adapter {spec}"))?;
    }
    let model_id = args
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "base".to_owned());
    let mut opts = ServerOptions::new(model_id, args.model.clone());
    opts.adapter_root = args.adapter_root.clone();
    opts.allow_adapter_loading = args.allow_adapter_loading;
    opts.api_key = args.api_key.clone().filter(|k| !k.is_empty());
    opts.max_body_bytes = args.max_body;
    opts.kv_blocks = args.kv_blocks;
    opts.engine = EngineConfig {
        max_batch_tokens: args.max_batch,
        max_running: args.max_running,
        max_deltas_per_step: args.max_loras,
        max_waiting: args.max_queue,
    };
    let server = Server::new(
        opts,
        Arc::new(model),
        Arc::new(tokenizer),
        template,
        registry,
    )?;
    // The model's work runs on the rayon pool; the async side only moves bytes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        eprintln!("graft serve: listening on http://{addr}");
        server
            .serve(listener, graft_server::shutdown_signal())
            .await
            .context("server failed")
    })?;
    eprintln!("graft serve: stopped");
    Ok(())
}
