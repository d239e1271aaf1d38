//! Python bindings of graft (`graft._graft`, re-exported by the `graft` package).
//!
//! Every call that computes (loading, forward passes, generation, training) releases
//! the GIL.
//! Errors from graft become `graft.GraftError` carrying the message the `graft`
//! command line would print; wrong argument types stay Python's TypeError/ValueError.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graft_adapters::{
    load_adapter, registry::AdapterInfo, AdapterError, AdapterStack, BatchDeltas, LinearDelta,
    Registry, RegistryError, RegistryLimits,
};
use graft_quant::GgmlType;
use graft_runtime::generate::{generate_adapted, GenerateOutput, GenerateParams};
use graft_runtime::kv_cache::{KvCache, KvType};
use graft_runtime::model::{sequence_batch, Model, Scratch};
use graft_runtime::sampling::SamplingParams;
use graft_runtime::tokenizer::Tokenizer;
use numpy::{PyArray1, PyArray2, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PySequence, PyString};

mod train;

create_exception!(
    graft,
    GraftError,
    PyException,
    "An error reported by graft (loading, adapters, inference); the message is graft's own."
);

/// Prompt tokens per forward step in `Session.append`: bounds scratch memory, as
/// `graft run`'s prefill does.
const CHUNK: usize = 512;

/// Default KV capacity of a `Session` when the model's training context is larger
/// (or unknown): enough for tests and chats without reserving gigabytes.
const DEFAULT_SESSION_CTX: usize = 4096;

/// graft's message for an error, formatted as the `graft` binary prints it: the whole
/// cause chain on one line.
fn error_text(e: impl Into<anyhow::Error>) -> String {
    format!("{:#}", e.into()).replace('\n', " ")
}

fn graft_err(e: impl Into<anyhow::Error>) -> PyErr {
    GraftError::new_err(error_text(e))
}

/// Sizes rayon's global pool once; later requests must agree with it.
fn init_threads(threads: Option<usize>) -> PyResult<()> {
    let Some(n) = threads else { return Ok(()) };
    if n == 0 {
        return Err(PyValueError::new_err("threads must be at least 1"));
    }
    match rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == n => Ok(()),
        Err(_) => Err(GraftError::new_err(format!(
            "threads={n}: the process's thread pool already runs {} threads (it is sized once, by the first model loaded with threads= or the first computation)",
            rayon::current_num_threads()
        ))),
    }
}

fn tokenizer_from_path(path: &Path, n_vocab: usize) -> anyhow::Result<Tokenizer> {
    Ok(match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Tokenizer::from_hf_file(path)?,
        Some("bin") => Tokenizer::open_llama2c_bin(path, Some(n_vocab))?,
        _ => Tokenizer::open_gguf(path)?,
    })
}

/// The tokenizer `graft run` picks: the given file, else the GGUF's own, else a
/// tokenizer.json / tokenizer.bin beside the model.
fn load_tokenizer(
    model_path: &Path,
    model: &Model,
    explicit: Option<&Path>,
) -> anyhow::Result<Tokenizer> {
    let n_vocab = model.config.n_vocab;
    if let Some(p) = explicit {
        return tokenizer_from_path(p, n_vocab);
    }
    if let Some(gguf) = &model.gguf {
        return Ok(Tokenizer::from_gguf(gguf)?);
    }
    let dir = if model_path.is_dir() {
        model_path
    } else {
        model_path.parent().unwrap_or(Path::new("."))
    };
    for name in ["tokenizer.json", "tokenizer.bin"] {
        let p = dir.join(name);
        if p.is_file() {
            return tokenizer_from_path(&p, n_vocab);
        }
    }
    Err(anyhow::anyhow!(
        "{}: no tokenizer found (the model has none, and there is no tokenizer.json or tokenizer.bin beside it); pass tokenizer=",
        model_path.display()
    ))
}

struct Inner {
    path: PathBuf,
    model: Model,
    tokenizer: Tokenizer,
    registry: Registry,
}

