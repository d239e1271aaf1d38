//! Continuous batching: every request's output equals generating it alone, whatever
//! the batch, the chunking, the adapter mix and KV-cache preemption.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use graft_runtime::generate::{generate_adapted, FinishReason, GenerateParams};
use graft_runtime::kv_cache::{KvCache, KvType};
use graft_runtime::model::{DeltaError, LinearDelta, Model, Proj};
use graft_runtime::sampling::SamplingParams;
use graft_runtime::scheduler::{Engine, EngineConfig, EngineError, Event, Request, RequestId};
use graft_runtime::tokenizer::Tokenizer;

/// A deterministic delta: adds `c * x[j % in]` to output j of q and down projections.
struct ToyDelta(f32);

impl LinearDelta for ToyDelta {
    fn touches(&self, _layer: usize, proj: Proj) -> bool {
        matches!(proj, Proj::Q | Proj::Down)
    }

    fn is_additive(&self, _layer: usize, _proj: Proj) -> bool {
        true
    }

    fn apply(
        &self,
        _layer: usize,
        _proj: Proj,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), DeltaError> {
        let (inp, out) = (x.len() / n, y.len() / n);
        for t in 0..n {
            for j in 0..out {
                y[t * out + j] += self.0 * x[t * inp + j % inp];
            }
        }
        Ok(())
    }
}

fn load() -> (Model, Tokenizer) {
    let model = Model::load(&conformance().join("models/llama-gqa-Q8_0.gguf"), None).unwrap();
    let tok = Tokenizer::from_gguf(model.gguf.as_ref().unwrap()).unwrap();
    (model, tok)
}

fn params(max_tokens: usize, sampling: SamplingParams) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling,
        ignore_eos: true,
        ..GenerateParams::default()
    }
}

/// (tokens, text, finish) per request, from the engine's events.
fn collect(events: &[Event]) -> HashMap<RequestId, (Vec<u32>, String, FinishReason)> {
    let mut out: HashMap<RequestId, (Vec<u32>, String, FinishReason)> = HashMap::new();
    for e in events {
        match e {
            Event::Token { id, token, text } => {
                let r = out
                    .entry(*id)
                    .or_insert((Vec::new(), String::new(), FinishReason::Length));
                r.0.push(*token);
                r.1.push_str(text);
            }
            Event::Done {
                id, finish, text, ..
            } => {
                let r = out
                    .entry(*id)
                    .or_insert((Vec::new(), String::new(), FinishReason::Length));
                r.1.push_str(text);
                r.2 = *finish;
            }
        }
    }
    out
}

fn requests(tok: &Tokenizer, sampling: &SamplingParams) -> Vec<Request> {
    let d1: Arc<dyn LinearDelta> = Arc::new(ToyDelta(0.05));
    let d2: Arc<dyn LinearDelta> = Arc::new(ToyDelta(-0.08));
    let prompts = ["Once upon a time", "The quick brown fox jumps over", "a"];
    let mut reqs = Vec::new();
    for (k, delta) in [None, Some(d1), Some(d2)].into_iter().enumerate() {
        for (i, p) in prompts.iter().enumerate() {
            reqs.push(Request {
                prompt: tok.encode(p, true, false),
                params: params(10 + i + k, sampling.clone()),
                delta: delta.clone(),
            });
        }
    }
    reqs
}

fn alone(model: &Model, tok: &Tokenizer, r: &Request) -> (Vec<u32>, String) {
    let out = generate_adapted(model, tok, &r.prompt, &r.params, r.delta.as_deref(), |_| {
        true
    })
    .unwrap();
    (out.tokens, out.text)
}

/// Runs the requests through an engine and checks each against its single run;
/// returns the number of preemptions.
fn check_engine(cache: KvCache, config: EngineConfig, sampling: SamplingParams) -> u64 {
    let (model, tok) = load();
    let reqs = requests(&tok, &sampling);
    let mut engine = Engine::new(&model, &tok, cache, config);
    // Staggered arrival: two requests, a few steps, then the rest.
    let mut ids = Vec::new();
    let mut events = Vec::new();
    for r in &reqs[..2] {
        ids.push(engine.submit(r.clone()).unwrap());
    }
    for _ in 0..3 {
        events.extend(engine.step().unwrap());
    }
    for r in &reqs[2..] {
        ids.push(engine.submit(r.clone()).unwrap());
    }
    while !engine.is_idle() {
        events.extend(engine.step().unwrap());
    }
    let got = collect(&events);
    for (r, id) in reqs.iter().zip(&ids) {
        let (want_tokens, want_text) = alone(&model, &tok, r);
        let (tokens, text, finish) = &got[id];
        assert_eq!(tokens, &want_tokens, "request {id}");
        assert_eq!(text, &want_text, "request {id}");
        assert_eq!(*finish, FinishReason::Length);
        assert_eq!(tokens.len(), r.params.max_tokens);
    }
    assert_eq!(engine.cache().free_blocks(), engine.cache().total_blocks());
    engine.preemptions()
}

fn roomy_cache(model_file: &str) -> KvCache {
    let model = Model::load(&conformance().join(model_file), None).unwrap();
    model.new_cache(4096, KvType::F16)
}

