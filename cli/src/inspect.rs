//! `graft inspect`: what a model or adapter file holds.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use graft_runtime::gguf::{GgufArray, GgufFile, GgufValue};
use graft_runtime::safetensors::SafetensorsModel;
use serde_json::{json, Value};

/// One row of the tensor table, whatever the file format.
struct TensorRow {
    name: String,
    ty: String,
    /// Outermost dimension first (PyTorch order), as people read shapes.
    shape: Vec<u64>,
    bytes: u64,
}

struct Report {
    path: String,
    format: String,
    summary: Vec<(String, String)>,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorRow>,
}

pub fn run(path: &Path, as_json: bool) -> Result<()> {
    let report = if path.is_dir() {
        inspect_dir(path)?
    } else if is_gguf(path)? {
        inspect_gguf(path)?
    } else {
        inspect_safetensors(path, "safetensors", Vec::new())?
    };
    let text = if as_json {
        serde_json::to_string_pretty(&to_json(&report))? + "\n"
    } else {
        render_text(&report)
    };
    crate::write_stdout(&text)
}

/// A `.gguf` name or the GGUF magic sends the file to the GGUF reader (whose errors
/// then explain what is wrong with it).
fn is_gguf(path: &Path) -> Result<bool> {
    std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    Ok(path.extension().is_some_and(|e| e == "gguf") || graft_runtime::gguf::has_gguf_magic(path))
}

fn inspect_gguf(path: &Path) -> Result<Report> {
    let file = GgufFile::open(path)?;
    let mut summary = vec![
        ("format".into(), format!("GGUF v{}", file.version())),
        ("alignment".into(), file.alignment().to_string()),
    ];
    let kind = file
        .get_str_opt("general.type")?
        .unwrap_or("model")
        .to_owned();
    summary.push(("type".into(), kind.clone()));
    if let Ok(arch) = file.architecture() {
        summary.push(("architecture".into(), arch.to_owned()));
        for key in [
            "context_length",
            "embedding_length",
            "block_count",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "rope.dimension_count",
            "rope.freq_base",
            "attention.layer_norm_rms_epsilon",
            "vocab_size",
        ] {
            if let Some(v) = file.get(&format!("{arch}.{key}")) {
                summary.push((key.to_owned(), v.to_string()));
            }
        }
    }
    if let Some(ft) = file.get_u32_opt("general.file_type")? {
        let name = graft_runtime::quantize::FileType::from_id(ft)
            .map(|f| f.name().to_owned())
            .unwrap_or_else(|| "unknown".into());
        summary.push(("file_type".into(), format!("{name} ({ft})")));
    }
    if kind == "adapter" {
        if let Some(t) = file.get_str_opt("adapter.type")? {
            summary.push(("adapter.type".into(), t.to_owned()));
        }
        if let Some(a) = file.get_f32_opt("adapter.lora.alpha")? {
            summary.push(("adapter.lora.alpha".into(), a.to_string()));
        }
    }
    if let Some(model) = file.get_str_opt("tokenizer.ggml.model")? {
        let n = file
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .map_or(0, GgufArray::len);
        summary.push(("tokenizer".into(), format!("{model}, {n} tokens")));
    }
    let metadata = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), value_json(v)))
        .collect();
    let tensors = file
        .tensors()
        .iter()
        .map(|t| TensorRow {
            name: t.name.clone(),
            ty: t.ty.name().to_owned(),
            shape: t.dims.iter().rev().copied().collect(),
            bytes: t.n_bytes as u64,
        })
        .collect();
    Ok(Report {
        path: path.display().to_string(),
        format: "gguf".into(),
        summary,
        metadata,
        tensors,
    })
}

fn inspect_dir(dir: &Path) -> Result<Report> {
    let adapter_config = dir.join("adapter_config.json");
    if adapter_config.is_file() {
        let text = std::fs::read_to_string(&adapter_config)
            .with_context(|| format!("{}: cannot read", adapter_config.display()))?;
        let cfg: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", adapter_config.display()))?;
        let mut summary = Vec::new();
        for key in [
            "peft_type",
            "r",
            "lora_alpha",
            "use_rslora",
            "use_dora",
            "target_modules",
        ] {
            if let Some(v) = cfg.get(key) {
                summary.push((key.to_owned(), v.to_string()));
            }
        }
        let weights = dir.join("adapter_model.safetensors");
        return inspect_safetensors(&weights, "peft", summary).map(|mut r| {
            r.path = dir.display().to_string();
            r
        });
    }
    let config = dir.join("config.json");
    let mut summary = Vec::new();
    if config.is_file() {
        let cfg = graft_runtime::hf_config::HfConfig::load(&config)?;
        summary.push(("architecture".into(), cfg.model_type.name().to_owned()));
        summary.push(("embedding_length".into(), cfg.hidden_size.to_string()));
        summary.push(("block_count".into(), cfg.num_hidden_layers.to_string()));
        summary.push((
            "feed_forward_length".into(),
            cfg.intermediate_size.to_string(),
        ));
        summary.push((
            "attention.head_count".into(),
            cfg.num_attention_heads.to_string(),
        ));
        summary.push((
            "attention.head_count_kv".into(),
            cfg.num_key_value_heads.to_string(),
        ));
        summary.push(("rope.freq_base".into(), cfg.rope_theta.to_string()));
        summary.push(("vocab_size".into(), cfg.vocab_size.to_string()));
        summary.push((
            "tie_word_embeddings".into(),
            cfg.tie_word_embeddings.to_string(),
        ));
    }
    inspect_safetensors(dir, "hf-checkpoint", summary).map(|mut r| {
        r.path = dir.display().to_string();
        r
    })
}