impl Inner {
    fn check_tokens(&self, tokens: &[u32]) -> PyResult<()> {
        let n = self.model.config.n_vocab;
        match tokens.iter().find(|&&t| t as usize >= n) {
            Some(t) => Err(PyValueError::new_err(format!(
                "token id {t} is out of range: the vocabulary has {n} tokens"
            ))),
            None => Ok(()),
        }
    }

    /// The current versions of the named adapters as one stack (None for none).
    fn resolve(&self, members: &[(String, f32)]) -> PyResult<Option<AdapterStack>> {
        if members.is_empty() {
            return Ok(None);
        }
        self.registry.resolve(members).map(Some).map_err(graft_err)
    }

    fn info(&self, name: &str) -> PyResult<Adapter> {
        self.registry
            .list()
            .into_iter()
            .find(|i| &*i.name == name)
            .map(Adapter::from)
            .ok_or_else(|| {
                graft_err(AdapterError::from(RegistryError::NotLoaded {
                    name: name.to_owned(),
                }))
            })
    }
}

/// `adapters=`: None, a name, or a sequence of names and (name, scale) pairs.
fn parse_adapters(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(String, f32)>> {
    let Some(obj) = obj else {
        return Ok(Vec::new());
    };
    if obj.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(vec![(s.to_cow()?.into_owned(), 1.0)]);
    }
    let bad = || {
        PyTypeError::new_err("adapters must be a name, or a list of names and (name, scale) pairs")
    };
    let seq = obj.cast::<PySequence>().map_err(|_| bad())?;
    let mut out = Vec::new();
    for item in seq.try_iter()? {
        let item = item?;
        if let Ok(s) = item.cast::<PyString>() {
            out.push((s.to_cow()?.into_owned(), 1.0));
        } else if let Ok((name, scale)) = item.extract::<(String, f32)>() {
            if !scale.is_finite() {
                return Err(PyValueError::new_err(format!(
                    "adapter {name:?}: scale {scale} is not finite"
                )));
            }
            out.push((name, scale));
        } else {
            return Err(bad());
        }
    }
    Ok(out)
}

fn parse_kv_type(s: &str) -> PyResult<KvType> {
    match s {
        "f16" => Ok(KvType::F16),
        "f32" => Ok(KvType::F32),
        _ => Err(PyValueError::new_err(format!(
            "kv_type {s:?}: expected \"f16\" or \"f32\""
        ))),
    }
}

/// A loaded adapter, as `Model.adapters()` and `Model.load_adapter()` report it.
#[pyclass(frozen, module = "graft", get_all)]
#[derive(Clone)]
struct Adapter {
    /// The name it is loaded under.
    name: String,
    /// Version number; a new one at every load or replace (never reused).
    generation: u64,
    /// Bytes of adapter data (memory-mapped bytes included).
    bytes: usize,
    /// "gguf-lora", "peft", "sara", "rps" or "memory".
    format: String,
    /// The file or folder it was loaded from.
    path: String,
}

impl From<AdapterInfo> for Adapter {
    fn from(i: AdapterInfo) -> Self {
        use graft_adapters::AdapterFormat as F;
        Adapter {
            name: i.name.to_string(),
            generation: i.generation.0,
            bytes: i.bytes,
            format: match i.format {
                F::GgufLora => "gguf-lora",
                F::Peft => "peft",
                F::Sara => "sara",
                F::Rps => "rps",
                F::Memory => "memory",
            }
            .to_owned(),
            path: i.source.display().to_string(),
        }
    }
}

#[pymethods]
impl Adapter {
    fn __repr__(&self) -> String {
        format!(
            "Adapter(name={:?}, generation={}, format={:?}, bytes={}, path={:?})",
            self.name, self.generation, self.format, self.bytes, self.path
        )
    }
}

/// Generation options shared by `Model.generate` and `Model.stream`.
struct GenArgs {
    prompt: Vec<u32>,
    params: GenerateParams,
    stack: Option<AdapterStack>,
}

