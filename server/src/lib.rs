//! graft-server: an OpenAI-compatible HTTP server over the continuous-batching engine,
//! with adapters loaded, replaced and unloaded while requests run.
//!
//! - `/v1/completions`, `/v1/chat/completions` (JSON or SSE streaming). The adapter is
//!   named by `model` (an adapter's name, or the base id), `adapter_id`/`adapter`, or
//!   llama.cpp's `lora: [{"id"|"name", "scale"}]`; all given are stacked. A request
//!   resolves its adapters once, at submission: it keeps that version to the end even if
//!   the name is replaced or unloaded meanwhile.
//! - `/v1/models`, `/v1/lora_adapters`, `/v1/load_lora_adapter`,
//!   `/v1/unload_lora_adapter` (the last two only with `allow_adapter_loading`, and
//!   only for paths inside `adapter_root`), `/health`, `/metrics`.
//! - Every error is `{"error": {"message", "type", "code"}}` with a stable `code`.
//!
//! The engine's blocking channels are bridged to async by one forwarding task per
//! request; when the HTTP client goes away the request is cancelled in the engine,
//! queued or running, and its slot and KV blocks freed.
//! - `/metrics`: responses, tokens, queue depth, batch size, KV usage, per-adapter
//!   requests, cancellations, and TTFT / inter-token / end-to-end latency histograms.

mod admin;
pub mod api;
pub mod error;
mod generate;
pub mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use graft_adapters::{AdapterStack, Generation, Registry};
use graft_runtime::chat::ChatTemplate;
use graft_runtime::kv_cache::{KvCache, KvType};
use graft_runtime::model::Model;
use graft_runtime::scheduler::{EngineConfig, EngineHandle, EngineThread};
use graft_runtime::tokenizer::Tokenizer;
use serde_json::json;

pub use error::ApiError;
use metrics::Metrics;

/// Tokens per KV block.
pub const KV_BLOCK_SIZE: usize = 16;

/// How the server runs; everything but the model, tokenizer and registry.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The base model's id in `/v1/models` and the `model` field.
    pub model_id: String,
    /// Where the base model was loaded from (`root` in `/v1/models`).
    pub model_path: PathBuf,
    /// Directory that confines `/v1/load_lora_adapter` paths (canonicalized).
    pub adapter_root: Option<PathBuf>,
    pub allow_adapter_loading: bool,
    /// Clients must send `Authorization: Bearer <key>` (all routes but `/health`).
    pub api_key: Option<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// KV cache size in blocks of [`KV_BLOCK_SIZE`] tokens.
    pub kv_blocks: usize,
    pub engine: EngineConfig,
}

