//! `graft export-adapter`: adapters in another runtime's format (ONNX Runtime's
//! `.onnx_adapter`).

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::Args;
use graft_ort::{GraphOptions, LoraSpec};

use crate::common::{load_adapters, load_model, ModelArgs};
use crate::provider::stack_refs;

#[derive(Args, Debug)]
pub struct ExportAdapterArgs {
    /// The base model and --adapter PATH[:SCALE] (repeat to stack: one adapter whose
    /// rank is the sum).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output format.
    #[arg(long, default_value = "onnx", value_parser = ["onnx"])]
    pub format: String,
    /// Output file (`.onnx_adapter`).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// LoRA rank of the exported model's inputs (`graft export-onnx --lora-rank`);
    /// default: the smallest that holds the adapters.
    #[arg(long)]
    pub lora_rank: Option<usize>,
}

pub fn run(args: &ExportAdapterArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let stack = load_adapters(&args.model, &model)?
        .ok_or_else(|| anyhow!("give at least one --adapter PATH[:SCALE]"))?;
    let refs = stack_refs(Some(&stack));
    let needed = graft_ort::required_rank(&refs)
        .ok_or_else(|| anyhow!("the adapters hold no LoRA deltas at a non-zero scale"))?;
    let rank = args.lora_rank.unwrap_or(needed);
    let mut opts = GraphOptions::for_model(&model);
    opts.lora = Some(LoraSpec::all(rank));
    let info = graft_ort::graph::graph_info(&model, &opts);
    let bytes = graft_ort::write_onnx_adapter(&args.out, &refs, &info)?;
    eprintln!(
        "{} ({} KiB): LoRA inputs of rank {rank} (export the model with --lora-rank {rank})",
        args.out.display(),
        bytes >> 10
    );
    Ok(())
}