/// A model (GGUF file, Hugging Face checkpoint folder or llama2.c checkpoint) with its
/// tokenizer and a registry of named adapters that can be loaded, replaced and
/// unloaded at any time, also while other threads generate.
///
/// Model(path, threads=None, tokenizer=None, quantize=None)
///
/// - threads: size of the process-wide worker pool (all cores by default); it can
///   only be set once per process.
/// - tokenizer: a tokenizer.json, llama2.c tokenizer.bin or GGUF file to use instead
///   of the model's own.
/// - quantize: convert an HF checkpoint's matrices to this type at load ("Q8_0", ...).
#[pyclass(frozen, module = "graft", name = "Model")]
struct PyModel {
    inner: Arc<Inner>,
}

impl PyModel {
    #[allow(clippy::too_many_arguments)]
    fn gen_args(
        &self,
        prompt: &Bound<'_, PyAny>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        frequency_penalty: f32,
        presence_penalty: f32,
        seed: u64,
        stop: Option<Vec<String>>,
        adapters: Option<&Bound<'_, PyAny>>,
        add_bos: bool,
        ignore_eos: bool,
        kv_type: &str,
    ) -> PyResult<GenArgs> {
        let inner = &self.inner;
        // Text is tokenized as `graft run -p` does (no special-token parsing); a list
        // of ids is used exactly as given.
        let prompt = if let Ok(s) = prompt.cast::<PyString>() {
            inner.tokenizer.encode(&s.to_cow()?, add_bos, false)
        } else if let Ok(ids) = prompt.extract::<Vec<u32>>() {
            inner.check_tokens(&ids)?;
            ids
        } else {
            return Err(PyTypeError::new_err(
                "prompt must be a str or a list of token ids",
            ));
        };
        let params = GenerateParams {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty: repeat_penalty,
                frequency_penalty,
                presence_penalty,
                seed,
                ..SamplingParams::default()
            },
            stop: stop.unwrap_or_default(),
            ignore_eos,
            kv_type: parse_kv_type(kv_type)?,
        };
        let stack = inner.resolve(&parse_adapters(adapters)?)?;
        Ok(GenArgs {
            prompt,
            params,
            stack,
        })
    }
}