impl ServerOptions {
    pub fn new(model_id: impl Into<String>, model_path: impl Into<PathBuf>) -> Self {
        ServerOptions {
            model_id: model_id.into(),
            model_path: model_path.into(),
            adapter_root: None,
            allow_adapter_loading: false,
            api_key: None,
            max_body_bytes: 1 << 20,
            kv_blocks: 512,
            engine: EngineConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("--allow-adapter-loading needs --adapter-root: loaded paths must be confined to a directory")]
    LoadingWithoutRoot,
    #[error("adapter root {path}: {source}")]
    AdapterRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Key of a resolved adapter stack: each member's name, generation and scale bits.
type StackKey = Vec<(Arc<str>, Generation, u32)>;

pub(crate) struct AppState {
    pub opts: ServerOptions,
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    pub registry: Arc<Registry>,
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    /// Canonical adapter root.
    pub root: Option<PathBuf>,
    /// Tokens the KV cache holds: prompt + max_tokens of one request must fit.
    pub kv_capacity: usize,
    pub created: u64,
    /// One load at a time (a second gets 429).
    pub load_lock: tokio::sync::Mutex<()>,
    /// Stacks shared by concurrent requests naming the same adapter versions, so the
    /// engine sees one delta (one group under `max_loras`) rather than one per request.
    pub stacks: Mutex<HashMap<StackKey, Weak<AdapterStack>>>,
}

/// A running engine and the state its routes share.
pub struct Server {
    state: Arc<AppState>,
    engine: EngineThread,
}

impl Server {
    /// Starts the engine thread over `model` and prepares the routes.
    pub fn new(
        opts: ServerOptions,
        model: Arc<Model>,
        tokenizer: Arc<Tokenizer>,
        template: ChatTemplate,
        registry: Arc<Registry>,
    ) -> Result<Server, ServerError> {
        if opts.kv_blocks == 0 {
            return Err(ServerError::Zero("--kv-blocks"));
        }
        if opts.engine.max_batch_tokens == 0 {
            return Err(ServerError::Zero("--max-batch"));
        }
        if opts.engine.max_deltas_per_step == 0 {
            return Err(ServerError::Zero("--max-loras"));
        }
        if opts.engine.max_running == 0 {
            return Err(ServerError::Zero("--max-running"));
        }
        let root = match &opts.adapter_root {
            Some(r) => Some(
                r.canonicalize()
                    .map_err(|source| ServerError::AdapterRoot {
                        path: r.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        if opts.allow_adapter_loading && root.is_none() {
            return Err(ServerError::LoadingWithoutRoot);
        }
        let c = &model.config;
        let cache = KvCache::new(
            c.n_layer,
            c.kv_dim(),
            opts.kv_blocks,
            KV_BLOCK_SIZE,
            KvType::F16,
        );
        let kv_capacity = cache.total_blocks() * cache.block_size();
        let engine =
            EngineThread::spawn(model.clone(), tokenizer.clone(), cache, opts.engine.clone())?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let state = Arc::new(AppState {
            opts,
            model,
            tokenizer,
            template,
            registry,
            engine: engine.handle(),
            metrics: Arc::new(Metrics::default()),
            root,
            kv_capacity,
            created,
            load_lock: tokio::sync::Mutex::new(()),
            stacks: Mutex::new(HashMap::new()),
        });
        Ok(Server { state, engine })
    }

    /// The routes, with auth, body limit, metrics and JSON errors applied.
    pub fn router(&self) -> Router {
        let st = self.state.clone();
        Router::new()
            .route("/v1/completions", post(generate::completions))
            .route("/v1/chat/completions", post(generate::chat_completions))
            .route("/v1/models", get(admin::models))
            .route("/v1/lora_adapters", get(admin::lora_adapters))
            .route("/v1/load_lora_adapter", post(admin::load_adapter))
            .route("/v1/unload_lora_adapter", post(admin::unload_adapter))
            .route("/health", get(health))
            .route("/metrics", get(metrics_text))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(st.opts.max_body_bytes))
            .layer(middleware::from_fn_with_state(st.clone(), auth))
            .layer(middleware::from_fn_with_state(st.clone(), finish_response))
            .with_state(st)
    }

    /// Serves on `listener` until `shutdown` resolves, lets open requests finish,
    /// then drains and stops the engine.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self.router();
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        let engine = self.engine;
        drop(self.state);
        // Draining joins the engine thread: keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        result
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: finishing open requests");
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let body = st.metrics.render(st.registry.len(), st.engine.stats());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        body,
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(
        "route_not_found",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

/// Constant-time comparison, so response timing does not reveal the key's prefix.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.opts.api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
                let mut resp = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_api_key",
                    "missing or wrong API key: send Authorization: Bearer <key>",
                )
                .into_response();
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return resp;
            }
        }
    }
    next.run(req).await
}

/// Counts responses by status and turns errors axum produced itself (405, 413 from
/// the body limit, ...) into the JSON error shape.
async fn finish_response(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    st.metrics.response(status.as_u16());
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let code = match status {
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::NOT_FOUND => "route_not_found",
            s if s.is_server_error() => "internal_error",
            _ => "bad_request",
        };
        let message = status.canonical_reason().unwrap_or("error").to_owned();
        return ApiError::new(status, code, message).into_response();
    }
    resp
}

/// Seconds since the epoch, for `created`.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A seed for requests that give none (OpenAI samples differently each time).
pub(crate) fn fresh_seed() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    d.as_nanos() as u64 ^ 0x9E37_79B9_7F4A_7C15
}