fn inspect_safetensors(
    path: &Path,
    format: &str,
    summary: Vec<(String, String)>,
) -> Result<Report> {
    let model = SafetensorsModel::open(path)?;
    let mut tensors = Vec::with_capacity(model.len());
    for name in model.tensor_names() {
        let info = model.tensor_info(name)?;
        let elems: u64 = info.shape.iter().map(|&d| d as u64).product();
        let bytes = elems * dtype_size(info.dtype);
        tensors.push(TensorRow {
            name: name.clone(),
            ty: info.dtype.to_owned(),
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            bytes,
        });
    }
    Ok(Report {
        path: path.display().to_string(),
        format: format.into(),
        summary,
        metadata: Vec::new(),
        tensors,
    })
}

fn dtype_size(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

/// Metadata as JSON, with long arrays (vocabularies) summarised.
fn value_json(v: &GgufValue) -> Value {
    const SHOWN: usize = 8;
    match v {
        GgufValue::Array(a) if a.len() > SHOWN => json!({
            "array": a.elem_type().name(),
            "len": a.len(),
        }),
        GgufValue::String(s) if s.len() > 200 => {
            json!(format!("{}… ({} bytes)", truncate(s, 200), s.len()))
        }
        GgufValue::Array(a) => Value::Array(
            (0..a.len())
                .filter_map(|i| a.get(i))
                .map(|v| value_json(&v))
                .collect(),
        ),
        GgufValue::U8(x) => json!(x),
        GgufValue::I8(x) => json!(x),
        GgufValue::U16(x) => json!(x),
        GgufValue::I16(x) => json!(x),
        GgufValue::U32(x) => json!(x),
        GgufValue::I32(x) => json!(x),
        GgufValue::U64(x) => json!(x),
        GgufValue::I64(x) => json!(x),
        GgufValue::F32(x) => json!(x),
        GgufValue::F64(x) => json!(x),
        GgufValue::Bool(x) => json!(x),
        GgufValue::String(x) => json!(x),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn totals(report: &Report) -> (u64, u64, BTreeMap<String, usize>) {
    let mut params = 0u64;
    let mut bytes = 0u64;
    let mut by_type = BTreeMap::new();
    for t in &report.tensors {
        params += t.shape.iter().product::<u64>();
        bytes += t.bytes;
        *by_type.entry(t.ty.clone()).or_insert(0) += 1;
    }
    (params, bytes, by_type)
}

fn to_json(report: &Report) -> Value {
    let (params, bytes, by_type) = totals(report);
    json!({
        "path": report.path,
        "format": report.format,
        "summary": report.summary.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "metadata": report.metadata.iter().cloned().collect::<serde_json::Map<String, Value>>(),
        "tensors": report.tensors.iter().map(|t| json!({
            "name": t.name, "type": t.ty, "shape": t.shape, "bytes": t.bytes,
        })).collect::<Vec<_>>(),
        "totals": {
            "tensors": report.tensors.len(),
            "parameters": params,
            "bytes": bytes,
            "bits_per_weight": if params > 0 { bytes as f64 * 8.0 / params as f64 } else { 0.0 },
            "tensors_by_type": by_type,
        },
    })
}

fn render_text(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}  [{}]", report.path, report.format);
    for (k, v) in &report.summary {
        let _ = writeln!(out, "  {k:<34} {v}");
    }
    if !report.metadata.is_empty() {
        let _ = writeln!(out, "metadata ({} keys)", report.metadata.len());
        for (k, v) in &report.metadata {
            let _ = writeln!(out, "  {k:<34} {v}");
        }
    }
    let width = report
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(out, "tensors ({})", report.tensors.len());
    let _ = writeln!(
        out,
        "  {:<width$}  {:<5}  {:<18}  {:>12}",
        "name", "type", "shape", "bytes"
    );
    for t in &report.tensors {
        let shape = format!("{:?}", t.shape);
        let _ = writeln!(
            out,
            "  {:<width$}  {:<5}  {:<18}  {:>12}",
            t.name, t.ty, shape, t.bytes
        );
    }
    let (params, bytes, by_type) = totals(report);
    let types: Vec<String> = by_type.iter().map(|(t, n)| format!("{t}: {n}")).collect();
    let _ = writeln!(
        out,
        "total: {} tensors, {} parameters, {} bytes ({:.2} MiB, {:.3} bits/weight); {}",
        report.tensors.len(),
        params,
        bytes,
        bytes as f64 / (1024.0 * 1024.0),
        if params > 0 {
            bytes as f64 * 8.0 / params as f64
        } else {
            0.0
        },
        types.join(", ")
    );
    out
}
