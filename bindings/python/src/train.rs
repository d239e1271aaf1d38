//! `graft.train`: one training run through `graft_adapters::train::job::run`, the call
//! `graft train` makes, so the defaults, formats and reports are the same.

use std::path::PathBuf;
use std::sync::LazyLock;

use graft_adapters::rps::Scaler;
use graft_adapters::train::data::Record;
use graft_adapters::train::job::{
    self, Control, JobReport, JobSpec, MethodKind, OutputFormat, Progress, RpsMode, TrainData,
};
use graft_adapters::train::TrainError;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyMapping, PySequence, PyString};

use crate::{error_text, GraftError, PyModel};

pyo3::create_exception!(
    graft,
    TrainCancelled,
    GraftError,
    "Training stopped because the progress callback returned True; `step` is the last \
     finished step. No result was written (a checkpoint was, if one was asked for)."
);

/// `graft train`'s defaults: the keyword defaults of `train` are read from here.
static DEFAULTS: LazyLock<JobSpec> = LazyLock::new(JobSpec::default);

const METHODS: [(&str, MethodKind); 4] = [
    ("lora", MethodKind::Lora),
    ("full", MethodKind::Full),
    ("sara", MethodKind::Sara),
    ("rps", MethodKind::Rps),
];
const FORMATS: [(&str, OutputFormat); 4] = [
    ("gguf", OutputFormat::Gguf),
    ("peft", OutputFormat::Peft),
    ("sara", OutputFormat::Sara),
    ("rps", OutputFormat::Rps),
];
const RPS_MODES: [(&str, RpsMode); 2] = [("lora", RpsMode::Lora), ("delta", RpsMode::Delta)];

