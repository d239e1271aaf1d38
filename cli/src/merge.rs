//! `graft merge`: adapters merged into a base model, written as a new GGUF file.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Result};
use clap::Args;
use graft_adapters::{merge_to_gguf, OutType};
use graft_quant::GgmlType;
use graft_runtime::quantize::FileType;

use crate::common::{load_adapters, load_model, ModelArgs};

#[derive(Args, Debug)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Destination .gguf file (never the base itself).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Type of the merged tensors: a GGML type (Q8_0, F16, ...) or a recipe name (its
    /// main type, e.g. Q4_K_M -> Q4_K). Default: each tensor keeps the base's type
    /// (quantized bases are dequantized, merged and requantized). Tensors no adapter
    /// touches are copied unchanged; run `graft quantize` on the result for a full recipe.
    #[arg(long = "type", short = 't')]
    pub ty: Option<String>,
}

fn out_type(name: Option<&str>) -> Result<OutType> {
    let Some(name) = name else {
        return Ok(OutType::Keep);
    };
    if let Some(t) = GgmlType::from_name(name) {
        return Ok(OutType::Type(t));
    }
    FileType::from_name(name)
        .map(OutType::from)
        .ok_or_else(|| anyhow!("--type {name}: not a GGML type or a quantization recipe"))
}

pub fn run(args: &MergeArgs) -> Result<()> {
    if args.model.adapter.is_empty() {
        return Err(anyhow!("give at least one --adapter PATH[:SCALE] to merge"));
    }
    let out_type = out_type(args.ty.as_deref())?;
    crate::common::init_threads(args.model.threads)?;
    let start = Instant::now();
    // The model is loaded (zero-copy) so every adapter is validated against it first.
    let model = load_model(&args.model)?;
    let stack =
        load_adapters(&args.model, &model)?.ok_or_else(|| anyhow!("no adapters to merge"))?;
    drop(model);
    let report = merge_to_gguf(&args.model.model, &stack, out_type, &args.out)?;
    for t in report.fallbacks() {
        eprintln!(
            "warning: {} kept type {}: its rows do not fit the requested type's blocks",
            t.name, t.from
        );
    }
    eprintln!(
        "{} + {} adapter(s) -> {}: {} tensors merged, {} copied, {:.2} MiB in {:.2} s",
        args.model.model.display(),
        stack.layers.len(),
        args.out.display(),
        report.merged.len(),
        report.copied,
        report.bytes_written as f64 / 1048576.0,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
