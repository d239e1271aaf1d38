//! `graft demo`: the default model and its demo adapters hot-swapped in one process:
//! for held-out prompts of every adapter's task, the base's answer and the adapter's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use graft_adapters::train::data::{encode_record, Record};
use graft_adapters::train::tasks::{generate, Task};
use graft_adapters::{load_adapter, LinearDelta, Registry, RegistryLimits};
use graft_runtime::generate::{generate_adapted, GenerateParams};
use graft_runtime::model::Model;
use graft_runtime::sampling::SamplingParams;
use graft_runtime::tokenizer::Tokenizer;

use crate::common::init_threads;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The base model.
    #[arg(long, short = 'm', default_value = "models/graft-default.gguf")]
    pub model: PathBuf,
    /// Directory of adapters named after their task (reverse.gguf, upper.gguf, ...).
    #[arg(long, default_value = "models/adapters")]
    pub adapters: PathBuf,
    /// Prompts per task.
    #[arg(long, short = 'n', default_value_t = 2)]
    pub samples: usize,
    /// Seed of the prompts (the adapters were trained on seed 7's).
    #[arg(long, default_value_t = 2026)]
    pub seed: u64,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
}

fn answer(
    model: &Model,
    tok: &Tokenizer,
    r: &Record,
    delta: Option<&dyn LinearDelta>,
) -> Result<String> {
    let (prompt, completion) = encode_record(tok, r);
    let params = GenerateParams {
        max_tokens: completion.len() + 4,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(
        generate_adapted(model, tok, &prompt, &params, delta, |_| true)?
            .text
            .trim()
            .to_owned(),
    )
}

pub fn run(args: &DemoArgs) -> Result<()> {
    init_threads(args.threads)?;
    let model = Model::load(&args.model, None)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let tok = match &model.gguf {
        Some(g) => Tokenizer::from_gguf(g)?,
        None => bail!(
            "{}: the demo needs a GGUF model with its tokenizer",
            args.model.display()
        ),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.adapters)
        .with_context(|| format!("reading {}", args.adapters.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() || p.is_dir())
        .collect();
    files.sort();
    let registry = Registry::new(RegistryLimits::unlimited());
    let mut tasks = Vec::new();
    for f in &files {
        let Some(name) = f.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let Some(task) = Task::from_name(name) else {
            continue;
        };
        let t0 = Instant::now();
        let adapter =
            load_adapter(f, &model).with_context(|| format!("loading {}", f.display()))?;
        registry.insert(name, Arc::new(adapter))?;
        println!(
            "loaded adapter {name} ({}) in {:.2} ms",
            f.display(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        tasks.push((name.to_owned(), task));
    }
    if tasks.is_empty() {
        bail!(
            "{}: no adapters named after a task (reverse, upper, recall, add)",
            args.adapters.display()
        );
    }
    // The base's own task first, then every adapter's.
    println!("\n== copy (the base model's own task)");
    for r in generate(Task::Copy, args.samples, args.seed) {
        println!(
            "  {}\n    base: {}",
            r.prompt,
            answer(&model, &tok, &r, None)?
        );
    }
    let (mut hits, mut total) = (0, 0);
    for (name, task) in &tasks {
        println!("\n== {name}");
        let handle = registry
            .get(name)
            .with_context(|| format!("adapter {name} vanished"))?;
        for r in generate(*task, args.samples, args.seed) {
            let base = answer(&model, &tok, &r, None)?;
            let adapted = answer(&model, &tok, &r, Some(&*handle.adapter))?;
            let ok = adapted == r.completion.trim();
            hits += ok as usize;
            total += 1;
            println!(
                "  {}\n    base: {base}\n    {name}: {adapted}  {}",
                r.prompt,
                if ok {
                    "(correct)".to_owned()
                } else {
                    format!("(expected: {})", r.completion)
                }
            );
        }
    }
    println!("\n{hits}/{total} adapter answers correct; base and adapters served from one process");
    Ok(())
}
