//! `graft export-onnx`: a model as `model.onnx` + `model.onnx.data` for ONNX Runtime.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Result};
use clap::Args;
use graft_ort::{export_model, GraphOptions, LoraSpec};

use crate::common::{load_model, ModelArgs};

#[derive(Args, Debug)]
pub struct ExportOnnxArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Give every projection LoRA A/B inputs of this rank (0: none). Adapters written by
    /// `graft export-adapter --format onnx` must use the same rank.
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// Longest sequence (prompt + generated tokens) the model accepts; default: the
    /// model's training context.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// MatMulNBits accuracy level: 4 quantizes activations to int8 (as llama.cpp; much
    /// faster on CPU), 0 computes in float.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i64).range(0..=4))]
    pub accuracy_level: i64,
}

pub fn run(args: &ExportOnnxArgs) -> Result<()> {
    if !args.model.adapter.is_empty() {
        return Err(anyhow!(
            "export-onnx writes the base model; export adapters with `graft export-adapter --format onnx`"
        ));
    }
    let model = load_model(&args.model)?;
    let mut opts = GraphOptions::for_model(&model);
    if let Some(n) = args.max_context {
        opts.max_context = n;
    }
    opts.lora = (args.lora_rank > 0).then(|| LoraSpec::all(args.lora_rank));
    opts.accuracy_level = args.accuracy_level;
    let start = Instant::now();
    let report = export_model(&model, &opts, &args.out)?;
    eprintln!(
        "{} ({} KiB) + {} ({} MiB) in {:.1} s: inputs input_ids [1, seq], past_key.N / past_value.N \
         [1, {}, past, {}] ({} layers), num_logits [1]{}; outputs logits, present_key.N / present_value.N",
        report.model_path.display(),
        report.model_bytes >> 10,
        report.data_path.display(),
        report.data_bytes >> 20,
        start.elapsed().as_secs_f64(),
        report.info.n_head_kv,
        report.info.head_dim,
        report.info.n_layer,
        if args.lora_rank > 0 {
            format!(", blk.N.<proj>.lora_a / lora_b (rank {})", args.lora_rank)
        } else {
            String::new()
        }
    );
    Ok(())
}
