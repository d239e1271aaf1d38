//! `graft merge-adapters`: several adapters combined into one sparse delta (SaRA file).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Result};
use clap::{Args, ValueEnum};
use graft_adapters::combine::{combine, CombineMethod, DareMerge, DareRescale};
use graft_adapters::sara::{self, SaraMeta};

use crate::common::{load_adapters, load_model, ModelArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Weighted sum of the deltas.
    Linear,
    /// TIES: trim each delta to --density, elect signs, disjoint mean.
    Ties,
    /// DARE: drop entries at --drop-rate, rescale survivors, sum.
    Dare,
    /// DARE drop and rescale, then TIES sign election and disjoint mean.
    DareTies,
    /// PCB-merging: intra/inter-task balancing, drop --drop-ratio, rescale.
    Pcb,
}

#[derive(Args, Debug)]
pub struct MergeAdaptersArgs {
    /// Base model the adapters belong to (validates them; its weights are not changed).
    /// Each --adapter PATH[:WEIGHT] is one task; WEIGHT multiplies its delta.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output SaRA sparse-delta file (.safetensors), loadable with --adapter.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Method::Ties)]
    pub method: Method,
    /// TIES: fraction of each delta's entries kept (largest magnitudes).
    #[arg(long, default_value_t = 0.2)]
    pub density: f32,
    /// DARE: probability of dropping each entry.
    #[arg(long, default_value_t = 0.9)]
    pub drop_rate: f32,
    /// DAREx-q: rescale survivors by 1/Q instead of 1/(1 - drop rate).
    #[arg(long, value_name = "Q")]
    pub darex_q: Option<f32>,
    /// DARE: seed of the drop mask (same seed, same result).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// PCB: fraction of each delta's entries dropped (lowest balanced scores).
    #[arg(long, default_value_t = 0.1)]
    pub drop_ratio: f32,
}

fn method(args: &MergeAdaptersArgs) -> CombineMethod {
    let rescale = match args.darex_q {
        Some(q) => DareRescale::DarexQ(q),
        None => DareRescale::Standard,
    };
    let dare = |merge| CombineMethod::Dare {
        drop_rate: args.drop_rate,
        seed: args.seed,
        rescale,
        merge,
    };
    match args.method {
        Method::Linear => CombineMethod::Linear,
        Method::Ties => CombineMethod::Ties {
            density: args.density,
        },
        Method::Dare => dare(DareMerge::Linear),
        Method::DareTies => dare(DareMerge::Ties),
        Method::Pcb => CombineMethod::Pcb {
            drop_ratio: args.drop_ratio,
        },
    }
}

pub fn run(args: &MergeAdaptersArgs) -> Result<()> {
    if args.model.adapter.len() < 2 {
        return Err(anyhow!(
            "give at least two --adapter PATH[:WEIGHT] to merge into one"
        ));
    }
    let method = method(args);
    method.validate()?;
    crate::common::init_threads(args.model.threads)?;
    let start = Instant::now();
    let model = load_model(&args.model)?;
    let stack =
        load_adapters(&args.model, &model)?.ok_or_else(|| anyhow!("no adapters to merge"))?;
    let inputs: Vec<_> = stack.layers.iter().map(|(a, w)| (&**a, *w)).collect();
    let merged = combine(&inputs, &method, &model.config)?;
    sara::save(&merged, &SaraMeta::new(model.config.arch), &args.out)?;
    let nnz: usize = merged
        .iter()
        .map(|(_, _, d)| match d {
            graft_adapters::TensorDelta::Sparse(s) => s.values.len(),
            graft_adapters::TensorDelta::Lora(_) | graft_adapters::TensorDelta::Dense(_) => 0,
        })
        .sum();
    eprintln!(
        "{} adapters -> {} ({:?}): {} tensors, {} nonzero entries, {:.2} MiB in {:.2} s",
        inputs.len(),
        args.out.display(),
        args.method,
        merged.len(),
        nnz,
        merged.bytes() as f64 / 1048576.0,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
