//! `graft gen-data` and `graft init-model`: the deterministic corpus and the randomly
//! initialised model graft pretrains its default model from.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use graft_adapters::train::init::{train_vocab, write_init_model, InitConfig};
use graft_adapters::train::tasks::{self, Task};

#[derive(Args, Debug)]
pub struct GenDataArgs {
    /// Task: base (text + copy, the pretraining mix), text, copy, reverse, upper, recall, add.
    #[arg(long)]
    pub task: String,
    /// Number of records (for base: text records; copy records are a quarter of it).
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output .jsonl file.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

pub fn gen_data(args: &GenDataArgs) -> Result<()> {
    let records = match args.task.as_str() {
        "base" => tasks::base_corpus(args.n, args.n / 4, args.seed),
        name => {
            let task = Task::from_name(name).ok_or_else(|| {
                anyhow!("unknown task {name:?}: expected base, text, copy, reverse, upper, recall or add")
            })?;
            tasks::generate(task, args.n, args.seed)
        }
    };
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for r in &records {
        writeln!(w, "{}", tasks::to_jsonl(r))?;
    }
    w.flush()?;
    eprintln!("{} records -> {}", records.len(), args.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct InitModelArgs {
    /// Output .gguf file.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Vocabulary size (BPE merges learned from the generated corpus).
    #[arg(long, default_value_t = 768)]
    pub vocab: usize,
    #[arg(long, default_value_t = 128)]
    pub n_embd: usize,
    #[arg(long, default_value_t = 4)]
    pub n_layer: usize,
    #[arg(long, default_value_t = 4)]
    pub n_head: usize,
    #[arg(long, default_value_t = 2)]
    pub n_head_kv: usize,
    #[arg(long, default_value_t = 384)]
    pub n_ff: usize,
    #[arg(long, default_value_t = 256)]
    pub n_ctx: usize,
    /// Model name written to general.name.
    #[arg(long, default_value = "graft-default")]
    pub name: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn init_model(args: &InitModelArgs) -> Result<()> {
    let corpus = tasks::tokenizer_corpus(args.seed);
    let vocab = train_vocab(&corpus, args.vocab);
    let config = InitConfig {
        n_embd: args.n_embd,
        n_layer: args.n_layer,
        n_head: args.n_head,
        n_head_kv: args.n_head_kv,
        n_ff: args.n_ff,
        n_ctx: args.n_ctx,
        rope_base: 10000.0,
    };
    write_init_model(&config, &vocab, &args.name, args.seed, &args.out)?;
    eprintln!(
        "{}: vocabulary of {} tokens, {} layers x {} dims",
        args.out.display(),
        vocab.tokens.len(),
        args.n_layer,
        args.n_embd
    );
    Ok(())
}
