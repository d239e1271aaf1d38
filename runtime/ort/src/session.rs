//! ONNX Runtime sessions over graft's graph: the library is loaded at run time from
//! `ORT_DYLIB_PATH` or an explicit path, the execution provider is picked by name, and
//! the KV cache stays in ONNX Runtime values between runs.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use graft_runtime::model::Model;
use ort::environment::Environment;
use ort::session::{RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use crate::adapter::OrtAdapter;
use crate::graph::{
    build_graph, past_names, present_names, GraphInfo, GraphOptions, OnnxModel, DATA_FILE,
};
use crate::OrtError;

/// Environment variable naming the ONNX Runtime shared library.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Where a model runs: graft's own kernels, or ONNX Runtime with one execution
/// provider (CPU is always compiled in; the others with the cargo feature of the
/// same name, and only where the loaded library has them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    Native,
    OrtCpu,
    OrtCuda,
    OrtTensorRt,
    OrtCoreMl,
    OrtNnapi,
    OrtXnnpack,
}

impl Provider {
    pub const ALL: [Provider; 7] = [
        Provider::Native,
        Provider::OrtCpu,
        Provider::OrtCuda,
        Provider::OrtTensorRt,
        Provider::OrtCoreMl,
        Provider::OrtNnapi,
        Provider::OrtXnnpack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Provider::Native => "native",
            Provider::OrtCpu => "ort-cpu",
            Provider::OrtCuda => "ort-cuda",
            Provider::OrtTensorRt => "ort-tensorrt",
            Provider::OrtCoreMl => "ort-coreml",
            Provider::OrtNnapi => "ort-nnapi",
            Provider::OrtXnnpack => "ort-xnnpack",
        }
    }

    pub fn is_ort(self) -> bool {
        self != Provider::Native
    }

    /// Whether this build has the provider's registration code (its cargo feature).
    pub fn compiled(self) -> bool {
        match self {
            Provider::Native | Provider::OrtCpu => true,
            Provider::OrtCuda => cfg!(feature = "cuda"),
            Provider::OrtTensorRt => cfg!(feature = "tensorrt"),
            Provider::OrtCoreMl => cfg!(feature = "coreml"),
            Provider::OrtNnapi => cfg!(feature = "nnapi"),
            Provider::OrtXnnpack => cfg!(feature = "xnnpack"),
        }
    }

    /// Parses a name; unknown names list the known ones.
    pub fn parse(name: &str) -> Result<Provider, OrtError> {
        Provider::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| OrtError::Provider {
                requested: name.to_owned(),
                reason: "unknown provider".into(),
                available: Provider::ALL
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Whether the loaded ONNX Runtime library has this provider (`Ok(false)` when this
    /// build lacks its feature; the library must be loadable for ORT providers).
    fn in_library(self) -> Result<bool, OrtError> {
        use ort::ep::ExecutionProvider;
        Ok(match self {
            Provider::Native => true,
            Provider::OrtCpu => ort::ep::CPU::is_available()?,
            #[cfg(feature = "cuda")]
            Provider::OrtCuda => ort::ep::CUDA::is_available()?,
            #[cfg(feature = "tensorrt")]
            Provider::OrtTensorRt => ort::ep::TensorRT::is_available()?,
            #[cfg(feature = "coreml")]
            Provider::OrtCoreMl => ort::ep::CoreML::is_available()?,
            #[cfg(feature = "nnapi")]
            Provider::OrtNnapi => ort::ep::NNAPI::is_available()?,
            #[cfg(feature = "xnnpack")]
            Provider::OrtXnnpack => ort::ep::XNNPACK::is_available()?,
            #[allow(unreachable_patterns)]
            _ => false,
        })
    }

    fn dispatch(self) -> Option<ort::ep::ExecutionProviderDispatch> {
        match self {
            Provider::OrtCpu => Some(ort::ep::CPU::default().build().error_on_failure()),
            #[cfg(feature = "cuda")]
            Provider::OrtCuda => Some(ort::ep::CUDA::default().build().error_on_failure()),
            #[cfg(feature = "tensorrt")]
            Provider::OrtTensorRt => Some(ort::ep::TensorRT::default().build().error_on_failure()),
            #[cfg(feature = "coreml")]
            Provider::OrtCoreMl => Some(ort::ep::CoreML::default().build().error_on_failure()),
            #[cfg(feature = "nnapi")]
            Provider::OrtNnapi => Some(ort::ep::NNAPI::default().build().error_on_failure()),
            #[cfg(feature = "xnnpack")]
            Provider::OrtXnnpack => Some(ort::ep::XNNPACK::default().build().error_on_failure()),
            _ => None,
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Providers usable here: native always; ONNX Runtime ones when the library loads
/// (from `lib` or `ORT_DYLIB_PATH`), this build has the feature and the library has
/// the provider.
pub fn available_providers(lib: Option<&Path>) -> Vec<Provider> {
    let mut out = vec![Provider::Native];
    if ensure_runtime(lib).is_ok() {
        out.extend(
            Provider::ALL
                .into_iter()
                .filter(|p| p.is_ort() && p.compiled() && p.in_library().unwrap_or(false)),
        );
    }
    out
}

/// Checks that `provider` can run here, with an error that lists what can.
pub fn check_provider(provider: Provider, lib: Option<&Path>) -> Result<(), OrtError> {
    if provider == Provider::Native {
        return Ok(());
    }
    let listed = || {
        available_providers(lib)
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Err(e) = ensure_runtime(lib) {
        return Err(OrtError::Provider {
            requested: provider.name().into(),
            reason: e.to_string(),
            available: listed(),
        });
    }
    if !provider.compiled() {
        let feature = provider.name().trim_start_matches("ort-");
        return Err(OrtError::Provider {
            requested: provider.name().into(),
            reason: format!("this build lacks it (cargo feature `{feature}` of graft-ort)"),
            available: listed(),
        });
    }
    if !provider.in_library()? {
        return Err(OrtError::Provider {
            requested: provider.name().into(),
            reason: "the loaded ONNX Runtime library does not include it".into(),
            available: listed(),
        });
    }
    Ok(())
}

static ENV: OnceLock<Result<(PathBuf, Environment), String>> = OnceLock::new();

/// The library path: `lib`, else `ORT_DYLIB_PATH`.
pub fn library_path(lib: Option<&Path>) -> Result<PathBuf, OrtError> {
    if let Some(p) = lib {
        return Ok(p.to_path_buf());
    }
    match std::env::var_os(ORT_DYLIB_ENV) {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(OrtError::Load(format!(
            "no ONNX Runtime library: set {ORT_DYLIB_ENV} to libonnxruntime.so (scripts/ort-env.sh \
             installs one) or pass --ort-lib"
        ))),
    }
}

/// Loads ONNX Runtime once per process (later calls reuse it, whatever `lib` says).
pub fn ensure_runtime(lib: Option<&Path>) -> Result<&'static Environment, OrtError> {
    let res = ENV.get_or_init(|| {
        let path = library_path(lib).map_err(|e| match e {
            OrtError::Load(m) => m,
            other => other.to_string(),
        })?;
        if !path.is_file() {
            return Err(format!(
                "ONNX Runtime library {} does not exist (from {})",
                path.display(),
                if lib.is_some() {
                    "--ort-lib"
                } else {
                    ORT_DYLIB_ENV
                }
            ));
        }
        let builder = ort::init_from(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let env = builder
            .with_name("graft")
            .build()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        tracing::info!(library = %path.display(), "ONNX Runtime loaded");
        Ok((path, env))
    });
    match res {
        Ok((_, env)) => Ok(env),
        Err(e) => Err(OrtError::Load(e.clone())),
    }
}

/// How a session is set up.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub provider: Provider,
    /// The ONNX Runtime library (else `ORT_DYLIB_PATH`).
    pub library: Option<PathBuf>,
    pub graph: GraphOptions,
    /// Intra-op threads (0: ONNX Runtime's default).
    pub threads: usize,
}

impl SessionOptions {
    pub fn new(model: &Model, provider: Provider) -> SessionOptions {
        SessionOptions {
            provider,
            library: None,
            graph: GraphOptions::for_model(model),
            threads: 0,
        }
    }
}

/// The KV cache of one sequence, as ONNX Runtime values (`None` before the first
/// run: the graph's empty defaults stand in).
pub struct KvState {
    values: Option<Vec<DynValue>>,
    len: usize,
}

impl KvState {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A graft model compiled into an ONNX Runtime session.
pub struct OrtSession {
    session: Session,
    info: GraphInfo,
    provider: Provider,
}

impl std::fmt::Debug for OrtSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtSession")
            .field("provider", &self.provider)
            .field("info", &self.info)
            .finish()
    }
}

impl OrtSession {
    /// Builds the graph of `model` and a session on `opts.provider`.
    pub fn new(model: &Model, opts: &SessionOptions) -> Result<OrtSession, OrtError> {
        let graph = build_graph(model, &opts.graph)?;
        Self::from_graph(&graph, opts)
    }

    /// A session over an already built graph.
    pub fn from_graph(graph: &OnnxModel, opts: &SessionOptions) -> Result<OrtSession, OrtError> {
        if !opts.provider.is_ort() {
            return Err(OrtError::Provider {
                requested: opts.provider.name().into(),
                reason: "graft's native kernels do not run through ONNX Runtime".into(),
                available: available_providers(opts.library.as_deref())
                    .iter()
                    .filter(|p| p.is_ort())
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        check_provider(opts.provider, opts.library.as_deref())?;
        let env = ensure_runtime(opts.library.as_deref())?;
        let bytes = graph.model.encode();
        let data: std::sync::Arc<[u8]> = graph.data.as_slice().into();
        let mut builder = Session::builder(env)?
            .with_execution_providers(opts.provider.dispatch().into_iter().collect::<Vec<_>>())?
            .with_external_initializer_file_in_memory(DATA_FILE, data)?
            // The KV, num_logits and LoRA defaults are overridable initializers by
            // design, which ONNX Runtime reports once per input at warning level.
            .with_log_level(ort::logging::LogLevel::Error)?;
        if opts.threads > 0 {
            builder = builder.with_intra_threads(opts.threads)?;
        }
        let session = builder.commit_from_memory(&bytes)?;
        tracing::info!(provider = %opts.provider, bytes = bytes.len() + graph.data.len(), "ONNX Runtime session ready");
        Ok(OrtSession {
            session,
            info: graph.info.clone(),
            provider: opts.provider,
        })
    }

    pub fn info(&self) -> &GraphInfo {
        &self.info
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// An empty KV cache.
    pub fn new_state(&self) -> KvState {
        KvState {
            values: None,
            len: 0,
        }
    }

    /// Runs `tokens` at the end of `state` (prefill or decode), with `adapter` active
    /// for this run only; returns `n_vocab` logits for every token when `all_logits`,
    /// else for the last one.
    pub fn run(
        &mut self,
        state: &mut KvState,
        tokens: &[u32],
        all_logits: bool,
        adapter: Option<&OrtAdapter>,
    ) -> Result<Vec<f32>, OrtError> {
        let info = &self.info;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= info.n_vocab) {
            return Err(OrtError::Run(format!(
                "token id {t} is out of the vocabulary (size {})",
                info.n_vocab
            )));
        }
        let total = state.len + tokens.len();
        if total > info.max_context {
            return Err(OrtError::Run(format!(
                "{total} tokens exceed the session's context of {} (GraphOptions::max_context)",
                info.max_context
            )));
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let n_keep = if all_logits { 0 } else { 1 };
        let ids = Tensor::from_array(([1usize, ids.len()], ids))?;
        let keep = Tensor::from_array(([1usize], vec![n_keep as i64]))?;
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            ("input_ids".into(), ids.into()),
            ("num_logits".into(), keep.into()),
        ];
        if let Some(values) = &state.values {
            for (li, pair) in values.chunks_exact(2).enumerate() {
                let (pk, pv) = past_names(li);
                inputs.push((pk.into(), (&pair[0]).into()));
                inputs.push((pv.into(), (&pair[1]).into()));
            }
        }
        let run_options = match adapter {
            Some(a) => {
                let mut ro = RunOptions::new()?;
                ro.add_adapter(&a.inner)?;
                Some(ro)
            }
            None => None,
        };
        let mut outputs = match &run_options {
            Some(ro) => self.session.run_with_options(inputs, ro)?,
            None => self.session.run(inputs)?,
        };
        let logits = outputs
            .remove("logits")
            .ok_or_else(|| OrtError::Run("the graph returned no logits".into()))?;
        let (shape, data) = logits.try_extract_tensor::<f32>()?;
        let expect = if all_logits { tokens.len() } else { 1 } * info.n_vocab;
        if data.len() != expect {
            return Err(OrtError::Run(format!(
                "logits of shape {shape:?}, expected {expect} values"
            )));
        }
        let logits = data.to_vec();
        let mut values = Vec::with_capacity(info.n_layer * 2);
        for li in 0..info.n_layer {
            let (ok, ov) = present_names(li);
            for name in [ok, ov] {
                let v = outputs
                    .remove(name.as_str())
                    .ok_or_else(|| OrtError::Run(format!("the graph returned no {name}")))?;
                values.push(v);
            }
        }
        state.values = Some(values);
        state.len = total;
        Ok(logits)
    }
}
