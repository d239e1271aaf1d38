//! `/v1/completions` and `/v1/chat/completions`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft_adapters::{AdapterStack, LinearDelta, RegistryError};
use graft_runtime::chat::ChatMessage;
use graft_runtime::generate::{FinishReason, GenerateParams};
use graft_runtime::kv_cache::KvType;
use graft_runtime::sampling::SamplingParams;
use graft_runtime::scheduler::{EngineError, EngineHandle, Event, HandleError, Request, RequestId};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{Content, GenRequest, LoraId, Prompt};
use crate::error::ApiError;
use crate::metrics::InFlight;
use crate::{fresh_seed, now_secs, AppState};

/// Events buffered between the engine and a slow client.
const EVENT_BUFFER: usize = 256;

/// Default `max_tokens` of `/v1/completions` (OpenAI's).
const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// Default `max_tokens` of chat, bounded further by the KV capacity.
const DEFAULT_CHAT_TOKENS: usize = 512;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What a request was resolved to before submission.
struct Prepared {
    request: Request,
    /// Adapter label for metrics (`base` when none).
    label: String,
    /// The `model` echoed in responses.
    model: String,
    stream: bool,
    include_usage: bool,
}

pub(crate) async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(st, body, Kind::Completion).await
}

pub(crate) async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(st, body, Kind::Chat).await
}

pub(crate) fn body_error(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body exceeds the size limit",
        )
    } else {
        ApiError::new(r.status(), "bad_request", r.body_text())
    }
}

