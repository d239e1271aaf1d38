//! `--provider` / `--ort-lib`: running a command's model on ONNX Runtime instead of
//! graft's own kernels.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Result};
use clap::Args;
use graft_adapters::{Adapter, AdapterStack};
use graft_ort::{KvState, LoraSpec, OrtAdapter, OrtSession, Provider, SessionOptions};
use graft_runtime::model::Model;

#[derive(Args, Debug, Clone)]
pub struct ProviderArgs {
    /// Where the model runs: native (graft's own kernels) or ONNX Runtime with an
    /// execution provider: ort-cpu, ort-cuda, ort-tensorrt, ort-coreml, ort-nnapi,
    /// ort-xnnpack (the ONNX Runtime library and this build must have it).
    #[arg(long, default_value = "native", value_name = "NAME")]
    pub provider: String,
    /// The ONNX Runtime shared library for ort-* providers (default: $ORT_DYLIB_PATH).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
}

impl ProviderArgs {
    /// The chosen provider, checked to be usable here.
    pub fn provider(&self) -> Result<Provider> {
        let p = Provider::parse(&self.provider)?;
        graft_ort::check_provider(p, self.ort_lib.as_deref())?;
        Ok(p)
    }
}

/// An ONNX Runtime session for one sequence, with the `--adapter` stack active.
pub struct OrtRunner {
    pub session: OrtSession,
    pub adapter: Option<OrtAdapter>,
    pub state: KvState,
}

/// The members of an adapter stack with their scales.
pub fn stack_refs(stack: Option<&AdapterStack>) -> Vec<(&Adapter, f32)> {
    stack
        .map(|s| s.layers.iter().map(|(a, sc)| (a.as_ref(), *sc)).collect())
        .unwrap_or_default()
}

impl OrtRunner {
    /// Builds the graph of `model` (LoRA inputs sized for `adapters`) and a session on
    /// `provider` holding up to `max_context` tokens.
    pub fn new(
        pargs: &ProviderArgs,
        provider: Provider,
        model: &Model,
        adapters: Option<&AdapterStack>,
        threads: Option<usize>,
        max_context: usize,
    ) -> Result<OrtRunner> {
        let refs = stack_refs(adapters);
        let mut opts = SessionOptions::new(model, provider);
        opts.library = pargs.ort_lib.clone();
        opts.threads = threads.unwrap_or(0);
        opts.graph.max_context = max_context.max(1);
        opts.graph.lora = graft_ort::required_rank(&refs).map(LoraSpec::all);
        let start = Instant::now();
        let session = OrtSession::new(model, &opts)?;
        let adapter = match opts.graph.lora {
            Some(_) => Some(OrtAdapter::from_graft(&refs, session.info())?),
            None => None,
        };
        tracing::info!(
            "ONNX Runtime session on {provider} ready in {:.0} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
        let state = session.new_state();
        Ok(OrtRunner {
            session,
            adapter,
            state,
        })
    }

    /// Runs `tokens` at position `pos` of the sequence (which must be where it ends);
    /// logits of every token when `all`, else of the last.
    pub fn step(&mut self, tokens: &[u32], pos: usize, all: bool) -> Result<Vec<f32>> {
        if pos != self.state.len() {
            return Err(anyhow!(
                "position {pos}: the ONNX Runtime sequence holds {} tokens",
                self.state.len()
            ));
        }
        Ok(self
            .session
            .run(&mut self.state, tokens, all, self.adapter.as_ref())?)
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) {
        self.state = self.session.new_state();
    }
}