fn name_of<T: PartialEq + Copy>(table: &[(&'static str, T)], v: T) -> &'static str {
    table.iter().find(|(_, t)| *t == v).map_or("?", |(n, _)| n)
}

/// `v` looked up in `table`, or a ValueError naming the allowed values.
fn parse_name<T: Copy>(what: &str, table: &[(&str, T)], v: &str) -> PyResult<T> {
    table
        .iter()
        .find(|(n, _)| *n == v)
        .map(|(_, t)| *t)
        .ok_or_else(|| bad_name(what, v, table.iter().map(|(n, _)| *n)))
}

fn bad_name<'a>(what: &str, v: &str, allowed: impl Iterator<Item = &'a str>) -> PyErr {
    let allowed: Vec<String> = allowed.map(|n| format!("{n:?}")).collect();
    PyValueError::new_err(format!(
        "{what}={v:?}: expected one of {}",
        allowed.join(", ")
    ))
}

fn parse_scaler(v: &str) -> PyResult<Scaler> {
    Scaler::from_name(v).ok_or_else(|| bad_name("scaler", v, Scaler::ALL.iter().map(|s| s.name())))
}

/// `data` / `text=` as the job's data: a path (str or os.PathLike) is a file, a
/// sequence of dicts is records, `text=` is plain text.
fn train_data(data: Option<&Bound<'_, PyAny>>, text: Option<String>) -> PyResult<TrainData> {
    let data = data.filter(|d| !d.is_none());
    match (data, text) {
        (Some(_), Some(_)) => Err(PyTypeError::new_err(
            "give data or text=, not both",
        )),
        (None, None) => Err(PyTypeError::new_err(
            "train needs data (a file path or a list of {\"prompt\", \"completion\"} dicts) or text=",
        )),
        (None, Some(t)) => Ok(TrainData::Text(t)),
        (Some(d), None) => {
            if d.is_instance_of::<PyString>() || d.hasattr("__fspath__")? {
                return Ok(TrainData::File(d.extract::<PathBuf>()?));
            }
            let bad = || {
                PyTypeError::new_err(
                    "data must be a path (str or os.PathLike) or a list of {\"prompt\", \"completion\"} dicts",
                )
            };
            let seq = d.cast::<PySequence>().map_err(|_| bad())?;
            let records = seq
                .try_iter()?
                .enumerate()
                .map(|(i, item)| record(i, &item?))
                .collect::<PyResult<Vec<_>>>()?;
            if records.is_empty() {
                return Err(PyValueError::new_err("data: the list of records is empty"));
            }
            Ok(TrainData::Records(records))
        }
    }
}

/// One record: {"prompt", "completion"}, or {"text"} (loss on all of it), as a line
/// of a .jsonl file.
fn record(i: usize, item: &Bound<'_, PyAny>) -> PyResult<Record> {
    let map = item.cast::<PyMapping>().map_err(|_| {
        PyTypeError::new_err(format!(
            "data[{i}]: expected a dict with \"prompt\" and \"completion\", got {}",
            item.get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string())
        ))
    })?;
    let field = |k: &str| -> PyResult<Option<String>> {
        if !map.contains(k)? {
            return Ok(None);
        }
        map.get_item(k)?
            .extract::<String>()
            .map(Some)
            .map_err(|_| PyTypeError::new_err(format!("data[{i}][{k:?}]: expected a str")))
    };
    match (field("prompt")?, field("completion")?, field("text")?) {
        (Some(prompt), Some(completion), _) => Ok(Record { prompt, completion }),
        (None, None, Some(text)) => Ok(Record {
            prompt: String::new(),
            completion: text,
        }),
        (_, None, _) => Err(PyValueError::new_err(format!(
            "data[{i}]: \"completion\" is missing (expected {{\"prompt\": .., \"completion\": ..}} or {{\"text\": ..}})"
        ))),
        (None, Some(_), _) => Err(PyValueError::new_err(format!(
            "data[{i}]: \"prompt\" is missing (expected {{\"prompt\": .., \"completion\": ..}} or {{\"text\": ..}})"
        ))),
    }
}

/// One progress event of `train`, given to its `progress` callback.
#[pyclass(frozen, module = "graft", get_all)]
#[derive(Clone, Default)]
pub struct TrainProgress {
    /// "started", "step", "eval" or "finishing".
    kind: &'static str,
    /// Steps finished (at "started": where training starts, non-zero on resume).
    step: usize,
    /// Steps in all.
    steps: usize,
    /// "step": this step's mean loss per target token; "eval": the last step's.
    loss: Option<f64>,
    /// "eval": loss on the held-out examples.
    eval_loss: Option<f64>,
    /// "step": learning rate of the step.
    lr: Option<f32>,
    /// "step": gradient norm before clipping.
    grad_norm: Option<f32>,
    /// "step": tokens the step ran through.
    tokens: Option<usize>,
    /// "step": tokens per second since training started.
    tokens_per_s: Option<f64>,
    /// "started": the method's name.
    method: Option<&'static str>,
    /// "started": trainable parameters.
    trainable_params: Option<usize>,
    /// "started": training examples.
    train_examples: Option<usize>,
    /// "started": held-out examples.
    eval_examples: Option<usize>,
}

impl TrainProgress {
    /// `last_step`: the last step seen and `total` the steps asked for ("eval" and
    /// "finishing" do not carry them).
    fn new(p: &Progress, last_step: usize, total: usize) -> Self {
        match *p {
            Progress::Started {
                method,
                trainable_params,
                train_examples,
                eval_examples,
                step,
                steps,
            } => TrainProgress {
                kind: "started",
                step,
                steps,
                method: Some(method),
                trainable_params: Some(trainable_params),
                train_examples: Some(train_examples),
                eval_examples: Some(eval_examples),
                ..Default::default()
            },
            Progress::Step {
                stats,
                steps,
                tokens_per_s,
            } => TrainProgress {
                kind: "step",
                step: stats.step,
                steps,
                loss: Some(stats.loss),
                lr: Some(stats.lr),
                grad_norm: Some(stats.grad_norm),
                tokens: Some(stats.tokens),
                tokens_per_s: Some(tokens_per_s),
                ..Default::default()
            },
            Progress::Eval {
                step,
                train_loss,
                eval_loss,
            } => TrainProgress {
                kind: "eval",
                step,
                steps: total,
                loss: Some(train_loss),
                eval_loss: Some(eval_loss),
                ..Default::default()
            },
            Progress::Finishing => TrainProgress {
                kind: "finishing",
                step: last_step,
                steps: total,
                ..Default::default()
            },
        }
    }
}

#[pymethods]
impl TrainProgress {
    fn __repr__(&self) -> String {
        let mut s = format!(
            "TrainProgress(kind={:?}, step={}, steps={}",
            self.kind, self.step, self.steps
        );
        let mut opt = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                s.push_str(&format!(", {k}={v}"));
            }
        };
        opt("loss", self.loss.map(|v| format!("{v:.4}")));
        opt("eval_loss", self.eval_loss.map(|v| format!("{v:.4}")));
        opt("lr", self.lr.map(|v| format!("{v:.3e}")));
        opt("grad_norm", self.grad_norm.map(|v| format!("{v:.4}")));
        opt("tokens", self.tokens.map(|v| v.to_string()));
        opt("tokens_per_s", self.tokens_per_s.map(|v| format!("{v:.1}")));
        opt("method", self.method.map(|v| format!("{v:?}")));
        opt(
            "trainable_params",
            self.trainable_params.map(|v| v.to_string()),
        );
        opt("train_examples", self.train_examples.map(|v| v.to_string()));
        opt("eval_examples", self.eval_examples.map(|v| v.to_string()));
        s + ")"
    }
}