async fn handle(st: Arc<AppState>, body: Result<Bytes, BytesRejection>, kind: Kind) -> Response {
    let arrived = Instant::now();
    let body = match body {
        Ok(b) => b,
        Err(r) => return body_error(r).into_response(),
    };
    let prepared = match prepare(&st, &body, kind) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match run(st, prepared, kind, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn prepare(st: &AppState, body: &[u8], kind: Kind) -> Result<Prepared, ApiError> {
    let req = GenRequest::parse(body)?;
    req.check_unsupported()?;
    let (text, add_bos, parse_special) = match kind {
        Kind::Completion => {
            if req.messages.is_some() {
                return Err(ApiError::invalid_field(
                    "messages",
                    "not accepted by /v1/completions (use /v1/chat/completions)",
                ));
            }
            match &req.prompt {
                None => return Err(ApiError::invalid_field("prompt", "missing")),
                Some(Prompt::Text(s)) => (Some(s.clone()), true, false),
                Some(Prompt::Texts(v)) if v.len() == 1 => (Some(v[0].clone()), true, false),
                Some(Prompt::Texts(v)) => {
                    return Err(ApiError::invalid_field(
                        "prompt",
                        format!("{} prompts: only one per request is supported", v.len()),
                    ))
                }
                Some(Prompt::Tokens(_)) => (None, false, false),
            }
        }
        Kind::Chat => {
            if req.prompt.is_some() {
                return Err(ApiError::invalid_field(
                    "prompt",
                    "not accepted by /v1/chat/completions (use `messages`)",
                ));
            }
            let Some(messages) = &req.messages else {
                return Err(ApiError::invalid_field("messages", "missing"));
            };
            if messages.is_empty() {
                return Err(ApiError::invalid_field("messages", "empty list"));
            }
            let mut msgs = Vec::with_capacity(messages.len());
            for (i, m) in messages.iter().enumerate() {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(s)) => s.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => s.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid_field(
                                        &format!("messages[{i}].content"),
                                        format!("unsupported part type {:?}", p.kind),
                                    ))
                                }
                            }
                        }
                        s
                    }
                };
                if m.role.is_empty() {
                    return Err(ApiError::invalid_field(
                        &format!("messages[{i}].role"),
                        "empty",
                    ));
                }
                msgs.push(ChatMessage::new(m.role.clone(), content));
            }
            let rendered = st
                .template
                .render(&msgs, true)
                .map_err(|e| ApiError::invalid_field("messages", e))?;
            // As `graft run --chat`: a template that writes the BOS text itself must not
            // get a second BOS.
            let bos = st.template.bos_token();
            let add_bos = bos.is_empty() || !rendered.starts_with(bos);
            (Some(rendered), add_bos, true)
        }
    };
    let prompt = match (&text, &req.prompt) {
        (Some(t), _) => st.tokenizer.encode(t, add_bos, parse_special),
        (None, Some(Prompt::Tokens(ids))) => {
            let n_vocab = st.model.config.n_vocab;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= n_vocab) {
                return Err(ApiError::invalid_field(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary (size {n_vocab})"),
                ));
            }
            ids.clone()
        }
        _ => return Err(ApiError::invalid_field("prompt", "missing")),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid_field(
            "prompt",
            "empty: at least one token is needed",
        ));
    }
    if prompt.len() >= st.kv_capacity {
        return Err(context_error(prompt.len(), 0, st.kv_capacity));
    }
    let max_tokens = match req.max_tokens()? {
        Some(n) => n,
        None => match kind {
            Kind::Completion => DEFAULT_COMPLETION_TOKENS,
            Kind::Chat => DEFAULT_CHAT_TOKENS.min(st.kv_capacity - prompt.len()),
        },
    };
    if prompt.len().saturating_add(max_tokens) > st.kv_capacity {
        return Err(context_error(prompt.len(), max_tokens, st.kv_capacity));
    }
    let top_k = match req.top_k {
        None => 0,
        Some(k) if k < 0 => {
            return Err(ApiError::invalid_field(
                "top_k",
                format!("{k}: must be >= 0 (0 = off)"),
            ))
        }
        Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
    };
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_field(
            "temperature",
            format!("{temperature}: expected [0, 2] (0 = greedy)"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_field(
            "top_p",
            format!("{top_p}: expected (0, 1]"),
        ));
    }
    let sampling = SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p: req.min_p.unwrap_or(0.0),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        seed: req.seed.unwrap_or_else(fresh_seed),
        ..SamplingParams::default()
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad_request("invalid_parameter", e.to_string()))?;
    let stop = req.stops()?;
    let (delta, label) = resolve_adapters(st, &req)?;
    let model = req
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| st.opts.model_id.clone());
    Ok(Prepared {
        request: Request {
            prompt,
            params: GenerateParams {
                max_tokens,
                sampling,
                stop,
                ignore_eos: req.ignore_eos.unwrap_or(false),
                kv_type: KvType::F16,
            },
            delta,
        },
        label,
        model,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

fn context_error(prompt: usize, max_tokens: usize, capacity: usize) -> ApiError {
    ApiError::bad_request(
        "context_length_exceeded",
        format!(
            "prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the KV cache capacity of {capacity} tokens"
        ),
    )
}

/// The adapter stack a request names (`model`, `adapter_id`/`adapter`, `lora`), taken
/// from the registry now, and its label for metrics.
fn resolve_adapters(
    st: &AppState,
    req: &GenRequest,
) -> Result<(Option<Arc<dyn LinearDelta>>, String), ApiError> {
    let mut members: Vec<(String, f32)> = Vec::new();
    if let Some(m) = req.model.as_deref() {
        if !m.is_empty() && m != st.opts.model_id {
            if !st.registry.contains(m) {
                return Err(ApiError::not_found(
                    "model_not_found",
                    format!(
                        "model {m:?} is neither the base model ({:?}) nor a loaded adapter",
                        st.opts.model_id
                    ),
                ));
            }
            members.push((m.to_owned(), 1.0));
        }
    }
    for (field, v) in [("adapter_id", &req.adapter_id), ("adapter", &req.adapter)] {
        if let Some(name) = v {
            if !st.registry.contains(name) {
                return Err(ApiError::not_found(
                    "adapter_not_found",
                    format!("`{field}`: no adapter named {name:?} is loaded"),
                ));
            }
            members.push((name.clone(), 1.0));
        }
    }
    if let Some(list) = &req.lora {
        // Integer ids index the adapters in name order, as /v1/lora_adapters lists them.
        let mut names: Vec<String> = Vec::new();
        for (i, l) in list.iter().enumerate() {
            let name = match (&l.name, &l.id) {
                (Some(n), _) | (None, Some(LoraId::Name(n))) => n.clone(),
                (None, Some(LoraId::Index(ix))) => {
                    if names.is_empty() {
                        names = st
                            .registry
                            .list()
                            .iter()
                            .map(|a| a.name.to_string())
                            .collect();
                        names.sort();
                    }
                    match usize::try_from(*ix).ok().and_then(|ix| names.get(ix)) {
                        Some(n) => n.clone(),
                        None => {
                            return Err(ApiError::not_found(
                                "adapter_not_found",
                                format!("`lora[{i}].id`: no adapter with index {ix}"),
                            ))
                        }
                    }
                }
                (None, None) => {
                    return Err(ApiError::invalid_field(
                        &format!("lora[{i}]"),
                        "needs `id` or `name`",
                    ))
                }
            };
            let scale = l.scale.unwrap_or(1.0);
            if !scale.is_finite() {
                return Err(ApiError::invalid_field(
                    &format!("lora[{i}].scale"),
                    "must be finite",
                ));
            }
            // llama.cpp: scale 0 turns an adapter off.
            if scale != 0.0 {
                members.push((name, scale));
            }
        }
    }
    if members.is_empty() {
        return Ok((None, "base".to_owned()));
    }
    let handles = st.registry.resolve_handles(&members).map_err(|e| match e {
        // Unloaded since the check above: the same answer as if it had been gone then.
        graft_adapters::AdapterError::Registry(RegistryError::NotLoaded { name })
            if req.model.as_deref() == Some(name.as_str()) =>
        {
            ApiError::not_found(
                "model_not_found",
                format!(
                    "model {name:?} is neither the base model ({:?}) nor a loaded adapter",
                    st.opts.model_id
                ),
            )
        }
        graft_adapters::AdapterError::Registry(RegistryError::NotLoaded { name }) => {
            ApiError::not_found(
                "adapter_not_found",
                format!("no adapter named {name:?} is loaded"),
            )
        }
        other => ApiError::internal(other.to_string()),
    })?;
    let label = members
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join("+");
    let key: crate::StackKey = handles
        .iter()
        .map(|(h, s)| (h.name.clone(), h.generation, s.to_bits()))
        .collect();
    let mut stacks = st.stacks.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = stacks.get(&key).and_then(std::sync::Weak::upgrade) {
        return Ok((Some(s), label));
    }
    // Same as `graft run --adapter`: a stack, even of one adapter at scale 1.
    let stack = Arc::new(AdapterStack::new(
        handles.into_iter().map(|(h, s)| (h.adapter, s)).collect(),
    ));
    stacks.retain(|_, w| w.strong_count() > 0);
    stacks.insert(key, Arc::downgrade(&stack));
    Ok((Some(stack), label))
}

fn handle_error(e: HandleError) -> ApiError {
    match e {
        HandleError::Engine(EngineError::QueueFull(n)) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("the server is busy ({n} requests waiting); retry later"),
        )
        .with_retry_after(1),
        HandleError::Engine(EngineError::TooLong {
            prompt,
            max_tokens,
            total,
            ..
        }) => ApiError::bad_request(
            "context_length_exceeded",
            format!(
                "prompt ({prompt} tokens) plus max_tokens ({max_tokens}) does not fit the KV cache ({total} blocks)"
            ),
        ),
        HandleError::Engine(EngineError::EmptyPrompt) => {
            ApiError::invalid_field("prompt", "empty: at least one token is needed")
        }
        HandleError::Engine(EngineError::Sampling(e)) => {
            ApiError::bad_request("invalid_parameter", e.to_string())
        }
        HandleError::Engine(EngineError::Model(e)) => ApiError::internal(e.to_string()),
        HandleError::Stopped => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
        .with_retry_after(1),
    }
}

/// A submitted request: its events, its timings, and a cancellation sent to the
/// engine if it is dropped before the end (the client went away). The cancel reaches
/// a request still queued too, which produces no event that could notice the
/// dropped receiver.
struct Submitted {
    rx: mpsc::Receiver<Event>,
    flight: InFlight,
    engine: EngineHandle,
    id: RequestId,
}

impl Drop for Submitted {
    fn drop(&mut self) {
        if !self.flight.is_finished() {
            self.engine.cancel(self.id);
        }
    }
}

/// Submits to the engine (a blocking call) and forwards its events to an async
/// channel. When the request ends early, [`Submitted`]'s drop cancels it and the
/// forwarder stops at the engine's final event.
async fn submit(
    st: &AppState,
    request: Request,
) -> Result<(RequestId, mpsc::Receiver<Event>), ApiError> {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let engine = st.engine.clone();
    tokio::task::spawn_blocking(move || match engine.submit(request) {
        Err(e) => {
            let _ = first_tx.send(Err(e));
        }
        Ok((id, events)) => {
            let _ = first_tx.send(Ok(id));
            for ev in events {
                if tx.blocking_send(ev).is_err() {
                    break;
                }
            }
        }
    });
    match first_rx.await {
        Ok(Ok(id)) => Ok((id, rx)),
        Ok(Err(e)) => Err(handle_error(e)),
        Err(_) => Err(ApiError::internal("the engine dropped the request")),
    }
}

/// Per-response constants shared by every chunk.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// A streamed chunk: `text` (or a chat `delta`) and maybe the finish reason.
    fn chunk(&self, text: &str, finish: Option<&str>, first: bool) -> String {
        let choice = match self.kind {
            Kind::Completion => json!({"index": 0, "text": text, "finish_reason": finish}),
            Kind::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if text.is_empty() && finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
        };
        self.envelope(true, json!([choice])).to_string()
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

async fn run(
    st: Arc<AppState>,
    p: Prepared,
    kind: Kind,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let n_prompt = p.request.prompt.len();
    let flight = InFlight::new(st.metrics.clone(), arrived);
    let (id, rx) = match submit(&st, p.request).await {
        Ok(x) => x,
        Err(e) => {
            let mut flight = flight;
            flight.finish(false); // refused, not aborted
            return Err(e);
        }
    };
    let mut sub = Submitted {
        rx,
        flight,
        engine: st.engine.clone(),
        id,
    };
    st.metrics.adapter_request(&p.label);
    st.metrics
        .prompt_tokens
        .fetch_add(n_prompt as u64, Ordering::Relaxed);
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let meta = Meta {
        id: format!("{prefix}-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        created: now_secs(),
        model: p.model,
        kind,
    };
    if p.stream {
        return Ok(stream(sub, meta, p.include_usage));
    }
    let mut text = String::new();
    let (finish, prompt_tokens, completion_tokens) = loop {
        match sub.rx.recv().await {
            Some(Event::Token { text: t, .. }) => {
                sub.flight.token();
                text.push_str(&t);
            }
            Some(Event::Done {
                finish,
                text: t,
                prompt_tokens,
                completion_tokens,
                ..
            }) => {
                sub.flight.finish(finish != FinishReason::Cancelled);
                text.push_str(&t);
                break (finish, prompt_tokens, completion_tokens);
            }
            None => {
                sub.flight.finish(false);
                return Err(ApiError::internal("the engine stopped mid-request"));
            }
        }
    };
    if finish == FinishReason::Cancelled {
        // Only an engine failure cancels a request whose client is still here.
        return Err(ApiError::internal("generation failed (see the server log)"));
    }
    let choice = match kind {
        Kind::Completion => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str(),
        }),
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish.as_str(),
        }),
    };
    let mut body = meta.envelope(false, json!([choice]));
    body["usage"] = usage(prompt_tokens, completion_tokens);
    Ok(Json(body).into_response())
}

