//! `graft`: the command-line front of the graft runtime.

mod bench;
mod bench_serve;
mod bench_throughput;
mod common;
mod demo;
mod export_adapter;
mod export_onnx;
mod inspect;
mod logits;
mod make_data;
mod merge;
mod merge_adapters;
mod provider;
mod quantize;
mod run;
mod serve;
mod tokenize;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "graft",
    version,
    about = "Embedded LLM inference and on-device adaptation runtime",
    long_about = "graft runs quantized GGUF/HF models with hot-swappable adapters.\n\
                  Set RUST_LOG=debug for detailed logs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt; streams the text to stdout and timings to stderr.
    Run(run::RunArgs),
    /// Serve an OpenAI-compatible HTTP API (completions, chat, adapters loaded and
    /// unloaded at runtime); prints the bound address on stderr.
    Serve(serve::ServeArgs),
    /// Write the logits at every position of a prompt to a safetensors file.
    Logits(logits::LogitsArgs),
    /// Print the token ids of a text as a JSON list.
    Tokenize(tokenize::TokenizeArgs),
    /// Merge adapters (--adapter PATH[:SCALE], repeatable) into a GGUF base and write a
    /// new GGUF model.
    Merge(merge::MergeArgs),
    /// Combine several adapters into one sparse delta (linear, TIES, DARE, DAREx-q, PCB),
    /// written as a SaRA .safetensors file usable with --adapter.
    MergeAdapters(merge_adapters::MergeAdaptersArgs),
    /// The default model and its demo adapters hot-swapped in one process: held-out
    /// prompts of every adapter's task, answered by the base and by the adapter.
    Demo(demo::DemoArgs),
    /// Train an adapter (LoRA) or the whole model on the CPU from JSONL or text data,
    /// with a progress bar and a final JSON report (loss, exact match, speed).
    Train(train::TrainArgs),
    /// Write a deterministic generated dataset (.jsonl): the default model's
    /// pretraining mix or one of its adapter tasks.
    GenData(make_data::GenDataArgs),
    /// Write a randomly initialised Llama GGUF with a BPE vocabulary learned from the
    /// generated corpus (the start of the default model's pretraining).
    InitModel(make_data::InitModelArgs),
    /// Write a model as model.onnx + model.onnx.data for ONNX Runtime (prefill and decode
    /// with KV-cache inputs/outputs; optional LoRA inputs for `export-adapter`).
    ExportOnnx(export_onnx::ExportOnnxArgs),
    /// Write adapters (--adapter PATH[:SCALE], repeatable) as an ONNX Runtime
    /// .onnx_adapter file for a model exported with `export-onnx --lora-rank`.
    ExportAdapter(export_adapter::ExportAdapterArgs),
    /// Measure prompt processing (pp) and generation (tg) speed like llama-bench; prints one JSON line.
    Bench(bench::BenchArgs),
    /// Show what a model or adapter file holds: architecture, key metadata, tensor table, totals.
    ///
    /// FILE may be a GGUF model or LoRA adapter, a .safetensors file, an HF checkpoint
    /// directory (config.json + safetensors, sharded or not) or a PEFT adapter directory.
    Inspect {
        /// The file or directory to inspect.
        file: PathBuf,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Quantize a model with one of llama.cpp's recipes and write a GGUF file.
    ///
    /// IN is a GGUF file (F32/F16/BF16, or an already quantized one) or an HF checkpoint
    /// directory. Per-tensor types follow llama.cpp's choices for the recipe.
    Quantize {
        /// Source model: a .gguf file or an HF checkpoint directory.
        input: PathBuf,
        /// Destination .gguf file.
        output: PathBuf,
        /// Recipe: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q2_K_S, Q3_K_S, Q3_K_M,
        /// Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K (Q3_K/Q4_K/Q5_K mean the _M recipes).
        #[arg(long = "type", short = 't', default_value = "Q4_K_M")]
        ty: String,
        /// Give every weight matrix the recipe's base type (no per-tensor bumps).
        #[arg(long)]
        pure: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Logits(args) => logits::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::ExportOnnx(args) => export_onnx::run(&args),
        Command::ExportAdapter(args) => export_adapter::run(&args),
        Command::MergeAdapters(args) => merge_adapters::run(&args),
        Command::Tokenize(args) => tokenize::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::GenData(args) => make_data::gen_data(&args),
        Command::InitModel(args) => make_data::init_model(&args),
        Command::Inspect { file, json } => inspect::run(&file, json),
        Command::Quantize {
            input,
            output,
            ty,
            pure,
            threads,
        } => quantize::run(&input, &output, &ty, pure, threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole cause chain.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Writes command output; a closed pipe (`graft inspect ... | head`) is not an error.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