/// The outcome of `train`: the fields of `graft train`'s JSON report.
#[pyclass(frozen, module = "graft", get_all)]
pub struct TrainReport {
    /// "lora", "full", "sara" or "rps".
    method: &'static str,
    /// Optimizer steps run (resumed ones included).
    steps: usize,
    trainable_params: usize,
    /// Loss of the last step.
    train_loss: f64,
    /// Loss on the held-out examples at the end (NaN without any).
    eval_loss: f64,
    /// Exact match of greedy completions on held-out records (None without records).
    eval_exact_match: Option<f64>,
    /// Held-out records the exact match ran on.
    eval_records: usize,
    /// Exact match on `retention_data` with the result active (None without it).
    retention_exact_match: Option<f64>,
    /// Seconds in the training loop.
    train_seconds: f64,
    tokens_per_s: f64,
    /// The written file or directory.
    out: String,
    /// Its size in bytes.
    out_bytes: u64,
}

impl From<JobReport> for TrainReport {
    fn from(r: JobReport) -> Self {
        TrainReport {
            method: r.method,
            steps: r.steps,
            trainable_params: r.trainable_params,
            train_loss: r.train_loss,
            eval_loss: r.eval_loss,
            eval_exact_match: r.eval_exact_match,
            eval_records: r.eval_records,
            retention_exact_match: r.retention_exact_match,
            train_seconds: r.train_seconds,
            tokens_per_s: r.tokens_per_s,
            out: r.out.display().to_string(),
            out_bytes: r.out_bytes,
        }
    }
}

#[pymethods]
impl TrainReport {
    fn __repr__(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("None".to_owned(), |v| format!("{v:.4}"));
        format!(
            "TrainReport(method={:?}, steps={}, trainable_params={}, train_loss={:.4}, \
             eval_loss={:.4}, eval_exact_match={}, eval_records={}, retention_exact_match={}, \
             train_seconds={:.2}, tokens_per_s={:.1}, out={:?}, out_bytes={})",
            self.method,
            self.steps,
            self.trainable_params,
            self.train_loss,
            self.eval_loss,
            opt(self.eval_exact_match),
            self.eval_records,
            opt(self.retention_exact_match),
            self.train_seconds,
            self.tokens_per_s,
            self.out,
            self.out_bytes
        )
    }
}