#[test]
fn greedy_requests_in_shared_steps_equal_their_single_runs() {
    let config = EngineConfig {
        max_batch_tokens: 7,
        ..EngineConfig::default()
    };
    let preemptions = check_engine(
        roomy_cache("models/llama-gqa-Q8_0.gguf"),
        config,
        SamplingParams::greedy(),
    );
    assert_eq!(preemptions, 0);
}

#[test]
fn sampled_requests_replay_their_seeds() {
    let sampling = SamplingParams {
        temperature: 0.9,
        seed: 42,
        ..SamplingParams::default()
    };
    check_engine(
        roomy_cache("models/llama-gqa-Q8_0.gguf"),
        EngineConfig::default(),
        sampling,
    );
}

#[test]
fn one_delta_per_step_still_serves_everyone() {
    let config = EngineConfig {
        max_deltas_per_step: 1,
        ..EngineConfig::default()
    };
    check_engine(
        roomy_cache("models/llama-gqa-Q8_0.gguf"),
        config,
        SamplingParams::greedy(),
    );
}

#[test]
fn preemption_under_kv_pressure_keeps_outputs() {
    let (model, _) = load();
    let c = &model.config;
    // 16 blocks of 4 tokens: each request needs up to 6 blocks, nine requests compete.
    let cache = KvCache::new(c.n_layer, c.kv_dim(), 16, 4, KvType::F16);
    let config = EngineConfig {
        max_batch_tokens: 16,
        ..EngineConfig::default()
    };
    let preemptions = check_engine(cache, config, SamplingParams::greedy());
    assert!(preemptions > 0, "the cache was meant to overflow");
}

#[test]
fn cancel_backpressure_and_limits() {
    let (model, tok) = load();
    let cache = model.new_cache(256, KvType::F16);
    let total = cache.total_blocks();
    let config = EngineConfig {
        max_waiting: 2,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(&model, &tok, cache, config);
    let prompt = tok.encode("Hello there", true, false);
    let req = |n| Request {
        prompt: prompt.clone(),
        params: params(n, SamplingParams::greedy()),
        delta: None,
    };
    let a = engine.submit(req(50)).unwrap();
    let b = engine.submit(req(50)).unwrap();
    assert!(matches!(
        engine.submit(req(5)),
        Err(EngineError::QueueFull(2))
    ));
    assert!(matches!(
        engine.submit(Request {
            prompt: vec![],
            ..req(1)
        }),
        Err(EngineError::EmptyPrompt)
    ));
    assert!(matches!(
        engine.submit(req(100_000)),
        Err(EngineError::TooLong { .. })
    ));
    engine.step().unwrap();
    engine.step().unwrap();
    match engine.cancel(a) {
        Some(Event::Done {
            finish,
            completion_tokens,
            ..
        }) => {
            assert_eq!(finish, FinishReason::Cancelled);
            assert_eq!(completion_tokens, 2);
        }
        other => panic!("cancel gave {other:?}"),
    }
    assert!(engine.cancel(a).is_none());
    let zero = engine.submit(req(0)).unwrap();
    let events = engine.run_to_completion().unwrap();
    let got = collect(&events);
    assert_eq!(got[&b].0.len(), 48);
    assert_eq!(got[&zero].0.len(), 0);
    assert_eq!(got[&zero].2, FinishReason::Length);
    assert!(!got.contains_key(&a));
    assert_eq!(engine.cache().free_blocks(), total);
}

#[test]
fn engine_thread_serves_concurrent_clients_exactly() {
    let (model, tok) = load();
    let (model, tok) = (Arc::new(model), Arc::new(tok));
    let reqs = requests(&tok, &SamplingParams::greedy());
    let wants: Vec<(Vec<u32>, String)> = reqs.iter().map(|r| alone(&model, &tok, r)).collect();
    let engine = graft_runtime::scheduler::EngineThread::spawn(
        model.clone(),
        tok.clone(),
        model.new_cache(2048, KvType::F16),
        EngineConfig::default(),
    )
    .unwrap();
    let clients: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let h = engine.handle();
            std::thread::spawn(move || {
                let (id, rx) = h.submit(r).unwrap();
                let events: Vec<Event> = rx.iter().collect();
                collect(&events).remove(&id).unwrap()
            })
        })
        .collect();
    for (c, want) in clients.into_iter().zip(&wants) {
        let (tokens, text, finish) = c.join().unwrap();
        assert_eq!((&tokens, &text), (&want.0, &want.1));
        assert_eq!(finish, FinishReason::Length);
    }

    // A client that goes away is cancelled; the engine keeps serving others.
    let h = engine.handle();
    let prompt = tok.encode("Hello", true, false);
    let long = Request {
        prompt: prompt.clone(),
        params: params(200, SamplingParams::greedy()),
        delta: None,
    };
    let (_, rx) = h.submit(long).unwrap();
    rx.recv().unwrap();
    drop(rx);
    let (id, rx) = h
        .submit(Request {
            prompt,
            params: params(3, SamplingParams::greedy()),
            delta: None,
        })
        .unwrap();
    let got = collect(&rx.iter().collect::<Vec<_>>());
    assert_eq!(got[&id].0.len(), 3);
    engine.shutdown();
    assert!(h
        .submit(Request {
            prompt: vec![1],
            params: params(1, SamplingParams::greedy()),
            delta: None,
        })
        .is_err());
}
