//! `model.onnx` + `model.onnx.data` for any ONNX Runtime (Python included).

use std::path::{Path, PathBuf};

use graft_runtime::model::Model;

use crate::graph::{build_graph, GraphInfo, GraphOptions, DATA_FILE};
use crate::OrtError;

/// What [`export_model`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub model_path: PathBuf,
    pub data_path: PathBuf,
    pub model_bytes: usize,
    pub data_bytes: usize,
    pub info: GraphInfo,
}

/// Writes the graph of `model` into `dir` (created if missing).
pub fn export_model(
    model: &Model,
    opts: &GraphOptions,
    dir: &Path,
) -> Result<ExportReport, OrtError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| OrtError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let graph = build_graph(model, opts)?;
    let bytes = graph.model.encode();
    let model_path = dir.join("model.onnx");
    let data_path = dir.join(DATA_FILE);
    // Data first: a model.onnx without its data is never left behind.
    std::fs::write(&data_path, &graph.data).map_err(io(&data_path))?;
    std::fs::write(&model_path, &bytes).map_err(io(&model_path))?;
    Ok(ExportReport {
        model_path,
        data_path,
        model_bytes: bytes.len(),
        data_bytes: graph.data.len(),
        info: graph.info,
    })
}