fn run_generate(
    inner: &Inner,
    a: &GenArgs,
    on_text: impl FnMut(&str) -> bool,
) -> Result<GenerateOutput, String> {
    let delta = a.stack.as_ref().map(|s| s as &dyn LinearDelta);
    generate_adapted(
        &inner.model,
        &inner.tokenizer,
        &a.prompt,
        &a.params,
        delta,
        on_text,
    )
    .map_err(error_text)
}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(signature = (path, threads=None, tokenizer=None, quantize=None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        threads: Option<usize>,
        tokenizer: Option<PathBuf>,
        quantize: Option<&str>,
    ) -> PyResult<Self> {
        init_threads(threads)?;
        let quantize =
            match quantize {
                None => None,
                Some(t) => Some(GgmlType::from_name(t).ok_or_else(|| {
                    PyValueError::new_err(format!("quantize={t:?}: unknown type"))
                })?),
            };
        let inner = py
            .detach(|| -> anyhow::Result<Inner> {
                let model = Model::load(&path, quantize)?;
                let tokenizer = load_tokenizer(&path, &model, tokenizer.as_deref())?;
                Ok(Inner {
                    path,
                    model,
                    tokenizer,
                    registry: Registry::new(RegistryLimits::unlimited()),
                })
            })
            .map_err(graft_err)?;
        Ok(PyModel {
            inner: Arc::new(inner),
        })
    }

    fn __repr__(&self) -> String {
        let c = &self.inner.model.config;
        format!(
            "Model({:?}, n_layer={}, n_vocab={}, adapters={})",
            self.inner.path.display().to_string(),
            c.n_layer,
            c.n_vocab,
            self.inner.registry.len()
        )
    }

    /// The path the model was loaded from.
    #[getter]
    fn path(&self) -> String {
        self.inner.path.display().to_string()
    }

    /// Vocabulary size (width of a logits row).
    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.model.config.n_vocab
    }

    /// Number of transformer layers.
    #[getter]
    fn n_layer(&self) -> usize {
        self.inner.model.config.n_layer
    }

    /// Context length the model was trained with (0 if the file does not say).
    #[getter]
    fn n_ctx_train(&self) -> usize {
        self.inner.model.config.n_ctx_train
    }

    /// The BOS token id, if the vocabulary has one.
    #[getter]
    fn bos(&self) -> Option<u32> {
        self.inner.tokenizer.bos()
    }

    /// The EOS token id, if the vocabulary has one.
    #[getter]
    fn eos(&self) -> Option<u32> {
        self.inner.tokenizer.eos()
    }

    /// Token ids of `text`. add_bos: prepend BOS (if the vocabulary has one);
    /// special: parse special-token text such as "<s>" as those tokens.
    #[pyo3(signature = (text, add_bos=true, special=false))]
    fn tokenize(&self, text: &str, add_bos: bool, special: bool) -> Vec<u32> {
        self.inner.tokenizer.encode(text, add_bos, special)
    }

    /// Text of token ids: the concatenation of their pieces, as generation streams
    /// them (control tokens render as nothing unless special=True).
    #[pyo3(signature = (ids, special=false))]
    fn detokenize(&self, ids: Vec<u32>, special: bool) -> PyResult<String> {
        self.inner.check_tokens(&ids)?;
        Ok(self.inner.tokenizer.decode_with(&ids, special))
    }

    /// Loads an adapter (GGUF LoRA file, PEFT folder, SaRA .safetensors file or
    /// STABLE-RPS .rps file) under `name`; a loaded name gets the new version. Returns
    /// its `Adapter` record.
    fn load_adapter(&self, py: Python<'_>, name: &str, path: PathBuf) -> PyResult<Adapter> {
        let inner = &self.inner;
        py.detach(|| {
            inner
                .registry
                .load_file(name, &path, &inner.model, load_adapter)
        })
        .map_err(graft_err)?;
        inner.info(name)
    }

    /// Replaces the loaded adapter `name` with the one at `path` (GraftError if `name`
    /// is not loaded). Sessions and streams already running keep the version they
    /// started with; later calls use the new one.
    fn replace_adapter(&self, py: Python<'_>, name: &str, path: PathBuf) -> PyResult<Adapter> {
        let inner = &self.inner;
        py.detach(|| -> graft_adapters::Result<()> {
            let Some(expected) = inner.registry.generation(name) else {
                return Err(RegistryError::NotLoaded {
                    name: name.to_owned(),
                }
                .into());
            };
            let adapter = load_adapter(&path, &inner.model)?;
            if adapter.n_layer() != inner.model.config.n_layer {
                return Err(AdapterError::Invalid {
                    file: path.display().to_string(),
                    what: format!(
                        "adapter built for {} layers, the base has {}",
                        adapter.n_layer(),
                        inner.model.config.n_layer
                    ),
                });
            }
            // Compare-and-set: a concurrent replace of the same name is an error,
            // not a silent overwrite.
            inner.registry.replace(name, expected, adapter)?;
            Ok(())
        })
        .map_err(graft_err)?;
        inner.info(name)
    }

    /// Unloads adapter `name` (GraftError if it is not loaded).
    fn unload_adapter(&self, name: &str) -> PyResult<()> {
        self.inner.registry.unload(name).map_err(graft_err)
    }

    /// The loaded adapters, most recently used first.
    fn adapters(&self) -> Vec<Adapter> {
        self.inner
            .registry
            .list()
            .into_iter()
            .map(Adapter::from)
            .collect()
    }

    /// Logits at every position of `tokens` (ids used exactly as given: no BOS is
    /// added), as a float32 numpy array of shape (len(tokens), n_vocab); the same
    /// values as `graft logits --tokens`. adapters: a name, or a list of names and
    /// (name, scale) pairs, stacked.
    #[pyo3(signature = (tokens, adapters=None))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<u32>,
        adapters: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        if tokens.is_empty() {
            return Err(PyValueError::new_err("tokens must not be empty"));
        }
        let inner = &self.inner;
        inner.check_tokens(&tokens)?;
        let stack = inner.resolve(&parse_adapters(adapters)?)?;
        let data = py
            .detach(|| {
                let mut cache = inner.model.new_cache(tokens.len(), KvType::F16);
                let batch = sequence_batch(&tokens, 0, 0, true);
                let deltas = stack.as_ref().map(|s| BatchDeltas::uniform(s, batch.len()));
                inner
                    .model
                    .forward_adapted(&batch, &mut cache, &mut Scratch::default(), deltas.as_ref())
                    .map(|l| l.data)
            })
            .map_err(graft_err)?;
        PyArray1::from_vec(py, data).reshape([tokens.len(), inner.model.config.n_vocab])
    }

    /// Generates a continuation of `prompt` and returns its text. With the defaults
    /// (temperature 0: greedy) the text equals `graft run --temp 0` on the same model,
    /// prompt and adapters.
    ///
    /// prompt: text (tokenized with BOS unless add_bos=False, special tokens not
    /// parsed) or a list of token ids used as given. stop: strings that end generation
    /// (not included in the text). adapters: a name, or a list of names and
    /// (name, scale) pairs, stacked. Sampling options as `graft run`.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_k=40, top_p=0.95, min_p=0.05,
        repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, seed=0, stop=None,
        adapters=None, add_bos=true, ignore_eos=false, kv_type="f16"))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        frequency_penalty: f32,
        presence_penalty: f32,
        seed: u64,
        stop: Option<Vec<String>>,
        adapters: Option<&Bound<'_, PyAny>>,
        add_bos: bool,
        ignore_eos: bool,
        kv_type: &str,
    ) -> PyResult<String> {
        let a = self.gen_args(
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            frequency_penalty,
            presence_penalty,
            seed,
            stop,
            adapters,
            add_bos,
            ignore_eos,
            kv_type,
        )?;
        let inner = &self.inner;
        py.detach(|| run_generate(inner, &a, |_| true))
            .map(|o| o.text)
            .map_err(GraftError::new_err)
    }

    /// `generate` as an iterator of text pieces, produced while generation runs in a
    /// background thread; the pieces concatenate to `generate`'s text. Stopping early
    /// (break, close(), or dropping the iterator) cancels generation. After the last
    /// piece, `finish_reason` and `tokens` are set.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_k=40, top_p=0.95, min_p=0.05,
        repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, seed=0, stop=None,
        adapters=None, add_bos=true, ignore_eos=false, kv_type="f16"))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        prompt: &Bound<'_, PyAny>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        frequency_penalty: f32,
        presence_penalty: f32,
        seed: u64,
        stop: Option<Vec<String>>,
        adapters: Option<&Bound<'_, PyAny>>,
        add_bos: bool,
        ignore_eos: bool,
        kv_type: &str,
    ) -> PyResult<TextStream> {
        let a = self.gen_args(
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            frequency_penalty,
            presence_penalty,
            seed,
            stop,
            adapters,
            add_bos,
            ignore_eos,
            kv_type,
        )?;
        // A small bound: generation runs at most a few pieces ahead of the reader.
        let (tx, rx) = sync_channel::<Msg>(16);
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name("graft-stream".to_owned())
            .spawn(move || {
                let r = run_generate(&inner, &a, |piece| {
                    // A dropped iterator closes the channel: cancel.
                    tx.send(Msg::Text(piece.to_owned())).is_ok()
                });
                let _ = tx.send(Msg::Done(r));
            })
            .map_err(|e| GraftError::new_err(format!("cannot start the generation thread: {e}")))?;
        Ok(TextStream {
            rx: Mutex::new(Some(rx)),
            done: Mutex::new(None),
        })
    }
}