enum Phase {
    Tokens,
    Usage(usize, usize),
    DoneMarker,
    End,
}

struct StreamState {
    sub: Submitted,
    meta: Meta,
    include_usage: bool,
    first: bool,
    phase: Phase,
}

fn stream(sub: Submitted, meta: Meta, include_usage: bool) -> Response {
    let state = StreamState {
        sub,
        meta,
        include_usage,
        first: true,
        phase: Phase::Tokens,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            match s.phase {
                Phase::Tokens => match s.sub.rx.recv().await {
                    Some(Event::Token { text, .. }) => {
                        s.sub.flight.token();
                        if text.is_empty() {
                            continue;
                        }
                        let data = s.meta.chunk(&text, None, s.first);
                        s.first = false;
                        return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s));
                    }
                    Some(Event::Done {
                        finish,
                        text,
                        prompt_tokens,
                        completion_tokens,
                        ..
                    }) => {
                        s.sub.flight.finish(finish != FinishReason::Cancelled);
                        if finish == FinishReason::Cancelled {
                            s.phase = Phase::End;
                            let err = ApiError::internal("generation failed (see the server log)");
                            return Some((Ok(SseEvent::default().data(err.body().to_string())), s));
                        }
                        let data = s.meta.chunk(&text, Some(finish.as_str()), s.first);
                        s.first = false;
                        s.phase = if s.include_usage {
                            Phase::Usage(prompt_tokens, completion_tokens)
                        } else {
                            Phase::DoneMarker
                        };
                        return Some((Ok(SseEvent::default().data(data)), s));
                    }
                    None => {
                        s.sub.flight.finish(false);
                        s.phase = Phase::End;
                        let err = ApiError::internal("the engine stopped mid-request");
                        return Some((Ok(SseEvent::default().data(err.body().to_string())), s));
                    }
                },
                Phase::Usage(p, c) => {
                    s.phase = Phase::DoneMarker;
                    let mut body = s.meta.envelope(true, json!([]));
                    body["usage"] = usage(p, c);
                    return Some((Ok(SseEvent::default().data(body.to_string())), s));
                }
                Phase::DoneMarker => {
                    s.phase = Phase::End;
                    return Some((Ok(SseEvent::default().data("[DONE]")), s));
                }
                Phase::End => return None,
            }
        }
    });
    Sse::new(events).into_response()
}