/// An f32 option as the Python float of its shortest decimal form (0.002, not
/// 0.0020000000949949026), as it would be written.
fn py_f32(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// The keyword defaults of `train` (those of `graft train`), by name.
#[pyfunction]
pub fn train_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = &*DEFAULTS;
    let out = PyDict::new(py);
    out.set_item("text", None::<String>)?;
    out.set_item("method", name_of(&METHODS, d.method))?;
    out.set_item("format", d.format.map(|f| name_of(&FORMATS, f)))?;
    out.set_item("rank", d.rank)?;
    out.set_item("alpha", py_f32(d.alpha))?;
    out.set_item("rslora", d.rslora)?;
    out.set_item("targets", &d.targets)?;
    out.set_item("steps", d.steps)?;
    out.set_item("lr", d.lr.map(py_f32))?;
    out.set_item("theta", py_f32(d.theta))?;
    out.set_item("lambda_rank", py_f32(d.lambda_rank))?;
    out.set_item("progressive", d.progressive)?;
    out.set_item("rps_mode", name_of(&RPS_MODES, d.rps_mode))?;
    out.set_item("rho", d.rho)?;
    out.set_item("budget", d.budget)?;
    out.set_item("scaler", d.scaler.name())?;
    out.set_item("rps_seed", d.rps_seed)?;
    out.set_item("batch", d.batch)?;
    out.set_item("accum", d.accum)?;
    out.set_item("warmup", d.warmup)?;
    out.set_item("clip", py_f32(d.clip))?;
    out.set_item("weight_decay", py_f32(d.weight_decay))?;
    out.set_item("seed", d.seed)?;
    out.set_item("max_len", d.max_len)?;
    out.set_item("eval_frac", d.eval_frac)?;
    out.set_item("eval_every", d.eval_every)?;
    out.set_item("eval_max", d.eval_max)?;
    out.set_item("retention_data", d.retention_data.clone())?;
    out.set_item("recompute", d.recompute)?;
    out.set_item("checkpoint", d.checkpoint.clone())?;
    out.set_item("checkpoint_every", d.checkpoint_every)?;
    out.set_item("resume", d.resume.clone())?;
    out.set_item("progress", None::<Py<PyAny>>)?;
    Ok(out)
}