enum Msg {
    Text(String),
    Done(Result<GenerateOutput, String>),
}

/// Iterator of text pieces returned by `Model.stream`.
#[pyclass(frozen, module = "graft")]
struct TextStream {
    /// None once finished, failed or closed.
    rx: Mutex<Option<Receiver<Msg>>>,
    /// (finish reason, generated token ids) once generation has ended.
    done: Mutex<Option<(String, Vec<u32>)>>,
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        // Waiting on the channel happens without the GIL, so a second reader would
        // deadlock on this lock while holding the GIL: refuse it instead.
        let mut guard = self
            .rx
            .try_lock()
            .map_err(|_| PyRuntimeError::new_err("this stream is being read by another thread"))?;
        loop {
            let Some(rx) = guard.take() else {
                return Ok(None);
            };
            // Wake up now and then to let Ctrl-C through.
            let (rx, msg) = py.detach(move || {
                let m = rx.recv_timeout(Duration::from_millis(100));
                (rx, m)
            });
            match msg {
                Ok(Msg::Text(t)) => {
                    *guard = Some(rx);
                    return Ok(Some(t));
                }
                Ok(Msg::Done(Ok(out))) => {
                    if let Ok(mut d) = self.done.lock() {
                        *d = Some((out.finish.as_str().to_owned(), out.tokens));
                    }
                    return Ok(None);
                }
                Ok(Msg::Done(Err(e))) => return Err(GraftError::new_err(e)),
                Err(RecvTimeoutError::Timeout) => {
                    *guard = Some(rx);
                    // On KeyboardInterrupt the receiver is dropped: generation stops.
                    if let Err(e) = py.check_signals() {
                        *guard = None;
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(GraftError::new_err(
                        "generation thread ended without a result",
                    ))
                }
            }
        }
    }

