//! `graft quantize`.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use graft_runtime::quantize::{quantize_model, FileType, QuantizeOptions};
use indicatif::{ProgressBar, ProgressStyle};

pub fn run(
    input: &Path,
    output: &Path,
    ty: &str,
    pure: bool,
    threads: Option<usize>,
) -> Result<()> {
    let ftype = FileType::from_name(ty).ok_or_else(|| {
        let names: Vec<&str> = FileType::ALL.iter().map(|f| f.name()).collect();
        anyhow!(
            "--type {ty}: unknown recipe, expected one of {}",
            names.join(", ")
        )
    })?;
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    let start = Instant::now();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let report = quantize_model(input, output, QuantizeOptions { ftype, pure }, |t| {
        bar.set_length(t.count as u64);
        bar.set_position(t.index as u64 + 1);
        bar.set_message(format!("{} {} -> {}", t.name, t.from, t.to));
        tracing::debug!(tensor = %t.name, from = %t.from, to = %t.to, bytes = t.bytes_out, "quantized");
    })?;
    bar.finish_and_clear();
    eprintln!(
        "{} -> {} ({}): {} tensors, {:.2} MiB -> {:.2} MiB in {:.2} s",
        input.display(),
        output.display(),
        ftype,
        report.tensors,
        report.bytes_in as f64 / 1048576.0,
        report.bytes_out as f64 / 1048576.0,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