/// Trains an adapter (or, with method="full", the whole model) on `model` and writes
/// it to `out`, as `graft train` does; returns a `TrainReport`. The keyword options and
/// their defaults are `graft train`'s (see `graft train --help` and
/// `train_defaults()`).
///
/// data: a path (str or os.PathLike) to a .jsonl file of {"prompt", "completion"}
/// records or a plain text file, or a list of {"prompt", "completion"} dicts (a
/// {"text": ..} dict trains on all of its text). For text given as a str, pass
/// data=None and text=...: a str in `data` is always a path.
///
/// progress: called with a `TrainProgress` at the start, after every step, at every
/// evaluation and before the result is written. If it returns a true value, training
/// stops after the current step and `TrainCancelled` is raised; if it raises, training
/// stops the same way and the exception propagates. Ctrl-C stops training after the
/// current step (KeyboardInterrupt). A stopped run writes no result. The GIL is
/// released while training, except while the callback runs.
///
/// Unknown method, format, rps_mode or scaler names raise ValueError; errors from
/// graft (data, options that do not fit the model, I/O) raise GraftError.
#[pyfunction]
#[pyo3(signature = (model, data, out, *, text=None,
    method=name_of(&METHODS, DEFAULTS.method),
    format=DEFAULTS.format.map(|f| name_of(&FORMATS, f)),
    rank=DEFAULTS.rank, alpha=DEFAULTS.alpha, rslora=DEFAULTS.rslora,
    targets=DEFAULTS.targets.clone(), steps=DEFAULTS.steps, lr=DEFAULTS.lr,
    theta=DEFAULTS.theta, lambda_rank=DEFAULTS.lambda_rank, progressive=DEFAULTS.progressive,
    rps_mode=name_of(&RPS_MODES, DEFAULTS.rps_mode), rho=DEFAULTS.rho, budget=DEFAULTS.budget,
    scaler=DEFAULTS.scaler.name(), rps_seed=DEFAULTS.rps_seed, batch=DEFAULTS.batch,
    accum=DEFAULTS.accum, warmup=DEFAULTS.warmup, clip=DEFAULTS.clip,
    weight_decay=DEFAULTS.weight_decay, seed=DEFAULTS.seed, max_len=DEFAULTS.max_len,
    eval_frac=DEFAULTS.eval_frac, eval_every=DEFAULTS.eval_every, eval_max=DEFAULTS.eval_max,
    retention_data=DEFAULTS.retention_data.clone(), recompute=DEFAULTS.recompute,
    checkpoint=DEFAULTS.checkpoint.clone(), checkpoint_every=DEFAULTS.checkpoint_every,
    resume=DEFAULTS.resume.clone(), progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn train(
    py: Python<'_>,
    model: &Bound<'_, PyModel>,
    data: Option<&Bound<'_, PyAny>>,
    out: PathBuf,
    text: Option<String>,
    method: &str,
    format: Option<&str>,
    rank: usize,
    alpha: f32,
    rslora: bool,
    targets: String,
    steps: usize,
    lr: Option<f32>,
    theta: f32,
    lambda_rank: f32,
    progressive: bool,
    rps_mode: &str,
    rho: f64,
    budget: Option<u64>,
    scaler: &str,
    rps_seed: u64,
    batch: usize,
    accum: usize,
    warmup: usize,
    clip: f32,
    weight_decay: f32,
    seed: u64,
    max_len: usize,
    eval_frac: f64,
    eval_every: usize,
    eval_max: usize,
    retention_data: Option<PathBuf>,
    recompute: bool,
    checkpoint: Option<PathBuf>,
    checkpoint_every: usize,
    resume: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<TrainReport> {
    if let Some(p) = &progress {
        if !p.bind(py).is_callable() {
            return Err(PyTypeError::new_err("progress must be callable or None"));
        }
    }
    let spec = JobSpec {
        method: parse_name("method", &METHODS, method)?,
        data: train_data(data, text)?,
        out,
        format: format
            .map(|f| parse_name("format", &FORMATS, f))
            .transpose()?,
        rank,
        alpha,
        rslora,
        targets,
        steps,
        lr,
        theta,
        lambda_rank,
        progressive,
        rps_mode: parse_name("rps_mode", &RPS_MODES, rps_mode)?,
        rho,
        budget,
        scaler: parse_scaler(scaler)?,
        rps_seed,
        batch,
        accum,
        warmup,
        clip,
        weight_decay,
        seed,
        max_len,
        eval_frac,
        eval_every,
        eval_max,
        retention_data,
        recompute,
        checkpoint,
        checkpoint_every,
        resume,
    };
    let inner = model.get().inner.clone();
    let total = spec.steps;

    // Set by the callback: the exception it raised (or KeyboardInterrupt), or that it
    // asked to stop. Either way it is not called again.
    let mut raised: Option<PyErr> = None;
    let mut asked_stop = false;
    let mut last_step = 0;
    let mut on_progress = |p: &Progress| -> Control {
        match p {
            Progress::Started { step, .. } => last_step = *step,
            Progress::Step { stats, .. } => last_step = stats.step,
            _ => {}
        }
        if raised.is_some() || asked_stop {
            return Control::Cancel;
        }
        Python::attach(|py| {
            if let Err(e) = py.check_signals() {
                raised = Some(e);
                return Control::Cancel;
            }
            let Some(cb) = &progress else {
                return Control::Continue;
            };
            let event = TrainProgress::new(p, last_step, total);
            match cb.call1(py, (event,)).and_then(|r| r.bind(py).is_truthy()) {
                Ok(false) => Control::Continue,
                Ok(true) => {
                    asked_stop = true;
                    Control::Cancel
                }
                Err(e) => {
                    raised = Some(e);
                    Control::Cancel
                }
            }
        })
    };
    let result = py.detach(|| job::run(&inner.model, &inner.tokenizer, &spec, &mut on_progress));
    match (result, raised) {
        (Ok(report), None) => Ok(report.into()),
        // Raised at "finishing": the result is written, the exception still reported.
        (Ok(_), Some(e)) | (Err(TrainError::Cancelled { .. }), Some(e)) => Err(e),
        (Err(e @ TrainError::Cancelled { step }), None) => {
            let err = TrainCancelled::new_err(error_text(e));
            err.value(py).setattr("step", step)?;
            Err(err)
        }
        (Err(e), raised) => {
            let err = GraftError::new_err(error_text(e));
            err.set_cause(py, raised);
            Err(err)
        }
    }
}