    /// Stops generation; the iterator then ends.
    fn close(&self) {
        if let Ok(mut g) = self.rx.lock() {
            *g = None;
        }
    }

    /// Why generation ended ("length", "stop" or "cancelled"); None while running.
    #[getter]
    fn finish_reason(&self) -> Option<String> {
        self.done.lock().ok()?.as_ref().map(|d| d.0.clone())
    }

    /// The generated token ids (EOS excluded); None while running.
    #[getter]
    fn tokens(&self) -> Option<Vec<u32>> {
        self.done.lock().ok()?.as_ref().map(|d| d.1.clone())
    }
}

struct SessionState {
    cache: KvCache,
    scratch: Scratch,
    tokens: Vec<u32>,
}

/// A sequence with its own KV cache, for incremental decoding and multi-turn use:
/// each `append` runs only the new tokens.
///
/// Session(model, n_ctx=None, adapters=None, kv_type="f16")
///
/// - n_ctx: tokens the cache holds (default: the model's training context, at most
///   4096); appending past it raises GraftError.
/// - adapters: a name, or a list of names and (name, scale) pairs. The versions
///   loaded now are kept for the session's life, whatever later happens to the names.
#[pyclass(frozen, module = "graft")]
struct Session {
    inner: Arc<Inner>,
    stack: Option<AdapterStack>,
    adapters: Vec<(String, f32)>,
    n_ctx: usize,
    state: Mutex<SessionState>,
}

#[pymethods]
impl Session {
    #[new]
    #[pyo3(signature = (model, n_ctx=None, adapters=None, kv_type="f16"))]
    fn new(
        model: &Bound<'_, PyModel>,
        n_ctx: Option<usize>,
        adapters: Option<&Bound<'_, PyAny>>,
        kv_type: &str,
    ) -> PyResult<Self> {
        let inner = model.get().inner.clone();
        let n_ctx = match n_ctx {
            Some(0) => return Err(PyValueError::new_err("n_ctx must be at least 1")),
            Some(n) => n,
            None => match inner.model.config.n_ctx_train {
                0 => DEFAULT_SESSION_CTX,
                n => n.min(DEFAULT_SESSION_CTX),
            },
        };
        let kv = parse_kv_type(kv_type)?;
        let adapters = parse_adapters(adapters)?;
        let stack = inner.resolve(&adapters)?;
        let cache = inner.model.new_cache(n_ctx, kv);
        Ok(Session {
            inner,
            stack,
            adapters,
            n_ctx,
            state: Mutex::new(SessionState {
                cache,
                scratch: Scratch::default(),
                tokens: Vec::new(),
            }),
        })
    }

    /// Runs `tokens` after those already in the session. Returns the logits of the
    /// last one (float32, shape (n_vocab,)), or with all_logits=True of each of them
    /// (shape (len(tokens), n_vocab)). On error the session is unchanged.
    #[pyo3(signature = (tokens, all_logits=false))]
    fn append<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<u32>,
        all_logits: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        if tokens.is_empty() {
            return Err(PyValueError::new_err("tokens must not be empty"));
        }
        self.inner.check_tokens(&tokens)?;
        let mut guard = self
            .state
            .try_lock()
            .map_err(|_| PyRuntimeError::new_err("this session is in use by another thread"))?;
        let st = &mut *guard;
        let inner = &self.inner;
        let stack = self.stack.as_ref();
        let n_vocab = inner.model.config.n_vocab;
        let start = st.tokens.len();
        let data = py
            .detach(|| {
                let mut out = Vec::new();
                for (ci, chunk) in tokens.chunks(CHUNK).enumerate() {
                    let pos = start + ci * CHUNK;
                    let last = pos + chunk.len() == start + tokens.len();
                    let batch = sequence_batch(chunk, 0, pos, all_logits);
                    let deltas = stack.map(|s| BatchDeltas::uniform(s, batch.len()));
                    let l = inner.model.forward_adapted(
                        &batch,
                        &mut st.cache,
                        &mut st.scratch,
                        deltas.as_ref(),
                    )?;
                    if all_logits {
                        out.extend_from_slice(&l.data);
                    } else if last {
                        out = l.row(0).to_vec();
                    }
                }
                Ok::<_, graft_runtime::model::ModelError>(out)
            })
            .map_err(|e| {
                // Nothing half-appended: forget whatever earlier chunks wrote.
                st.cache.truncate(0, start);
                graft_err(e)
            })?;
        st.tokens.extend_from_slice(&tokens);
        Ok(if all_logits {
            PyArray1::from_vec(py, data)
                .reshape([tokens.len(), n_vocab])?
                .into_any()
        } else {
            PyArray1::from_vec(py, data).into_any()
        })
    }

    /// Forgets every token (the adapters stay).
    fn reset(&self) -> PyResult<()> {
        let mut st = self
            .state
            .try_lock()
            .map_err(|_| PyRuntimeError::new_err("this session is in use by another thread"))?;
        st.cache.clear();
        st.tokens.clear();
        Ok(())
    }

    /// Keeps the first `n` tokens and forgets the rest (to rewind).
    fn truncate(&self, n: usize) -> PyResult<()> {
        let mut st = self
            .state
            .try_lock()
            .map_err(|_| PyRuntimeError::new_err("this session is in use by another thread"))?;
        let n = n.min(st.tokens.len());
        st.cache.truncate(0, n);
        st.tokens.truncate(n);
        Ok(())
    }

    /// The token ids in the session.
    #[getter]
    fn tokens(&self) -> PyResult<Vec<u32>> {
        let st = self
            .state
            .try_lock()
            .map_err(|_| PyRuntimeError::new_err("this session is in use by another thread"))?;
        Ok(st.tokens.clone())
    }

    /// Tokens the KV cache holds at most.
    #[getter]
    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The session's adapters as (name, scale) pairs.
    #[getter]
    fn adapters(&self) -> Vec<(String, f32)> {
        self.adapters.clone()
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.tokens()?.len())
    }
}

/// Native part of the `graft` package.
#[pymodule]
fn _graft(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GraftError", m.py().get_type::<GraftError>())?;
    m.add_class::<PyModel>()?;
    m.add_class::<Session>()?;
    m.add_class::<Adapter>()?;
    m.add_class::<TextStream>()?;
    m.add("TrainCancelled", m.py().get_type::<train::TrainCancelled>())?;
    m.add_class::<train::TrainProgress>()?;
    m.add_class::<train::TrainReport>()?;
    m.add_function(wrap_pyfunction!(train::train, m)?)?;
    m.add_function(wrap_pyfunction!(train::train_defaults, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
